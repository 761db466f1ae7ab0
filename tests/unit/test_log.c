/* test_log.c: log lines as text and JSON (parsed back), escaping, the 4 KiB bound, journald's priority prefix. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <fcntl.h>
#include <json-c/json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "error.h"
#include "log.h"
#include "rand.h"
#include "text.h"

#define LINE_MAX_BYTES 4096

static int saved_stderr = -1;
static char capture_path[] = "/tmp/bw-test-log-XXXXXX";
static int capture_fd = -1;

/* stderr goes to a fresh file until release() */
static void capture(void)
{
	strcpy(capture_path, "/tmp/bw-test-log-XXXXXX");
	capture_fd = mkstemp(capture_path);
	assert_true(capture_fd >= 0);
	fflush(stderr);
	saved_stderr = dup(STDERR_FILENO);
	assert_true(dup2(capture_fd, STDERR_FILENO) >= 0);
}

/* Restores stderr; returns what was written (malloc'd) and its length in *len. */
static char *release(size_t *len)
{
	assert_true(dup2(saved_stderr, STDERR_FILENO) >= 0);
	close(saved_stderr);
	off_t size = lseek(capture_fd, 0, SEEK_END);
	char *text = malloc((size_t)size + 1);
	assert_non_null(text);
	assert_int_equal(pread(capture_fd, text, (size_t)size, 0), size);
	text[size] = '\0';
	close(capture_fd);
	unlink(capture_path);
	*len = (size_t)size;
	return text;
}

static void reset(void)
{
	bw_log_init("bw-test", BW_LOG_DEBUG, false);
	bw_log_set_format(BW_LOG_TEXT);
	bw_log_set_priority_prefix(false);
	bw_log_set_identity(NULL, NULL);
	bw_log_set_job(NULL);
}

/* Parses one line (without its newline) as a JSON object; fails the test otherwise. */
static struct json_object *parse_line(const char *line, size_t len)
{
	struct json_tokener *tok = json_tokener_new();
	struct json_object *o = json_tokener_parse_ex(tok, line, (int)len);
	assert_int_equal(json_tokener_get_error(tok), json_tokener_success);
	assert_int_equal(json_tokener_get_parse_end(tok), len); /* nothing after the object */
	json_tokener_free(tok);
	assert_non_null(o);
	assert_true(json_object_is_type(o, json_type_object));
	return o;
}

static const char *str(struct json_object *o, const char *key)
{
	struct json_object *v = NULL;
	if (!json_object_object_get_ex(o, key, &v))
		return NULL;
	assert_true(json_object_is_type(v, json_type_string));
	return json_object_get_string(v);
}

static void test_json_fields(void **state)
{
	(void)state;
	reset();
	bw_log_set_format(BW_LOG_JSON);
	bw_log_set_identity("hub1-worker-1", "hub1");
	capture();
	bw_log_info("worker up: %d job(s)", 4);
	bw_log_set_job("job-0001");
	bw_log_warnx("job=%s claimed", "job-0001");
	bw_log_set_job(NULL);
	bw_log_debug("done");
	size_t len;
	char *text = release(&len);

	char *save = NULL, *line;
	int n = 0;
	for (line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save), n++) {
		struct json_object *o = parse_line(line, strlen(line));
		const char *ts = str(o, "ts");
		assert_non_null(ts);
		/* RFC 3339 UTC with milliseconds: 2026-12-01T22:16:50.123Z */
		assert_int_equal(strlen(ts), 24);
		assert_true(ts[4] == '-' && ts[10] == 'T' && ts[19] == '.' && ts[23] == 'Z');
		assert_string_equal(str(o, "prog"), "bw-test");
		assert_string_equal(str(o, "worker_id"), "hub1-worker-1");
		assert_string_equal(str(o, "host"), "hub1");
		struct json_object *pid = NULL;
		assert_true(json_object_object_get_ex(o, "pid", &pid));
		assert_int_equal(json_object_get_int(pid), getpid());
		if (n == 0) {
			assert_string_equal(str(o, "level"), "info");
			assert_string_equal(str(o, "msg"), "worker up: 4 job(s)");
			assert_null(str(o, "job_id"));
		} else if (n == 1) {
			assert_string_equal(str(o, "level"), "warn");
			assert_string_equal(str(o, "job_id"), "job-0001");
			assert_string_equal(str(o, "msg"), "job=job-0001 claimed");
		} else {
			assert_string_equal(str(o, "level"), "debug");
			assert_null(str(o, "job_id")); /* cleared */
		}
		json_object_put(o);
	}
	assert_int_equal(n, 3);
	free(text);
}

/* Whatever the message holds, one line that parses as JSON, its msg the text escaped as
 * the text format escapes it. */
static void check_one(const char *msg, size_t mlen)
{
	capture();
	bw_log_info("%.*s", (int)mlen, msg);
	size_t len;
	char *text = release(&len);
	assert_true(len > 0 && len <= LINE_MAX_BYTES);
	assert_int_equal(text[len - 1], '\n');
	assert_ptr_equal(memchr(text, '\n', len), text + len - 1); /* exactly one line */
	struct json_object *o = parse_line(text, len - 1);
	const char *got = str(o, "msg");
	assert_non_null(got);
	/* printf stops at a NUL */
	size_t upto = strnlen(msg, mlen);
	char want[LINE_MAX_BYTES * 4];
	bw_text_escape(want, sizeof(want), msg, upto);
	if (len < LINE_MAX_BYTES - 64) {
		assert_string_equal(got, want);
	} else { /* cut: a prefix of the escaped text, then "..." */
		size_t g = strlen(got);
		assert_true(g > 3 && strcmp(got + g - 3, "...") == 0);
		assert_memory_equal(got, want, g - 3);
	}
	json_object_put(o);
	free(text);
}

static void test_json_escaping(void **state)
{
	(void)state;
	reset();
	bw_log_set_format(BW_LOG_JSON);
	bw_log_set_identity("w\"1\\", "h\nost");
	bw_log_set_job("j\"b");
	static const char *const hostile[] = {
		"quote \" backslash \\ end",
		"new\nline\r\n{\"forged\":true}",
		"\x01\x02\x1f\x7f tab\t",
		"bad utf-8 \xff\xfe \xc3\x28 \xe2\x82",
		"\xc2\x85 C1 next line, \xe2\x80\xa8 line separator, h\xc3\xa9llo \xf0\x9f\x98\x80",
		"\\u0000 \\\" literal escapes",
	};
	for (size_t i = 0; i < sizeof(hostile) / sizeof(hostile[0]); i++)
		check_one(hostile[i], strlen(hostile[i]));

	capture();
	bw_log_info("x");
	size_t len;
	char *text = release(&len);
	struct json_object *o = parse_line(text, len - 1);
	assert_string_equal(str(o, "worker_id"), "w\"1\\x5c");
	assert_string_equal(str(o, "host"), "h\\x0aost");
	assert_string_equal(str(o, "job_id"), "j\"b");
	json_object_put(o);
	free(text);

	/* long messages full of characters that grow when escaped: cut, still valid */
	char big[12000];
	for (size_t fill = 0; fill < 4; fill++) {
		static const char units[] = "\"\\\n\xe2\x82\xac";
		for (size_t i = 0; i < sizeof(big); i++)
			big[i] = fill == 3 ? units[i % 6] : "a\"\\\n"[fill];
		check_one(big, sizeof(big));
	}
	/* random bytes */
	for (int k = 0; k < 300; k++) {
		unsigned char r[600];
		assert_int_equal(bw_rand_bytes(r, sizeof(r)), 0);
		size_t n = 1 + r[0] * 2u;
		for (size_t i = 0; i < n; i++)
			if (r[i] == 0)
				r[i] = '"';
		check_one((const char *)r, n);
	}
}

static void test_text_unchanged(void **state)
{
	(void)state;
	reset();
	bw_log_set_identity("w1", "h1");
	bw_log_set_job("j1");
	capture();
	bw_log_info("a \"b\" \\ c\nd");
	size_t len;
	char *text = release(&len);
	char want[256];
	snprintf(want, sizeof(want), "bw-test[%ld] info: a \"b\" \\x5c c\\x0ad\n", (long)getpid());
	assert_string_equal(text, want);
	free(text);
}

/* JOURNAL_STREAM names stderr's file: journald; then each line starts with its priority. */
static void test_priority_prefix(void **state)
{
	(void)state;
	reset();
	capture();
	struct stat st;
	assert_int_equal(fstat(STDERR_FILENO, &st), 0);
	char js[64];
	unsetenv("JOURNAL_STREAM");
	bool none = bw_log_stderr_is_journal();
	snprintf(js, sizeof(js), "%llu:%llu", (unsigned long long)st.st_dev,
		 (unsigned long long)st.st_ino + 1);
	setenv("JOURNAL_STREAM", js, 1);
	bool other = bw_log_stderr_is_journal(); /* inherited through a redirect: not journald */
	snprintf(js, sizeof(js), "%llu:%llu", (unsigned long long)st.st_dev,
		 (unsigned long long)st.st_ino);
	setenv("JOURNAL_STREAM", js, 1);
	bool journal = bw_log_stderr_is_journal();
	unsetenv("JOURNAL_STREAM");
	bw_log_set_priority_prefix(journal);
	bw_log_warnx("w");
	bw_log_info("i");
	bw_log_debug("d");
	bw_log_set_format(BW_LOG_JSON);
	bw_log_warnx("jw");
	size_t len;
	char *text = release(&len);
	assert_false(none);
	assert_false(other);
	assert_true(journal);
	char want[512];
	long pid = (long)getpid();
	snprintf(want, sizeof(want),
		 "<4>bw-test[%ld] warn: w\n<6>bw-test[%ld] info: i\n<7>bw-test[%ld] debug: d\n<4>{",
		 pid, pid, pid);
	assert_memory_equal(text, want, strlen(want));
	char *last = strstr(text, "<4>{");
	struct json_object *o = parse_line(last + 3, strlen(last + 3) - 1);
	assert_string_equal(str(o, "msg"), "jw");
	assert_string_equal(str(o, "level"), "warn");
	json_object_put(o);
	free(text);
}

static void test_format_parse(void **state)
{
	(void)state;
	enum bw_log_format f = BW_LOG_TEXT;
	assert_int_equal(bw_log_format_parse("json", &f), 0);
	assert_int_equal(f, BW_LOG_JSON);
	assert_int_equal(bw_log_format_parse("text", &f), 0);
	assert_int_equal(f, BW_LOG_TEXT);
	assert_int_equal(bw_log_format_parse("JSONL", &f), BW_EINVAL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_json_fields),
		cmocka_unit_test(test_json_escaping),
		cmocka_unit_test(test_text_unchanged),
		cmocka_unit_test(test_priority_prefix),
		cmocka_unit_test(test_format_parse),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
