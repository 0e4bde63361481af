//! Ingest: when the server takes new events, and fans out the ones it has. Two rules
//! hold events back, so that what it has accepted is delivered promptly and within
//! bounded memory, whichever way the events came (`/events`, the Redis bus, or released
//! by the group gate):
//!
//! - **The output budget** (`max_output_bytes`) covers every byte the server holds for
//!   delivery: what the [`Meter`](crate::conn::Meter) counts for unsent websocket output
//!   across all connections (event frames, replies, pongs, Close frames), the events the
//!   group gate holds behind a lookup, and the events released and not yet fanned out.
//!   At the budget the server takes no `/events` request (each sender's request waits
//!   unanswered, and its next ones unread in the kernel), takes nothing from the bus
//!   inbox and fans out nothing, until it drains to three quarters of the budget.
//!   Everything else goes on: `/ping` (health checks), websocket upgrades, subscribes
//!   and pongs (reconnecting clients), the metrics listener. Clients are never closed
//!   for this: a client is closed as a slow consumer only for its own lack of progress
//!   (see `WsConn::send`).
//! - **The reply reserve.** Replies to client messages (`jwt-expired`, pongs, Close
//!   frames) are output too: a flood of bad subscribes from clients that never read made
//!   the server queue gigabytes. Each client's replies are held to its
//!   `max_unsent_bytes` when queued (`WsConn::send_text`), and all of them to the last
//!   [`REPLY_RESERVE`]th above the budget: past `max_output_bytes + max_output_bytes /
//!   REPLY_RESERVE` no websocket message is read until output drains below it (silence is
//!   not judged meanwhile: the server is not reading). The reserve keeps reconnecting
//!   clients served while events wait for stuck ones; the hard limit keeps every byte
//!   held for output within 9/8 of the budget, whoever caused it.
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
//!
//! Every event the gate lets go joins one queue, `released`, and is fanned out from its
//! front one at a time while ingest is open; so is every bus event, taken from the inbox
//! one at a time, the rest left where it is. Both used to go in one step: a bus inbox
//! of 3,000 events, or 10,000 events released by one group lookup, fanned out at once,
//! past pacing and the budget. One queue also keeps each library's events in order.

use super::{Conn, Listen, Now, Server};
use crate::conn::Millis;
use crate::gate::Go;
use crate::logsafe::{Kind, limited};
use std::collections::VecDeque;

/// Most deliveries pending (across all connections) for `/events` to be read: 512 KiB
/// of queue entries, and at 1-2 us per batched frame 30-60 ms of writes. Pacing by the
/// flush queue's length instead (200 websockets, a few ms of writes) sent nearly every
/// frame in a write of its own: 15-20 us per delivery, a tenth of the throughput.
pub(super) const PACE_ENTRIES: usize = 32 * 1024;

/// The share of `max_output_bytes` kept above it for replies to client messages (an
/// eighth: 8 MiB of the default 64 MiB). See the module doc.
pub(super) const REPLY_RESERVE: usize = 8;

/// What holds new events back, and who waits.
#[derive(Default)]
pub(super) struct Ingest {
    /// Since when output has been over the budget; set until it drains to the low-water
    /// mark.
    over_budget_since: Option<std::time::Instant>,
    /// Time spent over the budget in episodes that ended.
    over_budget_past: std::time::Duration,
    /// HTTP connections holding an `/events` request until ingest opens, oldest first.
    deferred: VecDeque<usize>,
    /// The bus inbox may hold events not taken yet.
    bus_waiting: bool,
    /// Events the gate let go, not fanned out yet, oldest first.
    released: VecDeque<Go>,
    /// The memory they hold (`Event::held_bytes`).
    released_bytes: usize,
}

impl Ingest {
    /// Whether output is over the budget (a metrics gauge).
    pub(super) fn over_budget(&self) -> bool {
        self.over_budget_since.is_some()
    }

    /// Seconds spent over the budget so far, the current episode included (a counter:
    /// how long the episodes lasted, which a gauge sampled at each scrape misses).
    pub(super) fn over_budget_seconds(&self) -> f64 {
        let current = self.over_budget_since.map(|t| t.elapsed()).unwrap_or_default();
        (self.over_budget_past + current).as_secs_f64()
    }

    /// Queues events the gate let go, for [`Server::fan_out_released`].
    pub(super) fn release(&mut self, gos: impl IntoIterator<Item = Go>) {
        for go in gos {
            self.released_bytes += go.event.held_bytes();
            self.released.push_back(go);
        }
    }

    fn next_released(&mut self) -> Option<Go> {
        let go = self.released.pop_front()?;
        self.released_bytes -= go.event.held_bytes();
        Some(go)
    }
}

impl<L: Listen> Server<L> {
    /// The memory held for delivery: unsent output, events held by the gate, events
    /// released and not fanned out yet.
    pub(super) fn held_for_delivery(&self) -> usize {
        self.meter.held() + self.gate.held_bytes() + self.ingest.released_bytes
    }

    /// Whether client messages are read now: not while what is held for delivery is
    /// past the budget and its reply reserve.
    pub(super) fn reading_open(&self) -> bool {
        let budget = self.config.max_output_bytes;
        self.held_for_delivery() < budget.saturating_add(budget / REPLY_RESERVE)
    }

    /// Whether new events may be taken now; notices crossing the budget either way.
    pub(super) fn ingest_open(&mut self) -> bool {
        self.budget_open() && self.paced()
    }

    /// Pacing: fewer than [`PACE_ENTRIES`] deliveries the server can write now are
    /// pending.
    fn paced(&self) -> bool {
        self.meter.writable_entries() < PACE_ENTRIES
    }

    /// Whether what the server holds for delivery is under the budget, with hysteresis;
    /// notices crossing it either way (for the log and metrics).
    fn budget_open(&mut self) -> bool {
        let held = self.held_for_delivery();
        let budget = self.config.max_output_bytes;
        if let Some(since) = self.ingest.over_budget_since {
            if held <= budget / 4 * 3 {
                self.ingest.over_budget_since = None;
                self.ingest.over_budget_past += since.elapsed();
                limited!(
                    Kind::BudgetDrained,
                    "output drained to {held} bytes: taking events again"
                );
            }
        } else if held >= budget {
            self.ingest.over_budget_since = Some(std::time::Instant::now());
            self.stats.output_budget_hits += 1;
            limited!(
                Kind::OverBudget,
                "output held for delivery is {held} bytes, at max_output_bytes ({budget}): not taking events until it drains"
            );
        }
        !self.ingest.over_budget()
    }

    /// Fans out released events, oldest first, while ingest stays open.
    pub(super) fn fan_out_released(&mut self, now: Millis) {
        while !self.ingest.released.is_empty() && self.ingest_open() {
            if let Some(go) = self.ingest.next_released() {
                self.fan_out(go, now);
            }
        }
    }

    /// Takes events from the bus inbox one at a time while ingest stays open; the rest
    /// wait there (the subscriber thread counts what a full inbox drops).
    fn take_bus_events(&mut self, now: Millis) {
        self.ingest.bus_waiting = true;
        while self.ingest.released.is_empty() && self.ingest_open() {
            let Some(ev) = self.bus.as_ref().and_then(|bus| bus.next_received()) else {
                self.ingest.bus_waiting = false;
                return;
            };
            self.deliver(ev, now);
        }
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

    /// The bus woke the loop: takes its events as far as ingest is open.
    pub(super) fn on_bus_wake(&mut self, now: Now) {
        if self.bus.is_some() {
            self.take_bus_events(now.mono);
        }
    }

    /// Serves what waited for ingest, oldest first, while it stays open: released
    /// events, then the bus inbox, then held `/events` requests.
    pub(super) fn resume_ingest(&mut self, now: Now) {
        self.fan_out_released(now.mono);
        if self.ingest.bus_waiting {
            self.take_bus_events(now.mono);
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

    /// Whether events wait for ingest without a readiness event to bring them: released
    /// events or a bus inbox, while ingest is open (the loop then polls without sleeping).
    pub(super) fn events_waiting(&self) -> bool {
        (!self.ingest.released.is_empty() || self.ingest.bus_waiting) && !self.ingest.over_budget() && self.paced()
    }
}
