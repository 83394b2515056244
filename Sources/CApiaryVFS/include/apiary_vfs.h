#ifndef APIARY_VFS_H
#define APIARY_VFS_H

#include <sqlite3.h>

/// Name under which the VFS is registered; pass it to sqlite3_open_v2.
#define APIARY_VFS_NAME "apiary"

/// Called when SQLite asks to sync a WAL file, BEFORE the real fsync.
///
/// SQLite has written every frame of the transaction by then but has not yet published the
/// commit in the wal-index (wal.c, sqlite3WalFrames: the wal-index is appended and its header
/// written only after the sync returned SQLITE_OK). Return:
/// - APIARY_SYNC_WAL: nothing was captured; do the real fsync.
/// - APIARY_SYNC_SKIP: a commit was captured and is durable in the replication log, which is
///   the truth the database is redone from after a crash; the WAL fsync is not needed.
/// - any SQLite error code: fail the sync, and with it the commit.
/// `real` is the underlying unix file: read it with apiary_file_read. `writtenEnd` is where
/// the writes made through this connection's WAL file end since the WAL last started over,
/// or -1 when unknown (nothing written yet, or a write failed): the file's size is then
/// the only bound.
typedef int (*apiary_wal_sync_hook)(sqlite3_file *real, const char *walPath, sqlite3_int64 writtenEnd);

#define APIARY_SYNC_WAL 0
#define APIARY_SYNC_SKIP (-1)

/// Registers the VFS (idempotent). Returns an SQLite result code.
int apiary_vfs_register(apiary_wal_sync_hook hook);

int apiary_file_read(sqlite3_file *f, void *buffer, int amount, sqlite3_int64 offset);
int apiary_file_write(sqlite3_file *f, const void *buffer, int amount, sqlite3_int64 offset);
int apiary_file_size(sqlite3_file *f, sqlite3_int64 *size);
int apiary_file_sync(sqlite3_file *f);

/// Binds a value from Swift without macros Swift cannot import (SQLITE_TRANSIENT).
int apiary_bind_text(sqlite3_stmt *stmt, int index, const char *text, int bytes);
int apiary_bind_blob(sqlite3_stmt *stmt, int index, const void *blob, int bytes);

/// Extended result codes are macros Swift cannot import.
enum {
    APIARY_IOERR_FSYNC = SQLITE_IOERR_FSYNC,
    APIARY_IOERR_FSTAT = SQLITE_IOERR_FSTAT,
};

#endif
