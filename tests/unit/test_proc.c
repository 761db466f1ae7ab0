/* test_proc.c: process identity: start times, boot id, pid reuse detection. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "proc.h"

static void test_self(void **state)
{
	(void)state;
	uint64_t st = 0;
	assert_int_equal(bw_proc_start_time(getpid(), &st), 0);
	assert_true(st > 0);
	assert_true(bw_proc_same(getpid(), st));
	assert_false(bw_proc_same(getpid(), st + 1)); /* pid reuse: another start time */
	assert_false(bw_proc_same(0, st));
	char boot[BW_BOOT_ID_LEN + 1];
	assert_int_equal(bw_proc_boot_id(boot), 0);
	assert_int_equal(strlen(boot), 36);
	assert_int_equal(boot[8], '-');
}

static void test_dead_and_zombie(void **state)
{
	(void)state;
	pid_t pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		pause();
		_exit(0);
	}
	uint64_t st = 0;
	assert_int_equal(bw_proc_start_time(pid, &st), 0);
	assert_true(bw_proc_same(pid, st));
	kill(pid, SIGKILL);
	/* a zombie is not alive */
	for (int i = 0; i < 100 && bw_proc_same(pid, st); i++)
		usleep(10000);
	assert_false(bw_proc_same(pid, st));
	int status;
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_int_equal(bw_proc_start_time(pid, &st), BW_ENOENT);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_self),
		cmocka_unit_test(test_dead_and_zombie),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
