//! JSON <-> Arrow, one record at a time.
//!
//! Decoding walks each record with `serde_json` straight into a per-row scratch, checks it
//! against the declared columns, and only then appends it to the Arrow builders: a record
//! that fails leaves no partial row behind, so rejecting it never disturbs its neighbours.
//! Fields not in the schema are ignored. Integers are not silently widened into strings,
//! nor strings parsed as numbers: a type mismatch is a decode error.
//!
//! Encoding writes one JSON object per row, keys in column order; TIMESTAMP values are
//! RFC 3339 UTC strings with milliseconds (`2023-11-14T22:13:20.000Z`), NaN/inf are null.

use std::fmt;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::{
    DataType, Date32Type, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type,
    TimeUnit, TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};

use super::DecodeError;
use super::row::{Cell, RowBuilders};
use super::types::ColumnType;

/// One declared column, as the decoder sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeColumn {
    pub name: String,
    pub ty: ColumnType,
    pub nullable: bool,
}

/// Decodes JSON objects into rows of the declared columns.
pub struct JsonDecoder {
    rows: RowBuilders,
}

impl JsonDecoder {
    #[must_use]
    pub fn new(columns: Vec<DecodeColumn>) -> Self {
        Self {
            rows: RowBuilders::new(columns),
        }
    }

    #[must_use]
    pub fn columns(&self) -> &[DecodeColumn] {
        &self.rows.columns
    }

    /// Rows appended since the last [`Self::finish`].
    #[must_use]
    pub fn rows(&self) -> usize {
        self.rows.rows()
    }

    /// Decodes one record and appends it as a row, or rejects it and appends nothing.
    pub fn decode(&mut self, bytes: &[u8]) -> Result<(), DecodeError> {
        self.parse(bytes)?;
        self.append();
        Ok(())
    }

    /// Decodes one record into the pending row without appending it: [`Self::append`]
    /// then adds it, and the next `parse` discards it.
    pub fn parse(&mut self, bytes: &[u8]) -> Result<(), DecodeError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(DecodeError::Empty);
        }
        let rows = &mut self.rows;
        rows.start();
        let mut failure = None;
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let seed = RowSeed {
            columns: &rows.columns,
            row: &mut rows.row,
            texts: &mut rows.texts,
            failure: &mut failure,
        };
        let parsed = seed.deserialize(&mut de).and_then(|()| de.end());
        if let Err(e) = parsed {
            return Err(failure.unwrap_or_else(|| DecodeError::Syntax(e.to_string())));
        }
        rows.check()
    }

    /// Fills the pending row with nulls (a record without this part, such as a message
    /// without a key): an error when a column is NOT NULL.
    pub fn parse_absent(&mut self) -> Result<(), DecodeError> {
        self.rows.start();
        self.rows.check()
    }

    /// Appends the row of the last successful `parse`.
    pub fn append(&mut self) {
        self.rows.append();
    }

    /// Takes the decoded rows as one array per column; the decoder starts empty again.
    pub fn finish(&mut self) -> Vec<ArrayRef> {
        self.rows.finish()
    }
}

struct RowSeed<'a> {
    columns: &'a [DecodeColumn],
    row: &'a mut [Cell],
    texts: &'a mut [String],
    failure: &'a mut Option<DecodeError>,
}

impl<'de> DeserializeSeed<'de> for RowSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl RowSeed<'_> {
    fn not_object<E: de::Error>(self, found: &'static str) -> Result<(), E> {
        *self.failure = Some(DecodeError::NotAnObject(found));
        Err(E::custom("not an object"))
    }
}

impl<'de> Visitor<'de> for RowSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // Fields usually come in declared order: each name is compared first with the
        // column after the last one found.
        let mut next = 0;
        while let Some(index) = map.next_key_seed(KeySeed {
            columns: self.columns,
            first: next,
        })? {
            match index {
                Some(i) => {
                    next = i + 1;
                    let column = &self.columns[i];
                    let cell = map.next_value_seed(CellSeed {
                        column,
                        text: &mut self.texts[i],
                        failure: self.failure,
                    })?;
                    self.row[i] = cell;
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.not_object("an array")
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.not_object("a string")
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.not_object("a number")
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.not_object("a number")
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.not_object("a number")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.not_object("a boolean")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.not_object("null")
    }
}

/// Maps a field name to its column index (`None` = not declared, ignore it), trying
/// column `first` before the others.
struct KeySeed<'a> {
    columns: &'a [DecodeColumn],
    first: usize,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Option<usize>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed<'_> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<usize>, E> {
        if self.columns.get(self.first).is_some_and(|c| c.name == v) {
            return Ok(Some(self.first));
        }
        Ok(self.columns.iter().position(|c| c.name == v))
    }
}

struct CellSeed<'a> {
    column: &'a DecodeColumn,
    text: &'a mut String,
    failure: &'a mut Option<DecodeError>,
}

impl CellSeed<'_> {
    fn wrong<E: de::Error>(self, found: String) -> Result<Cell, E> {
        let expected = match self.column.ty {
            ColumnType::Boolean => "a boolean",
            ColumnType::Int8 | ColumnType::Int16 | ColumnType::Int32 | ColumnType::Int64 => {
                "an integer"
            }
            ColumnType::Float32 | ColumnType::Float64 => "a number",
            ColumnType::Utf8 => "a string",
            ColumnType::Timestamp(unit) => unit.expected(),
            ColumnType::Date32 => "a YYYY-MM-DD string",
        };
        *self.failure = Some(DecodeError::WrongType {
            field: self.column.name.clone(),
            expected,
            found,
        });
        Err(E::custom("wrong type"))
    }

    fn int<E: de::Error>(self, v: i128) -> Result<Cell, E> {
        let (min, max) = match self.column.ty {
            ColumnType::Int8 => (i128::from(i8::MIN), i128::from(i8::MAX)),
            ColumnType::Int16 => (i128::from(i16::MIN), i128::from(i16::MAX)),
            ColumnType::Int32 => (i128::from(i32::MIN), i128::from(i32::MAX)),
            ColumnType::Int64 | ColumnType::Timestamp(_) => {
                (i128::from(i64::MIN), i128::from(i64::MAX))
            }
            ColumnType::Float32 | ColumnType::Float64 => return Ok(Cell::Float(v as f64)),
            _ => return self.wrong(format!("the number {v}")),
        };
        if v < min || v > max {
            return self.wrong(format!("{v}, which is out of range"));
        }
        match self.column.ty {
            ColumnType::Timestamp(unit) => match unit.to_ms(v as i64) {
                Some(ms) => Ok(Cell::Int(ms)),
                None => self.wrong(format!("{v}, which is out of range")),
            },
            _ => Ok(Cell::Int(v as i64)),
        }
    }
}

impl<'de> DeserializeSeed<'de> for CellSeed<'_> {
    type Value = Cell;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Cell, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for CellSeed<'_> {
    type Value = Cell;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a value of type {}", self.column.ty.sql_name())
    }
    fn visit_unit<E: de::Error>(self) -> Result<Cell, E> {
        Ok(Cell::Null)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Cell, E> {
        if self.column.ty == ColumnType::Boolean {
            Ok(Cell::Bool(v))
        } else {
            self.wrong(format!("the boolean {v}"))
        }
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Cell, E> {
        self.int(i128::from(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Cell, E> {
        self.int(i128::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Cell, E> {
        match self.column.ty {
            ColumnType::Float32 | ColumnType::Float64 => Ok(Cell::Float(v)),
            _ => self.wrong(format!("the number {v}")),
        }
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Cell, E> {
        match self.column.ty {
            ColumnType::Utf8 => {
                self.text.clear();
                self.text.push_str(v);
                Ok(Cell::Str)
            }
            ColumnType::Timestamp(_) => match parse_timestamp_ms(v) {
                Some(ms) => Ok(Cell::Int(ms)),
                None => self.wrong(format!("the string {v:?}")),
            },
            ColumnType::Date32 => match parse_date_days(v) {
                Some(days) => Ok(Cell::Int(i64::from(days))),
                None => self.wrong(format!("the string {v:?}")),
            },
            _ => self.wrong(format!("the string {v:?}")),
        }
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Cell, A::Error> {
        self.wrong("an array".to_owned())
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Cell, A::Error> {
        self.wrong("an object".to_owned())
    }
}

/// Encodes rows as JSON objects.
#[derive(Debug, Default)]
pub struct JsonEncoder {
    names: Vec<String>,
}

enum ColumnWriter<'a> {
    Null,
    Bool(&'a BooleanArray),
    I64(Box<dyn Fn(usize) -> i64 + 'a>),
    U64(&'a arrow::array::PrimitiveArray<UInt64Type>),
    F64(Box<dyn Fn(usize) -> f64 + 'a>),
    Str(Box<dyn Fn(usize) -> &'a str + 'a>),
    /// Milliseconds since the epoch, already converted from the column's unit.
    TimestampMs(Box<dyn Fn(usize) -> i64 + 'a>),
    Date(&'a arrow::array::PrimitiveArray<Date32Type>),
    /// Anything else: Arrow's display form, as a JSON string.
    Display(ArrayFormatter<'a>),
}

impl JsonEncoder {
    /// Writes each row of `batch` (restricted to `columns`, all when `None`) as a JSON
    /// object to `out`, and pushes the end offset of each row onto `ends`.
    pub fn encode(
        &mut self,
        batch: &RecordBatch,
        columns: Option<&[usize]>,
        out: &mut Vec<u8>,
        ends: &mut Vec<usize>,
    ) -> Result<(), String> {
        let schema = batch.schema();
        let all: Vec<usize>;
        let columns = if let Some(c) = columns {
            c
        } else {
            all = (0..batch.num_columns()).collect();
            &all
        };
        self.names.clear();
        for &i in columns {
            let mut name =
                serde_json::to_string(schema.field(i).name()).map_err(|e| e.to_string())?;
            name.push(':');
            self.names.push(name);
        }
        let format_options = FormatOptions::default();
        let writers = columns
            .iter()
            .map(|&i| writer(batch.column(i).as_ref(), &format_options))
            .collect::<Result<Vec<_>, String>>()?;
        for row in 0..batch.num_rows() {
            out.push(b'{');
            for (n, (&i, w)) in columns.iter().zip(&writers).enumerate() {
                if n > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(self.names[n].as_bytes());
                if batch.column(i).is_null(row) {
                    out.extend_from_slice(b"null");
                } else {
                    write_value(w, row, out)?;
                }
            }
            out.push(b'}');
            ends.push(out.len());
        }
        Ok(())
    }
}

/// Format options of values written as text: the defaults, shared.
static TEXT_OPTIONS: FormatOptions<'static> = FormatOptions::new();

/// One column's values as bare text: strings unquoted, the rest as in JSON (Kafka keys of
/// one column, header values). Made once per batch, then asked row by row.
pub struct CellText<'a> {
    array: &'a dyn Array,
    writer: ColumnWriter<'a>,
}

impl<'a> CellText<'a> {
    pub fn new(array: &'a dyn Array) -> Result<Self, String> {
        Ok(Self {
            array,
            writer: writer(array, &TEXT_OPTIONS)?,
        })
    }

    /// Appends row `row`'s text to `out`; a null writes nothing.
    pub fn write(&self, row: usize, out: &mut Vec<u8>) -> Result<(), String> {
        if self.array.is_null(row) {
            return Ok(());
        }
        match &self.writer {
            ColumnWriter::Str(f) => out.extend_from_slice(f(row).as_bytes()),
            w => write_value(w, row, out)?,
        }
        Ok(())
    }
}

fn writer<'a>(
    array: &'a dyn Array,
    options: &'a FormatOptions<'a>,
) -> Result<ColumnWriter<'a>, String> {
    Ok(match array.data_type() {
        DataType::Null => ColumnWriter::Null,
        DataType::Boolean => ColumnWriter::Bool(array.as_boolean()),
        DataType::Int8 => {
            let a = array.as_primitive::<Int8Type>();
            ColumnWriter::I64(Box::new(move |i| i64::from(a.value(i))))
        }
        DataType::Int16 => {
            let a = array.as_primitive::<Int16Type>();
            ColumnWriter::I64(Box::new(move |i| i64::from(a.value(i))))
        }
        DataType::Int32 => {
            let a = array.as_primitive::<Int32Type>();
            ColumnWriter::I64(Box::new(move |i| i64::from(a.value(i))))
        }
        DataType::Int64 => {
            let a = array.as_primitive::<Int64Type>();
            ColumnWriter::I64(Box::new(move |i| a.value(i)))
        }
        DataType::UInt8 => {
            let a = array.as_primitive::<UInt8Type>();
            ColumnWriter::I64(Box::new(move |i| i64::from(a.value(i))))
        }
        DataType::UInt16 => {
            let a = array.as_primitive::<UInt16Type>();
            ColumnWriter::I64(Box::new(move |i| i64::from(a.value(i))))
        }
        DataType::UInt32 => {
            let a = array.as_primitive::<UInt32Type>();
            ColumnWriter::I64(Box::new(move |i| i64::from(a.value(i))))
        }
        DataType::UInt64 => ColumnWriter::U64(array.as_primitive::<UInt64Type>()),
        DataType::Float32 => {
            let a = array.as_primitive::<Float32Type>();
            ColumnWriter::F64(Box::new(move |i| f64::from(a.value(i))))
        }
        DataType::Float64 => {
            let a = array.as_primitive::<Float64Type>();
            ColumnWriter::F64(Box::new(move |i| a.value(i)))
        }
        DataType::Utf8 => {
            let a = array.as_string::<i32>();
            ColumnWriter::Str(Box::new(move |i| a.value(i)))
        }
        DataType::LargeUtf8 => {
            let a = array.as_string::<i64>();
            ColumnWriter::Str(Box::new(move |i| a.value(i)))
        }
        DataType::Utf8View => {
            let a = array.as_string_view();
            ColumnWriter::Str(Box::new(move |i| a.value(i)))
        }
        DataType::Timestamp(unit, _) => match unit {
            TimeUnit::Second => {
                let a = array.as_primitive::<TimestampSecondType>();
                ColumnWriter::TimestampMs(Box::new(move |i| a.value(i).saturating_mul(1000)))
            }
            TimeUnit::Millisecond => {
                let a = array.as_primitive::<TimestampMillisecondType>();
                ColumnWriter::TimestampMs(Box::new(move |i| a.value(i)))
            }
            TimeUnit::Microsecond => {
                let a = array.as_primitive::<TimestampMicrosecondType>();
                ColumnWriter::TimestampMs(Box::new(move |i| a.value(i).div_euclid(1000)))
            }
            TimeUnit::Nanosecond => {
                let a = array.as_primitive::<TimestampNanosecondType>();
                ColumnWriter::TimestampMs(Box::new(move |i| a.value(i).div_euclid(1_000_000)))
            }
        },
        DataType::Date32 => ColumnWriter::Date(array.as_primitive::<Date32Type>()),
        _ => ColumnWriter::Display(
            ArrayFormatter::try_new(array, options).map_err(|e| e.to_string())?,
        ),
    })
}

fn write_value(w: &ColumnWriter<'_>, row: usize, out: &mut Vec<u8>) -> Result<(), String> {
    match w {
        ColumnWriter::Null => out.extend_from_slice(b"null"),
        ColumnWriter::Bool(a) => {
            out.extend_from_slice(if a.value(row) { b"true" } else { b"false" });
        }
        ColumnWriter::I64(f) => {
            out.extend_from_slice(itoa::Buffer::new().format(f(row)).as_bytes());
        }
        ColumnWriter::U64(a) => {
            out.extend_from_slice(itoa::Buffer::new().format(a.value(row)).as_bytes());
        }
        ColumnWriter::F64(f) => {
            let v = f(row);
            if v.is_finite() {
                out.extend_from_slice(ryu::Buffer::new().format_finite(v).as_bytes());
            } else {
                out.extend_from_slice(b"null");
            }
        }
        ColumnWriter::Str(f) => write_json_string(f(row), out),
        ColumnWriter::TimestampMs(f) => {
            out.push(b'"');
            write_rfc3339_ms(f(row), out);
            out.push(b'"');
        }
        ColumnWriter::Date(a) => {
            out.push(b'"');
            let (y, m, d) = civil_from_days(i64::from(a.value(row)));
            write_date(y, m, d, out);
            out.push(b'"');
        }
        ColumnWriter::Display(f) => {
            let text = f.value(row).try_to_string().map_err(|e| e.to_string())?;
            write_json_string(&text, out);
        }
    }
    Ok(())
}

fn write_json_string(s: &str, out: &mut Vec<u8>) {
    // serde_json's escaping is exact and fast; writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Writes `2023-11-14T22:13:20.000Z` for epoch milliseconds.
pub fn write_rfc3339_ms(ms: i64, out: &mut Vec<u8>) {
    let days = ms.div_euclid(86_400_000);
    let ms_of_day = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    write_date(y, m, d, out);
    let (h, rest) = (ms_of_day / 3_600_000, ms_of_day % 3_600_000);
    let (min, rest) = (rest / 60_000, rest % 60_000);
    let (s, milli) = (rest / 1000, rest % 1000);
    out.push(b'T');
    push_2(h, out);
    out.push(b':');
    push_2(min, out);
    out.push(b':');
    push_2(s, out);
    out.push(b'.');
    out.push(b'0' + (milli / 100) as u8);
    out.push(b'0' + (milli / 10 % 10) as u8);
    out.push(b'0' + (milli % 10) as u8);
    out.push(b'Z');
}

fn write_date(y: i64, m: i64, d: i64, out: &mut Vec<u8>) {
    if (0..=9999).contains(&y) {
        push_2(y / 100, out);
        push_2(y % 100, out);
    } else {
        out.extend_from_slice(format!("{y:+05}").as_bytes());
    }
    out.push(b'-');
    push_2(m, out);
    out.push(b'-');
    push_2(d, out);
}

fn push_2(v: i64, out: &mut Vec<u8>) {
    out.push(b'0' + (v / 10) as u8);
    out.push(b'0' + (v % 10) as u8);
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// An RFC 3339 timestamp as epoch milliseconds (the usual UTC form without the general
/// parser), or `None`.
pub(crate) fn parse_timestamp_ms(v: &str) -> Option<i64> {
    utc_millis(v.as_bytes()).or_else(|| {
        chrono::DateTime::parse_from_rfc3339(v)
            .ok()
            .map(|t| t.timestamp_millis())
    })
}

/// `YYYY-MM-DD` as days since 1970-01-01, or `None`.
pub(crate) fn parse_date_days(v: &str) -> Option<i32> {
    let d = chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d").ok()?;
    i32::try_from(
        d.signed_duration_since(chrono::NaiveDate::default())
            .num_days(),
    )
    .ok()
}

/// The common UTC form `YYYY-MM-DDTHH:MM:SS[.f{1,9}]Z` (what laminar writes) in epoch
/// milliseconds, without the general RFC 3339 parser; `None` for anything else (offsets,
/// lowercase, out-of-range fields), which the general parser then takes.
fn utc_millis(s: &[u8]) -> Option<i64> {
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let mut n = 0i64;
        for &b in s.get(range)? {
            if !b.is_ascii_digit() {
                return None;
            }
            n = n * 10 + i64::from(b - b'0');
        }
        Some(n)
    };
    if s.len() < 20
        || s[4] != b'-'
        || s[7] != b'-'
        || s[10] != b'T'
        || s[13] != b':'
        || s[16] != b':'
        || s.last() != Some(&b'Z')
    {
        return None;
    }
    let (y, mo, d) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (h, mi, sec) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    let days_in_month = match mo {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) => 29,
        2 => 28,
        _ => return None,
    };
    if d < 1 || d > days_in_month || h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    let millis = match s.len() - 1 {
        19 => 0,
        end if s[19] == b'.' && (21..=29).contains(&end) => {
            // The first three digits of the fraction are milliseconds.
            let fraction = digits(20..end)?;
            let scale = 10i64.pow((end - 20) as u32);
            fraction * 1000 / scale
        }
        _ => return None,
    };
    Some(((days_from_civil(y, mo, d) * 24 + h) * 60 + mi) * 60_000 + sec * 1000 + millis)
}

/// Howard Hinnant's days-to-civil: proleptic Gregorian (year, month, day) for days since
/// 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

    fn columns() -> Vec<DecodeColumn> {
        vec![
            DecodeColumn {
                name: "id".into(),
                ty: ColumnType::Int64,
                nullable: false,
            },
            DecodeColumn {
                name: "name".into(),
                ty: ColumnType::Utf8,
                nullable: true,
            },
            DecodeColumn {
                name: "ts".into(),
                ty: ColumnType::Timestamp(crate::format::types::EpochUnit::Millis),
                nullable: false,
            },
        ]
    }

    #[test]
    fn decode_rejects_bad_records_without_disturbing_good_ones() {
        let mut d = JsonDecoder::new(columns());
        assert!(
            d.decode(br#"{"id":1,"name":"a","ts":1700000000000}"#)
                .is_ok()
        );
        assert_eq!(
            d.decode(b"{not json"),
            Err(DecodeError::Syntax(
                "key must be a string at line 1 column 2".into()
            ))
        );
        assert_eq!(
            d.decode(br#"{"name":"b","ts":1}"#),
            Err(DecodeError::MissingField("id".into()))
        );
        assert!(matches!(
            d.decode(br#"{"id":"7","ts":1}"#),
            Err(DecodeError::WrongType { .. })
        ));
        assert!(matches!(
            d.decode(br#"{"id":1,"ts":1} x"#),
            Err(DecodeError::Syntax(_))
        ));
        assert!(matches!(
            d.decode(br"[1]"),
            Err(DecodeError::NotAnObject("an array"))
        ));
        assert!(
            d.decode(br#"{"id":2,"ts":"2023-11-14T22:13:20.5Z","extra":[1,{"a":2}]}"#)
                .is_ok()
        );
        let arrays = d.finish();
        assert_eq!(arrays[0].len(), 2);
        assert_eq!(arrays[0].as_primitive::<Int64Type>().values(), &[1, 2]);
        assert!(arrays[1].is_null(1));
        assert_eq!(
            arrays[2]
                .as_primitive::<TimestampMillisecondType>()
                .value(1),
            1_700_000_000_500
        );
    }

    #[test]
    fn decode_reads_epoch_units_into_milliseconds() {
        use crate::format::types::EpochUnit;
        let column = |name: &str, unit| DecodeColumn {
            name: name.into(),
            ty: ColumnType::Timestamp(unit),
            nullable: false,
        };
        let mut d = JsonDecoder::new(vec![
            column("s", EpochUnit::Seconds),
            column("ms", EpochUnit::Millis),
            column("us", EpochUnit::Micros),
            column("ns", EpochUnit::Nanos),
        ]);
        d.decode(br#"{"s":1700000000,"ms":1700000000001,"us":1700000000002999,"ns":1700000000003999999}"#).unwrap();
        let arrays = d.finish();
        let ms: Vec<i64> = arrays
            .iter()
            .map(|a| a.as_primitive::<TimestampMillisecondType>().value(0))
            .collect();
        assert_eq!(
            ms,
            vec![
                1_700_000_000_000,
                1_700_000_000_001,
                1_700_000_000_002,
                1_700_000_000_003
            ]
        );
        assert!(matches!(
            d.decode(br#"{"s":9223372036854775807,"ms":1,"us":1,"ns":1}"#),
            Err(DecodeError::WrongType { .. })
        ));
    }

    #[test]
    fn decode_rejects_out_of_range_integers() {
        let mut d = JsonDecoder::new(vec![DecodeColumn {
            name: "x".into(),
            ty: ColumnType::Int8,
            nullable: false,
        }]);
        assert!(d.decode(br#"{"x":127}"#).is_ok());
        assert!(matches!(
            d.decode(br#"{"x":128}"#),
            Err(DecodeError::WrongType { .. })
        ));
    }

    #[test]
    fn encode_writes_rfc3339_millis_and_nulls() {
        let mut d = JsonDecoder::new(columns());
        d.decode(br#"{"id":1,"name":"a\"b","ts":1700000000000}"#)
            .unwrap();
        d.decode(br#"{"id":-2,"ts":-1}"#).unwrap();
        let fields: Vec<Field> = columns()
            .iter()
            .map(|c| c.ty.field(&c.name, c.nullable))
            .collect();
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), d.finish()).unwrap();
        let (mut out, mut ends) = (Vec::new(), Vec::new());
        JsonEncoder::default()
            .encode(&batch, None, &mut out, &mut ends)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            r#"{"id":1,"name":"a\"b","ts":"2023-11-14T22:13:20.000Z"}{"id":-2,"name":null,"ts":"1969-12-31T23:59:59.999Z"}"#
        );
        assert_eq!(ends, vec![54, text.len()]);
    }

    #[test]
    fn the_fast_utc_form_matches_the_general_parser() {
        for text in [
            "2023-11-14T22:13:20.000Z",
            "2023-11-14T22:13:20Z",
            "1970-01-01T00:00:00.5Z",
            "1969-12-31T23:59:59.999999999Z",
            "2000-02-29T12:00:00.123456Z",
            "2400-12-31T23:59:59.1Z",
            "0001-01-01T00:00:00Z",
        ] {
            let want = chrono::DateTime::parse_from_rfc3339(text)
                .unwrap()
                .timestamp_millis();
            assert_eq!(utc_millis(text.as_bytes()), Some(want), "{text}");
        }
        // Not the fast form: the general parser decides.
        for text in [
            "2023-11-14T22:13:20+02:00",
            "2023-02-29T00:00:00Z",
            "2023-11-14T24:00:00Z",
            "2023-11-14 22:13:20Z",
            "2023-11-14T22:13:20.Z",
            "2023-11-14T22:13:20.1234567890Z",
            "2023-1-14T22:13:20Z",
        ] {
            assert_eq!(utc_millis(text.as_bytes()), None, "{text}");
        }
    }

    #[test]
    fn civil_from_days_matches_chrono() {
        for days in [-1, 0, 59, 365, 11_016, 19_675, 2_932_896] {
            let expected = chrono::NaiveDate::default() + chrono::Duration::days(days);
            let (y, m, d) = civil_from_days(days);
            assert_eq!(
                format!("{y:04}-{m:02}-{d:02}"),
                expected.format("%Y-%m-%d").to_string()
            );
        }
    }
}
