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
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

use crate::config;
use crate::engine::latency::LatencyHistogram;
use crate::engine::reactor::ShardedOperator;
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
    /// Reactor counts to run the windowed queries on, engine only (1: on the pipeline
    /// thread, as `runtime.cores: 1` runs them).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub reactors: Vec<usize>,
    /// Only the engine-only queries whose names start with one of these (`q7,q11`).
    #[arg(long, value_delimiter = ',')]
    pub queries: Vec<String>,
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
        "{:<40} {:>3} {:>9} {:>11} {:>11} {:>6} {:>6} {:>8} {:>8} {:>8} {:>7} {:>5}",
        "benchmark",
        "rx",
        "events",
        "events/s",
        "per core",
        "wall s",
        "CPU s",
        "p50 us",
        "p99 us",
        "p999 us",
        "keys",
        "B/key"
    )?;
    for (name, query) in QUERIES {
        if !args.queries.is_empty()
            && !args
                .queries
                .iter()
                .any(|q| name.split(' ').next() == Some(q.as_str()))
        {
            continue;
        }
        let mut single = None;
        for &reactors in &args.reactors {
            let Some(run) = engine_only(query, args.events, reactors.max(1), None)? else {
                continue;
            };
            let rate = run.events as f64 / run.elapsed.as_secs_f64();
            let us = |q: f64| {
                run.latency
                    .quantile(q)
                    .map_or_else(|| "-".to_owned(), |ns| format!("{:.1}", ns as f64 / 1e3))
            };
            let bytes = run
                .state_bytes_per_group
                .map_or_else(|| "-".to_owned(), |b| b.to_string());
            writeln!(
                table,
                "{:<40} {:>3} {:>9} {rate:>11.0} {:>11.0} {:>6.3} {:>6.2} {:>8} {:>8} {:>8} {:>7} {bytes:>5}",
                format!("engine {name}"),
                run.reactors,
                run.events,
                rate / run.reactors as f64,
                run.elapsed.as_secs_f64(),
                run.cpu_seconds,
                us(0.5),
                us(0.99),
                us(0.999),
                run.groups_max
            )?;
            // Latency at half that rate, for about a second: what a pipeline with headroom
            // sees (at full rate the rings are full and latency is queueing).
            let half = (rate / 2.0) as u64;
            if let Some(paced) = engine_only(
                query,
                args.events.min(half).max(1),
                run.reactors,
                Some(half.max(1)),
            )? {
                let us = |q: f64| {
                    paced
                        .latency
                        .quantile(q)
                        .map_or_else(|| "-".to_owned(), |ns| format!("{:.1}", ns as f64 / 1e3))
                };
                writeln!(
                    table,
                    "  at 50% of that rate ({half} events/s): latency p50 {} us, p99 {} us, p999 {} us",
                    us(0.5),
                    us(0.99),
                    us(0.999)
                )?;
            }
            match single {
                None if run.reactors == 1 => single = Some(rate),
                Some(one) if run.reactors > 1 => {
                    writeln!(table, "  {} reactors / 1: {:.2}x", run.reactors, rate / one)?;
                }
                _ => {}
            }
        }
    }
    if !args.engine_only {
        kafka(args.kafka_events, &mut table)?;
    }
    println!("{table}");
    println!(
        "rx: reactor threads (stateless queries run on the pipeline thread); per core: events/s / rx; \
         CPU s: user+system of the whole process (generator, reactors, encoder); p50/p99/p999: \
         per event, from its batch entering the engine (at 50% of the rate: from when its \
         newest event was due, so that waiting behind a window's close counts) to the query \
         having taken it; JSON encode of every result included"
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

/// datagen -> query -> JSON encode -> discard: on this thread (`reactors` 1) or with the
/// query split over `reactors` threads; `None` for a query that cannot be split.
fn engine_only(
    query: &str,
    events: u64,
    reactors: usize,
    rate_per_s: Option<u64>,
) -> anyhow::Result<Option<EngineRun>> {
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
    let mut reactor_stats = Vec::new();
    if reactors > 1 {
        if !stateful {
            return Ok(None);
        }
        let mut copies = vec![operator];
        for _ in 1..reactors {
            let mut copy = sql::plan_sharing(&config, planned.watermark.clone())
                .map_err(|d| anyhow!("{d}"))?;
            copies.push(copy.queries.remove(0));
        }
        for (i, copy) in copies.iter_mut().enumerate() {
            if !copy.shard(i, reactors) {
                return Ok(None);
            }
        }
        let sharded = ShardedOperator::start(copies, true)?;
        reactor_stats = sharded.reactor_stats();
        operator = Box::new(sharded);
    }
    let mut source = DatagenSource::new(DatagenOptions {
        name: "bids".into(),
        table: NexmarkTable::Bid,
        events: Some(events),
        rate_per_s,
        seed: 1,
        auctions: BENCH_AUCTIONS,
    });
    let time_column = NexmarkTable::Bid.schema().index_of("date_time")?;
    let mut encoder = JsonEncoder::default();
    let (mut results, mut late) = (Vec::new(), Vec::new());
    let (mut out, mut ends) = (Vec::new(), Vec::new());
    let latency = LatencyHistogram::default();
    let (mut groups_max, mut bytes_at_max) = (0, 0);
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let mut rows_out = 0;
    let mut polled = 0u64;
    loop {
        match source.poll(Duration::ZERO)? {
            SourcePoll::Batch(b) => {
                // Paced, a batch's rows have waited since its newest one was due: behind
                // a window's close or a slow batch, not only once taken.
                polled += b.batch.num_rows() as u64;
                let entered = Instant::now();
                let since = rate_per_s.map_or(entered, |rate| {
                    let due = Duration::from_secs_f64((polled - 1) as f64 / rate as f64);
                    (started + due).min(entered)
                });
                operator.process_batch_since(&b.batch, since, &mut results, &mut late)?;
                if reactors == 1 {
                    latency.record(since.elapsed().as_nanos() as u64, b.batch.num_rows() as u64);
                }
                let groups = operator.state_groups();
                if groups > groups_max {
                    groups_max = groups;
                    bytes_at_max = operator.state_bytes();
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
                operator.flush(&mut results, &mut late)?;
                break;
            }
            // A paced generator with nothing due: wait as the pipeline's poll does,
            // instead of spinning on a core the reactors need.
            SourcePoll::Idle => std::thread::sleep(Duration::from_micros(50)),
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
        out.clear();
        ends.clear();
        encoder
            .encode(&result, None, &mut out, &mut ends)
            .map_err(|e| anyhow!(e))?;
        rows_out += result.num_rows();
    }
    let elapsed = started.elapsed();
    let cpu_seconds = cpu_seconds() - cpu_before;
    std::hint::black_box(rows_out);
    for stats in &reactor_stats {
        latency.merge(&stats.latency);
    }
    let state_bytes_per_group = (groups_max > 0).then(|| bytes_at_max / groups_max as u64);
    Ok(Some(EngineRun {
        reactors,
        events,
        elapsed,
        cpu_seconds,
        latency,
        groups_max,
        state_bytes_per_group,
    }))
}

struct EngineRun {
    reactors: usize,
    events: u64,
    elapsed: Duration,
    /// User + system CPU time of the process during the run.
    cpu_seconds: f64,
    latency: LatencyHistogram,
    /// Most (window, key) groups held at once.
    groups_max: usize,
    /// The query's own estimate of its state at that moment, per group (key, window,
    /// accumulators, index entry).
    state_bytes_per_group: Option<u64>,
}

/// User + system CPU seconds this process has used.
fn cpu_seconds() -> f64 {
    // SAFETY: rusage is plain data; getrusage writes into it and nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut usage) } != 0 {
        return 0.0;
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// A new embedded broker with the bench's topics, `events` generated bids in `bench-in`.
/// Every measurement gets one of its own: the embedded broker slows down as it holds
/// more, which would favour whatever ran first.
fn fresh_broker(events: u64) -> anyhow::Result<(EmbeddedBroker, String)> {
    let broker = EmbeddedBroker::start(1, None)?;
    let bootstrap = broker.bootstrap_servers().to_owned();
    for topic in [
        "bench-in",
        "bench-out-bare",
        "bench-out-laminar",
        "bench-lat-in",
        "bench-lat-out",
    ] {
        broker.create_topic(topic, BENCH_PARTITIONS)?;
    }
    produce_input(&bootstrap, events)?;
    Ok((broker, bootstrap))
}

fn kafka(events: u64, table: &mut String) -> anyhow::Result<()> {
    writeln!(
        table,
        "\n{:<40} {:>10} {:>12} {:>8}",
        "through Kafka (embedded broker)", "events", "events/s", "seconds"
    )?;
    let bare = {
        let (_broker, bootstrap) = fresh_broker(events)?;
        let started = Instant::now();
        bare_loop(&bootstrap, events)?;
        started.elapsed()
    };
    row(table, "kafka bare rdkafka consume->produce", events, bare)?;

    let mut at_least_once = None;
    for (name, sink) in [
        (
            "kafka laminar q0 (JSON in, JSON out)",
            "  - { name: out, from: q, connector: kafka, topic: bench-out-laminar }",
        ),
        (
            "kafka laminar q0 exactly_once, no txn",
            "  - { name: out, from: q, connector: kafka, topic: bench-out-laminar, delivery: exactly_once, transactions: false }",
        ),
        (
            "kafka laminar q0 exactly_once, txn",
            "  - { name: out, from: q, connector: kafka, topic: bench-out-laminar, delivery: exactly_once, transactions: true }",
        ),
    ] {
        let (records, took) = {
            let (_broker, bootstrap) = fresh_broker(events)?;
            laminar_kafka(&bootstrap, sink, events, &name[14..])?
        };
        row(table, name, records, took)?;
        let rate = records as f64 / took.as_secs_f64();
        match at_least_once {
            None => {
                at_least_once = Some(rate);
                let half = (rate / 2.0) as u64;
                let latency = {
                    let (_broker, bootstrap) = fresh_broker(0)?;
                    end_to_end_latency(&bootstrap, half.max(1), (half * 3).max(1))?
                };
                let ms = |q: f64| {
                    latency
                        .quantile(q)
                        .map_or_else(|| "-".to_owned(), |ns| format!("{:.1}", ns as f64 / 1e6))
                };
                writeln!(
                    table,
                    "  end to end at 50% of that rate ({half} events/s, 3 s): p50 {} ms, p99 {} ms, p999 {} ms",
                    ms(0.5),
                    ms(0.99),
                    ms(0.999)
                )?;
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

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// q0 from `bench-lat-in` to `bench-lat-out` (at-least-once) while records are produced
/// at `rate` per second, each carrying the time it was due; a consumer of the output takes
/// the difference to its arrival: producer, broker, laminar, broker and consumer.
fn end_to_end_latency(bootstrap: &str, rate: u64, events: u64) -> anyhow::Result<LatencyHistogram> {
    let yaml = pipeline_yaml(
        "  - name: bids\n    connector: kafka\n    topic: bench-lat-in\n    group_id: bench-latency\n    start_from: earliest\n    schema: { auction: BIGINT, sent_us: BIGINT }",
        "SELECT * FROM bids",
        "  - { name: out, from: q, connector: kafka, topic: bench-lat-out }",
    );
    let mut config = config::parse("bench.yaml", &yaml, &|_| None).map_err(|d| anyhow!("{d}"))?;
    bootstrap.clone_into(&mut config.kafka.bootstrap_servers);
    let state = std::env::temp_dir().join(format!("laminar-bench-latency-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    config.state.dir = state.display().to_string();
    let planned = sql::plan(&config).map_err(|d| anyhow!("{d}"))?;
    let options = RunOptions {
        // The measured records and one warm-up record per partition.
        records_max: Some(events + BENCH_PARTITIONS as u64),
        ..RunOptions::default()
    };
    let pipeline = Pipeline::build(&config, planned, &options)?;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let running = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || pipeline.run(&stop))
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "bench-latency-reader")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "1")
        .create()?;
    consumer.subscribe(&["bench-lat-out"])?;
    // Short requests load the embedded broker, which looks records up by scanning a
    // partition's requests: at 1 ms it falls behind within seconds.
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()?;
    // The clock starts once a record sent to each partition has come out: laminar reads
    // every partition and the reader's group has joined (the embedded broker delays a
    // join by seconds), so that no measured record waits on either.
    for partition in 0..BENCH_PARTITIONS {
        let record = BaseRecord::<(), str>::to("bench-lat-in")
            .partition(partition)
            .payload(r#"{"auction":-1,"sent_us":0}"#);
        send_when_room(&producer, record)?;
    }
    let warm_until = Instant::now() + Duration::from_mins(1);
    let mut warmed = 0;
    while warmed < BENCH_PARTITIONS {
        if Instant::now() >= warm_until {
            return Err(anyhow!(
                "end-to-end latency: {warmed} of {BENCH_PARTITIONS} warm-up records came out in 60 s"
            ));
        }
        producer.poll(Duration::ZERO);
        if let Some(message) = consumer.poll(Duration::from_millis(50)) {
            message?;
            warmed += 1;
        }
    }
    // Records go out on a thread of their own, each stamped with the time it was due,
    // not the time it was sent: a producer that falls behind (the machine is busy) then
    // counts its delay instead of hiding it (coordinated omission).
    let started = Instant::now();
    let started_us = now_micros();
    let sending = std::thread::spawn(move || -> anyhow::Result<()> {
        let mut payload = String::new();
        for i in 0..events {
            let due = Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                producer.poll(Duration::ZERO);
                std::thread::sleep(wait);
            }
            payload.clear();
            let due_us = started_us + due.as_micros() as u64;
            write!(payload, r#"{{"auction":{i},"sent_us":{due_us}}}"#)?;
            let record = BaseRecord::<(), str>::to("bench-lat-in")
                .partition((i % BENCH_PARTITIONS as u64) as i32)
                .payload(&payload);
            send_when_room(&producer, record)?;
        }
        producer.flush(Duration::from_secs(30))?;
        Ok(())
    });
    let latency = LatencyHistogram::default();
    let mut seen = 0u64;
    let deadline = started + Duration::from_secs(events / rate.max(1) + 30);
    while seen < events && Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(10)) else {
            continue;
        };
        let message = message?;
        if let Some(sent_us) = sent_us(message.payload().unwrap_or_default()) {
            latency.record(now_micros().saturating_sub(sent_us) * 1000, 1);
            seen += 1;
        }
    }
    let sent = sending
        .join()
        .map_err(|_| anyhow!("the latency producer panicked"))?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let summary = running
        .join()
        .map_err(|_| anyhow!("the latency pipeline panicked"))?;
    let _ = std::fs::remove_dir_all(&state);
    summary?;
    sent?;
    if seen < events {
        return Err(anyhow!(
            "end-to-end latency: {seen} of {events} records came out"
        ));
    }
    Ok(latency)
}

/// Sends `record`, waiting (and serving delivery reports) while the producer's queue is
/// full.
fn send_when_room<K, P>(
    producer: &BaseProducer,
    mut record: BaseRecord<'_, K, P>,
) -> anyhow::Result<()>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                producer.poll(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

/// The `sent_us` of an output record of the latency pipeline (`None` for warm-up
/// records), read without building a JSON value: the reader must keep up.
fn sent_us(payload: &[u8]) -> Option<u64> {
    const FIELD: &[u8] = b"\"sent_us\":";
    let at = payload.windows(FIELD.len()).position(|w| w == FIELD)? + FIELD.len();
    let digits = payload[at..].iter().take_while(|b| b.is_ascii_digit());
    let value = digits.fold(0u64, |v, &d| v * 10 + u64::from(d - b'0'));
    (value > 0).then_some(value)
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
        // As laminar's consumers: the default (a second) idles a loop that keeps up.
        .set(
            "fetch.queue.backoff.ms",
            laminar_connectors::kafka::FETCH_QUEUE_BACKOFF_MS,
        )
        .create()?;
    consumer.subscribe(&["bench-in"])?;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", laminar_connectors::kafka::LINGER_MS)
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
