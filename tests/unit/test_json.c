/* test_json.c: the strict JSON pass refuses what RFC 8259 refuses and json-c would accept. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "json.h"

static int parse(const char *s, size_t n)
{
	struct json_object *o = NULL;
	char why[160];
	int rc = bw_json_parse_strict(s, n, &o, why, sizeof(why));
	json_object_put(o);
	return rc;
}

#define OK(lit) assert_int_equal(parse(lit, sizeof(lit) - 1), 0)
#define BAD(lit) assert_int_equal(parse(lit, sizeof(lit) - 1), BW_EJSON)

static void test_accepts_standard_json(void **state)
{
	(void)state;
	OK("{}");
	OK(" {\"a\": [1, -0, 1.5e3, 2E-2, true, false, null, \"x\"]} \n");
	OK("{\"a\":\"\\ud83d\\ude00 \\u00e9 \\\" \\\\ \\/ \\b\\f\\n\\r\\t\"}");
	OK("{\"a\":\"\xf0\x9f\x98\x80\"}");
	OK("{\"a\":\"\\u0000\"}");
	OK("{\"a\":1,\"a\":2}");
	OK("[]");
	OK("null");
}

static void test_refuses_what_json_c_would_take(void **state)
{
	(void)state;
	BAD("{\"a\":NaN}");
	BAD("{\"a\":Infinity}");
	BAD("{\"a\":/*c*/1}");
	BAD("{'a':1}");
	BAD("{\"a\":1,}");
	BAD("{\"a\":1} x");
	BAD("{\"a\":\"\x01\"}");
	BAD("{\"a\":\"\\ud800\"}");
	BAD("{\"a\":\"\\udc00\"}");
	BAD("{\"a\":\"\\ud800\\u0041\"}");
	BAD("{\"a\":\"\xff\"}");
	BAD("{\"a\":\"\xc0\xaf\"}");
	BAD("{\"a\":\"\xed\xa0\x80\"}");
	BAD("{\"a\":\"\xf4\x90\x80\x80\"}");
	BAD("\xef\xbb\xbf{}");
	BAD("{\"a\":01}");
	BAD("{\"a\":1.}");
	BAD("{\"a\":.5}");
	BAD("{\"a\":+1}");
	BAD("{\"a\":\"\\x\"}");
	BAD("{\"a\":tru}");
	BAD("{\"a\\u0000b\":1}");
	BAD("{\"a\":\"abc");
	BAD("");
	BAD("   ");
	BAD("{\"a\":1}\0");
}

static void test_depth_limit(void **state)
{
	(void)state;
	char buf[300];
	/* {"a": + 63 '[' + 63 ']' + } : depth 64 */
	size_t n = 0;
	n += (size_t)sprintf(buf, "{\"a\":");
	for (int i = 0; i < 63; i++)
		buf[n++] = '[';
	for (int i = 0; i < 63; i++)
		buf[n++] = ']';
	buf[n++] = '}';
	assert_int_equal(parse(buf, n), 0);
	n = (size_t)sprintf(buf, "{\"a\":");
	for (int i = 0; i < 64; i++)
		buf[n++] = '[';
	for (int i = 0; i < 64; i++)
		buf[n++] = ']';
	buf[n++] = '}';
	assert_int_equal(parse(buf, n), BW_EJSON);
}

static void test_integers(void **state)
{
	(void)state;
	struct {
		const char *json;
		bool ok;
		int64_t v;
	} cases[] = {
		{"1", true, 1},
		{"1.0", true, 1},
		{"1e3", true, 1000},
		{"-0", true, 0},
		{"1.5", false, 0},
		{"1e400", false, 0},
		{"\"1\"", false, 0},
		{"true", false, 0},
		{"99999999999999999999", true, INT64_MAX},
		{"-99999999999999999999", true, INT64_MIN},
		{"1e30", true, INT64_MAX},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct json_object *o = NULL;
		char why[160];
		assert_int_equal(
			bw_json_parse_strict(cases[i].json, strlen(cases[i].json), &o, why, sizeof(why)),
			0);
		int64_t v = 0;
		assert_int_equal(bw_json_get_integer(o, &v), cases[i].ok);
		if (cases[i].ok)
			assert_true(v == cases[i].v);
		json_object_put(o);
	}
}

static void test_reason_names_byte_offset(void **state)
{
	(void)state;
	struct json_object *o = NULL;
	char why[160];
	assert_int_equal(bw_json_parse_strict("{\"a\":NaN}", 9, &o, why, sizeof(why)), BW_EJSON);
	assert_non_null(strstr(why, "byte 5"));
	assert_null(o);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_accepts_standard_json),
		cmocka_unit_test(test_refuses_what_json_c_would_take),
		cmocka_unit_test(test_depth_limit),
		cmocka_unit_test(test_integers),
		cmocka_unit_test(test_reason_names_byte_offset),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
