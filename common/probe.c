/* probe.c: a non-blocking "does this broker node answer?" before the blocking login. */
#include "probe.h"

#include "clock.h"
#include "error.h"

#include <assert.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* AMQP 0-9-1's protocol header: a broker answers it with Connection.Start. */
static const char AMQP_HEADER[8] = {'A', 'M', 'Q', 'P', 0, 0, 9, 1};

static void close_fd(struct bw_probe *p)
{
	if (p->fd >= 0)
		close(p->fd);
	p->fd = -1;
	p->sent = false;
}

/*
 * Starts a connect to the next address that takes one. Returns 0 (p->fd in progress), or
 * -1 when no address is left (*errnum: why the last one failed).
 */
static int connect_next(struct bw_probe *p, int *errnum)
{
	close_fd(p);
	while (p->next) {
		struct addrinfo *a = p->next;
		p->next = a->ai_next;
		int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
				a->ai_protocol);
		if (fd < 0) {
			*errnum = errno;
			continue;
		}
		if (connect(fd, a->ai_addr, a->ai_addrlen) == 0 || errno == EINPROGRESS) {
			p->fd = fd;
			return 0;
		}
		*errnum = errno;
		close(fd);
	}
	return -1;
}

int bw_probe_start(struct bw_probe *p, const char *host, int port, int timeout_ms, char *err,
		   size_t errsize)
{
	char service[16];
	struct addrinfo hints = {
	    .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
	*p = (struct bw_probe){
	    .fd = -1, .timeout_ms = timeout_ms, .deadline_ms = bw_clock_mono_ms() + timeout_ms};
	snprintf(service, sizeof(service), "%d", port);
	int st = getaddrinfo(host, service, &hints, &p->addrs);
	if (st != 0) {
		p->addrs = NULL;
		if (st == EAI_MEMORY)
			return BW_ENOMEM;
		snprintf(err, errsize, "resolve %s: %s", host, gai_strerror(st));
		return BW_EAMQP;
	}
	p->next = p->addrs;
	int errnum = 0;
	if (connect_next(p, &errnum) != 0) {
		snprintf(err, errsize, "connect: %s", strerror(errnum));
		bw_probe_stop(p);
		return BW_EAMQP;
	}
	return 0;
}

int bw_probe_step(struct bw_probe *p, char *err, size_t errsize)
{
	assert(p->fd >= 0); /* a probe that ended is not stepped again */
	while (p->fd >= 0) {
		struct pollfd pfd = {p->fd, bw_probe_events(p), 0};
		int n = poll(&pfd, 1, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break; /* nothing yet (a failed poll: the deadline decides) */
		if (p->sent) {
			/*
			 * Only bytes answer: a close or a reset before them is no broker (a
			 * proxy or a firewall that resets now may swallow the next connection,
			 * and the blocking login would wait on it).
			 */
			char b;
			ssize_t got = recv(p->fd, &b, 1, MSG_DONTWAIT);
			if (got == 1)
				return 0;
			if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
				continue;
			snprintf(err, errsize, "the node closed the connection without answering%s%s",
				 got < 0 ? ": " : "", got < 0 ? strerror(errno) : "");
			close_fd(p);
			return BW_EAMQP;
		}
		int errnum = 0;
		socklen_t len = sizeof(errnum);
		if (getsockopt(p->fd, SOL_SOCKET, SO_ERROR, &errnum, &len) != 0)
			errnum = errno;
		if (errnum != 0) {
			if (connect_next(p, &errnum) != 0) {
				snprintf(err, errsize, "connect: %s", strerror(errnum));
				return BW_EAMQP;
			}
			continue;
		}
		/* 8 bytes into a fresh socket's buffer; a reset already is an answer */
		if (send(p->fd, AMQP_HEADER, sizeof(AMQP_HEADER), MSG_NOSIGNAL) < 0 &&
		    errno != ECONNRESET && errno != EPIPE) {
			snprintf(err, errsize, "send: %s", strerror(errno));
			return BW_EAMQP;
		}
		p->sent = true;
	}
	if (bw_probe_timeout_ms(p) > 0)
		return BW_EBUSY;
	if (p->sent)
		snprintf(err, errsize,
			 "no answer to the AMQP header in %d ms (the node takes connections but "
			 "says nothing: frozen, overloaded or cut off)",
			 p->timeout_ms);
	else
		snprintf(err, errsize, "connect: no answer in %d ms", p->timeout_ms);
	close_fd(p);
	return BW_EAMQP;
}

int bw_probe_fd(const struct bw_probe *p)
{
	return p->fd;
}

short bw_probe_events(const struct bw_probe *p)
{
	return p->sent ? POLLIN : POLLOUT;
}

int bw_probe_timeout_ms(const struct bw_probe *p)
{
	int64_t left = p->deadline_ms - bw_clock_mono_ms();
	if (left <= 0)
		return 0;
	return left < INT32_MAX ? (int)left : INT32_MAX;
}

void bw_probe_stop(struct bw_probe *p)
{
	close_fd(p);
	if (p->addrs)
		freeaddrinfo(p->addrs);
	p->addrs = NULL;
	p->next = NULL;
}
