//! Short queues for throttled directions. A throttle that reads slowly from a socket whose
//! kernel buffers stay as they were lets the sender believe, seconds early, that its bytes are
//! gone: they wait in the gateway's receive queue (and the upstream's send queue) instead. An
//! SDK's read timeout then fires on an upload the origin never saw, and whole blocks are sent
//! again. So while a limit is in force, a direction's source holds at most
//! `limits.throttle_queue` of the limit (100 ms by default: its receive buffer, which the
//! kernel doubles for its overhead) and its destination at most one burst unsent
//! (TCP_NOTSENT_LOWAT); both follow the limit when it moves and are given back when it is
//! lifted.
//!
//! The window a receiver advertises counts from the last byte received, not the last byte
//! read, so only the receive buffer's size bounds what queues in it (TCP_WINDOW_CLAMP does
//! not). A receive buffer set by SO_RCVBUF stays out of the kernel's autotuning for the
//! socket's life, so it is set only when the buffer holds more than the bound (a slow limit,
//! or a tunnel that was fast before its window began), and given back as large as the system
//! allows (`net.core.rmem_max`, times two) when the limit is lifted.

use crate::bandwidth::QueueBound;
use crate::bandwidth::bucket::BURST;
use rustix::net::sockopt;
use std::os::fd::BorrowedFd;

/// Never a receive buffer smaller than this (asked; the kernel doubles it), nor than two of the
/// path's segments: smaller windows stall on delayed ACKs and drop segments.
pub const MIN_QUEUE: usize = 16 * 1024;
/// The least unsent data a destination may hold before the copy is told to wait.
pub const MIN_UNSENT: usize = 4 * 1024;
/// Asked of SO_RCVBUF when a limit is lifted: the kernel caps it at `net.core.rmem_max`.
const LARGEST_BUFFER: usize = 1 << 30;

/// Brings the sockets of one direction in line with `burst`, the read limit in force (`None`:
/// no limit). Only a change of more than a quarter, or a limit set or lifted, touches the
/// sockets: a steady limit costs one comparison per read. Failures are ignored: the bound is
/// an improvement, and the copy works without it.
pub fn bound(
    state: &mut QueueBound,
    burst: Option<usize>,
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
) {
    let want = burst.unwrap_or(0);
    if state.millis == 0 || !moved(state.burst, want) {
        return;
    }
    state.burst = want;
    let unsent = socket2::SockRef::from(&dst);
    if want == 0 {
        if state.receive_set {
            let _ = sockopt::set_socket_recv_buffer_size(src, LARGEST_BUFFER);
            state.receive_set = false;
        }
        // 0: the system's default (net.ipv4.tcp_notsent_lowat).
        let _ = unsent.set_tcp_notsent_lowat(0);
        return;
    }
    // Room for two of the sender's segments at least: a window smaller than one segment
    // stalls the sender (Nagle, silly-window avoidance) and the limit is not reached.
    let segment = segment_size(src);
    let burst_ms = BURST.as_millis() as usize;
    let queue = (want * state.millis as usize / burst_ms)
        .max(MIN_QUEUE)
        .max(2 * segment);
    // The kernel reports twice what was asked: compare like with like.
    let held = sockopt::socket_recv_buffer_size(src).unwrap_or(usize::MAX);
    if state.receive_set || held > 2 * queue {
        state.receive_set |= sockopt::set_socket_recv_buffer_size(src, queue).is_ok();
    }
    let _ = unsent.set_tcp_notsent_lowat(want.max(MIN_UNSENT).min(u32::MAX as usize) as u32);
}

/// The segment size on `src`'s path (TCP_MAXSEG: what this side sends, which a path's two
/// sides share); 64 KiB on loopback.
fn segment_size(src: BorrowedFd<'_>) -> usize {
    socket2::SockRef::from(&src)
        .tcp_mss()
        .map_or(0, |mss| mss as usize)
}

/// Whether the sockets must follow a change from `old` to `new` (0: no limit).
fn moved(old: usize, new: usize) -> bool {
    if (old == 0) != (new == 0) {
        return true;
    }
    // More than a quarter either way.
    new.saturating_mul(4) < old.saturating_mul(3) || new.saturating_mul(4) > old.saturating_mul(5)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    #[test]
    fn only_a_change_of_more_than_a_quarter_or_on_off_touches_the_sockets() {
        assert!(!moved(0, 0));
        assert!(moved(0, 12_500));
        assert!(moved(12_500, 0));
        assert!(!moved(12_500, 12_500));
        assert!(!moved(12_500, 15_000));
        assert!(!moved(12_500, 10_000));
        assert!(moved(12_500, 16_000));
        assert!(moved(12_500, 9_000));
    }

    /// A connected pair with Ethernet-size segments (1,448 bytes), as a branch server sends.
    fn pair() -> (TcpStream, TcpStream) {
        use socket2::{Domain, Socket, Type};
        let socket = || {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_tcp_mss(1448).unwrap();
            s
        };
        let listener = socket();
        listener
            .bind(
                &"127.0.0.1:0"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )
            .unwrap();
        listener.listen(1).unwrap();
        let listener: TcpListener = listener.into();
        let src = socket();
        src.connect(&listener.local_addr().unwrap().into()).unwrap();
        let (dst, _) = listener.accept().unwrap();
        (src.into(), dst)
    }

    fn receive_buffer(s: &TcpStream) -> usize {
        sockopt::socket_recv_buffer_size(s).unwrap()
    }

    fn unsent(s: &TcpStream) -> u32 {
        socket2::SockRef::from(s).tcp_notsent_lowat().unwrap()
    }

    #[test]
    fn a_slow_limit_shrinks_both_queues_follows_changes_and_lifting_it_gives_them_back() {
        let (src, dst) = pair();
        let before = receive_buffer(&src);
        let mut state = QueueBound::default();

        // 2 Mbit/s: a 12,500-byte burst, so 25,000 bytes asked of the receive buffer (the
        // kernel doubles it) and 12,500 bytes unsent.
        bound(&mut state, Some(12_500), src.as_fd(), dst.as_fd());
        assert!(before > 50_000);
        assert_eq!(receive_buffer(&src), 50_000);
        assert_eq!(unsent(&dst), 12_500);

        // A small change leaves the sockets alone; a large one follows, down to the floors.
        bound(&mut state, Some(14_000), src.as_fd(), dst.as_fd());
        assert_eq!(receive_buffer(&src), 50_000);
        bound(&mut state, Some(1_024), src.as_fd(), dst.as_fd());
        assert_eq!(receive_buffer(&src), 2 * MIN_QUEUE);
        assert_eq!(unsent(&dst), MIN_UNSENT as u32);

        // Lifted: as large a buffer as the system allows, and the system's unsent default.
        bound(&mut state, None, src.as_fd(), dst.as_fd());
        let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(receive_buffer(&src), 2 * rmem_max);
        assert_eq!(unsent(&dst), 0);
        assert_eq!(state.burst, 0);
    }

    #[test]
    fn the_configured_queue_sizes_the_buffer_and_off_leaves_both_sockets_alone() {
        let (src, dst) = pair();
        let before = receive_buffer(&src);
        // 200 ms at 2 Mbit/s: four 12,500-byte bursts asked, doubled by the kernel.
        let mut state = QueueBound {
            millis: 200,
            ..QueueBound::default()
        };
        bound(&mut state, Some(12_500), src.as_fd(), dst.as_fd());
        assert_eq!(receive_buffer(&src), 100_000);

        let (src, dst) = pair();
        let mut state = QueueBound {
            millis: 0,
            ..QueueBound::default()
        };
        bound(&mut state, Some(12_500), src.as_fd(), dst.as_fd());
        assert_eq!(receive_buffer(&src), before);
        assert_eq!(unsent(&dst), 0);
        assert!(!state.receive_set);
    }

    #[test]
    fn a_fast_limit_leaves_an_unlocked_receive_buffer_to_the_kernel() {
        let (src, dst) = pair();
        let before = receive_buffer(&src);
        let mut state = QueueBound::default();
        // 50 MB/s: a 2.5 MB burst; the default buffer (128 KiB) is already smaller.
        bound(&mut state, Some(2_500_000), src.as_fd(), dst.as_fd());
        assert_eq!(receive_buffer(&src), before);
        assert!(!state.receive_set);
        assert_eq!(unsent(&dst), 2_500_000);
        bound(&mut state, None, src.as_fd(), dst.as_fd());
        assert_eq!(
            receive_buffer(&src),
            before,
            "never set, so not given back either"
        );
    }
}
