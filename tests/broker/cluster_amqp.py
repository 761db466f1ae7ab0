#!/usr/bin/python3
"""AMQP helper of tests/broker/test_cluster.sh (Debian's python3-pika).

  cluster_amqp.py declare URL QUEUE            declare a durable quorum queue
  cluster_amqp.py publish URL QUEUE COUNT TAG  publish COUNT persistent messages
                                               "TAG-i", each confirmed; prints
                                               the number confirmed
  cluster_amqp.py drain URL QUEUE TIMEOUT      get (and ack) every message of
                                               QUEUE, retrying the connection
                                               until TIMEOUT seconds; prints
                                               one body a line
  cluster_amqp.py unreachable URL SECONDS      exit 0 if no AMQP connection
                                               opens within SECONDS
"""
import sys
import time

import pika


def params(url, timeout=5):
    p = pika.URLParameters(url)
    p.socket_timeout = timeout
    p.blocked_connection_timeout = timeout
    p.connection_attempts = 1
    p.stack_timeout = timeout
    return p


def declare(url, queue):
    conn = pika.BlockingConnection(params(url))
    ch = conn.channel()
    ch.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    conn.close()


def publish(url, queue, count, tag):
    conn = pika.BlockingConnection(params(url, 10))
    ch = conn.channel()
    ch.confirm_delivery()
    confirmed = 0
    for i in range(count):
        # With confirms on, basic_publish returns once the broker confirmed
        # (raises on a nack or an unroutable mandatory message).
        ch.basic_publish("", queue, f"{tag}-{i}".encode(),
                         pika.BasicProperties(delivery_mode=2), mandatory=True)
        confirmed += 1
    conn.close()
    print(confirmed)


def drain(url, queue, timeout):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            conn = pika.BlockingConnection(params(url))
            ch = conn.channel()
            ch.queue_declare(queue, passive=True)
            bodies = []
            while True:
                method, _, body = ch.basic_get(queue, auto_ack=False)
                if method is None:
                    break
                bodies.append(body.decode())
                ch.basic_ack(method.delivery_tag)
            conn.close()
            print("\n".join(bodies))
            return 0
        except Exception as e:  # the queue may still be electing a leader
            last = e
            if time.monotonic() >= deadline:
                print(f"drain: giving up after {timeout}s: {last!r}", file=sys.stderr)
                return 1
            time.sleep(0.5)


def unreachable(url, seconds):
    try:
        conn = pika.BlockingConnection(params(url, seconds))
    except Exception:
        return 0
    conn.close()
    return 1


def main(argv):
    cmd = argv[1]
    if cmd == "declare":
        declare(argv[2], argv[3])
    elif cmd == "publish":
        publish(argv[2], argv[3], int(argv[4]), argv[5])
    elif cmd == "drain":
        return drain(argv[2], argv[3], float(argv[4]))
    elif cmd == "unreachable":
        return unreachable(argv[2], float(argv[3]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
