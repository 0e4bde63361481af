//! The HTTP/1.1 transport of one connection: reads into a bounded buffer, frames
//! requests (heads with caps, Content-Length bodies, `Expect: 100-continue`), hands each
//! complete request to [`crate::app`] and writes the answers in order, with back-pressure
//! for clients that pipeline without reading. It owns its deadlines (head, idle).

use super::{CloseReason, Interest, Listener, Millis, Stream, WsConn};
use crate::app::{self, Count, Ctx, Request, Then};
use crate::auth::TokenError;
use crate::config::Config;
use crate::event::Event;
use crate::http;
use std::io;
use std::net::SocketAddr;

/// Answer bytes an HTTP connection may have waiting for the socket before it stops
/// reading further requests (back-pressure for clients that pipeline without reading).
pub const MAX_PENDING_OUTPUT: usize = 64 * 1024;

/// Buffers above this capacity are given back when a keep-alive connection goes idle.
const IDLE_BUFFER_KEEP: usize = 4096;

/// What the reactor must do after an HTTP connection did its work.
#[derive(Debug, PartialEq, Eq)]
pub enum HttpStep {
    /// Wait for more readiness.
    Wait,
    /// The 101 is out: turn this into a websocket.
    Upgrade,
    /// Tear down.
    Close(CloseReason),
}

/// Counters an HTTP connection reports back for metrics.
#[derive(Debug, Default, Clone)]
pub struct HttpTally {
    pub requests: u64,
    /// Causes of refused event tokens (rare, so a list is fine).
    pub token_rejections: Vec<TokenError>,
    pub events_ignored: u64,
    pub events_invalid: u64,
    pub events_forbidden: u64,
}

impl HttpTally {
    fn record(&mut self, count: Option<Count>) {
        match count {
            Some(Count::EventTokenRejected(e)) => self.token_rejections.push(e),
            Some(Count::EventIgnored) => self.events_ignored += 1,
            Some(Count::EventInvalid) => self.events_invalid += 1,
            Some(Count::EventForbidden) => self.events_forbidden += 1,
            None => {}
        }
    }
}

/// What one readiness turn of an HTTP connection produced.
#[derive(Debug)]
pub struct HttpTurn {
    pub step: HttpStep,
    /// Accepted events, in order; their 200s are already written (or queued behind a
    /// full socket), so `/events` is answered before any fan-out.
    pub events: Vec<Event>,
    pub tally: HttpTally,
    /// A complete `/events` request now waits for the server to take events again
    /// (`Ctx::taking_events`); the reactor serves the connection again when it does.
    pub held: bool,
}

/// A connection speaking HTTP/1.1.
pub struct HttpConn<S = crate::socket::Socket> {
    stream: S,
    peer: SocketAddr,
    listener: Listener,
    /// Received bytes not yet consumed; at most `max_head_bytes + max_body_bytes`.
    inbuf: Vec<u8>,
    /// Response bytes not yet written.
    out: Vec<u8>,
    /// When the current request must be complete, or the idle connection closes.
    deadline: Millis,
    /// Whether `deadline` is the idle keep-alive one (no request under way).
    idle: bool,
    sent_continue: bool,
    close_after_write: Option<CloseReason>,
    upgrade_after_write: bool,
    /// `X-Forwarded-For` of the upgrade request, kept for the websocket's log lines.
    forwarded_for: Option<Box<str>>,
    interest: Interest,
    /// A complete `/events` request waits in `inbuf` for the server to take events
    /// again. Nothing more is read meanwhile (the sender's requests wait in the kernel),
    /// and the timers do not judge the connection: the wait is the server's.
    holding_event: bool,
    /// On the reactor's queue of connections waiting for ingest (server/ingest.rs).
    queued_for_ingest: bool,
}

impl<S: Stream> HttpConn<S> {
    pub fn new(stream: S, peer: SocketAddr, listener: Listener, now: Millis, config: &Config) -> HttpConn<S> {
        HttpConn {
            stream,
            peer,
            listener,
            inbuf: Vec::new(),
            out: Vec::new(),
            deadline: now + super::ms(config.http_head_timeout),
            idle: false,
            sent_continue: false,
            close_after_write: None,
            upgrade_after_write: false,
            forwarded_for: None,
            interest: Interest::default(),
            holding_event: false,
            queued_for_ingest: false,
        }
    }

    pub fn stream(&self) -> &S {
        &self.stream
    }

    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub fn listener(&self) -> Listener {
        self.listener
    }

    /// Whether a complete `/events` request waits for the server to take events.
    pub fn holding_event(&self) -> bool {
        self.holding_event
    }

    /// Marks it as on the reactor's ingest queue; false if it already was.
    pub fn queue_for_ingest(&mut self) -> bool {
        !std::mem::replace(&mut self.queued_for_ingest, true)
    }

    /// Taken off the reactor's ingest queue.
    pub fn dequeue_for_ingest(&mut self) {
        self.queued_for_ingest = false;
    }

    /// Whether answers are stuck in the socket (WRITABLE is needed).
    pub fn wants_write(&self) -> bool {
        !self.out.is_empty()
    }

    /// The registration this connection's state calls for, if it changed.
    pub fn interest_change(&mut self) -> Option<mio::Interest> {
        let wants_write = self.wants_write();
        self.interest.change(wants_write)
    }

    /// Whether the connection is between requests (for draining).
    pub fn is_idle(&self) -> bool {
        self.inbuf.is_empty() && self.out.is_empty()
    }

    /// The timers' verdict: a request not complete in time or an idle keep-alive that
    /// expired closes; so does an idle connection while the server drains.
    /// A connection holding an `/events` request is not judged: its request waits
    /// unanswered because of the server, not the client.
    pub fn tick(&self, now: Millis, draining: bool) -> Option<CloseReason> {
        if self.holding_event && !draining {
            None
        } else if now >= self.deadline {
            Some(CloseReason::HttpTimeout { idle: self.idle })
        } else if draining && self.is_idle() {
            Some(CloseReason::Shutdown)
        } else {
            None
        }
    }

    /// Reads what the socket has, answers every complete request in order and writes the
    /// answers.
    ///
    /// A connection holding an `/events` request goes on from it only when the server
    /// takes events; until then a turn just writes what answers are left.
    pub fn on_ready(&mut self, ctx: &Ctx) -> HttpTurn {
        let mut turn = HttpTurn {
            step: HttpStep::Wait,
            events: Vec::new(),
            tally: HttpTally::default(),
            held: false,
        };
        if self.holding_event {
            if !ctx.taking_events {
                turn.step = self.write_out();
                return turn;
            }
            self.holding_event = false;
        }
        turn.step = self.serve(ctx, &mut turn);
        turn.held = self.holding_event;
        turn
    }

    fn serve(&mut self, ctx: &Ctx, turn: &mut HttpTurn) -> HttpStep {
        let cap = ctx.config.max_head_bytes + ctx.config.max_body_bytes;
        loop {
            if self.close_after_write.is_some() || self.upgrade_after_write || self.holding_event {
                // Nothing more is read once the last answer is decided, nor while a
                // request waits for the server.
                return self.write_out();
            }
            // Back-pressure: while answers are stuck in the socket, read nothing more, so
            // a client that pipelines without reading cannot grow our buffers.
            if self.out.len() >= MAX_PENDING_OUTPUT {
                let step = self.write_out();
                if self.out.len() >= MAX_PENDING_OUTPUT || step != HttpStep::Wait {
                    return step;
                }
            }
            // Read until the socket is drained or the buffer is at its cap.
            let mut drained = false;
            let mut peer_closed = false;
            let mut chunk = [0u8; 4096];
            while self.inbuf.len() < cap {
                let room = (cap - self.inbuf.len()).min(chunk.len());
                let Some(window) = chunk.get_mut(..room) else {
                    break;
                };
                match self.stream.read(window) {
                    Ok(0) => {
                        peer_closed = true;
                        break;
                    }
                    Ok(n) => {
                        if self.idle {
                            // A new request starts: it gets the head timeout.
                            self.idle = false;
                            self.deadline = ctx.now + super::ms(ctx.config.http_head_timeout);
                        }
                        self.inbuf.extend_from_slice(chunk.get(..n).unwrap_or_default());
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        drained = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return HttpStep::Close(CloseReason::from_io(&e)),
                }
            }
            let before = self.inbuf.len();
            let mut step = HttpStep::Wait;
            let mut at_cap = true;
            // Answers stop at the output cap with complete requests maybe still buffered;
            // once a write frees room they go on, since no readiness edge will come for
            // bytes already read. Each round writes, or ends with the output stuck at the
            // cap (WRITABLE then brings the connection back).
            while at_cap && self.out.len() < MAX_PENDING_OUTPUT {
                at_cap = self.handle_requests(ctx, turn);
                step = self.write_out();
                if step != HttpStep::Wait {
                    return step;
                }
            }
            if peer_closed {
                if self.holding_event || at_cap {
                    // Served later (when events are taken, or the output drains): the
                    // next read sees the end of stream again.
                    return step;
                }
                // A half-closed peer still gets the answers to what it sent, then we close.
                if self.out.is_empty() {
                    return HttpStep::Close(CloseReason::PeerClosed);
                }
                self.close_after_write = Some(CloseReason::PeerClosed);
                return step;
            }
            let stuck = self.out.len() >= MAX_PENDING_OUTPUT;
            if drained || stuck || (self.inbuf.len() == before && self.inbuf.len() >= cap) {
                return step;
            }
        }
    }

    /// Answers every complete request in the buffer, until the output reaches
    /// [`MAX_PENDING_OUTPUT`]. True when it stopped there with input left (which may hold
    /// complete requests).
    fn handle_requests(&mut self, ctx: &Ctx, turn: &mut HttpTurn) -> bool {
        while self.close_after_write.is_none()
            && !self.upgrade_after_write
            && !self.holding_event
            && !self.inbuf.is_empty()
        {
            if self.out.len() >= MAX_PENDING_OUTPUT {
                return true;
            }
            let head = match http::parse_head(&self.inbuf, ctx.config.max_head_bytes, ctx.config.max_body_bytes) {
                Ok(Some(head)) => head,
                Ok(None) => return false,
                Err(reject) => {
                    self.out.extend_from_slice(&reject.response());
                    self.close_after_write = Some(CloseReason::BadRequest(reject.label()));
                    self.inbuf.clear();
                    return false;
                }
            };
            let total = head.len + head.content_length;
            if self.inbuf.len() < total {
                if head.expect_continue && !self.sent_continue {
                    if let Some(refusal) = app::refuse_before_body(&head, self.peer, self.listener, ctx) {
                        turn.tally.requests += 1;
                        self.out.extend_from_slice(&refusal.bytes);
                        turn.tally.record(refusal.count);
                        self.close_after_write = Some(CloseReason::Done);
                        self.inbuf.clear();
                        return false;
                    }
                    self.sent_continue = true;
                    self.out.extend_from_slice(http::CONTINUE);
                }
                return false;
            }
            if head.route == http::Route::Events && self.listener == Listener::Public && !ctx.taking_events {
                self.holding_event = true;
                return false;
            }
            turn.tally.requests += 1;
            let request = Request {
                head: &head,
                body: self.inbuf.get(head.len..total).unwrap_or_default(),
                peer: self.peer,
                listener: self.listener,
            };
            let answer = app::answer(&request, ctx);
            self.out.extend_from_slice(&answer.bytes);
            turn.tally.record(answer.count);
            turn.events.extend(answer.event);
            if answer.body_unread && head.expect_continue && !self.sent_continue {
                self.close_after_write = Some(CloseReason::Done);
            }
            match answer.then {
                Then::Continue => {}
                Then::Close(reason) => self.close_after_write = Some(reason),
                Then::Upgrade { forwarded_for } => {
                    self.upgrade_after_write = true;
                    self.forwarded_for = forwarded_for;
                }
            }
            self.inbuf.drain(..total);
            self.sent_continue = false;
            if !head.keep_alive && self.close_after_write.is_none() && !self.upgrade_after_write {
                self.close_after_write = Some(CloseReason::Done);
            }
            if self.inbuf.is_empty() && self.close_after_write.is_none() {
                self.idle = true;
                self.deadline = ctx.now + super::ms(ctx.config.http_idle_timeout);
                // A keep-alive connection should not pin a large buffer while idle.
                if self.inbuf.capacity() > IDLE_BUFFER_KEEP {
                    self.inbuf = Vec::new();
                }
            }
        }
        false
    }

    /// Writes pending output; decides what happens once it is all out.
    fn write_out(&mut self) -> HttpStep {
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(0) => return HttpStep::Close(CloseReason::PeerClosed),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return HttpStep::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return HttpStep::Close(CloseReason::from_io(&e)),
            }
        }
        if self.out.capacity() > IDLE_BUFFER_KEEP {
            self.out = Vec::new();
        }
        if let Some(reason) = self.close_after_write.take() {
            // Let the peer read the answer before the FIN; drop any unread input.
            self.stream.shutdown_write();
            return HttpStep::Close(reason);
        }
        if self.upgrade_after_write {
            return HttpStep::Upgrade;
        }
        HttpStep::Wait
    }

    /// Turns the connection into a websocket; bytes that followed the upgrade request
    /// are the first websocket bytes. Only after [`HttpStep::Upgrade`], so the 101 is out.
    pub fn into_ws(self, now: Millis, config: &Config, meter: &super::Meter) -> WsConn<S> {
        WsConn::new(
            self.stream,
            self.inbuf,
            self.peer,
            self.forwarded_for,
            self.interest,
            now,
            config,
            meter,
        )
    }

    /// The deadline the timers judge by (for tests of the transport).
    #[cfg(test)]
    fn deadline(&self) -> Millis {
        self.deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Verifier;
    use crate::conn::WsRead;
    use crate::scripted::ScriptedStream;
    use crate::ws::ClientMsg;

    fn config() -> Config {
        Config {
            jwt_private_key: b"k".to_vec(),
            ..Config::default()
        }
    }

    fn peer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1))
    }

    fn ctx<'a>(config: &'a Config, verifier: &'a Verifier, now: Millis) -> Ctx<'a> {
        Ctx {
            config,
            verifier,
            unix_now: 1_800_000_000,
            now,
            draining: false,
            metrics: None,
            taking_events: true,
        }
    }

    fn run_http(chunks: Vec<&[u8]>) -> (HttpConn<ScriptedStream>, HttpTurn) {
        let config = config();
        let verifier = Verifier::new(&config.jwt_private_key);
        let stream = ScriptedStream::new(chunks.into_iter().map(<[u8]>::to_vec));
        let mut conn = HttpConn::new(stream, peer(), Listener::Public, 0, &config);
        let turn = conn.on_ready(&ctx(&config, &verifier, 0));
        (conn, turn)
    }

    #[test]
    fn requests_split_anywhere_are_answered_in_order() {
        let (conn, turn) = run_http(vec![b"GET /pi", b"ng HTTP/1.1\r\n\r\nGET /x HTTP/1.1\r", b"\n\r\n"]);
        assert_eq!(turn.step, HttpStep::Wait);
        assert_eq!(turn.tally.requests, 2);
        let out = String::from_utf8(conn.stream.output.clone()).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert_eq!(out.matches("HTTP/1.1 ").count(), 2);
        assert!(out.ends_with("404 page not found\n"));
    }

    #[test]
    fn an_events_request_waits_while_the_server_takes_no_events_and_what_follows_waits_too() {
        let config = config();
        let verifier = Verifier::new(&config.jwt_private_key);
        let input =
            b"GET /ping HTTP/1.1\r\n\r\nPOST /events HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET /ping HTTP/1.1\r\n\r\n";
        let mut stream = ScriptedStream::new([input.to_vec()]);
        // The sender half-closes after its requests: they are still all answered.
        stream.eof = true;
        let mut conn = HttpConn::new(stream, peer(), Listener::Public, 0, &config);
        let mut not_taking = ctx(&config, &verifier, 0);
        not_taking.taking_events = false;
        let answers = |conn: &HttpConn<ScriptedStream>| {
            let out = String::from_utf8(conn.stream.output.clone()).unwrap();
            out.split("HTTP/1.1 ")
                .skip(1)
                .map(|a| a[..3].to_string())
                .collect::<Vec<_>>()
        };
        let turn = conn.on_ready(&not_taking);
        assert_eq!((turn.step, turn.held, turn.tally.requests), (HttpStep::Wait, true, 1));
        assert_eq!(answers(&conn), ["200"], "the ping before it is answered");
        assert_eq!(
            conn.tick(1_000_000, false),
            None,
            "the wait is the server's, not judged"
        );
        // Readiness again while events are still not taken: nothing new is answered.
        let turn = conn.on_ready(&not_taking);
        assert_eq!((turn.step, turn.held, turn.tally.requests), (HttpStep::Wait, false, 0));
        assert_eq!(answers(&conn), ["200"]);
        // Taken again: the held request (refused here: it has no token), the ping behind
        // it, then the end of stream.
        let turn = conn.on_ready(&ctx(&config, &verifier, 0));
        assert_eq!((turn.held, turn.tally.requests), (false, 2));
        assert_eq!(turn.step, HttpStep::Close(CloseReason::PeerClosed));
        assert_eq!(answers(&conn), ["200", "400", "200"]);
    }

    #[test]
    fn the_metrics_listener_never_holds_a_request() {
        let config = config();
        let verifier = Verifier::new(&config.jwt_private_key);
        let stream = ScriptedStream::new([b"POST /events HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec()]);
        let mut conn = HttpConn::new(stream, peer(), Listener::Metrics, 0, &config);
        let mut not_taking = ctx(&config, &verifier, 0);
        not_taking.taking_events = false;
        let turn = conn.on_ready(&not_taking);
        assert!(!turn.held);
        assert_eq!(turn.tally.requests, 1);
    }

    #[test]
    fn a_full_socket_stops_reading_until_it_drains() {
        let config = config();
        let verifier = Verifier::new(&config.jwt_private_key);
        let many = b"GET /ping HTTP/1.1\r\n\r\n".repeat(20_000);
        let mut stream = ScriptedStream::new(many.chunks(4096).map(<[u8]>::to_vec));
        stream.write_room = 1000;
        let mut conn = HttpConn::new(stream, peer(), Listener::Public, 0, &config);
        let turn = conn.on_ready(&ctx(&config, &verifier, 0));
        assert_eq!(turn.step, HttpStep::Wait);
        assert!(conn.wants_write());
        assert!(conn.out.len() <= MAX_PENDING_OUTPUT + 200, "{}", conn.out.len());
        assert!(
            !conn.stream.input.is_empty(),
            "stopped reading while the answers were stuck"
        );
    }

    #[test]
    fn kept_alive_requests_never_change_the_registration() {
        let config = config();
        let verifier = Verifier::new(&config.jwt_private_key);
        let mut conn = HttpConn::new(ScriptedStream::new([]), peer(), Listener::Public, 0, &config);
        for i in 0..200 {
            conn.stream.input.push_back(b"GET /ping HTTP/1.1\r\n\r\n".to_vec());
            let turn = conn.on_ready(&ctx(&config, &verifier, i));
            assert_eq!(turn.step, HttpStep::Wait);
            assert_eq!(conn.interest_change(), None, "request {i}");
        }
        // A full socket is the one reason to ask for WRITABLE, and it is asked once.
        conn.stream.write_room = 0;
        conn.stream.input.push_back(b"GET /ping HTTP/1.1\r\n\r\n".to_vec());
        conn.on_ready(&ctx(&config, &verifier, 300));
        assert!(conn.interest_change().is_some());
        assert_eq!(conn.interest_change(), None);
    }

    #[test]
    fn deadlines_head_then_idle() {
        let config = config();
        let verifier = Verifier::new(&config.jwt_private_key);
        let mut conn = HttpConn::new(ScriptedStream::new([]), peer(), Listener::Public, 0, &config);
        let head = crate::conn::ms(config.http_head_timeout);
        assert_eq!(conn.tick(head - 1, false), None);
        assert_eq!(conn.tick(head, false), Some(CloseReason::HttpTimeout { idle: false }));
        conn.stream.input.push_back(b"GET /ping HTTP/1.1\r\n\r\n".to_vec());
        conn.on_ready(&ctx(&config, &verifier, 5));
        assert_eq!(conn.deadline(), 5 + crate::conn::ms(config.http_idle_timeout));
        assert_eq!(conn.tick(6, true), Some(CloseReason::Shutdown));
    }

    #[test]
    fn upgrade_then_websocket_frames_that_came_with_it() {
        let head = b"GET /notification HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        // A masked text frame right behind the request: {"type":"unsubscribe","content":null}
        let payload = br#"{"type":"unsubscribe","content":null}"#;
        let mask = [9u8, 8, 7, 6];
        let mut frame = vec![0x81, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        let mut bytes = head.to_vec();
        bytes.extend_from_slice(&frame);
        let (conn, turn) = run_http(vec![&bytes]);
        assert_eq!(turn.step, HttpStep::Upgrade);
        assert!(conn.stream.output.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
        let mut ws = conn.into_ws(0, &config(), &crate::conn::Meter::default());
        assert_eq!(ws.read_one(0, 100), WsRead::Msg(ClientMsg::Unsubscribe(vec![])));
        assert_eq!(ws.read_one(0, 100), WsRead::Drained);
    }
}
