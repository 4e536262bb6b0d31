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
        "kafka bare rdkafka",
        "kafka laminar q0",
        "laminar / bare throughput ratio",
    ] {
        assert!(stdout.contains(name), "no `{name}` in:\n{stdout}");
    }
}
