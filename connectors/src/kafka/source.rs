//! The Kafka source: one consumer in the pipeline's consumer group, JSON values decoded
//! into the declared columns plus optional metadata columns.
//!
//! The source reads every partition of its topic: it assigns them itself (new partitions
//! are picked up from metadata every few seconds) instead of joining a consumer-group
//! rebalance, so that a restart seeks each partition to the offset in the pipeline's last
//! commit entry at once, without waiting for a dead member's session to time out. The
//! consumer group (`group_id`) still receives the offsets of every finished epoch, for
//! lag monitoring and `start_from: committed`. A broker that is unreachable is logged
//! (rate limited) and retried; `poll` keeps returning `Idle` meanwhile.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    ArrayRef, Int32Builder, Int64Builder, RecordBatch, StringBuilder, TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::client::{KafkaClientOptions, LogContext};
use crate::format::DecodeError;
use crate::format::json::{DecodeColumn, JsonDecoder};
use crate::format::types::{TIMESTAMP_TZ, timestamp_ms_type};
use crate::{
    BATCH_ROWS_MAX, DecodeErrorPolicy, PartitionStats, Rejected, Source, SourceBatch, SourceError,
    SourcePoll, SourcePosition,
};

/// Where to start reading a partition that has no committed position for this pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// The oldest record the broker still has.
    Earliest,
    /// Only records produced after the pipeline starts.
    Latest,
    /// A committed position is required; a partition without one stops the pipeline.
    Committed,
}

impl StartFrom {
    pub const NAMES: [&'static str; 3] = ["earliest", "latest", "committed"];

    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "earliest" => Some(Self::Earliest),
            "latest" => Some(Self::Latest),
            "committed" => Some(Self::Committed),
            _ => None,
        }
    }

    fn auto_offset_reset(self) -> &'static str {
        match self {
            Self::Earliest => "earliest",
            Self::Latest => "latest",
            Self::Committed => "error",
        }
    }
}

/// Kafka metadata a source can add as columns after the declared ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetadataColumns {
    /// `_key VARCHAR NULL`: the message key as UTF-8 (lossy).
    pub key: bool,
    /// `_partition INT`.
    pub partition: bool,
    /// `_offset BIGINT`.
    pub offset: bool,
    /// `_timestamp TIMESTAMP NULL`: the record's create or log-append time.
    pub timestamp: bool,
}

impl MetadataColumns {
    pub const NAMES: [&'static str; 4] = ["key", "partition", "offset", "timestamp"];

    /// The metadata fields, in column order.
    #[must_use]
    pub fn fields(&self) -> Vec<Field> {
        let mut fields = Vec::new();
        if self.key {
            fields.push(Field::new("_key", DataType::Utf8, true));
        }
        if self.partition {
            fields.push(Field::new("_partition", DataType::Int32, false));
        }
        if self.offset {
            fields.push(Field::new("_offset", DataType::Int64, false));
        }
        if self.timestamp {
            fields.push(Field::new("_timestamp", timestamp_ms_type(), true));
        }
        fields
    }
}

/// A `connector: kafka` source.
#[derive(Debug, Clone)]
pub struct KafkaSourceOptions {
    /// The source's name in the pipeline (logs, metrics).
    pub name: String,
    pub client: KafkaClientOptions,
    pub topic: String,
    /// Consumer group; defaults to the pipeline name.
    pub group_id: String,
    pub start_from: StartFrom,
    pub columns: Vec<DecodeColumn>,
    pub metadata: MetadataColumns,
    pub on_decode_error: DecodeErrorPolicy,
}

pub struct KafkaSource {
    options: KafkaSourceOptions,
    consumer: BaseConsumer<LogContext>,
    schema: SchemaRef,
    decoder: JsonDecoder,
    meta: MetaBuilders,
    /// Next offset to read per partition, for what `poll` has returned.
    positions: BTreeMap<i32, i64>,
    /// Partition of each decoded row of the batch being built.
    row_partitions: Vec<i32>,
    /// Partitions assigned so far, ascending.
    assigned: Vec<i32>,
    /// Where to resume partitions (a commit entry) instead of `start_from`.
    resume: BTreeMap<i32, i64>,
    last_metadata: Option<Instant>,
    /// Records and bytes read per partition, for metrics.
    counts: BTreeMap<i32, (u64, u64)>,
}

/// How often librdkafka reports partition high watermarks (for the lag metric).
const STATISTICS_INTERVAL_MS: &str = "1000";

/// How often the topic's partition count is checked once partitions are assigned.
const METADATA_REFRESH: Duration = Duration::from_secs(5);
/// How often it is retried while none are (topic missing, broker down).
const METADATA_RETRY: Duration = Duration::from_millis(500);
/// Longest a metadata request may block `poll`.
const METADATA_TIMEOUT: Duration = Duration::from_millis(500);

/// A list of `topic`'s partitions.
fn partition_list(topic: &str, partitions: impl Iterator<Item = i32>) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(topic, p);
    }
    tpl
}

struct MetaBuilders {
    key: StringBuilder,
    partition: Int32Builder,
    offset: Int64Builder,
    timestamp: TimestampMillisecondBuilder,
}

/// `fetch.wait.max.ms` of the source's consumer (overridable in `kafka.properties`).
const FETCH_WAIT_MAX_MS: &str = "10";

impl KafkaSource {
    pub fn new(options: KafkaSourceOptions) -> Result<Self, SourceError> {
        let config = options.client.config(&[
            ("group.id", &options.group_id),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "false"),
            ("isolation.level", "read_committed"),
            ("auto.offset.reset", options.start_from.auto_offset_reset()),
            // Bounds the prefetch queue: at most this many KiB buffered per partition.
            ("queued.max.messages.kbytes", "16384"),
            ("statistics.interval.ms", STATISTICS_INTERVAL_MS),
            // A fetch that finds no data waits at most this long on the broker. Brokers
            // that answer a waiting fetch only when the wait ends (the embedded one) would
            // otherwise add up to librdkafka's default 500 ms to every record's latency.
            ("fetch.wait.max.ms", FETCH_WAIT_MAX_MS),
        ]);
        let consumer: BaseConsumer<LogContext> =
            config.create_with_context(LogContext::new(&options.name))?;
        let mut fields: Vec<Field> = options
            .columns
            .iter()
            .map(|c| c.ty.field(&c.name, c.nullable))
            .collect();
        fields.extend(options.metadata.fields());
        Ok(Self {
            schema: Arc::new(Schema::new(fields)),
            decoder: JsonDecoder::new(options.columns.clone()),
            meta: MetaBuilders {
                key: StringBuilder::new(),
                partition: Int32Builder::new(),
                offset: Int64Builder::new(),
                timestamp: TimestampMillisecondBuilder::new().with_timezone(TIMESTAMP_TZ),
            },
            consumer,
            options,
            positions: BTreeMap::new(),
            row_partitions: Vec::new(),
            assigned: Vec::new(),
            resume: BTreeMap::new(),
            last_metadata: None,
            counts: BTreeMap::new(),
        })
    }

    /// Assigns partitions of the topic that are not assigned yet: at the resume offset,
    /// else at the group's committed offset, else as `start_from` says.
    fn refresh_assignment(&mut self) -> Result<(), SourceError> {
        let every = if self.assigned.is_empty() {
            METADATA_RETRY
        } else {
            METADATA_REFRESH
        };
        if self.last_metadata.is_some_and(|t| t.elapsed() < every) {
            return Ok(());
        }
        self.last_metadata = Some(Instant::now());
        let topic = &self.options.topic;
        let metadata = match self.consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT) {
            Ok(m) => m,
            Err(e) => {
                if self.consumer.context().should_log_error() {
                    tracing::warn!(source = %self.options.name, "cannot fetch metadata of topic {topic} (retrying): {e}");
                }
                return Ok(());
            }
        };
        let partitions: Vec<i32> = super::client::topic_partitions(&metadata, topic)
            .into_iter()
            .filter(|p| !self.assigned.contains(p))
            .collect();
        if partitions.is_empty() {
            if self.assigned.is_empty() && self.consumer.context().should_log_error() {
                tracing::warn!(source = %self.options.name, topic = %topic,
                    "topic does not exist (yet); waiting for it");
            }
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for &p in &partitions {
            let offset = self
                .resume
                .get(&p)
                .map_or(Offset::Stored, |&o| Offset::Offset(o));
            tpl.add_partition_offset(topic, p, offset)?;
        }
        self.consumer.incremental_assign(&tpl)?;
        tracing::debug!(source = %self.options.name, ?partitions, "assigned partitions");
        self.assigned.extend(partitions);
        self.assigned.sort_unstable();
        Ok(())
    }

    fn consumption_error(&self, error: &KafkaError) -> Result<(), SourceError> {
        let code = error.rdkafka_error_code();
        if code == Some(RDKafkaErrorCode::AutoOffsetReset) {
            return Err(SourceError::Fatal {
                context: format!("source {}", self.options.name),
                message: format!(
                    "a partition of topic {} has no committed offset for group {} \
                     (start_from: committed): {error}",
                    self.options.topic, self.options.group_id
                ),
            });
        }
        if self.consumer.context().should_log_error() {
            if code == Some(RDKafkaErrorCode::UnknownTopicOrPartition) {
                tracing::warn!(source = %self.options.name, topic = %self.options.topic,
                    "topic does not exist (yet); waiting for it");
            } else {
                tracing::warn!(source = %self.options.name, "consume error (retrying): {error}");
            }
        }
        Ok(())
    }

    fn batch(&mut self, rejected: Vec<Rejected>) -> Result<SourceBatch, SourceError> {
        let mut columns = self.decoder.finish();
        let m = self.options.metadata;
        let mut push = |on: bool, a: ArrayRef| {
            if on {
                columns.push(a);
            }
        };
        push(m.key, Arc::new(self.meta.key.finish()));
        push(m.partition, Arc::new(self.meta.partition.finish()));
        push(m.offset, Arc::new(self.meta.offset.finish()));
        push(m.timestamp, Arc::new(self.meta.timestamp.finish()));
        let batch =
            RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| SourceError::Fatal {
                context: format!("source {}", self.options.name),
                message: e.to_string(),
            })?;
        Ok(SourceBatch {
            batch,
            rejected,
            row_partitions: Some(std::mem::take(&mut self.row_partitions)),
        })
    }
}

impl Source for KafkaSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn poll(&mut self, timeout: Duration) -> Result<SourcePoll, SourceError> {
        self.refresh_assignment()?;
        let mut rejected = Vec::new();
        let mut records = 0;
        while records < BATCH_ROWS_MAX {
            let wait = if records == 0 {
                timeout
            } else {
                Duration::ZERO
            };
            let message = match self.consumer.poll(wait) {
                None => break,
                Some(Err(e)) => {
                    self.consumption_error(&e)?;
                    break;
                }
                Some(Ok(m)) => m,
            };
            records += 1;
            let (partition, offset) = (message.partition(), message.offset());
            self.positions.insert(partition, offset + 1);
            let count = self.counts.entry(partition).or_default();
            count.0 += 1;
            count.1 += (message.payload_len() + message.key().map_or(0, <[u8]>::len)) as u64;
            let decoded = match message.payload() {
                None => Err(DecodeError::Empty),
                Some(p) => self.decoder.decode(p),
            };
            match decoded {
                Ok(()) => {
                    self.row_partitions.push(partition);
                    let m = self.options.metadata;
                    if m.key {
                        match message.key() {
                            Some(k) => self.meta.key.append_value(String::from_utf8_lossy(k)),
                            None => self.meta.key.append_null(),
                        }
                    }
                    if m.partition {
                        self.meta.partition.append_value(partition);
                    }
                    if m.offset {
                        self.meta.offset.append_value(offset);
                    }
                    if m.timestamp {
                        self.meta
                            .timestamp
                            .append_option(message.timestamp().to_millis());
                    }
                }
                Err(reason) => match self.options.on_decode_error {
                    DecodeErrorPolicy::Fail => {
                        return Err(SourceError::DecodeFailed {
                            topic: self.options.topic.clone(),
                            partition,
                            offset,
                            reason,
                        });
                    }
                    DecodeErrorPolicy::Skip | DecodeErrorPolicy::DeadLetter => {
                        rejected.push(Rejected {
                            topic: self.options.topic.clone(),
                            partition,
                            offset,
                            key: message.key().map(<[u8]>::to_vec),
                            payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                            reason,
                        });
                    }
                },
            }
        }
        if records == 0 {
            return Ok(SourcePoll::Idle);
        }
        self.batch(rejected).map(SourcePoll::Batch)
    }

    fn assigned_partitions(&self) -> Option<Vec<i32>> {
        Some(self.assigned.clone())
    }

    fn pause(&mut self, paused: &[i32]) -> Result<bool, SourceError> {
        // Applied to the whole assignment each time: new partitions start resumed.
        let assigned = self.assigned.clone();
        let topic = &self.options.topic;
        let (pause, resume): (Vec<i32>, Vec<i32>) =
            assigned.into_iter().partition(|p| paused.contains(p));
        if !pause.is_empty() {
            self.consumer
                .pause(&partition_list(topic, pause.into_iter()))?;
        }
        if !resume.is_empty() {
            self.consumer
                .resume(&partition_list(topic, resume.into_iter()))?;
        }
        Ok(true)
    }

    fn positions(&self) -> Vec<SourcePosition> {
        self.positions
            .iter()
            .map(|(&partition, &next_offset)| SourcePosition {
                topic: self.options.topic.clone(),
                partition,
                next_offset,
            })
            .collect()
    }

    fn partition_stats(&self) -> Vec<PartitionStats> {
        let context = self.consumer.context();
        self.assigned
            .iter()
            .map(|&partition| {
                let (records, bytes) = self.counts.get(&partition).copied().unwrap_or_default();
                let high = context.high_watermark(&self.options.topic, partition);
                let lag = match (high, self.positions.get(&partition)) {
                    (Some(high), Some(&next)) => Some((high - next).max(0)),
                    // Nothing read yet from an empty partition.
                    (Some(0), None) => Some(0),
                    _ => None,
                };
                PartitionStats {
                    partition,
                    records,
                    bytes,
                    lag,
                }
            })
            .collect()
    }

    fn seek(&mut self, positions: &[SourcePosition]) -> Result<(), SourceError> {
        assert!(self.assigned.is_empty(), "seek before the first poll");
        for p in positions.iter().filter(|p| p.topic == self.options.topic) {
            self.resume.insert(p.partition, p.next_offset);
            self.positions.insert(p.partition, p.next_offset);
        }
        Ok(())
    }

    fn commit(&mut self, positions: &[SourcePosition], blocking: bool) -> Result<(), SourceError> {
        if positions.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for p in positions {
            tpl.add_partition_offset(&p.topic, p.partition, Offset::Offset(p.next_offset))?;
        }
        let mode = if blocking {
            CommitMode::Sync
        } else {
            CommitMode::Async
        };
        if let Err(e) = self.consumer.commit(&tpl, mode) {
            // A failed commit loses nothing: the next epoch commits later positions, and a
            // restart re-reads from the last commit that did succeed (at-least-once).
            if self.consumer.context().should_log_error() {
                tracing::warn!(source = %self.options.name, "offset commit failed (will retry next epoch): {e}");
            }
        }
        Ok(())
    }
}
