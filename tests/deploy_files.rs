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

/// Every key a pipeline file may hold is in the README's reference: as `path` in a row of
/// its own, or named in the row of its parent (`sources[].events` / `rate_per_s`, or
/// `event_time`'s `column`).
#[test]
fn the_readme_documents_every_pipeline_key() {
    let readme = read(&repo().join("README.md"));
    let rows: Vec<&str> = readme.lines().filter(|l| l.starts_with("| `")).collect();
    let mut missing = Vec::new();
    for (section, keys) in laminar::config::KEYS {
        for key in *keys {
            let path = format!("{section}{key}");
            let parent = section.trim_end_matches('.');
            let documented = readme.contains(&format!("`{path}`"))
                || readme.contains(&format!("`{path}."))
                || readme.contains(&format!("`{path}[]."))
                || rows.iter().any(|row| {
                    let first = row.split(" | ").next().unwrap_or_default();
                    !parent.is_empty()
                        && (first.contains(&format!("`{parent}`"))
                            || first.contains(&format!("`{parent}.")))
                        && row.contains(key)
                });
            if !documented {
                missing.push(path);
            }
        }
    }
    assert!(missing.is_empty(), "README does not document {missing:?}");
}

/// Every option of every command (`laminar CMD --help`) is in the README.
#[test]
fn the_readme_documents_every_command_line_option() {
    let readme = read(&repo().join("README.md"));
    let mut missing = Vec::new();
    for command in ["run", "validate", "explain", "broker", "bench"] {
        let help = std::process::Command::new(env!("CARGO_BIN_EXE_laminar"))
            .args([command, "--help"])
            .output()
            .unwrap();
        assert!(help.status.success(), "laminar {command} --help");
        let help = String::from_utf8(help.stdout).unwrap();
        let options: BTreeSet<&str> = help
            .split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[' || c == ']')
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .collect();
        assert!(!options.is_empty() || command == "validate", "{help}");
        for option in options {
            if option != "--help" && !readme.contains(option) {
                missing.push(format!("{command} {option}"));
            }
        }
    }
    assert!(missing.is_empty(), "README does not document {missing:?}");
}

/// Packages every `debian:bookworm-slim` image has (its required set) that the binary may
/// link against without the Dockerfile installing them.
const SLIM_BASE_PACKAGES: &[&str] = &["libc6", "libgcc-s1", "zlib1g"];

/// The Dockerfile builds in one stage and runs in a slim one as a non-root user, with the
/// state directory as a volume and the metrics port exposed; and every shared library
/// the built binary links against comes from a package the runtime stage has (`ldd` and
/// `dpkg -S` on this Debian machine stand in for running the image, which needs Docker).
#[test]
fn the_dockerfile_runtime_stage_has_what_the_binary_links_against() {
    let dockerfile = read(&repo().join("Dockerfile"));
    let stages: Vec<&str> = dockerfile.split("\nFROM ").skip(1).collect();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    assert!(stages[0].contains("AS build"), "{}", stages[0]);
    let runtime = stages[1];
    assert!(runtime.starts_with("debian:bookworm-slim"), "{runtime}");
    assert!(runtime.contains("COPY --from=build"), "{runtime}");
    let user = runtime
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the runtime stage sets a USER");
    assert!(
        user.trim() != "root" && user.trim() != "0",
        "runs as {user}"
    );
    assert!(
        runtime.contains("EXPOSE 9464"),
        "the metrics port is exposed"
    );
    assert!(
        runtime.contains(r#"VOLUME ["/pipelines", "/var/lib/laminar"]"#),
        "{runtime}"
    );
    let readme = read(&repo().join("README.md"));
    assert!(
        readme.contains("-p 9464:9464")
            && readme.contains(":/pipelines")
            && readme.contains(":/var/lib/laminar"),
        "the README's docker run publishes the port and mounts both volumes"
    );
    let ignore = read(&repo().join(".dockerignore"));
    assert!(ignore.lines().any(|l| l.trim() == "target/"), "{ignore}");

    // The runtime stage's `apt-get install` packages.
    let install = runtime
        .split("apt-get install")
        .nth(1)
        .expect("the runtime stage installs packages");
    let installed: BTreeSet<&str> = install
        .split("&&")
        .next()
        .unwrap()
        .split_whitespace()
        .filter(|w| !w.starts_with('-') && *w != "\\")
        .collect();
    let Ok(ldd) = std::process::Command::new("ldd")
        .arg(env!("CARGO_BIN_EXE_laminar"))
        .output()
    else {
        eprintln!("skipped: no ldd here");
        return;
    };
    let ldd = String::from_utf8(ldd.stdout).unwrap();
    let libraries: Vec<&str> = ldd
        .lines()
        .filter_map(|l| l.split("=>").nth(1))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        libraries.iter().any(|l| l.contains("libssl")),
        "librdkafka links OpenSSL: {ldd}"
    );
    for library in libraries {
        let real = std::fs::canonicalize(library).unwrap();
        let found = [std::path::PathBuf::from(library), real]
            .iter()
            .find_map(|path| {
                let out = std::process::Command::new("dpkg")
                    .arg("-S")
                    .arg(path)
                    .output()
                    .ok()?;
                out.status.success().then(|| {
                    let text = String::from_utf8_lossy(&out.stdout).into_owned();
                    text.split(':').next().unwrap_or_default().to_owned()
                })
            });
        let Some(package) = found else {
            panic!("{library} belongs to no Debian package: the image would lack it");
        };
        assert!(
            installed.contains(package.as_str()) || SLIM_BASE_PACKAGES.contains(&package.as_str()),
            "the binary links {library} from {package}, which the runtime stage does not \
             install (it installs {installed:?})"
        );
    }
}
