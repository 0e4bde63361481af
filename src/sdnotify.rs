//! systemd's notify protocol: `READY=1` once listening, `STOPPING=1` when draining,
//! `RELOADING=1` around a SIGHUP reload, and `WATCHDOG=1` from the event loop's own
//! tick, so a stuck loop stops petting the watchdog and systemd restarts it.
//!
//! Each message is one datagram to `$NOTIFY_SOCKET` (a path, or an abstract socket
//! written `@name`). Without that variable everything here is a no-op. Written by hand:
//! it is one `sendto`, not worth a crate.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// The notify socket, if systemd gave us one.
pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    /// Half of `WATCHDOG_USEC`, if the watchdog is on for this process.
    pub watchdog_every: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the environment.
    pub fn from_env() -> Notifier {
        Notifier::from_vars(&|k| std::env::var(k).ok(), std::process::id())
    }

    fn from_vars(env: &dyn Fn(&str) -> Option<String>, pid: u32) -> Notifier {
        let socket = env("NOTIFY_SOCKET").filter(|p| !p.is_empty()).and_then(|path| {
            let addr = match path.strip_prefix('@') {
                Some(name) => {
                    use std::os::linux::net::SocketAddrExt;
                    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()?
                }
                None => std::os::unix::net::SocketAddr::from_pathname(&path).ok()?,
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        let for_us = env("WATCHDOG_PID").is_none_or(|p| p.parse::<u32>().ok() == Some(pid));
        let watchdog_every = env("WATCHDOG_USEC")
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0 && for_us)
            .map(|u| Duration::from_micros(u / 2));
        Notifier { socket, watchdog_every }
    }

    /// Sends one state message; failures are logged at debug and otherwise ignored
    /// (systemd may simply not be listening).
    pub fn notify(&self, state: &str) {
        if let Some((sock, addr)) = &self.socket
            && let Err(e) = sock.send_to_addr(state.as_bytes(), addr)
        {
            log::debug!("sd_notify {state:?} failed: {e}");
        }
    }

    pub fn ready(&self) {
        self.notify("READY=1\nSTATUS=Serving");
    }

    pub fn stopping(&self) {
        self.notify("STOPPING=1\nSTATUS=Draining connections");
    }

    /// `RELOADING=1` needs the monotonic time for `Type=notify-reload`.
    pub fn reloading(&self) {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes into the timespec we pass.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000;
        self.notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
    }

    pub fn watchdog(&self) {
        self.notify("WATCHDOG=1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_datagrams_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("sdnotify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        let p = path.display().to_string();
        let n = Notifier::from_vars(&|k| (k == "NOTIFY_SOCKET").then(|| p.clone()), 1);
        n.ready();
        let mut buf = [0u8; 256];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=Serving");
        assert_eq!(n.watchdog_every, None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn watchdog_only_for_our_pid() {
        let env = |k: &str| match k {
            "WATCHDOG_USEC" => Some("2000000".to_string()),
            "WATCHDOG_PID" => Some("42".to_string()),
            _ => None,
        };
        assert_eq!(
            Notifier::from_vars(&env, 42).watchdog_every,
            Some(Duration::from_secs(1))
        );
        assert_eq!(Notifier::from_vars(&env, 43).watchdog_every, None);
        // Without NOTIFY_SOCKET nothing is sent and nothing fails.
        Notifier::from_vars(&env, 42).ready();
    }
}
