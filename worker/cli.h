/* cli.h: the options bw-worker and bw-ctl share (--config FILE, --set section.key=value). */
#ifndef BW_CLI_H
#define BW_CLI_H

#include <getopt.h>
#include <stdbool.h>
#include <stddef.h>

/*
 * Takes getopt's opt when it is one of the shared options: 'c' sets *config_path, 's'
 * appends optarg to sets[*nsets] (sets has room for every argument). True when taken.
 */
static inline bool cli_config_option(int opt, const char **config_path, char **sets,
				     size_t *nsets)
{
	if (opt == 'c')
		*config_path = optarg;
	else if (opt == 's')
		sets[(*nsets)++] = optarg;
	return opt == 'c' || opt == 's';
}

#endif
