//! What a websocket client's messages do: the subscribe policy. A subscription needs a
//! client token for that library (checked by `auth`); a refused one is answered with
//! `jwt-expired` for that library; past `max_repos_per_connection` the connection is
//! closed. A subscribe that lists more libraries than that is refused as a whole before
//! any entry is looked at: each refused entry costs a token check and a reply of about
//! 100 bytes, so an unbounded list let one 256 KiB message of `{}` entries make the
//! server queue 9 MB of replies. Pure: the subscription index changes here, the replies go back to the reactor,
//! which queues them on the socket.

use crate::auth::Verifier;
use crate::metrics::Stats;
use crate::subs::{ConnKey, Subs};
use crate::ws::ClientMsg;

/// What the client must be sent, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// `jwt-expired` for this library.
    JwtExpired(String),
    /// Over `max_repos_per_connection`: close with a policy violation.
    TooManySubscriptions,
}

/// The client's side of a subscription check.
pub struct Policy<'a> {
    pub verifier: &'a Verifier,
    pub max_repos: usize,
    /// Unix seconds, for token expiry.
    pub unix_now: i64,
}

/// Applies one client message of connection `key` to the index.
pub fn apply(msg: ClientMsg, key: ConnKey, subs: &mut Subs, policy: &Policy, stats: &mut Stats) -> Vec<Reply> {
    let mut replies = Vec::new();
    match msg {
        ClientMsg::Subscribe(repos) if repos.len() > policy.max_repos => {
            replies.push(Reply::TooManySubscriptions);
        }
        ClientMsg::Subscribe(repos) => {
            for (repo_id, token) in repos {
                match policy.verifier.verify_client(&token, &repo_id, policy.unix_now) {
                    Ok(grant) => {
                        if subs.count(key) >= policy.max_repos && !subs.is_subscribed(key, &repo_id) {
                            replies.push(Reply::TooManySubscriptions);
                            return replies;
                        }
                        subs.subscribe(key, &repo_id, &grant.username, grant.exp);
                        crate::logsafe::limited!(
                            crate::logsafe::Kind::Lifecycle,
                            "connection {key} subscribed to {} until {}",
                            crate::logsafe::input(&repo_id),
                            grant.exp
                        );
                    }
                    Err(e) => {
                        stats.client_token_rejected(e);
                        crate::logsafe::limited!(
                            crate::logsafe::Kind::ClientTokenRefused,
                            "connection {key}: token for {} refused ({})",
                            crate::logsafe::input(&repo_id),
                            e.label()
                        );
                        replies.push(Reply::JwtExpired(repo_id));
                    }
                }
            }
        }
        ClientMsg::Unsubscribe(repos) => {
            for repo_id in repos {
                if subs.unsubscribe(key, &repo_id) {
                    crate::logsafe::limited!(
                        crate::logsafe::Kind::Lifecycle,
                        "connection {key} unsubscribed from {}",
                        crate::logsafe::input(&repo_id)
                    );
                }
            }
        }
    }
    replies
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::tests::sign;
    use jsonwebtoken::Algorithm;
    use serde_json::json;

    const NOW: i64 = 1_800_000_000;

    fn token(repo: &str, user: &str) -> String {
        sign(
            Algorithm::HS256,
            &json!({"repo_id": repo, "username": user, "exp": NOW + 60}),
            b"k",
        )
    }

    #[test]
    fn good_tokens_subscribe_bad_ones_get_jwt_expired_and_the_cap_closes() {
        let verifier = Verifier::new(b"k");
        let policy = Policy {
            verifier: &verifier,
            max_repos: 3,
            unix_now: NOW,
        };
        let (mut subs, mut stats) = (Subs::default(), Stats::default());
        let msg = ClientMsg::Subscribe(vec![
            ("r1".into(), token("r1", "u")),
            ("r2".into(), token("r1", "u")),
            ("r3".into(), token("r3", "u")),
        ]);
        assert_eq!(
            apply(msg, 0, &mut subs, &policy, &mut stats),
            [Reply::JwtExpired("r2".into())]
        );
        assert!(subs.is_subscribed(0, "r1") && subs.is_subscribed(0, "r3"));
        // Renewing an existing subscription is never over the cap; a fourth library is.
        let msg = ClientMsg::Subscribe(vec![
            ("r1".into(), token("r1", "u")),
            ("r4".into(), token("r4", "u")),
            ("r5".into(), token("r5", "u")),
        ]);
        assert_eq!(
            apply(msg, 0, &mut subs, &policy, &mut stats),
            [Reply::TooManySubscriptions]
        );
        assert!(subs.is_subscribed(0, "r4") && !subs.is_subscribed(0, "r5"));
        let msg = ClientMsg::Unsubscribe(vec!["r1".into()]);
        assert!(apply(msg, 0, &mut subs, &policy, &mut stats).is_empty());
        assert_eq!(subs.count(0), 2);
    }

    #[test]
    fn a_list_longer_than_the_cap_is_refused_whole_before_any_entry_is_checked() {
        let verifier = Verifier::new(b"k");
        let policy = Policy {
            verifier: &verifier,
            max_repos: 2,
            unix_now: NOW,
        };
        let (mut subs, mut stats) = (Subs::default(), Stats::default());
        let msg = ClientMsg::Subscribe(vec![
            ("r1".into(), token("r1", "u")),
            (String::new(), String::new()),
            (String::new(), String::new()),
        ]);
        assert_eq!(
            apply(msg, 0, &mut subs, &policy, &mut stats),
            [Reply::TooManySubscriptions],
            "no jwt-expired for the bad entries"
        );
        assert_eq!(subs.count(0), 0, "not even the good entry: no entry was looked at");
    }
}
