//! Avro binary -> rows of the declared columns, one writer schema compiled at a time.
//!
//! A writer schema is compiled against the reader (the declared columns, with their
//! defaults when they came from a registry schema) into a [`Program`]: one step per
//! writer field, either "skip a value of this shape" or "read a value of this kind into
//! column i"; columns the writer lacks get the reader's default, or null. Whether each
//! writer type can be read as its column's type is decided once, at compile time; a
//! writer schema that cannot be read at all is remembered, and every record written with
//! it is rejected with that reason (to the dead-letter topic), never silently dropped.
//!
//! Reading accepts Avro's promotions (int -> long, float, double; long -> float, double;
//! float -> double; string <-> bytes), logical types (timestamps in any unit -> TIMESTAMP
//! in milliseconds, date -> DATE, decimal -> DOUBLE or its exact text, uuid -> VARCHAR,
//! enum -> its symbol) and, like the JSON decoder, narrowing integers with a range check
//! per value and RFC 3339 strings for TIMESTAMP columns.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use apache_avro::Schema;
use apache_avro::schema::{InnerDecimalSchema, UuidSchema};
use arrow::array::ArrayRef;
use serde_json::Value;

use super::registry::{RegistryClient, RegistryError};
use super::schema::{named_types, resolve};
use super::{DEPTH_MAX, ITEMS_MAX, PROGRAMS_MAX, WIRE_HEADER_BYTES, wire_schema_id};
use crate::format::DecodeError;
use crate::format::json::{DecodeColumn, parse_date_days, parse_timestamp_ms};
use crate::format::row::{Cell, RowBuilders};
use crate::format::types::ColumnType;

/// What records are read into: the columns, and per column the reader's default (for
/// writer schemas that lack the field) and the aliases it also answers to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AvroReader {
    pub columns: Vec<DecodeColumn>,
    pub defaults: Vec<Option<Value>>,
    pub aliases: Vec<Vec<String>>,
}

impl AvroReader {
    /// Declared columns: no defaults, no aliases.
    #[must_use]
    pub fn from_columns(columns: Vec<DecodeColumn>) -> Self {
        let n = columns.len();
        Self {
            columns,
            defaults: vec![None; n],
            aliases: vec![Vec::new(); n],
        }
    }

    fn find(&self, field: &str) -> Option<usize> {
        self.columns
            .iter()
            .position(|c| c.name == field)
            .or_else(|| {
                self.aliases
                    .iter()
                    .position(|a| a.iter().any(|alias| alias == field))
            })
    }
}

/// The shape of a writer value, enough to skip it.
#[derive(Debug, Clone)]
enum Shape {
    Null,
    Boolean,
    /// int, long, enum index, and the logical types stored in them (one varint).
    Varint,
    Float,
    Double,
    /// bytes and string (a length, then the bytes).
    Bytes,
    Fixed(usize),
    Array(Box<Shape>),
    Map(Box<Shape>),
    Union(Vec<Shape>),
    Record(Vec<Shape>),
    /// A named record, by index into [`Program::types`] (records may be recursive).
    Named(usize),
}

/// A writer value that is read into a column.
#[derive(Debug, Clone)]
enum Kind {
    Boolean,
    Int,
    Long,
    Float,
    Double,
    Str,
    Bytes,
    Enum(Arc<[String]>),
    Decimal {
        scale: u32,
        fixed: Option<usize>,
    },
    UuidFixed,
    Date,
    TimeMillis,
    TimeMicros,
    /// Divide by this to get milliseconds.
    Timestamp {
        per_ms: i64,
    },
}

#[derive(Debug, Clone)]
enum Branch {
    Null,
    Value(Kind),
    /// A branch whose type the column cannot hold: records on it are rejected.
    Unreadable {
        shape: Shape,
        what: String,
    },
}

#[derive(Debug, Clone)]
enum Step {
    Skip(Shape),
    Read {
        column: usize,
        kind: Kind,
    },
    ReadUnion {
        column: usize,
        branches: Vec<Branch>,
    },
}

/// A writer schema compiled against a reader.
#[derive(Debug)]
pub struct Program {
    types: Vec<Shape>,
    steps: Vec<Step>,
    /// Columns the writer lacks: the cell (and text) they get.
    fill: Vec<(usize, Cell, String)>,
}

/// A short name of an Avro type, for messages.
fn type_name(schema: &Schema) -> String {
    match schema {
        Schema::Null => "null".into(),
        Schema::Boolean => "boolean".into(),
        Schema::Int => "int".into(),
        Schema::Long => "long".into(),
        Schema::Float => "float".into(),
        Schema::Double => "double".into(),
        Schema::Bytes => "bytes".into(),
        Schema::String => "string".into(),
        Schema::Array(_) => "array".into(),
        Schema::Map(_) => "map".into(),
        Schema::Union(u) => format!(
            "union [{}]",
            u.variants()
                .iter()
                .map(type_name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Schema::Record(r) => format!("record {}", r.name.fullname(None)),
        Schema::Enum(e) => format!("enum {}", e.name.fullname(None)),
        Schema::Fixed(f) => format!("fixed {}", f.name.fullname(None)),
        Schema::Decimal(_) => "decimal".into(),
        Schema::BigDecimal => "big-decimal".into(),
        Schema::Uuid(_) => "uuid".into(),
        Schema::Date => "date".into(),
        Schema::TimeMillis => "time-millis".into(),
        Schema::TimeMicros => "time-micros".into(),
        Schema::TimestampMillis => "timestamp-millis".into(),
        Schema::TimestampMicros => "timestamp-micros".into(),
        Schema::TimestampNanos => "timestamp-nanos".into(),
        Schema::LocalTimestampMillis => "local-timestamp-millis".into(),
        Schema::LocalTimestampMicros => "local-timestamp-micros".into(),
        Schema::LocalTimestampNanos => "local-timestamp-nanos".into(),
        Schema::Duration(_) => "duration".into(),
        Schema::Ref { name } => name.fullname(None),
    }
}

/// Whether a writer value of `kind` can be read into a column of type `ty`.
fn fits(kind: &Kind, ty: ColumnType) -> bool {
    use ColumnType as T;
    let integer = matches!(ty, T::Int8 | T::Int16 | T::Int32 | T::Int64);
    let float = matches!(ty, T::Float32 | T::Float64);
    match kind {
        Kind::Boolean => ty == T::Boolean,
        Kind::Int | Kind::Long => integer || float || matches!(ty, T::Timestamp(_)),
        Kind::Float | Kind::Double => float,
        Kind::Str | Kind::Bytes => matches!(ty, T::Utf8 | T::Timestamp(_) | T::Date32),
        Kind::Enum(_) | Kind::UuidFixed => ty == T::Utf8,
        Kind::Decimal { .. } => float || ty == T::Utf8,
        Kind::Date => matches!(ty, T::Date32 | T::Timestamp(_)) || integer,
        Kind::TimeMillis | Kind::TimeMicros => integer,
        Kind::Timestamp { .. } => matches!(ty, T::Timestamp(_) | T::Int64),
    }
}

struct Compiler<'a> {
    names: HashMap<String, &'a Schema>,
    types: Vec<Shape>,
    named: HashMap<String, usize>,
}

impl<'a> Compiler<'a> {
    fn shape(&mut self, schema: &'a Schema, depth: usize) -> Result<Shape, String> {
        if depth > DEPTH_MAX {
            return Err(format!("it nests deeper than {DEPTH_MAX} levels"));
        }
        Ok(match schema {
            Schema::Null => Shape::Null,
            Schema::Boolean => Shape::Boolean,
            Schema::Int
            | Schema::Long
            | Schema::Enum(_)
            | Schema::Date
            | Schema::TimeMillis
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => Shape::Varint,
            Schema::Float => Shape::Float,
            Schema::Double => Shape::Double,
            Schema::Bytes
            | Schema::String
            | Schema::BigDecimal
            | Schema::Uuid(UuidSchema::String | UuidSchema::Bytes) => Shape::Bytes,
            Schema::Uuid(UuidSchema::Fixed(f)) | Schema::Fixed(f) | Schema::Duration(f) => {
                Shape::Fixed(f.size)
            }
            Schema::Decimal(d) => match &d.inner {
                InnerDecimalSchema::Bytes => Shape::Bytes,
                InnerDecimalSchema::Fixed(f) => Shape::Fixed(f.size),
            },
            Schema::Array(a) => Shape::Array(Box::new(self.shape(&a.items, depth + 1)?)),
            Schema::Map(m) => Shape::Map(Box::new(self.shape(&m.types, depth + 1)?)),
            Schema::Union(u) => Shape::Union(
                u.variants()
                    .iter()
                    .map(|v| self.shape(v, depth + 1))
                    .collect::<Result<_, _>>()?,
            ),
            Schema::Record(r) => {
                let name = r.name.fullname(None);
                if let Some(&i) = self.named.get(&name) {
                    return Ok(Shape::Named(i));
                }
                let i = self.types.len();
                self.types.push(Shape::Null);
                self.named.insert(name, i);
                let fields = r
                    .fields
                    .iter()
                    .map(|f| self.shape(&f.schema, depth + 1))
                    .collect::<Result<_, _>>()?;
                self.types[i] = Shape::Record(fields);
                Shape::Named(i)
            }
            Schema::Ref { name } => {
                let full = name.fullname(None);
                if let Some(&i) = self.named.get(&full) {
                    return Ok(Shape::Named(i));
                }
                match self.names.get(&full).copied() {
                    Some(target) => self.shape(target, depth + 1)?,
                    None => return Err(format!("it refers to an undefined type `{full}`")),
                }
            }
        })
    }

    fn kind(&self, schema: &Schema) -> Option<Kind> {
        Some(match resolve(schema, &self.names) {
            Schema::Boolean => Kind::Boolean,
            Schema::Int => Kind::Int,
            Schema::Long => Kind::Long,
            Schema::Float => Kind::Float,
            Schema::Double => Kind::Double,
            Schema::String | Schema::Uuid(UuidSchema::String) => Kind::Str,
            Schema::Bytes => Kind::Bytes,
            Schema::Enum(e) => Kind::Enum(e.symbols.clone().into()),
            Schema::Decimal(d) => Kind::Decimal {
                scale: d.scale as u32,
                fixed: match &d.inner {
                    InnerDecimalSchema::Bytes => None,
                    InnerDecimalSchema::Fixed(f) => Some(f.size),
                },
            },
            Schema::Uuid(UuidSchema::Fixed(f)) if f.size == 16 => Kind::UuidFixed,
            Schema::Date => Kind::Date,
            Schema::TimeMillis => Kind::TimeMillis,
            Schema::TimeMicros => Kind::TimeMicros,
            Schema::TimestampMillis | Schema::LocalTimestampMillis => Kind::Timestamp { per_ms: 1 },
            Schema::TimestampMicros | Schema::LocalTimestampMicros => {
                Kind::Timestamp { per_ms: 1000 }
            }
            Schema::TimestampNanos | Schema::LocalTimestampNanos => {
                Kind::Timestamp { per_ms: 1_000_000 }
            }
            _ => return None,
        })
    }

    /// The step that reads `schema` (a field's type) into `column`.
    fn read(
        &mut self,
        schema: &'a Schema,
        field: &str,
        c: &DecodeColumn,
        column: usize,
    ) -> Result<Step, String> {
        let cannot = |what: String| {
            format!(
                "field `{field}` is {what}, which cannot be read as {}",
                c.ty.sql_name()
            )
        };
        if let Schema::Union(u) = schema {
            let mut branches = Vec::with_capacity(u.variants().len());
            for v in u.variants() {
                branches.push(match v {
                    Schema::Null => Branch::Null,
                    _ => match self.kind(v).filter(|k| fits(k, c.ty)) {
                        Some(k) => Branch::Value(k),
                        None => Branch::Unreadable {
                            shape: self.shape(v, 1)?,
                            what: type_name(resolve(v, &self.names)),
                        },
                    },
                });
            }
            if !branches.iter().any(|b| matches!(b, Branch::Value(_))) {
                return Err(cannot(type_name(schema)));
            }
            return Ok(Step::ReadUnion { column, branches });
        }
        match self.kind(schema).filter(|k| fits(k, c.ty)) {
            Some(kind) => Ok(Step::Read { column, kind }),
            None => Err(cannot(type_name(resolve(schema, &self.names)))),
        }
    }
}

/// The cell a reader default gives a column, if it converts.
fn default_cell(v: &Value, c: &DecodeColumn) -> Option<(Cell, String)> {
    use ColumnType as T;
    let cell = match (v, c.ty) {
        (Value::Null, _) => Cell::Null,
        (Value::Bool(b), T::Boolean) => Cell::Bool(*b),
        (Value::Number(n), T::Float32 | T::Float64) => Cell::Float(n.as_f64()?),
        (Value::Number(n), T::Int8 | T::Int16 | T::Int32 | T::Int64 | T::Date32) => {
            Cell::Int(n.as_i64()?)
        }
        (Value::Number(n), T::Timestamp(unit)) => Cell::Int(unit.to_ms(n.as_i64()?)?),
        (Value::String(s), T::Utf8) => return Some((Cell::Str, s.clone())),
        (Value::String(s), T::Timestamp(_)) => Cell::Int(parse_timestamp_ms(s)?),
        (Value::String(s), T::Date32) => Cell::Int(i64::from(parse_date_days(s)?)),
        _ => return None,
    };
    Some((cell, String::new()))
}

/// Compiles `writer` against `reader`; `Err` says why records of `writer` cannot be read.
pub fn compile(writer: &Schema, reader: &AvroReader) -> Result<Program, String> {
    let mut names = HashMap::new();
    named_types(writer, &mut names);
    let mut compiler = Compiler {
        names,
        types: Vec::new(),
        named: HashMap::new(),
    };
    let mut steps = Vec::new();
    let mut bound = vec![false; reader.columns.len()];
    match resolve(writer, &compiler.names) {
        Schema::Record(record) => {
            for field in &record.fields {
                match reader.find(&field.name) {
                    None => steps.push(Step::Skip(compiler.shape(&field.schema, 1)?)),
                    Some(i) if bound[i] => {
                        return Err(format!(
                            "fields `{}` and an alias of it both map to column `{}`",
                            field.name, reader.columns[i].name
                        ));
                    }
                    Some(i) => {
                        bound[i] = true;
                        steps.push(compiler.read(
                            &field.schema,
                            &field.name,
                            &reader.columns[i],
                            i,
                        )?);
                    }
                }
            }
        }
        other if reader.columns.len() == 1 => {
            bound[0] = true;
            let name = reader.columns[0].name.clone();
            steps.push(compiler.read(other, &name, &reader.columns[0], 0)?);
        }
        other => {
            return Err(format!(
                "it is a single {}, not a record, and {} columns are declared",
                type_name(other),
                reader.columns.len()
            ));
        }
    }
    let mut fill = Vec::new();
    for (i, c) in reader.columns.iter().enumerate() {
        if bound[i] {
            continue;
        }
        match reader.defaults[i].as_ref().and_then(|d| default_cell(d, c)) {
            Some((cell, text)) => fill.push((i, cell, text)),
            None if c.nullable => fill.push((i, Cell::Null, String::new())),
            None => {
                return Err(format!(
                    "it has no field `{}`, and the column is NOT NULL without a default",
                    c.name
                ));
            }
        }
    }
    Ok(Program {
        types: compiler.types,
        steps,
        fill,
    })
}

fn malformed(what: &str) -> DecodeError {
    DecodeError::Avro(what.to_owned())
}

/// Reads Avro's binary encoding from one datum.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Array and map items read so far (bounded by [`ITEMS_MAX`]).
    items: u64,
}

impl<'a> Cursor<'a> {
    fn long(&mut self) -> Result<i64, DecodeError> {
        // One byte: the small numbers (lengths, indices, flags) most varints are.
        if let Some(&b) = self.buf.get(self.pos)
            && b & 0x80 == 0
        {
            self.pos += 1;
            let v = u64::from(b);
            return Ok((v >> 1) as i64 ^ -((v & 1) as i64));
        }
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(malformed("the datum ends inside a number"));
            };
            self.pos += 1;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                // Zigzag: 0, -1, 1, -2, ... as 0, 1, 2, 3, ...
                return Ok((value >> 1) as i64 ^ -((value & 1) as i64));
            }
        }
        Err(malformed("a number is longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| malformed("the datum ends inside a value"))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.long()?;
        let n = usize::try_from(n).map_err(|_| malformed("a negative length"))?;
        self.take(n)
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| malformed("a string is not UTF-8"))
    }

    fn boolean(&mut self) -> Result<bool, DecodeError> {
        match self.take(1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(DecodeError::Avro(format!("a boolean byte is {b}"))),
        }
    }

    fn float(&mut self) -> Result<f32, DecodeError> {
        let b = self.take(4)?;
        Ok(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn double(&mut self) -> Result<f64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(f64::from_le_bytes(a))
    }

    fn index(&mut self, len: usize) -> Result<usize, DecodeError> {
        let i = self.long()?;
        usize::try_from(i)
            .ok()
            .filter(|&i| i < len)
            .ok_or_else(|| DecodeError::Avro(format!("union or enum index {i} out of range")))
    }

    /// The item count of the next array or map block (0 at the end); skips the block
    /// byte size a negative count comes with.
    fn block(&mut self) -> Result<u64, DecodeError> {
        let n = self.long()?;
        let n = if n < 0 {
            self.long()?;
            n.unsigned_abs()
        } else {
            n as u64
        };
        self.items = self.items.saturating_add(n);
        if self.items > ITEMS_MAX {
            return Err(DecodeError::Avro(format!(
                "more than {ITEMS_MAX} array or map items in one record"
            )));
        }
        Ok(n)
    }

    fn skip(&mut self, shape: &Shape, types: &[Shape], depth: usize) -> Result<(), DecodeError> {
        if depth > DEPTH_MAX {
            return Err(malformed("the datum nests too deep"));
        }
        match shape {
            Shape::Null => {}
            Shape::Boolean => {
                self.take(1)?;
            }
            Shape::Varint => {
                self.long()?;
            }
            Shape::Float => {
                self.take(4)?;
            }
            Shape::Double => {
                self.take(8)?;
            }
            Shape::Bytes => {
                self.bytes()?;
            }
            Shape::Fixed(n) => {
                self.take(*n)?;
            }
            Shape::Array(item) => loop {
                let n = self.block()?;
                if n == 0 {
                    break;
                }
                for _ in 0..n {
                    self.skip(item, types, depth + 1)?;
                }
            },
            Shape::Map(value) => loop {
                let n = self.block()?;
                if n == 0 {
                    break;
                }
                for _ in 0..n {
                    self.bytes()?;
                    self.skip(value, types, depth + 1)?;
                }
            },
            Shape::Union(variants) => {
                let i = self.index(variants.len())?;
                self.skip(&variants[i], types, depth + 1)?;
            }
            Shape::Record(fields) => {
                for f in fields {
                    self.skip(f, types, depth + 1)?;
                }
            }
            Shape::Named(i) => self.skip(&types[*i], types, depth + 1)?,
        }
        Ok(())
    }

    /// Reads a value of `kind` as a cell of `column` (whose type `fits` the kind).
    fn cell(
        &mut self,
        kind: &Kind,
        column: &DecodeColumn,
        text: &mut String,
    ) -> Result<Cell, DecodeError> {
        Ok(match kind {
            Kind::Boolean => Cell::Bool(self.boolean()?),
            Kind::Int | Kind::Long | Kind::TimeMillis | Kind::TimeMicros => {
                let v = self.long()?;
                integer_cell(v, column)?
            }
            Kind::Float => Cell::Float(f64::from(self.float()?)),
            Kind::Double => Cell::Float(self.double()?),
            Kind::Str | Kind::Bytes => {
                let s = self.str()?;
                match column.ty {
                    ColumnType::Timestamp(_) => Cell::Int(
                        parse_timestamp_ms(s)
                            .ok_or_else(|| wrong(column, format!("the string {s:?}")))?,
                    ),
                    ColumnType::Date32 => Cell::Int(i64::from(
                        parse_date_days(s)
                            .ok_or_else(|| wrong(column, format!("the string {s:?}")))?,
                    )),
                    _ => {
                        text.clear();
                        text.push_str(s);
                        Cell::Str
                    }
                }
            }
            Kind::Enum(symbols) => {
                let i = self.index(symbols.len())?;
                text.clear();
                text.push_str(&symbols[i]);
                Cell::Str
            }
            Kind::Decimal { scale, fixed } => {
                let raw = match fixed {
                    Some(n) => self.take(*n)?,
                    None => self.bytes()?,
                };
                decimal_cell(raw, *scale, column, text)?
            }
            Kind::UuidFixed => {
                let b = self.take(16)?;
                text.clear();
                for (i, byte) in b.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        text.push('-');
                    }
                    let _ = write!(text, "{byte:02x}");
                }
                Cell::Str
            }
            Kind::Date => {
                let days = self.long()?;
                match column.ty {
                    ColumnType::Timestamp(_) => {
                        Cell::Int(days.checked_mul(86_400_000).ok_or_else(|| {
                            wrong(column, format!("the date {days}, which is out of range"))
                        })?)
                    }
                    _ => integer_cell(days, column)?,
                }
            }
            Kind::Timestamp { per_ms } => Cell::Int(self.long()?.div_euclid(*per_ms)),
        })
    }
}

fn wrong(column: &DecodeColumn, found: String) -> DecodeError {
    DecodeError::WrongType {
        field: column.name.clone(),
        expected: match column.ty {
            ColumnType::Int8 => "an integer in TINYINT's range",
            ColumnType::Int16 => "an integer in SMALLINT's range",
            ColumnType::Int32 => "an integer in INT's range",
            ColumnType::Timestamp(_) => "a timestamp",
            ColumnType::Date32 => "a date",
            _ => "a value of the column's type",
        },
        found,
    }
}

/// An integer as a cell of an integer, float, TIMESTAMP (in the column's epoch unit) or
/// DATE column, range-checked.
fn integer_cell(v: i64, column: &DecodeColumn) -> Result<Cell, DecodeError> {
    let (min, max) = match column.ty {
        ColumnType::Int8 => (i64::from(i8::MIN), i64::from(i8::MAX)),
        ColumnType::Int16 => (i64::from(i16::MIN), i64::from(i16::MAX)),
        ColumnType::Int32 | ColumnType::Date32 => (i64::from(i32::MIN), i64::from(i32::MAX)),
        ColumnType::Float32 | ColumnType::Float64 => return Ok(Cell::Float(v as f64)),
        ColumnType::Timestamp(unit) => {
            return unit
                .to_ms(v)
                .map(Cell::Int)
                .ok_or_else(|| wrong(column, format!("{v}, which is out of range")));
        }
        _ => (i64::MIN, i64::MAX),
    };
    if v < min || v > max {
        return Err(wrong(column, format!("{v}, which is out of range")));
    }
    Ok(Cell::Int(v))
}

/// A decimal's two's-complement big-endian unscaled bytes as a float, or as its exact
/// text for a VARCHAR column.
fn decimal_cell(
    raw: &[u8],
    scale: u32,
    column: &DecodeColumn,
    text: &mut String,
) -> Result<Cell, DecodeError> {
    if raw.len() > 16 {
        return Err(malformed("a decimal wider than 128 bits"));
    }
    let mut unscaled: i128 = if raw.first().is_some_and(|b| b & 0x80 != 0) {
        -1
    } else {
        0
    };
    for &b in raw {
        unscaled = (unscaled << 8) | i128::from(b);
    }
    if column.ty != ColumnType::Utf8 {
        return Ok(Cell::Float(unscaled as f64 / 10f64.powi(scale as i32)));
    }
    text.clear();
    let digits = unscaled.unsigned_abs().to_string();
    if unscaled < 0 {
        text.push('-');
    }
    let scale = scale as usize;
    if scale == 0 {
        text.push_str(&digits);
    } else if digits.len() > scale {
        let (int, frac) = digits.split_at(digits.len() - scale);
        text.push_str(int);
        text.push('.');
        text.push_str(frac);
    } else {
        text.push_str("0.");
        text.push_str(&"0".repeat(scale - digits.len()));
        text.push_str(&digits);
    }
    Ok(Cell::Str)
}

impl Program {
    /// Reads one datum into `rows`' pending row (which the caller checks and appends).
    fn run(&self, datum: &[u8], rows: &mut RowBuilders) -> Result<(), DecodeError> {
        let mut cur = Cursor {
            buf: datum,
            pos: 0,
            items: 0,
        };
        for step in &self.steps {
            match step {
                Step::Skip(shape) => cur.skip(shape, &self.types, 1)?,
                Step::Read { column, kind } => {
                    let cell = cur.cell(kind, &rows.columns[*column], &mut rows.texts[*column])?;
                    rows.row[*column] = cell;
                }
                Step::ReadUnion { column, branches } => {
                    let i = cur.index(branches.len())?;
                    let cell = match &branches[i] {
                        Branch::Null => Cell::Null,
                        Branch::Value(kind) => {
                            cur.cell(kind, &rows.columns[*column], &mut rows.texts[*column])?
                        }
                        Branch::Unreadable { shape, what } => {
                            cur.skip(shape, &self.types, 1)?;
                            let c = &rows.columns[*column];
                            return Err(DecodeError::WrongType {
                                field: c.name.clone(),
                                expected: "a value of the column's type",
                                found: format!(
                                    "a {what} (a union branch {} cannot hold)",
                                    c.ty.sql_name()
                                ),
                            });
                        }
                    };
                    rows.row[*column] = cell;
                }
            }
        }
        if cur.pos != datum.len() {
            return Err(DecodeError::Avro(format!(
                "{} bytes after the end of the datum",
                datum.len() - cur.pos
            )));
        }
        for (i, cell, text) in &self.fill {
            rows.row[*i] = *cell;
            if *cell == Cell::Str {
                rows.texts[*i].clone_from(text);
            }
        }
        Ok(())
    }
}

/// Where the writer schema of each message comes from.
#[derive(Debug, Clone)]
pub enum WriterSchemas {
    /// Plain Avro: every message is a datum written with this schema.
    Fixed(Arc<Schema>),
    /// The Confluent wire format: each message names its writer schema by registry id.
    Registry(Arc<RegistryClient>),
}

/// Decodes Avro records into rows of the reader's columns.
pub struct AvroDecoder {
    writers: WriterSchemas,
    reader: AvroReader,
    rows: RowBuilders,
    /// Compiled writer schemas by registry id (0 for a fixed schema); an `Err` is why
    /// every record written with that schema is rejected.
    programs: HashMap<u32, Result<Arc<Program>, DecodeError>>,
    /// The program of the last record: consecutive records mostly share a schema.
    last: Option<(u32, Arc<Program>)>,
}

impl AvroDecoder {
    /// A decoder; with a fixed writer schema that cannot be read into the columns, the
    /// reason (a configuration error).
    pub fn new(reader: AvroReader, writers: WriterSchemas) -> Result<Self, String> {
        let mut programs = HashMap::new();
        if let WriterSchemas::Fixed(schema) = &writers {
            let program = compile(schema, &reader).map_err(|reason| {
                format!("the Avro schema cannot be read into the columns: {reason}")
            })?;
            programs.insert(0, Ok(Arc::new(program)));
        }
        Ok(Self {
            rows: RowBuilders::new(reader.columns.clone()),
            writers,
            reader,
            programs,
            last: None,
        })
    }

    #[must_use]
    pub fn columns(&self) -> &[DecodeColumn] {
        &self.reader.columns
    }

    /// Makes sure the writer schema of `bytes` is compiled, fetching it from the registry
    /// if it is new. `Err`: the registry did not answer; nothing is decided about the
    /// record, which the caller holds and retries (a schema the registry does not have is
    /// not an error here: the record is rejected by `parse`).
    pub fn prepare(&mut self, bytes: &[u8]) -> Result<(), RegistryError> {
        let WriterSchemas::Registry(registry) = &self.writers else {
            return Ok(());
        };
        let Ok(id) = wire_schema_id(bytes) else {
            return Ok(());
        };
        if self.programs.contains_key(&id) {
            return Ok(());
        }
        let compiled = match registry.schema_by_id(id) {
            Ok(schema) => compile(&schema, &self.reader)
                .map(Arc::new)
                .map_err(|reason| DecodeError::SchemaNotReadable {
                    writer: format!("writer schema {id}"),
                    reason,
                }),
            Err(RegistryError::NotFound { .. }) => Err(DecodeError::UnknownSchemaId(id)),
            Err(RegistryError::NotAvro { kind, .. }) => Err(DecodeError::SchemaNotReadable {
                writer: format!("writer schema {id}"),
                reason: format!("it is a {kind} schema, not Avro"),
            }),
            Err(RegistryError::Unsupported { message, .. }) => {
                Err(DecodeError::SchemaNotReadable {
                    writer: format!("writer schema {id}"),
                    reason: message,
                })
            }
            Err(e) => return Err(e),
        };
        if self.programs.len() >= PROGRAMS_MAX {
            self.programs.clear();
        }
        self.programs.insert(id, compiled);
        Ok(())
    }

    /// Decodes one record into the pending row without appending it (see `row`).
    pub fn parse(&mut self, bytes: &[u8]) -> Result<(), DecodeError> {
        self.rows.start();
        let (id, datum) = match &self.writers {
            WriterSchemas::Fixed(_) => (0, bytes),
            WriterSchemas::Registry(_) => (wire_schema_id(bytes)?, &bytes[WIRE_HEADER_BYTES..]),
        };
        if !matches!(&self.last, Some((last, _)) if *last == id) {
            let program = match self.programs.get(&id) {
                Some(Ok(p)) => p.clone(),
                Some(Err(e)) => return Err(e.clone()),
                // `prepare` was not called for this record: a bug in the caller.
                None => {
                    debug_assert!(false, "parse before prepare for schema id {id}");
                    return Err(DecodeError::UnknownSchemaId(id));
                }
            };
            self.last = Some((id, program));
        }
        let Some((_, program)) = &self.last else {
            unreachable!("set above");
        };
        program.run(datum, &mut self.rows)?;
        self.rows.check()
    }

    /// A record without this part (a message without a key): nulls, or an error when a
    /// column is NOT NULL.
    pub fn parse_absent(&mut self) -> Result<(), DecodeError> {
        self.rows.start();
        self.rows.check()
    }

    /// Appends the row of the last successful `parse`.
    pub fn append(&mut self) {
        self.rows.append();
    }

    /// Rows appended since the last [`Self::finish`].
    #[must_use]
    pub fn rows(&self) -> usize {
        self.rows.rows()
    }

    /// Takes the decoded rows as one array per column; the decoder starts empty again.
    pub fn finish(&mut self) -> Vec<ArrayRef> {
        self.rows.finish()
    }
}
