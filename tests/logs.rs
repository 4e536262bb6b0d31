//! Logs: human-readable by default, one JSON object per line with `--log-format json` or
//! `LAMINAR_LOG_FORMAT=json`, and never a line per record.

#![allow(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod support;

use support::TempDir;

fn pipeline(dir: &TempDir) -> String {
    dir.write(
        "logs.yaml",
        "pipeline: logs\nsources:\n  - { name: bids, connector: datagen, events: 5000 }\nsinks:\n  - { name: out, from: bids, connector: stdout }\n",
    )
    .to_string_lossy()
    .into_owned()
}

#[test]
fn json_logs_are_one_object_per_line_and_text_is_the_default() {
    let dir = TempDir::new("logs");
    let file = pipeline(&dir);
    for (args, env) in [
        (vec!["--log-format", "json", "run", &file], vec![]),
        (vec!["run", &file], vec![("LAMINAR_LOG_FORMAT", "json")]),
    ] {
        let (code, stdout, stderr) = support::laminar(&args, &env);
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(stdout.lines().count(), 5000);
        let lines: Vec<&str> = stderr.lines().collect();
        assert!(lines.len() < 20, "no log line per record: {stderr}");
        let mut stopped = false;
        for line in lines {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(
                v["level"].is_string() && v["timestamp"].is_string(),
                "{line}"
            );
            if v["fields"]["message"] == "pipeline stopped cleanly" {
                assert_eq!(v["fields"]["records_in"], 5000, "{line}");
                stopped = true;
            }
        }
        assert!(stopped, "{stderr}");
    }
    let (code, _, stderr) = support::laminar(&["run", &file], &[]);
    assert_eq!(code, 0);
    assert!(
        stderr.contains("pipeline stopped cleanly records_in=5000"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("\x1b[2K"),
        "no status line when stderr is not a terminal: {stderr:?}"
    );
}

#[test]
fn on_a_terminal_run_draws_a_status_line_in_place() {
    let dir = TempDir::new("status");
    let file = dir.write(
        "status.yaml",
        "pipeline: status
sources:
  - { name: bids, connector: datagen, events: 200000, rate_per_s: 100000, event_time: { column: date_time } }
sinks:
  - { name: out, from: bids, connector: file, path: out.jsonl }
",
    );
    // `script` runs laminar on a pseudo-terminal and copies what it wrote.
    let command = format!(
        "cd {} && {} run {}",
        dir.0.display(),
        support::LAMINAR,
        file.display()
    );
    let output = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .unwrap();
    let tty = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{tty}");
    let lines: Vec<&str> = tty
        .split("\r\x1b[2K")
        .filter(|l| l.starts_with("in "))
        .collect();
    assert!(lines.len() >= 2, "redrawn about once a second: {tty:?}");
    let last = lines[lines.len() - 1];
    for part in [
        "/s  out ",
        "/s  watermark 2023-11-14 ",
        " d behind)  epoch ",
        "  checkpoint ",
    ] {
        assert!(last.contains(part), "{part:?} in {last:?}");
    }
    // The rate in is about what the generator produced (100K/s), not zero.
    assert!(lines[1..].iter().any(|l| l.contains("K/s")), "{lines:?}");
}
