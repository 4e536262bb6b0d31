//! WAL appends of 100-byte entries with one fdatasync per 1,000 (group commit), on the
//! blocking path (entries/s).

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark that cannot set up should stop loudly"
)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use laminar::durability::storage::{DiskStorage, IoMode};
use laminar::durability::wal::Wal;

const ENTRIES: u64 = 10_000;
const GROUP: u64 = 1_000;

fn append(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, _) = Wal::open(Box::new(
        DiskStorage::open_with(dir.path(), IoMode::Blocking).unwrap(),
    ))
    .unwrap();
    let payload = [7u8; 100];
    let mut group = c.benchmark_group("wal_append");
    group.throughput(Throughput::Elements(ENTRIES));
    group.sample_size(20);
    group.bench_function("100B, fdatasync per 1000", |b| {
        b.iter(|| {
            for i in 1..=ENTRIES {
                wal.append(1, &payload).unwrap();
                if i % GROUP == 0 {
                    wal.sync().unwrap();
                }
            }
        });
    });
    group.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
