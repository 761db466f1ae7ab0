/* test_sna.c: the SNA's wire format: the start request built, every reply read strictly (CONTRACT §3). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <json-c/json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sna.h"

static const struct bw_sna_disk_ref disks[2] = {{2000, 1048576, true}, {2001, 2097152, false}};

/* Parses a reply of the two-disk job; returns its code (and frees the reply). */
static int parse(const char *body, struct bw_sna_progress **keep)
{
	struct bw_sna_progress *p = NULL;
	char why[200] = "";
	int rc = bw_sna_progress_parse(body, strlen(body), disks, 2, &p, why, sizeof(why));
	if (rc == 0)
		assert_non_null(p);
	else
		assert_true(why[0] != '\0');
	if (keep)
		*keep = p;
	else
		free(p);
	return rc;
}

static void test_a_counted_reply(void **state)
{
	(void)state;
	struct bw_sna_progress *p = NULL;
	assert_int_equal(parse("{\"job_id\":\"bk-1\",\"status\":\"running\",\"error\":\"\",\"disks\":["
			       "{\"key\":2000,\"status\":\"completed\",\"bytes_transferred\":1048576,"
			       "\"total_bytes\":1048576,\"change_id\":\"52 3c/4\"},"
			       "{\"key\":2001,\"status\":\"running\",\"bytes_transferred\":1.0e3,"
			       "\"total_bytes\":9223372036854775807,\"extra\":[1]}],\"more\":{}}", &p), 0);
	assert_int_equal(p->status, BW_SNA_RUNNING);
	assert_int_equal(p->n_disks, 2);
	assert_int_equal(p->disks[0].status, BW_SNA_COMPLETED);
	assert_true(p->disks[0].proven);
	assert_string_equal(p->disks[0].change_id, "52 3c/4");
	assert_int_equal(p->disks[1].bytes_transferred, 1000);
	assert_int_equal(p->disks[1].total_bytes, INT64_MAX);
	assert_false(p->disks[1].proven);
	free(p);
	/* a pending job may list no disk yet */
	assert_int_equal(parse("{\"job_id\":\"bk-1\",\"status\":\"pending\",\"disks\":[]}", NULL), 0);
}

/* Completed without the evidence: counted, but not proven (the job fails sna_failed). */
static void test_completion_needs_evidence(void **state)
{
	(void)state;
	static const char *unproven[] = {
		/* no change id */
		"{\"key\":2000,\"status\":\"completed\",\"bytes_transferred\":1048576,\"total_bytes\":1048576,\"change_id\":\"\"}",
		"{\"key\":2000,\"status\":\"completed\",\"bytes_transferred\":1048576,\"total_bytes\":1048576}",
		/* bytes short of the total */
		"{\"key\":2000,\"status\":\"completed\",\"bytes_transferred\":0,\"total_bytes\":1048576,\"change_id\":\"c\"}",
		/* a full disk's total is its size */
		"{\"key\":2000,\"status\":\"completed\",\"bytes_transferred\":1,\"total_bytes\":1,\"change_id\":\"c\"}",
	};
	for (size_t i = 0; i < sizeof(unproven) / sizeof(unproven[0]); i++) {
		char body[600];
		snprintf(body, sizeof(body), "{\"job_id\":\"bk-1\",\"status\":\"completed\",\"disks\":[%s]}",
			 unproven[i]);
		struct bw_sna_progress *p = NULL;
		assert_int_equal(parse(body, &p), 0);
		assert_int_equal(p->disks[0].status, BW_SNA_COMPLETED);
		assert_false(p->disks[0].proven);
		assert_true(p->disks[0].why[0] != '\0');
		free(p);
	}
	/* an incremental disk's total is what changed */
	struct bw_sna_progress *p = NULL;
	assert_int_equal(parse("{\"job_id\":\"bk-1\",\"status\":\"running\",\"disks\":[{\"key\":2001,"
			       "\"status\":\"completed\",\"bytes_transferred\":65536,\"total_bytes\":65536,"
			       "\"change_id\":\"c/2\"}]}", &p), 0);
	assert_true(p->disks[0].proven);
	free(p);
}

/* Replies of another shape are no answer at all (an unanswered poll). */
static void test_other_shapes_are_unanswered(void **state)
{
	(void)state;
	static const char *bad[] = {
		"", "null", "[]", "\"running\"", "<html>502 Bad Gateway</html>", "{\"job_id\":\"bk-1\",",
		"{\"disks\":[],\"status\":null}",
		"{\"job_id\":\"bk-1\",\"status\":null,\"disks\":[]}",
		"{\"job_id\":\"bk-1\",\"status\":\"done\",\"disks\":[]}",
		"{\"job_id\":\"bk-1\",\"status\":7,\"disks\":[]}",
		"{\"job_id\":\"bk-1\",\"status\":\"running\",\"disks\":null}",
		"{\"job_id\":\"bk-1\",\"status\":\"running\",\"disks\":{}}",
		"{\"job_id\":7,\"status\":\"running\",\"disks\":[]}",
		"{\"status\":\"running\",\"disks\":[]}",
		"{\"job_id\":\"bk-1\",\"status\":\"running\",\"disks\":[],\"error\":{\"a\":1}}",
		"{\"job_id\":\"bk-1\",\"status\":\"running\",\"disks\":[null]}",
		"{\"job_id\":\"bk-1\",\"status\":\"running\",\"disks\":[{\"key\":\"2000\",\"status\":\"running\",\"bytes_transferred\":0,\"total_bytes\":1}]}",
		"{\"job_id\":\"bk-1\",\"status\":\"running\",\"disks\":[{\"key\":true,\"status\":\"running\",\"bytes_transferred\":0,\"total_bytes\":1}]}",
		"{\"job_id\":\"bk-1\",\"status\":\"running\",\"disks\":[{\"key\":2002,\"status\":\"running\",\"bytes_transferred\":0,\"total_bytes\":1}]}",
		"{\"job_id\":\"bk-1\",\"status\":\"running\",\"disks\":[{\"key\":2000,\"status\":\"running\",\"bytes_transferred\":0,\"total_bytes\":1},{\"key\":2000,\"status\":\"running\",\"bytes_transferred\":0,\"total_bytes\":1}]}",
		"{\"job_id\":\"bk-1\",\"status\":\"running\",\"disks\":[{\"key\":2000,\"status\":\"done\",\"bytes_transferred\":0,\"total_bytes\":1}]}",
		"{\"job_id\":\"bk-1\",\"status\":\"running\",\"disks\":[{\"key\":2000,\"status\":\"running\",\"bytes_transferred\":\"0\",\"total_bytes\":1}]}",
		"{\"job_id\":\"bk-1\",\"status\":\"running\",\"disks\":[{\"key\":2000,\"status\":\"running\",\"total_bytes\":1}]}",
		"{\"job_id\":\"bk-1\",\"status\":\"running\",\"disks\":[{\"key\":2000,\"status\":\"running\",\"bytes_transferred\":-1,\"total_bytes\":1}]}",
		"{\"job_id\":\"bk-1\",\"status\":\"running\",\"disks\":[{\"key\":2000,\"status\":\"running\",\"bytes_transferred\":0.5,\"total_bytes\":1}]}",
		"{\"job_id\":\"bk-1\",\"status\":\"running\",\"disks\":[{\"key\":2000,\"status\":\"running\",\"bytes_transferred\":9223372036854775808,\"total_bytes\":1}]}",
		"{\"job_id\":\"bk-1\",\"status\":\"running\",\"disks\":[{\"key\":2000,\"status\":\"running\",\"bytes_transferred\":1e19,\"total_bytes\":1}]}",
		"{\"job_id\":\"bk-1\",\"status\":\"running\",\"disks\":[{\"key\":2000,\"status\":\"running\",\"bytes_transferred\":0,\"total_bytes\":null}]}",
		"{\"job_id\":\"bk-1\",\"status\":\"completed\",\"disks\":[{\"key\":2000,\"status\":\"completed\",\"change_id\":null}]}",
		"{\"job_id\":\"bk-1\",\"status\":\"completed\",\"disks\":[{\"key\":2000,\"status\":\"completed\",\"bytes_transferred\":1,\"total_bytes\":1,\"change_id\":{\"a\":1}}]}",
		"{\"job_id\":\"bk-1\",\"status\":\"completed\",\"disks\":[{\"key\":2000,\"status\":\"completed\",\"bytes_transferred\":1048576,\"total_bytes\":1048576,\"change_id\":\"a\\u0000b\"}]}",
		"{\"job_id\":\"bk-1\",\"status\":\"completed\",\"disks\":[{\"key\":2000,\"status\":\"completed\",\"bytes_transferred\":1048576,\"total_bytes\":1048576,\"change_id\":\"a\\nb\"}]}",
		"{\"job_id\":\"bk-1\",\"status\":\"running\",\"disks\":[],\"error\":\"\\ud800\"}",
		"{\"job_id\":\"bk-1\",\"status\":\"running\",\"disks\":[]} trailing",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		if (parse(bad[i], NULL) != BW_ESNA)
			fail_msg("counted as an answer: %s", bad[i]);
	}
	/* more disks than the job has; a change id over 1024 characters; nesting; size */
	static char big[BW_SNA_REPLY_MAX + 64];
	int n = snprintf(big, sizeof(big), "{\"job_id\":\"bk-1\",\"status\":\"running\",\"disks\":[");
	for (int k = 0; k < 3; k++)
		n += snprintf(big + n, sizeof(big) - (size_t)n, "%s{\"key\":%d,\"status\":\"running\","
			      "\"bytes_transferred\":0,\"total_bytes\":1}", k ? "," : "", 2000 + k);
	snprintf(big + n, sizeof(big) - (size_t)n, "]}");
	assert_int_equal(parse(big, NULL), BW_ESNA);
	n = snprintf(big, sizeof(big), "{\"job_id\":\"bk-1\",\"status\":\"completed\",\"disks\":[{\"key\":2000,"
		     "\"status\":\"completed\",\"bytes_transferred\":1048576,\"total_bytes\":1048576,"
		     "\"change_id\":\"");
	memset(big + n, 'c', 1025);
	snprintf(big + n + 1025, sizeof(big) - (size_t)n - 1025, "\"}]}");
	assert_int_equal(parse(big, NULL), BW_ESNA);
	big[n + 1024] = '"';
	snprintf(big + n + 1025, sizeof(big) - (size_t)n - 1025, "}]}");
	assert_int_equal(parse(big, NULL), 0); /* exactly 1024: still an answer */
	for (n = 0; n < 100000; n++)
		big[n] = '[';
	big[n] = '\0';
	assert_int_equal(parse(big, NULL), BW_ESNA);
	n = snprintf(big, sizeof(big), "{\"job_id\":\"bk-1\",\"status\":\"running\",\"disks\":[],\"pad\":\"");
	memset(big + n, 'x', BW_SNA_REPLY_MAX);
	snprintf(big + n + BW_SNA_REPLY_MAX - 8, 8, "\"}");
	assert_int_equal(parse(big, NULL), BW_ESNA);
}

/* The SNA's error text is kept bounded and escaped. */
static void test_error_text_bounded(void **state)
{
	(void)state;
	static char body[4000];
	int n = snprintf(body, sizeof(body), "{\"job_id\":\"bk-1\",\"status\":\"failed\",\"disks\":[],"
			 "\"error\":\"x\\n2026-12-01T00:00:00.000Z bw-worker[1] info: job=bk-1 completed");
	memset(body + n, 'y', 2000);
	snprintf(body + n + 2000, sizeof(body) - (size_t)n - 2000, "\"}");
	struct bw_sna_progress *p = NULL;
	assert_int_equal(parse(body, &p), 0);
	assert_int_equal(p->status, BW_SNA_FAILED);
	assert_true(strlen(p->error) <= BW_TEXT_OUTSIDE_MAX);
	assert_null(strchr(p->error, '\n'));
	assert_non_null(strstr(p->error, "x\\x0a2026"));
	free(p);
}

static void test_start_and_cleanup_replies(void **state)
{
	(void)state;
	char id[BW_SNA_TEXT_SIZE];
	assert_true(bw_sna_start_reply_parse("{\"job_id\":\"sna-42\"}", 19, "bk-1", id));
	assert_string_equal(id, "sna-42");
	static const char *fallback[] = {"", "nope", "{\"job_id\":7}", "{\"job_id\":\"\"}",
					 "{\"job_id\":null}", "{\"job_id\":\"a\\nb\"}", "[1]"};
	for (size_t i = 0; i < sizeof(fallback) / sizeof(fallback[0]); i++) {
		assert_false(bw_sna_start_reply_parse(fallback[i], strlen(fallback[i]), "bk-1", id));
		assert_string_equal(id, "bk-1");
	}
	static char big[2000];
	int n = snprintf(big, sizeof(big), "{\"job_id\":\"");
	memset(big + n, 's', 600);
	snprintf(big + n + 600, sizeof(big) - (size_t)n - 600, "\"}");
	assert_false(bw_sna_start_reply_parse(big, strlen(big), "bk-1", id));
	assert_string_equal(id, "bk-1");

	char text[BW_SNA_TEXT_SIZE];
	assert_true(bw_sna_cleanup_reply_parse("{\"error\":\"snapshot\\u0007 busy\"}", 31, text));
	assert_string_equal(text, "snapshot\\x07 busy");
	assert_false(bw_sna_cleanup_reply_parse("<html>", 6, text));
	assert_string_equal(text, "");
}

static void test_start_request(void **state)
{
	(void)state;
	struct bw_sna_target t[2] = {{2000, 1048576, 10100, "bk-1-2000", NULL},
				     {16000, 512, 10101, "bk-1-16000", "52 3c/\"4\""}};
	struct bw_sna_start_request r = {"bk-1", "db, \"prod\" / shard 1 \xf0\x9f\x98\x80", "/DC/vm/db",
					 "vc.example", "backup@vsphere.local", "p\"w\\d\n", true,
					 "fd00::1", t, 2, false, NULL};
	char *targets = NULL;
	assert_int_equal(bw_sna_targets(&r, &targets), 0);
	assert_string_equal(targets, "2000:nbd://[fd00::1]:10100/bk-1-2000,"
				     "16000:nbd://[fd00::1]:10101/bk-1-16000");
	free(targets);
	char url[128];
	bw_sna_nbd_url(url, sizeof(url), "127.0.0.1", 10100, "bk-1-2000", false);
	assert_string_equal(url, "nbd://127.0.0.1:10100/bk-1-2000");
	bw_sna_nbd_url(url, sizeof(url), "hub.example", 10100, "bk-1-2000", true);
	assert_string_equal(url, "nbds://hub.example:10100/bk-1-2000");
	r.tls = true;
	assert_int_equal(bw_sna_targets(&r, &targets), 0);
	assert_string_equal(targets, "2000:nbds://[fd00::1]:10100/bk-1-2000,"
				     "16000:nbds://[fd00::1]:10101/bk-1-16000");
	free(targets);
}

/* A key travels in a start request only over https or to an SNA on loopback (§3.1). */
static void test_key_only_on_a_private_path(void **state)
{
	(void)state;
	struct bw_sna_target t[1] = {{2000, 1048576, 10100, "bk-1-2000", NULL}};
	struct bw_sna_start_request r = {"bk-1", "vm", "/DC/vm/vm", "vc", "u", "p", false, "hub", t, 1,
					 true, "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"};
	static const struct {
		const char *url;
		int rc;
	} cases[] = {{"http://sna.example:8081", BW_EPERM}, {"http://10.1.2.3:8081", BW_EPERM},
		     {"https://sna.example:8443", 0},      {"http://127.0.0.1:8081", 0},
		     {"http://[::1]:8081", 0},             {"http://localhost:8081/", 0}};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct bw_sna_opts o = {.url = cases[i].url, .connect_timeout_s = 1, .timeout_s = 1,
					.max_attempts = 1, .backoff_base_ms = 1, .backoff_cap_s = 1};
		struct bw_sna *s = NULL;
		assert_int_equal(bw_sna_new(&s, &o), 0);
		if (bw_sna_start(s, &r, NULL, NULL, NULL) != cases[i].rc)
			fail_msg("%s: not %d", cases[i].url, cases[i].rc);
		r.tls = false; /* plain NBD: nothing secret of ours in the body beyond the password */
		assert_int_equal(bw_sna_start(s, &r, NULL, NULL, NULL), 0);
		r.tls = true;
		r.tls_psk = NULL;
		assert_int_equal(bw_sna_start(s, &r, NULL, NULL, NULL), BW_EINVAL);
		r.tls_psk = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
		bw_sna_free(s);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_a_counted_reply),
		cmocka_unit_test(test_completion_needs_evidence),
		cmocka_unit_test(test_other_shapes_are_unanswered),
		cmocka_unit_test(test_error_text_bounded),
		cmocka_unit_test(test_start_and_cleanup_replies),
		cmocka_unit_test(test_start_request),
		cmocka_unit_test(test_key_only_on_a_private_path),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
