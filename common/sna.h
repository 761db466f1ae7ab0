/* sna.h: the SNA's wire format and client (CONTRACT §3): typed requests and replies, calls over the libcurl multi interface. */
#ifndef BW_SNA_H
#define BW_SNA_H

#include <poll.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "metrics.h"
#include "text.h"

/* A reply body larger than this is not an answer (CONTRACT §3.2). */
#define BW_SNA_REPLY_MAX (1 << 20)
/* A change id is at most as long as a previous_change_id may be (CONTRACT §2): 1024 code
 * points of UTF-8, so at most 4096 bytes. */
#define BW_SNA_CHANGE_ID_MAX_CP 1024
#define BW_SNA_CHANGE_ID_SIZE (4 * BW_SNA_CHANGE_ID_MAX_CP + 1)
/* Text of the SNA's (an error, its id for the job) as it may reach a log or an event:
 * escaped (bw_text_escape) and at most BW_TEXT_OUTSIDE_MAX bytes. */
#define BW_SNA_TEXT_SIZE (BW_TEXT_OUTSIDE_MAX + 1)

/* The status vocabulary of a job and of a disk on the SNA (CONTRACT §3.2). */
#define BW_SNA_STATUS_MAP(X)                                                                       \
	X(PENDING, "pending")                                                                      \
	X(RUNNING, "running")                                                                      \
	X(COMPLETED, "completed")                                                                  \
	X(FAILED, "failed")

enum bw_sna_status {
#define BW__SNA_STATUS_ENUM(name, text) BW_SNA_##name,
	BW_SNA_STATUS_MAP(BW__SNA_STATUS_ENUM)
#undef BW__SNA_STATUS_ENUM
};

/* The contract's word for a status ("running"). */
const char *bw_sna_status_name(enum bw_sna_status s);

/* ---- the start request (§3.1) -------------------------------------------------------------- */

/* One disk of the start request (borrowed strings). */
struct bw_sna_target {
	int64_t key;
	int64_t size_bytes;
	int port;
	const char *export_name;        /* [A-Za-z0-9._-] only */
	const char *previous_change_id; /* NULL or "" for a disk backed up full */
};

/* Everything the one start request of a job says (borrowed strings). */
struct bw_sna_start_request {
	const char *job_id;
	const char *vm_name;
	const char *vm_path;
	const char *vcenter_host;
	const char *vcenter_user;
	const char *vcenter_password;
	bool incremental;
	const char *nbd_host; /* nbd.advertise_host: a name, IPv4 or IPv6 address */
	const struct bw_sna_target *disks;
	size_t n_disks;
	/* exports served with TLS: nbds:// URLs, and the body carries nbd_tls {mode "psk",
	 * identity BW_PSK_IDENTITY, psk: tls_psk, the job's 64 hex digits} (CONTRACT §3.1) */
	bool tls;
	const char *tls_psk;
};

/* The NBD URL of one export, "nbd://host:port/export" ("nbds://" with tls; [host] for
 * IPv6), into out[size]. */
void bw_sna_nbd_url(char *out, size_t size, const char *host, int port, const char *export_name,
		    bool tls);

/*
 * The nbd_targets string of a request: "<key>:<nbd URL>" per disk in order, comma-separated.
 * Returns a malloc'd string in *out (caller frees), or BW_ENOMEM.
 */
int bw_sna_targets(const struct bw_sna_start_request *r, char **out) BW_MUST_CHECK;

/* ---- replies ---------------------------------------------------------------------------- */

/* What the job's own disks are, to read a progress reply against (CONTRACT §3.2). */
struct bw_sna_disk_ref {
	int64_t key;
	int64_t size_bytes;
	bool full; /* backed up full: a completed disk's total_bytes must be size_bytes */
};

/* One disk of a counted progress reply. */
struct bw_sna_disk_progress {
	int64_t key; /* one of the job's keys, at most once per reply */
	enum bw_sna_status status;
	int64_t bytes_transferred; /* 0 - 2^63-1 */
	int64_t total_bytes;       /* 0 - 2^63-1 */
	/* status COMPLETED: true when the reply proves it (a change id, bytes_transferred ==
	 * total_bytes, a full disk's total_bytes == its size); else why[] says what is missing */
	bool proven;
	char why[160];
	char change_id[BW_SNA_CHANGE_ID_SIZE]; /* valid UTF-8, no control characters, maybe "" */
};

/* A progress reply that counts as an answer: exactly the documented types. */
struct bw_sna_progress {
	enum bw_sna_status status;
	char error[BW_SNA_TEXT_SIZE]; /* escaped, bounded; "" when none */
	size_t n_disks;
	struct bw_sna_disk_progress disks[]; /* in reply order; keys among the job's */
};

/*
 * Reads body[0..len) as a progress reply for a job whose disks are disks[0..n). Returns 0
 * and a new reply in *out (free with free()), or BW_ESNA when it does not count as an
 * answer (not one JSON object of the documented types, a status outside the vocabulary, a
 * byte count outside 0 - 2^63-1, a key not the job's or twice, a change id that is not a
 * string of at most 1024 code points without control characters, over BW_SNA_REPLY_MAX)
 * with a short reason in why[whysz], or BW_ENOMEM.
 */
int bw_sna_progress_parse(const char *body, size_t len, const struct bw_sna_disk_ref *disks,
			  size_t n, struct bw_sna_progress **out, char *why,
			  size_t whysz) BW_MUST_CHECK;

/*
 * Reads the start reply's body: the status decided already; the body only names the SNA's
 * id for the job. Writes into id[BW_SNA_TEXT_SIZE] the body's "job_id" when it is a
 * non-empty string of at most BW_TEXT_OUTSIDE_MAX bytes of UTF-8 without control
 * characters, else job_id (CONTRACT §3.1). Returns true when the body named one.
 */
bool bw_sna_start_reply_parse(const char *body, size_t len, const char *job_id, char *id);

/*
 * Reads the cleanup reply's body (the status decided already): its "error" or "message"
 * string, escaped and bounded, into text[BW_SNA_TEXT_SIZE] ("" when none). Returns true
 * when there was one.
 */
bool bw_sna_cleanup_reply_parse(const char *body, size_t len, char *text);

/* ---- the client ------------------------------------------------------------------------- */

struct bw_sna_opts {
	const char *url;   /* base, e.g. http://127.0.0.1:8081 (no trailing slash needed) */
	const char *token; /* Bearer token; NULL or "" for none */
	int connect_timeout_s;
	int timeout_s; /* the whole exchange, connection included */
	int max_attempts;
	int backoff_base_ms;
	int backoff_cap_s;
	const char *tls_ca_file;   /* https: verify the SNA with this CA; NULL or "": the system's */
	const char *tls_cert_file; /* https: present this client certificate; NULL or "": none */
	const char *tls_key_file;
	/* every HTTP request counted by call and outcome, with its duration (borrowed; NULL:
	 * none): bw_sna_requests_total, bw_sna_request_duration_seconds */
	struct bw_metrics *metrics;
};

/* How a call ended: X(name, word for metrics and logs). */
#define BW_SNA_OUTCOME_MAP(X)                                                                      \
	X(OK, "ok")                   /* 2xx (start: or 409, already known there = accepted) */   \
	X(REJECTED, "rejected")       /* a 4xx other than 409 (start) / 404 (progress, cleanup) */ \
	X(NOT_FOUND, "not_found")     /* progress: 404 */                                         \
	X(UNAVAILABLE, "unavailable") /* 5xx, timeouts, connection errors (start, cleanup: after  \
					 every attempt) */                                        \
	X(UNREADABLE, "unreadable")   /* progress: a 2xx whose body is not an answer */

enum bw_sna_outcome {
#define BW__SNA_OUTCOME_ENUM(name, text) BW_SNA_##name,
	BW_SNA_OUTCOME_MAP(BW__SNA_OUTCOME_ENUM)
#undef BW__SNA_OUTCOME_ENUM
};

/* The outcome's word ("unavailable"), static. */
const char *bw_sna_outcome_name(enum bw_sna_outcome o);

/* What a call ended with; valid during the callback only. */
struct bw_sna_result {
	enum bw_sna_outcome outcome;
	int http_status; /* of the last response; 0 when none came */
	int attempts;
	/* for logs and events: the transport error, the status line with the start of a
	 * rejecting body, or why a reply is unreadable; escaped and bounded */
	char error[BW_SNA_TEXT_SIZE];
	char sna_job_id[BW_SNA_TEXT_SIZE];      /* start, OK: the SNA's id for the job */
	const struct bw_sna_progress *progress; /* progress, OK: the counted reply */
};

typedef void (*bw_sna_done_cb)(void *arg, const struct bw_sna_result *r);

struct bw_sna;
struct bw_sna_call;

int bw_sna_new(struct bw_sna **out, const struct bw_sna_opts *o) BW_MUST_CHECK;
/* Frees the client and cancels every call in progress (their callbacks are not called). */
void bw_sna_free(struct bw_sna *s);

/*
 * POST /api/v1/backup/start with the body of r (built in memory the call owns and wipes:
 * it holds the vCenter password), Idempotency-Key: job_id, the token, retried on 5xx,
 * timeouts and connection errors with full jitter (bw_backoff_ms) up to max_attempts
 * requests in all, always with the same key; 200/202/409 = OK; another 4xx ends at once
 * (REJECTED). cb runs once, from bw_sna_perform. *call (may be NULL) identifies it for
 * bw_sna_cancel. Returns 0, BW_EINVAL (a job_id outside the safe alphabet, tls without a
 * key), BW_EPERM (a key
 * would travel in plain http to an SNA that is not on loopback: CONTRACT §3.1) or BW_ENOMEM.
 * No proxy is ever used (the environment's http_proxy and the like are ignored).
 */
int bw_sna_start(struct bw_sna *s, const struct bw_sna_start_request *r, bw_sna_done_cb cb,
		 void *arg, struct bw_sna_call **call) BW_MUST_CHECK;

/* GET /api/v1/progress/<job_id>, one attempt (the caller polls again); the reply is read
 * against disks[0..n) (copied). */
int bw_sna_progress(struct bw_sna *s, const char *job_id, const struct bw_sna_disk_ref *disks,
		    size_t n, bw_sna_done_cb cb, void *arg, struct bw_sna_call **call) BW_MUST_CHECK;

/* POST /api/v1/cleanup {"job_id", "action": "cleanup_all"}: retried like start; 2xx or 404
 * is OK (404: nothing left there). */
int bw_sna_cleanup(struct bw_sna *s, const char *job_id, bw_sna_done_cb cb, void *arg,
		   struct bw_sna_call **call) BW_MUST_CHECK;

/* Forgets a call in progress: its callback will not run. */
void bw_sna_cancel(struct bw_sna *s, struct bw_sna_call *call);

/* Calls in progress (transfers and retries waiting). */
size_t bw_sna_active(const struct bw_sna *s);

/*
 * Event-loop integration: bw_sna_pollfds fills at most max entries with the sockets curl
 * waits on and returns how many; bw_sna_timeout_ms says how long the loop may sleep (-1:
 * no limit); bw_sna_perform drives the transfers and retries and runs the callbacks.
 */
int bw_sna_pollfds(struct bw_sna *s, struct pollfd *fds, int max);
int bw_sna_timeout_ms(struct bw_sna *s);
void bw_sna_perform(struct bw_sna *s);

#endif
