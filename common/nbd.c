/* nbd.c: starts, probes, stops and adopts qemu-nbd servers without leaking, hanging or losing a flush. */
#define _GNU_SOURCE /* pidfd_open */
#include "nbd.h"
#include "child.h"
#include "proc.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/pidfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define GREETING_LEN 18     /* NBDMAGIC, IHAVEOPT, 16-bit handshake flags */
#define PROBE_IO_MS 200     /* one probe's bound for the greeting */
#define TERM_RESEND_MS 200  /* qemu-nbd 7.2 may lose an early SIGTERM: send it again */
#define DISCARD_GRACE_MS 2000

/* Faster NBD writes: qemu-nbd allocates a fresh 256 KiB buffer per request; below this
 * threshold glibc serves it from the heap instead of mmap/munmap with a page fault per
 * page (see scripts/bench-nbd and the README). */
static const char *const nbd_env[] = {"GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432",
				      NULL};

static int64_t mono_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int bw_nbd_spawn(const struct bw_nbd_opts *o, struct bw_nbd *n, char *err, size_t errsize)
{
	char export[300], shared[32], bind[96], port[32];
	if (access(o->image, F_OK) != 0) {
		snprintf(err, errsize, "%s: %s (a server is never started before its image)",
			 o->image, strerror(errno));
		return BW_ENOENT;
	}
	snprintf(export, sizeof(export), "--export-name=%s", o->export_name);
	snprintf(shared, sizeof(shared), "--shared=%d", o->shared);
	snprintf(bind, sizeof(bind), "--bind=%s", o->bind_address);
	snprintf(port, sizeof(port), "--port=%d", o->port);
	const char *argv[] = {o->qemu_nbd,
			      "--format=qcow2",
			      export,
			      "--persistent",
			      shared,
			      bind,
			      port,
			      "--discard=unmap",
			      "--detect-zeroes=unmap",
			      o->image,
			      NULL};
	struct bw_spawn s = {argv, nbd_env, o->log_path, true};

	memset(n, 0, sizeof(*n));
	n->pidfd = -1;
	n->port = o->port;
	snprintf(n->bind_address, sizeof(n->bind_address), "%s", o->bind_address);
	snprintf(n->log_path, sizeof(n->log_path), "%s", o->log_path ? o->log_path : "/dev/null");
	int rc = bw_spawn(&s, &n->pid, &n->start_time, err, errsize);
	return rc == 0 ? 0 : rc == BW_ENOENT ? BW_ENOENT : BW_ECHILD;
}

bool bw_nbd_reap(struct bw_nbd *n)
{
	if (n->exited)
		return true;
	if (n->adopted) {
		struct pollfd p = {n->pidfd, POLLIN, 0};
		if (poll(&p, 1, 0) == 1) {
			n->exited = true;
			n->status = -1; /* not our child: its status is not ours to read */
		}
		return n->exited;
	}
	int st;
	pid_t r = waitpid(n->pid, &st, WNOHANG);
	if (r == n->pid) {
		n->exited = true;
		n->status = st;
	} else if (r < 0 && errno == ECHILD) {
		n->exited = true; /* reaped elsewhere: status unknown */
		n->status = -1;
	}
	return n->exited;
}

/* Describes a server's end: its status and the tail of its log. */
static void death_text(struct bw_nbd *n, char *err, size_t errsize)
{
	char what[96], tail[600];
	if (n->status == -1)
		snprintf(what, sizeof(what), "exited");
	else
		bw_status_text(n->status, what, sizeof(what));
	if (bw_log_tail(n->log_path, 500, tail, sizeof(tail)) != 0 || tail[0] == '\0')
		snprintf(tail, sizeof(tail), "(empty log)");
	snprintf(err, errsize, "qemu-nbd pid %ld port %d %s: %s", (long)n->pid, n->port, what, tail);
}

static bool exited_cleanly(const struct bw_nbd *n)
{
	return n->status == -1 || (WIFEXITED(n->status) && WEXITSTATUS(n->status) == 0);
}

/* Reads the greeting within PROBE_IO_MS; 0 ready, BW_EBUSY not yet. */
static int probe(const struct bw_nbd *n)
{
	struct sockaddr_storage ss;
	socklen_t len;
	memset(&ss, 0, sizeof(ss));
	struct sockaddr_in *in4 = (struct sockaddr_in *)&ss;
	struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
	if (inet_pton(AF_INET, n->bind_address, &in4->sin_addr) == 1) {
		in4->sin_family = AF_INET;
		in4->sin_port = htons((uint16_t)n->port);
		len = sizeof(*in4);
	} else if (inet_pton(AF_INET6, n->bind_address, &in6->sin6_addr) == 1) {
		in6->sin6_family = AF_INET6;
		in6->sin6_port = htons((uint16_t)n->port);
		len = sizeof(*in6);
	} else {
		return BW_EINVAL;
	}
	/* A server bound to the wildcard address is probed on loopback. */
	if (ss.ss_family == AF_INET && in4->sin_addr.s_addr == htonl(INADDR_ANY))
		in4->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (ss.ss_family == AF_INET6 && IN6_IS_ADDR_UNSPECIFIED(&in6->sin6_addr))
		in6->sin6_addr = in6addr_loopback;

	int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return BW_EBUSY;
	int rc = BW_EBUSY;
	unsigned char buf[GREETING_LEN];
	size_t got = 0;
	int64_t deadline = mono_ms() + PROBE_IO_MS;
	if (connect(fd, (struct sockaddr *)&ss, len) != 0 && errno != EINPROGRESS)
		goto out;
	struct pollfd p = {fd, POLLOUT, 0};
	if (poll(&p, 1, PROBE_IO_MS) != 1)
		goto out;
	int soerr = 0;
	socklen_t sl = sizeof(soerr);
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0 || soerr != 0)
		goto out;
	while (got < GREETING_LEN) {
		int left = (int)(deadline - mono_ms());
		p = (struct pollfd){fd, POLLIN, 0};
		if (left <= 0 || poll(&p, 1, left) != 1)
			goto out;
		ssize_t r = read(fd, buf + got, GREETING_LEN - got);
		if (r <= 0)
			goto out;
		got += (size_t)r;
	}
	if (memcmp(buf, "NBDMAGIC", 8) == 0 && memcmp(buf + 8, "IHAVEOPT", 8) == 0)
		rc = 0;
out:
	close(fd);
	return rc;
}

int bw_nbd_poll_ready(struct bw_nbd *n, char *err, size_t errsize)
{
	if (n->ready)
		return 0;
	if (bw_nbd_reap(n)) {
		char tail[600] = "";
		bool in_use = bw_log_tail(n->log_path, 500, tail, sizeof(tail)) == 0 &&
			      strstr(tail, "Address already in use") != NULL;
		death_text(n, err, errsize);
		return in_use ? BW_EADDRINUSE : BW_ECHILD;
	}
	int rc = probe(n);
	if (rc == 0)
		n->ready = true;
	return rc;
}

int bw_nbd_wait_ready(struct bw_nbd *n, int timeout_ms, char *err, size_t errsize)
{
	int64_t deadline = mono_ms() + timeout_ms;
	int delay_us = 500;
	for (;;) {
		int rc = bw_nbd_poll_ready(n, err, errsize);
		if (rc != BW_EBUSY)
			return rc;
		if (mono_ms() >= deadline) {
			snprintf(err, errsize, "qemu-nbd pid %ld port %d: no NBD greeting after %d ms",
				 (long)n->pid, n->port, timeout_ms);
			return BW_ETIMEDOUT;
		}
		usleep((useconds_t)delay_us);
		if (delay_us < 8000)
			delay_us *= 2;
	}
}

/* Signals the very process n names: through its pidfd when adopted, else by pid (our
 * unreaped child cannot have been replaced). */
static void signal_server(struct bw_nbd *n, int sig)
{
	if (n->exited)
		return;
	if (n->adopted)
		syscall(SYS_pidfd_send_signal, n->pidfd, sig, NULL, 0);
	else
		kill(n->pid, sig);
}

int bw_nbd_stop(struct bw_nbd *n, enum bw_nbd_stop_mode mode, int timeout_ms, char *err,
		size_t errsize)
{
	int64_t start = mono_ms(), deadline = start + timeout_ms;

	/* A server that has not greeted yet may lose SIGTERM: wait for its greeting first. */
	while (!n->ready && !bw_nbd_reap(n) && mono_ms() < deadline) {
		if (bw_nbd_poll_ready(n, err, errsize) == 0)
			break;
		usleep(2000);
	}
	int64_t last_term = 0;
	bool killed = false;
	while (!bw_nbd_reap(n)) {
		int64_t now = mono_ms();
		if (mode == BW_NBD_DISCARD && !killed &&
		    (now - start >= DISCARD_GRACE_MS || now >= deadline)) {
			signal_server(n, SIGKILL);
			killed = true;
		} else if (now >= deadline) {
			if (mode == BW_NBD_KEEP) {
				snprintf(err, errsize,
					 "qemu-nbd pid %ld port %d still running %d ms after SIGTERM "
					 "(not killed: its image holds data to keep)",
					 (long)n->pid, n->port, timeout_ms);
				return BW_ETIMEDOUT;
			}
		} else if (!killed && now - last_term >= TERM_RESEND_MS) {
			signal_server(n, SIGTERM);
			last_term = now;
		}
		usleep(1000);
	}
	if (killed || !exited_cleanly(n)) {
		death_text(n, err, errsize);
		return killed && mode == BW_NBD_DISCARD ? 0 : BW_ECHILD;
	}
	return 0;
}

int bw_nbd_adopt(pid_t pid, uint64_t start_time, int port, const char *log_path,
		 struct bw_nbd *n)
{
	if (!bw_proc_same(pid, start_time))
		return BW_ENOENT;
	int fd = pidfd_open(pid, 0);
	if (fd < 0)
		return BW_ENOENT;
	/* The pid may have been reused between the check and the open: check again. */
	if (!bw_proc_same(pid, start_time)) {
		close(fd);
		return BW_ENOENT;
	}
	memset(n, 0, sizeof(*n));
	n->pid = pid;
	n->start_time = start_time;
	n->port = port;
	n->ready = true; /* it served before: its main loop runs */
	n->adopted = true;
	n->pidfd = fd;
	snprintf(n->bind_address, sizeof(n->bind_address), "127.0.0.1");
	snprintf(n->log_path, sizeof(n->log_path), "%s", log_path ? log_path : "/dev/null");
	return 0;
}

void bw_nbd_release(struct bw_nbd *n)
{
	if (n->pidfd >= 0)
		close(n->pidfd);
	n->pidfd = -1;
}
