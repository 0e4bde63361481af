//! The run state shared by clients, posters and the scenario driver, and the websocket
//! clients: connect, subscribe, read and count every delivery.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::{Instant as TInstant, timeout, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::common::unix_now;
use crate::now_ns;
use crate::stats::Hist;

// ---------------------------------------------------------------------------------
// Shared run state

/// State shared by the posters, the client tasks and the scenario driver.
pub(crate) struct Shared {
    pub(crate) addr: SocketAddr,
    /// Where events are posted: the same server, or another instance of a cluster
    /// (`--post-url`), to measure cross-instance delivery through Redis.
    pub(crate) post_addr: SocketAddr,
    pub(crate) url: String,
    pub(crate) key: String,
    pub(crate) clients: usize,
    pub(crate) repos: usize,
    pub(crate) events: usize,
    pub(crate) source_ips: usize,
    pub(crate) connect_deadline: TInstant,
    pub(crate) repo_ids: Vec<String>,
    /// Padding added to every event.
    pub(crate) pad: String,
    /// Clients per repo whose websocket opened and whose subscription was sent.
    pub(crate) repo_connected: Vec<AtomicU32>,
    /// Clients per repo that received a probe.
    pub(crate) repo_confirmed: Vec<AtomicU32>,
    /// Per event: send time (0 = not posted), distinct receivers, last receipt time.
    pub(crate) ev_sent_ns: Vec<AtomicU64>,
    /// Per event: when it was meant to be sent (the burst's start, or its slot in a paced
    /// schedule); stored before the POST is written.
    pub(crate) ev_intended_ns: Vec<AtomicU64>,
    pub(crate) ev_got: Vec<AtomicU32>,
    pub(crate) ev_last_ns: Vec<AtomicU64>,
    /// Per delivery, from the POST's send time.
    pub(crate) latency: Hist,
    /// Per delivery, from the event's intended send time: includes the time the sender
    /// was kept waiting by earlier POSTs (no coordinated omission).
    pub(crate) latency_intended: Hist,
    pub(crate) delivered: AtomicU64,
    pub(crate) last_delivery_ns: AtomicU64,
    pub(crate) connect_done: AtomicUsize,
    pub(crate) connected: AtomicUsize,
    pub(crate) closed_early: AtomicUsize,
    /// Woken when all clients connected, a repo's probes completed, or an event
    /// reached all its subscribers.
    pub(crate) notify: Notify,
    pub(crate) errors: Mutex<Vec<String>>,
}

impl Shared {
    pub(crate) fn note_error(&self, e: String) {
        let mut v = self.errors.lock().unwrap();
        if v.len() < 8 && !v.contains(&e) {
            v.push(e);
        }
    }

    /// Events of repo `r` are k = r, r + repos, ...; bit k / repos in a client's map.
    pub(crate) fn slots_per_repo(&self) -> usize {
        self.events.div_ceil(self.repos)
    }
}

/// Waits until `cond` holds or `deadline` passes; returns whether it holds.
pub(crate) async fn wait_until(notify: &Notify, deadline: TInstant, cond: impl Fn() -> bool) -> bool {
    loop {
        if cond() {
            return true;
        }
        let now = TInstant::now();
        if now >= deadline {
            return cond();
        }
        // The timeout slice is a safety net for a missed wake-up, not the mechanism.
        let _ = timeout_at(deadline.min(now + Duration::from_millis(100)), notify.notified()).await;
    }
}

// ---------------------------------------------------------------------------------
// Websocket clients

pub(crate) type Ws = WebSocketStream<TcpStream>;

/// What one client saw; returned by its task when the run stops.
#[derive(Default)]
pub(crate) struct ClientReport {
    pub(crate) delivered: u64,
    pub(crate) duplicates: u64,
    pub(crate) misrouted: u64,
    pub(crate) unexpected: u64,
    pub(crate) jwt_expired: u64,
    pub(crate) no_newline: u64,
    pub(crate) pings: u64,
    pub(crate) closed_early: bool,
}

pub(crate) struct ClientState {
    pub(crate) repo: usize,
    pub(crate) probed: bool,
    pub(crate) seen: Vec<u64>,
    pub(crate) rep: ClientReport,
}

pub(crate) fn json_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let rest = &text[text.find(key)? + key.len()..];
    Some(rest.trim_start().strip_prefix(':')?.trim_start())
}

pub(crate) fn json_u64(text: &str, key: &str) -> Option<u64> {
    let v = json_after(text, key)?;
    let end = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    v[..end].parse().ok()
}

pub(crate) fn json_str<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let v = json_after(text, key)?.strip_prefix('"')?;
    Some(&v[..v.find('"')?])
}

impl ClientState {
    /// Handles one text frame.  Hand-rolled field scanning instead of a JSON parser
    /// keeps the per-message cost of the load side low.
    pub(crate) fn on_text(&mut self, sh: &Shared, text: &str) {
        let now = now_ns();
        if !text.ends_with('\n') {
            self.rep.no_newline += 1;
        }
        if text.contains("\"jwt-expired\"") {
            self.rep.jwt_expired += 1;
            return;
        }
        if !text.contains("\"repo-update\"") {
            self.rep.unexpected += 1;
            return;
        }
        if json_str(text, "\"repo_id\"") != Some(sh.repo_ids[self.repo].as_str()) {
            self.rep.misrouted += 1;
            return;
        }
        if let Some(seq) = json_u64(text, "\"bench_seq\"") {
            let seq = seq as usize;
            if seq >= sh.events || seq % sh.repos != self.repo {
                self.rep.misrouted += 1;
                return;
            }
            let slot = seq / sh.repos;
            let (word, bit) = (slot / 64, 1u64 << (slot % 64));
            if self.seen[word] & bit != 0 {
                self.rep.duplicates += 1;
                return;
            }
            self.seen[word] |= bit;
            self.rep.delivered += 1;
            let sent = json_u64(text, "\"bench_ts_ns\"").unwrap_or_else(|| sh.ev_sent_ns[seq].load(Relaxed));
            sh.latency.record(now.saturating_sub(sent));
            let intended = sh.ev_intended_ns[seq].load(Relaxed);
            sh.latency_intended
                .record(now.saturating_sub(if intended == 0 { sent } else { intended }));
            sh.ev_last_ns[seq].fetch_max(now, Relaxed);
            sh.last_delivery_ns.fetch_max(now, Relaxed);
            sh.delivered.fetch_add(1, Relaxed);
            let got = sh.ev_got[seq].fetch_add(1, Relaxed) + 1;
            if got == sh.repo_connected[self.repo].load(Relaxed) {
                sh.notify.notify_one();
            }
        } else if text.contains("\"bench_probe\"") {
            if !self.probed {
                self.probed = true;
                let c = sh.repo_confirmed[self.repo].fetch_add(1, Relaxed) + 1;
                if c == sh.repo_connected[self.repo].load(Relaxed) {
                    sh.notify.notify_one();
                }
            }
        } else {
            self.rep.unexpected += 1;
        }
    }
}

pub(crate) fn client_token(sh: &Shared, i: usize, repo: usize) -> String {
    let claims = json!({
        "repo_id": sh.repo_ids[repo],
        "username": format!("bench{i}@example.com"),
        "exp": unix_now() + 3600,
    });
    let key = jsonwebtoken::EncodingKey::from_secret(sh.key.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("HS256 encoding cannot fail")
}

pub(crate) async fn connect_client(sh: &Shared, i: usize) -> Result<Ws, String> {
    let sock = match sh.addr {
        SocketAddr::V4(a) => {
            let s = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
            if a.ip().is_loopback() {
                // Spread the clients over several source addresses: each has its own
                // ephemeral port range.
                let src = Ipv4Addr::new(127, 0, 0, 1 + (i % sh.source_ips) as u8);
                s.bind(SocketAddr::new(src.into(), 0))
                    .map_err(|e| format!("bind {src}: {e}"))?;
            }
            s
        }
        SocketAddr::V6(_) => TcpSocket::new_v6().map_err(|e| format!("socket: {e}"))?,
    };
    let stream = sock.connect(sh.addr).await.map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    // Small buffers: the default 128 KiB read buffer per client would dominate the
    // load generator's memory at 15,000 clients.
    let cfg = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::client_async_with_config(sh.url.as_str(), stream, Some(cfg))
        .await
        .map_err(|e| format!("websocket handshake: {e}"))?;
    Ok(ws)
}

pub(crate) async fn client_task(
    i: usize,
    sh: Arc<Shared>,
    sem: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) -> ClientReport {
    let repo = i % sh.repos;
    let mut st = ClientState {
        repo,
        probed: false,
        seen: vec![0; sh.slots_per_repo().div_ceil(64)],
        rep: ClientReport::default(),
    };
    let opened = {
        let _permit = sem.acquire().await.expect("semaphore never closed");
        let sub = format!(
            r#"{{"type":"subscribe","content":{{"repos":[{{"id":"{}","jwt_token":"{}"}}]}}}}"#,
            sh.repo_ids[repo],
            client_token(&sh, i, repo)
        );
        timeout_at(sh.connect_deadline, async {
            let mut ws = connect_client(&sh, i).await?;
            ws.send(Message::text(sub))
                .await
                .map_err(|e| format!("send subscribe: {e}"))?;
            Ok::<_, String>(ws)
        })
        .await
        .unwrap_or_else(|_| Err("connect deadline passed".into()))
    };
    let mut ws = match opened {
        Ok(ws) => {
            sh.repo_connected[repo].fetch_add(1, Relaxed);
            sh.connected.fetch_add(1, Relaxed);
            Some(ws)
        }
        Err(e) => {
            sh.note_error(e);
            None
        }
    };
    if sh.connect_done.fetch_add(1, Relaxed) + 1 == sh.clients {
        sh.notify.notify_one();
    }
    let Some(ws_ref) = ws.as_mut() else {
        return st.rep;
    };
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            msg = ws_ref.next() => match msg {
                Some(Ok(Message::Text(t))) => st.on_text(&sh, t.as_str()),
                Some(Ok(Message::Close(frame))) => {
                    sh.note_error(format!("server closed a websocket: {frame:?}"));
                    st.rep.closed_early = true;
                }
                // tungstenite queues the pong and sends it on the next read.
                Some(Ok(Message::Ping(_))) => st.rep.pings += 1,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    sh.note_error(format!("websocket error: {e}"));
                    st.rep.closed_early = true;
                }
                None => {
                    sh.note_error("server dropped a websocket".into());
                    st.rep.closed_early = true;
                }
            }
        }
        if st.rep.closed_early {
            sh.closed_early.fetch_add(1, Relaxed);
            return st.rep;
        }
    }
    let _ = timeout(Duration::from_secs(2), ws_ref.close(None)).await;
    st.rep
}
