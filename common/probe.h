/*
 * probe.h: does a broker node answer? Asked without blocking, before the blocking login.
 *
 * librabbitmq-c's login waits for the broker's Connection.Start in a blocking read (up to
 * the handshake timeout). A node that accepts TCP connections but never answers (a frozen
 * Erlang VM: its kernel still completes the handshake; a host cut by a firewall or proxy
 * that swallows the bytes) would hold the worker's one loop in that read at every reconnect
 * attempt, and with it every transfer the loop follows. So a link first probes the node:
 * a non-blocking connect, the 8-byte AMQP protocol header, and a wait, on the loop's own
 * poll, for an answer: bytes (Connection.Start; a TLS listener's alert) prove a broker,
 * and then the real connect runs. Silence until the deadline, a close or a reset before
 * any byte (a proxy or firewall that resets one connection may swallow the next: seen in
 * the fleet's cuts, where the login then waited 5 s), or a refused or unreachable connect
 * fails the node without the login. Every address the host name resolves to is tried in
 * turn, within the one deadline.
 *
 * Host names are resolved with getaddrinfo, which blocks: a numeric address or an
 * /etc/hosts name costs nothing; a DNS name can hold the loop for the resolver's timeout
 * when the DNS server does not answer (list nodes by address where that matters).
 */
#ifndef BW_PROBE_H
#define BW_PROBE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct addrinfo;

struct bw_probe {
	int fd;	   /* -1: none (also after an answer or a failure) */
	bool sent; /* the header went out: waiting for the answer */
	int timeout_ms;
	int64_t deadline_ms;	/* monotonic */
	struct addrinfo *addrs; /* the host's addresses */
	struct addrinfo *next;	/* the address tried after the current one */
};

/*
 * Starts probing host:port; the whole probe (every address) ends by timeout_ms from now.
 * Returns 0 (probing: *p is live until bw_probe_stop), or BW_EAMQP / BW_ENOMEM with err set
 * (nothing to stop).
 */
int bw_probe_start(struct bw_probe *p, const char *host, int port, int timeout_ms, char *err,
		   size_t errsize);

/*
 * Moves the probe on, never waiting. Returns 0 when the node answered, BW_EBUSY while
 * nothing has come yet (poll bw_probe_fd for bw_probe_events, until
 * bw_probe_timeout_ms), BW_EAMQP when every address failed or the deadline passed (err
 * says how). After 0 or BW_EAMQP the probe is over: call bw_probe_stop.
 */
int bw_probe_step(struct bw_probe *p, char *err, size_t errsize);

/* The socket to poll (-1 when over) and the events it waits for. */
int bw_probe_fd(const struct bw_probe *p);
short bw_probe_events(const struct bw_probe *p);

/* Milliseconds until the deadline (0: due). */
int bw_probe_timeout_ms(const struct bw_probe *p);

/* Closes what is open and frees the addresses; safe twice. */
void bw_probe_stop(struct bw_probe *p);

#endif
