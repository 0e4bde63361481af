//! Bursts that reach the subscribers' instance by a way other than its own `/events`
//! (issue 18): events of another instance through Redis (`bus-burst`), and group-scoped
//! events released together by the group gate (`gate-burst`). Each is measured next to
//! the same burst taken the ordinary way, on fresh instances.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::time::{Instant as TInstant, sleep, timeout};
use tokio_tungstenite::tungstenite::Message;

use crate::cluster::{Instance, Redis, scrape};
use crate::common::{Fields, Http, rss_kb, sign, unix_now};
use crate::population::{connect_ws, subscribe_msg, user_name, write_group_db};
use crate::shapes::{Ground, PingLoop, ShapeOpts, Watch, check_output, check_peak, closes_by_reason, vm_hwm_kb};

/// The library every burst goes to.
const LIB: &str = "0b5e1d7c-burst-0000-0000-000000000001";
/// Distinct users among the subscribers (all members of group 1).
const USERS: usize = 50;
/// Keep-alive connections posting a burst.
const POSTERS: usize = 4;
/// Deliveries stop counting as in progress after this long without one.
const STALL: Duration = Duration::from_secs(10);

/// How one burst is made.
struct Burst<'a> {
    name: &'static str,
    /// Where the subscribers are, and the instance measured.
    subs_on: &'a Instance,
    /// Where the events are posted.
    post_to: SocketAddr,
    /// Group-scoped events (to group 1) instead of `repo-update`.
    group: bool,
    /// A group database to hold locked while the burst is posted.
    lock_db: Option<&'a Path>,
}

/// The subscribers of a burst: connected, subscribed, reading and counting.
struct Crowd {
    delivered: Arc<AtomicU64>,
    warm: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn crowd(o: &ShapeOpts, key: &str, addr: SocketAddr) -> Result<Crowd, String> {
    let c = Crowd {
        delivered: Arc::new(AtomicU64::new(0)),
        warm: Arc::new(AtomicUsize::new(0)),
        closed: Arc::new(AtomicUsize::new(0)),
        stop: Arc::new(AtomicBool::new(false)),
        tasks: Vec::new(),
    };
    let sem = Arc::new(Semaphore::new(64));
    let subscribed = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(None));
    let mut tasks = Vec::new();
    for i in 0..o.burst_clients {
        let token = sign(
            key,
            &json!({"repo_id": LIB, "username": user_name(i % USERS), "exp": unix_now() + 3600}),
        );
        let (sem, subscribed, failed) = (sem.clone(), subscribed.clone(), failed.clone());
        let (delivered, warm, closed, stop) = (c.delivered.clone(), c.warm.clone(), c.closed.clone(), c.stop.clone());
        tasks.push(tokio::spawn(async move {
            let ws = {
                let _permit = sem.acquire().await;
                async {
                    let mut ws = connect_ws(addr).await?;
                    ws.send(Message::text(subscribe_msg(&[(LIB, &token)])))
                        .await
                        .map_err(|e| format!("send: {e}"))?;
                    Ok::<_, String>(ws)
                }
                .await
            };
            let mut ws = match ws {
                Ok(ws) => ws,
                Err(e) => {
                    *failed.lock().unwrap() = Some(e);
                    return;
                }
            };
            subscribed.fetch_add(1, Relaxed);
            let mut warmed = false;
            while !stop.load(Relaxed) {
                match timeout(Duration::from_millis(200), ws.next()).await {
                    Err(_) => {}
                    Ok(Some(Ok(Message::Text(t)))) => {
                        if t.as_str().contains("\"burst_seq\"") {
                            delivered.fetch_add(1, Relaxed);
                        } else if !warmed && t.as_str().contains("\"burst_warm\"") {
                            warmed = true;
                            warm.fetch_add(1, Relaxed);
                        }
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(_) => {
                        closed.fetch_add(1, Relaxed);
                        return;
                    }
                }
            }
            let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
        }));
    }
    let until = TInstant::now() + Duration::from_secs(60);
    while subscribed.load(Relaxed) < o.burst_clients && failed.lock().unwrap().is_none() && TInstant::now() < until {
        sleep(Duration::from_millis(20)).await;
    }
    let c = Crowd { tasks, ..c };
    if let Some(e) = failed.lock().unwrap().take() {
        c.stop.store(true, Relaxed);
        return Err(format!("a subscriber could not connect: {e}"));
    }
    if subscribed.load(Relaxed) < o.burst_clients {
        c.stop.store(true, Relaxed);
        return Err("the subscribers did not all connect within 60 s".into());
    }
    Ok(c)
}

impl Crowd {
    async fn leave(self) {
        self.stop.store(true, Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

fn event(k: usize, group: bool) -> String {
    if group {
        json!({"type": "folder-perm-changed", "content": {"repo_id": LIB, "path": "/team", "type": "group",
            "change_event": "modify", "user": "", "group": 1, "perm": "r", "burst_seq": k}})
    } else {
        json!({"type": "repo-update", "content": {"repo_id": LIB, "commit_id": format!("{k:040x}"), "burst_seq": k}})
    }
    .to_string()
}

/// Posts `burst_warm` events every 500 ms until every subscriber saw one: the
/// subscriptions are in, and so is the instance's Redis subscription.
async fn warm_up(b: &Burst<'_>, c: &Crowd, o: &ShapeOpts, token: &str) -> Result<(), String> {
    let mut http = Http::new(b.post_to);
    let until = TInstant::now() + Duration::from_secs(20);
    let body =
        json!({"type": "repo-update", "content": {"repo_id": LIB, "commit_id": "0".repeat(40), "burst_warm": true}})
            .to_string();
    while c.warm.load(Relaxed) < o.burst_clients {
        if TInstant::now() >= until {
            return Err(format!(
                "{}: {} of {} subscribers confirmed in 20 s",
                b.name,
                c.warm.load(Relaxed),
                o.burst_clients
            ));
        }
        http.request("POST", "/events", Some(token), body.as_bytes()).await?;
        let next = TInstant::now() + Duration::from_millis(500);
        while TInstant::now() < next && c.warm.load(Relaxed) < o.burst_clients {
            sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(())
}

/// Holds an exclusive lock on the group database (so a lookup waits on its busy
/// timeout) until `hold` passed; `locked` is set once the lock is taken.
fn lock_database(db: &Path, hold: Duration, locked: Arc<AtomicBool>) -> std::thread::JoinHandle<Result<(), String>> {
    let db = db.to_path_buf();
    std::thread::spawn(move || {
        let c = rusqlite::Connection::open(&db).map_err(|e| format!("sqlite: {e}"))?;
        c.execute_batch("BEGIN EXCLUSIVE").map_err(|e| format!("lock: {e}"))?;
        locked.store(true, Relaxed);
        std::thread::sleep(hold);
        c.execute_batch("COMMIT").map_err(|e| format!("unlock: {e}"))
    })
}

/// One burst: subscribers on `subs_on`, `--burst-events` posted back to back to
/// `post_to`, the subscribers' instance watched until every delivery arrived.
async fn burst(b: Burst<'_>, o: &ShapeOpts, key: &str, problems: &mut Vec<String>) -> Result<Value, String> {
    let token = sign(key, &json!({"exp": unix_now() + 600}));
    let c = crowd(o, key, b.subs_on.addr).await?;
    let warmed = warm_up(&b, &c, o, &token).await;
    if let Err(e) = warmed {
        c.leave().await;
        return Err(e);
    }
    let pid = b.subs_on.pid();
    sleep(Duration::from_millis(300)).await;
    let base = rss_kb(pid).unwrap_or(0);
    let watch = Watch::start(pid, Some(b.subs_on.metrics));
    let ping = PingLoop::start(b.subs_on.addr);
    let lock = b.lock_db.map(|db| {
        let locked = Arc::new(AtomicBool::new(false));
        (
            lock_database(db, Duration::from_secs_f64(o.gate_hold_s), locked.clone()),
            locked,
        )
    });
    if let Some((_, locked)) = &lock {
        let until = TInstant::now() + Duration::from_secs(5);
        while !locked.load(Relaxed) && TInstant::now() < until {
            sleep(Duration::from_millis(5)).await;
        }
    }
    let t0 = TInstant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let posted = Arc::new(AtomicUsize::new(0));
    let post_errors = Arc::new(AtomicUsize::new(0));
    let posters: Vec<_> = (0..POSTERS)
        .map(|_| {
            let (next, posted, errors, token) = (next.clone(), posted.clone(), post_errors.clone(), token.clone());
            let (addr, events, group) = (b.post_to, o.burst_events, b.group);
            tokio::spawn(async move {
                let mut http = Http::new(addr);
                let until = TInstant::now() + Duration::from_secs(120);
                loop {
                    let k = next.fetch_add(1, Relaxed);
                    if k >= events || TInstant::now() >= until {
                        break;
                    }
                    match http
                        .request("POST", "/events", Some(&token), event(k, group).as_bytes())
                        .await
                    {
                        Ok(r) if r.status == 200 => posted.fetch_add(1, Relaxed),
                        _ => errors.fetch_add(1, Relaxed),
                    };
                }
            })
        })
        .collect();
    for p in posters {
        let _ = p.await;
    }
    let post_s = t0.elapsed().as_secs_f64();
    let expected = (posted.load(Relaxed) * o.burst_clients) as u64;
    let (mut last, mut since) = (0, TInstant::now());
    let until = TInstant::now() + Duration::from_secs(120);
    while c.delivered.load(Relaxed) < expected && since.elapsed() < STALL && TInstant::now() < until {
        sleep(Duration::from_millis(10)).await;
        let now = c.delivered.load(Relaxed);
        if now != last {
            (last, since) = (now, TInstant::now());
        }
    }
    let complete_s = t0.elapsed().as_secs_f64();
    let pings = ping.finish().await;
    let peaks = watch.finish().await;
    let hwm = vm_hwm_kb(pid).unwrap_or(0);
    let closes = closes_by_reason(&scrape(b.subs_on.metrics).await.unwrap_or_default());
    let lock_result = lock.map(|(h, _)| h.join().unwrap_or_else(|_| Err("lock thread panicked".into())));
    let delivered = c.delivered.load(Relaxed);
    let closed = c.closed.load(Relaxed);
    c.leave().await;
    let what = format!("{} ({})", b.name, b.subs_on.name);
    if let Some(Err(e)) = lock_result {
        problems.push(format!("{what}: {e}"));
    }
    let rss_bound = check_peak(&what, hwm, base, o.budget_bytes(), o, problems);
    let output_bound = check_output(&what, &peaks, o, problems);
    pings.check(&what, o, problems);
    if delivered < expected || closed > 0 || post_errors.load(Relaxed) > 0 {
        problems.push(format!(
            "{what}: {delivered} of {expected} deliveries, {closed} subscribers closed, {} POSTs failed",
            post_errors.load(Relaxed)
        ));
    }
    let r2 = |x: f64| (x * 100.0).round() / 100.0;
    Ok(json!({
        "events_posted": posted.load(Relaxed), "post_errors": post_errors.load(Relaxed),
        "post_s": r2(post_s), "complete_s": r2(complete_s),
        "expected": expected, "delivered": delivered, "subscribers_closed": closed,
        "rss_connected_kb": base, "rss_peak_kb": hwm, "rss_peak_sampled_kb": peaks.rss_kb, "rss_bound_kb": rss_bound,
        "pending_deliveries_peak": peaks.pending_deliveries as u64,
        "output_bytes_peak": peaks.output_bytes as u64, "output_bytes_bound": output_bound,
        "metrics_scrapes": peaks.scrapes, "server_closes": closes,
        "ping": pings.json(),
    }))
}

/// Subscribers on B; the burst posted to A and carried to B by Redis, then the same
/// burst posted straight to a fresh B.
pub(crate) async fn bus_burst(
    o: &ShapeOpts,
    g: &Ground,
    out: &mut Fields,
    problems: &mut Vec<String>,
) -> Result<(), String> {
    let redis_dir = g.path("bus-redis");
    std::fs::create_dir_all(&redis_dir).map_err(|e| format!("mkdir: {e}"))?;
    let mut redis = Redis::start(&redis_dir)?;
    let extra = format!("redis_url = {}\n", redis.url());
    let via_bus = {
        let mut a = g.start("bus-A", o.budget_bytes(), &extra)?;
        let mut b = g.start("bus-B", o.budget_bytes(), &extra)?;
        let r = burst(
            Burst {
                name: "bus-burst via Redis",
                subs_on: &b,
                post_to: a.addr,
                group: false,
                lock_db: None,
            },
            o,
            &g.key,
            problems,
        )
        .await;
        a.stop();
        b.stop();
        r?
    };
    let direct = {
        let mut b = g.start("bus-B-direct", o.budget_bytes(), &extra)?;
        let r = burst(
            Burst {
                name: "bus-burst posted to B",
                subs_on: &b,
                post_to: b.addr,
                group: false,
                lock_db: None,
            },
            o,
            &g.key,
            problems,
        )
        .await;
        b.stop();
        r?
    };
    redis.kill();
    out.put("subscribers", o.burst_clients);
    out.put("events", o.burst_events);
    out.put("output_budget_bytes", o.budget_bytes());
    out.put("via_redis", via_bus);
    out.put("posted_to_b", direct);
    Ok(())
}

/// Group-scoped events to a library whose subscribers are all in the group: the group
/// database is held locked while the burst is posted, so every event waits at the gate
/// and is released at once; then the same burst as `repo-update`, which no gate holds.
pub(crate) async fn gate_burst(
    o: &ShapeOpts,
    g: &Ground,
    out: &mut Fields,
    problems: &mut Vec<String>,
) -> Result<(), String> {
    let db = g.path("gate-groupmgr.db");
    let _ = std::fs::remove_file(&db);
    write_group_db(&db, USERS, 1)?;
    let extra = format!("groupmgr_db = {}\ngroup_lookup_timeout = 5\n", db.display());
    let gated = {
        let mut i = g.start("gate", o.budget_bytes(), &extra)?;
        let r = burst(
            Burst {
                name: "gate-burst group-scoped",
                subs_on: &i,
                post_to: i.addr,
                group: true,
                lock_db: Some(&db),
            },
            o,
            &g.key,
            problems,
        )
        .await;
        i.stop();
        r?
    };
    let ungated = {
        let mut i = g.start("gate-plain", o.budget_bytes(), &extra)?;
        let r = burst(
            Burst {
                name: "gate-burst repo-update",
                subs_on: &i,
                post_to: i.addr,
                group: false,
                lock_db: None,
            },
            o,
            &g.key,
            problems,
        )
        .await;
        i.stop();
        r?
    };
    out.put("subscribers", o.burst_clients);
    out.put("events", o.burst_events);
    out.put("gate_hold_s", o.gate_hold_s);
    out.put("output_budget_bytes", o.budget_bytes());
    out.put("group_scoped_through_the_gate", gated);
    out.put("repo_update_no_gate", ungated);
    Ok(())
}
