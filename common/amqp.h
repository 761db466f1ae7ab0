/* amqp.h: one AMQP 0-9-1 connection (librabbitmq-c 0.11) that never blocks the event loop for long. */
#ifndef BW_AMQP_H
#define BW_AMQP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "probe.h"

/*
 * A worker holds two: one consumes backup.start, one publishes events with confirms
 * (RabbitMQ blocks publishing connections on a resource alarm while consumers keep
 * flowing, and 0.11 cannot put a frame back, so each connection reads only what its role
 * expects). Every call is bounded by opts.timeout_ms; the poll calls never wait.
 * Heartbeats are always on: call a poll function at least every heartbeat_s / 2.
 */
struct bw_amqp;

struct bw_amqp_opts {
	const char *url;  /* amqp[s]://user:password@host:port[/vhost] */
	int heartbeat_s;  /* > 0 */
	int timeout_ms;   /* connect, login, every RPC */
	const char *name; /* shown by rabbitmqctl list_connections (connection_name) */
	const char *tls_ca_file; /* PEM CAs; NULL: the system's (OpenSSL's default store,
				    $SSL_CERT_FILE / $SSL_CERT_DIR honoured) */
	const char *tls_cert_file;
	const char *tls_key_file;
	bool tls_verify_peer;     /* default true */
	bool tls_verify_hostname; /* default true */
};

struct bw_amqp_topology {
	const char *queue;           /* backup.start: quorum */
	const char *jobs_exchange;   /* direct */
	const char *events_exchange; /* topic */
	const char *dlx;             /* fanout */
	const char *dlq;             /* quorum, bound to dlx */
	int delivery_limit;
	bool passive; /* only check that everything exists */
	/*
	 * Placement (CONTRACT §2): this host's repositories. Each gets a quorum queue
	 * bw_amqp_repo_queue(queue, id), with the arguments of queue, bound to jobs_exchange
	 * under its own name as routing key.
	 */
	const char *const *repositories;
	size_t n_repositories;
};

/* The longest queue name AMQP 0-9-1 allows (a short string). */
#define BW_AMQP_NAME_MAX 255

/*
 * The per-repository queue of repository_id, also its routing key on the jobs exchange:
 * "<queue>.repo.<repository_id>" (backup.start.repo.<id> with the default names) in buf.
 * Returns 0, or BW_ERANGE when it would be longer than BW_AMQP_NAME_MAX or size - 1.
 */
int bw_amqp_repo_queue(char *buf, size_t size, const char *queue, const char *repository_id)
	BW_MUST_CHECK;

/*
 * Connects, logs in announcing consumer_cancel_notify, connection.blocked,
 * publisher_confirms and basic.nack, and opens channel 1. Returns 0 and a new connection
 * in *out; BW_EAMQP (transient: refused, timed out, broker closing) or BW_ECONFIG (bad URL,
 * access refused, TLS verification failed) with the reason in err.
 */
int bw_amqp_connect(struct bw_amqp **out, const struct bw_amqp_opts *o, char *err,
		    size_t errsize) BW_MUST_CHECK;

/* Closes politely (bounded) and frees. Accepts NULL. */
void bw_amqp_close(struct bw_amqp *c);

/* The socket to poll for input. */
int bw_amqp_fd(const struct bw_amqp *c);

/* True when the library holds input already read: poll the connection without waiting. */
bool bw_amqp_pending(const struct bw_amqp *c);

/*
 * Declares (or, passive, checks) the topology of CONTRACT §1. A mismatch is BW_ECONFIG
 * naming the object and the broker's words (which name the argument).
 */
int bw_amqp_declare(struct bw_amqp *c, const struct bw_amqp_topology *t, char *err,
		    size_t errsize) BW_MUST_CHECK;

/* ---- consuming ------------------------------------------------------------------------- */

/* Which consumer of the connection a delivery came from (its consumer tag says). */
enum bw_amqp_source {
	BW_AMQP_FROM_UNKNOWN = 0, /* a tag this connection never registered: give it back */
	BW_AMQP_FROM_START,       /* the queue of bw_amqp_consume (backup.start) */
	BW_AMQP_FROM_CONTROL,     /* the own queue of bw_amqp_consume_control (backup.cancel) */
	BW_AMQP_FROM_REPO,        /* a per-repository queue of bw_amqp_consume_repos */
};

struct bw_delivery {
	enum bw_amqp_source source;
	uint64_t tag;
	uint64_t channel_epoch; /* tags of an older channel or connection are never used */
	bool redelivered;
	char *body; /* malloc'd, NUL-terminated; len excludes the NUL. NULL when too_large */
	size_t len; /* too_large: the size the broker declared (SIZE_MAX when larger) */
	/*
	 * The body was over the connection's message limit (bw_amqp_limit_messages): its frames
	 * were read and dropped as they came, never held, and digest is the FNV-1a 64 of what was
	 * dropped (what bw_fnv1a64 of the whole body gives). Settle it like any other delivery.
	 */
	bool too_large;
	uint64_t digest; /* too_large only; 0 otherwise */
	/* properties the publisher set (malloc'd, NUL-terminated; NULL when absent or holding
	   a NUL), kept so that a forwarded message keeps them */
	char *content_type;
	char *message_id;
};

/*
 * Bodies larger than max_bytes (0, the default: no limit) are not kept: their frames are
 * read and dropped as they come, and the delivery comes flagged too_large with body NULL.
 * Applies from the next delivery on.
 */
void bw_amqp_limit_messages(struct bw_amqp *c, size_t max_bytes);

/*
 * The broker closed the channel since the last call (bw_amqp_poll answered it, opened the
 * channel again and registers the consumers again): true and its words in why. On a link's
 * connection, binds and consumes are sent without waiting for their replies, so this is
 * where one that failed (a queue deleted, access refused) shows.
 */
bool bw_amqp_channel_closed(struct bw_amqp *c, char *why, size_t size);

/* Starts consuming queue with manual acks and prefetch (basic.qos per consumer). */
int bw_amqp_consume(struct bw_amqp *c, const char *queue, int prefetch, char *err,
		    size_t errsize) BW_MUST_CHECK;

/*
 * Consumes the control exchange (fanout, durable: CONTRACT §1 backup.control) next to the
 * queue of bw_amqp_consume on the same channel: declares the exchange (passive: only checks
 * that it exists), then an exclusive, auto-delete queue (server-named; on a link's
 * connection, which does not wait for the reply, "bw.control.<64 random bits>"), binds it
 * and consumes it with manual acks under a consumer tag of its own, so its deliveries come
 * with source BW_AMQP_FROM_CONTROL. The queue dies with the channel: after a channel reopen
 * or a basic.cancel, bw_amqp_poll does it all again (a reconnect does it through the link).
 * Consuming the same exchange again changes nothing. BW_EAMQP/BW_ECONFIG as bw_amqp_declare.
 */
int bw_amqp_consume_control(struct bw_amqp *c, const char *exchange, bool passive, char *err,
			    size_t errsize) BW_MUST_CHECK;

/*
 * Consumes the per-repository queues of t (bw_amqp_repo_queue of each of t->repositories)
 * on the channel of bw_amqp_consume, each with manual acks, prefetch (basic.qos per
 * consumer) and the consumer tag "bw.repo.<id>", so that their deliveries come with source
 * BW_AMQP_FROM_REPO. Re-registered by bw_amqp_poll after a basic.cancel or a channel reopen
 * (a reconnect does it through the link). Returns 0, BW_ERANGE (a name too long),
 * BW_ENOMEM, or BW_EAMQP/BW_ECONFIG as bw_amqp_declare.
 */
int bw_amqp_consume_repos(struct bw_amqp *c, const struct bw_amqp_topology *t, int prefetch,
			  char *err, size_t errsize) BW_MUST_CHECK;

/*
 * Stops the consumer of bw_amqp_consume (and those of bw_amqp_consume_repos) for good
 * (basic.cancel; it is never registered again), keeping the connection and the control
 * consumer: a draining worker still hears cancels. Deliveries of that queue already on their
 * way still arrive (on a link's connection the basic.cancel goes without waiting for
 * cancel-ok): give them back
 * (bw_amqp_requeue). Returns 0, or BW_EAMQP/BW_ECONFIG with the reason in err (close the
 * connection then).
 */
int bw_amqp_stop_start_consumer(struct bw_amqp *c, char *err, size_t errsize) BW_MUST_CHECK;

/*
 * Handles what arrived, never waiting for more: returns 0 with *got set when a delivery is
 * in *d (free with bw_delivery_free), 0 with *got false when nothing complete is there
 * yet (a delivery whose frames are still arriving is kept and finished by a later poll;
 * one poll handles a bounded number of frames, and bw_amqp_pending then says whether
 * more is buffered). basic.cancel (queue deleted) re-registers the consumer, channel.close
 * is answered and the channel reopened (older tags become stale, a half-read delivery is
 * dropped), connection.blocked/unblocked are noted. BW_EAMQP when the connection is lost
 * (heartbeat missed, closed by the broker, socket error, a broken frame sequence, no
 * memory for a body): close it and connect again.
 */
int bw_amqp_poll(struct bw_amqp *c, struct bw_delivery *d, bool *got, char *err,
		 size_t errsize) BW_MUST_CHECK;

void bw_delivery_free(struct bw_delivery *d);

/*
 * The channel's epoch, raised at every reopen and drawn at random for every new
 * connection: a delivery whose channel_epoch differs came on a channel or connection that
 * is gone (the broker has given it back to its queue), and its tag is never used.
 */
uint64_t bw_amqp_channel_epoch(const struct bw_amqp *c);

/* Acks / rejects (no requeue: to the DLX) a delivery; BW_ESTATE for a tag of a channel or
 * connection that is gone (bw_amqp_channel_epoch). */
int bw_amqp_ack(struct bw_amqp *c, const struct bw_delivery *d) BW_MUST_CHECK;
int bw_amqp_reject(struct bw_amqp *c, const struct bw_delivery *d) BW_MUST_CHECK;
/* Gives a delivery back to the queue (a transient failure; counts toward the delivery limit). */
int bw_amqp_requeue(struct bw_amqp *c, const struct bw_delivery *d) BW_MUST_CHECK;

/* ---- publishing ------------------------------------------------------------------------ */

/* Puts the channel in confirm mode; publish sequence numbers start at 1. */
int bw_amqp_confirm_select(struct bw_amqp *c, char *err, size_t errsize) BW_MUST_CHECK;

/*
 * Publishes persistent, mandatory, content-type application/json, message_id = id.
 * Stores the confirm sequence number in *seq. Refused (BW_EBUSY) while the broker has
 * blocked the connection. Settled later by bw_amqp_poll_confirms.
 */
int bw_amqp_publish(struct bw_amqp *c, const char *exchange, const char *routing_key,
		    const char *id, const char *body, size_t len, uint64_t *seq) BW_MUST_CHECK;

/* A message to publish with bw_amqp_publish_message. */
struct bw_amqp_outgoing {
	const char *body;
	size_t len;
	const char *content_type; /* NULL: none */
	const char *message_id;   /* NULL: none */
};

/*
 * Publishes m persistent and mandatory, with its content type and message id (both may be
 * absent), and the header x-bw-publish-seq holding the confirm sequence number, by which
 * a basic.return of it is matched exactly (message ids need not be unique). *seq as
 * bw_amqp_publish; BW_EBUSY while blocked, BW_EAMQP, BW_ENOMEM.
 */
int bw_amqp_publish_message(struct bw_amqp *c, const char *exchange, const char *routing_key,
			    const struct bw_amqp_outgoing *m, uint64_t *seq) BW_MUST_CHECK;

/*
 * Called once per settled publish: ok only on an ack with no basic.return before it. why
 * says what failed (NULL when ok); a publish the broker returned unroutable gets exactly
 * the pointer bw_amqp_why_returned, so a caller can tell "no queue" from "not confirmed".
 */
typedef void (*bw_amqp_confirm_cb)(void *arg, uint64_t seq, bool ok, const char *why);
extern const char bw_amqp_why_returned[];
/* ... and one the broker nacked, exactly the pointer bw_amqp_why_nacked. */
extern const char bw_amqp_why_nacked[];

/*
 * Handles confirms, returns, flow control and heartbeats without waiting; calls cb per
 * settled publish. BW_EAMQP when the connection is lost (every unsettled publish is then
 * settled as failed through cb first).
 */
int bw_amqp_poll_confirms(struct bw_amqp *c, bw_amqp_confirm_cb cb, void *arg, char *err,
			  size_t errsize) BW_MUST_CHECK;

/* Publishes sent and not settled yet. */
size_t bw_amqp_unconfirmed(const struct bw_amqp *c);

/* True while the broker blocks this connection (resource alarm). */
bool bw_amqp_blocked(const struct bw_amqp *c);

/* ---- links: a connection that comes back ----------------------------------------------- */

enum bw_amqp_role { BW_AMQP_CONSUMER, BW_AMQP_PUBLISHER };

/* Nodes of one amqp.url a link knows at most (the nodes of one cluster, CONTRACT §6). */
#define BW_AMQP_MAX_NODES 16
/* "host:port" of a node as logs and metrics show it: never its user or password. */
#define BW_AMQP_NODE_NAME_MAX 280

/* One node of the link's amqp.url. */
struct bw_amqp_node {
	size_t off, len;                  /* its URL: opts.url[off, off + len) */
	char name[BW_AMQP_NODE_NAME_MAX]; /* host:port */
	char host[BW_AMQP_NODE_NAME_MAX]; /* the host alone (as the URL gives it, decoded) */
	int port;
	uint64_t connects;                /* successful connects to it */
};

/*
 * A link keeps one connection of a role up, restoring in order: connection, channel, qos,
 * confirm mode, topology, consumer. opts.url may list the nodes of one cluster,
 * comma-separated: the link tries them in a random order, a fresh shuffle per round, and
 * moves to the next one of the round on a failed connect and on a lost connection (the lost
 * node goes last in a new round when its connection had been up for a while, so the others
 * are tried first). Only after every node of a round failed does it wait a capped
 * exponential backoff with full jitter (bw_backoff_ms: after n failed rounds in a row, a
 * uniform wait in [0, min(cap, base * 2^n)]); one URL is a round of one node. Before the
 * blocking connect and login, a node must answer a probe (probe.h) that runs on the
 * caller's poll: a node that takes connections and says nothing fails within
 * opts.timeout_ms without ever holding the caller. The restore waits only for what the node
 * answers on its own (channel, confirm mode, exchange and queue declares); binds, qos and
 * consumes go without waiting for their replies, since a cluster may hold them for seconds
 * (a bind waits for a frozen node's Mnesia, a consume for a frozen quorum leader): the
 * broker's channel waits, not the caller. Their failures come as channel closes
 * (bw_amqp_channel_closed). Deliveries of
 * an older connection or channel are never acked on the new one (bw_amqp_ack refuses their
 * tags). Zero the struct, then set the configuration fields.
 */
struct bw_amqp_link {
	struct bw_amqp_opts opts;                /* url: one URL or a comma-separated list */
	enum bw_amqp_role role;
	const struct bw_amqp_topology *topology; /* declared on every (re)connect when set */
	const char *queue;                       /* consumer: the queue */
	const char *control_exchange;            /* consumer: bw_amqp_consume_control (passive as
						    the topology); NULL none */
	int prefetch;                            /* consumer */
	size_t max_message_bytes;                /* consumer: bw_amqp_limit_messages; 0: none */
	int backoff_base_ms;
	int backoff_cap_ms;

	struct bw_amqp *c;  /* NULL while down */
	unsigned attempts;  /* failed rounds in a row */
	int64_t next_try_ms; /* monotonic; 0: now */
	uint64_t connects;  /* successful (re)connects */
	char why[512];      /* while down: why (the last failed connect, or what lost it), naming
			       the node */

	/* the nodes, read from opts.url at the first bw_amqp_link_up */
	size_t n_nodes;
	struct bw_amqp_node nodes[BW_AMQP_MAX_NODES];
	size_t order[BW_AMQP_MAX_NODES]; /* this round's order: indexes into nodes */
	size_t pos;                      /* order[pos]: the node tried next, or the one it is on */
	size_t tried;                    /* nodes of this round that failed or were lost */
	int64_t up_since_ms;             /* monotonic: when the connection came up */
	bool probing;                    /* probe: asking order[pos] whether it answers */
	struct bw_probe probe;
};

/*
 * Connects the link when it is down and its backoff has run out, one step at a time and
 * never waiting on the network: it probes the next node of the round (or moves the probe
 * on), and once the node answered, connects and restores the link (librabbitmq's blocking
 * calls for what the node answers itself, on a node that just answered). Returns 0 when it
 * is up (link->c usable; *fresh set when it was just (re)connected), BW_EBUSY while
 * waiting: for the next attempt, or for the probe's answer (poll bw_amqp_link_pollfd;
 * bw_amqp_link_timeout_ms says how long: 0 when the next node of the round is due at once),
 * BW_ECONFIG for an error no retry can fix on
 * that node (bad credentials, topology mismatch, an amqp.url the client cannot read), with
 * err set.
 */
int bw_amqp_link_up(struct bw_amqp_link *link, bool *fresh, char *err, size_t errsize)
	BW_MUST_CHECK;

/* The link's connection failed: close it; the next bw_amqp_link_up reconnects. */
void bw_amqp_link_down(struct bw_amqp_link *link);

/*
 * The same for a connection given up, keeping why (for monitoring: link->why until it is up
 * again): its socket is closed without the Connection.Close handshake, which a broker that
 * holds the connection's channel would keep the caller waiting for.
 */
void bw_amqp_link_lost(struct bw_amqp_link *link, const char *why);

/*
 * Milliseconds until the next connection attempt, or until the probe of a node gives up
 * (0 when up or due).
 */
int bw_amqp_link_timeout_ms(const struct bw_amqp_link *link);

/*
 * While the link probes a node: the socket to poll (and *events), so that its answer wakes
 * the caller, who then calls bw_amqp_link_up again. -1 otherwise.
 */
int bw_amqp_link_pollfd(const struct bw_amqp_link *link, short *events);

/*
 * The node the link is on (its host:port, static while up; never a password), NULL while
 * down; *index (may be NULL) gets its 0-based place in amqp.url.
 */
const char *bw_amqp_link_node(const struct bw_amqp_link *link, size_t *index);

#endif
