/* nbd.c: starts, probes, stops and adopts qemu-nbd servers without leaking, hanging or losing a flush. */
#define _GNU_SOURCE /* pidfd_open */
#include "nbd.h"
#include "child.h"
#include "clock.h"
#include "proc.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/pidfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define GREETING_LEN 18     /* NBDMAGIC, IHAVEOPT, 16-bit handshake flags */
#define NBD_OPT_ABORT 2
#define TERM_RESEND_MS 200  /* qemu-nbd 7.2 may lose an early SIGTERM: send it again */
#define DISCARD_GRACE_MS 2000

/* Faster NBD writes: qemu-nbd allocates a fresh 256 KiB buffer per request; below this
 * threshold glibc serves it from the heap instead of mmap/munmap with a page fault per
 * page (see scripts/bench-nbd and the README). */
static const char *const nbd_env[] = {"GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432",
				      NULL};


/* The id of qemu's TLS credentials object (one per server process). */
#define TLS_CREDS_ID "bwtls"
/*
 * GnuTLS picked ChaCha20-Poly1305 with libnbd's clients, which nettle computes in plain C:
 * 58% of qemu-nbd's time (perf), TLS at 0.3x plain. AES-GCM runs on the CPU's AES
 * instructions: preferred by the server, ChaCha20 kept last for a CPU without them.
 */
#define TLS_PRIORITY "NORMAL:%SERVER_PRECEDENCE:-CHACHA20-POLY1305:+CHACHA20-POLY1305"

/*
 * "tls-creds-psk,id=bwtls,endpoint=server,priority=...,dir=<dir>" into out[size], with every
 * ',' of dir doubled (qemu's option syntax). False when it does not fit.
 */
static bool tls_creds_object(char *out, size_t size, const char *dir)
{
	int n = snprintf(out, size, "tls-creds-psk,id=" TLS_CREDS_ID ",endpoint=server,priority=%s,dir=",
			 TLS_PRIORITY);
	size_t o = (size_t)n;
	if (n < 0 || o >= size)
		return false;
	for (const char *p = dir; *p; p++) {
		if (o + 3 > size)
			return false; /* room for this character doubled and the NUL */
		out[o++] = *p;
		if (*p == ',')
			out[o++] = ',';
	}
	out[o] = '\0';
	return true;
}

int bw_nbd_spawn(const struct bw_nbd_opts *o, struct bw_nbd *n, char *err, size_t errsize)
{
	char export[300], shared[32], bind[96], port[32];
	const char *address = o->bind_address ? o->bind_address : "127.0.0.1";
	if (o->export_name == NULL || o->image == NULL || o->qemu_nbd == NULL) {
		snprintf(err, errsize, "qemu-nbd needs a program, an image and an export name");
		return BW_EINVAL;
	}
	if (access(o->image, F_OK) != 0) {
		snprintf(err, errsize, "%s: %s (a server is never started before its image)",
			 o->image, strerror(errno));
		return BW_ENOENT;
	}
	snprintf(export, sizeof(export), "--export-name=%s", o->export_name);
	snprintf(shared, sizeof(shared), "--shared=%d", o->shared);
	snprintf(bind, sizeof(bind), "--bind=%s", address);
	snprintf(port, sizeof(port), "--port=%d", o->port);
	char tls_object[4200 * 2];
	if (o->tls_dir && !tls_creds_object(tls_object, sizeof(tls_object), o->tls_dir)) {
		snprintf(err, errsize, "the key directory's path is too long");
		return BW_EINVAL;
	}
	const char *argv[16] = {o->qemu_nbd,
				"--format=qcow2",
				export,
				"--persistent",
				shared,
				bind,
				port,
				"--discard=unmap",
				"--detect-zeroes=unmap"};
	size_t argc = 9;
	if (o->tls_dir) {
		argv[argc++] = "--object";
		argv[argc++] = tls_object;
		argv[argc++] = "--tls-creds=" TLS_CREDS_ID;
	}
	argv[argc++] = o->image;
	argv[argc] = NULL;
	struct bw_spawn s = {argv, nbd_env, o->log_path, true};

	memset(n, 0, sizeof(*n));
	n->pidfd = -1;
	n->probe_fd = -1;
	n->port = o->port;
	snprintf(n->bind_address, sizeof(n->bind_address), "%s", address);
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

/* Not our child (adopted): its exit status is not ours to read, but qemu-nbd writes every
 * error to its log, and a SIGTERM exit writes nothing. */
static bool log_grew(const struct bw_nbd *n)
{
	struct stat st;
	return stat(n->log_path, &st) == 0 && st.st_size > n->log_size;
}

static bool exited_cleanly(const struct bw_nbd *n)
{
	if (n->status == -1)
		return !log_grew(n);
	return WIFEXITED(n->status) && WEXITSTATUS(n->status) == 0;
}

static void probe_close(struct bw_nbd *n)
{
	if (n->probe_fd >= 0)
		close(n->probe_fd);
	n->probe_fd = -1;
	n->probe_got = 0;
}

/* Starts a non-blocking connect to the server's port. */
static int probe_connect(struct bw_nbd *n)
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
		/* a server bound to the wildcard address is probed on loopback */
		if (in4->sin_addr.s_addr == htonl(INADDR_ANY))
			in4->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	} else if (inet_pton(AF_INET6, n->bind_address, &in6->sin6_addr) == 1) {
		in6->sin6_family = AF_INET6;
		in6->sin6_port = htons((uint16_t)n->port);
		len = sizeof(*in6);
		if (IN6_IS_ADDR_UNSPECIFIED(&in6->sin6_addr))
			in6->sin6_addr = in6addr_loopback;
	} else {
		return BW_EINVAL;
	}
	int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return BW_EBUSY;
	if (connect(fd, (struct sockaddr *)&ss, len) != 0 && errno != EINPROGRESS) {
		close(fd);
		return BW_EBUSY; /* refused: not listening yet */
	}
	n->probe_fd = fd;
	n->probe_got = 0;
	return 0;
}

/* Advances the probe without waiting; 0 when the whole greeting was read. */
static int probe(struct bw_nbd *n)
{
	if (n->probe_fd < 0) {
		int rc = probe_connect(n);
		if (rc != 0)
			return rc;
	}
	for (;;) {
		ssize_t r = read(n->probe_fd, n->probe_buf + n->probe_got,
				 GREETING_LEN - n->probe_got);
		if (r > 0) {
			n->probe_got += (size_t)r;
			if (n->probe_got == GREETING_LEN)
				break;
			continue;
		}
		if (r < 0 && (errno == EAGAIN || errno == EINPROGRESS || errno == ENOTCONN))
			return BW_EBUSY; /* connecting, or the greeting is on its way */
		probe_close(n);  /* refused or closed: try again next time */
		return BW_EBUSY;
	}
	bool ok = memcmp(n->probe_buf, "NBDMAGIC", 8) == 0 &&
		  memcmp(n->probe_buf + 8, "IHAVEOPT", 8) == 0;
	if (ok) {
		/* End the handshake as a client should: our flags, then NBD_OPT_ABORT. */
		unsigned char bye[20];
		uint32_t flags = htonl((uint32_t)(n->probe_buf[17] & 3));
		uint32_t opt = htonl(NBD_OPT_ABORT), zero = 0;
		memcpy(bye, &flags, 4);
		memcpy(bye + 4, "IHAVEOPT", 8);
		memcpy(bye + 12, &opt, 4);
		memcpy(bye + 16, &zero, 4);
		ssize_t w = write(n->probe_fd, bye, sizeof(bye));
		(void)w;
		/* No TIME_WAIT left behind: it would hold a local port that may be the port of
		 * a server yet to start when nbd ports lie in the ephemeral range. */
		struct linger lg = {1, 0};
		setsockopt(n->probe_fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	}
	probe_close(n);
	return ok ? 0 : BW_EBUSY;
}

int bw_nbd_poll_ready(struct bw_nbd *n, char *err, size_t errsize)
{
	if (n->ready)
		return 0;
	if (bw_nbd_reap(n)) {
		char tail[600] = "";
		bool in_use = bw_log_tail(n->log_path, 500, tail, sizeof(tail)) == 0 &&
			      strstr(tail, "Address already in use") != NULL;
		probe_close(n);
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
	int64_t deadline = bw_clock_mono_ms() + timeout_ms;
	int delay_us = 500;
	for (;;) {
		int rc = bw_nbd_poll_ready(n, err, errsize);
		if (rc != BW_EBUSY)
			return rc;
		if (bw_clock_mono_ms() >= deadline) {
			snprintf(err, errsize, "qemu-nbd pid %ld port %d: no NBD greeting after %d ms",
				 (long)n->pid, n->port, timeout_ms);
			return BW_ETIMEDOUT;
		}
		usleep((useconds_t)delay_us);
		if (delay_us < 4000)
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

int bw_nbd_stop_step(struct bw_nbd *n, enum bw_nbd_stop_mode mode, int timeout_ms, char *err,
		     size_t errsize)
{
	int64_t now = bw_clock_mono_ms();
	if (!n->stopping) {
		n->stopping = true;
		n->stop_start_ms = now;
		n->stop_term_ms = 0;
		n->stop_killed = false;
	}
	int64_t elapsed = now - n->stop_start_ms;
	if (!bw_nbd_reap(n)) {
		/* A server that has not greeted yet may lose SIGTERM: give it half the time to
		 * greet (after that the re-sent SIGTERM below still ends it). */
		if (!n->ready && elapsed < timeout_ms / 2 && bw_nbd_poll_ready(n, err, errsize) != 0)
			return BW_EBUSY;
		probe_close(n);
		if (mode == BW_NBD_DISCARD && !n->stop_killed &&
		    (elapsed >= DISCARD_GRACE_MS || elapsed >= timeout_ms)) {
			signal_server(n, SIGKILL);
			n->stop_killed = true;
		} else if (elapsed >= timeout_ms && mode == BW_NBD_KEEP) {
			snprintf(err, errsize,
				 "qemu-nbd pid %ld port %d still running %d ms after SIGTERM "
				 "(not killed: its image holds data to keep)",
				 (long)n->pid, n->port, timeout_ms);
			n->stopping = false;
			return BW_ETIMEDOUT;
		} else if (!n->stop_killed && now - n->stop_term_ms >= TERM_RESEND_MS) {
			signal_server(n, SIGTERM);
			n->stop_term_ms = now;
		}
		return BW_EBUSY;
	}
	probe_close(n);
	n->stopping = false;
	if (n->stop_killed || !exited_cleanly(n)) {
		death_text(n, err, errsize);
		return n->stop_killed && mode == BW_NBD_DISCARD ? 0 : BW_ECHILD;
	}
	return 0;
}

int bw_nbd_stop(struct bw_nbd *n, enum bw_nbd_stop_mode mode, int timeout_ms, char *err,
		size_t errsize)
{
	int rc;
	while ((rc = bw_nbd_stop_step(n, mode, timeout_ms, err, errsize)) == BW_EBUSY)
		usleep(1000);
	return rc;
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
	n->probe_fd = -1;
	n->pid = pid;
	n->start_time = start_time;
	struct stat st;
	n->log_size = log_path && stat(log_path, &st) == 0 ? st.st_size : 0;
	n->port = port;
	n->ready = true; /* it served before: its main loop runs */
	n->adopted = true;
	n->pidfd = fd;
	snprintf(n->bind_address, sizeof(n->bind_address), "127.0.0.1");
	snprintf(n->log_path, sizeof(n->log_path), "%s", log_path ? log_path : "/dev/null");
	return 0;
}

int bw_nbd_find(const char *export_name, pid_t *pid, uint64_t *start_time)
{
	char want[300], path[64], cmd[8192];
	int found = BW_ENOENT;
	snprintf(want, sizeof(want), "--export-name=%s", export_name);
	DIR *d = opendir("/proc");
	if (d == NULL)
		return BW_EIO;
	struct dirent *e;
	while (found != 0 && (e = readdir(d)) != NULL) {
		char *end;
		long p = strtol(e->d_name, &end, 10);
		if (*end != '\0' || p <= 0)
			continue;
		snprintf(path, sizeof(path), "/proc/%ld/cmdline", p);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		ssize_t n = read(fd, cmd, sizeof(cmd) - 1);
		close(fd);
		if (n <= 0)
			continue;
		cmd[n] = '\0';
		const char *base = strrchr(cmd, '/');
		if (strcmp(base ? base + 1 : cmd, "qemu-nbd") != 0)
			continue;
		for (const char *a = cmd; a < cmd + n; a += strlen(a) + 1) {
			if (strcmp(a, want) == 0 && bw_proc_start_time((pid_t)p, start_time) == 0) {
				*pid = (pid_t)p;
				found = 0;
				break;
			}
		}
	}
	closedir(d);
	return found;
}

void bw_nbd_release(struct bw_nbd *n)
{
	if (n->pidfd >= 0)
		close(n->pidfd);
	n->pidfd = -1;
	probe_close(n);
}

void bw_nbd_init(struct bw_nbd *n)
{
	memset(n, 0, sizeof(*n));
	n->probe_fd = -1;
	n->pidfd = -1;
}

void bw_nbd_mark_gone(struct bw_nbd *n, pid_t pid, const char *log_path)
{
	struct stat st;
	bw_nbd_init(n);
	n->pid = pid;
	n->exited = true;
	n->status = -1;
	n->ready = true;
	snprintf(n->log_path, sizeof(n->log_path), "%s", log_path);
	n->log_size = stat(log_path, &st) == 0 ? st.st_size : 0;
}

int bw_nbd_log_path(char *out, size_t size, const char *state_dir, const char *job_id,
		    int64_t key)
{
	int len = snprintf(out, size, "%s/logs/%s-%" PRId64 ".log", state_dir, job_id, key);
	return len < 0 || (size_t)len >= size ? BW_ERANGE : 0;
}
