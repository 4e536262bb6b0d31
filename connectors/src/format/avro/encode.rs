//! Rows -> Avro binary datums, for sinks (values and keys).
//!
//! An encoder is compiled once from the target record schema (derived from the output
//! columns, or given in the pipeline file) and the columns that feed it: every field is
//! bound to the column of the same name (or written as its default when there is none),
//! and every column must land in a field. Each datum is prefixed with the Confluent
//! header when the schema is registered, and written bare (plain Avro) otherwise.

use apache_avro::Schema;
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Field, Float32Type, Float64Type, Int8Type, Int16Type,
    Int32Type, Int64Type, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampNanosecondType, TimestampSecondType, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use serde_json::Value;

use super::schema::{named_types, resolve};
use super::{WIRE_HEADER_BYTES, wire_header};

/// The Avro type a field is written as.
#[derive(Debug, Clone, PartialEq)]
enum Target {
    Boolean,
    Int,
    Long,
    Float,
    Double,
    String,
    Bytes,
    TimestampMillis,
    TimestampMicros,
    Date,
    Decimal { scale: i8 },
    Enum(Vec<String>),
}

#[derive(Debug, Clone)]
enum Source {
    Column {
        index: usize,
        name: String,
        /// `(null branch, value branch)` of a `["null", T]` field.
        union: Option<(i64, i64)>,
        target: Target,
    },
    /// A field no column feeds: its default, already encoded.
    Constant(Vec<u8>),
}

/// Encodes rows as Avro datums of one schema.
#[derive(Debug, Clone)]
pub struct AvroEncoder {
    fields: Vec<Source>,
    header: Option<[u8; WIRE_HEADER_BYTES]>,
}

fn target_of(
    schema: &Schema,
    names: &std::collections::HashMap<String, &Schema>,
) -> Option<Target> {
    Some(match resolve(schema, names) {
        Schema::Boolean => Target::Boolean,
        Schema::Int | Schema::TimeMillis => Target::Int,
        Schema::Long | Schema::TimeMicros => Target::Long,
        Schema::Float => Target::Float,
        Schema::Double => Target::Double,
        Schema::String | Schema::Uuid(apache_avro::schema::UuidSchema::String) => Target::String,
        Schema::Bytes => Target::Bytes,
        Schema::TimestampMillis | Schema::LocalTimestampMillis => Target::TimestampMillis,
        Schema::TimestampMicros | Schema::LocalTimestampMicros => Target::TimestampMicros,
        Schema::Date => Target::Date,
        Schema::Decimal(d) if matches!(d.inner, apache_avro::schema::InnerDecimalSchema::Bytes) => {
            Target::Decimal {
                scale: i8::try_from(d.scale).ok()?,
            }
        }
        Schema::Enum(e) => Target::Enum(e.symbols.clone()),
        _ => return None,
    })
}

/// Whether a column of `data_type` can be written as `target`.
fn writable(data_type: &DataType, target: &Target) -> bool {
    let integer = data_type.is_integer();
    match target {
        Target::Boolean => *data_type == DataType::Boolean,
        Target::Int | Target::Long => integer,
        Target::Float | Target::Double => integer || data_type.is_floating(),
        // Any column has a display form.
        Target::String => true,
        Target::Bytes => matches!(
            data_type,
            DataType::Binary
                | DataType::LargeBinary
                | DataType::BinaryView
                | DataType::Utf8
                | DataType::LargeUtf8
                | DataType::Utf8View
        ),
        Target::TimestampMillis | Target::TimestampMicros => {
            matches!(data_type, DataType::Timestamp(..) | DataType::Int64)
        }
        Target::Date => *data_type == DataType::Date32,
        Target::Decimal { scale } => match data_type {
            DataType::Decimal128(_, s) => s <= scale,
            _ => integer,
        },
        Target::Enum(_) => matches!(
            data_type,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        ),
    }
}

pub(crate) fn write_long(v: i64, out: &mut Vec<u8>) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn write_bytes(b: &[u8], out: &mut Vec<u8>) {
    write_long(b.len() as i64, out);
    out.extend_from_slice(b);
}

/// The minimal two's-complement big-endian bytes of `v`.
fn decimal_bytes(v: i128, out: &mut Vec<u8>) {
    let all = v.to_be_bytes();
    let mut start = 0;
    while start < 15 {
        let (b, next) = (all[start], all[start + 1]);
        if (b == 0 && next & 0x80 == 0) || (b == 0xff && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    write_bytes(&all[start..], out);
}

/// A field's default (JSON) encoded as `schema` (for a union, its first branch).
fn encode_default(
    schema: &Schema,
    default: &Value,
    names: &std::collections::HashMap<String, &Schema>,
) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let schema = match resolve(schema, names) {
        Schema::Union(u) => {
            write_long(0, &mut out);
            u.variants().first()?
        }
        other => other,
    };
    match (resolve(schema, names), default) {
        (Schema::Null, Value::Null) => {}
        (Schema::Boolean, Value::Bool(b)) => out.push(u8::from(*b)),
        (
            Schema::Int
            | Schema::Long
            | Schema::Date
            | Schema::TimestampMillis
            | Schema::TimestampMicros,
            Value::Number(n),
        ) => {
            write_long(n.as_i64()?, &mut out);
        }
        (Schema::Float, Value::Number(n)) => {
            out.extend_from_slice(&(n.as_f64()? as f32).to_le_bytes());
        }
        (Schema::Double, Value::Number(n)) => out.extend_from_slice(&n.as_f64()?.to_le_bytes()),
        (Schema::String, Value::String(s)) => write_bytes(s.as_bytes(), &mut out),
        (Schema::Enum(e), Value::String(s)) => {
            write_long(e.symbols.iter().position(|x| x == s)? as i64, &mut out);
        }
        _ => return None,
    }
    Some(out)
}

impl AvroEncoder {
    /// Compiles an encoder of `schema` fed by `columns` (`(index in the batch, field)`);
    /// `schema_id` adds the Confluent header. A record schema binds fields to columns by
    /// name; any other schema takes the one column given.
    pub fn new(
        schema: &Schema,
        columns: &[(usize, &Field)],
        schema_id: Option<u32>,
    ) -> Result<Self, String> {
        let mut names = std::collections::HashMap::new();
        named_types(schema, &mut names);
        let bind = |field_schema: &Schema,
                    index: usize,
                    column: &Field|
         -> Result<Source, String> {
            let (union, value_schema) = match resolve(field_schema, &names) {
                Schema::Union(u) => {
                    let v = u.variants();
                    let null = v.iter().position(|s| matches!(s, Schema::Null));
                    match (null, v.len()) {
                        (Some(n), 2) => (Some((n as i64, 1 - n as i64)), &v[1 - n]),
                        _ => {
                            return Err(format!(
                                "field `{}` is a union other than [\"null\", T], which laminar does not write",
                                column.name()
                            ));
                        }
                    }
                }
                other => (None, other),
            };
            let target = target_of(value_schema, &names).ok_or_else(|| {
                format!(
                    "field `{}` has an Avro type laminar does not write",
                    column.name()
                )
            })?;
            if !writable(column.data_type(), &target) {
                return Err(format!(
                    "column `{}` ({}) cannot be written as the Avro field's type {target:?}",
                    column.name(),
                    column.data_type()
                ));
            }
            Ok(Source::Column {
                index,
                name: column.name().clone(),
                union,
                target,
            })
        };
        let mut fields = Vec::new();
        match resolve(schema, &names) {
            Schema::Record(record) => {
                let mut used = vec![false; columns.len()];
                for f in &record.fields {
                    match columns.iter().position(|(_, c)| c.name() == &f.name) {
                        Some(i) => {
                            used[i] = true;
                            fields.push(bind(&f.schema, columns[i].0, columns[i].1)?);
                        }
                        None => match f
                            .default
                            .as_ref()
                            .and_then(|d| encode_default(&f.schema, d, &names))
                        {
                            Some(bytes) => fields.push(Source::Constant(bytes)),
                            None => {
                                return Err(format!(
                                    "the Avro schema's field `{}` has no column of that name and no default",
                                    f.name
                                ));
                            }
                        },
                    }
                }
                if let Some(i) = used.iter().position(|u| !u) {
                    return Err(format!(
                        "column `{}` is not a field of the Avro schema",
                        columns[i].1.name()
                    ));
                }
            }
            other => match columns {
                [(index, column)] => fields.push(bind(other, *index, column)?),
                _ => {
                    return Err(format!(
                        "the Avro schema is a single value, not a record, and {} columns feed it",
                        columns.len()
                    ));
                }
            },
        }
        Ok(Self {
            fields,
            header: schema_id.map(wire_header),
        })
    }

    /// Writes one datum per row of `batch` to `out`, pushing each row's end offset onto
    /// `ends`.
    pub fn encode(
        &self,
        batch: &RecordBatch,
        out: &mut Vec<u8>,
        ends: &mut Vec<usize>,
    ) -> Result<(), String> {
        let options = FormatOptions::default();
        let mut access = Vec::with_capacity(self.fields.len());
        for f in &self.fields {
            access.push(match f {
                Source::Column { index, target, .. } => Some(Access::new(
                    batch.column(*index).as_ref(),
                    target,
                    &options,
                )?),
                Source::Constant(_) => None,
            });
        }
        for row in 0..batch.num_rows() {
            if let Some(h) = &self.header {
                out.extend_from_slice(h);
            }
            for (f, a) in self.fields.iter().zip(&access) {
                match (f, a) {
                    (Source::Constant(bytes), _) => out.extend_from_slice(bytes),
                    (
                        Source::Column {
                            index,
                            name,
                            union,
                            target,
                        },
                        Some(a),
                    ) => {
                        let column = batch.column(*index);
                        match (column.is_null(row), union) {
                            (true, Some((null, _))) => write_long(*null, out),
                            (true, None) => {
                                return Err(format!(
                                    "column `{name}` is null, but its Avro field is not nullable"
                                ));
                            }
                            (false, u) => {
                                if let Some((_, value)) = u {
                                    write_long(*value, out);
                                }
                                a.write(row, target, name, out)?;
                            }
                        }
                    }
                    (Source::Column { .. }, None) => {
                        unreachable!("a column field without an accessor")
                    }
                }
            }
            ends.push(out.len());
        }
        Ok(())
    }
}

/// Typed access to one column of a batch.
enum Access<'a> {
    Bool(&'a arrow::array::BooleanArray),
    Int(Box<dyn Fn(usize) -> i128 + 'a>),
    Float(Box<dyn Fn(usize) -> f64 + 'a>),
    Str(Box<dyn Fn(usize) -> &'a str + 'a>),
    Bin(Box<dyn Fn(usize) -> &'a [u8] + 'a>),
    /// Microseconds since the epoch.
    TimestampUs(Box<dyn Fn(usize) -> i64 + 'a>),
    Decimal(&'a arrow::array::PrimitiveArray<Decimal128Type>, i8),
    Display(ArrayFormatter<'a>),
}

impl<'a> Access<'a> {
    fn new(
        array: &'a dyn Array,
        target: &Target,
        options: &'a FormatOptions<'a>,
    ) -> Result<Self, String> {
        macro_rules! int {
            ($t:ty) => {{
                let a = array.as_primitive::<$t>();
                Access::Int(Box::new(move |i| i128::from(a.value(i))))
            }};
        }
        if *target == Target::String
            && !matches!(
                array.data_type(),
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            )
        {
            return Ok(Self::Display(
                ArrayFormatter::try_new(array, options).map_err(|e| e.to_string())?,
            ));
        }
        Ok(match array.data_type() {
            DataType::Boolean => Self::Bool(array.as_boolean()),
            DataType::Int8 => int!(Int8Type),
            DataType::Int16 => int!(Int16Type),
            DataType::Int32 => int!(Int32Type),
            DataType::Int64 => int!(Int64Type),
            DataType::UInt8 => int!(UInt8Type),
            DataType::UInt16 => int!(UInt16Type),
            DataType::UInt32 => int!(UInt32Type),
            DataType::UInt64 => int!(UInt64Type),
            DataType::Date32 => int!(Date32Type),
            DataType::Float32 => {
                let a = array.as_primitive::<Float32Type>();
                Self::Float(Box::new(move |i| f64::from(a.value(i))))
            }
            DataType::Float64 => {
                let a = array.as_primitive::<Float64Type>();
                Self::Float(Box::new(move |i| a.value(i)))
            }
            DataType::Utf8 => {
                let a = array.as_string::<i32>();
                Self::Str(Box::new(move |i| a.value(i)))
            }
            DataType::LargeUtf8 => {
                let a = array.as_string::<i64>();
                Self::Str(Box::new(move |i| a.value(i)))
            }
            DataType::Utf8View => {
                let a = array.as_string_view();
                Self::Str(Box::new(move |i| a.value(i)))
            }
            DataType::Binary => {
                let a = array.as_binary::<i32>();
                Self::Bin(Box::new(move |i| a.value(i)))
            }
            DataType::LargeBinary => {
                let a = array.as_binary::<i64>();
                Self::Bin(Box::new(move |i| a.value(i)))
            }
            DataType::BinaryView => {
                let a = array.as_binary_view();
                Self::Bin(Box::new(move |i| a.value(i)))
            }
            DataType::Timestamp(unit, _) => match unit {
                TimeUnit::Second => {
                    let a = array.as_primitive::<TimestampSecondType>();
                    Self::TimestampUs(Box::new(move |i| a.value(i).saturating_mul(1_000_000)))
                }
                TimeUnit::Millisecond => {
                    let a = array.as_primitive::<TimestampMillisecondType>();
                    Self::TimestampUs(Box::new(move |i| a.value(i).saturating_mul(1000)))
                }
                TimeUnit::Microsecond => {
                    let a = array.as_primitive::<TimestampMicrosecondType>();
                    Self::TimestampUs(Box::new(move |i| a.value(i)))
                }
                TimeUnit::Nanosecond => {
                    let a = array.as_primitive::<TimestampNanosecondType>();
                    Self::TimestampUs(Box::new(move |i| a.value(i).div_euclid(1000)))
                }
            },
            DataType::Decimal128(_, s) => Self::Decimal(array.as_primitive::<Decimal128Type>(), *s),
            other => {
                return Err(format!(
                    "a column of type {other} cannot be written as Avro {target:?}"
                ));
            }
        })
    }

    fn write(
        &self,
        row: usize,
        target: &Target,
        name: &str,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        let range = |v: i128, min: i128, max: i128| {
            if v < min || v > max {
                Err(format!(
                    "column `{name}`: {v} is out of the Avro field's range"
                ))
            } else {
                Ok(v as i64)
            }
        };
        match (self, target) {
            (Self::Bool(a), Target::Boolean) => out.push(u8::from(a.value(row))),
            (Self::Int(f), Target::Int | Target::Date) => {
                write_long(
                    range(f(row), i128::from(i32::MIN), i128::from(i32::MAX))?,
                    out,
                );
            }
            (Self::Int(f), Target::Long | Target::TimestampMillis | Target::TimestampMicros) => {
                write_long(
                    range(f(row), i128::from(i64::MIN), i128::from(i64::MAX))?,
                    out,
                );
            }
            (Self::Int(f), Target::Float) => out.extend_from_slice(&(f(row) as f32).to_le_bytes()),
            (Self::Int(f), Target::Double) => out.extend_from_slice(&(f(row) as f64).to_le_bytes()),
            (Self::Int(f), Target::Decimal { scale }) => {
                let v = f(row)
                    .checked_mul(10i128.pow(u32::from(scale.unsigned_abs())))
                    .ok_or_else(|| format!("column `{name}`: decimal overflow"))?;
                decimal_bytes(v, out);
            }
            (Self::Float(f), Target::Float) => {
                out.extend_from_slice(&(f(row) as f32).to_le_bytes());
            }
            (Self::Float(f), Target::Double) => out.extend_from_slice(&f(row).to_le_bytes()),
            (Self::Str(f), Target::String | Target::Bytes) => write_bytes(f(row).as_bytes(), out),
            (Self::Str(f), Target::Enum(symbols)) => {
                let s = f(row);
                let i = symbols.iter().position(|x| x == s).ok_or_else(|| {
                    format!("column `{name}`: `{s}` is not a symbol of the Avro enum")
                })?;
                write_long(i as i64, out);
            }
            (Self::Bin(f), Target::Bytes) => write_bytes(f(row), out),
            (Self::TimestampUs(f), Target::TimestampMillis) => {
                write_long(f(row).div_euclid(1000), out);
            }
            (Self::TimestampUs(f), Target::TimestampMicros) => write_long(f(row), out),
            (Self::Decimal(a, s), Target::Decimal { scale }) => {
                let up = u32::from((*scale - *s).unsigned_abs());
                let v = a
                    .value(row)
                    .checked_mul(10i128.pow(up))
                    .ok_or_else(|| format!("column `{name}`: decimal overflow"))?;
                decimal_bytes(v, out);
            }
            (Self::Display(f), Target::String) => {
                let text = f.value(row).try_to_string().map_err(|e| e.to_string())?;
                write_bytes(text.as_bytes(), out);
            }
            (_, t) => return Err(format!("column `{name}` cannot be written as Avro {t:?}")),
        }
        Ok(())
    }
}
