//! One scenario from start to end: server, clients, probes, the delivery phase, the
//! figures and the problems found.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::{Instant as TInstant, sleep, timeout};

use crate::client::{ClientReport, Shared, client_task, wait_until};
use crate::common::{Fields, Http, rss_kb, settle_rss};
use crate::post::{PostStats, events_token, on_poster_thread, post_parallel, post_probe, post_sequential};
use crate::stats::{Hist, cpu_ns, loadavg_1m, round3, rss_peak_kb, self_cpu_ns, summary_exact, us};
use crate::{Mode, Opts, PROBE_REPOST, Plan, RSS_SETTLE, STALL, Target, now_ns, parse_ws_url};

// ---------------------------------------------------------------------------------
// One scenario

pub(crate) async fn run_scenario(idx: usize, plan: &Plan, o: &Opts, target: &Target) -> (Fields, Vec<String>) {
    let mut problems: Vec<String> = Vec::new();
    let pid = target.pid;
    let deadline = o.deadline;
    let tag = format!("{:08x}-{:04x}", std::process::id(), idx);
    let n_ev = plan.events;
    let post_addr = match &o.post_url {
        Some(u) => parse_ws_url(u).unwrap_or(target.addr),
        None => target.addr,
    };
    let sh = Arc::new(Shared {
        addr: target.addr,
        post_addr,
        url: format!("ws://{}/", target.addr),
        key: target.key.clone(),
        clients: plan.clients,
        repos: plan.repos,
        events: n_ev,
        source_ips: o.source_ips,
        connect_deadline: TInstant::now() + deadline,
        repo_ids: (0..plan.repos).map(|r| format!("{tag}-4000-8000-{r:012x}")).collect(),
        pad: "p".repeat(plan.pad),
        repo_connected: (0..plan.repos).map(|_| AtomicU32::new(0)).collect(),
        repo_confirmed: (0..plan.repos).map(|_| AtomicU32::new(0)).collect(),
        ev_sent_ns: (0..n_ev).map(|_| AtomicU64::new(0)).collect(),
        ev_intended_ns: (0..n_ev).map(|_| AtomicU64::new(0)).collect(),
        ev_got: (0..n_ev).map(|_| AtomicU32::new(0)).collect(),
        ev_last_ns: (0..n_ev).map(|_| AtomicU64::new(0)).collect(),
        latency: Hist::new(),
        latency_intended: Hist::new(),
        delivered: AtomicU64::new(0),
        last_delivery_ns: AtomicU64::new(0),
        connect_done: AtomicUsize::new(0),
        connected: AtomicUsize::new(0),
        closed_early: AtomicUsize::new(0),
        notify: Notify::new(),
        errors: Mutex::new(Vec::new()),
    });
    let token = Arc::new(events_token(&target.key));
    eprintln!(
        "[load] scenario {}: {} clients, {} repos, {} events, {:?}",
        plan.name, plan.clients, plan.repos, plan.events, plan.mode
    );

    // Liveness.
    let mut http = Http::new(target.addr);
    match http.request("GET", "/ping", None, b"").await {
        Ok(r) if r.status == 200 => {}
        Ok(r) => problems.push(format!("GET /ping -> {}", r.status)),
        Err(e) => problems.push(format!("GET /ping: {e}")),
    }
    let rss_idle = pid.and_then(rss_kb);

    // Connect and subscribe.
    let (stop_tx, stop_rx) = watch::channel(false);
    let sem = Arc::new(Semaphore::new(o.connect_concurrency));
    let t_conn = Instant::now();
    let handles: Vec<_> = (0..plan.clients)
        .map(|i| tokio::spawn(client_task(i, sh.clone(), sem.clone(), stop_rx.clone())))
        .collect();
    drop(stop_rx);
    wait_until(&sh.notify, sh.connect_deadline, || {
        sh.connect_done.load(Relaxed) >= plan.clients
    })
    .await;
    let connect_s = t_conn.elapsed().as_secs_f64();
    let connected = sh.connected.load(Relaxed);
    let connect_failures = plan.clients - connected;
    if connect_failures > 0 {
        problems.push(format!("{connect_failures} clients failed to connect"));
    }
    eprintln!("[load]   {connected} connected in {connect_s:.2} s");

    // Confirm every subscription with probes.
    let probe_deadline = TInstant::now() + deadline;
    let pending = |sh: &Shared| -> Vec<usize> {
        (0..sh.repos)
            .filter(|&r| sh.repo_confirmed[r].load(Relaxed) < sh.repo_connected[r].load(Relaxed))
            .collect()
    };
    let mut probe_rounds = 0;
    loop {
        let todo = pending(&sh);
        if todo.is_empty() || TInstant::now() >= probe_deadline {
            break;
        }
        probe_rounds += 1;
        for r in todo {
            if let Err(e) = post_probe(&mut http, &sh, &token, r).await {
                sh.note_error(e);
            }
        }
        let round_end = probe_deadline.min(TInstant::now() + PROBE_REPOST);
        wait_until(&sh.notify, round_end, || pending(&sh).is_empty()).await;
    }
    let unconfirmed: u64 = (0..plan.repos)
        .map(|r| (sh.repo_connected[r].load(Relaxed) as u64).saturating_sub(sh.repo_confirmed[r].load(Relaxed) as u64))
        .sum();
    if unconfirmed > 0 {
        problems.push(format!("{unconfirmed} subscriptions never got a probe event"));
    }
    eprintln!("[load]   subscriptions confirmed ({probe_rounds} probe rounds), {unconfirmed} missing");
    let rss_connected = pid.and_then(rss_kb);
    let setup_retries = http.retries;
    drop(http); // would sit idle through the rest of the run

    // Idle window (scenario c).
    let mut keepalive = Value::Null;
    let mut bench_idle_cpu = Value::Null;
    if let Mode::Idle { secs } = plan.mode {
        eprintln!("[load]   idle for {secs} s");
        let c0 = pid.and_then(cpu_ns);
        let b0 = self_cpu_ns();
        sleep(Duration::from_secs_f64(secs)).await;
        let c1 = pid.and_then(cpu_ns);
        bench_idle_cpu = json!(round3(self_cpu_ns().saturating_sub(b0) as f64 / 1e9));
        let alive = connected - sh.closed_early.load(Relaxed);
        if let (Some(c0), Some(c1)) = (c0, c1)
            && alive > 0
            && secs > 0.0
        {
            keepalive = json!(round3(c1.saturating_sub(c0) as f64 / 1000.0 / (alive as f64 * secs)));
        }
    }

    // Delivery phase.
    let cpu0 = pid.and_then(cpu_ns);
    let bcpu0 = self_cpu_ns();
    let t0 = now_ns();
    let post_deadline = TInstant::now() + deadline;
    let ps = match plan.mode {
        _ if connected == 0 => {
            problems.push("no client connected: delivery phase skipped".into());
            PostStats::default()
        }
        mode => {
            let (sh, token, conns) = (sh.clone(), token.clone(), plan.http_conns);
            on_poster_thread(move || async move {
                match mode {
                    Mode::Sequential => post_sequential(&sh, &token, deadline).await,
                    Mode::Paced { rate } => post_parallel(sh, token, conns, Some(rate), post_deadline).await,
                    Mode::Burst | Mode::Idle { .. } => post_parallel(sh, token, conns, None, post_deadline).await,
                }
            })
            .await
        }
    };
    if let Some(why) = &ps.stopped {
        problems.push(why.clone());
    }
    let post_s = (now_ns() - t0) as f64 / 1e9;
    let posted: Vec<usize> = (0..n_ev).filter(|&k| sh.ev_sent_ns[k].load(Relaxed) != 0).collect();
    if posted.len() < n_ev && !matches!(plan.mode, Mode::Sequential) {
        problems.push(format!(
            "only {} of {n_ev} events posted before the deadline",
            posted.len()
        ));
    }
    let expected: u64 = posted
        .iter()
        .map(|&k| sh.repo_connected[k % plan.repos].load(Relaxed) as u64)
        .sum();
    // Wait for the deliveries, giving up early when nothing arrives for STALL.
    let wait_deadline = TInstant::now() + deadline;
    loop {
        let before = sh.delivered.load(Relaxed);
        let slice_end = wait_deadline.min(TInstant::now() + STALL);
        if wait_until(&sh.notify, slice_end, || sh.delivered.load(Relaxed) >= expected).await
            || TInstant::now() >= wait_deadline
            || sh.delivered.load(Relaxed) == before
        {
            break;
        }
    }
    let cpu1 = pid.and_then(cpu_ns);
    let bcpu1 = self_cpu_ns();
    let rss_peak = pid.and_then(rss_peak_kb);
    let last = sh.last_delivery_ns.load(Relaxed).max(t0);
    let delivery_s = (last - t0) as f64 / 1e9;
    eprintln!(
        "[load]   {} events posted in {post_s:.2} s, {}/{expected} delivered in {delivery_s:.2} s",
        posted.len(),
        sh.delivered.load(Relaxed)
    );
    // Per complete event: (POST send -> last subscriber, intended send -> last subscriber).
    let (fanout, fanout_intended): (Vec<u64>, Vec<u64>) = posted
        .iter()
        .filter(|&&k| {
            let want = sh.repo_connected[k % plan.repos].load(Relaxed);
            want > 0 && sh.ev_got[k].load(Relaxed) >= want
        })
        .map(|&k| {
            let last = sh.ev_last_ns[k].load(Relaxed);
            (
                last.saturating_sub(sh.ev_sent_ns[k].load(Relaxed)),
                last.saturating_sub(sh.ev_intended_ns[k].load(Relaxed)),
            )
        })
        .unzip();

    // Disconnect everybody and collect the per-client reports.
    let _ = stop_tx.send(true);
    let mut reports = Vec::with_capacity(handles.len());
    let aborts: Vec<_> = handles.iter().map(|h| h.abort_handle()).collect();
    match timeout(deadline, futures_util::future::join_all(handles)).await {
        Ok(results) => reports.extend(results.into_iter().flatten()),
        Err(_) => {
            problems.push("clients did not finish closing in time".into());
            aborts.iter().for_each(|a| a.abort());
        }
    }
    let rss_after = match pid {
        Some(pid) => settle_rss(pid, &RSS_SETTLE).await,
        None => None,
    };

    // Aggregate.
    let sum = |f: fn(&ClientReport) -> u64| reports.iter().map(f).sum::<u64>();
    let delivered = sum(|r| r.delivered);
    let duplicates = sum(|r| r.duplicates);
    let misrouted = sum(|r| r.misrouted);
    let unexpected = sum(|r| r.unexpected);
    let jwt_expired = sum(|r| r.jwt_expired);
    let no_newline = sum(|r| r.no_newline);
    let closed_by_server = sum(|r| r.closed_early as u64);
    let pings = sum(|r| r.pings);
    let lost = expected.saturating_sub(delivered);
    for (n, what) in [
        (lost, "deliveries lost"),
        (duplicates, "duplicate deliveries"),
        (misrouted, "misrouted frames"),
        (unexpected, "unexpected frames"),
        (jwt_expired, "jwt-expired replies"),
        (closed_by_server, "connections closed by the server"),
        (ps.errors, "/events requests failed"),
    ] {
        if n > 0 {
            problems.push(format!("{n} {what}"));
        }
    }
    if no_newline > 0 {
        // A format deviation, not a delivery failure: reported but not fatal.
        eprintln!("[load]   note: {no_newline} frames did not end with a newline");
    }
    let errors = sh.errors.lock().unwrap().clone();
    if !errors.is_empty() && !problems.is_empty() {
        eprintln!("[load]   first errors: {errors:?}");
    }

    let server_cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let per_conn = match (rss_idle, rss_connected) {
        (Some(i), Some(c)) if connected > 0 => {
            json!((c.saturating_sub(i) * 1024) / connected as u64)
        }
        _ => Value::Null,
    };
    let mut out = Fields::default();
    out.put("scenario", json!(plan.name));
    out.put("clients", json!(plan.clients));
    out.put("repos", json!(plan.repos));
    out.put("events", json!(posted.len()));
    out.put("http_conns", json!(plan.http_conns));
    out.put("pad", json!(plan.pad));
    out.put("connected", json!(connected));
    out.put("connect_failures", json!(connect_failures));
    out.put("unconfirmed_subscriptions", json!(unconfirmed));
    out.put("connect_s", json!(round3(connect_s)));
    out.put(
        "connect_rate_per_s",
        json!((connected as f64 / connect_s.max(1e-9)).round()),
    );
    out.put("server_rss_idle_kb", json!(rss_idle));
    out.put("server_rss_connected_kb", json!(rss_connected));
    out.put("rss_per_conn_bytes", per_conn);
    out.put("server_rss_after_close_kb", json!(rss_after));
    out.put("server_rss_peak_kb", json!(rss_peak));
    out.put("post_s", json!(round3(post_s)));
    out.put("delivery_s", json!(round3(delivery_s)));
    out.put("events_per_s", json!((posted.len() as f64 / post_s.max(1e-9)).round()));
    out.put(
        "deliveries_per_s",
        json!((delivered as f64 / delivery_s.max(1e-9)).round()),
    );
    out.put_raw("latency_us", sh.latency.summary());
    out.put_raw("fanout_complete_us", summary_exact(fanout));
    out.put_raw("latency_from_intended_us", sh.latency_intended.summary());
    out.put_raw("fanout_complete_from_intended_us", summary_exact(fanout_intended));
    out.put_raw("events_http_us", summary_exact(ps.http_ns));
    out.put("server_cpu_s", json!(server_cpu.map(|c| round3(c as f64 / 1e9))));
    out.put(
        "cpu_us_per_delivery",
        json!(
            server_cpu
                .filter(|_| delivered > 0)
                .map(|c| round3(c as f64 / 1000.0 / delivered as f64))
        ),
    );
    out.put("keepalive_cpu_us_per_conn_s", keepalive);
    out.put("bench_cpu_s", json!(round3(bcpu1.saturating_sub(bcpu0) as f64 / 1e9)));
    if let Mode::Paced { rate } = plan.mode {
        out.put("target_rate_per_s", json!(rate));
        out.put("pace_lag_max_us", json!(us(ps.pace_lag_max_ns)));
    }
    if let Mode::Idle { secs } = plan.mode {
        out.put("idle_s", json!(secs));
        out.put("bench_idle_cpu_s", bench_idle_cpu);
    }
    out.put("expected_deliveries", json!(expected));
    out.put("delivered", json!(delivered));
    out.put("lost", json!(lost));
    out.put("duplicates", json!(duplicates));
    out.put("misrouted", json!(misrouted));
    out.put("unexpected_msgs", json!(unexpected));
    out.put("jwt_expired_msgs", json!(jwt_expired));
    out.put("no_newline_msgs", json!(no_newline));
    out.put("closed_by_server", json!(closed_by_server));
    out.put("pings_received", json!(pings));
    out.put("http_errors", json!(ps.errors));
    out.put("http_retries", json!(ps.retries + setup_retries));
    out.put("first_errors", json!(errors));
    out.put("loadavg_1m", json!(loadavg_1m()));
    (out, problems)
}
