//! Loop-level tests: the real reactor, stepped with a fake clock over scripted sockets
//! (accepted from a scripted listener), with real tokens and, for groups, a real SQLite
//! group database behind the real lookup helper. `bounds.rs` holds the tests of what
//! one turn may take and hold (issues "hostile" and "bounds").

mod bounds;

use super::*;
use crate::auth::tests::sign;
use crate::conn::MAX_PENDING_OUTPUT;
use crate::scripted::ScriptedStream;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};
use std::cell::RefCell;

const NOW: i64 = 1_800_000_000;
const KEY: &[u8] = b"loop-test-key";

/// Hands out the streams queued in it, then `WouldBlock`.
#[derive(Default)]
struct ScriptedListener {
    waiting: RefCell<VecDeque<ScriptedStream>>,
    /// The next accept fails with EMFILE, as when descriptors run out.
    emfile_once: std::cell::Cell<bool>,
}

impl mio::event::Source for ScriptedListener {
    fn register(&mut self, _: &mio::Registry, _: Token, _: Interest) -> io::Result<()> {
        Ok(())
    }
    fn reregister(&mut self, _: &mio::Registry, _: Token, _: Interest) -> io::Result<()> {
        Ok(())
    }
    fn deregister(&mut self, _: &mio::Registry) -> io::Result<()> {
        Ok(())
    }
}

impl Listen for ScriptedListener {
    type Stream = ScriptedStream;
    fn accept(&self) -> io::Result<(ScriptedStream, SocketAddr)> {
        if self.emfile_once.replace(false) {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        match self.waiting.borrow_mut().pop_front() {
            Some(stream) => Ok((stream, peer())),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

fn peer() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 40000))
}

fn readable(token: Token) -> Ready {
    Ready {
        token,
        readable: true,
        writable: false,
        hung_up: false,
    }
}

/// A masked client frame.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

const UPGRADE: &[u8] = b"GET /notification HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// The server under test, its fake clock, and a way to talk to it.
struct Loop {
    server: Server<ScriptedListener>,
    now: Now,
}

impl Loop {
    fn new(config: Config, groups: Option<Backend>) -> Loop {
        let config = Config {
            jwt_private_key: KEY.to_vec(),
            ..config
        };
        let server = Server::build(config, ScriptedListener::default(), peer(), groups, None).unwrap();
        Loop {
            server,
            now: Now { mono: 0, unix: NOW },
        }
    }

    fn step(&mut self, ready: &[Ready]) -> Flow {
        self.server.step(ready, self.now)
    }

    /// Moves the clock on by `ms`, one 10 ms step at a time, like a loop that wakes for
    /// its sweep.
    fn advance(&mut self, ms: Millis) {
        let end = self.now.mono + ms;
        while self.now.mono < end {
            self.now.mono = (self.now.mono + 10).min(end);
            self.step(&[]);
        }
    }

    /// Accepts a connection that has `input` waiting, and lets it be read.
    fn connect(&mut self, input: Vec<u8>) -> usize {
        self.connect_stream(ScriptedStream::new([input]))
    }

    /// Accepts a connection on `stream` (its input, end of stream and room as scripted),
    /// and lets it be read.
    fn connect_stream(&mut self, stream: ScriptedStream) -> usize {
        let key = self.server.conns.vacant_key();
        self.server
            .listener
            .as_ref()
            .unwrap()
            .waiting
            .borrow_mut()
            .push_back(stream);
        self.step(&[readable(LISTENER)]);
        self.step(&[readable(Token(key))]);
        key
    }

    fn stream(&mut self, key: usize) -> &mut ScriptedStream {
        match self.server.conns.get_mut(key) {
            Some(Conn::Http(h)) => h.stream_mut(),
            Some(Conn::Ws(w)) => w.stream_mut(),
            _ => panic!("connection {key} is gone"),
        }
    }

    fn is_open(&self, key: usize) -> bool {
        self.server.conns.contains(key)
    }

    /// A websocket subscribed to `repos` as `user`.
    fn subscriber(&mut self, user: &str, repos: &[&str]) -> usize {
        let list: Vec<Value> = repos
            .iter()
            .map(|r| {
                let token = sign(
                    Algorithm::HS256,
                    &json!({"repo_id": r, "username": user, "exp": NOW + 3600}),
                    KEY,
                );
                json!({"id": r, "jwt_token": token})
            })
            .collect();
        let msg = json!({"type": "subscribe", "content": {"repos": list}}).to_string();
        let mut input = UPGRADE.to_vec();
        input.extend(client_frame(1, msg.as_bytes()));
        let key = self.connect(input);
        let out = std::mem::take(&mut self.stream(key).output);
        assert!(out.starts_with(b"HTTP/1.1 101 "), "{}", String::from_utf8_lossy(&out));
        assert!(out.ends_with(b"\r\n\r\n"), "nothing but the 101 yet");
        assert_eq!(self.server.subs.count(key), repos.len());
        key
    }

    /// POSTs an event on a connection of its own, which is answered and closed within
    /// the step that reads it.
    fn post(&mut self, body: &Value) {
        self.post_signed(body, KEY);
    }

    /// [`Loop::post`] with a token signed with `key`.
    fn post_signed(&mut self, body: &Value, key: &[u8]) {
        let token = sign(Algorithm::HS256, &json!({"exp": NOW + 3600}), key);
        let body = body.to_string();
        let request = format!(
            "POST /events HTTP/1.1\r\nAuthorization: Token {token}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let key = self.connect(request.into_bytes());
        assert!(!self.is_open(key));
    }

    /// Runs the turns a real loop runs back to back while websockets wait in the flush
    /// queue (it polls with a zero timeout then), without moving the clock. A turn's flush
    /// slice is measured in real time, so on a loaded machine one step may not write
    /// everything; the loop's clock says the rest goes out at the same moment.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            if !self.server.work_left() {
                return;
            }
            self.step(&[]);
        }
        panic!("the flush queue never emptied");
    }

    /// The text frames written to `key` since the last look (once the loop has written
    /// what it queued: [`Loop::settle`]), and the opcodes of all.
    fn received(&mut self, key: usize) -> (Vec<String>, Vec<u8>) {
        self.settle();
        let out = std::mem::take(&mut self.stream(key).output);
        let (mut texts, mut opcodes, mut rest) = (Vec::new(), Vec::new(), &out[..]);
        while let [b0, b1, tail @ ..] = rest {
            let (len, tail) = match b1 & 0x7f {
                126 => (u16::from_be_bytes([tail[0], tail[1]]) as usize, &tail[2..]),
                127 => panic!("no frame here is that long"),
                n => (n as usize, tail),
            };
            opcodes.push(b0 & 0x0f);
            if b0 & 0x0f == 1 {
                texts.push(String::from_utf8(tail[..len].to_vec()).unwrap());
            }
            rest = &tail[len..];
        }
        (texts, opcodes)
    }

    fn texts(&mut self, key: usize) -> Vec<String> {
        self.received(key).0
    }

    /// Connections closed for `reason` so far, from the metrics.
    fn closes(&self, reason: &str) -> u64 {
        let text = metrics::render(&self.server.stats, &self.server.gauges());
        let prefix = format!("notification_closes_total{{reason=\"{reason}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0, |n| n.parse().unwrap())
    }
}

fn update(repo: &str, n: u32) -> Value {
    json!({"type": "repo-update", "content": {"repo_id": repo, "commit_id": format!("c{n}")}})
}

fn group_perm(repo: &str, group: i64, path: &str) -> Value {
    json!({"type": "folder-perm-changed", "content": {"repo_id": repo, "path": path, "type": "group",
        "change_event": "modify", "user": "", "group": group, "perm": "rw"}})
}

/// Which marker (commit id or path) each frame carries.
fn markers(frames: &[String]) -> Vec<String> {
    frames
        .iter()
        .map(|f| {
            let v: Value = serde_json::from_str(f).unwrap();
            let c = &v["content"];
            c["commit_id"].as_str().or(c["path"].as_str()).unwrap().to_string()
        })
        .collect()
}

#[test]
fn held_group_events_are_released_in_order_and_other_libraries_are_not_delayed() {
    let dir = std::env::temp_dir().join(format!("ns-loop-groups-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("groupmgr.db");
    let _ = std::fs::remove_file(&db);
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "CREATE TABLE GroupUser (group_id INTEGER, user_name VARCHAR(255), is_staff tinyint);
         INSERT INTO GroupUser VALUES (7, 'alice', 0);",
    )
    .unwrap();
    let mut l = Loop::new(Config::default(), Some(Backend::Sqlite(db)));
    let alice = l.subscriber("alice", &["r"]);
    let bob = l.subscriber("bob", &["r", "other"]);

    l.post(&group_perm("r", 7, "/g"));
    l.post(&update("r", 1));
    l.post(&update("other", 2));
    // The lookup is not taken yet: r waits behind it, "other" went at once.
    assert_eq!(markers(&l.texts(alice)), Vec::<String>::new());
    assert_eq!(markers(&l.texts(bob)), ["c2"]);

    // The helper answers through the waker, as in the loop.
    let deadline = Instant::now() + Duration::from_secs(10);
    while l.server.gate.held() > 0 {
        assert!(Instant::now() < deadline, "the lookup was never answered");
        std::thread::sleep(Duration::from_millis(5));
        l.step(&[readable(WAKER)]);
    }
    assert_eq!(
        markers(&l.texts(alice)),
        ["/g", "c1"],
        "in order, the group event first"
    );
    assert_eq!(markers(&l.texts(bob)), ["c1"], "bob is not in group 7");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_silent_peer_is_closed_at_pong_timeout_and_a_talking_one_is_not() {
    let config = Config {
        ping_interval: Duration::from_secs(1),
        pong_timeout: Duration::from_secs(3),
        ..Config::default()
    };
    let mut l = Loop::new(config, None);
    let silent = l.subscriber("a", &["r"]);
    let talking = l.subscriber("b", &["r"]);
    for _ in 0..7 {
        l.advance(500);
        // The talking client answers every ping it got.
        let pings = l.received(talking).1.iter().filter(|&&op| op == 9).count();
        for _ in 0..pings {
            l.stream(talking).input.push_back(client_frame(10, b""));
        }
        l.step(&[readable(Token(talking))]);
        if l.now.mono < 3_000 {
            assert!(l.is_open(silent), "closed before pong_timeout, at {} ms", l.now.mono);
        }
    }
    assert!(!l.is_open(silent), "not closed at pong_timeout");
    assert!(l.is_open(talking));
    assert_eq!(l.closes("pong_timeout"), 1);
}

#[test]
fn a_slow_consumer_is_closed_without_delaying_the_others() {
    let config = Config {
        write_timeout: Duration::from_secs(2),
        ..Config::default()
    };
    let mut l = Loop::new(config, None);
    let stalled = l.subscriber("a", &["r"]);
    let readers: Vec<usize> = (0..3).map(|_| l.subscriber("b", &["r"])).collect();
    l.stream(stalled).write_room = 0;
    for n in 0..20 {
        l.post(&update("r", n));
        // Every reader has the event before the loop's clock moves on.
        for &r in &readers {
            assert_eq!(markers(&l.texts(r)), [format!("c{n}")], "reader {r}, event {n}");
        }
        l.advance(50);
    }
    assert!(l.is_open(stalled), "1 s of stalled output is within write_timeout");
    l.advance(1_100);
    assert!(!l.is_open(stalled), "stalled past write_timeout");
    assert_eq!(l.closes("slow_consumer_time"), 1);
    l.post(&update("r", 99));
    for &r in &readers {
        assert_eq!(markers(&l.texts(r)), ["c99"]);
    }
}

#[test]
fn a_connection_is_torn_down_once_when_two_reasons_arrive_in_one_step() {
    let config = Config {
        ping_interval: Duration::from_secs(1),
        pong_timeout: Duration::from_secs(3),
        ..Config::default()
    };
    let mut l = Loop::new(config, None);
    let doomed = l.subscriber("a", &["r"]);
    let other = l.subscriber("b", &["r"]);
    // Keep `other` talking; `doomed` stays silent until its pong timeout is due, then,
    // in the very step the sweep finds it silent, its peer hangs up.
    while l.now.mono < 2_900 {
        l.advance(100);
        l.stream(other).input.push_back(client_frame(10, b""));
        l.step(&[readable(Token(other))]);
    }
    l.stream(doomed).eof = true;
    l.now.mono = 3_300;
    l.step(&[
        Ready {
            token: Token(doomed),
            readable: true,
            writable: false,
            hung_up: true,
        },
        readable(Token(doomed)),
    ]);
    assert!(!l.is_open(doomed));
    assert_eq!(l.closes("peer_closed"), 1, "the first reason is the one recorded");
    assert_eq!(l.closes("pong_timeout"), 0, "and the only one");
    // Its key is free for the next connection, which is not touched by the old reasons.
    let next = l.subscriber("c", &["r"]);
    assert_eq!(next, doomed);
    l.post(&update("r", 1));
    assert_eq!(markers(&l.texts(next)), ["c1"]);
    assert!(l.is_open(other));
}

#[test]
fn kept_alive_pings_cost_no_registration_changes() {
    let mut l = Loop::new(Config::default(), None);
    let key = l.connect(b"GET /ping HTTP/1.1\r\n\r\n".to_vec());
    let registrations = l.stream(key).registrations;
    for _ in 0..200 {
        l.stream(key).input.push_back(b"GET /ping HTTP/1.1\r\n\r\n".to_vec());
        l.step(&[readable(Token(key))]);
    }
    assert_eq!(l.stream(key).registrations, registrations, "no epoll_ctl per request");
    let out = String::from_utf8(std::mem::take(&mut l.stream(key).output)).unwrap();
    assert_eq!(out.matches("{\"ret\": \"pong\"}").count(), 201);
}

#[test]
fn the_key_before_a_reload_is_accepted_for_five_minutes_of_the_loops_own_clock() {
    // The scripted subscriber never answers pings: keep it for the whole grace.
    let quiet = Config {
        ping_interval: Duration::from_secs(600),
        pong_timeout: Duration::from_secs(1200),
        ..Config::default()
    };
    let mut l = Loop::new(quiet, None);
    let sub = l.subscriber("u", &["r"]);
    let event = |commit: &str| json!({"type": "repo-update", "content": {"repo_id": "r", "commit_id": commit}});
    let new_key = b"the-next-key";
    let config = Config {
        jwt_private_key: new_key.to_vec(),
        ..l.server.config.clone()
    };
    l.server.apply_config(config, l.now.mono);
    // NTP steps the wall clock back an hour: the grace must not stretch with it (nor
    // would a step forward cut it short).
    l.now.unix -= 3600;
    l.post_signed(&event("new"), new_key);
    l.post(&event("old, at once"));
    l.advance(KEY_GRACE_SECONDS * 1000 - 300);
    l.post(&event("old, just in time"));
    l.advance(600);
    l.post(&event("old, too late"));
    l.post_signed(&event("new, later"), new_key);
    let commits: Vec<String> = l
        .texts(sub)
        .iter()
        .map(|t| {
            serde_json::from_str::<Value>(t).unwrap()["content"]["commit_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(commits, ["new", "old, at once", "old, just in time", "new, later"]);
}

/// Pongs written to `key` so far.
fn pongs(l: &mut Loop, key: usize) -> usize {
    let out = String::from_utf8(l.stream(key).output.clone()).unwrap();
    out.matches("{\"ret\": \"pong\"}").count()
}

fn writable(token: Token) -> Ready {
    Ready {
        token,
        readable: false,
        writable: true,
        hung_up: false,
    }
}

/// 1,500 pipelined pings and the bytes of their answers.
fn pipelined_pings(l: &mut Loop) -> (Vec<u8>, usize) {
    let ping = b"GET /ping HTTP/1.1\r\n\r\n";
    let one = l.connect(ping.to_vec());
    let answer = l.stream(one).output.len();
    let total = 1_500 * answer;
    assert!(total > 2 * MAX_PENDING_OUTPUT, "the answers pass the output cap");
    (ping.repeat(1_500), total)
}

#[test]
fn pipelined_requests_past_the_output_cap_are_answered_without_another_edge() {
    // 1,500 pings read in one go: their answers pass MAX_PENDING_OUTPUT. No readiness
    // edge will come for requests already read, so the connection must go on with them
    // as its writes free room: at once when the socket takes everything, ...
    let mut l = Loop::new(Config::default(), None);
    let (pings, total) = pipelined_pings(&mut l);
    let key = l.connect(pings.clone());
    assert_eq!(pongs(&mut l, key), 1_500);
    assert!(l.is_open(key));
    // ... and the same from a client that half-closed after them, then the close. (The
    // socket holds the last byte back, so the answers can be looked at before it.)
    let mut stream = ScriptedStream::new([pings]);
    stream.eof = true;
    stream.write_room = total - 1;
    let key = l.connect_stream(stream);
    assert_eq!(pongs(&mut l, key), 1_500);
    l.stream(key).write_room = 1;
    l.step(&[writable(Token(key))]);
    assert!(!l.is_open(key), "closed once all is answered");
    assert_eq!(l.closes("peer_closed"), 1);
}

#[test]
fn pipelined_requests_past_the_output_cap_go_on_at_each_writable_event() {
    // A socket that takes 20,000 bytes per WRITABLE event: every event answers more of
    // the buffered requests, each turn bounded by the output cap, and nothing is read
    // or answered between events (no busy loop).
    for eof in [false, true] {
        let mut l = Loop::new(Config::default(), None);
        let (pings, total) = pipelined_pings(&mut l);
        // After a half-close, the last byte is held back to look at the answers first.
        let end = if eof { total - 1 } else { total };
        let mut stream = ScriptedStream::new([pings]);
        stream.eof = eof;
        stream.write_room = 20_000;
        let key = l.connect_stream(stream);
        let mut events = 0;
        while l.stream(key).output.len() < end {
            let written = l.stream(key).output.len();
            l.step(&[]);
            assert_eq!(l.stream(key).output.len(), written, "written without an event");
            events += 1;
            assert!(events < 100, "stalled at {} answers (eof: {eof})", pongs(&mut l, key));
            l.stream(key).write_room = 20_000.min(end - written);
            l.step(&[writable(Token(key))]);
            assert!(
                l.stream(key).output.len() > written,
                "no progress at a WRITABLE event (eof: {eof})"
            );
        }
        assert!(events >= 5, "each turn stops at the output cap: {events} events");
        assert_eq!(pongs(&mut l, key), 1_500);
        if eof {
            l.stream(key).write_room = 1;
            l.step(&[writable(Token(key))]);
            assert!(!l.is_open(key), "closed once all is answered");
        } else {
            assert!(l.is_open(key));
        }
    }
}
