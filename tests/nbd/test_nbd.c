/* test_nbd.c: the qemu-nbd supervisor against real qemu-img, qemu-nbd and nbdcopy. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "nbd.h"
#include "proc.h"
#include "psk.h"
#include "target.h"
#include "../testutil.h"

#define PORT_BASE 22100 /* tests use 22100-22199: below the ephemeral range */

/* A raw source of n MiB: random and zero 1 MiB chunks, seeded. */
static void make_source(const char *path, int mib, unsigned seed)
{
	FILE *f = fopen(path, "wb");
	assert_non_null(f);
	static unsigned char chunk[1 << 20];
	srand(seed);
	for (int i = 0; i < mib; i++) {
		bool zero = rand() % 2;
		for (size_t k = 0; k < sizeof(chunk); k++)
			chunk[k] = zero ? 0 : (unsigned char)rand();
		assert_int_equal(fwrite(chunk, 1, sizeof(chunk), f), sizeof(chunk));
	}
	fclose(f);
}

static void create_image(const char *path, const char *size)
{
	assert_int_equal(bw_test_sh("qemu-img create -q -f qcow2 '%s' %s", path, size), 0);
}

static int spawn(struct bw_nbd *n, const char *image, const char *export, int port, char *err,
		 size_t errsize)
{
	char log[PATH_MAX];
	snprintf(log, sizeof(log), "%s/%s.log", bw_test_dir, export);
	struct bw_nbd_opts o = {"qemu-nbd", image, export, "127.0.0.1", port, 8, log, NULL};
	return bw_nbd_spawn(&o, n, err, errsize);
}

static void test_bytes_land_after_stop(void **state)
{
	(void)state;
	char src[PATH_MAX], img[PATH_MAX], err[1024];
	struct bw_nbd n;
	snprintf(src, sizeof(src), "%s/source.raw", bw_test_dir);
	snprintf(img, sizeof(img), "%s/disk.qcow2", bw_test_dir);
	make_source(src, 64, 1);
	create_image(img, "64M");
	assert_int_equal(spawn(&n, img, "bk-1-2000", PORT_BASE, err, sizeof(err)), 0);
	assert_int_equal(bw_nbd_wait_ready(&n, 5000, err, sizeof(err)), 0);
	assert_int_equal(bw_test_sh("nbdcopy --connections=4 '%s' nbd://127.0.0.1:%d/bk-1-2000", src,
			    PORT_BASE),
			 0);
	assert_int_equal(bw_nbd_stop(&n, BW_NBD_KEEP, 10000, err, sizeof(err)), 0);
	assert_true(n.exited);
	assert_int_equal(bw_test_sh("qemu-img compare -q '%s' '%s'", src, img), 0);

	/* an overlay read through its chain: base + the new source's bytes */
	char src2[PATH_MAX], overlay[PATH_MAX];
	snprintf(src2, sizeof(src2), "%s/source2.raw", bw_test_dir);
	snprintf(overlay, sizeof(overlay), "%s/overlay.qcow2", bw_test_dir);
	make_source(src2, 64, 2);
	assert_int_equal(bw_test_sh("qemu-img create -q -f qcow2 -b disk.qcow2 -F qcow2 '%s' 64M", overlay),
			 0);
	assert_int_equal(spawn(&n, overlay, "bk-2-2000", PORT_BASE + 1, err, sizeof(err)), 0);
	assert_int_equal(bw_nbd_wait_ready(&n, 5000, err, sizeof(err)), 0);
	assert_int_equal(bw_test_sh("nbdcopy '%s' nbd://127.0.0.1:%d/bk-2-2000", src2, PORT_BASE + 1), 0);
	assert_int_equal(bw_nbd_stop(&n, BW_NBD_KEEP, 10000, err, sizeof(err)), 0);
	assert_int_equal(bw_test_sh("qemu-img compare -q '%s' '%s'", src2, overlay), 0);
	assert_int_equal(bw_test_sh("qemu-img compare -q '%s' '%s'", src, img), 0); /* base untouched */
}

static void test_second_server_on_same_image_fails_with_qemu_message(void **state)
{
	(void)state;
	char img[PATH_MAX], err[1024];
	struct bw_nbd a, b;
	snprintf(img, sizeof(img), "%s/locked.qcow2", bw_test_dir);
	create_image(img, "16M");
	assert_int_equal(spawn(&a, img, "a", PORT_BASE + 2, err, sizeof(err)), 0);
	assert_int_equal(bw_nbd_wait_ready(&a, 5000, err, sizeof(err)), 0);
	assert_int_equal(spawn(&b, img, "b", PORT_BASE + 3, err, sizeof(err)), 0);
	assert_int_equal(bw_nbd_wait_ready(&b, 5000, err, sizeof(err)), BW_ECHILD);
	assert_non_null(strstr(err, "lock"));
	assert_true(b.exited);
	assert_int_equal(bw_nbd_stop(&a, BW_NBD_KEEP, 5000, err, sizeof(err)), 0);
}

static void test_bad_images_reported_nothing_left(void **state)
{
	(void)state;
	char img[PATH_MAX], err[1024];
	struct bw_nbd n;

	snprintf(img, sizeof(img), "%s/missing.qcow2", bw_test_dir);
	assert_int_equal(spawn(&n, img, "m", PORT_BASE + 4, err, sizeof(err)), BW_ENOENT);
	assert_non_null(strstr(err, "never started before its image"));

	snprintf(img, sizeof(img), "%s/corrupt.qcow2", bw_test_dir);
	assert_int_equal(bw_test_sh("head -c 1048576 /dev/urandom > '%s'", img), 0);
	assert_int_equal(spawn(&n, img, "c", PORT_BASE + 4, err, sizeof(err)), 0);
	assert_int_equal(bw_nbd_wait_ready(&n, 5000, err, sizeof(err)), BW_ECHILD);
	assert_true(n.exited);
	assert_non_null(strstr(err, "qcow2")); /* qemu's own words, from the log */

	snprintf(img, sizeof(img), "%s/raw.img", bw_test_dir);
	assert_int_equal(bw_test_sh("qemu-img create -q -f raw '%s' 1M", img), 0);
	assert_int_equal(spawn(&n, img, "r", PORT_BASE + 5, err, sizeof(err)), 0);
	assert_int_equal(bw_nbd_wait_ready(&n, 5000, err, sizeof(err)), BW_ECHILD);
	assert_non_null(strstr(err, "exited with status 1"));
	assert_int_equal(kill(n.pid, 0), -1); /* reaped: nothing left running */
}

static void test_taken_port_is_reported_and_next_works(void **state)
{
	(void)state;
	char img[PATH_MAX], err[1024];
	struct bw_nbd n;
	snprintf(img, sizeof(img), "%s/p.qcow2", bw_test_dir);
	create_image(img, "16M");

	int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(PORT_BASE + 6)};
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	assert_int_equal(bind(s, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_int_equal(listen(s, 4), 0);
	assert_int_equal(spawn(&n, img, "p", PORT_BASE + 6, err, sizeof(err)), 0);
	assert_int_equal(bw_nbd_wait_ready(&n, 5000, err, sizeof(err)), BW_EADDRINUSE);
	assert_int_equal(spawn(&n, img, "p", PORT_BASE + 7, err, sizeof(err)), 0);
	assert_int_equal(bw_nbd_wait_ready(&n, 5000, err, sizeof(err)), 0);
	assert_int_equal(bw_nbd_stop(&n, BW_NBD_KEEP, 5000, err, sizeof(err)), 0);
	close(s);
}

static void test_stop_of_just_ready_server_always_ends_it(void **state)
{
	(void)state;
	char img[PATH_MAX], err[1024];
	snprintf(img, sizeof(img), "%s/s.qcow2", bw_test_dir);
	create_image(img, "16M");
	int left = 0, failed = 0;
	for (int i = 0; i < 100; i++) {
		struct bw_nbd n;
		assert_int_equal(spawn(&n, img, "s", PORT_BASE + 8 + i % 2, err, sizeof(err)), 0);
		assert_int_equal(bw_nbd_wait_ready(&n, 5000, err, sizeof(err)), 0);
		if (bw_nbd_stop(&n, BW_NBD_KEEP, 5000, err, sizeof(err)) != 0)
			failed++;
		if (kill(n.pid, 0) == 0) {
			left++;
			kill(n.pid, SIGKILL);
			waitpid(n.pid, NULL, 0);
		}
	}
	print_message("100 spawn/ready/stop cycles: %d failed, %d left running\n", failed, left);
	assert_int_equal(failed, 0);
	assert_int_equal(left, 0);
	/* the readiness probe ends its handshake politely: no error in the server's log */
	assert_int_equal(bw_test_sh("! grep -i 'failed' '%s/s.log'", bw_test_dir), 0);
}

/* The inode numbers behind a process's descriptors ("socket:[123]", paths). */
static bool has_fd_target(pid_t pid, const char *target)
{
	char path[64], link[PATH_MAX];
	snprintf(path, sizeof(path), "/proc/%ld/fd", (long)pid);
	DIR *d = opendir(path);
	assert_non_null(d);
	struct dirent *e;
	bool found = false;
	while ((e = readdir(d)) != NULL) {
		char fd[PATH_MAX + 64];
		snprintf(fd, sizeof(fd), "%s/%s", path, e->d_name);
		ssize_t n = readlink(fd, link, sizeof(link) - 1);
		if (n <= 0)
			continue;
		link[n] = '\0';
		if (strcmp(link, target) == 0)
			found = true;
	}
	closedir(d);
	return found;
}

static void test_child_inherits_no_descriptor(void **state)
{
	(void)state;
	char img[PATH_MAX], err[1024], db_path[PATH_MAX], target[PATH_MAX];
	struct bw_nbd n;
	snprintf(img, sizeof(img), "%s/fd.qcow2", bw_test_dir);
	create_image(img, "16M");

	/* What a worker holds: the ledger, a broker-like socket, and a careless pipe. */
	sqlite3 *db;
	snprintf(db_path, sizeof(db_path), "%s/ledger.db", bw_test_dir);
	assert_int_equal(sqlite3_open(db_path, &db), SQLITE_OK);
	assert_int_equal(sqlite3_exec(db, "CREATE TABLE t(x)", NULL, NULL, NULL), SQLITE_OK);
	int sock = socket(AF_INET, SOCK_STREAM, 0); /* deliberately without SOCK_CLOEXEC */
	int p[2];
	assert_int_equal(pipe(p), 0); /* deliberately without O_CLOEXEC */
	struct stat st;

	assert_int_equal(spawn(&n, img, "fd", PORT_BASE + 20, err, sizeof(err)), 0);
	assert_int_equal(bw_nbd_wait_ready(&n, 5000, err, sizeof(err)), 0);
	assert_false(has_fd_target(n.pid, db_path));
	assert_int_equal(fstat(sock, &st), 0);
	snprintf(target, sizeof(target), "socket:[%lu]", (unsigned long)st.st_ino);
	assert_false(has_fd_target(n.pid, target));
	assert_int_equal(fstat(p[0], &st), 0);
	snprintf(target, sizeof(target), "pipe:[%lu]", (unsigned long)st.st_ino);
	assert_false(has_fd_target(n.pid, target));
	assert_true(has_fd_target(n.pid, "/dev/null")); /* stdin */
	snprintf(target, sizeof(target), "%s/fd.log", bw_test_dir);
	assert_true(has_fd_target(n.pid, target)); /* stdout, stderr */

	/* its own session: a worker's death does not take it down */
	assert_int_equal(getsid(n.pid), n.pid);
	assert_int_equal(bw_nbd_stop(&n, BW_NBD_KEEP, 5000, err, sizeof(err)), 0);
	sqlite3_close(db);
	close(sock);
	close(p[0]);
	close(p[1]);
}

static void test_unexpected_death_reported_with_status_and_log(void **state)
{
	(void)state;
	char img[PATH_MAX], err[1024];
	struct bw_nbd n;
	snprintf(img, sizeof(img), "%s/d.qcow2", bw_test_dir);
	create_image(img, "16M");
	assert_int_equal(spawn(&n, img, "d", PORT_BASE + 21, err, sizeof(err)), 0);
	assert_int_equal(bw_nbd_wait_ready(&n, 5000, err, sizeof(err)), 0);
	kill(n.pid, SIGKILL);
	for (int i = 0; i < 200 && !bw_nbd_reap(&n); i++)
		usleep(5000);
	assert_true(n.exited);
	assert_true(WIFSIGNALED(n.status) && WTERMSIG(n.status) == SIGKILL);
	assert_int_equal(bw_nbd_stop(&n, BW_NBD_KEEP, 1000, err, sizeof(err)), BW_ECHILD);
	assert_non_null(strstr(err, "killed by signal 9"));
}

static void test_adopt_only_the_same_process(void **state)
{
	(void)state;
	char img[PATH_MAX], err[1024];
	struct bw_nbd n, adopted;
	snprintf(img, sizeof(img), "%s/adopt.qcow2", bw_test_dir);
	create_image(img, "16M");
	assert_int_equal(spawn(&n, img, "ad", PORT_BASE + 22, err, sizeof(err)), 0);
	assert_int_equal(bw_nbd_wait_ready(&n, 5000, err, sizeof(err)), 0);

	/* pid reuse: same pid, another start time: never adopted, never signalled */
	assert_int_equal(bw_nbd_adopt(n.pid, n.start_time + 1, PORT_BASE + 22, NULL, &adopted),
			 BW_ENOENT);
	assert_int_equal(kill(n.pid, 0), 0);

	assert_int_equal(bw_nbd_adopt(n.pid, n.start_time, PORT_BASE + 22, n.log_path, &adopted),
			 0);
	assert_int_equal(bw_nbd_stop(&adopted, BW_NBD_KEEP, 5000, err, sizeof(err)), 0);
	bw_nbd_release(&adopted);
	int status;
	assert_int_equal(waitpid(n.pid, &status, 0), n.pid); /* it was our child after all */
	assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	assert_int_equal(bw_nbd_adopt(n.pid, n.start_time, PORT_BASE + 22, NULL, &adopted),
			 BW_ENOENT);
}

/* TLS with a per-job key: greeted like a plain server; only the key's holder gets in. */
static void test_tls_psk_only_the_key_gets_in(void **state)
{
	(void)state;
	char src[PATH_MAX], img[PATH_MAX], err[1024], keydir[PATH_MAX], log[PATH_MAX];
	char hex[BW_PSK_HEX_SIZE], keyfile[PATH_MAX], badfile[PATH_MAX];
	struct bw_nbd n;
	const int port = PORT_BASE + 40;
	snprintf(src, sizeof(src), "%s/tls-source.raw", bw_test_dir);
	snprintf(img, sizeof(img), "%s/tls.qcow2", bw_test_dir);
	snprintf(log, sizeof(log), "%s/tls.log", bw_test_dir);
	make_source(src, 8, 3);
	create_image(img, "8M");
	assert_int_equal(bw_psk_create(bw_test_dir, "bk-tls", err, sizeof(err)), 0);
	assert_true(bw_psk_exists(bw_test_dir, "bk-tls"));
	assert_int_equal(bw_psk_dir(bw_test_dir, "bk-tls", keydir, sizeof(keydir)), 0);
	struct stat st;
	assert_int_equal(stat(keydir, &st), 0);
	assert_int_equal(st.st_mode & 0777, 0700);
	char path[PATH_MAX + 16];
	snprintf(path, sizeof(path), "%s/keys.psk", keydir);
	assert_int_equal(stat(path, &st), 0);
	assert_int_equal(st.st_mode & 0777, 0600);
	assert_int_equal(bw_psk_read(bw_test_dir, "bk-tls", hex), 0);
	assert_int_equal(strlen(hex), 64);

	struct bw_nbd_opts o = {"qemu-nbd", img, "bk-tls-2000", "127.0.0.1", port, 8, log, keydir};
	assert_int_equal(bw_nbd_spawn(&o, &n, err, sizeof(err)), 0);
	assert_int_equal(bw_nbd_wait_ready(&n, 5000, err, sizeof(err)), 0);
	/* the key is on no command line */
	char cmdline[8192];
	snprintf(path, sizeof(path), "/proc/%d/cmdline", (int)n.pid);
	FILE *f = fopen(path, "rb");
	assert_non_null(f);
	size_t got = fread(cmdline, 1, sizeof(cmdline) - 1, f);
	fclose(f);
	cmdline[got] = '\0';
	for (size_t i = 0; i < got; i++)
		if (cmdline[i] == '\0')
			cmdline[i] = ' ';
	assert_null(strstr(cmdline, hex));
	/* plain: refused; the right key: byte-identical; a wrong key: the handshake fails */
	assert_int_not_equal(bw_test_sh("nbdinfo --size nbd://127.0.0.1:%d/bk-tls-2000 >/dev/null 2>&1",
					port), 0);
	snprintf(keyfile, sizeof(keyfile), "%s/client.psk", bw_test_dir);
	snprintf(badfile, sizeof(badfile), "%s/bad.psk", bw_test_dir);
	f = fopen(keyfile, "w");
	assert_non_null(f);
	fprintf(f, "%s:%s\n", BW_PSK_IDENTITY, hex);
	fclose(f);
	hex[0] = hex[0] == '0' ? '1' : '0';
	f = fopen(badfile, "w");
	assert_non_null(f);
	fprintf(f, "%s:%s\n", BW_PSK_IDENTITY, hex);
	fclose(f);
	assert_int_not_equal(bw_test_sh("nbdinfo --size 'nbds://%s@127.0.0.1:%d/bk-tls-2000?tls-psk-file=%s'"
					" >/dev/null 2>&1", BW_PSK_IDENTITY, port, badfile), 0);
	assert_int_equal(bw_test_sh("nbdcopy '%s' 'nbds://%s@127.0.0.1:%d/bk-tls-2000?tls-psk-file=%s'",
				    src, BW_PSK_IDENTITY, port, keyfile), 0);
	assert_int_equal(bw_nbd_stop(&n, BW_NBD_KEEP, 10000, err, sizeof(err)), 0);
	assert_int_equal(bw_test_sh("qemu-img compare -q '%s' '%s'", src, img), 0);
	/* the key goes with the job */
	assert_int_equal(bw_psk_remove(bw_test_dir, "bk-tls", err, sizeof(err)), 0);
	assert_false(bw_psk_exists(bw_test_dir, "bk-tls"));
	assert_int_equal(bw_psk_read(bw_test_dir, "bk-tls", hex), BW_ENOENT);
	assert_int_equal(bw_psk_remove(bw_test_dir, "bk-tls", err, sizeof(err)),
			 0); /* idempotent */
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_bytes_land_after_stop),
		cmocka_unit_test(test_second_server_on_same_image_fails_with_qemu_message),
		cmocka_unit_test(test_bad_images_reported_nothing_left),
		cmocka_unit_test(test_taken_port_is_reported_and_next_works),
		cmocka_unit_test(test_stop_of_just_ready_server_always_ends_it),
		cmocka_unit_test(test_child_inherits_no_descriptor),
		cmocka_unit_test(test_unexpected_death_reported_with_status_and_log),
		cmocka_unit_test(test_adopt_only_the_same_process),
		cmocka_unit_test(test_tls_psk_only_the_key_gets_in),
	};
	return cmocka_run_group_tests(tests, bw_test_scratch_setup, bw_test_scratch_teardown);
}
