//! A scripted byte stream for connection and loop tests and for fuzzing: reads hand out
//! the queued chunks, then `WouldBlock` (or end of stream once `eof` is set); writes are
//! collected up to `write_room` bytes, then `WouldBlock`. Registering it with a `Poll`
//! does nothing but count the calls, so the reactor can run on it without sockets.
//!
//! Test-only: compiled into the library under `cfg(test)`, and into the fuzz harness
//! (`fuzz/src/lib.rs`) by path, so the server's public API carries no test double. Each
//! includer implements `conn::Stream` for it (one line: `shutdown_write` does nothing).

use std::collections::VecDeque;
use std::io::{self, Read, Write};

#[derive(Debug, Default)]
pub struct ScriptedStream {
    pub input: VecDeque<Vec<u8>>,
    pub eof: bool,
    pub output: Vec<u8>,
    pub write_room: usize,
    /// `register` + `reregister` + `deregister` calls, i.e. `epoll_ctl`s a socket would cost.
    pub registrations: usize,
}

impl ScriptedStream {
    /// A stream that will read `chunks` and accepts any amount of output.
    pub fn new(chunks: impl IntoIterator<Item = Vec<u8>>) -> ScriptedStream {
        ScriptedStream {
            input: chunks.into_iter().collect(),
            write_room: usize::MAX,
            ..ScriptedStream::default()
        }
    }
}

impl Read for ScriptedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(chunk) = self.input.front_mut() else {
            return if self.eof {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        };
        let n = chunk.len().min(buf.len());
        if let (Some(dst), Some(src)) = (buf.get_mut(..n), chunk.get(..n)) {
            dst.copy_from_slice(src);
        }
        chunk.drain(..n);
        if chunk.is_empty() {
            self.input.pop_front();
        }
        Ok(n)
    }
}

impl Write for ScriptedStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.write_room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.write_room);
        self.output.extend_from_slice(buf.get(..n).unwrap_or_default());
        self.write_room -= n;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl mio::event::Source for ScriptedStream {
    fn register(&mut self, _: &mio::Registry, _: mio::Token, _: mio::Interest) -> io::Result<()> {
        self.registrations += 1;
        Ok(())
    }
    fn reregister(&mut self, _: &mio::Registry, _: mio::Token, _: mio::Interest) -> io::Result<()> {
        self.registrations += 1;
        Ok(())
    }
    fn deregister(&mut self, _: &mio::Registry) -> io::Result<()> {
        self.registrations += 1;
        Ok(())
    }
}
