//! A drop-in replacement for Seafile's notification server.
//!
//! seaf-server, the Go fileserver and seahub POST events to `/events`; desktop clients,
//! SeaDrive and the web UI hold a websocket each and subscribe per library; every event
//! is pushed at once to the subscribers it concerns. One thread runs everything on a mio
//! reactor. The modules, from the outside in:
//!
//! - [`config`]: every setting, its default, seafile.conf and environment, validation;
//! - [`logging`]: the official log line format, log file, SIGUSR1 reopen;
//! - [`logsafe`]: input values escaped and cut in log lines, peer-caused lines rate-limited;
//! - [`metrics`]: counters, gauges and their Prometheus rendering;
//! - [`process_stats`]: the standard `process_*` metrics, read from /proc at scrape time;
//! - [`sdnotify`]: systemd readiness, stopping, reloading and watchdog messages;
//! - [`control`]: signals, reload, drain, watchdog, memory trim;
//! - [`server`]: the reactor: accept, dispatch, sweep, ingest, fan-out, flush, teardown;
//! - [`conn`]: one connection's transport, timers and output queue (HTTP, then maybe
//!   websocket), and the frames websockets share;
//! - [`app`]: what an HTTP request means: routes, `/events`, the upgrade decision;
//! - [`subscribe`]: what a client's subscribe and unsubscribe messages do;
//! - [`gate`]: group-scoped delivery: held events, member cache, lookups;
//! - [`socket`]: the TCP stream that skips the `EAGAIN` read after a short read;
//! - [`http`]: pure HTTP/1.1 heads, routes and responses;
//! - [`ws`]: upgrade checks, tungstenite settings, client messages;
//! - [`event`]: `/events` bodies, audiences and the shared outbound frame;
//! - [`auth`]: event and client token verification against an injected clock;
//! - [`subs`]: the two-way subscription index;
//! - [`groups`]: group membership lookups (MySQL, SQLite) on a helper thread;
//! - [`bus`]: sharing events between instances through Redis pub/sub;
//! - [`lenient`]: Go-compatible lenient JSON object access;
//! - [`selftest`]: `--self-test`, the installation checked end to end from the command line;
//! - [`watch`]: `--watch`, a test client that prints what a desktop client would get.

// Nothing that input can reach may panic: these lints keep unwraps, expects, explicit
// panics and unchecked indexing out of the server (tests may use them).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)
)]

pub mod app;
pub mod auth;
pub mod bus;
pub mod config;
pub mod conn;
pub mod control;
pub mod event;
pub mod gate;
pub mod groups;
pub mod http;
pub mod lenient;
pub mod logging;
pub mod logsafe;
pub mod metrics;
pub mod process_stats;
#[cfg(test)]
mod scripted;
pub mod sdnotify;
pub mod selftest;
pub mod server;
pub mod socket;
pub mod subs;
pub mod subscribe;
pub mod watch;
pub mod ws;
