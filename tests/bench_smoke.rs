//! `laminar bench` runs every query engine-only and through the embedded broker (tiny
//! sizes: this checks that it works, not how fast).

mod support;

#[test]
fn bench_prints_a_row_per_query_and_the_kafka_ratio() {
    let (code, stdout, stderr) = support::laminar(
        &["bench", "--events", "20000", "--kafka-events", "2000"],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    for name in [
        "q0 pass-through",
        "q1 projection",
        "q2 filter",
        "q5 HOP",
        "q7 TUMBLE",
        "q11 SESSION",
        "2 reactors / 1:",
        "kafka bare rdkafka",
        "kafka laminar q0",
        "laminar / bare throughput ratio",
        "exactly_once, no txn",
        "exactly_once, txn",
        "exactly-once / at-least-once throughput ratio",
    ] {
        assert!(stdout.contains(name), "no `{name}` in:\n{stdout}");
    }
}

#[test]
fn bench_durability_measures_the_wal_lookups_checkpoints_and_recovery() {
    let (code, stdout, stderr) = support::laminar(
        &[
            "bench",
            "--durability",
            "--state-mib",
            "2",
            "--wal-entries",
            "20000",
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    for needle in [
        "blocking append, 100 B entries, fdatasync every 1000",
        "4 KiB append + fdatasync: p50",
        "state lookup, memory-mapped store (20000 keys, random, hit, value read)",
        "state     2 MiB",
        "recovery from the checkpoint",
    ] {
        assert!(stdout.contains(needle), "no `{needle}` in:\n{stdout}");
    }
}
