//! Hostile and broken peers against the real binary. After each: `/ping` answers, a
//! healthy subscriber still gets a fresh event, and the server's memory stays bounded.

mod common;

use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::CloseCode;

/// A subscriber that must keep working whatever the others do.
struct Healthy {
    ws: Ws,
    n: usize,
}

impl Healthy {
    fn new(server: &Server) -> Healthy {
        let mut ws = server.ws();
        ws.subscribe("healthy-repo", "healthy@x");
        Healthy { ws, n: 0 }
    }

    /// Posts a fresh event and checks it arrives; also checks /ping.
    fn check(&mut self, server: &Server) {
        server.assert_alive();
        self.n += 1;
        let commit = format!("fresh-{}", self.n);
        server.post(&repo_update("healthy-repo", &commit));
        // Pings may have been queued meanwhile; recv answers them.
        let m = self.ws.recv().expect("healthy subscriber still served");
        assert_eq!(m["content"]["commit_id"], commit.as_str());
    }
}

/// RSS growth allowed over a whole abuse test.
const MEMORY_BOUND_KB: u64 = 16 * 1024;

fn assert_memory_bounded(server: &Server, before_kb: u64) {
    let now = server.rss_kb();
    assert!(
        now < before_kb + MEMORY_BOUND_KB,
        "RSS grew from {before_kb} KiB to {now} KiB"
    );
}

/// Reads until the server closes; returns the Close frame's code if one came first.
fn close_code(raw: &mut RawWs) -> Option<u16> {
    let mut code = None;
    while let Some((b0, p)) = raw.frame() {
        if b0 & 0x0f == 0x8 {
            code = p.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
        }
    }
    code
}

/// Something a hostile client does on a fresh websocket.
type Abuse = Box<dyn Fn(&mut RawWs)>;

#[test]
fn websocket_framing_abuse_closes_only_the_offender() {
    let server = Server::start("max_message_bytes = 4096");
    let mut healthy = Healthy::new(&server);
    let before = server.rss_kb();
    let cases: Vec<(&str, Abuse, Option<u16>)> = vec![
        (
            "unmasked frame",
            Box::new(|r: &mut RawWs| {
                r.s.write_all(&[0x81, 0x02, b'{', b'}']).unwrap();
            }),
            Some(1002),
        ),
        (
            "frame header claiming 64 MiB",
            Box::new(|r: &mut RawWs| {
                let mut f = vec![0x82, 0x80 | 127];
                f.extend_from_slice(&(64u64 << 20).to_be_bytes());
                f.extend_from_slice(&[1, 2, 3, 4]);
                r.s.write_all(&f).unwrap();
            }),
            Some(1009),
        ),
        (
            "frame header claiming 2^63 bytes",
            Box::new(|r: &mut RawWs| {
                let mut f = vec![0x82, 0x80 | 127];
                f.extend_from_slice(&(1u64 << 63).to_be_bytes());
                f.extend_from_slice(&[1, 2, 3, 4]);
                r.s.write_all(&f).unwrap();
            }),
            None, // RFC 6455: the most significant bit must be 0; any refusal is fine.
        ),
        (
            "reserved bit RSV1",
            Box::new(|r: &mut RawWs| r.send_raw(0x80 | 0x40 | 0x1, b"{}")),
            Some(1002),
        ),
        (
            "reserved data opcode 0x3",
            Box::new(|r: &mut RawWs| r.send_raw(0x80 | 0x3, b"{}")),
            Some(1002),
        ),
        (
            "reserved control opcode 0xB",
            Box::new(|r: &mut RawWs| r.send_raw(0x80 | 0xB, b"")),
            Some(1002),
        ),
        (
            "invalid UTF-8 text",
            Box::new(|r: &mut RawWs| r.send(0x1, b"{\"type\":\"\xff\"}")),
            Some(1007),
        ),
        (
            "message over max_message_bytes",
            Box::new(|r: &mut RawWs| r.send(0x1, &[b' '; 5000])),
            Some(1009),
        ),
        (
            "fragments adding up over max_message_bytes",
            Box::new(|r: &mut RawWs| {
                r.send_raw(0x1, &[b' '; 3000]);
                r.send_raw(0x0, &[b' '; 3000]);
            }),
            Some(1009),
        ),
        (
            "continuation without a start",
            Box::new(|r: &mut RawWs| r.send_raw(0x80, b"{}")),
            Some(1002),
        ),
        (
            "fragmented ping",
            Box::new(|r: &mut RawWs| r.send_raw(0x9, b"")),
            Some(1002),
        ),
        (
            "ping over 125 bytes",
            Box::new(|r: &mut RawWs| r.send(0x9, &[0; 126])),
            Some(1002),
        ),
    ];
    for (what, abuse, want) in cases {
        let mut raw = RawWs::connect(&server);
        abuse(&mut raw);
        let code = close_code(&mut raw);
        if want.is_some() {
            assert_eq!(code, want, "{what}");
        }
        healthy.check(&server);
    }
    assert_memory_bounded(&server, before);
}

#[test]
fn fragmented_messages_within_limits_are_assembled() {
    let server = Server::start("");
    let mut raw = RawWs::connect(&server);
    let t = client_token("frag", "u", unix_now() + 60);
    let msg = json!({"type": "subscribe", "content": {"repos": [{"id": "frag", "jwt_token": t}, {"id": "probe", "jwt_token": "x"}]}}).to_string();
    let (a, b) = msg.as_bytes().split_at(msg.len() / 2);
    raw.send_raw(0x1, a); // text, not final
    raw.send(0x9, b"mid"); // a control frame between fragments is allowed
    raw.send_raw(0x80, b); // final continuation
    let (b0, p) = raw.frame().unwrap();
    assert_eq!((b0, p.as_slice()), (0x8A, &b"mid"[..]), "pong first");
    let (_, p) = raw.data_frame().unwrap();
    assert!(String::from_utf8(p).unwrap().contains("\"probe\""));
    server.post(&repo_update("frag", "ok"));
    let (_, p) = raw.data_frame().unwrap();
    assert!(String::from_utf8(p).unwrap().contains("\"ok\""));
}

#[test]
fn a_thousand_bad_tokens_in_one_subscribe() {
    let server = Server::start("");
    let mut healthy = Healthy::new(&server);
    let before = server.rss_kb();
    let mut a = server.ws();
    let ids: Vec<String> = (0..1000).map(|i| format!("bad-{i}")).collect();
    let pairs: Vec<(&str, &str)> = ids.iter().map(|id| (id.as_str(), "not-a-token")).collect();
    a.subscribe_many(&pairs);
    for id in &ids {
        assert_eq!(
            a.recv().unwrap(),
            json!({"type": "jwt-expired", "content": {"repo_id": id}})
        );
    }
    healthy.check(&server);
    assert_memory_bounded(&server, before);
}

#[test]
fn too_many_subscriptions_close_with_policy_violation() {
    let server = Server::start("max_repos_per_connection = 10");
    let mut healthy = Healthy::new(&server);
    let mut a = server.ws();
    let exp = unix_now() + 60;
    let tokens: Vec<(String, String)> = (0..11)
        .map(|i| (format!("r{i}"), client_token(&format!("r{i}"), "u", exp)))
        .collect();
    let pairs: Vec<(&str, &str)> = tokens.iter().take(10).map(|(r, t)| (r.as_str(), t.as_str())).collect();
    a.subscribe_many(&pairs);
    a.sync();
    // Re-subscribing to one it has is fine; the eleventh library is not.
    a.subscribe_many(&pairs[..1]);
    let (r, t) = &tokens[10];
    a.subscribe_many(&[(r.as_str(), t.as_str())]);
    let frame = a.recv_close().expect("close frame");
    assert_eq!(frame.code, CloseCode::Policy);
    assert!(server.logs.wait_for("max_repos_per_connection", DEADLINE).is_some());
    healthy.check(&server);
}

#[test]
fn many_pipelined_messages_are_all_handled_with_a_small_wakeup_budget() {
    // One message per wake-up: the rest must still be handled without a new edge.
    let server = Server::start("max_messages_per_wakeup = 1");
    let mut raw = RawWs::connect(&server);
    let mut burst = Vec::new();
    for i in 0..200 {
        let m =
            json!({"type": "subscribe", "content": {"repos": [{"id": format!("b{i}"), "jwt_token": "x"}]}}).to_string();
        let mask = [1u8, 2, 3, 4];
        burst.push(0x81);
        burst.push(0x80 | 126);
        burst.extend_from_slice(&(m.len() as u16).to_be_bytes());
        burst.extend_from_slice(&mask);
        burst.extend(m.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    }
    raw.s.write_all(&burst).unwrap();
    for i in 0..200 {
        let (_, p) = raw.data_frame().expect("every message answered");
        assert!(String::from_utf8(p).unwrap().contains(&format!("\"b{i}\"")));
    }
}

#[test]
fn an_unanswered_close_is_cut_after_close_timeout() {
    let server = Server::start("close_timeout = 0.5\npong_timeout = 30");
    let mut raw = RawWs::connect(&server);
    raw.send(0x1, b"not json");
    let started = Instant::now();
    // Read the Close frame but never answer it.
    let (b0, _) = raw.frame().unwrap();
    assert_eq!(b0, 0x88);
    let mut buf = [0u8; 64];
    let eof = matches!(raw.s.read(&mut buf), Ok(0) | Err(_));
    assert!(eof);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "cut after {took:?}"
    );
    assert!(server.logs.wait_for("close handshake", DEADLINE).is_some());
}

#[test]
fn http_abuse_closes_only_the_offender() {
    let server = Server::start("http_head_timeout = 0.5");
    let mut healthy = Healthy::new(&server);
    let before = server.rss_kb();
    // 100 KB of headers: 431.
    let big = format!("GET /ping HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(100_000));
    let mut s = connect(server.addr);
    let _ = s.write_all(big.as_bytes());
    let r = read_response(&mut s, false).unwrap();
    assert_eq!(r.status, 431);
    healthy.check(&server);
    // A 20 MB body: 413 from the head alone.
    let mut s = connect(server.addr);
    s.write_all(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 20000000\r\n\r\n")
        .unwrap();
    let r = read_response(&mut s, false).unwrap();
    assert_eq!(r.status, 413);
    healthy.check(&server);
    // Malformed request lines: 400.
    for line in [
        "GET\r\n\r\n",
        "GET / HTTP/9.9\r\n\r\n",
        "\x00\x01\x02\r\n\r\n",
        "GET /ping HTTP/1.1\nbroken header\r\n\r\n",
    ] {
        let mut s = connect(server.addr);
        s.write_all(line.as_bytes()).unwrap();
        let r = read_response(&mut s, false).unwrap_or_else(|| panic!("no answer to {line:?}"));
        assert_eq!(r.status, 400, "{line:?}");
        assert!(closed_by_server(&mut s));
    }
    healthy.check(&server);
    // Truncated bodies held open: dropped at the request deadline.
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut s = connect(server.addr);
        s.write_all(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"type\":")
            .unwrap();
        held.push(s);
    }
    for s in &mut held {
        let started = Instant::now();
        assert!(closed_by_server(s));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    healthy.check(&server);
    assert_memory_bounded(&server, before);
}

#[test]
fn rapid_connect_disconnect_leaves_nothing_behind() {
    let server = Server::start("");
    let mut healthy = Healthy::new(&server);
    // Warm up allocator pools before measuring.
    for _ in 0..200 {
        drop(TcpStream::connect(server.addr).unwrap());
    }
    healthy.check(&server);
    let before = server.rss_kb();
    for i in 0..1500 {
        match i % 4 {
            0 => drop(TcpStream::connect(server.addr).unwrap()),
            1 => {
                let mut ws = server.ws();
                let _ = ws.ws.close(None);
                let _ = ws.ws.flush();
            }
            2 => {
                // Reset: SO_LINGER 0 makes close() send RST.
                let s = TcpStream::connect(server.addr).unwrap();
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                use std::os::fd::AsRawFd;
                unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        &linger as *const libc::linger as *const libc::c_void,
                        std::mem::size_of::<libc::linger>() as libc::socklen_t,
                    );
                }
                drop(s);
            }
            _ => {
                let mut s = TcpStream::connect(server.addr).unwrap();
                let _ = s.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n");
            }
        }
    }
    healthy.check(&server);
    // Every one of them is gone (the metrics-free way: the debug log counts closes).
    let deadline = Instant::now() + DEADLINE;
    while server.logs.all().iter().filter(|l| l.contains("] closed ")).count() < 1700 {
        assert!(Instant::now() < deadline, "connections left open");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        server.rss_kb() < before + 4 * 1024,
        "RSS grew from {before} to {} KiB",
        server.rss_kb()
    );
}

#[test]
fn connection_cap_pauses_accept_and_resumes() {
    let server = Server::start("max_connections = 4");
    let mut healthy = Healthy::new(&server);
    let mut others: Vec<Ws> = (0..3).map(|_| server.ws()).collect();
    // Subscribed clients: a websocket subscribed to nothing would give its slot up.
    for (i, o) in others.iter_mut().enumerate() {
        o.subscribe(&format!("cap-{i}"), "u@x");
    }
    // The fifth waits in the kernel's backlog: no answer while the cap holds.
    let mut fifth = connect(server.addr);
    fifth.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    fifth.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 16];
    assert!(fifth.read(&mut buf).is_err(), "answered beyond max_connections");
    assert!(server.logs.wait_for("at max_connections (4)", DEADLINE).is_some());
    drop(others.pop());
    fifth.set_read_timeout(Some(DEADLINE)).unwrap();
    let r = read_response(&mut fifth, false).expect("answered once a slot freed");
    assert_eq!(r.status, 200);
    drop(fifth);
    drop(others);
    // Wait until the slots are free again before the healthy check opens connections.
    let deadline = Instant::now() + DEADLINE;
    while server.logs.all().iter().filter(|l| l.contains("] closed ")).count() < 3 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    healthy.check(&server);
}

#[test]
fn running_out_of_descriptors_pauses_accept_logs_once_and_resumes() {
    // 64 descriptors: a few are the server's own (listener, epoll, signals, waker, std).
    let server = Server::start_limited("max_connections = 10000", 64);
    let mut healthy = Healthy::new(&server);
    let mut hogs: Vec<TcpStream> = Vec::new();
    for _ in 0..80 {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n").unwrap(); // an unfinished head
        hogs.push(s);
    }
    assert!(server.logs.wait_for("cannot accept", DEADLINE).is_some());
    // Free descriptors: the unfinished heads time out or we close them.
    hogs.clear();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut s = connect(server.addr);
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        s.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        if read_response(&mut s, false).is_some_and(|r| r.status == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "accept never resumed");
    }
    let warnings = server.logs.all().iter().filter(|l| l.contains("cannot accept")).count();
    assert_eq!(warnings, 1, "EMFILE logged once, not once per retry");
    healthy.check(&server);
}
