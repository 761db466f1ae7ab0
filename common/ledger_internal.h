/* ledger_internal.h: for the ledger's own files only: the statement ids and their runner. */
#ifndef BW_LEDGER_INTERNAL_H
#define BW_LEDGER_INTERNAL_H

#include <sqlite3.h>

#include "ledger.h"

/*
 * Every SQL statement of the ledger, by id: the one statement table (stmt_sql[] in
 * ledger.c) holds the text; each is prepared once per handle and kept. The only SQL run
 * otherwise is the schema's migration scripts (migrations[] in ledger.c).
 */
enum bw__stmt {
	BW__ST_FENCE,
	BW__ST_JOB_STATE,
	BW__ST_JOB_INSERT,
	BW__ST_DISK_INSERT,
	BW__ST_HISTORY,
	BW__ST_OUTBOX_INSERT,
	BW__ST_JOB_UPDATE,
	BW__ST_DISK_UPDATE,
	BW__ST_QUARANTINE_EXPIRE,
	BW__ST_CURSOR_GET,
	BW__ST_CURSOR_SET,
	BW__ST_FREE_PORTS,
	BW__ST_PORT_HELD_BY_DISK,
	BW__ST_PORT_INSERT,
	BW__ST_DISK_SET_PORT,
	BW__ST_PORT_RELEASE,
	BW__ST_DISK_CLEAR_PORT,
	BW__ST_PORT_RELEASE_ALL,
	BW__ST_DISK_CLEAR_PORTS,
	BW__ST_PORT_DISK,
	BW__ST_PORT_QUARANTINE,
	BW__ST_PORT_COUNTS,
	BW__ST_OUTBOX_NEXT,
	BW__ST_OUTBOX_PUBLISHED,
	BW__ST_OUTBOX_FAILED,
	BW__ST_OUTBOX_APPEND,
	BW__ST_HEARTBEAT,
	BW__ST_WORKER_GET,
	BW__ST_WORKER_JOBS,
	BW__ST_META_GET,
	BW__ST_META_SET,
	BW__ST_USER_VERSION,
	BW__ST_SET_USER_VERSION,
	BW__ST_POOL_CLEAR,
	BW__ST_POOL_FILL,
	BW__ST_JOURNAL_WAL,
	BW__ST_JOURNAL_LIMIT,
	BW__ST_SYNCHRONOUS,
	BW__ST_FOREIGN_KEYS,
	BW__ST_BEGIN,
	BW__ST_COMMIT,
	BW__ST_ROLLBACK,
	BW__ST_CHECKPOINT,
	BW__ST_WORKER_DELETE_ID,
	BW__ST_WORKER_INSERT,
	BW__ST_WORKER_UNREGISTER,
	BW__ST_WORKERS_OTHERS,
	BW__ST_WORKER_DELETE,
	BW__ST_ORPHANS,
	BW__ST_JOB_ADOPT,
	BW__ST_PORTS_ADOPT,
	BW__ST_JOB_DISKS,
	BW__ST_EVENT_BODY,
	BW__ST_REPUBLISH,
	BW__ST_OUTBOX_BACKLOG,
	BW__ST_VIEW_JOBS,
	BW__ST_VIEW_PORTS,
	BW__ST_VIEW_WORKERS,
	BW__ST_VIEW_JOB,
	BW__ST_VIEW_JOB_DISKS,
	BW__ST_VIEW_JOB_HISTORY,
	BW__ST_VIEW_JOB_EVENTS,
	/* retention (bw_ledger_prune) and its tombstones */
	BW__ST_TOMBSTONE_GET,
	BW__ST_PRUNE_CANDIDATES,
	BW__ST_PRUNE_DISK_KEYS,
	BW__ST_PRUNE_CHECK,
	BW__ST_TOMBSTONE_PUT,
	BW__ST_PRUNE_HISTORY,
	BW__ST_PRUNE_DISKS,
	BW__ST_PRUNE_OUTBOX,
	BW__ST_PRUNE_JOB,
	BW__ST_TOMBSTONE_EXPIRE,
	BW__ST_PRUNE_LONE_EVENTS,
	BW__ST_PRUNE_DUE,
	BW__ST_CANCEL_JOB,
	BW__ST_CANCEL_UPSERT,
	BW__ST_CANCEL_GET,
	BW__ST_CANCEL_DELETE,
	BW__ST_CANCEL_EXPIRE,
	BW__ST_COUNT
};

/*
 * The statement id, reset and bound by types ('i' an int64_t, 't' a text, NULL binds
 * NULL), for the caller to step; the caller resets it when done (a read left unreset
 * keeps its snapshot, and with it the WAL). NULL on failure, with the BW code in *err.
 */
sqlite3_stmt *bw__ledger_query(struct bw_ledger *l, enum bw__stmt id, int *err,
			       const char *types, ...);

/* Translates a SQLite result into a BW code (0 for OK, ROW and DONE). */
int bw__ledger_sql_err(struct bw_ledger *l, int rc);

#endif
