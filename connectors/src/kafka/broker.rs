//! The embedded Kafka-protocol broker: librdkafka's mock cluster, for development, demos
//! and tests (`laminar broker`, `laminar run --embedded-broker`).
//!
//! It speaks the Kafka protocol (produce, fetch, consumer groups, committed offsets,
//! idempotent and transactional producers) but keeps data in memory, at most 5 MiB or
//! 100K batches per partition (older data is dropped), and it does not hide aborted
//! transactional records from `read_committed` readers. It is not a production broker.
//!
//! The mock brokers listen on ephemeral loopback ports. To serve a fixed address
//! (`--listen 127.0.0.1:9092`), each broker gets a loopback TCP relay on `port + i` and
//! advertises that address, so clients that follow metadata come back through the relay.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use rdkafka::client::{Client, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr, RDKafkaType};
use rdkafka_sys as rdsys;

/// Connections one relay serves at once; more are refused.
const RELAY_CONNECTIONS_MAX: usize = 256;
/// Partitions of a topic created for a pipeline on the embedded broker.
pub const DEFAULT_PARTITIONS: i32 = 4;

pub struct EmbeddedBroker {
    cluster: *mut rdsys::rd_kafka_mock_cluster_t,
    bootstrap: String,
    /// The relays serving a fixed `listen` address (empty without one).
    relays: Vec<Arc<Relay>>,
    /// Keeps the handle that owns the mock cluster alive; dropped after the cluster.
    _client: Client<DefaultClientContext>,
}

// SAFETY: the mock cluster runs on its own librdkafka thread; every rd_kafka_mock_* call
// used here either takes the cluster lock or posts an op to that thread, so the handle
// may be used from any thread.
unsafe impl Send for EmbeddedBroker {}
// SAFETY: as above; no method takes `&mut self` state outside librdkafka's locking.
unsafe impl Sync for EmbeddedBroker {}

impl EmbeddedBroker {
    /// Starts `brokers` mock brokers on ephemeral loopback ports. With `listen`, also
    /// serves them on `listen`, `listen + 1`, ... through relays.
    pub fn start(brokers: i32, listen: Option<SocketAddr>) -> KafkaResult<Self> {
        Self::start_advertising(brokers, listen, None)
    }

    /// As [`EmbeddedBroker::start`], but with `listen`, the brokers tell clients to
    /// connect to `advertise` (`(host, port)`; broker i at `port + i`) instead: the
    /// address of a proxy in front of the relays (a TLS terminator, a port mapping).
    pub fn start_advertising(
        brokers: i32,
        listen: Option<SocketAddr>,
        advertise: Option<(&str, u16)>,
    ) -> KafkaResult<Self> {
        let config = ClientConfig::new();
        let native = config.create_native_config()?;
        let client = Client::new(
            &config,
            native,
            RDKafkaType::RD_KAFKA_PRODUCER,
            DefaultClientContext,
        )?;
        // SAFETY: `client` is a live handle and outlives the cluster (see Drop).
        let cluster = unsafe { rdsys::rd_kafka_mock_cluster_new(client.native_ptr(), brokers) };
        if cluster.is_null() {
            return Err(KafkaError::MockCluster(RDKafkaErrorCode::Fail));
        }
        // Consumers join a group at once instead of after the default 3 s delay.
        // SAFETY: `cluster` is non-null and live.
        unsafe { rdsys::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, 0) };
        // SAFETY: the cluster returns a NUL-terminated string it owns while it lives.
        let own = unsafe { CStr::from_ptr(rdsys::rd_kafka_mock_cluster_bootstraps(cluster)) }
            .to_string_lossy()
            .into_owned();
        let mut broker = Self {
            cluster,
            bootstrap: own.clone(),
            relays: Vec::new(),
            _client: client,
        };
        if let Some(listen) = listen.filter(|l| l.port() != 0) {
            let targets: Vec<&str> = own.split(',').collect();
            let mut advertised = Vec::new();
            for (i, target) in targets.iter().enumerate() {
                let addr = SocketAddr::new(listen.ip(), listen.port() + i as u16);
                let relay = start_relay(addr, (*target).to_owned())
                    .map_err(|_| KafkaError::MockCluster(RDKafkaErrorCode::Fail))?;
                broker.relays.push(relay);
                let (host, port) = match &advertise {
                    Some((host, port)) => ((*host).to_owned(), port + i as u16),
                    None => (addr.ip().to_string(), addr.port()),
                };
                let c_host = CString::new(host.as_str())
                    .map_err(|_| KafkaError::MockCluster(RDKafkaErrorCode::InvalidArgument))?;
                // SAFETY: cluster live, host a valid C string; broker ids start at 1.
                unsafe {
                    rdsys::rd_kafka_mock_broker_set_host_port(
                        cluster,
                        i as i32 + 1,
                        c_host.as_ptr(),
                        i32::from(port),
                    );
                };
                advertised.push(format!("{host}:{port}"));
            }
            broker.bootstrap = advertised.join(",");
        }
        Ok(broker)
    }

    /// The address clients should use as `bootstrap.servers`.
    #[must_use]
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Cuts (`false`) or restores (`true`) the network between clients and the brokers:
    /// open connections are closed and new ones refused while cut. Only brokers started
    /// with a `listen` address have relays to cut; this is for failure tests.
    pub fn set_reachable(&self, reachable: bool) {
        for relay in &self.relays {
            relay.set_reachable(reachable);
        }
    }

    /// Answers the next `errors.len()` requests of Kafka API `api_key` (0: Produce,
    /// 26: `EndTxn`, ...) with these errors, one each, whichever client sends them; for
    /// failure tests.
    pub fn push_request_errors(&self, api_key: i16, errors: &[RDKafkaRespErr]) {
        // SAFETY: cluster live; the array is read during the call only.
        unsafe {
            rdsys::rd_kafka_mock_push_request_errors_array(
                self.cluster,
                api_key,
                errors.len(),
                errors.as_ptr(),
            );
        }
    }

    /// Creates a topic (the mock cluster has no `CreateTopics` request). Creating a topic
    /// that exists is not an error.
    pub fn create_topic(&self, topic: &str, partitions: i32) -> KafkaResult<()> {
        let name = CString::new(topic)
            .map_err(|_| KafkaError::MockCluster(RDKafkaErrorCode::InvalidArgument))?;
        // SAFETY: cluster live, name a valid C string.
        let err = unsafe {
            rdsys::rd_kafka_mock_topic_create(self.cluster, name.as_ptr(), partitions, 1)
        };
        let code: RDKafkaErrorCode = err.into();
        match code {
            RDKafkaErrorCode::NoError | RDKafkaErrorCode::TopicAlreadyExists => Ok(()),
            e => Err(KafkaError::MockCluster(e)),
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        // SAFETY: created by rd_kafka_mock_cluster_new and destroyed once, before `_client`.
        unsafe { rdsys::rd_kafka_mock_cluster_destroy(self.cluster) };
    }
}

/// One relay's switch and open connections (at most [`RELAY_CONNECTIONS_MAX`]).
#[derive(Default)]
struct Relay {
    unreachable: AtomicBool,
    next_id: AtomicUsize,
    open: Mutex<HashMap<usize, (TcpStream, TcpStream)>>,
}

impl Relay {
    fn close(&self, id: usize) {
        let removed = self.open.lock().ok().and_then(|mut open| open.remove(&id));
        if let Some((a, b)) = removed {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    fn set_reachable(&self, reachable: bool) {
        self.unreachable.store(!reachable, Ordering::SeqCst);
        if !reachable {
            let ids: Vec<usize> = self
                .open
                .lock()
                .map(|o| o.keys().copied().collect())
                .unwrap_or_default();
            for id in ids {
                self.close(id);
            }
        }
    }
}

/// Accepts on `addr` and pipes each connection to `target`, both ways.
fn start_relay(addr: SocketAddr, target: String) -> io::Result<Arc<Relay>> {
    let listener = TcpListener::bind(addr)?;
    let relay = Arc::new(Relay::default());
    let state = relay.clone();
    thread::Builder::new()
        .name(format!("relay-{}", addr.port()))
        .spawn(move || {
            for client in listener.incoming().flatten() {
                let full = state
                    .open
                    .lock()
                    .map_or(true, |o| o.len() >= RELAY_CONNECTIONS_MAX);
                if full || state.unreachable.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let id = state.next_id.fetch_add(1, Ordering::Relaxed);
                let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                if let Ok(mut open) = state.open.lock() {
                    open.insert(id, (c, s));
                }
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    let state = state.clone();
                    let _ = thread::Builder::new()
                        .name("relay-pipe".into())
                        .spawn(move || {
                            pipe(from, to);
                            state.close(id);
                        });
                }
            }
        })?;
    Ok(relay)
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0_u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
