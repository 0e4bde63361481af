//! Scale-out: several instances share events through one Redis pub/sub channel.
//!
//! The instance that receives `POST /events` resolves the audience once (the group lookup
//! included), delivers to its own subscribers, and publishes the event with its resolved
//! audience; every other instance delivers it to its own subscribers. Each message names
//! the instance that sent it, and an instance ignores its own. Each message also carries
//! an id, increasing per sender, and a receiver drops an id it has heard before ([`Seen`]):
//! a PUBLISH whose reply was lost (a timeout, a broken connection) may have been published
//! all the same, and is sent again, so without the ids other instances would deliver it
//! twice.
//!
//! Redis is spoken by the `redis` crate's blocking client on two helper threads (Redis
//! forbids publishing on a subscribed connection): the subscriber parses what arrives and
//! hands it to the loop through a channel and the loop's `mio::Waker`; the publisher
//! drains a bounded outbox. Both reconnect by themselves with capped, jittered backoff;
//! the publisher's backoff grows until a PUBLISH succeeds (not merely a connection), so a
//! Redis that accepts connections and then fails every PUBLISH is not hammered. An error
//! reply to PUBLISH (an ACL without `+publish`, say) is that message's failure: it is
//! dropped and counted (`refused`), the connection kept, and it is logged once until a
//! PUBLISH succeeds again.
//!
//! While Redis is unreachable, local delivery goes on unchanged; messages for the other
//! instances wait in the outbox for at most [`OUTBOX_MAX_AGE`] and at most
//! [`OUTBOX_CAPACITY`] of them (oldest dropped first, counted), so a short blip loses
//! nothing and a long outage means local delivery only.
//!
//! The messages themselves, their wire format and the ids that drop repeats, are
//! `wire.rs`'s.

mod wire;

pub use wire::{Decoded, MAX_MESSAGE_BYTES, MAX_SENDER_BYTES, MAX_SENDERS, Seen, decode, encode};

use crate::event::Event;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Messages waiting for Redis at most; past it the oldest is dropped.
pub const OUTBOX_CAPACITY: usize = 10_000;
/// A message older than this is not published any more: its event is long delivered
/// locally, and late delivery elsewhere would reorder it behind newer events.
pub const OUTBOX_MAX_AGE: Duration = Duration::from_secs(10);
/// Messages from the channel waiting for the loop; past it they are dropped (counted).
const INBOX_CAPACITY: usize = 10_000;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Counters shared by the helper threads and the loop (for metrics).
#[derive(Debug, Default)]
pub struct BusStats {
    pub subscriber_connected: AtomicBool,
    pub publisher_connected: AtomicBool,
    pub published: AtomicU64,
    pub received: AtomicU64,
    /// Outgoing messages dropped (outbox full or too old) and incoming ones dropped
    /// because the loop fell behind.
    pub dropped: AtomicU64,
    /// Incoming messages that were malformed or foreign.
    pub ignored: AtomicU64,
    /// Outgoing messages Redis answered PUBLISH for with an error (dropped).
    pub refused: AtomicU64,
}

/// A unique name for this instance: host name, process id and some randomness.
pub fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut random = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut random);
    }
    format!(
        "{}-{}-{:016x}",
        host.trim(),
        std::process::id(),
        u64::from_le_bytes(random)
    )
}

struct Outbox {
    queue: Mutex<VecDeque<(Instant, String)>>,
    ready: Condvar,
}

impl Outbox {
    fn new() -> Arc<Outbox> {
        Arc::new(Outbox {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
        })
    }
}

/// The loop's end of the bus.
pub struct Bus {
    pub instance: String,
    outbox: Arc<Outbox>,
    inbox: Receiver<Event>,
    pub stats: Arc<BusStats>,
}

impl Bus {
    /// The bus's state and counters, for a metrics scrape.
    pub fn gauges(&self) -> crate::metrics::BusGauges {
        use std::sync::atomic::Ordering::Relaxed;
        let st = &self.stats;
        crate::metrics::BusGauges {
            connected: st.subscriber_connected.load(Relaxed) && st.publisher_connected.load(Relaxed),
            published: st.published.load(Relaxed),
            received: st.received.load(Relaxed),
            dropped: st.dropped.load(Relaxed),
            ignored: st.ignored.load(Relaxed),
            refused: st.refused.load(Relaxed),
        }
    }

    /// Starts the subscriber and publisher threads for `url` (`redis://[:password@]host[:port][/db]`).
    /// Fails only on a malformed URL; an unreachable Redis is retried in the background.
    pub fn spawn(url: &str, channel: &str, waker: Arc<mio::Waker>) -> Result<Bus, String> {
        let client = redis::Client::open(url).map_err(|e| format!("redis_url: {e}"))?;
        let instance = instance_id();
        let stats = Arc::new(BusStats::default());
        let outbox = Outbox::new();
        let (inbox_tx, inbox) = mpsc::sync_channel(INBOX_CAPACITY);
        {
            let (client, channel, instance, stats) =
                (client.clone(), channel.to_string(), instance.clone(), stats.clone());
            std::thread::Builder::new()
                .name("bus-subscriber".into())
                .spawn(move || subscriber(client, channel, instance, stats, inbox_tx, waker))
                .map_err(|e| e.to_string())?;
        }
        {
            let (channel, stats, outbox) = (channel.to_string(), stats.clone(), outbox.clone());
            std::thread::Builder::new()
                .name("bus-publisher".into())
                .spawn(move || publisher(client, channel, stats, outbox))
                .map_err(|e| e.to_string())?;
        }
        Ok(Bus {
            instance,
            outbox,
            inbox,
            stats,
        })
    }

    /// Queues a message for the other instances; never blocks the loop.
    pub fn publish(&self, message: String) {
        let Ok(mut queue) = self.outbox.queue.lock() else {
            return;
        };
        if queue.len() >= OUTBOX_CAPACITY {
            queue.pop_front();
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        queue.push_back((Instant::now(), message));
        self.outbox.ready.notify_one();
    }

    /// A bus with no threads and no Redis, and the sender that fills its inbox as the
    /// subscriber thread would (for loop tests).
    #[cfg(test)]
    pub fn for_tests() -> (Bus, mpsc::SyncSender<Event>) {
        let (inbox_tx, inbox) = mpsc::sync_channel(INBOX_CAPACITY);
        let bus = Bus {
            instance: "test-instance".into(),
            outbox: Outbox::new(),
            inbox,
            stats: Arc::new(BusStats::default()),
        };
        (bus, inbox_tx)
    }

    /// The next event from the other instances, if one is ready, without blocking. The
    /// loop takes them one at a time, as far as ingest is open (`server/ingest.rs`).
    pub fn next_received(&self) -> Option<Event> {
        self.inbox.try_recv().ok()
    }
}

/// Exponential backoff with jitter, so that several instances do not reconnect in step.
fn backoff(attempt: u32) -> Duration {
    let base = BACKOFF_START.saturating_mul(1 << attempt.min(6)).min(BACKOFF_MAX);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // 50% to 100% of the base.
    base / 2 + base.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

/// A read that a signal interrupted: after SIGSTOP and SIGCONT (a debugger, a VM
/// snapshot, a paused container), Linux ends a blocking read that has a timeout with
/// EINTR instead of restarting it. Taken for a lost connection, it dropped the
/// subscription, and what was published until it was back was lost. redis-rs keeps the
/// I/O error private, so it is told by its text (`Interrupted system call (os error 4)`).
fn interrupted(e: &redis::RedisError) -> bool {
    e.is_io_error() && e.to_string().contains(&format!("(os error {})", libc::EINTR))
}

fn subscriber(
    client: redis::Client,
    channel: String,
    instance: String,
    stats: Arc<BusStats>,
    inbox: mpsc::SyncSender<Event>,
    waker: Arc<mio::Waker>,
) {
    let mut attempt = 0u32;
    let mut warned = false;
    let mut seen = Seen::default();
    loop {
        let result = (|| -> redis::RedisResult<()> {
            let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
            let mut pubsub = conn.as_pubsub();
            pubsub.subscribe(&channel)?;
            // Wakes up now and then so a dead peer without a FIN is noticed by the ping.
            pubsub.set_read_timeout(Some(Duration::from_secs(5)))?;
            stats.subscriber_connected.store(true, Ordering::Relaxed);
            log::info!("bus: subscribed to Redis channel {channel:?}");
            attempt = 0;
            warned = false;
            loop {
                let msg = match pubsub.get_message() {
                    Ok(m) => m,
                    Err(e) if e.is_timeout() => {
                        pubsub.ping::<()>()?;
                        continue;
                    }
                    // The parser keeps what it read, as after a timeout: read on.
                    Err(e) if interrupted(&e) => continue,
                    Err(e) => return Err(e),
                };
                let payload: Vec<u8> = match msg.get_payload() {
                    Ok(p) => p,
                    Err(_) => {
                        stats.ignored.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                match decode(&instance, &payload, &mut seen) {
                    Decoded::Own | Decoded::Repeat => {}
                    Decoded::Foreign(why) => {
                        let n = stats.ignored.fetch_add(1, Ordering::Relaxed);
                        // The first and then every hundredth: a noisy channel must not flood the log.
                        if n.is_multiple_of(100) {
                            log::warn!("bus: ignored a message on {channel:?}: {}", crate::logsafe::input(&why));
                        }
                    }
                    Decoded::Event(ev) => {
                        stats.received.fetch_add(1, Ordering::Relaxed);
                        match inbox.try_send(ev) {
                            Ok(()) => {
                                if waker.wake().is_err() {
                                    return Ok(());
                                }
                            }
                            Err(mpsc::TrySendError::Full(_)) => {
                                stats.dropped.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(mpsc::TrySendError::Disconnected(_)) => return Ok(()),
                        }
                    }
                }
            }
        })();
        stats.subscriber_connected.store(false, Ordering::Relaxed);
        match result {
            Ok(()) => return,
            Err(e) => {
                if !warned {
                    log::warn!(
                        "bus: Redis subscription lost or unreachable ({e}); events are delivered locally only until it is back"
                    );
                    warned = true;
                }
            }
        }
        std::thread::sleep(backoff(attempt));
        attempt += 1;
    }
}

/// The publisher's failures since its last successful PUBLISH (one episode): how far
/// the backoff has grown and what was already logged. Only a successful PUBLISH ends an
/// episode: a connection that succeeds and then fails every PUBLISH must not reset it.
#[derive(Debug, Default)]
struct Episode {
    attempt: u32,
    warned_io: bool,
    warned_refused: bool,
}

impl Episode {
    fn published(&mut self) {
        *self = Episode::default();
    }

    /// Connecting failed, or a PUBLISH got no reply: how long to wait before connecting
    /// again, and whether this is the episode's first such failure (to log).
    fn io_failure(&mut self) -> (Duration, bool) {
        let wait = backoff(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        (wait, !std::mem::replace(&mut self.warned_io, true))
    }

    /// Redis answered a PUBLISH with an error: whether this is the episode's first (to log).
    fn refused(&mut self) -> bool {
        !std::mem::replace(&mut self.warned_refused, true)
    }
}

/// Whether Redis answered with an error reply (the connection is in step; only this
/// command failed), rather than the connection failing.
fn is_error_reply(e: &redis::RedisError) -> bool {
    matches!(e.kind(), redis::ErrorKind::Server(_) | redis::ErrorKind::Extension)
}

fn publisher(client: redis::Client, channel: String, stats: Arc<BusStats>, outbox: Arc<Outbox>) {
    let mut conn: Option<redis::Connection> = None;
    let mut episode = Episode::default();
    loop {
        // Connected before there is anything to send, so the metrics tell the truth and
        // the first event does not wait for a handshake.
        if conn.is_none() {
            match client.get_connection_with_timeout(Duration::from_secs(2)) {
                Ok(c) => {
                    let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
                    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                    conn = Some(c);
                    stats.publisher_connected.store(true, Ordering::Relaxed);
                }
                Err(e) => {
                    let (wait, first) = episode.io_failure();
                    if first {
                        log::warn!("bus: cannot connect to Redis to publish ({e}); retrying");
                    }
                    std::thread::sleep(wait);
                    continue;
                }
            }
        }
        let (queued_at, message) = {
            let Ok(mut queue) = outbox.queue.lock() else {
                return;
            };
            loop {
                // Too old to be worth publishing: delivered locally long ago.
                while queue.front().is_some_and(|(t, _)| t.elapsed() > OUTBOX_MAX_AGE) {
                    queue.pop_front();
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(item) = queue.pop_front() {
                    break item;
                }
                queue = match outbox.ready.wait_timeout(queue, Duration::from_secs(1)) {
                    Ok((q, _)) => q,
                    Err(_) => return,
                };
            }
        };
        let Some(c) = conn.as_mut() else {
            requeue(&outbox, queued_at, message);
            continue;
        };
        let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH").arg(&channel).arg(&message).query(c);
        match sent {
            Ok(_) => {
                stats.published.fetch_add(1, Ordering::Relaxed);
                episode.published();
            }
            Err(e) if is_error_reply(&e) => {
                // Sending it again would be refused again: this message is lost to the
                // other instances, and the connection is fine.
                stats.refused.fetch_add(1, Ordering::Relaxed);
                if episode.refused() {
                    log::warn!(
                        "bus: Redis refused to publish an event ({e}); it is delivered locally only, and so is every event refused until one is published"
                    );
                }
            }
            Err(e) => {
                // No reply: it may have been published all the same. It is sent again
                // (receivers drop the repeat by its id) after the backoff.
                conn = None;
                stats.publisher_connected.store(false, Ordering::Relaxed);
                requeue(&outbox, queued_at, message);
                let (wait, first) = episode.io_failure();
                if first {
                    log::warn!("bus: publishing to Redis failed ({e}); reconnecting");
                }
                std::thread::sleep(wait);
            }
        }
    }
}

/// Puts a message back at the front after a failed attempt (it keeps its age).
fn requeue(outbox: &Outbox, queued_at: Instant, message: String) {
    if let Ok(mut queue) = outbox.queue.lock()
        && queue.len() < OUTBOX_CAPACITY
    {
        queue.push_front((queued_at, message));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_successful_publish_resets_the_backoff_and_the_warnings() {
        let mut episode = Episode::default();
        let (first_wait, log) = episode.io_failure();
        assert!(log && first_wait <= BACKOFF_START);
        // Reconnecting succeeds, PUBLISH fails again: the waits grow, logged once.
        let waits: Vec<Duration> = (0..4)
            .map(|_| {
                let (wait, log) = episode.io_failure();
                assert!(!log);
                wait
            })
            .collect();
        assert!(waits[3] >= BACKOFF_START * 8, "{waits:?}");
        // Error replies are logged once too, and do not reset the backoff.
        assert!(episode.refused());
        assert!(!episode.refused());
        assert!(episode.io_failure().0 >= BACKOFF_START * 16);
        episode.published();
        let (wait, log) = episode.io_failure();
        assert!(log && wait <= BACKOFF_START);
        assert!(episode.refused());
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        for attempt in 0..50 {
            let d = backoff(attempt);
            assert!(d >= BACKOFF_START / 2 && d <= BACKOFF_MAX, "{d:?}");
        }
    }

    #[test]
    fn instance_ids_differ() {
        assert_ne!(instance_id(), instance_id());
    }
}
