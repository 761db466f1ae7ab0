/* test_amqp_admin.c: bw-ctl's broker operations (amqp_admin) against a real private broker. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "amqp.h"
#include "amqp_admin.h"

static const char *url;

static struct bw_amqp *connect_ok(const char *name, bool confirms)
{
	struct bw_amqp *c = NULL;
	char err[512] = "";
	struct bw_amqp_opts o = {url, 10, 5000, name, NULL, NULL, NULL, true, true};
	int rc = bw_amqp_connect(&c, &o, err, sizeof(err));
	if (rc == 0 && confirms)
		rc = bw_amqp_confirm_select(c, err, sizeof(err));
	if (rc != 0)
		print_message("connect: %s\n", err);
	assert_int_equal(rc, 0);
	return c;
}

static struct bw_amqp_topology topo(const char *prefix, char names[5][64])
{
	snprintf(names[0], 64, "%s.start", prefix);
	snprintf(names[1], 64, "%s.jobs", prefix);
	snprintf(names[2], 64, "%s.events", prefix);
	snprintf(names[3], 64, "%s.dlx", prefix);
	snprintf(names[4], 64, "%s.start.dlq", prefix);
	return (struct bw_amqp_topology){names[0], names[1], names[2], names[3],
					 names[4], 5,	     false, NULL, 0};
}

static int publish(struct bw_amqp *c, const char *x, const char *key, const char *id,
		   const char *body, char *err, size_t errsize)
{
	return bw_amqp_publish_confirmed(c, x, key, id, body, strlen(body), 5000, err, errsize);
}

/* The next basic.get of q, waiting up to 5 s for one to arrive. */
static bool get(struct bw_amqp *c, const char *q, struct bw_amqp_message *m)
{
	char err[512];
	for (int i = 0; i < 100; i++) {
		bool got = false;
		assert_int_equal(bw_amqp_get(c, q, m, &got, err, sizeof(err)), 0);
		if (got)
			return true;
		usleep(50000);
	}
	return false;
}

static void test_publish_confirmed_routed_unroutable_missing(void **state)
{
	(void)state;
	char names[5][64], err[512];
	struct bw_amqp_topology t = topo("a1", names);
	struct bw_amqp *c = connect_ok("admin-publish", true);
	assert_int_equal(bw_amqp_declare(c, &t, err, sizeof(err)), 0);
	assert_int_equal(
	    publish(c, t.jobs_exchange, "backup.start", "j1", "{\"a\":1}", err, sizeof(err)), 0);
	/* no queue bound with that key: returned, then acked: not a success */
	assert_int_equal(publish(c, t.jobs_exchange, "nowhere", "j2", "{}", err, sizeof(err)),
			 BW_ENOENT);
	assert_non_null(strstr(err, "unroutable"));
	/* no such exchange: said plainly, and the connection stays usable (channel reopened) */
	assert_int_equal(publish(c, "a1.missing", "k", "j3", "{}", err, sizeof(err)), BW_ENOENT);
	assert_non_null(strstr(err, "does not exist"));
	assert_int_equal(bw_amqp_exchange_exists(c, "a1.missing", err, sizeof(err)), BW_ENOENT);
	assert_int_equal(bw_amqp_exchange_exists(c, t.jobs_exchange, err, sizeof(err)), 0);
	assert_int_equal(
	    publish(c, t.jobs_exchange, "backup.start", "j4", "{\"a\":4}", err, sizeof(err)), 0);

	/* exactly the two routed ones are in the queue, persistent, with their message ids */
	struct bw_amqp_message m;
	assert_true(get(c, t.queue, &m));
	assert_string_equal(m.body, "{\"a\":1}");
	struct json_object *v = NULL;
	assert_true(json_object_object_get_ex(m.props, "message_id", &v));
	assert_string_equal(json_object_get_string(v), "j1");
	assert_true(json_object_object_get_ex(m.props, "delivery_mode", &v));
	assert_int_equal(json_object_get_int(v), 2);
	assert_int_equal(bw_amqp_settle(c, m.tag, true), 0);
	bw_amqp_message_free(&m);
	assert_true(get(c, t.queue, &m));
	assert_string_equal(m.body, "{\"a\":4}");
	assert_int_equal(bw_amqp_settle(c, m.tag, true), 0);
	bw_amqp_message_free(&m);
	bool got = true;
	assert_int_equal(bw_amqp_get(c, t.queue, &m, &got, err, sizeof(err)), 0);
	assert_false(got);
	assert_int_equal(bw_amqp_get(c, "a1.nope", &m, &got, err, sizeof(err)), BW_ENOENT);
	bw_amqp_close(c);
}

static void test_temp_queue_sees_what_is_published_after(void **state)
{
	(void)state;
	char names[5][64], err[512], q[256];
	struct bw_amqp_topology t = topo("a2", names);
	struct bw_amqp *p = connect_ok("admin-pub", true);
	struct bw_amqp *c = connect_ok("admin-follow", false);
	assert_int_equal(bw_amqp_declare(p, &t, err, sizeof(err)), 0);
	assert_int_equal(bw_amqp_temp_queue(c, "a2.none", "#", q, sizeof(q), err, sizeof(err)),
			 BW_ENOENT);
	assert_int_equal(
	    bw_amqp_temp_queue(c, t.events_exchange, "#", q, sizeof(q), err, sizeof(err)), 0);
	assert_true(strncmp(q, "amq.gen-", 8) == 0);
	assert_int_equal(
	    publish(p, t.events_exchange, "backup.completed", "e1", "{\"e\":1}", err, sizeof(err)),
	    0);
	assert_int_equal(bw_amqp_consume(c, q, 8, err, sizeof(err)), 0);
	struct bw_delivery d;
	bool got = false;
	for (int i = 0; i < 500 && !got; i++) {
		assert_int_equal(bw_amqp_poll(c, &d, &got, err, sizeof(err)), 0);
		if (!got) {
			struct pollfd pf = {bw_amqp_fd(c), POLLIN, 0};
			poll(&pf, 1, 10);
		}
	}
	assert_true(got);
	assert_string_equal(d.body, "{\"e\":1}");
	assert_int_equal(bw_amqp_ack(c, &d), 0);
	bw_delivery_free(&d);
	bw_amqp_close(c);
	/* exclusive and auto-delete: gone with its connection, so events stop piling up there */
	struct bw_amqp_message m;
	assert_int_equal(bw_amqp_get(p, q, &m, &got, err, sizeof(err)), BW_ENOENT);
	bw_amqp_close(p);
}

static void test_dead_letters_read_with_x_death_and_given_back_in_order(void **state)
{
	(void)state;
	char names[5][64], err[512];
	struct bw_amqp_topology t = topo("a3", names);
	struct bw_amqp *c = connect_ok("admin-dlq", true);
	assert_int_equal(bw_amqp_declare(c, &t, err, sizeof(err)), 0);
	const char *bodies[3] = {"{\"n\":0}", "{\"n\":1}", "{\"n\":2}"};
	for (int i = 0; i < 3; i++)
		assert_int_equal(publish(c, t.jobs_exchange, "backup.start", bodies[i], bodies[i],
					 err, sizeof(err)),
				 0);
	/* a consumer rejects them: dead-lettered with x-death, in order */
	struct bw_amqp *w = connect_ok("admin-dlq-worker", false);
	assert_int_equal(bw_amqp_consume(w, t.queue, 1, err, sizeof(err)), 0);
	for (int i = 0; i < 3;) {
		struct bw_delivery d;
		bool got = false;
		assert_int_equal(bw_amqp_poll(w, &d, &got, err, sizeof(err)), 0);
		if (!got) {
			struct pollfd pf = {bw_amqp_fd(w), POLLIN, 0};
			poll(&pf, 1, 10);
			continue;
		}
		assert_string_equal(d.body, bodies[i]);
		assert_int_equal(bw_amqp_reject(w, &d), 0);
		bw_delivery_free(&d);
		i++;
	}
	bw_amqp_close(w);
	struct bw_amqp_message m[3];
	for (int round = 0; round < 3; round++) {
		for (int i = 0; i < 3; i++)
			assert_true(get(c, t.dlq, &m[i]));
		for (int i = 0; i < 3; i++) {
			assert_string_equal(m[i].body,
					    bodies[i]); /* the order survived the last round */
			struct json_object *h = NULL, *xd = NULL, *v = NULL;
			assert_true(json_object_object_get_ex(m[i].props, "headers", &h));
			assert_true(json_object_object_get_ex(h, "x-death", &xd));
			struct json_object *d0 = json_object_array_get_idx(xd, 0);
			assert_true(json_object_object_get_ex(d0, "reason", &v));
			assert_string_equal(json_object_get_string(v), "rejected");
			assert_true(json_object_object_get_ex(d0, "queue", &v));
			assert_string_equal(json_object_get_string(v), t.queue);
			assert_true(json_object_object_get_ex(d0, "time", &v));
			assert_true(json_object_is_type(v, json_type_string)); /* RFC 3339 */
			assert_true(json_object_object_get_ex(d0, "routing-keys", &v));
			assert_string_equal(json_object_get_string(json_object_array_get_idx(v, 0)),
					    "backup.start");
		}
		for (int i = 0; i < 3; i++) { /* given back first to last: the order holds */
			assert_int_equal(bw_amqp_settle(c, m[i].tag, false), 0);
			bw_amqp_message_free(&m[i]);
		}
	}
	bw_amqp_close(c);
}

int main(void)
{
	url = getenv("BW_TEST_AMQP_URL");
	if (url == NULL) {
		fprintf(stderr, "test_amqp_admin: run me through tests/with-broker\n");
		return 1;
	}
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_publish_confirmed_routed_unroutable_missing),
	    cmocka_unit_test(test_temp_queue_sees_what_is_published_after),
	    cmocka_unit_test(test_dead_letters_read_with_x_death_and_given_back_in_order),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
