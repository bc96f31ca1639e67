//! `[listen]` and `[tls]`: where the gateway listens (plain, TLS, admin), who may connect at
//! all, which load balancers send PROXY protocol headers, and the TLS listener's files.

use super::paths::Paths;
use super::problems::Problems;
use super::raw::{RawListen, RawTls};
use super::values::{cidrs, duration, parse_or};
use super::{
    ClientCertificates, DEFAULT_ADMIN_LISTEN, DEFAULT_CLIENTS, DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_PROXY_LISTEN, Listen, TlsListen, TlsSettings,
};
use toml::Spanned;

/// `[listen]`: the proxy, TLS and admin listeners, who may connect, trusted balancers.
pub(super) fn compile(p: &mut Problems<'_>, raw: &RawListen, tls: Option<&TlsSettings>) -> Listen {
    Listen {
        proxy: match &raw.proxy {
            None => vec![DEFAULT_PROXY_LISTEN.parse().expect("valid default")],
            Some(list) => {
                if list.is_empty() {
                    p.add(
                        0..0,
                        "listen.proxy",
                        "expected at least one address such as \"0.0.0.0:3128\"",
                    );
                }
                list.iter()
                    .enumerate()
                    .filter_map(|(i, a)| {
                        parse_or(
                            p,
                            a,
                            &format!("listen.proxy[{i}]"),
                            "expected IP:PORT such as \"0.0.0.0:3128\" or \"[::]:3128\"",
                        )
                    })
                    .collect()
            }
        },
        admin: match &raw.admin {
            None => Some(DEFAULT_ADMIN_LISTEN.parse().expect("valid default")),
            Some(v) if v.get_ref() == "off" => None,
            Some(v) => parse_or(
                p,
                v,
                "listen.admin",
                "expected IP:PORT such as \"127.0.0.1:9464\", or \"off\"",
            ),
        },
        tls_proxy: raw
            .tls_proxy
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                let key = format!("listen.tls_proxy[{i}]");
                let listen = l.get_ref();
                let address = parse_or(
                    p,
                    &listen.address,
                    &format!("{key}.address"),
                    "expected IP:PORT such as \"0.0.0.0:3129\"",
                )?;
                let has_ca = tls.is_some_and(|t| t.client_ca.is_some());
                let mode = listen.client_certificates.unwrap_or(if has_ca {
                    ClientCertificates::Required
                } else {
                    ClientCertificates::Off
                });
                if tls.is_none() {
                    p.add(
                        l.span(),
                        key.clone(),
                        "a TLS listener needs a [tls] section with `certificate` and `key`",
                    );
                } else if mode != ClientCertificates::Off && !has_ca {
                    p.add(
                        l.span(),
                        format!("{key}.client_certificates"),
                        "asking for client certificates needs `tls.client_ca`",
                    );
                }
                Some(TlsListen {
                    address,
                    client_certificates: mode,
                })
            })
            .collect(),
        proxy_protocol_from: cidrs(p, &raw.proxy_protocol_from, "listen.proxy_protocol_from"),
        clients: match &raw.clients {
            None => DEFAULT_CLIENTS
                .iter()
                .map(|c| c.parse().expect("valid default"))
                .collect(),
            Some(list) => cidrs(p, list, "listen.clients"),
        },
    }
}

pub(super) fn compile_tls(
    p: &mut Problems<'_>,
    raw: &Spanned<RawTls>,
    paths: &Paths<'_>,
) -> TlsSettings {
    let t = raw.get_ref();
    let mut required = |value: &Option<Spanned<String>>, key: &str| match value {
        Some(v) => paths.resolve(p, v, &format!("tls.{key}")),
        None => {
            p.add(
                raw.span(),
                format!("tls.{key}"),
                format!("expected `{key}` = path of a PEM file"),
            );
            std::path::PathBuf::new()
        }
    };
    let certificate = required(&t.certificate, "certificate");
    let key = required(&t.key, "key");
    TlsSettings {
        certificate,
        key,
        client_ca: t
            .client_ca
            .as_ref()
            .map(|v| paths.resolve(p, v, "tls.client_ca")),
        handshake_timeout: duration(
            p,
            t.handshake_timeout.as_ref(),
            "tls.handshake_timeout",
            DEFAULT_HANDSHAKE_TIMEOUT,
        ),
    }
}
