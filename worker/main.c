/* main.c: bw-worker: options, configuration, logging, then the event loop. */
#include "config.h"
#include "error.h"
#include "log.h"

int worker_run(const struct bw_config *cfg);

#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f)
{
	fprintf(f, "usage: bw-worker --config FILE [--set section.key=value]... [--check-config]\n"
		   "\n"
		   "  --config FILE      the INI configuration (see deploy/bw-worker.conf)\n"
		   "  --set S.K=V        override one key (after the file and BW_<S>_<K> variables)\n"
		   "  --check-config     validate the configuration, print \"configuration OK\" or\n"
		   "                     one \"FILE:LINE: key: reason\" line per problem, and exit\n"
		   "  --print-config     print the effective configuration (secrets masked) and exit\n");
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{"config", required_argument, NULL, 'c'},
		{"set", required_argument, NULL, 's'},
		{"check-config", no_argument, NULL, 'k'},
		{"print-config", no_argument, NULL, 'p'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	const char *config_path = NULL;
	bool check_only = false, print_only = false;
	char **sets = NULL;
	size_t nsets = 0;
	struct bw_config *cfg = NULL;
	char *text = NULL;
	int status = 2;
	int opt;

	signal(SIGPIPE, SIG_IGN);
	bw_log_init("bw-worker", BW_LOG_INFO, true);
	sets = calloc((size_t)argc, sizeof(*sets));
	if (sets == NULL)
		return 2;
	while ((opt = getopt_long(argc, argv, "c:s:h", opts, NULL)) != -1) {
		switch (opt) {
		case 'c':
			config_path = optarg;
			break;
		case 's':
			sets[nsets++] = optarg;
			break;
		case 'k':
			check_only = true;
			break;
		case 'p':
			print_only = true;
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
	if (check_only) {
		printf("configuration OK\n");
		status = 0;
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
	if (bw_log_level_parse(cfg->log_level, &level) == 0)
		bw_log_set_level(level);
	bw_log_init("bw-worker", level, cfg->log_timestamps);
	bw_log_info("starting worker=%s config=%s", cfg->worker_id, config_path);
	for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n"))
		bw_log_info("config: %s", line);
	status = worker_run(cfg);
out:
	free(text);
	bw_config_free(cfg);
	free(sets);
	return status;
}
