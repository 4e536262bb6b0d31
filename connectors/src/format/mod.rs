//! Formats: the declared column types, and JSON <-> Arrow.
//!
//! Decoding is per record (a bad record is rejected alone, never its neighbours) and
//! writes straight into Arrow builders; encoding writes one JSON object per row.

pub mod json;
pub mod types;

pub use json::{JsonDecoder, JsonEncoder};
pub use types::{COLUMN_TYPE_NAMES, ColumnType, parse_column_type};

/// Why one record could not be decoded. Carried to the dead-letter topic as a header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid JSON: {0}")]
    Syntax(String),
    #[error("expected a JSON object, found {0}")]
    NotAnObject(&'static str),
    #[error("missing required field `{0}`")]
    MissingField(String),
    #[error("field `{field}` is null but the column is NOT NULL")]
    NullField { field: String },
    #[error("field `{field}`: expected {expected}, found {found}")]
    WrongType {
        field: String,
        expected: &'static str,
        found: String,
    },
    #[error("record has no value (tombstone)")]
    Empty,
}
