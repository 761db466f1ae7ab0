/* test_gate.c: the writers' gate across processes: bounded waits and a dead holder's gate taken over. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "clock.h"
#include "gate.h"

static char dir[64], path[PATH_MAX];

static int setup(void **state)
{
	(void)state;
	snprintf(dir, sizeof(dir), "/tmp/bw-test-gate-XXXXXX");
	if (mkdtemp(dir) == NULL)
		return -1;
	snprintf(path, sizeof(path), "%s/ledger.db-gate", dir);
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	unlink(path);
	return rmdir(dir);
}

/* A child that takes the gate, says so on a pipe, then waits for a byte (or dies). */
static pid_t holder(int *to_child)
{
	int ready[2], go[2];
	char b;
	assert_int_equal(pipe(ready), 0);
	assert_int_equal(pipe(go), 0);
	pid_t pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		struct bw_gate *g = NULL;
		char err[128];
		if (bw_gate_open(&g, path) != 0 || bw_gate_lock(g, 1000, err, sizeof(err)) != 0)
			_exit(1);
		if (write(ready[1], "x", 1) != 1 || read(go[0], &b, 1) != 1)
			_exit(2); /* the parent went away: die holding the gate */
		bw_gate_unlock(g);
		bw_gate_close(g);
		_exit(0);
	}
	close(ready[1]);
	close(go[0]);
	assert_int_equal(read(ready[0], &b, 1), 1);
	close(ready[0]);
	*to_child = go[1];
	return pid;
}

static void test_private_file_and_bounded_wait(void **state)
{
	(void)state;
	struct bw_gate *g = NULL;
	char err[128] = "";
	int go, st;
	assert_int_equal(bw_gate_open(&g, path), 0);
	struct stat sb;
	assert_int_equal(stat(path, &sb), 0);
	assert_int_equal(sb.st_mode & 0777, 0600);

	pid_t pid = holder(&go);
	int64_t t0 = bw_clock_mono_ms();
	assert_int_equal(bw_gate_lock(g, 200, err, sizeof(err)), BW_EBUSY);
	int64_t took = bw_clock_mono_ms() - t0;
	assert_true(took >= 150 && took < 2000);
	assert_non_null(strstr(err, "writers' gate"));

	/* let go by its holder: ours at once */
	assert_int_equal(write(go, "x", 1), 1);
	close(go);
	assert_int_equal(waitpid(pid, &st, 0), pid);
	assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	assert_int_equal(bw_gate_lock(g, 200, err, sizeof(err)), 0);
	bw_gate_unlock(g);
	bw_gate_close(g);
}

static void test_dead_holder_is_taken_over(void **state)
{
	(void)state;
	struct bw_gate *g = NULL;
	char err[128] = "";
	int go, st;
	assert_int_equal(bw_gate_open(&g, path), 0);
	pid_t pid = holder(&go);
	assert_int_equal(kill(pid, SIGKILL), 0);
	assert_int_equal(waitpid(pid, &st, 0), pid);
	close(go);
	/* EOWNERDEAD: taken over and made consistent, and usable again afterwards */
	assert_int_equal(bw_gate_lock(g, 1000, err, sizeof(err)), 0);
	bw_gate_unlock(g);
	assert_int_equal(bw_gate_lock(g, 1000, err, sizeof(err)), 0);
	bw_gate_unlock(g);
	bw_gate_close(g);
	bw_gate_close(NULL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_private_file_and_bounded_wait, setup, teardown),
		cmocka_unit_test_setup_teardown(test_dead_holder_is_taken_over, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
