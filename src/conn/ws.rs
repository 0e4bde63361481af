//! One websocket connection: tungstenite's framing over our stream, the client messages
//! it reads, the frames queued for it, the close handshake, and its own timers (keep-alive
//! pings, pong timeout, write timeout, close deadline).
//!
//! Output never goes through tungstenite's buffer. tungstenite runs over a [`Tap`]: reads
//! pass through to the socket, and what tungstenite writes (pongs, pings, Close frames) is
//! appended to the connection's [`OutQueue`], the same queue that event frames join as
//! references to their one shared encoding. Only [`WsConn::flush`] writes to the socket,
//! from the front of that queue, so everything a client receives arrives in the order it
//! was queued.

use super::out::{Frame, Meter, OutQueue};
use super::tap::{KEEP_READ_BUFFER, READ_BYTES_PER_TURN, Tap};
use super::{CloseReason, Interest, Millis, Stream, Timers, u32_sat};
use crate::config::Config;
use crate::ws::{self, ClientMsg};
use std::io;
use std::net::SocketAddr;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketContext};
use tungstenite::{Message, Utf8Bytes};

/// Longest close reason sent: a control frame holds 125 bytes, 2 of them the code.
const MAX_CLOSE_REASON: usize = 120;

/// Most subscribe or unsubscribe entries acted on for one websocket in one loop turn
/// (each is a token check and maybe a reply); the message that crosses it is still
/// handled whole, and a message lists at most `max_repos_per_connection`.
pub const ENTRIES_PER_TURN: u32 = 1024;

/// What one connection may still take in the current loop turn (besides the bytes,
/// which the [`Tap`] counts).
#[derive(Debug, Clone, Copy)]
struct TurnBudget {
    /// The loop turn this budget belongs to (its low 32 bits); a new turn starts a fresh
    /// budget. (Counts are 32 bits: this is in every connection.)
    turn: u32,
    /// Frames left: client messages and control frames alike (a flood of pings costs a
    /// read and a pong each, like a message).
    frames: u32,
    entries: u32,
    /// Bytes of client messages parsed in this turn (the cost of a 256 KiB message is its
    /// parse, whichever turn its bytes were read in).
    parsed: u32,
}

impl TurnBudget {
    /// A whole turn's budget: `frames`, [`ENTRIES_PER_TURN`], nothing parsed yet.
    fn fresh(turn: u32, frames: usize) -> TurnBudget {
        TurnBudget {
            turn,
            frames: u32_sat(frames),
            entries: ENTRIES_PER_TURN,
            parsed: 0,
        }
    }

    /// No frame or entry left for this turn.
    fn spent(&self) -> bool {
        self.frames == 0 || self.entries == 0
    }
}

/// The input budget of [`Tap`]: a quarter of `max_output_bytes`.
fn input_budget(config: &Config) -> u32 {
    u32_sat(config.max_output_bytes / 4)
}

/// What one websocket read produced.
#[derive(Debug, PartialEq, Eq)]
pub enum WsRead {
    /// A client message for the server to act on.
    Msg(ClientMsg),
    /// A control frame (ping, pong) was read and answered, or a bad message started our
    /// close: nothing to act on, and more may follow.
    Control,
    /// Nothing more to read for now, or this turn's budget is spent (see
    /// [`WsConn::throttled`]).
    Drained,
    /// Tear the connection down.
    Close(CloseReason),
}

/// What happened to an outbound message.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// Queued; the connection must be flushed. `newly_queued`: it was not on the flush
    /// queue yet, and the reactor must put it there.
    Queued { newly_queued: bool },
    /// Not queued, and rightly so: the connection is closing and takes no more data.
    Discarded,
    /// Not queued: the connection must be closed.
    Evict(CloseReason),
}

/// What a websocket's timers say at a sweep.
#[derive(Debug, PartialEq, Eq)]
pub enum Due {
    /// Nothing is due; the connection is open (pings and token expiry may follow).
    Alive,
    /// Our Close frame is out and its deadline not reached: nothing else applies.
    Closing,
    /// Nothing heard for `pong_timeout`: read what the socket holds, then judge again
    /// with [`WsConn::is_silent`] (a loop that fell behind must not evict clients whose
    /// pongs wait unread).
    Silent,
    /// Tear down.
    Close(CloseReason),
}

/// A websocket connection.
pub struct WsConn<S = crate::socket::Socket> {
    /// The socket side: reads pass through, output is queued.
    tap: Tap<S>,
    /// tungstenite's protocol state and read buffer, driven over `tap`.
    ws: WebSocketContext,
    /// Messages and control frames tungstenite gave back (compared with the frames the
    /// Tap handed it: equal means its buffer is empty).
    units_read: u32,
    /// `max_unsent_bytes`: the most output a client that stopped reading may leave queued.
    max_unsent: usize,
    /// `max_repos_per_connection`: a message listing more is refused whole.
    max_repos: u32,
    peer: SocketAddr,
    /// The proxy's `X-Forwarded-For`, escaped and cut for the log.
    forwarded_for: Option<Box<str>>,
    /// Last time any frame (or any byte) came in.
    last_heard: Millis,
    /// When the next keep-alive ping is due.
    next_ping: Millis,
    /// Since when output has been waiting for the socket; `None` when all is sent.
    unsent_since: Option<Millis>,
    /// Set once we sent a Close frame: the peer has until then to answer.
    close_deadline: Option<Millis>,
    /// On the reactor's flush queue.
    queued: bool,
    /// On the reactor's list of connections to read again without an edge.
    unread: bool,
    /// Which websocket this is, over the server's life (slab keys are reused): how the
    /// reactor's list of websockets by age tells a live entry from a stale one.
    serial: u32,
    /// What it may still take in this loop turn.
    budget: TurnBudget,
    interest: Interest,
}

impl<S: Stream> WsConn<S> {
    /// A websocket over `stream`, whose first bytes (read with the upgrade request) are
    /// `read_ahead`; its output is counted by `meter`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        stream: S,
        read_ahead: Vec<u8>,
        peer: SocketAddr,
        forwarded_for: Option<Box<str>>,
        interest: Interest,
        now: Millis,
        config: &Config,
        meter: &Meter,
    ) -> WsConn<S> {
        let tap = Tap::new(stream, OutQueue::new(meter.clone()), &read_ahead, input_budget(config));
        let ws = WebSocketContext::from_partially_read(read_ahead, Role::Server, Some(ws::socket_config(config)));
        WsConn {
            tap,
            ws,
            units_read: 0,
            max_unsent: config.max_unsent_bytes,
            max_repos: u32_sat(config.max_repos_per_connection),
            peer,
            forwarded_for,
            last_heard: now,
            next_ping: now + super::ms(config.ping_interval),
            unsent_since: None,
            close_deadline: None,
            queued: false,
            unread: false,
            serial: 0,
            // Turn 0 is before the reactor's first; it starts a fresh budget each turn.
            budget: TurnBudget::fresh(0, config.max_messages_per_wakeup),
            interest,
        }
    }

    pub fn stream(&self) -> &S {
        &self.tap.stream
    }

    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.tap.stream
    }

    fn out(&mut self) -> &mut OutQueue {
        &mut self.tap.out
    }

    /// Bytes queued and not yet written.
    pub fn unsent(&self) -> usize {
        self.tap.out.unsent()
    }

    /// Applies reloaded limits to the open connection.
    pub fn set_config(&mut self, config: &Config) {
        let ws_config = ws::socket_config(config);
        self.ws.set_config(|c| *c = ws_config);
        self.max_unsent = config.max_unsent_bytes;
        self.max_repos = u32_sat(config.max_repos_per_connection);
        self.tap.input_budget = input_budget(config);
    }

    /// Whether our Close frame is out.
    pub fn is_closing(&self) -> bool {
        self.close_deadline.is_some()
    }

    /// Whether it is on the reactor's flush queue.
    pub fn is_queued(&self) -> bool {
        self.queued
    }

    /// Puts it on the flush queue; true if it was not there yet (the reactor must then
    /// queue its key).
    pub fn mark_queued(&mut self) -> bool {
        !std::mem::replace(&mut self.queued, true)
    }

    /// Puts it on the list of connections to read again without an edge; true if it was
    /// not there yet (the reactor must then list its key). Once per connection, however
    /// often it is read in a turn: a listed connection read again through its own
    /// readiness used to be listed twice, and got twice its share of every later turn.
    pub fn mark_unread(&mut self) -> bool {
        !std::mem::replace(&mut self.unread, true)
    }

    /// Numbers it (see `serial`).
    pub fn set_serial(&mut self, serial: u32) {
        self.serial = serial;
    }

    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// Takes it off that list (the reactor is about to read it).
    pub fn clear_unread(&mut self) {
        self.unread = false;
    }

    /// Starts loop turn `turn` for this connection, if it has not started yet: a fresh
    /// budget of frames, entries and bytes. Reading twice in one turn (through readiness
    /// and through the unread list) shares one budget.
    pub fn begin_turn(&mut self, turn: u64, frames: usize) {
        let turn = turn as u32;
        if self.budget.turn == turn {
            return;
        }
        self.budget = TurnBudget::fresh(turn, frames);
        let tap = &mut self.tap;
        tap.allowance = READ_BYTES_PER_TURN;
        tap.throttled = false;
    }

    /// Bytes of client messages parsed in this turn so far.
    pub fn parsed_this_turn(&self) -> usize {
        self.budget.parsed as usize
    }

    /// Whether this turn's budget is spent while input may be left: the reactor must
    /// come back to it next turn, since no edge will.
    pub fn throttled(&self) -> bool {
        self.budget.spent() || self.tap.throttled
    }

    /// Whether output is stuck in the socket (WRITABLE is registered while it is).
    pub fn wants_write(&self) -> bool {
        self.interest.writable()
    }

    /// The registration this connection's state calls for, if it changed.
    pub fn interest_change(&mut self) -> Option<mio::Interest> {
        let stuck = self.unsent_since.is_some();
        self.interest.change(stuck)
    }

    /// The timers' verdict at a sweep (see [`Due`]).
    pub fn tick(&self, now: Millis, timers: &Timers) -> Due {
        if let Some(deadline) = self.close_deadline {
            return if now >= deadline {
                Due::Close(CloseReason::CloseHandshake)
            } else {
                Due::Closing
            };
        }
        if self.is_silent(now, timers) {
            return Due::Silent;
        }
        if self
            .unsent_since
            .is_some_and(|t| now.saturating_sub(t) >= timers.write_timeout)
        {
            return Due::Close(CloseReason::SlowConsumerTime);
        }
        Due::Alive
    }

    /// Nothing heard for `pong_timeout`.
    pub fn is_silent(&self, now: Millis, timers: &Timers) -> bool {
        now.saturating_sub(self.last_heard) >= timers.pong_timeout
    }

    /// Queues a keep-alive ping if one is due. A peer heard from within the interval is
    /// alive, so the ping may be skipped, but only if the next one, an interval from now,
    /// still leaves the peer an interval to answer before `pong_timeout`. Without that
    /// condition a ping_interval above half the pong_timeout closed quiet, healthy
    /// clients. "Within the interval" is judged against the previous check (`next_ping`
    /// was set an interval after it), not against `now`: a pong read in the same
    /// millisecond as its ping was sent is a sign of life too, and a strict
    /// `now - last_heard < interval` missed it on a fast network and pinged every interval.
    pub fn keep_alive(&mut self, now: Millis, timers: &Timers) -> Option<Sent> {
        if now < self.next_ping {
            return None;
        }
        let interval = timers.ping_interval;
        let heard_recently = self.last_heard >= self.next_ping.saturating_sub(interval);
        let next_ping_in_time = self.last_heard + timers.pong_timeout >= now + 2 * interval;
        let sent = (!(heard_recently && next_ping_in_time)).then(|| self.ping(now));
        self.next_ping = now + interval;
        sent
    }

    /// After the loop stalled (it sent no pings either, so the client's silence says
    /// nothing): counts the client as heard at `fresh` at the latest, and pings now.
    pub fn restart_keep_alive(&mut self, fresh: Millis, now: Millis) {
        self.last_heard = self.last_heard.max(fresh);
        self.next_ping = now;
    }

    /// Reads one frame's worth: a client message, or a control frame answered on the way,
    /// within this turn's budget (see [`Self::begin_turn`]). `close_by` is the deadline
    /// for the peer's answer should we start a close here.
    pub fn read_one(&mut self, now: Millis, close_by: Millis) -> WsRead {
        if self.budget.spent() {
            return WsRead::Drained;
        }
        loop {
            match self.ws.read(&mut self.tap) {
                Ok(msg) => {
                    self.last_heard = now;
                    self.budget.frames -= 1;
                    self.units_read = self.units_read.wrapping_add(1);
                    return match msg {
                        Message::Text(_) | Message::Binary(_) if self.close_deadline.is_some() => {
                            // Closing: data is read and dropped until the peer's Close.
                            WsRead::Control
                        }
                        Message::Text(t) => self.client_message(t.as_bytes(), close_by),
                        Message::Binary(b) => self.client_message(&b, close_by),
                        // tungstenite owes a pong: queued now, and judged like a reply.
                        Message::Ping(_) => self.queue_owed(),
                        Message::Pong(_) | Message::Frame(_) => WsRead::Control,
                        Message::Close(_) => {
                            // tungstenite queued the echo (or this answers ours): send it, close.
                            let _ = self.ws.flush(&mut self.tap);
                            self.write_last();
                            WsRead::Close(self.closed_reason())
                        }
                    };
                }
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock && self.tap.over_input => {
                    return self.fail(
                        CloseCode::Again,
                        "server busy: too many large messages in progress, try again later".into(),
                    );
                }
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Pongs for what was read are queued now, not at the next read.
                    return match self.queue_owed() {
                        WsRead::Control => WsRead::Drained,
                        close => close,
                    };
                }
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(tungstenite::Error::Io(e)) => return WsRead::Close(CloseReason::from_io(&e)),
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return WsRead::Close(self.closed_reason());
                }
                Err(tungstenite::Error::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake)) => {
                    return WsRead::Close(CloseReason::PeerClosed);
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

    /// Queues what tungstenite owes the client (a pong), and judges it as a reply: the
    /// client's own traffic may not leave more than `max_unsent_bytes` queued, whether or
    /// not its socket is full yet.
    fn queue_owed(&mut self) -> WsRead {
        let _ = self.ws.flush(&mut self.tap);
        if self.past_cap(0) {
            // Pings answered faster than the client reads the pongs.
            return WsRead::Close(CloseReason::SlowConsumerBytes);
        }
        WsRead::Control
    }

    /// Spends `n` entries of this turn's budget (a subscribe or unsubscribe list).
    pub fn spend_entries(&mut self, n: usize) {
        self.budget.entries = self.budget.entries.saturating_sub(u32_sat(n));
    }

    /// The connection ended in a close handshake: ours if we started it, else the peer's.
    fn closed_reason(&self) -> CloseReason {
        if self.close_deadline.is_some() {
            CloseReason::CloseHandshake
        } else {
            CloseReason::PeerClosed
        }
    }

    fn client_message(&mut self, payload: &[u8], close_by: Millis) -> WsRead {
        self.budget.parsed = self.budget.parsed.saturating_add(u32_sat(payload.len()));
        let read = self.parse_message(payload, close_by);
        self.give_back_read_buffer();
        read
    }

    /// After a large message, if tungstenite holds no byte of the client's (see
    /// [`FrameScan`]), gives its read buffer back by starting a fresh protocol context:
    /// same settings, and the same state, the connection being open with nothing owed
    /// once the flush below queues any pong.
    fn give_back_read_buffer(&mut self) {
        let scan = &self.tap.scan;
        if scan.largest <= KEEP_READ_BUFFER
            || !scan.at_boundary()
            || scan.units != self.units_read
            || self.close_deadline.is_some()
            || !self.ws.can_read()
            || !self.ws.can_write()
        {
            return;
        }
        let _ = self.ws.flush(&mut self.tap);
        let config = *self.ws.get_config();
        self.ws = WebSocketContext::new(Role::Server, Some(config));
        self.tap.scan.largest = 0;
    }

    fn parse_message(&mut self, payload: &[u8], close_by: Millis) -> WsRead {
        match ws::parse_client(payload, self.max_repos as usize) {
            Ok(msg) => WsRead::Msg(msg),
            Err(ws::BadMessage::TooManyRepos) => {
                crate::logsafe::limited!(
                    crate::logsafe::Kind::TooManySubscriptions,
                    "websocket {} listed more than max_repos_per_connection ({}) libraries: closing",
                    self.peer,
                    self.max_repos
                );
                self.start_close(CloseCode::Policy, "too many subscriptions", close_by);
                WsRead::Control
            }
            Err(ws::BadMessage::Invalid(why)) => {
                // The socket is still in sync: close politely and wait for the answer. Go
                // on reading: the peer's Close may already be buffered behind this
                // message, and no edge would announce it before `close_timeout`.
                self.start_close(CloseCode::Unsupported, why, close_by);
                WsRead::Control
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
        let _ = self.ws.close(&mut self.tap, Some(frame));
        self.write_last();
        WsRead::Close(CloseReason::Protocol(why))
    }

    /// Writes what the socket takes of the queue before the connection ends (the Close
    /// frame that ends it is last in the queue).
    fn write_last(&mut self) {
        let tap = &mut self.tap;
        let _ = tap.out.write_to(&mut tap.stream);
    }

    /// Sends a Close frame and gives the peer until `close_by` to answer (the sweep
    /// enforces the deadline through [`Self::tick`]; its reply ends the connection in
    /// [`Self::read_one`]).
    pub fn start_close(&mut self, code: CloseCode, why: &str, close_by: Millis) {
        if self.close_deadline.is_some() {
            return;
        }
        crate::logsafe::limited!(
            crate::logsafe::Kind::Lifecycle,
            "closing websocket {}: {}",
            self.peer,
            crate::logsafe::input(why)
        );
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from(truncate_reason(why)),
        };
        // Queued even when the socket is full; the server's flush sends it.
        let _ = self.ws.close(&mut self.tap, Some(frame));
        self.close_deadline = Some(close_by);
    }

    /// Queues a reference to a shared frame (an event). Never blocks; the loop's flush
    /// sends it. A client is evicted for its backlog only when its socket is full too,
    /// i.e. for its own lack of progress: a backlog the server built up while the client
    /// kept reading is the server's, and the global output budget bounds that.
    pub fn send(&mut self, frame: &Frame, _now: Millis) -> Sent {
        if self.close_deadline.is_some() {
            return Sent::Discarded;
        }
        if !self.ws.can_write() {
            // The peer's Close or FIN was read earlier in this turn: ordinary churn.
            return Sent::Evict(CloseReason::PeerClosed);
        }
        if self.over_cap(frame.len()) {
            return Sent::Evict(CloseReason::SlowConsumerBytes);
        }
        self.out().push(frame.clone());
        Sent::Queued {
            newly_queued: self.mark_queued(),
        }
    }

    /// Queues a text message of this connection's own (a `jwt-expired` reply). Unlike
    /// an event, a reply is caused by the client itself, so it is held to
    /// `max_unsent_bytes` when it is queued, not only once the socket is full: a client
    /// that sends subscribes and never reads is a slow consumer of its own replies.
    pub fn send_text(&mut self, payload: &str, now: Millis) -> Sent {
        if self.close_deadline.is_none() && self.past_cap(payload.len()) {
            return Sent::Evict(CloseReason::SlowConsumerBytes);
        }
        let frame = Frame::text(payload.as_bytes(), self.tap.out.meter());
        self.send(&frame, now)
    }

    /// Whether `more` bytes would take a client that is not reading past its cap.
    fn over_cap(&self, more: usize) -> bool {
        self.unsent_since.is_some() && self.past_cap(more)
    }

    /// Whether `more` bytes would take what is queued past `max_unsent_bytes`.
    fn past_cap(&self, more: usize) -> bool {
        self.unsent() + more > self.max_unsent
    }

    /// Queues a keep-alive ping (empty payload, as the official server sends).
    pub fn ping(&mut self, _now: Millis) -> Sent {
        if self.over_cap(2) {
            return Sent::Evict(CloseReason::SlowConsumerBytes);
        }
        match self.ws.write(&mut self.tap, Message::Ping(Default::default())) {
            Ok(()) => Sent::Queued {
                newly_queued: self.mark_queued(),
            },
            Err(
                tungstenite::Error::AlreadyClosed
                | tungstenite::Error::ConnectionClosed
                | tungstenite::Error::Protocol(tungstenite::error::ProtocolError::SendAfterClosing),
            ) => Sent::Evict(CloseReason::PeerClosed),
            Err(e) => Sent::Evict(CloseReason::Protocol(format!("{e}"))),
        }
    }

    /// Writes out everything queued and takes it off the flush queue. `Ok(true)` means
    /// all is sent; `Ok(false)` means the socket is full and WRITABLE is needed.
    pub fn flush(&mut self, now: Millis) -> Result<bool, CloseReason> {
        self.queued = false;
        // Anything tungstenite still holds (a pong owed since the last read) joins the queue.
        match self.ws.flush(&mut self.tap) {
            Ok(()) => {}
            Err(tungstenite::Error::ConnectionClosed) => {
                self.write_last();
                return Err(self.closed_reason());
            }
            Err(tungstenite::Error::AlreadyClosed) => return Err(CloseReason::PeerClosed),
            Err(tungstenite::Error::Io(e)) => return Err(CloseReason::from_io(&e)),
            Err(e) => return Err(CloseReason::Protocol(format!("{e}"))),
        }
        let tap = &mut self.tap;
        match tap.out.write_to(&mut tap.stream) {
            Ok(()) => {
                self.unsent_since = None;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.unsent_since.get_or_insert(now);
                Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::WriteZero => Err(CloseReason::PeerClosed),
            Err(e) => Err(CloseReason::from_io(&e)),
        }
    }

    /// The address to show in logs: the proxy's `X-Forwarded-For` if it sent one.
    pub fn client_addr(&self) -> String {
        match &self.forwarded_for {
            // Kept escaped and cut, as logs show it (`app::kept_for_logs`).
            Some(f) => format!("{f} (via {})", self.peer),
            None => self.peer.to_string(),
        }
    }
}

/// Close reasons must fit a control frame.
fn truncate_reason(why: &str) -> String {
    let mut end = why.len().min(MAX_CLOSE_REASON);
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    why.get(..end).unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::tap::tests::frame;
    use crate::scripted::ScriptedStream;

    fn timers() -> Timers {
        Timers {
            ping_interval: 100,
            pong_timeout: 300,
            write_timeout: 500,
            close_timeout: 50,
        }
    }

    fn conn() -> WsConn<ScriptedStream> {
        let config = Config {
            ping_interval: std::time::Duration::from_millis(100),
            ..Config::default()
        };
        WsConn::new(
            ScriptedStream::new([]),
            Vec::new(),
            SocketAddr::from(([127, 0, 0, 1], 1)),
            None,
            Interest::default(),
            0,
            &config,
            &Meter::default(),
        )
    }

    #[test]
    fn a_large_message_leaves_a_fresh_read_buffer_and_loses_nothing_behind_it() {
        let mut w = conn();
        let big = serde_json::json!({"type": "unsubscribe", "content": {"repos": vec!["x".repeat(100); 200]}});
        let small = br#"{"type":"unsubscribe","content":{"repos":["y"]}}"#;
        // Two messages in one read: the buffer is not replaced while the second is in it.
        let mut input = frame(0x81, big.to_string().as_bytes());
        input.extend(frame(0x81, small));
        w.stream_mut().input.push_back(input);
        assert!(matches!(w.read_one(0, 100), WsRead::Msg(ClientMsg::Unsubscribe(r)) if r.len() == 200));
        assert!(
            w.tap.scan.largest > KEEP_READ_BUFFER,
            "kept: the second message is buffered"
        );
        assert_eq!(
            w.read_one(0, 100),
            WsRead::Msg(ClientMsg::Unsubscribe(vec!["y".into()]))
        );
        assert_eq!(w.tap.scan.largest, 0, "replaced once nothing was left in it");
        // The fresh context reads on as before.
        w.stream_mut().input.push_back(frame(0x81, small));
        assert_eq!(
            w.read_one(0, 100),
            WsRead::Msg(ClientMsg::Unsubscribe(vec!["y".into()]))
        );
        assert_eq!(w.read_one(0, 100), WsRead::Drained);
    }

    #[test]
    fn close_reasons_fit_a_control_frame() {
        let long = "é".repeat(200);
        let r = truncate_reason(&long);
        assert!(r.len() <= MAX_CLOSE_REASON && long.starts_with(&r));
    }

    #[test]
    fn pings_are_due_each_interval_and_silence_is_noticed() {
        let t = timers();
        let mut w = conn();
        assert_eq!(w.keep_alive(99, &t), None, "not due");
        assert_eq!(w.keep_alive(100, &t), None, "heard at 0, within the interval: skipped");
        assert_eq!(w.keep_alive(200, &t), Some(Sent::Queued { newly_queued: true }));
        assert_eq!(w.flush(200), Ok(true));
        assert_eq!(w.tick(299, &t), Due::Alive);
        assert_eq!(w.tick(300, &t), Due::Silent);
        assert_eq!(w.stream().output, [0x89, 0x00], "an empty ping");
    }

    #[test]
    fn stuck_output_asks_for_writable_then_times_out() {
        let t = timers();
        let mut w = conn();
        w.stream_mut().write_room = 0;
        assert_eq!(w.send_text("x", 10), Sent::Queued { newly_queued: true });
        assert_eq!(w.flush(10), Ok(false));
        assert!(w.interest_change().is_some());
        assert!(w.wants_write());
        // Silence is judged first (nothing was heard since 0).
        assert_eq!(w.tick(509, &t), Due::Silent);
        w.restart_keep_alive(509, 509);
        assert_eq!(w.tick(510, &t), Due::Close(CloseReason::SlowConsumerTime));
    }

    #[test]
    fn a_closing_connection_discards_data_and_ends_at_its_deadline() {
        let t = timers();
        let mut w = conn();
        w.start_close(CloseCode::Away, "bye", 50);
        assert_eq!(w.send_text("x", 1), Sent::Discarded);
        assert_eq!(w.tick(49, &t), Due::Closing);
        assert_eq!(w.tick(50, &t), Due::Close(CloseReason::CloseHandshake));
    }
}
