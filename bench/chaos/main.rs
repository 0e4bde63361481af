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
//! # Shapes (issues 17 and 18)
//!
//! `--shape NAME[,NAME]` or `--shape all` runs short hostile and bounds shapes instead
//! of the mix, each on fresh instances, each bounded in count and time: `amplification`
//! (connections that never read send ~256 KiB subscribe messages of ~87,000 empty
//! entries: peak RSS, `/ping` latency, RSS after they leave), `idle-slots` (websockets
//! that never subscribe fill `max_connections`: do a new client and `/ping` get in?),
//! `log-flood` (8 KB `X-Forwarded-For` upgrades followed by an unmasked frame, and
//! malformed requests: log bytes per second and per connection), `bus-burst` (a burst
//! posted to A reaching B's subscribers through Redis, next to the same burst posted to
//! B: B's peak RSS, pending deliveries and unsent output) and `gate-burst` (group-scoped
//! events held by a locked SQLite group database and released together, next to the
//! same burst of `repo-update`). A shape fails the run when a bound is crossed: peak RSS
//! over the budget plus a margin, `/ping` too slow, output over the budget, too many log
//! bytes. Sizes, bounds and their flags: the doc comment of `shapes.rs`.
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

mod actors;
mod bursts;
mod cluster;
#[path = "../common/mod.rs"]
mod common;
mod faults;
mod hostile;
mod population;
mod run;
mod shapes;

use common::{num, parse_flags, raise_nofile_limit, random_key};
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use crate::cluster::{Instance, Redis, instance_conf};
use crate::population::write_group_db;
use crate::run::run;
use crate::shapes::{Ground, SHAPES, ShapeOpts, run_shapes};

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
    /// Run these shapes (`--shape a,b` or `all`) instead of the mix.
    shape: Option<String>,
    shapes: ShapeOpts,
}

const USAGE: &str = "usage: cargo bench --bench chaos -- [--seconds 3600] [--steady 200] [--libraries 60] \
[--users 40] [--groups 6] [--churners 8] [--rate 30] [--burst 300] [--slow 3] [--dead 3] \
[--server-bin PATH] [--keep DIR] | --shape amplification,idle-slots,log-flood,bus-burst,gate-burst|all \
[shape flags, see bench/chaos/shapes.rs]  (see the doc comment of bench/chaos/main.rs)";

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
        shape: None,
        shapes: ShapeOpts::default(),
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
            "--shape" => o.shape = Some(value()?),
            _ => return o.shapes.flag(flag, value),
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
    o.shapes.check()?;
    if let Some(names) = &o.shape
        && names != "all"
        && let Some(bad) = names.split(',').find(|n| !SHAPES.contains(n))
    {
        return Err(format!("unknown shape {bad}: one of {} or all", SHAPES.join(", ")));
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
    if let Some(names) = &o.shape {
        let names: Vec<&str> = if names == "all" {
            SHAPES.to_vec()
        } else {
            names.split(',').collect()
        };
        std::process::exit(shapes_main(&names, &o, bin, root));
    }
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

/// Runs the shapes, prints their result lines; the exit status.
fn shapes_main(names: &[&str], o: &Opts, bin: PathBuf, root: PathBuf) -> i32 {
    if let Err(e) = std::fs::create_dir_all(&root) {
        eprintln!("[chaos] mkdir {}: {e}", root.display());
        return 2;
    }
    let ground = Ground {
        bin,
        root: root.clone(),
        key: random_key(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (lines, pass) = rt.block_on(run_shapes(names, &o.shapes, &ground));
    rt.shutdown_timeout(Duration::from_secs(1));
    if o.keep.is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }
    let mut stdout = std::io::stdout().lock();
    for l in lines {
        let _ = writeln!(stdout, "{l}");
    }
    let _ = stdout.flush();
    if pass { 0 } else { 1 }
}
