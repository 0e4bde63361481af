//! The body of every fuzz target, as a plain function of the input bytes.
//!
//! Each function feeds `data` to one part of the server and panics when an invariant
//! breaks; the cargo-fuzz targets in `fuzz/fuzz_targets/` only call them. The regression
//! test `tests/fuzz_regressions.rs` includes this very file, so every input saved under
//! `fuzz/regressions/<target>/` replays through exactly the same code under `cargo test`.
//! That is why only crates the server itself depends on are used here (serde_json,
//! jsonwebtoken, httparse, tungstenite).
//!
//! Inputs that start with a few control bytes (limits, chunk sizes, flags) document their
//! layout on the function; everything after them is the data under test, kept contiguous
//! so that libFuzzer's dictionaries and comparison tracing work on it.

use jsonwebtoken::{Algorithm, EncodingKey};
use notification_server::app::Ctx;
use notification_server::auth::{self, Verifier};
use notification_server::bus::{self, Decoded};
use notification_server::config::{self, Config};
use notification_server::conn::{
    Frame, HttpConn, HttpStep, HttpTally, Listener, Meter, Millis, Sent, Stream, WsConn, WsRead, ms,
};
use notification_server::event::{self, Event, Parsed};
use notification_server::http;
use notification_server::lenient::Object;
use notification_server::ws::{self, ClientMsg};
use serde_json::Value;
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::OnceLock;
use tungstenite::Utf8Bytes;
use tungstenite::protocol::frame::coding::CloseCode;

// The server's scripted test stream, shared by path so there is one copy.
#[path = "../../src/scripted.rs"]
mod scripted;
use scripted::ScriptedStream;

impl Stream for ScriptedStream {
    fn shutdown_write(&self) {}
}

/// A target's body: panics when an invariant breaks.
pub type Target = fn(&[u8]);

/// Every target by name, for the regression test.
pub const TARGETS: &[(&str, Target)] = &[
    ("http_head", http_head),
    ("http_split", http_split),
    ("client_msg", client_msg),
    ("event_body", event_body),
    ("token_raw", token_raw),
    ("token_signed", token_signed),
    ("config_text", config_text),
    ("bus_message", bus_message),
    ("conn", conn),
    ("conn_ws", conn_ws),
];

/// The shared key every target signs and verifies with.
pub const KEY: &[u8] = b"k";

/// The Unix time at which tokens are verified (2027-01-15); seed tokens expire after it.
pub const NOW: i64 = 1_800_000_000;

/// A valid websocket upgrade request, as a Seafile desktop client sends it.
pub const UPGRADE: &[u8] = b"GET /notification HTTP/1.1\r\nHost: seafile.example.com\r\nUser-Agent: Seafile/9.0\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// What a metrics listener would serve, for connections that play one.
const METRICS: &str = "# TYPE notification_server_up gauge\nnotification_server_up 1\n";

// ---------------------------------------------------------------------------------------
// http_head: the request head parser.

/// `http::parse_head` on arbitrary bytes, then `ws::check_upgrade` on what it accepts.
///
/// Layout: `[head_lo, head_hi, body_sel, buf...]`: `max_head` is the first two bytes
/// (0..=16383), `max_body` comes from the third (tiny, default, unbounded or a multiple
/// of 1000), `buf` is what the connection has received.
pub fn http_head(data: &[u8]) {
    let [lo, hi, body_sel, buf @ ..] = data else {
        return;
    };
    let max_head = usize::from(u16::from_le_bytes([*lo, *hi]) & 0x3fff);
    let max_body = match body_sel >> 6 {
        0 => usize::from(body_sel & 63),
        1 => 64 * 1024,
        2 => usize::MAX,
        _ => usize::from(body_sel & 63) * 1000,
    };
    match http::parse_head(buf, max_head, max_body) {
        Ok(None) => assert!(buf.len() <= max_head, "asked for more bytes past max_head"),
        Ok(Some(head)) => {
            assert!(
                head.len > 0 && head.len <= buf.len(),
                "head length {} out of the buffer",
                head.len
            );
            assert!(
                head.len <= max_head,
                "head of {} bytes over max_head {max_head}",
                head.len
            );
            assert!(head.content_length <= max_body, "body over max_body accepted");
            // The head does not depend on the bytes after it: the head alone parses the same,
            // and any strict prefix of it asks for more (a request split across reads is
            // read exactly as one that came whole).
            assert_eq!(
                http::parse_head(buf.get(..head.len).unwrap_or_default(), max_head, max_body),
                Ok(Some(head.clone())),
                "the head parses differently without what follows it"
            );
            let cut = usize::from(*lo) % head.len;
            assert_eq!(
                http::parse_head(buf.get(..cut).unwrap_or_default(), max_head, max_body),
                Ok(None),
                "a prefix of {cut} bytes of a valid head is not 'need more'"
            );
            match ws::check_upgrade(&head) {
                Ok(accept) => {
                    assert_eq!(head.method, "GET");
                    assert!(head.connection_upgrade && head.upgrade_websocket);
                    assert_eq!(accept.len(), 28, "Sec-WebSocket-Accept {accept:?}");
                    check_response(&ws::switching_protocols(&accept));
                }
                Err(refusal) => check_response(&refusal),
            }
        }
        Err(reject) => check_response(&reject.response()),
    }
}

/// A response the server writes must be one complete HTTP/1.1 response whose body is
/// exactly its Content-Length (101 has neither).
fn check_response(bytes: &[u8]) {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(n)) = resp.parse(bytes) else {
        panic!("not a complete HTTP response: {:?}", String::from_utf8_lossy(bytes));
    };
    let length = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok());
    let expected = if resp.code == Some(101) {
        None
    } else {
        Some(bytes.len() - n)
    };
    assert_eq!(length, expected, "{:?}", String::from_utf8_lossy(bytes));
}

// ---------------------------------------------------------------------------------------
// Connections: shared set-up.

/// The peer address every connection pretends to come from.
fn peer() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 40000))
}

/// A valid configuration picked by the low two bits of `sel`: the defaults, or smaller
/// limits that the fuzzer can reach (all within the minima `Config::load` enforces).
/// Built once: the fixtures below are immutable, so sharing them between inputs changes
/// nothing but the time per input.
fn config(sel: u8) -> &'static Config {
    static CONFIGS: OnceLock<[Config; 4]> = OnceLock::new();
    let configs = CONFIGS.get_or_init(|| [0, 1, 2, 3].map(build_config));
    &configs[usize::from(sel & 3)]
}

fn build_config(sel: u8) -> Config {
    let mut c = Config {
        jwt_private_key: KEY.to_vec(),
        ..Config::default()
    };
    let (head, body, message, read_buffer, unsent) = match sel & 3 {
        0 => return c,
        1 => (256, 64, 128, 16, 1024),
        2 => (600, 400, 300, 64, 1024),
        _ => (2048, 2048, 4096, 256, 4096),
    };
    c.max_head_bytes = head;
    c.max_body_bytes = body;
    c.max_message_bytes = message;
    c.ws_read_buffer_bytes = read_buffer;
    c.max_unsent_bytes = unsent;
    c
}

/// The verifier for [`KEY`], built once.
fn verifier() -> &'static Verifier {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    VERIFIER.get_or_init(|| Verifier::new(KEY))
}

fn ctx<'a>(config: &'a Config, verifier: &'a Verifier, now: Millis, draining: bool, metrics: bool) -> Ctx<'a> {
    Ctx {
        config,
        verifier,
        unix_now: NOW,
        now,
        draining,
        metrics: metrics.then_some(METRICS),
        taking_events: true,
    }
}

/// Everything an HTTP connection visibly did, to compare two deliveries of the same bytes.
#[derive(Debug, PartialEq)]
struct HttpOutcome {
    /// Written bytes (always ASCII, as text for readable failures), without the interim
    /// `100 Continue` answers: those depend on whether the body came with the head, by design.
    output: String,
    events: Vec<Event>,
    last_step: Option<HttpStep>,
    requests: u64,
    token_rejections: Vec<auth::TokenError>,
    events_ignored: u64,
    events_invalid: u64,
}

/// Runs an HTTP connection over `segments`, one readiness turn per segment, then the end
/// of stream, with a socket that takes any amount of output.
fn run_http(sel: u8, segments: &[&[u8]]) -> HttpOutcome {
    let config = config(sel);
    let verifier = verifier();
    let (draining, metrics) = (sel & 4 != 0, sel & 8 != 0);
    let mut conn = HttpConn::new(ScriptedStream::new([]), peer(), listener(metrics), 0, config);
    let mut events = Vec::new();
    let mut tally = HttpTally::default();
    let mut last_step = None;
    for (turn, segment) in segments.iter().map(Some).chain([None]).enumerate() {
        match segment {
            Some(s) => conn.stream_mut().input.push_back(s.to_vec()),
            None => conn.stream_mut().eof = true,
        }
        let now = turn as Millis * 10;
        let turn = conn.on_ready(&ctx(config, verifier, now, draining, metrics));
        events.extend(turn.events);
        add_tally(&mut tally, turn.tally);
        let step = turn.step;
        let stop = matches!(step, HttpStep::Close(_) | HttpStep::Upgrade);
        last_step = Some(step);
        if stop {
            break;
        }
    }
    for e in &events {
        check_event(e, None);
    }
    HttpOutcome {
        output: String::from_utf8_lossy(&remove_all(&conn.stream().output, http::CONTINUE)).into_owned(),
        events,
        last_step,
        requests: tally.requests,
        token_rejections: tally.token_rejections,
        events_ignored: tally.events_ignored,
        events_invalid: tally.events_invalid,
    }
}

/// Which listener the connection came from.
fn listener(metrics: bool) -> Listener {
    if metrics { Listener::Metrics } else { Listener::Public }
}

/// Adds one turn's counters to the whole run's.
fn add_tally(total: &mut HttpTally, turn: HttpTally) {
    total.requests += turn.requests;
    total.token_rejections.extend(turn.token_rejections);
    total.events_ignored += turn.events_ignored;
    total.events_invalid += turn.events_invalid;
}

fn remove_all(haystack: &[u8], needle: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    while !rest.is_empty() {
        if rest.starts_with(needle) {
            rest = rest.get(needle.len()..).unwrap_or_default();
        } else {
            out.extend_from_slice(rest.get(..1).unwrap_or_default());
            rest = rest.get(1..).unwrap_or_default();
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// http_split: the same bytes, whole or in pieces.

/// Feeds the same request bytes to two HTTP connections, once in one read and once split
/// at fuzzer-chosen points with a readiness turn per piece, and requires the same answers,
/// events, counters and outcome: TCP may cut a request anywhere.
///
/// Layout: `[sel, n_cuts, cuts[n_cuts % 8]..., bytes...]`: `sel` picks the configuration
/// (bits 0-1), draining (bit 2) and the metrics listener (bit 3); each cut byte is the
/// length of the next piece minus one.
pub fn http_split(data: &[u8]) {
    let [sel, n_cuts, rest @ ..] = data else {
        return;
    };
    let (cuts, bytes) = rest.split_at(usize::from(n_cuts % 8).min(rest.len()));
    let mut pieces = Vec::new();
    let mut left = bytes;
    for cut in cuts {
        let (piece, tail) = left.split_at((usize::from(*cut) + 1).min(left.len()));
        pieces.push(piece);
        left = tail;
    }
    pieces.push(left);
    let whole = run_http(*sel, &[bytes]);
    let split = run_http(*sel, &pieces);
    assert_eq!(whole, split, "the answers depend on how the bytes were split");
}

// ---------------------------------------------------------------------------------------
// conn / conn_ws: one connection's whole life on a scripted socket.

/// One connection, HTTP and then maybe websocket, driven as the server drives it: each
/// readiness turn delivers a chunk of the input and lets the socket take a limited amount
/// of output; on the websocket the server also queues events, pings and closes.
///
/// Layout: `[sel, n_ctl, ctl[n_ctl % 16]..., bytes...]`. `sel` picks the configuration
/// (bits 0-1), draining (bit 2), the metrics listener (bit 3) and whether the stream ends
/// after the last byte (bit 4). Turn `i` uses control byte `ctl[i % n]` (see [`Turn`]).
/// Checks: no panic, the loop ends, output stays proportional to input, a full socket is
/// the only reason to wait for WRITABLE, a connection that waits for nothing (no WRITABLE)
/// has nothing left to do until new bytes come (the server would not call it before: a
/// turn without a readiness event must do nothing), every accepted event and every token
/// verdict keeps its invariants.
pub fn conn(data: &[u8]) {
    run_conn(data, b"", true);
}

/// Like [`conn`], with a valid upgrade request always in front of `bytes`, so nearly every
/// input reaches the websocket phase: the rest is websocket frames from the client (mask
/// them with a zero key to keep them readable).
pub fn conn_ws(data: &[u8]) {
    run_conn(data, UPGRADE, false);
}

/// What one readiness turn does, decoded from a control byte.
#[derive(Debug, Clone, Copy)]
struct Turn {
    /// Bytes that arrive this turn.
    chunk: usize,
    /// Bytes the socket accepts this turn (then `WouldBlock`).
    room: usize,
    /// What the server does on a websocket besides reading and flushing.
    action: Action,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Action {
    None,
    /// Fan out an event frame to this connection.
    Send,
    /// A keep-alive ping.
    Ping,
    Both,
    /// An event frame of half the output cap (two in a row evict a slow reader).
    SendBig,
    /// Start closing, as on shutdown.
    Close,
}

impl Turn {
    /// bits 0-2: chunk size; bits 3-4: socket room; bits 5-7: action.
    fn from_byte(c: u8) -> Turn {
        const CHUNKS: [usize; 8] = [1, 2, 5, 17, 64, 300, 1500, usize::MAX];
        const ROOMS: [usize; 4] = [0, 1, 60, usize::MAX];
        const ACTIONS: [Action; 8] = [
            Action::None,
            Action::Send,
            Action::Ping,
            Action::Both,
            Action::None,
            Action::SendBig,
            Action::None,
            Action::Close,
        ];
        Turn {
            chunk: CHUNKS[usize::from(c & 7)],
            room: ROOMS[usize::from((c >> 3) & 3)],
            action: ACTIONS[usize::from(c >> 5)],
        }
    }
}

/// Turns after the input is used up: the socket drains, the stream ends (if asked).
const FINAL_TURNS: usize = 3;

/// How much the HTTP side may write per input byte, at most: the smallest request
/// (`A / HTTP/1.1\n\n`, 14 bytes) draws a 404 of about 150 bytes, plus a `100 Continue`.
const HTTP_AMPLIFICATION: usize = 40;

fn run_conn(data: &[u8], prefix: &[u8], allow_refusals: bool) {
    let [sel, n_ctl, rest @ ..] = data else {
        return;
    };
    let (ctl, bytes) = rest.split_at(usize::from(n_ctl % 16).min(rest.len()));
    let input = [prefix, bytes].concat();
    let config = config(*sel);
    let verifier = verifier();
    let draining = allow_refusals && sel & 4 != 0;
    let metrics = allow_refusals && sel & 8 != 0;
    let eof_at_end = sel & 16 != 0;

    // The turns: one per chunk of input, then a few with unlimited room.
    let mut turns = Vec::new();
    let mut at = 0;
    while at < input.len() {
        let c = ctl.get(turns.len() % ctl.len().max(1)).copied().unwrap_or(0x1f);
        let turn = Turn::from_byte(c);
        let end = at.saturating_add(turn.chunk).min(input.len());
        turns.push((input.get(at..end).unwrap_or_default(), turn));
        at = end;
    }
    let last = Turn {
        chunk: 0,
        room: usize::MAX,
        action: Action::None,
    };
    turns.extend([(&[][..], last); FINAL_TURNS]);
    let final_from = turns.len() - FINAL_TURNS;

    // HTTP phase.
    let mut conn = HttpConn::new(ScriptedStream::new([]), peer(), listener(metrics), 0, config);
    let mut fed = 0usize;
    let mut turns = turns.into_iter().enumerate();
    // The last turn ended waiting for nothing but new bytes (no WRITABLE registered).
    let mut quiet = false;
    let upgraded = loop {
        let Some((i, (chunk, turn))) = turns.next() else {
            return;
        };
        let now = i as Millis * 10;
        fed += chunk.len();
        // New bytes or the end of stream: what raises a readiness event for a quiet socket.
        let edge = !chunk.is_empty() || (eof_at_end && i == final_from);
        let stream = conn.stream_mut();
        if !chunk.is_empty() {
            stream.input.push_back(chunk.to_vec());
        }
        stream.write_room = turn.room;
        stream.eof |= eof_at_end && i >= final_from;
        let before = stream.output.len();
        let step = conn.on_ready(&ctx(config, verifier, now, draining, metrics));
        if quiet && !edge {
            assert!(
                conn.stream().output.len() == before && step.step == HttpStep::Wait,
                "a turn without a readiness event answered more: the last turn left requests behind that nothing would wake it for"
            );
        }
        for e in step.events {
            check_event(&e, None);
        }
        let written = conn.stream().output.len();
        assert!(
            written <= HTTP_AMPLIFICATION * fed + 1024,
            "{written} bytes written for {fed} bytes read"
        );
        match step.step {
            HttpStep::Wait => {
                assert!(
                    !conn.wants_write() || conn.stream().write_room == 0,
                    "waits for WRITABLE with room left"
                );
                quiet = !conn.wants_write();
            }
            HttpStep::Close(_) => return,
            HttpStep::Upgrade => {
                let out = &conn.stream().output;
                let start = find(out, b"HTTP/1.1 101 Switching Protocols\r\n").expect("upgrade without a 101");
                assert!(
                    out.get(start..).is_some_and(|r| r.ends_with(b"\r\n\r\n")),
                    "the 101 is not the last thing written"
                );
                break i;
            }
        }
    };

    // Websocket phase: what `Server::read_ws`, the fan-out and the flush do.
    let meter = Meter::default();
    let mut ws = conn.into_ws(upgraded as Millis * 10, config, &meter);
    let ws_start = ws.stream().output.len();
    let event_frame = Frame::text(ws_event_frame().as_bytes(), &meter);
    let big_frame = Frame::text(big_frame(*sel).as_bytes(), &meter);
    // Bytes of the frames we queued ourselves, for the output bound.
    let mut queued = 0usize;
    for (i, (chunk, turn)) in turns {
        let now = i as Millis * 10;
        let close_by = now + ms(config.close_timeout);
        fed += chunk.len();
        let stream = ws.stream_mut();
        // (An empty chunk would read as the end of stream.)
        if !chunk.is_empty() {
            stream.input.push_back(chunk.to_vec());
        }
        stream.write_room = turn.room;
        stream.eof |= eof_at_end && i >= final_from;
        // Loop turns are numbered from 1 (turn 0 is the connection's first budget).
        ws.begin_turn(i as u64 + 1, config.max_messages_per_wakeup);
        if ws_turn(
            &mut ws,
            turn,
            config,
            verifier,
            now,
            close_by,
            &mut queued,
            &event_frame,
            &big_frame,
        )
        .is_err()
        {
            return;
        }
        let written = ws.stream().output.len() - ws_start;
        assert!(
            written <= 2 * fed + queued + 1024,
            "{written} websocket bytes written for {fed} bytes read and {queued} queued"
        );
    }
    // Every queued byte is accounted for, and given back when the connection ends.
    drop(ws);
    drop((event_frame, big_frame));
    assert_eq!(meter.held(), 0, "output memory not given back");
}

/// The event frame a subscriber would get (parsed once).
fn ws_event_frame() -> &'static Utf8Bytes {
    static FRAME: OnceLock<Utf8Bytes> = OnceLock::new();
    FRAME.get_or_init(
        || match event::parse(br#"{"type":"repo-update","content":{"repo_id":"r1","commit_id":"c1"}}"#) {
            Parsed::Event(e) => e.frame,
            other => panic!("the sample event does not parse: {other:?}"),
        },
    )
}

/// An event frame of half the output cap of configuration `sel` (built once per
/// configuration: up to 128 KiB each).
fn big_frame(sel: u8) -> &'static Utf8Bytes {
    static FRAMES: OnceLock<[Utf8Bytes; 4]> = OnceLock::new();
    let frames =
        FRAMES.get_or_init(|| [0, 1, 2, 3].map(|s| Utf8Bytes::from("x".repeat(config(s).max_unsent_bytes / 2))));
    &frames[usize::from(sel & 3)]
}

/// Room for the websocket frame header around a payload we queue.
const FRAME_OVERHEAD: usize = 14;

/// One websocket turn; `Err` when the server would tear the connection down.
#[allow(clippy::too_many_arguments)]
fn ws_turn(
    ws: &mut WsConn<ScriptedStream>,
    turn: Turn,
    config: &Config,
    verifier: &Verifier,
    now: Millis,
    close_by: Millis,
    queued: &mut usize,
    event_frame: &Frame,
    big_frame: &Frame,
) -> Result<(), ()> {
    let send = |ws: &mut WsConn<ScriptedStream>, frame: &Frame, queued: &mut usize| {
        *queued += frame.len() + FRAME_OVERHEAD;
        match ws.send(frame, now) {
            Sent::Queued { .. } | Sent::Discarded => Ok(()),
            Sent::Evict(_) => Err(()),
        }
    };
    let send_text = |ws: &mut WsConn<ScriptedStream>, msg: &Utf8Bytes, queued: &mut usize| {
        *queued += msg.len() + FRAME_OVERHEAD;
        match ws.send_text(msg, now) {
            Sent::Queued { .. } | Sent::Discarded => Ok(()),
            Sent::Evict(_) => Err(()),
        }
    };
    // The connection's budget for the turn (frames, entries, bytes) ends the reading.
    loop {
        match ws.read_one(now, close_by) {
            WsRead::Msg(ClientMsg::Subscribe(repos)) => {
                if repos.len() > config.max_repos_per_connection {
                    // Refused whole (Close 1008) before any entry is looked at.
                    return Err(());
                }
                ws.spend_entries(repos.len());
                for (repo_id, token) in repos {
                    match verifier.verify_client(&token, &repo_id, NOW) {
                        Ok(grant) => assert!(grant.exp > NOW, "granted until {} <= now", grant.exp),
                        Err(_) => {
                            let msg = event::jwt_expired(&repo_id);
                            check_jwt_expired(&msg, &repo_id);
                            send_text(ws, &msg, queued)?;
                        }
                    }
                }
            }
            WsRead::Msg(ClientMsg::Unsubscribe(_)) | WsRead::Control => {}
            WsRead::Drained => break,
            WsRead::Close(_) => return Err(()),
        }
    }
    if matches!(turn.action, Action::Send | Action::Both) {
        send(ws, event_frame, queued)?;
    }
    if turn.action == Action::SendBig {
        send(ws, big_frame, queued)?;
    }
    if matches!(turn.action, Action::Ping | Action::Both) {
        *queued += FRAME_OVERHEAD;
        if let Sent::Evict(_) = ws.ping(now) {
            return Err(());
        }
    }
    if turn.action == Action::Close {
        *queued += 128;
        ws.start_close(CloseCode::Away, "server shutting down", close_by);
    }
    ws.flush(now).map(|_| ()).map_err(|_| ())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------
// client_msg and event_body: the JSON parsers.

/// `ws::parse_client` on a frame payload: only JSON objects are ever accepted, never
/// more entries than the cap, and every repo id it returns can be echoed back in a valid
/// `jwt-expired` message.
pub fn client_msg(data: &[u8]) {
    const CAP: usize = 8;
    let Ok(msg) = ws::parse_client(data, CAP) else {
        return;
    };
    assert!(
        msg.entries() <= CAP,
        "{} entries accepted over a cap of {CAP}",
        msg.entries()
    );
    assert!(is_json_object(data), "accepted a message that is not a JSON object");
    let ids: Vec<&String> = match &msg {
        ClientMsg::Subscribe(repos) => repos.iter().map(|(id, _)| id).collect(),
        ClientMsg::Unsubscribe(ids) => ids.iter().collect(),
    };
    for id in ids {
        check_jwt_expired(&event::jwt_expired(id), id);
    }
}

/// `event::parse` on a `/events` body: an accepted event's frame is one line of valid JSON
/// `{"type":<kind>,"content":<content>}` with the body's content, whitespace removed, and
/// the repo id it was routed by. Also `jwt_expired` on the body as a repo id.
pub fn event_body(data: &[u8]) {
    match event::parse(data) {
        Parsed::Event(e) => check_event(&e, Some(data)),
        Parsed::Ignored(_) => assert!(is_json_object(data), "a body that is not a JSON object was not Invalid"),
        Parsed::Invalid => {}
    }
    let id = String::from_utf8_lossy(data);
    check_jwt_expired(&event::jwt_expired(&id), &id);
}

/// Syntax-checks `bytes` as exactly one JSON object (numbers are not range-checked,
/// matching what the server's raw-value parsing accepts).
fn is_json_object(bytes: &[u8]) -> bool {
    serde_json::from_slice::<BTreeMap<String, &RawValue>>(bytes).is_ok()
}

/// The invariants of an accepted event; `body` is the `/events` body it came from.
fn check_event(e: &Event, body: Option<&[u8]>) {
    let frame = e.frame.as_str();
    let line = frame.strip_suffix('\n').expect("frame does not end with a newline");
    assert!(!line.contains('\n'), "frame is more than one line: {frame:?}");
    let prefix = format!("{{\"type\":\"{}\",\"content\":", e.kind.name());
    assert!(
        line.starts_with(&prefix),
        "frame does not start with {prefix}: {frame:?}"
    );
    let top: BTreeMap<String, &RawValue> =
        serde_json::from_str(line).unwrap_or_else(|err| panic!("frame is not a JSON object ({err}): {frame:?}"));
    assert_eq!(top.len(), 2, "frame has other keys than type and content: {frame:?}");
    let kind: String = top
        .get("type")
        .and_then(|t| serde_json::from_str(t.get()).ok())
        .expect("type");
    assert_eq!(kind, e.kind.name());
    let content = top.get("content").expect("content").get();
    assert!(!e.repo_id.is_empty(), "event without a repo id");
    let repo_id = Object::parse(content)
        .ok()
        .and_then(|c| c.string("repo_id").ok().flatten());
    assert_eq!(
        repo_id.as_deref(),
        Some(e.repo_id.as_str()),
        "frame's repo_id: {frame:?}"
    );
    // Compaction only removes whitespace: the content means what the sender sent.
    let sent = body
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|b| Object::parse(b).ok()?.get("content"));
    if let Some(sent) = sent
        && let (Ok(a), Ok(b)) = (
            serde_json::from_str::<Value>(sent.get()),
            serde_json::from_str::<Value>(content),
        )
    {
        assert_eq!(a, b, "content changed on the way: {frame:?}");
    }
}

/// A `jwt-expired` message is one line of valid JSON that gives back the repo id.
fn check_jwt_expired(msg: &Utf8Bytes, repo_id: &str) {
    let s = msg.as_str();
    let line = s.strip_suffix('\n').expect("jwt-expired does not end with a newline");
    assert!(!line.contains('\n'), "jwt-expired is more than one line: {s:?}");
    let v: Value = serde_json::from_str(line).unwrap_or_else(|err| panic!("jwt-expired is not JSON ({err}): {s:?}"));
    assert_eq!(v["type"], "jwt-expired");
    assert_eq!(v["content"]["repo_id"].as_str(), Some(repo_id), "{s:?}");
}

// ---------------------------------------------------------------------------------------
// token_raw and token_signed: verification.

/// Arbitrary text as an event and as a client token, and as the `Authorization` and
/// `Seafile-Repo-Token` headers it would come in.
pub fn token_raw(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let v = verifier();
    let _ = v.verify_event(token, NOW);
    if let Ok(grant) = v.verify_client(token, "r1", NOW) {
        assert!(grant.exp > NOW, "granted until {} <= now", grant.exp);
    }
    for picked in [
        auth::event_token(Some(token), None),
        auth::event_token(None, Some(token)),
    ]
    .into_iter()
    .flatten()
    {
        assert!(!picked.is_empty() && token.contains(picked));
    }
}

/// A token with a fuzzed header and fuzzed claims, correctly signed with [`KEY`], so that
/// everything after the signature check is reached.
///
/// Layout: `[mode, rest...]`. Mode bits 0-1 pick the signing algorithm (HS256, HS384,
/// HS512, HS256); bit 2: the header is `rest` up to its first newline and the claims are
/// what follows (else a standard header for the algorithm and all of `rest`); bits 3-5
/// pick `now` among edge values; bit 6: the rotated verifier has forgotten the old key
/// (its grace is over) or not.
///
/// Checks: an accepted client token expires after now; accepted claims are a JSON object;
/// a changed signature is refused; a verifier whose key was rotated away accepts exactly
/// what the old key accepted while in grace, and nothing once it forgot the old key.
pub fn token_signed(data: &[u8]) {
    let [mode, rest @ ..] = data else {
        return;
    };
    let alg = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512, Algorithm::HS256][usize::from(mode & 3)];
    let (header, claims) = if mode & 4 != 0 {
        match rest.iter().position(|b| *b == b'\n') {
            Some(nl) => (
                rest.get(..nl).unwrap_or_default(),
                rest.get(nl + 1..).unwrap_or_default(),
            ),
            None => (rest, &[][..]),
        }
    } else {
        let standard: &[u8] = match alg {
            Algorithm::HS384 => br#"{"alg":"HS384","typ":"JWT"}"#,
            Algorithm::HS512 => br#"{"alg":"HS512","typ":"JWT"}"#,
            _ => br#"{"alg":"HS256","typ":"JWT"}"#,
        };
        (standard, rest)
    };
    let now_sel = usize::from((mode >> 3) & 7);
    let now = SIGNED_NOWS[now_sel];
    let grace_over = mode & 64 != 0;
    let token = sign_token(alg, header, claims, KEY);
    // The repo the claims name (when they are an object with a string repo_id), so that
    // verify_client gets past the repo check; else another one.
    let repo_id = serde_json::from_slice::<BTreeMap<String, Value>>(claims)
        .ok()
        .and_then(|m| m.get("repo_id").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| "r1".into());

    let v = verifier();
    let as_event = v.verify_event(&token, now);
    let as_client = v.verify_client(&token, &repo_id, now);
    if let Ok(grant) = &as_client {
        assert!(grant.exp > now, "granted until {} <= now {now}", grant.exp);
    }
    if as_event.is_ok() || as_client.is_ok() {
        assert!(is_json_object(claims), "accepted claims that are not a JSON object");
        let tampered = tamper(&token);
        assert!(v.verify_event(&tampered, now).is_err(), "accepted a changed signature");
        assert!(
            v.verify_client(&tampered, &repo_id, now).is_err(),
            "accepted a changed signature"
        );
    }

    let rotated = rotated(grace_over);
    let (r_event, r_client) = (
        rotated.verify_event(&token, now),
        rotated.verify_client(&token, &repo_id, now),
    );
    if !grace_over {
        assert_eq!(
            (r_event, r_client),
            (as_event, as_client),
            "the old key is not honoured in grace"
        );
    } else {
        assert!(
            r_event.is_err() && r_client.is_err(),
            "the old key is accepted after its grace"
        );
    }
}

/// The `now` values `token_signed` picks from: edges of the i64 range and of the epoch.
const SIGNED_NOWS: [i64; 8] = [
    NOW,
    0,
    -1,
    1,
    i64::MAX,
    i64::MIN,
    NOW + 1_000_000_000,
    NOW - 1_000_000_000,
];

/// A verifier whose key [`KEY`] was rotated away, still in grace or with the old key
/// forgotten (each built once).
fn rotated(grace_over: bool) -> &'static Verifier {
    static ROTATED: OnceLock<[Verifier; 2]> = OnceLock::new();
    let [in_grace, over] = ROTATED.get_or_init(|| {
        let mut in_grace = Verifier::new(KEY);
        in_grace.rotate(b"the next key");
        let mut over = Verifier::new(KEY);
        over.rotate(b"the next key");
        over.forget_previous();
        [in_grace, over]
    });
    if grace_over { over } else { in_grace }
}

/// `header.claims.signature`, each part base64url without padding, signed with `key`.
pub fn sign_token(alg: Algorithm, header: &[u8], claims: &[u8], key: &[u8]) -> String {
    let message = format!("{}.{}", base64url(header), base64url(claims));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &EncodingKey::from_secret(key), alg)
        .unwrap_or_else(|e| panic!("HMAC signing failed: {e}"));
    format!("{message}.{signature}")
}

/// The token with the first character of its signature changed (6 whole bits of it).
fn tamper(token: &str) -> String {
    let dot = token.rfind('.').map_or(0, |d| d + 1);
    let mut t = token.to_string();
    let replacement = if t.get(dot..).is_some_and(|s| s.starts_with('A')) {
        "B"
    } else {
        "A"
    };
    if t.len() > dot {
        t.replace_range(dot..dot + 1, replacement);
    }
    t
}

/// Base64url without padding, as JWTs use it.
fn base64url(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [0, 1, 2].map(|i| chunk.get(i).copied().unwrap_or(0));
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// config_text: seafile.conf and the environment.

/// `Config::load` on arbitrary seafile.conf text, optionally with one environment variable
/// set. A loaded configuration passes its own cross-key rules and yields a tungstenite
/// configuration; an error is one line.
///
/// Layout: `[sel, text...]`. When sel bit 7 is set, `text` is split at its first NUL and
/// what follows is the value of the variable of key `sel & 127` (modulo the key count).
///
/// `metrics_listen` is left out on purpose: its value is resolved with `ToSocketAddrs`,
/// which would send DNS queries for arbitrary host names. Inputs naming it are skipped.
pub fn config_text(data: &[u8]) {
    let [sel, rest @ ..] = data else {
        return;
    };
    let (file, env_value) = match rest.iter().position(|b| *b == 0) {
        Some(nul) if sel & 128 != 0 => (rest.get(..nul).unwrap_or_default(), rest.get(nul + 1..)),
        _ => (rest, None),
    };
    let (Ok(text), Ok(env_value)) = (
        std::str::from_utf8(file),
        env_value.map(std::str::from_utf8).transpose(),
    ) else {
        return;
    };
    if text.to_ascii_lowercase().contains("metrics_listen") {
        return;
    }
    static VARS: OnceLock<Vec<&'static str>> = OnceLock::new();
    let vars = VARS.get_or_init(|| {
        config::keys()
            .filter(|(k, _)| *k != "metrics_listen")
            .map(|(_, v)| v)
            .collect()
    });
    let var = vars.get(usize::from(sel & 127) % vars.len().max(1)).copied();
    let env = |name: &str| match env_value {
        Some(value) if Some(name) == var => Some(value.to_string()),
        _ => None,
    };
    match Config::load(Some(("seafile.conf", text)), &env) {
        Ok(c) => {
            assert!(!c.jwt_private_key.is_empty(), "loaded without a key");
            assert!(c.pong_timeout > c.ping_interval, "pong_timeout not over ping_interval");
            assert!(
                c.max_unsent_bytes >= c.max_body_bytes + 64,
                "max_unsent_bytes too small"
            );
            assert!(c.max_head_bytes >= 256 && c.max_body_bytes >= 64 && c.max_message_bytes >= 128);
            assert!(c.ws_read_buffer_bytes >= 16 && c.max_connections >= 1 && c.max_messages_per_wakeup >= 1);
            let _ = ws::socket_config(&c);
            assert!(!c.listen_address().is_empty());
            let _ = ms(c.write_timeout) + ms(c.shutdown_timeout) + ms(c.http_idle_timeout);
        }
        Err(e) => assert!(
            !e.0.contains('\n'),
            "a configuration error of more than one line: {:?}",
            e.0
        ),
    }
}

// ---------------------------------------------------------------------------------------
// bus_message: the scale-out channel.

/// `bus::decode` on a message from the Redis channel. A decoded event has a repo id and a
/// newline-terminated frame, and survives the way back: encoded by another instance it
/// decodes to the same event here, once (the same message again is a repeat), and is
/// recognised as its own by the sender.
pub fn bus_message(data: &[u8]) {
    let mut seen = bus::Seen::default();
    let Decoded::Event(e) = bus::decode("this-instance", data, &mut seen) else {
        return;
    };
    assert!(!e.repo_id.is_empty(), "bus event without a repo id");
    assert!(e.frame.as_str().ends_with('\n'), "bus frame without its newline");
    assert!(seen.len() <= 1, "one message remembered {} senders", seen.len());
    let wire = bus::encode("other-instance", &e, None).expect("a decoded event does not encode");
    assert_eq!(bus::decode("other-instance", wire.as_bytes(), &mut seen), Decoded::Own);
    assert_eq!(
        bus::decode("this-instance", wire.as_bytes(), &mut seen),
        Decoded::Event(e),
        "the event changed on its way through the bus: {wire}"
    );
    assert_eq!(
        bus::decode("this-instance", wire.as_bytes(), &mut seen),
        Decoded::Repeat,
        "the same message twice was delivered twice: {wire}"
    );
}
