//! The hostile and bounds shapes (issues 17 and 18): short runs, each on fresh instances,
//! that push one path towards an unbounded use of memory, time or log space and check
//! it against a bound derived from the server's configured budgets. `--shape NAME` runs
//! them instead of the mix: `amplification`, `idle-slots`, `log-flood`, `bus-burst`,
//! `gate-burst`, or `all`. Each prints one JSON object on stdout and fails the run (exit
//! 1) when a bound is crossed; every shape is bounded in count and time, loopback only.
//!
//! Bounds (each a flag):
//! - peak RSS (VmHWM of the instance under attack) over what the shape may legitimately
//!   hold (its baseline, the read buffers of the attack, and the output budget
//!   `max_output_bytes` the instances get, `--output-budget-mb` 4: the same bursts taken
//!   through `/events` stay under 1 MiB of unsent output) plus `--rss-margin-mb` (20);
//! - RSS after the attackers left more than `--rss-return-mb` (4) over the baseline;
//! - `/ping` (GET over a keep-alive connection every 10 ms from another connection,
//!   during the attack): p99 over `--ping-p99-ms` (200) or max over `--ping-max-ms`
//!   (2000), a request unanswered in 10 s counting as 10 s;
//! - bursts: unsent output (`notification_output_bytes`, scraped every 20 ms) over the
//!   budget plus `--output-margin-mb` (4);
//! - log flood: more than `--log-bytes-per-attack` (512) log bytes per attack connection.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::time::{Instant as TInstant, sleep};

use crate::cluster::{Instance, metric_sum, scrape};
use crate::common::{Fields, HTTP_TIMEOUT, Http, num, rss_kb};

/// The shapes `--shape all` runs, in order.
pub(crate) const SHAPES: [&str; 5] = ["amplification", "idle-slots", "log-flood", "bus-burst", "gate-burst"];

/// The shapes' sizes and bounds.
#[derive(Clone, Debug)]
pub(crate) struct ShapeOpts {
    /// Connections sending oversized subscribe messages.
    pub(crate) attackers: usize,
    /// Subscribe messages each attacker sends.
    pub(crate) messages: usize,
    /// How long the attackers hold their sockets after sending.
    pub(crate) hold_s: f64,
    /// `max_connections` of the idle-slots instance (every slot is taken).
    pub(crate) slots: usize,
    /// How long a new client and `/ping` may take to get in at the cap.
    pub(crate) admit_s: f64,
    /// Length and concurrency of the log flood, and its most connections.
    pub(crate) flood_s: f64,
    pub(crate) flood_conns: usize,
    pub(crate) flood_max: usize,
    /// Subscribers and events of the bursts.
    pub(crate) burst_clients: usize,
    pub(crate) burst_events: usize,
    /// How long the gate is held shut (the group database locked).
    pub(crate) gate_hold_s: f64,
    pub(crate) output_budget_mb: u64,
    pub(crate) rss_margin_mb: u64,
    pub(crate) rss_return_mb: u64,
    pub(crate) output_margin_mb: u64,
    pub(crate) ping_p99_ms: u64,
    pub(crate) ping_max_ms: u64,
    pub(crate) log_bytes_per_attack: u64,
}

impl Default for ShapeOpts {
    fn default() -> ShapeOpts {
        ShapeOpts {
            attackers: 64,
            messages: 1,
            hold_s: 5.0,
            slots: 500,
            admit_s: 10.0,
            flood_s: 5.0,
            flood_conns: 16,
            flood_max: 20_000,
            burst_clients: 1000,
            burst_events: 5000,
            gate_hold_s: 2.0,
            output_budget_mb: 4,
            rss_margin_mb: 20,
            rss_return_mb: 4,
            output_margin_mb: 4,
            ping_p99_ms: 200,
            ping_max_ms: 2000,
            log_bytes_per_attack: 512,
        }
    }
}

impl ShapeOpts {
    /// Takes one shape flag; `Ok(false)` for a flag that is not one.
    pub(crate) fn flag(
        &mut self,
        flag: &str,
        value: &mut dyn FnMut() -> Result<String, String>,
    ) -> Result<bool, String> {
        match flag {
            "--attackers" => self.attackers = num(flag, &value()?)?,
            "--messages" => self.messages = num(flag, &value()?)?,
            "--hold-s" => self.hold_s = num(flag, &value()?)?,
            "--slots" => self.slots = num(flag, &value()?)?,
            "--admit-s" => self.admit_s = num(flag, &value()?)?,
            "--flood-s" => self.flood_s = num(flag, &value()?)?,
            "--flood-conns" => self.flood_conns = num(flag, &value()?)?,
            "--flood-max" => self.flood_max = num(flag, &value()?)?,
            "--burst-clients" => self.burst_clients = num(flag, &value()?)?,
            "--burst-events" => self.burst_events = num(flag, &value()?)?,
            "--gate-hold-s" => self.gate_hold_s = num(flag, &value()?)?,
            "--output-budget-mb" => self.output_budget_mb = num(flag, &value()?)?,
            "--rss-margin-mb" => self.rss_margin_mb = num(flag, &value()?)?,
            "--rss-return-mb" => self.rss_return_mb = num(flag, &value()?)?,
            "--output-margin-mb" => self.output_margin_mb = num(flag, &value()?)?,
            "--ping-p99-ms" => self.ping_p99_ms = num(flag, &value()?)?,
            "--ping-max-ms" => self.ping_max_ms = num(flag, &value()?)?,
            "--log-bytes-per-attack" => self.log_bytes_per_attack = num(flag, &value()?)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Every count and time positive and bounded, so that each shape stops by itself.
    pub(crate) fn check(&self) -> Result<(), String> {
        let times = [self.hold_s, self.admit_s, self.flood_s, self.gate_hold_s];
        if times.iter().any(|t| !(t.is_finite() && *t > 0.0 && *t <= 600.0)) {
            return Err("shape times must be in (0, 600] seconds".into());
        }
        let counts = [
            self.attackers,
            self.messages,
            self.slots,
            self.flood_conns,
            self.flood_max,
            self.burst_clients,
            self.burst_events,
        ];
        if counts.iter().any(|&c| c == 0 || c > 1_000_000) {
            return Err("shape counts must be in 1..=1000000".into());
        }
        if self.slots > 20_000 || self.burst_clients > 20_000 || self.attackers > 5_000 {
            return Err("--slots and --burst-clients at most 20000, --attackers at most 5000".into());
        }
        if self.gate_hold_s >= 4.0 {
            return Err("--gate-hold-s must stay under the instance's group_lookup_timeout (5 s) minus 1".into());
        }
        Ok(())
    }

    pub(crate) fn budget_bytes(&self) -> u64 {
        self.output_budget_mb << 20
    }
}

/// Where a shape runs: the server binary, a directory of its own, a fresh key.
pub(crate) struct Ground {
    pub(crate) bin: PathBuf,
    pub(crate) root: PathBuf,
    pub(crate) key: String,
}

/// The `[notification]` section of a shape's instance: loopback, info log, metrics, the
/// output budget, and `extra` lines.
pub(crate) fn shape_conf(key: &str, metrics: std::net::SocketAddr, budget: u64, extra: &str) -> String {
    format!(
        "[notification]\nhost = 127.0.0.1\nport = 0\nlog_level = info\njwt_private_key = {key}\nmetrics_listen = {metrics}\nmax_output_bytes = {budget}\n{extra}"
    )
}

impl Ground {
    pub(crate) fn start(&self, name: &'static str, budget: u64, extra: &str) -> Result<Instance, String> {
        let dir = self.root.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        Instance::start(name, &self.bin, &self.root, |m| shape_conf(&self.key, m, budget, extra))
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

// ---------------------------------------------------------------------------------
// Readings

/// The peak resident set of a process since it started (VmHWM).
pub(crate) fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Peaks seen by a [`Watch`].
#[derive(Default, Clone, Copy)]
pub(crate) struct Peaks {
    pub(crate) rss_kb: u64,
    pub(crate) pending_deliveries: f64,
    pub(crate) output_bytes: f64,
    pub(crate) scrapes: u64,
}

/// Samples an instance while a shape runs: VmRSS every 10 ms and, with a metrics
/// address, the pending deliveries and unsent output every 20 ms.
pub(crate) struct Watch {
    stop: Arc<AtomicBool>,
    peaks: Arc<Mutex<Peaks>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Watch {
    pub(crate) fn start(pid: u32, metrics: Option<std::net::SocketAddr>) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks = Arc::new(Mutex::new(Peaks::default()));
        let mut tasks = Vec::new();
        let (s, p) = (stop.clone(), peaks.clone());
        tasks.push(tokio::spawn(async move {
            while !s.load(Relaxed) {
                if let Some(kb) = rss_kb(pid) {
                    let mut p = p.lock().unwrap();
                    p.rss_kb = p.rss_kb.max(kb);
                }
                sleep(Duration::from_millis(10)).await;
            }
        }));
        if let Some(addr) = metrics {
            let (s, p) = (stop.clone(), peaks.clone());
            tasks.push(tokio::spawn(async move {
                while !s.load(Relaxed) {
                    if let Some(text) = scrape(addr).await {
                        let pending = metric_sum(&text, "notification_pending_deliveries");
                        let out = metric_sum(&text, "notification_output_bytes");
                        let mut p = p.lock().unwrap();
                        p.pending_deliveries = p.pending_deliveries.max(pending);
                        p.output_bytes = p.output_bytes.max(out);
                        p.scrapes += 1;
                    }
                    sleep(Duration::from_millis(20)).await;
                }
            }));
        }
        Watch { stop, peaks, tasks }
    }

    pub(crate) async fn finish(self) -> Peaks {
        self.stop.store(true, Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        *self.peaks.lock().unwrap()
    }
}

/// `/ping` answer times, from a keep-alive connection of its own.
pub(crate) struct PingLoop {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(Vec<u64>, u64)>,
}

impl PingLoop {
    /// GET /ping every 10 ms until stopped; at most one minute of them.
    pub(crate) fn start(addr: std::net::SocketAddr) -> PingLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut http = Http::new(addr);
            let (mut times, mut failures) = (Vec::new(), 0u64);
            let until = TInstant::now() + Duration::from_secs(60);
            while !s.load(Relaxed) && TInstant::now() < until {
                let t0 = TInstant::now();
                match http.request("GET", "/ping", None, b"").await {
                    Ok(r) if r.status == 200 => times.push(t0.elapsed().as_micros() as u64),
                    _ => {
                        failures += 1;
                        times.push(t0.elapsed().as_micros().max(HTTP_TIMEOUT.as_micros()) as u64);
                    }
                }
                sleep(Duration::from_millis(10)).await;
            }
            (times, failures)
        });
        PingLoop { stop, task }
    }

    pub(crate) async fn finish(self) -> PingFigures {
        self.stop.store(true, Relaxed);
        let (mut times, failures) = self.task.await.unwrap_or_default();
        times.sort_unstable();
        let at = |q: f64| -> u64 {
            if times.is_empty() {
                0
            } else {
                times[((times.len() - 1) as f64 * q).round() as usize]
            }
        };
        PingFigures {
            count: times.len(),
            failures,
            p50_us: at(0.5),
            p99_us: at(0.99),
            max_us: times.last().copied().unwrap_or(0),
        }
    }
}

pub(crate) struct PingFigures {
    pub(crate) count: usize,
    pub(crate) failures: u64,
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
    pub(crate) max_us: u64,
}

impl PingFigures {
    pub(crate) fn json(&self) -> serde_json::Value {
        json!({"count": self.count, "failures": self.failures, "p50_ms": ms(self.p50_us),
            "p99_ms": ms(self.p99_us), "max_ms": ms(self.max_us)})
    }

    /// The latency bounds; a problem for each one crossed.
    pub(crate) fn check(&self, what: &str, o: &ShapeOpts, problems: &mut Vec<String>) {
        if self.count == 0 {
            problems.push(format!("{what}: no /ping was answered"));
            return;
        }
        if self.p99_us > o.ping_p99_ms * 1000 {
            problems.push(format!(
                "{what}: /ping p99 {} ms over the bound of {} ms",
                ms(self.p99_us),
                o.ping_p99_ms
            ));
        }
        if self.max_us > o.ping_max_ms * 1000 {
            problems.push(format!(
                "{what}: /ping max {} ms over the bound of {} ms",
                ms(self.max_us),
                o.ping_max_ms
            ));
        }
        if self.failures > 0 {
            problems.push(format!("{what}: {} /ping requests failed", self.failures));
        }
    }
}

pub(crate) fn ms(us: u64) -> f64 {
    (us as f64 / 100.0).round() / 10.0
}

/// Peak RSS against the bound: `base_kb` plus `allowed` bytes plus the margin.
pub(crate) fn check_peak(
    what: &str,
    peak_kb: u64,
    base_kb: u64,
    allowed: u64,
    o: &ShapeOpts,
    problems: &mut Vec<String>,
) -> u64 {
    let bound_kb = base_kb + (allowed >> 10) + (o.rss_margin_mb << 10);
    if peak_kb > bound_kb {
        problems.push(format!(
            "{what}: peak RSS {peak_kb} KiB over the bound of {bound_kb} KiB (baseline {base_kb} + allowed {} + margin {})",
            allowed >> 10,
            o.rss_margin_mb << 10
        ));
    }
    bound_kb
}

/// Unsent output against the budget plus its margin.
pub(crate) fn check_output(what: &str, peaks: &Peaks, o: &ShapeOpts, problems: &mut Vec<String>) -> u64 {
    let bound = o.budget_bytes() + (o.output_margin_mb << 20);
    if peaks.output_bytes > bound as f64 {
        problems.push(format!(
            "{what}: unsent output peaked at {} bytes, over the budget {} + margin {}",
            peaks.output_bytes as u64,
            o.budget_bytes(),
            o.output_margin_mb << 20
        ));
    }
    if peaks.scrapes == 0 {
        problems.push(format!("{what}: the metrics listener never answered"));
    }
    bound
}

/// Runs the named shapes one after another; returns one result line each and whether
/// every one passed.
pub(crate) async fn run_shapes(names: &[&str], o: &ShapeOpts, ground: &Ground) -> (Vec<Fields>, bool) {
    let mut lines = Vec::new();
    let mut pass = true;
    for &name in names {
        eprintln!("[chaos] shape {name}");
        let mut problems = Vec::new();
        let mut out = Fields(Vec::new());
        out.put("shape", name);
        let res = match name {
            "amplification" => crate::hostile::amplification(o, ground, &mut out, &mut problems).await,
            "idle-slots" => crate::hostile::idle_slots(o, ground, &mut out, &mut problems).await,
            "log-flood" => crate::hostile::log_flood(o, ground, &mut out, &mut problems).await,
            "bus-burst" => crate::bursts::bus_burst(o, ground, &mut out, &mut problems).await,
            "gate-burst" => crate::bursts::gate_burst(o, ground, &mut out, &mut problems).await,
            _ => Err(format!("unknown shape {name}")),
        };
        if let Err(e) = res {
            problems.push(format!("{name}: {e}"));
        }
        eprintln!(
            "[chaos] shape {name}: {}{}",
            if problems.is_empty() { "pass" } else { "FAIL: " },
            problems.join("; ")
        );
        pass &= problems.is_empty();
        out.put("problems", &problems);
        out.put("verdict", if problems.is_empty() { "pass" } else { "fail" });
        lines.push(out);
    }
    (lines, pass)
}

/// The size of a file, 0 when it is missing.
pub(crate) fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Every `notification_closes_total{reason="..."}` sample of a scrape, by reason.
pub(crate) fn closes_by_reason(metrics: &str) -> serde_json::Map<String, serde_json::Value> {
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("notification_closes_total{reason=\"")?;
            let (reason, rest) = rest.split_once("\"} ")?;
            Some((reason.to_string(), json!(rest.trim().parse::<f64>().ok()?)))
        })
        .collect()
}
