/* test_clock.c: the one clock, the RFC 3339 formatter, random bytes and the jittered backoff. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <string.h>

#include "clock.h"
#include "rand.h"

static void test_rfc3339(void **state)
{
	(void)state;
	char out[BW_RFC3339_SIZE];
	assert_string_equal(bw_clock_rfc3339(0, out), "1970-01-01T00:00:00.000Z");
	assert_string_equal(bw_clock_rfc3339(1795990610123LL, out), "2026-11-29T22:16:50.123Z");
	assert_string_equal(bw_clock_rfc3339(-1, out), "");
	assert_int_equal(strlen(bw_clock_rfc3339_now(out)), 24);
	assert_int_equal(out[23], 'Z');
}

static void test_clocks_move(void **state)
{
	(void)state;
	int64_t m = bw_clock_mono_ms(), w = bw_clock_wall_ms();
	assert_true(m >= 0);
	assert_true(w > 1700000000000LL); /* after 2023 */
	assert_true(bw_clock_mono_ms() >= m);
}

static void test_rand_bytes(void **state)
{
	(void)state;
	unsigned char a[32] = {0}, b[32] = {0};
	assert_int_equal(bw_rand_bytes(a, sizeof(a)), 0);
	assert_int_equal(bw_rand_bytes(b, sizeof(b)), 0);
	assert_memory_not_equal(a, b, sizeof(a)); /* 2^-256 to fail by chance */
	for (int i = 0; i < 1000; i++)
		assert_true(bw_rand_below_incl(6) <= 6);
	assert_int_equal(bw_rand_below_incl(0), 0);
}

static void test_backoff_bounds(void **state)
{
	(void)state;
	/* attempt n waits in [0, min(cap, base * 2^(n-1))] and reaches the top of the range */
	int64_t top[6] = {0};
	for (int i = 0; i < 4000; i++) {
		for (int n = 1; n <= 5; n++) {
			int64_t t = bw_backoff_ms(100, 1000, n);
			int64_t ceiling = 100LL << (n - 1) < 1000 ? 100LL << (n - 1) : 1000;
			assert_true(t >= 0 && t <= ceiling);
			if (t > top[n])
				top[n] = t;
		}
	}
	assert_true(top[1] > 80 && top[5] > 800);
	assert_int_equal(bw_backoff_ms(0, 1000, 3), 0);
	assert_true(bw_backoff_ms(1000, 60000, 1000) <= 60000); /* no overflow */
	assert_true(bw_backoff_ms(INT64_MAX / 2, INT64_MAX, 60) >= 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_rfc3339),
		cmocka_unit_test(test_clocks_move),
		cmocka_unit_test(test_rand_bytes),
		cmocka_unit_test(test_backoff_bounds),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
