//! Several real instances sharing events through a real `redis-server` (the Debian
//! package; `.ci/deps` installs it) that the tests start on a free loopback port.

mod common;
#[path = "common/redis.rs"]
mod redis_server;

use common::*;
use redis_server::Redis;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Starts `n` instances on one Redis, each with `extra` config, and waits until each is
/// subscribed to the channel.
fn cluster(redis: &Redis, n: usize, extra: &str) -> Vec<Server> {
    (0..n)
        .map(|_| {
            let s = Server::start(&format!("redis_url = {}\n{extra}", redis.url()));
            assert!(s.logs.wait_for("bus: subscribed to Redis channel", DEADLINE).is_some());
            s
        })
        .collect()
}

fn commit_of(m: &Value) -> String {
    let c = &m["content"];
    c["commit_id"]
        .as_str()
        .or_else(|| c["path"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Receives messages until `end`; returns the markers seen.
fn until_end(ws: &mut Ws) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let m = ws.recv().expect("message before the end marker");
        let c = commit_of(&m);
        let end = c == "end";
        got.push(c);
        if end {
            return got;
        }
    }
}

/// Posts `end` to every instance's own `/events`, so each subscriber's `end` proves that
/// everything before it on its instance was handled. The end markers do not cross
/// instances before the preceding events (Redis keeps one publisher's order).
fn post_end(origin: &Server) {
    origin.post(&repo_update("r", "end"));
}

#[test]
fn an_event_posted_to_one_instance_reaches_all_exactly_once() {
    let redis = Redis::start();
    let nodes = cluster(&redis, 3, "");
    let mut subs: Vec<Ws> = nodes
        .iter()
        .map(|n| {
            let mut ws = n.ws();
            ws.subscribe("r", "u");
            ws
        })
        .collect();
    nodes[0].post(&repo_update("r", "one"));
    nodes[0].post(&repo_update("other-repo", "x"));
    post_end(&nodes[0]);
    for ws in &mut subs {
        assert_eq!(until_end(ws), ["one", "end"]);
    }
    // And from another entry point.
    nodes[2].post(&repo_update("r", "two"));
    post_end(&nodes[2]);
    for ws in &mut subs {
        assert_eq!(until_end(ws), ["two", "end"]);
    }
}

#[test]
fn user_scoped_events_filter_on_every_instance() {
    let redis = Redis::start();
    let nodes = cluster(&redis, 2, "");
    let mut alice = nodes[1].ws();
    alice.subscribe("r", "alice@x");
    let mut bob = nodes[1].ws();
    bob.subscribe("r", "bob@x");
    let perm = json!({"type": "folder-perm-changed", "content": {"repo_id": "r", "path": "/for-alice", "type": "user",
        "change_event": "add", "user": "alice@x", "group": -1, "perm": "r"}});
    nodes[0].post(&perm);
    post_end(&nodes[0]);
    assert_eq!(until_end(&mut alice), ["/for-alice", "end"]);
    assert_eq!(until_end(&mut bob), ["end"]);
}

#[test]
fn a_group_event_is_looked_up_once_by_the_receiving_instance() {
    let redis = Redis::start();
    let dir = TempDir::new();
    let db_path = dir.path().join("groupmgr.db");
    let db = rusqlite::Connection::open(&db_path).unwrap();
    db.execute_batch(
        "CREATE TABLE GroupUser (group_id INTEGER, user_name VARCHAR(255), is_staff tinyint);
         INSERT INTO GroupUser VALUES (5, 'alice@x', 0);",
    )
    .unwrap();
    let nodes = cluster(&redis, 3, &format!("groupmgr_db = {}", db_path.display()));
    let mut alice = nodes[1].ws();
    alice.subscribe("r", "alice@x");
    let mut carol = nodes[2].ws();
    carol.subscribe("r", "carol@x");
    // The receiving instance has no subscriber of its own: it still resolves the group.
    let perm = json!({"type": "folder-perm-changed", "content": {"repo_id": "r", "path": "/g5", "type": "group",
        "change_event": "add", "user": "", "group": 5, "perm": "rw"}});
    nodes[0].post(&perm);
    post_end(&nodes[0]);
    assert_eq!(until_end(&mut alice), ["/g5", "end"]);
    assert_eq!(until_end(&mut carol), ["end"]);
    assert!(nodes[0].logs.contains("looking up members of group 5"));
    assert!(!nodes[1].logs.contains("looking up members of group"));
    assert!(!nodes[2].logs.contains("looking up members of group"));
}

#[test]
fn redis_down_means_local_delivery_and_recovery_needs_no_restart() {
    let mut redis = Redis::start();
    let nodes = cluster(&redis, 2, "");
    let mut a = nodes[0].ws();
    a.subscribe("r", "u");
    let mut b = nodes[1].ws();
    b.subscribe("r", "u");
    redis.stop();
    assert!(
        nodes[0]
            .logs
            .wait_for("bus: Redis subscription lost", DEADLINE)
            .is_some()
    );
    // Each instance still serves its own subscribers.
    nodes[0].post(&repo_update("r", "local-a"));
    assert_eq!(commit_of(&a.recv().unwrap()), "local-a");
    nodes[1].post(&repo_update("r", "local-b"));
    assert_eq!(commit_of(&b.recv().unwrap()), "local-b");
    nodes[0].assert_alive();
    // Past the outbox age, events from the outage are not replayed; the outage is long
    // enough here that what was queued is stale.
    // The clients stay connected through it, answering pings.
    for _ in 0..11 {
        a.idle(Duration::from_millis(500));
        b.idle(Duration::from_millis(500));
    }
    redis.run();
    for n in &nodes {
        let deadline = Instant::now() + Duration::from_secs(20);
        while n
            .logs
            .all()
            .iter()
            .filter(|l| l.contains("bus: subscribed to Redis channel"))
            .count()
            < 2
        {
            assert!(Instant::now() < deadline, "never resubscribed");
            a.idle(Duration::from_millis(50));
            b.idle(Duration::from_millis(50));
        }
    }
    nodes[0].post(&repo_update("r", "back"));
    post_end(&nodes[0]);
    assert_eq!(until_end(&mut a), ["back", "end"]);
    // b may see local-a only if it was replayed, which it must not be.
    assert_eq!(until_end(&mut b), ["back", "end"]);
}

#[test]
fn foreign_messages_on_the_channel_are_ignored() {
    let redis = Redis::start();
    let nodes = cluster(&redis, 1, "");
    let mut a = nodes[0].ws();
    a.subscribe("r", "u");
    for junk in ["hello", "{}", "{\"v\":1}", &"x".repeat(2_000_000)] {
        redis.publish_raw(junk);
    }
    // A well-formed message from a (pretend) other instance is delivered.
    let forged = json!({"v": 1, "from": "other", "repo": "r", "kind": "repo-update", "to": {"all": true},
        "frame": "{\"type\":\"repo-update\",\"content\":{\"repo_id\":\"r\",\"commit_id\":\"via-bus\"}}\n"});
    redis.publish_raw(&forged.to_string());
    assert_eq!(commit_of(&a.recv().unwrap()), "via-bus");
    assert!(nodes[0].logs.wait_for("bus: ignored a message", DEADLINE).is_some());
    nodes[0].assert_alive();
}

/// Lines of `server`'s log that contain `needle`.
fn log_lines(server: &Server, needle: &str) -> usize {
    server.logs.all().iter().filter(|l| l.contains(needle)).count()
}

fn scrape(addr: &str) -> String {
    let r = request(
        addr.parse().unwrap(),
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    r.text()
}

#[test]
fn a_publish_redis_refuses_is_dropped_and_counted_on_the_same_connection() {
    // A Redis user that may do everything but PUBLISH: each message's PUBLISH gets an
    // error reply. That is the message's failure, not the connection's: drop and count
    // it, keep the connection, warn once; no reconnecting in a loop.
    let redis = Redis::start();
    let _: String = redis.query(&["ACL", "SETUSER", "nopub", "on", ">pw", "~*", "&*", "+@all", "-publish"]);
    let url = format!("redis://nopub:pw@127.0.0.1:{}/", redis.port);
    let metrics = format!("127.0.0.1:{}", free_port());
    let node = Server::start(&format!("redis_url = {url}\nmetrics_listen = {metrics}"));
    assert!(
        node.logs
            .wait_for("bus: subscribed to Redis channel", DEADLINE)
            .is_some()
    );
    // Both bus connections (subscriber, publisher) are up before counting connections.
    let deadline = Instant::now() + DEADLINE;
    while {
        let clients: String = redis.query(&["CLIENT", "LIST"]);
        clients.lines().filter(|l| l.contains(" user=nopub ")).count() < 2
    } {
        assert!(Instant::now() < deadline, "the publisher never connected");
        std::thread::sleep(Duration::from_millis(20));
    }
    let connections = redis.stat("total_connections_received");
    // Connections since then, less the one that asks.
    let new_connections = || redis.stat("total_connections_received") - connections - 1;
    node.post(&repo_update("r", "one"));
    node.post(&repo_update("r", "two"));
    let started = Instant::now();
    // (0 while the sample is missing, so that a build without it fails below, not here.)
    let refused = |m: &str| {
        let text = scrape(m);
        if text.contains("notification_bus_refused_total ") {
            metric_value(&text, "notification_bus_refused_total")
        } else {
            0.0
        }
    };
    while refused(&metrics) < 2.0 {
        assert!(
            started.elapsed() < DEADLINE,
            "the refusals were never counted; meanwhile {} connections to Redis and {} warnings",
            new_connections(),
            log_lines(&node, "bus: ")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Long enough for a publisher that reconnects and retries in a loop to show it.
    std::thread::sleep(Duration::from_secs(1));
    let warnings: Vec<String> = node
        .logs
        .all()
        .into_iter()
        .filter(|l| l.contains("bus: ") && l.contains("publish"))
        .collect();
    assert_eq!(
        (new_connections(), warnings.len(), refused(&metrics)),
        (0, 1, 2.0),
        "new connections to Redis, warnings, refused messages: {warnings:?}"
    );
    assert!(
        warnings[0].contains("NOPERM") || warnings[0].contains("permission"),
        "the warning says why: {warnings:?}"
    );
    node.assert_alive();
}

/// A TCP proxy in front of Redis that loses the reply to the first `lose` PUBLISH
/// commands: it passes the command on (Redis publishes it) and closes the client's side
/// first, which is what a reply lost to a timeout or a broken connection looks like to
/// the publisher. It records when each PUBLISH passed.
struct LossyProxy {
    port: u16,
    publishes: Arc<Mutex<Vec<Instant>>>,
}

impl LossyProxy {
    fn start(redis_port: u16, lose: usize) -> LossyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let publishes = Arc::new(Mutex::new(Vec::new()));
        let seen = publishes.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let mut server = TcpStream::connect(("127.0.0.1", redis_port)).unwrap();
                let (mut from_server, mut to_client) = (server.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from_server, &mut to_client);
                    let _ = to_client.shutdown(Shutdown::Both);
                });
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    loop {
                        let n = match client.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let chunk = &buf[..n];
                        if chunk.windows(9).any(|w| w == b"\r\nPUBLISH") {
                            let mut seen = seen.lock().unwrap();
                            seen.push(Instant::now());
                            if seen.len() <= lose {
                                let _ = client.shutdown(Shutdown::Both);
                                let _ = server.write_all(chunk);
                                break;
                            }
                        }
                        if server.write_all(chunk).is_err() {
                            break;
                        }
                    }
                    let _ = server.shutdown(Shutdown::Write);
                });
            }
        });
        LossyProxy { port, publishes }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

#[test]
fn a_publish_whose_reply_is_lost_is_retried_after_a_backoff_and_delivered_once() {
    // The first three PUBLISHes of instance A are published but their replies lost: A
    // must take that as an I/O failure (reconnect, after a growing backoff) and send the
    // message again, and B must deliver it once, however often it came.
    let redis = Redis::start();
    let proxy = LossyProxy::start(redis.port, 3);
    let a = Server::start(&format!("redis_url = {}", proxy.url()));
    let b = cluster(&redis, 1, "").pop().unwrap();
    assert!(a.logs.wait_for("bus: subscribed to Redis channel", DEADLINE).is_some());
    let mut ws = b.ws();
    ws.subscribe("r", "u");
    a.post(&repo_update("r", "once"));
    post_end(&a);
    assert_eq!(until_end(&mut ws), ["once", "end"]);
    let publishes = proxy.publishes.lock().unwrap().clone();
    assert_eq!(publishes.len(), 5, "three lost, the retry that got through, then end");
    // Backoff: at least 50 + 100 + 200 ms before the three retries (jitter: 50-100%).
    let waited = publishes[3] - publishes[0];
    assert!(waited >= Duration::from_millis(300), "retried after only {waited:?}");
    assert_eq!(
        log_lines(&a, "bus: publishing to Redis failed"),
        1,
        "one warning for the episode: {:#?}",
        a.logs.all()
    );
}

#[test]
fn a_stopped_and_resumed_instance_keeps_its_subscription() {
    let redis = Redis::start();
    let nodes = cluster(&redis, 2, "");
    let mut sub = nodes[1].ws();
    sub.subscribe("r", "u");
    // SIGSTOP then SIGCONT (a debugger, a VM snapshot, a container paused): the
    // subscriber thread's blocking read with a timeout returns EINTR on resume, which
    // used to be taken for a lost connection, and events were lost while it reconnected.
    nodes[1].signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(200));
    nodes[1].signal(libc::SIGCONT);
    nodes[0].post(&repo_update("r", "after-resume"));
    post_end(&nodes[0]);
    assert_eq!(until_end(&mut sub), ["after-resume", "end"]);
    assert_eq!(
        log_lines(&nodes[1], "subscription lost"),
        0,
        "the resume was taken for a lost connection"
    );
}
