//! Golden pipelines: each `tests/golden/NAME/` holds `pipeline.yaml` (reading
//! `${CASE_DIR}/input.jsonl`, writing to stdout), `input.jsonl` and `expected.jsonl`; the
//! run must exit 0 and print exactly the expected lines. Each case runs on one reactor
//! (exact order) and on three (windowed queries split by key: the same lines, in an order
//! that depends on the threads).
//! `LAMINAR_BLESS=1 cargo test --test golden` rewrites the expectations.

mod support;

use support::{laminar, read, repo};

#[test]
fn golden_pipelines_print_their_expected_output() {
    let root = repo().join("tests/golden");
    let mut cases: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 3);
    let bless = std::env::var_os("LAMINAR_BLESS").is_some();
    let mut failures = Vec::new();
    for case in cases {
        let pipeline = case.join("pipeline.yaml");
        let case_dir = case.to_string_lossy().into_owned();
        let run = |cores: &str| {
            laminar(
                &["run", &pipeline.to_string_lossy(), "--cores", cores],
                &[("CASE_DIR", &case_dir)],
            )
        };
        let (code, stdout, stderr) = run("1");
        if bless {
            std::fs::write(case.join("expected.jsonl"), &stdout).unwrap();
            continue;
        }
        let expected = read(&case.join("expected.jsonl"));
        if code != 0 || stdout != expected {
            failures.push(format!(
                "{}: exit {code}\n--- expected\n{expected}--- got\n{stdout}--- stderr\n{stderr}",
                case.display()
            ));
        }
        let (code, stdout, stderr) = run("3");
        let sorted = |text: &str| {
            let mut lines: Vec<&str> = text.lines().collect();
            lines.sort_unstable();
            lines.join("\n")
        };
        if code != 0 || sorted(&stdout) != sorted(&expected) {
            failures.push(format!(
                "{} on 3 reactors: exit {code}\n--- expected (any order)\n{expected}--- got\n{stdout}--- stderr\n{stderr}",
                case.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn file_filter_example_drains_and_exits_0() {
    let (code, stdout, stderr) = laminar(&["run", "pipelines/file-filter.yaml"], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout,
        "{\"auction\":1001,\"double_price\":3000}\n{\"auction\":1005,\"double_price\":2000}\n{\"auction\":1006,\"double_price\":62000}\n"
    );
    assert!(
        stderr.contains("skipping records that cannot be decoded"),
        "{stderr}"
    );
    assert!(stderr.contains("records_rejected=1"), "{stderr}");
}

#[test]
fn datagen_example_writes_only_matching_rows() {
    let dir = support::TempDir::new("datagen");
    let out = dir.path("out.jsonl");
    let (code, _, stderr) = laminar(
        &["run", "pipelines/datagen-to-file.yaml"],
        &[("EVENTS", "20000"), ("OUT_FILE", &out.to_string_lossy())],
    );
    assert_eq!(code, 0, "{stderr}");
    let text = read(&out);
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!rows.is_empty());
    assert!(
        rows.iter()
            .all(|r| r["auction"].as_i64().unwrap() % 123 == 0)
    );
    assert!(stderr.contains("records_in=20000"), "{stderr}");
}

#[test]
fn decode_error_fail_policy_exits_2_naming_the_record() {
    let dir = support::TempDir::new("fail");
    let input = dir.write("in.jsonl", "{\"a\":1}\n{\"a\":\"x\"}\n{\"a\":3}\n");
    let pipeline = dir.write(
        "p.yaml",
        &format!(
            "pipeline: f\nsources:\n  - {{ name: s, connector: file, path: {}, schema: {{ a: BIGINT }}, on_decode_error: fail }}\nsinks:\n  - {{ name: o, from: s, connector: stdout }}\n",
            input.display()
        ),
    );
    let (code, _, stderr) = laminar(&["run", &pipeline.to_string_lossy()], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(
            "[0]@1 cannot be decoded: field `a`: expected an integer, found the string \"x\""
        ),
        "{stderr}"
    );
}
