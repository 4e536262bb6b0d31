//! The live status line `laminar run` draws on a terminal: rates in and out, consumer
//! lag, watermark, the last epoch and checkpoint, redrawn in place once a second. Log
//! lines print over it; it is drawn again after them. Off when stderr is not a terminal.

use std::fmt::Write as _;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Whether the status line is on screen: the next log line erases it first.
static DRAWN: AtomicBool = AtomicBool::new(false);

/// Where log lines go: stderr, erasing the status line first when it is drawn (it is
/// redrawn below them at its next update).
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        LogWriter
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        if DRAWN.swap(false, Ordering::Relaxed) {
            err.write_all(b"\r\x1b[2K")?;
        }
        err.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// How often the line is redrawn.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// What the line shows.
#[derive(Debug, Clone, Copy, Default)]
pub struct Status {
    pub records_in: u64,
    pub records_out: u64,
    /// Records behind the end of every Kafka partition together (`None`: not known).
    pub lag: Option<i64>,
    /// The lowest source watermark, ms since the Unix epoch.
    pub watermark_ms: Option<i64>,
    pub epoch: u64,
    /// Epoch of the last checkpoint, and when it was taken (ms since the Unix epoch).
    pub checkpoint: Option<(u64, i64)>,
}

/// Draws [`Status`] on stderr, at most once per [`STATUS_INTERVAL`].
pub struct StatusLine {
    last: Option<(Instant, u64, u64)>,
}

impl Default for StatusLine {
    fn default() -> Self {
        Self::new()
    }
}

impl StatusLine {
    #[must_use]
    pub fn new() -> Self {
        Self { last: None }
    }

    /// Whether a redraw is due.
    #[must_use]
    pub fn due(&self) -> bool {
        self.last
            .is_none_or(|(at, _, _)| at.elapsed() >= STATUS_INTERVAL)
    }

    /// Redraws the line if it is due.
    pub fn update(&mut self, status: &Status, now_ms: i64) {
        let now = Instant::now();
        let (rate_in, rate_out) = match self.last {
            Some((at, _, _)) if now.duration_since(at) < STATUS_INTERVAL => return,
            Some((at, records_in, records_out)) => {
                let secs = now.duration_since(at).as_secs_f64();
                (
                    (status.records_in - records_in) as f64 / secs,
                    (status.records_out - records_out) as f64 / secs,
                )
            }
            None => (0.0, 0.0),
        };
        self.last = Some((now, status.records_in, status.records_out));
        let line = render(status, rate_in, rate_out, now_ms);
        let mut err = std::io::stderr().lock();
        // Carriage return and erase-line: the line redraws in place.
        let _ = write!(err, "\r\x1b[2K{line}");
        let _ = err.flush();
        DRAWN.store(true, Ordering::Relaxed);
    }

    /// Erases the line (before the final log lines).
    pub fn clear(&mut self) {
        if self.last.take().is_some() {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
            DRAWN.store(false, Ordering::Relaxed);
        }
    }
}

/// The text of the line.
#[must_use]
pub fn render(status: &Status, rate_in: f64, rate_out: f64, now_ms: i64) -> String {
    let mut line = format!("in {}/s  out {}/s", human(rate_in), human(rate_out));
    if let Some(lag) = status.lag {
        let _ = write!(line, "  lag {}", human(lag as f64));
    }
    match status.watermark_ms {
        Some(w) => {
            let behind = (now_ms - w).max(0) as f64 / 1000.0;
            // The time of day while the watermark is within a day of now, else the date.
            let format = if behind < 86_400.0 {
                "%H:%M:%S"
            } else {
                "%Y-%m-%d %H:%M:%S"
            };
            let time = chrono::DateTime::from_timestamp_millis(w)
                .map_or_else(|| w.to_string(), |t| t.format(format).to_string());
            let _ = write!(line, "  watermark {time} ({} behind)", duration(behind));
        }
        None => line.push_str("  watermark -"),
    }
    let _ = write!(line, "  epoch {}", status.epoch);
    match status.checkpoint {
        Some((epoch, at_ms)) => {
            let _ = write!(
                line,
                "  checkpoint {epoch} ({} s ago)",
                (now_ms - at_ms).max(0) / 1000
            );
        }
        None => line.push_str("  checkpoint -"),
    }
    line
}

/// `secs` in the largest unit that keeps it readable.
fn duration(secs: f64) -> String {
    if secs < 120.0 {
        format!("{secs:.1} s")
    } else if secs < 7200.0 {
        format!("{:.0} min", secs / 60.0)
    } else if secs < 172_800.0 {
        format!("{:.0} h", secs / 3600.0)
    } else {
        format!("{:.0} d", secs / 86_400.0)
    }
}

/// `n` with a K or M suffix past a thousand.
fn human(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}K", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_rates_lag_watermark_and_checkpoint() {
        let now_ms = 1_700_000_010_000;
        let status = Status {
            records_in: 0,
            records_out: 0,
            lag: Some(1500),
            watermark_ms: Some(1_700_000_008_500),
            epoch: 42,
            checkpoint: Some((40, 1_700_000_000_000)),
        };
        assert_eq!(
            render(&status, 123_456.0, 512.0, now_ms),
            "in 123.5K/s  out 512/s  lag 1.5K  watermark 22:13:28 (1.5 s behind)  epoch 42  checkpoint 40 (10 s ago)"
        );
        let empty = Status::default();
        let old = Status {
            watermark_ms: Some(1_600_000_000_000),
            ..empty
        };
        assert!(
            render(&old, 0.0, 0.0, now_ms)
                .contains("watermark 2020-09-13 12:26:40 (1157 d behind)"),
            "{}",
            render(&old, 0.0, 0.0, now_ms)
        );
        assert_eq!(
            render(&empty, 0.0, 0.0, now_ms),
            "in 0/s  out 0/s  watermark -  epoch 0  checkpoint -"
        );
    }
}
