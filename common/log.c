/* log.c: one line per call, written with a single write(2) so lines of processes sharing stderr do not interleave. */
#include "log.h"
#include "error.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

/* The logger's settings: the only globals common/ keeps. */
static const char *log_prog = "bw";
static enum bw_log_level log_level = BW_LOG_INFO;
static bool log_timestamps = true;

void bw_log_init(const char *prog, enum bw_log_level level, bool timestamps)
{
	log_prog = prog;
	log_level = level;
	log_timestamps = timestamps;
}

void bw_log_set_level(enum bw_log_level level)
{
	log_level = level;
}

bool bw_log_enabled(enum bw_log_level level)
{
	return level <= log_level;
}

int bw_log_level_parse(const char *s, enum bw_log_level *out)
{
	static const char *names[] = {"warn", "info", "debug"};
	for (unsigned i = 0; i < 3; i++) {
		if (strcasecmp(s, names[i]) == 0) {
			*out = (enum bw_log_level)i;
			return 0;
		}
	}
	return BW_EINVAL;
}

static void vlog(enum bw_log_level level, int err, const char *fmt, va_list ap)
{
	static const char *tags[] = {"warn", "info", "debug"};
	char line[4096];
	size_t n = 0;

	if (log_timestamps) {
		struct timespec ts;
		struct tm tm;
		clock_gettime(CLOCK_REALTIME, &ts);
		gmtime_r(&ts.tv_sec, &tm);
		n += strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%S", &tm);
		n += (size_t)snprintf(line + n, sizeof(line) - n, ".%03ldZ ", ts.tv_nsec / 1000000);
	}
	n += (size_t)snprintf(line + n, sizeof(line) - n, "%s[%ld] %s: ", log_prog, (long)getpid(),
			      tags[level]);
	if (n < sizeof(line)) {
		int m = vsnprintf(line + n, sizeof(line) - n, fmt, ap);
		if (m > 0)
			n += (size_t)m;
	}
	if (err && n < sizeof(line))
		n += (size_t)snprintf(line + n, sizeof(line) - n, ": %s", strerror(err));
	if (n > sizeof(line) - 2)
		n = sizeof(line) - 2; /* truncated: still one line */
	line[n++] = '\n';

	const char *p = line;
	while (n > 0) {
		ssize_t w = write(STDERR_FILENO, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			break;
		p += w;
		n -= (size_t)w;
	}
}

#define BW__LOG_FN(fn, level, with_errno)                                                          \
	void fn(const char *fmt, ...)                                                              \
	{                                                                                          \
		int saved = errno;                                                                 \
		if (bw_log_enabled(level)) {                                                       \
			va_list ap;                                                                \
			va_start(ap, fmt);                                                         \
			vlog(level, with_errno ? saved : 0, fmt, ap);                              \
			va_end(ap);                                                                \
		}                                                                                  \
		errno = saved;                                                                     \
	}

BW__LOG_FN(bw_log_warn, BW_LOG_WARN, true)
BW__LOG_FN(bw_log_warnx, BW_LOG_WARN, false)
BW__LOG_FN(bw_log_info, BW_LOG_INFO, false)
BW__LOG_FN(bw_log_debug, BW_LOG_DEBUG, false)
