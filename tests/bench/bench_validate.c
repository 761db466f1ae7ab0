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
 * Every case's body is generated once, in memory; each of its REPS runs is a fresh child
 * process (so the heap is new, as for a worker's first such message, and the peak RSS is
 * the run's). For each case, one line of key=value pairs on stdout:
 *
 *   case=NAME bytes=N disks=N max_bytes=N json_ms=T parse_ms=T parse_max_ms=T warm_ms=T
 *   rc=0|BW_EMESSAGE violations=N truncated=0|1 errors_bytes=N event_bytes=N
 *   max_rss_mib=N ok=0|1
 *
 * json_ms is bw_json_parse_strict alone (the strict pass and json-c's tree), parse_ms all of
 * bw_message_parse (the same plus every rule), each in a fresh process, medians of REPS runs;
 * parse_max_ms the slowest of them; warm_ms a second bw_message_parse in the same process,
 * on the heap the first one freed. errors_bytes is the size of the errors[] array a
 * backup.rejected carries (JSON, no spaces), event_bytes that of the whole event from
 * bw_event_rejected. ok=1 when every run had the expected outcome: the valid message
 * accepted, the others rejected with at most BW_VERDICT_MAX_ERRORS + 1 entries. Exit 0
 * when every case was ok, 1 otherwise, 2 usage. Timing is printed, never asserted: the
 * goal line is scripts/bench-validate's.
 */

#define MIB (1024u * 1024u)
#define BIG_BYTES (16u * MIB)	  /* the large cases: 64 times the default limit */
#define BIG_MAX_BYTES (32u * MIB) /* job.max_message_bytes raised for them */

struct bench_case {
	const char *name;
	size_t bytes;
	size_t max_bytes;
	bool valid;				       /* the expected outcome */
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
 * labels, then unknown fields filling the rest: 20,000 top-level members of ~100 bytes,
 * an array of 15,000 small objects (about 80,000 values in all: under BW_JSON_MAX_VALUES),
 * and one long string to the exact size.
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
	for (int i = 0; i < 20000; i++)
		bw_buf_printf(b, ",\"x_field_%06d\":\"%.80s\"", i, text);
	bw_buf_puts(b, ",\"x_history\":[");
	for (int i = 0; i < 15000 && b->len < bytes / 4 * 3 && !b->failed; i++)
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

/* disks[] of valid disks keyed 1, 2, 3... (same: every key 2000). */
static size_t keyed_disks(struct bw_buf *b, size_t bytes, bool same)
{
	size_t n = 0;
	bw_buf_puts(b, head);
	bw_buf_puts(b, ",\"disks\":[");
	for (; b->len + 48 < bytes && !b->failed; n++)
		bw_buf_printf(b, "%s{\"key\":%zu,\"size_bytes\":512}", n ? "," : "",
			      same ? (size_t)2000 : n + 1);
	bw_buf_puts(b, "]");
	pad_to(b, bytes);
	return n;
}

/* disks[] of distinct valid disks: one violation (max_items), and every key to compare. */
static size_t gen_unique_disks(struct bw_buf *b, size_t bytes)
{
	return keyed_disks(b, bytes, false);
}

/* disks[] whose keys all repeat the first: a "unique" violation per disk. */
static size_t gen_same_key_disks(struct bw_buf *b, size_t bytes)
{
	return keyed_disks(b, bytes, true);
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

/* What one measuring child reports to the parent through a pipe. */
struct run_result {
	int ok;		/* the parse ended as the case expects */
	int rc;		/* of bw_message_parse */
	double json_ms; /* bw_json_parse_strict, alone in its process */
	double cold_ms; /* bw_message_parse, the first run in its process */
	double warm_ms; /* bw_message_parse again, once the first run's memory was freed */
	size_t violations;
	int truncated;
	size_t errors_bytes, event_bytes;
	long max_rss_mib;
};

/*
 * One measuring run, in a fresh child (forked from a parent that holds little more than
 * the body): a fresh process is what a worker's first such message meets, every page of
 * json-c's tree a new page. With json_only, the strict JSON pass alone; else
 * bw_message_parse twice, the second on the heap the first one freed (the other extreme).
 * Each first run is the first allocation of its process: after a 4 GiB tree was freed,
 * glibc's malloc would first consolidate millions of freed chunks.
 */
static void measure(const struct bench_case *bc, const struct bw_buf *b, bool json_only,
		    struct run_result *res)
{
	struct bw_job_spec *spec = NULL;
	struct bw_verdict *vd = NULL;

	if (json_only) {
		struct json_object *doc = NULL;
		char why[160];
		int64_t t0 = now_ns();
		int jrc = bw_json_parse_strict(b->data, b->len, &doc, why, sizeof(why));
		res->json_ms = (double)(now_ns() - t0) / 1e6;
		json_object_put(doc);
		/* a hostile body may be refused by the JSON pass itself (BW_JSON_MAX_VALUES) */
		res->ok = jrc == 0 || (!bc->valid && jrc == BW_EJSON);
		if (jrc != 0)
			fprintf(stderr, "bench_validate: %s: the JSON pass: %s\n", bc->name, why);
		return;
	}
	int64_t t0 = now_ns();
	res->rc = bw_message_parse(b->data, b->len, bc->max_bytes, &spec, &vd);
	res->cold_ms = (double)(now_ns() - t0) / 1e6;
	bw_job_spec_free(spec);
	bw_verdict_free(vd);
	spec = NULL;
	vd = NULL;
	t0 = now_ns();
	res->rc = bw_message_parse(b->data, b->len, bc->max_bytes, &spec, &vd);
	res->warm_ms = (double)(now_ns() - t0) / 1e6;

	if (res->rc == BW_EMESSAGE) {
		char *event = NULL, *id = NULL;
		res->violations = vd->n;
		res->truncated = vd->n > 0 && strcmp(vd->v[vd->n - 1].rule, "truncated") == 0;
		res->errors_bytes = errors_json_bytes(vd);
		if (bw_event_rejected(b->data, b->len, vd, "bench-host", "bench-host-1", &event,
				      &id) == 0)
			res->event_bytes = strlen(event);
		free(event);
		free(id);
		fprintf(stderr, "bench_validate: %s: first %s: %s, last %s: %s: %s\n", bc->name,
			vd->v[0].path, vd->v[0].rule, vd->v[vd->n - 1].path, vd->v[vd->n - 1].rule,
			vd->v[vd->n - 1].message);
	}
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	res->max_rss_mib = ru.ru_maxrss / 1024;
	res->ok = bc->valid
		      ? res->rc == 0
		      : res->rc == BW_EMESSAGE && res->violations > 0 &&
			    res->violations <= BW_VERDICT_MAX_ERRORS + 1 && res->event_bytes > 0;
	bw_job_spec_free(spec);
	bw_verdict_free(vd);
}

/* Runs measure() in a child; returns 0 and fills *res, or -1. */
static int measure_in_child(const struct bench_case *bc, const struct bw_buf *b, bool json_only,
			    struct run_result *res)
{
	int fds[2];
	if (pipe(fds) != 0) {
		perror("bench_validate: pipe");
		return -1;
	}
	pid_t pid = fork();
	if (pid < 0) {
		perror("bench_validate: fork");
		close(fds[0]);
		close(fds[1]);
		return -1;
	}
	if (pid == 0) {
		struct run_result r = {0};
		close(fds[0]);
		measure(bc, b, json_only, &r);
		_exit(write(fds[1], &r, sizeof(r)) == (ssize_t)sizeof(r) ? 0 : 1);
	}
	close(fds[1]);
	ssize_t n;
	while ((n = read(fds[0], res, sizeof(*res))) < 0 && errno == EINTR)
		;
	close(fds[0]);
	int status = 0;
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	if (n != (ssize_t)sizeof(*res) || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		fprintf(stderr, "bench_validate: %s: the measuring child failed (status %d)\n",
			bc->name, status);
		return -1;
	}
	return 0;
}

static double median(double *v, int n)
{
	qsort(v, (size_t)n, sizeof(double), cmp_double);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* One case: the body made once, reps measuring children; returns 0 when all were ok. */
static int run_case(const struct bench_case *bc, int reps)
{
	struct bw_buf b = BW_BUF_INIT;
	struct run_result res = {0};
	double json_ms[1000], cold_ms[1000], warm_ms[1000];
	long rss = 0;
	int ok = 1;

	size_t disks = bc->gen(&b, bc->bytes);
	if (b.failed || b.len != bc->bytes) {
		fprintf(stderr, "bench_validate: %s: generated %zu bytes, not %zu\n", bc->name,
			b.len, bc->bytes);
		bw_buf_free(&b);
		return 1;
	}
	for (int r = 0; r < reps; r++) {
		if (measure_in_child(bc, &b, true, &res) != 0 || !res.ok) {
			bw_buf_free(&b);
			return 1;
		}
		json_ms[r] = res.json_ms;
		if (measure_in_child(bc, &b, false, &res) != 0) {
			bw_buf_free(&b);
			return 1;
		}
		cold_ms[r] = res.cold_ms;
		warm_ms[r] = res.warm_ms;
		rss = res.max_rss_mib > rss ? res.max_rss_mib : rss;
		ok &= res.ok;
	}
	double cold_max = 0;
	for (int r = 0; r < reps; r++)
		cold_max = cold_ms[r] > cold_max ? cold_ms[r] : cold_max;
	printf("case=%s bytes=%zu disks=%zu max_bytes=%zu json_ms=%.2f parse_ms=%.2f "
	       "parse_max_ms=%.2f warm_ms=%.2f rc=%s violations=%zu truncated=%d "
	       "errors_bytes=%zu event_bytes=%zu max_rss_mib=%ld ok=%d\n",
	       bc->name, b.len, disks, bc->max_bytes, median(json_ms, reps), median(cold_ms, reps),
	       cold_max, median(warm_ms, reps), res.rc == 0 ? "0" : bw_err_name(res.rc),
	       res.violations, res.truncated, res.errors_bytes, res.event_bytes, rss, ok);
	fflush(stdout);
	bw_buf_free(&b);
	return ok ? 0 : 1;
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
		failed += run_case(&cases[i], reps) != 0;
	}
	if (ran == 0) {
		fprintf(stderr, "bench_validate: no case named %s\n", only);
		return 2;
	}
	return failed ? 1 : 0;
}
