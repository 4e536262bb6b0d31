//! The state-store interface: what operators keep across epochs, by namespace.
//!
//! Operators work on their own in-memory structures (hash maps of accumulators, the
//! fastest form for per-record updates) and write what changed into a [`StateStore`] when
//! an epoch closes ([`crate::operator::Operator::checkpoint`]); on start they rebuild
//! from it ([`crate::operator::Operator::restore`]). The store is a write-back target, as
//! in a heap state backend: between two checkpoints the operator's memory is ahead of the
//! store, and the source offsets recorded with the checkpoint replay that difference.
//!
//! Each operator sees only its own namespace, through a [`StateView`]; keys are byte
//! strings ordered bytewise, so operators lay out keys for the prefix scans and range
//! deletes they need (a window operator puts the window start first, big-endian, so that
//! freeing every closed window is one range delete). [`MemoryStore`] is the in-memory
//! implementation, for tests and runs without a state directory; [`mmap::MmapStore`] is
//! the memory-mapped store a pipeline checkpoints.

pub mod codec;
pub mod mmap;
pub mod typed;

use std::collections::BTreeMap;

pub use crate::durability::entry::StateOp;
use std::ops::Bound;

/// Longest namespace name (operators are named after their query).
pub const NAMESPACE_NAME_MAX: usize = 255;

/// A namespace handle, valid for the store that issued it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Namespace(u32);

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state of `{namespace}` is corrupt: {message}")]
    Corrupt { namespace: String, message: String },
    #[error("state namespace name is empty or longer than {NAMESPACE_NAME_MAX} bytes: {0:?}")]
    BadNamespace(String),
    #[error("state store is full: {message}")]
    Full { message: String },
    #[error("state store I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A reactor thread holding the operator failed or stopped.
    #[error("{0}")]
    Reactor(String),
    /// A reactor's WAL failed (the run stops; the next start recovers).
    #[error(transparent)]
    Wal(#[from] crate::durability::wal::WalError),
}

/// Ordered key-value state, partitioned into namespaces.
pub trait StateStore: Send {
    /// Opens the namespace `name`, creating it if needed. The same name gives the same
    /// namespace across restarts.
    fn namespace(&mut self, name: &str) -> Result<Namespace, StateError>;

    fn get(&self, ns: Namespace, key: &[u8]) -> Option<&[u8]>;

    fn put(&mut self, ns: Namespace, key: &[u8], value: &[u8]) -> Result<(), StateError>;

    fn delete(&mut self, ns: Namespace, key: &[u8]) -> Result<(), StateError>;

    /// Deletes every key in `[start, end)` (none when `end <= start`); `end: None` means
    /// to the end of the namespace.
    fn delete_range(
        &mut self,
        ns: Namespace,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> Result<(), StateError>;

    /// Every entry whose key starts with `prefix`, in key order. Visits only those keys.
    fn scan_prefix<'a>(
        &'a self,
        ns: Namespace,
        prefix: &[u8],
    ) -> Box<dyn Iterator<Item = (&'a [u8], &'a [u8])> + 'a>;

    /// Bytes of keys and values held.
    fn bytes(&self) -> u64;

    /// Applies a change read back from the WAL (or journaled by another store).
    fn apply(&mut self, op: &StateOp) -> Result<(), StateError> {
        match op {
            StateOp::Put { ns, key, value } => {
                let ns = self.namespace(ns)?;
                self.put(ns, key, value)
            }
            StateOp::Delete { ns, key } => {
                let ns = self.namespace(ns)?;
                self.delete(ns, key)
            }
            StateOp::DeleteRange { ns, start, end } => {
                let ns = self.namespace(ns)?;
                self.delete_range(ns, start, end.as_deref())
            }
        }
    }
}

/// One operator's view of the store: its namespace and nothing else.
pub struct StateView<'a> {
    store: &'a mut dyn StateStore,
    ns: Namespace,
    name: String,
}

impl<'a> StateView<'a> {
    pub fn open(store: &'a mut dyn StateStore, name: &str) -> Result<Self, StateError> {
        let ns = store.namespace(name)?;
        Ok(Self {
            store,
            ns,
            name: name.to_owned(),
        })
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    #[must_use]
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.store.get(self.ns, key)
    }

    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        self.store.put(self.ns, key, value)
    }

    pub fn delete(&mut self, key: &[u8]) -> Result<(), StateError> {
        self.store.delete(self.ns, key)
    }

    pub fn delete_range(&mut self, start: &[u8], end: Option<&[u8]>) -> Result<(), StateError> {
        self.store.delete_range(self.ns, start, end)
    }

    #[must_use]
    pub fn scan_prefix<'b>(
        &'b self,
        prefix: &[u8],
    ) -> Box<dyn Iterator<Item = (&'b [u8], &'b [u8])> + 'b> {
        self.store.scan_prefix(self.ns, prefix)
    }

    /// Applies `op`, a change of this namespace recorded elsewhere (by a [`Recorder`]).
    pub fn apply(&mut self, op: &StateOp) -> Result<(), StateError> {
        let ns = match op {
            StateOp::Put { ns, .. }
            | StateOp::Delete { ns, .. }
            | StateOp::DeleteRange { ns, .. } => ns,
        };
        assert_eq!(ns, &self.name, "a change of another namespace");
        self.store.apply(op)
    }

    /// A corruption error naming this namespace.
    #[must_use]
    pub fn corrupt(&self, message: impl Into<String>) -> StateError {
        StateError::Corrupt {
            namespace: self.name.clone(),
            message: message.into(),
        }
    }
}

/// The changes a store made since the last [`Journal::take`], when it is on: what the WAL
/// records for an epoch.
#[derive(Debug, Clone, Default)]
pub struct Journal(Option<Vec<StateOp>>);

impl Journal {
    /// Records every change from now on.
    pub fn enable(&mut self) {
        self.0.get_or_insert_with(Vec::new);
    }

    /// The changes recorded since the last call (none while off).
    pub fn take(&mut self) -> Vec<StateOp> {
        self.0.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Records the change `op` makes of the namespace called `ns`, when on.
    pub fn record(&mut self, ns: &str, op: impl FnOnce(String) -> StateOp) {
        if let Some(journal) = &mut self.0 {
            journal.push(op(ns.to_owned()));
        }
    }
}

/// A store that holds nothing and records every change made through it: what an
/// operator writes at a checkpoint on a reactor thread, away from the pipeline's store.
/// Checkpoints only write; a read sees nothing (asserted in debug builds).
#[derive(Debug, Default)]
pub struct Recorder {
    names: Vec<String>,
    ops: Vec<StateOp>,
}

impl Recorder {
    /// The changes recorded since the last call.
    pub fn take(&mut self) -> Vec<StateOp> {
        std::mem::take(&mut self.ops)
    }

    fn name(&self, ns: Namespace) -> String {
        self.names[ns.0 as usize].clone()
    }
}

impl StateStore for Recorder {
    fn namespace(&mut self, name: &str) -> Result<Namespace, StateError> {
        if name.is_empty() || name.len() > NAMESPACE_NAME_MAX {
            return Err(StateError::BadNamespace(name.to_owned()));
        }
        let i = if let Some(i) = self.names.iter().position(|n| n == name) {
            i
        } else {
            self.names.push(name.to_owned());
            self.names.len() - 1
        };
        assert!(u32::try_from(i).is_ok(), "2^32 namespaces");
        Ok(Namespace(i as u32))
    }

    fn get(&self, _ns: Namespace, _key: &[u8]) -> Option<&[u8]> {
        debug_assert!(false, "a checkpoint read the state it writes");
        None
    }

    fn put(&mut self, ns: Namespace, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        self.ops.push(StateOp::Put {
            ns: self.name(ns),
            key: key.to_vec(),
            value: value.to_vec(),
        });
        Ok(())
    }

    fn delete(&mut self, ns: Namespace, key: &[u8]) -> Result<(), StateError> {
        self.ops.push(StateOp::Delete {
            ns: self.name(ns),
            key: key.to_vec(),
        });
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
        self.ops.push(StateOp::DeleteRange {
            ns: self.name(ns),
            start: start.to_vec(),
            end: end.map(<[u8]>::to_vec),
        });
        Ok(())
    }

    fn scan_prefix<'a>(
        &'a self,
        _ns: Namespace,
        _prefix: &[u8],
    ) -> Box<dyn Iterator<Item = (&'a [u8], &'a [u8])> + 'a> {
        debug_assert!(false, "a checkpoint read the state it writes");
        Box::new(std::iter::empty())
    }

    fn bytes(&self) -> u64 {
        0
    }
}

/// Key-value pairs in key order, for bulk loads.
pub type SortedEntries = Vec<(Box<[u8]>, Box<[u8]>)>;

/// One namespace of a [`MemoryStore`].
type Table = BTreeMap<Box<[u8]>, Box<[u8]>>;

/// State in ordered in-memory maps, one per namespace.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    names: BTreeMap<String, Namespace>,
    tables: Vec<Table>,
    bytes: u64,
    /// A put that would hold more key and value bytes than this fails with `Full`.
    bytes_max: u64,
    /// Namespace names by id, for the journal and checkpoints.
    ns_names: Vec<String>,
    journal: Journal,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_limit(u64::MAX)
    }
}

impl MemoryStore {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A store that refuses to hold more than `bytes_max` bytes of keys and values.
    #[must_use]
    pub fn with_limit(bytes_max: u64) -> Self {
        Self {
            names: BTreeMap::new(),
            tables: Vec::new(),
            bytes: 0,
            bytes_max,
            ns_names: Vec::new(),
            journal: Journal::default(),
        }
    }

    /// Records every change from now on, for [`MemoryStore::take_journal`].
    pub fn enable_journal(&mut self) {
        self.journal.enable();
    }

    /// The changes recorded since the last call (journaling must be on).
    pub fn take_journal(&mut self) -> Vec<StateOp> {
        self.journal.take()
    }

    /// Every entry, namespace by namespace, in key order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &[u8], &[u8])> {
        self.names.iter().flat_map(move |(name, ns)| {
            self.tables[ns.0 as usize]
                .iter()
                .map(move |(k, v)| (name.as_str(), &**k, &**v))
        })
    }

    /// A put into the namespace called `ns` (loading checkpoints).
    pub fn put_named(&mut self, ns: &str, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        let ns = self.namespace(ns)?;
        self.put(ns, key, value)
    }

    /// Fills the empty namespace `name` with `entries` (keys strictly increasing), in
    /// one bulk build: loading a checkpoint.
    pub fn load_sorted(&mut self, name: &str, entries: SortedEntries) -> Result<(), StateError> {
        let ns = self.namespace(name)?;
        let corrupt = |message: &str| StateError::Corrupt {
            namespace: name.to_owned(),
            message: message.to_owned(),
        };
        if !self.tables[ns.0 as usize].is_empty() {
            return Err(corrupt("the namespace appears twice in the checkpoint"));
        }
        if entries.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(corrupt("keys are out of order in the checkpoint"));
        }
        let bytes: u64 = entries.iter().map(|(k, v)| entry_bytes(k, v)).sum();
        if self.bytes + bytes > self.bytes_max {
            return Err(StateError::Full {
                message: format!(
                    "the checkpoint holds {} bytes of state, more than state.memory_bytes_max ({})",
                    self.bytes + bytes,
                    self.bytes_max
                ),
            });
        }
        self.tables[ns.0 as usize] = entries.into_iter().collect();
        self.bytes += bytes;
        Ok(())
    }

    fn record(&mut self, op: impl FnOnce(String) -> StateOp, ns: Namespace) {
        self.journal.record(&self.ns_names[ns.0 as usize], op);
    }

    fn table(&self, ns: Namespace) -> &Table {
        &self.tables[ns.0 as usize]
    }

    /// Keys held in `ns`.
    #[must_use]
    pub fn len(&self, ns: Namespace) -> usize {
        self.table(ns).len()
    }
}

fn entry_bytes(key: &[u8], value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64
}

impl StateStore for MemoryStore {
    fn namespace(&mut self, name: &str) -> Result<Namespace, StateError> {
        if name.is_empty() || name.len() > NAMESPACE_NAME_MAX {
            return Err(StateError::BadNamespace(name.to_owned()));
        }
        if let Some(&ns) = self.names.get(name) {
            return Ok(ns);
        }
        assert!(self.tables.len() < u32::MAX as usize, "2^32 namespaces");
        let ns = Namespace(self.tables.len() as u32);
        self.tables.push(BTreeMap::new());
        self.names.insert(name.to_owned(), ns);
        self.ns_names.push(name.to_owned());
        Ok(ns)
    }

    fn get(&self, ns: Namespace, key: &[u8]) -> Option<&[u8]> {
        self.table(ns).get(key).map(AsRef::as_ref)
    }

    fn put(&mut self, ns: Namespace, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        let table = &mut self.tables[ns.0 as usize];
        let old = table.get(key).map_or(0, |old| entry_bytes(key, old));
        let bytes = self.bytes - old + entry_bytes(key, value);
        if bytes > self.bytes_max {
            return Err(StateError::Full {
                message: format!(
                    "holding {} bytes, a write would take it past state.memory_bytes_max ({})",
                    self.bytes, self.bytes_max
                ),
            });
        }
        table.insert(key.into(), value.into());
        self.bytes = bytes;
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
        if let Some(old) = self.tables[ns.0 as usize].remove(key) {
            self.bytes -= entry_bytes(key, &old);
            self.record(
                |ns| StateOp::Delete {
                    ns,
                    key: key.to_vec(),
                },
                ns,
            );
        }
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
        let table = &mut self.tables[ns.0 as usize];
        let doomed: Vec<Box<[u8]>> = table
            .range::<[u8], _>((
                Bound::Included(start),
                end.map_or(Bound::Unbounded, Bound::Excluded),
            ))
            .map(|(k, _)| k.clone())
            .collect();
        if doomed.is_empty() {
            return Ok(());
        }
        for k in doomed {
            if let Some(v) = table.remove(&k) {
                self.bytes -= entry_bytes(&k, &v);
            }
        }
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
            self.table(ns)
                .range::<[u8], _>((Bound::Included(&*prefix), Bound::Unbounded))
                .take_while(move |(k, _)| k.starts_with(&prefix))
                .map(|(k, v)| (&**k, &**v)),
        )
    }

    fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Put(Vec<u8>, Vec<u8>),
        Delete(Vec<u8>),
        DeleteRange(Vec<u8>, Option<Vec<u8>>),
    }

    fn key() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(0u8..4, 0..4)
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (key(), proptest::collection::vec(any::<u8>(), 0..8)).prop_map(|(k, v)| Op::Put(k, v)),
            key().prop_map(Op::Delete),
            (key(), proptest::option::of(key())).prop_map(|(a, b)| Op::DeleteRange(a, b)),
        ]
    }

    proptest! {
        #[test]
        fn memory_store_matches_a_btreemap_per_namespace(
            ops in proptest::collection::vec((0usize..2, op()), 0..200),
            prefix in key(),
        ) {
            let mut store = MemoryStore::new();
            let ns = [store.namespace("a").unwrap(), store.namespace("b").unwrap()];
            let mut model: [BTreeMap<Vec<u8>, Vec<u8>>; 2] = Default::default();
            for (n, op) in ops {
                match op {
                    Op::Put(k, v) => {
                        store.put(ns[n], &k, &v).unwrap();
                        model[n].insert(k, v);
                    }
                    Op::Delete(k) => {
                        store.delete(ns[n], &k).unwrap();
                        model[n].remove(&k);
                    }
                    Op::DeleteRange(a, b) => {
                        store.delete_range(ns[n], &a, b.as_deref()).unwrap();
                        model[n].retain(|k, _| !(*k >= a && b.as_ref().is_none_or(|b| k < b)));
                    }
                }
            }
            let mut bytes = 0;
            for n in 0..2 {
                let got: Vec<(Vec<u8>, Vec<u8>)> = store
                    .scan_prefix(ns[n], &prefix)
                    .map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .collect();
                let want: Vec<(Vec<u8>, Vec<u8>)> = model[n]
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                prop_assert_eq!(got, want);
                for (k, v) in &model[n] {
                    prop_assert_eq!(store.get(ns[n], k), Some(v.as_slice()));
                    bytes += (k.len() + v.len()) as u64;
                }
            }
            prop_assert_eq!(store.bytes(), bytes);
            prop_assert_eq!(store.namespace("a").unwrap(), ns[0], "same name, same namespace");
        }
    }

    #[test]
    fn a_full_store_refuses_writes_and_keeps_what_it_has() {
        let mut store = MemoryStore::with_limit(10);
        let ns = store.namespace("q").unwrap();
        store.put(ns, b"ab", b"cdefgh").unwrap();
        assert!(matches!(
            store.put(ns, b"x", b"yyyy"),
            Err(StateError::Full { .. })
        ));
        assert_eq!(store.get(ns, b"ab"), Some(&b"cdefgh"[..]));
        assert_eq!(store.bytes(), 8);
        // Replacing a value with a smaller one fits.
        store.put(ns, b"ab", b"c").unwrap();
        assert_eq!(store.bytes(), 3);
    }

    #[test]
    fn namespace_names_are_bounded() {
        let mut store = MemoryStore::new();
        assert!(store.namespace("").is_err());
        assert!(
            store
                .namespace(&"x".repeat(NAMESPACE_NAME_MAX + 1))
                .is_err()
        );
    }
}
