//! `--watch LIBRARY_ID [URL]`: the test client. Subscribes to one library, locally or
//! through the public URL, with a client token signed by the key, and prints every
//! message for it as one JSON line with its arrival time, until SIGINT or SIGTERM (exit
//! 0). Admins use it to see what a desktop client would get while they change a file in
//! the web interface.
//!
//! Output (stdout): `{"time":"2026-12-06T10:00:00.123Z","message":{...}}` per message;
//! what it is doing goes to stderr. A lost connection is reopened (after 1 s, then up to
//! 10 s); a token the server refuses at once is an error (exit 1): the keys differ.

use crate::selftest::client::{self, Stream, Tls, Url};
use crate::selftest::{client_token, unix_now};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket};

/// How often the stop flag is looked at while waiting for messages.
const POLL: Duration = Duration::from_millis(200);

/// A subscription is renewed with a fresh token this often (client tokens are signed for
/// an hour), so a watch can run for days.
const RENEW: Duration = Duration::from_secs(30 * 60);

/// What to watch.
pub struct Watch {
    pub repo: String,
    /// The websocket's base URL and path: the local server (`/`) or `URL/notification`.
    pub url: Url,
    pub path: &'static str,
    pub key: Vec<u8>,
    pub tls: Tls,
}

/// Runs until interrupted. Returns the exit code: 0 after SIGINT/SIGTERM, 1 when the
/// server refuses the token or the signals cannot be set up.
pub fn run(w: &Watch) -> u8 {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("notification-server: cannot handle signals: {e}");
            return 1;
        }
    }
    let target = format!("{}{}", w.url.base(), w.path);
    let mut backoff = Duration::from_secs(1);
    while !stop.load(Ordering::Relaxed) {
        match session(w, &target, &stop) {
            Ok(()) => return 0,
            Err(Ended::Refused(why)) => {
                eprintln!("notification-server: {why}");
                return 1;
            }
            Err(Ended::Lost(why)) => {
                eprintln!("watch: {why}; reconnecting in {} s", backoff.as_secs());
                let until = Instant::now() + backoff;
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(POLL);
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
    0
}

enum Ended {
    /// The server refused the subscription: the key differs.
    Refused(String),
    /// The connection failed or ended: try again.
    Lost(String),
}

/// One connection: subscribe, then print messages until stopped (Ok) or lost.
fn session(w: &Watch, target: &str, stop: &AtomicBool) -> Result<(), Ended> {
    let mut ws = client::websocket(&w.url, &w.tls, w.path).map_err(|e| Ended::Lost(format!("{target}: {e}")))?;
    subscribe(w, &mut ws)?;
    eprintln!(
        "watch: subscribed to library {} at {target}; printing its events (Ctrl-C to stop)",
        w.repo
    );
    let mut subscribed_at = Instant::now();
    let _ = ws.get_mut().tcp().set_read_timeout(Some(POLL));
    let mut out = std::io::stdout();
    loop {
        if stop.load(Ordering::Relaxed) {
            let _ = ws.close(None);
            let _ = ws.flush();
            return Ok(());
        }
        if subscribed_at.elapsed() >= RENEW {
            subscribe(w, &mut ws)?;
            subscribed_at = Instant::now();
        }
        match ws.read() {
            Ok(Message::Text(t)) => {
                let message: serde_json::Value =
                    serde_json::from_str(&t).unwrap_or_else(|_| serde_json::Value::String(t.to_string()));
                let line = serde_json::json!({"time": utc_now(), "message": message});
                // A closed stdout (`| head`) ends the watch like an interrupt.
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return Ok(());
                }
            }
            Ok(Message::Close(f)) => return Err(Ended::Lost(format!("the server closed the websocket ({f:?})"))),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(Ended::Lost(format!("the websocket ended: {e}"))),
        }
        let _ = ws.flush();
    }
}

/// Subscribes with a fresh token and waits for the server to have handled it (a probe
/// with a bad token is answered `jwt-expired` after it, in order).
fn subscribe(w: &Watch, ws: &mut WebSocket<Stream>) -> Result<(), Ended> {
    let token = client_token(&w.key, &w.repo, "notification-server-watch").map_err(Ended::Refused)?;
    let probe = format!("watch-probe-{}", unix_now());
    let msg = serde_json::json!({"type": "subscribe", "content": {"repos": [
        {"id": w.repo, "jwt_token": token},
        {"id": probe, "jwt_token": "not-a-token"},
    ]}});
    ws.send(Message::text(msg.to_string()))
        .map_err(|e| Ended::Lost(format!("subscribing: {e}")))?;
    let _ = ws.get_mut().tcp().set_read_timeout(Some(POLL));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let (kind, id) = crate::selftest::message_repo(&t).unwrap_or_default();
                if kind == "jwt-expired" && id == w.repo.as_str() {
                    return Err(Ended::Refused(
                        "the server refused a client token signed with this configuration's key: it holds another key"
                            .into(),
                    ));
                }
                if kind == "jwt-expired" && id == probe.as_str() {
                    return Ok(());
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(Ended::Lost(format!("the websocket ended while subscribing: {e}"))),
        }
        let _ = ws.flush();
    }
    Err(Ended::Lost("no answer to the subscription within 10 s".into()))
}

/// Now as RFC 3339 UTC with milliseconds.
fn utc_now() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    format_utc(ms)
}

fn format_utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        ms.rem_euclid(1000)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_utc(1_835_438_400_123), "2028-02-29T12:00:00.123Z");
        assert_eq!(format_utc(784_111_777_000), "1994-11-06T08:49:37.000Z");
    }
}
