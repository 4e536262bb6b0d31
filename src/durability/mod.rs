//! Durability: the write-ahead log, checkpoints and recovery of a pipeline's state.
//!
//! # The commit protocol
//!
//! The pipeline runs in epochs (`state.checkpoint_interval_ms`). Closing epoch `E`:
//!
//! 1. At-least-once sinks, dead-letter and late-data topics are flushed until every record
//!    is acknowledged.
//! 2. Operators write what changed. A query split over reactors writes on its reactor
//!    threads, all at once: each reactor appends its operator's changes to its own WAL
//!    (`wal-r<i>-<id>.log`, no lock shared with any other) and makes them durable with
//!    its own `fdatasync`; the pipeline thread then applies them to the state store
//!    without journaling them again. Other queries write into the store, whose journal
//!    of changes, the output buffered for each exactly-once sink during `E`, and then
//!    the **commit entry** (epoch, every source partition's next offset, every
//!    partition's watermark, where each exactly-once sink's output for `E` starts, and
//!    the LSN each reactor WAL ends at) are appended to the pipeline's WAL, and one
//!    `fdatasync` makes them durable. This is the commit point of `E`: reactor records
//!    past the LSNs it records belong to no committed epoch.
//! 3. Each exactly-once sink sends `E`'s output, every record with the headers
//!    `laminar.epoch` and `laminar.seq` (its position in the sink's output for `E`), in a
//!    Kafka transaction when `transactions: true`, and waits for every acknowledgement
//!    (and commits the transaction).
//! 4. A `delivered(E)` record is appended (made durable with the next sync), and the
//!    sources' consumer groups are told the offsets (for monitoring only).
//!
//! If step 3 fails in a way sending again can mend (a record the broker refused for good,
//! a transaction it requires to be aborted), the run does in place what recovery would do
//! after a crash there: the transaction is aborted (without transactions, the producer,
//! stopped by librdkafka's gap-less guarantee at the refused record, is replaced once
//! nothing is in flight), the sink's topic is read back from the epoch's start offsets,
//! and what it lacks is sent again, up to 5 tries.
//!
//! # What recovery does in each crash window
//!
//! Recovery loads the newest checkpoint whose checksum holds (an older one if the newest
//! is corrupt), replays the WAL after it up to the last complete commit entry (anything
//! after that belongs to an epoch that never committed and is cut off), seeks every
//! source partition to the offsets in that entry and restores the watermarks from it.
//! At each commit entry it replays, it applies the reactor WALs' records from the
//! positions the previous entry (or the checkpoint) recorded up to the ones it records;
//! a reactor WAL that lacks one of them stops the start as corruption. Each reactor WAL
//! is then cut after its last committed record. The state store holds every reactor's
//! changes, so a run with another number of reactors restores from it alike; the WALs
//! no reactor of the run writes are kept, listed in every commit entry, until the
//! oldest retained checkpoint holds all they hold.
//!
//! - Crash before step 2's sync: epoch `E` never happened. Its input is read again from
//!   the offsets of `E - 1`; no output of `E` was sent to exactly-once sinks (it was only
//!   buffered), so nothing is duplicated. At-least-once sinks may see it twice.
//! - Crash after step 2's sync, before `delivered(E)` is durable: the WAL holds `E`'s
//!   output. The sink reads its topic back from the recorded start offsets, collects
//!   the `(laminar.epoch, laminar.seq)` pairs of `E` already there (sent before the
//!   crash, acknowledged or not, committed or aborted), and sends only the rest. The
//!   read-back uses the consumer's `read_committed` view, so the decision matches what
//!   `read_committed` consumers see, whether the broker hides aborted records or not.
//! - Crash after `delivered(E)`: nothing to redo; the next epoch starts clean.
//!
//! Crash tests stop the process at named points of this protocol with
//! `LAMINAR_CRASH_POINT=NAME:N` (abort at the N-th pass): `after-commit` (step 2 done),
//! `mid-delivery` (half of a sink's epoch output sent and acknowledged) and
//! `after-delivery` (step 3 done, `delivered` not yet written).
//!
//! A crash in the middle of a WAL write leaves a torn record at the tail, which open cuts
//! off; corruption anywhere else stops the start with the file and offset.

pub mod arena;
pub mod checkpoint;
pub mod entry;
pub mod storage;
pub mod wal;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use entry::{
    CommitEntry, KIND_COMMIT, KIND_DELIVERED, KIND_OUTPUT, KIND_STATE, OutputChunk, OutputRecord,
    StateOp,
};
use storage::{DiskStorage, Storage};
use wal::{Wal, WalError, WalRecord};

use crate::state::StateStore;
use crate::state::mmap::{MmapStore, OpenError};

/// WAL bytes written since the last checkpoint that make the next one due, at least.
/// A checkpoint is also due once the WAL since the last one outgrows the state itself,
/// so writing checkpoints costs at most as much as writing the WAL.
pub const CHECKPOINT_WAL_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("state directory {dir}: {message}")]
    Dir { dir: String, message: String },
    #[error("state directory is corrupt: {0}")]
    Corrupt(String),
    #[error("checkpoint {file}: {source}")]
    Checkpoint {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("recovering state: {0}")]
    State(#[from] crate::state::StateError),
    /// An `fsync` of a state file failed. Never retried: Linux may mark the pages clean
    /// with their data lost, so the run stops and the next start recovers from the last
    /// checkpoint and the WAL.
    #[error(
        "fdatasync of {file} failed: {source}; stopping (a failed sync is never retried; the next start recovers from the last checkpoint and the WAL)"
    )]
    Sync {
        file: String,
        #[source]
        source: std::io::Error,
    },
}

/// One reactor's WAL, handed to the reactor thread that writes it: its operators' state
/// changes, appended and synced there, in parallel with the other reactors and with no
/// lock shared with them.
pub struct ReactorWal {
    pub index: u32,
    pub wal: Wal,
}

/// What a reactor wrote to its WAL for an epoch: the LSN of its last record, made durable
/// before the epoch's commit entry, which records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReactorLog {
    pub index: u32,
    pub lsn: u64,
    pub appends: u64,
    pub bytes: u64,
    /// How long its `fdatasync` took.
    pub sync: Duration,
}

/// The tombstone of a run that drained every source.
const DRAINED: &str = "DRAINED";

/// For each reactor WAL, the highest position any of `checkpoints` records for it: the
/// store of any of them holds its records up to there, and a new WAL for it numbers its
/// records past it.
fn lsn_floors(checkpoints: &[BTreeMap<u32, u64>]) -> BTreeMap<u32, u64> {
    let mut floors = BTreeMap::new();
    for (&index, &lsn) in checkpoints.iter().flatten() {
        let floor = floors.entry(index).or_insert(0);
        *floor = lsn.max(*floor);
    }
    floors
}

/// A commit entry's reactor WAL positions.
fn positions(commit: &CommitEntry) -> BTreeMap<u32, u64> {
    commit.reactor_wals.iter().copied().collect()
}

/// Deletes the WAL segments and checkpoints among `names`, then the tombstone.
fn clear(storage: &mut dyn Storage, names: &[String]) -> std::io::Result<()> {
    for name in names {
        if name.starts_with("wal-") || name.starts_with("checkpoint-") || name.starts_with("arena-")
        {
            storage.remove(name)?;
        }
    }
    storage.sync_dir()?;
    storage.remove(DRAINED)?;
    storage.sync_dir()
}

/// What recovery found.
pub struct Recovered {
    pub store: MmapStore,
    /// The last complete commit entry; `None` on a first start.
    pub commit: Option<CommitEntry>,
    /// Output of the last committed epoch not recorded as delivered, per sink.
    pub undelivered: Vec<OutputChunk>,
    /// Epoch of the checkpoint recovery started from.
    pub checkpoint_epoch: Option<u64>,
    /// Epochs replayed from the WAL after it.
    pub replayed_epochs: u64,
    /// Bytes cut off the WAL's tail as a torn write.
    pub torn_bytes: u64,
    pub duration: Duration,
}

/// Durability counters, for metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct DurableStats {
    pub wal: wal::WalStats,
    pub checkpoints: u64,
    pub last_checkpoint: Option<checkpoint::CheckpointMeta>,
    pub last_checkpoint_duration: Duration,
    pub last_commit_epoch: u64,
    /// Checkpoints that failed (each retried later; the WAL still holds their epochs).
    pub checkpoint_failures: u64,
    /// The reactors' WALs together; `last_sync` is the slowest sync of the last epoch.
    pub reactor_wal: wal::WalStats,
}

/// A checkpoint whose arena is being synced on a checkpoint thread.
struct Pending {
    meta: checkpoint::CheckpointMeta,
    commit: CommitEntry,
    started: Instant,
    job: std::thread::JoinHandle<std::io::Result<()>>,
}

/// A compaction of the state arena running on a thread of its own.
struct Compaction {
    /// The arena generation it writes.
    generation: u64,
    /// Arena bytes of the snapshot it copies; what was appended after them is copied when
    /// the compacted store is adopted.
    snapshot_len: u64,
    started: Instant,
    job: std::thread::JoinHandle<Result<MmapStore, crate::state::StateError>>,
}

/// The arena share of dead bytes past which a checkpoint compacts first.
pub const COMPACT_DEAD_RATIO: f64 = 0.5;
/// Arenas smaller than this are not compacted (the copy would buy little).
pub const COMPACT_ARENA_MIN: u64 = 64 << 20;

/// Checkpoints that may fail in a row before the run stops with the last failure. A
/// failed checkpoint loses nothing (the WAL since the last good one is kept), so it is
/// retried; a checkpoint that keeps failing would grow the WAL and the recovery time
/// without bound, and the operator has to look.
pub const CHECKPOINT_FAILURES_MAX: u32 = 5;
/// Wait before retrying a failed checkpoint; doubled for each further failure in a row.
pub const CHECKPOINT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// A pipeline's WAL and checkpoints in its state directory.
pub struct Durable {
    wal: Wal,
    /// Checkpoints on disk, oldest first.
    checkpoints: Vec<checkpoint::CheckpointMeta>,
    /// Each checkpoint's reactor WAL positions (its commit entry's), in the same order.
    checkpoint_wals: Vec<BTreeMap<u32, u64>>,
    /// Each reactor WAL's committed position, as the next commit entry records it.
    reactor_wals: BTreeMap<u32, u64>,
    /// Reactor WALs recovery opened that no reactor has claimed yet.
    unclaimed: BTreeMap<u32, Wal>,
    /// Reactor WALs no reactor of this run writes (the run has fewer): kept until the
    /// oldest retained checkpoint covers all they hold.
    retired: BTreeMap<u32, Wal>,
    /// WAL bytes appended when the last checkpoint was written.
    wal_bytes_at_checkpoint: u64,
    /// LSN and entry of the last commit (or delivered) record.
    last_lsn: u64,
    last_commit: Option<CommitEntry>,
    stats: DurableStats,
    /// The checkpoint in flight, if any: at most one.
    pending: Option<Pending>,
    /// The compaction in flight, if any: at most one.
    compaction: Option<Compaction>,
    /// The store moved to a compacted arena since the last checkpoint: the next one is
    /// due, so that the old arena can go.
    compacted: bool,
    /// Sync arenas for checkpoints on a thread of their own (tests turn it off to make
    /// the order of sync calls deterministic).
    background: bool,
    /// A checkpoint compacts the arena first when its dead share is above `ratio` and it
    /// holds at least `min` bytes ([`COMPACT_DEAD_RATIO`], [`COMPACT_ARENA_MIN`]).
    compact_ratio: f64,
    compact_min: u64,
    /// WAL bytes since the last checkpoint that make one due ([`CHECKPOINT_WAL_BYTES`]).
    checkpoint_wal_bytes: u64,
    /// First wait before retrying a failed checkpoint ([`CHECKPOINT_RETRY_AFTER`]).
    retry_after: Duration,
    /// Checkpoints failed since the last one that succeeded.
    failures_in_a_row: u32,
    /// No checkpoint is started before this (but a forced one) after a failure.
    retry_at: Option<Instant>,
    /// Held for the life of the process: a second laminar on the directory fails.
    #[allow(dead_code, reason = "held, never read")]
    lock: Option<std::fs::File>,
}

/// Applies the state changes the reactor WALs hold for the commit `entry`: each reactor's
/// records after what is `applied` up to the LSN the entry records for it, in reactor
/// order (each reactor writes its own keys; what they all write is the same).
fn replay_reactors(
    store: &mut MmapStore,
    entry: &CommitEntry,
    reactors: &BTreeMap<u32, (Wal, Vec<WalRecord>)>,
    applied: &mut BTreeMap<u32, u64>,
) -> Result<(), DurableError> {
    for &(index, lsn) in &entry.reactor_wals {
        let done = applied.entry(index).or_insert(0);
        if *done >= lsn {
            continue;
        }
        let records = reactors.get(&index).map_or(&[][..], |(_, r)| r.as_slice());
        let from = records.partition_point(|r| r.lsn <= *done);
        for record in &records[from..] {
            if record.lsn > lsn {
                break;
            }
            let corrupt = |message: String| {
                DurableError::Corrupt(format!(
                    "reactor WAL {index}, record {}: {message}",
                    record.lsn
                ))
            };
            if record.lsn != *done + 1 {
                return Err(corrupt(format!("record {} is missing", *done + 1)));
            }
            if record.kind != KIND_STATE {
                return Err(corrupt(format!(
                    "kind {} where state changes were expected",
                    record.kind
                )));
            }
            let (epoch, ops) = entry::decode_state(&record.payload).map_err(|e| corrupt(e.0))?;
            if epoch != entry.epoch {
                return Err(corrupt(format!(
                    "changes of epoch {epoch} under the commit entry of epoch {}",
                    entry.epoch
                )));
            }
            for op in &ops {
                store.apply(op)?;
            }
            *done = record.lsn;
        }
        if *done < lsn {
            return Err(DurableError::Corrupt(format!(
                "reactor WAL {index} ends before record {}, which the commit entry of epoch {} \
                 needs (it records LSN {lsn})",
                *done + 1,
                entry.epoch
            )));
        }
    }
    Ok(())
}

impl Durable {
    /// Opens the state directory `dir` (creating it), locks it, and recovers.
    pub fn open_dir(
        dir: &Path,
        memory_bytes_max: u64,
        arena: arena::ArenaOptions,
    ) -> Result<(Self, Recovered), DurableError> {
        let dir_error = |message: String| DurableError::Dir {
            dir: dir.display().to_string(),
            message,
        };
        let mut storage = DiskStorage::open(dir).map_err(|e| dir_error(e.to_string()))?;
        storage.set_arena_options(arena);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(|e| dir_error(format!("cannot open its LOCK file: {e}")))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(dir_error(
                    "another laminar process is using it (LOCK is held); \
                     give each pipeline its own state.dir"
                        .to_owned(),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(dir_error(format!("cannot lock it: {e}")));
            }
        }
        let (mut durable, recovered) = Self::open(Box::new(storage), memory_bytes_max)?;
        durable.lock = Some(lock);
        Ok((durable, recovered))
    }

    /// Recovers from `storage`: newest valid checkpoint, then the WAL after it.
    pub fn open(
        mut storage: Box<dyn Storage>,
        memory_bytes_max: u64,
    ) -> Result<(Self, Recovered), DurableError> {
        let started = Instant::now();
        let list_error = |storage: &dyn Storage| {
            let file = storage.describe("");
            move |source| DurableError::Checkpoint { file, source }
        };
        let mut names = storage.list().map_err(list_error(storage.as_ref()))?;
        if names.iter().any(|n| n == DRAINED) {
            // A run that drained every source was clearing its state when it stopped.
            clear(storage.as_mut(), &names).map_err(list_error(storage.as_ref()))?;
            names = storage.list().map_err(list_error(storage.as_ref()))?;
        }
        for stale in names.iter().filter(|n| n.ends_with(".ckpt.tmp")) {
            // A checkpoint that was being written when the process stopped.
            let _ = storage.remove(stale);
        }
        let mut epochs: Vec<u64> = names
            .iter()
            .filter_map(|n| checkpoint::parse_name(n))
            .collect();
        epochs.sort_unstable();
        // Newest first: the first whose file and arena verify is loaded; older valid ones
        // are kept to fall back on. A checkpoint newer than the loaded one is deleted
        // before anything is written: its arena bytes past the loaded length are about to
        // be written over.
        let mut loaded: Option<(checkpoint::CheckpointMeta, CommitEntry, MmapStore)> = None;
        let mut checkpoints = Vec::new();
        let mut checkpoint_wals = Vec::new();
        let mut unusable = Vec::new();
        for &epoch in epochs.iter().rev() {
            let name = checkpoint::file_name(epoch);
            let file = storage.describe(&name);
            // A file that cannot be read is an I/O error, not corruption: stop rather
            // than fall back (and delete) past it.
            let data = storage
                .read(&name)
                .map_err(|source| DurableError::Checkpoint {
                    file: file.clone(),
                    source,
                })?;
            let meta = checkpoint::load(&data)
                .map_err(|e| e.0)
                .and_then(|(meta, commit)| {
                    if meta.arena_len < crate::state::mmap::ARENA_HEADER {
                        Err(format!(
                            "arena length {} is shorter than its header",
                            meta.arena_len
                        ))
                    } else {
                        Ok((meta, commit))
                    }
                });
            let result = match meta {
                Err(message) => Err(message),
                Ok((meta, commit)) if loaded.is_some() => Ok((meta, positions(&commit), None)),
                Ok((meta, commit)) => {
                    let arena_name = checkpoint::arena_name(meta.generation);
                    match storage.open_arena(&arena_name, Some(meta.arena_len)) {
                        // Missing or short: the arena is not what the checkpoint says.
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof
                            ) =>
                        {
                            Err(format!("{}: {e}", storage.describe(&arena_name)))
                        }
                        Err(source) => {
                            return Err(DurableError::Checkpoint {
                                file: storage.describe(&arena_name),
                                source,
                            });
                        }
                        Ok(arena) => {
                            match MmapStore::open(arena, meta.generation, memory_bytes_max) {
                                Ok(store) => Ok((meta, positions(&commit), Some((commit, store)))),
                                Err(OpenError::Corrupt(e)) => {
                                    Err(format!("{}: {e}", storage.describe(&arena_name)))
                                }
                                Err(OpenError::State(e)) => return Err(DurableError::State(e)),
                            }
                        }
                    }
                }
            };
            match result {
                Ok((meta, wals, Some((commit, store)))) => {
                    checkpoints.push(meta);
                    checkpoint_wals.push(wals);
                    loaded = Some((meta, commit, store));
                }
                Ok((meta, wals, None)) => {
                    checkpoints.push(meta);
                    checkpoint_wals.push(wals);
                }
                Err(message) => {
                    tracing::error!(
                        file,
                        "checkpoint is unusable ({message}); falling back to an older one"
                    );
                    if loaded.is_none() {
                        unusable.push(name);
                    }
                }
            }
        }
        checkpoints.reverse();
        checkpoint_wals.reverse();
        let io = |file: String| move |source| DurableError::Checkpoint { file, source };
        let first_arena = names
            .iter()
            .filter_map(|n| checkpoint::parse_arena_name(n))
            .max()
            .map_or(1, |g| g + 1);
        let (store, loaded) = if let Some((meta, commit, store)) = loaded {
            (store, Some((meta, commit)))
        } else {
            let name = checkpoint::arena_name(first_arena);
            let arena = storage
                .open_arena(&name, None)
                .map_err(io(storage.describe(&name)))?;
            let store =
                MmapStore::open(arena, first_arena, memory_bytes_max).map_err(|e| match e {
                    OpenError::State(e) => DurableError::State(e),
                    OpenError::Corrupt(e) => DurableError::Corrupt(e),
                })?;
            (store, None)
        };
        storage.sync_dir().map_err(io(storage.describe("")))?;
        let (mut wal, records) = Wal::open(storage)?;
        if loaded.is_none() && !unusable.is_empty() && records.first().is_none_or(|r| r.lsn > 1) {
            // Nothing to recover from: leave the directory as it is for an operator.
            return Err(DurableError::Corrupt(format!(
                "no checkpoint is usable ({}) and the WAL no longer reaches back to its start",
                unusable.join(", ")
            )));
        }
        // Unusable checkpoints newer than the one loaded go before anything is appended
        // over the arena bytes they cover; then arenas no retained checkpoint needs
        // (compactions after the last checkpoint, or every arena on a first start).
        let storage = wal.storage();
        for name in &unusable {
            storage.remove(name).map_err(io(storage.describe(name)))?;
        }
        for name in &names {
            if let Some(generation) = checkpoint::parse_arena_name(name)
                && !checkpoints.iter().any(|c| c.generation == generation)
            {
                storage.remove(name).map_err(io(storage.describe(name)))?;
            }
        }
        storage.sync_dir().map_err(io(storage.describe("")))?;
        let mut reactors = BTreeMap::new();
        let indexes: std::collections::BTreeSet<u32> = names
            .iter()
            .filter_map(|n| wal::parse_reactor_segment(n))
            .collect();
        let floors = lsn_floors(&checkpoint_wals);
        for index in indexes {
            let handle = storage.handle().map_err(io(storage.describe("")))?;
            reactors.insert(
                index,
                // A WAL that has to start again (its only segment's header was torn)
                // numbers past what checkpoints record for it, as a new one does.
                Wal::open_named(
                    handle,
                    &wal::reactor_prefix(index),
                    floors.get(&index).map_or(1, |f| f + 1),
                )?,
            );
        }
        let mut durable = Self {
            wal,
            checkpoints,
            checkpoint_wals,
            reactor_wals: BTreeMap::new(),
            unclaimed: BTreeMap::new(),
            retired: BTreeMap::new(),
            wal_bytes_at_checkpoint: 0,
            last_lsn: 0,
            last_commit: None,
            stats: DurableStats::default(),
            pending: None,
            compaction: None,
            compacted: false,
            background: true,
            compact_ratio: COMPACT_DEAD_RATIO,
            compact_min: COMPACT_ARENA_MIN,
            checkpoint_wal_bytes: CHECKPOINT_WAL_BYTES,
            retry_after: CHECKPOINT_RETRY_AFTER,
            failures_in_a_row: 0,
            retry_at: None,
            lock: None,
        };
        let recovered = durable.replay(store, loaded, &records, reactors, started)?;
        Ok((durable, recovered))
    }

    fn replay(
        &mut self,
        mut store: MmapStore,
        loaded: Option<(checkpoint::CheckpointMeta, CommitEntry)>,
        records: &[WalRecord],
        reactors: BTreeMap<u32, (Wal, Vec<WalRecord>)>,
        started: Instant,
    ) -> Result<Recovered, DurableError> {
        let corrupt = |lsn: u64, e: crate::state::codec::CodecError| {
            DurableError::Corrupt(format!("WAL record {lsn}: {}", e.0))
        };
        let (mut commit, from_lsn, checkpoint_epoch) = match loaded {
            Some((meta, commit)) => (Some(commit), meta.lsn, Some(meta.epoch)),
            None => (None, 0, None),
        };
        // How far each reactor WAL's changes are in the store: the checkpoint's positions.
        // An index the checkpoint does not list may be a WAL made again after an older
        // retained checkpoint held all of its first life: what that one records is in
        // the store too (positions only grow), and the new WAL starts after it.
        let mut applied = lsn_floors(&self.checkpoint_wals);
        if let Some(first) = records.first()
            && first.lsn > from_lsn + 1
            && from_lsn > 0
        {
            return Err(DurableError::Corrupt(format!(
                "the WAL starts at record {} but the checkpoint of epoch {} needs it from record {}",
                first.lsn,
                checkpoint_epoch.unwrap_or(0),
                from_lsn + 1
            )));
        }
        if from_lsn == 0 && records.first().is_some_and(|r| r.lsn > 1) {
            return Err(DurableError::Corrupt(
                "the WAL's first segments were deleted but no checkpoint covers them".to_owned(),
            ));
        }
        let mut pending_ops: Vec<StateOp> = Vec::new();
        let mut pending_out: Vec<OutputChunk> = Vec::new();
        let mut undelivered = Vec::new();
        let mut keep: Option<&WalRecord> = None;
        let mut replayed_epochs = 0;
        for record in records {
            if record.lsn <= from_lsn {
                if matches!(record.kind, KIND_COMMIT | KIND_DELIVERED) {
                    keep = Some(record);
                }
                continue;
            }
            match record.kind {
                KIND_STATE => {
                    let (_, ops) =
                        entry::decode_state(&record.payload).map_err(|e| corrupt(record.lsn, e))?;
                    pending_ops.extend(ops);
                }
                KIND_OUTPUT => {
                    pending_out.push(
                        entry::decode_output(&record.payload)
                            .map_err(|e| corrupt(record.lsn, e))?,
                    );
                }
                KIND_COMMIT => {
                    let entry =
                        CommitEntry::decode(&record.payload).map_err(|e| corrupt(record.lsn, e))?;
                    for op in pending_ops.drain(..) {
                        store.apply(&op)?;
                    }
                    replay_reactors(&mut store, &entry, &reactors, &mut applied)?;
                    undelivered = std::mem::take(&mut pending_out);
                    undelivered.retain(|c: &OutputChunk| c.epoch == entry.epoch);
                    commit = Some(entry);
                    keep = Some(record);
                    replayed_epochs += 1;
                }
                KIND_DELIVERED => {
                    let epoch = entry::decode_delivered(&record.payload)
                        .map_err(|e| corrupt(record.lsn, e))?;
                    if commit.as_ref().is_some_and(|c| c.epoch == epoch) {
                        undelivered.clear();
                    }
                    keep = Some(record);
                }
                kind => {
                    return Err(DurableError::Corrupt(format!(
                        "WAL record {} has unknown kind {kind}",
                        record.lsn
                    )));
                }
            }
        }
        if keep.is_none_or(|k| k.lsn < from_lsn) && from_lsn > 0 {
            return Err(DurableError::Corrupt(format!(
                "the WAL does not reach record {from_lsn}, which the newest checkpoint covers"
            )));
        }
        let dropped = records.len()
            - keep.map_or(0, |k| {
                records
                    .iter()
                    .position(|r| r.lsn == k.lsn)
                    .map_or(0, |i| i + 1)
            });
        if dropped > 0 {
            tracing::info!(
                records = dropped,
                "discarding WAL records of an epoch that never committed"
            );
        }
        self.wal.cut_after(keep)?;
        self.last_lsn = keep.map_or(0, |k| k.lsn);
        self.reactor_wals = commit.as_ref().map(positions).unwrap_or_default();
        // A listed WAL that is gone was deleted once checkpoints held all of it (the
        // replay above fails if anything of it was still needed): no longer listed.
        self.reactor_wals
            .retain(|index, _| reactors.contains_key(index));
        for (index, (mut wal, records)) in reactors {
            // What follows the last committed position belongs to an epoch that never
            // committed.
            let last = match self.reactor_wals.get(&index) {
                None => None,
                Some(&lsn) => match records.iter().find(|r| r.lsn == lsn) {
                    Some(record) => Some(record),
                    // Made again after its first life was deleted (at the checkpoint after
                    // the last commit): it starts after the position that commit records.
                    None if wal.first_lsn() == lsn + 1 => None,
                    None => {
                        return Err(DurableError::Corrupt(format!(
                            "reactor WAL {index} does not hold record {lsn}, which the last \
                             commit entry records"
                        )));
                    }
                },
            };
            let cut = records
                .iter()
                .filter(|r| last.is_none_or(|l| r.lsn > l.lsn))
                .count();
            if cut > 0 {
                tracing::info!(
                    wal = index,
                    records = cut,
                    "discarding reactor WAL records of an epoch that never committed"
                );
            }
            wal.cut_after(last)?;
            self.unclaimed.insert(index, wal);
        }
        self.stats.last_commit_epoch = commit.as_ref().map_or(0, |c| c.epoch);
        self.stats.last_checkpoint = self.checkpoints.last().copied();
        self.last_commit.clone_from(&commit);
        store.enable_journal();
        Ok(Recovered {
            store,
            commit,
            undelivered,
            checkpoint_epoch,
            replayed_epochs,
            torn_bytes: self.wal.stats().torn_bytes,
            duration: started.elapsed(),
        })
    }

    /// The WAL of reactor `index`, for its thread: the one recovery opened, or a new one.
    /// Claim every reactor's before the first commit: a WAL recovery opened and no
    /// reactor claimed is retired then.
    pub fn reactor_wal(&mut self, index: u32) -> Result<ReactorWal, DurableError> {
        // Numbered past every position a retained checkpoint records for this index, so
        // that no old position covers a new record.
        let floor = lsn_floors(&self.checkpoint_wals)
            .get(&index)
            .copied()
            .unwrap_or(0);
        if let Some(wal) = self.unclaimed.remove(&index) {
            assert!(
                wal.next_lsn() > floor,
                "reactor WAL {index} would number records a checkpoint covers"
            );
            return Ok(ReactorWal { index, wal });
        }
        let storage = self.wal.storage();
        let handle = storage
            .handle()
            .map_err(|source| DurableError::Checkpoint {
                file: storage.describe(""),
                source,
            })?;
        let wal = Wal::open_named(handle, &wal::reactor_prefix(index), floor + 1)?.0;
        Ok(ReactorWal { index, wal })
    }

    /// The LSN below which reactor `index` may delete its WAL's segments: the position
    /// the oldest retained checkpoint records for it (0: none yet).
    #[must_use]
    pub fn reactor_retain_from(&self, index: u32) -> u64 {
        self.checkpoint_wals
            .first()
            .and_then(|w| w.get(&index))
            .copied()
            .unwrap_or(0)
    }

    /// Makes epoch `commit.epoch` durable: its state changes, its exactly-once output and
    /// its commit entry, with one `fdatasync`. `logged`: what the reactors wrote to their
    /// own WALs for the epoch, already durable; the commit entry records where each of
    /// them (and every other reactor WAL recovery may need) ends.
    pub fn commit(
        &mut self,
        ops: &[StateOp],
        outputs: &[(&str, &[OutputRecord])],
        commit: &CommitEntry,
        logged: &[ReactorLog],
    ) -> Result<(), DurableError> {
        self.retired.append(&mut self.unclaimed);
        let mut slowest = Duration::ZERO;
        for log in logged {
            self.reactor_wals.insert(log.index, log.lsn);
            let stats = &mut self.stats.reactor_wal;
            stats.appends += log.appends;
            stats.bytes += log.bytes;
            stats.syncs += 1;
            slowest = slowest.max(log.sync);
        }
        if !logged.is_empty() {
            self.stats.reactor_wal.last_sync = slowest;
        }
        let mut commit = commit.clone();
        commit.reactor_wals = self.reactor_wals.iter().map(|(&i, &l)| (i, l)).collect();
        let commit = &commit;
        for payload in entry::encode_state(commit.epoch, ops) {
            self.wal.append(KIND_STATE, &payload)?;
        }
        for (sink, records) in outputs {
            for payload in entry::encode_output(commit.epoch, sink, records) {
                self.wal.append(KIND_OUTPUT, &payload)?;
            }
        }
        self.last_lsn = self.wal.append(KIND_COMMIT, &commit.encode())?;
        self.wal.sync()?;
        self.last_commit = Some(commit.clone());
        self.stats.last_commit_epoch = commit.epoch;
        Ok(())
    }

    /// Records that every exactly-once output of `epoch` was acknowledged. Durable with
    /// the next commit (losing it only makes recovery read the output back).
    pub fn delivered(&mut self, epoch: u64) -> Result<(), DurableError> {
        self.last_lsn = self
            .wal
            .append(KIND_DELIVERED, &entry::encode_delivered(epoch))?;
        Ok(())
    }

    /// Starts a checkpoint of `store` when one is due (or `force`), after finishing the
    /// one in flight if its arena sync is done. Call after `delivered`.
    ///
    /// A checkpoint records the arena's length as of the last commit; its arena is synced
    /// on a checkpoint thread while the pipeline goes on, and the checkpoint file is
    /// written, and the checkpoints, arenas and WAL segments it makes unnecessary are
    /// deleted, at a later call once the sync is done. With `force` (the last epoch of a
    /// run) it all happens before the call returns.
    ///
    /// A checkpoint that fails is counted, logged and retried after
    /// [`CHECKPOINT_RETRY_AFTER`] (doubling): nothing is lost, as the WAL is kept from
    /// the last good checkpoint on. The error is returned when the checkpoint was forced,
    /// when an `fsync` failed (never retried) or the WAL did, or at the
    /// [`CHECKPOINT_FAILURES_MAX`]-th failure in a row.
    pub fn maybe_checkpoint(
        &mut self,
        store: &mut MmapStore,
        force: bool,
    ) -> Result<bool, DurableError> {
        let finished = match self.finish_pending(force, store.generation()) {
            Ok(finished) => finished,
            Err(e) => {
                self.checkpoint_failed(e, force)?;
                false
            }
        };
        self.finish_compaction(store, force)?;
        let Some(commit) = self.last_commit.clone() else {
            return Ok(finished);
        };
        let since = self.wal_bytes() - self.wal_bytes_at_checkpoint;
        let due = since >= self.checkpoint_wal_bytes.max(store.bytes()) || self.compacted;
        let waiting = self.retry_at.is_some_and(|at| Instant::now() < at);
        if !(due && !waiting || force)
            || self.pending.is_some()
            || self
                .checkpoints
                .last()
                .is_some_and(|c| c.epoch == commit.epoch)
        {
            return Ok(finished);
        }
        match self.start_checkpoint(store, force) {
            Ok(()) => Ok(true),
            Err(e) => {
                self.checkpoint_failed(e, force)?;
                Ok(finished)
            }
        }
    }

    /// Counts a failed checkpoint and decides whether the run goes on (see
    /// [`Durable::maybe_checkpoint`]).
    fn checkpoint_failed(&mut self, error: DurableError, force: bool) -> Result<(), DurableError> {
        self.stats.checkpoint_failures += 1;
        self.failures_in_a_row += 1;
        if force
            || matches!(error, DurableError::Wal(_) | DurableError::Sync { .. })
            || self.failures_in_a_row >= CHECKPOINT_FAILURES_MAX
        {
            return Err(error);
        }
        let wait = self.retry_after * 2_u32.pow(self.failures_in_a_row - 1);
        self.retry_at = Some(Instant::now() + wait);
        tracing::error!(
            failures_in_a_row = self.failures_in_a_row,
            retry_in_ms = wait.as_millis() as u64,
            "checkpoint failed ({error}); nothing is lost (the WAL since the last checkpoint \
             is kept) and it is retried; the run stops after {CHECKPOINT_FAILURES_MAX} \
             failures in a row"
        );
        Ok(())
    }

    /// Starts a checkpoint of `store` as of the last commit, now; with `wait`, finishes
    /// it before returning. Does nothing while another is in flight or before a commit.
    pub fn start_checkpoint(
        &mut self,
        store: &mut MmapStore,
        wait: bool,
    ) -> Result<(), DurableError> {
        let Some(commit) = self.last_commit.clone() else {
            return Ok(());
        };
        if self.pending.is_some()
            || self
                .checkpoints
                .last()
                .is_some_and(|c| c.epoch == commit.epoch)
        {
            return Ok(());
        }
        let started = Instant::now();
        // The delivered record (if any) must be durable before a checkpoint covers it.
        self.wal.sync()?;
        if self.compaction.is_none()
            && store.fragmentation() > self.compact_ratio
            && store.arena_bytes() >= self.compact_min
        {
            // Compacts on a thread of its own; this checkpoint covers the arena as it is,
            // a later one the compacted arena.
            if let Err(e) = self.start_compaction(store) {
                tracing::warn!("cannot compact the state arena ({e}); it stays as it is");
                let name = checkpoint::arena_name(store.generation() + 1);
                let _ = self.wal.storage().remove(&name);
            } else if !self.background {
                self.finish_compaction(store, true)?;
            }
        }
        let meta = checkpoint::CheckpointMeta {
            epoch: commit.epoch,
            lsn: self.last_lsn,
            wall_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
            generation: store.generation(),
            arena_len: store.arena_bytes(),
            live_bytes: store.bytes(),
            keys: store.keys(),
        };
        let arena_name = checkpoint::arena_name(meta.generation);
        let sync = store.syncer().map_err(|source| DurableError::Checkpoint {
            file: self.wal.storage().describe(&arena_name),
            source,
        })?;
        let job = if self.background && !wait {
            std::thread::Builder::new()
                .name("laminar-checkpoint".to_owned())
                .spawn(sync)
                .map_err(|source| DurableError::Checkpoint {
                    file: arena_name,
                    source,
                })?
        } else {
            let result = sync();
            std::thread::spawn(move || result)
        };
        self.pending = Some(Pending {
            meta,
            commit,
            started,
            job,
        });
        self.compacted = false;
        if wait || !self.background {
            self.finish_pending(true, store.generation())?;
        }
        Ok(())
    }

    /// Waits for the checkpoint in flight, if any, and finishes it.
    pub fn wait_checkpoint(&mut self, store: &MmapStore) -> Result<bool, DurableError> {
        self.finish_pending(true, store.generation())
    }

    /// Starts compacting `store` on a thread of its own (on this one when checkpoints
    /// are not in the background): its live records as of now are copied into a new
    /// arena generation, which [`Durable::finish_compaction`] adopts.
    fn start_compaction(&mut self, store: &MmapStore) -> Result<(), DurableError> {
        let generation = store.generation() + 1;
        let name = checkpoint::arena_name(generation);
        let storage = self.wal.storage();
        let io = |file: String| move |source| DurableError::Checkpoint { file, source };
        let arena = storage
            .open_arena(&name, None)
            .map_err(io(storage.describe(&name)))?;
        storage.sync_dir().map_err(io(storage.describe("")))?;
        let (snapshot, snapshot_len) = store.snapshot().map_err(io(
            storage.describe(&checkpoint::arena_name(store.generation()))
        ))?;
        let from = store.generation();
        let compact = move || MmapStore::compact_snapshot(snapshot, from, arena, generation);
        let job = if self.background {
            std::thread::Builder::new()
                .name("laminar-compaction".to_owned())
                .spawn(compact)
                .map_err(io(name))?
        } else {
            let result = compact();
            std::thread::spawn(move || result)
        };
        self.compaction = Some(Compaction {
            generation,
            snapshot_len,
            started: Instant::now(),
            job,
        });
        Ok(())
    }

    /// Adopts the compaction in flight once it is done (waiting for it when `wait`):
    /// the records appended since its snapshot are copied after the compacted ones, and
    /// the store moves to the new arena. Returns how long that held the caller (not
    /// counting a wait for the thread). A
    /// compaction that failed leaves the store as it was (logged; tried again later).
    pub fn finish_compaction(
        &mut self,
        store: &mut MmapStore,
        wait: bool,
    ) -> Result<Option<Duration>, DurableError> {
        let Some(compaction) = self.compaction.take_if(|c| wait || c.job.is_finished()) else {
            return Ok(None);
        };
        let (before, fragmentation) = (store.arena_bytes(), store.fragmentation());
        let joined = compaction.job.join().unwrap_or_else(|_| {
            Err(crate::state::StateError::Io(std::io::Error::other(
                "the compaction thread panicked",
            )))
        });
        // Only this part holds the caller once the thread is done.
        let held = Instant::now();
        let adopted =
            joined.and_then(|compacted| store.adopt_compaction(compacted, compaction.snapshot_len));
        match adopted {
            Ok(old) => {
                // Freeing the old index of a large state takes a while: not here.
                let dropped = std::thread::Builder::new()
                    .name("laminar-compaction".to_owned())
                    .spawn(move || drop(old));
                if let Err(e) = dropped {
                    tracing::debug!("freeing the old state index on this thread: {e}");
                }
                let pause = held.elapsed();
                tracing::info!(
                    generation = compaction.generation,
                    before_bytes = before,
                    after_bytes = store.arena_bytes(),
                    fragmentation,
                    took_ms = compaction.started.elapsed().as_millis() as u64,
                    held_pipeline_ms = pause.as_millis() as u64,
                    "state arena compacted"
                );
                self.compacted = true;
                Ok(Some(pause))
            }
            Err(e) => {
                tracing::warn!("cannot compact the state arena ({e}); it stays as it is");
                let name = checkpoint::arena_name(compaction.generation);
                let _ = self.wal.storage().remove(&name);
                Ok(None)
            }
        }
    }

    /// Finishes the checkpoint in flight once its arena is durable (waiting for it when
    /// `wait`): writes its file and deletes what it makes unnecessary. `current` is the
    /// store's arena generation, which is never deleted.
    fn finish_pending(&mut self, wait: bool, current: u64) -> Result<bool, DurableError> {
        let Some(pending) = self.pending.take_if(|p| wait || p.job.is_finished()) else {
            return Ok(false);
        };
        let Pending {
            meta,
            commit,
            started,
            job,
        } = pending;
        let arena_name = checkpoint::arena_name(meta.generation);
        let storage = self.wal.storage();
        let io = |file: String| move |source| DurableError::Checkpoint { file, source };
        if let Err(source) = job
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the checkpoint thread panicked")))
        {
            return Err(DurableError::Sync {
                file: storage.describe(&arena_name),
                source,
            });
        }
        let name = checkpoint::file_name(meta.epoch);
        match checkpoint::write(storage, &meta, &commit) {
            Ok(()) => {}
            Err(checkpoint::WriteError::Sync(source)) => {
                return Err(DurableError::Sync {
                    file: storage.describe(&name),
                    source,
                });
            }
            Err(checkpoint::WriteError::Write(e)) => {
                // Half-written: gone, so that no later start trusts it.
                let _ = storage.remove(&format!("{name}.tmp"));
                let _ = storage.remove(&name);
                return Err(io(storage.describe(&name))(e));
            }
        }
        self.failures_in_a_row = 0;
        self.retry_at = None;
        let took = started.elapsed();
        tracing::debug!(
            epoch = meta.epoch,
            arena_bytes = meta.arena_len,
            took_ms = took.as_millis() as u64,
            "checkpoint written"
        );
        self.checkpoints.push(meta);
        self.checkpoint_wals.push(positions(&commit));
        self.stats.checkpoints += 1;
        self.stats.last_checkpoint = Some(meta);
        self.stats.last_checkpoint_duration = took;
        self.wal_bytes_at_checkpoint = self.wal_bytes();
        // What the new checkpoint makes unnecessary goes. A file that cannot be removed
        // stays (and is tried again after the next checkpoint): that costs only space.
        let removed = |storage: &mut dyn Storage, name: &str| match storage.remove(name) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    file = storage.describe(name),
                    "cannot remove ({e}); trying again after the next checkpoint"
                );
                false
            }
        };
        while self.checkpoints.len() > checkpoint::RETAINED {
            let name = checkpoint::file_name(self.checkpoints[0].epoch);
            if !removed(self.wal.storage(), &name) {
                break;
            }
            self.checkpoints.remove(0);
            self.checkpoint_wals.remove(0);
        }
        // The dropped checkpoints are gone for good before what they need goes.
        let storage = self.wal.storage();
        storage.sync_dir().map_err(|source| DurableError::Sync {
            file: storage.describe(""),
            source,
        })?;
        // Arenas neither a retained checkpoint nor the store needs: generations that
        // compaction replaced (not the one a compaction in flight writes).
        let compacting = self.compaction.as_ref().map(|c| c.generation);
        for name in storage.list().map_err(io(storage.describe("")))? {
            if let Some(generation) = checkpoint::parse_arena_name(&name)
                && generation != current
                && Some(generation) != compacting
                && !self.checkpoints.iter().any(|c| c.generation == generation)
            {
                removed(storage, &name);
            }
        }
        // The WAL is kept from the oldest retained checkpoint on, for the fallback.
        let oldest = self.checkpoints[0].lsn;
        self.wal.remove_before(oldest)?;
        // A retired reactor WAL goes once the oldest retained checkpoint holds all of it
        // (the reactors of this run trim their own WALs).
        let oldest = &self.checkpoint_wals[0];
        let reactor_wals = &mut self.reactor_wals;
        self.retired.retain(|&index, wal| {
            if reactor_wals.get(&index) != oldest.get(&index) {
                return true;
            }
            match wal.remove_all() {
                Ok(()) => {
                    reactor_wals.remove(&index);
                    tracing::info!(
                        wal = index,
                        "removed the WAL of a reactor this run does not have"
                    );
                    false
                }
                // It costs only space; tried again after the next checkpoint.
                Err(e) => {
                    tracing::warn!(wal = index, "{e}; trying again after the next checkpoint");
                    true
                }
            }
        });
        Ok(true)
    }

    /// Bytes appended to the pipeline's and the reactors' WALs since the open.
    fn wal_bytes(&self) -> u64 {
        self.wal.stats().bytes + self.stats.reactor_wal.bytes
    }

    /// Syncs arenas for checkpoints on the calling thread (deterministic sync order, for
    /// crash tests).
    pub fn set_background_checkpoints(&mut self, on: bool) {
        self.background = on;
    }

    /// Makes a checkpoint due after `wal_bytes` of WAL (at least the state's size), and
    /// retries a failed one after `retry_after` (doubling), for tests.
    pub fn set_checkpoint_policy(&mut self, wal_bytes: u64, retry_after: Duration) {
        self.checkpoint_wal_bytes = wal_bytes;
        self.retry_after = retry_after;
    }

    /// Compacts the arena at a checkpoint when its dead share is above `ratio` and it
    /// holds at least `min` bytes.
    pub fn set_compaction(&mut self, ratio: f64, min: u64) {
        self.compact_ratio = ratio;
        self.compact_min = min;
    }

    /// Every source is drained and every result delivered: nothing is left to resume,
    /// so the WAL and checkpoints are deleted and the next run starts from the beginning.
    /// A tombstone written first makes a crash half-way finish the job at the next open.
    pub fn finish_drained(mut self) -> Result<(), DurableError> {
        if let Some(pending) = self.pending.take() {
            // Its arena is about to be deleted: only wait for the thread.
            let _ = pending.job.join();
        }
        if let Some(compaction) = self.compaction.take() {
            let _ = compaction.job.join();
        }
        self.wal.sync()?;
        let storage = self.wal.storage();
        let io = |source| DurableError::Checkpoint {
            file: DRAINED.to_owned(),
            source,
        };
        storage.create(DRAINED).map_err(io)?;
        storage.sync(DRAINED).map_err(io)?;
        storage.sync_dir().map_err(io)?;
        let names = storage.list().map_err(io)?;
        clear(storage, &names).map_err(io)
    }

    #[must_use]
    pub fn stats(&self) -> DurableStats {
        DurableStats {
            wal: self.wal.stats(),
            ..self.stats
        }
    }

    /// The last commit entry written or recovered.
    #[must_use]
    pub fn last_commit(&self) -> Option<&CommitEntry> {
        self.last_commit.as_ref()
    }

    /// Epoch of the last commit entry written or recovered (0: none yet).
    #[must_use]
    pub fn last_epoch(&self) -> u64 {
        self.stats.last_commit_epoch
    }
}

#[cfg(test)]
mod tests;
