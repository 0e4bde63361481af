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
use super::{CloseReason, Interest, Millis, Stream, Timers};
use crate::config::Config;
use crate::ws::{self, ClientMsg};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocket};
use tungstenite::{Message, Utf8Bytes};

/// tungstenite's side of the socket: reads go to the real stream, writes are queued in
/// order with the connection's other output and never block.
pub struct Tap<S> {
    stream: S,
    out: OutQueue,
}

impl<S: Read> Read for Tap<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl<S> Write for Tap<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.push_bytes(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Longest close reason sent: a control frame holds 125 bytes, 2 of them the code.
const MAX_CLOSE_REASON: usize = 120;

/// What one websocket read produced.
#[derive(Debug, PartialEq, Eq)]
pub enum WsRead {
    /// A client message for the server to act on.
    Msg(ClientMsg),
    /// Nothing more to read for now.
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
    ws: WebSocket<Tap<S>>,
    /// `max_unsent_bytes`: the most output a client that stopped reading may leave queued.
    max_unsent: usize,
    peer: SocketAddr,
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
        let tap = Tap {
            stream,
            out: OutQueue::new(meter.clone()),
        };
        let ws = WebSocket::from_partially_read(tap, read_ahead, Role::Server, Some(ws::socket_config(config)));
        WsConn {
            ws,
            max_unsent: config.max_unsent_bytes,
            peer,
            forwarded_for,
            last_heard: now,
            next_ping: now + super::ms(config.ping_interval),
            unsent_since: None,
            close_deadline: None,
            queued: false,
            interest,
        }
    }

    pub fn stream(&self) -> &S {
        &self.ws.get_ref().stream
    }

    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.ws.get_mut().stream
    }

    fn out(&mut self) -> &mut OutQueue {
        &mut self.ws.get_mut().out
    }

    /// Bytes queued and not yet written.
    pub fn unsent(&self) -> usize {
        self.ws.get_ref().out.unsent()
    }

    /// Applies reloaded limits to the open connection.
    pub fn set_config(&mut self, config: &Config) {
        let ws_config = ws::socket_config(config);
        self.ws.set_config(|c| *c = ws_config);
        self.max_unsent = config.max_unsent_bytes;
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
                            self.write_last();
                            return WsRead::Close(self.closed_reason());
                        }
                    }
                }
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Pongs for what was read are queued now, not at the next read.
                    let _ = self.ws.flush();
                    if self.unsent() > self.max_unsent && self.unsent_since.is_some() {
                        // Pings answered faster than the client reads the pongs.
                        return WsRead::Close(CloseReason::SlowConsumerBytes);
                    }
                    return WsRead::Drained;
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

    /// The connection ended in a close handshake: ours if we started it, else the peer's.
    fn closed_reason(&self) -> CloseReason {
        if self.close_deadline.is_some() {
            CloseReason::CloseHandshake
        } else {
            CloseReason::PeerClosed
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
        self.write_last();
        WsRead::Close(CloseReason::Protocol(why))
    }

    /// Writes what the socket takes of the queue before the connection ends (the Close
    /// frame that ends it is last in the queue).
    fn write_last(&mut self) {
        let tap = self.ws.get_mut();
        let _ = tap.out.write_to(&mut tap.stream);
    }

    /// Sends a Close frame and gives the peer until `close_by` to answer (the sweep
    /// enforces the deadline through [`Self::tick`]; its reply ends the connection in
    /// [`Self::read_one`]).
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

    /// Queues a text message of this connection's own (a `jwt-expired` reply).
    pub fn send_text(&mut self, payload: &str, now: Millis) -> Sent {
        let frame = Frame::text(payload.as_bytes(), self.ws.get_ref().out.meter());
        self.send(&frame, now)
    }

    /// Whether `more` bytes would take a client that is not reading past its cap.
    fn over_cap(&self, more: usize) -> bool {
        self.unsent_since.is_some() && self.unsent() + more > self.max_unsent
    }

    /// Queues a keep-alive ping (empty payload, as the official server sends).
    pub fn ping(&mut self, _now: Millis) -> Sent {
        if self.over_cap(2) {
            return Sent::Evict(CloseReason::SlowConsumerBytes);
        }
        match self.ws.write(Message::Ping(Default::default())) {
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
        match self.ws.flush() {
            Ok(()) => {}
            Err(tungstenite::Error::ConnectionClosed) => {
                self.write_last();
                return Err(self.closed_reason());
            }
            Err(tungstenite::Error::AlreadyClosed) => return Err(CloseReason::PeerClosed),
            Err(tungstenite::Error::Io(e)) => return Err(CloseReason::from_io(&e)),
            Err(e) => return Err(CloseReason::Protocol(format!("{e}"))),
        }
        let tap = self.ws.get_mut();
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
            Some(f) => format!("{} (via {})", crate::logsafe::input(f), self.peer),
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
