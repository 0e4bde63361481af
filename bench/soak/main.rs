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

mod churn;
#[path = "../common/mod.rs"]
mod common;
mod run;
mod state;
mod steady;

use common::{FindAddr, RssSettle, ServerProcess, ServerSpec, num, parse_flags, raise_nofile_limit, random_key};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde_json::Value;

use crate::run::run;
use crate::state::{CloseMethod, METHODS};

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
[--server-bin PATH]  (see the doc comment of bench/soak/main.rs)";

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
