//! examples/monitoring proven on a real Prometheus (Debian's `prometheus` package, which
//! ships `promtool`; `.ci/deps` installs it). The test starts Redis, the server with a
//! Redis bus and its metrics listener, and Prometheus on free loopback ports, the last
//! with the example scrape config and alert rules (pointed at the test server, scraping
//! every second), and posts events while Prometheus scrapes. Then:
//! - every expression of the Grafana dashboard, evaluated by Prometheus, returns data;
//! - every metric an alert rule or the dashboard names is in a scrape (a typo fails);
//! - `promtool check metrics` finds nothing to say about a scrape, and the example config,
//!   rules and rule unit tests pass `promtool`;
//! - no alert fires on the healthy server, and the server-down alert fires once the
//!   server is stopped (the test's copy of the rules has that alert's `for:` at 0s).

mod common;
#[path = "common/redis.rs"]
mod redis_server;

use common::*;
use redis_server::Redis;
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long Prometheus may take to start, scrape, evaluate or fire (it scrapes and
/// evaluates every second; the slack is for a loaded machine).
const PROM_DEADLINE: Duration = Duration::from_secs(60);

/// The job name of examples/monitoring/prometheus.yml, which the alert rules select.
const JOB: &str = "notification-server";

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/monitoring")
}

fn read_example(name: &str) -> String {
    std::fs::read_to_string(examples().join(name)).unwrap_or_else(|e| panic!("examples/monitoring/{name}: {e}"))
}

/// `text` with `from` replaced by `to`; panics if `from` is not there (the example
/// changed and this test must follow).
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} not found in\n{text}");
    text.replacen(from, to, 1)
}

/// Fails the test with a clear message if a tool is missing.
fn require(tool: &str) {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "{tool} not found: install Debian's prometheus package (run .ci/deps)"
    );
}

/// One HTTP/1.0 GET (the answer ends with the connection): (status, body).
fn http_get(addr: &str, target: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(DEADLINE)).ok()?;
    write!(s, "GET {target} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server on a free loopback port with its own config and storage, stopped
/// on drop.
struct Prometheus {
    addr: String,
    child: Child,
    dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus with `config` (and `rules`, as alerts.yml next to it) and waits
    /// until it is ready.
    fn start(config: &str, rules: &str) -> Prometheus {
        let dir = TempDir::new();
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        std::fs::write(dir.path().join("alerts.yml"), rules).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus not found: install Debian's prometheus package (run .ci/deps)");
        let mut p = Prometheus { addr, child, dir };
        let deadline = Instant::now() + PROM_DEADLINE;
        while http_get(&p.addr, "/-/ready").map(|(status, _)| status) != Some(200) {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", p.log());
            }
            assert!(Instant::now() < deadline, "prometheus not ready:\n{}", p.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GETs an API path; returns `data` of a successful answer.
    fn api(&self, target: &str) -> Value {
        let (status, body) = http_get(&self.addr, target).unwrap_or_else(|| panic!("no answer to {target}"));
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{target}: {e}: {body}"));
        assert_eq!(
            (status, &v["status"]),
            (200, &Value::from("success")),
            "{target}: {body}"
        );
        v["data"].clone()
    }

    /// The instant vector of `expr` now.
    fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api(&format!("/api/v1/query?query={}", percent_encode(expr)));
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// The alerts now, as (name, state, instance).
    fn alerts(&self) -> Vec<(String, String, String)> {
        let data = self.api("/api/v1/alerts");
        data["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|a| {
                let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
                (
                    s(&a["labels"]["alertname"]),
                    s(&a["state"]),
                    s(&a["labels"]["instance"]),
                )
            })
            .collect()
    }

    /// Waits until `done` holds, or fails with `what` and the last value it saw.
    fn wait<T: std::fmt::Debug>(&self, what: &str, mut probe: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
        let deadline = Instant::now() + PROM_DEADLINE;
        loop {
            let got = probe();
            if done(&got) {
                return got;
            }
            assert!(Instant::now() < deadline, "{what}; last seen: {got:#?}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Events flowing while Prometheus scrapes: a thread posts an event every 10 ms to two
/// libraries with two subscribers each, and the subscribers read them.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Drop for Traffic {
    /// A failed test stops the load too (the thread ends at its next event).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Traffic {
    fn start(server: &Server) -> Traffic {
        let mut subscribers: Vec<Ws> = (0..4).map(|_| server.ws()).collect();
        for (i, ws) in subscribers.iter_mut().enumerate() {
            ws.subscribe(&format!("lib{}", i % 2), "u");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let addr = server.addr;
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut sent = 0u64;
            while !flag.load(Ordering::Relaxed) {
                let lib = format!("lib{}", sent % 2);
                let body = repo_update(&lib, &format!("c{sent}")).to_string();
                let r = post_event(addr, &body, Some(&format!("Token {}", event_token())));
                assert_eq!(r.status, 200, "event refused: {r:?}");
                for ws in subscribers.iter_mut().skip((sent % 2) as usize).step_by(2) {
                    let m = ws.recv().expect("subscriber got no event");
                    assert_eq!(m["content"]["repo_id"], lib.as_str(), "{m}");
                }
                sent += 1;
                // Pacing of the load, not a wait for an event.
                std::thread::sleep(Duration::from_millis(10));
            }
            sent
        });
        Traffic {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops posting; returns how many events went out.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("traffic thread failed")
    }
}

/// Metric names (`notification_*`, `process_*`) in `text`, comment lines skipped.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let mut rest = line;
        while let Some(at) = ["notification_", "process_"].iter().filter_map(|p| rest.find(p)).min() {
            let before = rest[..at].chars().next_back();
            let tail = &rest[at..];
            let len = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                names.insert(tail[..len].to_string());
            }
            rest = &tail[len..];
        }
    }
    names
}

/// Whether a Prometheus text scrape has a sample of `name`.
fn scrape_has(scrape: &str, name: &str) -> bool {
    scrape.lines().filter(|l| !l.starts_with('#')).any(|l| {
        l.strip_prefix(name)
            .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
    })
}

/// Every `expr` of the dashboard's panels (rows included), in order.
fn dashboard_exprs(dash: &Value) -> Vec<String> {
    fn walk(panels: &Value, out: &mut Vec<String>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push(t["expr"].as_str().expect("a target without expr").to_string());
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// What Grafana needs to import the dashboard on any Prometheus: a data-source variable
/// `DS_PROMETHEUS` that every panel and query uses (no data source of the author's
/// Grafana), unique panel ids, panels inside the 24-column grid.
fn check_importable(dash: &Value) {
    let vars = dash["templating"]["list"].as_array().expect("no templating list");
    assert!(
        vars.iter()
            .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource" && v["query"] == "prometheus"),
        "no Prometheus data-source variable DS_PROMETHEUS: {vars:#?}"
    );
    let ds = serde_json::json!({"type": "prometheus", "uid": "${DS_PROMETHEUS}"});
    let mut ids = BTreeSet::new();
    let mut stack: Vec<&Value> = dash["panels"].as_array().expect("no panels").iter().collect();
    while let Some(p) = stack.pop() {
        let title = &p["title"];
        assert!(
            ids.insert(p["id"].as_u64().expect("a panel without id")),
            "duplicate id: {title}"
        );
        let grid = &p["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(x + w <= 24 && grid["h"].as_u64().unwrap() > 0, "{title}: {grid}");
        if p["type"] != "row" {
            assert_eq!(p["datasource"], ds, "{title}");
            for t in p["targets"].as_array().expect("a panel without targets") {
                assert_eq!(t["datasource"], ds, "{title}");
            }
        }
        stack.extend(p["panels"].as_array().into_iter().flatten());
    }
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert_eq!(v["datasource"], ds, "variable {}", v["name"]);
    }
}

/// Whether a query result holds at least one number (NaN, from a quantile over no
/// observations, is no data).
fn has_data(result: &[Value]) -> bool {
    result.iter().any(|s| {
        s["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| !v.is_nan())
    })
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(examples())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool not found: install Debian's prometheus package (run .ci/deps)");
    let input = stdin.unwrap_or_default().to_string();
    let mut pipe = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || pipe.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn dashboard_and_alerts_work_on_a_real_prometheus() {
    require("prometheus");
    require("promtool");
    let redis = Redis::start();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut server = Server::start(&format!(
        "metrics_listen = {metrics_addr}\nredis_url = redis://127.0.0.1:{}/",
        redis.port
    ));
    assert!(
        server
            .logs
            .wait_for("bus: subscribed to Redis channel", DEADLINE)
            .is_some()
    );

    // Something in every family: a close, a refused event token, and events flowing.
    drop(server.ws());
    let refused = post_event(server.addr, "{}", Some("Token not-a-token"));
    assert_eq!(refused.status, 400, "{refused:?}");
    let traffic = Traffic::start(&server);

    // The example config and rules, pointed at this server, scraping every second; the
    // server-down alert fires at once instead of after a minute.
    let config = read_example("prometheus.yml");
    let config = replace_once(&config, "scrape_interval: 15s", "scrape_interval: 1s");
    let config = replace_once(&config, "evaluation_interval: 15s", "evaluation_interval: 1s");
    let config = replace_once(&config, "\"127.0.0.1:9383\"", &format!("\"{metrics_addr}\""));
    let rules = read_example("alerts.yml");
    let down = rules
        .find("alert: NotificationServerDown")
        .expect("no NotificationServerDown rule");
    let (head, tail) = rules.split_at(down);
    let rules = format!("{head}{}", replace_once(tail, "for: 1m", "for: 0s"));
    let prom = Prometheus::start(&config, &rules);

    let up = format!("up{{job=\"{JOB}\",instance=\"{metrics_addr}\"}}");
    prom.wait(
        "the server is not scraped",
        || prom.query(&up),
        |r| r.len() == 1 && r[0]["value"][1] == "1",
    );

    // Every dashboard expression returns data, with Grafana's variables set to this
    // server and a rate window of a few scrapes.
    let dash: Value = serde_json::from_str(&read_example("dashboard.json")).expect("dashboard.json is not JSON");
    check_importable(&dash);
    let exprs = dashboard_exprs(&dash);
    assert!(exprs.len() >= 20, "only {} expressions in the dashboard", exprs.len());
    let concrete = |e: &str| {
        e.replace("$__rate_interval", "5s")
            .replace("$job", JOB)
            .replace("$instance", &metrics_addr)
    };
    prom.wait(
        "dashboard expressions without data",
        || {
            exprs
                .iter()
                .filter(|e| !has_data(&prom.query(&concrete(e))))
                .cloned()
                .collect::<Vec<_>>()
        },
        |missing| missing.is_empty(),
    );
    // Its variables list this server: label_values(metric, label) as a query.
    for var in dash["templating"]["list"].as_array().unwrap() {
        let Some(q) = var["query"]["query"].as_str() else {
            continue;
        };
        let args = q.strip_prefix("label_values(").and_then(|a| a.strip_suffix(')'));
        let (metric, label) = args
            .and_then(|a| a.rsplit_once(", "))
            .expect("label_values(metric, label)");
        let values = prom.query(&format!("count by ({label}) ({})", concrete(metric)));
        let listed: Vec<_> = values.iter().map(|v| v["metric"][label].clone()).collect();
        let expect = if label == "job" { JOB } else { metrics_addr.as_str() };
        assert!(listed.contains(&Value::from(expect)), "{q}: {listed:?}");
    }

    // Every metric a rule or a panel names is exported (with the bus configured).
    let scrape = request(
        metrics_addr.parse().unwrap(),
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .text();
    let mut named = metric_names(&read_example("alerts.yml"));
    assert!(named.len() >= 10, "metric names in alerts.yml: {named:?}");
    named.extend(exprs.iter().flat_map(|e| metric_names(e)));
    let missing: Vec<_> = named.iter().filter(|n| !scrape_has(&scrape, n)).collect();
    assert!(missing.is_empty(), "named but not exported: {missing:?}\n{scrape}");

    // promtool: nothing to say about the scrape; the examples check and their tests pass.
    let (ok, said) = promtool(&["check", "metrics"], Some(&scrape));
    assert!(ok && said.trim().is_empty(), "promtool check metrics:\n{said}");
    let (ok, said) = promtool(&["check", "config", "prometheus.yml"], None);
    assert!(ok, "promtool check config:\n{said}");
    let (ok, said) = promtool(&["test", "rules", "alerts.test.yml"], None);
    assert!(ok, "promtool test rules:\n{said}");

    // Every rule evaluates without error on the live series (health is "unknown" until
    // its first evaluation), and a healthy server fires nothing, nor has anything pending.
    prom.wait(
        "rules not evaluated, or evaluated with errors",
        || {
            let data = prom.api("/api/v1/rules");
            let rules: Vec<(String, String)> = data["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .map(|r| (r["name"].to_string(), format!("{} {}", r["health"], r["lastError"])))
                .collect();
            rules
        },
        |rules| rules.len() >= 10 && rules.iter().all(|(_, health)| health.starts_with("\"ok\"")),
    );
    let alerts = prom.alerts();
    assert!(alerts.is_empty(), "alerts on a healthy server: {alerts:?}");

    let sent = traffic.stop();
    assert!(sent > 0);

    // Stopped, the server is reported down.
    let _ = server.child.kill();
    let _ = server.child.wait();
    prom.wait(
        "NotificationServerDown did not fire",
        || prom.alerts(),
        |alerts| {
            alerts.iter().any(|(name, state, instance)| {
                name == "NotificationServerDown" && state == "firing" && *instance == metrics_addr
            })
        },
    );
}

#[test]
fn metric_names_are_found_in_expressions() {
    let names = metric_names(
        "expr: sum without (state) (notification_connections) / notification_max_connections > 0.9\n\
         # notification_commented_out\n\
         summary: notification-server at process_open_fds, not xnotification_y",
    );
    let names: Vec<_> = names.into_iter().collect();
    assert_eq!(
        names,
        [
            "notification_connections",
            "notification_max_connections",
            "process_open_fds"
        ]
    );
    let scrape = "# HELP notification_repos x\nnotification_repos 1\nnotification_repos_total{a=\"b\"} 2\n";
    assert!(scrape_has(scrape, "notification_repos"));
    assert!(scrape_has(scrape, "notification_repos_total"));
    assert!(!scrape_has(scrape, "notification_repo"));
}

/// The process metrics describe the server process itself: its descriptors (a new
/// connection shows), its limit and the cap derived from it, its start time, its memory
/// and CPU.
#[test]
fn process_metrics_describe_the_server() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let before = unix_now();
    let server = Server::start_with_nofile(&format!("metrics_listen = {metrics_addr}"), 500, 600);
    let after = unix_now();
    let scrape = || {
        request(
            metrics_addr.parse().unwrap(),
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .text()
    };
    let first = scrape();
    // The server raised its soft limit to the hard one at start, and derived its cap.
    assert_eq!(metric_value(&first, "process_max_fds"), 600.0);
    assert_eq!(metric_value(&first, "notification_max_connections"), 536.0);
    let started = metric_value(&first, "process_start_time_seconds");
    assert!(
        started >= (before - 1) as f64 && started <= (after + 1) as f64,
        "started {started}, launched between {before} and {after}"
    );
    let rss = metric_value(&first, "process_resident_memory_bytes");
    let kb = server.rss_kb() as f64;
    assert!(
        (rss / 1024.0 - kb).abs() < kb / 4.0,
        "resident {rss} bytes, /proc says {kb} KiB"
    );
    assert!(metric_value(&first, "process_virtual_memory_bytes") >= rss);
    assert!(metric_value(&first, "process_cpu_seconds_total") >= 0.0);
    // Ten more connections are ten more descriptors (the server holds them open).
    let fds = metric_value(&first, "process_open_fds");
    let open: Vec<Ws> = (0..10).map(|_| server.ws()).collect();
    let more = metric_value(&scrape(), "process_open_fds");
    assert_eq!(more - fds, 10.0, "{fds} -> {more} with {} websockets", open.len());
}

/// A sender outside `events_allow` is counted as a refused `/events` request, which the
/// events-refused alert and panel read.
#[test]
fn events_from_outside_events_allow_are_counted() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let server = Server::start(&format!("metrics_listen = {metrics_addr}\nevents_allow = 10.0.0.0/8"));
    let body = repo_update("lib", "c").to_string();
    for _ in 0..2 {
        let r = post_event(server.addr, &body, Some(&format!("Token {}", event_token())));
        assert_eq!(r.status, 403, "{r:?}");
    }
    let scrape = request(
        metrics_addr.parse().unwrap(),
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .text();
    assert_eq!(
        metric_value(&scrape, "notification_events_refused_total{outcome=\"forbidden\"}"),
        2.0
    );
    assert_eq!(
        metric_value(&scrape, "notification_events_received_total{type=\"repo-update\"}"),
        0.0
    );
}
