//! One connection: its state machine and the I/O on its own socket.
//!
//! A connection starts as [`HttpConn`] (requests answered in order, keep-alive, bodies
//! bounded) and may become a [`WsConn`] after a valid upgrade. Each method does the work
//! the socket allows without blocking and returns what the server must do next; the
//! server owns the slab, the subscription index, the clock and teardown. Nothing here
//! touches another connection.

use crate::auth::{self, Verifier};
use crate::config::Config;
use crate::event::{self, Event, Parsed};
use crate::http::{self, Head, Route};
use crate::ws::{self, ClientMsg};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocket};
use tungstenite::{Message, Utf8Bytes};

/// A connection's byte stream: a [`crate::socket::Socket`] in the server, scripted bytes in tests
/// and fuzzing.
pub trait Stream: Read + Write {
    /// Half-closes the sending side once the last answer is written.
    fn shutdown_write(&self);
}

/// Answer bytes an HTTP connection may have waiting for the socket before it stops
/// reading further requests (back-pressure for clients that pipeline without reading).
pub const MAX_PENDING_OUTPUT: usize = 64 * 1024;

/// Milliseconds on the server's monotonic clock (since start-up).
pub type Millis = u64;

/// Why a connection ends; logged once by the server's teardown, and a metrics label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The peer closed (FIN, Close frame, reset); ordinary churn.
    PeerClosed,
    /// An HTTP connection finished its last request.
    Done,
    /// HTTP request refused before routing (431, 413, 400, 501).
    BadRequest(&'static str),
    /// No complete request in time, or idle keep-alive expired.
    HttpTimeout { idle: bool },
    /// Nothing heard from a websocket for `pong_timeout`.
    PongTimeout,
    /// Output over `max_unsent_bytes`.
    SlowConsumerBytes,
    /// Output unsent for longer than `write_timeout`.
    SlowConsumerTime,
    /// A client message we do not understand, a framing error, a limit crossed.
    Protocol(String),
    /// Our Close frame was not answered in time, or was answered.
    CloseHandshake,
    /// Server shutdown.
    Shutdown,
    /// An I/O error other than the peer going away.
    Io(io::ErrorKind),
}

impl Reason {
    /// A stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Reason::PeerClosed => "peer_closed",
            Reason::Done => "done",
            Reason::BadRequest(_) => "bad_request",
            Reason::HttpTimeout { idle: true } => "http_idle_timeout",
            Reason::HttpTimeout { idle: false } => "http_request_timeout",
            Reason::PongTimeout => "pong_timeout",
            Reason::SlowConsumerBytes => "slow_consumer_bytes",
            Reason::SlowConsumerTime => "slow_consumer_time",
            Reason::Protocol(_) => "protocol",
            Reason::CloseHandshake => "close_handshake",
            Reason::Shutdown => "shutdown",
            Reason::Io(_) => "io_error",
        }
    }

    /// Whether this is worth a warning (a limit hit or an eviction) rather than debug.
    pub fn is_warning(&self) -> bool {
        matches!(
            self,
            Reason::BadRequest(_)
                | Reason::HttpTimeout { idle: false }
                | Reason::PongTimeout
                | Reason::SlowConsumerBytes
                | Reason::SlowConsumerTime
                | Reason::Protocol(_)
        )
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::PeerClosed => f.write_str("closed by peer"),
            Reason::Done => f.write_str("done"),
            Reason::BadRequest(why) => write!(f, "bad request: {why}"),
            Reason::HttpTimeout { idle: true } => f.write_str("idle keep-alive timeout"),
            Reason::HttpTimeout { idle: false } => f.write_str("request not complete in time"),
            Reason::PongTimeout => f.write_str("pong timeout: nothing heard from the client"),
            Reason::SlowConsumerBytes => f.write_str("slow consumer: unsent output over max_unsent_bytes"),
            Reason::SlowConsumerTime => f.write_str("slow consumer: output unsent for longer than write_timeout"),
            Reason::Protocol(why) => write!(f, "protocol error: {why}"),
            Reason::CloseHandshake => f.write_str("close handshake finished or timed out"),
            Reason::Shutdown => f.write_str("server shutting down"),
            Reason::Io(kind) => write!(f, "I/O error: {kind}"),
        }
    }
}

fn io_reason(e: &io::Error) -> Reason {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => Reason::PeerClosed,
        kind => Reason::Io(kind),
    }
}

/// What the server must do after an HTTP connection did its work.
#[derive(Debug, PartialEq, Eq)]
pub enum HttpStep {
    /// Wait for more readiness (`wants_write` says whether WRITABLE is needed).
    Wait { wants_write: bool },
    /// The 101 is out: turn this into a websocket.
    Upgrade,
    /// Tear down.
    Close(Reason),
}

/// What the server hands a connection to work with.
pub struct Ctx<'a> {
    pub config: &'a Config,
    pub verifier: &'a Verifier,
    /// Unix seconds, for token expiry.
    pub unix_now: i64,
    pub now: Millis,
    /// The server is draining: refuse new upgrades with 503.
    pub draining: bool,
    /// The rendered metrics, for connections of the metrics listener.
    pub metrics: Option<&'a str>,
}

/// A connection speaking HTTP/1.1.
pub struct HttpConn<S = crate::socket::Socket> {
    pub stream: S,
    pub peer: SocketAddr,
    /// Received bytes not yet consumed; at most `max_head_bytes + max_body_bytes`.
    inbuf: Vec<u8>,
    /// Response bytes not yet written.
    out: Vec<u8>,
    /// When the current request must be complete, or the idle connection closes.
    pub deadline: Millis,
    /// Whether `deadline` is the idle keep-alive one (no request under way).
    pub idle: bool,
    sent_continue: bool,
    close_after_write: Option<Reason>,
    upgrade_after_write: bool,
    /// `X-Forwarded-For` of the upgrade request, kept for the websocket's log lines.
    pub forwarded_for: Option<Box<str>>,
    /// Accepted on the metrics listener: serves `/metrics` only.
    pub metrics: bool,
}

/// Counters an HTTP connection reports back for metrics.
#[derive(Debug, Default, Clone)]
pub struct HttpTally {
    pub requests: u64,
    /// Causes of refused event tokens (rare, so a list is fine).
    pub token_rejections: Vec<auth::TokenError>,
    pub events_ignored: u64,
    pub events_invalid: u64,
}

impl<S: Stream> HttpConn<S> {
    pub fn new(stream: S, peer: SocketAddr, now: Millis, config: &Config) -> HttpConn<S> {
        HttpConn {
            stream,
            peer,
            inbuf: Vec::new(),
            out: Vec::new(),
            deadline: now + ms(config.http_head_timeout),
            idle: false,
            sent_continue: false,
            close_after_write: None,
            upgrade_after_write: false,
            forwarded_for: None,
            metrics: false,
        }
    }

    /// Reads what the socket has, answers every complete request in order and writes the
    /// answers. Accepted events are pushed to `events`, after their 200 was written (or
    /// queued, if the socket is full): `/events` is answered before any fan-out.
    pub fn on_ready(&mut self, ctx: &Ctx, events: &mut Vec<Event>, tally: &mut HttpTally) -> HttpStep {
        let cap = ctx.config.max_head_bytes + ctx.config.max_body_bytes;
        loop {
            if self.close_after_write.is_some() || self.upgrade_after_write {
                // Nothing more is read once the last answer is decided.
                return self.write_out();
            }
            // Back-pressure: while answers are stuck in the socket, read nothing more, so
            // a client that pipelines without reading cannot grow our buffers.
            if self.out.len() >= MAX_PENDING_OUTPUT {
                let step = self.write_out();
                if self.out.len() >= MAX_PENDING_OUTPUT || !matches!(step, HttpStep::Wait { .. }) {
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
                            self.deadline = ctx.now + ms(ctx.config.http_head_timeout);
                        }
                        self.inbuf.extend_from_slice(chunk.get(..n).unwrap_or_default());
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        drained = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return HttpStep::Close(io_reason(&e)),
                }
            }
            let before = self.inbuf.len();
            self.handle_requests(ctx, events, tally);
            let step = self.write_out();
            if matches!(step, HttpStep::Close(_) | HttpStep::Upgrade) {
                return step;
            }
            if peer_closed {
                // A half-closed peer still gets the answers to what it sent, then we close.
                if self.out.is_empty() {
                    return HttpStep::Close(Reason::PeerClosed);
                }
                self.close_after_write = Some(Reason::PeerClosed);
                return step;
            }
            let stuck = self.out.len() >= MAX_PENDING_OUTPUT;
            if drained || stuck || (self.inbuf.len() == before && self.inbuf.len() >= cap) {
                return step;
            }
        }
    }

    /// Answers every complete request in the buffer.
    fn handle_requests(&mut self, ctx: &Ctx, events: &mut Vec<Event>, tally: &mut HttpTally) {
        while self.close_after_write.is_none()
            && !self.upgrade_after_write
            && !self.inbuf.is_empty()
            && self.out.len() < MAX_PENDING_OUTPUT
        {
            let head = match http::parse_head(&self.inbuf, ctx.config.max_head_bytes, ctx.config.max_body_bytes) {
                Ok(Some(head)) => head,
                Ok(None) => return,
                Err(reject) => {
                    self.out.extend_from_slice(&reject.response());
                    self.close_after_write = Some(Reason::BadRequest(reject.label()));
                    self.inbuf.clear();
                    return;
                }
            };
            let total = head.len + head.content_length;
            if self.inbuf.len() < total {
                if head.expect_continue && !self.sent_continue {
                    // An event that will be refused is refused now, instead of inviting its
                    // body first (as the official server does: its handler checks the token
                    // before reading). The unread body is why the connection then closes.
                    if head.route == Some(Route::Events)
                        && !self.metrics
                        && let Some(refusal) = self.refuse_event(&head, ctx, tally)
                    {
                        tally.requests += 1;
                        self.out.extend_from_slice(&refusal);
                        self.close_after_write = Some(Reason::Done);
                        self.inbuf.clear();
                        return;
                    }
                    self.sent_continue = true;
                    self.out.extend_from_slice(http::CONTINUE);
                }
                return;
            }
            tally.requests += 1;
            self.respond(&head, total, ctx, events, tally);
            self.inbuf.drain(..total);
            self.sent_continue = false;
            if !head.keep_alive && self.close_after_write.is_none() && !self.upgrade_after_write {
                self.close_after_write = Some(Reason::Done);
            }
            if self.inbuf.is_empty() && self.close_after_write.is_none() {
                self.idle = true;
                self.deadline = ctx.now + ms(ctx.config.http_idle_timeout);
                // A keep-alive connection should not pin a large buffer while idle.
                if self.inbuf.capacity() > 4096 {
                    self.inbuf = Vec::new();
                }
            }
        }
    }

    fn respond(&mut self, head: &Head, total: usize, ctx: &Ctx, events: &mut Vec<Event>, tally: &mut HttpTally) {
        let head_only = head.method == "HEAD";
        let start = self.out.len();
        self.answer(head, total, ctx, events, tally);
        if head_only {
            // A HEAD answer never carries its body (the client would read it as the next
            // response), whatever the route.
            if let Some(end) = self
                .out
                .get(start..)
                .and_then(|r| r.windows(4).position(|w| w == b"\r\n\r\n"))
            {
                self.out.truncate(start + end + 4);
            }
        }
    }

    fn answer(&mut self, head: &Head, total: usize, ctx: &Ctx, events: &mut Vec<Event>, tally: &mut HttpTally) {
        let head_only = head.method == "HEAD";
        let keep = head.keep_alive;
        if self.metrics {
            // The metrics listener serves only /metrics; the public routes do not exist here.
            match (head.metrics_path, ctx.metrics) {
                (true, Some(text)) => self.out.extend_from_slice(&http::metrics(text, keep)),
                _ => self.out.extend_from_slice(&http::not_found(keep, head_only)),
            }
            return;
        }
        match head.route {
            Some(Route::Ping) => self.out.extend_from_slice(&http::pong(keep, head_only)),
            Some(Route::Events) => {
                if let Some(refusal) = self.refuse_event(head, ctx, tally) {
                    self.out.extend_from_slice(&refusal);
                    if head.expect_continue && !self.sent_continue {
                        // The client waits for a 100 before it sends the body; whether the
                        // body came anyway depends on how TCP cut the bytes, so the answer
                        // must not: close, as when it is refused before its body arrives.
                        self.close_after_write = Some(Reason::Done);
                    }
                    return;
                }
                match event::parse(self.inbuf.get(head.len..total).unwrap_or_default()) {
                    Parsed::Event(ev) => {
                        self.out.extend_from_slice(&http::ok_empty(keep));
                        events.push(ev);
                    }
                    Parsed::Ignored(why) => {
                        tally.events_ignored += 1;
                        log::warn!("ignored event from {}: {why}", self.peer);
                        self.out.extend_from_slice(&http::ok_empty(keep));
                    }
                    Parsed::Invalid => {
                        tally.events_invalid += 1;
                        log::info!("event body from {} is not a JSON object with a string type", self.peer);
                        self.out.extend_from_slice(&http::bad_event_body(keep));
                    }
                }
            }
            Some(Route::Upgrade) => match ws::check_upgrade(head) {
                Ok(_) if ctx.draining => {
                    self.out.extend_from_slice(&http::unavailable());
                    self.close_after_write = Some(Reason::Shutdown);
                }
                Ok(accept) => {
                    self.out.extend_from_slice(&ws::switching_protocols(&accept));
                    self.upgrade_after_write = true;
                    self.forwarded_for = head.x_forwarded_for.as_deref().map(Box::from);
                }
                Err(refusal) => {
                    // Info, not debug: a proxy that drops Upgrade/Connection headers shows
                    // up here, once per client reconnect (every 60 s for desktop clients).
                    log::info!(
                        "refused websocket upgrade from {}: {} {} (a proxy must forward the Upgrade and Connection headers)",
                        self.peer,
                        head.method,
                        String::from_utf8_lossy(refusal.get(9..12).unwrap_or_default())
                    );
                    self.out.extend_from_slice(&refusal);
                }
            },
            Some(Route::NotFound) | None => self.out.extend_from_slice(&http::not_found(keep, head_only)),
        }
    }

    /// The answer to an `/events` request that is refused whatever its body: a sender
    /// outside `events_allow` (403) or a missing or bad token (400, as the official
    /// server). Logged and counted here.
    fn refuse_event(&self, head: &Head, ctx: &Ctx, tally: &mut HttpTally) -> Option<Vec<u8>> {
        let keep = head.keep_alive;
        if !ctx.config.events_allow.is_empty() && !ctx.config.events_allow.iter().any(|n| n.contains(self.peer.ip())) {
            log::warn!("refused event from {}: address not in events_allow", self.peer);
            return Some(http::plain(
                403,
                "Forbidden",
                "events are not accepted from this address\n",
                keep,
                false,
            ));
        }
        let token = auth::event_token(head.authorization.as_deref(), head.seafile_repo_token.as_deref());
        let verdict = match token {
            Some(t) => ctx.verifier.verify_event(t, ctx.unix_now),
            None => Err(auth::TokenError::Malformed),
        };
        let e = verdict.err()?;
        tally.token_rejections.push(e);
        log::warn!("refused event from {}: bad token ({})", self.peer, e.label());
        Some(http::token_mismatch(keep))
    }

    /// Writes pending output; decides what happens once it is all out.
    pub fn write_out(&mut self) -> HttpStep {
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(0) => return HttpStep::Close(Reason::PeerClosed),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return HttpStep::Wait { wants_write: true };
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return HttpStep::Close(io_reason(&e)),
            }
        }
        if self.out.capacity() > 4096 {
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
        HttpStep::Wait { wants_write: false }
    }

    /// Whether the connection is between requests (for draining).
    pub fn is_idle(&self) -> bool {
        self.inbuf.is_empty() && self.out.is_empty()
    }

    /// Turns the connection into a websocket; bytes that followed the upgrade request
    /// are the first websocket bytes.
    pub fn into_ws(self, now: Millis, config: &Config) -> WsConn<S> {
        let ws = WebSocket::from_partially_read(self.stream, self.inbuf, Role::Server, Some(ws::socket_config(config)));
        WsConn {
            ws,
            peer: self.peer,
            forwarded_for: self.forwarded_for,
            last_heard: now,
            next_ping: now + ms(config.ping_interval),
            unsent_since: None,
            close_deadline: None,
            dirty: false,
            wants_write: false,
        }
    }
}

/// What one websocket read produced.
#[derive(Debug, PartialEq, Eq)]
pub enum WsRead {
    /// A client message for the server to act on.
    Msg(ClientMsg),
    /// Nothing more to read for now.
    Drained,
    /// Tear the connection down.
    Close(Reason),
}

/// What happened to an outbound message.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// Queued; the connection must be flushed (it is on the dirty list if `newly_dirty`).
    Queued { newly_dirty: bool },
    /// Not queued: the connection must be closed.
    Evict(Reason),
}

/// A websocket connection.
pub struct WsConn<S = crate::socket::Socket> {
    pub ws: WebSocket<S>,
    pub peer: SocketAddr,
    pub forwarded_for: Option<Box<str>>,
    /// Last time any frame (or any byte) came in.
    pub last_heard: Millis,
    /// When the next keep-alive ping is due.
    pub next_ping: Millis,
    /// Since when output has been waiting for the socket; `None` when all is sent.
    pub unsent_since: Option<Millis>,
    /// Set once we sent a Close frame: the peer has until then to answer.
    pub close_deadline: Option<Millis>,
    /// On the server's dirty list (has output to flush this turn).
    pub dirty: bool,
    /// Registered for WRITABLE (only while output is stuck).
    pub wants_write: bool,
}

impl<S: Stream> WsConn<S> {
    /// Reads one client message, answering pings and Close frames on the way.
    /// `close_by` is the deadline for the peer's answer should we start a close here.
    pub fn read_one(&mut self, now: Millis, close_by: Millis) -> WsRead {
        loop {
            match self.ws.read() {
                Ok(msg) => {
                    self.last_heard = now;
                    match msg {
                        Message::Text(_) | Message::Binary(_) if self.close_deadline.is_some() => {
                            // Closing: data is read and dropped until the peer's Close.
                        }
                        Message::Text(t) => return self.client_message(t.as_bytes(), close_by),
                        Message::Binary(b) => return self.client_message(&b, close_by),
                        // tungstenite queued the pong; the server flushes after reading.
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                        Message::Close(_) => {
                            // tungstenite queued the echo (or this answers ours): send it, close.
                            let _ = self.ws.flush();
                            return WsRead::Close(if self.close_deadline.is_some() {
                                Reason::CloseHandshake
                            } else {
                                Reason::PeerClosed
                            });
                        }
                    }
                }
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    return WsRead::Drained;
                }
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(tungstenite::Error::Io(e)) => return WsRead::Close(io_reason(&e)),
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return WsRead::Close(if self.close_deadline.is_some() {
                        Reason::CloseHandshake
                    } else {
                        Reason::PeerClosed
                    });
                }
                Err(tungstenite::Error::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake)) => {
                    return WsRead::Close(Reason::PeerClosed);
                }
                Err(tungstenite::Error::Capacity(e)) => {
                    return self.fail(CloseCode::Size, format!("{e}"));
                }
                Err(tungstenite::Error::Utf8(_)) => {
                    return self.fail(CloseCode::Invalid, "text frame is not UTF-8".into());
                }
                Err(e) => return self.fail(CloseCode::Protocol, format!("{e}")),
            }
        }
    }

    fn client_message(&mut self, payload: &[u8], close_by: Millis) -> WsRead {
        match ws::parse_client(payload) {
            Ok(msg) => WsRead::Msg(msg),
            Err(why) => {
                // The socket is still in sync: close politely and wait for the answer.
                self.start_close(CloseCode::Unsupported, why, close_by);
                WsRead::Drained
            }
        }
    }

    /// A framing error: the stream cannot be trusted any more. Send a Close frame if we
    /// can and end at once.
    fn fail(&mut self, code: CloseCode, why: String) -> WsRead {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from(truncate_reason(&why)),
        };
        let _ = self.ws.close(Some(frame));
        WsRead::Close(Reason::Protocol(why))
    }

    /// Sends a Close frame and gives the peer `close_timeout` to answer (the server's
    /// sweep enforces the deadline; its reply ends the connection in [`Self::read_one`]).
    pub fn start_close(&mut self, code: CloseCode, why: &str, close_by: Millis) {
        if self.close_deadline.is_some() {
            return;
        }
        log::debug!("closing websocket {}: {why}", self.peer);
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from(truncate_reason(why)),
        };
        // Queued even when the socket is full; the server's flush sends it.
        let _ = self.ws.close(Some(frame));
        self.close_deadline = Some(close_by);
    }

    /// Queues one text message. Never blocks; the loop's flush sends it.
    pub fn send(&mut self, msg: Utf8Bytes, now: Millis) -> Sent {
        if self.close_deadline.is_some() {
            return Sent::Queued { newly_dirty: false };
        }
        match self.ws.write(Message::Text(msg)) {
            Ok(()) => {}
            // The frame is in the buffer; the socket is full, so it waits for WRITABLE.
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                self.unsent_since.get_or_insert(now);
            }
            Err(tungstenite::Error::WriteBufferFull(_)) => {
                return Sent::Evict(Reason::SlowConsumerBytes);
            }
            Err(tungstenite::Error::Io(e)) => return Sent::Evict(io_reason(&e)),
            // The peer's Close or FIN was read earlier in this turn: ordinary churn.
            Err(
                tungstenite::Error::AlreadyClosed
                | tungstenite::Error::ConnectionClosed
                | tungstenite::Error::Protocol(tungstenite::error::ProtocolError::SendAfterClosing),
            ) => return Sent::Evict(Reason::PeerClosed),
            Err(e) => return Sent::Evict(Reason::Protocol(format!("{e}"))),
        }
        self.mark_dirty()
    }

    /// Queues a keep-alive ping (empty payload, as the official server sends).
    pub fn ping(&mut self, now: Millis) -> Sent {
        match self.ws.write(Message::Ping(Default::default())) {
            Ok(()) => self.mark_dirty(),
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                self.unsent_since.get_or_insert(now);
                self.mark_dirty()
            }
            Err(tungstenite::Error::WriteBufferFull(_)) => Sent::Evict(Reason::SlowConsumerBytes),
            Err(tungstenite::Error::Io(e)) => Sent::Evict(io_reason(&e)),
            Err(
                tungstenite::Error::AlreadyClosed
                | tungstenite::Error::ConnectionClosed
                | tungstenite::Error::Protocol(tungstenite::error::ProtocolError::SendAfterClosing),
            ) => Sent::Evict(Reason::PeerClosed),
            Err(e) => Sent::Evict(Reason::Protocol(format!("{e}"))),
        }
    }

    fn mark_dirty(&mut self) -> Sent {
        let newly_dirty = !self.dirty;
        self.dirty = true;
        Sent::Queued { newly_dirty }
    }

    /// Writes out everything queued. `Ok(true)` means all is sent; `Ok(false)` means the
    /// socket is full and WRITABLE is needed.
    pub fn flush(&mut self, now: Millis) -> Result<bool, Reason> {
        self.dirty = false;
        match self.ws.flush() {
            Ok(()) => {
                self.unsent_since = None;
                Ok(true)
            }
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                self.unsent_since.get_or_insert(now);
                Ok(false)
            }
            Err(tungstenite::Error::ConnectionClosed) => Err(if self.close_deadline.is_some() {
                Reason::CloseHandshake
            } else {
                Reason::PeerClosed
            }),
            Err(tungstenite::Error::AlreadyClosed) => Err(Reason::PeerClosed),
            Err(tungstenite::Error::Io(e)) => Err(io_reason(&e)),
            Err(e) => Err(Reason::Protocol(format!("{e}"))),
        }
    }

    /// The address to show in logs: the proxy's `X-Forwarded-For` if it sent one.
    pub fn client_addr(&self) -> String {
        match &self.forwarded_for {
            Some(f) => format!("{f} (via {})", self.peer),
            None => self.peer.to_string(),
        }
    }
}

/// Close reasons must fit a control frame (125 bytes, 2 of them the code).
fn truncate_reason(why: &str) -> String {
    let mut end = why.len().min(120);
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    why[..end].to_string()
}

/// A duration in whole milliseconds (at least 1).
pub fn ms(d: std::time::Duration) -> Millis {
    (d.as_millis() as Millis).max(1)
}

/// A scripted byte stream for connection tests and fuzzing: reads hand out the queued
/// chunks, then `WouldBlock` (or end of stream once `eof` is set); writes are collected
/// up to `write_room` bytes, then `WouldBlock`.
#[derive(Debug, Default)]
pub struct ScriptedStream {
    pub input: std::collections::VecDeque<Vec<u8>>,
    pub eof: bool,
    pub output: Vec<u8>,
    pub write_room: usize,
}

impl ScriptedStream {
    /// A stream that will read `chunks` and accepts any amount of output.
    pub fn new(chunks: impl IntoIterator<Item = Vec<u8>>) -> ScriptedStream {
        ScriptedStream {
            input: chunks.into_iter().collect(),
            eof: false,
            output: Vec::new(),
            write_room: usize::MAX,
        }
    }
}

impl Read for ScriptedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(chunk) = self.input.front_mut() else {
            return if self.eof {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        };
        let n = chunk.len().min(buf.len());
        if let (Some(dst), Some(src)) = (buf.get_mut(..n), chunk.get(..n)) {
            dst.copy_from_slice(src);
        }
        chunk.drain(..n);
        if chunk.is_empty() {
            self.input.pop_front();
        }
        Ok(n)
    }
}

impl Write for ScriptedStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.write_room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.write_room);
        self.output.extend_from_slice(buf.get(..n).unwrap_or_default());
        self.write_room -= n;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream for ScriptedStream {
    fn shutdown_write(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Verifier;

    fn config() -> Config {
        Config {
            jwt_private_key: b"k".to_vec(),
            ..Config::default()
        }
    }

    fn peer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1))
    }

    fn run_http(chunks: Vec<&[u8]>) -> (HttpConn<ScriptedStream>, HttpStep, Vec<Event>) {
        let config = config();
        let verifier = Verifier::new(&config.jwt_private_key);
        let ctx = Ctx {
            config: &config,
            verifier: &verifier,
            unix_now: 1_800_000_000,
            now: 0,
            draining: false,
            metrics: None,
        };
        let stream = ScriptedStream::new(chunks.into_iter().map(<[u8]>::to_vec));
        let mut conn = HttpConn::new(stream, peer(), 0, &config);
        let mut events = Vec::new();
        let step = conn.on_ready(&ctx, &mut events, &mut HttpTally::default());
        (conn, step, events)
    }

    #[test]
    fn requests_split_anywhere_are_answered_in_order() {
        let (conn, step, _) = run_http(vec![b"GET /pi", b"ng HTTP/1.1\r\n\r\nGET /x HTTP/1.1\r", b"\n\r\n"]);
        assert_eq!(step, HttpStep::Wait { wants_write: false });
        let out = String::from_utf8(conn.stream.output).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert_eq!(out.matches("HTTP/1.1 ").count(), 2);
        assert!(out.ends_with("404 page not found\n"));
    }

    #[test]
    fn a_full_socket_stops_reading_until_it_drains() {
        let config = config();
        let verifier = Verifier::new(&config.jwt_private_key);
        let ctx = Ctx {
            config: &config,
            verifier: &verifier,
            unix_now: 0,
            now: 0,
            draining: false,
            metrics: None,
        };
        let many = b"GET /ping HTTP/1.1\r\n\r\n".repeat(20_000);
        let mut stream = ScriptedStream::new(many.chunks(4096).map(<[u8]>::to_vec));
        stream.write_room = 1000;
        let mut conn = HttpConn::new(stream, peer(), 0, &config);
        let step = conn.on_ready(&ctx, &mut Vec::new(), &mut HttpTally::default());
        assert_eq!(step, HttpStep::Wait { wants_write: true });
        assert!(conn.out.len() <= MAX_PENDING_OUTPUT + 200, "{}", conn.out.len());
        assert!(
            !conn.stream.input.is_empty(),
            "stopped reading while the answers were stuck"
        );
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
        let (conn, step, _) = run_http(vec![&bytes]);
        assert_eq!(step, HttpStep::Upgrade);
        assert!(conn.stream.output.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
        let mut ws = conn.into_ws(0, &config());
        assert_eq!(ws.read_one(0, 100), WsRead::Msg(ClientMsg::Unsubscribe(vec![])));
        assert_eq!(ws.read_one(0, 100), WsRead::Drained);
    }

    #[test]
    fn close_reasons_fit_a_control_frame() {
        let long = "é".repeat(200);
        let r = truncate_reason(&long);
        assert!(r.len() <= 120 && long.starts_with(&r));
    }

    #[test]
    fn reason_labels_and_levels() {
        assert!(Reason::SlowConsumerBytes.is_warning());
        assert!(!Reason::PeerClosed.is_warning());
        assert_eq!(Reason::HttpTimeout { idle: true }.label(), "http_idle_timeout");
    }
}
