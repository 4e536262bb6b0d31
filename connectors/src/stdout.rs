//! `connector: stdout`: JSON lines on standard output, for trying pipelines out.

use std::io::{self, Write};
use std::time::Duration;

use arrow::array::RecordBatch;

use crate::file::sink::encode_lines;
use crate::format::json::JsonEncoder;
use crate::{FlushOutcome, Sink, SinkError};

#[derive(Default)]
pub struct StdoutSink {
    encoder: JsonEncoder,
    buf: Vec<u8>,
    ends: Vec<usize>,
}

fn io_error(source: io::Error) -> SinkError {
    SinkError::Io {
        path: "<stdout>".to_owned(),
        source,
    }
}

impl Sink for StdoutSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        encode_lines(&mut self.encoder, batch, &mut self.buf, &mut self.ends)?;
        io::stdout().lock().write_all(&self.buf).map_err(io_error)
    }

    fn flush(&mut self, _timeout: Duration) -> Result<FlushOutcome, SinkError> {
        io::stdout().lock().flush().map_err(io_error)?;
        Ok(FlushOutcome::Done)
    }
}
