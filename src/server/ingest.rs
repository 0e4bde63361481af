//! Ingest: when the server takes new events. Two rules hold new events back, so that
//! what it has accepted is delivered promptly and within bounded memory:
//!
//! - **The output budget** (`max_output_bytes`). The [`Meter`](crate::conn::Meter) counts
//!   the memory held for unsent output across all connections. At the budget the server
//!   stops reading HTTP connections on the public listener (so `/events` senders wait,
//!   their requests unread in the kernel) and stops draining the bus inbox, until output
//!   drains to three quarters of the budget. Websockets are still read (pongs, subscribes)
//!   and the metrics listener still answers. Clients are never closed for this: a client is
//!   closed as a slow consumer only for its own lack of progress (see `WsConn::send`).
//! - **Pacing.** Under a burst `/events` is read far faster than its fan-out can be
//!   written, and every accepted event would wait behind the ones before it. So an HTTP
//!   connection is read only while the flush queue holds fewer than [`PACE_QUEUE`]
//!   websockets: little enough that an accepted event's frames reach the sockets within a
//!   few milliseconds, while connections that are still queued when the next event
//!   arrives take its frame in the same write.
//!
//! HTTP connections whose readiness arrives while ingest is held are remembered and
//! served, oldest first, as soon as it opens again (readiness is edge-triggered: no new
//! event would come for bytes already waiting). A `/events` request is still answered 200
//! before its fan-out, and every accepted event goes to every subscriber.

use super::{Conn, Listen, Now, Server};
use std::collections::VecDeque;

/// Most websockets waiting in the flush queue for `/events` to be read: about 2-4 ms of
/// writes at 10-20 us each. Fewer starve the batching that keeps the cost per delivery
/// down; more make each new event wait longer behind the ones before it.
pub(super) const PACE_QUEUE: usize = 200;

/// What holds new events back, and who waits.
#[derive(Default)]
pub(super) struct Ingest {
    /// Over the budget; stays set until output drains to the low-water mark.
    over_budget: bool,
    /// HTTP connections whose readiness arrived while ingest was held, oldest first.
    deferred: VecDeque<usize>,
    /// The bus woke the loop while ingest was held.
    bus_waiting: bool,
}

impl Ingest {
    /// Whether output is over the budget (a metrics gauge).
    pub(super) fn over_budget(&self) -> bool {
        self.over_budget
    }
}

impl<L: Listen> Server<L> {
    /// Whether new events may be taken now; notices crossing the budget either way.
    pub(super) fn ingest_open(&mut self) -> bool {
        let held = self.meter.held();
        let budget = self.config.max_output_bytes;
        if self.ingest.over_budget {
            if held <= budget / 4 * 3 {
                self.ingest.over_budget = false;
                log::info!("output drained to {held} bytes: taking events again");
            }
        } else if held >= budget {
            self.ingest.over_budget = true;
            self.stats.output_budget_hits += 1;
            log::warn!(
                "unsent output holds {held} bytes, at max_output_bytes ({budget}): not taking events until it drains"
            );
        }
        !self.ingest.over_budget && self.flush_queue.len() < PACE_QUEUE
    }

    /// Serves an HTTP connection now, or remembers it for when ingest opens.
    pub(super) fn serve_or_defer(&mut self, key: usize, now: Now) {
        if !self.ingest_open()
            && let Some(Conn::Http(h)) = self.conns.get_mut(key)
            && h.listener() == crate::conn::Listener::Public
        {
            if h.defer() {
                self.ingest.deferred.push_back(key);
            }
            return;
        }
        self.serve_http(key, now);
    }

    /// Takes bus events now, or remembers that some wait.
    pub(super) fn bus_or_defer(&mut self, now: Now) {
        if self.ingest_open() {
            self.on_bus_events(now.mono);
        } else {
            self.ingest.bus_waiting = true;
        }
    }

    /// Serves what waited for ingest, oldest first, while it stays open.
    pub(super) fn resume_ingest(&mut self, now: Now) {
        // Also notices the budget crossed by this step's fan-out, for the log and metrics.
        let open = self.ingest_open();
        if self.ingest.bus_waiting && open {
            self.ingest.bus_waiting = false;
            self.on_bus_events(now.mono);
        }
        while !self.ingest.deferred.is_empty() && self.ingest_open() {
            let Some(key) = self.ingest.deferred.pop_front() else {
                break;
            };
            // A key whose connection ended (or was reused since) is served harmlessly:
            // nothing is waiting on it.
            if let Some(Conn::Http(h)) = self.conns.get_mut(key) {
                h.undefer();
                self.serve_http(key, now);
            }
        }
    }

    /// Connections waiting for ingest (for metrics and tests).
    pub(super) fn deferred(&self) -> usize {
        self.ingest.deferred.len()
    }
}
