//! Who is subscribed to what and who may see which event (the group database), the state
//! every task shares, and connecting and subscribing a websocket.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, RwLock};
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::{Instant as TInstant, timeout, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::common::{sign, unix_now};
use crate::{OP_TIMEOUT, Opts};

// ---------------------------------------------------------------------------------
// The population and its expectations

/// Who is in which group, as written to the SQLite database.
pub(crate) fn is_member(group: usize, user: usize, groups: usize) -> bool {
    user % groups == group - 1 || (user * 7 + 3) % (groups + 1) == group - 1
}

pub(crate) fn user_name(u: usize) -> String {
    format!("user{u}@chaos.test")
}

/// Writes the seahub-style group table (ccnet's `GroupUser`).
pub(crate) fn write_group_db(path: &Path, users: usize, groups: usize) -> Result<(), String> {
    let c = rusqlite::Connection::open(path).map_err(|e| format!("sqlite {}: {e}", path.display()))?;
    c.execute_batch(
        "CREATE TABLE GroupUser (group_id INTEGER, user_name VARCHAR(255), is_staff tinyint);
         CREATE UNIQUE INDEX groupid_username_indx on GroupUser (group_id, user_name);
         CREATE INDEX username_indx on GroupUser (user_name);",
    )
    .map_err(|e| format!("sqlite: {e}"))?;
    for g in 1..=groups {
        for u in 0..users {
            if is_member(g, u, groups) {
                c.execute(
                    "INSERT INTO GroupUser VALUES (?1, ?2, 0)",
                    rusqlite::params![g as i64, user_name(u)],
                )
                .map_err(|e| format!("sqlite: {e}"))?;
            }
        }
    }
    Ok(())
}

/// One subscription of a steady client: a library and the user whose token made it.
#[derive(Clone, Copy)]
pub(crate) struct Sub {
    pub(crate) lib: usize,
    pub(crate) user: usize,
}

pub(crate) struct ClientSpec {
    pub(crate) instance: usize,
    pub(crate) subs: Vec<Sub>,
}

/// The steady population. Libraries `0..libraries` get ordinary events, `libraries` is
/// the bulk library, `libraries + 1` the quiet one (dead clients only).
pub(crate) fn steady_specs(o: &Opts) -> Vec<ClientSpec> {
    let bulk = o.libraries;
    (0..o.steady)
        .map(|i| {
            let n = 2 + i % 4;
            let mut libs: Vec<usize> = Vec::new();
            let mut j = 0;
            while libs.len() < n {
                let l = (i * 7 + j * 11 + j * j) % o.libraries;
                if !libs.contains(&l) {
                    libs.push(l);
                }
                j += 1;
            }
            if i % 40 == 1 {
                libs.push(bulk);
            }
            let shared = i % 5 == 0;
            let subs = libs
                .iter()
                .enumerate()
                .map(|(j, &lib)| Sub {
                    lib,
                    user: if shared && j % 2 == 1 {
                        (i + 17) % o.users
                    } else {
                        i % o.users
                    },
                })
                .collect();
            ClientSpec { instance: i % 2, subs }
        })
        .collect()
}

/// Who among a library's subscribers an event is for.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Aud {
    All,
    User(usize),
    Group(usize),
}

/// One posted event.
#[derive(Clone, Copy)]
pub(crate) struct Posted {
    pub(crate) lib: usize,
    pub(crate) aud: Aud,
    /// Answered 200.
    pub(crate) ok: bool,
    /// Seconds since the start of the run when it was posted.
    pub(crate) at: f64,
}

pub(crate) fn home(lib: usize) -> usize {
    lib % 2
}

// ---------------------------------------------------------------------------------
// Shared state

/// The key senders and new subscriptions use; its version changes on rotation.
pub(crate) struct Keys {
    pub(crate) current: RwLock<(u32, String)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Run,
    Pause,
    Stop,
}

pub(crate) struct Shared {
    pub(crate) addrs: [SocketAddr; 2],
    pub(crate) lib_ids: Vec<String>,
    pub(crate) users: usize,
    pub(crate) groups: usize,
    pub(crate) keys: Keys,
    pub(crate) t0: Instant,
    /// Every event posted, by sequence number.
    pub(crate) posted: Mutex<Vec<Posted>>,
    pub(crate) stop_posting: AtomicBool,
    pub(crate) post_failures: AtomicU64,
    /// Steady clients confirmed, and received in total (all deliveries, for the waits).
    pub(crate) confirmed: AtomicUsize,
    pub(crate) received: AtomicU64,
    pub(crate) steady_errors: AtomicU64,
    pub(crate) churn: AtomicU64,
    pub(crate) churn_by_method: [AtomicU64; 4],
    pub(crate) churn_bad_token: AtomicU64,
    pub(crate) churn_events: AtomicU64,
    pub(crate) churn_errors: AtomicU64,
    pub(crate) slow_cycles: AtomicU64,
    /// Slow clients that found themselves closed by the server (their ping failed).
    pub(crate) slow_closed: AtomicU64,
    pub(crate) dead_cycles: AtomicU64,
    pub(crate) side_errors: AtomicU64,
    pub(crate) paused: AtomicUsize,
    pub(crate) first_errors: Mutex<Vec<String>>,
    pub(crate) next_probe: AtomicU64,
}

impl Shared {
    pub(crate) fn error(&self, counter: &AtomicU64, msg: String) {
        counter.fetch_add(1, Relaxed);
        let mut v = self.first_errors.lock().unwrap();
        if v.len() < 20 {
            eprintln!("[chaos] error: {msg}");
            v.push(msg);
        }
    }

    pub(crate) fn key(&self) -> String {
        self.keys.current.read().unwrap().1.clone()
    }

    pub(crate) fn client_token(&self, lib: usize, user: usize, key: &str) -> String {
        sign(
            key,
            &json!({"repo_id": self.lib_ids[lib], "username": user_name(user), "exp": unix_now() + 7200}),
        )
    }

    pub(crate) fn probe(&self) -> String {
        format!("probe-{}", self.next_probe.fetch_add(1, Relaxed))
    }

    pub(crate) fn secs(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }
}

pub(crate) fn subscribe_msg(repos: &[(&str, &str)]) -> String {
    let list: Vec<Value> = repos.iter().map(|(id, t)| json!({"id": id, "jwt_token": t})).collect();
    json!({"type": "subscribe", "content": {"repos": list}}).to_string()
}

pub(crate) fn unsubscribe_msg(repos: &[&str]) -> String {
    let list: Vec<Value> = repos.iter().map(|id| json!({"id": id})).collect();
    json!({"type": "unsubscribe", "content": {"repos": list}}).to_string()
}

pub(crate) type Ws = WebSocketStream<TcpStream>;

pub(crate) async fn handshake(stream: TcpStream, addr: SocketAddr) -> Result<Ws, String> {
    let _ = stream.set_nodelay(true);
    let cfg = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let url = format!("ws://{addr}/");
    let (ws, _) = tokio_tungstenite::client_async_with_config(url.as_str(), stream, Some(cfg))
        .await
        .map_err(|e| format!("websocket handshake: {e}"))?;
    Ok(ws)
}

pub(crate) async fn connect_ws(addr: SocketAddr) -> Result<Ws, String> {
    let stream = timeout(OP_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    timeout(OP_TIMEOUT, handshake(stream, addr))
        .await
        .map_err(|_| "handshake timed out".to_string())?
}

/// Sends `subscribe` and a sync probe, and reads until the probe is answered; anything
/// else on the way is handed to `other`. Returns false on failure (with the reason).
pub(crate) async fn subscribe_and_sync(
    ws: &mut Ws,
    sh: &Shared,
    pairs: &[(&str, &str)],
    mut other: impl FnMut(&str) -> Result<(), String>,
) -> Result<(), String> {
    let probe = sh.probe();
    for msg in [subscribe_msg(pairs), subscribe_msg(&[(&probe, "bad")])] {
        timeout(OP_TIMEOUT, ws.send(Message::text(msg)))
            .await
            .map_err(|_| "send timed out".to_string())?
            .map_err(|e| format!("send: {e}"))?;
    }
    let until = TInstant::now() + OP_TIMEOUT;
    loop {
        match timeout_at(until, ws.next()).await {
            Err(_) => return Err("no answer to the sync probe".into()),
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                if v["type"] == "jwt-expired" && v["content"]["repo_id"] == probe.as_str() {
                    return Ok(());
                }
                other(t.as_str())?;
            }
            Ok(Some(Ok(Message::Close(f)))) => return Err(format!("closed by the server: {f:?}")),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Err(format!("{e}")),
            Ok(None) => return Err("connection ended".into()),
        }
    }
}
