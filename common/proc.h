/* proc.h: process identity that survives pid reuse: pid + start time + the host's boot id. */
#ifndef BW_PROC_H
#define BW_PROC_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "error.h"

#define BW_BOOT_ID_LEN 36

/*
 * Reads the start time of pid (field 22 of /proc/<pid>/stat: clock ticks after boot).
 * Returns 0 and stores it in *out; BW_ENOENT when no such process; BW_EIO when unreadable.
 */
int bw_proc_start_time(pid_t pid, uint64_t *out) BW_MUST_CHECK;

/* Reads /proc/sys/kernel/random/boot_id into out[BW_BOOT_ID_LEN + 1]. Returns 0 or BW_EIO. */
int bw_proc_boot_id(char *out) BW_MUST_CHECK;

/* True when pid is alive (not a zombie) and started at start_time: the same process. */
bool bw_proc_same(pid_t pid, uint64_t start_time);

/*
 * Makes this process hold secrets safely, before it reads any: not dumpable (no core file;
 * a process of the same user can neither ptrace it nor read its /proc/PID/mem or environ)
 * and a core limit of 0 (which its children keep). Returns 0 or BW_ESYS (errno set).
 */
int bw_proc_undumpable(void) BW_MUST_CHECK;

#endif
