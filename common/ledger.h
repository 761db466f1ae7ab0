/* ledger.h: the host's SQLite ledger: workers, jobs, disks, NBD ports and the event outbox. */
#ifndef BW_LEDGER_H
#define BW_LEDGER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "error.h"

/*
 * One ledger per host, shared by every worker process on it (SQLite in WAL mode). Every
 * write is one short BEGIN IMMEDIATE transaction that does no work but SQL; a transaction
 * that stays SQLITE_BUSY past the busy handler's bound is retried with jitter a few times
 * and then fails with BW_EBUSY (transient).
 *
 * Ownership and fencing. A job row names its owner (a worker id and that worker process's
 * incarnation) and a generation. Every write about a job carries a struct bw_fence; a
 * write whose generation is not the job's current one fails with BW_EFENCED and changes
 * nothing, so a worker that lost its job (it was reaped while frozen) cannot touch it.
 *
 * Liveness. A worker holds an exclusive flock on <lock_dir>/<worker id>.lock for its whole
 * life. It is dead when that lock can be taken or when the host's boot id changed; the
 * heartbeat time is for monitoring only and never decides anything.
 */
struct bw_ledger;

/* The job states of DESIGN.md decision 4, in order. */
#define BW_JOB_STATE_MAP(X)                                                                        \
	X(CLAIMED, "claimed")                                                                      \
	X(WAITING_PORTS, "waiting_ports")                                                          \
	X(RESERVED, "reserved")                                                                    \
	X(TARGETS_CREATED, "targets_created")                                                      \
	X(SERVING, "serving")                                                                      \
	X(SNA_REQUESTED, "sna_requested")                                                          \
	X(TRANSFERRING, "transferring")                                                            \
	X(FINALIZING, "finalizing")                                                                \
	X(COMPLETED, "completed")                                                                  \
	X(FAILED, "failed")                                                                        \
	X(COMPENSATED, "compensated")

enum bw_job_state {
#define BW__STATE_ENUM(name, text) BW_JOB_##name,
	BW_JOB_STATE_MAP(BW__STATE_ENUM)
#undef BW__STATE_ENUM
};

/* Returns "claimed", ... (static). */
const char *bw_job_state_name(enum bw_job_state state);
/* Parses a state name; returns 0 or BW_EINVAL. */
int bw_job_state_parse(const char *name, enum bw_job_state *out) BW_MUST_CHECK;
/*
 * True for completed, failed and compensated: the job's outcome is decided. A failed job
 * is still unfinished for the ledger (it owes its compensation): its owner keeps its row
 * at unregister and a reaper takes it over.
 */
bool bw_job_state_terminal(enum bw_job_state state);

/* A disk row's state: pending (claimed) -> creating (its image being made) -> serving (its
 * qemu-nbd recorded) -> completed (finished, reported). */
#define BW_DISK_ROW_MAP(X)                                                                         \
	X(PENDING, "pending")                                                                      \
	X(CREATING, "creating")                                                                    \
	X(SERVING, "serving")                                                                      \
	X(COMPLETED, "completed")

enum bw_disk_row_state {
#define BW__DISK_ROW_ENUM(name, text) BW_DISK_ROW_##name,
	BW_DISK_ROW_MAP(BW__DISK_ROW_ENUM)
#undef BW__DISK_ROW_ENUM
};

/* Returns "pending", ... (static). */
const char *bw_disk_row_state_name(enum bw_disk_row_state state);

/* Identifies a write about a job: only the holder of the current generation may write. */
struct bw_fence {
	const char *job_id;
	int64_t generation;
};

/* An event to append to the outbox in the same transaction as a state change. */
struct bw_event {
	const char *event_id;    /* unique: "<job_id>/<event>", ... (CONTRACT §4) */
	const char *routing_key; /* the event name */
	int64_t seq;             /* must be the job's last seq + 1 (0 for backup.rejected) */
	const char *body;        /* the JSON text published */
};

/* ---- opening ---------------------------------------------------------------------------- */

/*
 * Opens (creating 0600, with its -wal and -shm, when missing) and migrates the ledger at
 * path, and makes its port pool [port_min, port_max] (every worker of a host must use the
 * same range; a different range replaces the pool, reservations outside it stay until
 * released). Returns 0 and a new handle in *out; BW_EIO/BW_EPERM/BW_ENOENT when the file
 * cannot be opened, BW_ENOTSUP when it was written by a newer schema, BW_EBUSY.
 */
int bw_ledger_open(struct bw_ledger **out, const char *path, int port_min, int port_max)
	BW_MUST_CHECK;

/*
 * Opens an existing ledger for reading only (bw-ctl): no file is created, nothing migrated.
 * Returns 0, BW_ENOENT when there is no ledger at path, BW_ENOTSUP for a newer schema.
 */
int bw_ledger_open_readonly(struct bw_ledger **out, const char *path) BW_MUST_CHECK;

/* Closes the handle (releasing this worker's lock if it registered). Accepts NULL. */
void bw_ledger_close(struct bw_ledger *l);

/* The last SQLite error text of this handle, for logs (static until the next call). */
const char *bw_ledger_errmsg(const struct bw_ledger *l);

/* ---- workers ---------------------------------------------------------------------------- */

/*
 * Registers this process as worker worker_id: takes the exclusive flock on
 * <lock_dir>/<worker_id>.lock (created 0600, close-on-exec, held until close) and records
 * pid, process start time, boot id and a new incarnation. A previous incarnation of the
 * same id is dead by then (we hold its lock); its jobs are left for bw_ledger_reap. A lock
 * held for a moment by a reaper or by bw-ctl is waited for (up to 3 s).
 * Returns 0; BW_EEXIST when a live process holds that worker id; BW_EIO...
 */
int bw_ledger_register(struct bw_ledger *l, const char *worker_id, const char *lock_dir)
	BW_MUST_CHECK;

/* A worker's row as it registered (bw_ledger_register). */
struct bw_worker_row {
	int64_t incarnation;
	pid_t pid;
	uint64_t start_time; /* of the process, as bw_proc_start_time gives it */
	int64_t started_at_ms;   /* ms since the epoch */
	int64_t heartbeat_at_ms; /* monitoring only */
};

/*
 * Reads the row of worker worker_id into *out (also on a read-only handle). The row names
 * a process; whether it still runs is bw_proc_same(pid, start_time). Returns 0; BW_ENOENT
 * when no worker of that id is registered; BW_EBUSY, BW_EIO.
 */
int bw_ledger_worker_get(struct bw_ledger *l, const char *worker_id, struct bw_worker_row *out)
	BW_MUST_CHECK;

/*
 * Stores in *n how many unfinished jobs (neither completed nor compensated: a failed job
 * still owes its compensation) worker_id owns. Returns 0, BW_EBUSY, BW_EIO.
 */
int bw_ledger_worker_jobs(struct bw_ledger *l, const char *worker_id, size_t *n) BW_MUST_CHECK;

/* Records the heartbeat time (monitoring only). Returns 0, BW_EBUSY, BW_EIO. */
int bw_ledger_heartbeat(struct bw_ledger *l) BW_MUST_CHECK;

/*
 * Removes this worker's row and lock file when it owns no unfinished job (a clean exit);
 * when it still owns some, leaves both so that the next recovery pass adopts them.
 * Returns 0 or a transient error.
 */
int bw_ledger_unregister(struct bw_ledger *l) BW_MUST_CHECK;

/* ---- jobs ------------------------------------------------------------------------------- */

struct bw_job_disk_new {
	int64_t key;
	const char *export_name;
	const char *qcow2_path;
};

/*
 * Claims job_id for this worker: the job row (state claimed, generation 1), its disks and
 * its backup.accepted event (seq 1) in one transaction. message is the accepted body.
 * Returns 0 and the generation in *generation; BW_EEXIST when the ledger already knows the
 * job_id, also by the tombstone of a pruned job (bw_ledger_prune) (nothing changed; what it
 * knows in *existing when not NULL); BW_EINVAL when the
 * worker is not registered; BW_EBUSY.
 * job_id (nothing changed; what it knows in *existing when not NULL); BW_ECANCELREC when
 * a backup.cancel is remembered for this job_id (nothing changed: claim it with
 * bw_ledger_claim_cancelled); BW_EINVAL when the worker is not registered; BW_EBUSY.
 */
struct bw_known {
	enum bw_job_state state;
	bool same_message; /* the known job was claimed with this very body */
};
int bw_ledger_claim(struct bw_ledger *l, const char *job_id, const char *message,
		    const struct bw_job_disk_new *disks, size_t n_disks,
		    const struct bw_event *accepted, int64_t *generation,
		    struct bw_known *existing) BW_MUST_CHECK;

/* A disk row of a job: its state text, its qemu-nbd (pid 0: none), its image created. */
struct bw_disk_update {
	int64_t key;
	enum bw_disk_row_state state;
	pid_t nbd_pid;
	uint64_t nbd_start_time;
	bool qcow2_created;
};

/*
 * Moves a job to state and appends events (0..n, each seq = previous + 1) in one
 * transaction; last_error (NULL: unchanged) is recorded. Legal moves: forward (steps may be
 * skipped), staying put (to append events), any unfinished state to failed, failed to
 * compensated. Returns 0, BW_ESTATE (an illegal move), BW_EFENCED, BW_ENOENT, BW_EINVAL
 * (a seq out of order), BW_EBUSY.
 */
int bw_ledger_transition(struct bw_ledger *l, const struct bw_fence *f, enum bw_job_state state,
			 const char *last_error, const struct bw_event *events, size_t n)
	BW_MUST_CHECK;

/* The same, also updating disk rows in the same transaction. */
int bw_ledger_transition_disks(struct bw_ledger *l, const struct bw_fence *f,
			       enum bw_job_state state, const char *last_error,
			       const struct bw_event *events, size_t n,
			       const struct bw_disk_update *disks, size_t n_disks) BW_MUST_CHECK;

/* Records a disk's qemu-nbd (pid 0: none) and its state. Fenced. */
int bw_ledger_disk_update(struct bw_ledger *l, const struct bw_fence *f, int64_t key,
			  enum bw_disk_row_state state, pid_t nbd_pid, uint64_t nbd_start_time,
			  bool qcow2_created) BW_MUST_CHECK;

/* The same for several disks of the job in one transaction: all or nothing. */
int bw_ledger_disks_update(struct bw_ledger *l, const struct bw_fence *f,
			   const struct bw_disk_update *u, size_t n) BW_MUST_CHECK;

/* ---- ports ------------------------------------------------------------------------------ */

/*
 * Reserves one distinct port for each of the n disk keys of the job, in one transaction:
 * all or nothing. Ports come from the pool in rotating order (the search starts after the
 * port handed out last, wrapping around), skipping reserved and quarantined ones, so a
 * just-released port is the last to be reused: a stale client still connecting to it
 * reaches nothing rather than the next job's export. Stores ports[i] for keys[i].
 * Returns 0; BW_ENOPORTS (nothing reserved); BW_EEXIST when a key already holds a port;
 * BW_ENOENT when the job has no disk with that key; BW_EFENCED; BW_EBUSY.
 */
int bw_ledger_reserve(struct bw_ledger *l, const struct bw_fence *f, const int64_t *keys,
		      size_t n, int *ports) BW_MUST_CHECK;

/*
 * The same, and in the same transaction the job moves to state (as bw_ledger_transition,
 * without events) with these disk rows: the reservation and what it leads to are recorded
 * together or not at all.
 */
int bw_ledger_reserve_and_move(struct bw_ledger *l, const struct bw_fence *f,
			       const int64_t *keys, size_t n, int *ports, enum bw_job_state state,
			       const struct bw_disk_update *disks, size_t n_disks) BW_MUST_CHECK;

/*
 * Releases port, held by the fenced job. Returns 0 when it was released now; BW_ENOENT
 * when this job does not hold it (already released: a no-op that says so); BW_EFENCED
 * when the fence is stale (nothing released).
 */
int bw_ledger_release(struct bw_ledger *l, const struct bw_fence *f, int port) BW_MUST_CHECK;

/* Releases every port of the fenced job; stores how many in *released (may be 0). */
int bw_ledger_release_all(struct bw_ledger *l, const struct bw_fence *f, size_t *released)
	BW_MUST_CHECK;

/*
 * The job's port failed to bind (EADDRINUSE): quarantines it for seconds (no job may take
 * it until then) and, in the same transaction, reserves a replacement for the same disk,
 * stored in *replacement. Returns 0; BW_ENOPORTS when no replacement is free (the port is
 * quarantined all the same and the disk holds none); BW_ENOENT when the job does not hold
 * port; BW_EFENCED.
 */
int bw_ledger_quarantine(struct bw_ledger *l, const struct bw_fence *f, int port, int seconds,
			 int *replacement) BW_MUST_CHECK;

/* ---- recovery --------------------------------------------------------------------------- */

struct bw_reaped_disk {
	int64_t key;
	int port;  /* 0: none held */
	pid_t nbd_pid; /* 0: none recorded */
	uint64_t nbd_start_time;
	char *state;
	char *export_name;
	char *qcow2_path;
	bool qcow2_created;
};

struct bw_reaped_job {
	char *job_id;
	enum bw_job_state state;
	int64_t generation; /* the new one, now this worker's */
	char *previous_owner;
	bool boot_changed;  /* the previous owner ran before the host's last boot */
	char *message;      /* the accepted backup.start body */
	int64_t seq;        /* the job's last event seq */
	int64_t created_at_ms; /* when it was claimed (ms since the epoch) */
	bool sna_called;    /* it reached sna_requested once: the SNA may know it */
	struct bw_reaped_disk *disks;
	size_t n_disks;
};

/*
 * Finds the dead workers of this host (their lock can be taken, or their boot id is not
 * the host's) and, in one transaction, removes them and takes over every unfinished job
 * they owned, or whose owner's incarnation is gone, under a new generation owned by this
 * worker. Exactly once: of several workers reaping at the same moment, each job goes to
 * one. Stores the taken jobs in *jobs (free with bw_reaped_free) and their count in *n.
 * Returns 0, BW_EINVAL (not registered), BW_EBUSY, BW_EIO.
 */
int bw_ledger_reap(struct bw_ledger *l, struct bw_reaped_job **jobs, size_t *n) BW_MUST_CHECK;

void bw_reaped_free(struct bw_reaped_job *jobs, size_t n);

/* The body of an event in the outbox by its event_id (published or not): 0 and a malloc'd
 * *body; BW_ENOENT when there is none. */
int bw_ledger_event_body(struct bw_ledger *l, const char *event_id, char **body) BW_MUST_CHECK;

/* ---- outbox ----------------------------------------------------------------------------- */

/* An event that is not yet confirmed by the broker. */
struct bw_outbox_row {
	int64_t id;
	char *event_id;
	char *routing_key;
	char *body;
	int attempts;
};

/* Appends an event that belongs to no job (backup.rejected); a known event_id is a no-op. */
int bw_ledger_outbox_append(struct bw_ledger *l, const struct bw_event *event) BW_MUST_CHECK;

/*
 * Stores in *rows up to max unpublished events with an id above after_id (0: all), oldest
 * first, so each job's in seq order. Returns 0 (n may be 0). Free with bw_outbox_free.
 */
int bw_ledger_outbox_next(struct bw_ledger *l, int64_t after_id, size_t max,
			  struct bw_outbox_row **rows, size_t *n) BW_MUST_CHECK;

/*
 * A known job_id arrived again after its job ended: its terminal event (backup.completed
 * or backup.failed) is made unpublished so the relay sends it again (same event_id).
 * Returns 0 (also when there is none yet).
 */
int bw_ledger_republish_terminal(struct bw_ledger *l, const char *job_id) BW_MUST_CHECK;

/* Marks events confirmed by the broker. */
int bw_ledger_outbox_published(struct bw_ledger *l, const int64_t *ids, size_t n) BW_MUST_CHECK;

/* Counts a failed attempt of one event with its error. */
int bw_ledger_outbox_failed(struct bw_ledger *l, int64_t id, const char *error) BW_MUST_CHECK;

void bw_outbox_free(struct bw_outbox_row *rows, size_t n);

/*
 * For monitoring: how many events are still unpublished and how old the oldest of them
 * is (ms; 0 when none), so a worker can report an event stuck in the outbox.
 */
int bw_ledger_outbox_backlog(struct bw_ledger *l, size_t *count, int64_t *oldest_age_ms)
	BW_MUST_CHECK;

/* ---- monitoring ------------------------------------------------------------------------- */

/* The host's ports now: free in the pool, reserved, quarantined (a live quarantine). */
struct bw_port_counts {
	size_t free;
	size_t reserved;
	size_t quarantined;
};

/* Counts the host's ports (one read, no transaction) into *out. Returns 0, BW_EBUSY, BW_EIO. */
int bw_ledger_port_counts(struct bw_ledger *l, struct bw_port_counts *out) BW_MUST_CHECK;

/*
 * Since the handle was opened: how often its busy handler slept while another process held
 * the write lock (*waits), and how many transactions were run again after staying busy
 * past its bound (*retries).
 */
void bw_ledger_busy_stats(const struct bw_ledger *l, uint64_t *waits, uint64_t *retries);
/* ---- cancels (CONTRACT §2.1) ------------------------------------------------------------- */

/*
 * What the host's ledger did with a backup.cancel that no worker of this process acted on
 * (the table cancels: job_id, reason, received_at_ms, until_ms).
 */
enum bw_cancel_outcome {
	BW_CANCEL_ENDED,       /* the job is terminal here: left as it is, nothing written */
	BW_CANCEL_KNOWN,       /* the job is known and unfinished: recorded for its owner (or the
				  worker that adopts it), kept while the job is unfinished */
	BW_CANCEL_REMEMBERED,  /* unknown here: remembered until until_ms, taken at claim */
	BW_CANCEL_NOT_KEPT,    /* unknown here and memory_s is 0: nothing written */
};

struct bw_cancel_record {
	enum bw_cancel_outcome outcome;
	enum bw_job_state state; /* ENDED, KNOWN: the job's state */
	char owner[129];         /* ENDED, KNOWN: the job's owner (worker id, cut to fit) */
};

/*
 * Records a backup.cancel for job_id with reason ("" for none) in one transaction, as
 * *out says (see above); a job_id already remembered keeps its first reason and the later
 * of the two expiries. memory_s: how long an unknown job_id is remembered (0: not at all).
 * Returns 0, BW_EINVAL (a read-only ledger), BW_EBUSY.
 */
int bw_ledger_cancel_record(struct bw_ledger *l, const char *job_id, const char *reason,
			    int memory_s, struct bw_cancel_record *out) BW_MUST_CHECK;

/*
 * Whether a cancel is recorded for job_id: an unexpired row, or any row of a job that is
 * known and unfinished. Returns 0 with the reason in reason[0..size) (cut to fit),
 * BW_ENOENT when there is none, or a ledger error.
 */
int bw_ledger_cancel_get(struct bw_ledger *l, const char *job_id, char *reason, size_t size)
	BW_MUST_CHECK;

/*
 * Claims job_id and ends it at once because a cancel was remembered for it: the job row
 * (generation 1) with its disks, then failed, then compensated, with events[0..3)
 * (backup.accepted seq 1, backup.failed seq 2, backup.cleanup seq 3) and the cancel's row
 * removed, in one transaction. Returns 0; BW_EEXIST as bw_ledger_claim; BW_ENOENT when the
 * cancel is no longer remembered (expired: nothing changed; claim it the usual way);
 * BW_EINVAL; BW_EBUSY.
 */
int bw_ledger_claim_cancelled(struct bw_ledger *l, const char *job_id, const char *message,
			      const struct bw_job_disk_new *disks, size_t n_disks,
			      const struct bw_event *events, struct bw_known *existing) BW_MUST_CHECK;

/* ---- maintenance ------------------------------------------------------------------------ */

/* Truncates the WAL when no reader needs it (wal_checkpoint(TRUNCATE)); drops expired
 * quarantines and expired cancels (bw_ledger_cancel_record). Cheap enough to call every
 * minute. */
int bw_ledger_maintain(struct bw_ledger *l) BW_MUST_CHECK;

/* ---- retention -------------------------------------------------------------------------- */

/*
 * A retention pass (ledger.retention_days). A job is pruned when it is finished (completed,
 * or failed and compensated), every event of it is published, it holds no port, and it
 * finished (its last state change) more than retention_days before now_ms. Pruned with it:
 * its history, disk rows and outbox rows, and its disks' log files (nbd.h:
 * bw_nbd_log_path, and the check logs) when state_dir is set. Its images are backups and
 * are never touched. The job leaves a tombstone (job id, outcome, end, a hash of its
 * message), so a backup.start with its job_id is still known (bw_ledger_claim: BW_EEXIST
 * with its state and whether the body is the same; its events are gone, so nothing is
 * republished) until BW_PRUNE_TOMBSTONE_FACTOR x retention_days after the job finished;
 * then the tombstone goes too and the job_id is unknown to the ledger: retention bounds
 * the idempotency window. Published events that belong to no job (backup.rejected) go
 * after retention_days as well.
 *
 * The pass never stalls the host's writers: the candidates are read without the write
 * lock, their files removed, then each batch of at most batch jobs (and at most
 * BW_PRUNE_ROWS_BATCH tombstones and job-less events) is removed in one short transaction
 * that re-checks every condition; other writers get the lock between batches. The write
 * lock is waited for at most BW_PRUNE_LOCK_WAIT_MS and never retried: when it is busy the
 * pass stops there (st->skipped) and the next one goes on. At most max_jobs jobs per pass
 * (st->more: the bound was reached, call again soon).
 */
#define BW_PRUNE_BATCH 100          /* jobs per transaction when batch is 0 */
#define BW_PRUNE_PASS_MAX 1000      /* jobs per pass when max_jobs is 0 */
#define BW_PRUNE_ROWS_BATCH 500     /* tombstones and job-less events per transaction */
#define BW_PRUNE_LOCK_WAIT_MS 50    /* the longest wait for the write lock */
#define BW_PRUNE_TOMBSTONE_FACTOR 5 /* a job_id stays known this many retention periods */

struct bw_prune {
	int64_t now_ms;        /* the present, ms since the epoch (tests and benchmarks move it) */
	int retention_days;    /* 1..36500 */
	const char *state_dir; /* where the per-disk logs are (nbd.h); NULL: no files removed */
	size_t batch;          /* jobs per transaction; 0: BW_PRUNE_BATCH */
	size_t max_jobs;       /* jobs per pass; 0: BW_PRUNE_PASS_MAX */
};

struct bw_prune_stats {
	size_t jobs;       /* jobs removed with their history, disks and events */
	size_t events;     /* job-less published events removed */
	size_t tombstones; /* expired tombstones removed */
	size_t files;      /* log files removed */
	size_t txns;       /* write transactions committed */
	int64_t lock_max_us; /* the longest the pass held the write lock (one batch): what it
			      * can have made another writer wait */
	bool more;         /* a bound was reached: more is due now */
	bool skipped;      /* the write lock was busy: the pass stopped early */
};

/*
 * Runs one retention pass as above; fills *st (also when the pass stopped early).
 * Returns 0 (also when skipped), BW_EINVAL (a read-only handle, retention_days out of
 * range), BW_EIO, BW_ENOMEM.
 */
int bw_ledger_prune(struct bw_ledger *l, const struct bw_prune *p, struct bw_prune_stats *st)
	BW_MUST_CHECK;

/* bw-ctl's read-only views (list jobs, ports, workers, show a job): ledger_views.h. */

#endif
