/* job.c: one VM backup: claim, all ports, all images, all servers, ONE SNA call, the transfer, results or compensation. */
#include "worker.h"

#include "cancel.h"
#include "cgroup.h"
#include "child.h"
#include "clock.h"
#include "credentials.h"
#include "log.h"
#include "psk.h"
#include "target.h"
#include "text.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* how often a job waiting for ports asks the ledger again */
#define PORT_RETRY_MS 1000
/* a port someone else holds is left alone this long before it is tried again */
#define QUARANTINE_S 300
/* backup.progress at most this often: consumers want a pulse, not a stream */
#define PROGRESS_EVENT_MS 5000
/* every qemu-nbd of a job must greet within this (it starts in milliseconds) */
#define NBD_READY_MS 30000
/* a finishing qemu-nbd flushes its image on exit; a large dirty cache takes time */
#define NBD_STOP_MS 60000
/* qemu-img check of a multi-TiB image reads every L2 table */
#define CHECK_MS 600000
/* a request that could not even be handed to curl is tried again after this */
#define SNA_RETRY_MS 1000
/* an image is read by the hub's group (restores), written by the worker alone */
#define IMAGE_MODE 0640
/* a job in serving probes its servers' greetings this often */
#define GREETING_POLL_MS 2
/* a job stopping or awaiting children looks at them this often (SIGCHLD wakes it sooner) */
#define CHILDREN_POLL_MS 20
/* steps one job takes per loop turn before the next job's turn: each is short */
#define STEPS_PER_TURN 8
/* the events one transition commits (each one today; room for a pair) */
#define BATCH_MAX 4
/* compensation's actions: a stop, a port and an image per disk, the key, the SNA's cleanup */
#define ACTIONS_MAX (3 * BW_MESSAGE_MAX_DISKS + 2)

/*
 * Fault injection for the crash tests: BW_CRASH_AT=<point>[:<n>] makes the worker SIGKILL
 * itself the n-th time (default 1) it passes <point>, or when index (a disk's position in
 * the job, from 1) is n. Points are named where they are called; unset, it costs a compare.
 */
void crash_point(const char *point, size_t index)
{
	static const char *spec;
	static bool read;
	static unsigned passed;
	if (!read) {
		spec = getenv("BW_CRASH_AT");
		read = true;
	}
	if (spec == NULL)
		return;
	size_t n = strlen(point);
	if (strncmp(spec, point, n) != 0 || (spec[n] != '\0' && spec[n] != ':'))
		return;
	unsigned want = spec[n] == ':' ? (unsigned)strtoul(spec + n + 1, NULL, 10) : 1;
	if (index ? index != want : ++passed != want)
		return;
	bw_log_warnx("crash point %s reached (BW_CRASH_AT=%s): SIGKILL", point, spec);
	raise(SIGKILL);
}

/* ---- events -------------------------------------------------------------------------- */

/* Events built for one transition: seq follows on from the job's. */
struct batch {
	struct job *j;
	struct bw_event_text ev[BATCH_MAX];
	size_t n;
	bool failed; /* a builder ran out of memory: the commit fails */
	const struct bw_disk_update *disks; /* disk rows written in the same transaction */
	size_t n_disks;
};

#define BATCH(job) {(job), {{0}}, 0, false, NULL, 0}

/* The seq of the next event of the batch. */
static int64_t next_seq(const struct batch *b)
{
	return b->j->seq + 1 + (int64_t)b->n;
}

/* The slot the next builder writes into (the last one again when full: counted as failed). */
static struct bw_event_text *slot(struct batch *b)
{
	return &b->ev[b->n < BATCH_MAX ? b->n : BATCH_MAX - 1];
}

/* Takes what a builder returned into the batch. */
static void keep(struct batch *b, int rc)
{
	if (rc != 0 || b->n == BATCH_MAX)
		b->failed = true;
	else
		b->n++;
}

/* Commits the move to state with the batch's events in one ledger transaction. */
static int commit(struct batch *b, enum bw_job_state state, const char *last_error)
{
	struct job *j = b->j;
	struct bw_event events[BATCH_MAX];
	for (size_t i = 0; i < b->n; i++)
		events[i] = (struct bw_event){b->ev[i].event_id, b->ev[i].name, b->ev[i].seq,
					      b->ev[i].body};
	int rc = b->failed ? BW_ENOMEM
			   : bw_ledger_transition_disks(j->w->ledger, &j->fence, state, last_error,
							events, b->n, b->disks, b->n_disks);
	for (size_t i = 0; i < b->n; i++)
		bw_event_text_free(&b->ev[i]);
	if (rc == 0) {
		j->seq += (int64_t)b->n;
		j->state = state;
	} else {
		bw_log_warnx("job=%s ledger: cannot move to %s: %s (%s)", j->spec->job_id,
			     bw_job_state_name(state), bw_strerror(rc),
			     bw_ledger_errmsg(j->w->ledger));
	}
	b->n = 0;
	b->failed = false;
	return rc;
}

/* Copies src into dst[size], cut when longer. */
static void copy_text(char *dst, size_t size, const char *src)
{
	size_t n = strlen(src);
	if (n >= size)
		n = size - 1;
	memcpy(dst, src, n);
	dst[n] = '\0';
}

/* ---- failure and compensation -------------------------------------------------------- */

static enum bw_disk_outcome disk_outcome(const struct job_disk *d)
{
	if (d->completed)
		return BW_DISK_COMPLETED;
	if (d->failed)
		return BW_DISK_FAILED;
	return d->spawned ? BW_DISK_ABORTED : BW_DISK_NOT_STARTED;
}

/*
 * The job cannot complete: backup.failed now (stage, reason, per-disk status), then the
 * compensation runs in step() and ends with backup.cleanup.
 */
void job_fail(struct job *j, enum bw_fail_reason reason, const char *fmt, ...)
{
	if (j->state == BW_JOB_FAILED || j->state == BW_JOB_COMPENSATED ||
	    j->state == BW_JOB_COMPLETED)
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(j->fail_message, sizeof(j->fail_message), fmt, ap);
	va_end(ap);
	j->reason = reason;
	j->stage = j->state;
	j->adopting = false;
	j->cleanup_wanted = j->sna_called && reason != BW_FAIL_SNA_REJECTED;
	bw_log_warnx("job=%s failed in %s: %s: %s", j->spec->job_id, bw_job_state_name(j->stage),
		     bw_fail_reason_name(reason), j->fail_message);

	struct bw_event_failed_disk disks[BW_MESSAGE_MAX_DISKS];
	for (size_t i = 0; i < j->n_disks; i++)
		disks[i] = (struct bw_event_failed_disk){j->disks[i].key, disk_outcome(&j->disks[i]),
							 j->disks[i].error};
	struct batch b = BATCH(j);
	keep(&b, bw_event_failed(&j->ctx, next_seq(&b), j->stage, reason, j->fail_message, disks,
				 j->n_disks, slot(&b)));
	if (commit(&b, BW_JOB_FAILED, bw_fail_reason_name(reason)) != 0)
		j->state = BW_JOB_FAILED; /* compensate all the same; the ledger retries later */
	crash_point("failed", 0);
	if (j->call) {
		bw_sna_cancel(j->w->sna, j->call);
		j->call = NULL;
	}
}

/* Disk d makes the job fail: its error kept for backup.failed's disks[], then job_fail. */
static void fail_disk(struct job *j, struct job_disk *d, enum bw_fail_reason reason,
		      const char *what, const char *err)
{
	copy_text(d->error, sizeof(d->error), err);
	job_fail(j, reason, "disk %" PRId64 ": %s%s", d->key, what, err);
}

/* ---- cancel (CONTRACT §2.1) --------------------------------------------------------------- */

/* A cancel's reason fit for a message and a log line: bounded, never cut in a character. */
static void cancel_message(char *dst, size_t size, const char *what, const char *reason)
{
	char r[BW_TEXT_OUTSIDE_MAX + 1];
	bw_text_escape(r, sizeof(r), reason, strlen(reason));
	snprintf(dst, size, "%s%s%s", what, r[0] ? ": " : "", r);
}

bool job_cancel(struct job *j, const char *reason)
{
	if (j->done || j->state == BW_JOB_FAILED || j->state == BW_JOB_COMPENSATED ||
	    j->state == BW_JOB_COMPLETED)
		return false;
	size_t completed = 0;
	for (size_t i = 0; i < j->n_disks; i++)
		completed += j->disks[i].completed;
	if (completed == j->n_disks)
		return false; /* every disk is finished and reported: backup.completed comes next */
	char msg[BW_TEXT_OUTSIDE_MAX + 64];
	cancel_message(msg, sizeof(msg), "backup.cancel received", reason);
	/* as any failure: before the SNA start, a roll-back; after it (sna_called), the
	   cleanup call stops the copy; completed disks stay completed and kept */
	job_fail(j, BW_FAIL_CANCELLED, "%s", msg);
	return true;
}

/*
 * A remembered cancel found at claim (bw_ledger_claim said BW_ECANCELREC): the job is
 * claimed and ended in one transaction: backup.accepted, backup.failed (stage claimed,
 * reason cancelled, every disk not_started) and an empty backup.cleanup; no port, no file,
 * no SNA call. Returns 0; BW_EEXIST (known meanwhile, *existing set); BW_ENOENT when the
 * cancel expired meanwhile (claim the usual way); a ledger or memory error.
 */
static int claim_cancelled(struct job *j, const struct bw_event *accepted,
			   const struct bw_job_disk_new *nd, struct bw_known *existing)
{
	char reason[BW_CANCEL_REASON_MAX * 4 + 1];
	struct bw_event_text ev[2] = {{0}, {0}};
	int rc = bw_ledger_cancel_get(j->w->ledger, j->spec->job_id, reason, sizeof(reason));
	if (rc != 0)
		return rc;
	cancel_message(j->fail_message, sizeof(j->fail_message), "cancelled before it started",
		       reason);
	struct bw_event_failed_disk disks[BW_MESSAGE_MAX_DISKS];
	for (size_t i = 0; i < j->n_disks; i++)
		disks[i] = (struct bw_event_failed_disk){j->disks[i].key, BW_DISK_NOT_STARTED, NULL};
	if ((rc = bw_event_failed(&j->ctx, 2, BW_JOB_CLAIMED, BW_FAIL_CANCELLED, j->fail_message,
				  disks, j->n_disks, &ev[0])) == 0 &&
	    (rc = bw_event_cleanup(&j->ctx, 3, NULL, 0, &ev[1])) == 0) {
		struct bw_event events[3] = {
			*accepted,
			{ev[0].event_id, ev[0].name, ev[0].seq, ev[0].body},
			{ev[1].event_id, ev[1].name, ev[1].seq, ev[1].body},
		};
		rc = bw_ledger_claim_cancelled(j->w->ledger, j->spec->job_id, j->message, nd,
					       j->n_disks, events, existing);
	}
	bw_event_text_free(&ev[0]);
	bw_event_text_free(&ev[1]);
	if (rc == 0)
		bw_log_info("job=%s cancel: accepted and failed at once (stage claimed), as a cancel "
			    "was remembered for it: %s; no port, file or SNA call",
			    j->spec->job_id, j->fail_message);
	return rc;
}

static void cleanup_done_cb(void *arg, const struct bw_sna_result *r)
{
	struct job *j = arg;
	j->call = NULL;
	j->cleanup_done = true;
	j->cleanup_failed = r->outcome != BW_SNA_OK;
	snprintf(j->cleanup_error, sizeof(j->cleanup_error), "%s", r->outcome == BW_SNA_OK ? "" : r->error);
}

/* Ends a helper child (qemu-img) that is no longer wanted; true once it is reaped. */
static bool end_child(pid_t *pid)
{
	if (*pid <= 0)
		return true;
	kill(*pid, SIGKILL);
	pid_t r = waitpid(*pid, NULL, WNOHANG);
	if (r == *pid || (r < 0 && errno == ECHILD)) {
		*pid = 0;
		return true;
	}
	return false;
}

/*
 * Stops what still runs (servers, qemu-img check) without waiting; true once nothing does.
 * Called again from the loop until then.
 */
static bool stop_children(struct job *j)
{
	bool idle = true;
	for (size_t i = 0; i < j->n_disks; i++) {
		struct job_disk *d = &j->disks[i];
		if (!end_child(&d->check_pid))
			idle = false;
		if (d->spawned && !d->stop_done && (!d->nbd.exited || d->nbd.stopping)) {
			/* an image being removed may be killed after a grace; a kept one never */
			int rc = bw_nbd_stop_step(&d->nbd, d->completed ? BW_NBD_KEEP : BW_NBD_DISCARD,
						  NBD_STOP_MS, d->stop_error, sizeof(d->stop_error));
			if (rc == BW_EBUSY) {
				idle = false;
				continue;
			}
			d->stop_done = true;
			d->stop_rc = rc;
		}
	}
	return idle;
}

/* Undoes what the job did, in reverse order, then backup.cleanup. Idempotent. */
static void compensate(struct job *j)
{
	struct worker *w = j->w;
	if (j->cleanup_wanted && !j->cleanup_done && j->call == NULL &&
	    bw_sna_cleanup(w->sna, j->spec->job_id, cleanup_done_cb, j, &j->call) != 0) {
		j->cleanup_done = true;
		j->cleanup_failed = true;
		snprintf(j->cleanup_error, sizeof(j->cleanup_error), "cannot send the request");
	}
	/* the servers stop while the SNA cleans up; the event waits for both */
	if (!stop_children(j)) {
		crash_point("compensating", 0);
		return;
	}
	if (j->cleanup_wanted && !j->cleanup_done)
		return;

	struct bw_cleanup_action a[ACTIONS_MAX];
	char rm_error[BW_MESSAGE_MAX_DISKS][200]; /* why an image could not be removed */
	size_t n = 0;
	for (size_t i = 0; i < j->n_disks; i++) {
		struct job_disk *d = &j->disks[i];
		if (d->stop_done) {
			/* the goal is a server that no longer runs: one that ended badly on its
			 * way out is stopped all the same (how it ended is in the log) */
			bool ok = d->stop_rc == 0 || d->nbd.exited;
			if (d->stop_rc != 0)
				bw_log_warnx("job=%s disk=%" PRId64 " stopping qemu-nbd: %s",
					     j->spec->job_id, d->key, d->stop_error);
			a[n++] = (struct bw_cleanup_action){BW_ACTION_QEMU_NBD_STOPPED, d->key, 0,
							    d->nbd.pid, NULL, ok,
							    ok ? NULL : d->stop_error};
		}
		bw_nbd_release(&d->nbd);
	}
	for (size_t i = 0; i < j->n_disks; i++) {
		struct job_disk *d = &j->disks[i];
		if (d->port == 0)
			continue;
		int rc = bw_ledger_release(w->ledger, &j->fence, d->port);
		bool ok = rc == 0 || rc == BW_ENOENT;
		a[n++] = (struct bw_cleanup_action){BW_ACTION_PORT_RELEASED, d->key, d->port, 0, NULL,
						    ok, ok ? NULL : bw_strerror(rc)};
		d->port = 0;
	}
	size_t stray = 0; /* a port the job held but no disk in memory knew of */
	if (bw_ledger_release_all(w->ledger, &j->fence, &stray) == 0 && stray > 0)
		bw_log_warnx("job=%s released %zu more port(s) of the ledger", j->spec->job_id, stray);
	for (size_t i = 0; i < j->n_disks; i++) {
		struct job_disk *d = &j->disks[i];
		if (!d->created)
			continue;
		if (d->completed) {
			a[n++] = (struct bw_cleanup_action){BW_ACTION_QCOW2_KEPT, d->key, 0, 0,
							    d->qcow2_path, true, NULL};
			continue;
		}
		struct bw_target t = {j->repository, j->vm_dir, d->key, j->spec->job_id,
				      d->size_bytes, d->parent_path, IMAGE_MODE};
		bool ok = bw_target_remove(&t, rm_error[i], sizeof(rm_error[i])) == 0;
		a[n++] = (struct bw_cleanup_action){BW_ACTION_QCOW2_REMOVED, d->key, 0, 0,
						    d->qcow2_path, ok, ok ? NULL : rm_error[i]};
		d->created = false;
	}
	char key_dir[PATH_MAX], key_err[300] = "";
	if (j->tls && bw_psk_dir(w->cfg->worker_state_dir, j->spec->job_id, key_dir,
				 sizeof(key_dir)) == 0) {
		bool ok = bw_psk_remove(w->cfg->worker_state_dir, j->spec->job_id, key_err,
					sizeof(key_err)) == 0;
		a[n++] = (struct bw_cleanup_action){BW_ACTION_TLS_KEY_REMOVED, 0, 0, 0, key_dir, ok,
						    key_err};
	}
	if (j->cleanup_wanted)
		a[n++] = (struct bw_cleanup_action){BW_ACTION_SNA_CLEANUP_REQUESTED, 0, 0, 0, NULL,
						    !j->cleanup_failed, j->cleanup_error};
	struct batch b = BATCH(j);
	keep(&b, bw_event_cleanup(&j->ctx, next_seq(&b), a, n, slot(&b)));
	if (commit(&b, BW_JOB_COMPENSATED, NULL) == 0) {
		j->done = true;
		bw_log_info("job=%s compensated", j->spec->job_id);
	}
}

/* ---- preparing --------------------------------------------------------------------------- */

static void try_reserve(struct job *j, int64_t now)
{
	struct worker *w = j->w;
	if (now < j->next_try_ms)
		return;
	int64_t keys[BW_MESSAGE_MAX_DISKS];
	int ports[BW_MESSAGE_MAX_DISKS];
	/* reserved, and every image recorded before it is created (a crash leaves known paths
	 * to clean), in the transaction that takes the ports */
	struct bw_disk_update u[BW_MESSAGE_MAX_DISKS];
	for (size_t i = 0; i < j->n_disks; i++) {
		keys[i] = j->disks[i].key;
		u[i] = (struct bw_disk_update){j->disks[i].key, BW_DISK_ROW_CREATING, 0, 0,
						 true};
	}
	int rc = bw_ledger_reserve_and_move(w->ledger, &j->fence, keys, j->n_disks, ports,
					    BW_JOB_RESERVED, u, j->n_disks);
	if (rc == BW_ENOPORTS) {
		if (j->state == BW_JOB_CLAIMED) {
			struct batch b = BATCH(j);
			if (commit(&b, BW_JOB_WAITING_PORTS, NULL) != 0)
				return;
			crash_point("waiting_ports", 0);
			j->ports_until_ms = now + (int64_t)w->cfg->job_port_wait_s * 1000;
			bw_log_info("job=%s waiting for %zu free ports (up to %d s)", j->spec->job_id,
				    j->n_disks, w->cfg->job_port_wait_s);
		}
		if (now >= j->ports_until_ms)
			job_fail(j, BW_FAIL_NO_PORTS, "%zu ports not free within %d s in %d-%d", j->n_disks,
			     w->cfg->job_port_wait_s, w->cfg->nbd_port_min, w->cfg->nbd_port_max);
		j->next_try_ms = now + PORT_RETRY_MS;
		return;
	}
	if (rc != 0) {
		if (bw_err_transient(rc)) {
			j->next_try_ms = now + PORT_RETRY_MS;
			return;
		}
		job_fail(j, BW_FAIL_INTERNAL_ERROR, "reserving ports: %s", bw_strerror(rc));
		return;
	}
	for (size_t i = 0; i < j->n_disks; i++)
		j->disks[i].port = ports[i];
	j->state = BW_JOB_RESERVED;
	crash_point("reserved", 0);
}

/* Every image (a few small writes each, no process): recorded as being created before;
 * with NBD TLS the job's key first (the servers read it when they start). */
static void create_targets(struct job *j)
{
	char err[600];
	if (j->tls && !j->key_made) {
		int rc = bw_psk_create(j->w->cfg->worker_state_dir, j->spec->job_id, err, sizeof(err));
		if (rc != 0) {
			job_fail(j, BW_FAIL_INTERNAL_ERROR, "the job's NBD TLS key: %s", err);
			return;
		}
		j->key_made = true;
	}
	for (size_t i = 0; i < j->n_disks; i++) {
		struct job_disk *d = &j->disks[i];
		if (d->created)
			continue;
		struct bw_target t = {j->repository, j->vm_dir, d->key, j->spec->job_id,
				      d->size_bytes, d->parent_path, IMAGE_MODE};
		int rc = bw_target_create(&t, err, sizeof(err));
		if (rc != 0) {
			fail_disk(j, d, rc == BW_EPERM || rc == BW_EEXIST || rc == BW_EINVAL
						? BW_FAIL_TARGET_ERROR
						: BW_FAIL_INTERNAL_ERROR,
				  "", err);
			return;
		}
		d->created = true;
		crash_point("creating", i + 1);
	}
	struct batch b = BATCH(j);
	if (commit(&b, BW_JOB_TARGETS_CREATED, NULL) == 0)
		crash_point("targets_created", 0);
}

static int spawn_disk(struct job *j, struct job_disk *d, char *err, size_t errsize)
{
	const struct bw_config *cfg = j->w->cfg;
	char tls_dir[PATH_MAX];
	if (j->tls && bw_psk_dir(cfg->worker_state_dir, j->spec->job_id, tls_dir, sizeof(tls_dir)) != 0) {
		snprintf(err, errsize, "the key directory's path is too long");
		return BW_ERANGE;
	}
	struct bw_nbd_opts o = {cfg->nbd_qemu_nbd,  d->qcow2_path, d->export_name,
				cfg->nbd_bind_address, d->port, cfg->nbd_shared, d->log_path,
				j->tls ? tls_dir : NULL};
	int rc = bw_nbd_spawn(&o, &d->nbd, err, errsize);
	if (rc != 0)
		return rc;
	d->spawned = true;
	bw_log_debug("job=%s disk=%" PRId64 " port=%d pid=%ld qemu-nbd started", j->spec->job_id,
		     d->key, d->port, (long)d->nbd.pid);
	return 0;
}

/* Under systemd: the servers leave the worker's unit, so that its restart leaves them serving
 * (cgroup.h); one bus call for the job. A failure is only a warning: they serve on. */
static void hold_servers(struct job *j)
{
	const char *holder = bw_cgroup_holder();
	pid_t pids[BW_MESSAGE_MAX_DISKS];
	size_t n = 0;
	char why[300];
	for (size_t i = 0; holder && i < j->n_disks; i++)
		if (j->disks[i].spawned && !j->disks[i].nbd.exited)
			pids[n++] = j->disks[i].nbd.pid;
	if (n && bw_cgroup_attach(holder, pids, n, why, sizeof(why)) != 0)
		bw_log_warnx("job=%s its %zu qemu-nbd stay in the worker's unit, whose stop or "
			     "restart ends them: %s", j->spec->job_id, n, why);
}

/* The servers started so far as disk rows (pid and start time: who may be signalled later). */
static size_t server_rows(struct job *j, struct bw_disk_update *u)
{
	size_t n = 0;
	for (size_t i = 0; i < j->n_disks; i++) {
		struct job_disk *d = &j->disks[i];
		if (d->spawned && !d->nbd.exited)
			u[n++] = (struct bw_disk_update){d->key, BW_DISK_ROW_SERVING, d->nbd.pid,
							 d->nbd.start_time, true};
	}
	return n;
}

static int record_servers(struct job *j)
{
	struct bw_disk_update u[BW_MESSAGE_MAX_DISKS];
	size_t n = server_rows(j, u);
	return n ? bw_ledger_disks_update(j->w->ledger, &j->fence, u, n) : 0;
}

static void start_servers(struct job *j)
{
	char err[700];
	/* every parent and its whole chain checked again right before its overlay is served
	 * (CONTRACT §5): it may have changed since the message was checked */
	for (size_t i = 0; i < j->n_disks; i++) {
		struct job_disk *d = &j->disks[i];
		if (d->parent_path == NULL)
			continue;
		int rc = bw_target_check_chain(j->repository, d->parent_path, NULL, err, sizeof(err));
		if (rc != 0) {
			fail_disk(j, d, rc == BW_EIO || rc == BW_ENOMEM || rc == BW_ESYS
						? BW_FAIL_INTERNAL_ERROR
						: BW_FAIL_TARGET_ERROR,
				  "parent ", err);
			return;
		}
	}
	for (size_t i = 0; i < j->n_disks; i++) {
		if (spawn_disk(j, &j->disks[i], err, sizeof(err)) != 0) {
			if (record_servers(j) != 0)
				bw_log_warnx("job=%s ledger: cannot record its servers", j->spec->job_id);
			fail_disk(j, &j->disks[i], BW_FAIL_QEMU_NBD_FAILED, "", err);
			return;
		}
		crash_point("spawned", i + 1);
	}
	hold_servers(j);
	/* a crash before this commit leaves servers the ledger does not name: the recovery
	 * finds them by their export name (bw_nbd_find) */
	struct bw_disk_update u[BW_MESSAGE_MAX_DISKS];
	struct batch b = BATCH(j);
	b.disks = u;
	b.n_disks = server_rows(j, u);
	if (commit(&b, BW_JOB_SERVING, NULL) != 0) {
		job_fail(j, BW_FAIL_INTERNAL_ERROR, "ledger: cannot record the servers");
		return;
	}
	j->next_try_ms = bw_clock_mono_ms() + NBD_READY_MS;
	crash_point("serving", 0);
}

/*
 * The start request's view of the job (borrowed strings; targets[] the caller's), with
 * every disk's nbd_url set for the events.
 */
static struct bw_sna_start_request sna_request(struct job *j, struct bw_sna_target *targets)
{
	const char *host = j->w->cfg->nbd_advertise_host;
	for (size_t i = 0; i < j->n_disks; i++) {
		struct job_disk *d = &j->disks[i];
		targets[i] = (struct bw_sna_target){d->key, d->size_bytes, d->port, d->export_name,
						    d->previous_change_id};
		bw_sna_nbd_url(d->nbd_url, sizeof(d->nbd_url), host, d->port, d->export_name, j->tls);
	}
	return (struct bw_sna_start_request){
		.job_id = j->spec->job_id,
		.vm_name = j->spec->vm_name,
		.vm_path = j->spec->vm_path,
		.incremental = j->spec->backup_type == BW_BACKUP_INCREMENTAL,
		.nbd_host = host,
		.disks = targets,
		.n_disks = j->n_disks,
		.tls = j->tls,
	};
}

static void start_done_cb(void *arg, const struct bw_sna_result *r);

/* Every server greets: call the SNA, once for the whole VM. */
static void call_sna(struct job *j)
{
	struct worker *w = j->w;
	char err[600], *targets = NULL;
	struct bw_credential *cred = NULL;
	int rc = bw_credential_load(w->cfg->credentials_dir, j->spec->credential_id, &cred, err,
				    sizeof(err));
	if (rc != 0) {
		job_fail(j, BW_FAIL_CREDENTIAL_ERROR, "%s", err);
		return;
	}
	/* persisted before the side effect: from here on the SNA may know this job */
	struct batch b = BATCH(j);
	if (commit(&b, BW_JOB_SNA_REQUESTED, NULL) != 0) {
		bw_credential_free(cred);
		return;
	}
	struct bw_sna_target t[BW_MESSAGE_MAX_DISKS];
	struct bw_sna_start_request req = sna_request(j, t);
	char psk[BW_PSK_HEX_SIZE];
	if (j->tls && (rc = bw_psk_read(w->cfg->worker_state_dir, j->spec->job_id, psk)) != 0) {
		bw_credential_free(cred);
		job_fail(j, BW_FAIL_INTERNAL_ERROR, "the job's NBD TLS key cannot be read: %s",
			 bw_strerror(rc));
		return;
	}
	req.vcenter_host = cred->vcenter_host;
	req.vcenter_user = cred->username;
	req.vcenter_password = cred->password;
	req.tls_psk = j->tls ? psk : NULL;
	j->sna_called = true;
	rc = bw_sna_start(w->sna, &req, start_done_cb, j, &j->call); /* it wipes its copy */
	explicit_bzero(psk, sizeof(psk));
	bw_credential_free(cred);
	if (rc == BW_EPERM) {
		j->sna_called = false; /* nothing was sent */
		job_fail(j, BW_FAIL_INTERNAL_ERROR, "the NBD key would travel in plain http to an SNA "
			 "that is not on loopback: use https (sna.url)");
		return;
	}
	if (rc == 0)
		rc = bw_sna_targets(&req, &targets);
	if (rc != 0) {
		job_fail(j, BW_FAIL_INTERNAL_ERROR, "cannot send the SNA start request: %s", bw_strerror(rc));
		return;
	}
	crash_point("sna_requested", 0);
	int64_t max_s = j->spec->max_duration_s ? j->spec->max_duration_s : w->cfg->job_max_duration_s;
	j->deadline_ms = bw_clock_mono_ms() + max_s * 1000;
	bw_log_info("job=%s SNA start requested for %zu disk(s): %s", j->spec->job_id, j->n_disks,
		    targets);
	free(targets);
}

static void poll_servers(struct job *j, int64_t now)
{
	char err[700];
	bool all = true;
	for (size_t i = 0; i < j->n_disks; i++) {
		struct job_disk *d = &j->disks[i];
		int rc = bw_nbd_poll_ready(&d->nbd, err, sizeof(err));
		if (rc == 0)
			continue;
		all = false;
		if (rc == BW_EBUSY)
			continue;
		if (rc == BW_EADDRINUSE) {
			/* someone else holds the port: quarantine it, take another, start again */
			int old = d->port, repl = 0;
			bw_nbd_release(&d->nbd);
			rc = bw_ledger_quarantine(j->w->ledger, &j->fence, old, QUARANTINE_S, &repl);
			if (rc == 0) {
				bw_log_warnx("job=%s disk=%" PRId64 " port=%d taken by another process: "
					     "quarantined, using port %d",
					     j->spec->job_id, d->key, old, repl);
				d->port = repl;
				if (spawn_disk(j, d, err, sizeof(err)) == 0) {
					if (record_servers(j) == 0)
						continue;
					snprintf(err, sizeof(err), "ledger: cannot record its new server");
				}
			} else {
				d->port = 0;
				snprintf(err, sizeof(err), "port %d taken and no other port free", old);
			}
		}
		fail_disk(j, d, BW_FAIL_QEMU_NBD_FAILED, "", err);
		return;
	}
	if (all) {
		call_sna(j);
		return;
	}
	if (now > j->next_try_ms)
		job_fail(j, BW_FAIL_QEMU_NBD_FAILED, "not every qemu-nbd greeted within %d ms", NBD_READY_MS);
}

/* ---- the transfer ------------------------------------------------------------------------- */

/* The SNA accepted the job: backup.started and the move to transferring. */
static void job_started(struct job *j, const char *sna_job_id)
{
	struct bw_sna_target t[BW_MESSAGE_MAX_DISKS];
	struct bw_sna_start_request req = sna_request(j, t);
	struct bw_event_started_disk disks[BW_MESSAGE_MAX_DISKS];
	for (size_t i = 0; i < j->n_disks; i++) {
		struct job_disk *d = &j->disks[i];
		disks[i] = (struct bw_event_started_disk){d->key, d->port, d->export_name, d->nbd_url,
							  d->qcow2_path, d->nbd.pid, d->parent_path};
	}
	char *targets = NULL;
	struct batch b = BATCH(j);
	int rc = bw_sna_targets(&req, &targets);
	keep(&b, rc != 0 ? rc
			 : bw_event_started(&j->ctx, next_seq(&b), sna_job_id, targets, disks,
					    j->n_disks, slot(&b)));
	free(targets);
	(void)commit(&b, BW_JOB_TRANSFERRING, NULL);
	j->next_try_ms = bw_clock_mono_ms(); /* first poll at once */
}

static void start_done_cb(void *arg, const struct bw_sna_result *r)
{
	struct job *j = arg;
	bw_log_set_job(j->spec->job_id); /* cleared by the loop after bw_sna_perform */
	j->call = NULL;
	if (r->outcome == BW_SNA_REJECTED) {
		j->sna_called = false; /* a definite 4xx: it accepted nothing */
		job_fail(j, BW_FAIL_SNA_REJECTED, "the SNA rejected the start request: %s", r->error);
		return;
	}
	if (r->outcome != BW_SNA_OK) {
		job_fail(j, BW_FAIL_SNA_UNAVAILABLE, "no answer from the SNA after %d attempt(s): %s",
			 r->attempts, r->error);
		return;
	}
	crash_point("sna_accepted", 0);
	job_started(j, r->sna_job_id);
	bw_log_info("job=%s started on the SNA (its id: %s)", j->spec->job_id, r->sna_job_id);
	if (j->w->stopping)
		job_hand_over(j);
}

/* A finished disk's result for the events. */
static struct bw_disk_result disk_result(const struct job_disk *d)
{
	return (struct bw_disk_result){d->key, d->qcow2_path, d->change_id, d->virtual_size,
				       d->actual_size};
}

/* A disk the SNA proved completed (CONTRACT §3.2): its server stops, then the check. */
static int begin_finalize(struct job *j, struct job_disk *d)
{
	if (j->state != BW_JOB_FINALIZING) {
		struct batch b = BATCH(j);
		if (commit(&b, BW_JOB_FINALIZING, NULL) != 0)
			return -1;
	}
	d->fin = FIN_STOPPING;
	return 0;
}

/*
 * Advances a finalizing disk without waiting: its server's exit flushes the image (status
 * 0 required), qemu-img check, then backup.disk.completed and its port released.
 */
static void finalize_step(struct job *j, struct job_disk *d)
{
	struct worker *w = j->w;
	char err[700], log[PATH_MAX + 16];
	int rc;
	snprintf(log, sizeof(log), "%s" BW_NBD_CHECK_LOG_SUFFIX, d->log_path);
	if (d->fin == FIN_STOPPING) {
		rc = bw_nbd_stop_step(&d->nbd, BW_NBD_KEEP, NBD_STOP_MS, err, sizeof(err));
		if (rc == BW_EBUSY) {
			crash_point("finalizing", (size_t)(d - j->disks) + 1);
			return;
		}
		if (rc != 0) {
			fail_disk(j, d, BW_FAIL_QEMU_NBD_FAILED, "stop: ", err);
			return;
		}
		bw_nbd_release(&d->nbd);
		rc = bw_image_check_start(w->cfg->nbd_qemu_img, d->qcow2_path, log, &d->check_pid,
					  err, sizeof(err));
		if (rc != 0) {
			fail_disk(j, d, BW_FAIL_CHECK_FAILED, "", err);
			return;
		}
		d->check_by_ms = bw_clock_mono_ms() + CHECK_MS;
		d->fin = FIN_CHECKING;
		crash_point("checking", (size_t)(d - j->disks) + 1);
		return;
	}
	rc = bw_image_check_finish(d->check_pid, d->qcow2_path, log, &d->virtual_size,
				   &d->actual_size, err, sizeof(err));
	if (rc == BW_EBUSY) {
		if (bw_clock_mono_ms() > d->check_by_ms)
			job_fail(j, BW_FAIL_CHECK_FAILED,
				 "disk %" PRId64 ": qemu-img check still running after %d s", d->key,
				 CHECK_MS / 1000); /* the compensation ends it */
		return;
	}
	d->check_pid = 0;
	if (rc != 0) {
		fail_disk(j, d, BW_FAIL_CHECK_FAILED, "", err);
		return;
	}
	unlink(log);
	unlink(d->log_path); /* its server's log: nothing to tell of a disk that completed */
	d->completed = true;
	d->fin = FIN_NONE;

	/* the event and the disk's row in one transaction, then its port */
	struct bw_disk_update u = {d->key, BW_DISK_ROW_COMPLETED, 0, 0, true};
	struct bw_disk_result res = disk_result(d);
	struct batch b = BATCH(j);
	b.disks = &u;
	b.n_disks = 1;
	keep(&b, bw_event_disk_completed(&j->ctx, next_seq(&b), &res, slot(&b)));
	int crc = commit(&b, BW_JOB_FINALIZING, NULL);
	if (d->port && bw_ledger_release(w->ledger, &j->fence, d->port) == 0)
		d->port = 0;
	if (crc != 0)
		return;
	crash_point("disk_completed", (size_t)(d - j->disks) + 1);
	bw_log_info("job=%s disk=%" PRId64 " completed: %s change_id=%s", j->spec->job_id, d->key,
		    d->qcow2_path, d->change_id);
}

static void finish_job(struct job *j)
{
	struct worker *w = j->w;
	size_t released = 0;
	int rc = bw_ledger_release_all(w->ledger, &j->fence, &released);
	if (rc != 0)
		bw_log_warnx("job=%s ledger: releasing ports: %s", j->spec->job_id, bw_strerror(rc));
	char err[300];
	if (j->tls && bw_psk_remove(w->cfg->worker_state_dir, j->spec->job_id, err, sizeof(err)) != 0)
		bw_log_warnx("job=%s its NBD TLS key: %s", j->spec->job_id, err);
	struct bw_disk_result res[BW_MESSAGE_MAX_DISKS];
	for (size_t i = 0; i < j->n_disks; i++)
		res[i] = disk_result(&j->disks[i]);
	int64_t took = bw_clock_mono_ms() - j->claimed_ms;
	struct batch b = BATCH(j);
	keep(&b, bw_event_completed(&j->ctx, next_seq(&b), took, res, j->n_disks, slot(&b)));
	if (commit(&b, BW_JOB_COMPLETED, NULL) == 0) {
		j->done = true;
		bw_log_info("job=%s completed: %zu disk(s) in %" PRId64 " ms", j->spec->job_id,
			    j->n_disks, took);
	}
}

/* backup.progress when the bytes moved and the last one is old enough. */
static void progress_event(struct job *j, int64_t now)
{
	struct bw_event_progress_disk disks[BW_MESSAGE_MAX_DISKS];
	int64_t counts[2 * BW_MESSAGE_MAX_DISKS];
	for (size_t i = 0; i < j->n_disks; i++) {
		const struct job_disk *d = &j->disks[i];
		disks[i] = (struct bw_event_progress_disk){d->key, d->status, d->bytes, d->total};
		counts[2 * i] = d->bytes;
		counts[2 * i + 1] = d->total;
	}
	uint64_t sig = bw_fnv1a64(counts, 2 * j->n_disks * sizeof(counts[0])); /* did they move? */
	if ((j->progress_sent_ms && sig == j->progress_sig) || now - j->progress_sent_ms < PROGRESS_EVENT_MS)
		return;
	struct batch b = BATCH(j);
	keep(&b, bw_event_progress(&j->ctx, next_seq(&b), disks, j->n_disks, slot(&b)));
	if (commit(&b, j->state, NULL) == 0) {
		j->progress_sig = sig;
		j->progress_sent_ms = now;
	}
}

struct job_disk *job_disk_by_key(struct job *j, int64_t key)
{
	for (size_t i = 0; i < j->n_disks; i++)
		if (j->disks[i].key == key)
			return &j->disks[i];
	return NULL;
}

/*
 * A counted progress reply (CONTRACT §3.2): per-disk progress; a disk completed on
 * evidence finalizes; a disk the SNA calls failed, or completed without the evidence, and
 * a job it calls failed, fail the job sna_failed once the disks completed in the same reply
 * are finalized.
 */
static void progress_answer(struct job *j, const struct bw_sna_progress *p)
{
	char why[sizeof(j->deferred_message)] = "";
	for (size_t i = 0; i < p->n_disks; i++) {
		const struct bw_sna_disk_progress *r = &p->disks[i];
		struct job_disk *d = job_disk_by_key(j, r->key); /* the parser saw it is ours */
		if (d == NULL || d->completed || d->fin != FIN_NONE)
			continue;
		d->status = r->status;
		d->bytes = r->bytes_transferred;
		d->total = r->total_bytes;
		if (r->status == BW_SNA_FAILED) {
			d->failed = true;
			snprintf(d->error, sizeof(d->error), "the SNA reported this disk failed");
		} else if (r->status == BW_SNA_COMPLETED && !r->proven) {
			d->failed = true;
			snprintf(d->error, sizeof(d->error), "the SNA %s", r->why);
			if (why[0] == '\0')
				snprintf(why, sizeof(why), "disk %" PRId64 ": the SNA %s (not taken as "
					 "a completed disk)", d->key, r->why);
		} else if (r->status == BW_SNA_COMPLETED) {
			snprintf(d->change_id, sizeof(d->change_id), "%s", r->change_id);
		}
	}
	bool finalizing = false, unreported = false;
	for (size_t i = 0; i < j->n_disks; i++) {
		struct job_disk *d = &j->disks[i];
		/* disks completed in this answer finalize first, even when another one failed */
		if (!d->completed && d->fin == FIN_NONE && d->status == BW_SNA_COMPLETED &&
		    !d->failed && begin_finalize(j, d) != 0)
			return;
		finalizing |= d->fin != FIN_NONE;
		unreported |= !d->completed && d->fin == FIN_NONE && !d->failed;
	}
	if (why[0] == '\0' && p->status == BW_SNA_FAILED)
		snprintf(why, sizeof(why), "the SNA reported the transfer failed%s%s",
			 p->error[0] ? ": " : "", p->error);
	if (why[0] == '\0' && p->status == BW_SNA_COMPLETED && unreported)
		snprintf(why, sizeof(why), "the SNA reports the job completed but not every disk");
	for (size_t i = 0; i < j->n_disks && why[0] == '\0'; i++)
		if (j->disks[i].failed)
			snprintf(why, sizeof(why), "the SNA reported disk %" PRId64 " failed%s%s",
				 j->disks[i].key, p->error[0] ? ": " : "", p->error);
	if (why[0]) {
		j->deferred = true;
		snprintf(j->deferred_message, sizeof(j->deferred_message), "%s", why);
		if (!finalizing)
			job_fail(j, BW_FAIL_SNA_FAILED, "%s", j->deferred_message);
		return;
	}
	/* once a disk finalizes the job stays finalizing (the ledger moves forward only) while
	 * the others still transfer */
	progress_event(j, bw_clock_mono_ms());
}

/*
 * The SNA's first counted word on a job of a dead worker: adopt it when the SNA runs it and
 * every disk still to come has its server (or the SNA has finished that disk); else
 * compensate it.
 */
static void adopt_answer(struct job *j, const struct bw_sna_progress *p)
{
	j->adopting = false;
	if (p->status == BW_SNA_FAILED) {
		job_fail(j, BW_FAIL_SNA_FAILED, "its worker died; the SNA reports the job failed%s%s",
			 p->error[0] ? ": " : "", p->error);
		return;
	}
	for (size_t i = 0; i < j->n_disks; i++) {
		const struct job_disk *d = &j->disks[i];
		if (d->completed || (d->spawned && !d->nbd.exited))
			continue;
		bool finished = false;
		for (size_t k = 0; k < p->n_disks; k++)
			finished |= p->disks[k].key == d->key && p->disks[k].status == BW_SNA_COMPLETED;
		if (!finished) {
			job_fail(j, BW_FAIL_WORKER_LOST,
				 "its worker died and disk %" PRId64 " lost its qemu-nbd (pid %ld) "
				 "before the SNA finished it", d->key, (long)d->nbd.pid);
			return;
		}
	}
	int64_t max_s = j->spec->max_duration_s ? j->spec->max_duration_s
						: j->w->cfg->job_max_duration_s;
	j->deadline_ms = j->claimed_ms + max_s * 1000;
	if (j->state == BW_JOB_SNA_REQUESTED)
		job_started(j, j->spec->job_id);
	bw_log_info("job=%s adopted in %s: the SNA reports it %s", j->spec->job_id,
		    bw_job_state_name(j->state), bw_sna_status_name(p->status));
	progress_answer(j, p);
}

/*
 * A progress poll ended. One patience for a running job and an adopting one: sna.lost_after
 * 404s in a row, or sna.max_attempts polls in a row without an answer (no reply, an error
 * status, a reply of another shape: CONTRACT §3.2), fail it; until then it asks again.
 */
static void progress_cb(void *arg, const struct bw_sna_result *r)
{
	struct job *j = arg;
	bw_log_set_job(j->spec->job_id); /* cleared by the loop after bw_sna_perform */
	const struct bw_config *cfg = j->w->cfg;
	j->call = NULL;
	j->next_try_ms = bw_clock_mono_ms() + (int64_t)cfg->sna_poll_interval_s * 1000;
	if (r->outcome == BW_SNA_NOT_FOUND) {
		j->unanswered = 0;
		if (++j->lost < cfg->sna_lost_after)
			return;
		if (j->adopting)
			job_fail(j, BW_FAIL_WORKER_LOST, "its worker died and the SNA does not know "
				 "the job (404, %d times)", j->lost);
		else
			job_fail(j, BW_FAIL_SNA_LOST_JOB,
				 "the SNA answered 404 for this job %d times in a row", j->lost);
		return;
	}
	j->lost = 0;
	if (r->outcome != BW_SNA_OK) {
		bw_log_warnx("job=%s no progress answer from the SNA (%d in a row): %s",
			     j->spec->job_id, j->unanswered + 1, r->error);
		if (++j->unanswered < cfg->sna_max_attempts)
			return;
		if (j->adopting)
			job_fail(j, BW_FAIL_WORKER_LOST, "its worker died and the SNA gave no answer "
				 "%d times: %s", j->unanswered, r->error);
		else
			job_fail(j, BW_FAIL_SNA_UNAVAILABLE, "no progress answer from the SNA %d times "
				 "in a row: %s", j->unanswered, r->error);
		return;
	}
	j->unanswered = 0;
	if (j->adopting) {
		adopt_answer(j, r->progress);
		return;
	}
	crash_point("transferring", 0);
	progress_answer(j, r->progress);
}

/* Asks the SNA how the transfer goes, when it is time and nothing is asked yet. */
static void poll_progress(struct job *j, int64_t now)
{
	if (j->call != NULL || now < j->next_try_ms)
		return;
	struct bw_sna_disk_ref refs[BW_MESSAGE_MAX_DISKS];
	for (size_t i = 0; i < j->n_disks; i++)
		refs[i] = (struct bw_sna_disk_ref){j->disks[i].key, j->disks[i].size_bytes,
						   j->disks[i].parent_path == NULL};
	if (bw_sna_progress(j->w->sna, j->spec->job_id, refs, j->n_disks, progress_cb, j,
			    &j->call) != 0)
		j->next_try_ms = now + SNA_RETRY_MS;
}

void job_adopt(struct job *j)
{
	j->adopting = true;
	j->lost = j->unanswered = 0;
	j->next_try_ms = 0;
}

static void follow(struct job *j, int64_t now)
{
	if (now > j->deadline_ms) {
		job_fail(j, BW_FAIL_DEADLINE_EXCEEDED, "the transfer did not end within %" PRId64 " s",
		     j->spec->max_duration_s ? j->spec->max_duration_s
					     : (int64_t)j->w->cfg->job_max_duration_s);
		return;
	}
	bool all = true, finalizing = false, reported = true;
	for (size_t i = 0; i < j->n_disks; i++) {
		struct job_disk *d = &j->disks[i];
		if (d->fin != FIN_NONE) {
			finalize_step(j, d);
			if (j->state == BW_JOB_FAILED)
				return;
		} else if (!d->completed && d->spawned && bw_nbd_reap(&d->nbd)) {
			char err[700], what[96] = "exited (adopted: its log says how)";
			if (d->nbd.status != -1)
				bw_status_text(d->nbd.status, what, sizeof(what));
			snprintf(err, sizeof(err), "qemu-nbd pid %ld %s", (long)d->nbd.pid, what);
			fail_disk(j, d, BW_FAIL_QEMU_NBD_FAILED, "", err);
			return;
		}
		all &= d->completed;
		finalizing |= d->fin != FIN_NONE;
		reported &= d->completed || d->fin != FIN_NONE;
	}
	if (j->deferred && !finalizing) {
		job_fail(j, BW_FAIL_SNA_FAILED, "%s", j->deferred_message);
		return;
	}
	if (all) {
		finish_job(j);
		return;
	}
	/* progress is asked for until the SNA reported every disk completed */
	if (!reported)
		poll_progress(j, now);
}

/* ---- the job's life ------------------------------------------------------------------- */

void job_free(struct job *j)
{
	if (j == NULL)
		return;
	for (size_t i = 0; i < j->n_disks; i++)
		bw_nbd_release(&j->disks[i].nbd);
	free(j->disks);
	bw_job_spec_free(j->spec);
	free(j->message);
	free(j);
}

static void step(struct job *j, int64_t now)
{
	if (j->adopting) {
		poll_progress(j, now); /* the SNA's answer decides (adopt_answer) */
		return;
	}
	switch (j->state) {
	case BW_JOB_CLAIMED:
	case BW_JOB_WAITING_PORTS:
		try_reserve(j, now);
		break;
	case BW_JOB_RESERVED:
		create_targets(j);
		break;
	case BW_JOB_TARGETS_CREATED:
		start_servers(j);
		break;
	case BW_JOB_SERVING:
		poll_servers(j, now);
		break;
	case BW_JOB_SNA_REQUESTED:
		break; /* the start call's callback moves it */
	case BW_JOB_TRANSFERRING:
	case BW_JOB_FINALIZING:
		follow(j, now);
		break;
	case BW_JOB_FAILED:
		compensate(j);
		break;
	case BW_JOB_COMPLETED:
	case BW_JOB_COMPENSATED:
		j->done = true;
		break;
	}
}

void jobs_step(struct worker *w)
{
	int64_t now = bw_clock_mono_ms();
	for (struct job *j = w->jobs; j; j = j->next) {
		monitor_job(j); /* what callbacks moved since the last turn */
		bw_log_set_job(j->spec->job_id); /* job_id of every JSON line about it */
		/* a few steps at a time: each one is short and persisted first */
		for (int k = 0; k < STEPS_PER_TURN && !j->done; k++) {
			enum bw_job_state before = j->state;
			step(j, now);
			monitor_job(j);
			if (j->state == before)
				break;
		}
	}
	bw_log_set_job(NULL);
	for (struct job **p = &w->jobs; *p;) {
		if ((*p)->done && (*p)->call == NULL) {
			struct job *dead = *p;
			*p = dead->next;
			w->n_jobs--;
			job_free(dead);
		} else {
			p = &(*p)->next;
		}
	}
}

/* A child of the job is being stopped or awaited: SIGCHLD wakes the loop when one of ours
 * exits, but an adopted server (a pidfd) and the re-sent SIGTERM need a look now and then. */
static bool children_busy(const struct job *j)
{
	for (size_t i = 0; i < j->n_disks; i++) {
		const struct job_disk *d = &j->disks[i];
		if (d->nbd.stopping || d->fin != FIN_NONE || d->check_pid > 0)
			return true;
	}
	return false;
}

int jobs_timeout_ms(struct worker *w)
{
	int64_t now = bw_clock_mono_ms(), best = -1;
	for (struct job *j = w->jobs; j; j = j->next) {
		int64_t t;
		if (j->state == BW_JOB_SERVING)
			t = GREETING_POLL_MS;
		else if (children_busy(j))
			t = CHILDREN_POLL_MS;
		else if (j->call)
			continue; /* waiting on curl, which has its own timeout */
		else if (j->state == BW_JOB_FAILED || j->state == BW_JOB_TARGETS_CREATED)
			t = 0;
		else if (j->state == BW_JOB_SNA_REQUESTED && !j->adopting)
			continue; /* the start call's answer moves it */
		else
			t = j->next_try_ms > now ? j->next_try_ms - now : 0;
		if (best < 0 || t < best)
			best = t;
	}
	return (int)best;
}

void job_hand_over(struct job *j)
{
	if (j->call) {
		bw_sna_cancel(j->w->sna, j->call);
		j->call = NULL;
	}
	for (size_t i = 0; i < j->n_disks; i++)
		bw_nbd_release(&j->disks[i].nbd); /* never signalled: they serve on */
	j->done = true;
	bw_log_info("job=%s handed over in %s: its servers keep serving; the next recovery pass "
		    "on this host adopts it", j->spec->job_id, bw_job_state_name(j->state));
}

void jobs_shutdown(struct worker *w)
{
	for (struct job *j = w->jobs; j; j = j->next) {
		if (j->done || j->state == BW_JOB_FAILED)
			continue; /* compensation goes on within the grace */
		if (j->adopting || j->state == BW_JOB_TRANSFERRING || j->state == BW_JOB_FINALIZING)
			job_hand_over(j);
		else if (j->state == BW_JOB_SNA_REQUESTED)
			continue; /* handed over once the SNA answers the start (start_done_cb) */
		else
			job_fail(j, BW_FAIL_WORKER_SHUTDOWN, "the worker was told to stop");
	}
}

/* Rejects body: backup.rejected into the outbox, then the caller nacks. */
static int reject(struct worker *w, const struct bw_delivery *d, const struct bw_verdict *vd)
{
	char *event = NULL, *id = NULL;
	uint64_t digest = d->too_large ? d->digest : bw_fnv1a64(d->body, d->len);
	int rc = bw_event_rejected_hashed(digest, vd, w->host, w->cfg->worker_id, &event, &id);
	if (rc != 0)
		return rc;
	struct bw_event e = {id, "backup.rejected", 0, event};
	rc = bw_ledger_outbox_append(w->ledger, &e);
	if (rc == 0) /* else requeued: counted when it is rejected for good */
		bw_metrics_add(w->metrics, BW_METRIC_REJECTED,
			       (const char *const[]){bw_reject_reason_name(vd->reason)}, 1);
	bw_log_info("rejected a backup.start (%s, %zu rule(s) broken; first: %s: %s) job=%s",
		    bw_reject_reason_name(vd->reason), vd->n, vd->n ? vd->v[0].path : "-",
		    vd->n ? vd->v[0].rule : "-", vd->job_id ? vd->job_id : "-");
	free(event);
	free(id);
	return rc == 0 ? BW_EMESSAGE : rc;
}

struct job *job_build(struct worker *w, struct bw_job_spec *spec, const char *body, size_t len)
{
	const struct bw_config *cfg = w->cfg;
	struct job *j = calloc(1, sizeof(*j));
	if (j == NULL) {
		bw_job_spec_free(spec);
		return NULL;
	}
	j->w = w;
	j->spec = spec;
	if ((j->message = strndup(body, len)) == NULL ||
	    (j->disks = calloc(spec->n_disks, sizeof(*j->disks))) == NULL)
		goto fail;
	j->n_disks = spec->n_disks;
	j->repository = bw_config_repository(cfg, spec->repository_id);
	bw_target_vm_dir(spec->vm_id, spec->vm_name, j->vm_dir);
	j->ctx = (struct bw_event_ctx){spec, w->host, cfg->worker_id};
	j->tls = bw_config_nbd_psk(cfg);
	for (size_t i = 0; i < j->n_disks; i++) {
		struct job_disk *d = &j->disks[i];
		const struct bw_disk_spec *ds = &spec->disks[i];
		d->key = ds->key;
		d->size_bytes = ds->size_bytes;
		d->parent_path = ds->parent_path;
		d->previous_change_id = ds->previous_change_id;
		bw_nbd_init(&d->nbd);
		snprintf(d->export_name, sizeof(d->export_name), "%s-%" PRId64, spec->job_id, d->key);
		struct bw_target t = {j->repository, j->vm_dir, d->key, spec->job_id, d->size_bytes,
				      d->parent_path, IMAGE_MODE};
		if (j->repository == NULL || bw_target_path(&t, d->qcow2_path, sizeof(d->qcow2_path)) != 0)
			goto fail;
		if (bw_nbd_log_path(d->log_path, sizeof(d->log_path), cfg->worker_state_dir,
				    spec->job_id, d->key) != 0)
			goto fail;
	}
	return j;
fail:
	job_free(j);
	return NULL;
}

void job_enqueue(struct worker *w, struct job *j)
{
	/* oldest first: the job claimed first gets the ports first */
	struct job **tail = &w->jobs;
	while (*tail)
		tail = &(*tail)->next;
	*tail = j;
	w->n_jobs++;
	monitor_job(j);
}

int job_placement(struct worker *w, const struct bw_delivery *d, char **forward_to)
{
	struct bw_job_spec *spec = NULL;
	struct bw_verdict *vd = NULL;
	*forward_to = NULL;
	/* invalid: not forwarded; job_receive rejects it when its turn comes */
	int rc = bw_message_parse(d->body, d->len, (size_t)w->cfg->job_max_message_bytes, &spec,
				  &vd);
	if (rc == 0 && bw_config_repository(w->cfg, spec->repository_id) == NULL &&
	    (*forward_to = strdup(spec->repository_id)) == NULL)
		rc = BW_ENOMEM;
	bw_job_spec_free(spec);
	bw_verdict_free(vd);
	return rc == BW_ENOMEM ? rc : 0;
}

int job_receive(struct worker *w, const struct bw_delivery *d, char **forward_to)
{
	const char *body = d->body;
	size_t len = d->len;
	const struct bw_config *cfg = w->cfg;
	struct bw_job_spec *spec = NULL;
	struct bw_verdict *vd = NULL;
	struct job *j = NULL;
	if (forward_to)
		*forward_to = NULL;
	/* a too_large delivery has no body: its declared len is over the limit the consumer
	   link was given (the same key), so the parse rejects it unread */
	int rc = bw_message_parse(body, len, (size_t)cfg->job_max_message_bytes, &spec, &vd);
	if (rc == 0)
		bw_log_set_job(spec->job_id); /* cleared at out */
	if (rc == 0 && forward_to && bw_config_repository(cfg, spec->repository_id) == NULL) {
		/*
		 * Placement before the host rules: a host without the repository cannot judge a
		 * parent in it, and its credentials need not be the owner's. Validation came
		 * first: an invalid message is rejected here, never forwarded.
		 */
		if ((*forward_to = strdup(spec->repository_id)) == NULL)
			rc = BW_ENOMEM;
		else
			bw_log_info("job=%s repository %s is not on this host: forwarding",
				    spec->job_id, spec->repository_id);
		goto out;
	}
	if (rc == 0)
		rc = bw_message_check_host(spec, cfg, &vd);
	if (rc == BW_EMESSAGE) {
		rc = reject(w, d, vd);
		goto out;
	}
	if (rc != 0)
		goto out;
	if (spec->unknown_fields)
		bw_log_debug("job=%s ignored unknown fields: %s", spec->job_id, spec->unknown_fields);

	j = job_build(w, spec, body, len);
	spec = NULL; /* the job's now, or freed */
	rc = BW_ENOMEM;
	if (j == NULL)
		goto out;
	struct bw_job_disk_new nd[BW_MESSAGE_MAX_DISKS];
	for (size_t i = 0; i < j->n_disks; i++)
		nd[i] = (struct bw_job_disk_new){j->disks[i].key, j->disks[i].export_name,
						 j->disks[i].qcow2_path};

	struct bw_event_text e;
	if ((rc = bw_event_accepted(&j->ctx, &e)) != 0)
		goto out;
	struct bw_event accepted = {e.event_id, e.name, e.seq, e.body};
	struct bw_known existing;
	rc = bw_ledger_claim(w->ledger, j->spec->job_id, j->message, nd, j->n_disks, &accepted,
			     &j->generation, &existing);
	bool cancelled = false;
	if (rc == BW_ECANCELREC) {
		rc = claim_cancelled(j, &accepted, nd, &existing);
		cancelled = rc == 0;
		if (rc == BW_ENOENT) /* the cancel expired meanwhile: an ordinary claim */
			rc = bw_ledger_claim(w->ledger, j->spec->job_id, j->message, nd, j->n_disks,
					     &accepted, &j->generation, &existing);
	}
	bw_event_text_free(&e);
	if (rc == BW_EEXIST) {
		const char *state = bw_job_state_name(existing.state);
		if (existing.same_message)
			bw_log_info("job=%s known already (%s): duplicate delivery acked, nothing started",
				    j->spec->job_id, state);
		else
			bw_log_warnx("job=%s known already (%s) with a different body: this one is "
				     "acked and ignored; a new backup needs a new job_id",
				     j->spec->job_id, state);
		if (bw_job_state_terminal(existing.state) &&
		    bw_ledger_republish_terminal(w->ledger, j->spec->job_id) != 0)
			bw_log_warnx("job=%s cannot republish its terminal event", j->spec->job_id);
		rc = 0;
		goto out;
	}
	if (rc != 0 || cancelled)
		goto out; /* cancelled: nothing runs, the delivery is acked */
	crash_point("claimed", 0);
	j->seq = 1;
	j->state = BW_JOB_CLAIMED;
	j->fence = (struct bw_fence){j->spec->job_id, j->generation};
	j->claimed_ms = bw_clock_mono_ms();
	job_enqueue(w, j);
	bw_log_info("job=%s claimed: vm=%s %zu disk(s), %s", j->spec->job_id, j->spec->vm_path,
		    j->n_disks, j->spec->backup_type == BW_BACKUP_FULL ? "full" : "incremental");
	j = NULL;
out:
	bw_log_set_job(NULL);
	job_free(j);
	bw_job_spec_free(spec);
	bw_verdict_free(vd);
	return rc;
}
