//! `connector: file`: JSON lines. As a source it reads the file once, from the start, and
//! is then finished (a bounded source); as a sink it appends one object per line and
//! `fdatasync`s at every flush.

pub(crate) mod sink;
mod source;

pub use sink::{FileSink, FileSinkOptions};
pub use source::{FileSource, FileSourceOptions};
