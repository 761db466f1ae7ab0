/* test_target.c: VM directories, confinement to the repository, qcow2 and overlay creation with real qemu-img. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <fcntl.h>
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
	/* what the chain tests put next to the repository, also when one failed midway */
	bw_test_sh("rm -f '%s-o.qcow2' '%s-alias'", repo, repo);
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

/* Compensation removes an image through its directories, never through a symlink that
 * replaced one of them since. */
static void test_remove_never_follows_a_symlink(void **state)
{
	(void)state;
	char err[512], path[PATH_MAX], vmdir[PATH_MAX], moved[PATH_MAX], outside[PATH_MAX];
	struct bw_target t = target("bk-3", 2002, 1048576, NULL);
	assert_int_equal(bw_target_create(&t, err, sizeof(err)), 0);
	assert_int_equal(bw_target_path(&t, path, sizeof(path)), 0);
	assert_int_equal(bw_target_remove(&t, err, sizeof(err)), 0);
	assert_int_equal(access(path, F_OK), -1);
	assert_int_equal(bw_target_remove(&t, err, sizeof(err)), 0); /* nothing left: done */

	/* the VM's directory swapped for a symlink to a look-alike outside: refused, the
	 * outside file stays */
	assert_int_equal(bw_target_create(&t, err, sizeof(err)), 0);
	snprintf(vmdir, sizeof(vmdir), "%s/%s", repo, t.vm_dir);
	snprintf(moved, sizeof(moved), "%s-moved", repo);
	snprintf(outside, sizeof(outside), "%s-moved/2002/bk-3.qcow2", repo);
	assert_int_equal(rename(vmdir, moved), 0);
	assert_int_equal(symlink(moved, vmdir), 0);
	assert_int_equal(bw_target_remove(&t, err, sizeof(err)), BW_EPERM);
	assert_int_equal(access(outside, F_OK), 0);
	assert_int_equal(bw_test_sh("rm -rf '%s' '%s'", vmdir, moved), 0);
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

/* ---- parents and their backing chains ---------------------------------------------------- */

static int sh_in_repo(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh_in_repo(const char *fmt, ...)
{
	char cmd[4096];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	return bw_test_sh("cd '%s' && %s", repo, cmd);
}

/* Overwrites n bytes at off of the repository's file rel. */
static void patch(const char *rel, off_t off, const void *bytes, size_t n)
{
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "%s/%s", repo, rel);
	int fd = open(path, O_WRONLY);
	assert_true(fd >= 0);
	assert_int_equal(pwrite(fd, bytes, n, off), (ssize_t)n);
	close(fd);
}

/* The offset of needle in the first 64 KiB of the repository's file rel (-1: absent). */
static off_t find_bytes(const char *rel, const void *needle, size_t n)
{
	char path[PATH_MAX];
	static unsigned char buf[65536];
	snprintf(path, sizeof(path), "%s/%s", repo, rel);
	int fd = open(path, O_RDONLY);
	assert_true(fd >= 0);
	ssize_t got = pread(fd, buf, sizeof(buf), 0);
	close(fd);
	for (ssize_t i = 0; got >= (ssize_t)n && i <= got - (ssize_t)n; i++)
		if (memcmp(buf + i, needle, n) == 0)
			return i;
	return -1;
}

static int check_in(const char *repository, const char *rel, enum bw_chain_fault *fault,
		    char *err, size_t errsize)
{
	*fault = BW_CHAIN_OK;
	err[0] = '\0';
	return bw_target_check_chain(repository, rel, fault, err, errsize);
}

static void accepted(const char *rel)
{
	char err[1024];
	enum bw_chain_fault f;
	int rc = check_in(repo, rel, &f, err, sizeof(err));
	if (rc != 0)
		fail_msg("%s: refused %s/%s: %s", rel, bw_err_name(rc), bw_target_chain_rule(f), err);
}

/* rel is refused with code and fault, and err names image and holds words. */
static void refused(const char *rel, int code, enum bw_chain_fault fault, const char *image,
		    const char *words)
{
	char err[1024];
	enum bw_chain_fault f;
	int rc = check_in(repo, rel, &f, err, sizeof(err));
	if (rc != code || f != fault || strncmp(err, image, strlen(image)) != 0 ||
	    strstr(err, words) == NULL)
		fail_msg("%s: got %s/%s \"%s\", want %s/%s \"%s: ...%s...\"", rel, bw_err_name(rc),
			 bw_target_chain_rule(f), err, bw_err_name(code),
			 bw_target_chain_rule(fault), image, words);
}

static void test_chain_rule_names(void **state)
{
	(void)state;
	assert_string_equal(bw_target_chain_rule(BW_CHAIN_OK), "ok");
	assert_string_equal(bw_target_chain_rule(BW_CHAIN_NOT_FOUND), "not_found");
	assert_string_equal(bw_target_chain_rule(BW_CHAIN_OUTSIDE), "outside_repository");
	assert_string_equal(bw_target_chain_rule(BW_CHAIN_NOT_QCOW2), "not_qcow2");
	assert_string_equal(bw_target_chain_rule(BW_CHAIN_UNREADABLE), "unreadable");
	assert_string_equal(bw_target_chain_rule((enum bw_chain_fault)999), "unknown");
}

/* Chains bw and qemu make, of depth 1 and 5, relative and absolute names: accepted, and
 * qemu opens them as bw resolved them. */
static void test_chain_valid(void **state)
{
	(void)state;
	char err[1024], rel[5][PATH_MAX], path[PATH_MAX + 64];
	for (int i = 0; i < 5; i++) {
		char job[16];
		snprintf(job, sizeof(job), "bk-%d", i);
		struct bw_target t = target(job, 2000, 1048576, i ? rel[i - 1] : NULL);
		assert_int_equal(bw_target_create(&t, err, sizeof(err)), 0);
		snprintf(rel[i], sizeof(rel[i]), "%s/2000/%s.qcow2", t.vm_dir, job);
		accepted(rel[i]);
	}
	snprintf(path, sizeof(path), "%s/%s", repo, rel[4]);
	assert_int_equal(bw_test_sh("test $(qemu-img info -U --backing-chain '%s' | grep -c "
				    "'^image:') = 5",
				    path),
			 0);

	/* qemu-img's own: version 2 and 3, a relative name in a subdirectory */
	assert_int_equal(sh_in_repo("mkdir -p a/b && qemu-img create -q -f qcow2 -o compat=0.10 "
				    "a/v2.qcow2 1M && qemu-img create -q -f qcow2 -b ../v2.qcow2 "
				    "-F qcow2 a/b/top.qcow2 1M"),
			 0);
	accepted("a/v2.qcow2");
	accepted("a/b/top.qcow2");
	accepted("a/./b//top.qcow2");

	/* an absolute backing name inside the repository, as given and through a symlink to it */
	assert_int_equal(sh_in_repo("qemu-img create -q -f qcow2 -b '%s/a/v2.qcow2' -F qcow2 "
				    "a/abs.qcow2 1M",
				    repo),
			 0);
	accepted("a/abs.qcow2");
	char alias[PATH_MAX];
	snprintf(alias, sizeof(alias), "%s-alias", repo);
	assert_int_equal(symlink(repo, alias), 0);
	enum bw_chain_fault f;
	int rc = check_in(alias, "a/abs.qcow2", &f, err, sizeof(err)); /* real path matches */
	unlink(alias);
	assert_int_equal(rc, 0);

	/* a relative symlink that stays inside is followed, as qemu will */
	assert_int_equal(sh_in_repo("ln -s a/v2.qcow2 latest.qcow2 && ln -s b a/bb && "
				    "ln -s a/b/top.qcow2 top-link.qcow2"),
			 0);
	accepted("latest.qcow2");
	accepted("a/bb/top.qcow2");
	/* but a backing name is relative to the directory of the symlink, not of its target
	 * (qemu's rule): through top-link.qcow2, "../v2.qcow2" is <repo>/../v2.qcow2 */
	refused("top-link.qcow2", BW_EPERM, BW_CHAIN_OUTSIDE, "../v2.qcow2", "leads out");
	assert_int_not_equal(sh_in_repo("qemu-img info -U --backing-chain top-link.qcow2 "
					">/dev/null 2>&1"),
			     0); /* qemu does not find it either */
}

static void test_chain_leaving_the_repository(void **state)
{
	(void)state;
	char outside[PATH_MAX];
	const char *base = strrchr(repo, '/') + 1;
	snprintf(outside, sizeof(outside), "%s-o.qcow2", repo); /* next to the repository */
	assert_int_equal(bw_test_sh("qemu-img create -q -f qcow2 '%s' 1M", outside), 0);
	assert_int_equal(sh_in_repo("mkdir -p vm && qemu-img create -q -f qcow2 vm/in.qcow2 1M"), 0);

	/* the parent itself: "..", symlinks out, an absolute symlink even to inside */
	assert_int_equal(sh_in_repo("ln -s '../%s-o.qcow2' up.qcow2 && ln -s '%s' abs.qcow2 && "
				    "ln -s '%s/vm/in.qcow2' absin.qcow2 && ln -s .. vm/up",
				    base, outside, repo),
			 0);
	refused("up.qcow2", BW_EPERM, BW_CHAIN_OUTSIDE, "up.qcow2", "leads out");
	refused("abs.qcow2", BW_EPERM, BW_CHAIN_OUTSIDE, "abs.qcow2", "leads out");
	refused("absin.qcow2", BW_EPERM, BW_CHAIN_OUTSIDE, "absin.qcow2", "absolute symlink");
	refused("vm/up/../x.qcow2", BW_EPERM, BW_CHAIN_OUTSIDE, "vm/up/..", "leads out");
	accepted("vm/up/vm/up/vm/in.qcow2"); /* a symlink to the root: never left */

	/* a backing file outside: relative, absolute, absolute through the repository */
	assert_int_equal(sh_in_repo("qemu-img create -q -f qcow2 -u -b '../../%s-o.qcow2' -F qcow2 "
				    "vm/rel-out.qcow2 1M && "
				    "qemu-img create -q -f qcow2 -u -b '%s' -F qcow2 vm/abs-out.qcow2 1M && "
				    "qemu-img create -q -f qcow2 -u -b '%s/../%s-o.qcow2' -F qcow2 "
				    "vm/abs-dotdot.qcow2 1M && "
				    "qemu-img create -q -f qcow2 -u -b '%s2/x.qcow2' -F qcow2 "
				    "vm/abs-prefix.qcow2 1M",
				    base, outside, repo, base, repo),
			 0);
	refused("vm/rel-out.qcow2", BW_EPERM, BW_CHAIN_OUTSIDE, "vm/../../", "leads out");
	refused("vm/abs-out.qcow2", BW_EPERM, BW_CHAIN_OUTSIDE, "vm/abs-out.qcow2",
		"lies outside the repository");
	refused("vm/abs-dotdot.qcow2", BW_EPERM, BW_CHAIN_OUTSIDE, "../", "leads out");
	refused("vm/abs-prefix.qcow2", BW_EPERM, BW_CHAIN_OUTSIDE, "vm/abs-prefix.qcow2",
		"lies outside the repository");

	/* deep in a chain: the refusal names the image that leaves */
	assert_int_equal(sh_in_repo("qemu-img create -q -f qcow2 -u -b rel-out.qcow2 -F qcow2 "
				    "vm/mid.qcow2 1M && qemu-img create -q -f qcow2 -u -b mid.qcow2 "
				    "-F qcow2 vm/top.qcow2 1M"),
			 0);
	refused("vm/top.qcow2", BW_EPERM, BW_CHAIN_OUTSIDE, "vm/../../", "leads out");

	/* qemu takes a relative name from the symlink's directory, not its target's: a
	 * symlink at the root to vm/mid.qcow2 makes "rel-out.qcow2" mean <repo>/rel-out.qcow2 */
	assert_int_equal(sh_in_repo("ln -s vm/top.qcow2 top-link.qcow2"), 0);
	refused("top-link.qcow2", BW_ENOENT, BW_CHAIN_NOT_FOUND, "mid.qcow2", "no such file");
	assert_int_not_equal(sh_in_repo("qemu-img info -U --backing-chain top-link.qcow2 "
					">/dev/null 2>&1"),
			     0); /* qemu does not find it either */
	assert_int_equal(sh_in_repo("qemu-img info -U --backing-chain vm/mid.qcow2 2>&1 | "
				    "grep -q 'rel-out.qcow2'"),
			 0); /* (what qemu would open through vm/) */

	/* protocols instead of files */
	static const char *const protocols[] = {
		"nbd://127.0.0.1:10809/x", "json:{\"file\":{\"driver\":\"file\",\"filename\":\"/etc/passwd\"}}",
		"file:in.qcow2", "ssh://h/x.qcow2"};
	for (size_t i = 0; i < sizeof(protocols) / sizeof(protocols[0]); i++) {
		char rel[32];
		snprintf(rel, sizeof(rel), "vm/proto%zu.qcow2", i);
		assert_int_equal(sh_in_repo("qemu-img create -q -f qcow2 -u -b '%s' -F qcow2 '%s' 1M",
					    protocols[i], rel),
				 0);
		refused(rel, BW_EPERM, BW_CHAIN_PROTOCOL, rel, "names a protocol");
	}
	/* "./file:x" is a file name to qemu, and so to bw */
	assert_int_equal(sh_in_repo("cp vm/in.qcow2 'vm/file:x.qcow2' && qemu-img create -q -f qcow2 "
				    "-u -b './file:x.qcow2' -F qcow2 vm/colon.qcow2 1M"),
			 0);
	accepted("vm/colon.qcow2");
	unlink(outside);
}

static void test_chain_formats_and_headers(void **state)
{
	(void)state;
	char path[PATH_MAX];
	assert_int_equal(sh_in_repo("qemu-img create -q -f qcow2 base.qcow2 1M && "
				    "qemu-img create -q -f raw raw.img 1M && "
				    "qemu-img create -q -f qcow2 -b raw.img -F raw over-raw.qcow2 1M && "
				    "qemu-img create -q -f qcow2 -u -b raw.img -F qcow2 lie.qcow2 1M && "
				    "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 nofmt.qcow2 1M && "
				    "echo 'not an image at all' >text.img"),
			 0);
	accepted("base.qcow2");
	refused("raw.img", BW_EINVAL, BW_CHAIN_NOT_QCOW2, "raw.img", "no qcow2 magic");
	refused("text.img", BW_EINVAL, BW_CHAIN_NOT_QCOW2, "text.img", "no qcow2 magic");
	refused("over-raw.qcow2", BW_EINVAL, BW_CHAIN_FORMAT, "over-raw.qcow2", "\"raw\"");
	refused("lie.qcow2", BW_EINVAL, BW_CHAIN_NOT_QCOW2, "raw.img", "no qcow2 magic");

	/* qemu-img 7 refuses -b without -F: remove the extension by renaming its type */
	off_t ext = find_bytes("nofmt.qcow2", "\xe2\x79\x2a\xca", 4);
	assert_true(ext > 0);
	accepted("nofmt.qcow2");
	patch("nofmt.qcow2", ext, "\x0b\xad\xf0\x0d", 4);
	refused("nofmt.qcow2", BW_EINVAL, BW_CHAIN_NO_FORMAT, "nofmt.qcow2", "no backing format");
	/* an old version 2 layout: the backing name right after the header, no extensions */
	assert_int_equal(sh_in_repo("qemu-img create -q -f qcow2 -o compat=0.10 -b base.qcow2 "
				    "-F qcow2 old.qcow2 1M"),
			 0);
	accepted("old.qcow2");
	patch("old.qcow2", 72, "base.qcow2", 10);
	patch("old.qcow2", 8, "\0\0\0\0\0\0\0\x48", 8); /* backing_file_offset 72 */
	refused("old.qcow2", BW_EINVAL, BW_CHAIN_NO_FORMAT, "old.qcow2", "no backing format");

	/* truncated and garbage headers */
	assert_int_equal(sh_in_repo("for n in 0 2 50 103; do head -c $n base.qcow2 >cut$n.qcow2; "
				    "done"),
			 0);
	refused("cut0.qcow2", BW_EINVAL, BW_CHAIN_NOT_QCOW2, "cut0.qcow2", "no qcow2 magic");
	refused("cut2.qcow2", BW_EINVAL, BW_CHAIN_NOT_QCOW2, "cut2.qcow2", "no qcow2 magic");
	refused("cut50.qcow2", BW_EINVAL, BW_CHAIN_BAD_HEADER, "cut50.qcow2", "truncated");
	refused("cut103.qcow2", BW_EINVAL, BW_CHAIN_BAD_HEADER, "cut103.qcow2", "truncated");
	/* cut in the middle of the backing file's name */
	off_t name = find_bytes("over-raw.qcow2", "raw.img", 7);
	assert_true(name > 0);
	assert_int_equal(sh_in_repo("head -c %lld over-raw.qcow2 >cutname.qcow2",
				    (long long)name + 3),
			 0);
	refused("cutname.qcow2", BW_EINVAL, BW_CHAIN_BAD_HEADER, "cutname.qcow2",
		"backing file name passes");

	static const struct {
		off_t at;
		unsigned char byte;
		enum bw_chain_fault fault;
		int code;
		const char *words;
	} bad[] = {
		{7, 7, BW_CHAIN_NOT_QCOW2, BW_EINVAL, "version 7"},
		{23, 40, BW_CHAIN_BAD_HEADER, BW_EINVAL, "cluster_bits 40"},
		{79, 1, BW_CHAIN_DIRTY, BW_EINVAL, "dirty"},
		{79, 2, BW_CHAIN_CORRUPT, BW_EINVAL, "corrupt"},
		{79, 3, BW_CHAIN_CORRUPT, BW_EINVAL, "corrupt"},
		{79, 0x40, BW_CHAIN_UNSUPPORTED, BW_ENOTSUP, "unknown incompatible features"},
		{35, 1, BW_CHAIN_UNSUPPORTED, BW_ENOTSUP, "encrypted"},
		{103, 8, BW_CHAIN_BAD_HEADER, BW_EINVAL, "header_length 8"},
		{16, 0x10, BW_CHAIN_BAD_HEADER, BW_EINVAL, "backing file name at"},
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char rel[32];
		snprintf(rel, sizeof(rel), "bad%zu.qcow2", i);
		assert_int_equal(sh_in_repo("cp over-raw.qcow2 %s", rel), 0);
		patch(rel, bad[i].at, &bad[i].byte, 1);
		refused(rel, bad[i].code, bad[i].fault, rel, bad[i].words);
	}

	/* an external data file is a path qemu opens that no backing name shows */
	assert_int_equal(sh_in_repo("qemu-img create -q -f qcow2 -o data_file=data.raw ext.qcow2 1M"),
			 0);
	refused("ext.qcow2", BW_ENOTSUP, BW_CHAIN_UNSUPPORTED, "ext.qcow2", "external data file");

	/* not regular files; a FIFO must not block the check (SIGALRM ends a hung test) */
	snprintf(path, sizeof(path), "%s/fifo.qcow2", repo);
	assert_int_equal(mkfifo(path, 0600), 0);
	assert_int_equal(sh_in_repo("mkdir dir.qcow2 && ln -s nowhere.qcow2 dangling.qcow2 && "
				    "ln -s loop1 loop2 && ln -s loop2 loop1"),
			 0);
	alarm(10);
	refused("fifo.qcow2", BW_ENOENT, BW_CHAIN_NOT_FOUND, "fifo.qcow2", "a FIFO");
	alarm(0);
	refused("dir.qcow2", BW_ENOENT, BW_CHAIN_NOT_FOUND, "dir.qcow2", "a directory");
	refused("nope.qcow2", BW_ENOENT, BW_CHAIN_NOT_FOUND, "nope.qcow2", "no such file");
	refused("dangling.qcow2", BW_ENOENT, BW_CHAIN_NOT_FOUND, "dangling.qcow2", "no such file");
	refused("loop1", BW_ENOENT, BW_CHAIN_NOT_FOUND, "loop1", "symlink loop");
	refused("text.img/x", BW_ENOENT, BW_CHAIN_NOT_FOUND, "text.img/x", "no such file");
	/* a FIFO deeper in the chain, too */
	assert_int_equal(sh_in_repo("qemu-img create -q -f qcow2 -u -b fifo.qcow2 -F qcow2 "
				    "on-fifo.qcow2 1M"),
			 0);
	alarm(10);
	refused("on-fifo.qcow2", BW_ENOENT, BW_CHAIN_NOT_FOUND, "fifo.qcow2", "a FIFO");
	alarm(0);

	/* the repository itself gone */
	enum bw_chain_fault f;
	char err[512];
	snprintf(path, sizeof(path), "%s/no-such-dir", repo);
	assert_int_equal(check_in(path, "base.qcow2", &f, err, sizeof(err)), BW_ENOENT);
	assert_int_equal(f, BW_CHAIN_NOT_FOUND);
	assert_non_null(strstr(err, "repository"));
}

static void test_chain_loops_and_depth(void **state)
{
	(void)state;
	/* two images backing each other, and one backing itself */
	assert_int_equal(sh_in_repo("qemu-img create -q -f qcow2 -u -b b.qcow2 -F qcow2 a.qcow2 1M && "
				    "qemu-img create -q -f qcow2 -u -b a.qcow2 -F qcow2 b.qcow2 1M && "
				    "qemu-img create -q -f qcow2 -u -b selx.qcow2 -F qcow2 self.qcow2 1M && "
				    "mkdir d && qemu-img create -q -f qcow2 -u -b ../d/../c.qcow2 -F qcow2 "
				    "c.qcow2 1M"),
			 0);
	off_t self = find_bytes("self.qcow2", "selx.qcow2", 10); /* qemu-img refuses it */
	assert_true(self > 0);
	patch("self.qcow2", self, "self", 4);
	refused("a.qcow2", BW_EINVAL, BW_CHAIN_LOOP, "a.qcow2", "loops: image 1");
	refused("b.qcow2", BW_EINVAL, BW_CHAIN_LOOP, "b.qcow2", "loops: image 1");
	refused("self.qcow2", BW_EINVAL, BW_CHAIN_LOOP, "self.qcow2", "loops");
	refused("c.qcow2", BW_EPERM, BW_CHAIN_OUTSIDE, "../d/../c.qcow2", "leads out");

	/* 300 images: i000 (no backing) <- i001 <- ... <- i299; qemu's own layout copied */
	assert_int_equal(sh_in_repo("qemu-img create -q -f qcow2 i000.qcow2 1M && "
				    "qemu-img create -q -f qcow2 -u -b i999.qcow2 -F qcow2 t.qcow2 1M"),
			 0);
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "%s/t.qcow2", repo);
	FILE *f = fopen(path, "rb");
	assert_non_null(f);
	static unsigned char img[1 << 20];
	size_t len = fread(img, 1, sizeof(img), f);
	fclose(f);
	assert_true(len > 0 && len < sizeof(img));
	off_t at = find_bytes("t.qcow2", "i999.qcow2", 10);
	assert_true(at > 0);
	for (int i = 1; i < 300; i++) {
		char name[16];
		snprintf(name, sizeof(name), "i%03d", i - 1);
		memcpy(img + at, name, 4);
		snprintf(path, sizeof(path), "%s/i%03d.qcow2", repo, i);
		f = fopen(path, "wb");
		assert_non_null(f);
		assert_int_equal(fwrite(img, 1, len, f), len);
		fclose(f);
	}
	accepted("i255.qcow2"); /* 256 images: the most */
	refused("i256.qcow2", BW_EINVAL, BW_CHAIN_TOO_DEEP, "i256.qcow2", "more than 256");
	refused("i299.qcow2", BW_EINVAL, BW_CHAIN_TOO_DEEP, "i299.qcow2", "more than 256");
	/* qemu agrees that the accepted one is a chain of 256 */
	snprintf(path, sizeof(path), "%s/i255.qcow2", repo);
	assert_int_equal(bw_test_sh("test $(qemu-img info -U --backing-chain '%s' | grep -c "
				    "'^image:') = 256",
				    path),
			 0);
}

/*
 * bw's overlays name their parent "../../<parent_path>", and qemu joins the names of a chain
 * without folding the "..": the path it opens grows with every increment. A chain whose
 * path would pass PATH_MAX is refused; every chain accepted before that, qemu opens.
 */
static void test_chain_path_growth(void **state)
{
	(void)state;
	char err[1024], rel[PATH_MAX] = "", last[PATH_MAX + 64] = "", path[PATH_MAX];
	int n = 0, rc = 0;
	enum bw_chain_fault f = BW_CHAIN_OK;
	for (; n < 300; n++) {
		char job[16];
		snprintf(job, sizeof(job), "g%d", n);
		struct bw_target t = target(job, 2000, 65536, n ? last : NULL);
		assert_int_equal(bw_target_create(&t, err, sizeof(err)), 0);
		snprintf(rel, sizeof(rel), "%s/2000/%s.qcow2", t.vm_dir, job);
		if ((rc = check_in(repo, rel, &f, err, sizeof(err))) != 0)
			break;
		snprintf(last, sizeof(last), "%s", rel);
	}
	assert_int_equal(rc, BW_ERANGE);
	assert_int_equal(f, BW_CHAIN_TOO_LONG);
	assert_true(n > 20 && n < 300);
	/* the overlay on the last accepted parent: qemu opens its whole chain */
	struct bw_target top = target("top", 2000, 65536, last);
	assert_int_equal(bw_target_create(&top, err, sizeof(err)), 0);
	assert_int_equal(bw_target_path(&top, path, sizeof(path)), 0);
	assert_int_equal(bw_test_sh("test $(qemu-img info -U --backing-chain '%s' | grep -c "
				    "'^image:') = %d",
				    path, n + 1),
			 0);
}

/* qemu's write lock: a parent served read-write is in use; one read as a backing is not. */
static void test_chain_in_use(void **state)
{
	(void)state;
	assert_int_equal(sh_in_repo("qemu-img create -q -f qcow2 busy.qcow2 1M && "
				    "qemu-img create -q -f qcow2 shared.qcow2 1M && "
				    "qemu-img create -q -f qcow2 -b shared.qcow2 -F qcow2 over.qcow2 1M && "
				    "qemu-img create -q -f qcow2 -b busy.qcow2 -F qcow2 on-busy.qcow2 1M"),
			 0);
	accepted("busy.qcow2");
	assert_int_equal(sh_in_repo("qemu-nbd --fork --persistent -k \"$PWD/s1\" -f qcow2 "
				    "--pid-file=\"$PWD/pid1\" busy.qcow2 && "
				    "qemu-nbd --fork --persistent -k \"$PWD/s2\" -f qcow2 "
				    "--pid-file=\"$PWD/pid2\" over.qcow2"),
			 0);
	char err[1024];
	enum bw_chain_fault f1, f2, f3;
	int rc1 = check_in(repo, "busy.qcow2", &f1, err, sizeof(err));
	int rc2 = check_in(repo, "on-busy.qcow2", &f2, err, sizeof(err));
	int rc3 = check_in(repo, "shared.qcow2", &f3, err, sizeof(err));
	/* qemu-nbd 7.2 can lose an early SIGTERM (README): send it until the server is gone */
	assert_int_equal(sh_in_repo("for p in $(cat pid1) $(cat pid2); do"
				    "  for i in $(seq 50); do kill $p 2>/dev/null || break; sleep 0.1; done;"
				    "  kill -9 $p 2>/dev/null; done; true"),
			 0);
	assert_int_equal(rc1, BW_EBUSY);
	assert_int_equal(f1, BW_CHAIN_IN_USE);
	assert_int_equal(rc2, BW_EBUSY); /* deeper in the chain too */
	assert_int_equal(f2, BW_CHAIN_IN_USE);
	assert_int_equal(rc3, 0); /* only read, as the backing of a served overlay */
	/* once the server is gone (it exits shortly after its signal) */
	for (int i = 0; i < 100 && check_in(repo, "busy.qcow2", &f1, err, sizeof(err)) != 0; i++)
		usleep(50000);
	accepted("busy.qcow2");
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
		cmocka_unit_test_setup_teardown(test_remove_never_follows_a_symlink, setup, teardown),
		cmocka_unit_test_setup_teardown(test_qemu_accepts_the_images, setup,
						teardown),
		cmocka_unit_test(test_chain_rule_names),
		cmocka_unit_test_setup_teardown(test_chain_valid, setup, teardown),
		cmocka_unit_test_setup_teardown(test_chain_leaving_the_repository, setup, teardown),
		cmocka_unit_test_setup_teardown(test_chain_formats_and_headers, setup, teardown),
		cmocka_unit_test_setup_teardown(test_chain_loops_and_depth, setup, teardown),
		cmocka_unit_test_setup_teardown(test_chain_path_growth, setup, teardown),
		cmocka_unit_test_setup_teardown(test_chain_in_use, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
