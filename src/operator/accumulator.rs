//! Incremental aggregates: each window and key keeps one [`Acc`] per aggregate, updated
//! in place as records arrive (never a re-scan of the window's records) and mergeable,
//! so that sessions can merge.
//!
//! Supported: COUNT(*), COUNT(x), COUNT(DISTINCT x), SUM, MIN, MAX, AVG over integers,
//! floats, timestamps and dates (MIN/MAX also over strings). Nulls are ignored; SUM, MIN,
//! MAX and AVG of no values are null, COUNT of none is 0.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Builder, Int64Builder, StringBuilder};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float32Type, Float64Type, Int64Type};
use arrow::error::ArrowError;
use arrow::row::{RowConverter, SortField};

use crate::state::codec::{CodecError, Reader, Writer};

/// Most distinct values one COUNT(DISTINCT) keeps per window and key.
pub const DISTINCT_VALUES_MAX: usize = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggregateFunction {
    CountStar,
    Count,
    CountDistinct,
    Sum,
    Min,
    Max,
    Avg,
}

/// How an argument's values are held: as i64 (integers, timestamps, dates), f64, or text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    Int,
    Float,
    Text,
}

impl ValueKind {
    #[must_use]
    pub fn of(t: &DataType) -> Option<Self> {
        match t {
            DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::Timestamp(..)
            | DataType::Date32
            | DataType::Date64
            | DataType::Boolean => Some(Self::Int),
            DataType::Float32 | DataType::Float64 => Some(Self::Float),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Some(Self::Text),
            _ => None,
        }
    }
}

/// One aggregate of a query: what it computes, over which kind of value, into which type.
#[derive(Debug, Clone)]
pub struct AggregateSpec {
    pub function: AggregateFunction,
    pub kind: ValueKind,
    /// The argument's type (MIN/MAX results are cast back to it).
    pub input_type: DataType,
    /// The type `DataFusion` planned for the result.
    pub output_type: DataType,
}

/// The running state of one aggregate for one window and key.
#[derive(Debug, Clone, PartialEq)]
pub enum Acc {
    Count(i64),
    SumInt(Option<i64>),
    SumFloat(Option<f64>),
    MinMaxInt(Option<i64>),
    MinMaxFloat(Option<f64>),
    MinMaxText(Option<Box<str>>),
    Avg { sum: f64, count: i64 },
    Distinct(Box<HashSet<Box<[u8]>>>),
}

/// An argument column prepared for fast per-row reads.
pub enum ArgValues {
    None,
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Text(ArrayRef),
    /// Row-encoded values, for COUNT(DISTINCT).
    Encoded(arrow::row::Rows, ArrayRef),
}

impl AggregateSpec {
    #[must_use]
    pub fn new_acc(&self) -> Acc {
        match (self.function, self.kind) {
            (AggregateFunction::CountStar | AggregateFunction::Count, _) => Acc::Count(0),
            (AggregateFunction::CountDistinct, _) => Acc::Distinct(Box::default()),
            (AggregateFunction::Sum, ValueKind::Float) => Acc::SumFloat(None),
            (AggregateFunction::Sum, _) => Acc::SumInt(None),
            (AggregateFunction::Min | AggregateFunction::Max, ValueKind::Int) => {
                Acc::MinMaxInt(None)
            }
            (AggregateFunction::Min | AggregateFunction::Max, ValueKind::Float) => {
                Acc::MinMaxFloat(None)
            }
            (AggregateFunction::Min | AggregateFunction::Max, ValueKind::Text) => {
                Acc::MinMaxText(None)
            }
            (AggregateFunction::Avg, _) => Acc::Avg { sum: 0.0, count: 0 },
        }
    }

    /// Reads an evaluated argument column into the form `update` wants.
    pub fn prepare(
        &self,
        values: Option<&ArrayRef>,
        converter: Option<&RowConverter>,
    ) -> Result<ArgValues, ArrowError> {
        let Some(values) = values else {
            return Ok(ArgValues::None);
        };
        if self.function == AggregateFunction::CountDistinct {
            let converter = converter
                .ok_or_else(|| ArrowError::InvalidArgumentError("no row converter".into()))?;
            return Ok(ArgValues::Encoded(
                converter.convert_columns(std::slice::from_ref(values))?,
                values.clone(),
            ));
        }
        Ok(match self.kind {
            ValueKind::Int => {
                let a = cast(values, &DataType::Int64)?;
                ArgValues::Int(a.as_primitive::<Int64Type>().iter().collect())
            }
            ValueKind::Float => {
                let a = if values.data_type() == &DataType::Float32 {
                    Arc::new(
                        values
                            .as_primitive::<Float32Type>()
                            .unary::<_, Float64Type>(f64::from),
                    ) as ArrayRef
                } else {
                    cast(values, &DataType::Float64)?
                };
                ArgValues::Float(a.as_primitive::<Float64Type>().iter().collect())
            }
            ValueKind::Text => ArgValues::Text(cast(values, &DataType::Utf8)?),
        })
    }

    /// Adds row `row` of `values` to `acc`. Returns false when a limit was hit.
    pub fn update(&self, acc: &mut Acc, values: &ArgValues, row: usize) -> bool {
        let min = self.function == AggregateFunction::Min;
        match (acc, values) {
            (Acc::Count(n), ArgValues::None) => *n += 1,
            (Acc::Count(n), ArgValues::Int(v)) => *n += i64::from(v[row].is_some()),
            (Acc::Count(n), ArgValues::Float(v)) => *n += i64::from(v[row].is_some()),
            (Acc::Count(n), ArgValues::Text(a) | ArgValues::Encoded(_, a)) => {
                *n += i64::from(a.is_valid(row));
            }
            (Acc::SumInt(s), ArgValues::Int(v)) => {
                if let Some(x) = v[row] {
                    *s = Some(s.unwrap_or(0).wrapping_add(x));
                }
            }
            (Acc::SumFloat(s), ArgValues::Float(v)) => {
                if let Some(x) = v[row] {
                    *s = Some(s.unwrap_or(0.0) + x);
                }
            }
            (Acc::MinMaxInt(m), ArgValues::Int(v)) => {
                if let Some(x) = v[row] {
                    *m = Some(m.map_or(x, |m| if min { m.min(x) } else { m.max(x) }));
                }
            }
            (Acc::MinMaxFloat(m), ArgValues::Float(v)) => {
                if let Some(x) = v[row] {
                    *m = Some(m.map_or(x, |m| if min { m.min(x) } else { m.max(x) }));
                }
            }
            (Acc::MinMaxText(m), ArgValues::Text(a)) => {
                if a.is_valid(row) {
                    let x = a.as_string::<i32>().value(row);
                    let replace = match m {
                        None => true,
                        Some(cur) => (min && x < &**cur) || (!min && x > &**cur),
                    };
                    if replace {
                        *m = Some(x.into());
                    }
                }
            }
            (Acc::Avg { sum, count }, ArgValues::Int(v)) => {
                if let Some(x) = v[row] {
                    *sum += x as f64;
                    *count += 1;
                }
            }
            (Acc::Avg { sum, count }, ArgValues::Float(v)) => {
                if let Some(x) = v[row] {
                    *sum += x;
                    *count += 1;
                }
            }
            (Acc::Distinct(set), ArgValues::Encoded(rows, a)) => {
                if a.is_valid(row) {
                    if set.len() >= DISTINCT_VALUES_MAX {
                        return false;
                    }
                    set.insert(rows.row(row).as_ref().into());
                }
            }
            (acc, _) => debug_assert!(false, "aggregate {self:?} cannot take {acc:?}"),
        }
        true
    }

    /// Folds `other` into `acc` (both of this aggregate).
    pub fn merge(&self, acc: &mut Acc, other: Acc) {
        let min = self.function == AggregateFunction::Min;
        match (acc, other) {
            (Acc::Count(a), Acc::Count(b)) => *a += b,
            (Acc::SumInt(a), Acc::SumInt(Some(b))) => *a = Some(a.unwrap_or(0).wrapping_add(b)),
            (Acc::SumFloat(a), Acc::SumFloat(Some(b))) => *a = Some(a.unwrap_or(0.0) + b),
            (Acc::MinMaxInt(a), Acc::MinMaxInt(Some(b))) => {
                *a = Some(a.map_or(b, |a| if min { a.min(b) } else { a.max(b) }));
            }
            (Acc::MinMaxFloat(a), Acc::MinMaxFloat(Some(b))) => {
                *a = Some(a.map_or(b, |a| if min { a.min(b) } else { a.max(b) }));
            }
            (Acc::MinMaxText(a), Acc::MinMaxText(Some(b))) => {
                let replace = match a {
                    None => true,
                    Some(cur) => (min && b < *cur) || (!min && b > *cur),
                };
                if replace {
                    *a = Some(b);
                }
            }
            (Acc::Avg { sum, count }, Acc::Avg { sum: s, count: c }) => {
                *sum += s;
                *count += c;
            }
            (Acc::Distinct(a), Acc::Distinct(b)) => a.extend(*b),
            _ => {}
        }
    }

    /// The results of `accs` (one per output row) as a column of `output_type`.
    pub fn finish<'a>(&self, accs: impl Iterator<Item = &'a Acc>) -> Result<ArrayRef, ArrowError> {
        let array: ArrayRef = match self.function {
            AggregateFunction::CountStar
            | AggregateFunction::Count
            | AggregateFunction::CountDistinct => {
                let mut b = Int64Builder::new();
                for acc in accs {
                    b.append_value(match acc {
                        Acc::Count(n) => *n,
                        Acc::Distinct(set) => set.len() as i64,
                        _ => 0,
                    });
                }
                Arc::new(b.finish())
            }
            AggregateFunction::Avg => {
                let mut b = Float64Builder::new();
                for acc in accs {
                    match acc {
                        Acc::Avg { sum, count } if *count > 0 => {
                            b.append_value(sum / *count as f64);
                        }
                        _ => b.append_null(),
                    }
                }
                Arc::new(b.finish())
            }
            _ => match self.kind {
                ValueKind::Int => {
                    let mut b = Int64Builder::new();
                    for acc in accs {
                        b.append_option(match acc {
                            Acc::SumInt(v) | Acc::MinMaxInt(v) => *v,
                            _ => None,
                        });
                    }
                    let a: ArrayRef = Arc::new(b.finish());
                    // Back to the argument's own type (timestamps keep their unit and zone).
                    if matches!(
                        self.function,
                        AggregateFunction::Min | AggregateFunction::Max
                    ) {
                        cast(&a, &self.input_type)?
                    } else {
                        a
                    }
                }
                ValueKind::Float => {
                    let mut b = Float64Builder::new();
                    for acc in accs {
                        b.append_option(match acc {
                            Acc::SumFloat(v) | Acc::MinMaxFloat(v) => *v,
                            _ => None,
                        });
                    }
                    Arc::new(b.finish())
                }
                ValueKind::Text => {
                    let mut b = StringBuilder::new();
                    for acc in accs {
                        match acc {
                            Acc::MinMaxText(Some(s)) => b.append_value(s),
                            _ => b.append_null(),
                        }
                    }
                    Arc::new(b.finish())
                }
            },
        };
        if array.data_type() == &self.output_type {
            Ok(array)
        } else {
            cast(&array, &self.output_type)
        }
    }
}

/// A row converter for COUNT(DISTINCT) over values of `t`.
pub fn distinct_converter(t: &DataType) -> Result<RowConverter, ArrowError> {
    RowConverter::new(vec![SortField::new(t.clone())])
}

impl Acc {
    /// Appends this accumulator to a state value (tag byte, then its fields).
    pub fn encode(&self, w: &mut Writer) {
        fn opt<T>(w: &mut Writer, v: Option<T>, put: impl FnOnce(&mut Writer, T)) {
            match v {
                None => w.u8(0),
                Some(v) => {
                    w.u8(1);
                    put(w, v);
                }
            }
        }
        match self {
            Acc::Count(n) => {
                w.u8(0);
                w.i64(*n);
            }
            Acc::SumInt(v) => {
                w.u8(1);
                opt(w, *v, Writer::i64);
            }
            Acc::SumFloat(v) => {
                w.u8(2);
                opt(w, *v, Writer::f64);
            }
            Acc::MinMaxInt(v) => {
                w.u8(3);
                opt(w, *v, Writer::i64);
            }
            Acc::MinMaxFloat(v) => {
                w.u8(4);
                opt(w, *v, Writer::f64);
            }
            Acc::MinMaxText(v) => {
                w.u8(5);
                opt(w, v.as_deref(), |w, v| w.bytes(v.as_bytes()));
            }
            Acc::Avg { sum, count } => {
                w.u8(6);
                w.f64(*sum);
                w.i64(*count);
            }
            Acc::Distinct(set) => {
                w.u8(7);
                assert!(set.len() <= DISTINCT_VALUES_MAX);
                w.u32(set.len() as u32);
                for v in set.iter() {
                    w.bytes(v);
                }
            }
        }
    }

    /// Reads an accumulator written by [`Acc::encode`].
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        fn opt<'a, T>(
            r: &mut Reader<'a>,
            get: impl FnOnce(&mut Reader<'a>) -> Result<T, CodecError>,
        ) -> Result<Option<T>, CodecError> {
            match r.u8()? {
                0 => Ok(None),
                1 => get(r).map(Some),
                f => Err(CodecError(format!("bad option flag {f}"))),
            }
        }
        Ok(match r.u8()? {
            0 => Acc::Count(r.i64()?),
            1 => Acc::SumInt(opt(r, Reader::i64)?),
            2 => Acc::SumFloat(opt(r, Reader::f64)?),
            3 => Acc::MinMaxInt(opt(r, Reader::i64)?),
            4 => Acc::MinMaxFloat(opt(r, Reader::f64)?),
            5 => Acc::MinMaxText(opt(r, |r| {
                let b = r.bytes()?;
                std::str::from_utf8(b)
                    .map(Into::into)
                    .map_err(|e| CodecError(format!("text accumulator: {e}")))
            })?),
            6 => Acc::Avg {
                sum: r.f64()?,
                count: r.i64()?,
            },
            7 => {
                let n = r.u32()? as usize;
                if n > DISTINCT_VALUES_MAX {
                    return Err(CodecError(format!(
                        "{n} distinct values, over the bound {DISTINCT_VALUES_MAX}"
                    )));
                }
                let mut set = HashSet::with_capacity(n);
                for _ in 0..n {
                    set.insert(r.bytes()?.into());
                }
                Acc::Distinct(Box::new(set))
            }
            t => return Err(CodecError(format!("unknown accumulator tag {t}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulators_round_trip_through_their_encoding() {
        let accs = [
            Acc::Count(-3),
            Acc::SumInt(None),
            Acc::SumInt(Some(i64::MIN)),
            Acc::SumFloat(Some(-0.5)),
            Acc::MinMaxInt(Some(7)),
            Acc::MinMaxFloat(None),
            Acc::MinMaxText(Some("zürich".into())),
            Acc::MinMaxText(None),
            Acc::Avg {
                sum: 1e300,
                count: 2,
            },
            Acc::Distinct(Box::default()),
            Acc::Distinct(Box::new(
                [b"a".as_slice(), b"", b"\x00\xff"]
                    .into_iter()
                    .map(Into::into)
                    .collect(),
            )),
        ];
        let mut w = Writer::default();
        for acc in &accs {
            acc.encode(&mut w);
        }
        let mut r = Reader::new(&w.buf);
        for acc in &accs {
            assert_eq!(&Acc::decode(&mut r).unwrap(), acc);
        }
        r.finish().unwrap();
        // Every strict prefix of an encoding is an error, never a wrong value.
        for acc in &accs {
            w.clear();
            acc.encode(&mut w);
            for len in 0..w.buf.len() {
                let mut r = Reader::new(&w.buf[..len]);
                assert!(
                    Acc::decode(&mut r).and_then(|_| r.finish()).is_err(),
                    "{acc:?} cut at {len}"
                );
            }
        }
        assert!(Acc::decode(&mut Reader::new(&[9])).is_err(), "unknown tag");
    }
}
