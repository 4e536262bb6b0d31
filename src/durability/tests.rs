//! WAL and recovery against the simulated disk: round trips, torn tails, bit flips,
//! a crash at every sync point, and injected I/O errors.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::entry::{CommitEntry, OutputRecord, SinkCommit, SourceCommit, StateOp, WatermarkState};
use super::storage::{Fault, SimStorage, Storage};
use super::wal::{RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES, Wal, WalError};
use super::{Durable, DurableError, ReactorLog, entry};
use crate::state::StateStore;
use crate::state::mmap::MmapStore;

const SEGMENT: &str = "wal-0000000000000001.log";

fn open(sim: &SimStorage) -> Result<(Wal, Vec<super::wal::WalRecord>), WalError> {
    Wal::open(Box::new(sim.clone()))
}

fn payloads() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
    proptest::collection::vec(
        (1u8..5, proptest::collection::vec(any::<u8>(), 0..64)),
        1..40,
    )
}

proptest! {
    #[test]
    fn wal_records_round_trip(records in payloads(), sync_every in 1usize..10) {
        let sim = SimStorage::new();
        let (mut wal, old) = open(&sim).unwrap();
        prop_assert!(old.is_empty());
        for (i, (kind, payload)) in records.iter().enumerate() {
            prop_assert_eq!(wal.append(*kind, payload).unwrap(), i as u64 + 1);
            if i % sync_every == 0 {
                wal.sync().unwrap();
            }
        }
        wal.sync().unwrap();
        drop(wal);
        let (_, back) = open(&sim).unwrap();
        let back: Vec<(u8, Vec<u8>)> = back.into_iter().map(|r| (r.kind, r.payload)).collect();
        prop_assert_eq!(back, records);
    }

    /// A crash keeps every synced record and a prefix of the rest; the torn tail is cut
    /// and the log goes on from there.
    #[test]
    fn a_crash_keeps_what_was_synced_and_cuts_the_torn_tail(
        records in payloads(),
        synced in 0usize..40,
        tear in any::<prop::sample::Index>(),
    ) {
        let sim = SimStorage::new();
        let (mut wal, _) = open(&sim).unwrap();
        let synced = synced.min(records.len());
        for (i, (kind, payload)) in records.iter().enumerate() {
            wal.append(*kind, payload).unwrap();
            if i + 1 == synced {
                wal.sync().unwrap();
            }
        }
        // Write (but do not sync) the rest, then lose power part-way through it.
        let _ = wal.remove_before(0);
        drop(wal);
        sim.crash(|unsynced| tear.index(unsynced + 1));
        let (mut wal, back) = open(&sim).unwrap();
        prop_assert!(back.len() >= synced, "lost a synced record");
        for (r, (kind, payload)) in back.iter().zip(&records) {
            prop_assert_eq!((r.kind, &r.payload), (*kind, payload));
        }
        // Appending after recovery continues the sequence and reads back.
        let next = wal.append(9, b"after").unwrap();
        prop_assert_eq!(next, back.len() as u64 + 1);
        wal.sync().unwrap();
        drop(wal);
        let (_, again) = open(&sim).unwrap();
        prop_assert_eq!(again.len(), back.len() + 1);
        prop_assert_eq!(&again[back.len()].payload, b"after");
    }

    /// Flipping any bit of the log is noticed: in the last record it is a torn write
    /// (that record is dropped), anywhere else it is corruption and open refuses.
    #[test]
    fn every_bit_flip_is_detected(records in payloads(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let sim = SimStorage::new();
        let (mut wal, _) = open(&sim).unwrap();
        for (kind, payload) in &records {
            wal.append(*kind, payload).unwrap();
        }
        wal.sync().unwrap();
        drop(wal);
        let len = sim.len(SEGMENT).unwrap();
        let last_start = len - RECORD_HEADER_BYTES - records.last().unwrap().1.len();
        let byte = at.index(len);
        sim.flip_bit(SEGMENT, byte, bit);
        match open(&sim) {
            Ok((_, back)) => {
                prop_assert!(byte >= last_start, "a flip at byte {} of {} went unnoticed", byte, len);
                prop_assert_eq!(back.len(), records.len() - 1);
            }
            Err(WalError::Corrupt { offset, .. }) => {
                prop_assert!(byte < last_start || byte < SEGMENT_HEADER_BYTES);
                prop_assert!(offset as usize <= byte);
            }
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
    }
}

#[test]
fn a_cut_at_every_byte_of_the_tail_opens_to_a_prefix() {
    let sim = SimStorage::new();
    let (mut wal, _) = open(&sim).unwrap();
    for i in 0..5u8 {
        wal.append(1, &vec![i; 10 + usize::from(i)]).unwrap();
    }
    wal.sync().unwrap();
    drop(wal);
    let full = sim.len(SEGMENT).unwrap();
    let snapshot = sim.read(SEGMENT).unwrap();
    for len in SEGMENT_HEADER_BYTES..=full {
        let mut s = sim.clone();
        s.create(SEGMENT).unwrap();
        s.append(SEGMENT, &snapshot[..len]).unwrap();
        s.sync(SEGMENT).unwrap();
        let (_, back) = open(&sim).unwrap();
        let mut end = SEGMENT_HEADER_BYTES;
        let mut whole = 0;
        for i in 0..5 {
            end += RECORD_HEADER_BYTES + 10 + i;
            if end <= len {
                whole += 1;
            }
        }
        assert_eq!(back.len(), whole, "cut at {len}");
    }
}

#[test]
fn segments_rotate_and_old_ones_are_removed() {
    let sim = SimStorage::new();
    let (mut wal, _) = open(&sim).unwrap();
    let big = vec![7u8; 8 << 20];
    for _ in 0..10 {
        wal.append(1, &big).unwrap();
        wal.sync().unwrap();
    }
    assert!(wal.segments() >= 2, "80 MiB spans segments");
    drop(wal);
    let (mut wal, back) = open(&sim).unwrap();
    assert_eq!(back.len(), 10);
    let segments = wal.segments();
    assert!(wal.remove_before(10).unwrap() >= 1);
    assert!(wal.segments() < segments);
    drop(wal);
    let (_, back) = open(&sim).unwrap();
    assert!(back.first().unwrap().lsn > 1 && back.last().unwrap().lsn == 10);
}

#[test]
fn a_corrupt_middle_segment_is_reported_not_skipped() {
    let sim = SimStorage::new();
    let (mut wal, _) = open(&sim).unwrap();
    let big = vec![1u8; 12 << 20];
    for _ in 0..8 {
        wal.append(1, &big).unwrap();
        wal.sync().unwrap();
    }
    drop(wal);
    sim.flip_bit(SEGMENT, SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES + 5, 0);
    let err = open(&sim).err().unwrap();
    assert!(matches!(err, WalError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(SEGMENT), "{err}");
}

type Model = BTreeMap<(String, Vec<u8>), Vec<u8>>;

/// The model of one workload: the state after each committed epoch.
struct Workload {
    epochs: Vec<(Vec<StateOp>, CommitEntry)>,
    /// State after epoch `i + 1`.
    states: Vec<Model>,
}

fn workload(seed: u64, epochs: usize) -> Workload {
    let mut rng = seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut model = BTreeMap::new();
    let mut out = Workload {
        epochs: Vec::new(),
        states: Vec::new(),
    };
    for e in 1..=epochs as u64 {
        let mut ops = Vec::new();
        for _ in 0..(next() % 20) {
            let ns = format!("q{}", next() % 2);
            let key = vec![(next() % 16) as u8];
            if next() % 4 == 0 {
                model.remove(&(ns.clone(), key.clone()));
                ops.push(StateOp::Delete { ns, key });
            } else {
                let value = vec![e as u8; (next() % 100) as usize];
                model.insert((ns.clone(), key.clone()), value.clone());
                ops.push(StateOp::Put { ns, key, value });
            }
        }
        let commit = CommitEntry {
            epoch: e,
            wall_ms: e as i64,
            sources: vec![SourceCommit {
                name: "in".into(),
                positions: vec![
                    ("t".into(), 0, e as i64 * 10),
                    ("t".into(), 1, e as i64 * 7),
                ],
                watermark: Some(WatermarkState {
                    current: e as i64 * 100,
                    partitions: vec![(0, e as i64 * 100), (1, e as i64 * 100 + 5)],
                    // Odd epochs: a source of several topics, with partition ids.
                    slots: if e % 2 == 1 {
                        vec![("t".into(), 0, 1), ("u".into(), 0, 0)]
                    } else {
                        Vec::new()
                    },
                }),
            }],
            sinks: vec![SinkCommit {
                name: "out".into(),
                topic: "o".into(),
                starts: vec![(0, e as i64)],
            }],
            reactor_wals: Vec::new(),
        };
        out.epochs.push((ops, commit));
        out.states.push(model.clone());
    }
    out
}

fn contents<'a>(
    entries: impl Iterator<Item = (&'a str, &'a [u8], &'a [u8])>,
) -> BTreeMap<(String, Vec<u8>), Vec<u8>> {
    entries
        .map(|(ns, k, v)| ((ns.to_owned(), k.to_vec()), v.to_vec()))
        .collect()
}

fn store_contents(store: &MmapStore) -> BTreeMap<(String, Vec<u8>), Vec<u8>> {
    contents(store.entries())
}

fn output(e: u64) -> Vec<OutputRecord> {
    (0..3)
        .map(|i| OutputRecord {
            key: (i % 2 == 0).then(|| vec![i]),
            value: format!("{{\"epoch\":{e},\"i\":{i}}}").into_bytes(),
            // One record in three carries headers from columns and a timestamp.
            headers: if i == 1 {
                vec![
                    ("trace".into(), Some(vec![b'x', i])),
                    ("empty".into(), None),
                ]
            } else {
                Vec::new()
            },
            timestamp: (i == 1).then_some(1_700_000_000_000 + e as i64),
        })
        .collect()
}

/// Runs the workload until the storage fails; returns the last epoch whose commit
/// returned Ok and the epoch being committed when it failed.
fn run(sim: &SimStorage, w: &Workload, checkpoint_every: u64) -> (u64, u64) {
    run_with(sim, w, checkpoint_every, false)
}

/// [`run`], compacting the arena at every checkpoint when `compact`.
fn run_with(sim: &SimStorage, w: &Workload, checkpoint_every: u64, compact: bool) -> (u64, u64) {
    let Ok((mut durable, recovered)) = Durable::open(Box::new(sim.clone()), u64::MAX) else {
        return (0, 0);
    };
    durable.set_background_checkpoints(false);
    if compact {
        durable.set_compaction(0.0, 0);
    }
    let mut store = recovered.store;
    let mut done = 0;
    for (ops, commit) in &w.epochs {
        for op in ops {
            // The arena is on the same disk: its appends fail too.
            if store.apply(op).is_err() {
                return (done, done);
            }
        }
        let journal = store.take_journal();
        let out = output(commit.epoch);
        if durable
            .commit(&journal, &[("out", &out)], commit, &[])
            .is_err()
        {
            return (done, commit.epoch);
        }
        done = commit.epoch;
        if commit.epoch % 3 != 0 && durable.delivered(commit.epoch).is_err() {
            return (done, done);
        }
        if durable
            .maybe_checkpoint(&mut store, commit.epoch % checkpoint_every == 0)
            .is_err()
        {
            return (done, done);
        }
    }
    (done, done)
}

fn check_recovery(sim: &SimStorage, w: &Workload, done: u64, attempted: u64) {
    let (_, recovered) = Durable::open(Box::new(sim.clone()), u64::MAX)
        .unwrap_or_else(|e| panic!("recovery failed after a crash: {e}"));
    let epoch = recovered.commit.as_ref().map_or(0, |c| c.epoch);
    assert!(
        epoch >= done && epoch <= attempted.max(done),
        "recovered epoch {epoch}, committed {done}, attempting {attempted}"
    );
    let want = if epoch == 0 {
        BTreeMap::new()
    } else {
        w.states[epoch as usize - 1].clone()
    };
    assert_eq!(
        store_contents(&recovered.store),
        want,
        "state of epoch {epoch}"
    );
    if epoch > 0 {
        // Where the reactor WALs end is Durable's to fill in.
        let c = &CommitEntry {
            reactor_wals: Vec::new(),
            ..recovered.commit.clone().unwrap()
        };
        assert_eq!(
            c,
            &w.epochs[epoch as usize - 1].1,
            "commit entry of epoch {epoch}"
        );
        // Output of an epoch not marked delivered comes back from the WAL, whole.
        if !recovered.undelivered.is_empty() {
            let records: Vec<OutputRecord> = recovered
                .undelivered
                .iter()
                .flat_map(|c| c.records.clone())
                .collect();
            assert_eq!(records, output(epoch));
        }
    }
}

#[test]
fn recovery_is_right_after_a_crash_at_every_sync_point() {
    let w = workload(7, 12);
    let clean = SimStorage::new();
    run(&clean, &w, 4);
    let syncs = clean.syncs();
    assert!(syncs > 20, "the workload syncs {syncs} times");
    for n in 1..=syncs {
        // How much of the unsynced bytes reached the disk: none, a few, half, all but
        // the last byte (a whole state record without its commit entry), all.
        let tears: [fn(usize) -> usize; 5] = [
            |_| 0,
            |u| u.min(7),
            |u| u / 2,
            |u| u.saturating_sub(1),
            |u| u,
        ];
        for tear in tears {
            let sim = SimStorage::new();
            sim.fail_sync(n, Fault::Crash);
            let (done, attempted) = run(&sim, &w, 4);
            sim.crash(tear);
            check_recovery(&sim, &w, done, attempted);
            // The recovered directory keeps working: finish the workload on it.
            let (done2, _) = run(&sim, &w, 4);
            let _ = done2;
        }
    }
}

#[test]
fn recovery_is_right_after_a_crash_at_every_sync_point_with_compaction() {
    let w = workload(13, 10);
    let clean = SimStorage::new();
    run_with(&clean, &w, 3, true);
    let arenas = |sim: &SimStorage| -> Vec<String> {
        let mut names: Vec<String> = sim
            .list()
            .unwrap()
            .into_iter()
            .filter(|n| n.starts_with("arena-"))
            .collect();
        names.sort();
        names
    };
    // Every checkpoint compacted into a new generation; the two retained checkpoints
    // keep theirs, the older ones are gone.
    let kept = arenas(&clean);
    assert!(
        kept.len() == 2 && kept[1].as_str() > "arena-0000000000000002.dat",
        "{kept:?}"
    );
    for n in 1..=clean.syncs() {
        for tear in [|_| 0, |u: usize| u / 2, |u| u] {
            let sim = SimStorage::new();
            sim.fail_sync(n, Fault::Crash);
            let (done, attempted) = run_with(&sim, &w, 3, true);
            sim.crash(tear);
            check_recovery(&sim, &w, done, attempted);
        }
    }
}

#[test]
fn a_corrupt_arena_record_falls_back_to_the_checkpoint_before_it() {
    let w = workload(3, 9);
    let sim = SimStorage::new();
    let (done, _) = run(&sim, &w, 2);
    assert_eq!(done, 9);
    let mut metas: Vec<super::checkpoint::CheckpointMeta> = sim
        .list()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with("checkpoint-") && !n.contains(".tmp"))
        .map(|n| super::checkpoint::load(&sim.read(&n).unwrap()).unwrap().0)
        .collect();
    metas.sort_by_key(|m| m.epoch);
    let [older, newer] = [metas[0], metas[1]];
    assert_eq!(older.generation, newer.generation);
    assert!(newer.arena_len > older.arena_len);
    let arena = super::checkpoint::arena_name(newer.generation);
    // A flipped bit in what only the newer checkpoint covers: fall back to the older.
    let sim2 = SimStorage::new();
    for name in sim.list().unwrap() {
        sim2.clone().create(&name).unwrap();
        sim2.clone()
            .append(&name, &sim.read(&name).unwrap())
            .unwrap();
    }
    sim2.flip_bit(&arena, newer.arena_len as usize - 3, 1);
    let (_, recovered) = Durable::open(Box::new(sim2.clone()), u64::MAX).unwrap();
    assert_eq!(recovered.checkpoint_epoch, Some(older.epoch));
    assert_eq!(recovered.commit.unwrap().epoch, 9);
    assert_eq!(store_contents(&recovered.store), w.states[8]);
    // ... and the newer checkpoint, whose arena tail is about to be written over, is gone.
    assert!(
        !sim2
            .list()
            .unwrap()
            .contains(&super::checkpoint::file_name(newer.epoch))
    );
    // A flipped bit that both checkpoints cover: neither is usable, and this WAL still
    // reaches back to its first record, so recovery replays all of it.
    sim.flip_bit(&arena, 70, 0);
    let (_, recovered) = Durable::open(Box::new(sim), u64::MAX).unwrap();
    assert_eq!(recovered.checkpoint_epoch, None);
    assert_eq!(recovered.commit.unwrap().epoch, 9);
    assert_eq!(store_contents(&recovered.store), w.states[8]);
}

#[test]
fn with_no_usable_checkpoint_and_no_wal_to_rebuild_from_nothing_is_deleted() {
    let w = workload(3, 9);
    let sim = SimStorage::new();
    run(&sim, &w, 2);
    let mut storage = sim.clone();
    let before = {
        let mut names = sim.list().unwrap();
        names.sort();
        names
    };
    for name in &before {
        if name.starts_with("wal-") {
            storage.remove(name).unwrap();
        }
        if name.starts_with("checkpoint-") {
            sim.flip_bit(name, 20, 1);
        }
    }
    let err = Durable::open(Box::new(sim.clone()), u64::MAX)
        .err()
        .unwrap();
    assert!(matches!(err, DurableError::Corrupt(_)), "{err}");
    assert!(err.to_string().contains("no checkpoint is usable"), "{err}");
    // The checkpoints and arenas are still there, for an operator to look at.
    let after = sim.list().unwrap();
    for name in before.iter().filter(|n| !n.starts_with("wal-")) {
        assert!(after.contains(name), "{name} was deleted: {after:?}");
    }
}

#[test]
fn eio_and_enospc_on_any_call_lose_nothing_committed() {
    let w = workload(11, 8);
    let clean = SimStorage::new();
    run(&clean, &w, 3);
    let calls = clean.calls();
    for n in 1..=calls {
        for fault in [Fault::Eio, Fault::NoSpace] {
            let sim = SimStorage::new();
            sim.fail_call(n, fault);
            let (done, attempted) = run(&sim, &w, 3);
            sim.crash(|_| 0);
            check_recovery(&sim, &w, done, attempted);
        }
    }
}

#[test]
fn a_corrupt_newest_checkpoint_falls_back_to_the_previous_one() {
    let w = workload(3, 9);
    let sim = SimStorage::new();
    let (done, _) = run(&sim, &w, 2);
    assert_eq!(done, 9);
    let mut names: Vec<String> = sim
        .list()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with("checkpoint-") && !n.contains(".tmp"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "two checkpoints retained: {names:?}");
    sim.flip_bit(&names[1], 40, 3);
    let (_, recovered) = Durable::open(Box::new(sim.clone()), u64::MAX).unwrap();
    assert_eq!(recovered.checkpoint_epoch, Some(6));
    assert_eq!(recovered.commit.unwrap().epoch, 9);
    assert_eq!(store_contents(&recovered.store), w.states[8]);
}

#[test]
fn a_full_state_store_is_a_clear_error_on_recovery() {
    let w = workload(5, 6);
    let sim = SimStorage::new();
    run(&sim, &w, 100);
    let err = Durable::open(Box::new(sim), 10).err().unwrap();
    assert!(matches!(err, DurableError::State(_)), "{err}");
    assert!(err.to_string().contains("memory_bytes_max"), "{err}");
}

#[test]
fn a_checkpoint_larger_than_the_memory_cap_is_an_error_not_a_fallback() {
    let w = workload(5, 6);
    let sim = SimStorage::new();
    run(&sim, &w, 2);
    let err = Durable::open(Box::new(sim), 10).err().unwrap();
    assert!(matches!(err, DurableError::State(_)), "{err}");
    assert!(err.to_string().contains("memory_bytes_max"), "{err}");
}

#[test]
fn the_store_journal_replays_to_the_same_state() {
    let mut a = crate::state::MemoryStore::new();
    a.enable_journal();
    let ns = a.namespace("q").unwrap();
    a.put(ns, b"k1", b"v1").unwrap();
    a.put(ns, b"k2", b"v2").unwrap();
    a.put(ns, b"k3", b"v3").unwrap();
    a.delete(ns, b"k1").unwrap();
    a.delete_range(ns, b"k3", None).unwrap();
    let mut sim = SimStorage::new();
    let arena = sim.open_arena("arena", None).unwrap();
    let mut b = MmapStore::open(arena, 1, u64::MAX).unwrap();
    b.enable_journal();
    for op in a.take_journal() {
        b.apply(&op).unwrap();
    }
    assert_eq!(contents(a.entries()), store_contents(&b));
    assert!(a.take_journal().is_empty());
    let mut c = crate::state::MemoryStore::new();
    for op in b.take_journal() {
        c.apply(&op).unwrap();
    }
    assert_eq!(contents(c.entries()), store_contents(&b));
}

#[test]
fn the_wal_on_disk_round_trips_with_and_without_io_uring() {
    use super::storage::{DiskStorage, IoMode};
    for mode in [IoMode::Blocking, IoMode::Auto] {
        let dir =
            std::env::temp_dir().join(format!("laminar-wal-disk-{}-{mode:?}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let payload = |i: u32| i.to_le_bytes().repeat(i as usize % 50);
        {
            let (mut wal, _) =
                Wal::open(Box::new(DiskStorage::open_with(&dir, mode).unwrap())).unwrap();
            for i in 0..100u32 {
                wal.append(1, &payload(i)).unwrap();
                if i % 7 == 0 {
                    wal.sync().unwrap();
                }
            }
            wal.sync().unwrap();
        }
        let (_, back) = Wal::open(Box::new(
            DiskStorage::open_with(&dir, IoMode::Blocking).unwrap(),
        ))
        .unwrap();
        assert_eq!(back.len(), 100, "{mode:?}");
        for (i, r) in back.iter().enumerate() {
            assert_eq!(r.payload, payload(i as u32), "{mode:?} record {i}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// How [`run_due`] ended.
struct DueRun {
    /// The last epoch committed, and the one being committed when the storage failed.
    done: u64,
    attempted: u64,
    /// Every epoch ran and no call returned an error.
    completed: bool,
    stats: super::DurableStats,
}

/// Runs the workload with checkpoints due as soon as the WAL outgrows the state (none
/// forced) and failed ones retried at once.
fn run_due(sim: &SimStorage, w: &Workload) -> DueRun {
    let mut run = DueRun {
        done: 0,
        attempted: 0,
        completed: false,
        stats: super::DurableStats::default(),
    };
    let Ok((mut durable, recovered)) = Durable::open(Box::new(sim.clone()), u64::MAX) else {
        return run;
    };
    durable.set_background_checkpoints(false);
    durable.set_checkpoint_policy(1, std::time::Duration::ZERO);
    let mut store = recovered.store;
    run.completed = w.epochs.iter().all(|(ops, commit)| {
        run.attempted = run.done;
        if ops.iter().any(|op| store.apply(op).is_err()) {
            return false;
        }
        let journal = store.take_journal();
        let out = output(commit.epoch);
        run.attempted = commit.epoch;
        if durable
            .commit(&journal, &[("out", &out)], commit, &[])
            .is_err()
        {
            return false;
        }
        run.done = commit.epoch;
        durable.delivered(commit.epoch).is_ok()
            && durable.maybe_checkpoint(&mut store, false).is_ok()
    });
    run.attempted = run.attempted.max(run.done);
    run.stats = durable.stats();
    run
}

#[test]
fn a_failed_checkpoint_is_retried_and_loses_nothing() {
    let w = workload(17, 12);
    let clean = SimStorage::new();
    let run = run_due(&clean, &w);
    assert!(run.completed && run.done == 12);
    assert!(run.stats.checkpoints >= 4, "{:?}", run.stats);
    assert_eq!(run.stats.checkpoint_failures, 0);
    // A write, create, rename or remove that fails: a checkpoint's is tolerated.
    let mut tolerated = 0;
    for n in 1..=clean.calls() {
        for fault in [Fault::Eio, Fault::NoSpace] {
            let sim = SimStorage::new();
            sim.fail_call(n, fault);
            let run = run_due(&sim, &w);
            if run.completed {
                // Only a checkpoint failed, or only a cleanup after one.
                assert!(
                    run.stats.checkpoint_failures <= 1,
                    "call {n}: {:?}",
                    run.stats
                );
                tolerated += run.stats.checkpoint_failures;
            }
            sim.crash(|_| 0);
            check_recovery(&sim, &w, run.done, run.attempted);
            if run.completed {
                // The newest checkpoint is whole: recovery did not fall back past it.
                let (_, recovered) = Durable::open(Box::new(sim.clone()), u64::MAX).unwrap();
                assert_eq!(
                    recovered.checkpoint_epoch,
                    run.stats.last_checkpoint.map(|c| c.epoch),
                    "call {n}"
                );
            }
        }
    }
    assert!(tolerated > 0, "no failed checkpoint was tolerated");
    // A failed fsync is never tolerated: the run stops (and recovery is right).
    for n in 1..=clean.syncs() {
        for fault in [Fault::Eio, Fault::NoSpace] {
            let sim = SimStorage::new();
            sim.fail_sync(n, fault);
            let run = run_due(&sim, &w);
            assert!(
                !run.completed,
                "sync {n} failed and the run went on: {:?}",
                run.stats
            );
            sim.crash(|_| 0);
            check_recovery(&sim, &w, run.done, run.attempted);
        }
    }
}

/// Runs the workload with checkpoints and compactions on their own threads (both due at
/// every epoch), until the storage fails; returns the last epoch committed, the one
/// being committed when it failed, and the arena generation the store ended on. The
/// store is checked against the model after every epoch.
fn run_compacting(sim: &SimStorage, w: &Workload) -> (u64, u64, u64) {
    let Ok((mut durable, recovered)) = Durable::open(Box::new(sim.clone()), u64::MAX) else {
        return (0, 0, 0);
    };
    durable.set_compaction(0.0, 0);
    durable.set_checkpoint_policy(1, std::time::Duration::ZERO);
    let mut store = recovered.store;
    let mut done = 0;
    for (i, (ops, commit)) in w.epochs.iter().enumerate() {
        if ops.iter().any(|op| store.apply(op).is_err()) {
            return (done, done, store.generation());
        }
        let journal = store.take_journal();
        if durable
            .commit(&journal, &[("out", &output(commit.epoch))], commit, &[])
            .is_err()
        {
            return (done, commit.epoch, store.generation());
        }
        done = commit.epoch;
        // Threads are scheduled as they are: now and then wait for them, so that
        // checkpoints and compactions surely start and get adopted (after the changes
        // of the epochs since their snapshot).
        let waited = (i % 4 != 3 || durable.finish_compaction(&mut store, true).is_ok())
            && (i % 2 != 0 || durable.wait_checkpoint(&store).is_ok());
        if !waited
            || durable.delivered(commit.epoch).is_err()
            || durable.maybe_checkpoint(&mut store, false).is_err()
        {
            return (done, done, store.generation());
        }
        assert_eq!(
            store_contents(&store),
            w.states[i],
            "epoch {}",
            commit.epoch
        );
    }
    let finished = durable.maybe_checkpoint(&mut store, true).is_ok();
    if finished {
        assert_eq!(store_contents(&store), w.states[w.epochs.len() - 1]);
    }
    (done, done, store.generation())
}

/// Compaction on its own thread, with checkpoints in the background too: the changes of
/// the epochs that run while it copies are carried over when the compacted arena is
/// adopted, the store always matches the model, and recovery after a power loss at the
/// end is right.
#[test]
fn background_compaction_keeps_every_change_made_while_it_runs() {
    let w = workload(23, 40);
    let sim = SimStorage::new();
    let (done, _, generation) = run_compacting(&sim, &w);
    assert_eq!(done, 40);
    assert!(
        generation > 2,
        "compactions were adopted: generation {generation}"
    );
    sim.crash(|_| 0);
    check_recovery(&sim, &w, 40, 40);
    // Power lost at a sync while checkpoints and compactions are in flight (which sync
    // that is depends on how the threads ran), and in the middle of a tear.
    for n in 1..=sim.syncs().min(120) {
        let sim = SimStorage::new();
        sim.fail_sync(n, Fault::Crash);
        let (done, attempted, _) = run_compacting(&sim, &w);
        sim.crash(|u| u / 2);
        check_recovery(&sim, &w, done, attempted);
    }
}

/// Runs the workload on from the epoch recovery ends at, with the changes of namespace
/// `q0` written by `reactors` reactors (split by key), each to its own WAL, and those of
/// `q1` through the pipeline's WAL, until the storage fails; returns the last epoch
/// committed and the one being committed when it failed.
fn run_reactors(
    sim: &SimStorage,
    w: &Workload,
    checkpoint_every: u64,
    reactors: u32,
) -> (u64, u64) {
    let Ok((mut durable, recovered)) = Durable::open(Box::new(sim.clone()), u64::MAX) else {
        return (0, 0);
    };
    durable.set_background_checkpoints(false);
    let mut store = recovered.store;
    let mut done = recovered.commit.as_ref().map_or(0, |c| c.epoch);
    let Ok(mut wals) = (0..reactors)
        .map(|i| durable.reactor_wal(i))
        .collect::<Result<Vec<_>, _>>()
    else {
        return (done, done);
    };
    for (ops, commit) in &w.epochs[done as usize..] {
        let mut logged = Vec::new();
        for rw in &mut wals {
            let mine: Vec<StateOp> = ops
                .iter()
                .filter(|op| match op {
                    StateOp::Put { ns, key, .. } | StateOp::Delete { ns, key } => {
                        ns == "q0" && u32::from(key[0]) % reactors == rw.index
                    }
                    StateOp::DeleteRange { .. } => false,
                })
                .cloned()
                .collect();
            if mine.is_empty() {
                continue;
            }
            let appended = entry::encode_state(commit.epoch, &mine)
                .iter()
                .try_for_each(|p| rw.wal.append(entry::KIND_STATE, p).map(drop))
                .and_then(|()| rw.wal.sync())
                .and_then(|()| rw.wal.remove_before(durable.reactor_retain_from(rw.index)));
            if appended.is_err() || mine.iter().any(|op| store.apply_logged(op).is_err()) {
                return (done, commit.epoch);
            }
            logged.push(ReactorLog {
                index: rw.index,
                lsn: rw.wal.next_lsn() - 1,
                appends: 1,
                bytes: 0,
                sync: std::time::Duration::ZERO,
            });
        }
        let rest = ops.iter().filter(
            |op| !matches!(op, StateOp::Put { ns, .. } | StateOp::Delete { ns, .. } if ns == "q0"),
        );
        for op in rest {
            if store.apply(op).is_err() {
                return (done, done);
            }
        }
        let journal = store.take_journal();
        let out = output(commit.epoch);
        if durable
            .commit(&journal, &[("out", &out)], commit, &logged)
            .is_err()
        {
            return (done, commit.epoch);
        }
        done = commit.epoch;
        if durable.delivered(commit.epoch).is_err()
            || durable
                .maybe_checkpoint(&mut store, commit.epoch % checkpoint_every == 0)
                .is_err()
        {
            return (done, done);
        }
    }
    (done, done)
}

fn reactor_wal_files(sim: &SimStorage) -> Vec<String> {
    let mut names: Vec<String> = sim
        .list()
        .unwrap()
        .into_iter()
        .filter(|n| super::wal::parse_reactor_segment(n).is_some())
        .collect();
    names.sort();
    names
}

/// Reactor WALs hold part of each epoch's changes, synced before the commit entry that
/// records where each ends: power lost at any sync, with the unsynced bytes of every
/// file torn anywhere, recovers exactly the last committed epoch; the run then goes on
/// to the end with another number of reactors (the state moves to the new split).
#[test]
fn recovery_with_reactor_wals_is_right_after_a_crash_at_every_sync_point() {
    let w = workload(31, 12);
    let clean = SimStorage::new();
    assert_eq!(run_reactors(&clean, &w, 4, 2), (12, 12));
    check_recovery(&clean, &w, 12, 12);
    let files = reactor_wal_files(&clean);
    assert!(
        files.iter().any(|f| f.starts_with("wal-r0-"))
            && files.iter().any(|f| f.starts_with("wal-r1-")),
        "{files:?}"
    );
    for n in 1..=clean.syncs() {
        let tears: [fn(usize) -> usize; 3] = [|_| 0, |u| u / 2, |u| u];
        for (t, tear) in tears.into_iter().enumerate() {
            let sim = SimStorage::new();
            sim.fail_sync(n, Fault::Crash);
            let (done, attempted) = run_reactors(&sim, &w, 4, 2);
            sim.crash(tear);
            check_recovery(&sim, &w, done, attempted);
            let reactors = [1, 3, 2][t];
            assert_eq!(
                run_reactors(&sim, &w, 4, reactors),
                (12, 12),
                "sync {n}, tear {t}"
            );
            check_recovery(&sim, &w, 12, 12);
        }
    }
}

/// With fewer reactors than the WALs on disk, the WALs no reactor writes are still
/// replayed, and deleted once the oldest retained checkpoint holds all they hold; a WAL
/// made again for such a reactor numbers its records past what checkpoints record.
#[test]
fn reactor_wals_no_reactor_writes_go_once_checkpoints_cover_them() {
    let w = workload(37, 30);
    let first = |n: usize| Workload {
        epochs: w.epochs[..n].to_vec(),
        states: w.states[..n].to_vec(),
    };
    let listed = |sim: &SimStorage| -> Vec<(u32, u64)> {
        let (_, recovered) = Durable::open(Box::new(sim.clone()), u64::MAX).unwrap();
        recovered.commit.unwrap().reactor_wals
    };
    let sim = SimStorage::new();
    assert_eq!(run_reactors(&sim, &first(10), 100, 3), (10, 10));
    let before = listed(&sim);
    assert_eq!(before.iter().map(|r| r.0).collect::<Vec<_>>(), [0, 1, 2]);
    // Ten epochs committed and never checkpointed: reactors 1 and 2's WALs are needed
    // until the checkpoint of epoch 15 holds their changes.
    assert_eq!(run_reactors(&sim, &first(20), 5, 1), (20, 20));
    check_recovery(&sim, &w, 20, 20);
    let files = reactor_wal_files(&sim);
    assert!(
        !files.is_empty() && files.iter().all(|f| f.starts_with("wal-r0-")),
        "the WALs no reactor writes are gone: {files:?}"
    );
    assert_eq!(listed(&sim).iter().map(|r| r.0).collect::<Vec<_>>(), [0]);
    // The checkpoint of epoch 15, still retained, records where reactor 2's WAL ended.
    let (mut durable, _) = Durable::open(Box::new(sim.clone()), u64::MAX).unwrap();
    assert_eq!(
        durable.reactor_wal(2).unwrap().wal.next_lsn(),
        before[2].1 + 1
    );
    drop(durable);
    assert_eq!(run_reactors(&sim, &w, 5, 1), (30, 30));
    check_recovery(&sim, &w, 30, 30);
    assert_eq!(listed(&sim).iter().map(|r| r.0).collect::<Vec<_>>(), [0]);
    assert!(
        reactor_wal_files(&sim)
            .iter()
            .all(|f| f.starts_with("wal-r0-"))
    );
}

/// A WAL deleted once checkpoints held it and made again by a later run (more reactors)
/// starts after the position the checkpoints record: recovery from a checkpoint that
/// no longer lists it, or with a last commit entry that still lists its first life,
/// neither loses a change nor reports corruption.
#[test]
fn reactor_wals_made_again_after_deletion_recover() {
    let w = workload(47, 30);
    let first = |n: usize| Workload {
        epochs: w.epochs[..n].to_vec(),
        states: w.states[..n].to_vec(),
    };
    // Deleted at the checkpoint of epoch 15; the one of epoch 20 does not list it, and
    // recovery loads that one while the commits after it list the new WAL.
    let sim = SimStorage::new();
    assert_eq!(run_reactors(&sim, &first(10), 100, 3), (10, 10));
    assert_eq!(run_reactors(&sim, &first(20), 5, 2), (20, 20));
    assert!(
        !reactor_wal_files(&sim)
            .iter()
            .any(|f| f.starts_with("wal-r2-"))
    );
    assert_eq!(run_reactors(&sim, &first(24), 100, 3), (24, 24));
    sim.crash(|_| 0);
    check_recovery(&sim, &w, 24, 24);
    // Deleted at the last checkpoint of a run, after its last commit (which lists it);
    // the next run makes it again and stops before committing anything.
    let sim = SimStorage::new();
    assert_eq!(run_reactors(&sim, &first(10), 10, 3), (10, 10));
    assert_eq!(run_reactors(&sim, &first(11), 11, 2), (11, 11));
    assert!(
        !reactor_wal_files(&sim)
            .iter()
            .any(|f| f.starts_with("wal-r2-"))
    );
    let (mut durable, _) = Durable::open(Box::new(sim.clone()), u64::MAX).unwrap();
    drop(durable.reactor_wal(2).unwrap());
    drop(durable);
    sim.crash(|_| 0);
    check_recovery(&sim, &w, 11, 11);
    assert_eq!(run_reactors(&sim, &w, 100, 3), (30, 30));
    sim.crash(|_| 0);
    check_recovery(&sim, &w, 30, 30);
}

/// A reactor WAL that lacks records a commit entry needs is corruption, named, not a
/// state silently missing changes.
#[test]
fn a_missing_reactor_wal_is_reported() {
    let w = workload(41, 6);
    let sim = SimStorage::new();
    assert_eq!(run_reactors(&sim, &w, 100, 2), (6, 6));
    let mut storage = sim.clone();
    for name in reactor_wal_files(&sim) {
        if name.starts_with("wal-r1-") {
            storage.remove(&name).unwrap();
        }
    }
    let error = Durable::open(Box::new(sim.clone()), u64::MAX)
        .err()
        .expect("recovery without reactor 1's WAL must fail");
    assert!(error.to_string().contains("reactor WAL 1"), "{error}");
}

#[test]
fn commit_entries_round_trip_with_reactor_positions_and_read_old_ones() {
    let w = workload(43, 2);
    let mut entry = w.epochs[1].1.clone();
    let old = entry.encode();
    assert_eq!(
        CommitEntry::decode(&old).unwrap(),
        entry,
        "no positions: the old format"
    );
    entry.reactor_wals = vec![(0, 17), (3, u64::from(u32::MAX) + 5)];
    let new = entry.encode();
    assert!(new.starts_with(&old));
    assert_eq!(CommitEntry::decode(&new).unwrap(), entry);
    assert!(CommitEntry::decode(&new[..new.len() - 1]).is_err());
}
