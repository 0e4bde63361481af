//! Websocket output: the encoded frames, shared by every connection they go to, each
//! connection's ordered queue of what it has not written yet, and the [`Meter`] that
//! counts the memory all of it holds across the server.
//!
//! Server frames are unmasked, so an event's frame is the same bytes for every subscriber:
//! it is encoded once ([`Frame::text`]) and each subscriber's queue holds a reference and
//! an offset (16 bytes, [`ENTRY_BYTES`]), not a copy. Control frames (pings, pongs, Close),
//! which tungstenite encodes, join the same queue (see `ws.rs`'s `Tap`): up to
//! [`INLINE_BYTES`] inside the entry itself, so a keep-alive ping allocates nothing, longer
//! ones as a frame of their own. The queue is written with vectored writes straight from
//! the shared bytes, so the order of everything a client receives is the order it was
//! queued in, by construction.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Data, OpCode};

/// Memory one queued entry costs (a reference and an offset, or a short inline frame).
pub const ENTRY_BYTES: usize = std::mem::size_of::<Entry>();

// A pending delivery is a 16-byte entry; the queue's growth by doubling keeps it within
// the 32 bytes per delivery the output path is held to.
const _: () = assert!(ENTRY_BYTES <= 16);

/// Longest control frame kept inside its queue entry instead of in an allocation.
pub const INLINE_BYTES: usize = 13;

/// Most frames handed to one `writev` (Linux allows 1024): 256 frames of a burst go out in
/// one system call, and the slices fit in 4 KiB of stack.
const MAX_IOV: usize = 256;

/// A queue whose capacity grew above this many entries gives it back once it drains, so a
/// burst does not leave every connection holding its high-water mark.
const KEEP_CAPACITY: usize = 16;

/// What a [`Frame`] costs besides its bytes: the `Arc` counts and the owner struct.
const FRAME_OVERHEAD: usize = 16 + std::mem::size_of::<Wire>();

/// The output memory the server holds, over every connection: the bytes of every frame
/// still referenced by a queue (or an event being fanned out) plus every queue entry.
/// Shared by the reactor and its connections; the loop is the only thread that changes it.
#[derive(Debug, Clone, Default)]
pub struct Meter(Arc<Counts>);

#[derive(Debug, Default)]
struct Counts {
    bytes: AtomicUsize,
    entries: AtomicUsize,
    /// Entries of queues whose socket is full: waiting for the client, not for the server.
    stuck: AtomicUsize,
    /// Bytes of client messages read and not complete yet, over every websocket (input,
    /// counted here so one meter tells all the memory clients make the server hold).
    input: AtomicUsize,
}

impl Meter {
    /// Bytes held for unsent output (frames and entries).
    pub fn held(&self) -> usize {
        self.0.bytes.load(Relaxed) + self.entries() * ENTRY_BYTES
    }

    /// Pending deliveries (queue entries) across every connection.
    pub fn entries(&self) -> usize {
        self.0.entries.load(Relaxed)
    }

    /// Pending deliveries the server can write now: those not waiting behind a full
    /// socket (what paces ingest; see `server/ingest.rs`).
    pub fn writable_entries(&self) -> usize {
        self.entries().saturating_sub(self.0.stuck.load(Relaxed))
    }

    /// Bytes of client messages read and not complete yet, over every websocket.
    pub fn input(&self) -> usize {
        self.0.input.load(Relaxed)
    }

    /// Moves the input count from `before` to `after` bytes for one connection.
    pub fn move_input(&self, before: usize, after: usize) {
        if after > before {
            self.0.input.fetch_add(after - before, Relaxed);
        } else {
            self.0.input.fetch_sub(before - after, Relaxed);
        }
    }

    fn add_bytes(&self, n: usize) {
        self.0.bytes.fetch_add(n, Relaxed);
    }

    fn sub_bytes(&self, n: usize) {
        self.0.bytes.fetch_sub(n, Relaxed);
    }

    fn add_entries(&self, n: usize) {
        self.0.entries.fetch_add(n, Relaxed);
    }

    fn sub_entries(&self, n: usize) {
        self.0.entries.fetch_sub(n, Relaxed);
    }

    fn add_stuck(&self, n: usize) {
        self.0.stuck.fetch_add(n, Relaxed);
    }

    fn sub_stuck(&self, n: usize) {
        self.0.stuck.fetch_sub(n, Relaxed);
    }
}

/// The owner of one encoded frame's bytes; counted by the meter while it lives.
#[derive(Debug)]
pub struct Wire {
    bytes: Box<[u8]>,
    meter: Meter,
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.meter.sub_bytes(self.bytes.len() + FRAME_OVERHEAD);
    }
}

/// One encoded websocket frame (header and payload), shared by every queue it is on.
#[derive(Debug, Clone)]
pub struct Frame(Arc<Wire>);

impl Frame {
    /// Wire bytes as they are, counted by `meter`.
    pub fn from_bytes(bytes: Box<[u8]>, meter: &Meter) -> Frame {
        meter.add_bytes(bytes.len() + FRAME_OVERHEAD);
        Frame(Arc::new(Wire {
            bytes,
            meter: meter.clone(),
        }))
    }

    /// An unmasked, final text frame carrying `payload` (header written by tungstenite's
    /// own frame header type).
    pub fn text(payload: &[u8], meter: &Meter) -> Frame {
        let header = FrameHeader {
            opcode: OpCode::Data(Data::Text),
            ..FrameHeader::default()
        };
        let len = payload.len() as u64;
        let mut bytes = Vec::with_capacity(header.len(len) + payload.len());
        // Writing into a Vec cannot fail.
        let _ = header.format(len, &mut bytes);
        bytes.extend_from_slice(payload);
        Frame::from_bytes(bytes.into_boxed_slice(), meter)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0.bytes
    }

    pub fn len(&self) -> usize {
        self.0.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.bytes.is_empty()
    }
}

/// One queued frame and how much of it was written.
#[derive(Debug)]
enum Entry {
    Shared {
        frame: Frame,
        written: u32,
    },
    Inline {
        len: u8,
        written: u8,
        bytes: [u8; INLINE_BYTES],
    },
}

impl Entry {
    /// What is left to write.
    fn rest(&self) -> &[u8] {
        match self {
            Entry::Shared { frame, written } => frame.bytes().get(*written as usize..).unwrap_or_default(),
            Entry::Inline { len, written, bytes } => {
                bytes.get(usize::from(*written)..usize::from(*len)).unwrap_or_default()
            }
        }
    }

    /// Marks `n` more bytes (fewer than `rest().len()`) written.
    fn advance(&mut self, n: usize) {
        match self {
            Entry::Shared { written, .. } => *written += n as u32,
            Entry::Inline { written, .. } => *written += n as u8,
        }
    }
}

/// One connection's unsent output, in order.
#[derive(Debug)]
pub struct OutQueue {
    entries: VecDeque<Entry>,
    /// Bytes queued and not yet written (what `max_unsent_bytes` bounds).
    unsent: usize,
    /// The socket is full: the entries are counted as stuck by the meter.
    stuck: bool,
    meter: Meter,
}

impl OutQueue {
    pub fn new(meter: Meter) -> OutQueue {
        OutQueue {
            entries: VecDeque::new(),
            unsent: 0,
            stuck: false,
            meter,
        }
    }

    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    /// Bytes queued and not yet written.
    pub fn unsent(&self) -> usize {
        self.unsent
    }

    /// Queues a reference to a shared frame. Frames larger than 4 GiB cannot exist here
    /// (bodies are capped far below), but the offset type would not mind: it only counts
    /// what one connection wrote of one frame.
    pub fn push(&mut self, frame: Frame) {
        self.unsent += frame.len();
        self.count_entries(1);
        self.entries.push_back(Entry::Shared { frame, written: 0 });
    }

    /// Queues a copy of `bytes` (what tungstenite wrote: a control frame).
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if bytes.len() <= INLINE_BYTES {
            let mut inline = [0u8; INLINE_BYTES];
            if let Some(dst) = inline.get_mut(..bytes.len()) {
                dst.copy_from_slice(bytes);
            }
            self.unsent += bytes.len();
            self.count_entries(1);
            self.entries.push_back(Entry::Inline {
                len: bytes.len() as u8,
                written: 0,
                bytes: inline,
            });
        } else {
            let frame = Frame::from_bytes(bytes.into(), &self.meter);
            self.push(frame);
        }
    }

    fn count_entries(&self, n: usize) {
        self.meter.add_entries(n);
        if self.stuck {
            self.meter.add_stuck(n);
        }
    }

    /// Marks the socket full (or not); the meter counts a full socket's entries apart.
    fn set_stuck(&mut self, stuck: bool) {
        if stuck != self.stuck {
            self.stuck = stuck;
            if stuck {
                self.meter.add_stuck(self.entries.len());
            } else {
                self.meter.sub_stuck(self.entries.len());
            }
        }
    }

    /// Writes as much as `w` takes, in order, up to [`MAX_IOV`] frames per call. `Ok`
    /// when everything is written; `WouldBlock` (or any other error) otherwise, and the
    /// rest counts as stuck until a later write gets further.
    pub fn write_to(&mut self, w: &mut impl Write) -> io::Result<()> {
        let result = self.write_all_to(w);
        self.set_stuck(result.is_err());
        result
    }

    fn write_all_to(&mut self, w: &mut impl Write) -> io::Result<()> {
        while !self.entries.is_empty() {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            for (slot, entry) in iov.iter_mut().zip(self.entries.iter()) {
                *slot = IoSlice::new(entry.rest());
                n += 1;
            }
            let written = match w.write_vectored(iov.get(..n).unwrap_or_default()) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.consume(written);
        }
        if self.entries.capacity() > KEEP_CAPACITY {
            self.entries = VecDeque::new();
        }
        Ok(())
    }

    /// Drops the first `n` written bytes from the queue.
    fn consume(&mut self, mut n: usize) {
        self.unsent -= n.min(self.unsent);
        let mut done = 0;
        while n > 0 {
            let Some(front) = self.entries.front_mut() else {
                break;
            };
            let rest = front.rest().len();
            if n < rest {
                front.advance(n);
                break;
            }
            n -= rest;
            self.entries.pop_front();
            done += 1;
        }
        self.meter.sub_entries(done);
        if self.stuck {
            self.meter.sub_stuck(done);
        }
    }
}

impl Drop for OutQueue {
    fn drop(&mut self) {
        self.set_stuck(false);
        self.meter.sub_entries(self.entries.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `room` bytes per call, recording each call.
    struct Trickle {
        out: Vec<u8>,
        room: usize,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.calls += 1;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.room - n);
                self.out.extend_from_slice(&b[..take]);
                n += take;
                if n == self.room {
                    break;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn text_frames_have_the_unmasked_header() {
        let meter = Meter::default();
        assert_eq!(Frame::text(b"hi", &meter).bytes(), [0x81, 2, b'h', b'i']);
        let long = Frame::text(&[b'x'; 300], &meter);
        assert_eq!(long.bytes()[..4], [0x81, 126, 1, 44]);
        assert_eq!(long.len(), 304);
    }

    #[test]
    fn shared_and_inline_frames_go_out_in_order_across_partial_writes() {
        let meter = Meter::default();
        let shared = Frame::text(b"event", &meter);
        let mut a = OutQueue::new(meter.clone());
        let mut b = OutQueue::new(meter.clone());
        for q in [&mut a, &mut b] {
            q.push_bytes(&[0x89, 0]);
            q.push(shared.clone());
            q.push_bytes(&[0x8a; 20]);
            q.push(shared.clone());
        }
        drop(shared);
        let one = 7 + 2 + 20 + 7;
        assert_eq!(meter.entries(), 8);
        assert_eq!(a.unsent(), one);
        let mut w = Trickle {
            out: Vec::new(),
            room: 3,
            calls: 0,
        };
        assert!(a.write_to(&mut w).is_ok());
        let mut want = vec![0x89, 0, 0x81, 5];
        want.extend_from_slice(b"event");
        want.extend_from_slice(&[0x8a; 20]);
        want.extend_from_slice(&[0x81, 5]);
        want.extend_from_slice(b"event");
        assert_eq!(w.out, want);
        assert_eq!(a.unsent(), 0);
        assert_eq!(meter.entries(), 4);
        drop(b);
        drop(a);
        assert_eq!((meter.entries(), meter.held()), (0, 0), "all memory given back");
    }

    #[test]
    fn one_vectored_write_carries_many_frames() {
        let meter = Meter::default();
        let frame = Frame::text(b"x", &meter);
        let mut q = OutQueue::new(meter.clone());
        for _ in 0..100 {
            q.push(frame.clone());
        }
        let mut w = Trickle {
            out: Vec::new(),
            room: usize::MAX,
            calls: 0,
        };
        assert!(q.write_to(&mut w).is_ok());
        assert_eq!((w.calls, w.out.len()), (1, 300));
    }

    #[test]
    fn a_full_socket_keeps_the_rest() {
        let meter = Meter::default();
        let mut q = OutQueue::new(meter.clone());
        q.push(Frame::text(b"abc", &meter));
        assert_eq!(meter.writable_entries(), 1);
        let mut w = Trickle {
            out: Vec::new(),
            room: 0,
            calls: 0,
        };
        assert_eq!(q.write_to(&mut w).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert_eq!(q.unsent(), 5);
        assert!(meter.held() >= 5 + ENTRY_BYTES);
        // Waiting for the client, not for the server.
        q.push_bytes(&[0x89, 0]);
        assert_eq!((meter.entries(), meter.writable_entries()), (2, 0));
        w.room = 100;
        assert!(q.write_to(&mut w).is_ok());
        assert_eq!((meter.entries(), meter.writable_entries()), (0, 0));
        q.push_bytes(&[0x89, 0]);
        assert_eq!(meter.writable_entries(), 1);
        drop(q);
        assert_eq!((meter.entries(), meter.writable_entries(), meter.held()), (0, 0, 0));
    }
}
