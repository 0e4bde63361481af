//! Scale-out: several instances share events through one Redis pub/sub channel.
//!
//! The instance that receives `POST /events` resolves the audience once (the group lookup
//! included), delivers to its own subscribers, and publishes the event with its resolved
//! audience; every other instance delivers it to its own subscribers. Each message names
//! the instance that sent it, and an instance ignores its own, so nothing is delivered
//! twice.
//!
//! Redis is spoken by the `redis` crate's blocking client on two helper threads (Redis
//! forbids publishing on a subscribed connection): the subscriber parses what arrives and
//! hands it to the loop through a channel and the loop's `mio::Waker`; the publisher
//! drains a bounded outbox. Both reconnect by themselves with capped, jittered backoff.
//! While Redis is unreachable, local delivery goes on unchanged; messages for the other
//! instances wait in the outbox for at most [`OUTBOX_MAX_AGE`] and at most
//! [`OUTBOX_CAPACITY`] of them (oldest dropped first, counted), so a short blip loses
//! nothing and a long outage means local delivery only.
//!
//! Wire format, one JSON object per message:
//! `{"v":1,"from":"<instance>","repo":"<repo id>","kind":"<type>","to":<audience>,"frame":"<text>"}`
//! where the audience is `{"all":true}`, `{"user":"<name>"}` or `{"users":[...]}`.

use crate::event::{Audience, Event, Kind, Origin};
use serde::{Deserialize, Serialize};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Messages waiting for Redis at most; past it the oldest is dropped.
pub const OUTBOX_CAPACITY: usize = 10_000;
/// A message older than this is not published any more: its event is long delivered
/// locally, and late delivery elsewhere would reorder it behind newer events.
pub const OUTBOX_MAX_AGE: Duration = Duration::from_secs(10);
/// Largest message accepted from the channel; a bigger one is foreign and ignored.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;
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
}

#[derive(Serialize, Deserialize)]
struct Wire {
    v: u32,
    from: String,
    repo: String,
    kind: String,
    to: WireAudience,
    frame: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireAudience {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    all: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    users: Option<Vec<String>>,
}

/// Encodes an event with its resolved audience for the channel.
pub fn encode(instance: &str, ev: &Event, members: Option<&HashSet<Box<str>>>) -> Option<String> {
    let to = match (&ev.audience, members) {
        (Audience::All, _) => WireAudience {
            all: true,
            user: None,
            users: None,
        },
        (Audience::User(u), _) => WireAudience {
            all: false,
            user: Some(u.clone()),
            users: None,
        },
        (Audience::Members(set), _) => WireAudience {
            all: false,
            user: None,
            users: Some(set.iter().map(|u| u.to_string()).collect()),
        },
        (Audience::Group(_), Some(set)) => WireAudience {
            all: false,
            user: None,
            users: Some(set.iter().map(|u| u.to_string()).collect()),
        },
        // An unresolved group is never published: every receiver would have to guess.
        (Audience::Group(_), None) => return None,
    };
    let wire = Wire {
        v: 1,
        from: instance.to_string(),
        repo: ev.repo_id.clone(),
        kind: ev.kind.name().to_string(),
        to,
        frame: ev.frame.as_str().to_string(),
    };
    serde_json::to_string(&wire).ok()
}

/// What a channel message is to this instance.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Event(Event),
    /// Published by this very instance.
    Own,
    /// Not one of ours: the reason, for the warning.
    Foreign(String),
}

/// Decodes a channel message.
pub fn decode(instance: &str, payload: &[u8]) -> Decoded {
    if payload.len() > MAX_MESSAGE_BYTES {
        return Decoded::Foreign(format!("message of {} bytes", payload.len()));
    }
    let wire: Wire = match serde_json::from_slice(payload) {
        Ok(w) => w,
        Err(e) => return Decoded::Foreign(format!("not a notification message: {e}")),
    };
    if wire.v != 1 {
        return Decoded::Foreign(format!("unknown message version {}", wire.v));
    }
    if wire.from == instance {
        return Decoded::Own;
    }
    let Some(kind) = Kind::from_name(&wire.kind) else {
        return Decoded::Foreign(format!("unknown event type {:?}", wire.kind));
    };
    if wire.repo.is_empty() || !wire.frame.ends_with('\n') {
        return Decoded::Foreign("message without a repo or a frame".into());
    }
    let audience = match (wire.to.all, wire.to.user, wire.to.users) {
        (true, None, None) => Audience::All,
        (false, Some(u), None) => Audience::User(u),
        (false, None, Some(users)) => Audience::Members(Arc::new(users.into_iter().map(Box::from).collect())),
        _ => return Decoded::Foreign("message with an ambiguous audience".into()),
    };
    Decoded::Event(Event {
        kind,
        repo_id: wire.repo,
        audience,
        frame: wire.frame.into(),
        origin: Origin::Bus,
    })
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
        }
    }

    /// Starts the subscriber and publisher threads for `url` (`redis://[:password@]host[:port][/db]`).
    /// Fails only on a malformed URL; an unreachable Redis is retried in the background.
    pub fn spawn(url: &str, channel: &str, waker: Arc<mio::Waker>) -> Result<Bus, String> {
        let client = redis::Client::open(url).map_err(|e| format!("redis_url: {e}"))?;
        let instance = instance_id();
        let stats = Arc::new(BusStats::default());
        let outbox = Arc::new(Outbox {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
        });
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

    /// Events from the other instances that are ready, without blocking.
    pub fn received(&self) -> impl Iterator<Item = Event> + '_ {
        self.inbox.try_iter()
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
                    Err(e) => return Err(e),
                };
                let payload: Vec<u8> = match msg.get_payload() {
                    Ok(p) => p,
                    Err(_) => {
                        stats.ignored.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                match decode(&instance, &payload) {
                    Decoded::Own => {}
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

fn publisher(client: redis::Client, channel: String, stats: Arc<BusStats>, outbox: Arc<Outbox>) {
    let mut conn: Option<redis::Connection> = None;
    let mut attempt = 0u32;
    let mut warned = false;
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
                    attempt = 0;
                    warned = false;
                }
                Err(e) => {
                    if !warned {
                        log::warn!("bus: cannot connect to Redis to publish ({e}); retrying");
                        warned = true;
                    }
                    std::thread::sleep(backoff(attempt));
                    attempt += 1;
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
            }
            Err(e) => {
                conn = None;
                stats.publisher_connected.store(false, Ordering::Relaxed);
                if !warned {
                    log::warn!("bus: publishing to Redis failed ({e}); reconnecting");
                    warned = true;
                }
                requeue(&outbox, queued_at, message);
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

    fn event(audience: Audience) -> Event {
        Event {
            kind: Kind::FolderPermChanged,
            repo_id: "r".into(),
            audience,
            frame: "{\"type\":\"folder-perm-changed\",\"content\":{}}\n".into(),
            origin: Origin::Local,
        }
    }

    #[test]
    fn round_trip_with_each_audience() {
        let members: HashSet<Box<str>> = ["a".into(), "b".into()].into_iter().collect();
        for (audience, resolved) in [
            (Audience::All, None),
            (Audience::User("u".into()), None),
            (Audience::Group(7), Some(&members)),
        ] {
            let ev = event(audience.clone());
            let wire = encode("A", &ev, resolved).unwrap();
            assert_eq!(decode("A", wire.as_bytes()), Decoded::Own);
            let Decoded::Event(got) = decode("B", wire.as_bytes()) else {
                panic!("{wire}")
            };
            assert_eq!(
                (got.kind, got.repo_id.as_str(), got.frame.as_str()),
                (ev.kind, "r", ev.frame.as_str())
            );
            assert_eq!(got.origin, Origin::Bus);
            match (audience, got.audience) {
                (Audience::All, Audience::All) => {}
                (Audience::User(a), Audience::User(b)) => assert_eq!(a, b),
                (Audience::Group(_), Audience::Members(set)) => assert_eq!(*set, members),
                (a, b) => panic!("{a:?} became {b:?}"),
            }
        }
        assert_eq!(
            encode("A", &event(Audience::Group(7)), None),
            None,
            "unresolved groups are never published"
        );
    }

    #[test]
    fn foreign_messages_are_refused() {
        for bad in [
            &b"hello"[..],
            b"{}",
            br#"{"v":2,"from":"x","repo":"r","kind":"repo-update","to":{"all":true},"frame":"{}\n"}"#,
            br#"{"v":1,"from":"x","repo":"r","kind":"nope","to":{"all":true},"frame":"{}\n"}"#,
            br#"{"v":1,"from":"x","repo":"r","kind":"repo-update","to":{"all":true,"user":"u"},"frame":"{}\n"}"#,
            br#"{"v":1,"from":"x","repo":"r","kind":"repo-update","to":{},"frame":"{}\n"}"#,
            br#"{"v":1,"from":"x","repo":"","kind":"repo-update","to":{"all":true},"frame":"{}\n"}"#,
            br#"{"v":1,"from":"x","repo":"r","kind":"repo-update","to":{"everyone":true},"frame":"{}\n"}"#,
        ] {
            assert!(
                matches!(decode("me", bad), Decoded::Foreign(_)),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
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
