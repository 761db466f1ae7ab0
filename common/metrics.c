/* metrics.c: the metrics registry: series made on first use, rendered in the Prometheus text format 0.0.4. */
#include "metrics.h"

#include <dirent.h>
#include <fcntl.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

enum type { T_COUNTER, T_GAUGE, T_HISTOGRAM };

static const char *const type_names[] = {"counter", "gauge", "histogram"};

static const double b_JOB[] = {BW_BUCKETS_JOB};
static const double b_START[] = {BW_BUCKETS_START};
static const double b_STAGE[] = {BW_BUCKETS_STAGE};
static const double b_SNA[] = {BW_BUCKETS_SNA};
static const double b_CONFIRM[] = {BW_BUCKETS_CONFIRM};
#define B_NONE NULL
#define N_NONE 0
#define B_JOB b_JOB
#define N_JOB BW_NAMES(b_JOB)
#define B_START b_START
#define N_START BW_NAMES(b_START)
#define B_STAGE b_STAGE
#define N_STAGE BW_NAMES(b_STAGE)
#define B_SNA b_SNA
#define N_SNA BW_NAMES(b_SNA)
#define B_CONFIRM b_CONFIRM
#define N_CONFIRM BW_NAMES(b_CONFIRM)

/* One metric as the table declares it. */
struct def {
	const char *name;
	enum type type;
	const char *help;
	const double *bounds; /* histogram: upper bounds, ascending; +Inf is implied */
	size_t n_bounds;
	const char *labels[BW_METRICS_MAX_LABELS]; /* names; NULL past the last */
};

static const struct def defs[BW_METRIC_COUNT] = {
#define BW__METRIC_DEF(id, name, type, help, buckets, ...)                                         \
	[BW_METRIC_##id] = {name, T_##type, help, B_##buckets, N_##buckets, {__VA_ARGS__}},
	BW_METRIC_MAP(BW__METRIC_DEF)
#undef BW__METRIC_DEF
};

/* One series: a label value set and its value (a histogram: bucket counts, sum, count). */
struct series {
	char *labels[BW_METRICS_MAX_LABELS];
	double value;     /* counter, gauge */
	uint64_t *counts; /* histogram: per bucket (not cumulative), n_bounds of them */
	double sum;
	uint64_t count;
};

struct family {
	struct series *s;
	size_t n, cap;
};

struct bw_metrics {
	struct family f[BW_METRIC_COUNT];
};

static size_t n_labels(const struct def *d)
{
	size_t n = 0;
	while (n < BW_METRICS_MAX_LABELS && d->labels[n])
		n++;
	return n;
}

int bw_metrics_new(struct bw_metrics **out)
{
	struct bw_metrics *m = calloc(1, sizeof(*m));
	if (m == NULL)
		return BW_ENOMEM;
	*out = m;
	return 0;
}

static void series_clear(struct series *s)
{
	for (size_t k = 0; k < BW_METRICS_MAX_LABELS; k++)
		free(s->labels[k]);
	free(s->counts);
}

void bw_metrics_free(struct bw_metrics *m)
{
	if (m == NULL)
		return;
	for (size_t i = 0; i < BW_METRIC_COUNT; i++) {
		for (size_t k = 0; k < m->f[i].n; k++)
			series_clear(&m->f[i].s[k]);
		free(m->f[i].s);
	}
	free(m);
}

void bw_metrics_clear(struct bw_metrics *m, enum bw_metric id)
{
	if (m == NULL || (unsigned)id >= BW_METRIC_COUNT)
		return;
	for (size_t k = 0; k < m->f[id].n; k++)
		series_clear(&m->f[id].s[k]);
	m->f[id].n = 0;
}

const char *bw_metric_name(enum bw_metric id)
{
	return (unsigned)id < BW_METRIC_COUNT ? defs[id].name : "";
}

static bool same_labels(const struct series *s, size_t n, const char *const *labels)
{
	for (size_t k = 0; k < n; k++)
		if (strcmp(s->labels[k], labels[k] ? labels[k] : "") != 0)
			return false;
	return true;
}

/* The series of metric id with these label values: found, or made (NULL: cannot be). */
static struct series *find(struct bw_metrics *m, enum bw_metric id, const char *const *labels,
			   bool make)
{
	if (m == NULL || (unsigned)id >= BW_METRIC_COUNT)
		return NULL;
	const struct def *d = &defs[id];
	struct family *f = &m->f[id];
	size_t nl = n_labels(d);
	if (nl > 0 && labels == NULL)
		return NULL;
	for (size_t i = 0; i < f->n; i++)
		if (same_labels(&f->s[i], nl, labels))
			return &f->s[i];
	if (!make || f->n >= BW_METRICS_MAX_SERIES)
		return NULL;
	if (f->n == f->cap) {
		size_t cap = f->cap ? f->cap * 2 : 8;
		struct series *p = realloc(f->s, cap * sizeof(*p));
		if (p == NULL)
			return NULL;
		f->s = p;
		f->cap = cap;
	}
	struct series s = {{NULL}, 0, NULL, 0, 0};
	bool ok = true;
	for (size_t k = 0; k < nl; k++)
		ok &= (s.labels[k] = strdup(labels[k] ? labels[k] : "")) != NULL;
	if (d->type == T_HISTOGRAM)
		ok &= (s.counts = calloc(d->n_bounds ? d->n_bounds : 1, sizeof(*s.counts))) != NULL;
	if (!ok) {
		series_clear(&s);
		return NULL;
	}
	f->s[f->n] = s;
	return &f->s[f->n++];
}

void bw_metrics_add(struct bw_metrics *m, enum bw_metric id, const char *const *labels, double v)
{
	if (m == NULL || (unsigned)id >= BW_METRIC_COUNT || defs[id].type == T_HISTOGRAM ||
	    (defs[id].type == T_COUNTER && !(v >= 0)))
		return;
	struct series *s = find(m, id, labels, true);
	if (s)
		s->value += v;
}

void bw_metrics_set(struct bw_metrics *m, enum bw_metric id, const char *const *labels, double v)
{
	if (m == NULL || (unsigned)id >= BW_METRIC_COUNT || defs[id].type == T_HISTOGRAM)
		return;
	struct series *s = find(m, id, labels, true);
	if (s)
		s->value = v;
}

void bw_metrics_observe(struct bw_metrics *m, enum bw_metric id, const char *const *labels,
			double v)
{
	if (m == NULL || (unsigned)id >= BW_METRIC_COUNT || defs[id].type != T_HISTOGRAM ||
	    isnan(v))
		return;
	struct series *s = find(m, id, labels, true);
	if (s == NULL)
		return;
	const struct def *d = &defs[id];
	for (size_t b = 0; b < d->n_bounds; b++) {
		if (v <= d->bounds[b]) {
			s->counts[b]++;
			break;
		}
	}
	s->sum += v;
	s->count++;
}

void bw_metrics_touch(struct bw_metrics *m, enum bw_metric id, const char *const *labels)
{
	(void)find(m, id, labels, true);
}

double bw_metrics_value(const struct bw_metrics *m, enum bw_metric id, const char *const *labels)
{
	/* find() makes nothing when make is false: the cast only lets it share the lookup */
	struct series *s = find((struct bw_metrics *)m, id, labels, false);
	if (s == NULL)
		return 0;
	return defs[id].type == T_HISTOGRAM ? (double)s->count : s->value;
}

/* ---- process metrics -------------------------------------------------------------------- */

static int count_fds(void)
{
	DIR *dir = opendir("/proc/self/fd");
	if (dir == NULL)
		return -1;
	int n = 0;
	struct dirent *e;
	while ((e = readdir(dir)) != NULL)
		n += e->d_name[0] != '.';
	closedir(dir);
	return n - 1; /* the directory's own descriptor */
}

/* The host's boot time (btime of /proc/stat), seconds since the epoch; 0 when unknown. */
static double boot_time(void)
{
	FILE *f = fopen("/proc/stat", "re");
	if (f == NULL)
		return 0;
	char line[256];
	double bt = 0;
	while (fgets(line, sizeof(line), f))
		if (strncmp(line, "btime ", 6) == 0) {
			bt = strtod(line + 6, NULL);
			break;
		}
	fclose(f);
	return bt;
}

int bw_metrics_collect_process(struct bw_metrics *m)
{
	char buf[1024];
	int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return BW_EIO;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return BW_EIO;
	buf[n] = '\0';
	/* "pid (comm) S ...": the last ')' ends comm; fields counted from 3 (state) after it */
	char *p = strrchr(buf, ')');
	if (p == NULL)
		return BW_EIO;
	unsigned long long utime = 0, stime = 0, start = 0, vsize = 0;
	long long rss = 0;
	if (sscanf(p + 2,
		   "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu %*d %*d %*d %*d %*d %*d "
		   "%llu %llu %lld",
		   &utime, &stime, &start, &vsize, &rss) != 5)
		return BW_EIO;
	double tick = (double)sysconf(_SC_CLK_TCK);
	double page = (double)sysconf(_SC_PAGESIZE);
	if (tick <= 0)
		tick = 100;
	bw_metrics_set(m, BW_METRIC_CPU, NULL, (double)(utime + stime) / tick);
	bw_metrics_set(m, BW_METRIC_VSZ, NULL, (double)vsize);
	bw_metrics_set(m, BW_METRIC_RSS, NULL, (double)rss * page);
	bw_metrics_set(m, BW_METRIC_START_TIME, NULL, boot_time() + (double)start / tick);
	int fds = count_fds();
	if (fds >= 0)
		bw_metrics_set(m, BW_METRIC_OPEN_FDS, NULL, fds);
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0)
		bw_metrics_set(m, BW_METRIC_MAX_FDS, NULL,
			       rl.rlim_cur == RLIM_INFINITY ? INFINITY : (double)rl.rlim_cur);
	return 0;
}

/* ---- rendering -------------------------------------------------------------------------- */

/* A sample value: the shortest of %.15g / %.17g that reads back exactly; +Inf, -Inf, NaN. */
static void put_value(struct bw_buf *b, double v)
{
	if (isnan(v)) {
		bw_buf_puts(b, "NaN");
		return;
	}
	if (isinf(v)) {
		bw_buf_puts(b, v > 0 ? "+Inf" : "-Inf");
		return;
	}
	char t[40];
	snprintf(t, sizeof(t), "%.15g", v);
	if (strtod(t, NULL) != v)
		snprintf(t, sizeof(t), "%.17g", v);
	bw_buf_puts(b, t);
}

/* A label value as the format wants it: backslash, double quote and line feed escaped. */
static void put_label_value(struct bw_buf *b, const char *v)
{
	for (const char *p = v; *p; p++) {
		if (*p == '\\')
			bw_buf_puts(b, "\\\\");
		else if (*p == '"')
			bw_buf_puts(b, "\\\"");
		else if (*p == '\n')
			bw_buf_puts(b, "\\n");
		else
			bw_buf_append(b, p, 1);
	}
}

/* HELP text: backslash and line feed escaped. */
static void put_help(struct bw_buf *b, const char *v)
{
	for (const char *p = v; *p; p++) {
		if (*p == '\\')
			bw_buf_puts(b, "\\\\");
		else if (*p == '\n')
			bw_buf_puts(b, "\\n");
		else
			bw_buf_append(b, p, 1);
	}
}

/* name{a="x",b="y"[,le="bound"]} with suffix after name ("_bucket", ""). */
static void put_series_name(struct bw_buf *b, const struct def *d, const char *suffix,
			    const struct series *s, const char *le)
{
	size_t nl = n_labels(d);
	bw_buf_puts(b, d->name);
	bw_buf_puts(b, suffix);
	if (nl == 0 && le == NULL)
		return;
	bw_buf_puts(b, "{");
	for (size_t k = 0; k < nl; k++) {
		bw_buf_printf(b, "%s%s=\"", k ? "," : "", d->labels[k]);
		put_label_value(b, s->labels[k]);
		bw_buf_puts(b, "\"");
	}
	if (le)
		bw_buf_printf(b, "%sle=\"%s\"", nl ? "," : "", le);
	bw_buf_puts(b, "}");
}

static void put_histogram(struct bw_buf *b, const struct def *d, const struct series *s)
{
	uint64_t cum = 0;
	char le[40];
	for (size_t k = 0; k < d->n_bounds; k++) {
		cum += s->counts[k];
		snprintf(le, sizeof(le), "%g", d->bounds[k]);
		put_series_name(b, d, "_bucket", s, le);
		bw_buf_printf(b, " %llu\n", (unsigned long long)cum);
	}
	put_series_name(b, d, "_bucket", s, "+Inf");
	bw_buf_printf(b, " %llu\n", (unsigned long long)s->count);
	put_series_name(b, d, "_sum", s, NULL);
	bw_buf_puts(b, " ");
	put_value(b, s->sum);
	bw_buf_puts(b, "\n");
	put_series_name(b, d, "_count", s, NULL);
	bw_buf_printf(b, " %llu\n", (unsigned long long)s->count);
}

void bw_metrics_render(const struct bw_metrics *m, struct bw_buf *out)
{
	if (m == NULL)
		return;
	for (size_t i = 0; i < BW_METRIC_COUNT; i++) {
		const struct def *d = &defs[i];
		const struct family *f = &m->f[i];
		bw_buf_printf(out, "# HELP %s ", d->name);
		put_help(out, d->help);
		bw_buf_printf(out, "\n# TYPE %s %s\n", d->name, type_names[d->type]);
		for (size_t k = 0; k < f->n; k++) {
			if (d->type == T_HISTOGRAM) {
				put_histogram(out, d, &f->s[k]);
				continue;
			}
			put_series_name(out, d, "", &f->s[k], NULL);
			bw_buf_puts(out, " ");
			put_value(out, f->s[k].value);
			bw_buf_puts(out, "\n");
		}
	}
}
