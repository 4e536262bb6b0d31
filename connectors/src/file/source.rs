//! Reads a JSON-lines file once. Blank lines are skipped; each other line is one record,
//! its offset the 0-based line number.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};

use crate::format::json::{DecodeColumn, JsonDecoder};
use crate::{
    BATCH_ROWS_MAX, DecodeErrorPolicy, Rejected, Source, SourceBatch, SourceError, SourcePoll,
    SourcePosition,
};

/// A `connector: file` source.
#[derive(Debug, Clone)]
pub struct FileSourceOptions {
    pub name: String,
    /// The JSON-lines file to read.
    pub path: String,
    pub columns: Vec<DecodeColumn>,
    pub on_decode_error: DecodeErrorPolicy,
    /// Rows per batch, at most [`BATCH_ROWS_MAX`].
    pub batch_rows: usize,
}

pub struct FileSource {
    options: FileSourceOptions,
    reader: BufReader<File>,
    schema: SchemaRef,
    decoder: JsonDecoder,
    line: Vec<u8>,
    next_line: i64,
    finished: bool,
}

impl FileSource {
    pub fn new(options: FileSourceOptions) -> Result<Self, SourceError> {
        let file = File::open(&options.path).map_err(|source| SourceError::Io {
            path: options.path.clone(),
            source,
        })?;
        let fields: Vec<_> = options
            .columns
            .iter()
            .map(|c| c.ty.field(&c.name, c.nullable))
            .collect();
        Ok(Self {
            reader: BufReader::with_capacity(1 << 20, file),
            schema: Arc::new(Schema::new(fields)),
            decoder: JsonDecoder::new(options.columns.clone()),
            options,
            line: Vec::new(),
            next_line: 0,
            finished: false,
        })
    }
}

impl FileSource {
    /// Reads the next line into `self.line`; `false` at the end of the file.
    fn read_line(&mut self) -> Result<bool, SourceError> {
        self.line.clear();
        let n = self
            .reader
            .read_until(b'\n', &mut self.line)
            .map_err(|source| SourceError::Io {
                path: self.options.path.clone(),
                source,
            })?;
        Ok(n > 0)
    }
}

impl Source for FileSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn poll(&mut self, _timeout: Duration) -> Result<SourcePoll, SourceError> {
        if self.finished {
            return Ok(SourcePoll::Finished);
        }
        let mut rejected = Vec::new();
        let mut records = 0;
        while records < self.options.batch_rows.clamp(1, BATCH_ROWS_MAX) {
            if !self.read_line()? {
                self.finished = true;
                break;
            }
            let offset = self.next_line;
            self.next_line += 1;
            if self.line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            records += 1;
            if let Err(reason) = self.decoder.decode(&self.line) {
                match self.options.on_decode_error {
                    DecodeErrorPolicy::Fail => {
                        return Err(SourceError::DecodeFailed {
                            topic: self.options.path.clone(),
                            partition: 0,
                            offset,
                            reason,
                        });
                    }
                    DecodeErrorPolicy::Skip | DecodeErrorPolicy::DeadLetter => {
                        let payload = self.line.trim_ascii_end().to_vec();
                        rejected.push(Rejected {
                            topic: self.options.path.clone(),
                            partition: 0,
                            offset,
                            key: None,
                            payload,
                            reason,
                        });
                    }
                }
            }
        }
        if records == 0 {
            return Ok(if self.finished {
                SourcePoll::Finished
            } else {
                SourcePoll::Idle
            });
        }
        let batch =
            RecordBatch::try_new(self.schema.clone(), self.decoder.finish()).map_err(|e| {
                SourceError::Fatal {
                    context: format!("source {}", self.options.name),
                    message: e.to_string(),
                }
            })?;
        Ok(SourcePoll::Batch(SourceBatch {
            batch,
            rejected,
            row_partitions: None,
        }))
    }

    fn positions(&self) -> Vec<SourcePosition> {
        vec![SourcePosition {
            topic: self.options.path.clone(),
            partition: 0,
            next_offset: self.next_line,
        }]
    }

    fn seek(&mut self, positions: &[SourcePosition]) -> Result<(), SourceError> {
        let Some(p) = positions
            .iter()
            .find(|p| p.topic == self.options.path && p.partition == 0)
        else {
            return Ok(());
        };
        while self.next_line < p.next_offset {
            if !self.read_line()? {
                return Err(SourceError::Fatal {
                    context: format!("source {}", self.options.name),
                    message: format!(
                        "{} has {} lines, but the state directory says {} of them were read: \
                         the file was replaced; use a new state.dir to read it from the start",
                        self.options.path, self.next_line, p.next_offset
                    ),
                });
            }
            self.next_line += 1;
        }
        Ok(())
    }

    fn commit(
        &mut self,
        _positions: &[SourcePosition],
        _blocking: bool,
    ) -> Result<(), SourceError> {
        Ok(())
    }
}
