/* gate.h: the writers' gate: a robust process-shared mutex in a file, taken with a bound. */
#ifndef BW_GATE_H
#define BW_GATE_H

#include <stddef.h>

#include "error.h"

/*
 * Waiting writers that poll SQLite's BEGIN IMMEDIATE burn CPU, open a read snapshot at
 * every try (so WAL checkpoints never complete and the WAL grows) and are handed the lock
 * unfairly. So every ledger write first takes the gate: a robust, process-shared mutex kept
 * in a small file next to the ledger. Waiters sleep in the kernel and are woken one by one;
 * the wait is bounded; a holder that dies leaves it EOWNERDEAD and the next one takes over
 * (SQLite has rolled the dead writer's transaction back). Readers never take it.
 */
struct bw_gate;

/*
 * Maps the gate kept in the file path (created 0600, and initialised once under a file
 * lock when new). Returns 0 and a new handle in *out (free with bw_gate_close); BW_ENOMEM,
 * or the BW_E code of errno when the file cannot be created, sized or mapped.
 */
int bw_gate_open(struct bw_gate **out, const char *path) BW_MUST_CHECK;

/* Unmaps the gate; the caller does not hold it. Accepts NULL. */
void bw_gate_close(struct bw_gate *g);

/*
 * Takes the gate, waiting at most wait_ms. Returns 0 (also when the previous holder died
 * holding it: it is taken over); BW_EBUSY when the wait ran out; BW_EIO for another
 * failure; on failure the reason is in err.
 */
int bw_gate_lock(struct bw_gate *g, int wait_ms, char *err, size_t errsize) BW_MUST_CHECK;

/* Lets the next writer in. */
void bw_gate_unlock(struct bw_gate *g);

#endif
