//! Log lines that input can neither forge nor flood.
//!
//! Two tools, used by every log statement that writes something a peer chose or caused:
//!
//! - [`input`] wraps a value that came from input (a header, a repo id, a method, a
//!   message's text) so that it is written escaped and cut: a control character, a line
//!   or paragraph separator, a bidi override or a backslash is written as an escape
//!   (`\n`, `\x1b`, `\u{202e}`, `\\`), so one log line stays one line and cannot carry a
//!   forged one; and at most [`MAX_LOGGED_VALUE`] bytes of it are written, then how many
//!   bytes were left off. Valid non-ASCII text (`é`, `日本`) is written as it is.
//! - [`limited!`] writes a line caused by a peer's misbehaviour (a malformed request, a
//!   protocol error, a refused token...) only if that [`Kind`] of line is within its
//!   rate: [`BURST`] lines at once, then [`PER_SECOND`] a second. Lines over the rate are
//!   counted, and the next line of that kind allowed (or [`flush_suppressed`], once a
//!   sweep tick) first writes one line saying how many were suppressed and over how long.
//!
//! With both, what peers can make the server write is bounded whatever they send: at most
//! [`max_lines`] lines over any period, each of bounded length. Lines of a connection's
//! ordinary lifecycle at `debug` (accepted, upgraded, closing, closed by its peer,
//! subscribed, unsubscribed, token expired) are one [`Kind::Lifecycle`] with a rate of its
//! own, far above any real server's churn ([`LIFECYCLE_BURST`] at once, then
//! [`LIFECYCLE_PER_SECOND`] a second): `debug` shows every connection of a box being
//! debugged, and a flood of connections still cannot fill its disk.
//!
//! The limiter is a small global of atomics, one token bucket per kind (the generic cell
//! rate algorithm: one timestamp per bucket, one compare-and-swap per line), rather than a
//! struct passed around: the lines come from pure modules (`app`, `subscribe`), the
//! connection types and the reactor, and threading a limiter through all of them would
//! change their signatures for logging's sake. It never blocks and costs nothing when the
//! line's level is off (the level is checked first).

use std::fmt::{self, Display, Write};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// At most this many bytes of an input value are written to a log line (escapes count at
/// their written length), then a `[... N more bytes]` marker.
pub const MAX_LOGGED_VALUE: usize = 128;

/// Lines of one [`Kind`] written at once before the rate applies.
pub const BURST: u64 = 10;

/// Lines of one [`Kind`] written per second once its burst is spent.
pub const PER_SECOND: u64 = 1;

/// Lifecycle lines at `debug` written at once before their rate applies (a restart's
/// reconnecting crowd of clients fits).
pub const LIFECYCLE_BURST: u64 = 20_000;

/// Lifecycle lines at `debug` written per second once their burst is spent: about
/// 150 KB/s at most, a few hundred connections a second, each with its few lines.
pub const LIFECYCLE_PER_SECOND: u64 = 1_000;

/// An input value to be logged escaped and cut; see the module doc.
pub struct Input<T>(T);

/// Wraps a value from input for a log line: `log::debug!("... {}", input(&repo_id))`.
pub fn input<T: Display>(value: T) -> Input<T> {
    Input(value)
}

impl<T: Display> Display for Input<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut escape = Escape {
            out: f,
            room: MAX_LOGGED_VALUE,
            cut: 0,
        };
        write!(escape, "{}", self.0)?;
        let cut = escape.cut;
        if cut > 0 {
            write!(f, "[... {cut} more bytes]")?;
        }
        Ok(())
    }
}

/// Escapes what is written through it into `out`, until `room` is spent; counts the input
/// bytes left off after that in `cut`.
struct Escape<'a, 'b> {
    out: &'a mut fmt::Formatter<'b>,
    room: usize,
    cut: usize,
}

impl Write for Escape<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.cut > 0 {
            self.cut += s.len();
            return Ok(());
        }
        for (at, c) in s.char_indices() {
            let shown = Shown::of(c);
            if shown.len() > self.room {
                // Cut at a whole character (or escape): the rest is only counted.
                self.cut = s.len() - at;
                return Ok(());
            }
            self.room -= shown.len();
            shown.write(self.out)?;
        }
        Ok(())
    }
}

/// How one character of input is written.
enum Shown {
    Plain(char),
    /// `\\`, `\n`, `\r`, `\t`.
    Short(char),
    /// `\xNN` for other ASCII controls, `\u{N...}` for the rest that must not be raw.
    Hex(u32),
}

impl Shown {
    fn of(c: char) -> Shown {
        match c {
            '\\' => Shown::Short('\\'),
            '\n' => Shown::Short('n'),
            '\r' => Shown::Short('r'),
            '\t' => Shown::Short('t'),
            c if c.is_control() || invisible_or_reordering(c) => Shown::Hex(c as u32),
            c => Shown::Plain(c),
        }
    }

    fn len(&self) -> usize {
        match self {
            Shown::Plain(c) => c.len_utf8(),
            Shown::Short(_) => 2,
            Shown::Hex(n) if *n < 0x80 => 4,
            // `\u{` + hex digits + `}`
            Shown::Hex(n) => 4 + (32 - n.leading_zeros() as usize).div_ceil(4),
        }
    }

    fn write(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shown::Plain(c) => out.write_char(*c),
            Shown::Short(c) => write!(out, "\\{c}"),
            Shown::Hex(n) if *n < 0x80 => write!(out, "\\x{n:02x}"),
            Shown::Hex(n) => write!(out, "\\u{{{n:x}}}"),
        }
    }
}

/// Characters that are not controls but would still mislead a reader of the log: line
/// and paragraph separators (a new line to some viewers), bidi overrides and isolates
/// (text shown in another order than written), zero-width characters and the BOM.
fn invisible_or_reordering(c: char) -> bool {
    matches!(
        c,
        '\u{061c}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
    )
}

/// A kind of log line a peer can cause by misbehaving; each has its own rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A connection closed for a malformed or over-limit HTTP request.
    ClosedBadRequest,
    /// A connection closed because its request did not arrive in time.
    ClosedRequestTimeout,
    /// A websocket closed because nothing was heard from it.
    ClosedPongTimeout,
    /// A websocket closed for unsent output over `max_unsent_bytes`.
    ClosedSlowConsumerBytes,
    /// A websocket closed for output unsent longer than `write_timeout`.
    ClosedSlowConsumerTime,
    /// A websocket closed for a framing error or a message we do not understand.
    ClosedProtocol,
    /// A websocket upgrade request refused.
    UpgradeRefused,
    /// An `/events` request from outside `events_allow`.
    EventNotAllowed,
    /// An `/events` request with a missing or bad token.
    EventTokenRefused,
    /// An `/events` body whose event is ignored.
    EventIgnored,
    /// An `/events` body that is not a JSON object with a string type.
    EventInvalid,
    /// A websocket subscribing to more than `max_repos_per_connection` libraries.
    TooManySubscriptions,
    /// A client token refused (at `debug`).
    ClientTokenRefused,
    /// Accepting paused at `max_connections`.
    AtMaxConnections,
    /// What is held for delivery reached `max_output_bytes` (a flood of bad subscribes
    /// from clients that never read can make it flap).
    OverBudget,
    /// ... and drained back under it.
    BudgetDrained,
    /// A connection's ordinary lifecycle, at `debug` (see the module doc).
    Lifecycle,
}

impl Kind {
    /// Every kind, in the order of their buckets.
    pub const ALL: [Kind; 17] = [
        Kind::ClosedBadRequest,
        Kind::ClosedRequestTimeout,
        Kind::ClosedPongTimeout,
        Kind::ClosedSlowConsumerBytes,
        Kind::ClosedSlowConsumerTime,
        Kind::ClosedProtocol,
        Kind::UpgradeRefused,
        Kind::EventNotAllowed,
        Kind::EventTokenRefused,
        Kind::EventIgnored,
        Kind::EventInvalid,
        Kind::TooManySubscriptions,
        Kind::ClientTokenRefused,
        Kind::AtMaxConnections,
        Kind::OverBudget,
        Kind::BudgetDrained,
        Kind::Lifecycle,
    ];

    /// The level lines of this kind are written at.
    pub fn level(self) -> log::Level {
        match self {
            Kind::UpgradeRefused | Kind::EventInvalid | Kind::BudgetDrained => log::Level::Info,
            Kind::ClientTokenRefused | Kind::Lifecycle => log::Level::Debug,
            _ => log::Level::Warn,
        }
    }

    /// What lines of this kind report, for the line that counts the suppressed ones.
    fn what(self) -> &'static str {
        match self {
            Kind::ClosedBadRequest => "connections closed for a bad request",
            Kind::ClosedRequestTimeout => "connections closed for a request not complete in time",
            Kind::ClosedPongTimeout => "websockets closed for a pong timeout",
            Kind::ClosedSlowConsumerBytes => "websockets closed as slow consumers (max_unsent_bytes)",
            Kind::ClosedSlowConsumerTime => "websockets closed as slow consumers (write_timeout)",
            Kind::ClosedProtocol => "websockets closed for a protocol error",
            Kind::UpgradeRefused => "refused websocket upgrades",
            Kind::EventNotAllowed => "events refused by events_allow",
            Kind::EventTokenRefused => "events refused for a bad token",
            Kind::EventIgnored => "ignored events",
            Kind::EventInvalid => "invalid event bodies",
            Kind::TooManySubscriptions => "websockets over max_repos_per_connection",
            Kind::ClientTokenRefused => "refused client tokens",
            Kind::AtMaxConnections => "pauses at max_connections",
            Kind::OverBudget => "times output reached max_output_bytes",
            Kind::BudgetDrained => "times output drained under max_output_bytes",
            Kind::Lifecycle => "connection lifecycle lines",
        }
    }

    /// The kind of the line a connection closed for `reason` is logged with, if that
    /// reason is the peer's misbehaviour (a `WARNING`); `None` for ordinary endings,
    /// logged unlimited at `debug`.
    pub fn closed(reason: &crate::conn::CloseReason) -> Option<Kind> {
        use crate::conn::CloseReason as R;
        match reason {
            R::BadRequest(_) => Some(Kind::ClosedBadRequest),
            R::HttpTimeout { idle: false } => Some(Kind::ClosedRequestTimeout),
            R::PongTimeout => Some(Kind::ClosedPongTimeout),
            R::SlowConsumerBytes => Some(Kind::ClosedSlowConsumerBytes),
            R::SlowConsumerTime => Some(Kind::ClosedSlowConsumerTime),
            R::Protocol(_) => Some(Kind::ClosedProtocol),
            R::PeerClosed
            | R::Done
            | R::HttpTimeout { idle: true }
            | R::CloseHandshake
            | R::Shutdown
            | R::IdleAtCapacity
            | R::Io(_) => None,
        }
    }

    fn bucket(self) -> &'static Bucket {
        // `BUCKETS` has one bucket per kind (a test checks the order), so `get` always
        // finds it; the spare only keeps indexing (which could panic) out of the server.
        static SPARE: Bucket = Bucket::new();
        BUCKETS.get(self as usize).unwrap_or(&SPARE)
    }

    /// Lines at once, and lines a second after that.
    fn rate(self) -> (u64, u64) {
        match self {
            Kind::Lifecycle => (LIFECYCLE_BURST, LIFECYCLE_PER_SECOND),
            _ => (BURST, PER_SECOND),
        }
    }
}

/// The most lines all kinds written at `level` or more severe can write together over
/// `seconds` (suppression counts included: one per line allowed at most), whatever peers
/// send.
pub fn max_lines(seconds: u64, level: log::Level) -> u64 {
    Kind::ALL
        .iter()
        .filter(|k| k.level() <= level)
        .map(|k| {
            let (burst, per_second) = k.rate();
            2 * (burst + per_second * seconds + 1)
        })
        .sum()
}

/// Writes a line of a [`Kind`] a peer caused, at that kind's level, if within its rate:
/// `limited!(Kind::EventTokenRefused, "refused event from {peer}: ...")`.
macro_rules! limited {
    ($kind:expr, $($arg:tt)+) => {{
        let limited_kind: $crate::logsafe::Kind = $kind;
        if ::log::log_enabled!(limited_kind.level()) && $crate::logsafe::admit(limited_kind) {
            ::log::log!(limited_kind.level(), $($arg)+);
        }
    }};
}
pub(crate) use limited;

/// Whether a line of `kind` may be written now; if so, first writes how many were
/// suppressed since the last one. Counts the line as suppressed if not.
pub fn admit(kind: Kind) -> bool {
    let now = micros();
    let bucket = kind.bucket();
    if bucket.admit(now, kind.rate()) {
        report_suppressed(kind, now);
        true
    } else {
        bucket.suppress(now);
        false
    }
}

/// Writes the count of each kind's suppressed lines that no later line reported yet (a
/// flood that stopped), within the kind's rate. Called once a sweep tick.
pub fn flush_suppressed() {
    let now = micros();
    for kind in Kind::ALL {
        let bucket = kind.bucket();
        if bucket.suppressed.load(Ordering::Relaxed) > 0
            && log::log_enabled!(kind.level())
            && bucket.admit(now, kind.rate())
        {
            report_suppressed(kind, now);
        }
    }
}

fn report_suppressed(kind: Kind, now: u64) {
    if let Some((count, since)) = kind.bucket().take_suppressed() {
        let seconds = now.saturating_sub(since).div_ceil(1_000_000).max(1);
        log::log!(
            kind.level(),
            "{}: {count} more such lines suppressed in the last {seconds} s",
            kind.what()
        );
    }
}

/// Microseconds since the first line this process rate-limited.
fn micros() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

#[cfg(test)]
const INTERVAL_MICROS: u64 = 1_000_000 / PER_SECOND;

static BUCKETS: [Bucket; Kind::ALL.len()] = [const { Bucket::new() }; Kind::ALL.len()];

/// One kind's token bucket as a generic cell rate algorithm: `tat` is the theoretical
/// arrival time of the next line; a line is allowed while `tat` is at most `BURST - 1`
/// intervals ahead of now, and moves it one interval on.
struct Bucket {
    tat: AtomicU64,
    suppressed: AtomicU64,
    /// When the first line of the current suppressed run was suppressed.
    since: AtomicU64,
}

impl Bucket {
    const fn new() -> Bucket {
        Bucket {
            tat: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            since: AtomicU64::new(0),
        }
    }

    /// Whether a line may go at `now` (microseconds) at `(burst, per_second)`.
    fn admit(&self, now: u64, (burst, per_second): (u64, u64)) -> bool {
        let interval = 1_000_000 / per_second.max(1);
        let tolerance = burst.saturating_sub(1) * interval;
        let mut current = self.tat.load(Ordering::Relaxed);
        loop {
            let tat = current.max(now);
            if tat - now > tolerance {
                return false;
            }
            match self
                .tat
                .compare_exchange_weak(current, tat + interval, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }

    fn suppress(&self, now: u64) {
        if self.suppressed.fetch_add(1, Ordering::Relaxed) == 0 {
            self.since.store(now, Ordering::Relaxed);
        }
    }

    /// The suppressed count and when the run began, reset; `None` if nothing was.
    fn take_suppressed(&self) -> Option<(u64, u64)> {
        let since = self.since.load(Ordering::Relaxed);
        match self.suppressed.swap(0, Ordering::Relaxed) {
            0 => None,
            count => Some((count, since)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: (u64, u64) = (BURST, PER_SECOND);

    fn shown(value: &str) -> String {
        input(value).to_string()
    }

    #[test]
    fn controls_separators_and_backslash_are_escaped() {
        assert_eq!(
            shown("a\nb\rc\td\\e\0f\x1b[31mg\x7fh"),
            "a\\nb\\rc\\td\\\\e\\x00f\\x1b[31mg\\x7fh"
        );
        assert_eq!(
            shown("x\u{85}y\u{2028}z\u{202e}w\u{feff}"),
            "x\\u{85}y\\u{2028}z\\u{202e}w\\u{feff}"
        );
    }

    #[test]
    fn a_forged_line_stays_inside_its_own() {
        let out = shown("r\n[2026-12-06 00:00:00] [ERROR] forged");
        assert!(!out.contains('\n'));
        assert_eq!(out, "r\\n[2026-12-06 00:00:00] [ERROR] forged");
    }

    #[test]
    fn printable_text_passes_as_it_is() {
        for v in [
            "10.0.0.1, 192.168.1.2",
            "3f1a-b2c4",
            "émile 日本 🙂",
            "GET",
            "\"quoted\" 'x'",
        ] {
            assert_eq!(shown(v), v);
        }
    }

    #[test]
    fn a_value_at_the_limit_is_whole_and_one_over_is_cut() {
        let at = "a".repeat(MAX_LOGGED_VALUE);
        assert_eq!(shown(&at), at);
        let over = "a".repeat(MAX_LOGGED_VALUE + 1);
        assert_eq!(shown(&over), format!("{at}[... 1 more bytes]"));
    }

    #[test]
    fn the_cut_counts_the_input_bytes_left_off() {
        let long = "b".repeat(8192);
        assert_eq!(shown(&long), format!("{}[... 8064 more bytes]", "b".repeat(128)));
        // Escapes count at their written length, and are never split.
        let newlines = "\n".repeat(100);
        assert_eq!(shown(&newlines), format!("{}[... 36 more bytes]", "\\n".repeat(64)));
        let nuls = "\0".repeat(40);
        assert_eq!(shown(&nuls), format!("{}[... 8 more bytes]", "\\x00".repeat(32)));
        // Multi-byte characters are cut whole: 42 of 3 bytes fit in 128, 2 bytes of room left.
        let wide = "日".repeat(50);
        assert_eq!(shown(&wide), format!("{}[... 24 more bytes]", "日".repeat(42)));
    }

    #[test]
    fn written_length_is_bounded_whatever_the_input() {
        let bound = MAX_LOGGED_VALUE + "[... 18446744073709551615 more bytes]".len();
        for v in ["\u{10ffff}".repeat(5000), "\u{202e}".repeat(5000), "\x01".repeat(5000)] {
            assert!(shown(&v).len() <= bound, "{}", shown(&v).len());
        }
    }

    #[test]
    fn display_values_are_escaped_across_their_pieces() {
        struct Pieces;
        impl Display for Pieces {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a\n")?;
                write!(f, "{}", "c".repeat(200))
            }
        }
        assert_eq!(
            input(Pieces).to_string(),
            format!("a\\n{}[... 75 more bytes]", "c".repeat(125))
        );
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let b = Bucket::new();
        let t0 = 5_000_000;
        let allowed = (0..100).filter(|_| b.admit(t0, RATE)).count() as u64;
        assert_eq!(allowed, BURST);
        // Half an interval later: still nothing; a whole one: one more line.
        assert!(!b.admit(t0 + INTERVAL_MICROS / 2, RATE));
        assert!(b.admit(t0 + INTERVAL_MICROS, RATE));
        assert!(!b.admit(t0 + INTERVAL_MICROS, RATE));
        // Ten seconds of flood, a line every millisecond: PER_SECOND lines a second pass.
        let over_ten_s = (0..10_000u64)
            .filter(|i| b.admit(t0 + INTERVAL_MICROS + i * 1_000, RATE))
            .count() as u64;
        assert!(over_ten_s <= 10 * PER_SECOND + 1, "{over_ten_s}");
        // After a quiet spell the whole burst is available again, not more.
        let later = t0 + 100_000_000;
        assert_eq!((0..100).filter(|_| b.admit(later, RATE)).count() as u64, BURST);
    }

    #[test]
    fn suppressed_lines_are_counted_once() {
        let b = Bucket::new();
        assert_eq!(b.take_suppressed(), None);
        b.suppress(7);
        b.suppress(9);
        assert_eq!(b.take_suppressed(), Some((2, 7)));
        assert_eq!(b.take_suppressed(), None);
    }

    #[test]
    fn every_kind_has_its_own_bucket() {
        for (i, kind) in Kind::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, i, "{kind:?}");
        }
    }

    #[test]
    fn peer_misbehaviour_closes_are_limited_and_churn_is_not() {
        use crate::conn::CloseReason as R;
        let every = [
            R::PeerClosed,
            R::Done,
            R::BadRequest("x"),
            R::HttpTimeout { idle: true },
            R::HttpTimeout { idle: false },
            R::PongTimeout,
            R::SlowConsumerBytes,
            R::SlowConsumerTime,
            R::Protocol("y".into()),
            R::CloseHandshake,
            R::Shutdown,
            R::IdleAtCapacity,
            R::Io(std::io::ErrorKind::Other),
        ];
        // A warning (the peer's misbehaviour) is limited at WARNING; the rest is churn.
        for r in every {
            match Kind::closed(&r) {
                Some(kind) => assert!(r.is_warning() && kind.level() == log::Level::Warn, "{r:?}"),
                None => assert!(!r.is_warning(), "{r:?}"),
            }
        }
    }
}
