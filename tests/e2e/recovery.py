#!/usr/bin/python3
"""recovery.py: crash recovery and rolling restarts with the real broker, real qemu-nbd, the SNA
simulator and several bw-worker processes. A victim worker SIGKILLs itself at a step boundary
(BW_CRASH_AT, see worker/job.c) while a keeper worker runs its recovery pass every second.
Usage: recovery.py BW_WORKER BW_CTL [CASE...]   (env BW_RECOVERY_ROUNDS: runs per crash point)"""
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pika

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
from e2e import MiB, check_events, images, leftovers, vm_message  # noqa: E402

ROUNDS = int(os.environ.get("BW_RECOVERY_ROUNDS", "2"))
# not e2e.py's ports (ctest may run both at once), and room for 4 jobs of 3 disks even when
# a few ports sit in quarantine after a crash case (a port taken when a server started)
e2e.PORT_MIN, e2e.PORT_MAX = 22320, 22359
VM = "/DC/vm/r"
KEYS = (2000, 2001, 16000)
DISKS = [{"key": k, "size_bytes": 4 * MiB} for k in KEYS]

# point -> what the job must end as once the keeper took it over
PREPARING = ["claimed", "reserved", "creating:1", "creating:3", "targets_created",
             "spawned:1", "spawned:3", "serving", "sna_requested"]
ADOPTED = ["sna_accepted", "transferring", "finalizing:1", "checking:2", "disk_completed:1",
           "disk_completed:3"]
COMPENSATING = ["failed", "compensating"]


class Recovery(e2e.Env):
    def start(self, wid, env=None, keeper=False, interval=1):
        """A worker; a keeper consumes a queue nobody publishes to (it only recovers)."""
        cfg = self.config(wid)
        args = [self.worker, "--config", cfg, "--set", f"worker.recovery_interval_s={interval}",
                "--set", "worker.shutdown_grace_s=20"]
        if keeper:
            args += ["--set", "amqp.queue=keeper.idle", "--set", "amqp.jobs_exchange=keeper.jobs",
                     "--set", "amqp.dlx=keeper.dlx", "--set", "amqp.dlq=keeper.dlq"]
        log = open(os.path.join(self.tmp, f"{wid}.log"), "a")
        p = subprocess.Popen(args, stdout=log, stderr=log, env={**os.environ, **(env or {})})
        self.workers[wid] = p
        return p

    def consumers(self):
        ch = self.conn.channel()
        n = ch.queue_declare("backup.start", passive=True).method.consumer_count
        ch.close()
        return n

    def wait_consumer(self, n=1):
        for _ in range(300):
            try:
                if self.consumers() >= n:
                    return
            except pika.exceptions.ChannelClosedByBroker:
                pass
            time.sleep(0.05)
        raise AssertionError("no consumer on backup.start")

    def stop(self, wid, sig=signal.SIGTERM, timeout=60):
        p = self.workers.pop(wid)
        if p.poll() is None:
            p.send_signal(sig)
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            return "killed"

    def ledger(self):
        return sqlite3.connect(os.path.join(self.state, "ledger.db"), timeout=10)

    def starts(self, job_id):
        return [r for r in self.sim_get("/_sim/requests")["requests"]
                if r["path"].endswith("/backup/start") and r["body"].get("job_id") == job_id]


def wait_started(env, jobs, failures, timeout=60):
    """Until every job's backup.started arrived; a failure when one did not in time."""
    end = time.time() + timeout
    while time.time() < end:
        env.drain_events(0.2)
        late = [j for j in jobs
                if not any(e["event"] == "backup.started" for e in env.job_events(j))]
        if not late:
            return
    failures.append(f"no backup.started within {timeout} s for {late}")


def nbd_pids(env, job_id):
    out = subprocess.run(["pgrep", "-f", "--", f"--export-name={job_id}-"], capture_output=True,
                         text=True).stdout
    return [int(x) for x in out.split()]


def check_job(env, job_id, want, failures, reason=None, adopter=None):
    """One logical terminal event of the wanted kind, valid events, identical images, nothing
    left behind."""
    got = env.wait_terminal(job_id, timeout=90, cleanup=(want == "failed"))
    evs = check_events(env, job_id, failures)
    terminal = {e["event_id"] for e in evs if e["event"] in ("backup.completed", "backup.failed")}
    if got != want or len(terminal) != 1:
        failures.append(f"{job_id}: ended {got} with {sorted(terminal)}, want one {want}")
    failed = [e for e in evs if e["event"] == "backup.failed"]
    if isinstance(reason, str):
        reason = (reason,)
    if reason and (not failed or failed[0]["reason"] not in reason):
        failures.append(f"{job_id}: reason {failed[0]['reason'] if failed else None}, want {reason}")
    if want == "failed" and len([e for e in evs if e["event"] == "backup.cleanup"]) != 1:
        failures.append(f"{job_id}: want one backup.cleanup, got {[e['event'] for e in evs]}")
    if len(env.starts(job_id)) > 1:
        failures.append(f"{job_id}: {len(env.starts(job_id))} SNA start requests")
    if adopter and evs and evs[-1]["worker_id"] != adopter:
        failures.append(f"{job_id}: last event by {evs[-1]['worker_id']}, want {adopter}")
    kept = set()
    if want == "completed":
        done = {e["key"]: e for e in evs if e["event"] == "backup.disk.completed"}
        kept = e2e.compare_images(env, job_id, evs, failures)
        if sorted(done) != sorted(KEYS):
            failures.append(f"{job_id}: disks completed {sorted(done)}")
    else:
        kept = {e["qcow2_path"] for e in evs if e["event"] == "backup.disk.completed"}
    stray = [f for f in images(env) if f"/{job_id}.qcow2" in f and f not in kept]
    if stray:
        failures.append(f"{job_id}: stray files {stray}")
    if nbd_pids(env, job_id):
        failures.append(f"{job_id}: qemu-nbd left: {nbd_pids(env, job_id)}")
    failures += [f"{job_id}: {x}" for x in leftovers(env)]
    return evs


def crash(env, point, job_id, failures, knobs=None):
    """The victim claims job_id and dies at point; the keeper must end the job."""
    env.sim_post("/_sim/faults", knobs or {})
    victim = env.start("victim", {"BW_CRASH_AT": point})
    env.wait_consumer()
    disks = DISKS
    if point == "waiting_ports":  # more disks than the port range has: it waits for ever
        disks = [{"key": 2000 + i, "size_bytes": MiB} for i in range(e2e.PORT_MAX - e2e.PORT_MIN + 2)]
    env.publish(vm_message(job_id, VM, disks))
    try:
        code = victim.wait(60)
    except subprocess.TimeoutExpired:
        code = None
    env.workers.pop("victim")
    if code != -signal.SIGKILL:
        if code is None:
            victim.kill()
            victim.wait()
        failures.append(f"{job_id}: the victim did not die at {point} (exit {code})")
    env.sim_post("/_sim/faults", {})


def case_crash_points(env, failures):
    env.start("keeper", keeper=True)
    n = 0
    for rnd in range(ROUNDS):
        for point in PREPARING + ["waiting_ports"] + ADOPTED + COMPENSATING:
            n += 1
            job_id = f"rc-{n}-{point.replace(':', '-').replace('_', '-')}"
            t0 = time.time()
            f = []
            if point in COMPENSATING:
                crash(env, point, job_id, f, {"fail_disk": 2001})
            elif point in ADOPTED:
                crash(env, point, job_id, f, {"slow_bytes_per_s": 8 * MiB})
            else:
                crash(env, point, job_id, f)
            if point in ADOPTED:
                check_job(env, job_id, "completed", f, adopter="keeper")
            elif point in COMPENSATING:
                check_job(env, job_id, "failed", f, reason="sna_failed")
            else:
                check_job(env, job_id, "failed", f, reason="worker_lost", adopter="keeper")
            print(f"     {point:18} {'ok' if not f else 'FAIL'} ({time.time() - t0:.1f} s)",
                  flush=True)
            failures += f
    # deliveries the victim never acked come back to the next consumer: known, not re-run
    env.start("victim")
    env.wait_consumer()
    time.sleep(2)
    env.stop("victim")
    env.stop("keeper")
    depth = env.conn.channel().queue_declare("backup.start", passive=True).method.message_count
    if depth:
        failures.append(f"{depth} message(s) left in backup.start")


def case_rolling_restart(env, failures):
    """4 jobs transferring; their worker gets SIGTERM and is started again: all 4 complete."""
    env.sim_post("/_sim/faults", {"slow_bytes_per_s": 256 * 1024})  # still running at the restart
    env.start("roller")
    env.wait_consumer()
    jobs = [f"roll-{i}" for i in range(4)]
    for j in jobs:
        env.publish(vm_message(j, VM, DISKS))
    wait_started(env, jobs, failures)
    t0 = time.time()
    code = env.stop("roller")
    if code != 0:
        failures.append(f"rolling: SIGTERM exit {code}")
    if time.time() - t0 > 10:
        failures.append(f"rolling: the handover took {time.time() - t0:.1f} s")
    alive = [j for j in jobs if nbd_pids(env, j)]
    if len(alive) != 4:
        failures.append(f"rolling: servers kept serving for {alive}, want all 4")
    env.start("roller")
    env.sim_post("/_sim/faults", {})
    for j in jobs:  # all of them ended before anything is counted as left behind
        env.wait_terminal(j, timeout=90)
    for j in jobs:
        check_job(env, j, "completed", failures, adopter="roller")
        if len(env.starts(j)) != 1:
            failures.append(f"rolling: {j}: {len(env.starts(j))} start requests")
    env.stop("roller")


def case_two_reapers(env, failures):
    """Two workers run their recovery pass at the same moment over the same dead worker."""
    env.sim_post("/_sim/faults", {"slow_bytes_per_s": 256 * 1024})
    victim = env.start("victim2")
    env.wait_consumer()
    jobs = [f"twin-{i}" for i in range(2)]
    for j in jobs:
        env.publish(vm_message(j, VM, DISKS))
    wait_started(env, jobs, failures)
    victim.kill()
    victim.wait()
    env.workers.pop("victim2")
    env.start("reaper-a", keeper=True, interval=3600)
    env.start("reaper-b", keeper=True, interval=3600)
    env.sim_post("/_sim/faults", {})
    for j in jobs:
        env.wait_terminal(j, timeout=90)
    for j in jobs:
        evs = check_job(env, j, "completed", failures)
        owners = {e["worker_id"] for e in evs} - {"victim2"}
        if len(owners) != 1 or owners - {"reaper-a", "reaper-b"}:
            failures.append(f"two reapers: {j} events by {owners}, want one reaper")
    taken = 0
    for wid in ("reaper-a", "reaper-b"):
        taken += open(os.path.join(env.tmp, f"{wid}.log")).read().count("taken over from dead")
    if taken != len(jobs):
        failures.append(f"two reapers: {taken} takeovers for {len(jobs)} jobs")
    env.stop("reaper-a")
    env.stop("reaper-b")


def dead_victim_with_servers(env, job_id):
    """A worker SIGKILLed during the transfer of job_id: its servers still serve."""
    env.sim_post("/_sim/faults", {"slow_bytes_per_s": 512 * 1024})
    victim = env.start("victim3", {"BW_CRASH_AT": "transferring"})
    env.wait_consumer()
    env.publish(vm_message(job_id, VM, DISKS))
    victim.wait(60)
    env.workers.pop("victim3")
    return nbd_pids(env, job_id)


def case_adopt_patience(env, failures):
    """The SNA answers 404 once when the adopter first asks: it asks again, adopts, completes."""
    job_id = "patience-1"
    dead_victim_with_servers(env, job_id)
    env.sim_post("/_sim/faults", {"forget_job": True, "slow_bytes_per_s": 512 * 1024})
    env.start("keeper", keeper=True)
    log = os.path.join(env.tmp, "keeper.log")
    end = time.time() + 30
    while time.time() < end and f"job={job_id} taken over" not in open(log).read():
        time.sleep(0.05)
    time.sleep(0.5)  # the first question was answered 404; sna.lost_after is 3
    env.sim_post("/_sim/faults", {})
    check_job(env, job_id, "completed", failures, adopter="keeper")
    env.stop("keeper")


def case_pid_reuse(env, failures):
    """A recorded pid that now names another process is never signalled."""
    job_id = "reuse-1"
    servers = dead_victim_with_servers(env, job_id)
    for pid in servers:
        os.kill(pid, signal.SIGKILL)
    others = [subprocess.Popen(["sleep", "300"]) for _ in KEYS]
    with env.ledger() as db:  # the pids come back as other processes (other start times)
        for key, p in zip(KEYS, others):
            db.execute("UPDATE job_disks SET nbd_pid = ?, nbd_start_time = 1 WHERE job_id = ?"
                       " AND disk_key = ?", (p.pid, job_id, key))
    env.sim_post("/_sim/faults", {})
    env.start("keeper", keeper=True)
    # its servers are gone: the SNA may have noticed first (its copy failed)
    check_job(env, job_id, "failed", failures, reason=("worker_lost", "sna_failed"))
    if any(p.poll() is not None for p in others):
        failures.append("pid reuse: a process that merely has a recorded pid was signalled")
    for p in others:
        p.kill()
        p.wait()
    env.stop("keeper")


def case_boot_changed(env, failures):
    """After a reboot nothing recorded can be running: compensate everything, signal nothing."""
    job_id = "boot-1"
    servers = dead_victim_with_servers(env, job_id)
    with env.ledger() as db:
        db.execute("UPDATE workers SET boot_id = 'not-this-boot' WHERE worker_id = 'victim3'")
        db.execute("UPDATE jobs SET owner_boot_id = 'not-this-boot' WHERE job_id = ?", (job_id,))
    env.sim_post("/_sim/faults", {})
    env.start("keeper", keeper=True)
    evs = check_job_boot(env, job_id, servers, failures)
    failed = [e for e in evs if e["event"] == "backup.failed"]
    if failed and "rebooted" not in failed[0]["message"]:
        failures.append(f"boot: message {failed[0]['message']!r} does not say why")
    env.stop("keeper")


def check_job_boot(env, job_id, servers, failures):
    env.wait_terminal(job_id, timeout=90, cleanup=True)
    alive = [p for p in servers if os.path.exists(f"/proc/{p}")]
    if alive != servers:
        failures.append(f"boot: servers {servers} were signalled (alive now: {alive})")
    for p in alive:  # the test's own clean-up: a real reboot would have ended them
        os.kill(p, signal.SIGKILL)
    time.sleep(0.5)
    return check_job(env, job_id, "failed", failures, reason="worker_lost")


def case_drain(env, failures):
    """bw-worker --drain: no new jobs, the running one finishes, the worker exits 0."""
    env.sim_post("/_sim/faults", {"slow_bytes_per_s": 2 * MiB})
    p = env.start("drainer")
    env.wait_consumer()
    env.publish(vm_message("drain-1", VM, DISKS))
    wait_started(env, ["drain-1"], failures, timeout=30)
    r = subprocess.run([env.worker, "--config", env.config("drainer"), "--drain"],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0 or "draining worker drainer" not in r.stdout:
        failures.append(f"drain: exit {r.returncode}: {r.stdout} {r.stderr}")
    if p.poll() != 0:
        failures.append(f"drain: the worker exited {p.poll()}")
    env.workers.pop("drainer")
    env.sim_post("/_sim/faults", {})
    check_job(env, "drain-1", "completed", failures, adopter="drainer")


CASES = {"crash_points": case_crash_points, "rolling_restart": case_rolling_restart,
         "two_reapers": case_two_reapers, "adopt_patience": case_adopt_patience,
         "pid_reuse": case_pid_reuse,
         "boot_changed": case_boot_changed, "drain": case_drain}


def main():
    worker, ctl = sys.argv[1], sys.argv[2]
    names = sys.argv[3:] or list(CASES)
    env = Recovery(worker, ctl)
    env.sim_post("/_sim/vm", {"vm_path": VM, "seed": 9,
                              "disks": {str(k): {"size": 4 * MiB} for k in KEYS}})
    results = {}

    def stop_all():
        for wid in list(env.workers):
            env.stop(wid)
    try:
        for name in names:
            results[name] = e2e.run_case(env, name, CASES[name], stop_all)
    finally:
        # what a failed case left running is the test's to end
        subprocess.run(["pkill", "-KILL", "-f", f"qemu-nbd .*{env.repo}/"])
        e2e.finish(env, False in results.values(), 25)
    return e2e.summary(results)


if __name__ == "__main__":
    sys.exit(main())
