/* loop.c: the worker's one event loop: broker, SNA, children and signals, never waiting past a deadline. */
#include "worker.h"

#include "clock.h"
#include "log.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAINTAIN_MS 60000
#define HEARTBEAT_MS 10000

/* A delivery held while every job slot is busy; the others wait unacked in the prefetch. */
struct held {
	bool have;
	struct bw_delivery d;
};

static int make_dirs(const struct bw_config *cfg)
{
	char logs[4200];
	snprintf(logs, sizeof(logs), "%s/logs", cfg->worker_state_dir);
	if ((mkdir(cfg->worker_state_dir, 0750) != 0 && errno != EEXIST) ||
	    (mkdir(logs, 0750) != 0 && errno != EEXIST)) {
		bw_log_warn("cannot create %s", logs);
		return -1;
	}
	return 0;
}

static void handle_delivery(struct worker *w, struct bw_delivery *d)
{
	struct bw_amqp *c = w->consumer.c;
	int rc = job_receive(w, d->body, d->len);
	int arc;
	if (rc == 0)
		arc = bw_amqp_ack(c, d); /* after the claim's commit (DESIGN decision 2) */
	else if (rc == BW_EMESSAGE)
		arc = bw_amqp_reject(c, d); /* to the DLQ with x-death */
	else {
		bw_log_warnx("a backup.start could not be taken (%s): given back to the queue",
			     bw_strerror(rc));
		arc = bw_amqp_requeue(c, d);
	}
	if (arc == BW_EAMQP)
		bw_amqp_link_down(&w->consumer);
}

static void consume(struct worker *w, struct held *held)
{
	char err[512];
	if (w->stopping || w->draining || w->consumer.c == NULL)
		return;
	for (int k = 0; k < 16; k++) {
		if (held->have) {
			if (w->n_jobs >= w->cfg->worker_max_jobs)
				return;
			handle_delivery(w, &held->d);
			bw_delivery_free(&held->d);
			held->have = false;
			if (w->consumer.c == NULL)
				return;
		}
		bool got = false;
		struct bw_delivery d;
		if (bw_amqp_poll(w->consumer.c, &d, &got, err, sizeof(err)) != 0) {
			bw_log_warnx("consumer: %s; reconnecting", err);
			bw_amqp_link_down(&w->consumer);
			return;
		}
		if (!got)
			return;
		held->d = d;
		held->have = true;
	}
}

static void publish(struct worker *w)
{
	char err[512];
	bool fresh;
	if (w->publisher.c == NULL) {
		int rc = bw_amqp_link_up(&w->publisher, &fresh, err, sizeof(err));
		if (rc != 0) {
			if (rc == BW_ECONFIG)
				bw_log_warnx("publisher: %s", err);
			return;
		}
		bw_relay_reset(w->relay);
		bw_log_info("publisher connected");
	}
	if (bw_relay_step(w->relay, w->publisher.c, err, sizeof(err)) == BW_EAMQP) {
		bw_log_warnx("publisher: %s; reconnecting", err);
		bw_amqp_link_down(&w->publisher);
	}
}

static int min_timeout(int a, int b)
{
	if (a < 0)
		return b;
	if (b < 0)
		return a;
	return a < b ? a : b;
}

int worker_run(const struct bw_config *cfg);

int worker_run(const struct bw_config *cfg)
{
	struct worker w;
	struct held held = {false, {0}};
	char err[512];
	int status = 1, sfd = -1;

	memset(&w, 0, sizeof(w));
	w.cfg = cfg;
	if (gethostname(w.host, sizeof(w.host) - 1) != 0)
		snprintf(w.host, sizeof(w.host), "localhost");
	if (make_dirs(cfg) != 0)
		return 1;

	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGCHLD);
	sigaddset(&mask, SIGUSR1);
	/*
	 * Blocked signals reach the loop only through the signalfd: without one, SIGTERM would
	 * stay blocked and the worker could not be stopped but by SIGKILL. Refuse to start.
	 */
	if (sigprocmask(SIG_BLOCK, &mask, NULL) != 0 ||
	    (sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK)) < 0) {
		bw_log_warn("cannot receive signals through a signalfd");
		goto out;
	}

	int rc = bw_ledger_open(&w.ledger, cfg->ledger_path, cfg->nbd_port_min, cfg->nbd_port_max);
	if (rc != 0) {
		bw_log_warnx("ledger %s: %s", cfg->ledger_path, bw_strerror(rc));
		goto out;
	}
	rc = bw_ledger_register(w.ledger, cfg->worker_id, cfg->worker_state_dir);
	if (rc != 0) {
		bw_log_warnx("cannot register worker %s: %s%s", cfg->worker_id, bw_strerror(rc),
			     rc == BW_EEXIST ? " (another process runs with this worker.id)" : "");
		goto out;
	}
	struct bw_sna_opts so = {cfg->sna_url,		   cfg->sna_token,
				 cfg->sna_connect_timeout_s, cfg->sna_timeout_s,
				 cfg->sna_max_attempts,	   cfg->sna_backoff_base_ms,
				 cfg->sna_backoff_cap_s};
	if (bw_sna_new(&w.sna, &so) != 0 ||
	    bw_relay_new(&w.relay, w.ledger, cfg->amqp_events_exchange, 256) != 0) {
		bw_log_warnx("out of memory");
		goto out;
	}
	w.topology = (struct bw_amqp_topology){cfg->amqp_queue, cfg->amqp_jobs_exchange,
					       cfg->amqp_events_exchange, cfg->amqp_dlx,
					       cfg->amqp_dlq, cfg->amqp_delivery_limit,
					       !cfg->amqp_declare};
	struct bw_amqp_opts ao = {cfg->amqp_url,
				  cfg->amqp_heartbeat_s,
				  5000,
				  cfg->worker_id,
				  cfg->amqp_tls_ca_file[0] ? cfg->amqp_tls_ca_file : NULL,
				  cfg->amqp_tls_cert_file[0] ? cfg->amqp_tls_cert_file : NULL,
				  cfg->amqp_tls_key_file[0] ? cfg->amqp_tls_key_file : NULL,
				  cfg->amqp_tls_verify_peer,
				  cfg->amqp_tls_verify_hostname};
	w.consumer = (struct bw_amqp_link){.opts = ao,
					   .role = BW_AMQP_CONSUMER,
					   .topology = &w.topology,
					   .queue = cfg->amqp_queue,
					   .prefetch = cfg->amqp_prefetch,
					   .backoff_base_ms = 200,
					   .backoff_cap_ms = 30000};
	w.publisher = w.consumer;
	w.publisher.role = BW_AMQP_PUBLISHER;
	w.publisher.queue = NULL;
	bw_log_info("worker %s up: ledger %s, ports %d-%d, up to %d job(s)", cfg->worker_id,
		    cfg->ledger_path, cfg->nbd_port_min, cfg->nbd_port_max, cfg->worker_max_jobs);
	recover_pass(&w); /* before the first delivery: what dead workers left comes first */
	w.last_recovery_ms = bw_clock_mono_ms();

	int64_t stop_by = 0;
	for (;;) {
		int64_t now = bw_clock_mono_ms();
		bool fresh;
		if (!w.stopping && !w.draining && w.consumer.c == NULL) {
			rc = bw_amqp_link_up(&w.consumer, &fresh, err, sizeof(err));
			if (rc == BW_ECONFIG) {
				bw_log_warnx("consumer: %s", err);
			} else if (rc == 0) {
				bw_log_info("consuming %s", cfg->amqp_queue);
			}
		}
		consume(&w, &held);
		publish(&w);
		bw_sna_perform(w.sna);
		jobs_step(&w);
		publish(&w);

		if (!w.stopping && !w.draining &&
		    now - w.last_recovery_ms >= (int64_t)cfg->worker_recovery_interval_s * 1000) {
			recover_pass(&w);
			w.last_recovery_ms = now;
		}
		if (now - w.last_maintain_ms > MAINTAIN_MS) {
			if ((rc = bw_ledger_maintain(w.ledger)) != 0)
				bw_log_debug("ledger maintenance: %s", bw_strerror(rc));
			w.last_maintain_ms = now;
		}
		if (now - w.last_heartbeat_ms > HEARTBEAT_MS) {
			if ((rc = bw_ledger_heartbeat(w.ledger)) != 0)
				bw_log_debug("ledger heartbeat: %s", bw_strerror(rc));
			w.last_heartbeat_ms = now;
		}
		if (w.stopping || w.draining) {
			size_t backlog = 0;
			int64_t age = 0;
			if (bw_ledger_outbox_backlog(w.ledger, &backlog, &age) != 0)
				backlog = 1; /* unknown: assume something is left */
			if ((w.jobs == NULL && backlog == 0) || (w.stopping && now > stop_by)) {
				if (w.jobs || backlog)
					bw_log_warnx("stopping with %d job(s) and %zu event(s) left "
						     "(the next worker on this host takes them)",
						     w.n_jobs, backlog);
				break;
			}
		}

		struct pollfd fds[80];
		int n = 0;
		fds[n++] = (struct pollfd){sfd, POLLIN, 0};
		if (w.consumer.c)
			fds[n++] = (struct pollfd){bw_amqp_fd(w.consumer.c), POLLIN, 0};
		if (w.publisher.c)
			fds[n++] = (struct pollfd){bw_amqp_fd(w.publisher.c), POLLIN, 0};
		n += bw_sna_pollfds(w.sna, fds + n, 80 - n);
		int t = cfg->amqp_heartbeat_s * 1000 / 4;
		t = min_timeout(t, jobs_timeout_ms(&w));
		t = min_timeout(t, bw_sna_timeout_ms(w.sna));
		t = min_timeout(t, bw_relay_timeout_ms(w.relay));
		if (w.consumer.c == NULL && !w.stopping && !w.draining)
			t = min_timeout(t, bw_amqp_link_timeout_ms(&w.consumer));
		if (w.publisher.c == NULL)
			t = min_timeout(t, bw_amqp_link_timeout_ms(&w.publisher));
		if ((w.consumer.c && bw_amqp_pending(w.consumer.c)) ||
		    (w.publisher.c && bw_amqp_pending(w.publisher.c)) ||
		    bw_relay_inflight(w.relay) > 0)
			t = min_timeout(t, 5);
		if (t < 0 || t > 1000)
			t = 1000;
		poll(fds, (nfds_t)n, t);

		struct signalfd_siginfo si;
		while (read(sfd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
			if (si.ssi_signo == SIGCHLD)
				continue; /* jobs_step reaps its own children */
			if (si.ssi_signo == SIGUSR1) {
				if (w.stopping || w.draining)
					continue;
				bw_log_info("SIGUSR1: draining: no new jobs; %d running job(s) run to "
					    "their end, then the worker exits", w.n_jobs);
				w.draining = true;
				bw_amqp_link_down(&w.consumer); /* unacked deliveries go back at once */
				if (held.have) {
					bw_delivery_free(&held.d);
					held.have = false;
				}
				continue;
			}
			if (w.stopping) {
				bw_log_warnx("second signal: stopping now; the ledger stays consistent");
				goto out_stop;
			}
			bw_log_info("signal %u: no new jobs; jobs still preparing are rolled back, "
				    "transferring ones handed over (%d job(s))",
				    si.ssi_signo, w.n_jobs);
			w.stopping = true;
			stop_by = bw_clock_mono_ms() + (int64_t)cfg->worker_shutdown_grace_s * 1000;
			bw_amqp_link_down(&w.consumer); /* stop consuming at once */
			if (held.have) {
				bw_delivery_free(&held.d);
				held.have = false; /* unacked: the broker redelivers it */
			}
			jobs_shutdown(&w);
		}
	}
out_stop:
	status = 0;
out:
	if (held.have)
		bw_delivery_free(&held.d);
	bw_amqp_link_down(&w.consumer);
	bw_amqp_link_down(&w.publisher);
	bw_relay_free(w.relay);
	bw_sna_free(w.sna);
	if (w.ledger && w.jobs == NULL && bw_ledger_unregister(w.ledger) != 0)
		bw_log_warnx("could not unregister: the next worker's recovery pass will");
	bw_ledger_close(w.ledger);
	if (sfd >= 0)
		close(sfd);
	return status;
}
