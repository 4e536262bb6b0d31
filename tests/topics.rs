//! Topics: a missing input topic (an error, or waited for), output topics created (on
//! tansu, which has `CreateTopics`), topic patterns picking up new topics across a restart,
//! and SASL/SCRAM against a broker that requires it (tansu). laminar runs as a separate
//! process against real Kafka-protocol brokers.

#![allow(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use laminar_testcontainers::{
    Broker, Message, consume, consume_with, produce_messages, produce_messages_with,
};
use support::{Passthrough, Running, TempDir, laminar};

const QUIET: Duration = Duration::from_millis(1500);
const TIMEOUT: Duration = Duration::from_mins(1);

fn passthrough(dir: &TempDir, bootstrap: &str, source: &str, kafka: &str) -> String {
    Passthrough {
        name: "topics",
        bootstrap,
        kafka,
        source,
        ..Passthrough::default()
    }
    .write(dir, "pipeline.yaml")
}

fn ids(n: i64) -> Vec<Message> {
    (0..n)
        .map(|i| Message {
            value: format!(r#"{{"id": {i}}}"#).into_bytes(),
            ..Message::default()
        })
        .collect()
}

#[test]
fn a_missing_input_topic_is_an_error_by_default() {
    let broker = Broker::in_process().unwrap();
    broker.create_topic("events-out", 1).unwrap();
    let dir = TempDir::new("missing");
    let file = passthrough(&dir, broker.bootstrap(), "", "");
    let started = Instant::now();
    let (code, _, stderr) = laminar(&["run", &file], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no partition of events exists"), "{stderr}");
    assert!(stderr.contains("on_missing_topic: wait"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn on_missing_topic_wait_picks_the_topic_up_when_it_appears() {
    let broker = Broker::in_process().unwrap();
    broker.create_topic("events-out", 1).unwrap();
    let dir = TempDir::new("wait");
    let file = passthrough(&dir, broker.bootstrap(), "    on_missing_topic: wait", "");
    let mut running = Running::start(&["run", &file], &[], &dir);
    std::thread::sleep(Duration::from_secs(7));
    assert!(running.is_running(), "{}", running.stderr());
    assert!(
        running.stderr().contains("waiting for it"),
        "{}",
        running.stderr()
    );
    broker.create_topic("events", 2).unwrap();
    produce_messages(broker.bootstrap(), "events", &ids(30)).unwrap();
    let out = consume(broker.bootstrap(), "events-out", 30, QUIET, TIMEOUT).unwrap();
    running.stop();
    assert_eq!(out.len(), 30);
}

#[test]
fn a_topic_pattern_follows_new_topics_and_keeps_their_watermarks_across_a_restart() {
    let broker = Broker::in_process().unwrap();
    for (topic, partitions) in [
        ("orders-eu", 2),
        ("orders-us", 1),
        ("payments", 1),
        ("out-orders", 1),
    ] {
        broker.create_topic(topic, partitions).unwrap();
    }
    let dir = TempDir::new("pattern");
    let file = dir
        .write(
            "pipeline.yaml",
            &format!(
                r"pipeline: pattern
kafka:
  bootstrap_servers: {}
sources:
  - name: orders
    connector: kafka
    topic_pattern: orders-.*
    schema: {{ region: VARCHAR, ts: BIGINT }}
    event_time: {{ column: ts }}
queries:
  - name: per_region
    sql: |
      SELECT region, window_start, COUNT(*) AS n
      FROM TUMBLE(orders, ts, INTERVAL '1' SECOND)
      GROUP BY region, window_start, window_end
sinks:
  - name: out
    from: per_region
    connector: kafka
    topic: out-orders
    delivery: exactly_once
    transactions: false
state:
  checkpoint_interval_ms: 100
",
                broker.bootstrap()
            ),
        )
        .display()
        .to_string();
    let mut expected: BTreeMap<(String, i64), i64> = BTreeMap::new();
    let mut send = |topic: &str, partition: i32, region: &str, from: i64, to: i64, count: bool| {
        let messages: Vec<Message> = (from..to)
            .map(|t| Message {
                partition: Some(partition),
                value: format!(r#"{{"region": "{region}", "ts": {t}}}"#).into_bytes(),
                ..Message::default()
            })
            .collect();
        if count {
            for t in from..to {
                *expected
                    .entry((region.to_owned(), t - t % 1000))
                    .or_default() += 1;
            }
        }
        produce_messages(broker.bootstrap(), topic, &messages).unwrap();
    };
    send("orders-eu", 0, "eu", 0, 3000, true);
    send("orders-eu", 1, "eu", 0, 3000, true);
    send("orders-us", 0, "us", 0, 1500, true);
    send("payments", 0, "pay", 0, 3000, false);
    let mut running = Running::start(&["run", &file], &[], &dir);
    std::thread::sleep(Duration::from_secs(3));
    // A topic created while running is picked up (metadata is refreshed every 5 s); its
    // records start at the watermark, so none is late.
    broker.create_topic("orders-ap", 1).unwrap();
    send("orders-ap", 0, "ap", 1500, 3500, true);
    std::thread::sleep(Duration::from_secs(8));
    running.stop();
    // After the restart the partitions are discovered in another order (orders-ap sorts
    // first); each must keep its id and so its watermark. The fast partitions move on
    // first, then the slow one (orders-us, at 1499) catches up: had it been credited
    // another partition's event time (2999 or 3499), its window [1000, 2000) would have
    // closed without it, and its records would be late.
    let mut running = Running::start(&["run", &file], &[], &dir);
    running.wait_for_log("pipeline running", TIMEOUT);
    send("orders-eu", 0, "eu", 3000, 5000, true);
    send("orders-eu", 1, "eu", 3000, 5000, true);
    send("orders-ap", 0, "ap", 3500, 5000, true);
    std::thread::sleep(Duration::from_secs(3));
    send("orders-us", 0, "us", 1500, 5000, true);
    for (topic, partitions) in [("orders-eu", 2), ("orders-us", 1), ("orders-ap", 1)] {
        for p in 0..partitions {
            send(topic, p, "end", 1_000_000, 1_000_001, false);
        }
    }
    let out = consume(
        broker.bootstrap(),
        "out-orders",
        expected.len(),
        QUIET,
        TIMEOUT,
    )
    .unwrap();
    running.stop();
    let mut got: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for r in &out {
        let v: serde_json::Value = serde_json::from_str(&r.value).unwrap();
        let start = chrono::DateTime::parse_from_rfc3339(v["window_start"].as_str().unwrap())
            .unwrap()
            .timestamp_millis();
        let key = (v["region"].as_str().unwrap().to_owned(), start);
        assert!(
            got.insert(key.clone(), v["n"].as_i64().unwrap()).is_none(),
            "{key:?} twice"
        );
    }
    assert_eq!(got, expected, "{}", running.stderr());
    assert!(
        running.stderr().contains("records_late=0"),
        "{}",
        running.stderr()
    );
}

#[test]
fn output_topics_are_created_when_asked_and_missing_ones_are_an_error_on_tansu() {
    let Some(broker) = Broker::tansu().unwrap() else {
        eprintln!("tansu is not installed; skipping (scripts/test.sh installs it)");
        return;
    };
    broker.create_topic("events", 2).unwrap();
    produce_messages(broker.bootstrap(), "events", &ids(20)).unwrap();
    // tansu does not create topics on its own: without `create_topics` the run stops.
    let dir = TempDir::new("create");
    let file = passthrough(&dir, broker.bootstrap(), "", "");
    let (code, _, stderr) = laminar(&["run", &file], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("output topic `events-out` does not exist"),
        "{stderr}"
    );
    let file = passthrough(
        &dir,
        broker.bootstrap(),
        "",
        "  create_topics: { partitions: 3, replication_factor: 1 }",
    );
    let mut running = Running::start(&["run", &file], &[], &dir);
    // The reader needs the topic's partitions: wait for laminar to have made it.
    running.wait_for_log("pipeline running", TIMEOUT);
    let out = consume(broker.bootstrap(), "events-out", 20, QUIET, TIMEOUT).unwrap();
    running.stop();
    assert_eq!(out.len(), 20, "{}", running.stderr());
    assert!(
        running.stderr().contains("created output topic"),
        "{}",
        running.stderr()
    );
    let partitions: std::collections::BTreeSet<i32> = out.iter().map(|r| r.partition).collect();
    assert!(
        partitions.iter().all(|p| (0..3).contains(p)),
        "{partitions:?}"
    );
}

#[test]
fn sasl_scram_authenticates_against_a_broker_that_requires_it() {
    let Some(broker) = Broker::tansu_with_users(
        &[("laminar", "scram-pw-77")],
        &[("events", 1), ("events-out", 1)],
    )
    .unwrap() else {
        eprintln!("tansu is not installed; skipping (scripts/test.sh installs it)");
        return;
    };
    let auth = |mechanism: &'static str, password: &'static str| {
        vec![
            ("security.protocol", "SASL_PLAINTEXT"),
            ("sasl.mechanism", mechanism),
            ("sasl.username", "laminar"),
            ("sasl.password", password),
        ]
    };
    produce_messages_with(
        broker.bootstrap(),
        &auth("SCRAM-SHA-512", "scram-pw-77"),
        "events",
        &ids(25),
    )
    .unwrap();
    let dir = TempDir::new("scram");
    for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-512"] {
        let kafka = format!(
            "  properties:\n    security.protocol: SASL_PLAINTEXT\n    sasl.mechanism: {mechanism}\n    sasl.username: laminar\n    sasl.password: ${{KAFKA_PASSWORD}}"
        );
        let file = passthrough(&dir, broker.bootstrap(), "", &kafka);
        // A wrong password: the broker refuses it, laminar says so (and keeps trying).
        let mut refused = Running::start(&["run", &file], &[("KAFKA_PASSWORD", "wrong")], &dir);
        let log = refused.wait_for_log("refused laminar's credentials", Duration::from_secs(30));
        assert!(log.contains("refused laminar's credentials"), "{log}");
        assert!(!log.contains("wrong"), "{log}");
        refused.signal("KILL");
        let _ = refused.wait(Duration::from_secs(10));
        // The right one: records flow.
        let state = TempDir::new("scram-state");
        let state_dir = state.0.display().to_string();
        let mut running = Running::start(
            &["run", &file, "--state-dir", &state_dir],
            &[("KAFKA_PASSWORD", "scram-pw-77")],
            &dir,
        );
        let out = consume_with(
            broker.bootstrap(),
            &auth(mechanism, "scram-pw-77"),
            "events-out",
            25,
            QUIET,
            TIMEOUT,
        )
        .unwrap();
        running.stop();
        assert!(
            out.len() >= 25,
            "{mechanism}: {} records\n{}",
            out.len(),
            running.stderr()
        );
    }
}
