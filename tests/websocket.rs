//! Websocket behaviour against the real binary: subscriptions, tokens, fan-out, audiences,
//! framing, closing.

mod common;

use common::*;
use serde_json::json;
use std::io::Read;
use std::time::{Duration, Instant};
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

#[test]
fn subscriber_receives_repo_update_with_every_field() {
    let server = Server::start("");
    let mut a = server.ws();
    a.subscribe("repo-1", "alice@example.com");
    let body =
        r#"{"type": "repo-update", "content": {"repo_id": "repo-1", "commit_id": "c1", "extra": {"x": [1, 2]}}}"#;
    let r = post_event(server.addr, body, Some(&format!("Token {}", event_token())));
    assert_eq!((r.status, r.body.len()), (200, 0));
    let text = a.recv_text().expect("event");
    assert_eq!(
        text,
        "{\"type\":\"repo-update\",\"content\":{\"repo_id\":\"repo-1\",\"commit_id\":\"c1\",\"extra\":{\"x\":[1,2]}}}\n"
    );
}

#[test]
fn every_path_upgrades_and_binary_frames_subscribe() {
    let server = Server::start("");
    for path in ["/", "//", "/notification", "/notification/", "/?a=b"] {
        let mut ws = Ws::connect(server.addr, path);
        let token = client_token("r", "u", unix_now() + 60);
        let msg = json!({"type": "subscribe", "content": {"repos": [{"id": "r", "jwt_token": token}]}});
        ws.ws.send(Message::binary(msg.to_string().into_bytes())).unwrap();
        ws.sync();
        server.post(&repo_update("r", path));
        assert_eq!(ws.recv().unwrap()["content"]["commit_id"], path);
    }
}

#[test]
fn only_subscribers_of_the_repo_receive_and_each_once() {
    let server = Server::start("");
    let mut a = server.ws();
    let mut b = server.ws();
    a.subscribe("ra", "u");
    b.subscribe("rb", "u");
    server.post(&repo_update("ra", "1"));
    server.post(&repo_update("rb", "2"));
    assert_eq!(a.recv().unwrap()["content"]["commit_id"], "1");
    assert_eq!(b.recv().unwrap()["content"]["commit_id"], "2");
    // Nothing else is queued for either: the next thing each sees is its sync answer.
    a.sync();
    b.sync();
}

#[test]
fn bad_tokens_get_jwt_expired_with_the_id_escaped() {
    let server = Server::start("");
    let mut a = server.ws();
    let other_key = sign_with(
        jsonwebtoken::Algorithm::HS256,
        &json!({"repo_id": "r1", "username": "u", "exp": unix_now() + 60}),
        b"wrong",
    );
    let expired = client_token("r2", "u", unix_now() - 1);
    let wrong_repo = client_token("other", "u", unix_now() + 60);
    let weird = "we\"ird\\id";
    a.subscribe_many(&[
        ("r1", &other_key),
        ("r2", &expired),
        ("r3", &wrong_repo),
        (weird, "garbage"),
    ]);
    for want in ["r1", "r2", "r3", weird] {
        let m = a.recv().unwrap();
        assert_eq!(m, json!({"type": "jwt-expired", "content": {"repo_id": want}}));
    }
    // None of them subscribed.
    server.post(&repo_update("r1", "x"));
    a.sync();
}

#[test]
fn subscription_ends_at_token_expiry_within_a_second() {
    let server = Server::start("");
    let mut a = server.ws();
    let exp = unix_now() + 2;
    let t = client_token("r", "u", exp);
    a.subscribe_many(&[("r", &t)]);
    a.sync();
    let m = a.recv().expect("jwt-expired at expiry");
    let at = common::unix_now();
    assert_eq!(m, json!({"type": "jwt-expired", "content": {"repo_id": "r"}}));
    assert!(at >= exp && at <= exp + 1, "expired at {at}, token exp {exp}");
    server.post(&repo_update("r", "after"));
    a.sync();
}

#[test]
fn unsubscribe_with_objects_or_strings() {
    let server = Server::start("");
    let mut a = server.ws();
    a.subscribe("r1", "u");
    a.subscribe("r2", "u");
    a.send_json(&json!({"type": "unsubscribe", "content": {"repos": [{"id": "r1"}, "r2", "never-subscribed"]}}));
    a.sync();
    server.post(&repo_update("r1", "x"));
    server.post(&repo_update("r2", "y"));
    a.sync();
}

#[test]
fn user_scoped_folder_perm_events_follow_each_subscriptions_own_user() {
    let server = Server::start("");
    // One socket shared by two accounts, as the desktop client does.
    let mut shared = server.ws();
    shared.subscribe("r-alice", "alice");
    shared.subscribe("r-bob", "bob");
    let mut other = server.ws();
    other.subscribe("r-bob", "carol");
    let perm = |repo: &str, user: &str, group: i64| {
        json!({"type": "folder-perm-changed", "content": {"repo_id": repo, "path": "/d", "type": "user",
            "change_event": "add", "user": user, "group": group, "perm": "rw"}})
    };
    server.post(&perm("r-bob", "alice", -1)); // alice's subscription is on another repo
    server.post(&perm("r-bob", "bob", -1));
    let m = shared.recv().unwrap();
    assert_eq!(
        (m["type"].as_str(), m["content"]["user"].as_str()),
        (Some("folder-perm-changed"), Some("bob"))
    );
    shared.sync();
    other.sync();
    // Unscoped (group -1, no user): everyone on the repo.
    server.post(&perm("r-bob", "", -1));
    assert_eq!(shared.recv().unwrap()["content"]["user"], "");
    assert_eq!(other.recv().unwrap()["content"]["user"], "");
}

#[test]
fn group_scoped_events_are_never_broadcast() {
    let server = Server::start("");
    let mut a = server.ws();
    a.subscribe("r", "alice");
    let ev = json!({"type": "folder-perm-changed", "content": {"repo_id": "r", "path": "/d", "type": "group",
        "change_event": "add", "user": "", "group": 7, "perm": "r"}});
    server.post(&ev);
    assert!(
        server
            .logs
            .wait_for("dropped group-scoped folder-perm-changed", DEADLINE)
            .is_some()
    );
    server.post(&repo_update("r", "next"));
    assert_eq!(a.recv().unwrap()["type"], "repo-update");
}

#[test]
fn lock_and_comment_events_are_forwarded() {
    let server = Server::start("");
    let mut a = server.ws();
    a.subscribe("r", "u");
    let lock = json!({"type": "file-lock-changed", "content": {"repo_id": "r", "path": "/a.docx", "change_event": "locked", "lock_user": "u", "expire": 0}});
    server.post(&lock);
    let comment = r#"{"type": "comment-update", "content": {"repo_id": "r", "type": "comment_updated", "file_uuid": "f", "file_path": ""}}"#;
    let r = post_event(server.addr, comment, Some(&format!("Token {}", event_token())));
    assert_eq!(r.status, 200);
    assert_eq!(a.recv().unwrap(), lock);
    let m = a.recv().unwrap();
    assert_eq!(m["type"], "comment-update");
    assert_eq!(m["content"]["file_uuid"], "f");
}

#[test]
fn bad_client_message_gets_a_close_frame() {
    let server = Server::start("");
    for bad in [
        r#"not json"#,
        r#"{"type":"ping","content":{}}"#,
        r#"{"type":"subscribe"}"#,
        r#"{"type":"subscribe","content":{"repos":["r"]}}"#,
    ] {
        let mut a = server.ws();
        a.ws.send(Message::text(bad)).unwrap();
        let frame = a.recv_close().unwrap_or_else(|| panic!("no close frame for {bad}"));
        assert_eq!(frame.code, CloseCode::Unsupported, "{bad}");
    }
    server.assert_alive();
}

#[test]
fn client_close_is_echoed() {
    let server = Server::start("");
    let mut a = server.ws();
    a.subscribe("r", "u");
    a.ws.close(Some(tungstenite::protocol::CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .unwrap();
    let frame = a.recv_close();
    assert_eq!(frame.map(|f| f.code), Some(CloseCode::Normal));
    assert!(server.logs.wait_for("closed by peer", DEADLINE).is_some());
}

#[test]
fn large_events_go_out_as_one_unfragmented_text_frame() {
    let server = Server::start("");
    let mut raw = RawWs::connect(&server);
    let t = client_token("r", "u", unix_now() + 60);
    let sub = json!({"type": "subscribe", "content": {"repos": [{"id": "r", "jwt_token": t}, {"id": "probe", "jwt_token": "x"}]}});
    raw.send(0x1, sub.to_string().as_bytes());
    let (b0, p) = raw.data_frame().unwrap();
    assert_eq!(b0, 0x81);
    assert!(String::from_utf8(p).unwrap().contains("probe"));
    // Sizes around the official server's 1024-byte fragmentation points.
    for size in [1000, 1500, 3000, 20000] {
        let body =
            json!({"type": "repo-update", "content": {"repo_id": "r", "commit_id": "c", "pad": "x".repeat(size)}});
        server.post(&body);
        let (b0, p) = raw.data_frame().unwrap();
        assert_eq!(b0, 0x81, "FIN + text for size {size}");
        let text = String::from_utf8(p).unwrap();
        assert!(text.ends_with("}\n"));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v, body);
    }
}

#[test]
fn client_pings_are_answered_and_server_pings_keep_coming() {
    let server = Server::start("ping_interval = 0.2\npong_timeout = 2");
    let mut raw = RawWs::connect(&server);
    raw.send(0x9, b"hello");
    let mut got_pong = false;
    let mut server_pings = 0;
    let deadline = Instant::now() + DEADLINE;
    while (!got_pong || server_pings < 2) && Instant::now() < deadline {
        let (b0, p) = raw.frame().unwrap();
        match b0 {
            0x8A => {
                assert_eq!(p, b"hello");
                got_pong = true;
            }
            0x89 => {
                assert!(p.is_empty(), "server pings carry no payload");
                server_pings += 1;
                raw.send(0xA, &p);
            }
            other => panic!("unexpected frame {other:#x}"),
        }
    }
    assert!(got_pong && server_pings >= 2);
}

#[test]
fn a_client_that_answers_promptly_is_pinged_every_other_interval() {
    // Its pong to one ping is a sign of life within the next interval, so that ping is
    // skipped, even when the pong came back within the millisecond (loopback).
    let server = Server::start("ping_interval = 0.3\npong_timeout = 5");
    let mut ws = server.ws();
    ws.subscribe("r", "u");
    ws.ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_secs(3) {
        match ws.ws.read() {
            Ok(Message::Ping(_)) => pings += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => {}
        }
        let _ = ws.ws.flush();
    }
    // Every 0.6 s: 5 in 3 s (a ping every interval would be 10).
    assert!((3..=6).contains(&pings), "{pings} pings in 3 s");
}

#[test]
fn a_quiet_client_that_answers_pings_survives_a_ping_interval_above_half_the_pong_timeout() {
    // With a skipped ping the next one came two intervals after the last pong (1.2 s),
    // past the 1 s pong timeout, so such a client was closed while healthy.
    let server = Server::start("ping_interval = 0.6\npong_timeout = 1");
    let mut quiet = server.ws();
    quiet.subscribe("r", "u");
    quiet.idle(Duration::from_secs(4));
    server.post(&repo_update("r", "kept"));
    assert_eq!(quiet.recv().unwrap()["content"]["commit_id"], "kept");
    assert!(!server.logs.contains("pong timeout"), "{:?}", server.logs.all());
}

#[test]
fn silent_client_is_closed_after_pong_timeout_and_a_live_one_is_kept() {
    let server = Server::start("ping_interval = 0.2\npong_timeout = 1");
    let mut silent = RawWs::connect(&server);
    let mut live = server.ws();
    live.subscribe("r", "u");
    let started = Instant::now();
    // The silent client never answers; it must be closed, not left as a zombie. The live
    // client keeps reading meanwhile, which answers the server's pings.
    silent.s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    live.ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match silent.s.read(&mut buf) {
            Ok(0) => break,
            Err(e) if !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                break;
            }
            _ => assert!(started.elapsed() < DEADLINE, "never closed"),
        }
        match live.ws.read() {
            Ok(Message::Ping(_) | Message::Pong(_)) | Err(tungstenite::Error::Io(_)) => {
                let _ = live.ws.flush();
            }
            other => panic!("live client got {other:?}"),
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "closed after {took:?}"
    );
    assert!(server.logs.wait_for("pong timeout", DEADLINE).is_some());
    // The live client answered every ping (its reads answer them) and still gets events.
    server.post(&repo_update("r", "still-here"));
    assert_eq!(live.recv().unwrap()["content"]["commit_id"], "still-here");
}

#[test]
fn a_client_that_stops_reading_is_evicted_and_others_keep_receiving() {
    // A small output cap so the stuck client crosses it quickly.
    // A long pong_timeout: the stuck client never answers pings, and on a loaded machine
    // the 400 posts can take longer than the default 5 s.
    let server = Server::start(
        "max_unsent_bytes = 70000\nmax_body_bytes = 65536\nwrite_timeout = 30\nping_interval = 30\npong_timeout = 60",
    );
    let stuck = std::net::TcpStream::connect(server.addr).unwrap();
    // A tiny receive buffer so the kernel cannot hide much of the backlog.
    set_rcvbuf(&stuck, 4096);
    let (mut stuck_ws, _) = tungstenite::client::client("ws://x/", stuck).unwrap();
    let t = client_token("r", "u", unix_now() + 3600);
    stuck_ws
        .send(Message::text(
            json!({"type":"subscribe","content":{"repos":[{"id":"r","jwt_token":t}]}}).to_string(),
        ))
        .unwrap();
    let mut healthy = server.ws();
    healthy.subscribe("r", "h");
    // The stuck client's subscribe may still be in flight: make sure it is processed.
    let mut probe = server.ws();
    probe.sync();
    let pad = "p".repeat(16_000);
    let mut evicted = false;
    for i in 0..400 {
        server
            .post(&json!({"type": "repo-update", "content": {"repo_id": "r", "commit_id": i.to_string(), "pad": pad}}));
        let m = healthy.recv().expect("healthy subscriber got every event");
        assert_eq!(m["content"]["commit_id"], i.to_string());
        if server.logs.contains("slow consumer") {
            evicted = true;
            break;
        }
    }
    assert!(evicted, "stuck client never evicted: {:#?}", server.logs.all());
    server.post(&repo_update("r", "after"));
    assert_eq!(healthy.recv().unwrap()["content"]["commit_id"], "after");
    server.assert_alive();
}

#[test]
fn output_unsent_for_too_long_evicts() {
    let server =
        Server::start("write_timeout = 1\nping_interval = 0.5\npong_timeout = 30\nmax_unsent_bytes = 100000000");
    let stuck = std::net::TcpStream::connect(server.addr).unwrap();
    set_rcvbuf(&stuck, 4096);
    let (mut stuck_ws, _) = tungstenite::client::client("ws://x/", stuck).unwrap();
    let t = client_token("r", "u", unix_now() + 3600);
    stuck_ws
        .send(Message::text(
            json!({"type":"subscribe","content":{"repos":[{"id":"r","jwt_token":t}]}}).to_string(),
        ))
        .unwrap();
    let mut probe = server.ws();
    probe.sync();
    // Fill the kernel buffers and some of ours, well under the byte cap, then wait for the
    // time limit.
    let pad = "p".repeat(16_000);
    for i in 0..500 {
        server
            .post(&json!({"type": "repo-update", "content": {"repo_id": "r", "commit_id": i.to_string(), "pad": pad}}));
    }
    let line = server.logs.wait_for("slow consumer", DEADLINE).expect("evicted");
    assert!(line.contains("write_timeout"), "{line}");
}

#[test]
fn thousand_subscribers_all_receive() {
    let server = Server::start("");
    let mut clients: Vec<Ws> = (0..200).map(|_| server.ws()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.subscribe(&format!("r{}", i % 4), "u");
    }
    for k in 0..4 {
        server.post(&repo_update(&format!("r{k}"), &format!("c{k}")));
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.recv().unwrap()["content"]["commit_id"], format!("c{}", i % 4));
    }
}
