//! Learned destinations in the config: `learn` on an allow rule (read with the rule),
//! `[policy.learn]` by rule name (so a profile's rule can learn without being copied),
//! `policy.learn_limit`, and `state_dir`, where the learned sets are kept.

use super::paths::Paths;
use super::problems::Problems;
use crate::policy::{Learn, Rule};
use std::collections::BTreeMap;
use std::path::PathBuf;
use toml::Spanned;

/// Where the gateway keeps state when neither the file nor systemd (`StateDirectory=`, which
/// sets `$STATE_DIRECTORY`) says.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/portcullis";
/// Destinations (host and port) kept per branch and rule.
pub const DEFAULT_LEARN_LIMIT: u32 = 256;
/// Above this a set is no longer a list of a branch's storage accounts.
pub const MAX_LEARN_LIMIT: u32 = 100_000;

/// Applies `[policy.learn]` to the compiled rules: each name must be a rule, set only once.
pub(super) fn apply_table(
    p: &mut Problems<'_>,
    table: &BTreeMap<Spanned<String>, Spanned<Learn>>,
    rules: &mut [Rule],
    set_in_rule: &std::collections::HashSet<&str>,
) {
    for (name, mode) in table {
        let key = format!("policy.learn.{:?}", name.get_ref());
        let Some(i) = rules.iter().position(|r| &r.name == name.get_ref()) else {
            let known: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
            let hint = super::parse_errors::nearest(name.get_ref(), &known)
                .map(|n| format!(" (did you mean {n:?}?)"))
                .unwrap_or_default();
            p.add(
                name.span(),
                key,
                format!("no allow rule is named {:?}{hint}", name.get_ref()),
            );
            continue;
        };
        if set_in_rule.contains(name.get_ref().as_str()) {
            p.add(
                name.span(),
                key,
                "the rule sets `learn` itself; set it in one place",
            );
        } else if rules[i].plain_http {
            p.add(
                name.span(),
                key,
                "a plain-HTTP rule (revocation lists, OCSP) is not learned",
            );
        } else {
            rules[i].learn = *mode.get_ref();
        }
    }
}

/// `policy.learn_limit`: destinations kept per branch and rule.
pub(super) fn limit(p: &mut Problems<'_>, raw: Option<&Spanned<u32>>) -> usize {
    match raw {
        None => DEFAULT_LEARN_LIMIT as usize,
        Some(n) if !(1..=MAX_LEARN_LIMIT).contains(n.get_ref()) => {
            p.add(
                n.span(),
                "policy.learn_limit",
                format!("expected a number of destinations from 1 to {MAX_LEARN_LIMIT}"),
            );
            DEFAULT_LEARN_LIMIT as usize
        }
        Some(n) => *n.get_ref() as usize,
    }
}

/// `state_dir`, else systemd's `$STATE_DIRECTORY` (its first entry), else
/// [`DEFAULT_STATE_DIR`].
pub(super) fn state_dir(
    p: &mut Problems<'_>,
    raw: Option<&Spanned<String>>,
    paths: &Paths<'_>,
) -> PathBuf {
    match raw {
        Some(dir) => paths.resolve(p, dir, "state_dir"),
        None => std::env::var_os("STATE_DIRECTORY")
            .and_then(|dirs| {
                std::env::split_paths(&dirs)
                    .next()
                    .filter(|d| d.is_absolute())
            })
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, TEST_NOW};
    use crate::policy::Learn;

    fn rule_learn(config: &Config, name: &str) -> Learn {
        config
            .policy
            .rules
            .iter()
            .find(|r| r.name == name)
            .unwrap()
            .learn
    }

    #[test]
    fn rules_learn_by_their_own_key_or_by_name_in_the_policy_table() {
        let text = r#"
state_dir = "state"
[policy]
learn_limit = 32
[policy.learn]
"azure-file-sync/storage" = "enforce"
"azure-file-sync/sync" = "record"
[[policy.allow]]
name = "mine"
hosts = ["*.example.net"]
learn = "record"
"#;
        let config = Config::parse(text, "/etc/portcullis/l.toml", TEST_NOW).unwrap();
        assert_eq!(
            rule_learn(&config, "azure-file-sync/storage"),
            Learn::Enforce
        );
        assert_eq!(rule_learn(&config, "azure-file-sync/sync"), Learn::Record);
        assert_eq!(rule_learn(&config, "azure-file-sync/login"), Learn::Off);
        assert_eq!(rule_learn(&config, "mine"), Learn::Record);
        assert_eq!(config.policy.learn_limit, 32);
        assert_eq!(
            config.state_dir,
            std::path::Path::new("/etc/portcullis/state")
        );
        // Without a key: systemd's directory, else /var/lib/portcullis.
        let builtin = Config::builtin();
        assert!(builtin.policy.rules.iter().all(|r| r.learn == Learn::Off));
        assert_eq!(
            builtin.policy.learn_limit,
            super::DEFAULT_LEARN_LIMIT as usize
        );
        if std::env::var_os("STATE_DIRECTORY").is_none() {
            assert_eq!(
                builtin.state_dir,
                std::path::Path::new(super::DEFAULT_STATE_DIR)
            );
        }
    }

    #[test]
    fn learning_mistakes_are_named_with_their_place() {
        let text = r#"
[policy]
learn_limit = 0
[policy.learn]
"azure-file-sync/storag" = "enforce"
"mine" = "record"
"azure-file-sync/revocation" = "record"
[[policy.allow]]
name = "mine"
hosts = ["*.example.net"]
learn = "enforce"
[[policy.allow]]
name = "crl"
hosts = ["crl.example.net"]
ports = [80]
plain_http = true
learn = "record"
"#;
        let err = Config::parse(text, "l.toml", TEST_NOW)
            .unwrap_err()
            .to_string();
        for want in [
            "l.toml:3:15: policy.learn_limit: expected a number of destinations from 1 to 100000",
            "policy.learn.\"azure-file-sync/storag\": no allow rule is named \"azure-file-sync/storag\" (did you mean \"azure-file-sync/storage\"?)",
            "policy.learn.\"mine\": the rule sets `learn` itself; set it in one place",
            "policy.learn.\"azure-file-sync/revocation\": a plain-HTTP rule (revocation lists, OCSP) is not learned",
            "policy.allow[1].learn: a plain-HTTP rule (revocation lists, OCSP) is not learned",
        ] {
            assert!(err.contains(want), "missing {want:?} in:\n{err}");
        }
        let err = Config::parse(
            "[[policy.allow]]\nname = \"x\"\nhosts = [\"a.example\"]\nlearn = \"always\"\n",
            "l.toml",
            TEST_NOW,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("l.toml:4:9: policy.allow[0].learn"),
            "{err}"
        );
    }
}
