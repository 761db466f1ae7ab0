/* test_text.c: UTF-8 decoding, control characters, identifiers, quoting, FNV-1a. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "text.h"

static void test_safe_id(void **state)
{
	(void)state;
	assert_true(bw_text_is_safe_id("bk-2026-11-22-0001", 18));
	assert_true(bw_text_is_safe_id("a", 1));
	assert_true(bw_text_is_safe_id("A._-9", 5));
	assert_false(bw_text_is_safe_id("", 0));
	assert_false(bw_text_is_safe_id("-a", 2));
	assert_false(bw_text_is_safe_id(".a", 2));
	assert_false(bw_text_is_safe_id("a:b", 3));
	assert_false(bw_text_is_safe_id("a/b", 3));
	assert_false(bw_text_is_safe_id("a b", 3));
	assert_false(bw_text_is_safe_id("a\0b", 3));
	assert_false(bw_text_is_safe_id("\xc3\xa9", 2));
}

static void test_utf8_decode(void **state)
{
	(void)state;
	uint32_t cp;
	assert_int_equal(bw_utf8_decode((const unsigned char *)"A", 1, &cp), 1);
	assert_int_equal(cp, 'A');
	assert_int_equal(bw_utf8_decode((const unsigned char *)"\xc3\xa9", 2, &cp), 2);
	assert_int_equal(cp, 0xe9);
	assert_int_equal(bw_utf8_decode((const unsigned char *)"\xf0\x9f\x98\x80", 4, &cp), 4);
	assert_int_equal(cp, 0x1f600);
	/* overlong, surrogate, above U+10FFFF, truncated, stray continuation, 0xff */
	assert_int_equal(bw_utf8_decode((const unsigned char *)"\xc0\xaf", 2, &cp), 0);
	assert_int_equal(bw_utf8_decode((const unsigned char *)"\xe0\x80\xaf", 3, &cp), 0);
	assert_int_equal(bw_utf8_decode((const unsigned char *)"\xed\xa0\x80", 3, &cp), 0);
	assert_int_equal(bw_utf8_decode((const unsigned char *)"\xf4\x90\x80\x80", 4, &cp), 0);
	assert_int_equal(bw_utf8_decode((const unsigned char *)"\xe2\x82", 2, &cp), 0);
	assert_int_equal(bw_utf8_decode((const unsigned char *)"\x80", 1, &cp), 0);
	assert_int_equal(bw_utf8_decode((const unsigned char *)"\xff", 1, &cp), 0);
}

static void test_length_and_control(void **state)
{
	(void)state;
	assert_int_equal(bw_utf8_length("h\xc3\xa9llo \xf0\x9f\x98\x80", 11), 7);
	assert_int_equal(bw_utf8_length("\xff", 1), SIZE_MAX);
	assert_false(bw_text_has_control("db, \"prod\" / shard 1", 20));
	assert_true(bw_text_has_control("a\x01", 2));
	assert_true(bw_text_has_control("a\x7f", 2));
	assert_true(bw_text_has_control("a\xc2\x85", 3)); /* U+0085, C1 */
	assert_false(bw_text_has_control("a\xc2\xa0", 3)); /* U+00A0 is not control */
	assert_true(bw_text_has_control("a\0b", 3));
	assert_true(bw_is_control(0x9f));
	assert_false(bw_is_control(0xa0));
}

static void test_json_quote_matches_python(void **state)
{
	(void)state;
	struct bw_buf b = BW_BUF_INIT;
	/* python3: json.dumps('a"\\\n\x7f\u00e9\U0001f600 ') */
	const char *in = "a\"\\\n\x7f\xc3\xa9\xf0\x9f\x98\x80 ";
	bw_text_json_quote(&b, in, strlen(in));
	assert_string_equal(b.data, "\"a\\\"\\\\\\n\\u007f\\u00e9\\ud83d\\ude00 \"");
	bw_buf_free(&b);
}

static void test_fnv1a64(void **state)
{
	(void)state;
	/* Reference values of the FNV-1a 64-bit test suite. */
	assert_true(bw_fnv1a64("", 0) == 0xcbf29ce484222325ULL);
	assert_true(bw_fnv1a64("a", 1) == 0xaf63dc4c8601ec8cULL);
	assert_true(bw_fnv1a64("foobar", 6) == 0x85944171f73967e8ULL);
	/* continued piece by piece: the same as over the whole */
	assert_true(bw_fnv1a64_more(bw_fnv1a64_more(BW_FNV1A64_INIT, "foo", 3), "bar", 3) ==
		    0x85944171f73967e8ULL);
}

static void test_buf(void **state)
{
	(void)state;
	struct bw_buf b = BW_BUF_INIT;
	char *out = NULL;
	assert_int_equal(bw_buf_steal(&b, &out), 0);
	assert_string_equal(out, "");
	free(out);
	for (int i = 0; i < 1000; i++)
		bw_buf_printf(&b, "%d,", i);
	assert_int_equal(bw_buf_steal(&b, &out), 0);
	assert_int_equal(strncmp(out, "0,1,2,", 6), 0);
	assert_int_equal(strlen(out), 3890);
	assert_null(b.data);
	free(out);
}

static void test_escape(void **state)
{
	(void)state;
	char out[64];
	/* a forged log line stays on one line; C1 controls, backslashes and bad bytes escaped */
	const char forged[] = "x\n2026-12-01T00:00:00.000Z bw-worker: job=a completed";
	bw_text_escape(out, sizeof(out), forged, strlen(forged));
	assert_null(strchr(out, '\n'));
	assert_memory_equal(out, "x\\x0a2026", 9);
	assert_int_equal(bw_text_escape(out, sizeof(out), "a\xc2\x85" "b\\c\xff\x01", 8), 23);
	assert_string_equal(out, "a\\xc2\\x85b\\x5cc\\xff\\x01");
	assert_int_equal(bw_text_escape(out, sizeof(out), "caf\xc3\xa9", 5), 5); /* UTF-8 kept */
	assert_int_equal(bw_text_escape(out, sizeof(out), "", 0), 0);
	/* bounded: never more than size - 1 bytes, never a cut character or escape */
	char big[2000];
	memset(big, 'a', sizeof(big));
	assert_int_equal(bw_text_escape(out, sizeof(out), big, sizeof(big)), 63);
	assert_string_equal(out + 60, "...");
	assert_int_equal(bw_text_escape(out, sizeof(out), big, 63), 63); /* fits exactly */
	assert_null(strstr(out, "..."));
	for (size_t i = 0; i < sizeof(big); i += 2)
		memcpy(big + i, "\xc3\xa9", 2);
	size_t n = bw_text_escape(out, sizeof(out), big, sizeof(big));
	assert_true(n <= 63);
	assert_int_equal(bw_utf8_length(out, n), (n - 3) / 2 + 3);
	memset(big, '\n', sizeof(big));
	n = bw_text_escape(out, sizeof(out), big, sizeof(big));
	assert_int_equal((n - 3) % 4, 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_safe_id),
		cmocka_unit_test(test_escape),
		cmocka_unit_test(test_utf8_decode),
		cmocka_unit_test(test_length_and_control),
		cmocka_unit_test(test_json_quote_matches_python),
		cmocka_unit_test(test_fnv1a64),
		cmocka_unit_test(test_buf),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
