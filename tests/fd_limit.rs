//! The connection cap and the open-file limit: unless `max_connections` is set, the cap is
//! the limit the process has (its soft limit, raised to the hard one at start) minus the
//! descriptors the server keeps for itself, and it is crossed like a configured cap:
//! the connection beyond it waits in the backlog, unanswered, until one closes. Each
//! server runs under a lowered limit, as `ulimit -n` in the shell that starts it.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Descriptors the server keeps back from the derived cap (`config::RESERVED_DESCRIPTORS`).
const RESERVED: u64 = 64;

/// Opens `n` keep-alive connections, each answered once, so each holds a slot.
fn fill(server: &Server, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = connect(server.addr);
            s.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let r = read_response(&mut s, false).unwrap_or_else(|| panic!("connection {i} of {n} not answered"));
            assert_eq!(r.status, 200);
            s
        })
        .collect()
}

/// Asserts that `cap` connections are served and the next one is not until one of them
/// closes: the cap is exactly `cap`.
fn assert_cap_is(server: &Server, cap: usize) {
    let mut held = fill(server, cap);
    let mut next = connect(server.addr);
    next.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    next.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 16];
    assert!(next.read(&mut buf).is_err(), "answered beyond a cap of {cap}");
    let at_cap = format!("at max_connections ({cap})");
    assert!(server.logs.wait_for(&at_cap, DEADLINE).is_some(), "no {at_cap:?} line");
    assert!(
        !server.logs.contains("cannot accept"),
        "descriptors ran out before the cap"
    );
    drop(held.pop());
    next.set_read_timeout(Some(DEADLINE)).unwrap();
    let r = read_response(&mut next, false).expect("answered once a slot freed");
    assert_eq!(r.status, 200);
}

/// The soft and hard open-file limits of a running process, from /proc.
fn limits_of(pid: i32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let mut n = line.split_whitespace().filter_map(|w| w.parse::<u64>().ok());
    (n.next().unwrap(), n.next().unwrap())
}

#[test]
fn default_cap_is_the_descriptor_limit_minus_the_reserve_and_survives_a_reload() {
    raise_nofile();
    let server = Server::start_limited("", 256);
    let line = server
        .logs
        .wait_for("max_connections 192 (derived", DEADLINE)
        .unwrap_or_else(|| panic!("no derived cap line: {:#?}", server.logs.all()));
    assert!(line.contains("[INFO]"), "{line}");
    assert!(line.contains("open-file limit 256"), "{line}");
    // A reload re-derives the cap instead of falling back to a fixed default.
    server.signal(libc::SIGHUP);
    assert!(server.logs.wait_for("configuration reloaded", DEADLINE).is_some());
    assert_cap_is(&server, 192);
}

#[test]
fn soft_limit_is_raised_to_the_hard_limit_and_the_cap_follows() {
    raise_nofile();
    let mut ours = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut ours) };
    assert!(ours.rlim_max >= 512, "this test needs a hard limit of at least 512");
    let server = Server::start_with_nofile("", 128, 512);
    assert!(
        server
            .logs
            .wait_for("raised the open-file limit from 128 to the hard limit 512", DEADLINE)
            .is_some(),
        "{:#?}",
        server.logs.all()
    );
    assert_eq!(limits_of(server.pid()), (512, 512));
    let cap = 512 - RESERVED;
    assert!(
        server
            .logs
            .wait_for(&format!("max_connections {cap} (derived"), DEADLINE)
            .is_some()
    );
    assert_cap_is(&server, cap as usize);
}

#[test]
fn an_explicit_max_connections_wins_over_the_descriptor_limit() {
    raise_nofile();
    let server = Server::start_limited("max_connections = 5", 256);
    let line = server
        .logs
        .wait_for("max_connections 5 (set in the configuration", DEADLINE)
        .unwrap();
    assert!(line.contains("[INFO]") && line.contains("would allow 192"), "{line}");
    assert_cap_is(&server, 5);

    // Also through the environment (the Seafile 12+ way).
    let dir = TempDir::new();
    std::fs::write(dir.path().join("seafile.conf"), config_text("")).unwrap();
    let server = Server::start_in(dir, &["-l", "-"], &[("NOTIFICATION_SERVER_MAX_CONNECTIONS", "3")]);
    assert!(
        server
            .logs
            .wait_for("max_connections 3 (set in the configuration", DEADLINE)
            .is_some()
    );
    assert_cap_is(&server, 3);
}

#[test]
fn an_explicit_cap_beyond_the_descriptor_limit_is_kept_with_a_warning() {
    let server = Server::start_limited("max_connections = 1000", 128);
    let line = server
        .logs
        .wait_for("max_connections 1000 (set in the configuration)", DEADLINE)
        .unwrap();
    assert!(line.contains("[WARNING]"), "{line}");
    assert!(
        line.contains("open-file limit 128") && line.contains("raise LimitNOFILE"),
        "{line}"
    );
    server.assert_alive();
}
