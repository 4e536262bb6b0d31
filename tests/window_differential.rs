//! Differential tests of the window operator: for random out-of-order inputs with no late
//! records (disorder within the watermark delay), the streaming result equals a batch
//! GROUP BY over the same events: `DataFusion`'s for TUMBLE and HOP (window assignment
//! computed in SQL), a direct model for SESSION. Many seeds, random batch sizes; state
//! must be empty once the input is drained.

#![allow(
    clippy::unwrap_used,
    reason = "a test that cannot unwrap should fail loudly"
)]

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray, Int64Array, RecordBatch, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::datasource::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};
use laminar::engine::reactor::ShardedOperator;
use laminar::operator::Operator;
use laminar::state::{MemoryStore, StateView};
use laminar::{config, sql};

const BASE_MS: i64 = 1_700_000_000_000;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Clone, Copy)]
struct Event {
    key: i64,
    price: i64,
    ts: i64,
}

/// Events in arrival order, and the disorder bound (the watermark delay).
fn events(seed: u64) -> (Vec<Event>, i64) {
    let mut rng = Rng(seed);
    let n = 200 + rng.below(800);
    let keys = 1 + rng.below(30);
    let disorder = rng.below(5000) as i64;
    let step = 1 + rng.below(200) as i64;
    let mut events: Vec<(i64, Event)> = (0..n as i64)
        .map(|i| {
            let ts = BASE_MS + i * step + rng.below(step as u64) as i64;
            let e = Event {
                key: rng.below(keys) as i64,
                price: rng.below(1000) as i64 - 100,
                ts,
            };
            (ts + rng.below(disorder as u64 + 1) as i64, e)
        })
        .collect();
    events.sort_by_key(|(arrival, _)| *arrival);
    (events.into_iter().map(|(_, e)| e).collect(), disorder)
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Int64, false),
        Field::new("price", DataType::Int64, false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
    ]))
}

fn batch(events: &[Event]) -> RecordBatch {
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(Int64Array::from_iter_values(events.iter().map(|e| e.key))),
            Arc::new(Int64Array::from_iter_values(events.iter().map(|e| e.price))),
            Arc::new(
                TimestampMillisecondArray::from_iter_values(events.iter().map(|e| e.ts))
                    .with_timezone("UTC"),
            ),
        ],
    )
    .unwrap()
}

const AGGREGATES: &str = "COUNT(*) AS n, SUM(price) AS total, MIN(price) AS lo, MAX(price) AS hi, AVG(price) AS mean, COUNT(DISTINCT price % 7) AS kinds";

/// Rows as sorted strings: key, window start, window end, then the aggregates.
fn rows(batches: &[RecordBatch]) -> Vec<String> {
    let mut out = Vec::new();
    for b in batches {
        let cols: Vec<Arc<dyn Array>> = (0..b.num_columns())
            .map(|i| arrow::compute::cast(b.column(i), &DataType::Utf8).unwrap())
            .collect();
        for r in 0..b.num_rows() {
            let cells: Vec<String> = cols
                .iter()
                .map(|c| {
                    if c.is_null(r) {
                        "null".to_owned()
                    } else {
                        c.as_string::<i32>().value(r).to_owned()
                    }
                })
                .collect();
            out.push(cells.join(","));
        }
    }
    out.sort();
    out
}

/// The operator of the one query `sql`, reading `events`.
fn operator(sql_text: &str, delay: i64, emit: &str) -> Box<dyn Operator> {
    let yaml = format!(
        "pipeline: diff\nsources:\n  - name: events\n    connector: file\n    path: unused\n    schema: {{ key: BIGINT, price: BIGINT, ts: TIMESTAMP }}\n    event_time: {{ column: ts, watermark_delay_ms: {delay} }}\nqueries:\n  - name: q\n    sql: |\n      {sql_text}\n    emit: {emit}\nsinks:\n  - {{ name: out, from: q, connector: stdout }}\n"
    );
    let config = config::parse("diff.yaml", &yaml, &|_| None).unwrap();
    sql::plan(&config).unwrap().queries.remove(0)
}

/// The same query split by key over `reactors` threads (unsplit for 1).
fn operator_on(sql_text: &str, delay: i64, emit: &str, reactors: usize) -> Box<dyn Operator> {
    if reactors == 1 {
        return operator(sql_text, delay, emit);
    }
    let copies: Vec<Box<dyn Operator>> = (0..reactors)
        .map(|i| {
            let mut op = operator(sql_text, delay, emit);
            assert!(op.shard(i, reactors));
            op
        })
        .collect();
    Box::new(ShardedOperator::start(copies, false).unwrap())
}

/// Runs `sql` through laminar's operator, batch by batch, with the watermark after each,
/// split over 1 to 3 reactors.
fn stream(sql_text: &str, events: &[Event], delay: i64, rng: &mut Rng) -> Vec<String> {
    let reactors = 1 + rng.below(3) as usize;
    let mut op = operator_on(sql_text, delay, "on_window_close", reactors);
    let (mut out, mut late) = (Vec::new(), Vec::new());
    let mut max_ts = i64::MIN;
    let mut at = 0;
    while at < events.len() {
        let n = (1 + rng.below(64) as usize).min(events.len() - at);
        let chunk = &events[at..at + n];
        at += n;
        op.process_batch(&batch(chunk), &mut out, &mut late)
            .unwrap();
        max_ts = max_ts.max(chunk.iter().map(|e| e.ts).max().unwrap());
        op.handle_watermark(max_ts - delay, &mut out).unwrap();
    }
    assert!(
        late.is_empty(),
        "no record is later than the delay, yet {} were late",
        late.len()
    );
    op.handle_watermark(i64::MAX, &mut out).unwrap();
    op.flush(&mut out, &mut late).unwrap();
    assert!(late.is_empty());
    rows(&out)
}

fn batch_sql(sql_text: &str, events: &[Event]) -> Vec<String> {
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
    let table = MemTable::try_new(schema(), vec![vec![batch(events)]]).unwrap();
    ctx.register_table("events", Arc::new(table)).unwrap();
    let batches =
        futures::executor::block_on(async { ctx.sql(sql_text).await?.collect().await }).unwrap();
    rows(&batches)
}

#[test]
fn window_tumble_equals_batch_group_by_for_many_seeds() {
    for seed in 0..40 {
        let (events, delay) = events(seed);
        let mut rng = Rng(seed ^ 0xABCD);
        let size = [1000, 5000, 60_000][(seed % 3) as usize];
        let streaming = stream(
            &format!(
                "SELECT key, window_start, window_end, {AGGREGATES} FROM TUMBLE(events, ts, INTERVAL '{size}' MILLISECOND) GROUP BY key, window_start, window_end"
            ),
            &events,
            delay,
            &mut rng,
        );
        let batch = batch_sql(
            &format!(
                "SELECT key, date_bin(INTERVAL '{size}' MILLISECOND, ts) AS window_start, \
                 date_bin(INTERVAL '{size}' MILLISECOND, ts) + INTERVAL '{size}' MILLISECOND AS window_end, {AGGREGATES} \
                 FROM events GROUP BY 1, 2, 3"
            ),
            &events,
        );
        assert_eq!(streaming, batch, "seed {seed}");
    }
}

#[test]
fn window_hop_equals_batch_group_by_for_many_seeds() {
    for seed in 100..130 {
        let (events, delay) = events(seed);
        let mut rng = Rng(seed ^ 0x1234);
        let (slide, size) = [(1000, 5000), (2000, 10_000), (500, 500)][(seed % 3) as usize];
        let streaming = stream(
            &format!(
                "SELECT key, window_start, window_end, {AGGREGATES} FROM HOP(events, ts, INTERVAL '{slide}' MILLISECOND, INTERVAL '{size}' MILLISECOND) GROUP BY key, window_start, window_end"
            ),
            &events,
            delay,
            &mut rng,
        );
        // Each event is in the windows starting at date_bin(slide, ts) - k * slide for
        // k in 0..size/slide: a cross join with those offsets assigns them in SQL.
        let offsets: Vec<String> = (0..size / slide)
            .map(|k| format!("(INTERVAL '{}' MILLISECOND)", k * slide))
            .collect();
        let batch = batch_sql(
            &format!(
                "SELECT key, ws AS window_start, ws + INTERVAL '{size}' MILLISECOND AS window_end, {AGGREGATES} FROM ( \
                   SELECT key, price, date_bin(INTERVAL '{slide}' MILLISECOND, ts) - back AS ws \
                   FROM events CROSS JOIN (VALUES {}) AS o(back)) GROUP BY 1, 2, 3",
                offsets.join(", ")
            ),
            &events,
        );
        assert_eq!(streaming, batch, "seed {seed}");
    }
}

#[test]
fn window_session_equals_a_direct_model_for_many_seeds() {
    for seed in 200..240 {
        let (events, delay) = events(seed);
        let mut rng = Rng(seed ^ 0x77);
        let gap = [300_i64, 2000, 10_000][(seed % 3) as usize];
        let streaming = stream(
            &format!(
                "SELECT key, window_start, window_end, COUNT(*) AS n, SUM(price) AS total, MIN(price) AS lo, MAX(price) AS hi FROM SESSION(events, ts, INTERVAL '{gap}' MILLISECOND) GROUP BY key, window_start, window_end"
            ),
            &events,
            delay,
            &mut rng,
        );
        // The model: per key, sorted by time, a new session when the gap is exceeded.
        let mut by_key: BTreeMap<i64, Vec<Event>> = BTreeMap::new();
        for e in &events {
            by_key.entry(e.key).or_default().push(*e);
        }
        let mut sessions: Vec<RecordBatch> = Vec::new();
        for (key, mut list) in by_key {
            list.sort_by_key(|e| e.ts);
            let mut group: Vec<Event> = Vec::new();
            let mut flush = |group: &mut Vec<Event>| {
                if group.is_empty() {
                    return;
                }
                let start = group[0].ts;
                let end = group.last().unwrap().ts + gap;
                let prices: Vec<i64> = group.iter().map(|e| e.price).collect();
                let cols: Vec<Arc<dyn Array>> = vec![
                    Arc::new(Int64Array::from(vec![key])),
                    Arc::new(TimestampMillisecondArray::from(vec![start]).with_timezone("UTC")),
                    Arc::new(TimestampMillisecondArray::from(vec![end]).with_timezone("UTC")),
                    Arc::new(Int64Array::from(vec![prices.len() as i64])),
                    Arc::new(Int64Array::from(vec![prices.iter().sum::<i64>()])),
                    Arc::new(Int64Array::from(vec![*prices.iter().min().unwrap()])),
                    Arc::new(Int64Array::from(vec![*prices.iter().max().unwrap()])),
                ];
                let fields: Vec<Field> = (0..cols.len())
                    .map(|i| Field::new(format!("c{i}"), cols[i].data_type().clone(), false))
                    .collect();
                sessions.push(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap());
                group.clear();
            };
            for e in list {
                if group.last().is_some_and(|last| e.ts - last.ts > gap) {
                    flush(&mut group);
                }
                group.push(e);
            }
            flush(&mut group);
        }
        assert_eq!(streaming, rows(&sessions), "seed {seed}");
    }
}

#[test]
fn window_state_stays_flat_over_many_windows() {
    // 200k events over ~2000 tumbling windows of 100 keys: state must hold only the
    // open windows, not grow with the input.
    let yaml = "pipeline: flat\nsources:\n  - name: events\n    connector: file\n    path: unused\n    schema: { key: BIGINT, price: BIGINT, ts: TIMESTAMP }\n    event_time: { column: ts }\nqueries:\n  - name: q\n    sql: SELECT key, window_start, COUNT(*) AS n FROM TUMBLE(events, ts, INTERVAL '1' SECOND) GROUP BY key, window_start\nsinks:\n  - { name: out, from: q, connector: stdout }\n";
    let config = config::parse("flat.yaml", yaml, &|_| None).unwrap();
    let mut planned = sql::plan(&config).unwrap();
    let mut op = planned.queries.remove(0);
    let (mut out, mut late) = (Vec::new(), Vec::new());
    let mut emitted = 0;
    let mut groups_max = 0;
    for chunk in 0..200 {
        let events: Vec<Event> = (0..1000)
            .map(|i| Event {
                key: i % 100,
                price: 1,
                ts: BASE_MS + (chunk * 1000 + i) * 10,
            })
            .collect();
        op.process_batch(&batch(&events), &mut out, &mut late)
            .unwrap();
        op.handle_watermark(events.last().unwrap().ts, &mut out)
            .unwrap();
        emitted += out.drain(..).map(|b| b.num_rows()).sum::<usize>();
        groups_max = groups_max.max(op.state_groups());
    }
    // Each chunk spans one window (1000 events x 10 ms), so at most two are ever open.
    assert!(groups_max <= 200, "state grew to {groups_max} groups");
    assert!(groups_max >= 100);
    op.handle_watermark(i64::MAX, &mut out).unwrap();
    emitted += out.drain(..).map(|b| b.num_rows()).sum::<usize>();
    assert_eq!(emitted, 2000 * 100);
    assert_eq!(op.state_groups(), 0, "state left after every window closed");
}

/// One step of a run: a batch of events, then the watermark, then maybe a clock tick.
struct Step {
    events: std::ops::Range<usize>,
    tick: bool,
}

fn run_steps(
    op: &mut dyn Operator,
    events: &[Event],
    steps: &[Step],
    delay: i64,
    clock: &mut (i64, std::time::Instant),
    out: &mut Vec<RecordBatch>,
) {
    let mut late = Vec::new();
    for step in steps {
        let chunk = &events[step.events.clone()];
        op.process_batch(&batch(chunk), out, &mut late).unwrap();
        clock.0 = clock.0.max(chunk.iter().map(|e| e.ts).max().unwrap());
        op.handle_watermark(clock.0 - delay, out).unwrap();
        if step.tick {
            // Far enough apart that every tick is due (EMIT EVERY one hour).
            clock.1 += std::time::Duration::from_hours(2);
            op.handle_tick(clock.1, out).unwrap();
        }
    }
    assert!(late.is_empty());
}

#[test]
fn window_state_restored_from_a_checkpoint_continues_exactly() {
    // A run checkpointed now and then, "crashed" some steps after its last checkpoint
    // (what it emitted since is discarded, as an uncommitted epoch would be) and resumed
    // by a new operator from the store, replaying from the checkpoint, emits exactly
    // what an uninterrupted run emits, for every window kind and emit policy.
    let queries = [
        format!(
            "SELECT key, window_start, window_end, {AGGREGATES} FROM TUMBLE(events, ts, INTERVAL '2' SECOND) GROUP BY key, window_start, window_end"
        ),
        format!(
            "SELECT key, window_start, window_end, {AGGREGATES} FROM HOP(events, ts, INTERVAL '1' SECOND, INTERVAL '4' SECOND) GROUP BY key, window_start, window_end"
        ),
        format!(
            "SELECT key, window_start, window_end, {AGGREGATES} FROM SESSION(events, ts, INTERVAL '700' MILLISECOND) GROUP BY key, window_start, window_end"
        ),
    ];
    let emits = ["on_window_close", "on_update", "{ every_ms: 3600000 }"];
    for seed in 300..500 {
        let (events, delay) = events(seed);
        let mut rng = Rng(seed ^ 0x5151);
        let sql_text = &queries[(seed % 3) as usize];
        let emit = emits[((seed / 3) % 3) as usize];
        let mut steps = Vec::new();
        let mut at = 0;
        while at < events.len() {
            let end = (at + 1 + rng.below(64) as usize).min(events.len());
            steps.push(Step {
                events: at..end,
                tick: rng.below(3) == 0,
            });
            at = end;
        }
        let cut = rng.below(steps.len() as u64 + 1) as usize;
        let crash = cut + rng.below((steps.len() - cut) as u64 + 1) as usize;
        let start = (i64::MIN, std::time::Instant::now());
        // The run before the crash and the one after may have different reactor counts.
        let (before, after) = (1 + rng.below(3) as usize, 1 + rng.below(3) as usize);

        let mut whole = Vec::new();
        let mut op = operator(sql_text, delay, emit);
        run_steps(
            op.as_mut(),
            &events,
            &steps,
            delay,
            &mut start.clone(),
            &mut whole,
        );
        op.handle_watermark(i64::MAX, &mut whole).unwrap();

        let mut store = MemoryStore::new();
        let mut kept = Vec::new();
        let mut clock = start;
        let mut op = operator_on(sql_text, delay, emit, before);
        for i in 0..cut {
            run_steps(
                op.as_mut(),
                &events,
                &steps[i..=i],
                delay,
                &mut clock,
                &mut kept,
            );
            if rng.below(2) == 0 {
                op.flush(&mut kept, &mut Vec::new()).unwrap();
                op.checkpoint(&mut StateView::open(&mut store, "q").unwrap())
                    .unwrap();
            }
        }
        op.flush(&mut kept, &mut Vec::new()).unwrap();
        op.checkpoint(&mut StateView::open(&mut store, "q").unwrap())
            .unwrap();
        // Nothing changed since: the next checkpoint writes nothing (an idle pipeline
        // commits no epochs).
        store.enable_journal();
        op.checkpoint(&mut StateView::open(&mut store, "q").unwrap())
            .unwrap();
        assert_eq!(
            store.take_journal(),
            [],
            "seed {seed}: an idle checkpoint wrote"
        );
        let at_checkpoint = clock;
        let groups_at_checkpoint = op.state_groups();
        run_steps(
            op.as_mut(),
            &events,
            &steps[cut..crash],
            delay,
            &mut clock,
            &mut Vec::new(),
        );
        drop(op);

        let mut op = operator_on(sql_text, delay, emit, after);
        op.restore(&StateView::open(&mut store, "q").unwrap())
            .unwrap();
        assert_eq!(op.state_groups(), groups_at_checkpoint, "seed {seed}");
        let mut clock = at_checkpoint;
        run_steps(
            op.as_mut(),
            &events,
            &steps[cut..],
            delay,
            &mut clock,
            &mut kept,
        );
        op.handle_watermark(i64::MAX, &mut kept).unwrap();
        op.flush(&mut kept, &mut Vec::new()).unwrap();
        let (kept, whole) = (rows(&kept), rows(&whole));
        if kept != whole {
            let extra: Vec<&String> = kept.iter().filter(|r| !whole.contains(r)).collect();
            let missing: Vec<&String> = whole.iter().filter(|r| !kept.contains(r)).collect();
            panic!(
                "seed {seed}: {sql_text} EMIT {emit}, {before} then {after} reactors, cut {cut}, crash {crash}: {} rows against {}; not in the uninterrupted run: {extra:?}; missing: {missing:?}",
                kept.len(),
                whole.len()
            );
        }

        // Once every window closed, the store keeps only the operator's metadata.
        op.checkpoint(&mut StateView::open(&mut store, "q").unwrap())
            .unwrap();
        let ns = store_ns(&mut store);
        assert_eq!(
            store.len(ns),
            1,
            "seed {seed}: closed windows left in the store"
        );
    }
}

fn store_ns(store: &mut MemoryStore) -> laminar::state::Namespace {
    laminar::state::StateStore::namespace(store, "q").unwrap()
}
