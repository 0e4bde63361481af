//! Samples and quiet readings of each instance, the faults injected (reloads, key
//! rotation, log rotation, Redis restarts) and the scan of their logs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant as TInstant, sleep};

use crate::cluster::{
    Instance, RSS_SETTLE, Redis, cpu_seconds, fd_count, instance_conf, metric_sum, scrape, wait_for, wait_logged,
};
use crate::common::{random_key, rss_kb, settle_rss};
use crate::population::{Phase, Shared};
use crate::{QUIESCE_DEADLINE, REDIS_RECOVERY_DEADLINE};

// ---------------------------------------------------------------------------------
// Samples

#[derive(Clone, Copy, Default, serde::Serialize)]
pub(crate) struct Sample {
    pub(crate) t: u64,
    pub(crate) rss_kb: u64,
    pub(crate) fds: u64,
    pub(crate) cpu_s: f64,
    pub(crate) deliveries: u64,
}

pub(crate) async fn sample(sh: &Shared, inst: &Instance) -> Sample {
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
pub(crate) struct Quiet {
    pub(crate) rss_kb: u64,
    pub(crate) fds: u64,
    pub(crate) connections: u64,
}

pub(crate) async fn quiesce(
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
pub(crate) struct Faults {
    pub(crate) reloads: usize,
    pub(crate) key_rotations: usize,
    pub(crate) refused_reloads: usize,
    pub(crate) log_reopens: usize,
    pub(crate) redis_restarts: usize,
    /// Seconds (since start) of each Redis outage: kill - 1 s .. both resubscribed + 2 s.
    pub(crate) redis_windows: Vec<(f64, f64)>,
    /// Seconds from the kill until both instances were subscribed again.
    pub(crate) redis_recovery_s: Vec<f64>,
}

pub(crate) struct Env<'a> {
    pub(crate) sh: &'a Shared,
    pub(crate) insts: &'a [Instance],
    pub(crate) redis: &'a mut Redis,
    pub(crate) db: PathBuf,
    pub(crate) problems: &'a mut Vec<String>,
    pub(crate) faults: Faults,
}

impl Env<'_> {
    pub(crate) fn write_confs(&mut self, key: &str, bad: bool) {
        for inst in self.insts {
            let text = instance_conf(key, &self.redis.url(), &self.db, inst.metrics, bad);
            if let Err(e) = std::fs::write(inst.dir.join("seafile.conf"), text) {
                self.problems.push(format!("write the config of {}: {e}", inst.name));
            }
        }
    }

    /// SIGHUP to both instances: `kind` 0 plain, 1 key rotation, 2 refused (bad file).
    pub(crate) async fn reload(&mut self, kind: usize) {
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
    pub(crate) async fn reopen_log(&mut self, which: usize) {
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
    pub(crate) async fn restart_redis(&mut self) {
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
pub(crate) const EXPLAINED: &[(&str, &str)] = &[
    ("reload refused", "refused reload (injected bad seafile.conf)"),
    ("bus:", "Redis restart"),
    ("slow consumer", "slow clients"),
    ("slow_consumer", "slow clients"),
    ("unsent", "slow clients"),
    ("pong", "dead clients"),
];

pub(crate) fn cause(line: &str) -> Option<&'static str> {
    EXPLAINED.iter().find(|(s, _)| line.contains(s)).map(|(_, c)| *c)
}

#[derive(Default)]
pub(crate) struct LogReport {
    pub(crate) errors: usize,
    pub(crate) errors_unexplained: Vec<String>,
    pub(crate) errors_by_cause: BTreeMap<String, usize>,
    pub(crate) warnings: usize,
    pub(crate) warnings_by_cause: BTreeMap<String, usize>,
    pub(crate) warnings_unexplained: Vec<String>,
}

pub(crate) fn scan_logs(insts: &[Instance]) -> LogReport {
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
