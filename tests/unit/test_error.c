/* test_error.c: the error table: names, texts, classes, errno translation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <errno.h>
#include <string.h>

#include "error.h"

static void test_names_and_texts(void **state)
{
	(void)state;
	assert_string_equal(bw_err_name(BW_OK), "BW_OK");
	assert_string_equal(bw_err_name(BW_ENOPORTS), "BW_ENOPORTS");
	assert_string_equal(bw_strerror(BW_ENOPORTS), "no free ports");
	assert_string_equal(bw_strerror(-9999), "unknown error");
	assert_string_equal(bw_err_name(-9999), "BW_E?");
	/* retired values stay unknown (never reused) */
	assert_string_equal(bw_err_name(-10), "BW_E?");
	assert_string_equal(bw_err_name(-22), "BW_E?");
}

static void test_codes_are_negative_and_distinct(void **state)
{
	(void)state;
	int codes[] = {
#define CODE(name, value, transient, text) BW_##name,
		BW_ERRNO_MAP(CODE)
#undef CODE
	};
	size_t n = sizeof(codes) / sizeof(codes[0]);
	for (size_t i = 0; i < n; i++) {
		assert_true(codes[i] < 0);
		assert_string_not_equal(bw_err_name(codes[i]), "BW_E?");
		for (size_t j = i + 1; j < n; j++)
			assert_int_not_equal(codes[i], codes[j]);
	}
}

static void test_transient_classes(void **state)
{
	(void)state;
	assert_true(bw_err_transient(BW_ENOPORTS));
	assert_true(bw_err_transient(BW_ETIMEDOUT));
	assert_true(bw_err_transient(BW_EBUSY));
	assert_false(bw_err_transient(BW_EMESSAGE));
	assert_false(bw_err_transient(BW_ECONFIG));
	assert_false(bw_err_transient(BW_OK));
	assert_false(bw_err_transient(-9999));
}

static void test_from_errno(void **state)
{
	(void)state;
	assert_int_equal(bw_err_from_errno(ENOENT), BW_ENOENT);
	assert_int_equal(bw_err_from_errno(EACCES), BW_EPERM);
	assert_int_equal(bw_err_from_errno(EADDRINUSE), BW_EADDRINUSE);
	assert_int_equal(bw_err_from_errno(ENOMEM), BW_ENOMEM);
	assert_int_equal(bw_err_from_errno(EXDEV), BW_ESYS);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_names_and_texts),
		cmocka_unit_test(test_codes_are_negative_and_distinct),
		cmocka_unit_test(test_transient_classes),
		cmocka_unit_test(test_from_errno),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
