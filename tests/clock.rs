//! Wall-clock steps while the server runs (a Raspberry Pi without a real-time clock boots
//! with a stale clock and steps it when NTP syncs). The server's wall clock is moved with
//! libfaketime (`LD_PRELOAD`, offset read from a file on every call, the monotonic clock
//! left alone, as a real step leaves it), and the tests check the decision:
//!
//! - tokens, event and client alike, and a subscription's end are judged by the wall
//!   clock, at every moment, as seahub and seaf-server judge the same tokens: after a
//!   step forward a subscription whose `exp` is now past ends within a second with
//!   `jwt-expired` (the client fetches a fresh token and subscribes again), and after a
//!   step back one that is not past yet stays;
//! - timers (pings, pong timeouts, every other deadline) run on the monotonic clock, so
//!   a step either way closes no healthy connection and does not stop the pings.

mod common;

use common::*;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tungstenite::Message;

const DAY: i64 = 86_400;

/// libfaketime, installed by `.ci/deps` (Debian package `libfaketime`).
fn libfaketime() -> PathBuf {
    for dir in ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib"] {
        let p = PathBuf::from(dir).join("faketime/libfaketime.so.1");
        if p.exists() {
            return p;
        }
    }
    panic!("libfaketime not found: install the libfaketime package (run .ci/deps)");
}

/// The offset of the server's wall clock from the real one, changeable while it runs.
struct Clock(PathBuf);

impl Clock {
    fn set(&self, offset_s: i64) {
        std::fs::write(&self.0, format!("{offset_s:+}\n")).unwrap();
    }
}

fn start_with_clock() -> (Server, Clock) {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("seafile.conf"), config_text("")).unwrap();
    let clock = Clock(dir.path().join("faketime"));
    clock.set(0);
    let lib = libfaketime();
    let file = clock.0.to_str().unwrap().to_string();
    let server = Server::start_in(
        dir,
        &["-l", "-"],
        &[
            ("LD_PRELOAD", lib.to_str().unwrap()),
            ("FAKETIME_TIMESTAMP_FILE", &file),
            // Re-read the file on every clock call: the step takes effect at once.
            ("FAKETIME_NO_CACHE", "1"),
            // A real step moves CLOCK_REALTIME only.
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    (server, clock)
}

/// Posts an event signed for a sender whose clock is `offset_s` from the real one (the
/// same box's seaf-server sees the same stepped clock); returns the status.
fn post_at(server: &Server, offset_s: i64, body: &Value) -> u16 {
    let token = sign(&json!({"exp": unix_now() + offset_s + 300}));
    post_event(server.addr, &body.to_string(), Some(&format!("Token {token}"))).status
}

/// Reads for `how_long`, answering pings; returns how many pings came. Panics on any
/// data message or on the end of the connection.
fn count_pings(ws: &mut Ws, how_long: Duration) -> usize {
    let until = Instant::now() + how_long;
    let mut pings = 0;
    ws.ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    while Instant::now() < until {
        match ws.ws.read() {
            Ok(Message::Ping(_)) => {
                pings += 1;
                let _ = ws.ws.flush();
            }
            Ok(Message::Pong(_)) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                let _ = ws.ws.flush();
            }
            other => panic!("unexpected while counting pings: {other:?}"),
        }
    }
    ws.ws.get_mut().set_read_timeout(Some(DEADLINE)).unwrap();
    pings
}

fn expired(repo: &str) -> Value {
    json!({"type": "jwt-expired", "content": {"repo_id": repo}})
}

#[test]
fn a_step_forward_ends_the_subscriptions_it_expires_and_nothing_else() {
    let (server, clock) = start_with_clock();
    let real = unix_now();
    let mut ws = server.ws();
    let short = client_token("short", "alice@x", real + 600);
    let long = client_token("long", "alice@x", real + 3 * DAY);
    ws.subscribe_many(&[("short", &short), ("long", &long)]);
    ws.sync();
    assert_eq!(post_at(&server, 0, &repo_update("short", "before")), 200);
    assert_eq!(ws.recv().unwrap()["content"]["commit_id"], "before");

    // NTP steps the clock a day forward.
    clock.set(DAY);
    let stepped = Instant::now();
    let m = ws.recv().expect("jwt-expired for the subscription the step expired");
    assert_eq!(m, expired("short"));
    assert!(
        stepped.elapsed() < Duration::from_secs(2),
        "noticed after {:?}",
        stepped.elapsed()
    );

    // Event tokens are judged by the new clock too: one that was valid a moment ago is
    // refused, one signed by a sender on the same (stepped) clock is taken.
    assert_eq!(post_at(&server, 0, &repo_update("long", "stale-sender")), 400);
    assert_eq!(post_at(&server, DAY, &repo_update("short", "not-for-you")), 200);
    assert_eq!(post_at(&server, DAY, &repo_update("long", "after")), 200);
    assert_eq!(ws.recv().unwrap()["content"]["commit_id"], "after");

    // Keep-alive runs on the monotonic clock: pings go on, nobody is timed out (a day
    // of "silence" by the wall clock is not a pong timeout).
    assert!(count_pings(&mut ws, Duration::from_secs(6)) >= 2, "pings stopped");

    // The client fetches a token for the new time and subscribes again; a token that was
    // valid only by the old clock is refused.
    ws.subscribe_many(&[("short", &short)]);
    assert_eq!(ws.recv().unwrap(), expired("short"));
    let fresh = client_token("short", "alice@x", unix_now() + DAY + 600);
    ws.subscribe_many(&[("short", &fresh)]);
    ws.sync();
    assert_eq!(post_at(&server, DAY, &repo_update("short", "again")), 200);
    assert_eq!(ws.recv().unwrap()["content"]["commit_id"], "again");
    assert!(!server.logs.contains("pong_timeout"), "{:#?}", server.logs.all());
}

#[test]
fn a_step_back_keeps_subscriptions_and_keep_alive_and_forward_again_expires_them() {
    let (server, clock) = start_with_clock();
    let real = unix_now();
    let mut ws = server.ws();
    let soon = client_token("r", "bob@x", real + 3);
    ws.subscribe_many(&[("r", &soon)]);
    ws.sync();

    // The clock steps a day back: by the wall clock the token has a day left. Pings go
    // on (a wall-clock timer would wait a day for its next one) and nothing expires,
    // past the token's real expiry.
    clock.set(-DAY);
    assert!(count_pings(&mut ws, Duration::from_secs(6)) >= 2, "pings stopped");
    assert!(unix_now() > real + 3);
    assert_eq!(post_at(&server, -DAY, &repo_update("r", "yesterday")), 200);
    assert_eq!(ws.recv().unwrap()["content"]["commit_id"], "yesterday");
    // A token that is past by the stepped clock is refused.
    let past = client_token("r2", "bob@x", real - DAY - 10);
    ws.subscribe_many(&[("r2", &past)]);
    assert_eq!(ws.recv().unwrap(), expired("r2"));

    // Back to the real time: the token is past, the subscription ends within a second.
    clock.set(0);
    let stepped = Instant::now();
    assert_eq!(ws.recv().unwrap(), expired("r"));
    assert!(stepped.elapsed() < Duration::from_secs(2));
    assert_eq!(post_at(&server, 0, &repo_update("r", "gone")), 200);
    ws.sync();
    server.assert_alive();
}
