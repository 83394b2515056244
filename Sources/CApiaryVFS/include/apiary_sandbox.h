#ifndef APIARY_SANDBOX_H
#define APIARY_SANDBOX_H

#include <sqlite3.h>

/// Hardens a connection as SQLite's "Defense Against The Dark Arts" page advises, through
/// sqlite3_db_config (variadic, so Swift cannot call it): defensive mode on, the schema not
/// trusted, the FTS3 tokenizer interface off (Debian builds SQLite with
/// SQLITE_ENABLE_FTS3_TOKENIZER, which turns it on by default: fts3_tokenizer() then hands
/// out and accepts raw function pointers), extension loading off. Each setting is read back.
/// Returns SQLITE_OK, or the result code of the first setting that failed or did not hold.
int apiary_harden_connection(sqlite3 *db);

/// The current value of a boolean sqlite3_db_config option (-1 if SQLite refuses the query),
/// so that tests can check what `apiary_harden_connection` set.
int apiary_db_config_flag(sqlite3 *db, int op);

#endif
