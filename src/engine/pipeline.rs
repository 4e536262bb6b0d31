//! The pipeline runner: one thread that polls, processes and writes; see the module docs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use laminar_connectors::datagen::{DatagenOptions, DatagenSource};
use laminar_connectors::file::{FileSink, FileSinkOptions, FileSource, FileSourceOptions};
use laminar_connectors::kafka::{
    KafkaClientOptions, KafkaSink, KafkaSinkOptions, KafkaSource, KafkaSourceOptions,
};
use laminar_connectors::stdout::StdoutSink;
use laminar_connectors::{
    DecodeErrorPolicy, FlushOutcome, Rejected, Sink, SinkError, Source, SourceBatch, SourceError,
    SourcePoll,
};

use crate::config::{PipelineConfig, SinkConnector, SourceConnector};
use crate::sql::{CompiledQuery, PlannedPipeline};

/// How long one poll of one source may block when nothing arrives.
const POLL_TIMEOUT: Duration = Duration::from_millis(50);
/// How long one flush call waits before the loop checks for shutdown and logs progress.
const FLUSH_STEP: Duration = Duration::from_secs(1);
/// How often the same warning (waiting for the broker, skipped records) is repeated.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

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
}

/// Settings that come from the command line rather than the file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Overrides `kafka.bootstrap_servers` (the embedded broker's address).
    pub bootstrap_servers: Option<String>,
    /// Stop (cleanly, after a last epoch) once this many records have been read.
    pub records_max: Option<u64>,
}

/// What a finished run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunSummary {
    pub records_in: u64,
    pub records_rejected: u64,
    pub records_out: u64,
    pub epochs: u64,
}

struct SourceSlot {
    name: String,
    source: Box<dyn Source>,
    policy: DecodeErrorPolicy,
    /// Index into `Pipeline::dead_letters`.
    dead_letter: Option<usize>,
    finished: bool,
}

struct SinkSlot {
    name: String,
    from: String,
    sink: Box<dyn Sink>,
}

pub struct Pipeline {
    sources: Vec<SourceSlot>,
    queries: Vec<CompiledQuery>,
    sinks: Vec<SinkSlot>,
    dead_letters: Vec<SinkSlot>,
    epoch_interval: Duration,
    summary: RunSummary,
    records_max: Option<u64>,
    last_skip_warning: Option<Instant>,
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
                } => Box::new(
                    KafkaSource::new(KafkaSourceOptions {
                        name: s.name.clone(),
                        client: kafka.clone(),
                        topic: topic.clone(),
                        group_id: group_id.clone(),
                        start_from: *start_from,
                        columns: s.columns.clone(),
                        metadata: *metadata,
                        on_decode_error: s.on_decode_error,
                    })
                    .map_err(source_error)?,
                ),
                SourceConnector::File { path } => Box::new(
                    FileSource::new(FileSourceOptions {
                        name: s.name.clone(),
                        path: path.clone(),
                        columns: s.columns.clone(),
                        on_decode_error: s.on_decode_error,
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
                    let sink = KafkaSink::new(KafkaSinkOptions {
                        name: name.clone(),
                        client: kafka.clone(),
                        topic: topic.clone(),
                        key_columns: Vec::new(),
                    })
                    .map_err(|source| RunError::Sink {
                        name: name.clone(),
                        source,
                    })?;
                    dead_letters.push(SinkSlot {
                        name,
                        from: s.name.clone(),
                        sink: Box::new(sink),
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
            });
        }
        let mut sinks = Vec::new();
        for s in &config.sinks {
            let sink_error = |source| RunError::Sink {
                name: s.name.clone(),
                source,
            };
            let sink: Box<dyn Sink> = match &s.connector {
                SinkConnector::Kafka { topic } => {
                    let schema = planned.schemas.get(&s.from);
                    let key_columns = s
                        .key
                        .iter()
                        .filter_map(|(k, _)| schema.and_then(|sc| sc.index_of(k).ok()))
                        .collect();
                    Box::new(
                        KafkaSink::new(KafkaSinkOptions {
                            name: s.name.clone(),
                            client: kafka.clone(),
                            topic: topic.clone(),
                            key_columns,
                        })
                        .map_err(sink_error)?,
                    )
                }
                SinkConnector::File { path } => Box::new(
                    FileSink::new(&FileSinkOptions {
                        name: s.name.clone(),
                        path: path.clone(),
                    })
                    .map_err(sink_error)?,
                ),
                SinkConnector::Stdout => Box::new(StdoutSink::default()),
            };
            sinks.push(SinkSlot {
                name: s.name.clone(),
                from: s.from.clone(),
                sink,
            });
        }
        Ok(Self {
            sources,
            queries: planned.queries,
            sinks,
            dead_letters,
            epoch_interval: Duration::from_millis(config.state.checkpoint_interval_ms),
            summary: RunSummary::default(),
            records_max: options.records_max,
            last_skip_warning: None,
        })
    }

    /// Runs until every source is finished, `stop` is set or `records_max` is reached;
    /// then closes a last epoch.
    pub fn run(mut self, stop: &AtomicBool) -> Result<RunSummary, RunError> {
        let mut epoch_started = Instant::now();
        let poll_timeout = POLL_TIMEOUT / u32::try_from(self.sources.len().max(1)).unwrap_or(1);
        while !stop.load(Ordering::Relaxed) {
            let mut live = 0;
            for i in 0..self.sources.len() {
                if self.sources[i].finished {
                    continue;
                }
                live += 1;
                let polled = self.sources[i].source.poll(poll_timeout);
                let polled = polled.map_err(|source| RunError::Source {
                    name: self.sources[i].name.clone(),
                    source: Box::new(source),
                })?;
                match polled {
                    SourcePoll::Batch(batch) => self.process(i, batch)?,
                    SourcePoll::Idle => {}
                    SourcePoll::Finished => {
                        tracing::info!(source = %self.sources[i].name, "source drained");
                        self.sources[i].finished = true;
                    }
                }
            }
            if live == 0
                || self
                    .records_max
                    .is_some_and(|max| self.summary.records_in >= max)
            {
                break;
            }
            if epoch_started.elapsed() >= self.epoch_interval {
                self.close_epoch(false)?;
                epoch_started = Instant::now();
            }
        }
        self.close_epoch(true)?;
        Ok(self.summary)
    }

    fn process(&mut self, source: usize, input: SourceBatch) -> Result<(), RunError> {
        let SourceBatch { batch, rejected } = input;
        self.summary.records_in += (batch.num_rows() + rejected.len()) as u64;
        if !rejected.is_empty() {
            self.reject(source, &rejected)?;
        }
        if batch.num_rows() == 0 {
            return Ok(());
        }
        // Named outputs of this batch: the source's, then each query that (transitively) reads it.
        let mut outputs: Vec<(&str, RecordBatch)> =
            vec![(self.sources[source].name.as_str(), batch)];
        for query in &self.queries {
            let Some(input) = outputs
                .iter()
                .find(|(n, _)| *n == query.input)
                .map(|(_, b)| b)
            else {
                continue;
            };
            let out = query.process(input).map_err(|e| RunError::Query {
                name: query.name.clone(),
                message: e.strip_backtrace(),
            })?;
            outputs.push((query.name.as_str(), out));
        }
        for sink in &mut self.sinks {
            let Some((_, out)) = outputs.iter().find(|(n, _)| *n == sink.from) else {
                continue;
            };
            if out.num_rows() == 0 {
                continue;
            }
            self.summary.records_out += out.num_rows() as u64;
            sink.sink.write(out).map_err(|source| RunError::Sink {
                name: sink.name.clone(),
                source,
            })?;
        }
        Ok(())
    }

    fn reject(&mut self, source: usize, rejected: &[Rejected]) -> Result<(), RunError> {
        self.summary.records_rejected += rejected.len() as u64;
        let slot = &self.sources[source];
        if let (DecodeErrorPolicy::DeadLetter, Some(dl)) = (slot.policy, slot.dead_letter) {
            let sink = &mut self.dead_letters[dl];
            return sink
                .sink
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

    /// Flushes every sink until acknowledged, then commits every source's positions.
    fn close_epoch(&mut self, last: bool) -> Result<(), RunError> {
        let positions: Vec<_> = self.sources.iter().map(|s| s.source.positions()).collect();
        for slot in self.sinks.iter_mut().chain(self.dead_letters.iter_mut()) {
            let started = Instant::now();
            let mut warned = started;
            loop {
                let outcome = slot
                    .sink
                    .flush(FLUSH_STEP)
                    .map_err(|source| RunError::Sink {
                        name: slot.name.clone(),
                        source,
                    })?;
                match outcome {
                    FlushOutcome::Done => break,
                    FlushOutcome::Pending { in_flight } => {
                        if warned.elapsed() >= WARN_INTERVAL {
                            warned = Instant::now();
                            tracing::warn!(sink = %slot.name, in_flight, waited_s = started.elapsed().as_secs(),
                                "waiting for the broker to acknowledge records (is it reachable?)");
                        }
                    }
                }
            }
        }
        for (slot, positions) in self.sources.iter_mut().zip(&positions) {
            slot.source
                .commit(positions, last)
                .map_err(|source| RunError::Source {
                    name: slot.name.clone(),
                    source: Box::new(source),
                })?;
        }
        self.summary.epochs += 1;
        Ok(())
    }
}
