//! `notification-server`: command line, configuration, logging, bind, run, exit code.

use notification_server::config::{self, Config, DescriptorFit, Sources};
use notification_server::groups::{self, Backend};
use notification_server::logging::{self, Target};
use notification_server::selftest::{self, client::Tls, client::Url};
use notification_server::server::Server;
use notification_server::watch::{self, Watch};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "\
Usage: notification-server -c CONFIG_DIR [-l LOG_FILE] [--check-config | --ping]
       notification-server -c CONFIG_DIR --self-test [PUBLIC_URL] [--json] [--long]
                           [--ca-file FILE] [--insecure]
       notification-server -c CONFIG_DIR --watch LIBRARY_ID [URL] [--ca-file FILE] [--insecure]

Seafile notification server (drop-in replacement for the official one).

Options:
  -c DIR          Seafile's central config directory; DIR/seafile.conf [notification]
                  is read when present. Required, and it must exist.
  -l FILE         Log file (default DIR/notification-server.log); '-' logs to stderr.
                  SEAFILE_LOG_TO_STDOUT=true logs to stdout instead.
  --check-config  Validate the configuration, print the result and exit.
  --ping          Ask the server this configuration describes for /ping (on loopback
                  when it listens on any address); exit 0 on a 200, else 1. A health
                  check for containers without a shell or curl.
  --self-test [PUBLIC_URL]
                  Check the installation end to end, with the server running: the
                  configuration and key, the local server, the path through the reverse
                  proxy at PUBLIC_URL (default: SEAFILE_SERVER_PROTOCOL and _HOSTNAME, or
                  SERVICE_URL in DIR/seahub_settings.py or DIR/ccnet.conf), a signed
                  event end to end, the group database, the Redis bus, open files, memory
                  and clock. One line per check, PASS, WARN or FAIL with a fix; exit 0
                  when nothing failed, else 1.
  --json          With --self-test: print the result as one JSON document.
  --long          With --self-test: keep the test websocket open 75 s (past nginx's
                  default 60 s read timeout) instead of 5 s.
  --watch LIBRARY_ID [URL]
                  Subscribe to one library (locally, or through URL/notification) with a
                  token signed by the key and print each of its events as a JSON line
                  with its arrival time, until interrupted (exit 0).
  --ca-file FILE  With --self-test or --watch: also trust the CA certificates in FILE (PEM).
  --insecure      With --self-test or --watch: do not check the https certificate.
  -h, --help      Show this help.
  -V, --version   Show the version.

Environment (overrides seafile.conf): JWT_PRIVATE_KEY, NOTIFICATION_SERVER_HOST,
NOTIFICATION_SERVER_PORT, NOTIFICATION_SERVER_LOG_LEVEL, SEAFILE_LOG_TO_STDOUT, and
NOTIFICATION_SERVER_<KEY> for every other [notification] key (see README).
";

/// Listen backlog: std uses 128, too few for thousands of clients reconnecting at once
/// after a restart (the kernel caps it at net.core.somaxconn).
const LISTEN_BACKLOG: i32 = 4096;

struct Args {
    config_dir: PathBuf,
    log_file: Option<String>,
    check_only: bool,
    ping: bool,
    self_test: bool,
    /// `--self-test`'s options (`--ca-file` and `--insecure` also serve `--watch`).
    test: selftest::Options,
    /// `--watch LIBRARY_ID [URL]`.
    watch: Option<(String, Option<String>)>,
}

/// Parses flags the way Go's `flag` package accepts them: `-c DIR`, `-c=DIR`, `--c DIR`.
fn parse_args(args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut config_dir = None;
    let mut log_file = None;
    let mut check_only = false;
    let mut ping = false;
    let mut self_test = false;
    let mut test = selftest::Options::default();
    let mut watch = None;
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with('-') => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let name = name.strip_prefix("--").map(|n| format!("-{n}")).unwrap_or(name);
        // An optional value: inline, or the next argument unless it is a flag.
        let optional = |args: &mut std::iter::Peekable<_>| match inline.clone() {
            Some(v) => Some(v),
            None => args.next_if(|a: &String| !a.starts_with('-')),
        };
        let mut value = |flag: &str| match inline.clone().or_else(|| args.next()) {
            Some(v) => Ok(v),
            None => Err(format!("flag needs an argument: {flag}")),
        };
        match name.as_str() {
            "-h" | "-help" => {
                print!("{USAGE}");
                return Ok(None);
            }
            "-V" | "-version" => {
                println!("notification-server {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            "-c" => config_dir = Some(PathBuf::from(value("-c")?)),
            "-l" => log_file = Some(value("-l")?),
            "-check-config" => check_only = true,
            "-ping" => ping = true,
            "-self-test" => {
                self_test = true;
                test.url = optional(&mut args);
            }
            "-json" => test.json = true,
            "-long" => test.long = true,
            "-ca-file" => test.ca_file = Some(PathBuf::from(value("--ca-file")?)),
            "-insecure" => test.insecure = true,
            "-watch" => {
                let repo = value("--watch")?;
                watch = Some((repo, args.next_if(|a| !a.starts_with('-'))));
            }
            // The URL after other options: `--self-test --json https://...`.
            url if !url.starts_with('-') && self_test && test.url.is_none() => test.url = Some(arg.clone()),
            url if !url.starts_with('-') && matches!(watch, Some((_, None))) => {
                if let Some((_, slot)) = &mut watch {
                    *slot = Some(url.to_string());
                }
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    let config_dir = config_dir.ok_or_else(|| format!("config directory must be specified with -c\n\n{USAGE}"))?;
    if (test.json || test.long) && !self_test {
        return Err("--json and --long go with --self-test".into());
    }
    if (test.ca_file.is_some() || test.insecure) && !self_test && watch.is_none() {
        return Err("--ca-file and --insecure go with --self-test or --watch".into());
    }
    if [self_test, watch.is_some(), ping, check_only]
        .iter()
        .filter(|m| **m)
        .count()
        > 1
    {
        return Err("--self-test, --watch, --ping and --check-config exclude each other".into());
    }
    Ok(Some(Args {
        config_dir,
        log_file,
        check_only,
        ping,
        self_test,
        test,
        watch,
    }))
}

/// Reads a config file if it exists; `Ok(None)` when it does not.
fn read_optional(path: &Path) -> Result<Option<String>, String> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: cannot read: {e}", path.display())),
    }
}

/// Reads `DIR/seafile.conf` and `DIR/ccnet.conf` if they exist and builds the
/// configuration and the group database settings, and says where each setting came from.
fn load_config(dir: &Path) -> Result<(Config, Option<Backend>, Sources), String> {
    if !dir.is_dir() {
        return Err(format!("config directory {} doesn't exist", dir.display()));
    }
    let env = |k: &str| std::env::var(k).ok();
    let path = dir.join("seafile.conf");
    let text = read_optional(&path)?;
    let name = path.display().to_string();
    // The path is Debug-quoted: it may come from an environment variable and hold a
    // newline, and a configuration error is one log line.
    let read_key = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{p:?}: cannot read: {e}"));
    let (config, sources) =
        Config::load_traced(text.as_deref().map(|t| (name.as_str(), t)), &env, &read_key).map_err(|e| e.to_string())?;
    let ccnet_path = dir.join("ccnet.conf");
    let ccnet = read_optional(&ccnet_path)?;
    let ccnet_name = ccnet_path.display().to_string();
    let backend = groups::choose_backend(
        ccnet.as_deref().map(|t| (ccnet_name.as_str(), t)),
        &env,
        config.groupmgr_db.as_deref(),
        &groups::default_sqlite_path(dir),
    )
    .map_err(|e| e.to_string())?;
    Ok((config, backend, sources))
}

/// Raises the soft open-file limit to the hard one, as every Go program does since Go
/// 1.19 (the `syscall` package's init, whatever the `go` line of go.mod says), the
/// official server among them: under systemd's default (1024 soft, 524288 hard) it
/// effectively has the hard limit, and a drop-in replacement must hold as many clients.
/// The soft limit of 1024 exists for programs that use `select()`; this one uses epoll
/// and starts no other programs. Returns `(from, to)` when it raised the limit.
///
/// The `64` calls because `rlim_t` is 32 bits on armhf (and `RLIM_INFINITY` there is
/// `u32::MAX`); `rlimit64` is the same call with 64-bit fields on every target.
fn raise_nofile_limit() -> std::io::Result<Option<(u64, u64)>> {
    let mut lim = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on a local struct.
    unsafe {
        if libc::getrlimit64(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur >= lim.rlim_max {
            return Ok(None);
        }
        let from = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit64(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Some((from, lim.rlim_max)))
    }
}

/// The soft open-file limit in effect: what the connection cap is derived from.
fn nofile_limit() -> Option<u64> {
    notification_server::process_stats::nofile_limits().map(|(soft, _)| soft)
}

/// [`load_config`], with `max_connections` fitted to the open-file limit. Used at start
/// and on every reload, so a reload keeps the derived cap (and picks up a limit raised
/// meanwhile with `prlimit`).
fn load_fitted(dir: &Path) -> Result<(Config, Option<Backend>, DescriptorFit), String> {
    let (mut config, groups, _) = load_config(dir)?;
    let fit = config.fit_to_descriptors(nofile_limit());
    Ok((config, groups, fit))
}

/// `--self-test`: the configuration as the server would load it, checked end to end.
fn self_test(args: &Args) -> ExitCode {
    let (config, backend, sources) = match load_config(&args.config_dir) {
        Ok(c) => c,
        Err(e) => {
            selftest::config_failed(&e, &args.test);
            return ExitCode::FAILURE;
        }
    };
    let loaded = selftest::Loaded {
        config_dir: args.config_dir.clone(),
        config,
        sources,
        backend,
    };
    if selftest::run(&loaded, &args.test) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `--watch LIBRARY_ID [URL]`: the test client, locally or through the public URL.
fn watch(config: &Config, repo: &str, url: Option<&str>, args: &Args) -> ExitCode {
    let options = &args.test;
    let fail = |e: String| {
        eprintln!("notification-server: {e}");
        ExitCode::FAILURE
    };
    let tls = match Tls::new(options.ca_file.as_deref(), options.insecure) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let (url, path) = match url {
        Some(text) => match Url::parse(text) {
            Ok(u) => (u, "/notification"),
            Err(e) => return fail(e),
        },
        None => match selftest::local_address(config) {
            Some(addr) => (Url::local(addr), "/"),
            None => return fail(format!("cannot resolve {}", config.listen_address())),
        },
    };
    let w = Watch {
        repo: repo.to_string(),
        url,
        path,
        key: config.jwt_private_key.clone(),
        tls,
    };
    ExitCode::from(watch::run(&w))
}

fn log_target(args: &Args) -> Result<Target, String> {
    if std::env::var("SEAFILE_LOG_TO_STDOUT").is_ok_and(|v| v == "true") {
        return Ok(Target::Stdout);
    }
    match args.log_file.as_deref() {
        Some("-") => Ok(Target::Stderr),
        Some(file) => std::path::absolute(file)
            .map(Target::File)
            .map_err(|e| format!("log file {file}: {e}")),
        None => Ok(Target::File(args.config_dir.join("notification-server.log"))),
    }
}

/// How long `--ping` waits to connect, and then for the answer.
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// `--ping`: one `GET /ping` to the configured address (its loopback twin when the
/// server listens on any address), so a container image needs no shell tools for its
/// health check. Exit 0 only on a 200.
fn ping(config: &Config) -> ExitCode {
    use std::io::{Read, Write};
    let Some(addr) = selftest::local_address(config) else {
        eprintln!("notification-server: cannot resolve {}", config.listen_address());
        return ExitCode::FAILURE;
    };
    // The status line is all we look at: 12 bytes, "HTTP/1.1 200".
    let mut status = [0u8; 12];
    let result = std::net::TcpStream::connect_timeout(&addr, PING_TIMEOUT).and_then(|mut s| {
        s.set_read_timeout(Some(PING_TIMEOUT))?;
        s.set_write_timeout(Some(PING_TIMEOUT))?;
        s.write_all(b"GET /ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        s.read_exact(&mut status)
    });
    match result {
        Ok(()) if status.ends_with(b" 200") => {
            println!("pong from {addr}");
            ExitCode::SUCCESS
        }
        Ok(()) => {
            eprintln!(
                "notification-server: {addr}/ping answered {:?}",
                String::from_utf8_lossy(&status)
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("notification-server: no answer to /ping from {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("notification-server: {e}");
            return ExitCode::from(2);
        }
    };
    if args.self_test {
        return self_test(&args);
    }
    let raised = raise_nofile_limit();
    let (config, groups, fit) = match load_fitted(&args.config_dir) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("notification-server: config error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.ping {
        return ping(&config);
    }
    if let Some((repo, url)) = &args.watch {
        return watch(&config, repo, url.as_deref(), &args);
    }
    if args.check_only {
        println!("configuration OK: would listen on {}", config.listen_address());
        return ExitCode::SUCCESS;
    }
    let target = match log_target(&args) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("notification-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Bind before the log file takes over stderr, so a busy port is reported where the
    // admin is looking.
    let listener = match std::net::TcpListener::bind(config.listen_address()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("notification-server: cannot listen on {}: {e}", config.listen_address());
            return ExitCode::FAILURE;
        }
    };
    // SAFETY: listen() on a socket we own; a second call only changes the backlog.
    unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) };
    if let Err(e) = logging::init(&target, config.log_level) {
        eprintln!("notification-server: {e}");
        return ExitCode::FAILURE;
    }
    match raised {
        Ok(Some((from, to))) => log::info!("raised the open-file limit from {from} to the hard limit {to}"),
        Ok(None) => {}
        Err(e) => log::warn!("cannot raise the open-file limit to the hard limit: {e}"),
    }
    if let Some(weakness) = config::key_weakness(&config.jwt_private_key) {
        log::warn!("{weakness}; {}", config::GENERATE_HINT);
    }
    if fit.is_warning() {
        log::warn!("{fit}");
    } else {
        log::info!("{fit}");
    }
    let metrics_listen = config.metrics_listen.clone();
    let mut server = match Server::new(config, listener, groups) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(addr) = metrics_listen {
        server = match std::net::TcpListener::bind(&addr).and_then(|l| server.with_metrics(l)) {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot listen for metrics on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        log::info!("metrics on http://{addr}/metrics");
    }
    let dir = args.config_dir.clone();
    let server = server.with_reloader(Box::new(move || load_fitted(&dir).map(|(c, g, _)| (c, g))));
    log::info!("notification server started, listening on {}", server.local_addr());
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("event loop failed: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Args>, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn go_flag_spellings() {
        for args in [
            &["-c", "/d", "-l", "x"][..],
            &["-c=/d", "-l=x"],
            &["--c", "/d", "--l=x"],
        ] {
            let a = parse(args).unwrap().unwrap();
            assert_eq!(a.config_dir, PathBuf::from("/d"));
            assert_eq!(a.log_file.as_deref(), Some("x"));
        }
        assert!(parse(&["-l", "x"]).is_err());
        assert!(parse(&["-c"]).is_err());
        assert!(parse(&["-c", "/d", "--bogus"]).is_err());
        assert!(parse(&["-c", "/d", "--check-config"]).unwrap().unwrap().check_only);
        assert!(parse(&["-c", "/d", "--ping"]).unwrap().unwrap().ping);
    }

    #[test]
    fn self_test_and_watch_flags() {
        let a = parse(&["-c", "/d", "--self-test"]).unwrap().unwrap();
        assert!(a.self_test);
        assert_eq!(a.test.url, None);
        let a = parse(&["-c", "/d", "--self-test", "https://h", "--json", "--long"])
            .unwrap()
            .unwrap();
        assert_eq!(a.test.url.as_deref(), Some("https://h"));
        assert!(a.test.json && a.test.long);
        // The URL may come after the other options, as an admin types them.
        let a = parse(&["-c", "/d", "--self-test", "--json", "https://h"])
            .unwrap()
            .unwrap();
        assert!(a.self_test && a.test.json);
        assert_eq!(a.test.url.as_deref(), Some("https://h"));
        let a = parse(&["-c", "/d", "--watch", "r1", "--insecure", "https://h"])
            .unwrap()
            .unwrap();
        assert_eq!(a.watch, Some(("r1".to_string(), Some("https://h".to_string()))));
        assert!(parse(&["-c", "/d", "--self-test", "https://h", "https://i"]).is_err());
        let a = parse(&["-c", "/d", "--self-test", "--insecure", "--ca-file=/ca.pem"])
            .unwrap()
            .unwrap();
        assert_eq!((a.test.url, a.test.insecure), (None, true));
        assert_eq!(a.test.ca_file, Some(PathBuf::from("/ca.pem")));
        let a = parse(&["-c", "/d", "--self-test=http://x:81"]).unwrap().unwrap();
        assert_eq!(a.test.url.as_deref(), Some("http://x:81"));
        let a = parse(&["-c", "/d", "--watch", "r1", "https://h", "--insecure"])
            .unwrap()
            .unwrap();
        assert_eq!(a.watch, Some(("r1".to_string(), Some("https://h".to_string()))));
        assert_eq!(
            parse(&["-c", "/d", "--watch", "r1"]).unwrap().unwrap().watch.unwrap().1,
            None
        );
        assert!(parse(&["-c", "/d", "--watch"]).is_err());
        assert!(parse(&["-c", "/d", "--json"]).is_err());
        assert!(parse(&["-c", "/d", "--insecure"]).is_err());
        assert!(parse(&["-c", "/d", "--self-test", "--ping"]).is_err());
    }
}
