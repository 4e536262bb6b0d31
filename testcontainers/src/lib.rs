//! Brokers for laminar's tests, and a real Kafka client to talk to them.
//!
//! - [`Broker::in_process`]: librdkafka's mock cluster inside the test process.
//! - [`Broker::laminar_process`]: `laminar broker` as a separate process, for tests where
//!   the broker must outlive (or start after) a laminar process.
//! - [`Broker::tansu`]: a tansu server (a separate Kafka-compatible broker) when `tansu` is
//!   on the PATH; `None` otherwise.
//!
//! - [`registry::SchemaRegistry`]: a schema registry speaking the Confluent REST API.
//!
//! Real Kafka or Redpanda containers need Docker, which these machines lack; every test
//! here speaks the Kafka protocol to a real broker implementation through librdkafka.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use laminar_connectors::kafka::broker::EmbeddedBroker;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message as _, Offset, TopicPartitionList};

pub mod registry;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// A running broker; stopped when dropped.
pub struct Broker {
    bootstrap: String,
    embedded: Option<EmbeddedBroker>,
    child: Option<Child>,
}

impl Broker {
    /// The mock cluster in this process.
    pub fn in_process() -> Result<Self, Error> {
        let embedded = EmbeddedBroker::start(1, None)?;
        Ok(Self {
            bootstrap: embedded.bootstrap_servers().to_owned(),
            embedded: Some(embedded),
            child: None,
        })
    }

    /// The mock cluster in this process, served through a relay on a free loopback port
    /// whose network can be cut with [`Broker::set_reachable`].
    pub fn in_process_with_relay() -> Result<Self, Error> {
        // A free port can be taken by someone else before the relay binds it: try again.
        let mut last_error: Option<Error> = None;
        for _ in 0..5 {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
            match EmbeddedBroker::start(1, Some(addr)) {
                Ok(embedded) => {
                    return Ok(Self {
                        bootstrap: embedded.bootstrap_servers().to_owned(),
                        embedded: Some(embedded),
                        child: None,
                    });
                }
                Err(e) => last_error = Some(e.into()),
            }
        }
        Err(last_error.unwrap_or_else(|| "no free port".into()))
    }

    /// Cuts or restores the network to an in-process broker started with a relay.
    pub fn set_reachable(&self, reachable: bool) {
        if let Some(e) = &self.embedded {
            e.set_reachable(reachable);
        }
    }

    /// `laminar broker` in its own process on `port` (0: any free port), with `topics`
    /// created at start as `(name, partitions)`.
    pub fn laminar_process(
        laminar: &Path,
        port: u16,
        topics: &[(&str, i32)],
    ) -> Result<Self, Error> {
        let mut command = Command::new(laminar);
        command.args(["broker", "--listen", &format!("127.0.0.1:{port}")]);
        for (name, partitions) in topics {
            command.args(["--topic", &format!("{name}:{partitions}")]);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let bootstrap = line.trim().to_owned();
        if bootstrap.is_empty() {
            let _ = child.kill();
            return Err("laminar broker printed no bootstrap address".into());
        }
        Ok(Self {
            bootstrap,
            embedded: None,
            child: Some(child),
        })
    }

    /// A tansu broker (in-memory storage) on a free port, if `tansu` is installed.
    pub fn tansu() -> Result<Option<Self>, Error> {
        if Command::new("tansu")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            return Ok(None);
        }
        let port = free_port()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new("tansu")
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let broker = Self {
            bootstrap: format!("127.0.0.1:{port}"),
            embedded: None,
            child: Some(child),
        };
        wait_for_port(port, Duration::from_secs(20))?;
        Ok(Some(broker))
    }

    #[must_use]
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Creates a topic: through the mock API in process, else by producing to it is not
    /// enough (partition count), so other brokers get topics at start or from tansu's
    /// auto-creation.
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), Error> {
        match &self.embedded {
            Some(e) => Ok(e.create_topic(name, partitions)?),
            None => Err("create topics of a separate broker when starting it".into()),
        }
    }

    /// Stops a separate broker process (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> Result<u16, Error> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_for_port(port: u16, timeout: Duration) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("nothing listens on port {port} after {timeout:?}").into())
}

/// Produces `(key, value)` records to `topic`, each to `partition` when given, and waits
/// for every acknowledgement.
pub fn produce(
    bootstrap: &str,
    topic: &str,
    records: &[(Option<i32>, Option<&str>, &str)],
) -> Result<(), Error> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()?;
    for (partition, key, value) in records {
        let mut record = BaseRecord::<str, str>::to(topic).payload(value);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = partition {
            record = record.partition(*p);
        }
        producer.send(record).map_err(|(e, _)| e)?;
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

/// A record to produce with every part a test may set.
#[derive(Debug, Clone, Default)]
pub struct Message {
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, String)>,
    /// Epoch milliseconds (absent: the producer's clock).
    pub timestamp: Option<i64>,
}

/// Produces `messages` to `topic` and waits for every acknowledgement.
pub fn produce_messages(bootstrap: &str, topic: &str, messages: &[Message]) -> Result<(), Error> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()?;
    for m in messages {
        let mut record = BaseRecord::<[u8], [u8]>::to(topic).payload(&m.value);
        if let Some(k) = &m.key {
            record = record.key(k);
        }
        if let Some(p) = m.partition {
            record = record.partition(p);
        }
        if let Some(t) = m.timestamp {
            record = record.timestamp(t);
        }
        if !m.headers.is_empty() {
            let headers =
                m.headers
                    .iter()
                    .fold(rdkafka::message::OwnedHeaders::new(), |h, (k, v)| {
                        h.insert(rdkafka::message::Header {
                            key: k,
                            value: Some(v.as_bytes()),
                        })
                    });
            record = record.headers(headers);
        }
        producer.send(record).map_err(|(e, _)| e)?;
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    /// The value as UTF-8 (lossy); `value_bytes` has it as it was.
    pub value: String,
    pub headers: Vec<(String, String)>,
    pub key_bytes: Option<Vec<u8>>,
    pub value_bytes: Vec<u8>,
    /// The record's timestamp, epoch milliseconds.
    pub timestamp: Option<i64>,
}

/// Reads `topic` from the beginning of every partition (`read_committed`) until `expected`
/// records arrived and then `quiet` passed with nothing new, or `timeout` passed.
pub fn consume(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    quiet: Duration,
    timeout: Duration,
) -> Result<Vec<Record>, Error> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "laminar-test-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = metadata
        .topics()
        .first()
        .map_or(0, |t| t.partitions().len());
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p as i32, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut records = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut last_new = Instant::now();
    while Instant::now() < deadline {
        if records.len() >= expected && last_new.elapsed() >= quiet {
            break;
        }
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                last_new = Instant::now();
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_owned(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                records.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    value: String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                    headers,
                    key_bytes: m.key().map(<[u8]>::to_vec),
                    value_bytes: m.payload().unwrap_or_default().to_vec(),
                    timestamp: m.timestamp().to_millis(),
                });
            }
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
    Ok(records)
}
