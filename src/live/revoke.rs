//! Revocation that takes effect: after a reload, an open tunnel whose client the new
//! configuration would no longer admit as its branch (its credential removed or its password
//! changed, its certificate name or source network moved or removed, its branch gone, its
//! address no longer a client) is closed with `identity_revoked`, whatever
//! `policy.on_reload` says. Tunnels whose identity holds are not touched.

use super::{IdentifiedBy, Registry, Tunnel};
use crate::config::{Config, Identity, UNASSIGNED};
use crate::end::End;

impl Registry {
    /// Closes the open tunnels `new` no longer admits as their branch (`old` is the
    /// configuration they were admitted under); returns how many.
    pub fn revoke(&self, old: &Config, new: &Config) -> usize {
        self.all()
            .iter()
            .filter(|t| !still_admitted(t, old, new) && t.live.stop(End::IdentityRevoked))
            .count()
    }
}

/// Whether `new` admits `tunnel`'s client as the same branch, the way it was identified.
pub fn still_admitted(tunnel: &Tunnel, old: &Config, new: &Config) -> bool {
    let ip = tunnel.client.ip();
    if !crate::policy::in_networks(&new.listen.clients, ip) {
        return false;
    }
    let branch_is = |identity: Option<Identity>| {
        identity.is_some_and(|i| new.branch_name(i) == &*tunnel.branch)
    };
    match &tunnel.identified {
        IdentifiedBy::Certificate(name) => branch_is(
            new.certificate_branches
                .get(&**name)
                .map(|&b| Identity::Branch(b)),
        ),
        IdentifiedBy::User(user) => match (credential(old, user), credential(new, user)) {
            (Some((_, was)), Some((branch, now))) => branch == &*tunnel.branch && was.same_as(now),
            _ => false,
        },
        IdentifiedBy::Network => branch_is(
            new.branch_sources
                .longest_match(ip)
                .map(|(_, &b)| Identity::Branch(b)),
        ),
        IdentifiedBy::Unassigned => {
            &*tunnel.branch == UNASSIGNED
                && new.branch_sources.longest_match(ip).is_none()
                && (new.branches.is_empty() || new.policy.allow_unassigned)
        }
    }
}

/// The branch and stored password of `user` in `config`.
fn credential<'c>(
    config: &'c Config,
    user: &str,
) -> Option<(&'c str, &'c crate::config::password::StoredPassword)> {
    config.branches.iter().find_map(|b| {
        b.credentials
            .iter()
            .find(|c| c.user == user)
            .map(|c| (b.name.as_str(), &c.password))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::Tunnel;
    use crate::tunnel::Live;

    fn config(branches: &str) -> Config {
        let text = format!("[resolver]\nhosts_only = true\n{branches}");
        Config::parse(&text, "t", crate::config::TEST_NOW).unwrap()
    }

    fn tunnel(branch: &str, identified: IdentifiedBy) -> Tunnel {
        Tunnel::new(
            crate::live::Opened {
                id: 1,
                branch: branch.into(),
                identified,
                client: "10.1.2.3:5000".parse().unwrap(),
                target: "a.example:443".into(),
                dialled: None,
                rule: None,
                category: "none".into(),
            },
            Live::default(),
        )
    }

    #[test]
    fn a_network_or_certificate_name_that_moves_revokes_and_one_that_stays_does_not() {
        let old = config(
            "[[branch]]\nname = \"london\"\nsources = [\"10.1.0.0/16\"]\nclient_certificates = [\"fs1.london.example\"]\n",
        );
        let same = config(
            "[[branch]]\nname = \"paris\"\nsources = [\"10.9.0.0/16\"]\n[[branch]]\nname = \"london\"\nsources = [\"10.1.0.0/16\"]\nclient_certificates = [\"fs1.london.example\"]\n",
        );
        let moved = config(
            "[[branch]]\nname = \"london\"\nsources = [\"10.2.0.0/16\"]\n[[branch]]\nname = \"paris\"\nsources = [\"10.1.2.0/24\"]\nclient_certificates = [\"fs1.london.example\"]\n",
        );
        let by_network = tunnel("london", IdentifiedBy::Network);
        let by_name = tunnel(
            "london",
            IdentifiedBy::Certificate("fs1.london.example".into()),
        );
        assert!(still_admitted(&by_network, &old, &same));
        assert!(still_admitted(&by_name, &old, &same));
        assert!(!still_admitted(&by_network, &old, &moved));
        assert!(!still_admitted(&by_name, &old, &moved));
        let gone = config("[[branch]]\nname = \"paris\"\nsources = [\"10.9.0.0/16\"]\n");
        assert!(!still_admitted(&by_network, &old, &gone));
        let unassigned = tunnel(UNASSIGNED, IdentifiedBy::Unassigned);
        let open = config("");
        assert!(still_admitted(&unassigned, &open, &open));
        assert!(
            !still_admitted(&unassigned, &open, &old),
            "now a branch's address"
        );
    }
}
