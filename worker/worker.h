/* worker.h: the worker process: its event loop and the job state machine it drives. */
#ifndef BW_WORKER_H
#define BW_WORKER_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "amqp.h"
#include "config.h"
#include "events.h"
#include "http.h"
#include "ledger.h"
#include "message.h"
#include "metrics.h"
#include "nbd.h"
#include "relay.h"
#include "sna.h"

struct job;
struct forwards;

/*
 * Runs the worker of cfg until it is stopped (SIGTERM/SIGINT) or drained (SIGUSR1): sets
 * up (ledger registration, broker links, a first recovery pass), then the event loop.
 * Returns the process's exit status: 0 after a stop or a drain, 1 when the set-up failed.
 */
int worker_run(const struct bw_config *cfg);

struct worker {
	const struct bw_config *cfg;
	char host[256];
	struct bw_ledger *ledger;
	struct bw_sna *sna;
	struct bw_amqp_topology topology;
	struct bw_amqp_link consumer;
	struct bw_amqp_link publisher;
	struct bw_relay *relay;
	struct job *jobs;
	int n_jobs;
	bool stopping;   /* SIGTERM/SIGINT: no new jobs, wind down */
	bool draining;   /* SIGUSR1: no new jobs, every running one runs to its end */
	bool consuming;  /* the consumer link is wanted */
	int64_t last_maintain_ms;
	int64_t last_heartbeat_ms;
	int64_t last_recovery_ms;
	/* monitoring (monitor.c): the registry, the metrics.listen listener (NULL: off) and
	 * /healthz's cached ledger write */
	struct bw_metrics *metrics;
	struct bw_http *http;
	int64_t health_checked_ms;
	int health_ledger_rc;
	int64_t last_cancel_check_ms; /* control_step */
	/* placement (forward.c): this host's repository ids for the topology, and the forwards
	   of backup.start messages whose repository it lacks, until their confirms */
	const char **repository_ids;
	struct forwards *forwards;
};

/* A disk of a job in memory (the ledger holds the durable copy). */
struct job_disk {
	int64_t key;
	int64_t size_bytes;
	const char *parent_path; /* borrowed from the spec */
	const char *previous_change_id;
	int port;
	char export_name[200];
	char qcow2_path[4096];
	char nbd_url[512];
	char log_path[4096];
	struct bw_nbd nbd;
	bool created;   /* this job created its image */
	enum { FIN_NONE, FIN_STOPPING, FIN_CHECKING } fin; /* finalizing: where this disk is */
	pid_t check_pid;  /* qemu-img check still running */
	int64_t check_by_ms;
	bool spawned;   /* a qemu-nbd was started */
	bool completed; /* finished, flushed, checked, reported */
	bool failed;    /* the SNA reported it failed */
	bool stop_done; /* compensation stopped its server (result in stop_rc, stop_error) */
	int stop_rc;
	char stop_error[300];
	enum bw_sna_status status; /* the SNA's last word on it */
	int64_t bytes;
	int64_t total;
	int64_t virtual_size; /* of the finished image */
	int64_t actual_size;
	char change_id[BW_SNA_CHANGE_ID_SIZE];
	char error[BW_SNA_TEXT_SIZE + 64]; /* bounded: it may quote the SNA */
};

struct job {
	struct worker *w;
	struct bw_job_spec *spec;
	char *message; /* the accepted body */
	int64_t generation;
	int64_t seq;
	enum bw_job_state state;
	struct bw_fence fence;
	struct bw_event_ctx ctx;
	struct job_disk *disks;
	size_t n_disks;
	const char *repository;
	char vm_dir[96];

	int64_t claimed_ms;
	int64_t ports_until_ms;  /* waiting_ports gives up then */
	int64_t next_try_ms;     /* next port attempt / progress poll */
	int64_t deadline_ms;     /* the transfer deadline */
	int64_t progress_sent_ms;
	uint64_t progress_sig; /* of the counts the last backup.progress reported */
	struct bw_sna_call *call;
	bool tls;         /* its exports are served with TLS and a key of its own */
	bool key_made;    /* that key was made by this worker */
	bool sna_called;  /* a start request may have been accepted */
	/* the SNA's patience, for a running job and an adopting one alike: */
	int lost;         /* consecutive progress 404s */
	int unanswered;   /* consecutive progress polls that were no answer (§3.2) */
	bool done;        /* terminal and compensated, or handed over: free it */
	bool adopting;    /* taken over from a dead worker: waiting for the SNA's word */

	/* a failure the SNA reported while disks were finalizing: failed once they are done */
	bool deferred;
	char deferred_message[BW_SNA_TEXT_SIZE + 128]; /* bounded: it may quote the SNA */

	/* failure being compensated */
	enum bw_fail_reason reason;
	enum bw_job_state stage;
	char fail_message[BW_SNA_TEXT_SIZE + 256];
	bool cleanup_wanted; /* ask the SNA to clean up */
	bool cleanup_done;
	bool cleanup_failed;
	char cleanup_error[BW_SNA_TEXT_SIZE];

	/* what monitor_job saw last: the state, and since when (mono ms; 0: unknown) */
	bool seen;
	enum bw_job_state seen_state;
	int64_t seen_since_ms;

	struct job *next;
};

/* Handles one backup.start delivery: reject (a too_large one unread), ignore a known
 * job_id, or claim and start it. Returns 0 (ack), BW_EMESSAGE (rejected: nack without
 * requeue), or a transient error (the delivery is left unacked; the broker redelivers it
 * later).
 * Placement (CONTRACT §2): when forward_to is not NULL and the message is valid but names
 * a repository this host lacks, nothing is claimed or rejected and the host rules are left
 * to the host that has it: returns 0 with *forward_to set to the repository id (malloc'd;
 * the caller forwards the delivery and frees it). With forward_to NULL (a delivery of a
 * per-repository queue, or a forward that came back unroutable) such a message is
 * rejected unknown_repository. */
int job_receive(struct worker *w, const struct bw_delivery *d, char **forward_to);

/*
 * The repository a valid backup.start names when this host lacks it (malloc'd in *forward_to,
 * caller frees), else NULL: whether it is to be forwarded. Returns 0 or BW_ENOMEM.
 */
int job_placement(struct worker *w, const struct bw_delivery *d, char **forward_to);

/* ---- forward.c: placement (CONTRACT §2) ---- */

/*
 * Settles a backup.start delivery of the live consumer link by job_receive's answer rc: 0
 * ack, BW_EMESSAGE reject (to the DLQ), anything else given back to the queue. A lost
 * connection takes the link down.
 */
void delivery_settle(struct worker *w, const struct bw_delivery *d, int rc);

/* Makes w->forwards and registers its confirm callback with the relay. Returns 0 or -1. */
int forward_open(struct worker *w);
/* Frees what is left (unacked originals go back to the queue with the connection). */
void forward_close(struct worker *w);

/*
 * Takes d (its contents are the forward's now; *d is cleared) from backup.start, to be
 * published to the jobs exchange with routing key bw_amqp_repo_queue(repository_id),
 * persistent, mandatory, confirmed. The original is acked only on a confirm with no
 * return; an unroutable one is rejected unknown_repository (job_receive without
 * forwarding); a nack or a lost publisher connection gives it back to the queue.
 * Returns 0 or BW_ENOMEM (d untouched then).
 */
int forward_start(struct worker *w, struct bw_delivery *d, const char *repository_id)
	BW_MUST_CHECK;

/*
 * Publishes the forwards waiting for the publisher (not while it is blocked) and settles the
 * confirmed ones on the consumer link. Call it after bw_relay_step. BW_EAMQP when a confirm
 * is overdue (drop the publisher link, then forward_lost), else 0.
 */
int forward_step(struct worker *w) BW_MUST_CHECK;

/* The publisher link was lost: every forward sent and not confirmed is given back. */
void forward_lost(struct worker *w);

/* Forwards not settled yet. */
size_t forward_pending(const struct worker *w);

/* Advances every job as far as it can without waiting. */
void jobs_step(struct worker *w);

/* The time until some job wants to run again (ms; -1 none). */
int jobs_timeout_ms(struct worker *w);

/*
 * SIGTERM: jobs still preparing fail with reason worker_shutdown (compensating), jobs whose
 * SNA call was made are handed over (job_hand_over), failed jobs go on compensating.
 */
void jobs_shutdown(struct worker *w);

/* Leaves a running job to the next recovery pass: nothing is stopped or released, the
 * ledger still names this worker, whose exit lets another one adopt the job. */
void job_hand_over(struct job *j);

/* ---- for recover.c ---- */

/* A job in memory for spec (taken, freed on failure) and its accepted body; NULL: no memory. */
struct job *job_build(struct worker *w, struct bw_job_spec *spec, const char *body, size_t len);
void job_enqueue(struct worker *w, struct job *j);
struct job_disk *job_disk_by_key(struct job *j, int64_t key);
void job_free(struct job *j);

/* backup.failed now (stage, reason, per-disk status); the compensation follows in the loop. */
void job_fail(struct job *j, enum bw_fail_reason reason, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/*
 * A job of a dead worker that the SNA may still run: the loop asks the SNA with a running
 * job's patience and adopts it (every disk still to come has its server) or compensates it.
 */
void job_adopt(struct job *j);

/*
 * A backup.cancel for a job of this worker (CONTRACT §2.1): backup.failed with reason
 * cancelled and the reason (bounded, escaped) in its message, then the compensation of
 * any failure (the SNA's cleanup call once the start may have been accepted). Returns
 * false, changing nothing, when the job is already ending (failed, or every disk completed),
 * ended or handed over.
 */
bool job_cancel(struct job *j, const char *reason);

/* ---- control.c: backup.cancel ---- */

/*
 * Handles one delivery of the worker's own backup.control queue: an invalid cancel is
 * logged and dropped; a valid one ends this worker's job (job_cancel), or is recorded in
 * the host's ledger (bw_ledger_cancel_record). Returns 0 (ack: also after an invalid
 * one) or a transient ledger error (give it back).
 */
int control_receive(struct worker *w, const struct bw_delivery *d);

/*
 * Ends the jobs of this worker for which the ledger holds a cancel (recorded by another
 * worker of the host, or before a dead owner's job was adopted), at most once per
 * CANCEL_CHECK_MS.
 */
void control_step(struct worker *w, int64_t now);

/* Fault injection for the crash tests (BW_CRASH_AT, see job.c). */
void crash_point(const char *point, size_t index);

/* Takes over the jobs of this host's dead workers: adopts, resumes or compensates them. */
void recover_pass(struct worker *w);

/* ---- monitor.c: /metrics and /healthz ---- */

/*
 * Makes the worker's metrics registry and, when metrics.listen is set, opens its listener
 * (logging the address). Returns 0, or -1 with the reason logged (a port taken is a
 * start-up error naming metrics.listen).
 */
int monitor_open(struct worker *w);
/* Closes the listener and frees the registry. Safe after a failed or no monitor_open. */
void monitor_close(struct worker *w);

/*
 * Records what changed in j since the last call: the time it spent in the state it left
 * (per stage), its start latency (claimed -> the SNA accepted), its outcome and duration
 * when it completed or failed. Call it whenever j may have moved.
 */
void monitor_job(struct job *j);


#endif
