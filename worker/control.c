/* control.c: backup.cancel (CONTRACT §2.1): the owner ends its job, every other worker records the cancel in the host's ledger. */
#include "worker.h"

#include "cancel.h"
#include "log.h"
#include "text.h"

#include <stdio.h>
#include <string.h>

/*
 * A worker looks in the ledger for cancels of its own jobs this often: one recorded by
 * another worker of the host (this worker's own delivery may have gone with a reconnect,
 * or it arrived while the job was being claimed), or one recorded for a dead worker's job
 * before this worker adopted it. A second is short next to any backup.
 */
#define CANCEL_CHECK_MS 1000

/* The job_id in memory and still this worker's (not handed over); NULL: none. */
static struct job *job_by_id(struct worker *w, const char *job_id)
{
	for (struct job *j = w->jobs; j; j = j->next)
		if (!j->done && strcmp(j->spec->job_id, job_id) == 0)
			return j;
	return NULL;
}

/* A cancel nobody here acted on in memory: the host's ledger decides and keeps it. */
static int record(struct worker *w, const struct bw_cancel *c, const char *reason)
{
	struct bw_cancel_record r;
	int rc = bw_ledger_cancel_record(w->ledger, c->job_id, c->reason,
					 w->cfg->job_cancel_memory_s, &r);
	if (rc != 0) {
		bw_log_warnx("job=%s cancel: cannot record it in the ledger: %s (%s); given back",
			     c->job_id, bw_strerror(rc), bw_ledger_errmsg(w->ledger));
		return bw_err_transient(rc) ? rc : BW_EBUSY;
	}
	switch (r.outcome) {
	case BW_CANCEL_ENDED:
		bw_log_info("job=%s cancel: the job already ended (%s, worker %s): left as it is",
			    c->job_id, bw_job_state_name(r.state), r.owner);
		break;
	case BW_CANCEL_KNOWN:
		bw_log_info("job=%s cancel: owned by worker %s (%s): recorded in the ledger for it "
			    "(reason: %s)",
			    c->job_id, r.owner, bw_job_state_name(r.state), reason);
		break;
	case BW_CANCEL_REMEMBERED:
		bw_log_info("job=%s cancel: unknown on this host: remembered for %d s, applied if "
			    "its backup.start arrives (reason: %s)",
			    c->job_id, w->cfg->job_cancel_memory_s, reason);
		break;
	case BW_CANCEL_NOT_KEPT:
		bw_log_info("job=%s cancel: unknown on this host and job.cancel_memory_s is 0: "
			    "not remembered",
			    c->job_id);
		break;
	}
	return 0;
}

int control_receive(struct worker *w, const struct bw_delivery *d)
{
	struct bw_cancel c;
	char why[256], reason[BW_TEXT_OUTSIDE_MAX + 1];
	if (d->too_large || d->body == NULL) {
		bw_log_info("an invalid backup.cancel dropped: %zu bytes, over the limit", d->len);
		return 0;
	}
	if (bw_cancel_parse(d->body, d->len, &c, why, sizeof(why)) != 0) {
		bw_log_info("an invalid backup.cancel dropped (%zu bytes): %s", d->len, why);
		return 0;
	}
	bw_text_escape(reason, sizeof(reason), c.reason, strlen(c.reason));
	struct job *j = job_by_id(w, c.job_id);
	if (j == NULL)
		return record(w, &c, reason);
	enum bw_job_state was = j->state;
	if (job_cancel(j, c.reason))
		bw_log_info("job=%s cancel: ended by its owner in %s (reason: %s)", c.job_id,
			    bw_job_state_name(was), reason);
	else
		bw_log_info("job=%s cancel: the job is already ending (%s): left as it is",
			    c.job_id, bw_job_state_name(was));
	return 0;
}

void control_step(struct worker *w, int64_t now)
{
	char reason[BW_CANCEL_REASON_MAX * 4 + 1];
	if (now - w->last_cancel_check_ms < CANCEL_CHECK_MS)
		return;
	w->last_cancel_check_ms = now;
	for (struct job *j = w->jobs; j; j = j->next) {
		if (j->done || j->state == BW_JOB_FAILED || bw_job_state_terminal(j->state))
			continue;
		int rc = bw_ledger_cancel_get(w->ledger, j->spec->job_id, reason, sizeof(reason));
		if (rc != 0) {
			if (rc != BW_ENOENT)
				bw_log_debug("job=%s cancel check: %s", j->spec->job_id,
					     bw_strerror(rc));
			continue;
		}
		enum bw_job_state was = j->state;
		if (job_cancel(j, reason))
			bw_log_info("job=%s cancel: recorded in the ledger by another worker of the "
				    "host: ended by its owner in %s",
				    j->spec->job_id, bw_job_state_name(was));
	}
}
