//! One row being decoded, shared by the JSON and Avro decoders: a cell per declared
//! column is filled in, the row is checked (NOT NULL columns present), and only then
//! appended to the Arrow builders. A record is appended whole or not at all, so
//! rejecting one never disturbs its neighbours.
//!
//! Decoding is two-phase so that a record with several parts (a key and a value, each
//! with its own decoder) is appended only when every part decoded: `start`, fill cells,
//! [`RowBuilders::check`], then [`RowBuilders::append`] for every part.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Float32Builder, Float64Builder, Int8Builder,
    Int16Builder, Int32Builder, Int64Builder, StringBuilder, TimestampMillisecondBuilder,
};

use super::DecodeError;
use super::json::DecodeColumn;
use super::types::{ColumnType, TIMESTAMP_TZ};

/// The value of one column in the row being decoded, already converted to the column's
/// type (integers range-checked, timestamps in milliseconds, dates in days).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Cell {
    Absent,
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// The text is in the column's string scratch.
    Str,
}

enum Builder {
    Boolean(BooleanBuilder),
    Int8(Int8Builder),
    Int16(Int16Builder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Float32(Float32Builder),
    Float64(Float64Builder),
    Utf8(StringBuilder),
    TimestampMs(TimestampMillisecondBuilder),
    Date32(Date32Builder),
}

impl Builder {
    fn new(ty: ColumnType, capacity: usize) -> Self {
        match ty {
            ColumnType::Boolean => Self::Boolean(BooleanBuilder::with_capacity(capacity)),
            ColumnType::Int8 => Self::Int8(Int8Builder::with_capacity(capacity)),
            ColumnType::Int16 => Self::Int16(Int16Builder::with_capacity(capacity)),
            ColumnType::Int32 => Self::Int32(Int32Builder::with_capacity(capacity)),
            ColumnType::Int64 => Self::Int64(Int64Builder::with_capacity(capacity)),
            ColumnType::Float32 => Self::Float32(Float32Builder::with_capacity(capacity)),
            ColumnType::Float64 => Self::Float64(Float64Builder::with_capacity(capacity)),
            ColumnType::Utf8 => Self::Utf8(StringBuilder::with_capacity(capacity, capacity * 16)),
            ColumnType::Timestamp(_) => Self::TimestampMs(
                TimestampMillisecondBuilder::with_capacity(capacity).with_timezone(TIMESTAMP_TZ),
            ),
            ColumnType::Date32 => Self::Date32(Date32Builder::with_capacity(capacity)),
        }
    }

    /// Appends a cell that the decoder has already validated against the column type.
    fn append(&mut self, cell: Cell, text: &str) {
        match (self, cell) {
            (Self::Boolean(b), Cell::Bool(v)) => b.append_value(v),
            (Self::Int8(b), Cell::Int(v)) => b.append_value(v as i8),
            (Self::Int16(b), Cell::Int(v)) => b.append_value(v as i16),
            (Self::Int32(b), Cell::Int(v)) => b.append_value(v as i32),
            (Self::Int64(b), Cell::Int(v)) => b.append_value(v),
            (Self::Float32(b), Cell::Float(v)) => b.append_value(v as f32),
            (Self::Float64(b), Cell::Float(v)) => b.append_value(v),
            (Self::Utf8(b), Cell::Str) => b.append_value(text),
            (Self::TimestampMs(b), Cell::Int(v)) => b.append_value(v),
            (Self::Date32(b), Cell::Int(v)) => b.append_value(v as i32),
            (b, _) => b.append_null(),
        }
    }

    fn append_null(&mut self) {
        match self {
            Self::Boolean(b) => b.append_null(),
            Self::Int8(b) => b.append_null(),
            Self::Int16(b) => b.append_null(),
            Self::Int32(b) => b.append_null(),
            Self::Int64(b) => b.append_null(),
            Self::Float32(b) => b.append_null(),
            Self::Float64(b) => b.append_null(),
            Self::Utf8(b) => b.append_null(),
            Self::TimestampMs(b) => b.append_null(),
            Self::Date32(b) => b.append_null(),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Self::Boolean(b) => Arc::new(b.finish()),
            Self::Int8(b) => Arc::new(b.finish()),
            Self::Int16(b) => Arc::new(b.finish()),
            Self::Int32(b) => Arc::new(b.finish()),
            Self::Int64(b) => Arc::new(b.finish()),
            Self::Float32(b) => Arc::new(b.finish()),
            Self::Float64(b) => Arc::new(b.finish()),
            Self::Utf8(b) => Arc::new(b.finish()),
            Self::TimestampMs(b) => Arc::new(b.finish()),
            Self::Date32(b) => Arc::new(b.finish()),
        }
    }
}

/// The declared columns, the row being decoded, and the builders of the batch.
pub(crate) struct RowBuilders {
    pub columns: Vec<DecodeColumn>,
    pub row: Vec<Cell>,
    /// Per column, the text of a `Cell::Str`.
    pub texts: Vec<String>,
    builders: Vec<Builder>,
    rows: usize,
}

impl RowBuilders {
    pub fn new(columns: Vec<DecodeColumn>) -> Self {
        let builders = columns
            .iter()
            .map(|c| Builder::new(c.ty, crate::BATCH_ROWS_MAX))
            .collect();
        Self {
            row: vec![Cell::Absent; columns.len()],
            texts: vec![String::new(); columns.len()],
            columns,
            builders,
            rows: 0,
        }
    }

    /// Clears the row for the next record.
    pub fn start(&mut self) {
        self.row.fill(Cell::Absent);
    }

    /// Whether the row may be appended: every NOT NULL column has a value.
    pub fn check(&self) -> Result<(), DecodeError> {
        for (column, cell) in self.columns.iter().zip(&self.row) {
            match cell {
                Cell::Absent if !column.nullable => {
                    return Err(DecodeError::MissingField(column.name.clone()));
                }
                Cell::Null if !column.nullable => {
                    return Err(DecodeError::NullField {
                        field: column.name.clone(),
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Appends the checked row (absent nullable cells as nulls).
    pub fn append(&mut self) {
        for ((builder, cell), text) in self.builders.iter_mut().zip(&self.row).zip(&self.texts) {
            builder.append(*cell, text);
        }
        self.rows += 1;
    }

    /// Rows appended since the last [`Self::finish`].
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Takes the appended rows as one array per column; the builders start empty again.
    pub fn finish(&mut self) -> Vec<ArrayRef> {
        self.rows = 0;
        self.builders.iter_mut().map(Builder::finish).collect()
    }
}
