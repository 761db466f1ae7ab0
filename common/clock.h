/* clock.h: the one clock of the tree: monotonic and wall milliseconds, RFC 3339 text. */
#ifndef BW_CLOCK_H
#define BW_CLOCK_H

#include <stdint.h>

/* Size of an RFC 3339 UTC timestamp with milliseconds, NUL included ("...T..:..:...mmmZ"). */
#define BW_RFC3339_SIZE 32

/* Milliseconds of CLOCK_MONOTONIC: for deadlines and durations (never jumps). */
int64_t bw_clock_mono_ms(void);

/* Microseconds of CLOCK_MONOTONIC: short spans measured and reported (latencies, a lock held). */
int64_t bw_clock_mono_us(void);

/* Milliseconds since the Unix epoch (CLOCK_REALTIME): for what is stored or shown. */
int64_t bw_clock_wall_ms(void);

/*
 * Writes wall_ms (ms since the epoch) as RFC 3339 UTC with milliseconds,
 * "2026-12-01T22:16:50.123Z", into out[BW_RFC3339_SIZE]. Returns out. A time gmtime cannot
 * represent gives "".
 */
char *bw_clock_rfc3339(int64_t wall_ms, char *out);

/* The current time as bw_clock_rfc3339 writes it. Returns out. */
char *bw_clock_rfc3339_now(char *out);

#endif
