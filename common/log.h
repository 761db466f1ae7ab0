/* log.h: leveled, printf-checked, errno-preserving log lines on stderr. */
#ifndef BW_LOG_H
#define BW_LOG_H

#include <stdbool.h>

enum bw_log_level {
	BW_LOG_WARN = 0,
	BW_LOG_INFO = 1,
	BW_LOG_DEBUG = 2,
};

#define BW_PRINTF(f, a) __attribute__((format(printf, f, a)))

/*
 * Sets the program name shown on each line (the string must outlive the logger),
 * the level, and whether lines start with an RFC 3339 timestamp (off under journald,
 * which stamps lines itself).
 */
void bw_log_init(const char *prog, enum bw_log_level level, bool timestamps);
void bw_log_set_level(enum bw_log_level level);
bool bw_log_enabled(enum bw_log_level level);

/* Parses "warn", "info" or "debug"; returns 0 or BW_EINVAL. */
int bw_log_level_parse(const char *s, enum bw_log_level *out) __attribute__((warn_unused_result));

/* bw_log_warn appends ": strerror(errno)"; the others do not. None changes errno. */
void bw_log_warn(const char *fmt, ...) BW_PRINTF(1, 2);
void bw_log_warnx(const char *fmt, ...) BW_PRINTF(1, 2);
void bw_log_info(const char *fmt, ...) BW_PRINTF(1, 2);
void bw_log_debug(const char *fmt, ...) BW_PRINTF(1, 2);

#endif
