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

#[path = "../common/mod.rs"]
mod common;
mod measure;
mod sys;

use common::{parse_flags, raise_nofile_limit};
use std::io;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{self};
use std::thread;
use std::time::{Duration, Instant};

use crate::measure::{Client, ClientCmd, WriteRun, client_loop, measure_ping_pong, measure_writes};
use crate::sys::{connect_from, kernel_release, loadavg, nproc, num};

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
[--source-ips K] [--pause-ms P] [--idle-pause-ms P]  (see the doc comment of bench/floor/main.rs)";

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
