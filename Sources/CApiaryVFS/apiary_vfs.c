// Apiary's VFS: a shim over the default unix VFS, the one seam for page capture.
//
// Everything is forwarded to the unix VFS except:
// - xSync on a WAL file first calls the capture hook (see apiary_vfs.h), and fails the
//   sync (so the commit) when the hook fails;
// - xDeviceCharacteristics always reports SQLITE_IOCAP_POWERSAFE_OVERWRITE. Without it
//   wal.c pads each commit to a sector boundary with copies of the commit frame and syncs
//   in the middle of writing them (walWriteToLog, iSyncPoint), so the hook could see a
//   half-written padding frame. With it, padToSectorBoundary is 0 and the sync follows the
//   commit frame directly (wal.c: sqlite3WalFrames "if( isCommit && WAL_SYNC_FLAGS ...").
//   The unix VFS already reports it by default (SQLITE_POWERSAFE_OVERWRITE=1); we pin it.
// - a WAL file remembers where the writes made through it end (`writtenEnd`), so that the
//   hook knows where the commit's frames end without asking the file system its size. An
//   fstat per commit is not free on Linux 6.13+ (multigrain timestamps): it marks the WAL's
//   ctime as queried, so SQLite's next WAL write stamps a fine-grained mtime and dirties the
//   inode every commit, and the replication log's durable write then also writes that inode
//   table block (ext4 without a journal writes it at every fsync): one more synchronous I/O
//   per commit, measured at +50 us (docs/benchmarks.md).
#include "apiary_vfs.h"
#include <string.h>

typedef struct ApiaryFile {
    sqlite3_file base;
    const char *name; // valid until xClose (sqlite3_vfs docs: xOpen's zFilename)
    int isWAL;
    // WAL files only: the end of the writes made through this file since the WAL (re)started:
    // wal.c appends frames in order after the header it writes at offset 0 when the WAL
    // starts over, and rewrites only frames before its end (walRewriteChecksums). -1 until
    // the first write: this connection has not written the WAL yet.
    sqlite3_int64 writtenEnd;
    sqlite3_file *real; // the unix VFS's file, allocated right after this struct
} ApiaryFile;

static sqlite3_vfs *unixVFS = 0;
static apiary_wal_sync_hook walSyncHook = 0;

#define REAL(f) (((ApiaryFile *)(f))->real)

static int apiaryClose(sqlite3_file *f) {
    int rc = REAL(f)->pMethods->xClose(REAL(f));
    return rc;
}
static int apiaryRead(sqlite3_file *f, void *b, int n, sqlite3_int64 o) { return REAL(f)->pMethods->xRead(REAL(f), b, n, o); }
static int apiaryWrite(sqlite3_file *f, const void *b, int n, sqlite3_int64 o) {
    ApiaryFile *p = (ApiaryFile *)f;
    int rc = p->real->pMethods->xWrite(p->real, b, n, o);
    if (p->isWAL) {
        // A failed write leaves the end unknown (it may have written part).
        if (rc != SQLITE_OK) p->writtenEnd = -1;
        else if (o == 0 || o + n > p->writtenEnd) p->writtenEnd = o + n;
    }
    return rc;
}
static int apiaryTruncate(sqlite3_file *f, sqlite3_int64 s) {
    ApiaryFile *p = (ApiaryFile *)f;
    int rc = p->real->pMethods->xTruncate(p->real, s);
    if (p->isWAL && (rc != SQLITE_OK || s < p->writtenEnd)) p->writtenEnd = rc == SQLITE_OK ? s : -1;
    return rc;
}
static int apiarySync(sqlite3_file *f, int flags) {
    ApiaryFile *p = (ApiaryFile *)f;
    if (p->isWAL && walSyncHook) {
        int rc = walSyncHook(p->real, p->name, p->writtenEnd);
        if (rc == APIARY_SYNC_SKIP) return SQLITE_OK;
        if (rc != APIARY_SYNC_WAL) return rc;
    }
    return p->real->pMethods->xSync(p->real, flags);
}
static int apiaryFileSize(sqlite3_file *f, sqlite3_int64 *s) { return REAL(f)->pMethods->xFileSize(REAL(f), s); }
static int apiaryLock(sqlite3_file *f, int l) { return REAL(f)->pMethods->xLock(REAL(f), l); }
static int apiaryUnlock(sqlite3_file *f, int l) { return REAL(f)->pMethods->xUnlock(REAL(f), l); }
static int apiaryCheckReservedLock(sqlite3_file *f, int *r) { return REAL(f)->pMethods->xCheckReservedLock(REAL(f), r); }
static int apiaryFileControl(sqlite3_file *f, int op, void *a) { return REAL(f)->pMethods->xFileControl(REAL(f), op, a); }
static int apiarySectorSize(sqlite3_file *f) { return REAL(f)->pMethods->xSectorSize(REAL(f)); }
static int apiaryDeviceCharacteristics(sqlite3_file *f) {
    return REAL(f)->pMethods->xDeviceCharacteristics(REAL(f)) | SQLITE_IOCAP_POWERSAFE_OVERWRITE;
}
static int apiaryShmMap(sqlite3_file *f, int i, int sz, int w, void volatile **pp) { return REAL(f)->pMethods->xShmMap(REAL(f), i, sz, w, pp); }
static int apiaryShmLock(sqlite3_file *f, int o, int n, int fl) { return REAL(f)->pMethods->xShmLock(REAL(f), o, n, fl); }
static void apiaryShmBarrier(sqlite3_file *f) { REAL(f)->pMethods->xShmBarrier(REAL(f)); }
static int apiaryShmUnmap(sqlite3_file *f, int d) { return REAL(f)->pMethods->xShmUnmap(REAL(f), d); }
static int apiaryFetch(sqlite3_file *f, sqlite3_int64 o, int n, void **pp) { return REAL(f)->pMethods->xFetch(REAL(f), o, n, pp); }
static int apiaryUnfetch(sqlite3_file *f, sqlite3_int64 o, void *p) { return REAL(f)->pMethods->xUnfetch(REAL(f), o, p); }

static const sqlite3_io_methods apiaryIOMethods = {
    3,
    apiaryClose, apiaryRead, apiaryWrite, apiaryTruncate, apiarySync, apiaryFileSize,
    apiaryLock, apiaryUnlock, apiaryCheckReservedLock, apiaryFileControl, apiarySectorSize,
    apiaryDeviceCharacteristics, apiaryShmMap, apiaryShmLock, apiaryShmBarrier, apiaryShmUnmap,
    apiaryFetch, apiaryUnfetch,
};

static int apiaryOpen(sqlite3_vfs *vfs, const char *name, sqlite3_file *f, int flags, int *outFlags) {
    ApiaryFile *p = (ApiaryFile *)f;
    memset(p, 0, sizeof(*p));
    p->real = (sqlite3_file *)&p[1];
    p->name = name;
    p->isWAL = (flags & SQLITE_OPEN_WAL) != 0;
    p->writtenEnd = -1;
    int rc = unixVFS->xOpen(unixVFS, name, p->real, flags, outFlags);
    // SQLite calls xClose only when pMethods is set, so set it only on success.
    p->base.pMethods = (rc == SQLITE_OK && p->real->pMethods) ? &apiaryIOMethods : 0;
    return rc;
}
static int apiaryDelete(sqlite3_vfs *v, const char *n, int s) { return unixVFS->xDelete(unixVFS, n, s); }
static int apiaryAccess(sqlite3_vfs *v, const char *n, int fl, int *r) { return unixVFS->xAccess(unixVFS, n, fl, r); }
static int apiaryFullPathname(sqlite3_vfs *v, const char *n, int o, char *out) { return unixVFS->xFullPathname(unixVFS, n, o, out); }
static void *apiaryDlOpen(sqlite3_vfs *v, const char *n) { return unixVFS->xDlOpen(unixVFS, n); }
static void apiaryDlError(sqlite3_vfs *v, int n, char *m) { unixVFS->xDlError(unixVFS, n, m); }
static void (*apiaryDlSym(sqlite3_vfs *v, void *h, const char *s))(void) { return unixVFS->xDlSym(unixVFS, h, s); }
static void apiaryDlClose(sqlite3_vfs *v, void *h) { unixVFS->xDlClose(unixVFS, h); }
static int apiaryRandomness(sqlite3_vfs *v, int n, char *out) { return unixVFS->xRandomness(unixVFS, n, out); }
static int apiarySleep(sqlite3_vfs *v, int us) { return unixVFS->xSleep(unixVFS, us); }
static int apiaryCurrentTime(sqlite3_vfs *v, double *t) { return unixVFS->xCurrentTime(unixVFS, t); }
static int apiaryGetLastError(sqlite3_vfs *v, int n, char *m) { return unixVFS->xGetLastError(unixVFS, n, m); }
static int apiaryCurrentTimeInt64(sqlite3_vfs *v, sqlite3_int64 *t) { return unixVFS->xCurrentTimeInt64(unixVFS, t); }

static sqlite3_vfs apiaryVFS;

int apiary_vfs_register(apiary_wal_sync_hook hook) {
    if (unixVFS) { walSyncHook = hook; return SQLITE_OK; }
    sqlite3_vfs *base = sqlite3_vfs_find("unix");
    if (!base) return SQLITE_ERROR;
    unixVFS = base;
    walSyncHook = hook;
    memset(&apiaryVFS, 0, sizeof(apiaryVFS));
    apiaryVFS.iVersion = 2;
    apiaryVFS.szOsFile = (int)sizeof(ApiaryFile) + base->szOsFile;
    apiaryVFS.mxPathname = base->mxPathname;
    apiaryVFS.zName = APIARY_VFS_NAME;
    apiaryVFS.xOpen = apiaryOpen;
    apiaryVFS.xDelete = apiaryDelete;
    apiaryVFS.xAccess = apiaryAccess;
    apiaryVFS.xFullPathname = apiaryFullPathname;
    apiaryVFS.xDlOpen = apiaryDlOpen;
    apiaryVFS.xDlError = apiaryDlError;
    apiaryVFS.xDlSym = apiaryDlSym;
    apiaryVFS.xDlClose = apiaryDlClose;
    apiaryVFS.xRandomness = apiaryRandomness;
    apiaryVFS.xSleep = apiarySleep;
    apiaryVFS.xCurrentTime = apiaryCurrentTime;
    apiaryVFS.xGetLastError = apiaryGetLastError;
    apiaryVFS.xCurrentTimeInt64 = apiaryCurrentTimeInt64;
    return sqlite3_vfs_register(&apiaryVFS, 0);
}

int apiary_file_read(sqlite3_file *f, void *b, int n, sqlite3_int64 o) { return f->pMethods->xRead(f, b, n, o); }
int apiary_file_write(sqlite3_file *f, const void *b, int n, sqlite3_int64 o) { return f->pMethods->xWrite(f, b, n, o); }
int apiary_file_size(sqlite3_file *f, sqlite3_int64 *s) { return f->pMethods->xFileSize(f, s); }
int apiary_file_sync(sqlite3_file *f) { return f->pMethods->xSync(f, SQLITE_SYNC_FULL); }

int apiary_bind_text(sqlite3_stmt *s, int i, const char *t, int n) { return sqlite3_bind_text(s, i, t, n, SQLITE_TRANSIENT); }
int apiary_bind_blob(sqlite3_stmt *s, int i, const void *b, int n) { return sqlite3_bind_blob(s, i, b, n, SQLITE_TRANSIENT); }
