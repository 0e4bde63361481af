//! The bus's messages on the wire, and the ids that let a receiver drop repeats. Pure:
//! the threads that carry them are in the parent module.
//!
//! Wire format, one JSON object per message:
//! `{"v":1,"id":<n>,"from":"<instance>","repo":"<repo id>","kind":"<type>","to":<audience>,"frame":"<text>"}`
//! where the audience is `{"all":true}`, `{"user":"<name>"}` or `{"users":[...]}`, and
//! `id` is a number that increases with each message an instance publishes. `id` came
//! later: a message without it is still accepted (and never taken for a repeat), and an
//! older instance ignores it, so instances of both kinds can share a channel.

use crate::event::{Audience, Event, Kind, Origin};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Largest message accepted from the channel; a bigger one is foreign and ignored.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Other instances whose last message id is remembered ([`Seen`]); past it the one heard
/// from longest ago is forgotten.
pub const MAX_SENDERS: usize = 256;
/// Longest sender name accepted (ours are host name, pid and 16 hex digits); a longer one
/// is foreign, so the [`Seen`] table stays small.
pub const MAX_SENDER_BYTES: usize = 255;

#[derive(Serialize, Deserialize)]
struct Wire {
    v: u32,
    /// Increases with each message its sender publishes; absent from older senders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
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

/// The id of the next message this process publishes. One counter for the process is
/// enough: ids need only increase per instance, and each `Bus` has its own instance name.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Encodes an event with its resolved audience for the channel, with the next message id.
/// The loop encodes each message just before it queues it, so ids increase in outbox order.
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
        id: Some(NEXT_ID.fetch_add(1, Ordering::Relaxed)),
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
    /// A message already heard (a PUBLISH that was sent again).
    Repeat,
    /// Not one of ours: the reason, for the warning.
    Foreign(String),
}

/// Decodes a channel message; `seen` remembers the ids heard, to drop repeats.
pub fn decode(instance: &str, payload: &[u8], seen: &mut Seen) -> Decoded {
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
    if wire.from.len() > MAX_SENDER_BYTES {
        return Decoded::Foreign(format!("a sender name of {} bytes", wire.from.len()));
    }
    // Last, so that only a message that would be delivered moves the sender's window.
    if let Some(id) = wire.id
        && seen.repeat(&wire.from, id)
    {
        return Decoded::Repeat;
    }
    Decoded::Event(Event {
        kind,
        repo_id: wire.repo,
        audience,
        frame: wire.frame.into(),
        origin: Origin::Bus,
    })
}

/// The highest message id heard from each other instance, for at most [`MAX_SENDERS`]
/// of them, to drop repeats.
///
/// A sender's ids arrive in increasing order, repeats apart: its one publisher thread
/// sends one message at a time, a message that failed goes back to the front of its
/// outbox, and Redis delivers what one connection publishes in order. (A PUBLISH sent on
/// a connection since given up may still run after its retry on the next one, but then
/// as a repeat of an id already heard.) So an id not above the highest heard is a repeat,
/// and one number per sender is the whole window.
#[derive(Debug, Default)]
pub struct Seen {
    /// Sender → (highest id heard, when it was last heard on `clock`).
    senders: HashMap<Box<str>, (u64, u64)>,
    /// Counts messages, to tell which sender was heard from longest ago.
    clock: u64,
}

impl Seen {
    /// Whether `id` from `from` was heard before; remembers it if not.
    pub fn repeat(&mut self, from: &str, id: u64) -> bool {
        self.clock += 1;
        if let Some((highest, heard)) = self.senders.get_mut(from) {
            *heard = self.clock;
            if id <= *highest {
                return true;
            }
            *highest = id;
            return false;
        }
        if self.senders.len() >= MAX_SENDERS {
            // Rare (a new instance while the table is full), so a scan is fine.
            let oldest = self
                .senders
                .iter()
                .min_by_key(|(_, (_, heard))| *heard)
                .map(|(name, _)| name.clone());
            if let Some(name) = oldest {
                self.senders.remove(&name);
            }
        }
        self.senders.insert(from.into(), (id, self.clock));
        false
    }

    /// Senders remembered.
    pub fn len(&self) -> usize {
        self.senders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
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
            assert_eq!(decode("A", wire.as_bytes(), &mut Seen::default()), Decoded::Own);
            let Decoded::Event(got) = decode("B", wire.as_bytes(), &mut Seen::default()) else {
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
                matches!(decode("me", bad, &mut Seen::default()), Decoded::Foreign(_)),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_message_sent_again_is_delivered_once() {
        let mut seen = Seen::default();
        let first = encode("A", &event(Audience::All), None).unwrap();
        let second = encode("A", &event(Audience::All), None).unwrap();
        assert!(matches!(decode("B", first.as_bytes(), &mut seen), Decoded::Event(_)));
        // The PUBLISH of `first` lost its reply and was sent again.
        assert_eq!(decode("B", first.as_bytes(), &mut seen), Decoded::Repeat);
        assert!(matches!(decode("B", second.as_bytes(), &mut seen), Decoded::Event(_)));
        assert_eq!(decode("B", first.as_bytes(), &mut seen), Decoded::Repeat);
        assert_eq!(decode("B", second.as_bytes(), &mut seen), Decoded::Repeat);
        // Another sender's ids are its own.
        let other = first.replace("\"from\":\"A\"", "\"from\":\"C\"");
        assert!(matches!(decode("B", other.as_bytes(), &mut seen), Decoded::Event(_)));
    }

    #[test]
    fn messages_without_an_id_are_never_repeats_and_move_nothing() {
        let mut seen = Seen::default();
        let old = br#"{"v":1,"from":"x","repo":"r","kind":"repo-update","to":{"all":true},"frame":"{}\n"}"#;
        for _ in 0..3 {
            assert!(matches!(decode("me", old, &mut seen), Decoded::Event(_)));
        }
        assert!(seen.is_empty());
        // Nor does a malformed message with an id.
        let bad = br#"{"v":1,"id":9,"from":"x","repo":"","kind":"repo-update","to":{"all":true},"frame":"{}\n"}"#;
        assert!(matches!(decode("me", bad, &mut seen), Decoded::Foreign(_)));
        assert!(seen.is_empty());
        let long = format!(
            r#"{{"v":1,"id":1,"from":"{}","repo":"r","kind":"repo-update","to":{{"all":true}},"frame":"{{}}\n"}}"#,
            "x".repeat(MAX_SENDER_BYTES + 1)
        );
        assert!(matches!(decode("me", long.as_bytes(), &mut seen), Decoded::Foreign(_)));
        assert!(seen.is_empty());
    }

    #[test]
    fn seen_keeps_at_most_max_senders_and_forgets_the_quietest() {
        let mut seen = Seen::default();
        assert!(!seen.repeat("busy", 1));
        for i in 0..MAX_SENDERS * 4 {
            assert!(!seen.repeat(&format!("s{i}"), 1));
            // The busy sender keeps talking, so it is never the one forgotten.
            assert!(!seen.repeat("busy", i as u64 + 2));
            assert!(seen.len() <= MAX_SENDERS);
        }
        assert_eq!(seen.len(), MAX_SENDERS);
        assert!(seen.repeat("busy", 2), "still remembered");
        // The earliest quiet senders were forgotten: a repeat from one of them passes.
        assert!(!seen.repeat("s0", 1));
        let last = format!("s{}", MAX_SENDERS * 4 - 1);
        assert!(seen.repeat(&last, 1), "the latest are remembered");
    }
}
