/* amqp_internal.h: for amqp.c and amqp_admin.c only: the raw connection and its reply check. */
#ifndef BW_AMQP_INTERNAL_H
#define BW_AMQP_INTERNAL_H

#include <amqp.h>

#include "amqp.h"

/* The one channel every connection of bw uses. */
#define BW__AMQP_CHANNEL 1

/* The librabbitmq-c connection under c (borrowed). */
amqp_connection_state_t bw__amqp_conn(struct bw_amqp *c);

/*
 * Judges an RPC reply as amqp.c does: 0 for a normal reply; else the reason ("what: ...")
 * in err, BW_EAMQP or BW_ECONFIG; a channel the broker closed is reopened (the connection
 * stays usable), a closed connection is marked lost.
 */
int bw__amqp_reply(struct bw_amqp *c, amqp_rpc_reply_t r, const char *what, char *err,
		   size_t errsize) BW_MUST_CHECK;

#endif
