/* ctl.c: bw-ctl, the operator's tool: validate backup.start messages (ledger commands follow). */
#include "config.h"
#include "error.h"
#include "log.h"
#include "message.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

enum { EXIT_VALID = 0, EXIT_INVALID = 1, EXIT_USAGE = 2 };

static void usage(FILE *f)
{
	fprintf(f, "usage: bw-ctl [--config FILE] [--set section.key=value]... COMMAND ...\n"
		   "\n"
		   "commands:\n"
		   "  validate [-v] FILE...   check backup.start messages as the worker does;\n"
		   "                          one line \"FILE: path: rule\" per violated rule\n"
		   "                          (-v adds the explanation and prints valid files).\n"
		   "                          Without --config only the message rules are checked;\n"
		   "                          with it also the host's (repository, credential,\n"
		   "                          parent images). Exit 0 all valid, 1 any invalid,\n"
		   "                          2 usage or I/O error.\n");
}

/* Reads a whole file (or stdin for "-") into a malloc'd buffer; returns 0 or an errno value. */
static int read_all(const char *path, char **out, size_t *len)
{
	int fd = strcmp(path, "-") == 0 ? STDIN_FILENO : open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno;
	char *buf = NULL;
	size_t n = 0, cap = 0;
	int rc = 0;
	for (;;) {
		if (n == cap) {
			cap = cap ? cap * 2 : 65536;
			char *p = realloc(buf, cap);
			if (p == NULL) {
				rc = ENOMEM;
				break;
			}
			buf = p;
		}
		ssize_t r = read(fd, buf + n, cap - n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			rc = errno;
			break;
		}
		if (r == 0)
			break;
		n += (size_t)r;
	}
	if (fd != STDIN_FILENO)
		close(fd);
	if (rc != 0) {
		free(buf);
		return rc;
	}
	*out = buf;
	*len = n;
	return 0;
}

static void print_verdict(const char *file, const struct bw_verdict *vd, bool verbose)
{
	for (size_t i = 0; i < vd->n; i++) {
		if (verbose)
			printf("%s: %s: %s: %s\n", file, vd->v[i].path, vd->v[i].rule,
			       vd->v[i].message);
		else
			printf("%s: %s: %s\n", file, vd->v[i].path, vd->v[i].rule);
	}
}

/* Validates one file; returns EXIT_VALID, EXIT_INVALID or EXIT_USAGE. */
static int validate_file(const char *file, const struct bw_config *cfg, bool verbose)
{
	char *body = NULL;
	size_t len = 0;
	struct bw_job_spec *spec = NULL;
	struct bw_verdict *vd = NULL;
	size_t max = cfg ? (size_t)cfg->job_max_message_bytes : BW_MESSAGE_MAX_BYTES_DEFAULT;
	int status = EXIT_USAGE;

	int rc = read_all(file, &body, &len);
	if (rc != 0) {
		fprintf(stderr, "bw-ctl: %s: cannot read: %s\n", file, strerror(rc));
		goto out;
	}
	rc = bw_message_parse(body, len, max, &spec, &vd);
	if (rc == 0 && cfg)
		rc = bw_message_check_host(spec, cfg, &vd);
	if (rc == BW_EMESSAGE) {
		print_verdict(file, vd, verbose);
		status = EXIT_INVALID;
	} else if (rc != 0) {
		fprintf(stderr, "bw-ctl: %s: %s\n", file, bw_strerror(rc));
	} else {
		if (verbose)
			printf("%s: ok\n", file);
		status = EXIT_VALID;
	}
out:
	free(body);
	bw_job_spec_free(spec);
	bw_verdict_free(vd);
	return status;
}

static int cmd_validate(int argc, char **argv, const struct bw_config *cfg)
{
	bool verbose = false;
	int opt;
	optind = 1;
	while ((opt = getopt(argc, argv, "+v")) != -1) {
		if (opt != 'v') {
			usage(stderr);
			return EXIT_USAGE;
		}
		verbose = true;
	}
	if (optind >= argc) {
		fprintf(stderr, "bw-ctl: validate: no FILE given\n");
		return EXIT_USAGE;
	}
	int worst = EXIT_VALID;
	for (int i = optind; i < argc; i++) {
		int status = validate_file(argv[i], cfg, verbose);
		if (status > worst)
			worst = status;
	}
	return worst;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{"config", required_argument, NULL, 'c'},
		{"set", required_argument, NULL, 's'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	const char *config_path = NULL;
	char **sets = NULL;
	size_t nsets = 0;
	struct bw_config *cfg = NULL;
	int status = EXIT_USAGE;
	int opt;

	bw_log_init("bw-ctl", BW_LOG_WARN, false);
	sets = calloc((size_t)argc, sizeof(*sets));
	if (sets == NULL)
		return EXIT_USAGE;
	while ((opt = getopt_long(argc, argv, "+c:s:h", opts, NULL)) != -1) {
		switch (opt) {
		case 'c':
			config_path = optarg;
			break;
		case 's':
			sets[nsets++] = optarg;
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
	if (optind >= argc) {
		usage(stderr);
		goto out;
	}
	const char *cmd = argv[optind];

	if (config_path || nsets) {
		char *errors = NULL;
		int rc = bw_config_load(&cfg, config_path, sets, nsets, &errors);
		if (rc != 0) {
			fprintf(stderr, "%s", errors ? errors : bw_strerror(rc));
			free(errors);
			goto out;
		}
	}

	if (strcmp(cmd, "validate") == 0) {
		status = cmd_validate(argc - optind, argv + optind, cfg);
	} else {
		fprintf(stderr, "bw-ctl: unknown command \"%s\"\n", cmd);
		usage(stderr);
	}
out:
	bw_config_free(cfg);
	free(sets);
	return status;
}
