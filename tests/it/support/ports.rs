//! Ports a test names itself (for a listener that must come back on the same port, a server
//! that cannot take port 0, or an address where nothing listens).

/// A free port below the ephemeral range (32768+): nothing listens on it now, and no client
/// socket of a parallel test can take it as its local port before the test binds it.
pub fn free_port() -> u16 {
    let seed = std::process::id() as u64 * 7919
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
    (0..200)
        .map(|i| 20_000 + ((seed + i * 104_729) % 12_000) as u16)
        .find(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("a free port between 20000 and 32000")
}
