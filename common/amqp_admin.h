/* amqp_admin.h: what bw-ctl asks of a broker beyond a worker's needs: confirmed one-off publishes,
 * a temporary queue, messages taken one by one with their headers. */
#ifndef BW_AMQP_ADMIN_H
#define BW_AMQP_ADMIN_H

#include <json-c/json.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "amqp.h"
#include "error.h"

/*
 * Publishes one message as bw_amqp_publish does (persistent, mandatory, application/json,
 * message_id = id) on a connection in confirm mode with nothing else in flight, and waits
 * up to timeout_ms for the broker to settle it. Returns 0 when it was confirmed and routed;
 * BW_ENOENT when it came back unroutable (no queue bound for that routing key) or the
 * exchange does not exist; BW_EAMQP when the broker nacked it or the connection or channel
 * was lost; BW_ETIMEDOUT; BW_EBUSY while the broker blocks the connection. The reason in
 * err.
 */
int bw_amqp_publish_confirmed(struct bw_amqp *c, const char *exchange, const char *routing_key,
			      const char *id, const char *body, size_t len, int timeout_ms,
			      char *err, size_t errsize) BW_MUST_CHECK;

/* Checks that exchange exists (a passive declare). Returns 0, BW_ENOENT, or BW_EAMQP. */
int bw_amqp_exchange_exists(struct bw_amqp *c, const char *exchange, char *err,
			    size_t errsize) BW_MUST_CHECK;

/*
 * Declares a server-named, exclusive, auto-delete queue (it goes with the connection) and
 * binds it to exchange with binding_key. Stores its name in name[0..size). Returns 0;
 * BW_ENOENT when the exchange does not exist; BW_EAMQP / BW_ECONFIG with err.
 */
int bw_amqp_temp_queue(struct bw_amqp *c, const char *exchange, const char *binding_key, char *name,
		       size_t size, char *err, size_t errsize) BW_MUST_CHECK;

/* A message taken with basic.get and not yet settled. */
struct bw_amqp_message {
	uint64_t tag;
	char *body; /* malloc'd, NUL-terminated; len excludes the NUL */
	size_t len;
	/*
	 * Its properties as a JSON object: content_type, message_id, delivery_mode, timestamp
	 * (RFC 3339) when set, and headers (an object: tables as objects, arrays as arrays,
	 * AMQP timestamps as RFC 3339 strings, byte strings as strings). Owned.
	 */
	struct json_object *props;
};

/*
 * basic.get from queue without auto-ack: *got true with *m filled (free with
 * bw_amqp_message_free; settle it with bw_amqp_settle), false when the queue is empty.
 * Returns 0; BW_ENOENT when the queue does not exist; BW_EAMQP / BW_ECONFIG with err.
 * Messages taken and not settled go back to the queue when the connection closes.
 */
int bw_amqp_get(struct bw_amqp *c, const char *queue, struct bw_amqp_message *m, bool *got,
		char *err, size_t errsize) BW_MUST_CHECK;

void bw_amqp_message_free(struct bw_amqp_message *m);

/* Acks a message taken with bw_amqp_get (ack), or gives it back to its queue. */
int bw_amqp_settle(struct bw_amqp *c, uint64_t tag, bool ack) BW_MUST_CHECK;

#endif
