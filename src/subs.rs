//! The two-way subscription index: library -> subscribed connections (for fan-out) and
//! connection -> its subscriptions (for unsubscribe, expiry and teardown).
//!
//! Every operation is O(1) apart from the fan-out walk itself: each side remembers where
//! its twin entry sits in the other side's vector, and removal is a `swap_remove` that
//! fixes up the one entry it moved. A library with no subscribers left is removed, so the
//! index holds only what is live. It knows nothing of sockets or clocks.

use slab::Slab;
use std::collections::HashMap;

/// A connection, by its slab key.
pub type ConnKey = usize;

/// One subscription of a library, as fan-out sees it.
#[derive(Debug)]
pub struct Subscriber {
    pub conn: ConnKey,
    /// The user of the token this subscription was made with (user-scoped events are
    /// matched against it, per subscription, not per socket).
    pub user: Box<str>,
    /// Where this subscription sits in the connection's list.
    slot: u32,
}

#[derive(Debug)]
struct Repo {
    id: Box<str>,
    subscribers: Vec<Subscriber>,
}

#[derive(Debug, Clone, Copy)]
struct Sub {
    repo: u32,
    /// Where this subscription sits in the library's member list.
    member: u32,
    /// Unix seconds at which the token runs out.
    exp: i64,
}

#[derive(Debug, Default)]
struct ConnSubs {
    subs: Vec<Sub>,
    /// A lower bound on the earliest `exp` of `subs` (exact after each expiry pass), so
    /// the periodic check is one comparison per connection.
    next_exp: i64,
}

/// The index.
#[derive(Debug, Default)]
pub struct Subs {
    ids: HashMap<Box<str>, u32>,
    repos: Slab<Repo>,
    conns: Vec<ConnSubs>,
    total: usize,
}

impl Subs {
    /// Subscribes `conn` to `repo_id` until `exp`, for `user`. Subscribing again replaces
    /// the user and expiry (the newest token wins). Returns false if it already existed.
    pub fn subscribe(&mut self, conn: ConnKey, repo_id: &str, user: &str, exp: i64) -> bool {
        if self.conns.len() <= conn {
            self.conns.resize_with(conn + 1, ConnSubs::default);
        }
        let repo = match self.ids.get(repo_id) {
            Some(&r) => r,
            None => {
                let r = self.repos.insert(Repo {
                    id: repo_id.into(),
                    subscribers: Vec::new(),
                }) as u32;
                self.ids.insert(repo_id.into(), r);
                r
            }
        };
        let (Some(cs), Some(rp)) = (self.conns.get_mut(conn), self.repos.get_mut(repo as usize)) else {
            return false;
        };
        if let Some(sub) = cs.subs.iter_mut().find(|s| s.repo == repo) {
            sub.exp = exp;
            if let Some(m) = rp.subscribers.get_mut(sub.member as usize) {
                m.user = user.into();
            }
            cs.next_exp = cs.subs.iter().map(|s| s.exp).min().unwrap_or(i64::MAX);
            return false;
        }
        if cs.subs.is_empty() || exp < cs.next_exp {
            cs.next_exp = exp;
        }
        let slot = cs.subs.len() as u32;
        cs.subs.push(Sub {
            repo,
            member: rp.subscribers.len() as u32,
            exp,
        });
        rp.subscribers.push(Subscriber {
            conn,
            user: user.into(),
            slot,
        });
        self.total += 1;
        true
    }

    /// Removes one subscription; false if there was none.
    pub fn unsubscribe(&mut self, conn: ConnKey, repo_id: &str) -> bool {
        let Some(&repo) = self.ids.get(repo_id) else {
            return false;
        };
        let Some(slot) = self
            .conns
            .get(conn)
            .and_then(|cs| cs.subs.iter().position(|s| s.repo == repo))
        else {
            return false;
        };
        self.remove_slot(conn, slot);
        true
    }

    /// Removes every subscription of `conn` (on close).
    pub fn remove_conn(&mut self, conn: ConnKey) {
        while let Some(last) = self.conns.get(conn).and_then(|cs| cs.subs.len().checked_sub(1)) {
            self.remove_slot(conn, last);
        }
        if let Some(cs) = self.conns.get_mut(conn) {
            // Give the memory back: a later connection may reuse this key.
            *cs = ConnSubs::default();
        }
    }

    /// Removes and returns the ids of `conn`'s subscriptions whose token ran out at `now`.
    pub fn expire(&mut self, conn: ConnKey, now: i64) -> Vec<Box<str>> {
        let mut expired = Vec::new();
        let Some(cs) = self.conns.get(conn) else {
            return expired;
        };
        if cs.subs.is_empty() || cs.next_exp > now {
            return expired;
        }
        let mut slot = 0;
        while let Some(sub) = self.conns.get(conn).and_then(|cs| cs.subs.get(slot)).copied() {
            if sub.exp <= now {
                if let Some(r) = self.repos.get(sub.repo as usize) {
                    expired.push(r.id.clone());
                }
                // The last entry moves into `slot`; look at it next.
                self.remove_slot(conn, slot);
            } else {
                slot += 1;
            }
        }
        if let Some(cs) = self.conns.get_mut(conn) {
            cs.next_exp = cs.subs.iter().map(|s| s.exp).min().unwrap_or(i64::MAX);
        }
        expired
    }

    /// Whether `conn` has a subscription that may have run out at `now`.
    pub fn has_expired(&self, conn: ConnKey, now: i64) -> bool {
        self.conns
            .get(conn)
            .is_some_and(|cs| !cs.subs.is_empty() && cs.next_exp <= now)
    }

    /// The subscribers of a library (empty if none).
    pub fn subscribers(&self, repo_id: &str) -> &[Subscriber] {
        match self.ids.get(repo_id).and_then(|&r| self.repos.get(r as usize)) {
            Some(r) => &r.subscribers,
            None => &[],
        }
    }

    /// How many libraries `conn` is subscribed to.
    pub fn count(&self, conn: ConnKey) -> usize {
        self.conns.get(conn).map_or(0, |cs| cs.subs.len())
    }

    /// Whether `conn` is subscribed to `repo_id`.
    pub fn is_subscribed(&self, conn: ConnKey, repo_id: &str) -> bool {
        let Some(&repo) = self.ids.get(repo_id) else {
            return false;
        };
        self.conns
            .get(conn)
            .is_some_and(|cs| cs.subs.iter().any(|s| s.repo == repo))
    }

    /// Releases capacity left over from connections and libraries that are gone.
    pub fn shrink(&mut self) {
        while self.conns.last().is_some_and(|c| c.subs.is_empty()) {
            self.conns.pop();
        }
        self.conns.shrink_to_fit();
        self.ids.shrink_to_fit();
        self.repos.shrink_to_fit();
    }

    /// Libraries with at least one subscriber.
    pub fn repo_count(&self) -> usize {
        self.repos.len()
    }

    /// All subscriptions.
    pub fn total(&self) -> usize {
        self.total
    }

    fn remove_slot(&mut self, conn: ConnKey, slot: usize) {
        let Some(cs) = self.conns.get_mut(conn) else {
            return;
        };
        if slot >= cs.subs.len() {
            return;
        }
        let sub = cs.subs.swap_remove(slot);
        // The subscription that moved into `slot` must tell its member where it now is.
        if let Some(moved) = cs.subs.get(slot).copied()
            && let Some(m) = self
                .repos
                .get_mut(moved.repo as usize)
                .and_then(|r| r.subscribers.get_mut(moved.member as usize))
        {
            m.slot = slot as u32;
        }
        let repo_key = sub.repo as usize;
        let Some(repo) = self.repos.get_mut(repo_key) else {
            return;
        };
        let idx = sub.member as usize;
        if idx < repo.subscribers.len() {
            repo.subscribers.swap_remove(idx);
            // The member that moved into `idx` must tell its subscription where it now is.
            if let Some(moved) = repo.subscribers.get(idx)
                && let Some(s) = self
                    .conns
                    .get_mut(moved.conn)
                    .and_then(|c| c.subs.get_mut(moved.slot as usize))
            {
                s.member = idx as u32;
            }
        }
        self.total -= 1;
        if repo.subscribers.is_empty() {
            let gone = self.repos.remove(repo_key);
            self.ids.remove(&gone.id);
        }
    }

    /// Checks that both sides agree; for tests.
    #[cfg(test)]
    fn check(&self) {
        let mut n = 0;
        for (rk, repo) in &self.repos {
            assert!(!repo.subscribers.is_empty());
            assert_eq!(self.ids[&repo.id], rk as u32);
            for (i, m) in repo.subscribers.iter().enumerate() {
                let s = self.conns[m.conn].subs[m.slot as usize];
                assert_eq!((s.repo as usize, s.member as usize), (rk, i));
                n += 1;
            }
        }
        for (c, cs) in self.conns.iter().enumerate() {
            for (i, s) in cs.subs.iter().enumerate() {
                let m = &self.repos[s.repo as usize].subscribers[s.member as usize];
                assert_eq!((m.conn, m.slot as usize), (c, i));
            }
        }
        assert_eq!(n, self.total);
        assert_eq!(self.ids.len(), self.repos.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(s: &Subs, repo: &str) -> Vec<(ConnKey, String)> {
        let mut v: Vec<_> = s
            .subscribers(repo)
            .iter()
            .map(|m| (m.conn, m.user.to_string()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn subscribe_unsubscribe_and_cleanup() {
        let mut s = Subs::default();
        assert!(s.subscribe(0, "r1", "a", 100));
        assert!(s.subscribe(1, "r1", "b", 100));
        assert!(s.subscribe(1, "r2", "b", 100));
        assert!(!s.subscribe(1, "r1", "c", 200), "resubscribe replaces");
        s.check();
        assert_eq!(users(&s, "r1"), vec![(0, "a".into()), (1, "c".into())]);
        assert_eq!((s.repo_count(), s.total(), s.count(1)), (2, 3, 2));
        assert!(s.unsubscribe(0, "r1"));
        assert!(!s.unsubscribe(0, "r1"));
        assert!(!s.unsubscribe(0, "nope"));
        s.check();
        s.remove_conn(1);
        s.check();
        assert_eq!((s.repo_count(), s.total()), (0, 0));
        assert!(s.subscribers("r1").is_empty());
    }

    #[test]
    fn expiry_removes_only_what_ran_out() {
        let mut s = Subs::default();
        s.subscribe(3, "a", "u", 10);
        s.subscribe(3, "b", "u", 20);
        s.subscribe(3, "c", "u", 10);
        s.subscribe(4, "a", "v", 10);
        assert!(!s.has_expired(3, 9));
        assert!(s.expire(3, 9).is_empty());
        assert!(s.has_expired(3, 10));
        let mut gone = s.expire(3, 10);
        gone.sort();
        assert_eq!(gone, vec!["a".into(), "c".into()] as Vec<Box<str>>);
        s.check();
        assert!(!s.has_expired(3, 19));
        assert!(s.is_subscribed(3, "b") && s.is_subscribed(4, "a"));
        assert_eq!(s.expire(3, 20), vec!["b".into()] as Vec<Box<str>>);
        assert!(!s.has_expired(3, i64::MAX - 1));
        s.check();
    }

    #[test]
    fn random_operations_keep_both_sides_consistent() {
        // A small deterministic generator; no external crates needed.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut s = Subs::default();
        let repos = ["r0", "r1", "r2", "r3", "r4"];
        for step in 0..5000 {
            let conn = next(8) as usize;
            let repo = repos[next(5) as usize];
            match next(10) {
                0..=4 => {
                    s.subscribe(conn, repo, "u", next(50) as i64);
                }
                5..=6 => {
                    s.unsubscribe(conn, repo);
                }
                7 => s.remove_conn(conn),
                _ => {
                    let now = next(50) as i64;
                    for id in s.expire(conn, now) {
                        assert!(!s.is_subscribed(conn, &id));
                    }
                    assert!(!s.has_expired(conn, now), "step {step}");
                }
            }
            s.check();
        }
    }
}
