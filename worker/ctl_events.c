/* ctl_events.c: bw-ctl events: follows backup.events through a temporary queue, one line per event.
 */
#include "amqp_admin.h"
#include "clock.h"
#include "json.h"
#include "text.h"
#include "ctl.h"

#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Deliveries the broker may send ahead of our acks. */
#define EVENTS_PREFETCH 64
/* The longest wait in one poll: heartbeats are answered inside the library's calls. */
#define EVENTS_WAIT_MS 1000
/* A summary is one short line; SNA text in events is already bounded (512 bytes). */
#define SUMMARY_MAX 200

enum { OPT_JSON = 256, OPT_JOB, OPT_COUNT, OPT_TIMEOUT };

static volatile sig_atomic_t stop_signal;

static void on_signal(int sig)
{
	stop_signal = sig;
}

static int64_t int_of(struct json_object *o, const char *key)
{
	struct json_object *v = NULL;
	int64_t n = 0;
	if (json_object_object_get_ex(o, key, &v))
		(void)bw_json_get_integer(v, &n);
	return n;
}

static size_t len_of(struct json_object *o, const char *key)
{
	struct json_object *v = NULL;
	if (!json_object_object_get_ex(o, key, &v) || !json_object_is_type(v, json_type_array))
		return 0;
	return json_object_array_length(v);
}

/* One short line of what an event says (escaped: it may quote the SNA's text). */
static void summary(struct json_object *e, const char *name, char *out, size_t size)
{
	char raw[SUMMARY_MAX * 2];
	const char *s;
	if (strcmp(name, "backup.accepted") == 0)
		snprintf(raw, sizeof(raw), "%s, %" PRId64 " disk(s)",
			 (s = ctl_str(e, "backup_type")) ? s : "?", int_of(e, "disk_count"));
	else if (strcmp(name, "backup.started") == 0)
		snprintf(raw, sizeof(raw), "sna_job_id %s, %zu disk(s) served",
			 (s = ctl_str(e, "sna_job_id")) ? s : "?", len_of(e, "disks"));
	else if (strcmp(name, "backup.progress") == 0) {
		struct json_object *p = NULL;
		double pc =
		    json_object_object_get_ex(e, "percent", &p) ? json_object_get_double(p) : 0;
		snprintf(raw, sizeof(raw), "%.1f%% (%" PRId64 " of %" PRId64 " bytes)", pc,
			 int_of(e, "bytes_transferred"), int_of(e, "total_bytes"));
	} else if (strcmp(name, "backup.disk.completed") == 0)
		snprintf(raw, sizeof(raw), "disk %" PRId64 " change_id %s, %" PRId64 " bytes",
			 int_of(e, "key"), (s = ctl_str(e, "change_id")) ? s : "?",
			 int_of(e, "virtual_size"));
	else if (strcmp(name, "backup.completed") == 0)
		snprintf(raw, sizeof(raw), "%zu disk(s) in %" PRId64 " ms", len_of(e, "disks"),
			 int_of(e, "duration_ms"));
	else if (strcmp(name, "backup.failed") == 0) {
		struct json_object *r = NULL;
		bool retry =
		    json_object_object_get_ex(e, "retryable", &r) && json_object_get_boolean(r);
		snprintf(raw, sizeof(raw), "%s at %s (%s): %s",
			 (s = ctl_str(e, "reason")) ? s : "?",
			 ctl_str(e, "stage") ? ctl_str(e, "stage") : "?",
			 retry ? "retryable" : "not retryable",
			 ctl_str(e, "message") ? ctl_str(e, "message") : "");
	} else if (strcmp(name, "backup.cleanup") == 0)
		snprintf(raw, sizeof(raw), "%zu action(s), %zu pending", len_of(e, "actions"),
			 len_of(e, "pending"));
	else if (strcmp(name, "backup.rejected") == 0) {
		struct json_object *errs = NULL, *first = NULL;
		if (json_object_object_get_ex(e, "errors", &errs) &&
		    json_object_is_type(errs, json_type_array) && json_object_array_length(errs))
			first = json_object_array_get_idx(errs, 0);
		snprintf(raw, sizeof(raw), "%s, %zu error(s)%s%s%s%s",
			 (s = ctl_str(e, "reason")) ? s : "?", len_of(e, "errors"),
			 first ? ": " : "",
			 first && ctl_str(first, "path") ? ctl_str(first, "path") : "",
			 first ? ": " : "",
			 first && ctl_str(first, "rule") ? ctl_str(first, "rule") : "");
	} else
		raw[0] = '\0';
	bw_text_escape(out, size, raw, strlen(raw));
}

/* The options and what was seen so far. */
struct follow {
	bool json;
	const char *job; /* NULL: every job */
	long count;	 /* 0: no limit */
	long timeout_s;	 /* 0: none */
	long shown;
	bool failed_seen; /* --job: its backup.failed came; its backup.cleanup ends the follow */
	bool ended;	  /* --job: the job's last event came */
	struct json_object *seen; /* --job: event_ids shown (an object used as a set) */
};

/* Shows one delivery's body if it passes the filter. Returns true when it was shown. */
static bool show(struct follow *f, const char *body, size_t len)
{
	struct json_object *e = NULL;
	char why[200], sum[SUMMARY_MAX + 8], safe[300];
	if (bw_json_parse_strict(body, len, &e, why, sizeof(why)) != 0 ||
	    !json_object_is_type(e, json_type_object)) {
		json_object_put(e);
		if (f->job)
			return false;
		if (f->json)
			return false; /* not an event: --json prints only JSON lines */
		bw_text_escape(safe, sizeof(safe), body, len);
		printf("(not an event: %s)\n", safe);
		return true;
	}
	const char *name = ctl_str(e, "event") ? ctl_str(e, "event") : "?";
	const char *job = ctl_str(e, "job_id");
	const char *id = ctl_str(e, "event_id");
	if (f->job) {
		if (job == NULL || strcmp(job, f->job) != 0 ||
		    (id && json_object_object_get_ex(f->seen, id, NULL))) {
			json_object_put(e);
			return false;
		}
		if (id)
			json_object_object_add(f->seen, id, NULL);
		if (strcmp(name, "backup.failed") == 0)
			f->failed_seen = true;
		if (strcmp(name, "backup.completed") == 0 || strcmp(name, "backup.rejected") == 0 ||
		    (strcmp(name, "backup.cleanup") == 0 && f->failed_seen))
			f->ended = true;
	}
	if (f->json && memchr(body, '\n', len) == NULL) {
		printf("%.*s\n", (int)len, body); /* the raw event, as published */
	} else if (f->json) {
		/* one event per line even when a publisher broke its JSON into lines */
		printf("%s\n", json_object_to_json_string_ext(
				   e, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
	} else {
		summary(e, name, sum, sizeof(sum));
		char t[64], n[64], j[300];
		bw_text_escape(t, sizeof(t),
			       ctl_str(e, "occurred_at") ? ctl_str(e, "occurred_at") : "-",
			       strlen(ctl_str(e, "occurred_at") ? ctl_str(e, "occurred_at") : "-"));
		bw_text_escape(n, sizeof(n), name, strlen(name));
		bw_text_escape(j, sizeof(j), job ? job : "-", strlen(job ? job : "-"));
		printf("%-24s  %-21s  %-20s  %4" PRId64 "  %s\n", t, n, j, int_of(e, "seq"), sum);
	}
	fflush(stdout);
	json_object_put(e);
	return true;
}

static int parse(struct follow *f, int argc, char **argv)
{
	static const struct option opts[] = {{"json", no_argument, NULL, OPT_JSON},
					     {"job", required_argument, NULL, OPT_JOB},
					     {"count", required_argument, NULL, OPT_COUNT},
					     {"timeout", required_argument, NULL, OPT_TIMEOUT},
					     {NULL, 0, NULL, 0}};
	int opt;
	char *end;
	optind = 0;
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (opt) {
		case OPT_JSON:
			f->json = true;
			break;
		case OPT_JOB:
			f->job = optarg;
			break;
		case OPT_COUNT:
		case OPT_TIMEOUT: {
			long v = strtol(optarg, &end, 10);
			if (*optarg == '\0' || *end != '\0' || v <= 0 || v > 1000000000L) {
				fprintf(stderr, "bw-ctl: events: %s wants a positive integer\n",
					opt == OPT_COUNT ? "--count" : "--timeout");
				return CTL_USAGE;
			}
			*(opt == OPT_COUNT ? &f->count : &f->timeout_s) = v;
			break;
		}
		default:
			fprintf(stderr, "bw-ctl: events: unknown option (see --help)\n");
			return CTL_USAGE;
		}
	}
	if (optind != argc) {
		fprintf(stderr, "bw-ctl: events: unexpected argument \"%s\"\n", argv[optind]);
		return CTL_USAGE;
	}
	return CTL_OK;
}

int ctl_events(int argc, char **argv, const struct bw_config *cfg)
{
	struct follow f = {0};
	struct bw_amqp *c = NULL;
	char err[600], queue[256];
	int status = parse(&f, argc, argv);
	if (status != CTL_OK)
		return status;
	if ((status = ctl_connect(cfg, "bw-ctl events", false, &c)) != CTL_OK)
		return status;
	f.seen = json_object_new_object();
	int rc = bw_amqp_temp_queue(c, cfg->amqp_events_exchange, "#", queue, sizeof(queue), err,
				    sizeof(err));
	if (rc == 0)
		rc = bw_amqp_consume(c, queue, EVENTS_PREFETCH, err, sizeof(err));
	if (rc != 0 || f.seen == NULL) {
		fprintf(stderr, "bw-ctl: events: %s%s\n", err,
			rc == BW_ENOENT ? " (no worker has declared it yet)" : "");
		status = CTL_USAGE;
		goto out;
	}
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	/* the line a script waits for: from now on every event reaches the queue */
	fprintf(stderr, "bw-ctl: following %s through %s\n", cfg->amqp_events_exchange, queue);
	int64_t last = bw_clock_mono_ms();
	status = CTL_OK;
	while (!stop_signal && !f.ended && !(f.count && f.shown >= f.count)) {
		struct bw_delivery d;
		bool got = false;
		if (bw_amqp_poll(c, &d, &got, err, sizeof(err)) != 0) {
			fprintf(stderr, "bw-ctl: events: %s\n", err);
			status = CTL_USAGE;
			break;
		}
		if (got) {
			if (d.body && show(&f, d.body, d.len)) {
				f.shown++;
				last = bw_clock_mono_ms();
			}
			int arc = bw_amqp_ack(c, &d);
			bw_delivery_free(&d);
			if (arc != 0) {
				fprintf(stderr, "bw-ctl: events: the connection was lost\n");
				status = CTL_USAGE;
				break;
			}
			continue;
		}
		int wait = EVENTS_WAIT_MS;
		if (f.timeout_s) {
			int64_t left = last + f.timeout_s * 1000 - bw_clock_mono_ms();
			if (left <= 0) {
				/* silence: a negative answer only when a goal was not reached */
				if (f.job || f.count)
					status = CTL_NO;
				if (f.job || f.count)
					fprintf(
					    stderr, "bw-ctl: events: %ld s without an event%s\n",
					    f.timeout_s,
					    f.job ? " before the job's end" : " before the count");
				break;
			}
			if (left < wait)
				wait = (int)left;
		}
		if (!bw_amqp_pending(c)) {
			struct pollfd p = {bw_amqp_fd(c), POLLIN, 0};
			(void)poll(&p, 1, wait);
		}
	}
out:
	json_object_put(f.seen);
	bw_amqp_close(c);
	return status;
}
