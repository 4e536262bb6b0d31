//! Kafka: a source that reads every partition of a topic, a producer sink (also used for dead letters), and the
//! embedded Kafka-protocol broker for development and tests.
//!
//! Both ends talk to any broker that speaks the Kafka protocol through librdkafka. The
//! consumer never auto-commits: positions are committed by the engine once the sinks have
//! acknowledged everything derived from them. The producer is idempotent and retries
//! without a deadline (`message.timeout.ms = 0`), so a broker that is away for a while
//! delays the pipeline (backpressure through the bounded producer queue) and loses
//! nothing; a permanent delivery error stops the pipeline before any offset is committed.

pub mod admin;
pub mod broker;
mod client;
mod sink;
mod slots;
mod source;

pub use client::{KafkaClientOptions, LogContext, is_secret_property};
pub use sink::{
    EPOCH_HEADER, ExactlyOnce, KafkaSink, KafkaSinkOptions, KeyEncoding, LINGER_MS, OutputRecord,
    SEQ_HEADER, SINK_HEADER, ValueEncoding,
};
pub use slots::Topics;
pub use source::{
    FETCH_QUEUE_BACKOFF_MS, KafkaSource, KafkaSourceOptions, MetadataColumns, MissingTopic,
    StartFrom, source_columns,
};
