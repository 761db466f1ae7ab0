/* ctl_dlq.c: bw-ctl dlq: list, show and requeue the dead-letter queue's messages without losing
 * one. */
#include "amqp_admin.h"
#include "json.h"
#include "text.h"
#include "ctl.h"

#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* dlq list shows at most this many messages unless --max says otherwise; a position
 * (show, requeue) is at most DLQ_POSITION_MAX: every message before it is held meanwhile. */
#define DLQ_LIST_DEFAULT 1000
#define DLQ_POSITION_MAX 100000

enum { OPT_JSON = 256, OPT_MAX, OPT_JOB };

/*
 * The messages taken from the head of the queue, in queue order. Ordering and concurrency:
 * the messages are taken with basic.get (no auto-ack) on one channel and stay unacked, so
 * no other consumer sees them meanwhile and none is lost if bw-ctl dies (the broker gives
 * back what the connection held). When done, each one not acked is given back with
 * basic.nack (requeue), from the first taken to the last: a quorum queue delivers the
 * messages given back before the others, in the order they were given back, so the
 * queue keeps its order (seen on RabbitMQ 3.10; giving them back last to first reversed
 * it on every listing). The messages given back come first even when other messages were
 * never taken, so every command takes the same number from the head (--max, 1000, or N
 * when larger), never only the first N: giving back fewer than were given back last time
 * would rotate the head of the queue. Each give-back counts as a delivery (x-delivery-count): the
 * DLQ has no delivery limit, so nothing is dropped for it. Positions count from the head as this
 * run saw it: a concurrent dlq command or a new dead letter may shift them (requeue --job guards
 * against acting on the wrong one).
 */
struct taken {
	struct bw_amqp_message *m;
	size_t n;
};

static void give_back(struct bw_amqp *c, struct taken *t, size_t skip_index)
{
	bool up = true; /* once the connection is gone, the broker gives them back itself */
	for (size_t i = 0; i < t->n; i++)
		if (up && i != skip_index)
			up = bw_amqp_settle(c, t->m[i].tag, false) == 0;
	for (size_t i = 0; i < t->n; i++)
		bw_amqp_message_free(&t->m[i]);
	free(t->m);
	t->m = NULL;
	t->n = 0;
}

/* Takes up to max messages from the head of queue into t. Returns 0 or a BW code (err). */
static int take(struct bw_amqp *c, const char *queue, size_t max, struct taken *t, char *err,
		size_t errsize)
{
	t->m = calloc(max ? max : 1, sizeof(*t->m));
	if (t->m == NULL)
		return BW_ENOMEM;
	while (t->n < max) {
		bool got = false;
		int rc = bw_amqp_get(c, queue, &t->m[t->n], &got, err, errsize);
		if (rc != 0)
			return rc;
		if (!got)
			break;
		t->n++;
	}
	return 0;
}

static struct json_object *header(struct json_object *props, const char *key)
{
	struct json_object *h = NULL, *v = NULL;
	if (json_object_object_get_ex(props, "headers", &h) &&
	    json_object_object_get_ex(h, key, &v))
		return v;
	return NULL;
}

/* The newest x-death entry (the broker puts it first), or NULL. */
static struct json_object *last_death(struct json_object *props)
{
	struct json_object *d = header(props, "x-death");
	if (d == NULL || !json_object_is_type(d, json_type_array) ||
	    json_object_array_length(d) == 0)
		return NULL;
	return json_object_array_get_idx(d, 0);
}

/*
 * Where a message was first dead-lettered from: x-first-death-queue and -reason name the
 * x-death entry, whose exchange and first routing key it was published with; without
 * them the oldest entry; without x-death the jobs exchange and backup.start.
 */
static void first_route(struct json_object *props, const struct bw_config *cfg,
			const char **exchange, const char **key)
{
	struct json_object *d = header(props, "x-death"), *chosen = NULL, *keys = NULL;
	*exchange = cfg->amqp_jobs_exchange;
	*key = CTL_START_KEY;
	if (d == NULL || !json_object_is_type(d, json_type_array) ||
	    json_object_array_length(d) == 0)
		return;
	struct json_object *q = header(props, "x-first-death-queue");
	struct json_object *r = header(props, "x-first-death-reason");
	size_t n = json_object_array_length(d);
	for (size_t i = 0; i < n && q && r; i++) {
		struct json_object *e = json_object_array_get_idx(d, i);
		const char *eq = ctl_str(e, "queue"), *er = ctl_str(e, "reason");
		if (eq && er && strcmp(eq, json_object_get_string(q)) == 0 &&
		    strcmp(er, json_object_get_string(r)) == 0)
			chosen = e;
	}
	if (chosen == NULL)
		chosen = json_object_array_get_idx(d, n - 1);
	const char *x = ctl_str(chosen, "exchange");
	if (x == NULL || !json_object_object_get_ex(chosen, "routing-keys", &keys) ||
	    !json_object_is_type(keys, json_type_array) || json_object_array_length(keys) == 0 ||
	    !json_object_is_type(json_object_array_get_idx(keys, 0), json_type_string))
		return;
	*exchange = x;
	*key = json_object_get_string(json_object_array_get_idx(keys, 0));
}

/* The body's job_id when it is a JSON object with a string job_id (escaped), else NULL. */
static struct json_object *body_job(const struct bw_amqp_message *m)
{
	struct json_object *doc = NULL, *v = NULL;
	char why[128];
	if (bw_json_parse_strict(m->body, m->len, &doc, why, sizeof(why)) != 0)
		return NULL;
	struct json_object *out = NULL;
	if (json_object_is_type(doc, json_type_object) &&
	    json_object_object_get_ex(doc, "job_id", &v) &&
	    json_object_is_type(v, json_type_string)) {
		char safe[600];
		bw_text_escape(safe, sizeof(safe), json_object_get_string(v),
			       (size_t)json_object_get_string_len(v));
		out = json_object_new_string(safe);
	}
	json_object_put(doc);
	return out;
}

/* One line of dlq list as JSON. */
static struct json_object *row_json(const struct bw_amqp_message *m, size_t pos)
{
	struct json_object *o = json_object_new_object(), *d = last_death(m->props), *v = NULL;
	json_object_object_add(o, "position", json_object_new_int64((int64_t)pos));
	json_object_object_add(o, "job_id", body_job(m));
	json_object_object_add(o, "size", json_object_new_int64((int64_t)m->len));
	static const char *const keys[] = {"reason", "queue", "count", "time"};
	for (size_t i = 0; i < 4; i++)
		json_object_object_add(
		    o, keys[i],
		    d && json_object_object_get_ex(d, keys[i], &v) ? json_object_get(v) : NULL);
	json_object_object_add(
	    o, "message_id",
	    json_object_object_get_ex(m->props, "message_id", &v) ? json_object_get(v) : NULL);
	return o;
}

/* The body as text: itself when it is UTF-8, else escaped. A malloc'd string. */
static char *body_text(const struct bw_amqp_message *m)
{
	if (bw_utf8_length(m->body, m->len) != SIZE_MAX && strlen(m->body) == m->len)
		return strdup(m->body);
	size_t size = m->len * 4 + 8;
	char *t = malloc(size);
	if (t)
		bw_text_escape(t, size, m->body, m->len);
	return t;
}

static int parse_position(const char *s, size_t *pos)
{
	char *end;
	long v = strtol(s, &end, 10);
	if (*s == '\0' || *end != '\0' || v < 1 || v > DLQ_POSITION_MAX) {
		fprintf(stderr, "bw-ctl: dlq: a position is 1 to %d, not \"%s\"\n",
			DLQ_POSITION_MAX, s);
		return CTL_USAGE;
	}
	*pos = (size_t)v;
	return CTL_OK;
}

static void print_list(const struct taken *t, bool json)
{
	static const struct ctl_column cols[] = {
	    {"position", "POS"}, {"job_id", "JOB"},  {"size", "SIZE"}, {"reason", "REASON"},
	    {"queue", "QUEUE"},	 {"count", "COUNT"}, {"time", "TIME"}};
	struct json_object *rows = json_object_new_array();
	for (size_t i = 0; i < t->n; i++)
		json_object_array_add(rows, row_json(&t->m[i], i + 1));
	if (json)
		ctl_print_json(rows);
	else if (t->n == 0)
		printf("the dead-letter queue is empty\n");
	else
		ctl_print_table(rows, cols, 7);
	json_object_put(rows);
}

static void print_message(const struct bw_amqp_message *m, size_t pos, bool json)
{
	char *text = body_text(m);
	struct json_object *o = row_json(m, pos);
	json_object_object_add(o, "properties", json_object_get(m->props));
	json_object_object_add(o, "body", text ? json_object_new_string(text) : NULL);
	if (json) {
		ctl_print_json(o);
	} else {
		const char *job = ctl_str(o, "job_id");
		printf(
		    "position    %zu\njob_id      %s\nsize        %zu\nproperties  %s\nbody\n%s\n",
		    pos, job ? job : "-", m->len,
		    json_object_to_json_string_ext(m->props, JSON_C_TO_STRING_PRETTY |
								 JSON_C_TO_STRING_NOSLASHESCAPE),
		    text ? text : "");
	}
	json_object_put(o);
	free(text);
}

/* Republishes message m as it was first routed, confirmed; then it may be acked. */
static int republish(const struct bw_config *cfg, const struct bw_amqp_message *m, size_t pos,
		     bool json)
{
	const char *exchange, *key;
	struct bw_amqp *p = NULL;
	char err[600], id[300];
	first_route(m->props, cfg, &exchange, &key);
	struct json_object *job = body_job(m), *mid = NULL;
	if (json_object_object_get_ex(m->props, "message_id", &mid) && mid)
		snprintf(id, sizeof(id), "%s", json_object_get_string(mid));
	else
		snprintf(id, sizeof(id), "dlq-requeue/%s", job ? json_object_get_string(job) : "-");
	int status = ctl_connect(cfg, "bw-ctl dlq requeue", true, &p);
	if (status == CTL_OK) {
		int rc = bw_amqp_publish_confirmed(p, exchange, key, id, m->body, m->len,
						   CTL_CONFIRM_TIMEOUT_MS, err, sizeof(err));
		if (rc != 0) {
			fprintf(stderr,
				"bw-ctl: dlq requeue %zu: not republished (it stays in the "
				"dead-letter queue): %s\n",
				pos, err);
			status = CTL_USAGE;
		} else if (json) {
			struct json_object *o = row_json(m, pos);
			json_object_object_add(o, "requeued_to_exchange",
					       json_object_new_string(exchange));
			json_object_object_add(o, "requeued_with_routing_key",
					       json_object_new_string(key));
			ctl_print_json(o);
			json_object_put(o);
		} else {
			printf(
			    "requeued message %zu (job %s) to %s with routing key %s: confirmed\n",
			    pos, job ? json_object_get_string(job) : "-",
			    exchange[0] ? exchange : "(default)", key);
		}
	}
	bw_amqp_close(p);
	json_object_put(job);
	return status;
}

int ctl_dlq(int argc, char **argv, const struct bw_config *cfg)
{
	static const struct option opts[] = {{"json", no_argument, NULL, OPT_JSON},
					     {"max", required_argument, NULL, OPT_MAX},
					     {"job", required_argument, NULL, OPT_JOB},
					     {NULL, 0, NULL, 0}};
	bool json = false;
	const char *want_job = NULL;
	size_t max = DLQ_LIST_DEFAULT, pos = 0;
	struct taken t = {NULL, 0};
	struct bw_amqp *c = NULL;
	char err[600];
	int opt, status;
	optind = 0;
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		if (opt == OPT_JSON)
			json = true;
		else if (opt == OPT_JOB)
			want_job = optarg;
		else if (opt == OPT_MAX) {
			if (parse_position(optarg, &max) != CTL_OK)
				return CTL_USAGE;
		} else {
			fprintf(stderr, "bw-ctl: dlq: unknown option (see --help)\n");
			return CTL_USAGE;
		}
	}
	const char *sub = optind < argc ? argv[optind] : "";
	bool list = strcmp(sub, "list") == 0, show = strcmp(sub, "show") == 0,
	     requeue = strcmp(sub, "requeue") == 0;
	if (!(list && optind + 1 == argc) && !((show || requeue) && optind + 2 == argc)) {
		fprintf(stderr, "bw-ctl: dlq: list | show N | requeue N (see --help)\n");
		return CTL_USAGE;
	}
	if (!list && parse_position(argv[optind + 1], &pos) != CTL_OK)
		return CTL_USAGE;
	if ((status = ctl_connect(cfg, "bw-ctl dlq", false, &c)) != CTL_OK)
		return status;
	/* show and requeue take as many as list does, not only N: see struct taken */
	int rc = take(c, cfg->amqp_dlq, pos > max ? pos : max, &t, err, sizeof(err));
	if (rc != 0) {
		fprintf(stderr, "bw-ctl: dlq: %s\n", err);
		status = CTL_USAGE;
	} else if (list) {
		print_list(&t, json);
		if (t.n == max)
			fprintf(stderr,
				"bw-ctl: dlq: listed the first %zu; more may follow (--max)\n",
				max);
	} else if (t.n < pos) {
		fprintf(stderr, "bw-ctl: dlq: no message %zu: %s holds %zu\n", pos, cfg->amqp_dlq,
			t.n);
		status = CTL_NO;
	} else if (show) {
		print_message(&t.m[pos - 1], pos, json);
	} else {
		struct json_object *job = body_job(&t.m[pos - 1]);
		const char *jid = job ? json_object_get_string(job) : NULL;
		if (want_job && (jid == NULL || strcmp(jid, want_job) != 0)) {
			fprintf(
			    stderr,
			    "bw-ctl: dlq requeue: message %zu is job %s, not %s: left as it is\n",
			    pos, jid ? jid : "(none)", want_job);
			status = CTL_NO;
		} else {
			status = republish(cfg, &t.m[pos - 1], pos, json);
			/* only once the copy is confirmed is the dead letter acked */
			if (status == CTL_OK && bw_amqp_settle(c, t.m[pos - 1].tag, true) != 0) {
				fprintf(stderr,
					"bw-ctl: dlq requeue: republished, but the dead letter "
					"could not be acked: it stays there too (a duplicate)\n");
				status = CTL_USAGE;
			}
			if (status == CTL_OK)
				give_back(c, &t, pos - 1);
		}
		json_object_put(job);
	}
	give_back(c, &t, SIZE_MAX);
	bw_amqp_close(c);
	return status;
}
