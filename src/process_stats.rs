//! The standard Prometheus process metrics (`process_cpu_seconds_total`,
//! `process_open_fds`, `process_max_fds`, `process_start_time_seconds`,
//! `process_resident_memory_bytes`, `process_virtual_memory_bytes`), read from `/proc` at
//! scrape time.
//!
//! Every Prometheus client library exports these under these names, so stock dashboards
//! and alert rules (CPU, memory, "near the open-file limit", restarts) work unchanged.
//! The parsing is pure and tested on fixed text; [`ProcessStats::read`] does the reads.
//! Where a file cannot be read, the value is 0: a scrape never fails over it.

/// One reading of this process's counters and limits.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    /// User plus system CPU time since start.
    pub cpu_seconds: f64,
    /// Open file descriptors (sockets included).
    pub open_fds: u64,
    /// The soft open-file limit (`RLIMIT_NOFILE`).
    pub max_fds: u64,
    /// Start time, seconds since the Unix epoch.
    pub start_time_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
}

/// The fields of `/proc/self/stat` this module needs.
#[derive(Debug, PartialEq)]
struct Stat {
    /// utime + stime, in clock ticks.
    cpu_ticks: u64,
    /// Start time after boot, in clock ticks.
    start_ticks: u64,
    virtual_bytes: u64,
    resident_pages: u64,
}

impl ProcessStats {
    /// Reads `/proc/self/stat`, `/proc/stat`, `/proc/self/fd` and the open-file limit.
    pub fn read() -> ProcessStats {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let ticks = u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100);
        let page = u64::try_from(page).ok().filter(|p| *p > 0).unwrap_or(4096);
        let stat = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|t| parse_stat(&t));
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|t| boot_time(&t));
        let mut out = ProcessStats {
            open_fds: open_fds(),
            max_fds: max_fds(),
            ..ProcessStats::default()
        };
        if let Some(s) = stat {
            out.cpu_seconds = s.cpu_ticks as f64 / ticks as f64;
            out.virtual_bytes = s.virtual_bytes;
            out.resident_bytes = s.resident_pages.saturating_mul(page);
            if let Some(boot) = boot {
                out.start_time_seconds = boot as f64 + s.start_ticks as f64 / ticks as f64;
            }
        }
        out
    }

    /// The metrics as (name, type, help, value), in the order they are rendered.
    pub fn metrics(&self) -> [(&'static str, &'static str, &'static str, String); 6] {
        [
            (
                "process_cpu_seconds_total",
                "counter",
                "Total user and system CPU time spent in seconds.",
                format!("{:.2}", self.cpu_seconds),
            ),
            (
                "process_open_fds",
                "gauge",
                "Number of open file descriptors.",
                self.open_fds.to_string(),
            ),
            (
                "process_max_fds",
                "gauge",
                "Maximum number of open file descriptors.",
                self.max_fds.to_string(),
            ),
            (
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                format!("{:.2}", self.start_time_seconds),
            ),
            (
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                self.resident_bytes.to_string(),
            ),
            (
                "process_virtual_memory_bytes",
                "gauge",
                "Virtual memory size in bytes.",
                self.virtual_bytes.to_string(),
            ),
        ]
    }
}

/// Parses `/proc/[pid]/stat`. The command name (field 2) is in parentheses and may hold
/// spaces and parentheses itself, so the fields are counted after its last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    // rest starts at field 3 (state): field n is at index n - 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some(Stat {
        cpu_ticks: field(14)?.saturating_add(field(15)?),
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
        resident_pages: field(24)?,
    })
}

/// The boot time (`btime`, seconds since the epoch) from `/proc/stat`.
fn boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Entries of `/proc/self/fd` (the directory's own descriptor, open while it is listed,
/// is not counted).
fn open_fds() -> u64 {
    match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => (dir.count() as u64).saturating_sub(1),
        Err(_) => 0,
    }
}

/// The soft `RLIMIT_NOFILE` (what `accept` runs into).
fn max_fds() -> u64 {
    nofile_limits().map_or(0, |(soft, _)| soft)
}

/// This process's open-file limits, (soft, hard). Read with `getrlimit64`, whose fields
/// are 64 bits on every target: `rlim_t` is 32 bits on armhf (where `RLIM_INFINITY` is
/// `u32::MAX`), which made a `u64` reading of `getrlimit` fail to build there.
pub fn nofile_limits() -> Option<(u64, u64)> {
    let mut lim = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit64 writes into the struct we own.
    (unsafe { libc::getrlimit64(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some((lim.rlim_cur, lim.rlim_max))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line shaped as the kernel writes it (52 fields), with a command name that has
    /// spaces and parentheses in it, as a renamed process can.
    const STAT: &str = "4242 (notif (srv) x) S 1 4242 4242 0 -1 4194560 2370 0 0 0 \
        150 75 0 0 20 0 4 0 123456 25165824 1536 18446744073709551615 1 1 0 0 0 0 0 \
        4096 17663 0 0 0 17 1 0 0 0 0 0\n";

    #[test]
    fn parses_stat_after_the_last_parenthesis() {
        assert_eq!(
            parse_stat(STAT),
            Some(Stat {
                cpu_ticks: 225,
                start_ticks: 123_456,
                virtual_bytes: 25_165_824,
                resident_pages: 1536,
            })
        );
    }

    #[test]
    fn truncated_or_garbled_stat_is_none() {
        assert_eq!(parse_stat("4242 (x) S 1 2 3"), None);
        assert_eq!(parse_stat("no parenthesis at all"), None);
        assert_eq!(parse_stat(&STAT.replace(" 150 ", " x ")), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn finds_boot_time() {
        let text = "cpu  1 2 3\nintr 5\nctxt 99\nbtime 1764979200\nprocesses 12\n";
        assert_eq!(boot_time(text), Some(1_764_979_200));
        assert_eq!(boot_time("cpu 1 2 3\n"), None);
    }

    #[test]
    fn reads_this_process() {
        let p = ProcessStats::read();
        assert!(p.resident_bytes > 0, "{p:?}");
        assert!(p.virtual_bytes >= p.resident_bytes, "{p:?}");
        assert!(p.open_fds >= 3 && p.open_fds <= p.max_fds, "{p:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // Started within the last day and not in the future (a second of rounding).
        assert!(
            p.start_time_seconds > now - 86_400.0 && p.start_time_seconds < now + 1.0,
            "{p:?}"
        );
        let cpu = ProcessStats::read().cpu_seconds;
        assert!(cpu >= p.cpu_seconds, "CPU time went back: {cpu} < {}", p.cpu_seconds);
    }

    #[test]
    fn renders_six_standard_metrics() {
        let p = ProcessStats {
            cpu_seconds: 2.25,
            open_fds: 12,
            max_fds: 1024,
            start_time_seconds: 1_764_979_201.5,
            resident_bytes: 6_291_456,
            virtual_bytes: 25_165_824,
        };
        let m = p.metrics();
        let pairs: Vec<_> = m.iter().map(|(n, _, _, v)| (*n, v.as_str())).collect();
        assert_eq!(
            pairs,
            [
                ("process_cpu_seconds_total", "2.25"),
                ("process_open_fds", "12"),
                ("process_max_fds", "1024"),
                ("process_start_time_seconds", "1764979201.50"),
                ("process_resident_memory_bytes", "6291456"),
                ("process_virtual_memory_bytes", "25165824"),
            ]
        );
        assert_eq!(m[0].1, "counter");
        assert!(m[1..].iter().all(|(_, kind, _, _)| *kind == "gauge"));
    }
}
