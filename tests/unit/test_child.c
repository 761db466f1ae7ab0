/* test_child.c: children get a short explicit environment, never the worker's, and programs from the trusted path only. */
#define _GNU_SOURCE /* unshare */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "child.h"
#include "proc.h"
#include "../testutil.h"

#define SECRET "t0ken-that-must-not-leak-4242"

/* Runs argv with env_add, its output into <bw_test_dir>/out; returns the output (malloc'd). */
static char *run(const char *const *argv, const char *const *env_add)
{
	char log[PATH_MAX], err[256];
	snprintf(log, sizeof(log), "%s/out", bw_test_dir);
	unlink(log);
	struct bw_spawn s = {argv, env_add, log, false};
	int status = 0;
	int rc = bw_run(&s, 10000, &status, err, sizeof(err));
	if (rc != 0)
		fprintf(stderr, "bw_run: %s: %s\n", bw_err_name(rc), err);
	assert_int_equal(rc, 0);
	FILE *f = fopen(log, "r");
	assert_non_null(f);
	char *text = calloc(1, 65536);
	assert_non_null(text);
	size_t n = fread(text, 1, 65535, f);
	fclose(f);
	text[n] = '\0';
	return text;
}

static void test_child_environment_is_short_and_explicit(void **state)
{
	(void)state;
	setenv("BW_SNA_TOKEN", SECRET, 1);
	setenv("BW_AMQP_URL", "amqp://bw:" SECRET "@mq.example", 1);
	setenv("LD_PRELOAD", "/nonexistent/evil.so", 1);
	const char *argv[] = {"env", NULL}; /* a bare name: resolved in the trusted path */
	const char *add[] = {"GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432", NULL};
	char *out = run(argv, add);
	unsetenv("BW_SNA_TOKEN");
	unsetenv("BW_AMQP_URL");
	unsetenv("LD_PRELOAD");
	assert_string_equal(out, "PATH=/usr/sbin:/usr/bin:/sbin:/bin\n"
				 "LC_ALL=C\n"
				 "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432\n");
	assert_null(strstr(out, SECRET));
	free(out);

	/* The child reads its own environment from the kernel, not through a libc. */
	setenv("BW_SNA_TOKEN", SECRET, 1);
	const char *sh[] = {"/bin/sh", "-c", "tr '\\0' '\\n' </proc/self/environ", NULL};
	out = run(sh, NULL);
	unsetenv("BW_SNA_TOKEN");
	assert_null(strstr(out, SECRET));
	assert_null(strstr(out, "BW_"));
	assert_non_null(strstr(out, "LC_ALL=C\n"));
	free(out);
}

static void test_added_variable_replaces_the_base_one(void **state)
{
	(void)state;
	const char *argv[] = {"env", NULL};
	const char *add[] = {"LC_ALL=C.UTF-8", NULL};
	char *out = run(argv, add);
	assert_string_equal(out, "PATH=/usr/sbin:/usr/bin:/sbin:/bin\nLC_ALL=C.UTF-8\n");
	free(out);
}

static void test_programs_from_the_trusted_path_only(void **state)
{
	(void)state;
	char path[PATH_MAX];
	assert_int_equal(bw_child_find_program("env", path, sizeof(path)), 0);
	assert_true(path[0] == '/');
	assert_non_null(strstr(path, "/env"));
	assert_int_equal(access(path, X_OK), 0);
	assert_int_equal(bw_child_find_program("bin/env", path, sizeof(path)), BW_EINVAL);
	assert_int_equal(bw_child_find_program("", path, sizeof(path)), BW_EINVAL);
	assert_int_equal(bw_child_find_program("env", path, 4), BW_EINVAL);

	/* A program only $PATH knows is not found, not even when $PATH names it first. */
	char prog[PATH_MAX];
	snprintf(prog, sizeof(prog), "%s/bw-test-only-in-path", bw_test_dir);
	assert_int_equal(bw_test_write_file(prog, "#!/bin/sh\nexit 0\n", 0755), 0);
	char *old = getenv("PATH") ? strdup(getenv("PATH")) : NULL;
	setenv("PATH", bw_test_dir, 1);
	assert_int_equal(bw_child_find_program("bw-test-only-in-path", path, sizeof(path)),
			 BW_ENOENT);
	const char *argv[] = {"bw-test-only-in-path", NULL};
	struct bw_spawn s = {argv, NULL, NULL, false};
	pid_t pid;
	char err[256];
	assert_int_equal(bw_spawn(&s, &pid, NULL, err, sizeof(err)), BW_ENOENT);
	assert_non_null(strstr(err, "not found in /usr/local/sbin:"));
	if (old)
		setenv("PATH", old, 1);
	free(old);

	/* An absolute path is used as is. */
	const char *abs[] = {prog, NULL};
	struct bw_spawn a = {abs, NULL, NULL, false};
	int status;
	assert_int_equal(bw_run(&a, 10000, &status, err, sizeof(err)), 0);
	assert_int_equal(chmod(prog, 0644), 0);
	assert_int_equal(bw_run(&a, 10000, &status, err, sizeof(err)), BW_EPERM);
}

/*
 * Under systemd's ProtectProc=invisible (/proc mounted with hidepid=invisible) an undumpable
 * process is hidden from its own user; a child is undumpable like the worker until its exec.
 * Its start time must still be recorded (a restarted worker adopts a server by pid and start
 * time): in a helper with a mount namespace of its own, such a /proc, an unprivileged user
 * and an undumpable process, a spawned child's start time is the one /proc shows after its
 * exec, never 0. Needs root (skipped otherwise).
 */
static void test_start_time_under_hidepid(void **state)
{
	(void)state;
	if (geteuid() != 0)
		skip();
	pid_t helper = fork();
	assert_true(helper >= 0);
	if (helper == 0) {
		if (unshare(CLONE_NEWNS) != 0 || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0 ||
		    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
			  "hidepid=invisible") != 0)
			_exit(77); /* no namespaces here (a container): nothing to test */
		if (setgid(65534) != 0 || setuid(65534) != 0 || prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
			_exit(2);
		const char *argv[] = {"sleep", "30", NULL};
		struct bw_spawn sp = {argv, NULL, NULL, true};
		pid_t pid = 0;
		uint64_t start = 0, seen = 0;
		char err[256];
		if (bw_spawn(&sp, &pid, &start, err, sizeof(err)) != 0)
			_exit(3);
		int rc = bw_proc_start_time(pid, &seen) != 0 ? 4 : start == 0 ? 5 : start != seen ? 6 : 0;
		kill(pid, SIGKILL);
		waitpid(pid, NULL, 0);
		_exit(rc);
	}
	int status = 0;
	assert_int_equal(waitpid(helper, &status, 0), helper);
	assert_true(WIFEXITED(status));
	if (WEXITSTATUS(status) == 77)
		skip();
	assert_int_equal(WEXITSTATUS(status), 0); /* 5: the start time was recorded as 0 */
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_child_environment_is_short_and_explicit),
		cmocka_unit_test(test_added_variable_replaces_the_base_one),
		cmocka_unit_test(test_programs_from_the_trusted_path_only),
		cmocka_unit_test(test_start_time_under_hidepid),
	};
	return cmocka_run_group_tests(tests, bw_test_scratch_setup, bw_test_scratch_teardown);
}
