//! Operations against the real binary: Prometheus metrics, systemd's notify protocol on a
//! fake `$NOTIFY_SOCKET`, SIGHUP reload.

mod common;

use common::*;
use serde_json::json;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

fn scrape(addr: &str) -> String {
    let r = request(
        addr.parse().unwrap(),
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    r.text()
}

#[test]
fn metrics_are_scraped_from_their_own_listener_only() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let server = Server::start(&format!("metrics_listen = {metrics_addr}"));
    let mut a = server.ws();
    a.subscribe("r1", "u");
    server.post(&repo_update("r1", "c"));
    a.recv().unwrap();
    let bad = post_event(server.addr, "{}", Some("Token nope"));
    assert_eq!(bad.status, 400);
    let text = scrape(&metrics_addr);
    assert_eq!(
        metric_value(&text, "notification_connections{state=\"websocket\"}"),
        1.0
    );
    assert_eq!(metric_value(&text, "notification_subscriptions"), 1.0);
    assert_eq!(metric_value(&text, "notification_repos"), 1.0);
    assert_eq!(
        metric_value(&text, "notification_events_received_total{type=\"repo-update\"}"),
        1.0
    );
    assert_eq!(metric_value(&text, "notification_deliveries_total"), 1.0);
    assert_eq!(
        metric_value(
            &text,
            "notification_token_rejections_total{token=\"event\",cause=\"malformed\"}"
        ),
        1.0
    );
    // The sync probe of `subscribe` is a refused client token.
    assert_eq!(
        metric_value(
            &text,
            "notification_token_rejections_total{token=\"client\",cause=\"malformed\"}"
        ),
        1.0
    );
    assert!(metric_value(&text, "notification_loop_turn_seconds_count") > 0.0);
    assert!(metric_value(&text, "process_resident_memory_bytes") > 0.0);
    // Closes are counted by reason.
    drop(a);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let text = scrape(&metrics_addr);
        // The sender's HTTP connection may be counted as peer_closed first (a loaded
        // machine can read its FIN late), so wait for the websocket's own close too.
        if text.contains("notification_closes_total{reason=\"peer_closed\"}")
            && metric_value(&text, "notification_connections{state=\"websocket\"}") == 0.0
        {
            break;
        }
        assert!(Instant::now() < deadline, "close never counted:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Never on the public listener, and nothing public on the metrics one.
    let r = request(
        server.addr,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 404);
    let r = request(
        metrics_addr.parse().unwrap(),
        b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 404);
}

/// A fake systemd: a datagram socket the server's notifications arrive on.
struct FakeSystemd {
    socket: UnixDatagram,
    path: String,
    _dir: TempDir,
}

impl FakeSystemd {
    fn new() -> FakeSystemd {
        let dir = TempDir::new();
        let path = dir.path().join("notify").display().to_string();
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(DEADLINE)).unwrap();
        FakeSystemd {
            socket,
            path,
            _dir: dir,
        }
    }

    /// The next message that starts with `prefix`, skipping others (watchdog pets).
    fn expect(&self, prefix: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        let mut buf = [0u8; 1024];
        while Instant::now() < deadline {
            let n = self.socket.recv(&mut buf).expect("no notification in time");
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.starts_with(prefix) {
                return msg;
            }
        }
        panic!("no {prefix} notification");
    }
}

#[test]
fn systemd_ready_watchdog_reloading_stopping() {
    let systemd = FakeSystemd::new();
    let dir = TempDir::new();
    std::fs::write(dir.path().join("seafile.conf"), config_text("")).unwrap();
    let mut server = Server::start_in(
        dir,
        &["-l", "-"],
        &[("NOTIFY_SOCKET", &systemd.path), ("WATCHDOG_USEC", "400000")],
    );
    assert_eq!(systemd.expect("READY=1"), "READY=1\nSTATUS=Serving");
    // The loop pets the watchdog every half period.
    let started = Instant::now();
    for _ in 0..3 {
        assert_eq!(systemd.expect("WATCHDOG=1"), "WATCHDOG=1");
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "watchdog too slow: {:?}",
        started.elapsed()
    );
    server.signal(libc::SIGHUP);
    assert!(systemd.expect("RELOADING=1").contains("\nMONOTONIC_USEC="));
    systemd.expect("READY=1");
    server.signal(libc::SIGTERM);
    systemd.expect("STOPPING=1");
    assert_eq!(server.wait_exit(DEADLINE), Some(0));
}

#[test]
fn sighup_reloads_key_and_level_and_keeps_connections() {
    let server = Server::start("log_level = info");
    let conf = server.dir.path().join("seafile.conf");
    let mut a = server.ws();
    a.subscribe("r", "u");
    // A bad new config is refused and the running one kept.
    std::fs::write(&conf, config_text("port = nope")).unwrap();
    server.signal(libc::SIGHUP);
    let line = server.logs.wait_for("reload refused", DEADLINE).expect("refused");
    assert!(line.contains("port"), "{line}");
    server.post(&repo_update("r", "still"));
    assert_eq!(a.recv().unwrap()["content"]["commit_id"], "still");
    // A new key and level.
    let old_token = event_token();
    let text = config_text("")
        .replace(KEY, "a-brand-new-key")
        .replace("log_level = debug", "log_level = warn");
    std::fs::write(&conf, text).unwrap();
    server.signal(libc::SIGHUP);
    assert!(server.logs.wait_for("configuration reloaded", DEADLINE).is_some());
    let new_token = sign_with(
        jsonwebtoken::Algorithm::HS256,
        &json!({"exp": unix_now() + 60}),
        b"a-brand-new-key",
    );
    let body = repo_update("r", "new-key").to_string();
    assert_eq!(
        post_event(server.addr, &body, Some(&format!("Token {new_token}"))).status,
        200
    );
    assert_eq!(a.recv().unwrap()["content"]["commit_id"], "new-key");
    // The old key still works during the grace period.
    let body = repo_update("r", "old-key").to_string();
    assert_eq!(
        post_event(server.addr, &body, Some(&format!("Token {old_token}"))).status,
        200
    );
    assert_eq!(a.recv().unwrap()["content"]["commit_id"], "old-key");
    // A wrong key is still refused.
    let wrong = sign_with(
        jsonwebtoken::Algorithm::HS256,
        &json!({"exp": unix_now() + 60}),
        b"wrong",
    );
    assert_eq!(
        post_event(server.addr, &body, Some(&format!("Token {wrong}"))).status,
        400
    );
    // The level took effect: debug lines (a websocket accepted) are gone.
    let before = server.logs.all().len();
    let mut b = server.ws();
    b.sync();
    server.post(&repo_update("r", "after"));
    assert_eq!(a.recv().unwrap()["content"]["commit_id"], "after");
    let after = server.logs.all();
    assert!(
        after[before..].iter().all(|l| !l.contains("[DEBUG]")),
        "{:#?}",
        &after[before..]
    );
}

#[test]
fn events_allow_refuses_other_networks() {
    let server = Server::start("events_allow = 10.0.0.0/8, fd00::/8");
    let mut a = server.ws();
    a.subscribe("r", "u");
    let body = repo_update("r", "x").to_string();
    let r = post_event(server.addr, &body, Some(&format!("Token {}", event_token())));
    assert_eq!(
        (r.status, r.text().as_str()),
        (403, "events are not accepted from this address\n")
    );
    let allowed = Server::start("events_allow = 127.0.0.0/8");
    let mut b = allowed.ws();
    b.subscribe("r", "u");
    allowed.post(&repo_update("r", "allowed"));
    assert_eq!(b.recv().unwrap()["content"]["commit_id"], "allowed");
    // The refused event delivered nothing: the next thing `a` sees is its sync answer.
    a.sync();
}

#[test]
fn key_from_a_file_is_read_at_start_and_on_reload() {
    let dir = TempDir::new();
    let key_file = dir.path().join("jwt.key");
    std::fs::write(&key_file, "file-key-1\n").unwrap();
    let conf = config_text(&format!("jwt_private_key_file = {}", key_file.display()));
    std::fs::write(dir.path().join("seafile.conf"), conf).unwrap();
    let server = Server::start_in(dir, &["-l", "-"], &[]);
    let token = |key: &[u8]| sign_with(jsonwebtoken::Algorithm::HS256, &json!({"exp": unix_now() + 60}), key);
    let body = repo_update("r", "x").to_string();
    assert_eq!(
        post_event(server.addr, &body, Some(&format!("Token {}", token(b"file-key-1")))).status,
        200
    );
    assert_eq!(
        post_event(server.addr, &body, Some(&format!("Token {}", token(KEY.as_bytes())))).status,
        400
    );
    std::fs::write(&key_file, "file-key-2").unwrap();
    server.signal(libc::SIGHUP);
    assert!(server.logs.wait_for("configuration reloaded", DEADLINE).is_some());
    assert_eq!(
        post_event(server.addr, &body, Some(&format!("Token {}", token(b"file-key-2")))).status,
        200
    );
}

#[test]
fn journald_gets_syslog_priorities_and_refused_upgrades_are_visible_at_info() {
    let dir = TempDir::new();
    std::fs::write(
        dir.path().join("seafile.conf"),
        config_text("").replace("log_level = debug", "log_level = info"),
    )
    .unwrap();
    let server = Server::start_in(dir, &["-l", "-"], &[("JOURNAL_STREAM", "8:1234")]);
    assert!(server.logs.wait_for("<6>[", DEADLINE).is_some());
    let r = request(
        server.addr,
        b"GET /notification HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 400);
    let line = server
        .logs
        .wait_for("refused websocket upgrade", DEADLINE)
        .expect("logged at info");
    assert!(
        line.starts_with("<6>[") && line.contains("Upgrade and Connection headers"),
        "{line}"
    );
}
