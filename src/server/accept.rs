//! Accepting connections: the public and metrics listeners, the connection cap and the
//! pause at it, and the pause when descriptors run out.
//!
//! At the cap, a websocket that subscribed to nothing gives its slot up first, oldest
//! first: it receives nothing and costs a slot. Without that, 20,000 websockets that
//! never subscribe (and answer pings) filled the default cap in 8 s, and real clients
//! and `/ping` were refused until the attacker left. A client that subscribed keeps its
//! slot; a websocket that subscribes to nothing keeps its slot only while the server is
//! not full.

use super::{Conn, Server};
use crate::conn::{CloseReason, HttpConn, Listener, Millis, Stream};
use mio::net::TcpListener;
use mio::{Interest, Token};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use tungstenite::protocol::frame::coding::CloseCode;

/// A listening socket the reactor accepts from: TCP in the server, scripted in tests.
pub trait Listen: mio::event::Source {
    type Stream: Stream;
    fn accept(&self) -> io::Result<(Self::Stream, SocketAddr)>;
}

impl Listen for TcpListener {
    type Stream = crate::socket::Socket;
    fn accept(&self) -> io::Result<(Self::Stream, SocketAddr)> {
        let (stream, peer) = TcpListener::accept(self)?;
        let _ = stream.set_nodelay(true);
        Ok((crate::socket::Socket::new(stream), peer))
    }
}

/// Why accepting is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AcceptPause {
    /// At `max_connections`: resumes as soon as one closes.
    AtCapacity,
    /// Out of file descriptors (EMFILE/ENFILE): retried on each timer tick.
    NoDescriptors,
}

/// Websockets in the order they were upgraded, for eviction at the cap.
#[derive(Default)]
pub(super) struct ByAge {
    /// (slab key, serial), oldest first, 8 bytes a websocket; entries of closed websockets
    /// are dropped when met, or all at once when they outnumber the live ones.
    order: VecDeque<(u32, u32)>,
    /// The serial of the next websocket.
    next_serial: u32,
    /// Websockets evicted in this step, whose slots free at its teardown.
    pub(super) evicting: usize,
}

impl<L: Listen> Server<L> {
    /// Numbers a new websocket and lists it by age.
    pub(super) fn list_by_age(&mut self, key: usize) {
        let Some(Conn::Ws(w)) = self.conns.get_mut(key) else {
            return;
        };
        let serial = self.by_age.next_serial;
        // Wrapping: a serial only tells a live entry from a stale one of the same key, and
        // stale entries are dropped long before four billion websockets came and went.
        self.by_age.next_serial = serial.wrapping_add(1);
        w.set_serial(serial);
        let Ok(key32) = u32::try_from(key) else {
            return; // never: the slab holds at most max_connections
        };
        self.by_age.order.push_back((key32, serial));
        // Closed websockets leave stale entries; keep them from outgrowing the live ones.
        if self.by_age.order.len() > 2 * self.conns.len() + 64 {
            let conns = &self.conns;
            self.by_age
                .order
                .retain(|&(k, s)| matches!(conns.get(k as usize), Some(Conn::Ws(w)) if w.serial() == s));
        }
    }

    /// The oldest websocket that subscribed to nothing, left at the front of the list;
    /// `None` if there is none. Subscribed ones met on the way go to the back (so each is
    /// passed over once per round, not once per eviction); stale entries are dropped.
    fn oldest_idle_websocket(&mut self) -> Option<usize> {
        for _ in 0..self.by_age.order.len() {
            let &(key32, serial) = self.by_age.order.front()?;
            let key = key32 as usize;
            let live = matches!(self.conns.get(key), Some(Conn::Ws(w)) if w.serial() == serial && !w.is_closing());
            if live && self.subs.count(key) == 0 {
                return Some(key);
            }
            self.by_age.order.pop_front();
            if live {
                self.by_age.order.push_back((key32, serial));
            }
        }
        None
    }

    /// Closes websocket `key` (found by [`Self::oldest_idle_websocket`]) so that the
    /// connection just accepted can have its slot, which frees at this step's teardown.
    fn evict_idle_websocket(&mut self, key: usize, now: Millis) {
        self.by_age.order.pop_front();
        if let Some(Conn::Ws(w)) = self.conns.get_mut(key) {
            // 1013 "try again later", and whatever the socket takes of it now.
            w.start_close(CloseCode::Again, "server full", now);
            let _ = w.flush(now);
        }
        self.doomed.push((key, CloseReason::IdleAtCapacity));
        self.by_age.evicting += 1;
    }

    /// Accepts until the backlog is empty, the connection cap is reached or descriptors
    /// run out.
    pub(super) fn accept(&mut self, now: Millis, from: Listener) {
        if from == Listener::Public && self.accept_pause.is_some() {
            return;
        }
        loop {
            // The metrics listener is for a local scraper: it is not held to the cap that
            // protects the public side, so a full server can still be observed.
            // At the cap, a new connection may take an idle websocket's slot; it is only
            // evicted once a connection was really waiting (accepted below).
            let at_cap = from == Listener::Public
                && self.conns.len().saturating_sub(self.by_age.evicting) >= self.config.max_connections;
            let take_slot_of = if at_cap { self.oldest_idle_websocket() } else { None };
            if at_cap && take_slot_of.is_none() {
                crate::logsafe::limited!(
                    crate::logsafe::Kind::AtMaxConnections,
                    "at max_connections ({}): not accepting until a connection closes",
                    self.config.max_connections
                );
                self.accept_pause = Some(AcceptPause::AtCapacity);
                return;
            }
            let listener = match from {
                Listener::Public => self.listener.as_ref(),
                Listener::Metrics => self.metrics_listener.as_ref(),
            };
            let Some(listener) = listener else {
                return;
            };
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    self.fd_exhaustion_logged = false;
                    if let Some(idle) = take_slot_of {
                        self.evict_idle_websocket(idle, now);
                    }
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
                    entry.insert(Conn::Http(HttpConn::new(stream, peer, from, now, &self.config)));
                    self.stats.accepted += 1;
                    crate::logsafe::limited!(crate::logsafe::Kind::Lifecycle, "connection {key} from {peer} accepted");
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
                    // Retried once a tick (sweep.rs): the pending connections' edge is
                    // spent, and none would come while the backlog stays full.
                    match from {
                        Listener::Public => self.accept_pause = Some(AcceptPause::NoDescriptors),
                        Listener::Metrics => self.metrics_accept_paused = true,
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
}
