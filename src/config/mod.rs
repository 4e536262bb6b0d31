//! The pipeline file: its model, and the loader that reads it.
//!
//! `load` interpolates `${VAR}`s, parses YAML with positions, and decodes every section,
//! collecting every problem at once as `FILE:LINE:COL: error: ...` (unknown keys, wrong
//! types, misspelled choices with a did-you-mean hint, references to names that don't
//! exist). SQL is checked afterwards by `sql::plan`, which maps its errors back into the
//! file through [`SqlOrigin`]. The docs on each field are the reference for its YAML key.

pub mod ddl;
pub mod diagnostic;
mod interpolate;
mod yaml;

use saphyr::{LoadableYamlNode, MarkedYamlOwned, YamlDataOwned};

use std::sync::Arc;

use laminar_connectors::DecodeErrorPolicy;
use laminar_connectors::datagen::NexmarkTable;
use laminar_connectors::format::avro::RegistryOptions;
use laminar_connectors::format::avro::registry::DEFAULT_REGISTRY_TIMEOUT;
use laminar_connectors::format::json::DecodeColumn;
use laminar_connectors::format::{COLUMN_TYPE_NAMES, ColumnType, parse_column_type};
use laminar_connectors::kafka::admin::NewTopicSpec;
use laminar_connectors::kafka::{
    KafkaClientOptions, MetadataColumns, MissingTopic, StartFrom, Topics,
};

pub use diagnostic::{Diagnostic, Diagnostics, Pos, did_you_mean, hint};
use interpolate::Substitution;
use yaml::{Node, Reader, pos};

/// `bootstrap_servers` when the file names none.
pub const DEFAULT_BOOTSTRAP_SERVERS: &str = "127.0.0.1:9092";
/// Default `state.checkpoint_interval_ms`: how often an epoch closes (sinks flushed,
/// source positions committed).
pub const DEFAULT_CHECKPOINT_INTERVAL_MS: u64 = 1000;
/// Default `state.memory_bytes_max`: 1 GiB.
pub const DEFAULT_MEMORY_BYTES_MAX: u64 = 1 << 30;
/// Default `datagen.auctions`: distinct auction ids bids are spread over.
pub const DEFAULT_DATAGEN_AUCTIONS: u64 = 10_000;

/// A whole pipeline file.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// The file it was read from (for messages).
    pub file: String,
    /// `pipeline`: the name; metrics label, state sub-directory, default consumer group.
    pub name: String,
    /// `kafka`: shared by every Kafka source, sink and dead-letter topic.
    pub kafka: KafkaClientOptions,
    /// `kafka.create_topics`: `{ partitions, replication_factor }` for output topics
    /// laminar creates when they do not exist (absent: it creates none; the broker may).
    pub create_topics: Option<NewTopicSpec>,
    /// `sources`: where records come from.
    pub sources: Vec<SourceConfig>,
    /// `queries`: SQL continuous queries, each reading a source or an earlier query.
    pub queries: Vec<QueryConfig>,
    /// `sinks`: where query (or source) results go.
    pub sinks: Vec<SinkConfig>,
    /// `state`
    pub state: StateConfig,
    /// `runtime`
    pub runtime: RuntimeConfig,
    /// `metrics`
    pub metrics: MetricsConfig,
    /// `schema_registry`: where Avro sources and sinks find and register schemas (the
    /// Confluent wire format); absent: Avro is plain, with `avro_schema` in the file.
    pub schema_registry: Option<RegistryConfig>,
}

impl PipelineConfig {
    /// Every Kafka topic the pipeline writes: sinks, dead-letter and late-data topics.
    #[must_use]
    pub fn output_topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self
            .sinks
            .iter()
            .filter_map(|s| match &s.connector {
                SinkConnector::Kafka { topic } => Some(topic.clone()),
                _ => None,
            })
            .chain(
                self.sources
                    .iter()
                    .filter_map(|s| s.dead_letter_topic.clone()),
            )
            .chain(
                self.queries
                    .iter()
                    .filter_map(|q| q.late_data_topic.clone()),
            )
            .collect();
        topics.sort();
        topics.dedup();
        topics
    }

    /// Every Kafka topic the pipeline names: the sources' (by name; patterns name none)
    /// and the output topics.
    #[must_use]
    pub fn topics(&self) -> Vec<String> {
        let mut topics = self.output_topics();
        topics.extend(self.sources.iter().filter_map(|s| match &s.connector {
            SourceConnector::Kafka {
                topic: Topics::Name(t),
                ..
            } => Some(t.clone()),
            _ => None,
        }));
        topics.sort();
        topics.dedup();
        topics
    }
}

#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// `url`, `username`, `password` (a secret: write `${VAR}`), `timeout_ms`.
    pub options: RegistryOptions,
    pub pos: Pos,
}

/// `format` of a source or a sink.
#[derive(Debug, Clone)]
pub enum FormatConfig {
    /// JSON objects (the default).
    Json,
    /// Avro: with a `schema_registry`, the Confluent wire format; without, plain datums.
    Avro {
        /// `avro_schema`: without a registry, the schema every message is written with;
        /// with one, the reader schema a source's columns come from (and a sink's schema
        /// to register instead of the one derived from its columns).
        schema: Option<Arc<apache_avro::Schema>>,
        /// `subject`: the registry subject (default `<topic>-value`).
        subject: String,
    },
}

impl FormatConfig {
    #[must_use]
    pub fn is_avro(&self) -> bool {
        matches!(self, Self::Avro { .. })
    }
}

/// How a Kafka source reads message keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFormat {
    /// `string` (default): the key is only the `_key` metadata column, as text.
    String,
    /// `json`: a JSON object decoded into the `key_schema` columns.
    Json,
    /// `avro`: the schema registry's Avro wire format, decoded into the `key_schema`
    /// columns, or those of subject `<topic>-key`.
    Avro,
}

/// A Kafka source's message keys.
#[derive(Debug, Clone)]
pub struct KeyConfig {
    /// `key_format`
    pub format: KeyFormat,
    /// `key_schema`: the key's columns, added after the value's; for `avro` with a
    /// registry and no `key_schema`, filled from `subject` when the pipeline starts.
    pub columns: Vec<DecodeColumn>,
    /// The registry subject of an Avro key (`<topic>-key`).
    pub subject: String,
    /// Key columns that came from the registry, with its schema's defaults and aliases.
    pub reader: Option<laminar_connectors::format::avro::AvroReader>,
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// `name`: how queries refer to it (a lowercase SQL identifier).
    pub name: String,
    pub pos: Pos,
    pub connector: SourceConnector,
    /// `schema`: column name -> type (`BIGINT`, `VARCHAR NULL`, `TIMESTAMP`, ...). Columns
    /// are NOT NULL unless the type ends in `NULL`.
    pub columns: Vec<DecodeColumn>,
    /// `event_time`: the column that carries event time, and the watermark policy.
    pub event_time: Option<EventTimeConfig>,
    /// `on_decode_error`: `dead_letter` (default when `dead_letter_topic` is set), `skip`
    /// (default otherwise), or `fail`.
    pub on_decode_error: DecodeErrorPolicy,
    /// `dead_letter_topic`: Kafka topic for records that fail to decode, with the reason
    /// in the `laminar.error` header.
    pub dead_letter_topic: Option<String>,
    /// `format`: `json` (default) or `avro`.
    pub format: FormatConfig,
    pub format_pos: Pos,
    /// With `format: avro`, a registry and neither `schema` nor `avro_schema`: the
    /// columns come from the latest schema of this subject when the pipeline starts
    /// (`columns` is empty until then).
    pub columns_from_registry: Option<String>,
    /// Columns that came from an Avro schema (`avro_schema` or the registry), with that
    /// schema's defaults and aliases, to read older and newer writers' records.
    pub avro_reader: Option<laminar_connectors::format::avro::AvroReader>,
}

impl SourceConfig {
    /// Whether some columns are known only once the registry is asked (at run time).
    #[must_use]
    pub fn needs_registry(&self) -> bool {
        self.columns_from_registry.is_some()
            || matches!(&self.connector, SourceConnector::Kafka { key, .. }
                if key.format == KeyFormat::Avro && key.columns.is_empty())
    }
}

#[derive(Debug, Clone)]
pub enum SourceConnector {
    Kafka {
        /// `topic`, or `topic_pattern`: a regular expression a topic's whole name must
        /// match (Kafka's internal `__` topics excepted); new matching topics are picked
        /// up as they appear.
        topic: Topics,
        /// `group_id`: consumer group (default: the pipeline name).
        group_id: String,
        /// `start_from`: `earliest` (default), `latest` or `committed`: where to begin in a
        /// partition that has no committed position yet.
        start_from: StartFrom,
        /// `metadata_columns`: any of `key`, `partition`, `offset`, `timestamp`, added as
        /// `_key`, `_partition`, `_offset`, `_timestamp` after the declared columns.
        metadata: MetadataColumns,
        /// `key_format`, `key_schema`
        key: KeyConfig,
        /// `headers`: header name -> column (VARCHAR NULL, the header's value as UTF-8),
        /// added after the metadata columns.
        headers: Vec<(String, String)>,
        /// `on_missing_topic`: `fail` (default: exit 2 once the broker has said for 5 s
        /// that the topic does not exist) or `wait`.
        on_missing_topic: MissingTopic,
    },
    File {
        /// `path`: a JSON-lines file, read once.
        path: String,
        /// `batch_rows`: rows per batch (default and most 4096). The watermark moves after
        /// each batch: small batches give finer event-time steps, large ones speed.
        batch_rows: usize,
    },
    Datagen {
        /// `table`: `bid` (default), `auction` or `person`.
        table: NexmarkTable,
        /// `events`: how many, then the source is finished (absent: unbounded).
        events: Option<u64>,
        /// `rate_per_s`: events per second (absent: as fast as the pipeline goes).
        rate_per_s: Option<u64>,
        /// `seed`: same seed, same events (default 0).
        seed: u64,
        /// `auctions`: distinct auction ids that bids go to (default 10,000).
        auctions: u64,
    },
}

#[derive(Debug, Clone)]
pub struct EventTimeConfig {
    /// `column`: a TIMESTAMP or BIGINT (epoch milliseconds) column of the schema.
    pub column: String,
    pub pos: Pos,
    /// `watermark_delay_ms`: how far behind the largest event time seen the watermark
    /// stays, per partition (bounded out-of-orderness). Default 0.
    pub watermark_delay_ms: u64,
    /// `idle_timeout_ms`: a partition silent this long stops holding the watermark back
    /// (absent: never).
    pub idle_timeout_ms: Option<u64>,
    /// `max_drift_ms`: watermark alignment. A partition whose watermark is more than this
    /// ahead of the slowest active partition of any source is paused until the others
    /// catch up (absent: never paused).
    pub max_drift_ms: Option<u64>,
}

/// Where a query's SQL text sits in the file, line by line, to map SQL errors back.
#[derive(Debug, Clone, Default)]
pub struct SqlOrigin {
    /// Position in the file of the first character of each SQL line.
    pub lines: Vec<Pos>,
}

impl SqlOrigin {
    /// The file position of a 1-based SQL (line, column).
    #[must_use]
    pub fn map(&self, line: u64, column: u64) -> Pos {
        let i = (line.max(1) - 1) as usize;
        match self.lines.get(i).or(self.lines.last()) {
            Some(p) => Pos {
                line: p.line,
                col: p.col + column.max(1) as usize - 1,
            },
            None => Pos::default(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct QueryConfig {
    /// `name`: how sinks and later queries refer to it.
    pub name: String,
    pub pos: Pos,
    /// `sql`: one SELECT.
    pub sql: String,
    pub sql_origin: SqlOrigin,
    /// `emit`: `on_window_close` (default), `on_update`, or `{ every_ms: N }`.
    pub emit: EmitPolicy,
    /// `allowed_lateness_ms`: how long after a window's end late records still update it.
    pub allowed_lateness_ms: u64,
    /// `late_data_topic`: Kafka topic for records too late for their window.
    pub late_data_topic: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmitPolicy {
    OnWindowClose,
    OnUpdate,
    EveryMs(u64),
}

#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// `name`
    pub name: String,
    pub pos: Pos,
    /// `from`: the query (or source) whose rows this sink writes.
    pub from: String,
    pub from_pos: Pos,
    pub connector: SinkConnector,
    /// `key`: columns whose values form the Kafka message key: one column's value as
    /// text, or a JSON object of several.
    pub key: Vec<(String, Pos)>,
    /// `delivery`: `at_least_once` (default) or `exactly_once`.
    pub delivery: Delivery,
    pub delivery_pos: Pos,
    /// `transactions`: with `exactly_once`, whether to use Kafka transactions (default true).
    pub transactions: bool,
    /// `format`: `json` (default) or `avro`.
    pub format: FormatConfig,
    pub format_pos: Pos,
    /// `key_format`: `json` (a JSON object of the key columns, even one) or `avro`
    /// (registered under `<topic>-key`); absent: one key column's value as text, several
    /// as a JSON object.
    pub key_format: Option<KeyFormat>,
    pub key_format_pos: Pos,
    /// `headers`: header name -> column whose value (as text) each record carries.
    pub headers: Vec<(String, String, Pos)>,
    /// `timestamp`: a TIMESTAMP column that sets each record's Kafka timestamp (absent:
    /// the time the producer sends it).
    pub timestamp: Option<(String, Pos)>,
}

#[derive(Debug, Clone)]
pub enum SinkConnector {
    /// `topic`
    Kafka {
        topic: String,
    },
    /// `path`: JSON lines, appended.
    File {
        path: String,
    },
    Stdout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    AtLeastOnce,
    ExactlyOnce,
}

#[derive(Debug, Clone)]
pub struct StateConfig {
    /// `dir`: where state and the write-ahead log live (default `./state/<pipeline>`).
    pub dir: String,
    /// `checkpoint_interval_ms`: how often an epoch closes: sinks flushed, positions
    /// committed. Default 1000.
    pub checkpoint_interval_ms: u64,
    /// `memory_bytes_max`: bound on operator state. Default 1 GiB.
    pub memory_bytes_max: u64,
    /// `huge_pages`: ask for transparent huge pages on the state arena. Default false.
    pub huge_pages: bool,
    /// `checkpoint_wal_bytes`: WAL bytes since the last checkpoint that make the next
    /// one due (at least the state's size). Default 64 MiB.
    pub checkpoint_wal_bytes: u64,
    /// `compaction_min_bytes`: the smallest state arena a checkpoint compacts (once
    /// superseded records are over half of it). Default 64 MiB.
    pub compaction_min_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// `cores`: reactor threads; 0 = one per available core.
    pub cores: u64,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// `listen`: `host:port` for `/metrics`, `/health`, `/ready` (absent: off).
    pub listen: Option<String>,
}

const TOP_KEYS: &[&str] = &[
    "pipeline",
    "kafka",
    "schema_registry",
    "sources",
    "queries",
    "sinks",
    "state",
    "runtime",
    "metrics",
];
const REGISTRY_KEYS: &[&str] = &["url", "username", "password", "timeout_ms"];
const EVENT_TIME_KEYS: &[&str] = &[
    "column",
    "watermark_delay_ms",
    "idle_timeout_ms",
    "max_drift_ms",
];

const SOURCE_KEYS: &[&str] = &[
    "name",
    "connector",
    "topic",
    "path",
    "format",
    "schema",
    "sql",
    "event_time",
    "start_from",
    "group_id",
    "metadata_columns",
    "on_decode_error",
    "dead_letter_topic",
    "events",
    "rate_per_s",
    "seed",
    "table",
    "auctions",
    "batch_rows",
    "avro_schema",
    "subject",
    "key_format",
    "key_schema",
    "headers",
    "on_missing_topic",
    "topic_pattern",
];
const QUERY_KEYS: &[&str] = &[
    "name",
    "sql",
    "emit",
    "allowed_lateness_ms",
    "late_data_topic",
];
const SINK_KEYS: &[&str] = &[
    "name",
    "from",
    "connector",
    "topic",
    "path",
    "format",
    "key",
    "delivery",
    "transactions",
    "avro_schema",
    "subject",
    "key_format",
    "headers",
    "timestamp",
];
const KAFKA_KEYS: &[&str] = &["bootstrap_servers", "properties", "create_topics"];
const CREATE_TOPICS_KEYS: &[&str] = &["partitions", "replication_factor"];
const EMIT_KEYS: &[&str] = &["every_ms"];
const STATE_KEYS: &[&str] = &[
    "dir",
    "checkpoint_interval_ms",
    "memory_bytes_max",
    "huge_pages",
    "checkpoint_wal_bytes",
    "compaction_min_bytes",
];
const RUNTIME_KEYS: &[&str] = &["cores"];
const METRICS_KEYS: &[&str] = &["listen"];

/// Every key a pipeline file may hold, by where it goes (`sources[].` is each source):
/// what the README's reference must document.
pub const KEYS: &[(&str, &[&str])] = &[
    ("", TOP_KEYS),
    ("kafka.", KAFKA_KEYS),
    ("kafka.create_topics.", CREATE_TOPICS_KEYS),
    ("schema_registry.", REGISTRY_KEYS),
    ("sources[].", SOURCE_KEYS),
    ("sources[].event_time.", EVENT_TIME_KEYS),
    ("queries[].", QUERY_KEYS),
    ("queries[].emit.", EMIT_KEYS),
    ("sinks[].", SINK_KEYS),
    ("state.", STATE_KEYS),
    ("runtime.", RUNTIME_KEYS),
    ("metrics.", METRICS_KEYS),
];

const SOURCE_CONNECTORS: &[&str] = &["kafka", "file", "datagen"];
const SINK_CONNECTORS: &[&str] = &["kafka", "file", "stdout"];
const FORMATS: &[&str] = &["json", "avro"];

/// Reads and checks a pipeline file (everything but SQL).
pub fn load(file: &str) -> Result<PipelineConfig, Diagnostics> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        Diagnostics(vec![Diagnostic {
            file: file.to_owned(),
            pos: Pos { line: 1, col: 1 },
            message: format!("cannot read the file: {e}"),
        }])
    })?;
    parse(file, &text, &|name| std::env::var(name).ok())
}

/// Reads a pipeline from `text`; `file` is used in messages. `env` looks up variables.
pub fn parse(
    file: &str,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PipelineConfig, Diagnostics> {
    let mut r = Reader::new(file);
    let interpolated = interpolate::interpolate(text, env);
    for m in interpolated.missing {
        r.error(m.pos, format!("environment variable `{}` is not set and has no default (write `${{{}:-default}}`)", m.name, m.name));
    }
    let subs = interpolated.substitutions;
    let text = interpolated.text;
    let docs = match MarkedYamlOwned::load_from_str(&text) {
        Ok(d) => d,
        Err(e) => {
            let m = e.marker();
            r.error(
                Pos {
                    line: m.line(),
                    col: m.col() + 1,
                },
                format!("invalid YAML: {}", e.info()),
            );
            return Err(finish(r));
        }
    };
    let Some(root) = docs.first() else {
        r.error(
            Pos { line: 1, col: 1 },
            "the file is empty; a pipeline needs `pipeline`, `sources`, `queries` and `sinks`",
        );
        return Err(finish(r));
    };
    let config = decode(&mut r, root, &text, &subs);
    match config {
        Some(c) if r.diagnostics.is_empty() => Ok(c),
        _ => Err(finish(r)),
    }
}

fn finish(r: Reader) -> Diagnostics {
    let mut d = r.diagnostics;
    d.sort_by_key(|d| d.pos);
    Diagnostics(d)
}

fn decode(
    r: &mut Reader,
    root: &Node,
    text: &str,
    subs: &[Substitution],
) -> Option<PipelineConfig> {
    let top = r.mapping(root, "the pipeline file", TOP_KEYS)?;
    let name = r
        .required(&top, "pipeline", "the pipeline file")
        .and_then(|n| {
            let name = r.string(n, "`pipeline`")?;
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                r.error(
                    pos(n),
                    format!("pipeline name `{name}` may use only letters, digits, `_` and `-`"),
                );
            }
            Some(name)
        });
    let (kafka, create_topics) = decode_kafka(r, top.get("kafka"), subs);
    let schema_registry = decode_registry(r, top.get("schema_registry"), subs);
    let pipeline_name = name.clone().unwrap_or_default();

    let mut sources = Vec::new();
    if let Some(list) = r
        .required(&top, "sources", "the pipeline file")
        .and_then(|n| r.sequence(n, "`sources`"))
    {
        for node in list {
            if let Some(s) = decode_source(r, node, &pipeline_name, schema_registry.is_some()) {
                sources.push(s);
            }
        }
    }
    let mut queries = Vec::new();
    if let Some(list) = top.get("queries").and_then(|n| r.sequence(n, "`queries`")) {
        for node in list {
            if let Some(q) = decode_query(r, node, text) {
                queries.push(q);
            }
        }
    }
    apply_timestamp_by(r, &mut sources, &mut queries);
    let mut relations = declared(&top, "sources");
    relations.extend(declared(&top, "queries"));
    let mut sinks = Vec::new();
    if let Some(list) = r
        .required(&top, "sinks", "the pipeline file")
        .and_then(|n| r.sequence(n, "`sinks`"))
    {
        for node in list {
            if let Some(s) = decode_sink(r, node, &relations, schema_registry.is_some()) {
                sinks.push(s);
            }
        }
    }
    let state = decode_state(r, top.get("state"), &pipeline_name);
    let runtime = RuntimeConfig {
        cores: top
            .get("runtime")
            .and_then(|n| r.mapping(n, "`runtime`", RUNTIME_KEYS))
            .and_then(|f| f.get("cores").and_then(|c| r.u64(c, "`cores`")))
            .unwrap_or(0),
    };
    let metrics = MetricsConfig {
        listen: top
            .get("metrics")
            .and_then(|n| r.mapping(n, "`metrics`", METRICS_KEYS))
            .and_then(|f| f.get("listen").and_then(|l| r.string(l, "`listen`"))),
    };
    check_names(r, &relations, &declared(&top, "sinks"));
    Some(PipelineConfig {
        file: r.file().to_owned(),
        name: name?,
        kafka,
        sources,
        queries,
        sinks,
        state,
        runtime,
        metrics,
        schema_registry,
        create_topics,
    })
}

/// A secret's value must come whole from the environment (one `${VAR}`, not a
/// `:-default` written in the file): a file is read, copied and committed; the
/// environment of a deployment is where secrets are kept.
fn check_secret(r: &mut Reader, node: &Node, key: &str, subs: &[Substitution]) {
    let at = pos(node);
    let from_env = subs.iter().any(|s| {
        s.line == at.line && (s.col_start == at.col || s.col_start == at.col + 1) && !s.from_default
    });
    if !from_env {
        r.error(
            at,
            format!("`{key}` is a secret: write it as `${{VAR}}` and set VAR in the environment, not in the file"),
        );
    }
}

fn decode_registry(
    r: &mut Reader,
    node: Option<&Node>,
    subs: &[Substitution],
) -> Option<RegistryConfig> {
    let node = node?;
    let f = r.mapping(node, "`schema_registry`", REGISTRY_KEYS)?;
    let url_node = r.required(&f, "url", "`schema_registry`")?;
    let url = r.string(url_node, "`schema_registry.url`")?;
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        r.error(
            pos(url_node),
            "`schema_registry.url` must start with http:// or https://",
        );
    }
    // `user:password@` in the URL makes the URL a secret.
    let authority = url
        .split_once("://")
        .map_or("", |(_, rest)| rest.split('/').next().unwrap_or_default());
    if authority
        .rsplit_once('@')
        .is_some_and(|(info, _)| info.contains(':'))
    {
        check_secret(r, url_node, "schema_registry.url", subs);
    }
    let username = f
        .get("username")
        .and_then(|n| r.string(n, "`schema_registry.username`"));
    let password = f.get("password").and_then(|n| {
        check_secret(r, n, "schema_registry.password", subs);
        r.string(n, "`schema_registry.password`")
    });
    if password.is_some() && username.is_none() {
        r.error(f.pos, "`schema_registry.password` needs `username`");
    }
    let timeout = match f.get("timeout_ms") {
        None => DEFAULT_REGISTRY_TIMEOUT,
        Some(n) => match r.positive_u64(n, "`timeout_ms`") {
            Some(ms) => std::time::Duration::from_millis(ms),
            None => DEFAULT_REGISTRY_TIMEOUT,
        },
    };
    Some(RegistryConfig {
        options: RegistryOptions {
            url,
            username,
            password,
            timeout,
        },
        pos: pos(node),
    })
}

fn decode_kafka(
    r: &mut Reader,
    node: Option<&Node>,
    subs: &[Substitution],
) -> (KafkaClientOptions, Option<NewTopicSpec>) {
    let mut options = KafkaClientOptions {
        bootstrap_servers: DEFAULT_BOOTSTRAP_SERVERS.to_owned(),
        properties: Vec::new(),
    };
    let Some(fields) = node.and_then(|n| r.mapping(n, "`kafka`", KAFKA_KEYS)) else {
        return (options, None);
    };
    let create_topics = fields.get("create_topics").and_then(|n| {
        let f = r.mapping(n, "`create_topics`", CREATE_TOPICS_KEYS)?;
        let partitions = match f.get("partitions") {
            None => 1,
            Some(p) => match r.u64(p, "`partitions`") {
                Some(v) if (1..=100_000).contains(&v) => v as i32,
                Some(_) => {
                    r.error(pos(p), "`partitions` must be between 1 and 100000");
                    1
                }
                None => 1,
            },
        };
        let replication_factor = match f.get("replication_factor") {
            None => -1,
            Some(p) => match r.u64(p, "`replication_factor`") {
                Some(v) if (1..=100).contains(&v) => v as i32,
                Some(_) => {
                    r.error(pos(p), "`replication_factor` must be between 1 and 100 (absent: the broker's default)");
                    -1
                }
                None => -1,
            },
        };
        Some(NewTopicSpec {
            partitions,
            replication_factor,
        })
    });
    if let Some(b) = fields
        .get("bootstrap_servers")
        .and_then(|n| r.string(n, "`bootstrap_servers`"))
    {
        options.bootstrap_servers = b;
    }
    if let Some(props) = fields.get("properties") {
        if let YamlDataOwned::Mapping(map) = &props.data {
            for (k, v_node) in map {
                if let (Some(k), Some(v)) = (
                    r.string(k, "a Kafka property name"),
                    r.string(v_node, "a Kafka property value"),
                ) {
                    if laminar_connectors::kafka::is_secret_property(&k) {
                        check_secret(r, v_node, &k, subs);
                    }
                    options.properties.push((k, v));
                }
            }
        } else if !yaml::is_null(props) {
            r.error(
                pos(props),
                "`properties` must be a mapping of librdkafka settings",
            );
        }
    }
    (options, create_topics)
}

fn sql_identifier(r: &mut Reader, node: &Node, what: &str) -> Option<String> {
    let name = r.string(node, what)?;
    let ok = name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        r.error(
            pos(node),
            format!("{what} `{name}` must be a lowercase SQL identifier (letters a-z, digits, `_`), as queries refer to it by name"),
        );
    }
    Some(name)
}

/// The `name` of a list item, read before its other keys so that messages can use it.
fn peek_name(node: &Node) -> Option<String> {
    let YamlDataOwned::Mapping(map) = &node.data else {
        return None;
    };
    map.iter()
        .find(|(k, _)| yaml::scalar_text(k).as_deref() == Some("name"))
        .and_then(|(_, v)| yaml::scalar_text(v))
}

fn owner(kind: &str, node: &Node) -> String {
    peek_name(node).map_or_else(|| format!("a {kind}"), |n| format!("{kind} `{n}`"))
}

/// Source keys that only kafka sources take.
const KAFKA_ONLY: [&str; 11] = [
    "topic",
    "topic_pattern",
    "on_missing_topic",
    "group_id",
    "start_from",
    "metadata_columns",
    "key_format",
    "key_schema",
    "headers",
    "avro_schema",
    "subject",
];

fn decode_source(
    r: &mut Reader,
    node: &Node,
    pipeline: &str,
    registry: bool,
) -> Option<SourceConfig> {
    let what = owner("source", node);
    let f = r.mapping(node, &what, SOURCE_KEYS)?;
    let name = r
        .required(&f, "name", "a source")
        .and_then(|n| sql_identifier(r, n, "source name"));
    let connector_node = r.required(&f, "connector", &what);
    let connector_name = connector_node.and_then(|n| {
        r.choice(n, "connector", SOURCE_CONNECTORS, |s| {
            SOURCE_CONNECTORS.contains(&s).then(|| s.to_owned())
        })
    });
    let only_for = |r: &mut Reader, keys: &[&str], connector: &str| {
        for key in keys {
            if let Some(n) = f.get(key) {
                r.error(
                    pos(n),
                    format!("`{key}` does not apply to a `{connector}` source"),
                );
            }
        }
    };
    let connector = match connector_name.as_deref() {
        Some("kafka") => {
            only_for(
                r,
                &[
                    "path",
                    "events",
                    "rate_per_s",
                    "seed",
                    "table",
                    "auctions",
                    "batch_rows",
                ],
                "kafka",
            );
            let topic = match (f.get("topic"), f.get("topic_pattern")) {
                (Some(n), None) => r.string(n, "`topic`").map(Topics::Name),
                (None, Some(n)) => r.string(n, "`topic_pattern`").and_then(|pattern| {
                    match regex::Regex::new(&format!("^(?:{pattern})$")) {
                        Ok(re) => Some(Topics::Pattern(re)),
                        Err(e) => {
                            r.error(
                                pos(n),
                                format!("`topic_pattern` is not a valid regular expression: {e}"),
                            );
                            None
                        }
                    }
                }),
                (Some(n), Some(_)) => {
                    r.error(
                        pos(n),
                        format!("{what} has both `topic` and `topic_pattern`; keep one"),
                    );
                    None
                }
                (None, None) => {
                    r.error(f.pos, format!("{what} needs `topic` (or `topic_pattern`)"));
                    None
                }
            };
            let topic_name = match &topic {
                Some(Topics::Name(t)) => t.clone(),
                _ => String::new(),
            };
            let group_id = f
                .get("group_id")
                .and_then(|n| r.string(n, "`group_id`"))
                .unwrap_or_else(|| pipeline.to_owned());
            let start_from = f.get("start_from").map_or(Some(StartFrom::Earliest), |n| {
                r.choice(n, "start_from", &StartFrom::NAMES, StartFrom::from_name)
            });
            let mut metadata = MetadataColumns::default();
            if let Some(list) = f
                .get("metadata_columns")
                .and_then(|n| r.strings(n, "a metadata column"))
            {
                for (m, p) in list {
                    match m.as_str() {
                        "key" => metadata.key = true,
                        "partition" => metadata.partition = true,
                        "offset" => metadata.offset = true,
                        "timestamp" => metadata.timestamp = true,
                        other => {
                            let h = hint(other, MetadataColumns::NAMES);
                            r.error(p, format!("unknown metadata column `{other}`{h}; expected any of: key, partition, offset, timestamp"));
                        }
                    }
                }
            }
            let key = decode_key(r, &f, &what, &topic_name, registry);
            if key.format == KeyFormat::Avro
                && key.columns.is_empty()
                && matches!(topic, Some(Topics::Pattern(_)))
            {
                r.error(
                    f.get("key_format").map_or(f.pos, pos),
                    format!("{what} reads a `topic_pattern`: declare the Avro key's columns in `key_schema`"),
                );
            }
            let headers = decode_source_headers(r, &f);
            let on_missing_topic =
                f.get("on_missing_topic")
                    .map_or(Some(MissingTopic::Fail), |n| {
                        r.choice(
                            n,
                            "on_missing_topic",
                            &MissingTopic::NAMES,
                            MissingTopic::from_name,
                        )
                    });
            topic.zip(start_from).zip(on_missing_topic).map(
                |((topic, start_from), on_missing_topic)| SourceConnector::Kafka {
                    topic,
                    group_id,
                    start_from,
                    metadata,
                    key,
                    headers,
                    on_missing_topic,
                },
            )
        }
        Some("file") => {
            only_for(r, &KAFKA_ONLY, "file");
            only_for(
                r,
                &["events", "rate_per_s", "seed", "table", "auctions"],
                "file",
            );
            let path = r
                .required(&f, "path", &what)
                .and_then(|n| r.string(n, "`path`"));
            let batch_rows = match f.get("batch_rows") {
                None => Some(laminar_connectors::BATCH_ROWS_MAX),
                Some(n) => match r.u64(n, "`batch_rows`") {
                    Some(b) if (1..=laminar_connectors::BATCH_ROWS_MAX as u64).contains(&b) => {
                        Some(b as usize)
                    }
                    Some(_) => {
                        r.error(
                            pos(n),
                            format!(
                                "`batch_rows` must be between 1 and {}",
                                laminar_connectors::BATCH_ROWS_MAX
                            ),
                        );
                        None
                    }
                    None => None,
                },
            };
            path.zip(batch_rows)
                .map(|(path, batch_rows)| SourceConnector::File { path, batch_rows })
        }
        Some("datagen") => {
            only_for(r, &KAFKA_ONLY, "datagen");
            only_for(r, &["path", "schema", "format", "batch_rows"], "datagen");
            let table = f.get("table").map_or(Some(NexmarkTable::Bid), |n| {
                r.choice(
                    n,
                    "datagen table",
                    &NexmarkTable::NAMES,
                    NexmarkTable::from_name,
                )
            });
            let events = f.get("events").and_then(|n| r.u64(n, "`events`"));
            let rate_per_s = f.get("rate_per_s").and_then(|n| r.u64(n, "`rate_per_s`"));
            if rate_per_s == Some(0) {
                r.error(
                    f.get("rate_per_s").map_or(f.pos, pos),
                    "`rate_per_s` must be at least 1",
                );
            }
            let seed = f.get("seed").and_then(|n| r.u64(n, "`seed`")).unwrap_or(0);
            let auctions = f
                .get("auctions")
                .and_then(|n| r.u64(n, "`auctions`"))
                .unwrap_or(DEFAULT_DATAGEN_AUCTIONS);
            table.map(|table| SourceConnector::Datagen {
                table,
                events,
                rate_per_s,
                seed,
                auctions: auctions.max(1),
            })
        }
        _ => None,
    };
    let topic = match &connector {
        Some(SourceConnector::Kafka {
            topic: Topics::Name(t),
            ..
        }) => t.clone(),
        _ => String::new(),
    };
    let format_pos = f.get("format").map_or(f.pos, pos);
    let format = decode_format(r, &f, &format!("{topic}-value"), registry);
    let pattern = matches!(
        &connector,
        Some(SourceConnector::Kafka {
            topic: Topics::Pattern(_),
            ..
        })
    );
    if pattern
        && format.is_avro()
        && registry
        && f.get("schema").is_none()
        && f.get("avro_schema").is_none()
        && f.get("subject").is_none()
    {
        r.error(
            format_pos,
            format!("{what} reads a `topic_pattern`: name the registry `subject` its columns come from, or declare `schema`"),
        );
    }
    if format.is_avro() && !matches!(connector, Some(SourceConnector::Kafka { .. }) | None) {
        r.error(
            format_pos,
            "`format: avro` applies to kafka sources; file sources read JSON lines",
        );
    }
    // `sql: CREATE SOURCE ...` declares the columns (and maybe the watermark) in SQL.
    let sql_node = f.get("sql");
    let ddl = sql_node.and_then(|n| {
        let text = r.string(n, "`sql`")?;
        match ddl::parse_source_ddl(&text) {
            Ok(d) => {
                if name.as_ref().is_some_and(|name| *name != d.name) {
                    r.error(pos(n), format!("{what}: `CREATE SOURCE {}` names another source; use the source's name", d.name));
                }
                Some(d)
            }
            Err(e) => {
                r.error(pos(n), format!("{what}: {e}"));
                None
            }
        }
    });
    if sql_node.is_some()
        && let Some(s) = f.get("schema")
    {
        r.error(
            pos(s),
            format!("{what} declares its columns twice, in `schema` and in `sql`; keep one"),
        );
    }
    let avro_schema = match &format {
        FormatConfig::Avro { schema, .. } => schema.clone(),
        FormatConfig::Json => None,
    };
    let mut columns_from_registry = None;
    let mut avro_reader = None;
    let columns = match (&connector, f.get("schema")) {
        (Some(SourceConnector::Datagen { .. }), _) if sql_node.is_some() => {
            r.error(
                pos(sql_node?),
                "`sql` does not apply to a `datagen` source: its schema is the Nexmark table's",
            );
            Vec::new()
        }
        (_, None) if sql_node.is_some() => {
            ddl.as_ref().map(|d| d.columns.clone()).unwrap_or_default()
        }
        (Some(SourceConnector::Datagen { table, .. }), _) => table
            .schema()
            .fields()
            .iter()
            .map(|field| DecodeColumn {
                name: field.name().clone(),
                ty: match field.data_type() {
                    arrow::datatypes::DataType::Timestamp(..) => {
                        ColumnType::Timestamp(laminar_connectors::format::types::EpochUnit::Millis)
                    }
                    arrow::datatypes::DataType::Int64 => ColumnType::Int64,
                    _ => ColumnType::Utf8,
                },
                nullable: field.is_nullable(),
            })
            .collect(),
        (_, Some(n)) => {
            if registry && avro_schema.is_some() {
                r.error(
                    pos(n),
                    format!("{what} declares its columns twice, in `schema` and as the reader `avro_schema`; keep one"),
                );
            }
            decode_schema(r, n, &what)
        }
        (None, None) => Vec::new(),
        (_, None) => match (&format, avro_schema) {
            (FormatConfig::Avro { .. }, Some(schema)) => {
                match laminar_connectors::format::avro::schema::reader_of_schema(&schema, "value") {
                    Ok((reader, _)) => {
                        let columns = reader.columns.clone();
                        avro_reader = Some(reader);
                        columns
                    }
                    Err(e) => {
                        r.error(
                            pos(f.get("avro_schema")?),
                            format!("{what}: `avro_schema` gives no columns: {e}"),
                        );
                        Vec::new()
                    }
                }
            }
            (FormatConfig::Avro { subject, .. }, None) if registry => {
                columns_from_registry = Some(subject.clone());
                Vec::new()
            }
            // An `avro_schema` that did not parse is reported already.
            (FormatConfig::Avro { .. }, None) if f.get("avro_schema").is_some() => Vec::new(),
            (FormatConfig::Avro { .. }, None) => {
                r.error(
                    format_pos,
                    format!("{what}: plain `format: avro` needs `avro_schema` (the schema messages are written with), or add a top-level `schema_registry` for the Confluent wire format"),
                );
                Vec::new()
            }
            _ => {
                r.error(
                    f.pos,
                    format!("{what} needs `schema` (column name -> type)"),
                );
                Vec::new()
            }
        },
    };
    let mut connector = connector;
    let event_time = {
        let all = connector
            .as_ref()
            .map_or_else(|| columns.clone(), |c| all_columns(&columns, c));
        match (ddl.as_ref().and_then(|d| d.watermark.clone()), sql_node) {
            (Some((column, delay)), Some(sql_node)) => {
                // The WATERMARK clause declares the column and delay; `event_time` may still
                // set the idle timeout and alignment.
                let extra = f
                    .get("event_time")
                    .and_then(|n| r.mapping(n, "`event_time`", EVENT_TIME_KEYS));
                for key in ["column", "watermark_delay_ms"] {
                    if let Some(k) = extra.as_ref().and_then(|e| e.get(key)) {
                        r.error(pos(k), format!("`event_time.{key}` is declared by the WATERMARK clause of `sql`; keep one"));
                    }
                }
                Some(EventTimeConfig {
                    column,
                    pos: pos(sql_node),
                    watermark_delay_ms: delay,
                    idle_timeout_ms: extra
                        .as_ref()
                        .and_then(|f| f.get("idle_timeout_ms"))
                        .and_then(|n| r.u64(n, "`idle_timeout_ms`")),
                    max_drift_ms: extra
                        .as_ref()
                        .and_then(|f| f.get("max_drift_ms"))
                        .and_then(|n| r.u64(n, "`max_drift_ms`")),
                })
            }
            _ => f
                .get("event_time")
                .and_then(|n| decode_event_time(r, n, &what, &all, columns.is_empty())),
        }
    };
    // A record's Kafka timestamp as event time: a record without one is rejected.
    if let (Some(et), Some(SourceConnector::Kafka { metadata, .. })) = (&event_time, &mut connector)
        && et.column == "_timestamp"
        && metadata.timestamp
    {
        metadata.timestamp_required = true;
    }
    if let Some(c) = &connector {
        check_column_names(r, &columns, c, &what, f.pos);
    }
    let dead_letter_topic = f
        .get("dead_letter_topic")
        .and_then(|n| r.string(n, "`dead_letter_topic`"));
    let on_decode_error = match f.get("on_decode_error") {
        Some(n) => {
            let policy = r.choice(
                n,
                "on_decode_error",
                &DecodeErrorPolicy::NAMES,
                DecodeErrorPolicy::from_name,
            );
            if policy == Some(DecodeErrorPolicy::DeadLetter) && dead_letter_topic.is_none() {
                r.error(
                    pos(n),
                    format!("{what}: `on_decode_error: dead_letter` needs `dead_letter_topic`"),
                );
            }
            policy
        }
        None if dead_letter_topic.is_some() => Some(DecodeErrorPolicy::DeadLetter),
        None => Some(DecodeErrorPolicy::Skip),
    };
    Some(SourceConfig {
        name: name?,
        pos: pos(node),
        connector: connector?,
        columns,
        event_time,
        on_decode_error: on_decode_error?,
        dead_letter_topic,
        format,
        format_pos,
        columns_from_registry,
        avro_reader,
    })
}

/// Every column of a source's batches: the value's, the key's, the metadata and header
/// columns, in that order.
#[must_use]
pub fn all_columns(columns: &[DecodeColumn], connector: &SourceConnector) -> Vec<DecodeColumn> {
    match connector {
        SourceConnector::Kafka {
            metadata,
            key,
            headers,
            ..
        } => laminar_connectors::kafka::source_columns(columns, &key.columns, *metadata, headers),
        _ => columns.to_vec(),
    }
}

/// Column names of a source are unique over the value, key, metadata and headers.
fn check_column_names(
    r: &mut Reader,
    columns: &[DecodeColumn],
    connector: &SourceConnector,
    what: &str,
    at: Pos,
) {
    let all = all_columns(columns, connector);
    for (i, c) in all.iter().enumerate() {
        if all[..i].iter().any(|o| o.name == c.name) {
            r.error(
                at,
                format!("{what} has two columns named `{}` (value, key, metadata and header columns share one namespace)", c.name),
            );
        }
    }
}

/// `format`, `avro_schema` and `subject` of a source or sink.
fn decode_format(
    r: &mut Reader,
    f: &yaml::Fields<'_>,
    default_subject: &str,
    registry: bool,
) -> FormatConfig {
    let name = f.get("format").map_or(Some("json".to_owned()), |n| {
        r.choice(n, "format", FORMATS, |s| {
            FORMATS.contains(&s).then(|| s.to_owned())
        })
    });
    let schema_node = f.get("avro_schema");
    let subject_node = f.get("subject");
    if name.as_deref() != Some("avro") {
        for (key, n) in [("avro_schema", schema_node), ("subject", subject_node)] {
            if let Some(n) = n {
                r.error(pos(n), format!("`{key}` applies to `format: avro`"));
            }
        }
        return FormatConfig::Json;
    }
    let schema = schema_node.and_then(|n| {
        let text = yaml::json_text(n)?;
        match apache_avro::Schema::parse_str(&text) {
            Ok(s) => Some(Arc::new(s)),
            Err(e) => {
                r.error(
                    pos(n),
                    format!("`avro_schema` is not a valid Avro schema: {e}"),
                );
                None
            }
        }
    });
    if let Some(n) = subject_node
        && !registry
    {
        r.error(
            pos(n),
            "`subject` names a schema registry subject, but the file has no `schema_registry`",
        );
    }
    let subject = subject_node
        .and_then(|n| r.string(n, "`subject`"))
        .unwrap_or_else(|| default_subject.to_owned());
    FormatConfig::Avro { schema, subject }
}

/// A `key_format` value: `string`, `json` or `avro`.
fn key_format(r: &mut Reader, node: &Node) -> Option<KeyFormat> {
    r.choice(
        node,
        "key_format",
        &["string", "json", "avro"],
        |s| match s {
            "string" => Some(KeyFormat::String),
            "json" => Some(KeyFormat::Json),
            "avro" => Some(KeyFormat::Avro),
            _ => None,
        },
    )
}

/// `key_format` and `key_schema` of a kafka source.
fn decode_key(
    r: &mut Reader,
    f: &yaml::Fields<'_>,
    what: &str,
    topic: &str,
    registry: bool,
) -> KeyConfig {
    let format_node = f.get("key_format");
    let format = format_node
        .and_then(|n| key_format(r, n))
        .unwrap_or(KeyFormat::String);
    let schema_node = f.get("key_schema");
    let columns = schema_node
        .map(|n| decode_schema(r, n, what))
        .unwrap_or_default();
    let at = format_node.map_or(f.pos, pos);
    match format {
        KeyFormat::String => {
            if let Some(n) = schema_node {
                r.error(pos(n), "`key_schema` applies to `key_format: json` or `avro`; a string key is the `_key` metadata column");
            }
        }
        KeyFormat::Json if schema_node.is_none() => {
            r.error(
                at,
                format!("{what}: `key_format: json` needs `key_schema` (column name -> type)"),
            );
        }
        KeyFormat::Avro if !registry => {
            r.error(at, format!("{what}: `key_format: avro` reads the schema registry's wire format: add a top-level `schema_registry`"));
        }
        _ => {}
    }
    KeyConfig {
        format,
        columns,
        subject: format!("{topic}-key"),
        reader: None,
    }
}

/// `headers` of a kafka source: header name -> column.
fn decode_source_headers(r: &mut Reader, f: &yaml::Fields<'_>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Some(n) = f.get("headers") else {
        return out;
    };
    let YamlDataOwned::Mapping(map) = &n.data else {
        r.error(
            pos(n),
            "`headers` must be a mapping of header name -> column name",
        );
        return out;
    };
    for (k, v) in map {
        if let (Some(header), Some(column)) = (
            r.string(k, "a header name"),
            sql_identifier(r, v, "header column"),
        ) {
            out.push((header, column));
        }
    }
    out
}

fn decode_schema(r: &mut Reader, node: &Node, what: &str) -> Vec<DecodeColumn> {
    let YamlDataOwned::Mapping(map) = &node.data else {
        r.error(
            pos(node),
            format!("`schema` of {what} must be a mapping of column name -> type"),
        );
        return Vec::new();
    };
    let mut columns = Vec::new();
    for (k, v) in map {
        let Some(name) = r.string(k, "a column name") else {
            continue;
        };
        let Some(type_text) = r.string(v, "a column type") else {
            continue;
        };
        if let Some((ty, nullable)) = parse_column_type(&type_text) {
            columns.push(DecodeColumn { name, ty, nullable });
        } else {
            let first = type_text
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            let h = hint(&first, COLUMN_TYPE_NAMES);
            r.error(pos(v), format!("unknown column type `{type_text}`{h}; expected one of {} (optionally followed by NULL)", COLUMN_TYPE_NAMES.join(", ")));
        }
    }
    if columns.is_empty() && map.is_empty() {
        r.error(pos(node), format!("`schema` of {what} declares no columns"));
    }
    columns
}

/// `columns_unknown`: the value's columns come from the schema registry at run time, so a
/// column not found among the others is checked then.
fn decode_event_time(
    r: &mut Reader,
    node: &Node,
    what: &str,
    columns: &[DecodeColumn],
    columns_unknown: bool,
) -> Option<EventTimeConfig> {
    let f = r.mapping(node, "`event_time`", EVENT_TIME_KEYS)?;
    let column_node = r.required(&f, "column", "`event_time`")?;
    let column = r.string(column_node, "`event_time.column`")?;
    match columns.iter().find(|c| c.name == column) {
        None if !columns_unknown => {
            let h = hint(&column, columns.iter().map(|c| c.name.as_str()));
            r.error(
                pos(column_node),
                format!("event time column `{column}` is not in the schema of {what}{h}"),
            );
        }
        Some(c) if !matches!(c.ty, ColumnType::Timestamp(_) | ColumnType::Int64) => {
            r.error(pos(column_node), format!("event time column `{column}` is {}; it must be TIMESTAMP or BIGINT (epoch milliseconds)", c.ty.sql_name()));
        }
        _ => {}
    }
    Some(EventTimeConfig {
        pos: pos(column_node),
        column,
        watermark_delay_ms: f
            .get("watermark_delay_ms")
            .and_then(|n| r.u64(n, "`watermark_delay_ms`"))
            .unwrap_or(0),
        idle_timeout_ms: f
            .get("idle_timeout_ms")
            .and_then(|n| r.u64(n, "`idle_timeout_ms`")),
        max_drift_ms: f
            .get("max_drift_ms")
            .and_then(|n| r.u64(n, "`max_drift_ms`")),
    })
}

/// The file position of byte `offset` of a query's SQL.
fn sql_pos(q: &QueryConfig, offset: usize) -> Pos {
    let before = &q.sql[..offset.min(q.sql.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    q.sql_origin.map(line as u64, column as u64)
}

/// Moves each query's `TIMESTAMP BY column` onto its source: it chooses the source's
/// event-time column (watermark delay 0) when the source declares none, and must agree
/// with it otherwise. The clause is blanked out of the SQL.
fn apply_timestamp_by(r: &mut Reader, sources: &mut [SourceConfig], queries: &mut [QueryConfig]) {
    for q in queries.iter_mut() {
        let found = match ddl::take_timestamp_by(&mut q.sql) {
            Ok(found) => found,
            Err((offset, message)) => {
                r.error(sql_pos(q, offset), format!("query `{}`: {message}", q.name));
                continue;
            }
        };
        for t in found {
            let at = sql_pos(q, t.offset);
            let Some(source) = sources.iter_mut().find(|s| s.name == t.relation) else {
                r.error(at, format!("`TIMESTAMP BY` follows `{}`, which is not a source: event time is chosen where records enter", t.relation));
                continue;
            };
            match &source.event_time {
                Some(et) if et.column == t.column => {}
                Some(et) => r.error(
                    at,
                    format!(
                        "`TIMESTAMP BY {}` conflicts with the event time of source `{}`, which is `{}`",
                        t.column, source.name, et.column
                    ),
                ),
                None => match source.columns.iter().find(|c| c.name == t.column) {
                    None => {
                        let h = hint(&t.column, source.columns.iter().map(|c| c.name.as_str()));
                        r.error(
                            at,
                            format!(
                                "`TIMESTAMP BY {}`: source `{}` has no such column{h}",
                                t.column, source.name
                            ),
                        );
                    }
                    Some(c) if !matches!(c.ty, ColumnType::Timestamp(_) | ColumnType::Int64) => {
                        r.error(at, format!("`TIMESTAMP BY {}`: the column is {}; it must be TIMESTAMP or BIGINT (epoch milliseconds)", t.column, c.ty.sql_name()));
                    }
                    Some(_) => {
                        source.event_time = Some(EventTimeConfig {
                            column: t.column,
                            pos: at,
                            watermark_delay_ms: 0,
                            idle_timeout_ms: None,
                            max_drift_ms: None,
                        });
                    }
                },
            }
        }
    }
}

fn decode_query(r: &mut Reader, node: &Node, text: &str) -> Option<QueryConfig> {
    let what = owner("query", node);
    let f = r.mapping(node, &what, QUERY_KEYS)?;
    let name = r
        .required(&f, "name", "a query")
        .and_then(|n| sql_identifier(r, n, "query name"));
    let sql_node = r.required(&f, "sql", &what);
    let sql = sql_node.and_then(|n| r.string(n, "`sql`"));
    let sql_origin = match (sql_node, &sql) {
        (Some(n), Some(s)) => sql_origin(text, pos(n), s),
        _ => SqlOrigin::default(),
    };
    let emit = match f.get("emit") {
        None => Some(EmitPolicy::OnWindowClose),
        Some(n) if matches!(n.data, YamlDataOwned::Mapping(_)) => {
            let m = r.mapping(n, "`emit`", EMIT_KEYS);
            let every = m
                .and_then(|m| r.required(&m, "every_ms", "`emit`"))
                .and_then(|e| r.u64(e, "`every_ms`"));
            match every {
                Some(0) => {
                    r.error(pos(n), "`every_ms` must be at least 1");
                    None
                }
                e => e.map(EmitPolicy::EveryMs),
            }
        }
        Some(n) => r.choice(
            n,
            "emit policy",
            &["on_window_close", "on_update", "every_ms: N"],
            |s| match s {
                "on_window_close" => Some(EmitPolicy::OnWindowClose),
                "on_update" => Some(EmitPolicy::OnUpdate),
                _ => None,
            },
        ),
    };
    let allowed_lateness_ms = f
        .get("allowed_lateness_ms")
        .map_or(Some(0), |n| r.u64(n, "`allowed_lateness_ms`"));
    let late_data_topic = f
        .get("late_data_topic")
        .and_then(|n| r.string(n, "`late_data_topic`"));
    Some(QueryConfig {
        name: name?,
        pos: pos(node),
        sql: sql?,
        sql_origin,
        emit: emit?,
        allowed_lateness_ms: allowed_lateness_ms?,
        late_data_topic,
    })
}

/// Finds each line of `sql` in the file at or after `start`, to map SQL positions back.
fn sql_origin(text: &str, start: Pos, sql: &str) -> SqlOrigin {
    let file_lines: Vec<&str> = text.lines().collect();
    let mut cursor = start.line.saturating_sub(1);
    let mut lines = Vec::new();
    for sql_line in sql.lines() {
        let found = (cursor..file_lines.len()).find_map(|i| {
            let trimmed = sql_line.trim_end();
            if trimmed.is_empty() {
                return None;
            }
            let byte = if i == start.line.saturating_sub(1) {
                let skip = file_lines[i]
                    .char_indices()
                    .nth(start.col.saturating_sub(1))
                    .map_or(0, |(b, _)| b);
                file_lines[i][skip..].find(trimmed).map(|b| b + skip)
            } else {
                file_lines[i].find(trimmed)
            };
            byte.map(|b| (i, file_lines[i][..b].chars().count()))
        });
        match found {
            Some((i, col)) => {
                lines.push(Pos {
                    line: i + 1,
                    col: col + 1,
                });
                cursor = i + 1;
            }
            None => lines.push(lines.last().copied().unwrap_or(start)),
        }
    }
    if lines.is_empty() {
        lines.push(start);
    }
    SqlOrigin { lines }
}

/// `(name, position)` of each item of the list under `key`, as written.
fn declared(top: &yaml::Fields<'_>, key: &str) -> Vec<(String, Pos)> {
    top.get(key)
        .and_then(|n| {
            if let YamlDataOwned::Sequence(items) = &n.data {
                Some(items)
            } else {
                None
            }
        })
        .map(|items| {
            items
                .iter()
                .filter_map(|i| peek_name(i).map(|name| (name, pos(i))))
                .collect()
        })
        .unwrap_or_default()
}

fn decode_sink(
    r: &mut Reader,
    node: &Node,
    relations: &[(String, Pos)],
    registry: bool,
) -> Option<SinkConfig> {
    let what = owner("sink", node);
    let f = r.mapping(node, &what, SINK_KEYS)?;
    let name = r
        .required(&f, "name", "a sink")
        .and_then(|n| r.string(n, "sink name"));
    let from_node = r.required(&f, "from", &what);
    let from = from_node.and_then(|n| r.string(n, "`from`"));
    if let (Some(from), Some(n)) = (&from, from_node)
        && !relations.iter().any(|(name, _)| name == from)
    {
        let h = hint(from, relations.iter().map(|(n, _)| n.as_str()));
        r.error(
            pos(n),
            format!("{what} reads from `{from}`, which is no query or source{h}"),
        );
    }
    let connector = r.required(&f, "connector", &what).and_then(|n| {
        r.choice(n, "connector", SINK_CONNECTORS, |s| {
            SINK_CONNECTORS.contains(&s).then(|| s.to_owned())
        })
    });
    let connector = match connector.as_deref() {
        Some("kafka") => r
            .required(&f, "topic", &what)
            .and_then(|n| r.string(n, "`topic`"))
            .map(|topic| SinkConnector::Kafka { topic }),
        Some("file") => r
            .required(&f, "path", &what)
            .and_then(|n| r.string(n, "`path`"))
            .map(|path| SinkConnector::File { path }),
        Some("stdout") => Some(SinkConnector::Stdout),
        _ => None,
    };
    let topic = match &connector {
        Some(SinkConnector::Kafka { topic }) => topic.clone(),
        _ => String::new(),
    };
    let format_pos = f.get("format").map_or(f.pos, pos);
    let format = decode_format(r, &f, &format!("{topic}-value"), registry);
    let kafka = matches!(connector, Some(SinkConnector::Kafka { .. }) | None);
    if format.is_avro() && !kafka {
        r.error(
            format_pos,
            "`format: avro` applies to kafka sinks; file and stdout sinks write JSON lines",
        );
    }
    let key_format_node = f.get("key_format");
    let key_format = key_format_node.and_then(|n| key_format(r, n));
    let mut headers = Vec::new();
    if let Some(n) = f.get("headers") {
        if let YamlDataOwned::Mapping(map) = &n.data {
            for (k, v) in map {
                if let (Some(header), Some(column)) =
                    (r.string(k, "a header name"), r.string(v, "a header column"))
                {
                    headers.push((header, column, pos(v)));
                }
            }
        } else {
            r.error(
                pos(n),
                "`headers` must be a mapping of header name -> column name",
            );
        }
    }
    let timestamp = f
        .get("timestamp")
        .and_then(|n| r.string(n, "`timestamp`").map(|t| (t, pos(n))));
    if !kafka {
        for key in ["key_format", "headers", "timestamp"] {
            if let Some(n) = f.get(key) {
                r.error(pos(n), format!("`{key}` applies to kafka sinks"));
            }
        }
    }
    let key = f
        .get("key")
        .and_then(|n| r.strings(n, "a key column"))
        .unwrap_or_default();
    let delivery_node = f.get("delivery");
    let delivery = delivery_node.map_or(Some(Delivery::AtLeastOnce), |n| {
        r.choice(
            n,
            "delivery",
            &["at_least_once", "exactly_once"],
            |s| match s {
                "at_least_once" => Some(Delivery::AtLeastOnce),
                "exactly_once" => Some(Delivery::ExactlyOnce),
                _ => None,
            },
        )
    });
    let transactions = f
        .get("transactions")
        .and_then(|n| r.bool(n, "`transactions`"))
        .unwrap_or(true);
    if let (Some(Delivery::ExactlyOnce), Some(c), Some(n)) = (delivery, &connector, delivery_node)
        && !matches!(c, SinkConnector::Kafka { .. })
    {
        r.error(
            pos(n),
            "`delivery: exactly_once` needs a kafka sink (it reads its own output back after a crash); \
             file and stdout sinks are at_least_once",
        );
    }
    if let Some(n) = key_format_node
        && key.is_empty()
    {
        r.error(
            pos(n),
            format!("{what}: `key_format` needs `key` (the key columns)"),
        );
    }
    Some(SinkConfig {
        name: name?,
        pos: pos(node),
        from: from?,
        from_pos: from_node.map_or(f.pos, pos),
        connector: connector?,
        key,
        delivery: delivery?,
        delivery_pos: delivery_node.map_or(f.pos, pos),
        transactions,
        format,
        format_pos,
        key_format,
        key_format_pos: key_format_node.map_or(f.pos, pos),
        headers,
        timestamp,
    })
}

fn decode_state(r: &mut Reader, node: Option<&Node>, pipeline: &str) -> StateConfig {
    let mut state = StateConfig {
        dir: format!("./state/{pipeline}"),
        checkpoint_interval_ms: DEFAULT_CHECKPOINT_INTERVAL_MS,
        memory_bytes_max: DEFAULT_MEMORY_BYTES_MAX,
        huge_pages: false,
        checkpoint_wal_bytes: crate::durability::CHECKPOINT_WAL_BYTES,
        compaction_min_bytes: crate::durability::COMPACT_ARENA_MIN,
    };
    let Some(f) = node.and_then(|n| r.mapping(n, "`state`", STATE_KEYS)) else {
        return state;
    };
    if let Some(d) = f.get("dir").and_then(|n| r.string(n, "`dir`")) {
        state.dir = d;
    }
    if let Some(v) = f
        .get("checkpoint_interval_ms")
        .and_then(|n| r.positive_u64(n, "`checkpoint_interval_ms`"))
    {
        state.checkpoint_interval_ms = v;
    }
    if let Some(v) = f
        .get("memory_bytes_max")
        .and_then(|n| r.u64(n, "`memory_bytes_max`"))
    {
        state.memory_bytes_max = v;
    }
    if let Some(v) = f.get("huge_pages").and_then(|n| r.bool(n, "`huge_pages`")) {
        state.huge_pages = v;
    }
    if let Some(v) = f
        .get("checkpoint_wal_bytes")
        .and_then(|n| r.positive_u64(n, "`checkpoint_wal_bytes`"))
    {
        state.checkpoint_wal_bytes = v;
    }
    if let Some(v) = f
        .get("compaction_min_bytes")
        .and_then(|n| r.u64(n, "`compaction_min_bytes`"))
    {
        state.compaction_min_bytes = v;
    }
    state
}

/// Names are unique (as declared, even when the declaration itself has problems, so
/// that one mistake is reported once).
fn check_names(r: &mut Reader, relations: &[(String, Pos)], sink_names: &[(String, Pos)]) {
    for (i, (name, p)) in relations.iter().enumerate() {
        if relations[..i].iter().any(|(n, _)| n == name) {
            r.error(
                *p,
                format!(
                    "the name `{name}` is used twice (sources and queries share one namespace)"
                ),
            );
        }
    }
    for (i, (name, p)) in sink_names.iter().enumerate() {
        if sink_names[..i].iter().any(|(n, _)| n == name) {
            r.error(*p, format!("the sink name `{name}` is used twice"));
        }
    }
}

#[cfg(test)]
mod tests;
