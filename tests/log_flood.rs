//! The log against hostile input, as the bytes the server writes: a flood of connections
//! that each misbehave grows it by a bounded amount (peer-caused lines are rate-limited
//! per kind, with a line counting what was suppressed); a value from input cannot start a
//! line of its own; an overlong value is cut. See `src/logsafe.rs`.

mod common;

use common::*;
use notification_server::logsafe::{
    BURST, LIFECYCLE_BURST, LIFECYCLE_PER_SECOND, MAX_LOGGED_VALUE, PER_SECOND, max_lines,
};
use serde_json::json;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

/// No line the server writes is longer than this (a few cut values plus fixed text).
const MAX_LINE_BYTES: usize = 1024;

/// A proxy-style `X-Forwarded-For` of exactly `len` bytes, as long as the head cap allows.
fn long_forwarded_for(len: usize) -> String {
    let mut v = "10.0.0.1, ".repeat(len / 10);
    v.truncate(len - 3);
    v.push_str("255");
    v
}

/// The bytes written so far: every line and its newline.
fn log_bytes(server: &Server) -> usize {
    server.logs.all().iter().map(|l| l.len() + 1).sum()
}

/// Upgrades with an 8 KB-class `X-Forwarded-For`, then sends an unmasked frame (which a
/// client must never do): the server closes with a protocol error. Waits for the close.
fn upgrade_then_unmasked_frame(addr: SocketAddr, forwarded_for: &str) {
    let mut s = connect(addr);
    let head = format!(
        "GET /notification HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Forwarded-For: {forwarded_for}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    let r = read_response(&mut s, true).expect("upgrade answered");
    assert_eq!(r.status, 101);
    s.write_all(&[0x81, 5, b'h', b'e', b'l', b'l', b'o']).unwrap();
    assert!(closed_by_server(&mut s), "an unmasked frame must end the connection");
}

/// A request line of pseudo-random bytes (no CR or LF), ended as a head: refused with 400.
fn malformed_request(addr: SocketAddr, seed: &mut u64) {
    let mut junk = Vec::with_capacity(300);
    for _ in 0..300 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let b = (*seed >> 24) as u8;
        if b != b'\r' && b != b'\n' {
            junk.push(b);
        }
    }
    junk.extend_from_slice(b"\r\n\r\n");
    let mut s = connect(addr);
    // The server may refuse before reading it all; a reset then is fine.
    let _ = s.write_all(&junk);
    let mut buf = [0u8; 512];
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
}

#[test]
fn a_flood_of_misbehaving_connections_grows_the_log_by_a_bounded_amount() {
    let server = Server::start("log_level = info");
    let forwarded_for = long_forwarded_for(7800);
    let addr = server.addr;
    let before = log_bytes(&server);
    let started = Instant::now();
    const PER_THREAD: usize = 150;
    let workers: Vec<_> = (0..4u64)
        .map(|t| {
            let forwarded_for = forwarded_for.clone();
            std::thread::spawn(move || {
                let mut seed = 0x9e37_79b9_7f4a_7c15 ^ t;
                for _ in 0..PER_THREAD {
                    if t % 2 == 0 {
                        upgrade_then_unmasked_frame(addr, &forwarded_for);
                    } else {
                        malformed_request(addr, &mut seed);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    // The flood is over; what it had suppressed is counted within a second or so.
    let summary = server.logs.wait_for("more such lines suppressed", DEADLINE);
    let elapsed = started.elapsed().as_secs() + 1;
    let lines = server.logs.all();
    let grown = log_bytes(&server) - before;
    let protocol = lines.iter().filter(|l| l.contains(": protocol error:")).count() as u64;
    let bad = lines.iter().filter(|l| l.contains(": bad request:")).count() as u64;
    let bound = max_lines(elapsed, log::Level::Info) as usize * MAX_LINE_BYTES;
    eprintln!(
        "{grown} log bytes in {elapsed} s (bound {bound}); {protocol} protocol-error and {bad} bad-request lines"
    );
    assert!(
        grown <= bound,
        "{} misbehaving connections in {elapsed} s grew the log by {grown} bytes (bound {bound})",
        4 * PER_THREAD
    );
    let per_kind = BURST + PER_SECOND * elapsed + 1;
    assert!(protocol <= per_kind, "{protocol} protocol-error lines in {elapsed} s");
    assert!(bad <= per_kind, "{bad} bad-request lines in {elapsed} s");
    let longest = lines.iter().map(|l| l.len()).max().unwrap_or(0);
    assert!(longest <= MAX_LINE_BYTES, "a line of {longest} bytes");
    assert!(summary.is_some(), "no line counts the suppressed ones");
    server.assert_alive();
}

#[test]
fn a_repo_id_cannot_forge_a_log_line() {
    // At debug, the level the deployment guide has admins set to see subscriptions.
    let server = Server::start("");
    let forged = "[2026-12-06 00:00:00] [ERROR] forged";
    let repo = format!("r\n{forged}\r\u{2028}\u{202e}");
    let mut ws = server.ws();
    // Refused (a bad token), then subscribed and unsubscribed (a valid one): three lines.
    ws.subscribe_many(&[(&repo, "bad")]);
    let m = ws.recv().expect("jwt-expired for the bad token");
    assert_eq!(m["type"], "jwt-expired");
    ws.subscribe(&repo, "mallory@x");
    ws.send_json(&json!({"type": "unsubscribe", "content": {"repos": [{"id": repo}]}}));
    ws.sync();
    let escaped = "r\\n[2026-12-06 00:00:00] [ERROR] forged\\r\\u{2028}\\u{202e}";
    for needle in ["refused (", "subscribed to", "unsubscribed from"] {
        let line = server
            .logs
            .wait_for(needle, DEADLINE)
            .unwrap_or_else(|| panic!("no {needle:?} line"));
        assert!(line.contains(escaped), "{line:?}");
    }
    let lines = server.logs.all();
    assert!(
        lines.iter().all(|l| !l.contains(forged) || l.contains(escaped)),
        "a forged line: {lines:#?}"
    );
    assert!(lines.iter().all(|l| !l.contains('\u{2028}') && !l.contains('\u{202e}')));
}

#[test]
fn an_overlong_forwarded_for_is_cut_in_every_line() {
    let server = Server::start("");
    let forwarded_for = long_forwarded_for(7800);
    let mut s = connect(server.addr);
    let head = format!(
        "GET /notification HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Forwarded-For: {forwarded_for}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    assert_eq!(read_response(&mut s, true).unwrap().status, 101);
    drop(s);
    let shown = &forwarded_for[..MAX_LOGGED_VALUE];
    let marker = format!("{shown}[... {} more bytes] (via 127.0.0.1:", 7800 - MAX_LOGGED_VALUE);
    for needle in ["is a websocket", "closed websocket connection"] {
        let line = server
            .logs
            .wait_for(needle, DEADLINE)
            .unwrap_or_else(|| panic!("no {needle:?} line"));
        let start: String = line.chars().take(300).collect();
        assert!(
            line.len() <= MAX_LINE_BYTES,
            "a line of {} bytes: {start}...",
            line.len()
        );
        assert!(line.contains(&marker), "{line}");
    }
}

#[test]
fn at_debug_a_flood_of_connections_is_logged_within_the_lifecycle_rate() {
    // Debug (the test default) writes every connection's accept and close, as the
    // deployment guide promises, up to a rate far above a real server's churn.
    let server = Server::start("");
    let addr = server.addr;
    let started = Instant::now();
    // 15,000 connections opened and dropped: two lifecycle lines each, 30,000 in all,
    // past the burst of 20,000.
    let workers: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..3_750 {
                    drop(std::net::TcpStream::connect(addr).unwrap());
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let summary = server.logs.wait_for("connection lifecycle lines:", DEADLINE);
    let elapsed = started.elapsed().as_secs() + 1;
    let lifecycle = server
        .logs
        .all()
        .iter()
        .filter(|l| l.contains("[DEBUG] connection ") || l.contains("[DEBUG] closed "))
        .count() as u64;
    eprintln!("{lifecycle} lifecycle lines in {elapsed} s");
    assert!(
        lifecycle <= LIFECYCLE_BURST + LIFECYCLE_PER_SECOND * elapsed + 1,
        "{lifecycle} lifecycle lines in {elapsed} s"
    );
    assert!(summary.is_some(), "no line counts the suppressed lifecycle lines");
    server.assert_alive();
}
