//! Fitting `max_connections` to the process's open-file limit: every connection is one
//! descriptor, and the server keeps a reserve for its own.

use super::Config;
use std::fmt;

impl Config {
    /// Derives `max_connections` from the process's open-file limit `nofile` (the soft
    /// limit, after it was raised to the hard one) unless it was set explicitly, and says
    /// what was done so that the caller can log it. Every connection is one descriptor;
    /// [`RESERVED_DESCRIPTORS`] stay for the server's own. `None` (the limit could not
    /// be read) keeps the value as it is.
    pub fn fit_to_descriptors(&mut self, nofile: Option<u64>) -> DescriptorFit {
        let Some(limit) = nofile else {
            return DescriptorFit::Unknown {
                max_connections: self.max_connections,
            };
        };
        let allowed = connections_for_descriptors(limit);
        if self.max_connections_explicit {
            return DescriptorFit::Explicit {
                max_connections: self.max_connections,
                limit,
                allowed,
            };
        }
        self.max_connections = allowed.max(MIN_DERIVED_CONNECTIONS);
        DescriptorFit::Derived {
            max_connections: self.max_connections,
            limit,
        }
    }
}

/// Descriptors kept back from the derived connection cap for the server itself. What it
/// holds besides its connections is about 20 at most: stdin, stdout, stderr and the log
/// file (a second one for a moment while SIGUSR1 reopens it); the public and metrics
/// listeners and the scrapers' connections (which the cap does not count, so a full
/// server can still be observed); epoll, the waker's eventfd and the signal pipe (two);
/// the group lookup thread's database connection (a MySQL socket, or for SQLite the
/// database file and its `-wal` and `-shm` files); the Redis bus's publisher and
/// subscriber connections, plus one while reconnecting and a resolver socket; and
/// short-lived ones: config and key files on SIGHUP, `/proc/self/statm` for the RSS
/// gauge, the sd_notify socket. 64 leaves room for all of them at once and for a few
/// metrics scrapers, so that the cap, not `EMFILE`, is what a crowd meets.
pub const RESERVED_DESCRIPTORS: u64 = 64;

/// The derived cap never goes below this, however low the open-file limit: a server
/// that accepts nothing is no use, and running out of descriptors first is handled
/// anyway (accepting pauses until one frees up).
pub const MIN_DERIVED_CONNECTIONS: usize = 16;

/// Connections an open-file limit leaves room for: the limit minus
/// [`RESERVED_DESCRIPTORS`] (0 when the limit is below the reserve).
pub fn connections_for_descriptors(nofile: u64) -> usize {
    usize::try_from(nofile.saturating_sub(RESERVED_DESCRIPTORS)).unwrap_or(usize::MAX)
}

/// What [`Config::fit_to_descriptors`] did, for the start-up log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DescriptorFit {
    /// Derived from the open-file `limit`.
    Derived { max_connections: usize, limit: u64 },
    /// Set explicitly; `allowed` is what the open-file `limit` leaves room for, so a
    /// larger setting means accepts will pause on `EMFILE` before the cap is reached.
    Explicit {
        max_connections: usize,
        limit: u64,
        allowed: usize,
    },
    /// The open-file limit could not be read: the value is kept as it was.
    Unknown { max_connections: usize },
}

impl fmt::Display for DescriptorFit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DescriptorFit::Derived { max_connections, limit } => write!(
                f,
                "max_connections {max_connections} (derived: open-file limit {limit} minus {RESERVED_DESCRIPTORS} for the server's own descriptors)"
            ),
            DescriptorFit::Explicit {
                max_connections,
                limit,
                allowed,
            } if max_connections > allowed => write!(
                f,
                "max_connections {max_connections} (set in the configuration) is more than the open-file limit {limit} leaves room for ({allowed} after {RESERVED_DESCRIPTORS} for the server's own descriptors): accepting will pause when descriptors run out, before the cap; raise LimitNOFILE (ulimit -n) or lower max_connections"
            ),
            DescriptorFit::Explicit {
                max_connections,
                limit,
                allowed,
            } => write!(
                f,
                "max_connections {max_connections} (set in the configuration; the open-file limit {limit} would allow {allowed})"
            ),
            DescriptorFit::Unknown { max_connections } => write!(
                f,
                "max_connections {max_connections} (the open-file limit could not be read)"
            ),
        }
    }
}

impl DescriptorFit {
    /// Whether the start-up line should be a warning rather than information.
    pub fn is_warning(&self) -> bool {
        match *self {
            DescriptorFit::Derived { limit, .. } => connections_for_descriptors(limit) < MIN_DERIVED_CONNECTIONS,
            DescriptorFit::Explicit {
                max_connections,
                allowed,
                ..
            } => max_connections > allowed,
            DescriptorFit::Unknown { .. } => true,
        }
    }
}
