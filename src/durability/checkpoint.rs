//! Checkpoint files: a full copy of the state store as of a committed epoch, so that
//! the WAL before it can be deleted and recovery replays only what came after.
//!
//! Format of `checkpoint-<epoch as 16 hex digits>.ckpt` (little-endian):
//!
//! | field | bytes |
//! |---|---|
//! | magic `LAMCKP\0\x01` (last byte: format version) | 8 |
//! | epoch | 8 |
//! | LSN of the WAL record it covers (replay starts after it) | 8 |
//! | wall-clock time written, ms since the Unix epoch | 8 |
//! | commit entry of the epoch (length-prefixed, [`super::entry::CommitEntry`]) | 4 + n |
//! | entries: `1`, namespace, key, value (each length-prefixed) ... then `0` | ... |
//! | CRC32C of every byte before it | 4 |
//!
//! It is written to a `.tmp` file, synced, renamed into place and the directory synced,
//! so a crash leaves either the whole file or none. A file whose checksum fails is
//! reported and skipped for the previous one; [`RETAINED`] are kept for that.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::entry::CommitEntry;
use super::storage::Storage;
use crate::state::MemoryStore;
use crate::state::codec::{CodecError, Reader, Writer};

/// Checkpoints kept: the newest, and older ones to fall back to if it is corrupt.
pub const RETAINED: usize = 2;
const MAGIC: [u8; 8] = *b"LAMCKP\x00\x01";
/// Bytes gathered before one append to the file.
const WRITE_CHUNK: usize = 4 << 20;

#[derive(Debug, Clone)]
pub struct CheckpointMeta {
    pub epoch: u64,
    pub lsn: u64,
    pub wall_ms: i64,
    pub bytes: u64,
}

#[must_use]
pub fn file_name(epoch: u64) -> String {
    format!("checkpoint-{epoch:016x}.ckpt")
}

#[must_use]
pub fn parse_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("checkpoint-")?.strip_suffix(".ckpt")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Writes `store` as the checkpoint of `commit` (whose WAL record is `lsn`).
pub fn write(
    storage: &mut dyn Storage,
    store: &MemoryStore,
    commit: &CommitEntry,
    lsn: u64,
) -> std::io::Result<(CheckpointMeta, std::time::Duration)> {
    let started = Instant::now();
    let name = file_name(commit.epoch);
    let tmp = format!("{name}.tmp");
    let wall_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    storage.create(&tmp)?;
    let mut w = Writer::default();
    w.buf.extend_from_slice(&MAGIC);
    w.i64(commit.epoch as i64);
    w.i64(lsn as i64);
    w.i64(wall_ms);
    w.bytes(&commit.encode());
    let mut crc = 0u32;
    let mut bytes = 0u64;
    let mut flush = |w: &mut Writer, storage: &mut dyn Storage| -> std::io::Result<()> {
        crc = crc32c::crc32c_append(crc, &w.buf);
        bytes += w.buf.len() as u64;
        storage.append(&tmp, &w.buf)?;
        w.clear();
        Ok(())
    };
    for (ns, key, value) in store.entries() {
        w.u8(1);
        w.bytes(ns.as_bytes());
        w.bytes(key);
        w.bytes(value);
        if w.buf.len() >= WRITE_CHUNK {
            flush(&mut w, storage)?;
        }
    }
    w.u8(0);
    flush(&mut w, storage)?;
    storage.append(&tmp, &crc.to_le_bytes())?;
    storage.sync(&tmp)?;
    storage.rename(&tmp, &name)?;
    storage.sync_dir()?;
    Ok((
        CheckpointMeta {
            epoch: commit.epoch,
            lsn,
            wall_ms,
            bytes: bytes + 4,
        },
        started.elapsed(),
    ))
}

/// A checkpoint read back and verified.
pub struct Loaded {
    pub meta: CheckpointMeta,
    pub commit: CommitEntry,
    pub store: MemoryStore,
}

/// Why a checkpoint could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file is damaged: recovery falls back to an older checkpoint.
    #[error("{0}")]
    Corrupt(#[from] CodecError),
    /// The state does not fit `state.memory_bytes_max` (or is out of order): an error.
    #[error(transparent)]
    State(crate::state::StateError),
}

/// Reads and verifies one checkpoint file into a store limited to `bytes_max`.
pub fn load(data: &[u8], bytes_max: u64) -> Result<Loaded, LoadError> {
    if data.len() < MAGIC.len() + 4 || data[..8] != MAGIC {
        return Err(CodecError("not a laminar checkpoint (bad magic)".into()).into());
    }
    let (body, trailer) = data.split_at(data.len() - 4);
    let mut crc = [0u8; 4];
    crc.copy_from_slice(trailer);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc) {
        return Err(CodecError("checksum mismatch".into()).into());
    }
    let mut r = Reader::new(&body[8..]);
    let epoch = r.i64()? as u64;
    let lsn = r.i64()? as u64;
    let wall_ms = r.i64()?;
    let commit = CommitEntry::decode(r.bytes()?)?;
    // Entries come namespace by namespace in key order: each namespace is built in bulk.
    let mut store = MemoryStore::with_limit(bytes_max);
    let mut current: Option<(String, crate::state::SortedEntries)> = None;
    loop {
        match r.u8()? {
            0 => break,
            1 => {
                let ns = std::str::from_utf8(r.bytes()?)
                    .map_err(|_| CodecError("namespace is not UTF-8".into()))?;
                let key = r.bytes()?;
                let value = r.bytes()?;
                if current.as_ref().is_none_or(|(name, _)| name != ns) {
                    if let Some((name, entries)) = current.take() {
                        store
                            .load_sorted(&name, entries)
                            .map_err(LoadError::State)?;
                    }
                    current = Some((ns.to_owned(), Vec::new()));
                }
                if let Some((_, entries)) = &mut current {
                    entries.push((key.into(), value.into()));
                }
            }
            t => return Err(CodecError(format!("entry tag {t}")).into()),
        }
    }
    if let Some((name, entries)) = current.take() {
        store
            .load_sorted(&name, entries)
            .map_err(LoadError::State)?;
    }
    r.finish()?;
    if commit.epoch != epoch {
        return Err(CodecError(format!(
            "header says epoch {epoch}, its commit entry {}",
            commit.epoch
        ))
        .into());
    }
    Ok(Loaded {
        meta: CheckpointMeta {
            epoch,
            lsn,
            wall_ms,
            bytes: data.len() as u64,
        },
        commit,
        store,
    })
}
