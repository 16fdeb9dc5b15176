#!/usr/bin/env python3
"""Protocol-level readiness probes for the services Keel's tests use.

usage: probe.py zookeeper PORT | amqp PORT | kafka PORT | redis PORT

Exits 0 when the service on 127.0.0.1:PORT answers its own protocol correctly,
1 otherwise (with the reason on stderr). Never probes any address but 127.0.0.1.
"""

import socket
import struct
import sys

HOST = "127.0.0.1"
TIMEOUT = 2.0


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return buf


def recv_all(sock):
    buf = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return buf
        buf += chunk


def zookeeper(port):
    # `srvr` answers "Mode: standalone|leader|follower" only while the server is serving
    # (a member without quorum says "This ZooKeeper instance is not currently serving requests").
    with socket.create_connection((HOST, port), TIMEOUT) as s:
        s.settimeout(TIMEOUT)
        s.sendall(b"srvr")
        reply = recv_all(s).decode("utf-8", "replace")
    for line in reply.splitlines():
        if line.startswith("Mode:"):
            return line.split(":", 1)[1].strip()
    raise RuntimeError("not serving: %r" % reply.strip()[:120])


def amqp(port):
    # AMQP 0-9-1 protocol header; a broker answers with a connection.start method frame
    # (frame type 1, channel 0, class 10, method 10).
    with socket.create_connection((HOST, port), TIMEOUT) as s:
        s.settimeout(TIMEOUT)
        s.sendall(b"AMQP\x00\x00\x09\x01")
        header = recv_exact(s, 7)
        ftype, channel, size = struct.unpack(">BHI", header)
        payload = recv_exact(s, min(size, 4))
    if ftype != 1 or channel != 0 or payload[:4] != b"\x00\x0a\x00\x0a":
        raise RuntimeError("unexpected AMQP reply frame type=%d channel=%d" % (ftype, channel))
    return "connection.start"


def kafka(port):
    # ApiVersions v0 request; a broker answers with the same correlation id and error 0.
    client_id = b"keel-probe"
    body = struct.pack(">hhih", 18, 0, 0x4B45454C, len(client_id)) + client_id
    with socket.create_connection((HOST, port), TIMEOUT) as s:
        s.settimeout(TIMEOUT)
        s.sendall(struct.pack(">i", len(body)) + body)
        (size,) = struct.unpack(">i", recv_exact(s, 4))
        reply = recv_exact(s, size)
    correlation, error = struct.unpack(">ih", reply[:6])
    if correlation != 0x4B45454C or error != 0:
        raise RuntimeError("ApiVersions: correlation=%x error=%d" % (correlation, error))
    (count,) = struct.unpack(">i", reply[6:10])
    # Metadata v0 for all topics: needs the broker's storage. tansu can answer ApiVersions while
    # its storage task is dead (after an internal panic); it then fails everything else.
    body = struct.pack(">hhih", 3, 0, 0x4B45454D, len(client_id)) + client_id + struct.pack(">i", 0)
    with socket.create_connection((HOST, port), TIMEOUT) as s:
        s.settimeout(TIMEOUT)
        s.sendall(struct.pack(">i", len(body)) + body)
        (size,) = struct.unpack(">i", recv_exact(s, 4))
        reply = recv_exact(s, size)
    (correlation, brokers) = struct.unpack(">ii", reply[:8])
    if correlation != 0x4B45454D or brokers < 1:
        raise RuntimeError("Metadata: correlation=%x brokers=%d" % (correlation, brokers))
    return "ApiVersions: %d APIs, Metadata ok" % count


def redis(port):
    with socket.create_connection((HOST, port), TIMEOUT) as s:
        s.settimeout(TIMEOUT)
        s.sendall(b"PING\r\n")
        reply = s.recv(64)
    if not reply.startswith(b"+PONG"):
        raise RuntimeError("unexpected reply %r" % reply)
    return "PONG"


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("zookeeper", "amqp", "kafka", "redis"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        what = globals()[sys.argv[1]](int(sys.argv[2]))
    except Exception as e:  # noqa: BLE001 - any failure means "not ready"
        print("%s on %s:%s: %s" % (sys.argv[1], HOST, sys.argv[2], e), file=sys.stderr)
        return 1
    print(what)
    return 0


if __name__ == "__main__":
    sys.exit(main())
