//! The state shared by the steady subscribers, the churners and the poster: close methods,
//! error kinds, counters and the websocket helpers.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};

use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

// ---------------------------------------------------------------------------------
// Shared run state

/// The ways a churn connection ends, in rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CloseMethod {
    CloseFrame,
    Fin,
    UnsubscribeClose,
    Reset,
}

pub(crate) const METHODS: [CloseMethod; 4] = [
    CloseMethod::CloseFrame,
    CloseMethod::Fin,
    CloseMethod::UnsubscribeClose,
    CloseMethod::Reset,
];

impl CloseMethod {
    pub(crate) fn parse(name: &str) -> Option<CloseMethod> {
        METHODS.into_iter().find(|m| m.name() == name)
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            CloseMethod::CloseFrame => "close_frame",
            CloseMethod::Fin => "fin",
            CloseMethod::UnsubscribeClose => "unsubscribe_close",
            CloseMethod::Reset => "reset",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum ErrKind {
    /// TCP connect or websocket handshake failed or timed out.
    Connect,
    /// A bad token or a sync probe was not answered with `jwt-expired` in time.
    JwtExpiredMissing,
    /// A message that should not have come (wrong type or repo, bad JSON, binary).
    UnexpectedMessage,
    /// No Close echo, a wrong echo code, or the TCP connection stayed open after it.
    CloseHandshake,
    /// The server did not close the socket after our FIN.
    FinNotClosed,
    /// An event for a repo after the server confirmed the unsubscribe.
    EventAfterUnsubscribe,
    /// Writing a frame failed, or the server closed a churn connection on its own.
    Send,
    /// A steady subscriber's connection failed or ended.
    SteadyClosed,
    /// `POST /events` failed or was not answered 200.
    Http,
}

/// Every kind with its name, in declaration order (counters are indexed `kind as usize`).
pub(crate) const ERR_KINDS: [(ErrKind, &str); 9] = [
    (ErrKind::Connect, "connect"),
    (ErrKind::JwtExpiredMissing, "jwt_expired_missing"),
    (ErrKind::UnexpectedMessage, "unexpected_message"),
    (ErrKind::CloseHandshake, "close_handshake"),
    (ErrKind::FinNotClosed, "fin_not_closed"),
    (ErrKind::EventAfterUnsubscribe, "event_after_unsubscribe"),
    (ErrKind::Send, "send"),
    (ErrKind::SteadyClosed, "steady_closed"),
    (ErrKind::Http, "http"),
];

/// Churn phases, driven by the main task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Run,
    Pause,
    Stop,
}

pub(crate) struct Shared {
    pub(crate) addr: SocketAddr,
    /// The close methods in rotation (all four unless `--methods` says otherwise).
    pub(crate) methods: Vec<CloseMethod>,
    pub(crate) url: String,
    pub(crate) repo_ids: Vec<String>,
    /// A valid client token per repo (the churners all use the same user).
    pub(crate) good_tokens: Vec<String>,
    /// Per repo, four bad tokens: wrong key, expired, signed for another repo, not a JWT.
    pub(crate) bad_tokens: Vec<[String; 4]>,
    pub(crate) event_token: String,
    /// Steady subscribers per repo.
    pub(crate) repo_subscribers: Vec<u64>,
    /// Churn connections started; also numbers them.
    pub(crate) next_conn: AtomicU64,
    /// Makes every sync probe id unique.
    pub(crate) next_probe: AtomicU64,
    /// Churn connections per close method (indexed `method as usize`).
    pub(crate) by_method: [AtomicU64; 4],
    pub(crate) bad_token_conns: AtomicU64,
    pub(crate) churn_events: AtomicU64,
    pub(crate) fin_reset: AtomicU64,
    pub(crate) errors: [AtomicU64; ERR_KINDS.len()],
    pub(crate) errors_by_method: [AtomicU64; 4],
    pub(crate) first_errors: Mutex<Vec<String>>,
    /// Steady subscribers that confirmed their subscriptions.
    pub(crate) confirmed: AtomicUsize,
    /// Churners waiting in `Phase::Pause`.
    pub(crate) paused: AtomicUsize,
    /// Distinct deliveries to steady subscribers, and what the 200-answered posts expect.
    pub(crate) delivered: AtomicU64,
    pub(crate) expected: AtomicU64,
    /// Per event k: whether its POST was answered 200.
    pub(crate) posted_ok: Mutex<Vec<bool>>,
    pub(crate) stop_posting: AtomicBool,
    /// How far behind its schedule the poster fell, at most.
    pub(crate) post_lag_max_ms: AtomicU64,
}

impl Shared {
    pub(crate) fn error(&self, kind: ErrKind, method: Option<CloseMethod>, msg: String) {
        self.errors[kind as usize].fetch_add(1, Relaxed);
        if let Some(m) = method {
            self.errors_by_method[m as usize].fetch_add(1, Relaxed);
        }
        let msg = match method {
            Some(m) => format!("[{}] {msg}", m.name()),
            None => msg,
        };
        let mut v = self.first_errors.lock().unwrap();
        if v.len() < 12 && !v.contains(&msg) {
            eprintln!("[soak] error: {msg}");
            v.push(msg);
        }
    }

    pub(crate) fn error_total(&self) -> u64 {
        self.errors.iter().map(|e| e.load(Relaxed)).sum()
    }

    pub(crate) fn probe(&self) -> String {
        format!("probe-{}", self.next_probe.fetch_add(1, Relaxed))
    }
}

pub(crate) fn subscribe_msg(repos: &[(&str, &str)]) -> String {
    let list: Vec<Value> = repos.iter().map(|(id, t)| json!({"id": id, "jwt_token": t})).collect();
    json!({"type": "subscribe", "content": {"repos": list}}).to_string()
}

/// The sync probe: a subscription with a bad token, answered with `jwt-expired`.
pub(crate) fn probe_msg(probe: &str) -> String {
    subscribe_msg(&[(probe, "bad")])
}

pub(crate) fn unsubscribe_msg(repos: &[&str]) -> String {
    let list: Vec<Value> = repos.iter().map(|id| json!({"id": id})).collect();
    json!({"type": "unsubscribe", "content": {"repos": list}}).to_string()
}

pub(crate) type Ws = WebSocketStream<TcpStream>;

pub(crate) async fn connect_ws(sh: &Shared) -> Result<Ws, String> {
    let stream = TcpStream::connect(sh.addr).await.map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let cfg = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::client_async_with_config(sh.url.as_str(), stream, Some(cfg))
        .await
        .map_err(|e| format!("websocket handshake: {e}"))?;
    Ok(ws)
}

/// The sequence number an event carries in its `commit_id`.
pub(crate) fn event_seq(v: &Value) -> Option<u64> {
    u64::from_str_radix(v["content"]["commit_id"].as_str()?, 16).ok()
}
