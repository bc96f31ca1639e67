//! Values shared by every section: addresses, CIDR lists, durations and names, parsed with a
//! problem naming the key when they do not parse. [`parse_duration`] is also the agent's.

use super::problems::Problems;
use ipnet::IpNet;
use std::net::IpAddr;
use std::time::Duration;
use toml::Spanned;

/// A positive duration such as "500ms", "10s", "15m", "1h" (config files and command lines).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    text.parse::<jiff::SignedDuration>()
        .ok()
        .filter(|d| d.is_positive())
        .and_then(|d| Duration::try_from(d).ok())
        .ok_or_else(|| {
            format!(
                "{text:?}: expected a positive duration such as \"500ms\", \"10s\", \"15m\" or \"1h\""
            )
        })
}

pub(super) fn is_name(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

pub(super) fn parse_or<T: std::str::FromStr>(
    p: &mut Problems<'_>,
    value: &Spanned<String>,
    key: &str,
    expected: &str,
) -> Option<T> {
    match value.get_ref().parse() {
        Ok(v) => Some(v),
        Err(_) => {
            p.add(
                value.span(),
                key,
                format!("{:?}: {expected}", value.get_ref()),
            );
            None
        }
    }
}

/// CIDRs; a bare address means just that address (/32 or /128).
pub(super) fn cidrs(p: &mut Problems<'_>, list: &[Spanned<String>], key: &str) -> Vec<IpNet> {
    list.iter()
        .enumerate()
        .filter_map(|(i, text)| {
            let t = text.get_ref();
            if let Ok(net) = t.parse::<IpNet>()
                && net.addr() != net.network()
            {
                // "10.20.0.1/8" would silently mean all of 10/8: say what it means instead.
                p.add(
                    text.span(),
                    format!("{key}[{i}]"),
                    format!(
                        "{t:?} has host bits set: write {:?} for the network or \"{}/{}\" for the one address",
                        net.trunc().to_string(),
                        net.addr(),
                        net.max_prefix_len()
                    ),
                );
                return None;
            }
            t.parse::<IpNet>()
                .ok()
                .or_else(|| t.parse::<IpAddr>().ok().map(IpNet::from))
                // Mapped forms (`::ffff:10.0.0.0/104`) are the IPv4 networks they reach.
                .map(crate::policy::canonical_net)
                .or_else(|| {
                    p.add(
                        text.span(),
                        format!("{key}[{i}]"),
                        format!("{t:?}: expected a CIDR such as \"10.20.0.0/16\" or an IP address"),
                    );
                    None
                })
        })
        .collect()
}

pub(super) fn duration(
    p: &mut Problems<'_>,
    value: Option<&Spanned<String>>,
    key: &str,
    default: Duration,
) -> Duration {
    let Some(value) = value else { return default };
    parse_duration(value.get_ref()).unwrap_or_else(|message| {
        p.add(value.span(), key, message);
        default
    })
}
