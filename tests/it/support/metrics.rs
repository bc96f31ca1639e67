//! `/metrics` as tests read it: `Metrics` parses the classic text format into samples (name,
//! labels, value) and the families it declares; a series is written as Prometheus shows it,
//! `name{label="value",...}`, labels in any order. `promtool` checks exposition text and rule
//! files.

use super::admin_get;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Clone, Debug)]
pub struct Metrics {
    text: String,
    samples: Vec<Sample>,
    /// Families named by `# TYPE` lines.
    families: BTreeSet<String>,
}

/// `name{a="b",...}` (labels optional) at the start of `text`: the name, the labels, and the
/// rest of the text.
fn series(text: &str) -> (String, BTreeMap<String, String>, &str) {
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(text.len());
    let name = text[..end].to_owned();
    let mut labels = BTreeMap::new();
    let mut rest = &text[end..];
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (label, after) = rest
                .split_once("=\"")
                .unwrap_or_else(|| panic!("no label value in {text:?}"));
            let mut value = String::new();
            let mut chars = after.char_indices();
            let close = loop {
                match chars.next() {
                    Some((at, '"')) => break at,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => panic!("unterminated label value in {text:?}"),
                    },
                    Some((_, c)) => value.push(c),
                    None => panic!("unterminated label value in {text:?}"),
                }
            };
            labels.insert(label.trim().to_owned(), value);
            rest = &after[close + 1..];
        }
    }
    (name, labels, rest)
}

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        let mut families = BTreeSet::new();
        for line in text.lines() {
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if words.next() == Some("TYPE") {
                    families.extend(words.next().map(str::to_owned));
                }
                continue;
            }
            if line.trim().is_empty() {
                continue;
            }
            let (name, labels, rest) = series(line);
            let value = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no value in the sample line {line:?}"));
            samples.push(Sample {
                name,
                labels,
                value,
            });
        }
        Self {
            text: text.to_owned(),
            samples,
            families,
        }
    }

    /// `GET /metrics` from the admin listener at `admin`.
    pub async fn fetch(admin: SocketAddr) -> Self {
        let reply = admin_get(admin, "/metrics").await;
        assert_eq!(reply.status, 200, "GET /metrics: {reply:?}");
        Self::parse(&reply.body)
    }

    /// The value of the one sample with exactly this name and these labels.
    pub fn get(&self, wanted: &str) -> Option<f64> {
        let (name, labels, _) = series(wanted);
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == labels)
            .map(|s| s.value)
    }

    /// `get`, failing the test (with the whole exposition) when there is no such sample.
    pub fn value(&self, wanted: &str) -> f64 {
        self.get(wanted)
            .unwrap_or_else(|| panic!("no {wanted} in:\n{}", self.text))
    }

    /// Fails the test (showing the whole exposition) unless `wanted` has the value `want`.
    pub fn assert_value(&self, wanted: &str, want: f64) {
        assert_eq!(self.value(wanted), want, "{wanted} in:\n{}", self.text);
    }

    /// Every sample of the name whose labels include the given ones.
    pub fn matching(&self, selector: &str) -> Vec<&Sample> {
        let (name, labels, _) = series(selector);
        self.samples
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .collect()
    }

    /// The sum of `matching(selector)`.
    pub fn sum(&self, selector: &str) -> f64 {
        self.matching(selector).iter().map(|s| s.value).sum()
    }

    /// Whether a `# TYPE` line declares the family `name`.
    pub fn has_family(&self, name: &str) -> bool {
        self.families.contains(name)
    }

    /// Every name the exposition uses: declared families and sample names.
    pub fn names(&self) -> BTreeSet<&str> {
        self.families
            .iter()
            .map(String::as_str)
            .chain(self.samples.iter().map(|s| s.name.as_str()))
            .collect()
    }

    /// The exposition as it came.
    pub fn text(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Runs `promtool args` with `stdin` on its standard input; its output is the failure message.
pub fn promtool(args: &[&str], stdin: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `promtool check metrics` (lint included) accepts `text`, a classic-format exposition.
pub fn assert_promtool_passes(text: &str) {
    promtool(&["check", "metrics"], text);
}

#[test]
fn the_parser_reads_names_labels_values_and_families() {
    let metrics = Metrics::parse(
        "# HELP a_total Things.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"uo, te\"} 3\na_total{x=\"2\",y=\"z\"} 4 1700000000\n# TYPE b gauge\nb 2.5\nc_bucket{le=\"+Inf\"} 7\n",
    );
    assert_eq!(metrics.get(r#"a_total{y="q\"uo, te",x="1"}"#), Some(3.0));
    assert_eq!(
        metrics.get(r#"a_total{x="1"}"#),
        None,
        "labels match exactly"
    );
    assert_eq!(metrics.sum("a_total"), 7.0);
    assert_eq!(metrics.sum(r#"a_total{x="2"}"#), 4.0);
    assert_eq!(metrics.value("b"), 2.5);
    assert_eq!(metrics.value(r#"c_bucket{le="+Inf"}"#), 7.0);
    assert!(metrics.has_family("a_total") && !metrics.has_family("c_bucket"));
    assert_eq!(
        metrics.names().into_iter().collect::<Vec<_>>(),
        ["a_total", "b", "c_bucket"]
    );
}
