//! Kafka integration: laminar as a separate process against real Kafka-protocol brokers
//! started by `testcontainers/` (the mock cluster in this process, `laminar broker` in
//! another), read and written through librdkafka.

#![allow(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use laminar_testcontainers::{Broker, Record, consume, free_port, produce};
use support::{LAMINAR, Passthrough, Running, TempDir};

const QUIET: Duration = Duration::from_millis(1500);
const TIMEOUT: Duration = Duration::from_mins(1);

fn pipeline(dir: &TempDir, bootstrap: &str) -> String {
    pipeline_with(dir, bootstrap, "")
}

/// [`pipeline`] with `kafka` lines after `bootstrap_servers` (indented two spaces).
fn pipeline_with(dir: &TempDir, bootstrap: &str, kafka: &str) -> String {
    let text = format!(
        r"pipeline: kafka-test
kafka:
  bootstrap_servers: {bootstrap}
{kafka}sources:
  - name: bids
    connector: kafka
    topic: bids
    schema:
      auction: BIGINT
      price: BIGINT
    metadata_columns: [key, partition, offset]
    dead_letter_topic: bids-dlq
queries:
  - name: priced
    sql: |
      SELECT auction, price * 2 AS doubled, _key AS src_key, _partition AS src_partition, _offset AS src_offset
      FROM bids
      WHERE price > 0
sinks:
  - name: out
    from: priced
    connector: kafka
    topic: priced
    key: [auction]
state:
  checkpoint_interval_ms: 200
"
    );
    dir.write("pipeline.yaml", &text)
        .to_string_lossy()
        .into_owned()
}

fn json(r: &Record) -> serde_json::Value {
    serde_json::from_str(&r.value).unwrap_or_else(|e| panic!("{}: {e}", r.value))
}

#[test]
fn kafka_pipeline_filters_keys_dead_letters_and_commits() {
    let broker = Broker::in_process().unwrap();
    for (topic, partitions) in [("bids", 4), ("priced", 4), ("bids-dlq", 1)] {
        broker.create_topic(topic, partitions).unwrap();
    }
    // 400 records over 4 partitions, with 3 poison pills in the middle of partitions.
    let mut values = Vec::new();
    for i in 0..400_i64 {
        let value = match i {
            50 => "{not json".to_owned(),
            150 => r#"{"auction": 1}"#.to_owned(),
            250 => r#"{"auction": 2, "price": "high"}"#.to_owned(),
            _ => format!(r#"{{"auction": {}, "price": {}}}"#, i % 37, i % 10),
        };
        values.push((Some((i % 4) as i32), format!("k{i}"), value));
    }
    let records: Vec<_> = values
        .iter()
        .map(|(p, k, v)| (*p, Some(k.as_str()), v.as_str()))
        .collect();
    produce(broker.bootstrap(), "bids", &records).unwrap();
    let expected: BTreeSet<String> = values
        .iter()
        .enumerate()
        .filter(|(i, _)| ![50, 150, 250].contains(i) && i % 10 != 0)
        .map(|(_, (_, k, _))| k.clone())
        .collect();

    let dir = TempDir::new("kafka");
    let file = pipeline(&dir, broker.bootstrap());
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let mut laminar = Running::start(&["run", &file, "--metrics-addr", &addr], &[], &dir);
    let out = consume(broker.bootstrap(), "priced", expected.len(), QUIET, TIMEOUT).unwrap();
    // Per partition: every record read and counted, its bytes, and the lag down to 0.
    let bytes: Vec<f64> = (0..4)
        .map(|p| {
            values
                .iter()
                .filter(|(q, _, _)| *q == Some(p))
                .map(|(_, k, v)| (k.len() + v.len()) as f64)
                .sum()
        })
        .collect();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let metrics = support::get(&addr, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default();
        let series = |name: &str, p: i32| {
            support::sample(
                &metrics,
                &format!(
                    r#"{name}{{partition="{p}",pipeline="kafka-test",source="bids",topic="bids"}}"#
                ),
            )
        };
        let settled = (0..4).all(|p| {
            series("laminar_source_partition_records_total", p) == Some(100.0)
                && series("laminar_source_partition_bytes_total", p) == Some(bytes[p as usize])
                && series("laminar_source_partition_lag_records", p) == Some(0.0)
        });
        if settled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "partition metrics never settled:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    laminar.signal("TERM");
    assert!(
        laminar.wait(Duration::from_secs(30)).success(),
        "{}",
        laminar.stderr()
    );

    // Every good record exactly once, nothing else.
    let keys: Vec<String> = out
        .iter()
        .map(|r| json(r)["src_key"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(keys.len(), expected.len(), "duplicates or losses");
    assert_eq!(keys.iter().cloned().collect::<BTreeSet<_>>(), expected);
    // Keyed by auction; values computed by SQL; per source partition, offsets in order.
    let mut last_offset: BTreeMap<(i32, i64), i64> = BTreeMap::new();
    for r in &out {
        let v = json(r);
        assert_eq!(r.key.as_deref(), Some(v["auction"].to_string().as_str()));
        let i: i64 = v["src_key"].as_str().unwrap()[1..].parse().unwrap();
        assert_eq!(v["doubled"], (i % 10) * 2);
        assert_eq!(v["src_partition"], i % 4);
        let src = (
            v["src_partition"].as_i64().unwrap() as i32,
            v["auction"].as_i64().unwrap(),
        );
        let offset = v["src_offset"].as_i64().unwrap();
        if let Some(prev) = last_offset.insert(src, offset) {
            assert!(
                prev < offset,
                "reordered within a partition: {prev} then {offset}"
            );
        }
    }

    // The poison pills went to the dead-letter topic, with their reasons.
    let dlq = consume(broker.bootstrap(), "bids-dlq", 3, QUIET, TIMEOUT).unwrap();
    assert_eq!(dlq.len(), 3);
    let reasons: Vec<String> = dlq
        .iter()
        .map(|r| r.header("laminar.error").unwrap().to_owned())
        .collect();
    assert!(
        reasons.iter().any(|r| r.starts_with("invalid JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&"missing required field `price`".to_owned()),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("field `price`: expected an integer")),
        "{reasons:?}"
    );
    assert!(dlq.iter().all(|r| r.key.is_some() && r.headers.iter().any(|(k, _)| k == "laminar.source.offset")));

    // Offsets were committed: a second run finds nothing new to do.
    let mut again = Running::start(&["run", &file], &[], &dir);
    std::thread::sleep(Duration::from_secs(4));
    again.signal("TERM");
    assert!(
        again.wait(Duration::from_secs(30)).success(),
        "{}",
        again.stderr()
    );
    let out = consume(broker.bootstrap(), "priced", expected.len(), QUIET, TIMEOUT).unwrap();
    assert_eq!(
        out.len(),
        expected.len(),
        "a restart after a clean stop re-emitted records"
    );
}

#[test]
fn kafka_broker_down_at_start_is_retried_until_it_comes() {
    let port = free_port().unwrap();
    let dir = TempDir::new("down");
    let file = pipeline(&dir, &format!("127.0.0.1:{port}"));
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let mut laminar = Running::start(
        &["run", &file, "--metrics-addr", &addr],
        &[("RUST_LOG", "info")],
        &dir,
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        laminar.is_running(),
        "laminar gave up on a missing broker: {}",
        laminar.stderr()
    );
    // Alive, but not ready: no partition is assigned while the broker is away.
    assert_eq!(support::get(&addr, "/health").map(|r| r.0), Some(200));
    assert_eq!(support::get(&addr, "/ready").map(|r| r.0), Some(503));

    let broker = Broker::laminar_process(
        LAMINAR.as_ref(),
        port,
        &[("bids", 2), ("priced", 2), ("bids-dlq", 1)],
    )
    .unwrap();
    assert_eq!(broker.bootstrap(), format!("127.0.0.1:{port}"));
    let records: Vec<(Option<i32>, Option<&str>, String)> = (0..50)
        .map(|i| (None, None, format!(r#"{{"auction": {i}, "price": 5}}"#)))
        .collect();
    let refs: Vec<_> = records
        .iter()
        .map(|(p, k, v)| (*p, *k, v.as_str()))
        .collect();
    produce(broker.bootstrap(), "bids", &refs).unwrap();
    let out = consume(broker.bootstrap(), "priced", 50, QUIET, TIMEOUT).unwrap();
    assert_eq!(out.len(), 50, "{}", laminar.stderr());
    assert_eq!(support::get(&addr, "/ready").map(|r| r.0), Some(200));
    laminar.signal("TERM");
    assert!(
        laminar.wait(Duration::from_secs(30)).success(),
        "{}",
        laminar.stderr()
    );
    assert!(
        laminar.stderr().contains("retrying"),
        "{}",
        laminar.stderr()
    );
}

fn bids(range: std::ops::Range<i64>) -> Vec<(Option<i32>, Option<String>, String)> {
    range
        .map(|i| {
            (
                None,
                Some(format!("k{i}")),
                format!(r#"{{"auction": {i}, "price": 1}}"#),
            )
        })
        .collect()
}

fn produce_bids(bootstrap: &str, records: &[(Option<i32>, Option<String>, String)]) {
    let refs: Vec<_> = records
        .iter()
        .map(|(p, k, v)| (*p, k.as_deref(), v.as_str()))
        .collect();
    produce(bootstrap, "bids", &refs).unwrap();
}

/// The broker goes away while laminar works off a backlog, with a producer queue of 5
/// records: the sink holds records back, the source is paused at the broker for the
/// outage and resumed after it, and every record comes out.
#[test]
fn kafka_broker_away_for_a_while_delays_but_loses_nothing() {
    let broker = Broker::in_process_with_relay().unwrap();
    for (topic, partitions) in [("bids", 2), ("priced", 2), ("bids-dlq", 1)] {
        broker.create_topic(topic, partitions).unwrap();
    }
    let dir = TempDir::new("away");
    let file = pipeline_with(
        &dir,
        broker.bootstrap(),
        "  properties:\n    queue.buffering.max.messages: \"5\"\n",
    );
    // No epoch closes during the outage: a close waits for every acknowledgement, so
    // the whole outage is spent in the loop, with the source paused.
    let text = support::read(file.as_ref()).replace(
        "checkpoint_interval_ms: 200",
        "checkpoint_interval_ms: 60000",
    );
    std::fs::write(&file, text).unwrap();
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let mut laminar = Running::start(&["run", &file, "--metrics-addr", &addr], &[], &dir);
    produce_bids(broker.bootstrap(), &bids(0..10_000));
    broker.set_reachable(false);
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        laminar.is_running(),
        "laminar exited while the broker was away: {}",
        laminar.stderr()
    );
    let paused = support::get(&addr, "/metrics").and_then(|(_, body)| {
        support::sample(
            &body,
            r#"laminar_source_backpressure_seconds_total{pipeline="kafka-test",source="bids"}"#,
        )
    });
    assert!(
        paused.unwrap() > 3.0,
        "paused for {paused:?} s of the outage"
    );
    broker.set_reachable(true);

    produce_bids(broker.bootstrap(), &bids(10_000..10_100));
    let out = consume(broker.bootstrap(), "priced", 10_100, QUIET, TIMEOUT).unwrap();
    let keys: BTreeSet<String> = out
        .iter()
        .map(|r| json(r)["src_key"].as_str().unwrap().to_owned())
        .collect();
    let expected: BTreeSet<String> = (0..10_100).map(|i| format!("k{i}")).collect();
    assert_eq!(
        keys.len(),
        expected.len(),
        "records lost while the broker was away: {}",
        laminar.stderr()
    );
    assert_eq!(keys, expected, "records lost while the broker was away");
    laminar.signal("TERM");
    assert!(
        laminar.wait(Duration::from_secs(30)).success(),
        "{}",
        laminar.stderr()
    );
}

#[test]
fn kafka_quickstart_runs_on_the_embedded_broker_and_stops_on_sigterm() {
    let dir = TempDir::new("quickstart");
    let mut laminar = Running::start(
        &["run", "pipelines/quickstart.yaml", "--embedded-broker"],
        &[],
        &dir,
    );
    let lines = laminar.read_lines(3, Duration::from_mins(1));
    assert_eq!(lines.len(), 3, "{}", laminar.stderr());
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["price_usd"].as_f64().unwrap() > 100.0, "{line}");
        assert!(v["date_time"].as_str().unwrap().ends_with('Z'));
    }
    laminar.signal("INT");
    assert!(
        laminar.wait(Duration::from_secs(30)).success(),
        "{}",
        laminar.stderr()
    );
}

#[test]
fn kafka_roundtrip_on_tansu_when_installed() {
    let Some(broker) = Broker::tansu().unwrap() else {
        eprintln!(
            "tansu is not installed; skipping (cargo install tansu --locked --features dynostore,libsql)"
        );
        return;
    };
    for topic in ["bids", "priced", "bids-dlq"] {
        broker.create_topic(topic, 2).unwrap();
    }
    produce(
        broker.bootstrap(),
        "bids",
        &[(None, Some("k0"), r#"{"auction": 1, "price": 3}"#)],
    )
    .unwrap();
    let dir = TempDir::new("tansu");
    let file = pipeline(&dir, broker.bootstrap());
    let mut laminar = Running::start(&["run", &file], &[], &dir);
    let out = consume(broker.bootstrap(), "priced", 1, QUIET, TIMEOUT).unwrap();
    laminar.signal("TERM");
    assert!(
        laminar.wait(Duration::from_secs(30)).success(),
        "{}",
        laminar.stderr()
    );
    assert_eq!(out.len(), 1);
    assert_eq!(json(&out[0])["doubled"], 6);
}

fn window_pipeline(dir: &TempDir, source: &str) -> String {
    let text = format!(
        r"pipeline: kafka-windows
kafka:
  bootstrap_servers: ${{KAFKA_BOOTSTRAP:-127.0.0.1:9}}
sources:
  - name: clicks
{source}
    schema: {{ user_id: BIGINT, ts: BIGINT }}
    event_time: {{ column: ts, idle_timeout_ms: 1000 }}
queries:
  - name: per_user
    sql: |
      SELECT user_id, window_start, window_end, COUNT(*) AS clicks, MAX(ts) AS last_ts
      FROM TUMBLE(clicks, ts, INTERVAL '1' SECOND)
      GROUP BY user_id, window_start, window_end
sinks:
  - {{ name: out, from: per_user, connector: stdout }}
state:
  checkpoint_interval_ms: 200
"
    );
    dir.write(&format!("windows-{}.yaml", text.len()), &text)
        .to_string_lossy()
        .into_owned()
}

/// The window pipeline over `lines` read from a file: its output lines, sorted, except
/// those holding `far_future` (windows a Kafka run never sees closed).
fn file_windows(dir: &TempDir, name: &str, lines: &[String], far_future: &str) -> Vec<String> {
    let input = dir.write(name, &(lines.join("\n") + "\n"));
    let file_pipeline = window_pipeline(
        dir,
        &format!("    connector: file\n    path: {}", input.display()),
    );
    let (code, file_out, stderr) = support::laminar(&["run", &file_pipeline], &[]);
    assert_eq!(code, 0, "{stderr}");
    let mut expected: Vec<String> = file_out
        .lines()
        .filter(|l| !l.contains(far_future))
        .map(str::to_owned)
        .collect();
    expected.sort_unstable();
    assert!(expected.len() > 100, "{file_out}");
    expected
}

/// Runs `pipeline` until it printed `n` lines, then stops it with SIGTERM; returns the
/// lines, sorted, and its stderr.
fn run_until(pipeline: &str, bootstrap: &str, dir: &TempDir, n: usize) -> (Vec<String>, String) {
    let mut laminar = Running::start(&["run", pipeline], &[("KAFKA_BOOTSTRAP", bootstrap)], dir);
    let mut got = laminar.read_lines(n, TIMEOUT);
    laminar.signal("TERM");
    assert!(
        laminar.wait(Duration::from_secs(30)).success(),
        "{}",
        laminar.stderr()
    );
    got.sort_unstable();
    (got, laminar.stderr())
}

#[test]
fn kafka_windows_over_partitions_match_the_file_source_and_idle_partitions_release() {
    let broker = Broker::in_process().unwrap();
    broker.create_topic("clicks", 3).unwrap();
    // 600 clicks of 12 users over 3 partitions (user % 3), in time order per partition.
    let mut lines = Vec::new();
    let mut records = Vec::new();
    for i in 0..600_i64 {
        let user = i % 12;
        let value = format!(
            r#"{{"user_id": {user}, "ts": {}}}"#,
            1_700_000_000_000 + i * 17
        );
        records.push((Some((user % 3) as i32), None, value.clone()));
        lines.push(value);
    }
    // Then partitions 0 and 1 move far ahead; partition 2 falls silent. Only the idle
    // timeout lets the watermark pass partition 2 and close the windows.
    for (p, user) in [(0, 0_i64), (1, 1)] {
        let value = format!(r#"{{"user_id": {user}, "ts": {}}}"#, 1_700_000_100_000_i64);
        records.push((Some(p), None, value.clone()));
        lines.push(value);
    }
    let refs: Vec<_> = records
        .iter()
        .map(|(p, k, v)| (*p, *k, v.as_str()))
        .collect();
    produce(broker.bootstrap(), "clicks", &refs).unwrap();

    let dir = TempDir::new("windows");
    // The file run closes every window at the end; the Kafka run closes those the
    // watermark passed: all but the two far-future ones.
    let expected = file_windows(&dir, "clicks.jsonl", &lines, "1700000100000");
    let kafka_pipeline = window_pipeline(
        &dir,
        "    connector: kafka\n    topic: clicks\n    group_id: windows\n    start_from: earliest",
    );
    let (got, stderr) = run_until(&kafka_pipeline, broker.bootstrap(), &dir, expected.len());
    assert_eq!(got, expected, "{stderr}");
}

#[test]
fn kafka_late_records_go_to_the_late_data_topic() {
    let broker = Broker::in_process().unwrap();
    for topic in ["events", "counts", "late"] {
        broker.create_topic(topic, 1).unwrap();
    }
    let dir = TempDir::new("late");
    let file = dir.write(
        "late.yaml",
        &format!(
            r"pipeline: late-test
kafka: {{ bootstrap_servers: {} }}
sources:
  - name: events
    connector: kafka
    topic: events
    schema: {{ id: BIGINT, ts: BIGINT }}
    event_time: {{ column: ts }}
queries:
  - name: counts
    sql: SELECT window_start, COUNT(*) AS n FROM TUMBLE(events, ts, INTERVAL '1' SECOND) GROUP BY window_start
    late_data_topic: late
sinks:
  - {{ name: out, from: counts, connector: kafka, topic: counts }}
",
            broker.bootstrap()
        ),
    );
    let mut laminar = Running::start(&["run", &file.to_string_lossy()], &[], &dir);
    produce(
        broker.bootstrap(),
        "events",
        &[
            (None, None, r#"{"id": 1, "ts": 100}"#),
            (None, None, r#"{"id": 2, "ts": 5000}"#),
        ],
    )
    .unwrap();
    // Window [0, 1 s) closes once ts 5000 is seen: then ts 200 is late.
    let counts = consume(broker.bootstrap(), "counts", 1, Duration::ZERO, TIMEOUT).unwrap();
    assert_eq!(json(&counts[0])["n"], 1);
    produce(
        broker.bootstrap(),
        "events",
        &[(None, None, r#"{"id": 3, "ts": 200}"#)],
    )
    .unwrap();
    let late = consume(broker.bootstrap(), "late", 1, QUIET, TIMEOUT).unwrap();
    laminar.signal("TERM");
    assert!(
        laminar.wait(Duration::from_secs(30)).success(),
        "{}",
        laminar.stderr()
    );
    assert_eq!(late.len(), 1, "{}", laminar.stderr());
    assert_eq!(json(&late[0])["id"], 3);
    assert!(
        late[0]
            .headers
            .iter()
            .any(|(k, v)| k == "laminar.late" && v.contains("window closed")),
        "{:?}",
        late[0].headers
    );
    assert!(
        laminar.stderr().contains("records_late=1"),
        "{}",
        laminar.stderr()
    );
}

#[test]
fn kafka_alignment_pauses_a_partition_far_ahead_and_loses_nothing() {
    let broker = Broker::in_process().unwrap();
    broker.create_topic("skewed", 2).unwrap();
    // Partition 1 starts 100 s ahead of partition 0; both end on a far-future record
    // that closes every window before it.
    let (t0, n) = (1_700_000_000_000_i64, 20_000_i64);
    let mut records = Vec::new();
    let mut lines: Vec<(i64, String)> = Vec::new();
    for (partition, offset) in [(0, 0), (1, 100_000)] {
        for i in 0..n {
            let value = format!(r#"{{"user_id": {}, "ts": {}}}"#, i % 5, t0 + offset + i * 7);
            records.push((Some(partition), None, value.clone()));
            lines.push((t0 + offset + i * 7, value));
        }
    }
    lines.sort_by_key(|(ts, _)| *ts);
    let mut lines: Vec<String> = lines.into_iter().map(|(_, v)| v).collect();
    for partition in [0, 1] {
        let value = format!(r#"{{"user_id": 9, "ts": {}}}"#, t0 + 1_000_000);
        records.push((Some(partition), None, value.clone()));
        lines.push(value);
    }
    let refs: Vec<_> = records
        .iter()
        .map(|(p, k, v)| (*p, *k, v.as_str()))
        .collect();
    produce(broker.bootstrap(), "skewed", &refs).unwrap();

    let dir = TempDir::new("alignment");
    // The file holds the same records in event-time order: nothing is late there.
    let expected = file_windows(&dir, "skewed.jsonl", &lines, &(t0 + 1_000_000).to_string());

    // Alignment on, and small fetches, so that the consumer reads both partitions a
    // little at a time.
    let kafka_pipeline = window_pipeline(
        &dir,
        "    connector: kafka\n    topic: skewed\n    group_id: aligned\n    start_from: earliest",
    );
    let text = std::fs::read_to_string(&kafka_pipeline)
        .unwrap()
        .replace(
            "event_time: { column: ts, idle_timeout_ms: 1000 }",
            "event_time: { column: ts, idle_timeout_ms: 1000, max_drift_ms: 5000 }",
        )
        .replace(
            "kafka:\n",
            "kafka:\n  properties:\n    max.partition.fetch.bytes: \"2048\"\n",
        );
    assert!(text.contains("max_drift_ms") && text.contains("max.partition.fetch.bytes"));
    let kafka_pipeline = dir
        .write("aligned.yaml", &text)
        .to_string_lossy()
        .into_owned();
    let (got, stderr) = run_until(&kafka_pipeline, broker.bootstrap(), &dir, expected.len());
    assert_eq!(got, expected, "{stderr}");
    let pauses: u64 = stderr
        .split("alignment_pauses=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no alignment_pauses in {stderr}"));
    eprintln!("alignment paused partitions {pauses} times");
    assert!(pauses >= 1, "partition 1 was never paused: {stderr}");
}

/// A produce request refused for good in the middle of an epoch's transaction: laminar
/// aborts the transaction, reads its topic back and sends what it does not hold, in a
/// new transaction, without stopping; every row comes out once, and the aborts are
/// counted. (The mock cluster shows aborted records to `read_committed` readers; the
/// read-back sees them the same way, so a batch that landed before the abort is not
/// sent twice, and one that was refused is sent again.)
#[test]
fn kafka_a_refused_produce_aborts_the_transaction_and_sends_the_rest_again() {
    refused_produce(true);
}

/// The same without transactions: the failed records are found missing by the
/// read-back and sent again; nothing is sent twice.
#[test]
fn kafka_a_refused_produce_without_transactions_sends_the_rest_again() {
    refused_produce(false);
}

fn refused_produce(transactions: bool) {
    let broker = Broker::in_process().unwrap();
    for topic in ["events", "copied"] {
        broker.create_topic(topic, 4).unwrap();
    }
    let n = 2000_usize;
    let values: Vec<String> = (0..n).map(|i| format!(r#"{{"id": {i}}}"#)).collect();
    let records: Vec<_> = values
        .iter()
        .enumerate()
        .map(|(i, v)| (Some((i % 4) as i32), None, v.as_str()))
        .collect();
    produce(broker.bootstrap(), "events", &records).unwrap();
    // Only laminar produces from here on: its first two produce requests are refused.
    let refused = rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED;
    broker.push_request_errors(0, &[refused, refused]);
    let dir = TempDir::new("kafka-abort");
    let sink = format!("    delivery: exactly_once\n    transactions: {transactions}");
    let file = Passthrough {
        name: "abort-test",
        bootstrap: broker.bootstrap(),
        topic: "copied",
        sink: &sink,
        ..Passthrough::default()
    }
    .write(&dir, "pipeline.yaml");
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let mut laminar = Running::start(&["run", &file, "--metrics-addr", &addr], &[], &dir);
    let out = consume(broker.bootstrap(), "copied", n, QUIET, TIMEOUT).unwrap();
    let mut ids: Vec<i64> = out
        .iter()
        .map(|r| json(r)["id"].as_i64().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        (0..n as i64).collect::<Vec<_>>(),
        "{}",
        laminar.stderr()
    );
    // The order within a partition is not checked: the mock cluster neither rejects a
    // batch whose sequence number skips a refused one nor hides aborted records, so
    // records sent again land after later ones there. (A broker that does both keeps
    // the prefix a partition holds in order: an aborted transaction is sent again
    // whole, and without transactions the producer stops at a refused record instead of
    // leaving a gap.)
    assert!(
        laminar.is_running(),
        "the run stopped: {}",
        laminar.stderr()
    );
    let metrics = support::get(&addr, "/metrics").unwrap().1;
    let series = |name: &str| {
        support::sample(
            &metrics,
            &format!(r#"{name}{{pipeline="abort-test",sink="out"}}"#),
        )
        .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    };
    let aborted = series("laminar_sink_transactions_aborted_total");
    eprintln!("transactions aborted: {aborted}");
    if transactions {
        // One abort per failed try: a refused request fails one (two may fail the same
        // one), and librdkafka may refuse to commit the next try with "skipped sequence
        // numbers" after a purge. At most 4, as the fifth try would be the last.
        assert!(
            (1.0..=4.0).contains(&aborted),
            "aborted {aborted}:\n{}",
            laminar
                .stderr()
                .lines()
                .filter(|l| l.contains("failed ("))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(series("laminar_sink_transactions_committed_total") >= 1.0);
    } else {
        assert!(aborted < 0.5, "aborted {aborted} without transactions");
    }
    assert!(
        laminar
            .stderr()
            .contains("its transaction (if any) is aborted"),
        "{}",
        laminar.stderr()
    );
    laminar.signal("TERM");
    assert!(
        laminar.wait(Duration::from_secs(30)).success(),
        "{}",
        laminar.stderr()
    );
}

/// The count in a `key=N` field of a log line (the last such line).
fn logged_count(stderr: &str, key: &str) -> Option<u64> {
    let pattern = format!("{key}=");
    stderr.lines().rev().find_map(|l| {
        let rest = &l[l.find(&pattern)? + pattern.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    })
}

#[test]
fn kafka_a_full_producer_queue_pauses_only_the_sources_feeding_it() {
    let broker = Broker::in_process_with_relay().unwrap();
    broker.create_topic("out", 1).unwrap();
    let dir = TempDir::new("backpressure");
    let side = dir.path("side.jsonl");
    // A producer queue of 50 records fills within milliseconds of the broker going away.
    let file = dir.write(
        "pipeline.yaml",
        &format!(
            "pipeline: bp\nkafka:\n  bootstrap_servers: {}\n  properties:\n    queue.buffering.max.messages: \"50\"\nsources:\n  - {{ name: fast, connector: datagen, table: bid, rate_per_s: 5000 }}\n  - {{ name: slow, connector: datagen, table: bid, rate_per_s: 200, seed: 7 }}\nqueries:\n  - {{ name: q, sql: \"SELECT auction, price FROM fast\" }}\n  - {{ name: s, sql: \"SELECT auction FROM slow\" }}\nsinks:\n  - {{ name: out, from: q, connector: kafka, topic: out }}\n  - {{ name: side, from: s, connector: file, path: {} }}\nstate:\n  checkpoint_interval_ms: 60000\n",
            broker.bootstrap(),
            side.display()
        ),
    );
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let mut laminar = Running::start(
        &["run", &file.to_string_lossy(), "--metrics-addr", &addr],
        &[("RUST_LOG", "info")],
        &dir,
    );
    let metric = |series: &str| {
        support::get(&addr, "/metrics").and_then(|(_, body)| support::sample(&body, series))
    };
    let fast_in = r#"laminar_source_records_total{pipeline="bp",source="fast"}"#;
    let held = r#"laminar_sink_held_records{pipeline="bp",sink="out"}"#;
    let paused = r#"laminar_source_backpressure_seconds_total{pipeline="bp",source="fast"}"#;
    let started = Instant::now();
    while metric(fast_in).unwrap_or(0.0) < 2000.0 {
        assert!(started.elapsed() < TIMEOUT, "{}", laminar.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }

    broker.set_reachable(false);
    std::thread::sleep(Duration::from_secs(3));
    assert!(metric(held).unwrap() > 0.0, "{}", laminar.stderr());
    let (fast_before, paused_before) = (metric(fast_in).unwrap(), metric(paused).unwrap());
    let slow_in = r#"laminar_source_records_total{pipeline="bp",source="slow"}"#;
    let slow_before = metric(slow_in).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // The source feeding the stalled sink is not read; the other goes on, and the
    // pipeline thread keeps counting the pause.
    assert!(
        metric(fast_in).unwrap() <= fast_before,
        "the paused source was read: {}",
        laminar.stderr()
    );
    assert!(
        metric(paused).unwrap() >= paused_before + 1.5,
        "{}",
        laminar.stderr()
    );
    let slow_after = metric(slow_in).unwrap();
    assert!(
        slow_after >= slow_before + 200.0,
        "the other source stalled too: {slow_before} -> {slow_after} records"
    );

    broker.set_reachable(true);
    let resumed = Instant::now();
    while metric(fast_in).unwrap() <= fast_before || metric(held).unwrap() > 0.0 {
        assert!(resumed.elapsed() < TIMEOUT, "{}", laminar.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    laminar.signal("TERM");
    assert!(
        laminar.wait(Duration::from_secs(30)).success(),
        "{}",
        laminar.stderr()
    );
    let stderr = laminar.stderr();
    let records_out = logged_count(&stderr, "records_out").unwrap();
    let side_rows = support::read(&side).lines().count() as u64;
    let out = consume(
        broker.bootstrap(),
        "out",
        usize::try_from(records_out - side_rows).unwrap(),
        QUIET,
        TIMEOUT,
    )
    .unwrap();
    assert_eq!(
        out.len() as u64,
        records_out - side_rows,
        "records held back were lost: {stderr}"
    );
}
