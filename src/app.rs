//! The HTTP application: what each request means. Routing, `/ping`, `/metrics`,
//! `/events` (allow-list, token, body) and the websocket upgrade decision, as pure
//! functions from a complete request to an [`Answer`]: the bytes to send, the event to
//! deliver (if any), and whether the connection stays, closes or becomes a websocket.
//!
//! No I/O and no connection state: the transport (`conn::HttpConn`) frames requests,
//! writes answers in order and acts on [`Then`]; the reactor delivers the event after the
//! answer is written.

use crate::auth::{TokenError, Verifier};
use crate::config::Config;
use crate::conn::{CloseReason, Listener, Millis};
use crate::event::{self, Event, Parsed};
use crate::http::{self, Head, Route};
use crate::ws;
use std::net::SocketAddr;

/// What the reactor hands the application (and the transport) for one readiness turn.
pub struct Ctx<'a> {
    pub config: &'a Config,
    pub verifier: &'a Verifier,
    /// Unix seconds, for token expiry.
    pub unix_now: i64,
    pub now: Millis,
    /// The server is draining: refuse new upgrades with 503.
    pub draining: bool,
    /// The rendered metrics, for connections of the metrics listener.
    pub metrics: Option<&'a str>,
    /// The server takes new events now. When it does not (output budget, pacing:
    /// server/ingest.rs), the transport holds a complete `/events` request unanswered;
    /// other requests are still answered.
    pub taking_events: bool,
}

/// One complete request.
pub struct Request<'a> {
    pub head: &'a Head,
    pub body: &'a [u8],
    pub peer: SocketAddr,
    pub listener: Listener,
}

/// What happens to the connection once the answer is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Then {
    /// Read the next request (if the request allowed keep-alive).
    Continue,
    Close(CloseReason),
    /// The answer is a 101: the connection becomes a websocket.
    Upgrade {
        forwarded_for: Option<Box<str>>,
    },
}

/// What a websocket keeps of its `X-Forwarded-For`, which only its log lines show: the
/// value as they show it, escaped and cut (`logsafe::input`: at most
/// `logsafe::MAX_LOGGED_VALUE` bytes and a marker), not the up to 8 KB a client may send
/// with every one of thousands of websockets.
fn kept_for_logs(forwarded_for: &str) -> Box<str> {
    crate::logsafe::input(forwarded_for).to_string().into_boxed_str()
}

/// Something an answer counts, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    EventTokenRejected(TokenError),
    EventIgnored,
    EventInvalid,
    /// Refused with 403: the sender's address is not in `events_allow`.
    EventForbidden,
}

/// The application's answer to one request.
#[derive(Debug)]
pub struct Answer {
    pub bytes: Vec<u8>,
    pub then: Then,
    /// An accepted event, to deliver once `bytes` are written.
    pub event: Option<Event>,
    pub count: Option<Count>,
    /// The answer was decided without the body: a client that sent `Expect:
    /// 100-continue` and got no `100` may or may not have sent it, so the transport
    /// must close after this answer (as Go's net/http does), or how TCP cut the bytes
    /// would decide what the next request is.
    pub body_unread: bool,
}

impl Answer {
    fn reply(bytes: Vec<u8>) -> Answer {
        Answer {
            bytes,
            then: Then::Continue,
            event: None,
            count: None,
            body_unread: false,
        }
    }
}

/// Answers a complete request.
pub fn answer(req: &Request, ctx: &Ctx) -> Answer {
    let head = req.head;
    let head_only = head.method == "HEAD";
    let mut answer = route(req, ctx, head_only);
    if head_only {
        // A HEAD answer never carries its body (the client would read it as the next
        // response), whatever the route.
        if let Some(end) = answer.bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            answer.bytes.truncate(end + 4);
        }
    }
    answer
}

fn route(req: &Request, ctx: &Ctx, head_only: bool) -> Answer {
    let head = req.head;
    let keep = head.keep_alive;
    if req.listener == Listener::Metrics {
        // The metrics listener serves only /metrics; the public routes do not exist here.
        return Answer::reply(match (head.metrics_path, ctx.metrics) {
            (true, Some(text)) => http::metrics(text, keep),
            _ => http::not_found(keep, head_only),
        });
    }
    match head.route {
        Route::Ping => Answer::reply(http::pong(keep, head_only)),
        Route::Events => {
            if let Some(refusal) = refuse_event(head, req.peer, ctx) {
                return refusal;
            }
            match event::parse(req.body) {
                Parsed::Event(ev) => Answer {
                    event: Some(ev),
                    ..Answer::reply(http::ok_empty(keep))
                },
                Parsed::Ignored(why) => {
                    crate::logsafe::limited!(
                        crate::logsafe::Kind::EventIgnored,
                        "ignored event from {}: {}",
                        req.peer,
                        crate::logsafe::input(&why)
                    );
                    Answer {
                        count: Some(Count::EventIgnored),
                        ..Answer::reply(http::ok_empty(keep))
                    }
                }
                Parsed::Invalid => {
                    crate::logsafe::limited!(
                        crate::logsafe::Kind::EventInvalid,
                        "event body from {} is not a JSON object with a string type",
                        req.peer
                    );
                    Answer {
                        count: Some(Count::EventInvalid),
                        ..Answer::reply(http::bad_event_body(keep))
                    }
                }
            }
        }
        Route::Upgrade => match ws::check_upgrade(head) {
            Ok(_) if ctx.draining => Answer {
                then: Then::Close(CloseReason::Shutdown),
                ..Answer::reply(http::unavailable())
            },
            Ok(accept) => Answer {
                then: Then::Upgrade {
                    forwarded_for: head.x_forwarded_for.as_deref().map(kept_for_logs),
                },
                ..Answer::reply(ws::switching_protocols(&accept))
            },
            Err(refusal) => {
                // Info, not debug: a proxy that drops Upgrade/Connection headers shows
                // up here, once per client reconnect (every 60 s for desktop clients).
                crate::logsafe::limited!(
                    crate::logsafe::Kind::UpgradeRefused,
                    "refused websocket upgrade from {}: {} {} (a proxy must forward the Upgrade and Connection headers)",
                    req.peer,
                    crate::logsafe::input(&head.method),
                    String::from_utf8_lossy(refusal.get(9..12).unwrap_or_default())
                );
                Answer::reply(refusal)
            }
        },
        Route::NotFound => Answer::reply(http::not_found(keep, head_only)),
    }
}

/// The answer to an `/events` request whose body has not arrived yet (`Expect:
/// 100-continue`), if it is refused whatever the body: it is refused now instead of
/// inviting the body first (as the official server does: its handler checks the token
/// before reading). The unread body is why the connection then closes.
pub fn refuse_before_body(head: &Head, peer: SocketAddr, listener: Listener, ctx: &Ctx) -> Option<Answer> {
    if head.route != Route::Events || listener == Listener::Metrics {
        return None;
    }
    let refusal = refuse_event(head, peer, ctx)?;
    Some(Answer {
        then: Then::Close(CloseReason::Done),
        ..refusal
    })
}

/// The answer to an `/events` request that is refused whatever its body: a sender
/// outside `events_allow` (403) or a missing or bad token (400, as the official server).
/// Logged here.
fn refuse_event(head: &Head, peer: SocketAddr, ctx: &Ctx) -> Option<Answer> {
    let keep = head.keep_alive;
    let allow = &ctx.config.events_allow;
    if !allow.is_empty() && !allow.iter().any(|n| n.contains(peer.ip())) {
        crate::logsafe::limited!(
            crate::logsafe::Kind::EventNotAllowed,
            "refused event from {peer}: address not in events_allow"
        );
        return Some(Answer {
            count: Some(Count::EventForbidden),
            body_unread: true,
            ..Answer::reply(http::plain(
                403,
                "Forbidden",
                "events are not accepted from this address\n",
                keep,
                false,
            ))
        });
    }
    let e = ctx
        .verifier
        .verify_event_request(
            head.authorization.as_deref(),
            head.seafile_repo_token.as_deref(),
            ctx.unix_now,
        )
        .err()?;
    crate::logsafe::limited!(
        crate::logsafe::Kind::EventTokenRefused,
        "refused event from {peer}: bad token ({})",
        e.label()
    );
    Some(Answer {
        count: Some(Count::EventTokenRejected(e)),
        body_unread: true,
        ..Answer::reply(http::token_mismatch(keep))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cidr;

    fn config() -> Config {
        Config {
            jwt_private_key: b"k".to_vec(),
            ..Config::default()
        }
    }

    fn ask(raw: &[u8], listener: Listener, draining: bool) -> Answer {
        ask_with(config(), raw, listener, draining)
    }

    fn ask_with(config: Config, raw: &[u8], listener: Listener, draining: bool) -> Answer {
        let verifier = Verifier::new(&config.jwt_private_key);
        let ctx = Ctx {
            config: &config,
            verifier: &verifier,
            unix_now: 1_800_000_000,
            now: 0,
            draining,
            metrics: Some("m 1\n"),
            taking_events: true,
        };
        let head = http::parse_head(raw, 8192, 8192).unwrap().unwrap();
        let req = Request {
            head: &head,
            body: raw.get(head.len..).unwrap_or_default(),
            peer: SocketAddr::from(([127, 0, 0, 1], 1)),
            listener,
        };
        answer(&req, &ctx)
    }

    #[test]
    fn ping_and_head_ping() {
        let a = ask(b"GET /ping HTTP/1.1\r\n\r\n", Listener::Public, false);
        assert!(a.bytes.starts_with(b"HTTP/1.1 200 OK\r\n"));
        assert!(a.bytes.ends_with(b"{\"ret\": \"pong\"}\n"));
        assert_eq!(a.then, Then::Continue);
        let h = ask(b"HEAD /ping HTTP/1.1\r\n\r\n", Listener::Public, false);
        assert!(h.bytes.ends_with(b"\r\n\r\n"), "{}", String::from_utf8_lossy(&h.bytes));
    }

    #[test]
    fn events_without_a_token_are_refused_and_counted() {
        let a = ask(
            b"POST /events HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            Listener::Public,
            false,
        );
        assert!(a.bytes.starts_with(b"HTTP/1.1 400 "));
        assert_eq!(a.count, Some(Count::EventTokenRejected(TokenError::Malformed)));
        assert!(a.event.is_none());
    }

    #[test]
    fn events_from_outside_events_allow_are_forbidden_and_counted() {
        let config = Config {
            events_allow: vec![Cidr::parse("10.0.0.0/8").unwrap()],
            ..config()
        };
        let raw = b"POST /events HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        let a = ask_with(config, raw, Listener::Public, false);
        assert!(a.bytes.starts_with(b"HTTP/1.1 403 "));
        assert_eq!(a.count, Some(Count::EventForbidden));
        assert!(a.event.is_none());
    }

    #[test]
    fn upgrade_is_decided_here_and_refused_while_draining() {
        let req = b"GET /notification HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n";
        let a = ask(req, Listener::Public, false);
        assert!(a.bytes.starts_with(b"HTTP/1.1 101 "));
        assert_eq!(
            a.then,
            Then::Upgrade {
                forwarded_for: Some("10.0.0.1".into())
            }
        );
        let d = ask(req, Listener::Public, true);
        assert!(d.bytes.starts_with(b"HTTP/1.1 503 "));
        assert_eq!(d.then, Then::Close(CloseReason::Shutdown));
    }

    #[test]
    fn the_metrics_listener_serves_metrics_only() {
        let m = ask(b"GET /metrics HTTP/1.1\r\n\r\n", Listener::Metrics, false);
        assert!(m.bytes.ends_with(b"m 1\n"));
        let p = ask(b"GET /ping HTTP/1.1\r\n\r\n", Listener::Metrics, false);
        assert!(p.bytes.starts_with(b"HTTP/1.1 404 "));
    }

    #[test]
    fn a_websocket_keeps_only_what_its_log_lines_show_of_x_forwarded_for() {
        assert_eq!(&*kept_for_logs("10.0.0.1"), "10.0.0.1");
        let long = "10.0.0.1, ".repeat(800);
        let kept = kept_for_logs(&long);
        assert!(kept.len() < crate::logsafe::MAX_LOGGED_VALUE + 32, "{kept}");
        assert!(kept.ends_with(&format!("[... {} more bytes]", 8000 - crate::logsafe::MAX_LOGGED_VALUE)));
        assert_eq!(&*kept_for_logs("a\nb"), "a\\nb", "escaped once, here");
    }
}
