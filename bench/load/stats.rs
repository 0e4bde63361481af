//! Latency histograms and percentile summaries, and the /proc readings (CPU, RSS peak,
//! load average) that go beside them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde_json::Value;

// ---------------------------------------------------------------------------------
// Statistics

/// Lock-free log-linear histogram of nanosecond values (64 sub-buckets per power of
/// two, so percentiles are within ~1 %); the maximum is exact.
pub(crate) struct Hist {
    pub(crate) counts: Box<[AtomicU64]>,
    pub(crate) max: AtomicU64,
}

pub(crate) const SUB_BITS: u32 = 6;
pub(crate) const SUB: u64 = 1 << SUB_BITS;

impl Hist {
    pub(crate) fn new() -> Hist {
        let n = (2 * SUB + (63 - SUB_BITS as u64) * SUB) as usize;
        Hist {
            counts: (0..n).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
        }
    }

    pub(crate) fn index(v: u64) -> usize {
        if v < 2 * SUB {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // >= SUB_BITS + 1
        let m = (v >> (e - SUB_BITS)) - SUB;
        (2 * SUB + (e - SUB_BITS - 1) as u64 * SUB + m) as usize
    }

    /// Middle of the value range of bucket `i`.
    pub(crate) fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < 2 * SUB {
            return i;
        }
        let j = i - 2 * SUB;
        let shift = j / SUB + 1;
        ((j % SUB + SUB) << shift) + (1 << shift) / 2
    }

    pub(crate) fn record(&self, v: u64) {
        self.counts[Self::index(v)].fetch_add(1, Relaxed);
        self.max.fetch_max(v, Relaxed);
    }

    /// `{"p50":..,"p99":..,"max":..}` in microseconds, or `null` when empty.
    pub(crate) fn summary(&self) -> String {
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
pub(crate) fn summary_exact(mut v: Vec<u64>) -> String {
    if v.is_empty() {
        return "null".into();
    }
    v.sort_unstable();
    let pct = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    pct_json(pct(0.5), pct(0.99), v[v.len() - 1])
}

pub(crate) fn pct_json(p50: u64, p99: u64, max: u64) -> String {
    let f = |ns| Value::from(us(ns));
    format!(r#"{{"p50":{},"p99":{},"max":{}}}"#, f(p50), f(p99), f(max))
}

pub(crate) fn us(ns: u64) -> f64 {
    (ns as f64 / 100.0).round() / 10.0
}

pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

// ---------------------------------------------------------------------------------
// /proc readings

/// Server CPU time in ns: the sum of the per-thread schedstat run times (ns
/// resolution; a 10 ms tick is too coarse for a short burst), falling back to
/// utime + stime of /proc/PID/stat in clock ticks.
pub(crate) fn cpu_ns(pid: u32) -> Option<u64> {
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
pub(crate) fn rss_peak_kb(pid: u32) -> Option<u64> {
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
pub(crate) fn loadavg_1m() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// This process's CPU time (user + sys) in ns.
pub(crate) fn self_cpu_ns() -> u64 {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
