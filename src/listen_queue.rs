//! How many clients wait in our listening sockets' accept queues (the kernel accepted them, the
//! gateway has not yet): asked of the kernel's socket diagnostics over netlink for listening TCP
//! sockets only, so a scrape costs the same with 10 or 100,000 sockets open on the machine.
//! Reading `/proc/net/tcp*` instead lists every socket (150 ms at 50,000); it stays as the
//! fallback where netlink is refused.

/// Clients waiting in the accept queues of the listening sockets `inodes` (Linux; else 0).
pub fn waiting(inodes: &[u64]) -> usize {
    if inodes.is_empty() {
        return 0;
    }
    #[cfg(target_os = "linux")]
    if let Some(n) = sock_diag::queued(inodes) {
        return n;
    }
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|table| queued_in_table(&table, inodes))
        .sum()
}

/// The accept queue lengths of the listening sockets `inodes` in one `/proc/net/tcp` table: for
/// a socket in state `0A` (listen), `rx_queue` is the number of connections waiting for accept.
fn queued_in_table(table: &str, inodes: &[u64]) -> usize {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let state = fields.nth(3)?;
            if state != "0A" {
                return None;
            }
            let queues = fields.next()?;
            let inode = fields.nth(4)?;
            if !inodes.contains(&inode.parse().ok()?) {
                return None;
            }
            usize::from_str_radix(queues.split_once(':')?.1, 16).ok()
        })
        .sum()
}

#[cfg(target_os = "linux")]
mod sock_diag {
    use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType, netlink};
    use std::time::Duration;

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const IPPROTO_TCP: u8 = 6;
    const TCP_LISTEN: u32 = 10;
    /// `struct nlmsghdr`.
    const HEADER: usize = 16;
    /// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then a 48-byte socket id.
    const REQUEST: usize = 56;
    /// In `struct inet_diag_msg`: `idiag_rqueue` (for a listening socket, its accept queue)
    /// and `idiag_inode`.
    const RQUEUE_AT: usize = 56;
    const INODE_AT: usize = 68;
    /// A dump that takes longer than this is abandoned (the caller falls back).
    const WAIT: Duration = Duration::from_secs(1);

    /// The accept queues of `inodes`, summed over IPv4 and IPv6; `None` if netlink refused.
    pub fn queued(inodes: &[u64]) -> Option<usize> {
        let socket = rustix::net::socket(
            AddressFamily::NETLINK,
            SocketType::DGRAM,
            Some(netlink::SOCK_DIAG),
        )
        .ok()?;
        rustix::net::sockopt::set_socket_timeout(
            &socket,
            rustix::net::sockopt::Timeout::Recv,
            Some(WAIT),
        )
        .ok()?;
        let kernel = netlink::SocketAddrNetlink::new(0, 0);
        let mut total = 0;
        let mut buffer = vec![0u8; 32 * 1024];
        for (seq, family) in [(1u32, libc_family::INET), (2, libc_family::INET6)] {
            let request = request(seq, family);
            rustix::net::sendto(&socket, &request, SendFlags::empty(), &kernel).ok()?;
            'dump: loop {
                let (received, _) =
                    rustix::net::recv(&socket, &mut buffer[..], RecvFlags::empty()).ok()?;
                let mut messages = &buffer[..received];
                while messages.len() >= HEADER {
                    let length = u32::from_ne_bytes(messages[0..4].try_into().ok()?) as usize;
                    let kind = u16::from_ne_bytes(messages[4..6].try_into().ok()?);
                    if length < HEADER || length > messages.len() {
                        return None;
                    }
                    match kind {
                        NLMSG_DONE => break 'dump,
                        NLMSG_ERROR => return None,
                        SOCK_DIAG_BY_FAMILY => {
                            let body = &messages[HEADER..length];
                            let field = |at: usize| {
                                body.get(at..at + 4)
                                    .and_then(|b| b.try_into().ok())
                                    .map(u32::from_ne_bytes)
                            };
                            let (queue, inode) = (field(RQUEUE_AT)?, field(INODE_AT)?);
                            if inodes.contains(&u64::from(inode)) {
                                total += queue as usize;
                            }
                        }
                        _ => {}
                    }
                    // Messages are 4-byte aligned.
                    let next = (length + 3) & !3;
                    messages = messages.get(next..).unwrap_or_default();
                }
            }
        }
        Some(total)
    }

    /// A dump request for the listening TCP sockets of `family`.
    fn request(seq: u32, family: u8) -> Vec<u8> {
        let mut message = Vec::with_capacity(HEADER + REQUEST);
        message.extend_from_slice(&((HEADER + REQUEST) as u32).to_ne_bytes());
        message.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        message.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        message.extend_from_slice(&seq.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes());
        message.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
        message.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
        message.resize(HEADER + REQUEST, 0);
        message
    }

    /// Address family numbers as `inet_diag_req_v2` takes them.
    mod libc_family {
        pub const INET: u8 = 2;
        pub const INET6: u8 = 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inode of a listener's socket, as the accept side records it.
    #[cfg(target_os = "linux")]
    fn inode(listener: &std::net::TcpListener) -> u64 {
        use std::os::unix::fs::MetadataExt;
        use std::os::unix::io::AsRawFd;
        std::fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd()))
            .unwrap()
            .ino()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_kernel_says_how_many_wait_and_both_ways_of_asking_agree() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other = std::net::TcpListener::bind("[::1]:0").unwrap();
        let (ours, theirs) = (inode(&listener), inode(&other));
        assert_eq!(sock_diag::queued(&[ours]), Some(0));
        let _clients: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap())
            .collect();
        let _other_client = std::net::TcpStream::connect(other.local_addr().unwrap()).unwrap();
        // The handshakes complete in the kernel; nothing accepts them.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while sock_diag::queued(&[ours]) != Some(3) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(sock_diag::queued(&[ours]), Some(3));
        assert_eq!(sock_diag::queued(&[ours, theirs]), Some(4));
        let table: usize = ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .map(|p| queued_in_table(&std::fs::read_to_string(p).unwrap(), &[ours, theirs]))
            .sum();
        assert_eq!(table, 4);
        assert_eq!(waiting(&[ours, theirs]), 4);
        assert_eq!(waiting(&[]), 0);
    }

    #[test]
    fn a_proc_table_counts_only_listening_sockets_of_ours() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0CEA 00000000:0000 0A 00000000:00000002 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0CEB 00000000:0000 0A 00000000:00000005 00:00000000 00000000     0        0 7777 1 0000000000000000 100 0 0 10 0
   2: 0100007F:0CEA 0100007F:D2F0 01 00000000:00000009 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1
";
        assert_eq!(queued_in_table(table, &[4242]), 2);
        assert_eq!(queued_in_table(table, &[4242, 7777]), 7);
        assert_eq!(queued_in_table(table, &[1]), 0);
    }
}
