#include "apiary_sandbox.h"

/// Sets one boolean sqlite3_db_config option and reads it back.
static int setFlag(sqlite3 *db, int op, int wanted) {
    int now = -1;
    int rc = sqlite3_db_config(db, op, wanted, &now);
    if (rc != SQLITE_OK) return rc;
    return now == wanted ? SQLITE_OK : SQLITE_ERROR;
}

int apiary_harden_connection(sqlite3 *db) {
    int rc;
    if ((rc = setFlag(db, SQLITE_DBCONFIG_DEFENSIVE, 1)) != SQLITE_OK) return rc;
    if ((rc = setFlag(db, SQLITE_DBCONFIG_TRUSTED_SCHEMA, 0)) != SQLITE_OK) return rc;
    if ((rc = setFlag(db, SQLITE_DBCONFIG_ENABLE_FTS3_TOKENIZER, 0)) != SQLITE_OK) return rc;
    if ((rc = setFlag(db, SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION, 0)) != SQLITE_OK) return rc;
    return SQLITE_OK;
}

int apiary_db_config_flag(sqlite3 *db, int op) {
    int now = -1;
    return sqlite3_db_config(db, op, -1, &now) == SQLITE_OK ? now : -1;
}
