//! Soak ("churn") benchmark for the notification server.
//!
//! # Running
//!
//! ```text
//! cargo bench --bench soak -- [--seconds 60] [--steady 200] [--churners 50] [--rate 100]
//!                             [--warmup S] [--methods close_frame,fin,unsubscribe_close,reset]
//!                             [--log-level warn] [--server-bin PATH]
//! ```
//!
//! Without `--server-bin` the program runs `cargo build --release --bin
//! notification-server` first.  It starts the server itself with a temporary config dir
//! (`host = 127.0.0.1`, `port = 0`, a random key, `log_level = warn` so that logging
//! does not distort RSS) and kills it afterwards.  At `warn` the server does not log its
//! `listening on ADDR` line, so the port is found from the process's listening socket
//! in /proc (the log line is used when it does appear, e.g. with `--log-level info`).
//!
//! # What runs
//!
//! - `--steady S` subscribers, each a websocket subscribed to 3 of S repos (repo i, i+1,
//!   i+2, so every repo has 3 subscribers), confirmed with the sync probe (a subscribe
//!   with a bad token is answered with `jwt-expired` in order, proving everything before
//!   it was processed).  They read every message for the whole run.
//! - A poster posting `repo-update` events at `--rate` per second over one keep-alive
//!   HTTP connection (`POST /events`, `Authorization: Token <jwt with only exp>`),
//!   round-robin over the S repos; event k goes to repo k % S and carries k in its
//!   `commit_id` (40 hex digits).  One sequential poster, so per repo the order is fixed.
//! - `--churners C` tasks, each looping: connect a websocket, subscribe to 1-3 random
//!   repos, maybe confirm and linger a few ms reading, then close in one of four ways in
//!   rotation (connection number n, method n % 4; `--methods` restricts the rotation,
//!   to tell which method causes a problem):
//!   1. `close_frame`: a Close frame (1000); the echo (same code) and then the server's
//!      TCP close must follow;
//!   2. `fin`: shutdown(write) without a Close frame, then read until the server closes;
//!   3. `unsubscribe_close`: `unsubscribe` for its repos (on every other such connection
//!      followed by a sync probe: after its answer no event for those repos may arrive),
//!      then as 1;
//!   4. `reset`: SO_LINGER {on, 0} and drop, so the kernel sends a RST.
//!
//!   One connection in ten (blocks of one connection per method in rotation, so every
//!   close method gets its share) subscribes with bad tokens only (wrong key, expired, signed for another
//!   repo, or not a JWT) and must get `jwt-expired` for each repo, in order.
//!
//! Churn runs `--seconds` in total.  After `--warmup` seconds (default 1/6 of the run)
//! churn pauses, the in-flight connections finish, the RSS settles and is read
//! (`rss_warm_kb`), and churn resumes: the warm reading is thus taken in the same state
//! as the final one (only the steady subscribers connected), with the allocator's pools
//! already filled by churn.  At the end churn and posting stop, the program waits until
//! every steady subscriber has every event of its repos (or a deadline passes), lets the
//! RSS settle (two equal consecutive readings, at most 3 s) and reads `rss_end_kb`.
//!
//! # Output: one JSON object on stdout (progress on stderr)
//!
//! - `seconds`, `steady`, `churners`, `rate`, `methods`: the parameters.
//! - `churn_connections` (total), `churn_per_s`, `closed_by` {close_frame, fin,
//!   unsubscribe_close, reset}, `bad_token_connections`, `churn_events_received` (events
//!   the churn connections got for their repos), `fin_answered_with_reset` (the server
//!   answered our FIN with a RST: noted, not an error).
//! - `errors` (total), `error_kinds` (connect, jwt_expired_missing, unexpected_message,
//!   close_handshake, fin_not_closed, event_after_unsubscribe, send, steady_closed,
//!   http; only the non-zero ones), `errors_by_method` (those on churn connections),
//!   `first_errors` (a few messages).
//! - `events_posted` (answered 200), `post_lag_max_ms` (how far the poster fell behind
//!   its schedule; it catches up by posting back to back), `expected_deliveries` (those times the steady
//!   subscribers of their repo), `delivered` (distinct), `lost`, `duplicates`,
//!   `out_of_order` (an event older than one already received for the same repo).
//! - `rss_start_kb` (before churn), `rss_warm_kb`, `rss_end_kb`, `rss_drift_kb` (end -
//!   warm), `rss_series_kb` ([seconds since churn start, VmRSS] every 5 s, to tell a
//!   one-off step from a steady climb).
//! - `server_log_warnings`, `server_log_errors`, `server_log_first` (the first few such
//!   lines), `problems` (why the verdict is fail), `verdict`: "fail" when lost > 0,
//!   errors > 0, |drift| > 1024 KiB, deliveries did not complete or the server died,
//!   else "pass".
//!
//! Exit status 0 on pass, 1 on fail, 2 when the server cannot be built or started or
//! the arguments are bad.
//!
//! Every wait has a deadline, the run stops by itself, and all traffic is on 127.0.0.1.

#[path = "common/mod.rs"]
mod common;

use common::{
    Fields, FindAddr, HTTP_TIMEOUT, Http, Resp, Rng, RssSettle, ServerProcess, ServerSpec, num, parse_flags,
    raise_nofile_limit, random_key, rss_kb, settle_rss, sign, unix_now,
};
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant as TInstant, sleep, sleep_until, timeout, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Any single step of a churn connection (connect, an answer, a close) may take this long.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Connecting and confirming all steady subscribers.
const SETUP_DEADLINE: Duration = Duration::from_secs(60);
/// After posting stopped, how long the steady subscribers may take to get everything.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(20);
/// How long the churners may take to finish their current connection (pause, stop).
const QUIESCE_DEADLINE: Duration = Duration::from_secs(30);
/// Repos per steady subscriber.
const STEADY_REPOS: usize = 3;
/// Allowed |RSS drift|.
const MAX_DRIFT_KB: i64 = 1024;
/// RSS once it stopped moving: two equal consecutive readings 200 ms apart, or the last
/// reading after 3 s.
const RSS_SETTLE: RssSettle = RssSettle {
    every: Duration::from_millis(200),
    readings: 1,
    at_most: Duration::from_secs(3),
};

// ---------------------------------------------------------------------------------
// Options

#[derive(Clone, Debug)]
struct Opts {
    seconds: f64,
    steady: usize,
    churners: usize,
    rate: f64,
    warmup: Option<f64>,
    methods: Vec<CloseMethod>,
    log_level: String,
    server_bin: Option<PathBuf>,
}

const USAGE: &str = "usage: cargo bench --bench soak -- [--seconds 60] [--steady 200] [--churners 50] \
[--rate 100] [--warmup S] [--methods close_frame,fin,unsubscribe_close,reset] [--log-level warn] \
[--server-bin PATH]  (see the doc comment of bench/soak.rs)";

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        seconds: 60.0,
        steady: 200,
        churners: 50,
        rate: 100.0,
        warmup: None,
        methods: METHODS.to_vec(),
        log_level: "warn".into(),
        server_bin: None,
    };
    parse_flags(USAGE, |flag, value| {
        match flag {
            "--seconds" => o.seconds = num(flag, &value()?)?,
            "--steady" => o.steady = num(flag, &value()?)?,
            "--churners" => o.churners = num(flag, &value()?)?,
            "--rate" => o.rate = num(flag, &value()?)?,
            "--warmup" => o.warmup = Some(num(flag, &value()?)?),
            "--methods" => {
                o.methods = value()?
                    .split(',')
                    .map(|m| CloseMethod::parse(m.trim()).ok_or_else(|| format!("unknown close method {m}")))
                    .collect::<Result<_, _>>()?;
            }
            "--log-level" => o.log_level = value()?,
            "--server-bin" => o.server_bin = Some(PathBuf::from(value()?)),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if !(o.seconds.is_finite() && o.seconds > 0.0 && o.rate.is_finite() && o.rate > 0.0) {
        return Err("--seconds and --rate must be positive".into());
    }
    if o.steady == 0 || o.churners == 0 || o.methods.is_empty() {
        return Err("--steady and --churners must be positive".into());
    }
    if let Some(w) = o.warmup
        && !(w.is_finite() && w >= 0.0 && w < o.seconds)
    {
        return Err("--warmup must be in [0, --seconds)".into());
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------
// Server process

/// Starts the server with a temporary config dir; at `warn` it does not log its
/// `listening on ADDR` line, so the port is also looked for in /proc.
fn start_server(bin: &Path, log_level: &str, key: &str) -> Result<ServerProcess, String> {
    let conf =
        format!("[notification]\nhost = 127.0.0.1\nport = 0\nlog_level = {log_level}\njwt_private_key = {key}\n");
    ServerProcess::start(ServerSpec {
        files: vec![("seafile.conf".into(), conf)],
        find_addr: FindAddr::LogLineOrProc,
        start_timeout: Duration::from_secs(30),
        ..ServerSpec::new(bin, format!("nssoak-{}", std::process::id()))
    })
}

/// Builds the server in release mode and returns the executable's path.
fn build_server() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest_dir = env!("CARGO_MANIFEST_DIR");
    eprintln!("[soak] cargo build --release --bin notification-server");
    let out = Command::new(cargo)
        .current_dir(manifest_dir)
        .args(["build", "--release", "--bin", "notification-server"])
        .arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo build failed: {}", out.status));
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact"
            && v["target"]["name"] == "notification-server"
            && let Some(exe) = v["executable"].as_str()
        {
            return Ok(PathBuf::from(exe));
        }
    }
    let fallback = PathBuf::from(manifest_dir).join("target/release/notification-server");
    if fallback.exists() {
        Ok(fallback)
    } else {
        Err("built binary not found".into())
    }
}

// ---------------------------------------------------------------------------------
// Shared run state

/// The ways a churn connection ends, in rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CloseMethod {
    CloseFrame,
    Fin,
    UnsubscribeClose,
    Reset,
}

const METHODS: [CloseMethod; 4] = [
    CloseMethod::CloseFrame,
    CloseMethod::Fin,
    CloseMethod::UnsubscribeClose,
    CloseMethod::Reset,
];

impl CloseMethod {
    fn parse(name: &str) -> Option<CloseMethod> {
        METHODS.into_iter().find(|m| m.name() == name)
    }

    fn name(self) -> &'static str {
        match self {
            CloseMethod::CloseFrame => "close_frame",
            CloseMethod::Fin => "fin",
            CloseMethod::UnsubscribeClose => "unsubscribe_close",
            CloseMethod::Reset => "reset",
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum ErrKind {
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
const ERR_KINDS: [(ErrKind, &str); 9] = [
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
enum Phase {
    Run,
    Pause,
    Stop,
}

struct Shared {
    addr: SocketAddr,
    /// The close methods in rotation (all four unless `--methods` says otherwise).
    methods: Vec<CloseMethod>,
    url: String,
    repo_ids: Vec<String>,
    /// A valid client token per repo (the churners all use the same user).
    good_tokens: Vec<String>,
    /// Per repo, four bad tokens: wrong key, expired, signed for another repo, not a JWT.
    bad_tokens: Vec<[String; 4]>,
    event_token: String,
    /// Steady subscribers per repo.
    repo_subscribers: Vec<u64>,
    /// Churn connections started; also numbers them.
    next_conn: AtomicU64,
    /// Makes every sync probe id unique.
    next_probe: AtomicU64,
    /// Churn connections per close method (indexed `method as usize`).
    by_method: [AtomicU64; 4],
    bad_token_conns: AtomicU64,
    churn_events: AtomicU64,
    fin_reset: AtomicU64,
    errors: [AtomicU64; ERR_KINDS.len()],
    errors_by_method: [AtomicU64; 4],
    first_errors: Mutex<Vec<String>>,
    /// Steady subscribers that confirmed their subscriptions.
    confirmed: AtomicUsize,
    /// Churners waiting in `Phase::Pause`.
    paused: AtomicUsize,
    /// Distinct deliveries to steady subscribers, and what the 200-answered posts expect.
    delivered: AtomicU64,
    expected: AtomicU64,
    /// Per event k: whether its POST was answered 200.
    posted_ok: Mutex<Vec<bool>>,
    stop_posting: AtomicBool,
    /// How far behind its schedule the poster fell, at most.
    post_lag_max_ms: AtomicU64,
}

impl Shared {
    fn error(&self, kind: ErrKind, method: Option<CloseMethod>, msg: String) {
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

    fn error_total(&self) -> u64 {
        self.errors.iter().map(|e| e.load(Relaxed)).sum()
    }

    fn probe(&self) -> String {
        format!("probe-{}", self.next_probe.fetch_add(1, Relaxed))
    }
}

fn subscribe_msg(repos: &[(&str, &str)]) -> String {
    let list: Vec<Value> = repos.iter().map(|(id, t)| json!({"id": id, "jwt_token": t})).collect();
    json!({"type": "subscribe", "content": {"repos": list}}).to_string()
}

/// The sync probe: a subscription with a bad token, answered with `jwt-expired`.
fn probe_msg(probe: &str) -> String {
    subscribe_msg(&[(probe, "bad")])
}

fn unsubscribe_msg(repos: &[&str]) -> String {
    let list: Vec<Value> = repos.iter().map(|id| json!({"id": id})).collect();
    json!({"type": "unsubscribe", "content": {"repos": list}}).to_string()
}

type Ws = WebSocketStream<TcpStream>;

async fn connect_ws(sh: &Shared) -> Result<Ws, String> {
    let stream = TcpStream::connect(sh.addr).await.map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let cfg = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::client_async_with_config(sh.url.as_str(), stream, Some(cfg))
        .await
        .map_err(|e| format!("websocket handshake: {e}"))?;
    Ok(ws)
}

/// The sequence number an event carries in its `commit_id`.
fn event_seq(v: &Value) -> Option<u64> {
    u64::from_str_radix(v["content"]["commit_id"].as_str()?, 16).ok()
}

// ---------------------------------------------------------------------------------
// Steady subscribers

#[derive(Default)]
struct RepoSeen {
    repo: usize,
    /// Bit k / repos set when event k arrived.
    bits: Vec<u64>,
    last: Option<u64>,
}

#[derive(Default)]
struct SteadyReport {
    seen: Vec<RepoSeen>,
    duplicates: u64,
    out_of_order: u64,
}

impl SteadyReport {
    fn on_event(&mut self, sh: &Shared, v: &Value) -> Result<(), String> {
        let repo_id = v["content"]["repo_id"].as_str().unwrap_or_default();
        let Some(k) = event_seq(v) else {
            return Err(format!("event without a sequence number: {v}"));
        };
        let repos = sh.repo_ids.len() as u64;
        let repo = (k % repos) as usize;
        if sh.repo_ids[repo] != repo_id {
            return Err(format!("event {k} misrouted: repo {repo_id}"));
        }
        let Some(rs) = self.seen.iter_mut().find(|r| r.repo == repo) else {
            return Err(format!("event {k} for repo {repo_id}, not subscribed"));
        };
        let slot = (k / repos) as usize;
        let (word, bit) = (slot / 64, 1u64 << (slot % 64));
        if rs.bits.len() <= word {
            rs.bits.resize(word + 1, 0);
        }
        if rs.bits[word] & bit != 0 {
            self.duplicates += 1;
            return Ok(());
        }
        rs.bits[word] |= bit;
        if rs.last.is_some_and(|last| k < last) {
            self.out_of_order += 1;
        }
        rs.last = Some(rs.last.map_or(k, |last| last.max(k)));
        sh.delivered.fetch_add(1, Relaxed);
        Ok(())
    }

    fn has(&self, repo: usize, k: u64, repos: u64) -> bool {
        let slot = (k / repos) as usize;
        self.seen
            .iter()
            .find(|r| r.repo == repo)
            .and_then(|r| r.bits.get(slot / 64))
            .is_some_and(|w| w & (1u64 << (slot % 64)) != 0)
    }
}

/// The repos of steady subscriber i.
fn steady_repos(i: usize, repos: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..STEADY_REPOS).map(|j| (i + j) % repos).collect();
    v.sort_unstable();
    v.dedup();
    v
}

async fn steady_task(i: usize, sh: Arc<Shared>, mut stop: watch::Receiver<bool>) -> SteadyReport {
    let repos = steady_repos(i, sh.repo_ids.len());
    let mut rep = SteadyReport {
        seen: repos
            .iter()
            .map(|&repo| RepoSeen {
                repo,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let probe = sh.probe();
    let setup = async {
        let mut ws = connect_ws(&sh).await?;
        let pairs: Vec<(&str, &str)> = repos
            .iter()
            .map(|&r| (sh.repo_ids[r].as_str(), sh.good_tokens[r].as_str()))
            .collect();
        ws.send(Message::text(subscribe_msg(&pairs)))
            .await
            .map_err(|e| format!("send subscribe: {e}"))?;
        ws.send(Message::text(probe_msg(&probe)))
            .await
            .map_err(|e| format!("send probe: {e}"))?;
        // Nothing is posted before every steady subscriber is confirmed, so the
        // probe's answer must be the first message.
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    if v["type"] == "jwt-expired" && v["content"]["repo_id"] == probe.as_str() {
                        return Ok(ws);
                    }
                    return Err(format!("unexpected message while confirming: {t}"));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => return Err(format!("no answer to the sync probe: {other:?}")),
            }
        }
    };
    let mut ws = match timeout(SETUP_DEADLINE, setup).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            sh.error(ErrKind::SteadyClosed, None, format!("steady {i}: {e}"));
            return rep;
        }
        Err(_) => {
            sh.error(ErrKind::SteadyClosed, None, format!("steady {i}: setup timed out"));
            return rep;
        }
    };
    sh.confirmed.fetch_add(1, Relaxed);
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = match serde_json::from_str(t.as_str()) {
                        Ok(v) => v,
                        Err(_) => {
                            sh.error(ErrKind::UnexpectedMessage, None, format!("steady {i}: bad JSON {t:?}"));
                            continue;
                        }
                    };
                    let r = if v["type"] == "repo-update" {
                        rep.on_event(&sh, &v)
                    } else {
                        Err(format!("unexpected message {t}"))
                    };
                    if let Err(e) = r {
                        sh.error(ErrKind::UnexpectedMessage, None, format!("steady {i}: {e}"));
                    }
                }
                // tungstenite queues the pong and sends it on the next read.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Binary(_))) => {
                    sh.error(ErrKind::UnexpectedMessage, None, format!("steady {i}: binary frame"));
                }
                Some(Ok(Message::Close(f))) => {
                    sh.error(ErrKind::SteadyClosed, None, format!("steady {i}: server closed: {f:?}"));
                    return rep;
                }
                Some(Err(e)) => {
                    sh.error(ErrKind::SteadyClosed, None, format!("steady {i}: {e}"));
                    return rep;
                }
                None => {
                    sh.error(ErrKind::SteadyClosed, None, format!("steady {i}: connection ended"));
                    return rep;
                }
            }
        }
    }
    let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
    rep
}

// ---------------------------------------------------------------------------------
// Churn connections

/// What one churn connection expects from the server.
struct Churn<'a> {
    sh: &'a Shared,
    n: u64,
    method: CloseMethod,
    repos: Vec<usize>,
    /// Whether the subscriptions used valid tokens.
    good: bool,
    /// Ids still owed a `jwt-expired`, in the order the server must answer.
    owed: VecDeque<String>,
    /// Set once the server confirmed the unsubscribe: events for our repos are errors.
    unsubscribed: bool,
}

impl Churn<'_> {
    fn error(&self, kind: ErrKind, msg: String) {
        self.sh
            .error(kind, Some(self.method), format!("conn {}: {msg}", self.n));
    }

    /// Checks one text frame from the server.
    fn on_text(&mut self, text: &str) {
        let v: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(_) => return self.error(ErrKind::UnexpectedMessage, format!("bad JSON {text:?}")),
        };
        let id = v["content"]["repo_id"].as_str().unwrap_or_default();
        if v["type"] == "jwt-expired" {
            if self.owed.front().is_some_and(|o| o == id) {
                self.owed.pop_front();
            } else {
                self.error(
                    ErrKind::UnexpectedMessage,
                    format!("jwt-expired for {id}, expected {:?}", self.owed.front()),
                );
            }
        } else if v["type"] == "repo-update" {
            let ours = self.repos.iter().any(|&r| self.sh.repo_ids[r] == id);
            if !ours || !self.good {
                self.error(
                    ErrKind::UnexpectedMessage,
                    format!("event for a repo not subscribed: {text}"),
                );
            } else if self.unsubscribed {
                self.error(
                    ErrKind::EventAfterUnsubscribe,
                    format!("event after unsubscribe: {text}"),
                );
            } else {
                self.sh.churn_events.fetch_add(1, Relaxed);
            }
        } else {
            self.error(ErrKind::UnexpectedMessage, format!("unexpected message {text}"));
        }
    }

    /// Reads and checks messages until every owed `jwt-expired` came (or, with
    /// `until_owed` false, simply until `until`).  Returns false if the connection
    /// ended or the owed answers did not come in time (already counted as errors).
    async fn pump(&mut self, ws: &mut Ws, until: TInstant, until_owed: bool) -> bool {
        loop {
            if until_owed && self.owed.is_empty() {
                return true;
            }
            let msg = match timeout_at(until, ws.next()).await {
                Err(_) if until_owed => {
                    self.error(
                        ErrKind::JwtExpiredMissing,
                        format!("no jwt-expired for {:?}", self.owed),
                    );
                    return false;
                }
                Err(_) => return true,
                Ok(m) => m,
            };
            match msg {
                Some(Ok(Message::Text(t))) => self.on_text(t.as_str()),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Binary(_))) => self.error(ErrKind::UnexpectedMessage, "binary frame".into()),
                Some(Ok(Message::Close(f))) => {
                    self.error(ErrKind::Send, format!("server closed the connection: {f:?}"));
                    return false;
                }
                Some(Err(e)) => {
                    self.error(ErrKind::Send, format!("connection failed: {e}"));
                    return false;
                }
                None => {
                    self.error(ErrKind::Send, "connection ended".into());
                    return false;
                }
            }
        }
    }

    async fn send(&self, ws: &mut Ws, text: String) -> bool {
        match timeout(OP_TIMEOUT, ws.send(Message::text(text))).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                self.error(ErrKind::Send, format!("send: {e}"));
                false
            }
            Err(_) => {
                self.error(ErrKind::Send, "send timed out".into());
                false
            }
        }
    }

    /// Sends a sync probe and waits for its answer (and every earlier owed one).
    async fn sync(&mut self, ws: &mut Ws) -> bool {
        let probe = self.sh.probe();
        if !self.send(ws, probe_msg(&probe)).await {
            return false;
        }
        self.owed.push_back(probe);
        self.pump(ws, TInstant::now() + OP_TIMEOUT, true).await
    }

    /// Close frame, then the echo with the same code, then the server's TCP close.
    async fn close_handshake(&mut self, ws: &mut Ws) {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: Utf8Bytes::from_static(""),
        };
        match timeout(OP_TIMEOUT, ws.close(Some(frame))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return self.error(ErrKind::Send, format!("send close: {e}")),
            Err(_) => return self.error(ErrKind::Send, "send close timed out".into()),
        }
        let until = TInstant::now() + OP_TIMEOUT;
        let mut echo = false;
        loop {
            match timeout_at(until, ws.next()).await {
                Err(_) if echo => {
                    return self.error(ErrKind::CloseHandshake, "TCP still open after the close echo".into());
                }
                Err(_) => return self.error(ErrKind::CloseHandshake, "no close echo".into()),
                Ok(Some(Ok(Message::Close(f)))) => {
                    if f.as_ref().map(|f| f.code) != Some(CloseCode::Normal) {
                        self.error(ErrKind::CloseHandshake, format!("close echo {f:?}, sent 1000"));
                    }
                    echo = true;
                }
                Ok(Some(Ok(Message::Text(t)))) => self.on_text(t.as_str()),
                Ok(Some(Ok(_))) => {}
                // After the echo, tungstenite reports the server's TCP close as the end.
                Ok(None) if echo => return,
                Ok(None) => return self.error(ErrKind::CloseHandshake, "connection ended without an echo".into()),
                Ok(Some(Err(e))) => {
                    let when = if echo { "after" } else { "before" };
                    return self.error(ErrKind::CloseHandshake, format!("{e} {when} the close echo"));
                }
            }
        }
    }

    /// shutdown(write) without a Close frame, then read until the server closes.
    async fn fin(&self, ws: &mut Ws) {
        let s = ws.get_mut();
        if let Err(e) = s.shutdown().await {
            return self.error(ErrKind::Send, format!("shutdown: {e}"));
        }
        // Reading until EOF also means that nothing unread is left when the socket is
        // dropped: close() with unread data would send a RST instead of nothing more.
        let mut buf = [0u8; 4096];
        let until = TInstant::now() + OP_TIMEOUT;
        loop {
            match timeout_at(until, s.read(&mut buf)).await {
                Ok(Ok(0)) => return,
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    // Closed, by a reset: not wrong, but noted.
                    self.sh.fin_reset.fetch_add(1, Relaxed);
                    return;
                }
                Ok(Err(e)) => return self.error(ErrKind::FinNotClosed, format!("read after FIN: {e}")),
                Err(_) => return self.error(ErrKind::FinNotClosed, "server kept the socket open after FIN".into()),
            }
        }
    }
}

/// One churn connection number `n`: connect, subscribe, maybe confirm and linger, close.
async fn churn_once(sh: &Shared, n: u64, rng: &mut Rng) {
    let m = sh.methods.len() as u64;
    let method = sh.methods[(n % m) as usize];
    // Blocks of consecutive connections (one of each close method) one time in ten.
    let round = n / m;
    let bad = round % 10 == 3;
    let count = 1 + rng.below(3);
    let mut repos: Vec<usize> = Vec::with_capacity(count);
    while repos.len() < count.min(sh.repo_ids.len()) {
        let r = rng.below(sh.repo_ids.len());
        if !repos.contains(&r) {
            repos.push(r);
        }
    }
    sh.by_method[method as usize].fetch_add(1, Relaxed);
    if bad {
        sh.bad_token_conns.fetch_add(1, Relaxed);
    }
    let mut c = Churn {
        sh,
        n,
        method,
        repos,
        good: !bad,
        owed: VecDeque::new(),
        unsubscribed: false,
    };
    let mut ws = match timeout(OP_TIMEOUT, connect_ws(sh)).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => return c.error(ErrKind::Connect, e),
        Err(_) => return c.error(ErrKind::Connect, "connect timed out".into()),
    };
    let bad_kind = ((round / 10) % 4) as usize;
    let pairs: Vec<(&str, &str)> = c
        .repos
        .iter()
        .map(|&r| {
            let token = if bad {
                sh.bad_tokens[r][bad_kind].as_str()
            } else {
                sh.good_tokens[r].as_str()
            };
            (sh.repo_ids[r].as_str(), token)
        })
        .collect();
    if !c.send(&mut ws, subscribe_msg(&pairs)).await {
        return;
    }
    // Variety: half the connections confirm their subscription and linger up to 30 ms
    // (events may arrive); the rest close right after subscribing, racing the server.
    let settle = rng.below(2) == 0;
    if bad {
        c.owed.extend(c.repos.iter().map(|&r| sh.repo_ids[r].clone()));
        if !c.pump(&mut ws, TInstant::now() + OP_TIMEOUT, true).await {
            return;
        }
    } else if settle && !c.sync(&mut ws).await {
        return;
    }
    if settle {
        let linger = Duration::from_millis(rng.below(30) as u64);
        if !c.pump(&mut ws, TInstant::now() + linger, false).await {
            return;
        }
    }
    match method {
        CloseMethod::CloseFrame => c.close_handshake(&mut ws).await,
        CloseMethod::Fin => c.fin(&mut ws).await,
        CloseMethod::UnsubscribeClose => {
            let ids: Vec<&str> = c.repos.iter().map(|&r| sh.repo_ids[r].as_str()).collect();
            if !c.send(&mut ws, unsubscribe_msg(&ids)).await {
                return;
            }
            // On every other one, confirm the unsubscribe: from the probe's answer on,
            // no event for these repos may come.
            if round.is_multiple_of(2) {
                if !c.sync(&mut ws).await {
                    return;
                }
                c.unsubscribed = true;
            }
            c.close_handshake(&mut ws).await;
        }
        CloseMethod::Reset => {
            // SO_LINGER {on, 0}: close() then sends a RST and discards unsent data.
            if let Err(e) = ws.get_ref().set_zero_linger() {
                c.error(ErrKind::Send, format!("SO_LINGER: {e}"));
            }
            drop(ws);
        }
    }
}

async fn churner(id: usize, sh: Arc<Shared>, mut phase: watch::Receiver<Phase>) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((id as u64 + 1) << 17));
    loop {
        let p = *phase.borrow_and_update();
        match p {
            Phase::Stop => return,
            Phase::Pause => {
                sh.paused.fetch_add(1, Relaxed);
                // The main task always moves on to Run or Stop; the timeout is a backstop.
                let changed = timeout(Duration::from_secs(120), phase.changed()).await;
                sh.paused.fetch_sub(1, Relaxed);
                if !matches!(changed, Ok(Ok(()))) {
                    return;
                }
            }
            Phase::Run => {
                let n = sh.next_conn.fetch_add(1, Relaxed);
                churn_once(&sh, n, &mut rng).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Poster

/// Runs the poster on its own thread and current-thread runtime: on the shared runtime
/// each request would queue behind the churn and subscriber tasks, and a busy machine
/// would then fall short of `--rate`.
fn spawn_poster(sh: Arc<Shared>, rate: f64) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("poster".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("poster runtime");
            rt.block_on(poster(sh, rate));
        })
        .expect("spawn poster thread")
}

/// Posts event k to repo k % repos at `rate` per second until told to stop.
async fn poster(sh: Arc<Shared>, rate: f64) {
    let mut http = Http::new(sh.addr);
    let mut body = String::with_capacity(256);
    let start = TInstant::now();
    let repos = sh.repo_ids.len();
    for k in 0u64.. {
        let at = start + Duration::from_secs_f64(k as f64 / rate);
        sleep_until(at).await;
        if sh.stop_posting.load(Relaxed) {
            break;
        }
        let lag = TInstant::now().duration_since(at).as_millis() as u64;
        sh.post_lag_max_ms.fetch_max(lag, Relaxed);
        let repo = (k % repos as u64) as usize;
        body.clear();
        let _ = write!(
            body,
            r#"{{"type":"repo-update","content":{{"repo_id":"{}","commit_id":"{k:040x}"}}}}"#,
            sh.repo_ids[repo]
        );
        let ok = match http
            .request("POST", "/events", Some(&sh.event_token), body.as_bytes())
            .await
        {
            Ok(Resp { status: 200, .. }) => true,
            Ok(Resp { status, body: b }) => {
                let msg = format!("POST /events -> {status} {}", String::from_utf8_lossy(&b));
                sh.error(ErrKind::Http, None, msg);
                false
            }
            Err(e) => {
                sh.error(ErrKind::Http, None, format!("POST /events: {e}"));
                false
            }
        };
        if ok {
            sh.expected.fetch_add(sh.repo_subscribers[repo], Relaxed);
        }
        sh.posted_ok.lock().unwrap().push(ok);
    }
}

// ---------------------------------------------------------------------------------
// The run

/// Polls `cond` every 10 ms until it holds or `deadline` passes; returns whether it holds.
async fn wait_for(deadline: TInstant, cond: impl Fn() -> bool) -> bool {
    while !cond() {
        if TInstant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(10)).await;
    }
    true
}

async fn run(o: &Opts, addr: SocketAddr, pid: u32, key: &str) -> (Fields, Vec<String>) {
    let mut problems = Vec::new();
    let tag = format!("{:08x}-{:04x}", std::process::id(), unix_now() & 0xffff);
    let repos = o.steady;
    let repo_ids: Vec<String> = (0..repos).map(|r| format!("{tag}-4000-8000-{r:012x}")).collect();
    let exp = unix_now() + 3600;
    let good_tokens = repo_ids
        .iter()
        .map(|id| {
            sign(
                key,
                &json!({"repo_id": id, "username": "churn@example.com", "exp": exp}),
            )
        })
        .collect();
    let bad_tokens = repo_ids
        .iter()
        .map(|id| {
            [
                sign("not-the-key", &json!({"repo_id": id, "username": "churn@example.com", "exp": exp})),
                sign(key, &json!({"repo_id": id, "username": "churn@example.com", "exp": unix_now() - 60})),
                sign(key, &json!({"repo_id": "00000000-0000-0000-0000-000000000000", "username": "churn@example.com", "exp": exp})),
                "bad".to_string(),
            ]
        })
        .collect();
    let mut repo_subscribers = vec![0u64; repos];
    for i in 0..o.steady {
        for r in steady_repos(i, repos) {
            repo_subscribers[r] += 1;
        }
    }
    let sh = Arc::new(Shared {
        addr,
        methods: o.methods.clone(),
        url: format!("ws://{addr}/"),
        repo_ids,
        good_tokens,
        bad_tokens,
        event_token: sign(key, &json!({"exp": unix_now() + 3600})),
        repo_subscribers,
        next_conn: AtomicU64::new(0),
        next_probe: AtomicU64::new(0),
        by_method: Default::default(),
        bad_token_conns: AtomicU64::new(0),
        churn_events: AtomicU64::new(0),
        fin_reset: AtomicU64::new(0),
        errors: Default::default(),
        errors_by_method: Default::default(),
        first_errors: Mutex::new(Vec::new()),
        confirmed: AtomicUsize::new(0),
        paused: AtomicUsize::new(0),
        delivered: AtomicU64::new(0),
        expected: AtomicU64::new(0),
        posted_ok: Mutex::new(Vec::new()),
        stop_posting: AtomicBool::new(false),
        post_lag_max_ms: AtomicU64::new(0),
    });

    let mut http = Http::new(addr);
    match timeout(HTTP_TIMEOUT, http.request("GET", "/ping", None, b"")).await {
        Ok(Ok(Resp { status: 200, .. })) => {}
        other => problems.push(format!("GET /ping: {other:?}")),
    }
    drop(http);

    // Steady subscribers.
    eprintln!("[soak] server {addr} pid {pid}: {} steady subscribers", o.steady);
    let (steady_stop, steady_rx) = watch::channel(false);
    let steady: Vec<_> = (0..o.steady)
        .map(|i| tokio::spawn(steady_task(i, sh.clone(), steady_rx.clone())))
        .collect();
    drop(steady_rx);
    let all_confirmed = wait_for(TInstant::now() + SETUP_DEADLINE, || {
        sh.confirmed.load(Relaxed) + sh.errors[ErrKind::SteadyClosed as usize].load(Relaxed) as usize >= o.steady
    })
    .await;
    let confirmed = sh.confirmed.load(Relaxed);
    if !all_confirmed || confirmed < o.steady {
        problems.push(format!("only {confirmed} of {} steady subscribers confirmed", o.steady));
    }
    let rss_start = rss_kb(pid);

    // Churn and events.
    let warm_s = o.warmup.unwrap_or(o.seconds / 6.0);
    eprintln!(
        "[soak] {} churners, {} events/s for {} s (RSS {rss_start:?} KiB; warm-up reading after {warm_s} s)",
        o.churners, o.rate, o.seconds
    );
    let t0 = TInstant::now();
    let poster = spawn_poster(sh.clone(), o.rate);
    let (phase, phase_rx) = watch::channel(Phase::Run);
    let churners: Vec<_> = (0..o.churners)
        .map(|id| tokio::spawn(churner(id, sh.clone(), phase_rx.clone())))
        .collect();
    drop(phase_rx);
    let series = Arc::new(Mutex::new(Vec::<(u64, Option<u64>)>::new()));
    let sampler = {
        let series = series.clone();
        tokio::spawn(async move {
            for s in (0u64..).step_by(5) {
                sleep_until(t0 + Duration::from_secs(s)).await;
                series.lock().unwrap().push((s, rss_kb(pid)));
            }
        })
    };

    // Warm-up reading, in the same state as the final one: churn paused and drained.
    sleep_until(t0 + Duration::from_secs_f64(warm_s)).await;
    let _ = phase.send(Phase::Pause);
    let pause_start = TInstant::now();
    if !wait_for(pause_start + QUIESCE_DEADLINE, || sh.paused.load(Relaxed) >= o.churners).await {
        problems.push("churners did not pause in time for the warm-up reading".into());
    }
    let rss_warm = settle_rss(pid, &RSS_SETTLE).await;
    let pause = pause_start.elapsed();
    let conns_at_warm = sh.next_conn.load(Relaxed);
    eprintln!("[soak] warm-up: {conns_at_warm} churn connections, RSS {rss_warm:?} KiB");
    let _ = phase.send(Phase::Run);

    // The rest of the run (the pause does not count as churn time).
    let end = t0 + Duration::from_secs_f64(o.seconds) + pause;
    let mut last_report = TInstant::now();
    while TInstant::now() < end {
        sleep_until(end.min(last_report + Duration::from_secs(10))).await;
        last_report = TInstant::now();
        eprintln!(
            "[soak] t={:.0}s: {} churn connections, {} errors, RSS {:?} KiB",
            t0.elapsed().as_secs_f64(),
            sh.next_conn.load(Relaxed),
            sh.error_total(),
            rss_kb(pid)
        );
    }
    let _ = phase.send(Phase::Stop);
    sh.stop_posting.store(true, Relaxed);
    let stop_deadline = TInstant::now() + QUIESCE_DEADLINE;
    for c in churners {
        if timeout_at(stop_deadline, c).await.is_err() {
            problems.push("a churner did not stop in time".into());
        }
    }
    if !wait_for(stop_deadline, || poster.is_finished()).await {
        problems.push("the poster did not stop in time".into());
    }
    sampler.abort();
    let churn_s = o.seconds;
    let churn_connections = sh.next_conn.load(Relaxed);

    // Every steady subscriber must get every event of its repos.
    let expected = sh.expected.load(Relaxed);
    let complete = wait_for(TInstant::now() + DELIVERY_DEADLINE, || {
        sh.delivered.load(Relaxed) >= expected
    })
    .await;
    if !complete {
        problems.push(format!(
            "deliveries incomplete after {DELIVERY_DEADLINE:?}: {}/{expected}",
            sh.delivered.load(Relaxed)
        ));
    }
    let rss_end = settle_rss(pid, &RSS_SETTLE).await;
    let _ = steady_stop.send(true);
    let mut reports = Vec::new();
    let join_deadline = TInstant::now() + Duration::from_secs(10);
    for h in steady {
        // A subscriber that did not report counts as having received nothing.
        reports.push(match timeout_at(join_deadline, h).await {
            Ok(Ok(r)) => r,
            _ => {
                problems.push("a steady subscriber did not finish in time".into());
                SteadyReport::default()
            }
        });
    }

    // Count exactly: for every 200-answered event, each subscriber of its repo.
    let posted_ok = sh.posted_ok.lock().unwrap().clone();
    let (mut delivered, mut lost, mut duplicates, mut out_of_order) = (0u64, 0u64, 0u64, 0u64);
    for (i, rep) in reports.iter().enumerate() {
        duplicates += rep.duplicates;
        out_of_order += rep.out_of_order;
        for &r in &steady_repos(i, repos) {
            for k in (r..posted_ok.len()).step_by(repos) {
                if !posted_ok[k] {
                    continue;
                }
                if rep.has(r, k as u64, repos as u64) {
                    delivered += 1;
                } else {
                    lost += 1;
                }
            }
        }
    }
    let events_posted = posted_ok.iter().filter(|&&ok| ok).count();
    let drift = match (rss_warm, rss_end) {
        (Some(w), Some(e)) => Some(e as i64 - w as i64),
        _ => None,
    };
    let errors = sh.error_total();
    if lost > 0 {
        problems.push(format!("{lost} deliveries lost"));
    }
    if errors > 0 {
        problems.push(format!("{errors} errors"));
    }
    match drift {
        Some(d) if d.abs() > MAX_DRIFT_KB => problems.push(format!("RSS drift {d} KiB")),
        None => problems.push("no RSS reading".into()),
        _ => {}
    }

    let count = |a: &[AtomicU64; 4]| -> Value {
        METHODS
            .iter()
            .map(|m| (m.name().to_string(), json!(a[*m as usize].load(Relaxed))))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let mut out = Fields::default();
    out.put("seconds", churn_s);
    out.put("steady", o.steady);
    out.put("churners", o.churners);
    out.put("rate", o.rate);
    out.put("methods", o.methods.iter().map(|m| m.name()).collect::<Vec<_>>());
    out.put("churn_connections", churn_connections);
    out.put("churn_per_s", (churn_connections as f64 / churn_s).round());
    out.put("closed_by", count(&sh.by_method));
    out.put("bad_token_connections", sh.bad_token_conns.load(Relaxed));
    out.put("churn_events_received", sh.churn_events.load(Relaxed));
    out.put("fin_answered_with_reset", sh.fin_reset.load(Relaxed));
    out.put("errors", errors);
    out.put(
        "error_kinds",
        ERR_KINDS
            .iter()
            .filter(|(k, _)| sh.errors[*k as usize].load(Relaxed) > 0)
            .map(|(k, name)| (name.to_string(), json!(sh.errors[*k as usize].load(Relaxed))))
            .collect::<serde_json::Map<_, _>>(),
    );
    out.put("errors_by_method", count(&sh.errors_by_method));
    out.put("first_errors", sh.first_errors.lock().unwrap().clone());
    out.put("events_posted", events_posted);
    out.put("post_lag_max_ms", sh.post_lag_max_ms.load(Relaxed));
    out.put("expected_deliveries", delivered + lost);
    out.put("delivered", delivered);
    out.put("lost", lost);
    out.put("duplicates", duplicates);
    out.put("out_of_order", out_of_order);
    out.put("rss_start_kb", rss_start);
    out.put("rss_warm_kb", rss_warm);
    out.put("rss_end_kb", rss_end);
    out.put("rss_drift_kb", drift);
    out.put("rss_series_kb", series.lock().unwrap().clone());
    (out, problems)
}

fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    // Best effort: the default steady and churn sizes fit in the usual 1024.
    let _ = raise_nofile_limit();
    let bin = match &o.server_bin {
        Some(b) => b.clone(),
        None => match build_server() {
            Ok(b) => b,
            Err(e) => {
                eprintln!("[soak] {e}");
                std::process::exit(2);
            }
        },
    };
    let key = random_key();
    let mut server = match start_server(&bin, &o.log_level, &key) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("[soak] {e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (mut out, mut problems) = rt.block_on(run(&o, server.addr, server.pid(), &key));
    if let Some(status) = server.exited() {
        problems.push(format!("server exited during the run: {status}"));
    }
    server.stop();
    out.put("server_log_warnings", server.log.warnings.load(Relaxed));
    out.put("server_log_errors", server.log.errors.load(Relaxed));
    out.put("server_log_first", server.log.first_lines());
    if !problems.is_empty() {
        eprintln!(
            "[soak] problems: {problems:?}\n[soak] server log tail:\n{}",
            server.log.tail_text()
        );
    }
    out.put("problems", &problems);
    out.put("verdict", if problems.is_empty() { "pass" } else { "fail" });
    drop(server);
    rt.shutdown_timeout(Duration::from_secs(1));
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{out}");
    let _ = stdout.flush();
    std::process::exit(if problems.is_empty() { 0 } else { 1 });
}
