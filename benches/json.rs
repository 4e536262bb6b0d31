//! JSON decode (schema-driven, one Kafka message at a time, into Arrow builders) and
//! encode (a batch to one object per row) of ~100-byte Nexmark bids (records/s).

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark that cannot set up should stop loudly"
)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use laminar_connectors::datagen::{DatagenOptions, DatagenSource, NexmarkTable};
use laminar_connectors::format::json::DecodeColumn;
use laminar_connectors::format::{JsonDecoder, JsonEncoder, parse_column_type};
use laminar_connectors::{Source, SourcePoll};

const ROWS: u64 = 1024;

fn json(c: &mut Criterion) {
    let mut source = DatagenSource::new(DatagenOptions {
        name: "bids".into(),
        table: NexmarkTable::Bid,
        events: Some(ROWS),
        rate_per_s: None,
        seed: 1,
        auctions: 100_000,
    });
    let SourcePoll::Batch(batch) = source.poll(Duration::ZERO).unwrap() else {
        panic!("the generator gave no batch");
    };
    let batch = batch.batch;
    assert_eq!(batch.num_rows() as u64, ROWS);
    let mut encoder = JsonEncoder::default();
    let (mut bytes, mut ends) = (Vec::new(), Vec::new());
    encoder.encode(&batch, None, &mut bytes, &mut ends).unwrap();
    let mut messages = Vec::new();
    let mut start = 0;
    for &end in &ends {
        messages.push(bytes[start..end].to_vec());
        start = end;
    }
    let columns: Vec<DecodeColumn> = [
        ("auction", "BIGINT"),
        ("bidder", "BIGINT"),
        ("price", "BIGINT"),
        ("channel", "VARCHAR"),
        ("url", "VARCHAR"),
        ("date_time", "TIMESTAMP"),
        ("extra", "VARCHAR"),
    ]
    .iter()
    .map(|(name, ty)| DecodeColumn {
        name: (*name).to_owned(),
        ty: parse_column_type(ty).unwrap().0,
        nullable: true,
    })
    .collect();

    let mut group = c.benchmark_group("json");
    group.throughput(Throughput::Elements(ROWS));
    group.bench_function("decode bid", |b| {
        let mut decoder = JsonDecoder::new(columns.clone());
        b.iter(|| {
            for m in &messages {
                decoder.decode(m).unwrap();
            }
            black_box(decoder.finish())
        });
    });
    group.bench_function("encode bid", |b| {
        b.iter(|| {
            bytes.clear();
            ends.clear();
            encoder.encode(&batch, None, &mut bytes, &mut ends).unwrap();
            black_box(bytes.len())
        });
    });
    group.finish();
}

criterion_group!(benches, json);
criterion_main!(benches);
