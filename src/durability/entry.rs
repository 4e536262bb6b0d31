//! What the WAL records hold, and their encoding (with [`crate::state::codec`]).
//!
//! An epoch is written as: its state changes ([`KIND_STATE`], in chunks), the output of
//! its exactly-once sinks ([`KIND_OUTPUT`], in chunks), then its [`CommitEntry`]
//! ([`KIND_COMMIT`]), then one `fdatasync`. The commit entry is the commit point: recovery
//! applies an epoch's state and output only when its commit entry is in the log. After
//! the exactly-once sinks got every acknowledgement for the epoch, [`KIND_DELIVERED`]
//! records it (made durable with the next epoch's commit).

use crate::state::codec::{CodecError, Reader, Writer};

pub const KIND_STATE: u8 = 1;
pub const KIND_OUTPUT: u8 = 2;
pub const KIND_COMMIT: u8 = 3;
pub const KIND_DELIVERED: u8 = 4;

/// Tag of the commit entry's reactor WAL positions.
const TAG_REACTOR_WALS: u8 = 1;

/// Bytes of ops or output records gathered into one WAL record.
pub const CHUNK_BYTES: usize = 4 << 20;

/// One change to the state store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateOp {
    Put {
        ns: String,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        ns: String,
        key: Vec<u8>,
    },
    DeleteRange {
        ns: String,
        start: Vec<u8>,
        end: Option<Vec<u8>>,
    },
}

impl StateOp {
    fn encoded_len(&self) -> usize {
        match self {
            Self::Put { ns, key, value } => 13 + ns.len() + key.len() + value.len(),
            Self::Delete { ns, key } => 9 + ns.len() + key.len(),
            Self::DeleteRange { ns, start, end } => {
                14 + ns.len() + start.len() + end.as_ref().map_or(0, Vec::len)
            }
        }
    }
}

/// One output record of an exactly-once sink: what is sent to Kafka.
pub use laminar_connectors::kafka::OutputRecord;

/// Output of one sink in one epoch, from sequence number `first_seq` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub epoch: u64,
    pub sink: String,
    pub first_seq: u64,
    pub records: Vec<OutputRecord>,
}

/// Watermark state of a source: its current watermark and each partition's highest
/// event time, by the source's partition id; for a source of several topics, which
/// `(topic, partition)` each id stands for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatermarkState {
    pub current: i64,
    pub partitions: Vec<(i32, i64)>,
    /// `(topic, partition, id)`; empty when ids are partition numbers.
    pub slots: Vec<(String, i32, i32)>,
}

/// A source's next offsets (and watermark) at a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceCommit {
    pub name: String,
    /// `(topic, partition, next offset)`.
    pub positions: Vec<(String, i32, i64)>,
    pub watermark: Option<WatermarkState>,
}

/// Where an exactly-once sink's output for the epoch starts, per partition: the end of
/// what it had acknowledged before the epoch. Recovery reads back from there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkCommit {
    pub name: String,
    pub topic: String,
    pub starts: Vec<(i32, i64)>,
}

/// The commit entry of an epoch: offsets, watermarks and sink positions, together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitEntry {
    pub epoch: u64,
    /// Wall-clock time of the commit, milliseconds since the Unix epoch.
    pub wall_ms: i64,
    pub sources: Vec<SourceCommit>,
    pub sinks: Vec<SinkCommit>,
    /// `(reactor WAL, LSN)`: how far each reactor's WAL holds committed state changes,
    /// this epoch's included (the WALs are numbered over the reactors of every split
    /// query, in file order). Every reactor WAL recovery may still need is listed, also
    /// one no reactor of this run writes. Encoded after the sinks, only when not empty
    /// (an entry without it reads as it did before reactors had WALs).
    pub reactor_wals: Vec<(u32, u64)>,
}

fn str_of(r: &mut Reader<'_>) -> Result<String, CodecError> {
    String::from_utf8(r.bytes()?.to_vec()).map_err(|_| CodecError("a name is not UTF-8".into()))
}

fn count(r: &mut Reader<'_>, what: &str) -> Result<usize, CodecError> {
    let n = r.u32()? as usize;
    // Every element takes at least one byte: a count above the bytes left is corrupt,
    // and is refused before anything is allocated for it.
    if n > super::wal::RECORD_BYTES_MAX {
        return Err(CodecError(format!(
            "{n} {what} is more than a record can hold"
        )));
    }
    Ok(n)
}

fn opt_bytes(w: &mut Writer, v: Option<&[u8]>) {
    match v {
        None => w.u8(0),
        Some(b) => {
            w.u8(1);
            w.bytes(b);
        }
    }
}

fn read_opt_bytes(r: &mut Reader<'_>) -> Result<Option<Vec<u8>>, CodecError> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(r.bytes()?.to_vec())),
        t => Err(CodecError(format!("option tag {t}"))),
    }
}

/// Encodes `ops` of `epoch` into payloads of about [`CHUNK_BYTES`] each.
#[must_use]
pub fn encode_state(epoch: u64, ops: &[StateOp]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < ops.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < ops.len() && (end == start || bytes + ops[end].encoded_len() <= CHUNK_BYTES) {
            bytes += ops[end].encoded_len();
            end += 1;
        }
        let mut w = Writer::default();
        w.i64(epoch as i64);
        w.u32((end - start) as u32);
        for op in &ops[start..end] {
            match op {
                StateOp::Put { ns, key, value } => {
                    w.u8(1);
                    w.bytes(ns.as_bytes());
                    w.bytes(key);
                    w.bytes(value);
                }
                StateOp::Delete { ns, key } => {
                    w.u8(2);
                    w.bytes(ns.as_bytes());
                    w.bytes(key);
                }
                StateOp::DeleteRange { ns, start, end } => {
                    w.u8(3);
                    w.bytes(ns.as_bytes());
                    w.bytes(start);
                    opt_bytes(&mut w, end.as_deref());
                }
            }
        }
        out.push(w.buf);
        start = end;
    }
    out
}

pub fn decode_state(payload: &[u8]) -> Result<(u64, Vec<StateOp>), CodecError> {
    let mut r = Reader::new(payload);
    let epoch = r.i64()? as u64;
    let n = count(&mut r, "state changes")?;
    let mut ops = Vec::with_capacity(n.min(payload.len()));
    for _ in 0..n {
        let tag = r.u8()?;
        let ns = str_of(&mut r)?;
        ops.push(match tag {
            1 => StateOp::Put {
                ns,
                key: r.bytes()?.to_vec(),
                value: r.bytes()?.to_vec(),
            },
            2 => StateOp::Delete {
                ns,
                key: r.bytes()?.to_vec(),
            },
            3 => StateOp::DeleteRange {
                ns,
                start: r.bytes()?.to_vec(),
                end: read_opt_bytes(&mut r)?,
            },
            t => return Err(CodecError(format!("state change tag {t}"))),
        });
    }
    r.finish()?;
    Ok((epoch, ops))
}

/// Flag bits of an output record's first byte: a key follows; headers and a timestamp
/// follow the value. Records written before headers existed have only the key bit.
const OUTPUT_HAS_KEY: u8 = 1;
const OUTPUT_HAS_EXTRAS: u8 = 2;

/// `flags | [key] | value | [headers (count, then key and optional value each) | optional
/// timestamp]`.
fn write_output_record(w: &mut Writer, rec: &OutputRecord) {
    let extras = !rec.headers.is_empty() || rec.timestamp.is_some();
    w.u8(u8::from(rec.key.is_some()) * OUTPUT_HAS_KEY + u8::from(extras) * OUTPUT_HAS_EXTRAS);
    if let Some(k) = &rec.key {
        w.bytes(k);
    }
    w.bytes(&rec.value);
    if extras {
        w.u32(rec.headers.len() as u32);
        for (k, v) in &rec.headers {
            w.bytes(k.as_bytes());
            opt_bytes(w, v.as_deref());
        }
        match rec.timestamp {
            None => w.u8(0),
            Some(t) => {
                w.u8(1);
                w.i64(t);
            }
        }
    }
}

fn read_output_record(r: &mut Reader<'_>) -> Result<OutputRecord, CodecError> {
    let flags = r.u8()?;
    if flags & !(OUTPUT_HAS_KEY | OUTPUT_HAS_EXTRAS) != 0 {
        return Err(CodecError(format!("output record flags {flags:#x}")));
    }
    let key = (flags & OUTPUT_HAS_KEY != 0)
        .then(|| r.bytes().map(<[u8]>::to_vec))
        .transpose()?;
    let value = r.bytes()?.to_vec();
    let mut rec = OutputRecord {
        key,
        value,
        ..OutputRecord::default()
    };
    if flags & OUTPUT_HAS_EXTRAS != 0 {
        for _ in 0..count(r, "headers")? {
            let k = str_of(r)?;
            rec.headers.push((k, read_opt_bytes(r)?));
        }
        rec.timestamp = match r.u8()? {
            0 => None,
            1 => Some(r.i64()?),
            t => return Err(CodecError(format!("timestamp tag {t}"))),
        };
    }
    Ok(rec)
}

/// Encodes a sink's epoch output into payloads of about [`CHUNK_BYTES`] each.
#[must_use]
pub fn encode_output(epoch: u64, sink: &str, records: &[OutputRecord]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < records.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < records.len() && (end == start || bytes < CHUNK_BYTES) {
            let r = &records[end];
            bytes += 9
                + r.value.len()
                + r.key.as_ref().map_or(0, Vec::len)
                + r.headers
                    .iter()
                    .map(|(k, v)| 9 + k.len() + v.as_ref().map_or(0, Vec::len))
                    .sum::<usize>();
            end += 1;
        }
        let mut w = Writer::default();
        w.i64(epoch as i64);
        w.bytes(sink.as_bytes());
        w.i64(start as i64);
        w.u32((end - start) as u32);
        for rec in &records[start..end] {
            write_output_record(&mut w, rec);
        }
        out.push(w.buf);
        start = end;
    }
    out
}

pub fn decode_output(payload: &[u8]) -> Result<OutputChunk, CodecError> {
    let mut r = Reader::new(payload);
    let epoch = r.i64()? as u64;
    let sink = str_of(&mut r)?;
    let first_seq = r.i64()? as u64;
    let n = count(&mut r, "output records")?;
    let mut records = Vec::with_capacity(n.min(payload.len()));
    for _ in 0..n {
        records.push(read_output_record(&mut r)?);
    }
    r.finish()?;
    Ok(OutputChunk {
        epoch,
        sink,
        first_seq,
        records,
    })
}

impl CommitEntry {
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.i64(self.epoch as i64);
        w.i64(self.wall_ms);
        w.u32(self.sources.len() as u32);
        for s in &self.sources {
            w.bytes(s.name.as_bytes());
            w.u32(s.positions.len() as u32);
            for (topic, partition, offset) in &s.positions {
                w.bytes(topic.as_bytes());
                w.i64(i64::from(*partition));
                w.i64(*offset);
            }
            // Tag 1: watermark; tag 2: watermark and partition ids (`slots`).
            match &s.watermark {
                None => w.u8(0),
                Some(wm) => {
                    w.u8(if wm.slots.is_empty() { 1 } else { 2 });
                    w.i64(wm.current);
                    w.u32(wm.partitions.len() as u32);
                    for (p, t) in &wm.partitions {
                        w.i64(i64::from(*p));
                        w.i64(*t);
                    }
                    if !wm.slots.is_empty() {
                        w.u32(wm.slots.len() as u32);
                        for (topic, p, slot) in &wm.slots {
                            w.bytes(topic.as_bytes());
                            w.i64(i64::from(*p));
                            w.i64(i64::from(*slot));
                        }
                    }
                }
            }
        }
        w.u32(self.sinks.len() as u32);
        for s in &self.sinks {
            w.bytes(s.name.as_bytes());
            w.bytes(s.topic.as_bytes());
            w.u32(s.starts.len() as u32);
            for (p, o) in &s.starts {
                w.i64(i64::from(*p));
                w.i64(*o);
            }
        }
        if !self.reactor_wals.is_empty() {
            w.u8(TAG_REACTOR_WALS);
            w.u32(self.reactor_wals.len() as u32);
            for &(reactor, lsn) in &self.reactor_wals {
                w.u32(reactor);
                w.i64(lsn as i64);
            }
        }
        w.buf
    }

    pub fn decode(payload: &[u8]) -> Result<Self, CodecError> {
        let partition = |r: &mut Reader<'_>| {
            i32::try_from(r.i64()?).map_err(|_| CodecError("partition out of range".into()))
        };
        let mut r = Reader::new(payload);
        let epoch = r.i64()? as u64;
        let wall_ms = r.i64()?;
        let mut sources = Vec::new();
        for _ in 0..count(&mut r, "sources")? {
            let name = str_of(&mut r)?;
            let mut positions = Vec::new();
            for _ in 0..count(&mut r, "positions")? {
                let topic = str_of(&mut r)?;
                let p = partition(&mut r)?;
                positions.push((topic, p, r.i64()?));
            }
            let watermark = match r.u8()? {
                0 => None,
                tag @ (1 | 2) => {
                    let current = r.i64()?;
                    let mut partitions = Vec::new();
                    for _ in 0..count(&mut r, "partitions")? {
                        let p = partition(&mut r)?;
                        partitions.push((p, r.i64()?));
                    }
                    let mut slots = Vec::new();
                    if tag == 2 {
                        for _ in 0..count(&mut r, "partition ids")? {
                            let topic = str_of(&mut r)?;
                            let p = partition(&mut r)?;
                            slots.push((topic, p, partition(&mut r)?));
                        }
                    }
                    Some(WatermarkState {
                        current,
                        partitions,
                        slots,
                    })
                }
                t => return Err(CodecError(format!("watermark tag {t}"))),
            };
            sources.push(SourceCommit {
                name,
                positions,
                watermark,
            });
        }
        let mut sinks = Vec::new();
        for _ in 0..count(&mut r, "sinks")? {
            let name = str_of(&mut r)?;
            let topic = str_of(&mut r)?;
            let mut starts = Vec::new();
            for _ in 0..count(&mut r, "partitions")? {
                let p = partition(&mut r)?;
                starts.push((p, r.i64()?));
            }
            sinks.push(SinkCommit {
                name,
                topic,
                starts,
            });
        }
        let mut reactor_wals = Vec::new();
        if !r.is_done() {
            match r.u8()? {
                TAG_REACTOR_WALS => {
                    for _ in 0..count(&mut r, "reactor WALs")? {
                        let reactor = r.u32()?;
                        reactor_wals.push((reactor, r.i64()? as u64));
                    }
                }
                t => return Err(CodecError(format!("commit entry tag {t}"))),
            }
        }
        r.finish()?;
        Ok(Self {
            epoch,
            wall_ms,
            sources,
            sinks,
            reactor_wals,
        })
    }
}

#[must_use]
pub fn encode_delivered(epoch: u64) -> Vec<u8> {
    epoch.to_le_bytes().to_vec()
}

pub fn decode_delivered(payload: &[u8]) -> Result<u64, CodecError> {
    let mut r = Reader::new(payload);
    let epoch = r.i64()? as u64;
    r.finish()?;
    Ok(epoch)
}
