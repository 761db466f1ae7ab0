/* http.c: the listener of http.h: our own listening socket, libmicrohttpd on it in external epoll mode, GET only. */
#include "http.h"

#include "log.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* Scrapers and probes: a handful at once is plenty; more wait in the backlog. */
#define MAX_CONNECTIONS 16
#define LISTEN_BACKLOG 16
/* An idle or stalled client is dropped after this (seconds): it holds a connection slot. */
#define IDLE_TIMEOUT_S 10

struct bw_http {
	struct MHD_Daemon *d;
	int listen_fd; /* ours until the daemon runs; the daemon closes it then */
	bw_http_handler_cb cb;
	void *arg;
	char address[INET6_ADDRSTRLEN + 16];
};

/* libmicrohttpd's own complaints (a client that went away...): debug lines. */
static void mhd_log(void *cls, const char *fmt, va_list ap)
{
	(void)cls;
	char line[512];
	vsnprintf(line, sizeof(line), fmt, ap);
	size_t n = strlen(line);
	while (n > 0 && line[n - 1] == '\n')
		line[--n] = '\0';
	bw_log_debug("http: %s", line);
}

static enum MHD_Result queue(struct MHD_Connection *conn, int status, const char *content_type,
			     struct bw_buf *body, const char *allow)
{
	char *data = NULL;
	if (bw_buf_steal(body, &data) != 0)
		return MHD_NO; /* out of memory: the connection is closed */
	struct MHD_Response *r =
		MHD_create_response_from_buffer(strlen(data), data, MHD_RESPMEM_MUST_FREE);
	if (r == NULL) {
		free(data);
		return MHD_NO;
	}
	MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
	MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
	if (allow)
		MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, allow);
	enum MHD_Result rc = MHD_queue_response(conn, (unsigned)status, r);
	MHD_destroy_response(r);
	return rc;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
				  const char *method, const char *version, const char *upload,
				  size_t *upload_size, void **state)
{
	struct bw_http *h = cls;
	(void)version;
	(void)upload;
	(void)upload_size;
	(void)state;
	if (strcmp(method, MHD_HTTP_METHOD_GET) != 0) {
		struct bw_buf b = BW_BUF_INIT;
		bw_buf_puts(&b, "method not allowed: only GET\n");
		return queue(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", &b, "GET");
	}
	struct bw_http_reply reply = {200, "text/plain; charset=utf-8", BW_BUF_INIT};
	h->cb(h->arg, url, &reply);
	return queue(conn, reply.status, reply.content_type, &reply.body, NULL);
}

/* Splits "host:port" / "[v6]:port" into host[hsize] and port[psize]. */
static int split(const char *spec, char *host, size_t hsize, char *port, size_t psize)
{
	const char *colon = strrchr(spec, ':');
	if (colon == NULL || colon == spec)
		return BW_ECONFIG;
	const char *h = spec;
	size_t hn = (size_t)(colon - spec);
	if (h[0] == '[' && hn >= 2 && h[hn - 1] == ']') {
		h++;
		hn -= 2;
	}
	if (hn >= hsize || strlen(colon + 1) >= psize)
		return BW_ECONFIG;
	memcpy(host, h, hn);
	host[hn] = '\0';
	snprintf(port, psize, "%s", colon + 1);
	return 0;
}

/* Binds and listens on the first address of listen that takes it; the fd in *fd. */
static int bind_listen(const char *spec, int *fd, char *address, size_t asize, char *err,
		       size_t errsize)
{
	char host[300], port[16];
	if (split(spec, host, sizeof(host), port, sizeof(port)) != 0) {
		snprintf(err, errsize, "%s: not host:port", spec);
		return BW_ECONFIG;
	}
	struct addrinfo hints = {.ai_flags = AI_PASSIVE | AI_NUMERICSERV,
				 .ai_family = AF_UNSPEC,
				 .ai_socktype = SOCK_STREAM};
	struct addrinfo *res = NULL;
	int gai = getaddrinfo(host, port, &hints, &res);
	if (gai != 0) {
		snprintf(err, errsize, "%s: %s", spec, gai_strerror(gai));
		return BW_ECONFIG;
	}
	int rc = BW_ECONFIG, saved = 0;
	for (struct addrinfo *a = res; a; a = a->ai_next) {
		int s = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
		if (s < 0) {
			saved = errno;
			rc = BW_ESYS;
			continue;
		}
		int one = 1;
		setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(s, a->ai_addr, a->ai_addrlen) != 0 || listen(s, LISTEN_BACKLOG) != 0) {
			saved = errno;
			rc = saved == EADDRINUSE ? BW_EADDRINUSE : BW_ECONFIG;
			close(s);
			continue;
		}
		struct sockaddr_storage ss;
		socklen_t sl = sizeof(ss);
		char ip[INET6_ADDRSTRLEN] = "?";
		int bound = 0;
		if (getsockname(s, (struct sockaddr *)&ss, &sl) == 0) {
			if (ss.ss_family == AF_INET6) {
				const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)&ss;
				inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof(ip));
				bound = ntohs(s6->sin6_port);
				snprintf(address, asize, "[%s]:%d", ip, bound);
			} else {
				const struct sockaddr_in *s4 = (const struct sockaddr_in *)&ss;
				inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof(ip));
				bound = ntohs(s4->sin_port);
				snprintf(address, asize, "%s:%d", ip, bound);
			}
		}
		*fd = s;
		rc = 0;
		break;
	}
	freeaddrinfo(res);
	if (rc != 0)
		snprintf(err, errsize, "cannot listen on %s: %s", spec,
			 saved ? strerror(saved) : "no address");
	return rc;
}

int bw_http_open(struct bw_http **out, const char *listen_at, bw_http_handler_cb cb, void *arg,
		 char *err, size_t errsize)
{
	struct bw_http *h = calloc(1, sizeof(*h));
	if (h == NULL) {
		snprintf(err, errsize, "out of memory");
		return BW_ENOMEM;
	}
	h->cb = cb;
	h->arg = arg;
	h->listen_fd = -1;
	int rc = bind_listen(listen_at, &h->listen_fd, h->address, sizeof(h->address), err, errsize);
	if (rc != 0) {
		free(h);
		return rc;
	}
	/* no MHD_USE_INTERNAL_POLLING_THREAD: the loop runs it (DESIGN decision 1) */
	h->d = MHD_start_daemon(MHD_USE_EPOLL | MHD_USE_ERROR_LOG, 0, NULL, NULL, on_request, h,
				MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL, /* first: it logs the rest */
				MHD_OPTION_LISTEN_SOCKET, (MHD_socket)h->listen_fd,
				MHD_OPTION_CONNECTION_LIMIT, (unsigned)MAX_CONNECTIONS,
				MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)IDLE_TIMEOUT_S, MHD_OPTION_END);
	if (h->d == NULL) {
		snprintf(err, errsize, "cannot serve %s: libmicrohttpd refused to start", listen_at);
		close(h->listen_fd);
		free(h);
		return BW_ESYS;
	}
	*out = h;
	return 0;
}

void bw_http_close(struct bw_http *h)
{
	if (h == NULL)
		return;
	MHD_stop_daemon(h->d); /* closes the listening socket it was given too */
	free(h);
}

const char *bw_http_address(const struct bw_http *h)
{
	return h->address;
}

int bw_http_fd(const struct bw_http *h)
{
	const union MHD_DaemonInfo *i = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_EPOLL_FD);
	return i ? i->epoll_fd : -1;
}

int bw_http_timeout_ms(struct bw_http *h)
{
	MHD_UNSIGNED_LONG_LONG t = 0;
	if (MHD_get_timeout(h->d, &t) != MHD_YES)
		return -1;
	return t > (MHD_UNSIGNED_LONG_LONG)INT32_MAX ? INT32_MAX : (int)t;
}

void bw_http_run(struct bw_http *h)
{
	MHD_run(h->d);
}
