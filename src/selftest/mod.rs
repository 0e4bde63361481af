//! `--self-test [PUBLIC_URL]`: checks a whole installation end to end, on the server box,
//! with the server running, and says for each failure what to fix.
//!
//! It reads the configuration exactly as the server does (main hands over what the
//! shared loader built, with where each setting came from), then checks in order:
//! the configuration and the key; the local server (`/ping`, a signed event on
//! `/events` as seaf-server posts it); the public path through the reverse proxy
//! (`/notification/ping`, the websocket upgrade, that nothing under the prefix reaches
//! `/events`); end to end (subscribe through the proxy with a client token for a random
//! library, post an event for it locally, time its arrival); that the websocket stays
//! up; the backends (group database, Redis bus); and the box (open files, memory, clock).
//!
//! Nothing a real client sees: the library id is random, and an event for it reaches
//! only the self-test's own subscription. Each check is one [`report::Check`].
//!
//! A blocking command-line tool, not part of the server's loop: see [`client`].

pub mod client;
mod host;
mod local;
mod public;
pub mod report;

use crate::config::{Config, Sources};
use crate::groups::Backend;
use client::{Tls, Url};
use report::{Check, Report};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long the public websocket must stay open by default, and with `--long` (past
/// nginx's default `proxy_read_timeout` of 60 s).
pub const STAY_DEFAULT: Duration = Duration::from_secs(5);
pub const STAY_LONG: Duration = Duration::from_secs(75);

/// The most an event may take from the local `/events` to the public websocket.
pub const ROUND_TRIP_LIMIT: Duration = Duration::from_secs(2);

/// The configuration as the server loaded it.
pub struct Loaded {
    pub config_dir: PathBuf,
    pub config: Config,
    pub sources: Sources,
    pub backend: Option<Backend>,
}

/// The command line's self-test options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub url: Option<String>,
    pub json: bool,
    pub long: bool,
    pub ca_file: Option<PathBuf>,
    pub insecure: bool,
}

/// What every check may use.
pub(crate) struct Ctx<'a> {
    pub loaded: &'a Loaded,
    /// The server's own address, on loopback when it listens on any address.
    pub local: Option<SocketAddr>,
    pub tls: Tls,
    /// The random library id of this run.
    pub repo: String,
}

impl Ctx<'_> {
    pub fn key(&self) -> &[u8] {
        &self.loaded.config.jwt_private_key
    }
}

/// Runs every check, prints the result, and says whether nothing failed.
pub fn run(loaded: &Loaded, options: &Options) -> bool {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let report = run_checks(loaded, options, &env, &mut |check| {
        if !options.json {
            print!("{}", check.text());
        }
    });
    if options.json {
        print!("{}", report.json());
    } else {
        println!("{}", report.summary());
    }
    !report.failed()
}

/// When the configuration does not load, the self-test can check nothing else: prints
/// that one failure (as text or JSON) and returns false.
pub fn config_failed(error: &str, options: &Options) -> bool {
    let mut report = Report::default();
    report.add(Check::fail(
        "config",
        error,
        "Correct the setting named above (--check-config shows the same error); the server cannot start with it either",
    ));
    if options.json {
        print!("{}", report.json());
    } else {
        print!("{}", report.checks.iter().map(Check::text).collect::<String>());
        println!("{}", report.summary());
    }
    false
}

/// The checks, in order; `show` sees each as soon as it is done (a slow proxy should
/// not leave the admin looking at nothing).
fn run_checks(
    loaded: &Loaded,
    options: &Options,
    env: &dyn Fn(&str) -> Option<String>,
    show: &mut dyn FnMut(&Check),
) -> Report {
    let mut report = Report::default();
    let mut add = |report: &mut Report, check: Check| {
        show(&check);
        report.add(check)
    };
    for check in local::configuration(loaded, env) {
        add(&mut report, check);
    }
    let tls = match Tls::new(options.ca_file.as_deref(), options.insecure) {
        Ok(t) => t,
        Err(e) => {
            add(
                &mut report,
                Check::fail("tls", e, "give --ca-file a PEM file holding your CA's certificate"),
            );
            return report;
        }
    };
    let ctx = Ctx {
        loaded,
        local: local_address(&loaded.config),
        tls,
        repo: random_repo_id(),
    };
    let server_up = add(&mut report, local::ping(&ctx)) != report::Status::Fail;
    let events_ok = if server_up {
        add(&mut report, local::event(&ctx)) == report::Status::Pass
    } else {
        report.skip("local-events", "the server does not answer");
        false
    };
    let public = match public_url(options.url.as_deref(), &loaded.config_dir, env) {
        Ok(Some((url, from))) => {
            let seen = format!("{} ({from}); https trust: {}", url.base(), ctx.tls.roots);
            let seen = if url.tls {
                seen
            } else {
                format!("{} ({from})", url.base())
            };
            add(&mut report, Check::pass("public-url", seen));
            Some(url)
        }
        Ok(None) => {
            add(
                &mut report,
                Check::warn(
                    "public-url",
                    "no public URL given or found (SEAFILE_SERVER_PROTOCOL and SEAFILE_SERVER_HOSTNAME, \
                     SERVICE_URL in seahub_settings.py or ccnet.conf): the path through the proxy is not checked",
                    "run it again with the URL clients use: --self-test https://seafile.example.com",
                ),
            );
            None
        }
        Err(e) => {
            add(
                &mut report,
                Check::fail(
                    "public-url",
                    e,
                    "give the URL as https://host[:port] (the one clients use)",
                ),
            );
            None
        }
    };
    let mut skew = None;
    let mut ws_base = None;
    if let Some(url) = &public {
        let (check, proxy_skew) = public::ping(&ctx, url);
        skew = proxy_skew;
        let reachable = add(&mut report, check) != report::Status::Fail;
        if add(&mut report, public::upgrade(&ctx, url)) == report::Status::Pass {
            ws_base = Some(url.clone());
        }
        if reachable {
            add(&mut report, public::events_hidden(&ctx, url));
        } else {
            report.skip("public-events", "the public URL does not reach the server");
        }
    } else if server_up {
        // Without a public URL, end to end still proves the key and the delivery.
        ws_base = ctx.local.map(Url::local);
    }
    match ws_base {
        Some(base) if server_up && events_ok => {
            for check in public::end_to_end(&ctx, &base, public.is_some(), stay(options)) {
                add(&mut report, check);
            }
        }
        _ => {
            let why = if !server_up {
                "the server does not answer"
            } else if !events_ok {
                "the local event was refused"
            } else {
                "the public websocket did not open"
            };
            report.skip("end-to-end", why);
            report.skip("stays-up", why);
        }
    }
    if let Some(check) = host::group_database(&ctx) {
        add(&mut report, check);
    }
    if let Some(check) = host::redis_bus(&ctx, server_up) {
        add(&mut report, check);
    }
    for check in host::the_box(&ctx, skew) {
        add(&mut report, check);
    }
    if skew.is_none() {
        report.skip("clock", "no Date header from a proxy to compare with");
    }
    report
}

/// How long the stays-up check holds the websocket.
fn stay(options: &Options) -> Duration {
    if options.long { STAY_LONG } else { STAY_DEFAULT }
}

/// The configured address, with loopback for "any address" (what `--ping` asks).
pub fn local_address(config: &Config) -> Option<SocketAddr> {
    let mut addr = config.listen_address().to_socket_addrs().ok()?.next()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Some(addr)
}

/// The public URL: the command line's, else Seafile 12/13's environment, else Seafile
/// 11's `SERVICE_URL` (seahub_settings.py, then ccnet.conf, both in the config dir).
/// Returns the URL and where it came from.
fn public_url(
    given: Option<&str>,
    dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<(Url, String)>, String> {
    if let Some(text) = given {
        return Url::parse(text).map(|u| Some((u, "from the command line".into())));
    }
    if let Some(host) = env("SEAFILE_SERVER_HOSTNAME") {
        let scheme = env("SEAFILE_SERVER_PROTOCOL").unwrap_or_else(|| "http".into());
        let text = format!("{scheme}://{host}");
        return Url::parse(&text).map(|u| Some((u, "from SEAFILE_SERVER_PROTOCOL and SEAFILE_SERVER_HOSTNAME".into())));
    }
    let seahub = dir.join("seahub_settings.py");
    if let Some(url) = std::fs::read_to_string(&seahub)
        .ok()
        .and_then(|t| seahub_service_url(&t))
    {
        return Url::parse(&url).map(|u| Some((u, format!("SERVICE_URL in {}", seahub.display()))));
    }
    let ccnet = dir.join("ccnet.conf");
    if let Ok(text) = std::fs::read_to_string(&ccnet)
        && let Ok(Some(section)) = crate::config::ini_section("ccnet.conf", &text, "General")
        && let Some((_, url)) = section.iter().rev().find(|(k, _)| k == "SERVICE_URL")
        && !url.is_empty()
    {
        return Url::parse(url).map(|u| Some((u, format!("SERVICE_URL in {}", ccnet.display()))));
    }
    Ok(None)
}

/// `SERVICE_URL = "https://..."` (or with single quotes) in seahub_settings.py; the last
/// assignment wins, as in Python.
fn seahub_service_url(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| {
            let rest = line
                .trim_start()
                .strip_prefix("SERVICE_URL")?
                .trim_start()
                .strip_prefix('=')?;
            let rest = rest.trim();
            let quote = rest.chars().next().filter(|c| *c == '"' || *c == '\'')?;
            let inner = rest.get(1..)?;
            Some(inner.get(..inner.find(quote)?)?.to_string())
        })
        .next_back()
}

/// A random library id in Seafile's format (a UUID), so that no real client is
/// subscribed to it.
pub fn random_repo_id() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut bytes);
    }
    // Without /dev/urandom, the clock still makes a collision with a real id hopeless.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    for (b, n) in bytes.iter_mut().zip(nanos.to_le_bytes()) {
        *b ^= n;
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        hex.get(0..8).unwrap_or_default(),
        hex.get(8..12).unwrap_or_default(),
        hex.get(12..16).unwrap_or_default(),
        hex.get(16..20).unwrap_or_default(),
        hex.get(20..32).unwrap_or_default()
    )
}

/// The `type` and `content.repo_id` of a server message, when it has both.
pub fn message_repo(text: &str) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let kind = v.get("type")?.as_str()?.to_string();
    let repo = v.get("content")?.get("repo_id")?.as_str()?.to_string();
    Some((kind, repo))
}

/// A duration for the output: "0.4 ms", "12 ms", "1.25 s".
fn millis(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.2} s", ms / 1000.0)
    }
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Signs claims with the shared key, HS256, as seaf-server, the fileserver and seahub do.
pub fn sign(key: &[u8], claims: &serde_json::Value) -> Result<String, String> {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(key),
    )
    .map_err(|e| format!("cannot sign a token: {e}"))
}

/// A sender token as seaf-server makes it: `exp` five minutes ahead, nothing else.
pub fn event_token(key: &[u8], lifetime: i64) -> Result<String, String> {
    sign(key, &serde_json::json!({"exp": unix_now() + lifetime}))
}

/// A client token for one library, as seaf-server's `/repo/<id>/jwt-token` makes it.
pub fn client_token(key: &[u8], repo: &str, user: &str) -> Result<String, String> {
    sign(
        key,
        &serde_json::json!({"repo_id": repo, "username": user, "exp": unix_now() + 3600}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_url_from_seahub_settings() {
        let text = "# SERVICE_URL = 'old'\nSERVICE_URL = \"http://a\"\nFILE_SERVER_ROOT = 'x'\nSERVICE_URL='https://b.example.com/' # new\n";
        assert_eq!(seahub_service_url(text).as_deref(), Some("https://b.example.com/"));
        assert_eq!(seahub_service_url("SERVICE_URL = os.environ['X']\n"), None);
    }

    #[test]
    fn public_url_sources_in_order() {
        let dir = std::env::temp_dir().join(format!("ns-selftest-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let none = |_: &str| None;
        assert_eq!(public_url(None, &dir, &none).unwrap(), None);
        std::fs::write(
            dir.join("ccnet.conf"),
            "[General]\nSERVICE_URL = http://c.example.com:8000\n",
        )
        .unwrap();
        let (u, from) = public_url(None, &dir, &none).unwrap().unwrap();
        assert_eq!(
            (u.base(), from.contains("ccnet.conf")),
            ("http://c.example.com:8000".into(), true)
        );
        std::fs::write(
            dir.join("seahub_settings.py"),
            "SERVICE_URL = 'https://s.example.com'\n",
        )
        .unwrap();
        assert_eq!(
            public_url(None, &dir, &none).unwrap().unwrap().0.base(),
            "https://s.example.com"
        );
        let env = |k: &str| match k {
            "SEAFILE_SERVER_HOSTNAME" => Some("e.example.com".to_string()),
            "SEAFILE_SERVER_PROTOCOL" => Some("https".to_string()),
            _ => None,
        };
        assert_eq!(
            public_url(None, &dir, &env).unwrap().unwrap().0.base(),
            "https://e.example.com"
        );
        let given = public_url(Some("http://g:81/notification"), &dir, &env)
            .unwrap()
            .unwrap();
        assert_eq!(given.0.base(), "http://g:81");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn long_outlasts_nginxs_default_read_timeout() {
        let long = Options {
            long: true,
            ..Options::default()
        };
        assert!(stay(&long) > Duration::from_secs(60));
        assert_eq!(stay(&Options::default()), STAY_DEFAULT);
    }

    #[test]
    fn random_ids_are_uuids_and_differ() {
        let a = random_repo_id();
        assert_eq!(a.len(), 36);
        assert_eq!(a.matches('-').count(), 4);
        assert_ne!(a, random_repo_id());
    }
}
