//! The HTTP surface against the real binary (PROTOCOL.md sections 3 and 11.1): `/ping`,
//! 404s, `/events` tokens and bodies, keep-alive and pipelining, `Expect: 100-continue`,
//! limits, slow clients, and the websocket upgrade answers.

mod common;

use common::*;
use jsonwebtoken::Algorithm;
use serde_json::json;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const PONG: &[u8] = b"{\"ret\": \"pong\"}\n";
const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
const TOKEN_REFUSED: &[u8] = b"Notification token not match\n";

// ---- helpers ----

/// A `/events` style request with the given extra header lines (each ending in CRLF).
fn raw_request(method: &str, path: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: Seafile Server\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn post_with(server: &Server, headers: &str, body: &str) -> Response {
    request(server.addr, &raw_request("POST", "/events", headers, body))
}

fn auth(token: &str) -> String {
    format!("Authorization: Token {token}\r\n")
}

fn assert_pong(r: &Response, what: &str) {
    assert_eq!(r.status, 200, "{what}: {r:?}");
    assert_eq!(r.body, PONG, "{what}: {r:?}");
    assert_eq!(r.header("content-type").as_deref(), Some(TEXT_PLAIN), "{what}: {r:?}");
    assert_eq!(r.header("content-length").as_deref(), Some("16"), "{what}: {r:?}");
}

fn assert_accepted(r: &Response, what: &str) {
    assert_eq!(r.status, 200, "{what}: {r:?}");
    assert_eq!(r.header("content-length").as_deref(), Some("0"), "{what}: {r:?}");
    assert!(r.body.is_empty(), "{what}: {r:?}");
    assert_eq!(
        r.header("content-type"),
        None,
        "{what}: an accepted event has no Content-Type: {r:?}"
    );
}

fn assert_token_refused(r: &Response, what: &str) {
    assert_eq!(r.status, 400, "{what}: {r:?}");
    assert_eq!(r.body, TOKEN_REFUSED, "{what}: {r:?}");
    assert_eq!(r.header("content-type").as_deref(), Some(TEXT_PLAIN), "{what}: {r:?}");
    assert_eq!(
        r.header("x-content-type-options").as_deref(),
        Some("nosniff"),
        "{what}: {r:?}"
    );
}

fn assert_bad_body(r: &Response, what: &str) {
    assert_eq!(r.status, 500, "{what}: {r:?}");
    assert_eq!(r.body, b"\n", "{what}: {r:?}");
}

/// Asserts that the next thing on the socket is the server's EOF (or a reset): no more
/// bytes, and not a timeout.
fn assert_eof(s: &mut TcpStream, what: &str) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{what}: expected EOF, got {:?}", String::from_utf8_lossy(&buf[..n])),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: expected EOF, got {e}"),
    }
}

/// Minimal base64url without padding, for hand-made tokens.
fn b64url(input: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A subscriber to `repo` that must see every event posted for it afterwards.
fn subscriber(server: &Server, repo: &str) -> Ws {
    let mut ws = server.ws();
    ws.subscribe(repo, "alice@example.com");
    ws
}

/// The server still answers /ping and still delivers a fresh event to `ws`.
fn assert_still_serving(server: &Server, ws: &mut Ws, repo: &str, marker: &str) {
    server.assert_alive();
    server.post(&repo_update(repo, marker));
    let m = ws
        .recv()
        .unwrap_or_else(|| panic!("after {marker}: the subscriber got nothing"));
    assert_eq!(m["content"]["commit_id"], marker, "after {marker}: {m}");
}

// ---- /ping and 404 ----

#[test]
fn ping_on_every_spelling_and_method() {
    let server = Server::start("");
    for path in [
        "/ping",
        "/ping/",
        "//ping",
        "/notification/ping",
        "/notification/ping/",
        "/ping?x=1",
    ] {
        for method in ["GET", "POST", "PUT"] {
            let r = request(
                server.addr,
                format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").as_bytes(),
            );
            assert_pong(&r, &format!("{method} {path}"));
            assert_eq!(
                r.header("x-content-type-options"),
                None,
                "the official ping has no nosniff: {r:?}"
            );
        }
    }
}

#[test]
fn head_ping_sends_headers_only_and_the_connection_stays_in_sync() {
    let server = Server::start("");
    for path in ["/ping", "/ping/", "//ping", "/notification/ping", "/notification/ping/"] {
        // HEAD then GET, written in one go; if the HEAD answer carried a body, the second
        // "head" read here would start with `{"ret"`.
        let mut s = connect(server.addr);
        s.write_all(format!("HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\nGET /ping HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        let first = String::from_utf8(read_head_raw(&mut s).expect("HEAD answer")).unwrap();
        assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "HEAD {path}: {first:?}");
        assert!(first.contains("\r\nContent-Length: 16\r\n"), "HEAD {path}: {first:?}");
        assert!(
            first
                .to_ascii_lowercase()
                .contains("\r\ncontent-type: text/plain; charset=utf-8\r\n"),
            "HEAD {path}: {first:?}"
        );
        let second = read_head_raw(&mut s).expect("GET answer after HEAD");
        assert!(
            second.starts_with(b"HTTP/1.1 200 OK\r\n"),
            "HEAD {path} sent body bytes: {:?}",
            String::from_utf8_lossy(&second)
        );
        let mut body = [0u8; 16];
        s.read_exact(&mut body).unwrap();
        assert_eq!(&body, PONG);
    }
    // With Connection: close, the HEAD answer is followed by EOF and nothing else.
    let mut s = connect(server.addr);
    s.write_all(b"HEAD /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let head = read_head_raw(&mut s).expect("HEAD answer");
    assert!(head.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert_eof(&mut s, "HEAD with Connection: close");
}

#[test]
fn unknown_paths_are_404() {
    let server = Server::start("");
    let token = event_token();
    for path in [
        "/x",
        "/notification/events",
        "//events",
        "/pingx",
        "/events/x",
        "/notification/x",
        "/ping/x",
    ] {
        for method in ["GET", "POST"] {
            let body = repo_update("r", "c").to_string();
            let r = request(server.addr, &raw_request(method, path, &auth(&token), &body));
            assert_eq!(r.status, 404, "{method} {path}: {r:?}");
            assert_eq!(r.body, b"404 page not found\n", "{method} {path}");
            assert_eq!(r.header("content-type").as_deref(), Some(TEXT_PLAIN), "{method} {path}");
        }
    }
}

// ---- /events ----

#[test]
fn events_accepted_token_forms_are_delivered() {
    let server = Server::start("");
    let mut ws = subscriber(&server, "r");
    let now = unix_now();
    let exp_only = sign(&json!({"exp": now + 300}));
    let fileserver_12 = sign(&json!({"exp": now + 300, "repo_id": "r", "username": ""}));
    let fileserver_11 = sign(&json!({"Exp": now + 72 * 3600, "repo_id": "r", "username": ""}));
    let hs384 = sign_with(Algorithm::HS384, &json!({"exp": now + 300}), KEY.as_bytes());
    let hs512 = sign_with(Algorithm::HS512, &json!({"exp": now + 300}), KEY.as_bytes());
    let cases: Vec<(&str, String, String)> = vec![
        ("POST", "/events".into(), format!("Authorization: Token {exp_only}\r\n")),
        (
            "POST",
            "/events".into(),
            format!("Authorization: Bearer {exp_only}\r\n"),
        ),
        ("POST", "/events".into(), format!("Authorization: token {exp_only}\r\n")),
        (
            "POST",
            "/events".into(),
            format!("Authorization: Token {fileserver_12}\r\n"),
        ),
        ("POST", "/events".into(), format!("Seafile-Repo-Token: {exp_only}\r\n")),
        (
            "POST",
            "/events".into(),
            format!("Seafile-Repo-Token: {fileserver_11}\r\n"),
        ),
        ("POST", "/events".into(), format!("Authorization: Token {hs384}\r\n")),
        ("POST", "/events".into(), format!("Authorization: Token {hs512}\r\n")),
        (
            "POST",
            "/events/".into(),
            format!("Authorization: Token {exp_only}\r\n"),
        ),
        ("GET", "/events".into(), format!("Authorization: Token {exp_only}\r\n")),
        ("PUT", "/events".into(), format!("Authorization: Token {exp_only}\r\n")),
    ];
    for (i, (method, path, headers)) in cases.iter().enumerate() {
        let what = format!("case {i}: {method} {path} {}", headers.trim_end());
        let body = repo_update("r", &format!("c{i}")).to_string();
        let r = request(server.addr, &raw_request(method, path, headers, &body));
        assert_accepted(&r, &what);
        let m = ws.recv().unwrap_or_else(|| panic!("{what}: not delivered"));
        assert_eq!(m["content"]["commit_id"], format!("c{i}"), "{what}");
    }
}

#[test]
fn events_token_refusals() {
    let server = Server::start("");
    let mut ws = subscriber(&server, "r");
    let now = unix_now();
    let good = sign(&json!({"exp": now + 300}));
    let none_token = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(format!(r#"{{"exp":{}}}"#, now + 300).as_bytes())
    );
    let cases: Vec<(&str, String)> = vec![
        ("no header", String::new()),
        ("empty Authorization", "Authorization: \r\n".into()),
        ("scheme word only", "Authorization: Token\r\n".into()),
        ("jwt without a scheme word", format!("Authorization: {good}\r\n")),
        (
            "two spaces after the scheme",
            format!("Authorization: Token  {good}\r\n"),
        ),
        (
            "wrong key",
            auth(&sign_with(Algorithm::HS256, &json!({"exp": now + 300}), b"another key")),
        ),
        (
            "key cut at the #",
            auth(&sign_with(Algorithm::HS256, &json!({"exp": now + 300}), b"test-key")),
        ),
        ("expired", auth(&sign(&json!({"exp": now - 10})))),
        ("exp equal to now", auth(&sign(&json!({"exp": now})))),
        ("missing exp", auth(&sign(&json!({"repo_id": "r", "username": ""})))),
        ("float exp", auth(&sign(&json!({"exp": (now + 300) as f64 + 0.5})))),
        ("integral float exp", auth(&sign(&json!({"exp": (now + 300) as f64})))),
        ("exponent exp 1.9e9", auth(&sign(&json!({"exp": 1.9e9})))),
        ("string exp", auth(&sign(&json!({"exp": (now + 300).to_string()})))),
        ("future nbf", auth(&sign(&json!({"exp": now + 300, "nbf": now + 120})))),
        ("alg none", auth(&none_token)),
        ("garbage token", auth("not.a.jwt")),
        (
            "client token (forged event)",
            auth(&client_token("r", "alice@example.com", now + 3600)),
        ),
        (
            "client token in Seafile-Repo-Token",
            format!("Seafile-Repo-Token: {}\r\n", client_token("r", "bob", now + 3600)),
        ),
        (
            "expired Seafile-Repo-Token",
            format!(
                "Seafile-Repo-Token: {}\r\n",
                sign(&json!({"Exp": now - 1, "repo_id": "r", "username": ""}))
            ),
        ),
    ];
    for (what, headers) in &cases {
        let body = repo_update("r", what).to_string();
        let r = post_with(&server, headers, &body);
        assert_token_refused(&r, what);
    }
    // None of the refused events reached the subscriber.
    ws.sync();
    // A past nbf is fine.
    let r = post_with(
        &server,
        &auth(&sign(&json!({"exp": now + 300, "nbf": now - 5}))),
        &repo_update("r", "nbf-past").to_string(),
    );
    assert_accepted(&r, "past nbf");
    assert_eq!(ws.recv().unwrap()["content"]["commit_id"], "nbf-past");
}

#[test]
fn events_body_errors_are_500_and_ignored_bodies_200() {
    let server = Server::start("");
    let mut ws = subscriber(&server, "r");
    let headers = auth(&event_token());
    for (what, body) in [
        ("bad JSON", "{not json"),
        ("empty body", ""),
        ("array", "[]"),
        (
            "array of an event",
            r#"[{"type":"repo-update","content":{"repo_id":"r"}}]"#,
        ),
        (
            "trailing garbage",
            r#"{"type":"repo-update","content":{"repo_id":"r","commit_id":"x"}} x"#,
        ),
        ("two objects", r#"{"type":"repo-update","content":{"repo_id":"r"}}{}"#),
        ("string", r#""repo-update""#),
    ] {
        assert_bad_body(&post_with(&server, &headers, body), what);
    }
    for (what, body) in [
        ("unknown type", r#"{"type":"something-else","content":{"repo_id":"r"}}"#),
        ("content missing", r#"{"type":"repo-update"}"#),
        ("content a string", r#"{"type":"repo-update","content":"r"}"#),
        ("content null", r#"{"type":"repo-update","content":null}"#),
        ("repo_id a number", r#"{"type":"repo-update","content":{"repo_id":5}}"#),
        (
            "repo_id missing",
            r#"{"type":"repo-update","content":{"commit_id":"c"}}"#,
        ),
        (
            "folder-perm user not a string",
            r#"{"type":"folder-perm-changed","content":{"repo_id":"r","path":"/","type":"user","change_event":"add","user":5,"group":-1,"perm":"r"}}"#,
        ),
        ("empty object", "{}"),
    ] {
        assert_accepted(&post_with(&server, &headers, body), what);
    }
    // Nothing of the above reached the subscriber; a good event still does.
    ws.sync();
    assert_still_serving(&server, &mut ws, "r", "after-bad-bodies");
}

// ---- keep-alive, pipelining, Connection: close, HTTP/1.0 ----

#[test]
fn several_requests_on_one_keep_alive_connection() {
    let server = Server::start("");
    let mut ws = subscriber(&server, "r");
    let mut s = connect(server.addr);
    let token = event_token();
    for i in 0..5 {
        s.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_pong(&read_response(&mut s, false).expect("ping answer"), "keep-alive ping");
        s.write_all(&raw_request(
            "POST",
            "/events",
            &auth(&token),
            &repo_update("r", &format!("k{i}")).to_string(),
        ))
        .unwrap();
        assert_accepted(&read_response(&mut s, false).expect("event answer"), "keep-alive event");
        s.write_all(&raw_request("POST", "/events", "", "{}")).unwrap();
        assert_token_refused(&read_response(&mut s, false).expect("refusal"), "keep-alive refusal");
        s.write_all(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut s, false).expect("404").status, 404);
        s.write_all(&raw_request("POST", "/events", &auth(&token), "[]"))
            .unwrap();
        assert_bad_body(&read_response(&mut s, false).expect("500"), "keep-alive 500");
        assert_eq!(ws.recv().unwrap()["content"]["commit_id"], format!("k{i}"));
    }
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = Server::start("");
    let mut ws = subscriber(&server, "r");
    let token = event_token();
    let mut all = Vec::new();
    all.extend_from_slice(&raw_request(
        "POST",
        "/events",
        &auth(&token),
        &repo_update("r", "p1").to_string(),
    ));
    all.extend_from_slice(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n");
    all.extend_from_slice(&raw_request("POST", "/events", "", "{}"));
    all.extend_from_slice(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n");
    all.extend_from_slice(&raw_request(
        "POST",
        "/events",
        &auth(&token),
        &repo_update("r", "p2").to_string(),
    ));
    all.extend_from_slice(b"HEAD /ping HTTP/1.1\r\nHost: x\r\n\r\n");
    all.extend_from_slice(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut s = connect(server.addr);
    s.write_all(&all).unwrap();
    assert_accepted(&read_response(&mut s, false).expect("1"), "pipelined event 1");
    assert_pong(&read_response(&mut s, false).expect("2"), "pipelined ping");
    assert_token_refused(&read_response(&mut s, false).expect("3"), "pipelined refusal");
    assert_eq!(read_response(&mut s, false).expect("4").status, 404);
    assert_accepted(&read_response(&mut s, false).expect("5"), "pipelined event 2");
    let head = read_response(&mut s, true).expect("6");
    assert_eq!(
        (head.status, head.header("content-length").as_deref()),
        (200, Some("16"))
    );
    assert_pong(&read_response(&mut s, false).expect("7"), "pipelined last ping");
    assert_eof(&mut s, "pipeline ending in Connection: close");
    assert_eq!(ws.recv().unwrap()["content"]["commit_id"], "p1");
    assert_eq!(ws.recv().unwrap()["content"]["commit_id"], "p2");
}

#[test]
fn two_requests_in_one_write_each_a_post() {
    let server = Server::start("");
    let mut ws = subscriber(&server, "r");
    let token = event_token();
    let mut both = raw_request("POST", "/events", &auth(&token), &repo_update("r", "a").to_string());
    both.extend_from_slice(&raw_request(
        "POST",
        "/events",
        &auth(&token),
        &repo_update("r", "b").to_string(),
    ));
    let mut s = connect(server.addr);
    s.write_all(&both).unwrap();
    assert_accepted(&read_response(&mut s, false).expect("first"), "first of two");
    assert_accepted(&read_response(&mut s, false).expect("second"), "second of two");
    assert_eq!(ws.recv().unwrap()["content"]["commit_id"], "a");
    assert_eq!(ws.recv().unwrap()["content"]["commit_id"], "b");
}

#[test]
fn connection_close_gets_the_answer_then_eof() {
    let server = Server::start("");
    let mut s = connect(server.addr);
    s.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let r = read_response(&mut s, false).expect("answer");
    assert_pong(&r, "Connection: close");
    assert_eof(&mut s, "after Connection: close");

    let mut s = connect(server.addr);
    s.write_all(&raw_request(
        "POST",
        "/events",
        &format!("Connection: close\r\n{}", auth(&event_token())),
        &repo_update("r", "c").to_string(),
    ))
    .unwrap();
    assert_accepted(
        &read_response(&mut s, false).expect("answer"),
        "event with Connection: close",
    );
    assert_eof(&mut s, "event with Connection: close");
}

#[test]
fn http_1_0_closes_unless_keep_alive_is_asked() {
    let server = Server::start("");
    let mut s = connect(server.addr);
    s.write_all(b"GET /ping HTTP/1.0\r\n\r\n").unwrap();
    assert_pong(&read_response(&mut s, false).expect("1.0 answer"), "HTTP/1.0");
    assert_eof(&mut s, "HTTP/1.0 without keep-alive");

    let mut s = connect(server.addr);
    s.write_all(b"GET /ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .unwrap();
    assert_pong(
        &read_response(&mut s, false).expect("1.0 keep-alive answer"),
        "HTTP/1.0 keep-alive",
    );
    s.write_all(b"GET /ping HTTP/1.0\r\n\r\n").unwrap();
    assert_pong(
        &read_response(&mut s, false).expect("second 1.0 answer"),
        "HTTP/1.0 second",
    );
    assert_eof(&mut s, "HTTP/1.0 second without keep-alive");
}

// ---- Expect: 100-continue ----

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    let server = Server::start("");
    let mut ws = subscriber(&server, "r");
    let mut s = connect(server.addr);
    for i in 0..2 {
        let body = repo_update("r", &format!("e{i}")).to_string();
        let head = format!(
            "POST /events HTTP/1.1\r\nHost: x\r\nAuthorization: Token {}\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            event_token(),
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        let cont = read_head_raw(&mut s).expect("100 Continue before the body");
        assert_eq!(
            cont,
            b"HTTP/1.1 100 Continue\r\n\r\n",
            "{:?}",
            String::from_utf8_lossy(&cont)
        );
        s.write_all(body.as_bytes()).unwrap();
        assert_accepted(
            &read_response(&mut s, false).expect("final answer"),
            "after 100-continue",
        );
        assert_eq!(ws.recv().unwrap()["content"]["commit_id"], format!("e{i}"));
    }
}

#[test]
fn expect_100_continue_with_a_bad_token_is_refused_before_the_body() {
    let server = Server::start("");
    for (what, auth) in [("bad token", "Authorization: Token nope\r\n"), ("no token", "")] {
        let mut s = connect(server.addr);
        let head = format!(
            "POST /events HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 100\r\n\r\n"
        );
        s.write_all(head.as_bytes()).unwrap();
        // The final answer comes at once, without a 100 and without the body being sent.
        let r = read_response(&mut s, false).expect("an answer without the body");
        assert_eq!(r.status, 400, "{what}: {r:?}");
        assert_eq!(r.body, TOKEN_REFUSED, "{what}");
        // The body was never read, so the connection cannot go on.
        assert_eof(&mut s, what);
    }
    server.assert_alive();
}

#[test]
fn expect_100_continue_with_a_bad_token_closes_even_when_the_body_came_along() {
    // A client that sends the body without waiting for the 100: the refusal is the same,
    // and so is the close, whatever the server happened to read first (fuzz target
    // http_split found the connection going on when head and body came in one read).
    let server = Server::start("");
    let mut s = connect(server.addr);
    let body = repo_update("r", "e1").to_string();
    let request = format!(
        "POST /events HTTP/1.1\r\nHost: x\r\nAuthorization: Token nope\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n{body}GET /ping HTTP/1.1\r\nHost: x\r\n\r\n",
        body.len()
    );
    s.write_all(request.as_bytes()).unwrap();
    let r = read_response(&mut s, false).expect("the refusal");
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.body, TOKEN_REFUSED);
    assert_eof(&mut s, "after a refused Expect: 100-continue event");
    server.assert_alive();
}

// ---- limits ----

const SMALL_LIMITS: &str = "max_head_bytes = 1024\nmax_body_bytes = 2048";

/// A GET /ping head of exactly `len` bytes.
fn head_of_len(len: usize) -> Vec<u8> {
    let start = "GET /ping HTTP/1.1\r\nHost: x\r\nX-Pad: ";
    let end = "\r\n\r\n";
    let pad = len - start.len() - end.len();
    format!("{start}{}{end}", "a".repeat(pad)).into_bytes()
}

/// An event body of exactly `len` bytes.
fn body_of_len(repo: &str, commit: &str, len: usize) -> String {
    let empty =
        json!({"type": "repo-update", "content": {"repo_id": repo, "commit_id": commit, "pad": ""}}).to_string();
    let body = json!({"type": "repo-update", "content": {"repo_id": repo, "commit_id": commit, "pad": "p".repeat(len - empty.len())}}).to_string();
    assert_eq!(body.len(), len);
    body
}

#[test]
fn head_over_the_cap_is_431_and_closed() {
    let server = Server::start(SMALL_LIMITS);
    let mut ws = subscriber(&server, "r");
    // Exactly at the cap is fine.
    let r = request(server.addr, &head_of_len(1024));
    assert_pong(&r, "a 1024-byte head");
    for (what, raw) in [
        ("complete head of 1025 bytes", head_of_len(1025)),
        ("complete head of 2000 bytes", head_of_len(2000)),
        (
            "unfinished head over the cap",
            format!("GET /ping HTTP/1.1\r\nX-Pad: {}", "a".repeat(1500)).into_bytes(),
        ),
        (
            "too many header lines",
            format!(
                "GET /ping HTTP/1.1\r\n{}\r\n",
                (0..100).map(|i| format!("H{i}: v\r\n")).collect::<String>()
            )
            .into_bytes(),
        ),
        // More than the server reads before it decides: the answer must still arrive.
        ("complete head of 100 KB", head_of_len(100_000)),
    ] {
        let mut s = connect(server.addr);
        // The server may close before it has read everything; the answer still counts.
        let _ = s.write_all(&raw);
        let r = read_response(&mut s, false).unwrap_or_else(|| panic!("{what}: no answer"));
        assert_eq!(r.status, 431, "{what}: {r:?}");
        assert_eof(&mut s, what);
        assert_still_serving(&server, &mut ws, "r", what);
    }
}

#[test]
fn body_over_the_cap_is_413_at_once_and_closed() {
    let server = Server::start(SMALL_LIMITS);
    let mut ws = subscriber(&server, "r");
    let token = event_token();
    // Exactly at the cap is accepted and delivered.
    let body = body_of_len("r", "at-cap", 2048);
    assert_accepted(&post_with(&server, &auth(&token), &body), "2048-byte body");
    assert_eq!(ws.recv().unwrap()["content"]["commit_id"], "at-cap");
    for (what, declared) in [
        ("2049 bytes declared", 2049usize),
        ("100000 bytes declared", 100_000),
        ("huge", 1 << 40),
    ] {
        // Only the head is sent: the answer must not wait for a body that is not coming.
        let mut s = connect(server.addr);
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let started = Instant::now();
        s.write_all(
            format!(
                "POST /events HTTP/1.1\r\nHost: x\r\nAuthorization: Token {token}\r\nContent-Length: {declared}\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
        let r = read_response(&mut s, false).unwrap_or_else(|| panic!("{what}: no answer within 3 s"));
        assert_eq!(r.status, 413, "{what}: {r:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{what}: answered after {:?}",
            started.elapsed()
        );
        assert_eof(&mut s, what);
        assert_still_serving(&server, &mut ws, "r", what);
    }
    // A sender that writes head and oversized body at once still gets its 413.
    let body = body_of_len("r", "too-big", 50_000);
    let mut s = connect(server.addr);
    let _ = s.write_all(&raw_request("POST", "/events", &auth(&token), &body));
    let r = read_response(&mut s, false).expect("413 after a body sent in full");
    assert_eq!(r.status, 413, "{r:?}");
    assert_eof(&mut s, "413 with the body sent");
    assert_still_serving(&server, &mut ws, "r", "after a 50 KB body");
    // With Expect: 100-continue, an oversized body gets 413 and never a 100.
    let mut s = connect(server.addr);
    s.write_all(format!("POST /events HTTP/1.1\r\nHost: x\r\nAuthorization: Token {token}\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n").as_bytes())
        .unwrap();
    let r = read_response(&mut s, false).expect("answer");
    assert_eq!(r.status, 413, "{r:?}");
    assert_eof(&mut s, "413 with Expect");
    assert_still_serving(&server, &mut ws, "r", "after 413 with Expect");
}

#[test]
fn chunked_body_is_501_and_closed() {
    let server = Server::start(SMALL_LIMITS);
    let mut ws = subscriber(&server, "r");
    let body = repo_update("r", "chunked").to_string();
    let raw = format!(
        "POST /events HTTP/1.1\r\nHost: x\r\nAuthorization: Token {}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        event_token(),
        body.len()
    );
    let mut s = connect(server.addr);
    s.write_all(raw.as_bytes()).unwrap();
    let r = read_response(&mut s, false).expect("answer");
    assert_eq!(r.status, 501, "{r:?}");
    assert_eof(&mut s, "chunked");
    assert_still_serving(&server, &mut ws, "r", "after chunked");
}

#[test]
fn malformed_requests_are_400_and_closed() {
    let server = Server::start(SMALL_LIMITS);
    let mut ws = subscriber(&server, "r");
    for (what, raw) in [
        ("garbage request line", &b"GARBAGE\r\n\r\n"[..]),
        ("binary junk", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"),
        ("HTTP/2.0 request line", b"GET /ping HTTP/2.0\r\n\r\n"),
        (
            "bad Content-Length",
            b"POST /events HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        ),
        (
            "conflicting Content-Length",
            b"POST /events HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        ),
    ] {
        let mut s = connect(server.addr);
        s.write_all(raw).unwrap();
        let r = read_response(&mut s, false).unwrap_or_else(|| panic!("{what}: no answer"));
        assert_eq!(r.status, 400, "{what}: {r:?}");
        assert_eof(&mut s, what);
        assert_still_serving(&server, &mut ws, "r", what);
    }
}

// ---- slow clients ----

/// Reads until the server closes; returns how long that took from `since`, or None if it
/// did not within 5 s.
fn time_to_close(s: &mut TcpStream, since: Instant) -> Option<Duration> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if closed_by_server(s) {
        Some(since.elapsed())
    } else {
        None
    }
}

#[test]
fn half_a_head_is_closed_after_the_head_timeout() {
    let server = Server::start("http_head_timeout = 0.5");
    let mut ws = subscriber(&server, "r");
    let mut s = connect(server.addr);
    let started = Instant::now();
    s.write_all(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Le").unwrap();
    let took = time_to_close(&mut s, started).expect("a half head was never closed");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );

    // A connection that sends nothing at all.
    let mut s = connect(server.addr);
    let took = time_to_close(&mut s, Instant::now()).expect("a silent connection was never closed");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "silent closed after {took:?}"
    );

    // A complete head whose body never comes.
    let mut s = connect(server.addr);
    let started = Instant::now();
    s.write_all(
        format!(
            "POST /events HTTP/1.1\r\nHost: x\r\nAuthorization: Token {}\r\nContent-Length: 100\r\n\r\n{{\"ty",
            event_token()
        )
        .as_bytes(),
    )
    .unwrap();
    let took = time_to_close(&mut s, started).expect("a missing body was never closed");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "body-less closed after {took:?}"
    );
    assert_still_serving(&server, &mut ws, "r", "after slow heads");
}

#[test]
fn a_head_dripped_byte_by_byte_does_not_extend_the_deadline() {
    let server = Server::start("http_head_timeout = 0.5");
    let mut s = connect(server.addr);
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let started = Instant::now();
    let drip = b"GET /ping HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut buf = [0u8; 256];
    let mut closed = false;
    for b in drip.iter().cycle() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a dripping client was never closed"
        );
        if s.write_all(&[*b]).is_err() {
            closed = true;
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    let took = started.elapsed();
    assert!(closed);
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "drip closed after {took:?}"
    );
    server.assert_alive();
}

#[test]
fn idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let server = Server::start("http_idle_timeout = 0.5");
    let mut s = connect(server.addr);
    s.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_pong(&read_response(&mut s, false).expect("answer"), "before idling");
    let idle_from = Instant::now();
    let took = time_to_close(&mut s, idle_from).expect("an idle keep-alive connection was never closed");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "idle closed after {took:?}"
    );
    server.assert_alive();
}

// ---- websocket upgrade answers ----

const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

fn upgrade_request(method: &str, path: &str, headers: &str) -> Vec<u8> {
    format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n").into_bytes()
}

fn assert_upgrade_refused(r: &Response, status: u16, body: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: {r:?}");
    assert_eq!(r.text(), body, "{what}: {r:?}");
    assert_eq!(
        r.header("sec-websocket-version").as_deref(),
        Some("13"),
        "{what}: {r:?}"
    );
    assert_eq!(r.header("content-type").as_deref(), Some(TEXT_PLAIN), "{what}: {r:?}");
    assert_eq!(
        r.header("x-content-type-options").as_deref(),
        Some("nosniff"),
        "{what}: {r:?}"
    );
    assert_eq!(r.header("upgrade"), None, "{what}: {r:?}");
    assert_eq!(r.header("sec-websocket-accept"), None, "{what}: {r:?}");
}

#[test]
fn bad_upgrade_requests_get_the_official_answers() {
    let server = Server::start("");
    let good = format!(
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WS_KEY}\r\n"
    );
    let no_key = good.replace(&format!("Sec-WebSocket-Key: {WS_KEY}\r\n"), "");
    let no_version = good.replace("Sec-WebSocket-Version: 13\r\n", "");
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("plain GET /", upgrade_request("GET", "/", ""), 400, "Bad Request\n"),
        (
            "plain POST /",
            upgrade_request("POST", "/", "Content-Length: 0\r\n"),
            400,
            "Bad Request\n",
        ),
        (
            "plain GET /notification",
            upgrade_request("GET", "/notification", ""),
            400,
            "Bad Request\n",
        ),
        (
            "Connection without Upgrade",
            upgrade_request("GET", "/", "Connection: Upgrade\r\n"),
            400,
            "Bad Request\n",
        ),
        (
            "upgrade headers but POST",
            upgrade_request("POST", "/", &format!("{good}Content-Length: 0\r\n")),
            405,
            "Method Not Allowed\n",
        ),
        (
            "version 8",
            upgrade_request("GET", "/", &good.replace("Version: 13", "Version: 8")),
            400,
            "Bad Request\n",
        ),
        (
            "version missing",
            upgrade_request("GET", "/", &no_version),
            400,
            "Bad Request\n",
        ),
        (
            "key missing",
            upgrade_request("GET", "/", &no_key),
            400,
            "Bad Request\n",
        ),
        (
            "key not 16 bytes",
            upgrade_request("GET", "/", &good.replace(WS_KEY, "c2hvcnQ=")),
            400,
            "Bad Request\n",
        ),
    ];
    for (what, raw, status, body) in cases {
        let r = request(server.addr, &raw);
        assert_upgrade_refused(&r, status, body, what);
    }
    server.assert_alive();
}

#[test]
fn good_upgrades_answer_101_with_exactly_three_headers() {
    let server = Server::start("");
    let offers = "Sec-WebSocket-Protocol: notification.seafile.com\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\nOrigin: https://elsewhere.example\r\n";
    for (path, connection, upgrade) in [
        ("/", "Upgrade", "websocket"),
        ("/notification", "keep-alive, Upgrade", "WebSocket"),
        ("/notification/", "upgrade", "websocket"),
        ("/?token=x", "Upgrade", "websocket"),
    ] {
        let headers = format!(
            "Connection: {connection}\r\nUpgrade: {upgrade}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WS_KEY}\r\n{offers}"
        );
        let mut s = connect(server.addr);
        s.write_all(&upgrade_request("GET", path, &headers)).unwrap();
        let head = read_head_raw(&mut s).unwrap_or_else(|| panic!("{path}: no answer"));
        let want = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {WS_ACCEPT}\r\n\r\n"
        );
        assert_eq!(String::from_utf8_lossy(&head), want, "{path}");
        // The socket now speaks websocket: a masked ping is answered with a pong.
        s.write_all(&[0x89, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2]).unwrap();
        let mut frame = [0u8; 4];
        s.read_exact(&mut frame).unwrap();
        assert_eq!(frame, [0x8A, 2, b'h', b'i'], "{path}: pong");
    }
    // Another key gets its own accept value.
    let key = "AQIDBAUGBwgJCgsMDQ4PEA==";
    let r = request(
        server.addr,
        &upgrade_request(
            "GET",
            "/",
            &format!(
                "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
            ),
        ),
    );
    assert_eq!(r.status, 101);
    assert_eq!(
        r.header("sec-websocket-accept"),
        Some(tungstenite::handshake::derive_accept_key(key.as_bytes()))
    );
}

#[test]
fn handshake_and_first_frame_in_one_write() {
    // A client may send its first frame right behind the upgrade request; those bytes
    // are websocket bytes, not a second HTTP request.
    let server = Server::start("");
    let mut s = connect(server.addr);
    let mut raw = upgrade_request(
        "GET",
        "/",
        &format!(
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WS_KEY}\r\n"
        ),
    );
    let msg = br#"{"type":"subscribe","content":{"repos":[{"id":"early","jwt_token":"bad"}]}}"#;
    let mask = [9u8, 8, 7, 6];
    raw.extend_from_slice(&[0x81, 0x80 | msg.len() as u8]);
    raw.extend_from_slice(&mask);
    raw.extend(msg.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&raw).unwrap();
    let head = read_head_raw(&mut s).expect("101");
    assert!(
        head.starts_with(b"HTTP/1.1 101 "),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    let mut ws = tungstenite::WebSocket::from_raw_socket(s, tungstenite::protocol::Role::Client, None);
    loop {
        match ws.read().expect("answer to the early subscribe") {
            tungstenite::Message::Text(t) => {
                assert_eq!(
                    t.as_str(),
                    "{\"type\":\"jwt-expired\",\"content\":{\"repo_id\":\"early\"}}\n"
                );
                break;
            }
            tungstenite::Message::Ping(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

// ---- HEAD answers carry no body, whatever the route ----

#[test]
fn head_requests_never_get_a_body() {
    // A HEAD response never has a body (RFC 9110 9.3.2; Go's server drops it). If one is
    // sent anyway, a keep-alive client reads it as the start of the next response.
    let server = Server::start("");
    let token = event_token();
    let mut failures = Vec::new();
    for (what, head_req) in [
        ("HEAD /x (404)", "HEAD /x HTTP/1.1\r\nHost: x\r\n\r\n".to_string()),
        (
            "HEAD / (upgrade refused)",
            "HEAD / HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        ),
        (
            "HEAD /notification (upgrade refused)",
            "HEAD /notification HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        ),
        (
            "HEAD /events without a token",
            "HEAD /events HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        ),
        (
            "HEAD /events with a token, no body",
            format!("HEAD /events HTTP/1.1\r\nHost: x\r\nAuthorization: Token {token}\r\n\r\n"),
        ),
    ] {
        let mut s = connect(server.addr);
        s.write_all(format!("{head_req}GET /ping HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        let first = read_head_raw(&mut s).unwrap_or_else(|| panic!("{what}: no answer"));
        assert!(
            first.starts_with(b"HTTP/1.1 "),
            "{what}: {:?}",
            String::from_utf8_lossy(&first)
        );
        let second = read_head_raw(&mut s).unwrap_or_else(|| panic!("{what}: no answer to the GET after it"));
        if !second.starts_with(b"HTTP/1.1 200 OK\r\n") {
            failures.push(format!(
                "{what}: the HEAD answer carried body bytes; the next response read as {:?}",
                String::from_utf8_lossy(&second)
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---- Content-Length must be digits only ----

#[test]
fn content_length_with_a_sign_is_malformed() {
    // RFC 9110: Content-Length = 1*DIGIT. Go's server refuses "+2" with 400 (ParseUint
    // takes no sign); a sign accepted here but not by a proxy in front is a smuggling
    // vector.
    let server = Server::start("");
    let token = event_token();
    for value in ["+2", "+0"] {
        let mut s = connect(server.addr);
        // A valid token and an ignorable body: only the Content-Length is wrong.
        let raw = format!(
            "POST /events HTTP/1.1\r\nHost: x\r\nAuthorization: Token {token}\r\nContent-Length: {value}\r\n\r\n{{}}"
        );
        s.write_all(raw.as_bytes()).unwrap();
        let r = read_response(&mut s, false).unwrap_or_else(|| panic!("Content-Length: {value}: no answer"));
        assert_eq!(r.status, 400, "Content-Length: {value}: {r:?}");
        assert_eof(&mut s, value);
    }
    server.assert_alive();
}

// ---- a client that pipelines without reading cannot grow the server ----

#[test]
fn pipelining_without_reading_answers_is_bounded() {
    // Each 22-byte ping request makes an 82-byte answer. A client that keeps writing
    // requests and never reads must meet back-pressure (the server stops reading while
    // its answers are stuck), not make the server buffer answers without limit.
    let server = Server::start("");
    let before = server.rss_kb();
    let s = std::net::TcpStream::connect(server.addr).unwrap();
    set_rcvbuf(&s, 4096);
    s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut s = s;
    let chunk = b"GET /ping HTTP/1.1\r\n\r\n".repeat(10_000);
    let mut sent = 0usize;
    let started = Instant::now();
    // A bounded server stops reading after a few hundred KiB and the write times out.
    while sent < 10_000_000 && started.elapsed() < Duration::from_secs(5) {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    // Let the server catch up with whatever it accepted.
    std::thread::sleep(Duration::from_millis(300));
    let grown_kb = server.rss_kb().saturating_sub(before);
    server.assert_alive();
    assert!(
        grown_kb < 8 * 1024,
        "the server grew by {grown_kb} KiB while a client pipelined {sent} bytes of requests without reading"
    );
}

/// Writes `n` pipelined pings in one write (half-closing after them if asked) and reads
/// answers until `n` came or the server stopped answering; returns how many came and,
/// after a half-close, whether the server then closed (EOF) rather than went silent.
fn pipelined_pings(server: &Server, n: usize, half_close: bool) -> (usize, bool) {
    let mut s = connect(server.addr);
    s.write_all(&b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n".repeat(n))
        .unwrap();
    if half_close {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut answered = 0;
    while answered < n {
        match read_response(&mut s, false) {
            Some(r) => {
                assert_pong(&r, &format!("pipelined ping {answered}"));
                answered += 1;
            }
            None => break,
        }
    }
    (answered, half_close && answered == n && closed_by_server(&mut s))
}

#[test]
fn pipelined_requests_past_the_output_cap_are_all_answered() {
    // 1,500 pings (46 KB) in one write: their answers (123 KB) pass the 64 KiB of output
    // the server lets wait before it stops answering. A write that empties the output
    // must let it go on with the complete requests it already read, though no new
    // readiness edge will come for them.
    let server = Server::start("");
    let plain = pipelined_pings(&server, 1_500, false).0;
    // The same, with the client half-closing after its requests: all answers, then EOF.
    let half_closed = pipelined_pings(&server, 1_500, true);
    assert_eq!(
        (plain, half_closed),
        (1_500, (1_500, true)),
        "answers stopped with complete requests buffered (plain, then half-closed and whether EOF came)"
    );
    server.assert_alive();
}

// ---- urgent data ----

/// Sends `bytes` with `MSG_OOB`: the last of them is TCP urgent data.
fn send_urgent(s: &TcpStream, bytes: &[u8]) {
    use std::os::fd::AsRawFd;
    // SAFETY: send on a socket we own, from a live buffer of the given length.
    let sent = unsafe { libc::send(s.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_OOB) };
    assert_eq!(sent, bytes.len() as isize, "send: {}", std::io::Error::last_os_error());
}

/// Waits until the process is stopped (state `T` in /proc).
fn wait_stopped(pid: i32) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // The state follows the parenthesised command name.
        if stat.rsplit(')').next().unwrap().trim_start().starts_with('T') {
            return;
        }
        assert!(Instant::now() < deadline, "the server did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_request_with_urgent_data_in_its_middle_is_answered() {
    // Linux ends a read at the urgent mark with the rest of the request still queued.
    // The server must not take that short read for a drained socket: no readiness edge
    // comes for bytes already queued. Stopping the server while the request is sent puts
    // all of it, mark included, in the queue before the first read.
    let server = Server::start("");
    let mut s = connect(server.addr);
    s.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_pong(&read_response(&mut s, false).expect("first pong"), "before");
    server.signal(libc::SIGSTOP);
    wait_stopped(server.pid());
    s.write_all(b"GET /ping HTTP/1.1\r\nX-A: a").unwrap();
    // Out of band (and not part of the stream the server reads): the header is "ac".
    send_urgent(&s, b"b");
    s.write_all(b"c\r\nHost: x\r\n\r\n").unwrap();
    server.signal(libc::SIGCONT);
    let started = Instant::now();
    let answer = read_response(&mut s, false);
    assert!(
        answer.is_some(),
        "no answer in {:?}: the rest of the request waits behind the urgent mark",
        started.elapsed()
    );
    assert_pong(&answer.unwrap(), "after the urgent byte");
    server.assert_alive();
}
