//! Golden tests for problems in pipeline files: each `tests/invalid/NAME.yaml` must fail
//! `laminar validate` with exit 1 and exactly the text of `NAME.stderr`.
//! `LAMINAR_BLESS=1 cargo test --test invalid_files` rewrites the expectations.

mod support;

use support::{laminar, read, repo};

#[test]
fn invalid_files_fail_with_their_expected_messages() {
    let dir = repo().join("tests/invalid");
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 8,
        "expected the golden cases in {}",
        dir.display()
    );
    let bless = std::env::var_os("LAMINAR_BLESS").is_some();
    let mut failures = Vec::new();
    for case in cases {
        let rel = format!(
            "tests/invalid/{}",
            case.file_name().unwrap().to_string_lossy()
        );
        let (code, stdout, stderr) = laminar(&["validate", &rel], &[]);
        let expected_path = case.with_extension("stderr");
        if bless {
            std::fs::write(&expected_path, &stderr).unwrap();
            continue;
        }
        let expected = read(&expected_path);
        if code != 1 || stderr != expected || !stdout.is_empty() {
            failures.push(format!(
                "{rel}: exit {code}\n--- expected\n{expected}--- got\n{stderr}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn validate_accepts_every_example_pipeline() {
    for entry in std::fs::read_dir(repo().join("pipelines")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let rel = format!("pipelines/{}", path.file_name().unwrap().to_string_lossy());
            let (code, _, stderr) = laminar(&["validate", &rel], &[]);
            assert_eq!(code, 0, "{rel}: {stderr}");
        }
    }
}

#[test]
fn validate_reports_every_file_and_every_problem() {
    let (code, _, stderr) = laminar(
        &[
            "validate",
            "pipelines/file-filter.yaml",
            "tests/invalid/unknown_keys.yaml",
            "tests/invalid/sql_errors.yaml",
        ],
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        stderr.contains("tests/invalid/unknown_keys.yaml:"),
        "{stderr}"
    );
    assert!(
        stderr.contains("tests/invalid/sql_errors.yaml:"),
        "{stderr}"
    );
    assert!(!stderr.contains("file-filter"), "{stderr}");
}

#[test]
fn usage_errors_exit_1_and_help_exits_0() {
    assert_eq!(laminar(&["frobnicate"], &[]).0, 1);
    assert_eq!(laminar(&["validate"], &[]).0, 1);
    assert_eq!(laminar(&["--help"], &[]).0, 0);
}
