#!/usr/bin/python3
"""scn_broker.py: chaos scenarios of the broker (issue 16): a node stopped and started again,
`rabbitmqctl close_all_connections`, the node frozen (SIGSTOP of its beam by PID) past twice
the heartbeat then thawed, a memory alarm and a disk alarm under load, and one node of a
3-node cluster SIGKILLed. Each while a stream of jobs runs through one host of two bw-worker
processes (real qemu-nbd, the SNA simulator copying at a set rate so that jobs are in flight
when the fault hits); the publisher confirms every backup.start, the collector reads every
event from its own quorum queue. No confirmed job lost, no duplicate start, no contradicting
terminal events (tests/fleet/checker.py), nothing leaked.

Usage: /usr/bin/python3 tests/chaos/scn_broker.py BW_WORKER BW_CTL [--quick] [NAME...]
  runs the scenarios alone (as tests/chaos/chaos.py does) and prints the chaos table.
  Exit codes: 0 nothing lost, leaked or unexpected; 1 otherwise; 2 usage."""
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import io_env  # noqa: E402
from io_env import MiB, fleet  # noqa: E402

HEARTBEAT_S = 2           # the workers' amqp.heartbeat_s: a frozen node is found in seconds
FREEZE_S = 2 * HEARTBEAT_S + 2
CONF = {"amqp.heartbeat_s": HEARTBEAT_S, "sna.poll_interval_s": 1, "worker.shutdown_grace_s": 10,
        "worker.recovery_interval_s": 2}
JOBS = {True: 6, False: 12}     # per trial (quick, full)
RATE = 2.0                      # jobs per second
FAULT_AT = 2                    # the fault starts before this job is published
SLOW = {"slow_bytes_per_s": 2 * MiB}   # a 4 MiB disk transfers for 2 s
WAIT_S = int(os.environ.get("BW_CHAOS_BROKER_WAIT_S", 180))   # every confirmed job has ended by then
ALARM_S = 4                     # how long an alarm holds
RESTART_DOWN_S = 2              # a stopped node stays down this long
MIX_JOBS, MIX_RATE = 4, 4.0     # broker_mix: a short stream per fault
MEMORY_WATERMARK = "0.4"        # RabbitMQ's default
DISK_FREE_LIMIT = "50000000"    # RabbitMQ's default (50 MB)
RECONNECT = ("restart", "closeconns", "freeze")   # faults every worker connection must survive by reconnecting
NODE_DOWN_S = 10                # a killed cluster node is started again after this


def stream(rig, ctx, tag, vm, fault, result, n=None, rate=RATE, reconnect=False):
    """Publishes JOBS jobs at RATE per second; fault() runs in a thread from job FAULT_AT on.
    Waits until every confirmed job ended; returns the ids published before the fault's end.
    reconnect: the fault must make the workers connect again (else it did not reach them)."""
    box = {}
    ids = []

    def body():
        try:
            box["t0"] = time.time()
            box["ended_before"] = set(rig.terminal())
            box["note"] = fault()
        except Exception as e:  # noqa: BLE001 - reported as a failure of the scenario
            box["error"] = f"{type(e).__name__}: {e}"
        finally:
            box["t1"] = time.time()
    th = threading.Thread(target=body, daemon=True)
    n = n or JOBS[ctx.quick]
    t0 = time.time()
    for i in range(n):
        if i == FAULT_AT:
            th.start()
            time.sleep(0.3)
        delay = t0 + i / rate - time.time()
        if delay > 0:
            time.sleep(delay)
        m = rig.msg(f"{tag}-{i}", vm)
        ids.append(m["job_id"])
        rig.send(m, SLOW)
    th.join(300)
    rig.publisher.close()
    if "error" in box:
        result["failures"].append(f"{tag}: the fault failed: {box['error']}")
    if box.get("note"):
        result["notes"].append(f"{tag}: {box['note']}")
    # in flight when the fault hit: published before it ended, no terminal event when it began
    ended_before = box.get("ended_before", set())
    confirmed = [j for j in ids if j in rig.published]
    left = rig.wait_terminal(WAIT_S, confirmed)
    rig.wait_cleanup(confirmed, 30)
    for jid in sorted(left):
        result["failures"].append(f"{jid}: confirmed, and no terminal event {WAIT_S} s after")
    moved = sum(1 for h in rig.hosts for p in h.proxies for c in p.connects if c >= box.get("t0", 0))
    result["notes"].append(f"{tag}: {moved} worker connection(s) to the broker opened after the fault began")
    if reconnect and moved == 0:
        result["failures"].append(f"{tag}: no worker connected again after the fault: it did not reach them")
    times = {j: rig.publish_times.get(j, 0) for j in confirmed}
    hit = [j for j in confirmed if times[j] <= box.get("t1", 0) and j not in ended_before]
    done = rig.terminal(hit)
    result["recovered"] += len(done)
    outcomes = rig.terminal(confirmed)
    failed = {j: (rig.failed_event(j) or {}).get("reason") for j, o in outcomes.items() if o == "failed"}
    result["notes"].append(f"{tag}: {len(confirmed)} confirmed of {len(ids)}, "
                           f"{list(outcomes.values()).count('completed')} completed, failed {failed}; "
                           f"fault {box.get('t1', 0) - box.get('t0', 0):.1f} s")
    return ids


def broker_scenario(ctx, trials, tag, fault_of, cluster=False, mix=None):
    """trials streams, each with the fault fault_of(broker, rig, trial) returns (a callable);
    mix: [(tag, fault_of)] instead: each trial one short stream per fault, on one broker."""
    result = io_env.new_result()
    if trials == 0:
        result["notes"].append(f"{tag}: not run (0 trials)")
        return result
    broker = fleet.Cluster(3) if cluster else io_env.Broker(os.path.join(ctx.tmp, "broker"))
    rig = None
    try:
        rig = io_env.Rig(ctx, broker, tag)
        host = rig.add_host(workers=2, max_jobs=4, ports=40, conf=dict(CONF))
        host.start()
        late = host.wait_healthy(60)  # a fault must hit connections that are up
        if late:
            result["failures"].append(f"workers {late} not healthy 60 s after their start")
        vm = rig.vm("a", {2000: 4 * MiB, 2001: MiB}, seed=31)
        for t in range(trials):
            ctx.log(f"{tag} trial {t + 1}")
            if mix:
                for name, f in mix:
                    ctx.log(f"{tag} trial {t + 1}: {name}")
                    stream(rig, ctx, f"t{t}-{name}", vm, f(broker, rig, t), result, n=MIX_JOBS, rate=MIX_RATE,
                           reconnect=name in RECONNECT)
            else:
                stream(rig, ctx, f"t{t}", vm, fault_of(broker, rig, t), result, reconnect=tag in RECONNECT)
            for wid, p in host.workers.items():
                if p.poll() is not None:
                    result["failures"].append(f"{wid} died during trial {t + 1} (exit {p.returncode})")
                    host.start(wid)
            result["trials"] += 1
    except BaseException:
        if rig is not None:
            rig.abort()
        broker.close()
        raise
    try:
        rig.finish(result)
    finally:
        broker.close()
    return result


def restart_of(broker, rig, t):
    return lambda: f"restarted in {broker.restart(RESTART_DOWN_S):.1f} s"


def run_broker_restart(ctx, trials):
    """The node stopped (SIGTERM, as an operator would), RESTART_DOWN_S down, started again."""
    return broker_scenario(ctx, trials, "restart", restart_of)


def close_conns_of(broker, rig, t):
    def fault():
        rc, out = broker.ctl("close_all_connections", "chaos test")
        if rc != 0:
            raise RuntimeError(f"close_all_connections: {out[-200:]}")
        return out.splitlines()[-1] if out else ""
    return fault


def run_broker_close_conns(ctx, trials):
    """rabbitmqctl close_all_connections: every client (workers, publisher, collector) cut."""
    return broker_scenario(ctx, trials, "closeconns", close_conns_of)


def freeze_of(broker, rig, t):
    def fault():
        pid = broker.beam_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(FREEZE_S)
        finally:
            os.kill(pid, signal.SIGCONT)
        return f"beam {pid} frozen {FREEZE_S} s (heartbeat {HEARTBEAT_S} s)"
    return fault


def run_broker_freeze(ctx, trials):
    """The node's beam SIGSTOPped for 2x the workers' heartbeat + 2 s, then SIGCONT."""
    return broker_scenario(ctx, trials, "freeze", freeze_of)


def alarms_of(broker, rig, t):
    def fault():
        steps = [("set_vm_memory_high_watermark", "0.0001"), ("set_vm_memory_high_watermark", MEMORY_WATERMARK),
                 ("set_disk_free_limit", "1000000000000000"), ("set_disk_free_limit", DISK_FREE_LIMIT)]
        seen = []
        for i, (cmd, arg) in enumerate(steps):
            rc, out = broker.ctl(cmd, arg)
            if rc != 0:
                raise RuntimeError(f"{cmd} {arg}: {out[-200:]}")
            if i % 2 == 0:
                time.sleep(ALARM_S)
                rc, out = broker.ctl("-q", "eval", "rabbit_alarm:get_alarms().")
                seen.append(out.replace("\n", " ")[:120])
        return f"alarms while held: {seen}"
    return fault


def run_broker_alarms(ctx, trials):
    """A memory alarm (set_vm_memory_high_watermark 0.0001) held ALARM_S, then a disk alarm
    (set_disk_free_limit 1 PB) held ALARM_S, each undone; publishers block meanwhile."""
    return broker_scenario(ctx, trials, "alarms", alarms_of)


def run_broker_mix(ctx, trials):
    """--quick: the four single-node faults of the scenarios above, each under a short stream,
    one after the other on one broker (one broker start instead of four)."""
    mix = [("closeconns", close_conns_of), ("freeze", freeze_of), ("alarms", alarms_of),
           ("restart", restart_of)]
    return broker_scenario(ctx, trials, "mix", None, mix=mix)


def run_broker_node_lost(ctx, trials):
    """A 3-node cluster; one node (the leader of backup.start) SIGKILLed and left down."""
    def fault_of(cluster, rig, t):
        def fault():
            node = cluster.leader() or 1
            rig.collector.move_off(node - 1)
            rig.publisher.move_off(node - 1)
            took, out = cluster.node("kill", node)
            time.sleep(NODE_DOWN_S)
            took2, out2 = cluster.node("start", node)
            return (f"node {node} killed ({took:.1f} s), {NODE_DOWN_S} s down, started again ({took2:.1f} s): "
                    f"{out2.splitlines()[-1] if out2 else ''}")
        return fault
    if trials and not fleet.cluster_available()[0]:
        r = io_env.new_result()
        r["failures"].append("scripts/broker has no cluster command")
        return r
    return broker_scenario(ctx, trials, "nodelost", fault_of, cluster=True)


SCENARIOS = [
    ("broker_mix", run_broker_mix, 1, 0),
    ("broker_restart", run_broker_restart, 0, 3),
    ("broker_close_conns", run_broker_close_conns, 0, 3),
    ("broker_freeze", run_broker_freeze, 0, 3),
    ("broker_alarms", run_broker_alarms, 0, 3),
    ("broker_node_lost", run_broker_node_lost, 0, 1),
]

if __name__ == "__main__":
    sys.exit(io_env.standalone(SCENARIOS, sys.argv))
