//! Hostile clients (issue 17): oversized subscribe messages that never read their
//! answers (`amplification`), websockets that never subscribe and take every slot
//! (`idle-slots`), and requests made to be logged at length (`log-flood`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant as TInstant, sleep, timeout};
use tokio_tungstenite::tungstenite::Message;

use crate::OP_TIMEOUT;
use crate::cluster::{metric_one, scrape};
use crate::common::{Fields, Http, RssSettle, settle_rss};
use crate::population::{connect_ws, subscribe_msg};
use crate::shapes::{Ground, PingLoop, ShapeOpts, Watch, check_peak, closes_by_reason, file_len, ms, vm_hwm_kb};

/// The server's default `max_message_bytes`: the largest message an attacker can send.
const MAX_MESSAGE_BYTES: usize = 262_144;
/// The server's default `max_head_bytes`.
const MAX_HEAD_BYTES: usize = 8192;

/// RSS after the attackers left: unchanged over four readings 250 ms apart, at most 10 s.
const RSS_RETURN: RssSettle = RssSettle {
    every: Duration::from_millis(250),
    readings: 4,
    at_most: Duration::from_secs(10),
};

fn upgrade_request(extra: &str) -> String {
    format!(
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// A client-to-server frame of `payload` (text, FIN), masked unless `unmasked`.
fn frame(payload: &[u8], unmasked: bool) -> Vec<u8> {
    let mut f = vec![0x81];
    let mask_bit = if unmasked { 0 } else { 0x80 };
    let len = payload.len();
    if len < 126 {
        f.push(mask_bit | len as u8);
    } else if len <= 0xffff {
        f.push(mask_bit | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(mask_bit | 127);
        f.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if unmasked {
        f.extend_from_slice(payload);
    } else {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    }
    f
}

/// Connects, sends a websocket upgrade with `extra` header lines and reads the answer's
/// head; returns the stream and the status line.
async fn raw_upgrade(addr: SocketAddr, extra: &str) -> Result<(TcpStream, String), String> {
    let mut s = timeout(OP_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_nodelay(true);
    s.write_all(upgrade_request(extra).as_bytes())
        .await
        .map_err(|e| format!("write upgrade: {e}"))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let until = TInstant::now() + OP_TIMEOUT;
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout_at(until, s.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            Ok(Ok(_)) => return Err("closed before the upgrade answer".into()),
            Ok(Err(e)) => return Err(format!("read upgrade answer: {e}")),
            Err(_) => return Err("no upgrade answer".into()),
        }
        if head.len() > 4096 {
            return Err("upgrade answer head too long".into());
        }
    }
    let text = String::from_utf8_lossy(&head);
    Ok((s, text.lines().next().unwrap_or_default().to_string()))
}

/// A subscribe message of `n` empty entries, `{"type":"subscribe","content":{"repos":[{},{},...]}}`.
fn empty_subscribe(n: usize) -> Vec<u8> {
    let mut m = br#"{"type":"subscribe","content":{"repos":["#.to_vec();
    for i in 0..n {
        m.extend_from_slice(if i == 0 { b"{}" } else { b",{}" });
    }
    m.extend_from_slice(b"]}}");
    m
}

/// The largest number of empty entries whose message fits `MAX_MESSAGE_BYTES`.
fn entries_that_fit() -> usize {
    let overhead = empty_subscribe(1).len() - 2;
    (MAX_MESSAGE_BYTES - overhead + 1) / 3
}

/// `attackers` connections each send `messages` subscribe messages of ~87,000 empty
/// entries (~256 KiB) and never read; they hold their sockets for `hold_s`, then leave.
pub(crate) async fn amplification(
    o: &ShapeOpts,
    g: &Ground,
    out: &mut Fields,
    problems: &mut Vec<String>,
) -> Result<(), String> {
    let mut inst = g.start("amplification", o.budget_bytes(), "")?;
    let pid = inst.pid();
    let base = settle_rss(pid, &RSS_RETURN).await.unwrap_or(0);
    let entries = entries_that_fit();
    let msg = Arc::new(frame(&empty_subscribe(entries), false));
    let watch = Watch::start(pid, Some(inst.metrics));
    let ping = PingLoop::start(inst.addr);
    let sent = Arc::new(AtomicU64::new(0));
    let upgraded = Arc::new(AtomicUsize::new(0));
    let t0 = TInstant::now();
    let tasks: Vec<_> = (0..o.attackers)
        .map(|_| {
            let (msg, sent, upgraded) = (msg.clone(), sent.clone(), upgraded.clone());
            let (addr, messages, hold) = (inst.addr, o.messages, Duration::from_secs_f64(o.hold_s));
            tokio::spawn(async move {
                let (mut s, status) = raw_upgrade(addr, "").await?;
                if !status.contains(" 101 ") {
                    return Err(format!("upgrade answered {status}"));
                }
                upgraded.fetch_add(1, Relaxed);
                let sending = async {
                    for _ in 0..messages {
                        s.write_all(&msg).await?;
                        sent.fetch_add(msg.len() as u64, Relaxed);
                    }
                    Ok::<_, std::io::Error>(())
                };
                // The server may stop reading (or close) once the answers fill the
                // socket; what was sent by the end of the hold is what counts.
                let _ = timeout(hold, sending).await;
                sleep(hold).await;
                Ok::<_, String>(s)
            })
        })
        .collect();
    let mut socks = Vec::new();
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(s)) => socks.push(s),
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(format!("attacker task: {e}")),
        }
    }
    let attack_s = t0.elapsed().as_secs_f64();
    let pings = ping.finish().await;
    let peaks = watch.finish().await;
    let closes = scrape(inst.metrics).await.unwrap_or_default();
    drop(socks);
    let after = settle_rss(pid, &RSS_RETURN).await.unwrap_or(0);
    let hwm = vm_hwm_kb(pid).unwrap_or(0);
    let allowed = (o.attackers * 2 * MAX_MESSAGE_BYTES) as u64 + o.budget_bytes();
    let bound = check_peak("amplification", hwm, base, allowed, o, problems);
    if after > base + (o.rss_return_mb << 10) {
        problems.push(format!(
            "amplification: RSS {after} KiB after the attackers left, more than {} MiB over the baseline {base} KiB",
            o.rss_return_mb
        ));
    }
    pings.check("amplification", o, problems);
    if upgraded.load(Relaxed) == 0 {
        problems.push(format!("amplification: no attacker got a websocket ({errors:?})"));
    }
    errors.truncate(3);
    out.put("attackers", o.attackers);
    out.put("upgraded", upgraded.load(Relaxed));
    out.put("messages_each", o.messages);
    out.put("entries_per_message", entries);
    out.put("message_bytes", msg.len());
    out.put("bytes_sent", sent.load(Relaxed));
    out.put("attack_s", (attack_s * 100.0).round() / 100.0);
    out.put("rss_base_kb", base);
    out.put("rss_peak_kb", hwm);
    out.put("rss_peak_sampled_kb", peaks.rss_kb);
    out.put("rss_bound_kb", bound);
    out.put("rss_after_kb", after);
    out.put("rss_given_back_kb", hwm.saturating_sub(after));
    out.put("output_bytes_peak", peaks.output_bytes as u64);
    out.put("pending_deliveries_peak", peaks.pending_deliveries as u64);
    out.put("ping", pings.json());
    out.put("server_closes", closes_by_reason(&closes));
    out.put("attacker_errors", errors);
    inst.stop();
    Ok(())
}

/// Fills `max_connections` (`--slots`) with websockets that answer pings but never
/// subscribe (re-connecting when closed), then checks whether a new client and `/ping`
/// still get in within `--admit-s`.
pub(crate) async fn idle_slots(
    o: &ShapeOpts,
    g: &Ground,
    out: &mut Fields,
    problems: &mut Vec<String>,
) -> Result<(), String> {
    let extra = format!("max_connections = {}\n", o.slots);
    let mut inst = g.start("idle-slots", o.budget_bytes(), &extra)?;
    let addr = inst.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let open = Arc::new(AtomicUsize::new(0));
    let opened = Arc::new(AtomicUsize::new(0));
    let closed_by_server = Arc::new(AtomicUsize::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    // Every task stops within OP_TIMEOUT of `stop` (a handshake in progress times out).
    let tasks: Vec<_> = (0..o.slots)
        .map(|_| {
            let (stop, open, opened, closed) = (stop.clone(), open.clone(), opened.clone(), closed_by_server.clone());
            let sem = sem.clone();
            tokio::spawn(async move {
                while !stop.load(Relaxed) {
                    let ws = {
                        let _permit = sem.acquire().await;
                        connect_ws(addr).await
                    };
                    let Ok(mut ws) = ws else {
                        sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    open.fetch_add(1, Relaxed);
                    opened.fetch_add(1, Relaxed);
                    // Reading answers the server's pings (tungstenite queues the pong).
                    loop {
                        if stop.load(Relaxed) {
                            break;
                        }
                        match timeout(Duration::from_millis(200), ws.next()).await {
                            Err(_) | Ok(Some(Ok(_))) => {}
                            Ok(_) => {
                                closed.fetch_add(1, Relaxed);
                                break;
                            }
                        }
                    }
                    open.fetch_sub(1, Relaxed);
                }
            })
        })
        .collect();
    // The slots are full when every task holds a websocket, or nothing moved for 3 s.
    let fill_start = TInstant::now();
    let (mut last, mut since) = (0, TInstant::now());
    while open.load(Relaxed) < o.slots
        && since.elapsed() < Duration::from_secs(3)
        && fill_start.elapsed() < Duration::from_secs(60)
    {
        sleep(Duration::from_millis(50)).await;
        let now = open.load(Relaxed);
        if now != last {
            (last, since) = (now, TInstant::now());
        }
    }
    let filled = open.load(Relaxed);
    let fill_s = fill_start.elapsed().as_secs_f64();
    let admit = Duration::from_secs_f64(o.admit_s);
    let ping = async {
        let t0 = TInstant::now();
        let mut http = Http::new(addr);
        match http.request("GET", "/ping", None, b"").await {
            Ok(r) if r.status == 200 => Ok(t0.elapsed()),
            Ok(r) => Err(format!("/ping answered {}", r.status)),
            Err(e) => Err(e),
        }
    };
    // The new client's attempts loop until the admit time is over.
    let new_client = async {
        let until = TInstant::now() + admit;
        let t0 = TInstant::now();
        loop {
            match tokio::time::timeout_at(until, new_client_once(addr)).await {
                Ok(Ok(_)) => return Ok(t0.elapsed()),
                Ok(Err(_)) if TInstant::now() + Duration::from_millis(100) < until => {
                    sleep(Duration::from_millis(100)).await;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(format!("not in within {:.0} s", o.admit_s)),
            }
        }
    };
    let (client, ping) = tokio::join!(new_client, timeout(admit, ping));
    let ping = ping.unwrap_or_else(|_| Err(format!("not answered within {:.0} s", o.admit_s)));
    let metrics = scrape(inst.metrics).await.unwrap_or_default();
    stop.store(true, Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    if filled < o.slots {
        out.put("note", format!("only {filled} of {} slots could be filled", o.slots));
    }
    let figure = |r: &Result<Duration, String>| match r {
        Ok(d) => json!({"in": true, "ms": ms(d.as_micros() as u64)}),
        Err(e) => json!({"in": false, "error": e}),
    };
    if let Err(e) = &client {
        problems.push(format!("idle-slots: a new client did not get in: {e}"));
    }
    if let Err(e) = &ping {
        problems.push(format!("idle-slots: /ping did not get in: {e}"));
    }
    out.put("slots", o.slots);
    out.put("idle_websockets_open", filled);
    out.put("fill_s", (fill_s * 100.0).round() / 100.0);
    out.put("new_client", figure(&client));
    out.put("ping", figure(&ping));
    out.put("idle_opened_total", opened.load(Relaxed));
    out.put("idle_closed_by_server", closed_by_server.load(Relaxed));
    out.put("accept_paused", metric_one(&metrics, "notification_accept_paused"));
    inst.stop();
    Ok(())
}

/// One new client: websocket, a subscribe with a refused token, its `jwt-expired` answer.
async fn new_client_once(addr: SocketAddr) -> Result<(), String> {
    let mut ws = connect_ws(addr).await?;
    ws.send(Message::text(subscribe_msg(&[("idle-slots-probe", "bad")])))
        .await
        .map_err(|e| format!("send: {e}"))?;
    while let Some(m) = timeout(OP_TIMEOUT, ws.next())
        .await
        .map_err(|_| "no answer".to_string())?
    {
        if let Message::Text(t) = m.map_err(|e| format!("{e}"))? {
            let v: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
            if v["type"] == "jwt-expired" {
                return Ok(());
            }
        }
    }
    Err("closed before answering".into())
}

/// An `X-Forwarded-For` line that fills the request head up to `max_head_bytes` less
/// `room`: a list of documentation addresses.
fn long_forwarded_for(room: usize) -> String {
    let mut v = String::from("X-Forwarded-For: 203.0.113.7");
    while v.len() + 16 < MAX_HEAD_BYTES - room {
        v.push_str(", 198.51.100.");
        v.push_str(&(v.len() % 250).to_string());
    }
    v + "\r\n"
}

/// Attack `k`: 0, an upgrade with an 8 KB `X-Forwarded-For` then an unmasked frame; 1, a
/// request with a header line that is not one; 2, bytes that are not HTTP at all.
async fn flood_once(addr: SocketAddr, k: usize, xff: &str) -> Result<(), String> {
    let mut s = match k % 3 {
        0 => {
            let (mut s, _status) = raw_upgrade(addr, xff).await?;
            s.write_all(&frame(br#"{"type":"subscribe","content":{"repos":[]}}"#, true))
                .await
                .map_err(|e| format!("write: {e}"))?;
            s
        }
        _ => {
            let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
            let req = if k % 3 == 1 {
                format!("GET /ping HTTP/1.1\r\nHost: x\r\n{xff}this is not a header\r\n\r\n")
            } else {
                format!("\x16\x03\x01\x02\x00 {xff}\r\n\r\n")
            };
            s.write_all(req.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
            s
        }
    };
    // Read the answer until the server closes (or two seconds pass).
    let mut buf = [0u8; 4096];
    let until = TInstant::now() + Duration::from_secs(2);
    while let Ok(Ok(n)) = tokio::time::timeout_at(until, s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
    Ok(())
}

/// `--flood-conns` loops of [`flood_once`] for `--flood-s` (at most `--flood-max`
/// connections); the log file's growth per second and per attack.
pub(crate) async fn log_flood(
    o: &ShapeOpts,
    g: &Ground,
    out: &mut Fields,
    problems: &mut Vec<String>,
) -> Result<(), String> {
    let mut inst = g.start("log-flood", o.budget_bytes(), "")?;
    let log = inst.log_path();
    sleep(Duration::from_millis(200)).await;
    let before = file_len(&log);
    let lines_before = inst.all_log_lines().len();
    let xff = Arc::new(long_forwarded_for(400));
    let ping = PingLoop::start(inst.addr);
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let t0 = TInstant::now();
    let until = t0 + Duration::from_secs_f64(o.flood_s);
    let tasks: Vec<_> = (0..o.flood_conns)
        .map(|_| {
            let (next, errors, xff, addr, max) = (next.clone(), errors.clone(), xff.clone(), inst.addr, o.flood_max);
            tokio::spawn(async move {
                while TInstant::now() < until {
                    let k = next.fetch_add(1, Relaxed);
                    if k >= max {
                        break;
                    }
                    if tokio::time::timeout_at(until + OP_TIMEOUT, flood_once(addr, k, &xff))
                        .await
                        .map_or(true, |r| r.is_err())
                    {
                        errors.fetch_add(1, Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let pings = ping.finish().await;
    // The log is written by the loop as it goes; give the last lines a moment.
    sleep(Duration::from_millis(500)).await;
    let bytes = file_len(&log).saturating_sub(before);
    let new_lines: Vec<String> = inst.all_log_lines().split_off(lines_before);
    let attacks = next.load(Relaxed).min(o.flood_max);
    let per_attack = bytes as f64 / attacks.max(1) as f64;
    if per_attack > o.log_bytes_per_attack as f64 {
        problems.push(format!(
            "log-flood: {per_attack:.0} log bytes per attack connection, over the bound of {}",
            o.log_bytes_per_attack
        ));
    }
    pings.check("log-flood", o, problems);
    out.put("attacks", attacks);
    out.put("attack_errors", errors.load(Relaxed));
    out.put("forwarded_for_bytes", xff.len());
    out.put("seconds", (secs * 100.0).round() / 100.0);
    out.put("log_bytes", bytes);
    out.put("log_lines", new_lines.len());
    out.put("log_bytes_per_s", (bytes as f64 / secs).round());
    out.put("log_bytes_per_attack", per_attack.round());
    out.put("longest_line", new_lines.iter().map(|l| l.len()).max().unwrap_or(0));
    let mut sample: Vec<String> = new_lines
        .iter()
        .take(3)
        .map(|l| l.chars().take(160).collect())
        .collect();
    sample.dedup();
    out.put("first_lines", sample);
    out.put("ping", pings.json());
    inst.stop();
    Ok(())
}
