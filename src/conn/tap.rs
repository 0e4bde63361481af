//! tungstenite's side of a websocket's socket: the [`Tap`]. Reads pass through to the
//! stream within the bytes the loop turn still allows the connection, and are followed
//! frame by frame ([`FrameScan`]) so that the connection knows what tungstenite holds;
//! what tungstenite writes joins the connection's output queue (`out.rs`) and never
//! blocks. The websocket itself (`ws.rs`) drives tungstenite over it.

use super::out::OutQueue;
use std::io::{self, Read, Write};

/// Most bytes read from one websocket in one loop turn. A 256 KiB message of 87,000
/// subscribe entries took 1 ms to parse and came 64 to a turn: one connection held the
/// loop, and everybody's pings and `/ping`, for 64 ms. A message larger than this is
/// read over several turns (tungstenite keeps the partial frame).
pub const READ_BYTES_PER_TURN: u32 = 64 * 1024;

/// tungstenite's side of the socket: reads go to the real stream, up to the bytes this
/// loop turn still allows the connection; writes are queued in order with the
/// connection's other output and never block.
pub struct Tap<S> {
    pub(super) stream: S,
    pub(super) out: OutQueue,
    /// Bytes this connection may still read in the current loop turn. At 0 the Tap
    /// answers `WouldBlock` without asking the socket, and tungstenite keeps any partial
    /// frame for the next turn.
    pub(super) allowance: u32,
    /// The allowance ran out: input may be left, and no edge will announce it.
    pub(super) throttled: bool,
    /// Where the bytes handed to tungstenite stand relative to the client's frames.
    pub(super) scan: FrameScan,
    /// Past this many bytes of unfinished client messages over every websocket, a
    /// connection whose own unfinished message is larger than [`KEEP_READ_BUFFER`] is
    /// closed (a quarter of `max_output_bytes`).
    pub(super) input_budget: u32,
    /// This connection's unfinished message took input past the budget.
    pub(super) over_input: bool,
}

impl<S> Tap<S> {
    /// The Tap of a websocket whose first bytes, read with the upgrade request, are
    /// `read_ahead` (tungstenite gets them separately; they are scanned and counted here).
    pub(super) fn new(stream: S, out: OutQueue, read_ahead: &[u8], input_budget: u32) -> Tap<S> {
        let mut scan = FrameScan::default();
        scan.feed(read_ahead);
        out.meter().move_input(0, scan.partial as usize);
        Tap {
            stream,
            out,
            allowance: READ_BYTES_PER_TURN,
            throttled: false,
            scan,
            input_budget,
            over_input: false,
        }
    }
}

impl<S> Drop for Tap<S> {
    fn drop(&mut self) {
        self.out.meter().move_input(self.scan.partial as usize, 0);
    }
}

impl<S: Read> Read for Tap<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.allowance == 0 {
            self.throttled = true;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let room = buf.len().min(self.allowance as usize);
        let n = self.stream.read(buf.get_mut(..room).unwrap_or_default())?;
        self.allowance = self.allowance.saturating_sub(super::u32_sat(n));
        let before = self.scan.partial;
        self.scan.feed(buf.get(..n).unwrap_or_default());
        let meter = self.out.meter();
        meter.move_input(before as usize, self.scan.partial as usize);
        if meter.input() > self.input_budget as usize && self.scan.partial > KEEP_READ_BUFFER {
            self.over_input = true;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }
}

impl<S> Write for Tap<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.push_bytes(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Follows the client's frames through the bytes handed to tungstenite, so that the
/// connection knows when tungstenite holds none of them (every frame handed was read
/// back as a message, and none is half handed). tungstenite reserves a whole frame's
/// length in its read buffer and keeps that allocation for the connection's life: one
/// 256 KiB message from each of 4,000 idle websockets held 1 GB. Knowing that the buffer
/// is empty lets the connection start a fresh one after a large message.
#[derive(Debug, Default)]
pub(super) struct FrameScan {
    /// The current frame's first byte (FIN and opcode).
    b0: u8,
    /// Header bytes seen so far, how many the header has (0 until its second byte
    /// tells), and where its extended length ends.
    head_len: u8,
    head_need: u8,
    length_end: u8,
    /// In the current frame's payload (else in its header).
    in_payload: bool,
    /// A data frame without FIN was handed: a fragmented message is under way.
    in_message: bool,
    /// The payload's length while in the header, then its bytes not handed yet.
    payload_left: u64,
    /// Frames that end a message (control frames, final data frames) handed in full
    /// (wrapping: only compared for equality).
    pub(super) units: u32,
    /// The largest frame handed since the last fresh buffer.
    pub(super) largest: u32,
    /// Bytes handed since the last frame that ended a message: the unfinished message
    /// tungstenite holds (what the input budget counts).
    pub(super) partial: u32,
}

impl FrameScan {
    pub(super) fn feed(&mut self, mut bytes: &[u8]) {
        while let Some((&first, rest)) = bytes.split_first() {
            if self.in_payload {
                let left = self.payload_left;
                let take = left.min(bytes.len() as u64);
                self.partial = self.partial.saturating_add(take as u32);
                bytes = bytes.get(take as usize..).unwrap_or_default();
                self.payload_left = left - take;
                if left == take {
                    self.end_frame();
                }
                continue;
            }
            bytes = rest;
            self.partial = self.partial.saturating_add(1);
            self.header_byte(first);
        }
    }

    /// One byte of a frame header (RFC 6455 5.2): the first byte, the second with the
    /// mask bit and the 7-bit length, 2 or 8 bytes of extended length, 4 of mask.
    fn header_byte(&mut self, byte: u8) {
        match self.head_len {
            0 => self.b0 = byte,
            1 => {
                let extended = match byte & 0x7f {
                    126 => 2,
                    127 => 8,
                    _ => 0,
                };
                let mask = if byte & 0x80 != 0 { 4 } else { 0 };
                self.length_end = 2 + extended;
                self.head_need = 2 + extended + mask;
                self.payload_left = if extended == 0 { u64::from(byte & 0x7f) } else { 0 };
            }
            n if n < self.length_end => self.payload_left = (self.payload_left << 8) | u64::from(byte),
            _ => {} // the mask
        }
        self.head_len = self.head_len.saturating_add(1);
        if self.head_len == self.head_need {
            let size = u64::from(self.head_need) + self.payload_left;
            self.largest = self.largest.max(super::u32_sat(size));
            self.in_payload = true;
            if self.payload_left == 0 {
                self.end_frame();
            }
        }
    }

    fn end_frame(&mut self) {
        let b0 = self.b0;
        let control = b0 & 0x08 != 0;
        let fin = b0 & 0x80 != 0;
        if control || fin {
            self.units = self.units.wrapping_add(1);
        }
        if !control {
            self.in_message = !fin;
        }
        if !self.in_message {
            self.partial = 0;
        }
        self.head_len = 0;
        self.head_need = 0;
        self.in_payload = false;
        self.payload_left = 0;
    }

    /// Nothing half handed: the bytes handed end at a message's end.
    pub(super) fn at_boundary(&self) -> bool {
        self.head_len == 0 && !self.in_payload && !self.in_message
    }
}

/// A read buffer that grew past this for a message is replaced by a fresh one once the
/// message is read (a subscribe to a few libraries is far smaller).
pub(super) const KEEP_READ_BUFFER: u32 = 8 * 1024;

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A masked client frame.
    pub(in crate::conn) fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![first];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[0, 0, 0, 0]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn the_frame_scan_follows_frames_across_reads() {
        let mut stream = frame(0x81, &[b'a'; 70_000]);
        stream.extend(frame(0x89, b""));
        stream.extend(frame(0x01, &[b'b'; 300])); // a fragment...
        stream.extend(frame(0x89, b"p")); // ...a ping inside it...
        let end = frame(0x80, b"c"); // ...and its last fragment
        let mut scan = FrameScan::default();
        for chunk in stream.chunks(7) {
            scan.feed(chunk);
        }
        assert_eq!(scan.units, 3, "the text, and the two pings");
        assert!(!scan.at_boundary(), "inside the fragmented message");
        assert_eq!(
            scan.partial,
            6 + 2 + 300 + 6 + 1,
            "the unfinished message, and the ping inside it"
        );
        scan.feed(&end[..3]);
        assert!(!scan.at_boundary());
        scan.feed(&end[3..]);
        assert_eq!(scan.units, 4);
        assert!(scan.at_boundary());
        assert_eq!(scan.partial, 0);
        assert_eq!(scan.largest, 70_000 + 14, "a 64-bit length: 2 + 8 + 4 bytes of header");
    }
}
