//! Process control: what the process as a whole is told and owes systemd. Signals
//! (SIGTERM/SIGINT drain then exit, a second one exits now; SIGHUP reloads; SIGUSR1
//! reopens the log file), the reload itself (which keys need a restart is `config`'s
//! call), the drain deadline, watchdog pings, and when to give memory back.
//!
//! It decides; the reactor acts on the [`Order`]s it returns, since only the reactor
//! holds the connections and the listeners.

use crate::config::Config;
use crate::conn::{Millis, ms};
use crate::groups::Backend;
use crate::sdnotify::Notifier;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook_mio::v1_0::Signals;
use std::io;

/// How long the key in use before a reload keeps being accepted after it (seconds): long
/// enough for seaf-server and seahub to be restarted with the new key. Counted on the
/// loop's monotonic clock.
pub const KEY_GRACE_SECONDS: u64 = 300;

/// How often the loop checks whether connections dropped enough to give memory back. A
/// trim happens only after the count halved since the last one, so checking often costs
/// nothing and a crowd's memory is back within about a second of it leaving.
const TRIM_EVERY_MS: Millis = 1_000;

/// Below this peak, a crowd leaving is not worth a trim.
const TRIM_MIN_PEAK: usize = 64;

/// Below this peak of memory held for delivery (bytes), a burst draining is not worth a
/// trim. Above it, a burst of output (events to stuck clients, or replies a flood of bad
/// subscribes asked for) left RSS at its peak after it drained: 616 MB after one such
/// client left, since the connection count never halved.
const TRIM_MIN_OUTPUT_PEAK: usize = 4 * 1024 * 1024;

/// Re-reads the configuration on SIGHUP.
pub type Reloader = Box<dyn Fn() -> Result<(Config, Option<Backend>), String>>;

/// What the reactor must do for a signal.
#[derive(Debug)]
pub enum Order {
    /// Stop accepting and close every connection by the deadlines (see `begin_drain`).
    Drain,
    /// Apply this configuration (already merged with what cannot change live).
    Apply(Box<Config>),
    /// Exit now.
    Exit,
}

/// How the process ends, once draining.
#[derive(Debug, PartialEq, Eq)]
pub enum DrainEnd {
    /// Every connection closed.
    Complete,
    /// The deadline passed with connections left.
    Deadline,
}

pub struct Control {
    /// `None` in loop tests, which must not take the test process's signals.
    signals: Option<Signals>,
    reloader: Option<Reloader>,
    /// The group backend in use: a reload cannot switch it.
    group_backend: Option<Backend>,
    notifier: Notifier,
    next_watchdog: Millis,
    /// Set while draining: the time by which the process exits anyway.
    drain_deadline: Option<Millis>,
    /// Most connections since the last memory trim, and when to look again.
    peak_conns: usize,
    /// Most memory held for delivery (output, held events) since the last memory trim.
    peak_output: usize,
    next_trim: Millis,
    /// When the key before the last reload stops being accepted (monotonic).
    previous_key_until: Option<Millis>,
}

impl Control {
    pub fn new(signals: Option<Signals>, group_backend: Option<Backend>) -> Control {
        Control {
            signals,
            reloader: None,
            group_backend,
            notifier: Notifier::from_env(),
            next_watchdog: 0,
            drain_deadline: None,
            peak_conns: 0,
            peak_output: 0,
            next_trim: 0,
            previous_key_until: None,
        }
    }

    /// The signals the server handles, to register with its `Poll`.
    pub fn signals() -> io::Result<Signals> {
        Signals::new([SIGTERM, SIGINT, SIGUSR1, SIGHUP])
    }

    pub fn signals_mut(&mut self) -> Option<&mut Signals> {
        self.signals.as_mut()
    }

    pub fn set_reloader(&mut self, reloader: Reloader) {
        self.reloader = Some(reloader);
    }

    /// Tells systemd the server is up.
    pub fn ready(&self) {
        self.notifier.ready();
    }

    pub fn draining(&self) -> bool {
        self.drain_deadline.is_some()
    }

    /// Takes the pending signals; `config` is the running configuration.
    pub fn on_signals(&mut self, now: Millis, config: &Config) -> Vec<Order> {
        let pending: Vec<i32> = match self.signals.as_mut() {
            Some(s) => s.pending().collect(),
            None => return Vec::new(),
        };
        let mut orders = Vec::new();
        for signal in pending {
            match signal {
                SIGUSR1 => match crate::logging::reopen() {
                    Ok(()) => log::info!("log file reopened"),
                    Err(e) => log::error!("{e}"),
                },
                SIGTERM | SIGINT if self.drain_deadline.is_some() => {
                    log::warn!("second shutdown signal: exiting now");
                    orders.push(Order::Exit);
                    return orders;
                }
                SIGTERM | SIGINT => {
                    self.notifier.stopping();
                    self.drain_deadline = Some(now + ms(config.shutdown_timeout));
                    orders.push(Order::Drain);
                }
                SIGHUP => orders.extend(self.reload(config).map(|c| Order::Apply(Box::new(c)))),
                _ => {}
            }
        }
        orders
    }

    /// Re-reads the configuration: a bad one is refused and the running one kept. What
    /// cannot change live is warned about and kept. Returns the configuration to apply;
    /// the reactor then calls [`Control::reloaded`].
    fn reload(&mut self, running: &Config) -> Option<Config> {
        let Some(reloader) = self.reloader.as_ref() else {
            log::warn!("SIGHUP ignored: no configuration to reload from");
            return None;
        };
        self.notifier.reloading();
        match reloader() {
            Err(e) => {
                log::error!("reload refused, keeping the running configuration: {e}");
                self.notifier.ready();
                None
            }
            Ok((new, groups)) => {
                for what in running.restart_needed(&new) {
                    log::warn!("reload: {what} changes take effect only after a restart");
                }
                if groups != self.group_backend {
                    log::warn!("reload: group database changes take effect only after a restart");
                }
                Some(running.reloaded(new))
            }
        }
    }

    /// The reactor applied a reloaded configuration.
    pub fn reloaded(&self, config: &Config) {
        // Shown whatever the old and new levels are: the admin asked for it.
        crate::logging::set_level(config.log_level.max(log::LevelFilter::Info));
        log::info!("configuration reloaded (log level {})", config.log_level);
        crate::logging::set_level(config.log_level);
        self.notifier.ready();
    }

    /// Pets the watchdog if due. Called from the loop itself, once a tick: a loop that
    /// stops turning stops petting.
    pub fn watchdog(&mut self, now: Millis) {
        if let Some(every) = self.notifier.watchdog_every
            && now >= self.next_watchdog
        {
            self.notifier.watchdog();
            self.next_watchdog = now + ms(every);
        }
    }

    /// Whether the drain is over, and how.
    pub fn drain_end(&self, now: Millis, connections: usize) -> Option<DrainEnd> {
        let deadline = self.drain_deadline?;
        if connections == 0 {
            Some(DrainEnd::Complete)
        } else if now >= deadline {
            Some(DrainEnd::Deadline)
        } else {
            None
        }
    }

    /// The key changed at `now`: the previous one is accepted for [`KEY_GRACE_SECONDS`]
    /// more (a second change starts the count again, for the key it replaced).
    pub fn key_rotated(&mut self, now: Millis) {
        self.previous_key_until = Some(now + KEY_GRACE_SECONDS * 1000);
    }

    /// True once, when the previous key's grace is over.
    pub fn previous_key_expired(&mut self, now: Millis) -> bool {
        match self.previous_key_until {
            Some(until) if now >= until => {
                self.previous_key_until = None;
                true
            }
            _ => false,
        }
    }

    /// Records the memory held for delivery at the end of a step, for [`Self::trim_due`].
    pub fn note_output(&mut self, held: usize) {
        self.peak_output = self.peak_output.max(held);
    }

    /// Whether to give memory back now: the slab and index keep their capacity, and the
    /// allocator keeps freed pages, so without a trim RSS stays at its peak forever. True
    /// once the connections halved since their peak, or the memory held for delivery
    /// fell to a quarter of its peak (checked every `TRIM_EVERY_MS`).
    pub fn trim_due(&mut self, now: Millis, connections: usize, output: usize) -> bool {
        self.peak_conns = self.peak_conns.max(connections);
        self.peak_output = self.peak_output.max(output);
        if now < self.next_trim {
            return false;
        }
        self.next_trim = now + TRIM_EVERY_MS;
        let crowd_left = connections * 2 <= self.peak_conns && self.peak_conns >= TRIM_MIN_PEAK;
        let burst_drained = output * 4 <= self.peak_output && self.peak_output >= TRIM_MIN_OUTPUT_PEAK;
        if !crowd_left && !burst_drained {
            return false;
        }
        log::debug!(
            "memory trimmed: {connections} connections (peak {}), {output} bytes held for delivery (peak {})",
            self.peak_conns,
            self.peak_output
        );
        self.peak_conns = connections;
        self.peak_output = output;
        true
    }
}

/// Returns the allocator's free pages to the system.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_follows_a_crowd_leaving_once() {
        let mut c = Control::new(None, None);
        assert!(!c.trim_due(0, 1000, 0));
        assert!(!c.trim_due(1_000, 600, 0), "not halved");
        assert!(c.trim_due(2_000, 400, 0));
        assert!(!c.trim_due(3_000, 400, 0), "already trimmed to this");
        assert!(!c.trim_due(3_500, 10, 0), "checked once a second");
    }

    #[test]
    fn a_trim_follows_a_burst_of_output_draining_with_the_same_connections() {
        let mut c = Control::new(None, None);
        assert!(!c.trim_due(0, 10, 0));
        // The burst came and went between two checks: the step recorded its peak.
        c.note_output(600 << 20);
        assert!(c.trim_due(1_000, 10, 100 << 20), "a sixth of the peak");
        assert!(!c.trim_due(2_000, 10, 100 << 20), "already trimmed to this");
        assert!(c.trim_due(3_000, 10, 0), "and the rest of it drained");
        c.note_output(2 << 20);
        assert!(!c.trim_due(4_000, 10, 0), "a small burst is not worth a trim");
    }

    #[test]
    fn the_drain_ends_when_empty_or_at_its_deadline() {
        let mut c = Control::new(None, None);
        assert_eq!(c.drain_end(0, 0), None, "not draining");
        c.drain_deadline = Some(100);
        assert_eq!(c.drain_end(50, 3), None);
        assert_eq!(c.drain_end(50, 0), Some(DrainEnd::Complete));
        assert_eq!(c.drain_end(100, 3), Some(DrainEnd::Deadline));
    }
}
