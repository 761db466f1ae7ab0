#!/usr/bin/python3
"""freeze_rpcs.py [PORT]: how long a healthy node of a RabbitMQ cluster holds each method of a
link's restore while another node, the quorum leader, is frozen (SIGSTOP).

Starts a private 3-node cluster (scripts/broker cluster, AMQP ports PORT..PORT+2, default
31000) in a temporary directory, declares a quorum queue whose leader is node 1, freezes node 1,
then, from a client on node 2, times exchange.declare, queue.declare (passive and not),
queue.bind, basic.qos and basic.consume, three rounds; thaws node 1 and stops the cluster
(also on failure). Prints one line per method. Not part of ctest: it asserts nothing; it is the
measurement behind the README's "Nor does a cluster that holds the restore" (why a link sends
binds and consumes without waiting). About 2 minutes.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pika

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BROKER = os.path.join(ROOT, "scripts", "broker")
ARGS = {"x-queue-type": "quorum"}


def timed(label, f):
    start = time.monotonic()
    try:
        f()
        out = "ok"
    except Exception as e:  # a method's failure is a figure too
        out = f"error {e!r}"
    print(f"{label:<24} {time.monotonic() - start:6.2f} s  {out}", flush=True)


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 31000
    d = tempfile.mkdtemp(prefix="bw-freeze-")
    frozen = False
    try:
        subprocess.run([BROKER, "cluster", "start", d, "3", str(port)], check=True)
        conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
        ch = conn.channel()
        ch.exchange_declare("freeze.x", "direct", durable=True)
        ch.queue_declare("freeze.q", durable=True, arguments=ARGS)
        conn.close()
        time.sleep(3)
        print(subprocess.run([BROKER, "ctl", d + "/node1", "list_queues", "name", "leader"],
                             capture_output=True, text=True).stdout, flush=True)
        subprocess.run([BROKER, "cluster", "node", "freeze", d, "1"], check=True)
        frozen = True
        t0 = time.monotonic()
        for i in range(3):
            conn = pika.BlockingConnection(pika.ConnectionParameters(
                "127.0.0.1", port + 1, socket_timeout=30, blocked_connection_timeout=30))
            ch = conn.channel()
            print(f"--- round {i}, {time.monotonic() - t0:.1f} s after the freeze", flush=True)
            timed("exchange.declare", lambda: ch.exchange_declare("freeze.x", "direct", durable=True))
            timed("queue.declare passive", lambda: ch.queue_declare("freeze.q", passive=True))
            timed("queue.declare", lambda: ch.queue_declare("freeze.q", durable=True, arguments=ARGS))
            timed("queue.bind", lambda: ch.queue_bind("freeze.q", "freeze.x", "k"))
            timed("basic.qos", lambda: ch.basic_qos(prefetch_count=4))
            timed("basic.consume", lambda: ch.basic_consume("freeze.q", lambda *a: None, consumer_tag=f"t{i}"))
            conn.close()
    finally:
        if frozen:
            subprocess.run([BROKER, "cluster", "node", "thaw", d, "1"])
        subprocess.run([BROKER, "cluster", "stop", d])
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
