//! The metrics endpoint: `/metrics` in the Prometheus text format, `/health`, `/ready`,
//! scraped from a running pipeline.

#![allow(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod support;

use std::time::{Duration, Instant};

use laminar_testcontainers::free_port;
use support::{Running, TempDir, get, sample};

#[test]
fn metrics_health_and_ready_are_served_while_running() {
    let dir = TempDir::new("metrics");
    let out = dir.path("out.jsonl");
    let pipeline = dir.write(
        "metrics.yaml",
        &format!(
            r"pipeline: scraped
sources:
  - name: bids
    connector: datagen
    rate_per_s: 20000
    event_time: {{ column: date_time }}
queries:
  - name: per_auction
    sql: |
      SELECT auction, window_start, COUNT(*) AS n
      FROM TUMBLE(bids, date_time, INTERVAL '1' SECOND)
      GROUP BY auction, window_start
sinks:
  - {{ name: out, from: per_auction, connector: file, path: {} }}
state:
  checkpoint_interval_ms: 100
",
            out.display()
        ),
    );
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let mut laminar = Running::start(
        &[
            "run",
            pipeline.to_str().unwrap(),
            "--metrics-addr",
            &addr,
            "--cores",
            "2",
        ],
        &[],
        &dir,
    );
    // Wait until it serves and some windows have been emitted. The sink counts rows as
    // it takes them; a query's counters are published at the end of each epoch.
    let deadline = Instant::now() + Duration::from_mins(1);
    let metrics = loop {
        assert!(Instant::now() < deadline, "{}", laminar.stderr());
        assert!(laminar.is_running(), "{}", laminar.stderr());
        if let Some((200, body)) = get(&addr, "/metrics")
            && sample(
                &body,
                r#"laminar_sink_records_total{pipeline="scraped",sink="out"}"#,
            )
            .is_some_and(|n| n > 0.0)
            && sample(
                &body,
                r#"laminar_query_windows_closed_total{pipeline="scraped",query="per_auction"}"#,
            )
            .is_some_and(|n| n >= 1.0)
        {
            break body;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let records = sample(
        &metrics,
        r#"laminar_source_records_total{pipeline="scraped",source="bids"}"#,
    )
    .unwrap();
    assert!(records > 0.0, "{metrics}");
    let watermark = sample(
        &metrics,
        r#"laminar_source_watermark_seconds{pipeline="scraped",source="bids"}"#,
    )
    .unwrap();
    assert!(watermark > 1.0e9, "a watermark in epoch seconds: {metrics}");
    assert!(
        sample(
            &metrics,
            r#"laminar_query_state_keys{pipeline="scraped",query="per_auction"}"#
        )
        .is_some(),
        "{metrics}"
    );
    // Windows have closed (waited for above); the current one is open, in the operator's
    // memory and in the state store's arena.
    let value = |series: &str| sample(&metrics, series).unwrap_or_else(|| panic!("no {series}"));
    assert!(value(r#"laminar_query_windows_open{pipeline="scraped",query="per_auction"}"#) >= 0.0);
    assert!(value(r#"laminar_query_state_bytes{pipeline="scraped",query="per_auction"}"#) >= 0.0);
    assert!(value(r#"laminar_state_arena_bytes{pipeline="scraped"}"#) >= 64.0);
    assert!(value(r#"laminar_state_store_keys{pipeline="scraped"}"#) >= 0.0);
    assert!(value(r#"laminar_state_store_bytes{pipeline="scraped"}"#) >= 0.0);
    // The windowed query runs on two reactors: each reports its busy share and ring.
    for reactor in ["0", "1"] {
        let busy = value(&format!(
            r#"laminar_reactor_busy_ratio{{pipeline="scraped",query="per_auction",reactor="{reactor}"}}"#
        ));
        assert!((0.0..=1.0).contains(&busy), "{busy}");
        let ring = value(&format!(
            r#"laminar_reactor_ring_messages{{pipeline="scraped",query="per_auction",reactor="{reactor}"}}"#
        ));
        assert!((0.0..=32.0).contains(&ring), "{ring}");
    }
    let dead = value(r#"laminar_state_arena_dead_ratio{pipeline="scraped"}"#);
    assert!((0.0..=1.0).contains(&dead), "{dead}");
    assert!(
        sample(
            &metrics,
            r#"laminar_process_resident_memory_bytes{pipeline="scraped"}"#
        )
        .is_some_and(|b| b > 1.0e6),
        "{metrics}"
    );
    for line in metrics.lines().filter(|l| l.starts_with("# TYPE")) {
        assert!(line.contains(" laminar_"), "{line}");
    }
    // A Prometheus text-format parser reads the whole exposition: every sample is
    // documented, typed as its name says, and labelled with the pipeline.
    let scrape =
        prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_owned()))).unwrap();
    assert!(scrape.samples.len() > 30, "{metrics}");
    for s in &scrape.samples {
        // A histogram's `_sum` and `_count` come out as samples of their own.
        let base = ["_sum", "_count"]
            .iter()
            .find_map(|suffix| s.metric.strip_suffix(suffix))
            .filter(|b| !scrape.docs.contains_key(&s.metric) && scrape.docs.contains_key(*b));
        if base.is_some() {
            continue;
        }
        assert!(
            scrape.docs.contains_key(&s.metric),
            "no HELP for {}",
            s.metric
        );
        assert_eq!(s.labels.get("pipeline"), Some("scraped"), "{}", s.metric);
        match &s.value {
            prometheus_parse::Value::Counter(v) => {
                assert!(s.metric.ends_with("_total") && *v >= 0.0, "{}", s.metric);
            }
            prometheus_parse::Value::Gauge(_) | prometheus_parse::Value::Histogram(_) => {
                assert!(!s.metric.ends_with("_total"), "{}", s.metric);
            }
            other => panic!("{} has an unexpected type: {other:?}", s.metric),
        }
    }
    let parsed_records = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "laminar_source_records_total" && s.labels.get("source") == Some("bids")
        })
        .map(|s| s.value.clone());
    assert_eq!(
        parsed_records,
        Some(prometheus_parse::Value::Counter(records))
    );
    // Counters only go up between scrapes.
    std::thread::sleep(Duration::from_millis(300));
    let (_, later) = get(&addr, "/metrics").unwrap();
    let later_records = sample(
        &later,
        r#"laminar_source_records_total{pipeline="scraped",source="bids"}"#,
    )
    .unwrap();
    assert!(later_records >= records);

    assert_eq!(get(&addr, "/health").unwrap().0, 200);
    assert_eq!(get(&addr, "/ready").unwrap().0, 200);
    assert_eq!(get(&addr, "/nothing").unwrap().0, 404);

    laminar.signal("TERM");
    assert!(
        laminar.wait(Duration::from_secs(30)).success(),
        "{}",
        laminar.stderr()
    );
}

#[test]
fn a_metrics_address_in_use_is_a_clear_error() {
    let dir = TempDir::new("metrics-busy");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let pipeline = dir.write(
        "busy.yaml",
        "pipeline: busy\nsources:\n  - { name: bids, connector: datagen, events: 10 }\nsinks:\n  - { name: out, from: bids, connector: stdout }\n",
    );
    let (code, _, stderr) = support::laminar(
        &["run", pipeline.to_str().unwrap(), "--metrics-addr", &addr],
        &[],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("cannot serve metrics on"), "{stderr}");
}

/// `/ready` answers 503 until the state directory is recovered, and 200 only after (the
/// recovery is held for a while at a pause point so that the test sees it in between);
/// `/health` answers 200 all along.
#[test]
fn ready_turns_ready_only_after_recovery() {
    let dir = TempDir::new("ready");
    let pipeline = dir.write(
        "ready.yaml",
        r"pipeline: ready
sources:
  - name: bids
    connector: datagen
    rate_per_s: 1000
queries:
  - name: q
    sql: SELECT auction FROM bids
sinks:
  - { name: out, from: q, connector: stdout }
state:
  checkpoint_interval_ms: 100
",
    );
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let mut laminar = Running::start(
        &["run", pipeline.to_str().unwrap(), "--metrics-addr", &addr],
        &[("LAMINAR_PAUSE_POINT", "recovery:1500")],
        &dir,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut not_ready = 0;
    loop {
        assert!(Instant::now() < deadline, "{}", laminar.stderr());
        assert!(laminar.is_running(), "{}", laminar.stderr());
        match get(&addr, "/ready").map(|r| r.0) {
            Some(503) => {
                not_ready += 1;
                assert_eq!(get(&addr, "/health").map(|r| r.0), Some(200));
            }
            Some(200) => {
                // Logged once `Pipeline::build` (recovery included) returned.
                assert!(
                    laminar.stderr().contains("pipeline running"),
                    "ready before recovery: {}",
                    laminar.stderr()
                );
                break;
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        not_ready >= 5,
        "/ready answered 503 only {not_ready} times while recovery was held"
    );
    laminar.signal("TERM");
    assert!(
        laminar.wait(Duration::from_secs(30)).success(),
        "{}",
        laminar.stderr()
    );
}
