//! Load benchmark for the notification server (websocket push server).
//!
//! # Running
//!
//! ```text
//! cargo bench --bench load -- --scenario quick
//! cargo bench --bench load -- --scenario all
//! cargo bench --bench load -- --scenario b --clients 2000
//! cargo bench --bench load -- --scenario a --url ws://127.0.0.1:8083 --pid 1234 --key SECRET
//! ```
//!
//! Without `--url` the program runs the server binary that `cargo bench` built beside it
//! in the bench profile, optimised like release (or `--server-bin PATH`), and for every scenario starts a fresh server with a
//! temporary config dir (port 0, the port is parsed from the `listening on ADDR` log
//! line on stderr), and kills it afterwards.  With `--url` it targets a running server:
//! `--key` (the `jwt_private_key`) is then required, and `--pid` is needed for the
//! RSS and CPU figures (they are `null` without it).
//!
//! # Scenarios (`--scenario a|b|c|d|e|f|quick|all`, default `quick`; `all` = a, b, c, d)
//!
//! | name  | clients | repos | events | delivery phase                                        |
//! |-------|---------|-------|--------|-------------------------------------------------------|
//! | a     | 5000    | 50    | 500    | burst: posted as fast as possible over `--http-conns` |
//! | b     | 5000    | 1     | 20     | one at a time, each waits for its full fan-out        |
//! | c     | 15000   | 150   | 150    | 30 s idle (server pings), then one event per repo     |
//! | d     | 5000    | 500   | 20000  | paced at `--rate` 2000/s for `--duration-s` 10 s      |
//! | e     | 5000    | 1     | 400    | burst of 2 KB events (`--pad 2000`) over 4 connections |
//! | f     | 2000    | 1     | 3000   | burst of small events over 1 connection (6 M deliveries) |
//! | quick | 2000    | 20    | 200    | burst (smoke run, well under a minute)                |
//!
//! Every scenario: the clients connect (bound round-robin to 127.0.0.1..127.0.0.K so
//! more than one ephemeral port range is available), client i subscribes to repo
//! i % repos with its own token, then one "probe" event per repo is posted (and
//! re-posted for repos that are not complete yet) until every client got one: that
//! confirms every subscription and warms up.  Then the delivery phase runs and the
//! clients disconnect.  Event k goes to repo k % repos.  Scenario d uses 500 repos
//! (10 subscribers per event, 20,000 deliveries/s) so that it measures /events under a
//! steady rate rather than the fan-out capacity of a 2-core machine; use `--repos` to
//! change that.  Events are posted from a dedicated thread with its own runtime, so
//! the posters never queue behind the client tasks.
//!
//! # Flags
//!
//! `--clients N --repos R --events E` override the scenario sizes; `--pad BYTES` adds a
//! field of that many bytes to every event (e: 2000);
//! `--rate EV_PER_S --duration-s S` (d; events = rate * duration unless `--events`);
//! `--idle-s S` (c); `--http-conns H` (keep-alive connections posting events: 16 for d,
//! else 4);
//! `--connect-concurrency C` (handshakes in flight, 128); `--source-ips K` (20);
//! `--deadline-s S` (every wait gives up after this, 60); `--threads T` (tokio
//! workers, default: number of CPUs); `--log-level L` (server, info);
//! `--max-connections M` (server config, 30000); `--ping-interval S` and
//! `--pong-timeout S` (server config, default 1 and 5, the official cadence);
//! `--server-bin PATH`;
//! `--url ws://HOST:PORT --pid PID --key KEY` (external server).
//! `--post-url http://HOST:PORT` posts the events to another instance than the clients
//! are connected to (a cluster sharing events through Redis): cross-instance delivery.
//!
//! # Output: one JSON object per scenario on stdout (progress goes to stderr)
//!
//! - `connect_s`, `connect_rate_per_s`: time for all clients to connect, handshake and
//!   send their subscription; clients per second over that time.
//! - `server_rss_idle_kb` (before clients connect), `server_rss_connected_kb` (all
//!   subscriptions confirmed), `rss_per_conn_bytes` = (connected - idle) / clients,
//!   `server_rss_after_close_kb` (clients gone, RSS unchanged for 2 s or 5 s passed);
//!   VmRSS from /proc/PID/status.  `server_rss_peak_kb`: VmHWM (the peak since the
//!   server started) once the deliveries are in.
//! - `latency_us` {p50,p99,max}: per delivery, from just before the POST was written to
//!   the moment the client task read the frame (same monotonic clock).  Includes the
//!   load generator's own scheduling delay, which shares the CPUs with the server.
//! - `fanout_complete_us`: per event, POST send -> last subscriber received it.
//! - `events_http_us`: /events response time (request written -> response read).
//! - `server_cpu_s`: server CPU (user+sys, summed over its threads from
//!   /proc/PID/task/*/schedstat, ns resolution; /proc/PID/stat ticks as fallback)
//!   from the first POST of the delivery phase until the last delivery arrived;
//!   `cpu_us_per_delivery` = that / delivered.  On loopback the sender's write()
//!   also runs the receiving side of TCP, so most of this is kernel time that a real
//!   network would split differently.  `bench_cpu_s`: this program's CPU in
//!   the same window (to judge whether the load side competes for the CPUs).
//! - `keepalive_cpu_us_per_conn_s` (c): server CPU during the idle window divided by
//!   connections * seconds (pings sent, pongs read).  `bench_idle_cpu_s`: this
//!   program's CPU in that window (answering the pings); if it cannot keep up the
//!   server closes connections for pong timeout, seen as `closed_by_server`.
//! - `expected_deliveries` (events posted * subscribers of their repo), `delivered`
//!   (distinct, counted per client with a bitmap), `lost` (must be 0), `duplicates`,
//!   `misrouted` (wrong repo or unknown seq), `unexpected_msgs`, `jwt_expired_msgs`,
//!   `no_newline_msgs` (frame not ending in `\n`), `closed_by_server`,
//!   `pings_received` (websocket pings, all clients, whole run), `http_errors`,
//!   `http_retries` (request retried once on a fresh connection after a reused
//!   keep-alive connection failed before answering).
//! - `loadavg_1m`: the machine's load average at the end of the scenario; with two
//!   cores, anything much above what this benchmark itself adds (about 2) means other
//!   work competed for the CPUs and the timings are pessimistic.
//! - `ok` and `problems`: the program exits 1 if any scenario had a problem (anything
//!   lost, duplicated, misrouted, failed to connect or confirm, HTTP errors, server
//!   died), 2 on bad arguments or when the server cannot be built or started.

#[path = "common/mod.rs"]
mod common;

use common::{
    Fields, FindAddr, Http, Resp, RssSettle, ServerProcess, ServerSpec, num, parse_flags, raise_nofile_limit,
    random_key, rss_kb, settle_rss, unix_now,
};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::{Instant as TInstant, sleep, sleep_until, timeout, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Give up waiting for deliveries when nothing arrived for this long.
const STALL: Duration = Duration::from_secs(10);
/// Probes for incomplete repos are re-posted this often.
const PROBE_REPOST: Duration = Duration::from_millis(500);
/// RSS after the clients left: unchanged for 2 s, at most 5 s.
const RSS_SETTLE: RssSettle = RssSettle {
    every: Duration::from_millis(250),
    readings: 8,
    at_most: Duration::from_secs(5),
};

// ---------------------------------------------------------------------------------
// Clock

static BASE: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds on a monotonic clock shared by posters and receivers.
/// Never 0 after `main` captured the base, so 0 can mean "not sent".
fn now_ns() -> u64 {
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

// ---------------------------------------------------------------------------------
// Options and scenarios

#[derive(Clone, Debug)]
struct Opts {
    scenario: String,
    clients: Option<usize>,
    repos: Option<usize>,
    events: Option<usize>,
    pad: Option<usize>,
    rate: f64,
    duration_s: f64,
    idle_s: f64,
    http_conns: Option<usize>,
    connect_concurrency: usize,
    source_ips: usize,
    deadline: Duration,
    threads: Option<usize>,
    log_level: String,
    max_connections: usize,
    ping_interval: Option<f64>,
    pong_timeout: Option<f64>,
    server_bin: Option<PathBuf>,
    url: Option<String>,
    post_url: Option<String>,
    pid: Option<u32>,
    key: Option<String>,
}

const USAGE: &str = "usage: cargo bench --bench load -- [--scenario a|b|c|d|e|f|quick|all] \
[--clients N] [--repos R] [--events E] [--pad BYTES] [--rate EV_PER_S] [--duration-s S] [--idle-s S] \
[--http-conns H] [--connect-concurrency C] [--source-ips K] [--deadline-s S] [--threads T] \
[--log-level L] [--max-connections M] [--ping-interval S] [--pong-timeout S] [--server-bin PATH] \
[--url ws://HOST:PORT --key KEY [--pid PID]]  (see the doc comment of bench/load.rs)";

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        scenario: "quick".into(),
        clients: None,
        repos: None,
        events: None,
        pad: None,
        rate: 2000.0,
        duration_s: 10.0,
        idle_s: 30.0,
        http_conns: None,
        connect_concurrency: 128,
        source_ips: 20,
        deadline: Duration::from_secs(60),
        threads: None,
        log_level: "info".into(),
        max_connections: 30000,
        ping_interval: None,
        pong_timeout: None,
        server_bin: None,
        url: None,
        post_url: None,
        pid: None,
        key: None,
    };
    parse_flags(USAGE, |flag, value| {
        match flag {
            "--scenario" => o.scenario = value()?,
            "--clients" => o.clients = Some(num(flag, &value()?)?),
            "--repos" => o.repos = Some(num(flag, &value()?)?),
            "--events" => o.events = Some(num(flag, &value()?)?),
            "--pad" => o.pad = Some(num(flag, &value()?)?),
            "--rate" => o.rate = num(flag, &value()?)?,
            "--duration-s" => o.duration_s = num(flag, &value()?)?,
            "--idle-s" => o.idle_s = num(flag, &value()?)?,
            "--http-conns" => o.http_conns = Some(num(flag, &value()?)?),
            "--connect-concurrency" => o.connect_concurrency = num(flag, &value()?)?,
            "--source-ips" => o.source_ips = num(flag, &value()?)?,
            "--deadline-s" => o.deadline = Duration::from_secs_f64(num(flag, &value()?)?),
            "--threads" => o.threads = Some(num(flag, &value()?)?),
            "--log-level" => o.log_level = value()?,
            "--max-connections" => o.max_connections = num(flag, &value()?)?,
            "--ping-interval" => o.ping_interval = Some(num(flag, &value()?)?),
            "--pong-timeout" => o.pong_timeout = Some(num(flag, &value()?)?),
            "--server-bin" => o.server_bin = Some(PathBuf::from(value()?)),
            "--url" => o.url = Some(value()?),
            "--post-url" => o.post_url = Some(value()?),
            "--pid" => o.pid = Some(num(flag, &value()?)?),
            "--key" => o.key = Some(value()?),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if !["a", "b", "c", "d", "e", "f", "quick", "all"].contains(&o.scenario.as_str()) {
        return Err(format!("unknown scenario {}", o.scenario));
    }
    if o.url.is_some() && o.key.is_none() {
        return Err("--url needs --key".into());
    }
    if o.clients == Some(0) || o.repos == Some(0) || o.http_conns == Some(0) {
        return Err("--clients, --repos and --http-conns must be positive".into());
    }
    if o.rate.is_nan() || o.rate <= 0.0 || o.connect_concurrency == 0 || !(1..=254).contains(&o.source_ips) {
        return Err("--rate, --connect-concurrency must be positive, --source-ips 1..254".into());
    }
    Ok(o)
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Post all events as fast as possible over the HTTP connections.
    Burst,
    /// Post one event, wait until all its subscribers got it, post the next.
    Sequential,
    /// Stay idle for `secs`, then post the events as a burst (a liveness check).
    Idle { secs: f64 },
    /// Post at a fixed rate (events per second).
    Paced { rate: f64 },
}

#[derive(Clone, Debug)]
struct Plan {
    name: String,
    clients: usize,
    repos: usize,
    events: usize,
    mode: Mode,
    /// Keep-alive connections posting events.
    http_conns: usize,
    /// Bytes of padding in every event.
    pad: usize,
}

impl Plan {
    fn new(name: &str, o: &Opts) -> Plan {
        let (clients, repos, events, mode) = match name {
            "a" => (5000, 50, 500, Mode::Burst),
            "e" => (5000, 1, 400, Mode::Burst),
            "f" => (2000, 1, 3000, Mode::Burst),
            "b" => (5000, 1, 20, Mode::Sequential),
            "c" => (15000, 150, 0, Mode::Idle { secs: o.idle_s }),
            "d" => {
                let ev = (o.rate * o.duration_s).round() as usize;
                (5000, 500, ev, Mode::Paced { rate: o.rate })
            }
            _ => (2000, 20, 200, Mode::Burst),
        };
        let clients = o.clients.unwrap_or(clients);
        let repos = o.repos.unwrap_or(repos);
        // Scenario c posts one liveness event per repo by default.
        let events = o.events.unwrap_or(if events == 0 { repos } else { events });
        // The paced run is open-loop: enough connections that the response time of
        // one request does not hold back the schedule (4 x 2 ms would cap it at 2000/s).
        let http_conns = o.http_conns.unwrap_or(match name {
            "d" => 16,
            "f" => 1,
            _ => 4,
        });
        let pad = o.pad.unwrap_or(if name == "e" { 2000 } else { 0 });
        Plan {
            pad,
            name: name.into(),
            clients,
            repos,
            events,
            mode,
            http_conns,
        }
    }
}

// ---------------------------------------------------------------------------------
// Statistics

/// Lock-free log-linear histogram of nanosecond values (64 sub-buckets per power of
/// two, so percentiles are within ~1 %); the maximum is exact.
struct Hist {
    counts: Box<[AtomicU64]>,
    max: AtomicU64,
}

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;

impl Hist {
    fn new() -> Hist {
        let n = (2 * SUB + (63 - SUB_BITS as u64) * SUB) as usize;
        Hist {
            counts: (0..n).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
        }
    }

    fn index(v: u64) -> usize {
        if v < 2 * SUB {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // >= SUB_BITS + 1
        let m = (v >> (e - SUB_BITS)) - SUB;
        (2 * SUB + (e - SUB_BITS - 1) as u64 * SUB + m) as usize
    }

    /// Middle of the value range of bucket `i`.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < 2 * SUB {
            return i;
        }
        let j = i - 2 * SUB;
        let shift = j / SUB + 1;
        ((j % SUB + SUB) << shift) + (1 << shift) / 2
    }

    fn record(&self, v: u64) {
        self.counts[Self::index(v)].fetch_add(1, Relaxed);
        self.max.fetch_max(v, Relaxed);
    }

    /// `{"p50":..,"p99":..,"max":..}` in microseconds, or `null` when empty.
    fn summary(&self) -> String {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return "null".into();
        }
        let pct = |q: f64| {
            let target = ((q * total as f64).ceil() as u64).max(1);
            let mut acc = 0;
            for (i, c) in counts.iter().enumerate() {
                acc += c;
                if acc >= target {
                    return Self::value(i);
                }
            }
            self.max.load(Relaxed)
        };
        let max = self.max.load(Relaxed);
        pct_json(pct(0.5).min(max), pct(0.99).min(max), max)
    }
}

/// Exact percentiles of a list of nanosecond values, in microseconds.
fn summary_exact(mut v: Vec<u64>) -> String {
    if v.is_empty() {
        return "null".into();
    }
    v.sort_unstable();
    let pct = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    pct_json(pct(0.5), pct(0.99), v[v.len() - 1])
}

fn pct_json(p50: u64, p99: u64, max: u64) -> String {
    let f = |ns| Value::from(us(ns));
    format!(r#"{{"p50":{},"p99":{},"max":{}}}"#, f(p50), f(p99), f(max))
}

fn us(ns: u64) -> f64 {
    (ns as f64 / 100.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

// ---------------------------------------------------------------------------------
// /proc readings

/// Server CPU time in ns: the sum of the per-thread schedstat run times (ns
/// resolution; a 10 ms tick is too coarse for a short burst), falling back to
/// utime + stime of /proc/PID/stat in clock ticks.
fn cpu_ns(pid: u32) -> Option<u64> {
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        let mut sum = 0u64;
        let mut any = false;
        for ent in dir.flatten() {
            let p = ent.path().join("schedstat");
            if let Some(v) = std::fs::read_to_string(p)
                .ok()
                .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse::<u64>().ok()))
            {
                sum += v;
                any = true;
            }
        }
        if any {
            return Some(sum);
        }
    }
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" closing the command name: state is field 3, utime 14, stime 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as u64,
        _ => 100,
    };
    Some(ticks * 1_000_000_000 / hz)
}

/// The server's peak resident memory since it started (VmHWM), in KiB.
fn rss_peak_kb(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The machine's 1-minute load average: other work on the box skews every figure.
fn loadavg_1m() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// This process's CPU time (user + sys) in ns.
fn self_cpu_ns() -> u64 {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

// ---------------------------------------------------------------------------------
// Server process

/// Starts the server for scenario number `n` with a config built from the options.
fn start_server(bin: &Path, o: &Opts, key: &str, n: usize) -> Result<ServerProcess, String> {
    let mut conf = format!(
        "[notification]\nhost = 127.0.0.1\nport = 0\nlog_level = {}\njwt_private_key = {key}\nmax_connections = {}\n",
        o.log_level, o.max_connections
    );
    if let Some(every) = o.ping_interval {
        conf.push_str(&format!("ping_interval = {every}\n"));
    }
    if let Some(timeout) = o.pong_timeout {
        conf.push_str(&format!("pong_timeout = {timeout}\n"));
    }
    ServerProcess::start(ServerSpec {
        files: vec![("seafile.conf".into(), conf)],
        log_copy: Some("server.log".into()),
        find_addr: FindAddr::LogLine,
        start_timeout: o.deadline.min(Duration::from_secs(30)),
        ..ServerSpec::new(bin, format!("nsbench-{}-{n}", std::process::id()))
    })
}

/// The server under test: either one we started or an external one.
struct Target {
    addr: SocketAddr,
    pid: Option<u32>,
    key: String,
    server: Option<ServerProcess>,
}

fn parse_ws_url(url: &str) -> Result<SocketAddr, String> {
    let hostport = url
        .trim_start_matches("ws://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default();
    use std::net::ToSocketAddrs;
    hostport
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("cannot resolve {url}"))
}

// ---------------------------------------------------------------------------------
// Minimal keep-alive HTTP/1.1 client

// ---------------------------------------------------------------------------------
// Shared run state

/// State shared by the posters, the client tasks and the scenario driver.
struct Shared {
    addr: SocketAddr,
    /// Where events are posted: the same server, or another instance of a cluster
    /// (`--post-url`), to measure cross-instance delivery through Redis.
    post_addr: SocketAddr,
    url: String,
    key: String,
    clients: usize,
    repos: usize,
    events: usize,
    source_ips: usize,
    connect_deadline: TInstant,
    repo_ids: Vec<String>,
    /// Padding added to every event.
    pad: String,
    /// Clients per repo whose websocket opened and whose subscription was sent.
    repo_connected: Vec<AtomicU32>,
    /// Clients per repo that received a probe.
    repo_confirmed: Vec<AtomicU32>,
    /// Per event: send time (0 = not posted), distinct receivers, last receipt time.
    ev_sent_ns: Vec<AtomicU64>,
    ev_got: Vec<AtomicU32>,
    ev_last_ns: Vec<AtomicU64>,
    latency: Hist,
    delivered: AtomicU64,
    last_delivery_ns: AtomicU64,
    connect_done: AtomicUsize,
    connected: AtomicUsize,
    closed_early: AtomicUsize,
    /// Woken when all clients connected, a repo's probes completed, or an event
    /// reached all its subscribers.
    notify: Notify,
    errors: Mutex<Vec<String>>,
}

impl Shared {
    fn note_error(&self, e: String) {
        let mut v = self.errors.lock().unwrap();
        if v.len() < 8 && !v.contains(&e) {
            v.push(e);
        }
    }

    /// Events of repo `r` are k = r, r + repos, ...; bit k / repos in a client's map.
    fn slots_per_repo(&self) -> usize {
        self.events.div_ceil(self.repos)
    }
}

/// Waits until `cond` holds or `deadline` passes; returns whether it holds.
async fn wait_until(notify: &Notify, deadline: TInstant, cond: impl Fn() -> bool) -> bool {
    loop {
        if cond() {
            return true;
        }
        let now = TInstant::now();
        if now >= deadline {
            return cond();
        }
        // The timeout slice is a safety net for a missed wake-up, not the mechanism.
        let _ = timeout_at(deadline.min(now + Duration::from_millis(100)), notify.notified()).await;
    }
}

// ---------------------------------------------------------------------------------
// Websocket clients

type Ws = WebSocketStream<TcpStream>;

/// What one client saw; returned by its task when the run stops.
#[derive(Default)]
struct ClientReport {
    delivered: u64,
    duplicates: u64,
    misrouted: u64,
    unexpected: u64,
    jwt_expired: u64,
    no_newline: u64,
    pings: u64,
    closed_early: bool,
}

struct ClientState {
    repo: usize,
    probed: bool,
    seen: Vec<u64>,
    rep: ClientReport,
}

fn json_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let rest = &text[text.find(key)? + key.len()..];
    Some(rest.trim_start().strip_prefix(':')?.trim_start())
}

fn json_u64(text: &str, key: &str) -> Option<u64> {
    let v = json_after(text, key)?;
    let end = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    v[..end].parse().ok()
}

fn json_str<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let v = json_after(text, key)?.strip_prefix('"')?;
    Some(&v[..v.find('"')?])
}

impl ClientState {
    /// Handles one text frame.  Hand-rolled field scanning instead of a JSON parser
    /// keeps the per-message cost of the load side low.
    fn on_text(&mut self, sh: &Shared, text: &str) {
        let now = now_ns();
        if !text.ends_with('\n') {
            self.rep.no_newline += 1;
        }
        if text.contains("\"jwt-expired\"") {
            self.rep.jwt_expired += 1;
            return;
        }
        if !text.contains("\"repo-update\"") {
            self.rep.unexpected += 1;
            return;
        }
        if json_str(text, "\"repo_id\"") != Some(sh.repo_ids[self.repo].as_str()) {
            self.rep.misrouted += 1;
            return;
        }
        if let Some(seq) = json_u64(text, "\"bench_seq\"") {
            let seq = seq as usize;
            if seq >= sh.events || seq % sh.repos != self.repo {
                self.rep.misrouted += 1;
                return;
            }
            let slot = seq / sh.repos;
            let (word, bit) = (slot / 64, 1u64 << (slot % 64));
            if self.seen[word] & bit != 0 {
                self.rep.duplicates += 1;
                return;
            }
            self.seen[word] |= bit;
            self.rep.delivered += 1;
            let sent = json_u64(text, "\"bench_ts_ns\"").unwrap_or_else(|| sh.ev_sent_ns[seq].load(Relaxed));
            sh.latency.record(now.saturating_sub(sent));
            sh.ev_last_ns[seq].fetch_max(now, Relaxed);
            sh.last_delivery_ns.fetch_max(now, Relaxed);
            sh.delivered.fetch_add(1, Relaxed);
            let got = sh.ev_got[seq].fetch_add(1, Relaxed) + 1;
            if got == sh.repo_connected[self.repo].load(Relaxed) {
                sh.notify.notify_one();
            }
        } else if text.contains("\"bench_probe\"") {
            if !self.probed {
                self.probed = true;
                let c = sh.repo_confirmed[self.repo].fetch_add(1, Relaxed) + 1;
                if c == sh.repo_connected[self.repo].load(Relaxed) {
                    sh.notify.notify_one();
                }
            }
        } else {
            self.rep.unexpected += 1;
        }
    }
}

fn client_token(sh: &Shared, i: usize, repo: usize) -> String {
    let claims = json!({
        "repo_id": sh.repo_ids[repo],
        "username": format!("bench{i}@example.com"),
        "exp": unix_now() + 3600,
    });
    let key = jsonwebtoken::EncodingKey::from_secret(sh.key.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("HS256 encoding cannot fail")
}

async fn connect_client(sh: &Shared, i: usize) -> Result<Ws, String> {
    let sock = match sh.addr {
        SocketAddr::V4(a) => {
            let s = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
            if a.ip().is_loopback() {
                // Spread the clients over several source addresses: each has its own
                // ephemeral port range.
                let src = Ipv4Addr::new(127, 0, 0, 1 + (i % sh.source_ips) as u8);
                s.bind(SocketAddr::new(src.into(), 0))
                    .map_err(|e| format!("bind {src}: {e}"))?;
            }
            s
        }
        SocketAddr::V6(_) => TcpSocket::new_v6().map_err(|e| format!("socket: {e}"))?,
    };
    let stream = sock.connect(sh.addr).await.map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    // Small buffers: the default 128 KiB read buffer per client would dominate the
    // load generator's memory at 15,000 clients.
    let cfg = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::client_async_with_config(sh.url.as_str(), stream, Some(cfg))
        .await
        .map_err(|e| format!("websocket handshake: {e}"))?;
    Ok(ws)
}

async fn client_task(i: usize, sh: Arc<Shared>, sem: Arc<Semaphore>, mut stop: watch::Receiver<bool>) -> ClientReport {
    let repo = i % sh.repos;
    let mut st = ClientState {
        repo,
        probed: false,
        seen: vec![0; sh.slots_per_repo().div_ceil(64)],
        rep: ClientReport::default(),
    };
    let opened = {
        let _permit = sem.acquire().await.expect("semaphore never closed");
        let sub = format!(
            r#"{{"type":"subscribe","content":{{"repos":[{{"id":"{}","jwt_token":"{}"}}]}}}}"#,
            sh.repo_ids[repo],
            client_token(&sh, i, repo)
        );
        timeout_at(sh.connect_deadline, async {
            let mut ws = connect_client(&sh, i).await?;
            ws.send(Message::text(sub))
                .await
                .map_err(|e| format!("send subscribe: {e}"))?;
            Ok::<_, String>(ws)
        })
        .await
        .unwrap_or_else(|_| Err("connect deadline passed".into()))
    };
    let mut ws = match opened {
        Ok(ws) => {
            sh.repo_connected[repo].fetch_add(1, Relaxed);
            sh.connected.fetch_add(1, Relaxed);
            Some(ws)
        }
        Err(e) => {
            sh.note_error(e);
            None
        }
    };
    if sh.connect_done.fetch_add(1, Relaxed) + 1 == sh.clients {
        sh.notify.notify_one();
    }
    let Some(ws_ref) = ws.as_mut() else {
        return st.rep;
    };
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            msg = ws_ref.next() => match msg {
                Some(Ok(Message::Text(t))) => st.on_text(&sh, t.as_str()),
                Some(Ok(Message::Close(frame))) => {
                    sh.note_error(format!("server closed a websocket: {frame:?}"));
                    st.rep.closed_early = true;
                }
                // tungstenite queues the pong and sends it on the next read.
                Some(Ok(Message::Ping(_))) => st.rep.pings += 1,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    sh.note_error(format!("websocket error: {e}"));
                    st.rep.closed_early = true;
                }
                None => {
                    sh.note_error("server dropped a websocket".into());
                    st.rep.closed_early = true;
                }
            }
        }
        if st.rep.closed_early {
            sh.closed_early.fetch_add(1, Relaxed);
            return st.rep;
        }
    }
    let _ = timeout(Duration::from_secs(2), ws_ref.close(None)).await;
    st.rep
}

// ---------------------------------------------------------------------------------
// Posting events

fn events_token(key: &str) -> String {
    let claims = json!({ "exp": unix_now() + 300 });
    let key = jsonwebtoken::EncodingKey::from_secret(key.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("HS256 encoding cannot fail")
}

#[derive(Default)]
struct PostStats {
    http_ns: Vec<u64>,
    errors: u64,
    retries: u64,
    pace_lag_max_ns: u64,
    /// Why posting stopped early (sequential mode).
    stopped: Option<String>,
}

impl PostStats {
    fn merge(&mut self, o: PostStats) {
        self.http_ns.extend(o.http_ns);
        self.errors += o.errors;
        self.retries += o.retries;
        self.pace_lag_max_ns = self.pace_lag_max_ns.max(o.pace_lag_max_ns);
    }
}

/// Posts event `k` (to repo k % repos) and records its send time.
async fn post_event(http: &mut Http, sh: &Shared, token: &str, k: usize, body: &mut String, ps: &mut PostStats) {
    body.clear();
    let t0 = now_ns();
    let _ = write!(
        body,
        r#"{{"type":"repo-update","content":{{"repo_id":"{}","commit_id":"{:040x}","bench_seq":{k},"bench_ts_ns":{t0},"pad":"{}"}}}}"#,
        sh.repo_ids[k % sh.repos],
        k,
        sh.pad
    );
    sh.ev_sent_ns[k].store(t0, Relaxed);
    match http.request("POST", "/events", Some(token), body.as_bytes()).await {
        Ok(r) if r.status == 200 => ps.http_ns.push(now_ns() - t0),
        Ok(r) => {
            ps.errors += 1;
            sh.note_error(format!(
                "POST /events -> {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ));
        }
        Err(e) => {
            ps.errors += 1;
            sh.note_error(format!("POST /events: {e}"));
        }
    }
}

async fn post_probe(http: &mut Http, sh: &Shared, token: &str, r: usize) -> Result<(), String> {
    let body = format!(
        r#"{{"type":"repo-update","content":{{"repo_id":"{}","commit_id":"{:040x}","bench_probe":true}}}}"#,
        sh.repo_ids[r], 0
    );
    match http.request("POST", "/events", Some(token), body.as_bytes()).await? {
        Resp { status: 200, .. } => Ok(()),
        Resp { status, body } => Err(format!(
            "probe POST /events -> {status} {}",
            String::from_utf8_lossy(&body)
        )),
    }
}

/// Runs a poster on its own thread and current-thread runtime.  On the shared
/// runtime a poster whose answer arrived would queue behind the hundreds of client
/// tasks woken by the same fan-out, so the server would sit idle waiting for the next
/// request and the measured /events time would include our scheduling delay.
async fn on_poster_thread<F, Fut>(f: F) -> PostStats
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = PostStats>,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("poster".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("poster runtime");
            let _ = tx.send(rt.block_on(f()));
        })
        .expect("spawn poster thread");
    rx.await.expect("poster thread panicked")
}

/// Posts all events over `conns` keep-alive connections, taking event numbers from a
/// shared counter; with `rate`, event k is not sent before start + k / rate.
async fn post_parallel(
    sh: Arc<Shared>,
    token: Arc<String>,
    conns: usize,
    rate: Option<f64>,
    deadline: TInstant,
) -> PostStats {
    let next = Arc::new(AtomicUsize::new(0));
    let start = TInstant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let (sh, token, next) = (sh.clone(), token.clone(), next.clone());
            tokio::spawn(async move {
                let mut http = Http::new(sh.post_addr);
                let mut ps = PostStats::default();
                let mut body = String::with_capacity(256);
                loop {
                    let k = next.fetch_add(1, Relaxed);
                    if k >= sh.events || TInstant::now() >= deadline {
                        break;
                    }
                    if let Some(rate) = rate {
                        let at = start + Duration::from_secs_f64(k as f64 / rate);
                        sleep_until(at).await;
                        ps.pace_lag_max_ns = ps
                            .pace_lag_max_ns
                            .max(TInstant::now().duration_since(at).as_nanos() as u64);
                    }
                    post_event(&mut http, &sh, &token, k, &mut body, &mut ps).await;
                }
                ps.retries = http.retries;
                ps
            })
        })
        .collect();
    let mut all = PostStats::default();
    for t in tasks {
        if let Ok(ps) = t.await {
            all.merge(ps);
        }
    }
    all
}

/// Posts events one at a time, each only after all its subscribers received the
/// previous one.  Stops at the first event that does not complete in time.
async fn post_sequential(sh: &Shared, token: &str, deadline: Duration) -> PostStats {
    let mut http = Http::new(sh.post_addr);
    let mut ps = PostStats::default();
    let mut body = String::with_capacity(256);
    for k in 0..sh.events {
        post_event(&mut http, sh, token, k, &mut body, &mut ps).await;
        let want = sh.repo_connected[k % sh.repos].load(Relaxed);
        let complete = wait_until(&sh.notify, TInstant::now() + deadline.min(STALL), || {
            sh.ev_got[k].load(Relaxed) >= want
        })
        .await;
        if !complete {
            ps.stopped = Some(format!(
                "event {k} reached {}/{want} subscribers; stopped posting",
                sh.ev_got[k].load(Relaxed)
            ));
            break;
        }
    }
    ps.retries = http.retries;
    ps
}

// ---------------------------------------------------------------------------------
// One scenario

async fn run_scenario(idx: usize, plan: &Plan, o: &Opts, target: &Target) -> (Fields, Vec<String>) {
    let mut problems: Vec<String> = Vec::new();
    let pid = target.pid;
    let deadline = o.deadline;
    let tag = format!("{:08x}-{:04x}", std::process::id(), idx);
    let n_ev = plan.events;
    let post_addr = match &o.post_url {
        Some(u) => parse_ws_url(u).unwrap_or(target.addr),
        None => target.addr,
    };
    let sh = Arc::new(Shared {
        addr: target.addr,
        post_addr,
        url: format!("ws://{}/", target.addr),
        key: target.key.clone(),
        clients: plan.clients,
        repos: plan.repos,
        events: n_ev,
        source_ips: o.source_ips,
        connect_deadline: TInstant::now() + deadline,
        repo_ids: (0..plan.repos).map(|r| format!("{tag}-4000-8000-{r:012x}")).collect(),
        pad: "p".repeat(plan.pad),
        repo_connected: (0..plan.repos).map(|_| AtomicU32::new(0)).collect(),
        repo_confirmed: (0..plan.repos).map(|_| AtomicU32::new(0)).collect(),
        ev_sent_ns: (0..n_ev).map(|_| AtomicU64::new(0)).collect(),
        ev_got: (0..n_ev).map(|_| AtomicU32::new(0)).collect(),
        ev_last_ns: (0..n_ev).map(|_| AtomicU64::new(0)).collect(),
        latency: Hist::new(),
        delivered: AtomicU64::new(0),
        last_delivery_ns: AtomicU64::new(0),
        connect_done: AtomicUsize::new(0),
        connected: AtomicUsize::new(0),
        closed_early: AtomicUsize::new(0),
        notify: Notify::new(),
        errors: Mutex::new(Vec::new()),
    });
    let token = Arc::new(events_token(&target.key));
    eprintln!(
        "[load] scenario {}: {} clients, {} repos, {} events, {:?}",
        plan.name, plan.clients, plan.repos, plan.events, plan.mode
    );

    // Liveness.
    let mut http = Http::new(target.addr);
    match http.request("GET", "/ping", None, b"").await {
        Ok(r) if r.status == 200 => {}
        Ok(r) => problems.push(format!("GET /ping -> {}", r.status)),
        Err(e) => problems.push(format!("GET /ping: {e}")),
    }
    let rss_idle = pid.and_then(rss_kb);

    // Connect and subscribe.
    let (stop_tx, stop_rx) = watch::channel(false);
    let sem = Arc::new(Semaphore::new(o.connect_concurrency));
    let t_conn = Instant::now();
    let handles: Vec<_> = (0..plan.clients)
        .map(|i| tokio::spawn(client_task(i, sh.clone(), sem.clone(), stop_rx.clone())))
        .collect();
    drop(stop_rx);
    wait_until(&sh.notify, sh.connect_deadline, || {
        sh.connect_done.load(Relaxed) >= plan.clients
    })
    .await;
    let connect_s = t_conn.elapsed().as_secs_f64();
    let connected = sh.connected.load(Relaxed);
    let connect_failures = plan.clients - connected;
    if connect_failures > 0 {
        problems.push(format!("{connect_failures} clients failed to connect"));
    }
    eprintln!("[load]   {connected} connected in {connect_s:.2} s");

    // Confirm every subscription with probes.
    let probe_deadline = TInstant::now() + deadline;
    let pending = |sh: &Shared| -> Vec<usize> {
        (0..sh.repos)
            .filter(|&r| sh.repo_confirmed[r].load(Relaxed) < sh.repo_connected[r].load(Relaxed))
            .collect()
    };
    let mut probe_rounds = 0;
    loop {
        let todo = pending(&sh);
        if todo.is_empty() || TInstant::now() >= probe_deadline {
            break;
        }
        probe_rounds += 1;
        for r in todo {
            if let Err(e) = post_probe(&mut http, &sh, &token, r).await {
                sh.note_error(e);
            }
        }
        let round_end = probe_deadline.min(TInstant::now() + PROBE_REPOST);
        wait_until(&sh.notify, round_end, || pending(&sh).is_empty()).await;
    }
    let unconfirmed: u64 = (0..plan.repos)
        .map(|r| (sh.repo_connected[r].load(Relaxed) as u64).saturating_sub(sh.repo_confirmed[r].load(Relaxed) as u64))
        .sum();
    if unconfirmed > 0 {
        problems.push(format!("{unconfirmed} subscriptions never got a probe event"));
    }
    eprintln!("[load]   subscriptions confirmed ({probe_rounds} probe rounds), {unconfirmed} missing");
    let rss_connected = pid.and_then(rss_kb);
    let setup_retries = http.retries;
    drop(http); // would sit idle through the rest of the run

    // Idle window (scenario c).
    let mut keepalive = Value::Null;
    let mut bench_idle_cpu = Value::Null;
    if let Mode::Idle { secs } = plan.mode {
        eprintln!("[load]   idle for {secs} s");
        let c0 = pid.and_then(cpu_ns);
        let b0 = self_cpu_ns();
        sleep(Duration::from_secs_f64(secs)).await;
        let c1 = pid.and_then(cpu_ns);
        bench_idle_cpu = json!(round3(self_cpu_ns().saturating_sub(b0) as f64 / 1e9));
        let alive = connected - sh.closed_early.load(Relaxed);
        if let (Some(c0), Some(c1)) = (c0, c1)
            && alive > 0
            && secs > 0.0
        {
            keepalive = json!(round3(c1.saturating_sub(c0) as f64 / 1000.0 / (alive as f64 * secs)));
        }
    }

    // Delivery phase.
    let cpu0 = pid.and_then(cpu_ns);
    let bcpu0 = self_cpu_ns();
    let t0 = now_ns();
    let post_deadline = TInstant::now() + deadline;
    let ps = match plan.mode {
        _ if connected == 0 => {
            problems.push("no client connected: delivery phase skipped".into());
            PostStats::default()
        }
        mode => {
            let (sh, token, conns) = (sh.clone(), token.clone(), plan.http_conns);
            on_poster_thread(move || async move {
                match mode {
                    Mode::Sequential => post_sequential(&sh, &token, deadline).await,
                    Mode::Paced { rate } => post_parallel(sh, token, conns, Some(rate), post_deadline).await,
                    Mode::Burst | Mode::Idle { .. } => post_parallel(sh, token, conns, None, post_deadline).await,
                }
            })
            .await
        }
    };
    if let Some(why) = &ps.stopped {
        problems.push(why.clone());
    }
    let post_s = (now_ns() - t0) as f64 / 1e9;
    let posted: Vec<usize> = (0..n_ev).filter(|&k| sh.ev_sent_ns[k].load(Relaxed) != 0).collect();
    if posted.len() < n_ev && !matches!(plan.mode, Mode::Sequential) {
        problems.push(format!(
            "only {} of {n_ev} events posted before the deadline",
            posted.len()
        ));
    }
    let expected: u64 = posted
        .iter()
        .map(|&k| sh.repo_connected[k % plan.repos].load(Relaxed) as u64)
        .sum();
    // Wait for the deliveries, giving up early when nothing arrives for STALL.
    let wait_deadline = TInstant::now() + deadline;
    loop {
        let before = sh.delivered.load(Relaxed);
        let slice_end = wait_deadline.min(TInstant::now() + STALL);
        if wait_until(&sh.notify, slice_end, || sh.delivered.load(Relaxed) >= expected).await
            || TInstant::now() >= wait_deadline
            || sh.delivered.load(Relaxed) == before
        {
            break;
        }
    }
    let cpu1 = pid.and_then(cpu_ns);
    let bcpu1 = self_cpu_ns();
    let rss_peak = pid.and_then(rss_peak_kb);
    let last = sh.last_delivery_ns.load(Relaxed).max(t0);
    let delivery_s = (last - t0) as f64 / 1e9;
    eprintln!(
        "[load]   {} events posted in {post_s:.2} s, {}/{expected} delivered in {delivery_s:.2} s",
        posted.len(),
        sh.delivered.load(Relaxed)
    );
    let fanout: Vec<u64> = posted
        .iter()
        .filter(|&&k| {
            let want = sh.repo_connected[k % plan.repos].load(Relaxed);
            want > 0 && sh.ev_got[k].load(Relaxed) >= want
        })
        .map(|&k| {
            sh.ev_last_ns[k]
                .load(Relaxed)
                .saturating_sub(sh.ev_sent_ns[k].load(Relaxed))
        })
        .collect();

    // Disconnect everybody and collect the per-client reports.
    let _ = stop_tx.send(true);
    let mut reports = Vec::with_capacity(handles.len());
    let aborts: Vec<_> = handles.iter().map(|h| h.abort_handle()).collect();
    match timeout(deadline, futures_util::future::join_all(handles)).await {
        Ok(results) => reports.extend(results.into_iter().flatten()),
        Err(_) => {
            problems.push("clients did not finish closing in time".into());
            aborts.iter().for_each(|a| a.abort());
        }
    }
    let rss_after = match pid {
        Some(pid) => settle_rss(pid, &RSS_SETTLE).await,
        None => None,
    };

    // Aggregate.
    let sum = |f: fn(&ClientReport) -> u64| reports.iter().map(f).sum::<u64>();
    let delivered = sum(|r| r.delivered);
    let duplicates = sum(|r| r.duplicates);
    let misrouted = sum(|r| r.misrouted);
    let unexpected = sum(|r| r.unexpected);
    let jwt_expired = sum(|r| r.jwt_expired);
    let no_newline = sum(|r| r.no_newline);
    let closed_by_server = sum(|r| r.closed_early as u64);
    let pings = sum(|r| r.pings);
    let lost = expected.saturating_sub(delivered);
    for (n, what) in [
        (lost, "deliveries lost"),
        (duplicates, "duplicate deliveries"),
        (misrouted, "misrouted frames"),
        (unexpected, "unexpected frames"),
        (jwt_expired, "jwt-expired replies"),
        (closed_by_server, "connections closed by the server"),
        (ps.errors, "/events requests failed"),
    ] {
        if n > 0 {
            problems.push(format!("{n} {what}"));
        }
    }
    if no_newline > 0 {
        // A format deviation, not a delivery failure: reported but not fatal.
        eprintln!("[load]   note: {no_newline} frames did not end with a newline");
    }
    let errors = sh.errors.lock().unwrap().clone();
    if !errors.is_empty() && !problems.is_empty() {
        eprintln!("[load]   first errors: {errors:?}");
    }

    let server_cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let per_conn = match (rss_idle, rss_connected) {
        (Some(i), Some(c)) if connected > 0 => {
            json!((c.saturating_sub(i) * 1024) / connected as u64)
        }
        _ => Value::Null,
    };
    let mut out = Fields::default();
    out.put("scenario", json!(plan.name));
    out.put("clients", json!(plan.clients));
    out.put("repos", json!(plan.repos));
    out.put("events", json!(posted.len()));
    out.put("http_conns", json!(plan.http_conns));
    out.put("pad", json!(plan.pad));
    out.put("connected", json!(connected));
    out.put("connect_failures", json!(connect_failures));
    out.put("unconfirmed_subscriptions", json!(unconfirmed));
    out.put("connect_s", json!(round3(connect_s)));
    out.put(
        "connect_rate_per_s",
        json!((connected as f64 / connect_s.max(1e-9)).round()),
    );
    out.put("server_rss_idle_kb", json!(rss_idle));
    out.put("server_rss_connected_kb", json!(rss_connected));
    out.put("rss_per_conn_bytes", per_conn);
    out.put("server_rss_after_close_kb", json!(rss_after));
    out.put("server_rss_peak_kb", json!(rss_peak));
    out.put("post_s", json!(round3(post_s)));
    out.put("delivery_s", json!(round3(delivery_s)));
    out.put("events_per_s", json!((posted.len() as f64 / post_s.max(1e-9)).round()));
    out.put(
        "deliveries_per_s",
        json!((delivered as f64 / delivery_s.max(1e-9)).round()),
    );
    out.put_raw("latency_us", sh.latency.summary());
    out.put_raw("fanout_complete_us", summary_exact(fanout));
    out.put_raw("events_http_us", summary_exact(ps.http_ns));
    out.put("server_cpu_s", json!(server_cpu.map(|c| round3(c as f64 / 1e9))));
    out.put(
        "cpu_us_per_delivery",
        json!(
            server_cpu
                .filter(|_| delivered > 0)
                .map(|c| round3(c as f64 / 1000.0 / delivered as f64))
        ),
    );
    out.put("keepalive_cpu_us_per_conn_s", keepalive);
    out.put("bench_cpu_s", json!(round3(bcpu1.saturating_sub(bcpu0) as f64 / 1e9)));
    if let Mode::Paced { rate } = plan.mode {
        out.put("target_rate_per_s", json!(rate));
        out.put("pace_lag_max_us", json!(us(ps.pace_lag_max_ns)));
    }
    if let Mode::Idle { secs } = plan.mode {
        out.put("idle_s", json!(secs));
        out.put("bench_idle_cpu_s", bench_idle_cpu);
    }
    out.put("expected_deliveries", json!(expected));
    out.put("delivered", json!(delivered));
    out.put("lost", json!(lost));
    out.put("duplicates", json!(duplicates));
    out.put("misrouted", json!(misrouted));
    out.put("unexpected_msgs", json!(unexpected));
    out.put("jwt_expired_msgs", json!(jwt_expired));
    out.put("no_newline_msgs", json!(no_newline));
    out.put("closed_by_server", json!(closed_by_server));
    out.put("pings_received", json!(pings));
    out.put("http_errors", json!(ps.errors));
    out.put("http_retries", json!(ps.retries + setup_retries));
    out.put("first_errors", json!(errors));
    out.put("loadavg_1m", json!(loadavg_1m()));
    (out, problems)
}

// ---------------------------------------------------------------------------------

fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let _ = now_ns(); // capture the clock base
    // Only for the warning below; 1024 is the usual soft limit.
    let nofile = raise_nofile_limit().unwrap_or(1024);
    let names: Vec<String> = if o.scenario == "all" {
        ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect()
    } else {
        vec![o.scenario.clone()]
    };
    let plans: Vec<Plan> = names.iter().map(|n| Plan::new(n, &o)).collect();
    let max_clients = plans.iter().map(|p| p.clients).max().unwrap_or(0) as u64;
    if max_clients + 200 > nofile {
        eprintln!("[load] warning: RLIMIT_NOFILE is {nofile}, too low for {max_clients} clients");
    }

    let external = match &o.url {
        Some(url) => match parse_ws_url(url) {
            Ok(addr) => Some(addr),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(2);
            }
        },
        None => None,
    };
    let bin = match (&external, &o.server_bin) {
        (Some(_), _) => None,
        (None, Some(b)) => Some(b.clone()),
        // Cargo builds the server binary for benches in the same (optimised) profile and
        // says where it is: no second build.
        (None, None) => Some(PathBuf::from(env!("CARGO_BIN_EXE_notification-server"))),
    };

    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(t) = o.threads {
        rt.worker_threads(t);
    }
    let rt = rt.enable_all().build().expect("tokio runtime");

    let mut all_ok = true;
    for (idx, plan) in plans.iter().enumerate() {
        let mut target = match (&external, &bin) {
            (Some(addr), _) => Target {
                addr: *addr,
                pid: o.pid,
                key: o.key.clone().unwrap_or_default(),
                server: None,
            },
            (None, Some(bin)) => {
                let key = random_key();
                match start_server(bin, &o, &key, idx) {
                    Ok(sp) => {
                        eprintln!(
                            "[load] server {} pid {} listening on {}",
                            bin.display(),
                            sp.pid(),
                            sp.addr
                        );
                        Target {
                            addr: sp.addr,
                            pid: Some(sp.pid()),
                            key,
                            server: Some(sp),
                        }
                    }
                    Err(e) => {
                        eprintln!("[load] {e}");
                        std::process::exit(2);
                    }
                }
            }
            (None, None) => unreachable!("either --url or a server binary"),
        };
        let (mut out, mut problems) = rt.block_on(run_scenario(idx, plan, &o, &target));
        if let Some(sp) = target.server.as_mut() {
            if let Some(status) = sp.exited() {
                problems.push(format!("server exited during the run: {status}"));
            }
            sp.stop();
            out.put("server_log_errors", sp.log.errors.load(Relaxed));
            out.put("server_log_warnings", sp.log.warnings.load(Relaxed));
            if !problems.is_empty() {
                eprintln!("[load]   server log tail:\n{}", sp.log.tail_text());
            }
        }
        drop(target);
        out.put("ok", problems.is_empty());
        out.put("problems", &problems);
        all_ok &= problems.is_empty();
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{out}");
        let _ = stdout.flush();
    }
    std::process::exit(if all_ok { 0 } else { 1 });
}
