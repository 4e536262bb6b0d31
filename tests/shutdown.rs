//! SIGTERM stops laminar within a bounded time even when the broker stopped answering:
//! the last epoch gets `SHUTDOWN_TIMEOUT`, then laminar exits 2 without committing it.

#![allow(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod support;

use std::time::{Duration, Instant};

use laminar_testcontainers::Broker;
use support::{LAMINAR, Running, TempDir};

#[test]
fn sigterm_with_the_broker_gone_stops_within_the_deadline() {
    stops_within_the_deadline(60_000, "");
}

/// The stop comes while an epoch's close waits for the broker, with records held back
/// in a full producer queue.
#[test]
fn sigterm_while_an_epoch_waits_for_a_broker_gone_stops_within_the_deadline() {
    stops_within_the_deadline(
        200,
        "  properties:\n    queue.buffering.max.messages: \"20\"\n",
    );
}

fn stops_within_the_deadline(checkpoint_interval_ms: u64, kafka: &str) {
    let mut broker =
        Broker::laminar_process(std::path::Path::new(LAMINAR), 0, &[("out", 1)]).unwrap();
    let dir = TempDir::new("shutdown");
    let file = dir.write(
        "pipeline.yaml",
        &format!(
            "pipeline: shutdown\nkafka:\n  bootstrap_servers: {}\n{kafka}sources:\n  - {{ name: bids, connector: datagen, table: bid, rate_per_s: 200 }}\nqueries:\n  - {{ name: q, sql: \"SELECT auction, price FROM bids\" }}\nsinks:\n  - {{ name: out, from: q, connector: kafka, topic: out }}\nstate:\n  checkpoint_interval_ms: {checkpoint_interval_ms}\n",
            broker.bootstrap()
        ),
    );
    let mut laminar = Running::start(&["run", &file.to_string_lossy()], &[], &dir);
    std::thread::sleep(Duration::from_secs(2));
    broker.kill();
    std::thread::sleep(Duration::from_secs(2));
    laminar.signal("TERM");
    let asked = Instant::now();
    let status = laminar.wait(Duration::from_mins(1));
    let took = asked.elapsed();
    let stderr = laminar.stderr();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        took < Duration::from_secs(35),
        "took {took:?} to stop: {stderr}"
    );
    assert!(stderr.contains("did not finish within"), "{stderr}");
}
