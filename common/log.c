/* log.c: one line per call (text or JSON), written with a single write(2) so lines of processes sharing stderr do not interleave. */
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
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

/* A line's bound: journald takes longer ones, but a line is read by a person. */
#define LOG_LINE_MAX 4096

/* A JSON line's identity fields (worker id, host, job id) are cut to this many bytes
 * each, escaped: the message keeps at least half of the line. */
#define LOG_FIELD_MAX 256
/* syslog priorities of the levels (sd-daemon.h: SD_WARNING "<4>", SD_INFO "<6>", SD_DEBUG "<7>") */
static const int log_priorities[] = {4, 6, 7};
static const char *const log_tags[] = {"warn", "info", "debug"};

/* The logger's settings: the only globals common/ keeps. */
static const char *log_prog = "bw";
static enum bw_log_level log_level = BW_LOG_INFO;
static bool log_timestamps = true;
static enum bw_log_format log_format = BW_LOG_TEXT;
static bool log_priority_prefix = false;
static char log_worker_id[LOG_FIELD_MAX];
static char log_host[LOG_FIELD_MAX];
static char log_job_id[LOG_FIELD_MAX];

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
	for (unsigned i = 0; i < 3; i++) {
		if (strcasecmp(s, log_tags[i]) == 0) {
			*out = (enum bw_log_level)i;
			return 0;
		}
	}
	return BW_EINVAL;
}

int bw_log_format_parse(const char *s, enum bw_log_format *out)
{
	if (strcmp(s, "text") == 0)
		*out = BW_LOG_TEXT;
	else if (strcmp(s, "json") == 0)
		*out = BW_LOG_JSON;
	else
		return BW_EINVAL;
	return 0;
}

void bw_log_set_format(enum bw_log_format format)
{
	log_format = format;
}

void bw_log_set_priority_prefix(bool on)
{
	log_priority_prefix = on;
}

bool bw_log_stderr_is_journal(void)
{
	const char *e = getenv("JOURNAL_STREAM");
	unsigned long long dev, ino;
	struct stat st;
	char tail;
	if (e == NULL || sscanf(e, "%llu:%llu%c", &dev, &ino, &tail) != 2)
		return false;
	return fstat(STDERR_FILENO, &st) == 0 && (unsigned long long)st.st_dev == dev &&
	       (unsigned long long)st.st_ino == ino;
}

/* Keeps an escaped, bounded copy: what is set once is escaped once. */
static void set_field(char *dst, const char *s)
{
	dst[0] = '\0';
	if (s != NULL)
		bw_text_escape(dst, LOG_FIELD_MAX, s, strlen(s));
}

void bw_log_set_identity(const char *worker_id, const char *host)
{
	set_field(log_worker_id, worker_id);
	set_field(log_host, host);
}

void bw_log_set_job(const char *job_id)
{
	set_field(log_job_id, job_id);
}

/* A line being written: len bytes of buf[cap]. */
struct line {
	char *buf;
	size_t len, cap;
};

static void put(struct line *l, const char *s)
{
	size_t n = strlen(s);
	if (n > l->cap - l->len)
		n = l->cap - l->len;
	memcpy(l->buf + l->len, s, n);
	l->len += n;
}

/* One character of s at i as a JSON string holds it, into esc[8]; its length in s in *take. */
static size_t json_unit(const char *s, size_t i, char *esc, size_t *take)
{
	static const char hex[] = "0123456789abcdef";
	unsigned char c = (unsigned char)s[i];
	*take = 1;
	if (c == '"' || c == '\\') {
		esc[0] = '\\';
		esc[1] = (char)c;
		return 2;
	}
	if (c < 0x20 || c == 0x7f) {
		memcpy(esc, "\\u00", 4);
		esc[4] = hex[c >> 4];
		esc[5] = hex[c & 15];
		return 6;
	}
	size_t n = c < 0x80 ? 1 : c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc0 ? 2 : 1;
	for (size_t k = 1; k < n; k++)
		if (s[i + k] == '\0')
			n = k; /* never past the end, whatever s holds */
	memcpy(esc, s + i, n);
	*take = n;
	return n;
}

/*
 * A JSON string of s (valid UTF-8, as bw_text_escape writes it; a byte below 0x20 or 0x7f
 * is escaped too): '"' and '\' escaped. When it does not fit before cap - reserve, it is
 * cut at a character boundary and ends in "...". Always closed.
 */
static void put_json_string(struct line *l, const char *s, size_t reserve)
{
	char esc[8];
	size_t take, full = 0;
	size_t room = l->cap - l->len - reserve - 2; /* the quotes */
	for (size_t i = 0; s[i] && full <= room; i += take)
		full += json_unit(s, i, esc, &take);
	size_t limit = l->len + 1 + (full <= room ? room : room - 3);
	put(l, "\"");
	for (size_t i = 0; s[i]; i += take) {
		size_t n = json_unit(s, i, esc, &take);
		if (l->len + n > limit)
			break;
		memcpy(l->buf + l->len, esc, n);
		l->len += n;
	}
	if (full > room)
		put(l, "...");
	put(l, "\"");
}

/* ,"key":"value" unless value is empty. */
static void put_field(struct line *l, const char *key, const char *value)
{
	if (value[0] == '\0')
		return;
	put(l, ",\"");
	put(l, key);
	put(l, "\":");
	put_json_string(l, value, 0);
}

static void json_line(struct line *l, enum bw_log_level level, const char *msg, size_t mlen)
{
	char ts[BW_RFC3339_SIZE], esc[LOG_LINE_MAX], pid[32];
	put(l, "{\"ts\":\"");
	put(l, bw_clock_rfc3339_now(ts));
	put(l, "\",\"level\":\"");
	put(l, log_tags[level]);
	put(l, "\",\"prog\":");
	bw_text_escape(esc, LOG_FIELD_MAX, log_prog, strlen(log_prog));
	put_json_string(l, esc, 0);
	snprintf(pid, sizeof(pid), ",\"pid\":%ld", (long)getpid());
	put(l, pid);
	put_field(l, "worker_id", log_worker_id);
	put_field(l, "host", log_host);
	put_field(l, "job_id", log_job_id);
	put(l, ",\"msg\":");
	bw_text_escape(esc, sizeof(esc), msg, mlen);
	put_json_string(l, esc, 1); /* room for the closing brace */
	put(l, "}");
}

static void text_line(struct line *l, enum bw_log_level level, const char *msg, size_t mlen)
{
	char head[LOG_FIELD_MAX + 64];
	if (log_timestamps) {
		char ts[BW_RFC3339_SIZE];
		put(l, bw_clock_rfc3339_now(ts));
		put(l, " ");
	}
	snprintf(head, sizeof(head), "%s[%ld] %s: ", log_prog, (long)getpid(), log_tags[level]);
	put(l, head);
	if (l->len > l->cap - 16)
		l->len = l->cap - 16; /* a program name that long: still room for "..." */
	l->len += bw_text_escape(l->buf + l->len, l->cap - l->len + 1, msg, mlen);
}

/*
 * One line per call, whatever the arguments hold: the message is escaped as a whole
 * (bw_text_escape), so text from outside can neither break the line nor forge another one,
 * and the line, prefix and newline included, is cut to LOG_LINE_MAX bytes. A JSON line is
 * one valid JSON object whatever the message holds (the escaped text JSON-quoted).
 */
static void vlog(enum bw_log_level level, int err, const char *fmt, va_list ap)
{
	char buf[LOG_LINE_MAX], msg[LOG_LINE_MAX];
	/* the newline and bw_text_escape's NUL are outside cap */
	struct line l = {buf, 0, sizeof(buf) - 2};

	int m = vsnprintf(msg, sizeof(msg), fmt, ap);
	size_t mlen = m < 0 ? 0 : (size_t)m < sizeof(msg) ? (size_t)m : sizeof(msg) - 1;
	if (err && mlen < sizeof(msg) - 1) {
		m = snprintf(msg + mlen, sizeof(msg) - mlen, ": %s", strerror(err));
		if (m > 0)
			mlen = mlen + (size_t)m < sizeof(msg) ? mlen + (size_t)m : sizeof(msg) - 1;
	}
	if (log_priority_prefix) {
		char prio[8];
		snprintf(prio, sizeof(prio), "<%d>", log_priorities[level]);
		put(&l, prio);
	}
	if (log_format == BW_LOG_JSON)
		json_line(&l, level, msg, mlen);
	else
		text_line(&l, level, msg, mlen);
	buf[l.len++] = '\n';

	(void)bw_write_all(STDERR_FILENO, buf, l.len); /* nowhere to report a failed log write */
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
