//! Listening sockets the service manager handed over (systemd socket activation: `LISTEN_FDS`,
//! `LISTEN_FDNAMES`, `LISTEN_PID`), by name. With a `.socket` unit the kernel keeps accepting
//! clients into the socket's queue while the gateway restarts, so none is refused.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};

/// The names the gateway takes sockets under (`FileDescriptorName=` in the `.socket` unit).
pub const NAMES: [&str; 3] = ["proxy", "tls-proxy", "admin"];

/// Sockets passed by the service manager, by name, not yet taken.
#[derive(Debug, Default)]
pub struct Inherited {
    by_name: BTreeMap<String, Vec<TcpListener>>,
}

impl Inherited {
    /// The sockets the environment passes to this process; `None` without socket activation.
    /// A passed descriptor that is not a listening TCP socket, or a name the gateway does not
    /// take, is an error that says which.
    pub fn from_env() -> Result<Option<Self>, String> {
        let Some(count) = std::env::var_os("LISTEN_FDS") else {
            return Ok(None);
        };
        let count: usize = count
            .to_str()
            .and_then(|c| c.parse().ok())
            .ok_or("socket activation: LISTEN_FDS is not a number")?;
        let names: Vec<String> = match std::env::var("LISTEN_FDNAMES") {
            Ok(names) => names.split(':').map(str::to_owned).collect(),
            Err(_) => vec!["unknown".to_owned(); count],
        };
        if names.len() != count {
            return Err(format!(
                "socket activation: LISTEN_FDNAMES names {} sockets, LISTEN_FDS says {count}",
                names.len()
            ));
        }
        let mut passed = take_listeners(count)?;
        let mut by_name: BTreeMap<String, Vec<TcpListener>> = BTreeMap::new();
        for (i, name) in names.into_iter().enumerate() {
            let listener = passed[i].take().ok_or_else(|| {
                format!(
                    "socket activation: descriptor {} ({name:?}) is not a listening TCP socket",
                    3 + i
                )
            })?;
            if !NAMES.contains(&name.as_str()) {
                let at = local(&listener);
                return Err(format!(
                    "socket activation: a socket named {name:?} ({at}) was passed; the gateway takes \"proxy\", \"tls-proxy\" and \"admin\" (FileDescriptorName= in the .socket unit)"
                ));
            }
            by_name.entry(name).or_default().push(listener);
        }
        Ok(Some(Self { by_name }))
    }

    /// Takes the sockets named `name` for the configured `addresses` (the config key `key`
    /// says where they come from): `Ok(None)` when none has that name (the caller binds them
    /// itself); an error when some have it but one of `addresses` is missing or one of them
    /// listens where the config does not say.
    pub fn take(
        &mut self,
        name: &str,
        key: &str,
        addresses: &[SocketAddr],
    ) -> Result<Option<Vec<TcpListener>>, String> {
        let Some(mut passed) = self.by_name.remove(name) else {
            return Ok(None);
        };
        let mut taken = Vec::with_capacity(addresses.len());
        for address in addresses {
            // Port 0 ("any port") takes a socket on that address whatever its port: a binary
            // upgrade hands over what the old process bound.
            let matches = |l: &TcpListener| {
                l.local_addr().is_ok_and(|at| {
                    at == *address || (address.port() == 0 && at.ip() == address.ip())
                })
            };
            let exact = passed
                .iter()
                .position(|l| l.local_addr().ok() == Some(*address));
            let Some(i) = exact.or_else(|| passed.iter().position(matches)) else {
                let there: Vec<String> = passed.iter().map(local).collect();
                return Err(format!(
                    "socket activation: `{key}` lists {address}, but no socket named {name:?} listens there (passed: {})",
                    if there.is_empty() {
                        "none left".to_owned()
                    } else {
                        there.join(", ")
                    }
                ));
            };
            taken.push(passed.swap_remove(i));
        }
        if let Some(extra) = passed.first() {
            return Err(format!(
                "socket activation: a socket named {name:?} listens on {}, which `{key}` does not list",
                local(extra)
            ));
        }
        Ok(Some(taken))
    }
}

fn local(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|_| "an unknown address".to_owned(), |a| a.to_string())
}

/// The passed descriptors 3.. as TCP listeners (`None` where one is something else).
#[cfg(unix)]
fn take_listeners(count: usize) -> Result<Vec<Option<TcpListener>>, String> {
    let mut passed = listenfd::ListenFd::from_env();
    if passed.len() != count {
        return Err(format!(
            "socket activation: LISTEN_FDS says {count} sockets, but they are not this process's (LISTEN_PID)"
        ));
    }
    Ok((0..count)
        .map(|i| passed.take_tcp_listener(i).ok().flatten())
        .collect())
}

#[cfg(not(unix))]
fn take_listeners(_count: usize) -> Result<Vec<Option<TcpListener>>, String> {
    Err("socket activation is for systemd (Linux)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inherited(sockets: Vec<(&str, TcpListener)>) -> Inherited {
        let mut by_name: BTreeMap<String, Vec<TcpListener>> = BTreeMap::new();
        for (name, l) in sockets {
            by_name.entry(name.to_owned()).or_default().push(l);
        }
        Inherited { by_name }
    }

    #[test]
    fn sockets_are_taken_by_name_and_address_and_every_mismatch_is_named() {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let (a_at, b_at) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let mut passed = inherited(vec![("proxy", a), ("proxy", b)]);
        assert!(
            passed
                .take("admin", "listen.admin", &[a_at])
                .unwrap()
                .is_none()
        );
        let taken = passed
            .take("proxy", "listen.proxy", &[b_at, a_at])
            .unwrap()
            .unwrap();
        let at: Vec<_> = taken.iter().map(|l| l.local_addr().unwrap()).collect();
        assert_eq!(at, [b_at, a_at]);

        let c = TcpListener::bind("127.0.0.1:0").unwrap();
        let c_at = c.local_addr().unwrap();
        let missing = inherited(vec![("proxy", c)])
            .take("proxy", "listen.proxy", &[c_at, a_at])
            .unwrap_err();
        assert!(
            missing.contains(&format!("`listen.proxy` lists {a_at}")),
            "{missing}"
        );

        let d = TcpListener::bind("127.0.0.1:0").unwrap();
        let d_at = d.local_addr().unwrap();
        let extra = inherited(vec![("proxy", d)])
            .take("proxy", "listen.proxy", &[])
            .unwrap_err();
        assert!(
            extra.contains(&format!(
                "listens on {d_at}, which `listen.proxy` does not list"
            )),
            "{extra}"
        );
    }
}
