/* rand.c: random bytes from the kernel and full-jitter backoff waits. */
#include "rand.h"

#include "clock.h"

#include <errno.h>
#include <sys/random.h>
#include <unistd.h>

int bw_rand_bytes(void *buf, size_t n)
{
	unsigned char *p = buf;
	while (n > 0) {
		ssize_t got = getrandom(p, n, 0);
		if (got < 0) {
			if (errno == EINTR)
				continue;
			return BW_ESYS;
		}
		p += got;
		n -= (size_t)got;
	}
	return 0;
}

uint64_t bw_rand_below_incl(uint64_t bound)
{
	uint64_t x;
	if (bw_rand_bytes(&x, sizeof(x)) != 0) {
		/* splitmix64 of the clock and pid: only ever spreads retries */
		x = (uint64_t)bw_clock_mono_ms() ^ ((uint64_t)getpid() << 32);
		x += 0x9e3779b97f4a7c15ULL;
		x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
		x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
		x ^= x >> 31;
	}
	if (bound == UINT64_MAX)
		return x;
	return x % (bound + 1); /* the bias is below 2^-40 for the bounds we use */
}

int64_t bw_backoff_ms(int64_t base_ms, int64_t cap_ms, int attempt)
{
	if (attempt < 1)
		attempt = 1;
	if (base_ms < 0)
		base_ms = 0;
	int shift = attempt - 1 < 40 ? attempt - 1 : 40;
	int64_t ceiling = base_ms > (INT64_MAX >> shift) ? INT64_MAX : base_ms << shift;
	if (ceiling > cap_ms)
		ceiling = cap_ms;
	if (ceiling <= 0)
		return 0;
	return (int64_t)bw_rand_below_incl((uint64_t)ceiling);
}
