//! Secrets from the pipeline's environment never reach output: not `validate`, not
//! `explain`, not a run's logs at debug level (ours and librdkafka's, with `debug: all`),
//! text or JSON.

#![allow(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod support;

use std::time::Duration;

use laminar_testcontainers::Broker;
use laminar_testcontainers::registry::SchemaRegistry;
use support::{Passthrough, Running, TempDir, laminar};

const KAFKA_PASSWORD: &str = "kafka-pw-Zq7xW2";
const KEY_PASSWORD: &str = "key-pw-Hh31Lm";
const REGISTRY_PASSWORD: &str = "registry-pw-Pp93Tr";

fn pipeline(dir: &TempDir, bootstrap: &str, registry_url: &str) -> String {
    let sections = format!(
        "schema_registry:\n  url: {registry_url}\n  username: laminar\n  password: ${{REGISTRY_PASSWORD}}"
    );
    Passthrough {
        name: "secrets",
        bootstrap,
        kafka: "  properties:
    security.protocol: SASL_PLAINTEXT
    sasl.mechanism: PLAIN
    sasl.username: laminar
    sasl.password: ${KAFKA_PASSWORD}
    ssl.key.password: ${KEY_PASSWORD}
    debug: all",
        sections: &sections,
        topic: "out",
        sink: "    format: avro",
        ..Passthrough::default()
    }
    .write(dir, "pipeline.yaml")
}

fn env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("KAFKA_PASSWORD", KAFKA_PASSWORD),
        ("KEY_PASSWORD", KEY_PASSWORD),
        ("REGISTRY_PASSWORD", REGISTRY_PASSWORD),
        ("RUST_LOG", "debug"),
    ]
}

fn assert_clean(what: &str, text: &str) {
    for secret in [KAFKA_PASSWORD, KEY_PASSWORD, REGISTRY_PASSWORD] {
        assert!(
            !text.contains(secret),
            "{what} printed a secret; the line:\n{}",
            text.lines()
                .find(|l| l.contains(secret))
                .unwrap_or_default()
        );
    }
}

#[test]
fn no_secret_appears_in_any_output() {
    let broker = Broker::in_process().unwrap();
    broker.create_topic("events", 1).unwrap();
    broker.create_topic("out", 1).unwrap();
    let registry = SchemaRegistry::start_with_auth("laminar", REGISTRY_PASSWORD).unwrap();
    let dir = TempDir::new("secrets");
    let file = pipeline(&dir, broker.bootstrap(), &registry.url());
    let env = env();

    let (code, out, err) = laminar(&["validate", &file], &env);
    assert_eq!(code, 0, "{err}");
    assert_clean("validate", &(out + &err));

    let (code, out, err) = laminar(&["explain", &file], &env);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sasl.password=[redacted]"), "{out}");
    assert!(out.contains("sasl.username=laminar"), "{out}");
    assert_clean("explain", &(out + &err));

    // A run at debug level, text and JSON logs: the registry is asked (with the
    // password), librdkafka logs everything it does, and its SASL handshake with a
    // broker that has none fails.
    for format in ["text", "json"] {
        let mut running = Running::start(&["--log-format", format, "run", &file], &env, &dir);
        // The output topics are checked first (the broker refuses the SASL handshake, so
        // the check gives up after its timeout), then the registry is asked.
        running.wait_for_log("value schema registered", Duration::from_secs(40));
        std::thread::sleep(Duration::from_secs(1));
        running.signal("KILL");
        let _ = running.wait(Duration::from_secs(10));
        let log = running.stderr();
        assert!(
            log.lines().count() > 20,
            "too few log lines to tell:\n{log}"
        );
        assert!(
            log.contains("value schema registered"),
            "the run did not reach the registry:\n{log}"
        );
        assert_clean(&format!("a run with {format} logs"), &log);
    }
    // A wrong registry password stops the run at once, naming neither password.
    let (code, _, err) = laminar(
        &["run", &file],
        &[
            ("KAFKA_PASSWORD", KAFKA_PASSWORD),
            ("KEY_PASSWORD", KEY_PASSWORD),
            ("REGISTRY_PASSWORD", "wrong-pw-Kk22"),
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("refused the credentials"), "{err}");
    assert_clean("a failed registry login", &err);
    assert!(!err.contains("wrong-pw-Kk22"), "{err}");
}

#[test]
fn a_misspelt_secret_property_is_refused_without_its_value() {
    let broker = Broker::in_process().unwrap();
    let dir = TempDir::new("secrets-typo");
    let file = dir.write(
        "pipeline.yaml",
        &format!(
            r"pipeline: typo
kafka:
  bootstrap_servers: {}
  properties:
    sasl.passwrod: ${{KAFKA_PASSWORD}}
sources:
  - {{ name: events, connector: kafka, topic: events, schema: {{ id: BIGINT }} }}
queries:
  - {{ name: all, sql: SELECT id FROM events }}
sinks:
  - {{ name: out, from: all, connector: stdout }}
",
            broker.bootstrap()
        ),
    );
    let (code, out, err) = laminar(
        &["run", &file.display().to_string()],
        &[("KAFKA_PASSWORD", KAFKA_PASSWORD)],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("sasl.passwrod"), "{err}");
    assert_clean("a configuration error", &(out + &err));
}
