//! The Kafka sink: JSON or Avro values, optional keys, headers and timestamps from
//! columns; also the dead-letter writer.
//!
//! `write` enqueues into librdkafka's bounded queue. While that queue is full, `write`
//! holds the records it could not hand on, in order, and returns: [`Sink::backlog`]
//! hands them on later, and the pipeline reads none of the sources that feed a sink
//! while it holds any (backpressure that leaves the pipeline thread free for time,
//! other sources, metrics and a stop). Past [`HELD_BYTES_MAX`] `write` waits for room
//! instead. `flush` waits for every acknowledgement. Delivery errors are remembered by
//! the delivery callback and surface at the next `write` or `flush`.
//!
//! With `delivery: exactly_once` the sink does not send at `write`: it encodes and holds
//! the rows ([`KafkaSink::take_staged`]) until the engine has made the epoch durable, then
//! [`KafkaSink::send_epoch`] sends them with the headers [`EPOCH_HEADER`],
//! [`SEQ_HEADER`] and [`SINK_HEADER`] (in a transaction with `transactions: true`), and
//! after a crash [`KafkaSink::read_back`] finds which of them the topic already holds.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, RecordBatch};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;

use super::client::{KafkaClientOptions, LogContext, create};
use crate::format::avro::AvroEncoder;
use crate::format::json::{CellText, JsonEncoder};
use crate::{FlushOutcome, Rejected, Sink, SinkError};

/// How long `write` waits for room in a full producer queue before logging that it is
/// still waiting (it never gives up: the queue drains when the broker is back).
const QUEUE_FULL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Bytes (keys and values) of records an at-least-once sink holds back while librdkafka's queue is full
/// (what is in flight from the input already read: the source batch of the moment and
/// what windows closed meanwhile emit). Past it `write` waits for room in the queue.
pub const HELD_BYTES_MAX: usize = 32 << 20;

/// A `connector: kafka` sink, or a source's dead-letter topic.
#[derive(Debug, Clone)]
pub struct KafkaSinkOptions {
    /// The sink's name in the pipeline (logs, metrics).
    pub name: String,
    pub client: KafkaClientOptions,
    pub topic: String,
    /// Column indices whose values form the message key (empty: no key).
    pub key_columns: Vec<usize>,
    /// `delivery: exactly_once`; `None`: at-least-once.
    pub exactly_once: Option<ExactlyOnce>,
    /// How values are written.
    pub value: ValueEncoding,
    /// How keys are written.
    pub key: KeyEncoding,
    /// Header name -> column index: each record carries the column's value as text.
    pub headers: Vec<(String, usize)>,
    /// A TIMESTAMP column that sets each record's timestamp.
    pub timestamp_column: Option<usize>,
}

impl KafkaSinkOptions {
    /// A sink of JSON values without keys, headers or exactly-once (dead-letter and
    /// late-data topics).
    #[must_use]
    pub fn plain(name: &str, client: KafkaClientOptions, topic: &str) -> Self {
        Self {
            name: name.to_owned(),
            client,
            topic: topic.to_owned(),
            key_columns: Vec::new(),
            exactly_once: None,
            value: ValueEncoding::Json,
            key: KeyEncoding::Text,
            headers: Vec::new(),
            timestamp_column: None,
        }
    }
}

/// How a sink writes record values.
#[derive(Debug, Clone, Default)]
pub enum ValueEncoding {
    /// One JSON object per row.
    #[default]
    Json,
    /// One Avro datum per row (with the Confluent header when registered).
    Avro(AvroEncoder),
}

/// How a sink writes record keys (from `key_columns`).
#[derive(Debug, Clone, Default)]
pub enum KeyEncoding {
    /// One key column's value as text; several as a JSON object.
    #[default]
    Text,
    /// A JSON object of the key columns, even one.
    Json,
    /// An Avro datum of the key columns.
    Avro(AvroEncoder),
}

/// Settings of an exactly-once sink.
#[derive(Debug, Clone)]
pub struct ExactlyOnce {
    /// `transactions: true`: each epoch's output in one Kafka transaction with this id.
    pub transactional_id: Option<String>,
}

/// Header with the epoch that produced a record (exactly-once sinks), decimal ASCII.
pub const EPOCH_HEADER: &str = "laminar.epoch";
/// Header with a record's position in its sink's output for the epoch, decimal ASCII.
pub const SEQ_HEADER: &str = "laminar.seq";
/// Header with the name of the sink that wrote the record.
pub const SINK_HEADER: &str = "laminar.sink";

/// How long reading back a sink's own output may take before it is an error.
const READ_BACK_TIMEOUT: Duration = Duration::from_mins(2);
/// Tries of a transaction commit whose outcome is not known (a retriable error).
const COMMIT_ATTEMPTS: u32 = 3;
/// How long `commit_transaction` may take (it flushes first).
const TRANSACTION_TIMEOUT: Duration = Duration::from_mins(1);

/// One encoded record of an exactly-once sink, held until its epoch is durable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputRecord {
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    /// Headers from columns (`headers:`), before laminar's own.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The record's timestamp (`timestamp:`), epoch milliseconds.
    pub timestamp: Option<i64>,
}

/// Counts acknowledgements and keeps the first delivery error.
pub struct DeliveryContext {
    log: LogContext,
    acked: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// Per partition, one past the highest offset acknowledged.
    ends: Mutex<BTreeMap<i32, i64>>,
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.log.log(level, fac, log_message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.log.error(error, reason);
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, (): ()) {
        match result {
            Ok(m) => {
                self.acked.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut ends) = self.ends.lock() {
                    let end = ends.entry(m.partition()).or_insert(0);
                    *end = (*end).max(m.offset() + 1);
                }
            }
            // Purged by `abort_transaction`: the abort is the failure, already handled
            // (these reports may come after the next try began).
            Err((
                KafkaError::MessageProduction(
                    RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight,
                ),
                _,
            )) => {}
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = self.first_error.lock() {
                    first.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
}

pub struct KafkaSink {
    options: KafkaSinkOptions,
    producer: ThreadedProducer<DeliveryContext>,
    encoder: JsonEncoder,
    values: Vec<u8>,
    value_ends: Vec<usize>,
    keys: Vec<u8>,
    key_ends: Vec<usize>,
    /// Exactly-once: encoded rows of the open epoch.
    staged: Vec<OutputRecord>,
    staged_bytes: usize,
    /// Exactly-once: the topic's end offsets when the sink started, per partition.
    start_ends: Option<BTreeMap<i32, i64>>,
    /// A transaction was begun by `send_epoch` and not yet committed.
    in_transaction: bool,
    /// At-least-once: records written while librdkafka's queue was full, in order.
    held: Held,
}

/// An encoded record waiting for room in librdkafka's queue.
struct HeldRecord {
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    headers: Option<OwnedHeaders>,
    timestamp: Option<i64>,
}

#[derive(Default)]
struct Held {
    records: VecDeque<HeldRecord>,
    bytes: usize,
}

impl Held {
    fn push(&mut self, record: HeldRecord) {
        self.bytes += record.value.len() + record.key.as_ref().map_or(0, Vec::len);
        self.records.push_back(record);
    }

    /// Queues `record` in librdkafka, or holds it when the queue is full or records
    /// written before it are held (they go first: a partition keeps the write order).
    fn offer(
        &mut self,
        producer: &ThreadedProducer<DeliveryContext>,
        record: BaseRecord<'_, [u8], [u8]>,
    ) -> Result<(), KafkaError> {
        if !self.records.is_empty() {
            self.push(HeldRecord::from(record));
            return Ok(());
        }
        match producer.send(record) {
            Ok(()) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), record)) => {
                self.push(HeldRecord::from(record));
                Ok(())
            }
            Err((e, _)) => Err(e),
        }
    }

    /// Queues held records in librdkafka, oldest first, until its queue is full.
    fn release(
        &mut self,
        producer: &ThreadedProducer<DeliveryContext>,
        topic: &str,
    ) -> Result<(), KafkaError> {
        while let Some(front) = self.records.front_mut() {
            let record = base_record(
                topic,
                front.key.as_deref(),
                &front.value,
                front.headers.take(),
                front.timestamp,
            );
            match producer.send(record) {
                Ok(()) => {}
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), record)) => {
                    front.headers = record.headers;
                    return Ok(());
                }
                Err((e, _)) => return Err(e),
            }
            let sent = self
                .records
                .pop_front()
                .map_or(0, |r| r.value.len() + r.key.as_ref().map_or(0, Vec::len));
            self.bytes -= sent;
        }
        Ok(())
    }
}

impl From<BaseRecord<'_, [u8], [u8]>> for HeldRecord {
    fn from(record: BaseRecord<'_, [u8], [u8]>) -> Self {
        Self {
            key: record.key.map(<[u8]>::to_vec),
            value: record.payload.map(<[u8]>::to_vec).unwrap_or_default(),
            headers: record.headers,
            timestamp: record.timestamp,
        }
    }
}

impl KafkaSink {
    pub fn new(options: KafkaSinkOptions) -> Result<Self, SinkError> {
        let producer = Self::producer(&options, BTreeMap::new())?;
        Ok(Self {
            options,
            producer,
            encoder: JsonEncoder::default(),
            values: Vec::new(),
            value_ends: Vec::new(),
            keys: Vec::new(),
            key_ends: Vec::new(),
            staged: Vec::new(),
            staged_bytes: 0,
            start_ends: None,
            in_transaction: false,
            held: Held::default(),
        })
    }

    /// The sink's producer; `ends` are the per-partition ends acknowledged so far.
    fn producer(
        options: &KafkaSinkOptions,
        ends: BTreeMap<i32, i64>,
    ) -> Result<ThreadedProducer<DeliveryContext>, SinkError> {
        let mut config = options.client.config(&[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            // Retry without a deadline: an unreachable broker delays, it never drops.
            ("message.timeout.ms", "0"),
            ("linger.ms", LINGER_MS),
            // The bounded producer queue: when it is full `write` holds records back
            // (and the pipeline pauses the sources feeding the sink).
            ("queue.buffering.max.messages", "100000"),
            ("queue.buffering.max.kbytes", "65536"),
        ]);
        let context = DeliveryContext {
            log: options.client.log_context(&options.name),
            acked: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            first_error: Mutex::new(None),
            ends: Mutex::new(ends),
        };
        let transactional_id = options
            .exactly_once
            .as_ref()
            .and_then(|e| e.transactional_id.as_ref());
        if let Some(id) = transactional_id {
            config.set("transactional.id", id);
        } else if options.exactly_once.is_some() {
            // A record refused for good stops the producer instead of leaving a gap that
            // later records of its partition skip over: what reached a partition is then
            // always a prefix of what was sent to it, so sending the missing records
            // again (after a read-back) keeps their order.
            config.set("enable.gapless.guarantee", "true");
        }
        let producer: ThreadedProducer<DeliveryContext> = create(&config, context)?;
        if transactional_id.is_some() {
            // Fences an earlier instance and aborts the transaction it left open.
            producer.init_transactions(TRANSACTION_TIMEOUT)?;
        }
        Ok(producer)
    }

    /// Exactly-once with `transactions: true`: each epoch in a Kafka transaction.
    fn transactional(&self) -> bool {
        self.options
            .exactly_once
            .as_ref()
            .is_some_and(|e| e.transactional_id.is_some())
    }

    /// Exactly-once: the rows written since the last call, encoded.
    pub fn take_staged(&mut self) -> Vec<OutputRecord> {
        self.staged_bytes = 0;
        std::mem::take(&mut self.staged)
    }

    /// Exactly-once: bytes of rows held for the open epoch.
    #[must_use]
    pub fn staged_bytes(&self) -> usize {
        self.staged_bytes
    }

    #[must_use]
    pub fn topic(&self) -> &str {
        &self.options.topic
    }

    /// Exactly-once: where the next epoch's output starts in each partition: one past
    /// the last record this sink had acknowledged, or the partition's end when the sink
    /// started. Partitions missing from the list are read back from their beginning.
    pub fn output_starts(&mut self) -> Vec<(i32, i64)> {
        if self.start_ends.is_none() {
            self.start_ends = Some(self.fetch_ends());
        }
        let mut starts = self.start_ends.clone().unwrap_or_default();
        if let Ok(ends) = self.producer.context().ends.lock() {
            for (&p, &end) in ends.iter() {
                let s = starts.entry(p).or_insert(end);
                *s = (*s).max(end);
            }
        }
        starts.into_iter().collect()
    }

    /// The high watermark of every partition of the topic (none if it does not exist).
    fn fetch_ends(&self) -> BTreeMap<i32, i64> {
        let topic = &self.options.topic;
        let mut ends = BTreeMap::new();
        let Ok(consumer) = self.read_back_consumer() else {
            return ends;
        };
        let Ok(metadata) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) else {
            return ends;
        };
        for t in metadata.topics().iter().filter(|t| t.name() == topic) {
            for p in t.partitions() {
                if let Ok((_, high)) =
                    consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(5))
                {
                    ends.insert(p.id(), high);
                }
            }
        }
        ends
    }

    /// A consumer of the sink's own topic, as `read_committed` readers see it.
    fn read_back_consumer(&self) -> Result<BaseConsumer<LogContext>, KafkaError> {
        let client = &self.options.client;
        let config = client.config(&[
            ("group.id", "laminar-read-back"),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "true"),
            ("isolation.level", "read_committed"),
            ("auto.offset.reset", "earliest"),
        ]);
        create(&config, client.log_context(&self.options.name))
    }

    /// Exactly-once: sends `records` of `epoch`, except the sequence numbers in `skip`
    /// (in a transaction with `transactions: true`); returns how many were sent. The
    /// caller then waits for them with `flush` and calls [`KafkaSink::finish_epoch`].
    pub fn send_epoch(
        &mut self,
        epoch: u64,
        records: &[OutputRecord],
        skip: &HashSet<u64>,
    ) -> Result<usize, SinkError> {
        self.check_failures()?;
        let transactional = self.transactional();
        let mut sent = 0;
        if records.len() == skip.len() {
            return Ok(0);
        }
        if transactional {
            if let Err(e) = self.producer.begin_transaction() {
                // One the broker wants aborted is aborted by `abandon_epoch`.
                self.in_transaction =
                    matches!(&e, KafkaError::Transaction(t) if t.txn_requires_abort());
                return Err(e.into());
            }
            self.in_transaction = true;
        }
        let epoch_text = epoch.to_string();
        for (seq, record) in records.iter().enumerate() {
            if skip.contains(&(seq as u64)) {
                continue;
            }
            if seq == records.len() / 2 && crate::crash::reached("mid-delivery") {
                // Half the epoch reaches the broker (and, in a transaction, stays open).
                let _ = self.producer.flush(Duration::from_secs(10));
                crate::crash::crash("mid-delivery");
            }
            let seq_text = seq.to_string();
            let headers = column_headers(&record.headers)
                .insert(Header {
                    key: EPOCH_HEADER,
                    value: Some(epoch_text.as_bytes()),
                })
                .insert(Header {
                    key: SEQ_HEADER,
                    value: Some(seq_text.as_bytes()),
                })
                .insert(Header {
                    key: SINK_HEADER,
                    value: Some(self.options.name.as_bytes()),
                });
            self.send(
                record.key.as_deref(),
                &record.value,
                Some(headers),
                record.timestamp,
            )?;
            sent += 1;
        }
        Ok(sent)
    }

    /// Exactly-once: after `flush` returned `Done`, commits the epoch's transaction, if
    /// one is open; whether one was.
    pub fn finish_epoch(&mut self) -> Result<bool, SinkError> {
        if !self.in_transaction {
            return Ok(false);
        }
        let mut attempt = 1;
        loop {
            match self.producer.commit_transaction(TRANSACTION_TIMEOUT) {
                Ok(()) => break,
                // The outcome is not known yet: librdkafka finishes the same commit when
                // asked again (an abort now could undo a commit the broker made).
                Err(KafkaError::Transaction(e))
                    if e.is_retriable() && attempt < COMMIT_ATTEMPTS =>
                {
                    tracing::warn!(sink = %self.options.name, attempt,
                        "committing the transaction (retrying): {e}");
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.in_transaction = false;
        Ok(true)
    }

    /// Whether an epoch whose `send_epoch`, `flush` or `finish_epoch` failed with
    /// `error` may be sent again after [`KafkaSink::abandon_epoch`]: a record that failed
    /// for good (too large, refused), one librdkafka would not queue because the topic
    /// is in an error state (a refusal leaves it there until its metadata is fetched
    /// again), or a transaction the broker requires to be aborted. A fenced or otherwise
    /// fatal producer, a timeout of the caller's, a configuration or encoding error are
    /// not retried. The caller bounds the tries: an error that does not pass stops it.
    #[must_use]
    pub fn retryable(error: &SinkError) -> bool {
        match error {
            SinkError::Delivery { .. } => true,
            SinkError::Kafka(KafkaError::MessageProduction(code)) => {
                *code != RDKafkaErrorCode::QueueFull
            }
            SinkError::Kafka(KafkaError::Transaction(e)) => !e.is_fatal() && e.txn_requires_abort(),
            _ => false,
        }
    }

    /// Exactly-once, after a [`KafkaSink::retryable`] failure: aborts the open
    /// transaction (returning `true`), or without transactions waits until no record is
    /// in flight and starts a new producer (the failure stopped the old one); then
    /// forgets the failure. The caller reads back what the topic holds with
    /// [`KafkaSink::read_back`] and sends the rest again.
    pub fn abandon_epoch(&mut self) -> Result<bool, SinkError> {
        let aborted = self.in_transaction;
        if aborted {
            // Purges what is queued and waits for what is in flight.
            self.producer.abort_transaction(TRANSACTION_TIMEOUT)?;
            self.in_transaction = false;
        }
        // Every delivery report is served (the purged records' too) before the failure
        // is forgotten, so none of this epoch's counts against the next attempt.
        self.producer.flush(READ_BACK_TIMEOUT)?;
        if self.transactional() {
            // A refusal may have put the topic in an error state that refuses to queue
            // records until the next metadata refresh; this is that refresh.
            self.producer
                .client()
                .fetch_metadata(Some(&self.options.topic), READ_BACK_TIMEOUT)?;
            let context = self.producer.context();
            context.failed.store(0, Ordering::Relaxed);
            if let Ok(mut first) = context.first_error.lock() {
                *first = None;
            }
        } else {
            let ends = self
                .producer
                .context()
                .ends
                .lock()
                .map(|e| e.clone())
                .unwrap_or_default();
            self.producer = Self::producer(&self.options, ends)?;
        }
        Ok(aborted)
    }

    /// Exactly-once, after a crash: the sequence numbers of `epoch` that this sink's
    /// topic already holds after `starts` (partitions not listed: from their beginning),
    /// as a `read_committed` consumer sees them.
    pub fn read_back(&self, epoch: u64, starts: &[(i32, i64)]) -> Result<HashSet<u64>, SinkError> {
        let topic = &self.options.topic;
        let consumer = self.read_back_consumer()?;
        let metadata = consumer.fetch_metadata(Some(topic), READ_BACK_TIMEOUT)?;
        let partitions = super::client::topic_partitions(&metadata, topic);
        let mut found = HashSet::new();
        if partitions.is_empty() {
            return Ok(found);
        }
        let mut tpl = rdkafka::TopicPartitionList::new();
        for &p in &partitions {
            let offset = starts
                .iter()
                .find(|(sp, _)| *sp == p)
                .map_or(rdkafka::Offset::Beginning, |&(_, o)| {
                    rdkafka::Offset::Offset(o)
                });
            tpl.add_partition_offset(topic, p, offset)?;
        }
        // Each partition's end now (its last stable offset, as read_committed readers
        // see it): read back until there, or until the end-of-partition event. Both, so
        // that a broker whose reported end lags its last record (tansu 0.6 reports the
        // last batch's first offset + 1), or one that never sends the event, is still
        // read to the end.
        let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
        for &p in &partitions {
            let (_, high) = consumer.fetch_watermarks(topic, p, READ_BACK_TIMEOUT)?;
            ends.insert(p, high);
        }
        let mut at_end: HashSet<i32> = partitions
            .iter()
            .copied()
            .filter(|p| {
                let start = starts.iter().find(|(sp, _)| sp == p).map_or(0, |&(_, o)| o);
                start >= ends[p]
            })
            .collect();
        consumer.assign(&tpl)?;
        let epoch_text = epoch.to_string();
        let started = Instant::now();
        // Once every partition is at its end, what was fetched is still taken from the
        // local queue (the rest of a batch past an end reported too low), until a poll
        // finds nothing.
        let mut drained = false;
        while at_end.len() < partitions.len() || !drained {
            if started.elapsed() > READ_BACK_TIMEOUT {
                return Err(SinkError::Delivery {
                    topic: topic.clone(),
                    message: format!(
                        "reading back the output of epoch {epoch} did not reach the end of \
                         every partition within {READ_BACK_TIMEOUT:?}"
                    ),
                });
            }
            let polled = consumer.poll(Duration::from_millis(200));
            drained = polled.is_none();
            match polled {
                None => {}
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                }
                Some(Err(e)) => {
                    tracing::warn!(sink = %self.options.name, "reading back output (retrying): {e}");
                }
                Some(Ok(m)) => {
                    if m.offset() + 1 >= ends.get(&m.partition()).copied().unwrap_or(i64::MAX) {
                        at_end.insert(m.partition());
                    }
                    let Some(headers) = m.headers() else { continue };
                    let mut of_epoch = false;
                    let mut mine = false;
                    let mut seq = None;
                    for h in headers.iter() {
                        match (h.key, h.value) {
                            (EPOCH_HEADER, Some(v)) => of_epoch = v == epoch_text.as_bytes(),
                            (SINK_HEADER, Some(v)) => mine = v == self.options.name.as_bytes(),
                            (SEQ_HEADER, Some(v)) => {
                                seq = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok());
                            }
                            _ => {}
                        }
                    }
                    if let (true, true, Some(seq)) = (of_epoch, mine, seq) {
                        found.insert(seq);
                    }
                }
            }
        }
        Ok(found)
    }

    /// Records acknowledged by the broker since start.
    #[must_use]
    pub fn acked(&self) -> u64 {
        self.producer.context().acked.load(Ordering::Relaxed)
    }

    fn check_failures(&self) -> Result<(), SinkError> {
        let context = self.producer.context();
        if context.failed.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        let message = context
            .first_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .unwrap_or_else(|| "unknown error".to_owned());
        Err(SinkError::Delivery {
            topic: self.options.topic.clone(),
            message,
        })
    }

    /// Queues one record, waiting while librdkafka's queue is full (exactly-once
    /// delivery at an epoch's close, which the pipeline waits for anyway).
    fn send(
        &self,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
        timestamp: Option<i64>,
    ) -> Result<(), SinkError> {
        let mut record = base_record(&self.options.topic, key, payload, headers, timestamp);
        let mut waiting = QueueFullWait::default();
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    self.check_failures()?;
                    waiting.wait(&self.options);
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    /// Hands held records on and, while they are more than [`HELD_BYTES_MAX`], waits for
    /// room in librdkafka's queue.
    fn release_held(&mut self) -> Result<(), SinkError> {
        let mut waiting = QueueFullWait::default();
        loop {
            self.held.release(&self.producer, &self.options.topic)?;
            if self.held.bytes <= HELD_BYTES_MAX {
                return Ok(());
            }
            self.check_failures()?;
            waiting.wait(&self.options);
        }
    }
}

/// A record as librdkafka takes it.
fn base_record<'a>(
    topic: &'a str,
    key: Option<&'a [u8]>,
    payload: &'a [u8],
    headers: Option<OwnedHeaders>,
    timestamp: Option<i64>,
) -> BaseRecord<'a, [u8], [u8]> {
    let mut record = BaseRecord::to(topic).payload(payload);
    if let Some(k) = key {
        record = record.key(k);
    }
    if let Some(t) = timestamp {
        record = record.timestamp(t);
    }
    if let Some(h) = headers {
        record = record.headers(h);
    }
    record
}

/// Waiting for room in a full producer queue: short sleeps, and a warning every
/// [`QUEUE_FULL_LOG_INTERVAL`].
#[derive(Default)]
struct QueueFullWait {
    since: Option<Instant>,
}

impl QueueFullWait {
    fn wait(&mut self, options: &KafkaSinkOptions) {
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() > QUEUE_FULL_LOG_INTERVAL {
            tracing::warn!(sink = %options.name, topic = %options.topic,
                "producer queue full for {:?}: broker slow or unreachable; waiting",
                since.elapsed());
            self.since = Some(Instant::now());
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// A row's headers (name, value) and timestamp, from columns.
type RowExtras = (Vec<(String, Option<Vec<u8>>)>, Option<i64>);

/// Headers from columns, as librdkafka takes them.
fn column_headers(headers: &[(String, Option<Vec<u8>>)]) -> OwnedHeaders {
    headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
        h.insert(Header {
            key: k,
            value: v.as_deref(),
        })
    })
}

impl KafkaSink {
    /// Encodes the rows' values and keys into `values`/`keys`.
    fn encode(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        self.values.clear();
        self.value_ends.clear();
        match &self.options.value {
            ValueEncoding::Json => {
                self.encoder
                    .encode(batch, None, &mut self.values, &mut self.value_ends)
            }
            ValueEncoding::Avro(e) => e.encode(batch, &mut self.values, &mut self.value_ends),
        }
        .map_err(SinkError::Encode)?;
        self.keys.clear();
        self.key_ends.clear();
        match (&self.options.key, self.options.key_columns.as_slice()) {
            (_, []) => {}
            (KeyEncoding::Avro(e), _) => e
                .encode(batch, &mut self.keys, &mut self.key_ends)
                .map_err(SinkError::Encode)?,
            (KeyEncoding::Text, [one]) => {
                let column =
                    CellText::new(batch.column(*one).as_ref()).map_err(SinkError::Encode)?;
                for row in 0..batch.num_rows() {
                    column
                        .write(row, &mut self.keys)
                        .map_err(SinkError::Encode)?;
                    self.key_ends.push(self.keys.len());
                }
            }
            (KeyEncoding::Text | KeyEncoding::Json, several) => {
                let several = several.to_vec();
                self.encoder
                    .encode(batch, Some(&several), &mut self.keys, &mut self.key_ends)
                    .map_err(SinkError::Encode)?;
            }
        }
        Ok(())
    }

    /// Per row, the headers and timestamp that columns give it (empty when none do).
    fn extras(&self, batch: &RecordBatch) -> Result<Vec<RowExtras>, SinkError> {
        if self.options.headers.is_empty() && self.options.timestamp_column.is_none() {
            return Ok(Vec::new());
        }
        // Milliseconds since the epoch, whatever the column's unit.
        let times = match self.options.timestamp_column {
            Some(i) => {
                use arrow::datatypes::{DataType, TimeUnit};
                let ms = arrow::compute::cast(
                    batch.column(i),
                    &DataType::Timestamp(TimeUnit::Millisecond, None),
                )
                .and_then(|t| arrow::compute::cast(&t, &DataType::Int64))
                .map_err(|e| SinkError::Encode(e.to_string()))?;
                Some(ms)
            }
            None => None,
        };
        let times = times
            .as_ref()
            .map(AsArray::as_primitive::<arrow::datatypes::Int64Type>);
        let columns = self
            .options
            .headers
            .iter()
            .map(|(name, i)| {
                Ok((
                    name,
                    batch.column(*i),
                    CellText::new(batch.column(*i).as_ref())?,
                ))
            })
            .collect::<Result<Vec<_>, String>>()
            .map_err(SinkError::Encode)?;
        let mut out = Vec::with_capacity(batch.num_rows());
        for row in 0..batch.num_rows() {
            let mut headers = Vec::with_capacity(columns.len());
            for (name, array, text) in &columns {
                // A null column gives no header, rather than one without a value.
                if !array.is_null(row) {
                    let mut value = Vec::new();
                    text.write(row, &mut value).map_err(SinkError::Encode)?;
                    headers.push(((*name).clone(), Some(value)));
                }
            }
            let timestamp = times.and_then(|t| (!t.is_null(row)).then(|| t.value(row)));
            out.push((headers, timestamp));
        }
        Ok(out)
    }

    /// Exactly-once: holds the encoded rows until the epoch is durable.
    fn stage(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        self.encode(batch)?;
        let mut extras = self.extras(batch)?.into_iter();
        let (mut start, mut key_start) = (0, 0);
        for row in 0..batch.num_rows() {
            let end = self.value_ends[row];
            let key = self.key_ends.get(row).map(|&key_end| {
                let k = self.keys[key_start..key_end].to_vec();
                key_start = key_end;
                k
            });
            let (headers, timestamp) = extras.next().unwrap_or_default();
            self.staged_bytes += end - start
                + key.as_ref().map_or(0, Vec::len)
                + headers
                    .iter()
                    .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
                    .sum::<usize>();
            self.staged.push(OutputRecord {
                key,
                value: self.values[start..end].to_vec(),
                headers,
                timestamp,
            });
            start = end;
        }
        Ok(())
    }

    /// Writes rows, each with the same `headers` (`key`, `value`) after those from columns.
    pub fn write_with_headers(
        &mut self,
        batch: &RecordBatch,
        headers: &[(&str, &str)],
    ) -> Result<(), SinkError> {
        self.check_failures()?;
        self.held.release(&self.producer, &self.options.topic)?;
        self.encode(batch)?;
        let mut extras = self.extras(batch)?.into_iter();
        let mut start = 0;
        let mut key_start = 0;
        for row in 0..batch.num_rows() {
            let end = self.value_ends[row];
            let key = self.key_ends.get(row).map(|&key_end| {
                let k = &self.keys[key_start..key_end];
                key_start = key_end;
                k
            });
            let (from_columns, timestamp) = extras.next().unwrap_or_default();
            let owned = (!headers.is_empty() || !from_columns.is_empty()).then(|| {
                headers
                    .iter()
                    .fold(column_headers(&from_columns), |h, (k, v)| {
                        h.insert(Header {
                            key: k,
                            value: Some(v.as_bytes()),
                        })
                    })
            });
            let record = base_record(
                &self.options.topic,
                key,
                &self.values[start..end],
                owned,
                timestamp,
            );
            self.held.offer(&self.producer, record)?;
            start = end;
        }
        self.release_held()
    }
}

/// How long one look for acknowledgements waits while a flush is under way.
/// `linger.ms` of the sink's producer (overridable in `kafka.properties`): how long a
/// record may wait for others to share its request. Under load requests fill before it
/// passes; at a low rate it is latency every record pays, so it is short.
pub const LINGER_MS: &str = "1";

const FLUSH_POLL: Duration = Duration::from_millis(2);

impl Sink for KafkaSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        if self.options.exactly_once.is_some() {
            return self.stage(batch);
        }
        self.write_with_headers(batch, &[])
    }

    fn write_rejected(&mut self, rejected: &[Rejected]) -> Result<(), SinkError> {
        self.check_failures()?;
        self.held.release(&self.producer, &self.options.topic)?;
        for r in rejected {
            let reason = r.reason.to_string();
            let partition = r.partition.to_string();
            let offset = r.offset.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "laminar.error",
                    value: Some(reason.as_bytes()),
                })
                .insert(Header {
                    key: "laminar.source.topic",
                    value: Some(r.topic.as_bytes()),
                })
                .insert(Header {
                    key: "laminar.source.partition",
                    value: Some(partition.as_bytes()),
                })
                .insert(Header {
                    key: "laminar.source.offset",
                    value: Some(offset.as_bytes()),
                });
            let record = base_record(
                &self.options.topic,
                r.key.as_deref(),
                &r.payload,
                Some(headers),
                None,
            );
            self.held.offer(&self.producer, record)?;
        }
        self.release_held()
    }

    fn backlog(&mut self) -> Result<usize, SinkError> {
        if self.held.records.is_empty() {
            return Ok(0);
        }
        self.check_failures()?;
        self.held.release(&self.producer, &self.options.topic)?;
        Ok(self.held.records.len())
    }

    fn flush(&mut self, timeout: Duration) -> Result<FlushOutcome, SinkError> {
        // rdkafka's flush sleeps up to 100 ms between looks at the queue, however soon
        // the acknowledgements come: in short steps the epoch closes when they are in.
        // Held records are handed on between the looks, as the queue makes room.
        let deadline = Instant::now() + timeout;
        let flushed = loop {
            self.held.release(&self.producer, &self.options.topic)?;
            let step = deadline
                .saturating_duration_since(Instant::now())
                .min(FLUSH_POLL);
            match self.producer.flush(step) {
                Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut))
                    if Instant::now() < deadline => {}
                Ok(()) if !self.held.records.is_empty() && Instant::now() < deadline => {}
                done => break done,
            }
        };
        self.check_failures()?;
        let pending = || FlushOutcome::Pending {
            in_flight: self.producer.in_flight_count().max(0) as usize + self.held.records.len(),
        };
        match flushed {
            Ok(()) if self.held.records.is_empty() => Ok(FlushOutcome::Done),
            Ok(()) | Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)) => Ok(pending()),
            Err(e) => Err(e.into()),
        }
    }
}
