//! TLS: laminar reads and writes through a TLS listener (stunnel in front of the
//! embedded broker in its own process), verifying the broker's certificate against the
//! CA in `ssl.ca.location`; a certificate it cannot verify is refused, and said so.

#![allow(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod support;

use std::time::Duration;

use laminar_testcontainers::tls::TlsFront;
use laminar_testcontainers::{Broker, Message, consume_with, free_port, produce_messages_with};
use support::{LAMINAR, Passthrough, Running, TempDir};

fn pipeline(dir: &TempDir, bootstrap: &str, ca: &str) -> String {
    let kafka = format!("  properties:\n    security.protocol: SSL\n    ssl.ca.location: {ca}");
    Passthrough {
        name: "tls",
        bootstrap,
        kafka: &kafka,
        select: "id * 10 AS id",
        ..Passthrough::default()
    }
    .write(dir, &format!("pipeline-{}.yaml", ca.len()))
}

#[test]
fn tls_with_a_verified_broker_certificate_works_and_an_unknown_one_is_refused() {
    let (relay, front_port) = (free_port().unwrap(), free_port().unwrap());
    let advertised = format!("127.0.0.1:{front_port}");
    let broker = Broker::laminar_process_advertising(
        LAMINAR.as_ref(),
        relay,
        Some(&advertised),
        &[("events", 2), ("events-out", 1)],
    )
    .unwrap();
    assert_eq!(broker.bootstrap(), advertised);
    let Some(front) = TlsFront::start(front_port, &format!("127.0.0.1:{relay}")).unwrap() else {
        eprintln!("stunnel or openssl is not installed; skipping (scripts/test.sh installs them)");
        return;
    };
    let ca = front.ca.display().to_string();
    let tls = [
        ("security.protocol", "SSL"),
        ("ssl.ca.location", ca.as_str()),
    ];
    let messages: Vec<Message> = (0..40)
        .map(|i| Message {
            value: format!(r#"{{"id": {i}}}"#).into_bytes(),
            ..Message::default()
        })
        .collect();
    produce_messages_with(broker.bootstrap(), &tls, "events", &messages).unwrap();
    let dir = TempDir::new("tls");

    // A CA that did not sign the broker's certificate: refused, with the reason.
    let other = front.other_ca.display().to_string();
    let mut refused = Running::start(
        &["run", &pipeline(&dir, broker.bootstrap(), &other)],
        &[],
        &dir,
    );
    let log = refused.wait_for_log("certificate verify failed", Duration::from_secs(30));
    assert!(log.contains("certificate verify failed"), "{log}");
    refused.signal("KILL");
    let _ = refused.wait(Duration::from_secs(10));

    let state = TempDir::new("tls-state");
    let state_dir = state.0.display().to_string();
    let mut running = Running::start(
        &[
            "run",
            &pipeline(&dir, broker.bootstrap(), &ca),
            "--state-dir",
            &state_dir,
        ],
        &[],
        &dir,
    );
    let out = consume_with(
        broker.bootstrap(),
        &tls,
        "events-out",
        40,
        Duration::from_millis(1500),
        Duration::from_mins(1),
    )
    .unwrap();
    running.stop();
    let mut ids: Vec<i64> = out
        .iter()
        .map(|r| {
            serde_json::from_str::<serde_json::Value>(&r.value).unwrap()["id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..40).map(|i| i * 10).collect::<Vec<_>>());
}
