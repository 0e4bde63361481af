//! Delivery: from an event to the subscribers it concerns. Every event, from an
//! `/events` sender or another instance, passes the group gate (`gate.rs`), which lets it
//! go now or holds it behind a group lookup; what goes is fanned out here: its one shared
//! frame queued into each subscriber the audience lets through, then shared with the other
//! instances. Client messages (subscribe, unsubscribe) are applied here too, through the
//! subscribe policy (`subscribe.rs`).

use super::{Conn, Listen, Now, Server};
use crate::bus::Bus;
use crate::conn::{Millis, Sent};
use crate::event::{Audience, Event, Origin};
use crate::gate::{Gate, Go, Resolver};
use crate::groups::{Lookups, Reply as LookupReply};
use crate::subs::Subs;
use crate::subscribe::{self, Policy, Reply};
use crate::ws::ClientMsg;
use std::collections::HashSet;
use tungstenite::protocol::frame::coding::CloseCode;

/// Who among a library's subscribers gets an event.
#[derive(Clone, Copy)]
enum Filter<'a> {
    All,
    User(&'a str),
    Members(&'a HashSet<Box<str>>),
}

impl<L: Listen> Server<L> {
    /// Applies one client message and queues its replies; false if that doomed the
    /// connection (nothing more of it is read). A connection closing for a policy
    /// violation is read on: its data is dropped, and its Close answers ours.
    pub(super) fn on_client_msg(&mut self, key: usize, msg: ClientMsg, now: Now) -> bool {
        let policy = Policy {
            verifier: &self.verifier,
            max_repos: self.config.max_repos_per_connection,
            unix_now: now.unix,
        };
        for reply in subscribe::apply(msg, key, &mut self.subs, &policy, &mut self.stats) {
            match reply {
                Reply::JwtExpired(repo_id) => {
                    if !self.send(key, &crate::event::jwt_expired(&repo_id), now.mono) {
                        return false;
                    }
                }
                Reply::TooManySubscriptions => {
                    let close_by = now.mono + self.timers.close_timeout;
                    if let Some(Conn::Ws(w)) = self.conns.get_mut(key) {
                        crate::logsafe::limited!(
                            crate::logsafe::Kind::TooManySubscriptions,
                            "websocket {} subscribed to more than max_repos_per_connection ({}) libraries: closing",
                            w.client_addr(),
                            self.config.max_repos_per_connection
                        );
                        w.start_close(CloseCode::Policy, "too many subscriptions", close_by);
                    }
                }
            }
        }
        true
    }

    /// Delivers an event, from whatever source, through the group gate (which keeps each
    /// library's events in order behind a pending group lookup).
    pub fn deliver(&mut self, ev: Event, now: Millis) {
        self.stats.event(ev.kind);
        self.through_gate(now, |gate, env| gate.offer(ev, now, env));
    }

    /// Takes the group helper's answers and delivers what they release.
    pub(super) fn on_lookup_replies(&mut self, now: Millis) {
        let replies: Vec<LookupReply> = match self.lookups.as_ref() {
            Some(helper) => helper.replies().collect(),
            None => return,
        };
        self.through_gate(now, |gate, env| gate.on_replies(replies, now, env));
    }

    /// Delivers what the gate releases because lookups went unanswered.
    pub(super) fn expire_lookups(&mut self, now: Millis) {
        self.through_gate(now, |gate, env| gate.expire(now, env));
    }

    /// Runs one gate operation with the view of the server it needs; every event it
    /// lets go joins the released queue, which is fanned out as far as ingest is open
    /// (`ingest.rs`: a lookup may release thousands of held events at once).
    fn through_gate<I: IntoIterator<Item = Go>>(&mut self, now: Millis, op: impl FnOnce(&mut Gate, &mut GateEnv) -> I) {
        let Server {
            gate,
            subs,
            bus,
            lookups,
            ingest,
            ..
        } = self;
        ingest.release(op(gate, &mut GateEnv { subs, bus, lookups }));
        self.fan_out_released(now);
    }

    /// Queues the event's one frame into every subscriber its audience lets through, then
    /// shares a locally received event with the other instances (with the audience as
    /// resolved here).
    pub(super) fn fan_out(&mut self, go: Go, now: Millis) {
        let Go { event: ev, members } = go;
        let filter = match (&members, &ev.audience) {
            (Some(set), _) | (None, Audience::Members(set)) => Filter::Members(set),
            (None, Audience::All) => Filter::All,
            (None, Audience::User(u)) => Filter::User(u),
            // The gate never lets an unresolved group through; never broadcast one.
            (None, Audience::Group(_)) => return,
        };
        let Server {
            subs,
            conns,
            flush_queue,
            doomed,
            stats,
            meter,
            ..
        } = self;
        // Encoded once; each subscriber's queue holds a reference to these bytes.
        let frame = crate::conn::Frame::text(ev.frame.as_bytes(), meter);
        for s in subs.subscribers(&ev.repo_id) {
            let wanted = match filter {
                Filter::All => true,
                Filter::User(u) => *s.user == *u,
                Filter::Members(set) => set.contains(&s.user),
            };
            if !wanted {
                continue;
            }
            let Some(Conn::Ws(w)) = conns.get_mut(s.conn) else {
                continue;
            };
            match w.send(&frame, now) {
                Sent::Queued { newly_queued } => {
                    stats.deliveries += 1;
                    if newly_queued {
                        flush_queue.push_back((s.conn, now));
                    }
                }
                Sent::Discarded => {}
                Sent::Evict(reason) => doomed.push((s.conn, reason)),
            }
        }
        if let Some(bus) = self.bus.as_ref()
            && ev.origin == Origin::Local
            && let Some(message) = crate::bus::encode(&bus.instance, &ev, members.as_deref())
        {
            bus.publish(message);
        }
    }
}

/// What the group gate sees of the server: who could receive an event, and the helper.
struct GateEnv<'a> {
    subs: &'a Subs,
    bus: &'a Option<Bus>,
    lookups: &'a Option<Lookups>,
}

impl Resolver for GateEnv<'_> {
    fn has_audience(&self, repo_id: &str) -> bool {
        self.bus.is_some() || !self.subs.subscribers(repo_id).is_empty()
    }

    fn request(&mut self, group: i64) -> bool {
        self.lookups.as_ref().is_some_and(|l| l.request(group))
    }
}
