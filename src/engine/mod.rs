//! The engine: builds a pipeline's sources, queries and sinks, then runs the loop
//!
//! ```text
//!   poll sources ──► decode errors ──► dead-letter sink (or skip / fail)
//!        │
//!        ▼ batch named after its source
//!   queries in file order (each reads a source or an earlier query)
//!        │
//!        ▼
//!   sinks whose `from` produced rows ──► every checkpoint_interval_ms: close the epoch
//!                                          (flush every sink, then commit positions)
//! ```
//!
//! Windowed queries may run on reactor threads instead, split by group key
//! ([`reactor`]); to the loop they are operators like the others, whose output arrives a
//! little later and is complete at each epoch's flush.
//!
//! Delivery is at-least-once: a source position is committed only after every sink has
//! acknowledged everything read before it, so a crash re-reads at most one epoch. A
//! bounded source that is drained ends the run (after a final epoch) with exit 0;
//! SIGTERM/SIGINT does the same for any pipeline.

pub mod latency;
mod pipeline;
pub mod reactor;
pub mod schemas;
pub mod status;

pub use pipeline::{Pipeline, REACTORS_MAX, RunError, RunOptions, RunSummary, reactor_count};
