/* fuzz_message.c: libFuzzer target for the backup.start parse+validate path, with the contract as its oracle. */
#include "message.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/*
 * The oracle is written from CONTRACT §2 alone and shares no code with common/: a spec the
 * parser accepts must keep every promise below, a verdict it gives every bound; a broken
 * promise is an abort(), which libFuzzer reports as a crash with its input.
 */

/* Code points of strict UTF-8 s (no overlong forms, surrogates or > U+10FFFF), or -1. */
static long utf8_count(const char *str, bool *control)
{
	const unsigned char *s = (const unsigned char *)str;
	long n = 0;
	*control = false;
	while (*s) {
		uint32_t cp;
		int len;
		if (s[0] < 0x80) {
			cp = s[0];
			len = 1;
		} else if (s[0] >= 0xc2 && s[0] <= 0xdf) {
			cp = s[0] & 0x1f;
			len = 2;
		} else if (s[0] >= 0xe0 && s[0] <= 0xef) {
			cp = s[0] & 0x0f;
			len = 3;
		} else if (s[0] >= 0xf0 && s[0] <= 0xf4) {
			cp = s[0] & 0x07;
			len = 4;
		} else {
			return -1;
		}
		for (int i = 1; i < len; i++) {
			if ((s[i] & 0xc0) != 0x80)
				return -1;
			cp = cp << 6 | (s[i] & 0x3f);
		}
		if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
		    (cp >= 0xd800 && cp <= 0xdfff))
			return -1;
		if (cp <= 0x1f || (cp >= 0x7f && cp <= 0x9f))
			*control = true;
		s += len;
		n++;
	}
	return n;
}

/* A text field: strict UTF-8, min..max code points, no control characters. */
static void check_text(const char *s, long min, long max)
{
	bool control;
	if (s == NULL)
		abort();
	long n = utf8_count(s, &control);
	if (n < min || n > max || control)
		abort();
}

/* job_id, repository_id, credential_id: 1-128 of [A-Za-z0-9._-], the first alphanumeric. */
static bool is_id_char(char ch, bool first)
{
	return (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
	       (!first && (ch == '.' || ch == '_' || ch == '-'));
}

static bool id_ok(const char *s)
{
	if (s == NULL || s[0] == '\0' || strlen(s) > 128)
		return false;
	for (size_t i = 0; s[i]; i++)
		if (!is_id_char(s[i], i == 0))
			return false;
	return true;
}

static void check_id(const char *s)
{
	if (!id_ok(s))
		abort();
}

/* parent_path: relative, and no ".." component. */
static void check_relative(const char *p)
{
	if (p[0] == '/')
		abort();
	for (const char *c = p; *c;) {
		const char *end = strchr(c, '/');
		size_t len = end ? (size_t)(end - c) : strlen(c);
		if (len == 2 && c[0] == '.' && c[1] == '.')
			abort();
		c += len + (end != NULL);
	}
}

/* What a valid spec promises its users. */
static void check_spec(const struct bw_job_spec *s)
{
	check_id(s->job_id);
	check_id(s->repository_id);
	check_id(s->credential_id);
	check_text(s->vm_name, 1, 255);
	check_text(s->vm_path, 1, 1024);
	if (s->vm_id)
		check_text(s->vm_id, 1, 128);
	if (s->policy_id)
		check_text(s->policy_id, 1, 128);
	if (s->backup_type != BW_BACKUP_FULL && s->backup_type != BW_BACKUP_INCREMENTAL)
		abort();
	if (s->max_duration_s != 0 && (s->max_duration_s < 60 || s->max_duration_s > 2592000))
		abort();
	if (s->tags) {
		if (!json_object_is_type(s->tags, json_type_object) ||
		    json_object_object_length(s->tags) > 32)
			abort();
		json_object_object_foreach(s->tags, k, v)
		{
			check_text(k, 1, 64);
			if (!json_object_is_type(v, json_type_string) ||
			    strlen(json_object_get_string(v)) !=
				(size_t)json_object_get_string_len(v))
				abort(); /* a NUL inside: a control character */
			check_text(json_object_get_string(v), 0, 256);
		}
	}
	if (s->n_disks < 1 || s->n_disks > BW_MESSAGE_MAX_DISKS || s->disks == NULL)
		abort();
	bool base = false;
	for (size_t i = 0; i < s->n_disks; i++) {
		const struct bw_disk_spec *d = &s->disks[i];
		if (d->key < 1 || d->key > 2147483647 || d->size_bytes < 512 ||
		    d->size_bytes > BW_DISK_SIZE_MAX || d->size_bytes % 512)
			abort();
		for (size_t j = 0; j < i; j++)
			if (s->disks[j].key == d->key)
				abort();
		if (d->label)
			check_text(d->label, 0, 255);
		if ((d->parent_path == NULL) != (d->previous_change_id == NULL))
			abort();
		if (s->backup_type == BW_BACKUP_FULL && d->parent_path)
			abort();
		if (d->parent_path) {
			check_text(d->parent_path, 1, 4096);
			check_relative(d->parent_path);
			check_text(d->previous_change_id, 1, 1024);
		}
		base |= d->parent_path != NULL;
	}
	if (s->backup_type == BW_BACKUP_INCREMENTAL && !base)
		abort();
}

/* What a verdict promises: bounded (CONTRACT §2), printable, with a reason. */
static void check_verdict(const struct bw_verdict *vd)
{
	if (vd->n == 0 || vd->n > BW_VERDICT_MAX_ERRORS + 1 || vd->reason == BW_REJECT_NONE)
		abort();
	for (size_t i = 0; i < vd->n; i++) {
		const struct bw_violation *v = &vd->v[i];
		bool truncated = strcmp(v->rule, "truncated") == 0;
		if (truncated != (i == BW_VERDICT_MAX_ERRORS) ||
		    (truncated && strcmp(v->path, "$")))
			abort();
		if (v->path[0] == '\0' || v->rule[0] == '\0' || v->message[0] == '\0')
			abort();
		for (const char *p = v->path; *p; p++)
			if ((unsigned char)*p < 0x20) /* paths are printed raw */
				abort();
	}
	if (vd->job_id)
		check_id(vd->job_id);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct bw_job_spec *spec = NULL;
	struct bw_verdict *vd = NULL;
	int rc = bw_message_parse((const char *)data, size, BW_MESSAGE_MAX_BYTES_DEFAULT, &spec,
				  &vd);
	if (rc == 0) {
		if (vd != NULL)
			abort();
		check_spec(spec);
	} else if (rc == BW_EMESSAGE) {
		if (spec != NULL)
			abort();
		check_verdict(vd);
	} else if (rc != BW_ENOMEM) {
		abort();
	}
	bw_job_spec_free(spec);
	bw_verdict_free(vd);
	return 0;
}
