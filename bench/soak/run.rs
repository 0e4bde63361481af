//! The poster and the run: phases, RSS readings and the verdict.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::{Instant as TInstant, sleep, sleep_until, timeout, timeout_at};

use crate::churn::churner;
use crate::common::{Fields, HTTP_TIMEOUT, Http, Resp, rss_kb, settle_rss, sign, unix_now};
use crate::state::{ERR_KINDS, ErrKind, METHODS, Phase, Shared};
use crate::steady::{SteadyReport, steady_repos, steady_task};
use crate::{DELIVERY_DEADLINE, MAX_DRIFT_KB, Opts, QUIESCE_DEADLINE, RSS_SETTLE, SETUP_DEADLINE};

// ---------------------------------------------------------------------------------
// Poster

/// Runs the poster on its own thread and current-thread runtime: on the shared runtime
/// each request would queue behind the churn and subscriber tasks, and a busy machine
/// would then fall short of `--rate`.
pub(crate) fn spawn_poster(sh: Arc<Shared>, rate: f64) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("poster".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("poster runtime");
            rt.block_on(poster(sh, rate));
        })
        .expect("spawn poster thread")
}

/// Posts event k to repo k % repos at `rate` per second until told to stop.
pub(crate) async fn poster(sh: Arc<Shared>, rate: f64) {
    let mut http = Http::new(sh.addr);
    let mut body = String::with_capacity(256);
    let start = TInstant::now();
    let repos = sh.repo_ids.len();
    for k in 0u64.. {
        let at = start + Duration::from_secs_f64(k as f64 / rate);
        sleep_until(at).await;
        if sh.stop_posting.load(Relaxed) {
            break;
        }
        let lag = TInstant::now().duration_since(at).as_millis() as u64;
        sh.post_lag_max_ms.fetch_max(lag, Relaxed);
        let repo = (k % repos as u64) as usize;
        body.clear();
        let _ = write!(
            body,
            r#"{{"type":"repo-update","content":{{"repo_id":"{}","commit_id":"{k:040x}"}}}}"#,
            sh.repo_ids[repo]
        );
        let ok = match http
            .request("POST", "/events", Some(&sh.event_token), body.as_bytes())
            .await
        {
            Ok(Resp { status: 200, .. }) => true,
            Ok(Resp { status, body: b }) => {
                let msg = format!("POST /events -> {status} {}", String::from_utf8_lossy(&b));
                sh.error(ErrKind::Http, None, msg);
                false
            }
            Err(e) => {
                sh.error(ErrKind::Http, None, format!("POST /events: {e}"));
                false
            }
        };
        if ok {
            sh.expected.fetch_add(sh.repo_subscribers[repo], Relaxed);
        }
        sh.posted_ok.lock().unwrap().push(ok);
    }
}

// ---------------------------------------------------------------------------------
// The run

/// Polls `cond` every 10 ms until it holds or `deadline` passes; returns whether it holds.
pub(crate) async fn wait_for(deadline: TInstant, cond: impl Fn() -> bool) -> bool {
    while !cond() {
        if TInstant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(10)).await;
    }
    true
}

pub(crate) async fn run(o: &Opts, addr: SocketAddr, pid: u32, key: &str) -> (Fields, Vec<String>) {
    let mut problems = Vec::new();
    let tag = format!("{:08x}-{:04x}", std::process::id(), unix_now() & 0xffff);
    let repos = o.steady;
    let repo_ids: Vec<String> = (0..repos).map(|r| format!("{tag}-4000-8000-{r:012x}")).collect();
    let exp = unix_now() + 3600;
    let good_tokens = repo_ids
        .iter()
        .map(|id| {
            sign(
                key,
                &json!({"repo_id": id, "username": "churn@example.com", "exp": exp}),
            )
        })
        .collect();
    let bad_tokens = repo_ids
        .iter()
        .map(|id| {
            [
                sign("not-the-key", &json!({"repo_id": id, "username": "churn@example.com", "exp": exp})),
                sign(key, &json!({"repo_id": id, "username": "churn@example.com", "exp": unix_now() - 60})),
                sign(key, &json!({"repo_id": "00000000-0000-0000-0000-000000000000", "username": "churn@example.com", "exp": exp})),
                "bad".to_string(),
            ]
        })
        .collect();
    let mut repo_subscribers = vec![0u64; repos];
    for i in 0..o.steady {
        for r in steady_repos(i, repos) {
            repo_subscribers[r] += 1;
        }
    }
    let sh = Arc::new(Shared {
        addr,
        methods: o.methods.clone(),
        url: format!("ws://{addr}/"),
        repo_ids,
        good_tokens,
        bad_tokens,
        event_token: sign(key, &json!({"exp": unix_now() + 3600})),
        repo_subscribers,
        next_conn: AtomicU64::new(0),
        next_probe: AtomicU64::new(0),
        by_method: Default::default(),
        bad_token_conns: AtomicU64::new(0),
        churn_events: AtomicU64::new(0),
        fin_reset: AtomicU64::new(0),
        errors: Default::default(),
        errors_by_method: Default::default(),
        first_errors: Mutex::new(Vec::new()),
        confirmed: AtomicUsize::new(0),
        paused: AtomicUsize::new(0),
        delivered: AtomicU64::new(0),
        expected: AtomicU64::new(0),
        posted_ok: Mutex::new(Vec::new()),
        stop_posting: AtomicBool::new(false),
        post_lag_max_ms: AtomicU64::new(0),
    });

    let mut http = Http::new(addr);
    match timeout(HTTP_TIMEOUT, http.request("GET", "/ping", None, b"")).await {
        Ok(Ok(Resp { status: 200, .. })) => {}
        other => problems.push(format!("GET /ping: {other:?}")),
    }
    drop(http);

    // Steady subscribers.
    eprintln!("[soak] server {addr} pid {pid}: {} steady subscribers", o.steady);
    let (steady_stop, steady_rx) = watch::channel(false);
    let steady: Vec<_> = (0..o.steady)
        .map(|i| tokio::spawn(steady_task(i, sh.clone(), steady_rx.clone())))
        .collect();
    drop(steady_rx);
    let all_confirmed = wait_for(TInstant::now() + SETUP_DEADLINE, || {
        sh.confirmed.load(Relaxed) + sh.errors[ErrKind::SteadyClosed as usize].load(Relaxed) as usize >= o.steady
    })
    .await;
    let confirmed = sh.confirmed.load(Relaxed);
    if !all_confirmed || confirmed < o.steady {
        problems.push(format!("only {confirmed} of {} steady subscribers confirmed", o.steady));
    }
    let rss_start = rss_kb(pid);

    // Churn and events.
    let warm_s = o.warmup.unwrap_or(o.seconds / 6.0);
    eprintln!(
        "[soak] {} churners, {} events/s for {} s (RSS {rss_start:?} KiB; warm-up reading after {warm_s} s)",
        o.churners, o.rate, o.seconds
    );
    let t0 = TInstant::now();
    let poster = spawn_poster(sh.clone(), o.rate);
    let (phase, phase_rx) = watch::channel(Phase::Run);
    let churners: Vec<_> = (0..o.churners)
        .map(|id| tokio::spawn(churner(id, sh.clone(), phase_rx.clone())))
        .collect();
    drop(phase_rx);
    let series = Arc::new(Mutex::new(Vec::<(u64, Option<u64>)>::new()));
    let sampler = {
        let series = series.clone();
        tokio::spawn(async move {
            for s in (0u64..).step_by(5) {
                sleep_until(t0 + Duration::from_secs(s)).await;
                series.lock().unwrap().push((s, rss_kb(pid)));
            }
        })
    };

    // Warm-up reading, in the same state as the final one: churn paused and drained.
    sleep_until(t0 + Duration::from_secs_f64(warm_s)).await;
    let _ = phase.send(Phase::Pause);
    let pause_start = TInstant::now();
    if !wait_for(pause_start + QUIESCE_DEADLINE, || sh.paused.load(Relaxed) >= o.churners).await {
        problems.push("churners did not pause in time for the warm-up reading".into());
    }
    let rss_warm = settle_rss(pid, &RSS_SETTLE).await;
    let pause = pause_start.elapsed();
    let conns_at_warm = sh.next_conn.load(Relaxed);
    eprintln!("[soak] warm-up: {conns_at_warm} churn connections, RSS {rss_warm:?} KiB");
    let _ = phase.send(Phase::Run);

    // The rest of the run (the pause does not count as churn time).
    let end = t0 + Duration::from_secs_f64(o.seconds) + pause;
    let mut last_report = TInstant::now();
    while TInstant::now() < end {
        sleep_until(end.min(last_report + Duration::from_secs(10))).await;
        last_report = TInstant::now();
        eprintln!(
            "[soak] t={:.0}s: {} churn connections, {} errors, RSS {:?} KiB",
            t0.elapsed().as_secs_f64(),
            sh.next_conn.load(Relaxed),
            sh.error_total(),
            rss_kb(pid)
        );
    }
    let _ = phase.send(Phase::Stop);
    sh.stop_posting.store(true, Relaxed);
    let stop_deadline = TInstant::now() + QUIESCE_DEADLINE;
    for c in churners {
        if timeout_at(stop_deadline, c).await.is_err() {
            problems.push("a churner did not stop in time".into());
        }
    }
    if !wait_for(stop_deadline, || poster.is_finished()).await {
        problems.push("the poster did not stop in time".into());
    }
    sampler.abort();
    let churn_s = o.seconds;
    let churn_connections = sh.next_conn.load(Relaxed);

    // Every steady subscriber must get every event of its repos.
    let expected = sh.expected.load(Relaxed);
    let complete = wait_for(TInstant::now() + DELIVERY_DEADLINE, || {
        sh.delivered.load(Relaxed) >= expected
    })
    .await;
    if !complete {
        problems.push(format!(
            "deliveries incomplete after {DELIVERY_DEADLINE:?}: {}/{expected}",
            sh.delivered.load(Relaxed)
        ));
    }
    let rss_end = settle_rss(pid, &RSS_SETTLE).await;
    let _ = steady_stop.send(true);
    let mut reports = Vec::new();
    let join_deadline = TInstant::now() + Duration::from_secs(10);
    for h in steady {
        // A subscriber that did not report counts as having received nothing.
        reports.push(match timeout_at(join_deadline, h).await {
            Ok(Ok(r)) => r,
            _ => {
                problems.push("a steady subscriber did not finish in time".into());
                SteadyReport::default()
            }
        });
    }

    // Count exactly: for every 200-answered event, each subscriber of its repo.
    let posted_ok = sh.posted_ok.lock().unwrap().clone();
    let (mut delivered, mut lost, mut duplicates, mut out_of_order) = (0u64, 0u64, 0u64, 0u64);
    for (i, rep) in reports.iter().enumerate() {
        duplicates += rep.duplicates;
        out_of_order += rep.out_of_order;
        for &r in &steady_repos(i, repos) {
            for k in (r..posted_ok.len()).step_by(repos) {
                if !posted_ok[k] {
                    continue;
                }
                if rep.has(r, k as u64, repos as u64) {
                    delivered += 1;
                } else {
                    lost += 1;
                }
            }
        }
    }
    let events_posted = posted_ok.iter().filter(|&&ok| ok).count();
    let drift = match (rss_warm, rss_end) {
        (Some(w), Some(e)) => Some(e as i64 - w as i64),
        _ => None,
    };
    let errors = sh.error_total();
    if lost > 0 {
        problems.push(format!("{lost} deliveries lost"));
    }
    if errors > 0 {
        problems.push(format!("{errors} errors"));
    }
    match drift {
        Some(d) if d.abs() > MAX_DRIFT_KB => problems.push(format!("RSS drift {d} KiB")),
        None => problems.push("no RSS reading".into()),
        _ => {}
    }

    let count = |a: &[AtomicU64; 4]| -> Value {
        METHODS
            .iter()
            .map(|m| (m.name().to_string(), json!(a[*m as usize].load(Relaxed))))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let mut out = Fields::default();
    out.put("seconds", churn_s);
    out.put("steady", o.steady);
    out.put("churners", o.churners);
    out.put("rate", o.rate);
    out.put("methods", o.methods.iter().map(|m| m.name()).collect::<Vec<_>>());
    out.put("churn_connections", churn_connections);
    out.put("churn_per_s", (churn_connections as f64 / churn_s).round());
    out.put("closed_by", count(&sh.by_method));
    out.put("bad_token_connections", sh.bad_token_conns.load(Relaxed));
    out.put("churn_events_received", sh.churn_events.load(Relaxed));
    out.put("fin_answered_with_reset", sh.fin_reset.load(Relaxed));
    out.put("errors", errors);
    out.put(
        "error_kinds",
        ERR_KINDS
            .iter()
            .filter(|(k, _)| sh.errors[*k as usize].load(Relaxed) > 0)
            .map(|(k, name)| (name.to_string(), json!(sh.errors[*k as usize].load(Relaxed))))
            .collect::<serde_json::Map<_, _>>(),
    );
    out.put("errors_by_method", count(&sh.errors_by_method));
    out.put("first_errors", sh.first_errors.lock().unwrap().clone());
    out.put("events_posted", events_posted);
    out.put("post_lag_max_ms", sh.post_lag_max_ms.load(Relaxed));
    out.put("expected_deliveries", delivered + lost);
    out.put("delivered", delivered);
    out.put("lost", lost);
    out.put("duplicates", duplicates);
    out.put("out_of_order", out_of_order);
    out.put("rss_start_kb", rss_start);
    out.put("rss_warm_kb", rss_warm);
    out.put("rss_end_kb", rss_end);
    out.put("rss_drift_kb", drift);
    out.put("rss_series_kb", series.lock().unwrap().clone());
    (out, problems)
}
