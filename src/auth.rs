//! Token verification: event ("sender") tokens on `/events` and per-library client tokens
//! on websocket subscriptions (PROTOCOL.md sections 4 and 11.2).
//!
//! Both are HMAC JWS tokens signed with the raw bytes of the shared key. The JWT library
//! checks only the signature and the algorithm; every claim is checked here against a `now`
//! handed in by the caller (the event loop's clock for this turn), so expiry is testable
//! and follows the official server's rules exactly:
//! - `exp` (or `Exp`, from 10/11 Go fileservers; claim names match case-insensitively, as
//!   Go's JSON decoding does) must be an integer greater than now;
//! - a future `nbf` is rejected;
//! - HS256, HS384 and HS512 are accepted, `none` and asymmetric algorithms are not.
//!
//! Nothing here ever logs or formats the key or a token.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

/// Why a token was refused; each is a counter label and a debug log reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not three base64url parts, bad JSON, or a header we cannot read.
    Malformed,
    /// Signed with `none`, or with an algorithm other than HS256/384/512.
    Algorithm,
    /// The signature does not match the key.
    Signature,
    /// No integer `exp`, or it is not after now.
    Expired,
    /// `nbf` lies in the future (or is not a number).
    NotYetValid,
    /// A client token for another library than the one subscribed.
    WrongRepo,
    /// An event token that carries a user name: a client token replayed on `/events`.
    ClientTokenOnEvents,
    /// A claim of the wrong type (`username` or `repo_id` not a string).
    BadClaim,
}

impl TokenError {
    /// A short stable label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::Algorithm => "algorithm",
            TokenError::Signature => "signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::WrongRepo => "wrong_repo",
            TokenError::ClientTokenOnEvents => "client_token_on_events",
            TokenError::BadClaim => "bad_claim",
        }
    }
}

/// What a valid client token grants: one subscription, for this user, until `exp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The token's `username` claim ("" when absent, as in the official server).
    pub username: String,
    /// Unix seconds; the subscription ends when `now >= exp`.
    pub exp: i64,
}

/// The shared key, prepared once for verification.
pub struct Verifier {
    key: DecodingKey,
    /// The key before the last reload, still accepted so that tokens signed just before
    /// a key change work while every process picks it up; the reactor forgets it when
    /// the grace ends, by its monotonic clock (a wall clock stepped back by NTP must not
    /// stretch the grace, nor one stepped forward cut it short).
    previous: Option<DecodingKey>,
    validation: Validation,
}

impl Verifier {
    /// Prepares verification with the raw key bytes.
    pub fn new(key: &[u8]) -> Verifier {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
        // Claims are checked below against the loop's clock, with Seafile's own rules.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        Verifier {
            key: DecodingKey::from_secret(key),
            previous: None,
            validation,
        }
    }

    /// Switches to a new key; the current one stays accepted until [`Self::forget_previous`].
    pub fn rotate(&mut self, new_key: &[u8]) {
        let old = std::mem::replace(&mut self.key, DecodingKey::from_secret(new_key));
        self.previous = Some(old);
    }

    /// Stops accepting the key before the last rotation. False if there was none.
    pub fn forget_previous(&mut self) -> bool {
        self.previous.take().is_some()
    }

    fn decode(&self, token: &str, key: &DecodingKey) -> Result<Map<String, Value>, TokenError> {
        jsonwebtoken::decode::<Map<String, Value>>(token, key, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                match e.kind() {
                    ErrorKind::InvalidSignature => TokenError::Signature,
                    ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => TokenError::Algorithm,
                    _ => TokenError::Malformed,
                }
            })
    }

    /// Verifies the signature and returns the claims, with `exp` and `nbf` checked.
    fn claims(&self, token: &str, now: i64) -> Result<Map<String, Value>, TokenError> {
        let claims = match (self.decode(token, &self.key), &self.previous) {
            (Err(TokenError::Signature), Some(old)) => self.decode(token, old)?,
            (result, _) => result?,
        };
        match claim(&claims, "exp").and_then(Value::as_i64) {
            Some(exp) if exp > now => {}
            _ => return Err(TokenError::Expired),
        }
        if let Some(nbf) = claim(&claims, "nbf") {
            match nbf.as_f64() {
                Some(nbf) if nbf <= now as f64 => {}
                _ => return Err(TokenError::NotYetValid),
            }
        }
        Ok(claims)
    }

    /// Verifies a sender token from `/events`. A non-empty `username` means a client's
    /// token is being replayed to forge events, and is refused (section 11.2).
    pub fn verify_event(&self, token: &str, now: i64) -> Result<(), TokenError> {
        let claims = self.claims(token, now)?;
        match claim(&claims, "username") {
            None | Some(Value::Null) => Ok(()),
            Some(Value::String(s)) if s.is_empty() => Ok(()),
            Some(Value::String(_)) => Err(TokenError::ClientTokenOnEvents),
            Some(_) => Err(TokenError::BadClaim),
        }
    }

    /// Verifies the sender token an `/events` request carries in its headers (see
    /// [`event_token`]); a request with none is `Malformed`.
    pub fn verify_event_request(
        &self,
        authorization: Option<&str>,
        seafile_repo_token: Option<&str>,
        now: i64,
    ) -> Result<(), TokenError> {
        match event_token(authorization, seafile_repo_token) {
            Some(token) => self.verify_event(token, now),
            None => Err(TokenError::Malformed),
        }
    }

    /// Verifies a client token for a subscription to `repo_id`.
    pub fn verify_client(&self, token: &str, repo_id: &str, now: i64) -> Result<Grant, TokenError> {
        let claims = self.claims(token, now)?;
        match claim(&claims, "repo_id") {
            Some(Value::String(id)) if id == repo_id => {}
            Some(Value::String(_)) | None | Some(Value::Null) => return Err(TokenError::WrongRepo),
            Some(_) => return Err(TokenError::BadClaim),
        }
        let username = match claim(&claims, "username") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(TokenError::BadClaim),
        };
        let exp = claim(&claims, "exp")
            .and_then(Value::as_i64)
            .ok_or(TokenError::Expired)?;
        Ok(Grant { username, exp })
    }
}

/// Looks a claim up the way Go's JSON decoder matches struct fields: an exact name first,
/// else any name equal ignoring ASCII case (so `Exp` from 10/11 fileservers is `exp`).
fn claim<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    claims.get(name).or_else(|| {
        claims
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

/// Picks the event token out of the request headers: the second space-separated word of
/// `Authorization` (any scheme word, as the official server splits on single spaces), or
/// else the whole `Seafile-Repo-Token` header that 10/11 Go fileservers send.
pub fn event_token<'a>(authorization: Option<&'a str>, seafile_repo_token: Option<&'a str>) -> Option<&'a str> {
    match authorization {
        Some(auth) => auth.split(' ').nth(1).filter(|t| !t.is_empty()),
        None => seafile_repo_token.map(str::trim).filter(|t| !t.is_empty()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    pub const KEY: &[u8] = b"test key #;=";
    const NOW: i64 = 1_800_000_000;

    pub fn sign(alg: Algorithm, claims: &Value, key: &[u8]) -> String {
        encode(&Header::new(alg), claims, &EncodingKey::from_secret(key)).unwrap()
    }

    fn hs256(claims: Value) -> String {
        sign(Algorithm::HS256, &claims, KEY)
    }

    fn verifier() -> Verifier {
        Verifier::new(KEY)
    }

    #[test]
    fn sender_tokens_of_every_producer() {
        let v = verifier();
        // seaf-server: exp only; Go fileserver 12+: with repo_id and empty username;
        // 10/11 fileserver: capital Exp.
        assert_eq!(v.verify_event(&hs256(json!({"exp": NOW + 300})), NOW), Ok(()));
        assert_eq!(
            v.verify_event(&hs256(json!({"exp": NOW + 1, "repo_id": "r", "username": ""})), NOW),
            Ok(())
        );
        assert_eq!(
            v.verify_event(&hs256(json!({"Exp": NOW + 1, "repo_id": "r", "username": ""})), NOW),
            Ok(())
        );
        for alg in [Algorithm::HS384, Algorithm::HS512] {
            assert_eq!(v.verify_event(&sign(alg, &json!({"exp": NOW + 1}), KEY), NOW), Ok(()));
        }
    }

    #[test]
    fn sender_token_refusals() {
        let v = verifier();
        let cases = [
            (hs256(json!({"exp": NOW})), TokenError::Expired),
            (hs256(json!({})), TokenError::Expired),
            (hs256(json!({"exp": 1.9e9})), TokenError::Expired),
            (hs256(json!({"exp": 1_900_000_000.5})), TokenError::Expired),
            (hs256(json!({"exp": "1900000000"})), TokenError::Expired),
            (hs256(json!({"exp": NOW + 9, "nbf": NOW + 5})), TokenError::NotYetValid),
            (hs256(json!({"exp": NOW + 9, "nbf": "x"})), TokenError::NotYetValid),
            (
                hs256(json!({"exp": NOW + 9, "username": "alice", "repo_id": "r"})),
                TokenError::ClientTokenOnEvents,
            ),
            (
                hs256(json!({"exp": NOW + 9, "Username": "alice"})),
                TokenError::ClientTokenOnEvents,
            ),
            (hs256(json!({"exp": NOW + 9, "username": 7})), TokenError::BadClaim),
            (
                sign(Algorithm::HS256, &json!({"exp": NOW + 9}), b"other"),
                TokenError::Signature,
            ),
            ("a.b".to_string(), TokenError::Malformed),
            (String::new(), TokenError::Malformed),
        ];
        for (token, want) in cases {
            assert_eq!(v.verify_event(&token, NOW), Err(want), "{token}");
        }
        assert_eq!(v.verify_event(&hs256(json!({"exp": NOW + 9, "nbf": NOW})), NOW), Ok(()));
    }

    #[test]
    fn alg_none_and_asymmetric_are_refused() {
        use base64_url as b64;
        let v = verifier();
        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(br#"{"exp":1900000000}"#)
        );
        assert!(v.verify_event(&none, NOW).is_err());
        let rs = format!(
            "{}.{}.c2ln",
            b64(br#"{"alg":"RS256","typ":"JWT"}"#),
            b64(br#"{"exp":1900000000}"#)
        );
        assert_eq!(v.verify_event(&rs, NOW), Err(TokenError::Algorithm));
    }

    /// Minimal base64url without padding, for hand-made tokens.
    fn base64_url(input: &[u8]) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in input.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn a_rotated_key_keeps_the_old_one_until_it_is_forgotten() {
        let mut v = verifier();
        let old = hs256(json!({"exp": NOW + 600}));
        assert!(!v.forget_previous(), "nothing to forget yet");
        v.rotate(b"new key");
        let new = sign(Algorithm::HS256, &json!({"exp": NOW + 600}), b"new key");
        let wrong = sign(Algorithm::HS256, &json!({"exp": NOW + 600}), b"wrong key");
        assert_eq!(v.verify_event(&new, NOW), Ok(()));
        assert_eq!(v.verify_event(&old, NOW), Ok(()));
        assert_eq!(v.verify_event(&wrong, NOW), Err(TokenError::Signature));
        // The old key's tokens are still checked like any other: expiry applies.
        assert_eq!(v.verify_event(&old, NOW + 600), Err(TokenError::Expired));
        assert!(v.forget_previous());
        assert_eq!(v.verify_event(&old, NOW), Err(TokenError::Signature));
        assert_eq!(v.verify_event(&new, NOW), Ok(()));
    }

    #[test]
    fn client_tokens() {
        let v = verifier();
        let t = hs256(json!({"exp": NOW + 60, "repo_id": "r1", "username": "a@b"}));
        assert_eq!(
            v.verify_client(&t, "r1", NOW),
            Ok(Grant {
                username: "a@b".into(),
                exp: NOW + 60
            })
        );
        assert_eq!(v.verify_client(&t, "r2", NOW), Err(TokenError::WrongRepo));
        assert_eq!(v.verify_client(&t, "r1", NOW + 60), Err(TokenError::Expired));
        let t = hs256(json!({"Exp": NOW + 60, "repo_id": "r1", "username": "a@b"}));
        assert_eq!(v.verify_client(&t, "r1", NOW).unwrap().exp, NOW + 60);
        let t = hs256(json!({"exp": NOW + 60, "repo_id": "r1"}));
        assert_eq!(v.verify_client(&t, "r1", NOW).unwrap().username, "");
        let t = hs256(json!({"exp": NOW + 60, "repo_id": 5}));
        assert_eq!(v.verify_client(&t, "5", NOW), Err(TokenError::BadClaim));
    }

    #[test]
    fn event_token_extraction() {
        assert_eq!(event_token(Some("Token abc"), None), Some("abc"));
        assert_eq!(event_token(Some("Bearer abc"), None), Some("abc"));
        assert_eq!(event_token(Some("abc"), None), None);
        assert_eq!(event_token(Some("Token  abc"), None), None);
        assert_eq!(event_token(None, Some("abc")), Some("abc"));
        assert_eq!(event_token(None, None), None);
    }
}
