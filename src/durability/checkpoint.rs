//! Checkpoint files: where the state arena was, as of a committed epoch, once it was
//! durable, so that the WAL before it can be deleted and recovery replays only what came
//! after.
//!
//! The state itself is in the arena ([`crate::state::mmap`]), which only grows: a
//! checkpoint is the arena's generation and length when the epoch committed, written
//! after a `fdatasync` of the arena (on a checkpoint thread; the pipeline goes on
//! appending meanwhile). Each checkpoint therefore writes only what changed since the
//! last one. Recovery verifies the CRC32C of every arena record up to that length.
//!
//! Format of `checkpoint-<epoch as 16 hex digits>.ckpt` (little-endian):
//!
//! | field | bytes |
//! |---|---|
//! | magic `LAMCKP\0\x02` (last byte: format version) | 8 |
//! | epoch | 8 |
//! | LSN of the WAL record it covers (replay starts after it) | 8 |
//! | wall-clock time written, ms since the Unix epoch | 8 |
//! | arena generation (`arena-<16 hex digits>.dat`) | 8 |
//! | arena length: the state is the arena's records before it | 8 |
//! | live key and value bytes | 8 |
//! | live keys | 8 |
//! | commit entry of the epoch (length-prefixed, [`super::entry::CommitEntry`]) | 4 + n |
//! | CRC32C of every byte before it | 4 |
//!
//! It is written to a `.tmp` file, synced, renamed into place and the directory synced,
//! so a crash leaves either the whole file or none. A checkpoint whose file or arena
//! fails its checksums is reported and skipped for the previous one; [`RETAINED`] are
//! kept for that, with the arena generations and WAL they need.

use super::entry::CommitEntry;
use super::storage::Storage;
use crate::state::codec::{CodecError, Reader, Writer};

/// Checkpoints kept: the newest, and older ones to fall back to if it is corrupt.
pub const RETAINED: usize = 2;
const MAGIC: [u8; 8] = *b"LAMCKP\x00\x02";

#[derive(Debug, Clone, Copy)]
pub struct CheckpointMeta {
    pub epoch: u64,
    pub lsn: u64,
    pub wall_ms: i64,
    /// Arena generation and length: the state.
    pub generation: u64,
    pub arena_len: u64,
    pub live_bytes: u64,
    pub keys: u64,
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

#[must_use]
pub fn arena_name(generation: u64) -> String {
    format!("arena-{generation:016x}.dat")
}

#[must_use]
pub fn parse_arena_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("arena-")?.strip_suffix(".dat")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Why a checkpoint file could not be written.
#[derive(Debug)]
pub enum WriteError {
    /// Creating, writing or renaming it failed: nothing was lost, it may be tried again.
    Write(std::io::Error),
    /// An `fsync` failed: never retried (the kernel may have dropped the data).
    Sync(std::io::Error),
}

/// Writes the checkpoint file of `meta` (its arena already durable).
pub fn write(
    storage: &mut dyn Storage,
    meta: &CheckpointMeta,
    commit: &CommitEntry,
) -> Result<(), WriteError> {
    let name = file_name(meta.epoch);
    let tmp = format!("{name}.tmp");
    let mut w = Writer::default();
    w.buf.extend_from_slice(&MAGIC);
    for v in [
        meta.epoch,
        meta.lsn,
        meta.wall_ms as u64,
        meta.generation,
        meta.arena_len,
        meta.live_bytes,
        meta.keys,
    ] {
        w.i64(v as i64);
    }
    w.bytes(&commit.encode());
    let crc = crc32c::crc32c(&w.buf);
    w.u32(crc);
    storage.create(&tmp).map_err(WriteError::Write)?;
    storage.append(&tmp, &w.buf).map_err(WriteError::Write)?;
    storage.sync(&tmp).map_err(WriteError::Sync)?;
    storage.rename(&tmp, &name).map_err(WriteError::Write)?;
    storage.sync_dir().map_err(WriteError::Sync)
}

/// Reads and verifies one checkpoint file.
pub fn load(data: &[u8]) -> Result<(CheckpointMeta, CommitEntry), CodecError> {
    if data.len() < MAGIC.len() + 4 || data[..8] != MAGIC {
        return Err(CodecError(
            "not a laminar checkpoint of this version (bad magic)".into(),
        ));
    }
    let (body, trailer) = data.split_at(data.len() - 4);
    let mut crc = [0u8; 4];
    crc.copy_from_slice(trailer);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc) {
        return Err(CodecError("checksum mismatch".into()));
    }
    let mut r = Reader::new(&body[8..]);
    let mut field = || r.i64().map(|v| v as u64);
    let meta = CheckpointMeta {
        epoch: field()?,
        lsn: field()?,
        wall_ms: field()? as i64,
        generation: field()?,
        arena_len: field()?,
        live_bytes: field()?,
        keys: field()?,
    };
    let commit = CommitEntry::decode(r.bytes()?)?;
    r.finish()?;
    if commit.epoch != meta.epoch {
        return Err(CodecError(format!(
            "header says epoch {}, its commit entry {}",
            meta.epoch, commit.epoch
        )));
    }
    Ok((meta, commit))
}
