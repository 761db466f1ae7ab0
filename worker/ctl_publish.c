/* ctl_publish.c: bw-ctl's publishing commands: publish a backup.start, cancel a job, retry a failed
 * one. */
#include "amqp_admin.h"
#include "buf.h"
#include "cancel.h"
#include "events.h"
#include "json.h"
#include "ledger_views.h"
#include "ctl.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Long options every publishing command takes. */
enum { OPT_JSON = 256, OPT_REASON };

struct json_object *ctl_verdict_json(const struct bw_verdict *vd)
{
	struct json_object *a = json_object_new_array();
	for (size_t i = 0; a && i < vd->n; i++) {
		struct json_object *v = json_object_new_object();
		json_object_object_add(v, "path", json_object_new_string(vd->v[i].path));
		json_object_object_add(v, "rule", json_object_new_string(vd->v[i].rule));
		json_object_object_add(v, "message", json_object_new_string(vd->v[i].message));
		json_object_array_add(a, v);
	}
	return a;
}

int ctl_check_message(const char *body, size_t len, const struct bw_config *cfg,
		      struct bw_job_spec **spec, struct bw_verdict **vd)
{
	struct bw_job_spec *s = NULL;
	int rc = bw_message_parse(body, len, (size_t)cfg->job_max_message_bytes, &s, vd);
	if (rc == 0)
		rc = bw_message_check_host(s, cfg, vd);
	if (rc != 0) {
		bw_job_spec_free(s);
		return rc;
	}
	*spec = s;
	return 0;
}

int ctl_connect(const struct bw_config *cfg, const char *name, bool confirms, struct bw_amqp **out)
{
	char err[600] = "no broker in amqp.url";
	int rc = BW_ECONFIG;
	/* amqp.url may list the nodes of one cluster: the first that answers serves */
	for (const char *node = cfg->amqp_url; node && *node;) {
		size_t n = strcspn(node, ",");
		char *url = strndup(node, n);
		if (url == NULL)
			break;
		struct bw_amqp_opts o = {url,
					 cfg->amqp_heartbeat_s,
					 CTL_AMQP_TIMEOUT_MS,
					 name,
					 cfg->amqp_tls_ca_file[0] ? cfg->amqp_tls_ca_file : NULL,
					 cfg->amqp_tls_cert_file[0] ? cfg->amqp_tls_cert_file
								    : NULL,
					 cfg->amqp_tls_key_file[0] ? cfg->amqp_tls_key_file : NULL,
					 cfg->amqp_tls_verify_peer,
					 cfg->amqp_tls_verify_hostname};
		struct bw_amqp *c = NULL;
		rc = bw_amqp_connect(&c, &o, err, sizeof(err));
		explicit_bzero(url, n); /* it holds the broker's password */
		free(url);
		if (rc == 0 && confirms && (rc = bw_amqp_confirm_select(c, err, sizeof(err))) != 0)
			bw_amqp_close(c);
		if (rc == 0) {
			*out = c;
			return CTL_OK;
		}
		node += n;
		if (*node == ',')
			node++;
	}
	fprintf(stderr, "bw-ctl: broker: %s: %s\n", err, bw_strerror(rc));
	return CTL_USAGE;
}

/* Prints what was published: a line, or with --json an object. */
static void print_published(bool json, const char *what, const char *job_id, const char *exchange,
			    const char *key)
{
	if (json) {
		struct json_object *o = json_object_new_object();
		json_object_object_add(o, "published", json_object_new_string(what));
		json_object_object_add(o, "job_id", json_object_new_string(job_id));
		json_object_object_add(o, "exchange", json_object_new_string(exchange));
		json_object_object_add(o, "routing_key", json_object_new_string(key));
		json_object_object_add(o, "confirmed", json_object_new_boolean(true));
		ctl_print_json(o);
		json_object_put(o);
	} else {
		printf("published %s %s to %s (routing key %s): confirmed by the broker\n", what,
		       job_id, exchange, key);
	}
}

/* A refused message: its violations, as validate prints them or as JSON. */
static void print_refused(bool json, const char *file, const struct bw_verdict *vd)
{
	if (json) {
		struct json_object *o = json_object_new_object();
		json_object_object_add(o, "published", NULL);
		json_object_object_add(o, "file", json_object_new_string(file));
		json_object_object_add(o, "reason",
				       json_object_new_string(bw_reject_reason_name(vd->reason)));
		json_object_object_add(o, "violations", ctl_verdict_json(vd));
		ctl_print_json(o);
		json_object_put(o);
	} else {
		ctl_print_verdict(file, vd, false);
		fprintf(stderr, "bw-ctl: %s: invalid (%s): not published\n", file,
			bw_reject_reason_name(vd->reason));
	}
}

/* Publishes a valid backup.start body to the jobs exchange and says how it went. */
static int publish_start(const struct bw_config *cfg, bool json, const char *job_id,
			 const char *body, size_t len)
{
	struct bw_amqp *c = NULL;
	char err[600];
	int status = ctl_connect(cfg, "bw-ctl publish", true, &c);
	if (status != CTL_OK)
		return status;
	int rc = bw_amqp_publish_confirmed(c, cfg->amqp_jobs_exchange, CTL_START_KEY, job_id, body,
					   len, CTL_CONFIRM_TIMEOUT_MS, err, sizeof(err));
	bw_amqp_close(c);
	if (rc != 0) {
		fprintf(stderr, "bw-ctl: %s not published: %s\n", job_id, err);
		return CTL_USAGE;
	}
	print_published(json, "backup.start", job_id, cfg->amqp_jobs_exchange, CTL_START_KEY);
	return CTL_OK;
}

/* getopt_long over argv (argv[0] the command): --json and the given extra options. */
static int parse_opts(int argc, char **argv, bool *json, const char **reason)
{
	static const struct option opts[] = {{"json", no_argument, NULL, OPT_JSON},
					     {"reason", required_argument, NULL, OPT_REASON},
					     {NULL, 0, NULL, 0}};
	int opt;
	optind = 0;
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		if (opt == OPT_JSON)
			*json = true;
		else if (opt == OPT_REASON && reason)
			*reason = optarg;
		else {
			fprintf(stderr, "bw-ctl: %s: unknown option (see --help)\n", argv[0]);
			return CTL_USAGE;
		}
	}
	return CTL_OK;
}

int ctl_publish(int argc, char **argv, const struct bw_config *cfg)
{
	bool json = false;
	char *body = NULL;
	size_t len = 0;
	struct bw_job_spec *spec = NULL;
	struct bw_verdict *vd = NULL;
	int status = parse_opts(argc, argv, &json, NULL);
	if (status != CTL_OK)
		return status;
	if (optind != argc - 1) {
		fprintf(stderr, "bw-ctl: publish: give one FILE\n");
		return CTL_USAGE;
	}
	const char *file = argv[optind];
	int rc = ctl_read_file(file, &body, &len);
	if (rc != 0) {
		fprintf(stderr, "bw-ctl: %s: cannot read: %s\n", file, strerror(rc));
		return CTL_USAGE;
	}
	rc = ctl_check_message(body, len, cfg, &spec, &vd);
	if (rc == BW_EMESSAGE) {
		print_refused(json, file, vd);
		status = CTL_NO;
	} else if (rc != 0) {
		fprintf(stderr, "bw-ctl: %s: %s\n", file, bw_strerror(rc));
		status = CTL_USAGE;
	} else {
		status = publish_start(cfg, json, spec->job_id, body, len);
	}
	bw_verdict_free(vd);
	bw_job_spec_free(spec);
	free(body);
	return status;
}

int ctl_cancel(int argc, char **argv, const struct bw_config *cfg)
{
	bool json = false;
	const char *reason = NULL;
	struct bw_buf b = BW_BUF_INIT;
	struct bw_amqp *c = NULL;
	char why[300], err[600], id[200];
	int status = parse_opts(argc, argv, &json, &reason);
	if (status != CTL_OK)
		return status;
	if (optind != argc - 1) {
		fprintf(stderr, "bw-ctl: cancel: give one JOB\n");
		return CTL_USAGE;
	}
	const char *job_id = argv[optind];
	if (bw_cancel_build(job_id, reason, &b, why, sizeof(why)) != 0) {
		fprintf(stderr, "bw-ctl: cancel: %s\n", why);
		return CTL_USAGE;
	}
	if (b.failed) {
		bw_buf_free(&b);
		return CTL_USAGE;
	}
	if ((status = ctl_connect(cfg, "bw-ctl cancel", true, &c)) != CTL_OK)
		goto out;
	snprintf(id, sizeof(id), "%s/backup.cancel", job_id);
	/* a fanout ignores the routing key: the message's name, for whoever reads it */
	int rc = bw_amqp_publish_confirmed(c, cfg->amqp_control_exchange, "backup.cancel", id,
					   b.data, b.len, CTL_CONFIRM_TIMEOUT_MS, err, sizeof(err));
	if (rc == BW_ENOENT) {
		fprintf(stderr, "bw-ctl: cancel %s: no worker is listening (%s)\n", job_id, err);
		status = CTL_NO;
	} else if (rc != 0) {
		fprintf(stderr, "bw-ctl: cancel %s: not published: %s\n", job_id, err);
		status = CTL_USAGE;
	} else {
		print_published(json, "backup.cancel", job_id, cfg->amqp_control_exchange,
				"backup.cancel");
	}
out:
	bw_amqp_close(c);
	bw_buf_free(&b);
	return status;
}

/* ---- retry -------------------------------------------------------------------------------- */

/* backup.failed reasons and whether a retry can help: the contract's table (events.h). */
static const struct {
	const char *name;
	bool retryable;
} fail_reasons[] = {
#define CTL__REASON(name, text, retryable) {text, retryable},
    BW_FAIL_REASON_MAP(CTL__REASON)
#undef CTL__REASON
};

/* The most digits of an attempt number: keeps N + 1 far from overflow. */
#define RETRY_DIGITS_MAX 9

/* When id ends in ".r<k>" (k >= 1, no leading zero), its length without it and k; else 0. */
static size_t retry_suffix(const char *id, long *k)
{
	size_t n = strlen(id), d = 0;
	while (d < n && d < RETRY_DIGITS_MAX + 1 && id[n - 1 - d] >= '0' && id[n - 1 - d] <= '9')
		d++;
	if (d == 0 || d > RETRY_DIGITS_MAX || n < d + 3 || id[n - d - 1] != 'r' ||
	    id[n - d - 2] != '.' || id[n - d] == '0')
		return 0;
	*k = strtol(id + n - d, NULL, 10);
	return n - d - 2;
}

/*
 * The newest attempt of base the ledger knows (base itself is attempt 0): its number in
 * *max and its row in *newest (borrowed from jobs).
 */
static void newest_attempt(struct json_object *jobs, const char *base, size_t base_len, long *max,
			   struct json_object **newest)
{
	*max = -1;
	*newest = NULL;
	for (size_t i = 0; i < json_object_array_length(jobs); i++) {
		struct json_object *row = json_object_array_get_idx(jobs, i);
		const char *id = ctl_str(row, "job_id");
		long k = 0;
		if (id == NULL || strncmp(id, base, base_len) != 0)
			continue;
		if (strlen(id) != base_len && retry_suffix(id, &k) != base_len)
			continue;
		if (k > *max) {
			*max = k;
			*newest = row;
		}
	}
}

/* The accepted body of the failed job with job_id set to new_id, as a malloc'd text. */
static int rewrite_job_id(const char *message, const char *new_id, char **out, char *why,
			  size_t whysz)
{
	struct json_object *doc = NULL;
	int rc = bw_json_parse_strict(message, strlen(message), &doc, why, whysz);
	if (rc != 0)
		return rc;
	if (!json_object_is_type(doc, json_type_object)) {
		json_object_put(doc);
		snprintf(why, whysz, "the stored message is not an object");
		return BW_EJSON;
	}
	json_object_object_add(doc, "job_id", json_object_new_string(new_id));
	*out = strdup(json_object_to_json_string_ext(doc, JSON_C_TO_STRING_PLAIN |
							      JSON_C_TO_STRING_NOSLASHESCAPE));
	json_object_put(doc);
	return *out ? 0 : BW_ENOMEM;
}

/* Why job (a show_job object) cannot be retried, or NULL when it can; reason in buf. */
static const char *not_retryable(struct bw_ledger *l, const char *job_id, struct json_object *job,
				 char *buf, size_t size)
{
	const char *state = ctl_str(job, "state");
	char id[200], *body = NULL, why[200];
	if (state == NULL || (strcmp(state, "failed") != 0 && strcmp(state, "compensated") != 0)) {
		snprintf(buf, size, "job %s is %s, not failed", job_id, state ? state : "?");
		return buf;
	}
	snprintf(id, sizeof(id), "%s/backup.failed", job_id);
	if (bw_ledger_event_body(l, id, &body) != 0) {
		snprintf(buf, size, "job %s has no backup.failed in the ledger", job_id);
		return buf;
	}
	struct json_object *ev = NULL;
	const char *reason = NULL;
	if (bw_json_parse_strict(body, strlen(body), &ev, why, sizeof(why)) == 0)
		reason = ctl_str(ev, "reason");
	int known = -1;
	for (size_t i = 0; reason && i < sizeof(fail_reasons) / sizeof(fail_reasons[0]); i++)
		if (strcmp(reason, fail_reasons[i].name) == 0)
			known = (int)i;
	if (known < 0)
		snprintf(buf, size, "job %s failed with an unknown reason \"%s\"", job_id,
			 reason ? reason : "?");
	else if (!fail_reasons[known].retryable)
		snprintf(buf, size, "job %s failed with reason %s, which a retry cannot help",
			 job_id, reason);
	json_object_put(ev);
	free(body);
	return known >= 0 && fail_reasons[known].retryable ? NULL : buf;
}

int ctl_retry(int argc, char **argv, const struct bw_config *cfg)
{
	bool json = false;
	struct bw_ledger *l = NULL;
	struct json_object *job = NULL, *jobs = NULL;
	struct bw_job_spec *spec = NULL;
	struct bw_verdict *vd = NULL;
	char *body = NULL, buf[600], new_id[200];
	int status = parse_opts(argc, argv, &json, NULL);
	if (status != CTL_OK)
		return status;
	if (optind != argc - 1) {
		fprintf(stderr, "bw-ctl: retry: give one JOB\n");
		return CTL_USAGE;
	}
	const char *job_id = argv[optind];
	if ((status = ctl_ledger_open(cfg, &l)) != CTL_OK)
		return status;
	status = CTL_NO;
	int rc = l ? bw_ledger_show_job(l, job_id, &job) : BW_ENOENT;
	if (rc == BW_ENOENT) {
		fprintf(stderr, "bw-ctl: retry: no job \"%s\" in %s\n", job_id, cfg->ledger_path);
		goto out;
	}
	if (rc != 0 || (rc = bw_ledger_list_jobs(l, &jobs)) != 0) {
		fprintf(stderr, "bw-ctl: %s: %s\n", cfg->ledger_path, bw_strerror(rc));
		status = CTL_USAGE;
		goto out;
	}
	const char *no = not_retryable(l, job_id, job, buf, sizeof(buf));
	if (no) {
		fprintf(stderr, "bw-ctl: retry: %s\n", no);
		goto out;
	}
	long k = 0, max = 0;
	size_t base_len = retry_suffix(job_id, &k);
	if (base_len == 0)
		base_len = strlen(job_id);
	struct json_object *newest = NULL;
	newest_attempt(jobs, job_id, base_len, &max, &newest);
	if (max > k) {
		fprintf(stderr,
			"bw-ctl: retry: %s (%s) is a newer attempt of %.*s: retry that one\n",
			ctl_str(newest, "job_id"), ctl_str(newest, "state"), (int)base_len, job_id);
		goto out;
	}
	int n = snprintf(new_id, sizeof(new_id), "%.*s.r%ld", (int)base_len, job_id, max + 1);
	if (n < 0 || n > BW_CANCEL_JOB_ID_MAX) {
		fprintf(stderr,
			"bw-ctl: retry: %.*s.r%ld would be %d characters, more than a job_id "
			"may have (%d)\n",
			(int)base_len, job_id, max + 1, n, BW_CANCEL_JOB_ID_MAX);
		goto out;
	}
	const char *message = ctl_str(job, "message");
	if (message == NULL || rewrite_job_id(message, new_id, &body, buf, sizeof(buf)) != 0) {
		fprintf(stderr, "bw-ctl: retry: the stored message of %s is unusable: %s\n", job_id,
			message ? buf : "none");
		goto out;
	}
	rc = ctl_check_message(body, strlen(body), cfg, &spec, &vd);
	if (rc == BW_EMESSAGE) {
		print_refused(json, new_id, vd);
		goto out;
	} else if (rc != 0) {
		status = CTL_USAGE;
		goto out;
	}
	status = publish_start(cfg, json, new_id, body, strlen(body));
out:
	bw_verdict_free(vd);
	bw_job_spec_free(spec);
	free(body);
	json_object_put(jobs);
	json_object_put(job);
	bw_ledger_close(l);
	return status;
}
