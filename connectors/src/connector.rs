//! The two roles every connector plays: [`Source`] and [`Sink`], and what flows between
//! them and the engine.

use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use crate::format::DecodeError;

/// Most rows a source puts in one batch. Bounds the memory of one poll and the latency
/// a batch adds; 4096 rows of ~100 B events are ~400 KiB of JSON.
pub const BATCH_ROWS_MAX: usize = 4096;

/// What to do with a record that cannot be decoded into the declared schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeErrorPolicy {
    /// Write the raw record and the reason to the dead-letter topic, then go on.
    DeadLetter,
    /// Count it, log it (rate limited), and go on.
    Skip,
    /// Stop the pipeline with exit code 2; nothing after the bad record is committed.
    Fail,
}

impl DecodeErrorPolicy {
    pub const NAMES: [&'static str; 3] = ["dead_letter", "skip", "fail"];

    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "dead_letter" => Some(Self::DeadLetter),
            "skip" => Some(Self::Skip),
            "fail" => Some(Self::Fail),
            _ => None,
        }
    }
}

/// A position to resume from: the next offset to read in one partition of one topic.
/// File sources use partition 0 and the next line number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourcePosition {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

/// A record that could not be decoded, with everything needed to dead-letter it.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub reason: DecodeError,
}

/// One poll's worth of input: decoded rows plus the records that failed to decode.
#[derive(Debug)]
pub struct SourceBatch {
    /// Rows in the source's schema; may have zero rows when every record was rejected.
    pub batch: RecordBatch,
    pub rejected: Vec<Rejected>,
    /// The partition of each row, for per-partition watermarks; `None`: all partition 0.
    pub row_partitions: Option<Vec<i32>>,
}

/// The outcome of one [`Source::poll`].
#[derive(Debug)]
pub enum SourcePoll {
    Batch(SourceBatch),
    /// Nothing arrived within the timeout; the source is still live.
    Idle,
    /// A bounded source has handed out its last record.
    Finished,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{context}: {message}")]
    Fatal { context: String, message: String },
    #[error(transparent)]
    Registry(#[from] crate::format::avro::RegistryError),
    #[error(
        "record {topic}[{partition}]@{offset} cannot be decoded: {reason} (on_decode_error: fail)"
    )]
    DecodeFailed {
        topic: String,
        partition: i32,
        offset: i64,
        reason: DecodeError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("delivery to topic {topic} failed: {message}")]
    Delivery { topic: String, message: String },
    #[error("cannot encode a row: {0}")]
    Encode(String),
}

/// Where records come from. Owned by one thread; `poll` never blocks longer than `timeout`.
pub trait Source: Send {
    /// The schema of every batch this source returns: declared columns, then metadata.
    fn schema(&self) -> SchemaRef;

    /// Returns the next batch of at most [`BATCH_ROWS_MAX`] rows.
    fn poll(&mut self, timeout: Duration) -> Result<SourcePoll, SourceError>;

    /// The partitions this source reads now, when it has several (Kafka): each holds the
    /// watermark back until it produces or goes idle. `None`: one partition, 0.
    fn assigned_partitions(&self) -> Option<Vec<i32>> {
        None
    }

    /// Watermark alignment: stops fetching the partitions in `paused` and resumes every
    /// other assigned one, while `poll` keeps serving the rest (and the consumer group's
    /// heartbeat). Records already fetched from a paused partition may still arrive; none
    /// is skipped. Returns `false` when the source cannot pause single partitions (it
    /// has one): the caller then stops polling it while `paused` is not empty.
    fn pause(&mut self, paused: &[i32]) -> Result<bool, SourceError> {
        let _ = paused;
        Ok(false)
    }

    /// Positions after the last record returned by `poll` (for the epoch that is closing).
    fn positions(&self) -> Vec<SourcePosition>;

    /// Before the first `poll`: resume at `positions` (from a commit entry) instead of
    /// `start_from`. Positions of other topics or files than this source reads are
    /// ignored (the configuration changed): those start from `start_from`.
    fn seek(&mut self, positions: &[SourcePosition]) -> Result<(), SourceError>;

    /// Makes `positions` durable where the source keeps them (a Kafka consumer group).
    /// Called only after every record read before them has been acknowledged by the sinks.
    fn commit(&mut self, positions: &[SourcePosition], blocking: bool) -> Result<(), SourceError>;

    /// Records and bytes read, and lag, per partition, for metrics (none for sources
    /// without partitions).
    fn partition_stats(&self) -> Vec<PartitionStats> {
        Vec::new()
    }

    /// `(topic, partition, id)` of each partition whose id (in `assigned_partitions`,
    /// batches and `pause`) is not its partition number: the ids a source of several
    /// topics gives. Saved with the watermark at every commit; empty for the others.
    fn partition_slots(&self) -> Vec<(String, i32, i32)> {
        Vec::new()
    }

    /// Before `seek`: the ids of the last commit, so that each partition keeps its id
    /// (and its watermark) across a restart.
    fn restore_partition_slots(&mut self, slots: &[(String, i32, i32)]) {
        let _ = slots;
    }
}

/// One partition's counters, since the source was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionStats {
    pub topic: String,
    pub partition: i32,
    /// Records read (decoded or not).
    pub records: u64,
    /// Bytes of keys and values read.
    pub bytes: u64,
    /// Records in the partition after the last one read, as of the broker's last
    /// report (`None` until there is one).
    pub lag: Option<i64>,
}

/// Where records go. `write` may buffer; `flush` returns once everything written so far is
/// acknowledged (durable in the file, or acknowledged by every in-sync replica).
pub trait Sink: Send {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError>;

    /// Writes records that failed to decode, with their reason (dead-letter sinks only).
    fn write_rejected(&mut self, rejected: &[Rejected]) -> Result<(), SinkError> {
        let _ = rejected;
        Ok(())
    }

    fn flush(&mut self, timeout: Duration) -> Result<FlushOutcome, SinkError>;

    /// Hands on what it can of the records `write` held back because its way out was
    /// full (a Kafka producer's bounded queue, the broker slow or away), and returns how
    /// many it still holds. While a sink holds any, the pipeline reads none of the
    /// sources that feed it, and goes on with the rest (time, other sources, a stop).
    /// Sinks that never hold records (files, stdout: `write` waits) hold none.
    fn backlog(&mut self) -> Result<usize, SinkError> {
        Ok(0)
    }
}

/// Whether a flush got every acknowledgement within its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushOutcome {
    Done,
    /// Records are still in flight (broker slow or down); call `flush` again.
    Pending {
        in_flight: usize,
    },
}
