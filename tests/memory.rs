//! Memory and stalls against the real binary: RSS goes back near its baseline once a
//! crowd of clients has left, and a stalled loop does not evict clients that were alive.

mod common;

use common::*;
use std::time::{Duration, Instant};

#[test]
fn rss_returns_near_its_baseline_after_a_crowd_leaves() {
    raise_nofile();
    // Long keep-alive: the test's blocking clients do not read while the crowd gathers.
    let server = Server::start("ping_interval = 60\npong_timeout = 120");
    let mut probe = server.ws();
    probe.subscribe("probe", "u");
    std::thread::sleep(Duration::from_millis(200)); // let start-up allocations settle
    let baseline = server.rss_kb();
    let mut crowd: Vec<Ws> = (0..3000).map(|_| server.ws()).collect();
    for (i, ws) in crowd.iter_mut().enumerate() {
        let t = client_token(&format!("r{}", i % 100), "user@x", unix_now() + 3600);
        let repo = format!("r{}", i % 100);
        ws.subscribe_many(&[(repo.as_str(), t.as_str())]);
    }
    for ws in crowd.iter_mut() {
        ws.sync();
    }
    let peak = server.rss_kb();
    assert!(
        peak > baseline + 1024,
        "the crowd should cost memory: {baseline} -> {peak} KiB"
    );
    drop(crowd);
    // The loop trims within about a second once connections fell below half their peak.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        probe.idle(Duration::from_millis(250));
        let now = server.rss_kb();
        if now <= baseline + 2048 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "RSS stayed at {now} KiB (baseline {baseline}, peak {peak})"
        );
    }
    // Still serving.
    server.post(&repo_update("probe", "after"));
    assert_eq!(probe.recv().unwrap()["content"]["commit_id"], "after");
}

#[test]
fn a_stalled_loop_does_not_evict_clients_that_kept_talking() {
    let server = Server::start("ping_interval = 0.2\npong_timeout = 1");
    let mut a = server.ws();
    a.subscribe("r", "u");
    // Stop the server for longer than pong_timeout while the client keeps pinging it.
    server.signal(libc::SIGSTOP);
    let until = Instant::now() + Duration::from_millis(1800);
    while Instant::now() < until {
        a.ws.send(tungstenite::Message::Ping("still here".into())).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    server.signal(libc::SIGCONT);
    server.post(&repo_update("r", "after-stall"));
    loop {
        let m = a.recv().expect("not evicted");
        if m["content"]["commit_id"] == "after-stall" {
            break;
        }
    }
    assert!(!server.logs.contains("pong timeout"), "{:#?}", server.logs.all());
}

#[test]
fn a_stalled_loop_does_not_evict_clients_that_only_answer_pings() {
    let server = Server::start("ping_interval = 0.2\npong_timeout = 1");
    let mut a = server.ws();
    a.subscribe("r", "u");
    // The client only answers pings; while the server is stopped it has nothing to say.
    server.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(1800));
    server.signal(libc::SIGCONT);
    assert!(server.logs.wait_for("event loop stalled", DEADLINE).is_some());
    a.idle(Duration::from_millis(600));
    server.post(&repo_update("r", "after-stall"));
    assert_eq!(a.recv().expect("not evicted")["content"]["commit_id"], "after-stall");
    assert!(!server.logs.contains("pong timeout"), "{:#?}", server.logs.all());
}
