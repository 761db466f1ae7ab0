/* cancel.c: the backup.cancel message: strict parsing and building (CONTRACT §2.1). */
#include "cancel.h"
#include "json.h"
#include "text.h"

#include <json-c/json.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static int refuse(int code, char *why, size_t whysz, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

static int refuse(int code, char *why, size_t whysz, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(why, whysz, fmt, ap);
	va_end(ap);
	return code;
}

/* NULL when job_id[0..n) follows the rule of §2, else why not. */
static const char *job_id_fault(const char *s, size_t n)
{
	if (n == 0)
		return "job_id must not be empty";
	if (n > BW_CANCEL_JOB_ID_MAX)
		return "job_id is longer than 128 characters";
	if (!bw_text_is_safe_id(s, n))
		return "job_id must start with a letter or digit and contain only A-Z a-z 0-9 . _ -";
	return NULL;
}

/* NULL when reason[0..n) may be a cancel's reason, else why not. */
static const char *reason_fault(const char *s, size_t n)
{
	size_t cps = bw_utf8_length(s, n);
	if (cps == SIZE_MAX)
		return "reason is not valid UTF-8";
	if (cps > BW_CANCEL_REASON_MAX)
		return "reason is longer than 256 characters";
	if (bw_text_has_control(s, n))
		return "reason must not contain control characters";
	return NULL;
}

int bw_cancel_parse(const char *body, size_t len, struct bw_cancel *out, char *why, size_t whysz)
{
	memset(out, 0, sizeof(*out));
	if (len > BW_CANCEL_MAX_BYTES)
		return refuse(BW_EMESSAGE, why, whysz, "larger than %d bytes", BW_CANCEL_MAX_BYTES);
	struct json_object *doc = NULL;
	char jwhy[200];
	int rc = bw_json_parse_strict(body, len, &doc, jwhy, sizeof(jwhy));
	if (rc == BW_ENOMEM)
		return refuse(BW_EMESSAGE, why, whysz, "out of memory");
	if (rc != 0)
		return refuse(BW_EMESSAGE, why, whysz, "not JSON: %s", jwhy);

	struct json_object *v;
	int64_t version;
	const char *fault = NULL;
	if (!json_object_is_type(doc, json_type_object))
		fault = "must be a JSON object";
	else if (!json_object_object_get_ex(doc, "schema_version", &v))
		fault = "schema_version is required";
	else if (!bw_json_get_integer(v, &version) || version != 1)
		fault = "schema_version must be the integer 1";
	else if (!json_object_object_get_ex(doc, "job_id", &v))
		fault = "job_id is required";
	else if (!json_object_is_type(v, json_type_string))
		fault = "job_id must be a string";
	else if ((fault = job_id_fault(json_object_get_string(v),
				       (size_t)json_object_get_string_len(v))) == NULL)
		memcpy(out->job_id, json_object_get_string(v),
		       (size_t)json_object_get_string_len(v) + 1);

	if (fault == NULL && json_object_object_get_ex(doc, "reason", &v)) {
		if (!json_object_is_type(v, json_type_string)) {
			fault = "reason must be a string";
		} else {
			size_t n = (size_t)json_object_get_string_len(v);
			fault = reason_fault(json_object_get_string(v), n);
			if (fault == NULL)
				memcpy(out->reason, json_object_get_string(v), n + 1);
		}
	}
	json_object_put(doc);
	if (fault != NULL) {
		memset(out, 0, sizeof(*out));
		return refuse(BW_EMESSAGE, why, whysz, "%s", fault);
	}
	return 0;
}

int bw_cancel_build(const char *job_id, const char *reason, struct bw_buf *out, char *why,
		    size_t whysz)
{
	const char *fault = job_id_fault(job_id, strlen(job_id));
	if (fault == NULL && reason != NULL)
		fault = reason_fault(reason, strlen(reason));
	if (fault != NULL)
		return refuse(BW_EINVAL, why, whysz, "%s", fault);
	bw_buf_printf(out, "{\"schema_version\":1,\"job_id\":\"%s\"", job_id);
	if (reason != NULL && reason[0] != '\0') {
		bw_buf_puts(out, ",\"reason\":");
		bw_text_json_quote(out, reason, strlen(reason));
	}
	bw_buf_puts(out, "}");
	return 0;
}
