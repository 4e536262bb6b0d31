//! Shared test helpers: run the `laminar` binary, stop it with signals, temp dirs.
#![expect(clippy::unwrap_used, reason = "test helpers fail the test loudly")]
#![allow(dead_code, reason = "each test file uses a subset")]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const LAMINAR: &str = env!("CARGO_BIN_EXE_laminar");

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "laminar-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `args`, with `--state-dir DIR` added to a `run` that has none and no embedded broker,
/// so that tests running in parallel never share a state directory.
fn with_state_dir(args: &[&str], dir: &Path) -> Vec<String> {
    let mut args: Vec<String> = args.iter().map(|&a| a.to_owned()).collect();
    if args.iter().any(|a| a == "run")
        && !args
            .iter()
            .any(|a| a == "--state-dir" || a == "--embedded-broker")
    {
        args.push("--state-dir".to_owned());
        args.push(dir.display().to_string());
    }
    args
}

/// Runs `laminar ARGS` to completion: (exit code, stdout, stderr). A `run` gets a state
/// directory of its own.
pub fn laminar(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let state = TempDir::new("state");
    let out = Command::new(LAMINAR)
        .args(with_state_dir(args, &state.0))
        .envs(env.iter().copied())
        .current_dir(repo())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A `laminar` process running in the background; stderr goes to a file.
pub struct Running {
    pub child: Child,
    pub stdout: Option<BufReader<ChildStdout>>,
    pub stderr_file: PathBuf,
}

impl Running {
    /// Starts `laminar ARGS`; a `run` keeps its state in `dir/state`, so a second run in
    /// the same `dir` resumes from the first.
    pub fn start(args: &[&str], env: &[(&str, &str)], dir: &TempDir) -> Self {
        let stderr_file = dir.path(&format!(
            "stderr-{}.log",
            Instant::now().elapsed().as_nanos()
        ));
        let mut child = Command::new(LAMINAR)
            .args(with_state_dir(args, &dir.path("state")))
            .envs(env.iter().copied())
            .current_dir(repo())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_file).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().map(BufReader::new);
        Self {
            child,
            stdout,
            stderr_file,
        }
    }

    /// Reads up to `n` stdout lines, waiting at most `timeout`.
    pub fn read_lines(&mut self, n: usize, timeout: Duration) -> Vec<String> {
        let stdout = self.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = stdout;
            for _ in 0..n {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if tx.send(line.trim_end().to_owned()).is_err() {
                    break;
                }
            }
            // Keep draining so the child never blocks on a full pipe.
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink);
        });
        let deadline = Instant::now() + timeout;
        let mut lines = Vec::new();
        while lines.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => lines.push(l),
                Err(_) => break,
            }
        }
        lines
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for exit, at most `timeout`; kills and panics past it.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "laminar did not exit within {timeout:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_file).unwrap_or_default()
    }

    /// Waits until stderr holds `text`, at most `timeout`; stderr as it is then.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.stderr();
            if log.contains(text) || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then waits for a clean exit (0), failing the test with stderr otherwise.
    pub fn stop(&mut self) {
        self.signal("TERM");
        let status = self.wait(Duration::from_mins(1));
        assert!(
            status.success(),
            "laminar exited with {status}; stderr:\n{}",
            self.stderr()
        );
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Status code and body of `GET path` from an HTTP server at `addr`.
pub fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// The value of the sample that starts with `series` (name and labels) in a Prometheus
/// text exposition.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

/// A pipeline that copies topic `events` (one BIGINT column `id`) to a Kafka topic, with
/// lines of YAML added where a test needs them.
pub struct Passthrough<'a> {
    pub name: &'a str,
    pub bootstrap: &'a str,
    /// Lines under `kafka:` after `bootstrap_servers` (indented two spaces).
    pub kafka: &'a str,
    /// Top-level sections after `kafka` (a `schema_registry:` block).
    pub sections: &'a str,
    /// Lines of the source after its schema (indented four spaces).
    pub source: &'a str,
    /// The query's SELECT list.
    pub select: &'a str,
    /// The topic the sink writes.
    pub topic: &'a str,
    /// Lines of the sink after its topic (indented four spaces).
    pub sink: &'a str,
}

impl Default for Passthrough<'_> {
    fn default() -> Self {
        Self {
            name: "passthrough",
            bootstrap: "127.0.0.1:9092",
            kafka: "",
            sections: "",
            source: "",
            select: "id",
            topic: "events-out",
            sink: "",
        }
    }
}

impl Passthrough<'_> {
    /// Writes the pipeline to `file` in `dir`; its path.
    pub fn write(&self, dir: &TempDir, file: &str) -> String {
        let Self {
            name,
            bootstrap,
            kafka,
            sections,
            source,
            select,
            topic,
            sink,
        } = self;
        dir.write(
            file,
            &format!(
                r"pipeline: {name}
kafka:
  bootstrap_servers: {bootstrap}
{kafka}
{sections}
sources:
  - name: events
    connector: kafka
    topic: events
    schema: {{ id: BIGINT }}
{source}
queries:
  - name: all
    sql: SELECT {select} FROM events
sinks:
  - name: out
    from: all
    connector: kafka
    topic: {topic}
{sink}
state:
  checkpoint_interval_ms: 200
"
            ),
        )
        .display()
        .to_string()
    }
}
