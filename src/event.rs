//! Events: parsing `/events` bodies into an [`Event`] with its audience, and the outbound
//! message text, built once per event (PROTOCOL.md section 5). The fan-out encodes it
//! into one websocket frame that every subscriber's queue shares (`conn/out.rs`).
//!
//! An [`Event`] does not know where it came from, so the same fan-out serves events from
//! HTTP and, later, from a bus between instances.

use crate::lenient::{Object, compact};
use std::collections::HashSet;
use std::sync::Arc;
use tungstenite::Utf8Bytes;

/// The four event types the official server forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    RepoUpdate,
    FileLockChanged,
    FolderPermChanged,
    CommentUpdate,
}

impl Kind {
    /// The kind with this wire name.
    pub fn from_name(t: &str) -> Option<Kind> {
        Some(match t {
            "repo-update" => Kind::RepoUpdate,
            "file-lock-changed" => Kind::FileLockChanged,
            "folder-perm-changed" => Kind::FolderPermChanged,
            "comment-update" => Kind::CommentUpdate,
            _ => return None,
        })
    }

    /// The wire name, also a metrics label.
    pub fn name(self) -> &'static str {
        match self {
            Kind::RepoUpdate => "repo-update",
            Kind::FileLockChanged => "file-lock-changed",
            Kind::FolderPermChanged => "folder-perm-changed",
            Kind::CommentUpdate => "comment-update",
        }
    }
}

/// Who among a library's subscribers receives an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// Every subscriber of the library.
    All,
    /// Subscriptions made with this user's token (user-scoped folder permissions).
    User(String),
    /// Subscriptions whose user is a member of this group (group-scoped folder
    /// permissions); needs a membership lookup.
    Group(i64),
    /// Subscriptions whose user is in this set: a group already resolved by the
    /// instance that received the event (see `bus.rs`).
    Members(Arc<HashSet<Box<str>>>),
}

/// Where an event came from: a sender's `POST /events` here, or another instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Local,
    Bus,
}

/// One event to deliver.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: Kind,
    pub repo_id: String,
    pub audience: Audience,
    /// `{"type":…,"content":…}` plus a newline, as the official server writes it.
    pub frame: Utf8Bytes,
    pub origin: Origin,
}

impl Event {
    /// The memory this event holds while it waits to be fanned out (its text, its
    /// library id and user, and itself): what the output budget counts for it.
    pub fn held_bytes(&self) -> usize {
        let user = match &self.audience {
            Audience::User(u) => u.len(),
            // A group resolved by another instance: its member names, and a hash slot each.
            Audience::Members(set) => set.iter().map(|m| m.len() + 2 * std::mem::size_of::<usize>()).sum(),
            Audience::All | Audience::Group(_) => 0,
        };
        std::mem::size_of::<Event>() + self.frame.len() + self.repo_id.len() + user
    }
}

/// What became of an `/events` body.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    /// Deliver this.
    Event(Event),
    /// Valid JSON, answered 200, but nothing to deliver (the official server does the
    /// same); the reason is logged.
    Ignored(String),
    /// Not a JSON object with a string `type`: answered 500, as the official server does.
    Invalid,
}

/// Parses an `/events` body.
pub fn parse(body: &[u8]) -> Parsed {
    let Ok(text) = std::str::from_utf8(body) else {
        return Parsed::Invalid;
    };
    let Ok(top) = Object::parse(text) else {
        return Parsed::Invalid;
    };
    let event_type = match top.string("type") {
        Ok(t) => t.unwrap_or_default(),
        Err(_) => return Parsed::Invalid,
    };
    let Some(kind) = Kind::from_name(&event_type) else {
        return Parsed::Ignored(format!("unknown event type {event_type:?}"));
    };
    let Some(raw_content) = top.get("content") else {
        return Parsed::Ignored(format!("{} event without content", kind.name()));
    };
    let Ok(content) = Object::parse(raw_content.get()) else {
        return Parsed::Ignored(format!("{} event whose content is not an object", kind.name()));
    };
    let Ok(repo_id) = content.string("repo_id") else {
        return Parsed::Ignored(format!("{} event whose repo_id is not a string", kind.name()));
    };
    let repo_id = repo_id.unwrap_or_default();
    if repo_id.is_empty() {
        return Parsed::Ignored(format!("{} event without repo_id", kind.name()));
    }
    let audience = if kind == Kind::FolderPermChanged {
        match folder_perm_audience(&content) {
            Ok(a) => a,
            Err(why) => return Parsed::Ignored(format!("folder-perm-changed event with {why}")),
        }
    } else {
        Audience::All
    };
    let frame = format!(
        "{{\"type\":\"{}\",\"content\":{}}}\n",
        kind.name(),
        compact(raw_content.get())
    );
    Parsed::Event(Event {
        kind,
        repo_id,
        audience,
        frame: frame.into(),
        origin: Origin::Local,
    })
}

/// The audience rule of the official server: a named user, else a group unless it is -1
/// (a missing group is group 0, as Go's zero value), else everyone.
fn folder_perm_audience(content: &Object) -> Result<Audience, &'static str> {
    let user = content.string("user").map_err(|_| "a user that is not a string")?;
    if let Some(user) = user.filter(|u| !u.is_empty()) {
        return Ok(Audience::User(user));
    }
    let group = match content.get("group") {
        None => 0,
        Some(raw) => match serde_json::from_str::<Option<i64>>(raw.get()) {
            Ok(g) => g.unwrap_or(0),
            Err(_) => return Err("a group that is not an integer"),
        },
    };
    Ok(if group == -1 {
        Audience::All
    } else {
        Audience::Group(group)
    })
}

/// The message telling a client its token for `repo_id` is bad or ran out. The id is
/// escaped as a JSON string (the official server pasted it in raw).
pub fn jwt_expired(repo_id: &str) -> Utf8Bytes {
    let id = serde_json::to_string(repo_id).unwrap_or_else(|_| "\"\"".to_string());
    format!("{{\"type\":\"jwt-expired\",\"content\":{{\"repo_id\":{id}}}}}\n").into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(body: &str) -> Event {
        match parse(body.as_bytes()) {
            Parsed::Event(e) => e,
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn repo_update_is_forwarded_compact_with_every_field() {
        let e =
            event(r#"{"type": "repo-update", "content": {"repo_id": "r1", "commit_id": "c", "extra": {"a": [1, 2]}}}"#);
        assert_eq!(e.kind, Kind::RepoUpdate);
        assert_eq!(e.repo_id, "r1");
        assert_eq!(e.audience, Audience::All);
        assert_eq!(
            e.frame.as_str(),
            "{\"type\":\"repo-update\",\"content\":{\"repo_id\":\"r1\",\"commit_id\":\"c\",\"extra\":{\"a\":[1,2]}}}\n"
        );
    }

    #[test]
    fn seahub_comment_update_with_python_spacing() {
        let e = event(
            r#"{"type": "comment-update", "content": {"repo_id": "r", "type": "comment_updated", "file_uuid": "u", "file_path": ""}}"#,
        );
        assert_eq!(e.kind, Kind::CommentUpdate);
        assert!(e.frame.as_str().contains("\"file_path\":\"\""));
    }

    #[test]
    fn folder_perm_audiences() {
        let base = |extra: &str| {
            format!(
                r#"{{"type":"folder-perm-changed","content":{{"repo_id":"r","path":"/d","type":"user","change_event":"add","perm":"rw"{extra}}}}}"#
            )
        };
        assert_eq!(
            event(&base(r#","user":"a@b","group":-1"#)).audience,
            Audience::User("a@b".into())
        );
        assert_eq!(event(&base(r#","user":"","group":7"#)).audience, Audience::Group(7));
        assert_eq!(event(&base(r#","user":"","group":-1"#)).audience, Audience::All);
        assert_eq!(event(&base(r#","user":"""#)).audience, Audience::Group(0));
        assert!(matches!(parse(base(r#","user":5"#).as_bytes()), Parsed::Ignored(_)));
        assert!(matches!(parse(base(r#","group":1.5"#).as_bytes()), Parsed::Ignored(_)));
    }

    #[test]
    fn lock_events_keep_unknown_fields() {
        let e = event(
            r#"{"type":"file-lock-changed","content":{"repo_id":"r","path":"/a.docx","change_event":"locked","lock_user":"u","expire":0}}"#,
        );
        assert!(e.frame.as_str().contains("\"expire\":0"));
    }

    #[test]
    fn go_lenient_keys() {
        let e = event(r#"{"Type":"repo-update","CONTENT":{"Repo_Id":"r"}}"#);
        assert_eq!(e.repo_id, "r");
    }

    #[test]
    fn invalid_bodies_are_500() {
        for b in ["", "x", "[]", "{} {}", r#"{"type":5}"#, "\u{0}"] {
            assert_eq!(parse(b.as_bytes()), Parsed::Invalid, "{b:?}");
        }
        assert_eq!(parse(b"\xff"), Parsed::Invalid);
    }

    #[test]
    fn ignored_bodies_are_200() {
        for b in [
            r#"{}"#,
            r#"{"type":"other","content":{}}"#,
            r#"{"type":"repo-update"}"#,
            r#"{"type":"repo-update","content":"s"}"#,
            r#"{"type":"repo-update","content":{"repo_id":5}}"#,
            r#"{"type":"repo-update","content":{}}"#,
            r#"{"type":"repo-update","content":null}"#,
        ] {
            assert!(matches!(parse(b.as_bytes()), Parsed::Ignored(_)), "{b}");
        }
    }

    #[test]
    fn jwt_expired_escapes_the_id() {
        assert_eq!(
            jwt_expired("r1").as_str(),
            "{\"type\":\"jwt-expired\",\"content\":{\"repo_id\":\"r1\"}}\n"
        );
        let m = jwt_expired("a\"b\\");
        let v: serde_json::Value = serde_json::from_str(m.as_str()).unwrap();
        assert_eq!(v["content"]["repo_id"], "a\"b\\");
    }
}
