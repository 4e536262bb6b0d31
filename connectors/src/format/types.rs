//! Column types a pipeline file may declare in `schema:`, and their Arrow types.
//!
//! A column is NOT NULL unless its type ends in `NULL` (`VARCHAR NULL`): a record that
//! lacks a NOT NULL field is a decode error, not a silent null.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, TimeUnit};

/// The time zone every TIMESTAMP column carries: event times are instants.
pub const TIMESTAMP_TZ: &str = "UTC";

/// The spellings accepted in `schema:` (upper or lower case).
pub const COLUMN_TYPE_NAMES: [&str; 17] = [
    "BOOLEAN",
    "TINYINT",
    "SMALLINT",
    "INT",
    "INTEGER",
    "BIGINT",
    "FLOAT",
    "REAL",
    "DOUBLE",
    "VARCHAR",
    "STRING",
    "TEXT",
    "TIMESTAMP",
    "TIMESTAMP(0)",
    "TIMESTAMP(6)",
    "TIMESTAMP(9)",
    "DATE",
];

/// The unit of an integer event time in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochUnit {
    Seconds,
    Millis,
    Micros,
    Nanos,
}

impl EpochUnit {
    /// `v` units since the epoch as milliseconds (floor), or `None` when out of range.
    #[must_use]
    pub fn to_ms(self, v: i64) -> Option<i64> {
        match self {
            Self::Seconds => v.checked_mul(1000),
            Self::Millis => Some(v),
            Self::Micros => Some(v.div_euclid(1000)),
            Self::Nanos => Some(v.div_euclid(1_000_000)),
        }
    }

    #[must_use]
    pub fn expected(self) -> &'static str {
        match self {
            Self::Seconds => "epoch seconds or an RFC 3339 string",
            Self::Millis => "epoch milliseconds or an RFC 3339 string",
            Self::Micros => "epoch microseconds or an RFC 3339 string",
            Self::Nanos => "epoch nanoseconds or an RFC 3339 string",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    Boolean,
    Int8,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    Utf8,
    /// An instant, held as milliseconds since the epoch, UTC. JSON: an RFC 3339 string,
    /// or an integer count of the unit since the epoch (`TIMESTAMP` = milliseconds,
    /// `TIMESTAMP(0)` seconds, `TIMESTAMP(6)` microseconds, `TIMESTAMP(9)` nanoseconds).
    Timestamp(EpochUnit),
    /// Days since the epoch. JSON: `YYYY-MM-DD`.
    Date32,
}

impl ColumnType {
    #[must_use]
    pub fn data_type(self) -> DataType {
        match self {
            Self::Boolean => DataType::Boolean,
            Self::Int8 => DataType::Int8,
            Self::Int16 => DataType::Int16,
            Self::Int32 => DataType::Int32,
            Self::Int64 => DataType::Int64,
            Self::Float32 => DataType::Float32,
            Self::Float64 => DataType::Float64,
            Self::Utf8 => DataType::Utf8,
            Self::Timestamp(_) => timestamp_ms_type(),
            Self::Date32 => DataType::Date32,
        }
    }

    #[must_use]
    pub fn sql_name(self) -> &'static str {
        match self {
            Self::Boolean => "BOOLEAN",
            Self::Int8 => "TINYINT",
            Self::Int16 => "SMALLINT",
            Self::Int32 => "INT",
            Self::Int64 => "BIGINT",
            Self::Float32 => "FLOAT",
            Self::Float64 => "DOUBLE",
            Self::Utf8 => "VARCHAR",
            Self::Timestamp(EpochUnit::Seconds) => "TIMESTAMP(0)",
            Self::Timestamp(EpochUnit::Millis) => "TIMESTAMP",
            Self::Timestamp(EpochUnit::Micros) => "TIMESTAMP(6)",
            Self::Timestamp(EpochUnit::Nanos) => "TIMESTAMP(9)",
            Self::Date32 => "DATE",
        }
    }

    #[must_use]
    pub fn field(self, name: &str, nullable: bool) -> Field {
        Field::new(name, self.data_type(), nullable)
    }
}

#[must_use]
pub fn timestamp_ms_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some(Arc::from(TIMESTAMP_TZ)))
}

/// Parses `BIGINT`, `varchar null`, `TIMESTAMP NOT NULL`: returns the type and whether
/// the column is nullable, or `None` for an unknown type name.
#[must_use]
pub fn parse_column_type(text: &str) -> Option<(ColumnType, bool)> {
    let upper = text.trim().to_ascii_uppercase();
    let words: Vec<&str> = upper.split_whitespace().collect();
    let (name, nullable) = match words.as_slice() {
        [name] | [name, "NOT", "NULL"] => (*name, false),
        [name, "NULL"] => (*name, true),
        _ => return None,
    };
    let ty = match name {
        "BOOLEAN" | "BOOL" => ColumnType::Boolean,
        "TINYINT" => ColumnType::Int8,
        "SMALLINT" => ColumnType::Int16,
        "INT" | "INTEGER" => ColumnType::Int32,
        "BIGINT" => ColumnType::Int64,
        "FLOAT" | "REAL" => ColumnType::Float32,
        "DOUBLE" => ColumnType::Float64,
        "VARCHAR" | "STRING" | "TEXT" => ColumnType::Utf8,
        "TIMESTAMP" | "TIMESTAMP(3)" => ColumnType::Timestamp(EpochUnit::Millis),
        "TIMESTAMP(0)" => ColumnType::Timestamp(EpochUnit::Seconds),
        "TIMESTAMP(6)" => ColumnType::Timestamp(EpochUnit::Micros),
        "TIMESTAMP(9)" => ColumnType::Timestamp(EpochUnit::Nanos),
        "DATE" => ColumnType::Date32,
        _ => return None,
    };
    Some((ty, nullable))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_column_type_accepts_null_suffixes() {
        assert_eq!(
            parse_column_type("bigint"),
            Some((ColumnType::Int64, false))
        );
        assert_eq!(
            parse_column_type("VARCHAR NULL"),
            Some((ColumnType::Utf8, true))
        );
        assert_eq!(
            parse_column_type("timestamp not null"),
            Some((ColumnType::Timestamp(EpochUnit::Millis), false))
        );
        assert_eq!(parse_column_type("BIGINTEGER"), None);
        assert_eq!(parse_column_type("INT NULL NULL"), None);
    }
}
