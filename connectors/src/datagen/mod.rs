//! `connector: datagen`: Nexmark events (bids, auctions, people), deterministic for a seed.
//!
//! Each table numbers its events 0, 1, 2, ... and places them in Nexmark's global event
//! sequence (1 person : 3 auctions : 46 bids in every 50 events), so that bids refer to
//! auctions and people that the other tables generate with the same seed. Every value of
//! event `i` is a pure function of `(seed, i)`: runs are reproducible and can be split.
//!
//! Event time is `2023-11-14T22:13:20Z + i / rate` (the rate is `rate_per_s`, or 10,000 per
//! second when the generator runs unpaced), so event times never depend on the wall clock.

mod nexmark;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;

use crate::{BATCH_ROWS_MAX, Source, SourceBatch, SourceError, SourcePoll, SourcePosition};
pub use nexmark::{BASE_TIME_MS, NexmarkTable};

/// Event-time rate of an unpaced generator, events per second.
pub const UNPACED_EVENT_TIME_RATE: u64 = 10_000;

/// A `connector: datagen` source.
#[derive(Debug, Clone)]
pub struct DatagenOptions {
    pub name: String,
    pub table: NexmarkTable,
    /// How many events, then the source is finished; `None`: unbounded.
    pub events: Option<u64>,
    /// Events per second of wall-clock time; `None`: as fast as the pipeline takes them.
    pub rate_per_s: Option<u64>,
    pub seed: u64,
    /// Distinct auctions bids are spread over (the number of live keys of a GROUP BY auction).
    pub auctions: u64,
}

pub struct DatagenSource {
    options: DatagenOptions,
    schema: SchemaRef,
    next: u64,
    /// `next` when pacing started: a resumed generator paces from where it resumed.
    paced_from: u64,
    started: Option<Instant>,
}

impl DatagenSource {
    #[must_use]
    pub fn new(options: DatagenOptions) -> Self {
        Self {
            schema: Arc::new(options.table.schema()),
            options,
            next: 0,
            paced_from: 0,
            started: None,
        }
    }

    /// How many events may be emitted now without running ahead of `rate_per_s`.
    fn allowed(&mut self) -> u64 {
        let remaining = self
            .options
            .events
            .map_or(u64::MAX, |n| n - self.next.min(n));
        let budget = match self.options.rate_per_s {
            None => u64::MAX,
            Some(rate) => {
                let started = *self.started.get_or_insert_with(Instant::now);
                let due = (started.elapsed().as_secs_f64() * rate as f64) as u64 + 1;
                due.saturating_sub(self.next - self.paced_from)
            }
        };
        remaining.min(budget).min(BATCH_ROWS_MAX as u64)
    }
}

impl Source for DatagenSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn poll(&mut self, timeout: Duration) -> Result<SourcePoll, SourceError> {
        if self.options.events.is_some_and(|n| self.next >= n) {
            return Ok(SourcePoll::Finished);
        }
        let mut n = self.allowed();
        if n == 0 {
            let rate = self.options.rate_per_s.unwrap_or(1).max(1);
            std::thread::sleep(timeout.min(Duration::from_micros(1_000_000 / rate)));
            n = self.allowed();
            if n == 0 {
                return Ok(SourcePoll::Idle);
            }
        }
        let rate = self.options.rate_per_s.unwrap_or(UNPACED_EVENT_TIME_RATE);
        let batch = nexmark::generate(&self.options, self.schema.clone(), self.next, n, rate)
            .map_err(|e| SourceError::Fatal {
                context: format!("source {}", self.options.name),
                message: e.to_string(),
            })?;
        self.next += n;
        Ok(SourcePoll::Batch(SourceBatch {
            batch,
            rejected: Vec::new(),
            row_partitions: None,
        }))
    }

    fn positions(&self) -> Vec<SourcePosition> {
        vec![SourcePosition {
            topic: format!("datagen:{}", self.options.name),
            partition: 0,
            next_offset: self.next as i64,
        }]
    }

    fn seek(&mut self, positions: &[SourcePosition]) -> Result<(), SourceError> {
        let topic = format!("datagen:{}", self.options.name);
        if let Some(p) = positions
            .iter()
            .find(|p| p.topic == topic && p.partition == 0)
        {
            self.next = u64::try_from(p.next_offset).unwrap_or(0);
            self.paced_from = self.next;
        }
        Ok(())
    }

    fn commit(
        &mut self,
        _positions: &[SourcePosition],
        _blocking: bool,
    ) -> Result<(), SourceError> {
        Ok(())
    }
}
