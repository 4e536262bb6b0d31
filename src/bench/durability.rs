//! `laminar bench --durability`: the write-ahead log's group commit and `fdatasync`
//! latency (blocking and `io_uring`), state lookups, and checkpoint and recovery times for a given state size, on
//! the disk under the system temp directory.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::durability::Durable;
use crate::durability::arena::ArenaOptions;
use crate::durability::entry::CommitEntry;
use crate::durability::storage::{DiskStorage, IoMode};
use crate::durability::wal::Wal;
use crate::state::mmap::MmapStore;
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
    // An epoch's state changes written by one thread to one WAL, or split over
    // reactors, each writing and syncing its own WAL at the same time.
    for writers in [1, 2] {
        let (epochs, took) =
            epoch_state_writes(&dir.0.join(format!("reactors-{writers}")), writers, 40)?;
        writeln!(
            table,
            "  epoch state write, 8 MiB of 100 B changes + fdatasync, {writers} writer thread(s) with a WAL each: {:.1} ms per epoch ({:.0} MiB/s)",
            took.as_secs_f64() * 1e3 / epochs as f64,
            (epochs * EPOCH_STATE_BYTES) as f64 / took.as_secs_f64() / f64::from(1 << 20)
        )?;
    }
    let keys = wal_entries.max(1);
    let arena_dir = TempDir::new("arena")?;
    let (_, recovered) = Durable::open_dir(&arena_dir.0, u64::MAX, ArenaOptions::default())?;
    let mut mapped = recovered.store;
    for (label, store) in [
        ("memory-mapped", &mut mapped as &mut dyn StateStore),
        ("in-memory BTreeMap", &mut MemoryStore::new()),
    ] {
        let lookups = state_lookups(store, keys, 200_000);
        writeln!(
            table,
            "  state lookup, {label} store ({keys} keys, random, hit, value read): p50 {} ns, p99 {} ns (timer included)",
            percentile(&lookups, 0.5).as_nanos(),
            percentile(&lookups, 0.99).as_nanos()
        )?;
    }
    let mut timer: Vec<Duration> = (0..200_000)
        .map(|_| {
            let started = Instant::now();
            started.elapsed()
        })
        .collect();
    timer.sort_unstable();
    writeln!(
        table,
        "  the timer alone: p50 {} ns, p99 {} ns",
        percentile(&timer, 0.5).as_nanos(),
        percentile(&timer, 0.99).as_nanos()
    )?;
    drop(mapped);
    for &mib in state_mib {
        let dir = TempDir::new(&format!("state{mib}"))?;
        let r = checkpoint_and_recovery(&dir.0, mib)?;
        writeln!(
            table,
            "  state {mib:>5} MiB ({} entries, arena {} MiB): first checkpoint {:.2} s (pipeline held {:.1} ms); after 1% of keys changed {:.3} s (held {:.1} ms); with compaction, held {:.1} ms (compacted in {:.2} s on its own thread); recovery from the checkpoint {:.2} s; from the WAL alone {:.2} s",
            r.entries,
            r.arena_bytes >> 20,
            r.full.as_secs_f64(),
            r.full_pause.as_secs_f64() * 1e3,
            r.incremental.as_secs_f64(),
            r.incremental_pause.as_secs_f64() * 1e3,
            r.compaction_pause.as_secs_f64() * 1e3,
            r.compaction.as_secs_f64(),
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

/// State change bytes of one epoch in [`epoch_state_writes`].
const EPOCH_STATE_BYTES: u64 = 8 << 20;

/// `epochs` epochs of [`EPOCH_STATE_BYTES`] of 100-byte records, split over `writers`
/// threads, each appending its share to its own WAL (as reactors do) and syncing it;
/// the epoch ends when all are synced. Returns the epochs and the time they took.
fn epoch_state_writes(dir: &Path, writers: u32, epochs: u64) -> anyhow::Result<(u64, Duration)> {
    std::fs::create_dir_all(dir)?;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(writers as usize + 1));
    let threads: Vec<_> = (0..writers)
        .map(|i| {
            let storage = DiskStorage::open_with(dir, IoMode::Auto);
            let barrier = std::sync::Arc::clone(&barrier);
            std::thread::spawn(move || -> anyhow::Result<()> {
                let prefix = crate::durability::wal::reactor_prefix(i);
                let mut wal = storage
                    .map_err(anyhow::Error::from)
                    .and_then(|s| Ok(Wal::open_named(Box::new(s), &prefix, 1)?.0));
                let payload = [3u8; 100 - 17];
                let records = EPOCH_STATE_BYTES / 100 / u64::from(writers);
                // Every epoch's two barriers are met, also after a failure, so that no
                // thread waits for this one for ever.
                for _ in 0..epochs {
                    barrier.wait();
                    if let Ok(w) = &mut wal {
                        let written = (0..records)
                            .try_for_each(|_| w.append(1, &payload).map(drop))
                            .and_then(|()| w.sync());
                        if let Err(e) = written {
                            wal = Err(e.into());
                        }
                    }
                    barrier.wait();
                }
                wal.map(drop)
            })
        })
        .collect();
    let started = Instant::now();
    for _ in 0..epochs {
        barrier.wait();
        barrier.wait();
    }
    let took = started.elapsed();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a WAL writer panicked"))??;
    }
    Ok((epochs, took))
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

/// Durations of `lookups` random hits in `store` after `keys` puts, sorted.
fn state_lookups(store: &mut dyn StateStore, keys: u64, lookups: usize) -> Vec<Duration> {
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
        // A lookup reads the value, not only its address.
        let found = store.get(ns, &k).map_or(0, |v| v[v.len() - 1]);
        took.push(started.elapsed());
        std::hint::black_box(found);
    }
    took.sort_unstable();
    took
}

struct RecoveryRun {
    entries: u64,
    /// The first checkpoint (the whole arena to sync): time the pipeline was held, and
    /// time until the checkpoint was durable.
    full_pause: Duration,
    full: Duration,
    /// A checkpoint after 1% of the keys changed.
    incremental_pause: Duration,
    incremental: Duration,
    arena_bytes: u64,
    /// A checkpoint that compacted the arena: time the pipeline was held (starting it,
    /// and adopting the compacted arena), and time until the compacted arena was adopted.
    compaction_pause: Duration,
    compaction: Duration,
    from_checkpoint: Duration,
    from_wal: Duration,
}

fn commit_entry(epoch: u64) -> CommitEntry {
    CommitEntry {
        epoch,
        wall_ms: 0,
        sources: Vec::new(),
        sinks: Vec::new(),
        reactor_wals: Vec::new(),
    }
}

/// Fills `mib` MiB of state through epochs (WAL only), recovers from the WAL, writes a
/// checkpoint, changes 1% of the keys and writes another, and recovers from it.
fn checkpoint_and_recovery(dir: &Path, mib: u64) -> anyhow::Result<RecoveryRun> {
    let entries = (mib << 20) / ENTRY_BYTES;
    let mut value = [0u8; (ENTRY_BYTES - 16) as usize];
    let options = ArenaOptions::default();
    {
        let (mut durable, recovered) = Durable::open_dir(dir, u64::MAX, options)?;
        let mut store = recovered.store;
        let ns = store.namespace("bench")?;
        let mut epoch = 0;
        for i in 0..entries {
            value[..8].copy_from_slice(&i.to_le_bytes());
            store.put(ns, &key(i), &value)?;
            if (i + 1) % ENTRIES_PER_EPOCH == 0 || i + 1 == entries {
                epoch += 1;
                durable.commit(&store.take_journal(), &[], &commit_entry(epoch), &[])?;
            }
        }
    }
    let started = Instant::now();
    let (mut durable, recovered) = Durable::open_dir(dir, u64::MAX, options)?;
    let from_wal = started.elapsed();
    let mut store = recovered.store;
    anyhow::ensure!(
        store.keys() == entries,
        "recovered a different number of entries"
    );
    let mut epoch = recovered.commit.map_or(0, |c| c.epoch);
    let checkpoint =
        |durable: &mut Durable, store: &mut MmapStore| -> anyhow::Result<(Duration, Duration)> {
            let started = Instant::now();
            durable.start_checkpoint(store, false)?;
            let pause = started.elapsed();
            anyhow::ensure!(durable.wait_checkpoint(store)?, "no checkpoint was taken");
            Ok((pause, started.elapsed()))
        };
    let (full_pause, full) = checkpoint(&mut durable, &mut store)?;
    let ns = store.namespace("bench")?;
    for i in (0..entries).step_by(100) {
        value[..8].copy_from_slice(&(i + 1).to_le_bytes());
        store.put(ns, &key(i), &value)?;
    }
    epoch += 1;
    durable.commit(&store.take_journal(), &[], &commit_entry(epoch), &[])?;
    let (incremental_pause, incremental) = checkpoint(&mut durable, &mut store)?;
    let arena_bytes = store.arena_bytes();
    // A checkpoint that compacts (as one does once superseded records are over half the
    // arena): the copy runs on its own thread while the pipeline changes another 1% of
    // the keys; adopting the compacted arena copies those changes after it.
    durable.set_compaction(0.0, 0);
    store.put(ns, &key(0), &value)?;
    epoch += 1;
    durable.commit(&store.take_journal(), &[], &commit_entry(epoch), &[])?;
    let started = Instant::now();
    durable.start_checkpoint(&mut store, false)?;
    let start_pause = started.elapsed();
    for i in (1..entries).step_by(100) {
        value[..8].copy_from_slice(&(i + 2).to_le_bytes());
        store.put(ns, &key(i), &value)?;
    }
    epoch += 1;
    durable.commit(&store.take_journal(), &[], &commit_entry(epoch), &[])?;
    durable.wait_checkpoint(&store)?;
    let adopt_pause = durable
        .finish_compaction(&mut store, true)?
        .ok_or_else(|| anyhow::anyhow!("the compaction was not adopted"))?;
    let compaction = started.elapsed();
    let compaction_pause = start_pause + adopt_pause;
    // The compacted arena's first checkpoint (the whole of it to sync).
    checkpoint(&mut durable, &mut store)?;
    drop((durable, store));
    let started = Instant::now();
    let (_, recovered) = Durable::open_dir(dir, u64::MAX, options)?;
    let from_checkpoint = started.elapsed();
    anyhow::ensure!(
        recovered.checkpoint_epoch == Some(epoch) && recovered.store.keys() == entries,
        "recovery did not use the last checkpoint"
    );
    Ok(RecoveryRun {
        entries,
        full_pause,
        full,
        incremental_pause,
        incremental,
        arena_bytes,
        compaction_pause,
        compaction,
        from_checkpoint,
        from_wal,
    })
}
