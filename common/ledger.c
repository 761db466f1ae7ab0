/* ledger.c: the host's SQLite ledger: short fenced transactions, flock-proven liveness, the outbox. */
#include "ledger.h"

#include "clock.h"
#include "gate.h"
#include "ledger_internal.h"
#include "nbd.h"
#include "proc.h"
#include "rand.h"
#include "text.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/*
 * Schema, version 3 (PRAGMA user_version): version 1, retention's v2, the cancels of v3.
 *
 * Migration procedure: never edit a released version's DDL. To change the schema, add
 * schema_v<N+1>[] with the ALTER/CREATE statements that take a version N ledger to N+1,
 * append it to migrations[], and bump LEDGER_SCHEMA_VERSION. bw_ledger_open applies the
 * missing steps in order inside one BEGIN IMMEDIATE transaction, so a host's workers can
 * be upgraded one by one: an older worker refuses a newer ledger (BW_ENOTSUP) instead of
 * misreading it. Invariants live in the schema (keys, UNIQUE, CHECK), not only in code.
 */
#define LEDGER_SCHEMA_VERSION 3
#define LEDGER_SCHEMA_VERSION_TEXT "3" /* the same, for the statement that sets it */

static const char schema_v1[] =
	"CREATE TABLE meta ("
	"  key TEXT PRIMARY KEY,"
	"  value INTEGER NOT NULL);"
	"CREATE TABLE workers ("
	"  incarnation INTEGER PRIMARY KEY AUTOINCREMENT,"
	"  worker_id TEXT NOT NULL UNIQUE CHECK (length(worker_id) BETWEEN 1 AND 128),"
	"  pid INTEGER NOT NULL CHECK (pid > 0),"
	"  start_time INTEGER NOT NULL,"
	"  boot_id TEXT NOT NULL,"
	"  lock_path TEXT NOT NULL UNIQUE,"
	"  started_at INTEGER NOT NULL,"
	"  heartbeat_at INTEGER NOT NULL);"
	"CREATE TABLE jobs ("
	"  job_id TEXT PRIMARY KEY CHECK (length(job_id) BETWEEN 1 AND 128),"
	"  state TEXT NOT NULL CHECK (state IN ('claimed','waiting_ports','reserved',"
	"    'targets_created','serving','sna_requested','transferring','finalizing',"
	"    'completed','failed','compensated')),"
	"  owner TEXT NOT NULL,"
	"  owner_incarnation INTEGER NOT NULL,"
	"  owner_boot_id TEXT NOT NULL,"
	"  generation INTEGER NOT NULL CHECK (generation >= 1),"
	"  attempt INTEGER NOT NULL CHECK (attempt >= 1),"
	"  seq INTEGER NOT NULL CHECK (seq >= 1),"
	"  message TEXT NOT NULL,"
	"  last_error TEXT,"
	"  created_at INTEGER NOT NULL,"
	"  updated_at INTEGER NOT NULL);"
	"CREATE INDEX jobs_owner ON jobs(owner_incarnation)"
	"  WHERE state NOT IN ('completed','compensated');"
	"CREATE TABLE job_history ("
	"  id INTEGER PRIMARY KEY,"
	"  job_id TEXT NOT NULL REFERENCES jobs(job_id) ON DELETE CASCADE,"
	"  state TEXT NOT NULL,"
	"  owner TEXT NOT NULL,"
	"  generation INTEGER NOT NULL,"
	"  at INTEGER NOT NULL);"
	"CREATE INDEX job_history_job ON job_history(job_id, id);"
	"CREATE TABLE job_disks ("
	"  job_id TEXT NOT NULL REFERENCES jobs(job_id) ON DELETE CASCADE,"
	"  disk_key INTEGER NOT NULL CHECK (disk_key BETWEEN 1 AND 2147483647),"
	"  port INTEGER CHECK (port BETWEEN 1 AND 65535),"
	"  export_name TEXT NOT NULL,"
	"  qcow2_path TEXT NOT NULL,"
	"  qcow2_created INTEGER NOT NULL DEFAULT 0 CHECK (qcow2_created IN (0, 1)),"
	"  nbd_pid INTEGER NOT NULL DEFAULT 0 CHECK (nbd_pid >= 0),"
	"  nbd_start_time INTEGER NOT NULL DEFAULT 0,"
	"  state TEXT NOT NULL,"
	"  PRIMARY KEY (job_id, disk_key));"
	/* A port has at most one live holder: the primary key. A disk holds at most one. */
	"CREATE TABLE port_pool ("
	"  port INTEGER PRIMARY KEY CHECK (port BETWEEN 1 AND 65535));"
	"CREATE TABLE ports ("
	"  port INTEGER PRIMARY KEY CHECK (port BETWEEN 1 AND 65535),"
	"  state TEXT NOT NULL CHECK (state IN ('reserved','quarantined')),"
	"  job_id TEXT,"
	"  disk_key INTEGER,"
	"  owner TEXT,"
	"  generation INTEGER,"
	"  until INTEGER,"
	"  since INTEGER NOT NULL,"
	"  UNIQUE (job_id, disk_key),"
	"  CHECK ((state = 'reserved' AND job_id IS NOT NULL AND disk_key IS NOT NULL"
	"          AND owner IS NOT NULL AND generation IS NOT NULL AND until IS NULL)"
	"      OR (state = 'quarantined' AND job_id IS NULL AND disk_key IS NULL"
	"          AND until IS NOT NULL)));"
	"CREATE TABLE outbox ("
	"  id INTEGER PRIMARY KEY AUTOINCREMENT,"
	"  event_id TEXT NOT NULL UNIQUE,"
	"  job_id TEXT,"
	"  seq INTEGER NOT NULL CHECK (seq >= 0),"
	"  routing_key TEXT NOT NULL,"
	"  body TEXT NOT NULL,"
	"  created_at INTEGER NOT NULL,"
	"  published_at INTEGER,"
	"  attempts INTEGER NOT NULL DEFAULT 0,"
	"  last_error TEXT,"
	"  UNIQUE (job_id, seq));"
	"CREATE INDEX outbox_unpublished ON outbox(id) WHERE published_at IS NULL;";

/*
 * Version 2: retention (bw_ledger_prune). A partial index finds finished jobs by age
 * without reading the others. A pruned job leaves a tombstone: its id, its outcome, when
 * it finished and the FNV-1a 64 of its message, so that a backup.start with its job_id is
 * still known (and told apart from another body) after its rows are gone; tombstones go
 * by age through their own index.
 */
static const char schema_v2[] =
	"CREATE INDEX jobs_finished ON jobs(updated_at)"
	"  WHERE state IN ('completed','compensated');"
	"CREATE TABLE job_tombstones ("
	"  job_id TEXT PRIMARY KEY CHECK (length(job_id) BETWEEN 1 AND 128),"
	"  state TEXT NOT NULL CHECK (state IN ('completed','compensated')),"
	"  finished_at INTEGER NOT NULL,"
	"  message_hash INTEGER NOT NULL,"
	"  pruned_at INTEGER NOT NULL) WITHOUT ROWID;"
	"CREATE INDEX job_tombstones_finished ON job_tombstones(finished_at);";

/*
 * Version 3: backup.cancel (CONTRACT §2.1). A cancel no worker acted on in memory: for a
 * job_id this host does not know yet (taken at claim until until_ms), or for a job known
 * and unfinished (its owner or the worker that adopts it ends it; kept while unfinished).
 * No foreign key to jobs: the row comes first for a job not claimed yet.
 */
static const char schema_v3[] =
	"CREATE TABLE cancels ("
	"  job_id TEXT PRIMARY KEY CHECK (length(job_id) BETWEEN 1 AND 128),"
	"  reason TEXT NOT NULL CHECK (length(reason) <= 256),"
	"  received_at_ms INTEGER NOT NULL,"
	"  until_ms INTEGER NOT NULL CHECK (until_ms >= received_at_ms));";

static const char *const migrations[] = {schema_v1, schema_v2, schema_v3};

/* Where a job is done with: nothing left to do for anybody. */
#define SQL_UNFINISHED "state NOT IN ('completed','compensated')"

#define BUSY_BOUND_MS 2000 /* one busy wait before the transaction is retried */
#define GATE_WAIT_MS 2000  /* one wait for the writers' gate */
#define TXN_ATTEMPTS 5
/* A retried transaction waits 1 ms plus a full-jitter backoff from 4 ms, doubling (up to
 * 32 ms before the last attempt): the lock's holder is in a short transaction. */
#define TXN_RETRY_MIN_MS 1
#define TXN_RETRY_BASE_MS 4
#define TXN_RETRY_CAP_MS 32
#define REGISTER_WAIT_MS 3000 /* a live twin holds its lock longer */

/*
 * The statement table: every SQL statement the ledger runs, by id (ledger_internal.h),
 * prepared once per handle (stmt) and run through run/query. Only the migration scripts
 * above are run otherwise (exec_script): they are several DDL statements each.
 */
/* The retention rule for a job j finished before cutoff (a parameter): see bw_ledger_prune. */
#define SQL_PRUNABLE(cutoff)                                                                    \
	"j.state IN ('completed','compensated') AND j.updated_at < " cutoff                     \
	" AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.job_id"                      \
	"  AND o.published_at IS NULL)"                                                          \
	" AND NOT EXISTS (SELECT 1 FROM ports p WHERE p.job_id = j.job_id)"

static const char *const stmt_sql[BW__ST_COUNT] = {
	[BW__ST_FENCE] = "SELECT generation, seq, state FROM jobs WHERE job_id = ?1",
	[BW__ST_JOB_STATE] = "SELECT state, message = ?2 FROM jobs WHERE job_id = ?1",
	[BW__ST_JOB_INSERT] = "INSERT INTO jobs (job_id, state, owner, owner_incarnation, owner_boot_id,"
			  " generation, attempt, seq, message, created_at, updated_at)"
			  " VALUES (?1, 'claimed', ?2, ?3, ?4, 1, 1, 1, ?5, ?6, ?6)",
	[BW__ST_DISK_INSERT] = "INSERT INTO job_disks (job_id, disk_key, export_name, qcow2_path, state)"
			   " VALUES (?1, ?2, ?3, ?4, 'pending')", /* BW_DISK_ROW_PENDING */
	[BW__ST_HISTORY] = "INSERT INTO job_history (job_id, state, owner, generation, at)"
		       " VALUES (?1, ?2, ?3, ?4, ?5)",
	[BW__ST_OUTBOX_INSERT] = "INSERT INTO outbox (event_id, job_id, seq, routing_key, body, created_at)"
			     " VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
	[BW__ST_JOB_UPDATE] = "UPDATE jobs SET state = ?3, seq = ?4, updated_at = ?5,"
			  " last_error = coalesce(?6, last_error)"
			  " WHERE job_id = ?1 AND generation = ?2",
	[BW__ST_DISK_UPDATE] = "UPDATE job_disks SET state = ?3, nbd_pid = ?4, nbd_start_time = ?5,"
			   " qcow2_created = ?6 WHERE job_id = ?1 AND disk_key = ?2",
	[BW__ST_QUARANTINE_EXPIRE] = "DELETE FROM ports WHERE state = 'quarantined' AND until <= ?1",
	[BW__ST_CURSOR_GET] = "SELECT value FROM meta WHERE key = 'next_port'",
	[BW__ST_CURSOR_SET] = "UPDATE meta SET value = ?1 WHERE key = 'next_port'",
	/* Free ports from the cursor on; the caller wraps around with ?1 = 0. */
	[BW__ST_FREE_PORTS] = "SELECT port FROM port_pool p WHERE port >= ?1 AND port < ?2"
			  " AND NOT EXISTS (SELECT 1 FROM ports r WHERE r.port = p.port)"
			  " ORDER BY port LIMIT ?3",
	[BW__ST_PORT_HELD_BY_DISK] = "SELECT port FROM ports WHERE job_id = ?1 AND disk_key = ?2",
	[BW__ST_PORT_INSERT] = "INSERT INTO ports (port, state, job_id, disk_key, owner, generation, since)"
			   " VALUES (?1, 'reserved', ?2, ?3, ?4, ?5, ?6)",
	[BW__ST_DISK_SET_PORT] = "UPDATE job_disks SET port = ?3 WHERE job_id = ?1 AND disk_key = ?2",
	[BW__ST_PORT_RELEASE] = "DELETE FROM ports WHERE port = ?1 AND job_id = ?2 AND state = 'reserved'",
	[BW__ST_DISK_CLEAR_PORT] = "UPDATE job_disks SET port = NULL WHERE job_id = ?1 AND port = ?2",
	[BW__ST_PORT_RELEASE_ALL] = "DELETE FROM ports WHERE job_id = ?1 AND state = 'reserved'",
	[BW__ST_DISK_CLEAR_PORTS] = "UPDATE job_disks SET port = NULL WHERE job_id = ?1",
	[BW__ST_PORT_DISK] = "SELECT disk_key FROM ports WHERE port = ?1 AND job_id = ?2"
			 " AND state = 'reserved'",
	[BW__ST_PORT_QUARANTINE] = "UPDATE ports SET state = 'quarantined', job_id = NULL,"
			       " disk_key = NULL, owner = NULL, generation = NULL, until = ?2,"
			       " since = ?3 WHERE port = ?1",
	/* For monitoring: the pool's free ports, and reserved and live quarantined ones (an
	 * expired quarantine is free, as bw-ctl ports shows it), ?1 = now. */
	[BW__ST_PORT_COUNTS] = "SELECT (SELECT count(*) FROM port_pool p WHERE NOT EXISTS"
			   " (SELECT 1 FROM ports r WHERE r.port = p.port"
			   "  AND (r.state = 'reserved' OR r.until > ?1))),"
			   " (SELECT count(*) FROM ports WHERE state = 'reserved'),"
			   " (SELECT count(*) FROM ports WHERE state = 'quarantined' AND until > ?1)",
	[BW__ST_OUTBOX_NEXT] = "SELECT id, event_id, routing_key, body, attempts FROM outbox"
			   " WHERE published_at IS NULL AND id > ?2 ORDER BY id LIMIT ?1",
	[BW__ST_OUTBOX_PUBLISHED] = "UPDATE outbox SET published_at = ?2, attempts = attempts + 1"
				" WHERE id = ?1 AND published_at IS NULL",
	[BW__ST_OUTBOX_FAILED] = "UPDATE outbox SET attempts = attempts + 1, last_error = ?2 WHERE id = ?1",
	[BW__ST_OUTBOX_APPEND] = "INSERT OR IGNORE INTO outbox (event_id, job_id, seq, routing_key, body,"
			     " created_at) VALUES (?1, NULL, ?2, ?3, ?4, ?5)",
	[BW__ST_HEARTBEAT] = "UPDATE workers SET heartbeat_at = ?2 WHERE incarnation = ?1",
	[BW__ST_WORKER_GET] = "SELECT incarnation, pid, start_time, started_at, heartbeat_at"
			  " FROM workers WHERE worker_id = ?1",
	[BW__ST_WORKER_JOBS] = "SELECT count(*) FROM jobs WHERE owner = ?1 AND " SQL_UNFINISHED,

	/* opening and migrating */
	[BW__ST_META_GET] = "SELECT value FROM meta WHERE key = ?1",
	[BW__ST_META_SET] = "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
	[BW__ST_USER_VERSION] = "PRAGMA user_version",
	[BW__ST_SET_USER_VERSION] = "PRAGMA user_version = " LEDGER_SCHEMA_VERSION_TEXT,
	[BW__ST_POOL_CLEAR] = "DELETE FROM port_pool",
	[BW__ST_POOL_FILL] = "WITH RECURSIVE r(p) AS (SELECT ?1 UNION ALL SELECT p + 1 FROM r"
			 " WHERE p < ?2) INSERT INTO port_pool SELECT p FROM r",
	[BW__ST_JOURNAL_WAL] = "PRAGMA journal_mode = WAL",
	/* the WAL file is cut back to this after a checkpoint reset it: a WAL a long reader made
	 * grow does not keep its size on disk (SQLite's default keeps it forever) */
	[BW__ST_JOURNAL_LIMIT] = "PRAGMA journal_size_limit = 4194304",
	[BW__ST_SYNCHRONOUS] = "PRAGMA synchronous = FULL",
	[BW__ST_FOREIGN_KEYS] = "PRAGMA foreign_keys = ON",

	/* transactions and upkeep */
	[BW__ST_BEGIN] = "BEGIN IMMEDIATE",
	[BW__ST_COMMIT] = "COMMIT",
	[BW__ST_ROLLBACK] = "ROLLBACK",
	[BW__ST_CHECKPOINT] = "PRAGMA wal_checkpoint(TRUNCATE)",

	/* workers */
	[BW__ST_WORKER_DELETE_ID] = "DELETE FROM workers WHERE worker_id = ?1",
	[BW__ST_WORKER_INSERT] = "INSERT INTO workers (worker_id, pid, start_time, boot_id, lock_path,"
			     " started_at, heartbeat_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
	[BW__ST_WORKER_UNREGISTER] = "DELETE FROM workers WHERE incarnation = ?1 AND NOT EXISTS"
				 " (SELECT 1 FROM jobs WHERE owner_incarnation = ?1 AND "
				 SQL_UNFINISHED ")",

	/* recovery */
	[BW__ST_WORKERS_OTHERS] = "SELECT incarnation, lock_path, boot_id, pid, start_time FROM workers"
			      " WHERE incarnation != ?1",
	[BW__ST_WORKER_DELETE] = "DELETE FROM workers WHERE incarnation = ?1",
	/* Every unfinished job whose owner incarnation has no row is an orphan. */
	[BW__ST_ORPHANS] = "SELECT job_id, state, generation, owner, owner_boot_id, message, seq,"
		       " created_at, EXISTS (SELECT 1 FROM job_history h"
		       "  WHERE h.job_id = jobs.job_id AND h.state IN"
		       "  ('sna_requested', 'transferring', 'finalizing'))"
		       " FROM jobs WHERE " SQL_UNFINISHED " AND owner_incarnation NOT IN"
		       " (SELECT incarnation FROM workers) ORDER BY created_at",
	[BW__ST_JOB_ADOPT] = "UPDATE jobs SET generation = ?2, owner = ?3, owner_incarnation = ?4,"
			 " owner_boot_id = ?5, attempt = attempt + 1, updated_at = ?6"
			 " WHERE job_id = ?1",
	[BW__ST_PORTS_ADOPT] = "UPDATE ports SET owner = ?2, generation = ?3 WHERE job_id = ?1",
	[BW__ST_JOB_DISKS] = "SELECT disk_key, coalesce(port, 0), nbd_pid, nbd_start_time, state,"
			 " export_name, qcow2_path, qcow2_created FROM job_disks"
			 " WHERE job_id = ?1 ORDER BY rowid",
	[BW__ST_EVENT_BODY] = "SELECT body FROM outbox WHERE event_id = ?1",

	/* outbox */
	[BW__ST_REPUBLISH] = "UPDATE outbox SET published_at = NULL WHERE id = (SELECT max(id) FROM"
			 " outbox WHERE job_id = ?1 AND routing_key IN"
			 " ('backup.completed', 'backup.failed'))",
	[BW__ST_OUTBOX_BACKLOG] = "SELECT count(*), min(created_at) FROM outbox"
			      " WHERE published_at IS NULL",

	/*
	 * bw-ctl's views (ledger_views.c): the column names are the JSON keys, and each
	 * view's kinds string there follows these columns in order.
	 */
	[BW__ST_VIEW_JOBS] = "SELECT job_id, state, owner, generation, attempt,"
			 " (SELECT count(*) FROM job_disks d WHERE d.job_id = j.job_id) AS disk_count,"
			 " created_at, updated_at, last_error FROM jobs j"
			 " ORDER BY created_at DESC, job_id",
	/* An expired quarantine (until <= ?1, now) is free: not listed even before upkeep. */
	[BW__ST_VIEW_PORTS] = "SELECT port, state, job_id, disk_key, owner, until FROM ports"
			  " WHERE state = 'reserved' OR until > ?1 ORDER BY port",
	[BW__ST_VIEW_WORKERS] = "SELECT worker_id, incarnation, pid, start_time, boot_id, lock_path,"
			    " started_at, heartbeat_at FROM workers ORDER BY worker_id",
	[BW__ST_VIEW_JOB] = "SELECT job_id, state, owner, generation, attempt, seq, created_at,"
			" updated_at, last_error, message FROM jobs WHERE job_id = ?1",
	[BW__ST_VIEW_JOB_DISKS] = "SELECT disk_key AS key, state, port, export_name, qcow2_path,"
			      " qcow2_created, nbd_pid, nbd_start_time FROM job_disks"
			      " WHERE job_id = ?1 ORDER BY rowid",
	[BW__ST_VIEW_JOB_HISTORY] = "SELECT state, owner, generation, at FROM job_history"
				" WHERE job_id = ?1 ORDER BY id",
	[BW__ST_VIEW_JOB_EVENTS] = "SELECT seq, event_id, routing_key, created_at, published_at,"
			       " attempts, last_error FROM outbox WHERE job_id = ?1 ORDER BY seq",

	/*
	 * Retention (bw_ledger_prune). A job may go when it is finished, finished before ?
	 * (the cutoff), has no unpublished event and holds no port (SQL_PRUNABLE): the
	 * candidates are read with this rule outside the write lock and each one is checked
	 * again inside it.
	 */
	[BW__ST_TOMBSTONE_GET] = "SELECT state, message_hash FROM job_tombstones WHERE job_id = ?1",
	[BW__ST_PRUNE_CANDIDATES] = "SELECT job_id FROM jobs j WHERE " SQL_PRUNABLE("?1")
				" ORDER BY updated_at LIMIT ?2",
	[BW__ST_PRUNE_DISK_KEYS] = "SELECT disk_key FROM job_disks WHERE job_id = ?1",
	[BW__ST_PRUNE_CHECK] = "SELECT state, updated_at, message FROM jobs j WHERE job_id = ?1"
			   " AND " SQL_PRUNABLE("?2"),
	[BW__ST_TOMBSTONE_PUT] = "INSERT OR REPLACE INTO job_tombstones (job_id, state, finished_at,"
			     " message_hash, pruned_at) VALUES (?1, ?2, ?3, ?4, ?5)",
	[BW__ST_PRUNE_HISTORY] = "DELETE FROM job_history WHERE job_id = ?1",
	[BW__ST_PRUNE_DISKS] = "DELETE FROM job_disks WHERE job_id = ?1",
	[BW__ST_PRUNE_OUTBOX] = "DELETE FROM outbox WHERE job_id = ?1",
	[BW__ST_PRUNE_JOB] = "DELETE FROM jobs WHERE job_id = ?1",
	[BW__ST_TOMBSTONE_EXPIRE] = "DELETE FROM job_tombstones WHERE job_id IN (SELECT job_id FROM"
				" job_tombstones WHERE finished_at < ?1 ORDER BY finished_at LIMIT ?2)",
	/* Published events of no job (backup.rejected), by age. */
	[BW__ST_PRUNE_LONE_EVENTS] = "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox"
				 " WHERE job_id IS NULL AND published_at IS NOT NULL"
				 " AND created_at < ?1 LIMIT ?2)",
	/* Is anything but jobs due (tombstones before ?1, job-less events before ?2)? */
	[BW__ST_PRUNE_DUE] = "SELECT EXISTS (SELECT 1 FROM job_tombstones WHERE finished_at < ?1)"
			 " OR EXISTS (SELECT 1 FROM outbox WHERE job_id IS NULL"
			 "  AND published_at IS NOT NULL AND created_at < ?2)",
	/* cancels (schema v3) */
	[BW__ST_CANCEL_JOB] = "SELECT state, owner FROM jobs WHERE job_id = ?1",
	[BW__ST_CANCEL_UPSERT] = "INSERT INTO cancels (job_id, reason, received_at_ms, until_ms)"
			     " VALUES (?1, ?2, ?3, ?4) ON CONFLICT (job_id) DO UPDATE"
			     " SET until_ms = max(until_ms, excluded.until_ms)",
	[BW__ST_CANCEL_GET] = "SELECT reason FROM cancels WHERE job_id = ?1 AND (until_ms > ?2"
			  " OR EXISTS (SELECT 1 FROM jobs j WHERE j.job_id = ?1 AND j."
			  SQL_UNFINISHED "))",
	[BW__ST_CANCEL_DELETE] = "DELETE FROM cancels WHERE job_id = ?1",
	[BW__ST_CANCEL_EXPIRE] = "DELETE FROM cancels WHERE until_ms <= ?1 AND NOT EXISTS"
			     " (SELECT 1 FROM jobs j WHERE j.job_id = cancels.job_id AND j."
			     SQL_UNFINISHED ")",
};

struct bw_ledger {
	sqlite3 *db;
	bool readonly;
	int port_min, port_max;
	sqlite3_stmt *st[BW__ST_COUNT];
	int64_t busy_since_ms;
	struct bw_gate *gate; /* writers' gate (gate.h); NULL for a read-only handle */
	char errmsg[256];  /* SQLite's words for the last failed transaction */
	bool no_wait;      /* the busy handler gives up at once (the checkpoint) */
	uint64_t busy_waits;   /* sleeps of the busy handler (bw_ledger_busy_stats) */
	uint64_t busy_retries; /* transactions run again after staying busy */

	/* Set by bw_ledger_register. */
	char *worker_id;
	int64_t incarnation;
	char *lock_path;
	int lock_fd;
	char boot_id[BW_BOOT_ID_LEN + 1];
};

/* ---- small helpers ---------------------------------------------------------------------- */

static void sleep_us(uint64_t us)
{
	struct timespec ts = {(time_t)(us / 1000000), (long)(us % 1000000) * 1000};
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

/* Translates a SQLite result into a BW code (0 for OK/ROW/DONE). */
static int sql_err(struct bw_ledger *l, int rc)
{
	switch (rc & 0xff) { /* extended result codes are on: switch on the primary code */
	case SQLITE_OK:
	case SQLITE_ROW:
	case SQLITE_DONE:
		return 0;
	case SQLITE_BUSY:
	case SQLITE_LOCKED:
		return BW_EBUSY;
	case SQLITE_NOMEM:
		return BW_ENOMEM;
	case SQLITE_CONSTRAINT: {
		int ext = sqlite3_extended_errcode(l->db);
		if (ext == SQLITE_CONSTRAINT_PRIMARYKEY || ext == SQLITE_CONSTRAINT_UNIQUE)
			return BW_EEXIST;
		return BW_EINVAL;
	}
	case SQLITE_PERM:
	case SQLITE_READONLY:
	case SQLITE_AUTH:
		return BW_EPERM;
	case SQLITE_CANTOPEN:
		return BW_ENOENT;
	default:
		return BW_EIO;
	}
}

/* The prepared statement id, reset and unbound, ready for binding. */
static sqlite3_stmt *stmt(struct bw_ledger *l, enum bw__stmt id)
{
	sqlite3_stmt *s = l->st[id];
	if (s == NULL) {
		if (sqlite3_prepare_v3(l->db, stmt_sql[id], -1, SQLITE_PREPARE_PERSISTENT, &l->st[id],
				       NULL) != SQLITE_OK)
			return NULL;
		return l->st[id];
	}
	sqlite3_reset(s);
	sqlite3_clear_bindings(s);
	return s;
}

/* Binds by format: 't' text, 'i' int64, 'n' NULL-able text; runs to completion. */
static int run(struct bw_ledger *l, enum bw__stmt id, const char *types, ...)
	__attribute__((warn_unused_result));

static int bind_va(sqlite3_stmt *s, const char *types, va_list ap)
{
	int rc = SQLITE_OK;
	for (int i = 0; types[i] && rc == SQLITE_OK; i++) {
		if (types[i] == 'i') {
			rc = sqlite3_bind_int64(s, i + 1, va_arg(ap, int64_t));
		} else {
			const char *t = va_arg(ap, const char *);
			rc = t ? sqlite3_bind_text(s, i + 1, t, -1, SQLITE_STATIC)
			       : sqlite3_bind_null(s, i + 1);
		}
	}
	return rc;
}

static int run(struct bw_ledger *l, enum bw__stmt id, const char *types, ...)
{
	sqlite3_stmt *s = stmt(l, id);
	if (s == NULL)
		return sql_err(l, sqlite3_errcode(l->db));
	va_list ap;
	va_start(ap, types);
	int rc = bind_va(s, types, ap);
	va_end(ap);
	if (rc == SQLITE_OK)
		rc = sqlite3_step(s);
	int err = sql_err(l, rc);
	sqlite3_reset(s);
	return err;
}

static sqlite3_stmt *query_va(struct bw_ledger *l, enum bw__stmt id, int *err, const char *types,
			      va_list ap)
{
	sqlite3_stmt *s = stmt(l, id);
	if (s == NULL) {
		*err = sql_err(l, sqlite3_errcode(l->db));
		return NULL;
	}
	int rc = bind_va(s, types, ap);
	if (rc != SQLITE_OK) {
		*err = sql_err(l, rc);
		return NULL;
	}
	return s;
}

/* Prepares and binds id; the caller steps and resets it. NULL on failure (*err set). */
static sqlite3_stmt *query(struct bw_ledger *l, enum bw__stmt id, int *err, const char *types, ...)
{
	va_list ap;
	va_start(ap, types);
	sqlite3_stmt *s = query_va(l, id, err, types, ap);
	va_end(ap);
	return s;
}

sqlite3_stmt *bw__ledger_query(struct bw_ledger *l, enum bw__stmt id, int *err,
			       const char *types, ...)
{
	va_list ap;
	va_start(ap, types);
	sqlite3_stmt *s = query_va(l, id, err, types, ap);
	va_end(ap);
	return s;
}

int bw__ledger_sql_err(struct bw_ledger *l, int rc)
{
	return sql_err(l, rc);
}

/* Runs a statement that returns one integer (count, pragma value) into *out. */
static int query_int(struct bw_ledger *l, enum bw__stmt id, int64_t *out, const char *types, ...)
{
	int err = 0;
	va_list ap;
	va_start(ap, types);
	sqlite3_stmt *s = query_va(l, id, &err, types, ap);
	va_end(ap);
	if (s == NULL)
		return err;
	int rc = sqlite3_step(s);
	if (rc == SQLITE_ROW)
		*out = sqlite3_column_int64(s, 0);
	sqlite3_reset(s);
	return rc == SQLITE_ROW ? 0 : rc == SQLITE_DONE ? BW_ENOENT : sql_err(l, rc);
}

static char *dup_col(sqlite3_stmt *s, int col)
{
	const unsigned char *t = sqlite3_column_text(s, col);
	return strdup(t ? (const char *)t : "");
}

/* ---- transactions ----------------------------------------------------------------------- */

/*
 * Busy handler: short random sleeps (20 us to 1 ms) instead of SQLite's backoff that grows
 * to 100 ms, so a waiting process keeps trying while the lock is released thousands of
 * times a second and is not starved by newcomers; bounded by BUSY_BOUND_MS.
 */
static int busy_cb(void *arg, int count)
{
	struct bw_ledger *l = arg;
	int64_t now = bw_clock_mono_ms();
	if (count == 0)
		l->busy_since_ms = now;
	if (l->no_wait || now - l->busy_since_ms > BUSY_BOUND_MS)
		return 0;
	uint64_t cap = count < 50 ? 200 : 1000;
	l->busy_waits++;
	sleep_us(20 + bw_rand_below_incl(cap - 1));
	return 1;
}

/* Runs a migration script (several DDL statements): the only SQL outside the table. */
static int exec_script(struct bw_ledger *l, const char *sql)
{
	return sql_err(l, sqlite3_exec(l->db, sql, NULL, NULL, NULL));
}

typedef int (*txn_fn)(struct bw_ledger *l, void *ctx);

/*
 * Runs fn inside the writers' gate (gate.h: waiting writers sleep in the kernel instead of
 * polling SQLite) and BEGIN IMMEDIATE ... COMMIT; rolls back when fn fails. A transaction that
 * stays busy is retried TXN_ATTEMPTS times with jitter, then BW_EBUSY. fn must do SQL only
 * (no I/O, no waiting) and be safe to run again from the start.
 */
static int with_txn(struct bw_ledger *l, txn_fn fn, void *ctx)
{
	int rc = BW_EBUSY;
	l->errmsg[0] = '\0'; /* not an older transaction's reason */
	for (int attempt = 0; attempt < TXN_ATTEMPTS; attempt++) {
		if (attempt > 0) {
			l->busy_retries++;
			int64_t wait_ms = TXN_RETRY_MIN_MS +
					  bw_backoff_ms(TXN_RETRY_BASE_MS, TXN_RETRY_CAP_MS, attempt);
			sleep_us((uint64_t)wait_ms * 1000);
		}
		rc = l->gate ? bw_gate_lock(l->gate, GATE_WAIT_MS, l->errmsg, sizeof(l->errmsg)) : 0;
		if (rc == BW_EBUSY)
			continue;
		if (rc != 0)
			return rc;
		rc = run(l, BW__ST_BEGIN, "");
		if (rc == 0) {
			rc = fn(l, ctx);
			if (rc != 0)
				snprintf(l->errmsg, sizeof(l->errmsg), "%s", sqlite3_errmsg(l->db));
			if (rc == 0 && (rc = run(l, BW__ST_COMMIT, "")) != 0) /* disk full: here */
				snprintf(l->errmsg, sizeof(l->errmsg), "%s", sqlite3_errmsg(l->db));
			/* (a failed COMMIT may have rolled back already: the ROLLBACK's own error
			   must not replace the reason) */
			if (rc != 0 && run(l, BW__ST_ROLLBACK, "") != 0) {
				/* rc already says why the transaction failed */
			}
		} else {
			snprintf(l->errmsg, sizeof(l->errmsg), "%s", sqlite3_errmsg(l->db));
		}
		if (l->gate)
			bw_gate_unlock(l->gate);
		if (rc != BW_EBUSY)
			return rc;
	}
	return rc;
}

/* Checks the fence; stores the job's current seq and state (either may be NULL). */
static int fence(struct bw_ledger *l, const struct bw_fence *f, int64_t *seq,
		 enum bw_job_state *state)
{
	int err = 0;
	sqlite3_stmt *s = query(l, BW__ST_FENCE, &err, "t", f->job_id);
	if (s == NULL)
		return err;
	int rc = sqlite3_step(s);
	if (rc != SQLITE_ROW) {
		err = rc == SQLITE_DONE ? BW_ENOENT : sql_err(l, rc);
	} else if (sqlite3_column_int64(s, 0) != f->generation) {
		err = BW_EFENCED;
	} else {
		if (seq)
			*seq = sqlite3_column_int64(s, 1);
		if (state && bw_job_state_parse((const char *)sqlite3_column_text(s, 2), state) != 0)
			err = BW_EIO;
	}
	sqlite3_reset(s);
	return err;
}

/*
 * The state machine's legal moves: forward (steps may be skipped: a job that finds its
 * ports at once never waits), staying (events such as progress), any unfinished state to
 * failed, failed to compensated. Nothing leaves completed or compensated.
 */
static bool legal_move(enum bw_job_state from, enum bw_job_state to)
{
	if (from == BW_JOB_COMPLETED || from == BW_JOB_COMPENSATED)
		return false;
	if (from == BW_JOB_FAILED)
		return to == BW_JOB_FAILED || to == BW_JOB_COMPENSATED;
	if (to == BW_JOB_COMPENSATED)
		return false;
	return to >= from;
}

static int history(struct bw_ledger *l, const char *job_id, const char *state, int64_t gen)
{
	return run(l, BW__ST_HISTORY, "tttii", job_id, state, l->worker_id, gen, bw_clock_wall_ms());
}

static int append_events(struct bw_ledger *l, const char *job_id, int64_t seq,
			 const struct bw_event *events, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (events[i].seq != seq + 1 + (int64_t)i)
			return BW_EINVAL;
		int rc = run(l, BW__ST_OUTBOX_INSERT, "ttitti", events[i].event_id, job_id,
			     events[i].seq, events[i].routing_key, events[i].body, bw_clock_wall_ms());
		if (rc != 0)
			return rc;
	}
	return 0;
}

/* ---- states ----------------------------------------------------------------------------- */

static const char *const state_names[] = {
#define BW__STATE_NAME(name, text) text,
	BW_JOB_STATE_MAP(BW__STATE_NAME)
#undef BW__STATE_NAME
};

static const char *const disk_row_names[] = {
#define BW__DISK_ROW_NAME(name, text) text,
	BW_DISK_ROW_MAP(BW__DISK_ROW_NAME)
#undef BW__DISK_ROW_NAME
};

const char *bw_disk_row_state_name(enum bw_disk_row_state state)
{
	return (unsigned)state < BW_NAMES(disk_row_names) ? disk_row_names[state] : "?";
}

const char *bw_job_state_name(enum bw_job_state state)
{
	return (unsigned)state < BW_NAMES(state_names) ? state_names[state] : "?";
}

int bw_job_state_parse(const char *name, enum bw_job_state *out)
{
	for (unsigned i = 0; i < BW_NAMES(state_names); i++) {
		if (strcmp(state_names[i], name) == 0) {
			*out = (enum bw_job_state)i;
			return 0;
		}
	}
	return BW_EINVAL;
}

bool bw_job_state_terminal(enum bw_job_state state)
{
	return state == BW_JOB_COMPLETED || state == BW_JOB_FAILED || state == BW_JOB_COMPENSATED;
}

/* ---- open and migrate ------------------------------------------------------------------- */

struct migrate_ctx {
	int port_min, port_max;
};

static int get_meta(struct bw_ledger *l, const char *key, int64_t *out)
{
	return query_int(l, BW__ST_META_GET, out, "t", key);
}

static int set_meta(struct bw_ledger *l, const char *key, int64_t value)
{
	return run(l, BW__ST_META_SET, "ti", key, value);
}

static int user_version(struct bw_ledger *l, int64_t *out)
{
	return query_int(l, BW__ST_USER_VERSION, out, "");
}

static int migrate_txn(struct bw_ledger *l, void *arg)
{
	struct migrate_ctx *m = arg;
	int64_t version = 0, lo = 0, hi = 0;
	int rc = user_version(l, &version);
	if (rc != 0)
		return rc;
	if (version > LEDGER_SCHEMA_VERSION)
		return BW_ENOTSUP;
	for (int64_t v = version; v < LEDGER_SCHEMA_VERSION; v++)
		if ((rc = exec_script(l, migrations[v])) != 0)
			return rc;
	if (version < LEDGER_SCHEMA_VERSION && (rc = run(l, BW__ST_SET_USER_VERSION, "")) != 0)
		return rc;

	/* The port pool is the configured range; rebuilt only when the range changed. */
	if (get_meta(l, "port_min", &lo) == 0 && get_meta(l, "port_max", &hi) == 0 &&
	    lo == m->port_min && hi == m->port_max)
		return 0;
	if ((rc = run(l, BW__ST_POOL_CLEAR, "")) != 0 ||
	    (rc = run(l, BW__ST_POOL_FILL, "ii", (int64_t)m->port_min, (int64_t)m->port_max)) != 0)
		return rc;
	if ((rc = set_meta(l, "port_min", m->port_min)) != 0 ||
	    (rc = set_meta(l, "port_max", m->port_max)) != 0 ||
	    (rc = set_meta(l, "next_port", m->port_min)) != 0)
		return rc;
	return 0;
}

static int open_db(struct bw_ledger **out, const char *path, bool readonly)
{
	struct bw_ledger *l = calloc(1, sizeof(*l));
	if (l == NULL)
		return BW_ENOMEM;
	l->lock_fd = -1;
	l->readonly = readonly;

	int flags = readonly ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE;
	int rc = sqlite3_open_v2(path, &l->db, flags | SQLITE_OPEN_NOMUTEX, NULL);
	if (rc != SQLITE_OK) {
		rc = l->db ? sql_err(l, rc) : BW_ENOMEM;
		bw_ledger_close(l);
		return rc;
	}
	sqlite3_extended_result_codes(l->db, 1);
	sqlite3_busy_handler(l->db, busy_cb, l);
	*out = l;
	return 0;
}

int bw_ledger_open(struct bw_ledger **out, const char *path, int port_min, int port_max)
{
	struct bw_ledger *l = NULL;
	struct migrate_ctx m = {port_min, port_max};
	int rc;

	if (port_min < 1 || port_max > 65535 || port_min > port_max)
		return BW_EINVAL;
	/* Create the file 0600 ourselves: SQLite gives its -wal and -shm the same mode. */
	int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd < 0)
		return bw_err_from_errno(errno);
	close(fd);

	if ((rc = open_db(&l, path, false)) != 0)
		return rc;
	l->port_min = port_min;
	l->port_max = port_max;
	char gate_path[PATH_MAX];
	if ((size_t)snprintf(gate_path, sizeof(gate_path), "%s-gate", path) >= sizeof(gate_path))
		rc = BW_ERANGE;
	else
		rc = bw_gate_open(&l->gate, gate_path);
	if (rc != 0) {
		bw_ledger_close(l);
		return rc;
	}
	/* journal_mode=WAL needs a moment of exclusive access the first time: retry on busy. */
	for (int i = 0; i < 50; i++) {
		rc = run(l, BW__ST_JOURNAL_WAL, "");
		if (rc != BW_EBUSY)
			break;
		sleep_us(10000 + bw_rand_below_incl(9999));
	}
	if (rc == 0)
		rc = run(l, BW__ST_JOURNAL_LIMIT, "");
	if (rc == 0)
		rc = run(l, BW__ST_SYNCHRONOUS, "");
	if (rc == 0)
		rc = run(l, BW__ST_FOREIGN_KEYS, "");
	if (rc == 0)
		rc = with_txn(l, migrate_txn, &m);
	if (rc != 0) {
		bw_ledger_close(l);
		return rc;
	}
	*out = l;
	return 0;
}

int bw_ledger_open_readonly(struct bw_ledger **out, const char *path)
{
	struct bw_ledger *l = NULL;
	int64_t version = 0;
	if (access(path, F_OK) != 0)
		return BW_ENOENT;
	int rc = open_db(&l, path, true);
	if (rc == 0)
		rc = user_version(l, &version);
	if (rc == 0 && version > LEDGER_SCHEMA_VERSION)
		rc = BW_ENOTSUP;
	if (rc == 0 && version < 1)
		rc = BW_ENOENT; /* an empty file is not a ledger */
	if (rc != 0) {
		bw_ledger_close(l);
		return rc;
	}
	*out = l;
	return 0;
}

void bw_ledger_close(struct bw_ledger *l)
{
	if (l == NULL)
		return;
	for (int i = 0; i < BW__ST_COUNT; i++)
		sqlite3_finalize(l->st[i]);
	sqlite3_close_v2(l->db);
	bw_gate_close(l->gate);
	if (l->lock_fd >= 0)
		close(l->lock_fd);
	free(l->worker_id);
	free(l->lock_path);
	free(l);
}

const char *bw_ledger_errmsg(const struct bw_ledger *l)
{
	if (l == NULL || l->db == NULL)
		return "no ledger";
	return l->errmsg[0] ? l->errmsg : sqlite3_errmsg(l->db);
}

/* ---- workers ---------------------------------------------------------------------------- */

struct register_ctx {
	const char *worker_id;
	const char *lock_path;
	uint64_t start_time;
	int64_t incarnation;
};

static int register_txn(struct bw_ledger *l, void *arg)
{
	struct register_ctx *r = arg;
	int64_t now = bw_clock_wall_ms();
	int rc;

	/* A previous incarnation of this id is dead: we hold its lock. Its jobs stay for reap. */
	if ((rc = run(l, BW__ST_WORKER_DELETE_ID, "t", r->worker_id)) != 0 ||
	    (rc = run(l, BW__ST_WORKER_INSERT, "tiitti", r->worker_id, (int64_t)getpid(),
		      (int64_t)r->start_time, l->boot_id, r->lock_path, now)) != 0)
		return rc;
	r->incarnation = sqlite3_last_insert_rowid(l->db);
	return 0;
}

int bw_ledger_register(struct bw_ledger *l, const char *worker_id, const char *lock_dir)
{
	char path[PATH_MAX];
	struct register_ctx r = {worker_id, path, 0, 0};
	int rc;

	if (l->readonly || l->worker_id)
		return BW_EINVAL;
	if ((size_t)snprintf(path, sizeof(path), "%s/%s.lock", lock_dir, worker_id) >= sizeof(path))
		return BW_ERANGE;
	if ((rc = bw_proc_boot_id(l->boot_id)) != 0 ||
	    (rc = bw_proc_start_time(getpid(), &r.start_time)) != 0)
		return rc;
	int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd < 0)
		return bw_err_from_errno(errno);
	/*
	 * A reaper (for the length of its transaction) or bw-ctl workers (for an instant) may
	 * hold a dead worker's lock: wait a bounded time before calling the id taken.
	 */
	int64_t give_up = bw_clock_mono_ms() + REGISTER_WAIT_MS;
	while (flock(fd, LOCK_EX | LOCK_NB) != 0) {
		int err = errno;
		if (err == EWOULDBLOCK && bw_clock_mono_ms() < give_up) {
			sleep_us(1000 + bw_rand_below_incl(8999));
			continue;
		}
		close(fd);
		return err == EWOULDBLOCK ? BW_EEXIST : bw_err_from_errno(err);
	}
	rc = with_txn(l, register_txn, &r);
	if (rc != 0) {
		close(fd);
		return rc;
	}
	l->worker_id = strdup(worker_id);
	l->lock_path = strdup(path);
	if (l->worker_id == NULL || l->lock_path == NULL) {
		close(fd);
		return BW_ENOMEM;
	}
	l->lock_fd = fd;
	l->incarnation = r.incarnation;
	return 0;
}

int bw_ledger_worker_get(struct bw_ledger *l, const char *worker_id, struct bw_worker_row *out)
{
	int err = 0;
	sqlite3_stmt *s = query(l, BW__ST_WORKER_GET, &err, "t", worker_id);
	if (s == NULL)
		return err;
	int rc = sqlite3_step(s);
	if (rc == SQLITE_ROW) {
		*out = (struct bw_worker_row){sqlite3_column_int64(s, 0),
					      (pid_t)sqlite3_column_int64(s, 1),
					      (uint64_t)sqlite3_column_int64(s, 2),
					      sqlite3_column_int64(s, 3), sqlite3_column_int64(s, 4)};
	}
	sqlite3_reset(s);
	return rc == SQLITE_ROW ? 0 : rc == SQLITE_DONE ? BW_ENOENT : sql_err(l, rc);
}

int bw_ledger_worker_jobs(struct bw_ledger *l, const char *worker_id, size_t *n)
{
	int err = 0;
	sqlite3_stmt *s = query(l, BW__ST_WORKER_JOBS, &err, "t", worker_id);
	if (s == NULL)
		return err;
	int rc = sqlite3_step(s);
	if (rc == SQLITE_ROW)
		*n = (size_t)sqlite3_column_int64(s, 0);
	sqlite3_reset(s);
	return rc == SQLITE_ROW ? 0 : sql_err(l, rc);
}

int bw_ledger_heartbeat(struct bw_ledger *l)
{
	if (l->worker_id == NULL)
		return BW_EINVAL;
	return run(l, BW__ST_HEARTBEAT, "ii", l->incarnation, bw_clock_wall_ms());
}

static int unregister_txn(struct bw_ledger *l, void *arg)
{
	bool *removed = arg;
	int rc = run(l, BW__ST_WORKER_UNREGISTER, "i", l->incarnation);
	*removed = rc == 0 && sqlite3_changes(l->db) > 0;
	return rc;
}

int bw_ledger_unregister(struct bw_ledger *l)
{
	bool removed = false;
	if (l->worker_id == NULL)
		return BW_EINVAL;
	int rc = with_txn(l, unregister_txn, &removed);
	if (rc != 0)
		return rc;
	if (removed)
		unlink(l->lock_path); /* while still holding the lock */
	close(l->lock_fd);
	l->lock_fd = -1;
	free(l->worker_id);
	l->worker_id = NULL;
	return 0;
}

/* ---- jobs ------------------------------------------------------------------------------- */

struct claim_ctx {
	const char *job_id;
	const char *message;
	const struct bw_job_disk_new *disks;
	size_t n_disks;
	const struct bw_event *accepted;
	struct bw_known existing;
	bool exists;
	bool cancelled; /* a cancel is remembered for job_id: nothing was written */
};

/* A job_id the ledger knows only by its tombstone (bw_ledger_prune) is known all the same. */
static int claim_tombstone(struct bw_ledger *l, struct claim_ctx *c)
{
	int err = 0;
	sqlite3_stmt *s = query(l, BW__ST_TOMBSTONE_GET, &err, "t", c->job_id);
	if (s == NULL)
		return err;
	int rc = sqlite3_step(s);
	if (rc == SQLITE_ROW) {
		c->exists = true;
		if (bw_job_state_parse((const char *)sqlite3_column_text(s, 0), &c->existing.state) != 0)
			c->existing.state = BW_JOB_COMPENSATED;
		c->existing.same_message =
			(uint64_t)sqlite3_column_int64(s, 1) ==
			bw_fnv1a64(c->message, strlen(c->message));
	}
	sqlite3_reset(s);
	return rc == SQLITE_ROW || rc == SQLITE_DONE ? 0 : sql_err(l, rc);
}
static int cancel_find(struct bw_ledger *l, const char *job_id, char *reason, size_t size);

static int claim_txn(struct bw_ledger *l, void *arg)
{
	struct claim_ctx *c = arg;
	int err = 0, rc;
	int64_t now = bw_clock_wall_ms();

	c->exists = false;
	sqlite3_stmt *s = query(l, BW__ST_JOB_STATE, &err, "tt", c->job_id, c->message);
	if (s == NULL)
		return err;
	rc = sqlite3_step(s);
	if (rc == SQLITE_ROW) {
		c->exists = true;
		if (bw_job_state_parse((const char *)sqlite3_column_text(s, 0), &c->existing.state) != 0)
			c->existing.state = BW_JOB_FAILED;
		c->existing.same_message = sqlite3_column_int(s, 1) == 1;
	}
	sqlite3_reset(s);
	if (rc != SQLITE_ROW && rc != SQLITE_DONE)
		return sql_err(l, rc);
	if (c->exists)
		return 0; /* nothing changes */
	if ((rc = claim_tombstone(l, c)) != 0 || c->exists)
		return rc;
	/* in the claim's transaction: a cancel recorded by any worker of the host before it is
	   seen here, one recorded after it finds the job known (bw_ledger_cancel_record) */
	c->cancelled = false;
	if ((rc = cancel_find(l, c->job_id, NULL, 0)) != BW_ENOENT) {
		c->cancelled = rc == 0;
		return rc;
	}

	if ((rc = run(l, BW__ST_JOB_INSERT, "ttitti", c->job_id, l->worker_id, l->incarnation,
		      l->boot_id, c->message, now)) != 0)
		return rc;
	for (size_t i = 0; i < c->n_disks; i++)
		if ((rc = run(l, BW__ST_DISK_INSERT, "titt", c->job_id, c->disks[i].key,
			      c->disks[i].export_name, c->disks[i].qcow2_path)) != 0)
			return rc;
	if ((rc = history(l, c->job_id, "claimed", 1)) != 0)
		return rc;
	return append_events(l, c->job_id, 0, c->accepted, 1);
}

int bw_ledger_claim(struct bw_ledger *l, const char *job_id, const char *message,
		    const struct bw_job_disk_new *disks, size_t n_disks,
		    const struct bw_event *accepted, int64_t *generation, struct bw_known *existing)
{
	struct claim_ctx c = {job_id, message, disks, n_disks, accepted, {BW_JOB_CLAIMED, false},
			      false, false};
	if (l->worker_id == NULL || accepted == NULL || accepted->seq != 1)
		return BW_EINVAL;
	int rc = with_txn(l, claim_txn, &c);
	if (rc != 0)
		return rc;
	if (c.cancelled)
		return BW_ECANCELREC;
	if (c.exists) {
		if (existing)
			*existing = c.existing;
		return BW_EEXIST;
	}
	*generation = 1;
	return 0;
}

struct transition_ctx {
	const struct bw_fence *f;
	enum bw_job_state state;
	const char *last_error;
	const struct bw_event *events;
	size_t n;
	const struct bw_disk_update *disks;
	size_t n_disks;
};

static int update_disks(struct bw_ledger *l, const struct bw_fence *f,
			const struct bw_disk_update *u, size_t n)
{
	int rc = 0;
	for (size_t i = 0; rc == 0 && i < n; i++) {
		rc = run(l, BW__ST_DISK_UPDATE, "titiii", f->job_id, u[i].key,
			 bw_disk_row_state_name(u[i].state),
			 (int64_t)u[i].nbd_pid, (int64_t)u[i].nbd_start_time,
			 (int64_t)u[i].qcow2_created);
		if (rc == 0 && sqlite3_changes(l->db) == 0)
			rc = BW_ENOENT;
	}
	return rc;
}

static int transition_txn(struct bw_ledger *l, void *arg)
{
	struct transition_ctx *t = arg;
	int64_t seq = 0;
	enum bw_job_state from;
	int rc = fence(l, t->f, &seq, &from);
	if (rc != 0)
		return rc;
	if (!legal_move(from, t->state))
		return BW_ESTATE;
	if ((rc = append_events(l, t->f->job_id, seq, t->events, t->n)) != 0 ||
	    (rc = update_disks(l, t->f, t->disks, t->n_disks)) != 0)
		return rc;
	const char *name = bw_job_state_name(t->state);
	if ((rc = run(l, BW__ST_JOB_UPDATE, "titiin", t->f->job_id, t->f->generation, name,
		      seq + (int64_t)t->n, bw_clock_wall_ms(), t->last_error)) != 0)
		return rc;
	if (from == t->state)
		return 0; /* events within a state (progress, a disk done): one history row a state */
	return history(l, t->f->job_id, name, t->f->generation);
}

int bw_ledger_transition(struct bw_ledger *l, const struct bw_fence *f, enum bw_job_state state,
			 const char *last_error, const struct bw_event *events, size_t n)
{
	return bw_ledger_transition_disks(l, f, state, last_error, events, n, NULL, 0);
}

int bw_ledger_transition_disks(struct bw_ledger *l, const struct bw_fence *f,
			       enum bw_job_state state, const char *last_error,
			       const struct bw_event *events, size_t n,
			       const struct bw_disk_update *disks, size_t n_disks)
{
	struct transition_ctx t = {f, state, last_error, events, n, disks, n_disks};
	if ((unsigned)state > BW_JOB_COMPENSATED)
		return BW_EINVAL;
	return with_txn(l, transition_txn, &t);
}

struct disks_update_ctx {
	const struct bw_fence *f;
	const struct bw_disk_update *u;
	size_t n;
};

static int disks_update_txn(struct bw_ledger *l, void *arg)
{
	struct disks_update_ctx *d = arg;
	int rc = fence(l, d->f, NULL, NULL);
	return rc ? rc : update_disks(l, d->f, d->u, d->n);
}

int bw_ledger_disks_update(struct bw_ledger *l, const struct bw_fence *f,
			   const struct bw_disk_update *u, size_t n)
{
	struct disks_update_ctx d = {f, u, n};
	return with_txn(l, disks_update_txn, &d);
}

int bw_ledger_disk_update(struct bw_ledger *l, const struct bw_fence *f, int64_t key,
			  enum bw_disk_row_state state, pid_t nbd_pid, uint64_t nbd_start_time,
			  bool qcow2_created)
{
	struct bw_disk_update u = {key, state, nbd_pid, nbd_start_time, qcow2_created};
	return bw_ledger_disks_update(l, f, &u, 1);
}

/* ---- ports ------------------------------------------------------------------------------ */

/* Finds up to n free ports in [from, to); appends them to out[*got]. */
static int free_ports(struct bw_ledger *l, int from, int to, size_t n, int *out, size_t *got)
{
	int err = 0;
	sqlite3_stmt *s = query(l, BW__ST_FREE_PORTS, &err, "iii", (int64_t)from, (int64_t)to,
				(int64_t)(n - *got));
	if (s == NULL)
		return err;
	int rc = SQLITE_DONE;
	while (*got < n && (rc = sqlite3_step(s)) == SQLITE_ROW)
		out[(*got)++] = sqlite3_column_int(s, 0);
	sqlite3_reset(s);
	return rc == SQLITE_ROW || rc == SQLITE_DONE ? 0 : sql_err(l, rc);
}

/*
 * Picks n free ports in rotating order and gives them to keys[] of the fenced job; moves
 * the cursor past the last one. Must run inside a transaction.
 */
static int take_ports(struct bw_ledger *l, const struct bw_fence *f, const int64_t *keys,
		      size_t n, int *ports)
{
	int err = 0, rc;
	int64_t cursor = l->port_min, now = bw_clock_wall_ms();
	size_t got = 0;

	if ((rc = run(l, BW__ST_QUARANTINE_EXPIRE, "i", now)) != 0)
		return rc;
	sqlite3_stmt *s = query(l, BW__ST_CURSOR_GET, &err, "");
	if (s == NULL)
		return err;
	rc = sqlite3_step(s);
	if (rc == SQLITE_ROW)
		cursor = sqlite3_column_int64(s, 0);
	sqlite3_reset(s);
	if (rc != SQLITE_ROW && rc != SQLITE_DONE)
		return sql_err(l, rc);

	if ((rc = free_ports(l, (int)cursor, 65536, n, ports, &got)) != 0 ||
	    (got < n && (rc = free_ports(l, 0, (int)cursor, n, ports, &got)) != 0))
		return rc;
	if (got < n)
		return BW_ENOPORTS;
	for (size_t i = 0; i < n; i++) {
		if ((rc = run(l, BW__ST_PORT_INSERT, "ititii", (int64_t)ports[i], f->job_id, keys[i],
			      l->worker_id ? l->worker_id : "-", f->generation, now)) != 0 ||
		    (rc = run(l, BW__ST_DISK_SET_PORT, "tii", f->job_id, keys[i], (int64_t)ports[i])) !=
			    0)
			return rc;
		if (sqlite3_changes(l->db) != 1)
			return BW_ENOENT; /* the job has no such disk */
	}
	int next = ports[n - 1] + 1;
	if (next > l->port_max)
		next = l->port_min;
	return run(l, BW__ST_CURSOR_SET, "i", (int64_t)next);
}

struct reserve_ctx {
	const struct bw_fence *f;
	const int64_t *keys;
	size_t n;
	int *ports;
	struct transition_ctx *then; /* NULL, or a state move in the same transaction */
};

static int reserve_txn(struct bw_ledger *l, void *arg)
{
	struct reserve_ctx *r = arg;
	int err = 0;
	int rc = fence(l, r->f, NULL, NULL);
	if (rc != 0)
		return rc;
	for (size_t i = 0; i < r->n; i++) {
		sqlite3_stmt *s = query(l, BW__ST_PORT_HELD_BY_DISK, &err, "ti", r->f->job_id, r->keys[i]);
		if (s == NULL)
			return err;
		rc = sqlite3_step(s);
		sqlite3_reset(s);
		if (rc == SQLITE_ROW)
			return BW_EEXIST;
		if (rc != SQLITE_DONE)
			return sql_err(l, rc);
	}
	if ((rc = take_ports(l, r->f, r->keys, r->n, r->ports)) != 0)
		return rc;
	return r->then ? transition_txn(l, r->then) : 0;
}

static int reserve(struct bw_ledger *l, const struct bw_fence *f, const int64_t *keys, size_t n,
		   int *ports, struct transition_ctx *then)
{
	int *tmp = NULL;
	if (n == 0 || n > 65535)
		return BW_EINVAL;
	tmp = malloc(n * sizeof(*tmp));
	if (tmp == NULL)
		return BW_ENOMEM;
	struct reserve_ctx r = {f, keys, n, tmp, then};
	int rc = with_txn(l, reserve_txn, &r);
	if (rc == 0)
		memcpy(ports, tmp, n * sizeof(*tmp));
	free(tmp);
	return rc;
}

int bw_ledger_reserve(struct bw_ledger *l, const struct bw_fence *f, const int64_t *keys,
		      size_t n, int *ports)
{
	return reserve(l, f, keys, n, ports, NULL);
}

int bw_ledger_reserve_and_move(struct bw_ledger *l, const struct bw_fence *f,
			       const int64_t *keys, size_t n, int *ports, enum bw_job_state state,
			       const struct bw_disk_update *disks, size_t n_disks)
{
	struct transition_ctx t = {f, state, NULL, NULL, 0, disks, n_disks};
	if ((unsigned)state > BW_JOB_COMPENSATED)
		return BW_EINVAL;
	return reserve(l, f, keys, n, ports, &t);
}

struct release_ctx {
	const struct bw_fence *f;
	int port;
	size_t released;
};

static int release_txn(struct bw_ledger *l, void *arg)
{
	struct release_ctx *r = arg;
	int rc = fence(l, r->f, NULL, NULL);
	if (rc == 0)
		rc = run(l, BW__ST_PORT_RELEASE, "it", (int64_t)r->port, r->f->job_id);
	if (rc != 0)
		return rc;
	r->released = (size_t)sqlite3_changes(l->db);
	return run(l, BW__ST_DISK_CLEAR_PORT, "ti", r->f->job_id, (int64_t)r->port);
}

int bw_ledger_release(struct bw_ledger *l, const struct bw_fence *f, int port)
{
	struct release_ctx r = {f, port, 0};
	int rc = with_txn(l, release_txn, &r);
	if (rc == 0 && r.released == 0)
		rc = BW_ENOENT;
	return rc;
}

static int release_all_txn(struct bw_ledger *l, void *arg)
{
	struct release_ctx *r = arg;
	int rc = fence(l, r->f, NULL, NULL);
	if (rc == 0)
		rc = run(l, BW__ST_PORT_RELEASE_ALL, "t", r->f->job_id);
	if (rc != 0)
		return rc;
	r->released = (size_t)sqlite3_changes(l->db);
	return run(l, BW__ST_DISK_CLEAR_PORTS, "t", r->f->job_id);
}

int bw_ledger_release_all(struct bw_ledger *l, const struct bw_fence *f, size_t *released)
{
	struct release_ctx r = {f, 0, 0};
	int rc = with_txn(l, release_all_txn, &r);
	if (rc == 0 && released)
		*released = r.released;
	return rc;
}

struct quarantine_ctx {
	const struct bw_fence *f;
	int port;
	int seconds;
	int replacement;
	bool no_ports;
};

static int quarantine_txn(struct bw_ledger *l, void *arg)
{
	struct quarantine_ctx *q = arg;
	int err = 0;
	int64_t now = bw_clock_wall_ms(), key;
	int rc = fence(l, q->f, NULL, NULL);
	if (rc != 0)
		return rc;
	sqlite3_stmt *s = query(l, BW__ST_PORT_DISK, &err, "it", (int64_t)q->port, q->f->job_id);
	if (s == NULL)
		return err;
	rc = sqlite3_step(s);
	key = rc == SQLITE_ROW ? sqlite3_column_int64(s, 0) : 0;
	sqlite3_reset(s);
	if (rc == SQLITE_DONE)
		return BW_ENOENT;
	if (rc != SQLITE_ROW)
		return sql_err(l, rc);
	if ((rc = run(l, BW__ST_PORT_QUARANTINE, "iii", (int64_t)q->port,
		      now + (int64_t)q->seconds * 1000, now)) != 0 ||
	    (rc = run(l, BW__ST_DISK_CLEAR_PORT, "ti", q->f->job_id, (int64_t)q->port)) != 0)
		return rc;
	q->no_ports = false;
	rc = take_ports(l, q->f, &key, 1, &q->replacement);
	if (rc == BW_ENOPORTS) {
		q->no_ports = true; /* keep the quarantine all the same */
		return 0;
	}
	return rc;
}

int bw_ledger_quarantine(struct bw_ledger *l, const struct bw_fence *f, int port, int seconds,
			 int *replacement)
{
	struct quarantine_ctx q = {f, port, seconds, 0, false};
	if (seconds < 1)
		return BW_EINVAL;
	int rc = with_txn(l, quarantine_txn, &q);
	if (rc != 0)
		return rc;
	if (q.no_ports)
		return BW_ENOPORTS;
	*replacement = q.replacement;
	return 0;
}

/* ---- recovery --------------------------------------------------------------------------- */

/* A worker row found dead, with the lock we took on its file (or -1). */
struct dead_worker {
	int64_t incarnation;
	char *lock_path;
	int lock_fd;
};

/*
 * Is the worker of this row dead? Its lock decides: we can take it, or the lock file is
 * gone and its pid no longer names the same process. A different boot id means it ran
 * before this boot. Stores the taken lock's fd in *fd (-1 if none).
 */
static bool worker_dead(struct bw_ledger *l, const char *lock_path, const char *boot_id, pid_t pid,
			uint64_t start_time, int *fd)
{
	*fd = -1;
	if (strcmp(boot_id, l->boot_id) != 0)
		return true;
	int lfd = open(lock_path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (lfd < 0)
		return errno == ENOENT && !bw_proc_same(pid, start_time);
	if (flock(lfd, LOCK_EX | LOCK_NB) != 0) {
		close(lfd);
		return false; /* held: alive */
	}
	*fd = lfd;
	return true;
}

static void dead_free(struct dead_worker *d, size_t n, bool unlink_locks)
{
	for (size_t i = 0; i < n; i++) {
		if (unlink_locks && d[i].lock_fd >= 0 && d[i].lock_path)
			unlink(d[i].lock_path); /* while we still hold it */
		if (d[i].lock_fd >= 0)
			close(d[i].lock_fd);
		free(d[i].lock_path);
	}
	free(d);
}

struct reap_ctx {
	struct dead_worker *dead;
	size_t n_dead;
	struct bw_reaped_job *jobs;
	size_t n_jobs;
};

static void reaped_clear(struct reap_ctx *r)
{
	bw_reaped_free(r->jobs, r->n_jobs);
	r->jobs = NULL;
	r->n_jobs = 0;
}

static int load_disks(struct bw_ledger *l, struct bw_reaped_job *j)
{
	int err = 0, rc;
	sqlite3_stmt *s = query(l, BW__ST_JOB_DISKS, &err, "t", j->job_id);
	if (s == NULL)
		return err;
	while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
		struct bw_reaped_disk *d = realloc(j->disks, (j->n_disks + 1) * sizeof(*d));
		if (d == NULL) {
			rc = SQLITE_NOMEM;
			break;
		}
		j->disks = d;
		d = &d[j->n_disks++];
		memset(d, 0, sizeof(*d));
		d->key = sqlite3_column_int64(s, 0);
		d->port = sqlite3_column_int(s, 1);
		d->nbd_pid = (pid_t)sqlite3_column_int64(s, 2);
		d->nbd_start_time = (uint64_t)sqlite3_column_int64(s, 3);
		d->state = dup_col(s, 4);
		d->export_name = dup_col(s, 5);
		d->qcow2_path = dup_col(s, 6);
		d->qcow2_created = sqlite3_column_int(s, 7) != 0;
		if (!d->state || !d->export_name || !d->qcow2_path) {
			rc = SQLITE_NOMEM;
			break;
		}
	}
	sqlite3_reset(s);
	return rc == SQLITE_DONE ? 0 : sql_err(l, rc);
}

static int reap_txn(struct bw_ledger *l, void *arg)
{
	struct reap_ctx *r = arg;
	int err = 0, rc;

	reaped_clear(r); /* a retried transaction starts over */
	for (size_t i = 0; i < r->n_dead; i++)
		if ((rc = run(l, BW__ST_WORKER_DELETE, "i", r->dead[i].incarnation)) != 0)
			return rc;

	/* Every unfinished job whose owner incarnation has no row is an orphan: ours now. */
	sqlite3_stmt *s = query(l, BW__ST_ORPHANS, &err, "");
	if (s == NULL)
		return err;
	while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
		struct bw_reaped_job *j = realloc(r->jobs, (r->n_jobs + 1) * sizeof(*j));
		if (j == NULL) {
			rc = SQLITE_NOMEM;
			break;
		}
		r->jobs = j;
		j = &j[r->n_jobs++];
		memset(j, 0, sizeof(*j));
		j->job_id = dup_col(s, 0);
		if (bw_job_state_parse((const char *)sqlite3_column_text(s, 1), &j->state) != 0)
			j->state = BW_JOB_FAILED;
		j->generation = sqlite3_column_int64(s, 2) + 1;
		j->previous_owner = dup_col(s, 3);
		j->boot_changed = strcmp((const char *)sqlite3_column_text(s, 4), l->boot_id) != 0;
		j->message = dup_col(s, 5);
		j->seq = sqlite3_column_int64(s, 6);
		j->created_at_ms = sqlite3_column_int64(s, 7);
		j->sna_called = sqlite3_column_int(s, 8) != 0;
		if (!j->job_id || !j->previous_owner || !j->message) {
			rc = SQLITE_NOMEM;
			break;
		}
	}
	sqlite3_reset(s);
	if (rc != SQLITE_DONE)
		return sql_err(l, rc);

	int64_t now = bw_clock_wall_ms();
	for (size_t i = 0; i < r->n_jobs; i++) {
		struct bw_reaped_job *j = &r->jobs[i];
		if ((rc = run(l, BW__ST_JOB_ADOPT, "tititi", j->job_id, j->generation, l->worker_id,
			      l->incarnation, l->boot_id, now)) != 0 ||
		    (rc = run(l, BW__ST_PORTS_ADOPT, "tti", j->job_id, l->worker_id,
			      j->generation)) != 0)
			return rc;
		if ((rc = history(l, j->job_id, bw_job_state_name(j->state), j->generation)) != 0 ||
		    (rc = load_disks(l, j)) != 0)
			return rc;
	}
	return 0;
}

int bw_ledger_reap(struct bw_ledger *l, struct bw_reaped_job **jobs, size_t *n)
{
	struct reap_ctx r = {NULL, 0, NULL, 0};
	int err = 0, rc;

	if (l->worker_id == NULL)
		return BW_EINVAL;
	/* Probe the locks outside any transaction: flock does not wait, SQL does not either. */
	sqlite3_stmt *s = query(l, BW__ST_WORKERS_OTHERS, &err, "i", l->incarnation);
	if (s == NULL)
		return err;
	while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
		int fd;
		const char *lock_path = (const char *)sqlite3_column_text(s, 1);
		if (!worker_dead(l, lock_path, (const char *)sqlite3_column_text(s, 2),
				 (pid_t)sqlite3_column_int64(s, 3),
				 (uint64_t)sqlite3_column_int64(s, 4), &fd))
			continue;
		struct dead_worker *d = realloc(r.dead, (r.n_dead + 1) * sizeof(*d));
		if (d == NULL) {
			if (fd >= 0)
				close(fd);
			rc = SQLITE_NOMEM;
			break;
		}
		r.dead = d;
		d[r.n_dead].incarnation = sqlite3_column_int64(s, 0);
		d[r.n_dead].lock_path = strdup(lock_path);
		d[r.n_dead].lock_fd = fd;
		r.n_dead++;
		if (d[r.n_dead - 1].lock_path == NULL) {
			rc = SQLITE_NOMEM;
			break;
		}
	}
	sqlite3_reset(s);
	rc = rc == SQLITE_DONE ? 0 : sql_err(l, rc);

	if (rc == 0)
		rc = with_txn(l, reap_txn, &r);
	/* The dead workers' rows are gone: remove their lock files, then let go of the locks. */
	dead_free(r.dead, r.n_dead, rc == 0);
	if (rc != 0) {
		reaped_clear(&r);
		return rc;
	}
	*jobs = r.jobs;
	*n = r.n_jobs;
	return 0;
}

int bw_ledger_event_body(struct bw_ledger *l, const char *event_id, char **body)
{
	int err = 0;
	sqlite3_stmt *s = query(l, BW__ST_EVENT_BODY, &err, "t", event_id);
	if (s == NULL)
		return err;
	int rc = sqlite3_step(s);
	*body = NULL;
	if (rc == SQLITE_ROW && (*body = dup_col(s, 0)) == NULL)
		rc = SQLITE_NOMEM;
	sqlite3_reset(s);
	if (rc == SQLITE_DONE)
		return BW_ENOENT;
	return rc == SQLITE_ROW ? 0 : sql_err(l, rc);
}

void bw_reaped_free(struct bw_reaped_job *jobs, size_t n)
{
	for (size_t i = 0; jobs && i < n; i++) {
		for (size_t k = 0; k < jobs[i].n_disks; k++) {
			free(jobs[i].disks[k].state);
			free(jobs[i].disks[k].export_name);
			free(jobs[i].disks[k].qcow2_path);
		}
		free(jobs[i].disks);
		free(jobs[i].job_id);
		free(jobs[i].previous_owner);
		free(jobs[i].message);
	}
	free(jobs);
}

/* ---- outbox ----------------------------------------------------------------------------- */

static int outbox_append_txn(struct bw_ledger *l, void *arg)
{
	const struct bw_event *e = arg;
	return run(l, BW__ST_OUTBOX_APPEND, "titti", e->event_id, e->seq, e->routing_key, e->body,
		   bw_clock_wall_ms());
}

int bw_ledger_outbox_append(struct bw_ledger *l, const struct bw_event *event)
{
	return with_txn(l, outbox_append_txn, (void *)event);
}

int bw_ledger_outbox_next(struct bw_ledger *l, int64_t after_id, size_t max,
			  struct bw_outbox_row **rows, size_t *n)
{
	int err = 0, rc;
	struct bw_outbox_row *out = NULL;
	size_t got = 0;
	sqlite3_stmt *s = query(l, BW__ST_OUTBOX_NEXT, &err, "ii", (int64_t)max, after_id);
	if (s == NULL)
		return err;
	while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
		struct bw_outbox_row *o = realloc(out, (got + 1) * sizeof(*o));
		if (o == NULL) {
			rc = SQLITE_NOMEM;
			break;
		}
		out = o;
		o = &o[got++];
		o->id = sqlite3_column_int64(s, 0);
		o->event_id = dup_col(s, 1);
		o->routing_key = dup_col(s, 2);
		o->body = dup_col(s, 3);
		o->attempts = sqlite3_column_int(s, 4);
		if (!o->event_id || !o->routing_key || !o->body) {
			rc = SQLITE_NOMEM;
			break;
		}
	}
	sqlite3_reset(s);
	if (rc != SQLITE_DONE) {
		bw_outbox_free(out, got);
		return sql_err(l, rc);
	}
	*rows = out;
	*n = got;
	return 0;
}

static int republish_txn(struct bw_ledger *l, void *arg)
{
	const char *job_id = arg;
	return run(l, BW__ST_REPUBLISH, "t", job_id);
}

int bw_ledger_republish_terminal(struct bw_ledger *l, const char *job_id)
{
	return with_txn(l, republish_txn, (void *)job_id);
}

struct published_ctx {
	const int64_t *ids;
	size_t n;
};

static int published_txn(struct bw_ledger *l, void *arg)
{
	struct published_ctx *p = arg;
	int64_t now = bw_clock_wall_ms();
	for (size_t i = 0; i < p->n; i++) {
		int rc = run(l, BW__ST_OUTBOX_PUBLISHED, "ii", p->ids[i], now);
		if (rc != 0)
			return rc;
	}
	return 0;
}

int bw_ledger_outbox_published(struct bw_ledger *l, const int64_t *ids, size_t n)
{
	struct published_ctx p = {ids, n};
	return n ? with_txn(l, published_txn, &p) : 0;
}

struct failed_ctx {
	int64_t id;
	const char *error;
};

static int failed_txn(struct bw_ledger *l, void *arg)
{
	struct failed_ctx *f = arg;
	return run(l, BW__ST_OUTBOX_FAILED, "it", f->id, f->error);
}

int bw_ledger_outbox_failed(struct bw_ledger *l, int64_t id, const char *error)
{
	struct failed_ctx f = {id, error};
	return with_txn(l, failed_txn, &f);
}

int bw_ledger_outbox_backlog(struct bw_ledger *l, size_t *count, int64_t *oldest_age_ms)
{
	int err = 0;
	sqlite3_stmt *s = query(l, BW__ST_OUTBOX_BACKLOG, &err, "");
	if (s == NULL)
		return err;
	int rc = sqlite3_step(s);
	if (rc == SQLITE_ROW) {
		*count = (size_t)sqlite3_column_int64(s, 0);
		*oldest_age_ms = sqlite3_column_type(s, 1) == SQLITE_NULL
					 ? 0
					 : bw_clock_wall_ms() - sqlite3_column_int64(s, 1);
	}
	sqlite3_reset(s);
	return rc == SQLITE_ROW ? 0 : sql_err(l, rc);
}

int bw_ledger_port_counts(struct bw_ledger *l, struct bw_port_counts *out)
{
	int err = 0;
	sqlite3_stmt *s = query(l, BW__ST_PORT_COUNTS, &err, "i", bw_clock_wall_ms());
	if (s == NULL)
		return err;
	int rc = sqlite3_step(s);
	if (rc == SQLITE_ROW)
		*out = (struct bw_port_counts){(size_t)sqlite3_column_int64(s, 0),
					       (size_t)sqlite3_column_int64(s, 1),
					       (size_t)sqlite3_column_int64(s, 2)};
	sqlite3_reset(s);
	return rc == SQLITE_ROW ? 0 : sql_err(l, rc);
}

void bw_ledger_busy_stats(const struct bw_ledger *l, uint64_t *waits, uint64_t *retries)
{
	*waits = l->busy_waits;
	*retries = l->busy_retries;
}

void bw_outbox_free(struct bw_outbox_row *rows, size_t n)
{
	for (size_t i = 0; rows && i < n; i++) {
		free(rows[i].event_id);
		free(rows[i].routing_key);
		free(rows[i].body);
	}
	free(rows);
}

/* ---- cancels ----------------------------------------------------------------------------- */

/* The reason of a cancel recorded for job_id (see bw_ledger_cancel_get); BW_ENOENT: none. */
static int cancel_find(struct bw_ledger *l, const char *job_id, char *reason, size_t size)
{
	int err = 0;
	sqlite3_stmt *s = query(l, BW__ST_CANCEL_GET, &err, "ti", job_id, bw_clock_wall_ms());
	if (s == NULL)
		return err;
	int rc = sqlite3_step(s);
	if (rc == SQLITE_ROW && reason && size)
		snprintf(reason, size, "%s", (const char *)sqlite3_column_text(s, 0));
	sqlite3_reset(s);
	return rc == SQLITE_ROW ? 0 : rc == SQLITE_DONE ? BW_ENOENT : sql_err(l, rc);
}

int bw_ledger_cancel_get(struct bw_ledger *l, const char *job_id, char *reason, size_t size)
{
	return cancel_find(l, job_id, reason, size);
}

struct cancel_ctx {
	const char *job_id;
	const char *reason;
	int memory_s;
	struct bw_cancel_record out;
};

/*
 * One transaction against the claim's: a claim committed first makes the job known here
 * (the row is kept for its owner), a claim committed after finds the row (claim_txn).
 */
static int cancel_record_txn(struct bw_ledger *l, void *arg)
{
	struct cancel_ctx *c = arg;
	int err = 0;
	int64_t now = bw_clock_wall_ms();
	bool known = false;
	memset(&c->out, 0, sizeof(c->out));
	sqlite3_stmt *s = query(l, BW__ST_CANCEL_JOB, &err, "t", c->job_id);
	if (s == NULL)
		return err;
	int rc = sqlite3_step(s);
	if (rc == SQLITE_ROW) {
		known = true;
		if (bw_job_state_parse((const char *)sqlite3_column_text(s, 0), &c->out.state) != 0)
			c->out.state = BW_JOB_FAILED;
		snprintf(c->out.owner, sizeof(c->out.owner), "%s",
			 (const char *)sqlite3_column_text(s, 1));
	}
	sqlite3_reset(s);
	if (rc != SQLITE_ROW && rc != SQLITE_DONE)
		return sql_err(l, rc);
	if (known && bw_job_state_terminal(c->out.state)) {
		c->out.outcome = BW_CANCEL_ENDED;
		return 0;
	}
	if (!known && c->memory_s <= 0) {
		c->out.outcome = BW_CANCEL_NOT_KEPT;
		return 0;
	}
	c->out.outcome = known ? BW_CANCEL_KNOWN : BW_CANCEL_REMEMBERED;
	int64_t memory_ms = c->memory_s > 0 ? (int64_t)c->memory_s * 1000 : 0;
	return run(l, BW__ST_CANCEL_UPSERT, "ttii", c->job_id, c->reason, now, now + memory_ms);
}

int bw_ledger_cancel_record(struct bw_ledger *l, const char *job_id, const char *reason,
			    int memory_s, struct bw_cancel_record *out)
{
	struct cancel_ctx c = {job_id, reason ? reason : "", memory_s, {0}};
	if (l->readonly)
		return BW_EINVAL;
	int rc = with_txn(l, cancel_record_txn, &c);
	if (rc == 0)
		*out = c.out;
	return rc;
}

struct claim_cancelled_ctx {
	struct claim_ctx claim;
	const struct bw_event *events; /* accepted, failed, cleanup */
	bool gone;                     /* the cancel is no longer remembered */
};

static int claim_cancelled_txn(struct bw_ledger *l, void *arg)
{
	struct claim_cancelled_ctx *cc = arg;
	struct claim_ctx *c = &cc->claim;
	int rc;
	int64_t now = bw_clock_wall_ms();
	cc->gone = false;
	/* claim_txn writes the job only when no cancel is remembered: here it must be one */
	if ((rc = claim_txn(l, c)) != 0 || c->exists)
		return rc;
	if (!c->cancelled) {
		cc->gone = true;
		return BW_ENOENT; /* rolled back: the caller claims the usual way */
	}
	if ((rc = run(l, BW__ST_JOB_INSERT, "ttitti", c->job_id, l->worker_id, l->incarnation,
		      l->boot_id, c->message, now)) != 0)
		return rc;
	for (size_t i = 0; i < c->n_disks; i++)
		if ((rc = run(l, BW__ST_DISK_INSERT, "titt", c->job_id, c->disks[i].key,
			      c->disks[i].export_name, c->disks[i].qcow2_path)) != 0)
			return rc;
	if ((rc = history(l, c->job_id, "claimed", 1)) != 0 ||
	    (rc = append_events(l, c->job_id, 0, cc->events, 3)) != 0 ||
	    (rc = run(l, BW__ST_JOB_UPDATE, "titiin", c->job_id, (int64_t)1, "failed", (int64_t)2,
		      now, "cancelled")) != 0 ||
	    (rc = history(l, c->job_id, "failed", 1)) != 0 ||
	    (rc = run(l, BW__ST_JOB_UPDATE, "titiin", c->job_id, (int64_t)1, "compensated",
		      (int64_t)3, now, NULL)) != 0 ||
	    (rc = history(l, c->job_id, "compensated", 1)) != 0)
		return rc;
	return run(l, BW__ST_CANCEL_DELETE, "t", c->job_id);
}

int bw_ledger_claim_cancelled(struct bw_ledger *l, const char *job_id, const char *message,
			      const struct bw_job_disk_new *disks, size_t n_disks,
			      const struct bw_event *events, struct bw_known *existing)
{
	struct claim_cancelled_ctx cc = {
		{job_id, message, disks, n_disks, events, {BW_JOB_CLAIMED, false}, false, false},
		events, false};
	if (l->worker_id == NULL || events == NULL || events[0].seq != 1)
		return BW_EINVAL;
	int rc = with_txn(l, claim_cancelled_txn, &cc);
	if (cc.gone)
		return BW_ENOENT;
	if (rc != 0)
		return rc;
	if (cc.claim.exists) {
		if (existing)
			*existing = cc.claim.existing;
		return BW_EEXIST;
	}
	return 0;
}

/* ---- maintenance ------------------------------------------------------------------------- */

static int expire_txn(struct bw_ledger *l, void *arg)
{
	(void)arg;
	int64_t now = bw_clock_wall_ms();
	int rc = run(l, BW__ST_QUARANTINE_EXPIRE, "i", now);
	return rc != 0 ? rc : run(l, BW__ST_CANCEL_EXPIRE, "i", now);
}

int bw_ledger_maintain(struct bw_ledger *l)
{
	int rc = with_txn(l, expire_txn, NULL);
	if (rc != 0)
		return rc;
	/*
	 * A TRUNCATE checkpoint holds the writer lock while it waits for readers to leave the
	 * WAL: with the busy handler's usual bound every writer of the host would stall for up
	 * to 2 s behind it (seen as 2.4 s outliers in scripts/bench-e2e). So it never waits:
	 * busy only means a reader still needs the WAL, and the next call tries again.
	 */
	l->no_wait = true;
	rc = run(l, BW__ST_CHECKPOINT, "");
	l->no_wait = false;
	return rc == BW_EBUSY ? 0 : rc;
}

/* ---- retention --------------------------------------------------------------------------- */

#define DAY_MS INT64_C(86400000)
#define MAX_RETENTION_DAYS 36500 /* the config key's bound (CONTRACT §6) */
#define MAX_JOB_DISKS 64         /* a job's disks at most (CONTRACT §2): its log files */

/*
 * Runs fn in one transaction, briefly or not at all: the writers' gate is waited for at
 * most BW_PRUNE_LOCK_WAIT_MS and SQLite's write lock not at all (a checkpoint or a foreign
 * writer holds it), and nothing is retried. BW_EBUSY: the lock was busy, nothing done.
 * Upkeep goes through here, so that it can only ever wait for the host's writers, never
 * make them wait long for it (a TRUNCATE checkpoint once stalled them 2.4 s: maintain).
 */
static int with_txn_brief(struct bw_ledger *l, txn_fn fn, void *ctx, int64_t *held_us)
{
	int rc = l->gate ? bw_gate_lock(l->gate, BW_PRUNE_LOCK_WAIT_MS, l->errmsg,
					sizeof(l->errmsg))
			 : 0;
	if (rc != 0)
		return rc;
	int64_t t0 = bw_clock_mono_us();
	l->no_wait = true;
	rc = run(l, BW__ST_BEGIN, "");
	l->no_wait = false;
	if (rc == 0) {
		rc = fn(l, ctx);
		if (rc != 0)
			snprintf(l->errmsg, sizeof(l->errmsg), "%s", sqlite3_errmsg(l->db));
		if (rc == 0)
			rc = run(l, BW__ST_COMMIT, "");
		if (rc != 0 && run(l, BW__ST_ROLLBACK, "") != 0) {
			/* rc already says why the transaction failed */
		}
	}
	*held_us = bw_clock_mono_us() - t0;
	if (l->gate)
		bw_gate_unlock(l->gate);
	return rc;
}

/* Reads up to want candidate job ids (oldest first) into ids[] (malloc'd each), n of them. */
static int prune_candidates(struct bw_ledger *l, int64_t cutoff, size_t want, char **ids,
			    size_t *n)
{
	int err = 0, rc = SQLITE_DONE;
	sqlite3_stmt *s = query(l, BW__ST_PRUNE_CANDIDATES, &err, "ii", cutoff, (int64_t)want);
	if (s == NULL)
		return err;
	*n = 0;
	while (*n < want && (rc = sqlite3_step(s)) == SQLITE_ROW) {
		if ((ids[*n] = dup_col(s, 0)) == NULL) {
			rc = SQLITE_NOMEM;
			break;
		}
		(*n)++;
	}
	sqlite3_reset(s); /* lets go of the read snapshot */
	return rc == SQLITE_ROW || rc == SQLITE_DONE ? 0 : sql_err(l, rc);
}

/*
 * Removes the log files of job_id's disks (each disk's qemu-nbd log and qemu-img check
 * log; most are long gone: a completed disk's are removed when it completes). Before the
 * rows, so a crash in between leaves rows that the next pass finds, never files that no
 * row names. Counts the files removed into *files.
 */
static int prune_files(struct bw_ledger *l, const char *state_dir, const char *job_id,
		       size_t *files)
{
	int64_t keys[MAX_JOB_DISKS];
	size_t n = 0;
	int err = 0, rc = SQLITE_DONE;
	sqlite3_stmt *s = query(l, BW__ST_PRUNE_DISK_KEYS, &err, "t", job_id);
	if (s == NULL)
		return err;
	while (n < MAX_JOB_DISKS && (rc = sqlite3_step(s)) == SQLITE_ROW)
		keys[n++] = sqlite3_column_int64(s, 0);
	sqlite3_reset(s);
	if (rc != SQLITE_ROW && rc != SQLITE_DONE)
		return sql_err(l, rc);
	for (size_t i = 0; i < n; i++) {
		char path[PATH_MAX], check[PATH_MAX + sizeof(BW_NBD_CHECK_LOG_SUFFIX)];
		if (bw_nbd_log_path(path, sizeof(path), state_dir, job_id, keys[i]) != 0)
			continue; /* such a name was never written */
		snprintf(check, sizeof(check), "%s" BW_NBD_CHECK_LOG_SUFFIX, path);
		*files += (unlink(path) == 0) + (unlink(check) == 0);
	}
	return 0;
}

struct prune_ctx {
	char **ids;
	size_t n;
	int64_t cutoff, tomb_cutoff, now;
	size_t jobs, events, tombstones; /* removed by this transaction */
};

/* Removes one candidate with all its rows, leaving its tombstone, if it still may go. */
static int prune_job(struct bw_ledger *l, struct prune_ctx *c, const char *job_id)
{
	int err = 0;
	sqlite3_stmt *s = query(l, BW__ST_PRUNE_CHECK, &err, "ti", job_id, c->cutoff);
	if (s == NULL)
		return err;
	int rc = sqlite3_step(s);
	if (rc != SQLITE_ROW) {
		sqlite3_reset(s);
		return rc == SQLITE_DONE ? 0 : sql_err(l, rc); /* gone, or no longer due */
	}
	const unsigned char *msg = sqlite3_column_text(s, 2);
	uint64_t hash = bw_fnv1a64(msg ? (const char *)msg : "", msg ? strlen((const char *)msg) : 0);
	int64_t finished_at = sqlite3_column_int64(s, 1);
	char state[sizeof("compensated")];
	snprintf(state, sizeof(state), "%s", (const char *)sqlite3_column_text(s, 0));
	sqlite3_reset(s);
	if ((rc = run(l, BW__ST_TOMBSTONE_PUT, "ttiii", job_id, state, finished_at, (int64_t)hash,
		      c->now)) != 0 ||
	    (rc = run(l, BW__ST_PRUNE_HISTORY, "t", job_id)) != 0 ||
	    (rc = run(l, BW__ST_PRUNE_DISKS, "t", job_id)) != 0 ||
	    (rc = run(l, BW__ST_PRUNE_OUTBOX, "t", job_id)) != 0 ||
	    (rc = run(l, BW__ST_PRUNE_JOB, "t", job_id)) != 0)
		return rc;
	c->jobs++;
	return 0;
}

static int prune_txn(struct bw_ledger *l, void *arg)
{
	struct prune_ctx *c = arg;
	int rc;
	c->jobs = c->events = c->tombstones = 0;
	for (size_t i = 0; i < c->n; i++)
		if ((rc = prune_job(l, c, c->ids[i])) != 0)
			return rc;
	if ((rc = run(l, BW__ST_TOMBSTONE_EXPIRE, "ii", c->tomb_cutoff,
		      (int64_t)BW_PRUNE_ROWS_BATCH)) != 0)
		return rc;
	c->tombstones = (size_t)sqlite3_changes(l->db);
	if ((rc = run(l, BW__ST_PRUNE_LONE_EVENTS, "ii", c->cutoff,
		      (int64_t)BW_PRUNE_ROWS_BATCH)) != 0)
		return rc;
	c->events = (size_t)sqlite3_changes(l->db);
	return 0;
}

int bw_ledger_prune(struct bw_ledger *l, const struct bw_prune *p, struct bw_prune_stats *st)
{
	size_t batch = p->batch ? p->batch : BW_PRUNE_BATCH;
	size_t max = p->max_jobs ? p->max_jobs : BW_PRUNE_PASS_MAX;
	size_t max_txns = (max + batch - 1) / batch;
	char **ids = NULL;
	int rc = 0;

	memset(st, 0, sizeof(*st));
	if (l->readonly || p->retention_days < 1 || p->retention_days > MAX_RETENTION_DAYS)
		return BW_EINVAL;
	int64_t keep = (int64_t)p->retention_days * DAY_MS;
	struct prune_ctx c = {NULL, 0, p->now_ms - keep,
			      p->now_ms - keep * BW_PRUNE_TOMBSTONE_FACTOR, p->now_ms, 0, 0, 0};
	if ((ids = calloc(batch, sizeof(*ids))) == NULL)
		return BW_ENOMEM;
	c.ids = ids;
	while (st->txns < max_txns) {
		size_t want = batch < max - st->jobs ? batch : max - st->jobs;
		int64_t due = 0, held = 0;
		if ((rc = prune_candidates(l, c.cutoff, want, ids, &c.n)) != 0)
			break;
		if (c.n == 0 &&
		    (rc = query_int(l, BW__ST_PRUNE_DUE, &due, "ii", c.tomb_cutoff, c.cutoff)) != 0)
			break;
		if (c.n == 0 && !due)
			break; /* nothing to do: the write lock is not taken at all */
		for (size_t i = 0; p->state_dir && i < c.n && rc == 0; i++)
			rc = prune_files(l, p->state_dir, ids[i], &st->files);
		if (rc == 0)
			rc = with_txn_brief(l, prune_txn, &c, &held);
		for (size_t i = 0; i < c.n; i++) {
			free(ids[i]);
			ids[i] = NULL;
		}
		if (rc == BW_EBUSY) {
			st->skipped = true; /* the next pass goes on */
			rc = 0;
			break;
		}
		if (rc != 0)
			break;
		st->txns++;
		if (held > st->lock_max_us)
			st->lock_max_us = held;
		st->jobs += c.jobs;
		st->events += c.events;
		st->tombstones += c.tombstones;
		bool full = c.n == want || c.events == BW_PRUNE_ROWS_BATCH ||
			    c.tombstones == BW_PRUNE_ROWS_BATCH;
		if (!full)
			break;
		if (st->jobs >= max || st->txns >= max_txns) {
			st->more = true;
			break;
		}
	}
	free(ids);
	return rc;
}
