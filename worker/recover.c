/* recover.c: the jobs of this host's dead workers: adopted when they still run, resumed when they were ending, compensated otherwise. */
#include "worker.h"

#include "log.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static int64_t wall_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/*
 * A disk is completed when its backup.disk.completed was committed: the results come
 * back from that event's body. Returns true when there is one.
 */
static bool load_result(struct job *j, struct job_disk *d)
{
	char id[400], *body = NULL;
	snprintf(id, sizeof(id), "%s/backup.disk.completed/%" PRId64, j->spec->job_id, d->key);
	if (bw_ledger_event_body(j->w->ledger, id, &body) != 0)
		return false;
	struct json_object *o = json_tokener_parse(body), *v;
	free(body);
	if (o == NULL)
		return false;
	if (json_object_object_get_ex(o, "change_id", &v))
		snprintf(d->change_id, sizeof(d->change_id), "%s", json_object_get_string(v));
	if (json_object_object_get_ex(o, "virtual_size", &v))
		d->virtual_size = json_object_get_int64(v);
	if (json_object_object_get_ex(o, "actual_size", &v))
		d->actual_size = json_object_get_int64(v);
	json_object_put(o);
	d->completed = true;
	snprintf(d->status, sizeof(d->status), "completed");
	return true;
}

/* A server that is not running any more (or must not be touched): never signalled, its
 * end judged as clean (what it served is checked by qemu-img check before use). */
static void server_gone(struct job_disk *d, pid_t pid)
{
	d->spawned = true;
	d->nbd.pid = pid;
	d->nbd.exited = true;
	d->nbd.status = -1;
	d->nbd.ready = true;
	snprintf(d->nbd.log_path, sizeof(d->nbd.log_path), "%s", d->log_path);
	struct stat st;
	d->nbd.log_size = stat(d->log_path, &st) == 0 ? st.st_size : 0;
}

/* Takes over the servers of a disk: the recorded one, or one started but never recorded. */
static void take_server(struct job *j, struct job_disk *d, const struct bw_reaped_disk *rd,
			bool boot_changed)
{
	pid_t pid = rd->nbd_pid;
	uint64_t start = rd->nbd_start_time;
	if (boot_changed) {
		if (pid)
			server_gone(d, pid); /* that pid is some other process now */
		return;
	}
	if (pid == 0 && (!d->created || bw_nbd_find(d->export_name, &pid, &start) != 0))
		return;
	if (bw_nbd_adopt(pid, start, d->port, d->log_path, &d->nbd) == 0) {
		d->spawned = true;
		bw_log_info("job=%s disk=%" PRId64 " qemu-nbd pid %ld adopted", j->spec->job_id, d->key,
			    (long)pid);
	} else {
		server_gone(d, pid); /* gone, or the pid names another process: never signalled */
	}
}

static void adopt_cb(void *arg, const struct bw_sna_result *r)
{
	struct job *j = arg;
	const struct bw_config *cfg = j->w->cfg;
	j->call = NULL;
	/* the same patience as for a running job: a 404 sna.lost_after times in a row, no
	 * answer sna.max_attempts times; until then the question is asked again */
	j->next_try_ms = worker_now_ms() + (int64_t)cfg->sna_poll_interval_s * 1000;
	if (r->outcome == BW_SNA_NOT_FOUND) {
		if (++j->lost < cfg->sna_lost_after)
			return;
		j->adopting = false;
		job_fail(j, "worker_lost", "its worker died and the SNA does not know the job "
			 "(404, %d times)", j->lost);
		return;
	}
	if (r->outcome != BW_SNA_OK) {
		if (++j->unanswered < cfg->sna_max_attempts)
			return;
		j->adopting = false;
		job_fail(j, "worker_lost", "its worker died and the SNA gave no answer %d times: %s",
			 j->unanswered, r->error);
		return;
	}
	j->adopting = false;
	j->lost = j->unanswered = 0;
	struct json_object *doc = json_tokener_parse(r->body), *v, *disks = NULL;
	const char *status = doc && json_object_object_get_ex(doc, "status", &v)
				     ? json_object_get_string(v)
				     : "";
	if (doc)
		json_object_object_get_ex(doc, "disks", &disks);
	bool running = strcmp(status, "running") == 0 || strcmp(status, "completed") == 0 ||
		       strcmp(status, "pending") == 0;
	/* every disk still to come needs its server, unless the SNA has finished it */
	const struct job_disk *orphan = NULL;
	for (size_t i = 0; running && i < j->n_disks && orphan == NULL; i++) {
		const struct job_disk *d = &j->disks[i];
		if (d->completed || (d->spawned && !d->nbd.exited))
			continue;
		bool finished = false;
		for (size_t k = 0; disks && k < json_object_array_length(disks); k++) {
			struct json_object *o = json_object_array_get_idx(disks, k), *x;
			if (json_object_object_get_ex(o, "key", &x) && json_object_get_int64(x) == d->key &&
			    json_object_object_get_ex(o, "status", &x))
				finished = strcmp(json_object_get_string(x), "completed") == 0;
		}
		if (!finished)
			orphan = d;
	}
	char status_copy[32];
	snprintf(status_copy, sizeof(status_copy), "%s", status);
	json_object_put(doc);
	if (!running) {
		job_fail(j, strcmp(status_copy, "failed") == 0 ? "sna_failed" : "worker_lost",
			 "its worker died; the SNA reports the job %s", status_copy[0] ? status_copy : "unreadable");
		return;
	}
	if (orphan) {
		job_fail(j, "worker_lost",
			 "its worker died and disk %" PRId64 " lost its qemu-nbd (pid %ld) before the "
			 "SNA finished it", orphan->key, (long)orphan->nbd.pid);
		return;
	}
	int64_t max_s = j->spec->max_duration_s ? j->spec->max_duration_s
						: j->w->cfg->job_max_duration_s;
	j->deadline_ms = j->claimed_ms + max_s * 1000;
	if (j->state == BW_JOB_SNA_REQUESTED)
		job_started(j, j->spec->job_id);
	bw_log_info("job=%s adopted in %s: the SNA reports it %s", j->spec->job_id,
		    bw_job_state_name(j->state), status_copy);
	j->next_try_ms = worker_now_ms() + (int64_t)j->w->cfg->sna_poll_interval_s * 1000;
	job_progress_answer(j, r->body);
}

/* One job of a dead worker, now ours under a new generation. */
static void take_over(struct worker *w, const struct bw_reaped_job *r)
{
	struct bw_job_spec *spec = NULL;
	struct bw_verdict *vd = NULL;
	size_t len = strlen(r->message);
	int rc = bw_message_parse(r->message, len, len + 1, &spec, &vd);
	bw_verdict_free(vd);
	struct job *j = rc == 0 ? job_build(w, spec, r->message, len) : NULL;
	if (j == NULL) {
		/* accepted once, so only a changed rule or no memory: leave it for an operator
		 * (bw-ctl show) rather than guess what it held */
		bw_log_warnx("job=%s of dead worker %s cannot be taken over: its message %s",
			     r->job_id, r->previous_owner, rc ? "no longer parses" : "(out of memory)");
		return;
	}
	j->generation = r->generation;
	j->fence = (struct bw_fence){j->spec->job_id, j->generation};
	j->seq = r->seq;
	j->state = r->state;
	j->claimed_ms = worker_now_ms() - (wall_ms() - r->created_at_ms);
	j->sna_called = r->sna_called;
	bool all_completed = true;
	for (size_t i = 0; i < r->n_disks; i++) {
		const struct bw_reaped_disk *rd = &r->disks[i];
		struct job_disk *d = job_disk_by_key(j, rd->key);
		if (d == NULL)
			continue;
		d->port = rd->port;
		d->created = rd->qcow2_created && access(d->qcow2_path, F_OK) == 0;
		if (load_result(j, d))
			continue;
		all_completed = false;
		take_server(j, d, rd, r->boot_changed);
	}
	job_enqueue(w, j);
	bw_log_warnx("job=%s taken over from dead worker %s in %s%s", j->spec->job_id,
		     r->previous_owner, bw_job_state_name(r->state),
		     r->boot_changed ? " (the host rebooted since)" : "");

	switch (r->state) {
	case BW_JOB_FAILED:
		/* backup.failed was published: finish its compensation where it stopped */
		j->cleanup_wanted = r->sna_called;
		break;
	case BW_JOB_SNA_REQUESTED:
	case BW_JOB_TRANSFERRING:
	case BW_JOB_FINALIZING:
		if (r->boot_changed) {
			job_fail(j, "worker_lost", "the host rebooted while worker %s ran this job: "
				 "nothing of it runs any more", r->previous_owner);
		} else if (all_completed && r->state == BW_JOB_FINALIZING) {
			j->deadline_ms = INT64_MAX; /* every disk reported: backup.completed next */
		} else {
			/* the SNA may have the job: its answer decides between adopting and
			 * compensating (recover_ask, from the loop) */
			j->adopting = true;
			j->next_try_ms = 0;
		}
		break;
	default:
		job_fail(j, "worker_lost", "worker %s died while preparing it%s", r->previous_owner,
			 r->boot_changed ? " (the host rebooted since)" : "");
		break;
	}
}

void recover_ask(struct job *j, int64_t now)
{
	if (j->call != NULL || now < j->next_try_ms)
		return;
	if (bw_sna_progress(j->w->sna, j->spec->job_id, adopt_cb, j, &j->call) != 0)
		j->next_try_ms = now + 1000;
}

void recover_pass(struct worker *w)
{
	struct bw_reaped_job *jobs = NULL;
	size_t n = 0;
	int rc = bw_ledger_reap(w->ledger, &jobs, &n);
	if (rc != 0) {
		bw_log_debug("recovery pass: %s", bw_strerror(rc));
		return;
	}
	for (size_t i = 0; i < n; i++)
		take_over(w, &jobs[i]);
	bw_reaped_free(jobs, n);
}
