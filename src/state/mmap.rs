//! The memory-mapped state store: records appended to an arena file, found through an
//! in-memory index.
//!
//! Every change is a record appended to the arena (a put, a delete, a range delete, or
//! the binding of a namespace id to its name); nothing in the arena is written twice.
//! The index maps each live key to its newest record: an `FxHashMap` for point lookups
//! and a `BTreeSet` of the same keys (up to 22 bytes inline, longer ones in shared
//! `Arc`s) for prefix scans and range deletes
//! in key order, without a full scan. A value is read straight from the mapping.
//!
//! The arena is self-describing, so the index survives a restart by being rebuilt from
//! it: [`MmapStore::open`] walks the records up to the length a checkpoint recorded,
//! verifying each record's CRC32C. A checkpoint is therefore the arena's length plus a
//! `fdatasync` of what was appended since the last one (incremental, and run on another
//! thread: see [`crate::durability`]). Superseded records and tombstones are counted as
//! dead bytes; once they are most of the arena, [`MmapStore::compact`] copies the
//! live records, in the order they sit in the arena, into a new generation of it. Off the
//! owner's thread, [`MmapStore::compact_snapshot`] does so from a read-only snapshot of
//! the arena, and [`MmapStore::adopt_compaction`] then carries over what was appended
//! since the snapshot.
//!
//! Arena format (little-endian). Header, 64 bytes: magic `LAMARN\0\x01` (last byte: the
//! format version), generation (u64), zeros. Then records, each starting 8-aligned:
//!
//! | offset | field | bytes |
//! |---|---|---|
//! | 0 | CRC32C of bytes 4 to the record's end | 4 |
//! | 4 | kind: 1 put, 2 delete, 3 range delete, 4 namespace | 1 |
//! | 5 | flags: for a range delete, 1 = it has an end | 1 |
//! | 6 | zero | 2 |
//! | 8 | namespace id | 4 |
//! | 12 | key length `k` (range delete: start; namespace: its name) | 4 |
//! | 16 | value length `v` (range delete: end) | 4 |
//! | 20 | zero | 4 |
//! | 24 | key, zero-padded to a multiple of 8 | `k` + pad |
//! | .. | value, zero-padded to a multiple of 8 | `v` + pad |

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::{Journal, NAMESPACE_NAME_MAX, Namespace, StateError, StateOp, StateStore};
use crate::durability::arena::{Access, ArenaFile};

const MAGIC: [u8; 8] = *b"LAMARN\x00\x01";
/// Bytes of the arena header.
pub const ARENA_HEADER: u64 = 64;
const RECORD_HEADER: usize = 24;
const KIND_PUT: u8 = 1;
const KIND_DELETE: u8 = 2;
const KIND_DELETE_RANGE: u8 = 3;
const KIND_NAMESPACE: u8 = 4;
/// Records gathered before one append during compaction.
const COMPACT_CHUNK: usize = 4 << 20;

/// Where a key's newest value lives.
#[derive(Debug, Clone, Copy)]
struct Loc {
    /// Offset of the record in the arena.
    record: u64,
    value_len: u32,
}

const fn pad8(n: usize) -> usize {
    n.next_multiple_of(8)
}

const fn record_len(key_len: usize, value_len: usize) -> usize {
    RECORD_HEADER + pad8(key_len) + pad8(value_len)
}

/// Keys up to this many bytes live inside the index (no pointer to chase on a lookup).
const INLINE_KEY: usize = 22;

/// A key in the index: short ones inline, longer ones shared by the two indexes.
#[derive(Clone)]
enum Key {
    Inline(u8, [u8; INLINE_KEY]),
    Heap(Arc<[u8]>),
}

impl Key {
    fn new(key: &[u8]) -> Self {
        if key.len() <= INLINE_KEY {
            let mut bytes = [0; INLINE_KEY];
            bytes[..key.len()].copy_from_slice(key);
            Self::Inline(key.len() as u8, bytes)
        } else {
            Self::Heap(key.into())
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Self::Inline(len, bytes) => &bytes[..*len as usize],
            Self::Heap(bytes) => bytes,
        }
    }
}

impl std::ops::Deref for Key {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::borrow::Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

// Hash, equality and order are the bytes', as `Borrow` requires.
impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state);
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_slice().cmp(other.as_slice())
    }
}

/// One namespace's index.
#[derive(Default)]
struct Table {
    index: FxHashMap<Key, Loc>,
    /// The same keys in order. Not kept while [`MmapStore::open`] rebuilds the index (a
    /// sort at the end is far cheaper than random inserts), then always.
    order: BTreeSet<Key>,
    ordered: bool,
}

impl Table {
    /// Builds `order` from `index` if it is not kept yet.
    fn build_order(&mut self) {
        if !self.ordered {
            let mut keys: Vec<Key> = self.index.keys().cloned().collect();
            keys.sort_unstable();
            self.order = keys.into_iter().collect();
            self.ordered = true;
        }
    }
}

/// Why an arena could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The arena is damaged: recovery falls back to an older checkpoint.
    #[error("{0}")]
    Corrupt(String),
    /// The state does not fit `state.memory_bytes_max`: an error, not a fallback.
    #[error(transparent)]
    State(StateError),
}

/// State in a memory-mapped arena, indexed in memory.
pub struct MmapStore {
    arena: Box<dyn ArenaFile>,
    generation: u64,
    names: BTreeMap<String, Namespace>,
    ns_names: Vec<String>,
    tables: Vec<Table>,
    /// Bytes of live keys and values (what `state.memory_bytes_max` bounds).
    live: u64,
    /// Arena bytes of superseded records and tombstones: what compaction frees.
    dead: u64,
    bytes_max: u64,
    /// Changes since the last [`MmapStore::take_journal`], when journaling is on.
    journal: Journal,
    scratch: Vec<u8>,
}

impl MmapStore {
    /// Opens the store on `arena`: a new one when the arena is empty, else the state its
    /// records hold (each checked against its CRC32C).
    pub fn open(
        mut arena: Box<dyn ArenaFile>,
        generation: u64,
        bytes_max: u64,
    ) -> Result<Self, OpenError> {
        let io = |e: std::io::Error| OpenError::State(StateError::Io(e));
        if arena.bytes().is_empty() {
            let mut header = [0u8; ARENA_HEADER as usize];
            header[..8].copy_from_slice(&MAGIC);
            header[8..16].copy_from_slice(&generation.to_le_bytes());
            arena.append(&header).map_err(io)?;
        }
        let mut store = Self {
            arena,
            generation,
            names: BTreeMap::new(),
            ns_names: Vec::new(),
            tables: Vec::new(),
            live: 0,
            dead: 0,
            bytes_max,
            journal: Journal::default(),
            scratch: Vec::new(),
        };
        store.arena.advise(Access::Sequential);
        store.replay()?;
        for table in &mut store.tables {
            table.build_order();
        }
        store.arena.advise(Access::Random);
        Ok(store)
    }

    /// Rebuilds the index from the arena's records.
    fn replay(&mut self) -> Result<(), OpenError> {
        let bytes = self.arena.bytes();
        let header = bytes.get(..ARENA_HEADER as usize);
        if header.is_none_or(|h| h[..8] != MAGIC) {
            return Err(OpenError::Corrupt(
                "not a laminar state arena (bad magic)".into(),
            ));
        }
        let found = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default());
        if found != self.generation {
            return Err(OpenError::Corrupt(format!(
                "arena says generation {found}, expected {}",
                self.generation
            )));
        }
        self.replay_from(ARENA_HEADER as usize)
    }

    /// Indexes the arena's records from offset `from` (a record boundary) to its end.
    fn replay_from(&mut self, from: usize) -> Result<(), OpenError> {
        let total = self.arena.bytes().len();
        let mut at = from;
        // The records are borrowed from the arena while the index is rebuilt; the index
        // does not touch the arena, so split the borrow by moving the arena out.
        let arena = std::mem::replace(&mut self.arena, Box::new(EmptyArena));
        let result = (|| {
            let bytes = arena.bytes();
            while at < total {
                let corrupt = |m: &str| OpenError::Corrupt(format!("arena offset {at}: {m}"));
                let Some(h) = bytes.get(at..at + RECORD_HEADER) else {
                    return Err(corrupt("a record header runs past the end"));
                };
                let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
                let (crc, kind, flags, ns, klen, vlen) = (
                    word(0),
                    h[4],
                    h[5],
                    word(8),
                    word(12) as usize,
                    word(16) as usize,
                );
                let len = record_len(klen, vlen);
                let Some(record) = bytes.get(at..at + len) else {
                    return Err(corrupt("a record runs past the end"));
                };
                if crc32c::crc32c(&record[4..]) != crc {
                    return Err(corrupt("checksum mismatch"));
                }
                let key = &record[RECORD_HEADER..RECORD_HEADER + klen];
                let value_at = RECORD_HEADER + pad8(klen);
                let value = &record[value_at..value_at + vlen];
                let ns_id = ns as usize;
                if kind != KIND_NAMESPACE && ns_id >= self.tables.len() {
                    return Err(corrupt("a record of an unknown namespace"));
                }
                match kind {
                    KIND_NAMESPACE => {
                        let name = std::str::from_utf8(key)
                            .map_err(|_| corrupt("a namespace name is not UTF-8"))?;
                        if ns_id != self.tables.len() || self.names.contains_key(name) {
                            return Err(corrupt("namespace ids out of sequence"));
                        }
                        self.add_namespace(name);
                    }
                    KIND_PUT => {
                        self.index_put(Namespace(ns), key, at as u64, vlen as u32)
                            .map_err(OpenError::State)?;
                    }
                    KIND_DELETE => {
                        self.index_delete(Namespace(ns), key);
                        self.dead += len as u64;
                    }
                    KIND_DELETE_RANGE => {
                        let end = (flags & 1 == 1).then_some(value);
                        self.index_delete_range(Namespace(ns), key, end);
                        self.dead += len as u64;
                    }
                    _ => return Err(corrupt(&format!("unknown record kind {kind}"))),
                }
                at += len;
            }
            Ok(())
        })();
        self.arena = arena;
        result
    }

    /// Binds `name` to the next namespace id (no arena record).
    fn add_namespace(&mut self, name: &str) -> Namespace {
        assert!(self.tables.len() < u32::MAX as usize, "2^32 namespaces");
        let ns = Namespace(self.tables.len() as u32);
        self.tables.push(Table::default());
        self.names.insert(name.to_owned(), ns);
        self.ns_names.push(name.to_owned());
        ns
    }

    /// Points `key` at the record at `record`, checking the memory cap.
    fn index_put(
        &mut self,
        ns: Namespace,
        key: &[u8],
        record: u64,
        value_len: u32,
    ) -> Result<(), StateError> {
        let table = &mut self.tables[ns.0 as usize];
        let loc = Loc { record, value_len };
        let new = (key.len() + value_len as usize) as u64;
        if let Some(old) = table.index.get_mut(key) {
            let live = self.live - (key.len() as u64 + u64::from(old.value_len)) + new;
            if live > self.bytes_max {
                return Err(full(self.live, self.bytes_max));
            }
            self.dead += record_len(key.len(), old.value_len as usize) as u64;
            self.live = live;
            *old = loc;
        } else {
            if self.live + new > self.bytes_max {
                return Err(full(self.live, self.bytes_max));
            }
            let key = Key::new(key);
            if table.ordered {
                table.order.insert(key.clone());
            }
            table.index.insert(key, loc);
            self.live += new;
        }
        Ok(())
    }

    /// Drops `key` from the index; whether it was there.
    fn index_delete(&mut self, ns: Namespace, key: &[u8]) -> bool {
        let table = &mut self.tables[ns.0 as usize];
        let Some(old) = table.index.remove(key) else {
            return false;
        };
        if table.ordered {
            table.order.remove(key);
        }
        self.live -= key.len() as u64 + u64::from(old.value_len);
        self.dead += record_len(key.len(), old.value_len as usize) as u64;
        true
    }

    /// Drops every key in `[start, end)` from the index; how many there were.
    fn index_delete_range(&mut self, ns: Namespace, start: &[u8], end: Option<&[u8]>) -> usize {
        if end.is_some_and(|end| end <= start) {
            return 0;
        }
        let table = &mut self.tables[ns.0 as usize];
        table.build_order();
        let doomed: Vec<Key> = table
            .order
            .range::<[u8], _>((
                Bound::Included(start),
                end.map_or(Bound::Unbounded, Bound::Excluded),
            ))
            .cloned()
            .collect();
        for key in &doomed {
            table.order.remove(&**key);
            if let Some(old) = table.index.remove(&**key) {
                self.live -= key.len() as u64 + u64::from(old.value_len);
                self.dead += record_len(key.len(), old.value_len as usize) as u64;
            }
        }
        doomed.len()
    }

    /// Appends one record to the arena; its offset.
    fn append(
        &mut self,
        kind: u8,
        flags: u8,
        ns: Namespace,
        key: &[u8],
        value: &[u8],
    ) -> Result<u64, StateError> {
        let mut b = std::mem::take(&mut self.scratch);
        encode_into(&mut b, kind, flags, ns.0, key, value);
        let at = self.arena.bytes().len() as u64;
        let appended = self.arena.append(&b);
        self.scratch = b;
        appended?;
        Ok(at)
    }

    /// Records every change from now on, for [`MmapStore::take_journal`].
    pub fn enable_journal(&mut self) {
        self.journal.enable();
    }

    /// Applies `op` without journaling it: a change another WAL (a reactor's) holds.
    pub fn apply_logged(&mut self, op: &StateOp) -> Result<(), StateError> {
        let journal = std::mem::take(&mut self.journal);
        let applied = self.apply(op);
        self.journal = journal;
        applied
    }

    /// The changes recorded since the last call (journaling must be on).
    pub fn take_journal(&mut self) -> Vec<StateOp> {
        self.journal.take()
    }

    fn record(&mut self, op: impl FnOnce(String) -> StateOp, ns: Namespace) {
        self.journal.record(&self.ns_names[ns.0 as usize], op);
    }

    /// Every entry, namespace by namespace (by name), in key order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &[u8], &[u8])> {
        self.names.iter().flat_map(move |(name, ns)| {
            self.tables[ns.0 as usize]
                .order
                .iter()
                .filter_map(move |k| self.get(*ns, k).map(|v| (name.as_str(), &**k, v)))
        })
    }

    /// Keys held in `ns`.
    #[must_use]
    pub fn len(&self, ns: Namespace) -> usize {
        self.tables[ns.0 as usize].index.len()
    }

    /// Keys held in every namespace.
    #[must_use]
    pub fn keys(&self) -> u64 {
        self.tables.iter().map(|t| t.index.len() as u64).sum()
    }

    /// The arena's generation (bumped by each compaction).
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Bytes in the arena, live and dead.
    #[must_use]
    pub fn arena_bytes(&self) -> u64 {
        self.arena.bytes().len() as u64
    }

    /// Share of the arena held by superseded records and tombstones.
    #[must_use]
    pub fn fragmentation(&self) -> f64 {
        self.dead as f64 / self.arena_bytes().max(1) as f64
    }

    /// A job that makes the arena as of now durable, for a checkpoint thread.
    pub fn syncer(&self) -> std::io::Result<crate::durability::arena::Syncer> {
        self.arena.syncer()
    }

    /// Copies the live records into `arena` (new and empty), which becomes the store's
    /// arena as generation `generation`; returns the old one. On an error the store is
    /// unchanged. Transient memory: 24 bytes per live key.
    pub fn compact(
        &mut self,
        mut arena: Box<dyn ArenaFile>,
        generation: u64,
    ) -> Result<Box<dyn ArenaFile>, StateError> {
        self.arena.advise(Access::Sequential);
        let mut buf = Vec::with_capacity(COMPACT_CHUNK + 4096);
        buf.resize(ARENA_HEADER as usize, 0);
        buf[..8].copy_from_slice(&MAGIC);
        buf[8..16].copy_from_slice(&generation.to_le_bytes());
        let mut written = 0u64;
        let old = std::mem::replace(&mut self.arena, Box::new(EmptyArena));
        // Live records are copied in arena order, so the old arena is read from start to
        // end (in key order the reads would be random, several times slower). Each
        // entry: (old offset, then new offset; table; position in the table's index).
        let mut refs: Vec<Vec<&mut Loc>> = self
            .tables
            .iter_mut()
            .map(|t| t.index.values_mut().collect())
            .collect();
        let mut moves: Vec<(u64, u32, u32)> = refs
            .iter()
            .enumerate()
            .flat_map(|(t, locs)| {
                locs.iter()
                    .enumerate()
                    .map(move |(i, loc)| (loc.record, t as u32, i as u32))
            })
            .collect();
        moves.sort_unstable_by_key(|m| m.0);
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = (|| -> Result<(), StateError> {
            for (id, name) in self.ns_names.iter().enumerate() {
                encode_into(
                    &mut scratch,
                    KIND_NAMESPACE,
                    0,
                    id as u32,
                    name.as_bytes(),
                    &[],
                );
                buf.extend_from_slice(&scratch);
            }
            let bytes = old.bytes();
            for m in &mut moves {
                let at = m.0 as usize;
                let word = |i: usize| {
                    u32::from_le_bytes([
                        bytes[at + i],
                        bytes[at + i + 1],
                        bytes[at + i + 2],
                        bytes[at + i + 3],
                    ]) as usize
                };
                let len = record_len(word(12), word(16));
                m.0 = written + buf.len() as u64;
                buf.extend_from_slice(&bytes[at..at + len]);
                if buf.len() >= COMPACT_CHUNK {
                    arena.append(&buf)?;
                    written += buf.len() as u64;
                    buf.clear();
                }
            }
            arena.append(&buf)?;
            Ok(())
        })();
        self.scratch = scratch;
        if let Err(e) = result {
            self.arena = old;
            self.arena.advise(Access::Random);
            return Err(e);
        }
        for (at, t, i) in moves {
            refs[t as usize][i as usize].record = at;
        }
        drop(refs);
        arena.advise(Access::Random);
        self.arena = arena;
        self.generation = generation;
        self.dead = 0;
        Ok(old)
    }
}

impl MmapStore {
    /// A read-only view of the arena as it is now, and its length, for
    /// [`MmapStore::compact_snapshot`] on another thread.
    pub fn snapshot(&self) -> std::io::Result<(Box<dyn ArenaFile>, u64)> {
        let len = self.arena_bytes();
        Ok((self.arena.snapshot(len)?, len))
    }

    /// Compaction off the owner's thread, first half: the store `snapshot` (an arena of
    /// generation `generation`, from [`MmapStore::snapshot`]) holds, with its live
    /// records copied into `into` as generation `new_generation`. Reads only the
    /// snapshot, so the owner goes on appending meanwhile. Transient memory: a second
    /// index.
    pub fn compact_snapshot(
        snapshot: Box<dyn ArenaFile>,
        generation: u64,
        into: Box<dyn ArenaFile>,
        new_generation: u64,
    ) -> Result<Self, StateError> {
        let mut store = Self::open(snapshot, generation, u64::MAX).map_err(|e| match e {
            OpenError::State(e) => e,
            OpenError::Corrupt(message) => StateError::Corrupt {
                namespace: String::new(),
                message: format!("the arena snapshot being compacted: {message}"),
            },
        })?;
        drop(store.compact(into, new_generation)?);
        // The owner appends what it wrote meanwhile: the room for it is made here.
        store.arena.reserve()?;
        Ok(store)
    }

    /// Compaction off the owner's thread, second half, on the owner's thread:
    /// `compacted` (from [`MmapStore::compact_snapshot`] of this store's arena as of
    /// `snapshot_len` bytes) gets the records appended since, copied after its own and
    /// indexed, and becomes this store. The work is proportional to what was appended
    /// since the snapshot. Returns the old store, index and arena, to be dropped (off
    /// the owner's thread: freeing a large index takes a while); on an error this store
    /// is unchanged.
    pub fn adopt_compaction(
        &mut self,
        mut compacted: Self,
        snapshot_len: u64,
    ) -> Result<Self, StateError> {
        assert!(
            compacted.generation == self.generation + 1 && snapshot_len <= self.arena_bytes(),
            "a compaction adopted by a store it was not made from"
        );
        let from = compacted.arena.bytes().len();
        compacted
            .arena
            .append(&self.arena.bytes()[snapshot_len as usize..])?;
        if let Err(e) = compacted.replay_from(from) {
            // Records this store wrote and indexed itself: not a disk problem.
            panic!("state records appended during a compaction do not index again: {e}");
        }
        // Namespaces opened since the snapshot came in unordered, as replays leave them.
        for table in &mut compacted.tables {
            table.build_order();
        }
        assert!(
            compacted.live == self.live
                && compacted.keys() == self.keys()
                && compacted.ns_names == self.ns_names,
            "a compacted store differs from the one it copies"
        );
        compacted.bytes_max = self.bytes_max;
        compacted.journal = std::mem::take(&mut self.journal);
        compacted.scratch = std::mem::take(&mut self.scratch);
        compacted.arena.advise(Access::Random);
        Ok(std::mem::replace(self, compacted))
    }
}

/// Lays out one record in `b`.
fn encode_into(b: &mut Vec<u8>, kind: u8, flags: u8, ns: u32, key: &[u8], value: &[u8]) {
    assert!(
        u32::try_from(key.len()).is_ok() && u32::try_from(value.len()).is_ok(),
        "a state key or value over 4 GiB"
    );
    b.clear();
    b.extend_from_slice(&[0, 0, 0, 0, kind, flags, 0, 0]);
    b.extend_from_slice(&ns.to_le_bytes());
    b.extend_from_slice(&(key.len() as u32).to_le_bytes());
    b.extend_from_slice(&(value.len() as u32).to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(key);
    b.resize(RECORD_HEADER + pad8(key.len()), 0);
    b.extend_from_slice(value);
    b.resize(record_len(key.len(), value.len()), 0);
    let crc = crc32c::crc32c(&b[4..]);
    b[..4].copy_from_slice(&crc.to_le_bytes());
}

fn full(live: u64, bytes_max: u64) -> StateError {
    StateError::Full {
        message: format!(
            "holding {live} bytes, a write would take it past state.memory_bytes_max ({bytes_max})"
        ),
    }
}

/// Stands in for the arena while the store borrows it apart from the index.
struct EmptyArena;

impl ArenaFile for EmptyArena {
    fn bytes(&self) -> &[u8] {
        &[]
    }
    fn append(&mut self, _: &[u8]) -> std::io::Result<()> {
        Err(std::io::Error::other("the state arena is being rebuilt"))
    }
    fn syncer(&self) -> std::io::Result<crate::durability::arena::Syncer> {
        Err(std::io::Error::other("the state arena is being rebuilt"))
    }
    fn advise(&self, _: Access) {}
    fn snapshot(&self, _: u64) -> std::io::Result<Box<dyn ArenaFile>> {
        Err(std::io::Error::other("the state arena is being rebuilt"))
    }
}

impl StateStore for MmapStore {
    fn namespace(&mut self, name: &str) -> Result<Namespace, StateError> {
        if name.is_empty() || name.len() > NAMESPACE_NAME_MAX {
            return Err(StateError::BadNamespace(name.to_owned()));
        }
        if let Some(&ns) = self.names.get(name) {
            return Ok(ns);
        }
        let id = Namespace(self.tables.len() as u32);
        self.append(KIND_NAMESPACE, 0, id, name.as_bytes(), &[])?;
        let ns = self.add_namespace(name);
        self.tables[ns.0 as usize].ordered = true;
        Ok(ns)
    }

    fn get(&self, ns: Namespace, key: &[u8]) -> Option<&[u8]> {
        let loc = self.tables[ns.0 as usize].index.get(key)?;
        let at = loc.record as usize + RECORD_HEADER + pad8(key.len());
        self.arena.bytes().get(at..at + loc.value_len as usize)
    }

    fn put(&mut self, ns: Namespace, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        // Check the cap before the record is appended: a refused put leaves no trace.
        let old = self.tables[ns.0 as usize]
            .index
            .get(key)
            .map_or(0, |l| key.len() as u64 + u64::from(l.value_len));
        if self.live - old + (key.len() + value.len()) as u64 > self.bytes_max {
            return Err(full(self.live, self.bytes_max));
        }
        let at = self.append(KIND_PUT, 0, ns, key, value)?;
        self.index_put(ns, key, at, value.len() as u32)?;
        self.record(
            |ns| StateOp::Put {
                ns,
                key: key.to_vec(),
                value: value.to_vec(),
            },
            ns,
        );
        Ok(())
    }

    fn delete(&mut self, ns: Namespace, key: &[u8]) -> Result<(), StateError> {
        if !self.tables[ns.0 as usize].index.contains_key(key) {
            return Ok(());
        }
        self.append(KIND_DELETE, 0, ns, key, &[])?;
        self.index_delete(ns, key);
        self.dead += record_len(key.len(), 0) as u64;
        self.record(
            |ns| StateOp::Delete {
                ns,
                key: key.to_vec(),
            },
            ns,
        );
        Ok(())
    }

    fn delete_range(
        &mut self,
        ns: Namespace,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> Result<(), StateError> {
        if end.is_some_and(|end| end <= start) {
            return Ok(());
        }
        let any = self.tables[ns.0 as usize]
            .order
            .range::<[u8], _>((
                Bound::Included(start),
                end.map_or(Bound::Unbounded, Bound::Excluded),
            ))
            .next()
            .is_some();
        if !any {
            return Ok(());
        }
        self.append(
            KIND_DELETE_RANGE,
            u8::from(end.is_some()),
            ns,
            start,
            end.unwrap_or_default(),
        )?;
        self.index_delete_range(ns, start, end);
        self.dead += record_len(start.len(), end.map_or(0, <[u8]>::len)) as u64;
        self.record(
            |ns| StateOp::DeleteRange {
                ns,
                start: start.to_vec(),
                end: end.map(<[u8]>::to_vec),
            },
            ns,
        );
        Ok(())
    }

    fn scan_prefix<'a>(
        &'a self,
        ns: Namespace,
        prefix: &[u8],
    ) -> Box<dyn Iterator<Item = (&'a [u8], &'a [u8])> + 'a> {
        let prefix: Box<[u8]> = prefix.into();
        Box::new(
            self.tables[ns.0 as usize]
                .order
                .range::<[u8], _>((Bound::Included(&*prefix), Bound::Unbounded))
                .take_while(move |k| k.starts_with(&prefix))
                .filter_map(move |k| self.get(ns, k).map(|v| (&**k, v))),
        )
    }

    fn bytes(&self) -> u64 {
        self.live
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durability::storage::{SimStorage, Storage};
    use proptest::prelude::*;

    type Model = BTreeMap<(u8, Vec<u8>), Vec<u8>>;

    #[derive(Debug, Clone)]
    enum Op {
        Put(u8, Vec<u8>, Vec<u8>),
        Delete(u8, Vec<u8>),
        DeleteRange(u8, Vec<u8>, Option<Vec<u8>>),
        /// Remember the arena's length and the model here (a checkpoint).
        Snapshot,
        /// Reopen the arena at its current length (a restart after a checkpoint).
        Reopen,
        /// Copy the live records into a new generation.
        Compact,
        /// Take a snapshot to compact as if on another thread, while the ops go on.
        StartCompaction,
        /// Compact the snapshot and adopt it, with the records appended since.
        FinishCompaction,
        /// Open one more (empty) namespace.
        NewNamespace,
    }

    fn key() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(0u8..4, 0..4)
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u8..4, key(), proptest::collection::vec(any::<u8>(), 0..12))
                .prop_map(|(n, k, v)| Op::Put(n, k, v)),
            2 => (0u8..4, key()).prop_map(|(n, k)| Op::Delete(n, k)),
            1 => (0u8..4, key(), proptest::option::of(key()))
                .prop_map(|(n, a, b)| Op::DeleteRange(n, a, b)),
            1 => Just(Op::Snapshot),
            1 => Just(Op::Reopen),
            1 => Just(Op::Compact),
            1 => Just(Op::StartCompaction),
            1 => Just(Op::FinishCompaction),
            1 => Just(Op::NewNamespace),
        ]
    }

    fn contents(store: &MmapStore) -> Model {
        store
            .entries()
            .map(|(ns, k, v)| ((ns.as_bytes()[0] - b'a', k.to_vec()), v.to_vec()))
            .collect()
    }

    fn open(sim: &SimStorage, generation: u64, len: Option<u64>) -> MmapStore {
        let name = format!("arena-{generation}");
        let arena = sim.clone().open_arena(&name, len).unwrap();
        MmapStore::open(arena, generation, u64::MAX).unwrap()
    }

    proptest! {
        #[test]
        fn the_store_matches_a_btreemap_through_snapshots_reopens_and_compactions(
            ops in proptest::collection::vec(op(), 0..150),
            prefix in key(),
        ) {
            let sim = SimStorage::new();
            let mut store = open(&sim, 1, None);
            let mut ns = vec![store.namespace("a").unwrap(), store.namespace("b").unwrap()];
            let mut model = Model::new();
            let mut snapshots: Vec<(u64, u64, Model)> = Vec::new();
            let mut compacting: Option<(Box<dyn ArenaFile>, u64)> = None;
            for op in ops {
                match op {
                    Op::Put(n, k, v) => {
                        let n = n % ns.len() as u8;
                        store.put(ns[n as usize], &k, &v).unwrap();
                        model.insert((n, k), v);
                    }
                    Op::Delete(n, k) => {
                        let n = n % ns.len() as u8;
                        store.delete(ns[n as usize], &k).unwrap();
                        model.remove(&(n, k));
                    }
                    Op::DeleteRange(n, a, b) => {
                        let n = n % ns.len() as u8;
                        store.delete_range(ns[n as usize], &a, b.as_deref()).unwrap();
                        model.retain(|(m, k), _| {
                            !(*m == n && *k >= a && b.as_ref().is_none_or(|b| k < b))
                        });
                    }
                    Op::Snapshot => {
                        snapshots.push((store.generation(), store.arena_bytes(), model.clone()));
                    }
                    Op::StartCompaction => {
                        compacting = Some(store.snapshot().unwrap());
                    }
                    Op::FinishCompaction => {
                        if let Some((snapshot, len)) = compacting.take() {
                            let generation = store.generation() + 1;
                            let arena = sim
                                .clone()
                                .open_arena(&format!("arena-{generation}"), None)
                                .unwrap();
                            let compacted = MmapStore::compact_snapshot(
                                snapshot,
                                store.generation(),
                                arena,
                                generation,
                            )
                            .unwrap();
                            drop(store.adopt_compaction(compacted, len).unwrap());
                            prop_assert_eq!(store.generation(), generation);
                        }
                    }
                    Op::NewNamespace => {
                        if let Some(name) = ["c", "d"].get(ns.len() - 2) {
                            ns.push(store.namespace(name).unwrap());
                        }
                    }
                    Op::Reopen => {
                        compacting = None;
                        let (generation, len) = (store.generation(), store.arena_bytes());
                        drop(store);
                        store = open(&sim, generation, Some(len));
                    }
                    Op::Compact => {
                        compacting = None;
                        let generation = store.generation() + 1;
                        let arena = sim
                            .clone()
                            .open_arena(&format!("arena-{generation}"), None)
                            .unwrap();
                        let before = store.arena_bytes();
                        drop(store.compact(arena, generation).unwrap());
                        prop_assert!(store.arena_bytes() <= before);
                        prop_assert!(store.fragmentation() == 0.0);
                    }
                }
                prop_assert_eq!(contents(&store), model.clone());
            }
            let live: u64 = model.iter().map(|((_, k), v)| (k.len() + v.len()) as u64).sum();
            prop_assert_eq!(store.bytes(), live);
            prop_assert_eq!(store.keys(), model.len() as u64);
            for n in 0..ns.len() as u8 {
                let got: Vec<(Vec<u8>, Vec<u8>)> = store
                    .scan_prefix(ns[n as usize], &prefix)
                    .map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .collect();
                let want: Vec<(Vec<u8>, Vec<u8>)> = model
                    .iter()
                    .filter(|((m, k), _)| *m == n && k.starts_with(&prefix))
                    .map(|((_, k), v)| (k.clone(), v.clone()))
                    .collect();
                prop_assert_eq!(got, want);
            }
            // Every snapshot still reads as it was: later writes only appended (to its
            // generation, or to a newer one). Opening at a length cuts the file there, so
            // the longest go first.
            snapshots.sort_by_key(|(_, len, _)| std::cmp::Reverse(*len));
            for (generation, len, want) in snapshots {
                let old = open(&sim, generation, Some(len));
                prop_assert_eq!(contents(&old), want);
            }
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_is_detected_on_open() {
        let sim = SimStorage::new();
        let mut store = open(&sim, 1, None);
        let ns = store.namespace("q").unwrap();
        for i in 0u8..20 {
            store.put(ns, &[i], &[i; 9]).unwrap();
        }
        store.delete(ns, &[3]).unwrap();
        store.delete_range(ns, &[10], Some(&[12])).unwrap();
        let len = store.arena_bytes();
        drop(store);
        for byte in 0..len as usize {
            let copy = SimStorage::new();
            copy.clone().create("arena-1").unwrap();
            copy.clone()
                .append("arena-1", &sim.read("arena-1").unwrap())
                .unwrap();
            copy.flip_bit("arena-1", byte, (byte % 8) as u8);
            let arena = copy.clone().open_arena("arena-1", Some(len)).unwrap();
            // Header bytes past the magic and generation are reserved zeros; a flip there
            // changes nothing that is read.
            if (16..ARENA_HEADER as usize).contains(&byte) {
                continue;
            }
            assert!(
                matches!(
                    MmapStore::open(arena, 1, u64::MAX),
                    Err(OpenError::Corrupt(_))
                ),
                "a flip at byte {byte} went unnoticed"
            );
        }
    }

    #[test]
    fn a_full_store_refuses_a_put_and_writes_nothing() {
        let sim = SimStorage::new();
        let arena = sim.clone().open_arena("arena-1", None).unwrap();
        let mut store = MmapStore::open(arena, 1, 10).unwrap();
        let ns = store.namespace("q").unwrap();
        store.put(ns, b"ab", b"cdefgh").unwrap();
        let len = store.arena_bytes();
        assert!(matches!(
            store.put(ns, b"x", b"yyyy"),
            Err(StateError::Full { .. })
        ));
        assert_eq!(store.arena_bytes(), len);
        assert_eq!(store.get(ns, b"ab"), Some(&b"cdefgh"[..]));
        store.put(ns, b"ab", b"c").unwrap();
        assert_eq!(store.bytes(), 3);
    }
}
