/* job.c: one VM backup: claim, all ports, all images, all servers, ONE SNA call, the transfer, results or compensation. */
#include "worker.h"

#include "child.h"
#include "credentials.h"
#include "log.h"
#include "target.h"

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

#define PORT_RETRY_MS 1000
#define QUARANTINE_S 300
#define PROGRESS_EVENT_MS 5000
#define NBD_READY_MS 30000
#define NBD_STOP_MS 60000
#define CHECK_MS 600000
#define MAX_EVENTS 70

int64_t worker_now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

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
	struct json_object *o[MAX_EVENTS];
	size_t n;
	const struct bw_disk_update *disks; /* disk rows written in the same transaction */
	size_t n_disks;
};

static struct json_object *ev(struct batch *b, const char *event, const char *extra)
{
	char seqbuf[24];
	int64_t seq = b->j->seq + 1 + (int64_t)b->n;
	if (extra == NULL && strcmp(event, "backup.progress") == 0) {
		snprintf(seqbuf, sizeof(seqbuf), "%" PRId64, seq);
		extra = seqbuf;
	}
	struct json_object *o = bw_event_begin(&b->j->ctx, event, seq, extra);
	if (o && b->n < MAX_EVENTS)
		b->o[b->n++] = o;
	return o;
}

/* Commits the move to state with the batch's events in one ledger transaction. */
static int commit(struct batch *b, enum bw_job_state state, const char *last_error)
{
	struct job *j = b->j;
	struct bw_event events[MAX_EVENTS];
	char *bodies[MAX_EVENTS] = {0}, *ids[MAX_EVENTS] = {0}, *names[MAX_EVENTS] = {0};
	int rc = 0;
	for (size_t i = 0; i < b->n; i++) {
		struct json_object *name = NULL;
		json_object_object_get_ex(b->o[i], "event", &name);
		names[i] = strdup(json_object_get_string(name));
		int frc = bw_event_finish(b->o[i], &bodies[i], &ids[i]); /* puts o[i] */
		if (frc != 0 || names[i] == NULL)
			rc = BW_ENOMEM;
		events[i] = (struct bw_event){ids[i], names[i], j->seq + 1 + (int64_t)i, bodies[i]};
	}
	if (rc == 0)
		rc = bw_ledger_transition_disks(j->w->ledger, &j->fence, state, last_error, events,
						b->n, b->disks, b->n_disks);
	for (size_t i = 0; i < b->n; i++) {
		free(bodies[i]);
		free(ids[i]);
		free(names[i]);
	}
	if (rc == 0) {
		j->seq += (int64_t)b->n;
		j->state = state;
	} else {
		bw_log_warnx("job=%s ledger: cannot move to %s: %s (%s)", j->spec->job_id,
			     bw_job_state_name(state), bw_strerror(rc),
			     bw_ledger_errmsg(j->w->ledger));
	}
	b->n = 0;
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

static void add_str(struct json_object *o, const char *k, const char *v)
{
	json_object_object_add(o, k, json_object_new_string(v));
}

static void add_int(struct json_object *o, const char *k, int64_t v)
{
	json_object_object_add(o, k, json_object_new_int64(v));
}

/* ---- failure and compensation -------------------------------------------------------- */

static bool reason_retryable(const char *reason)
{
	return strcmp(reason, "target_error") && strcmp(reason, "credential_error") &&
	       strcmp(reason, "cancelled") && strcmp(reason, "sna_rejected");
}

static const char *disk_outcome(const struct job_disk *d)
{
	if (d->completed)
		return "completed";
	if (d->failed)
		return "failed";
	return d->spawned ? "aborted" : "not_started";
}

/*
 * The job cannot complete: backup.failed now (stage, reason, per-disk status), then the
 * compensation runs in step() and ends with backup.cleanup.
 */
void job_fail(struct job *j, const char *reason, const char *fmt, ...)
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
	j->cleanup_wanted = j->sna_called && strcmp(reason, "sna_rejected") != 0;
	bw_log_warnx("job=%s failed in %s: %s: %s", j->spec->job_id, bw_job_state_name(j->stage),
		     reason, j->fail_message);

	struct batch b = {j, {0}, 0, NULL, 0};
	struct json_object *e = ev(&b, "backup.failed", NULL);
	add_str(e, "stage", bw_job_state_name(j->stage));
	add_str(e, "reason", reason);
	add_str(e, "message", j->fail_message);
	json_object_object_add(e, "retryable", json_object_new_boolean(reason_retryable(reason)));
	struct json_object *disks = json_object_new_array();
	for (size_t i = 0; i < j->n_disks; i++) {
		struct json_object *d = json_object_new_object();
		add_int(d, "key", j->disks[i].key);
		add_str(d, "status", disk_outcome(&j->disks[i]));
		if (j->disks[i].error[0])
			add_str(d, "error", j->disks[i].error);
		json_object_array_add(disks, d);
	}
	json_object_object_add(e, "disks", disks);
	if (commit(&b, BW_JOB_FAILED, reason) != 0)
		j->state = BW_JOB_FAILED; /* compensate all the same; the ledger retries later */
	crash_point("failed", 0);
	if (j->call) {
		bw_sna_cancel(j->w->sna, j->call);
		j->call = NULL;
	}
}

static struct json_object *action(struct json_object *actions, const char *kind, bool ok,
				  const char *error)
{
	struct json_object *a = json_object_new_object();
	add_str(a, "kind", kind);
	add_str(a, "result", ok ? "done" : "failed");
	if (error && error[0])
		add_str(a, "error", error);
	json_object_array_add(actions, a);
	return a;
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

	struct json_object *actions = json_object_new_array(), *pending = json_object_new_array();
	for (size_t i = 0; i < j->n_disks; i++) {
		struct job_disk *d = &j->disks[i];
		if (d->stop_done) {
			/* the goal is a server that no longer runs: one that ended badly on its
			 * way out is stopped all the same (how it ended is in the log) */
			bool ok = d->stop_rc == 0 || d->nbd.exited;
			if (d->stop_rc != 0)
				bw_log_warnx("job=%s disk=%" PRId64 " stopping qemu-nbd: %s",
					     j->spec->job_id, d->key, d->stop_error);
			struct json_object *a = action(actions, "qemu_nbd_stopped", ok,
						       ok ? NULL : d->stop_error);
			add_int(a, "key", d->key);
			add_int(a, "pid", d->nbd.pid);
			if (!ok) {
				struct json_object *p = json_object_new_object();
				add_str(p, "kind", "qemu_nbd_stopped");
				add_int(p, "pid", d->nbd.pid);
				add_int(p, "key", d->key);
				add_str(p, "error", d->stop_error);
				json_object_array_add(pending, p);
			}
		}
		bw_nbd_release(&d->nbd);
	}
	for (size_t i = 0; i < j->n_disks; i++) {
		struct job_disk *d = &j->disks[i];
		if (d->port == 0)
			continue;
		int rc = bw_ledger_release(w->ledger, &j->fence, d->port);
		struct json_object *a = action(actions, "port_released", rc == 0 || rc == BW_ENOENT,
					       rc && rc != BW_ENOENT ? bw_strerror(rc) : NULL);
		add_int(a, "port", d->port);
		add_int(a, "key", d->key);
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
			struct json_object *a = action(actions, "qcow2_kept", true, NULL);
			add_int(a, "key", d->key);
			add_str(a, "path", d->qcow2_path);
			continue;
		}
		bool ok = unlink(d->qcow2_path) == 0 || access(d->qcow2_path, F_OK) != 0;
		struct json_object *a = action(actions, "qcow2_removed", ok, ok ? NULL : "unlink failed");
		add_int(a, "key", d->key);
		add_str(a, "path", d->qcow2_path);
		if (!ok) {
			struct json_object *p = json_object_new_object();
			add_str(p, "kind", "qcow2_removed");
			add_str(p, "path", d->qcow2_path);
			json_object_array_add(pending, p);
		}
		d->created = false;
	}
	if (j->cleanup_wanted) {
		action(actions, "sna_cleanup_requested", !j->cleanup_failed, j->cleanup_error);
		if (j->cleanup_failed) {
			struct json_object *p = json_object_new_object();
			add_str(p, "kind", "sna_cleanup_requested");
			add_str(p, "error", j->cleanup_error);
			json_object_array_add(pending, p);
		}
	}
	struct batch b = {j, {0}, 0, NULL, 0};
	struct json_object *e = ev(&b, "backup.cleanup", NULL);
	json_object_object_add(e, "actions", actions);
	json_object_object_add(e, "pending", pending);
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
		u[i] = (struct bw_disk_update){j->disks[i].key, "creating", 0, 0, true};
	}
	int rc = bw_ledger_reserve_and_move(w->ledger, &j->fence, keys, j->n_disks, ports,
					    BW_JOB_RESERVED, u, j->n_disks);
	if (rc == BW_ENOPORTS) {
		if (j->state == BW_JOB_CLAIMED) {
			struct batch b = {j, {0}, 0, NULL, 0};
			if (commit(&b, BW_JOB_WAITING_PORTS, NULL) != 0)
				return;
			crash_point("waiting_ports", 0);
			j->ports_until_ms = now + (int64_t)w->cfg->job_port_wait_s * 1000;
			bw_log_info("job=%s waiting for %zu free ports (up to %d s)", j->spec->job_id,
				    j->n_disks, w->cfg->job_port_wait_s);
		}
		if (now >= j->ports_until_ms)
			job_fail(j, "no_ports", "%zu ports not free within %d s in %d-%d", j->n_disks,
			     w->cfg->job_port_wait_s, w->cfg->nbd_port_min, w->cfg->nbd_port_max);
		j->next_try_ms = now + PORT_RETRY_MS;
		return;
	}
	if (rc != 0) {
		if (bw_err_transient(rc)) {
			j->next_try_ms = now + PORT_RETRY_MS;
			return;
		}
		job_fail(j, "internal_error", "reserving ports: %s", bw_strerror(rc));
		return;
	}
	for (size_t i = 0; i < j->n_disks; i++)
		j->disks[i].port = ports[i];
	j->state = BW_JOB_RESERVED;
	crash_point("reserved", 0);
}

/* Every image (a few small writes each, no process): recorded as being created before. */
static void create_targets(struct job *j)
{
	char err[600];
	for (size_t i = 0; i < j->n_disks; i++) {
		struct job_disk *d = &j->disks[i];
		if (d->created)
			continue;
		struct bw_target t = {j->repository, j->vm_dir, d->key, j->spec->job_id,
				      d->size_bytes, d->parent_path, 0640};
		int rc = bw_target_create(&t, err, sizeof(err));
		if (rc != 0) {
			copy_text(d->error, sizeof(d->error), err);
			job_fail(j, rc == BW_EPERM || rc == BW_EEXIST || rc == BW_EINVAL ? "target_error"
											 : "internal_error",
				 "disk %" PRId64 ": %s", d->key, err);
			return;
		}
		d->created = true;
		crash_point("creating", i + 1);
	}
	struct batch b = {j, {0}, 0, NULL, 0};
	if (commit(&b, BW_JOB_TARGETS_CREATED, NULL) == 0)
		crash_point("targets_created", 0);
}

static int spawn_disk(struct job *j, struct job_disk *d, char *err, size_t errsize)
{
	const struct bw_config *cfg = j->w->cfg;
	struct bw_nbd_opts o = {cfg->nbd_qemu_nbd,  d->qcow2_path,   d->export_name,
				cfg->nbd_bind_address, d->port, cfg->nbd_shared, d->log_path};
	int rc = bw_nbd_spawn(&o, &d->nbd, err, errsize);
	if (rc != 0)
		return rc;
	d->spawned = true;
	bw_log_debug("job=%s disk=%" PRId64 " port=%d pid=%ld qemu-nbd started", j->spec->job_id,
		     d->key, d->port, (long)d->nbd.pid);
	return 0;
}

/* The servers started so far as disk rows (pid and start time: who may be signalled later). */
static size_t server_rows(struct job *j, struct bw_disk_update *u)
{
	size_t n = 0;
	for (size_t i = 0; i < j->n_disks; i++) {
		struct job_disk *d = &j->disks[i];
		if (d->spawned && !d->nbd.exited)
			u[n++] = (struct bw_disk_update){d->key, "serving", d->nbd.pid,
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
	for (size_t i = 0; i < j->n_disks; i++) {
		if (spawn_disk(j, &j->disks[i], err, sizeof(err)) != 0) {
			if (record_servers(j) != 0)
				bw_log_warnx("job=%s ledger: cannot record its servers", j->spec->job_id);
			copy_text(j->disks[i].error, sizeof(j->disks[i].error), err);
			job_fail(j, "qemu_nbd_failed", "disk %" PRId64 ": %s", j->disks[i].key, err);
			return;
		}
		crash_point("spawned", i + 1);
	}
	/* a crash before this commit leaves servers the ledger does not name: the recovery
	 * finds them by their export name (bw_nbd_find) */
	struct bw_disk_update u[BW_MESSAGE_MAX_DISKS];
	struct batch b = {j, {0}, 0, u, server_rows(j, u)};
	if (commit(&b, BW_JOB_SERVING, NULL) != 0) {
		job_fail(j, "internal_error", "ledger: cannot record the servers");
		return;
	}
	j->next_try_ms = worker_now_ms() + NBD_READY_MS;
	crash_point("serving", 0);
}

#define TARGETS_MAX (BW_MESSAGE_MAX_DISKS * 450)

/* Sets every disk's nbd_url and writes the one targets string "key:url,key:url,..". */
static void build_targets(struct job *j, char *targets)
{
	const char *h = j->w->cfg->nbd_advertise_host;
	bool v6 = strchr(h, ':') != NULL;
	size_t used = 0;
	targets[0] = '\0';
	for (size_t i = 0; i < j->n_disks; i++) {
		struct job_disk *d = &j->disks[i];
		snprintf(d->nbd_url, sizeof(d->nbd_url), "nbd://%s%s%s:%d/%s", v6 ? "[" : "", h,
			 v6 ? "]" : "", d->port, d->export_name);
		used += (size_t)snprintf(targets + used, TARGETS_MAX - used, "%s%" PRId64 ":%s",
					 i ? "," : "", d->key, d->nbd_url);
	}
}

static void start_done_cb(void *arg, const struct bw_sna_result *r);

/* Every server greets: build the targets and call the SNA, once for the whole VM. */
static void call_sna(struct job *j)
{
	struct worker *w = j->w;
	char err[600];
	struct bw_credential *cred = NULL;
	int rc = bw_credential_load(w->cfg->credentials_dir, j->spec->credential_id, &cred, err,
				    sizeof(err));
	if (rc != 0) {
		job_fail(j, "credential_error", "%s", err);
		return;
	}
	/* persisted before the side effect: from here on the SNA may know this job */
	struct batch b = {j, {0}, 0, NULL, 0};
	if (commit(&b, BW_JOB_SNA_REQUESTED, NULL) != 0) {
		bw_credential_free(cred);
		return;
	}
	struct json_object *body = json_object_new_object(), *disks = json_object_new_array();
	char targets[TARGETS_MAX];
	const char *first_change = "";
	build_targets(j, targets);
	for (size_t i = 0; i < j->n_disks; i++) {
		struct job_disk *d = &j->disks[i];
		struct json_object *o = json_object_new_object();
		add_int(o, "key", d->key);
		add_str(o, "nbd_url", d->nbd_url);
		add_int(o, "size_bytes", d->size_bytes);
		add_str(o, "previous_change_id", d->previous_change_id ? d->previous_change_id : "");
		json_object_array_add(disks, o);
		if (first_change[0] == '\0' && d->previous_change_id)
			first_change = d->previous_change_id;
	}
	add_str(body, "job_id", j->spec->job_id);
	add_str(body, "vm_name", j->spec->vm_name);
	add_str(body, "vm_path", j->spec->vm_path);
	add_str(body, "vcenter_host", cred->vcenter_host);
	add_str(body, "vcenter_user", cred->username);
	add_str(body, "vcenter_password", cred->password);
	add_str(body, "backup_type", j->spec->backup_type == BW_BACKUP_FULL ? "full" : "incremental");
	add_str(body, "previous_change_id", first_change);
	add_str(body, "nbd_host", w->cfg->nbd_advertise_host);
	add_str(body, "nbd_targets", targets);
	json_object_object_add(body, "disks", disks);
	const char *text = json_object_to_json_string_ext(body, JSON_C_TO_STRING_PLAIN |
									 JSON_C_TO_STRING_NOSLASHESCAPE);
	j->sna_called = true;
	rc = bw_sna_start(w->sna, j->spec->job_id, text, start_done_cb, j, &j->call);
	/* the body held the password: wipe json-c's text and the credential */
	explicit_bzero((char *)text, strlen(text));
	json_object_put(body);
	bw_credential_free(cred);
	if (rc != 0) {
		job_fail(j, "internal_error", "cannot send the SNA start request: %s", bw_strerror(rc));
		return;
	}
	crash_point("sna_requested", 0);
	int64_t max_s = j->spec->max_duration_s ? j->spec->max_duration_s : w->cfg->job_max_duration_s;
	j->deadline_ms = worker_now_ms() + max_s * 1000;
	bw_log_info("job=%s SNA start requested for %zu disk(s): %s", j->spec->job_id, j->n_disks,
		    targets);
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
		copy_text(d->error, sizeof(d->error), err);
		job_fail(j, "qemu_nbd_failed", "disk %" PRId64 ": %s", d->key, err);
		return;
	}
	if (all) {
		call_sna(j);
		return;
	}
	if (now > j->next_try_ms)
		job_fail(j, "qemu_nbd_failed", "not every qemu-nbd greeted within %d ms", NBD_READY_MS);
}

/* ---- the transfer ------------------------------------------------------------------------- */

void job_started(struct job *j, const char *sna_job_id)
{
	struct batch b = {j, {0}, 0, NULL, 0};
	struct json_object *e = ev(&b, "backup.started", NULL);
	add_str(e, "sna_job_id", sna_job_id);
	char targets[TARGETS_MAX];
	build_targets(j, targets);
	struct json_object *disks = json_object_new_array();
	for (size_t i = 0; i < j->n_disks; i++) {
		struct job_disk *d = &j->disks[i];
		struct json_object *o = json_object_new_object();
		add_int(o, "key", d->key);
		add_str(o, "mode", d->parent_path ? "incremental" : "full");
		add_str(o, "status", "serving");
		add_int(o, "nbd_port", d->port);
		add_str(o, "export_name", d->export_name);
		add_str(o, "nbd_url", d->nbd_url);
		add_str(o, "qcow2_path", d->qcow2_path);
		add_int(o, "qemu_nbd_pid", d->nbd.pid);
		if (d->parent_path)
			add_str(o, "parent_path", d->parent_path);
		json_object_array_add(disks, o);
	}
	add_str(e, "nbd_targets", targets);
	json_object_object_add(e, "disks", disks);
	(void)commit(&b, BW_JOB_TRANSFERRING, NULL);
	j->next_try_ms = worker_now_ms(); /* first poll at once */
}

static void start_done_cb(void *arg, const struct bw_sna_result *r)
{
	struct job *j = arg;
	j->call = NULL;
	if (r->outcome == BW_SNA_REJECTED) {
		j->sna_called = false; /* a definite 4xx: it accepted nothing */
		job_fail(j, "sna_rejected", "the SNA rejected the start request: HTTP %d %.200s",
			 r->http_status, r->body);
		return;
	}
	if (r->outcome != BW_SNA_OK) {
		job_fail(j, "sna_unavailable", "no answer from the SNA after %d attempt(s): %s",
			 r->attempts, r->error);
		return;
	}
	crash_point("sna_accepted", 0);
	struct json_object *reply = json_tokener_parse(r->body), *v = NULL;
	bool named = reply && json_object_object_get_ex(reply, "job_id", &v) &&
		     json_object_is_type(v, json_type_string) && json_object_get_string_len(v) > 0;
	job_started(j, named ? json_object_get_string(v) : j->spec->job_id);
	json_object_put(reply);
	bw_log_info("job=%s started on the SNA", j->spec->job_id);
	if (j->w->stopping)
		job_hand_over(j);
}

/* The per-disk result fields of backup.disk.completed and backup.completed. */
static void disk_result(struct json_object *o, const struct job_disk *d)
{
	add_int(o, "key", d->key);
	add_str(o, "qcow2_path", d->qcow2_path);
	add_str(o, "change_id", d->change_id);
	add_int(o, "virtual_size", d->virtual_size);
	add_int(o, "actual_size", d->actual_size);
	add_str(o, "check", "ok");
}

/* A disk the SNA reports completed: its bytes must all be there; then it finalizes. */
static int begin_finalize(struct job *j, struct job_disk *d)
{
	if (d->bytes < d->total) {
		snprintf(d->error, sizeof(d->error),
			 "reported completed after %" PRId64 " of %" PRId64 " bytes", d->bytes, d->total);
		job_fail(j, "sna_failed", "disk %" PRId64 " %s", d->key, d->error);
		return -1;
	}
	if (j->state != BW_JOB_FINALIZING) {
		struct batch b = {j, {0}, 0, NULL, 0};
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
	snprintf(log, sizeof(log), "%s.check", d->log_path);
	if (d->fin == FIN_STOPPING) {
		rc = bw_nbd_stop_step(&d->nbd, BW_NBD_KEEP, NBD_STOP_MS, err, sizeof(err));
		if (rc == BW_EBUSY) {
			crash_point("finalizing", (size_t)(d - j->disks) + 1);
			return;
		}
		if (rc != 0) {
			copy_text(d->error, sizeof(d->error), err);
			job_fail(j, "qemu_nbd_failed", "disk %" PRId64 ": stop: %s", d->key, err);
			return;
		}
		bw_nbd_release(&d->nbd);
		rc = bw_image_check_start(w->cfg->nbd_qemu_img, d->qcow2_path, log, &d->check_pid,
					  err, sizeof(err));
		if (rc != 0) {
			copy_text(d->error, sizeof(d->error), err);
			job_fail(j, "check_failed", "disk %" PRId64 ": %s", d->key, err);
			return;
		}
		d->check_by_ms = worker_now_ms() + CHECK_MS;
		d->fin = FIN_CHECKING;
		crash_point("checking", (size_t)(d - j->disks) + 1);
		return;
	}
	rc = bw_image_check_finish(d->check_pid, d->qcow2_path, log, &d->virtual_size,
				   &d->actual_size, err, sizeof(err));
	if (rc == BW_EBUSY) {
		if (worker_now_ms() > d->check_by_ms)
			job_fail(j, "check_failed", "disk %" PRId64 ": qemu-img check still running after %d s",
			     d->key, CHECK_MS / 1000); /* the compensation ends it */
		return;
	}
	d->check_pid = 0;
	if (rc != 0) {
		copy_text(d->error, sizeof(d->error), err);
		job_fail(j, "check_failed", "disk %" PRId64 ": %s", d->key, err);
		return;
	}
	unlink(log);
	unlink(d->log_path); /* its server's log: nothing to tell of a disk that completed */
	d->completed = true;
	d->fin = FIN_NONE;

	/* the event and the disk's row in one transaction, then its port */
	char key[24];
	snprintf(key, sizeof(key), "%" PRId64, d->key);
	struct bw_disk_update u = {d->key, "completed", 0, 0, true};
	struct batch b = {j, {0}, 0, &u, 1};
	disk_result(ev(&b, "backup.disk.completed", key), d);
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
	struct batch b = {j, {0}, 0, NULL, 0};
	struct json_object *e = ev(&b, "backup.completed", NULL);
	add_int(e, "duration_ms", worker_now_ms() - j->claimed_ms);
	struct json_object *disks = json_object_new_array();
	for (size_t i = 0; i < j->n_disks; i++) {
		struct json_object *o = json_object_new_object();
		disk_result(o, &j->disks[i]);
		json_object_array_add(disks, o);
	}
	json_object_object_add(e, "disks", disks);
	if (commit(&b, BW_JOB_COMPLETED, NULL) == 0) {
		j->done = true;
		bw_log_info("job=%s completed: %zu disk(s) in %" PRId64 " ms", j->spec->job_id,
			    j->n_disks, worker_now_ms() - j->claimed_ms);
	}
}

static void progress_event(struct job *j, int64_t now)
{
	int64_t bytes = 0, total = 0;
	char sig[64];
	for (size_t i = 0; i < j->n_disks; i++) {
		bytes += j->disks[i].bytes;
		total += j->disks[i].total;
	}
	snprintf(sig, sizeof(sig), "%" PRId64 "/%" PRId64, bytes, total);
	if (strcmp(sig, j->progress_last) == 0 || now - j->progress_sent_ms < PROGRESS_EVENT_MS)
		return;
	struct batch b = {j, {0}, 0, NULL, 0};
	struct json_object *e = ev(&b, "backup.progress", NULL);
	json_object_object_add(e, "percent",
			       json_object_new_double(total > 0 ? 100.0 * (double)bytes / (double)total
								: 0.0));
	add_int(e, "bytes_transferred", bytes);
	add_int(e, "total_bytes", total);
	struct json_object *disks = json_object_new_array();
	for (size_t i = 0; i < j->n_disks; i++) {
		struct json_object *o = json_object_new_object();
		add_int(o, "key", j->disks[i].key);
		add_str(o, "status", j->disks[i].status[0] ? j->disks[i].status : "pending");
		add_int(o, "bytes_transferred", j->disks[i].bytes);
		add_int(o, "total_bytes", j->disks[i].total);
		json_object_array_add(disks, o);
	}
	json_object_object_add(e, "disks", disks);
	if (commit(&b, j->state, NULL) == 0) {
		snprintf(j->progress_last, sizeof(j->progress_last), "%s", sig);
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

static void progress_cb(void *arg, const struct bw_sna_result *r)
{
	struct job *j = arg;
	j->call = NULL;
	j->next_try_ms = worker_now_ms() + (int64_t)j->w->cfg->sna_poll_interval_s * 1000;
	if (r->outcome == BW_SNA_NOT_FOUND) {
		if (++j->lost >= j->w->cfg->sna_lost_after)
			job_fail(j, "sna_lost_job", "the SNA answered 404 for this job %d times in a row",
			     j->lost);
		return;
	}
	j->lost = 0;
	if (r->outcome != BW_SNA_OK) {
		/* transient, but not forever: as many polls as a call has attempts */
		if (++j->unanswered >= j->w->cfg->sna_max_attempts)
			job_fail(j, "sna_unavailable", "no progress answer from the SNA %d times in a row: %s",
			     j->unanswered, r->error);
		return;
	}
	j->unanswered = 0;
	crash_point("transferring", 0);
	job_progress_answer(j, r->body);
}

void job_progress_answer(struct job *j, const char *body)
{
	struct json_object *doc = json_tokener_parse(body), *v, *disks;
	if (doc == NULL || !json_object_object_get_ex(doc, "disks", &disks) ||
	    !json_object_is_type(disks, json_type_array)) {
		json_object_put(doc);
		bw_log_warnx("job=%s unreadable progress reply", j->spec->job_id);
		return;
	}
	bool any_failed = false;
	for (size_t i = 0; i < json_object_array_length(disks); i++) {
		struct json_object *o = json_object_array_get_idx(disks, i);
		struct job_disk *d = json_object_object_get_ex(o, "key", &v)
					     ? job_disk_by_key(j, json_object_get_int64(v))
					     : NULL;
		if (d == NULL || d->completed || d->fin != FIN_NONE)
			continue;
		if (json_object_object_get_ex(o, "bytes_transferred", &v))
			d->bytes = json_object_get_int64(v);
		if (json_object_object_get_ex(o, "total_bytes", &v))
			d->total = json_object_get_int64(v);
		if (json_object_object_get_ex(o, "status", &v))
			snprintf(d->status, sizeof(d->status), "%s", json_object_get_string(v));
		if (json_object_object_get_ex(o, "change_id", &v) &&
		    json_object_is_type(v, json_type_string))
			snprintf(d->change_id, sizeof(d->change_id), "%s", json_object_get_string(v));
		if (strcmp(d->status, "failed") == 0) {
			d->failed = true;
			any_failed = true;
			snprintf(d->error, sizeof(d->error), "the SNA reported this disk failed");
		}
	}
	const char *job_status = json_object_object_get_ex(doc, "status", &v) ? json_object_get_string(v) : "";
	char error[300] = "";
	if (json_object_object_get_ex(doc, "error", &v) && json_object_is_type(v, json_type_string))
		snprintf(error, sizeof(error), "%s", json_object_get_string(v));
	bool job_failed = strcmp(job_status, "failed") == 0;
	json_object_put(doc);

	/* disks completed in this answer finalize first, even when another one failed */
	bool finalizing = false;
	for (size_t i = 0; i < j->n_disks; i++) {
		struct job_disk *d = &j->disks[i];
		if (!d->completed && d->fin == FIN_NONE && strcmp(d->status, "completed") == 0 &&
		    !d->failed && begin_finalize(j, d) != 0)
			return;
		finalizing |= d->fin != FIN_NONE;
	}
	if (any_failed || job_failed) {
		j->deferred_reason = "sna_failed";
		snprintf(j->deferred_message, sizeof(j->deferred_message),
			 "the SNA reported the transfer failed%s%s", error[0] ? ": " : "", error);
		if (!finalizing)
			job_fail(j, j->deferred_reason, "%s", j->deferred_message);
		return;
	}
	/* once a disk finalizes the job stays finalizing (the ledger moves forward only) while
	 * the others still transfer */
	progress_event(j, worker_now_ms());
}

static void follow(struct job *j, int64_t now)
{
	if (now > j->deadline_ms) {
		job_fail(j, "deadline_exceeded", "the transfer did not end within %" PRId64 " s",
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
			copy_text(d->error, sizeof(d->error), err);
			job_fail(j, "qemu_nbd_failed", "disk %" PRId64 ": %s", d->key, err);
			return;
		}
		all &= d->completed;
		finalizing |= d->fin != FIN_NONE;
		reported &= d->completed || d->fin != FIN_NONE;
	}
	if (j->deferred_reason && !finalizing) {
		job_fail(j, j->deferred_reason, "%s", j->deferred_message);
		return;
	}
	if (all) {
		finish_job(j);
		return;
	}
	/* progress is asked for until the SNA reported every disk completed */
	if (!reported && j->call == NULL && now >= j->next_try_ms &&
	    bw_sna_progress(j->w->sna, j->spec->job_id, progress_cb, j, &j->call) != 0)
		j->next_try_ms = now + 1000;
}

/* ---- the job's life ------------------------------------------------------------------- */

void job_free(struct job *j)
{
	if (j == NULL)
		return;
	for (size_t i = 0; i < j->n_disks; i++)
		bw_nbd_release(&j->disks[i].nbd);
	free(j->disks);
	json_object_put(j->vm);
	bw_job_spec_free(j->spec);
	free(j->message);
	free(j);
}

static void step(struct job *j, int64_t now)
{
	if (j->adopting) {
		recover_ask(j, now); /* the SNA's answer decides (recover.c) */
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
	int64_t now = worker_now_ms();
	for (struct job *j = w->jobs; j; j = j->next) {
		/* a few steps at a time: each one is short and persisted first */
		for (int k = 0; k < 8 && !j->done; k++) {
			enum bw_job_state before = j->state;
			step(j, now);
			if (j->state == before)
				break;
		}
	}
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
	int64_t now = worker_now_ms(), best = -1;
	for (struct job *j = w->jobs; j; j = j->next) {
		int64_t t;
		if (j->state == BW_JOB_SERVING)
			t = 2; /* greeting probes */
		else if (children_busy(j))
			t = 20;
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
			job_fail(j, "worker_shutdown", "the worker was told to stop");
	}
}

/* Rejects body: backup.rejected into the outbox, then the caller nacks. */
static int reject(struct worker *w, const char *body, size_t len, const struct bw_verdict *vd)
{
	char *event = NULL, *id = NULL;
	int rc = bw_event_rejected(body, len, vd, w->host, w->cfg->worker_id, &event, &id);
	if (rc != 0)
		return rc;
	struct bw_event e = {id, "backup.rejected", 0, event};
	rc = bw_ledger_outbox_append(w->ledger, &e);
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
	    (j->disks = calloc(spec->n_disks, sizeof(*j->disks))) == NULL ||
	    (j->vm = bw_event_vm(spec)) == NULL)
		goto fail;
	j->n_disks = spec->n_disks;
	j->repository = bw_config_repository(cfg, spec->repository_id);
	bw_target_vm_dir(spec->vm_id, spec->vm_name, j->vm_dir);
	j->ctx = (struct bw_event_ctx){spec->job_id, w->host, cfg->worker_id, j->vm, spec->policy_id,
				       spec->tags};
	for (size_t i = 0; i < j->n_disks; i++) {
		struct job_disk *d = &j->disks[i];
		const struct bw_disk_spec *ds = &spec->disks[i];
		d->key = ds->key;
		d->size_bytes = ds->size_bytes;
		d->parent_path = ds->parent_path;
		d->previous_change_id = ds->previous_change_id;
		d->nbd.probe_fd = -1;
		d->nbd.pidfd = -1;
		snprintf(d->export_name, sizeof(d->export_name), "%s-%" PRId64, spec->job_id, d->key);
		struct bw_target t = {j->repository, j->vm_dir, d->key, spec->job_id, d->size_bytes,
				      d->parent_path, 0640};
		if (j->repository == NULL || bw_target_path(&t, d->qcow2_path, sizeof(d->qcow2_path)) != 0)
			goto fail;
		snprintf(d->log_path, sizeof(d->log_path), "%s/logs/%s-%" PRId64 ".log",
			 cfg->worker_state_dir, spec->job_id, d->key);
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
}

int job_receive(struct worker *w, const char *body, size_t len)
{
	const struct bw_config *cfg = w->cfg;
	struct bw_job_spec *spec = NULL;
	struct bw_verdict *vd = NULL;
	struct job *j = NULL;
	int rc = bw_message_parse(body, len, (size_t)cfg->job_max_message_bytes, &spec, &vd);
	if (rc == 0)
		rc = bw_message_check_host(spec, cfg, &vd);
	if (rc == BW_EMESSAGE) {
		rc = reject(w, body, len, vd);
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

	struct json_object *e = bw_event_begin(&j->ctx, "backup.accepted", 1, NULL);
	if (e == NULL)
		goto out;
	add_str(e, "backup_type", j->spec->backup_type == BW_BACKUP_FULL ? "full" : "incremental");
	add_int(e, "disk_count", (int64_t)j->n_disks);
	char *ebody = NULL, *eid = NULL;
	if ((rc = bw_event_finish(e, &ebody, &eid)) != 0)
		goto out;
	struct bw_event accepted = {eid, "backup.accepted", 1, ebody};
	struct bw_known existing;
	rc = bw_ledger_claim(w->ledger, j->spec->job_id, j->message, nd, j->n_disks, &accepted,
			     &j->generation, &existing);
	free(ebody);
	free(eid);
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
	if (rc != 0)
		goto out;
	crash_point("claimed", 0);
	j->seq = 1;
	j->state = BW_JOB_CLAIMED;
	j->fence = (struct bw_fence){j->spec->job_id, j->generation};
	j->claimed_ms = worker_now_ms();
	job_enqueue(w, j);
	bw_log_info("job=%s claimed: vm=%s %zu disk(s), %s", j->spec->job_id, j->spec->vm_path,
		    j->n_disks, j->spec->backup_type == BW_BACKUP_FULL ? "full" : "incremental");
	j = NULL;
out:
	job_free(j);
	bw_job_spec_free(spec);
	bw_verdict_free(vd);
	return rc;
}
