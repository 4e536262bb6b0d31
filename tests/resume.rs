//! A pipeline stopped part-way resumes from its state directory: file and datagen sources
//! seek to the offsets of the last commit entry, and open windows come back.

#![allow(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod support;

use std::sync::atomic::AtomicBool;

use laminar::engine::{Pipeline, RunOptions};
use laminar::{config, sql};
use support::TempDir;

fn run(yaml: &str, records_max: Option<u64>) -> laminar::engine::RunSummary {
    let config = config::parse("resume.yaml", yaml, &|_| None).unwrap();
    let planned = sql::plan(&config).unwrap();
    let options = RunOptions {
        metrics: None,
        bootstrap_servers: None,
        records_max,
        status_line: false,
    };
    Pipeline::build(&config, planned, &options)
        .unwrap()
        .run(&AtomicBool::new(false))
        .unwrap()
}

#[test]
fn a_stopped_file_pipeline_resumes_where_it_stopped_with_its_windows() {
    let dir = TempDir::new("resume");
    let lines: Vec<String> = (0..5000)
        .map(|i| {
            format!(
                r#"{{"id":{i},"k":{},"ts":{}}}"#,
                i % 7,
                1_700_000_000_000_i64 + i * 10
            )
        })
        .collect();
    let input = dir.write("in.jsonl", &(lines.join("\n") + "\n"));
    let yaml = format!(
        "pipeline: resume\nsources:\n  - name: events\n    connector: file\n    path: {}\n    batch_rows: 100\n    schema: {{ id: BIGINT, k: BIGINT, ts: TIMESTAMP }}\n    event_time: {{ column: ts }}\nqueries:\n  - name: copies\n    sql: SELECT id FROM events\n  - name: counts\n    sql: SELECT k, window_start, COUNT(*) AS n FROM TUMBLE(events, ts, INTERVAL '10' SECOND) GROUP BY k, window_start\nsinks:\n  - {{ name: c, from: copies, connector: file, path: {} }}\n  - {{ name: w, from: counts, connector: file, path: {} }}\nstate:\n  dir: {}\n",
        input.display(),
        dir.path("copies.jsonl").display(),
        dir.path("counts.jsonl").display(),
        dir.path("state").display(),
    );
    let first = run(&yaml, Some(1800));
    assert!(
        first.records_in >= 1800 && first.records_in < 5000,
        "{first:?}"
    );
    let second = run(&yaml, None);
    assert_eq!(first.records_in + second.records_in, 5000, "{second:?}");
    let copies = support::read(&dir.path("copies.jsonl"));
    let mut ids: Vec<i64> = copies
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..5000).collect::<Vec<_>>(), "every line once");
    // Window counts sum to the input: the windows open at the stop came back.
    let counts = support::read(&dir.path("counts.jsonl"));
    let total: i64 = counts
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["n"]
                .as_i64()
                .unwrap()
        })
        .sum();
    assert_eq!(total, 5000, "{counts}");
    // The drained run cleared its state: a new run starts over.
    let again = run(&yaml, None);
    assert_eq!(again.records_in, 5000);
}

/// Sorted lines of a file.
fn sorted_lines(path: &std::path::Path) -> Vec<String> {
    let mut lines: Vec<String> = support::read(path).lines().map(str::to_owned).collect();
    lines.sort_unstable();
    lines
}

#[test]
fn a_pipeline_stopped_on_three_reactors_resumes_on_one_and_on_two_with_the_same_result() {
    // Windowed queries split by key over reactors: the state of a run stopped on 3
    // reactors is restored onto 1, then 2 (each group on the reactor that owns it now),
    // and the output equals one uninterrupted run on one thread.
    let dir = TempDir::new("resume-cores");
    let lines: Vec<String> = (0..6000)
        .map(|i| {
            // Gaps every 700 records end sessions.
            let ts = 1_700_000_000_000_i64 + i * 10 + (i / 700) * 60_000;
            format!(r#"{{"k":{},"ts":{ts}}}"#, (i * 7919) % 23)
        })
        .collect();
    let input = dir.write("in.jsonl", &(lines.join("\n") + "\n"));
    let yaml = |name: &str, cores: u64| {
        format!(
            "pipeline: resume\nsources:\n  - name: events\n    connector: file\n    path: {}\n    batch_rows: 50\n    schema: {{ k: BIGINT, ts: TIMESTAMP }}\n    event_time: {{ column: ts }}\nqueries:\n  - name: counts\n    sql: SELECT k, window_start, COUNT(*) AS n FROM TUMBLE(events, ts, INTERVAL '10' SECOND) GROUP BY k, window_start\n  - name: sessions\n    sql: SELECT k, window_start, window_end, COUNT(*) AS n FROM SESSION(events, ts, INTERVAL '5' SECOND) GROUP BY k, window_start, window_end\nsinks:\n  - {{ name: w, from: counts, connector: file, path: {} }}\n  - {{ name: s, from: sessions, connector: file, path: {} }}\nstate:\n  dir: {}\nruntime:\n  cores: {cores}\n",
            input.display(),
            dir.path(&format!("{name}-counts.jsonl")).display(),
            dir.path(&format!("{name}-sessions.jsonl")).display(),
            dir.path(&format!("{name}-state")).display(),
        )
    };
    let whole = run(&yaml("whole", 1), None);
    assert_eq!(whole.records_in, 6000);

    let first = run(&yaml("split", 3), Some(1500));
    let second = run(&yaml("split", 1), Some(1500));
    let third = run(&yaml("split", 2), None);
    assert_eq!(
        first.records_in + second.records_in + third.records_in,
        6000,
        "{first:?} {second:?} {third:?}"
    );
    for output in ["counts", "sessions"] {
        let expected = sorted_lines(&dir.path(&format!("whole-{output}.jsonl")));
        assert!(expected.len() > 50, "{output}: {}", expected.len());
        assert_eq!(
            sorted_lines(&dir.path(&format!("split-{output}.jsonl"))),
            expected,
            "{output}"
        );
    }
}
