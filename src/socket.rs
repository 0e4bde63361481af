//! The server's TCP stream: a mio `TcpStream` that remembers when a read has already
//! drained the kernel's receive queue, so the loop does not spend a second `recv()`
//! per wake-up only to be told `EAGAIN`.
//!
//! Why this is sound on Linux: a TCP `recv()` into a buffer copies everything queued
//! (processing the socket backlog on the way) until the buffer is full, so a read that
//! returns fewer bytes than asked for has emptied the queue at that moment. Bytes that
//! arrive later raise a new edge-triggered readiness event, which is what clears the mark
//! ([`Socket::on_readable`]). Two exceptions end a read short with more to read and no
//! later edge to announce it:
//! - the end of stream: a FIN that came with or before the data;
//! - TCP urgent data: `tcp_recvmsg` stops at the urgent mark, with or without
//!   `SO_OOBINLINE`, while the bytes after it are already queued.
//!
//! So the socket is registered for `EPOLLPRI` (urgent data) as well, and once a readiness
//! event says the peer hung up, the socket errored or urgent data came, every read on
//! this socket goes to the kernel until it reports `EAGAIN` or the end. No client has a
//! reason to send urgent data, so that costs nothing on the common path. (The urgent byte
//! itself is not part of the stream we read: without `SO_OOBINLINE`, as in Go's server,
//! the kernel keeps it aside for `MSG_OOB` reads, which we never make.) The same trick is
//! nginx's (`rev->ready = 0` on a short read).
//!
//! On a keep-alive exchange this saves one of the three system calls (ping, pong read,
//! EAGAIN read), and one per subscribe or `/events` request.

use std::io::{self, Read, Write};

/// A nonblocking TCP stream registered with the server's `Poll`.
#[derive(Debug)]
pub struct Socket {
    stream: mio::net::TcpStream,
    /// A read came back short since the last readiness event: the queue is empty, and
    /// reads answer `WouldBlock` without asking the kernel.
    drained: bool,
    /// A readiness event reported a hang-up, an error or urgent data: never trust a
    /// short read again.
    hung_up: bool,
}

impl Socket {
    pub fn new(stream: mio::net::TcpStream) -> Socket {
        Socket {
            stream,
            drained: false,
            hung_up: false,
        }
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.stream.set_nodelay(on)
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.drained && !buf.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match self.stream.read(buf) {
            Ok(n) => {
                if n > 0 && n < buf.len() && !self.hung_up {
                    self.drained = true;
                }
                Ok(n)
            }
            Err(e) => {
                if e.kind() == io::ErrorKind::WouldBlock {
                    self.drained = true;
                }
                Err(e)
            }
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.stream.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

impl crate::conn::Stream for Socket {
    fn shutdown_write(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    /// A readable event arrived: new bytes (or the end of stream) may be waiting.
    /// `hung_up` is the event's read-closed, error or urgent-data (`EPOLLPRI`) flag.
    fn on_readable(&mut self, hung_up: bool) {
        self.drained = false;
        self.hung_up |= hung_up;
    }

    /// Forgets a short read, for a read that must reach the kernel without an edge (the
    /// sweep's last look before a pong-timeout eviction, when the loop may have fallen
    /// behind on readiness events).
    fn rearm(&mut self) {
        self.drained = false;
    }
}

/// Every registration also asks for urgent data (`EPOLLPRI`), which makes a short read
/// untrustworthy (see the module doc).
impl mio::event::Source for Socket {
    fn register(&mut self, registry: &mio::Registry, token: mio::Token, interests: mio::Interest) -> io::Result<()> {
        self.stream
            .register(registry, token, interests | mio::Interest::PRIORITY)
    }

    fn reregister(&mut self, registry: &mio::Registry, token: mio::Token, interests: mio::Interest) -> io::Result<()> {
        self.stream
            .reregister(registry, token, interests | mio::Interest::PRIORITY)
    }

    fn deregister(&mut self, registry: &mio::Registry) -> io::Result<()> {
        self.stream.deregister(registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Stream;
    use std::net::TcpListener;
    use std::time::{Duration, Instant};

    /// A connected pair: the `Socket` under test and the std peer that writes to it.
    fn pair() -> (Socket, std::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        (Socket::new(mio::net::TcpStream::from_std(accepted)), peer)
    }

    /// Reads until `want` bytes came, treating `WouldBlock` as "not yet" for a second.
    fn read_exactly(s: &mut Socket, want: usize) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while got.len() < want && Instant::now() < deadline {
            match s.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    s.on_readable(false);
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("{e}"),
            }
        }
        got
    }

    #[test]
    fn a_short_read_answers_would_block_until_the_next_readiness_event() {
        let (mut s, mut peer) = pair();
        peer.write_all(b"pong").unwrap();
        assert_eq!(read_exactly(&mut s, 4), b"pong");
        // More bytes arrive, but no readiness event has been seen: no system call.
        peer.write_all(b"more").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        // The edge for them clears the mark.
        s.on_readable(false);
        assert_eq!(s.read(&mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], b"more");
    }

    #[test]
    fn a_full_read_keeps_reading() {
        let (mut s, mut peer) = pair();
        peer.write_all(&[7u8; 100]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).unwrap(), 64);
        // The buffer was filled: more may be queued, so the next read asks the kernel.
        assert_eq!(s.read(&mut buf).unwrap(), 36);
    }

    #[test]
    fn after_a_hang_up_short_reads_still_reach_the_end_of_stream() {
        let (mut s, mut peer) = pair();
        peer.write_all(b"bye").unwrap();
        drop(peer);
        std::thread::sleep(Duration::from_millis(20));
        // The event that reported the data also reported the FIN.
        s.on_readable(true);
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).unwrap(), 3);
        assert_eq!(
            s.read(&mut buf).unwrap(),
            0,
            "the FIN must be seen without another edge"
        );
    }

    /// Sends `abc`, then `d` as urgent data, then `efg`, and waits until all is queued.
    fn send_with_urgent_byte(peer: &mut std::net::TcpStream) {
        use std::os::fd::AsRawFd;
        peer.write_all(b"abc").unwrap();
        // SAFETY: send on a socket we own, from a live one-byte buffer.
        let sent = unsafe { libc::send(peer.as_raw_fd(), b"d".as_ptr().cast(), 1, libc::MSG_OOB) };
        assert_eq!(sent, 1);
        peer.write_all(b"efg").unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }

    #[test]
    fn urgent_data_is_reported_and_short_reads_then_reach_past_its_mark() {
        let (mut s, mut peer) = pair();
        let mut poll = mio::Poll::new().unwrap();
        mio::event::Source::register(&mut s, poll.registry(), mio::Token(1), mio::Interest::READABLE).unwrap();
        send_with_urgent_byte(&mut peer);
        let mut events = mio::Events::with_capacity(4);
        poll.poll(&mut events, Some(Duration::from_secs(2))).unwrap();
        let event = events.iter().next().expect("a readiness event");
        assert!(event.is_priority(), "registered for urgent data: {event:?}");
        s.on_readable(event.is_priority());
        let mut buf = [0u8; 64];
        // The kernel stops at the mark: a short read with the rest queued.
        assert_eq!(s.read(&mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], b"abc");
        // Not taken for a drained socket: the rest comes without another edge (the
        // urgent byte itself is out of band, not in the stream).
        assert_eq!(s.read(&mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], b"efg");
        assert_eq!(s.read(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn rearm_forces_a_real_read() {
        let (mut s, mut peer) = pair();
        peer.write_all(b"a").unwrap();
        assert_eq!(read_exactly(&mut s, 1), b"a");
        peer.write_all(b"b").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        s.rearm();
        let mut buf = [0u8; 8];
        assert_eq!(s.read(&mut buf).unwrap(), 1);
    }
}
