use super::*;

fn parse_str(text: &str) -> Result<PipelineConfig, Diagnostics> {
    parse("p.yaml", text, &|name| {
        (name == "BOOT").then(|| "10.0.0.1:9092".to_owned())
    })
}

const GOOD: &str = r"pipeline: demo
kafka:
  bootstrap_servers: ${BOOT}
sources:
  - name: bids
    connector: kafka
    topic: bids
    schema:
      auction: BIGINT
      channel: VARCHAR NULL
      date_time: TIMESTAMP
    event_time: { column: date_time, watermark_delay_ms: 4000 }
queries:
  - name: q
    sql: |
      SELECT auction
      FROM bids
sinks:
  - name: out
    from: q
    connector: stdout
";

#[test]
fn parse_good_file_reads_every_section() {
    let c = parse_str(GOOD).unwrap();
    assert_eq!(c.name, "demo");
    assert_eq!(c.kafka.bootstrap_servers, "10.0.0.1:9092");
    assert_eq!(c.sources[0].columns.len(), 3);
    assert!(c.sources[0].columns[1].nullable);
    assert_eq!(
        c.sources[0].event_time.as_ref().unwrap().watermark_delay_ms,
        4000
    );
    assert_eq!(
        c.queries[0].sql_origin.lines,
        vec![Pos { line: 16, col: 7 }, Pos { line: 17, col: 7 }]
    );
    assert_eq!(c.queries[0].sql_origin.map(2, 6), Pos { line: 17, col: 12 });
    assert_eq!(c.state.dir, "./state/demo");
}

#[test]
fn parse_reports_every_problem_at_once() {
    let bad = GOOD
        .replace("topic: bids", "topc: bids")
        .replace("BIGINT", "BIGINTT")
        .replace("from: q", "from: qq")
        .replace("connector: stdout", "connector: stdot");
    let e = parse_str(&bad).unwrap_err().to_string();
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 5, "{e}");
    assert!(
        lines[0].starts_with("p.yaml:5:5: error: source `bids` needs `topic`"),
        "{e}"
    );
    assert!(
        lines[1]
            .contains("7:5: error: unknown key `topc` in source `bids` (did you mean `topic`?)"),
        "{e}"
    );
    assert!(
        lines[2].contains("9:16: error: unknown column type `BIGINTT` (did you mean `BIGINT`?)"),
        "{e}"
    );
    assert!(lines[3].contains("20:11: error: sink `out` reads from `qq`, which is no query or source (did you mean `q`?)"), "{e}");
    assert!(
        lines[4].contains("21:16: error: unknown connector `stdot` (did you mean `stdout`?)"),
        "{e}"
    );
}

#[test]
fn parse_names_missing_variables() {
    let e = parse_str(&GOOD.replace("${BOOT}", "${NOPE}"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("p.yaml:3:22: error: environment variable `NOPE` is not set"),
        "{e}"
    );
}

#[test]
fn checkpoint_and_compaction_sizes_are_read_with_defaults() {
    let c = parse_str(GOOD).unwrap();
    assert_eq!(
        c.state.checkpoint_wal_bytes,
        crate::durability::CHECKPOINT_WAL_BYTES
    );
    assert_eq!(
        c.state.compaction_min_bytes,
        crate::durability::COMPACT_ARENA_MIN
    );
    let set = format!("{GOOD}state:\n  checkpoint_wal_bytes: 4096\n  compaction_min_bytes: 0\n");
    let c = parse_str(&set).unwrap();
    assert_eq!(
        (c.state.checkpoint_wal_bytes, c.state.compaction_min_bytes),
        (4096, 0)
    );
    let zero = format!("{GOOD}state:\n  checkpoint_wal_bytes: 0\n");
    let e = parse_str(&zero).unwrap_err().to_string();
    assert!(
        e.contains("`checkpoint_wal_bytes` must be at least 1"),
        "{e}"
    );
}
