/* clock.c: monotonic and wall milliseconds and the one RFC 3339 formatter. */
#include "clock.h"

#include <stdio.h>
#include <time.h>

static int64_t ms_of(clockid_t id)
{
	struct timespec ts;
	clock_gettime(id, &ts); /* cannot fail for these two clocks */
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t bw_clock_mono_ms(void)
{
	return ms_of(CLOCK_MONOTONIC);
}

int64_t bw_clock_mono_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t bw_clock_wall_ms(void)
{
	return ms_of(CLOCK_REALTIME);
}

char *bw_clock_rfc3339(int64_t wall_ms, char *out)
{
	time_t t = (time_t)(wall_ms / 1000);
	int ms = (int)(wall_ms % 1000);
	struct tm tm;
	out[0] = '\0';
	if (wall_ms < 0 || gmtime_r(&t, &tm) == NULL)
		return out;
	size_t n = strftime(out, BW_RFC3339_SIZE, "%Y-%m-%dT%H:%M:%S", &tm);
	if (n == 0)
		return out;
	snprintf(out + n, BW_RFC3339_SIZE - n, ".%03dZ", ms);
	return out;
}

char *bw_clock_rfc3339_now(char *out)
{
	return bw_clock_rfc3339(bw_clock_wall_ms(), out);
}
