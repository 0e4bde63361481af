//! Churn connections: connect, subscribe, confirm, linger and close in every way a client
//! can.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{Instant as TInstant, timeout, timeout_at};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::OP_TIMEOUT;
use crate::common::Rng;
use crate::state::{CloseMethod, ErrKind, Phase, Shared, Ws, connect_ws, probe_msg, subscribe_msg, unsubscribe_msg};

// ---------------------------------------------------------------------------------
// Churn connections

/// What one churn connection expects from the server.
pub(crate) struct Churn<'a> {
    pub(crate) sh: &'a Shared,
    pub(crate) n: u64,
    pub(crate) method: CloseMethod,
    pub(crate) repos: Vec<usize>,
    /// Whether the subscriptions used valid tokens.
    pub(crate) good: bool,
    /// Ids still owed a `jwt-expired`, in the order the server must answer.
    pub(crate) owed: VecDeque<String>,
    /// Set once the server confirmed the unsubscribe: events for our repos are errors.
    pub(crate) unsubscribed: bool,
}

impl Churn<'_> {
    pub(crate) fn error(&self, kind: ErrKind, msg: String) {
        self.sh
            .error(kind, Some(self.method), format!("conn {}: {msg}", self.n));
    }

    /// Checks one text frame from the server.
    pub(crate) fn on_text(&mut self, text: &str) {
        let v: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(_) => return self.error(ErrKind::UnexpectedMessage, format!("bad JSON {text:?}")),
        };
        let id = v["content"]["repo_id"].as_str().unwrap_or_default();
        if v["type"] == "jwt-expired" {
            if self.owed.front().is_some_and(|o| o == id) {
                self.owed.pop_front();
            } else {
                self.error(
                    ErrKind::UnexpectedMessage,
                    format!("jwt-expired for {id}, expected {:?}", self.owed.front()),
                );
            }
        } else if v["type"] == "repo-update" {
            let ours = self.repos.iter().any(|&r| self.sh.repo_ids[r] == id);
            if !ours || !self.good {
                self.error(
                    ErrKind::UnexpectedMessage,
                    format!("event for a repo not subscribed: {text}"),
                );
            } else if self.unsubscribed {
                self.error(
                    ErrKind::EventAfterUnsubscribe,
                    format!("event after unsubscribe: {text}"),
                );
            } else {
                self.sh.churn_events.fetch_add(1, Relaxed);
            }
        } else {
            self.error(ErrKind::UnexpectedMessage, format!("unexpected message {text}"));
        }
    }

    /// Reads and checks messages until every owed `jwt-expired` came (or, with
    /// `until_owed` false, simply until `until`).  Returns false if the connection
    /// ended or the owed answers did not come in time (already counted as errors).
    pub(crate) async fn pump(&mut self, ws: &mut Ws, until: TInstant, until_owed: bool) -> bool {
        loop {
            if until_owed && self.owed.is_empty() {
                return true;
            }
            let msg = match timeout_at(until, ws.next()).await {
                Err(_) if until_owed => {
                    self.error(
                        ErrKind::JwtExpiredMissing,
                        format!("no jwt-expired for {:?}", self.owed),
                    );
                    return false;
                }
                Err(_) => return true,
                Ok(m) => m,
            };
            match msg {
                Some(Ok(Message::Text(t))) => self.on_text(t.as_str()),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Binary(_))) => self.error(ErrKind::UnexpectedMessage, "binary frame".into()),
                Some(Ok(Message::Close(f))) => {
                    self.error(ErrKind::Send, format!("server closed the connection: {f:?}"));
                    return false;
                }
                Some(Err(e)) => {
                    self.error(ErrKind::Send, format!("connection failed: {e}"));
                    return false;
                }
                None => {
                    self.error(ErrKind::Send, "connection ended".into());
                    return false;
                }
            }
        }
    }

    pub(crate) async fn send(&self, ws: &mut Ws, text: String) -> bool {
        match timeout(OP_TIMEOUT, ws.send(Message::text(text))).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                self.error(ErrKind::Send, format!("send: {e}"));
                false
            }
            Err(_) => {
                self.error(ErrKind::Send, "send timed out".into());
                false
            }
        }
    }

    /// Sends a sync probe and waits for its answer (and every earlier owed one).
    pub(crate) async fn sync(&mut self, ws: &mut Ws) -> bool {
        let probe = self.sh.probe();
        if !self.send(ws, probe_msg(&probe)).await {
            return false;
        }
        self.owed.push_back(probe);
        self.pump(ws, TInstant::now() + OP_TIMEOUT, true).await
    }

    /// Close frame, then the echo with the same code, then the server's TCP close.
    pub(crate) async fn close_handshake(&mut self, ws: &mut Ws) {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: Utf8Bytes::from_static(""),
        };
        match timeout(OP_TIMEOUT, ws.close(Some(frame))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return self.error(ErrKind::Send, format!("send close: {e}")),
            Err(_) => return self.error(ErrKind::Send, "send close timed out".into()),
        }
        let until = TInstant::now() + OP_TIMEOUT;
        let mut echo = false;
        loop {
            match timeout_at(until, ws.next()).await {
                Err(_) if echo => {
                    return self.error(ErrKind::CloseHandshake, "TCP still open after the close echo".into());
                }
                Err(_) => return self.error(ErrKind::CloseHandshake, "no close echo".into()),
                Ok(Some(Ok(Message::Close(f)))) => {
                    if f.as_ref().map(|f| f.code) != Some(CloseCode::Normal) {
                        self.error(ErrKind::CloseHandshake, format!("close echo {f:?}, sent 1000"));
                    }
                    echo = true;
                }
                Ok(Some(Ok(Message::Text(t)))) => self.on_text(t.as_str()),
                Ok(Some(Ok(_))) => {}
                // After the echo, tungstenite reports the server's TCP close as the end.
                Ok(None) if echo => return,
                Ok(None) => return self.error(ErrKind::CloseHandshake, "connection ended without an echo".into()),
                Ok(Some(Err(e))) => {
                    let when = if echo { "after" } else { "before" };
                    return self.error(ErrKind::CloseHandshake, format!("{e} {when} the close echo"));
                }
            }
        }
    }

    /// shutdown(write) without a Close frame, then read until the server closes.
    pub(crate) async fn fin(&self, ws: &mut Ws) {
        let s = ws.get_mut();
        if let Err(e) = s.shutdown().await {
            return self.error(ErrKind::Send, format!("shutdown: {e}"));
        }
        // Reading until EOF also means that nothing unread is left when the socket is
        // dropped: close() with unread data would send a RST instead of nothing more.
        let mut buf = [0u8; 4096];
        let until = TInstant::now() + OP_TIMEOUT;
        loop {
            match timeout_at(until, s.read(&mut buf)).await {
                Ok(Ok(0)) => return,
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    // Closed, by a reset: not wrong, but noted.
                    self.sh.fin_reset.fetch_add(1, Relaxed);
                    return;
                }
                Ok(Err(e)) => return self.error(ErrKind::FinNotClosed, format!("read after FIN: {e}")),
                Err(_) => return self.error(ErrKind::FinNotClosed, "server kept the socket open after FIN".into()),
            }
        }
    }
}

/// One churn connection number `n`: connect, subscribe, maybe confirm and linger, close.
pub(crate) async fn churn_once(sh: &Shared, n: u64, rng: &mut Rng) {
    let m = sh.methods.len() as u64;
    let method = sh.methods[(n % m) as usize];
    // Blocks of consecutive connections (one of each close method) one time in ten.
    let round = n / m;
    let bad = round % 10 == 3;
    let count = 1 + rng.below(3);
    let mut repos: Vec<usize> = Vec::with_capacity(count);
    while repos.len() < count.min(sh.repo_ids.len()) {
        let r = rng.below(sh.repo_ids.len());
        if !repos.contains(&r) {
            repos.push(r);
        }
    }
    sh.by_method[method as usize].fetch_add(1, Relaxed);
    if bad {
        sh.bad_token_conns.fetch_add(1, Relaxed);
    }
    let mut c = Churn {
        sh,
        n,
        method,
        repos,
        good: !bad,
        owed: VecDeque::new(),
        unsubscribed: false,
    };
    let mut ws = match timeout(OP_TIMEOUT, connect_ws(sh)).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => return c.error(ErrKind::Connect, e),
        Err(_) => return c.error(ErrKind::Connect, "connect timed out".into()),
    };
    let bad_kind = ((round / 10) % 4) as usize;
    let pairs: Vec<(&str, &str)> = c
        .repos
        .iter()
        .map(|&r| {
            let token = if bad {
                sh.bad_tokens[r][bad_kind].as_str()
            } else {
                sh.good_tokens[r].as_str()
            };
            (sh.repo_ids[r].as_str(), token)
        })
        .collect();
    if !c.send(&mut ws, subscribe_msg(&pairs)).await {
        return;
    }
    // Variety: half the connections confirm their subscription and linger up to 30 ms
    // (events may arrive); the rest close right after subscribing, racing the server.
    let settle = rng.below(2) == 0;
    if bad {
        c.owed.extend(c.repos.iter().map(|&r| sh.repo_ids[r].clone()));
        if !c.pump(&mut ws, TInstant::now() + OP_TIMEOUT, true).await {
            return;
        }
    } else if settle && !c.sync(&mut ws).await {
        return;
    }
    if settle {
        let linger = Duration::from_millis(rng.below(30) as u64);
        if !c.pump(&mut ws, TInstant::now() + linger, false).await {
            return;
        }
    }
    match method {
        CloseMethod::CloseFrame => c.close_handshake(&mut ws).await,
        CloseMethod::Fin => c.fin(&mut ws).await,
        CloseMethod::UnsubscribeClose => {
            let ids: Vec<&str> = c.repos.iter().map(|&r| sh.repo_ids[r].as_str()).collect();
            if !c.send(&mut ws, unsubscribe_msg(&ids)).await {
                return;
            }
            // On every other one, confirm the unsubscribe: from the probe's answer on,
            // no event for these repos may come.
            if round.is_multiple_of(2) {
                if !c.sync(&mut ws).await {
                    return;
                }
                c.unsubscribed = true;
            }
            c.close_handshake(&mut ws).await;
        }
        CloseMethod::Reset => {
            // SO_LINGER {on, 0}: close() then sends a RST and discards unsent data.
            if let Err(e) = ws.get_ref().set_zero_linger() {
                c.error(ErrKind::Send, format!("SO_LINGER: {e}"));
            }
            drop(ws);
        }
    }
}

pub(crate) async fn churner(id: usize, sh: Arc<Shared>, mut phase: watch::Receiver<Phase>) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((id as u64 + 1) << 17));
    loop {
        let p = *phase.borrow_and_update();
        match p {
            Phase::Stop => return,
            Phase::Pause => {
                sh.paused.fetch_add(1, Relaxed);
                // The main task always moves on to Run or Stop; the timeout is a backstop.
                let changed = timeout(Duration::from_secs(120), phase.changed()).await;
                sh.paused.fetch_sub(1, Relaxed);
                if !matches!(changed, Ok(Ok(()))) {
                    return;
                }
            }
            Phase::Run => {
                let n = sh.next_conn.fetch_add(1, Relaxed);
                churn_once(&sh, n, &mut rng).await;
            }
        }
    }
}
