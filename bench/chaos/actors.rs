//! The tasks that make the mix: steady clients, churn, slow and dead clients, and the
//! poster.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::watch;
use tokio::time::{Instant as TInstant, sleep, sleep_until, timeout, timeout_at};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::common::{Http, Resp, Rng, sign, unix_now};
use crate::population::{
    Aud, ClientSpec, Phase, Posted, Shared, Ws, connect_ws, handshake, home, subscribe_and_sync, unsubscribe_msg,
    user_name,
};
use crate::{BULK_PAD, OP_TIMEOUT, Opts, SETUP_DEADLINE};

// ---------------------------------------------------------------------------------
// Steady clients

/// What a steady client received: per subscription, the sequence numbers in arrival order.
pub(crate) struct Received {
    pub(crate) per_sub: Vec<Vec<u32>>,
}

pub(crate) async fn steady_task(
    i: usize,
    spec: Arc<Vec<ClientSpec>>,
    sh: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Received {
    let me = &spec[i];
    let mut got = Received {
        per_sub: vec![Vec::new(); me.subs.len()],
    };
    let key = sh.key();
    let tokens: Vec<String> = me.subs.iter().map(|s| sh.client_token(s.lib, s.user, &key)).collect();
    let pairs: Vec<(&str, &str)> = me
        .subs
        .iter()
        .zip(&tokens)
        .map(|(s, t)| (sh.lib_ids[s.lib].as_str(), t.as_str()))
        .collect();
    let addr = sh.addrs[me.instance];
    let setup = async {
        let mut ws = connect_ws(addr).await?;
        // Nothing is posted before every steady client is confirmed.
        subscribe_and_sync(&mut ws, &sh, &pairs, |t| {
            Err(format!("unexpected before confirmation: {t}"))
        })
        .await?;
        Ok::<Ws, String>(ws)
    };
    let mut ws = match timeout(SETUP_DEADLINE, setup).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            sh.error(&sh.steady_errors, format!("steady {i}: {e}"));
            return got;
        }
        Err(_) => {
            sh.error(&sh.steady_errors, format!("steady {i}: setup timed out"));
            return got;
        }
    };
    sh.confirmed.fetch_add(1, Relaxed);
    let index: HashMap<&str, usize> = me
        .subs
        .iter()
        .enumerate()
        .map(|(j, s)| (sh.lib_ids[s.lib].as_str(), j))
        .collect();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    let repo = v["content"]["repo_id"].as_str().unwrap_or_default();
                    match (index.get(repo), v["content"]["chaos_seq"].as_u64()) {
                        (Some(&j), Some(seq)) => {
                            got.per_sub[j].push(seq as u32);
                            sh.received.fetch_add(1, Relaxed);
                        }
                        _ => sh.error(&sh.steady_errors, format!("steady {i}: unexpected message {t}")),
                    }
                }
                Some(Ok(Message::Binary(_))) => sh.error(&sh.steady_errors, format!("steady {i}: binary frame")),
                Some(Ok(Message::Close(f))) => {
                    sh.error(&sh.steady_errors, format!("steady {i}: closed by the server: {f:?}"));
                    return got;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    sh.error(&sh.steady_errors, format!("steady {i}: {e}"));
                    return got;
                }
                None => {
                    sh.error(&sh.steady_errors, format!("steady {i}: connection ended"));
                    return got;
                }
            }
        }
    }
    let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
    got
}

// ---------------------------------------------------------------------------------
// Churn

pub(crate) const METHOD_NAMES: [&str; 4] = ["close_frame", "fin", "unsubscribe_close", "reset"];

/// Close frame, then the echo, then the server's TCP close.
pub(crate) async fn close_handshake(ws: &mut Ws) -> Result<(), String> {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    timeout(OP_TIMEOUT, ws.close(Some(frame)))
        .await
        .map_err(|_| "send close timed out".to_string())?
        .map_err(|e| format!("send close: {e}"))?;
    let until = TInstant::now() + OP_TIMEOUT;
    let mut echo = false;
    loop {
        match timeout_at(until, ws.next()).await {
            Err(_) if echo => return Err("TCP still open after the close echo".into()),
            Err(_) => return Err("no close echo".into()),
            Ok(Some(Ok(Message::Close(_)))) => echo = true,
            Ok(Some(Ok(_))) => {}
            Ok(None) if echo => return Ok(()),
            Ok(None) => return Err("ended without a close echo".into()),
            Ok(Some(Err(e))) if echo => return Err(format!("{e} after the close echo")),
            Ok(Some(Err(e))) => return Err(format!("{e} before the close echo")),
        }
    }
}

/// shutdown(write) without a Close frame, then read until the server closes.
pub(crate) async fn fin(ws: &mut Ws) -> Result<(), String> {
    let s = ws.get_mut();
    s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let mut buf = [0u8; 4096];
    let until = TInstant::now() + OP_TIMEOUT;
    loop {
        match timeout_at(until, s.read(&mut buf)).await {
            Ok(Ok(0)) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
            Ok(Err(e)) => return Err(format!("read after FIN: {e}")),
            Err(_) => return Err("server kept the socket open after FIN".into()),
        }
    }
}

pub(crate) async fn churn_once(sh: &Shared, n: u64, rng: &mut Rng) -> Result<(), String> {
    let method = (n % 4) as usize;
    sh.churn_by_method[method].fetch_add(1, Relaxed);
    let bad = (n / 4) % 10 == 3;
    if bad {
        sh.churn_bad_token.fetch_add(1, Relaxed);
    }
    let libs = sh.lib_ids.len() - 2;
    let mut repos: Vec<usize> = Vec::new();
    for _ in 0..1 + rng.below(3) {
        let r = rng.below(libs);
        if !repos.contains(&r) {
            repos.push(r);
        }
    }
    let key = if bad { "not-the-key".to_string() } else { sh.key() };
    let tokens: Vec<String> = repos
        .iter()
        .map(|&r| sh.client_token(r, rng.below(sh.users), &key))
        .collect();
    let pairs: Vec<(&str, &str)> = repos
        .iter()
        .zip(&tokens)
        .map(|(&r, t)| (sh.lib_ids[r].as_str(), t.as_str()))
        .collect();
    let mut ws = connect_ws(sh.addrs[(n / 2 % 2) as usize]).await?;
    // Bad tokens are answered with `jwt-expired`, in order, before the probe's answer.
    let owed: Mutex<Vec<String>> = Mutex::new(if bad {
        repos.iter().map(|&r| sh.lib_ids[r].clone()).collect()
    } else {
        Vec::new()
    });
    let events = AtomicU64::new(0);
    let check = |t: &str| -> Result<(), String> {
        let v: Value = serde_json::from_str(t).map_err(|_| format!("bad JSON {t:?}"))?;
        let id = v["content"]["repo_id"].as_str().unwrap_or_default();
        let mut owed = owed.lock().unwrap();
        if v["type"] == "jwt-expired" && owed.first().is_some_and(|o| o == id) {
            owed.remove(0);
            Ok(())
        } else if !bad && v["content"]["chaos_seq"].is_u64() && repos.iter().any(|&r| sh.lib_ids[r] == id) {
            events.fetch_add(1, Relaxed);
            Ok(())
        } else {
            Err(format!("unexpected message {t}"))
        }
    };
    subscribe_and_sync(&mut ws, sh, &pairs, &check).await?;
    if !owed.lock().unwrap().is_empty() {
        return Err(format!("no jwt-expired for {:?}", owed.lock().unwrap()));
    }
    // Linger up to 50 ms reading what comes.
    let until = TInstant::now() + Duration::from_millis(rng.below(50) as u64);
    while let Ok(m) = timeout_at(until, ws.next()).await {
        match m {
            Some(Ok(Message::Text(t))) => check(t.as_str())?,
            Some(Ok(_)) => {}
            other => return Err(format!("while lingering: {other:?}")),
        }
    }
    sh.churn_events.fetch_add(events.load(Relaxed), Relaxed);
    match method {
        0 => close_handshake(&mut ws).await,
        1 => fin(&mut ws).await,
        2 => {
            let ids: Vec<&str> = repos.iter().map(|&r| sh.lib_ids[r].as_str()).collect();
            timeout(OP_TIMEOUT, ws.send(Message::text(unsubscribe_msg(&ids))))
                .await
                .map_err(|_| "send timed out".to_string())?
                .map_err(|e| format!("send unsubscribe: {e}"))?;
            close_handshake(&mut ws).await
        }
        _ => {
            ws.get_ref().set_zero_linger().map_err(|e| format!("SO_LINGER: {e}"))?;
            drop(ws);
            Ok(())
        }
    }
}

/// Waits while paused; returns false when told to stop.
pub(crate) async fn run_or_wait(sh: &Shared, phase: &mut watch::Receiver<Phase>) -> bool {
    loop {
        let p = *phase.borrow_and_update();
        match p {
            Phase::Run => return true,
            Phase::Stop => return false,
            Phase::Pause => {
                sh.paused.fetch_add(1, Relaxed);
                let changed = phase.changed().await;
                sh.paused.fetch_sub(1, Relaxed);
                if changed.is_err() {
                    return false;
                }
            }
        }
    }
}

pub(crate) async fn churner(id: usize, sh: Arc<Shared>, mut phase: watch::Receiver<Phase>) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((id as u64 + 1) << 17));
    while run_or_wait(&sh, &mut phase).await {
        let n = sh.churn.fetch_add(1, Relaxed);
        if let Err(e) = churn_once(&sh, n, &mut rng).await {
            sh.error(
                &sh.churn_errors,
                format!("churn {n} ({}): {e}", METHOD_NAMES[(n % 4) as usize]),
            );
        }
        // A moment between connections: churn, not a connect flood.
        sleep(Duration::from_millis(rng.below(40) as u64)).await;
    }
}

// ---------------------------------------------------------------------------------
// Slow and dead clients

/// A client that subscribes, confirms, then never reads again: with `slow`, on the bulk
/// library through a 4 KiB receive buffer (falls behind), else on the quiet library
/// (answers no ping). Held for `hold`, or until paused, then reset.
pub(crate) async fn misbehave_once(
    sh: &Shared,
    id: usize,
    slow: bool,
    hold: Duration,
    phase: &mut watch::Receiver<Phase>,
) -> Result<(), String> {
    let addr = sh.addrs[id % 2];
    let lib = if slow {
        sh.lib_ids.len() - 2
    } else {
        sh.lib_ids.len() - 1
    };
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    if slow {
        socket
            .set_recv_buffer_size(4096)
            .map_err(|e| format!("SO_RCVBUF: {e}"))?;
    }
    let stream = timeout(OP_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let mut ws = timeout(OP_TIMEOUT, handshake(stream, addr))
        .await
        .map_err(|_| "handshake timed out".to_string())??;
    let token = sh.client_token(lib, id % sh.users, &sh.key());
    subscribe_and_sync(&mut ws, sh, &[(sh.lib_ids[lib].as_str(), token.as_str())], |_| Ok(())).await?;
    // From here on nothing is read. A slow client still sends a ping every second, so
    // the server hears from it and it is not a pong timeout but a slow consumer: its
    // output piles up until the server closes it, which the next ping notices.
    let until = TInstant::now() + hold;
    if slow {
        loop {
            if timeout_at(until.min(TInstant::now() + Duration::from_secs(1)), phase.changed())
                .await
                .is_ok()
                || TInstant::now() >= until
            {
                break;
            }
            let ping = timeout(OP_TIMEOUT, ws.send(Message::Ping(Vec::new().into()))).await;
            if !matches!(ping, Ok(Ok(()))) {
                sh.slow_closed.fetch_add(1, Relaxed);
                break;
            }
        }
    } else {
        let _ = timeout_at(until, phase.changed()).await;
    }
    let _ = ws.get_ref().set_zero_linger();
    Ok(())
}

pub(crate) async fn misbehaver(id: usize, slow: bool, sh: Arc<Shared>, mut phase: watch::Receiver<Phase>) {
    let mut rng = Rng(0x51ed_2701_4f6c_dd1d ^ ((id as u64 + 1) << 23) ^ slow as u64);
    while run_or_wait(&sh, &mut phase).await {
        let hold = if slow {
            Duration::from_secs(30 + rng.below(61) as u64)
        } else {
            Duration::from_secs(10 + rng.below(21) as u64)
        };
        let counter = if slow { &sh.slow_cycles } else { &sh.dead_cycles };
        counter.fetch_add(1, Relaxed);
        if let Err(e) = misbehave_once(&sh, id, slow, hold, &mut phase).await {
            let what = if slow { "slow" } else { "dead" };
            sh.error(&sh.side_errors, format!("{what} client {id}: {e}"));
            sleep(Duration::from_secs(1)).await;
        }
    }
}

// ---------------------------------------------------------------------------------
// Poster

pub(crate) fn spawn_poster(sh: Arc<Shared>, o: Opts, sched_burst_every: f64) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("poster".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("poster runtime");
            rt.block_on(poster(sh, o, sched_burst_every));
        })
        .expect("spawn poster thread")
}

/// Builds event `k`: library, audience and body.
pub(crate) fn make_event(k: u64, rng: &mut Rng, sh: &Shared) -> (usize, Aud, String) {
    let libs = sh.lib_ids.len() - 2;
    let bulk = rng.below(8) == 0;
    let lib = if bulk { libs } else { rng.below(libs) };
    let repo = &sh.lib_ids[lib];
    let roll = rng.below(100);
    let (aud, body) = if bulk {
        let pad = "x".repeat(BULK_PAD);
        (
            Aud::All,
            json!({"type": "comment-update", "content": {"repo_id": repo, "type": "comment_updated",
                "file_uuid": format!("{k:032x}"), "file_path": "/bulk.md", "pad": pad, "chaos_seq": k}}),
        )
    } else if roll < 50 {
        (
            Aud::All,
            json!({"type": "repo-update", "content": {"repo_id": repo, "commit_id": format!("{k:040x}"), "chaos_seq": k}}),
        )
    } else if roll < 65 {
        (
            Aud::All,
            json!({"type": "file-lock-changed", "content": {"repo_id": repo, "path": format!("/doc-{k}.docx"),
                "change_event": "locked", "lock_user": user_name(rng.below(sh.users)), "expire": 0, "chaos_seq": k}}),
        )
    } else if roll < 80 {
        (
            Aud::All,
            json!({"type": "comment-update", "content": {"repo_id": repo, "type": "comment_updated",
                "file_uuid": format!("{k:032x}"), "file_path": format!("/notes-{k}.md"), "chaos_seq": k}}),
        )
    } else if roll < 88 {
        let u = rng.below(sh.users);
        (
            Aud::User(u),
            json!({"type": "folder-perm-changed", "content": {"repo_id": repo, "path": "/shared", "type": "user",
                "change_event": "add", "user": user_name(u), "group": -1, "perm": "rw", "chaos_seq": k}}),
        )
    } else if roll < 96 {
        let g = 1 + rng.below(sh.groups);
        (
            Aud::Group(g),
            json!({"type": "folder-perm-changed", "content": {"repo_id": repo, "path": "/team", "type": "group",
                "change_event": "modify", "user": "", "group": g, "perm": "r", "chaos_seq": k}}),
        )
    } else {
        (
            Aud::All,
            json!({"type": "folder-perm-changed", "content": {"repo_id": repo, "path": "/all", "type": "group",
                "change_event": "del", "user": "", "group": -1, "perm": "r", "chaos_seq": k}}),
        )
    };
    (lib, aud, body.to_string())
}

/// Posts events at `rate` per second, and `burst` back to back every `burst_every`
/// seconds, each to its library's home instance, one at a time, until told to stop.
pub(crate) async fn poster(sh: Arc<Shared>, o: Opts, burst_every: f64) {
    let mut http = [Http::new(sh.addrs[0]), Http::new(sh.addrs[1])];
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut token = (u32::MAX, String::new(), Instant::now());
    let mut base = TInstant::now();
    let mut paced = 0u64;
    let mut next_burst = burst_every;
    let mut burst_left = 0usize;
    for k in 0u64.. {
        if burst_left == 0 {
            if sh.secs() >= next_burst {
                burst_left = o.burst;
                next_burst += burst_every;
            } else {
                paced += 1;
                sleep_until(base + Duration::from_secs_f64(paced as f64 / o.rate)).await;
            }
        }
        if burst_left > 0 {
            burst_left -= 1;
            if burst_left == 0 {
                // Pacing resumes from now instead of catching up.
                base = TInstant::now();
                paced = 0;
            }
        }
        if sh.stop_posting.load(Relaxed) {
            break;
        }
        let (version, key) = sh.keys.current.read().unwrap().clone();
        if token.0 != version || token.2.elapsed() > Duration::from_secs(60) {
            token = (version, sign(&key, &json!({"exp": unix_now() + 300})), Instant::now());
        }
        let (lib, aud, body) = make_event(k, &mut rng, &sh);
        let at = sh.secs();
        let ok = match http[home(lib)]
            .request("POST", "/events", Some(&token.1), body.as_bytes())
            .await
        {
            Ok(Resp { status: 200, .. }) => true,
            Ok(Resp { status, body: b }) => {
                let msg = format!("POST /events -> {status} {}", String::from_utf8_lossy(&b));
                sh.error(&sh.post_failures, msg);
                false
            }
            Err(e) => {
                sh.error(&sh.post_failures, format!("POST /events: {e}"));
                false
            }
        };
        sh.posted.lock().unwrap().push(Posted { lib, aud, ok, at });
    }
}
