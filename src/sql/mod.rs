//! SQL: each query's text -> `DataFusion` logical plan -> a [`CompiledQuery`] of physical
//! expressions evaluated per record batch.
//!
//! `DataFusion` plans and optimizes a query once, against empty tables that carry the
//! sources' schemas (and earlier queries' output schemas). The optimized plan is then
//! walked and lowered to a short list of [`Step`]s (column selection, filter, projection)
//! whose `PhysicalExpr`s run on every batch: no `DataFusion` job per batch. Plans that are not
//! stateless (aggregations, joins, ORDER BY, LIMIT) are reported as unsupported, with the
//! position of the construct in the pipeline file.
//!
//! Errors carry positions: `DataFusion`'s diagnostics (spans into the SQL) are mapped
//! through the query's [`SqlOrigin`] to `FILE:LINE:COL`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{Schema, SchemaRef};
use datafusion::common::DFSchema;
use datafusion::datasource::empty::EmptyTable;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::execution_props::ExecutionProps;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::physical_expr::{PhysicalExpr, create_physical_expr};
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::config::{
    Diagnostic, Diagnostics, PipelineConfig, Pos, QueryConfig, SourceConfig, SourceConnector, hint,
};

/// One step of a compiled query, applied in order to each batch.
#[derive(Debug)]
pub enum Step {
    /// Keep these columns of the input, in this order.
    Select(Vec<usize>),
    /// Keep the rows for which the predicate is true.
    Filter(Arc<dyn PhysicalExpr>),
    /// Compute the output columns.
    Project {
        exprs: Vec<Arc<dyn PhysicalExpr>>,
        schema: SchemaRef,
    },
}

/// A query lowered to per-batch steps.
#[derive(Debug)]
pub struct CompiledQuery {
    pub name: String,
    /// The source or earlier query it reads.
    pub input: String,
    pub steps: Vec<Step>,
    /// The schema of its input batches.
    pub input_schema: SchemaRef,
    /// The schema of its output batches.
    pub schema: SchemaRef,
}

impl CompiledQuery {
    /// Runs the query on one input batch.
    pub fn process(&self, batch: &RecordBatch) -> Result<RecordBatch, DataFusionError> {
        let mut batch = batch.clone();
        for step in &self.steps {
            batch = match step {
                Step::Select(columns) => batch.project(columns)?,
                Step::Filter(predicate) => {
                    let mask = predicate.evaluate(&batch)?.into_array(batch.num_rows())?;
                    filter_record_batch(&batch, mask.as_boolean())?
                }
                Step::Project { exprs, schema } => {
                    let columns = exprs
                        .iter()
                        .map(|e| e.evaluate(&batch)?.into_array(batch.num_rows()))
                        .collect::<Result<Vec<_>, _>>()?;
                    RecordBatch::try_new_with_options(
                        schema.clone(),
                        columns,
                        &arrow::array::RecordBatchOptions::new()
                            .with_row_count(Some(batch.num_rows())),
                    )?
                }
            };
        }
        Ok(batch)
    }

    /// The streaming plan, one operator a line (for `laminar explain`).
    #[must_use]
    pub fn explain(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "query {} (stateless, emits each input batch's rows as they arrive)",
            self.name
        );
        for step in self.steps.iter().rev() {
            let _ = match step {
                Step::Project { exprs, schema } => {
                    let cols: Vec<String> = exprs
                        .iter()
                        .zip(schema.fields())
                        .map(|(e, f)| format!("{e} AS {}", f.name()))
                        .collect();
                    writeln!(out, "  Project: {}", cols.join(", "))
                }
                Step::Filter(p) => writeln!(out, "  Filter: {p}"),
                Step::Select(c) => {
                    let names: Vec<&str> = c
                        .iter()
                        .filter_map(|&i| {
                            self.input_schema.fields().get(i).map(|f| f.name().as_str())
                        })
                        .collect();
                    writeln!(
                        out,
                        "  Scan: {} columns [{}] (no state)",
                        self.input,
                        names.join(", ")
                    )
                }
            };
        }
        if !self.steps.iter().any(|s| matches!(s, Step::Select(_))) {
            let _ = writeln!(out, "  Scan: {} (no state)", self.input);
        }
        let fields: Vec<String> = self
            .schema
            .fields()
            .iter()
            .map(|f| format!("{} {}", f.name(), f.data_type()))
            .collect();
        let _ = writeln!(out, "  Output: {}", fields.join(", "));
        out
    }
}

/// Every query of a pipeline, compiled, and the schema of every named relation.
#[derive(Debug, Default)]
pub struct PlannedPipeline {
    pub queries: Vec<CompiledQuery>,
    pub schemas: HashMap<String, SchemaRef>,
}

/// The schema a source's batches have.
#[must_use]
pub fn source_schema(source: &SourceConfig) -> Schema {
    match &source.connector {
        SourceConnector::Datagen { table, .. } => table.schema(),
        SourceConnector::Kafka { metadata, .. } => {
            let mut fields: Vec<_> = source
                .columns
                .iter()
                .map(|c| c.ty.field(&c.name, c.nullable))
                .collect();
            fields.extend(metadata.fields());
            Schema::new(fields)
        }
        SourceConnector::File { .. } => Schema::new(
            source
                .columns
                .iter()
                .map(|c| c.ty.field(&c.name, c.nullable))
                .collect::<Vec<_>>(),
        ),
    }
}

/// Plans every query of `config`; every problem is reported with its position.
pub fn plan(config: &PipelineConfig) -> Result<PlannedPipeline, Diagnostics> {
    let mut session = SessionConfig::new().with_target_partitions(1);
    session.options_mut().sql_parser.collect_spans = true;
    let ctx = SessionContext::new_with_config(session);
    let mut planned = PlannedPipeline::default();
    let mut diagnostics = Vec::new();
    for source in &config.sources {
        let schema = Arc::new(source_schema(source));
        register(&ctx, &source.name, schema.clone());
        planned.schemas.insert(source.name.clone(), schema);
    }
    for query in &config.queries {
        match compile(&ctx, query, &planned) {
            Ok(compiled) => {
                register(&ctx, &query.name, compiled.schema.clone());
                planned
                    .schemas
                    .insert(query.name.clone(), compiled.schema.clone());
                planned.queries.push(compiled);
            }
            Err((pos, message)) => diagnostics.push(Diagnostic {
                file: config.file.clone(),
                pos,
                message: format!("query `{}`: {message}", query.name),
            }),
        }
    }
    check_sink_keys(config, &planned, &mut diagnostics);
    if diagnostics.is_empty() {
        Ok(planned)
    } else {
        Err(Diagnostics(diagnostics))
    }
}

fn register(ctx: &SessionContext, name: &str, schema: SchemaRef) {
    // Registering an EmptyTable under a fresh, validated name cannot fail.
    let registered = ctx.register_table(name, Arc::new(EmptyTable::new(schema)));
    debug_assert!(registered.is_ok(), "register {name}: {registered:?}");
}

fn check_sink_keys(
    config: &PipelineConfig,
    planned: &PlannedPipeline,
    diagnostics: &mut Vec<Diagnostic>,
) {
    for sink in &config.sinks {
        let Some(schema) = planned.schemas.get(&sink.from) else {
            continue;
        };
        for (column, pos) in &sink.key {
            if schema.index_of(column).is_err() {
                let h = hint(column, schema.fields().iter().map(|f| f.name().as_str()));
                diagnostics.push(Diagnostic {
                    file: config.file.clone(),
                    pos: *pos,
                    message: format!(
                        "key column `{column}` is not an output column of `{}`{h}",
                        sink.from
                    ),
                });
            }
        }
    }
}

type PlanError = (Pos, String);

fn compile(
    ctx: &SessionContext,
    query: &QueryConfig,
    planned: &PlannedPipeline,
) -> Result<CompiledQuery, PlanError> {
    let origin = &query.sql_origin;
    let at_start = origin.map(1, 1);
    let state = ctx.state();
    let logical = futures::executor::block_on(state.create_logical_plan(&query.sql))
        .and_then(|p| state.optimize(&p))
        .map_err(|e| describe(&e, query, planned))?;
    let mut steps = Vec::new();
    let mut input = None;
    lower(&logical, &mut steps, &mut input).map_err(|construct| {
        let pos = find_keyword(query, construct.keyword).unwrap_or(at_start);
        (
            pos,
            format!(
                "{} is not supported in a stateless query{}",
                construct.name, construct.note
            ),
        )
    })?;
    let input = input.ok_or_else(|| (at_start, "the query reads no source or query".to_owned()))?;
    let schema = Arc::new(logical.schema().as_arrow().clone());
    let input_schema = planned
        .schemas
        .get(&input)
        .cloned()
        .ok_or_else(|| (at_start, format!("`{input}` is no source or query")))?;
    Ok(CompiledQuery {
        name: query.name.clone(),
        input,
        steps,
        input_schema,
        schema,
    })
}

struct Unsupported {
    name: String,
    keyword: &'static str,
    note: &'static str,
}

/// Lowers `plan` into `steps` (inputs first). Returns what cannot be lowered.
fn lower(
    plan: &LogicalPlan,
    steps: &mut Vec<Step>,
    input: &mut Option<String>,
) -> Result<(), Unsupported> {
    let unsupported = |keyword: &'static str, note: &'static str| Unsupported {
        name: match plan {
            LogicalPlan::Aggregate(_) => {
                "aggregation (GROUP BY or an aggregate function)".to_owned()
            }
            LogicalPlan::Window(_) => "a window function (OVER)".to_owned(),
            other => other
                .display()
                .to_string()
                .split(':')
                .next()
                .unwrap_or("this")
                .to_owned(),
        },
        keyword,
        note,
    };
    match plan {
        LogicalPlan::TableScan(scan) => {
            *input = Some(scan.table_name.table().to_owned());
            if let Some(projection) = &scan.projection {
                let all: Vec<usize> = (0..scan.source.schema().fields().len()).collect();
                if *projection != all {
                    steps.push(Step::Select(projection.clone()));
                }
            }
            if !scan.filters.is_empty() || scan.fetch.is_some() {
                return Err(unsupported("WHERE", ""));
            }
            Ok(())
        }
        LogicalPlan::Filter(filter) => {
            lower(&filter.input, steps, input)?;
            let predicate = physical(&filter.predicate, filter.input.schema())
                .map_err(|_| unsupported("WHERE", ""))?;
            steps.push(Step::Filter(predicate));
            Ok(())
        }
        LogicalPlan::Projection(projection) => {
            lower(&projection.input, steps, input)?;
            let exprs = projection
                .expr
                .iter()
                .map(|e| physical(e, projection.input.schema()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| unsupported("SELECT", ""))?;
            steps.push(Step::Project {
                exprs,
                schema: Arc::new(projection.schema.as_arrow().clone()),
            });
            Ok(())
        }
        LogicalPlan::SubqueryAlias(alias) => lower(&alias.input, steps, input),
        LogicalPlan::Aggregate(_) => Err(unsupported(
            "GROUP BY",
            " (windowed aggregations with TUMBLE/HOP/SESSION come with the windowing engine)",
        )),
        LogicalPlan::Join(_) => Err(unsupported("JOIN", "")),
        LogicalPlan::Sort(_) => Err(unsupported("ORDER BY", " (a stream has no end to sort by)")),
        LogicalPlan::Limit(_) => Err(unsupported("LIMIT", "")),
        LogicalPlan::Window(_) => Err(unsupported("OVER", "")),
        LogicalPlan::Distinct(_) => Err(unsupported("DISTINCT", "")),
        LogicalPlan::Union(_) => Err(unsupported("UNION", "")),
        LogicalPlan::Values(_) | LogicalPlan::EmptyRelation(_) => Err(unsupported(
            "SELECT",
            " (the query must read a source or query)",
        )),
        _ => Err(unsupported("SELECT", "")),
    }
}

fn physical(expr: &Expr, schema: &DFSchema) -> Result<Arc<dyn PhysicalExpr>, DataFusionError> {
    create_physical_expr(
        expr,
        schema,
        &ExecutionProps::new(),
        &PhysicalPlanningContext::default(),
    )
}

/// Finds `keyword` (case-insensitive, whole word) in the query's SQL and maps it to the file.
fn find_keyword(query: &QueryConfig, keyword: &str) -> Option<Pos> {
    let upper_kw = keyword.to_ascii_uppercase();
    for (i, line) in query.sql.lines().enumerate() {
        let upper = line.to_ascii_uppercase();
        if let Some(byte) = upper.find(&upper_kw) {
            let col = line[..byte].chars().count() + 1;
            return Some(query.sql_origin.map(i as u64 + 1, col as u64));
        }
    }
    None
}

/// A `DataFusion` planning error as a position and a one-line message, with a
/// did-you-mean hint for unknown tables and columns.
fn describe(error: &DataFusionError, query: &QueryConfig, planned: &PlannedPipeline) -> PlanError {
    let origin = &query.sql_origin;
    let mut pos = origin.map(1, 1);
    let mut message;
    if let Some(d) = error.diagnostic() {
        message = d.message.clone();
        let span = d.span.or_else(|| d.notes.iter().find_map(|n| n.span));
        if let Some(span) = span {
            pos = origin.map(span.start.line, span.start.column);
        }
        let notes: Vec<&str> = d.notes.iter().map(|n| n.message.as_str()).collect();
        if !notes.is_empty() {
            let _ = write!(message, " ({})", notes.join(", "));
        }
        for help in &d.helps {
            let _ = write!(message, "; {}", help.message);
        }
    } else {
        let text = error.strip_backtrace();
        message = text.lines().next().unwrap_or_default().to_owned();
        // sqlparser reports "... at Line: X, Column: Y".
        if let Some(at) = message.find(" at Line: ") {
            let nums: Vec<u64> = message[at..]
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|s| s.parse().ok())
                .collect();
            if let [line, column, ..] = nums.as_slice() {
                pos = origin.map(*line, *column);
            }
            message.truncate(at);
        }
        if let Some(rest) = message.strip_prefix("SQL error: ParserError(\"") {
            message = format!(
                "syntax error: {}",
                rest.trim_end_matches("\")")
                    .replace("Expected: ", "expected ")
                    .replace("found: ", "found ")
            );
        }
    }
    let quoted = message.split('\'').nth(1).unwrap_or_default().to_owned();
    if message.starts_with("table '") && message.contains("not found") {
        message.push_str(&hint(&quoted, planned.schemas.keys().map(String::as_str)));
    } else if message.starts_with("column '")
        && message.contains("not found")
        && !message.contains("possible column")
    {
        let columns: Vec<&str> = planned
            .schemas
            .values()
            .flat_map(|s| s.fields().iter().map(|f| f.name().as_str()))
            .collect();
        message.push_str(&hint(&quoted, columns));
    }
    (pos, message)
}
