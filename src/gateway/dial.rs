//! The dial: connect to exactly the addresses that were vetted, racing them as RFC 8305 (Happy
//! Eyeballs v2) says, all within one connect timeout. Families are interleaved, starting with
//! the first address's (the resolver puts IPv4 first); an attempt runs alone for
//! `timeouts.attempt_delay`, then the next address starts beside it (at once when an attempt
//! fails); the first connection wins and the others are dropped. A dead address (a front end
//! that drops SYNs, a broken IPv6 path) so costs one attempt delay, not the whole timeout.
//! Nothing here resolves: there is no second lookup to race.

use super::egress;
use super::refusal::{End, Refusal};
use crate::config::Egress;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Connects to one of the vetted addresses within `timeout`, from `egress`'s source address for
/// each family when it binds one; `tried` is the address connected to, or the last one tried.
pub async fn dial(
    mut addrs: impl Iterator<Item = IpAddr>,
    port: u16,
    timeout: Duration,
    attempt_delay: Duration,
    egress: Option<&Egress>,
    tried: &mut Option<SocketAddr>,
) -> Result<TcpStream, Refusal> {
    let deadline = Instant::now() + timeout;
    let first = addrs.next().map(|ip| SocketAddr::new(ip, port));
    let stream = match (first, addrs.next()) {
        (None, _) => return Err(failed(None)),
        // One address, nothing to race: no attempt set, no second timer, no allocation.
        (Some(only), None) => {
            *tried = Some(only);
            let connecting = egress::connect(only, egress::source(egress, only.ip()));
            match tokio::time::timeout_at(deadline, connecting).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Err(failed(Some(e))),
                Err(_) => return Err(timed_out()),
            }
        }
        (Some(first), Some(second)) => {
            let all = [first.ip(), second].into_iter().chain(addrs);
            let order: Vec<SocketAddr> = interleave(all)
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect();
            // Boxed: the race's state (attempts, timers) would otherwise take its space in
            // every tunnel's future, single-address ones included.
            let connect =
                |addr: SocketAddr| egress::connect(addr, egress::source(egress, addr.ip()));
            let racing = race(&order, deadline, attempt_delay, connect, tried);
            Box::pin(racing).await?
        }
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

fn timed_out() -> Refusal {
    Refusal::new(End::ConnectTimeout, "upstream connect timed out")
}

/// RFC 8305 section 4: the addresses with their families alternating, starting with the
/// family of the first one; within a family the resolver's order stays.
pub fn interleave(addrs: impl Iterator<Item = IpAddr>) -> Vec<IpAddr> {
    let addrs: Vec<IpAddr> = addrs.collect();
    let Some(first_v4) = addrs.first().map(IpAddr::is_ipv4) else {
        return addrs;
    };
    // The n-th address of the first family goes to place 2n, the other family's to 2n + 1; a
    // stable sort by place keeps each family's order.
    let (mut leading, mut other) = (0, 0);
    let mut places: Vec<(usize, IpAddr)> = addrs
        .into_iter()
        .map(|ip| {
            let count = if ip.is_ipv4() == first_v4 {
                &mut leading
            } else {
                &mut other
            };
            *count += 1;
            let place = 2 * (*count - 1) + usize::from(ip.is_ipv4() != first_v4);
            (place, ip)
        })
        .collect();
    places.sort_by_key(|&(place, _)| place);
    places.into_iter().map(|(_, ip)| ip).collect()
}

/// The race over `order` (already interleaved), with `connect` making one attempt: generic so
/// its timing is tested on tokio's paused clock without sockets.
async fn race<S, C, F>(
    order: &[SocketAddr],
    deadline: Instant,
    attempt_delay: Duration,
    connect: C,
    tried: &mut Option<SocketAddr>,
) -> Result<S, Refusal>
where
    C: Fn(SocketAddr) -> F,
    F: Future<Output = io::Result<S>>,
{
    let mut waiting = order.iter().copied();
    let Some(first) = waiting.next() else {
        return Err(failed(None));
    };
    *tried = Some(first);
    let attempt = |addr: SocketAddr| {
        let connecting = connect(addr);
        async move { (addr, connecting.await) }
    };
    let mut running = FuturesUnordered::new();
    running.push(attempt(first));
    let mut next_start = Instant::now() + attempt_delay;
    // An egress source address that left the host, seen in any attempt: said in the end
    // whatever the other attempts met (never blamed on the upstream or a parent).
    let mut gone: Option<io::Error> = None;
    loop {
        let more = waiting.len() > 0;
        tokio::select! {
            biased;
            Some((addr, result)) = running.next(), if !running.is_empty() => match result {
                Ok(stream) => {
                    *tried = Some(addr);
                    return Ok(stream);
                }
                Err(e) => {
                    let last = match egress::source_gone(&e) {
                        Some(_) => {
                            gone.get_or_insert(e);
                            None
                        }
                        None => Some(e),
                    };
                    if !more && running.is_empty() {
                        return Err(failed(gone.take().or(last)));
                    }
                    // A failed attempt hands over at once.
                    next_start = Instant::now();
                }
            },
            () = tokio::time::sleep_until(next_start), if more => {
                if let Some(addr) = waiting.next() {
                    *tried = Some(addr);
                    running.push(attempt(addr));
                }
                next_start = Instant::now() + attempt_delay;
            }
            () = tokio::time::sleep_until(deadline) => {
                return Err(gone.map_or_else(timed_out, |e| failed(Some(e))));
            }
        }
    }
}

/// The refusal when every attempt failed, from the last error.
fn failed(last_error: Option<io::Error>) -> Refusal {
    // An egress's source address that left the host: never leave from another one.
    if let Some(gone) = last_error.as_ref().and_then(egress::source_gone) {
        return Refusal::new(
            End::EgressUnavailable,
            format!("egress source address {gone} is not on this host"),
        );
    }
    let reason = match last_error {
        Some(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            "upstream refused the connection".into()
        }
        Some(e) => format!("upstream connect failed: {}", e.kind()),
        None => "no address to connect to".to_owned(),
    };
    Refusal::new(End::ConnectFailed, reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn families_alternate_from_the_first_address() {
        let table: &[(&[&str], &[&str])] = &[
            (&[], &[]),
            (&["1.1.1.1"], &["1.1.1.1"]),
            (
                &["1.1.1.1", "1.1.1.2", "::1", "::2", "::3"],
                &["1.1.1.1", "::1", "1.1.1.2", "::2", "::3"],
            ),
            (&["::1", "::2", "1.1.1.1"], &["::1", "1.1.1.1", "::2"]),
            (&["1.1.1.1", "1.1.1.2"], &["1.1.1.1", "1.1.1.2"]),
        ];
        for (input, want) in table {
            let got = interleave(input.iter().map(|s| ip(s)));
            let want: Vec<IpAddr> = want.iter().map(|s| ip(s)).collect();
            assert_eq!(got, want, "{input:?}");
        }
    }

    /// Attempts by address: how long each takes and whether it connects.
    fn fake(
        plan: &'static [(u8, u64, bool)],
    ) -> impl Fn(SocketAddr) -> std::pin::Pin<Box<dyn Future<Output = io::Result<u8>>>> {
        move |addr| {
            let last = match addr.ip() {
                IpAddr::V4(v4) => v4.octets()[3],
                IpAddr::V6(_) => 0,
            };
            let (_, millis, ok) = *plan.iter().find(|(a, _, _)| *a == last).unwrap();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(millis)).await;
                if ok {
                    Ok(last)
                } else {
                    Err(io::ErrorKind::ConnectionRefused.into())
                }
            })
        }
    }

    fn addrs(lasts: &[u8]) -> Vec<SocketAddr> {
        lasts
            .iter()
            .map(|l| SocketAddr::from((Ipv4Addr::new(127, 0, 0, *l), 443)))
            .collect()
    }

    const DELAY: Duration = Duration::from_millis(250);

    #[tokio::test(start_paused = true)]
    async fn a_silent_first_address_costs_one_attempt_delay() {
        // .1 never answers within the timeout; .2 connects in 10 ms once started.
        let plan: &'static [(u8, u64, bool)] = &[(1, 60_000, true), (2, 10, true)];
        let started = Instant::now();
        let mut tried = None;
        let deadline = started + Duration::from_secs(10);
        let won = race(&addrs(&[1, 2]), deadline, DELAY, fake(plan), &mut tried).await;
        assert_eq!(won.ok(), Some(2));
        assert_eq!(started.elapsed(), Duration::from_millis(260));
        assert_eq!(tried, Some(addrs(&[2])[0]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_attempt_hands_over_at_once_and_the_first_to_connect_wins() {
        // .1 is refused after 30 ms: .2 starts then, not at 250 ms. .2 is slow (400 ms), so
        // .3 starts 250 ms after .2 and wins at 30 + 250 + 20.
        let plan: &'static [(u8, u64, bool)] = &[(1, 30, false), (2, 400, true), (3, 20, true)];
        let started = Instant::now();
        let mut tried = None;
        let deadline = started + Duration::from_secs(10);
        let won = race(&addrs(&[1, 2, 3]), deadline, DELAY, fake(plan), &mut tried).await;
        assert_eq!(won.ok(), Some(3));
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn every_attempt_shares_one_deadline() {
        let plan: &'static [(u8, u64, bool)] = &[(1, 60_000, true), (2, 60_000, true)];
        let started = Instant::now();
        let mut tried = None;
        let deadline = started + Duration::from_secs(2);
        let refused = race(&addrs(&[1, 2]), deadline, DELAY, fake(plan), &mut tried)
            .await
            .err()
            .unwrap();
        assert_eq!(refused.end, End::ConnectTimeout);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(tried, Some(addrs(&[2])[0]), "the last one started");
    }

    #[tokio::test(start_paused = true)]
    async fn all_refused_is_a_connect_failure_without_waiting_for_the_timer() {
        let plan: &'static [(u8, u64, bool)] = &[(1, 5, false), (2, 5, false)];
        let started = Instant::now();
        let mut tried = None;
        let deadline = started + Duration::from_secs(10);
        let refused = race(&addrs(&[1, 2]), deadline, DELAY, fake(plan), &mut tried)
            .await
            .err()
            .unwrap();
        assert_eq!(refused.end, End::ConnectFailed);
        assert_eq!(refused.reason, "upstream refused the connection");
        assert_eq!(started.elapsed(), Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_address_gone_in_any_attempt_is_what_the_race_says() {
        // .1 cannot bind its source (the address left the host); .2 is refused afterwards:
        // the egress is unavailable, not the upstream.
        let connect = |addr: SocketAddr| {
            let last = match addr.ip() {
                IpAddr::V4(v4) => v4.octets()[3],
                IpAddr::V6(_) => 0,
            };
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(u64::from(last) * 5)).await;
                let e: io::Result<u8> = match last {
                    1 => Err(io::Error::other(egress::SourceGone(ip("192.0.2.10")))),
                    _ => Err(io::ErrorKind::ConnectionRefused.into()),
                };
                e
            })
        };
        let mut tried = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        let refused = race(&addrs(&[1, 2]), deadline, DELAY, connect, &mut tried)
            .await
            .err()
            .unwrap();
        assert_eq!(refused.end, End::EgressUnavailable);
        assert_eq!(
            refused.reason,
            "egress source address 192.0.2.10 is not on this host"
        );
    }
}
