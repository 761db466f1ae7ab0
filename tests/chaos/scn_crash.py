#!/usr/bin/python3
"""scn_crash.py: kill -9 at every step boundary of the job state machine. A victim worker runs
with BW_CRASH_AT=<point> (worker/job.c, crash_point(): it SIGKILLs itself there) next to a
second worker of the same host that stays alive; the victim is restarted after each death (with
the next trial's point, then without one), and every job must end (adopted, compensated or
failed cleanly) with nothing lost, started twice, contradicted or leaked.

Usage: scn_crash.py BW_WORKER BW_CTL [--quick] [crash_points]
       (normally run by tests/chaos/chaos.py; exit codes as chaos.py's)

Every BW_CRASH_AT point (grep crash_point worker/*.c), what it needs, what the job becomes:
  claimed          job row + backup.accepted committed, delivery not acked   -> failed worker_lost
  waiting_ports    a job with more disks than the host's port range waits    -> failed worker_lost
  reserved         ports reserved                                            -> failed worker_lost
  creating:N       the N-th qcow2 created                                    -> failed worker_lost
  targets_created  every qcow2 created and recorded                          -> failed worker_lost
  spawned:N        the N-th qemu-nbd started                                 -> failed worker_lost
  serving          every qemu-nbd recorded, greetings awaited                -> failed worker_lost
  sna_requested    the SNA start request sent, no answer read                -> failed (either way)
  sna_accepted     the SNA accepted, backup.started not committed            -> completed (adopted)
  transferring     a progress answer read (SNA slowed to 8 MiB/s)            -> completed (adopted)
  finalizing:N     disk N's qemu-nbd asked to stop, still running            -> completed (adopted)
  checking:N       disk N's server exited, qemu-img check started            -> completed (adopted)
  disk_completed:N disk N's backup.disk.completed committed                  -> completed (adopted)
  failed           backup.failed committed (the SNA fails disk 2001)         -> failed sna_failed
  compensating     compensation waiting for its servers to stop (the same)   -> failed sna_failed
  forwarded        a job for a repository this host lacks published to its
                   per-repository queue, not confirmed, original unacked     -> ends on host-b
BW_CHAOS_POINTS=p1,p2 runs those points alone (a debugging aid).
Expected outcomes are checked for every job a crash hit, with one allowance: with an adopting
point, a job that never reached backup.started may fail worker_lost (the victim, restarted with
the point, can die on a job it adopted while preparing another).
N (a disk's position, 1-3) goes round the three disks with the trial number.
The full run: 20 trials of each point (320). --quick: 1 trial of each point (16), N from the
point's place in the list (creating:1, spawned:2, finalizing:3, checking:1, disk_completed:2).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chaos  # noqa: E402

MiB = chaos.MiB
KEYS = (2000, 2001, 2002)
SLOW = {"slow_bytes_per_s": 8 * MiB}
FAIL = {"fail_disk": 2001}
# point -> (indexed by disk?, per-job SNA knobs, expected outcome of a job the crash hit)
POINTS = {
    "claimed": (False, None, "failed"),
    "waiting_ports": (False, None, "failed"),
    "reserved": (False, None, "failed"),
    "creating": (True, None, "failed"),
    "targets_created": (False, None, "failed"),
    "spawned": (True, None, "failed"),
    "serving": (False, None, "failed"),
    "sna_requested": (False, None, None),
    "sna_accepted": (False, SLOW, "completed"),
    "transferring": (False, SLOW, "completed"),
    "finalizing": (True, None, "completed"),
    "checking": (True, None, "completed"),
    "disk_completed": (True, None, "completed"),
    "failed": (False, FAIL, "failed"),
    "compensating": (False, FAIL, "failed"),
    "forwarded": (False, None, None),
}
HOST_PORTS = 48           # host-a's port range: a job of 49 disks waits for ports
JOBS_PER_TRIAL = 4        # jobs published one by one until the victim dies
DEATH_WAIT_S = 20         # how long a job the victim took may take to reach the point
VICTIM, KEEPER = "host-a-1", "host-a-2"


def wait_trial(fl, a, job_id, timeout):
    """The victim's exit code once it died, "elsewhere" when another worker accepted job_id
    first, None after timeout."""
    end = time.time() + timeout
    p = a.workers[VICTIM]
    while time.time() < end:
        if p.poll() is not None:
            return p.returncode
        for e in fl.collector.events():
            if e.get("job_id") == job_id and e.get("event") == "backup.accepted":
                if (e.get("host"), e.get("worker_id")) != (a.name, VICTIM):
                    # the victim may still have taken a redelivery: give it a moment
                    time.sleep(0.3)
                    return p.poll() if p.poll() is not None else "elsewhere"
        time.sleep(0.05)
    return None


def specs(trials, quick):
    """[(point name, BW_CRASH_AT value)] in run order: each point `trials` times (--quick: once,
    indexed points on disk 1, 2, 3 in turn)."""
    out = []
    indexed_seen = 0
    only = [p for p in os.environ.get("BW_CHAOS_POINTS", "").split(",") if p]
    for p, (indexed, _, _) in POINTS.items():
        if only and p not in only:
            continue
        if quick:
            out.append((p, f"{p}:{indexed_seen % len(KEYS) + 1}" if indexed else p))
            indexed_seen += indexed
            continue
        for t in range(trials):
            out.append((p, f"{p}:{t % len(KEYS) + 1}" if indexed else p))
    return out


def run_crash_points(ctx, trials):
    res = chaos.result()
    rig = chaos.Rig(ctx, "crash", [
        {"repos": ("repo-001",), "workers": 2, "ports": HOST_PORTS},
        {"repos": ("repo-b",), "workers": 1, "ports": HOST_PORTS},  # started for "forwarded"
    ])
    try:
        fl = rig.fleet
        a, b = rig.host(0), rig.host(1)
        fl.make_vms(3, seed=5, min_disks=3, max_disks=3, min_mib=2, max_mib=4)
        big = [{"key": 2000 + k, "size_bytes": MiB} for k in range(HOST_PORTS + 1)]
        rig.start(a, KEEPER)
        run = specs(max(1, trials // len(POINTS)), ctx.quick)
        n = 0
        outcomes = {}                     # job_id -> expected outcome when the crash hit it
        per_point = {}
        b_started = False
        on_takeover = {}                  # spec -> trials whose death came on a taken-over job
        for idx, (point, spec) in enumerate(run):
            if point == "forwarded" and not b_started:
                rig.start(b, "host-b-1")
                chaos.wait_consumers(rig.broker.url, "backup.start.repo.repo-b", 1)
                b_started = True
            t0 = time.time()
            rig.start(a, VICTIM, {"BW_CRASH_AT": spec})
            want = 3 if b_started else 2
            victim = a.workers[VICTIM]
            end = time.time() + 30
            while victim.poll() is None and time.time() < end:
                if chaos.consumers(rig.broker.url, "backup.start") >= want:
                    break
                time.sleep(0.1)
            _, knobs, expect = POINTS[point]
            died, mine = False, []
            if victim.poll() == -9:
                # restarted with the point, it died there at once: on a job of an earlier
                # trial it had taken over (a crash all the same)
                rig.saw_death(a, VICTIM, f"BW_CRASH_AT={spec} while recovering")
                on_takeover[spec] = on_takeover.get(spec, 0) + 1
                died = True
            elif time.time() >= end:
                res["failures"].append(f"{spec}: the victim never consumed in 30 s")
            for _ in range(0 if died else JOBS_PER_TRIAL):
                n += 1
                msg = fl.message(n)
                if point == "waiting_ports":
                    msg["disks"] = big
                if point == "forwarded":
                    msg["repository_id"] = "repo-b"
                mine.append(rig.publish(n, knobs, msg))
                code = wait_trial(fl, a, mine[-1], DEATH_WAIT_S)
                if code == "elsewhere":
                    continue
                if code == -9:
                    rig.saw_death(a, VICTIM, f"BW_CRASH_AT={spec}")
                    rig.known_hit.add(mine[-1])
                    died = True
                elif code is not None:
                    res["failures"].append(f"{spec}: the victim exited {code}")
                break
            if not died:
                res["failures"].append(f"{spec}: the victim never reached its crash point in "
                                       f"{len(mine)} job(s)")
                rig.kill(a, VICTIM, "test")
            per_point.setdefault(point, []).append(time.time() - t0)
            last_of_point = idx + 1 == len(run) or run[idx + 1][0] != point
            if last_of_point:
                # the killed one restarted for good: it and the keeper end every job of the point
                rig.start(a, VICTIM)
                left = fl.wait_terminal(90)
                if left:
                    res["failures"].append(f"{point}: {len(left)} job(s) without a terminal "
                                           f"event: {sorted(left)[:4]}")
                for jid in rig.hit_jobs():
                    outcomes.setdefault(jid, (point, expect))
                if idx + 1 < len(run):
                    rig.stop_worker(a, VICTIM)
                ctx.log(f"{point}: {len(per_point[point])} trial(s), "
                        f"{sum(per_point[point]):.0f} s, {len(fl.published)} jobs so far")
        rig.finish(res, trials=len(run))
        terms = fl.terminal()
        why = {e["job_id"]: f"{e.get('reason')} in {e.get('stage')} by {e.get('worker_id')}: "
               f"{str(e.get('message'))[:200]}"
               for e in fl.collector.events() if e.get("event") == "backup.failed"}
        started = {e["job_id"] for e in fl.collector.events() if e.get("event") == "backup.started"}
        lost_worker = {e["job_id"] for e in fl.collector.events()
                       if e.get("event") == "backup.failed" and e.get("reason") == "worker_lost"}

        def excused(jid, want):
            # a victim restarted with an adopting point can die on the job it adopted while
            # another job of its is still being prepared: that one fails worker_lost, rightly
            return want == "completed" and jid not in started and jid in lost_worker
        wrong = [f"{jid} ({p}) ended {terms.get(jid)}, want {want} ({why.get(jid, '')})"
                 for jid, (p, want) in sorted(outcomes.items())
                 if want and terms.get(jid) != want and not excused(jid, want)]
        res["failures"] += [f"outcome: {w}" for w in wrong[:10]]
        res["notes"].append(f"points: {', '.join(sorted({p for p, _ in run}))}")
        if on_takeover:
            res["notes"].append(
                f"{sum(on_takeover.values())} trial(s) died at their point on a job taken over "
                "from the last incarnation, before consuming a new one: " +
                ", ".join(f"{k} x{v}" for k, v in sorted(on_takeover.items())))
    finally:
        rig.close()
    return res


SCENARIOS = [
    ("crash_points", run_crash_points, len(POINTS), 20 * len(POINTS)),
]

if __name__ == "__main__":
    sys.exit(chaos.standalone(SCENARIOS, "scn_crash"))
