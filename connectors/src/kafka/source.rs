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
use super::slots::{Slots, Topics};
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

/// What a source does while its topic does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingTopic {
    /// Stop the pipeline (exit 2) once the broker has said so for [`MISSING_TOPIC_GRACE`].
    Fail,
    /// Wait for the topic, logging now and then; `/ready` stays 503 meanwhile.
    Wait,
}

impl MissingTopic {
    pub const NAMES: [&'static str; 2] = ["fail", "wait"];

    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "fail" => Some(Self::Fail),
            "wait" => Some(Self::Wait),
            _ => None,
        }
    }
}

/// How long the broker must keep saying that a topic does not exist before a source
/// with `on_missing_topic: fail` gives up (metadata of a topic just created can lag).
pub const MISSING_TOPIC_GRACE: Duration = Duration::from_secs(5);

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
    /// The topic, or a pattern of topics.
    pub topics: Topics,
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
    pub on_missing_topic: MissingTopic,
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
    /// The slot id of each `(topic, partition)`: the engine's partition ids.
    slots: Slots,
    /// Next offset to read per slot, for what `poll` has returned.
    positions: BTreeMap<i32, i64>,
    /// Slot of each decoded row of the batch being built.
    row_partitions: Vec<i32>,
    /// Slots assigned so far, ascending.
    assigned: Vec<i32>,
    /// Where to resume partitions (a commit entry) instead of `start_from`.
    resume: BTreeMap<(String, i32), i64>,
    last_metadata: Option<Instant>,
    /// Records and bytes read per slot, for metrics.
    counts: BTreeMap<i32, (u64, u64)>,
    /// A record waiting for the schema registry, and when to ask again.
    held: Option<(OwnedMessage, Instant)>,
    /// Backoff of the next registry retry.
    registry_backoff: Duration,
    /// Since when the broker has said the topic does not exist (none assigned yet).
    missing_since: Option<Instant>,
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

struct MetaBuilders {
    key: StringBuilder,
    partition: Int32Builder,
    offset: Int64Builder,
    timestamp: TimestampMillisecondBuilder,
}

/// `fetch.wait.max.ms` of the source's consumer (overridable in `kafka.properties`).
const FETCH_WAIT_MAX_MS: &str = "5";

/// `fetch.queue.backoff.ms` of the source's consumer (overridable in `kafka.properties`):
/// how long librdkafka waits to fetch a partition again once its prefetch queue is full.
/// Its default, a second, idles a pipeline that drains the queue in milliseconds (a
/// quarter of the throughput, measured on a backlog).
pub const FETCH_QUEUE_BACKOFF_MS: &str = "10";

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
            ("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS),
        ]);
        let consumer: BaseConsumer<LogContext> =
            super::client::create(&config, options.client.log_context(&options.name))?;
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
                slots: Slots::new(&options.topics),
                options,
                positions: BTreeMap::new(),
                row_partitions: Vec::new(),
                assigned: Vec::new(),
                resume: BTreeMap::new(),
                last_metadata: None,
                counts: BTreeMap::new(),
                held: None,
                registry_backoff: REGISTRY_RETRY_MIN,
                missing_since: None,
            },
        })
    }

    /// Assigns partitions of the topics that are not assigned yet: at the resume
    /// offset, else at the group's committed offset, else as `start_from` says.
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
        let one = match &st.options.topics {
            Topics::Name(t) => Some(t.as_str()),
            Topics::Pattern(_) => None,
        };
        let metadata = match self.consumer.fetch_metadata(one, METADATA_TIMEOUT) {
            Ok(m) => m,
            Err(e) => {
                if self.consumer.context().should_log_error() {
                    tracing::warn!(source = %st.options.name,
                        "cannot fetch metadata of {} (retrying): {e}", st.options.topics.describe());
                }
                return Ok(());
            }
        };
        let mut found: Vec<(String, i32)> = Vec::new();
        let mut why = None;
        for t in metadata.topics() {
            if !st.options.topics.selects(t.name()) {
                continue;
            }
            match t.error() {
                Some(e) => why = Some(RDKafkaErrorCode::from(e).to_string()),
                None => found.extend(t.partitions().iter().map(|p| (t.name().to_owned(), p.id()))),
            }
        }
        if found.is_empty() && st.assigned.is_empty() {
            return st.topic_missing(self.consumer.context(), why.as_deref());
        }
        st.missing_since = None;
        found.sort();
        let mut tpl = TopicPartitionList::new();
        let mut new = Vec::new();
        for (topic, p) in found {
            if st
                .slots
                .get(&topic, p)
                .is_some_and(|slot| st.assigned.contains(&slot))
            {
                continue;
            }
            let slot = st.slots.assign(&topic, p);
            let offset = st
                .resume
                .get(&(topic.clone(), p))
                .map_or(Offset::Stored, |&o| Offset::Offset(o));
            tpl.add_partition_offset(&topic, p, offset)?;
            new.push(slot);
        }
        if new.is_empty() {
            return Ok(());
        }
        self.consumer.incremental_assign(&tpl)?;
        tracing::debug!(source = %st.options.name, partitions = tpl.count(), "assigned partitions");
        st.assigned.extend(new);
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
                    "a partition of {} has no committed offset for group {} \
                     (start_from: committed): {error}",
                    options.topics.describe(),
                    options.group_id
                ),
            });
        }
        if code == Some(RDKafkaErrorCode::UnknownTopicOrPartition) {
            // Deleted while read, or not there yet: metadata tells which at the refresh.
            if self.consumer.context().should_log_error() {
                tracing::warn!(source = %options.name, topic = %options.topics.describe(),
                    "the broker says the topic does not exist: {error}");
            }
        } else if self.consumer.context().should_log_error() {
            tracing::warn!(source = %options.name, "consume error (retrying): {error}");
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
    /// The broker answered that the topic does not exist: wait, or (after the grace)
    /// fail, as `on_missing_topic` says.
    fn topic_missing(
        &mut self,
        context: &LogContext,
        why: Option<&str>,
    ) -> Result<(), SourceError> {
        let since = *self.missing_since.get_or_insert_with(Instant::now);
        let topic = self.options.topics.describe();
        match self.options.on_missing_topic {
            MissingTopic::Fail if since.elapsed() >= MISSING_TOPIC_GRACE => {
                Err(SourceError::Fatal {
                    context: format!("source {}", self.options.name),
                    message: format!(
                        "no partition of {topic} exists (the broker has said so for {:.0?}{}); \
                     create the topic, or set `on_missing_topic: wait` to wait for it",
                        since.elapsed(),
                        why.map_or_else(String::new, |w| format!(": {w}"))
                    ),
                })
            }
            MissingTopic::Fail => Ok(()),
            MissingTopic::Wait => {
                if context.should_log_error() {
                    tracing::warn!(source = %self.options.name, topic = %topic,
                        "topic does not exist (yet); waiting for it (on_missing_topic: wait)");
                }
                Ok(())
            }
        }
    }

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
        // Every partition read from was assigned a slot first.
        let slot = self.slots.get(m.topic(), partition).unwrap_or(partition);
        self.positions.insert(slot, offset + 1);
        let count = self.counts.entry(slot).or_default();
        count.0 += 1;
        count.1 += (m.payload().map_or(0, <[u8]>::len) + m.key().map_or(0, <[u8]>::len)) as u64;
        match self.parse(m) {
            Ok(()) => {
                self.value.append();
                if let Some(key) = &mut self.key {
                    key.append();
                }
                self.row_partitions.push(slot);
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
                        topic: m.topic().to_owned(),
                        partition,
                        offset,
                        reason,
                    });
                }
                DecodeErrorPolicy::Skip | DecodeErrorPolicy::DeadLetter => {
                    rejected.push(Rejected {
                        topic: m.topic().to_owned(),
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
        let st = &self.state;
        let (mut pause, mut resume) = (TopicPartitionList::new(), TopicPartitionList::new());
        for &slot in &st.assigned {
            let Some((topic, p)) = st.slots.partition(slot) else {
                continue;
            };
            if paused.contains(&slot) {
                pause.add_partition(topic, *p);
            } else {
                resume.add_partition(topic, *p);
            }
        }
        if pause.count() > 0 {
            self.consumer.pause(&pause)?;
        }
        if resume.count() > 0 {
            self.consumer.resume(&resume)?;
        }
        Ok(true)
    }

    fn positions(&self) -> Vec<SourcePosition> {
        let st = &self.state;
        st.positions
            .iter()
            .filter_map(|(&slot, &next_offset)| {
                let (topic, partition) = st.slots.partition(slot)?;
                Some(SourcePosition {
                    topic: topic.clone(),
                    partition: *partition,
                    next_offset,
                })
            })
            .collect()
    }

    fn partition_stats(&self) -> Vec<PartitionStats> {
        let context = self.consumer.context();
        let st = &self.state;
        st.assigned
            .iter()
            .filter_map(|&slot| {
                let (topic, partition) = st.slots.partition(slot)?;
                let (records, bytes) = st.counts.get(&slot).copied().unwrap_or_default();
                let high = context.high_watermark(topic, *partition);
                let lag = match (high, st.positions.get(&slot)) {
                    (Some(high), Some(&next)) => Some((high - next).max(0)),
                    // Nothing read yet from an empty partition.
                    (Some(0), None) => Some(0),
                    _ => None,
                };
                Some(PartitionStats {
                    topic: topic.clone(),
                    partition: *partition,
                    records,
                    bytes,
                    lag,
                })
            })
            .collect()
    }

    fn partition_slots(&self) -> Vec<(String, i32, i32)> {
        self.state.slots.list()
    }

    fn restore_partition_slots(&mut self, slots: &[(String, i32, i32)]) {
        self.state.slots.restore(slots);
    }

    fn seek(&mut self, positions: &[SourcePosition]) -> Result<(), SourceError> {
        let st = &mut self.state;
        assert!(st.assigned.is_empty(), "seek before the first poll");
        for p in positions
            .iter()
            .filter(|p| st.options.topics.selects(&p.topic))
        {
            let slot = st.slots.assign(&p.topic, p.partition);
            st.resume
                .insert((p.topic.clone(), p.partition), p.next_offset);
            st.positions.insert(slot, p.next_offset);
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
