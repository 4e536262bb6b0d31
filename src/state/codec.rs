//! Little helpers to lay out state keys and values as bytes.
//!
//! Keys: integers are big-endian with the sign bit flipped, so that byte order is numeric
//! order and range deletes by time work. Values: little-endian integers and
//! length-prefixed byte strings. Every read is checked; a short or malformed value is a
//! [`CodecError`], which callers report as corruption.

/// A value ended early or held something impossible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(pub String);

/// `v` as 8 bytes that sort like the number.
#[must_use]
pub fn ordered_i64(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

/// Inverse of [`ordered_i64`].
#[must_use]
pub fn from_ordered_i64(b: [u8; 8]) -> i64 {
    (u64::from_be_bytes(b) ^ (1 << 63)) as i64
}

/// Appends values to a buffer.
#[derive(Debug, Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn clear(&mut self) {
        self.buf.clear();
    }
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn f64(&mut self, v: f64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// A length-prefixed byte string.
    pub fn bytes(&mut self, v: &[u8]) {
        assert!(u32::try_from(v.len()).is_ok(), "a state value over 4 GiB");
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
    }
}

/// Reads values written by [`Writer`], checking every length.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    #[must_use]
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.buf.len() < n {
            return Err(CodecError(format!(
                "value ends early: wanted {n} more bytes, {} left",
                self.buf.len()
            )));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }
    pub fn i64(&mut self) -> Result<i64, CodecError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    pub fn f64(&mut self) -> Result<f64, CodecError> {
        Ok(f64::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    /// Whether every byte was read.
    #[must_use]
    pub fn is_done(&self) -> bool {
        self.buf.is_empty()
    }
    /// Fails unless every byte was read.
    pub fn finish(self) -> Result<(), CodecError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(CodecError(format!(
                "{} bytes left over after the value",
                self.buf.len()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_i64_sorts_like_numbers() {
        let values = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
        for w in values.windows(2) {
            assert!(ordered_i64(w[0]) < ordered_i64(w[1]));
        }
        for v in values {
            assert_eq!(from_ordered_i64(ordered_i64(v)), v);
        }
    }

    #[test]
    fn reader_rejects_short_and_long_values() {
        let mut w = Writer::default();
        w.i64(-3);
        w.bytes(b"abc");
        let mut r = Reader::new(&w.buf);
        assert_eq!(r.i64().unwrap(), -3);
        assert_eq!(r.bytes().unwrap(), b"abc");
        r.finish().unwrap();
        let mut r = Reader::new(&w.buf[..10]);
        r.i64().unwrap();
        assert!(r.bytes().is_err());
        let r = Reader::new(&w.buf);
        assert!(r.finish().is_err());
    }
}
