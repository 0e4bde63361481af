//! Accepting connections: the public and metrics listeners, the connection cap and the
//! pause at it, and the pause when descriptors run out.

use super::{Conn, Server};
use crate::conn::{HttpConn, Listener, Millis, Stream};
use mio::net::TcpListener;
use mio::{Interest, Token};
use std::io;
use std::net::SocketAddr;

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

impl<L: Listen> Server<L> {
    /// Accepts until the backlog is empty, the connection cap is reached or descriptors
    /// run out.
    pub(super) fn accept(&mut self, now: Millis, from: Listener) {
        if from == Listener::Public && self.accept_pause.is_some() {
            return;
        }
        let listener = match from {
            Listener::Public => self.listener.as_ref(),
            Listener::Metrics => self.metrics_listener.as_ref(),
        };
        let Some(listener) = listener else {
            return;
        };
        loop {
            // The metrics listener is for a local scraper: it is not held to the cap that
            // protects the public side, so a full server can still be observed.
            if from == Listener::Public && self.conns.len() >= self.config.max_connections {
                crate::logsafe::limited!(
                    crate::logsafe::Kind::AtMaxConnections,
                    "at max_connections ({}): not accepting until a connection closes",
                    self.config.max_connections
                );
                self.accept_pause = Some(AcceptPause::AtCapacity);
                return;
            }
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    self.fd_exhaustion_logged = false;
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
                    if from == Listener::Public {
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
}
