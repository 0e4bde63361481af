//! Kernel floor for what the notification server does per delivery, on this machine.
//!
//! # Running
//!
//! ```text
//! cargo bench --bench floor
//! cargo bench --bench floor -- --conns 2000 --rounds 50
//! ```
//!
//! Flags: `--conns N` (loopback connections, 5000), `--rounds R` (measured rounds per
//! measurement, 20), `--warmup W` (unmeasured rounds before them, 2), `--source-ips K`
//! (client sides are bound round-robin to 127.0.0.1..127.0.0.K so more than one
//! ephemeral port range is available, 20), `--pause-ms P` (pause between rounds, 5),
//! `--idle-pause-ms P` (pause between rounds of `write_one_frame_after_idle`, 400).
//! The soft `RLIMIT_NOFILE` is raised to the hard limit at start; 2 N + 64 fds are needed.
//! With the defaults the whole run takes about 25 s (half of it the idle pauses).
//!
//! # Why
//!
//! The server's per-delivery CPU (README "Performance") is almost all the kernel's
//! loopback TCP send path.  This program takes our server code out of the picture: it
//! does only the system calls a single-threaded server must make per delivery, with
//! std, libc and mio, so its figures are the best a single-threaded server could reach
//! on this machine.  On loopback the sender's `write()` also runs the receiver's TCP
//! stack (the segment is processed in the sender's softirq context) and the wake-up of
//! the reading process, so the CPU charged to the sending thread here is the floor for
//! per-delivery CPU; a real network would split that work differently.
//!
//! # Set-up
//!
//! N connections over loopback, accepted from one listener.  Both sides are nonblocking
//! with `TCP_NODELAY`.  The "server" (the main thread) holds the N accepted sockets; a
//! "client" thread holds the N client sockets in a mio `Poll` (edge-triggered epoll)
//! and reads every ready socket until `EAGAIN`, as a client process would; in the ping
//! measurement it answers each 2-byte ping with a 6-byte (masked) pong.  Writes are
//! `send(MSG_NOSIGNAL)` and reads `recv`, the calls std/mio make.  Each round starts
//! after the client has read everything of the previous round plus `--pause-ms`.
//! Before the first measurement, 20 unmeasured one-frame rounds take every connection
//! past the receiver's quick-ACK start (the first up to 16 segments of a connection are
//! ACKed at once; later ones get a delayed ACK, sent when the client reads or by the
//! delayed-ACK timer).  On loopback an immediate ACK is sent and processed inside the
//! sender's `send`, which makes that `send` markedly dearer (without the settling rounds
//! the first measurement costs about as much per write as `write_one_frame_after_idle`).
//! The receiver goes back to quick-ACK mode after a gap longer than its RTO (200 ms
//! minimum; tcp_event_data_recv in the kernel), which is what
//! `write_one_frame_after_idle` measures.
//! Server CPU is the thread's own CPU time (`CLOCK_THREAD_CPUTIME_ID`, i.e. the
//! scheduler's ns run time, the first field of /proc/self/task/TID/schedstat), user +
//! sys, read before and after the measured loop; `server_sys_fraction` is sys / (user +
//! sys) over all measured rounds from `getrusage(RUSAGE_THREAD)`.
//!
//! # Output: one JSON object per measurement on stdout (progress goes to stderr)
//!
//! Figures over rounds are `{"median":..,"min":..,"max":..}`; per-round values are
//! divided by N (or by the frames sent) first.
//!
//! - `write_one_frame`: per round, one `send` of a 120-byte websocket text frame to
//!   every socket.  `wall_us_per_write` = wall time of the send loop / N;
//!   `cpu_us_per_write` = server CPU of the send loop / N (the per-delivery floor for
//!   connections that get frames back to back; see `write_one_frame_after_idle`);
//!   `write_loop_ms` = wall time of the send loop (fan-out of one event to N sockets,
//!   server side); `fanout_ms` = first send -> the client thread read the last byte
//!   (fan-out of one event to N subscribers); `client_cpu_us_per_frame` = the client
//!   thread's CPU for the round / frames; `client_epoll_waits_per_round` = its
//!   `epoll_wait` calls in the round: many calls (each returning few sockets) mean
//!   the client kept catching up and sleeping, so many `send`s also paid for waking it.
//! - `write_batched_4`, `write_batched_10`: the same with k frames (k x 120 bytes) in
//!   each `send`; `cpu_us_per_frame` = server CPU / (N k) shows what batching several
//!   frames per send buys (`cpu_us_per_write` is per send call).
//! - `ping_pong` (`variant` `recv_until_eagain`): the server sends a 2-byte ping frame
//!   to every socket, then waits in its own mio `Poll` (edge-triggered) for the pongs:
//!   per ready socket one `recv`, then a second `recv` that returns `EAGAIN`, as an
//!   edge-triggered server does.  The server starts reading once the client has answered
//!   every ping, so each `epoll_wait` returns a full batch (1024) in both variants and
//!   they differ only in the `recv` calls (a server reading while pongs trickle in makes
//!   more `epoll_wait` calls).  `cpu_us_per_exchange` = server CPU of the round / N
//!   (send the ping, read the pong; the wait for the client is not counted), split into
//!   `cpu_us_send_per_exchange` and `cpu_us_read_per_exchange` (epoll_wait + recv).
//!   `recvs_per_exchange`, `epoll_waits_per_round` count the calls; `round_ms` is the
//!   whole round including that wait; `client_cpu_us_per_exchange` is the client
//!   thread's CPU (read the ping, send the pong, which runs the server's receive side).
//! - `ping_pong` (`variant` `single_recv`): the same with one `recv` per ready socket
//!   (the pong is shorter than the buffer, so the socket is known to be drained):
//!   the difference in `cpu_us_read_per_exchange` is what skipping the `EAGAIN` read
//!   saves.  The two variants alternate round by round (R rounds each), so drift in
//!   the machine's state affects both alike.
//! - `write_one_frame_after_idle`: `write_one_frame` with `--idle-pause-ms` (400 ms)
//!   between rounds, more than the receiver's RTO, so every frame reaches a connection
//!   that was idle and is ACKed at once: the floor for a notification to a client that
//!   got nothing for a while (the usual case), as opposed to `write_one_frame`, the
//!   floor for back-to-back deliveries on a busy connection.
//! - `machine` (last): `nproc`, `kernel` (uname -r), `loadavg_start` and `loadavg_end`
//!   (1, 5, 15 min).  With two cores, a load average much above what this program adds
//!   (about 1-2) means other work competed for the CPUs.
//!
//! Every measurement also carries `loadavg_1m` at its end.  The program exits 1 on any
//! failure (set-up, short write, a round that does not complete within 10 s), 2 on bad
//! arguments.

#[path = "common/mod.rs"]
mod common;

use common::{parse_flags, raise_nofile_limit};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::thread;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

/// Unmeasured one-frame rounds right after set-up.  A receiver ACKs the first segments
/// of a connection at once (quick-ACK mode, at most 16, TCP_MAX_QUICKACKS) and delays
/// its ACKs after that; 20 rounds take every connection past that start.
const SETTLE_ROUNDS: usize = 20;
/// A round that has not completed after this long is a failure.
const ROUND_TIMEOUT: Duration = Duration::from_secs(10);
/// Websocket text frame header for a 118-byte payload: FIN + text, unmasked length 118.
const FRAME_LEN: usize = 120;
/// Server -> client ping frame: FIN + ping, empty payload.
const PING: [u8; 2] = [0x89, 0x00];
/// Client -> server pong frame: FIN + pong, masked, empty payload, 4-byte mask key.
const PONG: [u8; 6] = [0x8a, 0x80, 0x12, 0x34, 0x56, 0x78];

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("floor: {msg}");
    std::process::exit(1);
}

// ---------------------------------------------------------------------------------
// Options

struct Opts {
    conns: usize,
    rounds: usize,
    warmup: usize,
    source_ips: u8,
    pause: Duration,
    idle_pause: Duration,
}

const USAGE: &str = "usage: cargo bench --bench floor -- [--conns N] [--rounds R] [--warmup W] \
[--source-ips K] [--pause-ms P] [--idle-pause-ms P]  (see the doc comment of bench/floor.rs)";

fn parse_args() -> Result<Opts, String> {
    let mut opts = Opts {
        conns: 5000,
        rounds: 20,
        warmup: 2,
        source_ips: 20,
        pause: Duration::from_millis(5),
        idle_pause: Duration::from_millis(400),
    };
    parse_flags(USAGE, |flag, value| {
        match flag {
            "--conns" => opts.conns = common::num(flag, &value()?)?,
            "--rounds" => opts.rounds = common::num(flag, &value()?)?,
            "--warmup" => opts.warmup = common::num(flag, &value()?)?,
            "--source-ips" => opts.source_ips = common::num(flag, &value()?)?,
            "--pause-ms" => opts.pause = Duration::from_millis(common::num(flag, &value()?)?),
            "--idle-pause-ms" => opts.idle_pause = Duration::from_millis(common::num(flag, &value()?)?),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if opts.conns == 0 || opts.rounds == 0 || !(1..=254).contains(&opts.source_ips) {
        return Err("--conns and --rounds must be positive, --source-ips 1..254".into());
    }
    Ok(opts)
}

// ---------------------------------------------------------------------------------
// System helpers

/// This thread's CPU time (user + sys) in ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        fail(format!(
            "clock_gettime(CLOCK_THREAD_CPUTIME_ID): {}",
            io::Error::last_os_error()
        ));
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// This thread's (user, sys) CPU time in µs from `getrusage(RUSAGE_THREAD)`.
fn thread_rusage_us() -> (u64, u64) {
    // SAFETY: all-zero is a valid `rusage`.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    if rc != 0 {
        fail(format!("getrusage(RUSAGE_THREAD): {}", io::Error::last_os_error()));
    }
    let us = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000 + tv.tv_usec as u64;
    (us(ru.ru_utime), us(ru.ru_stime))
}

/// 1, 5 and 15 minute load averages from /proc/loadavg.
fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut out = [f64::NAN; 3];
    for (slot, field) in out.iter_mut().zip(text.split_whitespace()) {
        *slot = field.parse().unwrap_or(f64::NAN);
    }
    out
}

fn kernel_release() -> String {
    // SAFETY: all-zero is a valid `utsname`.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return "unknown".into();
    }
    let bytes: Vec<u8> = uts.release.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn nproc() -> usize {
    thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
}

fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: all-zero is a valid `sockaddr_in`.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = addr.port().to_be();
    sa.sin_addr = libc::in_addr {
        s_addr: u32::from(*addr.ip()).to_be(),
    };
    sa
}

/// A blocking TCP connection to `dst` from `src` (port chosen by the kernel).
fn connect_from(src: Ipv4Addr, dst: SocketAddrV4) -> io::Result<TcpStream> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket owned by nobody else; the stream closes it on drop.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let local = sockaddr_in(SocketAddrV4::new(src, 0));
    // SAFETY: `local` is a valid sockaddr_in of `len` bytes.
    if unsafe { libc::bind(fd, (&raw const local).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let remote = sockaddr_in(dst);
    loop {
        // SAFETY: `remote` is a valid sockaddr_in of `len` bytes.
        if unsafe { libc::connect(fd, (&raw const remote).cast(), len) } == 0 {
            return Ok(stream);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// One `send(MSG_NOSIGNAL)`, as std/mio `write` does.
fn send_once(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes.
    let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One `recv`, as std/mio `read` does.
fn recv_once(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid and writable for `buf.len()` bytes.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn poll_events(poll: &mut Poll, events: &mut Events, timeout: Duration) -> io::Result<()> {
    match poll.poll(events, Some(timeout)) {
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {
            events.clear();
            Ok(())
        }
        other => other,
    }
}

// ---------------------------------------------------------------------------------
// Statistics and output

fn median_min_max(values: &[f64]) -> String {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    let min = sorted.first().copied().unwrap_or(f64::NAN);
    let max = sorted.last().copied().unwrap_or(f64::NAN);
    format!(r#"{{"median":{},"min":{},"max":{}}}"#, num(median), num(min), num(max))
}

/// A JSON number with 3 decimals (`null` if not finite).
fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{}", (x * 1000.0).round() / 1000.0)
    } else {
        "null".into()
    }
}

fn ns_to_us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

// ---------------------------------------------------------------------------------
// Client thread

enum ClientCmd {
    /// Expect `bytes` bytes over all sockets; answer every 2 bytes read with a pong.
    Round {
        bytes: u64,
        answer_pings: bool,
    },
    Stop,
}

struct RoundDone {
    /// When the client thread read the last byte of the round.
    last_byte_at: Instant,
    /// The client thread's CPU for the round.
    cpu_ns: u64,
    /// `epoll_wait` calls during the round (many mean the client kept catching up and
    /// sleeping, so that later writes had to wake it).
    epoll_waits: u64,
}

struct ClientRound {
    expected: u64,
    received: u64,
    answer_pings: bool,
    cpu_start: u64,
    epoll_waits: u64,
}

/// Reads every ready socket until `EAGAIN`; reports each round when all its bytes came.
fn client_loop(clients: Vec<TcpStream>, commands: Receiver<ClientCmd>, done: Sender<RoundDone>) -> Result<(), String> {
    let mut poll = Poll::new().map_err(|e| format!("client Poll::new: {e}"))?;
    for (i, stream) in clients.iter().enumerate() {
        poll.registry()
            .register(&mut SourceFd(&stream.as_raw_fd()), Token(i), Interest::READABLE)
            .map_err(|e| format!("client register: {e}"))?;
    }
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    // Ping bytes read but not answered yet, per socket (a ping could arrive split).
    let mut ping_carry = vec![0u8; clients.len()];
    let mut round: Option<ClientRound> = None;
    loop {
        poll_events(&mut poll, &mut events, Duration::from_millis(50)).map_err(|e| format!("client poll: {e}"))?;
        // The server queues the command before its first write, so it is here before any
        // byte of its round.
        loop {
            match commands.try_recv() {
                Ok(ClientCmd::Round { bytes, answer_pings }) => {
                    round = Some(ClientRound {
                        expected: bytes,
                        received: 0,
                        answer_pings,
                        cpu_start: thread_cpu_ns(),
                        epoll_waits: 0,
                    })
                }
                Ok(ClientCmd::Stop) | Err(TryRecvError::Disconnected) => return Ok(()),
                Err(TryRecvError::Empty) => break,
            }
        }
        if let Some(r) = round.as_mut() {
            r.epoll_waits += 1;
        }
        for event in events.iter() {
            let index = event.token().0;
            let fd = clients[index].as_raw_fd();
            loop {
                match recv_once(fd, &mut buf) {
                    Ok(0) => return Err(format!("client socket {index}: closed by the server")),
                    Ok(n) => {
                        let Some(r) = round.as_mut() else {
                            return Err(format!("client socket {index}: {n} bytes outside a round"));
                        };
                        r.received += n as u64;
                        if r.answer_pings {
                            let pending = ping_carry[index] as usize + n;
                            ping_carry[index] = (pending % PING.len()) as u8;
                            for _ in 0..pending / PING.len() {
                                match send_once(fd, &PONG) {
                                    Ok(sent) if sent == PONG.len() => {}
                                    Ok(sent) => return Err(format!("client socket {index}: short pong write {sent}")),
                                    Err(e) => return Err(format!("client socket {index}: pong: {e}")),
                                }
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("client socket {index}: recv: {e}")),
                }
            }
        }
        if let Some(r) = round.as_ref().filter(|r| r.received >= r.expected) {
            let report = RoundDone {
                last_byte_at: Instant::now(),
                cpu_ns: thread_cpu_ns() - r.cpu_start,
                epoll_waits: r.epoll_waits,
            };
            round = None;
            if done.send(report).is_err() {
                return Ok(());
            }
        }
    }
}

/// The server side's handle on the client thread.
struct Client {
    commands: Sender<ClientCmd>,
    done: Receiver<RoundDone>,
}

impl Client {
    fn start_round(&self, bytes: u64, answer_pings: bool) {
        if self.commands.send(ClientCmd::Round { bytes, answer_pings }).is_err() {
            fail("the client thread is gone");
        }
    }

    fn wait_round(&self, what: &str) -> RoundDone {
        match self.done.recv_timeout(ROUND_TIMEOUT) {
            Ok(done) => done,
            Err(RecvTimeoutError::Timeout) => fail(format!("{what}: the client did not get all bytes within 10 s")),
            Err(RecvTimeoutError::Disconnected) => fail(format!("{what}: the client thread is gone")),
        }
    }
}

// ---------------------------------------------------------------------------------
// Measurements

/// A websocket text frame (FIN + text, 118-byte unmasked payload) like a notification.
fn text_frame() -> Vec<u8> {
    let mut frame = vec![0x81, (FRAME_LEN - 2) as u8];
    let body = br#"{"type":"repo-update","content":{"repo_id":"5a7f1c2e-4b3d-4e6f-9a8b-0c1d2e3f4a5b","commit_id":"0123456789abcdef"}}"#;
    frame.extend_from_slice(body);
    frame.resize(FRAME_LEN, b' ');
    frame
}

/// One write measurement: `warmup` unmeasured, then `rounds` measured rounds, each
/// after `pause`.
struct WriteRun<'a> {
    name: &'a str,
    frames_per_write: usize,
    pause: Duration,
    warmup: usize,
    rounds: usize,
}

/// One `send` of `frames_per_write` frames to every socket, per round.
fn measure_writes(servers: &[RawFd], client: &Client, run: &WriteRun) -> String {
    let WriteRun {
        name,
        frames_per_write,
        pause,
        warmup,
        rounds,
    } = *run;
    let payload = text_frame().repeat(frames_per_write);
    let n = servers.len();
    let frames = (n * frames_per_write) as f64;
    let (mut wall_per_write, mut cpu_per_write, mut cpu_per_frame) = (Vec::new(), Vec::new(), Vec::new());
    let (mut loop_ms, mut fanout_ms, mut client_cpu_per_frame) = (Vec::new(), Vec::new(), Vec::new());
    let mut client_epoll_waits = Vec::new();
    let (mut user_us, mut sys_us) = (0, 0);
    for round in 0..warmup + rounds {
        thread::sleep(pause);
        client.start_round((n * payload.len()) as u64, false);
        let rusage_start = thread_rusage_us();
        let cpu_start = thread_cpu_ns();
        let start = Instant::now();
        for &fd in servers {
            match send_once(fd, &payload) {
                Ok(sent) if sent == payload.len() => {}
                Ok(sent) => fail(format!("{name}: short write ({sent} of {} bytes)", payload.len())),
                Err(e) => fail(format!("{name}: send: {e}")),
            }
        }
        let elapsed = start.elapsed();
        let cpu = thread_cpu_ns() - cpu_start;
        let rusage_end = thread_rusage_us();
        let done = client.wait_round(name);
        if round < warmup {
            continue;
        }
        user_us += rusage_end.0 - rusage_start.0;
        sys_us += rusage_end.1 - rusage_start.1;
        wall_per_write.push(elapsed.as_nanos() as f64 / 1000.0 / n as f64);
        cpu_per_write.push(ns_to_us(cpu) / n as f64);
        cpu_per_frame.push(ns_to_us(cpu) / frames);
        loop_ms.push(elapsed.as_secs_f64() * 1000.0);
        fanout_ms.push(done.last_byte_at.duration_since(start).as_secs_f64() * 1000.0);
        client_cpu_per_frame.push(ns_to_us(done.cpu_ns) / frames);
        client_epoll_waits.push(done.epoll_waits as f64);
    }
    let sys_fraction = sys_us as f64 / (user_us + sys_us).max(1) as f64;
    format!(
        r#"{{"measurement":"{name}","conns":{n},"rounds":{rounds},"pause_ms":{},"frames_per_write":{frames_per_write},"bytes_per_write":{},"wall_us_per_write":{},"cpu_us_per_write":{},"cpu_us_per_frame":{},"write_loop_ms":{},"fanout_ms":{},"client_cpu_us_per_frame":{},"client_epoll_waits_per_round":{},"server_sys_fraction":{},"loadavg_1m":{}}}"#,
        pause.as_millis(),
        payload.len(),
        median_min_max(&wall_per_write),
        median_min_max(&cpu_per_write),
        median_min_max(&cpu_per_frame),
        median_min_max(&loop_ms),
        median_min_max(&fanout_ms),
        median_min_max(&client_cpu_per_frame),
        median_min_max(&client_epoll_waits),
        num(sys_fraction),
        num(loadavg()[0]),
    )
}

/// Per-round figures of one ping_pong variant.
#[derive(Default)]
struct PingPongStats {
    cpu_total: Vec<f64>,
    cpu_send: Vec<f64>,
    cpu_read: Vec<f64>,
    round_ms: Vec<f64>,
    recvs_per_exchange: Vec<f64>,
    epoll_waits: Vec<f64>,
    client_cpu: Vec<f64>,
    user_us: u64,
    sys_us: u64,
}

impl PingPongStats {
    fn json(&self, variant: &str, conns: usize) -> String {
        let sys_fraction = self.sys_us as f64 / (self.user_us + self.sys_us).max(1) as f64;
        format!(
            r#"{{"measurement":"ping_pong","variant":"{variant}","conns":{conns},"rounds":{},"cpu_us_per_exchange":{},"cpu_us_send_per_exchange":{},"cpu_us_read_per_exchange":{},"round_ms":{},"recvs_per_exchange":{},"epoll_waits_per_round":{},"client_cpu_us_per_exchange":{},"server_sys_fraction":{},"loadavg_1m":{}}}"#,
            self.cpu_total.len(),
            median_min_max(&self.cpu_total),
            median_min_max(&self.cpu_send),
            median_min_max(&self.cpu_read),
            median_min_max(&self.round_ms),
            median_min_max(&self.recvs_per_exchange),
            median_min_max(&self.epoll_waits),
            median_min_max(&self.client_cpu),
            num(sys_fraction),
            num(loadavg()[0]),
        )
    }
}

/// A ping to every socket, then the pongs read through the server's own epoll; the two
/// variants (recv until EAGAIN, single recv) alternate round by round so that drift in
/// the machine's state affects both alike.  Returns their JSON lines.
fn measure_ping_pong(servers: &[RawFd], client: &Client, opts: &Opts) -> [String; 2] {
    let n = servers.len();
    let mut poll = Poll::new().unwrap_or_else(|e| fail(format!("ping_pong: Poll::new: {e}")));
    for (i, fd) in servers.iter().enumerate() {
        if let Err(e) = poll
            .registry()
            .register(&mut SourceFd(fd), Token(i), Interest::READABLE)
        {
            fail(format!("ping_pong: register: {e}"));
        }
    }
    let mut events = Events::with_capacity(1024);
    let mut buf = [0u8; 4096];
    let expected_pong_bytes = (n * PONG.len()) as u64;
    // [recv until EAGAIN, single recv]
    let mut stats = [PingPongStats::default(), PingPongStats::default()];
    for round in 0..2 * (opts.warmup + opts.rounds) {
        let recv_until_eagain = round % 2 == 0;
        let what = if recv_until_eagain {
            "ping_pong recv_until_eagain"
        } else {
            "ping_pong single_recv"
        };
        thread::sleep(opts.pause);
        client.start_round((n * PING.len()) as u64, true);
        let rusage_start = thread_rusage_us();
        let cpu_start = thread_cpu_ns();
        let start = Instant::now();
        for &fd in servers {
            match send_once(fd, &PING) {
                Ok(sent) if sent == PING.len() => {}
                Ok(sent) => fail(format!("{what}: short write ({sent} of {} bytes)", PING.len())),
                Err(e) => fail(format!("{what}: send: {e}")),
            }
        }
        let cpu_sent = thread_cpu_ns();
        // Every pong is in the server's socket buffers once the client has answered all
        // pings (loopback delivers inside the client's send), so both variants read the
        // same ready list in full batches and differ only in the recv calls.
        let done = client.wait_round(what);
        let cpu_read_start = thread_cpu_ns();
        let (mut pong_bytes, mut recvs, mut waits) = (0u64, 0u64, 0u64);
        while pong_bytes < expected_pong_bytes {
            if start.elapsed() > ROUND_TIMEOUT {
                fail(format!(
                    "{what}: only {pong_bytes} of {expected_pong_bytes} pong bytes within 10 s"
                ));
            }
            if let Err(e) = poll_events(&mut poll, &mut events, Duration::from_secs(1)) {
                fail(format!("{what}: poll: {e}"));
            }
            waits += 1;
            for event in events.iter() {
                let index = event.token().0;
                let fd = servers[index];
                loop {
                    recvs += 1;
                    match recv_once(fd, &mut buf) {
                        Ok(0) => fail(format!("{what}: socket {index} closed by the client")),
                        Ok(got) => {
                            pong_bytes += got as u64;
                            if !recv_until_eagain {
                                break;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => fail(format!("{what}: socket {index}: recv: {e}")),
                    }
                }
            }
        }
        let cpu_end = thread_cpu_ns();
        let elapsed = start.elapsed();
        let rusage_end = thread_rusage_us();
        if round < 2 * opts.warmup {
            continue;
        }
        let s = &mut stats[round % 2];
        s.user_us += rusage_end.0 - rusage_start.0;
        s.sys_us += rusage_end.1 - rusage_start.1;
        let (send_ns, read_ns) = (cpu_sent - cpu_start, cpu_end - cpu_read_start);
        s.cpu_total.push(ns_to_us(send_ns + read_ns) / n as f64);
        s.cpu_send.push(ns_to_us(send_ns) / n as f64);
        s.cpu_read.push(ns_to_us(read_ns) / n as f64);
        s.round_ms.push(elapsed.as_secs_f64() * 1000.0);
        s.recvs_per_exchange.push(recvs as f64 / n as f64);
        s.epoll_waits.push(waits as f64);
        s.client_cpu.push(ns_to_us(done.cpu_ns) / n as f64);
    }
    let [until_eagain, single] = stats;
    [until_eagain.json("recv_until_eagain", n), single.json("single_recv", n)]
}

// ---------------------------------------------------------------------------------
// Set-up

/// N connected pairs: (server sides, client sides), both nonblocking with TCP_NODELAY.
fn connect_pairs(opts: &Opts) -> io::Result<(Vec<TcpStream>, Vec<TcpStream>)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let dst = match listener.local_addr()? {
        std::net::SocketAddr::V4(addr) => addr,
        std::net::SocketAddr::V6(_) => return Err(io::Error::other("listener is not IPv4")),
    };
    let mut servers = Vec::with_capacity(opts.conns);
    let mut clients = Vec::with_capacity(opts.conns);
    for i in 0..opts.conns {
        let src = Ipv4Addr::new(127, 0, 0, 1 + (i % opts.source_ips as usize) as u8);
        // The handshake completes in the kernel; accepting right after keeps the backlog short.
        let client =
            connect_from(src, dst).map_err(|e| io::Error::new(e.kind(), format!("connect from {src}: {e}")))?;
        let (server, _) = listener.accept()?;
        for stream in [&server, &client] {
            stream.set_nodelay(true)?;
            stream.set_nonblocking(true)?;
        }
        servers.push(server);
        clients.push(client);
    }
    Ok((servers, clients))
}

fn main() {
    let opts = parse_args().unwrap_or_else(|e| {
        eprintln!("floor: {e}\n{USAGE}");
        std::process::exit(2);
    });
    let loadavg_start = loadavg();
    let kernel = kernel_release();
    let cpus = nproc();
    eprintln!(
        "floor: {cpus} CPUs, kernel {kernel}, load average {} {} {}",
        loadavg_start[0], loadavg_start[1], loadavg_start[2]
    );
    let nofile = raise_nofile_limit().unwrap_or_else(|e| fail(format!("raising RLIMIT_NOFILE: {e}")));
    let needed = 2 * opts.conns as u64 + 64;
    if nofile < needed {
        fail(format!(
            "{} connections need {needed} fds, RLIMIT_NOFILE allows {nofile}",
            opts.conns
        ));
    }

    let started = Instant::now();
    let (servers, clients) = connect_pairs(&opts).unwrap_or_else(|e| fail(format!("setting up connections: {e}")));
    eprintln!(
        "floor: {} connections in {:.2} s",
        opts.conns,
        started.elapsed().as_secs_f64()
    );

    let (command_tx, command_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let client_thread = thread::Builder::new()
        .name("client".into())
        .spawn(move || {
            if let Err(e) = client_loop(clients, command_rx, done_tx) {
                fail(format!("client thread: {e}"));
            }
        })
        .unwrap_or_else(|e| fail(format!("spawning the client thread: {e}")));
    let client = Client {
        commands: command_tx,
        done: done_rx,
    };
    let server_fds: Vec<RawFd> = servers.iter().map(|s| s.as_raw_fd()).collect();

    eprintln!("floor: settling the connections ({SETTLE_ROUNDS} rounds) ...");
    let settle = WriteRun {
        name: "settle",
        frames_per_write: 1,
        pause: opts.pause,
        warmup: SETTLE_ROUNDS,
        rounds: 0,
    };
    measure_writes(&server_fds, &client, &settle);
    for (name, frames_per_write) in [("write_one_frame", 1), ("write_batched_4", 4), ("write_batched_10", 10)] {
        eprintln!("floor: {name} ...");
        let run = WriteRun {
            name,
            frames_per_write,
            pause: opts.pause,
            warmup: opts.warmup,
            rounds: opts.rounds,
        };
        println!("{}", measure_writes(&server_fds, &client, &run));
    }
    eprintln!("floor: ping_pong (recv_until_eagain and single_recv, alternating) ...");
    for line in measure_ping_pong(&server_fds, &client, &opts) {
        println!("{line}");
    }
    let name = "write_one_frame_after_idle";
    eprintln!("floor: {name} ({} ms between rounds) ...", opts.idle_pause.as_millis());
    let run = WriteRun {
        name,
        frames_per_write: 1,
        pause: opts.idle_pause,
        warmup: opts.warmup,
        rounds: opts.rounds,
    };
    println!("{}", measure_writes(&server_fds, &client, &run));

    // Ignoring the error is fine: the thread may already have stopped on its own.
    let _ = client.commands.send(ClientCmd::Stop);
    if client_thread.join().is_err() {
        fail("the client thread panicked");
    }
    drop(servers);
    let loadavg_end = loadavg();
    println!(
        r#"{{"measurement":"machine","nproc":{cpus},"kernel":"{kernel}","conns":{},"loadavg_start":[{},{},{}],"loadavg_end":[{},{},{}]}}"#,
        opts.conns,
        num(loadavg_start[0]),
        num(loadavg_start[1]),
        num(loadavg_start[2]),
        num(loadavg_end[0]),
        num(loadavg_end[1]),
        num(loadavg_end[2]),
    );
    eprintln!("floor: done in {:.1} s", started.elapsed().as_secs_f64());
}
