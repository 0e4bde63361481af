//! The self-test's first checks: the configuration and its key, then the local server
//! (`/ping`, and a signed event on `/events` as seaf-server posts it).

use super::client::{self, Url};
use super::report::Check;
use super::{Ctx, Loaded};
use crate::config::{self, KeyWeakness};
use std::time::Instant;

/// What seaf-server's sender tokens live: five minutes.
const SEAF_SERVER_TOKEN_LIFETIME: i64 = 300;

/// `config`, `key`, and `key-agreement` when two places hold different keys.
pub(super) fn configuration(loaded: &Loaded, env: &dyn Fn(&str) -> Option<String>) -> Vec<Check> {
    let c = &loaded.config;
    let mut checks = Vec::new();
    let source_of = |key: &str| {
        loaded
            .sources
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, s)| s.clone())
            .unwrap_or_else(|| "default".into())
    };
    // Grouped by origin: one file, the environment, a key file or credential.
    let mut origins: Vec<(String, Vec<&str>)> = Vec::new();
    for (key, source) in loaded.sources.iter().filter(|(k, _)| *k != "jwt_private_key") {
        let suffix = format!(" [{}] {key}", config::SECTION);
        let origin = match source.strip_suffix(&suffix) {
            Some(file) => file.to_string(),
            None if source.starts_with("environment variable ") => "the environment".to_string(),
            None => source.clone(),
        };
        let shown = if origin == "the environment" {
            source.trim_start_matches("environment variable ")
        } else {
            key
        };
        match origins.iter_mut().find(|(o, _)| *o == origin) {
            Some((_, keys)) => keys.push(shown),
            None => origins.push((origin, vec![shown])),
        }
    }
    let mut seen = format!(
        "listen {}; key from {}",
        c.listen_address(),
        source_of("jwt_private_key")
    );
    for (origin, keys) in &origins {
        seen.push_str(&format!("; from {origin}: {}", keys.join(", ")));
    }
    if origins.is_empty() {
        seen.push_str("; everything else default");
    }
    seen.push_str(&format!(
        "; group database: {}",
        loaded.backend.as_ref().map_or("none".to_string(), |b| b.describe())
    ));
    checks.push(Check::pass("config", seen));

    let len = c.jwt_private_key.len();
    checks.push(match config::key_weakness(&c.jwt_private_key) {
        Some(KeyWeakness::Published) => Check::fail(
            "key",
            format!("the key ({}) is an example published in Seafile's manual or this project's examples: anyone who read it can forge events and subscriptions", source_of("jwt_private_key")),
            format!("{}, then restart this server, seaf-server and seahub", capitalize(config::GENERATE_HINT)),
        ),
        Some(KeyWeakness::Short(n)) => Check::warn(
            "key",
            format!("the key is only {n} bytes long (at least {} recommended)", config::MIN_KEY_BYTES),
            capitalize(config::GENERATE_HINT),
        ),
        None => Check::pass("key", format!("{len} bytes, not a published example")),
    });

    // The key in seafile.conf, when another source overrides it.
    let file_key = std::fs::read_to_string(loaded.config_dir.join("seafile.conf"))
        .ok()
        .and_then(|text| {
            config::ini_section("seafile.conf", &text, config::SECTION)
                .ok()
                .flatten()
        })
        .and_then(|s| {
            s.into_iter()
                .rev()
                .find(|(k, _)| k == "jwt_private_key")
                .map(|(_, v)| v)
        });
    let key_source = source_of("jwt_private_key");
    if let Some(file_key) = file_key
        && !key_source.contains("seafile.conf")
        && file_key.as_bytes() != c.jwt_private_key
    {
        let env_note = if env("JWT_PRIVATE_KEY").is_some() {
            "seaf-server of Seafile 10/11 signs with seafile.conf's, of 12/13 with JWT_PRIVATE_KEY in the Seafile container's environment"
        } else {
            "seaf-server of Seafile 10/11 signs with seafile.conf's"
        };
        checks.push(Check::warn(
            "key-agreement",
            format!("this server uses the key from {key_source}, which differs from seafile.conf [notification] jwt_private_key: {env_note}"),
            "Make both the same key (on Seafile 12/13, the one in the Seafile .env), or remove the one no component should use",
        ));
    }
    checks
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

const START_FIX: &str = "Start the server (systemctl start notification-server, or docker compose up -d notification-server), \
     or point host and port (seafile.conf [notification], NOTIFICATION_SERVER_HOST/PORT) at where it listens";

/// `local-ping`: the configured address answers `/ping`.
pub(super) fn ping(ctx: &Ctx) -> Check {
    let Some(addr) = ctx.local else {
        return Check::fail(
            "local-ping",
            format!("cannot resolve {}", ctx.loaded.config.listen_address()),
            "Set host to an address of this box (seafile.conf [notification] host or NOTIFICATION_SERVER_HOST)",
        );
    };
    let started = Instant::now();
    match client::request(&Url::local(addr), &ctx.tls, "GET", "/ping", &[], b"") {
        Ok(a) if a.status == 200 && a.text() == "{\"ret\": \"pong\"}\n" => Check::pass(
            "local-ping",
            format!("{addr} answered /ping in {}", super::millis(started.elapsed())),
        ),
        Ok(a) => Check::fail(
            "local-ping",
            format!(
                "{addr}/ping answered {} {:?}: another program holds the port",
                a.status,
                excerpt(&a.text())
            ),
            "Stop the other program (often the official notification server) or move one of them to another port",
        ),
        Err(e) => Check::fail("local-ping", format!("no answer from {addr}: {e}"), START_FIX),
    }
}

/// `local-events`: an event signed with the key, posted as seaf-server posts it, is
/// accepted. A refusal is diagnosed by a second token that differs only in its expiry.
pub(super) fn event(ctx: &Ctx) -> Check {
    let Some(addr) = ctx.local else {
        return Check::fail("local-events", "no local address", START_FIX);
    };
    let url = Url::local(addr);
    let post = |lifetime: i64| -> Result<client::Answer, String> {
        let token = super::event_token(ctx.key(), lifetime)?;
        let body = test_event(&ctx.repo);
        let auth = format!("Token {token}");
        client::request(
            &url,
            &ctx.tls,
            "POST",
            "/events",
            &[("Authorization", &auth), ("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .map_err(|e| e.to_string())
    };
    let started = Instant::now();
    match post(SEAF_SERVER_TOKEN_LIFETIME) {
        Ok(a) if a.status == 200 => Check::pass(
            "local-events",
            format!(
                "{addr}/events accepted an event signed with the key, as seaf-server posts it, in {}",
                super::millis(started.elapsed())
            ),
        ),
        Ok(a) if a.status == 400 => {
            // Only the signature or the expiry can refuse this token; a far expiry tells which.
            let far = post(10 * 365 * 24 * 3600);
            if far.is_ok_and(|a| a.status == 200) {
                Check::fail(
                    "local-events",
                    format!(
                        "{addr}/events refused the event as expired (400): the server's clock is ahead of this one by more than 5 minutes"
                    ),
                    "Set the clock with NTP (timedatectl set-ntp true) on the box or container the server runs in",
                )
            } else {
                Check::fail(
                    "local-events",
                    format!(
                        "{addr}/events refused the event (400, the server logs `bad token (signature)`): the running server holds another key than this configuration, so seaf-server's events signed with this key are refused too"
                    ),
                    "Give the server and seaf-server the same key, then reload it (systemctl reload notification-server) or restart it; check that JWT_PRIVATE_KEY in its environment does not override seafile.conf",
                )
            }
        }
        Ok(a) if a.status == 403 => Check::fail(
            "local-events",
            format!("{addr}/events refused this box's address (403): events_allow does not include it"),
            "Add 127.0.0.1/32 (and the address seaf-server posts from) to events_allow",
        ),
        Ok(a) => Check::fail(
            "local-events",
            format!("{addr}/events answered {} {:?}", a.status, excerpt(&a.text())),
            "Check that the program on this port is this notification server (notification-server --version)",
        ),
        Err(e) => Check::fail("local-events", format!("posting to {addr}/events: {e}"), START_FIX),
    }
}

/// The test event: a `repo-update` for the run's random library, as seaf-server sends it.
pub(super) fn test_event(repo: &str) -> String {
    serde_json::json!({
        "type": "repo-update",
        "content": {"repo_id": repo, "commit_id": "0000000000000000000000000000000000000000"}
    })
    .to_string()
}

/// The start of a peer's answer, for a one-line report.
pub(super) fn excerpt(text: &str) -> String {
    let one: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", one.get(..i).unwrap_or_default()),
        None => one,
    }
}
