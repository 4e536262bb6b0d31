//! A full disk under the state directory (a small tmpfs) stops the pipeline with a
//! clear error; once there is room again, the next run recovers what was committed and
//! its results equal a run that never ran out of space.
//!
//! What is committed before the disk fills does not depend on timing: a first run
//! stops cleanly after a sixth of the input (a clean stop commits), and the run after
//! it, which cannot fit its state, must resume from there at least.
//!
//! Mounting needs root (as CI runs); as another user the test says so and does nothing.

#![allow(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;

use laminar::engine::{Pipeline, RunOptions};
use laminar::{config, sql};
use support::TempDir;

/// The tmpfs mounted at a path, unmounted on drop.
struct Tmpfs<'a>(&'a Path);

impl<'a> Tmpfs<'a> {
    fn mount(at: &'a Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs at {}", at.display());
        Self(at)
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount {}", self.0.display());
    }
}

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

fn run(yaml: &str, records_max: Option<u64>) -> Result<laminar::engine::RunSummary, String> {
    let config = config::parse("disk_full.yaml", yaml, &|_| None).unwrap();
    let planned = sql::plan(&config).unwrap();
    let options = RunOptions {
        metrics: None,
        bootstrap_servers: None,
        records_max,
        status_line: false,
    };
    Pipeline::build(&config, planned, &options)
        .map_err(|e| e.to_string())?
        .run(&AtomicBool::new(false))
        .map_err(|e| e.to_string())
}

fn sorted_lines(path: &Path) -> Vec<String> {
    let mut lines: Vec<String> = support::read(path).lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

#[test]
fn a_full_disk_is_a_clear_error_and_loses_nothing_committed() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let dir = TempDir::new("disk-full");
    // 60,000 keys in one open hour-long window: every epoch adds state until the end,
    // and all of it does not fit the small disk.
    let lines: Vec<String> = (0..60_000)
        .map(|i| {
            format!(
                r#"{{"k":"key-{i:08}","v":{i},"ts":{}}}"#,
                1_700_000_000_000_i64 + i
            )
        })
        .collect();
    let input = dir.write("in.jsonl", &(lines.join("\n") + "\n"));
    let yaml = |state: &Path, out: &Path| {
        format!(
            "pipeline: disk-full\nsources:\n  - name: events\n    connector: file\n    path: {}\n    batch_rows: 500\n    schema: {{ k: VARCHAR, v: BIGINT, ts: TIMESTAMP }}\n    event_time: {{ column: ts }}\nqueries:\n  - name: sums\n    sql: SELECT k, window_start, SUM(v) AS s, COUNT(*) AS n FROM TUMBLE(events, ts, INTERVAL '1' HOUR) GROUP BY k, window_start\nsinks:\n  - {{ name: w, from: sums, connector: file, path: {} }}\nstate:\n  dir: {}\n  checkpoint_interval_ms: 20\nruntime:\n  cores: 1\n",
            input.display(),
            out.display(),
            state.display(),
        )
    };
    let reference = dir.path("reference.jsonl");
    run(&yaml(&dir.path("reference-state"), &reference), None).unwrap();
    let want = sorted_lines(&reference);
    assert_eq!(want.len(), 60_000);

    let mount = dir.path("small");
    let tmpfs = Tmpfs::mount(&mount, "3m");
    let out = dir.path("out.jsonl");
    // 10,000 keys take about 1.7 MB of arena and log, well inside the 3 MiB; all
    // 60,000 need about 8 MB.
    let committed = 10_000;
    let first = run(&yaml(&mount.join("state"), &out), Some(committed)).unwrap();
    assert_eq!(first.records_in, committed, "{first:?}");
    let err = run(&yaml(&mount.join("state"), &out), None).unwrap_err();
    assert!(
        err.contains("No space left on device"),
        "the error should say the disk is full: {err}"
    );
    assert!(
        err.contains(&mount.display().to_string()),
        "the error should name the file: {err}"
    );
    eprintln!("second run: {err}");
    tmpfs.resize("256m");
    let summary = run(&yaml(&mount.join("state"), &out), None).unwrap();
    assert!(
        summary.records_in <= 60_000 - committed,
        "the third run resumed after what was committed: {summary:?}"
    );
    eprintln!("third run: {summary:?}");
    // Windows close only at the end, so every result comes from the last run: an
    // accumulator that lost committed records would show here.
    assert_eq!(sorted_lines(&out), want);
}
