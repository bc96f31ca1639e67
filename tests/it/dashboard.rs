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

#[tokio::test]
async fn every_dashboard_query_is_valid_and_names_what_the_gateway_exports() {
    let origin = TcpOrigin::start(b"").await;
    // A schedule in force, so the bandwidth panels' families have series.
    let schedule = "[[schedule]]\nname = \"always\"\ndays = \"daily\"\nhours = \"00:00-00:00\"\ntime_zone = \"UTC\"\nupload = \"10 Mbit/s\"\ndownload = \"10 Mbit/s\"\n";
    let extra = format!("{}\n{schedule}", resolver_hosts(""));
    let gw = Gateway::start(&config_for(origin.addr.port(), &extra)).await;
    let metrics = crate::admin::get(gw.admin_addr.unwrap(), "/metrics")
        .await
        .body;
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (title, expr, legend)) in queries().into_iter().enumerate() {
        for name in metric_names(&expr) {
            // A histogram's series are `<name>_bucket`; the family is named without it.
            let family = name.trim_end_matches("_bucket");
            assert!(
                metrics.contains(&format!("# TYPE {family} ")),
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
    let checked = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    assert!(
        checked.status.success(),
        "promtool check rules:\n{}{}\n{rules}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}
