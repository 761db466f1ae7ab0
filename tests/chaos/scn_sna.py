#!/usr/bin/python3
"""scn_sna.py: chaos scenarios of the SNA (issue 16): every fault knob of the simulator
(tests/sna/README.md), and an HTTP-aware proxy between the workers and the SNA (io_proxy.py)
that accepts and then black-holes the start, the progress or the cleanup call of a job, or
resets the connection. Real broker (scripts/broker), real bw-worker x2, real qemu-nbd.

Usage: /usr/bin/python3 tests/chaos/scn_sna.py BW_WORKER BW_CTL [--quick] [NAME...]
  runs the scenarios alone (as tests/chaos/chaos.py does) and prints the chaos table.
  Exit codes: 0 nothing lost, leaked or unexpected; 1 otherwise; 2 usage.

What each job must end as is the contract's (CONTRACT.md §3): a retry that recovers completes,
with images equal to the simulator's snapshot (the checker's "images bad" is a failure: a
false success); attempts exhausted are sna_unavailable; a 4xx is sna_rejected without an SNA
cleanup; a lie or a failure is sna_failed, never a backup.disk.completed of a disk the SNA did
not copy; a blackholed cleanup is a failed action listed in pending[]. Nothing leaks."""
import http.client
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import io_env  # noqa: E402
from io_env import MiB  # noqa: E402
from io_proxy import SnaProxy  # noqa: E402

# the workers' SNA settings: short, so that exhausted attempts end a job in seconds
SNA_CONF = {"sna.timeout_s": 2, "sna.connect_timeout_s": 1, "sna.max_attempts": 3,
            "sna.backoff_base_ms": 100, "sna.backoff_cap_s": 1, "sna.poll_interval_s": 1,
            "sna.lost_after": 3, "worker.shutdown_grace_s": 10}
WAIT_S = 90        # per batch: every job has ended by then (the longest fault ends in ~15 s)
DISKS = {2000: 4 * MiB, 2001: MiB}
SLOW = {2000: 8 * MiB, 2001: MiB}   # copied at a set rate: the fault hits while it runs
ONE = {2000: 8 * MiB}               # one slow disk: no disk of it can truly complete early
UNCOUNTED = ("wrong_types", "nulls", "deep", "not_json", "oversize", "unknown_status", "foreign_key")
GARBAGE = UNCOUNTED + ("huge", "huge_padding", "control")
LIES = {"no_bytes": {"sna_failed"}, "short_total": {"sna_failed"}, "empty_change_id": {"sna_failed"},
        "null_change_id": {"sna_unavailable"}, "object_change_id": {"sna_unavailable"}}
UNAVAILABLE = {"sna_unavailable"}
NO_DISK = object()  # want: failed, and no disk of it may be reported completed


class SnaRig:
    """A broker, the simulator behind a SnaProxy, one host of two workers."""

    def __init__(self, ctx, tag):
        self.ctx = ctx
        self.broker = io_env.Broker(os.path.join(ctx.tmp, "broker"))
        self.rig = None
        self.proxy = None
        try:
            self.rig = io_env.Rig(ctx, self.broker, tag)
            self.proxy = SnaProxy(self.rig.sim.port)
            conf = dict(SNA_CONF)
            conf["sna.url"] = self.proxy.url
            self.host = self.rig.add_host(workers=2, max_jobs=8, ports=40, conf=conf)
            self.host.start()
            self.saved = ([], [])   # requests and snapshots of a simulator that died
        except BaseException:
            self.close_early()
            raise

    def close_early(self):
        if self.rig is not None:
            self.rig.abort()
        if self.proxy is not None:
            self.proxy.close()
        self.broker.close()

    def finish(self, result):
        rig = self.rig
        saved_req, saved_snap = self.saved
        orig = rig.history

        def history():
            h = orig()
            h.sna_requests = saved_req + h.sna_requests
            h.snapshots = saved_snap + h.snapshots
            return h
        rig.history = history
        try:
            rig.finish(result)
        finally:
            self.proxy.close()
            self.broker.close()

    def restart_sim(self):
        """The simulator died (die_mid_transfer): keep what it recorded, start a new one on the
        same state (its VMs and job directories survive), point the proxy at it."""
        old = self.rig.sim
        old.proc.wait(30)
        old.proc.stdout.close()
        self.rig.sim = io_env.fleet.Sim(self.rig.sim_state, os.path.join(self.rig.tmp, "sim.log"))
        self.proxy.set_upstream(self.rig.sim.port)
        return old.proc.returncode

    def save_sim_records(self):
        self.saved = (self.rig.sim.get("/_sim/requests")["requests"],
                      self.rig.sim.get("/_sim/snapshots")["snapshots"])


def run_batch(sr, jobs, result, before_wait=None):
    """jobs: [(name, vm, job knobs or None, want, why)]; publishes them all, waits until each
    ended (a failure with its cleanup), checks each against want ("completed", a set of
    reasons, or (set, NO_DISK)). Returns {name: job_id}."""
    rig = sr.rig
    ids = {}
    for name, vm, knobs, _, _ in jobs:
        m = rig.msg(name, vm, max_duration_s=120)
        ids[name] = m["job_id"]
        rig.send(m, knobs)
    if before_wait:
        before_wait(ids)
    left = rig.wait_terminal(WAIT_S, list(ids.values()))
    rig.wait_cleanup(list(ids.values()), 30)
    for jid in sorted(left):
        result["failures"].append(f"{jid}: no terminal event {WAIT_S} s after it was published")
    got = {name: check_job(rig, ids[name], want, result, why) for name, _, _, want, why in jobs}
    result["notes"].append("ended: " + ", ".join(f"{n} {g}" for n, g in got.items()))
    return ids


def check_job(rig, jid, want, result, why):
    no_disk = isinstance(want, tuple)
    if no_disk:
        want = want[0]
    got = io_env.expect(rig, jid, want, result, why)
    if got is not None:
        result["recovered"] += 1
    if no_disk:
        done = [e.get("key") for e in rig.events_of(jid) if e.get("event") == "backup.disk.completed"]
        if done:
            result["failures"].append(f"{jid}: backup.disk.completed for disk(s) {done} although the SNA "
                                      f"never really copied them ({why}): a false success")
    return got


def sim_starts(rig, jid, saved=()):
    reqs = list(saved) + rig.sim.get("/_sim/requests")["requests"]
    return [r for r in reqs if r.get("path", "").endswith("/backup/start")
            and (r.get("body") or {}).get("job_id") == jid]


def sim_cleanups(rig, jid):
    return [r for r in rig.sim.get("/_sim/requests")["requests"] if r.get("path", "").endswith("/cleanup")
            and (r.get("body") or {}).get("job_id") == jid]


# ---- every knob of the simulator ----------------------------------------------------------

def per_job_knobs(rnd):
    """The knobs one job can have alone, with round rnd's class of each classed knob."""
    g = GARBAGE[rnd % len(GARBAGE)]
    g_want = ("completed" if g == "huge_padding" else
              ({"sna_failed"}, NO_DISK) if g == "huge" else
              (UNAVAILABLE | {"sna_failed"}, NO_DISK) if g == "control" else (UNAVAILABLE, NO_DISK))
    u = UNCOUNTED[rnd % len(UNCOUNTED)]
    s = GARBAGE[(rnd + 3) % len(GARBAGE)]
    lie = list(LIES)[rnd % len(LIES)]
    return [
        ("fail_disk", SLOW, {"fail_disk": 2000}, {"sna_failed"},
         "the SNA reports disk 2000 failed"),
        ("slow_bytes_per_s", SLOW, {"slow_bytes_per_s": 4 * MiB}, "completed", "a slow copy still completes"),
        ("complete_early", ONE, {"complete_early": True, "slow_bytes_per_s": MiB}, ({"sna_failed"}, NO_DISK),
         "completed reported before the bytes were written is the SNA's failure (§3.2)"),
        (f"progress_garbage-{g}", DISKS, {"progress_garbage": g}, g_want,
         f"every progress reply is {g} garbage"),
        (f"progress_garbage_n-{u}", SLOW, {"progress_garbage": u, "progress_garbage_n": 2,
                                           "slow_bytes_per_s": 4 * MiB}, "completed",
         "2 garbage replies (fewer than sna.max_attempts), then the truth"),
        (f"start_garbage-{s}", DISKS, {"start_garbage": s}, "completed",
         "a 200 decides the start; the body is informational"),
        (f"lie_complete-{lie}", SLOW, {"lie_complete": lie, "slow_bytes_per_s": 512 * 1024},
         (LIES[lie], NO_DISK), "a completion without the evidence"),
    ]


GLOBAL_KNOBS = [
    ("start_5xx", {"start_5xx": 2}, "completed", "two 503s, then accepted: retried"),
    ("start_4xx", {"start_4xx": True}, {"sna_rejected"}, "a 4xx is permanent"),
    ("hang_start_s", {"hang_start_s": 3}, {"sna_unavailable"},
     "every start held past sna.timeout_s: attempts exhausted"),
    ("forget_job", {"forget_job": True}, ({"sna_lost_job"}, NO_DISK),
     "sna.lost_after 404s in a row: the SNA lost the job"),
]


def proxy_jobs(vm_small, vm_one, vm_slow):
    """One job per proxy fault: (name, vm, job knobs, want, why)."""
    return [
        ("bh-start-once", vm_small, None, "completed", "one start black-holed, the retry accepted"),
        ("bh-start", vm_small, None, UNAVAILABLE, "every start black-holed"),
        ("bh-progress", vm_one, {"slow_bytes_per_s": MiB}, (UNAVAILABLE, NO_DISK),
         "every progress poll black-holed while the copy runs"),
        ("bh-cleanup", vm_slow, {"fail_disk": 2000}, {"sna_failed"},
         "disk 2000 failed; the cleanup call is black-holed"),
        ("reset-start-twice", vm_small, None, "completed", "two starts reset, the third accepted"),
        ("reset-start", vm_small, None, UNAVAILABLE, "every start reset"),
        ("reset-progress", vm_one, {"slow_bytes_per_s": MiB}, (UNAVAILABLE, NO_DISK),
         "every progress poll reset while the copy runs"),
    ]


def sna_rounds(ctx, trials, tag, knobs, proxied):
    """trials rounds. Each round, one batch of jobs at once: with knobs, one job per knob a job
    can have alone (per_job_knobs); with proxied, one job per proxy fault (proxy_jobs). Then,
    with knobs, the global knobs (GLOBAL_KNOBS, then die_mid_transfer) one job each. Every
    job and every global knob counts as a trial."""
    result = io_env.new_result()
    if trials == 0:
        result["notes"].append(f"{tag}: not run (0 trials)")
        return result
    sr = SnaRig(ctx, tag)
    rig, proxy = sr.rig, sr.proxy
    try:
        vm_small = rig.vm("small", DISKS, seed=3)
        vm_slow = rig.vm("slow", SLOW, seed=4)
        vm_one = rig.vm("one", ONE, seed=5)
        vms = {id(DISKS): vm_small, id(SLOW): vm_slow, id(ONE): vm_one}
        for rnd in range(trials):
            p = f"r{rnd}-"
            batch = []
            if knobs:
                batch += [(p + n, vms[id(d)], k, w, why) for n, d, k, w, why in per_job_knobs(rnd)]
            if proxied:
                batch += [(p + n, *rest) for n, *rest in proxy_jobs(vm_small, vm_one, vm_slow)]
            jid = {n: rig.msg(n, vm)["job_id"] for n, vm, *_ in batch}
            if proxied:
                proxy.rule("start", jid[p + "bh-start-once"], "blackhole", 1)
                proxy.rule("start", jid[p + "bh-start"], "blackhole")
                proxy.rule("cleanup", jid[p + "bh-cleanup"], "blackhole")
                proxy.rule("start", jid[p + "reset-start-twice"], "reset", 2)
                proxy.rule("start", jid[p + "reset-start"], "reset")

            def on_started(ids):
                # the progress faults once their job started (its start went through)
                pending = {p + "bh-progress": "blackhole", p + "reset-progress": "reset"} if proxied else {}
                end = time.time() + 30
                while pending and time.time() < end:
                    for n in list(pending):
                        if any(e.get("event") == "backup.started" for e in rig.events_of(ids[n])):
                            proxy.rule("progress", ids[n], pending.pop(n))
                    time.sleep(0.1)
                for n in pending:
                    result["failures"].append(f"{ids[n]}: never started: the progress fault did not test")
            ctx.log(f"{tag} round {rnd + 1}: {len(batch)} jobs at once")
            run_batch(sr, batch, result, on_started)
            result["trials"] += len(batch)
            if proxied:
                check_proxy_round(rig, proxy, p, jid, result)
                for kind in ("start", "progress", "cleanup"):
                    for j in jid.values():
                        proxy.rule(kind, j, None)
            if knobs:
                global_knobs(ctx, sr, tag, rnd, result, vm_small, vm_slow)
    except BaseException:
        sr.close_early()
        raise
    sr.finish(result)
    return result


def global_knobs(ctx, sr, tag, rnd, result, vm_small, vm_slow):
    """The knobs that act on every job of the simulator, one job each, in turn."""
    rig = sr.rig
    for name, knob, want, why in GLOBAL_KNOBS:
        ctx.log(f"{tag} round {rnd + 1}: {name}")
        rig.sim.post("/_sim/faults", knob)
        vm = vm_slow if name == "forget_job" else vm_small
        ids = run_batch(sr, [(f"r{rnd}-{name}", vm, None, want, why)], result)
        rig.sim.post("/_sim/faults", {})
        result["trials"] += 1
        jid = ids[f"r{rnd}-{name}"]
        starts = sim_starts(rig, jid)
        if name == "start_5xx" and [r.get("status") for r in starts] != [503, 503, 200]:
            result["failures"].append(f"{jid}: start statuses {[r.get('status') for r in starts]}, "
                                      "want [503, 503, 200] (the knob did not test)")
        if name == "start_4xx" and sim_cleanups(rig, jid):
            result["failures"].append(f"{jid}: the SNA was asked to clean up after a definite 4xx")
    # die_mid_transfer last: the simulator is restarted on the same state
    ctx.log(f"{tag} round {rnd + 1}: die_mid_transfer")
    rig.sim.post("/_sim/faults", {"die_mid_transfer": True})
    name = f"r{rnd}-die_mid_transfer"

    def restart(ids):
        # its records are read until it dies or the job started, whichever comes first: it
        # may die before the test reads them (seen: a reset on the read after backup.started)
        sr.saved = ([], [])
        end = time.time() + 30
        while time.time() < end:
            try:
                sr.save_sim_records()
            except (OSError, http.client.HTTPException, ValueError):
                break  # gone already, or died mid-answer (IncompleteRead): the last records read stay
            if any(e.get("event") == "backup.started" for e in rig.events_of(ids[name])):
                break
            time.sleep(0.2)
        code = sr.restart_sim()
        if code != 3:
            result["failures"].append(f"die_mid_transfer: the simulator exited {code}, want 3 (the knob did not test)")
    saved_before = sr.saved
    run_batch(sr, [(name, vm_slow, {"slow_bytes_per_s": 2 * MiB}, ({"sna_unavailable", "sna_lost_job"}, NO_DISK),
                    "the SNA died mid-transfer (restarted without its jobs)")], result, restart)
    sr.saved = (saved_before[0] + sr.saved[0], saved_before[1] + sr.saved[1])
    result["trials"] += 1


def run_sna_knobs(ctx, trials):
    """Every fault knob of the simulator (tests/sna/README.md), trials rounds."""
    return sna_rounds(ctx, trials, "knobs", knobs=True, proxied=False)


def run_sna_proxy(ctx, trials):
    """A proxy between the workers and the SNA: the start black-holed once (the retry completes)
    and every time (sna_unavailable; the SNA never got it), the progress black-holed while the
    copy runs (sna_unavailable, the SNA asked to clean up, partial images removed), the cleanup
    black-holed (a failed action in pending[]), the start reset twice (completes) and always
    (sna_unavailable), the progress reset (sna_unavailable); trials rounds."""
    return sna_rounds(ctx, trials, "proxy", knobs=False, proxied=True)


def run_sna_mix(ctx, trials):
    """--quick: the knobs and the proxy faults of the two scenarios above on one rig, the
    per-job ones all in one batch (one broker start instead of two)."""
    return sna_rounds(ctx, trials, "mix", knobs=True, proxied=True)


def check_proxy_round(rig, proxy, p, jid, result):
    """What the SNA saw and what the cleanup said, per fault (the proxy did test)."""
    def accepted(n):
        return [r for r in sim_starts(rig, jid[p + n]) if r.get("status") in (200, 202, 409)]
    for n, want_hits in (("bh-start-once", 1), ("reset-start-twice", 2)):
        a = proxy.count("start", jid[p + n], "blackhole" if n.startswith("bh") else "reset")
        if a != want_hits or len(accepted(n)) != 1:
            result["failures"].append(f"{jid[p + n]}: {a} start(s) faulted (want {want_hits}), "
                                      f"{len(accepted(n))} accepted by the SNA (want 1)")
    for n in ("bh-start", "reset-start"):
        if accepted(n):
            result["failures"].append(f"{jid[p + n]}: the SNA accepted a start that the proxy never relayed")
        if proxy.count("start", jid[p + n]) != 3:
            result["failures"].append(f"{jid[p + n]}: {proxy.count('start', jid[p + n])} start attempts, "
                                      "want sna.max_attempts = 3")
    for n in ("bh-progress", "reset-progress"):
        if not sim_cleanups(rig, jid[p + n]):
            result["failures"].append(f"{jid[p + n]}: the SNA (which had accepted the start) was never asked "
                                      "to clean up")
    j = jid[p + "bh-cleanup"]
    actions, pending = io_env.cleanup_actions(rig, j)
    sna = [a for a in actions if a.get("kind") == "sna_cleanup_requested"]
    if not sna or sna[0].get("result") != "failed" or not pending:
        result["failures"].append(f"{j}: a black-holed SNA cleanup must be a failed sna_cleanup_requested "
                                  f"listed in pending[]; got actions {sna}, pending {pending}")
    if proxy.count("cleanup", j, "blackhole") == 0:
        result["failures"].append(f"{j}: no cleanup call reached the proxy: the fault did not test")


SCENARIOS = [
    ("sna_mix", run_sna_mix, 1, 0),
    ("sna_knobs", run_sna_knobs, 0, 3),
    ("sna_proxy", run_sna_proxy, 0, 3),
]

if __name__ == "__main__":
    sys.exit(io_env.standalone(SCENARIOS, sys.argv))
