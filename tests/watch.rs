//! `--watch LIBRARY_ID [URL]` against the real server, directly and through nginx: it
//! prints an event posted while it runs as one JSON line with its arrival time, and exits
//! 0 on SIGINT; a server with another key makes it exit 1.

mod common;
#[path = "common/proxy.rs"]
mod proxy;

use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

/// A running `--watch`, its stdout and stderr lines on channels.
struct Watcher {
    child: Child,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
}

impl Watcher {
    fn start(dir: &std::path::Path, repo: &str, url: Option<&str>) -> Watcher {
        let mut cmd = binary();
        cmd.arg("-c").arg(dir).arg("--watch").arg(repo);
        if let Some(u) = url {
            cmd.arg(u);
        }
        cmd.env_remove("JWT_PRIVATE_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let lines = |pipe: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        };
        let stdout = lines(Box::new(child.stdout.take().unwrap()));
        let stderr = lines(Box::new(child.stderr.take().unwrap()));
        Watcher { child, stdout, stderr }
    }

    /// Waits for a stderr line containing `needle`.
    fn wait_stderr(&self, needle: &str) -> String {
        loop {
            match self.stderr.recv_timeout(DEADLINE) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => panic!("--watch printed no {needle:?} on stderr"),
            }
        }
    }

    fn exit_code(&mut self) -> Option<i32> {
        let deadline = std::time::Instant::now() + DEADLINE;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The self-test's config dir for `server`: the same file with its real port.
fn watch_config(server: &Server) -> TempDir {
    let dir = TempDir::new();
    let text = format!("{}port = {}\n", config_text(""), server.addr.port());
    std::fs::write(dir.path().join("seafile.conf"), text).unwrap();
    dir
}

fn receives_an_event_and_stops_on_sigint(via_proxy: bool) {
    let server = Server::start("");
    let dir = watch_config(&server);
    let proxy =
        via_proxy.then(|| proxy::Proxy::start(&proxy::Setup::Example(proxy::Kind::NginxCurrent), server.addr, &[]));
    let url = proxy.as_ref().map(|p| format!("http://{}", p.addr));
    let mut w = Watcher::start(dir.path(), "repo-watched", url.as_deref());
    w.wait_stderr("subscribed to library repo-watched");

    server.post(&repo_update("repo-other", "not-this-one"));
    server.post(&repo_update("repo-watched", "c0ffee"));
    let line = w.stdout.recv_timeout(DEADLINE).expect("--watch printed no event");
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["message"]["type"], "repo-update", "{line}");
    assert_eq!(v["message"]["content"]["repo_id"], "repo-watched", "{line}");
    assert_eq!(v["message"]["content"]["commit_id"], "c0ffee", "{line}");
    let time = v["time"].as_str().unwrap();
    assert!(time.len() == 24 && time.ends_with('Z'), "{time}");

    unsafe { libc::kill(w.child.id() as i32, libc::SIGINT) };
    assert_eq!(w.exit_code(), Some(0), "--watch must exit 0 on SIGINT");
    assert!(
        w.stdout.try_recv().is_err(),
        "only the watched library's event is printed"
    );
}

#[test]
fn watch_locally() {
    receives_an_event_and_stops_on_sigint(false);
}

#[test]
fn watch_through_nginx() {
    receives_an_event_and_stops_on_sigint(true);
}

#[test]
fn watch_with_another_key_exits_1() {
    let server = Server::start("");
    let dir = TempDir::new();
    let text = format!(
        "{}port = {}\njwt_private_key = another-key\n",
        config_text(""),
        server.addr.port()
    );
    std::fs::write(dir.path().join("seafile.conf"), text).unwrap();
    let mut w = Watcher::start(dir.path(), "repo-x", None);
    let line = w.wait_stderr("refused");
    assert!(line.contains("another key"), "{line}");
    assert_eq!(w.exit_code(), Some(1));
}
