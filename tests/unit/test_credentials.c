/* test_credentials.c: credential and secret files: mode, owner, symlinks, FIFOs, content; the secret never in errors. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "credentials.h"
#include "../testutil.h"

static void put(const char *name, const char *text, mode_t mode)
{
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "%s/%s.json", bw_test_dir, name);
	assert_int_equal(bw_test_write_file(path, text, mode), 0);
}

static int load(const char *name, char *err, size_t size)
{
	struct bw_credential *c = NULL;
	int rc = bw_credential_load(bw_test_dir, name, &c, err, size);
	if (rc == 0) {
		assert_string_equal(c->vcenter_host, "vcenter.example");
		assert_string_equal(c->username, "backup@vsphere.local");
		assert_string_equal(c->password, "s3cr3t");
	}
	bw_credential_free(c);
	return rc;
}

static void test_credentials(void **state)
{
	(void)state;
	char err[512];
	const char *good = "{\"vcenter_host\":\"vcenter.example\",\"username\":"
			   "\"backup@vsphere.local\",\"password\":\"s3cr3t\"}";
	put("ok", good, 0600);
	assert_int_equal(load("ok", err, sizeof(err)), 0);
	put("ro", good, 0400);
	assert_int_equal(load("ro", err, sizeof(err)), 0);

	put("group", good, 0640);
	assert_int_equal(load("group", err, sizeof(err)), BW_EPERM);
	assert_non_null(strstr(err, "0640"));
	assert_null(strstr(err, "s3cr3t"));
	put("world", good, 0604);
	assert_int_equal(load("world", err, sizeof(err)), BW_EPERM);

	char target[PATH_MAX], link[PATH_MAX];
	snprintf(target, sizeof(target), "%s/ok.json", bw_test_dir);
	snprintf(link, sizeof(link), "%s/link.json", bw_test_dir);
	assert_int_equal(symlink(target, link), 0);
	assert_int_equal(load("link", err, sizeof(err)), BW_EPERM);

	assert_int_equal(load("missing", err, sizeof(err)), BW_ENOENT);
	put("broken", "{\"vcenter_host\":\"v\",", 0600);
	assert_int_equal(load("broken", err, sizeof(err)), BW_EINVAL);
	put("empty", "{\"vcenter_host\":\"v\",\"username\":\"u\",\"password\":\"\"}", 0600);
	assert_int_equal(load("empty", err, sizeof(err)), BW_EINVAL);
	put("nul", "{\"vcenter_host\":\"v\",\"username\":\"u\",\"password\":\"a\\u0000b\"}", 0600);
	assert_int_equal(load("nul", err, sizeof(err)), BW_EINVAL);
	assert_null(strstr(err, "a\\u0000b"));
}

static void test_fifo_and_directory_refused_at_once(void **state)
{
	(void)state;
	char err[512], path[PATH_MAX];
	/* A FIFO under the credential's name: without O_NONBLOCK the open would wait forever
	 * for a writer. The alarm turns such a hang into a failure. */
	snprintf(path, sizeof(path), "%s/fifo.json", bw_test_dir);
	assert_int_equal(mkfifo(path, 0600), 0);
	alarm(5);
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	assert_int_equal(load("fifo", err, sizeof(err)), BW_EPERM);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	alarm(0);
	assert_true(t1.tv_sec - t0.tv_sec < 2);
	assert_non_null(strstr(err, "not a regular file"));

	snprintf(path, sizeof(path), "%s/adir.json", bw_test_dir);
	assert_int_equal(mkdir(path, 0700), 0);
	assert_int_equal(load("adir", err, sizeof(err)), BW_EPERM);
	assert_non_null(strstr(err, "not a regular file"));
}

static void test_read_file(void **state)
{
	(void)state;
	char err[512], path[PATH_MAX];
	char *text = NULL;
	size_t len = 0;
	put("secret", "pa:ss@w0rd\n", 0400);
	snprintf(path, sizeof(path), "%s/secret.json", bw_test_dir);
	assert_int_equal(bw_credential_read_file(path, 64, &text, &len, err, sizeof(err)), 0);
	assert_int_equal(len, 11);
	assert_string_equal(text, "pa:ss@w0rd\n");
	bw_credential_wipe(text, len);

	text = NULL;
	assert_int_equal(bw_credential_read_file(path, 10, &text, &len, err, sizeof(err)),
			 BW_EINVAL);
	assert_null(text);
	assert_non_null(strstr(err, "too large"));
	assert_null(strstr(err, "pa:ss"));

	assert_int_equal(chmod(path, 0440), 0);
	assert_int_equal(bw_credential_read_file(path, 64, &text, &len, err, sizeof(err)),
			 BW_EPERM);
	assert_non_null(strstr(err, "mode 0440"));
	assert_null(strstr(err, "pa:ss"));

	char link[PATH_MAX];
	snprintf(link, sizeof(link), "%s/secret-link", bw_test_dir);
	assert_int_equal(chmod(path, 0600), 0);
	assert_int_equal(symlink(path, link), 0);
	assert_int_equal(bw_credential_read_file(link, 64, &text, &len, err, sizeof(err)),
			 BW_EPERM);
	assert_non_null(strstr(err, "symbolic link"));

	snprintf(path, sizeof(path), "%s/nope", bw_test_dir);
	assert_int_equal(bw_credential_read_file(path, 64, &text, &len, err, sizeof(err)),
			 BW_ENOENT);
	bw_credential_wipe(NULL, 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test_setup_teardown(test_credentials, bw_test_scratch_setup,
					    bw_test_scratch_teardown),
	    cmocka_unit_test_setup_teardown(test_fifo_and_directory_refused_at_once,
					    bw_test_scratch_setup, bw_test_scratch_teardown),
	    cmocka_unit_test_setup_teardown(test_read_file, bw_test_scratch_setup,
					    bw_test_scratch_teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
