#!/usr/bin/python3
"""sna_tls.py: the real bw-worker against the SNA simulator over https (CONTRACT.md §6:
sna.url = https://…, sna.tls_ca_file, sna.tls_cert_file, sna.tls_key_file), with a real broker
(tests/with-broker) and real qemu-nbd. Usage: sna_tls.py BW_WORKER BW_CTL [CASE...]

Cases (each with its own simulator and its own worker, one job each):
  right_ca            the CA that signed the simulator's certificate: the job completes
  wrong_ca            another CA: the job fails sna_unavailable, a TLS error in its message or log
  wrong_name          a certificate for other.example, sna.url https://localhost: fails likewise
  wrong_name_ip       a certificate for localhost only, sna.url https://127.0.0.1: fails likewise
  client_cert         the simulator requires a client certificate; the worker presents one: completes
  no_client_cert      the same without one: fails sna_unavailable
  proxy_ignored       http_proxy, HTTPS_PROXY, https_proxy, HTTP_PROXY, ALL_PROXY point at a
                      listener of ours: the job still completes and the listener saw no connection
                      (once over https, once over plain http to a loopback SNA)
A refused TLS handshake means the simulator never saw an HTTP request: each failing case also
checks that /_sim/requests holds nothing of its job.
"""
import os
import re
import socket
import ssl
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
sys.path.insert(0, os.path.join(e2e.ROOT, "tests", "sna"))
import pki  # noqa: E402
from e2e import MiB, check_events, leftovers, vm_message  # noqa: E402
e2e.PORT_MIN, e2e.PORT_MAX = 22540, 22551  # NBD ports of this suite alone: suites run side by side

VM = "/DC/vm/tls"
SIZES = {2000: 8 * MiB, 2001: 4 * MiB}
TLS_ERROR = re.compile(r"(?i)\b(ssl|tls|certificate|handshake)\b|SSL_|alert")
PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy")


def make_pki(d):
    """ca and other-ca; server certificates for localhost and for other.example and a client
    certificate, all signed by ca."""
    pki.make_pki(d, [("localhost", "ca", pki.SERVER_EXT.format("localhost")),
                     ("other", "ca", pki.SERVER_EXT.format("other.example")), ("client", "ca", pki.CLIENT_EXT)])


class ProxyTrap(threading.Thread):
    """A listener that proxies must not reach: it counts connections and closes them."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        self.stopping = False

    def run(self):
        while not self.stopping:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            if not self.stopping:
                self.hits += 1
            c.close()

    def close(self):
        self.stopping = True
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            pass
        self.sock.close()
        self.join(5)


class Env(e2e.Env):
    """e2e.Env with a simulator that serves https and is restarted per case."""

    def __init__(self, worker, ctl):
        self.make_dirs(worker, ctl, "bw-e2e-tls-", "e2e-secret")
        self.pki = os.path.join(self.tmp, "pki")
        make_pki(self.pki)
        self.sim_port = None
        self.sim_url = "http://127.0.0.1:1"
        self.connect()

    def start_sim(self, cert=None, client_ca=None):
        """A simulator on a new port: https with pki/<cert>.pem (and a client certificate
        required with client_ca), or plain http when cert is None. Creates the VM."""
        self.stop_sim()
        self.sim_port = e2e.free_port()
        args = []
        if cert:
            args += ["--tls-cert", f"{self.pki}/{cert}.pem", "--tls-key", f"{self.pki}/{cert}.key"]
        if client_ca:
            args += ["--tls-client-ca", f"{self.pki}/{client_ca}.pem"]
        line = self.spawn_sim(*args)
        want = f"listening on {'https://' if cert else ''}127.0.0.1:{self.sim_port}"
        assert want in line, f"simulator: {line!r}"
        if cert:
            self.sim_ctx = ssl.create_default_context(cafile=f"{self.pki}/ca.pem")
            self.sim_ctx.check_hostname = False  # the control API: whatever name the case's certificate has
            self.sim_ctx.load_cert_chain(f"{self.pki}/client.pem", f"{self.pki}/client.key")
            self.sim_url = f"https://127.0.0.1:{self.sim_port}"
        else:
            self.sim_ctx = None
            self.sim_url = f"http://127.0.0.1:{self.sim_port}"
        self.sim_post("/_sim/vm", {"vm_path": VM, "seed": 9, "replace": True,
                                   "disks": {str(k): {"size": s} for k, s in SIZES.items()}})


def run_job(env, failures, job_id, want, sna_url=None, sna_lines=(), worker_env=None):
    """One worker, one job; checks the outcome. Returns the job's events."""
    wid = f"w-{job_id}"
    env.start_worker(wid, sna_url=sna_url, sna_lines=sna_lines, env=worker_env)
    env.wait_queue()
    env.publish(vm_message(job_id, VM, [{"key": k, "size_bytes": s} for k, s in SIZES.items()]))
    try:
        got = env.wait_terminal(job_id, timeout=90, cleanup=(want != "completed"))
    except AssertionError as e:
        got = None
        failures.append(str(e))
    codes = env.stop_workers()
    if codes.get(wid) != 0:
        failures.append(f"{job_id}: the worker exited {codes.get(wid)} on SIGTERM")
    evs = check_events(env, job_id, failures)
    with open(os.path.join(env.tmp, f"{wid}.log"), errors="replace") as fh:
        log = fh.read()
    starts = [r for r in env.sim_get("/_sim/requests")["requests"]
              if r["path"].endswith("/backup/start") and (r.get("body") or {}).get("job_id") == job_id]
    if want == "completed":
        if got != "completed":
            failed = [e for e in evs if e["event"] == "backup.failed"]
            failures.append(f"{job_id}: {got}, want completed: "
                            + (f"{failed[0]['reason']}: {failed[0]['message']}" if failed else "no terminal event"))
        else:
            e2e.compare_images(env, job_id, evs, failures)
        if len(starts) != 1:
            failures.append(f"{job_id}: the simulator got {len(starts)} start requests (want 1)")
    else:
        failed = [e for e in evs if e["event"] == "backup.failed"]
        if got != "failed" or not failed:
            failures.append(f"{job_id}: {got}, want failed {want}")
        else:
            f = failed[0]
            if f["reason"] != want:
                failures.append(f"{job_id}: reason {f['reason']}, want {want} ({f['message']})")
            tls_lines = [x for x in log.splitlines() if job_id in x and TLS_ERROR.search(x)]
            if not TLS_ERROR.search(f["message"]) and not tls_lines:
                failures.append(f"{job_id}: no TLS error in the message ({f['message']!r}) nor in the log")
            print(f"     {job_id}: backup.failed {f['reason']}: {f['message']}")
        if starts:
            failures.append(f"{job_id}: the simulator received {len(starts)} start request(s): TLS did not refuse it")
    failures += [f"{job_id}: {x}" for x in leftovers(env)]
    return evs


def ca(env):
    return f"tls_ca_file = {env.pki}/ca.pem"


def case_right_ca(env, failures):
    env.start_sim("localhost")
    run_job(env, failures, "tls-right-ca", "completed", f"https://localhost:{env.sim_port}", [ca(env)])


def case_wrong_ca(env, failures):
    env.start_sim("localhost")
    run_job(env, failures, "tls-wrong-ca", "sna_unavailable", f"https://localhost:{env.sim_port}",
            [f"tls_ca_file = {env.pki}/other-ca.pem"])


def case_wrong_name(env, failures):
    env.start_sim("other")  # signed by the right CA, but for other.example
    run_job(env, failures, "tls-wrong-name", "sna_unavailable", f"https://localhost:{env.sim_port}", [ca(env)])


def case_wrong_name_ip(env, failures):
    env.start_sim("localhost")
    run_job(env, failures, "tls-wrong-name-ip", "sna_unavailable", f"https://127.0.0.1:{env.sim_port}", [ca(env)])


def case_client_cert(env, failures):
    env.start_sim("localhost", client_ca="ca")
    run_job(env, failures, "tls-client-cert", "completed", f"https://localhost:{env.sim_port}",
            [ca(env), f"tls_cert_file = {env.pki}/client.pem", f"tls_key_file = {env.pki}/client.key"])


def case_no_client_cert(env, failures):
    env.start_sim("localhost", client_ca="ca")
    run_job(env, failures, "tls-no-client-cert", "sna_unavailable", f"https://localhost:{env.sim_port}", [ca(env)])


def case_proxy_ignored(env, failures):
    trap = ProxyTrap()
    trap.start()
    try:
        penv = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
        for v in PROXY_VARS:
            penv[v] = f"http://127.0.0.1:{trap.port}"
        env.start_sim("localhost")
        run_job(env, failures, "tls-proxy-https", "completed", f"https://localhost:{env.sim_port}", [ca(env)],
                worker_env=penv)
        env.start_sim(None)
        run_job(env, failures, "tls-proxy-http", "completed", f"http://127.0.0.1:{env.sim_port}", [],
                worker_env=penv)
    finally:
        trap.close()
    if trap.hits:
        failures.append(f"the worker connected {trap.hits} time(s) to the proxy of its environment")


CASES = {"right_ca": case_right_ca, "wrong_ca": case_wrong_ca, "wrong_name": case_wrong_name,
         "wrong_name_ip": case_wrong_name_ip, "client_cert": case_client_cert,
         "no_client_cert": case_no_client_cert, "proxy_ignored": case_proxy_ignored}


def notes(results):
    if results.get("right_ca") is False and any(results.get(n) for n in ("wrong_ca", "wrong_name", "wrong_name_ip")):
        print("note: right_ca failed, so the refusals above prove nothing about sna.tls_ca_file")
    if results.get("client_cert") is False and results.get("no_client_cert"):
        print("note: client_cert failed, so no_client_cert proves nothing about sna.tls_cert_file")


if __name__ == "__main__":
    sys.exit(e2e.suite_main(Env, CASES, 12, workers=(), notes=notes))
