//! Avro end to end: laminar as a separate process reading and writing Avro on a real
//! Kafka-protocol broker (the mock cluster in this process), with the schema registry of
//! `testcontainers/` speaking the Confluent REST API; producers and consumers here use
//! apache-avro and the registry, as other clients of the topics would.

#![allow(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use apache_avro::Schema;
use apache_avro::types::Value as Avro;
use laminar_connectors::format::avro::{
    RegistryClient, RegistryOptions, wire_header, wire_schema_id,
};
use laminar_testcontainers::registry::SchemaRegistry;
use laminar_testcontainers::{Broker, Message, consume, produce_messages};
use serde_json::json;
use support::{Running, TempDir};

const QUIET: Duration = Duration::from_millis(1500);
const TIMEOUT: Duration = Duration::from_mins(1);

fn client(registry: &SchemaRegistry) -> RegistryClient {
    RegistryClient::new(&RegistryOptions {
        url: registry.url(),
        username: None,
        password: None,
        timeout: Duration::from_secs(5),
    })
    .unwrap()
}

fn datum(schema: &Schema, value: Avro) -> Vec<u8> {
    apache_avro::writer::datum::GenericDatumWriter::builder(schema)
        .build()
        .unwrap()
        .write_value_to_vec(value)
        .unwrap()
}

fn read(schema: &Schema, mut bytes: &[u8]) -> Avro {
    let v = apache_avro::reader::datum::GenericDatumReader::builder(schema)
        .build()
        .unwrap()
        .read_value(&mut bytes)
        .unwrap();
    assert!(bytes.is_empty(), "bytes left after the datum");
    v
}

/// Decodes a Confluent-framed message with the schema the registry has for its id.
fn decode_framed(registry: &RegistryClient, bytes: &[u8]) -> BTreeMap<String, Avro> {
    let id = wire_schema_id(bytes).unwrap();
    let schema = registry.schema_by_id(id).unwrap();
    match read(&schema, &bytes[5..]) {
        Avro::Record(fields) => fields.into_iter().collect(),
        other => BTreeMap::from([("value".to_owned(), other)]),
    }
}

fn click_v1() -> serde_json::Value {
    json!({"type": "record", "name": "Click", "namespace": "shop", "fields": [
        {"name": "user", "type": "string"},
        {"name": "page", "type": "string"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}}
    ]})
}

/// v1 plus an optional field with a default: BACKWARD compatible.
fn click_v2() -> serde_json::Value {
    let mut v2 = click_v1();
    v2["fields"].as_array_mut().unwrap().push(json!(
        {"name": "referrer", "type": ["null", "string"], "default": null}
    ));
    v2
}

fn click(schema: &Schema, id: u32, user: &str, ts: i64, referrer: Option<&str>) -> Message {
    let mut fields = vec![
        ("user".to_owned(), Avro::String(user.into())),
        ("page".to_owned(), Avro::String("/home".into())),
        ("ts".to_owned(), Avro::TimestampMillis(ts)),
    ];
    // v2 has `referrer`; v1 does not.
    if let Schema::Record(r) = schema
        && r.fields.len() == 4
    {
        let referrer = referrer.map_or(Avro::Union(0, Box::new(Avro::Null)), |r| {
            Avro::Union(1, Box::new(Avro::String(r.into())))
        });
        fields.push(("referrer".to_owned(), referrer));
    }
    let mut value = wire_header(id).to_vec();
    value.extend(datum(schema, Avro::Record(fields)));
    Message {
        partition: Some(i32::from(user.as_bytes()[0] % 2)),
        value,
        ..Message::default()
    }
}

/// A click an hour ahead in every partition: the watermark passes every window before.
fn far_ahead(schema: &Schema, id: u32, base: i64) -> Vec<Message> {
    (0..2)
        .map(|p| Message {
            partition: Some(p),
            ..click(schema, id, "zed", base + 3_600_000, None)
        })
        .collect()
}

fn registry_pipeline(dir: &TempDir, bootstrap: &str, registry: &str) -> String {
    let text = format!(
        r"pipeline: avro-test
kafka:
  bootstrap_servers: {bootstrap}
schema_registry:
  url: {registry}
sources:
  - name: clicks
    connector: kafka
    topic: clicks
    format: avro
    event_time: {{ column: ts }}
    dead_letter_topic: clicks-dlq
queries:
  - name: per_user
    sql: |
      SELECT user, window_start, window_end, COUNT(*) AS clicks
      FROM TUMBLE(clicks, ts, INTERVAL '10' SECOND)
      GROUP BY user, window_start, window_end
sinks:
  - name: out
    from: per_user
    connector: kafka
    topic: click-counts
    format: avro
    key: [user]
    key_format: avro
state:
  checkpoint_interval_ms: 200
"
    );
    dir.write("pipeline.yaml", &text).display().to_string()
}

#[test]
fn avro_round_trips_through_the_registry_and_follows_schema_evolution() {
    let broker = Broker::in_process().unwrap();
    for (topic, partitions) in [("clicks", 2), ("click-counts", 2), ("clicks-dlq", 1)] {
        broker.create_topic(topic, partitions).unwrap();
    }
    let registry = SchemaRegistry::start().unwrap();
    let sr = client(&registry);
    let v1_json = click_v1();
    let v1 = Schema::parse_str(&v1_json.to_string()).unwrap();
    let v1_id = sr.register("clicks-value", &v1_json).unwrap();

    // 300 clicks written with v1 before laminar starts: users a..e, 10 s windows.
    let users = ["ann", "bob", "cy", "dee", "eve"];
    let mut expected: BTreeMap<(String, i64), i64> = BTreeMap::new();
    let mut messages = Vec::new();
    for i in 0..300_i64 {
        let user = users[(i % 5) as usize];
        let ts = 1_700_000_000_000 + i * 100;
        *expected
            .entry((user.into(), ts - ts.rem_euclid(10_000)))
            .or_default() += 1;
        messages.push(click(&v1, v1_id, user, ts, None));
    }
    produce_messages(broker.bootstrap(), "clicks", &messages).unwrap();

    let dir = TempDir::new("avro");
    let file = registry_pipeline(&dir, broker.bootstrap(), &registry.url());
    let mut running = Running::start(&["run", &file], &[], &dir);
    running.wait_for_log("pipeline running", TIMEOUT);

    // The producer evolves its schema mid-stream: laminar reads v2 records (an added
    // field it does not know) without a restart.
    let v2_json = click_v2();
    let v2 = Schema::parse_str(&v2_json.to_string()).unwrap();
    let v2_id = sr.register("clicks-value", &v2_json).unwrap();
    assert_ne!(v1_id, v2_id);
    let mut messages = Vec::new();
    for i in 300..500_i64 {
        let user = users[(i % 5) as usize];
        let ts = 1_700_000_000_000 + i * 100;
        *expected
            .entry((user.into(), ts - ts.rem_euclid(10_000)))
            .or_default() += 1;
        messages.push(click(&v2, v2_id, user, ts, Some("ad")));
    }
    // A record naming a schema id the registry does not have, and one not in the wire
    // format at all: both dead-lettered, with the reason; nothing else is lost.
    let mut unknown = wire_header(9999).to_vec();
    unknown.extend(datum(
        &v1,
        Avro::Record(vec![
            ("user".into(), Avro::String("ann".into())),
            ("page".into(), Avro::String("/".into())),
            ("ts".into(), Avro::TimestampMillis(1_700_000_000_000)),
        ]),
    ));
    messages.push(Message {
        partition: Some(0),
        value: unknown,
        ..Message::default()
    });
    messages.push(Message {
        partition: Some(1),
        value: br#"{"user":"ann"}"#.to_vec(),
        ..Message::default()
    });
    messages.extend(far_ahead(&v2, v2_id, 1_700_000_000_000));
    produce_messages(broker.bootstrap(), "clicks", &messages).unwrap();

    let out = consume(
        broker.bootstrap(),
        "click-counts",
        expected.len(),
        QUIET,
        TIMEOUT,
    )
    .unwrap();
    let dlq = consume(broker.bootstrap(), "clicks-dlq", 2, QUIET, TIMEOUT).unwrap();
    running.stop();

    let mut got: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for r in &out {
        let v = decode_framed(&sr, &r.value_bytes);
        let Avro::String(user) = &v["user"] else {
            panic!("user: {:?}", v["user"])
        };
        let Avro::TimestampMillis(start) = v["window_start"] else {
            panic!("window_start: {:?}", v["window_start"])
        };
        let Avro::Long(clicks) = v["clicks"] else {
            panic!("clicks: {:?}", v["clicks"])
        };
        assert!(
            got.insert((user.clone(), start), clicks).is_none(),
            "window emitted twice: {user} {start}"
        );
        // The key is the Avro key schema's datum of the user.
        let key = decode_framed(&sr, r.key_bytes.as_deref().unwrap());
        assert_eq!(key["value"], Avro::String(user.clone()));
    }
    assert_eq!(got, expected);
    // Both output subjects are registered: value fields as the query's columns.
    let value_schema = sr.latest("click-counts-value").unwrap().schema;
    let Schema::Record(record) = &*value_schema else {
        panic!("{value_schema:?}")
    };
    let names: Vec<&str> = record.fields.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["user", "window_start", "window_end", "clicks"]);
    assert!(matches!(
        *sr.latest("click-counts-key").unwrap().schema,
        Schema::String
    ));

    // Another pipeline reads the output back: Avro keys (the key subject's schema, a
    // single string, as column `_key_value`) and values, columns from the registry.
    let back = dir.write(
        "back.yaml",
        &format!(
            r"pipeline: avro-back
kafka:
  bootstrap_servers: {}
schema_registry:
  url: {}
sources:
  - name: counts
    connector: kafka
    topic: click-counts
    format: avro
    key_format: avro
queries:
  - name: keyed
    sql: SELECT _key_value AS k, user, clicks FROM counts
sinks:
  - {{ name: out, from: keyed, connector: file, path: {} }}
",
            broker.bootstrap(),
            registry.url(),
            dir.path("back.jsonl").display()
        ),
    );
    let back = back.display().to_string();
    let reader_dir = TempDir::new("avro-back");
    let mut reader = Running::start(&["run", &back], &[], &reader_dir);
    let deadline = Instant::now() + TIMEOUT;
    let lines = loop {
        let text = std::fs::read_to_string(dir.path("back.jsonl")).unwrap_or_default();
        if text.lines().count() >= out.len() || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    reader.stop();
    let mut read_back: BTreeMap<String, i64> = BTreeMap::new();
    for line in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["k"], v["user"], "{line}");
        *read_back
            .entry(v["user"].as_str().unwrap().to_owned())
            .or_default() += v["clicks"].as_i64().unwrap();
    }
    let mut per_user: BTreeMap<String, i64> = BTreeMap::new();
    for ((user, _), n) in &expected {
        *per_user.entry(user.clone()).or_default() += n;
    }
    assert_eq!(read_back, per_user);

    let mut reasons: Vec<String> = dlq
        .iter()
        .map(|r| r.header("laminar.error").unwrap().to_owned())
        .collect();
    reasons.sort();
    assert!(
        reasons[0].contains("not in the Confluent Avro wire format"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("schema id 9999 is not in the schema registry"),
        "{reasons:?}"
    );
}

#[test]
fn a_registry_that_stops_answering_holds_records_and_loses_none() {
    let broker = Broker::in_process().unwrap();
    for (topic, partitions) in [("clicks", 2), ("click-counts", 2), ("clicks-dlq", 1)] {
        broker.create_topic(topic, partitions).unwrap();
    }
    let registry = SchemaRegistry::start().unwrap();
    let sr = client(&registry);
    let v1 = Schema::parse_str(&click_v1().to_string()).unwrap();
    let v1_id = sr.register("clicks-value", &click_v1()).unwrap();
    let dir = TempDir::new("avro-down");
    let file = registry_pipeline(&dir, broker.bootstrap(), &registry.url());
    let mut running = Running::start(&["run", &file], &[], &dir);
    running.wait_for_log("pipeline running", TIMEOUT);

    // While the registry answers 503, records of a schema id laminar has not seen wait.
    let v2 = Schema::parse_str(&click_v2().to_string()).unwrap();
    let v2_id = sr.register("clicks-value", &click_v2()).unwrap();
    registry.set_available(false);
    let base = 1_700_000_000_000;
    let mut messages: Vec<Message> = (0..50)
        .map(|i| click(&v2, v2_id, "ann", base + i, Some("x")))
        .collect();
    messages.extend((0..50).map(|i| click(&v1, v1_id, "bob", base + i, None)));
    messages.extend(far_ahead(&v1, v1_id, base));
    produce_messages(broker.bootstrap(), "clicks", &messages).unwrap();
    let log = running.wait_for_log("holding the record", TIMEOUT);
    assert!(log.contains("holding the record"), "{log}");
    let early = consume(
        broker.bootstrap(),
        "click-counts",
        0,
        QUIET,
        Duration::from_secs(3),
    )
    .unwrap();
    let early_ann = early
        .iter()
        .filter(|r| decode_framed(&sr, &r.value_bytes)["user"] == Avro::String("ann".into()))
        .count();
    assert_eq!(early_ann, 0, "ann's window closed without the held records");

    registry.set_available(true);
    let out = consume(broker.bootstrap(), "click-counts", 2, QUIET, TIMEOUT).unwrap();
    running.stop();
    let counts: BTreeMap<String, i64> = out
        .iter()
        .map(|r| {
            let v = decode_framed(&sr, &r.value_bytes);
            let (Avro::String(u), Avro::Long(c)) = (&v["user"], &v["clicks"]) else {
                panic!("{v:?}")
            };
            (u.clone(), *c)
        })
        .collect();
    assert_eq!(
        counts,
        BTreeMap::from([("ann".into(), 50), ("bob".into(), 50)])
    );
    let dlq = consume(
        broker.bootstrap(),
        "clicks-dlq",
        0,
        QUIET,
        Duration::from_secs(2),
    )
    .unwrap();
    assert!(
        dlq.is_empty(),
        "records were dead-lettered while the registry was away: {dlq:?}"
    );
}

#[test]
fn an_incompatible_output_schema_stops_the_run_with_the_registrys_reason() {
    let broker = Broker::in_process().unwrap();
    for topic in ["clicks", "click-counts", "clicks-dlq"] {
        broker.create_topic(topic, 1).unwrap();
    }
    let registry = SchemaRegistry::start().unwrap();
    let sr = client(&registry);
    sr.register("clicks-value", &click_v1()).unwrap();
    // An earlier, unrelated schema on the output subject: the derived one cannot read it.
    sr.register(
        "click-counts-value",
        &json!({"type": "record", "name": "Old", "fields": [{"name": "legacy", "type": "int"}]}),
    )
    .unwrap();
    let dir = TempDir::new("avro-incompatible");
    let file = registry_pipeline(&dir, broker.bootstrap(), &registry.url());
    let (code, _, stderr) = support::laminar(&["run", &file], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("registering subject `click-counts-value`"),
        "{stderr}"
    );
    assert!(stderr.contains("incompatible"), "{stderr}");
}

#[test]
fn plain_avro_keys_headers_and_timestamps_pass_through() {
    let broker = Broker::in_process().unwrap();
    for (topic, partitions) in [("events", 2), ("events-out", 1)] {
        broker.create_topic(topic, partitions).unwrap();
    }
    let schema_json = json!({"type": "record", "name": "Ev", "fields": [
        {"name": "n", "type": "long"}, {"name": "kind", "type": "string"}]});
    let schema = Schema::parse_str(&schema_json.to_string()).unwrap();
    let dir = TempDir::new("avro-plain");
    let file = dir.write(
        "pipeline.yaml",
        &format!(
            r"pipeline: avro-plain
kafka:
  bootstrap_servers: {}
sources:
  - name: events
    connector: kafka
    topic: events
    format: avro
    avro_schema: '{schema_json}'
    key_format: json
    key_schema: {{ account: BIGINT }}
    metadata_columns: [timestamp]
    headers: {{ trace-id: trace }}
    event_time: {{ column: _timestamp }}
queries:
  - name: q
    sql: SELECT account, n, kind, trace, _timestamp AS at FROM events WHERE n >= 0
sinks:
  - name: out
    from: q
    connector: kafka
    topic: events-out
    format: avro
    key: [account]
    headers: {{ trace-id: trace }}
    timestamp: at
state:
  checkpoint_interval_ms: 200
",
            broker.bootstrap()
        ),
    );
    let file = file.display().to_string();
    // `explain` prints the schema the sink writes: readers of the topic use it.
    let (code, explained, stderr) = support::laminar(&["explain", &file], &[]);
    assert_eq!(code, 0, "{stderr}");
    let line = explained
        .lines()
        .find(|l| l.contains("avro value schema"))
        .unwrap();
    let out_schema = Schema::parse_str(&line[line.find(": {").unwrap() + 2..]).unwrap();

    let mut messages = Vec::new();
    for i in 0..60_i64 {
        let n = if i == 7 { -1 } else { i };
        messages.push(Message {
            partition: Some((i % 2) as i32),
            key: (i != 11).then(|| format!(r#"{{"account": {}}}"#, i % 3).into_bytes()),
            value: datum(
                &schema,
                Avro::Record(vec![
                    ("n".into(), Avro::Long(n)),
                    ("kind".into(), Avro::String(format!("k{}", i % 4))),
                ]),
            ),
            headers: if i % 5 == 0 {
                Vec::new()
            } else {
                vec![("trace-id".into(), format!("t{i}"))]
            },
            timestamp: Some(1_700_000_000_000 + i),
        });
    }
    produce_messages(broker.bootstrap(), "events", &messages).unwrap();
    let mut running = Running::start(&["run", &file], &[], &dir);
    // Record 7 is filtered by the query, record 11 (no key, account NOT NULL) rejected.
    let out = consume(broker.bootstrap(), "events-out", 58, QUIET, TIMEOUT).unwrap();
    running.stop();
    assert_eq!(out.len(), 58);
    for r in &out {
        let Avro::Record(fields) = read(&out_schema, &r.value_bytes) else {
            panic!()
        };
        let v: BTreeMap<String, Avro> = fields.into_iter().collect();
        let Avro::Long(n) = v["n"] else {
            panic!("{v:?}")
        };
        assert!(n != 7 && n != 11 && n >= 0);
        assert_eq!(v["account"], Avro::Long(n % 3));
        assert_eq!(r.key.as_deref(), Some((n % 3).to_string().as_str()));
        assert_eq!(r.timestamp, Some(1_700_000_000_000 + n));
        assert_eq!(v["at"], Avro::TimestampMillis(1_700_000_000_000 + n));
        let trace = r
            .headers
            .iter()
            .find(|(k, _)| k == "trace-id")
            .map(|(_, v)| v.clone());
        if n % 5 == 0 {
            assert_eq!(v["trace"], Avro::Union(0, Box::new(Avro::Null)));
            assert_eq!(trace, None);
        } else {
            assert_eq!(
                v["trace"],
                Avro::Union(1, Box::new(Avro::String(format!("t{n}"))))
            );
            assert_eq!(trace, Some(format!("t{n}")));
        }
    }
}

#[test]
fn validate_leaves_registry_columns_to_the_run_and_says_so() {
    let dir = TempDir::new("avro-validate");
    let file = registry_pipeline(&dir, "127.0.0.1:1", "http://127.0.0.1:1");
    let (code, _, stderr) = support::laminar(&["validate", &file], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("note: the columns of `clicks` come from the schema registry"),
        "{stderr}"
    );
}
