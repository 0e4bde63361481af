//! Fan-out against the real binary: a large fan-out is flushed in time slices, so input
//! that arrives meanwhile (here a metrics scrape) is answered between slices rather than
//! after the last subscriber, and every subscriber still gets the event exactly once.

mod common;

use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

const SUBSCRIBERS: usize = 3000;

#[test]
fn input_is_answered_between_slices_of_a_large_fan_out() {
    raise_nofile();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    // Long keep-alive and info logs: nothing but the fan-out keeps the loop busy.
    let server = Server::start(&format!(
        "metrics_listen = {metrics_addr}\nping_interval = 60\npong_timeout = 120\nlog_level = info"
    ));
    let mut crowd: Vec<Ws> = (0..SUBSCRIBERS).map(|_| server.ws()).collect();
    let token = client_token("big", "user@x", unix_now() + 3600);
    for ws in crowd.iter_mut() {
        ws.subscribe_many(&[("big", token.as_str())]);
    }
    for ws in crowd.iter_mut() {
        ws.sync();
    }
    let scrape = |s: &mut TcpStream| {
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let r = read_response(s, false).expect("no metrics answer");
        assert_eq!(r.status, 200);
        metric_value(&r.text(), "notification_flush_queue") as u64
    };
    let mut metrics = connect(metrics_addr.parse().unwrap());
    let mut events = connect(server.addr);
    let auth = format!("Token {}", event_token());
    // The scrape is sent once the event's 200 is back, i.e. after its fan-out started;
    // a loop that flushed everything before reading again would answer it with an empty
    // queue. A test thread descheduled for the whole fan-out could see that too, so it
    // gets three tries.
    let mut queued_seen = Vec::new();
    for attempt in 0..3 {
        let body = repo_update("big", &format!("c{attempt}")).to_string();
        let raw = format!(
            "POST /events HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        events.write_all(raw.as_bytes()).unwrap();
        assert_eq!(read_response(&mut events, false).unwrap().status, 200);
        let queued = scrape(&mut metrics);
        queued_seen.push(queued);
        // Every subscriber gets this event, once, whatever the slicing did.
        let deadline = Instant::now() + DEADLINE;
        for ws in crowd.iter_mut() {
            let m = ws.recv().expect("a subscriber missed the event");
            assert_eq!(m["content"]["commit_id"], format!("c{attempt}"));
            assert!(Instant::now() < deadline, "fan-out took too long");
        }
        if queued > 0 {
            break;
        }
    }
    assert!(
        queued_seen.iter().any(|&q| q > 0),
        "the scrape was only answered once the whole fan-out was flushed: queue {queued_seen:?}"
    );
    // Once the fan-out is done the queue is empty again.
    let deadline = Instant::now() + DEADLINE;
    while scrape(&mut metrics) != 0 {
        assert!(Instant::now() < deadline, "the flush queue never emptied");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The wait histogram saw every subscriber's flush, and the ones at the back of the
    // queue waited past the first bucket (a millisecond).
    metrics.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let text = read_response(&mut metrics, false).unwrap().text();
    let count = metric_value(&text, "notification_flush_wait_seconds_count") as u64;
    let within_1ms = metric_value(&text, "notification_flush_wait_seconds_bucket{le=\"0.001\"}") as u64;
    assert!(count >= SUBSCRIBERS as u64, "{count} flushes observed");
    assert!(
        within_1ms < count,
        "no flush waited over 1 ms in a {SUBSCRIBERS}-way fan-out"
    );
    server.assert_alive();
}
