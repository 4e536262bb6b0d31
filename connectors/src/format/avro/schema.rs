//! Avro schemas and laminar's columns: the columns a record schema gives a source when
//! `schema:` is omitted, and the record schema derived from a query's output columns for
//! a sink.
//!
//! | Avro (reading)                              | column                        |
//! |---------------------------------------------|-------------------------------|
//! | boolean / int / long / float / double       | BOOLEAN / INT / BIGINT / FLOAT / DOUBLE |
//! | string, enum, uuid                          | VARCHAR                       |
//! | date                                        | DATE                          |
//! | timestamp-millis / -micros / -nanos (local too) | TIMESTAMP / TIMESTAMP(6) / TIMESTAMP(9) |
//! | time-millis / time-micros                   | INT / BIGINT                  |
//! | decimal                                     | DOUBLE                        |
//! | `["null", T]`                               | T NULL                        |
//! | bytes, fixed, records, arrays, maps, other unions | not a column (left out, named in a warning) |
//!
//! | column (writing)                     | Avro                                   |
//! |--------------------------------------|----------------------------------------|
//! | BOOLEAN                              | boolean                                |
//! | TINYINT, SMALLINT, INT (and unsigned 8/16) | int                              |
//! | BIGINT (and unsigned 32/64)          | long                                   |
//! | FLOAT / DOUBLE                       | float / double                         |
//! | VARCHAR                              | string                                 |
//! | TIMESTAMP (s, ms) / (us, ns)         | long timestamp-millis / timestamp-micros |
//! | DATE                                 | int date                               |
//! | DECIMAL(p, s)                        | bytes decimal(p, s)                    |
//! | BINARY                               | bytes                                  |
//! | anything else                        | string (its display form)              |
//! | a nullable column                    | `["null", T]` with default null        |

use std::collections::HashMap;

use apache_avro::Schema;
use arrow::datatypes::{DataType, Field, TimeUnit};
use serde_json::{Value, json};

use super::decode::AvroReader;
use crate::format::json::DecodeColumn;
use crate::format::types::{ColumnType, EpochUnit};

/// Whether `name` is a valid Avro name: `[A-Za-z_][A-Za-z0-9_]*`.
#[must_use]
pub fn valid_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `name` with every character Avro does not allow in a name replaced by `_`.
#[must_use]
pub fn sanitize_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if !out.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        out.insert(0, '_');
    }
    out
}

/// Every named type defined in `schema`, by full name, to resolve references.
pub(crate) fn named_types<'a>(schema: &'a Schema, out: &mut HashMap<String, &'a Schema>) {
    match schema {
        Schema::Record(r) if out.insert(r.name.fullname(None), schema).is_none() => {
            for f in &r.fields {
                named_types(&f.schema, out);
            }
        }
        Schema::Enum(e) => {
            out.insert(e.name.fullname(None), schema);
        }
        Schema::Fixed(f) => {
            out.insert(f.name.fullname(None), schema);
        }
        Schema::Array(a) => named_types(&a.items, out),
        Schema::Map(m) => named_types(&m.types, out),
        Schema::Union(u) => {
            for v in u.variants() {
                named_types(v, out);
            }
        }
        _ => {}
    }
}

/// Follows a reference to the type it names.
pub(crate) fn resolve<'a>(schema: &'a Schema, names: &HashMap<String, &'a Schema>) -> &'a Schema {
    match schema {
        Schema::Ref { name } => names.get(&name.fullname(None)).copied().unwrap_or(schema),
        other => other,
    }
}

/// The column type of a non-union Avro type, if it can be a column.
fn column_type(schema: &Schema, names: &HashMap<String, &Schema>) -> Option<ColumnType> {
    Some(match resolve(schema, names) {
        Schema::Boolean => ColumnType::Boolean,
        Schema::Int | Schema::TimeMillis => ColumnType::Int32,
        Schema::Long | Schema::TimeMicros => ColumnType::Int64,
        Schema::Float => ColumnType::Float32,
        Schema::Double | Schema::Decimal(_) | Schema::BigDecimal => ColumnType::Float64,
        Schema::String | Schema::Enum(_) | Schema::Uuid(_) => ColumnType::Utf8,
        Schema::Date => ColumnType::Date32,
        Schema::TimestampMillis | Schema::LocalTimestampMillis => {
            ColumnType::Timestamp(EpochUnit::Millis)
        }
        Schema::TimestampMicros | Schema::LocalTimestampMicros => {
            ColumnType::Timestamp(EpochUnit::Micros)
        }
        Schema::TimestampNanos | Schema::LocalTimestampNanos => {
            ColumnType::Timestamp(EpochUnit::Nanos)
        }
        _ => return None,
    })
}

/// The column type of a field's schema and whether it is nullable: `T` or a union of
/// null and one other type.
pub(crate) fn field_column_type(
    schema: &Schema,
    names: &HashMap<String, &Schema>,
) -> Option<(ColumnType, bool)> {
    if let Schema::Union(u) = schema {
        let variants = u.variants();
        let non_null: Vec<&Schema> = variants
            .iter()
            .filter(|v| !matches!(v, Schema::Null))
            .collect();
        return match non_null.as_slice() {
            [one] if variants.len() == 2 => column_type(one, names).map(|t| (t, true)),
            _ => None,
        };
    }
    column_type(schema, names).map(|t| (t, false))
}

/// The columns of a record schema (or of a single-value schema, as one column named
/// `single_name`), with the record's field defaults and aliases; the names of fields
/// that cannot be columns are returned apart.
pub fn reader_of_schema(
    schema: &Schema,
    single_name: &str,
) -> Result<(AvroReader, Vec<String>), String> {
    let mut names = HashMap::new();
    named_types(schema, &mut names);
    let mut reader = AvroReader::default();
    let mut skipped = Vec::new();
    match resolve(schema, &names) {
        Schema::Record(record) => {
            for field in &record.fields {
                match field_column_type(&field.schema, &names) {
                    Some((ty, nullable)) => {
                        reader.columns.push(DecodeColumn {
                            name: field.name.clone(),
                            ty,
                            nullable,
                        });
                        reader.defaults.push(field.default.clone());
                        reader.aliases.push(field.aliases.clone());
                    }
                    None => skipped.push(field.name.clone()),
                }
            }
            if reader.columns.is_empty() {
                return Err(format!(
                    "record `{}` has no field that can be a column",
                    record.name.fullname(None)
                ));
            }
        }
        other => match field_column_type(other, &names) {
            Some((ty, nullable)) => {
                reader.columns.push(DecodeColumn {
                    name: single_name.to_owned(),
                    ty,
                    nullable,
                });
                reader.defaults.push(None);
                reader.aliases.push(Vec::new());
            }
            None => return Err("the schema is neither a record nor a single value".to_owned()),
        },
    }
    Ok((reader, skipped))
}

/// The Avro type (JSON) a column of `data_type` is written as.
fn avro_type_of(data_type: &DataType) -> Value {
    match data_type {
        DataType::Boolean => json!("boolean"),
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::UInt8 | DataType::UInt16 => {
            json!("int")
        }
        DataType::Int64 | DataType::UInt32 | DataType::UInt64 => json!("long"),
        DataType::Float16 | DataType::Float32 => json!("float"),
        DataType::Float64 => json!("double"),
        DataType::Timestamp(TimeUnit::Second | TimeUnit::Millisecond, _) => {
            json!({"type": "long", "logicalType": "timestamp-millis"})
        }
        DataType::Timestamp(TimeUnit::Microsecond | TimeUnit::Nanosecond, _) => {
            json!({"type": "long", "logicalType": "timestamp-micros"})
        }
        DataType::Date32 => json!({"type": "int", "logicalType": "date"}),
        DataType::Decimal128(p, s) => {
            json!({"type": "bytes", "logicalType": "decimal", "precision": p, "scale": s})
        }
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => json!("bytes"),
        _ => json!("string"),
    }
}

/// The Avro record schema of `fields` (a query's output columns), named `name` in the
/// `laminar` namespace. Column names must be valid Avro names (give expressions an
/// alias with `AS`).
pub fn record_schema_of(name: &str, fields: &[&Field]) -> Result<Value, String> {
    let mut out = Vec::with_capacity(fields.len());
    for f in fields {
        if !valid_name(f.name()) {
            return Err(format!(
                "column `{}` is not a valid Avro field name (letters, digits and `_`, not \
                 starting with a digit): give it an alias with `AS`",
                f.name()
            ));
        }
        out.push(field_schema(f.name(), f.data_type(), f.is_nullable()));
    }
    Ok(json!({
        "type": "record",
        "name": sanitize_name(name),
        "namespace": "laminar",
        "fields": out,
    }))
}

fn field_schema(name: &str, data_type: &DataType, nullable: bool) -> Value {
    let ty = avro_type_of(data_type);
    if nullable {
        json!({"name": name, "type": ["null", ty], "default": null})
    } else {
        json!({"name": name, "type": ty})
    }
}

/// The Avro schema of one key column written alone: its type, or `["null", T]`.
#[must_use]
pub fn value_schema_of(field: &Field) -> Value {
    let ty = avro_type_of(field.data_type());
    if field.is_nullable() {
        json!(["null", ty])
    } else {
        ty
    }
}
