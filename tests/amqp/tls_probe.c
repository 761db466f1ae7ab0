/*
 * tls_probe.c: connects once through a common/amqp link with the given TLS settings, as the
 * worker does (the probe of the node on poll, then the TLS connect and login); exit 0 when
 * connected. An empty CA_FILE is passed as NULL, as the worker does with an empty
 * amqp.tls_ca_file.
 */
#include <poll.h>
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
	struct bw_amqp_link l = {.opts = o,
				 .role = BW_AMQP_PUBLISHER,
				 .backoff_base_ms = 1000,
				 .backoff_cap_ms = 1000};
	char err[512] = "";
	bool fresh;
	int rc;
	for (;;) {
		rc = bw_amqp_link_up(&l, &fresh, err, sizeof(err));
		short events = 0;
		int fd = bw_amqp_link_pollfd(&l, &events);
		if (fd < 0)
			break; /* up, or the one node failed */
		struct pollfd pfd = {fd, events, 0};
		poll(&pfd, 1, bw_amqp_link_timeout_ms(&l));
	}
	if (rc != 0) {
		printf("refused (%s): %s\n", bw_err_name(rc), l.why);
		bw_amqp_link_down(&l);
		return 1;
	}
	printf("connected\n");
	bw_amqp_link_down(&l);
	return 0;
}
