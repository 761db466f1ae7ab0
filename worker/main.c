/* main.c: bw-worker: options, configuration, logging, then the event loop. */
#include "config.h"
#include "error.h"
#include "ledger.h"
#include "log.h"
#include "proc.h"
#include "cli.h"
#include "worker.h"

#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* --drain looks at the draining worker once a second: jobs end in seconds, not ms. */
#define DRAIN_POLL_S 1

static void usage(FILE *f)
{
	fprintf(f, "usage: bw-worker --config FILE [--set section.key=value]... [--check-config]\n"
		   "       bw-worker --config FILE --drain [--no-wait]\n"
		   "\n"
		   "  --config FILE      the INI configuration (see deploy/bw-worker.conf)\n"
		   "  --set S.K=V        override one key (after the file and BW_<S>_<K> variables)\n"
		   "  --check-config     validate the configuration, print \"configuration OK\" or\n"
		   "                     one \"FILE:LINE: key: reason\" line per problem, and exit\n"
		   "  --print-config     print the effective configuration (secrets masked) and exit\n"
		   "  --log-format=F     text or json (one JSON object per line); overrides log.format\n"
		   "  --drain            tell the running worker with this config's worker.id to\n"
		   "                     take no new jobs and exit once its running jobs ended\n"
		   "                     (SIGUSR1 to the process the ledger records), and wait\n"
		   "                     for that exit (--no-wait: return at once)\n");
}

/* Unfinished jobs owned by worker_id (-1 when the ledger cannot say). */
static long owned_jobs(struct bw_ledger *l, const char *worker_id)
{
	size_t n = 0;
	return bw_ledger_worker_jobs(l, worker_id, &n) == 0 ? (long)n : -1;
}

/* --drain: SIGUSR1 to the live worker the ledger records under cfg's worker.id. */
static int drain(const struct bw_config *cfg, bool wait)
{
	struct bw_ledger *l = NULL;
	struct bw_worker_row row = {0, 0, 0, 0, 0};
	int rc = bw_ledger_open_readonly(&l, cfg->ledger_path);
	if (rc == 0) {
		rc = bw_ledger_worker_get(l, cfg->worker_id, &row);
		if (rc == BW_ENOENT)
			rc = 0; /* no row: no worker, said below */
	}
	if (rc != 0) {
		fprintf(stderr, "bw-worker: ledger %s: %s\n", cfg->ledger_path, bw_strerror(rc));
		bw_ledger_close(l);
		return 1;
	}
	/* the recorded pid is signalled only while it is still that very process */
	if (row.pid <= 0 || !bw_proc_same(row.pid, row.start_time)) {
		fprintf(stderr,
			"bw-worker: no running worker \"%s\" on this host (--drain names the worker by "
			"the config's worker.id; its default, hostname-pid, differs in every process)\n",
			cfg->worker_id);
		bw_ledger_close(l);
		return 1;
	}
	if (kill(row.pid, SIGUSR1) != 0) {
		perror("bw-worker: kill");
		bw_ledger_close(l);
		return 1;
	}
	printf("draining worker %s (pid %ld): it takes no new jobs; %ld job(s) to finish\n",
	       cfg->worker_id, (long)row.pid, owned_jobs(l, cfg->worker_id));
	fflush(stdout);
	long last = -2;
	while (wait && bw_proc_same(row.pid, row.start_time)) {
		long n = owned_jobs(l, cfg->worker_id);
		if (n != last && last != -2)
			printf("%ld job(s) left\n", n);
		fflush(stdout);
		last = n;
		sleep(DRAIN_POLL_S);
	}
	if (wait)
		printf("worker %s exited\n", cfg->worker_id);
	bw_ledger_close(l);
	return 0;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{"config", required_argument, NULL, 'c'},
		{"set", required_argument, NULL, 's'},
		{"check-config", no_argument, NULL, 'k'},
		{"print-config", no_argument, NULL, 'p'},
		{"drain", no_argument, NULL, 'd'},
		{"no-wait", no_argument, NULL, 'n'},
		{"log-format", required_argument, NULL, 'f'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	const char *config_path = NULL, *log_format = NULL;
	bool check_only = false, print_only = false, drain_only = false, wait = true;
	char **sets = NULL;
	size_t nsets = 0;
	struct bw_config *cfg = NULL;
	char *text = NULL;
	int status = 2;
	int opt;

	signal(SIGPIPE, SIG_IGN);
	bw_log_init("bw-worker", BW_LOG_INFO, true);
	/* before any secret is read (password and token files, credentials); children get
	 * dumpable back at exec, their core limit stays 0 */
	if (bw_proc_undumpable() != 0) {
		bw_log_warn("cannot make the process undumpable");
		return 2;
	}
	sets = calloc((size_t)argc, sizeof(*sets));
	if (sets == NULL)
		return 2;
	while ((opt = getopt_long(argc, argv, "c:s:h", opts, NULL)) != -1) {
		if (cli_config_option(opt, &config_path, sets, &nsets))
			continue;
		switch (opt) {
		case 'k':
			check_only = true;
			break;
		case 'p':
			print_only = true;
			break;
		case 'd':
			drain_only = true;
			break;
		case 'n':
			wait = false;
			break;
		case 'f':
			log_format = optarg;
			break;
		case 'h':
			usage(stdout);
			status = 0;
			goto out;
		default:
			usage(stderr);
			goto out;
		}
	}
	if (optind < argc || config_path == NULL) {
		usage(stderr);
		goto out;
	}

	int rc = bw_config_load(&cfg, config_path, sets, nsets, &text);
	if (rc != 0) {
		fprintf(stderr, "%s", text ? text : bw_strerror(rc));
		if (text == NULL)
			fputc('\n', stderr);
		status = 1;
		goto out;
	}
	if (cfg->warnings && (check_only || print_only))
		fputs(cfg->warnings, stderr);
	if (check_only) {
		printf("configuration OK\n");
		status = 0;
		goto out;
	}
	if (drain_only) {
		status = drain(cfg, wait);
		goto out;
	}
	if (bw_config_format(cfg, &text) != 0)
		goto out;
	if (print_only) {
		fputs(text, stdout);
		status = 0;
		goto out;
	}

	enum bw_log_level level = BW_LOG_INFO;
	enum bw_log_format format = BW_LOG_TEXT;
	if (bw_log_format_parse(log_format ? log_format : cfg->log_format, &format) != 0) {
		fprintf(stderr, "bw-worker: --log-format must be text or json\n");
		goto out;
	}
	if (bw_log_level_parse(cfg->log_level, &level) == 0)
		bw_log_set_level(level);
	/* under journald: its priority on each line, and no timestamp (it stamps lines) */
	bool journal = bw_log_stderr_is_journal();
	bw_log_init("bw-worker", level, cfg->log_timestamps && !journal);
	bw_log_set_priority_prefix(journal);
	bw_log_set_format(format);
	bw_log_set_identity(cfg->worker_id, cfg->worker_host);
	bw_log_info("starting worker=%s config=%s", cfg->worker_id, config_path);
	for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n"))
		bw_log_info("config: %s", line);
	for (const char *w = cfg->warnings; w && *w;) {
		size_t n = strcspn(w, "\n");
		bw_log_warnx("config: %.*s", (int)n, w);
		w += n + (w[n] == '\n');
	}
	status = worker_run(cfg);
out:
	free(text);
	bw_config_free(cfg);
	free(sets);
	return status;
}
