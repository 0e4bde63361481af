//! Real reverse proxies (nginx, Apache httpd, Caddy, HAProxy, as Debian ships them;
//! `.ci/deps` installs them) in front of a test server, for tests that need a proxy:
//! either one of the example configs in examples/proxy/, made runnable (the listen
//! address becomes a free loopback port, 127.0.0.1:8083 the test server), or an nginx
//! `server` block written by the test. Each runs in the foreground in its own process
//! group, stopped on drop. tests/proxies.rs checks the examples themselves through it,
//! with their idle timeouts cut short (`Setup::ExampleWithTimeout`).
#![allow(dead_code)]

use super::common::{DEADLINE, TempDir, free_port};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    NginxSeafile11,
    NginxCurrent,
    Apache,
    Caddy,
    Haproxy,
}

impl Kind {
    fn binary_name(self) -> &'static str {
        match self {
            Kind::NginxSeafile11 | Kind::NginxCurrent => "nginx",
            Kind::Apache => "apache2",
            Kind::Caddy => "caddy",
            Kind::Haproxy => "haproxy",
        }
    }

    pub fn example(self) -> &'static str {
        match self {
            Kind::NginxSeafile11 => "nginx-seafile11.conf",
            Kind::NginxCurrent => "nginx-current.conf",
            Kind::Apache => "apache.conf",
            Kind::Caddy => "Caddyfile",
            Kind::Haproxy => "haproxy.cfg",
        }
    }
}

/// The proxy binary, from PATH or the usual sbin directories; fails the test when missing.
pub fn find_binary(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs =
        std::env::split_paths(&path).chain(["/usr/sbin", "/usr/bin", "/sbin", "/usr/local/sbin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("`{name}` is not installed: run .ci/deps (it installs nginx, apache2, caddy and haproxy)");
}

/// Replaces every `from` with `to`; each must occur, so a changed example fails loudly.
fn substitute(name: &str, text: &str, pairs: &[(&str, String)]) -> String {
    let mut text = text.to_string();
    for (from, to) in pairs {
        assert!(text.contains(from), "{name} no longer contains `{from}`");
        text = text.replace(from, to);
    }
    text
}

/// What to run.
pub enum Setup<'a> {
    /// An example of examples/proxy.
    Example(Kind),
    /// An example with its idle (read) timeout cut to this many seconds, for tests of
    /// what that timeout does.
    ExampleWithTimeout(Kind, u64),
    /// An nginx `server` block; `{PORT}` becomes the listen port, `{UPSTREAM}` the server's
    /// address, `{DIR}` the proxy's directory (for certificates).
    Nginx(&'a str),
}

/// A running proxy; its process group is stopped on drop.
pub struct Proxy {
    child: Child,
    pub addr: SocketAddr,
    pub dir: TempDir,
}

impl Proxy {
    /// Starts `setup` on a free loopback port in front of `upstream`; `files` are written
    /// into the proxy's directory first (certificates).
    pub fn start(setup: &Setup, upstream: SocketAddr, files: &[(&str, &[u8])]) -> Proxy {
        let mut failures = Vec::new();
        // A port found free can be taken before the proxy binds it: try a few.
        for _ in 0..3 {
            let dir = TempDir::new();
            for (name, bytes) in files {
                std::fs::write(dir.path().join(name), bytes).unwrap();
            }
            let port = free_port();
            let mut cmd = command(setup, dir.path(), port, upstream);
            cmd.stdin(Stdio::null())
                .stdout(Stdio::from(
                    std::fs::File::create(dir.path().join("stdout.log")).unwrap(),
                ))
                .stderr(Stdio::from(
                    std::fs::File::create(dir.path().join("stderr.log")).unwrap(),
                ))
                .process_group(0);
            let child = cmd.spawn().expect("start the proxy");
            let mut proxy = Proxy {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                dir,
            };
            match proxy.wait_ready() {
                Ok(()) => return proxy,
                Err(why) => failures.push(format!("{why}\n{}", proxy.logs())),
            }
        }
        panic!("the proxy did not start:\n{}", failures.join("\n---\n"));
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!("exited with {status}"));
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("not listening on {} within {DEADLINE:?}", self.addr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every log file the proxy wrote, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            paths.sort();
            for p in paths.into_iter().filter(|p| p.extension().is_some_and(|e| e == "log")) {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                if !text.trim().is_empty() {
                    out.push_str(&format!("== {}\n{}\n", p.display(), text.trim_end()));
                }
            }
        }
        out
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // The whole group: nginx's workers must not outlive their master.
        let group = self.child.id() as i32;
        unsafe { libc::kill(-group, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        unsafe { libc::kill(-group, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn nginx_command(server: &str, dir: &Path) -> Command {
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
         events {{ worker_connections 256; }}\nhttp {{\naccess_log {d}/access.log;\n\
         client_body_temp_path {d}/client_body;\nproxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\nuwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n{server}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let mut cmd = Command::new(find_binary("nginx"));
    cmd.arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&path)
        .args(["-g", "daemon off;"]);
    cmd
}

fn command(setup: &Setup, dir: &Path, port: u16, upstream: SocketAddr) -> Command {
    let up = upstream.to_string();
    let (kind, timeout) = match setup {
        Setup::Nginx(block) => {
            let server = block
                .replace("{PORT}", &port.to_string())
                .replace("{UPSTREAM}", &up)
                .replace("{DIR}", &dir.display().to_string());
            return nginx_command(&server, dir);
        }
        Setup::Example(kind) => (*kind, None),
        Setup::ExampleWithTimeout(kind, secs) => (*kind, Some(*secs)),
    };
    let name = kind.example();
    let example_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/proxy").join(name);
    let example = std::fs::read_to_string(&example_path).unwrap();
    let d = dir.display();
    match kind {
        Kind::NginxSeafile11 | Kind::NginxCurrent => {
            let server = substitute(
                name,
                &example,
                &[
                    ("listen 80;", format!("listen 127.0.0.1:{port};")),
                    ("127.0.0.1:8083", up),
                    (
                        "proxy_read_timeout 60s;",
                        format!("proxy_read_timeout {}s;", timeout.unwrap_or(60)),
                    ),
                ],
            );
            nginx_command(&server, dir)
        }
        Kind::Apache => {
            let vhost = substitute(
                name,
                &example,
                &[
                    ("<VirtualHost *:80>", format!("<VirtualHost 127.0.0.1:{port}>")),
                    ("127.0.0.1:8083", up),
                ],
            );
            let modules = [
                "/usr/lib/apache2/modules",
                "/usr/lib64/httpd/modules",
                "/usr/libexec/apache2",
            ]
            .into_iter()
            .find(|m| Path::new(m).join("mod_proxy.so").is_file())
            .expect("apache2 is installed but mod_proxy.so was not found: run .ci/deps");
            let mut load = String::new();
            for (module, file) in [
                ("mpm_event_module", "mod_mpm_event.so"),
                ("authz_core_module", "mod_authz_core.so"),
                ("proxy_module", "mod_proxy.so"),
                ("proxy_http_module", "mod_proxy_http.so"),
                ("proxy_wstunnel_module", "mod_proxy_wstunnel.so"),
            ] {
                load.push_str(&format!("LoadModule {module} {modules}/{file}\n"));
            }
            // As root, Apache's children drop to an unprivileged user.
            let user = if unsafe { libc::geteuid() } == 0 {
                "User nobody\nGroup nogroup\n"
            } else {
                ""
            };
            // Apache's own default Timeout is 60 s, the idle timeout of a proxied websocket.
            let t = timeout.unwrap_or(60);
            let conf = format!(
                "ServerRoot {d}\nServerName 127.0.0.1\nListen 127.0.0.1:{port}\nPidFile {d}/apache.pid\n\
                 DefaultRuntimeDir {d}\nMutex file:{d} default\nErrorLog {d}/error.log\nLogLevel warn\nTimeout {t}\n\
                 {load}{user}\n{vhost}\n"
            );
            let path = dir.join("apache.conf");
            std::fs::write(&path, conf).unwrap();
            let mut cmd = Command::new(find_binary("apache2"));
            cmd.arg("-X").arg("-d").arg(dir).arg("-f").arg(&path);
            cmd
        }
        Kind::Caddy => {
            let site = substitute(
                name,
                &example,
                &[
                    (
                        "seafile.example.com {",
                        format!("http://127.0.0.1:{port} {{\n\tbind 127.0.0.1"),
                    ),
                    ("127.0.0.1:8083", up),
                    ("read_timeout 60s", format!("read_timeout {}s", timeout.unwrap_or(60))),
                    // "seahub": what no other handler takes gets 404 (Caddy's own answer
                    // to an unhandled request is an empty 200).
                    (
                        "# ... your existing seahub and /seafhttp handlers stay here ...",
                        "handle {\n\t\trespond 404\n\t}".to_string(),
                    ),
                ],
            );
            let conf = format!("{{\n\tadmin off\n\tauto_https off\n}}\n\n{site}");
            let path = dir.join("Caddyfile");
            std::fs::write(&path, conf).unwrap();
            let mut cmd = Command::new(find_binary("caddy"));
            cmd.arg("run")
                .arg("--config")
                .arg(&path)
                .args(["--adapter", "caddyfile"])
                .env("HOME", dir)
                .env("XDG_DATA_HOME", dir.join("data"))
                .env("XDG_CONFIG_HOME", dir.join("config"));
            cmd
        }
        Kind::Haproxy => {
            let conf = substitute(
                name,
                &example,
                &[
                    ("bind :80", format!("bind 127.0.0.1:{port}")),
                    ("127.0.0.1:8083", up),
                    (
                        "timeout tunnel  1h",
                        timeout.map_or("timeout tunnel  1h".to_string(), |t| format!("timeout tunnel  {t}s")),
                    ),
                    // "seahub" answers 404 at once, from HAProxy itself.
                    (
                        "server seahub 127.0.0.1:8000",
                        "http-request return status 404".to_string(),
                    ),
                ],
            );
            let path = dir.join("haproxy.cfg");
            std::fs::write(&path, conf).unwrap();
            let mut cmd = Command::new(find_binary("haproxy"));
            cmd.arg("-db").arg("-f").arg(&path);
            cmd
        }
    }
}
