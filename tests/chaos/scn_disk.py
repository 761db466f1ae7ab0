#!/usr/bin/python3
"""scn_disk.py: chaos scenarios of full file systems (issue 16): the host's ledger on a small
tmpfs that fills up while jobs arrive (clean failures, `PRAGMA integrity_check` ok, everything
resumes once the tmpfs grows again), and a repository on a small tmpfs that fills during a
transfer (the job fails target_error or the SNA's failure, its partial images removed, a job
on another repository of the same host completes). Real broker, real bw-worker x2, real
qemu-nbd, the SNA simulator; needs root (mount -t tmpfs), every mount undone at the end.

Usage: /usr/bin/python3 tests/chaos/scn_disk.py BW_WORKER BW_CTL [--quick] [NAME...]
  runs the scenarios alone (as tests/chaos/chaos.py does) and prints the chaos table.
  Exit codes: 0 nothing lost, leaked or unexpected; 1 otherwise; 2 usage."""
import errno
import os
import sqlite3
import subprocess
import sys
import time

import pika

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import io_env  # noqa: E402
from io_env import MiB  # noqa: E402

CONF = {"sna.poll_interval_s": 1, "sna.max_attempts": 3, "sna.timeout_s": 5, "sna.backoff_base_ms": 100,
        "sna.backoff_cap_s": 1, "worker.shutdown_grace_s": 10, "worker.recovery_interval_s": 2}
LEDGER_FS = "4m"       # the ledger's tmpfs: room for the ledger, filled up by a filler file
GROWN_FS = "64m"       # what it grows to when space returns
REPO_FS = "3m"         # the small repository: a 16 MiB disk of half data does not fit
FULL_S = {True: 6, False: 15}   # how long the ledger stays full (quick, full run)
WAIT_S = int(os.environ.get("BW_CHAOS_DISK_WAIT_S", 60))   # after the space returned, jobs end in seconds


class Tmpfs:
    """A tmpfs of size mounted on path (created); resize() remounts; close() unmounts."""

    def __init__(self, path, size):
        self.path = path
        os.makedirs(path, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path], check=True,
                       capture_output=True, text=True)
        self.mounted = True

    def resize(self, size):
        r = subprocess.run(["mount", "-o", f"remount,size={size}", self.path], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"remount {self.path} size={size}: exit {r.returncode}: {r.stderr.strip()}")

    def shrink(self, size):
        """Back to size, or to what it holds plus 512 KiB when that is more (the ledger and its
        WAL grow over the trials: a tmpfs is not made smaller than its contents); returns the
        size set."""
        st = os.statvfs(self.path)
        used_kib = (st.f_blocks - st.f_bfree) * st.f_frsize // 1024
        want_kib = max(int(size.rstrip("m")) * 1024, used_kib + 512)
        self.resize(f"{want_kib}k")
        return want_kib

    def fill(self, name="filler"):
        """Writes a file until the tmpfs is full; returns its size."""
        path = os.path.join(self.path, name)
        n = 0
        chunk = b"\xa5" * 65536
        with open(path, "ab", buffering=0) as f:
            while True:
                try:
                    n += f.write(chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
            for size in (4096, 512, 1):   # the last bytes too
                while True:
                    try:
                        n += f.write(b"\xa5" * size)
                    except OSError:
                        break
        return n

    def free(self):
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def close(self):
        if self.mounted:
            r = subprocess.run(["umount", self.path], capture_output=True, text=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", self.path], capture_output=True, text=True)
            self.mounted = False


def truncate_wal(path):
    """Checkpoints the ledger's WAL and truncates it, as bw's upkeep does when no reader needs
    it; returns the WAL's size after, in KiB (-1: could not). Without it a WAL that grew in
    an earlier trial would take the next trial's writes inside its own file, and the full
    file system would not bite."""
    try:
        db = sqlite3.connect(path, timeout=10)
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            db.close()
        return os.path.getsize(path + "-wal") // 1024
    except (sqlite3.Error, OSError):
        return -1


def integrity(path):
    """PRAGMA integrity_check of the ledger (read only); "ok" or what it says."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            rows = db.execute("PRAGMA integrity_check").fetchall()
        finally:
            db.close()
        return "ok" if rows == [("ok",)] else "; ".join(str(r[0]) for r in rows)[:300]
    except sqlite3.Error as e:
        return f"error: {e}"


def dead_lettered(broker):
    """Messages in backup.start.dlq now."""
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    try:
        return conn.channel().queue_declare("backup.start.dlq", passive=True).method.message_count
    finally:
        conn.close()


def wait_ended(rig, broker, ids, dlq_before, timeout):
    """Until every job of ids has a terminal event, or those without one are all in the DLQ
    (no event will ever come for them), or timeout; returns the ids without a terminal event."""
    end = time.time() + timeout
    while True:
        left = set(ids) - set(rig.terminal(ids))
        if not left or time.time() > end or dead_lettered(broker) - dlq_before >= len(left):
            return left
        time.sleep(1)


def requeues(host):
    n = 0
    for wid in host.workers:
        with open(os.path.join(host.dir, f"{wid}.log"), "rb") as f:
            n += f.read().count(b"given back to the queue")
    return n


def workers_alive(host, result, when):
    for wid, p in host.workers.items():
        rc = p.poll()
        if rc is not None:
            result["failures"].append(f"{wid} died {when} (exit {rc}); started again")
            host.start(wid)


def run_ledger_full(ctx, trials):
    """Each trial: the ledger's tmpfs filled to the last byte, jobs published into it (and
    one already transferring when it fills), held full a while, then grown: every job ends
    (completed, or a failure with its cleanup), the workers live through it, integrity_check
    says ok while full and after, and a job published after the space returned completes."""
    result = io_env.new_result()
    broker = io_env.Broker(os.path.join(ctx.tmp, "broker"))
    fs = None
    rig = None
    try:
        rig = io_env.Rig(ctx, broker, "ledger")
        fs = Tmpfs(os.path.join(ctx.tmp, "ledgerfs"), LEDGER_FS)
        conf = dict(CONF, **{"worker.state_dir": fs.path})
        host = rig.add_host(workers=2, max_jobs=4, ports=24, conf=conf)
        host.start()
        ledger = os.path.join(fs.path, "ledger.db")
        vm = rig.vm("a", {2000: 4 * MiB, 2001: MiB}, seed=11)
        slow = rig.vm("slow", {2000: 8 * MiB}, seed=12)
        warm = rig.msg("warm", vm)
        rig.send(warm)
        if rig.wait_terminal(60, [warm["job_id"]]):
            result["failures"].append("the first job (before any fault) did not end in 60 s")
        for t in range(trials):
            dlq_before = dead_lettered(broker)
            ctx.log(f"ledger_full trial {t + 1}: filling the ledger's tmpfs")
            during = rig.msg(f"t{t}-during", slow)
            rig.send(during, {"slow_bytes_per_s": 2 * MiB})
            end = time.time() + 30
            while time.time() < end and not any(e.get("event") == "backup.started"
                                                for e in rig.events_of(during["job_id"])):
                time.sleep(0.2)
            wal = truncate_wal(ledger)
            filled = fs.fill(f"filler-{t}")
            result["notes"].append(f"trial {t + 1}: WAL {wal} KiB, filler {filled >> 10} KiB, "
                                   f"{fs.free()} bytes free")
            jobs = [rig.msg(f"t{t}-full-{i}", vm) for i in range(3)]
            for m in jobs:
                rig.send(m)
            time.sleep(FULL_S[ctx.quick])
            workers_alive(host, result, "while the ledger's file system was full")
            ic = integrity(ledger)
            if ic != "ok":
                result["failures"].append(f"trial {t + 1}: integrity_check while full: {ic}")
            ended_full = rig.terminal([m["job_id"] for m in jobs + [during]])
            result["notes"].append(f"trial {t + 1}: ended while full: {ended_full}")
            ctx.log(f"ledger_full trial {t + 1}: growing the tmpfs to {GROWN_FS}")
            fs.resize(GROWN_FS)
            after = rig.msg(f"t{t}-after", vm)
            rig.send(after)
            ids = [m["job_id"] for m in jobs + [during, after]]
            left = wait_ended(rig, broker, ids, dlq_before, WAIT_S)
            rig.wait_cleanup(ids, 30)
            for jid in sorted(left):
                result["failures"].append(f"{jid}: published while the ledger was full, confirmed, and no terminal "
                                          f"event after the space returned (waited until it was in the DLQ, at "
                                          f"most {WAIT_S} s)")
            if left:
                result["failures"].append(f"trial {t + 1}: {dead_lettered(broker) - dlq_before} message(s) more in "
                                          "backup.start.dlq (dead-lettered without any event), "
                                          f"{requeues(host)} 'given back to the queue' lines in the workers' logs")
            outcome = rig.terminal(ids)
            result["notes"].append(f"trial {t + 1}: outcomes {outcome}")
            for jid in ids:
                if jid in outcome and jid not in ended_full:
                    result["recovered"] += 1
                f = rig.failed_event(jid)
                if f is not None:
                    io_env.expect(rig, jid, {f.get("reason")}, result, "")
            if outcome.get(after["job_id"]) != "completed":
                result["failures"].append(f"{after['job_id']}: published after the space returned, ended "
                                          f"{outcome.get(after['job_id'])}; want completed")
            workers_alive(host, result, "after the space returned")
            ic = integrity(ledger)
            if ic != "ok":
                result["failures"].append(f"trial {t + 1}: integrity_check after: {ic}")
            os.unlink(os.path.join(fs.path, f"filler-{t}"))
            result["notes"].append(f"trial {t + 1}: the tmpfs back to {fs.shrink(LEDGER_FS)} KiB")
            result["trials"] += 1
    except BaseException:
        if rig is not None:
            rig.abort()
        if fs is not None:
            fs.close()
        broker.close()
        raise
    try:
        rig.finish(result)
        ic = integrity(os.path.join(fs.path, "ledger.db"))
        if ic != "ok":
            result["failures"].append(f"integrity_check at the end: {ic}")
    finally:
        fs.close()
        broker.close()
    return result


def run_repo_full(ctx, trials):
    """Each trial: a 16 MiB disk (half data) backed up into a repository on a 3 MiB tmpfs
    while a job of the same host writes into another repository: the first fails target_error
    or the SNA's failure (sna_failed), its images removed; the other completes (its images
    equal the snapshot: the checker)."""
    result = io_env.new_result()
    broker = io_env.Broker(os.path.join(ctx.tmp, "broker"))
    fs = None
    rig = None
    try:
        rig = io_env.Rig(ctx, broker, "repofull")
        host = rig.add_host(workers=2, max_jobs=4, ports=24, conf=dict(CONF),
                            repos=("repo-001", "repo-small"))
        fs = Tmpfs(host.repos["repo-small"], REPO_FS)
        host.start()
        big = rig.vm("big", {2000: 16 * MiB, 2001: MiB}, seed=21)
        other = rig.vm("other", {2000: 8 * MiB}, seed=22)
        for t in range(trials):
            ctx.log(f"repo_full trial {t + 1}")
            full = rig.msg(f"t{t}-full", big, repository="repo-small")
            ok = rig.msg(f"t{t}-other", other)
            rig.send(full)
            rig.send(ok, {"slow_bytes_per_s": 4 * MiB})
            ids = [full["job_id"], ok["job_id"]]
            left = rig.wait_terminal(WAIT_S, ids)
            rig.wait_cleanup(ids, 30)
            for jid in sorted(left):
                result["failures"].append(f"{jid}: no terminal event in {WAIT_S} s")
            got = io_env.expect(rig, full["job_id"], {"target_error", "sna_failed"}, result,
                                "the repository filled up during the transfer")
            got_ok = io_env.expect(rig, ok["job_id"], "completed", result,
                                   "another repository of the same host is not hurt")
            result["notes"].append(f"trial {t + 1}: {full['job_id']} {got}, {ok['job_id']} {got_ok}")
            f = rig.failed_event(full["job_id"])
            if f is not None:
                result["notes"].append(f"trial {t + 1}: {f.get('stage')}/{f.get('reason')}: "
                                       f"{str(f.get('message'))[:200]}")
                result["recovered"] += 1
            done = [e.get("key") for e in rig.events_of(full["job_id"]) if e.get("event") == "backup.disk.completed"]
            if 2000 in done:
                result["failures"].append(f"{full['job_id']}: disk 2000 (16 MiB into 3 MiB) reported completed")
            left_files = [os.path.join(d, x) for d, _, fl in os.walk(fs.path) for x in fl]
            kept = {e.get("qcow2_path") for e in rig.events_of(full["job_id"])
                    if e.get("event") == "backup.disk.completed"}
            stray = [p for p in left_files if p not in kept]
            if stray:
                result["failures"].append(f"trial {t + 1}: partial images left in the full repository: {stray}")
            result["notes"].append(f"trial {t + 1}: {fs.free()} bytes free in the small repository after")
            # the next trial starts from an empty repository: kept images of disk 2001 go
            for p in left_files:
                if p in kept:
                    os.unlink(p)
            result["trials"] += 1
    except BaseException:
        if rig is not None:
            rig.abort()
        if fs is not None:
            fs.close()
        broker.close()
        raise
    try:
        rig.finish(result)
    finally:
        fs.close()
        broker.close()
    return result


SCENARIOS = [
    ("ledger_full", run_ledger_full, 1, 3),
    ("repo_full", run_repo_full, 1, 3),
]

if __name__ == "__main__":
    sys.exit(io_env.standalone(SCENARIOS, sys.argv))
