//! The output path under pressure: shared frames, the global output budget
//! (`max_output_bytes`), slow consumers among fast ones, the order of everything a client
//! receives, and the memory one pending delivery costs.

mod common;

use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use tungstenite::Message;

/// A keep-alive `/events` sender whose requests may go unanswered for a while.
struct Sender {
    s: TcpStream,
    token: String,
}

impl Sender {
    fn new(addr: SocketAddr) -> Sender {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        Sender {
            s,
            token: event_token(),
        }
    }

    fn send(&mut self, body: &str) {
        let raw = format!(
            "POST /events HTTP/1.1\r\nHost: x\r\nAuthorization: Token {}\r\nContent-Length: {}\r\n\r\n{body}",
            self.token,
            body.len()
        );
        self.s.write_all(raw.as_bytes()).unwrap();
    }

    /// The status of the next answer, or None if none came within `within`.
    fn answer(&mut self, within: Duration) -> Option<u16> {
        self.s.set_read_timeout(Some(within)).unwrap();
        let r = read_response(&mut self.s, false)?;
        Some(r.status)
    }

    fn post(&mut self, body: &str) {
        self.send(body);
        assert_eq!(self.answer(DEADLINE), Some(200));
    }

    /// Posts these events pipelined, then reads every answer.
    fn post_many(&mut self, bodies: impl Iterator<Item = String>) {
        let mut sent = 0;
        for body in bodies {
            self.send(&body);
            sent += 1;
        }
        for _ in 0..sent {
            assert_eq!(self.answer(DEADLINE), Some(200));
        }
    }
}

fn event(repo: &str, n: usize, pad: usize) -> String {
    json!({"type": "repo-update", "content": {"repo_id": repo, "commit_id": n.to_string(), "pad": "p".repeat(pad)}})
        .to_string()
}

fn scrape(addr: &str) -> String {
    let r = request(
        addr.parse().unwrap(),
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    r.text()
}

/// A subscriber that does not read. `tiny`: with a receive buffer smaller than one
/// loopback segment, so the kernel holds little of what is sent to it (but it crawls
/// once it reads again).
fn stalled(server: &Server, repo: &str, tiny: bool) -> tungstenite::WebSocket<TcpStream> {
    let s = TcpStream::connect(server.addr).unwrap();
    if tiny {
        set_rcvbuf(&s, 4096);
    }
    let (mut ws, _) = tungstenite::client::client("ws://x/", s).unwrap();
    let t = client_token(repo, "stalled", unix_now() + 3600);
    ws.send(Message::text(
        json!({"type":"subscribe","content":{"repos":[{"id":repo,"jwt_token":t}]}}).to_string(),
    ))
    .unwrap();
    ws
}

/// Waits until `cond` holds on a fresh scrape; returns that scrape.
fn wait_metrics(addr: &str, what: &str, cond: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let m = scrape(addr);
        if cond(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "{what}: never happened\n{m}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_output_budget_pauses_ingest_until_output_drains() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let server = Server::start(&format!(
        "metrics_listen = {metrics}\nmax_output_bytes = 262144\nmax_unsent_bytes = 100000000\nwrite_timeout = 60\npong_timeout = 60\nping_interval = 30"
    ));
    let mut stuck = stalled(&server, "r", false);
    let mut probe = server.ws();
    probe.sync();
    // A reader on the same library gets every answered event while it keeps reading.
    let mut reader = server.ws();
    reader.subscribe("r", "reader");
    let reading = std::thread::spawn(move || {
        let mut got = Vec::new();
        while let Some(m) = reader.recv() {
            got.push(m["content"]["commit_id"].as_str().unwrap().to_string());
            if got.last().is_some_and(|c| c == "last") {
                break;
            }
        }
        got
    });
    // Post 16 KB events until one is not answered: the budget was reached.
    let mut sender = Sender::new(server.addr);
    let mut answered = 0;
    let paused = loop {
        assert!(answered < 5000, "never paused");
        sender.send(&event("r", answered, 16_000));
        match sender.answer(Duration::from_millis(1500)) {
            Some(200) => answered += 1,
            Some(other) => panic!("status {other}"),
            None => break answered,
        }
    };
    let m = scrape(&metrics);
    assert_eq!(metric_value(&m, "notification_output_over_budget"), 1.0, "{m}");
    assert_eq!(metric_value(&m, "notification_output_budget_hits_total"), 1.0);
    assert!(metric_value(&m, "notification_output_bytes") >= 262_144.0);
    assert!(server.logs.contains("max_output_bytes"), "the budget is logged");
    // Nobody was closed for it, and the server still serves metrics and websockets.
    assert_eq!(metric_value(&m, "notification_connections{state=\"websocket\"}"), 3.0);
    probe.sync();
    // Only /events waits: health checks and reconnecting clients are served meanwhile.
    let ping = request(
        server.addr,
        b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(ping.status, 200);
    let mut newcomer = server.ws();
    newcomer.subscribe("elsewhere", "newcomer");
    assert_eq!(sender.answer(Duration::from_millis(200)), None, "the event still waits");
    // The stalled client reads again: output drains, and the waiting request is taken.
    stuck.get_mut().set_read_timeout(Some(DEADLINE)).unwrap();
    let mut seen = 0;
    while seen < paused {
        match stuck.read().unwrap() {
            Message::Text(_) => seen += 1,
            _ => continue,
        }
    }
    assert_eq!(sender.answer(DEADLINE), Some(200), "ingest resumed");
    let m = wait_metrics(&metrics, "ingest resumes", |m| {
        metric_value(m, "notification_output_over_budget") == 0.0
    });
    assert_eq!(metric_value(&m, "notification_output_budget_hits_total"), 1.0);
    assert!(
        metric_value(&m, "notification_output_over_budget_seconds_total") > 0.0,
        "the episode's length is counted"
    );
    // Every answered event reached both subscribers, in order.
    sender.send(&json!({"type": "repo-update", "content": {"repo_id": "r", "commit_id": "last"}}).to_string());
    assert_eq!(sender.answer(DEADLINE), Some(200));
    let got = reading.join().unwrap();
    let want: Vec<String> = (0..=paused)
        .map(|n| n.to_string())
        .chain(["last".to_string()])
        .collect();
    assert_eq!(got, want);
    let mut rest = Vec::new();
    while rest.last().is_none_or(|c| c != "last") {
        if let Message::Text(t) = stuck.read().unwrap() {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            rest.push(v["content"]["commit_id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(rest, [paused.to_string(), "last".to_string()]);
}

#[test]
fn a_stalled_client_is_evicted_while_others_sharing_its_frames_keep_receiving() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let server = Server::start(&format!(
        "metrics_listen = {metrics}\nmax_unsent_bytes = 100000\nwrite_timeout = 60\npong_timeout = 60\nping_interval = 30"
    ));
    let _stuck = stalled(&server, "r", true);
    // The stalled client's subscribe may still be in flight: make sure it is processed.
    let mut probe = server.ws();
    probe.sync();
    let mut readers: Vec<Ws> = (0..3).map(|_| server.ws()).collect();
    for (i, r) in readers.iter_mut().enumerate() {
        r.subscribe("r", &format!("reader{i}"));
    }
    let mut sender = Sender::new(server.addr);
    let mut n = 0;
    while !server.logs.contains("slow consumer") {
        assert!(n < 2000, "the stalled client was never evicted\n{}", scrape(&metrics));
        sender.post(&event("r", n, 16_000));
        for r in readers.iter_mut() {
            assert_eq!(r.recv().unwrap()["content"]["commit_id"], n.to_string());
        }
        n += 1;
    }
    let line = server.logs.wait_for("slow consumer", DEADLINE).unwrap();
    assert!(line.contains("max_unsent_bytes"), "{line}");
    sender.post(&event("r", n, 10));
    for r in readers.iter_mut() {
        assert_eq!(r.recv().unwrap()["content"]["commit_id"], n.to_string());
    }
    // The evicted client's queue gave its references back: nothing is held.
    wait_metrics(&metrics, "output memory released", |m| {
        metric_value(m, "notification_output_bytes") == 0.0 && metric_value(m, "notification_pending_deliveries") == 0.0
    });
}

#[test]
fn pongs_replies_events_and_close_arrive_in_the_order_they_were_queued() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let server = Server::start(&format!(
        "metrics_listen = {metrics}\nping_interval = 0.05\npong_timeout = 30\nclose_timeout = 10\nmax_unsent_bytes = 100000000\nmax_body_bytes = 20000000"
    ));
    let mut raw = RawWs::connect_with_rcvbuf(&server, 4096);
    let t = client_token("r", "u", unix_now() + 3600);
    raw.send(
        1,
        json!({"type":"subscribe","content":{"repos":[{"id":"r","jwt_token":t}]}})
            .to_string()
            .as_bytes(),
    );
    wait_metrics(&metrics, "the subscription", |m| {
        metric_value(m, "notification_subscriptions") == 1.0
    });
    let mut sender = Sender::new(server.addr);
    // First fill the kernel's buffers for this client (they take megabytes on loopback),
    // so that everything after waits in the server's own queue.
    const FILL: usize = 1_000_000;
    sender.post(&event("r", FILL, 12_000_000));
    wait_metrics(&metrics, "output held by the server", |m| {
        metric_value(m, "notification_output_bytes") > 0.0
    });
    let rejected = "notification_token_rejections_total{token=\"client\",cause=\"malformed\"}";
    let bad_subscribe =
        |repo: String| json!({"type":"subscribe","content":{"repos":[{"id": repo,"jwt_token":"bad"}]}}).to_string();
    // Without reading, interleave: a ping, a bad subscribe (answered with jwt-expired),
    // another ping and another bad subscribe, then an event, many times over; the output
    // backs up in the server.
    let rounds = 40;
    for i in 0..rounds {
        raw.send(9, format!("a{i}").as_bytes());
        raw.send(1, bad_subscribe(format!("q{i}")).as_bytes());
        raw.send(9, format!("b{i}").as_bytes());
        raw.send(1, bad_subscribe(format!("r{i}")).as_bytes());
        // The event is posted only once the server has read all four frames: the second
        // refusal is counted after them. (A round trip through another socket would not
        // prove that: TCP may deliver this client's frames later than another's.)
        let want = (2 * (i + 1)) as f64;
        wait_metrics(&metrics, "the round's frames read", |m| {
            metric_value(m, rejected) >= want
        });
        sender.post(&event("r", i, 4_000));
    }
    // A message the server does not understand: it queues its Close (1003) behind all of
    // that, and takes no more data for this client.
    raw.send(1, b"not json");
    server
        .logs
        .wait_for("closing websocket", DEADLINE)
        .expect("the server read the bad message");
    sender.post(&event("r", 999, 10));
    // All of it waits in the server's queue, not in the kernel's.
    let m = scrape(&metrics);
    assert!(
        metric_value(&m, "notification_pending_deliveries") >= (rounds + 1) as f64,
        "the events are queued in the server\n{m}"
    );
    raw.s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut got = Vec::new();
    loop {
        let (first, payload) = raw.frame().expect("frames until the Close");
        match first {
            0x89 => continue, // the server's own keep-alive pings, anywhere
            0x8a => got.push(format!("pong {}", String::from_utf8(payload).unwrap())),
            0x81 => {
                let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                got.push(match v["type"].as_str().unwrap() {
                    "jwt-expired" => format!("reply {}", v["content"]["repo_id"].as_str().unwrap()),
                    _ => format!("event {}", v["content"]["commit_id"].as_str().unwrap()),
                });
            }
            0x88 => {
                assert_eq!(payload[..2], [0x03, 0xeb], "1003");
                got.push("close".into());
                break;
            }
            other => panic!("unexpected frame {other:#x}"),
        }
    }
    let mut want = vec![format!("event {FILL}")];
    for i in 0..rounds {
        want.extend([
            format!("pong a{i}"),
            format!("reply q{i}"),
            format!("pong b{i}"),
            format!("reply r{i}"),
            format!("event {i}"),
        ]);
    }
    want.push("close".into());
    assert_eq!(got, want);
    // Our answer ends it; nothing came after the server's Close.
    raw.send(8, &[0x03, 0xeb]);
    let mut rest = Vec::new();
    let _ = raw.s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{} bytes after the Close", rest.len());
}

#[test]
fn a_pending_delivery_costs_at_most_32_bytes() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let server = Server::start(&format!(
        "metrics_listen = {metrics}\nmax_unsent_bytes = 100000000\nmax_output_bytes = 1000000000\nwrite_timeout = 120\npong_timeout = 120\nping_interval = 60"
    ));
    let clients = 10;
    let stuck: Vec<_> = (0..clients).map(|_| stalled(&server, "r", true)).collect();
    let mut probe = server.ws();
    probe.sync();
    // Fill the kernel's buffers first, so what follows stays in the server's queues.
    let mut sender = Sender::new(server.addr);
    let mut n = 0;
    // Output that is still pending a moment after it was queued waits for a full socket.
    let settled_pending = || {
        std::thread::sleep(Duration::from_millis(100));
        metric_value(&scrape(&metrics), "notification_pending_deliveries")
    };
    while settled_pending() < (2 * clients) as f64 {
        sender.post_many((n..n + 20).map(|n| event("r", n, 16_000)));
        n += 20;
        assert!(n < 20_000, "the stalled sockets never filled");
    }
    let before_pending = settled_pending();
    let before = server.rss_kb();
    let events = 20_000;
    for batch in (0..events).step_by(100) {
        sender.post_many((batch..batch + 100).map(|n| event("r", 100_000 + n, 0)));
    }
    let m = scrape(&metrics);
    let after = server.rss_kb();
    let pending = metric_value(&m, "notification_pending_deliveries") - before_pending;
    assert_eq!(pending, (clients * events) as f64, "every delivery is pending\n{m}");
    // The frames themselves: 20,000 of about 100 bytes, shared by every queue, each with
    // its allocation overheads.
    let frames = (events * 200) as f64;
    let grew = (after.saturating_sub(before) * 1024) as f64;
    let per_delivery = (grew - frames).max(0.0) / pending;
    assert!(
        per_delivery <= 32.0,
        "{per_delivery:.1} bytes per pending delivery (RSS grew {grew} bytes for {pending} deliveries)"
    );
    eprintln!("{per_delivery:.1} bytes per pending delivery (RSS grew {grew} bytes for {pending} deliveries)");
    drop(stuck);
}
