//! Avro codec tests against the apache-avro crate: what it writes we read, what we write
//! it reads, schema evolution, and malformed data rejected without a panic.

use std::sync::Arc;

use apache_avro::Schema;
use apache_avro::types::Value as Avro;
use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Date32Array, Decimal128Array, Float64Array, Int32Array,
    Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow::datatypes::{
    DataType, Date32Type, Field, Float64Type, Int64Type, Schema as ArrowSchema,
    TimestampMillisecondType,
};
use proptest::prelude::*;

use super::decode::compile;
use super::schema::{reader_of_schema, record_schema_of};
use super::*;
use crate::format::DecodeError;
use crate::format::json::DecodeColumn;
use crate::format::types::{ColumnType, EpochUnit};

/// apache-avro's writer (the reference encoder).
fn write_datum(schema: &Schema, value: Avro) -> apache_avro::AvroResult<Vec<u8>> {
    apache_avro::writer::datum::GenericDatumWriter::builder(schema)
        .build()?
        .write_value_to_vec(value)
}

/// apache-avro's reader (the reference decoder).
fn read_datum(
    schema: &Schema,
    datum: &mut &[u8],
    reader: Option<&Schema>,
) -> apache_avro::AvroResult<Avro> {
    apache_avro::reader::datum::GenericDatumReader::builder(schema)
        .maybe_reader_schema(reader)
        .build()?
        .read_value(datum)
}

const WRITER: &str = r#"{"type":"record","name":"Bid","namespace":"test","fields":[
  {"name":"auction","type":"long"},
  {"name":"bidder","type":"int"},
  {"name":"price","type":"double"},
  {"name":"channel","type":["null","string"],"default":null},
  {"name":"ok","type":"boolean"},
  {"name":"kind","type":{"type":"enum","name":"Kind","symbols":["A","B","C"]}},
  {"name":"extra","type":{"type":"array","items":{"type":"map","values":"long"}}},
  {"name":"nested","type":{"type":"record","name":"Inner","fields":[
     {"name":"x","type":"float"},{"name":"tags","type":{"type":"array","items":"string"}}]}},
  {"name":"ts","type":{"type":"long","logicalType":"timestamp-micros"}},
  {"name":"day","type":{"type":"int","logicalType":"date"}},
  {"name":"amount","type":{"type":"bytes","logicalType":"decimal","precision":12,"scale":2}}
]}"#;

fn col(name: &str, ty: ColumnType, nullable: bool) -> DecodeColumn {
    DecodeColumn {
        name: name.into(),
        ty,
        nullable,
    }
}

/// The declared columns: a promotion (bidder int -> BIGINT), skipped fields (extra,
/// nested), a column the writer lacks (note), logical types.
fn reader_columns() -> Vec<DecodeColumn> {
    vec![
        col("auction", ColumnType::Int64, false),
        col("bidder", ColumnType::Int64, false),
        col("price", ColumnType::Float64, false),
        col("channel", ColumnType::Utf8, true),
        col("ok", ColumnType::Boolean, false),
        col("kind", ColumnType::Utf8, false),
        col("ts", ColumnType::Timestamp(EpochUnit::Millis), false),
        col("day", ColumnType::Date32, false),
        col("amount", ColumnType::Utf8, false),
        col("note", ColumnType::Utf8, true),
    ]
}

#[derive(Debug, Clone)]
struct Bid {
    auction: i64,
    bidder: i32,
    price: f64,
    channel: Option<String>,
    ok: bool,
    kind: u32,
    extra: Vec<Vec<(String, i64)>>,
    tags: Vec<String>,
    ts_us: i64,
    day: i32,
    cents: i64,
}

fn bid() -> impl Strategy<Value = Bid> {
    (
        any::<i64>(),
        any::<i32>(),
        -1e12f64..1e12,
        proptest::option::of("[a-z]{0,12}"),
        any::<bool>(),
        0u32..3,
        proptest::collection::vec(
            proptest::collection::vec(("[a-z]{1,4}", any::<i64>()), 0..3),
            0..3,
        ),
        proptest::collection::vec("[a-z]{0,5}", 0..4),
        -4_000_000_000_000_000i64..4_000_000_000_000_000,
        -100_000i32..100_000,
        -1_000_000_000_000i64..1_000_000_000_000,
    )
        .prop_map(
            |(auction, bidder, price, channel, ok, kind, extra, tags, ts_us, day, cents)| Bid {
                auction,
                bidder,
                price,
                channel,
                ok,
                kind,
                extra,
                tags,
                ts_us,
                day,
                cents,
            },
        )
}

fn avro_value(b: &Bid) -> Avro {
    Avro::Record(vec![
        ("auction".into(), Avro::Long(b.auction)),
        ("bidder".into(), Avro::Int(b.bidder)),
        ("price".into(), Avro::Double(b.price)),
        (
            "channel".into(),
            match &b.channel {
                None => Avro::Union(0, Box::new(Avro::Null)),
                Some(c) => Avro::Union(1, Box::new(Avro::String(c.clone()))),
            },
        ),
        ("ok".into(), Avro::Boolean(b.ok)),
        (
            "kind".into(),
            Avro::Enum(b.kind, ["A", "B", "C"][b.kind as usize].into()),
        ),
        (
            "extra".into(),
            Avro::Array(
                b.extra
                    .iter()
                    .map(|m| {
                        Avro::Map(m.iter().map(|(k, v)| (k.clone(), Avro::Long(*v))).collect())
                    })
                    .collect(),
            ),
        ),
        (
            "nested".into(),
            Avro::Record(vec![
                ("x".into(), Avro::Float(1.5)),
                (
                    "tags".into(),
                    Avro::Array(b.tags.iter().map(|t| Avro::String(t.clone())).collect()),
                ),
            ]),
        ),
        ("ts".into(), Avro::TimestampMicros(b.ts_us)),
        ("day".into(), Avro::Date(b.day)),
        (
            "amount".into(),
            Avro::Decimal(apache_avro::Decimal::from(num_bigint_bytes(i128::from(
                b.cents,
            )))),
        ),
    ])
}

/// Two's-complement big-endian bytes, as apache-avro's `Decimal` takes them.
fn num_bigint_bytes(v: i128) -> Vec<u8> {
    let all = v.to_be_bytes();
    let mut start = 0;
    while start < 15
        && ((all[start] == 0 && all[start + 1] & 0x80 == 0)
            || (all[start] == 0xff && all[start + 1] & 0x80 != 0))
    {
        start += 1;
    }
    all[start..].to_vec()
}

fn cents_text(c: i64) -> String {
    let sign = if c < 0 { "-" } else { "" };
    let a = c.unsigned_abs();
    format!("{sign}{}.{:02}", a / 100, a % 100)
}

fn writer_schema() -> Arc<Schema> {
    Arc::new(Schema::parse_str(WRITER).unwrap())
}

fn decoder() -> AvroDecoder {
    AvroDecoder::new(
        AvroReader::from_columns(reader_columns()),
        WriterSchemas::Fixed(writer_schema()),
    )
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn decode_reads_what_apache_avro_writes(bids in proptest::collection::vec(bid(), 1..40)) {
        let schema = writer_schema();
        let mut d = decoder();
        for b in &bids {
            let datum = write_datum(&schema, avro_value(b)).unwrap();
            d.parse(&datum).unwrap();
            d.append();
        }
        let columns = d.finish();
        let auction = columns[0].as_primitive::<Int64Type>();
        let bidder = columns[1].as_primitive::<Int64Type>();
        let price = columns[2].as_primitive::<Float64Type>();
        let channel = columns[3].as_string::<i32>();
        let ok = columns[4].as_boolean();
        let kind = columns[5].as_string::<i32>();
        let ts = columns[6].as_primitive::<TimestampMillisecondType>();
        let day = columns[7].as_primitive::<Date32Type>();
        let amount = columns[8].as_string::<i32>();
        for (i, b) in bids.iter().enumerate() {
            prop_assert_eq!(auction.value(i), b.auction);
            prop_assert_eq!(bidder.value(i), i64::from(b.bidder));
            prop_assert_eq!(price.value(i).to_bits(), b.price.to_bits());
            prop_assert_eq!(channel.is_null(i), b.channel.is_none());
            if let Some(c) = &b.channel {
                prop_assert_eq!(channel.value(i), c.as_str());
            }
            prop_assert_eq!(ok.value(i), b.ok);
            prop_assert_eq!(kind.value(i), ["A", "B", "C"][b.kind as usize]);
            prop_assert_eq!(ts.value(i), b.ts_us.div_euclid(1000));
            prop_assert_eq!(day.value(i), b.day);
            prop_assert_eq!(amount.value(i), cents_text(b.cents));
            prop_assert!(columns[9].is_null(i));
        }
    }

    #[test]
    fn decode_rejects_every_truncation_and_survives_bit_flips(b in bid(), flip in any::<prop::sample::Index>()) {
        let schema = writer_schema();
        let datum = write_datum(&schema, avro_value(&b)).unwrap();
        let mut d = decoder();
        for cut in 0..datum.len() {
            prop_assert!(d.parse(&datum[..cut]).is_err(), "a prefix of {} of {} bytes decoded", cut, datum.len());
        }
        let mut flipped = datum.clone();
        let bit = flip.index(flipped.len() * 8);
        flipped[bit / 8] ^= 1 << (bit % 8);
        // Any outcome but a panic: a flip may still be a valid datum.
        let _ = d.parse(&flipped);
        prop_assert_eq!(d.rows(), 0);
    }

    #[test]
    fn encode_then_decode_gives_the_batch_back(
        rows in proptest::collection::vec(
            (any::<i64>(), proptest::option::of(any::<i32>()), any::<f64>(), proptest::option::of("[ -~]{0,10}"),
             any::<bool>(), -10_000_000_000_000i64..10_000_000_000_000, -50_000i32..50_000, -99_999_999_999i128..99_999_999_999),
            1..30)
    ) {
        let batch = RecordBatch::try_new(
            Arc::new(ArrowSchema::new(vec![
                Field::new("a", DataType::Int64, false),
                Field::new("b", DataType::Int32, true),
                Field::new("c", DataType::Float64, false),
                Field::new("d", DataType::Utf8, true),
                Field::new("e", DataType::Boolean, false),
                Field::new("t", crate::format::types::timestamp_ms_type(), false),
                Field::new("day", DataType::Date32, false),
                Field::new("m", DataType::Decimal128(12, 3), false),
            ])),
            vec![
                Arc::new(rows.iter().map(|r| Some(r.0)).collect::<Int64Array>()) as ArrayRef,
                Arc::new(rows.iter().map(|r| r.1).collect::<Int32Array>()),
                Arc::new(rows.iter().map(|r| Some(r.2)).collect::<Float64Array>()),
                Arc::new(rows.iter().map(|r| r.3.clone()).collect::<StringArray>()),
                Arc::new(rows.iter().map(|r| Some(r.4)).collect::<BooleanArray>()),
                Arc::new(rows.iter().map(|r| Some(r.5)).collect::<TimestampMillisecondArray>().with_timezone("UTC")),
                Arc::new(rows.iter().map(|r| Some(r.6)).collect::<Date32Array>()),
                Arc::new(rows.iter().map(|r| Some(r.7)).collect::<Decimal128Array>().with_precision_and_scale(12, 3).unwrap()),
            ],
        ).unwrap();
        let fields: Vec<&Field> = batch.schema_ref().fields().iter().map(AsRef::as_ref).collect();
        let json = record_schema_of("out", &fields).unwrap();
        let schema = Schema::parse_str(&json.to_string()).unwrap();
        let columns: Vec<(usize, &Field)> = fields.iter().copied().enumerate().collect();
        let encoder = AvroEncoder::new(&schema, &columns, Some(7)).unwrap();
        let (mut out, mut ends) = (Vec::new(), Vec::new());
        encoder.encode(&batch, &mut out, &mut ends).unwrap();
        // apache-avro reads every datum, with the values written.
        let mut start = 0;
        for (row, &end) in ends.iter().enumerate() {
            prop_assert_eq!(wire_schema_id(&out[start..end]).unwrap(), 7);
            let mut datum = &out[start + WIRE_HEADER_BYTES..end];
            let value = read_datum(&schema, &mut datum, None).unwrap();
            prop_assert!(datum.is_empty());
            let Avro::Record(fields) = value else { panic!("not a record") };
            prop_assert_eq!(&fields[0].1, &Avro::Long(rows[row].0));
            let b = match rows[row].1 { None => Avro::Union(0, Box::new(Avro::Null)), Some(v) => Avro::Union(1, Box::new(Avro::Int(v))) };
            prop_assert_eq!(&fields[1].1, &b);
            prop_assert_eq!(&fields[5].1, &Avro::TimestampMillis(rows[row].5));
            prop_assert_eq!(&fields[6].1, &Avro::Date(rows[row].6));
            start = end;
        }
        // And our decoder, with the columns derived from the schema, gives the batch back.
        let (reader, skipped) = reader_of_schema(&schema, "value").unwrap();
        prop_assert!(skipped.is_empty());
        let mut d = AvroDecoder::new(reader, WriterSchemas::Fixed(Arc::new(schema))).unwrap();
        let mut start = 0;
        for &end in &ends {
            d.parse(&out[start + WIRE_HEADER_BYTES..end]).unwrap();
            d.append();
            start = end;
        }
        let back = d.finish();
        prop_assert_eq!(back[0].as_ref(), batch.column(0).as_ref());
        prop_assert_eq!(back[2].as_ref(), batch.column(2).as_ref());
        prop_assert_eq!(back[3].as_ref(), batch.column(3).as_ref());
        prop_assert_eq!(back[5].as_ref(), batch.column(5).as_ref());
        prop_assert_eq!(back[6].as_ref(), batch.column(6).as_ref());
        let b = back[1].as_primitive::<arrow::datatypes::Int32Type>();
        for (i, r) in rows.iter().enumerate() {
            prop_assert_eq!(b.is_null(i), r.1.is_none());
            let m = back[7].as_primitive::<Float64Type>().value(i);
            prop_assert!((m - r.7 as f64 / 1000.0).abs() <= 1e-9 * m.abs().max(1.0));
        }
    }
}

const V1: &str = r#"{"type":"record","name":"User","fields":[
  {"name":"id","type":"long"},{"name":"name","type":"string"},
  {"name":"email","type":["null","string"],"default":null}]}"#;
/// V1 with an added field with a default, the optional `email` removed, `id` aliased.
const V2: &str = r#"{"type":"record","name":"User","fields":[
  {"name":"user_id","type":"long","aliases":["id"]},{"name":"name","type":"string"},
  {"name":"score","type":"int","default":7}]}"#;

fn user_v1(id: i64, name: &str, email: Option<&str>) -> Vec<u8> {
    let schema = Schema::parse_str(V1).unwrap();
    let email = email.map_or(Avro::Union(0, Box::new(Avro::Null)), |e| {
        Avro::Union(1, Box::new(Avro::String(e.into())))
    });
    write_datum(
        &schema,
        Avro::Record(vec![
            ("id".into(), Avro::Long(id)),
            ("name".into(), Avro::String(name.into())),
            ("email".into(), email),
        ]),
    )
    .unwrap()
}

#[test]
fn evolution_fills_reader_defaults_and_follows_aliases() {
    // The reader is the newer schema (its columns derived from it): an old record gets
    // `score`'s default and its `id` read through the alias.
    let v2 = Schema::parse_str(V2).unwrap();
    let (reader, _) = reader_of_schema(&v2, "value").unwrap();
    let v1 = Arc::new(Schema::parse_str(V1).unwrap());
    let mut d = AvroDecoder::new(reader, WriterSchemas::Fixed(v1)).unwrap();
    d.parse(&user_v1(5, "ann", Some("a@x"))).unwrap();
    d.append();
    let c = d.finish();
    assert_eq!(c[0].as_primitive::<Int64Type>().value(0), 5);
    assert_eq!(c[1].as_string::<i32>().value(0), "ann");
    assert_eq!(
        c[2].as_primitive::<arrow::datatypes::Int32Type>().value(0),
        7
    );
}

#[test]
fn evolution_reads_newer_writers_into_older_columns() {
    // The reader is the older schema: a newer writer's added field is skipped and the
    // removed optional field is null.
    let v1 = Schema::parse_str(V1).unwrap();
    let (reader, _) = reader_of_schema(&v1, "value").unwrap();
    let v2 = Schema::parse_str(V2).unwrap();
    // v2 renamed `id`; the older reader knows it only as `id`, so it is unreadable...
    let error = compile(&v2, &reader).unwrap_err();
    assert!(error.contains("no field `id`"), "{error}");
    // ...unless the column is nullable, then it is null for those records.
    let mut columns = reader.clone();
    columns.columns[0].nullable = true;
    let program = compile(&v2, &columns);
    assert!(program.is_ok());
}

#[test]
fn schemas_that_cannot_be_read_say_why() {
    let writer = Arc::new(Schema::parse_str(V1).unwrap());
    let reader = AvroReader::from_columns(vec![col("name", ColumnType::Int64, false)]);
    let Err(e) = AvroDecoder::new(reader, WriterSchemas::Fixed(writer)) else {
        panic!("a string read as BIGINT compiled")
    };
    assert!(
        e.contains("field `name` is string, which cannot be read as BIGINT"),
        "{e}"
    );
}

#[test]
fn narrowing_integers_is_checked_per_value() {
    let writer = Arc::new(Schema::parse_str(V1).unwrap());
    let reader = AvroReader::from_columns(vec![
        col("id", ColumnType::Int8, false),
        col("name", ColumnType::Utf8, false),
    ]);
    let mut d = AvroDecoder::new(reader, WriterSchemas::Fixed(writer)).unwrap();
    d.parse(&user_v1(100, "a", None)).unwrap();
    let e = d.parse(&user_v1(1000, "b", None)).unwrap_err();
    assert!(matches!(e, DecodeError::WrongType { .. }), "{e}");
}

#[test]
fn wire_format_is_checked() {
    assert_eq!(wire_schema_id(&[0, 0, 0, 1, 2, 9]).unwrap(), 258);
    let e = wire_schema_id(b"{\"a\":1}").unwrap_err();
    assert!(e.to_string().contains("first byte 0x7b"), "{e}");
    assert!(wire_schema_id(&[0, 0, 1]).is_err());
    assert_eq!(wire_header(258), [0, 0, 0, 1, 2]);
}

#[test]
fn trailing_bytes_are_an_error() {
    let writer = Arc::new(Schema::parse_str(V1).unwrap());
    let (reader, _) = reader_of_schema(&writer, "value").unwrap();
    let mut d = AvroDecoder::new(reader, WriterSchemas::Fixed(writer)).unwrap();
    let mut datum = user_v1(1, "a", None);
    datum.push(0);
    let e = d.parse(&datum).unwrap_err();
    assert!(e.to_string().contains("1 bytes after the end"), "{e}");
}

#[test]
fn huge_counts_and_recursion_are_bounded() {
    // A recursive list: nesting past DEPTH_MAX is refused, not a stack overflow.
    let list = Schema::parse_str(
        r#"{"type":"record","name":"L","fields":[{"name":"v","type":"long"},
            {"name":"next","type":["null","L"]}]}"#,
    )
    .unwrap();
    let reader = AvroReader::from_columns(vec![col("v", ColumnType::Int64, false)]);
    let mut d = AvroDecoder::new(reader, WriterSchemas::Fixed(Arc::new(list))).unwrap();
    let mut deep = Vec::new();
    for _ in 0..(DEPTH_MAX + 10) {
        deep.extend_from_slice(&[2, 2]); // v = 1, next = branch 1
    }
    deep.extend_from_slice(&[2, 0]);
    assert!(d.parse(&deep).is_err());
    assert!(d.parse(&[2, 2, 2, 0]).is_ok());
    // An array of nulls claiming 2^40 items takes no bytes per item: bounded by ITEMS_MAX.
    let nulls = Schema::parse_str(
        r#"{"type":"record","name":"N","fields":[{"name":"v","type":"long"},
            {"name":"a","type":{"type":"array","items":"null"}}]}"#,
    )
    .unwrap();
    let reader = AvroReader::from_columns(vec![col("v", ColumnType::Int64, false)]);
    let mut d = AvroDecoder::new(reader, WriterSchemas::Fixed(Arc::new(nulls))).unwrap();
    let mut datum = vec![2];
    super::encode::write_long(1 << 40, &mut datum);
    datum.push(0);
    let e = d.parse(&datum).unwrap_err();
    assert!(e.to_string().contains("array or map items"), "{e}");
}

#[test]
fn derived_columns_leave_out_what_cannot_be_a_column() {
    let schema = writer_schema();
    let (reader, skipped) = reader_of_schema(&schema, "value").unwrap();
    let names: Vec<&str> = reader.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "auction", "bidder", "price", "channel", "ok", "kind", "ts", "day", "amount"
        ]
    );
    assert_eq!(skipped, ["extra", "nested"]);
    assert_eq!(
        reader.columns[6].ty,
        ColumnType::Timestamp(EpochUnit::Micros)
    );
    assert!(reader.columns[3].nullable);
}

#[test]
fn output_names_must_be_avro_names() {
    let f = Field::new("COUNT(*)", DataType::Int64, false);
    let e = record_schema_of("q", &[&f]).unwrap_err();
    assert!(e.contains("give it an alias"), "{e}");
}

#[test]
fn given_sink_schemas_bind_columns_by_name_and_write_defaults() {
    let schema = Schema::parse_str(
        r#"{"type":"record","name":"Out","fields":[{"name":"n","type":"long"},
            {"name":"src","type":"string","default":"laminar"}]}"#,
    )
    .unwrap();
    let n = Field::new("n", DataType::Int64, false);
    let encoder = AvroEncoder::new(&schema, &[(0, &n)], None).unwrap();
    let batch = RecordBatch::try_new(
        Arc::new(ArrowSchema::new(vec![n.clone()])),
        vec![Arc::new(Int64Array::from(vec![3]))],
    )
    .unwrap();
    let (mut out, mut ends) = (Vec::new(), Vec::new());
    encoder.encode(&batch, &mut out, &mut ends).unwrap();
    let value = read_datum(&schema, &mut out.as_slice(), None).unwrap();
    assert_eq!(
        value,
        Avro::Record(vec![
            ("n".into(), Avro::Long(3)),
            ("src".into(), Avro::String("laminar".into()))
        ])
    );
    let extra = Field::new("other", DataType::Int64, false);
    let e = AvroEncoder::new(&schema, &[(0, &n), (1, &extra)], None).unwrap_err();
    assert!(e.contains("column `other` is not a field"), "{e}");
}
