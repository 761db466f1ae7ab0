/* error.c: names, texts and classes of the BW_E codes, generated from one table. */
#include "error.h"

#include <errno.h>
#include <stddef.h>

struct err_entry {
	int code;
	bool transient;
	const char *name;
	const char *text;
};

static const struct err_entry errors[] = {
	{BW_OK, false, "BW_OK", "success"},
#define BW__ERR_ROW(name, value, transient, text) {BW_##name, transient, "BW_" #name, text},
	BW_ERRNO_MAP(BW__ERR_ROW)
#undef BW__ERR_ROW
};

static const struct err_entry *find(int code)
{
	for (unsigned i = 0; i < sizeof(errors) / sizeof(errors[0]); i++)
		if (errors[i].code == code)
			return &errors[i];
	return NULL;
}

const char *bw_strerror(int code)
{
	const struct err_entry *e = find(code);
	return e ? e->text : "unknown error";
}

const char *bw_err_name(int code)
{
	const struct err_entry *e = find(code);
	return e ? e->name : "BW_E?";
}

bool bw_err_transient(int code)
{
	const struct err_entry *e = find(code);
	return e ? e->transient : false;
}

int bw_err_from_errno(int err)
{
	switch (err) {
	case ENOMEM:
		return BW_ENOMEM;
	case ENOENT:
	case ENOTDIR:
		return BW_ENOENT;
	case EEXIST:
		return BW_EEXIST;
	case EACCES:
	case EPERM:
		return BW_EPERM;
	case EINVAL:
		return BW_EINVAL;
	case ERANGE:
	case EOVERFLOW:
		return BW_ERANGE;
	case EBUSY:
	case EAGAIN:
		return BW_EBUSY;
	case ETIMEDOUT:
		return BW_ETIMEDOUT;
	case EADDRINUSE:
		return BW_EADDRINUSE;
	case EIO:
		return BW_EIO;
	default:
		return BW_ESYS;
	}
}
