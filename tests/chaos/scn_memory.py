#!/usr/bin/python3
"""scn_memory.py: a worker killed for memory at peak load, recovered like any crash.

Usage: scn_memory.py BW_WORKER BW_CTL [--quick] [memory_oom]
       (normally run by tests/chaos/chaos.py; exit codes as chaos.py's)

With a memory cgroup this process may make a child of (cgroup v1's memory hierarchy, or v2
with the memory controller already enabled for children of our cgroup: nothing above our own
cgroup is changed), the victim worker runs in a cgroup of its own, bw-chaos-<pid>, created
under our cgroup and removed at the end; its children (qemu-nbd, qemu-img) are moved back to
our cgroup as soon as they appear, so the worker is the one task the OOM killer can choose.
A burst of jobs puts many in flight (the SNA slowed down); at the peak the limit is set just
above what the cgroup uses and more jobs arrive, then lowered step by step until the kernel's
OOM killer ends the worker (memory.oom_control's oom_kill, or memory.events' oom_kill, counts
it). Without such a cgroup, or when the limit did not kill within KILL_WAIT_S, the worker is
SIGKILLed at the same peak instead, and the notes say which happened. Then the victim is
restarted; its jobs must all end (adopted or failed worker_lost), nothing lost, duplicated,
contradicted or leaked. One trial per run (trials > 1: repeated on the same rig).
"""
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chaos  # noqa: E402

MiB = chaos.MiB
VICTIM, KEEPER = "host-a-1", "host-a-2"
MAX_JOBS = 12              # per worker: room for the burst
BURST = 12                 # jobs published before the peak is measured
MORE = 8                   # jobs published once the limit is set
PEAK_WAIT_S = 30           # until the victim has PEAK_STARTED jobs transferring
PEAK_STARTED = 5
KILL_WAIT_S = 20           # how long the limit has to kill before SIGKILL stands in
HEADROOM = 256 * 1024      # the first limit: usage + this
STEP = 2 * MiB             # each later step: usage - this
SWEEP_S = 0.02             # how often the cgroup is swept of the worker's children


class MemCgroup:
    """A memory cgroup of our own under the cgroup this process is in (v1 or v2)."""

    def __init__(self):
        self.dir = self.parent = None
        self.v = 0
        path = None
        with open("/proc/self/cgroup") as f:
            rows = [l.rstrip("\n").split(":", 2) for l in f]
        for _, ctrls, p in rows:
            if "memory" in ctrls.split(","):
                base = "/sys/fs/cgroup/memory"
                if os.path.isdir(base):
                    self.v, path = 1, base + p
        if not self.v:
            for hid, ctrls, p in rows:
                if hid == "0" and ctrls == "":
                    for base in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                        sub = os.path.join(base + p, "cgroup.subtree_control")
                        try:
                            if "memory" in open(sub).read().split():
                                self.v, path = 2, base + p
                                break
                        except OSError:
                            continue
        if not self.v:
            raise OSError("no memory cgroup controller this process may use")
        self.parent = path
        d = os.path.join(path, f"bw-chaos-{os.getpid()}")
        os.mkdir(d)
        self.dir = d
        self.limit_file = "memory.limit_in_bytes" if self.v == 1 else "memory.max"
        self.usage_file = "memory.usage_in_bytes" if self.v == 1 else "memory.current"

    def read(self, name):
        with open(os.path.join(self.dir, name)) as f:
            return f.read()

    def usage(self):
        return int(self.read(self.usage_file))

    def set_limit(self, n):
        """Sets the limit (n None: no limit), and v1's memory+swap limit to the same, so that no
        swap stands in (memory <= memory+swap at every step: lowered memory first, raised
        memory+swap first)."""
        files = [self.limit_file]
        if self.v == 1 and os.path.exists(os.path.join(self.dir, "memory.memsw.limit_in_bytes")):
            files.append("memory.memsw.limit_in_bytes")
        value = str(n) if n is not None else ("-1" if self.v == 1 else "max")
        if n is None or n > int(self.read(self.limit_file).strip().replace("max", str(1 << 62))):
            files.reverse()
        for i, name in enumerate(files):
            try:
                with open(os.path.join(self.dir, name), "w") as f:
                    f.write(value)
            except OSError:
                if i == 0 or name == self.limit_file:
                    raise

    def oom_kills(self):
        name = "memory.oom_control" if self.v == 1 else "memory.events"
        for line in self.read(name).splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                return int(v)
        return 0

    def pids(self):
        try:
            return [int(x) for x in self.read("cgroup.procs").split()]
        except OSError:
            return []

    def move_out(self, pid):
        try:
            with open(os.path.join(self.parent, "cgroup.procs"), "w") as f:
                f.write(str(pid))
        except OSError:
            pass

    def enter_hook(self):
        """A preexec_fn: the child joins the cgroup before it execs."""
        procs = os.path.join(self.dir, "cgroup.procs")

        def hook():
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        return hook

    def remove(self):
        if self.dir is None:
            return
        for _ in range(50):
            for pid in self.pids():
                self.move_out(pid)
            try:
                os.rmdir(self.dir)
                self.dir = None
                return
            except OSError:
                time.sleep(0.1)
        raise OSError(f"cannot remove {self.dir}")


def sweeper(cg, keep_pid, stop):
    """Moves every task but keep_pid out of cg until stop is set."""
    while not stop.is_set():
        keep = keep_pid()
        # 0: a victim is starting (it joined before its exec, Popen has not returned its pid)
        for pid in cg.pids() if keep else []:
            if pid != keep:
                cg.move_out(pid)
        stop.wait(SWEEP_S)


def started_by(fl, wid):
    return {e["job_id"] for e in fl.collector.events()
            if e.get("event") == "backup.started" and e.get("worker_id") == wid}


def run_memory_oom(ctx, trials):
    res = chaos.result()
    cg = None
    why_no_cgroup = ""
    try:
        cg = MemCgroup()
        ctx.log(f"memory cgroup v{cg.v}: {cg.dir}")
    except OSError as e:
        why_no_cgroup = str(e)
        ctx.log(f"no memory cgroup ({e}): SIGKILL at peak load instead")
    rig = None
    stop = threading.Event()
    victim_pid = [0]
    sweep = None
    try:
        rig = chaos.Rig(ctx, "memory", [{"workers": 2, "max_jobs": MAX_JOBS, "ports": 100}],
                        conf={"sna.poll_interval_s": 1})
        fl, h = rig.fleet, rig.host()
        fl.make_vms(6, seed=11, min_disks=2, max_disks=3, min_mib=4, max_mib=8)
        rig.start(h, KEEPER)
        if cg is not None:
            sweep = threading.Thread(target=sweeper, args=(cg, lambda: victim_pid[0], stop),
                                     daemon=True)
            sweep.start()
        n = 0
        for t in range(trials):
            if t:
                rig.stop_worker(h, VICTIM)  # the last trial's restart, stopped to go in again
            if cg is not None:
                cg.set_limit(None)  # the last trial's limit goes
            victim_pid[0] = 0
            p = rig.start(h, VICTIM, preexec=cg.enter_hook() if cg else None)
            victim_pid[0] = p.pid
            if cg is not None and p.pid not in cg.pids():
                res["failures"].append(f"trial {t + 1}: the victim is not in {cg.dir}")
            chaos.wait_consumers(rig.broker.url, "backup.start", 2)
            slow = {"slow_bytes_per_s": MiB}
            for _ in range(BURST):
                n += 1
                rig.publish(n, slow)
            end = time.time() + PEAK_WAIT_S
            while time.time() < end and len(started_by(fl, VICTIM)) < PEAK_STARTED * (t + 1):
                time.sleep(0.2)
            in_flight = len(started_by(fl, VICTIM)) - len(
                {j for j in started_by(fl, VICTIM) if j in fl.terminal()})
            how = "SIGKILL at peak load"
            if cg is not None:
                how = oom_kill(ctx, rig, cg, p, lambda: n, res, slow)
                n = res.pop("_n", n)
            if p.poll() is None:
                rig.kill(h, VICTIM, how)
            else:
                rig.saw_death(h, VICTIM, how)
            res["notes"].append(f"trial {t + 1}: victim {how} (exit {p.returncode}) with "
                                f"{in_flight} job(s) of its own transferring")
            if cg is None:
                res["notes"].append(f"no cgroup: {why_no_cgroup}")
            rig.start(h, VICTIM)  # restarted, outside the cgroup
        rig.finish(res, trials=trials, timeout=150)
    finally:
        stop.set()
        if sweep is not None:
            sweep.join(2)
        if rig is not None:
            rig.close()
        if cg is not None:
            try:
                cg.remove()
            except OSError as e:
                res["failures"].append(str(e))
    return res


def oom_kill(ctx, rig, cg, p, count, res, slow):
    """Sets the limit just above the peak, publishes MORE jobs, then steps the limit down
    until the OOM killer ends p; returns how p died (or 'SIGKILL ...' when it did not)."""
    n = count()
    before = cg.oom_kills()
    usage = cg.usage()
    rss = chaos.proc_rss_kib(p.pid) / 1024
    ctx.log(f"peak: cgroup usage {usage / MiB:.1f} MiB, victim RSS {rss:.1f} MiB")
    limit = usage + HEADROOM
    try:
        cg.set_limit(limit)
    except OSError as e:
        res["notes"].append(f"setting the limit: {e}")
    for _ in range(MORE):
        n += 1
        rig.publish(n, slow)
    res["_n"] = n
    end = time.time() + KILL_WAIT_S
    while time.time() < end and p.poll() is None:
        try:
            p.wait(2)
            break
        except Exception:  # noqa: BLE001 - TimeoutExpired: step down
            pass
        limit = max(cg.usage() - STEP, 4 * MiB)
        try:
            cg.set_limit(limit)
        except OSError:
            pass
    kills = cg.oom_kills() - before
    if p.poll() == -signal.SIGKILL and kills > 0:
        return (f"killed by the cgroup OOM killer (oom_kill +{kills}, limit {limit / MiB:.1f} "
                f"MiB, peak usage {usage / MiB:.1f} MiB, RSS {rss:.1f} MiB)")
    if p.poll() is not None:
        return f"died with exit {p.returncode} under the limit (oom_kill +{kills})"
    return f"SIGKILL at peak load (the limit did not kill within {KILL_WAIT_S} s)"


SCENARIOS = [
    ("memory_oom", run_memory_oom, 1, 3),
]

if __name__ == "__main__":
    sys.exit(chaos.standalone(SCENARIOS, "scn_memory"))
