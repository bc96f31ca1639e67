//! Built-in allow-lists: the endpoints Azure File Sync needs, per cloud, as versioned data.
//! Each entry cites the public document it came from; update `VERSION` when an entry changes so
//! `check-config` output and logs show which list a gateway is running.

/// Date of the last review of these lists against the cited documents.
pub const VERSION: &str = "2026-11-23";

/// Microsoft's page listing the endpoints Azure File Sync reaches, for every cloud.
const FIREWALL_DOC: &str =
    "https://learn.microsoft.com/azure/storage/file-sync/file-sync-firewall-and-proxy#firewall";
/// Microsoft's page listing the certificate revocation endpoints (Azure Certificate Authority details).
const PKI_DOC: &str = "https://learn.microsoft.com/azure/security/fundamentals/azure-ca-details#certificate-downloads-and-revocation-lists";

/// One allow-list entry: hosts in one category on the listed ports.
#[derive(Debug)]
pub struct Entry {
    pub category: &'static str,
    pub hosts: &'static [&'static str],
    pub ports: &'static [u16],
    /// The public document this entry came from.
    pub source: &'static str,
}

/// A named built-in allow-list.
#[derive(Debug)]
pub struct Profile {
    pub name: &'static str,
    pub description: &'static str,
    pub entries: &'static [Entry],
}

const HTTPS: &[u16] = &[443];
/// Revocation lists and OCSP are plain HTTP; the plain-HTTP lane serves them.
const HTTP: &[u16] = &[80];

const REVOCATION: Entry = Entry {
    category: "revocation",
    hosts: &[
        "crl.microsoft.com",
        "mscrl.microsoft.com",
        "ocsp.msocsp.com",
        "ocsp.digicert.com",
        "crl3.digicert.com",
    ],
    ports: HTTP,
    source: PKI_DOC,
};

pub const PROFILES: &[Profile] = &[
    Profile {
        name: "azure-file-sync",
        description: "Azure File Sync, public cloud",
        entries: &[
            Entry {
                category: "management",
                hosts: &["management.azure.com"],
                ports: HTTPS,
                source: FIREWALL_DOC,
            },
            Entry {
                category: "login",
                hosts: &[
                    "login.windows.net",
                    "login.microsoftonline.com",
                    "aadcdn.msftauth.net",
                    "secure.aadcdn.microsoftonline-p.com",
                ],
                ports: HTTPS,
                source: FIREWALL_DOC,
            },
            Entry {
                category: "graph",
                hosts: &["graph.microsoft.com", "graph.windows.net"],
                ports: HTTPS,
                source: FIREWALL_DOC,
            },
            Entry {
                category: "storage",
                hosts: &["*.core.windows.net"],
                ports: HTTPS,
                source: FIREWALL_DOC,
            },
            Entry {
                category: "sync",
                hosts: &["*.afs.azure.net", "*.one.microsoft.com"],
                ports: HTTPS,
                source: FIREWALL_DOC,
            },
            REVOCATION,
        ],
    },
    Profile {
        name: "azure-file-sync-usgov",
        description: "Azure File Sync, Azure Government (US)",
        entries: &[
            Entry {
                category: "management",
                hosts: &["management.usgovcloudapi.net"],
                ports: HTTPS,
                source: FIREWALL_DOC,
            },
            Entry {
                category: "login",
                hosts: &[
                    "login.microsoftonline.us",
                    "secure.aadcdn.microsoftonline-p.com",
                ],
                ports: HTTPS,
                source: FIREWALL_DOC,
            },
            Entry {
                category: "graph",
                hosts: &["graph.windows.net", "graph.microsoft.us"],
                ports: HTTPS,
                source: FIREWALL_DOC,
            },
            Entry {
                category: "storage",
                hosts: &["*.core.usgovcloudapi.net"],
                ports: HTTPS,
                source: FIREWALL_DOC,
            },
            Entry {
                category: "sync",
                hosts: &["*.afs.azure.us"],
                ports: HTTPS,
                source: FIREWALL_DOC,
            },
            REVOCATION,
        ],
    },
    Profile {
        name: "azure-file-sync-china",
        description: "Azure File Sync, Microsoft Azure operated by 21Vianet (China)",
        entries: &[
            Entry {
                category: "management",
                hosts: &["management.chinacloudapi.cn"],
                ports: HTTPS,
                source: FIREWALL_DOC,
            },
            Entry {
                category: "login",
                hosts: &["login.chinacloudapi.cn"],
                ports: HTTPS,
                source: FIREWALL_DOC,
            },
            Entry {
                category: "storage",
                hosts: &["*.core.chinacloudapi.cn"],
                ports: HTTPS,
                source: FIREWALL_DOC,
            },
            Entry {
                category: "sync",
                hosts: &["*.afs.azure.cn"],
                ports: HTTPS,
                source: FIREWALL_DOC,
            },
            REVOCATION,
        ],
    },
];

/// The profile called `name`, if built in.
pub fn find(name: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|p| p.name == name)
}

/// Names of all built-in profiles, for error messages.
pub fn names() -> Vec<&'static str> {
    PROFILES.iter().map(|p| p.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::host::HostPattern;

    #[test]
    fn every_builtin_host_is_a_valid_pattern_with_a_source() {
        for profile in PROFILES {
            for entry in profile.entries {
                assert!(
                    entry.source.starts_with("https://"),
                    "{}: {}",
                    profile.name,
                    entry.category
                );
                assert!(!entry.ports.is_empty());
                for host in entry.hosts {
                    HostPattern::parse(host)
                        .unwrap_or_else(|e| panic!("{}: {host}: {e}", profile.name));
                }
            }
        }
    }
}
