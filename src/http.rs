//! Pure HTTP/1.1: request heads parsed with caps, routing, and response bytes
//! (PROTOCOL.md sections 3 and 11.1).
//!
//! Only what the notification server needs: Content-Length bodies (senders never chunk),
//! keep-alive for pooled senders, `Expect: 100-continue`, and the websocket upgrade headers.
//! No I/O happens here; `conn::HttpConn` feeds bytes in and writes the bytes that come out.

/// Most header lines accepted in one request; more is answered like an oversized head.
pub const MAX_HEADERS: usize = 64;

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Route {
    /// `/ping` and the proxy spellings of it: 200 `{"ret": "pong"}`.
    Ping,
    /// `/events`: event ingest.
    Events,
    /// `/`, `/notification`, `/notification/`: the websocket upgrade.
    Upgrade,
    /// Everything else: 404.
    #[default]
    NotFound,
}

/// Maps a request target (query string ignored) to its route.
pub fn route(target: &str) -> Route {
    let path = target.split('?').next().unwrap_or("");
    match path {
        // `//` is what `/notification/` becomes behind the manual's prefix-stripping
        // nginx and Apache configurations.
        "/" | "//" | "/notification" | "/notification/" => Route::Upgrade,
        "/ping" | "/ping/" | "//ping" | "/notification/ping" | "/notification/ping/" => Route::Ping,
        "/events" | "/events/" => Route::Events,
        _ => Route::NotFound,
    }
}

/// A complete, valid request head, with the few headers the server uses copied out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Head {
    /// Bytes of the head including the blank line; the body starts here.
    pub len: usize,
    pub method: String,
    pub route: Route,
    /// The path is `/metrics` (served only on the metrics listener).
    pub metrics_path: bool,
    /// Content-Length, 0 when absent.
    pub content_length: usize,
    /// Whether the connection stays open after this request.
    pub keep_alive: bool,
    /// `Expect: 100-continue` was sent.
    pub expect_continue: bool,
    pub authorization: Option<String>,
    pub seafile_repo_token: Option<String>,
    pub x_forwarded_for: Option<String>,
    /// `Connection` lists `upgrade`.
    pub connection_upgrade: bool,
    /// `Upgrade` lists `websocket`.
    pub upgrade_websocket: bool,
    pub ws_version: Option<String>,
    pub ws_key: Option<String>,
}

/// Why a request is refused before it is routed; the connection closes after the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// 400: not HTTP/1.x, bad syntax, conflicting or bad Content-Length.
    Malformed,
    /// 431: the head is over `max_head_bytes` or has too many header lines.
    HeadTooLarge,
    /// 413: the declared body is over `max_body_bytes`.
    BodyTooLarge,
    /// 501: a Transfer-Encoding body (no Seafile sender uses one).
    Chunked,
}

impl Reject {
    /// The complete response; always closes the connection.
    pub fn response(self) -> Vec<u8> {
        match self {
            Reject::Malformed => plain(400, "Bad Request", "400 Bad Request\n", false, false),
            Reject::HeadTooLarge => plain(
                431,
                "Request Header Fields Too Large",
                "request head too large\n",
                false,
                false,
            ),
            Reject::BodyTooLarge => plain(413, "Content Too Large", "request body too large\n", false, false),
            Reject::Chunked => plain(
                501,
                "Not Implemented",
                "Transfer-Encoding is not supported; send a Content-Length body\n",
                false,
                false,
            ),
        }
    }

    /// A short reason for logs.
    pub fn label(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed request",
            Reject::HeadTooLarge => "request head too large",
            Reject::BodyTooLarge => "request body too large",
            Reject::Chunked => "chunked request body",
        }
    }
}

/// Parses the request head at the start of `buf`. `Ok(None)` means more bytes are needed
/// (and `buf` is still under `max_head`).
pub fn parse_head(buf: &[u8], max_head: usize, max_body: usize) -> Result<Option<Head>, Reject> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    // Only the first `max_head` bytes are looked at, so the verdict never depends on how
    // TCP split the stream (found by fuzzing: a malformed byte past the cap gave 400 when
    // it arrived in the same read and 431 when it came later).
    let window = buf.get(..max_head).unwrap_or(buf);
    let len = match req.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max_head => return Err(Reject::HeadTooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Reject::HeadTooLarge),
        Err(_) => return Err(Reject::Malformed),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(Reject::Malformed);
    };
    let mut head = Head {
        len,
        method: method.to_string(),
        route: route(target),
        metrics_path: target.split('?').next() == Some("/metrics"),
        keep_alive: version == 1,
        ..Head::default()
    };
    let mut content_length: Option<usize> = None;
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).map_err(|_| Reject::Malformed)?.trim();
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            // 1*DIGIT: no sign, no spaces (a sign one proxy accepts and another refuses
            // is a request-smuggling vector).
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Reject::Malformed);
            }
            let n: usize = value.parse().map_err(|_| Reject::Malformed)?;
            if content_length.is_some_and(|old| old != n) {
                return Err(Reject::Malformed);
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Reject::Chunked);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                connection_close |= token.eq_ignore_ascii_case("close");
                connection_keep_alive |= token.eq_ignore_ascii_case("keep-alive");
                head.connection_upgrade |= token.eq_ignore_ascii_case("upgrade");
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            head.upgrade_websocket |= value.split(',').any(|t| t.trim().eq_ignore_ascii_case("websocket"));
        } else if name.eq_ignore_ascii_case("expect") {
            head.expect_continue = value.eq_ignore_ascii_case("100-continue");
        } else if name.eq_ignore_ascii_case("authorization") {
            head.authorization = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("seafile-repo-token") {
            head.seafile_repo_token = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            head.x_forwarded_for = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            head.ws_version = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            head.ws_key = Some(value.to_string());
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > max_body {
        return Err(Reject::BodyTooLarge);
    }
    head.content_length = content_length;
    head.keep_alive = if version == 1 {
        !connection_close
    } else {
        connection_keep_alive && !connection_close
    };
    Ok(Some(head))
}

/// Bytes sent when the client asked for `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The `/ping` answer; the body is the official server's, space and newline included.
pub fn pong(keep_alive: bool, head_only: bool) -> Vec<u8> {
    let mut r = plain(200, "OK", "{\"ret\": \"pong\"}\n", keep_alive, head_only);
    // The official ping response has no nosniff header; keep the bytes the same.
    if let Some(pos) = find(&r, b"X-Content-Type-Options: nosniff\r\n") {
        r.drain(pos..pos + "X-Content-Type-Options: nosniff\r\n".len());
    }
    r
}

/// 200 with an empty body: an accepted (or ignored) event.
pub fn ok_empty(keep_alive: bool) -> Vec<u8> {
    let mut r = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n".to_vec();
    if !keep_alive {
        r.extend_from_slice(b"Connection: close\r\n");
    }
    r.extend_from_slice(b"\r\n");
    r
}

/// 400 for a missing or bad event token, with the official body.
pub fn token_mismatch(keep_alive: bool) -> Vec<u8> {
    plain(400, "Bad Request", "Notification token not match\n", keep_alive, false)
}

/// 500 for an event body that is not a JSON object, with the official (empty) message.
pub fn bad_event_body(keep_alive: bool) -> Vec<u8> {
    plain(500, "Internal Server Error", "\n", keep_alive, false)
}

/// 404 with Go's body.
pub fn not_found(keep_alive: bool, head_only: bool) -> Vec<u8> {
    plain(404, "Not Found", "404 page not found\n", keep_alive, head_only)
}

/// The Prometheus scrape answer.
pub fn metrics(text: &str, keep_alive: bool) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\n",
        text.len()
    );
    if !keep_alive {
        r.push_str("Connection: close\r\n");
    }
    r.push_str("\r\n");
    r.push_str(text);
    r.into_bytes()
}

/// 503 when the server is draining for shutdown.
pub fn unavailable() -> Vec<u8> {
    plain(503, "Service Unavailable", "server is shutting down\n", false, false)
}

/// A `text/plain` response in the form Go's `http.Error` writes.
pub fn plain(status: u16, reason: &str, body: &str, keep_alive: bool, head_only: bool) -> Vec<u8> {
    plain_with(status, reason, &[], body, keep_alive, head_only)
}

/// Like [`plain`], with extra header lines (`"Name: value"`).
pub fn plain_with(status: u16, reason: &str, extra: &[&str], body: &str, keep_alive: bool, head_only: bool) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\n",
        body.len()
    );
    for line in extra {
        r.push_str(line);
        r.push_str("\r\n");
    }
    if !keep_alive {
        r.push_str("Connection: close\r\n");
    }
    r.push_str("\r\n");
    if !head_only {
        r.push_str(body);
    }
    r.into_bytes()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<Head>, Reject> {
        parse_head(s.as_bytes(), 1024, 100)
    }

    #[test]
    fn routes() {
        for p in ["/", "//", "/notification", "/notification/", "/?x=1"] {
            assert_eq!(route(p), Route::Upgrade, "{p}");
        }
        for p in [
            "/ping",
            "/ping/",
            "//ping",
            "/notification/ping",
            "/notification/ping/",
            "/ping?a",
        ] {
            assert_eq!(route(p), Route::Ping, "{p}");
        }
        for p in ["/events", "/events/"] {
            assert_eq!(route(p), Route::Events, "{p}");
        }
        for p in [
            "/notification/events",
            "//events",
            "/x",
            "/pingx",
            "",
            "/notification//",
        ] {
            assert_eq!(route(p), Route::NotFound, "{p}");
        }
    }

    #[test]
    fn a_sender_request() {
        let h = parse("POST /events HTTP/1.1\r\nHost: x\r\nUser-Agent: Seafile Server\r\nAuthorization: Token abc\r\nContent-Length: 12\r\nExpect: 100-continue\r\n\r\n{")
            .unwrap()
            .unwrap();
        assert_eq!(h.route, Route::Events);
        assert_eq!(h.content_length, 12);
        assert!(h.keep_alive && h.expect_continue);
        assert_eq!(h.authorization.as_deref(), Some("Token abc"));
        assert_eq!(h.len, 130);
    }

    #[test]
    fn keep_alive_rules() {
        let h = |s: &str| parse(s).unwrap().unwrap().keep_alive;
        assert!(h("GET /ping HTTP/1.1\r\n\r\n"));
        assert!(!h("GET /ping HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!h("GET /ping HTTP/1.0\r\n\r\n"));
        assert!(h("GET /ping HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
    }

    #[test]
    fn partial_and_limits() {
        assert_eq!(parse("GET /ping HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        let big = format!("GET /ping HTTP/1.1\r\nX: {}\r\n", "a".repeat(2000));
        assert_eq!(parse(&big), Err(Reject::HeadTooLarge));
        let big = format!("GET /ping HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(2000));
        assert_eq!(parse(&big), Err(Reject::HeadTooLarge));
        let many: String = (0..MAX_HEADERS + 1).map(|i| format!("H{i}: v\r\n")).collect();
        assert_eq!(
            parse(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            Err(Reject::HeadTooLarge)
        );
        assert_eq!(
            parse("POST /events HTTP/1.1\r\nContent-Length: 101\r\n\r\n"),
            Err(Reject::BodyTooLarge)
        );
        assert_eq!(
            parse("POST /events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(Reject::Chunked)
        );
    }

    #[test]
    fn malformed() {
        for s in [
            "GARBAGE\r\n\r\n",
            "GET /ping HTTP/2.0\r\n\r\n",
            "POST /events HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            "POST /events HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST /events HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST /events HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
        ] {
            assert_eq!(parse_head(s.as_bytes(), 1024, 100), Err(Reject::Malformed), "{s:?}");
        }
        assert_eq!(
            parse_head(b"GET /ping HTTP/1.1\r\nX: \xff\r\n\r\n", 1024, 100),
            Err(Reject::Malformed)
        );
    }

    #[test]
    fn responses() {
        let p = String::from_utf8(pong(true, false)).unwrap();
        assert_eq!(
            p,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 16\r\n\r\n{\"ret\": \"pong\"}\n"
        );
        let p = String::from_utf8(pong(false, true)).unwrap();
        assert!(p.ends_with("Content-Length: 16\r\nConnection: close\r\n\r\n"), "{p}");
        let n = String::from_utf8(not_found(true, false)).unwrap();
        assert!(n.starts_with("HTTP/1.1 404 Not Found\r\n") && n.ends_with("\r\n\r\n404 page not found\n"));
        assert_eq!(ok_empty(true), b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        let t = String::from_utf8(token_mismatch(true)).unwrap();
        assert!(t.contains("X-Content-Type-Options: nosniff\r\n") && t.ends_with("Notification token not match\n"));
    }
}
