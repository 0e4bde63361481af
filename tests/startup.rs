//! Start-up, configuration, logging and signals against the real binary (PROTOCOL.md
//! sections 2.1 and 11.5).

mod common;

use common::*;
use jsonwebtoken::Algorithm;
use serde_json::json;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::CloseCode;

// ---- a process helper with stdout and stderr kept apart, in files ----

/// Environment variables the server reads; removed from every child so the outer
/// environment cannot leak in.
fn scrub(cmd: &mut std::process::Command) {
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str()
            && (k.starts_with("NOTIFICATION_SERVER_") || k.starts_with("SEAFILE_") || k == "JWT_PRIVATE_KEY")
        {
            cmd.env_remove(k);
        }
    }
}

/// A child process whose stdout and stderr go to files; killed on drop.
struct Proc {
    child: Child,
    io: TempDir,
}

impl Proc {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Proc {
        let io = TempDir::new();
        let mut cmd = binary();
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(File::create(io.path().join("stdout")).unwrap())
            .stderr(File::create(io.path().join("stderr")).unwrap());
        scrub(&mut cmd);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc {
            child: cmd.spawn().expect("start notification-server"),
            io,
        }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(self.io.path().join("stdout")).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.io.path().join("stderr")).unwrap_or_default()
    }

    fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to end by itself; returns (status, stdout, stderr).
    fn finish(mut self) -> (ExitStatus, String, String) {
        let status = self.wait_exit(DEADLINE).unwrap_or_else(|| {
            panic!(
                "process did not exit; stdout {:?}, stderr {:?}",
                self.stdout(),
                self.stderr()
            )
        });
        (status, self.stdout(), self.stderr())
    }

    fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion with these arguments and environment.
fn run(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    Proc::spawn(args, env).finish()
}

/// Polls a file until a line containing `needle` appears; returns that line.
fn wait_for_line(path: &Path, needle: &str, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return Some(line.to_string());
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn addr_of(listening_line: &str) -> SocketAddr {
    listening_line
        .rsplit("listening on ")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A server that logs to a file: started with `-c dir` plus `args`, considered up when
/// `log` shows its listening line.
struct FileLogged {
    proc: Proc,
    addr: SocketAddr,
    log: PathBuf,
    dir: TempDir,
}

impl FileLogged {
    fn start(dir: TempDir, log: PathBuf, args: &[&str], env: &[(&str, &str)]) -> FileLogged {
        let mut all = vec!["-c", dir.path().to_str().unwrap()];
        all.extend_from_slice(args);
        let proc = Proc::spawn(&all, env);
        let Some(line) = wait_for_line(&log, "listening on ", DEADLINE) else {
            panic!(
                "server did not start; log {:?}, stdout {:?}, stderr {:?}",
                std::fs::read_to_string(&log).unwrap_or_default(),
                proc.stdout(),
                proc.stderr()
            );
        };
        FileLogged {
            proc,
            addr: addr_of(&line),
            log,
            dir,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A config dir with the standard test seafile.conf plus `extra`.
fn conf_dir(extra: &str) -> TempDir {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("seafile.conf"), config_text(extra)).unwrap();
    dir
}

fn conf_dir_with(text: &str) -> TempDir {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("seafile.conf"), text).unwrap();
    dir
}

fn post_signed(addr: SocketAddr, key: &[u8]) -> Response {
    let token = sign_with(Algorithm::HS256, &json!({"exp": unix_now() + 300}), key);
    post_event(
        addr,
        &repo_update("r", "c").to_string(),
        Some(&format!("Token {token}")),
    )
}

/// `YYYY-MM-DD HH:MM:SS` in local time for a Unix time, computed as the server must.
fn local_stamp(unix: i64) -> String {
    let t = unix as libc::time_t;
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    assert!(!unsafe { libc::localtime_r(&t, &mut tm) }.is_null());
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// Checks `[YYYY-MM-DD HH:MM:SS] [LEVEL] message` byte by byte; returns (stamp, level).
fn log_line_shape(line: &str) -> (String, String) {
    let b = line.as_bytes();
    assert!(b.len() > 24, "short log line {line:?}");
    assert_eq!(b[0], b'[', "{line:?}");
    for (i, c) in b[1..20].iter().enumerate() {
        let want_sep = match i {
            4 | 7 => Some(b'-'),
            10 => Some(b' '),
            13 | 16 => Some(b':'),
            _ => None,
        };
        match want_sep {
            Some(sep) => assert_eq!(*c, sep, "byte {} of {line:?}", i + 1),
            None => assert!(c.is_ascii_digit(), "byte {} of {line:?} is not a digit", i + 1),
        }
    }
    assert_eq!(&b[20..23], b"] [", "{line:?}");
    let rest = &line[23..];
    let (level, message) = rest.split_once("] ").unwrap_or_else(|| panic!("no level in {line:?}"));
    assert!(
        ["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"].contains(&level),
        "level {level:?} in {line:?}"
    );
    assert!(!message.is_empty(), "{line:?}");
    (line[1..20].to_string(), level.to_string())
}

// ---- command line ----

#[test]
fn help_and_version() {
    for flag in ["--help", "-h"] {
        let (status, out, _) = run(&[flag], &[]);
        assert_eq!(status.code(), Some(0), "{flag}");
        assert!(out.starts_with("Usage: notification-server"), "{flag}: {out:?}");
        assert!(out.contains("-c ") && out.contains("-l "), "{flag}: {out:?}");
    }
    for flag in ["--version", "-V"] {
        let (status, out, _) = run(&[flag], &[]);
        assert_eq!(status.code(), Some(0), "{flag}");
        assert_eq!(
            out,
            format!("notification-server {}\n", env!("CARGO_PKG_VERSION")),
            "{flag}"
        );
    }
}

#[test]
fn missing_or_bad_config_dir() {
    let (status, out, err) = run(&[], &[("JWT_PRIVATE_KEY", "k")]);
    assert!(!status.success(), "no -c must fail: {status:?}");
    assert!(out.is_empty(), "{out:?}");
    assert!(err.contains("-c"), "the message should point at -c: {err:?}");

    let missing = std::env::temp_dir().join(format!("ns-no-such-dir-{}", std::process::id()));
    let (status, _, err) = run(&["-c", missing.to_str().unwrap()], &[("JWT_PRIVATE_KEY", "k")]);
    assert!(!status.success(), "{status:?}");
    assert!(
        err.contains(missing.to_str().unwrap()),
        "the message should name the dir: {err:?}"
    );

    let (status, _, err) = run(&["-c"], &[]);
    assert!(!status.success(), "{status:?}");
    assert!(!err.is_empty());

    let dir = conf_dir("");
    let (status, _, err) = run(&["-c", dir.path().to_str().unwrap(), "--bogus"], &[]);
    assert!(!status.success(), "{status:?}");
    // Go's flag package names it with one dash, and so may this server.
    assert!(err.contains("-bogus"), "{err:?}");
}

/// Runs the server on a config that must be refused; returns its single stderr line.
fn refused(text: &str) -> (String, String) {
    let dir = conf_dir_with(text);
    let file = dir.path().join("seafile.conf").to_str().unwrap().to_string();
    let (status, out, err) = run(&["-c", dir.path().to_str().unwrap()], &[]);
    assert!(!status.success(), "config {text:?} was accepted");
    assert!(out.is_empty(), "{out:?}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "want one stderr line, got {err:?}");
    // Nothing was started, so nothing was logged to the default log file.
    assert!(
        !dir.path().join("notification-server.log").exists(),
        "a failed start must not create the log file"
    );
    (lines[0].to_string(), file)
}

#[test]
fn missing_key_is_one_line_naming_file_and_key() {
    let (line, file) = refused("[notification]\nhost = 127.0.0.1\nport = 0\n");
    assert!(line.contains(&file), "{line:?}");
    assert!(line.contains("jwt_private_key"), "{line:?}");
    // An empty key is no key.
    let (line, file) = refused("[notification]\nhost = 127.0.0.1\nport = 0\njwt_private_key =\n");
    assert!(line.contains(&file) && line.contains("jwt_private_key"), "{line:?}");
    // A key in another section does not count.
    let (line, _) = refused("[general]\njwt_private_key = k\n[notification]\nport = 0\n");
    assert!(line.contains("jwt_private_key"), "{line:?}");
}

#[test]
fn bad_values_are_one_line_naming_file_key_and_value() {
    for (key, value) in [
        ("port", "eighty"),
        ("port", "70000"),
        ("log_level", "loud"),
        ("max_connections", "x"),
        ("http_head_timeout", "soon"),
    ] {
        let (line, file) = refused(&format!(
            "[notification]\nhost = 127.0.0.1\njwt_private_key = k\n{key} = {value}\n"
        ));
        assert!(line.contains(&file), "{key}={value}: {line:?}");
        assert!(line.contains(key), "{key}={value}: {line:?}");
        assert!(line.contains(value), "{key}={value}: {line:?}");
    }
}

#[test]
fn check_config() {
    let dir = conf_dir("");
    let (status, out, _) = run(&["--check-config", "-c", dir.path().to_str().unwrap()], &[]);
    assert_eq!(status.code(), Some(0));
    assert!(out.starts_with("configuration OK"), "{out:?}");
    assert!(
        !dir.path().join("notification-server.log").exists(),
        "--check-config must not start logging"
    );

    let bad = conf_dir("port = eighty");
    let (status, out, err) = run(&["--check-config", "-c", bad.path().to_str().unwrap()], &[]);
    assert!(!status.success());
    assert!(!out.contains("configuration OK"), "{out:?}");
    assert!(err.contains("eighty"), "{err:?}");

    let no_key = conf_dir_with("[notification]\nport = 0\n");
    let (status, _, err) = run(&["--check-config", "-c", no_key.path().to_str().unwrap()], &[]);
    assert!(!status.success());
    assert!(err.contains("jwt_private_key"), "{err:?}");
}

// ---- environment ----

#[test]
fn environment_alone_is_enough_without_seafile_conf() {
    let dir = TempDir::new();
    let server = Server::start_in(
        dir,
        &["-l", "-"],
        &[
            ("JWT_PRIVATE_KEY", "env-only key"),
            ("NOTIFICATION_SERVER_HOST", "127.0.0.1"),
            ("NOTIFICATION_SERVER_PORT", "0"),
        ],
    );
    server.assert_alive();
    assert_eq!(post_signed(server.addr, b"env-only key").status, 200);
    assert_eq!(post_signed(server.addr, KEY.as_bytes()).status, 400);
}

#[test]
fn environment_host_and_port_override_the_file() {
    // The file names an address nobody can bind; only the environment makes this start.
    let dir = conf_dir_with(&format!(
        "[notification]\nhost = 192.0.2.1\nport = 1\njwt_private_key = {KEY}\n"
    ));
    let port = free_port();
    let server = Server::start_in(
        dir,
        &["-l", "-"],
        &[
            ("NOTIFICATION_SERVER_HOST", "127.0.0.1"),
            ("NOTIFICATION_SERVER_PORT", &port.to_string()),
        ],
    );
    assert_eq!(server.addr, SocketAddr::from(([127, 0, 0, 1], port)));
    server.assert_alive();
}

#[test]
fn environment_key_overrides_the_file_key() {
    let dir = conf_dir("");
    let server = Server::start_in(dir, &["-l", "-"], &[("JWT_PRIVATE_KEY", "the env key")]);
    assert_eq!(post_signed(server.addr, b"the env key").status, 200);
    let r = post_signed(server.addr, KEY.as_bytes());
    assert_eq!((r.status, r.text().as_str()), (400, "Notification token not match\n"));
}

#[test]
fn key_with_comment_characters_is_used_whole() {
    let server = Server::start("");
    assert!(KEY.contains('#') && KEY.contains(';'));
    assert_eq!(post_signed(server.addr, KEY.as_bytes()).status, 200);
    for cut in ["test-key", "test-key#with"] {
        assert_eq!(
            post_signed(server.addr, cut.as_bytes()).status,
            400,
            "key cut to {cut:?} accepted"
        );
    }
}

// ---- logging ----

#[test]
fn default_log_file_in_config_dir_with_the_official_line_format() {
    let before = local_stamp(unix_now());
    let dir = conf_dir("log_level = info");
    let log = dir.path().join("notification-server.log");
    let server = FileLogged::start(dir, log.clone(), &[], &[]);
    // Something at warning level too.
    assert_eq!(post_event(server.addr, "{}", Some("Token bad")).status, 400);
    let warn = wait_for_line(&log, "refused event", DEADLINE).expect("a warning for the refused event");
    let after = local_stamp(unix_now());
    let text = server.log_text();
    assert!(text.ends_with('\n'));
    for line in text.lines() {
        let (stamp, _) = log_line_shape(line);
        assert!(
            stamp >= before && stamp <= after,
            "timestamp {stamp} not local time between {before} and {after}: {line:?}"
        );
    }
    let listening = text.lines().find(|l| l.contains("listening on")).unwrap();
    assert_eq!(log_line_shape(listening).1, "INFO", "{listening:?}");
    assert_eq!(&listening[21..29], " [INFO] ", "{listening:?}");
    assert_eq!(log_line_shape(&warn).1, "WARNING", "{warn:?}");
    // At info, no debug lines.
    assert!(!text.contains("[DEBUG]"), "{text}");
    // Nothing went to stdout or the original stderr.
    assert_eq!(server.proc.stdout(), "");
    assert_eq!(server.proc.stderr(), "");
}

#[test]
fn dash_l_file_is_used_instead_of_the_default() {
    let dir = conf_dir("");
    let elsewhere = TempDir::new();
    let log = elsewhere.path().join("custom.log");
    let server = FileLogged::start(dir, log.clone(), &["-l", log.to_str().unwrap()], &[]);
    server.assert_alive_here();
    assert!(
        !server.dir.path().join("notification-server.log").exists(),
        "the default log file was created too"
    );
    for line in server.log_text().lines() {
        log_line_shape(line);
    }
}

impl FileLogged {
    fn assert_alive_here(&self) {
        let r = request(self.addr, b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert_eq!(r.status, 200);
    }
}

#[test]
fn seafile_log_to_stdout_prefixes_lines() {
    let dir = conf_dir("");
    let path = dir.path().to_str().unwrap().to_string();
    let mut proc = Proc::spawn(&["-c", &path], &[("SEAFILE_LOG_TO_STDOUT", "true")]);
    let out_file = proc.io.path().join("stdout");
    let line = wait_for_line(&out_file, "listening on ", DEADLINE)
        .unwrap_or_else(|| panic!("no listening line on stdout: {:?} / {:?}", proc.stdout(), proc.stderr()));
    let addr = addr_of(&line);
    assert_eq!(post_event(addr, "{}", Some("Token bad")).status, 400);
    wait_for_line(&out_file, "refused event", DEADLINE).expect("the refusal logged on stdout");
    for line in proc.stdout().lines() {
        let rest = line
            .strip_prefix("[notification-server] ")
            .unwrap_or_else(|| panic!("no prefix: {line:?}"));
        assert!(rest.starts_with('['), "{line:?}");
        log_line_shape(rest);
    }
    assert!(
        !dir.path().join("notification-server.log").exists(),
        "stdout mode must not create the log file"
    );
    assert_eq!(proc.stderr(), "", "stdout mode wrote to stderr");
    proc.signal(libc::SIGTERM);
    assert_eq!(proc.wait_exit(DEADLINE).and_then(|s| s.code()), Some(0));
}

#[test]
fn sigusr1_reopens_the_log_file() {
    let dir = conf_dir("");
    let log = dir.path().join("notification-server.log");
    let server = FileLogged::start(dir, log.clone(), &[], &[]);
    let rotated = server.dir.path().join("notification-server.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    // Until the signal, lines still go to the renamed file.
    server.assert_alive_here();
    server.proc.signal(libc::SIGUSR1);
    let line = wait_for_line(&log, "log file reopened", DEADLINE).expect("'log file reopened' in the new file");
    log_line_shape(&line);
    let old_len = std::fs::metadata(&rotated).unwrap().len();
    let old_text = std::fs::read_to_string(&rotated).unwrap();
    assert!(old_text.contains("listening on"), "{old_text}");
    assert!(!old_text.contains("log file reopened"), "{old_text}");
    // New activity lands in the new file only.
    assert_eq!(post_event(server.addr, "{}", Some("Token after-rotate")).status, 400);
    wait_for_line(&log, "refused event", DEADLINE).expect("new lines in the new file");
    server.assert_alive_here();
    wait_for_line(&log, "closed http connection", DEADLINE).expect("debug lines in the new file");
    assert_eq!(
        std::fs::metadata(&rotated).unwrap().len(),
        old_len,
        "the rotated file kept growing"
    );
    // And it keeps working on a second rotation.
    std::fs::rename(&log, server.dir.path().join("notification-server.log.2")).unwrap();
    server.proc.signal(libc::SIGUSR1);
    wait_for_line(&log, "log file reopened", DEADLINE).expect("second reopen");
    server.assert_alive_here();
}

#[test]
fn sigusr1_without_a_log_file_is_harmless() {
    let server = Server::start("");
    server.signal(libc::SIGUSR1);
    server.assert_alive();
    server.signal(libc::SIGUSR1);
    server.assert_alive();
}

#[test]
fn log_never_contains_the_key_or_a_token() {
    let server = Server::start("");
    let now = unix_now();
    let wrong_key = sign_with(Algorithm::HS256, &json!({"exp": now + 300}), b"some other key");
    let client = client_token("r", "alice@example.com", now + 3600);
    let expired_client = client_token("r2", "bob@example.com", now - 5);
    let good_event = event_token();
    let good_client = client_token("r3", "carol@example.com", now + 3600);
    let garbage = "garbage-token-text-0123456789";
    let body = repo_update("r", "c").to_string();
    for auth in [
        format!("Token {wrong_key}"),
        format!("Token {client}"),
        format!("Token {garbage}"),
        garbage.to_string(),
        format!("Token {good_event}"),
    ] {
        post_event(server.addr, &body, Some(&auth));
    }
    // The same tokens where they do not belong: a 404 and a malformed request.
    request(
        server.addr,
        format!("GET /notification/events HTTP/1.1\r\nAuthorization: Token {good_event}\r\n\r\n").as_bytes(),
    );
    request(server.addr, format!("GET /ping {good_event}\r\n\r\n").as_bytes());
    let mut ws = server.ws();
    ws.subscribe_many(&[
        ("r2", &expired_client),
        ("r4", garbage),
        ("r", &wrong_key),
        ("r3", &good_client),
    ]);
    for repo in ["r2", "r4", "r"] {
        let m = ws.recv().expect("jwt-expired");
        assert_eq!(m, json!({"type": "jwt-expired", "content": {"repo_id": repo}}));
    }
    ws.sync();
    server
        .logs
        .wait_for("token for r2 refused", DEADLINE)
        .expect("debug line for the refused subscription");
    // The last action's line is there, so every earlier one is too.
    server.assert_alive();
    server
        .logs
        .wait_for("subscribed to r3", DEADLINE)
        .expect("debug line for the good subscription");
    let all = server.logs.all().join("\n");
    assert!(all.contains("[DEBUG]"), "the test needs debug logging: {all}");
    assert!(!all.contains(KEY), "the key is in the log");
    assert!(!all.contains("test-key"), "part of the key is in the log");
    for token in [&wrong_key, &client, &expired_client, &good_event, &good_client] {
        let signature = token.rsplit('.').next().unwrap();
        assert!(!all.contains(signature), "a token signature is in the log: {token}");
        let payload = token.split('.').nth(1).unwrap();
        assert!(!all.contains(payload), "a token payload is in the log: {token}");
    }
    assert!(!all.contains(garbage), "the garbage token is in the log");
}

// ---- signals ----

#[test]
fn sigterm_sends_close_1001_and_exits_0() {
    let mut server = Server::start("shutdown_timeout = 5\nclose_timeout = 4");
    let mut a = server.ws();
    a.subscribe("r", "u");
    let mut b = server.ws();
    b.subscribe("r", "v");
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    for ws in [&mut a, &mut b] {
        let frame = ws.recv_close().expect("a Close frame on SIGTERM");
        assert_eq!(frame.code, CloseCode::Away);
        // Answer the close, as a real client does.
        let _ = ws.ws.flush();
    }
    let code = server.wait_exit(Duration::from_secs(5));
    let took = started.elapsed();
    assert_eq!(
        code,
        Some(0),
        "exit status after SIGTERM; logs {:#?}",
        server.logs.all()
    );
    // Both clients answered the Close, so the drain ends well before its timeouts.
    assert!(took < Duration::from_secs(3), "drain took {took:?}");
}

#[test]
fn sigterm_exits_0_within_the_shutdown_timeout_when_clients_do_not_answer() {
    let mut server = Server::start("shutdown_timeout = 1\nclose_timeout = 30");
    // A websocket that never reads, so it never answers the Close.
    let _mute = server.ws();
    let mut idle_http = connect(server.addr);
    std::io::Write::write_all(&mut idle_http, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    read_response(&mut idle_http, false).expect("ping");
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    // The idle keep-alive connection is closed at once, not at exit.
    assert!(
        closed_by_server(&mut idle_http),
        "idle HTTP connection left open during the drain"
    );
    assert!(
        started.elapsed() < Duration::from_millis(700),
        "idle HTTP closed only after {:?}",
        started.elapsed()
    );
    let code = server.wait_exit(Duration::from_secs(5));
    let took = started.elapsed();
    assert_eq!(code, Some(0), "logs {:#?}", server.logs.all());
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(3),
        "exit after {took:?}"
    );
}

#[test]
fn second_sigterm_during_a_long_drain_exits_at_once() {
    let mut server = Server::start("shutdown_timeout = 60\nclose_timeout = 60");
    let _mute = server.ws();
    server.signal(libc::SIGTERM);
    server.logs.wait_for("shutting down", DEADLINE).expect("drain started");
    assert_eq!(
        server.wait_exit(Duration::from_millis(500)),
        None,
        "exited without waiting for the drain"
    );
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    let code = server.wait_exit(Duration::from_secs(3));
    assert!(code.is_some(), "a second SIGTERM did not end the drain");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn sigint_drains_like_sigterm() {
    let mut server = Server::start("shutdown_timeout = 3\nclose_timeout = 2");
    let mut a = server.ws();
    a.subscribe("r", "u");
    server.signal(libc::SIGINT);
    assert_eq!(a.recv_close().expect("Close on SIGINT").code, CloseCode::Away);
    let _ = a.ws.flush();
    assert_eq!(server.wait_exit(Duration::from_secs(5)), Some(0));
}

// ---- start-up failures after the configuration ----

#[test]
fn busy_port_is_a_clear_failure() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = conf_dir_with(&format!(
        "[notification]\nhost = 127.0.0.1\nport = {port}\njwt_private_key = {KEY}\n"
    ));
    let (status, _, err) = run(&["-c", dir.path().to_str().unwrap(), "-l", "-"], &[]);
    assert!(!status.success(), "started on a busy port");
    assert!(
        err.contains(&format!("127.0.0.1:{port}")),
        "the message should name the address: {err:?}"
    );
    drop(taken);
}

#[test]
fn unwritable_log_file_is_a_clear_failure() {
    let dir = conf_dir("");
    let log = dir.path().join("no-such-subdir").join("x.log");
    let (status, _, err) = run(&["-c", dir.path().to_str().unwrap(), "-l", log.to_str().unwrap()], &[]);
    assert!(!status.success(), "started without its log file");
    assert!(
        err.contains(log.to_str().unwrap()),
        "the message should name the log file: {err:?}"
    );
}

#[test]
fn environment_log_level_overrides_the_file() {
    // The file says debug; the Seafile 12+ variable says info.
    let server = Server::start_in(conf_dir(""), &["-l", "-"], &[("NOTIFICATION_SERVER_LOG_LEVEL", "info")]);
    assert_eq!(post_event(server.addr, "{}", Some("Token bad")).status, 400);
    server.logs.wait_for("refused event", DEADLINE).expect("the warning");
    let all = server.logs.all();
    assert!(
        !all.iter().any(|l| l.contains("[DEBUG]")),
        "debug lines at level info: {all:#?}"
    );
}
