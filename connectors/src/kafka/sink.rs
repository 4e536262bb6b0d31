//! The Kafka sink: JSON values, optional keys from columns; also the dead-letter writer.
//!
//! `write` enqueues into librdkafka's bounded queue (waiting while it is full: that is
//! backpressure), `flush` waits for every acknowledgement. Delivery errors are remembered
//! by the delivery callback and surface at the next `write` or `flush`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;

use super::client::{KafkaClientOptions, LogContext};
use crate::format::json::{JsonEncoder, write_cell_text};
use crate::{FlushOutcome, Rejected, Sink, SinkError};

/// How long `write` waits for room in a full producer queue before logging that it is
/// still waiting (it never gives up: the queue drains when the broker is back).
const QUEUE_FULL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A `connector: kafka` sink, or a source's dead-letter topic.
#[derive(Debug, Clone)]
pub struct KafkaSinkOptions {
    /// The sink's name in the pipeline (logs, metrics).
    pub name: String,
    pub client: KafkaClientOptions,
    pub topic: String,
    /// Column indices whose values form the message key (empty: no key).
    pub key_columns: Vec<usize>,
}

/// Counts acknowledgements and keeps the first delivery error.
pub struct DeliveryContext {
    log: LogContext,
    acked: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
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
            Ok(_) => {
                self.acked.fetch_add(1, Ordering::Relaxed);
            }
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
}

impl KafkaSink {
    pub fn new(options: KafkaSinkOptions) -> Result<Self, SinkError> {
        let config = options.client.config(&[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            // Retry without a deadline: an unreachable broker delays, it never drops.
            ("message.timeout.ms", "0"),
            ("linger.ms", "5"),
            // The bounded producer queue: `write` waits when it is full.
            ("queue.buffering.max.messages", "100000"),
            ("queue.buffering.max.kbytes", "65536"),
        ]);
        let context = DeliveryContext {
            log: LogContext::new(&options.name),
            acked: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            first_error: Mutex::new(None),
        };
        let producer = config.create_with_context(context)?;
        Ok(Self {
            options,
            producer,
            encoder: JsonEncoder::default(),
            values: Vec::new(),
            value_ends: Vec::new(),
            keys: Vec::new(),
            key_ends: Vec::new(),
        })
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

    fn send(
        &self,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
    ) -> Result<(), SinkError> {
        let mut record = BaseRecord::to(&self.options.topic).payload(payload);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(h) = headers {
            record = record.headers(h);
        }
        let mut waiting_since: Option<Instant> = None;
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    self.check_failures()?;
                    let since = *waiting_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > QUEUE_FULL_LOG_INTERVAL {
                        tracing::warn!(sink = %self.options.name, topic = %self.options.topic,
                            "producer queue full for {:?}: broker slow or unreachable; waiting",
                            since.elapsed());
                        waiting_since = Some(Instant::now());
                    }
                    thread::sleep(Duration::from_millis(2));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
}

impl KafkaSink {
    /// Writes rows as JSON values, each with the same `headers` (`key`, `value`).
    pub fn write_with_headers(
        &mut self,
        batch: &RecordBatch,
        headers: &[(&str, &str)],
    ) -> Result<(), SinkError> {
        self.check_failures()?;
        self.values.clear();
        self.value_ends.clear();
        self.encoder
            .encode(batch, None, &mut self.values, &mut self.value_ends)
            .map_err(SinkError::Encode)?;
        self.keys.clear();
        self.key_ends.clear();
        match self.options.key_columns.as_slice() {
            [] => {}
            [one] => {
                let column = batch.column(*one);
                for row in 0..batch.num_rows() {
                    write_cell_text(column.as_ref(), row, &mut self.keys)
                        .map_err(SinkError::Encode)?;
                    self.key_ends.push(self.keys.len());
                }
            }
            several => {
                let several = several.to_vec();
                self.encoder
                    .encode(batch, Some(&several), &mut self.keys, &mut self.key_ends)
                    .map_err(SinkError::Encode)?;
            }
        }
        let mut start = 0;
        let mut key_start = 0;
        for row in 0..batch.num_rows() {
            let end = self.value_ends[row];
            let key = self.key_ends.get(row).map(|&key_end| {
                let k = &self.keys[key_start..key_end];
                key_start = key_end;
                k
            });
            let owned = (!headers.is_empty()).then(|| {
                headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
                    h.insert(Header {
                        key: k,
                        value: Some(v.as_bytes()),
                    })
                })
            });
            self.send(key, &self.values[start..end], owned)?;
            start = end;
        }
        Ok(())
    }
}

impl Sink for KafkaSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        self.write_with_headers(batch, &[])
    }

    fn write_rejected(&mut self, rejected: &[Rejected]) -> Result<(), SinkError> {
        self.check_failures()?;
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
            self.send(r.key.as_deref(), &r.payload, Some(headers))?;
        }
        Ok(())
    }

    fn flush(&mut self, timeout: Duration) -> Result<FlushOutcome, SinkError> {
        let flushed = self.producer.flush(timeout);
        self.check_failures()?;
        match flushed {
            Ok(()) => Ok(FlushOutcome::Done),
            Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)) => {
                Ok(FlushOutcome::Pending {
                    in_flight: self.producer.in_flight_count().max(0) as usize,
                })
            }
            Err(e) => Err(e.into()),
        }
    }
}
