//! The example reverse-proxy configs in examples/proxy/, run through the real proxies
//! (nginx, Apache httpd, Caddy, HAProxy as Debian ships them; `.ci/deps` installs them).
//!
//! Each test turns the example file into a runnable config (the listen address becomes a
//! free loopback port, 127.0.0.1:8083 the test server, the idle timeout a short one), starts
//! the proxy in the foreground, and checks through it: `/notification/ping`, a websocket on
//! `/notification` that subscribes and receives an event, no path under the prefix
//! (`/notification/events`, `/notificationevents`, ...) reaching the ingest endpoint with
//! a valid sender token, and a client that stays idle for more than twice the
//! proxy's idle timeout and still receives an event afterwards, because the server's pings
//! keep the connection busy. A second server with its pings turned off, behind a second
//! copy of the proxy, shows that the timeout is really in force: that idle connection is
//! cut by the proxy.
//!
//! A missing proxy binary fails its test: run `.ci/deps`.

mod common;
#[path = "common/proxy.rs"]
mod proxy;

use common::*;
use proxy::{Kind, Proxy, Setup};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tungstenite::Message;

/// The idle timeout every proxy gets in the tests, in seconds. The server pings every
/// second but skips a ping when the client was heard from within the last second, so two
/// pings can be about 2 s apart (2.25 s at worst with its 250 ms tick); 4 s leaves room for
/// that on a busy machine.
const PROXY_TIMEOUT_SECS: u64 = 4;

/// How long the idle client stays silent: more than twice the proxy's timeout.
const IDLE: Duration = Duration::from_secs(9);

/// One HTTP/1.1 request with `Connection: close`; reads the whole answer (Content-Length,
/// chunked or until EOF, whatever the proxy chose).
fn http(addr: SocketAddr, method: &str, path: &str, headers: &str, body: &str) -> Response {
    let mut s = connect(addr);
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(raw.as_bytes()).unwrap();
    let mut all = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) => panic!("reading the answer to {method} {path} from {addr}: {e}"),
        }
    }
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| {
        panic!(
            "no complete answer to {method} {path}: {:?}",
            String::from_utf8_lossy(&all)
        )
    });
    let head_text = String::from_utf8_lossy(&all[..split]).into_owned();
    let (status_line, head) = head_text.split_once("\r\n").unwrap_or((&head_text, ""));
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut r = Response {
        status,
        head: head.to_string(),
        body: all[split + 4..].to_vec(),
    };
    if r.header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        r.body = dechunk(&r.body);
    }
    r
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
    out
}

/// What an idle client saw.
#[derive(Debug)]
enum Idle {
    /// Still open at the end; the server's pings and the largest gap between two of them.
    Open { pings: usize, max_gap: Duration },
    /// Closed (by the proxy or the server) after this long.
    Closed { after: Duration, why: String },
}

/// Sends nothing for `how_long` but keeps reading, so that tungstenite answers the server's
/// pings. Any text message is a test failure: nothing was posted.
fn stay_idle(ws: &mut Ws, how_long: Duration) -> Idle {
    let start = Instant::now();
    ws.ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut pings = 0;
    let mut last = start;
    let mut max_gap = Duration::ZERO;
    while start.elapsed() < how_long {
        match ws.ws.read() {
            Ok(Message::Ping(_)) => {
                pings += 1;
                max_gap = max_gap.max(last.elapsed());
                last = Instant::now();
            }
            Ok(Message::Text(t)) => panic!("unexpected message while idle: {t}"),
            Ok(Message::Close(f)) => {
                return Idle::Closed {
                    after: start.elapsed(),
                    why: format!("close frame {f:?}"),
                };
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => {
                return Idle::Closed {
                    after: start.elapsed(),
                    why: e.to_string(),
                };
            }
        }
        // Sends the pong tungstenite queued for a ping, if any.
        let _ = ws.ws.flush();
    }
    max_gap = max_gap.max(last.elapsed());
    Idle::Open { pings, max_gap }
}

/// The whole check for one proxy config.
fn check(kind: Kind) {
    let server = Server::start("");
    // Same server with its pings off: only the proxy's idle timeout can end its sockets.
    let silent = Server::start("ping_interval = 30\npong_timeout = 60");
    let proxy = Proxy::start(&Setup::ExampleWithTimeout(kind, PROXY_TIMEOUT_SECS), server.addr, &[]);
    let silent_proxy = Proxy::start(&Setup::ExampleWithTimeout(kind, PROXY_TIMEOUT_SECS), silent.addr, &[]);
    let context = || {
        format!(
            "{kind:?} ({})\n{}\n== server log\n{}",
            kind.example(),
            proxy.logs(),
            server.logs.all().join("\n")
        )
    };

    // Liveness probe, as the desktop client sends it.
    let r = http(proxy.addr, "GET", "/notification/ping", "", "");
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "{\"ret\": \"pong\"}\n"),
        "GET /notification/ping through {}: {r:?}",
        context()
    );

    // The websocket: subscribe through the proxy.
    let mut ws = Ws::connect(proxy.addr, "/notification");
    ws.subscribe("repo-proxied", "alice@example.com");

    // The ingest endpoint is not reachable under the public prefix, even with a valid
    // sender token, whatever the proxy does with the path: refused, and nothing delivered
    // (the next event the subscriber gets is the one posted straight to the server). A
    // prefix-stripping rule that matches `/notification` without the slash would turn
    // `/notificationevents` into `/events` (the Seafile 10/11 manual's nginx snippet does).
    let forged = repo_update("repo-proxied", "via-proxy").to_string();
    let auth = format!(
        "Authorization: Token {}\r\nContent-Type: application/json\r\n",
        event_token()
    );
    // Each also as an upgrade request, which some rules route apart (Caddy's `@ws`).
    let upgrade = format!("{auth}Connection: Upgrade\r\nUpgrade: websocket\r\n");
    for path in [
        "/notification/events",
        "/notification/events/",
        "/notificationevents",
        "/notificationevents/",
        "/notificationevents?x=1",
        "/notification%65vents",
        "/events/../notification",
    ] {
        for headers in [&auth, &upgrade] {
            let r = http(proxy.addr, "POST", path, headers, &forged);
            assert_ne!(r.status, 200, "POST {path} through {} was accepted: {r:?}", context());
        }
    }

    // An event posted straight to the server arrives, and it is the first one.
    server.post(&repo_update("repo-proxied", "before-idle"));
    let m = ws.recv().unwrap_or_else(|| panic!("no event through {}", context()));
    assert_eq!(m["content"]["commit_id"], "before-idle", "{m}");

    let mut silent_ws = Ws::connect(silent_proxy.addr, "/notification");
    silent_ws.subscribe("repo-silent", "bob@example.com");
    let silent_idle = std::thread::spawn(move || stay_idle(&mut silent_ws, IDLE));

    // Idle for more than twice the proxy's timeout: the server's pings keep it open...
    match stay_idle(&mut ws, IDLE) {
        Idle::Open { pings, max_gap } => {
            assert!(
                pings >= 3,
                "only {pings} server pings in {IDLE:?} through {}",
                context()
            );
            eprintln!("{kind:?}: {pings} server pings in {IDLE:?}, at most {max_gap:?} apart");
        }
        Idle::Closed { after, why } => panic!(
            "the idle websocket through {} was closed after {after:?} ({why}), although the server pings",
            context()
        ),
    }
    // ...and it still works.
    server.post(&repo_update("repo-proxied", "after-idle"));
    let m = ws
        .recv()
        .unwrap_or_else(|| panic!("no event after the idle period through {}", context()));
    assert_eq!(m["content"]["commit_id"], "after-idle", "{m}");

    // The control: without server pings, the proxy's timeout ends the idle websocket.
    match silent_idle.join().unwrap() {
        Idle::Closed { after, .. } if after >= Duration::from_secs(PROXY_TIMEOUT_SECS) - Duration::from_millis(500) => {
        }
        other => panic!(
            "without server pings the websocket through {kind:?} should be cut by its {PROXY_TIMEOUT_SECS} s idle timeout, \
             so the test proves nothing; got {other:?}\n{}",
            silent_proxy.logs()
        ),
    }
    drop(ws);
    drop(proxy);
    drop(silent_proxy);
}

#[test]
fn nginx_seafile11_form() {
    check(Kind::NginxSeafile11);
}

#[test]
fn nginx_current_form() {
    check(Kind::NginxCurrent);
}

#[test]
fn apache() {
    check(Kind::Apache);
}

#[test]
fn caddy() {
    check(Kind::Caddy);
}

#[test]
fn haproxy() {
    check(Kind::Haproxy);
}
