//! SNI verification (anti domain fronting): after the 200, the client's first TLS record(s) are
//! read without terminating TLS, and the ClientHello's server name must fit the CONNECT target.
//! The bytes read are kept and forwarded unchanged when the check passes.

use super::refusal::{End, Refusal};
use crate::policy::SniMode;
use crate::policy::host::{DnsName, Host, Target};
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
    let mut bytes = already;
    let read = async {
        loop {
            match parse(&bytes) {
                Some(hello) => return hello,
                None if bytes.len() >= MAX_CLIENT_HELLO_BYTES => return Hello::NotTls,
                None => {}
            }
            let start = bytes.len();
            bytes.resize(start + 4096, 0);
            match client.read(&mut bytes[start..]).await {
                Ok(0) | Err(_) => {
                    bytes.truncate(start);
                    return Hello::Closed;
                }
                Ok(n) => bytes.truncate(start + n),
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

/// Whether the ClientHello fits the tunnel; a refusal closes it (the 200 went out already).
pub fn check_sni(
    hello: &Hello,
    mode: SniMode,
    target: &Target,
    allowed_by_policy: impl Fn(&DnsName) -> bool,
) -> Result<(), Refusal> {
    match hello {
        Hello::NotTls => Err(closed(
            End::NotTls,
            "tunnel bytes are not a TLS ClientHello",
        )),
        Hello::NoName => Err(closed(
            End::SniMissing,
            "ClientHello carries no server name",
        )),
        Hello::Closed => Err(closed(End::ClientClosed, "client sent no ClientHello")),
        Hello::Name(name) => match (&target.host, mode) {
            (Host::Name(host), SniMode::Match) if host == name => Ok(()),
            (Host::Name(host), SniMode::Match) => Err(closed(
                End::SniMismatch,
                format!("SNI {name} does not match CONNECT host {host}"),
            )),
            // An IP-literal target, or mode "allowed": the name must be one the policy allows.
            _ if allowed_by_policy(name) => Ok(()),
            _ => Err(closed(
                End::SniMismatch,
                format!("SNI {name} is not allowed on this port"),
            )),
        },
    }
}

fn closed(end: End, reason: impl Into<std::borrow::Cow<'static, str>>) -> Refusal {
    Refusal::after_reply(end, reason)
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
        let seeds = real_client_hellos();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20_000 {
            let (_, seed) = &seeds[round % seeds.len()];
            let mut input = seed.clone();
            match next() % 4 {
                0 => {
                    for _ in 0..1 + next() % 8 {
                        let i = (next() as usize) % input.len();
                        input[i] ^= 1 << (next() % 8);
                    }
                }
                1 => input.truncate((next() as usize) % input.len()),
                2 => {
                    let i = (next() as usize) % input.len();
                    let junk: Vec<u8> = (0..1 + next() % 64).map(|_| next() as u8).collect();
                    input.splice(i..i, junk);
                }
                _ => input = (0..(next() % 2048)).map(|_| next() as u8).collect(),
            }
            if let Some(Hello::Name(name)) = parse(&input) {
                assert!(DnsName::parse(name.as_str()).is_ok());
            }
        }
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
