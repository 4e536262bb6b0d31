//! The Grafana dashboard and the Prometheus scrape config in `deploy/` refer only to
//! metrics laminar exports.

#![allow(
    clippy::unwrap_used,
    reason = "a test that cannot unwrap should fail loudly"
)]

mod support;

use std::collections::BTreeSet;

use laminar::metrics::Metrics;
use support::{read, repo};

/// Every metric name laminar exports (one child of each labelled family made visible).
fn exported() -> BTreeSet<String> {
    let metrics = Metrics::new("p");
    let _ = (
        metrics.source("s"),
        metrics.sink("k"),
        metrics.sink_transactions("k"),
        metrics.query("q"),
    );
    metrics.source_partition(
        "s",
        &laminar_connectors::PartitionStats {
            topic: "t".into(),
            partition: 0,
            records: 1,
            bytes: 1,
            lag: Some(0),
        },
    );
    metrics.reactor("q", 0, 0.5, 1);
    metrics.epoch_closed(1);
    metrics
        .render()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The `laminar_...` words in `text`; a histogram's `_bucket`, `_sum` and `_count` series
/// count as the histogram.
fn referenced(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("laminar_"))
        .map(|w| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| w.strip_suffix(s).filter(|b| b.ends_with("_seconds")))
                .unwrap_or(w)
                .to_owned()
        })
        .collect()
}

#[test]
fn the_dashboard_uses_only_exported_metrics() {
    let exported = exported();
    assert!(exported.len() >= 10, "{exported:?}");
    let text = read(&repo().join("deploy/grafana/laminar-dashboard.json"));
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(exprs.len() >= 5);
    let used = referenced(&exprs.join("\n"));
    let unknown: Vec<&String> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard uses metrics laminar does not export: {unknown:?}"
    );
    for must in [
        "laminar_source_records_total",
        "laminar_source_watermark_lag_seconds",
        "laminar_query_late_records_total",
    ] {
        assert!(used.contains(must), "the dashboard should chart {must}");
    }
}

#[test]
fn the_scrape_config_targets_the_metrics_path() {
    let text = read(&repo().join("deploy/prometheus/prometheus.yml"));
    assert!(text.contains("metrics_path: /metrics"), "{text}");
    assert!(text.contains("job_name: laminar"), "{text}");
    let unknown: Vec<String> = referenced(&text).difference(&exported()).cloned().collect();
    assert!(unknown.is_empty(), "{unknown:?}");
}

#[test]
fn the_readme_documents_every_exported_metric() {
    let readme = read(&repo().join("README.md"));
    let missing: Vec<String> = exported()
        .into_iter()
        .filter(|m| !readme.contains(&format!("`{m}`")))
        .collect();
    assert!(missing.is_empty(), "README does not document {missing:?}");
}
