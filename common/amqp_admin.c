/* amqp_admin.c: bw-ctl's broker operations: confirmed one-off publishes, a temporary queue,
 * basic.get with headers. */
#include "amqp_admin.h"
#include "amqp_internal.h"

#include "clock.h"
#include "text.h"

#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- a publish and its confirm ------------------------------------------------------------ */

struct settled {
	uint64_t seq;
	bool done;
	bool ok;
	bool returned; /* settled as returned unroutable (bw_amqp_why_returned) */
	char why[128];
};

static void settled_cb(void *arg, uint64_t seq, bool ok, const char *why)
{
	struct settled *s = arg;
	if (seq != s->seq)
		return;
	s->done = true;
	s->ok = ok;
	s->returned = why == bw_amqp_why_returned; /* the pointer says it, not the words */
	snprintf(s->why, sizeof(s->why), "%s", why ? why : "");
}

int bw_amqp_publish_confirmed(struct bw_amqp *c, const char *exchange, const char *routing_key,
			      const char *id, const char *body, size_t len, int timeout_ms,
			      char *err, size_t errsize)
{
	struct settled s = {0, false, false, false, ""};
	int rc;
	err[0] = '\0';
	/* a missing exchange closes the channel: say so plainly rather than "channel closed" */
	if (exchange[0] != '\0' && (rc = bw_amqp_exchange_exists(c, exchange, err, errsize)) != 0)
		return rc;
	rc = bw_amqp_publish(c, exchange, routing_key, id, body, len, &s.seq);
	if (rc != 0) {
		snprintf(err, errsize, "publish: %s", bw_strerror(rc));
		return rc;
	}
	int64_t end = bw_clock_mono_ms() + timeout_ms;
	while (!s.done) {
		char perr[512] = "";
		rc = bw_amqp_poll_confirms(c, settled_cb, &s, perr, sizeof(perr));
		if (perr[0]) /* the broker's own words (a channel it closed) beat ours */
			snprintf(err, errsize, "%s", perr);
		if (s.done)
			break;
		if (rc != 0) {
			if (err[0] == '\0')
				snprintf(err, errsize, "connection lost");
			return BW_EAMQP;
		}
		int64_t left = end - bw_clock_mono_ms();
		if (left <= 0) {
			snprintf(err, errsize, "no confirm from the broker within %d ms",
				 timeout_ms);
			return BW_ETIMEDOUT;
		}
		if (!bw_amqp_pending(c)) {
			struct pollfd p = {bw_amqp_fd(c), POLLIN, 0};
			(void)poll(&p, 1,
				   left < 200 ? (int)left
					      : 200); /* heartbeats are sent by the poll */
		}
	}
	if (s.ok)
		return 0;
	if (s.returned) {
		snprintf(err, errsize,
			 "returned unroutable: no queue is bound to %s with routing key %s",
			 exchange[0] ? exchange : "(default exchange)", routing_key);
		return BW_ENOENT;
	}
	if (err[0] == '\0')
		snprintf(err, errsize, "%s", s.why);
	return BW_EAMQP;
}

/* ---- topology checks and the temporary queue ---------------------------------------------- */

/* A reply that closed the channel with 404 NOT_FOUND. */
static bool not_found(amqp_rpc_reply_t r)
{
	if (r.reply_type != AMQP_RESPONSE_SERVER_EXCEPTION ||
	    r.reply.id != AMQP_CHANNEL_CLOSE_METHOD)
		return false;
	const amqp_channel_close_t *m = r.reply.decoded;
	return m->reply_code == AMQP_NOT_FOUND;
}

/* Judges r: 0, BW_ENOENT for 404 (the channel is reopened), else bw__amqp_reply's code. */
static int judge(struct bw_amqp *c, amqp_rpc_reply_t r, const char *what, char *err, size_t errsize)
{
	bool nf = not_found(r);
	int rc = bw__amqp_reply(c, r, what, err, errsize);
	return rc != 0 && nf ? BW_ENOENT : rc;
}

int bw_amqp_exchange_exists(struct bw_amqp *c, const char *exchange, char *err, size_t errsize)
{
	char what[300];
	amqp_connection_state_t conn = bw__amqp_conn(c);
	snprintf(what, sizeof(what), "exchange %s", exchange);
	amqp_exchange_declare(conn, BW__AMQP_CHANNEL, amqp_cstring_bytes(exchange),
			      amqp_cstring_bytes("fanout"), 1, 0, 0, 0, amqp_empty_table);
	int rc = judge(c, amqp_get_rpc_reply(conn), what, err, errsize);
	if (rc == BW_ENOENT)
		snprintf(err, errsize, "exchange %s does not exist", exchange);
	return rc;
}

int bw_amqp_temp_queue(struct bw_amqp *c, const char *exchange, const char *binding_key, char *name,
		       size_t size, char *err, size_t errsize)
{
	amqp_connection_state_t conn = bw__amqp_conn(c);
	amqp_queue_declare_ok_t *ok = amqp_queue_declare(conn, BW__AMQP_CHANNEL, amqp_empty_bytes,
							 0, 0, 1, 1, amqp_empty_table);
	int rc = judge(c, amqp_get_rpc_reply(conn), "temporary queue", err, errsize);
	if (rc != 0)
		return rc;
	if (ok == NULL || ok->queue.len + 1 > size) {
		snprintf(err, errsize, "temporary queue: no usable name");
		return BW_EAMQP;
	}
	memcpy(name, ok->queue.bytes, ok->queue.len);
	name[ok->queue.len] = '\0';
	char what[600];
	snprintf(what, sizeof(what), "bind %s to %s/%s", name, exchange, binding_key);
	amqp_queue_bind(conn, BW__AMQP_CHANNEL, amqp_cstring_bytes(name),
			amqp_cstring_bytes(exchange), amqp_cstring_bytes(binding_key),
			amqp_empty_table);
	rc = judge(c, amqp_get_rpc_reply(conn), what, err, errsize);
	if (rc == BW_ENOENT)
		snprintf(err, errsize, "exchange %s does not exist", exchange);
	return rc;
}

/* ---- basic.get ----------------------------------------------------------------------------- */

static struct json_object *value_json(const amqp_field_value_t *v);

static struct json_object *bytes_json(amqp_bytes_t b)
{
	/* shown as text: valid UTF-8 as it is, anything else escaped (\xNN) */
	if (b.len == 0)
		return json_object_new_string("");
	if (bw_utf8_length(b.bytes, b.len) != SIZE_MAX)
		return json_object_new_string_len(b.bytes, (int)b.len);
	size_t size = b.len * 4 + 8;
	char *t = malloc(size);
	if (t == NULL)
		return NULL;
	bw_text_escape(t, size, b.bytes, b.len);
	struct json_object *o = json_object_new_string(t);
	free(t);
	return o;
}

static struct json_object *time_json(uint64_t seconds)
{
	char buf[BW_RFC3339_SIZE];
	if (seconds > INT64_MAX / 1000 || bw_clock_rfc3339((int64_t)seconds * 1000, buf)[0] == '\0')
		return json_object_new_int64((int64_t)(seconds > INT64_MAX ? INT64_MAX : seconds));
	return json_object_new_string(buf);
}

static struct json_object *table_json(const amqp_table_t *t)
{
	struct json_object *o = json_object_new_object();
	for (int i = 0; o && i < t->num_entries; i++) {
		char key[256];
		size_t n = t->entries[i].key.len < sizeof(key) - 1 ? t->entries[i].key.len
								   : sizeof(key) - 1;
		memcpy(key, t->entries[i].key.bytes, n);
		key[n] = '\0';
		json_object_object_add(o, key, value_json(&t->entries[i].value));
	}
	return o;
}

static struct json_object *value_json(const amqp_field_value_t *v)
{
	switch (v->kind) {
	case AMQP_FIELD_KIND_BOOLEAN:
		return json_object_new_boolean(v->value.boolean);
	case AMQP_FIELD_KIND_I8:
		return json_object_new_int64(v->value.i8);
	case AMQP_FIELD_KIND_U8:
		return json_object_new_int64(v->value.u8);
	case AMQP_FIELD_KIND_I16:
		return json_object_new_int64(v->value.i16);
	case AMQP_FIELD_KIND_U16:
		return json_object_new_int64(v->value.u16);
	case AMQP_FIELD_KIND_I32:
		return json_object_new_int64(v->value.i32);
	case AMQP_FIELD_KIND_U32:
		return json_object_new_int64(v->value.u32);
	case AMQP_FIELD_KIND_I64:
		return json_object_new_int64(v->value.i64);
	case AMQP_FIELD_KIND_U64:
		return json_object_new_int64(v->value.u64 > INT64_MAX ? INT64_MAX
								      : (int64_t)v->value.u64);
	case AMQP_FIELD_KIND_F32:
		return json_object_new_double(v->value.f32);
	case AMQP_FIELD_KIND_F64:
		return json_object_new_double(v->value.f64);
	case AMQP_FIELD_KIND_DECIMAL:
		return json_object_new_int64(v->value.decimal.value);
	case AMQP_FIELD_KIND_UTF8:
	case AMQP_FIELD_KIND_BYTES:
		return bytes_json(v->value.bytes);
	case AMQP_FIELD_KIND_TIMESTAMP:
		return time_json(v->value.u64);
	case AMQP_FIELD_KIND_TABLE:
		return table_json(&v->value.table);
	case AMQP_FIELD_KIND_ARRAY: {
		struct json_object *a = json_object_new_array();
		for (int i = 0; a && i < v->value.array.num_entries; i++)
			json_object_array_add(a, value_json(&v->value.array.entries[i]));
		return a;
	}
	default:
		return NULL;
	}
}

static struct json_object *props_json(const amqp_basic_properties_t *p)
{
	struct json_object *o = json_object_new_object();
	if (o == NULL)
		return NULL;
	if (p->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG)
		json_object_object_add(o, "content_type", bytes_json(p->content_type));
	if (p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG)
		json_object_object_add(o, "message_id", bytes_json(p->message_id));
	if (p->_flags & AMQP_BASIC_DELIVERY_MODE_FLAG)
		json_object_object_add(o, "delivery_mode", json_object_new_int(p->delivery_mode));
	if (p->_flags & AMQP_BASIC_TIMESTAMP_FLAG)
		json_object_object_add(o, "timestamp", time_json(p->timestamp));
	json_object_object_add(o, "headers",
			       p->_flags & AMQP_BASIC_HEADERS_FLAG ? table_json(&p->headers)
								   : json_object_new_object());
	return o;
}

int bw_amqp_get(struct bw_amqp *c, const char *queue, struct bw_amqp_message *m, bool *got,
		char *err, size_t errsize)
{
	amqp_connection_state_t conn = bw__amqp_conn(c);
	char what[300];
	*got = false;
	snprintf(what, sizeof(what), "basic.get from %s", queue);
	amqp_rpc_reply_t r = amqp_basic_get(conn, BW__AMQP_CHANNEL, amqp_cstring_bytes(queue), 0);
	int rc = judge(c, r, what, err, errsize);
	if (rc == BW_ENOENT)
		snprintf(err, errsize, "queue %s does not exist", queue);
	if (rc != 0)
		return rc;
	if (r.reply.id == AMQP_BASIC_GET_EMPTY_METHOD)
		return 0;
	if (r.reply.id != AMQP_BASIC_GET_OK_METHOD) {
		snprintf(err, errsize, "%s: unexpected reply 0x%08x", what, r.reply.id);
		return BW_EAMQP;
	}
	uint64_t tag = ((const amqp_basic_get_ok_t *)r.reply.decoded)->delivery_tag;
	amqp_message_t msg;
	r = amqp_read_message(conn, BW__AMQP_CHANNEL, &msg, 0);
	if ((rc = bw__amqp_reply(c, r, what, err, errsize)) != 0)
		return rc;
	struct bw_amqp_message out = {tag, malloc(msg.body.len + 1), msg.body.len,
				      props_json(&msg.properties)};
	if (out.body) {
		if (msg.body.len)
			memcpy(out.body, msg.body.bytes, msg.body.len);
		out.body[msg.body.len] = '\0';
	}
	amqp_destroy_message(&msg);
	amqp_maybe_release_buffers_on_channel(conn, BW__AMQP_CHANNEL);
	if (out.body == NULL || out.props == NULL) {
		bw_amqp_message_free(&out);
		snprintf(err, errsize, "%s: out of memory", what);
		return BW_ENOMEM;
	}
	*m = out;
	*got = true;
	return 0;
}

void bw_amqp_message_free(struct bw_amqp_message *m)
{
	free(m->body);
	json_object_put(m->props);
	m->body = NULL;
	m->props = NULL;
}

int bw_amqp_settle(struct bw_amqp *c, uint64_t tag, bool ack)
{
	amqp_connection_state_t conn = bw__amqp_conn(c);
	int st = ack ? amqp_basic_ack(conn, BW__AMQP_CHANNEL, tag, 0)
		     : amqp_basic_nack(conn, BW__AMQP_CHANNEL, tag, 0, 1);
	return st == AMQP_STATUS_OK ? 0 : BW_EAMQP;
}
