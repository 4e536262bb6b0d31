//! Avro <-> Arrow: the Confluent wire format with a schema registry, and plain Avro with
//! a schema given in the pipeline file.
//!
//! ```text
//!   Confluent wire format (one Kafka message value or key):
//!   | offset | size | field                                              |
//!   |--------|------|----------------------------------------------------|
//!   | 0      | 1    | magic byte, always 0                               |
//!   | 1      | 4    | schema id, big-endian u32, as the registry numbers |
//!   | 5      | rest | the Avro binary datum, written with that schema    |
//!
//!   Plain Avro: the message is the datum alone; its schema is `avro_schema` in the file.
//! ```
//!
//! Decoding is schema-specialised: each writer schema (by registry id) is compiled once
//! against the declared columns (the reader) into a [`decode::Program`] that reads the
//! binary datum straight into the row scratch, skipping fields no column wants, applying
//! Avro's resolution rules (promotions int -> long -> float -> double, string <-> bytes,
//! reader defaults for fields the writer lacks), so that a producer evolving its schema
//! within the compatibility rules needs no restart. A record is checked whole before it
//! is appended (see `row`), so a bad record is rejected alone.
//!
//! Limits: a datum's nesting depth ([`DEPTH_MAX`]), the array and map items one record
//! may hold ([`ITEMS_MAX`]), and the compiled writer schemas kept per decoder
//! ([`PROGRAMS_MAX`]); lengths are checked against the bytes left before anything is
//! allocated.

pub mod decode;
pub mod encode;
pub mod registry;
pub mod schema;

pub use decode::{AvroDecoder, AvroReader, WriterSchemas};
pub use encode::AvroEncoder;
pub use registry::{RegistryClient, RegistryError, RegistryOptions};

/// The first byte of a Confluent-framed message.
pub const MAGIC_BYTE: u8 = 0;
/// Bytes before the datum in the Confluent wire format.
pub const WIRE_HEADER_BYTES: usize = 5;
/// Deepest nesting of arrays, maps, unions and records a datum may have.
pub const DEPTH_MAX: usize = 64;
/// Most array and map items (summed over the record) one record may hold.
pub const ITEMS_MAX: u64 = 1 << 20;
/// Most writer schemas one decoder keeps compiled; past it the cache starts over.
pub const PROGRAMS_MAX: usize = 1024;

/// The schema id of a Confluent-framed message, or why it is not one.
pub fn wire_schema_id(bytes: &[u8]) -> Result<u32, super::DecodeError> {
    match bytes {
        [MAGIC_BYTE, a, b, c, d, ..] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
        [first, ..] if *first != MAGIC_BYTE => Err(super::DecodeError::NotConfluentFramed {
            found: format!("first byte 0x{first:02x}, not the magic byte 0"),
        }),
        _ => Err(super::DecodeError::NotConfluentFramed {
            found: format!(
                "{} bytes, less than the {WIRE_HEADER_BYTES}-byte header",
                bytes.len()
            ),
        }),
    }
}

/// The 5-byte Confluent header for `schema_id`.
#[must_use]
pub fn wire_header(schema_id: u32) -> [u8; WIRE_HEADER_BYTES] {
    let id = schema_id.to_be_bytes();
    [MAGIC_BYTE, id[0], id[1], id[2], id[3]]
}

#[cfg(test)]
mod tests;
