//! Connections: one client socket, from its first byte to the reason it closed.
//!
//! A connection starts as an [`HttpConn`] (the HTTP transport: reads, pipelined answers in
//! order, keep-alive, bounded buffers; what a request *means* is [`crate::app`]'s) and may
//! become a [`WsConn`] after a valid upgrade. Each type owns its fields and its timers
//! (`tick(now)` says what is due) and returns what the reactor must do next; the reactor
//! owns the slab, the subscription index, the clock and teardown. Nothing here touches
//! another connection.
//!
//! A websocket's output is a queue of references to shared frames (`out.rs`), counted
//! across the server by one [`Meter`].
//!
//! Readiness interest follows state: a connection knows whether it has output stuck in
//! its socket, and [`Interest::change`] tells the reactor when (and only when) the
//! registration must change, so a kept-alive request costs no `epoll_ctl`.

mod http;
mod out;
mod tap;
mod ws;

pub use http::{HttpConn, HttpStep, HttpTally, HttpTurn, MAX_PENDING_OUTPUT};
pub use out::{ENTRY_BYTES, Frame, Meter};
pub use tap::READ_BYTES_PER_TURN;
pub use ws::{Due, ENTRIES_PER_TURN, Sent, WsConn, WsRead};

use crate::config::Config;
use std::io::{self, Read, Write};

/// Milliseconds on the server's monotonic clock (since start-up).
pub type Millis = u64;

/// A count or size as 32 bits, saturating: the per-connection bookkeeping (turn budgets,
/// the frame scan) keeps 32-bit counts, since every connection carries it.
pub(crate) fn u32_sat(n: impl TryInto<u32>) -> u32 {
    n.try_into().unwrap_or(u32::MAX)
}

/// A duration in whole milliseconds (at least 1).
pub fn ms(d: std::time::Duration) -> Millis {
    (d.as_millis() as Millis).max(1)
}

/// A connection's byte stream: a [`crate::socket::Socket`] in the server, scripted bytes in
/// tests and fuzzing. It is a mio source, so the reactor registers it whatever it is.
pub trait Stream: Read + Write + mio::event::Source {
    /// Half-closes the sending side once the last answer is written.
    fn shutdown_write(&self);
    /// A readiness event arrived (`hung_up`: the peer closed, the socket errored or urgent
    /// data came).
    fn on_readable(&mut self, _hung_up: bool) {}
    /// The next read must reach the kernel even without a new readiness edge.
    fn rearm(&mut self) {}
}

#[cfg(test)]
impl Stream for crate::scripted::ScriptedStream {
    fn shutdown_write(&self) {}
}

/// Which listener a connection came from: the public one, or the metrics one (which
/// serves `/metrics` only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Public,
    Metrics,
}

/// Why a connection ends: logged once by the reactor's teardown, and a metrics label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
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
    /// At `max_connections`, a websocket subscribed to nothing (the oldest such) gave its
    /// slot to a new connection.
    IdleAtCapacity,
    /// An I/O error other than the peer going away.
    Io(io::ErrorKind),
}

impl CloseReason {
    /// A stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::Done => "done",
            CloseReason::BadRequest(_) => "bad_request",
            CloseReason::HttpTimeout { idle: true } => "http_idle_timeout",
            CloseReason::HttpTimeout { idle: false } => "http_request_timeout",
            CloseReason::PongTimeout => "pong_timeout",
            CloseReason::SlowConsumerBytes => "slow_consumer_bytes",
            CloseReason::SlowConsumerTime => "slow_consumer_time",
            CloseReason::Protocol(_) => "protocol",
            CloseReason::CloseHandshake => "close_handshake",
            CloseReason::Shutdown => "shutdown",
            CloseReason::IdleAtCapacity => "idle_at_capacity",
            CloseReason::Io(_) => "io_error",
        }
    }

    /// Whether this is worth a warning (a limit hit or an eviction) rather than debug.
    pub fn is_warning(&self) -> bool {
        matches!(
            self,
            CloseReason::BadRequest(_)
                | CloseReason::HttpTimeout { idle: false }
                | CloseReason::PongTimeout
                | CloseReason::SlowConsumerBytes
                | CloseReason::SlowConsumerTime
                | CloseReason::Protocol(_)
        )
    }

    /// The reason an I/O error gives: the peer going away is churn, the rest an error.
    fn from_io(e: &io::Error) -> CloseReason {
        match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof => CloseReason::PeerClosed,
            kind => CloseReason::Io(kind),
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::PeerClosed => f.write_str("closed by peer"),
            CloseReason::Done => f.write_str("done"),
            CloseReason::BadRequest(why) => write!(f, "bad request: {why}"),
            CloseReason::HttpTimeout { idle: true } => f.write_str("idle keep-alive timeout"),
            CloseReason::HttpTimeout { idle: false } => f.write_str("request not complete in time"),
            CloseReason::PongTimeout => f.write_str("pong timeout: nothing heard from the client"),
            CloseReason::SlowConsumerBytes => f.write_str("slow consumer: unsent output over max_unsent_bytes"),
            CloseReason::SlowConsumerTime => f.write_str("slow consumer: output unsent for longer than write_timeout"),
            CloseReason::Protocol(why) => write!(f, "protocol error: {why}"),
            CloseReason::CloseHandshake => f.write_str("close handshake finished or timed out"),
            CloseReason::Shutdown => f.write_str("server shutting down"),
            CloseReason::IdleAtCapacity => {
                f.write_str("at max_connections: subscribed to nothing, the oldest such websocket gave up its slot")
            }
            CloseReason::Io(kind) => write!(f, "I/O error: {kind}"),
        }
    }
}

/// The websocket timers, in milliseconds, as the configuration sets them (an HTTP
/// connection reads its head and idle timeouts from the configuration it is served with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    pub ping_interval: Millis,
    pub pong_timeout: Millis,
    pub write_timeout: Millis,
    pub close_timeout: Millis,
}

impl Timers {
    pub fn new(config: &Config) -> Timers {
        Timers {
            ping_interval: ms(config.ping_interval),
            pong_timeout: ms(config.pong_timeout),
            write_timeout: ms(config.write_timeout),
            close_timeout: ms(config.close_timeout),
        }
    }
}

/// What a connection is registered for, and what its state calls for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Interest {
    /// Registered for WRITABLE too (only while output is stuck in the socket).
    registered_writable: bool,
}

impl Interest {
    /// The registration to make if `wants_write` differs from what is registered, and
    /// records it as made. `None`: the registration already matches (the common case).
    pub fn change(&mut self, wants_write: bool) -> Option<mio::Interest> {
        if wants_write == self.registered_writable {
            return None;
        }
        self.registered_writable = wants_write;
        Some(if wants_write {
            mio::Interest::READABLE | mio::Interest::WRITABLE
        } else {
            mio::Interest::READABLE
        })
    }

    /// Whether WRITABLE events are expected.
    pub fn writable(self) -> bool {
        self.registered_writable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_labels_and_levels() {
        assert!(CloseReason::SlowConsumerBytes.is_warning());
        assert!(!CloseReason::PeerClosed.is_warning());
        assert_eq!(CloseReason::HttpTimeout { idle: true }.label(), "http_idle_timeout");
    }

    #[test]
    fn interest_changes_only_when_state_does() {
        let mut i = Interest::default();
        assert_eq!(i.change(false), None);
        assert_eq!(i.change(true), Some(mio::Interest::READABLE | mio::Interest::WRITABLE));
        assert_eq!(i.change(true), None);
        assert_eq!(i.change(false), Some(mio::Interest::READABLE));
        assert!(!i.writable());
    }
}
