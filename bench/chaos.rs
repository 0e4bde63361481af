//! Chaos soak: two instances on a real Redis, a steady population, churn, every event
//! type, permission events on a real SQLite group database, slow and dead clients,
//! reloads with key rotation, log reopening after a rename, and Redis restarts, for an
//! hour (issue 14: "an appliance is judged after months, not minutes").
//!
//! # Running
//!
//! ```text
//! cargo bench --bench chaos -- [--seconds 3600] [--steady 200] [--libraries 60]
//!     [--users 40] [--groups 6] [--churners 8] [--rate 30] [--burst 300]
//!     [--slow 3] [--dead 3] [--server-bin PATH] [--keep DIR]
//! ```
//!
//! The server is the release binary `cargo bench` builds beside this program (or
//! `--server-bin`). The program starts `redis-server` (Debian package `redis-server`;
//! `.ci/deps` installs it) on a free loopback port, writes a seahub-style SQLite
//! `groupmgr.db` (table `GroupUser`), and starts two instances A and B, each with its own
//! config dir, `log_level = info`, a log file (`-l DIR/notification-server.log`), a
//! metrics listener, the shared Redis and the group database. Everything is on
//! 127.0.0.1 and in a temporary directory (kept with `--keep DIR`).
//!
//! # The mix
//!
//! - **Steady clients** (`--steady`): websockets, alternately on A and B, each subscribed
//!   to 2-5 libraries; every fifth socket holds subscriptions of two accounts (as the
//!   desktop client does for two servers' accounts sharing a library list), and a few
//!   also subscribe to the "bulk" library. They read everything and are the ones the
//!   delivery invariants are checked on.
//! - **Events** at `--rate` per second plus a `--burst` posted back to back every
//!   `seconds / 12`: `repo-update`, `file-lock-changed`, `comment-update` and
//!   `folder-perm-changed`, the latter user-scoped, group-scoped (resolved in the SQLite
//!   database) or for everyone (`group: -1`). One in eight goes to the bulk library with
//!   8 KiB of padding. Every library has a home instance and its events are posted
//!   there (one sequential poster), so the per-library order is defined for every client,
//!   local or across Redis. Each event's content carries `chaos_seq`, its number.
//! - **Churn** (`--churners` loops, 0-40 ms apart): connect to A or B, subscribe to 1-3 libraries (one
//!   connection in ten with a token signed by another key, which must be answered with
//!   `jwt-expired`), confirm with a sync probe, linger, and close in rotation by a Close
//!   frame, a FIN, an unsubscribe then Close, or a reset.
//! - **Slow clients** (`--slow`): a 4 KiB receive buffer, subscribed to the bulk library,
//!   never read, but send a ping every second (so they are heard from and not a pong
//!   timeout); held 30-90 s, then reset. The server is expected to close them as slow
//!   consumers.
//! - **Dead clients** (`--dead`): subscribed to a library nobody posts to, then silent
//!   (no reads, so no pongs); held 10-30 s, then reset. Expected: `pong_timeout` closes.
//! - **Faults**, every `seconds / 12` a SIGHUP to both instances in the rotation plain
//!   reload, key rotation (a new `jwt_private_key` in both seafile.conf files; senders
//!   and new subscriptions switch to it once both confirmed), refused reload (a bad
//!   `port` value: the `reload refused` error line is the injected fault); every
//!   `seconds / 6` the log file of one instance is renamed and SIGUSR1 sent (the new file
//!   must appear with `log file reopened`); every `seconds / 4` Redis is killed (SIGKILL)
//!   and restarted on the same port (both instances must resubscribe by themselves).
//!
//! # Invariants (exit status 1 when one fails)
//!
//! - Steady clients: every event they are in the audience of arrives exactly once, and
//!   per library in posting order. Deliveries that cross Redis while it was down (from
//!   one second before the kill until both instances have resubscribed, plus two
//!   seconds) are expected to be lost, by design (README, "Several instances"), and are
//!   counted apart (`cross_instance_in_redis_outage`). Local deliveries are never excused.
//! - No steady client is closed, no churn connection misbehaves, every event POST is
//!   answered 200.
//! - Memory: RSS and descriptor count of each instance, sampled every `seconds / 18`
//!   (at most every 60 s); at the end of the warm-up (`seconds / 6`) and at the end the
//!   churn, slow and dead clients are paused and closed and the readings are taken in
//!   the same quiet state: RSS drift under 1024 KiB, descriptor drift at most 2.
//! - Logs: every `[ERROR]` line of both instances (all log files, the renamed ones
//!   included) is explained by an injected fault; warnings are counted by cause.
//!
//! # Output
//!
//! Progress and a readable summary on stderr; one JSON object on stdout: parameters,
//! counts of each fault, `deliveries` (expected, received, lost, duplicates,
//! out_of_order, and the Redis-outage cross-instance figures), churn, slow and dead
//! client figures, per-instance samples (`t`, RSS KiB, descriptors, CPU seconds,
//! deliveries), quiet readings and drifts, `cpu_us_per_delivery_start` / `_end` (both
//! instances' CPU over their deliveries in the first and last `seconds / 12`), log
//! lines by level and cause, `problems` and `verdict`.

#[path = "common/mod.rs"]
mod common;

use common::{
    Fields, HTTP_TIMEOUT, Http, Resp, Rng, RssSettle, num, parse_flags, raise_nofile_limit, random_key, rss_kb,
    settle_rss, sign, unix_now,
};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant as TInstant, sleep, sleep_until, timeout, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};

/// Any single step of a churn, slow or dead connection may take this long.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Connecting and confirming every steady client.
const SETUP_DEADLINE: Duration = Duration::from_secs(90);
/// After posting stopped, how long deliveries may take to complete.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(30);
/// Pausing every churn, slow and dead loop and letting the server close their sockets.
const QUIESCE_DEADLINE: Duration = Duration::from_secs(30);
/// How long both instances may take to resubscribe after Redis is back.
const REDIS_RECOVERY_DEADLINE: Duration = Duration::from_secs(30);
/// Allowed |RSS drift| per instance between the two quiet readings.
const MAX_DRIFT_KB: i64 = 1024;
/// Allowed |descriptor drift| per instance between the two quiet readings.
const MAX_FD_DRIFT: i64 = 2;
/// Padding of a bulk-library event: what makes a client that does not read fall behind.
const BULK_PAD: usize = 8192;

// ---------------------------------------------------------------------------------
// Options

#[derive(Clone, Debug)]
struct Opts {
    seconds: f64,
    steady: usize,
    libraries: usize,
    users: usize,
    groups: usize,
    churners: usize,
    rate: f64,
    burst: usize,
    slow: usize,
    dead: usize,
    server_bin: Option<PathBuf>,
    keep: Option<PathBuf>,
}

const USAGE: &str = "usage: cargo bench --bench chaos -- [--seconds 3600] [--steady 200] [--libraries 60] \
[--users 40] [--groups 6] [--churners 8] [--rate 30] [--burst 300] [--slow 3] [--dead 3] \
[--server-bin PATH] [--keep DIR]  (see the doc comment of bench/chaos.rs)";

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        seconds: 3600.0,
        steady: 200,
        libraries: 60,
        users: 40,
        groups: 6,
        churners: 8,
        rate: 30.0,
        burst: 300,
        slow: 3,
        dead: 3,
        server_bin: None,
        keep: None,
    };
    parse_flags(USAGE, |flag, value| {
        match flag {
            "--seconds" => o.seconds = num(flag, &value()?)?,
            "--steady" => o.steady = num(flag, &value()?)?,
            "--libraries" => o.libraries = num(flag, &value()?)?,
            "--users" => o.users = num(flag, &value()?)?,
            "--groups" => o.groups = num(flag, &value()?)?,
            "--churners" => o.churners = num(flag, &value()?)?,
            "--rate" => o.rate = num(flag, &value()?)?,
            "--burst" => o.burst = num(flag, &value()?)?,
            "--slow" => o.slow = num(flag, &value()?)?,
            "--dead" => o.dead = num(flag, &value()?)?,
            "--server-bin" => o.server_bin = Some(PathBuf::from(value()?)),
            "--keep" => o.keep = Some(PathBuf::from(value()?)),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if !(o.seconds.is_finite() && o.seconds >= 30.0) {
        return Err("--seconds must be at least 30".into());
    }
    if !(o.rate.is_finite() && o.rate > 0.0) {
        return Err("--rate must be positive".into());
    }
    if o.steady < 2 || o.libraries < 6 || o.users < 2 || o.groups == 0 {
        return Err("need --steady >= 2, --libraries >= 6, --users >= 2, --groups >= 1".into());
    }
    Ok(o)
}

/// When things happen, derived from `--seconds` so that a short run has every fault too.
struct Schedule {
    warmup: f64,
    sample_every: f64,
    hup_every: f64,
    usr1_every: f64,
    redis_every: f64,
    burst_every: f64,
    /// CPU per delivery is measured over the first and the last window of this length.
    cpu_window: f64,
}

impl Schedule {
    fn new(seconds: f64) -> Schedule {
        Schedule {
            warmup: seconds / 6.0,
            sample_every: (seconds / 18.0).clamp(5.0, 60.0),
            hup_every: seconds / 12.0,
            usr1_every: seconds / 6.0,
            redis_every: seconds / 4.0,
            burst_every: seconds / 12.0,
            cpu_window: seconds / 12.0,
        }
    }
}

// ---------------------------------------------------------------------------------
// Small helpers

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Open descriptors of a process.
fn fd_count(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// User plus system CPU time of a process, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz.max(1.0))
}

/// Polls `cond` every 20 ms until it holds or `deadline` passes; returns whether it holds.
async fn wait_for(deadline: TInstant, mut cond: impl FnMut() -> bool) -> bool {
    while !cond() {
        if TInstant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(20)).await;
    }
    true
}

/// RSS once it stopped moving: two equal readings 250 ms apart, at most 5 s.
const RSS_SETTLE: RssSettle = RssSettle {
    every: Duration::from_millis(250),
    readings: 1,
    at_most: Duration::from_secs(5),
};

/// One scrape of a metrics listener (`Connection: close`, read to the end).
async fn scrape(addr: SocketAddr) -> Option<String> {
    let body = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8(buf).ok()?;
        Some(text.split_once("\r\n\r\n")?.1.to_string())
    };
    timeout(HTTP_TIMEOUT, body).await.ok().flatten()
}

/// The sum of every sample of `name` (all label sets) in a scrape.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of one exact sample (`name{labels}`), 0 when absent.
fn metric_one(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------
// Redis

struct Redis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    restarts: usize,
}

impl Redis {
    fn start(dir: &Path) -> Result<Redis, String> {
        let mut r = Redis {
            child: None,
            port: free_port(),
            dir: dir.to_path_buf(),
            restarts: 0,
        };
        r.spawn()?;
        Ok(r)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server: {e} (install the redis-server package: .ci/deps)"))?;
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("redis-server did not listen on port {} within 10 s", self.port))
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------
// Server instances

struct Instance {
    name: &'static str,
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
    metrics: SocketAddr,
}

/// The `[notification]` section every instance gets.
fn instance_conf(key: &str, redis_url: &str, db: &Path, metrics: SocketAddr, bad: bool) -> String {
    let port = if bad { "not-a-port" } else { "0" };
    format!(
        "[notification]\nhost = 127.0.0.1\nport = {port}\nlog_level = info\njwt_private_key = {key}\nredis_url = {redis_url}\ngroupmgr_db = {}\nmetrics_listen = {metrics}\n",
        db.display()
    )
}

impl Instance {
    fn log_path(&self) -> PathBuf {
        self.dir.join("notification-server.log")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn start(
        name: &'static str,
        bin: &Path,
        root: &Path,
        conf: impl Fn(SocketAddr) -> String,
    ) -> Result<Instance, String> {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .map_err(|e| format!("{e}"))?;
        std::fs::write(dir.join("seafile.conf"), conf(metrics)).map_err(|e| format!("write config: {e}"))?;
        let log = dir.join("notification-server.log");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&dir)
            .arg("-l")
            .arg(&log)
            .env_remove("JWT_PRIVATE_KEY")
            .env_remove("SEAFILE_LOG_TO_STDOUT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        let mut inst = Instance {
            name,
            child,
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics,
        };
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(addr) = text.lines().find_map(common::parse_listening) {
                inst.addr = addr;
                return Ok(inst);
            }
            if inst.child.try_wait().ok().flatten().is_some() {
                return Err(format!("instance {name} exited at start:\n{text}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("instance {name} did not log its listening line within 30 s"))
    }

    fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
    }

    /// Every line of every log file of this instance (current and renamed ones).
    fn all_log_lines(&self) -> Vec<String> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("notification-server.log"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Lines containing `needle` in all log files.
    fn count(&self, needle: &str) -> usize {
        self.all_log_lines().iter().filter(|l| l.contains(needle)).count()
    }

    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal(libc::SIGTERM);
            let until = Instant::now() + Duration::from_secs(10);
            while Instant::now() < until && self.child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until `needle` has appeared in both instances' logs more than `before` times.
async fn wait_logged(insts: &[Instance], needle: &str, before: &[usize], within: Duration) -> bool {
    let deadline = TInstant::now() + within;
    loop {
        if insts.iter().zip(before).all(|(i, &b)| i.count(needle) > b) {
            return true;
        }
        if TInstant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------
// The population and its expectations

/// Who is in which group, as written to the SQLite database.
fn is_member(group: usize, user: usize, groups: usize) -> bool {
    user % groups == group - 1 || (user * 7 + 3) % (groups + 1) == group - 1
}

fn user_name(u: usize) -> String {
    format!("user{u}@chaos.test")
}

/// Writes the seahub-style group table (ccnet's `GroupUser`).
fn write_group_db(path: &Path, users: usize, groups: usize) -> Result<(), String> {
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
struct Sub {
    lib: usize,
    user: usize,
}

struct ClientSpec {
    instance: usize,
    subs: Vec<Sub>,
}

/// The steady population. Libraries `0..libraries` get ordinary events, `libraries` is
/// the bulk library, `libraries + 1` the quiet one (dead clients only).
fn steady_specs(o: &Opts) -> Vec<ClientSpec> {
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
enum Aud {
    All,
    User(usize),
    Group(usize),
}

/// One posted event.
#[derive(Clone, Copy)]
struct Posted {
    lib: usize,
    aud: Aud,
    /// Answered 200.
    ok: bool,
    /// Seconds since the start of the run when it was posted.
    at: f64,
}

fn home(lib: usize) -> usize {
    lib % 2
}

// ---------------------------------------------------------------------------------
// Shared state

/// The key senders and new subscriptions use; its version changes on rotation.
struct Keys {
    current: RwLock<(u32, String)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Run,
    Pause,
    Stop,
}

struct Shared {
    addrs: [SocketAddr; 2],
    lib_ids: Vec<String>,
    users: usize,
    groups: usize,
    keys: Keys,
    t0: Instant,
    /// Every event posted, by sequence number.
    posted: Mutex<Vec<Posted>>,
    stop_posting: AtomicBool,
    post_failures: AtomicU64,
    /// Steady clients confirmed, and received in total (all deliveries, for the waits).
    confirmed: AtomicUsize,
    received: AtomicU64,
    steady_errors: AtomicU64,
    churn: AtomicU64,
    churn_by_method: [AtomicU64; 4],
    churn_bad_token: AtomicU64,
    churn_events: AtomicU64,
    churn_errors: AtomicU64,
    slow_cycles: AtomicU64,
    /// Slow clients that found themselves closed by the server (their ping failed).
    slow_closed: AtomicU64,
    dead_cycles: AtomicU64,
    side_errors: AtomicU64,
    paused: AtomicUsize,
    first_errors: Mutex<Vec<String>>,
    next_probe: AtomicU64,
}

impl Shared {
    fn error(&self, counter: &AtomicU64, msg: String) {
        counter.fetch_add(1, Relaxed);
        let mut v = self.first_errors.lock().unwrap();
        if v.len() < 20 {
            eprintln!("[chaos] error: {msg}");
            v.push(msg);
        }
    }

    fn key(&self) -> String {
        self.keys.current.read().unwrap().1.clone()
    }

    fn client_token(&self, lib: usize, user: usize, key: &str) -> String {
        sign(
            key,
            &json!({"repo_id": self.lib_ids[lib], "username": user_name(user), "exp": unix_now() + 7200}),
        )
    }

    fn probe(&self) -> String {
        format!("probe-{}", self.next_probe.fetch_add(1, Relaxed))
    }

    fn secs(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }
}

fn subscribe_msg(repos: &[(&str, &str)]) -> String {
    let list: Vec<Value> = repos.iter().map(|(id, t)| json!({"id": id, "jwt_token": t})).collect();
    json!({"type": "subscribe", "content": {"repos": list}}).to_string()
}

fn unsubscribe_msg(repos: &[&str]) -> String {
    let list: Vec<Value> = repos.iter().map(|id| json!({"id": id})).collect();
    json!({"type": "unsubscribe", "content": {"repos": list}}).to_string()
}

type Ws = WebSocketStream<TcpStream>;

async fn handshake(stream: TcpStream, addr: SocketAddr) -> Result<Ws, String> {
    let _ = stream.set_nodelay(true);
    let cfg = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let url = format!("ws://{addr}/");
    let (ws, _) = tokio_tungstenite::client_async_with_config(url.as_str(), stream, Some(cfg))
        .await
        .map_err(|e| format!("websocket handshake: {e}"))?;
    Ok(ws)
}

async fn connect_ws(addr: SocketAddr) -> Result<Ws, String> {
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
async fn subscribe_and_sync(
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

// ---------------------------------------------------------------------------------
// Steady clients

/// What a steady client received: per subscription, the sequence numbers in arrival order.
struct Received {
    per_sub: Vec<Vec<u32>>,
}

async fn steady_task(
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

const METHOD_NAMES: [&str; 4] = ["close_frame", "fin", "unsubscribe_close", "reset"];

/// Close frame, then the echo, then the server's TCP close.
async fn close_handshake(ws: &mut Ws) -> Result<(), String> {
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
async fn fin(ws: &mut Ws) -> Result<(), String> {
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

async fn churn_once(sh: &Shared, n: u64, rng: &mut Rng) -> Result<(), String> {
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
async fn run_or_wait(sh: &Shared, phase: &mut watch::Receiver<Phase>) -> bool {
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

async fn churner(id: usize, sh: Arc<Shared>, mut phase: watch::Receiver<Phase>) {
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
async fn misbehave_once(
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

async fn misbehaver(id: usize, slow: bool, sh: Arc<Shared>, mut phase: watch::Receiver<Phase>) {
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

fn spawn_poster(sh: Arc<Shared>, o: Opts, sched_burst_every: f64) -> std::thread::JoinHandle<()> {
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
fn make_event(k: u64, rng: &mut Rng, sh: &Shared) -> (usize, Aud, String) {
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
async fn poster(sh: Arc<Shared>, o: Opts, burst_every: f64) {
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

// ---------------------------------------------------------------------------------
// Samples

#[derive(Clone, Copy, Default, serde::Serialize)]
struct Sample {
    t: u64,
    rss_kb: u64,
    fds: u64,
    cpu_s: f64,
    deliveries: u64,
}

async fn sample(sh: &Shared, inst: &Instance) -> Sample {
    let metrics = scrape(inst.metrics).await.unwrap_or_default();
    Sample {
        t: sh.secs().round() as u64,
        rss_kb: rss_kb(inst.pid()).unwrap_or(0),
        fds: fd_count(inst.pid()).unwrap_or(0),
        cpu_s: cpu_seconds(inst.pid()).unwrap_or(0.0),
        deliveries: metric_sum(&metrics, "notification_deliveries_total") as u64,
    }
}

/// The quiet state: churn, slow and dead clients paused and their sockets closed by the
/// server; then RSS (settled) and descriptors of each instance.
#[derive(Clone, Copy, Default, serde::Serialize)]
struct Quiet {
    rss_kb: u64,
    fds: u64,
    connections: u64,
}

async fn quiesce(
    sh: &Shared,
    phase: &watch::Sender<Phase>,
    loops: usize,
    insts: &[Instance],
    steady_on: &[u64; 2],
    problems: &mut Vec<String>,
) -> Vec<Quiet> {
    let _ = phase.send(Phase::Pause);
    let deadline = TInstant::now() + QUIESCE_DEADLINE;
    if !wait_for(deadline, || sh.paused.load(Relaxed) >= loops).await {
        problems.push(format!(
            "only {} of {loops} loops paused in time",
            sh.paused.load(Relaxed)
        ));
    }
    let mut out = Vec::new();
    for (i, inst) in insts.iter().enumerate() {
        // Steady websockets plus the poster's keep-alive connection and this scrape.
        let mut conns;
        loop {
            let m = scrape(inst.metrics).await.unwrap_or_default();
            conns = metric_sum(&m, "notification_connections");
            if conns <= steady_on[i] as f64 + 2.0 || TInstant::now() >= deadline {
                break;
            }
            sleep(Duration::from_millis(100)).await;
        }
        if conns > steady_on[i] as f64 + 2.0 {
            problems.push(format!(
                "instance {}: {conns} connections in the quiet state",
                inst.name
            ));
        }
        out.push(Quiet {
            rss_kb: settle_rss(inst.pid(), &RSS_SETTLE).await.unwrap_or(0),
            fds: fd_count(inst.pid()).unwrap_or(0),
            connections: conns as u64,
        });
    }
    out
}

// ---------------------------------------------------------------------------------
// Faults

#[derive(Default, serde::Serialize)]
struct Faults {
    reloads: usize,
    key_rotations: usize,
    refused_reloads: usize,
    log_reopens: usize,
    redis_restarts: usize,
    /// Seconds (since start) of each Redis outage: kill - 1 s .. both resubscribed + 2 s.
    redis_windows: Vec<(f64, f64)>,
    /// Seconds from the kill until both instances were subscribed again.
    redis_recovery_s: Vec<f64>,
}

struct Env<'a> {
    sh: &'a Shared,
    insts: &'a [Instance],
    redis: &'a mut Redis,
    db: PathBuf,
    problems: &'a mut Vec<String>,
    faults: Faults,
}

impl Env<'_> {
    fn write_confs(&mut self, key: &str, bad: bool) {
        for inst in self.insts {
            let text = instance_conf(key, &self.redis.url(), &self.db, inst.metrics, bad);
            if let Err(e) = std::fs::write(inst.dir.join("seafile.conf"), text) {
                self.problems.push(format!("write the config of {}: {e}", inst.name));
            }
        }
    }

    /// SIGHUP to both instances: `kind` 0 plain, 1 key rotation, 2 refused (bad file).
    async fn reload(&mut self, kind: usize) {
        let needle = match kind {
            1 => "reload: new JWT key in use",
            2 => "reload refused",
            _ => "configuration reloaded",
        };
        let before: Vec<usize> = self.insts.iter().map(|i| i.count(needle)).collect();
        let key = if kind == 1 { random_key() } else { self.sh.key() };
        self.write_confs(&key, kind == 2);
        for inst in self.insts {
            inst.signal(libc::SIGHUP);
        }
        let ok = wait_logged(self.insts, needle, &before, Duration::from_secs(10)).await;
        if !ok {
            self.problems
                .push(format!("SIGHUP ({needle}) not confirmed by both instances"));
        }
        match kind {
            1 => {
                // Both use the new key (the old one stays valid 300 s): switch senders
                // and new subscriptions.
                let mut cur = self.sh.keys.current.write().unwrap();
                *cur = (cur.0 + 1, key);
                self.faults.key_rotations += 1;
            }
            2 => {
                self.write_confs(&key, false);
                self.faults.refused_reloads += 1;
            }
            _ => self.faults.reloads += 1,
        }
        eprintln!(
            "[chaos] t={:.0}s: SIGHUP ({needle}) {}",
            self.sh.secs(),
            if ok { "ok" } else { "NOT CONFIRMED" }
        );
    }

    /// Renames one instance's log file and sends SIGUSR1: the new file must appear.
    async fn reopen_log(&mut self, which: usize) {
        let inst = &self.insts[which];
        let n = self.faults.log_reopens + 1;
        let moved = inst.dir.join(format!("notification-server.log.{n}"));
        if let Err(e) = std::fs::rename(inst.log_path(), &moved) {
            self.problems.push(format!("rename log of {}: {e}", inst.name));
            return;
        }
        inst.signal(libc::SIGUSR1);
        let deadline = TInstant::now() + Duration::from_secs(10);
        let path = inst.log_path();
        let ok = wait_for(deadline, || {
            std::fs::read_to_string(&path).is_ok_and(|t| t.contains("log file reopened"))
        })
        .await;
        if !ok {
            self.problems
                .push(format!("instance {}: no new log file after SIGUSR1", inst.name));
        }
        self.faults.log_reopens += 1;
        eprintln!(
            "[chaos] t={:.0}s: log of {} renamed, SIGUSR1 {}",
            self.sh.secs(),
            inst.name,
            if ok { "ok" } else { "FAILED" }
        );
    }

    /// Kills Redis, restarts it on the same port after a second, and waits until both
    /// instances resubscribed by themselves.
    async fn restart_redis(&mut self) {
        let needle = "bus: subscribed to Redis channel";
        let before: Vec<usize> = self.insts.iter().map(|i| i.count(needle)).collect();
        let start = self.sh.secs();
        self.redis.kill();
        sleep(Duration::from_secs(1)).await;
        if let Err(e) = self.redis.spawn() {
            self.problems.push(format!("redis restart: {e}"));
            self.faults.redis_windows.push((start - 1.0, f64::INFINITY));
            return;
        }
        self.redis.restarts += 1;
        let ok = wait_logged(self.insts, needle, &before, REDIS_RECOVERY_DEADLINE).await;
        let back = self.sh.secs();
        if !ok {
            self.problems.push(format!(
                "instances not resubscribed {REDIS_RECOVERY_DEADLINE:?} after a Redis restart"
            ));
        }
        self.faults.redis_restarts += 1;
        self.faults.redis_windows.push((start - 1.0, back + 2.0));
        self.faults.redis_recovery_s.push(back - start);
        eprintln!(
            "[chaos] t={start:.0}s: Redis killed and restarted; both resubscribed after {:.1} s",
            back - start
        );
    }
}

// ---------------------------------------------------------------------------------
// Logs

/// What each kind of log line is explained by: (substring, cause).
const EXPLAINED: &[(&str, &str)] = &[
    ("reload refused", "refused reload (injected bad seafile.conf)"),
    ("bus:", "Redis restart"),
    ("slow consumer", "slow clients"),
    ("slow_consumer", "slow clients"),
    ("unsent", "slow clients"),
    ("pong", "dead clients"),
];

fn cause(line: &str) -> Option<&'static str> {
    EXPLAINED.iter().find(|(s, _)| line.contains(s)).map(|(_, c)| *c)
}

#[derive(Default)]
struct LogReport {
    errors: usize,
    errors_unexplained: Vec<String>,
    errors_by_cause: BTreeMap<String, usize>,
    warnings: usize,
    warnings_by_cause: BTreeMap<String, usize>,
    warnings_unexplained: Vec<String>,
}

fn scan_logs(insts: &[Instance]) -> LogReport {
    let mut r = LogReport::default();
    for inst in insts {
        for line in inst.all_log_lines() {
            let tagged = format!("{}: {line}", inst.name);
            if line.contains("[ERROR]") || line.contains("panicked") {
                r.errors += 1;
                match cause(&line) {
                    Some(c) => *r.errors_by_cause.entry(c.into()).or_default() += 1,
                    None => r.errors_unexplained.push(tagged),
                }
            } else if line.contains("[WARNING]") {
                r.warnings += 1;
                match cause(&line) {
                    Some(c) => *r.warnings_by_cause.entry(c.into()).or_default() += 1,
                    None => {
                        *r.warnings_by_cause.entry("other".into()).or_default() += 1;
                        if r.warnings_unexplained.len() < 10 {
                            r.warnings_unexplained.push(tagged);
                        }
                    }
                }
            }
        }
    }
    r
}

// ---------------------------------------------------------------------------------
// The run

struct Tally {
    expected: u64,
    received: u64,
    lost: u64,
    duplicates: u64,
    out_of_order: u64,
    outage_expected: u64,
    outage_lost: u64,
    outage_duplicates: u64,
    /// Events that reached a subscription outside their audience.
    misdelivered: u64,
    first_lost: Vec<String>,
}

/// Compares what each steady client received with what it should have.
fn tally(specs: &[ClientSpec], got: &[Received], posted: &[Posted], windows: &[(f64, f64)], sh: &Shared) -> Tally {
    let mut t = Tally {
        expected: 0,
        received: 0,
        lost: 0,
        duplicates: 0,
        out_of_order: 0,
        outage_expected: 0,
        outage_lost: 0,
        outage_duplicates: 0,
        misdelivered: 0,
        first_lost: Vec::new(),
    };
    let mut by_lib: Vec<Vec<u32>> = vec![Vec::new(); sh.lib_ids.len()];
    for (k, p) in posted.iter().enumerate() {
        if p.ok {
            by_lib[p.lib].push(k as u32);
        }
    }
    let in_outage = |at: f64| windows.iter().any(|&(a, b)| at >= a && at <= b);
    for (c, (spec, rec)) in specs.iter().zip(got).enumerate() {
        for (j, sub) in spec.subs.iter().enumerate() {
            let arrivals = rec.per_sub.get(j).map(Vec::as_slice).unwrap_or(&[]);
            let mut max_seen: Option<u32> = None;
            for &s in arrivals {
                if max_seen.is_some_and(|m| s < m) {
                    t.out_of_order += 1;
                }
                max_seen = Some(max_seen.map_or(s, |m| m.max(s)));
            }
            let mut sorted = arrivals.to_vec();
            sorted.sort_unstable();
            let crosses = home(sub.lib) != spec.instance;
            for w in sorted.windows(2) {
                if w[0] == w[1] {
                    if crosses && in_outage(posted[w[0] as usize].at) {
                        t.outage_duplicates += 1;
                    } else {
                        t.duplicates += 1;
                    }
                }
            }
            for &k in &by_lib[sub.lib] {
                let p = &posted[k as usize];
                let meant = match p.aud {
                    Aud::All => true,
                    Aud::User(u) => u == sub.user,
                    Aud::Group(g) => is_member(g, sub.user, sh.groups),
                };
                if !meant {
                    if sorted.binary_search(&k).is_ok() {
                        t.misdelivered += 1;
                        if t.first_lost.len() < 10 {
                            t.first_lost.push(format!(
                                "client {c}: event {k} arrived outside its audience {:?}",
                                p.aud
                            ));
                        }
                    }
                    continue;
                }
                let excused = crosses && in_outage(p.at);
                let arrived = sorted.binary_search(&k).is_ok();
                if excused {
                    t.outage_expected += 1;
                    if !arrived {
                        t.outage_lost += 1;
                    }
                    continue;
                }
                t.expected += 1;
                if arrived {
                    t.received += 1;
                } else {
                    t.lost += 1;
                    if t.first_lost.len() < 10 {
                        t.first_lost.push(format!(
                            "client {c} (on {}) lost event {k} (library {}, {:?}, posted at {:.1} s)",
                            ["A", "B"][spec.instance],
                            sub.lib,
                            p.aud,
                            p.at
                        ));
                    }
                }
            }
        }
    }
    t
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

/// Both instances' CPU per delivery (microseconds) between samples a and b.
fn cpu_per_delivery(series: &[Vec<Sample>; 2], a: usize, b: usize) -> Option<f64> {
    let cpu: f64 = series.iter().map(|s| s[b].cpu_s - s[a].cpu_s).sum();
    let del: u64 = series
        .iter()
        .map(|s| s[b].deliveries.saturating_sub(s[a].deliveries))
        .sum();
    (del > 0).then(|| cpu * 1e6 / del as f64)
}

async fn run(
    o: &Opts,
    sched: &Schedule,
    insts: &[Instance],
    redis: &mut Redis,
    db: PathBuf,
    key: &str,
) -> (Fields, Vec<String>) {
    let mut problems = Vec::new();
    let tag = format!("{:08x}-{:04x}", std::process::id(), unix_now() & 0xffff);
    let lib_ids: Vec<String> = (0..o.libraries + 2)
        .map(|r| format!("{tag}-4000-8000-{r:012x}"))
        .collect();
    let sh = Arc::new(Shared {
        addrs: [insts[0].addr, insts[1].addr],
        lib_ids,
        users: o.users,
        groups: o.groups,
        keys: Keys {
            current: RwLock::new((0, key.to_string())),
        },
        t0: Instant::now(),
        posted: Mutex::new(Vec::new()),
        stop_posting: AtomicBool::new(false),
        post_failures: AtomicU64::new(0),
        confirmed: AtomicUsize::new(0),
        received: AtomicU64::new(0),
        steady_errors: AtomicU64::new(0),
        churn: AtomicU64::new(0),
        churn_by_method: Default::default(),
        churn_bad_token: AtomicU64::new(0),
        churn_events: AtomicU64::new(0),
        churn_errors: AtomicU64::new(0),
        slow_cycles: AtomicU64::new(0),
        slow_closed: AtomicU64::new(0),
        dead_cycles: AtomicU64::new(0),
        side_errors: AtomicU64::new(0),
        paused: AtomicUsize::new(0),
        first_errors: Mutex::new(Vec::new()),
        next_probe: AtomicU64::new(0),
    });
    let specs = Arc::new(steady_specs(o));
    let mut steady_on = [0u64; 2];
    for s in specs.iter() {
        steady_on[s.instance] += 1;
    }
    eprintln!(
        "[chaos] A {} (pid {}), B {} (pid {}), Redis :{}; {} steady clients ({} subscriptions) over {} libraries",
        insts[0].addr,
        insts[0].pid(),
        insts[1].addr,
        insts[1].pid(),
        redis.port,
        o.steady,
        specs.iter().map(|s| s.subs.len()).sum::<usize>(),
        o.libraries + 1
    );
    let (steady_stop, steady_rx) = watch::channel(false);
    let steady: Vec<_> = (0..o.steady)
        .map(|i| tokio::spawn(steady_task(i, specs.clone(), sh.clone(), steady_rx.clone())))
        .collect();
    drop(steady_rx);
    let all = wait_for(TInstant::now() + SETUP_DEADLINE, || {
        sh.confirmed.load(Relaxed) + sh.steady_errors.load(Relaxed) as usize >= o.steady
    })
    .await;
    if !all || sh.confirmed.load(Relaxed) < o.steady {
        problems.push(format!(
            "only {} of {} steady clients confirmed",
            sh.confirmed.load(Relaxed),
            o.steady
        ));
    }

    // Everything starts now; t counts from here.
    let sh_t0 = sh.secs();
    let rel = move |sh: &Shared| sh.secs() - sh_t0;
    let poster = spawn_poster(sh.clone(), o.clone(), sched.burst_every + sh_t0);
    let (phase, phase_rx) = watch::channel(Phase::Run);
    let mut loops = Vec::new();
    for id in 0..o.churners {
        loops.push(tokio::spawn(churner(id, sh.clone(), phase_rx.clone())));
    }
    for id in 0..o.slow {
        loops.push(tokio::spawn(misbehaver(id, true, sh.clone(), phase_rx.clone())));
    }
    for id in 0..o.dead {
        loops.push(tokio::spawn(misbehaver(id, false, sh.clone(), phase_rx.clone())));
    }
    drop(phase_rx);
    let n_loops = loops.len();

    let mut env = Env {
        sh: &sh,
        insts,
        redis,
        db,
        problems: &mut problems,
        faults: Faults::default(),
    };
    let mut series: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    for (i, inst) in insts.iter().enumerate() {
        let mut s = sample(&sh, inst).await;
        s.t = 0;
        series[i].push(s);
    }
    let end = o.seconds;
    let mut next_sample = sched.sample_every;
    let mut next_hup = sched.hup_every * 0.5;
    let mut hups = 0usize;
    let mut next_usr1 = sched.usr1_every * 0.7;
    let mut usr1s = 0usize;
    let mut next_redis = sched.redis_every * 0.6;
    let mut warm: Option<Vec<Quiet>> = None;
    let mut pause_total = 0.0;
    // Faults stop a little before the end so that the final reading is not in one.
    let faults_until = end - (sched.hup_every / 2.0).min(60.0);
    loop {
        let now = rel(&sh) - pause_total;
        if now >= end {
            break;
        }
        if warm.is_none() && now >= sched.warmup {
            let p0 = rel(&sh);
            let q = quiesce(&sh, &phase, n_loops, insts, &steady_on, env.problems).await;
            eprintln!(
                "[chaos] t={now:.0}s: warm-up reading: A {} KiB {} fds, B {} KiB {} fds",
                q[0].rss_kb, q[0].fds, q[1].rss_kb, q[1].fds
            );
            warm = Some(q);
            let _ = phase.send(Phase::Run);
            pause_total += rel(&sh) - p0;
            continue;
        }
        if now >= next_sample {
            next_sample += sched.sample_every;
            let mut line = format!("[chaos] t={now:.0}s:");
            for (i, inst) in insts.iter().enumerate() {
                let mut s = sample(&sh, inst).await;
                s.t = now.round() as u64;
                let _ = write!(
                    line,
                    " {} {} KiB {} fds {:.1} s CPU {} deliveries;",
                    inst.name, s.rss_kb, s.fds, s.cpu_s, s.deliveries
                );
                series[i].push(s);
            }
            let posted = sh.posted.lock().unwrap().len();
            let errors =
                sh.steady_errors.load(Relaxed) + sh.churn_errors.load(Relaxed) + sh.post_failures.load(Relaxed);
            eprintln!(
                "{line} {posted} events, {} churn connections, {errors} errors",
                sh.churn.load(Relaxed)
            );
            continue;
        }
        if now < faults_until {
            if now >= next_hup {
                next_hup += sched.hup_every;
                env.reload(hups % 3).await;
                hups += 1;
                continue;
            }
            if now >= next_usr1 {
                next_usr1 += sched.usr1_every;
                env.reopen_log(usr1s % 2).await;
                usr1s += 1;
                continue;
            }
            if now >= next_redis {
                next_redis += sched.redis_every;
                env.restart_redis().await;
                continue;
            }
        }
        let wake = [next_sample, next_hup, next_usr1, next_redis, end]
            .into_iter()
            .fold(f64::INFINITY, f64::min);
        let wait = (wake - now).clamp(0.01, 1.0);
        sleep(Duration::from_secs_f64(wait)).await;
    }
    // The final reading, in the same quiet state as the warm-up one.
    for (i, inst) in insts.iter().enumerate() {
        let mut s = sample(&sh, inst).await;
        s.t = (rel(&sh) - pause_total).round() as u64;
        series[i].push(s);
    }
    sh.stop_posting.store(true, Relaxed);
    let stop_deadline = TInstant::now() + QUIESCE_DEADLINE;
    if !wait_for(stop_deadline, || poster.is_finished()).await {
        env.problems.push("the poster did not stop in time".into());
    }
    let end_quiet = quiesce(&sh, &phase, n_loops, insts, &steady_on, env.problems).await;
    let _ = phase.send(Phase::Stop);
    for l in loops {
        if timeout_at(TInstant::now() + QUIESCE_DEADLINE, l).await.is_err() {
            env.problems.push("a loop did not stop in time".into());
        }
    }
    // Deliveries settle: everything expected, or nothing new for 5 s.
    let posted: Vec<Posted> = sh.posted.lock().unwrap().clone();
    let mut last = (sh.received.load(Relaxed), TInstant::now());
    let deadline = TInstant::now() + DELIVERY_DEADLINE;
    while TInstant::now() < deadline {
        sleep(Duration::from_millis(200)).await;
        let r = sh.received.load(Relaxed);
        if r != last.0 {
            last = (r, TInstant::now());
        } else if last.1.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    let _ = steady_stop.send(true);
    let mut got = Vec::new();
    for h in steady {
        got.push(match timeout(Duration::from_secs(10), h).await {
            Ok(Ok(r)) => r,
            _ => {
                env.problems.push("a steady client did not finish in time".into());
                Received { per_sub: Vec::new() }
            }
        });
    }
    let faults = std::mem::take(&mut env.faults);
    let t = tally(&specs, &got, &posted, &faults.redis_windows, &sh);

    // Figures and verdict.
    let warm = warm.unwrap_or_default();
    let mut rss_drift = Vec::new();
    let mut fd_drift = Vec::new();
    for (i, inst) in insts.iter().enumerate() {
        let (Some(w), Some(e)) = (warm.get(i), end_quiet.get(i)) else {
            problems.push("no warm-up reading".into());
            continue;
        };
        let d = e.rss_kb as i64 - w.rss_kb as i64;
        let f = e.fds as i64 - w.fds as i64;
        if d.abs() > MAX_DRIFT_KB {
            problems.push(format!("instance {}: RSS drift {d} KiB", inst.name));
        }
        if f.abs() > MAX_FD_DRIFT {
            problems.push(format!("instance {}: descriptor drift {f}", inst.name));
        }
        rss_drift.push(d);
        fd_drift.push(f);
    }
    if t.lost > 0 {
        problems.push(format!("{} deliveries lost", t.lost));
    }
    if t.duplicates > 0 {
        problems.push(format!("{} duplicate deliveries", t.duplicates));
    }
    if t.out_of_order > 0 {
        problems.push(format!("{} deliveries out of order", t.out_of_order));
    }
    if t.misdelivered > 0 {
        problems.push(format!(
            "{} events reached subscriptions outside their audience",
            t.misdelivered
        ));
    }
    for (what, n) in [
        ("steady client errors", sh.steady_errors.load(Relaxed)),
        ("churn errors", sh.churn_errors.load(Relaxed)),
        ("slow/dead client errors", sh.side_errors.load(Relaxed)),
        ("failed event posts", sh.post_failures.load(Relaxed)),
    ] {
        if n > 0 {
            problems.push(format!("{n} {what}"));
        }
    }
    let logs = scan_logs(insts);
    if !logs.errors_unexplained.is_empty() {
        problems.push(format!("{} unexplained error lines", logs.errors_unexplained.len()));
    }

    // CPU per delivery over the first and the last window (samples nearest to them).
    let n = series[0].len().min(series[1].len());
    let per_window = ((sched.cpu_window / sched.sample_every).round() as usize).max(1);
    let (cpu_start, cpu_end) = if n > per_window {
        (
            cpu_per_delivery(&series, 0, per_window),
            cpu_per_delivery(&series, n - 1 - per_window, n - 1),
        )
    } else {
        (None, None)
    };
    let per_sample: Vec<f64> = (1..n).filter_map(|i| cpu_per_delivery(&series, i - 1, i)).collect();
    let closes: Vec<String> = {
        let mut v = Vec::new();
        for inst in insts {
            let m = scrape(inst.metrics).await.unwrap_or_default();
            v.push(format!(
                "{}: slow_consumer_bytes {} slow_consumer_time {} pong_timeout {}",
                inst.name,
                metric_one(&m, "notification_closes_total{reason=\"slow_consumer_bytes\"}"),
                metric_one(&m, "notification_closes_total{reason=\"slow_consumer_time\"}"),
                metric_one(&m, "notification_closes_total{reason=\"pong_timeout\"}"),
            ));
        }
        v
    };

    let mut out = Fields::default();
    out.put("seconds", o.seconds);
    out.put("steady", o.steady);
    out.put("libraries", o.libraries + 1);
    out.put("users", o.users);
    out.put("groups", o.groups);
    out.put("churners", o.churners);
    out.put("rate", o.rate);
    out.put("burst", o.burst);
    out.put("slow", o.slow);
    out.put("dead", o.dead);
    out.put("events_posted", posted.iter().filter(|p| p.ok).count());
    out.put("event_post_failures", sh.post_failures.load(Relaxed));
    out.put(
        "deliveries",
        json!({
            "expected": t.expected, "received": t.received, "lost": t.lost,
            "duplicates": t.duplicates, "out_of_order": t.out_of_order, "outside_audience": t.misdelivered,
            "cross_instance_in_redis_outage": {"expected": t.outage_expected, "lost": t.outage_lost, "duplicates": t.outage_duplicates},
            "first_lost": t.first_lost,
        }),
    );
    out.put("steady_errors", sh.steady_errors.load(Relaxed));
    out.put(
        "churn",
        json!({
            "connections": sh.churn.load(Relaxed),
            "by_method": METHOD_NAMES.iter().enumerate().map(|(i, m)| (m.to_string(), json!(sh.churn_by_method[i].load(Relaxed)))).collect::<serde_json::Map<_, _>>(),
            "bad_token": sh.churn_bad_token.load(Relaxed),
            "events_received": sh.churn_events.load(Relaxed),
            "errors": sh.churn_errors.load(Relaxed),
        }),
    );
    out.put("slow_client_cycles", sh.slow_cycles.load(Relaxed));
    out.put("slow_clients_closed_by_server", sh.slow_closed.load(Relaxed));
    out.put("dead_client_cycles", sh.dead_cycles.load(Relaxed));
    out.put("server_closes", &closes);
    out.put("faults", &faults);
    out.put("first_errors", sh.first_errors.lock().unwrap().clone());
    out.put("samples_a", &series[0]);
    out.put("samples_b", &series[1]);
    out.put("quiet_warm", &warm);
    out.put("quiet_end", &end_quiet);
    out.put("rss_drift_kb", &rss_drift);
    out.put("fd_drift", &fd_drift);
    out.put("cpu_us_per_delivery_start", cpu_start);
    out.put("cpu_us_per_delivery_end", cpu_end);
    out.put("cpu_us_per_delivery_median_sample", median(per_sample));
    out.put("log_errors", logs.errors);
    out.put("log_errors_by_cause", &logs.errors_by_cause);
    out.put("log_errors_unexplained", &logs.errors_unexplained);
    out.put("log_warnings", logs.warnings);
    out.put("log_warnings_by_cause", &logs.warnings_by_cause);
    out.put("log_warnings_other_first", &logs.warnings_unexplained);

    eprintln!("[chaos] ---- summary ----");
    eprintln!(
        "[chaos] deliveries to steady clients: expected {} received {} lost {} duplicates {} out of order {}",
        t.expected, t.received, t.lost, t.duplicates, t.out_of_order
    );
    eprintln!(
        "[chaos] cross-instance during Redis outages (excused): expected {} lost {} duplicates {}",
        t.outage_expected, t.outage_lost, t.outage_duplicates
    );
    eprintln!(
        "[chaos] faults: {} reloads, {} key rotations, {} refused reloads, {} log reopens, {} Redis restarts (recovery {:?} s)",
        faults.reloads,
        faults.key_rotations,
        faults.refused_reloads,
        faults.log_reopens,
        faults.redis_restarts,
        faults
            .redis_recovery_s
            .iter()
            .map(|s| (s * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
    eprintln!(
        "[chaos] churn {} connections, {} errors; {closes:?}",
        sh.churn.load(Relaxed),
        sh.churn_errors.load(Relaxed)
    );
    for (i, inst) in insts.iter().enumerate() {
        if let (Some(w), Some(e)) = (warm.get(i), end_quiet.get(i)) {
            eprintln!(
                "[chaos] {}: quiet RSS {} -> {} KiB ({:+}), descriptors {} -> {} ({:+})",
                inst.name,
                w.rss_kb,
                e.rss_kb,
                e.rss_kb as i64 - w.rss_kb as i64,
                w.fds,
                e.fds,
                e.fds as i64 - w.fds as i64
            );
        }
    }
    eprintln!("[chaos] CPU per delivery: start {cpu_start:?} us, end {cpu_end:?} us");
    eprintln!(
        "[chaos] log: {} error lines ({} unexplained) {:?}, {} warnings {:?}",
        logs.errors,
        logs.errors_unexplained.len(),
        logs.errors_by_cause,
        logs.warnings,
        logs.warnings_by_cause
    );
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
    if let Err(e) = raise_nofile_limit() {
        eprintln!("[chaos] cannot raise RLIMIT_NOFILE: {e}");
    }
    let sched = Schedule::new(o.seconds);
    let bin = o
        .server_bin
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_notification-server")));
    let root = match &o.keep {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("nschaos-{}", std::process::id())),
    };
    let setup = || -> Result<(Redis, Vec<Instance>, PathBuf, String), String> {
        std::fs::create_dir_all(&root).map_err(|e| format!("mkdir {}: {e}", root.display()))?;
        let db = root.join("groupmgr.db");
        let _ = std::fs::remove_file(&db);
        write_group_db(&db, o.users, o.groups)?;
        let redis = Redis::start(&root)?;
        let key = random_key();
        let url = redis.url();
        let mut insts = Vec::new();
        for name in ["A", "B"] {
            insts.push(Instance::start(name, &bin, &root, |m| {
                instance_conf(&key, &url, &db, m, false)
            })?);
        }
        Ok((redis, insts, db, key))
    };
    let (mut redis, mut insts, db, key) = match setup() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("[chaos] {e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (mut out, mut problems) = rt.block_on(run(&o, &sched, &insts, &mut redis, db, &key));
    for inst in &mut insts {
        if let Ok(Some(status)) = inst.child.try_wait() {
            problems.push(format!("instance {} exited during the run: {status}", inst.name));
        }
        inst.stop();
    }
    redis.kill();
    out.put("problems", &problems);
    out.put("verdict", if problems.is_empty() { "pass" } else { "fail" });
    eprintln!(
        "[chaos] verdict: {}{}",
        if problems.is_empty() { "pass" } else { "FAIL: " },
        problems.join("; ")
    );
    drop(insts);
    if o.keep.is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{out}");
    let _ = stdout.flush();
    std::process::exit(if problems.is_empty() { 0 } else { 1 });
}
