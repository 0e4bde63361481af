#!/usr/bin/env python3
"""Smoke test of a notification-server, with nothing but the Python standard library.

Start a binary (under an emulator when it is foreign) and check it end to end:

    packaging/smoke.py --run qemu-aarch64-static -L /usr/aarch64-linux-gnu target/dist/notification-server-0.1.0-arm64

or check a server that is already running (the container test does this):

    packaging/smoke.py --addr 127.0.0.1:8083 --key "$JWT_PRIVATE_KEY"

Checks, each with a deadline: GET /ping answers 200 {"ret": "pong"}; a websocket
subscribes to a library with a client token; a repo-update event POSTed to /events with a
sender token comes out of that websocket, content intact. With --run it also sends SIGTERM
and checks the drain: the websocket gets Close 1001, the server logs "shutdown complete"
and exits 0. Exits non-zero with a FAIL line on the first failure.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid

KEY = "EXAMPLE-ONLY-smoke-key#;="
DEADLINE = 30.0  # seconds for any one step; emulated binaries are slow to start


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def ok(msg):
    print(f"ok: {msg}")


def jwt(claims, key):
    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(key.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def http(addr, method, path, body=b"", headers=None):
    """One request on its own connection; returns (status, body)."""
    host, port = addr
    with socket.create_connection((host, port), timeout=DEADLINE) as s:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close",
                 f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.") else 0
    return status, rest


class Websocket:
    """A minimal RFC 6455 client: text frames out (masked), frames in."""

    def __init__(self, addr):
        self.sock = socket.create_connection(addr, timeout=DEADLINE)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (f"GET / HTTP/1.1\r\nHost: {addr[0]}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                fail("connection closed during the websocket handshake")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            fail(f"websocket upgrade refused: {head!r}")
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        if b"Sec-WebSocket-Accept: " + accept not in head:
            fail(f"bad Sec-WebSocket-Accept in {head!r}")

    def send(self, opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        else:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _read(self, n, deadline):
        while len(self.buf) < n:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            if not chunk:
                return None
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self, deadline):
        """The next data or close frame as (opcode, payload); answers pings; None on
        timeout or end of stream."""
        while True:
            head = self._read(2, deadline)
            if head is None:
                return None
            opcode, n = head[0] & 0x0F, head[1] & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2, deadline))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8, deadline))[0]
            payload = self._read(n, deadline) if n else b""
            if payload is None:
                return None
            if opcode == 0x9:  # ping: answer, as a client must
                self.send(0xA, payload)
                continue
            if opcode == 0xA:  # pong
                return opcode, payload
            return opcode, payload


def check(addr, key, repo):
    status, body = http(addr, "GET", "/ping")
    if status != 200 or body != b'{"ret": "pong"}\n':
        fail(f"/ping answered {status} {body!r}")
    ok(f"/ping answers 200 {body!r}")

    ws = Websocket(addr)
    ok("websocket upgraded")
    token = jwt({"repo_id": repo, "username": "smoke@example.com", "exp": int(time.time()) + 600}, key)
    ws.send(0x1, json.dumps({"type": "subscribe", "content": {"repos": [{"id": repo, "jwt_token": token}]}}).encode())
    # The server handles one connection's frames in order: the pong to this ping means
    # the subscription is in place (a bad token would have sent jwt-expired first).
    ws.send(0x9, b"after-subscribe")
    deadline = time.monotonic() + DEADLINE
    while True:
        frame = ws.recv(deadline)
        if frame is None:
            fail("no pong after the subscription")
        if frame == (0xA, b"after-subscribe"):
            break
        if frame[0] == 0x1:
            fail(f"unexpected message after subscribing: {frame[1]!r}")
    ok(f"subscribed to {repo}")

    commit = hashlib.sha1(repo.encode()).hexdigest()
    event = {"type": "repo-update", "content": {"repo_id": repo, "commit_id": commit}}
    sender = jwt({"exp": int(time.time()) + 300}, key)
    status, body = http(addr, "POST", "/events", json.dumps(event).encode(),
                        {"Authorization": f"Token {sender}", "Content-Type": "application/json"})
    if status != 200:
        fail(f"POST /events answered {status} {body!r}")
    ok("POST /events answers 200")
    deadline = time.monotonic() + DEADLINE
    while True:
        frame = ws.recv(deadline)
        if frame is None:
            fail("the event did not arrive on the websocket")
        if frame[0] == 0x1:
            got = json.loads(frame[1])
            if got != event:
                fail(f"delivered {got}, expected {event}")
            break
    ok("the event arrived on the websocket")
    return ws


def run(cmd):
    conf = tempfile.mkdtemp(prefix="smoke-")
    with open(os.path.join(conf, "seafile.conf"), "w") as f:
        f.write("[notification]\nhost = 127.0.0.1\nport = 0\nlog_level = debug\n")
    log_path = os.path.join(conf, "server.log")
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith(("NOTIFICATION_SERVER_", "SEAFILE_")) or k == "JWT_PRIVATE_KEY")}
    env["JWT_PRIVATE_KEY"] = KEY
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd + ["-c", conf, "-l", "-"], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, env=env)
    try:
        deadline = time.monotonic() + DEADLINE
        addr = None
        while addr is None:
            with open(log_path) as f:
                m = re.search(r"listening on (\S+):(\d+)", f.read())
            if m:
                addr = (m.group(1), int(m.group(2)))
            elif proc.poll() is not None:
                fail(f"the server exited {proc.returncode} at start:\n{open(log_path).read()}")
            elif time.monotonic() > deadline:
                fail(f"no 'listening on' line within {DEADLINE} s:\n{open(log_path).read()}")
            else:
                time.sleep(0.05)
        ok(f"started: {' '.join(cmd)}, listening on {addr[0]}:{addr[1]}")
        ws = check(addr, KEY, str(uuid.uuid4()))

        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + DEADLINE
        while True:
            frame = ws.recv(deadline)
            if frame is None:
                fail("no Close frame after SIGTERM")
            if frame[0] == 0x8:
                code = struct.unpack("!H", frame[1][:2])[0] if len(frame[1]) >= 2 else None
                if code != 1001:
                    fail(f"Close code {code} after SIGTERM, expected 1001")
                ws.send(0x8, frame[1][:2])
                break
        ok("SIGTERM: the websocket got Close 1001")
        try:
            rc = proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            fail("the server did not exit after SIGTERM")
        log = open(log_path).read()
        if rc != 0:
            fail(f"the server exited {rc} after SIGTERM:\n{log}")
        if "shutdown complete" not in log:
            fail(f"no 'shutdown complete' in the log:\n{log}")
        ok("drained and exited 0")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for name in os.listdir(conf):
            os.unlink(os.path.join(conf, name))
        os.rmdir(conf)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--run", nargs=argparse.REMAINDER, help="command that runs the binary (the rest of the line)")
    group.add_argument("--addr", help="HOST:PORT of a running server")
    ap.add_argument("--key", help="its JWT key (with --addr)")
    args = ap.parse_args()
    if args.run:
        run(args.run)
    else:
        if not args.key:
            fail("--addr needs --key")
        host, _, port = args.addr.rpartition(":")
        check((host, int(port)), args.key, str(uuid.uuid4()))
    print("PASS")


if __name__ == "__main__":
    main()
