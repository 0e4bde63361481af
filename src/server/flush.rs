//! The flush queue: websockets with queued output, flushed oldest first, time-sliced.
//!
//! Output is time-sliced. A fan-out to thousands of subscribers costs one `write()` each,
//! and on loopback or a slow CPU that is 10-20 µs apiece: flushing all of them before
//! looking at input again would make every `/events` sender, pong and subscribe wait for
//! the whole fan-out. So a step flushes for at most `FLUSH_SLICE`, and the rest of the
//! queue waits, in order, for the next step, which polls with a zero timeout. A
//! connection still waiting in the queue when more frames arrive for it keeps its place
//! and sends them all in one `write()`: under light load every flush carries one frame
//! and goes out in the same step; under overload frames batch up by themselves, and the
//! cost per delivery falls instead of the backlog growing.

use super::{Conn, Listen, Server};
use crate::conn::{Millis, Sent};
use std::time::{Duration, Instant};

/// How long one step may spend flushing websockets before it polls for input again: the
/// bound on how long an `/events` request, a pong or a subscribe can wait behind fan-out.
/// Shorter slices also batch more under overload (input gets in sooner, so more frames
/// wait in each queued connection): in scenario a, 500 µs gave 4.7-4.8 µs of CPU per
/// delivery, 250 µs 3.8-4.1, 100 µs 3.2-3.8, 50 µs 2.7-3.4; below 100 µs the gain is
/// within the noise while the cost of a poll per slice grows.
const FLUSH_SLICE: Duration = Duration::from_micros(100);

impl<L: Listen> Server<L> {
    /// Puts a websocket on the flush queue, unless it is there already.
    pub(super) fn queue_flush(&mut self, key: usize, now: Millis) {
        if let Some(Conn::Ws(w)) = self.conns.get_mut(key)
            && w.mark_queued()
        {
            self.flush_queue.push_back((key, now));
        }
    }

    /// Queues one message on one websocket, dooming it if it cannot take more; false if
    /// it is doomed (or gone).
    pub(super) fn send(&mut self, key: usize, msg: &str, now: Millis) -> bool {
        match self.conns.get_mut(key) {
            Some(Conn::Ws(w)) => {
                let sent = w.send_text(msg, now);
                self.note_sent(key, sent, now)
            }
            _ => false,
        }
    }

    /// Records what a queued message means for the flush queue and the doomed list;
    /// false if the connection is doomed.
    pub(super) fn note_sent(&mut self, key: usize, sent: Sent, now: Millis) -> bool {
        match sent {
            Sent::Queued { newly_queued } => {
                if newly_queued {
                    self.flush_queue.push_back((key, now));
                }
                true
            }
            Sent::Discarded => true,
            Sent::Evict(reason) => {
                self.doomed.push((key, reason));
                false
            }
        }
    }

    /// Flushes queued connections, oldest first, until the queue is empty or the step has
    /// spent `FLUSH_SLICE` on it (see the module doc). `now` is the step's time, read at
    /// `step_started`.
    pub(super) fn flush_queued(&mut self, now: Millis, step_started: Instant) {
        let started = Instant::now();
        // The step's clock, advanced by what the step took so far, without another read.
        let flushed_at = now + started.duration_since(step_started).as_millis() as Millis;
        while let Some((key, queued_at)) = self.flush_queue.pop_front() {
            // A connection torn down while queued leaves its key behind; the queued mark
            // tells a live entry (or a new connection that reused the key and queued
            // itself) from a stale one.
            if let Some(Conn::Ws(w)) = self.conns.get(key)
                && w.is_queued()
            {
                self.stats
                    .flush_wait
                    .observe(flushed_at.saturating_sub(queued_at) as f64 / 1000.0);
                self.flush_one(key, now);
                // A clock read (vDSO, tens of ns) is noise next to a write (10-20 µs).
                if started.elapsed() >= FLUSH_SLICE {
                    break;
                }
            }
        }
    }

    pub(super) fn flush_one(&mut self, key: usize, now: Millis) {
        let Some(Conn::Ws(w)) = self.conns.get_mut(key) else {
            return;
        };
        match w.flush(now) {
            Ok(_) => self.sync_interest(key),
            Err(reason) => self.doomed.push((key, reason)),
        }
    }
}
