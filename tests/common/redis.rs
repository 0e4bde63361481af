//! A real redis-server (`.ci/deps` installs it) on a free loopback port, with no
//! persistence, for the tests of the Redis bus; stopped on drop, and restartable on its
//! port (`stop`, then `run`).
#![allow(dead_code)]

use super::common::{DEADLINE, TempDir};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = Redis {
            port,
            dir: TempDir::new(),
            child: None,
        };
        r.run();
        r
    }

    pub fn run(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--dir", &self.dir.path().display().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found: install redis-server (run .ci/deps)");
        self.child = Some(child);
        let deadline = Instant::now() + DEADLINE;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Runs a command as the default user and returns its reply.
    pub fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let client = redis::Client::open(self.url()).unwrap();
        let mut c = client.get_connection().unwrap();
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut c).unwrap()
    }

    /// A number from `INFO stats`.
    pub fn stat(&self, name: &str) -> u64 {
        let info: String = self.query(&["INFO", "stats"]);
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in INFO stats"))
            .trim()
            .parse()
            .unwrap()
    }

    pub fn publish_raw(&self, payload: &str) {
        let client = redis::Client::open(self.url()).unwrap();
        let mut c = client.get_connection().unwrap();
        let _: i64 = redis::cmd("PUBLISH")
            .arg("seafile-notification")
            .arg(payload)
            .query(&mut c)
            .unwrap();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
