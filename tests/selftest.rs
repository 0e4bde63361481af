//! `--self-test` against the real server behind real proxies (nginx, Apache, Caddy,
//! HAProxy; see tests/common/proxy.rs): every example passes, and each broken setup an
//! admin meets fails the check it should, with the fix it should name.

mod common;
#[path = "common/proxy.rs"]
mod proxy;
#[path = "common/redis.rs"]
mod redis_server;

use common::*;
use proxy::{Kind, Proxy, Setup};
use redis_server::Redis;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A key that passes the key check (44 bytes, not published).
const STRONG_KEY: &str = "c2VsZi10ZXN0IGtleSwgbm90IGEgcmVhbCBzZWNyZXQ=";

/// The manual's published example key (Seafile 10/11 `[notification]` example).
const MANUAL_KEY: &str = "M@O8VWUb81YvmtWLHGB2I_V7di5-@0p(MF*GrE!sIws23F";

/// A server on a fixed free port (the self-test reads the port from the same config
/// file, so it cannot be 0) with `key` and `extra` settings.
fn server(key: &str, extra: &str) -> Server {
    Server::start(&format!("port = {}\njwt_private_key = {key}\n{extra}", free_port()))
}

/// One check's line and fix.
#[derive(Debug)]
struct Line {
    status: String,
    seen: String,
    fix: Option<String>,
}

/// What a self-test run printed and how it exited.
struct Run {
    code: i32,
    stdout: String,
    checks: HashMap<String, Line>,
}

impl Run {
    fn check(&self, name: &str) -> &Line {
        self.checks
            .get(name)
            .unwrap_or_else(|| panic!("no check {name} in:\n{}", self.stdout))
    }

    /// Asserts `name` has `status`, and returns its line for more assertions.
    fn expect(&self, name: &str, status: &str) -> &Line {
        let line = self.check(name);
        assert_eq!(line.status, status, "{name} in:\n{}", self.stdout);
        line
    }
}

/// Runs `--self-test` with `-c dir` and `args`, in a clean environment, for at most a minute.
fn self_test(dir: &Path, args: &[&str]) -> Run {
    self_test_env(dir, args, &[])
}

/// [`self_test`] with these environment variables set.
fn self_test_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = binary();
    cmd.arg("-c").arg(dir).arg("--self-test").args(args);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for var in [
        "JWT_PRIVATE_KEY",
        "SEAFILE_SERVER_HOSTNAME",
        "SEAFILE_SERVER_PROTOCOL",
        "SSL_CERT_FILE",
        "SEAFILE_MYSQL_DB_HOST",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("--self-test did not finish within a minute");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut checks: HashMap<String, Line> = HashMap::new();
    let mut last: Option<String> = None;
    for l in stdout.lines() {
        if let Some(fix) = l.strip_prefix("  fix: ") {
            let name = last.as_ref().expect("a fix line before any check");
            if let Some(c) = checks.get_mut(name) {
                c.fix = Some(fix.to_string());
            }
            continue;
        }
        let Some((status, rest)) = l.split_once(' ') else {
            continue;
        };
        if !matches!(status, "PASS" | "WARN" | "FAIL") {
            continue;
        }
        let (name, seen) = rest.split_once(": ").unwrap();
        checks.insert(
            name.to_string(),
            Line {
                status: status.to_string(),
                seen: seen.to_string(),
                fix: None,
            },
        );
        last = Some(name.to_string());
    }
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
        checks,
    }
}

fn url(proxy: &Proxy) -> String {
    format!("http://{}", proxy.addr)
}

/// Every example proxy config: every check passes, and the exit code is 0.
fn example_passes(kind: Kind) {
    let server = server(STRONG_KEY, "");
    let proxy = Proxy::start(&Setup::Example(kind), server.addr, &[]);
    let run = self_test(server.dir.path(), &[&url(&proxy)]);
    let context = || format!("{kind:?}:\n{}\n{}", run.stdout, proxy.logs());
    let mut names = vec![
        "config",
        "key",
        "local-ping",
        "local-events",
        "public-url",
        "public-ping",
        "public-websocket",
        "public-events",
        "end-to-end",
        "stays-up",
    ];
    // The box's checks depend on the machine the tests run on: present, and never FAIL
    // (they can only warn), which the count below asserts.
    run.check("open-files");
    run.check("memory");
    // The clock is read from the proxy's Date header; HAProxy adds none to what it
    // passes on (and this server sends none), so there the check is left out, and said so.
    match kind {
        Kind::Haproxy => assert!(run.stdout.contains("not run: clock"), "{}", context()),
        _ => names.push("clock"),
    }
    for name in names {
        assert_eq!(run.check(name).status, "PASS", "{name}: {}", context());
    }
    let failed = run.checks.iter().filter(|(_, c)| c.status == "FAIL").count();
    assert_eq!(failed, 0, "{}", context());
    assert_eq!(run.code, 0, "{}", context());
}

#[test]
fn nginx_current_example_passes() {
    example_passes(Kind::NginxCurrent);
}

/// examples/proxy/nginx-seafile11.conf is the manual's Seafile 10/11 snippet with exact
/// locations: the manual's prefix `location /notification` with `proxy_pass
/// http://127.0.0.1:8083/` mapped the public `/notificationevents` to `/events` (issue 17),
/// which the self-test reported as `public-events`.
#[test]
fn nginx_seafile11_example_passes() {
    example_passes(Kind::NginxSeafile11);
}

#[test]
fn apache_example_passes() {
    example_passes(Kind::Apache);
}

#[test]
fn caddy_example_passes() {
    example_passes(Kind::Caddy);
}

#[test]
fn haproxy_example_passes() {
    example_passes(Kind::Haproxy);
}

/// The websocket location of nginx-current.conf, with the given extra lines.
fn nginx_block(websocket_lines: &str) -> String {
    format!(
        "server {{\n listen 127.0.0.1:{{PORT}};\n location /notification {{\n  proxy_pass http://{{UPSTREAM}};\n{websocket_lines}\n }}\n}}\n"
    )
}

const UPGRADE_LINES: &str =
    "  proxy_http_version 1.1;\n  proxy_set_header Upgrade $http_upgrade;\n  proxy_set_header Connection \"upgrade\";";

#[test]
fn nginx_without_the_upgrade_headers_fails_the_websocket_check() {
    let server = server(STRONG_KEY, "");
    let block = nginx_block("");
    let proxy = Proxy::start(&Setup::Nginx(&block), server.addr, &[]);
    let run = self_test(server.dir.path(), &[&url(&proxy)]);
    run.expect("public-ping", "PASS");
    let ws = run.expect("public-websocket", "FAIL");
    assert!(ws.seen.contains("400"), "{}", run.stdout);
    assert!(
        ws.fix.as_deref().unwrap().contains("proxy_set_header Upgrade"),
        "{}",
        run.stdout
    );
    assert!(
        !run.checks.contains_key("end-to-end"),
        "end to end needs the websocket: {}",
        run.stdout
    );
    assert_eq!(run.code, 1);

    // The control: the same block with the three lines passes.
    let block = nginx_block(UPGRADE_LINES);
    let proxy = Proxy::start(&Setup::Nginx(&block), server.addr, &[]);
    let run = self_test(server.dir.path(), &[&url(&proxy)]);
    run.expect("public-websocket", "PASS");
    run.expect("end-to-end", "PASS");
}

#[test]
fn nginx_without_a_notification_rule_fails_naming_the_rule() {
    let server = server(STRONG_KEY, "");
    // Only "seahub": a web page for everything.
    let block = "server {\n listen 127.0.0.1:{PORT};\n location / {\n  default_type text/html;\n  return 404 '<!DOCTYPE html><html>Page not found</html>';\n }\n}\n";
    let proxy = Proxy::start(&Setup::Nginx(block), server.addr, &[]);
    let run = self_test(server.dir.path(), &[&url(&proxy)]);
    for name in ["public-ping", "public-websocket"] {
        let line = run.expect(name, "FAIL");
        assert!(line.seen.contains("no /notification rule"), "{name}: {}", run.stdout);
        assert!(line.fix.as_deref().unwrap().contains("/notification"), "{}", run.stdout);
    }
    assert_eq!(run.code, 1);
}

#[test]
fn nginx_pointing_at_a_closed_port_fails_with_502() {
    let server = server(STRONG_KEY, "");
    let closed = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let block = nginx_block(UPGRADE_LINES);
    let proxy = Proxy::start(&Setup::Nginx(&block), closed, &[]);
    let run = self_test(server.dir.path(), &[&url(&proxy)]);
    let line = run.expect("public-ping", "FAIL");
    assert!(line.seen.contains("502"), "{}", run.stdout);
    assert!(line.seen.contains("cannot reach this server"), "{}", run.stdout);
    assert!(
        line.fix.as_deref().unwrap().contains(&server.addr.to_string()),
        "the fix names the server's address: {}",
        run.stdout
    );
    run.expect("public-websocket", "FAIL");
    // The local server itself is fine.
    run.expect("local-events", "PASS");
    assert_eq!(run.code, 1);
}

#[test]
fn a_proxy_that_maps_a_public_path_to_events_fails() {
    let server = server(STRONG_KEY, "");
    // The Seafile 10/11 manual's form: the prefix location with a trailing-slash
    // proxy_pass maps /notificationevents to /events.
    let block = format!(
        "server {{\n listen 127.0.0.1:{{PORT}};\n location /notification/ping {{ proxy_pass http://{{UPSTREAM}}/ping; }}\n location /notification {{\n  proxy_pass http://{{UPSTREAM}}/;\n{UPGRADE_LINES}\n }}\n}}\n"
    );
    let proxy = Proxy::start(&Setup::Nginx(&block), server.addr, &[]);
    let run = self_test(server.dir.path(), &[&url(&proxy)]);
    let line = run.expect("public-events", "FAIL");
    assert!(line.seen.contains("/notificationevents"), "{}", run.stdout);
    assert!(
        line.fix.as_deref().unwrap().contains("location = /notification"),
        "{}",
        run.stdout
    );
    // Everything else works through it.
    run.expect("end-to-end", "PASS");
}

#[test]
fn a_proxy_that_cuts_idle_websockets_fails_stays_up() {
    // The server's pings are off, so only the proxy's 1 s read timeout is in play.
    let server = server(STRONG_KEY, "ping_interval = 30\npong_timeout = 60");
    let block = nginx_block(&format!("{UPGRADE_LINES}\n  proxy_read_timeout 1s;"));
    let proxy = Proxy::start(&Setup::Nginx(&block), server.addr, &[]);
    let run = self_test(server.dir.path(), &[&url(&proxy)]);
    run.expect("end-to-end", "PASS");
    let line = run.expect("stays-up", "FAIL");
    assert!(line.seen.contains("was closed"), "{}", run.stdout);
    assert!(
        line.fix.as_deref().unwrap().contains("proxy_read_timeout"),
        "{}",
        run.stdout
    );
}

#[test]
fn a_server_with_another_key_fails_the_local_event_on_the_signature() {
    let server = server(STRONG_KEY, "");
    // The self-test's configuration: the same address, another key (as seaf-server
    // would have it after a key change the server did not pick up).
    let other = TempDir::new();
    std::fs::write(
        other.path().join("seafile.conf"),
        format!(
            "[notification]\nhost = 127.0.0.1\nport = {}\njwt_private_key = {}\n",
            server.addr.port(),
            STRONG_KEY.replace('c', "d")
        ),
    )
    .unwrap();
    let run = self_test(other.path(), &[]);
    run.expect("local-ping", "PASS");
    let line = run.expect("local-events", "FAIL");
    assert!(line.seen.contains("signature"), "{}", run.stdout);
    assert!(line.seen.contains("another key"), "{}", run.stdout);
    assert!(!run.checks.contains_key("end-to-end"), "{}", run.stdout);
    assert_eq!(run.code, 1);
    // And the server saw what seaf-server would have caused.
    assert!(server.logs.wait_for("bad token (signature)", DEADLINE).is_some());
}

/// libfaketime, installed by `.ci/deps` (Debian package `libfaketime`), as tests/clock.rs uses it.
fn libfaketime() -> std::path::PathBuf {
    for dir in ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib"] {
        let p = Path::new(dir).join("faketime/libfaketime.so.1");
        if p.exists() {
            return p;
        }
    }
    panic!("libfaketime not found: install the libfaketime package (run .ci/deps)");
}

#[test]
fn a_server_clock_ahead_fails_the_local_event_as_expired() {
    let dir = TempDir::new();
    std::fs::write(
        dir.path().join("seafile.conf"),
        format!(
            "{}port = {}\njwt_private_key = {STRONG_KEY}\n",
            config_text(""),
            free_port()
        ),
    )
    .unwrap();
    let lib = libfaketime();
    // The server's wall clock an hour ahead: seaf-server's five-minute tokens are expired there.
    let server = Server::start_in(
        dir,
        &["-l", "-"],
        &[
            ("LD_PRELOAD", lib.to_str().unwrap()),
            ("FAKETIME", "+3600"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    let run = self_test(server.dir.path(), &[]);
    let line = run.expect("local-events", "FAIL");
    assert!(line.seen.contains("expired"), "{}", run.stdout);
    assert!(line.fix.as_deref().unwrap().contains("NTP"), "{}", run.stdout);
    assert!(server.logs.contains("bad token (expired)"), "{:?}", server.logs.all());
}

#[test]
fn the_manuals_example_key_fails_the_key_check_and_the_server_warns() {
    let server = server(MANUAL_KEY, "");
    let line = server
        .logs
        .wait_for("example key published", DEADLINE)
        .expect("no start-up warning about the key");
    assert!(line.contains("[WARNING]"), "{line}");
    assert!(line.contains("openssl rand -base64 32"), "{line}");
    assert!(!line.contains(MANUAL_KEY), "the key itself is never logged: {line}");
    let run = self_test(server.dir.path(), &[]);
    let key = run.expect("key", "FAIL");
    assert!(key.seen.contains("published"), "{}", run.stdout);
    // Everything else works: the key is the server's too.
    run.expect("end-to-end", "PASS");
    assert_eq!(run.code, 1);

    // A short key: a warning, not a failure.
    let short = server_short_key();
    let run = self_test(short.dir.path(), &[]);
    run.expect("key", "WARN");
    assert!(short.logs.contains("only 27 bytes"), "{:?}", short.logs.all());
}

fn server_short_key() -> Server {
    server(KEY, "")
}

#[test]
fn an_environment_key_that_differs_from_seafile_conf_is_named() {
    let other = STRONG_KEY.replace('c', "e");
    let dir = TempDir::new();
    std::fs::write(
        dir.path().join("seafile.conf"),
        format!(
            "{}port = {}\njwt_private_key = {STRONG_KEY}\n",
            config_text(""),
            free_port()
        ),
    )
    .unwrap();
    let server = Server::start_in(dir, &["-l", "-"], &[("JWT_PRIVATE_KEY", &other)]);
    let run = self_test_env(server.dir.path(), &[], &[("JWT_PRIVATE_KEY", &other)]);
    let config = run.expect("config", "PASS");
    assert!(
        config.seen.contains("key from environment variable JWT_PRIVATE_KEY"),
        "{}",
        run.stdout
    );
    let line = run.expect("key-agreement", "WARN");
    assert!(line.seen.contains("differs from seafile.conf"), "{}", run.stdout);
    assert!(line.seen.contains("10/11 signs with seafile.conf's"), "{}", run.stdout);
    assert!(line.seen.contains("12/13 with JWT_PRIVATE_KEY"), "{}", run.stdout);
    // The server uses the environment's key, as the self-test does.
    run.expect("local-events", "PASS");
    assert_eq!(run.code, 0, "{}", run.stdout);
    // The same key in both places: nothing to say.
    let run = self_test_env(server.dir.path(), &[], &[("JWT_PRIVATE_KEY", STRONG_KEY)]);
    assert!(!run.checks.contains_key("key-agreement"), "{}", run.stdout);
}

#[test]
fn a_configuration_that_does_not_load_is_one_failure() {
    let dir = TempDir::new();
    std::fs::write(
        dir.path().join("seafile.conf"),
        "[notification]\nport = eighty\njwt_private_key = k\n",
    )
    .unwrap();
    let run = self_test(dir.path(), &["--json"]);
    let doc: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout));
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["checks"][0]["name"], "config");
    assert_eq!(doc["checks"][0]["status"], "FAIL");
    assert!(doc["checks"][0]["seen"].as_str().unwrap().contains("port"), "{doc:#}");
    assert_eq!(run.code, 1);
}

#[test]
fn json_output_is_one_document() {
    let server = server(STRONG_KEY, "");
    let run = self_test(server.dir.path(), &["--json"]);
    let doc: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout));
    assert_eq!(doc["ok"], true, "{doc:#}");
    let checks = doc["checks"].as_array().unwrap();
    let e2e = checks.iter().find(|c| c["name"] == "end-to-end").unwrap();
    assert_eq!(e2e["status"], "PASS");
    assert!(e2e["seen"].as_str().unwrap().contains("received it"));
    let url = checks.iter().find(|c| c["name"] == "public-url").unwrap();
    assert_eq!(url["status"], "WARN");
    assert!(url["fix"].as_str().unwrap().contains("--self-test https://"));
    assert_eq!(run.code, 0);
}

#[test]
fn the_public_url_is_found_in_seahub_settings() {
    let server = server(STRONG_KEY, "");
    let proxy = Proxy::start(&Setup::Example(Kind::NginxCurrent), server.addr, &[]);
    std::fs::write(
        server.dir.path().join("seahub_settings.py"),
        format!("SERVICE_URL = 'http://{}'\n", proxy.addr),
    )
    .unwrap();
    let run = self_test(server.dir.path(), &[]);
    let line = run.expect("public-url", "PASS");
    assert!(line.seen.contains("seahub_settings.py"), "{}", run.stdout);
    run.expect("public-websocket", "PASS");
}

#[test]
fn nothing_listening_fails_the_local_server() {
    let dir = TempDir::new();
    std::fs::write(
        dir.path().join("seafile.conf"),
        format!(
            "[notification]\nhost = 127.0.0.1\nport = {}\njwt_private_key = {STRONG_KEY}\n",
            free_port()
        ),
    )
    .unwrap();
    let run = self_test(dir.path(), &[]);
    let line = run.expect("local-ping", "FAIL");
    assert!(
        line.fix.as_deref().unwrap().contains("Start the server"),
        "{}",
        run.stdout
    );
    assert_eq!(run.code, 1);
}

// ---- https ----

/// A CA and a certificate it signed for localhost (only), made with openssl:
/// (ca.pem, cert.pem, key.pem).
fn certificates(dir: &Path) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=self-test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "key.pem",
        "-out",
        "cert.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "cert.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "cert.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    let read = |n: &str| std::fs::read(dir.join(n)).unwrap();
    (read("ca.pem"), read("cert.pem"), read("key.pem"))
}

#[test]
fn https_with_a_private_ca_needs_ca_file_or_insecure() {
    let server = server(STRONG_KEY, "");
    let certs = TempDir::new();
    let (ca, cert, key) = certificates(certs.path());
    let block = format!(
        "server {{\n listen 127.0.0.1:{{PORT}} ssl;\n ssl_certificate {{DIR}}/cert.pem;\n ssl_certificate_key {{DIR}}/key.pem;\n location /notification {{\n  proxy_pass http://{{UPSTREAM}};\n{UPGRADE_LINES}\n }}\n}}\n"
    );
    let proxy = Proxy::start(
        &Setup::Nginx(&block),
        server.addr,
        &[("cert.pem", &cert), ("key.pem", &key)],
    );
    let url = format!("https://localhost:{}", proxy.addr.port());

    // Without either: the certificate is not trusted.
    let run = self_test(server.dir.path(), &[&url]);
    let line = run.expect("public-ping", "FAIL");
    assert!(line.seen.contains("TLS"), "{}", run.stdout);
    assert!(line.seen.contains("not signed by a trusted CA"), "{}", run.stdout);
    assert!(line.fix.as_deref().unwrap().contains("--ca-file"), "{}", run.stdout);
    run.expect("public-websocket", "FAIL");
    assert_eq!(run.code, 1);

    // With the CA: everything passes, over TLS end to end.
    let ca_path = certs.path().join("ca.pem");
    std::fs::write(&ca_path, &ca).unwrap();
    let run = self_test(server.dir.path(), &[&url, "--ca-file", ca_path.to_str().unwrap()]);
    for name in [
        "public-ping",
        "public-websocket",
        "public-events",
        "end-to-end",
        "stays-up",
    ] {
        run.expect(name, "PASS");
    }
    assert!(run.check("public-url").seen.contains("--ca-file"), "{}", run.stdout);
    assert_eq!(run.code, 0, "{}", run.stdout);

    // The right CA, but a name the certificate is not for.
    let by_address = format!("https://127.0.0.1:{}", proxy.addr.port());
    let run = self_test(
        server.dir.path(),
        &[&by_address, "--ca-file", ca_path.to_str().unwrap()],
    );
    let line = run.expect("public-ping", "FAIL");
    assert!(line.seen.contains("not valid for this host name"), "{}", run.stdout);

    // With --insecure: passes, and says the certificate was not checked.
    let run = self_test(server.dir.path(), &[&url, "--insecure"]);
    let line = run.expect("public-ping", "PASS");
    assert!(line.seen.contains("--insecure"), "{}", run.stdout);
    run.expect("end-to-end", "PASS");
    assert_eq!(run.code, 0, "{}", run.stdout);
}

// ---- backends ----

#[test]
fn redis_bus_and_sqlite_groups_pass_and_fail_when_gone() {
    let redis = Redis::start();
    let db_dir = TempDir::new();
    let db = db_dir.path().join("groupmgr.db");
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch("CREATE TABLE GroupUser (group_id INTEGER, user_name VARCHAR(255), is_staff tinyint);")
        .unwrap();
    drop(c);
    let server = server(
        STRONG_KEY,
        &format!(
            "redis_url = redis://127.0.0.1:{}/\ngroupmgr_db = {}",
            redis.port,
            db.display()
        ),
    );
    server
        .logs
        .wait_for("bus: subscribed", DEADLINE)
        .expect("the bus did not subscribe");
    let run = self_test(server.dir.path(), &[]);
    let bus = run.expect("redis-bus", "PASS");
    assert!(
        bus.seen.contains("came back through this server's websocket"),
        "{}",
        run.stdout
    );
    run.expect("group-database", "PASS");
    assert_eq!(run.code, 0, "{}", run.stdout);

    // Redis stopped and the database file gone: both fail.
    drop(redis);
    std::fs::remove_file(&db).unwrap();
    let run = self_test(server.dir.path(), &[]);
    let bus = run.expect("redis-bus", "FAIL");
    assert!(bus.seen.contains("cannot reach Redis"), "{}", run.stdout);
    run.expect("group-database", "FAIL");
    assert_eq!(run.code, 1);
}

#[test]
fn a_redis_the_server_does_not_use_fails_the_bus_check() {
    let redis = Redis::start();
    // The server has no bus; the self-test's configuration names one.
    let server = server(STRONG_KEY, "");
    std::fs::write(
        server.dir.path().join("seafile.conf"),
        format!(
            "{}port = {}\njwt_private_key = {STRONG_KEY}\nredis_url = redis://127.0.0.1:{}/\n",
            config_text(""),
            server.addr.port(),
            redis.port
        ),
    )
    .unwrap();
    let run = self_test(server.dir.path(), &[]);
    let bus = run.expect("redis-bus", "FAIL");
    assert!(bus.seen.contains("no server is subscribed"), "{}", run.stdout);
}
