//! The websocket side that is not framing: upgrade validation and the 101 answer, the
//! tungstenite configuration derived from our limits, and client message parsing
//! (PROTOCOL.md sections 3.4, 6.2 and 11.3). Pure; framing itself is tungstenite's.

use crate::config::Config;
use crate::http::{self, Head};
use crate::lenient::Object;
use serde::de::{self, Deserializer as _, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::cell::Cell;
use tungstenite::protocol::WebSocketConfig;

/// Checks an upgrade request as gorilla/websocket does, in its order, and returns the
/// `Sec-WebSocket-Accept` value, or the complete refusal to send.
pub fn check_upgrade(head: &Head) -> Result<String, Vec<u8>> {
    let refuse = |status: u16, reason: &str| {
        let body = format!("{reason}\n");
        http::plain_with(
            status,
            reason,
            &["Sec-Websocket-Version: 13"],
            &body,
            head.keep_alive,
            false,
        )
    };
    if !head.connection_upgrade || !head.upgrade_websocket {
        return Err(refuse(400, "Bad Request"));
    }
    if head.method != "GET" {
        return Err(refuse(405, "Method Not Allowed"));
    }
    if head.ws_version.as_deref() != Some("13") {
        return Err(refuse(400, "Bad Request"));
    }
    match head.ws_key.as_deref() {
        Some(key) if valid_key(key) => Ok(tungstenite::handshake::derive_accept_key(key.as_bytes())),
        _ => Err(refuse(400, "Bad Request")),
    }
}

/// A `Sec-WebSocket-Key` must be base64 of 16 bytes: 22 base64 characters and `==`.
fn valid_key(key: &str) -> bool {
    match key.as_bytes().split_at_checked(22) {
        Some((body, pad)) => {
            pad == b"=="
                && body
                    .iter()
                    .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
        }
        None => false,
    }
}

/// The 101 answer: no subprotocol, no extensions, whatever the client offered.
pub fn switching_protocols(accept: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

/// tungstenite's settings from our limits. Its defaults would allocate 128 KiB per
/// connection up front.
///
/// tungstenite writes into the connection's `Tap`, which queues every byte with the rest
/// of the connection's output (`conn/out.rs`) and never blocks: with a write buffer of 0
/// each control frame goes straight through, so tungstenite's own buffer stays empty and
/// its cap is never reached. `max_unsent_bytes` is enforced on the queue instead.
pub fn socket_config(config: &Config) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(config.ws_read_buffer_bytes)
        .write_buffer_size(0)
        .max_write_buffer_size(usize::MAX)
        .max_message_size(Some(config.max_message_bytes))
        .max_frame_size(Some(config.max_message_bytes))
        .accept_unmasked_frames(false)
}

/// A message from a client.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientMsg {
    /// (repo id, token) pairs; either may be empty when the client left it out.
    Subscribe(Vec<(String, String)>),
    /// Repo ids.
    Unsubscribe(Vec<String>),
}

impl ClientMsg {
    /// How many libraries it lists (the work it asks for).
    pub fn entries(&self) -> usize {
        match self {
            ClientMsg::Subscribe(repos) => repos.len(),
            ClientMsg::Unsubscribe(repos) => repos.len(),
        }
    }
}

/// Why a client message is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum BadMessage {
    /// Not one of the two messages (bad JSON, unknown type, wrong shapes): Close 1003.
    Invalid(&'static str),
    /// It lists more libraries than `max_repos_per_connection`: Close 1008, before any
    /// entry is looked at.
    TooManyRepos,
}

impl std::fmt::Display for BadMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadMessage::Invalid(why) => f.write_str(why),
            BadMessage::TooManyRepos => f.write_str("too many subscriptions"),
        }
    }
}

/// Parses a text or binary frame's payload. Anything else than the two messages (bad
/// JSON, unknown type, missing content, wrong shapes) is an error, and closes the socket;
/// so is a list of more than `max_repos` libraries, found at entry `max_repos + 1`
/// without building or looking at the rest (a 256 KiB message holds 87,000 `{}`; the
/// message is still scanned once, as valid JSON).
pub fn parse_client(payload: &[u8], max_repos: usize) -> Result<ClientMsg, BadMessage> {
    use BadMessage::Invalid;
    let text = std::str::from_utf8(payload).map_err(|_| Invalid("message is not UTF-8"))?;
    let top = Object::parse(text).map_err(|_| Invalid("message is not a JSON object"))?;
    let kind = top
        .string("type")
        .map_err(|_| Invalid("type is not a string"))?
        .unwrap_or_default();
    let content = top.get("content").ok_or(Invalid("message has no content"))?;
    // Go decodes `"content": null` into an empty request: a no-op, not an error.
    let repos: Vec<&RawValue> = if content.get() == "null" {
        Vec::new()
    } else {
        let content = Object::parse(content.get()).map_err(|_| Invalid("content is not an object"))?;
        match content.get("repos") {
            None => Vec::new(),
            Some(r) if r.get() == "null" => Vec::new(),
            Some(r) => bounded_list(r.get(), max_repos)?,
        }
    };
    match kind.as_str() {
        "subscribe" => {
            let mut out = Vec::with_capacity(repos.len());
            for raw in repos {
                let repo = Object::parse(raw.get()).map_err(|_| Invalid("a subscribe entry is not an object"))?;
                let id = repo.string("id").map_err(|_| Invalid("a repo id is not a string"))?;
                let token = repo
                    .string("jwt_token")
                    .map_err(|_| Invalid("a jwt_token is not a string"))?;
                out.push((id.unwrap_or_default(), token.unwrap_or_default()));
            }
            Ok(ClientMsg::Subscribe(out))
        }
        "unsubscribe" => {
            let mut out = Vec::with_capacity(repos.len());
            for raw in repos {
                // Objects as every real client sends, or the plain strings of the
                // protocol's first draft.
                let id = match serde_json::from_str::<String>(raw.get()) {
                    Ok(id) => id,
                    Err(_) => Object::parse(raw.get())
                        .map_err(|_| Invalid("an unsubscribe entry is neither an object nor a string"))?
                        .string("id")
                        .map_err(|_| Invalid("a repo id is not a string"))?
                        .unwrap_or_default(),
                };
                out.push(id);
            }
            Ok(ClientMsg::Unsubscribe(out))
        }
        _ => Err(Invalid("unknown message type")),
    }
}

/// The entries of a JSON list, as raw values, refusing a list of more than `max` entries
/// as soon as entry `max + 1` is met.
fn bounded_list(text: &str, max: usize) -> Result<Vec<&RawValue>, BadMessage> {
    struct Bounded<'c> {
        max: usize,
        over: &'c Cell<bool>,
    }
    impl<'de> Visitor<'de> for Bounded<'_> {
        type Value = Vec<&'de RawValue>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(raw) = seq.next_element::<&'de RawValue>()? {
                if out.len() == self.max {
                    self.over.set(true);
                    return Err(de::Error::custom("too many entries"));
                }
                out.push(raw);
            }
            Ok(out)
        }
    }
    let over = Cell::new(false);
    let mut de = serde_json::Deserializer::from_str(text);
    match de.deserialize_seq(Bounded { max, over: &over }) {
        Ok(list) => Ok(list),
        Err(_) if over.get() => Err(BadMessage::TooManyRepos),
        Err(_) => Err(BadMessage::Invalid("repos is not a list")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(extra: &str, method: &str) -> Head {
        let text = format!("{method} /notification HTTP/1.1\r\nHost: x\r\n{extra}\r\n");
        http::parse_head(text.as_bytes(), 4096, 0).unwrap().unwrap()
    }

    const GOOD: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

    #[test]
    fn good_upgrade_gets_the_rfc_accept_key() {
        assert_eq!(
            check_upgrade(&head(GOOD, "GET")).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        let offered = format!(
            "{GOOD}Sec-WebSocket-Protocol: notification.seafile.com\r\nSec-WebSocket-Extensions: permessage-deflate\r\nOrigin: other\r\n"
        );
        assert!(check_upgrade(&head(&offered, "GET")).is_ok());
        let r = String::from_utf8(switching_protocols("abc")).unwrap();
        assert_eq!(
            r,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: abc\r\n\r\n"
        );
    }

    #[test]
    fn bad_upgrades_get_the_official_answers() {
        let status = |h: &Head| {
            let r = String::from_utf8(check_upgrade(h).unwrap_err()).unwrap();
            assert!(r.contains("\r\nSec-Websocket-Version: 13\r\n"), "{r}");
            r[9..12].to_string()
        };
        assert_eq!(status(&head("", "GET")), "400");
        assert_eq!(status(&head("Connection: Upgrade\r\n", "GET")), "400");
        assert_eq!(status(&head(GOOD, "POST")), "405");
        assert_eq!(status(&head(&GOOD.replace("13", "8"), "GET")), "400");
        assert_eq!(
            status(&head(&GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "short"), "GET")),
            "400"
        );
        let no_key = GOOD.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "");
        assert_eq!(status(&head(&no_key, "GET")), "400");
        let r = String::from_utf8(check_upgrade(&head("", "GET")).unwrap_err()).unwrap();
        assert!(r.ends_with("\r\n\r\nBad Request\n"));
    }

    #[test]
    fn client_messages() {
        let m = parse_client(
            br#"{"type":"subscribe","content":{"repos":[{"id":"r1","jwt_token":"t1"},{"id":"r2"}]}}"#,
            2,
        );
        assert_eq!(
            m,
            Ok(ClientMsg::Subscribe(vec![
                ("r1".into(), "t1".into()),
                ("r2".into(), String::new())
            ]))
        );
        let m = parse_client(br#"{"type":"unsubscribe","content":{"repos":[{"id":"r1"},"r2"]}}"#, 2);
        assert_eq!(m, Ok(ClientMsg::Unsubscribe(vec!["r1".into(), "r2".into()])));
        let m = parse_client(br#"{"Type":"subscribe","Content":{"Repos":null,"x":1},"y":2}"#, 2);
        assert_eq!(m, Ok(ClientMsg::Subscribe(vec![])));
        assert_eq!(
            parse_client(br#"{"type":"subscribe","content":null}"#, 2),
            Ok(ClientMsg::Subscribe(vec![]))
        );
    }

    #[test]
    fn bad_client_messages() {
        for bad in [
            &b"not json"[..],
            b"\xff",
            br#"{"type":"ping"}"#,
            br#"{"type":"ping","content":{}}"#,
            br#"{"type":"subscribe"}"#,
            br#"{"type":"subscribe","content":{"repos":["r1"]}}"#,
            br#"{"type":"subscribe","content":{"repos":{"id":"r"}}}"#,
            br#"{"type":"subscribe","content":5}"#,
            br#"{"type":"unsubscribe","content":{"repos":[5]}}"#,
            br#"[]"#,
        ] {
            assert!(
                matches!(parse_client(bad, 10), Err(BadMessage::Invalid(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_list_over_the_cap_is_refused_at_the_entry_past_it() {
        let three = br#"{"type":"subscribe","content":{"repos":[{},{},{}]}}"#;
        assert_eq!(parse_client(three, 2), Err(BadMessage::TooManyRepos));
        assert!(matches!(parse_client(three, 3), Ok(ClientMsg::Subscribe(r)) if r.len() == 3));
        let unsub = br#"{"type":"unsubscribe","content":{"repos":["a","b","c"]}}"#;
        assert_eq!(parse_client(unsub, 2), Err(BadMessage::TooManyRepos));
        // A list within the cap must still be a list.
        let not_list = br#"{"type":"subscribe","content":{"repos":[{},!!!]}}"#;
        assert!(matches!(parse_client(not_list, 5), Err(BadMessage::Invalid(_))));
    }
}
