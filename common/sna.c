/* sna.c: the SNA's wire format (requests built, replies read strictly) and the client: bounded requests, jittered retries. */
#include "sna.h"

#include "buf.h"
#include "clock.h"
#include "json.h"
#include "config.h"
#include "psk.h"
#include "rand.h"

#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <unistd.h>

/* curl's fdset misses sockets while it resolves or connects: the loop never sleeps longer
 * than this while a call is active */
#define CURL_BLIND_MS 50

static const char *const status_names[] = {
#define BW__SNA_STATUS_NAME(name, text) text,
	BW_SNA_STATUS_MAP(BW__SNA_STATUS_NAME)
#undef BW__SNA_STATUS_NAME
};

const char *bw_sna_status_name(enum bw_sna_status s)
{
	return (unsigned)s < BW_NAMES(status_names) ? status_names[s] : "unknown";
}

static bool status_parse(const char *s, size_t n, enum bw_sna_status *out)
{
	for (unsigned i = 0; i < BW_NAMES(status_names); i++) {
		if (strlen(status_names[i]) == n && memcmp(s, status_names[i], n) == 0) {
			*out = (enum bw_sna_status)i;
			return true;
		}
	}
	return false;
}

/* ---- the start request ------------------------------------------------------------------- */

void bw_sna_nbd_url(char *out, size_t size, const char *host, int port, const char *export_name,
		    bool tls)
{
	bool v6 = strchr(host, ':') != NULL;
	snprintf(out, size, "%s://%s%s%s:%d/%s", tls ? "nbds" : "nbd", v6 ? "[" : "", host,
		 v6 ? "]" : "", port, export_name);
}

static void put_targets(struct bw_buf *b, const struct bw_sna_start_request *r)
{
	char url[512];
	for (size_t i = 0; i < r->n_disks; i++) {
		const struct bw_sna_target *t = &r->disks[i];
		bw_sna_nbd_url(url, sizeof(url), r->nbd_host, t->port, t->export_name, r->tls);
		bw_buf_printf(b, "%s%" PRId64 ":%s", i ? "," : "", t->key, url);
	}
}

int bw_sna_targets(const struct bw_sna_start_request *r, char **out)
{
	struct bw_buf b = BW_BUF_INIT;
	put_targets(&b, r);
	return bw_buf_steal(&b, out);
}

static void put_str(struct bw_buf *b, const char *key, const char *v, bool more)
{
	bw_buf_printf(b, "\"%s\":", key);
	bw_text_json_quote(b, v ? v : "", v ? strlen(v) : 0);
	if (more)
		bw_buf_puts(b, ",");
}

/* The body of §3.1, built in b (which the caller wipes: it holds the password). */
static void start_body(struct bw_buf *b, const struct bw_sna_start_request *r)
{
	const char *first_change = "";
	for (size_t i = 0; i < r->n_disks && first_change[0] == '\0'; i++)
		if (r->disks[i].previous_change_id)
			first_change = r->disks[i].previous_change_id;
	struct bw_buf targets = BW_BUF_INIT;
	put_targets(&targets, r);
	bw_buf_puts(b, "{");
	put_str(b, "job_id", r->job_id, true);
	put_str(b, "vm_name", r->vm_name, true);
	put_str(b, "vm_path", r->vm_path, true);
	put_str(b, "vcenter_host", r->vcenter_host, true);
	put_str(b, "vcenter_user", r->vcenter_user, true);
	put_str(b, "vcenter_password", r->vcenter_password, true);
	put_str(b, "backup_type", r->incremental ? "incremental" : "full", true);
	put_str(b, "previous_change_id", first_change, true);
	put_str(b, "nbd_host", r->nbd_host, true);
	put_str(b, "nbd_targets", targets.data, true);
	bw_buf_puts(b, "\"disks\":[");
	for (size_t i = 0; i < r->n_disks; i++) {
		const struct bw_sna_target *t = &r->disks[i];
		char url[512];
		bw_sna_nbd_url(url, sizeof(url), r->nbd_host, t->port, t->export_name, r->tls);
		bw_buf_printf(b, "%s{\"key\":%" PRId64 ",", i ? "," : "", t->key);
		put_str(b, "nbd_url", url, true);
		bw_buf_printf(b, "\"size_bytes\":%" PRId64 ",", t->size_bytes);
		put_str(b, "previous_change_id", t->previous_change_id, false);
		bw_buf_puts(b, "}");
	}
	bw_buf_puts(b, "]");
	if (r->tls) {
		bw_buf_puts(b, ",\"nbd_tls\":{\"mode\":\"psk\",");
		put_str(b, "identity", BW_PSK_IDENTITY, true);
		put_str(b, "psk", r->tls_psk, false);
		bw_buf_puts(b, "}");
	}
	bw_buf_puts(b, "}");
	if (targets.failed)
		b->failed = true;
	bw_buf_free(&targets);
}

/* ---- replies ----------------------------------------------------------------------------- */

/* An integer 0 - 2^63-1 in the JSON Schema sense (1.0 is 1), exactly. */
static bool byte_count(struct json_object *o, int64_t *out)
{
	if (json_object_get_type(o) == json_type_int) {
		int64_t v = json_object_get_int64(o);
		/* json-c saturates: INT64_MAX may stand for anything up to 2^64-1 and beyond */
		if (v < 0 || (v == INT64_MAX && json_object_get_uint64(o) != (uint64_t)INT64_MAX))
			return false;
		*out = v;
		return true;
	}
	int64_t v;
	if (json_object_get_type(o) != json_type_double || !bw_json_get_integer(o, &v) ||
	    json_object_get_double(o) < 0 || json_object_get_double(o) >= 9223372036854775808.0)
		return false;
	*out = v;
	return true;
}

static struct json_object *field(struct json_object *obj, const char *name)
{
	struct json_object *v = NULL;
	return json_object_object_get_ex(obj, name, &v) ? v : NULL;
}

/* A string member (NULL when absent, *bad when of another type). */
static const char *string_field(struct json_object *obj, const char *name, size_t *len, bool *bad)
{
	struct json_object *v = field(obj, name);
	if (v == NULL)
		return NULL;
	if (!json_object_is_type(v, json_type_string)) {
		*bad = true;
		return NULL;
	}
	*len = (size_t)json_object_get_string_len(v);
	return json_object_get_string(v);
}

/* The contract's rule for a completed disk (§3.2); false with why[] when unproven. */
static bool proven(const struct bw_sna_disk_progress *d, const struct bw_sna_disk_ref *ref,
		   char *why, size_t whysz)
{
	if (d->change_id[0] == '\0')
		snprintf(why, whysz, "reported completed without a change_id");
	else if (d->bytes_transferred != d->total_bytes)
		snprintf(why, whysz, "reported completed after %" PRId64 " of %" PRId64 " bytes",
			 d->bytes_transferred, d->total_bytes);
	else if (ref->full && d->total_bytes != ref->size_bytes)
		snprintf(why, whysz, "reported completed with %" PRId64 " bytes in all for a full "
			 "disk of %" PRId64, d->total_bytes, ref->size_bytes);
	else
		return true;
	return false;
}

/* Says why a reply is not an answer; returns BW_ESNA. */
static int unreadable(char *why, size_t whysz, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int unreadable(char *why, size_t whysz, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(why, whysz, fmt, ap);
	va_end(ap);
	return BW_ESNA;
}

static int parse_disk(struct json_object *o, size_t i, const struct bw_sna_disk_ref *refs,
		      size_t n, struct bw_sna_progress *p, char *why, size_t whysz)
{
	struct bw_sna_disk_progress *d = &p->disks[p->n_disks];
	const struct bw_sna_disk_ref *ref = NULL;
	int64_t key;
	size_t len = 0;
	bool bad = false;
	const char *s;
	if (!json_object_is_type(o, json_type_object))
		return unreadable(why, whysz, "disks[%zu] is not an object", i);
	if (field(o, "key") == NULL || !bw_json_get_integer(field(o, "key"), &key) ||
	    json_object_is_type(field(o, "key"), json_type_boolean))
		return unreadable(why, whysz, "disks[%zu].key is not an integer", i);
	for (size_t k = 0; k < n && ref == NULL; k++)
		if (refs[k].key == key)
			ref = &refs[k];
	if (ref == NULL)
		return unreadable(why, whysz, "disks[%zu].key %" PRId64 " is not a disk of this job", i, key);
	for (size_t k = 0; k < p->n_disks; k++)
		if (p->disks[k].key == key)
			return unreadable(why, whysz, "disks[%zu].key %" PRId64 " is there twice", i, key);
	d->key = key;
	s = string_field(o, "status", &len, &bad);
	if (s == NULL || !status_parse(s, len, &d->status))
		return unreadable(why, whysz, "disks[%zu].status is not one of pending, running, completed, failed", i);
	if (field(o, "bytes_transferred") == NULL ||
	    !byte_count(field(o, "bytes_transferred"), &d->bytes_transferred))
		return unreadable(why, whysz, "disks[%zu].bytes_transferred is not an integer 0 - 2^63-1", i);
	if (field(o, "total_bytes") == NULL || !byte_count(field(o, "total_bytes"), &d->total_bytes))
		return unreadable(why, whysz, "disks[%zu].total_bytes is not an integer 0 - 2^63-1", i);
	s = string_field(o, "change_id", &len, &bad);
	if (bad)
		return unreadable(why, whysz, "disks[%zu].change_id is not a string", i);
	if (s) {
		size_t cps = bw_utf8_length(s, len);
		if (cps > BW_SNA_CHANGE_ID_MAX_CP || bw_text_has_control(s, len))
			return unreadable(why, whysz, "disks[%zu].change_id is longer than %d characters or holds a "
				   "control character", i, BW_SNA_CHANGE_ID_MAX_CP);
		memcpy(d->change_id, s, len);
		d->change_id[len] = '\0';
	}
	if (d->status == BW_SNA_COMPLETED)
		d->proven = proven(d, ref, d->why, sizeof(d->why));
	p->n_disks++;
	return 0;
}

/* Reads the parsed reply doc into *out (allocated here; the caller frees it, also on error). */
static int parse_progress(struct json_object *doc, const struct bw_sna_disk_ref *disks, size_t n,
			  struct bw_sna_progress **out, char *why, size_t whysz)
{
	size_t len = 0;
	bool bad = false;
	if (!json_object_is_type(doc, json_type_object))
		return unreadable(why, whysz, "not a JSON object");
	if (string_field(doc, "job_id", &len, &bad) == NULL)
		return unreadable(why, whysz, "job_id is not a string");
	struct json_object *list = field(doc, "disks");
	if (list == NULL || !json_object_is_type(list, json_type_array))
		return unreadable(why, whysz, "disks is not an array");
	size_t count = json_object_array_length(list);
	if (count > n)
		return unreadable(why, whysz, "disks has %zu entries for a job of %zu disk(s)", count, n);
	struct bw_sna_progress *p = calloc(1, sizeof(*p) + count * sizeof(p->disks[0]));
	if ((*out = p) == NULL)
		return BW_ENOMEM;
	const char *s = string_field(doc, "status", &len, &bad);
	if (s == NULL || !status_parse(s, len, &p->status))
		return unreadable(why, whysz, "status is not one of pending, running, completed, failed");
	s = string_field(doc, "error", &len, &bad);
	if (bad)
		return unreadable(why, whysz, "error is not a string");
	if (s)
		bw_text_escape(p->error, sizeof(p->error), s, len);
	for (size_t i = 0; i < count; i++) {
		int rc = parse_disk(json_object_array_get_idx(list, i), i, disks, n, p, why, whysz);
		if (rc != 0)
			return rc;
	}
	return 0;
}

int bw_sna_progress_parse(const char *body, size_t len, const struct bw_sna_disk_ref *disks,
			  size_t n, struct bw_sna_progress **out, char *why, size_t whysz)
{
	struct json_object *doc = NULL;
	struct bw_sna_progress *p = NULL;
	char jwhy[160];
	if (len > BW_SNA_REPLY_MAX)
		return unreadable(why, whysz, "the reply is larger than %d bytes", BW_SNA_REPLY_MAX);
	int rc = bw_json_parse_strict(body, len, &doc, jwhy, sizeof(jwhy));
	if (rc == BW_ENOMEM)
		return rc;
	if (rc != 0)
		return unreadable(why, whysz, "not JSON: %s", jwhy);
	rc = parse_progress(doc, disks, n, &p, why, whysz);
	json_object_put(doc);
	if (rc != 0) {
		free(p);
		return rc;
	}
	*out = p;
	return 0;
}

/* The body's JSON object, or NULL (not JSON, not an object, too large). */
static struct json_object *reply_object(const char *body, size_t len)
{
	struct json_object *doc = NULL;
	char why[8];
	if (len > BW_SNA_REPLY_MAX || bw_json_parse_strict(body, len, &doc, why, sizeof(why)) != 0)
		return NULL;
	if (!json_object_is_type(doc, json_type_object)) {
		json_object_put(doc);
		return NULL;
	}
	return doc;
}

bool bw_sna_start_reply_parse(const char *body, size_t len, const char *job_id, char *id)
{
	struct json_object *doc = reply_object(body, len);
	size_t n = 0;
	bool bad = false;
	const char *s = doc ? string_field(doc, "job_id", &n, &bad) : NULL;
	bool named = s && n > 0 && n <= BW_TEXT_OUTSIDE_MAX && bw_utf8_length(s, n) != SIZE_MAX &&
		     !bw_text_has_control(s, n);
	snprintf(id, BW_SNA_TEXT_SIZE, "%s", named ? s : job_id);
	json_object_put(doc);
	return named;
}

bool bw_sna_cleanup_reply_parse(const char *body, size_t len, char *text)
{
	struct json_object *doc = reply_object(body, len);
	size_t n = 0;
	bool bad = false;
	const char *s = doc ? string_field(doc, "error", &n, &bad) : NULL;
	if (s == NULL && doc)
		s = string_field(doc, "message", &n, &bad);
	text[0] = '\0';
	if (s)
		bw_text_escape(text, BW_SNA_TEXT_SIZE, s, n);
	json_object_put(doc);
	return s != NULL;
}

/* ---- the client ------------------------------------------------------------------------ */

enum kind { K_START, K_PROGRESS, K_CLEANUP };

/* The call label of bw_sna_requests_total, by kind. */
static const char *const kind_names[] = {"start", "progress", "cleanup"};

static const char *const outcome_names[] = {
#define BW__SNA_OUTCOME_NAME(name, text) text,
	BW_SNA_OUTCOME_MAP(BW__SNA_OUTCOME_NAME)
#undef BW__SNA_OUTCOME_NAME
};

const char *bw_sna_outcome_name(enum bw_sna_outcome o)
{
	return (unsigned)o < BW_NAMES(outcome_names) ? outcome_names[o] : "unknown";
}

struct bw_sna_call {
	struct bw_sna *s;
	enum kind kind;
	char job_id[BW_SNA_TEXT_SIZE];
	char url[1024];
	struct bw_buf body; /* request body (POST); wiped when freed: it may hold the password */
	char idem[200];
	struct bw_sna_disk_ref *disks; /* progress: the job's disks */
	size_t n_disks;
	bw_sna_done_cb cb;
	void *arg;
	CURL *easy; /* NULL while waiting for a retry */
	struct curl_slist *headers;
	char *resp;
	size_t resp_len;
	bool flooded; /* the last reply was cut at BW_SNA_REPLY_MAX: not an answer */
	char curl_error[CURL_ERROR_SIZE]; /* curl's own words on a failed transfer */
	int attempts;
	int64_t retry_at_ms;
	int64_t request_us; /* the duration of the request that just ended; -1: none to count */
	struct bw_sna_result result;
	struct bw_sna_call *next;
};

struct bw_sna {
	struct bw_sna_opts o;
	bool private_path; /* https, or an SNA on loopback: a key may travel in a body */
	char *url;
	char *token;
	CURLM *multi;
	struct bw_sna_call *calls;
};

/* True for an https URL and for an http URL whose host is a loopback address. */
static bool private_path(const char *url)
{
	CURLU *u = curl_url();
	char *scheme = NULL, *host = NULL;
	bool ok = false;
	if (u && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
	    curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK &&
	    curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK)
		ok = strcmp(scheme, "https") == 0 || bw_config_host_is_loopback(host);
	curl_free(scheme);
	curl_free(host);
	curl_url_cleanup(u);
	return ok;
}

int bw_sna_new(struct bw_sna **out, const struct bw_sna_opts *o)
{
	static bool curl_ready;
	if (!curl_ready) {
		if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
			return BW_ESYS;
		curl_ready = true;
	}
	struct bw_sna *s = calloc(1, sizeof(*s));
	if (s == NULL)
		return BW_ENOMEM;
	s->o = *o;
	s->url = strdup(o->url);
	s->token = strdup(o->token ? o->token : "");
	s->multi = curl_multi_init();
	if (s->url == NULL || s->token == NULL || s->multi == NULL) {
		bw_sna_free(s);
		return BW_ENOMEM;
	}
	size_t n = strlen(s->url);
	while (n > 0 && s->url[n - 1] == '/')
		s->url[--n] = '\0';
	s->private_path = private_path(s->url);
	*out = s;
	return 0;
}

static void call_release_transfer(struct bw_sna_call *c)
{
	if (c->easy) {
		curl_multi_remove_handle(c->s->multi, c->easy);
		curl_easy_cleanup(c->easy);
		c->easy = NULL;
	}
	curl_slist_free_all(c->headers);
	c->headers = NULL;
}

static void call_free(struct bw_sna_call *c)
{
	call_release_transfer(c);
	if (c->body.data)
		explicit_bzero(c->body.data, c->body.cap);
	bw_buf_free(&c->body);
	free(c->disks);
	free(c->resp);
	free(c);
}

void bw_sna_free(struct bw_sna *s)
{
	if (s == NULL)
		return;
	while (s->calls) {
		struct bw_sna_call *c = s->calls;
		s->calls = c->next;
		call_free(c);
	}
	if (s->multi)
		curl_multi_cleanup(s->multi);
	if (s->token)
		explicit_bzero(s->token, strlen(s->token));
	free(s->token);
	free(s->url);
	free(s);
}

static size_t on_data(char *ptr, size_t size, size_t nmemb, void *arg)
{
	struct bw_sna_call *c = arg;
	size_t n = size * nmemb;
	if (c->resp_len + n > BW_SNA_REPLY_MAX)
		return 0; /* not an answer (§3.2): refuse the flood */
	char *p = realloc(c->resp, c->resp_len + n + 1);
	if (p == NULL)
		return 0;
	memcpy(p + c->resp_len, ptr, n);
	c->resp = p;
	c->resp_len += n;
	c->resp[c->resp_len] = '\0';
	return n;
}

/* Starts one request of call c. */
static int launch(struct bw_sna_call *c)
{
	struct bw_sna *s = c->s;
	char auth[600];
	free(c->resp);
	c->resp = NULL;
	c->resp_len = 0;
	c->flooded = false;
	c->easy = curl_easy_init();
	if (c->easy == NULL)
		return BW_ENOMEM;
	c->headers = curl_slist_append(NULL, "Accept: application/json");
	if (c->kind != K_PROGRESS)
		c->headers = curl_slist_append(c->headers, "Content-Type: application/json");
	if (c->idem[0])
		c->headers = curl_slist_append(c->headers, c->idem);
	if (s->token[0]) {
		snprintf(auth, sizeof(auth), "Authorization: Bearer %s", s->token);
		c->headers = curl_slist_append(c->headers, auth);
		explicit_bzero(auth, sizeof(auth));
	}
	curl_easy_setopt(c->easy, CURLOPT_URL, c->url);
	curl_easy_setopt(c->easy, CURLOPT_HTTPHEADER, c->headers);
	curl_easy_setopt(c->easy, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(c->easy, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(c->easy, CURLOPT_PROXY, ""); /* never the environment's http_proxy */
	if (s->o.tls_ca_file && s->o.tls_ca_file[0])
		curl_easy_setopt(c->easy, CURLOPT_CAINFO, s->o.tls_ca_file);
	if (s->o.tls_cert_file && s->o.tls_cert_file[0]) {
		curl_easy_setopt(c->easy, CURLOPT_SSLCERT, s->o.tls_cert_file);
		curl_easy_setopt(c->easy, CURLOPT_SSLKEY, s->o.tls_key_file);
	}
	curl_easy_setopt(c->easy, CURLOPT_CONNECTTIMEOUT_MS, (long)s->o.connect_timeout_s * 1000);
	curl_easy_setopt(c->easy, CURLOPT_TIMEOUT_MS, (long)s->o.timeout_s * 1000);
	curl_easy_setopt(c->easy, CURLOPT_WRITEFUNCTION, on_data);
	curl_easy_setopt(c->easy, CURLOPT_WRITEDATA, c);
	curl_easy_setopt(c->easy, CURLOPT_PRIVATE, c);
	c->curl_error[0] = '\0';
	curl_easy_setopt(c->easy, CURLOPT_ERRORBUFFER, c->curl_error);
	if (c->kind != K_PROGRESS) {
		curl_easy_setopt(c->easy, CURLOPT_POST, 1L);
		curl_easy_setopt(c->easy, CURLOPT_POSTFIELDS, c->body.data);
		curl_easy_setopt(c->easy, CURLOPT_POSTFIELDSIZE, (long)c->body.len);
	}
	if (curl_multi_add_handle(s->multi, c->easy) != CURLM_OK) {
		call_release_transfer(c);
		return BW_ESYS;
	}
	c->attempts++;
	return 0;
}

/* A new call of kind for job_id (its body, if any, already in *c). */
static struct bw_sna_call *call_new(struct bw_sna *s, enum kind kind, const char *job_id)
{
	struct bw_sna_call *c = calloc(1, sizeof(*c));
	if (c == NULL)
		return NULL;
	c->s = s;
	c->kind = kind;
	c->request_us = -1;
	c->body = (struct bw_buf)BW_BUF_INIT;
	snprintf(c->job_id, sizeof(c->job_id), "%s", job_id);
	return c;
}

static int add_call(struct bw_sna_call *c, const char *path, bw_sna_done_cb cb, void *arg,
		    struct bw_sna_call **out)
{
	struct bw_sna *s = c->s;
	c->cb = cb;
	c->arg = arg;
	snprintf(c->url, sizeof(c->url), "%s%s", s->url, path);
	int rc = c->body.failed ? BW_ENOMEM : launch(c);
	if (rc != 0) {
		call_free(c);
		return rc;
	}
	c->next = s->calls;
	s->calls = c;
	if (out)
		*out = c;
	return 0;
}

int bw_sna_start(struct bw_sna *s, const struct bw_sna_start_request *r, bw_sna_done_cb cb,
		 void *arg, struct bw_sna_call **call)
{
	if (!bw_text_is_safe_id(r->job_id, strlen(r->job_id)))
		return BW_EINVAL;
	if (r->tls && (r->tls_psk == NULL || strlen(r->tls_psk) != BW_PSK_HEX_SIZE - 1))
		return BW_EINVAL;
	if (r->tls && !s->private_path)
		return BW_EPERM;
	struct bw_sna_call *c = call_new(s, K_START, r->job_id);
	if (c == NULL)
		return BW_ENOMEM;
	snprintf(c->idem, sizeof(c->idem), "Idempotency-Key: %s", r->job_id);
	start_body(&c->body, r);
	return add_call(c, "/api/v1/backup/start", cb, arg, call);
}

int bw_sna_progress(struct bw_sna *s, const char *job_id, const struct bw_sna_disk_ref *disks,
		    size_t n, bw_sna_done_cb cb, void *arg, struct bw_sna_call **call)
{
	if (!bw_text_is_safe_id(job_id, strlen(job_id)))
		return BW_EINVAL;
	struct bw_sna_call *c = call_new(s, K_PROGRESS, job_id);
	if (c == NULL || (c->disks = calloc(n ? n : 1, sizeof(*disks))) == NULL) {
		free(c);
		return BW_ENOMEM;
	}
	memcpy(c->disks, disks, n * sizeof(*disks));
	c->n_disks = n;
	char path[300];
	snprintf(path, sizeof(path), "/api/v1/progress/%s", job_id); /* the safe alphabet */
	return add_call(c, path, cb, arg, call);
}

int bw_sna_cleanup(struct bw_sna *s, const char *job_id, bw_sna_done_cb cb, void *arg,
		   struct bw_sna_call **call)
{
	if (!bw_text_is_safe_id(job_id, strlen(job_id)))
		return BW_EINVAL;
	struct bw_sna_call *c = call_new(s, K_CLEANUP, job_id);
	if (c == NULL)
		return BW_ENOMEM;
	bw_buf_puts(&c->body, "{");
	put_str(&c->body, "job_id", job_id, true);
	put_str(&c->body, "action", "cleanup_all", false);
	bw_buf_puts(&c->body, "}");
	return add_call(c, "/api/v1/cleanup", cb, arg, call);
}

static void unlink_call(struct bw_sna *s, struct bw_sna_call *c)
{
	for (struct bw_sna_call **p = &s->calls; *p; p = &(*p)->next) {
		if (*p == c) {
			*p = c->next;
			return;
		}
	}
}

void bw_sna_cancel(struct bw_sna *s, struct bw_sna_call *call)
{
	unlink_call(s, call);
	call_free(call);
}

size_t bw_sna_active(const struct bw_sna *s)
{
	size_t n = 0;
	for (struct bw_sna_call *c = s->calls; c; c = c->next)
		n++;
	return n;
}

/* "HTTP 400: <the start of the body>", escaped: what a refusal said, for logs and events. */
static void status_text(struct bw_sna_call *c, long status)
{
	struct bw_sna_result *r = &c->result;
	int n = snprintf(r->error, sizeof(r->error), "HTTP %ld", status);
	if (c->resp_len == 0 || status < 300 || n < 0)
		return;
	char excerpt[200];
	bw_text_escape(excerpt, sizeof(excerpt), c->resp, c->resp_len);
	snprintf(r->error + n, sizeof(r->error) - (size_t)n, ": %s", excerpt);
}

/* Classifies one finished request; returns true when the call is over. */
static bool finished(struct bw_sna_call *c, CURLcode code)
{
	struct bw_sna_result *r = &c->result;
	long status = 0;
	curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE, &status);
	r->http_status = (int)status;
	r->attempts = c->attempts;
	if (code == CURLE_WRITE_ERROR && status > 0) {
		/* the write callback refused a reply over BW_SNA_REPLY_MAX: the status stands,
		 * the body is no answer */
		c->flooded = true;
		code = CURLE_OK;
		free(c->resp);
		c->resp = NULL;
		c->resp_len = 0;
	}
	if (code != CURLE_OK) {
		/* "SSL certificate problem: unable to get local issuer certificate" says more
		 * than "SSL peer certificate or SSH remote key was not OK" */
		char e[sizeof(c->curl_error) + 128];
		snprintf(e, sizeof(e), "%s%s%s", curl_easy_strerror(code), c->curl_error[0] ? ": " : "",
			 c->curl_error);
		bw_text_escape(r->error, sizeof(r->error), e, strlen(e));
		r->http_status = 0;
	} else {
		status_text(c, status);
	}
	bool transient = code != CURLE_OK || status >= 500;
	if (!transient) {
		if ((status >= 200 && status < 300) || (c->kind == K_START && status == 409))
			r->outcome = BW_SNA_OK;
		else if (status == 404 && c->kind == K_CLEANUP)
			r->outcome = BW_SNA_OK; /* nothing left there */
		else if (status == 404 && c->kind == K_PROGRESS)
			r->outcome = BW_SNA_NOT_FOUND;
		else
			r->outcome = BW_SNA_REJECTED;
		return true;
	}
	r->outcome = BW_SNA_UNAVAILABLE;
	if (c->kind == K_PROGRESS || c->attempts >= c->s->o.max_attempts)
		return true;
	c->retry_at_ms = bw_clock_mono_ms() + bw_backoff_ms(c->s->o.backoff_base_ms,
							    (int64_t)c->s->o.backoff_cap_s * 1000,
							    c->attempts);
	return false;
}

/* Counts the request of c that just ended, with outcome o (nothing when none ended). */
static void count_request(struct bw_sna_call *c, enum bw_sna_outcome o)
{
	if (c->request_us < 0)
		return;
	const char *call = kind_names[c->kind];
	bw_metrics_add(c->s->o.metrics, BW_METRIC_SNA_REQUESTS,
		       (const char *const[]){call, bw_sna_outcome_name(o)}, 1);
	bw_metrics_observe(c->s->o.metrics, BW_METRIC_SNA_DURATION, (const char *const[]){call},
			   (double)c->request_us / 1e6);
	c->request_us = -1;
}

/* Runs the callback of a call that is over, with its reply read into the result. */
static void complete(struct bw_sna *s, struct bw_sna_call *c)
{
	struct bw_sna_result *r = &c->result;
	struct bw_sna_progress *p = NULL;
	const char *body = c->resp ? c->resp : "";
	unlink_call(s, c);
	if (r->outcome == BW_SNA_OK && c->kind == K_START) {
		bw_sna_start_reply_parse(body, c->resp_len, c->job_id, r->sna_job_id);
	} else if (r->outcome == BW_SNA_OK && c->kind == K_PROGRESS) {
		char why[200];
		int rc = c->flooded ? BW_ESNA
				    : bw_sna_progress_parse(body, c->resp_len, c->disks, c->n_disks,
							    &p, why, sizeof(why));
		if (c->flooded)
			snprintf(why, sizeof(why), "the reply is larger than %d bytes", BW_SNA_REPLY_MAX);
		if (rc != 0) {
			r->outcome = BW_SNA_UNREADABLE;
			snprintf(r->error, sizeof(r->error), "HTTP %d, not an answer: %s",
				 r->http_status, rc == BW_ENOMEM ? "out of memory" : why);
		}
		r->progress = p;
	} else if (c->kind == K_CLEANUP && r->outcome != BW_SNA_OK && r->http_status) {
		char said[BW_SNA_TEXT_SIZE];
		if (bw_sna_cleanup_reply_parse(body, c->resp_len, said))
			snprintf(r->error, sizeof(r->error), "HTTP %d: %.400s", r->http_status, said);
	}
	count_request(c, r->outcome);
	if (c->cb)
		c->cb(c->arg, r);
	free(p);
	call_free(c);
}

void bw_sna_perform(struct bw_sna *s)
{
	int running = 0;
	curl_multi_perform(s->multi, &running);
	CURLMsg *m;
	int left;
	while ((m = curl_multi_info_read(s->multi, &left)) != NULL) {
		if (m->msg != CURLMSG_DONE)
			continue;
		struct bw_sna_call *c = NULL;
		curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&c);
		CURLcode code = m->data.result;
		bool over = finished(c, code);
		curl_off_t us = 0;
		curl_easy_getinfo(c->easy, CURLINFO_TOTAL_TIME_T, &us);
		c->request_us = us;
		call_release_transfer(c);
		if (over)
			complete(s, c);
		else
			count_request(c, BW_SNA_UNAVAILABLE); /* retried later */
	}
	/* retries that are due */
	int64_t now = bw_clock_mono_ms();
	for (struct bw_sna_call *c = s->calls, *next; c; c = next) {
		next = c->next;
		if (c->easy == NULL && c->retry_at_ms <= now && launch(c) != 0) {
			snprintf(c->result.error, sizeof(c->result.error), "cannot start a request");
			complete(s, c);
		}
	}
	curl_multi_perform(s->multi, &running);
}

int bw_sna_pollfds(struct bw_sna *s, struct pollfd *fds, int max)
{
	fd_set r, w, x;
	int maxfd = -1, n = 0;
	FD_ZERO(&r);
	FD_ZERO(&w);
	FD_ZERO(&x);
	if (curl_multi_fdset(s->multi, &r, &w, &x, &maxfd) != CURLM_OK)
		return 0;
	for (int fd = 0; fd <= maxfd && n < max; fd++) {
		short ev = (short)((FD_ISSET(fd, &r) ? POLLIN : 0) | (FD_ISSET(fd, &w) ? POLLOUT : 0) |
				   (FD_ISSET(fd, &x) ? POLLPRI : 0));
		if (ev)
			fds[n++] = (struct pollfd){fd, ev, 0};
	}
	return n;
}

int bw_sna_timeout_ms(struct bw_sna *s)
{
	long t = -1;
	curl_multi_timeout(s->multi, &t);
	int64_t now = bw_clock_mono_ms();
	for (struct bw_sna_call *c = s->calls; c; c = c->next) {
		if (c->easy)
			continue;
		int64_t left = c->retry_at_ms > now ? c->retry_at_ms - now : 0;
		if (t < 0 || left < t)
			t = (long)left;
	}
	if (bw_sna_active(s) > 0 && (t < 0 || t > CURL_BLIND_MS))
		t = CURL_BLIND_MS;
	return (int)t;
}
