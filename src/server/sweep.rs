//! The sweep: every connection's timers checked once a tick, and what runs once a tick
//! for the server as a whole (overdue group lookups, an accept paused for descriptors,
//! the watchdog, memory trim). The timers' verdicts are the connections' own
//! (`HttpConn::tick`, `WsConn::tick`); the sweep acts on them, plus token expiry, which
//! needs the subscription index.
//!
//! The sweep is incremental: each step visits the slice of slab keys that the time
//! elapsed in the round calls for, so every connection is still visited once a tick, but
//! pings go out, and pongs come back, spread over the tick instead of in one burst whose
//! writes and reads would hold `/events` requests and deliveries back.

use super::{AcceptPause, Conn, Listen, Now, Server};
use crate::config::Config;
use crate::conn::{CloseReason, Due, Listener, Millis, Stream, ms};
use crate::event;

/// How often (ms) the loop wakes to advance the sweep when it has more than
/// `SPREAD_SWEEP_ABOVE` connections. With fewer, a tick's pings are no burst worth
/// spreading, and an idle box sleeps a whole tick.
const SWEEP_STEP_MS: Millis = 10;
const SPREAD_SWEEP_ABOVE: usize = 256;

/// The sweep's clock.
pub(super) struct Sweep {
    /// How often every connection is visited, and housekeeping runs.
    tick: Millis,
    next_tick: Millis,
    /// When the sweep last advanced, to notice a loop that stalled.
    last: Millis,
    /// The next slab key to visit, and when this round started.
    cursor: usize,
    round_start: Millis,
    /// Stalls longer than this restart keep-alive deadlines (a ping interval and a second).
    stall_limit: Millis,
}

impl Sweep {
    pub(super) fn new(config: &Config) -> Sweep {
        let mut sweep = Sweep {
            tick: 0,
            next_tick: 0,
            last: 0,
            cursor: 0,
            round_start: 0,
            stall_limit: 0,
        };
        sweep.configure(config);
        sweep.next_tick = sweep.tick;
        sweep
    }

    /// Ticks fine enough for the shortest timer: a quarter of the ping interval, at
    /// most 250 ms, which also bounds how late a token expiry is noticed.
    pub(super) fn configure(&mut self, config: &Config) {
        self.tick = (ms(config.ping_interval) / 4).clamp(10, 250);
        self.stall_limit = ms(config.ping_interval) + 1_000;
    }

    /// How long an idle loop may sleep (ms, at least 1).
    pub(super) fn wait(&self, now: Millis, connections: usize) -> u64 {
        let until_tick = self.next_tick.saturating_sub(now);
        if connections <= SPREAD_SWEEP_ABOVE {
            until_tick.max(1)
        } else {
            until_tick.clamp(1, SWEEP_STEP_MS)
        }
    }
}

impl<L: Listen> Server<L> {
    /// Advances the sweep by the slice of keys this step's time calls for, and runs the
    /// once-a-tick work when a tick is due.
    pub(super) fn sweep_step(&mut self, now: Now) {
        // A loop that did not turn (stopped, starved, swapped out) sent no pings either, so
        // its clients' silence says nothing: give every websocket a fresh keep-alive window.
        let stalled_for = now.mono.saturating_sub(self.sweep.last);
        self.sweep.last = now.mono;
        if stalled_for > self.sweep.stall_limit {
            log::warn!("event loop stalled for {stalled_for} ms; keep-alive deadlines restarted");
            let fresh = now.mono.saturating_sub(self.timers.ping_interval);
            for (_, conn) in self.conns.iter_mut() {
                if let Conn::Ws(w) = conn {
                    w.restart_keep_alive(fresh, now.mono);
                }
            }
        }
        let slots = self.conns.capacity();
        let tick = self.sweep.tick;
        let elapsed = now.mono.saturating_sub(self.sweep.round_start);
        let round_over = elapsed >= tick;
        let reach = if round_over {
            slots
        } else {
            // elapsed < tick, so this is below `slots`.
            (slots as u128 * elapsed as u128 / tick.max(1) as u128) as usize
        };
        if reach > self.sweep.cursor {
            self.sweep_keys(self.sweep.cursor..reach, now);
            self.sweep.cursor = reach;
        }
        if round_over {
            self.sweep.cursor = 0;
            self.sweep.round_start = now.mono;
        }
        if now.mono >= self.sweep.next_tick {
            self.housekeeping(now.mono);
            self.sweep.next_tick = now.mono + self.sweep.tick;
            self.control.watchdog(now.mono);
        }
    }

    /// What runs once a tick for the server as a whole.
    fn housekeeping(&mut self, now: Millis) {
        if self.gate.pending() > 0 {
            self.expire_lookups(now);
        }
        crate::logsafe::flush_suppressed();
        if self.accept_pause == Some(AcceptPause::NoDescriptors) {
            self.accept_pause = None;
            self.accept(now, Listener::Public);
        }
        if std::mem::take(&mut self.metrics_accept_paused) {
            self.accept(now, Listener::Metrics);
        }
        if self.control.previous_key_expired(now) && self.verifier.forget_previous() {
            log::info!("the JWT key before the last reload is no longer accepted");
        }
        let output = self.held_for_delivery();
        if self.control.trim_due(now, self.conns.len(), output) {
            self.conns.shrink_to_fit();
            self.subs.shrink();
            self.flush_queue.shrink_to_fit();
            self.doomed.shrink_to_fit();
            self.unread.shrink_to_fit();
            crate::control::release_free_memory();
        }
    }

    /// Acts on the timers of the connections whose slab keys are in `keys`.
    fn sweep_keys(&mut self, keys: std::ops::Range<usize>, now: Now) {
        let timers = self.timers;
        let draining = self.control.draining();
        let mut silent = Vec::new();
        for key in keys {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            match conn {
                Conn::Http(h) => {
                    if let Some(reason) = h.tick(now.mono, draining) {
                        self.doomed.push((key, reason));
                    }
                }
                Conn::Ws(w) => match w.tick(now.mono, &timers) {
                    Due::Close(reason) => self.doomed.push((key, reason)),
                    Due::Closing => {}
                    Due::Silent => silent.push(key),
                    Due::Alive => {
                        self.expire_tokens(key, now);
                        if let Some(Conn::Ws(w)) = self.conns.get_mut(key)
                            && let Some(sent) = w.keep_alive(now.mono, &timers)
                        {
                            self.note_sent(key, sent, now.mono);
                        }
                    }
                },
                Conn::Upgrading => {}
            }
        }
        for key in silent {
            if !self.reading_open() {
                // Past the output budget's reply reserve no client message is read
                // (ingest.rs): their pongs wait unread, so their silence says nothing.
                continue;
            }
            if let Some(Conn::Ws(w)) = self.conns.get_mut(key) {
                w.stream_mut().rearm();
            }
            self.read_ws(key, now);
            if let Some(Conn::Ws(w)) = self.conns.get(key)
                && w.is_silent(now.mono, &timers)
            {
                self.doomed.push((key, CloseReason::PongTimeout));
            }
        }
    }

    /// Ends the subscriptions of `key` whose token ran out, telling the client with
    /// `jwt-expired` for each.
    fn expire_tokens(&mut self, key: usize, now: Now) {
        if !self.subs.has_expired(key, now.unix) {
            return;
        }
        for repo_id in self.subs.expire(key, now.unix) {
            crate::logsafe::limited!(
                crate::logsafe::Kind::Lifecycle,
                "connection {key}: token for {} expired",
                crate::logsafe::input(&repo_id)
            );
            let Some(Conn::Ws(w)) = self.conns.get_mut(key) else {
                return;
            };
            let sent = w.send_text(&event::jwt_expired(&repo_id), now.mono);
            if !self.note_sent(key, sent, now.mono) {
                break;
            }
        }
    }
}
