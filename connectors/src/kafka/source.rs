//! The Kafka source: one consumer in the pipeline's consumer group; JSON or Avro values
//! (and optionally keys) decoded into the declared columns, plus optional metadata and
//! header columns.
//!
//! A record whose Avro schema the registry must first be asked for, while the registry
//! does not answer, is held (with every record after it) and retried with backoff: the
//! source stops handing out rows rather than reject or skip a good record; a registry
//! that answers "no such schema" gets the record dead-lettered.
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
use arrow::datatypes::{Schema, SchemaRef};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::client::{KafkaClientOptions, LogContext};
use crate::format::json::DecodeColumn;
use crate::format::types::{ColumnType, EpochUnit, TIMESTAMP_TZ};
use crate::format::{DecodeError, DecoderSpec, RecordDecoder};
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
    /// `_timestamp` is the event time: NOT NULL, a record without a timestamp is rejected.
    pub timestamp_required: bool,
}

impl MetadataColumns {
    pub const NAMES: [&'static str; 4] = ["key", "partition", "offset", "timestamp"];

    /// The metadata columns, in column order.
    #[must_use]
    pub fn columns(&self) -> Vec<DecodeColumn> {
        let column = |name: &str, ty, nullable| DecodeColumn {
            name: name.to_owned(),
            ty,
            nullable,
        };
        let mut columns = Vec::new();
        if self.key {
            columns.push(column("_key", ColumnType::Utf8, true));
        }
        if self.partition {
            columns.push(column("_partition", ColumnType::Int32, false));
        }
        if self.offset {
            columns.push(column("_offset", ColumnType::Int64, false));
        }
        if self.timestamp {
            columns.push(column(
                "_timestamp",
                ColumnType::Timestamp(EpochUnit::Millis),
                !self.timestamp_required,
            ));
        }
        columns
    }
}

/// Every column of a Kafka source's batches, in order: the value's, the key's, the
/// metadata columns, then one VARCHAR NULL per header in `headers` (header -> column).
#[must_use]
pub fn source_columns(
    value: &[DecodeColumn],
    key: &[DecodeColumn],
    metadata: MetadataColumns,
    headers: &[(String, String)],
) -> Vec<DecodeColumn> {
    let mut all = value.to_vec();
    all.extend_from_slice(key);
    all.extend(metadata.columns());
    all.extend(headers.iter().map(|(_, column)| DecodeColumn {
        name: column.clone(),
        ty: ColumnType::Utf8,
        nullable: true,
    }));
    all
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
    /// How values are decoded, into which columns.
    pub value: DecoderSpec,
    /// How keys are decoded into columns (after the value's); `None`: they are not.
    pub key: Option<DecoderSpec>,
    pub metadata: MetadataColumns,
    /// Header name -> column (VARCHAR NULL), after the metadata columns.
    pub headers: Vec<(String, String)>,
    pub on_decode_error: DecodeErrorPolicy,
}

pub struct KafkaSource {
    consumer: BaseConsumer<LogContext>,
    state: State,
}

/// Everything but the consumer, so that a record borrowed from the consumer can be
/// taken into it.
struct State {
    options: KafkaSourceOptions,
    schema: SchemaRef,
    value: RecordDecoder,
    key: Option<RecordDecoder>,
    meta: MetaBuilders,
    headers: Vec<StringBuilder>,
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
    /// A record waiting for the schema registry, and when to ask again.
    held: Option<(OwnedMessage, Instant)>,
    /// Backoff of the next registry retry.
    registry_backoff: Duration,
}

/// First and longest wait before asking an unreachable registry again.
const REGISTRY_RETRY_MIN: Duration = Duration::from_millis(200);
const REGISTRY_RETRY_MAX: Duration = Duration::from_secs(10);

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
        let consumer: BaseConsumer<LogContext> = config.create_with_context(
            LogContext::new(&options.name).with_secrets(options.client.secret_values()),
        )?;
        let fatal = |message: String| SourceError::Fatal {
            context: format!("source {}", options.name),
            message,
        };
        let value = RecordDecoder::new(&options.value).map_err(fatal)?;
        let key = options
            .key
            .as_ref()
            .map(|k| RecordDecoder::new(k).map_err(|e| fatal(format!("key: {e}"))))
            .transpose()?;
        let columns = source_columns(
            options.value.columns(),
            options.key.as_ref().map_or(&[][..], DecoderSpec::columns),
            options.metadata,
            &options.headers,
        );
        let fields: Vec<_> = columns
            .iter()
            .map(|c| c.ty.field(&c.name, c.nullable))
            .collect();
        Ok(Self {
            consumer,
            state: State {
                schema: Arc::new(Schema::new(fields)),
                value,
                key,
                meta: MetaBuilders {
                    key: StringBuilder::new(),
                    partition: Int32Builder::new(),
                    offset: Int64Builder::new(),
                    timestamp: TimestampMillisecondBuilder::new().with_timezone(TIMESTAMP_TZ),
                },
                headers: options
                    .headers
                    .iter()
                    .map(|_| StringBuilder::new())
                    .collect(),
                options,
                positions: BTreeMap::new(),
                row_partitions: Vec::new(),
                assigned: Vec::new(),
                resume: BTreeMap::new(),
                last_metadata: None,
                counts: BTreeMap::new(),
                held: None,
                registry_backoff: REGISTRY_RETRY_MIN,
            },
        })
    }

    /// Assigns partitions of the topic that are not assigned yet: at the resume offset,
    /// else at the group's committed offset, else as `start_from` says.
    fn refresh_assignment(&mut self) -> Result<(), SourceError> {
        let st = &mut self.state;
        let every = if st.assigned.is_empty() {
            METADATA_RETRY
        } else {
            METADATA_REFRESH
        };
        if st.last_metadata.is_some_and(|t| t.elapsed() < every) {
            return Ok(());
        }
        st.last_metadata = Some(Instant::now());
        let topic = &st.options.topic;
        let metadata = match self.consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT) {
            Ok(m) => m,
            Err(e) => {
                if self.consumer.context().should_log_error() {
                    tracing::warn!(source = %st.options.name, "cannot fetch metadata of topic {topic} (retrying): {e}");
                }
                return Ok(());
            }
        };
        let partitions: Vec<i32> = super::client::topic_partitions(&metadata, topic)
            .into_iter()
            .filter(|p| !st.assigned.contains(p))
            .collect();
        if partitions.is_empty() {
            if st.assigned.is_empty() && self.consumer.context().should_log_error() {
                tracing::warn!(source = %st.options.name, topic = %topic,
                    "topic does not exist (yet); waiting for it");
            }
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for &p in &partitions {
            let offset = st
                .resume
                .get(&p)
                .map_or(Offset::Stored, |&o| Offset::Offset(o));
            tpl.add_partition_offset(topic, p, offset)?;
        }
        self.consumer.incremental_assign(&tpl)?;
        tracing::debug!(source = %st.options.name, ?partitions, "assigned partitions");
        st.assigned.extend(partitions);
        st.assigned.sort_unstable();
        Ok(())
    }

    fn consumption_error(&self, error: &KafkaError) -> Result<(), SourceError> {
        let options = &self.state.options;
        let code = error.rdkafka_error_code();
        if code == Some(RDKafkaErrorCode::AutoOffsetReset) {
            return Err(SourceError::Fatal {
                context: format!("source {}", options.name),
                message: format!(
                    "a partition of topic {} has no committed offset for group {} \
                     (start_from: committed): {error}",
                    options.topic, options.group_id
                ),
            });
        }
        if self.consumer.context().should_log_error() {
            if code == Some(RDKafkaErrorCode::UnknownTopicOrPartition) {
                tracing::warn!(source = %options.name, topic = %options.topic,
                    "topic does not exist (yet); waiting for it");
            } else {
                tracing::warn!(source = %options.name, "consume error (retrying): {error}");
            }
        }
        Ok(())
    }

    /// Takes the held record if the registry now answers: `Ok(false)` while it still
    /// waits.
    fn retry_held(&mut self, rejected: &mut Vec<Rejected>) -> Result<bool, SourceError> {
        let Some((message, at)) = self.state.held.take() else {
            return Ok(true);
        };
        if Instant::now() < at {
            self.state.held = Some((message, at));
            return Ok(false);
        }
        if !self.state.prepare(&message, self.consumer.context())? {
            self.state.hold(message);
            return Ok(false);
        }
        self.state.take(&message, rejected)?;
        Ok(true)
    }
}

impl State {
    /// Asks the registry for what the record's value and key need: `Ok(false)` when it did
    /// not answer, and the record (now held) must wait; a refusal that waiting won't fix
    /// (bad credentials) is an error.
    fn prepare<M: Message>(&mut self, m: &M, context: &LogContext) -> Result<bool, SourceError> {
        let mut outcome = m.payload().map_or(Ok(()), |p| self.value.prepare(p));
        if outcome.is_ok()
            && let (Some(key), Some(k)) = (&mut self.key, m.key())
        {
            outcome = key.prepare(k);
        }
        match outcome {
            Ok(()) => {
                self.registry_backoff = REGISTRY_RETRY_MIN;
                Ok(true)
            }
            Err(e) if e.is_transient() => {
                if context.should_log_error() {
                    tracing::warn!(source = %self.options.name, partition = m.partition(), offset = m.offset(),
                        "{e}; holding the record (and those after it) until it answers");
                }
                Ok(false)
            }
            Err(e) => Err(SourceError::Registry(e)),
        }
    }

    /// Keeps a record that must wait for the registry; it is asked again after a backoff.
    fn hold(&mut self, message: OwnedMessage) {
        self.held = Some((message, Instant::now() + self.registry_backoff));
        self.registry_backoff = (self.registry_backoff * 2).min(REGISTRY_RETRY_MAX);
    }

    /// Decodes the value and key of one record into the pending rows (nothing appended).
    fn parse<M: Message>(&mut self, m: &M) -> Result<(), DecodeError> {
        match m.payload() {
            None => return Err(DecodeError::Empty),
            Some(p) => self.value.parse(p)?,
        }
        if let Some(key) = &mut self.key {
            match m.key() {
                Some(k) => key.parse(k),
                None => key.parse_absent(),
            }
            .map_err(|e| DecodeError::Key(Box::new(e)))?;
        }
        if self.options.metadata.timestamp_required && m.timestamp().to_millis().is_none() {
            return Err(DecodeError::NoTimestamp);
        }
        Ok(())
    }

    /// Takes one record: its row, or its rejection.
    fn take<M: Message>(&mut self, m: &M, rejected: &mut Vec<Rejected>) -> Result<(), SourceError> {
        let (partition, offset) = (m.partition(), m.offset());
        self.positions.insert(partition, offset + 1);
        let count = self.counts.entry(partition).or_default();
        count.0 += 1;
        count.1 += (m.payload().map_or(0, <[u8]>::len) + m.key().map_or(0, <[u8]>::len)) as u64;
        match self.parse(m) {
            Ok(()) => {
                self.value.append();
                if let Some(key) = &mut self.key {
                    key.append();
                }
                self.row_partitions.push(partition);
                let meta = self.options.metadata;
                if meta.key {
                    match m.key() {
                        Some(k) => self.meta.key.append_value(String::from_utf8_lossy(k)),
                        None => self.meta.key.append_null(),
                    }
                }
                if meta.partition {
                    self.meta.partition.append_value(partition);
                }
                if meta.offset {
                    self.meta.offset.append_value(offset);
                }
                if meta.timestamp {
                    self.meta.timestamp.append_option(m.timestamp().to_millis());
                }
                if !self.headers.is_empty() {
                    let headers = m.headers();
                    for ((name, _), builder) in self.options.headers.iter().zip(&mut self.headers) {
                        // The last header of a name wins, as in a map.
                        let value = headers.and_then(|h| {
                            h.iter()
                                .filter(|h| h.key == name)
                                .last()
                                .and_then(|h| h.value)
                        });
                        match value {
                            Some(v) => builder.append_value(String::from_utf8_lossy(v)),
                            None => builder.append_null(),
                        }
                    }
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
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                        reason,
                    });
                }
            },
        }
        Ok(())
    }

    fn batch(&mut self, rejected: Vec<Rejected>) -> Result<SourceBatch, SourceError> {
        let mut columns = self.value.finish();
        if let Some(key) = &mut self.key {
            columns.extend(key.finish());
        }
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
        for h in &mut self.headers {
            columns.push(Arc::new(h.finish()));
        }
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
        self.state.schema.clone()
    }

    fn poll(&mut self, timeout: Duration) -> Result<SourcePoll, SourceError> {
        self.refresh_assignment()?;
        let mut rejected = Vec::new();
        let mut records = 0;
        if self.state.held.is_some() {
            if !self.retry_held(&mut rejected)? {
                // Waiting for the registry: nothing is read past the held record.
                std::thread::sleep(timeout.min(Duration::from_millis(50)));
                return Ok(SourcePoll::Idle);
            }
            records += 1;
        }
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
            if !self.state.prepare(&message, self.consumer.context())? {
                self.state.hold(message.detach());
                break;
            }
            records += 1;
            self.state.take(&message, &mut rejected)?;
        }
        if records == 0 {
            return Ok(SourcePoll::Idle);
        }
        self.state.batch(rejected).map(SourcePoll::Batch)
    }

    fn assigned_partitions(&self) -> Option<Vec<i32>> {
        Some(self.state.assigned.clone())
    }

    fn pause(&mut self, paused: &[i32]) -> Result<bool, SourceError> {
        // Applied to the whole assignment each time: new partitions start resumed.
        let assigned = self.state.assigned.clone();
        let topic = &self.state.options.topic;
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
        self.state
            .positions
            .iter()
            .map(|(&partition, &next_offset)| SourcePosition {
                topic: self.state.options.topic.clone(),
                partition,
                next_offset,
            })
            .collect()
    }

    fn partition_stats(&self) -> Vec<PartitionStats> {
        let context = self.consumer.context();
        self.state
            .assigned
            .iter()
            .map(|&partition| {
                let (records, bytes) = self
                    .state
                    .counts
                    .get(&partition)
                    .copied()
                    .unwrap_or_default();
                let high = context.high_watermark(&self.state.options.topic, partition);
                let lag = match (high, self.state.positions.get(&partition)) {
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
        assert!(self.state.assigned.is_empty(), "seek before the first poll");
        for p in positions
            .iter()
            .filter(|p| p.topic == self.state.options.topic)
        {
            self.state.resume.insert(p.partition, p.next_offset);
            self.state.positions.insert(p.partition, p.next_offset);
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
                tracing::warn!(source = %self.state.options.name, "offset commit failed (will retry next epoch): {e}");
            }
        }
        Ok(())
    }
}
