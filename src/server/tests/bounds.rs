//! What one loop turn may take and hold, whichever way the work came: a client's frames
//! (messages and control frames alike) within its budget and listed once for the next
//! turn, a Close behind a refused message seen at once, bus events and events released
//! by the group gate paced like `/events`, held events inside the output budget, and the
//! metrics listener retried after running out of descriptors.

use super::*;
use crate::event::{Audience, Event, Kind, Origin};

fn bad_subscribe(n: usize) -> Vec<u8> {
    let msg = json!({"type": "subscribe", "content": {"repos": [{"id": format!("b{n}"), "jwt_token": "x"}]}});
    client_frame(1, msg.to_string().as_bytes())
}

/// How often `key` is listed to be read again without an edge.
fn listed(l: &Loop, key: usize) -> usize {
    l.server.unread.iter().filter(|&&k| k == key).count()
}

#[test]
fn a_client_read_through_its_readiness_and_the_unread_list_is_listed_once_and_keeps_its_budget() {
    let config = Config {
        max_messages_per_wakeup: 4,
        ..Config::default()
    };
    let mut l = Loop::new(config, None);
    let key = l.subscriber("u", &["r"]);
    // A client that sends without pause: 200 messages waiting, and an edge every turn.
    for n in 0..200 {
        l.stream(key).input.push_back(bad_subscribe(n));
    }
    for turn in 0..20 {
        l.stream(key).output.clear();
        l.step(&[readable(Token(key))]);
        assert!(listed(&l, key) <= 1, "turn {turn}: listed {} times", listed(&l, key));
        let replies = l.stream(key).output.windows(11).filter(|w| w == b"jwt-expired").count();
        assert!(replies <= 4, "turn {turn}: {replies} messages handled, budget 4");
    }
}

#[test]
fn a_flood_of_pings_is_read_within_the_frame_budget() {
    let config = Config {
        max_messages_per_wakeup: 8,
        ..Config::default()
    };
    let mut l = Loop::new(config, None);
    let key = l.subscriber("u", &["r"]);
    let pings: Vec<u8> = (0..1000).flat_map(|_| client_frame(9, b"")).collect();
    l.stream(key).input.push_back(pings);
    l.stream(key).output.clear();
    l.step(&[readable(Token(key))]);
    let pongs = l.stream(key).output.chunks(2).filter(|f| f == &[0x8a, 0]).count();
    assert!(pongs <= 8, "{pongs} pings answered in one turn, budget 8");
    assert_eq!(listed(&l, key), 1, "the rest is read next turn");
    l.settle();
    let pongs = l.stream(key).output.chunks(2).filter(|f| f == &[0x8a, 0]).count();
    assert_eq!(pongs, 1000, "every ping answered in the end");
}

#[test]
fn a_close_buffered_behind_a_refused_message_is_seen_at_once() {
    let mut l = Loop::new(Config::default(), None);
    let key = l.subscriber("u", &["r"]);
    let mut input = client_frame(1, b"not json");
    input.extend(client_frame(8, &1000u16.to_be_bytes()));
    l.stream(key).input.push_back(input);
    l.step(&[readable(Token(key))]);
    assert!(!l.is_open(key), "the peer's Close answered ours in the same turn");
    assert_eq!(l.closes("close_handshake"), 1);
}

/// An event as another instance publishes it.
fn bus_event(repo: &str, n: usize) -> Event {
    let text = json!({"type": "repo-update", "content": {"repo_id": repo, "commit_id": format!("c{n}")}});
    Event {
        kind: Kind::RepoUpdate,
        repo_id: repo.into(),
        audience: Audience::All,
        frame: format!("{text}\n").into(),
        origin: Origin::Bus,
    }
}

#[test]
fn bus_events_are_taken_one_at_a_time_within_pacing_and_all_delivered_in_order() {
    let mut l = Loop::new(Config::default(), None);
    let (bus, inbox) = Bus::for_tests();
    l.server.bus = Some(bus);
    const SUBSCRIBERS: usize = 100;
    const EVENTS: usize = 1000;
    let subs: Vec<usize> = (0..SUBSCRIBERS).map(|_| l.subscriber("u", &["r"])).collect();
    for n in 0..EVENTS {
        inbox.send(bus_event("r", n)).unwrap();
    }
    l.step(&[readable(WAKER)]);
    // 100,000 deliveries arrived at once; a turn takes them only up to the pacing bound
    // (plus the one event that crosses it).
    let pending = l.server.meter.entries();
    assert!(
        pending <= ingest::PACE_ENTRIES + SUBSCRIBERS,
        "{pending} deliveries pending after one turn"
    );
    l.settle();
    for &s in &subs {
        let want: Vec<String> = (0..EVENTS).map(|n| format!("c{n}")).collect();
        assert_eq!(markers(&l.texts(s)), want);
    }
}

#[test]
fn events_released_by_a_group_lookup_are_paced_like_posted_ones() {
    let dir = std::env::temp_dir().join(format!("ns-loop-release-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("groupmgr.db");
    let _ = std::fs::remove_file(&db);
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch(
            "CREATE TABLE GroupUser (group_id INTEGER, user_name VARCHAR(255), is_staff tinyint);
             INSERT INTO GroupUser VALUES (7, 'u', 0);",
        )
        .unwrap();
    let mut l = Loop::new(Config::default(), Some(Backend::Sqlite(db)));
    const SUBSCRIBERS: usize = 100;
    const EVENTS: u32 = 600;
    let subs: Vec<usize> = (0..SUBSCRIBERS).map(|_| l.subscriber("u", &["r"])).collect();
    // A group event holds its library behind the lookup; the updates wait behind it.
    l.post(&group_perm("r", 7, "/g"));
    for n in 0..EVENTS {
        l.post(&update("r", n));
    }
    assert_eq!(l.server.gate.held(), EVENTS as usize + 1);
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while l.server.gate.held() > 0 {
        assert!(Instant::now() < deadline, "the lookup was never answered");
        std::thread::sleep(Duration::from_millis(5));
        l.step(&[readable(WAKER)]);
        peak = peak.max(l.server.meter.entries());
    }
    assert!(
        peak <= ingest::PACE_ENTRIES + SUBSCRIBERS,
        "{peak} deliveries pending in the turn the lookup released 60,100"
    );
    l.settle();
    let mut want = vec!["/g".to_string()];
    want.extend((0..EVENTS).map(|n| format!("c{n}")));
    for &s in &subs {
        assert_eq!(markers(&l.texts(s)), want);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn events_held_for_a_group_lookup_count_in_the_output_budget() {
    // A database that never answers in time: the events stay held.
    let config = Config {
        max_output_bytes: 64 * 1024,
        ..Config::default()
    };
    let mut l = Loop::new(config, Some(Backend::Sqlite("/nonexistent/groupmgr.db".into())));
    let _sub = l.subscriber("u", &["r"]);
    l.post(&group_perm("r", 7, "/g"));
    let padding = "x".repeat(4000);
    let mut posted = 0;
    while l.server.ingest_open() {
        assert!(posted < 100, "64 KiB of held events never closed ingest");
        l.post(&json!({"type": "repo-update", "content": {"repo_id": "r", "commit_id": padding}}));
        posted += 1;
    }
    assert!(l.server.held_for_delivery() >= 64 * 1024);
    assert!(posted <= 17, "{posted} events of 4 KB held under a 64 KiB budget");
}

#[test]
fn the_metrics_listener_is_retried_after_running_out_of_descriptors() {
    let mut l = Loop::new(Config::default(), None);
    let metrics = ScriptedListener::default();
    metrics.emfile_once.set(true);
    metrics
        .waiting
        .borrow_mut()
        .push_back(ScriptedStream::new([b"GET /metrics HTTP/1.1\r\n\r\n".to_vec()]));
    l.server.metrics_listener = Some(metrics);
    l.step(&[readable(METRICS)]);
    assert_eq!(l.server.conns.len(), 0, "EMFILE: nothing accepted");
    // No new edge comes for the scraper that waits in the backlog: the sweep retries.
    l.advance(300);
    assert_eq!(l.server.conns.len(), 1, "accepted at the next tick");
}
