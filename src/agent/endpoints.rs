//! What `check` tests: the endpoints of a built-in profile (the gateway's own lists, so the agent
//! checks exactly what the gateway allows) or the hosts given on the command line. A wildcard
//! entry cannot be dialled; it becomes a representative host built from the storage account or
//! region, or a skipped row that says what to give.

use crate::policy::host::DnsName;
use crate::policy::profiles::Profile;
use serde::Serialize;

/// One host and port to check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub category: String,
    /// Set when the endpoint cannot be checked as listed: why, and what to give instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip: Option<String>,
}

/// Names that stand in for wildcard entries.
#[derive(Clone, Debug, Default)]
pub struct Representatives {
    /// An Azure storage account: `*.core.windows.net` becomes `NAME.file.core.windows.net`.
    pub storage_account: Option<String>,
    /// An Azure region: `*.afs.azure.net` becomes `NAME01.afs.azure.net`, the region's Azure
    /// File Sync service endpoint.
    pub region: Option<String>,
}

/// Every endpoint of `profile`, wildcards replaced by representatives or skipped.
pub fn from_profile(profile: &Profile, reps: &Representatives) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for entry in profile.entries {
        for pattern in entry.hosts {
            for &port in entry.ports {
                let (host, skip) = match pattern.strip_prefix("*.") {
                    None => (pattern.to_string(), None),
                    Some(suffix) => representative(pattern, suffix, reps),
                };
                out.push(Endpoint {
                    host,
                    port,
                    category: entry.category.to_owned(),
                    skip,
                });
            }
        }
    }
    out
}

fn representative(pattern: &str, suffix: &str, reps: &Representatives) -> (String, Option<String>) {
    if suffix.starts_with("core.") {
        return match &reps.storage_account {
            Some(account) => (format!("{account}.file.{suffix}"), None),
            None => (
                pattern.to_owned(),
                Some(
                    "wildcard: give --storage-account NAME to check NAME.file.".to_owned() + suffix,
                ),
            ),
        };
    }
    if suffix.starts_with("afs.") {
        return match &reps.region {
            Some(region) => (format!("{region}01.{suffix}"), None),
            None => (
                pattern.to_owned(),
                Some("wildcard: give --region NAME to check the region's sync endpoint".to_owned()),
            ),
        };
    }
    (
        pattern.to_owned(),
        Some("wildcard with region-specific names: give one with --host".to_owned()),
    )
}

/// `NAME[:PORT]` (port 443 when omitted), for `--host`.
pub fn parse_host(arg: &str) -> Result<(String, u16), String> {
    let (name, port) = match arg.rsplit_once(':') {
        Some((name, port)) => {
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{port:?}: expected a port from 1 to 65535"))?;
            (name, port)
        }
        None => (arg, 443),
    };
    if name.starts_with("*.") {
        return Err(format!("{name:?}: give a real host name, not a wildcard"));
    }
    let name = DnsName::parse(name).map_err(|why| format!("{name:?}: {why}"))?;
    Ok((name.as_str().to_owned(), port))
}

/// A storage account or region name: lowercase letters and digits (Azure's own rule).
pub fn parse_label(arg: &str) -> Result<String, String> {
    if !arg.is_empty()
        && arg.len() <= 63
        && arg
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        Ok(arg.to_owned())
    } else {
        Err(format!(
            "{arg:?}: expected lowercase letters and digits, such as \"contoso\" or \"westeurope\""
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_become_representatives_or_skipped_rows() {
        let profile = crate::policy::profiles::find("azure-file-sync").unwrap();
        let none = from_profile(profile, &Representatives::default());
        let storage = none.iter().find(|e| e.category == "storage").unwrap();
        assert_eq!(storage.host, "*.core.windows.net");
        assert!(
            storage
                .skip
                .as_deref()
                .unwrap()
                .contains("--storage-account")
        );
        assert!(
            none.iter()
                .any(|e| e.host == "management.azure.com" && e.port == 443)
        );
        assert!(
            none.iter()
                .any(|e| e.host == "crl.microsoft.com" && e.port == 80)
        );

        let reps = Representatives {
            storage_account: Some("contoso".into()),
            region: Some("westeurope".into()),
        };
        let all = from_profile(profile, &reps);
        assert!(
            all.iter()
                .any(|e| e.host == "contoso.file.core.windows.net" && e.skip.is_none())
        );
        assert!(
            all.iter()
                .any(|e| e.host == "westeurope01.afs.azure.net" && e.skip.is_none())
        );
        let kailani = all
            .iter()
            .find(|e| e.host == "*.one.microsoft.com")
            .unwrap();
        assert!(kailani.skip.as_deref().unwrap().contains("--host"));
        assert_eq!(all.len(), none.len());
    }

    #[test]
    fn host_arguments() {
        assert_eq!(
            parse_host("Example.COM").unwrap(),
            ("example.com".into(), 443)
        );
        assert_eq!(
            parse_host("a.example:8443").unwrap(),
            ("a.example".into(), 8443)
        );
        for bad in [
            "",
            "a.example:0",
            "a.example:x",
            "*.example.com",
            "bad host",
        ] {
            assert!(parse_host(bad).is_err(), "{bad}");
        }
        assert!(parse_label("contoso1").is_ok());
        assert!(parse_label("Contoso").is_err());
        assert!(parse_label("a.b").is_err());
    }
}
