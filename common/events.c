/* events.c: builds every CONTRACT §4 event with json-c (the only place that does); ids come from the safe alphabet. */
#include "events.h"

#include "clock.h"
#include "json.h"
#include "text.h"

#include <inttypes.h>
#include <json-c/json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const reason_names[] = {
#define BW__FAIL_NAME(name, text, retryable) text,
	BW_FAIL_REASON_MAP(BW__FAIL_NAME)
#undef BW__FAIL_NAME
};
static const bool reason_retryable[] = {
#define BW__FAIL_RETRY(name, text, retryable) retryable,
	BW_FAIL_REASON_MAP(BW__FAIL_RETRY)
#undef BW__FAIL_RETRY
};
static const char *const outcome_names[] = {
#define BW__OUTCOME_NAME(name, text) text,
	BW_DISK_OUTCOME_MAP(BW__OUTCOME_NAME)
#undef BW__OUTCOME_NAME
};
static const char *const action_names[] = {
#define BW__ACTION_NAME(name, text) text,
	BW_ACTION_MAP(BW__ACTION_NAME)
#undef BW__ACTION_NAME
};

const char *bw_fail_reason_name(enum bw_fail_reason r)
{
	return (unsigned)r < BW_NAMES(reason_names) ? reason_names[r] : "internal_error";
}

bool bw_fail_reason_retryable(enum bw_fail_reason r)
{
	return (unsigned)r < BW_NAMES(reason_retryable) ? reason_retryable[r] : true;
}

const char *bw_disk_outcome_name(enum bw_disk_outcome o)
{
	return (unsigned)o < BW_NAMES(outcome_names) ? outcome_names[o] : "aborted";
}

const char *bw_action_name(enum bw_action_kind k)
{
	return (unsigned)k < BW_NAMES(action_names) ? action_names[k] : "unknown";
}

void bw_event_text_free(struct bw_event_text *e)
{
	if (e == NULL)
		return;
	free(e->event_id);
	free(e->body);
	e->event_id = e->body = NULL;
}

/* ---- json-c, kept to this file ------------------------------------------------------------ */

static void add_str(struct json_object *o, const char *k, const char *v)
{
	json_object_object_add(o, k, json_object_new_string(v));
}

static void add_int(struct json_object *o, const char *k, int64_t v)
{
	json_object_object_add(o, k, json_object_new_int64(v));
}

static void envelope(struct json_object *o, const char *event, const char *event_id,
		     const char *job_id, int64_t seq, const char *host, const char *worker_id)
{
	char now[BW_RFC3339_SIZE];
	bw_clock_rfc3339_now(now);
	json_object_object_add(o, "schema_version", json_object_new_int(1));
	add_str(o, "event", event);
	add_str(o, "event_id", event_id);
	json_object_object_add(o, "job_id", job_id ? json_object_new_string(job_id) : NULL);
	add_int(o, "seq", seq);
	add_str(o, "occurred_at", now);
	add_str(o, "host", host);
	add_str(o, "worker_id", worker_id);
}

/* A new event of a job with its envelope; id_extra: the per-disk key or progress seq. */
static struct json_object *begin(const struct bw_event_ctx *c, const char *event, int64_t seq,
				 const char *id_extra)
{
	const struct bw_job_spec *s = c->spec;
	char event_id[400];
	snprintf(event_id, sizeof(event_id), "%s/%s%s%s", s->job_id, event, id_extra ? "/" : "",
		 id_extra ? id_extra : "");
	struct json_object *o = json_object_new_object(), *vm = json_object_new_object();
	if (o == NULL || vm == NULL) {
		json_object_put(o);
		json_object_put(vm);
		return NULL;
	}
	envelope(o, event, event_id, s->job_id, seq, c->host, c->worker_id);
	add_str(vm, "name", s->vm_name);
	add_str(vm, "path", s->vm_path);
	if (s->vm_id)
		add_str(vm, "id", s->vm_id);
	json_object_object_add(o, "vm", vm);
	if (s->policy_id)
		add_str(o, "policy_id", s->policy_id);
	if (s->tags)
		json_object_object_add(o, "tags", json_object_get(s->tags));
	return o;
}

/* Serializes o (and puts it) into *out. */
static int finish(struct json_object *o, const char *name, int64_t seq, struct bw_event_text *out)
{
	if (o == NULL)
		return BW_ENOMEM;
	struct json_object *id = NULL;
	const char *text =
		json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
	char *b = text ? strdup(text) : NULL;
	char *e = json_object_object_get_ex(o, "event_id", &id) ? strdup(json_object_get_string(id))
								 : NULL;
	json_object_put(o);
	if (b == NULL || e == NULL) {
		free(b);
		free(e);
		return BW_ENOMEM;
	}
	*out = (struct bw_event_text){e, b, name, seq};
	return 0;
}

/* ---- the events -------------------------------------------------------------------------- */

int bw_event_accepted(const struct bw_event_ctx *c, struct bw_event_text *out)
{
	struct json_object *o = begin(c, "backup.accepted", 1, NULL);
	if (o) {
		add_str(o, "backup_type",
			c->spec->backup_type == BW_BACKUP_FULL ? "full" : "incremental");
		add_int(o, "disk_count", (int64_t)c->spec->n_disks);
	}
	return finish(o, "backup.accepted", 1, out);
}

int bw_event_started(const struct bw_event_ctx *c, int64_t seq, const char *sna_job_id,
		     const char *nbd_targets, const struct bw_event_started_disk *disks, size_t n,
		     struct bw_event_text *out)
{
	struct json_object *o = begin(c, "backup.started", seq, NULL);
	if (o) {
		add_str(o, "sna_job_id", sna_job_id);
		add_str(o, "nbd_targets", nbd_targets);
		struct json_object *list = json_object_new_array();
		for (size_t i = 0; i < n; i++) {
			const struct bw_event_started_disk *d = &disks[i];
			struct json_object *e = json_object_new_object();
			add_int(e, "key", d->key);
			add_str(e, "mode", d->parent_path ? "incremental" : "full");
			add_str(e, "status", "serving");
			add_int(e, "nbd_port", d->port);
			add_str(e, "export_name", d->export_name);
			add_str(e, "nbd_url", d->nbd_url);
			add_str(e, "qcow2_path", d->qcow2_path);
			add_int(e, "qemu_nbd_pid", d->pid);
			if (d->parent_path)
				add_str(e, "parent_path", d->parent_path);
			json_object_array_add(list, e);
		}
		json_object_object_add(o, "disks", list);
	}
	return finish(o, "backup.started", seq, out);
}

/* a + b, saturated at INT64_MAX (both >= 0) */
static int64_t add_sat(int64_t a, int64_t b)
{
	int64_t s;
	return __builtin_add_overflow(a, b, &s) ? INT64_MAX : s;
}

int bw_event_progress(const struct bw_event_ctx *c, int64_t seq,
		      const struct bw_event_progress_disk *disks, size_t n,
		      struct bw_event_text *out)
{
	char extra[24];
	snprintf(extra, sizeof(extra), "%" PRId64, seq);
	struct json_object *o = begin(c, "backup.progress", seq, extra);
	if (o) {
		int64_t bytes = 0, total = 0;
		struct json_object *list = json_object_new_array();
		for (size_t i = 0; i < n; i++) {
			const struct bw_event_progress_disk *d = &disks[i];
			bytes = add_sat(bytes, d->bytes_transferred);
			total = add_sat(total, d->total_bytes);
			struct json_object *e = json_object_new_object();
			add_int(e, "key", d->key);
			add_str(e, "status", bw_sna_status_name(d->status));
			add_int(e, "bytes_transferred", d->bytes_transferred);
			add_int(e, "total_bytes", d->total_bytes);
			json_object_array_add(list, e);
		}
		double percent = total > 0 ? 100.0 * (double)bytes / (double)total : 0.0;
		json_object_object_add(o, "percent", json_object_new_double(percent > 100 ? 100 : percent));
		add_int(o, "bytes_transferred", bytes);
		add_int(o, "total_bytes", total);
		json_object_object_add(o, "disks", list);
	}
	return finish(o, "backup.progress", seq, out);
}

static void disk_result(struct json_object *o, const struct bw_disk_result *d)
{
	add_int(o, "key", d->key);
	add_str(o, "qcow2_path", d->qcow2_path);
	add_str(o, "change_id", d->change_id);
	add_int(o, "virtual_size", d->virtual_size);
	add_int(o, "actual_size", d->actual_size);
	add_str(o, "check", "ok");
}

int bw_event_disk_completed(const struct bw_event_ctx *c, int64_t seq,
			    const struct bw_disk_result *d, struct bw_event_text *out)
{
	char extra[24];
	snprintf(extra, sizeof(extra), "%" PRId64, d->key);
	struct json_object *o = begin(c, "backup.disk.completed", seq, extra);
	if (o)
		disk_result(o, d);
	return finish(o, "backup.disk.completed", seq, out);
}

int bw_event_completed(const struct bw_event_ctx *c, int64_t seq, int64_t duration_ms,
		       const struct bw_disk_result *disks, size_t n, struct bw_event_text *out)
{
	struct json_object *o = begin(c, "backup.completed", seq, NULL);
	if (o) {
		add_int(o, "duration_ms", duration_ms);
		struct json_object *list = json_object_new_array();
		for (size_t i = 0; i < n; i++) {
			struct json_object *e = json_object_new_object();
			disk_result(e, &disks[i]);
			json_object_array_add(list, e);
		}
		json_object_object_add(o, "disks", list);
	}
	return finish(o, "backup.completed", seq, out);
}

int bw_event_failed(const struct bw_event_ctx *c, int64_t seq, enum bw_job_state stage,
		    enum bw_fail_reason reason, const char *message,
		    const struct bw_event_failed_disk *disks, size_t n, struct bw_event_text *out)
{
	struct json_object *o = begin(c, "backup.failed", seq, NULL);
	if (o) {
		add_str(o, "stage", bw_job_state_name(stage));
		add_str(o, "reason", bw_fail_reason_name(reason));
		add_str(o, "message", message);
		json_object_object_add(o, "retryable",
				       json_object_new_boolean(bw_fail_reason_retryable(reason)));
		struct json_object *list = json_object_new_array();
		for (size_t i = 0; i < n; i++) {
			struct json_object *e = json_object_new_object();
			add_int(e, "key", disks[i].key);
			add_str(e, "status", bw_disk_outcome_name(disks[i].status));
			if (disks[i].error && disks[i].error[0])
				add_str(e, "error", disks[i].error);
			json_object_array_add(list, e);
		}
		json_object_object_add(o, "disks", list);
	}
	return finish(o, "backup.failed", seq, out);
}

/* An action's fields; with_result: an actions[] entry, else a pending[] one. */
static struct json_object *action(const struct bw_cleanup_action *a, bool with_result)
{
	struct json_object *e = json_object_new_object();
	add_str(e, "kind", bw_action_name(a->kind));
	if (a->key)
		add_int(e, "key", a->key);
	if (a->port)
		add_int(e, "port", a->port);
	if (a->pid)
		add_int(e, "pid", a->pid);
	if (a->path)
		add_str(e, "path", a->path);
	if (with_result)
		add_str(e, "result", a->ok ? "done" : "failed");
	if (a->error && a->error[0])
		add_str(e, "error", a->error);
	return e;
}

int bw_event_cleanup(const struct bw_event_ctx *c, int64_t seq,
		     const struct bw_cleanup_action *actions, size_t n, struct bw_event_text *out)
{
	struct json_object *o = begin(c, "backup.cleanup", seq, NULL);
	if (o) {
		struct json_object *done = json_object_new_array(), *pending = json_object_new_array();
		for (size_t i = 0; i < n; i++) {
			json_object_array_add(done, action(&actions[i], true));
			if (!actions[i].ok)
				json_object_array_add(pending, action(&actions[i], false));
		}
		json_object_object_add(o, "actions", done);
		json_object_object_add(o, "pending", pending);
	}
	return finish(o, "backup.cleanup", seq, out);
}

int bw_event_disk_completed_read(const char *body, char *change_id, size_t size,
				 int64_t *virtual_size, int64_t *actual_size)
{
	struct json_object *o = NULL, *v;
	char why[8];
	int rc = BW_EJSON;
	if (bw_json_parse_strict(body, strlen(body), &o, why, sizeof(why)) != 0)
		return BW_EJSON;
	if (json_object_object_get_ex(o, "change_id", &v) && json_object_is_type(v, json_type_string) &&
	    (size_t)json_object_get_string_len(v) < size) {
		int64_t vs, as;
		struct json_object *a, *b;
		if (json_object_object_get_ex(o, "virtual_size", &a) && bw_json_get_integer(a, &vs) &&
		    json_object_object_get_ex(o, "actual_size", &b) && bw_json_get_integer(b, &as)) {
			snprintf(change_id, size, "%s", json_object_get_string(v));
			*virtual_size = vs;
			*actual_size = as;
			rc = 0;
		}
	}
	json_object_put(o);
	return rc;
}

int bw_event_rejected(const char *raw, size_t len, const struct bw_verdict *vd, const char *host,
		      const char *worker_id, char **body, char **event_id)
{
	return bw_event_rejected_hashed(bw_fnv1a64(raw, len), vd, host, worker_id, body, event_id);
}

int bw_event_rejected_hashed(uint64_t raw_fnv1a64, const struct bw_verdict *vd, const char *host,
			     const char *worker_id, char **body, char **event_id)
{
	char id[40];
	snprintf(id, sizeof(id), "rejected/%016" PRIx64, raw_fnv1a64);
	struct json_object *o = json_object_new_object();
	struct json_object *errors = json_object_new_array();
	if (o == NULL || errors == NULL) {
		json_object_put(o);
		json_object_put(errors);
		return BW_ENOMEM;
	}
	envelope(o, "backup.rejected", id, vd->job_id, 0, host, worker_id);
	struct json_object *doc = vd->doc, *v;
	if (vd->vm_valid && json_object_object_get_ex(doc, "vm", &v))
		json_object_object_add(o, "vm", json_object_get(v));
	if (vd->policy_valid && json_object_object_get_ex(doc, "policy_id", &v))
		json_object_object_add(o, "policy_id", json_object_get(v));
	if (vd->tags_valid && json_object_object_get_ex(doc, "tags", &v))
		json_object_object_add(o, "tags", json_object_get(v));
	json_object_object_add(o, "reason",
			       json_object_new_string(bw_reject_reason_name(vd->reason)));
	for (size_t i = 0; i < vd->n; i++) {
		struct json_object *e = json_object_new_object();
		json_object_object_add(e, "path", json_object_new_string(vd->v[i].path));
		json_object_object_add(e, "rule", json_object_new_string(vd->v[i].rule));
		json_object_object_add(e, "message", json_object_new_string(vd->v[i].message));
		json_object_array_add(errors, e);
	}
	json_object_object_add(o, "errors", errors);
	struct bw_event_text t;
	int rc = finish(o, "backup.rejected", 0, &t);
	if (rc == 0) {
		*body = t.body;
		*event_id = t.event_id;
	}
	return rc;
}
