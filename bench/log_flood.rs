//! Log bytes per second under a flood of misbehaving connections (issue 17, finding 2).
//!
//! # Running
//!
//! ```text
//! cargo bench --bench log_flood
//! cargo bench --bench log_flood -- --bin /path/to/other/notification-server --seconds 10
//! ```
//!
//! Flags: `--bin PATH` (the server binary; default the one this build made), `--seconds S`
//! (how long the flood lasts, 10), `--threads T` (flooding threads, 4), `--level L` (the
//! server's `log_level`, `info`), `--forwarded-for-bytes N` (size of the `X-Forwarded-For`
//! header, 7800: as much as the default 8 KB `max_head_bytes` leaves).
//!
//! # What it does
//!
//! Starts the server with a log file (`-l FILE`, so the figure is bytes written to disk),
//! then runs `--threads` threads for `--seconds`, each opening connections one after
//! another as fast as it can. Even threads send a websocket upgrade with the long
//! `X-Forwarded-For`, then one unmasked frame, which a client must never send (the server
//! closes with a protocol error); odd threads send a request head of pseudo-random bytes
//! (the server answers 400). Each connection is read to its end before the next.
//!
//! # Output: one JSON object on stdout
//!
//! `connections` (made during the flood), `log_bytes` (growth of the log file from the
//! flood's start until it settles after the flood), `log_bytes_per_second` (that divided
//! by `--seconds`), `log_lines`, `longest_line`, `suppression_lines` (lines counting what
//! the rate limit suppressed).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const USAGE: &str = "log_flood [--bin PATH] [--seconds S] [--threads T] [--level L] [--forwarded-for-bytes N]";

struct Options {
    bin: PathBuf,
    seconds: u64,
    threads: u64,
    level: String,
    forwarded_for_bytes: usize,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        bin: PathBuf::from(env!("CARGO_BIN_EXE_notification-server")),
        seconds: 10,
        threads: 4,
        level: "info".into(),
        forwarded_for_bytes: 7800,
    };
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--bin" => o.bin = PathBuf::from(&value),
            "--seconds" => o.seconds = value.parse().map_err(|e| bad(&e))?,
            "--threads" => o.threads = value.parse().map_err(|e| bad(&e))?,
            "--level" => o.level = value,
            "--forwarded-for-bytes" => o.forwarded_for_bytes = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown argument {flag}\n{USAGE}")),
        }
    }
    Ok(o)
}

/// The server under test, killed and its directory removed on drop.
struct Server {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
    addr: SocketAddr,
}

impl Server {
    fn start(o: &Options) -> Result<Server, String> {
        let dir = std::env::temp_dir().join(format!("log-flood-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let conf = format!(
            "[notification]\nhost = 127.0.0.1\nport = 0\nlog_level = {}\njwt_private_key = bench-key\n",
            o.level
        );
        std::fs::write(dir.join("seafile.conf"), conf).map_err(|e| e.to_string())?;
        let log = dir.join("notification-server.log");
        let child = Command::new(&o.bin)
            .arg("-c")
            .arg(&dir)
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", o.bin.display()))?;
        let mut server = Server {
            child,
            dir,
            log,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            let text = std::fs::read_to_string(&server.log).unwrap_or_default();
            if let Some(addr) = text
                .lines()
                .find_map(|l| l.rsplit("listening on ").next().filter(|_| l.contains("listening on ")))
                .and_then(|a| a.trim().parse().ok())
            {
                server.addr = addr;
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err("the server did not log `listening on` within 30 s (at warn and above it does not)".into())
    }

    fn log_size(&self) -> u64 {
        std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn forwarded_for(len: usize) -> String {
    let mut v = "10.0.0.1, ".repeat(len / 10 + 1);
    v.truncate(len.saturating_sub(3));
    v.push_str("255");
    v
}

/// Reads until the server closes (or 5 s pass); errors (a reset) count as closed.
fn read_to_end(s: &mut TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 4096];
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
}

fn upgrade_then_unmasked_frame(addr: SocketAddr, head: &[u8]) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.write_all(head)?;
    // The 101 ends with a blank line; read it before sending the frame.
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Ok(());
        }
        got.push(byte[0]);
    }
    s.write_all(&[0x81, 5, b'h', b'e', b'l', b'l', b'o'])?;
    read_to_end(&mut s);
    Ok(())
}

fn malformed_request(addr: SocketAddr, seed: &mut u64) -> std::io::Result<()> {
    let mut junk: Vec<u8> = (0..300)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed >> 24) as u8
        })
        .filter(|b| *b != b'\r' && *b != b'\n')
        .collect();
    junk.extend_from_slice(b"\r\n\r\n");
    let mut s = TcpStream::connect(addr)?;
    let _ = s.write_all(&junk);
    read_to_end(&mut s);
    Ok(())
}

fn main() {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let server = match Server::start(&o) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let head: Arc<[u8]> = format!(
        "GET /notification HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Forwarded-For: {}\r\n\r\n",
        forwarded_for(o.forwarded_for_bytes)
    )
    .into_bytes()
    .into();
    let stop = Arc::new(AtomicBool::new(false));
    let connections = Arc::new(AtomicU64::new(0));
    let before = server.log_size();
    eprintln!(
        "flooding {} for {} s with {} threads",
        server.addr, o.seconds, o.threads
    );
    let workers: Vec<_> = (0..o.threads)
        .map(|t| {
            let (stop, connections, head, addr) = (stop.clone(), connections.clone(), head.clone(), server.addr);
            std::thread::spawn(move || {
                let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (t + 1);
                while !stop.load(Ordering::Relaxed) {
                    let done = if t % 2 == 0 {
                        upgrade_then_unmasked_frame(addr, &head)
                    } else {
                        malformed_request(addr, &mut seed)
                    };
                    if done.is_ok() {
                        connections.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(o.seconds));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    // Let the server finish the connections in flight and write what it has left.
    let mut size = server.log_size();
    loop {
        std::thread::sleep(Duration::from_millis(1500));
        let now = server.log_size();
        if now == size {
            break;
        }
        size = now;
    }
    let text = std::fs::read(&server.log).unwrap_or_default();
    let flood = text.get(before as usize..).unwrap_or_default();
    let lines: Vec<&[u8]> = flood.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
    let longest = lines.iter().map(|l| l.len()).max().unwrap_or(0);
    let needle = b"more such lines suppressed";
    let suppression = lines
        .iter()
        .filter(|l| l.windows(needle.len()).any(|w| w == needle))
        .count();
    let grown = size - before;
    println!(
        "{{\"bench\":\"log_flood\",\"bin\":{:?},\"level\":{:?},\"seconds\":{},\"threads\":{},\"connections\":{},\"log_bytes\":{grown},\"log_bytes_per_second\":{},\"log_lines\":{},\"longest_line\":{longest},\"suppression_lines\":{suppression}}}",
        o.bin.display().to_string(),
        o.level,
        o.seconds,
        o.threads,
        connections.load(Ordering::Relaxed),
        grown / o.seconds.max(1),
        lines.len()
    );
}
