#!/usr/bin/python3
"""metrics.py: metrics.listen (CONTRACT §6): GET /metrics and GET /healthz of a real bw-worker
against the real broker (tests/with-broker), real qemu-nbd and the SNA simulator.
Usage: metrics.py BW_WORKER BW_CTL [CASE...]

Every page is parsed by two real parsers, `promtool check metrics` (Prometheus' own linter) and
prometheus_client's text_string_to_metric_families, and each is shown to refuse a broken page
first. A backup job must move the counters and histograms it touches (scraped before, during
and after it); /healthz is 200 with both broker links up, 503 with the reason while the
broker is stopped, 200 again once the links are back."""
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
from e2e import MiB, check_events, leftovers, vm_message  # noqa: E402
e2e.PORT_MIN, e2e.PORT_MAX = 22500, 22511  # NBD ports of this suite alone: suites run side by side

VM = "/DC/vm/metrics"
SIZES = {2000: 8 * MiB, 2001: 4 * MiB, 16000: 4 * MiB}
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
WORKER = "m1"
STAGES = ("claimed", "reserved", "targets_created", "serving", "sna_requested", "transferring",
          "finalizing")


class Env(e2e.Env):
    def __init__(self, worker, ctl):
        super().__init__(worker, ctl)
        self.metrics_port = e2e.free_port()
        self.base = f"http://127.0.0.1:{self.metrics_port}"

    def start_metrics_worker(self, wid=WORKER, port=None):
        return self.start_worker(wid, f"[metrics]\nlisten = 127.0.0.1:{port or self.metrics_port}\n")


def http(env, path, method="GET"):
    """(status, content type, body text) of one request to the worker's listener."""
    req = urllib.request.Request(env.base + path, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def curl_metrics(env):
    """The page as curl gets it (the brief's client), with its content type."""
    r = subprocess.run(["curl", "-sS", "-f", "-o", "-", "-w", "\n%{content_type}",
                        env.base + "/metrics"], capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        raise AssertionError(f"curl /metrics: {r.stderr.strip()}")
    body, _, ctype = r.stdout.rpartition("\n")
    return body, ctype


def promtool(page):
    r = subprocess.run(["promtool", "check", "metrics"], input=page, capture_output=True,
                       text=True, timeout=30)
    return r.returncode, (r.stdout + r.stderr).strip()


def parse(page):
    """{(sample name, sorted label items): value} through prometheus_client's parser, and the
    families' types {family name: type}."""
    samples, types = {}, {}
    for fam in text_string_to_metric_families(page):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def scrape(env, failures, what):
    """Scrapes with curl, holds the page to both parsers; returns the samples."""
    page, ctype = curl_metrics(env)
    if ctype != CONTENT_TYPE:
        failures.append(f"{what}: Content-Type {ctype!r}")
    rc, out = promtool(page)
    if rc != 0:
        failures.append(f"{what}: promtool check metrics: {out[:500]}")
    samples, types = parse(page)
    for name, labels in list(samples):
        if name.endswith("_count") and types.get(name[:-6]) == "histogram":
            inf = samples.get((name[:-6] + "_bucket", tuple(sorted(dict(labels, le="+Inf").items()))))
            if inf != samples[(name, labels)]:
                failures.append(f"{what}: {name}{dict(labels)} {samples[(name, labels)]} != +Inf bucket {inf}")
    return samples


def v(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def show(before, after, name, **labels):
    print(f"     {name}{labels or ''}: {v(before, name, **labels):g} -> {v(after, name, **labels):g}")


# ---- cases ------------------------------------------------------------------------------

def case_parsers_refuse_broken(env, failures):
    """Both parsers are real judges: each refuses a broken page that the other lines pass."""
    good = "# HELP bw_x_total x\n# TYPE bw_x_total counter\nbw_x_total 1\n"
    if promtool(good)[0] != 0:
        failures.append(f"promtool refuses a good page: {promtool(good)[1]}")
    for broken in (good.replace("bw_x_total 1", 'bw_x_total{a="1} 1'), good.replace("bw_x_total 1", "bw_x_total")):
        if promtool(broken)[0] == 0:
            failures.append(f"promtool accepts {broken!r}")
        try:
            parse(broken)
            failures.append(f"prometheus_client accepts {broken!r}")
        except Exception:
            pass


def case_job_moves_metrics(env, failures):
    env.sim_post("/_sim/vm", {"vm_path": VM, "seed": 4,
                              "disks": {str(k): {"size": s} for k, s in SIZES.items()}})
    env.sim_post("/_sim/faults?job=met-1", {"slow_bytes_per_s": 4 * MiB})
    before = scrape(env, failures, "before")
    info = [k for k in before if k[0] == "bw_info"]
    if len(info) != 1 or dict(info[0][1]).get("worker_id") != WORKER or before[info[0]] != 1:
        failures.append(f"bw_info: {info}")
    for k in ("process_resident_memory_bytes", "process_virtual_memory_bytes",
              "process_start_time_seconds", "process_open_fds", "process_cpu_seconds_total"):
        if not v(before, k) > 0:
            failures.append(f"{k} = {v(before, k)}")
    if abs(v(before, "process_start_time_seconds") - time.time()) > 600:
        failures.append(f"process_start_time_seconds {v(before, 'process_start_time_seconds')} vs now {time.time()}")
    t0 = time.time()
    env.publish(vm_message("met-1", VM, [{"key": k, "size_bytes": s} for k, s in SIZES.items()]))
    # during the transfer: this worker's job, its three servers and ports
    during, end = None, time.time() + 60
    while time.time() < end:
        s = scrape(env, failures, "during")
        if v(s, "bw_jobs", state="transferring") == 1:
            during = s
            break
        time.sleep(0.2)
    if during is None:
        failures.append("never saw bw_jobs{state=transferring} 1")
    else:
        print("     during:", {k: v(during, k, **l) for k, l in (
            ("bw_jobs", {"state": "transferring"}), ("bw_qemu_nbd_processes", {}),
            ("bw_ports", {"state": "reserved"}))})
        if v(during, "bw_qemu_nbd_processes") != 3 or v(during, "bw_ports", state="reserved") != 3:
            failures.append(f"during: qemu-nbd {v(during, 'bw_qemu_nbd_processes')}, "
                            f"reserved ports {v(during, 'bw_ports', state='reserved')} (want 3, 3)")
    if env.wait_terminal("met-1") != "completed":
        failures.append(f"met-1 not completed: {env.job_events('met-1')[-1]}")
        return
    evs = check_events(env, "met-1", failures)
    # the relay confirms the last events a moment after they were routed to us
    after, end = None, time.time() + 20
    while time.time() < end:
        after = scrape(env, failures, "after")
        if v(after, "bw_relay_confirm_latency_seconds_count") - v(before, "bw_relay_confirm_latency_seconds_count") >= len(evs) \
                and v(after, "bw_jobs", state="completed") == 0:
            break
        time.sleep(0.3)
    for name, labels in (("bw_job_outcomes_total", {"result": "completed", "reason": "none"}),
                         ("bw_job_duration_seconds_count", {"result": "completed"}),
                         ("bw_job_start_latency_seconds_count", {}),
                         ("bw_sna_requests_total", {"call": "start", "outcome": "ok"}),
                         ("bw_sna_request_duration_seconds_count", {"call": "start"})):
        show(before, after, name, **labels)
        if v(after, name, **labels) - v(before, name, **labels) != 1:
            failures.append(f"{name}{labels}: {v(before, name, **labels)} -> {v(after, name, **labels)} (want +1)")
    for name, labels, least in (("bw_sna_requests_total", {"call": "progress", "outcome": "ok"}, 1),
                                ("bw_sna_request_duration_seconds_count", {"call": "progress"}, 1),
                                ("bw_relay_confirm_latency_seconds_count", {}, len(evs)),
                                ("bw_relay_events_confirmed_total", {}, len(evs))):
        show(before, after, name, **labels)
        if v(after, name, **labels) - v(before, name, **labels) < least:
            failures.append(f"{name}{labels}: {v(before, name, **labels)} -> {v(after, name, **labels)} (want +{least} or more)")
    for stage in STAGES:
        n = v(after, "bw_job_stage_duration_seconds_count", stage=stage)
        if n != 1:
            failures.append(f"bw_job_stage_duration_seconds_count{{stage={stage}}} = {n} (want 1)")
    took = v(after, "bw_job_duration_seconds_sum", result="completed")
    if not 0 < took <= time.time() - t0 + 1:
        failures.append(f"bw_job_duration_seconds_sum {took} outside (0, {time.time() - t0:.1f}]")
    last = v(after, "bw_last_completed_backup_timestamp_seconds")
    print(f"     bw_last_completed_backup_timestamp_seconds: {v(before, 'bw_last_completed_backup_timestamp_seconds'):g} -> {last:.3f}")
    if not t0 - 1 <= last <= time.time() + 1:
        failures.append(f"bw_last_completed_backup_timestamp_seconds {last} not between publish {t0} and now")
    for k, want in ((("bw_qemu_nbd_processes", ()), 0), (("bw_ports", (("state", "reserved"),)), 0),
                    (("bw_ports", (("state", "free"),)), e2e.PORT_MAX - e2e.PORT_MIN + 1),
                    (("bw_outbox_backlog_events", ()), 0)):
        if after.get(k) != want:
            failures.append(f"after: {k[0]}{dict(k[1])} = {after.get(k)} (want {want})")
    if any(v(after, "bw_jobs", state=s) for s in STAGES + ("completed", "failed", "compensated")):
        failures.append("after: bw_jobs not all 0")
    # a rejected message
    rb = v(after, "bw_rejected_messages_total", reason="invalid_json")
    env.ch.basic_publish("backup.jobs", "backup.start", b"{nope", e2e.pika.BasicProperties(delivery_mode=2))
    end = time.time() + 20
    while time.time() < end and v(scrape(env, failures, "rejected"), "bw_rejected_messages_total", reason="invalid_json") == rb:
        time.sleep(0.3)
    ra = v(scrape(env, failures, "rejected"), "bw_rejected_messages_total", reason="invalid_json")
    print(f"     bw_rejected_messages_total{{reason=invalid_json}}: {rb:g} -> {ra:g}")
    if ra != rb + 1:
        failures.append(f"bw_rejected_messages_total{{invalid_json}} {rb} -> {ra} (want +1)")
    e2e.dlq_get(env)
    failures += [f"met-1: {x}" for x in leftovers(env)]


def wait_health(env, want, timeout):
    """Polls /healthz until its status is want; returns (status, body) of the last answer."""
    end, got = time.time() + timeout, (None, "")
    while time.time() < end:
        got = http(env, "/healthz")[0::2]
        if got[0] == want:
            break
        time.sleep(0.25)
    return got


def case_healthz_broker(env, failures):
    st, body = wait_health(env, 200, 30)
    print(f"     broker up: {st} {body.strip()!r}")
    if (st, body) != (200, "ok\n"):
        failures.append(f"healthz with the broker up: {st} {body!r}")
    before = scrape(env, failures, "healthz before")
    try:
        subprocess.run([e2e.BROKER, "stop", e2e.BROKER_DIR], check=True, capture_output=True, timeout=120)
        st, body = wait_health(env, 503, 30)
        print(f"     broker stopped: {st} {body.strip()!r}")
        if st != 503 or "link down: " not in body or body.count("\n") != 1:
            failures.append(f"healthz with the broker stopped: {st} {body!r}")
        down = scrape(env, failures, "broker down")
        if v(down, "bw_broker_link_up", link="consumer") != 0 or v(down, "bw_broker_link_up", link="publisher") != 0:
            failures.append("bw_broker_link_up not 0 with the broker stopped")
    finally:
        subprocess.run([e2e.BROKER, "start", e2e.BROKER_DIR], check=True, capture_output=True, timeout=180)
    t = time.time()
    st, body = wait_health(env, 200, 120)
    print(f"     broker back: {st} {body.strip()!r} after {time.time() - t:.1f} s")
    if (st, body) != (200, "ok\n"):
        failures.append(f"healthz after the broker came back: {st} {body!r}")
    after = scrape(env, failures, "healthz after")
    for link in ("consumer", "publisher"):
        show(before, after, "bw_broker_reconnects_total", link=link)
        if v(after, "bw_broker_reconnects_total", link=link) < v(before, "bw_broker_reconnects_total", link=link) + 1:
            failures.append(f"bw_broker_reconnects_total{{link={link}}} did not move")
        if v(after, "bw_broker_link_up", link=link) != 1:
            failures.append(f"bw_broker_link_up{{link={link}}} not 1 after")
    env.connect()  # the test's own connection died with the broker


def case_http_edges(env, failures):
    for method, path, want in (("GET", "/nope", 404), ("POST", "/metrics", 405), ("HEAD", "/healthz", 405),
                               ("DELETE", "/healthz", 405), ("GET", "/metrics?x=1", 200)):
        st = http(env, path, method)[0]
        if st != want:
            failures.append(f"{method} {path}: {st} (want {want})")
    # a port already taken is a start-up error naming metrics.listen
    p = env.start_metrics_worker("m-taken")
    try:
        code = p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        code = "still running"
    del env.workers["m-taken"]
    with open(os.path.join(env.tmp, "m-taken.log")) as fh:
        log = fh.read()
    line = [l for l in log.splitlines() if "metrics.listen" in l and "in use" in l]
    print(f"     port taken: exit {code}: {line[0].split('warn: ')[-1] if line else log[-300:]}")
    if code != 1 or not line:
        failures.append(f"port taken: exit {code}, log {log[-300:]!r}")
    # and the worker that holds it logged where it listens
    with open(os.path.join(env.tmp, f"{WORKER}.log")) as fh:
        if f"on http://127.0.0.1:{env.metrics_port}" not in fh.read():
            failures.append("the listening address is not logged")


CASES = {"parsers_refuse_broken": case_parsers_refuse_broken, "job_moves_metrics": case_job_moves_metrics,
         "http_edges": case_http_edges, "healthz_broker": case_healthz_broker}


def main():
    worker, ctl = sys.argv[1], sys.argv[2]
    names = sys.argv[3:] or list(CASES)
    env = Env(worker, ctl)
    results, t0 = {}, time.time()
    try:
        env.start_metrics_worker()
        env.wait_queue()
        e2e.run_suite(env, CASES, names, results, workers=())
        codes = env.stop_workers()
        results["shutdown"] = all(c == 0 for c in codes.values())
        print(f"{'ok  ' if results['shutdown'] else 'FAIL'} shutdown: exit codes {codes}")
    finally:
        e2e.finish(env, False in results.values(), 40)
    return e2e.summary(results, t0)


if __name__ == "__main__":
    sys.exit(main())
