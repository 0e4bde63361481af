//! The client thread and the two measurements: server-side writes to N sockets, and
//! ping/pong rounds read until EAGAIN or with a single recv.

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::thread;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::sys::{
    loadavg, median_min_max, ns_to_us, num, poll_events, recv_once, send_once, thread_cpu_ns, thread_rusage_us,
};
use crate::{FRAME_LEN, Opts, PING, PONG, ROUND_TIMEOUT, fail};

// ---------------------------------------------------------------------------------
// Client thread

pub(crate) enum ClientCmd {
    /// Expect `bytes` bytes over all sockets; answer every 2 bytes read with a pong.
    Round {
        bytes: u64,
        answer_pings: bool,
    },
    Stop,
}

pub(crate) struct RoundDone {
    /// When the client thread read the last byte of the round.
    pub(crate) last_byte_at: Instant,
    /// The client thread's CPU for the round.
    pub(crate) cpu_ns: u64,
    /// `epoll_wait` calls during the round (many mean the client kept catching up and
    /// sleeping, so that later writes had to wake it).
    pub(crate) epoll_waits: u64,
}

pub(crate) struct ClientRound {
    pub(crate) expected: u64,
    pub(crate) received: u64,
    pub(crate) answer_pings: bool,
    pub(crate) cpu_start: u64,
    pub(crate) epoll_waits: u64,
}

/// Reads every ready socket until `EAGAIN`; reports each round when all its bytes came.
pub(crate) fn client_loop(
    clients: Vec<TcpStream>,
    commands: Receiver<ClientCmd>,
    done: Sender<RoundDone>,
) -> Result<(), String> {
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
pub(crate) struct Client {
    pub(crate) commands: Sender<ClientCmd>,
    pub(crate) done: Receiver<RoundDone>,
}

impl Client {
    pub(crate) fn start_round(&self, bytes: u64, answer_pings: bool) {
        if self.commands.send(ClientCmd::Round { bytes, answer_pings }).is_err() {
            fail("the client thread is gone");
        }
    }

    pub(crate) fn wait_round(&self, what: &str) -> RoundDone {
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
pub(crate) fn text_frame() -> Vec<u8> {
    let mut frame = vec![0x81, (FRAME_LEN - 2) as u8];
    let body = br#"{"type":"repo-update","content":{"repo_id":"5a7f1c2e-4b3d-4e6f-9a8b-0c1d2e3f4a5b","commit_id":"0123456789abcdef"}}"#;
    frame.extend_from_slice(body);
    frame.resize(FRAME_LEN, b' ');
    frame
}

/// One write measurement: `warmup` unmeasured, then `rounds` measured rounds, each
/// after `pause`.
pub(crate) struct WriteRun<'a> {
    pub(crate) name: &'a str,
    pub(crate) frames_per_write: usize,
    pub(crate) pause: Duration,
    pub(crate) warmup: usize,
    pub(crate) rounds: usize,
}

/// One `send` of `frames_per_write` frames to every socket, per round.
pub(crate) fn measure_writes(servers: &[RawFd], client: &Client, run: &WriteRun) -> String {
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
pub(crate) struct PingPongStats {
    pub(crate) cpu_total: Vec<f64>,
    pub(crate) cpu_send: Vec<f64>,
    pub(crate) cpu_read: Vec<f64>,
    pub(crate) round_ms: Vec<f64>,
    pub(crate) recvs_per_exchange: Vec<f64>,
    pub(crate) epoll_waits: Vec<f64>,
    pub(crate) client_cpu: Vec<f64>,
    pub(crate) user_us: u64,
    pub(crate) sys_us: u64,
}

impl PingPongStats {
    pub(crate) fn json(&self, variant: &str, conns: usize) -> String {
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
pub(crate) fn measure_ping_pong(servers: &[RawFd], client: &Client, opts: &Opts) -> [String; 2] {
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
