//! The upstream's answer to the first ClientHello, read far enough to see a TLS 1.3
//! HelloRetryRequest (RFC 8446 4.1.4). A server that wants a different key share answers with
//! one, and the client then sends a second ClientHello: the SNI check must see that one too, or
//! a client could name an allowed host first and another one after the retry. Only tunnels with
//! an SNI check read this far; every byte read is forwarded to the client unchanged.

use bytes::BufMut;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The `random` of a HelloRetryRequest: SHA-256("HelloRetryRequest") (RFC 8446 4.1.3). A
/// HelloRetryRequest is a ServerHello carrying this value.
pub const HELLO_RETRY_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];
/// Most bytes read while looking for the first handshake message. A ServerHello is 90-1,300
/// bytes (post-quantum key shares the most); a HelloRetryRequest with a cookie a few hundred.
pub const MAX_SERVER_HELLO_BYTES: usize = 8 * 1024;
/// Longest wait for the upstream's first handshake message after the ClientHello went out.
pub const SERVER_HELLO_TIMEOUT: Duration = Duration::from_secs(10);

const HANDSHAKE: u8 = 22;
const SERVER_HELLO: u8 = 2;
/// Handshake header (type, 24-bit length), legacy_version, random.
const UP_TO_RANDOM: usize = 4 + 2 + 32;
/// Largest TLSPlaintext fragment (RFC 8446 5.1).
const MAX_FRAGMENT: usize = 1 << 14;

/// What the upstream's first handshake message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flight {
    /// A complete HelloRetryRequest: the client's second ClientHello comes next.
    HelloRetry,
    /// Anything else: a ServerHello (TLS 1.3 or earlier), an alert, bytes that are not TLS. No
    /// second ClientHello can follow.
    NoRetry,
}

/// `None` while more bytes are needed. Decides as soon as the first handshake message's type
/// and `random` are in (a HelloRetryRequest once it is complete, so the client gets all of it),
/// whether the message spans records or a record spans reads.
pub fn parse(bytes: &[u8]) -> Option<Flight> {
    // The first handshake message's first bytes (header, legacy_version, random) and how many
    // of its bytes the records so far carried.
    let mut head = [0u8; UP_TO_RANDOM];
    let mut seen = 0usize;
    let mut rest = bytes;
    loop {
        if rest.is_empty() {
            return None;
        }
        // A record header: handshake type, TLS major version 3, a fragment length in range.
        if rest[0] != HANDSHAKE || rest.get(1).is_some_and(|&major| major != 3) {
            return Some(Flight::NoRetry);
        }
        let header = rest.get(..5)?;
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len > MAX_FRAGMENT {
            return Some(Flight::NoRetry);
        }
        let fragment = &rest[5..rest.len().min(5 + len)];
        for (i, &b) in fragment.iter().enumerate() {
            if let Some(slot) = head.get_mut(seen + i) {
                *slot = b;
            }
        }
        seen += fragment.len();
        if seen >= 1 && head[0] != SERVER_HELLO {
            return Some(Flight::NoRetry);
        }
        if seen >= UP_TO_RANDOM {
            if head[6..] != HELLO_RETRY_RANDOM {
                return Some(Flight::NoRetry);
            }
            let message_len = 4 + u32::from_be_bytes([0, head[1], head[2], head[3]]) as usize;
            if seen >= message_len {
                return Some(Flight::HelloRetry);
            }
        }
        if fragment.len() < len {
            return None;
        }
        rest = &rest[5 + len..];
    }
}

/// What reading the upstream's first flight found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerHello {
    /// A decision on the first handshake message.
    Seen(Flight),
    /// The upstream closed (or failed) before one.
    Closed,
    /// No decision within `MAX_SERVER_HELLO_BYTES` (a HelloRetryRequest too large to follow).
    TooLarge,
    /// No decision within `SERVER_HELLO_TIMEOUT`.
    Silent,
}

/// Reads from `upstream` until its first handshake message is decided, at most
/// `MAX_SERVER_HELLO_BYTES` and `SERVER_HELLO_TIMEOUT`. Returns the verdict and every byte read,
/// to be forwarded to the client unchanged.
pub async fn peek_server_hello<R: AsyncRead + Unpin>(upstream: &mut R) -> (ServerHello, Vec<u8>) {
    let mut bytes = Vec::new();
    let read = async {
        loop {
            if let Some(flight) = parse(&bytes) {
                return ServerHello::Seen(flight);
            }
            if bytes.len() >= MAX_SERVER_HELLO_BYTES {
                return ServerHello::TooLarge;
            }
            // Appends only what arrives (nothing when the timeout cuts the read short).
            bytes.reserve(4096);
            let mut room = (&mut bytes).limit(4096);
            match upstream.read_buf(&mut room).await {
                Ok(0) | Err(_) => return ServerHello::Closed,
                Ok(_) => {}
            }
        }
    };
    let verdict = tokio::time::timeout(SERVER_HELLO_TIMEOUT, read)
        .await
        .unwrap_or(ServerHello::Silent);
    (verdict, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::{CryptoProvider, ring};
    use std::sync::Arc;

    fn provider(kx_groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>) -> CryptoProvider {
        CryptoProvider {
            kx_groups,
            ..ring::default_provider()
        }
    }

    /// What a rustls server of `provider` and `versions` answers to a rustls client that offers
    /// x25519 first (its only key share) and secp256r1 second.
    fn server_answer(
        server_provider: CryptoProvider,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Vec<u8> {
        let client_provider = provider(vec![ring::kx_group::X25519, ring::kx_group::SECP256R1]);
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(client_provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("a.example").unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
        let mut hello = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut hello).unwrap();
        }

        let certified = rcgen::generate_simple_self_signed(["a.example".to_owned()]).unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(server_provider))
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key)
            .unwrap();
        let mut server = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        let mut input = &hello[..];
        while !input.is_empty() {
            server.read_tls(&mut input).unwrap();
        }
        server.process_new_packets().unwrap();
        let mut answer = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut answer).unwrap();
        }
        answer
    }

    /// A secp256r1-only rustls server: HelloRetryRequest (then a ChangeCipherSpec).
    fn hello_retry() -> Vec<u8> {
        server_answer(
            provider(vec![ring::kx_group::SECP256R1]),
            rustls::DEFAULT_VERSIONS,
        )
    }

    /// Length of the first record (header included).
    fn first_record_len(bytes: &[u8]) -> usize {
        5 + usize::from(u16::from_be_bytes([bytes[3], bytes[4]]))
    }

    /// The first record's handshake message, re-framed into records of at most `size` bytes.
    fn reframed(bytes: &[u8], size: usize) -> Vec<u8> {
        let message = &bytes[5..first_record_len(bytes)];
        let mut out = Vec::new();
        for piece in message.chunks(size) {
            out.extend_from_slice(&[HANDSHAKE, 3, 3]);
            out.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            out.extend_from_slice(piece);
        }
        out.extend_from_slice(&bytes[first_record_len(bytes)..]);
        out
    }

    #[test]
    fn the_retry_random_is_the_hash_of_its_name() {
        let digest = ::ring::digest::digest(&::ring::digest::SHA256, b"HelloRetryRequest");
        assert_eq!(digest.as_ref(), HELLO_RETRY_RANDOM);
    }

    #[test]
    fn a_real_hello_retry_request_is_seen_once_complete() {
        let answer = hello_retry();
        let end = first_record_len(&answer);
        assert_eq!(&answer[5..6], &[SERVER_HELLO]);
        assert_eq!(&answer[11..43], &HELLO_RETRY_RANDOM);
        assert_eq!(parse(&answer), Some(Flight::HelloRetry));
        assert_eq!(parse(&answer[..end]), Some(Flight::HelloRetry));
        // Cut anywhere before its end: more bytes needed, never a wrong answer early.
        for cut in 0..end {
            assert_eq!(parse(&answer[..cut]), None, "cut at {cut}");
        }
        // The same message spread over several records (fragments of 1, 7, 40 bytes).
        for size in [1, 7, 40] {
            let pieces = reframed(&answer, size);
            assert_eq!(
                parse(&pieces),
                Some(Flight::HelloRetry),
                "{size}-byte records"
            );
            let message_end = pieces.len() - (answer.len() - end);
            for cut in 0..message_end {
                assert_eq!(
                    parse(&pieces[..cut]),
                    None,
                    "{size}-byte records cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn a_normal_server_hello_is_no_retry_as_soon_as_its_random_is_in() {
        let tls13 = server_answer(ring::default_provider(), rustls::DEFAULT_VERSIONS);
        let tls12 = server_answer(ring::default_provider(), &[&rustls::version::TLS12]);
        for (who, answer) in [("TLS 1.3", tls13), ("TLS 1.2", tls12)] {
            assert_eq!(&answer[5..6], &[SERVER_HELLO], "{who}");
            assert_ne!(&answer[11..43], &HELLO_RETRY_RANDOM, "{who}");
            assert_eq!(parse(&answer), Some(Flight::NoRetry), "{who}");
            for cut in 0..5 + UP_TO_RANDOM {
                assert_eq!(parse(&answer[..cut]), None, "{who} cut at {cut}");
            }
            assert_eq!(parse(&answer[..5 + UP_TO_RANDOM]), Some(Flight::NoRetry));
            assert_eq!(parse(&reframed(&answer, 3)), Some(Flight::NoRetry), "{who}");
        }
    }

    #[test]
    fn garbage_alerts_and_other_messages_are_no_retry() {
        assert_eq!(parse(b""), None);
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\n"), Some(Flight::NoRetry));
        assert_eq!(parse(b"SSH-2.0-OpenSSH_9.2\r\n"), Some(Flight::NoRetry));
        // An alert record (handshake_failure).
        assert_eq!(parse(&[21, 3, 3, 0, 2, 2, 40]), Some(Flight::NoRetry));
        // A handshake record whose message is not a ServerHello (a Certificate).
        assert_eq!(parse(&[22, 3, 3, 0, 4, 11, 0, 0, 0]), Some(Flight::NoRetry));
        // Not TLS's major version; a fragment longer than TLS allows.
        assert_eq!(parse(&[22, 9]), Some(Flight::NoRetry));
        assert_eq!(parse(&[22, 3, 3, 0x48, 0x01, 2]), Some(Flight::NoRetry));
        // A record header alone, or cut inside: more needed.
        assert_eq!(parse(&[22]), None);
        assert_eq!(parse(&[22, 3, 3, 0]), None);
        assert_eq!(parse(&[22, 3, 3, 0, 40, 2, 0]), None);
        // A truncated HelloRetryRequest whose record claims more than it holds: more needed.
        let answer = hello_retry();
        assert_eq!(parse(&answer[..50]), None);
        // A record that ends before its HelloRetryRequest does: the rest comes in the next one.
        let mut short = answer[..first_record_len(&answer)].to_vec();
        short[4] -= 10;
        assert_eq!(parse(&short[..short.len() - 10]), None);
    }

    /// Bounded fuzzing in every test run: mutated and random server flights never panic, and a
    /// verdict once given stands whatever bytes follow. (Longer runs: fuzz/ with cargo fuzz.)
    #[test]
    fn mutated_and_random_server_flights_never_panic() {
        let seeds = [
            hello_retry(),
            reframed(&hello_retry(), 5),
            server_answer(ring::default_provider(), rustls::DEFAULT_VERSIONS),
            server_answer(ring::default_provider(), &[&rustls::version::TLS12]),
        ];
        let mut retries = 0;
        crate::gateway::mutations::each_mutation(&seeds, 20_000, 0x2545_f491_4f6c_dd1d, |input| {
            let verdict = parse(input);
            if verdict == Some(Flight::HelloRetry) {
                retries += 1;
            }
            if verdict.is_some() {
                // More bytes after a decided prefix (any: here a pattern from the input).
                let mut longer = input.to_vec();
                longer.extend(
                    input
                        .iter()
                        .rev()
                        .take(32)
                        .map(|b| b.wrapping_mul(31) ^ 0x5a),
                );
                longer.push(0x16);
                assert_eq!(parse(&longer), verdict, "a verdict does not change");
            }
        });
        assert!(retries > 500, "the mutations keep some retries: {retries}");
    }

    #[tokio::test]
    async fn a_retry_split_across_reads_is_seen_and_every_byte_kept() {
        let answer = hello_retry();
        let (mut origin, mut gateway_side) = tokio::io::duplex(64 * 1024);
        let sent = answer.clone();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(3) {
                tokio::io::AsyncWriteExt::write_all(&mut origin, piece)
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
            }
            origin
        });
        let (verdict, bytes) = peek_server_hello(&mut gateway_side).await;
        assert_eq!(verdict, ServerHello::Seen(Flight::HelloRetry));
        assert!(bytes.len() >= first_record_len(&answer));
        assert_eq!(bytes, answer[..bytes.len()], "kept unchanged");
        drop(writer.await.unwrap());

        let (verdict, bytes) = peek_server_hello(&mut &answer[..20]).await;
        assert_eq!((verdict, bytes.len()), (ServerHello::Closed, 20));
        let normal = server_answer(ring::default_provider(), rustls::DEFAULT_VERSIONS);
        let (verdict, bytes) = peek_server_hello(&mut &normal[..]).await;
        assert_eq!(
            (verdict, bytes),
            (ServerHello::Seen(Flight::NoRetry), normal)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_peek_is_bounded_in_bytes_and_time() {
        // A HelloRetryRequest that claims 16 MiB, in full records: given up at the bound.
        let mut huge = vec![SERVER_HELLO, 0xff, 0xff, 0xff, 3, 3];
        huge.extend_from_slice(&HELLO_RETRY_RANDOM);
        let mut endless = Vec::new();
        while endless.len() < 64 * 1024 {
            endless.extend_from_slice(&[HANDSHAKE, 3, 3, 0x40, 0x00]);
            let start = endless.len();
            endless.resize(start + 0x4000, 0);
            if start == 5 {
                endless[5..5 + huge.len()].copy_from_slice(&huge);
            }
        }
        assert_eq!(parse(&endless), None);
        let (verdict, bytes) = peek_server_hello(&mut &endless[..]).await;
        assert_eq!(verdict, ServerHello::TooLarge);
        assert!(bytes.len() >= MAX_SERVER_HELLO_BYTES);
        assert!(bytes.len() < MAX_SERVER_HELLO_BYTES + 4096);
        // An upstream that sends half a ServerHello and stops: given up after the timeout.
        let (mut origin, mut gateway_side) = tokio::io::duplex(64 * 1024);
        tokio::io::AsyncWriteExt::write_all(&mut origin, &endless[..20])
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let (verdict, bytes) = peek_server_hello(&mut gateway_side).await;
        assert_eq!((verdict, bytes.len()), (ServerHello::Silent, 20));
        assert!(started.elapsed() >= SERVER_HELLO_TIMEOUT);
        drop(origin);
    }
}
