//! The reactor: one thread, one mio `Poll` (edge-triggered epoll), the listeners, a
//! `Slab` of connections keyed by their mio `Token`, accept and its pauses, dispatch of
//! readiness to connections, the flush queue and the only teardown. It is the one module
//! that sees more than one connection. What each connection does is `conn`'s, what a
//! request means is `app`'s, who gets an event is `subscribe`'s, `subs`'s and `gate`'s,
//! and what the process is told by signals is `control`'s.
//!
//! [`Server::run`] is a thin loop: poll, then [`Server::step`] with the readiness events
//! and the time, which tests drive directly with a fake clock and scripted sockets.
//! One step:
//! 1. accept, read, answer HTTP, read websocket messages; an accepted `/events` body has
//!    its 200 written *before* its fan-out, which only queues the event's one shared frame
//!    into each subscriber and puts the subscriber on the flush queue;
//! 2. advance the sweep (`sweep.rs`), which visits every connection's timers once a tick
//!    (250 ms at most), spread over the tick;
//! 3. flush queued connections, oldest first, for at most `FLUSH_SLICE` (`flush.rs`);
//! 4. tear down the connections doomed during the step. Closing only here means a slab
//!    key is never reused while something later in the same step still refers to it.
//!
//! Readiness registration follows state: every connection is registered READABLE, and
//! WRITABLE only while its output is stuck in the socket; the connection says when that
//! changes (`interest_change`), so the common case costs no `epoll_ctl`. Staying
//! registered for WRITABLE would cost an epoll wake-up per connection every time an ACK
//! frees send-buffer space, i.e. after every ping; `EPOLL_CTL_MOD` reports a socket that
//! is already writable, so no edge is lost by re-registering late.

mod accept;
mod deliver;
mod flush;
mod ingest;
mod sweep;
#[cfg(test)]
mod tests;

use crate::app::Ctx;
use crate::auth::Verifier;
use crate::bus::Bus;
use crate::config::Config;
use crate::conn::{CloseReason, HttpConn, HttpStep, Listener, Meter, Millis, Stream, Timers, WsConn, WsRead, ms};
use crate::control::{Control, DrainEnd, Order, Reloader};
use crate::gate::Gate;
use crate::groups::{Backend, Lookups};
use crate::metrics::{self, Gauges, Stats};
use crate::subs::Subs;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::CloseCode;

pub use crate::control::KEY_GRACE_SECONDS;
pub use accept::Listen;
use accept::{AcceptPause, ByAge};

const LISTENER: Token = Token(usize::MAX);
const SIGNALS: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const METRICS: Token = Token(usize::MAX - 3);

/// Readiness events taken per `poll` call.
const EVENTS_PER_POLL: usize = 1024;

/// Most subscribe and unsubscribe entries acted on in one loop turn, over every
/// websocket (each is a token check and maybe a reply: a few ms in all). The per
/// connection budget keeps one client from taking a turn; this keeps 32 of them from
/// taking 3 s of it between two `/ping`s. What is left waits for the next turn.
const TURN_ENTRIES: usize = 1024;

/// Most bytes of client messages parsed in one loop turn, over every websocket (the
/// other cost a flood of messages has: 32 clients completing a 256 KiB message each in
/// one turn held it for 2 s in a debug build). The message that crosses it is parsed
/// whole.
const TURN_PARSED_BYTES: usize = 256 * 1024;

/// A connection in the slab.
pub enum Conn<S> {
    Http(HttpConn<S>),
    Ws(Box<WsConn<S>>),
    /// Only while an HTTP connection is being turned into a websocket.
    Upgrading,
}

/// One readiness event, as the step takes it (mio's own cannot be built in tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    pub token: Token,
    pub readable: bool,
    pub writable: bool,
    /// The peer closed its side, the socket errored, or urgent data came: each can end a
    /// read short with more to read (socket.rs).
    pub hung_up: bool,
}

impl Ready {
    fn from_event(ev: &mio::event::Event) -> Ready {
        let hung_up = ev.is_read_closed() || ev.is_error() || ev.is_priority();
        Ready {
            token: ev.token(),
            readable: ev.is_readable() || hung_up,
            writable: ev.is_writable(),
            hung_up,
        }
    }
}

/// The time a step runs at: the monotonic clock for timers, the wall clock for tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Milliseconds since the server started.
    pub mono: Millis,
    /// Unix seconds (token `exp` and `nbf` are wall-clock times).
    pub unix: i64,
}

/// Whether the loop goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Exit,
}

/// The server. Build it with an already-bound listener (so tests can bind port 0), then
/// [`Server::run`] it.
pub struct Server<L: Listen = TcpListener> {
    poll: Poll,
    listener: Option<L>,
    metrics_listener: Option<L>,
    local_addr: SocketAddr,
    conns: Slab<Conn<L::Stream>>,
    accept_pause: Option<AcceptPause>,
    /// Websockets by age, for giving an idle one's slot to a new connection at the cap.
    by_age: ByAge,
    /// The metrics listener ran out of descriptors; retried once a tick.
    metrics_accept_paused: bool,
    /// EMFILE/ENFILE was logged; it is logged again only after an accept succeeded.
    fd_exhaustion_logged: bool,
    /// Websockets with queued output and when they were queued, oldest first; each step
    /// flushes from the front for at most `FLUSH_SLICE`.
    flush_queue: VecDeque<(usize, Millis)>,
    /// Connections to tear down at the end of the step, with why.
    doomed: Vec<(usize, CloseReason)>,
    /// Websockets that spent their turn's read budget (or were not read while output is
    /// over the budget) and may still have input; each listed once (`WsConn::mark_unread`).
    unread: Vec<usize>,
    /// Loop turns so far: a websocket's read budget is per turn.
    turn: u64,
    /// What client messages may still cost in this turn, over every websocket.
    turn_entries: usize,
    turn_parsed_bytes: usize,
    /// The memory held for unsent websocket output, over every connection.
    meter: Meter,
    /// The output budget and pacing, and who waits for them (`ingest.rs`).
    ingest: ingest::Ingest,
    subs: Subs,
    gate: Gate,
    /// The Redis bus to the other instances, if `redis_url` is set.
    bus: Option<Bus>,
    /// The group lookup helper, if a group database is configured.
    lookups: Option<Lookups>,
    /// Kept alive for the helper threads, which wake the loop through it.
    _waker: Arc<mio::Waker>,
    config: Config,
    timers: Timers,
    verifier: Verifier,
    control: Control,
    start: Instant,
    sweep: sweep::Sweep,
    pub stats: Stats,
}

impl Server<TcpListener> {
    /// Prepares the reactor around a bound listener.
    pub fn new(config: Config, listener: std::net::TcpListener, groups: Option<Backend>) -> io::Result<Server> {
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let signals = Control::signals()?;
        Server::build(
            config,
            TcpListener::from_std(listener),
            local_addr,
            groups,
            Some(signals),
        )
    }

    /// Serves Prometheus metrics on a second, already-bound listener.
    pub fn with_metrics(mut self, listener: std::net::TcpListener) -> io::Result<Server> {
        listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(listener);
        self.poll
            .registry()
            .register(&mut listener, METRICS, Interest::READABLE)?;
        self.metrics_listener = Some(listener);
        Ok(self)
    }
}

impl<L: Listen> Server<L> {
    /// The reactor around any listener; `signals` is `None` in loop tests.
    fn build(
        config: Config,
        mut listener: L,
        local_addr: SocketAddr,
        groups: Option<Backend>,
        signals: Option<signal_hook_mio::v1_0::Signals>,
    ) -> io::Result<Server<L>> {
        let poll = Poll::new()?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let mut control = Control::new(signals, groups.clone());
        if let Some(signals) = control.signals_mut() {
            poll.registry().register(signals, SIGNALS, Interest::READABLE)?;
        }
        let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER)?);
        let lookups = match groups {
            Some(backend) => Some(Lookups::spawn(backend, config.group_lookup_timeout, waker.clone())?),
            None => {
                log::warn!(
                    "no group database configured (ccnet.conf [Database], SEAFILE_MYSQL_DB_* or a groupmgr.db): group-scoped folder permission events will be dropped"
                );
                None
            }
        };
        let bus = match &config.redis_url {
            Some(url) => {
                let bus = Bus::spawn(url, &config.redis_channel, waker.clone()).map_err(io::Error::other)?;
                log::info!(
                    "bus: instance {} shares events on Redis channel {:?}",
                    bus.instance,
                    config.redis_channel
                );
                Some(bus)
            }
            None => None,
        };
        Ok(Server {
            poll,
            listener: Some(listener),
            metrics_listener: None,
            local_addr,
            conns: Slab::with_capacity(64),
            accept_pause: None,
            by_age: ByAge::default(),
            metrics_accept_paused: false,
            fd_exhaustion_logged: false,
            flush_queue: VecDeque::new(),
            doomed: Vec::new(),
            unread: Vec::new(),
            turn: 0,
            turn_entries: TURN_ENTRIES,
            turn_parsed_bytes: TURN_PARSED_BYTES,
            meter: Meter::default(),
            ingest: ingest::Ingest::default(),
            subs: Subs::default(),
            gate: Gate::new(&config, lookups.is_some()),
            bus,
            lookups,
            _waker: waker,
            timers: Timers::new(&config),
            verifier: Verifier::new(&config.jwt_private_key),
            sweep: sweep::Sweep::new(&config),
            config,
            control,
            start: Instant::now(),
            stats: Stats::default(),
        })
    }

    /// Lets SIGHUP re-read the configuration with `reloader`.
    pub fn with_reloader(mut self, reloader: Reloader) -> Server<L> {
        self.control.set_reloader(reloader);
        self
    }

    /// The address actually listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    fn now(&self) -> Now {
        Now {
            mono: self.start.elapsed().as_millis() as Millis,
            unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        }
    }

    /// Runs until a shutdown signal has drained the connections (or its deadline passed),
    /// or a second signal arrived.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS_PER_POLL);
        let mut ready = Vec::with_capacity(EVENTS_PER_POLL);
        self.control.ready();
        loop {
            let timeout = self.poll_timeout(self.now().mono);
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            ready.clear();
            ready.extend(events.iter().map(Ready::from_event));
            if self.step(&ready, self.now()) == Flow::Exit {
                return Ok(());
            }
        }
    }

    /// How long the next poll may wait: not at all while output is queued or a
    /// connection still has unread input from a capped step; else until the sweep's next
    /// step.
    /// Whether a turn has work without waiting for readiness: websockets left unread by
    /// `max_messages_per_wakeup` or waiting in the flush queue. The loop then polls with
    /// a zero timeout.
    fn work_left(&self) -> bool {
        (!self.unread.is_empty() && self.reading_open()) || !self.flush_queue.is_empty() || self.events_waiting()
    }

    fn poll_timeout(&self, now: Millis) -> Duration {
        if self.work_left() {
            Duration::ZERO
        } else {
            Duration::from_millis(self.sweep.wait(now, self.conns.len()))
        }
    }

    /// One turn of the loop: acts on `ready`, runs the timers due at `now`, flushes and
    /// tears down (see the module doc).
    pub fn step(&mut self, ready: &[Ready], now: Now) -> Flow {
        let turn_started = Instant::now();
        self.turn += 1;
        self.turn_entries = TURN_ENTRIES;
        self.turn_parsed_bytes = TURN_PARSED_BYTES;
        for r in ready {
            match r.token {
                LISTENER => self.accept(now.mono, Listener::Public),
                METRICS => self.accept(now.mono, Listener::Metrics),
                WAKER => {
                    self.on_lookup_replies(now.mono);
                    self.on_bus_wake(now);
                }
                SIGNALS => {
                    if self.on_signals(now.mono) == Flow::Exit {
                        return Flow::Exit;
                    }
                }
                Token(key) => self.on_ready(key, r, now),
            }
        }
        if self.reading_open() {
            for key in std::mem::take(&mut self.unread) {
                if let Some(Conn::Ws(w)) = self.conns.get_mut(key) {
                    w.clear_unread();
                    self.read_ws(key, now);
                }
            }
        }
        self.sweep_step(now);
        self.flush_queued(now.mono, turn_started);
        self.resume_ingest(now);
        self.teardown();
        if self.accept_pause == Some(AcceptPause::AtCapacity) && self.conns.len() < self.config.max_connections {
            self.accept_pause = None;
            self.accept(now.mono, Listener::Public);
            self.flush_queued(now.mono, turn_started);
            self.teardown();
        }
        let held = self.held_for_delivery();
        self.control.note_output(held);
        self.stats.turn(turn_started.elapsed().as_secs_f64());
        match self.control.drain_end(now.mono, self.conns.len()) {
            None => Flow::Continue,
            Some(DrainEnd::Complete) => {
                log::info!("shutdown complete: every connection closed");
                Flow::Exit
            }
            Some(DrainEnd::Deadline) => {
                log::warn!(
                    "shutdown deadline reached; closing {} remaining connection(s)",
                    self.conns.len()
                );
                Flow::Exit
            }
        }
    }

    /// Acts on what `control` makes of the pending signals.
    fn on_signals(&mut self, now: Millis) -> Flow {
        for order in self.control.on_signals(now, &self.config) {
            match order {
                Order::Exit => return Flow::Exit,
                Order::Drain => self.begin_drain(now),
                Order::Apply(config) => self.apply_config(*config, now),
            }
        }
        Flow::Continue
    }

    /// Applies a reloaded configuration: log level, limits, timeouts and the key (the
    /// old key stays valid for [`KEY_GRACE_SECONDS`]). Nothing is disconnected.
    fn apply_config(&mut self, new: Config, now: Millis) {
        if new.jwt_private_key != self.config.jwt_private_key {
            self.verifier.rotate(&new.jwt_private_key);
            self.control.key_rotated(now);
            log::info!("reload: new JWT key in use; the previous one is accepted for {KEY_GRACE_SECONDS} s");
        }
        for (_, conn) in self.conns.iter_mut() {
            if let Conn::Ws(w) = conn {
                w.set_config(&new);
            }
        }
        self.timers = Timers::new(&new);
        self.sweep.configure(&new);
        self.gate.configure(&new);
        self.config = new;
        self.control.reloaded(&self.config);
    }

    /// Stops accepting, sends Close 1001 to every websocket, closes idle HTTP
    /// connections and lets busy ones finish, all within `shutdown_timeout`.
    fn begin_drain(&mut self, now: Millis) {
        log::info!("shutting down: draining {} connection(s)", self.conns.len());
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        let close_by = now + ms(self.config.close_timeout).min(ms(self.config.shutdown_timeout));
        for (key, conn) in self.conns.iter_mut() {
            match conn {
                Conn::Ws(w) => {
                    w.start_close(CloseCode::Away, "server shutting down", close_by);
                    if w.mark_queued() {
                        self.flush_queue.push_back((key, now));
                    }
                }
                Conn::Http(h) if h.is_idle() => self.doomed.push((key, CloseReason::Shutdown)),
                _ => {}
            }
        }
    }

    fn on_ready(&mut self, key: usize, r: &Ready, now: Now) {
        match self.conns.get_mut(key) {
            Some(Conn::Http(h)) => {
                if r.readable {
                    h.stream_mut().on_readable(r.hung_up);
                }
                if self.serve_http(key, now) {
                    self.wait_for_ingest(key);
                }
            }
            Some(Conn::Ws(w)) => {
                if r.readable {
                    w.stream_mut().on_readable(r.hung_up);
                }
                if r.writable && w.wants_write() {
                    self.flush_one(key, now.mono);
                }
                if r.readable {
                    self.read_ws(key, now);
                }
            }
            Some(Conn::Upgrading) | None => {}
        }
    }

    /// Serves what an HTTP connection has. True when it now holds an `/events` request
    /// because the server is not taking events (server/ingest.rs); the caller queues it.
    fn serve_http(&mut self, key: usize, now: Now) -> bool {
        let taking_events = self.ingest_open();
        let is_metrics = matches!(self.conns.get(key), Some(Conn::Http(h)) if h.listener() == Listener::Metrics);
        let metrics_text = is_metrics.then(|| metrics::render(&self.stats, &self.gauges()));
        let ctx = Ctx {
            config: &self.config,
            verifier: &self.verifier,
            unix_now: now.unix,
            now: now.mono,
            draining: self.control.draining(),
            metrics: metrics_text.as_deref(),
            taking_events,
        };
        let Some(Conn::Http(h)) = self.conns.get_mut(key) else {
            return false;
        };
        let turn = h.on_ready(&ctx);
        self.stats.http_requests += turn.tally.requests;
        self.stats.events_ignored += turn.tally.events_ignored;
        self.stats.events_invalid += turn.tally.events_invalid;
        self.stats.events_forbidden += turn.tally.events_forbidden;
        for e in turn.tally.token_rejections {
            self.stats.event_token_rejected(e);
        }
        // The 200s are written (or queued behind a full socket); now the fan-out.
        for ev in turn.events {
            self.deliver(ev, now.mono);
        }
        match turn.step {
            HttpStep::Wait => self.sync_interest(key),
            HttpStep::Close(reason) => self.doomed.push((key, reason)),
            HttpStep::Upgrade => self.upgrade(key, now),
        }
        turn.held
    }

    /// What the server holds right now, for a metrics scrape.
    fn gauges(&self) -> Gauges {
        let mut g = Gauges {
            subscriptions: self.subs.total() as u64,
            repos: self.subs.repo_count() as u64,
            held_events: self.gate.held() as u64,
            pending_group_lookups: self.gate.pending() as u64,
            groups: self.gate.counts,
            flush_queue: self.flush_queue.len() as u64,
            output_bytes: self.held_for_delivery() as u64,
            pending_deliveries: self.meter.entries() as u64,
            output_over_budget: self.ingest.over_budget(),
            output_over_budget_seconds: self.ingest.over_budget_seconds(),
            ingest_waiting: self.deferred() as u64,
            accept_paused: self.accept_pause.is_some(),
            draining: self.control.draining(),
            group_database: self.lookups.is_some(),
            max_connections: self.config.max_connections as u64,
            max_output_bytes: self.config.max_output_bytes as u64,
            process: crate::process_stats::ProcessStats::read(),
            bus: self.bus.as_ref().map(Bus::gauges),
            ..Gauges::default()
        };
        for (_, conn) in &self.conns {
            match conn {
                Conn::Http(_) | Conn::Upgrading => g.http_connections += 1,
                Conn::Ws(w) if w.is_closing() => g.closing_connections += 1,
                Conn::Ws(_) => g.websocket_connections += 1,
            }
        }
        g
    }

    fn upgrade(&mut self, key: usize, now: Now) {
        let Some(slot) = self.conns.get_mut(key) else {
            return;
        };
        let Conn::Http(h) = std::mem::replace(slot, Conn::Upgrading) else {
            return;
        };
        let ws = h.into_ws(now.mono, &self.config, &self.meter);
        crate::logsafe::limited!(
            crate::logsafe::Kind::Lifecycle,
            "connection {key} from {} is a websocket",
            ws.client_addr()
        );
        *slot = Conn::Ws(Box::new(ws));
        self.list_by_age(key);
        self.sync_interest(key);
        // Bytes may have come with or after the upgrade request; their edge is spent.
        self.read_ws(key, now);
    }

    /// Reads websocket messages within the connection's budget for this turn
    /// (`max_messages_per_wakeup` frames, [`READ_BYTES_PER_TURN`](crate::conn::READ_BYTES_PER_TURN)
    /// bytes, [`ENTRIES_PER_TURN`](crate::conn::ENTRIES_PER_TURN) subscribe entries) and acts on them. A connection with input
    /// possibly left is listed in `unread`, once, and read again next turn without an
    /// edge. Past the output budget and its reply reserve no client message is read at
    /// all (see `ingest.rs`): its replies would add to what is already too much.
    fn read_ws(&mut self, key: usize, now: Now) {
        let close_by = now.mono + self.timers.close_timeout;
        if !self.reading_open() || !self.turn_share_left(0) {
            self.list_unread(key);
            return;
        }
        let (turn, frames) = (self.turn, self.config.max_messages_per_wakeup);
        let Some(Conn::Ws(w)) = self.conns.get_mut(key) else {
            return;
        };
        w.begin_turn(turn, frames);
        let parsed_before = w.parsed_this_turn();
        loop {
            let Some(Conn::Ws(w)) = self.conns.get(key) else {
                return;
            };
            if !self.turn_share_left(w.parsed_this_turn() - parsed_before) {
                // The turn's share for every websocket is spent: the rest waits.
                self.list_unread(key);
                break;
            }
            let Some(Conn::Ws(w)) = self.conns.get_mut(key) else {
                return;
            };
            match w.read_one(now.mono, close_by) {
                WsRead::Msg(msg) => {
                    w.spend_entries(msg.entries());
                    self.turn_entries = self.turn_entries.saturating_sub(msg.entries());
                    if !self.on_client_msg(key, msg, now) {
                        return; // doomed
                    }
                }
                WsRead::Control => {}
                WsRead::Drained => break,
                WsRead::Close(reason) => {
                    self.doomed.push((key, reason));
                    return;
                }
            }
        }
        self.queue_flush(key, now.mono);
        let Some(Conn::Ws(w)) = self.conns.get(key) else {
            return;
        };
        let (parsed, throttled) = (w.parsed_this_turn() - parsed_before, w.throttled());
        self.turn_parsed_bytes = self.turn_parsed_bytes.saturating_sub(parsed);
        if throttled {
            // Budget spent with input possibly left: come back next turn without an edge.
            self.list_unread(key);
        }
    }

    /// Whether this turn's share of client work over every websocket
    /// ([`TURN_ENTRIES`], [`TURN_PARSED_BYTES`]) is not spent, with `parsed` bytes of it
    /// already taken by the websocket being read.
    fn turn_share_left(&self, parsed: usize) -> bool {
        self.turn_entries > 0 && parsed < self.turn_parsed_bytes
    }

    /// Lists websocket `key` to be read again next turn without an edge, once.
    fn list_unread(&mut self, key: usize) {
        if let Some(Conn::Ws(w)) = self.conns.get_mut(key)
            && w.mark_unread()
        {
            self.unread.push(key);
        }
    }

    /// Registers or unregisters interest in WRITABLE, if the connection's state changed
    /// what it needs (see the module doc).
    fn sync_interest(&mut self, key: usize) {
        let registry = self.poll.registry();
        let result = match self.conns.get_mut(key) {
            Some(Conn::Http(h)) => match h.interest_change() {
                Some(interest) => registry.reregister(h.stream_mut(), Token(key), interest),
                None => Ok(()),
            },
            Some(Conn::Ws(w)) => match w.interest_change() {
                Some(interest) => registry.reregister(w.stream_mut(), Token(key), interest),
                None => Ok(()),
            },
            _ => Ok(()),
        };
        if let Err(e) = result {
            self.doomed.push((key, CloseReason::Io(e.kind())));
        }
    }

    /// The only place connections end: unsubscribe, deregister, free the slot, one log line.
    fn teardown(&mut self) {
        self.by_age.evicting = 0;
        // In order: when a connection was doomed twice in a step (its peer closed, then an
        // event found it closed), the first reason is the true one.
        for (key, reason) in std::mem::take(&mut self.doomed) {
            let Some(conn) = self.conns.try_remove(key) else {
                continue;
            };
            self.subs.remove_conn(key);
            let (kind, who) = match conn {
                Conn::Http(mut h) => {
                    let _ = self.poll.registry().deregister(h.stream_mut());
                    ("http", h.peer().to_string())
                }
                Conn::Ws(mut w) => {
                    let _ = self.poll.registry().deregister(w.stream_mut());
                    ("websocket", w.client_addr())
                }
                Conn::Upgrading => ("upgrading", String::new()),
            };
            self.stats.closed(reason.label());
            match crate::logsafe::Kind::closed(&reason) {
                Some(limit) => crate::logsafe::limited!(limit, "closed {kind} connection {key} from {who}: {reason}"),
                None => crate::logsafe::limited!(
                    crate::logsafe::Kind::Lifecycle,
                    "closed {kind} connection {key} from {who}: {reason}"
                ),
            }
        }
    }
}
