#!/usr/bin/python3
"""checker.py: judges one fleet run from its history, in Jepsen's words.

A history is what the test saw from outside the workers:
  published      job_ids whose backup.start the broker confirmed (the "ok" operations)
  indeterminate  job_ids whose publish had no answer (connection lost before the confirm:
                 Jepsen's "info"); such a job may run or not, so it is neither lost nor
                 unexpected, but everything else is held against it like a published one
  events         every event body read from backup.events (a queue bound with "#", declared
                 before the first publish), duplicates included, in any order
  sna_requests   the SNA simulator's /_sim/requests list (start requests per job)
  snapshots      the simulator's /_sim/snapshots list (the source of every image)

check(history, compare=...) counts, per run (one Result):
  jobs             published job_ids
  lost             published, and no terminal event (backup.completed / backup.failed)
  dup_starts       job_ids the SNA was asked to start twice: two requests it started
                   (answered 200 or 202), or requests it took in (200, 202 or 409: a 409
                   is the SNA saying it had the job already) from two owners (other
                   nbd_host or nbd_targets: two workers each thought the job theirs). A 409
                   to the same owner's retry (its earlier request timed out after the SNA
                   took it), a 5xx or an unanswered request is one start retried
  contradicting    job_ids whose terminal events disagree: completed and failed, failed with
                   two reasons, or one terminal event_id seen with two different bodies
                   (two owners reported it); duplicates of an identical body are fine
  seq_gaps         job_ids whose seqs (one per distinct event_id) are not exactly 1..max:
                   a hole, or two different event_ids with one seq
  unexpected       events of job_ids never published nor indeterminate (a job_id null too)
  images_bad       images of completed jobs that differ from their snapshot (compare), or a
                   completed job's disk of the snapshot with no backup.disk.completed, or a
                   completed job with no snapshot or several
plus completed and failed (outcomes, not losses). Result.ok: every loss column is 0.
"""
import subprocess

TERMINALS = ("backup.completed", "backup.failed")
ACCEPTED_START = (200, 202, 409)
LOSS_COLUMNS = ("lost", "dup_starts", "contradicting", "seq_gaps", "unexpected", "images_bad")
COLUMNS = ("jobs", "lost", "dup_starts", "contradicting", "seq_gaps", "unexpected", "images_bad",
           "completed", "failed")
HEADER = ("case", "jobs", "lost", "dup starts", "contradicting", "seq gaps", "unexpected",
          "images bad", "completed", "failed", "failover s")


def qemu_img_compare(source, image):
    """None when image (qcow2) holds exactly source (raw), else why not."""
    r = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", source, image],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else (r.stderr.strip()[:200] or f"qemu-img compare exit {r.returncode}")


class History:
    def __init__(self, published=(), indeterminate=(), events=(), sna_requests=(), snapshots=()):
        self.published = set(published)
        self.indeterminate = set(indeterminate) - self.published
        self.events = list(events)
        self.sna_requests = list(sna_requests)
        self.snapshots = list(snapshots)


class Result:
    def __init__(self):
        for c in COLUMNS:
            setattr(self, c, 0)
        self.details = []  # one line per anomaly, "column: job: what"
        self.images_compared = 0

    @property
    def ok(self):
        return all(getattr(self, c) == 0 for c in LOSS_COLUMNS)

    def note(self, column, job, what):
        self.details.append(f"{column}: {job}: {what}")


def _canon(event):
    """An event without what may differ between two publishes of one stored event (nothing:
    the outbox republishes the stored body byte for byte), as a comparable value."""
    return repr(sorted(event.items(), key=lambda kv: kv[0]))


def check(history, compare=qemu_img_compare):
    """Judges history (a History); compare(source, image) -> None or a reason. Returns a Result."""
    r = Result()
    known = history.published | history.indeterminate
    r.jobs = len(history.published)

    # events by job, one per event_id; bodies that differ under one event_id are kept apart
    by_job = {}
    bodies = {}
    for e in history.events:
        jid = e.get("job_id")
        if jid not in known:
            r.unexpected += 1
            r.note("unexpected", jid, f"{e.get('event_id')} of a job never published")
            continue
        eid = e.get("event_id")
        bodies.setdefault(eid, {})[_canon(e)] = e
        by_job.setdefault(jid, {}).setdefault(eid, e)  # the first body seen stands for its id

    for jid in sorted(known):
        evs = by_job.get(jid, {})
        terms = [e for e in evs.values() if e.get("event") in TERMINALS]
        # lost: a confirmed job with no terminal event
        if not terms and jid in history.published:
            r.lost += 1
            r.note("lost", jid, f"no terminal event; saw {sorted(e.get('event') for e in evs.values())}")
        # contradicting terminals
        outcomes = set()
        divergent = []
        for e in terms:
            variants = bodies[e["event_id"]]
            for v in variants.values():
                outcomes.add("completed" if v["event"] == "backup.completed" else "failed:" + str(v.get("reason")))
            if len(variants) > 1:
                divergent.append(f"{e['event_id']} from " + ", ".join(
                    sorted(f"{v.get('host')}/{v.get('worker_id')}" for v in variants.values())))
        if len(outcomes) > 1 or divergent:
            r.contradicting += 1
            r.note("contradicting", jid, f"outcomes {sorted(outcomes)} {'; '.join(divergent)}".strip())
        if terms and len(outcomes) == 1:
            if "completed" in outcomes:
                r.completed += 1
            else:
                r.failed += 1
        # seq gaps
        seqs = sorted(e.get("seq") for e in evs.values())
        if seqs and seqs != list(range(1, len(seqs) + 1)):
            r.seq_gaps += 1
            r.note("seq_gaps", jid, f"seqs {seqs}")

    # duplicated starts
    starts = {}
    for q in history.sna_requests:
        if not str(q.get("path", "")).endswith("/backup/start"):
            continue
        jid = (q.get("body") or {}).get("job_id")
        if q.get("status") in ACCEPTED_START:
            starts.setdefault(jid, []).append(q)
    for jid, qs in sorted(starts.items(), key=lambda kv: str(kv[0])):
        started = [q for q in qs if q.get("status") in (200, 202)]
        owners = {((q.get("body") or {}).get("nbd_host"), (q.get("body") or {}).get("nbd_targets"))
                  for q in qs}
        if len(started) > 1 or len(owners) > 1:
            r.dup_starts += 1
            r.note("dup_starts", jid, f"{len(qs)} starts taken in: " + ", ".join(
                f"{q.get('status')} at {q.get('at')} nbd_host {(q.get('body') or {}).get('nbd_host')}" for q in qs))

    # images of completed jobs against their snapshots
    snaps = {}
    for s in history.snapshots:
        snaps.setdefault(s.get("job_id"), []).append(s)
    for jid in sorted(known):
        evs = by_job.get(jid, {})
        if not any(e.get("event") == "backup.completed" for e in evs.values()):
            continue
        ss = snaps.get(jid, [])
        if len(ss) != 1:
            r.images_bad += 1
            r.note("images_bad", jid, f"{len(ss)} snapshots (want 1)")
            continue
        done = {}
        for e in evs.values():
            if e.get("event") == "backup.disk.completed":
                done.setdefault(e.get("key"), set()).add(e.get("qcow2_path"))
        for key, d in sorted(ss[0].get("disks", {}).items()):
            paths = done.get(int(key), set())
            if len(paths) != 1:
                r.images_bad += 1
                r.note("images_bad", jid, f"disk {key}: {len(paths)} images reported completed {sorted(map(str, paths))}")
                continue
            why = compare(d["path"], next(iter(paths)))
            r.images_compared += 1
            if why:
                r.images_bad += 1
                r.note("images_bad", jid, f"disk {key}: {why}")
    return r


def header():
    return "| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER)


def row(case, result, failover=None):
    """The table row of one case (failover: seconds or a text, None: n/a)."""
    fo = "-" if failover is None else (f"{failover:.1f}" if isinstance(failover, (int, float)) else str(failover))
    return "| " + " | ".join([case] + [str(getattr(result, c)) for c in COLUMNS] + [fo]) + " |"


def report(case, result, failover=None, details=20):
    """Prints the row (after the header) and up to `details` anomaly lines; returns result.ok."""
    print(header())
    print(row(case, result, failover), flush=True)
    for line in result.details[:details]:
        print(f"     {line}")
    if len(result.details) > details:
        print(f"     ... {len(result.details) - details} more")
    return result.ok
