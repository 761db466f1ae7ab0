/* bench_rabbit.c: bare librabbitmq-c as its examples use it, the benches' peer for bw. */
#include "bench_rabbit.h"

#include <amqp_tcp_socket.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

int bench_rabbit_ok(amqp_rpc_reply_t r, const char *what)
{
	switch (r.reply_type) {
	case AMQP_RESPONSE_NORMAL:
		return 0;
	case AMQP_RESPONSE_NONE:
		bench_fail("%s: no reply", what);
		return -1;
	case AMQP_RESPONSE_LIBRARY_EXCEPTION:
		bench_fail("%s: %s", what, amqp_error_string2(r.library_error));
		return -1;
	case AMQP_RESPONSE_SERVER_EXCEPTION:
		break;
	}
	if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
		amqp_connection_close_t *m = r.reply.decoded;
		bench_fail("%s: connection closed: %u %.*s", what, m->reply_code,
			   (int)m->reply_text.len, (const char *)m->reply_text.bytes);
	} else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
		amqp_channel_close_t *m = r.reply.decoded;
		bench_fail("%s: channel closed: %u %.*s", what, m->reply_code,
			   (int)m->reply_text.len, (const char *)m->reply_text.bytes);
	} else {
		bench_fail("%s: unexpected server method 0x%08x", what, r.reply.id);
	}
	return -1;
}

amqp_connection_state_t bench_rabbit_connect(const char *url)
{
	struct amqp_connection_info info;
	amqp_connection_state_t conn = NULL;
	char *u = strdup(url);

	if (u == NULL || amqp_parse_url(u, &info) != AMQP_STATUS_OK) {
		bench_fail("not an AMQP URL: %s", url);
		goto err;
	}
	conn = amqp_new_connection();
	amqp_socket_t *sock = conn ? amqp_tcp_socket_new(conn) : NULL;
	if (sock == NULL) {
		bench_fail("out of memory");
		goto err;
	}
	struct timeval tv = {BENCH_RABBIT_TIMEOUT_MS / 1000, 0};
	int st = amqp_socket_open_noblock(sock, info.host, info.port, &tv);
	if (st != AMQP_STATUS_OK) {
		bench_fail("connect %s:%d: %s", info.host, info.port, amqp_error_string2(st));
		goto err;
	}
	amqp_set_rpc_timeout(conn, &tv);
	if (bench_rabbit_ok(amqp_login(conn, info.vhost, 0, BENCH_RABBIT_FRAME_MAX,
				       BENCH_RABBIT_HEARTBEAT_S, AMQP_SASL_METHOD_PLAIN, info.user,
				       info.password),
			    "login") != 0)
		goto err;
	amqp_channel_open(conn, BENCH_RABBIT_CHANNEL);
	if (bench_rabbit_ok(amqp_get_rpc_reply(conn), "channel.open") != 0)
		goto err;
	free(u);
	return conn;
err:
	if (conn)
		amqp_destroy_connection(conn);
	free(u);
	return NULL;
}

void bench_rabbit_close(amqp_connection_state_t conn)
{
	if (conn == NULL)
		return;
	amqp_channel_close(conn, BENCH_RABBIT_CHANNEL, AMQP_REPLY_SUCCESS);
	amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
	amqp_destroy_connection(conn);
}
