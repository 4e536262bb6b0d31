//! EMIT EVERY and allowed lateness, driven through the operator API with explicit
//! watermarks and clock ticks (the golden files cover the other policies end to end).

#![allow(
    clippy::unwrap_used,
    reason = "a test that cannot unwrap should fail loudly"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{AsArray, Int64Array, RecordBatch, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, TimeUnit};
use laminar::operator::Operator;
use laminar::{config, sql};

fn operator(sql_text: &str, extra: &str) -> Box<dyn Operator> {
    let yaml = format!(
        "pipeline: emit\nsources:\n  - name: events\n    connector: file\n    path: unused\n    schema: {{ key: BIGINT, ts: TIMESTAMP }}\n    event_time: {{ column: ts }}\nqueries:\n  - name: q\n    sql: |\n      {sql_text}\n{extra}sinks:\n  - {{ name: out, from: q, connector: stdout }}\n"
    );
    let config = config::parse("emit.yaml", &yaml, &|_| None).unwrap();
    sql::plan(&config).unwrap().queries.remove(0)
}

fn batch(rows: &[(i64, i64)]) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Int64, false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(
                TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.1))
                    .with_timezone("UTC"),
            ),
        ],
    )
    .unwrap()
}

/// (key, count) of every emitted row.
fn counts(out: &mut Vec<RecordBatch>) -> Vec<(i64, i64)> {
    let mut rows = Vec::new();
    for b in out.drain(..) {
        let keys = b.column(0).as_primitive::<Int64Type>();
        let n = b.column(b.num_columns() - 1).as_primitive::<Int64Type>();
        rows.extend(
            keys.values()
                .iter()
                .copied()
                .zip(n.values().iter().copied()),
        );
    }
    rows
}

#[test]
fn emit_every_interval_emits_changed_groups_periodically_and_at_close() {
    let mut op = operator(
        "SELECT key, window_start, COUNT(*) AS n FROM TUMBLE(events, ts, INTERVAL '10' SECOND) GROUP BY key, window_start EMIT EVERY INTERVAL '1' SECOND",
        "",
    );
    let (mut out, mut late) = (Vec::new(), Vec::new());
    let t0 = Instant::now();
    op.process_batch(
        &batch(&[(1, 1000), (2, 2000), (1, 3000)]),
        &mut out,
        &mut late,
    )
    .unwrap();
    assert!(out.is_empty(), "nothing before the first tick");
    op.handle_tick(t0 + Duration::from_millis(1100), &mut out)
        .unwrap();
    assert_eq!(counts(&mut out), vec![(1, 2), (2, 1)]);
    op.handle_tick(t0 + Duration::from_millis(2200), &mut out)
        .unwrap();
    assert!(out.is_empty(), "no change, no emission");
    op.process_batch(&batch(&[(2, 4000)]), &mut out, &mut late)
        .unwrap();
    op.handle_tick(t0 + Duration::from_millis(3300), &mut out)
        .unwrap();
    assert_eq!(counts(&mut out), vec![(2, 2)], "only the changed group");
    op.process_batch(&batch(&[(1, 5000)]), &mut out, &mut late)
        .unwrap();
    op.handle_watermark(10_000, &mut out).unwrap();
    assert_eq!(
        counts(&mut out),
        vec![(1, 3)],
        "at close: what changed since the last tick"
    );
    assert_eq!(op.state_groups(), 0);
}

#[test]
fn allowed_lateness_keeps_windows_open_until_end_plus_lateness() {
    let mut op = operator(
        "SELECT key, window_start, COUNT(*) AS n FROM TUMBLE(events, ts, INTERVAL '10' SECOND) GROUP BY key, window_start",
        "    allowed_lateness_ms: 5000\n",
    );
    let (mut out, mut late) = (Vec::new(), Vec::new());
    op.process_batch(&batch(&[(1, 1000)]), &mut out, &mut late)
        .unwrap();
    op.handle_watermark(12_000, &mut out).unwrap();
    assert!(out.is_empty(), "window [0, 10 s) stays open until 15 s");
    op.process_batch(&batch(&[(1, 9000)]), &mut out, &mut late)
        .unwrap();
    assert!(late.is_empty(), "within the allowed lateness");
    op.handle_watermark(15_000, &mut out).unwrap();
    assert_eq!(counts(&mut out), vec![(1, 2)]);
    op.process_batch(&batch(&[(1, 9500)]), &mut out, &mut late)
        .unwrap();
    assert_eq!(late.len(), 1, "past window_end + allowed lateness");
    assert_eq!(late[0].rows.num_rows(), 1);
    assert!(
        late[0].reason.contains("allowed_lateness_ms 5000"),
        "{}",
        late[0].reason
    );
}

#[test]
fn emit_on_update_reemits_each_change_and_nothing_at_close() {
    let mut op = operator(
        "SELECT key, window_start, COUNT(*) AS n FROM TUMBLE(events, ts, INTERVAL '10' SECOND) GROUP BY key, window_start",
        "    emit: on_update\n",
    );
    let (mut out, mut late) = (Vec::new(), Vec::new());
    op.process_batch(
        &batch(&[(1, 1000), (1, 2000), (2, 3000)]),
        &mut out,
        &mut late,
    )
    .unwrap();
    assert_eq!(
        counts(&mut out),
        vec![(1, 2), (2, 1)],
        "one row per changed group per batch"
    );
    op.process_batch(&batch(&[(1, 4000)]), &mut out, &mut late)
        .unwrap();
    assert_eq!(
        counts(&mut out),
        vec![(1, 3)],
        "the new current row replaces the old (upsert)"
    );
    op.handle_watermark(i64::MAX, &mut out).unwrap();
    assert!(out.is_empty(), "the last update was already final");
    assert_eq!(op.state_groups(), 0);
}

#[test]
fn window_state_over_memory_bytes_max_is_a_clear_error() {
    let yaml = "pipeline: cap\nsources:\n  - name: events\n    connector: file\n    path: unused\n    schema: { key: BIGINT, ts: TIMESTAMP }\n    event_time: { column: ts }\nqueries:\n  - name: q\n    sql: SELECT key, window_start, COUNT(*) AS n FROM TUMBLE(events, ts, INTERVAL '10' SECOND) GROUP BY key, window_start\nsinks:\n  - { name: out, from: q, connector: stdout }\nstate:\n  memory_bytes_max: 100000\n";
    let config = config::parse("cap.yaml", yaml, &|_| None).unwrap();
    let mut op = sql::plan(&config).unwrap().queries.remove(0);
    let (mut out, mut late) = (Vec::new(), Vec::new());
    let few: Vec<(i64, i64)> = (0..100).map(|k| (k, 1000)).collect();
    op.process_batch(&batch(&few), &mut out, &mut late).unwrap();
    let many: Vec<(i64, i64)> = (0..10_000).map(|k| (k, 1000)).collect();
    let error = op
        .process_batch(&batch(&many), &mut out, &mut late)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("over state.memory_bytes_max (100000)"),
        "{error}"
    );

    // Split over two reactors, each holds half the cap and says so.
    let copies: Vec<Box<dyn laminar::operator::Operator>> = (0..2)
        .map(|i| {
            let mut op = sql::plan(&config).unwrap().queries.remove(0);
            assert!(op.shard(i, 2));
            op
        })
        .collect();
    let mut op = laminar::engine::reactor::ShardedOperator::start(copies, false).unwrap();
    op.process_batch(&batch(&many), &mut out, &mut late)
        .unwrap();
    let error = op.flush(&mut out, &mut late).unwrap_err().to_string();
    assert!(
        error.contains("query `q`, reactor ")
            && error.contains(
                "over its reactor's share (50000) of state.memory_bytes_max (100000, split over 2 reactors)"
            ),
        "{error}"
    );
}

#[test]
fn only_keyed_queries_without_current_watermark_are_split_over_reactors() {
    let op = |sql_text: &str| {
        let yaml = format!(
            "pipeline: split\nsources:\n  - name: events\n    connector: file\n    path: unused\n    schema: {{ key: BIGINT, ts: TIMESTAMP }}\n    event_time: {{ column: ts }}\nqueries:\n  - name: q\n    sql: {sql_text}\nsinks:\n  - {{ name: out, from: q, connector: stdout }}\n"
        );
        let config = config::parse("split.yaml", &yaml, &|_| None).unwrap();
        sql::plan(&config).unwrap().queries.remove(0)
    };
    let tumble = "FROM TUMBLE(events, ts, INTERVAL '10' SECOND)";
    assert!(
        op(&format!(
            "SELECT key, window_start, COUNT(*) AS n {tumble} GROUP BY key, window_start"
        ))
        .shard(0, 2),
        "a keyed window splits by key"
    );
    // One group per window: one reactor would hold all of it.
    assert!(
        !op(&format!(
            "SELECT window_start, COUNT(*) AS n {tumble} GROUP BY window_start"
        ))
        .shard(0, 2)
    );
    // A reactor would read the watermark of a later moment than the pipeline thread.
    assert!(!op(&format!("SELECT key, window_start, COUNT(*) AS n {tumble} WHERE ts > CURRENT_WATERMARK() GROUP BY key, window_start")).shard(0, 2));
}
