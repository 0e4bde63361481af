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
//! - `latency_from_intended_us`, `fanout_complete_from_intended_us`: the same two, timed
//!   from when the event was meant to be sent instead of when its POST went out: the
//!   start of the delivery phase for a burst (a, e, f, quick, c), its slot start + k /
//!   rate when paced (d), and the POST itself for b (which by design sends each event
//!   only after the previous one reached everybody).  A sender posts only after its
//!   previous POST was answered, so a server that holds `/events` back keeps it waiting;
//!   the POST-timed figures leave that wait out (coordinated omission), these count it.
//!   They are what a user waits for an event that happened at the burst's start.
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

mod client;
#[path = "../common/mod.rs"]
mod common;
mod post;
mod scenario;
mod stats;

use common::{FindAddr, RssSettle, ServerProcess, ServerSpec, num, parse_flags, raise_nofile_limit, random_key};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::scenario::run_scenario;

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
[--url ws://HOST:PORT --key KEY [--pid PID]]  (see the doc comment of bench/load/main.rs)";

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
