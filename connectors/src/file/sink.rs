//! Appends JSON lines to a file; `flush` writes the buffer and `fdatasync`s.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::time::Duration;

use arrow::array::RecordBatch;

use crate::format::json::JsonEncoder;
use crate::{FlushOutcome, Sink, SinkError};

/// A `connector: file` sink.
#[derive(Debug, Clone)]
pub struct FileSinkOptions {
    pub name: String,
    /// The file to append to; created when missing, with its parent directories.
    pub path: String,
}

pub struct FileSink {
    path: String,
    out: BufWriter<File>,
    encoder: JsonEncoder,
    buf: Vec<u8>,
    ends: Vec<usize>,
}

impl FileSink {
    pub fn new(options: &FileSinkOptions) -> Result<Self, SinkError> {
        let io = |source| SinkError::Io {
            path: options.path.clone(),
            source,
        };
        if let Some(parent) = std::path::Path::new(&options.path).parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&options.path)
            .map_err(io)?;
        Ok(Self {
            path: options.path.clone(),
            out: BufWriter::with_capacity(1 << 20, file),
            encoder: JsonEncoder::default(),
            buf: Vec::new(),
            ends: Vec::new(),
        })
    }
}

/// Encodes `batch` as JSON lines into `buf` (cleared first).
pub(crate) fn encode_lines(
    encoder: &mut JsonEncoder,
    batch: &RecordBatch,
    buf: &mut Vec<u8>,
    ends: &mut Vec<usize>,
) -> Result<(), SinkError> {
    buf.clear();
    ends.clear();
    // Encode rows back to back, then splice newlines in one pass from the end.
    encoder
        .encode(batch, None, buf, ends)
        .map_err(SinkError::Encode)?;
    let mut lines = Vec::with_capacity(buf.len() + ends.len());
    let mut start = 0;
    for &end in ends.iter() {
        lines.extend_from_slice(&buf[start..end]);
        lines.push(b'\n');
        start = end;
    }
    *buf = lines;
    Ok(())
}

impl Sink for FileSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        encode_lines(&mut self.encoder, batch, &mut self.buf, &mut self.ends)?;
        self.out
            .write_all(&self.buf)
            .map_err(|source| SinkError::Io {
                path: self.path.clone(),
                source,
            })
    }

    fn flush(&mut self, _timeout: Duration) -> Result<FlushOutcome, SinkError> {
        let io = |source| SinkError::Io {
            path: self.path.clone(),
            source,
        };
        self.out.flush().map_err(io)?;
        self.out.get_ref().sync_data().map_err(io)?;
        Ok(FlushOutcome::Done)
    }
}
