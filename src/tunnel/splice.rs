//! Zero-copy tunnel copy for plain TCP on both sides (Linux): bytes go socket -> pipe -> socket
//! with splice(2) and never enter user space. Same contract as the buffered copy (`copy::Buffered`):
//! a direction takes a pipe from a small per-thread spare list only when its source turns
//! readable and returns it once drained, so idle tunnels hold no pipe (and no file descriptors
//! beyond their two sockets).

use super::copy::{Copier, Failed, Progress, read_limit};
use super::spare::{self, Spares};
use crate::bandwidth::{Pacer, poll_turn};
use rustix::fd::OwnedFd;
use rustix::net::Shutdown;
use rustix::pipe::{PipeFlags, SpliceFlags};
use std::io;
use std::task::{Context, Poll, ready};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved per splice call; pipes are grown to this where the system allows.
const PIPE_BYTES: usize = 256 * 1024;
/// Drained pipes kept per worker thread (two descriptors each).
const SPARE_PIPES_PER_THREAD: usize = 8;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

thread_local! {
    static SPARE_PIPES: Spares<Pipe> = const { Spares::new() };
}

fn take_pipe() -> io::Result<Pipe> {
    if let Some(pipe) = spare::take(&SPARE_PIPES) {
        return Ok(pipe);
    }
    let (read, write) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
    // Larger pipes mean fewer calls per byte; the default (64 KiB) still works if refused.
    let _ = rustix::pipe::fcntl_setpipe_size(&write, PIPE_BYTES);
    Ok(Pipe { read, write })
}

/// Only empty pipes come back here.
fn give_back(pipe: Pipe) {
    spare::give_back(&SPARE_PIPES, pipe, SPARE_PIPES_PER_THREAD);
}

/// One direction of a spliced tunnel.
#[derive(Default)]
pub struct Spliced {
    pipe: Option<Pipe>,
    /// Bytes in the pipe not yet written to the destination.
    in_pipe: usize,
    eof: bool,
    progress: Progress,
    /// The budgets this direction obeys, when a schedule can throttle it.
    pacer: Option<Box<Pacer>>,
}

impl Spliced {
    pub fn with_pacer(pacer: Option<Box<Pacer>>) -> Self {
        Self {
            pacer,
            ..Self::default()
        }
    }

    fn release(&mut self) {
        if self.in_pipe == 0
            && let Some(pipe) = self.pipe.take()
        {
            give_back(pipe);
        }
    }
}

impl Copier<TcpStream, TcpStream> for Spliced {
    fn progress(&mut self) -> &mut Progress {
        &mut self.progress
    }

    fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut TcpStream,
        dst: &mut TcpStream,
    ) -> Poll<Result<(), Failed>> {
        let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
        loop {
            if self.in_pipe == 0 && !self.eof {
                match src.poll_read_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => return Poll::Ready(Err(Failed::Reader)),
                    Poll::Pending => {
                        self.release();
                        return Poll::Pending;
                    }
                }
                if self.pipe.is_none() {
                    // Out of descriptors: fail this tunnel, not the gateway.
                    self.pipe = Some(take_pipe().map_err(|_| Failed::Reader)?);
                }
                let pipe = self.pipe.as_ref().expect("taken above");
                // Under a budget in force, move about one burst at a time, with short queues.
                let limit = read_limit(&mut self.pacer, &*src, &*dst);
                let len = limit.map_or(PIPE_BYTES, |l| l.min(PIPE_BYTES));
                let spliced = src.try_io(Interest::READABLE, || {
                    rustix::pipe::splice(&*src, None, &pipe.write, None, len, flags)
                        .map_err(io::Error::from)
                });
                match spliced {
                    Ok(0) => self.eof = true,
                    Ok(n) => {
                        self.in_pipe = n;
                        if let (Some(pacer), Some(_)) = (&mut self.pacer, limit) {
                            pacer.admit(n);
                        }
                    }
                    // Readiness was stale; it is cleared, so the next poll registers the waker.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(_) => return Poll::Ready(Err(Failed::Reader)),
                }
            }
            self.progress.throttled = poll_turn(&mut self.pacer, cx).is_pending();
            if self.progress.throttled {
                return Poll::Pending;
            }
            while self.in_pipe > 0 {
                ready!(dst.poll_write_ready(cx)).map_err(|_| Failed::Writer)?;
                let pipe = self.pipe.as_ref().expect("bytes in the pipe");
                let spliced = dst.try_io(Interest::WRITABLE, || {
                    rustix::pipe::splice(&pipe.read, None, &*dst, None, self.in_pipe, flags)
                        .map_err(io::Error::from)
                });
                match spliced {
                    Ok(0) => return Poll::Ready(Err(Failed::Writer)),
                    Ok(n) => {
                        self.in_pipe -= n;
                        self.progress.bytes += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(_) => return Poll::Ready(Err(Failed::Writer)),
                }
            }
            if self.eof {
                // ENOTCONN: the destination already closed both ways; nothing is lost (tokio's
                // own shutdown treats it the same).
                match rustix::net::shutdown(&*dst, Shutdown::Write) {
                    Ok(()) | Err(rustix::io::Errno::NOTCONN) => {}
                    Err(_) => return Poll::Ready(Err(Failed::Writer)),
                }
                self.progress.done = true;
                self.release();
                return Poll::Ready(Ok(()));
            }
        }
    }
}
