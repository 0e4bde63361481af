//! Configuration: every setting, its default, where it comes from, and its validation.
//!
//! Sources, lowest priority first:
//! 1. the defaults in [`Config::default`];
//! 2. `DIR/seafile.conf`, section `[notification]` (Seafile 10/11 put `host`, `port`,
//!    `log_level` and `jwt_private_key` there; this server reads its own limits there too);
//! 3. the environment: `JWT_PRIVATE_KEY`, and `NOTIFICATION_SERVER_<KEY>` for every other key
//!    (so `NOTIFICATION_SERVER_HOST`, `_PORT` and `_LOG_LEVEL` are exactly the official
//!    Seafile 12+ variables). An empty variable counts as unset, as compose files often
//!    write `VAR=`.
//!
//! The module is pure: it is handed the file text and an environment lookup function, so
//! tests need neither files nor a real environment. Every error names the source, the key
//! and the reason in one line, because that line is all an admin sees of a failed start.

use std::fmt;
use std::time::Duration;

/// Every setting of the server, validated.
#[derive(Clone, PartialEq)]
pub struct Config {
    /// Address to listen on (`host`, default `0.0.0.0`).
    pub host: String,
    /// Port to listen on (`port`, default 8083; 0 picks a free port, for tests).
    pub port: u16,
    /// Log level (`log_level`, default `info`).
    pub log_level: log::LevelFilter,
    /// The HMAC key shared with seaf-server and seahub (`jwt_private_key` /
    /// `JWT_PRIVATE_KEY`). The raw bytes are the key: no base64, no quote stripping,
    /// because that is what seaf-server signs with. Never logged.
    pub jwt_private_key: Vec<u8>,
    /// Interval between server pings on an idle websocket (`ping_interval`, seconds).
    pub ping_interval: Duration,
    /// A websocket from which nothing at all was heard for this long is closed
    /// (`pong_timeout`, seconds).
    pub pong_timeout: Duration,
    /// Most simultaneous connections, HTTP and websocket together (`max_connections`).
    /// At the cap the server stops accepting until one closes. Unless set, derived from
    /// the open-file limit by [`Config::fit_to_descriptors`]; 10,000 until then.
    pub max_connections: usize,
    /// Whether `max_connections` was set in seafile.conf or the environment (an explicit
    /// setting wins over the value derived from the open-file limit).
    pub max_connections_explicit: bool,
    /// Largest HTTP request head, request line and headers (`max_head_bytes`); over it: 431.
    pub max_head_bytes: usize,
    /// Largest `/events` body (`max_body_bytes`); over it: 413.
    pub max_body_bytes: usize,
    /// Time a client has to send a complete HTTP request head (`http_head_timeout`, s).
    pub http_head_timeout: Duration,
    /// Time an idle keep-alive HTTP connection is kept open (`http_idle_timeout`, s).
    pub http_idle_timeout: Duration,
    /// Largest inbound websocket message and frame (`max_message_bytes`); over it the
    /// connection is closed with 1009.
    pub max_message_bytes: usize,
    /// Most libraries one websocket may subscribe to (`max_repos_per_connection`).
    pub max_repos_per_connection: usize,
    /// Most output bytes one connection may have queued and unsent (`max_unsent_bytes`);
    /// a client that falls further behind is closed (slow consumer).
    pub max_unsent_bytes: usize,
    /// Most memory held for unsent websocket output across all connections
    /// (`max_output_bytes`): shared event frames, queue entries, control frames. At the
    /// budget the server stops reading `/events` (senders wait) until output drains.
    pub max_output_bytes: usize,
    /// Output that stays unsent for this long closes the connection (`write_timeout`, s).
    pub write_timeout: Duration,
    /// Time given to the peer to answer our Close frame (`close_timeout`, s).
    pub close_timeout: Duration,
    /// Most inbound websocket messages handled per connection per wake-up
    /// (`max_messages_per_wakeup`), so one chatty client cannot starve the others.
    pub max_messages_per_wakeup: usize,
    /// Initial per-connection websocket read buffer (`ws_read_buffer_bytes`). Small, since
    /// clients send little; it grows for a larger message and is the main per-idle-
    /// connection cost after the socket itself.
    pub ws_read_buffer_bytes: usize,
    /// Time a shutdown (SIGTERM/SIGINT) may take to drain before the process exits
    /// (`shutdown_timeout`, s).
    pub shutdown_timeout: Duration,
    /// SQLite group database for installs without MySQL (`groupmgr_db`); default
    /// `<config dir>/../ccnet/GroupMgr/groupmgr.db` when that file exists.
    pub groupmgr_db: Option<std::path::PathBuf>,
    /// How long a group's member list is reused before it is looked up again
    /// (`group_cache_ttl`, s): the most a membership change can go unnoticed.
    pub group_cache_ttl: Duration,
    /// Connect and query timeout of one group lookup attempt (`group_lookup_timeout`, s).
    pub group_lookup_timeout: Duration,
    /// Address of the Prometheus metrics listener (`metrics_listen`, e.g.
    /// `127.0.0.1:9383`); off when unset. Keep it off the public proxy.
    pub metrics_listen: Option<String>,
    /// Redis to share events with other instances through (`redis_url`,
    /// `redis://[:password@]host[:port][/db]`); off when unset.
    pub redis_url: Option<String>,
    /// The pub/sub channel the instances share (`redis_channel`).
    pub redis_channel: String,
    /// A file holding the key (`jwt_private_key_file`), e.g. a systemd credential; read at
    /// start and on every reload. `JWT_PRIVATE_KEY` still wins over it.
    pub jwt_private_key_file: Option<std::path::PathBuf>,
    /// Networks allowed to post `/events` (`events_allow`, comma-separated CIDRs such as
    /// `127.0.0.1/32, 10.0.0.0/8`); empty means any address (the official behaviour).
    pub events_allow: Vec<Cidr>,
}

/// An IPv4 or IPv6 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `addr/prefix` or a bare address (a single host).
    pub fn parse(text: &str) -> Option<Cidr> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a.parse().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (text.parse().ok()?, None),
        };
        let max = match addr {
            std::net::IpAddr::V4(_) => 32,
            std::net::IpAddr::V6(_) => 128,
        };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    /// Whether `ip` is inside this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        let ip = match ip {
            V6(v6) => v6.to_ipv4_mapped().map(V4).unwrap_or(V6(v6)),
            v4 => v4,
        };
        match (self.addr, ip) {
            (V4(net), V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (V6(net), V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Debug for Config {
    // Hand-written so that the key can never reach a log line through `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("log_level", &self.log_level)
            .field("jwt_private_key", &"<redacted>")
            .field("ping_interval", &self.ping_interval)
            .field("pong_timeout", &self.pong_timeout)
            .field("max_connections", &self.max_connections)
            .field("redis_url", &self.redis_url.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: "0.0.0.0".into(),
            port: 8083,
            log_level: log::LevelFilter::Info,
            jwt_private_key: Vec::new(),
            ping_interval: Duration::from_secs(1),
            pong_timeout: Duration::from_secs(5),
            max_connections: 10_000,
            max_connections_explicit: false,
            max_head_bytes: 8 * 1024,
            max_body_bytes: 64 * 1024,
            http_head_timeout: Duration::from_secs(10),
            http_idle_timeout: Duration::from_secs(60),
            max_message_bytes: 256 * 1024,
            max_repos_per_connection: 1000,
            max_unsent_bytes: 256 * 1024,
            max_output_bytes: 64 * 1024 * 1024,
            write_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(2),
            max_messages_per_wakeup: 64,
            ws_read_buffer_bytes: 256,
            shutdown_timeout: Duration::from_secs(5),
            groupmgr_db: None,
            group_cache_ttl: Duration::from_secs(10),
            group_lookup_timeout: Duration::from_secs(3),
            metrics_listen: None,
            redis_url: None,
            redis_channel: "seafile-notification".into(),
            jwt_private_key_file: None,
            events_allow: Vec::new(),
        }
    }
}

/// Where each setting that is not a default came from: `(key, source)`, such as
/// `("port", "environment variable NOTIFICATION_SERVER_PORT")`.
pub type Sources = Vec<(&'static str, String)>;

/// A configuration error: one line naming where, which key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The section of seafile.conf this server reads.
pub const SECTION: &str = "notification";

/// How a key's value is parsed.
enum Kind {
    Text,
    Port,
    Level,
    Key,
    Seconds,
    Path,
    /// A socket address, `host:port`.
    Addr,
    /// A Redis URL (may hold a password: never shown).
    Url,
    /// A file name.
    File,
    /// A comma-separated list of networks.
    Networks,
    /// A count with its smallest allowed value.
    Count(usize),
}

/// Every key, in README order: (file key, environment variable, kind).
const KEYS: &[(&str, &str, Kind)] = &[
    ("host", "NOTIFICATION_SERVER_HOST", Kind::Text),
    ("port", "NOTIFICATION_SERVER_PORT", Kind::Port),
    ("log_level", "NOTIFICATION_SERVER_LOG_LEVEL", Kind::Level),
    ("jwt_private_key", "JWT_PRIVATE_KEY", Kind::Key),
    ("ping_interval", "NOTIFICATION_SERVER_PING_INTERVAL", Kind::Seconds),
    ("pong_timeout", "NOTIFICATION_SERVER_PONG_TIMEOUT", Kind::Seconds),
    ("max_connections", "NOTIFICATION_SERVER_MAX_CONNECTIONS", Kind::Count(1)),
    ("max_head_bytes", "NOTIFICATION_SERVER_MAX_HEAD_BYTES", Kind::Count(256)),
    ("max_body_bytes", "NOTIFICATION_SERVER_MAX_BODY_BYTES", Kind::Count(64)),
    (
        "http_head_timeout",
        "NOTIFICATION_SERVER_HTTP_HEAD_TIMEOUT",
        Kind::Seconds,
    ),
    (
        "http_idle_timeout",
        "NOTIFICATION_SERVER_HTTP_IDLE_TIMEOUT",
        Kind::Seconds,
    ),
    (
        "max_message_bytes",
        "NOTIFICATION_SERVER_MAX_MESSAGE_BYTES",
        Kind::Count(128),
    ),
    (
        "max_repos_per_connection",
        "NOTIFICATION_SERVER_MAX_REPOS_PER_CONNECTION",
        Kind::Count(1),
    ),
    (
        "max_unsent_bytes",
        "NOTIFICATION_SERVER_MAX_UNSENT_BYTES",
        Kind::Count(1024),
    ),
    (
        "max_output_bytes",
        "NOTIFICATION_SERVER_MAX_OUTPUT_BYTES",
        Kind::Count(64 * 1024),
    ),
    ("write_timeout", "NOTIFICATION_SERVER_WRITE_TIMEOUT", Kind::Seconds),
    ("close_timeout", "NOTIFICATION_SERVER_CLOSE_TIMEOUT", Kind::Seconds),
    (
        "max_messages_per_wakeup",
        "NOTIFICATION_SERVER_MAX_MESSAGES_PER_WAKEUP",
        Kind::Count(1),
    ),
    (
        "ws_read_buffer_bytes",
        "NOTIFICATION_SERVER_WS_READ_BUFFER_BYTES",
        Kind::Count(16),
    ),
    (
        "shutdown_timeout",
        "NOTIFICATION_SERVER_SHUTDOWN_TIMEOUT",
        Kind::Seconds,
    ),
    ("groupmgr_db", "NOTIFICATION_SERVER_GROUPMGR_DB", Kind::Path),
    ("group_cache_ttl", "NOTIFICATION_SERVER_GROUP_CACHE_TTL", Kind::Seconds),
    (
        "group_lookup_timeout",
        "NOTIFICATION_SERVER_GROUP_LOOKUP_TIMEOUT",
        Kind::Seconds,
    ),
    ("metrics_listen", "NOTIFICATION_SERVER_METRICS_LISTEN", Kind::Addr),
    ("redis_url", "NOTIFICATION_SERVER_REDIS_URL", Kind::Url),
    ("redis_channel", "NOTIFICATION_SERVER_REDIS_CHANNEL", Kind::Text),
    (
        "jwt_private_key_file",
        "NOTIFICATION_SERVER_JWT_PRIVATE_KEY_FILE",
        Kind::File,
    ),
    ("events_allow", "NOTIFICATION_SERVER_EVENTS_ALLOW", Kind::Networks),
];

/// Every `[notification]` key this server understands, with its environment variable.
pub fn keys() -> impl Iterator<Item = (&'static str, &'static str)> {
    KEYS.iter().map(|(k, e, _)| (*k, *e))
}

impl Config {
    /// Builds the configuration from the text of seafile.conf (if there is one; `file_name`
    /// is used in messages) and an environment lookup.
    pub fn load(file: Option<(&str, &str)>, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        Config::load_with(file, env, &|path| {
            // Debug-quoted, as in main's reader: a path may hold a newline, and an error is one line.
            Err(format!("{path:?}: key files are not read here"))
        })
    }

    /// Like [`Config::load`], with a reader for key files: `JWT_PRIVATE_KEY` wins, then
    /// `jwt_private_key_file`, then a systemd credential `$CREDENTIALS_DIRECTORY/jwt_private_key`,
    /// then `[notification] jwt_private_key`. A key file's trailing newline is dropped.
    pub fn load_with(
        file: Option<(&str, &str)>,
        env: &dyn Fn(&str) -> Option<String>,
        read_file: &dyn Fn(&std::path::Path) -> Result<String, String>,
    ) -> Result<Config, ConfigError> {
        Config::load_traced(file, env, read_file).map(|(config, _)| config)
    }

    /// Like [`Config::load_with`], and says where each setting that is not a default came
    /// from, as `(key, source)` in README order (for `--self-test`).
    pub fn load_traced(
        file: Option<(&str, &str)>,
        env: &dyn Fn(&str) -> Option<String>,
        read_file: &dyn Fn(&std::path::Path) -> Result<String, String>,
    ) -> Result<(Config, Sources), ConfigError> {
        let mut config = Config::default();
        let mut sources = Sources::new();
        let section = match file {
            Some((name, text)) => Some((name, parse_section(name, text)?)),
            None => None,
        };
        for (key, var, kind) in KEYS {
            let from_env = env(var).filter(|v| !v.is_empty());
            let (source, value) = match (from_env, &section) {
                (Some(v), _) => (format!("environment variable {var}"), v),
                (None, Some((name, entries))) => match lookup(entries, key) {
                    Some(v) => (format!("{name} [{SECTION}] {key}"), v.to_string()),
                    None => continue,
                },
                (None, None) => continue,
            };
            config
                .set(key, kind, &value)
                .map_err(|reason| ConfigError(format!("{source}: {reason}")))?;
            sources.push((*key, source));
        }
        if env("JWT_PRIVATE_KEY").is_none_or(|k| k.is_empty()) {
            let strip = |k: String| k.trim_end_matches(['\r', '\n']).as_bytes().to_vec();
            if let Some(path) = &config.jwt_private_key_file {
                let key = read_file(path).map_err(|e| ConfigError(format!("jwt_private_key_file: {e}")))?;
                config.jwt_private_key = strip(key);
                if config.jwt_private_key.is_empty() {
                    return Err(ConfigError(format!("jwt_private_key_file: {path:?} is empty")));
                }
                sources.retain(|(k, _)| *k != "jwt_private_key");
                sources.push(("jwt_private_key", format!("key file {path:?}")));
            } else if let Some(dir) = env("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty()) {
                let path = std::path::Path::new(&dir).join("jwt_private_key");
                if let Ok(key) = read_file(&path) {
                    config.jwt_private_key = strip(key);
                    sources.retain(|(k, _)| *k != "jwt_private_key");
                    sources.push(("jwt_private_key", format!("systemd credential {path:?}")));
                }
            }
        }
        config.validate(file.map(|(name, _)| name))?;
        Ok((config, sources))
    }

    fn set(&mut self, key: &str, kind: &Kind, value: &str) -> Result<(), String> {
        match kind {
            Kind::Text => {
                if value.is_empty() {
                    return Err("must not be empty".into());
                }
                match key {
                    "host" => self.host = value.to_string(),
                    "redis_channel" => self.redis_channel = value.to_string(),
                    _ => return Err("internal: unknown text key".into()),
                }
            }
            Kind::File => self.jwt_private_key_file = Some(value.into()),
            Kind::Networks => {
                let mut nets = Vec::new();
                for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    nets.push(
                        Cidr::parse(part).ok_or_else(|| format!("{part:?} is not a network such as 10.0.0.0/8"))?,
                    );
                }
                self.events_allow = nets;
            }
            Kind::Url => {
                if !(value.starts_with("redis://")
                    || value.starts_with("redis+unix://")
                    || value.starts_with("unix://"))
                {
                    return Err("is not a redis:// URL (redis://[:password@]host[:port][/db])".into());
                }
                self.redis_url = Some(value.to_string());
            }
            Kind::Port => {
                self.port = value
                    .parse::<u16>()
                    .map_err(|_| format!("{value:?} is not a port number (0-65535)"))?;
            }
            Kind::Level => self.log_level = parse_level(value)?,
            Kind::Key => self.jwt_private_key = value.as_bytes().to_vec(),
            Kind::Path => self.groupmgr_db = Some(value.into()),
            Kind::Addr => self.metrics_listen = Some(parse_listen_addr(value)?.to_string()),
            Kind::Seconds => {
                let d = parse_seconds(value)?;
                match key {
                    "ping_interval" => self.ping_interval = d,
                    "pong_timeout" => self.pong_timeout = d,
                    "http_head_timeout" => self.http_head_timeout = d,
                    "http_idle_timeout" => self.http_idle_timeout = d,
                    "write_timeout" => self.write_timeout = d,
                    "close_timeout" => self.close_timeout = d,
                    "shutdown_timeout" => self.shutdown_timeout = d,
                    "group_cache_ttl" => self.group_cache_ttl = d,
                    "group_lookup_timeout" => self.group_lookup_timeout = d,
                    _ => return Err("internal: unknown duration key".into()),
                }
            }
            Kind::Count(min) => {
                let n = value
                    .parse::<usize>()
                    .map_err(|_| format!("{value:?} is not a whole number"))?;
                if n < *min {
                    return Err(format!("{n} is below the minimum of {min}"));
                }
                match key {
                    "max_connections" => {
                        self.max_connections = n;
                        self.max_connections_explicit = true;
                    }
                    "max_head_bytes" => self.max_head_bytes = n,
                    "max_body_bytes" => self.max_body_bytes = n,
                    "max_message_bytes" => self.max_message_bytes = n,
                    "max_repos_per_connection" => self.max_repos_per_connection = n,
                    "max_unsent_bytes" => self.max_unsent_bytes = n,
                    "max_output_bytes" => self.max_output_bytes = n,
                    "max_messages_per_wakeup" => self.max_messages_per_wakeup = n,
                    "ws_read_buffer_bytes" => self.ws_read_buffer_bytes = n,
                    _ => return Err("internal: unknown count key".into()),
                }
            }
        }
        Ok(())
    }

    /// Checks the rules that tie keys together.
    fn validate(&self, file: Option<&str>) -> Result<(), ConfigError> {
        if self.jwt_private_key.is_empty() {
            let hint = match file {
                Some(name) => {
                    format!("set [{SECTION}] jwt_private_key in {name} or the JWT_PRIVATE_KEY environment variable")
                }
                None => "no seafile.conf found; set the JWT_PRIVATE_KEY environment variable".to_string(),
            };
            return Err(ConfigError(format!("jwt_private_key: missing: {hint}")));
        }
        if self.pong_timeout <= self.ping_interval {
            return Err(ConfigError(format!(
                "pong_timeout: {:?} must be longer than ping_interval ({:?}), or every client would time out",
                self.pong_timeout, self.ping_interval
            )));
        }
        // An event is one frame of at most its body plus a small envelope; a client must be
        // able to hold at least one, or every subscriber would be evicted by one big event.
        let largest_frame = self.max_body_bytes + 64;
        if self.max_unsent_bytes < largest_frame {
            return Err(ConfigError(format!(
                "max_unsent_bytes: {} must be at least max_body_bytes + 64 ({largest_frame}), so one event always fits",
                self.max_unsent_bytes
            )));
        }
        Ok(())
    }

    /// What a reload from `self` to `new` cannot change while running: the settings that
    /// bound sockets and threads at start. Each is named as the reload warning names it.
    pub fn restart_needed(&self, new: &Config) -> Vec<&'static str> {
        let mut needed = Vec::new();
        if new.host != self.host || new.port != self.port {
            needed.push("host and port");
        }
        if new.redis_url != self.redis_url || new.redis_channel != self.redis_channel {
            needed.push("Redis bus");
        }
        if new.metrics_listen != self.metrics_listen {
            needed.push("metrics_listen");
        }
        needed
    }

    /// The configuration a reload to `new` runs with: `new`, except what
    /// [`Config::restart_needed`] names, which keeps its running value until a restart.
    pub fn reloaded(&self, new: Config) -> Config {
        Config {
            host: self.host.clone(),
            port: self.port,
            metrics_listen: self.metrics_listen.clone(),
            redis_url: self.redis_url.clone(),
            redis_channel: self.redis_channel.clone(),
            ..new
        }
    }

    /// The address to bind, as `host:port` (IPv6 literals get brackets).
    pub fn listen_address(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Parses the INI text and returns the `[notification]` entries in file order.
///
/// Quotes and backslashes are kept as they are and `#` / `;` inside a value are part of it:
/// seaf-server reads the same file with GLib's key-file parser, which does neither, and the
/// key must be byte-identical on both sides.
fn parse_section(name: &str, text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    Ok(ini_section(name, text, SECTION)?.unwrap_or_default())
}

/// The entries of `[section]` in INI `text`, if it exists. Quotes and backslashes are
/// kept and `#` / `;` inside a value are part of it, as GLib's key-file parser (which
/// seaf-server uses on the same files) reads them. Shared by seafile.conf and ccnet.conf.
pub fn ini_section(name: &str, text: &str, section: &str) -> Result<Option<Vec<(String, String)>>, ConfigError> {
    let options = ini::ParseOption {
        enabled_quote: false,
        enabled_escape: false,
        ..Default::default()
    };
    let ini =
        ini::Ini::load_from_str_opt(text, options).map_err(|e| ConfigError(format!("{name}: cannot parse: {e}")))?;
    Ok(ini.section(Some(section)).map(|props| {
        props
            .iter()
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    }))
}

fn lookup<'a>(entries: &'a [(String, String)], key: &str) -> Option<&'a str> {
    // The last occurrence wins, as in GLib's parser.
    entries.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Parses a level name as the official server (logrus) does, case-insensitively.
pub fn parse_level(value: &str) -> Result<log::LevelFilter, String> {
    use log::LevelFilter::*;
    Ok(match value.to_ascii_lowercase().as_str() {
        "trace" => Trace,
        "debug" => Debug,
        "info" => Info,
        "warn" | "warning" => Warn,
        "error" | "fatal" | "panic" => Error,
        _ => {
            return Err(format!(
                "{value:?} is not a log level (trace, debug, info, warn, error)"
            ));
        }
    })
}

/// A listen address: an IP literal and port, or `localhost:PORT`. Names are not resolved:
/// validation also runs on SIGHUP, inside the event loop, where a DNS lookup could block.
fn parse_listen_addr(value: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(addr) = value.parse() {
        return Ok(addr);
    }
    if let Some(port) = value.strip_prefix("localhost:")
        && let Ok(port) = port.parse::<u16>()
    {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    Err(format!(
        "{value:?} is not an IP address and port such as 127.0.0.1:9383 (host names are not resolved)"
    ))
}

/// Parses a positive number of seconds, fractions allowed (`0.5`), at most one day.
fn parse_seconds(value: &str) -> Result<Duration, String> {
    let secs: f64 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number of seconds"))?;
    if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) {
        return Err(format!("{value:?} must be more than 0 and at most 86400 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

mod descriptors;
mod key;
#[cfg(test)]
mod tests;

pub use descriptors::{DescriptorFit, MIN_DERIVED_CONNECTIONS, RESERVED_DESCRIPTORS, connections_for_descriptors};
pub use key::{GENERATE_HINT, KeyWeakness, MIN_KEY_BYTES, key_weakness};
