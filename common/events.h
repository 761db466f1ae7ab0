/* events.h: the backup.* events of CONTRACT §4: one typed builder per event, and their vocabularies. */
#ifndef BW_EVENTS_H
#define BW_EVENTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "ledger.h"
#include "message.h"
#include "sna.h"

/* backup.failed reasons (CONTRACT §4): X(name, contract word, retryable). Append only. */
#define BW_FAIL_REASON_MAP(X)                                                                      \
	X(NO_PORTS, "no_ports", true)                                                              \
	X(TARGET_ERROR, "target_error", false)                                                     \
	X(CREDENTIAL_ERROR, "credential_error", false)                                             \
	X(QEMU_NBD_FAILED, "qemu_nbd_failed", true)                                                \
	X(CHECK_FAILED, "check_failed", true)                                                      \
	X(CANCELLED, "cancelled", false)                                                           \
	X(INTERNAL_ERROR, "internal_error", true)                                                  \
	X(SNA_REJECTED, "sna_rejected", false)                                                     \
	X(SNA_UNAVAILABLE, "sna_unavailable", true)                                                \
	X(SNA_FAILED, "sna_failed", true)                                                          \
	X(SNA_LOST_JOB, "sna_lost_job", true)                                                      \
	X(DEADLINE_EXCEEDED, "deadline_exceeded", true)                                            \
	X(WORKER_SHUTDOWN, "worker_shutdown", true)                                                \
	X(WORKER_LOST, "worker_lost", true)

enum bw_fail_reason {
#define BW__FAIL_ENUM(name, text, retryable) BW_FAIL_##name,
	BW_FAIL_REASON_MAP(BW__FAIL_ENUM)
#undef BW__FAIL_ENUM
};

const char *bw_fail_reason_name(enum bw_fail_reason r);
bool bw_fail_reason_retryable(enum bw_fail_reason r);

/* A disk's status in backup.failed: X(name, contract word). */
#define BW_DISK_OUTCOME_MAP(X)                                                                     \
	X(COMPLETED, "completed")     /* finished, flushed, checked, reported */                  \
	X(FAILED, "failed")           /* the SNA reported it failed (or lied about it) */         \
	X(ABORTED, "aborted")         /* it was served but did not complete */                    \
	X(NOT_STARTED, "not_started") /* never served */

enum bw_disk_outcome {
#define BW__OUTCOME_ENUM(name, text) BW_DISK_##name,
	BW_DISK_OUTCOME_MAP(BW__OUTCOME_ENUM)
#undef BW__OUTCOME_ENUM
};

const char *bw_disk_outcome_name(enum bw_disk_outcome o);

/* What compensation did, the actions[].kind of backup.cleanup: X(name, contract word). */
#define BW_ACTION_MAP(X)                                                                           \
	X(QEMU_NBD_STOPPED, "qemu_nbd_stopped")                                                    \
	X(PORT_RELEASED, "port_released")                                                          \
	X(QCOW2_REMOVED, "qcow2_removed")                                                          \
	X(QCOW2_KEPT, "qcow2_kept")                                                                \
	X(SNA_CLEANUP_REQUESTED, "sna_cleanup_requested")                                          \
	X(TLS_KEY_REMOVED, "tls_key_removed")

enum bw_action_kind {
#define BW__ACTION_ENUM(name, text) BW_ACTION_##name,
	BW_ACTION_MAP(BW__ACTION_ENUM)
#undef BW__ACTION_ENUM
};

const char *bw_action_name(enum bw_action_kind k);

/* What every event of one job carries (borrowed). */
struct bw_event_ctx {
	const struct bw_job_spec *spec; /* job_id, vm, policy_id, tags */
	const char *host;
	const char *worker_id;
};

/* A built event, ready for the outbox: malloc'd event_id and body (bw_event_text_free). */
struct bw_event_text {
	char *event_id;
	char *body;
	const char *name; /* static: "backup.started", the routing key */
	int64_t seq;
};

void bw_event_text_free(struct bw_event_text *e);

/* ---- builders ----------------------------------------------------------------------------
 * Each writes one event of CONTRACT §4 into *out: the envelope (schema_version, event,
 * event_id, job_id, seq, occurred_at, host, worker_id, vm, policy_id and tags when present)
 * and the event's own fields. Returns 0, or BW_ENOMEM (*out untouched). Strings are copied
 * as given: text that came from outside must have been bounded and escaped before
 * (bw_text_escape). */

/* backup.accepted, seq 1: backup_type, disk_count. */
int bw_event_accepted(const struct bw_event_ctx *c, struct bw_event_text *out) BW_MUST_CHECK;

struct bw_event_started_disk {
	int64_t key;
	int port;
	const char *export_name;
	const char *nbd_url;
	const char *qcow2_path;
	int64_t pid;
	const char *parent_path; /* NULL: a full disk */
};

/* backup.started: sna_job_id, nbd_targets, disks[] (status "serving"). */
int bw_event_started(const struct bw_event_ctx *c, int64_t seq, const char *sna_job_id,
		     const char *nbd_targets, const struct bw_event_started_disk *disks, size_t n,
		     struct bw_event_text *out) BW_MUST_CHECK;

struct bw_event_progress_disk {
	int64_t key;
	enum bw_sna_status status;
	int64_t bytes_transferred;
	int64_t total_bytes;
};

/* backup.progress, event_id .../backup.progress/<seq>: the sums (saturated at 2^63-1),
 * percent (0-100) and disks[]. */
int bw_event_progress(const struct bw_event_ctx *c, int64_t seq,
		      const struct bw_event_progress_disk *disks, size_t n,
		      struct bw_event_text *out) BW_MUST_CHECK;

/* A finished disk: the fields of backup.disk.completed and of backup.completed's disks[]. */
struct bw_disk_result {
	int64_t key;
	const char *qcow2_path;
	const char *change_id;
	int64_t virtual_size;
	int64_t actual_size;
};

/* backup.disk.completed, event_id .../backup.disk.completed/<key>, check "ok". */
int bw_event_disk_completed(const struct bw_event_ctx *c, int64_t seq,
			    const struct bw_disk_result *d, struct bw_event_text *out) BW_MUST_CHECK;

/* backup.completed: duration_ms and every disk's result. */
int bw_event_completed(const struct bw_event_ctx *c, int64_t seq, int64_t duration_ms,
		       const struct bw_disk_result *disks, size_t n,
		       struct bw_event_text *out) BW_MUST_CHECK;

struct bw_event_failed_disk {
	int64_t key;
	enum bw_disk_outcome status;
	const char *error; /* NULL or "": none */
};

/* backup.failed: stage, reason, message, retryable (from the reason), disks[]. */
int bw_event_failed(const struct bw_event_ctx *c, int64_t seq, enum bw_job_state stage,
		    enum bw_fail_reason reason, const char *message,
		    const struct bw_event_failed_disk *disks, size_t n,
		    struct bw_event_text *out) BW_MUST_CHECK;

struct bw_cleanup_action {
	enum bw_action_kind kind;
	int64_t key; /* 0: none */
	int port;    /* 0: none */
	int64_t pid; /* 0: none */
	const char *path;  /* NULL: none */
	bool ok;
	const char *error; /* NULL or "": none */
};

/* backup.cleanup: actions[] as given; pending[] = every action that failed (kind, key,
 * port, pid, path, error as known): what an operator still has to do. */
int bw_event_cleanup(const struct bw_event_ctx *c, int64_t seq,
		     const struct bw_cleanup_action *actions, size_t n,
		     struct bw_event_text *out) BW_MUST_CHECK;

/*
 * backup.rejected for the raw body and its verdict: event_id "rejected/<FNV-1a 64 of the
 * raw body>", seq 0, job_id only when the body's job_id follows the rule (else null),
 * reason, errors[] one per violated rule, and vm, policy_id and tags echoed only when
 * valid. Returns 0 with malloc'd *body and *event_id, or BW_ENOMEM.
 */
int bw_event_rejected(const char *raw, size_t len, const struct bw_verdict *vd, const char *host,
		      const char *worker_id, char **body, char **event_id) BW_MUST_CHECK;

/* The same for a body known only by its FNV-1a 64 (one dropped unread as too large). */
int bw_event_rejected_hashed(uint64_t raw_fnv1a64, const struct bw_verdict *vd, const char *host,
			     const char *worker_id, char **body, char **event_id) BW_MUST_CHECK;

/*
 * Reads back a backup.disk.completed body this module built (recovery takes a finished
 * disk's result from its event): change_id into change_id[size], the two sizes. Returns 0,
 * or BW_EJSON when the body is not such an event.
 */
int bw_event_disk_completed_read(const char *body, char *change_id, size_t size,
				 int64_t *virtual_size, int64_t *actual_size) BW_MUST_CHECK;

#endif
