#!/usr/bin/env python3
"""Writes the seed inputs of every fuzz target to fuzz/seeds/<target>/.

Seeds are real requests from Seafile's senders (seaf-server through libcurl, the Go
fileserver, seahub through python-requests), real client messages and event bodies, and
tokens signed with the fuzz key b"k" that are valid at the harness's NOW. The byte layout
of each target's input is documented on its function in fuzz/src/lib.rs.

Run from anywhere: python3 fuzz/make_seeds.py (it rewrites the seeds directory).
"""

import base64
import hashlib
import hmac
import json
import os
import shutil
import struct

KEY = b"k"
NOW = 1_800_000_000
EXP = NOW + 3600
REPO = "9e5bd4b5-0e8a-4b7d-8a35-3e3c1c7b7f5a"
UPGRADE_KEY = "dGhlIHNhbXBsZSBub25jZQ=="

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = os.path.join(HERE, "seeds")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(claims: dict, alg: str = "HS256", key: bytes = KEY, header: bytes | None = None) -> str:
    header = header or json.dumps({"alg": alg, "typ": "JWT"}, separators=(",", ":")).encode()
    message = f"{b64(header)}.{b64(json.dumps(claims, separators=(',', ':')).encode())}"
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    return f"{message}.{b64(hmac.new(key, message.encode(), digest).digest())}"


# Event ("sender") tokens: seaf-server, Go fileserver 12+, Go fileserver 10/11.
SEAF_TOKEN = token({"exp": EXP})
GO12_TOKEN = token({"exp": EXP, "repo_id": REPO, "username": ""})
GO11_TOKEN = token({"Exp": EXP, "repo_id": REPO, "username": ""})
CLIENT_TOKEN = token({"exp": EXP, "repo_id": REPO, "username": "alice@example.com"})

EVENTS = {
    "repo_update": {"type": "repo-update", "content": {"repo_id": REPO, "commit_id": "f" * 40}},
    "file_lock": {
        "type": "file-lock-changed",
        "content": {"repo_id": REPO, "path": "/a.docx", "change_event": "locked", "lock_user": "bob@example.com"},
    },
    "folder_perm_user": {
        "type": "folder-perm-changed",
        "content": {"repo_id": REPO, "path": "/d", "type": "user", "change_event": "add",
                    "user": "alice@example.com", "group": -1, "perm": "rw"},
    },
    "folder_perm_group": {
        "type": "folder-perm-changed",
        "content": {"repo_id": REPO, "path": "/d", "type": "group", "change_event": "modify",
                    "user": "", "group": 7, "perm": "r"},
    },
}


def event_json(name: str, compact: bool = True) -> bytes:
    sep = (",", ":") if compact else (", ", ": ")
    return json.dumps(EVENTS[name], separators=sep).encode()


# seahub writes Python's default json.dumps spacing.
COMMENT_UPDATE = (
    '{"type": "comment-update", "content": {"repo_id": "%s", "type": "comment_updated", '
    '"file_uuid": "0b7a6c1e-7c4d-4b8e-9a1c-2f5a3e6d7c8b", "file_path": "/notes.md"}}' % REPO
).encode()


def seaf_server_post(body: bytes, tok: str = SEAF_TOKEN) -> bytes:
    """libcurl from seaf-server (it adds Expect: 100-continue above 1 KiB)."""
    expect = b"Expect: 100-continue\r\n" if len(body) > 1024 else b""
    return (
        b"POST /events HTTP/1.1\r\nHost: 127.0.0.1:8083\r\nAccept: */*\r\n"
        + f"Authorization: Token {tok}\r\n".encode()
        + b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n".encode()
        + expect
        + b"\r\n"
        + body
    )


def go_fileserver_post(body: bytes, header: str = "Authorization: Token " + GO12_TOKEN) -> bytes:
    return (
        b"POST /events HTTP/1.1\r\nHost: 127.0.0.1:8083\r\nUser-Agent: Go-http-client/1.1\r\n"
        + f"Content-Length: {len(body)}\r\n{header}\r\n".encode()
        + b"Accept-Encoding: gzip\r\n\r\n"
        + body
    )


def seahub_post(body: bytes) -> bytes:
    return (
        b"POST /events HTTP/1.1\r\nHost: 127.0.0.1:8083\r\nUser-Agent: python-requests/2.31.0\r\n"
        b"Accept-Encoding: gzip, deflate\r\nAccept: */*\r\nConnection: keep-alive\r\n"
        + f"Authorization: Token {SEAF_TOKEN}\r\n".encode()
        + f"Content-Length: {len(body)}\r\n".encode()
        + b"Content-Type: application/json\r\n\r\n"
        + body
    )


def upgrade(path: str = "/notification") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: seafile.example.com\r\nUser-Agent: Seafile/9.0\r\n"
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {UPGRADE_KEY}\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n"
    ).encode()


PING = b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1:8083\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n"
HEAD_PING = b"HEAD /notification/ping HTTP/1.0\r\n\r\n"


def frame(opcode: int, payload: bytes, mask: bytes = b"\0\0\0\0", fin: bool = True) -> bytes:
    """A client frame; the zero mask keeps the payload readable for the fuzzer."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = bytes([first, 0x80 | n])
    elif n < 65536:
        head = bytes([first, 0x80 | 126]) + struct.pack(">H", n)
    else:
        head = bytes([first, 0x80 | 127]) + struct.pack(">Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def subscribe(*repos) -> bytes:
    return json.dumps({"type": "subscribe", "content": {"repos": [{"id": r, "jwt_token": t} for r, t in repos]}},
                      separators=(",", ":")).encode()


SUBSCRIBE = subscribe((REPO, CLIENT_TOKEN))
SUBSCRIBE_BAD = subscribe((REPO, SEAF_TOKEN), ("other", CLIENT_TOKEN))
UNSUBSCRIBE = json.dumps({"type": "unsubscribe", "content": {"repos": [{"id": REPO}]}}).encode()
UNSUBSCRIBE_DRAFT = b'{"type":"unsubscribe","content":{"repos":["%s"]}}' % REPO.encode()

WS_SESSION = (
    frame(0x1, SUBSCRIBE)
    + frame(0x9, b"hi")
    + frame(0x1, SUBSCRIBE_BAD, mask=b"\x12\x34\x56\x78")
    + frame(0x2, UNSUBSCRIBE)
    + frame(0x1, UNSUBSCRIBE_DRAFT[:20], fin=False)
    + frame(0x0, UNSUBSCRIBE_DRAFT[20:])
    + frame(0xA, b"")
    + frame(0x8, struct.pack(">H", 1000) + b"bye")
)


def write(target: str, name: str, data: bytes) -> None:
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main() -> None:
    shutil.rmtree(SEEDS, ignore_errors=True)
    requests = {
        "seaf_server_repo_update": seaf_server_post(event_json("repo_update")),
        "seaf_server_big_expect": seaf_server_post(
            json.dumps({"type": "repo-update", "content": {"repo_id": REPO, "commit_id": "a" * 40,
                                                           "pad": "x" * 1100}}).encode()),
        "go_file_lock": go_fileserver_post(event_json("file_lock")),
        "go11_repo_token": go_fileserver_post(event_json("repo_update"), "Seafile-Repo-Token: " + GO11_TOKEN),
        "seahub_comment": seahub_post(COMMENT_UPDATE),
        "seahub_folder_perm": seahub_post(event_json("folder_perm_group", compact=False)),
        "ping": PING,
        "head_ping": HEAD_PING,
        "upgrade": upgrade(),
        "metrics": b"GET /metrics HTTP/1.1\r\nHost: localhost:9383\r\n\r\n",
    }

    # http_head: [max_head lo, hi, body selector] + bytes; 8192 / 64 KiB, the defaults.
    for name, req in requests.items():
        write("http_head", name, b"\x00\x20\x40" + req)
    write("http_head", "small_limits", b"\x00\x01\x05" + requests["go_file_lock"])

    # http_split: [sel, n_cuts, cuts...] + bytes.
    pipelined = PING + requests["seaf_server_repo_update"] + requests["seahub_comment"] + HEAD_PING
    write("http_split", "pipelined", bytes([0, 3, 9, 40, 200]) + pipelined)
    write("http_split", "expect_continue", bytes([0, 1, 250]) + requests["seaf_server_big_expect"])
    write("http_split", "upgrade", bytes([1, 2, 30, 3]) + upgrade() + frame(0x1, SUBSCRIBE))
    write("http_split", "go_keepalive", bytes([2, 1, 100]) + requests["go_file_lock"] + requests["go11_repo_token"])
    write("http_split", "metrics_listener", bytes([8, 1, 5]) + requests["metrics"] + PING)

    # conn: [sel, n_ctl, ctl...] + bytes. Control byte: chunk bits 0-2, room bits 3-4,
    # action bits 5-7 (1 send, 2 ping, 3 both, 5 big send, 7 close).
    write("conn", "ws_session", bytes([0x10, 3, 0x1f, 0x3c, 0x5e]) + upgrade() + WS_SESSION)
    write("conn", "ws_slow_reader", bytes([0x01, 2, 0x07, 0xa1]) + upgrade() + frame(0x1, SUBSCRIBE))
    write("conn", "events_pipelined", bytes([0x10, 2, 0x1e, 0x0b]) + requests["seaf_server_repo_update"]
          + requests["go_file_lock"] + requests["seahub_folder_perm"])
    write("conn", "expect_continue", bytes([0x00, 1, 0x1d]) + requests["seaf_server_big_expect"])
    write("conn", "ping_then_close", bytes([0x13, 0]) + PING + HEAD_PING)
    write("conn", "draining_upgrade", bytes([0x04, 0]) + upgrade())
    write("conn", "metrics_listener", bytes([0x08, 0]) + requests["metrics"])
    # 1,500 pipelined pings read in one go: their answers pass the 64 KiB output cap, and
    # must go on as the socket takes them, without a new readiness event; then the same
    # from a client that half-closes.
    pings = b"GET /ping HTTP/1.1\r\n\r\n" * 1500
    write("conn", "pipelined_past_output_cap", bytes([0x00, 1, 0x1f]) + pings)
    write("conn", "pipelined_past_output_cap_eof", bytes([0x10, 1, 0x1f]) + pings)

    # conn_ws: the harness sends the upgrade request; these are the client's frames.
    write("conn_ws", "session", bytes([0x10, 3, 0x1f, 0x3c, 0x5e]) + WS_SESSION)
    write("conn_ws", "subscribe_then_events", bytes([0x00, 2, 0x3f, 0x27]) + frame(0x1, SUBSCRIBE)
          + frame(0x9, b""))
    write("conn_ws", "small_limits", bytes([0x01, 2, 0x1f, 0xbf]) + frame(0x1, b"x" * 200) + frame(0x1, SUBSCRIBE))
    write("conn_ws", "close_first", bytes([0x02, 1, 0xff]) + frame(0x2, UNSUBSCRIBE) + frame(0x8, b"\x03\xe8"))

    # client_msg: frame payloads.
    for name, msg in {
        "subscribe": SUBSCRIBE,
        "subscribe_two": SUBSCRIBE_BAD,
        "unsubscribe": UNSUBSCRIBE,
        "unsubscribe_draft": UNSUBSCRIBE_DRAFT,
        "go_case": b'{"Type":"subscribe","Content":{"Repos":[{"ID":"r","JWT_Token":null}]}}',
        "null_content": b'{"type":"subscribe","content":null}',
    }.items():
        write("client_msg", name, msg)

    # event_body: /events bodies.
    for name in EVENTS:
        write("event_body", name, event_json(name))
    write("event_body", "comment_update", COMMENT_UPDATE)
    write("event_body", "spaced_nested", b'{ "type" : "repo-update" ,\n "content" : { "repo_id" : "r\\"1" ,'
          b' "x" : [ 1 , 2.5e3 , "a b" , { } ] } }')

    # token_raw: tokens as they arrive.
    for name, tok in {"seaf_server": SEAF_TOKEN, "go12": GO12_TOKEN, "go11": GO11_TOKEN,
                      "client": CLIENT_TOKEN, "hs512": token({"exp": EXP}, alg="HS512"),
                      "alg_none": b64(b'{"alg":"none"}') + "." + b64(b'{"exp":1900000000}') + "."}.items():
        write("token_raw", name, tok.encode())

    # token_signed: [mode] + claims (mode 0: HS256 standard header, now = NOW), or with
    # mode bit 2 the header, a newline, then the claims.
    for name, (mode, rest) in {
        "seaf_server": (0, b'{"exp":1800003600}'),
        "client": (0, b'{"exp":1800003600,"repo_id":"r1","username":"alice@example.com"}'),
        "go11_capital_exp": (1, b'{"Exp":1800003600,"repo_id":"r1","username":""}'),
        "nbf": (2, b'{"exp":1800003600,"nbf":1799999999.5}'),
        "raw_header": (4, b'{"alg":"HS256","typ":"JWT","kid":"x"}\n{"exp":1800003600}'),
        "rotated_grace": (64, b'{"exp":1800003600,"repo_id":"r1"}'),
    }.items():
        write("token_signed", name, bytes([mode]) + rest)

    # config_text: [sel] + seafile.conf (sel bit 7: NUL, then an environment value).
    write("config_text", "seafile10", b"\x00[fileserver]\nport = 8082\n\n[notification]\nenabled = true\n"
          b"host = 127.0.0.1\nport = 8083\nlog_level = info\njwt_private_key = M@O8VWUb81YvmtWLHGB2I_V7di5-@0p(MF*GrE!sIws23F\n")
    write("config_text", "limits", b"\x00[notification]\njwt_private_key = k#;\"q\"\nping_interval = 0.5\n"
          b"pong_timeout = 3\nmax_body_bytes = 1000\nmax_unsent_bytes = 2048\nmax_head_bytes = 256\n"
          b"ws_read_buffer_bytes = 16\ngroup_cache_ttl = 86400\n")
    write("config_text", "env_port", b"\x81[notification]\njwt_private_key=k\n\x009000")
    write("config_text", "env_key_only", b"\x83\x00k")

    # bus_message: Redis channel messages from another instance.
    def wire(name: str, to: dict) -> bytes:
        ev = EVENTS[name]
        frame = json.dumps(ev, separators=(",", ":")) + "\n"
        return json.dumps({"v": 1, "from": "seafile-2-4242-00c0ffee00c0ffee", "repo": ev["content"]["repo_id"],
                           "kind": ev["type"], "to": to, "frame": frame}, separators=(",", ":")).encode()

    write("bus_message", "all", wire("repo_update", {"all": True}))
    write("bus_message", "user", wire("folder_perm_user", {"user": "alice@example.com"}))
    write("bus_message", "members", wire("folder_perm_group", {"users": ["alice@example.com", "bob@example.com"]}))
    write("bus_message", "own", wire("file_lock", {"all": True}).replace(b"seafile-2-4242-00c0ffee00c0ffee",
                                                                         b"this-instance"))


if __name__ == "__main__":
    main()
