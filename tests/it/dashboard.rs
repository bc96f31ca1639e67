//! The Grafana dashboard (docker/grafana-dashboard.json) against a real gateway: every query is
//! valid PromQL (promtool), names a metric the gateway exports, is filtered by the `$instance`
//! variable, and its legend names only labels its query keeps.

use crate::support::*;
use serde_json::Value;
use std::collections::BTreeSet;

/// Every (panel title, expr, legend) of the dashboard.
fn queries() -> Vec<(String, String, String)> {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docker/grafana-dashboard.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            out.push((
                panel["title"].as_str().unwrap().to_owned(),
                target["expr"].as_str().unwrap().to_owned(),
                target["legendFormat"].as_str().unwrap_or("").to_owned(),
            ));
        }
    }
    assert!(out.len() >= 10, "{out:?}");
    out
}

/// The metric names in `expr` (`portcullis_*` and `process_*`).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("portcullis_").or_else(|| rest.find("process_")) {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

/// The `/metrics` of a real gateway with `extra` config and a rule that learns (so the learned
/// destinations' families have series).
async fn exported_with_learning(origin_port: u16, extra: &str) -> Metrics {
    let state = tempfile::tempdir().unwrap();
    let config = GatewayConfig::for_origin(origin_port)
        .state_dir(state.path())
        .extra(extra)
        .extra("[policy.learn]\n\"test-origin\" = \"record\"\n")
        // A parent and an egress (unused), so their families have series.
        .extra("[[parent]]\nname = \"corp\"\naddress = \"127.0.0.1:1\"\n[egress.corp]\nvia = [\"corp\"]\n");
    let gw = Gateway::start(config).await;
    gw.metrics().await
}

#[tokio::test]
async fn every_dashboard_query_is_valid_and_names_what_the_gateway_exports() {
    let origin = TcpOrigin::start(b"").await;
    // A schedule in force, so the bandwidth panels' families have series.
    let schedule = "[[schedule]]\nname = \"always\"\ndays = \"daily\"\nhours = \"00:00-00:00\"\ntime_zone = \"UTC\"\nupload = \"10 Mbit/s\"\ndownload = \"10 Mbit/s\"\n";
    let metrics = exported_with_learning(origin.addr.port(), schedule).await;
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (title, expr, legend)) in queries().into_iter().enumerate() {
        for name in metric_names(&expr) {
            // A histogram's series are `<name>_bucket`; the family is named without it.
            let family = name.trim_end_matches("_bucket");
            assert!(
                metrics.has_family(family),
                "{title}: {name} is not exported:\n{metrics}"
            );
            assert!(
                expr.contains(&format!("{name}{{instance=~\"$instance\"")),
                "{title}: {name} is not filtered by $instance: {expr}"
            );
        }
        // The legend may only name labels the outermost aggregation keeps.
        let kept: BTreeSet<&str> = expr
            .split_once(" by (")
            .and_then(|(_, rest)| rest.split_once(')'))
            .map(|(labels, _)| labels.split(", ").collect())
            .unwrap_or_default();
        for label in legend
            .split("{{")
            .skip(1)
            .filter_map(|l| l.split_once("}}"))
        {
            assert!(
                kept.contains(label.0),
                "{title}: legend {legend:?} names {:?}, which {expr:?} drops",
                label.0
            );
        }
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: '{}'\n",
            expr.replace("$instance", ".*").replace('\'', "''")
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard.rules.yml");
    std::fs::write(&path, &rules).unwrap();
    promtool(&["check", "rules", path.to_str().unwrap()], "");
}

/// The alert rules (docker/alerts.yml): valid for promtool, each one fires on the series it is
/// meant for and not before (promtool's rule unit tests), and every metric they name is one a
/// real gateway exports (with a rule that learns, so the learned families exist).
#[tokio::test]
async fn the_alert_rules_are_valid_fire_as_meant_and_name_what_the_gateway_exports() {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/docker/alerts.yml");
    let text = std::fs::read_to_string(rules).unwrap();
    let origin = TcpOrigin::start(b"").await;
    let metrics = exported_with_learning(origin.addr.port(), "").await;
    let named = metric_names(&text);
    assert!(named.len() >= 4, "{named:?}");
    for name in named {
        assert!(
            metrics.has_family(&name),
            "{name} is not exported:\n{metrics}"
        );
    }
    promtool(&["check", "rules", rules], "");
    let london =
        r#"{severity: warning, instance: gw1, branch: london, rule: azure-file-sync/storage}"#;
    let tests = format!(
        r#"rule_files:
  - {rules}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'portcullis_new_destinations_total{{instance="gw1", branch="london", rule="azure-file-sync/storage"}}'
        values: '0 0 1 1 1'
      - series: 'portcullis_requests_total{{instance="gw1", branch="paris", end="not_learned", verdict="deny", category="storage"}}'
        values: '0 0 2 2'
      - series: 'portcullis_requests_total{{instance="gw1", branch="paris", end="closed", verdict="allow", category="storage"}}'
        values: '0 5 10 15'
      - series: 'portcullis_config_reloads_total{{instance="gw1", result="failure"}}'
        values: '0 1 1'
      - series: 'portcullis_connections_waiting{{instance="gw1"}}'
        values: '0 3 3 3 3 3 3 3 3'
    alert_rule_test:
      - eval_time: 1m
        alertname: PortcullisNewDestination
        exp_alerts: []
      - eval_time: 3m
        alertname: PortcullisNewDestination
        exp_alerts:
          - exp_labels: {london}
            exp_annotations:
              summary: "Branch london reached a destination it never used (rule azure-file-sync/storage)"
              description: "See `portcullis learned list --branch london` on gw1; approve it or deny it."
      - eval_time: 3m
        alertname: PortcullisDestinationNotLearned
        exp_alerts:
          - exp_labels: {{severity: warning, instance: gw1, branch: paris}}
            exp_annotations:
              summary: "Branch paris was refused destinations it has not learned"
              description: "The access log's end = \"not_learned\" lines name them; `portcullis learned approve` admits one."
      - eval_time: 2m
        alertname: PortcullisConfigReloadFailed
        exp_alerts:
          - exp_labels: {{severity: warning, instance: gw1, result: failure}}
            exp_annotations:
              summary: "A configuration reload was rejected on gw1"
              description: "The log line \"reload rejected\" lists the file's problems; the running configuration stays."
      - eval_time: 3m
        alertname: PortcullisConnectionsWaiting
        exp_alerts: []
      - eval_time: 7m
        alertname: PortcullisConnectionsWaiting
        exp_alerts:
          - exp_labels: {{severity: critical, instance: gw1}}
            exp_annotations:
              summary: "Clients wait for a connection place on gw1"
              description: "connections_open has reached connections_limit (limits.max_connections or the descriptor limit)."
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alerts.test.yml");
    std::fs::write(&path, tests).unwrap();
    promtool(&["test", "rules", path.to_str().unwrap()], "");
}
