#!/usr/bin/python3
"""bench_fp.py: the worker's memory (PSS) idle and loaded, and 100 concurrent disks on one host.

Usage: bench_fp.py BW_WORKER BW_CTL [--max-jobs N] [--disks N] [--keep]
(normally through scripts/bench-footprint, which builds a Release bw-worker first).

A private broker (scripts/broker), the SNA simulator (tests/sna/sna_sim.py) and ONE bw-worker
(worker.max_jobs N, default 16), set up as scripts/bench-e2e does (tests/bench/bench_e2e.py's
Bench class). The simulator holds every transfer (its slow_bytes_per_s knob: 16 KiB/s on
8 MiB disks, so no disk ends while we measure); the knob is cleared afterwards and every job
must then complete. PSS is read from /proc/PID/smaps_rollup (proportional set size: shared
pages divided among their users), the median of 5 samples 200 ms apart.

  idle       the worker consuming, no job: PSS, RSS, Private (goal: PSS <= 8 MiB; the peer is
             the issue's 52.6 MiB of a Celery worker doing the same task, not measured here)
  in flight  N jobs of 2 disks each, every one transferring (the simulator got every start
             request and reports every disk running): the worker's PSS; the qemu-nbd servers'
  100 disks  --disks D (default 100) disks in jobs of 10 disks, all at once: every one served
             (each server greets on its port and the simulator reports each disk running),
             the total PSS of the worker and every qemu-nbd, and the worker's share of it
  idle after every job completed: the worker's PSS again (what the load left behind)

Ports: the worker's NBD range BW_BENCH_PORT..+199 (default 29200), the simulator a free port
in BW_BENCH_PORT+292..+299; the broker a free port in 12100-12999 (+20000, +21000). Ends
with SUMMARY<TAB>figure<TAB>ours<TAB>limit or peer<TAB>ratio<TAB>goal<TAB>met lines. Exit 0
when every job completed, every disk was served, no port stayed reserved and nothing was
left running (whether or not the goal is met); 1 otherwise.
"""
import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
PORT0 = int(os.environ.get("BW_BENCH_PORT") or 29200)
os.environ["BW_BENCH_PORT"] = str(PORT0)  # bench_e2e reads it when imported
import bench_e2e  # noqa: E402
from bench_e2e import MiB, Stop, on_signal  # noqa: E402

bench_e2e.WORKER_PORT_MIN, bench_e2e.WORKER_PORT_MAX = PORT0, PORT0 + 199
GOAL_IDLE_MIB = 8.0
CELERY_MIB = 52.6  # the figure for a Celery worker doing the same task (not measured here)
DISK_BYTES = 8 * MiB
HOLD_BYTES_PER_S = 16384  # 8 MiB at 16 KiB/s: 512 s per disk, longer than we measure
PER_JOB_BIG = 10


def log(msg):
    print(f"bench-footprint: {msg}", file=sys.stderr, flush=True)


def rollup(pid):
    """(Pss, Rss, Private) in KiB from /proc/PID/smaps_rollup."""
    v = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                v[parts[0][:-1]] = int(parts[1])
    return v.get("Pss", 0), v.get("Rss", 0), v.get("Private_Clean", 0) + v.get("Private_Dirty", 0)


def sampled(pid, n=5, gap=0.2):
    """The median of n rollup samples gap seconds apart."""
    got = []
    for i in range(n):
        got.append(rollup(pid))
        if i + 1 < n:
            time.sleep(gap)
    return tuple(statistics.median(x[j] for x in got) for j in range(3))


class Footprint(bench_e2e.Bench):
    def start_workers(self, max_jobs):
        """One worker (Bench starts two), set up as Bench does."""
        for d in ("repo", "state", "creds"):
            os.makedirs(os.path.join(self.tmp, d), exist_ok=True)
        cred = os.path.join(self.tmp, "creds", "vcenter-main.json")
        with open(cred, "w") as f:
            bench_e2e.json.dump({"vcenter_host": "vcenter.example", "username": "backup@vsphere.local",
                                 "password": "bench"}, f)
        os.chmod(cred, 0o600)
        cfg = self.write_config("bench-fp", max_jobs)
        out = open(os.path.join(self.tmp, "bench-fp.log"), "a")
        self.workers["bench-fp"] = subprocess.Popen([self.a.worker, "--config", cfg], stdout=out,
                                                    stderr=out, start_new_session=True)
        self.worker_pid = self.workers["bench-fp"].pid
        self.ctl_config = self.write_config("bench-ctl", max_jobs)

    def wait_consumer(self):
        for _ in range(600):
            n = self.ch.queue_declare("backup.start", passive=True).method.consumer_count
            if n == 1:
                return
            time.sleep(0.05)
        raise RuntimeError("the worker never consumed backup.start")

    def vm(self, name, keys):
        self.sim_post("/_sim/vm", {"vm_path": f"/bench/vm/{name}", "seed": len(keys),
                                   "disks": {str(k): {"size": DISK_BYTES} for k in keys}})

    def publish_jobs(self, prefix, n_jobs, per_job):
        keys = [2000 + i for i in range(per_job)]
        self.vm(prefix, keys)
        ids = []
        for i in range(n_jobs):
            job_id = f"bench-fp-{prefix}-{i:03d}"
            self.publish({"schema_version": 1, "job_id": job_id,
                          "vm": {"name": prefix, "path": f"/bench/vm/{prefix}"}, "backup_type": "full",
                          "repository_id": "repo-001", "credential_id": "vcenter-main",
                          "disks": [{"key": k, "size_bytes": DISK_BYTES} for k in keys]})
            ids.append(job_id)
        return ids

    def wait_running(self, ids, disks, timeout=300):
        """Until the simulator reports every disk of every job running (transfer under way)."""
        end = time.monotonic() + timeout
        running = 0
        while time.monotonic() < end:
            want = set(ids)
            running = sum(1 for j in self.sim_get("/_sim/jobs")["jobs"] if j["job_id"] in want
                          for d in j["disks"] if d["status"] == "running")
            if running >= disks:
                return running
            ended = [j for j in ids if j in self.terminal]
            if ended:
                raise RuntimeError(f"{len(ended)} job(s) ended while held: {ended[:3]} {self.terminal[ended[0]]}")
            self.conn.process_data_events(time_limit=0.2)
        raise RuntimeError(f"only {running} of {disks} disks running after {timeout} s")

    def servers(self):
        """Our qemu-nbd pids and the ports they were told to serve."""
        out = {}
        for pid in self.our_qemu_nbds():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    args = f.read().decode().split("\0")
            except OSError:
                continue
            for a in args:
                if a.startswith("--port="):
                    out[pid] = int(a.split("=", 1)[1])
        return out

    def release(self, ids):
        self.sim_post("/_sim/faults", {"slow_bytes_per_s": 0})
        if not self.wait_terminal(ids, 600):
            raise RuntimeError(f"{sum(1 for j in ids if j in self.terminal)} of {len(ids)} jobs ended in 600 s")
        bad = [j for j in ids if self.terminal[j][0] != "backup.completed"]
        if bad:
            self.failures.append(f"{len(bad)} job(s) not completed: {bad[:3]}")

    def run(self):
        a = self.a
        t0 = time.monotonic()
        log(f"in {self.tmp}; {os.cpu_count()} CPU(s); load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        self.start_broker()
        self.start_sim()
        self.start_workers(a.max_jobs)
        self.connect()
        self.wait_consumer()
        time.sleep(2)  # past the start-up's first recovery pass and relay round
        idle = sampled(self.worker_pid)
        log(f"idle: PSS {idle[0] / 1024:.1f} MiB")

        self.sim_post("/_sim/faults", {"slow_bytes_per_s": HOLD_BYTES_PER_S})
        ids = self.publish_jobs("flight", a.max_jobs, 2)
        self.wait_running(ids, 2 * a.max_jobs)
        flight = sampled(self.worker_pid)
        srv = self.servers()
        flight_nbd = sum(rollup(p)[0] for p in srv)
        log(f"{a.max_jobs} jobs in flight: worker PSS {flight[0] / 1024:.1f} MiB, {len(srv)} qemu-nbd")
        self.release(ids)

        n_jobs = (a.disks + PER_JOB_BIG - 1) // PER_JOB_BIG
        if n_jobs > a.max_jobs:
            raise RuntimeError(f"--disks {a.disks} needs {n_jobs} jobs of {PER_JOB_BIG}: raise --max-jobs")
        self.sim_post("/_sim/faults", {"slow_bytes_per_s": HOLD_BYTES_PER_S})
        big = self.publish_jobs("many", n_jobs, PER_JOB_BIG)
        self.wait_running(big, n_jobs * PER_JOB_BIG)
        srv = self.servers()
        greeting = sum(1 for port in srv.values() if self.greets(port))
        w = sampled(self.worker_pid)
        nbd = [rollup(p) for p in srv]
        total_pss = w[0] + sum(x[0] for x in nbd)
        log(f"{len(srv)} servers, {greeting} greet; total PSS {total_pss / 1024:.1f} MiB")
        if len(srv) != n_jobs * PER_JOB_BIG or greeting != len(srv):
            self.failures.append(f"{n_jobs * PER_JOB_BIG} disks: {len(srv)} servers, {greeting} greeted")
        self.release(big)
        time.sleep(2)
        after = sampled(self.worker_pid)
        ports = bench_e2e.json.loads(subprocess.run([a.ctl, "--config", self.ctl_config, "ports", "--json"],
                                                    capture_output=True, text=True).stdout or "[]")
        held = [p for p in ports if p.get("state") == "reserved"]
        if held:
            self.failures.append(f"{len(held)} NBD port(s) still reserved: {held[:3]}")

        mib = lambda k: k / 1024  # noqa: E731
        disks = n_jobs * PER_JOB_BIG
        print(f"Footprint of one bw-worker (Release build), worker.max_jobs {a.max_jobs}; PSS from "
              f"smaps_rollup, median of 5 samples; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"{'state':<34}  {'PSS MiB':>8}  {'RSS MiB':>8}  {'Private MiB':>11}")
        for name, v in ((f"idle", idle), (f"{a.max_jobs} jobs x 2 disks in flight", flight),
                        (f"{n_jobs} jobs x {PER_JOB_BIG} disks in flight", w), ("idle after the jobs", after)):
            print(f"{name:<34}  {mib(v[0]):8.1f}  {mib(v[1]):8.1f}  {mib(v[2]):11.1f}")
        print(f"{a.max_jobs} jobs x 2 disks: the {2 * a.max_jobs} qemu-nbd together: PSS {mib(flight_nbd):.1f} MiB")
        share = w[0] / total_pss if total_pss else float("nan")
        print(f"{disks} concurrent disks: {len(srv)} qemu-nbd, {greeting} greeting, the simulator reporting every "
              f"disk running; total PSS {mib(total_pss):.1f} MiB (worker {mib(w[0]):.1f} + qemu-nbd "
              f"{mib(total_pss - w[0]):.1f}, {mib(total_pss - w[0]) / max(1, len(srv)):.2f} per server); "
              f"bw's share {share * 100:.1f} %")
        met = "yes" if mib(idle[0]) <= GOAL_IDLE_MIB else "no"
        print(f"goal (idle PSS <= {GOAL_IDLE_MIB:g} MiB, a sixth of a Celery worker's {CELERY_MIB} MiB): "
              f"{'met' if met == 'yes' else 'NOT met'}")
        print(f"(total {time.monotonic() - t0:.0f} s)")
        print(f"SUMMARY\tfootprint: worker PSS MiB idle (peer: Celery worker, the issue's figure)\t"
              f"{mib(idle[0]):.1f}\t{CELERY_MIB}\t{mib(idle[0]) / CELERY_MIB:.2f}\t<= {GOAL_IDLE_MIB:g} MiB\t{met}")
        print(f"SUMMARY\tfootprint: worker PSS MiB, {a.max_jobs} jobs x 2 disks in flight (peer: idle)\t"
              f"{mib(flight[0]):.1f}\t{mib(idle[0]):.1f}\t{flight[0] / idle[0]:.2f}\t-\t-")
        print(f"SUMMARY\tfootprint: {disks} disks served: total PSS MiB (bw's share {share * 100:.1f} %)\t"
              f"{mib(total_pss):.1f}\t-\t-\t-\t{'yes' if greeting == disks == len(srv) else 'no'}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("worker")
    ap.add_argument("ctl")
    ap.add_argument("--max-jobs", type=int, default=16, help="worker.max_jobs [16]")
    ap.add_argument("--disks", type=int, default=100, help="concurrent disks of the host case [100]")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()
    if a.max_jobs < 1 or a.disks < PER_JOB_BIG:
        ap.error(f"--max-jobs >= 1, --disks >= {PER_JOB_BIG}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    b = Footprint(a)
    try:
        b.run()
    except (Stop, Exception) as e:
        b.failures.append(f"{type(e).__name__}: {e}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        b.close()
    for f in b.failures:
        print(f"bench-footprint: FAILED: {f}", file=sys.stderr)
    return 1 if b.failures else 0


if __name__ == "__main__":
    sys.exit(main())
