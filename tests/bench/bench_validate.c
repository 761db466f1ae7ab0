/* bench_validate.c: bw_message_parse on large and hostile backup.start bodies, driven by scripts/bench-validate. */
#include "buf.h"
#include "error.h"
#include "events.h"
#include "json.h"
#include "message.h"

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/*
 * Usage: bench_validate [REPS [CASE]]   (REPS runs per case, default 5, the median is
 * reported; CASE runs that case alone, e.g. under perf)
 *
 * Every case runs in a child process of its own, so that its peak RSS is its own. For each,
 * one line of key=value pairs on stdout:
 *
 *   case=NAME bytes=N disks=N max_bytes=N json_ms=T parse_ms=T parse_min_ms=T rc=0|EMESSAGE
 *   violations=N truncated=0|1 errors_bytes=N event_bytes=N max_rss_mib=N ok=0|1
 *
 * json_ms is bw_json_parse_strict alone (the strict pass and json-c's tree), parse_ms all of
 * bw_message_parse (the same plus every rule), both medians of REPS runs. errors_bytes is
 * the size of the errors[] array a backup.rejected carries (JSON, no spaces), event_bytes
 * that of the whole event from bw_event_rejected. ok=1 when the case had its expected
 * outcome: the valid message accepted, the others rejected with at most
 * BW_VERDICT_MAX_ERRORS + 1 entries. Exit 0 when every case was ok, 1 otherwise, 2 usage.
 * Timing is printed, never asserted: the goal line is scripts/bench-validate's.
 */

#define MIB (1024u * 1024u)
#define BIG_BYTES (16u * MIB)	  /* the large cases: 64 times the default limit */
#define BIG_MAX_BYTES (32u * MIB) /* job.max_message_bytes raised for them */

struct bench_case {
	const char *name;
	size_t bytes;
	size_t max_bytes;
	bool valid; /* the expected outcome */
	size_t (*gen)(struct bw_buf *b, size_t bytes); /* appends the body; returns its disks */
};

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static const char head[] = "{\"schema_version\":1,\"job_id\":\"bk-bench-0001\","
			   "\"vm\":{\"name\":\"pgtest1\",\"path\":\"/DatabanxDC/vm/pgtest1\","
			   "\"id\":\"vm-1234\"},\"backup_type\":\"full\",\"repository_id\":"
			   "\"repo-001\",\"credential_id\":\"vcenter-main\",\"policy_id\":\"gold\"";

/* Pads b with spaces (valid JSON whitespace before the final brace) to exactly bytes. */
static void pad_to(struct bw_buf *b, size_t bytes)
{
	while (b->len + 1 < bytes && !b->failed)
		bw_buf_puts(b, " ");
	bw_buf_puts(b, "}");
}

/*
 * A valid job at its largest: 32 tags of 256 characters, 64 disks with 255-character
 * labels, then unknown fields filling the rest: ~60,000 top-level members of ~100 bytes,
 * an array of small objects, and one long string to the exact size.
 */
static size_t gen_valid(struct bw_buf *b, size_t bytes)
{
	char text[257];
	memset(text, 'v', 256);
	text[256] = '\0';
	bw_buf_puts(b, head);
	bw_buf_puts(b, ",\"tags\":{");
	for (int i = 0; i < 32; i++)
		bw_buf_printf(b, "%s\"tag-%02d\":\"%s\"", i ? "," : "", i, text);
	bw_buf_puts(b, "},\"disks\":[");
	text[255] = '\0';
	for (int i = 0; i < BW_MESSAGE_MAX_DISKS; i++)
		bw_buf_printf(b,
			      "%s{\"key\":%d,\"size_bytes\":%" PRId64 ",\"label\":\"%s\","
			      "\"x_controller\":{\"bus\":%d,\"unit\":%d}}",
			      i ? "," : "", 2000 + i, (int64_t)(i + 1) * 1073741824, text, i / 16,
			      i % 16);
	bw_buf_puts(b, "]");
	for (int i = 0; i < 60000; i++)
		bw_buf_printf(b, ",\"x_field_%06d\":\"%.80s\"", i, text);
	bw_buf_puts(b, ",\"x_history\":[");
	for (int i = 0; b->len < bytes / 4 * 3 && !b->failed; i++)
		bw_buf_printf(b, "%s{\"t\":%d,\"ok\":true,\"note\":\"n%d\"}", i ? "," : "", i, i);
	bw_buf_puts(b, "],\"x_pad\":\"");
	while (b->len + 2 < bytes && !b->failed)
		bw_buf_append(b, text, bytes - 2 - b->len < 255 ? bytes - 2 - b->len : 255);
	bw_buf_puts(b, "\"}");
	return BW_MESSAGE_MAX_DISKS;
}

/* disks[] of as many {} as fit: two violations each (key and size_bytes required). */
static size_t gen_empty_disks(struct bw_buf *b, size_t bytes)
{
	size_t n = 0;
	bw_buf_puts(b, head);
	bw_buf_puts(b, ",\"disks\":[{}");
	for (n = 1; b->len + 3 + 2 <= bytes && !b->failed; n++)
		bw_buf_puts(b, ",{}");
	bw_buf_puts(b, "]");
	pad_to(b, bytes);
	return n;
}

/* disks[] of distinct valid disks: one violation (max_items), and every key to compare. */
static size_t gen_unique_disks(struct bw_buf *b, size_t bytes)
{
	size_t n = 0;
	bw_buf_puts(b, head);
	bw_buf_puts(b, ",\"disks\":[");
	for (; b->len + 48 < bytes && !b->failed; n++)
		bw_buf_printf(b, "%s{\"key\":%zu,\"size_bytes\":512}", n ? "," : "", n + 1);
	bw_buf_puts(b, "]");
	pad_to(b, bytes);
	return n;
}

/* disks[] whose keys all repeat the first: a "unique" violation per disk. */
static size_t gen_same_key_disks(struct bw_buf *b, size_t bytes)
{
	size_t n = 0;
	bw_buf_puts(b, head);
	bw_buf_puts(b, ",\"disks\":[");
	for (; b->len + 48 < bytes && !b->failed; n++)
		bw_buf_printf(b, "%s{\"key\":2000,\"size_bytes\":512}", n ? "," : "");
	bw_buf_puts(b, "]");
	pad_to(b, bytes);
	return n;
}

static const struct bench_case cases[] = {
	{"valid-64-disks-16MiB", BIG_BYTES, BIG_MAX_BYTES, true, gen_valid},
	{"empty-disks-256KiB", BW_MESSAGE_MAX_BYTES_DEFAULT, BW_MESSAGE_MAX_BYTES_DEFAULT, false,
	 gen_empty_disks},
	{"empty-disks-16MiB", BIG_BYTES, BIG_MAX_BYTES, false, gen_empty_disks},
	{"unique-disks-16MiB", BIG_BYTES, BIG_MAX_BYTES, false, gen_unique_disks},
	{"same-key-disks-16MiB", BIG_BYTES, BIG_MAX_BYTES, false, gen_same_key_disks},
};

/* The size of errors[] as backup.rejected carries it (plain JSON). */
static size_t errors_json_bytes(const struct bw_verdict *vd)
{
	struct json_object *a = json_object_new_array();
	size_t n = 0;
	for (size_t i = 0; a && i < vd->n; i++) {
		struct json_object *e = json_object_new_object();
		json_object_object_add(e, "path", json_object_new_string(vd->v[i].path));
		json_object_object_add(e, "rule", json_object_new_string(vd->v[i].rule));
		json_object_object_add(e, "message", json_object_new_string(vd->v[i].message));
		json_object_array_add(a, e);
	}
	if (a)
		n = strlen(json_object_to_json_string_ext(a, JSON_C_TO_STRING_PLAIN));
	json_object_put(a);
	return n;
}

/* One case, in the calling (child) process; returns 0 when its outcome was the expected. */
static int run_case(const struct bench_case *bc, int reps)
{
	struct bw_buf b = BW_BUF_INIT;
	size_t disks = bc->gen(&b, bc->bytes);
	if (b.failed || b.len != bc->bytes) {
		fprintf(stderr, "bench_validate: %s: generated %zu bytes, not %zu\n", bc->name, b.len,
			bc->bytes);
		bw_buf_free(&b);
		return 1;
	}
	double *json_ms = calloc((size_t)reps, sizeof(double));
	double *parse_ms = calloc((size_t)reps, sizeof(double));
	struct bw_job_spec *spec = NULL;
	struct bw_verdict *vd = NULL;
	int rc = BW_ENOMEM;
	if (json_ms == NULL || parse_ms == NULL)
		goto out;
	/* The two loops apart, each freeing what it made (untimed) before its next run. */
	for (int r = 0; r < reps; r++) {
		struct json_object *doc = NULL;
		char why[160];
		int64_t t0 = now_ns();
		int jrc = bw_json_parse_strict(b.data, b.len, &doc, why, sizeof(why));
		json_ms[r] = (double)(now_ns() - t0) / 1e6;
		json_object_put(doc);
		if (jrc != 0) {
			fprintf(stderr, "bench_validate: %s: not JSON: %s\n", bc->name, why);
			goto out;
		}
	}
	for (int r = 0; r < reps; r++) {
		bw_job_spec_free(spec);
		bw_verdict_free(vd);
		spec = NULL;
		vd = NULL;
		int64_t t0 = now_ns();
		rc = bw_message_parse(b.data, b.len, bc->max_bytes, &spec, &vd);
		parse_ms[r] = (double)(now_ns() - t0) / 1e6;
		if (rc != 0 && rc != BW_EMESSAGE)
			goto out;
	}
	qsort(json_ms, (size_t)reps, sizeof(double), cmp_double);
	qsort(parse_ms, (size_t)reps, sizeof(double), cmp_double);

	size_t violations = 0, errors_bytes = 0, event_bytes = 0;
	bool truncated = false;
	if (rc == BW_EMESSAGE) {
		char *event = NULL, *id = NULL;
		violations = vd->n;
		truncated = vd->n > 0 && strcmp(vd->v[vd->n - 1].rule, "truncated") == 0;
		errors_bytes = errors_json_bytes(vd);
		if (bw_event_rejected(b.data, b.len, vd, "bench-host", "bench-host-1", &event, &id) ==
		    0)
			event_bytes = strlen(event);
		free(event);
		free(id);
	}
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	bool ok = bc->valid ? rc == 0 : rc == BW_EMESSAGE && violations > 0 &&
						  violations <= BW_VERDICT_MAX_ERRORS + 1 &&
						  event_bytes > 0;
	printf("case=%s bytes=%zu disks=%zu max_bytes=%zu json_ms=%.2f parse_ms=%.2f "
	       "parse_min_ms=%.2f rc=%s violations=%zu truncated=%d errors_bytes=%zu "
	       "event_bytes=%zu max_rss_mib=%ld ok=%d\n",
	       bc->name, b.len, disks, bc->max_bytes, json_ms[reps / 2], parse_ms[reps / 2],
	       parse_ms[0], rc == 0 ? "0" : bw_err_name(rc), violations, truncated, errors_bytes,
	       event_bytes, ru.ru_maxrss / 1024, ok);
	if (vd && vd->n)
		fprintf(stderr, "bench_validate: %s: first %s: %s, last %s: %s: %s\n", bc->name,
			vd->v[0].path, vd->v[0].rule, vd->v[vd->n - 1].path,
			vd->v[vd->n - 1].rule, vd->v[vd->n - 1].message);
	fflush(stdout);
	free(json_ms);
	free(parse_ms);
	bw_job_spec_free(spec);
	bw_verdict_free(vd);
	bw_buf_free(&b);
	return ok ? 0 : 1;
out:
	fprintf(stderr, "bench_validate: %s: failed: %s\n", bc->name, bw_strerror(rc));
	free(json_ms);
	free(parse_ms);
	bw_job_spec_free(spec);
	bw_verdict_free(vd);
	bw_buf_free(&b);
	return 1;
}

int main(int argc, char **argv)
{
	int reps = 5, failed = 0, ran = 0;
	const char *only = argc == 3 ? argv[2] : NULL;
	if (argc > 3 || (argc >= 2 && ((reps = atoi(argv[1])) < 1 || reps > 1000))) {
		fprintf(stderr, "usage: bench_validate [REPS [CASE]]\n");
		return 2;
	}
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		if (only && strcmp(only, cases[i].name) != 0)
			continue;
		ran++;
		pid_t pid = fork();
		if (pid < 0) {
			perror("bench_validate: fork");
			return 1;
		}
		if (pid == 0) {
			int rc = run_case(&cases[i], reps);
			fflush(NULL);
			_exit(rc);
		}
		int status = 0;
		while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
			;
		if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
			fprintf(stderr, "bench_validate: case %s failed (status %d)\n", cases[i].name,
				status);
			failed++;
		}
	}
	if (ran == 0) {
		fprintf(stderr, "bench_validate: no case named %s\n", only);
		return 2;
	}
	return failed ? 1 : 0;
}
