//! What the benchmark programs share: the command-line walker, process and system
//! readings, the server under test (started with a temporary config dir, its log
//! counted), the result line, and a minimal keep-alive HTTP/1.1 client. Each bench is a
//! separate program (`harness = false`, a directory with its `main.rs`) and includes this
//! file with `#[path = "../common/mod.rs"] mod common;`, so a piece one program does not
//! use is not dead code in the others.
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::hash::BuildHasher;
use std::io::{self, BufRead, BufReader, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant as TInstant, sleep, timeout};

/// Walks the command line: `--flag value` or `--flag=value`, skipping the `--bench` that
/// `cargo bench` passes to harness-less benches; `-h`/`--help` prints `usage` and exits.
/// `on_flag(flag, value)` handles one flag, calling `value()` for its argument, and
/// returns `Ok(false)` for a flag it does not know.
pub fn parse_flags(
    usage: &str,
    mut on_flag: impl FnMut(&str, &mut dyn FnMut() -> Result<String, String>) -> Result<bool, String>,
) -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--bench" {
            continue;
        }
        if arg == "-h" || arg == "--help" {
            println!("{usage}");
            std::process::exit(0);
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        if !on_flag(&flag, &mut value)? {
            return Err(format!("unknown argument {arg}"));
        }
    }
    Ok(())
}

/// Parses a flag's value.
pub fn num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("bad value for {flag}: {v}"))
}

/// How long one HTTP request may take before the connection is dropped.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// How [`settle_rss`] decides that the RSS stopped moving.
pub struct RssSettle {
    /// Time between two readings.
    pub every: Duration,
    /// Consecutive readings equal to the one before them that count as settled.
    pub readings: u32,
    /// Give up and return the last reading after this long.
    pub at_most: Duration,
}

/// The server's RSS once it stopped moving (after the clients left, memory freed on
/// their close may take a moment to be returned): read every `s.every` until
/// `s.readings` consecutive readings equal the one before, or `s.at_most` passed.
pub async fn settle_rss(pid: u32, s: &RssSettle) -> Option<u64> {
    let until = TInstant::now() + s.at_most;
    let mut last = rss_kb(pid)?;
    let mut same = 0;
    while TInstant::now() < until && same < s.readings {
        sleep(s.every).await;
        let v = rss_kb(pid)?;
        same = if v == last { same + 1 } else { 0 };
        last = v;
    }
    Some(last)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (a server we spawn inherits it);
/// returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    // SAFETY: all-zero is a valid `rlimit`.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

pub fn random_key() -> String {
    let s = RandomState::new();
    (0..4)
        .map(|i| format!("{:016x}", s.hash_one((i, unix_now()))))
        .collect()
}

/// Parses the address from a log line containing `listening on 127.0.0.1:PORT`.
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let word = rest.split_whitespace().next()?;
    let word = word.trim_start_matches("ws://").trim_start_matches("http://");
    let word = word.trim_matches(|c: char| !(c.is_ascii_alphanumeric() || "[]:.".contains(c)));
    let mut addr: SocketAddr = word.parse().ok()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    Some(addr)
}

// ---------------------------------------------------------------------------------
// The server under test, started by a bench

/// Lines of the server's log kept for a failure report.
const LOG_TAIL_LINES: usize = 20;
/// Warning and error lines kept for the result line.
const LOG_FIRST_LINES: usize = 5;
/// How often a start that looks into /proc checks whether the server is listening.
const START_POLL: Duration = Duration::from_millis(20);
/// How long [`ServerProcess::stop`] waits after SIGTERM before it sends SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// What the server logged, counted while it runs (its stderr is read line by line).
#[derive(Default)]
pub struct LogStats {
    /// Lines with `ERROR`, or a panic message.
    pub errors: AtomicUsize,
    /// Lines with `WARN`.
    pub warnings: AtomicUsize,
    /// The first few warning and error lines, for the report.
    pub first: Mutex<Vec<String>>,
    /// The last lines, for the report of a failed run.
    pub tail: Mutex<VecDeque<String>>,
}

impl LogStats {
    fn note(&self, line: &str) {
        let counter = if line.contains("ERROR") || line.contains("panicked") {
            Some(&self.errors)
        } else if line.contains("WARN") {
            Some(&self.warnings)
        } else {
            None
        };
        if let Some(c) = counter {
            c.fetch_add(1, Relaxed);
            let mut first = self.first.lock().unwrap();
            if first.len() < LOG_FIRST_LINES {
                first.push(line.to_string());
            }
        }
        let mut tail = self.tail.lock().unwrap();
        if tail.len() == LOG_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.to_string());
    }

    pub fn first_lines(&self) -> Vec<String> {
        self.first.lock().unwrap().clone()
    }

    /// The last lines of the log, one per line.
    pub fn tail_text(&self) -> String {
        let tail: Vec<String> = self.tail.lock().unwrap().iter().cloned().collect();
        tail.join("\n")
    }
}

/// See [`ServerSpec::on_log_line`].
pub type LogLineHook = Box<dyn FnMut(&str) + Send>;

/// How [`ServerProcess::start`] learns the address of a server told to use port 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FindAddr {
    /// The `listening on ADDR` log line (logged at `info`).
    LogLine,
    /// That line, or the process's listening socket in /proc as soon as it is bound (at
    /// `warn` and above the server does not log the line).
    LogLineOrProc,
}

/// How to start a server: the config dir, the command line and where to look for its
/// address.  The caller writes the config text; [`ServerSpec::new`] gives the rest
/// defaults.
pub struct ServerSpec {
    pub bin: PathBuf,
    /// Name of the config dir, made under the system's temp dir (`-c DIR`) and removed
    /// when the [`ServerProcess`] is dropped.
    pub dir_name: String,
    /// Files written into that dir before the start: (file name, text), e.g. the
    /// `seafile.conf`.
    pub files: Vec<(String, String)>,
    /// Arguments after `-c DIR -l -` (the log goes to stderr, which is read).
    pub args: Vec<OsString>,
    /// Environment variables set for the server (on top of this program's).
    pub env: Vec<(OsString, OsString)>,
    /// Where the server's stdout goes (default: nowhere).
    pub stdout: Stdio,
    /// A file in the dir that gets a copy of every log line.
    pub log_copy: Option<String>,
    /// Called with every log line as it is read (on the thread that drains stderr),
    /// e.g. to wait for a particular line.
    pub on_log_line: Option<LogLineHook>,
    pub find_addr: FindAddr,
    /// How long the server may take to listen.
    pub start_timeout: Duration,
}

impl ServerSpec {
    pub fn new(bin: impl Into<PathBuf>, dir_name: impl Into<String>) -> ServerSpec {
        ServerSpec {
            bin: bin.into(),
            dir_name: dir_name.into(),
            files: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            stdout: Stdio::null(),
            log_copy: None,
            on_log_line: None,
            find_addr: FindAddr::LogLine,
            start_timeout: Duration::from_secs(30),
        }
    }
}

/// A server this program started; stopped (SIGTERM, then SIGKILL) and its config dir
/// removed when dropped.
pub struct ServerProcess {
    pub child: Child,
    pub dir: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
    pub log: Arc<LogStats>,
    drain: Option<std::thread::JoinHandle<()>>,
}

impl ServerProcess {
    /// Writes the config dir, starts the server and waits until it listens.
    pub fn start(spec: ServerSpec) -> Result<ServerProcess, String> {
        let dir = std::env::temp_dir().join(&spec.dir_name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        for (name, text) in &spec.files {
            std::fs::write(dir.join(name), text).map_err(|e| format!("write {name}: {e}"))?;
        }
        let mut child = Command::new(&spec.bin)
            .arg("-c")
            .arg(&dir)
            .args(["-l", "-"])
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(spec.stdout)
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", spec.bin.display()))?;
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(LogStats::default());
        let (tx, rx) = mpsc::channel::<SocketAddr>();
        let log_copy = spec.log_copy.as_ref().map(|name| dir.join(name));
        let mut on_line = spec.on_log_line;
        // Drain stderr for the whole life of the server so the pipe never fills up.
        let drain = {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut file = log_copy.and_then(|path| std::fs::File::create(path).ok());
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(f) = file.as_mut() {
                        let _ = writeln!(f, "{line}");
                    }
                    if let Some(addr) = parse_listening(&line)
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send(addr);
                    }
                    if let Some(f) = on_line.as_mut() {
                        f(&line);
                    }
                    log.note(&line);
                }
            })
        };
        let mut sp = ServerProcess {
            child,
            dir,
            addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            log,
            drain: Some(drain),
        };
        let found = match spec.find_addr {
            FindAddr::LogLine => rx.recv_timeout(spec.start_timeout).ok(),
            FindAddr::LogLineOrProc => sp.poll_listening(&rx, spec.start_timeout),
        };
        if let Some(addr) = found {
            sp.addr = addr;
            return Ok(sp);
        }
        let status = sp.exited();
        sp.stop();
        let what = match spec.find_addr {
            FindAddr::LogLine => "server did not log `listening on ADDR`",
            FindAddr::LogLineOrProc => "server is not listening",
        };
        Err(format!(
            "{what} (exit status {status:?}); last log lines:\n{}",
            sp.log.tail_text()
        ))
    }

    /// The log line or /proc, whichever tells the address first; /proc has it as soon
    /// as the server has bound its socket (connections made before its loop runs wait
    /// in the listen backlog).  None if the server exits or `wait` passes first.
    fn poll_listening(&mut self, log_line: &mpsc::Receiver<SocketAddr>, wait: Duration) -> Option<SocketAddr> {
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if let Ok(addr) = log_line.try_recv() {
                return Some(addr);
            }
            if let Some(addr) = listening_addr(self.pid()) {
                return Some(addr);
            }
            if self.exited().is_some() {
                break;
            }
            std::thread::sleep(START_POLL);
        }
        None
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the server has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then SIGKILL after [`STOP_GRACE`]; waits for the stderr drain thread.
    pub fn stop(&mut self) {
        if self.exited().is_none() {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            let until = Instant::now() + STOP_GRACE;
            while Instant::now() < until && self.exited().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Some(h) = self.drain.take() {
            let _ = h.join();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The IPv4 address a process listens on: its socket inodes (/proc/PID/fd) matched
/// against the LISTEN entries of /proc/PID/net/tcp.
pub fn listening_addr(pid: u32) -> Option<SocketAddr> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .filter_map(|e| {
            let link = std::fs::read_link(e.path()).ok()?;
            let s = link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?;
            Some(s.to_string())
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    table.lines().skip(1).find_map(|line| {
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[3] != "0A" || !inodes.contains(f[9]) {
            return None;
        }
        let (ip, port) = f[1].split_once(':')?;
        // The address is the raw network-order word printed as a native integer.
        let ip = Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_ne_bytes());
        let port = u16::from_str_radix(port, 16).ok()?;
        Some(SocketAddr::new(ip.into(), port))
    })
}

// ---------------------------------------------------------------------------------
// The result line and the HTTP client

/// The result line: a JSON object whose keys keep their insertion order (a
/// `serde_json::Map` would sort them).  Values are stored as JSON text.
#[derive(Default)]
pub struct Fields(pub Vec<(&'static str, String)>);

impl Fields {
    pub fn put(&mut self, key: &'static str, v: impl serde::Serialize) {
        let text = serde_json::to_string(&v).unwrap_or_else(|_| "null".into());
        self.0.push((key, text));
    }

    /// `json` must already be valid JSON text.
    pub fn put_raw(&mut self, key: &'static str, json: String) {
        self.0.push((key, json));
    }
}

impl std::fmt::Display for Fields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("{")?;
        for (i, (k, v)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            write!(f, "{sep}\"{k}\":{v}")?;
        }
        f.write_str("}")
    }
}

pub struct Http {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    out: Vec<u8>,
    inp: Vec<u8>,
    /// Requests retried on a fresh connection (see [`Http::request`]).
    pub retries: u64,
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    /// Body bytes of the response.
    pub body: Vec<u8>,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Http {
        Http {
            addr,
            stream: None,
            out: Vec::with_capacity(1024),
            inp: Vec::with_capacity(4096),
            retries: 0,
        }
    }

    /// Sends one request; a reused connection that fails before any byte of the
    /// answer arrived (e.g. the server closed an idle keep-alive connection) is retried
    /// once on a fresh connection.
    pub async fn request(&mut self, method: &str, path: &str, auth: Option<&str>, body: &[u8]) -> Result<Resp, String> {
        self.out.clear();
        let _ = write!(self.out, "{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.addr);
        if let Some(token) = auth {
            let _ = write!(self.out, "Authorization: Token {token}\r\n");
        }
        let _ = write!(
            self.out,
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        self.out.extend_from_slice(body);
        loop {
            let fresh = self.stream.is_none();
            if fresh {
                let s = timeout(HTTP_TIMEOUT, TcpStream::connect(self.addr))
                    .await
                    .map_err(|_| "http connect timed out".to_string())?
                    .map_err(|e| format!("http connect: {e}"))?;
                s.set_nodelay(true).map_err(|e| e.to_string())?;
                self.stream = Some(s);
            }
            let stream = self.stream.as_mut().expect("connected above");
            let res = timeout(HTTP_TIMEOUT, exchange(stream, &self.out, &mut self.inp)).await;
            match res {
                Ok(Ok((status, body_at, close))) => {
                    if close {
                        self.stream = None;
                    }
                    let body = if status == 200 {
                        Vec::new()
                    } else {
                        self.inp[body_at..].to_vec()
                    };
                    return Ok(Resp { status, body });
                }
                Ok(Err((e, answered))) => {
                    self.stream = None;
                    if fresh || answered {
                        return Err(e);
                    }
                    self.retries += 1;
                }
                Err(_) => {
                    self.stream = None;
                    return Err(format!("{method} {path}: no answer within {HTTP_TIMEOUT:?}"));
                }
            }
        }
    }
}

/// Writes `req` and reads one response into `buf`.  Returns (status, offset of the
/// body in `buf`, connection-close); the error says whether any answer byte came.
pub async fn exchange(
    stream: &mut TcpStream,
    req: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(u16, usize, bool), (String, bool)> {
    stream
        .write_all(req)
        .await
        .map_err(|e| (format!("http write: {e}"), false))?;
    buf.clear();
    loop {
        let head = {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let mut clen = 0usize;
                    let mut close = resp.version == Some(0);
                    for h in resp.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            clen = std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|s| s.trim().parse().ok())
                                .unwrap_or(0);
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            close = h.value.eq_ignore_ascii_case(b"close");
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            return Err(("chunked http responses are not supported".into(), true));
                        }
                    }
                    Some((resp.code.unwrap_or(0), n, clen, close))
                }
                Ok(httparse::Status::Partial) => None,
                Err(e) => return Err((format!("bad http response: {e}"), true)),
            }
        };
        if let Some((status, n, clen, close)) = head {
            while buf.len() < n + clen {
                buf.reserve(4096);
                match stream.read_buf(buf).await {
                    Ok(0) => return Err(("connection closed inside http body".into(), true)),
                    Ok(_) => {}
                    Err(e) => return Err((format!("http read: {e}"), true)),
                }
            }
            return Ok((status, n, close));
        }
        buf.reserve(4096);
        match stream.read_buf(buf).await {
            Ok(0) => {
                return Err(("connection closed before the http answer".into(), !buf.is_empty()));
            }
            Ok(_) => {}
            Err(e) => return Err((format!("http read: {e}"), !buf.is_empty())),
        }
    }
}

/// Signs `claims` with HS256 and the raw bytes of `key`, as seahub and seaf-server do.
pub fn sign(key: &str, claims: &serde_json::Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(key.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), claims, &key).expect("HS256 encoding cannot fail")
}

/// xorshift64*: cheap and deterministic per task, good enough to vary libraries and timing.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}
