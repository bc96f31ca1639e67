//! The learned destinations' metrics: new destinations per branch and rule (the alert: a branch
//! started talking to a storage account it never used) and how many each set holds.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LearnLabels {
    pub branch: String,
    pub rule: String,
}

#[derive(Clone, Default)]
pub struct LearnedMetrics {
    /// First tunnels of a branch to a name under a learning rule.
    pub new_destinations: Family<LearnLabels, Counter>,
    /// Destinations held per branch and rule.
    pub destinations: Family<LearnLabels, Gauge>,
}

impl LearnedMetrics {
    /// Registers both families under `portcullis_`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "new_destinations",
            "Tunnels that were a branch's first to a name under a rule with learn = record (or past its learn_limit)",
            metrics.new_destinations.clone(),
        );
        registry.register(
            "learned_destinations",
            "Destinations (host and port) learned or approved per branch and rule",
            metrics.destinations.clone(),
        );
        metrics
    }

    pub fn labels(branch: &str, rule: &str) -> LearnLabels {
        LearnLabels {
            branch: branch.to_owned(),
            rule: rule.to_owned(),
        }
    }

    pub fn new_destination(&self, branch: &str, rule: &str) {
        self.new_destinations
            .get_or_create(&Self::labels(branch, rule))
            .inc();
    }

    pub fn set_len(&self, branch: &str, rule: &str, len: usize) {
        self.destinations
            .get_or_create(&Self::labels(branch, rule))
            .set(len as i64);
    }

    /// Both series exist from start at zero for a branch and a learning rule.
    pub fn expect(&self, branch: &str, rule: &str) {
        let labels = Self::labels(branch, rule);
        drop(self.new_destinations.get_or_create(&labels));
        drop(self.destinations.get_or_create(&labels));
    }

    /// Sets every set's gauge (after a load or a fleet merge).
    pub(super) fn count_all(
        &self,
        sets: &std::collections::HashMap<String, std::collections::HashMap<String, super::Set>>,
    ) {
        for (branch, rules) in sets {
            for (rule, set) in rules {
                self.set_len(branch, rule, set.len());
            }
        }
    }
}
