//! The reactor: one thread, one mio `Poll` (edge-triggered epoll), a `Slab` of
//! connections keyed by their mio `Token`, the subscription index, the timers, fan-out,
//! and the only teardown. It is the one module that sees more than one connection.
//!
//! One loop turn:
//! 1. `poll` for readiness (the timeout is zero while output is queued or a connection
//!    still has unread input from a capped turn; else the next sweep step or tick);
//! 2. accept, read, answer HTTP, read websocket messages; an accepted `/events` body has
//!    its 200 written *before* its fan-out, which only queues the event's one shared frame
//!    into each subscriber and puts the subscriber on the dirty list;
//! 3. advance the sweep, which visits every connection once a tick (250 ms at most),
//!    spread over the tick: HTTP deadlines, pong timeouts, slow consumers, expired tokens,
//!    keep-alive pings;
//! 4. flush dirty connections, oldest first, for at most `FLUSH_SLICE` (100 µs, see below);
//! 5. tear down the connections doomed during the turn. Closing only here means a slab
//!    key is never reused while something later in the same turn still refers to it.
//!
//! Output is time-sliced. A fan-out to thousands of subscribers costs one `write()` each,
//! and on loopback or a slow CPU that is 10-20 µs apiece: flushing all of them before
//! looking at input again would make every `/events` sender, pong and subscribe wait for
//! the whole fan-out. So a turn flushes for at most `FLUSH_SLICE`, and the rest of the
//! dirty queue waits, in order, for the next turn, which polls with a zero timeout.
//! A connection still waiting in the queue when more frames arrive for it keeps its place
//! and sends them all in one `write()`: under light load every flush carries one frame
//! and goes out in the same turn; under overload frames batch up by themselves, and the
//! cost per delivery falls instead of the backlog growing.
//!
//! Readiness registration: every connection is registered READABLE only, and WRITABLE is
//! added just while its output is stuck (flush returned `WouldBlock`) and removed once it
//! drains. Staying registered for WRITABLE would cost an epoll wake-up per connection every
//! time an ACK frees send-buffer space, i.e. after every ping; re-registering is one
//! `epoll_ctl` in the rare stuck case, and `EPOLL_CTL_MOD` reports a socket that is
//! already writable, so no edge is lost.

use crate::auth::Verifier;
use crate::bus::Bus;
use crate::config::Config;
use crate::conn::{Ctx, HttpConn, HttpStep, HttpTally, Millis, Reason, Sent, WsConn, WsRead, ms};
use crate::event::{self, Audience, Event, Origin};
use crate::groups::{Backend, Lookups};
use crate::metrics::{self, Gauges, Stats};
use crate::sdnotify::Notifier;
use crate::subs::Subs;
use crate::ws::ClientMsg;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::CloseCode;

const LISTENER: Token = Token(usize::MAX);
const SIGNALS: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const METRICS: Token = Token(usize::MAX - 3);

/// How long the key in use before a reload keeps being accepted after it (seconds): long
/// enough for seaf-server and seahub to be restarted with the new key.
pub const KEY_GRACE_SECONDS: i64 = 300;

/// Re-reads the configuration on SIGHUP.
pub type Reloader = Box<dyn Fn() -> Result<(Config, Option<Backend>), String>>;

/// Events held back behind a pending group lookup, over all libraries. Past it, a new
/// event for a held library is dropped (and counted) rather than queued without bound.
pub const MAX_HELD_EVENTS: usize = 10_000;

/// Groups whose member lists are cached at once; past it, stale entries are dropped and,
/// if that is not enough, the whole cache.
pub const MAX_CACHED_GROUPS: usize = 4096;

/// How often the loop checks whether connections dropped enough to give memory back. A
/// trim happens only after the count halved since the last one, so checking often costs
/// nothing and a crowd's memory is back within about a second of it leaving.
const TRIM_EVERY_MS: Millis = 1_000;

/// Readiness events taken per `poll` call.
const EVENTS_PER_POLL: usize = 1024;

/// How long one turn may spend flushing websockets before it polls for input again: the
/// bound on how long an `/events` request, a pong or a subscribe can wait behind fan-out.
/// Shorter slices also batch more under overload (input gets in sooner, so more frames
/// wait in each queued connection): in scenario a, 500 µs gave 4.7-4.8 µs of CPU per
/// delivery, 250 µs 3.8-4.1, 100 µs 3.2-3.8, 50 µs 2.7-3.4; below 100 µs the gain is
/// within the noise while the cost of a poll per slice grows.
const FLUSH_SLICE: Duration = Duration::from_micros(100);

/// How often (ms) the loop wakes to advance the incremental sweep (see `sweep_step`)
/// when it has more than `SPREAD_SWEEP_ABOVE` connections. With fewer, a tick's pings
/// are no burst worth spreading, and an idle box sleeps a whole tick.
const SWEEP_STEP_MS: Millis = 10;
const SPREAD_SWEEP_ABOVE: usize = 256;

/// A connection in the slab.
pub enum Conn {
    Http(HttpConn),
    Ws(Box<WsConn>),
    /// Only while an HTTP connection is being turned into a websocket.
    Upgrading,
}

/// Why accepting is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcceptPause {
    /// At `max_connections`: resumes as soon as one closes.
    AtCapacity,
    /// Out of file descriptors (EMFILE/ENFILE): retried on each timer tick.
    NoDescriptors,
}

/// A group's members, as of `fetched`.
struct CachedGroup {
    members: HashSet<Box<str>>,
    fetched: Millis,
}

/// Who among a library's subscribers gets an event.
#[derive(Clone, Copy)]
enum Filter<'a> {
    All,
    User(&'a str),
    Members(&'a HashSet<Box<str>>),
}

/// Whether an event went out (or was dropped), or must wait for a group lookup.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    Wait,
}

/// The server. Build it with an already-bound listener (so tests can bind port 0), then
/// [`Server::run`] it.
pub struct Server {
    poll: Poll,
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    conns: Slab<Conn>,
    subs: Subs,
    config: Config,
    verifier: Verifier,
    start: Instant,
    /// Websockets with queued output and when they were queued, oldest first; each turn
    /// flushes from the front for at most `FLUSH_SLICE`.
    dirty: VecDeque<(usize, Millis)>,
    /// Connections to tear down at the end of the turn.
    doomed: Vec<(usize, Reason)>,
    /// Websockets that stopped reading at `max_messages_per_wakeup` and still have input.
    unread: Vec<usize>,
    /// Events accepted during the current HTTP read, delivered right after their 200.
    events: Vec<Event>,
    accept_pause: Option<AcceptPause>,
    signals: Signals,
    /// Set while draining for shutdown: the time by which the process exits anyway.
    drain_deadline: Option<Millis>,
    /// The Redis bus to the other instances, if `redis_url` is set.
    bus: Option<Bus>,
    /// The group lookup helper, if a group database is configured.
    lookups: Option<Lookups>,
    /// Kept alive for the helper thread, which wakes the loop through it.
    _waker: Arc<mio::Waker>,
    /// Recently looked-up group member lists, reused for `group_cache_ttl`.
    group_cache: HashMap<i64, CachedGroup>,
    /// Lookups sent to the helper and not answered yet, with when they were sent.
    pending_groups: HashMap<i64, Millis>,
    /// Groups whose lookup just failed; only set while held events are being released.
    failed_groups: HashSet<i64>,
    /// Per library, the events held back in arrival order behind a group event whose
    /// lookup is pending, so that a library's events never overtake one another.
    held: HashMap<Box<str>, VecDeque<Event>>,
    held_count: usize,
    /// The metrics listener, if `metrics_listen` is set.
    metrics_listener: Option<TcpListener>,
    /// The group backend in use (a reload cannot switch it).
    group_backend: Option<Backend>,
    reloader: Option<Reloader>,
    notifier: Notifier,
    next_watchdog: Millis,
    /// EMFILE/ENFILE was logged; it is logged again only after an accept succeeded.
    fd_exhaustion_logged: bool,
    /// When the sweep last advanced, to notice a loop that stalled.
    last_sweep: Millis,
    /// The incremental sweep: the next slab key to visit, and when this round started.
    sweep_cursor: usize,
    sweep_round_start: Millis,
    /// Most connections since the last memory trim, and when to look again.
    peak_conns: usize,
    next_trim: Millis,
    /// How often every connection is visited by the sweep, and housekeeping runs.
    tick: Millis,
    next_tick: Millis,
    pub stats: Stats,
}

impl Server {
    /// Prepares the reactor around a bound listener.
    pub fn new(config: Config, listener: std::net::TcpListener, groups: Option<Backend>) -> io::Result<Server> {
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let mut listener = TcpListener::from_std(listener);
        let poll = Poll::new()?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGUSR1, SIGHUP])?;
        poll.registry().register(&mut signals, SIGNALS, Interest::READABLE)?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER)?);
        let lookups = match groups.clone() {
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
        // Ticks fine enough for the shortest timer: a quarter of the ping interval, at
        // most 250 ms, which also bounds how late a token expiry is noticed.
        let tick = (ms(config.ping_interval) / 4).clamp(10, 250);
        Ok(Server {
            poll,
            listener: Some(listener),
            local_addr,
            conns: Slab::with_capacity(64),
            subs: Subs::default(),
            verifier: Verifier::new(&config.jwt_private_key),
            config,
            start: Instant::now(),
            dirty: VecDeque::new(),
            doomed: Vec::new(),
            unread: Vec::new(),
            events: Vec::new(),
            accept_pause: None,
            signals,
            drain_deadline: None,
            lookups,
            bus,
            _waker: waker,
            group_cache: HashMap::new(),
            pending_groups: HashMap::new(),
            failed_groups: HashSet::new(),
            held: HashMap::new(),
            held_count: 0,
            metrics_listener: None,
            group_backend: groups,
            reloader: None,
            notifier: Notifier::from_env(),
            next_watchdog: 0,
            fd_exhaustion_logged: false,
            last_sweep: 0,
            sweep_cursor: 0,
            sweep_round_start: 0,
            peak_conns: 0,
            next_trim: 0,
            tick,
            next_tick: tick,
            stats: Stats::default(),
        })
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

    /// Lets SIGHUP re-read the configuration with `reloader`.
    pub fn with_reloader(mut self, reloader: Reloader) -> Server {
        self.reloader = Some(reloader);
        self
    }

    /// The address actually listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    fn now(&self) -> Millis {
        self.start.elapsed().as_millis() as Millis
    }

    fn unix_now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }

    /// Runs until a shutdown signal has drained the connections (or its deadline passed),
    /// or a second signal arrived.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS_PER_POLL);
        self.notifier.ready();
        loop {
            let now = self.now();
            let timeout = if !self.unread.is_empty() || !self.dirty.is_empty() {
                Duration::ZERO
            } else if self.conns.len() <= SPREAD_SWEEP_ABOVE {
                Duration::from_millis(self.next_tick.saturating_sub(now).max(1))
            } else {
                // The sweep advances every few milliseconds (see `sweep_step`).
                Duration::from_millis(self.next_tick.saturating_sub(now).clamp(1, SWEEP_STEP_MS))
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let turn_started = Instant::now();
            let now = self.now();
            let unix_now = Self::unix_now();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(now, false),
                    METRICS => self.accept(now, true),
                    WAKER => {
                        self.on_lookup_replies(now);
                        self.on_bus_events(now);
                    }
                    SIGNALS => {
                        if self.on_signals(now) {
                            return Ok(());
                        }
                    }
                    Token(key) => {
                        let hung_up = ev.is_read_closed() || ev.is_error();
                        self.on_ready(
                            key,
                            ev.is_readable() || hung_up,
                            hung_up,
                            ev.is_writable(),
                            now,
                            unix_now,
                        )
                    }
                }
            }
            for key in std::mem::take(&mut self.unread) {
                self.read_ws(key, now, unix_now);
            }
            self.sweep_step(now, unix_now);
            if now >= self.next_tick {
                self.housekeeping(now);
                self.next_tick = now + self.tick;
                if let Some(every) = self.notifier.watchdog_every
                    && now >= self.next_watchdog
                {
                    // Petted from the loop itself: a loop that stops turning stops petting.
                    self.notifier.watchdog();
                    self.next_watchdog = now + ms(every);
                }
            }
            self.flush_dirty(now);
            self.teardown();
            if self.accept_pause == Some(AcceptPause::AtCapacity) && self.conns.len() < self.config.max_connections {
                self.accept_pause = None;
                self.accept(now, false);
                self.flush_dirty(now);
                self.teardown();
            }
            self.stats.turn(turn_started.elapsed().as_secs_f64());
            if let Some(deadline) = self.drain_deadline {
                if self.conns.is_empty() {
                    log::info!("shutdown complete: every connection closed");
                    return Ok(());
                }
                if now >= deadline {
                    log::warn!(
                        "shutdown deadline reached; closing {} remaining connection(s)",
                        self.conns.len()
                    );
                    return Ok(());
                }
            }
        }
    }

    /// Accepts until the backlog is empty, the connection cap is reached or descriptors
    /// run out.
    fn accept(&mut self, now: Millis, metrics: bool) {
        if !metrics && self.accept_pause.is_some() {
            return;
        }
        let listener = if metrics {
            self.metrics_listener.as_ref()
        } else {
            self.listener.as_ref()
        };
        let Some(listener) = listener else {
            return;
        };
        loop {
            // The metrics listener is for a local scraper: it is not held to the cap that
            // protects the public side, so a full server can still be observed.
            if !metrics && self.conns.len() >= self.config.max_connections {
                log::warn!(
                    "at max_connections ({}): not accepting until a connection closes",
                    self.config.max_connections
                );
                self.accept_pause = Some(AcceptPause::AtCapacity);
                return;
            }
            match listener.accept() {
                Ok((stream, peer)) => {
                    self.fd_exhaustion_logged = false;
                    let mut stream = crate::socket::Socket::new(stream);
                    let _ = stream.set_nodelay(true);
                    let entry = self.conns.vacant_entry();
                    let key = entry.key();
                    if let Err(e) = self
                        .poll
                        .registry()
                        .register(&mut stream, Token(key), Interest::READABLE)
                    {
                        log::warn!("cannot register connection from {peer}: {e}");
                        continue;
                    }
                    let mut conn = HttpConn::new(stream, peer, now, &self.config);
                    conn.metrics = metrics;
                    entry.insert(Conn::Http(conn));
                    self.stats.accepted += 1;
                    log::debug!("connection {key} from {peer} accepted");
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) =>
                {
                    if !self.fd_exhaustion_logged {
                        self.fd_exhaustion_logged = true;
                        log::warn!(
                            "cannot accept: {e}; pausing accept until descriptors free up (raise LimitNOFILE or lower max_connections)"
                        );
                    }
                    if !metrics {
                        self.accept_pause = Some(AcceptPause::NoDescriptors);
                    }
                    return;
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => {}
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Returns true when the process must exit now.
    fn on_signals(&mut self, now: Millis) -> bool {
        let pending: Vec<i32> = self.signals.pending().collect();
        for signal in pending {
            match signal {
                SIGUSR1 => match crate::logging::reopen() {
                    Ok(()) => log::info!("log file reopened"),
                    Err(e) => log::error!("{e}"),
                },
                SIGTERM | SIGINT if self.drain_deadline.is_some() => {
                    log::warn!("second shutdown signal: exiting now");
                    return true;
                }
                SIGTERM | SIGINT => self.begin_drain(now),
                SIGHUP => self.reload(),
                _ => {}
            }
        }
        false
    }

    /// Re-reads the configuration and applies what can change live: log level, limits,
    /// timeouts and the key (the old key stays valid for [`KEY_GRACE_SECONDS`]). Nothing is
    /// disconnected. A bad new configuration is refused and the running one kept.
    fn reload(&mut self) {
        let Some(reloader) = self.reloader.as_ref() else {
            log::warn!("SIGHUP ignored: no configuration to reload from");
            return;
        };
        self.notifier.reloading();
        match reloader() {
            Err(e) => log::error!("reload refused, keeping the running configuration: {e}"),
            Ok((new, groups)) => {
                if new.host != self.config.host || new.port != self.config.port {
                    log::warn!("reload: host and port changes take effect only after a restart");
                }
                if new.redis_url != self.config.redis_url || new.redis_channel != self.config.redis_channel {
                    log::warn!("reload: Redis bus changes take effect only after a restart");
                }
                if new.metrics_listen != self.config.metrics_listen {
                    log::warn!("reload: metrics_listen changes take effect only after a restart");
                }
                if groups != self.group_backend {
                    log::warn!("reload: group database changes take effect only after a restart");
                }
                if new.jwt_private_key != self.config.jwt_private_key {
                    self.verifier
                        .rotate(&new.jwt_private_key, Self::unix_now() + KEY_GRACE_SECONDS);
                    log::info!("reload: new JWT key in use; the previous one is accepted for {KEY_GRACE_SECONDS} s");
                }
                let ws_config = crate::ws::socket_config(&new);
                for (_, conn) in self.conns.iter_mut() {
                    if let Conn::Ws(w) = conn {
                        w.ws.set_config(|c| *c = ws_config);
                    }
                }
                let (host, port, metrics_listen) = (
                    self.config.host.clone(),
                    self.config.port,
                    self.config.metrics_listen.clone(),
                );
                self.config = Config {
                    host,
                    port,
                    metrics_listen,
                    ..new
                };
                self.tick = (ms(self.config.ping_interval) / 4).clamp(10, 250);
                // Shown whatever the old and new levels are: the admin asked for it.
                crate::logging::set_level(new.log_level.max(log::LevelFilter::Info));
                log::info!("configuration reloaded (log level {})", new.log_level);
                crate::logging::set_level(new.log_level);
            }
        }
        self.notifier.ready();
    }

    /// Stops accepting, sends Close 1001 to every websocket, closes idle HTTP
    /// connections and lets busy ones finish, all within `shutdown_timeout`.
    fn begin_drain(&mut self, now: Millis) {
        log::info!("shutting down: draining {} connection(s)", self.conns.len());
        self.notifier.stopping();
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        self.drain_deadline = Some(now + ms(self.config.shutdown_timeout));
        let close_by = now + ms(self.config.close_timeout).min(ms(self.config.shutdown_timeout));
        for (key, conn) in self.conns.iter_mut() {
            match conn {
                Conn::Ws(w) => {
                    w.start_close(CloseCode::Away, "server shutting down", close_by);
                    if !w.dirty {
                        w.dirty = true;
                        self.dirty.push_back((key, now));
                    }
                }
                Conn::Http(h) if h.is_idle() => self.doomed.push((key, Reason::Shutdown)),
                _ => {}
            }
        }
    }

    fn on_ready(&mut self, key: usize, readable: bool, hung_up: bool, writable: bool, now: Millis, unix_now: i64) {
        match self.conns.get_mut(key) {
            Some(Conn::Http(h)) => {
                if readable {
                    h.stream.on_readable(hung_up);
                }
                self.serve_http(key, now, unix_now)
            }
            Some(Conn::Ws(w)) => {
                if readable {
                    w.ws.get_mut().on_readable(hung_up);
                }
                if writable && w.wants_write {
                    self.flush_one(key, now);
                }
                if readable {
                    self.read_ws(key, now, unix_now);
                }
            }
            Some(Conn::Upgrading) | None => {}
        }
    }

    fn serve_http(&mut self, key: usize, now: Millis, unix_now: i64) {
        let mut tally = HttpTally::default();
        let mut events = std::mem::take(&mut self.events);
        let is_metrics = matches!(self.conns.get(key), Some(Conn::Http(h)) if h.metrics);
        let metrics_text = is_metrics.then(|| metrics::render(&self.stats, &self.gauges()));
        let step = {
            let ctx = Ctx {
                config: &self.config,
                verifier: &self.verifier,
                unix_now,
                now,
                draining: self.drain_deadline.is_some(),
                metrics: metrics_text.as_deref(),
            };
            let Some(Conn::Http(h)) = self.conns.get_mut(key) else {
                return;
            };
            h.on_ready(&ctx, &mut events, &mut tally)
        };
        self.stats.http_requests += tally.requests;
        self.stats.events_ignored += tally.events_ignored;
        self.stats.events_invalid += tally.events_invalid;
        for e in tally.token_rejections {
            self.stats.event_token_rejected(e);
        }
        // The 200s are written (or queued behind a full socket); now the fan-out.
        for ev in events.drain(..) {
            self.deliver(ev, now);
        }
        self.events = events;
        match step {
            HttpStep::Wait { wants_write } => self.set_writable(key, wants_write),
            HttpStep::Close(reason) => self.doomed.push((key, reason)),
            HttpStep::Upgrade => self.upgrade(key, now, unix_now),
        }
    }

    /// What the server holds right now, for a metrics scrape.
    fn gauges(&self) -> Gauges {
        let mut g = Gauges {
            subscriptions: self.subs.total() as u64,
            repos: self.subs.repo_count() as u64,
            held_events: self.held_count as u64,
            pending_group_lookups: self.pending_groups.len() as u64,
            flush_queue: self.dirty.len() as u64,
            accept_paused: self.accept_pause.is_some(),
            draining: self.drain_deadline.is_some(),
            group_database: self.lookups.is_some(),
            resident_bytes: metrics::resident_bytes(),
            bus: self.bus.as_ref().map(|b| {
                use std::sync::atomic::Ordering::Relaxed;
                let st = &b.stats;
                metrics::BusGauges {
                    connected: st.subscriber_connected.load(Relaxed) && st.publisher_connected.load(Relaxed),
                    published: st.published.load(Relaxed),
                    received: st.received.load(Relaxed),
                    dropped: st.dropped.load(Relaxed),
                    ignored: st.ignored.load(Relaxed),
                }
            }),
            ..Gauges::default()
        };
        for (_, conn) in &self.conns {
            match conn {
                Conn::Http(_) | Conn::Upgrading => g.http_connections += 1,
                Conn::Ws(w) if w.close_deadline.is_some() => g.closing_connections += 1,
                Conn::Ws(_) => g.websocket_connections += 1,
            }
        }
        g
    }

    fn upgrade(&mut self, key: usize, now: Millis, unix_now: i64) {
        let Some(slot) = self.conns.get_mut(key) else {
            return;
        };
        let Conn::Http(h) = std::mem::replace(slot, Conn::Upgrading) else {
            return;
        };
        let mut ws = h.into_ws(now, &self.config);
        log::debug!("connection {key} from {} is a websocket", ws.client_addr());
        if ws.wants_write {
            ws.wants_write = false;
        }
        *slot = Conn::Ws(Box::new(ws));
        self.set_writable(key, false);
        // Bytes may have come with or after the upgrade request; their edge is spent.
        self.read_ws(key, now, unix_now);
    }

    /// Reads websocket messages up to the per-wake-up budget and acts on them.
    fn read_ws(&mut self, key: usize, now: Millis, unix_now: i64) {
        let close_by = now + ms(self.config.close_timeout);
        for _ in 0..self.config.max_messages_per_wakeup {
            let Some(Conn::Ws(w)) = self.conns.get_mut(key) else {
                return;
            };
            match w.read_one(now, close_by) {
                WsRead::Msg(msg) => self.on_client_msg(key, msg, now, unix_now),
                WsRead::Drained => {
                    self.mark_dirty(key, now);
                    return;
                }
                WsRead::Close(reason) => {
                    self.doomed.push((key, reason));
                    return;
                }
            }
        }
        // Budget spent with input possibly left: come back next turn without an edge.
        self.mark_dirty(key, now);
        self.unread.push(key);
    }

    fn mark_dirty(&mut self, key: usize, now: Millis) {
        if let Some(Conn::Ws(w)) = self.conns.get_mut(key)
            && !w.dirty
        {
            w.dirty = true;
            self.dirty.push_back((key, now));
        }
    }

    fn on_client_msg(&mut self, key: usize, msg: ClientMsg, now: Millis, unix_now: i64) {
        match msg {
            ClientMsg::Subscribe(repos) => {
                for (repo_id, token) in repos {
                    match self.verifier.verify_client(&token, &repo_id, unix_now) {
                        Ok(grant) => {
                            if self.subs.count(key) >= self.config.max_repos_per_connection
                                && !self.subs.is_subscribed(key, &repo_id)
                            {
                                let close_by = now + ms(self.config.close_timeout);
                                if let Some(Conn::Ws(w)) = self.conns.get_mut(key) {
                                    log::warn!(
                                        "websocket {} subscribed to more than max_repos_per_connection ({}) libraries: closing",
                                        w.client_addr(),
                                        self.config.max_repos_per_connection
                                    );
                                    w.start_close(CloseCode::Policy, "too many subscriptions", close_by);
                                }
                                return;
                            }
                            self.subs.subscribe(key, &repo_id, &grant.username, grant.exp);
                            log::debug!("connection {key} subscribed to {repo_id} until {}", grant.exp);
                        }
                        Err(e) => {
                            self.stats.client_token_rejected(e);
                            log::debug!("connection {key}: token for {repo_id} refused ({})", e.label());
                            self.send(key, event::jwt_expired(&repo_id), now);
                        }
                    }
                }
            }
            ClientMsg::Unsubscribe(repos) => {
                for repo_id in repos {
                    if self.subs.unsubscribe(key, &repo_id) {
                        log::debug!("connection {key} unsubscribed from {repo_id}");
                    }
                }
            }
        }
    }

    /// Queues one message on one websocket, dooming it if it cannot take more.
    fn send(&mut self, key: usize, msg: tungstenite::Utf8Bytes, now: Millis) {
        let Some(Conn::Ws(w)) = self.conns.get_mut(key) else {
            return;
        };
        match w.send(msg, now) {
            Sent::Queued { newly_dirty: true } => self.dirty.push_back((key, now)),
            Sent::Queued { newly_dirty: false } => {}
            Sent::Evict(reason) => self.doomed.push((key, reason)),
        }
    }

    /// Delivers an event, from whatever source, keeping each library's events in order:
    /// while one of its events waits for a group lookup, later ones queue behind it.
    pub fn deliver(&mut self, ev: Event, now: Millis) {
        self.stats.event(ev.kind);
        if let Some(queue) = self.held.get_mut(ev.repo_id.as_str()) {
            if self.held_count >= MAX_HELD_EVENTS {
                self.stats.held_events_dropped += 1;
                log::warn!(
                    "dropped {} event for repo {}: {MAX_HELD_EVENTS} events already wait for group lookups",
                    ev.kind.name(),
                    ev.repo_id
                );
                return;
            }
            queue.push_back(ev);
            self.held_count += 1;
            return;
        }
        if self.try_deliver(&ev, now) == Outcome::Wait {
            let mut queue = VecDeque::with_capacity(1);
            queue.push_back(ev);
            self.held.insert(queue_key(&queue), queue);
            self.held_count += 1;
        }
    }

    /// Sends an event to its audience now, or says it must wait for a group lookup
    /// (which this then requests).
    fn try_deliver(&mut self, ev: &Event, now: Millis) -> Outcome {
        let group = match &ev.audience {
            Audience::All => {
                self.fan_out(ev, Filter::All, now);
                self.publish(ev, None);
                return Outcome::Done;
            }
            Audience::User(u) => {
                self.fan_out(ev, Filter::User(u), now);
                self.publish(ev, None);
                return Outcome::Done;
            }
            Audience::Members(set) => {
                self.fan_out(ev, Filter::Members(set), now);
                self.publish(ev, None);
                return Outcome::Done;
            }
            Audience::Group(g) => *g,
        };
        // Nobody to tell, here or (without a bus) anywhere: no lookup at all.
        if self.bus.is_none() && self.subs.members(&ev.repo_id).is_empty() {
            return Outcome::Done;
        }
        // Never broadcast a group event: that would apply one group's permission to all.
        let Some(lookups) = self.lookups.as_ref() else {
            self.drop_group_event(ev, group, "no group database is configured");
            return Outcome::Done;
        };
        let ttl = ms(self.config.group_cache_ttl);
        if let Some(cached) = self.group_cache.get(&group)
            && now.saturating_sub(cached.fetched) < ttl
        {
            let members = &cached.members;
            let Server {
                subs,
                conns,
                dirty,
                doomed,
                stats,
                bus,
                ..
            } = self;
            fan_out(subs, conns, dirty, doomed, stats, ev, Filter::Members(members), now);
            if let Some(bus) = bus.as_ref()
                && ev.origin == Origin::Local
                && let Some(message) = crate::bus::encode(&bus.instance, ev, Some(members))
            {
                bus.publish(message);
            }
            return Outcome::Done;
        }
        if self.failed_groups.contains(&group) {
            self.drop_group_event(ev, group, "the group lookup failed");
            return Outcome::Done;
        }
        if !self.pending_groups.contains_key(&group) {
            if !lookups.request(group) {
                self.drop_group_event(ev, group, "too many group lookups are pending");
                return Outcome::Done;
            }
            self.stats.group_lookups += 1;
            self.pending_groups.insert(group, now);
            log::debug!("looking up members of group {group}");
        }
        Outcome::Wait
    }

    /// Shares an event this instance received with the other instances (with the
    /// audience as resolved here), if a bus is configured.
    fn publish(&self, ev: &Event, members: Option<&HashSet<Box<str>>>) {
        if let Some(bus) = self.bus.as_ref()
            && ev.origin == Origin::Local
            && let Some(message) = crate::bus::encode(&bus.instance, ev, members)
        {
            bus.publish(message);
        }
    }

    /// Takes the events other instances published.
    fn on_bus_events(&mut self, now: Millis) {
        let received: Vec<Event> = match self.bus.as_ref() {
            Some(bus) => bus.received().collect(),
            None => return,
        };
        for ev in received {
            self.deliver(ev, now);
        }
    }

    fn drop_group_event(&mut self, ev: &Event, group: i64, why: &str) {
        self.stats.group_events_dropped += 1;
        log::warn!(
            "dropped group-scoped {} event for repo {} (group {group}): {why}",
            ev.kind.name(),
            ev.repo_id
        );
    }

    /// Takes the helper's answers, then releases every held event that can now go.
    fn on_lookup_replies(&mut self, now: Millis) {
        let replies: Vec<_> = match self.lookups.as_ref() {
            Some(l) => l.replies().collect(),
            None => return,
        };
        for reply in replies {
            self.pending_groups.remove(&reply.group);
            match reply.result {
                Ok(members) => {
                    if self.group_cache.len() >= MAX_CACHED_GROUPS {
                        let ttl = ms(self.config.group_cache_ttl);
                        self.group_cache.retain(|_, c| now.saturating_sub(c.fetched) < ttl);
                        if self.group_cache.len() >= MAX_CACHED_GROUPS {
                            self.group_cache.clear();
                        }
                    }
                    let members = members.into_iter().map(Box::from).collect();
                    self.group_cache
                        .insert(reply.group, CachedGroup { members, fetched: now });
                }
                Err(e) => {
                    self.stats.group_lookup_failures += 1;
                    log::warn!("group lookup for group {} failed: {e}", reply.group);
                    self.failed_groups.insert(reply.group);
                }
            }
        }
        self.release_held(now);
    }

    /// Delivers held events from the front of each library's queue until one must wait.
    fn release_held(&mut self, now: Millis) {
        let repos: Vec<Box<str>> = self.held.keys().cloned().collect();
        for repo in repos {
            while let Some(ev) = self.held.get_mut(&repo).and_then(VecDeque::pop_front) {
                self.held_count -= 1;
                if self.try_deliver(&ev, now) == Outcome::Wait {
                    if let Some(queue) = self.held.get_mut(&repo) {
                        queue.push_front(ev);
                        self.held_count += 1;
                    }
                    break;
                }
            }
            if self.held.get(&repo).is_some_and(VecDeque::is_empty) {
                self.held.remove(&repo);
            }
        }
        self.failed_groups.clear();
    }

    /// Lookups the helper never answered (it should always answer within its retries)
    /// count as failed, so no library stays held forever.
    fn expire_lookups(&mut self, now: Millis) {
        let limit = 4 * ms(self.config.group_lookup_timeout) + 2_000;
        let overdue: Vec<i64> = self
            .pending_groups
            .iter()
            .filter(|(_, t)| now.saturating_sub(**t) > limit)
            .map(|(g, _)| *g)
            .collect();
        if overdue.is_empty() {
            return;
        }
        for group in overdue {
            self.pending_groups.remove(&group);
            self.stats.group_lookup_failures += 1;
            log::warn!("group lookup for group {group} got no answer in time");
            self.failed_groups.insert(group);
        }
        self.release_held(now);
    }

    fn fan_out(&mut self, ev: &Event, filter: Filter, now: Millis) {
        let Server {
            subs,
            conns,
            dirty,
            doomed,
            stats,
            ..
        } = self;
        fan_out(subs, conns, dirty, doomed, stats, ev, filter, now);
    }

    /// Advances the sweep that checks every connection's timers once per tick. It is
    /// incremental: each turn visits the slice of slab keys that the time elapsed in the
    /// round calls for, so every connection is still visited once a tick, but pings go
    /// out, and pongs come back, spread over the tick instead of in one burst whose
    /// writes and reads would hold `/events` requests and deliveries back.
    fn sweep_step(&mut self, now: Millis, unix_now: i64) {
        // A loop that did not turn (stopped, starved, swapped out) sent no pings either, so
        // its clients' silence says nothing: give every websocket a fresh keep-alive window.
        let stalled_for = now.saturating_sub(self.last_sweep);
        self.last_sweep = now;
        if stalled_for > ms(self.config.ping_interval) + 1_000 {
            log::warn!("event loop stalled for {stalled_for} ms; keep-alive deadlines restarted");
            let fresh = now.saturating_sub(ms(self.config.ping_interval));
            for (_, conn) in self.conns.iter_mut() {
                if let Conn::Ws(w) = conn {
                    w.last_heard = w.last_heard.max(fresh);
                    w.next_ping = now;
                }
            }
        }
        let slots = self.conns.capacity();
        let elapsed = now.saturating_sub(self.sweep_round_start);
        let round_over = elapsed >= self.tick;
        let reach = if round_over {
            slots
        } else {
            // elapsed < tick, so this is below `slots`.
            (slots as u128 * elapsed as u128 / self.tick.max(1) as u128) as usize
        };
        if reach > self.sweep_cursor {
            self.sweep(self.sweep_cursor..reach, now, unix_now);
            self.sweep_cursor = reach;
        }
        if round_over {
            self.sweep_cursor = 0;
            self.sweep_round_start = now;
        }
    }

    /// What runs once a tick for the server as a whole.
    fn housekeeping(&mut self, now: Millis) {
        if !self.pending_groups.is_empty() {
            self.expire_lookups(now);
        }
        if self.accept_pause == Some(AcceptPause::NoDescriptors) {
            self.accept_pause = None;
            self.accept(now, false);
        }
        self.trim_memory(now);
    }

    /// Checks the timers of the connections whose slab keys are in `keys`.
    fn sweep(&mut self, keys: std::ops::Range<usize>, now: Millis, unix_now: i64) {
        let ping_interval = ms(self.config.ping_interval);
        let pong_timeout = ms(self.config.pong_timeout);
        let write_timeout = ms(self.config.write_timeout);
        let draining = self.drain_deadline.is_some();
        let mut silent = Vec::new();
        let Server {
            conns,
            subs,
            dirty,
            doomed,
            ..
        } = self;
        for key in keys {
            let Some(conn) = conns.get_mut(key) else {
                continue;
            };
            match conn {
                Conn::Http(h) => {
                    if now >= h.deadline {
                        doomed.push((key, Reason::HttpTimeout { idle: h.idle }));
                    } else if draining && h.is_idle() {
                        doomed.push((key, Reason::Shutdown));
                    }
                }
                Conn::Ws(w) => {
                    if let Some(deadline) = w.close_deadline {
                        if now >= deadline {
                            doomed.push((key, Reason::CloseHandshake));
                        }
                        continue;
                    }
                    if now.saturating_sub(w.last_heard) >= pong_timeout {
                        // Judged after reading what the socket holds (below): a loop that
                        // fell behind must not evict clients whose pongs wait unread.
                        silent.push(key);
                        continue;
                    }
                    if w.unsent_since.is_some_and(|t| now.saturating_sub(t) >= write_timeout) {
                        doomed.push((key, Reason::SlowConsumerTime));
                        continue;
                    }
                    if subs.has_expired(key, unix_now) {
                        for repo_id in subs.expire(key, unix_now) {
                            log::debug!("connection {key}: token for {repo_id} expired");
                            if !note_sent(w.send(event::jwt_expired(&repo_id), now), key, now, dirty, doomed) {
                                break;
                            }
                        }
                    }
                    if now >= w.next_ping {
                        // A peer heard from within the interval is alive, so the ping may
                        // be skipped, but only if the next one, an interval from now,
                        // still leaves the peer an interval to answer before
                        // `pong_timeout`. Without that condition a ping_interval above
                        // half the pong_timeout closed quiet, healthy clients.
                        // "Within the interval" is judged against the previous check
                        // (`next_ping` was set an interval after it), not against `now`:
                        // a pong read in the same millisecond as its ping was sent is a
                        // sign of life too, and a strict `now - last_heard < interval`
                        // missed it on a fast network and pinged every interval.
                        let heard_recently = w.last_heard >= w.next_ping.saturating_sub(ping_interval);
                        let next_ping_in_time = w.last_heard + pong_timeout >= now + 2 * ping_interval;
                        if !(heard_recently && next_ping_in_time) {
                            note_sent(w.ping(now), key, now, dirty, doomed);
                        }
                        w.next_ping = now + ping_interval;
                    }
                }
                Conn::Upgrading => {}
            }
        }
        for key in silent {
            if let Some(Conn::Ws(w)) = self.conns.get_mut(key) {
                w.ws.get_mut().rearm();
            }
            self.read_ws(key, now, unix_now);
            if let Some(Conn::Ws(w)) = self.conns.get(key)
                && now.saturating_sub(w.last_heard) >= pong_timeout
            {
                self.doomed.push((key, Reason::PongTimeout));
            }
        }
    }

    /// Gives memory back after a crowd left: the slab and index keep their capacity, and
    /// the allocator keeps freed pages, so without this RSS stays at its peak forever.
    fn trim_memory(&mut self, now: Millis) {
        self.peak_conns = self.peak_conns.max(self.conns.len());
        if now < self.next_trim {
            return;
        }
        self.next_trim = now + TRIM_EVERY_MS;
        if self.conns.len() * 2 > self.peak_conns || self.peak_conns < 64 {
            return;
        }
        self.conns.shrink_to_fit();
        self.subs.shrink();
        self.dirty.shrink_to_fit();
        self.doomed.shrink_to_fit();
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free memory to the system.
        unsafe {
            libc::malloc_trim(0);
        }
        log::debug!(
            "memory trimmed: {} connections, peak {}",
            self.conns.len(),
            self.peak_conns
        );
        self.peak_conns = self.conns.len();
    }

    /// Flushes queued connections, oldest first, until the queue is empty or the turn has
    /// spent `FLUSH_SLICE` on it (see the module doc).
    fn flush_dirty(&mut self, now: Millis) {
        let started = Instant::now();
        // The same reading as `self.now()`, without a second clock read.
        let flushed_at = started.duration_since(self.start).as_millis() as Millis;
        while let Some((key, queued_at)) = self.dirty.pop_front() {
            // A connection torn down while queued leaves its key behind; `dirty` tells a
            // live entry (or a new connection that reused the key and queued itself) from
            // a stale one.
            if let Some(Conn::Ws(w)) = self.conns.get(key)
                && w.dirty
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

    fn flush_one(&mut self, key: usize, now: Millis) {
        let Some(Conn::Ws(w)) = self.conns.get_mut(key) else {
            return;
        };
        match w.flush(now) {
            Ok(true) if w.wants_write => {
                w.wants_write = false;
                self.set_writable(key, false);
            }
            Ok(true) => {}
            Ok(false) if !w.wants_write => {
                w.wants_write = true;
                self.set_writable(key, true);
            }
            Ok(false) => {}
            Err(reason) => self.doomed.push((key, reason)),
        }
    }

    /// Registers or unregisters interest in WRITABLE (see the module doc for why).
    fn set_writable(&mut self, key: usize, writable: bool) {
        let interest = if writable {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        let registry = self.poll.registry();
        let result = match self.conns.get_mut(key) {
            Some(Conn::Http(h)) => registry.reregister(&mut h.stream, Token(key), interest),
            Some(Conn::Ws(w)) => registry.reregister(w.ws.get_mut(), Token(key), interest),
            _ => Ok(()),
        };
        if let Err(e) = result {
            self.doomed.push((key, Reason::Io(e.kind())));
        }
    }

    /// The only place connections end: unsubscribe, deregister, free the slot, one log line.
    fn teardown(&mut self) {
        // In order: when a connection was doomed twice in a turn (its peer closed, then an
        // event found it closed), the first reason is the true one.
        for (key, reason) in std::mem::take(&mut self.doomed) {
            let Some(conn) = self.conns.try_remove(key) else {
                continue;
            };
            self.subs.remove_conn(key);
            let (kind, who) = match conn {
                Conn::Http(mut h) => {
                    let _ = self.poll.registry().deregister(&mut h.stream);
                    ("http", h.peer.to_string())
                }
                Conn::Ws(mut w) => {
                    let _ = self.poll.registry().deregister(w.ws.get_mut());
                    ("websocket", w.client_addr())
                }
                Conn::Upgrading => ("upgrading", String::new()),
            };
            self.stats.closed(reason.label());
            if reason.is_warning() {
                log::warn!("closed {kind} connection {key} from {who}: {reason}");
            } else {
                log::debug!("closed {kind} connection {key} from {who}: {reason}");
            }
        }
    }
}

/// Records what a queued message means for the dirty and doomed lists; false if the
/// connection is doomed.
fn note_sent(
    sent: Sent,
    key: usize,
    now: Millis,
    dirty: &mut VecDeque<(usize, Millis)>,
    doomed: &mut Vec<(usize, Reason)>,
) -> bool {
    match sent {
        Sent::Queued { newly_dirty } => {
            if newly_dirty {
                dirty.push_back((key, now));
            }
            true
        }
        Sent::Evict(reason) => {
            doomed.push((key, reason));
            false
        }
    }
}

/// The key under which a new held queue is filed: its one event's library.
fn queue_key(queue: &VecDeque<Event>) -> Box<str> {
    queue.front().map(|e| Box::from(e.repo_id.as_str())).unwrap_or_default()
}

/// Fan-out: the event's one frame is queued into every subscriber the filter lets
/// through; each goes on the dirty list once, and one that cannot take more is doomed.
#[allow(clippy::too_many_arguments)]
fn fan_out(
    subs: &Subs,
    conns: &mut Slab<Conn>,
    dirty: &mut VecDeque<(usize, Millis)>,
    doomed: &mut Vec<(usize, Reason)>,
    stats: &mut Stats,
    ev: &Event,
    filter: Filter,
    now: Millis,
) {
    for m in subs.members(&ev.repo_id) {
        let wanted = match filter {
            Filter::All => true,
            Filter::User(u) => *m.user == *u,
            Filter::Members(set) => set.contains(&m.user),
        };
        if !wanted {
            continue;
        }
        let Some(Conn::Ws(w)) = conns.get_mut(m.conn) else {
            continue;
        };
        match w.send(ev.frame.clone(), now) {
            Sent::Queued { newly_dirty } => {
                stats.deliveries += 1;
                if newly_dirty {
                    dirty.push_back((m.conn, now));
                }
            }
            Sent::Evict(reason) => doomed.push((m.conn, reason)),
        }
    }
}
