//! Output topics at start: each one a sink, dead-letter or late-data topic writes to must
//! exist, or be created. A producer writing to a topic that does not exist would retry
//! forever (`message.timeout.ms = 0`): a missing topic is found before anything is read.
//!
//! A missing topic is created with `kafka.create_topics` (partitions, replication) when
//! it is set; otherwise the broker is asked the way a producer asks, which creates it
//! where the broker auto-creates topics. Still missing: a clear error. A broker that does
//! not answer within [`CHECK_TIMEOUT`] is not an error here: the producers retry, and
//! the check is skipped with a warning.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::types::RDKafkaErrorCode;

use super::client::{KafkaClientOptions, LogContext, create};

/// How long the metadata of the output topics may take before the check is skipped.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long topic creation may take.
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);

/// `kafka.create_topics`: how laminar creates a missing output topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewTopicSpec {
    pub partitions: i32,
    /// -1: the broker's default replication factor.
    pub replication_factor: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error(
        "output topic `{topic}` does not exist, and the broker did not create it: create it, or let laminar create it with `kafka.create_topics: {{ partitions: N }}`"
    )]
    Missing { topic: String },
    #[error("cannot create topic `{topic}`: {message}")]
    Create { topic: String, message: String },
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// Which of `topics` the broker says do not exist; `None` when it did not answer.
fn missing(
    client: &KafkaClientOptions,
    topics: &[String],
) -> Result<Option<Vec<String>>, TopicError> {
    // A consumer's metadata request does not auto-create topics.
    let consumer: BaseConsumer<LogContext> = create(
        &client.config(&[("allow.auto.create.topics", "false")]),
        client.log_context("output topics"),
    )?;
    let deadline = std::time::Instant::now() + CHECK_TIMEOUT;
    let mut out = Vec::new();
    let mut warned = false;
    for topic in topics {
        loop {
            match consumer.fetch_metadata(Some(topic), Duration::from_secs(1)) {
                Ok(m) => {
                    let known = m.topics().iter().any(|t| {
                        t.name() == topic && t.error().is_none() && !t.partitions().is_empty()
                    });
                    if !known {
                        out.push(topic.clone());
                    }
                    break;
                }
                Err(e) if std::time::Instant::now() < deadline => {
                    if !warned {
                        tracing::warn!(
                            "cannot reach the broker to check the output topics (retrying for up to {CHECK_TIMEOUT:?}): {e}"
                        );
                        warned = true;
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        "cannot check that output topic {topic} exists; going on (the producers retry until the broker answers): {e}"
                    );
                    return Ok(None);
                }
            }
        }
    }
    Ok(Some(out))
}

/// Makes sure every topic of `topics` exists (see the module docs); returns those it
/// created.
pub fn ensure_topics(
    client: &KafkaClientOptions,
    topics: &[String],
    new_topics: Option<NewTopicSpec>,
) -> Result<Vec<String>, TopicError> {
    let Some(missing) = missing(client, topics)? else {
        return Ok(Vec::new());
    };
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let Some(spec) = new_topics else {
        return auto_create(client, &missing).map(|()| Vec::new());
    };
    let admin: AdminClient<LogContext> =
        create(&client.config(&[]), client.log_context("output topics"))?;
    let new: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|t| {
            NewTopic::new(
                t,
                spec.partitions,
                TopicReplication::Fixed(spec.replication_factor),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(CREATE_TIMEOUT));
    let results = futures::executor::block_on(admin.create_topics(&new, &options))?;
    for result in results {
        match result {
            Ok(topic) => {
                tracing::info!(topic, partitions = spec.partitions, "created output topic");
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(TopicError::Create {
                    topic,
                    message: code.to_string(),
                });
            }
        }
    }
    Ok(missing)
}

/// Asks for `missing` topics as a producer asks, which makes a broker that auto-creates
/// topics create them; an error naming the first that is still missing after that.
fn auto_create(client: &KafkaClientOptions, missing: &[String]) -> Result<(), TopicError> {
    let producer: BaseProducer<LogContext> = create(
        &client.config(&[("allow.auto.create.topics", "true")]),
        client.log_context("output topics"),
    )?;
    for topic in missing {
        let _ = producer.client().fetch_metadata(Some(topic), CHECK_TIMEOUT);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let Some(still) = self::missing(client, missing)? else {
            return Ok(());
        };
        match still.first() {
            None => return Ok(()),
            Some(topic) if std::time::Instant::now() > deadline => {
                return Err(TopicError::Missing {
                    topic: topic.clone(),
                });
            }
            Some(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
