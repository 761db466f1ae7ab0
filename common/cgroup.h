/* cgroup.h: moving a child out of the worker's systemd unit, so a restart of the unit leaves it running. */
#ifndef BW_CGROUP_H
#define BW_CGROUP_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "error.h"

/*
 * The unit that holds the qemu-nbd servers of every bw-worker@*.service of the host
 * (deploy/bw-nbd.service): a delegated unit running as the workers' user that stays
 * active (RemainAfterExit) with no process of its own.
 */
#define BW_CGROUP_HOLDER_UNIT "bw-nbd.service"

/*
 * The unit a spawned server should be moved into, or NULL when the worker does not run
 * under systemd (no INVOCATION_ID in its environment): then nothing is moved.
 */
const char *bw_cgroup_holder(void);

/*
 * Asks the system's service manager (AttachProcessesToUnit on the system bus, one call of
 * at most BW_CGROUP_CALL_TIMEOUT_MS) to move pids[0..n) into unit's control group. systemd
 * lets an unprivileged caller do so without polkit when the unit is delegated
 * (Delegate=yes) and active, and every pid and the unit run as the caller's user. Blocking.
 * Returns 0; BW_EIO when the bus cannot be reached or does not answer in time; BW_EPERM
 * when the manager refuses; the reason in err.
 */
int bw_cgroup_attach(const char *unit, const pid_t *pids, size_t n, char *err, size_t errsize)
	BW_MUST_CHECK;

/* The bus call's bound: a manager this slow would stall the worker's loop. */
#define BW_CGROUP_CALL_TIMEOUT_MS 2000

#endif
