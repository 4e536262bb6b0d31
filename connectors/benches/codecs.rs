//! Decode (one Kafka message at a time, into Arrow builders) and encode (a batch, one
//! message per row) of Nexmark bids, JSON (~100 B each) and Avro (~35 B each), in the
//! same run so that the two compare as a ratio (records/s). The Avro decoder runs the
//! writer schema compiled against the columns, as a source does for each schema id.

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark that cannot set up should stop loudly"
)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::Field;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use laminar_connectors::datagen::{DatagenOptions, DatagenSource, NexmarkTable};
use laminar_connectors::format::avro::schema::record_schema_of;
use laminar_connectors::format::avro::{AvroDecoder, AvroEncoder, AvroReader, WriterSchemas};
use laminar_connectors::format::json::DecodeColumn;
use laminar_connectors::format::{JsonDecoder, JsonEncoder, parse_column_type};
use laminar_connectors::{Source, SourcePoll};

const ROWS: u64 = 1024;

fn split(bytes: &[u8], ends: &[usize]) -> Vec<Vec<u8>> {
    let mut start = 0;
    ends.iter()
        .map(|&end| {
            let m = bytes[start..end].to_vec();
            start = end;
            m
        })
        .collect()
}

fn codecs(c: &mut Criterion) {
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

    let mut json = JsonEncoder::default();
    let (mut bytes, mut ends) = (Vec::new(), Vec::new());
    json.encode(&batch, None, &mut bytes, &mut ends).unwrap();
    let json_messages = split(&bytes, &ends);

    let fields: Vec<&Field> = batch
        .schema_ref()
        .fields()
        .iter()
        .map(AsRef::as_ref)
        .collect();
    let schema =
        apache_avro::Schema::parse_str(&record_schema_of("bid", &fields).unwrap().to_string())
            .unwrap();
    let bound: Vec<(usize, &Field)> = fields.iter().copied().enumerate().collect();
    let avro = AvroEncoder::new(&schema, &bound, None).unwrap();
    bytes.clear();
    ends.clear();
    avro.encode(&batch, &mut bytes, &mut ends).unwrap();
    let avro_messages = split(&bytes, &ends);
    let schema = Arc::new(schema);

    let mut group = c.benchmark_group("codecs");
    group.throughput(Throughput::Elements(ROWS));
    group.bench_function("json decode bid", |b| {
        let mut decoder = JsonDecoder::new(columns.clone());
        b.iter(|| {
            for m in &json_messages {
                decoder.decode(m).unwrap();
            }
            black_box(decoder.finish())
        });
    });
    group.bench_function("avro decode bid", |b| {
        let mut decoder = AvroDecoder::new(
            AvroReader::from_columns(columns.clone()),
            WriterSchemas::Fixed(schema.clone()),
        )
        .unwrap();
        b.iter(|| {
            for m in &avro_messages {
                decoder.parse(m).unwrap();
                decoder.append();
            }
            black_box(decoder.finish())
        });
    });
    group.bench_function("json encode bid", |b| {
        b.iter(|| {
            bytes.clear();
            ends.clear();
            json.encode(&batch, None, &mut bytes, &mut ends).unwrap();
            black_box(bytes.len())
        });
    });
    group.bench_function("avro encode bid", |b| {
        b.iter(|| {
            bytes.clear();
            ends.clear();
            avro.encode(&batch, &mut bytes, &mut ends).unwrap();
            black_box(bytes.len())
        });
    });
    group.finish();
}

criterion_group!(benches, codecs);
criterion_main!(benches);
