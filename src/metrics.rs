//! Prometheus metrics and the HTTP endpoint that serves them with `/health` and `/ready`.
//!
//! Names follow `laminar_<subsystem>_<thing>_<unit>`, counters end in `_total`, and every
//! label has bounded cardinality (pipeline, source, sink, query: names from the file).
//! The pipeline thread updates metric handles it resolved once at build time, so the hot
//! path does no label lookups. The server is one thread that answers one request at a
//! time, with read and write timeouts: a slow scraper cannot hold it for long, and it
//! never touches the pipeline thread.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Counter, CounterVec, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec,
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::durability::DurableStats;

/// How long the server waits on one scraper's request or response.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head the server reads (request line and headers).
const REQUEST_HEAD_BYTES_MAX: usize = 8192;

/// Every metric laminar exports.
pub struct Metrics {
    registry: Registry,
    source_records: IntCounterVec,
    source_decode_errors: IntCounterVec,
    source_dead_lettered: IntCounterVec,
    source_watermark: GaugeVec,
    source_watermark_lag: GaugeVec,
    source_alignment_pauses: IntCounterVec,
    source_backpressure: CounterVec,
    partition_records: IntCounterVec,
    partition_bytes: IntCounterVec,
    partition_lag: IntGaugeVec,
    sink_transactions: IntCounterVec,
    sink_transaction_aborts: IntCounterVec,
    sink_records: IntCounterVec,
    sink_held: IntGaugeVec,
    query_late_records: IntCounterVec,
    query_state_keys: IntGaugeVec,
    query_state_bytes: IntGaugeVec,
    query_windows_open: IntGaugeVec,
    query_windows_closed: IntCounterVec,
    reactor_busy: GaugeVec,
    reactor_ring: IntGaugeVec,
    state_store_bytes: IntGauge,
    state_store_keys: IntGauge,
    state_arena_bytes: IntGauge,
    state_arena_dead_ratio: Gauge,
    epochs: IntCounter,
    last_epoch: IntGauge,
    process_resident_memory: Gauge,
    wal_appends: IntCounter,
    wal_bytes: IntCounter,
    wal_fdatasync: Histogram,
    checkpoints: IntCounter,
    checkpoint_duration: Histogram,
    checkpoint_failures: IntCounter,
    checkpoint_size: IntGauge,
    checkpoint_last_epoch: IntGauge,
    recovery_duration: Gauge,
    pipeline: String,
    /// Recovered, partitions assigned, consuming: what `/ready` reports.
    ready: AtomicBool,
}

/// Handles for one source, resolved once.
#[derive(Clone)]
pub struct SourceMetrics {
    pub records: IntCounter,
    pub decode_errors: IntCounter,
    pub dead_lettered: IntCounter,
    pub watermark_seconds: Gauge,
    pub watermark_lag_seconds: Gauge,
    pub alignment_pauses: IntCounter,
    /// Seconds the source was not read because a sink it feeds held records back.
    pub backpressure_seconds: Counter,
}

/// Handles for one query, resolved once.
#[derive(Clone)]
pub struct QueryMetrics {
    pub late_records: IntCounter,
    pub state_keys: IntGauge,
    pub state_bytes: IntGauge,
    pub windows_open: IntGauge,
    pub windows_closed: IntCounter,
}

/// The state store, sampled when an epoch closes.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreSample {
    pub live_bytes: u64,
    pub keys: u64,
    pub arena_bytes: u64,
    pub dead_ratio: f64,
}

/// Registers `metric` (a bug if its name or labels are invalid or taken).
fn register<M: Collector + Clone + 'static>(
    registry: &Registry,
    name: &str,
    metric: prometheus::Result<M>,
) -> M {
    let metric = metric.unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    metric
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        name,
        IntCounterVec::new(Opts::new(name, help), labels),
    )
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    register(registry, name, GaugeVec::new(Opts::new(name, help), labels))
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> HistogramVec {
    register(
        registry,
        name,
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets),
            &["pipeline"],
        ),
    )
}

fn int_gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        registry,
        name,
        IntGaugeVec::new(Opts::new(name, help), labels),
    )
}

/// A sink's Kafka transactions.
pub struct TransactionCounters {
    pub committed: IntCounter,
    pub aborted: IntCounter,
}

impl Metrics {
    #[must_use]
    pub fn new(pipeline: &str) -> Arc<Self> {
        let registry = Registry::new();
        let r = &registry;
        let source = &["pipeline", "source"];
        let query = &["pipeline", "query"];
        let epochs_vec = counter(
            r,
            "laminar_pipeline_epochs_total",
            "Epochs closed (sinks flushed, offsets committed).",
            &["pipeline"],
        );
        let last_epoch_vec = int_gauge(
            r,
            "laminar_pipeline_last_epoch",
            "Number of the last epoch closed.",
            &["pipeline"],
        );
        let memory_vec = gauge(
            r,
            "laminar_process_resident_memory_bytes",
            "Resident memory of the process.",
            &["pipeline"],
        );
        let p = &["pipeline"];
        let one = [pipeline];
        let wal_appends = counter(
            r,
            "laminar_wal_appends_total",
            "Records appended to the write-ahead log.",
            p,
        )
        .with_label_values(&one);
        let wal_bytes = counter(
            r,
            "laminar_wal_bytes_total",
            "Bytes appended to the write-ahead log.",
            p,
        )
        .with_label_values(&one);
        let wal_fdatasync = histogram(
            r,
            "laminar_wal_fdatasync_seconds",
            "Duration of the write-ahead log's fdatasync calls (one per epoch commit).",
            prometheus::exponential_buckets(0.000_05, 2.0, 16).unwrap_or_default(),
        )
        .with_label_values(&one);
        let checkpoints = counter(r, "laminar_checkpoints_total", "Checkpoints written.", p)
            .with_label_values(&one);
        let checkpoint_failures = counter(
            r,
            "laminar_checkpoint_failures_total",
            "Checkpoints that failed (retried; the WAL since the last good one is kept).",
            p,
        )
        .with_label_values(&one);
        let checkpoint_duration = histogram(
            r,
            "laminar_checkpoint_duration_seconds",
            "Time from starting a checkpoint until it is durable.",
            prometheus::exponential_buckets(0.001, 2.0, 16).unwrap_or_default(),
        )
        .with_label_values(&one);
        let checkpoint_size = int_gauge(
            r,
            "laminar_checkpoint_size_bytes",
            "Bytes of state arena the last checkpoint covers.",
            p,
        )
        .with_label_values(&one);
        let checkpoint_last_epoch = int_gauge(
            r,
            "laminar_checkpoint_last_epoch",
            "Epoch of the last checkpoint written or recovered.",
            p,
        )
        .with_label_values(&one);
        let recovery_duration = gauge(
            r,
            "laminar_recovery_duration_seconds",
            "Time the last start took to recover state from the checkpoint and the WAL.",
            p,
        )
        .with_label_values(&one);
        let state_store_bytes = int_gauge(
            r,
            "laminar_state_store_bytes",
            "Bytes of live keys and values in the state store (what state.memory_bytes_max bounds).",
            p,
        )
        .with_label_values(&one);
        let state_store_keys = int_gauge(
            r,
            "laminar_state_store_keys",
            "Live keys in the state store, every query's namespace together.",
            p,
        )
        .with_label_values(&one);
        let state_arena_bytes = int_gauge(
            r,
            "laminar_state_arena_bytes",
            "Bytes in the state store's arena file, live and superseded.",
            p,
        )
        .with_label_values(&one);
        let state_arena_dead_ratio = gauge(
            r,
            "laminar_state_arena_dead_ratio",
            "Share of the arena held by superseded records (compaction frees them).",
            p,
        )
        .with_label_values(&one);
        Arc::new(Self {
            state_store_bytes,
            state_store_keys,
            state_arena_bytes,
            state_arena_dead_ratio,
            query_state_bytes: int_gauge(
                r,
                "laminar_query_state_bytes",
                "Estimated bytes of window state the query holds in memory.",
                query,
            ),
            query_windows_open: int_gauge(
                r,
                "laminar_query_windows_open",
                "Windows open now (distinct fixed windows, or sessions).",
                query,
            ),
            query_windows_closed: counter(
                r,
                "laminar_query_windows_closed_total",
                "Windows closed by the watermark (their final results emitted, as the EMIT policy says).",
                query,
            ),
            wal_appends,
            wal_bytes,
            wal_fdatasync,
            checkpoints,
            checkpoint_duration,
            checkpoint_failures,
            checkpoint_size,
            checkpoint_last_epoch,
            recovery_duration,
            source_records: counter(
                r,
                "laminar_source_records_total",
                "Records read, decoded or not.",
                source,
            ),
            source_decode_errors: counter(
                r,
                "laminar_source_decode_errors_total",
                "Records that could not be decoded.",
                source,
            ),
            source_dead_lettered: counter(
                r,
                "laminar_source_dead_lettered_records_total",
                "Records written to the dead-letter topic.",
                source,
            ),
            source_watermark: gauge(
                r,
                "laminar_source_watermark_seconds",
                "The source's watermark, in seconds since the epoch.",
                source,
            ),
            source_watermark_lag: gauge(
                r,
                "laminar_source_watermark_lag_seconds",
                "How far the watermark is behind the wall clock.",
                source,
            ),
            source_alignment_pauses: counter(
                r,
                "laminar_source_alignment_pauses_total",
                "Times watermark alignment paused partitions of the source.",
                source,
            ),
            source_backpressure: register(
                r,
                "laminar_source_backpressure_seconds_total",
                CounterVec::new(
                    Opts::new(
                        "laminar_source_backpressure_seconds_total",
                        "Seconds the source was paused because a sink it feeds held records back (its producer queue full: broker slow or away).",
                    ),
                    source,
                ),
            ),
            partition_records: counter(
                r,
                "laminar_source_partition_records_total",
                "Records read from the partition, decoded or not.",
                &["pipeline", "source", "topic", "partition"],
            ),
            partition_bytes: counter(
                r,
                "laminar_source_partition_bytes_total",
                "Bytes of keys and values read from the partition.",
                &["pipeline", "source", "topic", "partition"],
            ),
            partition_lag: int_gauge(
                r,
                "laminar_source_partition_lag_records",
                "Records in the partition after the last one read (the broker's high watermark minus the position).",
                &["pipeline", "source", "topic", "partition"],
            ),
            sink_transactions: counter(
                r,
                "laminar_sink_transactions_committed_total",
                "Kafka transactions committed (exactly-once sinks with transactions: true; one per epoch with output).",
                &["pipeline", "sink"],
            ),
            sink_transaction_aborts: counter(
                r,
                "laminar_sink_transactions_aborted_total",
                "Kafka transactions aborted after a failed send or commit (the epoch's output is then read back and the rest sent again).",
                &["pipeline", "sink"],
            ),
            sink_records: counter(
                r,
                "laminar_sink_records_total",
                "Rows written to the sink.",
                &["pipeline", "sink"],
            ),
            sink_held: int_gauge(
                r,
                "laminar_sink_held_records",
                "Records the sink holds back while its producer queue is full; the sources feeding it are paused meanwhile.",
                &["pipeline", "sink"],
            ),
            query_late_records: counter(
                r,
                "laminar_query_late_records_total",
                "Records that arrived after their window closed (dropped or side-output).",
                query,
            ),
            reactor_busy: gauge(
                r,
                "laminar_reactor_busy_ratio",
                "Share of the last epoch the reactor thread spent processing (1: saturated).",
                &["pipeline", "query", "reactor"],
            ),
            reactor_ring: int_gauge(
                r,
                "laminar_reactor_ring_messages",
                &format!(
                    "Messages waiting in the reactor's input ring at the end of the last epoch (at most {}; full means the pipeline thread waits).",
                    crate::engine::reactor::RING_SLOTS
                ),
                &["pipeline", "query", "reactor"],
            ),
            query_state_keys: int_gauge(
                r,
                "laminar_query_state_keys",
                "Live window groups (window and key) the query holds.",
                query,
            ),
            epochs: epochs_vec.with_label_values(&[pipeline]),
            last_epoch: last_epoch_vec.with_label_values(&[pipeline]),
            process_resident_memory: memory_vec.with_label_values(&[pipeline]),
            pipeline: pipeline.to_owned(),
            registry,
            ready: AtomicBool::new(false),
        })
    }

    #[must_use]
    pub fn source(&self, name: &str) -> SourceMetrics {
        let l = [self.pipeline.as_str(), name];
        SourceMetrics {
            records: self.source_records.with_label_values(&l),
            decode_errors: self.source_decode_errors.with_label_values(&l),
            dead_lettered: self.source_dead_lettered.with_label_values(&l),
            watermark_seconds: self.source_watermark.with_label_values(&l),
            watermark_lag_seconds: self.source_watermark_lag.with_label_values(&l),
            alignment_pauses: self.source_alignment_pauses.with_label_values(&l),
            backpressure_seconds: self.source_backpressure.with_label_values(&l),
        }
    }

    #[must_use]
    pub fn sink(&self, name: &str) -> IntCounter {
        self.sink_records
            .with_label_values(&[self.pipeline.as_str(), name])
    }

    /// Records the sink holds back (see [`laminar_connectors::Sink::backlog`]).
    #[must_use]
    pub fn sink_held(&self, name: &str) -> IntGauge {
        self.sink_held
            .with_label_values(&[self.pipeline.as_str(), name])
    }

    #[must_use]
    pub fn sink_transactions(&self, name: &str) -> TransactionCounters {
        let l = [self.pipeline.as_str(), name];
        TransactionCounters {
            committed: self.sink_transactions.with_label_values(&l),
            aborted: self.sink_transaction_aborts.with_label_values(&l),
        }
    }

    #[must_use]
    pub fn query(&self, name: &str) -> QueryMetrics {
        let l = [self.pipeline.as_str(), name];
        QueryMetrics {
            late_records: self.query_late_records.with_label_values(&l),
            state_keys: self.query_state_keys.with_label_values(&l),
            state_bytes: self.query_state_bytes.with_label_values(&l),
            windows_open: self.query_windows_open.with_label_values(&l),
            windows_closed: self.query_windows_closed.with_label_values(&l),
        }
    }

    /// A source partition's counters (totals since start) and lag.
    pub fn source_partition(&self, source: &str, stats: &laminar_connectors::PartitionStats) {
        let partition = stats.partition.to_string();
        let l = [
            self.pipeline.as_str(),
            source,
            stats.topic.as_str(),
            partition.as_str(),
        ];
        let records = self.partition_records.with_label_values(&l);
        records.inc_by(stats.records.saturating_sub(records.get()));
        let bytes = self.partition_bytes.with_label_values(&l);
        bytes.inc_by(stats.bytes.saturating_sub(bytes.get()));
        if let Some(lag) = stats.lag {
            self.partition_lag.with_label_values(&l).set(lag);
        }
    }

    /// A reactor of a query split by key: its busy share and ring occupancy.
    pub fn reactor(&self, query: &str, reactor: usize, busy_ratio: f64, ring_messages: usize) {
        let reactor = reactor.to_string();
        let l = [self.pipeline.as_str(), query, reactor.as_str()];
        self.reactor_busy.with_label_values(&l).set(busy_ratio);
        self.reactor_ring
            .with_label_values(&l)
            .set(ring_messages as i64);
    }

    /// The state store as of the last epoch.
    pub fn state_store(&self, sample: StoreSample) {
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.state_store_bytes.set(int(sample.live_bytes));
        self.state_store_keys.set(int(sample.keys));
        self.state_arena_bytes.set(int(sample.arena_bytes));
        self.state_arena_dead_ratio.set(sample.dead_ratio);
    }

    /// An epoch closed.
    pub fn epoch_closed(&self, epoch: u64) {
        self.epochs.inc();
        self.last_epoch
            .set(i64::try_from(epoch).unwrap_or(i64::MAX));
        if let Some(bytes) = resident_bytes() {
            self.process_resident_memory.set(bytes as f64);
        }
    }

    /// Recovery at start took `took`.
    pub fn recovered(&self, took: Duration) {
        self.recovery_duration.set(took.as_secs_f64());
    }

    /// The WAL and checkpoints moved from `before` to `now`.
    pub fn durability(&self, before: &DurableStats, now: &DurableStats) {
        for (now, before) in [
            (&now.wal, &before.wal),
            (&now.reactor_wal, &before.reactor_wal),
        ] {
            self.wal_appends
                .inc_by(now.appends.saturating_sub(before.appends));
            self.wal_bytes
                .inc_by(now.bytes.saturating_sub(before.bytes));
            if now.syncs > before.syncs {
                self.wal_fdatasync.observe(now.last_sync.as_secs_f64());
            }
        }
        if now.checkpoints > before.checkpoints {
            self.checkpoints
                .inc_by(now.checkpoints - before.checkpoints);
            self.checkpoint_duration
                .observe(now.last_checkpoint_duration.as_secs_f64());
        }
        self.checkpoint_failures.inc_by(
            now.checkpoint_failures
                .saturating_sub(before.checkpoint_failures),
        );
        if let Some(c) = &now.last_checkpoint {
            self.checkpoint_size
                .set(i64::try_from(c.arena_len).unwrap_or(i64::MAX));
            self.checkpoint_last_epoch
                .set(i64::try_from(c.epoch).unwrap_or(i64::MAX));
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Every metric in the Prometheus text format.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!("cannot encode metrics: {e}");
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Serves `/metrics`, `/health` and `/ready` on `listen` from a thread of its own.
    pub fn serve(self: &Arc<Self>, listen: &str) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let metrics = Arc::clone(self);
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    if let Err(e) = metrics.answer(stream) {
                        tracing::debug!("metrics request failed: {e}");
                    }
                }
            })?;
        Ok(addr)
    }

    fn answer(&self, stream: TcpStream) -> std::io::Result<()> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut reader = BufReader::new(&stream).take(REQUEST_HEAD_BYTES_MAX as u64);
        let mut request_line = String::new();
        reader.read_line(&mut request_line)?;
        // Drain the headers (up to the bound) so the client sees a clean response.
        let mut line = String::new();
        while reader.read_line(&mut line)? > 2 {
            line.clear();
        }
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = path.split('?').next().unwrap_or("");
        let (status, content_type, body) = match (method, path) {
            ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", self.render()),
            ("GET", "/health") => ("200 OK", "text/plain", "ok\n".to_owned()),
            ("GET", "/ready") if self.ready.load(Ordering::Relaxed) => {
                ("200 OK", "text/plain", "ready\n".to_owned())
            }
            ("GET", "/ready") => (
                "503 Service Unavailable",
                "text/plain",
                "not ready\n".to_owned(),
            ),
            ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
            _ => (
                "405 Method Not Allowed",
                "text/plain",
                "GET only\n".to_owned(),
            ),
        };
        let mut stream = stream;
        write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        stream.flush()
    }
}

/// Resident set size of this process, from /proc (Linux).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Seconds since the epoch of a watermark in milliseconds, for gauges.
#[must_use]
pub fn watermark_seconds(watermark_ms: i64) -> Option<f64> {
    (watermark_ms != i64::MIN && watermark_ms != i64::MAX).then(|| watermark_ms as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_follow_the_convention() {
        let m = Metrics::new("p");
        m.source("s").records.inc();
        m.sink("out").inc();
        m.query("q").late_records.inc();
        m.epoch_closed(1);
        let text = m.render();
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let mut words = line.split_whitespace().skip(2);
            let (name, kind) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            assert!(name.starts_with("laminar_"), "{line}");
            assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
        }
        assert!(text.contains(r#"laminar_source_records_total{pipeline="p",source="s"} 1"#));
    }
}
