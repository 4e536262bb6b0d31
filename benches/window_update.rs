//! The tumbling-window aggregation (COUNT, MAX per auction over 10^5 keys) taking
//! generated Nexmark bids, batch by batch with the watermark after each (events/s).

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark that cannot set up should stop loudly"
)]

use std::hint::black_box;
use std::time::Duration;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::TimestampMillisecondType;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use laminar::{config, sql};
use laminar_connectors::datagen::{DatagenOptions, DatagenSource, NexmarkTable};
use laminar_connectors::{Source, SourcePoll};

const EVENTS: u64 = 200_000;

fn batches() -> Vec<RecordBatch> {
    let mut source = DatagenSource::new(DatagenOptions {
        name: "bids".into(),
        table: NexmarkTable::Bid,
        events: Some(EVENTS),
        rate_per_s: None,
        seed: 1,
        auctions: 100_000,
    });
    let mut out = Vec::new();
    while let SourcePoll::Batch(b) = source.poll(Duration::ZERO).unwrap() {
        out.push(b.batch);
    }
    out
}

fn update(c: &mut Criterion) {
    let yaml = "pipeline: bench\nsources:\n  - { name: bids, connector: datagen, event_time: { column: date_time } }\nqueries:\n  - name: q\n    sql: SELECT auction, window_start, window_end, COUNT(*) AS bids, MAX(price) AS max_price FROM TUMBLE(bids, date_time, INTERVAL '60' SECOND) GROUP BY auction, window_start, window_end\nsinks:\n  - { name: out, from: q, connector: stdout }\n";
    let config = config::parse("bench.yaml", yaml, &|_| None).unwrap();
    let input = batches();
    let time = NexmarkTable::Bid.schema().index_of("date_time").unwrap();
    let mut group = c.benchmark_group("window_update");
    group.throughput(Throughput::Elements(EVENTS));
    group.sample_size(20);
    group.bench_function("TUMBLE 60s count+max, 1e5 keys", |b| {
        b.iter_batched(
            || sql::plan(&config).unwrap().queries.remove(0),
            |mut op| {
                let (mut out, mut late) = (Vec::new(), Vec::new());
                for batch in &input {
                    op.process_batch(batch, &mut out, &mut late).unwrap();
                    let times = batch
                        .column(time)
                        .as_primitive::<TimestampMillisecondType>();
                    if let Some(&last) = times.values().last() {
                        op.handle_watermark(last, &mut out).unwrap();
                    }
                }
                black_box((out.len(), late.len()))
            },
            criterion::BatchSize::LargeInput,
        );
    });
    group.finish();
}

criterion_group!(benches, update);
criterion_main!(benches);
