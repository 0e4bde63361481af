//! Posting events to /events: the probe posts that confirm subscriptions, and the
//! delivery phase's parallel bursts, paced rate and sequential posts.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use serde_json::json;
use tokio::time::{Instant as TInstant, sleep_until};

use crate::client::{Shared, wait_until};
use crate::common::{Http, Resp, unix_now};
use crate::{STALL, now_ns};

// ---------------------------------------------------------------------------------
// Posting events

pub(crate) fn events_token(key: &str) -> String {
    let claims = json!({ "exp": unix_now() + 300 });
    let key = jsonwebtoken::EncodingKey::from_secret(key.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("HS256 encoding cannot fail")
}

#[derive(Default)]
pub(crate) struct PostStats {
    pub(crate) http_ns: Vec<u64>,
    pub(crate) errors: u64,
    pub(crate) retries: u64,
    pub(crate) pace_lag_max_ns: u64,
    /// Why posting stopped early (sequential mode).
    pub(crate) stopped: Option<String>,
}

impl PostStats {
    pub(crate) fn merge(&mut self, o: PostStats) {
        self.http_ns.extend(o.http_ns);
        self.errors += o.errors;
        self.retries += o.retries;
        self.pace_lag_max_ns = self.pace_lag_max_ns.max(o.pace_lag_max_ns);
    }
}

/// Posts event `k` (to repo k % repos) and records its send time, and `intended` (or
/// the send time, when `None`) as the time it was meant to be sent.
pub(crate) async fn post_event(
    http: &mut Http,
    sh: &Shared,
    token: &str,
    k: usize,
    intended: Option<u64>,
    body: &mut String,
    ps: &mut PostStats,
) {
    body.clear();
    let t0 = now_ns();
    let _ = write!(
        body,
        r#"{{"type":"repo-update","content":{{"repo_id":"{}","commit_id":"{:040x}","bench_seq":{k},"bench_ts_ns":{t0},"pad":"{}"}}}}"#,
        sh.repo_ids[k % sh.repos],
        k,
        sh.pad
    );
    sh.ev_intended_ns[k].store(intended.unwrap_or(t0), Relaxed);
    sh.ev_sent_ns[k].store(t0, Relaxed);
    match http.request("POST", "/events", Some(token), body.as_bytes()).await {
        Ok(r) if r.status == 200 => ps.http_ns.push(now_ns() - t0),
        Ok(r) => {
            ps.errors += 1;
            sh.note_error(format!(
                "POST /events -> {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ));
        }
        Err(e) => {
            ps.errors += 1;
            sh.note_error(format!("POST /events: {e}"));
        }
    }
}

pub(crate) async fn post_probe(http: &mut Http, sh: &Shared, token: &str, r: usize) -> Result<(), String> {
    let body = format!(
        r#"{{"type":"repo-update","content":{{"repo_id":"{}","commit_id":"{:040x}","bench_probe":true}}}}"#,
        sh.repo_ids[r], 0
    );
    match http.request("POST", "/events", Some(token), body.as_bytes()).await? {
        Resp { status: 200, .. } => Ok(()),
        Resp { status, body } => Err(format!(
            "probe POST /events -> {status} {}",
            String::from_utf8_lossy(&body)
        )),
    }
}

/// Runs a poster on its own thread and current-thread runtime.  On the shared
/// runtime a poster whose answer arrived would queue behind the hundreds of client
/// tasks woken by the same fan-out, so the server would sit idle waiting for the next
/// request and the measured /events time would include our scheduling delay.
pub(crate) async fn on_poster_thread<F, Fut>(f: F) -> PostStats
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = PostStats>,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("poster".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("poster runtime");
            let _ = tx.send(rt.block_on(f()));
        })
        .expect("spawn poster thread");
    rx.await.expect("poster thread panicked")
}

/// Posts all events over `conns` keep-alive connections, taking event numbers from a
/// shared counter; with `rate`, event k is not sent before start + k / rate. Event k is
/// meant to be sent at that slot, or, in a burst, at the start: a POST held back by the
/// server delays every later one, and that wait counts in their intended-time latency.
pub(crate) async fn post_parallel(
    sh: Arc<Shared>,
    token: Arc<String>,
    conns: usize,
    rate: Option<f64>,
    deadline: TInstant,
) -> PostStats {
    let next = Arc::new(AtomicUsize::new(0));
    let start = TInstant::now();
    let start_ns = now_ns();
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let (sh, token, next) = (sh.clone(), token.clone(), next.clone());
            tokio::spawn(async move {
                let mut http = Http::new(sh.post_addr);
                let mut ps = PostStats::default();
                let mut body = String::with_capacity(256);
                loop {
                    let k = next.fetch_add(1, Relaxed);
                    if k >= sh.events || TInstant::now() >= deadline {
                        break;
                    }
                    let offset = rate.map_or(Duration::ZERO, |rate| Duration::from_secs_f64(k as f64 / rate));
                    let intended = Some(start_ns + offset.as_nanos() as u64);
                    if rate.is_some() {
                        let at = start + offset;
                        sleep_until(at).await;
                        ps.pace_lag_max_ns = ps
                            .pace_lag_max_ns
                            .max(TInstant::now().duration_since(at).as_nanos() as u64);
                    }
                    post_event(&mut http, &sh, &token, k, intended, &mut body, &mut ps).await;
                }
                ps.retries = http.retries;
                ps
            })
        })
        .collect();
    let mut all = PostStats::default();
    for t in tasks {
        if let Ok(ps) = t.await {
            all.merge(ps);
        }
    }
    all
}

/// Posts events one at a time, each only after all its subscribers received the
/// previous one.  Stops at the first event that does not complete in time.
pub(crate) async fn post_sequential(sh: &Shared, token: &str, deadline: Duration) -> PostStats {
    let mut http = Http::new(sh.post_addr);
    let mut ps = PostStats::default();
    let mut body = String::with_capacity(256);
    for k in 0..sh.events {
        // Closed loop by design: each event is meant to go once the previous one
        // reached everybody, so its intended time is its send time.
        post_event(&mut http, sh, token, k, None, &mut body, &mut ps).await;
        let want = sh.repo_connected[k % sh.repos].load(Relaxed);
        let complete = wait_until(&sh.notify, TInstant::now() + deadline.min(STALL), || {
            sh.ev_got[k].load(Relaxed) >= want
        })
        .await;
        if !complete {
            ps.stopped = Some(format!(
                "event {k} reached {}/{want} subscribers; stopped posting",
                sh.ev_got[k].load(Relaxed)
            ));
            break;
        }
    }
    ps.retries = http.retries;
    ps
}
