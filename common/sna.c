/* sna.c: start, progress and cleanup calls to the SNA, with bounded requests and jittered retries. */
#include "sna.h"

#include <curl/curl.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <time.h>
#include <unistd.h>

enum kind { K_START, K_PROGRESS, K_CLEANUP };

struct bw_sna_call {
	struct bw_sna *s;
	enum kind kind;
	char url[1024];
	char *body; /* request body (POST) */
	char idem[200];
	bw_sna_done_cb cb;
	void *arg;
	CURL *easy; /* NULL while waiting for a retry */
	struct curl_slist *headers;
	char *resp;
	size_t resp_len;
	int attempts;
	int64_t retry_at_ms;
	struct bw_sna_result result;
	struct bw_sna_call *next;
};

struct bw_sna {
	struct bw_sna_opts o;
	char *url;
	char *token;
	CURLM *multi;
	struct bw_sna_call *calls;
	uint64_t rng;
};

static int64_t mono_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
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
	s->rng = (uint64_t)mono_ms() * 6364136223846793005ULL ^ (uint64_t)getpid() ^ 1;
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
	if (c->body) {
		explicit_bzero(c->body, strlen(c->body)); /* it may hold the vCenter password */
		free(c->body);
	}
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
	if (c->resp_len + n > 1 << 20)
		return 0; /* an SNA reply is small: refuse a flood */
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
	curl_easy_setopt(c->easy, CURLOPT_CONNECTTIMEOUT_MS, (long)s->o.connect_timeout_s * 1000);
	curl_easy_setopt(c->easy, CURLOPT_TIMEOUT_MS, (long)s->o.timeout_s * 1000);
	curl_easy_setopt(c->easy, CURLOPT_WRITEFUNCTION, on_data);
	curl_easy_setopt(c->easy, CURLOPT_WRITEDATA, c);
	curl_easy_setopt(c->easy, CURLOPT_PRIVATE, c);
	if (c->kind != K_PROGRESS) {
		curl_easy_setopt(c->easy, CURLOPT_POST, 1L);
		curl_easy_setopt(c->easy, CURLOPT_POSTFIELDS, c->body);
		curl_easy_setopt(c->easy, CURLOPT_POSTFIELDSIZE, (long)strlen(c->body));
	}
	if (curl_multi_add_handle(s->multi, c->easy) != CURLM_OK) {
		call_release_transfer(c);
		return BW_ESYS;
	}
	c->attempts++;
	return 0;
}

static int add_call(struct bw_sna *s, enum kind kind, const char *job_id, const char *path,
		    const char *body, bw_sna_done_cb cb, void *arg, struct bw_sna_call **out)
{
	struct bw_sna_call *c = calloc(1, sizeof(*c));
	if (c == NULL)
		return BW_ENOMEM;
	c->s = s;
	c->kind = kind;
	c->cb = cb;
	c->arg = arg;
	snprintf(c->url, sizeof(c->url), "%s%s", s->url, path);
	if (kind == K_START)
		snprintf(c->idem, sizeof(c->idem), "Idempotency-Key: %s", job_id);
	if (body && (c->body = strdup(body)) == NULL) {
		free(c);
		return BW_ENOMEM;
	}
	int rc = launch(c);
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

int bw_sna_start(struct bw_sna *s, const char *job_id, const char *body, bw_sna_done_cb cb,
		 void *arg, struct bw_sna_call **call)
{
	return add_call(s, K_START, job_id, "/api/v1/backup/start", body, cb, arg, call);
}

int bw_sna_progress(struct bw_sna *s, const char *job_id, bw_sna_done_cb cb, void *arg,
		    struct bw_sna_call **call)
{
	char path[300];
	snprintf(path, sizeof(path), "/api/v1/progress/%s", job_id); /* job_id: safe alphabet */
	return add_call(s, K_PROGRESS, job_id, path, NULL, cb, arg, call);
}

int bw_sna_cleanup(struct bw_sna *s, const char *job_id, bw_sna_done_cb cb, void *arg,
		   struct bw_sna_call **call)
{
	char body[300];
	snprintf(body, sizeof(body), "{\"job_id\":\"%s\",\"action\":\"cleanup_all\"}", job_id);
	return add_call(s, K_CLEANUP, job_id, "/api/v1/cleanup", body, cb, arg, call);
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

/* Classifies one finished request; returns true when the call is over. */
static bool finished(struct bw_sna_call *c, CURLcode code)
{
	struct bw_sna_result *r = &c->result;
	long status = 0;
	curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE, &status);
	r->http_status = (int)status;
	r->attempts = c->attempts;
	if (code != CURLE_OK) {
		snprintf(r->error, sizeof(r->error), "%s", curl_easy_strerror(code));
		r->http_status = 0;
	} else {
		snprintf(r->error, sizeof(r->error), "HTTP %ld", status);
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
	/* full jitter: uniform in [0, min(cap, base * 2^(n-1))] */
	int64_t cap = (int64_t)c->s->o.backoff_base_ms << (c->attempts - 1 < 30 ? c->attempts - 1 : 30);
	if (cap > (int64_t)c->s->o.backoff_cap_s * 1000)
		cap = (int64_t)c->s->o.backoff_cap_s * 1000;
	c->s->rng = c->s->rng * 6364136223846793005ULL + 1442695040888963407ULL;
	c->retry_at_ms = mono_ms() + (int64_t)((c->s->rng >> 33) % (uint64_t)(cap + 1));
	return false;
}

static void complete(struct bw_sna *s, struct bw_sna_call *c)
{
	unlink_call(s, c);
	c->result.body = c->resp ? c->resp : (char *)"";
	c->result.len = c->resp_len;
	if (c->cb)
		c->cb(c->arg, &c->result);
	c->result.body = NULL;
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
		call_release_transfer(c);
		if (over)
			complete(s, c);
	}
	/* retries that are due */
	int64_t now = mono_ms();
	for (struct bw_sna_call *c = s->calls, *next; c; c = next) {
		next = c->next;
		if (c->easy == NULL && c->retry_at_ms <= now) {
			if (launch(c) != 0) {
				snprintf(c->result.error, sizeof(c->result.error), "cannot start a request");
				complete(s, c);
			}
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
	int64_t now = mono_ms();
	for (struct bw_sna_call *c = s->calls; c; c = c->next) {
		if (c->easy)
			continue;
		int64_t left = c->retry_at_ms > now ? c->retry_at_ms - now : 0;
		if (t < 0 || left < t)
			t = (long)left;
	}
	/* curl's fdset misses sockets while it resolves or connects: never sleep long then */
	if (bw_sna_active(s) > 0 && (t < 0 || t > 50))
		t = 50;
	return (int)t;
}

void bw_sna_run(struct bw_sna *s, int timeout_ms)
{
	int64_t until = mono_ms() + timeout_ms;
	while (bw_sna_active(s) > 0 && mono_ms() < until) {
		struct pollfd fds[64];
		int n = bw_sna_pollfds(s, fds, 64);
		int t = bw_sna_timeout_ms(s);
		poll(fds, (nfds_t)n, t < 0 || t > 100 ? 100 : t);
		bw_sna_perform(s);
	}
}
