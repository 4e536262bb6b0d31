//! Shared client settings and the context that turns librdkafka's logs into `tracing`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;

/// How often the same kind of client error is logged at most.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The `kafka:` section of a pipeline file, shared by every Kafka source and sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaClientOptions {
    /// `host:port[,host:port...]` of the brokers.
    pub bootstrap_servers: String,
    /// Passed through to librdkafka as they are (`security.protocol`, `sasl.*`, ...); they
    /// override laminar's own defaults.
    pub properties: Vec<(String, String)>,
}

impl KafkaClientOptions {
    /// A librdkafka config with laminar's `defaults`, then the user's properties on top.
    #[must_use]
    pub fn config(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        for (k, v) in defaults {
            config.set(*k, *v);
        }
        for (k, v) in &self.properties {
            config.set(k, v);
        }
        config
    }
}

/// Logs librdkafka's messages and errors under the connector's name, rate limited.
pub struct LogContext {
    name: String,
    last_error: Mutex<Option<Instant>>,
    /// Each partition's high watermark, from librdkafka's statistics.
    high_watermarks: Mutex<std::collections::BTreeMap<(String, i32), i64>>,
}

impl LogContext {
    #[must_use]
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            last_error: Mutex::new(None),
            high_watermarks: Mutex::new(std::collections::BTreeMap::new()),
        }
    }

    /// The high watermark of `topic`'s `partition` at librdkafka's last statistics
    /// report (`statistics.interval.ms`).
    #[must_use]
    pub fn high_watermark(&self, topic: &str, partition: i32) -> Option<i64> {
        let marks = self.high_watermarks.lock().ok()?;
        marks.get(&(topic.to_owned(), partition)).copied()
    }

    /// True at most once per [`ERROR_LOG_INTERVAL`].
    pub fn should_log_error(&self) -> bool {
        let Ok(mut last) = self.last_error.lock() else {
            return true;
        };
        let now = Instant::now();
        match *last {
            Some(t) if now.duration_since(t) < ERROR_LOG_INTERVAL => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }
}

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        let name = &self.name;
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(connector = %name, "kafka {fac}: {log_message}");
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(connector = %name, "kafka {fac}: {log_message}");
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(connector = %name, "kafka {fac}: {log_message}");
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(connector = %name, "kafka {fac}: {log_message}");
            }
        }
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        let Ok(mut marks) = self.high_watermarks.lock() else {
            return;
        };
        for (topic, t) in statistics.topics {
            for (&partition, p) in &t.partitions {
                // Partition -1 is librdkafka's internal "unassigned" queue.
                if partition >= 0 && p.hi_offset >= 0 {
                    marks.insert((topic.clone(), partition), p.hi_offset);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if self.should_log_error() {
            tracing::warn!(
                connector = %self.name,
                "kafka client error (retrying in the background): {error}: {reason}"
            );
        }
    }
}

impl ConsumerContext for LogContext {
    fn post_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(connector = %self.name, partitions = tpl.count(), "partitions assigned");
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(connector = %self.name, partitions = tpl.count(), "partitions revoked");
            }
            Rebalance::Error(e) => tracing::warn!(connector = %self.name, "rebalance error: {e}"),
        }
    }
}

/// The partitions of `topic` in `metadata` (none when the topic is missing or in error).
#[must_use]
pub fn topic_partitions(metadata: &rdkafka::metadata::Metadata, topic: &str) -> Vec<i32> {
    metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| {
            t.partitions()
                .iter()
                .map(rdkafka::metadata::MetadataPartition::id)
        })
        .collect()
}
