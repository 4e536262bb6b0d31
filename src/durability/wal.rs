//! The write-ahead log: CRC32C-checked records in numbered segment files.
//!
//! On-disk format (little-endian):
//!
//! | bytes | segment header (28 bytes, once per file) |
//! |---|---|
//! | 0..8 | magic `LAMWAL\0\x01` (the last byte is the format version) |
//! | 8..16 | segment id (`u64`, also in the file name: `wal-<id as 16 hex digits>.log` for the pipeline's WAL, `wal-r<reactor>-<id>.log` for a reactor's) |
//! | 16..24 | LSN of the segment's first record (`u64`) |
//! | 24..28 | CRC32C of bytes 0..24 |
//!
//! | bytes | record (17-byte header, then the payload) |
//! |---|---|
//! | 0..4 | CRC32C of the segment id (8 bytes), then bytes 4..17+len of this record |
//! | 4..8 | payload length `len` (`u32`, at most [`RECORD_BYTES_MAX`]) |
//! | 8..16 | LSN (`u64`): one more than the previous record's, across segments |
//! | 16 | record kind (`u8`, see [`crate::durability::entry`]) |
//! | 17..17+len | payload |
//!
//! The segment id in the checksum makes a stale record left in a reused file fail. On
//! open, a record that fails its check (short, over-long, bad CRC, wrong LSN) is a torn
//! write when nothing valid follows it in the last segment: the tail is cut off and
//! logged. If a valid record follows, or a later segment exists, it is corruption: open
//! fails and names the file and offset, and nothing is skipped silently.
//!
//! Appends are buffered and made durable by [`Wal::sync`]: one `fdatasync` for every
//! record appended since the last one (group commit). A failed write or sync poisons
//! the log: every later call fails, and the process restarts from what is durable
//! (retrying an `fsync` can report success for data that was dropped).

use std::time::{Duration, Instant};

use super::storage::Storage;

/// Largest payload of one record. Larger entries are split by their writers.
pub const RECORD_BYTES_MAX: usize = 16 << 20;
/// A segment that grew past this is closed and a new one started at the next sync.
pub const SEGMENT_BYTES_MAX: u64 = 64 << 20;
/// Appended bytes held in memory before they are written (not synced) to the segment.
const WRITE_BUFFER_BYTES: usize = 1 << 20;

const SEGMENT_MAGIC: [u8; 8] = *b"LAMWAL\x00\x01";
pub const SEGMENT_HEADER_BYTES: usize = 28;
pub const RECORD_HEADER_BYTES: usize = 17;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead log: cannot {op} {file}: {source}")]
    Io {
        op: &'static str,
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "write-ahead log is corrupt at {file}, byte {offset}: {message}. Valid data follows \
         it, so this is not a torn write and laminar will not skip it. Move the state \
         directory aside to start over from the sources' start_from, or restore it from a backup"
    )]
    Corrupt {
        file: String,
        offset: u64,
        message: String,
    },
    #[error("write-ahead log record of {0} bytes is over the limit of {RECORD_BYTES_MAX} bytes")]
    TooLarge(usize),
    #[error(
        "write-ahead log failed earlier ({0}); nothing more is written. Restart to recover from what is durable"
    )]
    Failed(String),
}

/// A record read back on open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRecord {
    pub lsn: u64,
    pub kind: u8,
    pub payload: Vec<u8>,
    /// Where the record ends: segment id and byte offset.
    pub end: (u64, u64),
}

/// What the log did since it was opened.
#[derive(Debug, Clone, Copy, Default)]
pub struct WalStats {
    pub appends: u64,
    pub bytes: u64,
    pub syncs: u64,
    /// Duration of the last `fdatasync`.
    pub last_sync: Duration,
    /// What opening the log cut off as a torn write.
    pub torn_bytes: u64,
}

#[derive(Debug, Clone)]
struct Segment {
    id: u64,
    first_lsn: u64,
}

/// The pipeline's WAL: segments `wal-<id>.log`.
pub const MAIN: &str = "wal-";

/// The name prefix of reactor `index`'s WAL: segments `wal-r<index>-<id>.log`.
#[must_use]
pub fn reactor_prefix(index: u32) -> String {
    format!("wal-r{index}-")
}

/// The reactor index of a reactor WAL's segment `name`.
#[must_use]
pub fn parse_reactor_segment(name: &str) -> Option<u32> {
    let (digits, _) = name.strip_prefix("wal-r")?.split_once('-')?;
    let index: u32 = digits.parse().ok()?;
    (index.to_string() == digits && parse_segment_name(&reactor_prefix(index), name).is_some())
        .then_some(index)
}

fn segment_name(prefix: &str, id: u64) -> String {
    format!("{prefix}{id:016x}.log")
}

fn parse_segment_name(prefix: &str, name: &str) -> Option<u64> {
    let hex = name.strip_prefix(prefix)?.strip_suffix(".log")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

fn segment_header(id: u64, first_lsn: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..16].copy_from_slice(&id.to_le_bytes());
    h[16..24].copy_from_slice(&first_lsn.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

fn record_crc(segment: u64, rest: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&segment.to_le_bytes()), rest)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A record that checks out at `at`: (lsn, kind, payload range end).
fn record_at(data: &[u8], at: usize, segment: u64) -> Result<(u64, u8, usize), String> {
    if data.len() - at < RECORD_HEADER_BYTES {
        return Err(format!(
            "{} bytes left, a record header needs {RECORD_HEADER_BYTES}",
            data.len() - at
        ));
    }
    let len = u32_at(data, at + 4) as usize;
    if len > RECORD_BYTES_MAX {
        return Err(format!("record length {len} is over the limit"));
    }
    let end = at + RECORD_HEADER_BYTES + len;
    if end > data.len() {
        return Err(format!(
            "record of {len} bytes runs past the end of the file"
        ));
    }
    if record_crc(segment, &data[at + 4..end]) != u32_at(data, at) {
        return Err("checksum mismatch".to_owned());
    }
    Ok((u64_at(data, at + 8), data[at + 16], end))
}

pub struct Wal {
    storage: Box<dyn Storage>,
    /// Segment names start with this: [`MAIN`] or a [`reactor_prefix`].
    prefix: String,
    /// Oldest first; the last one is appended to.
    segments: Vec<Segment>,
    /// Bytes in the active segment, written or buffered.
    active_len: u64,
    buf: Vec<u8>,
    next_lsn: u64,
    failed: Option<String>,
    stats: WalStats,
}

impl Wal {
    /// Opens the pipeline's log in `storage` (creating it when empty) and returns every
    /// record in it, after cutting off a torn tail.
    pub fn open(storage: Box<dyn Storage>) -> Result<(Self, Vec<WalRecord>), WalError> {
        Self::open_named(storage, MAIN, 1)
    }

    /// [`Wal::open`] for the log whose segment names start with `prefix`; a log created
    /// here numbers its records from `first_lsn`.
    pub fn open_named(
        storage: Box<dyn Storage>,
        prefix: &str,
        first_lsn: u64,
    ) -> Result<(Self, Vec<WalRecord>), WalError> {
        let io = |op, file: String| move |source| WalError::Io { op, file, source };
        let mut ids: Vec<u64> = storage
            .list()
            .map_err(io("list", storage.describe("")))?
            .iter()
            .filter_map(|n| parse_segment_name(prefix, n))
            .collect();
        ids.sort_unstable();
        let mut wal = Self {
            storage,
            prefix: prefix.to_owned(),
            segments: Vec::new(),
            active_len: 0,
            buf: Vec::new(),
            next_lsn: 1,
            failed: None,
            stats: WalStats::default(),
        };
        let mut records = Vec::new();
        for (n, &id) in ids.iter().enumerate() {
            let last = n + 1 == ids.len();
            let name = segment_name(&wal.prefix, id);
            let file = wal.storage.describe(&name);
            let data = wal.storage.read(&name).map_err(io("read", file.clone()))?;
            let header_ok = data.len() >= SEGMENT_HEADER_BYTES
                && data[0..8] == SEGMENT_MAGIC
                && u32_at(&data, 24) == crc32c::crc32c(&data[0..24])
                && u64_at(&data, 8) == id;
            if !header_ok {
                if last && data.len() <= SEGMENT_HEADER_BYTES {
                    // Created but its header never became durable: a torn rotation.
                    tracing::warn!(
                        file,
                        "removing a WAL segment whose header was never completed"
                    );
                    wal.stats.torn_bytes += data.len() as u64;
                    wal.storage.remove(&name).map_err(io("remove", file))?;
                    wal.storage
                        .sync_dir()
                        .map_err(io("sync", wal.storage.describe("")))?;
                    break;
                }
                return Err(WalError::Corrupt {
                    file,
                    offset: 0,
                    message: "bad segment header".to_owned(),
                });
            }
            let first_lsn = u64_at(&data, 16);
            if !records.is_empty() && first_lsn != wal.next_lsn {
                return Err(WalError::Corrupt {
                    file,
                    offset: 0,
                    message: format!(
                        "segment starts at LSN {first_lsn}, the previous one ended before LSN {}",
                        wal.next_lsn
                    ),
                });
            }
            wal.next_lsn = first_lsn;
            let mut at = SEGMENT_HEADER_BYTES;
            while at < data.len() {
                let checked = record_at(&data, at, id).and_then(|(lsn, kind, end)| {
                    if lsn == wal.next_lsn {
                        Ok((lsn, kind, end))
                    } else {
                        Err(format!("LSN {lsn} where {} was expected", wal.next_lsn))
                    }
                });
                match checked {
                    Ok((lsn, kind, end)) => {
                        records.push(WalRecord {
                            lsn,
                            kind,
                            payload: data[at + RECORD_HEADER_BYTES..end].to_vec(),
                            end: (id, end as u64),
                        });
                        wal.next_lsn = lsn + 1;
                        at = end;
                    }
                    Err(message) => {
                        let valid_after = (at + 1..data.len()).any(|p| {
                            record_at(&data, p, id).is_ok_and(|(l, _, _)| l >= wal.next_lsn)
                        });
                        if !last || valid_after {
                            return Err(WalError::Corrupt {
                                file,
                                offset: at as u64,
                                message,
                            });
                        }
                        tracing::warn!(
                            file,
                            offset = at,
                            torn_bytes = data.len() - at,
                            "cutting off a torn write at the end of the WAL ({message})"
                        );
                        wal.stats.torn_bytes += (data.len() - at) as u64;
                        wal.storage
                            .truncate(&name, at as u64)
                            .map_err(io("truncate", file.clone()))?;
                        wal.storage.sync(&name).map_err(io("sync", file.clone()))?;
                        break;
                    }
                }
            }
            wal.segments.push(Segment { id, first_lsn });
            wal.active_len = at.min(data.len()) as u64;
        }
        if wal.segments.is_empty() {
            wal.next_lsn = first_lsn;
            wal.start_segment(ids.last().map_or(1, |id| id + 1))?;
        }
        Ok((wal, records))
    }

    fn io_error(&mut self, op: &'static str, name: &str, source: std::io::Error) -> WalError {
        let e = WalError::Io {
            op,
            file: self.storage.describe(name),
            source,
        };
        self.failed = Some(e.to_string());
        e
    }

    fn start_segment(&mut self, id: u64) -> Result<(), WalError> {
        let name = segment_name(&self.prefix, id);
        let header = segment_header(id, self.next_lsn);
        let result = self
            .storage
            .create(&name)
            .and_then(|()| self.storage.append(&name, &header))
            .and_then(|()| self.storage.sync(&name))
            .and_then(|()| self.storage.sync_dir());
        if let Err(e) = result {
            return Err(self.io_error("start segment", &name, e));
        }
        self.segments.push(Segment {
            id,
            first_lsn: self.next_lsn,
        });
        self.active_len = SEGMENT_HEADER_BYTES as u64;
        Ok(())
    }

    fn active(&self) -> &Segment {
        assert!(!self.segments.is_empty(), "the WAL always has a segment");
        &self.segments[self.segments.len() - 1]
    }

    fn check(&self) -> Result<(), WalError> {
        match &self.failed {
            Some(f) => Err(WalError::Failed(f.clone())),
            None => Ok(()),
        }
    }

    /// Appends a record; durable after the next [`Wal::sync`]. Returns its LSN.
    pub fn append(&mut self, kind: u8, payload: &[u8]) -> Result<u64, WalError> {
        self.check()?;
        if payload.len() > RECORD_BYTES_MAX {
            return Err(WalError::TooLarge(payload.len()));
        }
        let lsn = self.next_lsn;
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        self.buf
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&lsn.to_le_bytes());
        self.buf.push(kind);
        self.buf.extend_from_slice(payload);
        let crc = record_crc(self.active().id, &self.buf[start + 4..]);
        self.buf[start..start + 4].copy_from_slice(&crc.to_le_bytes());
        self.next_lsn += 1;
        self.active_len += (RECORD_HEADER_BYTES + payload.len()) as u64;
        self.stats.appends += 1;
        self.stats.bytes += (RECORD_HEADER_BYTES + payload.len()) as u64;
        if self.buf.len() >= WRITE_BUFFER_BYTES {
            self.write_buffer()?;
        }
        Ok(lsn)
    }

    fn write_buffer(&mut self) -> Result<(), WalError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let name = segment_name(&self.prefix, self.active().id);
        if let Err(e) = self.storage.append(&name, &self.buf) {
            return Err(self.io_error("write", &name, e));
        }
        self.buf.clear();
        Ok(())
    }

    /// Writes what was appended and makes it durable with one `fdatasync`; starts a new
    /// segment when the active one is full.
    pub fn sync(&mut self) -> Result<(), WalError> {
        self.check()?;
        let name = segment_name(&self.prefix, self.active().id);
        let started = Instant::now();
        let synced = if self.buf.is_empty() {
            self.storage.sync(&name)
        } else {
            let synced = self.storage.append_sync(&name, &self.buf);
            self.buf.clear();
            synced
        };
        if let Err(e) = synced {
            return Err(self.io_error("write and fdatasync", &name, e));
        }
        self.stats.last_sync = started.elapsed();
        self.stats.syncs += 1;
        if self.active_len >= SEGMENT_BYTES_MAX {
            let id = self.active().id + 1;
            self.start_segment(id)?;
        }
        Ok(())
    }

    /// Cuts every record after `last` (one returned by open; `None`: all of them) off the
    /// log, before anything is appended: what follows the last complete commit is never
    /// replayed, and numbering goes on from `last`.
    pub fn cut_after(&mut self, last: Option<&WalRecord>) -> Result<(), WalError> {
        assert!(self.buf.is_empty(), "cut_after before any append");
        let first = &self.segments[0];
        let ((segment, offset), next_lsn) = last.map_or(
            ((first.id, SEGMENT_HEADER_BYTES as u64), first.first_lsn),
            |r| (r.end, r.lsn + 1),
        );
        while self.segments.len() > 1 && self.active().id > segment {
            let name = segment_name(&self.prefix, self.active().id);
            if let Err(e) = self.storage.remove(&name) {
                return Err(self.io_error("remove", &name, e));
            }
            self.segments.pop();
        }
        assert_eq!(
            self.active().id,
            segment,
            "cut inside a segment that exists"
        );
        let name = segment_name(&self.prefix, segment);
        if let Err(e) = self
            .storage
            .truncate(&name, offset)
            .and_then(|()| self.storage.sync(&name))
            .and_then(|()| self.storage.sync_dir())
        {
            return Err(self.io_error("truncate", &name, e));
        }
        self.active_len = offset;
        self.next_lsn = next_lsn;
        Ok(())
    }

    /// Deletes the segments that hold only records below `lsn` (covered by a durable
    /// checkpoint). The active segment is kept.
    pub fn remove_before(&mut self, lsn: u64) -> Result<usize, WalError> {
        self.check()?;
        let mut removed = 0;
        while self.segments.len() > 1 && self.segments[1].first_lsn <= lsn {
            let name = segment_name(&self.prefix, self.segments[0].id);
            if let Err(e) = self.storage.remove(&name) {
                return Err(self.io_error("remove", &name, e));
            }
            self.segments.remove(0);
            removed += 1;
        }
        if removed > 0
            && let Err(e) = self.storage.sync_dir()
        {
            return Err(self.io_error("sync", "", e));
        }
        Ok(removed)
    }

    /// Deletes every segment, oldest first: a reactor's log that no retained checkpoint
    /// needs any more and that no reactor writes. After a failure, the segments left
    /// are still listed and a later call goes on.
    pub fn remove_all(&mut self) -> Result<(), WalError> {
        while let Some(segment) = self.segments.first() {
            let name = segment_name(&self.prefix, segment.id);
            if let Err(e) = self.storage.remove(&name) {
                return Err(self.io_error("remove", &name, e));
            }
            self.segments.remove(0);
        }
        if let Err(e) = self.storage.sync_dir() {
            return Err(self.io_error("sync", "", e));
        }
        Ok(())
    }

    /// The LSN of the oldest record the log holds or would hold.
    #[must_use]
    pub fn first_lsn(&self) -> u64 {
        self.segments.first().map_or(self.next_lsn, |s| s.first_lsn)
    }

    /// The LSN the next append gets.
    #[must_use]
    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// Segment files in the log.
    #[must_use]
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    #[must_use]
    pub fn stats(&self) -> WalStats {
        self.stats
    }

    /// The storage, for checkpoints kept beside the log.
    pub fn storage(&mut self) -> &mut dyn Storage {
        self.storage.as_mut()
    }
}
