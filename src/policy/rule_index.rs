//! Which allow rules can match a target, without scanning them all: rules by exact name and by
//! wildcard suffix (`*.core.windows.net` under `.core.windows.net`), and the rules that list
//! addresses for IP literals. A name is looked up once for itself and once per suffix of its
//! labels, so the cost follows the name's length, not the number of rules. The decision still
//! walks the candidates in rule order, so first match wins as before; a test holds the index to
//! the plain scan on random rules and names.

use super::Rule;
use super::host::{Host, HostPattern};
use std::collections::HashMap;

/// Below this many rules a scan is as cheap as the lookups.
const SCAN_BELOW: usize = 32;

/// Allow rules by what they match, as positions in the policy's rule list.
#[derive(Clone, Debug, Default)]
pub struct RuleIndex {
    exact: HashMap<Box<str>, Vec<u32>>,
    /// By ".suffix", dot included.
    under: HashMap<Box<str>, Vec<u32>>,
    /// Rules with `addresses`, the candidates for an IP literal.
    literal: Vec<u32>,
    /// Fewer rules than [`SCAN_BELOW`]: every rule is a candidate.
    scan: Option<usize>,
}

impl RuleIndex {
    pub fn new(rules: &[Rule]) -> Self {
        if rules.len() < SCAN_BELOW {
            return Self {
                scan: Some(rules.len()),
                ..Self::default()
            };
        }
        let mut index = Self::default();
        for (i, rule) in rules.iter().enumerate() {
            let i = i as u32;
            for pattern in &rule.hosts {
                let (map, key) = match pattern {
                    HostPattern::Exact(name) => (&mut index.exact, name.as_str()),
                    HostPattern::Under(dot_suffix) => (&mut index.under, &**dot_suffix),
                };
                let list = map.entry(key.into()).or_default();
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
            if !rule.addresses.is_empty() {
                index.literal.push(i);
            }
        }
        index
    }

    /// Every rule a candidate, as a plain scan (the tests' reference).
    #[cfg(test)]
    pub fn scan_all(len: usize) -> Self {
        Self {
            scan: Some(len),
            ..Self::default()
        }
    }

    /// The positions of the rules that may match `host`, ascending, each once.
    pub fn candidates(&self, host: &Host) -> Candidates {
        if let Some(len) = self.scan {
            return Candidates::All(0..len);
        }
        let mut found: Vec<u32> = Vec::new();
        match host {
            Host::Ip(_) => found.extend_from_slice(&self.literal),
            Host::Name(name) => {
                let name = name.as_str();
                if let Some(list) = self.exact.get(name) {
                    found.extend_from_slice(list);
                }
                // Every ".suffix" that leaves at least one label before it.
                for (at, _) in name.match_indices('.') {
                    if let Some(list) = self.under.get(&name[at..]) {
                        found.extend_from_slice(list);
                    }
                }
                found.sort_unstable();
                found.dedup();
            }
        }
        Candidates::Listed(found.into_iter())
    }
}

/// Rule positions to try, in rule order.
pub enum Candidates {
    All(std::ops::Range<usize>),
    Listed(std::vec::IntoIter<u32>),
}

impl Iterator for Candidates {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        match self {
            Candidates::All(range) => range.next(),
            Candidates::Listed(list) => list.next().map(|i| i as usize),
        }
    }
}
