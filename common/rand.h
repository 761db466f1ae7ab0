/* rand.h: the one random source (the kernel's, getrandom) and the one jittered backoff. */
#ifndef BW_RAND_H
#define BW_RAND_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"

/*
 * Fills buf[0..n) from the kernel's random source (getrandom, blocking only before the
 * pool is first initialised at boot). Returns 0 or BW_ESYS (errno set). Fit for keys.
 */
int bw_rand_bytes(void *buf, size_t n) BW_MUST_CHECK;

/* A uniform random integer in [0, bound] (bound >= 0), from bw_rand_bytes; never fails
 * (falls back to a time-seeded mix if the kernel refuses, which only affects spreading). */
uint64_t bw_rand_below_incl(uint64_t bound);

/*
 * Full-jitter backoff: a uniform random wait in [0, min(cap_ms, base_ms * 2^(attempt-1))]
 * ms for attempt >= 1 (the wait before attempt + 1). attempt < 1 counts as 1.
 */
int64_t bw_backoff_ms(int64_t base_ms, int64_t cap_ms, int attempt);

#endif
