/* recover.c: the jobs of this host's dead workers: adopted when they still run, resumed when they were ending, compensated otherwise. */
#include "worker.h"

#include "cancel.h"
#include "clock.h"
#include "log.h"
#include "psk.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
	int rc = bw_event_disk_completed_read(body, d->change_id, sizeof(d->change_id),
					      &d->virtual_size, &d->actual_size);
	free(body);
	if (rc != 0)
		return false;
	d->completed = true;
	d->status = BW_SNA_COMPLETED;
	return true;
}

/* A server that is not running any more (or must not be touched): never signalled. */
static void server_gone(struct job_disk *d, pid_t pid)
{
	d->spawned = true;
	bw_nbd_mark_gone(&d->nbd, pid, d->log_path);
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

/*
 * A cancel recorded for the job while its worker was dead (or racing its death): the job
 * is ended now rather than adopted (CONTRACT §2.1). True when it was.
 */
static bool honour_cancel(struct job *j)
{
	char reason[BW_CANCEL_REASON_MAX * 4 + 1];
	if (bw_ledger_cancel_get(j->w->ledger, j->spec->job_id, reason, sizeof(reason)) != 0)
		return false;
	enum bw_job_state was = j->state;
	if (!job_cancel(j, reason))
		return false;
	bw_log_info("job=%s cancel: recorded while its worker was dead: ended by the worker "
		    "that took it over, in %s",
		    j->spec->job_id, bw_job_state_name(was));
	return true;
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
	j->claimed_ms = bw_clock_mono_ms() - (bw_clock_wall_ms() - r->created_at_ms);
	j->sna_called = r->sna_called;
	j->tls = bw_psk_exists(w->cfg->worker_state_dir, j->spec->job_id); /* as it was served */
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

	if (r->state != BW_JOB_FAILED && honour_cancel(j))
		return;
	switch (r->state) {
	case BW_JOB_FAILED:
		/* backup.failed was published: finish its compensation where it stopped */
		j->cleanup_wanted = r->sna_called;
		break;
	case BW_JOB_SNA_REQUESTED:
	case BW_JOB_TRANSFERRING:
	case BW_JOB_FINALIZING:
		if (r->boot_changed) {
			job_fail(j, BW_FAIL_WORKER_LOST, "the host rebooted while worker %s ran this job: "
				 "nothing of it runs any more", r->previous_owner);
		} else if (all_completed && r->state == BW_JOB_FINALIZING) {
			j->deadline_ms = INT64_MAX; /* every disk reported: backup.completed next */
		} else {
			/* the SNA may have the job: its answer decides between adopting and
			 * compensating (job.c, from the loop) */
			job_adopt(j);
		}
		break;
	default:
		job_fail(j, BW_FAIL_WORKER_LOST, "worker %s died while preparing it%s", r->previous_owner,
			 r->boot_changed ? " (the host rebooted since)" : "");
		break;
	}
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
	for (size_t i = 0; i < n; i++) {
		bw_log_set_job(jobs[i].job_id);
		take_over(w, &jobs[i]);
	}
	bw_log_set_job(NULL);
	bw_reaped_free(jobs, n);
}
