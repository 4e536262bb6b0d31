//! Brokers for laminar's tests, and a real Kafka client to talk to them.
//!
//! - [`Broker::in_process`]: librdkafka's mock cluster inside the test process.
//! - [`Broker::laminar_process`]: `laminar broker` as a separate process, for tests where
//!   the broker must outlive (or start after) a laminar process.
//! - [`Broker::tansu`]: a tansu server (a separate Kafka-compatible broker) when `tansu` is
//!   on the PATH; `None` otherwise.
//!
//! - [`registry::SchemaRegistry`]: a schema registry speaking the Confluent REST API.
//! - [`tls::TlsFront`]: TLS (stunnel, with certificates from openssl) in front of a broker.
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
pub mod tls;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// A running broker; stopped when dropped.
pub struct Broker {
    bootstrap: String,
    embedded: Option<EmbeddedBroker>,
    child: Option<Child>,
    /// A directory the broker keeps its data in, removed on drop.
    dir: Option<std::path::PathBuf>,
}

impl Broker {
    /// The mock cluster in this process.
    pub fn in_process() -> Result<Self, Error> {
        let embedded = EmbeddedBroker::start(1, None)?;
        Ok(Self {
            bootstrap: embedded.bootstrap_servers().to_owned(),
            embedded: Some(embedded),
            child: None,
            dir: None,
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
                        dir: None,
                    });
                }
                Err(e) => last_error = Some(e.into()),
            }
        }
        Err(last_error.unwrap_or_else(|| "no free port".into()))
    }

    /// Answers the next `errors.len()` requests of Kafka API `api_key` (0: Produce) with
    /// these errors (the in-process mock cluster only; elsewhere this does nothing).
    pub fn push_request_errors(&self, api_key: i16, errors: &[rdkafka::types::RDKafkaRespErr]) {
        if let Some(e) = &self.embedded {
            e.push_request_errors(api_key, errors);
        }
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
        Self::laminar_process_advertising(laminar, port, None, topics)
    }

    /// [`Broker::laminar_process`] telling clients to connect to `advertise` (a proxy
    /// in front of `port`) instead.
    pub fn laminar_process_advertising(
        laminar: &Path,
        port: u16,
        advertise: Option<&str>,
        topics: &[(&str, i32)],
    ) -> Result<Self, Error> {
        let mut command = Command::new(laminar);
        command.args(["broker", "--listen", &format!("127.0.0.1:{port}")]);
        if let Some(a) = advertise {
            command.args(["--advertise", a]);
        }
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
            dir: None,
        })
    }

    /// A tansu broker (in-memory storage) on a free port, if tansu is installed (see
    /// [`tansu_binary`]).
    pub fn tansu() -> Result<Option<Self>, Error> {
        let Some(bin) = tansu_binary()? else {
            return Ok(None);
        };
        let port = free_port()?;
        let child = spawn_tansu(&bin, port, "memory://tansu/", false, None)?;
        let broker = Self {
            bootstrap: format!("127.0.0.1:{port}"),
            embedded: None,
            child: Some(child),
            dir: None,
        };
        wait_for_port(port, Duration::from_secs(20))?;
        Ok(Some(broker))
    }

    /// A tansu broker that requires SASL/SCRAM (SHA-256 or SHA-512) from every client,
    /// with `users` (`(name, password)`) and `topics` (`(name, partitions)`) made before
    /// it starts to require it; storage in an `SQLite` file under a temporary directory.
    pub fn tansu_with_users(
        users: &[(&str, &str)],
        topics: &[(&str, i32)],
    ) -> Result<Option<Self>, Error> {
        let Some(bin) = tansu_binary()? else {
            return Ok(None);
        };
        let dir = temp_dir("tansu")?;
        std::fs::create_dir_all(dir.join("db"))?;
        // tansu reads an SQLite URL's host and path relative to its working directory.
        let storage = "sqlite://db/tansu.db";
        let port = free_port()?;
        let mut open = Self {
            bootstrap: format!("127.0.0.1:{port}"),
            embedded: None,
            child: Some(spawn_tansu(&bin, port, storage, false, Some(&dir))?),
            dir: Some(dir.clone()),
        };
        wait_for_port(port, Duration::from_secs(20))?;
        for (name, password) in users {
            for mechanism in ["scram256", "scram512"] {
                let status = Command::new(&bin)
                    .args([
                        "user",
                        "create",
                        "--broker",
                        &format!("tcp://127.0.0.1:{port}"),
                    ])
                    .args(["--mechanism", mechanism, name, password])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()?;
                if !status.success() {
                    return Err(
                        format!("tansu user create {name} ({mechanism}) failed: {status}").into(),
                    );
                }
            }
        }
        for (name, partitions) in topics {
            open.create_topic(name, *partitions)?;
        }
        // The same storage, now requiring authentication.
        open.kill();
        open.child = Some(spawn_tansu(&bin, port, storage, true, Some(&dir))?);
        wait_for_port(port, Duration::from_secs(20))?;
        Ok(Some(open))
    }

    #[must_use]
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Creates a topic: through the mock API in process; on a separate broker with the
    /// Kafka protocol's `CreateTopics` (tansu has it; `laminar broker` takes topics at
    /// start instead).
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), Error> {
        if let Some(e) = &self.embedded {
            return Ok(e.create_topic(name, partitions)?);
        }
        let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
            ClientConfig::new()
                .set("bootstrap.servers", &self.bootstrap)
                .create()?;
        let topic = rdkafka::admin::NewTopic::new(
            name,
            partitions,
            rdkafka::admin::TopicReplication::Fixed(1),
        );
        let options =
            rdkafka::admin::AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
        for result in futures::executor::block_on(admin.create_topics([&topic], &options))? {
            result.map_err(|(t, code)| format!("create topic {t}: {code}"))?;
        }
        Ok(())
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
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The tansu binary: `LAMINAR_TANSU`, else `tansu` on the PATH. `None` when neither
/// runs, unless `LAMINAR_REQUIRE_TANSU` is set (the test command installs tansu and sets
/// it, so that a missing tansu fails the tests instead of skipping them).
pub fn tansu_binary() -> Result<Option<std::path::PathBuf>, Error> {
    let bin =
        std::env::var_os("LAMINAR_TANSU").map_or_else(|| "tansu".into(), std::path::PathBuf::from);
    let runs = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    match (runs, std::env::var_os("LAMINAR_REQUIRE_TANSU")) {
        (true, _) => Ok(Some(bin)),
        (false, None) => Ok(None),
        (false, Some(_)) => Err(format!(
            "LAMINAR_REQUIRE_TANSU is set but {} does not run",
            bin.display()
        )
        .into()),
    }
}

fn spawn_tansu(
    bin: &Path,
    port: u16,
    storage: &str,
    authentication: bool,
    dir: Option<&Path>,
) -> Result<Child, Error> {
    let url = format!("tcp://127.0.0.1:{port}");
    let mut command = Command::new(bin);
    command.args([
        "broker",
        "--listener-url",
        &url,
        "--advertised-listener-url",
        &url,
        "--storage-engine",
        storage,
    ]);
    if authentication {
        command.arg("--authentication");
    }
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    Ok(command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

/// A new directory under the system's temporary one (the caller removes it).
pub(crate) fn temp_dir(tag: &str) -> Result<std::path::PathBuf, Error> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "laminar-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A port nothing listens on right now.
pub fn free_port() -> Result<u16, Error> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn wait_for_port(port: u16, timeout: Duration) -> Result<(), Error> {
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
    produce_messages_with(bootstrap, &[], topic, messages)
}

/// [`produce_messages`] with librdkafka `properties` (SASL settings, say).
pub fn produce_messages_with(
    bootstrap: &str,
    properties: &[(&str, &str)],
    topic: &str,
    messages: &[Message],
) -> Result<(), Error> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true");
    for (k, v) in properties {
        config.set(*k, *v);
    }
    let producer: BaseProducer = config.create()?;
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

impl Record {
    /// The value of the (first) header named `key`.
    #[must_use]
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
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
    consume_with(bootstrap, &[], topic, expected, quiet, timeout)
}

/// [`consume`] with librdkafka `properties` (SASL settings, say).
pub fn consume_with(
    bootstrap: &str,
    properties: &[(&str, &str)],
    topic: &str,
    expected: usize,
    quiet: Duration,
    timeout: Duration,
) -> Result<Vec<Record>, Error> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "laminar-test-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed");
    for (k, v) in properties {
        config.set(*k, *v);
    }
    let consumer: BaseConsumer = config.create()?;
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
