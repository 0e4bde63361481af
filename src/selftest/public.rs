//! The self-test's checks of the path a client takes: `/notification/ping` and the
//! websocket upgrade through the reverse proxy, that nothing under the public prefix
//! reaches `/events`, an event end to end, and that the websocket stays up.
//!
//! A failure is diagnosed from what came back: 400/426 without an upgrade (the proxy
//! drops the headers), 404 or a web page (no rule, or seahub answered), 502/503/504 (the
//! proxy cannot reach this server), redirects, TLS errors.

use super::client::{self, Answer, ConnectError, RequestError, Stream, Url, WsError};
use super::local::{excerpt, test_event};
use super::report::Check;
use super::{Ctx, ROUND_TRIP_LIMIT};
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket};

const UPGRADE_FIX: &str = "Pass the upgrade headers on: nginx, in `location /notification`: `proxy_http_version 1.1; \
     proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection \"upgrade\";`; Apache: `ProxyPass /notification \
     ws://127.0.0.1:8083/` (mod_proxy_wstunnel); HAProxy 2+ and Caddy pass them by themselves";

/// What an answer that is not the server's own means, as (what was seen, fix).
fn diagnose(ctx: &Ctx, url: &Url, what: &str, a: &Answer) -> (String, String) {
    let target = ctx
        .local
        .map_or_else(|| ctx.loaded.config.listen_address(), |a| a.to_string());
    match a.status {
        502..=504 => (
            format!(
                "{what} answered {} {}: the proxy cannot reach this server",
                a.status,
                reason(a)
            ),
            format!(
                "Point the proxy's /notification rule at this server's address {target} (nginx `proxy_pass http://{target}`, \
                 Caddy `reverse_proxy {target}`), and check that the server runs"
            ),
        ),
        301 | 302 | 303 | 307 | 308 => {
            let location = a.header("location").unwrap_or("?").to_string();
            (
                format!("{what} is redirected ({}) to {location}", a.status),
                format!("Use the URL the clients use (the one in the redirect: {location})"),
            )
        }
        404 => (
            format!(
                "{what} answered 404{}: no /notification rule reaches this server, so seahub or the proxy's default answered",
                if a.is_html() { " with a web page" } else { "" }
            ),
            format!(
                "Add the /notification locations of examples/proxy to the server block (virtual host) that serves {}, \
                 e.g. nginx `location /notification {{ proxy_pass http://{target}; ... }}`",
                url.host
            ),
        ),
        _ if a.is_html() => (
            format!(
                "{what} answered {} with a web page: seahub or another site answered, not this server",
                a.status
            ),
            format!(
                "Add the /notification locations of examples/proxy to the server block (virtual host) that serves {}, \
                 before the seahub location",
                url.host
            ),
        ),
        _ => (
            format!("{what} answered {} {:?}", a.status, excerpt(&a.text())),
            "Compare the proxy's /notification rule with examples/proxy".to_string(),
        ),
    }
}

fn reason(a: &Answer) -> String {
    if a.is_html() {
        "(a web page)".into()
    } else {
        format!("{:?}", excerpt(&a.text()))
    }
}

/// A connection failure, as (what was seen, fix).
fn connect_failure(ctx: &Ctx, url: &Url, what: &str, e: &ConnectError) -> (String, String) {
    match e {
        ConnectError::Tls(why) => (
            format!("{what}: TLS: {why} (trusted: {})", ctx.tls.roots),
            format!(
                "Install a certificate for {} from a CA the clients trust (with its intermediate certificates); \
                 for your own CA run again with --ca-file CA.pem, or with --insecure to check the rest",
                url.host
            ),
        ),
        _ => (
            format!("{what}: {e}"),
            format!(
                "Check the URL, that {} resolves to the proxy, and that the proxy listens on port {}",
                url.host, url.port
            ),
        ),
    }
}

/// `public-ping`: `GET URL/notification/ping` answers 200 with the pong, as the desktop
/// client and SeaDrive probe. Also returns how far the proxy's `Date` is from this
/// box's clock (seconds), for the clock check.
pub(super) fn ping(ctx: &Ctx, url: &Url) -> (Check, Option<i64>) {
    let what = format!("{}/notification/ping", url.base());
    let started = Instant::now();
    let answer = client::request(url, &ctx.tls, "GET", "/notification/ping", &[], b"");
    let a = match answer {
        Ok(a) => a,
        Err(RequestError::Connect(e)) => {
            let (seen, fix) = connect_failure(ctx, url, &what, &e);
            return (Check::fail("public-ping", seen, fix), None);
        }
        Err(e) => {
            return (
                Check::fail("public-ping", format!("{what}: {e}"), "Check the proxy's error log"),
                None,
            );
        }
    };
    // The proxy's clock against this one, read now (the box checks run much later).
    let date = a
        .header("date")
        .and_then(parse_http_date)
        .map(|d| d - super::unix_now());
    let insecure = if ctx.tls.insecure && url.tls {
        " (--insecure: certificate not checked)"
    } else {
        ""
    };
    let check = if a.status == 200 && a.text() == "{\"ret\": \"pong\"}\n" {
        Check::pass(
            "public-ping",
            format!(
                "{what} answered 200 {{\"ret\": \"pong\"}} in {}{insecure}",
                super::millis(started.elapsed())
            ),
        )
    } else {
        let (seen, fix) = diagnose(ctx, url, &what, &a);
        Check::fail("public-ping", seen, fix)
    };
    (check, date)
}

/// `public-websocket`: `URL/notification` upgrades (101).
pub(super) fn upgrade(ctx: &Ctx, url: &Url) -> Check {
    let what = format!("{}/notification", url.base());
    match client::websocket(url, &ctx.tls, "/notification") {
        Ok(mut ws) => {
            let _ = ws.close(None);
            let _ = ws.flush();
            Check::pass("public-websocket", format!("{what} upgraded to a websocket (101)"))
        }
        Err(WsError::Refused(a)) if matches!(a.status, 400 | 426) && !a.is_html() => Check::fail(
            "public-websocket",
            format!(
                "{what} answered {} without upgrading: the proxy does not pass the Upgrade and Connection headers on",
                a.status
            ),
            UPGRADE_FIX,
        ),
        Err(WsError::Refused(a)) => {
            let (seen, fix) = diagnose(ctx, url, &what, &a);
            Check::fail("public-websocket", seen, fix)
        }
        Err(WsError::Connect(e)) => {
            let (seen, fix) = connect_failure(ctx, url, &what, &e);
            Check::fail("public-websocket", seen, fix)
        }
        Err(WsError::Other(e)) => Check::fail("public-websocket", format!("{what}: {e}"), UPGRADE_FIX),
    }
}

/// `public-events`: nothing under the public prefix reaches `/events`. A bodiless POST
/// without a token is sent; only `/events` answers it with its token refusal (or 403).
pub(super) fn events_hidden(ctx: &Ctx, url: &Url) -> Check {
    let mut seen = Vec::new();
    for path in ["/notificationevents", "/notificationevents/", "/notification/events"] {
        let what = format!("{}{path}", url.base());
        match client::request(
            url,
            &ctx.tls,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            b"{}",
        ) {
            Ok(a) if reached_events(&a) => {
                return Check::fail(
                    "public-events",
                    format!(
                        "POST {what} reached this server's /events ({} {:?}): the proxy maps a public path to the \
                         event endpoint (the Seafile 10/11 manual's nginx snippet does), so anyone can try forged events",
                        a.status,
                        excerpt(&a.text())
                    ),
                    "Match the websocket exactly (nginx `location = /notification`, not the prefix `location /notification`; \
                     Caddy `respond /events* 404` inside handle_path) so that no public path maps to /events",
                );
            }
            Ok(a) => seen.push(format!("{path} {}", a.status)),
            Err(e) => seen.push(format!("{path}: {e}")),
        }
    }
    Check::pass(
        "public-events",
        format!("no public path reaches /events ({})", seen.join(", ")),
    )
}

/// Only this server's `/events` answers a token-less POST with these.
fn reached_events(a: &Answer) -> bool {
    (a.status == 400 && a.text() == "Notification token not match\n")
        || (a.status == 403 && a.text().starts_with("events are not accepted"))
}

/// `end-to-end` and `stays-up`: subscribe through `base` (the public URL, or the local
/// address when there is none), post an event for the random library to the local
/// `/events`, time its arrival, then keep the websocket open for `stay`.
pub(super) fn end_to_end(ctx: &Ctx, base: &Url, public: bool, stay: Duration) -> Vec<Check> {
    let path = if public { "/notification" } else { "/" };
    let via = if public {
        "through the proxy"
    } else {
        "directly (no public URL)"
    };
    let what = format!("{}{path}", base.base());
    let fail = |seen: String, fix: &str| vec![Check::fail("end-to-end", seen, fix)];
    let mut ws = match client::websocket(base, &ctx.tls, path) {
        Ok(ws) => ws,
        Err(e) => return fail(format!("{what}: the websocket did not open again: {e}"), UPGRADE_FIX),
    };
    if let Err(e) = subscribe(ctx, &mut ws) {
        return fail(
            format!("{what}: {e}"),
            "Check the server's log at debug level for this library id",
        );
    }
    let Some(local) = ctx.local else {
        return fail("no local address to post to".into(), "Set host and port");
    };
    let started = Instant::now();
    let posted = super::event_token(ctx.key(), 300).and_then(|token| {
        let auth = format!("Token {token}");
        client::request(
            &Url::local(local),
            &ctx.tls,
            "POST",
            "/events",
            &[("Authorization", &auth), ("Content-Type", "application/json")],
            test_event(&ctx.repo).as_bytes(),
        )
        .map_err(|e| e.to_string())
    });
    match posted {
        Ok(a) if a.status == 200 => {}
        Ok(a) => {
            return fail(
                format!("posting the test event: {} {:?}", a.status, excerpt(&a.text())),
                "See local-events",
            );
        }
        Err(e) => return fail(format!("posting the test event: {e}"), "See local-events"),
    }
    let mut pings = 0;
    let received = receive_event(&mut ws, &ctx.repo, ROUND_TRIP_LIMIT, &mut pings);
    let mut checks = Vec::new();
    match received {
        Ok(()) => checks.push(Check::pass(
            "end-to-end",
            format!(
                "subscribed at {what} with a client token for a random library, posted an event to {local}/events, \
                 received it {via} in {}",
                super::millis(started.elapsed())
            ),
        )),
        Err(e) => {
            checks.push(Check::fail(
                "end-to-end",
                format!("the event posted to {local}/events did not arrive {via} within {ROUND_TRIP_LIMIT:?}: {e}"),
                "Turn off response buffering for /notification (nginx `proxy_buffering off;`) and check that nothing \
                 between the client and the server holds frames back",
            ));
            return checks;
        }
    }
    checks.push(stays_up(&mut ws, &what, via, stay, pings));
    let _ = ws.close(None);
    let _ = ws.flush();
    checks
}

/// Subscribes to the run's library with a valid client token, and waits until the
/// server has handled it: a second entry with a bad token is answered `jwt-expired`, in
/// order.
pub(super) fn subscribe(ctx: &Ctx, ws: &mut WebSocket<Stream>) -> Result<(), String> {
    let token = super::client_token(ctx.key(), &ctx.repo, "notification-server-self-test")?;
    let probe = format!("{}-probe", ctx.repo);
    let msg = serde_json::json!({"type": "subscribe", "content": {"repos": [
        {"id": ctx.repo, "jwt_token": token},
        {"id": probe, "jwt_token": "not-a-token"},
    ]}});
    ws.send(Message::text(msg.to_string()))
        .map_err(|e| format!("subscribing: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let _ = ws.get_mut().tcp().set_read_timeout(Some(Duration::from_millis(200)));
    while Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let (kind, id) = super::message_repo(&t).unwrap_or_default();
                if kind == "jwt-expired" && id == ctx.repo.as_str() {
                    return Err("the server refused a client token signed with this key (jwt-expired)".into());
                }
                if kind == "jwt-expired" && id == probe.as_str() {
                    return Ok(());
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {}
            Err(e) => return Err(format!("the websocket ended while subscribing: {e}")),
        }
    }
    Err("no answer to the subscription within 5 s".into())
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

/// Reads until the event for `repo` arrives, answering pings, for at most `limit`.
pub(super) fn receive_event(
    ws: &mut WebSocket<Stream>,
    repo: &str,
    limit: Duration,
    pings: &mut usize,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    let _ = ws.get_mut().tcp().set_read_timeout(Some(Duration::from_millis(20)));
    while Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let (kind, id) = super::message_repo(&t).unwrap_or_default();
                if kind == "repo-update" && id == repo {
                    return Ok(());
                }
            }
            Ok(Message::Ping(_)) => *pings += 1,
            Ok(Message::Close(f)) => return Err(format!("the websocket was closed ({f:?})")),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {}
            Err(e) => return Err(format!("the websocket ended: {e}")),
        }
        let _ = ws.flush();
    }
    Err("nothing arrived".into())
}

/// `stays-up`: the websocket stays open for `stay`, answering the server's pings.
fn stays_up(ws: &mut WebSocket<Stream>, what: &str, via: &str, stay: Duration, mut pings: usize) -> Check {
    let started = Instant::now();
    let _ = ws.get_mut().tcp().set_read_timeout(Some(Duration::from_millis(100)));
    while started.elapsed() < stay {
        let ended = match ws.read() {
            Ok(Message::Ping(_)) => {
                pings += 1;
                None
            }
            Ok(Message::Close(f)) => Some(format!("a close frame {f:?}")),
            Ok(_) => None,
            Err(tungstenite::Error::Io(e)) if is_timeout(&e) => None,
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = ended {
            return Check::fail(
                "stays-up",
                format!(
                    "the websocket at {what} was closed {via} after {:.1} s ({why}), having seen {pings} server pings",
                    started.elapsed().as_secs_f64()
                ),
                "Raise the proxy's idle timeout for /notification (nginx `proxy_read_timeout 60s` or more, HAProxy \
                 `timeout tunnel`, Apache `ProxyTimeout`) and turn response buffering off",
            );
        }
        let _ = ws.flush();
    }
    Check::pass(
        "stays-up",
        format!(
            "the websocket stayed open {via} for {} s, {pings} server pings answered",
            stay.as_secs()
        ),
    )
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) into Unix seconds.
pub(super) fn parse_http_date(text: &str) -> Option<i64> {
    let mut parts = text.split_whitespace().skip(1);
    let day: i64 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':').map(|p| p.parse::<i64>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(parse_http_date("Tue, 29 Feb 2028 12:00:00 GMT"), Some(1_835_438_400));
        assert_eq!(parse_http_date("garbage"), None);
    }

    #[test]
    fn only_the_event_endpoint_counts_as_reached() {
        let a = |status, body: &str| Answer {
            status,
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
        };
        assert!(reached_events(&a(400, "Notification token not match\n")));
        assert!(reached_events(&a(403, "events are not accepted from this address\n")));
        assert!(!reached_events(&a(404, "404 page not found\n")));
        assert!(!reached_events(&a(400, "Bad Request\n")));
    }
}
