//! The run: starts everything, drives the phases and faults, and tallies deliveries
//! against what each client should have received.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::watch;
use tokio::time::{Instant as TInstant, sleep, timeout, timeout_at};

use crate::actors::{METHOD_NAMES, Received, churner, misbehaver, spawn_poster, steady_task};
use crate::cluster::{Instance, Redis, metric_one, scrape, wait_for};
use crate::common::{Fields, unix_now};
use crate::faults::{Env, Faults, Quiet, Sample, quiesce, sample, scan_logs};
use crate::population::{Aud, ClientSpec, Keys, Phase, Posted, Shared, home, is_member, steady_specs};
use crate::{DELIVERY_DEADLINE, MAX_DRIFT_KB, MAX_FD_DRIFT, Opts, QUIESCE_DEADLINE, SETUP_DEADLINE, Schedule};

// ---------------------------------------------------------------------------------
// The run

pub(crate) struct Tally {
    pub(crate) expected: u64,
    pub(crate) received: u64,
    pub(crate) lost: u64,
    pub(crate) duplicates: u64,
    pub(crate) out_of_order: u64,
    pub(crate) outage_expected: u64,
    pub(crate) outage_lost: u64,
    pub(crate) outage_duplicates: u64,
    /// Events that reached a subscription outside their audience.
    pub(crate) misdelivered: u64,
    pub(crate) first_lost: Vec<String>,
}

/// Compares what each steady client received with what it should have.
pub(crate) fn tally(
    specs: &[ClientSpec],
    got: &[Received],
    posted: &[Posted],
    windows: &[(f64, f64)],
    sh: &Shared,
) -> Tally {
    let mut t = Tally {
        expected: 0,
        received: 0,
        lost: 0,
        duplicates: 0,
        out_of_order: 0,
        outage_expected: 0,
        outage_lost: 0,
        outage_duplicates: 0,
        misdelivered: 0,
        first_lost: Vec::new(),
    };
    let mut by_lib: Vec<Vec<u32>> = vec![Vec::new(); sh.lib_ids.len()];
    for (k, p) in posted.iter().enumerate() {
        if p.ok {
            by_lib[p.lib].push(k as u32);
        }
    }
    let in_outage = |at: f64| windows.iter().any(|&(a, b)| at >= a && at <= b);
    for (c, (spec, rec)) in specs.iter().zip(got).enumerate() {
        for (j, sub) in spec.subs.iter().enumerate() {
            let arrivals = rec.per_sub.get(j).map(Vec::as_slice).unwrap_or(&[]);
            let mut max_seen: Option<u32> = None;
            for &s in arrivals {
                if max_seen.is_some_and(|m| s < m) {
                    t.out_of_order += 1;
                }
                max_seen = Some(max_seen.map_or(s, |m| m.max(s)));
            }
            let mut sorted = arrivals.to_vec();
            sorted.sort_unstable();
            let crosses = home(sub.lib) != spec.instance;
            for w in sorted.windows(2) {
                if w[0] == w[1] {
                    if crosses && in_outage(posted[w[0] as usize].at) {
                        t.outage_duplicates += 1;
                    } else {
                        t.duplicates += 1;
                    }
                }
            }
            for &k in &by_lib[sub.lib] {
                let p = &posted[k as usize];
                let meant = match p.aud {
                    Aud::All => true,
                    Aud::User(u) => u == sub.user,
                    Aud::Group(g) => is_member(g, sub.user, sh.groups),
                };
                if !meant {
                    if sorted.binary_search(&k).is_ok() {
                        t.misdelivered += 1;
                        if t.first_lost.len() < 10 {
                            t.first_lost.push(format!(
                                "client {c}: event {k} arrived outside its audience {:?}",
                                p.aud
                            ));
                        }
                    }
                    continue;
                }
                let excused = crosses && in_outage(p.at);
                let arrived = sorted.binary_search(&k).is_ok();
                if excused {
                    t.outage_expected += 1;
                    if !arrived {
                        t.outage_lost += 1;
                    }
                    continue;
                }
                t.expected += 1;
                if arrived {
                    t.received += 1;
                } else {
                    t.lost += 1;
                    if t.first_lost.len() < 10 {
                        t.first_lost.push(format!(
                            "client {c} (on {}) lost event {k} (library {}, {:?}, posted at {:.1} s)",
                            ["A", "B"][spec.instance],
                            sub.lib,
                            p.aud,
                            p.at
                        ));
                    }
                }
            }
        }
    }
    t
}

pub(crate) fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

/// Both instances' CPU per delivery (microseconds) between samples a and b.
pub(crate) fn cpu_per_delivery(series: &[Vec<Sample>; 2], a: usize, b: usize) -> Option<f64> {
    let cpu: f64 = series.iter().map(|s| s[b].cpu_s - s[a].cpu_s).sum();
    let del: u64 = series
        .iter()
        .map(|s| s[b].deliveries.saturating_sub(s[a].deliveries))
        .sum();
    (del > 0).then(|| cpu * 1e6 / del as f64)
}

pub(crate) async fn run(
    o: &Opts,
    sched: &Schedule,
    insts: &[Instance],
    redis: &mut Redis,
    db: PathBuf,
    key: &str,
) -> (Fields, Vec<String>) {
    let mut problems = Vec::new();
    let tag = format!("{:08x}-{:04x}", std::process::id(), unix_now() & 0xffff);
    let lib_ids: Vec<String> = (0..o.libraries + 2)
        .map(|r| format!("{tag}-4000-8000-{r:012x}"))
        .collect();
    let sh = Arc::new(Shared {
        addrs: [insts[0].addr, insts[1].addr],
        lib_ids,
        users: o.users,
        groups: o.groups,
        keys: Keys {
            current: RwLock::new((0, key.to_string())),
        },
        t0: Instant::now(),
        posted: Mutex::new(Vec::new()),
        stop_posting: AtomicBool::new(false),
        post_failures: AtomicU64::new(0),
        confirmed: AtomicUsize::new(0),
        received: AtomicU64::new(0),
        steady_errors: AtomicU64::new(0),
        churn: AtomicU64::new(0),
        churn_by_method: Default::default(),
        churn_bad_token: AtomicU64::new(0),
        churn_events: AtomicU64::new(0),
        churn_errors: AtomicU64::new(0),
        slow_cycles: AtomicU64::new(0),
        slow_closed: AtomicU64::new(0),
        dead_cycles: AtomicU64::new(0),
        side_errors: AtomicU64::new(0),
        paused: AtomicUsize::new(0),
        first_errors: Mutex::new(Vec::new()),
        next_probe: AtomicU64::new(0),
    });
    let specs = Arc::new(steady_specs(o));
    let mut steady_on = [0u64; 2];
    for s in specs.iter() {
        steady_on[s.instance] += 1;
    }
    eprintln!(
        "[chaos] A {} (pid {}), B {} (pid {}), Redis :{}; {} steady clients ({} subscriptions) over {} libraries",
        insts[0].addr,
        insts[0].pid(),
        insts[1].addr,
        insts[1].pid(),
        redis.port,
        o.steady,
        specs.iter().map(|s| s.subs.len()).sum::<usize>(),
        o.libraries + 1
    );
    let (steady_stop, steady_rx) = watch::channel(false);
    let steady: Vec<_> = (0..o.steady)
        .map(|i| tokio::spawn(steady_task(i, specs.clone(), sh.clone(), steady_rx.clone())))
        .collect();
    drop(steady_rx);
    let all = wait_for(TInstant::now() + SETUP_DEADLINE, || {
        sh.confirmed.load(Relaxed) + sh.steady_errors.load(Relaxed) as usize >= o.steady
    })
    .await;
    if !all || sh.confirmed.load(Relaxed) < o.steady {
        problems.push(format!(
            "only {} of {} steady clients confirmed",
            sh.confirmed.load(Relaxed),
            o.steady
        ));
    }

    // Everything starts now; t counts from here.
    let sh_t0 = sh.secs();
    let rel = move |sh: &Shared| sh.secs() - sh_t0;
    let poster = spawn_poster(sh.clone(), o.clone(), sched.burst_every + sh_t0);
    let (phase, phase_rx) = watch::channel(Phase::Run);
    let mut loops = Vec::new();
    for id in 0..o.churners {
        loops.push(tokio::spawn(churner(id, sh.clone(), phase_rx.clone())));
    }
    for id in 0..o.slow {
        loops.push(tokio::spawn(misbehaver(id, true, sh.clone(), phase_rx.clone())));
    }
    for id in 0..o.dead {
        loops.push(tokio::spawn(misbehaver(id, false, sh.clone(), phase_rx.clone())));
    }
    drop(phase_rx);
    let n_loops = loops.len();

    let mut env = Env {
        sh: &sh,
        insts,
        redis,
        db,
        problems: &mut problems,
        faults: Faults::default(),
    };
    let mut series: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    for (i, inst) in insts.iter().enumerate() {
        let mut s = sample(&sh, inst).await;
        s.t = 0;
        series[i].push(s);
    }
    let end = o.seconds;
    let mut next_sample = sched.sample_every;
    let mut next_hup = sched.hup_every * 0.5;
    let mut hups = 0usize;
    let mut next_usr1 = sched.usr1_every * 0.7;
    let mut usr1s = 0usize;
    let mut next_redis = sched.redis_every * 0.6;
    let mut warm: Option<Vec<Quiet>> = None;
    let mut pause_total = 0.0;
    // Faults stop a little before the end so that the final reading is not in one.
    let faults_until = end - (sched.hup_every / 2.0).min(60.0);
    loop {
        let now = rel(&sh) - pause_total;
        if now >= end {
            break;
        }
        if warm.is_none() && now >= sched.warmup {
            let p0 = rel(&sh);
            let q = quiesce(&sh, &phase, n_loops, insts, &steady_on, env.problems).await;
            eprintln!(
                "[chaos] t={now:.0}s: warm-up reading: A {} KiB {} fds, B {} KiB {} fds",
                q[0].rss_kb, q[0].fds, q[1].rss_kb, q[1].fds
            );
            warm = Some(q);
            let _ = phase.send(Phase::Run);
            pause_total += rel(&sh) - p0;
            continue;
        }
        if now >= next_sample {
            next_sample += sched.sample_every;
            let mut line = format!("[chaos] t={now:.0}s:");
            for (i, inst) in insts.iter().enumerate() {
                let mut s = sample(&sh, inst).await;
                s.t = now.round() as u64;
                let _ = write!(
                    line,
                    " {} {} KiB {} fds {:.1} s CPU {} deliveries;",
                    inst.name, s.rss_kb, s.fds, s.cpu_s, s.deliveries
                );
                series[i].push(s);
            }
            let posted = sh.posted.lock().unwrap().len();
            let errors =
                sh.steady_errors.load(Relaxed) + sh.churn_errors.load(Relaxed) + sh.post_failures.load(Relaxed);
            eprintln!(
                "{line} {posted} events, {} churn connections, {errors} errors",
                sh.churn.load(Relaxed)
            );
            continue;
        }
        if now < faults_until {
            if now >= next_hup {
                next_hup += sched.hup_every;
                env.reload(hups % 3).await;
                hups += 1;
                continue;
            }
            if now >= next_usr1 {
                next_usr1 += sched.usr1_every;
                env.reopen_log(usr1s % 2).await;
                usr1s += 1;
                continue;
            }
            if now >= next_redis {
                next_redis += sched.redis_every;
                env.restart_redis().await;
                continue;
            }
        }
        let wake = [next_sample, next_hup, next_usr1, next_redis, end]
            .into_iter()
            .fold(f64::INFINITY, f64::min);
        let wait = (wake - now).clamp(0.01, 1.0);
        sleep(Duration::from_secs_f64(wait)).await;
    }
    // The final reading, in the same quiet state as the warm-up one.
    for (i, inst) in insts.iter().enumerate() {
        let mut s = sample(&sh, inst).await;
        s.t = (rel(&sh) - pause_total).round() as u64;
        series[i].push(s);
    }
    sh.stop_posting.store(true, Relaxed);
    let stop_deadline = TInstant::now() + QUIESCE_DEADLINE;
    if !wait_for(stop_deadline, || poster.is_finished()).await {
        env.problems.push("the poster did not stop in time".into());
    }
    let end_quiet = quiesce(&sh, &phase, n_loops, insts, &steady_on, env.problems).await;
    let _ = phase.send(Phase::Stop);
    for l in loops {
        if timeout_at(TInstant::now() + QUIESCE_DEADLINE, l).await.is_err() {
            env.problems.push("a loop did not stop in time".into());
        }
    }
    // Deliveries settle: everything expected, or nothing new for 5 s.
    let posted: Vec<Posted> = sh.posted.lock().unwrap().clone();
    let mut last = (sh.received.load(Relaxed), TInstant::now());
    let deadline = TInstant::now() + DELIVERY_DEADLINE;
    while TInstant::now() < deadline {
        sleep(Duration::from_millis(200)).await;
        let r = sh.received.load(Relaxed);
        if r != last.0 {
            last = (r, TInstant::now());
        } else if last.1.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    let _ = steady_stop.send(true);
    let mut got = Vec::new();
    for h in steady {
        got.push(match timeout(Duration::from_secs(10), h).await {
            Ok(Ok(r)) => r,
            _ => {
                env.problems.push("a steady client did not finish in time".into());
                Received { per_sub: Vec::new() }
            }
        });
    }
    let faults = std::mem::take(&mut env.faults);
    let t = tally(&specs, &got, &posted, &faults.redis_windows, &sh);

    // Figures and verdict.
    let warm = warm.unwrap_or_default();
    let mut rss_drift = Vec::new();
    let mut fd_drift = Vec::new();
    for (i, inst) in insts.iter().enumerate() {
        let (Some(w), Some(e)) = (warm.get(i), end_quiet.get(i)) else {
            problems.push("no warm-up reading".into());
            continue;
        };
        let d = e.rss_kb as i64 - w.rss_kb as i64;
        let f = e.fds as i64 - w.fds as i64;
        if d.abs() > MAX_DRIFT_KB {
            problems.push(format!("instance {}: RSS drift {d} KiB", inst.name));
        }
        if f.abs() > MAX_FD_DRIFT {
            problems.push(format!("instance {}: descriptor drift {f}", inst.name));
        }
        rss_drift.push(d);
        fd_drift.push(f);
    }
    if t.lost > 0 {
        problems.push(format!("{} deliveries lost", t.lost));
    }
    if t.duplicates > 0 {
        problems.push(format!("{} duplicate deliveries", t.duplicates));
    }
    if t.out_of_order > 0 {
        problems.push(format!("{} deliveries out of order", t.out_of_order));
    }
    if t.misdelivered > 0 {
        problems.push(format!(
            "{} events reached subscriptions outside their audience",
            t.misdelivered
        ));
    }
    for (what, n) in [
        ("steady client errors", sh.steady_errors.load(Relaxed)),
        ("churn errors", sh.churn_errors.load(Relaxed)),
        ("slow/dead client errors", sh.side_errors.load(Relaxed)),
        ("failed event posts", sh.post_failures.load(Relaxed)),
    ] {
        if n > 0 {
            problems.push(format!("{n} {what}"));
        }
    }
    let logs = scan_logs(insts);
    if !logs.errors_unexplained.is_empty() {
        problems.push(format!("{} unexplained error lines", logs.errors_unexplained.len()));
    }

    // CPU per delivery over the first and the last window (samples nearest to them).
    let n = series[0].len().min(series[1].len());
    let per_window = ((sched.cpu_window / sched.sample_every).round() as usize).max(1);
    let (cpu_start, cpu_end) = if n > per_window {
        (
            cpu_per_delivery(&series, 0, per_window),
            cpu_per_delivery(&series, n - 1 - per_window, n - 1),
        )
    } else {
        (None, None)
    };
    let per_sample: Vec<f64> = (1..n).filter_map(|i| cpu_per_delivery(&series, i - 1, i)).collect();
    let closes: Vec<String> = {
        let mut v = Vec::new();
        for inst in insts {
            let m = scrape(inst.metrics).await.unwrap_or_default();
            v.push(format!(
                "{}: slow_consumer_bytes {} slow_consumer_time {} pong_timeout {}",
                inst.name,
                metric_one(&m, "notification_closes_total{reason=\"slow_consumer_bytes\"}"),
                metric_one(&m, "notification_closes_total{reason=\"slow_consumer_time\"}"),
                metric_one(&m, "notification_closes_total{reason=\"pong_timeout\"}"),
            ));
        }
        v
    };

    let mut out = Fields::default();
    out.put("seconds", o.seconds);
    out.put("steady", o.steady);
    out.put("libraries", o.libraries + 1);
    out.put("users", o.users);
    out.put("groups", o.groups);
    out.put("churners", o.churners);
    out.put("rate", o.rate);
    out.put("burst", o.burst);
    out.put("slow", o.slow);
    out.put("dead", o.dead);
    out.put("events_posted", posted.iter().filter(|p| p.ok).count());
    out.put("event_post_failures", sh.post_failures.load(Relaxed));
    out.put(
        "deliveries",
        json!({
            "expected": t.expected, "received": t.received, "lost": t.lost,
            "duplicates": t.duplicates, "out_of_order": t.out_of_order, "outside_audience": t.misdelivered,
            "cross_instance_in_redis_outage": {"expected": t.outage_expected, "lost": t.outage_lost, "duplicates": t.outage_duplicates},
            "first_lost": t.first_lost,
        }),
    );
    out.put("steady_errors", sh.steady_errors.load(Relaxed));
    out.put(
        "churn",
        json!({
            "connections": sh.churn.load(Relaxed),
            "by_method": METHOD_NAMES.iter().enumerate().map(|(i, m)| (m.to_string(), json!(sh.churn_by_method[i].load(Relaxed)))).collect::<serde_json::Map<_, _>>(),
            "bad_token": sh.churn_bad_token.load(Relaxed),
            "events_received": sh.churn_events.load(Relaxed),
            "errors": sh.churn_errors.load(Relaxed),
        }),
    );
    out.put("slow_client_cycles", sh.slow_cycles.load(Relaxed));
    out.put("slow_clients_closed_by_server", sh.slow_closed.load(Relaxed));
    out.put("dead_client_cycles", sh.dead_cycles.load(Relaxed));
    out.put("server_closes", &closes);
    out.put("faults", &faults);
    out.put("first_errors", sh.first_errors.lock().unwrap().clone());
    out.put("samples_a", &series[0]);
    out.put("samples_b", &series[1]);
    out.put("quiet_warm", &warm);
    out.put("quiet_end", &end_quiet);
    out.put("rss_drift_kb", &rss_drift);
    out.put("fd_drift", &fd_drift);
    out.put("cpu_us_per_delivery_start", cpu_start);
    out.put("cpu_us_per_delivery_end", cpu_end);
    out.put("cpu_us_per_delivery_median_sample", median(per_sample));
    out.put("log_errors", logs.errors);
    out.put("log_errors_by_cause", &logs.errors_by_cause);
    out.put("log_errors_unexplained", &logs.errors_unexplained);
    out.put("log_warnings", logs.warnings);
    out.put("log_warnings_by_cause", &logs.warnings_by_cause);
    out.put("log_warnings_other_first", &logs.warnings_unexplained);

    eprintln!("[chaos] ---- summary ----");
    eprintln!(
        "[chaos] deliveries to steady clients: expected {} received {} lost {} duplicates {} out of order {}",
        t.expected, t.received, t.lost, t.duplicates, t.out_of_order
    );
    eprintln!(
        "[chaos] cross-instance during Redis outages (excused): expected {} lost {} duplicates {}",
        t.outage_expected, t.outage_lost, t.outage_duplicates
    );
    eprintln!(
        "[chaos] faults: {} reloads, {} key rotations, {} refused reloads, {} log reopens, {} Redis restarts (recovery {:?} s)",
        faults.reloads,
        faults.key_rotations,
        faults.refused_reloads,
        faults.log_reopens,
        faults.redis_restarts,
        faults
            .redis_recovery_s
            .iter()
            .map(|s| (s * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
    eprintln!(
        "[chaos] churn {} connections, {} errors; {closes:?}",
        sh.churn.load(Relaxed),
        sh.churn_errors.load(Relaxed)
    );
    for (i, inst) in insts.iter().enumerate() {
        if let (Some(w), Some(e)) = (warm.get(i), end_quiet.get(i)) {
            eprintln!(
                "[chaos] {}: quiet RSS {} -> {} KiB ({:+}), descriptors {} -> {} ({:+})",
                inst.name,
                w.rss_kb,
                e.rss_kb,
                e.rss_kb as i64 - w.rss_kb as i64,
                w.fds,
                e.fds,
                e.fds as i64 - w.fds as i64
            );
        }
    }
    eprintln!("[chaos] CPU per delivery: start {cpu_start:?} us, end {cpu_end:?} us");
    eprintln!(
        "[chaos] log: {} error lines ({} unexplained) {:?}, {} warnings {:?}",
        logs.errors,
        logs.errors_unexplained.len(),
        logs.errors_by_cause,
        logs.warnings,
        logs.warnings_by_cause
    );
    (out, problems)
}
