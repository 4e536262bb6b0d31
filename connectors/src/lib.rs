//! laminar's connectors: where records enter and leave the engine.
//!
//! ```text
//!   kafka / file / datagen ──► Source::poll ──► SourceBatch (Arrow) ──► engine
//!                                 │ decode errors ──► Rejected ──► dead-letter sink
//!   engine ──► Sink::write (RecordBatch) ──► format::json::encode ──► kafka / file / stdout
//!              Sink::flush  (every epoch: waits for the broker's acknowledgements)
//! ```
//!
//! This crate owns the heavy native build (rdkafka) so that engine edits don't rebuild
//! it. It knows nothing of YAML: the engine decodes the pipeline file into the option
//! structs defined here (`KafkaSourceOptions`, ...), whose docs are the user reference.
//!
//! Delivery contract: a source never forgets a position it has handed out until the
//! engine calls [`Source::commit`] with it, and the engine calls that only after every
//! sink has acknowledged the records derived from earlier positions (at-least-once).

pub mod crash;
pub mod datagen;
pub mod file;
pub mod format;
pub mod kafka;
pub mod stdout;

mod connector;

pub use connector::{
    BATCH_ROWS_MAX, DecodeErrorPolicy, FlushOutcome, PartitionStats, Rejected, Sink, SinkError,
    Source, SourceBatch, SourceError, SourcePoll, SourcePosition,
};
