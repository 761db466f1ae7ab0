/* test_http.c: the event-loop HTTP listener against a real client (curl in a child): GET to the handler, 405, a taken port, addresses. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "http.h"

/* What the handler saw and how it answers. */
struct seen {
	int calls;
	char path[256];
	int status;
};

static void handler_cb(void *arg, const char *path, struct bw_http_reply *r)
{
	struct seen *s = arg;
	s->calls++;
	snprintf(s->path, sizeof(s->path), "%s", path);
	r->status = s->status;
	r->content_type = "text/x-test";
	bw_buf_printf(&r->body, "hello %s\n", path);
}

/*
 * Runs curl with args against the listener (in a child), serving it from this process's
 * "loop" (poll on bw_http_fd, bw_http_run) until curl exits; returns what curl printed:
 * the body, then "|<status>|<content type>".
 */
static char *fetch(struct bw_http *h, const char *method, const char *path)
{
	char url[300], out[] = "/tmp/bw-test-http.XXXXXX";
	snprintf(url, sizeof(url), "http://%s%s", bw_http_address(h), path);
	int fd = mkstemp(out);
	assert_true(fd >= 0);
	pid_t pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		dup2(fd, STDOUT_FILENO);
		execlp("curl", "curl", "-s", "-g", "-X", method, "-w", "|%{http_code}|%{content_type}",
		       "--max-time", "10", url, (char *)NULL);
		_exit(127);
	}
	close(fd);
	int64_t end = bw_clock_mono_ms() + 15000;
	int status = 0;
	while (waitpid(pid, &status, WNOHANG) == 0) {
		assert_true(bw_clock_mono_ms() < end);
		int t = bw_http_timeout_ms(h);
		struct pollfd p = {bw_http_fd(h), POLLIN, 0};
		poll(&p, 1, t < 0 || t > 20 ? 20 : t);
		bw_http_run(h);
	}
	assert_true(WIFEXITED(status));
	FILE *f = fopen(out, "r");
	assert_non_null(f);
	static char buf[1024];
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	buf[n] = '\0';
	fclose(f);
	unlink(out);
	return strdup(buf);
}

static void test_serves_get_and_refuses_others(void **state)
{
	(void)state;
	struct seen s = {0, "", 200};
	struct bw_http *h = NULL;
	char err[256];
	assert_int_equal(bw_http_open(&h, "127.0.0.1:0", handler_cb, &s, err, sizeof(err)), 0);
	assert_true(strncmp(bw_http_address(h), "127.0.0.1:", 10) == 0);
	assert_true(atoi(bw_http_address(h) + 10) > 0);

	char *got = fetch(h, "GET", "/metrics?x=1");
	assert_string_equal(got, "hello /metrics\n|200|text/x-test");
	assert_string_equal(s.path, "/metrics");
	free(got);

	s.status = 503;
	got = fetch(h, "GET", "/healthz");
	assert_string_equal(got, "hello /healthz\n|503|text/x-test");
	free(got);

	int calls = s.calls;
	got = fetch(h, "POST", "/metrics");
	assert_non_null(strstr(got, "|405|text/plain"));
	free(got);
	assert_int_equal(s.calls, calls); /* the handler never sees it */
	bw_http_close(h);
}

static void test_port_taken_and_bad_addresses(void **state)
{
	(void)state;
	struct seen s = {0, "", 200};
	struct bw_http *h = NULL, *again = NULL;
	char err[256];
	assert_int_equal(bw_http_open(&h, "127.0.0.1:0", handler_cb, &s, err, sizeof(err)), 0);
	char taken[64];
	snprintf(taken, sizeof(taken), "%s", bw_http_address(h));
	assert_int_equal(bw_http_open(&again, taken, handler_cb, &s, err, sizeof(err)), BW_EADDRINUSE);
	assert_non_null(strstr(err, taken));
	assert_non_null(strstr(err, "Address already in use"));
	assert_int_equal(bw_http_open(&again, "host.invalid:9464", handler_cb, &s, err, sizeof(err)),
			 BW_ECONFIG);
	assert_int_equal(bw_http_open(&again, "9464", handler_cb, &s, err, sizeof(err)), BW_ECONFIG);
	/* 192.0.2.1 (TEST-NET-1) is no address of this host */
	assert_int_equal(bw_http_open(&again, "192.0.2.1:9464", handler_cb, &s, err, sizeof(err)),
			 BW_ECONFIG);
	bw_http_close(h);
	/* closed: the port can be taken again at once */
	assert_int_equal(bw_http_open(&h, taken, handler_cb, &s, err, sizeof(err)), 0);
	bw_http_close(h);
	bw_http_close(NULL);
}

static void test_ipv6(void **state)
{
	(void)state;
	struct seen s = {0, "", 200};
	struct bw_http *h = NULL;
	char err[256];
	int rc = bw_http_open(&h, "[::1]:0", handler_cb, &s, err, sizeof(err));
	if (rc == BW_ECONFIG) {
		print_message("no IPv6 loopback here (%s): skipped\n", err);
		return;
	}
	assert_int_equal(rc, 0);
	assert_true(strncmp(bw_http_address(h), "[::1]:", 6) == 0);
	char *got = fetch(h, "GET", "/x");
	assert_string_equal(got, "hello /x\n|200|text/x-test");
	free(got);
	bw_http_close(h);
}

int main(void)
{
	signal(SIGPIPE, SIG_IGN);
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_serves_get_and_refuses_others),
		cmocka_unit_test(test_port_taken_and_bad_addresses),
		cmocka_unit_test(test_ipv6),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
