/* test_cancel.c: backup.cancel (CONTRACT §2.1): what is a cancel, what is not, and its builder. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "cancel.h"

static int parse(const char *body, struct bw_cancel *c, char *why, size_t whysz)
{
	return bw_cancel_parse(body, strlen(body), c, why, whysz);
}

static void test_valid(void **state)
{
	(void)state;
	struct bw_cancel c;
	char why[200];
	assert_int_equal(parse("{\"schema_version\":1,\"job_id\":\"bk-1\"}", &c, why, sizeof(why)), 0);
	assert_string_equal(c.job_id, "bk-1");
	assert_string_equal(c.reason, "");
	assert_int_equal(parse("{\"schema_version\":1.0,\"job_id\":\"bk.2_x\",\"reason\":"
			       "\"window closed \\u00e9\",\"extra\":[1]}",
			       &c, why, sizeof(why)),
			 0);
	assert_string_equal(c.job_id, "bk.2_x");
	assert_string_equal(c.reason, "window closed \xc3\xa9");
}

static void test_invalid(void **state)
{
	(void)state;
	static const struct {
		const char *body;
		const char *why;
	} cases[] = {
		{"", "not JSON"},
		{"[1]", "must be a JSON object"},
		{"{\"job_id\":\"a\"}", "schema_version is required"},
		{"{\"schema_version\":2,\"job_id\":\"a\"}", "schema_version must be the integer 1"},
		{"{\"schema_version\":\"1\",\"job_id\":\"a\"}", "schema_version must be the integer 1"},
		{"{\"schema_version\":1}", "job_id is required"},
		{"{\"schema_version\":1,\"job_id\":7}", "job_id must be a string"},
		{"{\"schema_version\":1,\"job_id\":\"\"}", "job_id must not be empty"},
		{"{\"schema_version\":1,\"job_id\":\"-a\"}", "job_id must start"},
		{"{\"schema_version\":1,\"job_id\":\"a:b\"}", "job_id must start"},
		{"{\"schema_version\":1,\"job_id\":\"a\",\"reason\":1}", "reason must be a string"},
		{"{\"schema_version\":1,\"job_id\":\"a\",\"reason\":\"x\\u0007\"}",
		 "reason must not contain control characters"},
		{"{\"schema_version\":1,\"job_id\":\"a\",\"job_id\":\"b c\"}", "job_id must start"},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct bw_cancel c;
		char why[200] = "";
		assert_int_equal(parse(cases[i].body, &c, why, sizeof(why)), BW_EMESSAGE);
		if (strstr(why, cases[i].why) == NULL)
			fail_msg("case %zu: %s: got \"%s\"", i, cases[i].body, why);
		assert_string_equal(c.job_id, "");
	}
}

static void test_bounds(void **state)
{
	(void)state;
	char body[BW_CANCEL_MAX_BYTES + 64];
	char id[200];
	memset(id, 'a', 129);
	id[129] = '\0';
	struct bw_cancel c;
	char why[200];
	snprintf(body, sizeof(body), "{\"schema_version\":1,\"job_id\":\"%.128s\"}", id);
	assert_int_equal(parse(body, &c, why, sizeof(why)), 0);
	assert_int_equal(strlen(c.job_id), 128);
	snprintf(body, sizeof(body), "{\"schema_version\":1,\"job_id\":\"%s\"}", id);
	assert_int_equal(parse(body, &c, why, sizeof(why)), BW_EMESSAGE);

	/* 256 code points of 4 bytes each fit; 257 do not */
	char reason[257 * 4 + 1] = "";
	for (int i = 0; i < 256; i++)
		strcat(reason, "\xf0\x9f\x92\xbe");
	snprintf(body, sizeof(body), "{\"schema_version\":1,\"job_id\":\"a\",\"reason\":\"%s\"}",
		 reason);
	assert_int_equal(parse(body, &c, why, sizeof(why)), 0);
	assert_string_equal(c.reason, reason);
	strcat(reason, "x");
	snprintf(body, sizeof(body), "{\"schema_version\":1,\"job_id\":\"a\",\"reason\":\"%s\"}",
		 reason);
	assert_int_equal(parse(body, &c, why, sizeof(why)), BW_EMESSAGE);
	assert_non_null(strstr(why, "longer than 256"));

	memset(body, ' ', sizeof(body) - 1);
	body[sizeof(body) - 1] = '\0';
	assert_int_equal(parse(body, &c, why, sizeof(why)), BW_EMESSAGE);
	assert_non_null(strstr(why, "larger than 4096 bytes"));
}

static void test_build_round_trip(void **state)
{
	(void)state;
	struct bw_buf b = BW_BUF_INIT;
	char why[200];
	assert_int_equal(bw_cancel_build("bk-1", "quote \" and \\ and \xc3\xa9", &b, why, sizeof(why)), 0);
	struct bw_cancel c;
	assert_int_equal(bw_cancel_parse(b.data, b.len, &c, why, sizeof(why)), 0);
	assert_string_equal(c.job_id, "bk-1");
	assert_string_equal(c.reason, "quote \" and \\ and \xc3\xa9");
	bw_buf_free(&b);

	assert_int_equal(bw_cancel_build("bk-2", NULL, &b, why, sizeof(why)), 0);
	assert_string_equal(b.data, "{\"schema_version\":1,\"job_id\":\"bk-2\"}");
	bw_buf_free(&b);

	assert_int_equal(bw_cancel_build("bad id", NULL, &b, why, sizeof(why)), BW_EINVAL);
	assert_null(b.data);
	assert_int_equal(bw_cancel_build("a", "bell\a", &b, why, sizeof(why)), BW_EINVAL);
	assert_non_null(strstr(why, "control characters"));
	assert_null(b.data);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_valid),
		cmocka_unit_test(test_invalid),
		cmocka_unit_test(test_bounds),
		cmocka_unit_test(test_build_round_trip),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
