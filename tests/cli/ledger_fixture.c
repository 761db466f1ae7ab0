/* ledger_fixture.c: fills a ledger with one job of two disks holding ports, then holds its worker lock. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "ledger.h"

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: ledger_fixture LEDGER LOCKDIR\n");
		return 2;
	}
	struct bw_ledger *l = NULL;
	struct bw_job_disk_new disks[2] = {{2000, "bk-1-2000", "/repo/vm/2000/bk-1.qcow2"},
					   {16000, "bk-1-16000", "/repo/vm/16000/bk-1.qcow2"}};
	struct bw_event accepted = {"bk-1/backup.accepted", "backup.accepted", 1, "{}"};
	int64_t gen = 0, keys[2] = {2000, 16000};
	int ports[2];
	if (bw_ledger_open(&l, argv[1], 10100, 10110) != 0 ||
	    bw_ledger_register(l, "fixture-w1", argv[2]) != 0 ||
	    bw_ledger_claim(l, "bk-1", "{\"job_id\":\"bk-1\"}", disks, 2, &accepted, &gen, NULL) != 0)
		return 1;
	struct bw_fence f = {"bk-1", gen};
	if (bw_ledger_transition(l, &f, BW_JOB_RESERVED, NULL, NULL, 0) != 0 ||
	    bw_ledger_reserve(l, &f, keys, 2, ports) != 0)
		return 1;
	printf("ready %d %d\n", ports[0], ports[1]);
	fflush(stdout);
	/* Hold the worker lock until stdin closes, so bw-ctl workers shows it alive. */
	char c;
	while (read(0, &c, 1) > 0)
		;
	bw_ledger_close(l);
	return 0;
}
