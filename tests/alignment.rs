//! Watermark alignment: a source far ahead of the others is held back (not buffered) until
//! they catch up, and the result is the same as without alignment.

#![allow(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod support;

use std::fmt::Write;

use support::TempDir;

const T0: i64 = 1_700_000_000_000;

fn pipeline(dir: &TempDir, slow: &str, fast: &str, alignment: &str) -> String {
    let text = format!(
        r"pipeline: alignment
sources:
  - name: slow
    connector: file
    path: {slow}
    schema: {{ k: BIGINT, ts: BIGINT }}
    event_time: {{ column: ts{alignment} }}
  - name: fast
    connector: file
    path: {fast}
    schema: {{ k: BIGINT, ts: BIGINT }}
    event_time: {{ column: ts{alignment} }}
queries:
  - name: slow_counts
    sql: SELECT k, window_start, COUNT(*) AS n FROM TUMBLE(slow, ts, INTERVAL '1' SECOND) GROUP BY k, window_start
  - name: fast_counts
    sql: SELECT k, window_start, COUNT(*) AS n FROM TUMBLE(fast, ts, INTERVAL '1' SECOND) GROUP BY k, window_start
sinks:
  - {{ name: slow_out, from: slow_counts, connector: stdout }}
  - {{ name: fast_out, from: fast_counts, connector: stdout }}
"
    );
    dir.write(&format!("p{}.yaml", alignment.len()), &text)
        .to_string_lossy()
        .into_owned()
}

#[test]
fn alignment_holds_a_source_far_ahead_until_the_others_catch_up() {
    let dir = TempDir::new("alignment");
    // Each file is longer than one batch; `fast` starts 100 s ahead of `slow`.
    let lines = |offset: i64| -> String {
        let mut text = String::new();
        for i in 0..10_000_i64 {
            let ts = T0 + offset + i * 2;
            writeln!(text, "{{\"k\": {}, \"ts\": {ts}}}", i % 7).unwrap();
        }
        text
    };
    let slow = dir.write("slow.jsonl", &lines(0));
    let fast = dir.write("fast.jsonl", &lines(100_000));
    let (slow, fast) = (slow.to_str().unwrap(), fast.to_str().unwrap());

    let plain = pipeline(&dir, slow, fast, "");
    let (code, plain_out, stderr) = support::laminar(&["run", &plain], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("alignment_pauses=0"), "{stderr}");

    let aligned = pipeline(&dir, slow, fast, ", max_drift_ms: 5000");
    let (code, aligned_out, stderr) = support::laminar(&["run", &aligned], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("alignment_pauses=1"),
        "the fast source is held once, until the slow one drains: {stderr}"
    );
    let sorted = |s: &str| {
        let mut v: Vec<String> = s.lines().map(str::to_owned).collect();
        v.sort_unstable();
        v
    };
    let (plain_out, aligned_out) = (sorted(&plain_out), sorted(&aligned_out));
    assert_eq!(
        plain_out.len(),
        2 * 7 * 20,
        "20 one-second windows per key and source"
    );
    assert_eq!(aligned_out, plain_out);
}
