//! State lookups: random hits among 1M keys in the memory-mapped store and in the
//! in-memory `BTreeMap` store, value read (lookups/s).

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark that cannot set up should stop loudly"
)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use laminar::durability::Durable;
use laminar::durability::arena::ArenaOptions;
use laminar::state::{MemoryStore, StateStore};

const KEYS: u64 = 1_000_000;
const LOOKUPS: u64 = 10_000;

fn key(i: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
    k[8..].copy_from_slice(&i.to_be_bytes());
    k
}

fn fill(store: &mut dyn StateStore) -> laminar::state::Namespace {
    let ns = store.namespace("bench").unwrap();
    let value = [1u8; 84];
    for i in 0..KEYS {
        store.put(ns, &key(i), &value).unwrap();
    }
    ns
}

fn lookups(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (_durable, recovered) =
        Durable::open_dir(dir.path(), u64::MAX, ArenaOptions::default()).unwrap();
    let mut mapped = recovered.store;
    let mut memory = MemoryStore::new();
    let probes: Vec<[u8; 16]> = {
        let mut x = 88_172_645_463_325_252_u64;
        (0..LOOKUPS)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                key(x % KEYS)
            })
            .collect()
    };
    let mut group = c.benchmark_group("state_lookup");
    group.throughput(Throughput::Elements(LOOKUPS));
    for (name, store) in [
        ("mmap", &mut mapped as &mut dyn StateStore),
        ("btreemap", &mut memory),
    ] {
        let ns = fill(store);
        let store = &*store;
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut sum = 0u64;
                for k in &probes {
                    sum += u64::from(store.get(ns, k).map_or(0, |v| v[v.len() - 1]));
                }
                black_box(sum)
            });
        });
    }
    group.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
