//! `laminar bench`: Nexmark queries from the built-in generator, engine only and through
//! Kafka (the embedded broker), next to a bare rdkafka consume->produce loop on the same
//! broker in the same run. Compare ratios, not absolute numbers: machines are noisy.

mod durability;

use std::fmt::Write as _;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use arrow::array::AsArray;
use arrow::datatypes::TimestampMillisecondType;
use laminar_connectors::datagen::{DatagenOptions, DatagenSource, NexmarkTable};
use laminar_connectors::format::JsonEncoder;
use laminar_connectors::kafka::broker::EmbeddedBroker;
use laminar_connectors::{Source, SourcePoll};
use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use crate::config;
use crate::engine::{Pipeline, RunOptions};
use crate::sql;

/// Partitions of the benchmark topics: the embedded broker keeps at most 5 MiB per
/// partition, so the input is spread thin enough to stay whole.
const BENCH_PARTITIONS: i32 = 16;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Events per engine-only query.
    #[arg(long, default_value_t = 2_000_000)]
    pub events: u64,
    /// Events through Kafka (bounded by the embedded broker's 5 MiB per partition, 16
    /// partitions).
    #[arg(long, default_value_t = 200_000)]
    pub kafka_events: u64,
    /// Skip the Kafka part.
    #[arg(long)]
    pub engine_only: bool,
    /// Only the durability part: WAL, state lookups, checkpoint and recovery.
    #[arg(long)]
    pub durability: bool,
    /// State sizes (MiB) for the checkpoint and recovery measurements.
    #[arg(long, value_delimiter = ',', default_value = "100,1024")]
    pub state_mib: Vec<u64>,
    /// WAL entries appended, and state keys looked up, in the durability part.
    #[arg(long, default_value_t = 1_000_000)]
    pub wal_entries: u64,
}

/// Nexmark-style queries over the bid stream: (name, SQL, whether it is windowed).
const QUERIES: &[(&str, &str)] = &[
    ("q0 pass-through", "SELECT * FROM bids"),
    (
        "q1 projection",
        "SELECT auction, bidder, price * 908 / 1000 AS price_eur, date_time FROM bids",
    ),
    (
        "q2 filter",
        "SELECT auction, price FROM bids WHERE auction % 123 = 0",
    ),
    (
        "q5 HOP 10s/2s count per auction",
        "SELECT auction, window_start, window_end, COUNT(*) AS bids FROM HOP(bids, date_time, INTERVAL '2' SECOND, INTERVAL '10' SECOND) GROUP BY auction, window_start, window_end",
    ),
    (
        "q7 TUMBLE 60s count+max, 1e5 keys",
        "SELECT auction, window_start, window_end, COUNT(*) AS bids, MAX(price) AS max_price FROM TUMBLE(bids, date_time, INTERVAL '60' SECOND) GROUP BY auction, window_start, window_end",
    ),
    (
        "q11 SESSION 10s per bidder",
        "SELECT bidder, window_start, window_end, COUNT(*) AS bids FROM SESSION(bids, date_time, INTERVAL '10' SECOND) GROUP BY bidder, window_start, window_end",
    ),
];

/// Distinct auctions the generator spreads bids over: q7's live keys.
const BENCH_AUCTIONS: u64 = 100_000;

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let mut table = String::new();
    if args.durability {
        durability::run(&args.state_mib, args.wal_entries, &mut table)?;
        println!("{table}");
        return Ok(());
    }
    writeln!(
        table,
        "{:<40} {:>10} {:>12} {:>8} {:>10} {:>8}",
        "benchmark", "events", "events/s", "seconds", "live keys", "B/key"
    )?;
    for (name, query) in QUERIES {
        let run = engine_only(query, args.events)?;
        let rate = run.events as f64 / run.elapsed.as_secs_f64();
        let bytes = run
            .state_bytes_per_group
            .map_or_else(|| "-".to_owned(), |b| b.to_string());
        writeln!(
            table,
            "{:<40} {:>10} {rate:>12.0} {:>8.3} {:>10} {bytes:>8}",
            format!("engine {name}"),
            run.events,
            run.elapsed.as_secs_f64(),
            run.groups_max
        )?;
    }
    if !args.engine_only {
        kafka(args.kafka_events, &mut table)?;
    }
    println!("{table}");
    println!(
        "(one reactor thread; events/s per core = events/s; JSON encode included in every sink)"
    );
    Ok(())
}

fn row(table: &mut String, name: &str, events: u64, elapsed: Duration) -> anyhow::Result<()> {
    let rate = events as f64 / elapsed.as_secs_f64();
    writeln!(
        table,
        "{name:<40} {events:>10} {rate:>12.0} {:>8.3}",
        elapsed.as_secs_f64()
    )?;
    Ok(())
}

fn pipeline_yaml(source: &str, query: &str, sink: &str) -> String {
    format!(
        "pipeline: bench\nsources:\n{source}\nqueries:\n  - name: q\n    sql: |\n      {query}\nsinks:\n{sink}\n"
    )
}

/// datagen -> query -> JSON encode -> discard, on this thread. Returns events, elapsed,
/// rows out and the largest number of live window groups seen.
fn engine_only(query: &str, events: u64) -> anyhow::Result<EngineRun> {
    let yaml = pipeline_yaml(
        &format!(
            "  - {{ name: bids, connector: datagen, events: 1, auctions: {BENCH_AUCTIONS}, event_time: {{ column: date_time }} }}"
        ),
        query,
        "  - { name: out, from: q, connector: stdout }",
    );
    let config = config::parse("bench.yaml", &yaml, &|_| None).map_err(|d| anyhow!("{d}"))?;
    let mut planned = sql::plan(&config).map_err(|d| anyhow!("{d}"))?;
    let mut operator = planned.queries.remove(0);
    let stateful = operator.is_stateful();
    let mut source = DatagenSource::new(DatagenOptions {
        name: "bids".into(),
        table: NexmarkTable::Bid,
        events: Some(events),
        rate_per_s: None,
        seed: 1,
        auctions: BENCH_AUCTIONS,
    });
    let time_column = NexmarkTable::Bid.schema().index_of("date_time")?;
    let mut encoder = JsonEncoder::default();
    let (mut results, mut late) = (Vec::new(), Vec::new());
    let (mut out, mut ends) = (Vec::new(), Vec::new());
    let rss_before = resident_bytes();
    let (mut groups_max, mut rss_at_max) = (0, rss_before);
    let started = Instant::now();
    let mut rows_out = 0;
    loop {
        match source.poll(Duration::ZERO)? {
            SourcePoll::Batch(b) => {
                operator.process_batch(&b.batch, &mut results, &mut late)?;
                let groups = operator.state_groups();
                if groups > groups_max {
                    groups_max = groups;
                    rss_at_max = resident_bytes();
                }
                if stateful {
                    // Generated events are in order: the watermark is the batch's last time.
                    let times = b
                        .batch
                        .column(time_column)
                        .as_primitive::<TimestampMillisecondType>();
                    if let Some(&last) = times.values().last() {
                        operator.handle_watermark(last, &mut results)?;
                    }
                }
            }
            SourcePoll::Finished => {
                operator.handle_watermark(i64::MAX, &mut results)?;
                break;
            }
            SourcePoll::Idle => {}
        }
        for result in results.drain(..) {
            out.clear();
            ends.clear();
            encoder
                .encode(&result, None, &mut out, &mut ends)
                .map_err(|e| anyhow!(e))?;
            rows_out += result.num_rows();
        }
    }
    for result in results.drain(..) {
        rows_out += result.num_rows();
    }
    let elapsed = started.elapsed();
    std::hint::black_box(rows_out);
    let state_bytes_per_group =
        (groups_max > 0).then(|| rss_at_max.saturating_sub(rss_before) / groups_max as u64);
    Ok(EngineRun {
        events,
        elapsed,
        groups_max,
        state_bytes_per_group,
    })
}

struct EngineRun {
    events: u64,
    elapsed: Duration,
    /// Most (window, key) groups held at once.
    groups_max: usize,
    /// Resident memory growth at that moment, per group (an estimate: it includes the
    /// allocator's slack and the batches in flight).
    state_bytes_per_group: Option<u64>,
}

/// Resident set size of this process, from /proc (0 where there is none).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

fn kafka(events: u64, table: &mut String) -> anyhow::Result<()> {
    let broker = EmbeddedBroker::start(1, None)?;
    let bootstrap = broker.bootstrap_servers().to_owned();
    for topic in [
        "bench-in",
        "bench-out-bare",
        "bench-out-laminar",
        "bench-out-eo",
        "bench-out-eo-tx",
    ] {
        broker.create_topic(topic, BENCH_PARTITIONS)?;
    }
    produce_input(&bootstrap, events)?;

    let started = Instant::now();
    bare_loop(&bootstrap, events)?;
    let bare = started.elapsed();
    row(table, "kafka bare rdkafka consume->produce", events, bare)?;

    let mut at_least_once = None;
    for (name, sink) in [
        (
            "kafka laminar q0 (JSON in, JSON out)",
            "  - { name: out, from: q, connector: kafka, topic: bench-out-laminar }",
        ),
        (
            "kafka laminar q0 exactly_once, no txn",
            "  - { name: out, from: q, connector: kafka, topic: bench-out-eo, delivery: exactly_once, transactions: false }",
        ),
        (
            "kafka laminar q0 exactly_once, txn",
            "  - { name: out, from: q, connector: kafka, topic: bench-out-eo-tx, delivery: exactly_once, transactions: true }",
        ),
    ] {
        let (records, took) = laminar_kafka(&bootstrap, sink, events, &name[14..])?;
        row(table, name, records, took)?;
        let rate = records as f64 / took.as_secs_f64();
        match at_least_once {
            None => {
                at_least_once = Some(rate);
                writeln!(
                    table,
                    "laminar / bare throughput ratio: {:.2}",
                    rate / (events as f64 / bare.as_secs_f64())
                )?;
            }
            Some(alo) => writeln!(
                table,
                "  exactly-once / at-least-once throughput ratio: {:.2}",
                rate / alo
            )?,
        }
    }
    Ok(())
}

/// Runs q0 from `bench-in` to `sink` until `events` records were read, with a state
/// directory of its own; returns records read and the time taken.
fn laminar_kafka(
    bootstrap: &str,
    sink: &str,
    events: u64,
    group: &str,
) -> anyhow::Result<(u64, Duration)> {
    let yaml = pipeline_yaml(
        &format!(
            "  - name: bids\n    connector: kafka\n    topic: bench-in\n    group_id: \"bench {group}\"\n    start_from: earliest\n    schema: {{ auction: BIGINT, bidder: BIGINT, price: BIGINT, channel: VARCHAR, url: VARCHAR, date_time: TIMESTAMP, extra: VARCHAR }}"
        ),
        "SELECT * FROM bids",
        sink,
    );
    let mut config = config::parse("bench.yaml", &yaml, &|_| None).map_err(|d| anyhow!("{d}"))?;
    bootstrap.clone_into(&mut config.kafka.bootstrap_servers);
    let state = std::env::temp_dir().join(format!("laminar-bench-kafka-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    config.state.dir = state.display().to_string();
    let planned = sql::plan(&config).map_err(|d| anyhow!("{d}"))?;
    let options = RunOptions {
        metrics: None,
        bootstrap_servers: None,
        records_max: Some(events),
        status_line: false,
    };
    let pipeline = Pipeline::build(&config, planned, &options)?;
    let started = Instant::now();
    let summary = pipeline.run(&AtomicBool::new(false));
    let took = started.elapsed();
    let _ = std::fs::remove_dir_all(&state);
    Ok((summary?.records_in, took))
}

fn produce_input(bootstrap: &str, events: u64) -> anyhow::Result<()> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let mut source = DatagenSource::new(DatagenOptions {
        name: "bids".into(),
        table: NexmarkTable::Bid,
        events: Some(events),
        rate_per_s: None,
        seed: 1,
        auctions: config::DEFAULT_DATAGEN_AUCTIONS,
    });
    let mut encoder = JsonEncoder::default();
    let (mut out, mut ends) = (Vec::new(), Vec::new());
    let mut sent = 0u64;
    while let SourcePoll::Batch(b) = source.poll(Duration::ZERO)? {
        out.clear();
        ends.clear();
        encoder
            .encode(&b.batch, None, &mut out, &mut ends)
            .map_err(|e| anyhow!(e))?;
        let mut start = 0;
        for &end in &ends {
            // Round robin: librdkafka's sticky partitioner would pile most records onto
            // one partition, past what the embedded broker keeps per partition.
            let partition = (sent % BENCH_PARTITIONS as u64) as i32;
            sent += 1;
            let mut record = BaseRecord::<(), [u8]>::to("bench-in")
                .partition(partition)
                .payload(&out[start..end]);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        record = r;
                        producer.poll(Duration::from_millis(5));
                    }
                }
            }
            start = end;
        }
        producer.poll(Duration::ZERO);
    }
    producer
        .flush(Duration::from_mins(1))
        .context("flushing the benchmark input")?;
    Ok(())
}

/// The ceiling: consume every record and produce its bytes unchanged.
fn bare_loop(bootstrap: &str, events: u64) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "bench-bare")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&["bench-in"])?;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .create()?;
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_mins(5);
    while seen < events && Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        let mut record = BaseRecord::<(), [u8]>::to("bench-out-bare")
            .payload(message.payload().unwrap_or_default());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(1));
                }
            }
        }
        producer.poll(Duration::ZERO);
        seen += 1;
    }
    producer.flush(Duration::from_mins(1))?;
    if seen < events {
        let mut held = Vec::new();
        for p in 0..BENCH_PARTITIONS {
            let (low, high) = consumer.fetch_watermarks("bench-in", p, Duration::from_secs(5))?;
            held.push(format!("{p}: {low}..{high}"));
        }
        return Err(anyhow!(
            "bare loop saw {seen} of {events} records within 300 s; the input topic holds (partition: offsets) {}",
            held.join(", ")
        ));
    }
    Ok(())
}
