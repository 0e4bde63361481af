//! Steady subscribers: every event of their repos must arrive once and in order.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

use crate::state::{ErrKind, Shared, connect_ws, event_seq, probe_msg, subscribe_msg};
use crate::{SETUP_DEADLINE, STEADY_REPOS};

// ---------------------------------------------------------------------------------
// Steady subscribers

#[derive(Default)]
pub(crate) struct RepoSeen {
    pub(crate) repo: usize,
    /// Bit k / repos set when event k arrived.
    pub(crate) bits: Vec<u64>,
    pub(crate) last: Option<u64>,
}

#[derive(Default)]
pub(crate) struct SteadyReport {
    pub(crate) seen: Vec<RepoSeen>,
    pub(crate) duplicates: u64,
    pub(crate) out_of_order: u64,
}

impl SteadyReport {
    pub(crate) fn on_event(&mut self, sh: &Shared, v: &Value) -> Result<(), String> {
        let repo_id = v["content"]["repo_id"].as_str().unwrap_or_default();
        let Some(k) = event_seq(v) else {
            return Err(format!("event without a sequence number: {v}"));
        };
        let repos = sh.repo_ids.len() as u64;
        let repo = (k % repos) as usize;
        if sh.repo_ids[repo] != repo_id {
            return Err(format!("event {k} misrouted: repo {repo_id}"));
        }
        let Some(rs) = self.seen.iter_mut().find(|r| r.repo == repo) else {
            return Err(format!("event {k} for repo {repo_id}, not subscribed"));
        };
        let slot = (k / repos) as usize;
        let (word, bit) = (slot / 64, 1u64 << (slot % 64));
        if rs.bits.len() <= word {
            rs.bits.resize(word + 1, 0);
        }
        if rs.bits[word] & bit != 0 {
            self.duplicates += 1;
            return Ok(());
        }
        rs.bits[word] |= bit;
        if rs.last.is_some_and(|last| k < last) {
            self.out_of_order += 1;
        }
        rs.last = Some(rs.last.map_or(k, |last| last.max(k)));
        sh.delivered.fetch_add(1, Relaxed);
        Ok(())
    }

    pub(crate) fn has(&self, repo: usize, k: u64, repos: u64) -> bool {
        let slot = (k / repos) as usize;
        self.seen
            .iter()
            .find(|r| r.repo == repo)
            .and_then(|r| r.bits.get(slot / 64))
            .is_some_and(|w| w & (1u64 << (slot % 64)) != 0)
    }
}

/// The repos of steady subscriber i.
pub(crate) fn steady_repos(i: usize, repos: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..STEADY_REPOS).map(|j| (i + j) % repos).collect();
    v.sort_unstable();
    v.dedup();
    v
}

pub(crate) async fn steady_task(i: usize, sh: Arc<Shared>, mut stop: watch::Receiver<bool>) -> SteadyReport {
    let repos = steady_repos(i, sh.repo_ids.len());
    let mut rep = SteadyReport {
        seen: repos
            .iter()
            .map(|&repo| RepoSeen {
                repo,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let probe = sh.probe();
    let setup = async {
        let mut ws = connect_ws(&sh).await?;
        let pairs: Vec<(&str, &str)> = repos
            .iter()
            .map(|&r| (sh.repo_ids[r].as_str(), sh.good_tokens[r].as_str()))
            .collect();
        ws.send(Message::text(subscribe_msg(&pairs)))
            .await
            .map_err(|e| format!("send subscribe: {e}"))?;
        ws.send(Message::text(probe_msg(&probe)))
            .await
            .map_err(|e| format!("send probe: {e}"))?;
        // Nothing is posted before every steady subscriber is confirmed, so the
        // probe's answer must be the first message.
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    if v["type"] == "jwt-expired" && v["content"]["repo_id"] == probe.as_str() {
                        return Ok(ws);
                    }
                    return Err(format!("unexpected message while confirming: {t}"));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => return Err(format!("no answer to the sync probe: {other:?}")),
            }
        }
    };
    let mut ws = match timeout(SETUP_DEADLINE, setup).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            sh.error(ErrKind::SteadyClosed, None, format!("steady {i}: {e}"));
            return rep;
        }
        Err(_) => {
            sh.error(ErrKind::SteadyClosed, None, format!("steady {i}: setup timed out"));
            return rep;
        }
    };
    sh.confirmed.fetch_add(1, Relaxed);
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = match serde_json::from_str(t.as_str()) {
                        Ok(v) => v,
                        Err(_) => {
                            sh.error(ErrKind::UnexpectedMessage, None, format!("steady {i}: bad JSON {t:?}"));
                            continue;
                        }
                    };
                    let r = if v["type"] == "repo-update" {
                        rep.on_event(&sh, &v)
                    } else {
                        Err(format!("unexpected message {t}"))
                    };
                    if let Err(e) = r {
                        sh.error(ErrKind::UnexpectedMessage, None, format!("steady {i}: {e}"));
                    }
                }
                // tungstenite queues the pong and sends it on the next read.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Binary(_))) => {
                    sh.error(ErrKind::UnexpectedMessage, None, format!("steady {i}: binary frame"));
                }
                Some(Ok(Message::Close(f))) => {
                    sh.error(ErrKind::SteadyClosed, None, format!("steady {i}: server closed: {f:?}"));
                    return rep;
                }
                Some(Err(e)) => {
                    sh.error(ErrKind::SteadyClosed, None, format!("steady {i}: {e}"));
                    return rep;
                }
                None => {
                    sh.error(ErrKind::SteadyClosed, None, format!("steady {i}: connection ended"));
                    return rep;
                }
            }
        }
    }
    let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
    rep
}
