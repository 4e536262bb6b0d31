//! The chaos test: a windowed pipeline and a pass-through reading a 3-partition topic from
//! a broker in its own process (`laminar broker`, and tansu, a separate Kafka-compatible
//! broker, where it is installed), with exactly-once sinks (one without transactions, one
//! with where the broker has them: tansu has no `EndTxn`). laminar is killed with SIGKILL
//! at random moments, sometimes with the WAL's tail torn mid-record before the restart,
//! and restarted; at the end the output topics must hold exactly the results of the
//! input: no row missing, none twice. On the `laminar broker` run, checkpoints come every
//! few epochs and the state arena is compacted whenever half of it is dead, so kills
//! also land while both run on their own threads; on tansu, checkpoints come only at a
//! clean stop, so the WAL's tail can be cut in the middle of any record.

#![allow(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use laminar_testcontainers::{Broker, consume, produce};
use support::{LAMINAR, Running, TempDir};

const PARTITIONS: i32 = 3;
const PER_PARTITION: i64 = 8000;
const USERS: i64 = 20;
const BASE_MS: i64 = 1_700_000_000_000;
/// A record this far ahead on every partition closes every window before it.
const MARKER_MS: i64 = 1_000_000_000;

/// xorshift: deterministic for a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `transactions`: whether the pass-through sink writes in Kafka transactions.
/// `checkpoints`: the `state` keys that make checkpoints and compactions frequent (so
/// that kills land while both run on their threads), or none (checkpoints only at a
/// clean stop: the WAL tail can then be cut mid-record).
fn pipeline(dir: &TempDir, bootstrap: &str, transactions: bool, checkpoints: &str) -> String {
    let text = format!(
        r"pipeline: chaos
kafka:
  bootstrap_servers: {bootstrap}
sources:
  - name: clicks
    connector: kafka
    topic: clicks
    schema: {{ user: BIGINT, id: BIGINT, ts: TIMESTAMP }}
    event_time: {{ column: ts, watermark_delay_ms: 1000 }}
    start_from: earliest
queries:
  - name: counts
    sql: |
      SELECT user, window_start, COUNT(*) AS n, MAX(id) AS last_id
      FROM TUMBLE(clicks, ts, INTERVAL '1' SECOND)
      GROUP BY user, window_start
  - name: copies
    sql: SELECT id, user FROM clicks
sinks:
  - name: counts_out
    from: counts
    connector: kafka
    topic: counts
    key: [user]
    delivery: exactly_once
    transactions: false
  - name: copies_out
    from: copies
    connector: kafka
    topic: copies
    delivery: exactly_once
    transactions: {transactions}
state:
  checkpoint_interval_ms: 50
{checkpoints}"
    );
    dir.write("pipeline.yaml", &text)
        .to_string_lossy()
        .into_owned()
}

fn ts_text(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// The input, and the rows each output topic must hold (as sorted JSON texts).
fn input() -> (Vec<(i32, String)>, Vec<String>, Vec<String>) {
    let mut records = Vec::new();
    let mut counts: BTreeMap<(i64, i64), (i64, i64)> = BTreeMap::new();
    let mut copies = Vec::new();
    for p in 0..PARTITIONS {
        for i in 0..=PER_PARTITION {
            let id = i64::from(p) * 1_000_000 + i;
            let marker = i == PER_PARTITION;
            let user = if marker {
                999
            } else {
                (i * 7 + i64::from(p)) % USERS
            };
            let ts = if marker {
                BASE_MS + MARKER_MS
            } else {
                BASE_MS + i * 10 + i64::from(p)
            };
            records.push((p, format!(r#"{{"user":{user},"id":{id},"ts":{ts}}}"#)));
            copies.push(format!(r#"{{"id":{id},"user":{user}}}"#));
            if !marker {
                let c = counts
                    .entry((user, ts - ts.rem_euclid(1000)))
                    .or_insert((0, 0));
                c.0 += 1;
                c.1 = c.1.max(id);
            }
        }
    }
    let mut counts: Vec<String> = counts
        .into_iter()
        .map(|((user, window), (n, last))| {
            format!(
                r#"{{"user":{user},"window_start":"{}","n":{n},"last_id":{last}}}"#,
                ts_text(window)
            )
        })
        .collect();
    counts.sort();
    copies.sort();
    (records, counts, copies)
}

/// Tears the tail of the WAL whose segments start with `prefix` as a crash in the
/// middle of a write would: with `cut`, cuts the last record in half when it was not yet
/// synced (state, output or delivered, with no checkpoint that could cover it), else
/// leaves half a record header after it. Synced data is never touched: the disk keeps
/// it.
fn tear_wal_tail(state: &std::path::Path, prefix: &str, cut: bool) -> Option<String> {
    let segment = |name: &str| {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(".log"))
            .is_some_and(|id| id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    let mut segments: Vec<_> = std::fs::read_dir(state)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| segment(&n.to_string_lossy())))
        .collect();
    // A checkpoint may cover the last record (the WAL is synced before one is taken):
    // then only the half header after it, which no sync made durable.
    let checkpointed = std::fs::read_dir(state)
        .ok()?
        .any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("checkpoint-")));
    segments.sort();
    let last = segments.last()?;
    let data = std::fs::read(last).ok()?;
    // Walk the records (format in src/durability/wal.rs): 28-byte segment header, then
    // records of a 17-byte header (crc, len, lsn, kind) and the payload.
    let mut at = 28;
    let mut last_record = None;
    while at + 17 <= data.len() {
        let len = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap()) as usize;
        if at + 17 + len > data.len() {
            break;
        }
        last_record = Some((at, len, data[at + 16]));
        at += 17 + len;
    }
    let file = std::fs::OpenOptions::new().write(true).open(last).ok()?;
    match last_record {
        Some((start, len, kind)) if cut && kind != 3 && !checkpointed => {
            let cut = start + usize::midpoint(17, len);
            file.set_len(cut as u64).ok()?;
            Some(format!("cut record of kind {kind} at byte {cut}"))
        }
        _ => {
            use std::io::Write;
            let len = data.len() as u64;
            file.set_len(len).ok()?;
            let mut f = std::fs::OpenOptions::new().append(true).open(last).ok()?;
            f.write_all(&[0x5a; 9]).ok()?;
            drop(file);
            Some("appended half a record header".to_owned())
        }
    }
}

/// The rows of the records, sorted: one per record in the log. A record is its
/// `(partition, offset)`: a broker that hands a consumer the same offset twice has not
/// stored it twice (tansu 0.6 resends a partition's last batch to a fetch past the high
/// watermark it under-reports), so a second delivery of an offset is not a duplicate in
/// the topic; how many there were is printed.
fn rows(records: &[laminar_testcontainers::Record]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut redelivered = 0;
    let mut rows = Vec::with_capacity(records.len());
    for r in records {
        if seen.insert((r.partition, r.offset)) {
            rows.push(r.value.clone());
        } else {
            redelivered += 1;
        }
    }
    if redelivered > 0 {
        eprintln!(
            "the broker delivered {redelivered} records a second time (same partition and offset)"
        );
    }
    rows.sort();
    rows
}

fn first_difference(got: &[String], want: &[String]) -> String {
    let mut g: BTreeMap<&String, i64> = BTreeMap::new();
    for r in got {
        *g.entry(r).or_default() += 1;
    }
    for r in want {
        *g.entry(r).or_default() -= 1;
    }
    let extra: Vec<_> = g.iter().filter(|(_, n)| **n > 0).take(3).collect();
    let missing: Vec<_> = g.iter().filter(|(_, n)| **n < 0).take(3).collect();
    format!(
        "{} rows, {} expected; extra (row, times): {extra:?}; missing: {missing:?}",
        got.len(),
        want.len()
    )
}

const TOPICS: [(&str, i32); 3] = [
    ("clicks", PARTITIONS),
    ("counts", PARTITIONS),
    ("copies", PARTITIONS),
];

#[test]
fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    let broker = Broker::laminar_process(std::path::Path::new(LAMINAR), 0, &TOPICS).unwrap();
    chaos(&broker, true, OFTEN);
}

#[test]
fn sigkill_at_random_moments_loses_and_duplicates_nothing_on_tansu() {
    let Some(broker) = Broker::tansu().unwrap() else {
        eprintln!("tansu is not installed; skipping (scripts/test.sh installs it)");
        return;
    };
    for (topic, partitions) in TOPICS {
        broker.create_topic(topic, partitions).unwrap();
    }
    chaos(&broker, false, "");
}

/// Checkpoints every few epochs, and compactions as soon as half the arena is dead.
const OFTEN: &str = "  checkpoint_wal_bytes: 2048\n  compaction_min_bytes: 0\n";

/// `transactions`, `checkpoints`: as for [`pipeline`].
fn chaos(broker: &Broker, transactions: bool, checkpoints: &str) {
    let seed = std::env::var("LAMINAR_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_u64);
    let mut rng = Rng(seed);
    eprintln!("chaos seed {seed} (set LAMINAR_CHAOS_SEED to repeat)");
    let (records, want_counts, want_copies) = input();
    // The input arrives over the first rounds, so that kills land mid-stream.
    let bootstrap = broker.bootstrap().to_owned();
    let producer = std::thread::spawn(move || {
        let mut by_partition: Vec<Vec<&(i32, String)>> = vec![Vec::new(); PARTITIONS as usize];
        for r in &records {
            by_partition[r.0 as usize].push(r);
        }
        let chunk = 200;
        for start in (0..=PER_PARTITION as usize).step_by(chunk) {
            let batch: Vec<(Option<i32>, Option<&str>, &str)> = by_partition
                .iter()
                .flat_map(|p| p.iter().skip(start).take(chunk))
                .map(|(p, v)| (Some(*p), None, v.as_str()))
                .collect();
            produce(&bootstrap, "clicks", &batch).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let dir = TempDir::new("chaos");
    let file = pipeline(&dir, broker.bootstrap(), transactions, checkpoints);
    let state = dir.path("state");
    let kills = 12;
    let mut tears = 0;
    let mut compactions = 0;
    for round in 0..kills {
        // Odd rounds stop at a named point of the commit protocol instead of a random
        // moment: right after the commit entry is durable, with half of an epoch's output
        // sent, or with all of it sent but not yet recorded as delivered.
        let point = ["after-commit", "mid-delivery", "after-delivery"][(round / 2) % 3];
        let crash_at = format!("{point}:{}", 2 + rng.below(6));
        let env: &[(&str, &str)] = if round % 2 == 1 {
            &[("LAMINAR_CRASH_POINT", &crash_at)]
        } else {
            &[]
        };
        // The number of reactors changes from run to run: each restores the keys that
        // hash to it now, and the WALs of reactors a run lacks are still replayed.
        let cores = ["2", "1", "3"][round % 3];
        let mut laminar = Running::start(&["run", &file, "--cores", cores], env, &dir);
        let delay = Duration::from_millis(200 + rng.below(1300));
        let deadline = Instant::now()
            + if env.is_empty() {
                delay
            } else {
                Duration::from_secs(10)
            };
        while Instant::now() < deadline && laminar.is_running() {
            std::thread::sleep(Duration::from_millis(10));
        }
        if laminar.is_running() {
            laminar.signal("KILL");
        } else {
            assert!(
                laminar.stderr().contains("crash point"),
                "round {round}: laminar exited early: {}",
                laminar.stderr()
            );
            eprintln!("round {round}: --cores {cores}, crashed at {crash_at}");
        }
        laminar.wait(Duration::from_secs(10));
        compactions += laminar.stderr().matches("state arena compacted").count();
        if rng.below(2) == 0
            && let Some(what) = tear_wal_tail(&state, "wal-", true)
        {
            tears += 1;
            eprintln!(
                "round {round}: {cores} reactors, killed after {delay:?}; tore the WAL: {what}"
            );
        } else {
            eprintln!("round {round}: --cores {cores}, killed after {delay:?}");
        }
        // A reactor's WAL holds records the pipeline's commit entries point to, all
        // synced before them: only what follows its last sync can be torn.
        if rng.below(2) == 0
            && let Some(what) = tear_wal_tail(&state, "wal-r0-", false)
        {
            eprintln!("round {round}: tore reactor 0's WAL: {what}");
        }
    }
    assert!(tears > 0, "the seed never tore the WAL; pick another");
    assert!(
        compactions > 0 || checkpoints.is_empty(),
        "no run compacted its state arena"
    );
    eprintln!("{compactions} compactions adopted over the killed runs");
    producer.join().unwrap();
    // The last run goes to the end.
    let addr = format!("127.0.0.1:{}", laminar_testcontainers::free_port().unwrap());
    let mut laminar = Running::start(&["run", &file, "--metrics-addr", &addr], &[], &dir);
    let deadline = Duration::from_mins(2);
    let started = Instant::now();
    let counts = consume(
        broker.bootstrap(),
        "counts",
        want_counts.len(),
        Duration::from_secs(3),
        deadline,
    )
    .unwrap();
    let copies = consume(
        broker.bootstrap(),
        "copies",
        want_copies.len(),
        Duration::from_secs(2),
        deadline.saturating_sub(started.elapsed()),
    )
    .unwrap();
    // The counter is exported for each exactly-once sink, and the sink without
    // transactions commits none. (Whether this last run still had output for the
    // transactional sink depends on where the last kill fell.)
    let metrics = support::get(&addr, "/metrics").unwrap().1;
    let committed = |sink: &str| {
        support::sample(
            &metrics,
            &format!(
                r#"laminar_sink_transactions_committed_total{{pipeline="chaos",sink="{sink}"}}"#
            ),
        )
    };
    laminar.signal("TERM");
    let status = laminar.wait(Duration::from_secs(30));
    let stderr = laminar.stderr();
    assert!(status.success(), "{stderr}");
    assert!(committed("copies_out").is_some(), "{metrics}");
    assert_eq!(committed("counts_out"), Some(0.0), "{metrics}");
    if !transactions {
        assert_eq!(committed("copies_out"), Some(0.0), "{metrics}");
    }
    let (got_counts, got_copies) = (rows(&counts), rows(&copies));
    assert!(
        got_copies == want_copies,
        "pass-through output (transactions: {transactions}): {}\n{stderr}",
        first_difference(&got_copies, &want_copies)
    );
    assert!(
        got_counts == want_counts,
        "window output (transactions: false): {}\n{stderr}",
        first_difference(&got_counts, &want_counts)
    );
    // Every record carries its epoch and sequence number.
    assert!(
        counts
            .iter()
            .all(|r| r.headers.iter().any(|(k, _)| k == "laminar.epoch"))
    );
}
