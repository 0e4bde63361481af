//! Configuration tests: defaults, every source, every refusal.
use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::load(Some(("/c/seafile.conf", text)), &no_env)
}

#[test]
fn defaults_with_only_a_key() {
    let c = load("[notification]\njwt_private_key = k\n").unwrap();
    assert_eq!(c.host, "0.0.0.0");
    assert_eq!(c.port, 8083);
    assert_eq!(c.log_level, log::LevelFilter::Info);
    assert_eq!(c.jwt_private_key, b"k");
    assert_eq!(c.ping_interval, Duration::from_secs(1));
    assert_eq!(c.pong_timeout, Duration::from_secs(5));
}

#[test]
fn values_keep_comment_characters_quotes_and_backslashes() {
    let c = load("[notification]\njwt_private_key = a#b;c \"d\" e\\f\n").unwrap();
    assert_eq!(c.jwt_private_key, b"a#b;c \"d\" e\\f");
}

#[test]
fn environment_overrides_file_and_empty_counts_as_unset() {
    let env = |k: &str| match k {
        "JWT_PRIVATE_KEY" => Some("envkey".to_string()),
        "NOTIFICATION_SERVER_PORT" => Some("9000".to_string()),
        "NOTIFICATION_SERVER_HOST" => Some(String::new()),
        _ => None,
    };
    let text = "[notification]\nhost = 127.0.0.1\nport = 1\njwt_private_key = filekey\n";
    let c = Config::load(Some(("f", text)), &env).unwrap();
    assert_eq!(c.jwt_private_key, b"envkey");
    assert_eq!(c.port, 9000);
    assert_eq!(c.host, "127.0.0.1");
}

#[test]
fn environment_alone_is_enough() {
    let env = |k: &str| (k == "JWT_PRIVATE_KEY").then(|| "k".to_string());
    assert!(Config::load(None, &env).is_ok());
}

#[test]
fn errors_name_source_key_and_reason() {
    let e = load("[notification]\njwt_private_key=k\nport = eighty\n").unwrap_err();
    assert_eq!(
        e.0,
        "/c/seafile.conf [notification] port: \"eighty\" is not a port number (0-65535)"
    );
    let e = load("[notification]\njwt_private_key=k\nlog_level = loud\n").unwrap_err();
    assert!(
        e.0.starts_with("/c/seafile.conf [notification] log_level: \"loud\""),
        "{e}"
    );
    let e = load("[notification]\nport = 1\n").unwrap_err();
    assert!(
        e.0.starts_with("jwt_private_key: missing: set [notification] jwt_private_key in /c/seafile.conf"),
        "{e}"
    );
    let e = load("[notification]\njwt_private_key=k\nping_interval = 0\n").unwrap_err();
    assert!(e.0.contains("ping_interval"), "{e}");
    let e = load("[notification]\njwt_private_key=k\nmax_connections = -1\n").unwrap_err();
    assert!(e.0.contains("max_connections: \"-1\" is not a whole number"), "{e}");
    let env = |k: &str| (k == "NOTIFICATION_SERVER_PORT").then(|| "x".to_string());
    let e = Config::load(Some(("f", "[notification]\njwt_private_key=k\n")), &env).unwrap_err();
    assert!(
        e.0.starts_with("environment variable NOTIFICATION_SERVER_PORT: "),
        "{e}"
    );
}

#[test]
fn cross_key_rules() {
    let e = load("[notification]\njwt_private_key=k\nping_interval=5\npong_timeout=5\n").unwrap_err();
    assert!(e.0.starts_with("pong_timeout:"), "{e}");
    let e = load("[notification]\njwt_private_key=k\nmax_body_bytes=5000\nmax_unsent_bytes=4000\n").unwrap_err();
    assert!(e.0.starts_with("max_unsent_bytes:"), "{e}");
}

#[test]
fn levels_and_seconds() {
    assert_eq!(parse_level("WARNING").unwrap(), log::LevelFilter::Warn);
    assert_eq!(parse_level("fatal").unwrap(), log::LevelFilter::Error);
    assert_eq!(parse_seconds("0.25").unwrap(), Duration::from_millis(250));
    assert!(parse_seconds("nan").is_err());
    assert!(parse_seconds("-1").is_err());
}

#[test]
fn other_sections_and_unknown_keys_are_ignored() {
    let c = load("[database]\nport = x\n[notification]\njwt_private_key=k\nenabled = true\n").unwrap();
    assert_eq!(c.port, 8083);
}

#[test]
fn key_sources_in_order() {
    let reader = |p: &std::path::Path| match p.to_str() {
        Some("/k") => Ok("from-file\n".to_string()),
        Some("/creds/jwt_private_key") => Ok("from-credential".to_string()),
        Some("/empty") => Ok("\n".to_string()),
        _ => Err("no such file".to_string()),
    };
    let text = "[notification]\njwt_private_key = from-conf\njwt_private_key_file = /k\n";
    let c = Config::load_with(Some(("f", text)), &no_env, &reader).unwrap();
    assert_eq!(c.jwt_private_key, b"from-file");
    let env = |k: &str| (k == "JWT_PRIVATE_KEY").then(|| "from-env".to_string());
    let c = Config::load_with(Some(("f", text)), &env, &reader).unwrap();
    assert_eq!(c.jwt_private_key, b"from-env");
    let creds = |k: &str| (k == "CREDENTIALS_DIRECTORY").then(|| "/creds".to_string());
    let c = Config::load_with(Some(("f", "[notification]\njwt_private_key = c\n")), &creds, &reader).unwrap();
    assert_eq!(c.jwt_private_key, b"from-credential");
    let c = Config::load_with(None, &creds, &reader).unwrap();
    assert_eq!(c.jwt_private_key, b"from-credential");
    let e = Config::load_with(
        Some(("f", "[notification]\njwt_private_key_file = /nope\n")),
        &no_env,
        &reader,
    );
    assert_eq!(e.unwrap_err().0, "jwt_private_key_file: no such file");
    let e = Config::load_with(
        Some(("f", "[notification]\njwt_private_key_file = /empty\n")),
        &no_env,
        &reader,
    );
    assert!(e.unwrap_err().0.contains("is empty"));
}

#[test]
fn events_allow_networks() {
    let c = load("[notification]\njwt_private_key = k\nevents_allow = 127.0.0.1, 10.0.0.0/8, ::1, fd00::/8\n").unwrap();
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let allowed = |s: &str| c.events_allow.iter().any(|n| n.contains(ip(s)));
    assert!(allowed("127.0.0.1") && allowed("10.200.3.4") && allowed("::1") && allowed("fd12::1"));
    assert!(allowed("::ffff:10.1.2.3"), "IPv4-mapped addresses match IPv4 networks");
    assert!(!allowed("127.0.0.2") && !allowed("11.0.0.1") && !allowed("fe80::1"));
    assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
    let e = load("[notification]\njwt_private_key = k\nevents_allow = 10.0.0.0/33\n").unwrap_err();
    assert!(e.0.contains("events_allow"), "{e}");
}

#[test]
fn debug_never_shows_the_key() {
    let c = load("[notification]\njwt_private_key = s3cret\n").unwrap();
    assert!(!format!("{c:?}").contains("s3cret"));
}

#[test]
fn ipv6_listen_address() {
    let mut c = load("[notification]\njwt_private_key = k\nhost = ::1\n").unwrap();
    assert_eq!(c.listen_address(), "[::1]:8083");
    c.host = "127.0.0.1".into();
    assert_eq!(c.listen_address(), "127.0.0.1:8083");
}

#[test]
fn metrics_listen_takes_ip_literals_and_localhost_but_resolves_no_names() {
    let ok = |v: &str| {
        load(&format!("[notification]\njwt_private_key = k\nmetrics_listen = {v}\n")).map(|c| c.metrics_listen)
    };
    assert_eq!(ok("127.0.0.1:9383").unwrap().as_deref(), Some("127.0.0.1:9383"));
    assert_eq!(ok("[::1]:9383").unwrap().as_deref(), Some("[::1]:9383"));
    assert_eq!(ok("localhost:9383").unwrap().as_deref(), Some("127.0.0.1:9383"));
    for bad in [
        "metrics.example.com:9383",
        "127.0.0.1",
        "127.0.0.1:99999",
        "localhost:x",
        ":9383",
    ] {
        let e = ok(bad).unwrap_err();
        assert!(
            e.0.contains("metrics_listen") && e.0.contains("not resolved"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn a_reload_keeps_what_needs_a_restart_and_names_it() {
    let running = Config::default();
    let new = Config {
        port: 9999,
        metrics_listen: Some("127.0.0.1:9100".into()),
        max_connections: 7,
        ..Config::default()
    };
    assert_eq!(running.restart_needed(&new), ["host and port", "metrics_listen"]);
    let applied = running.reloaded(new);
    assert_eq!((applied.port, applied.metrics_listen.clone()), (running.port, None));
    assert_eq!(applied.max_connections, 7, "live keys apply");
    assert!(running.restart_needed(&running.clone()).is_empty());
}

#[test]
fn max_connections_derived_from_the_descriptor_limit_unless_set() {
    let mut c = load("[notification]\njwt_private_key = k\n").unwrap();
    assert!(!c.max_connections_explicit);
    let fit = c.fit_to_descriptors(Some(65_536));
    assert_eq!(c.max_connections, 65_536 - 64);
    assert!(!fit.is_warning());
    assert!(
        fit.to_string()
            .starts_with("max_connections 65472 (derived: open-file limit 65536"),
        "{fit}"
    );
    // A limit below the reserve still leaves a usable floor, with a warning.
    let fit = c.fit_to_descriptors(Some(20));
    assert_eq!(c.max_connections, MIN_DERIVED_CONNECTIONS);
    assert!(fit.is_warning());
    // Unknown limit: unchanged.
    let fit = c.fit_to_descriptors(None);
    assert_eq!(c.max_connections, MIN_DERIVED_CONNECTIONS);
    assert!(fit.is_warning());

    let mut c = load("[notification]\njwt_private_key = k\nmax_connections = 500\n").unwrap();
    assert!(c.max_connections_explicit);
    let fit = c.fit_to_descriptors(Some(1024));
    assert_eq!(c.max_connections, 500);
    assert!(!fit.is_warning());
    let fit = c.fit_to_descriptors(Some(256));
    assert_eq!(c.max_connections, 500, "an explicit setting wins");
    assert!(fit.is_warning(), "{fit}");
    assert!(fit.to_string().contains("raise LimitNOFILE"), "{fit}");

    let env = |k: &str| (k == "NOTIFICATION_SERVER_MAX_CONNECTIONS").then(|| "7".to_string());
    let mut c = Config::load(Some(("f", "[notification]\njwt_private_key = k\n")), &env).unwrap();
    c.fit_to_descriptors(Some(65_536));
    assert_eq!(c.max_connections, 7);
    assert_eq!(
        connections_for_descriptors(u64::MAX),
        usize::try_from(u64::MAX - 64).unwrap()
    );
}

#[test]
fn load_traced_says_where_each_setting_came_from() {
    let env = |k: &str| match k {
        "NOTIFICATION_SERVER_PORT" => Some("9000".to_string()),
        "NOTIFICATION_SERVER_HOST" => Some(String::new()),
        "CREDENTIALS_DIRECTORY" => Some("/run/creds".to_string()),
        _ => None,
    };
    let read = |p: &std::path::Path| {
        assert_eq!(p, std::path::Path::new("/run/creds/jwt_private_key"));
        Ok("from-credential\n".to_string())
    };
    let text = "[notification]\nhost = 127.0.0.1\nport = 1\njwt_private_key = from-file\n";
    let (c, sources) = Config::load_traced(Some(("/c/seafile.conf", text)), &env, &read).unwrap();
    assert_eq!((c.port, c.jwt_private_key.as_slice()), (9000, &b"from-credential"[..]));
    let source = |k: &str| sources.iter().find(|(key, _)| *key == k).map(|(_, s)| s.as_str());
    assert_eq!(source("host"), Some("/c/seafile.conf [notification] host"));
    assert_eq!(source("port"), Some("environment variable NOTIFICATION_SERVER_PORT"));
    assert_eq!(
        source("jwt_private_key"),
        Some("systemd credential \"/run/creds/jwt_private_key\"")
    );
    assert_eq!(source("log_level"), None, "a default has no source");
    assert_eq!(sources.iter().filter(|(k, _)| *k == "jwt_private_key").count(), 1);
}
