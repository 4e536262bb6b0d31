//! The `laminar` command line: run, validate, explain, broker, bench.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand};
use laminar::config::{
    self, Delivery, Diagnostics, PipelineConfig, SinkConnector, SourceConnector,
};
use laminar::engine::{Pipeline, RunOptions};
use laminar::{exit, sql};

/// mimalloc: batches are built on one thread and freed on another (reactor rings), which
/// glibc's allocator serves with arena locks; mimalloc frees across threads without them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use laminar_connectors::DecodeErrorPolicy;
use laminar_connectors::kafka::broker::{DEFAULT_PARTITIONS, EmbeddedBroker};

#[derive(Parser)]
#[command(
    name = "laminar",
    version,
    about = "Kafka-compatible stream processor: YAML pipelines of SQL continuous queries"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr: `text` (default) or `json` (one object per line). Also
    /// `LAMINAR_LOG_FORMAT`. Levels and filters come from `RUST_LOG` (default `info`).
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline until SIGTERM/SIGINT, or until its bounded sources are drained.
    Run {
        /// The pipeline file.
        file: String,
        /// Start an embedded Kafka-protocol broker in this process and point every kafka
        /// connector at it (creating the topics the pipeline names).
        #[arg(long)]
        embedded_broker: bool,
        /// Overrides `state.dir`.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<String>,
        /// Overrides `metrics.listen`.
        #[arg(long, value_name = "HOST:PORT")]
        metrics_addr: Option<String>,
        /// Overrides `runtime.cores` (reactor threads; 0 = one per available core).
        #[arg(long, value_name = "N")]
        cores: Option<u64>,
    },
    /// Check pipeline files without connecting anywhere; exit 1 with every problem.
    Validate {
        #[arg(required = true)]
        files: Vec<String>,
    },
    /// Print the streaming plan of each query.
    Explain { file: String },
    /// Run an embedded Kafka-protocol broker (for development, demos and tests) until killed.
    Broker {
        /// Address to serve; broker i is served on port + i. Port 0: ephemeral ports.
        #[arg(long, default_value = "127.0.0.1:9092")]
        listen: SocketAddr,
        /// Number of brokers.
        #[arg(long, default_value_t = 1)]
        brokers: i32,
        /// Topics to create at start, as NAME or NAME:PARTITIONS.
        #[arg(long = "topic", value_name = "NAME[:PARTITIONS]")]
        topics: Vec<String>,
        /// The address clients are told to connect to (broker i at port + i), when a
        /// proxy (a TLS terminator, a port mapping) stands in front of `--listen`.
        #[arg(long, value_name = "HOST:PORT")]
        advertise: Option<String>,
    },
    /// Built-in Nexmark benchmark.
    Bench(laminar::bench::BenchArgs),
}

/// mimalloc's `purge_delay` option (its position in `mi_option_t`, the same in v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory mapped instead of returning it to the system after a delay:
/// batches are freed and allocated at a high rate, and every returned page came back as
/// a page fault and a zeroed page (14% of the CPU of a windowed query, measured). Peak
/// memory stays mapped; `MIMALLOC_PURGE_DELAY` set in the environment takes precedence.
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: called first thing in main, before any other thread exists (the option
        // setter is not thread safe); -1 is a documented value of the option.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::INVALID
            } else {
                exit::OK
            });
        }
    };
    let json = match cli.log_format {
        Some(format) => format == LogFormat::Json,
        None => std::env::var("LAMINAR_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json")),
    };
    init_logging(json);
    ExitCode::from(match cli.command {
        Command::Validate { files } => validate(&files),
        Command::Explain { file } => explain(&file),
        Command::Run {
            file,
            embedded_broker,
            state_dir,
            metrics_addr,
            cores,
        } => run(
            &file,
            embedded_broker,
            state_dir,
            metrics_addr,
            cores,
            // The live status line: on a terminal, unless logs are JSON for a machine.
            std::io::IsTerminal::is_terminal(&std::io::stderr()) && !json,
        ),
        Command::Broker {
            listen,
            brokers,
            topics,
            advertise,
        } => broker(listen, brokers, &topics, advertise.as_deref()),
        Command::Bench(args) => match laminar::bench::run(&args) {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("laminar: bench failed: {e:#}");
                exit::FATAL
            }
        },
    })
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(laminar::engine::status::LogWriter);
    if json {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

/// Loads a file, asks the schema registry for the columns it leaves to it, and plans
/// it; prints every problem. `Err` is the exit code.
fn load(file: &str) -> Result<(PipelineConfig, sql::PlannedPipeline), u8> {
    let report = |d: &Diagnostics| eprintln!("{d}");
    let mut config = config::load(file).map_err(|d| {
        report(&d);
        exit::INVALID
    })?;
    let registry = laminar::engine::schemas::registry(&config).map_err(|e| {
        eprintln!("laminar: {e}");
        exit::INVALID
    })?;
    laminar::engine::schemas::resolve_sources(&mut config, registry.as_deref()).map_err(|e| {
        eprintln!("laminar: {e}");
        exit::FATAL
    })?;
    let planned = sql::plan(&config).map_err(|d| {
        report(&d);
        exit::INVALID
    })?;
    Ok((config, planned))
}

/// Checks a file without connecting anywhere: the SQL of a pipeline whose columns come
/// from the schema registry is checked when it runs (or by `explain`), and said so.
fn validate_one(file: &str) -> bool {
    let config = match config::load(file) {
        Ok(c) => c,
        Err(d) => {
            eprintln!("{d}");
            return false;
        }
    };
    let later: Vec<&str> = config
        .sources
        .iter()
        .filter(|s| s.needs_registry())
        .map(|s| s.name.as_str())
        .collect();
    if !later.is_empty() {
        let pos = config
            .sources
            .iter()
            .find(|s| s.needs_registry())
            .map_or_else(Default::default, |s| s.pos);
        eprintln!(
            "{file}:{}:{}: note: the columns of {} come from the schema registry when the pipeline runs; \
             validate checked the file but not its SQL (`laminar explain` asks the registry and checks it)",
            pos.line,
            pos.col,
            later
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        return true;
    }
    match sql::plan(&config) {
        Ok(_) => true,
        Err(d) => {
            eprintln!("{d}");
            false
        }
    }
}

fn validate(files: &[String]) -> u8 {
    let mut ok = true;
    for file in files {
        ok &= validate_one(file);
    }
    if ok { exit::OK } else { exit::INVALID }
}

fn explain(file: &str) -> u8 {
    let (config, planned) = match load(file) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let mut out = String::new();
    let _ = writeln!(out, "pipeline {}", config.name);
    let reactors = laminar::engine::reactor_count(config.runtime.cores);
    let _ = if reactors > 1 {
        writeln!(
            out,
            "runtime: {reactors} reactor threads (runtime.cores {}): windowed queries split by group key, the rest on the pipeline thread",
            config.runtime.cores
        )
    } else {
        writeln!(
            out,
            "runtime: one thread (runtime.cores {})",
            config.runtime.cores
        )
    };
    let uses_kafka = config
        .sources
        .iter()
        .any(|s| matches!(s.connector, SourceConnector::Kafka { .. }))
        || config
            .sinks
            .iter()
            .any(|s| matches!(s.connector, SinkConnector::Kafka { .. }));
    if uses_kafka {
        let properties: Vec<String> = config
            .kafka
            .shown_properties()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(
            out,
            "kafka: bootstrap {}{}",
            config.kafka.bootstrap_servers,
            if properties.is_empty() {
                String::new()
            } else {
                format!(", properties {}", properties.join(" "))
            }
        );
    }
    if let Some(r) = &config.schema_registry {
        let _ = writeln!(
            out,
            "schema registry: {}{}",
            laminar_connectors::format::avro::registry::without_userinfo(&r.options.url),
            r.options
                .username
                .as_ref()
                .map_or_else(String::new, |u| format!(" (basic auth as {u})"))
        );
    }
    for source in &config.sources {
        let kind = match &source.connector {
            SourceConnector::Kafka {
                topic, group_id, ..
            } => format!(
                "kafka {}, group {group_id}",
                match topic {
                    laminar_connectors::kafka::Topics::Name(t) => format!("topic {t}"),
                    laminar_connectors::kafka::Topics::Pattern(re) =>
                        format!("topic_pattern {}", re.as_str()),
                }
            ),
            SourceConnector::File { path, .. } => format!("file {path} (bounded)"),
            SourceConnector::Datagen { table, events, .. } => {
                let table = format!("{table:?}").to_lowercase();
                let count =
                    events.map_or_else(|| "unbounded".to_owned(), |n| format!("{n} events"));
                format!("datagen {table} ({count})")
            }
        };
        let policy = match source.on_decode_error {
            DecodeErrorPolicy::DeadLetter => {
                format!(
                    "dead_letter to {}",
                    source.dead_letter_topic.as_deref().unwrap_or("?")
                )
            }
            DecodeErrorPolicy::Skip => "skip".to_owned(),
            DecodeErrorPolicy::Fail => "fail".to_owned(),
        };
        let format = match &source.format {
            config::FormatConfig::Json => "json".to_owned(),
            config::FormatConfig::Avro { subject, .. } if config.schema_registry.is_some() => {
                format!(
                    "avro (registry wire format; writer schemas by id, columns from subject {subject} or declared)"
                )
            }
            config::FormatConfig::Avro { .. } => "avro (plain, the file's avro_schema)".to_owned(),
        };
        let _ = writeln!(
            out,
            "source {} <- {kind}, format {format}, on_decode_error: {policy}",
            source.name
        );
        let all = config::all_columns(&source.columns, &source.connector);
        let _ = writeln!(
            out,
            "  columns: {}",
            laminar::engine::schemas::describe_columns(&all)
        );
        if let SourceConnector::Kafka { key, headers, .. } = &source.connector {
            if key.format != config::KeyFormat::String {
                let _ = writeln!(
                    out,
                    "  key: {:?} into {}",
                    key.format,
                    laminar::engine::schemas::describe_columns(&key.columns)
                );
            }
            for (header, column) in headers {
                let _ = writeln!(out, "  header {header} -> column {column}");
            }
        }
    }
    for query in &planned.queries {
        out.push_str(&query.explain());
    }
    for sink in &config.sinks {
        let kind = match &sink.connector {
            SinkConnector::Kafka { topic } => format!("kafka topic {topic}"),
            SinkConnector::File { path } => format!("file {path}"),
            SinkConnector::Stdout => "stdout".to_owned(),
        };
        let key = if sink.key.is_empty() {
            String::new()
        } else {
            let columns: Vec<&str> = sink.key.iter().map(|(k, _)| k.as_str()).collect();
            format!(", key [{}]", columns.join(", "))
        };
        let delivery = match sink.delivery {
            Delivery::AtLeastOnce => {
                "at_least_once (source offsets committed once the sink acknowledges)"
            }
            Delivery::ExactlyOnce => "exactly_once",
        };
        let _ = writeln!(
            out,
            "sink {} <- {} -> {kind}{key}, delivery: {delivery}",
            sink.name, sink.from
        );
        if let Some(columns) = planned.schemas.get(&sink.from)
            && let Ok(Some(schema)) = laminar::engine::schemas::sink_value_schema(sink, columns)
        {
            let registered = match &sink.format {
                config::FormatConfig::Avro { subject, .. } if config.schema_registry.is_some() => {
                    format!(
                        "registered under subject {subject}, written in the registry wire format"
                    )
                }
                _ => "plain Avro datums (no registry)".to_owned(),
            };
            let json = serde_json::to_string(&schema).unwrap_or_default();
            let _ = writeln!(out, "  avro value schema ({registered}): {json}");
        }
        for (header, column, _) in &sink.headers {
            let _ = writeln!(out, "  header {header} <- column {column}");
        }
        if let Some((column, _)) = &sink.timestamp {
            let _ = writeln!(out, "  record timestamp <- column {column}");
        }
    }
    // A closed pipe (`laminar explain f.yaml | head`) is not an error.
    let _ = std::io::stdout().write_all(out.as_bytes());
    exit::OK
}

fn run(
    file: &str,
    embedded_broker: bool,
    state_dir: Option<String>,
    metrics_addr: Option<String>,
    cores: Option<u64>,
    status_line: bool,
) -> u8 {
    let (mut config, planned) = match load(file) {
        Ok(l) => l,
        Err(code) => return code,
    };
    // The embedded broker keeps its topics in memory only: state that outlives it would
    // point at offsets of topics that are gone. Its runs keep state in a directory of their
    // own, removed at exit, unless --state-dir says otherwise.
    let mut _ephemeral = None;
    if let Some(dir) = state_dir {
        config.state.dir = dir;
    } else if embedded_broker {
        let dir =
            std::env::temp_dir().join(format!("laminar-{}-{}", config.name, std::process::id()));
        config.state.dir = dir.display().to_string();
        _ephemeral = Some(RemoveOnDrop(dir));
    }
    if let Some(addr) = metrics_addr {
        config.metrics.listen = Some(addr);
    }
    if let Some(cores) = cores {
        config.runtime.cores = cores;
    }
    let mut options = RunOptions {
        status_line,
        ..RunOptions::default()
    };
    let _broker = if embedded_broker {
        let broker = match EmbeddedBroker::start(1, None) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("laminar: cannot start the embedded broker: {e}");
                return exit::FATAL;
            }
        };
        for topic in config.topics() {
            if let Err(e) = broker.create_topic(&topic, DEFAULT_PARTITIONS) {
                eprintln!("laminar: cannot create topic {topic} on the embedded broker: {e}");
                return exit::FATAL;
            }
        }
        tracing::info!(
            bootstrap = broker.bootstrap_servers(),
            "embedded broker started"
        );
        options.bootstrap_servers = Some(broker.bootstrap_servers().to_owned());
        Some(broker)
    } else {
        None
    };
    let stop = match install_stop_handlers() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("laminar: cannot install signal handlers: {e}");
            return exit::FATAL;
        }
    };
    // Served before recovery: `/health` answers while state loads, `/ready` once the
    // pipeline has recovered and its partitions are assigned.
    let metrics = laminar::metrics::Metrics::new(&config.name);
    if let Some(listen) = &config.metrics.listen {
        match metrics.serve(listen) {
            Ok(addr) => tracing::info!(%addr, "serving /metrics, /health and /ready"),
            Err(e) => {
                eprintln!("laminar: cannot serve metrics on {listen}: {e}");
                return exit::FATAL;
            }
        }
    }
    options.metrics = Some(metrics);
    let pipeline = match Pipeline::build(&config, planned, &options) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("laminar: {e}");
            return exit::FATAL;
        }
    };
    tracing::info!(pipeline = %config.name, file, "pipeline running");
    match pipeline.run(&stop) {
        Ok(summary) => {
            tracing::info!(
                records_in = summary.records_in,
                records_out = summary.records_out,
                records_rejected = summary.records_rejected,
                records_late = summary.records_late,
                epochs = summary.epochs,
                alignment_pauses = summary.alignment_pauses,
                "pipeline stopped cleanly"
            );
            exit::OK
        }
        Err(e) => {
            eprintln!("laminar: {e}");
            exit::FATAL
        }
    }
}

/// Removes a directory when dropped.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// SIGTERM/SIGINT set the returned flag: the pipeline finishes its epoch and exits 0. A
/// second signal exits at once with code 2: nothing unacknowledged was committed, so
/// the next run re-reads that epoch and nothing is lost.
fn install_stop_handlers() -> std::io::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in signal_hook::consts::TERM_SIGNALS {
        signal_hook::flag::register_conditional_shutdown(
            *signal,
            i32::from(exit::FATAL),
            stop.clone(),
        )?;
        signal_hook::flag::register(*signal, stop.clone())?;
    }
    Ok(stop)
}

fn broker(listen: SocketAddr, brokers: i32, topics: &[String], advertise: Option<&str>) -> u8 {
    let advertise = match advertise.map(|a| a.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>())))
    {
        None => None,
        Some(Some((host, Ok(port)))) if !host.is_empty() && listen.port() != 0 => {
            Some((host, port))
        }
        Some(_) => {
            eprintln!("laminar: --advertise takes HOST:PORT, and needs --listen with a fixed port");
            return exit::INVALID;
        }
    };
    let broker = match EmbeddedBroker::start_advertising(brokers.max(1), Some(listen), advertise) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("laminar: cannot start the broker on {listen}: {e}");
            return exit::FATAL;
        }
    };
    for spec in topics {
        let (name, partitions) = match spec.split_once(':') {
            Some((n, p)) => {
                if let Ok(p) = p.parse() {
                    (n, p)
                } else {
                    eprintln!("laminar: --topic {spec}: partitions must be a number");
                    return exit::INVALID;
                }
            }
            None => (spec.as_str(), DEFAULT_PARTITIONS),
        };
        if let Err(e) = broker.create_topic(name, partitions) {
            eprintln!("laminar: cannot create topic {name}: {e}");
            return exit::FATAL;
        }
    }
    println!("{}", broker.bootstrap_servers());
    tracing::info!(
        bootstrap = broker.bootstrap_servers(),
        "embedded broker running (in memory, for development); stop it with Ctrl-C"
    );
    let Ok(stop) = install_stop_handlers() else {
        return exit::FATAL;
    };
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    exit::OK
}
