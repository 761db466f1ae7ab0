/* test_target.c: VM directories, confinement to the repository, qcow2 and overlay creation with real qemu-img. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "target.h"
#include "../testutil.h"

static char repo[64];

static int setup(void **state)
{
	(void)state;
	return bw_test_mkdir(repo, sizeof(repo), "target") ? 0 : -1;
}

static int teardown(void **state)
{
	(void)state;
	return bw_test_rmdir(repo);
}

static void test_vm_dir_is_safe_and_distinct(void **state)
{
	(void)state;
	/* Hostile and near-identical names: each gives one safe component, all distinct. */
	static const char *names[] = {
		"db, \"prod\" / shard 1",
		"db, \"prod\" , shard 1",
		"DB, \"prod\" / shard 1",
		"..",
		".",
		"../../etc",
		"a/b",
		"a,b",
		"a\nb",
		"a\x01" "b",
		"\xf0\x9f\x98\x80 emoji",
		"\xf0\x9f\x98\x81 emoji",
		"x",
		"X",
		"' OR 1=1 --",
		"name-x",
		"id-x",
		"vm-1234",
	};
	size_t n = sizeof(names) / sizeof(names[0]);
	char dirs[64][BW_VM_DIR_MAX];
	for (size_t i = 0; i < n; i++) {
		bw_target_vm_dir(NULL, names[i], dirs[i]);
		const char *d = dirs[i];
		assert_true(strlen(d) > 5 && strlen(d) < BW_VM_DIR_MAX);
		assert_true(strncmp(d, "name-", 5) == 0);
		for (const char *p = d; *p; p++)
			assert_non_null(strchr("abcdefghijklmnopqrstuvwxyz0123456789._-", *p));
		for (size_t j = 0; j < i; j++)
			assert_string_not_equal(dirs[i], dirs[j]);
	}
	/* an id and a name with the same text never meet */
	bw_target_vm_dir("vm-1234", "whatever", dirs[n]);
	assert_true(strncmp(dirs[n], "id-vm-1234-", 11) == 0);
	assert_string_not_equal(dirs[n], dirs[n - 1]);
	/* the id wins over the name: renaming a VM keeps its directory */
	bw_target_vm_dir("vm-1234", "renamed", dirs[n + 1]);
	assert_string_equal(dirs[n], dirs[n + 1]);
	/* deterministic, and a 255-code-point name stays bounded */
	char big[1024] = "";
	for (int i = 0; i < 255; i++)
		strcat(big, "\xc3\xa9");
	bw_target_vm_dir(NULL, big, dirs[n + 2]);
	bw_target_vm_dir(NULL, big, dirs[n + 3]);
	assert_string_equal(dirs[n + 2], dirs[n + 3]);
	assert_true(strlen(dirs[n + 2]) < BW_VM_DIR_MAX);
}

static struct bw_target target(const char *job, int64_t key, int64_t size, const char *parent)
{
	static char vm_dir[BW_VM_DIR_MAX];
	bw_target_vm_dir("vm-1", NULL, vm_dir);
	return (struct bw_target){repo, vm_dir, key, job, size, parent, 0640};
}

static int64_t info_int(const char *path, const char *field)
{
	char cmd[PATH_MAX + 128], out[64] = "";
	snprintf(cmd, sizeof(cmd),
		 "qemu-img info -U --output=json '%s' | /usr/bin/python3 -c "
		 "'import json,sys; print(json.load(sys.stdin)[\"%s\"])'",
		 path, field);
	FILE *p = popen(cmd, "r");
	assert_non_null(p);
	assert_non_null(fgets(out, sizeof(out), p));
	pclose(p);
	return strtoll(out, NULL, 10);
}

static void test_create_exact_size_mode_no_clobber(void **state)
{
	(void)state;
	char err[512], path[PATH_MAX];
	struct bw_target t = target("bk-1", 2000, 5368709120LL + 512, NULL);
	assert_int_equal(bw_target_create(&t, err, sizeof(err)), 0);
	assert_int_equal(bw_target_path(&t, path, sizeof(path)), 0);
	struct stat st;
	assert_int_equal(stat(path, &st), 0);
	assert_int_equal(st.st_mode & 0777, 0640);
	assert_true(info_int(path, "virtual-size") == 5368709120LL + 512); /* no rounding */
	/* an existing image is never overwritten */
	assert_int_equal(bw_target_create(&t, err, sizeof(err)), BW_EEXIST);
	assert_int_equal(unlink(path), 0);
}

static void test_symlink_out_of_repository_refused(void **state)
{
	(void)state;
	char err[512], link[PATH_MAX], outside[PATH_MAX];
	struct bw_target t = target("bk-2", 2001, 1048576, NULL);
	snprintf(outside, sizeof(outside), "%s-outside", repo);
	assert_int_equal(mkdir(outside, 0700), 0);
	snprintf(link, sizeof(link), "%s/%s", repo, t.vm_dir);
	assert_int_equal(symlink(outside, link), 0);
	assert_int_equal(bw_target_create(&t, err, sizeof(err)), BW_EPERM);
	assert_non_null(strstr(err, "symlink"));
	/* nothing was written outside */
	char probe[PATH_MAX + 16];
	snprintf(probe, sizeof(probe), "%s/2001", outside);
	assert_int_equal(access(probe, F_OK), -1);
	unlink(link);
	rmdir(outside);
}

static void test_unusable_size_leaves_nothing(void **state)
{
	(void)state;
	char err[512], path[PATH_MAX];
	int64_t sizes[] = {-1, 0, (int64_t)1 << 62};
	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		struct bw_target t = target("bk-3", 2002, sizes[i], NULL);
		assert_int_equal(bw_target_create(&t, err, sizeof(err)), BW_EINVAL);
		assert_non_null(strstr(err, "qcow2"));
		assert_int_equal(bw_target_path(&t, path, sizeof(path)), 0);
		assert_int_equal(access(path, F_OK), -1);
	}
}

/* Our qcow2 is one QEMU takes as its own: qemu-img check finds no error and no leak,
 * before and after writes through it, at sizes around every layout boundary. */
static void test_qemu_accepts_the_images(void **state)
{
	(void)state;
	char err[512], path[PATH_MAX];
	int64_t mib = 1048576, sizes[] = {1024, mib, 512 * mib, 512 * mib + 512,
					  4096LL * 1024 * mib + 512, 65536LL * 1024 * mib};
	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		char job[32];
		snprintf(job, sizeof(job), "bk-q%zu", i);
		struct bw_target t = target(job, 2003, sizes[i], NULL);
		assert_int_equal(bw_target_create(&t, err, sizeof(err)), 0);
		assert_int_equal(bw_target_path(&t, path, sizeof(path)), 0);
		assert_true(info_int(path, "virtual-size") == sizes[i]);
		assert_int_equal(bw_test_sh("qemu-img check -q '%s'", path), 0);
		/* the first and the last 512 bytes written, read back, the image still clean */
		int64_t last = sizes[i] - 512;
		assert_int_equal(bw_test_sh("qemu-io -f qcow2 -c 'write -P 0xab 0 512' -c 'write -P "
					    "0xcd %" PRId64 " 512' -c 'read -P 0xab 0 512' -c 'read -P "
					    "0xcd %" PRId64 " 512' '%s' >/dev/null && "
					    "qemu-img check -q '%s'",
					    last, last, path, path),
				 0);
		assert_int_equal(unlink(path), 0);
	}
}

static void test_overlay_and_parent_checks(void **state)
{
	(void)state;
	char err[512], path[PATH_MAX], rel[PATH_MAX];
	struct bw_target base = target("bk-full", 2000, 1048576, NULL);
	assert_int_equal(bw_target_create(&base, err, sizeof(err)), 0);
	snprintf(rel, sizeof(rel), "%s/2000/bk-full.qcow2", base.vm_dir);
	assert_int_equal(bw_target_check_parent("qemu-img", repo, rel, err, sizeof(err)), 0);

	/* the disk grew: the overlay gets the new size */
	struct bw_target inc = target("bk-inc", 2000, 2 * 1048576, rel);
	assert_int_equal(bw_target_create(&inc, err, sizeof(err)), 0);
	assert_int_equal(bw_target_path(&inc, path, sizeof(path)), 0);
	assert_true(info_int(path, "virtual-size") == 2 * 1048576);
	char cmd[PATH_MAX * 3];
	snprintf(cmd, sizeof(cmd),
		 "qemu-img info -U --output=json '%s' | grep -q '\"backing-filename\": "
		 "\"../../%s\"'",
		 path, rel);
	assert_int_equal(system(cmd), 0);

	/* parents that are missing, outside, not qcow2, or in use */
	assert_int_equal(bw_target_check_parent("qemu-img", repo, "nope.qcow2", err, sizeof(err)),
			 BW_ENOENT);
	char raw[PATH_MAX];
	snprintf(raw, sizeof(raw), "%s/raw.img", repo);
	FILE *f = fopen(raw, "w");
	fputs("not an image at all", f);
	fclose(f);
	assert_int_equal(bw_target_check_parent("qemu-img", repo, "raw.img", err, sizeof(err)),
			 BW_EINVAL);
	char outside[PATH_MAX], link[PATH_MAX];
	snprintf(outside, sizeof(outside), "%s-o.qcow2", repo);
	snprintf(cmd, sizeof(cmd), "qemu-img create -q -f qcow2 '%s' 1M", outside);
	assert_int_equal(system(cmd), 0);
	snprintf(link, sizeof(link), "%s/escape.qcow2", repo);
	assert_int_equal(symlink(outside, link), 0);
	assert_int_equal(bw_target_check_parent("qemu-img", repo, "escape.qcow2", err, sizeof(err)),
			 BW_EPERM);
	unlink(outside);

	char base_path[PATH_MAX];
	assert_int_equal(bw_target_path(&base, base_path, sizeof(base_path)), 0);
	snprintf(cmd, sizeof(cmd),
		 "qemu-nbd --fork --persistent -p 22199 -b 127.0.0.1 -f qcow2 --pid-file=%s/pid '%s'",
		 repo, base_path);
	assert_int_equal(system(cmd), 0);
	int rc = bw_target_check_parent("qemu-img", repo, rel, err, sizeof(err));
	snprintf(cmd, sizeof(cmd), "kill $(cat %s/pid)", repo);
	assert_int_equal(system(cmd), 0);
	assert_int_equal(rc, BW_EBUSY);
	assert_non_null(strstr(err, "lock"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_vm_dir_is_safe_and_distinct),
		cmocka_unit_test_setup_teardown(test_create_exact_size_mode_no_clobber, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_symlink_out_of_repository_refused, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_unusable_size_leaves_nothing, setup, teardown),
		cmocka_unit_test_setup_teardown(test_qemu_accepts_the_images, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_overlay_and_parent_checks, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
