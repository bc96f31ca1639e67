//! The start of a tunnel with an SNI check (anti domain fronting), after the 200: the first
//! ClientHello is peeked and checked, forwarded alone; the upstream's first handshake message is
//! read far enough to see a HelloRetryRequest and passed on; after one, the client's second
//! ClientHello must name the same server and pass the same check. Every byte read goes on
//! unchanged and is counted; a refusal closes the tunnel.

use super::hello_retry::{self, Flight, ServerHello};
use super::refusal::{End, Refusal};
use super::sni::{self, Hello};
use crate::access_log::AccessRecord;
use crate::policy::SniMode;
use crate::policy::host::{DnsName, Host, Target};
use crate::stream::{ClientStream, Upstream};
use tokio::io::AsyncWriteExt;

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

/// Whether the second ClientHello (after a HelloRetryRequest) fits: it must name the server the
/// first one named (RFC 8446 4.1.2 allows no change), then pass `check` like the first did.
pub fn check_second_sni(
    first: &DnsName,
    second: &Hello,
    check: impl FnOnce(&Hello) -> Result<(), Refusal>,
) -> Result<(), Refusal> {
    match second {
        Hello::Name(name) if name != first => Err(closed(
            End::SniMismatch,
            format!("second ClientHello after HelloRetryRequest names {name}, not {first}"),
        )),
        _ => check(second).map_err(|refusal| Refusal {
            reason: format!("after HelloRetryRequest: {}", refusal.reason).into(),
            ..refusal
        }),
    }
}

fn closed(end: End, reason: impl Into<std::borrow::Cow<'static, str>>) -> Refusal {
    Refusal::after_reply(end, reason)
}

/// The start of a tunnel with an SNI check: peek the ClientHello and check it, forward it
/// alone, read the upstream's answer far enough to see a HelloRetryRequest and pass it on, and
/// after one check the client's second ClientHello the same way (it must name the same server).
/// Every byte read goes on unchanged and is counted; a refusal closes the tunnel.
pub async fn checked_tls_start(
    client: &mut ClientStream,
    upstream: &mut Upstream,
    early: Vec<u8>,
    check: impl Fn(&sni::Hello) -> Result<(), Refusal>,
    record: &mut AccessRecord,
) -> Result<(), Refusal> {
    let (hello, mut bytes) = sni::peek_client_hello(client, early).await;
    if let sni::Hello::Name(name) = &hello {
        record.sni = Some(name.to_string());
    }
    check(&hello)?;
    let sni::Hello::Name(first) = hello else {
        // Only a named ClientHello passes the check.
        return Err(Refusal::after_reply(
            End::SniMissing,
            "ClientHello carries no server name",
        ));
    };
    // What the client sent after its hello waits until the upstream's answer is known: a second
    // hello sent early must not reach the upstream unchecked.
    let Some(hello_len) = sni::hello_records_len(&bytes) else {
        return Err(Refusal::after_reply(
            End::NotTls,
            "ClientHello record carries more than the ClientHello",
        ));
    };
    let held = bytes.split_off(hello_len);
    send_up(upstream, &bytes, &mut record.bytes_up).await?;

    let (answer, bytes) = hello_retry::peek_server_hello(upstream).await;
    if !bytes.is_empty() {
        let write = async {
            client.write_all(&bytes).await?;
            client.flush().await
        };
        write
            .await
            .map_err(|_| Refusal::after_reply(End::ClientError, "client write failed"))?;
        record.bytes_down += bytes.len() as u64;
    }
    let rest = match answer {
        ServerHello::Seen(Flight::HelloRetry) => {
            let (second, bytes) = sni::peek_second_client_hello(client, held).await;
            if let sni::Hello::Name(name) = &second
                && *name != first
            {
                record.sni = Some(name.to_string());
            }
            check_second_sni(&first, &second, &check)?;
            bytes
        }
        // No second hello can follow; the relay carries the rest.
        ServerHello::Seen(Flight::NoRetry) | ServerHello::Closed => held,
        ServerHello::TooLarge => {
            let max = hello_retry::MAX_SERVER_HELLO_BYTES / 1024;
            return Err(Refusal::after_reply(
                End::UpstreamError,
                format!("upstream's first TLS handshake message is over {max} KiB"),
            ));
        }
        ServerHello::Silent => {
            return Err(Refusal::after_reply(
                End::UpstreamTimeout,
                "upstream sent no ServerHello in time",
            ));
        }
    };
    send_up(upstream, &rest, &mut record.bytes_up).await
}

/// Writes bytes read before the relay to the upstream, counting them (flushed: TLS to a parent
/// may hold the last record back otherwise; a no-op for TCP).
pub async fn send_up(upstream: &mut Upstream, bytes: &[u8], sent: &mut u64) -> Result<(), Refusal> {
    if bytes.is_empty() {
        return Ok(());
    }
    let write = async {
        upstream.write_all(bytes).await?;
        upstream.flush().await
    };
    write
        .await
        .map_err(|_| Refusal::after_reply(End::UpstreamError, "upstream write failed"))?;
    *sent += bytes.len() as u64;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_second_hello_must_name_the_first_ones_server() {
        let first = DnsName::parse("a.example").unwrap();
        let pass = |_: &Hello| Ok(());
        assert_eq!(
            check_second_sni(&first, &Hello::Name(first.clone()), pass),
            Ok(())
        );
        let evil = Hello::Name(DnsName::parse("evil.example").unwrap());
        let refusal = check_second_sni(&first, &evil, pass).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::after_reply(
                End::SniMismatch,
                "second ClientHello after HelloRetryRequest names evil.example, not a.example"
            )
        );
        // Everything else is checked as the first hello was.
        let target = Target::parse_authority("a.example:443").unwrap();
        let check = |hello: &Hello| check_sni(hello, SniMode::Match, &target, |_| false);
        let missing = check_second_sni(&first, &Hello::NoName, check).unwrap_err();
        assert_eq!(
            (missing.end, missing.status, missing.reason.as_ref()),
            (
                End::SniMissing,
                None,
                "after HelloRetryRequest: ClientHello carries no server name"
            )
        );
        let not_tls = check_second_sni(&first, &Hello::NotTls, check).unwrap_err();
        assert_eq!(not_tls.end, End::NotTls);
        let gone = check_second_sni(&first, &Hello::Closed, check).unwrap_err();
        assert_eq!(gone.end, End::ClientClosed);
        assert_eq!(
            check_second_sni(&first, &Hello::Name(first.clone()), check),
            Ok(())
        );
        // Mode "allowed": the same name again still needs the policy's yes.
        let allowed = |hello: &Hello| check_sni(hello, SniMode::Allowed, &target, |_| false);
        let denied = check_second_sni(&first, &Hello::Name(first.clone()), allowed).unwrap_err();
        assert_eq!(denied.end, End::SniMismatch);
    }
}
