//! Ingest: when the server takes new events. Two rules hold new events back, so that
//! what it has accepted is delivered promptly and within bounded memory:
//!
//! - **The output budget** (`max_output_bytes`). The [`Meter`](crate::conn::Meter) counts
//!   the memory held for unsent output across all connections. At the budget the server
//!   takes no `/events` request (each sender's request waits unanswered, and its next
//!   ones unread in the kernel) and stops draining the bus inbox, until output drains to
//!   three quarters of the budget. Everything else goes on: `/ping` (health checks),
//!   websocket upgrades (reconnecting clients), pongs and subscribes, the metrics
//!   listener. Clients are never closed for this: a client is closed as a slow consumer
//!   only for its own lack of progress (see `WsConn::send`).
//! - **Pacing.** Under a burst `/events` is read far faster than its fan-out can be
//!   written: unpaced, a burst of small events to one large library queued hundreds of
//!   frames per subscriber, over `max_unsent_bytes`, and the server evicted clients for
//!   its own backlog. So an `/events` request is taken only while fewer than
//!   [`PACE_ENTRIES`] deliveries are pending across all connections, not counting those
//!   behind a full socket (a client that stopped reading must not hold everybody's
//!   events back; it is evicted by its own limits): a bounded amount of
//!   work ahead of each new event, yet enough that a subscriber still queued when the
//!   next event arrives takes it in the same `writev` (writes, not frames, are what
//!   costs: see README, Performance).
//!
//! The HTTP transport holds the request (`Ctx::taking_events`, `conn/http.rs`); the
//! connections holding one are remembered here and served, oldest first, as soon as
//! ingest opens again (readiness is edge-triggered: no new event would come for bytes
//! already read). A `/events` request is still answered 200 before its fan-out, and
//! every accepted event goes to every subscriber.

use super::{Conn, Listen, Now, Server};
use std::collections::VecDeque;

/// Most deliveries pending (across all connections) for `/events` to be read: 512 KiB
/// of queue entries, and at 1-2 us per batched frame 30-60 ms of writes. Pacing by the
/// flush queue's length instead (200 websockets, a few ms of writes) sent nearly every
/// frame in a write of its own: 15-20 us per delivery, a tenth of the throughput.
pub(super) const PACE_ENTRIES: usize = 32 * 1024;

/// What holds new events back, and who waits.
#[derive(Default)]
pub(super) struct Ingest {
    /// Over the budget; stays set until output drains to the low-water mark.
    over_budget: bool,
    /// HTTP connections holding an `/events` request until ingest opens, oldest first.
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
        !self.ingest.over_budget && self.meter.writable_entries() < PACE_ENTRIES
    }

    /// Remembers an HTTP connection that holds an `/events` request, for when ingest
    /// opens (once, however often its readiness comes meanwhile).
    pub(super) fn wait_for_ingest(&mut self, key: usize) {
        if let Some(Conn::Http(h)) = self.conns.get_mut(key)
            && h.queue_for_ingest()
        {
            self.ingest.deferred.push_back(key);
        }
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
            // A connection that ended, was reused since, or was served by its own
            // readiness in between holds nothing: skipped.
            let Some(Conn::Http(h)) = self.conns.get_mut(key) else {
                continue;
            };
            h.dequeue_for_ingest();
            if h.holding_event() && self.serve_http(key, now) {
                // Ingest closed again within its own requests: it keeps its place.
                if let Some(Conn::Http(h)) = self.conns.get_mut(key) {
                    h.queue_for_ingest();
                }
                self.ingest.deferred.push_front(key);
                break;
            }
        }
    }

    /// Connections waiting for ingest (for metrics and tests).
    pub(super) fn deferred(&self) -> usize {
        self.ingest.deferred.len()
    }
}
