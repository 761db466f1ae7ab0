#!/usr/bin/python3
"""fleet_test.py: fault cases of a fleet (simulated hosts, tests/fleet/fleet.py) under a stream
of jobs, each judged by tests/fleet/checker.py and printed as one table row.

    tests/with-broker fleet_test.py BW_WORKER BW_CTL [--short] [CASE...]

Cases on one broker (the private one of tests/with-broker, BW_TEST_AMQP_URL):
  steady      two hosts, two workers each, a steady stream of small VMs: all complete
  partition   host A cut from the broker for 30 s while its jobs transfer: they finish (the
              SNA writes over NBD, which is not cut) and their events arrive after the heal
  partition_refused  the same, but host A's new connections are reset at once (not blackholed)
  cut_long    host A cut from the broker AND the SNA (blackholed) for longer than its SNA
              patience (sna.max_attempts x (timeout_s + backoff_cap_s)): its transferring jobs
              fail sna_unavailable (retryable) during the cut, each followed by its
              backup.cleanup; those events arrive after the heal
  cut_long_refused  the same with every new connection reset at once (no loop is held)
Cases on a 3-node cluster (`scripts/broker cluster`; skipped while it does not exist), one
cluster for all of them, each case starting once it is whole (every node up, every quorum
queue with all 3 members online) with a fleet and job_ids of its own:
  node_kill     the node most workers are on, SIGKILLed (started again 30 s later, short 10 s)
  leader_kill   the node leading the backup.start quorum queue, SIGKILLed (the same)
  node_freeze   the node most workers are on, SIGSTOPped past the heartbeat, then thawed
  node_restart  the node most workers are on, stopped and started again
  cluster_cut_long  cut_long on the cluster (host A cut from all three nodes and the SNA)
Every case: lost 0, duplicated starts 0, contradicting 0, seq gaps 0, unexpected 0, images
bad 0 (checker.py), and its own conditions; failover s where a fault happens: partitions, from
the heal to the first event of host A arriving after it; cluster cases, from the fault to the
first connection a worker of an affected host opens to another node (its first event after the
fault is in the notes). During every cut, /healthz of each of host A's workers is polled every
0.2 s (7 s bound): a probe slower than 4 s fails the case (the worker's one loop was held for
a silent node's AMQP handshake timeout, 5 s: two CI runs caught 3 s and 4.83 s, a probe that
took a reset for an answer, since fixed); during a cluster fault the same holds for the workers
of the hosts on the node (a frozen node holds binds and consumes for seconds: the restore sends
them without waiting; before, node_freeze measured 2.1-5.7 s). The run
ends with one table of every case (the checker's columns, failover s, healthz worst s).
No CASE: all of them; --short: steady and partition, with fewer jobs (ctest's `fleet`); --short
with CASEs: their short forms (fewer jobs, shorter holds, cut_long's SNA patience 9 s, not 35).

Environment: BW_FLEET_BROKER_SCRIPT another scripts/broker (one with "cluster"), BW_FLEET_AMQP_NODES=one
each host's amqp.url names one node (a worker without amqp.url failover), BW_FLEET_KEEP=1 keeps
the tmp dir of a failed case, BW_FLEET_NBD_BASE (24000) the first host's NBD ports,
BW_FLEET_METRICS_BASE (24800) the first worker's metrics.listen port (+10 per host, +1 per worker).
"""
import os
import sys
import threading
import time
from datetime import datetime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checker  # noqa: E402
import fleet as F  # noqa: E402

KiB = 1 << 10
HEARTBEAT_S = 5            # amqp.heartbeat_s of every fleet worker (fleet.Host.config)
PROBE_EVERY_S = 0.2        # /healthz of each worker of a cut host, this often during the cut
PROBE_TIMEOUT_S = 7.0      # each probe bounded by this (an unanswered one counts this much)
HEALTHZ_LIMIT_S = 4.0      # a probe slower than this during a cut or a cluster fault fails the case
# the fleet's SNA patience (fleet.Host.config): sna.max_attempts x (timeout_s + backoff_cap_s)
PATIENCE_S = 5 * (5 + 2)
# the short form's (fewer, shorter attempts: a cut past it takes less time)
SHORT_SNA = {"sna.max_attempts": 3, "sna.timeout_s": 2, "sna.backoff_cap_s": 1, "sna.connect_timeout_s": 1}
SHORT_PATIENCE_S = 3 * (2 + 1)


class Skip(Exception):
    pass


def occurred(e):
    """An event's occurred_at as unix time."""
    return datetime.strptime(e["occurred_at"].replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


class Run:
    """One case: its fleet, the checks beyond the checker (failures), and what it prints."""

    def __init__(self, worker, ctl, short, broker):
        self.worker, self.ctl, self.short, self.broker = worker, ctl, short, broker
        self.failures, self.notes = [], []
        self.failover = None
        self.healthz_worst = None    # the slowest /healthz probe of a fault window, seconds
        self.fleet = None

    def make(self, tag, hosts=2, **host_kw):
        self.fleet = F.Fleet(self.worker, self.ctl, self.broker, f"{tag}-{os.getpid()}-{int(time.time()) % 100000}")
        for _ in range(hosts):
            self.fleet.add_host(**host_kw)
        for h in self.fleet.hosts:
            h.start()
        return self.fleet

    def probe(self, hosts):
        """Starts polling /healthz of every worker of hosts (fleet.Prober)."""
        return F.Prober([h.health_url(w) for h in hosts for w in h.worker_ids()],
                        every=PROBE_EVERY_S, timeout=PROBE_TIMEOUT_S)

    def probed(self, prober, during):
        """Stops prober; notes the worst probe per worker; a probe over HEALTHZ_LIMIT_S fails
        the case (the worker's one loop was held that long), and so does a probe that could
        not connect."""
        stats = prober.stop()
        worst = max((v[0] for v in stats.values()), default=0.0)
        self.healthz_worst = max(self.healthz_worst or 0.0, worst)
        per = ", ".join(f"{u.split('//')[1].split('/')[0]} {v[0]:.2f} s ({v[1]} probes, {v[2]} errors)"
                        for u, v in stats.items())
        self.notes.append(f"/healthz during {during}: worst {worst:.2f} s (limit {HEALTHZ_LIMIT_S} s); {per}")
        if worst > HEALTHZ_LIMIT_S:
            self.failures.append(f"a /healthz probe took {worst:.2f} s during {during} (limit "
                                 f"{HEALTHZ_LIMIT_S} s): a worker's loop was held")
        if any(v[1] == 0 for v in stats.values()):
            self.failures.append(f"a worker answered no /healthz probe during {during}: {stats}")
        elif any(v[2] for v in stats.values()):
            # a worker that died or closed its listener is not a fast loop
            self.failures.append(f"/healthz probes could not connect during {during}: {stats}")

    def jobs_of(self, host):
        """The job_ids a host accepted."""
        return {e["job_id"] for e in self.fleet.events_by_host(host) if e.get("event") == "backup.accepted"}

    def finish(self, timeout):
        """Waits for every terminal event, drains the collector, judges the history."""
        fl = self.fleet
        left = fl.wait_terminal(timeout)
        if left:
            self.failures.append(f"{len(left)} jobs without a terminal event after {timeout} s")
        fl.collector.drain(quiet=3)
        r = checker.check(fl.history())
        per_host = {h.name: len(self.jobs_of(h.name)) for h in fl.hosts}
        # each host's exports on its own address and port range
        for e in fl.collector.events():
            if e.get("event") != "backup.started" or e.get("host") not in per_host:
                continue
            h = fl.host(e["host"])
            for d in e.get("disks", []):
                if not (d["nbd_url"].startswith(f"nbd://{h.addr}:") and h.port_min <= d["nbd_port"] <= h.port_max):
                    self.failures.append(f"{e['job_id']}: {h.name} served {d['nbd_url']} (port range "
                                         f"{h.port_min}-{h.port_max})")
        self.notes.append(f"jobs accepted per host {per_host}; indeterminate publishes {len(fl.indeterminate)}; "
                          f"collector reconnects {fl.collector.reconnects}; images compared {r.images_compared}")
        return r


def in_thread(fn):
    box = {}

    def body():
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported by the case
            box["error"] = e
    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, box


def wait_for(cond, timeout, step=0.2):
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if v:
            return v
        time.sleep(step)
    return None


def transferring(run, host):
    """Job_ids of host with backup.started and no terminal event yet."""
    fl = run.fleet
    started = {e["job_id"] for e in fl.events_by_host(host) if e.get("event") == "backup.started"}
    return started - set(fl.terminal(started))


# ---- cases on one broker ----------------------------------------------------------------

def case_steady(run):
    n, rate = (20, 2.0) if run.short else (40, 2.0)
    fl = run.make("steady")
    fl.make_vms(n)
    t0 = time.time()
    fl.stream(n, rate)
    r = run.finish(300)
    run.notes.append(f"{n} jobs at {rate}/s, all terminal {time.time() - t0:.1f} s after the first publish")
    if r.failed or r.completed != n:
        run.failures.append(f"steady: {r.completed} completed, {r.failed} failed of {n}")
    for h in fl.hosts:
        if not run.jobs_of(h.name):
            run.failures.append(f"{h.name} took no job")
    return r


def partition(run, tag, cut_s, refuse=False, sna=False, jobs=None, conf=None):
    """Host A cut from the broker (sna: and from the SNA) for cut_s while a job of its
    transfers. Broker only: its jobs finish meanwhile (the SNA writes over NBD, which is not
    cut) and their events arrive after the heal. With the SNA, for longer than its patience:
    its transferring jobs end failed sna_unavailable (retryable, CONTRACT §4), each followed by
    its backup.cleanup, and those events arrive after the heal. Either way /healthz of A's
    workers is probed through the cut (run.probed)."""
    n, rate = jobs or ((14, 1.0) if run.short else (24, 1.0))
    fl = run.make(tag, conf=conf)
    fl.make_vms(n)
    a = fl.host("host-a")
    slow = {"slow_bytes_per_s": 512 * KiB}   # 2-4 MiB disks: 4-8 s of transfer each
    times = {}
    what = "the broker and the SNA" if sna else "the broker"

    def fault():
        # two of A's jobs transferring if that comes within 20 s, else one
        victims = wait_for(lambda: len(transferring(run, a.name)) >= 2 and transferring(run, a.name), 20) \
            or wait_for(lambda: transferring(run, a.name), 40)
        if not victims:
            raise RuntimeError("host-a never had a transferring job to cut")
        times["victims"] = victims
        times["cut"] = time.time()
        a.cut(refuse=refuse, sna=sna)
        prober = run.probe([a])
        F.log(f"{a.name} cut from {what}{' (connections refused)' if refuse else ''} ({len(victims)} of its jobs transferring) for {cut_s} s")
        try:
            time.sleep(cut_s)
        finally:
            times["heal"] = time.time()
            times["blackholed"] = sum(p.blackholed for p in a.proxies)
            a.heal()
            run.probed(prober, f"the {cut_s} s cut of host-a")
        F.log(f"{a.name} healed")

    t, box = in_thread(fault)
    fl.stream(n, rate, job_faults=slow)
    t.join(cut_s + 120)
    if "error" in box or "heal" not in times:
        run.failures.append(str(box.get("error", "the cut did not end")))
        return run.finish(60)
    r = run.finish(240)
    cut, heal = times["cut"], times["heal"]
    mine = run.jobs_of(a.name)
    # every job A had running at the cut ended, and ended while A was cut off
    done_in_cut, late = set(), 0  # jobs, not events: an event may come twice (re-sent)
    for at, e in fl.collector.since(0):
        if e.get("host") != a.name:
            continue
        if e.get("event") in checker.TERMINALS and e["job_id"] in times["victims"]:
            if cut <= occurred(e) <= heal:
                done_in_cut.add(e["job_id"])
        if occurred(e) < heal <= at:
            late += 1
    after = [at for at, e in fl.collector.since(heal) if e.get("host") == a.name]
    term_a = [at for at, e in fl.collector.since(0)
              if e.get("host") == a.name and e.get("event") in checker.TERMINALS]
    outcome = fl.terminal(times["victims"])
    if len(outcome) != len(times["victims"]):
        run.failures.append(f"host-a's jobs transferring at the cut: {len(outcome)} of "
                            f"{len(times['victims'])} ended")
    elif not sna and any(v != "completed" for v in outcome.values()):
        run.failures.append(f"host-a's jobs transferring at the cut: {outcome} (want all completed)")
    if sna:
        run.failures += past_patience(fl, times["victims"], a.name, cut, heal)
    if not after:
        run.failures.append("no event of host-a arrived after the heal")
    else:
        run.failover = min(after) - heal
    ended_after_cut = [j for j, at in last_terminal_at(fl, times["victims"]).items() if at > cut]
    if not ended_after_cut:
        run.failures.append("host-a's jobs all ended before the cut (the cut proved nothing)")
    if late == 0:
        run.failures.append("no event of host-a written during the cut arrived after the heal")
    run.notes.append(
        f"host-a: {len(mine)} jobs, {len(times['victims'])} transferring at the cut, {len(done_in_cut)} of them "
        f"ended during the {cut_s} s cut (by occurred_at); {late} events written before the heal arrived "
        f"after it; its first event arrived "
        f"{(min(after) - heal) if after else float('nan'):.1f} s after the heal, its last terminal "
        f"{(max(term_a) - heal) if term_a else float('nan'):.1f} s after the heal; its workers opened "
        f"{times['blackholed']} broker connections into the cut")
    return r


def past_patience(fl, victims, host, cut, heal):
    """A host cut from the SNA past its patience (CONTRACT §3.1, §4): each job it had
    transferring at the cut ends backup.failed reason sna_unavailable, retryable true, stage
    transferring (or sna_requested), written during the cut; then exactly its backup.cleanup,
    which lists the sna_cleanup_requested action (failed ones also in pending[]). Every other
    failed job of the run is host's and sna_unavailable too (the other host completes all).
    Returns the failures."""
    out = []
    evs = {}
    for e in fl.collector.events():
        evs.setdefault(e.get("job_id"), {}).setdefault(e.get("event_id"), e)
    for jid in sorted(victims):
        mine = sorted(evs.get(jid, {}).values(), key=lambda e: e.get("seq", 0))
        failed = [e for e in mine if e.get("event") == "backup.failed"]
        if len(failed) != 1:
            out.append(f"{jid}: {len(failed)} backup.failed (want 1: its SNA patience ran out in the cut); "
                       f"events {[e.get('event') for e in mine]}")
            continue
        f = failed[0]
        if (f.get("reason"), f.get("retryable"), f.get("host")) != ("sna_unavailable", True, host) \
                or f.get("stage") not in ("transferring", "sna_requested"):
            out.append(f"{jid}: backup.failed reason {f.get('reason')} retryable {f.get('retryable')} "
                       f"stage {f.get('stage')} host {f.get('host')} (want sna_unavailable, true, "
                       f"transferring, {host})")
        if not cut <= occurred(f) <= heal:
            out.append(f"{jid}: backup.failed occurred {occurred(f) - cut:.1f} s after the cut "
                       f"(the cut lasted {heal - cut:.1f} s: the patience did not run out inside it)")
        later = [e.get("event") for e in mine if e.get("seq", 0) > f.get("seq", 0)]
        if later != ["backup.cleanup"]:
            out.append(f"{jid}: after backup.failed came {later} (want exactly backup.cleanup)")
            continue
        c = mine[-1]
        acts = [x for x in c.get("actions", []) if x.get("kind") == "sna_cleanup_requested"]
        if len(acts) != 1:
            out.append(f"{jid}: backup.cleanup has {len(acts)} sna_cleanup_requested actions (want 1)")
        elif acts[0].get("result") != "done" and not c.get("pending"):
            out.append(f"{jid}: sna_cleanup_requested {acts[0].get('result')} and pending[] empty")
    for jid, o in sorted(fl.terminal().items()):
        if o != "failed":
            continue
        f = next(e for e in evs[jid].values() if e.get("event") == "backup.failed")
        if (f.get("reason"), f.get("host")) != ("sna_unavailable", host):
            out.append(f"{jid}: failed {f.get('reason')} on {f.get('host')} (only {host}'s jobs may fail, "
                       f"sna_unavailable)")
    return out


def last_terminal_at(fl, job_ids):
    """{job_id: arrival time of its first terminal event}."""
    out = {}
    for at, e in fl.collector.since(0):
        if e.get("job_id") in job_ids and e.get("event") in checker.TERMINALS:
            out.setdefault(e["job_id"], at)
    return out


def case_partition(run):
    return partition(run, "partition", 30)


def case_partition_refused(run):
    return partition(run, "partrefused", 30, refuse=True)


def cut_long(run, tag, refuse=False):
    """Host A cut from the broker and the SNA past its SNA patience: 60 s (patience 35 s), or
    in the short form 20 s with a patience of 9 s (SHORT_SNA) and fewer jobs."""
    if run.short:
        return partition(run, tag, SHORT_PATIENCE_S + 11, refuse=refuse, sna=True, jobs=(10, 2.0),
                         conf=SHORT_SNA)
    return partition(run, tag, PATIENCE_S + 25, refuse=refuse, sna=True)


def case_cut_long(run):
    return cut_long(run, "cutlong")


def case_cut_long_refused(run):
    return cut_long(run, "cutlongref", refuse=True)


def case_cluster_cut_long(run):
    return cut_long(run, "clustercutlong")


# ---- cases on a cluster -----------------------------------------------------------------

def busiest(run, exclude=()):
    """The 1-based node with the most relayed worker connections, and the hosts on it."""
    links = {}
    for h in run.fleet.hosts:
        for node, n in h.links().items():
            links[node] = links.get(node, 0) + n
    node = max((n for n in links if n not in exclude), key=lambda n: links[n])
    return node, [h for h in run.fleet.hosts if h.links()[node] > 0], links


def cluster_case(run, tag, choose, fault, heal=None, hold=0):
    """A stream of jobs across two hosts; once a job transfers, choose(run) picks the victim node
    (1-based), the observer moves off it, fault(cluster, node) runs; after hold seconds
    heal(cluster, node), if given. Failover: fault to the first event of a host that was on
    that node arriving after it."""
    cluster = run.broker
    n, rate = (12, 2.0) if run.short else (30, 1.0)
    fl = run.make(tag)
    fl.make_vms(n)
    times = {}

    def body():
        if not wait_for(lambda: any(transferring(run, h.name) for h in fl.hosts), 90):
            raise RuntimeError("no job ever transferred")
        node, hosts, links = choose(run)
        times["node"], times["hosts"] = node, [h.name for h in hosts]
        fl.collector.move_off(node - 1)
        fl.publisher.move_off(node - 1)
        F.log(f"{tag}: node {node} (worker links per node {links}; hosts on it {times['hosts']})")
        times["fault"] = time.time()
        prober = run.probe(hosts)
        try:
            took, out = fault(cluster, node)
            F.log(f"{tag}: {out.splitlines()[-1] if out else ''} ({took:.1f} s)")
            if heal:
                time.sleep(hold)
                took, out = heal(cluster, node)
                times["heal"] = time.time()
                F.log(f"{tag}: {out.splitlines()[-1] if out else ''} ({took:.1f} s)")
        finally:
            run.probed(prober, f"the fault of node {node} (workers of {times['hosts']})")

    t, box = in_thread(body)
    fl.stream(n, rate, job_faults={"slow_bytes_per_s": 512 * KiB})
    t.join(600)
    if "error" in box:
        run.failures.append(f"{type(box['error']).__name__}: {box['error']}")
    r = run.finish(300)
    if "fault" in times:
        t0 = times["fault"]
        after = [at for at, e in fl.collector.since(t0) if e.get("host") in times["hosts"]]
        reconnect = [c for h in fl.hosts if h.name in times["hosts"]
                     for i, p in enumerate(h.proxies) if i + 1 != times["node"] for c in p.connects if c > t0]
        # A host's workers may sit on several nodes, so its first event after the fault may come
        # from a worker the fault never touched; the first connection one of its proxies relays
        # to another node after the fault is a worker that lost the node and moved.
        first_event = (min(after) - t0) if after else None
        moved = (min(reconnect) - t0) if reconnect else None
        run.failover = moved if moved is not None else first_event
        run.notes.append(f"node {times['node']}: failover (a worker of {times['hosts']} connected to "
                         f"another node) {moved and round(moved, 1)} s after the fault; their first event "
                         f"{first_event and round(first_event, 1)} s after it")
        back = times.get("heal")
        if not after:
            run.failures.append(f"no event of {times['hosts']} after the fault")
        elif back is not None and (moved is None or t0 + moved >= back):
            why = f"no worker of {times['hosts']} moved to another node before node {times['node']} was back"
            if os.environ.get("BW_FLEET_AMQP_NODES") == "one":
                run.notes.append(why + " (expected: BW_FLEET_AMQP_NODES=one)")
            else:
                run.failures.append(why)
    return r


KILLED_FOR_S = 30          # a SIGKILLed node is started again after this (failover must come first)
SHORT_KILLED_FOR_S = 10    # the same in the short form


def killed_for(run):
    return SHORT_KILLED_FOR_S if run.short else KILLED_FOR_S


def case_node_kill(run):
    return cluster_case(run, "nodekill", busiest, lambda c, i: c.node("kill", i),
                        heal=lambda c, i: c.node("start", i), hold=killed_for(run))


def case_leader_kill(run):
    def leader(r):
        node = r.broker.leader("backup.start")
        if node is None:
            raise RuntimeError("could not find the leader of backup.start")
        links = {}
        for h in r.fleet.hosts:
            for i, k in h.links().items():
                links[i] = links.get(i, 0) + k
        on = [h for h in r.fleet.hosts if h.links()[node] > 0]
        if not on:
            # no worker link on the leader's node (8 links over 3 nodes: about 1 run in 25):
            # the kill still moves the queue's leader under every host's consumers, so the
            # failover is every host's first event after it
            r.notes.append(f"no worker link on node {node}, the leader's: every host counts")
            on = list(r.fleet.hosts)
        return node, on, links
    return cluster_case(run, "leaderkill", leader, lambda c, i: c.node("kill", i),
                        heal=lambda c, i: c.node("start", i), hold=killed_for(run))


def case_node_freeze(run):
    return cluster_case(run, "nodefreeze", busiest, lambda c, i: c.node("freeze", i),
                        heal=lambda c, i: c.node("thaw", i), hold=3 * HEARTBEAT_S)


def case_node_restart(run):
    return cluster_case(run, "noderestart", busiest, lambda c, i: c.node("stop", i),
                        heal=lambda c, i: c.node("start", i), hold=5)


# name: (function, needs a cluster, in the short form)
CASES = {
    "steady": (case_steady, False, True),
    "partition": (case_partition, False, True),
    "partition_refused": (case_partition_refused, False, False),
    "cut_long": (case_cut_long, False, False),
    "cut_long_refused": (case_cut_long_refused, False, False),
    "node_kill": (case_node_kill, True, False),
    "leader_kill": (case_leader_kill, True, False),
    "node_freeze": (case_node_freeze, True, False),
    "node_restart": (case_node_restart, True, False),
    "cluster_cut_long": (case_cluster_cut_long, True, False),
}
CLUSTER_NODES = 3


class Shared:
    """The one cluster every cluster case of a run uses (started by the first of them,
    stopped at the end), each case beginning once it is whole again (Cluster.wait_healthy)."""

    def __init__(self):
        self.cluster, self.error = None, None

    def get(self):
        if self.cluster is None and self.error is None:
            ok, why = F.cluster_available()
            if not ok:
                self.error = Skip(why)
            else:
                t0 = time.time()
                try:
                    self.cluster = F.Cluster(CLUSTER_NODES)
                    F.log(f"cluster of {CLUSTER_NODES} nodes up in {time.time() - t0:.0f} s ({self.cluster.dir})")
                except Exception as e:  # noqa: BLE001 - every cluster case fails with it
                    self.error = e
        if isinstance(self.error, Skip):
            raise self.error
        if self.error is not None:
            raise RuntimeError(f"cluster start: {type(self.error).__name__}: {self.error}")
        return self.cluster

    def close(self):
        if self.cluster is not None:
            self.cluster.close()


def run_case(name, worker, ctl, short, single, shared):
    fn, needs_cluster, _ = CASES[name]
    broker = single
    t0 = time.time()
    if needs_cluster:
        try:
            broker = shared.get()
        except Skip:
            raise
        except Exception as e:  # noqa: BLE001 - the case fails, the others still run
            print(f"FAIL {name}: {e}", flush=True)
            return False, (name, checker.Result(), None, None)
        took, why = broker.wait_healthy()
        if why:
            print(f"FAIL {name}: the cluster is not whole after {took:.0f} s: {why}", flush=True)
            return False, (name, checker.Result(), None, None)
        F.log(f"{name}: the cluster is whole ({CLUSTER_NODES} nodes up, every quorum queue with "
              f"{CLUSTER_NODES} members online; waited {took:.1f} s)")
    run = Run(worker, ctl, short, broker)
    r = None
    try:
        r = fn(run)
    except Skip:
        raise
    except Exception as e:  # noqa: BLE001 - a broken case fails, the others still run
        run.failures.append(f"{type(e).__name__}: {e}")
    finally:
        if run.fleet is not None:
            keep = bool(os.environ.get("BW_FLEET_KEEP")) and (run.failures or (r is not None and not r.ok))
            if run.failures or (r is not None and not r.ok):
                for h in run.fleet.hosts:
                    h.tail()
            codes, left = run.fleet.close(keep=keep)
            if keep:
                print(f"kept {run.fleet.tmp}")
            if any(c != 0 for c in codes.values()):
                run.failures.append(f"worker exit codes on SIGTERM {codes}")
            run.failures += left
    if r is None:
        r = checker.Result()
    passed = checker.report(name, r, run.failover) and not run.failures
    for note in run.notes:
        print(f"     {note}")
    for f in run.failures:
        print(f"     FAIL {f}")
    print(f"{'ok  ' if passed else 'FAIL'} {name} ({time.time() - t0:.0f} s)", flush=True)
    return passed, (name, r, run.failover, run.healthz_worst)


def main():
    args = sys.argv[1:]
    short = "--short" in args
    args = [a for a in args if a != "--short"]
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    worker, ctl, names = args[0], args[1], args[2:]
    if not names:
        names = [n for n, (_, _, s) in CASES.items() if s] if short else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown case(s) {unknown}; cases: {', '.join(CASES)}", file=sys.stderr)
        return 2
    url = os.environ.get("BW_TEST_AMQP_URL")
    if not url and not all(CASES[n][1] for n in names):
        print("BW_TEST_AMQP_URL is not set: run under tests/with-broker", file=sys.stderr)
        return 2
    single = F.SingleBroker(url)
    results, rows, skipped = {}, [], []
    t0 = time.time()
    shared = Shared()
    try:
        for name in names:
            try:
                results[name], row = run_case(name, worker, ctl, short, single, shared)
                rows.append(row)
            except Skip as s:
                skipped.append(name)
                print(f"skip {name}: {s}", flush=True)
    finally:
        shared.close()
    # one table of every case: the checker's columns, then the worst /healthz probe of the
    # case's fault window ("-": no fault, or none probed)
    print("\n" + checker.header().replace(" |\n", " | healthz worst s |\n", 1) + "---|")
    for name, r, fo, hz in rows:
        print(checker.row(name, r, fo) + (" - |" if hz is None else f" {hz:.2f} |"))
    failed = [n for n, ok in results.items() if not ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed, {len(skipped)} skipped "
          f"({time.time() - t0:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
