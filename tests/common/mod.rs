//! Test harness: starts the real `notification-server` binary on port 0 with a temporary
//! config dir, and speaks real HTTP and websocket to it. Every wait has a deadline.
#![allow(dead_code)]

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

/// The key every test server uses; it has comment characters in it on purpose.
pub const KEY: &str = "test-key#with;comment=chars";

/// How long any single wait may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A port that was free a moment ago on 127.0.0.1, for listeners the test must name
/// in a config file (metrics, databases, proxies).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The value of one sample (name with its labels) in a Prometheus scrape.
pub fn metric_value(metrics: &str, sample: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {sample} in\n{metrics}"))
        .parse()
        .unwrap()
}

/// Raises this process's open-file limit to its hard limit, for tests with crowds.
pub fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// A fresh empty temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("ns-test-{}-{n}-{}", std::process::id(), now_nanos()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Log lines captured from the server's stderr, with a condition variable to wait on.
#[derive(Default)]
pub struct Logs {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

impl Logs {
    /// Waits until a line containing `needle` appears; returns it.
    pub fn wait_for(&self, needle: &str, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        let mut lines = self.lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| l.contains(needle)) {
                return Some(l.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            lines = self.changed.wait_timeout(lines, left).unwrap().0;
        }
    }

    pub fn all(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn contains(&self, needle: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l.contains(needle))
    }
}

/// A running server process; killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub logs: Arc<Logs>,
    pub dir: TempDir,
}

/// The config file every test server gets, plus `extra` lines in `[notification]`.
pub fn config_text(extra: &str) -> String {
    format!("[notification]\nhost = 127.0.0.1\nport = 0\nlog_level = debug\njwt_private_key = {KEY}\n{extra}\n")
}

impl Server {
    /// Starts a server with the default test config plus `extra` lines.
    pub fn start(extra: &str) -> Server {
        let dir = TempDir::new();
        std::fs::write(dir.path().join("seafile.conf"), config_text(extra)).unwrap();
        Server::start_in(dir, &["-l", "-"], &[])
    }

    /// Starts the binary with `-c dir` plus `args` and `env`, stderr captured, and waits
    /// for its listening line.
    pub fn start_in(dir: TempDir, args: &[&str], env: &[(&str, &str)]) -> Server {
        let conf = dir.path().to_path_buf();
        Server::start_at(dir, &conf, args, env)
    }

    /// Like [`Server::start_in`] with `-c conf`, a directory inside `dir` (which the server
    /// owns and removes).
    pub fn start_at(dir: TempDir, conf: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::launch(dir, conf, args, env, None)
    }

    /// Starts with the default test config plus `extra`, and at most `nofile` open files.
    pub fn start_limited(extra: &str, nofile: u64) -> Server {
        let dir = TempDir::new();
        std::fs::write(dir.path().join("seafile.conf"), config_text(extra)).unwrap();
        let conf = dir.path().to_path_buf();
        Server::launch(dir, &conf, &["-l", "-"], &[], Some((nofile, nofile)))
    }

    /// Starts with the default test config plus `extra`, under an open-file limit of
    /// `soft` (and `hard`), as `ulimit -Sn soft -Hn hard` in the shell that starts it.
    pub fn start_with_nofile(extra: &str, soft: u64, hard: u64) -> Server {
        let dir = TempDir::new();
        std::fs::write(dir.path().join("seafile.conf"), config_text(extra)).unwrap();
        let conf = dir.path().to_path_buf();
        Server::launch(dir, &conf, &["-l", "-"], &[], Some((soft, hard)))
    }

    fn launch(dir: TempDir, conf: &Path, args: &[&str], env: &[(&str, &str)], nofile: Option<(u64, u64)>) -> Server {
        let mut cmd = binary();
        if let Some((soft, hard)) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: only setrlimit between fork and exec, which is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.arg("-c")
            .arg(conf)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for var in [
            "JWT_PRIVATE_KEY",
            "SEAFILE_LOG_TO_STDOUT",
            "SEAFILE_MYSQL_DB_HOST",
            "SEAFILE_MYSQL_DB_USER",
            "SEAFILE_MYSQL_DB_PASSWORD",
            "SEAFILE_MYSQL_DB_PORT",
            "SEAFILE_MYSQL_DB_CCNET_DB_NAME",
        ] {
            cmd.env_remove(var);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start notification-server");
        let logs = Arc::new(Logs::default());
        for pipe in [
            child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
            child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    logs.lines.lock().unwrap().push(line);
                    logs.changed.notify_all();
                }
            });
        }
        let line = logs.wait_for("listening on ", DEADLINE);
        let Some(line) = line else {
            let _ = child.kill();
            panic!("server did not start; output: {:#?}", logs.all());
        };
        let addr = line.rsplit("listening on ").next().unwrap().trim().parse().unwrap();
        Server { child, addr, logs, dir }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for the process to exit; returns its status code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Resident memory of the server process, in KiB.
    pub fn rss_kb(&self) -> u64 {
        self.status_kb("VmRSS:")
    }

    /// The most RSS the server ever had (the kernel's high-water mark).
    pub fn peak_rss_kb(&self) -> u64 {
        self.status_kb("VmHWM:")
    }

    fn status_kb(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    pub fn ws(&self) -> Ws {
        Ws::connect(self.addr, "/")
    }

    /// POSTs an event with a valid sender token; asserts the 200.
    pub fn post(&self, body: &Value) {
        let r = post_event(self.addr, &body.to_string(), Some(&format!("Token {}", event_token())));
        assert_eq!(r.status, 200, "event refused: {r:?}");
    }

    /// Asserts the server still answers /ping.
    pub fn assert_alive(&self) {
        let r = request(self.addr, b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert_eq!(r.status, 200);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_notification-server"))
}

// ---- tokens ----

pub fn sign(claims: &Value) -> String {
    sign_with(Algorithm::HS256, claims, KEY.as_bytes())
}

pub fn sign_with(alg: Algorithm, claims: &Value, key: &[u8]) -> String {
    encode(&Header::new(alg), claims, &EncodingKey::from_secret(key)).unwrap()
}

/// A seaf-server style sender token.
pub fn event_token() -> String {
    sign(&json!({"exp": unix_now() + 300}))
}

/// A client subscription token.
pub fn client_token(repo: &str, user: &str, exp: i64) -> String {
    sign(&json!({"repo_id": repo, "username": user, "exp": exp}))
}

pub fn repo_update(repo: &str, commit: &str) -> Value {
    json!({"type": "repo-update", "content": {"repo_id": repo, "commit_id": commit}})
}

// ---- HTTP ----

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header lines as sent, without the status line.
    pub head: String,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Connects with a read timeout of [`DEADLINE`].
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Shrinks a connected socket's receive buffer, so that a client that stops reading
/// stalls the server's writes soon. Only for a socket meant to get stuck: the window it
/// advertised before may exceed the new buffer, and the kernel then drops data and holds
/// the socket's own sends back while it recovers (see [`connect_with_rcvbuf`]).
pub fn set_rcvbuf(s: &TcpStream, bytes: i32) {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt on a socket we own, with a pointer to a live i32.
    let set = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &bytes as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
}

/// Like [`connect`], with the receive buffer set to `rcvbuf` bytes before the handshake,
/// so the window the client advertises never promises more than it can hold. (Shrinking
/// the buffer after connecting does not do that: the kernel then drops data the peer was
/// allowed to send, and recovery can hold this socket's own sends back for seconds.)
pub fn connect_with_rcvbuf(addr: SocketAddr, rcvbuf: i32) -> TcpStream {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = addr else {
        panic!("tests use 127.0.0.1");
    };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a new socket, owned from here on by the TcpStream made from it.
    let s = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        TcpStream::from_raw_fd(fd)
    };
    set_rcvbuf(&s, rcvbuf);
    // SAFETY: connect on that socket with a valid sockaddr_in of the given length.
    let rc = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            &sin as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Reads the next response head byte by byte (so nothing after it is consumed) and returns
/// it raw, or None on EOF / timeout.
pub fn read_head_raw(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    Some(buf)
}

/// Reads one response (head plus Content-Length body) from a stream.
pub fn read_response(s: &mut TcpStream, head_only: bool) -> Option<Response> {
    let buf = read_head_raw(s)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (status_line, head) = text.split_once("\r\n").unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut r = Response {
        status,
        head: head.trim_end().to_string(),
        body: Vec::new(),
    };
    let len: usize = r.header("content-length").map(|v| v.parse().unwrap()).unwrap_or(0);
    if !head_only && status != 101 && status != 100 {
        r.body = vec![0; len];
        s.read_exact(&mut r.body).ok()?;
    }
    Some(r)
}

/// Sends raw request bytes on a new connection and reads one response.
pub fn request(addr: SocketAddr, raw: &[u8]) -> Response {
    let mut s = connect(addr);
    s.write_all(raw).unwrap();
    read_response(&mut s, raw.starts_with(b"HEAD ")).expect("no response")
}

/// Whether the server closed the connection (EOF or reset) within the deadline.
pub fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

pub fn post_event(addr: SocketAddr, body: &str, authorization: Option<&str>) -> Response {
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let raw = format!(
        "POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    request(addr, raw.as_bytes())
}

// ---- websocket ----

pub struct Ws {
    pub ws: WebSocket<TcpStream>,
    probes: usize,
}

impl Ws {
    pub fn connect(addr: SocketAddr, path: &str) -> Ws {
        let s = connect(addr);
        let url = format!("ws://{addr}{path}");
        let (ws, resp) = tungstenite::client::client(url.as_str(), s).expect("websocket handshake");
        assert_eq!(resp.status(), 101);
        Ws { ws, probes: 0 }
    }

    pub fn send_json(&mut self, v: &Value) {
        self.ws.send(Message::text(v.to_string())).unwrap();
    }

    /// Sends one subscribe message for these (repo, token) pairs.
    pub fn subscribe_many(&mut self, repos: &[(&str, &str)]) {
        let list: Vec<Value> = repos.iter().map(|(id, t)| json!({"id": id, "jwt_token": t})).collect();
        self.send_json(&json!({"type": "subscribe", "content": {"repos": list}}));
    }

    /// Waits until the server has processed everything sent before: it answers a
    /// subscription with a bad token with `jwt-expired`, in order.
    pub fn sync(&mut self) {
        self.probes += 1;
        let probe = format!("probe-{}", self.probes);
        self.subscribe_many(&[(&probe, "bad")]);
        let m = self.recv().expect("no answer to the sync probe");
        let answered = m["type"] == "jwt-expired" && m["content"]["repo_id"] == probe.as_str();
        assert!(answered, "unexpected message while syncing: {m}");
    }

    /// Subscribes with a valid token for `user` and waits until it is in place.
    pub fn subscribe(&mut self, repo: &str, user: &str) {
        let t = client_token(repo, user, unix_now() + 3600);
        self.subscribe_many(&[(repo, &t)]);
        self.sync();
    }

    /// The next text message as JSON, or None on timeout or close. Pings are answered.
    pub fn recv(&mut self) -> Option<Value> {
        let text = self.recv_text()?;
        Some(serde_json::from_str(&text).expect("server sent invalid JSON"))
    }

    pub fn recv_text(&mut self) -> Option<String> {
        self.ws.get_mut().set_read_timeout(Some(DEADLINE)).unwrap();
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            match self.ws.read() {
                Ok(Message::Text(t)) => return Some(t.to_string()),
                Ok(Message::Binary(_)) => panic!("server sent a binary frame"),
                Ok(Message::Close(_)) => return None,
                Ok(_) => {
                    let _ = self.ws.flush();
                }
                Err(_) => return None,
            }
        }
        None
    }

    /// Stays connected for `how_long` without sending anything but pong answers (the
    /// reads answer the server's pings); panics if a message arrives meanwhile.
    pub fn idle(&mut self, how_long: Duration) {
        let until = Instant::now() + how_long;
        self.ws
            .get_mut()
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        while Instant::now() < until {
            match self.ws.read() {
                Ok(Message::Ping(_) | Message::Pong(_)) => {
                    let _ = self.ws.flush();
                }
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    let _ = self.ws.flush();
                }
                other => panic!("unexpected while idle: {other:?}"),
            }
        }
        self.ws.get_mut().set_read_timeout(Some(DEADLINE)).unwrap();
    }

    /// Waits for the server's Close frame; returns its code, None if the socket ended
    /// without one or nothing came.
    pub fn recv_close(&mut self) -> Option<CloseFrame> {
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            match self.ws.read() {
                Ok(Message::Close(f)) => return f,
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }
}

/// A raw websocket client that shows frame bytes.
pub struct RawWs {
    pub s: std::net::TcpStream,
}

impl RawWs {
    pub fn connect(server: &Server) -> RawWs {
        RawWs::upgrade(connect(server.addr))
    }

    /// Connects with a receive buffer of `rcvbuf` bytes (see [`connect_with_rcvbuf`]).
    pub fn connect_with_rcvbuf(server: &Server, rcvbuf: i32) -> RawWs {
        RawWs::upgrade(connect_with_rcvbuf(server.addr, rcvbuf))
    }

    fn upgrade(mut s: TcpStream) -> RawWs {
        s.write_all(b"GET /notification HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: notification.seafile.com\r\n\r\n").unwrap();
        let r = read_response(&mut s, true).unwrap();
        assert_eq!(r.status, 101);
        assert_eq!(
            r.head,
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        RawWs { s }
    }

    /// Sends one masked, final frame.
    pub fn send(&mut self, opcode: u8, payload: &[u8]) {
        self.send_raw(0x80 | opcode, payload);
    }

    /// Sends one masked frame with the given first byte (FIN, RSV bits and opcode).
    pub fn send_raw(&mut self, first: u8, payload: &[u8]) {
        let mut f = vec![first];
        let mask = [1u8, 2, 3, 4];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.s.write_all(&f).unwrap();
    }

    /// Reads one frame: (first byte, payload).
    pub fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut h = [0u8; 2];
        self.s.read_exact(&mut h).ok()?;
        assert_eq!(h[1] & 0x80, 0, "server frames are unmasked");
        let len = match h[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                self.s.read_exact(&mut b).ok()?;
                u16::from_be_bytes(b) as usize
            }
            127 => {
                let mut b = [0u8; 8];
                self.s.read_exact(&mut b).ok()?;
                u64::from_be_bytes(b) as usize
            }
            n => n as usize,
        };
        let mut p = vec![0; len];
        self.s.read_exact(&mut p).ok()?;
        Some((h[0], p))
    }

    /// The next non-control frame.
    pub fn data_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            let f = self.frame()?;
            if f.0 & 0x0f < 8 {
                return Some(f);
            }
        }
    }
}
