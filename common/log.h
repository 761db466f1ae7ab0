/* log.h: leveled, printf-checked, errno-preserving log lines on stderr, as text or JSON. */
#ifndef BW_LOG_H
#define BW_LOG_H

#include <stdbool.h>

enum bw_log_level {
	BW_LOG_WARN = 0,
	BW_LOG_INFO = 1,
	BW_LOG_DEBUG = 2,
};

enum bw_log_format {
	BW_LOG_TEXT = 0, /* [ts ]prog[pid] level: message */
	BW_LOG_JSON = 1, /* {"ts":…,"level":…,"prog":…,"pid":…,"worker_id":…,"host":…,"job_id":…,"msg":…} */
};

#define BW_PRINTF(f, a) __attribute__((format(printf, f, a)))

/*
 * Sets the program name shown on each line (the string must outlive the logger),
 * the level, and whether text lines start with an RFC 3339 timestamp (off under journald,
 * which stamps lines itself; a JSON line always has its "ts").
 */
void bw_log_init(const char *prog, enum bw_log_level level, bool timestamps);
void bw_log_set_level(enum bw_log_level level);
bool bw_log_enabled(enum bw_log_level level);

/* Parses "warn", "info" or "debug"; returns 0 or BW_EINVAL. */
int bw_log_level_parse(const char *s, enum bw_log_level *out) __attribute__((warn_unused_result));

/* Parses "text" or "json"; returns 0 or BW_EINVAL. */
int bw_log_format_parse(const char *s, enum bw_log_format *out) __attribute__((warn_unused_result));
void bw_log_set_format(enum bw_log_format format);

/*
 * Whether stderr is connected to journald: JOURNAL_STREAM ("DEV:INODE", set by systemd for
 * a service whose output goes to the journal) names the very file stderr is (systemd's own
 * test, so a JOURNAL_STREAM inherited through a redirect does not count).
 */
bool bw_log_stderr_is_journal(void);

/*
 * On: every line starts with its syslog priority, "<4>" warn, "<6>" info, "<7>" debug
 * (sd-daemon.h's SD_WARNING, SD_INFO, SD_DEBUG), which journald strips and records as the
 * line's PRIORITY, so `journalctl -p warning` works.
 */
void bw_log_set_priority_prefix(bool on);

/*
 * Correlation keys of every JSON line: the worker's id and host, set once (copied; NULL
 * or "" leaves the key out), and the job the code is working for right now (copied; NULL
 * clears it), set and cleared around each job's work by the code that dispatches to it.
 */
void bw_log_set_identity(const char *worker_id, const char *host);
void bw_log_set_job(const char *job_id);

/* bw_log_warn appends ": strerror(errno)"; the others do not. None changes errno. */
void bw_log_warn(const char *fmt, ...) BW_PRINTF(1, 2);
void bw_log_warnx(const char *fmt, ...) BW_PRINTF(1, 2);
void bw_log_info(const char *fmt, ...) BW_PRINTF(1, 2);
void bw_log_debug(const char *fmt, ...) BW_PRINTF(1, 2);

#endif
