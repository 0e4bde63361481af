//! The cluster under test: small readings (ports, descriptors, CPU, metrics), the
//! redis-server the instances share, and the instances themselves (config, start, reload,
//! log files).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant as TInstant, sleep, timeout};

use crate::common::{HTTP_TIMEOUT, RssSettle};

// ---------------------------------------------------------------------------------
// Small helpers

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Open descriptors of a process.
pub(crate) fn fd_count(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// User plus system CPU time of a process, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
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
pub(crate) async fn wait_for(deadline: TInstant, mut cond: impl FnMut() -> bool) -> bool {
    while !cond() {
        if TInstant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(20)).await;
    }
    true
}

/// RSS once it stopped moving: two equal readings 250 ms apart, at most 5 s.
pub(crate) const RSS_SETTLE: RssSettle = RssSettle {
    every: Duration::from_millis(250),
    readings: 1,
    at_most: Duration::from_secs(5),
};

/// One scrape of a metrics listener (`Connection: close`, read to the end).
pub(crate) async fn scrape(addr: SocketAddr) -> Option<String> {
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
pub(crate) fn metric_sum(text: &str, name: &str) -> f64 {
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
pub(crate) fn metric_one(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------
// Redis

pub(crate) struct Redis {
    pub(crate) child: Option<Child>,
    pub(crate) port: u16,
    pub(crate) dir: PathBuf,
    pub(crate) restarts: usize,
}

impl Redis {
    pub(crate) fn start(dir: &Path) -> Result<Redis, String> {
        let mut r = Redis {
            child: None,
            port: free_port(),
            dir: dir.to_path_buf(),
            restarts: 0,
        };
        r.spawn()?;
        Ok(r)
    }

    pub(crate) fn spawn(&mut self) -> Result<(), String> {
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

    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(crate) fn url(&self) -> String {
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

pub(crate) struct Instance {
    pub(crate) name: &'static str,
    pub(crate) child: Child,
    pub(crate) dir: PathBuf,
    pub(crate) addr: SocketAddr,
    pub(crate) metrics: SocketAddr,
}

/// The `[notification]` section every instance gets.
pub(crate) fn instance_conf(key: &str, redis_url: &str, db: &Path, metrics: SocketAddr, bad: bool) -> String {
    let port = if bad { "not-a-port" } else { "0" };
    format!(
        "[notification]\nhost = 127.0.0.1\nport = {port}\nlog_level = info\njwt_private_key = {key}\nredis_url = {redis_url}\ngroupmgr_db = {}\nmetrics_listen = {metrics}\n",
        db.display()
    )
}

impl Instance {
    pub(crate) fn log_path(&self) -> PathBuf {
        self.dir.join("notification-server.log")
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn start(
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
            if let Some(addr) = text.lines().find_map(crate::common::parse_listening) {
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

    pub(crate) fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
    }

    /// Every line of every log file of this instance (current and renamed ones).
    pub(crate) fn all_log_lines(&self) -> Vec<String> {
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
    pub(crate) fn count(&self, needle: &str) -> usize {
        self.all_log_lines().iter().filter(|l| l.contains(needle)).count()
    }

    pub(crate) fn stop(&mut self) {
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
pub(crate) async fn wait_logged(insts: &[Instance], needle: &str, before: &[usize], within: Duration) -> bool {
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
