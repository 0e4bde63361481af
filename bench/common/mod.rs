//! What the benchmark programs share: the command-line walker, process and system
//! readings, the result line, and a minimal keep-alive HTTP/1.1 client. Each bench is a
//! separate program (`harness = false`) and includes this file with
//! `#[path = "common/mod.rs"] mod common;`, so a piece one program does not use is not
//! dead code in the others.
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
