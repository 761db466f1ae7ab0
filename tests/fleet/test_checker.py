#!/usr/bin/python3
"""test_checker.py: the fleet checker on synthetic histories: a clean history passes, and each
anomaly is counted in its column (and only there). Usage: test_checker.py [-v]"""
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checker  # noqa: E402


def ev(job, event, seq, host="host-a", worker="host-a-1", key=None, **fields):
    eid = f"{job}/{event}" + (f"/{key}" if key is not None else "")
    e = {"schema_version": 1, "event": event, "event_id": eid, "job_id": job, "seq": seq,
         "host": host, "worker_id": worker}
    if key is not None:
        e["key"] = key
    e.update(fields)
    return e


def completed_job(job, keys=(2000, 2001), host="host-a"):
    """The events of a job that completed: accepted, started, one disk.completed per key,
    completed; images at /img/<job>/<key>."""
    out = [ev(job, "backup.accepted", 1, host), ev(job, "backup.started", 2, host)]
    seq = 3
    for k in keys:
        out.append(ev(job, "backup.disk.completed", seq, host, key=k, qcow2_path=f"/img/{job}/{k}"))
        seq += 1
    out.append(ev(job, "backup.completed", seq, host))
    return out


def failed_job(job, reason="sna_failed", host="host-b"):
    return [ev(job, "backup.accepted", 1, host), ev(job, "backup.started", 2, host),
            ev(job, "backup.failed", 3, host, reason=reason), ev(job, "backup.cleanup", 4, host)]


def start(job, status=200, host="127.0.0.2"):
    return {"method": "POST", "path": "/api/v1/backup/start", "status": status, "at": "t",
            "body": {"job_id": job, "nbd_host": host}}


def snapshot(job, keys=(2000, 2001)):
    return {"job_id": job, "disks": {str(k): {"path": f"/snap/{job}/{k}"} for k in keys}}


def same(source, image):
    """compare() of a run whose every image equals its snapshot (paths match by job and key)."""
    return None if source.split("/")[2:] == image.split("/")[2:] else "differs"


def clean():
    """Three jobs: two completed on two hosts, one failed (a legitimate outcome); each once
    started; events duplicated (as the outbox may) and out of order."""
    events = completed_job("j1") + completed_job("j2", keys=(2000,), host="host-b") + failed_job("j3")
    events = list(reversed(events)) + events[:3]
    return checker.History(published={"j1", "j2", "j3"}, events=events,
                           sna_requests=[start("j1"), start("j2"), start("j3"),
                                         {"path": "/api/v1/progress/j1", "status": 200}],
                           snapshots=[snapshot("j1"), snapshot("j2", (2000,)), snapshot("j3")])


class Checker(unittest.TestCase):
    def judge(self, h, compare=same):
        return checker.check(h, compare=compare)

    def only(self, r, column, n=1):
        """r counts n in column and 0 in every other loss column."""
        for c in checker.LOSS_COLUMNS:
            self.assertEqual(getattr(r, c), n if c == column else 0, f"{c}: {r.details}")
        self.assertFalse(r.ok)

    def test_clean_history_passes(self):
        r = self.judge(clean())
        self.assertTrue(r.ok, r.details)
        self.assertEqual((r.jobs, r.completed, r.failed), (3, 2, 1))
        self.assertEqual(r.details, [])

    def test_lost(self):
        h = clean()
        h.events = [e for e in h.events if not (e["job_id"] == "j2" and e["event"] == "backup.completed")]
        self.only(self.judge(h), "lost")

    def test_lost_never_seen(self):
        h = clean()
        h.published.add("j4")
        self.only(self.judge(h), "lost")

    def test_indeterminate_is_neither_lost_nor_unexpected(self):
        h = clean()
        h.indeterminate = {"j5", "j6"}
        h.events += completed_job("j5", keys=(2000,))
        h.sna_requests.append(start("j5"))
        h.snapshots.append(snapshot("j5", (2000,)))
        r = self.judge(h)
        self.assertTrue(r.ok, r.details)
        self.assertEqual(r.jobs, 3)

    def test_duplicated_start(self):
        h = clean()
        h.sna_requests.append(start("j1", 409, host="127.0.0.3"))
        self.only(self.judge(h), "dup_starts")

    def test_two_starts_of_one_owner(self):
        h = clean()
        h.sna_requests.append(start("j1", 200))
        self.only(self.judge(h), "dup_starts")

    def test_timed_out_start_answered_409_on_retry_is_not_a_duplicate(self):
        h = clean()
        h.sna_requests.append(start("j1", 409))
        self.assertTrue(self.judge(h).ok, self.judge(h).details)

    def test_retried_start_is_not_a_duplicate(self):
        h = clean()
        h.sna_requests[0:0] = [start("j1", 503), start("j1", None)]
        self.assertTrue(self.judge(h).ok)

    def test_contradicting_completed_and_failed(self):
        h = clean()
        h.events.append(ev("j1", "backup.failed", 6, reason="worker_lost"))
        self.only(self.judge(h), "contradicting")

    def test_contradicting_two_reasons(self):
        h = clean()
        # one event_id (<job>/backup.failed), two reasons: two owners failed it
        h.events.append(ev("j3", "backup.failed", 3, host="host-b", worker="host-b-2", reason="worker_lost"))
        self.only(self.judge(h), "contradicting")

    def test_contradicting_one_event_id_two_bodies(self):
        h = clean()
        other = completed_job("j2", keys=(2000,), host="host-a")[-1]  # host-a claims it too
        h.events.append(other)
        self.only(self.judge(h), "contradicting")

    def test_seq_gap(self):
        h = clean()
        h.events = [e for e in h.events if e["event_id"] != "j1/backup.started"]
        self.only(self.judge(h), "seq_gaps")

    def test_seq_twice(self):
        h = clean()
        h.events.append(ev("j3", "backup.progress", 2, host="host-b"))  # another event, seq 2 again
        self.only(self.judge(h), "seq_gaps")

    def test_unexpected(self):
        h = clean()
        h.events += completed_job("ghost", keys=(2000,))
        r = self.judge(h)
        self.assertEqual(r.unexpected, len(completed_job("ghost", keys=(2000,))), r.details)
        for c in checker.LOSS_COLUMNS:
            if c != "unexpected":
                self.assertEqual(getattr(r, c), 0, c)

    def test_unexpected_null_job(self):
        h = clean()
        h.events.append({"event": "backup.rejected", "event_id": "rejected/00", "job_id": None, "seq": 0})
        self.only(self.judge(h), "unexpected")

    def test_image_differs(self):
        h = clean()
        r = self.judge(h, compare=lambda s, i: "differs" if i == "/img/j1/2001" else None)
        self.only(r, "images_bad")

    def test_image_missing_disk(self):
        h = clean()
        h.snapshots[0] = snapshot("j1", (2000, 2001, 2002))  # a disk nobody reported
        self.only(self.judge(h), "images_bad")

    def test_image_no_snapshot(self):
        h = clean()
        h.snapshots = [s for s in h.snapshots if s["job_id"] != "j2"]
        self.only(self.judge(h), "images_bad")

    def test_failed_job_images_not_compared(self):
        h = clean()
        r = self.judge(h, compare=lambda s, i: "differs" if "/j3/" in i else None)
        self.assertTrue(r.ok, r.details)

    def test_row_prints_every_column(self):
        r = self.judge(clean())
        line = checker.row("steady", r, 1.25)
        self.assertEqual(line, "| steady | 3 | 0 | 0 | 0 | 0 | 0 | 0 | 2 | 1 | 1.2 |")
        self.assertEqual(len(checker.header().splitlines()[0].split("|")), len(line.split("|")))

    def test_real_compare(self):
        """qemu_img_compare itself: equal contents pass, a changed byte fails."""
        import shutil
        import subprocess
        import tempfile
        if not shutil.which("qemu-img"):
            self.skipTest("no qemu-img")
        d = tempfile.mkdtemp(prefix="bw-fleet-chk-")
        try:
            raw, img = os.path.join(d, "a.raw"), os.path.join(d, "a.qcow2")
            with open(raw, "wb") as f:
                f.write(os.urandom(1 << 16) + bytes(1 << 16))
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, img], check=True)
            self.assertIsNone(checker.qemu_img_compare(raw, img))
            with open(raw, "r+b") as f:
                f.seek(70000)
                f.write(b"x")
            self.assertIsNotNone(checker.qemu_img_compare(raw, img))
        finally:
            shutil.rmtree(d)


if __name__ == "__main__":
    unittest.main()
