//! Group membership lookups, off the event loop (PROTOCOL.md sections 5.4, 9, 11.4).
//!
//! A group-scoped `folder-perm-changed` event goes to the subscribers whose user is a
//! member of the group, so the server must ask Seafile's ccnet database
//! `SELECT user_name FROM GroupUser WHERE group_id = ?`. Two backends:
//! - MySQL / MariaDB, configured by `SEAFILE_MYSQL_DB_*` (Seafile 12+) or
//!   `ccnet.conf [Database]` (Seafile 10/11);
//! - SQLite, `<ccnet dir>/GroupMgr/groupmgr.db` opened read-only, which is what binary
//!   installs without MySQL (most Raspberry Pi and NAS boxes) use.
//!
//! Queries block, so they run on one helper thread: the loop sends a group id down a
//! bounded channel and goes on; the helper answers through another channel and wakes the
//! loop with a `mio::Waker`. A failed query is retried briefly (reconnecting first); if it
//! still fails the answer is an error, and the server drops the event rather than
//! broadcasting it. This module owns the settings, the backends and the thread, not the
//! loop's bookkeeping of held events (that is in `gate.rs`).

use crate::config::ConfigError;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::Duration;

/// Lookups that may wait for the helper at once; more are refused (and their events
/// dropped) rather than queued without bound.
pub const MAX_PENDING_LOOKUPS: usize = 1024;

/// Attempts per lookup, and the pause before each retry.
const RETRY_DELAYS: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(400)];

/// Where group membership comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum Backend {
    Mysql(MysqlSettings),
    Sqlite(PathBuf),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Backend {
    /// A one-line description for logs, without the password.
    pub fn describe(&self) -> String {
        match self {
            Backend::Mysql(m) => match &m.unix_socket {
                Some(sock) => format!("MySQL database {} as {} via {sock}", m.db, m.user),
                None => format!("MySQL database {} as {} at {}:{}", m.db, m.user, m.host, m.port),
            },
            Backend::Sqlite(path) => format!("SQLite database {}", path.display()),
        }
    }
}

/// MySQL connection settings.
#[derive(Clone, PartialEq, Eq)]
pub struct MysqlSettings {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub db: String,
    pub unix_socket: Option<String>,
    pub use_ssl: bool,
}

/// Decides the backend, in this order:
/// 1. `SEAFILE_MYSQL_DB_HOST` set: MySQL from the `SEAFILE_MYSQL_DB_*` variables (user and
///    password required; database `SEAFILE_MYSQL_DB_CCNET_DB_NAME`, default `ccnet_db`;
///    port `SEAFILE_MYSQL_DB_PORT`, default 3306);
/// 2. `ccnet.conf` with a `[Database]` section: `ENGINE=mysql` (the default there) reads
///    `HOST`, `PORT`, `USER`, `PASSWD`, `DB`, `UNIX_SOCKET`, `USE_SSL`; `ENGINE=sqlite`
///    means SQLite; another engine is an error;
/// 3. otherwise SQLite at `groupmgr_db` (the `[notification]` key), else at
///    `default_sqlite` (`<config dir>/../ccnet/GroupMgr/groupmgr.db`) if that file exists;
/// 4. otherwise none: group-scoped events cannot be delivered (`Ok(None)`).
pub fn choose_backend(
    ccnet_conf: Option<(&str, &str)>,
    env: &dyn Fn(&str) -> Option<String>,
    groupmgr_db: Option<&Path>,
    default_sqlite: &Path,
) -> Result<Option<Backend>, ConfigError> {
    let var = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(host) = var("SEAFILE_MYSQL_DB_HOST") {
        let need = |k: &str| {
            var(k).ok_or_else(|| {
                ConfigError(format!(
                    "environment variable {k}: missing (needed with SEAFILE_MYSQL_DB_HOST)"
                ))
            })
        };
        let port = match var("SEAFILE_MYSQL_DB_PORT") {
            Some(p) => p.parse().map_err(|_| {
                ConfigError(format!(
                    "environment variable SEAFILE_MYSQL_DB_PORT: {p:?} is not a port number"
                ))
            })?,
            None => 3306,
        };
        return Ok(Some(Backend::Mysql(MysqlSettings {
            host,
            port,
            user: need("SEAFILE_MYSQL_DB_USER")?,
            password: need("SEAFILE_MYSQL_DB_PASSWORD")?,
            db: var("SEAFILE_MYSQL_DB_CCNET_DB_NAME").unwrap_or_else(|| "ccnet_db".into()),
            unix_socket: None,
            use_ssl: false,
        })));
    }
    if let Some((name, text)) = ccnet_conf
        && let Some(section) = crate::config::ini_section(name, text, "Database")?
    {
        let get = |k: &str| {
            section
                .iter()
                .rev()
                .find(|(key, _)| key.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.clone())
        };
        let engine = get("ENGINE").unwrap_or_else(|| "mysql".into());
        if engine.eq_ignore_ascii_case("sqlite") {
            // Fall through to the SQLite file.
        } else if engine.eq_ignore_ascii_case("mysql") {
            let need = |k: &str| {
                get(k).ok_or_else(|| ConfigError(format!("{name} [Database] {k}: missing (needed for ENGINE=mysql)")))
            };
            let port = match get("PORT") {
                Some(p) => p
                    .parse()
                    .map_err(|_| ConfigError(format!("{name} [Database] PORT: {p:?} is not a port number")))?,
                None => 3306,
            };
            let use_ssl = match get("USE_SSL").as_deref().map(str::to_ascii_lowercase).as_deref() {
                None | Some("false") | Some("0") | Some("no") => false,
                Some("true") | Some("1") | Some("yes") => true,
                Some(other) => {
                    return Err(ConfigError(format!(
                        "{name} [Database] USE_SSL: {other:?} is not true or false"
                    )));
                }
            };
            let unix_socket = get("UNIX_SOCKET").filter(|s| !s.is_empty());
            return Ok(Some(Backend::Mysql(MysqlSettings {
                host: if unix_socket.is_some() {
                    get("HOST").unwrap_or_else(|| "localhost".into())
                } else {
                    need("HOST")?
                },
                port,
                user: need("USER")?,
                password: get("PASSWD").unwrap_or_default(),
                db: need("DB")?,
                unix_socket,
                use_ssl,
            })));
        } else {
            return Err(ConfigError(format!(
                "{name} [Database] ENGINE: {engine:?} is not supported for group lookups (mysql or sqlite)"
            )));
        }
    }
    if let Some(path) = groupmgr_db {
        return Ok(Some(Backend::Sqlite(path.to_path_buf())));
    }
    if default_sqlite.is_file() {
        return Ok(Some(Backend::Sqlite(default_sqlite.to_path_buf())));
    }
    Ok(None)
}

/// The default SQLite location for binary installs: the `ccnet` directory beside the
/// config directory (`/opt/seafile/conf` -> `/opt/seafile/ccnet/GroupMgr/groupmgr.db`).
pub fn default_sqlite_path(config_dir: &Path) -> PathBuf {
    let base = std::path::absolute(config_dir).unwrap_or_else(|_| config_dir.to_path_buf());
    base.parent()
        .unwrap_or(&base)
        .join("ccnet")
        .join("GroupMgr")
        .join("groupmgr.db")
}

/// One answer from the helper.
#[derive(Debug)]
pub struct Reply {
    pub group: i64,
    /// The members' user names, or why the lookup failed after its retries.
    pub result: Result<Vec<String>, String>,
}

/// The loop's end of the helper thread.
pub struct Lookups {
    requests: SyncSender<i64>,
    replies: Receiver<Reply>,
}

impl Lookups {
    /// Starts the helper thread. It connects once at start and logs one warning if the
    /// database is unreachable; the server starts regardless.
    pub fn spawn(backend: Backend, timeout: Duration, waker: Arc<mio::Waker>) -> std::io::Result<Lookups> {
        let (requests, request_rx) = mpsc::sync_channel::<i64>(MAX_PENDING_LOOKUPS);
        let (reply_tx, replies) = mpsc::channel::<Reply>();
        std::thread::Builder::new().name("group-lookups".into()).spawn(move || {
            let mut db = Db::new(backend, timeout);
            match db.connect() {
                Ok(()) => log::info!("group lookups use the {}", db.backend.describe()),
                Err(e) => log::warn!(
                    "group lookups: cannot reach the {} ({e}); group-scoped events will be dropped until it answers",
                    db.backend.describe()
                ),
            }
            while let Ok(group) = request_rx.recv() {
                let result = db.members_with_retries(group);
                if reply_tx.send(Reply { group, result }).is_err() {
                    return;
                }
                // Failure to wake means the loop is gone: nothing left to do.
                if waker.wake().is_err() {
                    return;
                }
            }
        })?;
        Ok(Lookups { requests, replies })
    }

    /// Asks for a group's members. False when the helper is saturated or gone; the caller
    /// then treats the lookup as failed.
    pub fn request(&self, group: i64) -> bool {
        match self.requests.try_send(group) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        }
    }

    /// The answers that are ready, without blocking.
    pub fn replies(&self) -> impl Iterator<Item = Reply> + '_ {
        self.replies.try_iter()
    }
}

/// One group query on a fresh connection, without retries: the member count of
/// `group`. For `--self-test`, which asks whether the database answers at all.
pub fn query_once(backend: &Backend, group: i64, timeout: Duration) -> Result<usize, String> {
    Db::new(backend.clone(), timeout).members(group).map(|m| m.len())
}

/// A connection to the backend, opened lazily and reopened after a failure.
struct Db {
    backend: Backend,
    timeout: Duration,
    mysql: Option<mysql::Conn>,
    sqlite: Option<rusqlite::Connection>,
}

const QUERY: &str = "SELECT user_name FROM GroupUser WHERE group_id = ?";

impl Db {
    fn new(backend: Backend, timeout: Duration) -> Db {
        Db {
            backend,
            timeout,
            mysql: None,
            sqlite: None,
        }
    }

    fn connect(&mut self) -> Result<(), String> {
        match &self.backend {
            Backend::Mysql(m) => {
                if self.mysql.is_none() {
                    let mut opts = mysql::OptsBuilder::new()
                        .user(Some(&m.user))
                        .pass(Some(&m.password))
                        .db_name(Some(&m.db))
                        .tcp_connect_timeout(Some(self.timeout))
                        .read_timeout(Some(self.timeout))
                        .write_timeout(Some(self.timeout))
                        .prefer_socket(false);
                    opts = match &m.unix_socket {
                        Some(sock) => opts.socket(Some(sock)),
                        None => opts.ip_or_hostname(Some(&m.host)).tcp_port(m.port),
                    };
                    if m.use_ssl {
                        opts = opts.ssl_opts(Some(mysql::SslOpts::default()));
                    }
                    self.mysql = Some(mysql::Conn::new(opts).map_err(|e| e.to_string())?);
                }
            }
            Backend::Sqlite(path) => {
                if self.sqlite.is_none() {
                    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
                    let conn = rusqlite::Connection::open_with_flags(path, flags).map_err(|e| e.to_string())?;
                    // seaf-server writes this file; wait for its locks instead of failing.
                    conn.busy_timeout(self.timeout).map_err(|e| e.to_string())?;
                    // Opening is lazy in SQLite: make a missing table or file show now.
                    conn.prepare(QUERY).map_err(|e| e.to_string())?;
                    self.sqlite = Some(conn);
                }
            }
        }
        Ok(())
    }

    fn members(&mut self, group: i64) -> Result<Vec<String>, String> {
        self.connect()?;
        let result = if let Some(conn) = self.mysql.as_mut() {
            use mysql::prelude::Queryable;
            conn.exec::<String, _, _>(QUERY, (group,)).map_err(|e| e.to_string())
        } else if let Some(conn) = self.sqlite.as_ref() {
            conn.prepare_cached(QUERY)
                .and_then(|mut st| st.query_map([group], |row| row.get::<_, String>(0))?.collect())
                .map_err(|e| e.to_string())
        } else {
            Err("no database connection".to_string())
        };
        if result.is_err() {
            // Start over with a fresh connection next time.
            self.mysql = None;
            self.sqlite = None;
        }
        result
    }

    fn members_with_retries(&mut self, group: i64) -> Result<Vec<String>, String> {
        let mut last = match self.members(group) {
            Ok(m) => return Ok(m),
            Err(e) => e,
        };
        for delay in RETRY_DELAYS {
            log::debug!("group lookup for group {group} failed ({last}); retrying");
            std::thread::sleep(delay);
            match self.members(group) {
                Ok(m) => return Ok(m),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    fn none(_: &str) -> Option<String> {
        None
    }

    const NOWHERE: &str = "/nonexistent/groupmgr.db";

    #[test]
    fn seafile_12_environment_wins() {
        let env = env_of(&[
            ("SEAFILE_MYSQL_DB_HOST", "db"),
            ("SEAFILE_MYSQL_DB_USER", "seafile"),
            ("SEAFILE_MYSQL_DB_PASSWORD", "pw"),
            ("SEAFILE_MYSQL_DB_PORT", "3307"),
        ]);
        let conf = ("ccnet.conf", "[Database]\nENGINE=mysql\nHOST=other\nUSER=u\nDB=d\n");
        let b = choose_backend(Some(conf), &env, None, Path::new(NOWHERE))
            .unwrap()
            .unwrap();
        let Backend::Mysql(m) = b else { panic!() };
        assert_eq!(
            (
                m.host.as_str(),
                m.port,
                m.user.as_str(),
                m.password.as_str(),
                m.db.as_str()
            ),
            ("db", 3307, "seafile", "pw", "ccnet_db")
        );
        let env = env_of(&[("SEAFILE_MYSQL_DB_HOST", "db"), ("SEAFILE_MYSQL_DB_USER", "seafile")]);
        let e = choose_backend(None, &env, None, Path::new(NOWHERE)).unwrap_err();
        assert!(e.0.contains("SEAFILE_MYSQL_DB_PASSWORD"), "{e}");
    }

    #[test]
    fn seafile_11_ccnet_conf() {
        let conf = (
            "/c/ccnet.conf",
            "[General]\n[Database]\nENGINE = mysql\nHOST = 127.0.0.1\nPORT = 3306\nUSER = seafile\nPASSWD = p#w;d\nDB = ccnet_db\nCONNECTION_CHARSET = utf8\n",
        );
        let b = choose_backend(Some(conf), &none, None, Path::new(NOWHERE))
            .unwrap()
            .unwrap();
        let Backend::Mysql(m) = &b else { panic!() };
        assert_eq!(m.password, "p#w;d");
        assert!(!b.describe().contains("p#w;d"), "the password is never shown");
        let conf = (
            "c",
            "[Database]\nENGINE=mysql\nUSER=u\nDB=d\nUNIX_SOCKET=/run/mysqld/mysqld.sock\nUSE_SSL=true\n",
        );
        let Backend::Mysql(m) = choose_backend(Some(conf), &none, None, Path::new(NOWHERE))
            .unwrap()
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(m.unix_socket.as_deref(), Some("/run/mysqld/mysqld.sock"));
        assert!(m.use_ssl);
        let e = choose_backend(
            Some(("c", "[Database]\nENGINE=mysql\nHOST=h\nDB=d\n")),
            &none,
            None,
            Path::new(NOWHERE),
        )
        .unwrap_err();
        assert_eq!(e.0, "c [Database] USER: missing (needed for ENGINE=mysql)");
        let e = choose_backend(
            Some(("c", "[Database]\nENGINE=pgsql\n")),
            &none,
            None,
            Path::new(NOWHERE),
        )
        .unwrap_err();
        assert!(e.0.contains("ENGINE"), "{e}");
    }

    #[test]
    fn sqlite_installs() {
        let explicit = Path::new("/data/groupmgr.db");
        let b = choose_backend(Some(("c", "[General]\n")), &none, Some(explicit), Path::new(NOWHERE)).unwrap();
        assert_eq!(b, Some(Backend::Sqlite(explicit.into())));
        let b = choose_backend(
            Some(("c", "[Database]\nENGINE=sqlite\n")),
            &none,
            Some(explicit),
            Path::new(NOWHERE),
        )
        .unwrap();
        assert_eq!(b, Some(Backend::Sqlite(explicit.into())));
        assert_eq!(choose_backend(None, &none, None, Path::new(NOWHERE)).unwrap(), None);
    }

    #[test]
    fn default_sqlite_is_beside_the_config_dir() {
        assert_eq!(
            default_sqlite_path(Path::new("/opt/seafile/conf")),
            PathBuf::from("/opt/seafile/ccnet/GroupMgr/groupmgr.db")
        );
    }
}
