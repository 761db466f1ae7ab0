/* events.c: builds CONTRACT §4 events with json-c; every id comes from the safe alphabet. */
#include "events.h"
#include "text.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void bw_event_now(char *out)
{
	struct timespec ts;
	struct tm tm;
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	size_t n = strftime(out, 32, "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(out + n, 32 - n, ".%03dZ", (int)(ts.tv_nsec / 1000000));
}

struct json_object *bw_event_vm(const struct bw_job_spec *spec)
{
	struct json_object *vm = json_object_new_object();
	if (vm == NULL)
		return NULL;
	json_object_object_add(vm, "name", json_object_new_string(spec->vm_name));
	json_object_object_add(vm, "path", json_object_new_string(spec->vm_path));
	if (spec->vm_id)
		json_object_object_add(vm, "id", json_object_new_string(spec->vm_id));
	return vm;
}

static void envelope(struct json_object *o, const char *event, const char *event_id,
		     const char *job_id, int64_t seq, const char *host, const char *worker_id)
{
	char now[32];
	bw_event_now(now);
	json_object_object_add(o, "schema_version", json_object_new_int(1));
	json_object_object_add(o, "event", json_object_new_string(event));
	json_object_object_add(o, "event_id", json_object_new_string(event_id));
	json_object_object_add(o, "job_id", job_id ? json_object_new_string(job_id) : NULL);
	json_object_object_add(o, "seq", json_object_new_int64(seq));
	json_object_object_add(o, "occurred_at", json_object_new_string(now));
	json_object_object_add(o, "host", json_object_new_string(host));
	json_object_object_add(o, "worker_id", json_object_new_string(worker_id));
}

struct json_object *bw_event_begin(const struct bw_event_ctx *c, const char *event, int64_t seq,
				   const char *id_extra)
{
	char event_id[400];
	snprintf(event_id, sizeof(event_id), "%s/%s%s%s", c->job_id, event, id_extra ? "/" : "",
		 id_extra ? id_extra : "");
	struct json_object *o = json_object_new_object();
	if (o == NULL)
		return NULL;
	envelope(o, event, event_id, c->job_id, seq, c->host, c->worker_id);
	if (c->vm)
		json_object_object_add(o, "vm", json_object_get(c->vm));
	if (c->policy_id)
		json_object_object_add(o, "policy_id", json_object_new_string(c->policy_id));
	if (c->tags)
		json_object_object_add(o, "tags", json_object_get(c->tags));
	return o;
}

int bw_event_finish(struct json_object *o, char **body, char **event_id)
{
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
	*body = b;
	*event_id = e;
	return 0;
}

int bw_event_rejected(const char *raw, size_t len, const struct bw_verdict *vd, const char *host,
		      const char *worker_id, char **body, char **event_id)
{
	char id[40];
	snprintf(id, sizeof(id), "rejected/%016" PRIx64, bw_fnv1a64(raw, len));
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
	return bw_event_finish(o, body, event_id);
}
