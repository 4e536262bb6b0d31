//! `laminar bench --durability`: the write-ahead log's group commit and `fdatasync`
//! latency (blocking and `io_uring`), state lookups, and checkpoint and recovery times for a given state size, on
//! the disk under the system temp directory.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::durability::Durable;
use crate::durability::entry::CommitEntry;
use crate::durability::storage::{DiskStorage, IoMode};
use crate::durability::wal::Wal;
use crate::state::{MemoryStore, StateStore};

/// Bytes of key and value per state entry (16-byte key, 84-byte value).
const ENTRY_BYTES: u64 = 100;
/// State entries written per epoch while filling the store.
const ENTRIES_PER_EPOCH: u64 = 500_000;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("laminar-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

pub fn run(state_mib: &[u64], wal_entries: u64, table: &mut String) -> anyhow::Result<()> {
    writeln!(table, "durability")?;
    let dir = TempDir::new("wal")?;
    let uring = DiskStorage::open_with(&dir.0.join("probe"), IoMode::Auto)?.uses_io_uring();
    let mut modes = vec![("blocking", IoMode::Blocking)];
    if uring {
        modes.push(("io_uring", IoMode::Auto));
    } else {
        writeln!(
            table,
            "  (io_uring is not available here: blocking path only)"
        )?;
    }
    for (label, mode) in modes {
        for group in [1000, 100] {
            let (entries, took) = wal_group_commit(
                &dir.0.join(format!("{label}-g{group}")),
                mode,
                wal_entries,
                group,
            )?;
            writeln!(
                table,
                "  WAL {label:<8} append, 100 B entries, fdatasync every {group:>4}: {:>10.0} entries/s ({:.2} s)",
                entries as f64 / took.as_secs_f64(),
                took.as_secs_f64()
            )?;
        }
        let syncs = fdatasync_latency(&dir.0.join(format!("{label}-sync")), mode, 2000)?;
        writeln!(
            table,
            "  WAL {label:<8} 4 KiB append + fdatasync: p50 {} us, p99 {} us, max {} us",
            percentile(&syncs, 0.5).as_micros(),
            percentile(&syncs, 0.99).as_micros(),
            syncs.last().map_or(0, Duration::as_micros)
        )?;
    }
    let lookups = state_lookups(wal_entries.max(1), 200_000);
    writeln!(
        table,
        "  state lookup ({wal_entries} keys, random, hit): p50 {} ns, p99 {} ns (timer included)",
        percentile(&lookups, 0.5).as_nanos(),
        percentile(&lookups, 0.99).as_nanos()
    )?;
    for &mib in state_mib {
        let dir = TempDir::new(&format!("state{mib}"))?;
        let r = checkpoint_and_recovery(&dir.0, mib)?;
        writeln!(
            table,
            "  state {mib:>5} MiB ({} entries): checkpoint {:.2} s ({:.0} MiB/s, {} MiB); recovery from the checkpoint {:.2} s; from the WAL alone {:.2} s",
            r.entries,
            r.checkpoint.as_secs_f64(),
            r.checkpoint_bytes as f64 / f64::from(1 << 20) / r.checkpoint.as_secs_f64(),
            r.checkpoint_bytes >> 20,
            r.from_checkpoint.as_secs_f64(),
            r.from_wal.as_secs_f64()
        )?;
    }
    Ok(())
}

/// Appends `entries` records of 100 bytes, with one `fdatasync` per `group`.
fn wal_group_commit(
    dir: &Path,
    mode: IoMode,
    entries: u64,
    group: u64,
) -> anyhow::Result<(u64, Duration)> {
    let (mut wal, _) = Wal::open(Box::new(DiskStorage::open_with(dir, mode)?))?;
    let payload = [7u8; 100];
    let started = Instant::now();
    for i in 1..=entries {
        wal.append(1, &payload)?;
        if i % group == 0 {
            wal.sync()?;
        }
    }
    wal.sync()?;
    Ok((entries, started.elapsed()))
}

/// Durations of `n` `fdatasync` calls, each after a 4 KiB append, sorted.
fn fdatasync_latency(dir: &Path, mode: IoMode, n: usize) -> anyhow::Result<Vec<Duration>> {
    let (mut wal, _) = Wal::open(Box::new(DiskStorage::open_with(dir, mode)?))?;
    let payload = [9u8; 4096 - 17];
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        wal.append(1, &payload)?;
        wal.sync()?;
        took.push(wal.stats().last_sync);
    }
    took.sort_unstable();
    Ok(took)
}

fn key(i: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
    k[8..].copy_from_slice(&i.to_be_bytes());
    k
}

/// Durations of `lookups` random hits in a store of `keys` entries, sorted.
fn state_lookups(keys: u64, lookups: usize) -> Vec<Duration> {
    let mut store = MemoryStore::new();
    let Ok(ns) = store.namespace("bench") else {
        return Vec::new();
    };
    let value = [1u8; (ENTRY_BYTES - 16) as usize];
    for i in 0..keys {
        let _ = store.put(ns, &key(i), &value);
    }
    let mut x = 88_172_645_463_325_252_u64;
    let mut took = Vec::with_capacity(lookups);
    for _ in 0..lookups {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let k = key(x % keys);
        let started = Instant::now();
        let found = store.get(ns, &k).is_some();
        took.push(started.elapsed());
        std::hint::black_box(found);
    }
    took.sort_unstable();
    took
}

struct RecoveryRun {
    entries: u64,
    checkpoint: Duration,
    checkpoint_bytes: u64,
    from_checkpoint: Duration,
    from_wal: Duration,
}

fn commit_entry(epoch: u64) -> CommitEntry {
    CommitEntry {
        epoch,
        wall_ms: 0,
        sources: Vec::new(),
        sinks: Vec::new(),
    }
}

/// Fills `mib` MiB of state through epochs (WAL only), recovers from the WAL, writes a
/// checkpoint, and recovers from it.
fn checkpoint_and_recovery(dir: &Path, mib: u64) -> anyhow::Result<RecoveryRun> {
    let entries = (mib << 20) / ENTRY_BYTES;
    {
        let (mut durable, recovered) = Durable::open_dir(dir, u64::MAX)?;
        let mut store = recovered.store;
        let ns = store.namespace("bench")?;
        let mut value = [0u8; (ENTRY_BYTES - 16) as usize];
        let mut epoch = 0;
        for i in 0..entries {
            value[..8].copy_from_slice(&i.to_le_bytes());
            store.put(ns, &key(i), &value)?;
            if (i + 1) % ENTRIES_PER_EPOCH == 0 || i + 1 == entries {
                epoch += 1;
                durable.commit(&store.take_journal(), &[], &commit_entry(epoch))?;
            }
        }
    }
    let started = Instant::now();
    let (mut durable, recovered) = Durable::open_dir(dir, u64::MAX)?;
    let from_wal = started.elapsed();
    let store = recovered.store;
    anyhow::ensure!(
        store.entries().count() as u64 == entries,
        "recovered a different number of entries"
    );
    let started = Instant::now();
    durable.maybe_checkpoint(&store, true)?;
    let checkpoint = started.elapsed();
    let checkpoint_bytes = durable.stats().last_checkpoint.map_or(0, |c| c.bytes);
    drop((durable, store));
    let started = Instant::now();
    let (_, recovered) = Durable::open_dir(dir, u64::MAX)?;
    let from_checkpoint = started.elapsed();
    anyhow::ensure!(
        recovered.checkpoint_epoch.is_some(),
        "recovery did not use the checkpoint"
    );
    Ok(RecoveryRun {
        entries,
        checkpoint,
        checkpoint_bytes,
        from_checkpoint,
        from_wal,
    })
}
