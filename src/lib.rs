//! laminar: a Kafka-compatible stream processor that runs as a sidecar.
//!
//! A YAML pipeline file binds Kafka topics to SQL continuous queries. The crate follows
//! one event from top to bottom:
//!
//! ```text
//!  pipeline.yaml ──► config (YAML with positions, ${VAR}s, every problem at once)
//!                        │
//!                        ▼
//!                    sql (DataFusion plans once ──► physical expressions per batch)
//!                        │
//!  laminar_connectors    ▼
//!  kafka/file/datagen ──► engine (poll ──► queries ──► sinks; epochs: flush, then commit)
//!                        │                                  │
//!                        └── dead letters ──► kafka          └──► kafka / file / stdout
//! ```
//!
//! - [`config`]: the pipeline file's model and loader (`laminar validate`).
//! - [`sql`]: planning and compiling queries (`laminar explain`), windows and EMIT.
//! - [`operator`]: what compiled queries run: stateless steps, windowed aggregation,
//!   accumulators, watermarks.
//! - [`state`]: the state-store interface operators checkpoint into and restore from.
//! - [`engine`]: running a pipeline (`laminar run`).
//! - [`bench`]: the built-in benchmark (`laminar bench`).
//! - `laminar_connectors` (crate `connectors/`): sources, sinks, formats, the embedded broker.

pub mod bench;
pub mod config;
pub mod durability;
pub mod engine;
pub mod metrics;
pub mod operator;
pub mod sql;
pub mod state;

/// Exit codes, as documented in the README.
pub mod exit {
    /// Clean stop: drained, or stopped by SIGTERM/SIGINT after a final epoch.
    pub const OK: u8 = 0;
    /// Invalid pipeline file, SQL or command line.
    pub const INVALID: u8 = 1;
    /// Fatal runtime error; the cause is on stderr. Nothing committed is lost.
    pub const FATAL: u8 = 2;
}
