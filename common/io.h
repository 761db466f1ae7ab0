/* io.h: whole writes to a descriptor (short writes and EINTR retried). */
#ifndef BW_IO_H
#define BW_IO_H

#include <stddef.h>

/* Writes all of buf[0..n) to fd. Returns 0, or -1 with errno set (nothing retried but EINTR). */
int bw_write_all(int fd, const void *buf, size_t n);

#endif
