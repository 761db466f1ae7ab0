/* message.c: checks a backup.start rule by rule, collecting one violation per broken rule. */
#include "message.h"
#include "buf.h"
#include "json.h"
#include "target.h"
#include "text.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define KEY_MAX 2147483647LL
#define PATH_DISPLAY_MAX 300 /* a longer tag key is shown truncated in a path */

static const char *const reason_names[] = {
	[BW_REJECT_NONE] = "none",
	[BW_REJECT_INVALID_JSON] = "invalid_json",
	[BW_REJECT_TOO_LARGE] = "too_large",
	[BW_REJECT_INVALID_MESSAGE] = "invalid_message",
	[BW_REJECT_UNKNOWN_REPOSITORY] = "unknown_repository",
	[BW_REJECT_UNKNOWN_CREDENTIAL] = "unknown_credential",
	[BW_REJECT_INVALID_PARENT] = "invalid_parent",
};

const char *bw_reject_reason_name(enum bw_reject_reason reason)
{
	if ((unsigned)reason >= sizeof(reason_names) / sizeof(reason_names[0]))
		return "unknown";
	return reason_names[reason];
}

/* The ignored-fields list of a valid spec stops growing here (it is only logged). */
#define UNKNOWN_LIST_MAX 4096

/* The validation pass: the verdict being built and the spec being filled. */
struct check {
	struct bw_verdict *vd;
	struct bw_job_spec *spec;
	struct bw_buf unknown;
	size_t unknown_more; /* ignored fields past UNKNOWN_LIST_MAX, counted only */
	size_t dropped;      /* violations found past BW_VERDICT_MAX_ERRORS, counted only */
	char stopped_at[PATH_DISPLAY_MAX + 32]; /* where a walk stopped once the verdict was full */
	bool oom;
};

/* Appends one entry to the verdict, whose array holds BW_VERDICT_MAX_ERRORS + 1 entries. */
static void add_violation(struct check *c, const char *path, const char *rule, const char *msg)
{
	struct bw_verdict *vd = c->vd;
	if (vd->v == NULL && (vd->v = calloc(BW_VERDICT_MAX_ERRORS + 1, sizeof(*vd->v))) == NULL) {
		c->oom = true;
		return;
	}
	struct bw_violation *v = &vd->v[vd->n];
	v->path = strdup(path);
	v->message = strdup(msg);
	v->rule = rule;
	if (v->path == NULL || v->message == NULL) {
		free(v->path);
		free(v->message);
		c->oom = true;
		return;
	}
	vd->n++;
}

static void violate(struct check *c, enum bw_reject_reason reason, const char *path,
		    const char *rule, const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/*
 * Records a violated rule. Past BW_VERDICT_MAX_ERRORS it is only counted (and still decides
 * the reason): close_verdict() then ends the list with one "truncated" entry.
 */
static void violate(struct check *c, enum bw_reject_reason reason, const char *path,
		    const char *rule, const char *fmt, ...)
{
	struct bw_verdict *vd = c->vd;
	if (vd->reason == BW_REJECT_NONE || reason < vd->reason)
		vd->reason = reason;
	if (vd->n >= BW_VERDICT_MAX_ERRORS) {
		c->dropped++;
		return;
	}
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	add_violation(c, path, rule, msg);
}

/*
 * True once a violation had to be left out: a walk over a large array or object (disks,
 * tags) stops there, noting where. A 16 MiB body of empty disk objects would otherwise be
 * walked to its end for violations nobody is shown.
 */
static bool verdict_full(struct check *c, const char *where)
{
	if (c->dropped == 0)
		return false;
	if (c->stopped_at[0] == '\0')
		snprintf(c->stopped_at, sizeof(c->stopped_at), "%s", where);
	return true;
}

/* Ends a verdict that had to leave violations out with the one "truncated" entry. */
static void close_verdict(struct check *c)
{
	char msg[sizeof(c->stopped_at) + 160];
	if (c->dropped == 0)
		return;
	if (c->stopped_at[0])
		snprintf(msg, sizeof(msg),
			 "only the first %d violations are listed: %zu more found before the "
			 "check stopped at %s, and there may be more after it",
			 BW_VERDICT_MAX_ERRORS, c->dropped, c->stopped_at);
	else
		snprintf(msg, sizeof(msg),
			 "only the first %d violations are listed: %zu more left out",
			 BW_VERDICT_MAX_ERRORS, c->dropped);
	add_violation(c, "$", "truncated", msg);
}

#define INVALID(c, path, rule, ...) violate(c, BW_REJECT_INVALID_MESSAGE, path, rule, __VA_ARGS__)

static const char *type_name(struct json_object *o)
{
	switch (json_object_get_type(o)) {
	case json_type_null:
		return "null";
	case json_type_boolean:
		return "a boolean";
	case json_type_double:
	case json_type_int:
		return "a number";
	case json_type_object:
		return "an object";
	case json_type_array:
		return "an array";
	case json_type_string:
		return "a string";
	}
	return "?";
}

static void join(char *out, size_t size, const char *parent, const char *name)
{
	snprintf(out, size, "%s%s%s", parent, parent[0] ? "." : "", name);
}

/* ---- strings ---------------------------------------------------------------------------- */

enum str_kind {
	STR_ID,   /* [A-Za-z0-9][A-Za-z0-9._-]* */
	STR_TEXT, /* any text without control characters */
	STR_PATH, /* text, relative, no ".." component */
};

static bool has_dotdot_component(const char *s, size_t n)
{
	for (size_t i = 0; i < n;) {
		size_t j = i;
		while (j < n && s[j] != '/')
			j++;
		if (j - i == 2 && s[i] == '.' && s[i + 1] == '.')
			return true;
		i = j + 1;
	}
	return false;
}

/*
 * Checks a string field; returns a malloc'd copy when every rule holds (NULL otherwise,
 * the violations recorded). min/max count code points.
 */
static char *check_string(struct check *c, const char *path, struct json_object *o,
			  enum str_kind kind, size_t min, size_t max)
{
	if (!json_object_is_type(o, json_type_string)) {
		INVALID(c, path, "type", "must be a string, not %s", type_name(o));
		return NULL;
	}
	const char *s = json_object_get_string(o);
	size_t n = (size_t)json_object_get_string_len(o);
	size_t cps = bw_utf8_length(s, n);
	bool ok = true;

	if (cps < min) {
		INVALID(c, path, "min_length", "must not be empty");
		return NULL; /* nothing else to say about an empty string */
	}
	if (cps > max) {
		INVALID(c, path, "max_length", "is %zu characters long, at most %zu allowed", cps,
			max);
		ok = false;
	}
	if (kind == STR_ID) {
		if (!bw_text_is_safe_id(s, n)) {
			INVALID(c, path, "charset",
				"must start with a letter or digit and contain only A-Z a-z 0-9 . _ -");
			ok = false;
		}
	} else if (bw_text_has_control(s, n)) {
		INVALID(c, path, "control_chars", "must not contain control characters");
		ok = false;
	}
	if (kind == STR_PATH && (s[0] == '/' || has_dotdot_component(s, n))) {
		INVALID(c, path, "relative_path",
			"must be relative to the repository root, without '..' components");
		ok = false;
	}
	if (!ok)
		return NULL;
	char *copy = strdup(s);
	if (copy == NULL)
		c->oom = true;
	return copy;
}

/* ---- integers --------------------------------------------------------------------------- */

static bool check_integer(struct check *c, const char *path, struct json_object *o, int64_t min,
			  int64_t max, int64_t multiple, int64_t *out)
{
	int64_t v;
	if (!bw_json_get_integer(o, &v)) {
		INVALID(c, path, "type", "must be an integer, not %s", type_name(o));
		return false;
	}
	bool ok = true;
	if (v < min) {
		INVALID(c, path, "minimum", "is %" PRId64 ", at least %" PRId64 " required", v, min);
		ok = false;
	}
	if (v > max) {
		INVALID(c, path, "maximum", "is %" PRId64 ", at most %" PRId64 " allowed", v, max);
		ok = false;
	}
	if (multiple > 1 && !bw_json_integer_multiple_of(o, multiple)) {
		INVALID(c, path, "multiple_of", "must be a multiple of %" PRId64, multiple);
		ok = false;
	}
	if (ok)
		*out = v;
	return ok;
}

/* ---- objects ---------------------------------------------------------------------------- */

static struct json_object *member(struct json_object *obj, const char *name)
{
	struct json_object *v = NULL;
	return json_object_object_get_ex(obj, name, &v) ? v : NULL;
}

static bool has(struct json_object *obj, const char *name)
{
	return json_object_object_get_ex(obj, name, NULL);
}

/* True when obj has the member (its value, which may be JSON null, in *out); else reports it. */
static bool required(struct check *c, struct json_object *obj, const char *parent, const char *name,
		     struct json_object **out)
{
	char path[128];
	if (json_object_object_get_ex(obj, name, out))
		return true;
	join(path, sizeof(path), parent, name);
	INVALID(c, path, "required", "is required");
	return false;
}

/* Records the members of obj not named in known[] as ignored fields (a bounded list). */
static void note_unknown(struct check *c, struct json_object *obj, const char *parent,
			 const char *const *known)
{
	if (c->vd->n > 0)
		return; /* the message is rejected: the list would be thrown away */
	json_object_object_foreach(obj, k, v)
	{
		(void)v;
		bool found = false;
		for (const char *const *p = known; *p && !found; p++)
			found = strcmp(*p, k) == 0;
		if (found)
			continue;
		if (c->unknown.len >= UNKNOWN_LIST_MAX) {
			c->unknown_more++;
			continue;
		}
		if (c->unknown.len)
			bw_buf_puts(&c->unknown, ", ");
		bw_buf_puts(&c->unknown, parent);
		if (parent[0])
			bw_buf_puts(&c->unknown, ".");
		bw_text_json_quote(&c->unknown, k, strlen(k));
	}
}

static bool is_simple_key(const char *k, size_t n)
{
	if (n == 0)
		return false;
	for (size_t i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)k[i];
		if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') ||
		      (ch >= 'A' && ch <= 'Z') || ch == '_' || ch == '-'))
			return false;
	}
	return true;
}

/* tags.key, or tags["k e y"] JSON-escaped (pure ASCII; truncated past PATH_DISPLAY_MAX). */
static void tag_path(char *out, size_t size, const char *k, size_t n)
{
	if (is_simple_key(k, n) && n < PATH_DISPLAY_MAX) {
		snprintf(out, size, "tags.%s", k);
		return;
	}
	struct bw_buf b = BW_BUF_INIT;
	bw_text_json_quote(&b, k, n);
	if (b.failed || b.data == NULL) {
		snprintf(out, size, "tags[?]");
	} else if (b.len > PATH_DISPLAY_MAX) {
		snprintf(out, size, "tags[%.*s...\"]", PATH_DISPLAY_MAX - 5, b.data);
	} else {
		snprintf(out, size, "tags[%s]", b.data);
	}
	bw_buf_free(&b);
}

static void check_tags(struct check *c, struct json_object *tags)
{
	char path[PATH_DISPLAY_MAX + 32];
	bool ok = true;

	if (!json_object_is_type(tags, json_type_object)) {
		INVALID(c, "tags", "type", "must be an object, not %s", type_name(tags));
		return;
	}
	int count = json_object_object_length(tags);
	if (count > 32) {
		INVALID(c, "tags", "max_properties", "has %d entries, at most 32 allowed", count);
		ok = false;
	}
	struct lh_entry *e;
	for (e = json_object_get_object(tags)->head; e; e = e->next) {
		const char *k = (const char *)lh_entry_k(e);
		struct json_object *v = (struct json_object *)lh_entry_v(e);
		size_t kn = strlen(k); /* json-c keys are NUL-terminated: a \u0000 cuts them */
		size_t kcp = bw_utf8_length(k, kn);
		tag_path(path, sizeof(path), k, kn);
		if (verdict_full(c, path)) {
			ok = false;
			break;
		}
		if (kcp == 0) {
			INVALID(c, path, "key_min_length", "tag keys must not be empty");
			ok = false;
		} else if (kcp > 64) {
			INVALID(c, path, "key_max_length",
				"tag key is %zu characters long, at most 64 allowed", kcp);
			ok = false;
		}
		if (bw_text_has_control(k, kn)) {
			INVALID(c, path, "key_control_chars",
				"tag keys must not contain control characters");
			ok = false;
		}
		char *s = check_string(c, path, v, STR_TEXT, 0, 256);
		ok &= s != NULL;
		free(s);
	}
	if (ok)
		c->spec->tags = json_object_get(tags);
	c->vd->tags_valid = ok;
}

static void check_vm(struct check *c, struct json_object *vm)
{
	static const char *const known[] = {"name", "path", "id", NULL};
	struct bw_job_spec *spec = c->spec;
	struct json_object *v;

	if (!json_object_is_type(vm, json_type_object)) {
		INVALID(c, "vm", "type", "must be an object, not %s", type_name(vm));
		return;
	}
	size_t before = c->vd->n;
	if (required(c, vm, "vm", "name", &v))
		spec->vm_name = check_string(c, "vm.name", v, STR_TEXT, 1, 255);
	if (required(c, vm, "vm", "path", &v))
		spec->vm_path = check_string(c, "vm.path", v, STR_TEXT, 1, 1024);
	if (has(vm, "id"))
		spec->vm_id = check_string(c, "vm.id", member(vm, "id"), STR_TEXT, 1, 128);
	note_unknown(c, vm, "vm", known);
	c->vd->vm_valid = c->vd->n == before;
}

/* A disk's valid key with its index, and the lowest index that has the same key. */
struct key_at {
	int64_t key;
	size_t idx;
	size_t first;
};

static int key_at_by_key(const void *a, const void *b)
{
	const struct key_at *x = a, *y = b;
	if (x->key != y->key)
		return x->key < y->key ? -1 : 1;
	return x->idx < y->idx ? -1 : x->idx > y->idx;
}

static int key_at_by_idx(const void *a, const void *b)
{
	const struct key_at *x = a, *y = b;
	return x->idx < y->idx ? -1 : x->idx > y->idx;
}

/*
 * Finds the disks whose key an earlier disk already has, block by block as the walk over
 * disks[] reaches them, so that a walk stopped by a full verdict has not paid for the rest
 * of a million disks. Each block (64 disks, then as many as before it: the blocks double)
 * has its valid keys sorted with their indices; a key repeats when an earlier disk of the
 * block or one of seen[] (the first disk of every key before the block, sorted by key:
 * binary search) has it. The block's new keys are then merged into seen[]. O(n log n) for
 * n disks walked, not the pairwise O(n^2): a 16 MiB body holds half a million disks.
 * Only keys that pass their own rules count: an invalid key is never "already used".
 */
struct dup_finder {
	struct json_object *disks;
	size_t n;	     /* disks in the array */
	size_t done;	     /* disks [0, done) are classified */
	struct key_at *seen; /* the first disk of each key in [0, block start), by key */
	size_t n_seen;
	struct key_at *blk; /* the block's repeats, by index (first: the disk repeated) */
	size_t n_blk, next;
};

#define DUP_BLOCK_MIN 64

static void dup_finder_free(struct dup_finder *f)
{
	free(f->seen);
	free(f->blk);
}

static const struct key_at *seen_find(const struct dup_finder *f, int64_t key)
{
	size_t lo = 0, hi = f->n_seen;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (f->seen[mid].key < key)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < f->n_seen && f->seen[lo].key == key ? &f->seen[lo] : NULL;
}

/* Classifies the next block of disks. Returns false when out of memory. */
static bool dup_finder_block(struct dup_finder *f)
{
	size_t from = f->done, to = from + (from > DUP_BLOCK_MIN ? from : DUP_BLOCK_MIN);
	if (to > f->n)
		to = f->n;
	struct key_at *blk = realloc(f->blk, (to - from) * sizeof(*blk));
	if (blk == NULL)
		return false;
	f->blk = blk;
	size_t m = 0;
	for (size_t i = from; i < to; i++) {
		struct json_object *d = json_object_array_get_idx(f->disks, i), *v;
		int64_t key;
		if (json_object_is_type(d, json_type_object) &&
		    json_object_object_get_ex(d, "key", &v) && bw_json_get_integer(v, &key) &&
		    key >= 1 && key <= KEY_MAX)
			blk[m++] = (struct key_at){key, i, i};
	}
	if (m > 1)
		qsort(blk, m, sizeof(*blk), key_at_by_key);

	/* Each run of one key: all of it repeats seen[]'s disk, or all but its first repeat
	 * the first. New keys go to the front (fresh), repeats after them (w never passes r). */
	struct key_at *fresh = NULL;
	size_t n_fresh = 0, n_rep = 0;
	if (m > 0 && (fresh = malloc(m * sizeof(*fresh))) == NULL)
		return false;
	for (size_t r = 0; r < m; r++) {
		bool run_start = r == 0 || blk[r].key != blk[r - 1].key;
		if (run_start) {
			const struct key_at *old = seen_find(f, blk[r].key);
			blk[r].first = old ? old->first : blk[r].idx;
			if (old == NULL) {
				fresh[n_fresh++] = blk[r];
				continue;
			}
		} else {
			blk[r].first = blk[r - 1].first;
		}
		blk[n_rep++] = blk[r];
	}
	if (n_rep > 1)
		qsort(blk, n_rep, sizeof(*blk), key_at_by_idx);

	/* seen[] += fresh[], both sorted by key and without a key in common */
	if (n_fresh > 0) {
		struct key_at *merged = malloc((f->n_seen + n_fresh) * sizeof(*merged));
		if (merged == NULL) {
			free(fresh);
			return false;
		}
		size_t i = 0, j = 0, k = 0;
		while (i < f->n_seen || j < n_fresh) {
			if (j == n_fresh || (i < f->n_seen && f->seen[i].key < fresh[j].key))
				merged[k++] = f->seen[i++];
			else
				merged[k++] = fresh[j++];
		}
		free(f->seen);
		f->seen = merged;
		f->n_seen = k;
	}
	free(fresh);
	f->n_blk = n_rep;
	f->next = 0;
	f->done = to;
	return true;
}

/*
 * Whether disk i (called with rising i) repeats an earlier disk's key: true with that
 * disk's index in *first. Sets *oom when out of memory.
 */
static bool dup_finder_check(struct dup_finder *f, size_t i, size_t *first, bool *oom)
{
	while (i >= f->done) {
		if (!dup_finder_block(f)) {
			*oom = true;
			return false;
		}
	}
	while (f->next < f->n_blk && f->blk[f->next].idx < i)
		f->next++;
	if (f->next < f->n_blk && f->blk[f->next].idx == i) {
		*first = f->blk[f->next].first;
		return true;
	}
	return false;
}

/* The disks[] of a job whose backup_type is type (NULL when it is itself invalid). */
static void check_disks(struct check *c, struct json_object *disks, const char *type)
{
	static const char *const known[] = {"key",	   "size_bytes", "label", "parent_path",
					    "previous_change_id", NULL};
	bool full = type && strcmp(type, "full") == 0;
	bool incremental = type && strcmp(type, "incremental") == 0;
	char path[64], field[96];

	if (!json_object_is_type(disks, json_type_array)) {
		INVALID(c, "disks", "type", "must be an array, not %s", type_name(disks));
		return;
	}
	size_t n = json_object_array_length(disks);
	if (n == 0)
		INVALID(c, "disks", "min_items", "must list every disk of the VM (at least one)");
	if (n > BW_MESSAGE_MAX_DISKS)
		INVALID(c, "disks", "max_items", "has %zu disks, at most %d allowed", n,
			BW_MESSAGE_MAX_DISKS);

	struct dup_finder dups = {.disks = disks, .n = n};
	/* Only a valid job's disks are kept (64 at most): past them one scratch entry is
	 * reused, so a million disk objects cost no million entries. */
	size_t kept = n < BW_MESSAGE_MAX_DISKS ? n : BW_MESSAGE_MAX_DISKS;
	struct bw_disk_spec *specs = calloc(kept + 1, sizeof(*specs));
	if (specs == NULL) {
		c->oom = true;
		return;
	}
	c->spec->disks = specs;
	c->spec->n_disks = kept + 1; /* so that bw_job_spec_free frees the scratch entry too */

	bool have_base = false, stopped = false;
	for (size_t i = 0; i < n; i++) {
		struct json_object *d = json_object_array_get_idx(disks, i);
		struct bw_disk_spec *ds = &specs[i < kept ? i : kept];
		struct json_object *v;
		snprintf(path, sizeof(path), "disks[%zu]", i);

		if (verdict_full(c, path)) {
			stopped = true;
			break;
		}
		if (i >= kept) {
			free(ds->label);
			free(ds->parent_path);
			free(ds->previous_change_id);
			*ds = (struct bw_disk_spec){0};
		}
		if (!json_object_is_type(d, json_type_object)) {
			INVALID(c, path, "type", "must be an object, not %s", type_name(d));
			continue;
		}
		if (required(c, d, path, "key", &v)) {
			join(field, sizeof(field), path, "key");
			size_t first;
			if (check_integer(c, field, v, 1, KEY_MAX, 1, &ds->key) &&
			    dup_finder_check(&dups, i, &first, &c->oom))
				INVALID(c, field, "unique",
					"disk key %" PRId64 " is already used by disks[%zu]",
					ds->key, first);
		}
		if (required(c, d, path, "size_bytes", &v)) {
			join(field, sizeof(field), path, "size_bytes");
			check_integer(c, field, v, 512, BW_DISK_SIZE_MAX, 512, &ds->size_bytes);
		}
		if (has(d, "label")) {
			join(field, sizeof(field), path, "label");
			ds->label = check_string(c, field, member(d, "label"), STR_TEXT, 0, 255);
		}

		bool has_parent = has(d, "parent_path");
		bool has_change = has(d, "previous_change_id");
		have_base |= has_parent && has_change;
		if (full) {
			if (has_parent) {
				join(field, sizeof(field), path, "parent_path");
				INVALID(c, field, "forbidden_in_full",
					"only incremental jobs name a parent image");
			}
			if (has_change) {
				join(field, sizeof(field), path, "previous_change_id");
				INVALID(c, field, "forbidden_in_full",
					"only incremental jobs carry a change id");
			}
		} else {
			if (has_parent) {
				join(field, sizeof(field), path, "parent_path");
				ds->parent_path = check_string(c, field, member(d, "parent_path"),
							       STR_PATH, 1, 4096);
			}
			if (has_change) {
				join(field, sizeof(field), path, "previous_change_id");
				ds->previous_change_id = check_string(
					c, field, member(d, "previous_change_id"), STR_TEXT, 1, 1024);
			}
			if (incremental && has_parent != has_change) {
				join(field, sizeof(field), path,
				     has_parent ? "previous_change_id" : "parent_path");
				INVALID(c, field, "required",
					"parent_path and previous_change_id go together");
			}
		}
		note_unknown(c, d, path, known);
	}
	dup_finder_free(&dups);
	if (n > kept) { /* the scratch entry goes now; a rejected spec keeps the first 64 */
		free(specs[kept].label);
		free(specs[kept].parent_path);
		free(specs[kept].previous_change_id);
	}
	c->spec->n_disks = kept;
	if (incremental && !have_base && !stopped)
		INVALID(c, "disks", "incremental_base",
			"an incremental job needs at least one disk with parent_path and "
			"previous_change_id");
}

static void check_document(struct check *c, struct json_object *doc)
{
	static const char *const known[] = {"schema_version", "job_id",	    "vm",
					    "backup_type",    "repository_id", "credential_id",
					    "policy_id",      "tags",	    "disks",
					    "max_duration_s", NULL};
	struct bw_job_spec *spec = c->spec;
	struct json_object *v;
	int64_t n;

	if (required(c, doc, "", "schema_version", &v)) {
		if (!bw_json_get_integer(v, &n))
			INVALID(c, "schema_version", "type", "must be the integer 1, not %s",
				type_name(v));
		else if (n != 1)
			INVALID(c, "schema_version", "const", "must be 1 (this worker speaks v1)");
	}
	if (required(c, doc, "", "job_id", &v)) {
		spec->job_id = check_string(c, "job_id", v, STR_ID, 1, 128);
		if (spec->job_id && (c->vd->job_id = strdup(spec->job_id)) == NULL)
			c->oom = true;
	}
	if (required(c, doc, "", "vm", &v))
		check_vm(c, v);

	const char *type = NULL;
	if (required(c, doc, "", "backup_type", &v)) {
		if (!json_object_is_type(v, json_type_string)) {
			INVALID(c, "backup_type", "type", "must be a string, not %s", type_name(v));
		} else {
			type = json_object_get_string(v);
			if (strcmp(type, "full") == 0) {
				spec->backup_type = BW_BACKUP_FULL;
			} else if (strcmp(type, "incremental") == 0) {
				spec->backup_type = BW_BACKUP_INCREMENTAL;
			} else {
				INVALID(c, "backup_type", "enum", "must be \"full\" or \"incremental\"");
				type = NULL;
			}
		}
	}
	if (required(c, doc, "", "repository_id", &v))
		spec->repository_id = check_string(c, "repository_id", v, STR_ID, 1, 128);
	if (required(c, doc, "", "credential_id", &v))
		spec->credential_id = check_string(c, "credential_id", v, STR_ID, 1, 128);
	if (has(doc, "policy_id")) {
		size_t before = c->vd->n;
		spec->policy_id =
			check_string(c, "policy_id", member(doc, "policy_id"), STR_TEXT, 1, 128);
		c->vd->policy_valid = c->vd->n == before;
	} else {
		c->vd->policy_valid = true;
	}
	if (has(doc, "tags"))
		check_tags(c, member(doc, "tags"));
	else
		c->vd->tags_valid = true;
	if (required(c, doc, "", "disks", &v))
		check_disks(c, v, type);
	if (has(doc, "max_duration_s"))
		check_integer(c, "max_duration_s", member(doc, "max_duration_s"), 60, 2592000, 1,
			      &spec->max_duration_s);
	note_unknown(c, doc, "", known);
}

static struct bw_verdict *verdict_new(void)
{
	return calloc(1, sizeof(struct bw_verdict));
}

int bw_message_parse(const char *body, size_t len, size_t max_bytes, struct bw_job_spec **spec,
		     struct bw_verdict **verdict)
{
	struct check c = {.unknown = BW_BUF_INIT};
	struct json_object *doc = NULL;
	char why[160];
	int rc = BW_ENOMEM;

	c.vd = verdict_new();
	c.spec = calloc(1, sizeof(*c.spec));
	if (c.vd == NULL || c.spec == NULL)
		goto out;

	if (len > max_bytes) {
		violate(&c, BW_REJECT_TOO_LARGE, "$", "too_large",
			"the message is %zu bytes, at most %zu allowed", len, max_bytes);
		goto decided;
	}
	rc = bw_json_parse_strict(body, len, &doc, why, sizeof(why));
	if (rc == BW_ENOMEM)
		goto out;
	if (rc != 0) {
		violate(&c, BW_REJECT_INVALID_JSON, "$", "invalid_json", "%s", why);
		goto decided;
	}
	c.vd->doc = doc;
	if (!json_object_is_type(doc, json_type_object)) {
		INVALID(&c, "$", "type", "the message must be a JSON object, not %s",
			type_name(doc));
		goto decided;
	}
	check_document(&c, doc);

decided:
	close_verdict(&c);
	rc = BW_ENOMEM;
	if (c.oom || c.unknown.failed)
		goto out;
	if (c.vd->n > 0) {
		*verdict = c.vd;
		c.vd = NULL;
		rc = BW_EMESSAGE;
		goto out;
	}
	if (c.unknown_more)
		bw_buf_printf(&c.unknown, ", and %zu more", c.unknown_more);
	if (c.unknown.len && bw_buf_steal(&c.unknown, &c.spec->unknown_fields) != 0)
		goto out;
	*spec = c.spec;
	c.spec = NULL;
	rc = 0;
out:
	bw_buf_free(&c.unknown);
	bw_job_spec_free(c.spec);
	bw_verdict_free(c.vd);
	return rc;
}

/* ---- host rules ------------------------------------------------------------------------- */

int bw_message_check_host(const struct bw_job_spec *spec, const struct bw_config *cfg,
			  struct bw_verdict **verdict)
{
	struct check c = {.vd = verdict_new(), .unknown = BW_BUF_INIT};
	char path[PATH_MAX + 64], detail[PATH_MAX];

	if (c.vd == NULL)
		return BW_ENOMEM;
	/* CONTRACT §4: a rejection names the body's job_id when it follows the rule, as
	 * every valid spec's does. */
	if ((c.vd->job_id = strdup(spec->job_id)) == NULL)
		c.oom = true;
	const char *repo = bw_config_repository(cfg, spec->repository_id);
	if (repo == NULL)
		violate(&c, BW_REJECT_UNKNOWN_REPOSITORY, "repository_id", "unknown_repository",
			"no repository \"%s\" is configured on this host", spec->repository_id);

	snprintf(path, sizeof(path), "%s/%s.json", cfg->credentials_dir, spec->credential_id);
	if (access(path, F_OK) != 0)
		violate(&c, BW_REJECT_UNKNOWN_CREDENTIAL, "credential_id", "unknown_credential",
			"no credential \"%s\" in %s", spec->credential_id, cfg->credentials_dir);

	for (size_t i = 0; repo && i < spec->n_disks; i++) {
		if (spec->disks[i].parent_path == NULL)
			continue;
		/* the whole chain, as right before the overlay is served (CONTRACT §5); a
		 * system error (EIO, no openat2) is reported as the rule "unreadable" too:
		 * the worker could not serve this parent either */
		enum bw_chain_fault fault = BW_CHAIN_OK;
		int rc = bw_target_check_chain(repo, spec->disks[i].parent_path, &fault, detail,
					       sizeof(detail));
		if (rc == 0)
			continue;
		if (rc == BW_ENOMEM) {
			c.oom = true;
			break;
		}
		snprintf(path, sizeof(path), "disks[%zu].parent_path", i);
		violate(&c, BW_REJECT_INVALID_PARENT, path, bw_target_chain_rule(fault),
			"parent image unusable: %s", detail);
	}
	close_verdict(&c);
	if (c.oom) {
		bw_verdict_free(c.vd);
		return BW_ENOMEM;
	}
	if (c.vd->n == 0) {
		bw_verdict_free(c.vd);
		return 0;
	}
	*verdict = c.vd;
	return BW_EMESSAGE;
}

void bw_job_spec_free(struct bw_job_spec *spec)
{
	if (spec == NULL)
		return;
	free(spec->job_id);
	free(spec->vm_name);
	free(spec->vm_path);
	free(spec->vm_id);
	free(spec->repository_id);
	free(spec->credential_id);
	free(spec->policy_id);
	json_object_put(spec->tags);
	for (size_t i = 0; spec->disks && i < spec->n_disks; i++) {
		free(spec->disks[i].label);
		free(spec->disks[i].parent_path);
		free(spec->disks[i].previous_change_id);
	}
	free(spec->disks);
	free(spec->unknown_fields);
	free(spec);
}

void bw_verdict_free(struct bw_verdict *vd)
{
	if (vd == NULL)
		return;
	for (size_t i = 0; i < vd->n; i++) {
		free(vd->v[i].path);
		free(vd->v[i].message);
	}
	free(vd->v);
	free(vd->job_id);
	json_object_put(vd->doc);
	free(vd);
}
