//! CONNECT targets as the gateway accepts them: a validated DNS name or an IP literal, plus a port.
//! Names are normalised once here (lowercase, no trailing dot) so every later comparison is a
//! plain string comparison.

use std::fmt;
use std::net::IpAddr;

/// Longest name DNS can carry in presentation form, without the trailing dot.
const MAX_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// A DNS name made only of letters, digits and hyphens (punycode `xn--` labels included),
/// lowercase, without a trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsName(Box<str>);

impl DnsName {
    /// Validates and normalises `input`: case-folds, drops one trailing dot.
    pub fn parse(input: &str) -> Result<Self, &'static str> {
        let name = input.strip_suffix('.').unwrap_or(input);
        if name.is_empty() {
            return Err("empty host name");
        }
        if name.len() > MAX_NAME_LEN {
            return Err("host name longer than 253 characters");
        }
        for label in name.split('.') {
            if label.is_empty() {
                return Err("empty label in host name");
            }
            if label.len() > MAX_LABEL_LEN {
                return Err("label longer than 63 characters in host name");
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err("host name may hold only letters, digits, hyphens and dots");
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err("label starts or ends with a hyphen in host name");
            }
        }
        // A name whose last label is all digits would read as an IPv4 address to many resolvers
        // and libraries ("127.1", "0x7f.1" is already refused above); refuse it outright.
        if name
            .rsplit('.')
            .next()
            .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err("host name ends in a numeric label (not a DNS name, not an IP address)");
        }
        Ok(Self(name.to_ascii_lowercase().into_boxed_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The host part of a CONNECT target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Name(DnsName),
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => name.fmt(f),
            Host::Ip(ip) => ip.fmt(f),
        }
    }
}

/// A CONNECT target: `host:port`, `[v6]:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: Host,
    pub port: u16,
}

impl Target {
    /// Parses the authority form of a CONNECT request target (RFC 9110 §9.3.6). Userinfo, paths,
    /// a missing or zero port and anything that is not a DNS name or IP literal are refused.
    pub fn parse_authority(input: &str) -> Result<Self, &'static str> {
        if input.is_empty() {
            return Err("empty request target");
        }
        if input.contains(['@', '/', '?', '#']) {
            return Err("request target must be host:port (no userinfo, path or query)");
        }
        let (host, port) = if let Some(rest) = input.strip_prefix('[') {
            let (v6, after) = rest
                .split_once(']')
                .ok_or("unclosed '[' in request target")?;
            let port = after
                .strip_prefix(':')
                .ok_or("request target has no port")?;
            let ip: std::net::Ipv6Addr = v6
                .parse()
                .map_err(|_| "bad IPv6 literal in request target")?;
            (Host::Ip(IpAddr::V6(ip)), port)
        } else {
            let (host, port) = input.rsplit_once(':').ok_or("request target has no port")?;
            if host.contains(':') {
                return Err("IPv6 literal must be in brackets");
            }
            if host.is_empty() {
                return Err("request target has no host");
            }
            let host = match host.parse::<std::net::Ipv4Addr>() {
                Ok(ip) => Host::Ip(IpAddr::V4(ip)),
                Err(_) => Host::Name(DnsName::parse(host)?),
            };
            (host, port)
        };
        Ok(Self {
            host,
            port: parse_port(port)?,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            host => write!(f, "{host}:{}", self.port),
        }
    }
}

fn parse_port(text: &str) -> Result<u16, &'static str> {
    if text.is_empty() {
        return Err("request target has no port");
    }
    if text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("port must be a number from 1 to 65535");
    }
    match text.parse::<u32>() {
        Ok(port @ 1..=65535) => Ok(port as u16),
        _ => Err("port must be a number from 1 to 65535"),
    }
}

/// An allow-list host pattern: an exact name, or `*.suffix` for one or more labels under the
/// suffix (never the bare suffix, never `xsuffix`, never `suffix.evil`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    Exact(DnsName),
    /// Holds ".suffix", dot included, so `ends_with` lands on a label boundary.
    Under(Box<str>),
}

impl HostPattern {
    pub fn parse(input: &str) -> Result<Self, &'static str> {
        match input.strip_prefix("*.") {
            Some(suffix) => {
                if suffix.contains('*') {
                    return Err(
                        "'*' may only be the whole leftmost label, as in \"*.example.com\"",
                    );
                }
                let suffix = DnsName::parse(suffix)?;
                Ok(Self::Under(format!(".{suffix}").into_boxed_str()))
            }
            None if input.contains('*') => {
                Err("'*' may only be the whole leftmost label, as in \"*.example.com\"")
            }
            None => Ok(Self::Exact(DnsName::parse(input)?)),
        }
    }

    pub fn matches(&self, name: &DnsName) -> bool {
        match self {
            Self::Exact(exact) => exact == name,
            // A valid name never starts with '.', so a longer name ending in ".suffix" has at
            // least one whole label before the suffix.
            Self::Under(dot_suffix) => {
                name.as_str().len() > dot_suffix.len() && name.as_str().ends_with(&**dot_suffix)
            }
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(name) => name.fmt(f),
            Self::Under(dot_suffix) => write!(f, "*{dot_suffix}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_matching_table() {
        let table: &[(&str, &str, bool)] = &[
            ("*.core.windows.net", "share1.file.core.windows.net", true),
            ("*.core.windows.net", "a.core.windows.net", true),
            ("*.core.windows.net", "A.Core.Windows.NET", true),
            ("*.core.windows.net", "a.core.windows.net.", true),
            ("*.core.windows.net", "core.windows.net", false),
            ("*.core.windows.net", "xcore.windows.net", false),
            ("*.core.windows.net", "a.xcore.windows.net", false),
            ("*.core.windows.net", "a.core.windows.net.evil", false),
            ("*.core.windows.net", "core.windows.net.evil.com", false),
            ("management.azure.com", "management.azure.com", true),
            ("management.azure.com", "MANAGEMENT.azure.com.", true),
            ("management.azure.com", "x.management.azure.com", false),
            ("management.azure.com", "management.azure.co", false),
            ("management.azure.com", "management.azure.com.evil", false),
            ("*.afs.azure.net", "xn--bcher-kva.afs.azure.net", true),
        ];
        for (pattern, host, want) in table {
            let pattern = HostPattern::parse(pattern).unwrap();
            let name = DnsName::parse(host).unwrap();
            assert_eq!(pattern.matches(&name), *want, "{pattern} vs {host}");
        }
    }

    #[test]
    fn dns_name_validation_table() {
        let good: &[(&str, &str)] = &[
            ("Example.COM", "example.com"),
            ("example.com.", "example.com"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("a-b.c1", "a-b.c1"),
            ("localhost", "localhost"),
        ];
        for (input, want) in good {
            assert_eq!(DnsName::parse(input).unwrap().as_str(), *want, "{input}");
        }
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = format!("{}com", "abcdefghi.".repeat(26));
        let bad: &[&str] = &[
            "",
            ".",
            "example.com..",
            "a..b",
            ".example.com",
            "under_score.com",
            "-lead.com",
            "trail-.com",
            "sp ace.com",
            "ex\u{e4}mple.com",
            "127.1",
            "1.2.3.999",
            "*.example.com",
            &long_label,
            &long_name,
        ];
        for input in bad {
            assert!(
                DnsName::parse(input).is_err(),
                "{input:?} should be refused"
            );
        }
    }

    #[test]
    fn authority_parsing_table() {
        let ok: &[(&str, &str)] = &[
            ("example.com:443", "example.com:443"),
            ("EXAMPLE.com.:443", "example.com:443"),
            ("10.0.0.1:443", "10.0.0.1:443"),
            ("[::1]:8443", "[::1]:8443"),
            ("a.b:1", "a.b:1"),
            ("a.b:65535", "a.b:65535"),
        ];
        for (input, want) in ok {
            assert_eq!(
                Target::parse_authority(input).unwrap().to_string(),
                *want,
                "{input}"
            );
        }
        let bad: &[&str] = &[
            "",
            "example.com",
            "example.com:",
            "example.com:0",
            "example.com:65536",
            "example.com:99999999999",
            "example.com:+443",
            "example.com:44a",
            ":443",
            "user@example.com:443",
            "example.com:443/path",
            "::1:443",
            "[::1]",
            "[::1:443",
            "[nothex]:443",
            "bad_name.com:443",
            "http://example.com:443",
        ];
        for input in bad {
            assert!(
                Target::parse_authority(input).is_err(),
                "{input:?} should be refused"
            );
        }
    }

    #[test]
    fn pattern_syntax_table() {
        for bad in [
            "*",
            "*.",
            "a.*.com",
            "*example.com",
            "**.example.com",
            "*.*.example.com",
        ] {
            assert!(
                HostPattern::parse(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
        assert_eq!(
            HostPattern::parse("*.Example.com").unwrap().to_string(),
            "*.example.com"
        );
    }
}
