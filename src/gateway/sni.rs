//! SNI verification (anti domain fronting): after the 200, the client's first TLS record(s) are
//! read without terminating TLS, and the ClientHello's server name must fit the CONNECT target.
//! The bytes read are kept and forwarded unchanged when the check passes. After a
//! HelloRetryRequest ([`super::hello_retry`]) the client's second ClientHello is read the same
//! way and must name the same server.

use crate::policy::host::DnsName;
use bytes::BufMut;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Most bytes read while looking for a complete ClientHello (post-quantum key shares make it
/// 1.2-1.8 KB; GREASE and many extensions more, never near this).
pub const MAX_CLIENT_HELLO_BYTES: usize = 16 * 1024;
/// Longest wait for the ClientHello after the 200.
pub const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the peek found.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// A ClientHello naming this host (normalised).
    Name(DnsName),
    /// A ClientHello without a (valid DNS) server name.
    NoName,
    /// The bytes are not a TLS ClientHello.
    NotTls,
    /// The client went away or stayed silent.
    Closed,
}

/// Reads from `client` (after `already`, the bytes that came with the request head) until a
/// whole ClientHello is seen, at most `MAX_CLIENT_HELLO_BYTES` and `CLIENT_HELLO_TIMEOUT`.
/// Returns the verdict and every byte read, to be forwarded unchanged.
pub async fn peek_client_hello<R: AsyncRead + Unpin>(
    client: &mut R,
    already: Vec<u8>,
) -> (Hello, Vec<u8>) {
    peek(client, already, parse).await
}

/// The same for the second ClientHello, after a HelloRetryRequest went to the client: `already`
/// holds what the client sent after its first hello; ChangeCipherSpec records before the hello
/// are passed over (and kept, like every byte read).
pub async fn peek_second_client_hello<R: AsyncRead + Unpin>(
    client: &mut R,
    already: Vec<u8>,
) -> (Hello, Vec<u8>) {
    peek(client, already, parse_after_retry).await
}

async fn peek<R: AsyncRead + Unpin>(
    client: &mut R,
    already: Vec<u8>,
    parse: fn(&[u8]) -> Option<Hello>,
) -> (Hello, Vec<u8>) {
    let mut bytes = already;
    let read = async {
        loop {
            match parse(&bytes) {
                Some(hello) => return hello,
                None if bytes.len() >= MAX_CLIENT_HELLO_BYTES => return Hello::NotTls,
                None => {}
            }
            // Appends only what arrives (nothing when the timeout cuts the read short).
            bytes.reserve(4096);
            let mut room = (&mut bytes).limit(4096);
            match client.read_buf(&mut room).await {
                Ok(0) | Err(_) => return Hello::Closed,
                Ok(_) => {}
            }
        }
    };
    let hello = tokio::time::timeout(CLIENT_HELLO_TIMEOUT, read)
        .await
        .unwrap_or(Hello::Closed);
    (hello, bytes)
}

/// `None` while more bytes are needed.
pub fn parse(bytes: &[u8]) -> Option<Hello> {
    if bytes.is_empty() {
        return None;
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut input = bytes;
    while !input.is_empty() {
        if acceptor.read_tls(&mut input).is_err() {
            return Some(Hello::NotTls);
        }
    }
    match acceptor.accept() {
        Ok(None) => None,
        Ok(Some(accepted)) => Some(
            accepted
                .client_hello()
                .server_name()
                .and_then(|name| DnsName::parse(name).ok())
                .map_or(Hello::NoName, Hello::Name),
        ),
        Err(_) => Some(Hello::NotTls),
    }
}

/// A ChangeCipherSpec record (RFC 8446 5: type 20, one byte 0x01), which a client in
/// middlebox compatibility mode may send before its second ClientHello (RFC 8446 D.4).
const CHANGE_CIPHER_SPEC: [u8; 6] = [20, 3, 3, 0, 1, 1];

/// Like [`parse`], after any ChangeCipherSpec records; `None` while more bytes are needed.
pub fn parse_after_retry(bytes: &[u8]) -> Option<Hello> {
    let mut rest = bytes;
    while rest.first() == Some(&CHANGE_CIPHER_SPEC[0]) {
        // Any TLS 1.x record version (byte 2), but only the one valid content.
        let fits = rest
            .iter()
            .zip(CHANGE_CIPHER_SPEC)
            .enumerate()
            .all(|(i, (&got, want))| i == 2 || got == want);
        if !fits {
            return Some(Hello::NotTls);
        }
        rest = rest.get(CHANGE_CIPHER_SPEC.len()..)?;
    }
    parse(rest)
}

/// How many bytes of `bytes` the ClientHello [`parse`] found takes: the handshake record(s) up
/// to the one in which it ends. `None` when that record carries more than the hello (a second
/// hello hidden there would reach the upstream unchecked) or the records are not handshake ones.
pub fn hello_records_len(bytes: &[u8]) -> Option<usize> {
    let mut header = [0u8; 4];
    let mut seen = 0usize;
    let mut at = 0usize;
    loop {
        let record = bytes.get(at..at + 5)?;
        if record[0] != 22 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([record[3], record[4]]));
        let fragment = bytes.get(at + 5..at + 5 + len)?;
        for (i, &b) in fragment.iter().enumerate() {
            if let Some(slot) = header.get_mut(seen + i) {
                *slot = b;
            }
        }
        seen += len;
        at += 5 + len;
        if seen >= 4 {
            let message_len = 4 + u32::from_be_bytes([0, header[1], header[2], header[3]]) as usize;
            if seen == message_len {
                return Some(at);
            }
            if seen > message_len {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The first flight a real rustls client sends for `server_name`.
    fn client_hello(server_name: &str) -> Vec<u8> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(std::iter::empty::<rustls::pki_types::TrustAnchor<'static>>());
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    #[test]
    fn client_hello_table() {
        let hello = client_hello("Share1.File.Core.Windows.Net");
        let name = |n: &str| Hello::Name(DnsName::parse(n).unwrap());
        assert_eq!(parse(&hello), Some(name("share1.file.core.windows.net")));
        // Split anywhere: more bytes needed, then the same answer.
        for cut in [1, 5, 6, 40, hello.len() - 1] {
            assert_eq!(parse(&hello[..cut]), None, "cut at {cut}");
        }
        // An IP address as server name is not sent as SNI.
        assert_eq!(parse(&client_hello("127.0.0.1")), Some(Hello::NoName));
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Hello::NotTls)
        );
        assert_eq!(parse(b"SSH-2.0-OpenSSH_9.2\r\n"), Some(Hello::NotTls));
        assert_eq!(
            parse(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]),
            Some(Hello::NotTls)
        );
    }

    /// A TLS 1.3 ClientHello as browsers send it: GREASE values in the cipher suites, groups,
    /// versions and extension list, and an (outer) Encrypted Client Hello extension.
    fn grease_ech_client_hello(server_name: &str) -> Vec<u8> {
        fn ext(id: u16, data: &[u8]) -> Vec<u8> {
            let mut e = id.to_be_bytes().to_vec();
            e.extend_from_slice(&(data.len() as u16).to_be_bytes());
            e.extend_from_slice(data);
            e
        }
        let name = server_name.as_bytes();
        let mut sni = ((name.len() + 3) as u16).to_be_bytes().to_vec();
        sni.push(0);
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name);
        let mut key_share = vec![0, 36, 0x00, 0x1d, 0, 32];
        key_share.extend_from_slice(&[7; 32]);
        let mut ech = vec![0, 0x00, 0x01, 0x00, 0x01, 0x2a, 0, 32];
        ech.extend_from_slice(&[9; 32]);
        ech.extend_from_slice(&[0, 16]);
        ech.extend_from_slice(&[5; 16]);
        let extensions: Vec<u8> = [
            ext(0x1a1a, &[]),
            ext(0x0000, &sni),
            ext(0x002b, &[4, 0x0a, 0x0a, 0x03, 0x04]),
            ext(0x000a, &[0, 4, 0x0a, 0x0a, 0x00, 0x1d]),
            ext(0x0033, &key_share),
            ext(0x000d, &[0, 2, 0x08, 0x04]),
            ext(0x002d, &[1, 1]),
            ext(0xfe0d, &ech),
            ext(0x2a2a, &[0]),
        ]
        .concat();
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[1; 32]);
        body.push(32);
        body.extend_from_slice(&[2; 32]);
        body.extend_from_slice(&[0, 6, 0x0a, 0x0a, 0x13, 0x01, 0x13, 0x02]);
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        body.extend_from_slice(&extensions);
        let mut handshake = vec![1];
        handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        handshake.extend_from_slice(&body);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    /// Real first flights: rustls, OpenSSL 3.0 (`openssl s_client`), curl 7.88, and the GREASE
    /// and ECH-bearing one above, all for the same name.
    fn real_client_hellos() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("rustls", client_hello("share1.file.core.windows.net")),
            (
                "openssl",
                include_bytes!("testdata/clienthello-openssl.bin").to_vec(),
            ),
            (
                "curl",
                include_bytes!("testdata/clienthello-curl.bin").to_vec(),
            ),
            (
                "grease+ech",
                grease_ech_client_hello("share1.file.core.windows.net"),
            ),
        ]
    }

    #[test]
    fn real_client_hellos_name_their_server_whole_or_in_pieces() {
        let want = Hello::Name(DnsName::parse("share1.file.core.windows.net").unwrap());
        for (who, hello) in real_client_hellos() {
            assert_eq!(parse(&hello).as_ref(), Some(&want), "{who}");
            // Split into two records' worth of arrivals: never a wrong answer early.
            for cut in (1..hello.len()).step_by(7) {
                assert_eq!(parse(&hello[..cut]), None, "{who} cut at {cut}");
            }
        }
    }

    /// Bounded fuzzing in every test run: mutated and random inputs never panic, and anything
    /// reported as a name is a valid DNS name. (Longer runs: fuzz/ with cargo fuzz.)
    #[test]
    fn mutated_and_random_client_hellos_never_panic() {
        let seeds: Vec<Vec<u8>> = real_client_hellos().into_iter().map(|(_, s)| s).collect();
        crate::gateway::mutations::each_mutation(&seeds, 20_000, 0x9e37_79b9_7f4a_7c15, |input| {
            if let Some(Hello::Name(name)) = parse(input) {
                assert!(DnsName::parse(name.as_str()).is_ok());
            }
            if let Some(Hello::Name(name)) = parse_after_retry(input) {
                assert!(DnsName::parse(name.as_str()).is_ok());
            }
            if let Some(len) = hello_records_len(input) {
                assert!(len <= input.len());
            }
        });
    }

    /// `record`'s handshake message in records of at most `size` bytes.
    fn reframed(record: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in record[5..].chunks(size) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            out.extend_from_slice(piece);
        }
        out
    }

    #[test]
    fn a_hello_takes_its_records_and_nothing_more() {
        for (who, hello) in real_client_hellos() {
            assert_eq!(hello_records_len(&hello), Some(hello.len()), "{who}");
            // Later records are not part of it.
            let mut then_more = hello.clone();
            then_more.extend_from_slice(&CHANGE_CIPHER_SPEC);
            then_more.extend_from_slice(&client_hello("evil.example"));
            assert_eq!(hello_records_len(&then_more), Some(hello.len()), "{who}");
            // Spread over several records: all of them.
            let pieces = reframed(&hello, 100);
            assert_eq!(parse(&pieces), parse(&hello), "{who}");
            assert_eq!(hello_records_len(&pieces), Some(pieces.len()), "{who}");
            assert_eq!(hello_records_len(&pieces[..pieces.len() - 1]), None);
        }
        // A second hello inside the first one's record would reach the upstream unchecked.
        let first = client_hello("a.example");
        let second = client_hello("evil.example");
        let mut one_record = first.clone();
        one_record.extend_from_slice(&second[5..]);
        let len = (one_record.len() - 5) as u16;
        one_record[3..5].copy_from_slice(&len.to_be_bytes());
        assert_eq!(hello_records_len(&one_record), None);
        assert_eq!(hello_records_len(&[23, 3, 3, 0, 0]), None);
        assert_eq!(hello_records_len(b""), None);
    }

    #[test]
    fn the_second_hello_may_follow_change_cipher_spec_records() {
        let hello = client_hello("a.example");
        let want = Some(Hello::Name(DnsName::parse("a.example").unwrap()));
        assert_eq!(parse_after_retry(&hello), want);
        let mut after_ccs = [CHANGE_CIPHER_SPEC, CHANGE_CIPHER_SPEC].concat();
        after_ccs[2] = 1; // any TLS 1.x record version
        after_ccs.extend_from_slice(&hello);
        assert_eq!(parse_after_retry(&after_ccs), want);
        for cut in 0..after_ccs.len() {
            assert_eq!(parse_after_retry(&after_ccs[..cut]), None, "cut at {cut}");
        }
        // A record of type 20 with anything else in it is not a ChangeCipherSpec.
        assert_eq!(parse_after_retry(&[20, 3, 3, 0, 1, 2]), Some(Hello::NotTls));
        assert_eq!(parse_after_retry(&[20, 3, 3, 0, 2]), Some(Hello::NotTls));
        assert_eq!(parse_after_retry(&[20, 9]), Some(Hello::NotTls));
        let mut then_garbage = CHANGE_CIPHER_SPEC.to_vec();
        then_garbage.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(parse_after_retry(&then_garbage), Some(Hello::NotTls));
    }

    #[tokio::test(start_paused = true)]
    async fn the_peek_is_bounded_in_bytes_and_time() {
        // A handshake record that promises more than 16 KiB never completes: cut at the bound.
        let mut endless = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0xff, 0xff, 0xff];
        endless.resize(64 * 1024, 0);
        let (verdict, bytes) = peek_client_hello(&mut &endless[..], Vec::new()).await;
        assert_eq!(verdict, Hello::NotTls);
        assert!(
            bytes.len() >= MAX_CLIENT_HELLO_BYTES && bytes.len() < MAX_CLIENT_HELLO_BYTES + 4096
        );
        // A client that sends half a ClientHello and stops: given up after the timeout.
        let (mut client, mut gateway_side) = tokio::io::duplex(64 * 1024);
        let hello = client_hello("a.example");
        tokio::io::AsyncWriteExt::write_all(&mut client, &hello[..20])
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let (verdict, _) = peek_client_hello(&mut gateway_side, Vec::new()).await;
        assert_eq!(verdict, Hello::Closed);
        assert!(started.elapsed() >= CLIENT_HELLO_TIMEOUT);
        drop(client);
    }

    #[tokio::test]
    async fn peeking_keeps_every_byte_read() {
        let hello = client_hello("a.example");
        let (head, rest) = hello.split_at(10);
        let mut rest_then_app_data = rest.to_vec();
        rest_then_app_data.extend_from_slice(b"later bytes");
        let mut reader = &rest_then_app_data[..];
        let (verdict, bytes) = peek_client_hello(&mut reader, head.to_vec()).await;
        assert_eq!(verdict, Hello::Name(DnsName::parse("a.example").unwrap()));
        let mut all = head.to_vec();
        all.extend_from_slice(&rest_then_app_data[..bytes.len() - head.len()]);
        assert_eq!(bytes, all, "forwarded unchanged");
        let (verdict, _) = peek_client_hello(&mut &b""[..], Vec::new()).await;
        assert_eq!(verdict, Hello::Closed);
    }
}
