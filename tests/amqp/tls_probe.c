/*
 * tls_probe.c: connects once through common/amqp with the given TLS settings; exit 0 when
 * connected. An empty CA_FILE is passed as NULL, as the worker does with an empty
 * amqp.tls_ca_file.
 */
#include <stdio.h>
#include <string.h>

#include "amqp.h"

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: tls_probe URL CA_FILE [no-verify]\n");
		return 2;
	}
	bool verify = !(argc > 3 && strcmp(argv[3], "no-verify") == 0);
	const char *ca = argv[2][0] ? argv[2] : NULL;
	struct bw_amqp_opts o = {argv[1], 10, 5000, "tls-probe", ca, NULL, NULL, verify, verify};
	struct bw_amqp *c = NULL;
	char err[512] = "";
	int rc = bw_amqp_connect(&c, &o, err, sizeof(err));
	if (rc != 0) {
		printf("refused (%s): %s\n", bw_err_name(rc), err);
		return 1;
	}
	printf("connected\n");
	bw_amqp_close(c);
	return 0;
}
