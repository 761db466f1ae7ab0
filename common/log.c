/* log.c: one line per call, written with a single write(2) so lines of processes sharing stderr do not interleave. */
#include "log.h"

#include "clock.h"
#include "error.h"
#include "io.h"
#include "text.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

/* A line's bound: journald takes longer ones, but a line is read by a person. */
#define LOG_LINE_MAX 4096

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

/*
 * One line per call, whatever the arguments hold: the message is escaped as a whole
 * (bw_text_escape), so text from outside can neither break the line nor forge another one,
 * and it is cut to LOG_LINE_MAX bytes.
 */
static void vlog(enum bw_log_level level, int err, const char *fmt, va_list ap)
{
	static const char *tags[] = {"warn", "info", "debug"};
	char line[LOG_LINE_MAX], msg[LOG_LINE_MAX];
	size_t n = 0;

	int m = vsnprintf(msg, sizeof(msg), fmt, ap);
	size_t mlen = m < 0 ? 0 : (size_t)m < sizeof(msg) ? (size_t)m : sizeof(msg) - 1;
	if (err && mlen < sizeof(msg) - 1) {
		m = snprintf(msg + mlen, sizeof(msg) - mlen, ": %s", strerror(err));
		if (m > 0)
			mlen = mlen + (size_t)m < sizeof(msg) ? mlen + (size_t)m : sizeof(msg) - 1;
	}
	if (log_timestamps) {
		bw_clock_rfc3339_now(line);
		n = strlen(line);
		line[n++] = ' ';
	}
	n += (size_t)snprintf(line + n, sizeof(line) - n, "%s[%ld] %s: ", log_prog, (long)getpid(),
			      tags[level]);
	if (n > sizeof(line) - 16)
		n = sizeof(line) - 16; /* a program name that long: still room for "..." */
	n += bw_text_escape(line + n, sizeof(line) - n - 1, msg, mlen);
	line[n++] = '\n';

	(void)bw_write_all(STDERR_FILENO, line, n); /* nowhere to report a failed log write */
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
