/* amqp.c: connect, declare, consume and publish with confirms over librabbitmq-c 0.11, without long waits. */
#include "amqp.h"
#include "amqp_internal.h"
#include "text.h"

#include "clock.h"
#include "rand.h"

#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#define CHANNEL 1
#define FRAME_MAX 131072
/* Frames one bw_amqp_poll handles at most (8 MiB of body at FRAME_MAX): the loop's other
   work gets its turn while a large body streams in. */
#define POLL_FRAMES 64
/* Consumer tags of our own, so that a delivery says which consumer it came from. */
#define START_TAG "bw.start"
#define CONTROL_TAG "bw.control"
/* Cancels are small and rare: a few unacked at a time is plenty. */
#define CONTROL_PREFETCH 16
/* A control queue that cannot be made again (its exchange deleted: the broker closes the
 * channel, and with it the start consumer's) is retried this often, not at every poll. */
#define CONTROL_RETRY_MS 5000
/* Per-repository consumers: "bw.repo.<repository_id>"; one that cannot register (its queue
 * deleted) is retried this often, as the control consumer. */
#define REPO_TAG_PREFIX "bw.repo."
/* The header that carries a bw_amqp_publish_message's sequence number, for its return. */
#define SEQ_HEADER "x-bw-publish-seq"

const char bw_amqp_why_returned[] = "returned unroutable (no binding)";
const char bw_amqp_why_nacked[] = "nacked by the broker";

struct pending_publish {
	uint64_t seq;
	char *id;     /* message id matched by a return; NULL for a publish matched by seq */
	bool returned;
};

/* One consumer of bw_amqp_consume_repos. */
struct repo_consumer {
	char *queue;
	char *tag;
	bool consuming;
};

/*
 * The delivery whose frames are being read. 0-9-1 never interleaves other frames of a
 * channel with a message's content frames, so one per connection is enough. The body is
 * read frame by frame here rather than by amqp_consume_message, which mallocs the size
 * the broker declares before reading a byte and lets the channel's pool grow by every
 * frame of the message.
 */
struct inbound {
	enum { IN_NONE, IN_HEADER, IN_BODY } stage;
	enum bw_amqp_source source;
	uint64_t tag;
	bool redelivered;
	bool too_large;  /* over max_message_bytes: frames are hashed and dropped */
	uint64_t size;   /* declared by the content header */
	char *content_type; /* malloc'd; NULL: absent */
	char *message_id;
	uint64_t got;
	char *body;      /* malloc'd size + 1; NULL when too_large */
	uint64_t digest; /* FNV-1a 64 of what was dropped so far */
};

struct bw_amqp {
	amqp_connection_state_t conn;
	int timeout_ms;
	bool lost;
	bool blocked;
	uint64_t channel_epoch;
	/*
	 * Binds, qos and consumes are sent without waiting for their replies (a link's
	 * connections): a cluster that holds them (a quorum leader on a frozen node, a bind
	 * waiting for a frozen node's Mnesia) holds the broker's channel, never the caller. A
	 * failure comes back as a channel close, which bw_amqp_poll answers and reports.
	 */
	bool nowait;
	char closed_why[256];  /* the last channel close bw_amqp_poll answered; "" none */
	int64_t registered_ms; /* monotonic: bw_amqp_poll last registered consumers again */
	int64_t register_ms;   /* monotonic: consumers are registered again from then on */

	/* consumer */
	char *queue;
	int prefetch;
	bool consuming;
	size_t max_message_bytes; /* 0: no limit */
	struct inbound in;
	char *control_exchange;   /* bw_amqp_consume_control: NULL none */
	bool control_passive;     /* the exchange is only checked */
	bool control_consuming;
	int64_t control_retry_ms; /* monotonic: the next try after a failed one */
	struct repo_consumer *repos; /* bw_amqp_consume_repos */
	size_t n_repos;
	int64_t repo_retry_ms;

	/* publisher */
	bool confirms;
	uint64_t next_seq;
	struct pending_publish *pending;
	size_t n_pending, cap_pending;
};

static struct timeval tv_ms(int ms)
{
	struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
	return tv;
}

static void settle_all_failed(struct bw_amqp *c, bw_amqp_confirm_cb cb, void *arg,
			      const char *why);

/* Forgets a half-read delivery (its channel or connection is gone). */
static void inbound_reset(struct bw_amqp *c)
{
	free(c->in.body);
	free(c->in.content_type);
	free(c->in.message_id);
	memset(&c->in, 0, sizeof(c->in));
}

/*
 * The broker closed our channel: answer it, fail what was in flight, and open it again:
 * older delivery tags go stale, the consumer registers again on the next poll, confirm
 * mode is restored. Returns 0, or BW_EAMQP when the connection is no longer usable.
 */
static int reopen_channel(struct bw_amqp *c, bw_amqp_confirm_cb cb, void *arg)
{
	amqp_channel_close_ok_t ok;
	amqp_send_method(c->conn, CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
	settle_all_failed(c, cb, arg, "channel closed");
	inbound_reset(c);
	c->channel_epoch++;
	/* the consumers come back at once, unless the poll's last registration was a moment
	   ago: this close is likely its failure (a queue deleted), which would come back at
	   every poll */
	int64_t now = bw_clock_mono_ms();
	c->register_ms = c->registered_ms && now - c->registered_ms < CONTROL_RETRY_MS
				 ? now + CONTROL_RETRY_MS
				 : 0;
	c->consuming = false;
	c->control_consuming = false; /* its auto-delete queue went with the channel */
	for (size_t i = 0; i < c->n_repos; i++)
		c->repos[i].consuming = false;
	amqp_channel_open(c->conn, CHANNEL);
	bool ok_open = amqp_get_rpc_reply(c->conn).reply_type == AMQP_RESPONSE_NORMAL;
	if (ok_open && c->confirms) {
		amqp_confirm_select(c->conn, CHANNEL);
		ok_open = amqp_get_rpc_reply(c->conn).reply_type == AMQP_RESPONSE_NORMAL;
		c->next_seq = 1;
	}
	if (!ok_open)
		c->lost = true;
	return ok_open ? 0 : BW_EAMQP;
}

/* The broker closed the connection: answer it and fail what was in flight. */
static void connection_closed(struct bw_amqp *c, bw_amqp_confirm_cb cb, void *arg)
{
	amqp_connection_close_ok_t ok;
	amqp_send_method(c->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
	c->lost = true;
	inbound_reset(c);
	settle_all_failed(c, cb, arg, "connection closed");
}

/* Turns a reply into text; returns 0 for a normal reply, else BW_EAMQP/BW_ECONFIG. */
static int reply_err(struct bw_amqp *c, amqp_rpc_reply_t r, const char *what, char *err,
		     size_t errsize)
{
	switch (r.reply_type) {
	case AMQP_RESPONSE_NORMAL:
		return 0;
	case AMQP_RESPONSE_NONE:
		snprintf(err, errsize, "%s: no reply (missing RPC reply type)", what);
		return BW_EAMQP;
	case AMQP_RESPONSE_LIBRARY_EXCEPTION:
		snprintf(err, errsize, "%s: %s", what, amqp_error_string2(r.library_error));
		if (r.library_error != AMQP_STATUS_TIMEOUT)
			c->lost = true;
		return r.library_error == AMQP_STATUS_SSL_CONNECTION_FAILED ||
				       r.library_error == AMQP_STATUS_SSL_PEER_VERIFY_FAILED ||
				       r.library_error == AMQP_STATUS_SSL_HOSTNAME_VERIFY_FAILED
			       ? BW_ECONFIG
			       : BW_EAMQP;
	case AMQP_RESPONSE_SERVER_EXCEPTION:
		break;
	}
	if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
		amqp_connection_close_t *m = r.reply.decoded;
		snprintf(err, errsize, "%s: connection closed by the broker: %u %.*s", what,
			 m->reply_code, (int)m->reply_text.len, (const char *)m->reply_text.bytes);
		connection_closed(c, NULL, NULL);
		return m->reply_code == AMQP_ACCESS_REFUSED || m->reply_code == AMQP_NOT_ALLOWED
			       ? BW_ECONFIG
			       : BW_EAMQP;
	}
	if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
		amqp_channel_close_t *m = r.reply.decoded;
		snprintf(err, errsize, "%s: %u %.*s", what, m->reply_code, (int)m->reply_text.len,
			 (const char *)m->reply_text.bytes);
		(void)reopen_channel(c, NULL, NULL); /* keeps the connection usable */
		return m->reply_code == AMQP_PRECONDITION_FAILED || m->reply_code == AMQP_NOT_FOUND ||
				       m->reply_code == AMQP_ACCESS_REFUSED
			       ? BW_ECONFIG
			       : BW_EAMQP;
	}
	snprintf(err, errsize, "%s: unexpected server method 0x%08x", what, r.reply.id);
	c->lost = true;
	return BW_EAMQP;
}

/*
 * librabbitmq-c 0.11 gives the socket a bare SSL_CTX and only amqp_ssl_socket_set_cacert
 * fills its trust store, so without a CA file nothing could be verified. "The system's
 * CAs" is OpenSSL's default store, loaded the way openssl s_client and curl's OpenSSL
 * builds do: $SSL_CERT_FILE else X509_get_default_cert_file() (Debian:
 * /usr/lib/ssl/cert.pem -> /etc/ssl/certs/ca-certificates.crt), plus the hashed
 * directory $SSL_CERT_DIR else X509_get_default_cert_dir() (/usr/lib/ssl/certs). OpenSSL
 * resolves the paths itself; a missing file is no error (verification then fails and
 * connect_err names the store). The context is librabbitmq's own: we link the same libssl.
 */
static int trust_system_cas(amqp_socket_t *sock)
{
	return SSL_CTX_set_default_verify_paths(amqp_ssl_socket_get_context(sock)) == 1 ? 0
											: BW_ENOMEM;
}

/* " (verified against ...)": the CA file, or where OpenSSL's default store is read from. */
static void trust_text(char *buf, size_t size, const char *ca_file)
{
	if (ca_file) {
		snprintf(buf, size, " (verified against the CA file %s)", ca_file);
		return;
	}
	const char *file = getenv(X509_get_default_cert_file_env());
	const char *dir = getenv(X509_get_default_cert_dir_env());
	snprintf(buf, size, " (verified against the system's CAs: %s%s and %s%s)",
		 file ? "$SSL_CERT_FILE=" : "", file ? file : X509_get_default_cert_file(),
		 dir ? "$SSL_CERT_DIR=" : "", dir ? dir : X509_get_default_cert_dir());
}

/*
 * The next frame, taken without waiting from what is buffered or readable (which also
 * sends a due heartbeat): 1 with *f, 0 when there is none, BW_EAMQP when the connection
 * broke (c->lost set, err says how).
 */
static int next_frame(struct bw_amqp *c, amqp_frame_t *f, char *err, size_t errsize)
{
	struct timeval zero = {0, 0};
	int st = amqp_simple_wait_frame_noblock(c->conn, f, &zero);
	if (st == AMQP_STATUS_TIMEOUT)
		return 0;
	if (st != AMQP_STATUS_OK) {
		snprintf(err, errsize, "reading a frame: %s", amqp_error_string2(st));
		c->lost = true;
		return BW_EAMQP;
	}
	return 1;
}

/* A field table entry: key k with value v (borrowed). */
static amqp_table_entry_t entry(const char *k, amqp_field_value_t v)
{
	return (amqp_table_entry_t){amqp_cstring_bytes(k), v};
}

static amqp_field_value_t bool_value(bool b)
{
	return (amqp_field_value_t){.kind = AMQP_FIELD_KIND_BOOLEAN, .value.boolean = b};
}

static amqp_field_value_t str_value(const char *s)
{
	return (amqp_field_value_t){.kind = AMQP_FIELD_KIND_UTF8, .value.bytes = amqp_cstring_bytes(s)};
}

static amqp_field_value_t i64_value(int64_t i)
{
	return (amqp_field_value_t){.kind = AMQP_FIELD_KIND_I64, .value.i64 = i};
}

int bw_amqp_connect(struct bw_amqp **out, const struct bw_amqp_opts *o, char *err, size_t errsize)
{
	struct amqp_connection_info info;
	struct bw_amqp *c = NULL;
	char *url = strdup(o->url);
	int rc = BW_ENOMEM;

	if (url == NULL)
		goto out;
	if (amqp_parse_url(url, &info) != AMQP_STATUS_OK) {
		snprintf(err, errsize, "not an AMQP URL");
		rc = BW_ECONFIG;
		goto out;
	}
	c = calloc(1, sizeof(*c));
	if (c == NULL)
		goto out;
	c->timeout_ms = o->timeout_ms;
	c->conn = amqp_new_connection();
	if (c->conn == NULL)
		goto out;

	amqp_socket_t *sock = info.ssl ? amqp_ssl_socket_new(c->conn) : amqp_tcp_socket_new(c->conn);
	if (sock == NULL)
		goto out;
	if (info.ssl) {
		amqp_ssl_socket_set_verify_peer(sock, o->tls_verify_peer);
		amqp_ssl_socket_set_verify_hostname(sock, o->tls_verify_hostname);
		if (o->tls_ca_file && amqp_ssl_socket_set_cacert(sock, o->tls_ca_file)) {
			snprintf(err, errsize, "TLS CA file %s unusable", o->tls_ca_file);
			rc = BW_ECONFIG;
			goto out;
		}
		if (o->tls_ca_file == NULL && o->tls_verify_peer && trust_system_cas(sock) != 0)
			goto out; /* rc is BW_ENOMEM */
		if (o->tls_cert_file && o->tls_key_file &&
		    amqp_ssl_socket_set_key(sock, o->tls_cert_file, o->tls_key_file)) {
			snprintf(err, errsize, "TLS client certificate %s / key %s unusable",
				 o->tls_cert_file, o->tls_key_file);
			rc = BW_ECONFIG;
			goto out;
		}
	}
	struct timeval tv = tv_ms(o->timeout_ms);
	int st = amqp_socket_open_noblock(sock, info.host, info.port, &tv);
	if (st != AMQP_STATUS_OK) {
		char store[600] = "";
		if (st == AMQP_STATUS_SSL_PEER_VERIFY_FAILED)
			trust_text(store, sizeof(store), o->tls_ca_file);
		snprintf(err, errsize, "connect %s:%d: %s%s", info.host, info.port,
			 amqp_error_string2(st), store);
		rc = st == AMQP_STATUS_SSL_PEER_VERIFY_FAILED ||
				     st == AMQP_STATUS_SSL_HOSTNAME_VERIFY_FAILED ||
				     st == AMQP_STATUS_SSL_CONNECTION_FAILED
			     ? BW_ECONFIG
			     : BW_EAMQP;
		goto out;
	}
	amqp_set_handshake_timeout(c->conn, &tv);
	amqp_set_rpc_timeout(c->conn, &tv);

	amqp_table_entry_t caps[] = {
		entry("consumer_cancel_notify", bool_value(true)),
		entry("connection.blocked", bool_value(true)),
		entry("publisher_confirms", bool_value(true)),
		entry("basic.nack", bool_value(true)),
		entry("authentication_failure_close", bool_value(true)),
	};
	amqp_table_entry_t props[3] = {entry("product", str_value("bw")),
				       entry("connection_name", str_value(o->name ? o->name : "bw"))};
	props[2].key = amqp_cstring_bytes("capabilities");
	props[2].value.kind = AMQP_FIELD_KIND_TABLE;
	props[2].value.value.table.num_entries = (int)(sizeof(caps) / sizeof(caps[0]));
	props[2].value.value.table.entries = caps;
	amqp_table_t table = {3, props};

	amqp_rpc_reply_t r =
		amqp_login_with_properties(c->conn, info.vhost, 0, FRAME_MAX, o->heartbeat_s, &table,
					   AMQP_SASL_METHOD_PLAIN, info.user, info.password);
	if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
	    r.library_error == AMQP_STATUS_CONNECTION_CLOSED) {
		/* RabbitMQ closes the socket on bad credentials; so does a reset mid-login */
		snprintf(err, errsize,
			 "login as %s refused (or vhost %s unknown; or the connection was reset "
			 "during the login)",
			 info.user, info.vhost);
		rc = BW_ECONFIG;
		goto out;
	}
	if ((rc = reply_err(c, r, "login", err, errsize)) != 0)
		goto out;
	amqp_channel_open(c->conn, CHANNEL);
	if ((rc = reply_err(c, amqp_get_rpc_reply(c->conn), "channel.open", err, errsize)) != 0)
		goto out;
	c->next_seq = 1;
	/*
	 * Each connection's epochs start at random, so that a delivery of another connection
	 * (the one before a reconnect or a move to another node, or any other) never matches
	 * this one's: its tag would name another message here, or close the channel.
	 */
	c->channel_epoch = bw_rand_below_incl(UINT64_MAX);
	*out = c;
	c = NULL;
	rc = 0;
out:
	if (c) {
		if (c->conn)
			amqp_destroy_connection(c->conn);
		free(c);
	}
	if (url)
		explicit_bzero(url, strlen(o->url)); /* it holds the broker's password */
	free(url);
	return rc;
}

void bw_amqp_close(struct bw_amqp *c)
{
	if (c == NULL)
		return;
	if (!c->lost) {
		struct timeval tv = tv_ms(c->timeout_ms < 2000 ? c->timeout_ms : 2000);
		amqp_set_rpc_timeout(c->conn, &tv);
		amqp_connection_close(c->conn, AMQP_REPLY_SUCCESS);
	}
	amqp_destroy_connection(c->conn);
	for (size_t i = 0; i < c->n_pending; i++)
		free(c->pending[i].id);
	free(c->pending);
	free(c->queue);
	free(c->control_exchange);
	inbound_reset(c);
	for (size_t i = 0; i < c->n_repos; i++) {
		free(c->repos[i].queue);
		free(c->repos[i].tag);
	}
	free(c->repos);
	free(c);
}

int bw_amqp_fd(const struct bw_amqp *c)
{
	return amqp_get_sockfd(c->conn);
}

bool bw_amqp_pending(const struct bw_amqp *c)
{
	return amqp_frames_enqueued(c->conn) || amqp_data_in_buffer(c->conn);
}

bool bw_amqp_blocked(const struct bw_amqp *c)
{
	return c->blocked;
}

/* ---- for amqp_admin.c only (amqp_internal.h) -------------------------------------------- */

amqp_connection_state_t bw__amqp_conn(struct bw_amqp *c)
{
	return c->conn;
}

int bw__amqp_reply(struct bw_amqp *c, amqp_rpc_reply_t r, const char *what, char *err,
		   size_t errsize)
{
	return reply_err(c, r, what, err, errsize);
}

/* ---- topology --------------------------------------------------------------------------- */

/* A method sent without waiting for a reply (c->nowait): 0, or BW_EAMQP when the socket
 * failed. */
static int send_nowait(struct bw_amqp *c, amqp_method_number_t id, void *m, const char *what,
		       char *err, size_t errsize)
{
	int st = amqp_send_method(c->conn, CHANNEL, id, m);
	if (st == AMQP_STATUS_OK)
		return 0;
	snprintf(err, errsize, "%s: %s", what, amqp_error_string2(st));
	c->lost = true;
	return BW_EAMQP;
}

/* Declares (passive: checks) exchange name; with nowait (and c->nowait) without waiting. */
static int exchange_declare(struct bw_amqp *c, const char *name, const char *type, bool passive,
			    bool nowait, char *err, size_t errsize)
{
	char what[300];
	snprintf(what, sizeof(what), "exchange %s (%s)", name, type);
	if (nowait && c->nowait) {
		amqp_exchange_declare_t m = {0, amqp_cstring_bytes(name), amqp_cstring_bytes(type),
					     passive, 1, 0, 0, 1, amqp_empty_table};
		return send_nowait(c, AMQP_EXCHANGE_DECLARE_METHOD, &m, what, err, errsize);
	}
	amqp_exchange_declare(c->conn, CHANNEL, amqp_cstring_bytes(name), amqp_cstring_bytes(type),
			      passive, 1, 0, 0, amqp_empty_table);
	return reply_err(c, amqp_get_rpc_reply(c->conn), what, err, errsize);
}

static int exchange(struct bw_amqp *c, const char *name, const char *type, bool passive, char *err,
		    size_t errsize)
{
	return exchange_declare(c, name, type, passive, false, err, errsize);
}

static int queue(struct bw_amqp *c, const char *name, amqp_table_t args, bool passive, char *err,
		 size_t errsize)
{
	char what[300];
	snprintf(what, sizeof(what), "queue %s", name);
	amqp_queue_declare(c->conn, CHANNEL, amqp_cstring_bytes(name), passive, 1, 0, 0, args);
	return reply_err(c, amqp_get_rpc_reply(c->conn), what, err, errsize);
}

static int bind_queue(struct bw_amqp *c, const char *q, const char *x, const char *key, char *err,
		size_t errsize)
{
	char what[600];
	snprintf(what, sizeof(what), "bind queue %s to %s/%s", q, x, key);
	if (c->nowait) {
		amqp_queue_bind_t m = {0,
				       amqp_cstring_bytes(q),
				       amqp_cstring_bytes(x),
				       amqp_cstring_bytes(key),
				       1,
				       amqp_empty_table};
		return send_nowait(c, AMQP_QUEUE_BIND_METHOD, &m, what, err, errsize);
	}
	amqp_queue_bind(c->conn, CHANNEL, amqp_cstring_bytes(q), amqp_cstring_bytes(x),
			amqp_cstring_bytes(key), amqp_empty_table);
	return reply_err(c, amqp_get_rpc_reply(c->conn), what, err, errsize);
}

int bw_amqp_repo_queue(char *buf, size_t size, const char *q, const char *repository_id)
{
	int n = snprintf(buf, size, "%s.repo.%s", q, repository_id);
	if (n < 0 || (size_t)n >= size || n > BW_AMQP_NAME_MAX)
		return BW_ERANGE;
	return 0;
}

/*
 * Placement (CONTRACT §2): one quorum queue per repository of this host, with the
 * arguments of backup.start (qargs: delivery limit, dead-lettering), bound to the jobs
 * exchange under its own name (bind: the binds, after every declare); passive: only
 * checked, a missing one named in err.
 */
static int repo_queues(struct bw_amqp *c, const struct bw_amqp_topology *t, amqp_table_t qargs,
		       bool bind, char *err, size_t errsize)
{
	char name[BW_AMQP_NAME_MAX + 1];
	int rc;
	for (size_t i = 0; i < t->n_repositories; i++) {
		if (bw_amqp_repo_queue(name, sizeof(name), t->queue, t->repositories[i]) != 0) {
			snprintf(err, errsize, "queue %s.repo.%s: name longer than %d bytes",
				 t->queue, t->repositories[i], BW_AMQP_NAME_MAX);
			return BW_ECONFIG;
		}
		rc = bind ? bind_queue(c, name, t->jobs_exchange, name, err, errsize)
			  : queue(c, name, t->passive ? amqp_empty_table : qargs, t->passive, err,
				  errsize);
		if (rc != 0)
			return rc;
	}
	return 0;
}

int bw_amqp_declare(struct bw_amqp *c, const struct bw_amqp_topology *t, char *err,
		    size_t errsize)
{
	amqp_table_entry_t qargs[] = {
		entry("x-queue-type", str_value("quorum")),
		entry("x-delivery-limit", i64_value(t->delivery_limit)),
		entry("x-dead-letter-exchange", str_value(t->dlx)),
		entry("x-dead-letter-strategy", str_value("at-least-once")),
		/* without reject-publish the broker silently falls back to at-most-once */
		entry("x-overflow", str_value("reject-publish")),
	};
	amqp_table_entry_t dargs[] = {entry("x-queue-type", str_value("quorum"))};
	amqp_table_t qtable = {(int)(sizeof(qargs) / sizeof(qargs[0])), qargs};
	amqp_table_t dtable = {1, dargs};
	int rc;

	if ((rc = exchange(c, t->jobs_exchange, "direct", t->passive, err, errsize)) != 0 ||
	    (rc = exchange(c, t->events_exchange, "topic", t->passive, err, errsize)) != 0 ||
	    (rc = exchange(c, t->dlx, "fanout", t->passive, err, errsize)) != 0 ||
	    (rc = queue(c, t->dlq, t->passive ? amqp_empty_table : dtable, t->passive, err,
			errsize)) != 0 ||
	    (rc = queue(c, t->queue, t->passive ? amqp_empty_table : qtable, t->passive, err,
			errsize)) != 0 ||
	    (rc = repo_queues(c, t, qtable, false, err, errsize)) != 0)
		return rc;
	if (t->passive)
		return 0;
	/* last: with c->nowait they are sent without waiting, and nothing after them waits */
	if ((rc = bind_queue(c, t->queue, t->jobs_exchange, "backup.start", err, errsize)) != 0 ||
	    (rc = bind_queue(c, t->dlq, t->dlx, "", err, errsize)) != 0 ||
	    (rc = repo_queues(c, t, qtable, true, err, errsize)) != 0)
		return rc;
	return 0;
}

/* ---- consuming -------------------------------------------------------------------------- */

/*
 * basic.qos (the prefetch of the consumers registered after it on the channel), then
 * basic.consume of queue under tag with manual acks; with c->nowait neither waits (basic.qos
 * has no nowait flag: its qos-ok comes later and the poll passes over it).
 */
static int qos_consume(struct bw_amqp *c, int prefetch, const char *queue, const char *tag,
		       bool exclusive, const char *what, char *err, size_t errsize)
{
	int rc;
	if (c->nowait) {
		amqp_basic_qos_t q = {0, (uint16_t)prefetch, 0};
		amqp_basic_consume_t m = {0,
					  amqp_cstring_bytes(queue),
					  amqp_cstring_bytes(tag),
					  0,
					  0,
					  exclusive,
					  1,
					  amqp_empty_table};
		if ((rc = send_nowait(c, AMQP_BASIC_QOS_METHOD, &q, "basic.qos", err, errsize)) != 0)
			return rc;
		return send_nowait(c, AMQP_BASIC_CONSUME_METHOD, &m, what, err, errsize);
	}
	amqp_basic_qos(c->conn, CHANNEL, 0, (uint16_t)prefetch, 0);
	if ((rc = reply_err(c, amqp_get_rpc_reply(c->conn), "basic.qos", err, errsize)) != 0)
		return rc;
	amqp_basic_consume(c->conn, CHANNEL, amqp_cstring_bytes(queue), amqp_cstring_bytes(tag), 0,
			   0, exclusive, amqp_empty_table);
	return reply_err(c, amqp_get_rpc_reply(c->conn), what, err, errsize);
}

static int start_consumer(struct bw_amqp *c, char *err, size_t errsize)
{
	int rc = qos_consume(c, c->prefetch, c->queue, START_TAG, false, "basic.consume", err,
			     errsize);
	c->consuming = rc == 0;
	return rc;
}

/* Registers the per-repository consumers that are not consuming (each with its own qos). */
static int start_repo_consumers(struct bw_amqp *c, char *err, size_t errsize)
{
	int rc;
	for (size_t i = 0; i < c->n_repos; i++) {
		struct repo_consumer *r = &c->repos[i];
		if (r->consuming)
			continue;
		char what[300];
		snprintf(what, sizeof(what), "basic.consume (%s)", r->queue);
		if ((rc = qos_consume(c, c->prefetch, r->queue, r->tag, false, what, err,
				      errsize)) != 0)
			return rc;
		r->consuming = true;
	}
	return 0;
}

int bw_amqp_consume_repos(struct bw_amqp *c, const struct bw_amqp_topology *t, int prefetch,
			  char *err, size_t errsize)
{
	if (c->n_repos > 0) /* registered already: the tags are taken */
		return start_repo_consumers(c, err, errsize);
	if (t->n_repositories == 0)
		return 0;
	c->repos = calloc(t->n_repositories, sizeof(*c->repos));
	if (c->repos == NULL)
		return BW_ENOMEM;
	for (size_t i = 0; i < t->n_repositories; i++) {
		struct repo_consumer *r = &c->repos[c->n_repos];
		char name[BW_AMQP_NAME_MAX + 1];
		if (bw_amqp_repo_queue(name, sizeof(name), t->queue, t->repositories[i]) != 0) {
			snprintf(err, errsize, "queue %s.repo.%s: name longer than %d bytes",
				 t->queue, t->repositories[i], BW_AMQP_NAME_MAX);
			return BW_ERANGE;
		}
		size_t tlen = strlen(REPO_TAG_PREFIX) + strlen(t->repositories[i]) + 1;
		r->queue = strdup(name);
		r->tag = malloc(tlen);
		if (r->queue == NULL || r->tag == NULL) {
			free(r->queue);
			free(r->tag);
			return BW_ENOMEM;
		}
		snprintf(r->tag, tlen, "%s%s", REPO_TAG_PREFIX, t->repositories[i]);
		c->n_repos++;
	}
	if (c->prefetch == 0)
		c->prefetch = prefetch;
	return start_repo_consumers(c, err, errsize);
}

int bw_amqp_consume(struct bw_amqp *c, const char *q, int prefetch, char *err, size_t errsize)
{
	free(c->queue);
	c->queue = strdup(q);
	if (c->queue == NULL)
		return BW_ENOMEM;
	c->prefetch = prefetch;
	return start_consumer(c, err, errsize);
}

/*
 * The control queue: exclusive and auto-delete, declared into name. Named by the server
 * when the reply is waited for; with c->nowait by us, "bw.control.<64 random bits>"
 * (random per declare: the queue of a connection the broker has not yet seen die would
 * lock a fixed name).
 */
static int control_queue(struct bw_amqp *c, char name[static 256], char *err, size_t errsize)
{
	char what[300];
	int rc;
	snprintf(what, sizeof(what), "own queue for %s", c->control_exchange);
	if (c->nowait) {
		snprintf(name, 256, "bw.control.%016" PRIx64, bw_rand_below_incl(UINT64_MAX));
		amqp_queue_declare_t m = {
			0, amqp_cstring_bytes(name), 0, 0, 1, 1, 1, amqp_empty_table};
		return send_nowait(c, AMQP_QUEUE_DECLARE_METHOD, &m, what, err, errsize);
	}
	amqp_queue_declare_ok_t *ok = amqp_queue_declare(c->conn, CHANNEL, amqp_empty_bytes, 0, 0,
							 1, 1, amqp_empty_table);
	if ((rc = reply_err(c, amqp_get_rpc_reply(c->conn), what, err, errsize)) != 0)
		return rc;
	if (ok == NULL || ok->queue.len == 0 || ok->queue.len > 255) {
		snprintf(err, errsize, "%s: no queue name in the reply", what);
		return BW_EAMQP;
	}
	memcpy(name, ok->queue.bytes, ok->queue.len);
	name[ok->queue.len] = '\0';
	return 0;
}

/*
 * The control consumer: the control exchange declared (or checked), a new exclusive,
 * auto-delete queue bound to it (fanout: the routing key is ignored), its own prefetch,
 * its own tag.
 */
static int start_control(struct bw_amqp *c, char *err, size_t errsize)
{
	char name[256];
	int rc;
	if ((rc = exchange_declare(c, c->control_exchange, "fanout", c->control_passive, true, err,
				   errsize)) != 0 ||
	    (rc = control_queue(c, name, err, errsize)) != 0 ||
	    (rc = bind_queue(c, name, c->control_exchange, "", err, errsize)) != 0)
		return rc;
	rc = qos_consume(c, CONTROL_PREFETCH, name, CONTROL_TAG, true, "basic.consume (control)",
			 err, errsize);
	c->control_consuming = rc == 0;
	return rc;
}

int bw_amqp_consume_control(struct bw_amqp *c, const char *exchange_name, bool passive,
			    char *err, size_t errsize)
{
	if (c->control_consuming && strcmp(c->control_exchange, exchange_name) == 0)
		return 0; /* its tag is taken: consuming it again would be a connection error */
	free(c->control_exchange);
	c->control_exchange = strdup(exchange_name);
	if (c->control_exchange == NULL)
		return BW_ENOMEM;
	c->control_passive = passive;
	return start_control(c, err, errsize);
}

/* basic.cancel of the consumer tag; with c->nowait without waiting for cancel-ok. */
static int cancel_consumer(struct bw_amqp *c, const char *tag, char *err, size_t errsize)
{
	if (c->nowait) {
		amqp_basic_cancel_t m = {amqp_cstring_bytes(tag), 1};
		return send_nowait(c, AMQP_BASIC_CANCEL_METHOD, &m, "basic.cancel", err, errsize);
	}
	amqp_basic_cancel(c->conn, CHANNEL, amqp_cstring_bytes(tag));
	return reply_err(c, amqp_get_rpc_reply(c->conn), "basic.cancel", err, errsize);
}

/* The per-repository consumers go with the start consumer: cancelled, forgotten. */
static int stop_repo_consumers(struct bw_amqp *c, char *err, size_t errsize)
{
	int rc = 0;
	for (size_t i = 0; i < c->n_repos; i++) {
		struct repo_consumer *r = &c->repos[i];
		if (r->consuming && rc == 0 && !c->lost)
			rc = cancel_consumer(c, r->tag, err, errsize);
		free(r->queue);
		free(r->tag);
	}
	free(c->repos);
	c->repos = NULL;
	c->n_repos = 0;
	return rc;
}

int bw_amqp_stop_start_consumer(struct bw_amqp *c, char *err, size_t errsize)
{
	bool was = c->consuming;
	free(c->queue);
	c->queue = NULL; /* never registered again, not even after a channel reopen */
	c->consuming = false;
	if (c->lost)
		return BW_EAMQP;
	int rc = 0;
	if (was)
		rc = cancel_consumer(c, START_TAG, err, errsize);
	return rc == 0 ? stop_repo_consumers(c, err, errsize) : rc;
}

/* The consumer a basic.deliver or basic.cancel names. */
static enum bw_amqp_source source_of(amqp_bytes_t tag)
{
	if (tag.len == strlen(START_TAG) && memcmp(tag.bytes, START_TAG, tag.len) == 0)
		return BW_AMQP_FROM_START;
	if (tag.len == strlen(CONTROL_TAG) && memcmp(tag.bytes, CONTROL_TAG, tag.len) == 0)
		return BW_AMQP_FROM_CONTROL;
	if (tag.len > strlen(REPO_TAG_PREFIX) &&
	    memcmp(tag.bytes, REPO_TAG_PREFIX, strlen(REPO_TAG_PREFIX)) == 0)
		return BW_AMQP_FROM_REPO;
	return BW_AMQP_FROM_UNKNOWN;
}

void bw_amqp_limit_messages(struct bw_amqp *c, size_t max_bytes)
{
	c->max_message_bytes = max_bytes;
}

void bw_delivery_free(struct bw_delivery *d)
{
	free(d->body);
	free(d->content_type);
	free(d->message_id);
	d->body = NULL;
	d->content_type = NULL;
	d->message_id = NULL;
}

/* A frame other than a delivery: answer it as the protocol wants. */
static int handle_frame(struct bw_amqp *c, const amqp_frame_t *f, bw_amqp_confirm_cb cb, void *arg,
			char *err, size_t errsize);

/* The connection cannot go on (a broken frame sequence, no memory): BW_EAMQP with why. */
static int inbound_fail(struct bw_amqp *c, char *err, size_t errsize, const char *why)
{
	snprintf(err, errsize, "%s", why);
	inbound_reset(c);
	c->lost = true;
	return BW_EAMQP;
}

/* The content header: the declared size decides whether the body is kept or dropped. */
static int inbound_header(struct bw_amqp *c, uint64_t size, char *err, size_t errsize)
{
	struct inbound *in = &c->in;
	in->size = size;
	in->too_large = size >= SIZE_MAX || (c->max_message_bytes && size > c->max_message_bytes);
	in->digest = BW_FNV1A64_INIT;
	if (!in->too_large && (in->body = malloc((size_t)size + 1)) == NULL) {
		char why[96];
		snprintf(why, sizeof(why), "no memory for a %" PRIu64 "-byte message", size);
		return inbound_fail(c, err, errsize, why);
	}
	in->stage = IN_BODY;
	return 0;
}

/* A short string property as a C string: 0 and *out (malloc'd; NULL when absent or holding
 * a NUL), or -1 without memory. */
static int prop_string(amqp_flags_t flags, amqp_flags_t flag, amqp_bytes_t b, char **out)
{
	*out = NULL;
	if (!(flags & flag) || memchr(b.bytes, '\0', b.len) != NULL)
		return 0;
	*out = strndup(b.bytes ? b.bytes : "", b.len);
	return *out ? 0 : -1;
}

/* The properties a forward keeps (content type, message id). */
static int inbound_properties(struct bw_amqp *c, const amqp_basic_properties_t *p, char *err,
			      size_t errsize)
{
	if (p == NULL)
		return 0;
	if (prop_string(p->_flags, AMQP_BASIC_CONTENT_TYPE_FLAG, p->content_type,
			&c->in.content_type) != 0 ||
	    prop_string(p->_flags, AMQP_BASIC_MESSAGE_ID_FLAG, p->message_id, &c->in.message_id) != 0)
		return inbound_fail(c, err, errsize, "no memory for a message's properties");
	return 0;
}

/*
 * One frame: a basic.deliver opens a delivery, its content header and body frames fill it
 * (or are hashed and dropped when too large), anything else goes to handle_frame. Sets
 * *got and fills *d when the last body frame arrived.
 */
static int inbound_frame(struct bw_amqp *c, const amqp_frame_t *f, struct bw_delivery *d, bool *got,
			 char *err, size_t errsize)
{
	struct inbound *in = &c->in;
	bool method = f->frame_type == AMQP_FRAME_METHOD;
	if (f->channel != CHANNEL || in->stage == IN_NONE ||
	    (method && f->payload.method.id == AMQP_CHANNEL_CLOSE_METHOD)) {
		if (f->channel == CHANNEL && method &&
		    f->payload.method.id == AMQP_BASIC_DELIVER_METHOD) {
			const amqp_basic_deliver_t *m = f->payload.method.decoded;
			in->stage = IN_HEADER;
			in->source = source_of(m->consumer_tag);
			in->tag = m->delivery_tag;
			in->redelivered = m->redelivered;
			return 0;
		}
		return handle_frame(c, f, NULL, NULL, err, errsize); /* channel.close resets in */
	}
	if (in->stage == IN_HEADER && f->frame_type == AMQP_FRAME_HEADER) {
		int rc = inbound_header(c, f->payload.properties.body_size, err, errsize);
		if (rc != 0)
			return rc;
		rc = inbound_properties(c, f->payload.properties.decoded, err, errsize);
		if (rc != 0)
			return rc;
	} else if (in->stage == IN_BODY && f->frame_type == AMQP_FRAME_BODY) {
		const amqp_bytes_t *b = &f->payload.body_fragment;
		if (b->len > in->size - in->got)
			return inbound_fail(c, err, errsize, "a body frame past the declared size");
		if (in->too_large)
			in->digest = bw_fnv1a64_more(in->digest, b->bytes, b->len);
		else
			memcpy(in->body + in->got, b->bytes, b->len);
		in->got += b->len;
	} else {
		char why[96];
		snprintf(why, sizeof(why), "frame type %d in the middle of a delivery",
			 f->frame_type);
		return inbound_fail(c, err, errsize, why);
	}
	if (in->stage != IN_BODY || in->got < in->size)
		return 0;
	if (in->body)
		in->body[in->size] = '\0';
	*d = (struct bw_delivery){
		.source = in->source,
		.tag = in->tag,
		.channel_epoch = c->channel_epoch,
		.redelivered = in->redelivered,
		.body = in->body,
		.len = in->size < SIZE_MAX ? (size_t)in->size : SIZE_MAX,
		.too_large = in->too_large,
		.digest = in->too_large ? in->digest : 0,
		.content_type = in->content_type,
		.message_id = in->message_id,
	};
	memset(in, 0, sizeof(*in)); /* the body is the caller's now */
	*got = true;
	return 0;
}

int bw_amqp_poll(struct bw_amqp *c, struct bw_delivery *d, bool *got, char *err, size_t errsize)
{
	*got = false;
	if (c->lost)
		return BW_EAMQP;
	if (c->in.stage == IN_NONE)
		amqp_maybe_release_buffers(c->conn);
	if (c->in.stage == IN_NONE && bw_clock_mono_ms() >= c->register_ms) {
		if (c->queue && !c->consuming) {
			/* cancelled by the broker (queue deleted): try to register again */
			c->registered_ms = bw_clock_mono_ms();
			int rc = start_consumer(c, err, errsize);
			if (c->lost)
				return BW_EAMQP;
			if (rc != 0)
				return 0; /* the queue may come back: try again on the next poll */
		}
		if (c->n_repos > 0 && bw_clock_mono_ms() >= c->repo_retry_ms) {
			/* cancelled by the broker (queue deleted) or the channel reopened */
			for (size_t i = 0; i < c->n_repos; i++)
				if (!c->repos[i].consuming)
					c->registered_ms = bw_clock_mono_ms();
			int rc = start_repo_consumers(c, err, errsize);
			if (c->lost)
				return BW_EAMQP;
			if (rc != 0) {
				c->repo_retry_ms = bw_clock_mono_ms() + CONTROL_RETRY_MS;
				return 0; /* the others go on; this one later */
			}
		}
		if (c->control_exchange && !c->control_consuming &&
		    bw_clock_mono_ms() >= c->control_retry_ms) {
			/* its queue went with the channel, or was deleted: a new one */
			c->registered_ms = bw_clock_mono_ms();
			int rc = start_control(c, err, errsize);
			if (c->lost)
				return BW_EAMQP;
			if (rc != 0) {
				c->control_retry_ms = bw_clock_mono_ms() + CONTROL_RETRY_MS;
				return 0; /* the start consumer goes on; the control one later */
			}
		}
	}
	for (int n = 0; n < POLL_FRAMES; n++) {
		amqp_frame_t f;
		int next = next_frame(c, &f, err, errsize);
		if (next <= 0) {
			if (next < 0)
				inbound_reset(c);
			return next;
		}
		int rc = inbound_frame(c, &f, d, got, err, errsize);
		if (c->lost)
			return rc != 0 ? rc : BW_EAMQP;
		/*
		 * The frame is used up (copied, hashed or handled): give its page of the channel's
		 * pool back, or a body would pile up there frame by frame until the message ends.
		 */
		amqp_maybe_release_buffers_on_channel(c->conn, f.channel);
		if (rc != 0 || *got)
			return rc;
	}
	return 0;
}

bool bw_amqp_channel_closed(struct bw_amqp *c, char *why, size_t size)
{
	if (c->closed_why[0] == '\0')
		return false;
	snprintf(why, size, "%s", c->closed_why);
	c->closed_why[0] = '\0';
	return true;
}

uint64_t bw_amqp_channel_epoch(const struct bw_amqp *c)
{
	return c->channel_epoch;
}

enum settle_op { ACK, REJECT, REQUEUE };

/* Settles a delivery of the current channel; a tag of an older channel is never used. */
static int settle_delivery(struct bw_amqp *c, const struct bw_delivery *d, enum settle_op op)
{
	if (c->lost)
		return BW_EAMQP;
	if (d->channel_epoch != c->channel_epoch)
		return BW_ESTATE;
	int st = op == ACK ? amqp_basic_ack(c->conn, CHANNEL, d->tag, 0)
			   : amqp_basic_reject(c->conn, CHANNEL, d->tag, op == REQUEUE);
	return st == AMQP_STATUS_OK ? 0 : BW_EAMQP;
}

int bw_amqp_ack(struct bw_amqp *c, const struct bw_delivery *d)
{
	return settle_delivery(c, d, ACK);
}

int bw_amqp_reject(struct bw_amqp *c, const struct bw_delivery *d)
{
	return settle_delivery(c, d, REJECT);
}

int bw_amqp_requeue(struct bw_amqp *c, const struct bw_delivery *d)
{
	return settle_delivery(c, d, REQUEUE);
}

/* ---- publishing ------------------------------------------------------------------------- */

int bw_amqp_confirm_select(struct bw_amqp *c, char *err, size_t errsize)
{
	amqp_confirm_select(c->conn, CHANNEL);
	int rc = reply_err(c, amqp_get_rpc_reply(c->conn), "confirm.select", err, errsize);
	if (rc == 0) {
		c->confirms = true;
		c->next_seq = 1;
	}
	return rc;
}

/* A publish may go out: the connection is usable, not blocked, and its confirm has a slot. */
static int pending_room(struct bw_amqp *c)
{
	if (c->lost)
		return BW_EAMQP;
	if (c->blocked)
		return BW_EBUSY;
	if (c->n_pending == c->cap_pending) {
		size_t cap = c->cap_pending ? c->cap_pending * 2 : 64;
		struct pending_publish *p = realloc(c->pending, cap * sizeof(*p));
		if (p == NULL)
			return BW_ENOMEM;
		c->pending = p;
		c->cap_pending = cap;
	}
	return 0;
}

int bw_amqp_publish(struct bw_amqp *c, const char *exchange_name, const char *routing_key,
		    const char *id, const char *body, size_t len, uint64_t *seq)
{
	int rc = pending_room(c);
	if (rc != 0)
		return rc;
	char *idc = strdup(id);
	if (idc == NULL)
		return BW_ENOMEM;

	amqp_basic_properties_t props;
	memset(&props, 0, sizeof(props));
	props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG |
		       AMQP_BASIC_MESSAGE_ID_FLAG;
	props.content_type = amqp_cstring_bytes("application/json");
	props.delivery_mode = 2; /* persistent */
	props.message_id = amqp_cstring_bytes(id);
	amqp_bytes_t b = {len, (void *)body};
	int st = amqp_basic_publish(c->conn, CHANNEL, amqp_cstring_bytes(exchange_name),
				    amqp_cstring_bytes(routing_key), 1, 0, &props, b);
	if (st != AMQP_STATUS_OK) {
		free(idc);
		c->lost = true;
		return BW_EAMQP;
	}
	c->pending[c->n_pending++] = (struct pending_publish){c->next_seq, idc, false};
	*seq = c->next_seq++;
	return 0;
}

int bw_amqp_publish_message(struct bw_amqp *c, const char *exchange_name,
			    const char *routing_key, const struct bw_amqp_outgoing *m, uint64_t *seq)
{
	int rc = pending_room(c);
	if (rc != 0)
		return rc;
	amqp_table_entry_t h[] = {entry(SEQ_HEADER, i64_value((int64_t)c->next_seq))};
	amqp_basic_properties_t props;
	memset(&props, 0, sizeof(props));
	props._flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_HEADERS_FLAG;
	props.delivery_mode = 2; /* persistent */
	props.headers = (amqp_table_t){1, h};
	if (m->content_type) {
		props._flags |= AMQP_BASIC_CONTENT_TYPE_FLAG;
		props.content_type = amqp_cstring_bytes(m->content_type);
	}
	if (m->message_id) {
		props._flags |= AMQP_BASIC_MESSAGE_ID_FLAG;
		props.message_id = amqp_cstring_bytes(m->message_id);
	}
	amqp_bytes_t b = {m->len, (void *)m->body};
	int st = amqp_basic_publish(c->conn, CHANNEL, amqp_cstring_bytes(exchange_name),
				    amqp_cstring_bytes(routing_key), 1, 0, &props, b);
	if (st != AMQP_STATUS_OK) {
		c->lost = true;
		return BW_EAMQP;
	}
	c->pending[c->n_pending++] = (struct pending_publish){c->next_seq, NULL, false};
	*seq = c->next_seq++;
	return 0;
}

size_t bw_amqp_unconfirmed(const struct bw_amqp *c)
{
	return c->n_pending;
}

/* Settles pending publishes up to tag (or only tag); ok unless returned. */
static void settle(struct bw_amqp *c, uint64_t tag, bool multiple, bool ok, bw_amqp_confirm_cb cb,
		   void *arg)
{
	size_t keep = 0;
	for (size_t i = 0; i < c->n_pending; i++) {
		struct pending_publish *p = &c->pending[i];
		if (p->seq == tag || (multiple && p->seq < tag)) {
			if (cb)
				cb(arg, p->seq, ok && !p->returned,
				   !ok ? bw_amqp_why_nacked : p->returned ? bw_amqp_why_returned : NULL);
			free(p->id);
		} else {
			c->pending[keep++] = *p;
		}
	}
	c->n_pending = keep;
}

static void settle_all_failed(struct bw_amqp *c, bw_amqp_confirm_cb cb, void *arg,
			      const char *why)
{
	for (size_t i = 0; i < c->n_pending; i++) {
		if (cb)
			cb(arg, c->pending[i].seq, false, why);
		free(c->pending[i].id);
	}
	c->n_pending = 0;
}

/* The broker cancelled a per-repository consumer (its queue deleted). */
static void repo_cancelled(struct bw_amqp *c, amqp_bytes_t tag)
{
	for (size_t i = 0; i < c->n_repos; i++)
		if (strlen(c->repos[i].tag) == tag.len &&
		    memcmp(c->repos[i].tag, tag.bytes, tag.len) == 0)
			c->repos[i].consuming = false;
}

/*
 * Marks the pending publish a basic.return is about: by the sequence number header of a
 * bw_amqp_publish_message, else by message id (the first one not returned yet: returns
 * come in publish order).
 */
static void mark_returned(struct bw_amqp *c, const amqp_basic_properties_t *p)
{
	if (p->_flags & AMQP_BASIC_HEADERS_FLAG) {
		for (int i = 0; i < p->headers.num_entries; i++) {
			const amqp_table_entry_t *e = &p->headers.entries[i];
			if (e->key.len != strlen(SEQ_HEADER) ||
			    memcmp(e->key.bytes, SEQ_HEADER, e->key.len) != 0 ||
			    e->value.kind != AMQP_FIELD_KIND_I64)
				continue;
			for (size_t k = 0; k < c->n_pending; k++)
				if (c->pending[k].id == NULL &&
				    c->pending[k].seq == (uint64_t)e->value.value.i64)
					c->pending[k].returned = true;
			return;
		}
	}
	if (!(p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG))
		return;
	for (size_t i = 0; i < c->n_pending; i++) {
		const char *id = c->pending[i].id;
		if (id && strlen(id) == p->message_id.len &&
		    memcmp(id, p->message_id.bytes, strlen(id)) == 0 && !c->pending[i].returned) {
			c->pending[i].returned = true;
			break;
		}
	}
}

static int handle_frame(struct bw_amqp *c, const amqp_frame_t *f, bw_amqp_confirm_cb cb, void *arg,
			char *err, size_t errsize)
{
	if (f->frame_type != AMQP_FRAME_METHOD)
		return 0; /* stray content of a message we do not expect: skip */
	switch (f->payload.method.id) {
	case AMQP_BASIC_ACK_METHOD: {
		amqp_basic_ack_t *m = f->payload.method.decoded;
		settle(c, m->delivery_tag, m->multiple, true, cb, arg);
		return 0;
	}
	case AMQP_BASIC_NACK_METHOD: {
		amqp_basic_nack_t *m = f->payload.method.decoded;
		settle(c, m->delivery_tag, m->multiple, false, cb, arg);
		return 0;
	}
	case AMQP_BASIC_RETURN_METHOD: {
		/* The returned message follows; it precedes the ack of the same publish. */
		amqp_message_t msg;
		amqp_rpc_reply_t r = amqp_read_message(c->conn, f->channel, &msg, 0);
		if (r.reply_type != AMQP_RESPONSE_NORMAL)
			return reply_err(c, r, "basic.return", err, errsize);
		mark_returned(c, &msg.properties);
		amqp_destroy_message(&msg);
		return 0;
	}
	case AMQP_BASIC_CANCEL_METHOD: {
		amqp_basic_cancel_t *m = f->payload.method.decoded;
		/* re-registered on the next poll */
		enum bw_amqp_source from = source_of(m->consumer_tag);
		if (from == BW_AMQP_FROM_CONTROL)
			c->control_consuming = false;
		else if (from == BW_AMQP_FROM_REPO)
			repo_cancelled(c, m->consumer_tag);
		else
			c->consuming = false;
		return 0;
	}
	case AMQP_CONNECTION_BLOCKED_METHOD:
		c->blocked = true;
		return 0;
	case AMQP_CONNECTION_UNBLOCKED_METHOD:
		c->blocked = false;
		return 0;
	case AMQP_CHANNEL_CLOSE_METHOD: {
		amqp_channel_close_t *m = f->payload.method.decoded;
		snprintf(err, errsize, "channel closed by the broker: %u %.*s", m->reply_code,
			 (int)m->reply_text.len, (const char *)m->reply_text.bytes);
		snprintf(c->closed_why, sizeof(c->closed_why), "%s", err);
		return reopen_channel(c, cb, arg);
	}
	case AMQP_CONNECTION_CLOSE_METHOD: {
		amqp_connection_close_t *m = f->payload.method.decoded;
		snprintf(err, errsize, "connection closed by the broker: %u %.*s", m->reply_code,
			 (int)m->reply_text.len, (const char *)m->reply_text.bytes);
		connection_closed(c, cb, arg);
		return BW_EAMQP;
	}
	default:
		return 0;
	}
}

int bw_amqp_poll_confirms(struct bw_amqp *c, bw_amqp_confirm_cb cb, void *arg, char *err,
			  size_t errsize)
{
	if (c->lost) {
		settle_all_failed(c, cb, arg, "connection lost");
		return BW_EAMQP;
	}
	amqp_maybe_release_buffers(c->conn);
	for (;;) {
		amqp_frame_t f;
		int next = next_frame(c, &f, err, errsize);
		if (next <= 0) {
			if (next < 0)
				settle_all_failed(c, cb, arg, "connection lost");
			return next;
		}
		int rc = handle_frame(c, &f, cb, arg, err, errsize);
		if (rc != 0) {
			if (c->lost)
				settle_all_failed(c, cb, arg, "connection lost");
			return rc;
		}
		/* that read served the heartbeats; unread socket data wakes the loop's poll */
		if (!bw_amqp_pending(c))
			return 0;
	}
}

/* ---- links ------------------------------------------------------------------------------ */

/*
 * A connection that stayed up this long proved its node: losing it starts a new round with
 * that node last, the others at once. One lost sooner counts as a failed try of the round,
 * so nodes that accept and then drop every connection still end in the backoff.
 */
#define LINK_STABLE_MS 10000

/* "127.0.0.1:5673 (node 2 of 3)" into buf. */
static void node_text(const struct bw_amqp_link *link, size_t i, char *buf, size_t size)
{
	snprintf(buf, size, "%s (node %zu of %zu)", link->nodes[i].name, i + 1, link->n_nodes);
}

/*
 * Reads the nodes of opts.url: where each URL lies in it and its host:port. Returns 0, or
 * BW_ECONFIG (err says which node) / BW_ENOMEM.
 */
static int find_nodes(struct bw_amqp_link *link, char *err, size_t errsize)
{
	const char *list = link->opts.url;
	size_t n = 0;
	for (size_t off = 0;;) {
		size_t len = strcspn(list + off, ",");
		if (n == BW_AMQP_MAX_NODES) {
			snprintf(err, errsize, "amqp.url lists more than %d nodes",
				 BW_AMQP_MAX_NODES);
			return BW_ECONFIG;
		}
		char *url = strndup(list + off, len);
		if (url == NULL)
			return BW_ENOMEM;
		struct amqp_connection_info info;
		int st = amqp_parse_url(url, &info); /* cuts and decodes in place */
		if (st == AMQP_STATUS_OK) {
			bool v6 = strchr(info.host, ':') != NULL;
			snprintf(link->nodes[n].name, sizeof(link->nodes[n].name), "%s%s%s:%d",
				 v6 ? "[" : "", info.host, v6 ? "]" : "", info.port);
			snprintf(link->nodes[n].host, sizeof(link->nodes[n].host), "%s", info.host);
			link->nodes[n].port = info.port;
		}
		explicit_bzero(url, len); /* it holds the broker's password */
		free(url);
		if (st != AMQP_STATUS_OK) {
			snprintf(err, errsize, "amqp.url: node %zu is not an AMQP URL", n + 1);
			return BW_ECONFIG;
		}
		link->nodes[n].off = off;
		link->nodes[n].len = len;
		link->nodes[n].connects = 0;
		n++;
		off += len;
		if (list[off] != ',')
			break;
		off++;
	}
	link->n_nodes = n;
	return 0;
}

/*
 * A new round: every node once, in a fresh random order (Fisher-Yates over the one random
 * source). lost < n_nodes: that node was just lost; it goes last and counts as tried.
 */
static void new_round(struct bw_amqp_link *link, size_t lost)
{
	size_t n = link->n_nodes;
	for (size_t i = 0; i < n; i++)
		link->order[i] = i;
	for (size_t i = n; i > 1; i--) {
		size_t j = (size_t)bw_rand_below_incl(i - 1);
		size_t t = link->order[i - 1];
		link->order[i - 1] = link->order[j];
		link->order[j] = t;
	}
	link->pos = 0;
	link->tried = 0;
	if (lost < n) {
		for (size_t i = 0; i + 1 < n; i++) {
			if (link->order[i] == lost) {
				link->order[i] = link->order[n - 1];
				link->order[n - 1] = lost;
				break;
			}
		}
		link->tried = 1;
	}
}

static void schedule_retry(struct bw_amqp_link *link)
{
	/* attempts counts the failed rounds before this one: the first retry waits up to base */
	int attempt = link->attempts < INT_MAX ? (int)link->attempts + 1 : INT_MAX;
	link->next_try_ms = bw_clock_mono_ms() +
			    bw_backoff_ms(link->backoff_base_ms, link->backoff_cap_ms, attempt);
	link->attempts++;
}

/* Goes on with the round: its next node at once, or, when every node of it failed, the
 * backoff and then a new round. */
static void go_on(struct bw_amqp_link *link)
{
	if (link->tried < link->n_nodes && link->pos < link->n_nodes) {
		link->next_try_ms = 0;
		return;
	}
	schedule_retry(link);
	new_round(link, SIZE_MAX);
}

/* The node at order[pos] failed, or was lost soon after its connect. */
static void next_node(struct bw_amqp_link *link)
{
	link->tried++;
	link->pos++;
	go_on(link);
}

int bw_amqp_link_up(struct bw_amqp_link *link, bool *fresh, char *err, size_t errsize)
{
	*fresh = false;
	if (link->c)
		return 0;
	if (!link->probing && link->next_try_ms && bw_clock_mono_ms() < link->next_try_ms)
		return BW_EBUSY;
	if (link->n_nodes == 0) {
		int rc = find_nodes(link, err, errsize);
		if (rc != 0) {
			if (rc == BW_ENOMEM)
				snprintf(err, errsize, "out of memory");
			snprintf(link->why, sizeof(link->why), "%s", err);
			schedule_retry(link); /* read again later, not at every turn of the loop */
			return rc == BW_ECONFIG ? BW_ECONFIG : BW_EBUSY;
		}
		new_round(link, SIZE_MAX);
	}

	size_t i = link->order[link->pos];
	const struct bw_amqp_node *node = &link->nodes[i];
	int rc = link->probing ? 0
			       : bw_probe_start(&link->probe, node->host, node->port,
						link->opts.timeout_ms, err, errsize);
	link->probing = rc == 0;
	if (rc == 0)
		rc = bw_probe_step(&link->probe, err, errsize);
	if (rc == BW_EBUSY)
		return BW_EBUSY; /* no answer yet: the caller polls bw_amqp_link_pollfd */
	if (link->probing)
		bw_probe_stop(&link->probe);
	link->probing = false;
	if (rc != 0) {
		char where[BW_AMQP_NODE_NAME_MAX + 48];
		if (rc == BW_ENOMEM)
			snprintf(err, errsize, "out of memory");
		node_text(link, i, where, sizeof(where));
		snprintf(link->why, sizeof(link->why), "%s: %s", where, err);
		next_node(link);
		return BW_EBUSY;
	}

	/* the node answered: the blocking connect and login meet a live peer */
	struct bw_amqp *c = NULL;
	struct bw_amqp_opts o = link->opts;
	char *url = strndup(link->opts.url + node->off, node->len);
	if (url == NULL) {
		snprintf(err, errsize, "out of memory");
		schedule_retry(link);
		return BW_EBUSY;
	}
	o.url = url;
	rc = bw_amqp_connect(&c, &o, err, errsize);
	explicit_bzero(url, node->len); /* it holds the broker's password */
	free(url);
	if (rc == 0)
		c->nowait = true; /* the restore below never waits on the cluster */
	if (rc == 0 && link->role == BW_AMQP_PUBLISHER)
		rc = bw_amqp_confirm_select(c, err, errsize);
	/* what the node answers itself first (a missing control exchange is named here), then
	   what may wait on the cluster, without waiting: nothing after a bind waits */
	if (rc == 0 && link->role == BW_AMQP_CONSUMER && link->control_exchange)
		rc = exchange(c, link->control_exchange, "fanout",
			      link->topology && link->topology->passive, err, errsize);
	if (rc == 0 && link->topology)
		rc = bw_amqp_declare(c, link->topology, err, errsize);
	if (rc == 0 && link->role == BW_AMQP_CONSUMER && link->queue) {
		bw_amqp_limit_messages(c, link->max_message_bytes);
		rc = bw_amqp_consume(c, link->queue, link->prefetch, err, errsize);
		if (rc == 0 && link->topology) /* placement: this host's repositories */
			rc = bw_amqp_consume_repos(c, link->topology, link->prefetch, err, errsize);
	}
	if (rc == 0 && link->role == BW_AMQP_CONSUMER && link->control_exchange)
		rc = bw_amqp_consume_control(c, link->control_exchange,
					     link->topology && link->topology->passive, err, errsize);
	if (rc != 0) {
		char where[BW_AMQP_NODE_NAME_MAX + 48];
		if (c && rc != BW_ECONFIG)
			c->lost = true; /* an RPC timed out: no Connection.Close to wait for on it */
		bw_amqp_close(c);
		node_text(link, i, where, sizeof(where));
		snprintf(link->why, sizeof(link->why), "%s: %s", where, err);
		next_node(link);
		return rc == BW_ECONFIG ? BW_ECONFIG : BW_EBUSY;
	}
	link->c = c;
	link->why[0] = '\0';
	link->attempts = 0;
	link->next_try_ms = 0;
	link->connects++;
	link->nodes[i].connects++;
	link->up_since_ms = bw_clock_mono_ms();
	*fresh = true;
	return 0;
}

void bw_amqp_link_lost(struct bw_amqp_link *link, const char *why)
{
	if (link->c) {
		char where[BW_AMQP_NODE_NAME_MAX + 48];
		node_text(link, link->order[link->pos], where, sizeof(where));
		snprintf(link->why, sizeof(link->why), "%s: %s", where, why);
		/* given up (a confirm 30 s late: a channel a cluster holds): no Connection.Close
		   to wait for either, the broker sees the socket close */
		link->c->lost = true;
	}
	bw_amqp_link_down(link);
}

void bw_amqp_link_down(struct bw_amqp_link *link)
{
	if (link->probing) {
		bw_probe_stop(&link->probe);
		link->probing = false;
	}
	if (link->c == NULL) {
		/* never up, or waiting already: a first attempt waits a backoff, a wait stays */
		if (link->next_try_ms == 0 || link->attempts == 0)
			schedule_retry(link);
		return;
	}
	size_t on = link->order[link->pos];
	if (link->why[0] == '\0') {
		char where[BW_AMQP_NODE_NAME_MAX + 48];
		node_text(link, on, where, sizeof(where));
		snprintf(link->why, sizeof(link->why), "%s: connection closed", where);
	}
	bw_amqp_close(link->c);
	link->c = NULL;
	if (bw_clock_mono_ms() - link->up_since_ms >= LINK_STABLE_MS) {
		/* it served: the others at once, this one last (a round of one: the backoff) */
		new_round(link, on);
		go_on(link);
	} else {
		next_node(link);
	}
}

int bw_amqp_link_timeout_ms(const struct bw_amqp_link *link)
{
	if (link->probing)
		return bw_probe_timeout_ms(&link->probe);
	if (link->c || link->next_try_ms == 0)
		return 0;
	int64_t left = link->next_try_ms - bw_clock_mono_ms();
	return left > 0 ? (int)left : 0;
}

const char *bw_amqp_link_node(const struct bw_amqp_link *link, size_t *index)
{
	if (link->c == NULL)
		return NULL;
	size_t i = link->order[link->pos];
	if (index)
		*index = i;
	return link->nodes[i].name;
}

int bw_amqp_link_pollfd(const struct bw_amqp_link *link, short *events)
{
	if (!link->probing)
		return -1;
	*events = bw_probe_events(&link->probe);
	return bw_probe_fd(&link->probe);
}
