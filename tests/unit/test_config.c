/* test_config.c: defaults, the INI file, env and --set precedence, errors with their lines. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <amqp.h>

#include "child.h"
#include "amqp.h"
#include "config.h"
#include "../testutil.h"

static char conf_path[] = "/tmp/bw-test-config-XXXXXX";

static void write_conf(const char *text)
{
	assert_int_equal(bw_test_write_file(conf_path, text, 0600), 0); /* mkstemp's mode */
}

static int setup(void **state)
{
	(void)state;
	int fd = mkstemp(conf_path);
	if (fd < 0)
		return -1;
	close(fd);
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	unlink(conf_path);
	return 0;
}

static void test_defaults(void **state)
{
	(void)state;
	struct bw_config *cfg = NULL;
	assert_int_equal(bw_config_load(&cfg, NULL, NULL, 0, NULL), 0);
	assert_string_equal(cfg->amqp_url, "amqp://guest:guest@127.0.0.1:5672");
	assert_string_equal(cfg->amqp_queue, "backup.start");
	assert_string_equal(cfg->amqp_jobs_exchange, "backup.jobs");
	assert_string_equal(cfg->amqp_events_exchange, "backup.events");
	assert_string_equal(cfg->amqp_dlx, "backup.dlx");
	assert_int_equal(cfg->amqp_heartbeat_s, 30);
	assert_int_equal(cfg->worker_max_jobs, 4);
	assert_int_equal(cfg->amqp_prefetch, 4); /* = worker.max_jobs */
	assert_string_equal(cfg->worker_state_dir, "/var/lib/bw-worker");
	assert_string_equal(cfg->ledger_path, "/var/lib/bw-worker/ledger.db");
	assert_int_equal(cfg->nbd_port_min, 10100);
	assert_int_equal(cfg->nbd_port_max, 10200);
	assert_string_equal(cfg->nbd_bind_address, "127.0.0.1");
	assert_string_equal(cfg->nbd_advertise_host, "127.0.0.1");
	assert_int_equal(cfg->nbd_shared, 8);
	/* bare names, resolved at load in the trusted path */
	char want[PATH_MAX];
	assert_int_equal(bw_child_find_program("qemu-nbd", want, sizeof(want)), 0);
	assert_string_equal(cfg->nbd_qemu_nbd, want);
	assert_int_equal(bw_child_find_program("qemu-img", want, sizeof(want)), 0);
	assert_string_equal(cfg->nbd_qemu_img, want);
	assert_true(cfg->nbd_qemu_nbd[0] == '/' && strstr(cfg->nbd_qemu_nbd, "/qemu-nbd"));
	assert_string_equal(cfg->sna_url, "http://127.0.0.1:8081");
	assert_int_equal(cfg->sna_connect_timeout_s, 5);
	assert_int_equal(cfg->sna_timeout_s, 30);
	assert_int_equal(cfg->sna_max_attempts, 5);
	assert_int_equal(cfg->sna_backoff_base_ms, 1000);
	assert_int_equal(cfg->sna_backoff_cap_s, 60);
	assert_int_equal(cfg->sna_poll_interval_s, 5);
	assert_int_equal(cfg->sna_lost_after, 3);
	assert_int_equal(cfg->job_max_duration_s, 86400);
	assert_int_equal(cfg->job_port_wait_s, 600);
	assert_int_equal(cfg->job_max_message_bytes, 262144);
	assert_int_equal(cfg->job_cancel_memory_s, 86400);
	assert_int_equal(cfg->ledger_retention_days, 14);
	assert_string_equal(cfg->metrics_listen, "");
	assert_string_equal(cfg->amqp_control_exchange, "backup.control");
	assert_string_equal(cfg->log_format, "text");
	char host[256] = "";
	assert_int_equal(gethostname(host, sizeof(host) - 1), 0);
	assert_string_equal(cfg->worker_host, host);
	assert_non_null(strchr(cfg->worker_id, '-'));
	assert_int_equal(cfg->n_repositories, 0);
	bw_config_free(cfg);
}

static void test_file_env_set_order(void **state)
{
	(void)state;
	write_conf("# comment\n"
		   "[worker]\n"
		   "max_jobs = 7\n"
		   "state_dir = /srv/bw\n"
		   "\n"
		   "[nbd]\n"
		   "port_min = 20000\n"
		   "port_max = 20010\n"
		   "shared = 3\n"
		   "[repositories]\n"
		   "repo-001 = /srv/repo1\n"
		   "repo.two = \"/srv/repo 2\"\n");
	setenv("BW_NBD_PORT_MAX", "20020", 1);
	setenv("BW_NBD_SHARED", "4", 1);
	setenv("BW_REPOSITORIES_REPO_001", "/srv/env-repo1", 1);
	char set1[] = "nbd.shared=5";
	char set2[] = "repositories.repo-003=/srv/r3";
	char *sets[] = {set1, set2};
	struct bw_config *cfg = NULL;
	char *errors = NULL;
	assert_int_equal(bw_config_load(&cfg, conf_path, sets, 2, &errors), 0);
	unsetenv("BW_NBD_PORT_MAX");
	unsetenv("BW_NBD_SHARED");
	unsetenv("BW_REPOSITORIES_REPO_001");
	assert_int_equal(cfg->worker_max_jobs, 7);
	assert_int_equal(cfg->amqp_prefetch, 7);
	assert_string_equal(cfg->ledger_path, "/srv/bw/ledger.db");
	assert_int_equal(cfg->nbd_port_min, 20000);
	assert_int_equal(cfg->nbd_port_max, 20020); /* env over file */
	assert_int_equal(cfg->nbd_shared, 5);       /* --set over env */
	assert_string_equal(bw_config_repository(cfg, "repo-001"), "/srv/env-repo1");
	assert_string_equal(bw_config_repository(cfg, "repo.two"), "/srv/repo 2");
	assert_string_equal(bw_config_repository(cfg, "repo-003"), "/srv/r3");
	assert_null(bw_config_repository(cfg, "repo-004"));
	bw_config_free(cfg);
}

/* Loads path (NULL: none) with the sets; returns the error text (malloc'd), or NULL when it
 * loaded. */
static char *load_errors(const char *path, char **sets, size_t nsets)
{
	struct bw_config *cfg = NULL;
	char *errors = NULL;
	int rc = bw_config_load(&cfg, path, sets, nsets, &errors);
	if (rc == 0) {
		bw_config_free(cfg);
		return NULL;
	}
	assert_int_equal(rc, BW_ECONFIG);
	assert_null(cfg);
	assert_non_null(errors);
	return errors;
}

static void test_errors_name_file_line_key(void **state)
{
	(void)state;
	write_conf("[amqp]\n"
		   "url = http://wrong\n"
		   "heartbeat_s = 0\n"
		   "[nbd]\n"
		   "port_min = 300\n"
		   "port_max = 200\n"
		   "bind_address = localhost\n"
		   "shared = many\n"
		   "colour = blue\n"
		   "port_min = 301\n"
		   "[bogus]\n"
		   "x = 1\n"
		   "just text\n"
		   "[repositories]\n"
		   "bad:id = /x\n"
		   "relative = x/y\n"
		   "[log]\n"
		   "timestamps = perhaps\n");
	char *errors = load_errors(conf_path, NULL, 0);
	char want[4096];
	snprintf(want, sizeof(want),
		 "%1$s:2: amqp.url: must start with amqp:// or amqps://\n"
		 "%1$s:3: amqp.heartbeat_s: out of range (allowed 1-600)\n"
		 "%1$s:7: nbd.bind_address: must be a numeric IPv4 or IPv6 address\n"
		 "%1$s:8: nbd.shared: not an integer: \"many\"\n"
		 "%1$s:9: nbd.colour: unknown key\n"
		 "%1$s:10: nbd.port_min: set twice (first on line 5)\n"
		 "%1$s:12: bogus.x: unknown section\n"
		 "%1$s:13: just: expected \"key = value\" (the rest of the line is not shown)\n"
		 "%1$s:15: repositories.bad:id: repository id must start with a letter or digit "
		 "and contain only [A-Za-z0-9._-]\n"
		 "%1$s:16: repositories.relative: must be an absolute path\n"
		 "%1$s:18: log.timestamps: not a boolean (true/false, yes/no, on/off, 1/0): "
		 "\"perhaps\"\n"
		 "%1$s:6: nbd.port_max: must not be below nbd.port_min (300)\n",
		 conf_path);
	assert_string_equal(errors, want);
	free(errors);
}

static void test_env_and_set_errors(void **state)
{
	(void)state;
	setenv("BW_SNA_TIMEOUT_S", "0", 1);
	char set1[] = "sna.max_attempts=101";
	char set2[] = "nonsense";
	char set3[] = "sna.nope=1";
	char *sets[] = {set1, set2, set3};
	struct bw_config *cfg = NULL;
	char *errors = NULL;
	assert_int_equal(bw_config_load(&cfg, NULL, sets, 3, &errors), BW_ECONFIG);
	unsetenv("BW_SNA_TIMEOUT_S");
	assert_string_equal(errors,
			    "BW_SNA_TIMEOUT_S: sna.timeout_s: out of range (allowed 1-3600)\n"
			    "--set: sna.max_attempts: out of range (allowed 1-100)\n"
			    "--set: nonsense: expected section.key=value\n"
			    "--set: sna.nope: unknown key\n");
	free(errors);
}

static void test_metrics_listen(void **state)
{
	(void)state;
	static const char *const good[] = {"127.0.0.1:9464", "[::1]:9464", "localhost:1",
					   "0.0.0.0:65535"};
	static const char *const bad[] = {"9464", ":9464", "127.0.0.1:", "127.0.0.1:0",
					  "127.0.0.1:65536", "::1:9464", "[::1:9464",
					  "[nope]:1", "a b:1", "127.0.0.1:9x"};
	char set[128];
	char *sets[] = {set};
	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		struct bw_config *cfg = NULL;
		snprintf(set, sizeof(set), "metrics.listen=%s", good[i]);
		assert_int_equal(bw_config_load(&cfg, NULL, sets, 1, NULL), 0);
		assert_string_equal(cfg->metrics_listen, good[i]);
		bw_config_free(cfg);
	}
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		struct bw_config *cfg = NULL;
		char *errors = NULL;
		snprintf(set, sizeof(set), "metrics.listen=%s", bad[i]);
		assert_int_equal(bw_config_load(&cfg, NULL, sets, 1, &errors), BW_ECONFIG);
		assert_non_null(strstr(errors, "--set: metrics.listen: "));
		free(errors);
	}
}

static void test_missing_file(void **state)
{
	(void)state;
	struct bw_config *cfg = NULL;
	char *errors = NULL;
	assert_int_equal(bw_config_load(&cfg, "/nonexistent/bw.conf", NULL, 0, &errors), BW_ENOENT);
	assert_string_equal(errors, "/nonexistent/bw.conf: cannot open: No such file or directory\n");
	free(errors);
}

static void test_format_masks_secrets(void **state)
{
	(void)state;
	char set1[] = "sna.token=s3cr3t-token";
	char set2[] = "amqp.url=amqps://bw:hunter2@mq.example:5671/prod";
	char *sets[] = {set1, set2};
	struct bw_config *cfg = NULL;
	char *text = NULL;
	assert_int_equal(bw_config_load(&cfg, NULL, sets, 2, NULL), 0);
	assert_int_equal(bw_config_format(cfg, &text), 0);
	assert_null(strstr(text, "s3cr3t"));
	assert_null(strstr(text, "hunter2"));
	assert_non_null(strstr(text, "sna.token = ***\n"));
	assert_non_null(strstr(text, "amqp.url = amqps://bw:***@mq.example:5671/prod\n"));
	assert_non_null(strstr(text, "nbd.port_min = 10100\n"));
	free(text);
	bw_config_free(cfg);
}

static void test_program_paths(void **state)
{
	(void)state;
	char set1[] = "nbd.qemu_nbd=/usr/bin/env";
	char set2[] = "nbd.qemu_img=env";
	char *sets[] = {set1, set2};
	struct bw_config *cfg = NULL;
	assert_int_equal(bw_config_load(&cfg, NULL, sets, 2, NULL), 0);
	assert_string_equal(cfg->nbd_qemu_nbd, "/usr/bin/env"); /* absolute: as is */
	char want[PATH_MAX];
	assert_int_equal(bw_child_find_program("env", want, sizeof(want)), 0);
	assert_string_equal(cfg->nbd_qemu_img, want);
	bw_config_free(cfg);

	char rel[] = "nbd.qemu_nbd=bin/qemu-nbd";
	char *e = load_errors(NULL, (char *[]){rel}, 1);
	assert_string_equal(e, "--set: nbd.qemu_nbd: must be an absolute path or a bare program "
			       "name (looked up in /usr/local/sbin:/usr/local/bin:/usr/sbin:"
			       "/usr/bin:/sbin:/bin)\n");
	free(e);
	char dot[] = "nbd.qemu_img=./qemu-img";
	e = load_errors(NULL, (char *[]){dot}, 1);
	assert_non_null(strstr(e, "--set: nbd.qemu_img: must be an absolute path"));
	free(e);
	char missing[] = "nbd.qemu_nbd=bw-no-such-program";
	e = load_errors(NULL, (char *[]){missing}, 1);
	assert_string_equal(e, "--set: nbd.qemu_nbd: bw-no-such-program not found in "
			       "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin (give an "
			       "absolute path to use another)\n");
	free(e);
	char notexec[PATH_MAX + 16];
	snprintf(notexec, sizeof(notexec), "nbd.qemu_nbd=%s", conf_path); /* mode 0600 */
	e = load_errors(NULL, (char *[]){notexec}, 1);
	assert_string_equal(e, "--set: nbd.qemu_nbd: is not an executable file\n");
	free(e);
	char adir[] = "nbd.qemu_img=/usr/bin";
	e = load_errors(NULL, (char *[]){adir}, 1);
	assert_string_equal(e, "--set: nbd.qemu_img: is not an executable file\n");
	free(e);
	char gone[] = "nbd.qemu_img=/nonexistent/qemu-img";
	e = load_errors(NULL, (char *[]){gone}, 1);
	assert_string_equal(e, "--set: nbd.qemu_img: No such file or directory\n");
	free(e);

	/* $PATH is never searched: a program only it knows is not found. */
	char dir[] = "/tmp/bw-test-config-path-XXXXXX";
	assert_non_null(mkdtemp(dir));
	char prog[PATH_MAX];
	snprintf(prog, sizeof(prog), "%s/bw-fake-qemu-nbd", dir);
	assert_int_equal(bw_test_write_file(prog, "#!/bin/sh\n", 0755), 0);
	char *old = strdup(getenv("PATH") ? getenv("PATH") : "/usr/bin:/bin");
	setenv("PATH", dir, 1);
	char fake[] = "nbd.qemu_nbd=bw-fake-qemu-nbd";
	e = load_errors(NULL, (char *[]){fake}, 1);
	setenv("PATH", old, 1);
	free(old);
	unlink(prog);
	rmdir(dir);
	assert_non_null(strstr(e, "bw-fake-qemu-nbd not found in /usr/local/sbin:"));
	free(e);
}

static void test_exposure_refused_and_warned(void **state)
{
	(void)state;
	write_conf("[nbd]\n"
		   "bind_address = 192.0.2.10\n"
		   "tls = off\n"
		   "[sna]\n"
		   "url = http://sna.example\n"
		   "[amqp]\n"
		   "url = amqps://bw:pw@mq.example\n"
		   "tls_verify_hostname = false\n");
	struct bw_config *cfg = NULL;
	char *errors = load_errors(conf_path, NULL, 0);
	char want[4096];
	snprintf(want, sizeof(want),
		 "%1$s:3: nbd.tls: off with the non-loopback nbd.bind_address 192.0.2.10 (%1$s:2) "
		 "serves every backup as plain NBD that anyone who reaches the port can read and "
		 "overwrite; use auto or psk, or set nbd.allow_plaintext = true if you mean it\n"
		 "%1$s:5: sna.url: http:// to the non-loopback host sna.example sends the vCenter "
		 "password and the NBD key in clear text; use https://, or set sna.allow_plaintext "
		 "= true if you mean it\n"
		 "%1$s:8: amqp.tls_verify_hostname: warning: false: any certificate the CA signed, "
		 "for any host, is taken for the broker's\n",
		 conf_path);
	assert_string_equal(errors, want);
	free(errors);

	/* Meant: loaded, the warning kept in the config for the caller to print or log. */
	char set1[] = "nbd.allow_plaintext=true";
	char set2[] = "sna.allow_plaintext=yes";
	char *sets[] = {set1, set2};
	assert_int_equal(bw_config_load(&cfg, conf_path, sets, 2, &errors), 0);
	snprintf(want, sizeof(want),
		 "%s:8: amqp.tls_verify_hostname: warning: false: any certificate the CA signed, "
		 "for any host, is taken for the broker's\n",
		 conf_path);
	assert_string_equal(cfg->warnings, want);
	assert_false(bw_config_nbd_psk(cfg));
	bw_config_free(cfg);

	assert_int_equal(bw_config_load(&cfg, NULL, NULL, 0, NULL), 0);
	assert_null(cfg->warnings); /* the defaults are quiet */
	bw_config_free(cfg);
}

#define SECRET "Zq9-hunter2-secret"

static void test_format_masks_every_url_password(void **state)
{
	(void)state;
	char set1[] = "amqp.url=amqps://bw:" SECRET "a@mq1.example:5671/prod,"
		      "amqp://bw:" SECRET "b@127.0.0.1:5672,amqps://nopw@mq3.example";
	char set2[] = "sna.url=https://api:" SECRET "c@sna.example:8443/base";
	char set3[] = "sna.token=" SECRET "d";
	char *sets[] = {set1, set2, set3};
	struct bw_config *cfg = NULL;
	char *text = NULL;
	assert_int_equal(bw_config_load(&cfg, NULL, sets, 3, NULL), 0);
	assert_int_equal(bw_config_format(cfg, &text), 0);
	assert_null(strstr(text, SECRET));
	assert_non_null(strstr(text, "amqp.url = amqps://bw:***@mq1.example:5671/prod,"
				     "amqp://bw:***@127.0.0.1:5672,amqps://nopw@mq3.example\n"));
	assert_non_null(strstr(text, "sna.url = https://api:***@sna.example:8443/base\n"));
	assert_non_null(strstr(text, "sna.token = ***\n"));
	free(text);
	bw_config_free(cfg);

	/* A password with a raw '/' (not %2F) is masked all the same. */
	char set4[] = "sna.url=https://api:ab/" SECRET "@sna.example";
	assert_int_equal(bw_config_load(&cfg, NULL, (char *[]){set4}, 1, NULL), 0);
	assert_int_equal(bw_config_format(cfg, &text), 0);
	assert_null(strstr(text, SECRET));
	assert_non_null(strstr(text, "sna.url = https://api:***@sna.example\n"));
	free(text);
	bw_config_free(cfg);
}

static void test_errors_never_echo_a_secret(void **state)
{
	(void)state;
	write_conf("[sna]\n"
		   "token " SECRET "\n"
		   "token: " SECRET "\n"
		   "url = http://u:" SECRET "@sna.example\n"
		   "[amqp]\n"
		   "url = amqp://bw:" SECRET "@mq.example:5672\n");
	char set1[] = "sna.token " SECRET;      /* no '=' */
	char set2[] = "sna_token=" SECRET;      /* no '.' */
	char set3[] = "sna.tokn=" SECRET;       /* unknown key */
	char set4[] = "sna.token=a " SECRET;    /* a bad value for a secret key */
	char set5[] = "amqp.url=amqq://bw:" SECRET "@mq.example"; /* a broken URL */
	char *sets[] = {set1, set2, set3, set4, set5};
	char *errors = load_errors(conf_path, sets, 5);
	char want[4096];
	snprintf(want, sizeof(want),
		 "%1$s:2: token: expected \"key = value\" (the rest of the line is not shown)\n"
		 "%1$s:3: token: expected \"key = value\" (the rest of the line is not shown)\n"
		 "--set: sna.token: expected section.key=value (the value is not shown)\n"
		 "--set: sna_token: expected section.key=value (the value is not shown)\n"
		 "--set: sna.tokn: unknown key\n"
		 "--set: sna.token: must not contain spaces or control characters\n"
		 "--set: amqp.url: must start with amqp:// or amqps://\n"
		 "%1$s:4: sna.url: http:// to the non-loopback host sna.example sends the vCenter "
		 "password and the NBD key in clear text; use https://, or set sna.allow_plaintext "
		 "= true if you mean it\n"
		 "%1$s:6: amqp.url: warning: amqp:// to the non-loopback broker mq.example sends "
		 "the broker password and every message in clear text; use amqps://\n",
		 conf_path);
	assert_string_equal(errors, want);
	assert_null(strstr(errors, SECRET));
	free(errors);
}

static void test_amqp_url_node_count_is_bounded(void **state)
{
	(void)state;
	char set[64 + 40 * (BW_AMQP_MAX_NODES + 1)] = "amqp.url=";
	for (int i = 0; i <= BW_AMQP_MAX_NODES; i++)
		snprintf(set + strlen(set), sizeof(set) - strlen(set), "%samqp://127.0.0.1:%d",
			 i ? "," : "", 5672 + i);
	char *sets[] = {set};
	char *errors = load_errors(NULL, sets, 1);
	assert_string_equal(errors, "--set: amqp.url: lists more than 16 nodes\n");
	free(errors);
	/* as many as a link holds is fine */
	*strrchr(set, ',') = '\0';
	struct bw_config *cfg = NULL;
	assert_int_equal(bw_config_load(&cfg, NULL, sets, 1, NULL), 0);
	bw_config_free(cfg);
}

/* Writes text to path with mode; returns path. */
static const char *put_file(const char *path, const char *text, mode_t mode)
{
	assert_int_equal(bw_test_write_file(path, text, mode), 0);
	return path;
}

static void test_secrets_from_files(void **state)
{
	(void)state;
	char dir[] = "/tmp/bw-test-config-secrets-XXXXXX";
	assert_non_null(mkdtemp(dir));
	char token[PATH_MAX], pw[PATH_MAX], conf[2 * PATH_MAX + 512];
	snprintf(token, sizeof(token), "%s/token", dir);
	snprintf(pw, sizeof(pw), "%s/amqp.pw", dir);
	put_file(token, SECRET "-tok\n", 0600);
	put_file(pw, "p@ss/w:rd " SECRET "\n", 0400);
	snprintf(conf, sizeof(conf),
		 "[amqp]\n"
		 "url = amqps://bw:inline@mq1.example:5671/prod,amqps://bw@127.0.0.1\n"
		 "password_file = %s\n"
		 "[sna]\n"
		 "token = inline-token\n"
		 "token_file = %s\n",
		 pw, token);
	write_conf(conf);
	struct bw_config *cfg = NULL;
	char *errors = NULL;
	int rc = bw_config_load(&cfg, conf_path, NULL, 0, &errors);
	if (rc != 0)
		fprintf(stderr, "%s", errors);
	assert_int_equal(rc, 0);
	/* the files win; the password percent-encoded into every node */
	assert_string_equal(cfg->sna_token, SECRET "-tok");
	assert_string_equal(cfg->amqp_url, "amqps://bw:p%40ss%2Fw%3Ard%20" SECRET
					   "@mq1.example:5671/prod,"
					   "amqps://bw:p%40ss%2Fw%3Ard%20" SECRET "@127.0.0.1");
	/* as librabbitmq-c reads it back */
	char node[512];
	snprintf(node, sizeof(node), "%.*s", (int)strcspn(cfg->amqp_url, ","), cfg->amqp_url);
	struct amqp_connection_info info;
	assert_int_equal(amqp_parse_url(node, &info), AMQP_STATUS_OK);
	assert_string_equal(info.user, "bw");
	assert_string_equal(info.password, "p@ss/w:rd " SECRET);
	assert_string_equal(info.host, "mq1.example");
	char *text = NULL;
	assert_int_equal(bw_config_format(cfg, &text), 0);
	assert_null(strstr(text, SECRET));
	assert_non_null(strstr(text, "amqp.url = amqps://bw:***@mq1.example:5671/prod,"
				     "amqps://bw:***@127.0.0.1\n"));
	free(text);
	bw_config_free(cfg);

	/* Refused: group-readable, a symlink, missing, empty, a node without a user. */
	char link[PATH_MAX], want[4 * PATH_MAX];
	snprintf(link, sizeof(link), "%s/link", dir);
	assert_int_equal(symlink(token, link), 0);
	assert_int_equal(chmod(pw, 0640), 0);
	snprintf(conf, sizeof(conf),
		 "[amqp]\n"
		 "password_file = %s\n"
		 "[sna]\n"
		 "token_file = %s\n",
		 pw, link);
	write_conf(conf);
	errors = load_errors(conf_path, NULL, 0);
	snprintf(want, sizeof(want),
		 "%1$s:4: sna.token_file: %2$s: is a symbolic link (refused)\n"
		 "%1$s:2: amqp.password_file: %3$s refused: mode 0640 owner %4$u (must be 0600 "
		 "or 0400, owned by uid %4$u)\n",
		 conf_path, link, pw, (unsigned)geteuid());
	assert_string_equal(errors, want);
	free(errors);

	char empty[PATH_MAX], nl[PATH_MAX + 16], missing[PATH_MAX + 16];
	snprintf(empty, sizeof(empty), "%s/empty", dir);
	put_file(empty, "\n", 0600);
	snprintf(nl, sizeof(nl), "sna.token_file=%s", empty);
	snprintf(missing, sizeof(missing), "amqp.password_file=%s/nope", dir);
	char *sets[] = {nl, missing};
	errors = load_errors(NULL, sets, 2);
	snprintf(want, sizeof(want),
		 "--set: sna.token_file: %1$s: is empty\n"
		 "--set: amqp.password_file: %2$s/nope: No such file or directory\n",
		 empty, dir);
	assert_string_equal(errors, want);
	free(errors);

	assert_int_equal(chmod(pw, 0600), 0);
	char pwset[PATH_MAX + 32];
	snprintf(pwset, sizeof(pwset), "amqp.password_file=%s", pw);
	char nouser[] = "amqp.url=amqp://127.0.0.1,amqp://mq2.example";
	char *sets2[] = {pwset, nouser};
	assert_int_equal(bw_config_load(&cfg, NULL, sets2, 2, &errors), BW_ECONFIG);
	assert_null(strstr(errors, SECRET));
	assert_string_equal(errors, "--set: amqp.password_file: needs a user name in every node "
				    "of amqp.url (amqp://USER@host), node 1 has none\n"
				    "--set: amqp.url: warning: node 2: amqp:// to the non-loopback "
				    "broker mq2.example sends the broker password and every message "
				    "in clear text; use amqps://\n");
	free(errors);

	char badtok[PATH_MAX];
	snprintf(badtok, sizeof(badtok), "%s/badtok", dir);
	put_file(badtok, "two " SECRET "\n", 0600);
	char tokset[PATH_MAX + 32];
	snprintf(tokset, sizeof(tokset), "sna.token_file=%s", badtok);
	assert_int_equal(bw_config_load(&cfg, NULL, (char *[]){tokset}, 1, &errors), BW_ECONFIG);
	assert_null(strstr(errors, SECRET));
	assert_non_null(strstr(errors, "must hold one token without spaces"));
	free(errors);

	char cmd[PATH_MAX + 16];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	assert_int_equal(system(cmd), 0);
}

static void test_sample_config_is_valid(void **state)
{
	(void)state;
	struct bw_config *cfg = NULL;
	char *errors = NULL;
	int rc = bw_config_load(&cfg, BW_SOURCE_DIR "/deploy/bw-worker.conf", NULL, 0, &errors);
	if (rc != 0)
		fprintf(stderr, "%s", errors ? errors : "");
	assert_int_equal(rc, 0);
	assert_true(cfg->n_repositories >= 1);
	bw_config_free(cfg);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_defaults),
		cmocka_unit_test(test_file_env_set_order),
		cmocka_unit_test(test_errors_name_file_line_key),
		cmocka_unit_test(test_env_and_set_errors),
		cmocka_unit_test(test_metrics_listen),
		cmocka_unit_test(test_missing_file),
		cmocka_unit_test(test_format_masks_secrets),
		cmocka_unit_test(test_program_paths),
		cmocka_unit_test(test_exposure_refused_and_warned),
		cmocka_unit_test(test_format_masks_every_url_password),
		cmocka_unit_test(test_errors_never_echo_a_secret),
		cmocka_unit_test(test_amqp_url_node_count_is_bounded),
		cmocka_unit_test(test_secrets_from_files),
		cmocka_unit_test(test_sample_config_is_valid),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
