//! Schemas from the schema registry, before a pipeline runs: the columns of Avro sources
//! that declare none (the latest schema of their subject), and the Avro schemas of sinks,
//! registered under their subjects, with the codecs built from them.
//!
//! A registry that does not answer at start is retried with backoff for
//! [`REGISTRY_START_TIMEOUT`], then the run stops with exit 2 (nothing has been read, so
//! nothing is lost); an answer that retrying won't change (no such subject, an
//! incompatible schema, bad credentials) stops it at once, with the registry's message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::{Field, SchemaRef};
use laminar_connectors::format::avro::schema::{
    reader_of_schema, record_schema_of, sanitize_name, value_schema_of,
};
use laminar_connectors::format::avro::{
    AvroEncoder, AvroReader, RegistryClient, RegistryError, WriterSchemas,
};
use laminar_connectors::format::{DecoderSpec, json::DecodeColumn};
use laminar_connectors::kafka::{KeyEncoding, ValueEncoding};

use crate::config::{
    FormatConfig, KeyFormat, PipelineConfig, SinkConfig, SinkConnector, SourceConfig,
    SourceConnector,
};

/// How long a registry that does not answer is retried when the pipeline starts.
pub const REGISTRY_START_TIMEOUT: Duration = Duration::from_mins(1);

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("{what}: {source}")]
    Registry {
        what: String,
        #[source]
        source: RegistryError,
    },
    #[error("{what}: {message}")]
    Schema {
        what: String,
        message: String,
        part: Part,
    },
}

/// Which part of a record a schema is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Value,
    Key,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Self::Value => "value",
            Self::Key => "key",
        }
    }
}

/// The pipeline's registry client, when it has a `schema_registry`.
pub fn registry(config: &PipelineConfig) -> Result<Option<Arc<RegistryClient>>, SchemaError> {
    config
        .schema_registry
        .as_ref()
        .map(|r| {
            RegistryClient::new(&r.options)
                .map(Arc::new)
                .map_err(|source| SchemaError::Registry {
                    what: "schema_registry".into(),
                    source,
                })
        })
        .transpose()
}

/// Calls `f` until it answers, retrying transient registry errors with backoff for at
/// most [`REGISTRY_START_TIMEOUT`].
fn with_retry<T>(
    what: &str,
    mut f: impl FnMut() -> Result<T, RegistryError>,
) -> Result<T, SchemaError> {
    let started = Instant::now();
    let mut wait = Duration::from_millis(250);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && started.elapsed() + wait < REGISTRY_START_TIMEOUT => {
                tracing::warn!("{what}: {e}; retrying in {wait:?}");
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(source) => {
                return Err(SchemaError::Registry {
                    what: what.to_owned(),
                    source,
                });
            }
        }
    }
}

/// The columns of the latest schema of `subject` (a single-value schema gives one
/// column, `single_name`), with its defaults and aliases.
fn latest_reader(
    registry: &RegistryClient,
    what: &str,
    subject: &str,
    single_name: &str,
    part: Part,
) -> Result<AvroReader, SchemaError> {
    let latest = with_retry(what, || registry.latest(subject))?;
    let (reader, skipped) =
        reader_of_schema(&latest.schema, single_name).map_err(|message| SchemaError::Schema {
            what: what.to_owned(),
            message,
            part,
        })?;
    if !skipped.is_empty() {
        tracing::warn!(
            subject,
            version = latest.version,
            "{what}: fields that cannot be columns are left out: {}",
            skipped.join(", ")
        );
    }
    tracing::info!(
        subject,
        version = latest.version,
        id = latest.id,
        columns = reader.columns.len(),
        "{what}: from the schema registry"
    );
    Ok(reader)
}

/// Fills in the columns of sources (values and keys) that take them from the registry's
/// latest schema of their subject.
pub fn resolve_sources(
    config: &mut PipelineConfig,
    registry: Option<&RegistryClient>,
) -> Result<(), SchemaError> {
    let Some(registry) = registry else {
        return Ok(());
    };
    for source in &mut config.sources {
        if let Some(subject) = source.columns_from_registry.clone() {
            let what = format!(
                "source `{}`: the columns of subject `{subject}`",
                source.name
            );
            let reader = latest_reader(registry, &what, &subject, "value", Part::Value)?;
            source.columns.clone_from(&reader.columns);
            source.avro_reader = Some(reader);
            source.columns_from_registry = None;
        }
        if let SourceConnector::Kafka { key, .. } = &mut source.connector
            && key.format == KeyFormat::Avro
            && key.columns.is_empty()
        {
            let what = format!(
                "source `{}`: the key columns of subject `{}`",
                source.name, key.subject
            );
            let reader = latest_reader(registry, &what, &key.subject, "_key_value", Part::Key)?;
            key.columns.clone_from(&reader.columns);
            key.reader = Some(reader);
        }
    }
    Ok(())
}

/// What decodes a source's values, and its keys (none for `key_format: string`).
#[must_use]
pub fn source_decoders(
    source: &SourceConfig,
    registry: Option<&Arc<RegistryClient>>,
) -> (DecoderSpec, Option<DecoderSpec>) {
    let writers = |fixed: Option<&Arc<apache_avro::Schema>>| match (registry, fixed) {
        (Some(r), _) => WriterSchemas::Registry(r.clone()),
        (None, Some(s)) => WriterSchemas::Fixed(s.clone()),
        // The loader requires `avro_schema` when there is no registry.
        (None, None) => unreachable!("format avro without a registry or avro_schema"),
    };
    let value = match &source.format {
        FormatConfig::Json => DecoderSpec::Json(source.columns.clone()),
        FormatConfig::Avro { schema, .. } => DecoderSpec::Avro {
            reader: source
                .avro_reader
                .clone()
                .unwrap_or_else(|| AvroReader::from_columns(source.columns.clone())),
            writers: writers(schema.as_ref()),
        },
    };
    let key = match &source.connector {
        SourceConnector::Kafka { key, .. } => match key.format {
            KeyFormat::String => None,
            KeyFormat::Json => Some(DecoderSpec::Json(key.columns.clone())),
            KeyFormat::Avro => Some(DecoderSpec::Avro {
                reader: key
                    .reader
                    .clone()
                    .unwrap_or_else(|| AvroReader::from_columns(key.columns.clone())),
                writers: writers(None),
            }),
        },
        _ => None,
    };
    (value, key)
}

/// The topic a sink writes (its name for sinks that are not Kafka), which names its
/// derived schemas.
fn sink_topic(sink: &SinkConfig) -> &str {
    match &sink.connector {
        SinkConnector::Kafka { topic } => topic,
        _ => &sink.name,
    }
}

fn parse(json: &serde_json::Value) -> Result<apache_avro::Schema, String> {
    apache_avro::Schema::parse_str(&json.to_string()).map_err(|e| e.to_string())
}

/// The Avro schema a sink writes its values with: the given one, or one derived from
/// the columns.
pub fn sink_value_schema(
    sink: &SinkConfig,
    columns: &SchemaRef,
) -> Result<Option<apache_avro::Schema>, String> {
    let FormatConfig::Avro { schema, .. } = &sink.format else {
        return Ok(None);
    };
    if let Some(s) = schema {
        return Ok(Some((**s).clone()));
    }
    let fields: Vec<&Field> = columns.fields().iter().map(AsRef::as_ref).collect();
    let name = format!("{}_value", sanitize_name(sink_topic(sink)));
    parse(&record_schema_of(&name, &fields)?).map(Some)
}

/// The Avro schema of a sink's key columns: one column's type alone, several as a record.
pub fn sink_key_schema(
    sink: &SinkConfig,
    columns: &SchemaRef,
) -> Result<apache_avro::Schema, String> {
    let fields: Vec<&Field> = sink
        .key
        .iter()
        .filter_map(|(k, _)| columns.field_with_name(k).ok())
        .collect();
    match fields.as_slice() {
        [one] => parse(&value_schema_of(one)),
        several => parse(&record_schema_of(
            &format!("{}_key", sanitize_name(sink_topic(sink))),
            several,
        )?),
    }
}

/// The encoder of one part (`value` or `key`) of a sink's records: `schema`, fed by
/// `columns`, registered under `subject` when a registry is given.
fn part_encoder(
    sink: &SinkConfig,
    part: Part,
    schema: Result<apache_avro::Schema, String>,
    columns: &[(usize, &Field)],
    registered: Option<(&RegistryClient, &str)>,
) -> Result<AvroEncoder, SchemaError> {
    let error = |message: String| SchemaError::Schema {
        what: format!("sink `{}`: the Avro {} schema", sink.name, part.name()),
        message,
        part,
    };
    let schema = schema.map_err(error)?;
    let id = match registered {
        Some((registry, subject)) => {
            let json = serde_json::to_value(&schema).map_err(|e| error(e.to_string()))?;
            let id = with_retry(
                &format!("sink `{}`: registering subject `{subject}`", sink.name),
                || registry.register(subject, &json),
            )?;
            tracing::info!(sink = %sink.name, subject, id, "{} schema registered", part.name());
            Some(id)
        }
        None => None,
    };
    AvroEncoder::new(&schema, columns, id).map_err(error)
}

/// The value and key encodings of a Kafka sink, with their schemas registered when
/// `registry` is given (without it, compiled only: what `validate` checks, and plain
/// Avro).
pub fn sink_encodings(
    sink: &SinkConfig,
    columns: &SchemaRef,
    registry: Option<&RegistryClient>,
) -> Result<(ValueEncoding, KeyEncoding), SchemaError> {
    let value = match (&sink.format, sink_value_schema(sink, columns).transpose()) {
        (FormatConfig::Avro { subject, .. }, Some(schema)) => {
            let all: Vec<(usize, &Field)> = columns
                .fields()
                .iter()
                .map(AsRef::as_ref)
                .enumerate()
                .collect();
            let registered = registry.map(|r| (r, subject.as_str()));
            ValueEncoding::Avro(part_encoder(sink, Part::Value, schema, &all, registered)?)
        }
        _ => ValueEncoding::Json,
    };
    let key = match sink.key_format {
        None | Some(KeyFormat::String) => KeyEncoding::Text,
        Some(KeyFormat::Json) => KeyEncoding::Json,
        Some(KeyFormat::Avro) => {
            let key_columns: Vec<(usize, &Field)> = sink
                .key
                .iter()
                .filter_map(|(k, _)| columns.index_of(k).ok().map(|i| (i, columns.field(i))))
                .collect();
            let subject = format!("{}-key", sink_topic(sink));
            let registered = registry.map(|r| (r, subject.as_str()));
            let schema = sink_key_schema(sink, columns);
            KeyEncoding::Avro(part_encoder(
                sink,
                Part::Key,
                schema,
                &key_columns,
                registered,
            )?)
        }
    };
    Ok((value, key))
}

/// Declared columns as a reader without defaults (for explain).
#[must_use]
pub fn describe_columns(columns: &[DecodeColumn]) -> String {
    columns
        .iter()
        .map(|c| {
            format!(
                "{} {}{}",
                c.name,
                c.ty.sql_name(),
                if c.nullable { " NULL" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
