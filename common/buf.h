/* buf.h: a growable, always NUL-terminated byte buffer. */
#ifndef BW_BUF_H
#define BW_BUF_H

#include <stdbool.h>
#include <stddef.h>

#include "error.h"

struct bw_buf {
	char *data; /* NULL until the first append; then NUL-terminated */
	size_t len;
	size_t cap;
	bool failed; /* an allocation failed: the contents are incomplete */
};

#define BW_BUF_INIT {NULL, 0, 0, false}

/* Appends; on allocation failure sets failed and keeps what it had. */
void bw_buf_append(struct bw_buf *b, const char *s, size_t n);
void bw_buf_puts(struct bw_buf *b, const char *s);
void bw_buf_printf(struct bw_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/*
 * Hands the contents to the caller: stores a malloc'd string in *out (an empty string
 * when nothing was appended) and resets b. Returns 0, or BW_ENOMEM (b is then freed).
 */
int bw_buf_steal(struct bw_buf *b, char **out) BW_MUST_CHECK;

void bw_buf_free(struct bw_buf *b);

#endif
