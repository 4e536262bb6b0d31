//! The pipeline runner: one thread that polls, processes and writes; see the module docs.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use laminar_connectors::datagen::{DatagenOptions, DatagenSource};
use laminar_connectors::file::{FileSink, FileSinkOptions, FileSource, FileSourceOptions};
use laminar_connectors::kafka::{
    ExactlyOnce, KafkaClientOptions, KafkaSink, KafkaSinkOptions, KafkaSource, KafkaSourceOptions,
};
use laminar_connectors::stdout::StdoutSink;
use laminar_connectors::{
    DecodeErrorPolicy, FlushOutcome, Rejected, Sink, SinkError, Source, SourceBatch, SourceError,
    SourcePoll, SourcePosition,
};

use crate::config::{Delivery, PipelineConfig, SinkConnector, SourceConnector};
use crate::durability::entry::{
    CommitEntry, OutputChunk, SinkCommit, SourceCommit, WatermarkState,
};
use crate::durability::{Durable, DurableError, Recovered};
use crate::metrics::{Metrics, QueryMetrics, SourceMetrics, watermark_seconds};
use crate::operator::watermark::{IdleClock, WatermarkTracker};
use crate::operator::{LateRows, LoggedChanges, Operator};
use crate::sql::PlannedPipeline;
use crate::state::mmap::MmapStore;
use crate::state::{StateError, StateStore, StateView};

/// How long one poll of one source may block when nothing arrives.
const POLL_TIMEOUT: Duration = Duration::from_millis(50);
/// How long the loop sleeps when every live source is paused for backpressure.
const BACKPRESSURE_PARK: Duration = Duration::from_millis(1);
/// How long a source stays unread for backpressure before its partitions are paused at
/// the broker too. A busy pipeline fills its sink's producer queue for moments many
/// times a second; pausing and resuming a Kafka partition drops what librdkafka has
/// prefetched of it, so only a longer stall (a broker slow or away) pauses fetching.
/// Meanwhile the prefetch queue bounds what is fetched.
const BROKER_PAUSE_AFTER: Duration = Duration::from_millis(100);
/// How long one flush call waits before the loop checks for shutdown and logs progress.
const FLUSH_STEP: Duration = Duration::from_secs(1);
/// How often the same warning (waiting for the broker, skipped records) is repeated.
const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// Output an exactly-once sink may hold for the open epoch; beyond it the epoch closes
/// early, so the memory it takes is bounded.
pub const EPOCH_STAGED_BYTES_MAX: usize = 64 << 20;
/// How long the last epoch may take after SIGTERM/SIGINT (a broker that stopped
/// answering must not hold the process past an orchestrator's grace period).
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("source `{name}`: {source}")]
    Source {
        name: String,
        #[source]
        source: Box<SourceError>,
    },
    #[error("sink `{name}`: {source}")]
    Sink {
        name: String,
        #[source]
        source: SinkError,
    },
    #[error("query `{name}` failed on a batch: {message}")]
    Query { name: String, message: String },
    #[error("query `{name}`: {source}")]
    State {
        name: String,
        #[source]
        source: StateError,
    },
    #[error(transparent)]
    Durable(#[from] DurableError),
    #[error(transparent)]
    Schema(#[from] super::schemas::SchemaError),
    #[error(transparent)]
    Topic(#[from] laminar_connectors::kafka::admin::TopicError),
    #[error(
        "the last epoch did not finish within {SHUTDOWN_TIMEOUT:?} of the stop signal: {what}; \
         stopping without committing it (the next run resumes from the last commit)"
    )]
    ShutdownTimeout { what: String },
}

/// Settings that come from the command line rather than the file.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Metrics to report to, already served (so that `/health` answers during recovery
    /// and `/ready` says not yet); new ones when `None`.
    pub metrics: Option<Arc<Metrics>>,
    /// Overrides `kafka.bootstrap_servers` (the embedded broker's address).
    pub bootstrap_servers: Option<String>,
    /// Stop (cleanly, after a last epoch) once this many records have been read.
    pub records_max: Option<u64>,
    /// Draw the live status line on stderr (a terminal).
    pub status_line: bool,
}

/// What a finished run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunSummary {
    pub records_in: u64,
    pub records_rejected: u64,
    pub records_out: u64,
    /// Records that arrived after their window closed (dropped or side-output).
    pub records_late: u64,
    pub epochs: u64,
    /// Times watermark alignment paused partitions of a source.
    pub alignment_pauses: u64,
}

struct SourceSlot {
    name: String,
    source: Box<dyn Source>,
    policy: DecodeErrorPolicy,
    /// Index into `Pipeline::dead_letters`.
    dead_letter: Option<usize>,
    finished: bool,
    /// Event-time column and watermark, when the source declares `event_time`.
    event_time: Option<(usize, WatermarkTracker)>,
    /// `event_time.max_drift_ms`: watermark alignment.
    max_drift_ms: Option<i64>,
    /// Partitions paused by alignment, and the assignment they were paused under.
    paused: Vec<i32>,
    assigned: Option<Vec<i32>>,
    /// Not polled: ahead of the others and unable to pause single partitions.
    held: bool,
    /// While the source is paused because a sink it feeds holds records back.
    backpressured: Option<Backpressure>,
    /// Time it was paused so: its partitions' idleness is measured on a clock that
    /// stops meanwhile.
    backpressured_for: Duration,
    /// Where its rows end up: a sink there holding records back pauses the source.
    feeds: Vec<Outlet>,
    metrics: SourceMetrics,
}

impl SourceSlot {
    /// The clock its partitions' idleness is measured on: the pipeline's idle clock,
    /// stopped also while this source was paused for backpressure.
    fn clock(&self, idle_clock: Instant, now: Instant) -> Instant {
        let paused = self.backpressured_for
            + self
                .backpressured
                .as_ref()
                .map_or(Duration::ZERO, |b| now.saturating_duration_since(b.counted));
        idle_clock.checked_sub(paused).unwrap_or(idle_clock)
    }
}

/// A source's pause for backpressure.
#[derive(Debug, Clone, Copy)]
struct Backpressure {
    since: Instant,
    /// Until when the pause is counted in `backpressured_for` (every round of the loop).
    counted: Instant,
    /// Its partitions are paused at the broker (after [`BROKER_PAUSE_AFTER`]).
    at_broker: bool,
}

/// A sink that rows of a source can reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outlet {
    Sink(usize),
    DeadLetter(usize),
    /// A query's `late_data_topic`.
    Late(usize),
}

/// A query's late-data topic.
struct LateSink {
    sink: KafkaSink,
    held: prometheus::IntGauge,
}

struct SinkSlot {
    name: String,
    from: String,
    sink: SinkHandle,
    records: prometheus::IntCounter,
    /// Records it holds back (`laminar_sink_held_records`).
    held: prometheus::IntGauge,
    /// Kafka transactions committed and aborted (exactly-once sinks with
    /// `transactions: true`).
    transactions: crate::metrics::TransactionCounters,
}

enum SinkHandle {
    AtLeastOnce(Box<dyn Sink>),
    /// Holds each epoch's output until the epoch's commit entry is durable.
    ExactlyOnce(Box<KafkaSink>),
}

impl SinkHandle {
    fn sink(&mut self) -> &mut dyn Sink {
        match self {
            Self::AtLeastOnce(s) => s.as_mut(),
            Self::ExactlyOnce(k) => k.as_mut(),
        }
    }
}

pub struct Pipeline {
    sources: Vec<SourceSlot>,
    queries: Vec<Box<dyn Operator>>,
    query_metrics: Vec<QueryMetrics>,
    metrics: Arc<Metrics>,
    /// What `CURRENT_WATERMARK()` reads.
    watermark: crate::sql::current_watermark::WatermarkCell,
    /// Per query, the Kafka sink of its `late_data_topic`.
    late_sinks: Vec<Option<LateSink>>,
    sinks: Vec<SinkSlot>,
    dead_letters: Vec<SinkSlot>,
    /// Where operators write their state when an epoch closes; its journal goes to the WAL.
    state: MmapStore,
    durable: Durable,
    /// Durability counters as last published.
    durable_stats: crate::durability::DurableStats,
    /// The last epoch committed (0: none).
    epoch: u64,
    /// The live status line, on a terminal.
    status: Option<super::status::StatusLine>,
    /// Set once a stop was requested: waits for the broker end there.
    deadline: Option<Instant>,
    epoch_interval: Duration,
    /// Time spent blocked in sinks (writes, flushes): the idle-partition clock stops
    /// while the pipeline cannot read, so backpressure never makes a partition "idle".
    idle_clock: IdleClock,
    summary: RunSummary,
    records_max: Option<u64>,
    last_skip_warning: Option<Instant>,
    /// While sources are paused for backpressure: when it began or was last warned of.
    last_backpressure_warning: Option<Instant>,
    /// Per query, its reactors' busy nanoseconds at the last metrics sample, and when.
    reactor_busy: Vec<Vec<u64>>,
    reactor_sampled: Instant,
}

impl Pipeline {
    /// Creates every connector. Kafka clients connect in the background: a broker that is
    /// down at start is retried, not fatal.
    pub fn build(
        config: &PipelineConfig,
        planned: PlannedPipeline,
        options: &RunOptions,
    ) -> Result<Self, RunError> {
        let kafka = KafkaClientOptions {
            bootstrap_servers: options
                .bootstrap_servers
                .clone()
                .unwrap_or_else(|| config.kafka.bootstrap_servers.clone()),
            properties: config.kafka.properties.clone(),
        };
        let metrics = options
            .metrics
            .clone()
            .unwrap_or_else(|| Metrics::new(&config.name));
        let registry = super::schemas::registry(config)?;
        let outputs = config.output_topics();
        if !outputs.is_empty() {
            let created = laminar_connectors::kafka::admin::ensure_topics(
                &kafka,
                &outputs,
                config.create_topics,
            )?;
            if !created.is_empty() {
                tracing::info!(?created, "created output topics");
            }
        }
        let mut dead_letters = Vec::new();
        let mut sources = Vec::new();
        for s in &config.sources {
            let source_error = |source| RunError::Source {
                name: s.name.clone(),
                source: Box::new(source),
            };
            let source: Box<dyn Source> = match &s.connector {
                SourceConnector::Kafka {
                    topic,
                    group_id,
                    start_from,
                    metadata,
                    headers,
                    on_missing_topic,
                    ..
                } => {
                    let (value, key) = super::schemas::source_decoders(s, registry.as_ref());
                    Box::new(
                        KafkaSource::new(KafkaSourceOptions {
                            name: s.name.clone(),
                            client: kafka.clone(),
                            topics: topic.clone(),
                            group_id: group_id.clone(),
                            start_from: *start_from,
                            value,
                            key,
                            metadata: *metadata,
                            headers: headers.clone(),
                            on_decode_error: s.on_decode_error,
                            on_missing_topic: *on_missing_topic,
                        })
                        .map_err(source_error)?,
                    )
                }
                SourceConnector::File { path, batch_rows } => Box::new(
                    FileSource::new(FileSourceOptions {
                        name: s.name.clone(),
                        path: path.clone(),
                        columns: s.columns.clone(),
                        on_decode_error: s.on_decode_error,
                        batch_rows: *batch_rows,
                    })
                    .map_err(source_error)?,
                ),
                SourceConnector::Datagen {
                    table,
                    events,
                    rate_per_s,
                    seed,
                    auctions,
                } => Box::new(DatagenSource::new(DatagenOptions {
                    name: s.name.clone(),
                    table: *table,
                    events: *events,
                    rate_per_s: *rate_per_s,
                    seed: *seed,
                    auctions: *auctions,
                })),
            };
            let dead_letter = match (&s.dead_letter_topic, s.on_decode_error) {
                (Some(topic), DecodeErrorPolicy::DeadLetter) => {
                    let name = format!("{}.dead_letter", s.name);
                    let sink = KafkaSink::new(KafkaSinkOptions::plain(&name, kafka.clone(), topic))
                        .map_err(|source| RunError::Sink {
                            name: name.clone(),
                            source,
                        })?;
                    dead_letters.push(SinkSlot {
                        records: metrics.sink(&name),
                        held: metrics.sink_held(&name),
                        transactions: metrics.sink_transactions(&name),
                        name,
                        from: s.name.clone(),
                        sink: SinkHandle::AtLeastOnce(Box::new(sink)),
                    });
                    Some(dead_letters.len() - 1)
                }
                _ => None,
            };
            sources.push(SourceSlot {
                name: s.name.clone(),
                source,
                policy: s.on_decode_error,
                dead_letter,
                finished: false,
                event_time: s.event_time.as_ref().and_then(|et| {
                    let column = planned.schemas.get(&s.name)?.index_of(&et.column).ok()?;
                    Some((
                        column,
                        WatermarkTracker::new(et.watermark_delay_ms, et.idle_timeout_ms),
                    ))
                }),
                max_drift_ms: s
                    .event_time
                    .as_ref()
                    .and_then(|et| et.max_drift_ms)
                    .map(|ms| i64::try_from(ms).unwrap_or(i64::MAX)),
                paused: Vec::new(),
                assigned: None,
                held: false,
                backpressured: None,
                backpressured_for: Duration::ZERO,
                // Filled in below, once the sinks are built.
                feeds: Vec::new(),
                metrics: metrics.source(&s.name),
            });
        }
        let mut sinks = Vec::new();
        for s in &config.sinks {
            let sink_error = |source| RunError::Sink {
                name: s.name.clone(),
                source,
            };
            let sink = match &s.connector {
                SinkConnector::Kafka { topic } => {
                    let schema = planned.schemas.get(&s.from);
                    let index = |k: &String| schema.and_then(|sc| sc.index_of(k).ok());
                    let key_columns = s.key.iter().filter_map(|(k, _)| index(k)).collect();
                    let headers = s
                        .headers
                        .iter()
                        .filter_map(|(h, c, _)| index(c).map(|i| (h.clone(), i)))
                        .collect();
                    let timestamp_column = s.timestamp.as_ref().and_then(|(c, _)| index(c));
                    let (value, key) = match schema {
                        Some(schema) => {
                            super::schemas::sink_encodings(s, schema, registry.as_deref())?
                        }
                        None => Default::default(),
                    };
                    let exactly_once = (s.delivery == Delivery::ExactlyOnce).then(|| ExactlyOnce {
                        transactional_id: s
                            .transactions
                            .then(|| format!("laminar-{}-{}", config.name, s.name)),
                    });
                    let eo = exactly_once.is_some();
                    let sink = KafkaSink::new(KafkaSinkOptions {
                        name: s.name.clone(),
                        client: kafka.clone(),
                        topic: topic.clone(),
                        key_columns,
                        exactly_once,
                        value,
                        key,
                        headers,
                        timestamp_column,
                    })
                    .map_err(sink_error)?;
                    if eo {
                        SinkHandle::ExactlyOnce(Box::new(sink))
                    } else {
                        SinkHandle::AtLeastOnce(Box::new(sink))
                    }
                }
                SinkConnector::File { path } => SinkHandle::AtLeastOnce(Box::new(
                    FileSink::new(&FileSinkOptions {
                        name: s.name.clone(),
                        path: path.clone(),
                    })
                    .map_err(sink_error)?,
                )),
                SinkConnector::Stdout => SinkHandle::AtLeastOnce(Box::new(StdoutSink::default())),
            };
            sinks.push(SinkSlot {
                records: metrics.sink(&s.name),
                held: metrics.sink_held(&s.name),
                transactions: metrics.sink_transactions(&s.name),
                name: s.name.clone(),
                from: s.from.clone(),
                sink,
            });
        }
        let mut late_sinks = Vec::new();
        for (q, operator) in config.queries.iter().zip(&planned.queries) {
            late_sinks.push(match &q.late_data_topic {
                Some(topic) if operator.is_stateful() => {
                    let name = format!("{}.late_data", q.name);
                    let held = metrics.sink_held(&name);
                    let sink = KafkaSink::new(KafkaSinkOptions::plain(&name, kafka.clone(), topic))
                        .map_err(|source| RunError::Sink { name, source })?;
                    Some(LateSink { sink, held })
                }
                _ => None,
            });
        }
        laminar_connectors::crash::pause("recovery");
        let (mut durable, recovered) = Durable::open_dir(
            Path::new(&config.state.dir),
            config.state.memory_bytes_max,
            crate::durability::arena::ArenaOptions {
                huge_pages: config.state.huge_pages,
            },
        )?;
        durable.set_checkpoint_policy(
            config.state.checkpoint_wal_bytes,
            crate::durability::CHECKPOINT_RETRY_AFTER,
        );
        durable.set_compaction(
            crate::durability::COMPACT_DEAD_RATIO,
            config.state.compaction_min_bytes,
        );
        let Recovered {
            store: mut state,
            commit,
            undelivered,
            ..
        } = recovered;
        let mut queries = split_queries(
            config,
            planned.queries,
            &planned.watermark,
            reactor_count(config.runtime.cores),
            &mut durable,
        )?;
        for query in &mut queries {
            let name = query.name().to_owned();
            StateView::open(&mut state, &name)
                .and_then(|view| query.restore(&view))
                .map_err(|source| RunError::State { name, source })?;
        }
        // The journal holds what changed from here on: restoring only reads.
        drop(state.take_journal());
        if let Some(commit) = &commit {
            resume_sources(&mut sources, commit)?;
            tracing::info!(
                epoch = commit.epoch,
                dir = %config.state.dir,
                checkpoint_epoch = ?recovered.checkpoint_epoch,
                replayed_epochs = recovered.replayed_epochs,
                took_ms = recovered.duration.as_millis() as u64,
                "recovered: resuming after the last committed epoch"
            );
        }
        metrics.recovered(recovered.duration);
        for slot in &mut sources {
            slot.feeds = outlets(slot, &queries, &sinks, &late_sinks);
        }
        let mut pipeline = Self {
            sources,
            late_sinks,
            watermark: planned.watermark,
            query_metrics: queries.iter().map(|q| metrics.query(q.name())).collect(),
            metrics,
            queries,
            state,
            durable_stats: crate::durability::DurableStats::default(),
            durable,
            epoch: commit.as_ref().map_or(0, |c| c.epoch),
            deadline: None,
            status: options.status_line.then(super::status::StatusLine::new),
            sinks,
            dead_letters,
            epoch_interval: Duration::from_millis(config.state.checkpoint_interval_ms),
            idle_clock: IdleClock::default(),
            summary: RunSummary::default(),
            records_max: options.records_max,
            last_skip_warning: None,
            last_backpressure_warning: None,
            reactor_busy: Vec::new(),
            reactor_sampled: Instant::now(),
        };
        if let Some(commit) = &commit {
            pipeline.redeliver(commit, undelivered)?;
        }
        Ok(pipeline)
    }

    /// After a crash between an epoch's commit entry and its `delivered` record: sends
    /// the part of its exactly-once output that the sinks' topics do not hold yet.
    fn redeliver(
        &mut self,
        commit: &CommitEntry,
        undelivered: Vec<OutputChunk>,
    ) -> Result<(), RunError> {
        if undelivered.is_empty() {
            return Ok(());
        }
        let mut by_sink: std::collections::BTreeMap<String, Vec<OutputChunk>> =
            std::collections::BTreeMap::new();
        for chunk in undelivered {
            by_sink.entry(chunk.sink.clone()).or_default().push(chunk);
        }
        for (name, mut chunks) in by_sink {
            let Some(slot) = self.sinks.iter_mut().find(|s| s.name == name) else {
                tracing::warn!(sink = %name, epoch = commit.epoch,
                    "the sink is gone from the pipeline file; its undelivered output is dropped");
                continue;
            };
            let SinkHandle::ExactlyOnce(sink) = &mut slot.sink else {
                tracing::warn!(sink = %name, "the sink is no longer exactly_once; its undelivered output is dropped");
                continue;
            };
            chunks.sort_by_key(|c| c.first_seq);
            let records: Vec<_> = chunks.into_iter().flat_map(|c| c.records).collect();
            let starts = commit
                .sinks
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.starts.clone())
                .unwrap_or_default();
            let sink_error = |source| RunError::Sink {
                name: name.clone(),
                source,
            };
            let present = sink.read_back(commit.epoch, &starts).map_err(sink_error)?;
            let already_written = present.len();
            let output = EpochOutput {
                epoch: commit.epoch,
                records: &records,
                starts: &starts,
            };
            let sent = deliver_epoch(sink, &name, output, present, None, None, &slot.transactions)?;
            tracing::info!(sink = %name, epoch = commit.epoch, records = records.len(),
                already_written, sent,
                "finished delivering the output of the epoch committed before the restart");
        }
        self.durable.delivered(commit.epoch)?;
        Ok(())
    }

    /// Runs until every source is finished, `stop` is set or `records_max` is reached;
    /// then closes a last epoch.
    pub fn run(mut self, stop: &AtomicBool) -> Result<RunSummary, RunError> {
        let mut epoch_started = Instant::now();
        // Idle sources share one POLL_TIMEOUT per round; while any source has data, nobody
        // waits, so a busy source is never slowed down by a quiet one.
        let idle_timeout = POLL_TIMEOUT / u32::try_from(self.sources.len().max(1)).unwrap_or(1);
        let mut busy = false;
        while !stop.load(Ordering::Relaxed) {
            let mut live = 0;
            let mut polled_any = false;
            let poll_timeout = if busy { Duration::ZERO } else { idle_timeout };
            busy = false;
            self.relieve_sinks(Instant::now())?;
            for i in 0..self.sources.len() {
                if self.sources[i].finished {
                    continue;
                }
                live += 1;
                if self.sources[i].held || self.sources[i].backpressured.is_some() {
                    continue;
                }
                polled_any = true;
                let polled = self.sources[i].source.poll(poll_timeout);
                let polled = polled.map_err(|source| RunError::Source {
                    name: self.sources[i].name.clone(),
                    source: Box::new(source),
                })?;
                match polled {
                    SourcePoll::Batch(batch) => {
                        busy = true;
                        self.process(i, batch)?;
                    }
                    SourcePoll::Idle => {}
                    SourcePoll::Finished => {
                        tracing::info!(source = %self.sources[i].name, "source drained");
                        self.sources[i].finished = true;
                        if let Some((_, tracker)) = &mut self.sources[i].event_time {
                            tracker.finish();
                        }
                    }
                }
            }
            if !polled_any && live > 0 {
                // Every live source is paused: wait for the sinks, not in a busy loop.
                std::thread::sleep(BACKPRESSURE_PARK);
            }
            self.advance_time(Instant::now())?;
            self.draw_status();
            if live == 0
                || self
                    .records_max
                    .is_some_and(|max| self.summary.records_in >= max)
            {
                break;
            }
            if epoch_started.elapsed() >= self.epoch_interval
                || self.staged_bytes() >= EPOCH_STAGED_BYTES_MAX
            {
                self.close_epoch(false, stop)?;
                epoch_started = Instant::now();
            }
        }
        if stop.load(Ordering::Relaxed) {
            self.deadline = Some(Instant::now() + SHUTDOWN_TIMEOUT);
        }
        self.close_epoch(true, stop)?;
        if let Some(status) = &mut self.status {
            status.clear();
        }
        if self.sources.iter().all(|s| s.finished) {
            self.durable.finish_drained()?;
            tracing::info!(
                "every source drained: state cleared, so a new run starts from the beginning"
            );
        }
        Ok(self.summary)
    }

    fn process(&mut self, source: usize, input: SourceBatch) -> Result<(), RunError> {
        let SourceBatch {
            batch,
            rejected,
            row_partitions,
        } = input;
        let records = (batch.num_rows() + rejected.len()) as u64;
        self.summary.records_in += records;
        self.sources[source].metrics.records.inc_by(records);
        if !rejected.is_empty() {
            self.reject(source, &rejected)?;
        }
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let clock = self.sources[source].clock(self.idle_clock(), Instant::now());
        if let Some((column, tracker)) = &mut self.sources[source].event_time {
            observe_event_times(tracker, &batch, *column, row_partitions.as_deref(), clock);
        }
        let name = self.sources[source].name.clone();
        self.deliver(&name, &[batch])
    }

    /// Hands `batches` from `origin` to every query and sink that reads it, and what those
    /// queries emit to their readers in turn (queries only read earlier ones: no cycles).
    fn deliver(&mut self, origin: &str, batches: &[RecordBatch]) -> Result<(), RunError> {
        if batches.is_empty() {
            return Ok(());
        }
        for sink in &mut self.sinks {
            if sink.from != origin {
                continue;
            }
            for out in batches {
                if out.num_rows() == 0 {
                    continue;
                }
                self.summary.records_out += out.num_rows() as u64;
                sink.records.inc_by(out.num_rows() as u64);
                let started = Instant::now();
                sink.sink
                    .sink()
                    .write(out)
                    .map_err(|source| RunError::Sink {
                        name: sink.name.clone(),
                        source,
                    })?;
                self.idle_clock.exclude(started.elapsed());
            }
        }
        for q in 0..self.queries.len() {
            if self.queries[q].input() != origin {
                continue;
            }
            let (mut out, mut late) = (Vec::new(), Vec::new());
            for batch in batches {
                let query = &mut self.queries[q];
                query
                    .process_batch(batch, &mut out, &mut late)
                    .map_err(|e| query_failed(query.as_ref(), &e))?;
            }
            self.late(q, late)?;
            let name = self.queries[q].name().to_owned();
            self.deliver(&name, &out)?;
        }
        self.exclude_query_waits();
        Ok(())
    }

    /// Time queries waited on full reactor rings is backpressure: the idle-partition
    /// clock does not count it, as it does not count time blocked in sinks.
    fn exclude_query_waits(&mut self) {
        for query in &mut self.queries {
            self.idle_clock.exclude(query.take_blocked());
        }
    }

    fn idle_clock(&self) -> Instant {
        self.idle_clock.at(Instant::now())
    }

    /// Moves watermarks forward and lets operators act on time (window close, periodic emit).
    fn advance_time(&mut self, now: Instant) -> Result<(), RunError> {
        let idle_clock = self.idle_clock.at(now);
        for i in 0..self.sources.len() {
            let clock = self.sources[i].clock(idle_clock, now);
            let assigned = self.sources[i].source.assigned_partitions();
            if assigned != self.sources[i].assigned {
                // A new assignment starts unpaused: alignment decides again below.
                self.sources[i].assigned.clone_from(&assigned);
                self.sources[i].paused.clear();
            }
            let Some((_, tracker)) = &mut self.sources[i].event_time else {
                continue;
            };
            // Before its first assignment a source keeps what it restored.
            if let Some(partitions) = assigned.filter(|p| !p.is_empty()) {
                tracker.set_partitions(&partitions, clock);
            }
            let before = tracker.current();
            let watermark = tracker.advance(clock);
            if watermark > before {
                let name = self.sources[i].name.clone();
                self.deliver_watermark(&name, watermark)?;
            }
        }
        let ready = self
            .sources
            .iter()
            .all(|s| s.finished || s.assigned.as_ref().is_none_or(|p| !p.is_empty()));
        self.metrics.set_ready(ready);
        let pipeline_watermark = self
            .sources
            .iter()
            .filter_map(|s| s.event_time.as_ref().map(|(_, t)| t.current()))
            .min();
        if let Some(w) = pipeline_watermark {
            self.watermark.store(w, Ordering::Relaxed);
        }
        self.align(idle_clock, now)?;
        for q in 0..self.queries.len() {
            let mut out = Vec::new();
            let query = &mut self.queries[q];
            query
                .handle_tick(now, &mut out)
                .map_err(|e| query_failed(query.as_ref(), &e))?;
            let name = query.name().to_owned();
            self.deliver(&name, &out)?;
        }
        self.exclude_query_waits();
        Ok(())
    }

    /// Watermark alignment: pauses the partitions of sources with `max_drift_ms` whose
    /// watermark is that far ahead of the slowest producing partition of any source, and
    /// resumes them once it caught up. The slowest partition is never paused.
    fn align(&mut self, idle_clock: Instant, now: Instant) -> Result<(), RunError> {
        if self.sources.iter().all(|s| s.max_drift_ms.is_none()) {
            return Ok(());
        }
        let slowest = self
            .sources
            .iter()
            .filter_map(|s| s.event_time.as_ref()?.1.slowest(s.clock(idle_clock, now)))
            .min();
        for slot in &mut self.sources {
            let (Some(drift), Some((_, tracker))) = (slot.max_drift_ms, &slot.event_time) else {
                continue;
            };
            if slot.backpressured.is_some() {
                // Every partition is paused; alignment decides again once it resumes.
                continue;
            }
            let ahead =
                slowest.map_or_else(Vec::new, |s| tracker.ahead_of(s.saturating_add(drift)));
            if ahead == slot.paused {
                continue;
            }
            tracing::debug!(source = %slot.name, paused = ?ahead, slowest_watermark = ?slowest,
                "watermark alignment: pausing partitions more than {drift} ms ahead");
            let partial = slot
                .source
                .pause(&ahead)
                .map_err(|source| RunError::Source {
                    name: slot.name.clone(),
                    source: Box::new(source),
                })?;
            slot.held = !partial && !ahead.is_empty();
            slot.paused = ahead;
            if !slot.paused.is_empty() {
                self.summary.alignment_pauses += 1;
                slot.metrics.alignment_pauses.inc();
            }
        }
        Ok(())
    }

    /// Backpressure from sinks: hands on what they hold back (their producer queues were
    /// full), pauses every source that feeds one still holding records, at the broker
    /// where it can, and resumes it once none does. Meanwhile this thread goes on with
    /// time (ticks, watermarks of the other sources), the other sources and a stop.
    fn relieve_sinks(&mut self, now: Instant) -> Result<(), RunError> {
        let mut holding: Vec<(Outlet, &str, usize)> = Vec::new();
        let slots = (self.sinks.iter_mut().enumerate())
            .map(|(i, s)| (s, Outlet::Sink(i)))
            .chain(
                self.dead_letters
                    .iter_mut()
                    .enumerate()
                    .map(|(i, s)| (s, Outlet::DeadLetter(i))),
            );
        for (slot, outlet) in slots {
            let held = slot
                .sink
                .sink()
                .backlog()
                .map_err(|source| RunError::Sink {
                    name: slot.name.clone(),
                    source,
                })?;
            slot.held.set(held as i64);
            if held > 0 {
                holding.push((outlet, slot.name.as_str(), held));
            }
        }
        for (q, late) in self.late_sinks.iter_mut().enumerate() {
            let Some(late) = late else { continue };
            let held = late.sink.backlog().map_err(|source| RunError::Sink {
                name: format!("{}.late_data", self.queries[q].name()),
                source,
            })?;
            late.held.set(held as i64);
            if held > 0 {
                holding.push((Outlet::Late(q), "late_data", held));
            }
        }
        let mut paused = Vec::new();
        for slot in &mut self.sources {
            let blocked = !slot.finished
                && slot
                    .feeds
                    .iter()
                    .any(|o| holding.iter().any(|(h, _, _)| h == o));
            let pause_error = |slot: &SourceSlot, source| RunError::Source {
                name: slot.name.clone(),
                source: Box::new(source),
            };
            let Some(mut b) = slot.backpressured else {
                if blocked {
                    tracing::debug!(source = %slot.name, "a sink it feeds holds records back: paused");
                    slot.backpressured = Some(Backpressure {
                        since: now,
                        counted: now,
                        at_broker: false,
                    });
                }
                continue;
            };
            let paused_for = now.saturating_duration_since(b.counted);
            slot.backpressured_for += paused_for;
            slot.metrics
                .backpressure_seconds
                .inc_by(paused_for.as_secs_f64());
            b.counted = now;
            if !blocked {
                tracing::debug!(source = %slot.name, "its sinks caught up: resumed");
                slot.backpressured = None;
                if b.at_broker {
                    // Back to what alignment had paused, if anything.
                    slot.source
                        .pause(&slot.paused)
                        .map_err(|e| pause_error(slot, e))?;
                }
                continue;
            }
            if !b.at_broker
                && now.saturating_duration_since(b.since) >= BROKER_PAUSE_AFTER
                && let Some(partitions) = slot.source.assigned_partitions()
            {
                slot.source
                    .pause(&partitions)
                    .map_err(|e| pause_error(slot, e))?;
                b.at_broker = true;
            }
            slot.backpressured = Some(b);
            paused.push(slot.name.as_str());
        }
        if paused.is_empty() {
            self.last_backpressure_warning = None;
            return Ok(());
        }
        let since = *self.last_backpressure_warning.get_or_insert(now);
        if now.duration_since(since) >= WARN_INTERVAL {
            let sinks: Vec<String> = holding
                .iter()
                .map(|(_, name, held)| format!("{name} ({held} records)"))
                .collect();
            tracing::warn!(sources = ?paused, "sources paused for at least {:?}: sinks \
                hold records back because their producer queue is full (broker slow or \
                unreachable): {}", WARN_INTERVAL, sinks.join(", "));
            self.last_backpressure_warning = Some(now);
        }
        Ok(())
    }

    fn deliver_watermark(&mut self, origin: &str, watermark: i64) -> Result<(), RunError> {
        for q in 0..self.queries.len() {
            if self.queries[q].input() != origin {
                continue;
            }
            let mut out = Vec::new();
            let query = &mut self.queries[q];
            query
                .handle_watermark(watermark, &mut out)
                .map_err(|e| query_failed(query.as_ref(), &e))?;
            let name = query.name().to_owned();
            self.deliver(&name, &out)?;
            self.deliver_watermark(&name, watermark)?;
        }
        Ok(())
    }

    /// Counts late rows and writes them to the query's late-data topic, if it has one.
    fn late(&mut self, query: usize, late: Vec<LateRows>) -> Result<(), RunError> {
        let started = Instant::now();
        for rows in late {
            self.summary.records_late += rows.rows.num_rows() as u64;
            self.query_metrics[query]
                .late_records
                .inc_by(rows.rows.num_rows() as u64);
            if let Some(late) = &mut self.late_sinks[query] {
                late.sink
                    .write_with_headers(&rows.rows, &[("laminar.late", rows.reason.as_str())])
                    .map_err(|source| RunError::Sink {
                        name: format!("{}.late_data", self.queries[query].name()),
                        source,
                    })?;
            }
        }
        self.idle_clock.exclude(started.elapsed());
        Ok(())
    }

    fn reject(&mut self, source: usize, rejected: &[Rejected]) -> Result<(), RunError> {
        self.summary.records_rejected += rejected.len() as u64;
        let slot = &self.sources[source];
        slot.metrics.decode_errors.inc_by(rejected.len() as u64);
        if let (DecodeErrorPolicy::DeadLetter, Some(dl)) = (slot.policy, slot.dead_letter) {
            slot.metrics.dead_lettered.inc_by(rejected.len() as u64);
            let sink = &mut self.dead_letters[dl];
            return sink
                .sink
                .sink()
                .write_rejected(rejected)
                .map_err(|source| RunError::Sink {
                    name: sink.name.clone(),
                    source,
                });
        }
        let now = Instant::now();
        if self
            .last_skip_warning
            .is_none_or(|t| now.duration_since(t) >= WARN_INTERVAL)
        {
            self.last_skip_warning = Some(now);
            let r = &rejected[0];
            tracing::warn!(
                source = %slot.name,
                skipped_total = self.summary.records_rejected,
                "skipping records that cannot be decoded; e.g. {}[{}]@{}: {}",
                r.topic, r.partition, r.offset, r.reason
            );
        }
        Ok(())
    }

    /// Bytes the exactly-once sinks hold for the open epoch.
    fn staged_bytes(&self) -> usize {
        self.sinks
            .iter()
            .map(|s| match &s.sink {
                SinkHandle::ExactlyOnce(k) => k.staged_bytes(),
                SinkHandle::AtLeastOnce(_) => 0,
            })
            .sum()
    }

    /// Closes the epoch (see [`crate::durability`] for the protocol): flushes the
    /// at-least-once sinks, writes state changes, exactly-once output and the commit
    /// entry to the WAL, then delivers the exactly-once output.
    /// A stop requested meanwhile gives the waits for the broker [`SHUTDOWN_TIMEOUT`].
    fn close_epoch(&mut self, last: bool, stop: &AtomicBool) -> Result<(), RunError> {
        let flush_started = Instant::now();
        // Deliveries below exclude their own blocked time; the rest is excluded at the end.
        let excluded_before = self.idle_clock.excluded();
        // Queries on reactor threads hand out every result of the input read so far;
        // queries read only earlier ones, so in file order each sees all of its input.
        for q in 0..self.queries.len() {
            let (mut out, mut late) = (Vec::new(), Vec::new());
            let query = &mut self.queries[q];
            query
                .flush(&mut out, &mut late)
                .map_err(|e| query_failed(query.as_ref(), &e))?;
            self.late(q, late)?;
            let name = self.queries[q].name().to_owned();
            self.deliver(&name, &out)?;
        }
        let positions: Vec<_> = self.sources.iter().map(|s| s.source.positions()).collect();
        for slot in self.sinks.iter_mut().chain(self.dead_letters.iter_mut()) {
            if matches!(slot.sink, SinkHandle::ExactlyOnce(_)) {
                continue;
            }
            flush_until_done(slot.sink.sink(), &slot.name, self.deadline, Some(stop))?;
        }
        for late in self.late_sinks.iter_mut().flatten() {
            flush_until_done(&mut late.sink, "late_data", self.deadline, Some(stop))?;
        }
        let epoch = self.epoch + 1;
        // Queries split over reactors write their changes there, each reactor to its own
        // WAL, all at once; the others here, into the journal of the pipeline's WAL.
        let mut on_reactors = Vec::new();
        for (q, query) in self.queries.iter_mut().enumerate() {
            let durable = &self.durable;
            let started = query
                .start_checkpoint(epoch, &|i| durable.reactor_retain_from(i))
                .and_then(|started| {
                    if !started {
                        StateView::open(&mut self.state, query.name())
                            .and_then(|mut view| query.checkpoint(&mut view))?;
                    }
                    Ok(started)
                })
                .map_err(|source| state_failed(query.name(), source))?;
            if started {
                on_reactors.push(q);
            }
        }
        let mut logged = Vec::new();
        for q in on_reactors {
            let query = &mut self.queries[q];
            let changes = query
                .finish_checkpoint()
                .map_err(|source| state_failed(query.name(), source))?;
            for LoggedChanges { ops, log } in changes {
                // Changes a reactor WAL holds are not journaled again.
                let applied = match log {
                    Some(log) => {
                        logged.push(log);
                        ops.iter().try_for_each(|op| self.state.apply_logged(op))
                    }
                    None => ops.iter().try_for_each(|op| self.state.apply(op)),
                };
                applied.map_err(|source| state_failed(query.name(), source))?;
            }
        }
        let ops = self.state.take_journal();
        // Per exactly-once sink (by index): the epoch's output.
        let mut staged = Vec::new();
        let mut sink_commits = Vec::new();
        for (i, slot) in self.sinks.iter_mut().enumerate() {
            if let SinkHandle::ExactlyOnce(sink) = &mut slot.sink {
                sink_commits.push(SinkCommit {
                    name: slot.name.clone(),
                    topic: sink.topic().to_owned(),
                    starts: sink.output_starts(),
                });
                staged.push((i, sink.take_staged()));
            }
        }
        let commit = CommitEntry {
            epoch,
            wall_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
            sources: self
                .sources
                .iter()
                .zip(&positions)
                .map(|(slot, positions)| source_commit(slot, positions))
                .collect(),
            sinks: sink_commits,
            // Durable::commit fills in where the reactor WALs end.
            reactor_wals: Vec::new(),
        };
        let outputs: Vec<(&str, &[crate::durability::entry::OutputRecord])> = staged
            .iter()
            .map(|(i, records)| (self.sinks[*i].name.as_str(), records.as_slice()))
            .collect();
        // An epoch in which nothing moved (no input, no state change, no output) is not
        // written: an idle pipeline does not fill the WAL with copies of one commit.
        let idle = ops.is_empty()
            && logged.is_empty()
            && staged.iter().all(|(_, r)| r.is_empty())
            && self
                .durable
                .last_commit()
                .is_some_and(|c| c.sources == commit.sources);
        if !idle {
            self.durable.commit(&ops, &outputs, &commit, &logged)?;
            laminar_connectors::crash::point("after-commit");
            self.epoch = epoch;
        }
        if !idle && !staged.is_empty() {
            for ((i, records), starts) in staged.iter().zip(&commit.sinks) {
                let slot = &mut self.sinks[*i];
                if let SinkHandle::ExactlyOnce(sink) = &mut slot.sink {
                    let output = EpochOutput {
                        epoch,
                        records,
                        starts: &starts.starts,
                    };
                    deliver_epoch(
                        sink,
                        &slot.name,
                        output,
                        HashSet::new(),
                        self.deadline,
                        Some(stop),
                        &slot.transactions,
                    )?;
                }
            }
            laminar_connectors::crash::point("after-delivery");
            self.durable.delivered(epoch)?;
        }
        let excluded_inside = self.idle_clock.excluded().saturating_sub(excluded_before);
        self.idle_clock
            .exclude(flush_started.elapsed().saturating_sub(excluded_inside));
        // The consumer groups learn the offsets too, for lag monitoring; recovery reads
        // them from the WAL.
        for (slot, positions) in self.sources.iter_mut().zip(&positions) {
            slot.source
                .commit(positions, last)
                .map_err(|source| RunError::Source {
                    name: slot.name.clone(),
                    source: Box::new(source),
                })?;
        }
        self.durable.maybe_checkpoint(&mut self.state, last)?;
        let stats = self.durable.stats();
        self.metrics.durability(&self.durable_stats, &stats);
        self.durable_stats = stats;
        self.summary.epochs += 1;
        self.publish_metrics();
        Ok(())
    }

    /// Redraws the status line, when there is one and it is due.
    fn draw_status(&mut self) {
        if !self
            .status
            .as_ref()
            .is_some_and(super::status::StatusLine::due)
        {
            return;
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut lag = None;
        for slot in &self.sources {
            for stats in slot.source.partition_stats() {
                if let Some(l) = stats.lag {
                    *lag.get_or_insert(0) += l;
                }
            }
        }
        let watermark_ms = self
            .sources
            .iter()
            .filter_map(|s| s.event_time.as_ref().map(|(_, t)| t.current()))
            .min()
            .filter(|&w| w > i64::MIN);
        let status = super::status::Status {
            records_in: self.summary.records_in,
            records_out: self.summary.records_out,
            lag,
            watermark_ms,
            epoch: self.epoch,
            checkpoint: self
                .durable_stats
                .last_checkpoint
                .map(|c| (c.epoch, c.wall_ms)),
        };
        if let Some(line) = &mut self.status {
            line.update(&status, now_ms);
        }
    }

    /// The metrics to serve.
    #[must_use]
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Gauges sampled once an epoch: watermarks, their lag, state size, memory.
    fn publish_metrics(&mut self) {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        for slot in &self.sources {
            if let Some((_, tracker)) = &slot.event_time
                && let Some(seconds) = watermark_seconds(tracker.current())
            {
                slot.metrics.watermark_seconds.set(seconds);
                slot.metrics
                    .watermark_lag_seconds
                    .set((now_ms as f64 / 1000.0 - seconds).max(0.0));
            }
        }
        for slot in &self.sources {
            for stats in slot.source.partition_stats() {
                self.metrics.source_partition(&slot.name, &stats);
            }
        }
        for (query, m) in self.queries.iter().zip(&self.query_metrics) {
            m.state_keys.set(query.state_groups() as i64);
            m.state_bytes
                .set(i64::try_from(query.state_bytes()).unwrap_or(i64::MAX));
            m.windows_open.set(query.windows_open() as i64);
            let closed = query.windows_closed();
            m.windows_closed
                .inc_by(closed.saturating_sub(m.windows_closed.get()));
        }
        let now = Instant::now();
        let wall_ns = now.duration_since(self.reactor_sampled).as_nanos().max(1) as f64;
        self.reactor_sampled = now;
        self.reactor_busy.resize(self.queries.len(), Vec::new());
        for (query, last) in self.queries.iter().zip(&mut self.reactor_busy) {
            let samples = query.reactors();
            last.resize(samples.len(), 0);
            for (i, (sample, last)) in samples.iter().zip(last.iter_mut()).enumerate() {
                let busy = sample.busy_ns.saturating_sub(*last) as f64 / wall_ns;
                *last = sample.busy_ns;
                self.metrics
                    .reactor(query.name(), i, busy.min(1.0), sample.ring_messages);
            }
        }
        self.metrics.state_store(crate::metrics::StoreSample {
            live_bytes: crate::state::StateStore::bytes(&self.state),
            keys: self.state.keys(),
            arena_bytes: self.state.arena_bytes(),
            dead_ratio: self.state.fragmentation(),
        });
        self.metrics.epoch_closed(self.summary.epochs);
    }
}

/// A query's failure on a batch, a watermark, a tick or a flush.
fn query_failed(query: &dyn Operator, e: &datafusion::error::DataFusionError) -> RunError {
    RunError::Query {
        name: query.name().to_owned(),
        message: e.strip_backtrace(),
    }
}

/// Most reactor threads one query is split over.
pub const REACTORS_MAX: usize = 64;

/// Reactor threads for `runtime.cores` (0: one per core this process may use).
#[must_use]
/// The sinks rows of `source` reach: its dead-letter topic, the sinks reading it or a
/// query downstream of it, and those queries' late-data topics.
fn outlets(
    source: &SourceSlot,
    queries: &[Box<dyn Operator>],
    sinks: &[SinkSlot],
    late_sinks: &[Option<LateSink>],
) -> Vec<Outlet> {
    let mut found: Vec<Outlet> = source
        .dead_letter
        .map(Outlet::DeadLetter)
        .into_iter()
        .collect();
    let mut names = vec![source.name.as_str()];
    while let Some(name) = names.pop() {
        found.extend(
            (0..sinks.len())
                .filter(|&i| sinks[i].from == name)
                .map(Outlet::Sink),
        );
        for (q, query) in queries.iter().enumerate() {
            if query.input() == name {
                if late_sinks.get(q).is_some_and(Option::is_some) {
                    found.push(Outlet::Late(q));
                }
                names.push(query.name());
            }
        }
    }
    found.sort_unstable();
    found.dedup();
    found
}

pub fn reactor_count(cores: u64) -> usize {
    let n = if cores == 0 {
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
    } else {
        usize::try_from(cores).unwrap_or(REACTORS_MAX)
    };
    n.clamp(1, REACTORS_MAX)
}

/// With more than one reactor, each query that can be split by group key runs as `n`
/// copies on `n` reactor threads; the others run on the pipeline thread.
fn split_queries(
    config: &PipelineConfig,
    queries: Vec<Box<dyn Operator>>,
    watermark: &crate::sql::current_watermark::WatermarkCell,
    n: usize,
    durable: &mut Durable,
) -> Result<Vec<Box<dyn Operator>>, RunError> {
    if n < 2 || !queries.iter().any(|q| q.is_stateful()) {
        return Ok(queries);
    }
    let mut copies = Vec::new();
    for _ in 1..n {
        let planned =
            crate::sql::plan_sharing(config, watermark.clone()).map_err(|d| RunError::Query {
                name: config.name.clone(),
                message: format!("planning a copy for another reactor: {d}"),
            })?;
        copies.push(planned.queries.into_iter());
    }
    let mut split = Vec::with_capacity(queries.len());
    let mut next_wal = 0_u32;
    for mut query in queries {
        let mut others: Vec<Box<dyn Operator>> =
            copies.iter_mut().filter_map(Iterator::next).collect();
        assert_eq!(others.len(), n - 1, "every copy plans the same queries");
        if !query.is_stateful() || !query.shard(0, n) {
            split.push(query);
            continue;
        }
        for (i, copy) in others.iter_mut().enumerate() {
            assert!(copy.shard(i + 1, n), "copies of a query split alike");
        }
        let mut operators = vec![query];
        operators.append(&mut others);
        let name = operators[0].name().to_owned();
        // Each reactor of each split query writes its own WAL, numbered in file order.
        let wals = (0..n)
            .map(|_| {
                let index = next_wal;
                next_wal += 1;
                durable.reactor_wal(index)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let sharded = super::reactor::ShardedOperator::start_with_wals(operators, true, wals)
            .map_err(|e| RunError::Query {
                name,
                message: format!("cannot start a reactor thread: {e}"),
            })?;
        split.push(Box::new(sharded));
    }
    Ok(split)
}

/// Flushes `sink` until every record is acknowledged, warning while the broker is slow;
/// until `deadline`, or [`SHUTDOWN_TIMEOUT`] after `stop` is set while it waits.
fn flush_until_done(
    sink: &mut dyn Sink,
    name: &str,
    deadline: Option<Instant>,
    stop: Option<&AtomicBool>,
) -> Result<(), RunError> {
    let started = Instant::now();
    let mut warned = started;
    let mut deadline = deadline;
    loop {
        if deadline.is_none() && stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            tracing::info!(sink = %name,
                "stop requested while waiting for the broker: waiting at most {SHUTDOWN_TIMEOUT:?}");
            deadline = Some(Instant::now() + SHUTDOWN_TIMEOUT);
        }
        let outcome = sink.flush(FLUSH_STEP).map_err(|source| RunError::Sink {
            name: name.to_owned(),
            source,
        })?;
        match outcome {
            FlushOutcome::Done => return Ok(()),
            FlushOutcome::Pending { in_flight } => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(RunError::ShutdownTimeout {
                        what: format!("sink `{name}` ({in_flight} records unacknowledged)"),
                    });
                }
                if warned.elapsed() >= WARN_INTERVAL {
                    warned = Instant::now();
                    tracing::warn!(sink = %name, in_flight, waited_s = started.elapsed().as_secs(),
                        "waiting for the broker to acknowledge records (is it reachable?)");
                }
            }
        }
    }
}

/// An exactly-once sink's output of one epoch, and where it starts in each partition of
/// its topic (as the commit entry recorded).
#[derive(Clone, Copy)]
struct EpochOutput<'a> {
    epoch: u64,
    records: &'a [crate::durability::entry::OutputRecord],
    starts: &'a [(i32, i64)],
}

/// Tries at sending one epoch's exactly-once output before the run stops with the error.
const DELIVERY_ATTEMPTS: u32 = 5;
/// Wait before the second try; doubled for each one after.
const DELIVERY_RETRY_AFTER: Duration = Duration::from_millis(200);

/// Sends an exactly-once sink's output of `epoch` (but the sequence numbers in `skip`),
/// waits for every acknowledgement and commits its transaction (counted in
/// `transactions`); returns how many records the try that succeeded sent.
///
/// A try that fails in a way that sending again can mend (a record refused for good, a
/// transaction the broker requires to be aborted) is abandoned: its transaction is
/// aborted, the sink's topic is read back from `starts` and what it does not hold is
/// sent again, in a new transaction, up to [`DELIVERY_ATTEMPTS`] tries.
fn deliver_epoch(
    sink: &mut KafkaSink,
    name: &str,
    output: EpochOutput<'_>,
    skip: HashSet<u64>,
    deadline: Option<Instant>,
    stop: Option<&AtomicBool>,
    transactions: &crate::metrics::TransactionCounters,
) -> Result<usize, RunError> {
    let EpochOutput {
        epoch,
        records,
        starts,
    } = output;
    let sink_error = |source| RunError::Sink {
        name: name.to_owned(),
        source,
    };
    let mut skip = skip;
    for attempt in 1.. {
        let tried = sink
            .send_epoch(epoch, records, &skip)
            .map_err(sink_error)
            .and_then(|sent| {
                flush_until_done(sink, name, deadline, stop)?;
                let committed = sink.finish_epoch().map_err(sink_error)?;
                Ok((sent, committed))
            });
        let error = match tried {
            Ok((sent, committed)) => {
                transactions.committed.inc_by(u64::from(committed));
                return Ok(sent);
            }
            Err(RunError::Sink { source, .. })
                if attempt < DELIVERY_ATTEMPTS && KafkaSink::retryable(&source) =>
            {
                source
            }
            Err(e) => return Err(e),
        };
        if sink.abandon_epoch().map_err(sink_error)? {
            transactions.aborted.inc();
        }
        let wait = DELIVERY_RETRY_AFTER * 2_u32.pow(attempt - 1);
        tracing::warn!(sink = %name, epoch, attempt, retry_in_ms = wait.as_millis() as u64,
            "sending the epoch's output failed ({error}); its transaction (if any) is aborted \
             and what the topic does not hold is sent again");
        std::thread::sleep(wait);
        skip = sink.read_back(epoch, starts).map_err(sink_error)?;
    }
    unreachable!("the loop returns")
}

/// A query's state failure; a reactor WAL's failure is the WAL's, like the pipeline's.
fn state_failed(name: &str, source: StateError) -> RunError {
    match source {
        StateError::Wal(e) => RunError::Durable(DurableError::Wal(e)),
        source => RunError::State {
            name: name.to_owned(),
            source,
        },
    }
}

/// A source's part of the commit entry: its next offsets and its watermark.
fn source_commit(slot: &SourceSlot, positions: &[SourcePosition]) -> SourceCommit {
    SourceCommit {
        name: slot.name.clone(),
        positions: positions
            .iter()
            .map(|p| (p.topic.clone(), p.partition, p.next_offset))
            .collect(),
        watermark: slot.event_time.as_ref().map(|(_, tracker)| {
            let (current, partitions) = tracker.snapshot();
            WatermarkState {
                current,
                partitions,
                slots: slot.source.partition_slots(),
            }
        }),
    }
}

/// Seeks every source to the offsets of the last commit entry and restores its
/// watermark from the same entry.
fn resume_sources(sources: &mut [SourceSlot], commit: &CommitEntry) -> Result<(), RunError> {
    let now = Instant::now();
    for slot in sources {
        let Some(saved) = commit.sources.iter().find(|s| s.name == slot.name) else {
            tracing::info!(source = %slot.name, "new source: starting from start_from");
            continue;
        };
        let positions: Vec<SourcePosition> = saved
            .positions
            .iter()
            .map(|(topic, partition, next_offset)| SourcePosition {
                topic: topic.clone(),
                partition: *partition,
                next_offset: *next_offset,
            })
            .collect();
        if let Some(wm) = &saved.watermark {
            slot.source.restore_partition_slots(&wm.slots);
        }
        slot.source
            .seek(&positions)
            .map_err(|source| RunError::Source {
                name: slot.name.clone(),
                source: Box::new(source),
            })?;
        if let (Some((_, tracker)), Some(wm)) = (&mut slot.event_time, &saved.watermark) {
            tracker.restore(wm.current, &wm.partitions, now);
        }
    }
    Ok(())
}

/// Feeds each row's event time to the watermark tracker, per partition.
fn observe_event_times(
    tracker: &mut WatermarkTracker,
    batch: &RecordBatch,
    column: usize,
    partitions: Option<&[i32]>,
    now: Instant,
) {
    let Ok(times) = arrow::compute::cast(batch.column(column), &arrow::datatypes::DataType::Int64)
    else {
        return;
    };
    let times = arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(&times);
    match partitions {
        None => {
            if let Some(max) = arrow::compute::max(times) {
                tracker.observe(0, max, now);
            }
        }
        Some(partitions) => {
            let mut max: std::collections::BTreeMap<i32, i64> = std::collections::BTreeMap::new();
            for (t, &p) in times.iter().zip(partitions) {
                if let Some(t) = t {
                    let m = max.entry(p).or_insert(t);
                    *m = (*m).max(t);
                }
            }
            for (p, t) in max {
                tracker.observe(p, t, now);
            }
        }
    }
}
