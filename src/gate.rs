//! Group-scoped delivery: the state machine between an event and its audience.
//!
//! Most events go straight through. A group-scoped folder permission event needs the
//! group's members, which a helper thread looks up (`groups::Lookups`), so it waits, and
//! so does every later event of *its* library, so that a library's events never overtake
//! one another; other libraries are not delayed. This module owns the held queues, the
//! member cache, and the pending and failed lookups. It is pure: events, lookup results
//! and `now` come in; [`Go`] ("deliver this now to this audience") comes out; the lookup
//! requests go out through a [`Resolver`] the caller supplies. No I/O, no clock.

use crate::config::Config;
use crate::conn::{Millis, ms};
use crate::event::{Audience, Event};
use crate::groups::Reply;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// Events held back behind a pending group lookup, over all libraries. Past it, a new
/// event for a held library is dropped (and counted) rather than queued without bound.
pub const MAX_HELD_EVENTS: usize = 10_000;

/// Groups whose member lists are cached at once; past it, stale entries are dropped and,
/// if that is not enough, the whole cache.
pub const MAX_CACHED_GROUPS: usize = 4096;

/// A group's members: user names.
pub type Members = Arc<HashSet<Box<str>>>;

/// An event to deliver now.
#[derive(Debug)]
pub struct Go {
    pub event: Event,
    /// For a group-scoped event, the group's members: the audience is the subscriptions
    /// made by them. `None`: the event's own audience says who.
    pub members: Option<Members>,
}

/// What the gate needs from the rest of the server.
pub trait Resolver {
    /// Whether anyone, here or on another instance, could receive an event of `repo_id`
    /// (if not, a group event needs no lookup at all).
    fn has_audience(&self, repo_id: &str) -> bool;
    /// Asks the helper for a group's members; false if its queue is full.
    fn request(&mut self, group: i64) -> bool;
}

/// Counters for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GroupCounts {
    pub lookups: u64,
    pub lookup_failures: u64,
    /// Group events dropped: no database, a failed lookup, too many pending lookups.
    pub group_events_dropped: u64,
    /// Events of a held library dropped at `MAX_HELD_EVENTS`.
    pub held_events_dropped: u64,
}

/// A group's members, as of `fetched`.
struct Cached {
    members: Members,
    fetched: Millis,
}

/// What became of an event offered for delivery.
enum Try {
    Go(Go),
    /// Delivered to nobody (dropped with a reason, or nobody could receive it).
    Done,
    /// Must wait for its group's lookup.
    Wait(Event),
}

pub struct Gate {
    /// Whether a group database is configured at all.
    database: bool,
    cache_ttl: Millis,
    /// How long a lookup may stay unanswered before it counts as failed.
    lookup_limit: Millis,
    cache: HashMap<i64, Cached>,
    /// Lookups sent to the helper and not answered yet, with when they were sent.
    pending: HashMap<i64, Millis>,
    /// Groups whose lookup just failed; only set while held events are being released.
    failed: HashSet<i64>,
    /// Per library, the events held in arrival order behind a group event.
    held: HashMap<Box<str>, VecDeque<Event>>,
    /// How many events are held (bounded by [`MAX_HELD_EVENTS`]) and the memory they
    /// take ([`Event::held_bytes`], counted in the output budget: held events are output
    /// not yet queued).
    tally: HeldTally,
    pub counts: GroupCounts,
}

/// The held events' number and memory, kept apart from the queues that hold them so
/// both can change in one borrow.
#[derive(Debug, Default)]
struct HeldTally {
    count: usize,
    bytes: usize,
}

impl HeldTally {
    fn hold(&mut self, ev: &Event) {
        self.count += 1;
        self.bytes += ev.held_bytes();
    }

    fn release(&mut self, ev: &Event) {
        self.count -= 1;
        self.bytes -= ev.held_bytes();
    }
}

impl Gate {
    pub fn new(config: &Config, database: bool) -> Gate {
        let mut gate = Gate {
            database,
            cache_ttl: 0,
            lookup_limit: 0,
            cache: HashMap::new(),
            pending: HashMap::new(),
            failed: HashSet::new(),
            held: HashMap::new(),
            tally: HeldTally::default(),
            counts: GroupCounts::default(),
        };
        gate.configure(config);
        gate
    }

    /// Takes the (reloaded) cache TTL and lookup timeout.
    pub fn configure(&mut self, config: &Config) {
        self.cache_ttl = ms(config.group_cache_ttl);
        // The helper retries twice within its timeout; it should always answer well
        // before this.
        self.lookup_limit = 4 * ms(config.group_lookup_timeout) + 2_000;
    }

    /// Events held right now.
    pub fn held(&self) -> usize {
        self.tally.count
    }

    /// The memory the held events take.
    pub fn held_bytes(&self) -> usize {
        self.tally.bytes
    }

    /// Lookups not answered yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Offers an event: it goes now, or waits behind its library's held events or its
    /// own group lookup, or is dropped.
    pub fn offer(&mut self, ev: Event, now: Millis, resolver: &mut impl Resolver) -> Option<Go> {
        if let Some(queue) = self.held.get_mut(ev.repo_id.as_str()) {
            if self.tally.count >= MAX_HELD_EVENTS {
                self.counts.held_events_dropped += 1;
                log::warn!(
                    "dropped {} event for repo {}: {MAX_HELD_EVENTS} events already wait for group lookups",
                    ev.kind.name(),
                    crate::logsafe::input(&ev.repo_id)
                );
                return None;
            }
            self.tally.hold(&ev);
            queue.push_back(ev);
            return None;
        }
        match self.try_deliver(ev, now, resolver) {
            Try::Go(go) => Some(go),
            Try::Done => None,
            Try::Wait(ev) => {
                let key = Box::from(ev.repo_id.as_str());
                self.tally.hold(&ev);
                self.held.insert(key, VecDeque::from([ev]));
                None
            }
        }
    }

    /// Takes the helper's answers, then releases every held event that can now go.
    pub fn on_replies(
        &mut self,
        replies: impl IntoIterator<Item = Reply>,
        now: Millis,
        resolver: &mut impl Resolver,
    ) -> Vec<Go> {
        for reply in replies {
            self.pending.remove(&reply.group);
            match reply.result {
                Ok(members) => {
                    if self.cache.len() >= MAX_CACHED_GROUPS {
                        let ttl = self.cache_ttl;
                        self.cache.retain(|_, c| now.saturating_sub(c.fetched) < ttl);
                        if self.cache.len() >= MAX_CACHED_GROUPS {
                            self.cache.clear();
                        }
                    }
                    let members = Arc::new(members.into_iter().map(Box::from).collect());
                    self.cache.insert(reply.group, Cached { members, fetched: now });
                }
                Err(e) => {
                    self.counts.lookup_failures += 1;
                    log::warn!("group lookup for group {} failed: {e}", reply.group);
                    self.failed.insert(reply.group);
                }
            }
        }
        self.release(now, resolver)
    }

    /// Lookups the helper never answered count as failed, so no library stays held
    /// forever. Called once a tick.
    pub fn expire(&mut self, now: Millis, resolver: &mut impl Resolver) -> Vec<Go> {
        let limit = self.lookup_limit;
        let overdue: Vec<i64> = self
            .pending
            .iter()
            .filter(|(_, t)| now.saturating_sub(**t) > limit)
            .map(|(g, _)| *g)
            .collect();
        if overdue.is_empty() {
            return Vec::new();
        }
        for group in overdue {
            self.pending.remove(&group);
            self.counts.lookup_failures += 1;
            log::warn!("group lookup for group {group} got no answer in time");
            self.failed.insert(group);
        }
        self.release(now, resolver)
    }

    /// Releases held events from the front of each library's queue until one must wait.
    fn release(&mut self, now: Millis, resolver: &mut impl Resolver) -> Vec<Go> {
        let mut out = Vec::new();
        let repos: Vec<Box<str>> = self.held.keys().cloned().collect();
        for repo in repos {
            while let Some(ev) = self.held.get_mut(&repo).and_then(VecDeque::pop_front) {
                self.tally.release(&ev);
                match self.try_deliver(ev, now, resolver) {
                    Try::Go(go) => out.push(go),
                    Try::Done => {}
                    Try::Wait(ev) => {
                        if let Some(queue) = self.held.get_mut(&repo) {
                            self.tally.hold(&ev);
                            queue.push_front(ev);
                        }
                        break;
                    }
                }
            }
            if self.held.get(&repo).is_some_and(VecDeque::is_empty) {
                self.held.remove(&repo);
            }
        }
        self.failed.clear();
        out
    }

    /// Lets an event go now, or says it must wait for a group lookup (which this then
    /// requests).
    fn try_deliver(&mut self, ev: Event, now: Millis, resolver: &mut impl Resolver) -> Try {
        let Audience::Group(group) = ev.audience else {
            return Try::Go(Go {
                event: ev,
                members: None,
            });
        };
        // Nobody to tell, here or anywhere: no lookup at all.
        if !resolver.has_audience(&ev.repo_id) {
            return Try::Done;
        }
        // Never broadcast a group event: that would apply one group's permission to all.
        if !self.database {
            return self.drop_event(&ev, group, "no group database is configured");
        }
        if let Some(cached) = self.cache.get(&group)
            && now.saturating_sub(cached.fetched) < self.cache_ttl
        {
            let members = Some(cached.members.clone());
            return Try::Go(Go { event: ev, members });
        }
        if self.failed.contains(&group) {
            return self.drop_event(&ev, group, "the group lookup failed");
        }
        if !self.pending.contains_key(&group) {
            if !resolver.request(group) {
                return self.drop_event(&ev, group, "too many group lookups are pending");
            }
            self.counts.lookups += 1;
            self.pending.insert(group, now);
            log::debug!("looking up members of group {group}");
        }
        Try::Wait(ev)
    }

    fn drop_event(&mut self, ev: &Event, group: i64, why: &str) -> Try {
        self.counts.group_events_dropped += 1;
        log::warn!(
            "dropped group-scoped {} event for repo {} (group {group}): {why}",
            ev.kind.name(),
            crate::logsafe::input(&ev.repo_id)
        );
        Try::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Kind, Origin};
    use std::time::Duration;

    /// A resolver that records requests and can refuse them.
    #[derive(Default)]
    struct Fake {
        requested: Vec<i64>,
        full: bool,
        nobody: bool,
    }

    impl Resolver for Fake {
        fn has_audience(&self, _: &str) -> bool {
            !self.nobody
        }
        fn request(&mut self, group: i64) -> bool {
            self.requested.push(group);
            !self.full
        }
    }

    fn gate() -> Gate {
        let config = Config {
            group_cache_ttl: Duration::from_secs(10),
            group_lookup_timeout: Duration::from_secs(1),
            ..Config::default()
        };
        Gate::new(&config, true)
    }

    fn event(repo: &str, audience: Audience, n: u32) -> Event {
        Event {
            kind: Kind::RepoUpdate,
            repo_id: repo.into(),
            audience,
            frame: format!("{n}\n").into(),
            origin: Origin::Local,
        }
    }

    fn reply(group: i64, members: &[&str]) -> Reply {
        Reply {
            group,
            result: Ok(members.iter().map(|m| m.to_string()).collect()),
        }
    }

    fn frames(gos: &[Go]) -> Vec<String> {
        gos.iter().map(|g| g.event.frame.trim().to_string()).collect()
    }

    #[test]
    fn a_library_waits_behind_its_group_event_and_others_do_not() {
        let (mut g, mut r) = (gate(), Fake::default());
        assert!(g.offer(event("a", Audience::Group(7), 1), 0, &mut r).is_none());
        assert!(g.offer(event("a", Audience::All, 2), 1, &mut r).is_none());
        assert!(g.offer(event("a", Audience::User("u".into()), 3), 2, &mut r).is_none());
        let other = g.offer(event("b", Audience::All, 4), 3, &mut r).expect("b is not held");
        assert_eq!(other.event.frame.as_str(), "4\n");
        assert_eq!((g.held(), g.pending(), r.requested.clone()), (3, 1, vec![7]));
        let out = g.on_replies([reply(7, &["x", "y"])], 5, &mut r);
        assert_eq!(frames(&out), ["1", "2", "3"]);
        let members = out[0].members.as_ref().expect("members of group 7");
        assert!(members.contains("x") && members.contains("y"));
        assert!(out[1].members.is_none());
        assert_eq!(g.held(), 0);
    }

    #[test]
    fn the_cache_is_used_until_it_expires() {
        let (mut g, mut r) = (gate(), Fake::default());
        g.offer(event("a", Audience::Group(7), 1), 0, &mut r);
        g.on_replies([reply(7, &["x"])], 0, &mut r);
        assert!(g.offer(event("a", Audience::Group(7), 2), 9_999, &mut r).is_some());
        assert_eq!(r.requested, [7]);
        assert!(g.offer(event("a", Audience::Group(7), 3), 10_000, &mut r).is_none());
        assert_eq!(r.requested, [7, 7], "looked up again after the TTL");
        assert_eq!(g.counts.lookups, 2);
    }

    #[test]
    fn a_failed_lookup_drops_its_events_and_lets_the_rest_go() {
        let (mut g, mut r) = (gate(), Fake::default());
        g.offer(event("a", Audience::Group(7), 1), 0, &mut r);
        g.offer(event("a", Audience::All, 2), 0, &mut r);
        let failed = Reply {
            group: 7,
            result: Err("down".into()),
        };
        let out = g.on_replies([failed], 1, &mut r);
        assert_eq!(frames(&out), ["2"]);
        assert_eq!(g.counts.group_events_dropped, 1);
        assert_eq!(g.counts.lookup_failures, 1);
        // The failure is forgotten once released: the next event asks again.
        g.offer(event("a", Audience::Group(7), 3), 2, &mut r);
        assert_eq!(r.requested, [7, 7]);
    }

    #[test]
    fn an_unanswered_lookup_expires_and_releases() {
        let (mut g, mut r) = (gate(), Fake::default());
        g.offer(event("a", Audience::Group(7), 1), 0, &mut r);
        g.offer(event("a", Audience::All, 2), 0, &mut r);
        assert!(g.expire(6_000, &mut r).is_empty(), "within 4 x timeout + 2 s");
        assert_eq!(frames(&g.expire(6_001, &mut r)), ["2"]);
        assert_eq!((g.held(), g.pending()), (0, 0));
    }

    #[test]
    fn no_database_no_audience_and_a_full_helper_never_hold() {
        let config = Config::default();
        let mut r = Fake::default();
        let mut none = Gate::new(&config, false);
        assert!(none.offer(event("a", Audience::Group(7), 1), 0, &mut r).is_none());
        assert_eq!((none.held(), none.counts.group_events_dropped), (0, 1));
        let mut g = gate();
        r.nobody = true;
        assert!(g.offer(event("a", Audience::Group(7), 1), 0, &mut r).is_none());
        assert_eq!((g.held(), g.counts.group_events_dropped, r.requested.len()), (0, 0, 0));
        r.nobody = false;
        r.full = true;
        assert!(g.offer(event("a", Audience::Group(7), 1), 0, &mut r).is_none());
        assert_eq!((g.held(), g.counts.group_events_dropped), (0, 1));
    }

    #[test]
    fn held_events_are_bounded() {
        let (mut g, mut r) = (gate(), Fake::default());
        g.offer(event("a", Audience::Group(7), 0), 0, &mut r);
        for n in 1..MAX_HELD_EVENTS as u32 + 5 {
            g.offer(event("a", Audience::All, n), 0, &mut r);
        }
        assert_eq!(g.held(), MAX_HELD_EVENTS);
        assert_eq!(g.counts.held_events_dropped, 5);
    }
}
