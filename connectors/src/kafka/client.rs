//! Shared client settings and the context that turns librdkafka's logs into `tracing`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;

/// How often the same kind of client error is logged at most.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// librdkafka properties whose values are secrets: never printed, and scrubbed from
/// librdkafka's own log lines.
pub const SECRET_PROPERTIES: &[&str] = &[
    "sasl.password",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.config",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl.keystore.password",
    "ssl.truststore.password",
];

/// What a secret is printed as.
pub const REDACTED: &str = "[redacted]";

/// The `kafka:` section of a pipeline file, shared by every Kafka source and sink.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaClientOptions {
    /// `host:port[,host:port...]` of the brokers.
    pub bootstrap_servers: String,
    /// Passed through to librdkafka as they are (`security.protocol`, `sasl.*`, ...); they
    /// override laminar's own defaults.
    pub properties: Vec<(String, String)>,
}

/// Whether a librdkafka property holds a secret.
#[must_use]
pub fn is_secret_property(name: &str) -> bool {
    SECRET_PROPERTIES.contains(&name)
}

impl std::fmt::Debug for KafkaClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaClientOptions")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("properties", &self.shown_properties())
            .finish()
    }
}

impl KafkaClientOptions {
    /// The properties as they may be printed: secret values replaced by [`REDACTED`].
    #[must_use]
    pub fn shown_properties(&self) -> Vec<(&str, &str)> {
        self.properties
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_property(k) {
                    REDACTED
                } else {
                    v.as_str()
                };
                (k.as_str(), v)
            })
            .collect()
    }

    /// The context a client named `name` logs through: librdkafka's lines under that
    /// name, with these options' secret values scrubbed from them.
    #[must_use]
    pub fn log_context(&self, name: &str) -> LogContext {
        LogContext::new(name).with_secrets(self.secret_values())
    }

    /// The values of secret properties, to scrub from log lines.
    #[must_use]
    pub fn secret_values(&self) -> Vec<String> {
        self.properties
            .iter()
            .filter(|(k, v)| is_secret_property(k) && !v.is_empty())
            .map(|(_, v)| v.clone())
            .collect()
    }

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

/// Every laminar client is made here: from `config` (see [`KafkaClientOptions::config`]),
/// logging through `context`, and a configuration error does not quote the property
/// value: a misspelt secret property (`sasl.passwrod: ${PASSWORD}`) is not known to be
/// secret, and the key and librdkafka's description say enough.
pub fn create<C, X>(config: &ClientConfig, context: X) -> Result<C, KafkaError>
where
    X: ClientContext,
    C: rdkafka::config::FromClientConfigAndContext<X>,
{
    config
        .create_with_context(context)
        .map_err(|error| match error {
            KafkaError::ClientConfig(code, desc, key, _) => {
                KafkaError::ClientConfig(code, desc, key, REDACTED.to_owned())
            }
            other => other,
        })
}

/// Logs librdkafka's messages and errors under the connector's name, rate limited.
pub struct LogContext {
    name: String,
    /// Values that must not appear in a log line (secret properties).
    secrets: Vec<String>,
    last_error: Mutex<Option<Instant>>,
    /// Each partition's high watermark, from librdkafka's statistics.
    high_watermarks: Mutex<std::collections::BTreeMap<(String, i32), i64>>,
}

impl LogContext {
    #[must_use]
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            secrets: Vec::new(),
            last_error: Mutex::new(None),
            high_watermarks: Mutex::new(std::collections::BTreeMap::new()),
        }
    }

    /// Scrubs these values from every librdkafka message logged.
    #[must_use]
    pub fn with_secrets(mut self, secrets: Vec<String>) -> Self {
        self.secrets = secrets;
        self
    }

    /// `text` with every secret value replaced.
    fn scrub<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        let mut out = std::borrow::Cow::Borrowed(text);
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = std::borrow::Cow::Owned(out.replace(s.as_str(), REDACTED));
            }
        }
        out
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
        let log_message = self.scrub(log_message);
        // laminar sets it on purpose (exactly-once sinks without transactions): the
        // warning that it is experimental is no news to the user.
        let level = if fac == "CONFWARN" && log_message.contains("enable.gapless.guarantee") {
            RDKafkaLogLevel::Debug
        } else {
            level
        };
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
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::Authentication) {
            // Retried by librdkafka like any connection error, but a wrong setting, not
            // a broker away: said as such, every time.
            tracing::error!(
                connector = %self.name,
                "the broker refused laminar's credentials (check security.protocol, sasl.mechanism, sasl.username and the password): {}",
                self.scrub(reason)
            );
            return;
        }
        if self.should_log_error() {
            let text = format!("{error}: {reason}");
            tracing::warn!(
                connector = %self.name,
                "kafka client error (retrying in the background): {}",
                self.scrub(&text)
            );
        }
    }
}

/// For producers that only ask for metadata (the output topic check).
impl rdkafka::producer::ProducerContext for LogContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, (): ()) {}
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
