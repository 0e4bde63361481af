//! Logging as the official server does it (PROTOCOL.md section 2.1):
//! `[YYYY-MM-DD HH:MM:SS] [LEVEL] message`, local time, levels spelled as logrus spells
//! them (`WARNING`); into a log file (default `DIR/notification-server.log`), or stderr
//! with `-l -`, or stdout with the `[notification-server] ` prefix when
//! `SEAFILE_LOG_TO_STDOUT=true`.
//!
//! With a log file, the file is also put on file descriptor 2 (as the official server
//! does), so anything written to stderr, a panic message included, lands in it too.
//! SIGUSR1 makes the server call [`reopen`], which opens the path again for logrotate.
//!
//! `simple_logger` cannot produce this line format, so this is a small `log::Log` of our own.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Where log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Append to this file (made absolute at start-up), which also becomes stderr.
    File(PathBuf),
    Stderr,
    /// Stdout, each line prefixed with `[notification-server] `.
    Stdout,
}

struct Logger {
    to_stdout: bool,
    /// Prefix each line with its syslog priority (`<4>` ...), which journald reads off
    /// stderr, so `journalctl -p warning` works. Only when stderr is the journal.
    journal_priority: bool,
}

static FILE_PATH: Mutex<Option<PathBuf>> = Mutex::new(None);

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Error => "ERROR",
            log::Level::Warn => "WARNING",
            log::Level::Info => "INFO",
            log::Level::Debug => "DEBUG",
            log::Level::Trace => "TRACE",
        };
        let prefix = if self.to_stdout { "[notification-server] " } else { "" };
        let priority = match (self.journal_priority, record.level()) {
            (false, _) => "",
            (true, log::Level::Error) => "<3>",
            (true, log::Level::Warn) => "<4>",
            (true, log::Level::Info) => "<6>",
            (true, _) => "<7>",
        };
        let line = format!(
            "{priority}{prefix}[{}] [{level}] {}\n",
            local_timestamp(),
            record.args()
        );
        // One write call per line, so lines from the helper threads never interleave.
        let _ = if self.to_stdout {
            std::io::stdout().lock().write_all(line.as_bytes())
        } else {
            std::io::stderr().lock().write_all(line.as_bytes())
        };
    }

    fn flush(&self) {}
}

/// Installs the logger. With a file target the file is opened (created if needed) first;
/// an error names the file.
pub fn init(target: &Target, level: log::LevelFilter) -> Result<(), String> {
    if let Target::File(path) = target {
        attach_to_stderr(path)?;
        if let Ok(mut p) = FILE_PATH.lock() {
            *p = Some(path.clone());
        }
    }
    // SAFETY: tzset only (re)reads TZ into libc's own state, before any other thread runs.
    unsafe { tzset() };
    // systemd sets JOURNAL_STREAM when it connects stderr to the journal.
    let journal_priority = *target == Target::Stderr && std::env::var_os("JOURNAL_STREAM").is_some();
    let logger: &'static Logger = Box::leak(Box::new(Logger {
        to_stdout: *target == Target::Stdout,
        journal_priority,
    }));
    log::set_logger(logger).map_err(|e| format!("cannot install the logger: {e}"))?;
    log::set_max_level(level);
    Ok(())
}

/// Changes the level at run time.
pub fn set_level(level: log::LevelFilter) {
    log::set_max_level(level);
}

/// Opens the log file again (after logrotate moved it). A no-op without a log file.
pub fn reopen() -> Result<(), String> {
    let path = FILE_PATH.lock().ok().and_then(|p| p.clone());
    match path {
        Some(path) => attach_to_stderr(&path),
        None => Ok(()),
    }
}

fn attach_to_stderr(path: &Path) -> Result<(), String> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
    // SAFETY: dup2 onto fd 2 with a valid descriptor we own; the duplicate outlives `file`.
    let rc = unsafe { libc::dup2(file.as_raw_fd(), libc::STDERR_FILENO) };
    if rc < 0 {
        return Err(format!(
            "cannot redirect stderr to log file {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

unsafe extern "C" {
    fn tzset();
}

/// `YYYY-MM-DD HH:MM:SS` in local time, as Go's `time.Now()` formats it.
fn local_timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as libc::time_t)
        .unwrap_or(0);
    // SAFETY: localtime_r only writes into the zeroed struct we pass.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&now, &mut tm).is_null() };
    if !ok {
        return "1970-01-01 00:00:00".to_string();
    }
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

#[cfg(test)]
mod tests {
    #[test]
    fn timestamp_shape() {
        let t = super::local_timestamp();
        assert_eq!(t.len(), 19, "{t}");
        assert_eq!(&t[4..5], "-");
        assert_eq!(&t[10..11], " ");
        assert_eq!(&t[13..14], ":");
    }
}
