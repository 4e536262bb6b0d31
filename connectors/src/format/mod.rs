//! Formats: the declared column types, JSON <-> Arrow and Avro <-> Arrow.
//!
//! Decoding is per record (a bad record is rejected alone, never its neighbours) and
//! writes straight into Arrow builders; encoding writes one JSON object or Avro datum per
//! row.

pub mod avro;
pub mod json;
mod row;
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
    #[error("not in the Confluent Avro wire format: {found}")]
    NotConfluentFramed { found: String },
    #[error("schema id {0} is not in the schema registry")]
    UnknownSchemaId(u32),
    #[error("{writer} cannot be read into the declared columns: {reason}")]
    SchemaNotReadable { writer: String, reason: String },
    #[error("invalid Avro: {0}")]
    Avro(String),
    #[error("key: {0}")]
    Key(Box<DecodeError>),
    #[error("record has no Kafka timestamp, and `_timestamp` is the event time")]
    NoTimestamp,
}

/// How a source decodes one part of a record (its value, or its key).
#[derive(Debug, Clone)]
pub enum DecoderSpec {
    /// JSON objects into these columns.
    Json(Vec<json::DecodeColumn>),
    /// Avro datums, written with `writers`' schemas, into the reader's columns.
    Avro {
        reader: avro::AvroReader,
        writers: avro::WriterSchemas,
    },
}

impl DecoderSpec {
    #[must_use]
    pub fn columns(&self) -> &[json::DecodeColumn] {
        match self {
            Self::Json(c) => c,
            Self::Avro { reader, .. } => &reader.columns,
        }
    }
}

/// A decoder of either format, with the two-phase `parse` / `append` of `row`.
pub enum RecordDecoder {
    Json(JsonDecoder),
    Avro(avro::AvroDecoder),
}

impl RecordDecoder {
    /// A decoder for `spec`; a plain Avro schema that cannot be read into the columns is
    /// the `Err` (a configuration error).
    pub fn new(spec: &DecoderSpec) -> Result<Self, String> {
        Ok(match spec {
            DecoderSpec::Json(columns) => Self::Json(JsonDecoder::new(columns.clone())),
            DecoderSpec::Avro { reader, writers } => {
                Self::Avro(avro::AvroDecoder::new(reader.clone(), writers.clone())?)
            }
        })
    }

    /// Fetches what decoding `bytes` needs from the schema registry, if anything; `Err`:
    /// the registry did not answer, and the record must wait.
    pub fn prepare(&mut self, bytes: &[u8]) -> Result<(), avro::RegistryError> {
        match self {
            Self::Json(_) => Ok(()),
            Self::Avro(d) => d.prepare(bytes),
        }
    }

    pub fn parse(&mut self, bytes: &[u8]) -> Result<(), DecodeError> {
        match self {
            Self::Json(d) => d.parse(bytes),
            Self::Avro(d) => d.parse(bytes),
        }
    }

    pub fn parse_absent(&mut self) -> Result<(), DecodeError> {
        match self {
            Self::Json(d) => d.parse_absent(),
            Self::Avro(d) => d.parse_absent(),
        }
    }

    pub fn append(&mut self) {
        match self {
            Self::Json(d) => d.append(),
            Self::Avro(d) => d.append(),
        }
    }

    #[must_use]
    pub fn rows(&self) -> usize {
        match self {
            Self::Json(d) => d.rows(),
            Self::Avro(d) => d.rows(),
        }
    }

    pub fn finish(&mut self) -> Vec<arrow::array::ArrayRef> {
        match self {
            Self::Json(d) => d.finish(),
            Self::Avro(d) => d.finish(),
        }
    }
}
