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

pub mod current_watermark;
pub mod window;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use arrow::datatypes::{DataType, Schema, SchemaRef};
use datafusion::common::DFSchema;
use datafusion::datasource::empty::EmptyTable;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::execution_props::ExecutionProps;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan};
use datafusion::physical_expr::{PhysicalExpr, create_physical_expr};
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::config::{
    Diagnostic, Diagnostics, EmitPolicy, PipelineConfig, Pos, QueryConfig, SourceConfig,
    SourceConnector, hint,
};
use crate::operator::accumulator::{AggregateFunction, AggregateSpec, ValueKind};
use crate::operator::stateless::StatelessOperator;
use crate::operator::window_aggregate::{
    GroupColumn, WindowAggregateOperator, WindowAggregatePlan,
};
use crate::operator::{Operator, Step};
use laminar_connectors::format::ColumnType;
use laminar_connectors::format::types::EpochUnit;

/// Every query of a pipeline, compiled, and the schema of every named relation.
#[derive(Default)]
pub struct PlannedPipeline {
    pub queries: Vec<Box<dyn Operator>>,
    pub schemas: HashMap<String, SchemaRef>,
    /// What `CURRENT_WATERMARK()` reads; the engine keeps it current.
    pub watermark: current_watermark::WatermarkCell,
}

/// The schema a source's batches have.
#[must_use]
pub fn source_schema(source: &SourceConfig) -> Schema {
    match &source.connector {
        SourceConnector::Datagen { table, .. } => table.schema(),
        connector @ SourceConnector::Kafka { .. } => Schema::new(
            crate::config::all_columns(&source.columns, connector)
                .iter()
                .map(|c| c.ty.field(&c.name, c.nullable))
                .collect::<Vec<_>>(),
        ),
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
    let watermark = current_watermark::WatermarkCell::default();
    watermark.store(
        crate::operator::watermark::WATERMARK_NONE,
        std::sync::atomic::Ordering::Relaxed,
    );
    plan_sharing(config, watermark)
}

/// Plans every query again, `CURRENT_WATERMARK()` reading `watermark`: the copies a
/// query split over reactors runs on.
pub fn plan_sharing(
    config: &PipelineConfig,
    watermark: current_watermark::WatermarkCell,
) -> Result<PlannedPipeline, Diagnostics> {
    let mut session = SessionConfig::new().with_target_partitions(1);
    session.options_mut().sql_parser.collect_spans = true;
    let ctx = SessionContext::new_with_config(session);
    let mut planned = PlannedPipeline {
        watermark,
        ..PlannedPipeline::default()
    };
    ctx.register_udf(current_watermark::udf(planned.watermark.clone()));
    let mut diagnostics = Vec::new();
    for source in &config.sources {
        let schema = Arc::new(source_schema(source));
        register(&ctx, &source.name, schema.clone());
        planned.schemas.insert(source.name.clone(), schema);
    }
    for query in &config.queries {
        match compile(&ctx, config, query, &planned) {
            Ok(compiled) => {
                register(&ctx, &query.name, compiled.schema());
                planned
                    .schemas
                    .insert(query.name.clone(), compiled.schema());
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
        let mut error = |pos: Pos, message: String| {
            diagnostics.push(Diagnostic {
                file: config.file.clone(),
                pos,
                message,
            });
        };
        let names = || schema.fields().iter().map(|f| f.name().as_str());
        let mut missing = false;
        let referenced = sink.key.iter().map(|(c, p)| (c, p));
        for (column, pos) in referenced.chain(sink.headers.iter().map(|(_, c, p)| (c, p))) {
            if schema.index_of(column).is_err() {
                missing = true;
                let h = hint(column, names());
                error(
                    *pos,
                    format!(
                        "column `{column}` is not an output column of `{}`{h}",
                        sink.from
                    ),
                );
            }
        }
        if let Some((column, pos)) = &sink.timestamp {
            match schema.field_with_name(column) {
                Err(_) => {
                    missing = true;
                    let h = hint(column, names());
                    error(
                        *pos,
                        format!(
                            "timestamp column `{column}` is not an output column of `{}`{h}",
                            sink.from
                        ),
                    );
                }
                Ok(f) if !matches!(f.data_type(), DataType::Timestamp(..) | DataType::Int64) => {
                    error(
                        *pos,
                        format!(
                            "timestamp column `{column}` is {}; it must be a TIMESTAMP or BIGINT (epoch milliseconds)",
                            f.data_type()
                        ),
                    );
                }
                Ok(_) => {}
            }
        }
        // Avro codecs compile now (registration waits for the run).
        if !missing && let Err(e) = crate::engine::schemas::sink_encodings(sink, schema, None) {
            let pos = match &e {
                crate::engine::schemas::SchemaError::Schema {
                    part: crate::engine::schemas::Part::Key,
                    ..
                } => sink.key_format_pos,
                _ => sink.format_pos,
            };
            error(pos, e.to_string());
        }
    }
}

type PlanError = (Pos, String);

fn compile(
    ctx: &SessionContext,
    config: &PipelineConfig,
    query: &QueryConfig,
    planned: &PlannedPipeline,
) -> Result<Box<dyn Operator>, PlanError> {
    let origin = &query.sql_origin;
    let at_start = origin.map(1, 1);
    let state = ctx.state();
    let (sql, emit_clause) = window::take_emit(&query.sql)
        .map_err(|m| (find_keyword(query, "EMIT").unwrap_or(at_start), m))?;
    let emit = emit_clause.unwrap_or(query.emit);
    let dialect = state.config().options().sql_parser.dialect;
    let mut statement = state
        .sql_to_statement(&sql, &dialect)
        .map_err(|e| describe(&e, query, planned))?;
    let calls =
        window::rewrite_windows(&mut statement, &|e| window::interval_ms(ctx, e)).map_err(|m| {
            let at = ["TUMBLE", "HOP", "SESSION"]
                .iter()
                .find_map(|k| find_keyword(query, k))
                .unwrap_or(at_start);
            (at, m)
        })?;
    for call in &calls {
        let Some(input_schema) = planned.schemas.get(&call.input) else {
            let h = hint(&call.input, planned.schemas.keys().map(String::as_str));
            return Err((
                find_keyword(query, &call.input).unwrap_or(at_start),
                format!("`{}` is no source or query{h}", call.input),
            ));
        };
        let mut fields: Vec<_> = input_schema.fields().iter().cloned().collect();
        fields.push(Arc::new(
            ColumnType::Timestamp(EpochUnit::Millis).field("window_start", false),
        ));
        fields.push(Arc::new(
            ColumnType::Timestamp(EpochUnit::Millis).field("window_end", false),
        ));
        register(ctx, &call.table, Arc::new(Schema::new(fields)));
    }
    let logical = futures::executor::block_on(state.statement_to_plan(statement))
        .and_then(|p| state.optimize(&p));
    for call in &calls {
        let _ = ctx.deregister_table(call.table.as_str());
    }
    let logical = logical.map_err(|e| describe(&e, query, planned))?;
    let unsupported_at = |construct: Unsupported| {
        let pos = find_keyword(query, construct.keyword).unwrap_or(at_start);
        (
            pos,
            format!("{} is not supported{}", construct.name, construct.note),
        )
    };
    let schema = Arc::new(logical.schema().as_arrow().clone());
    let mut post_steps = Vec::new();
    let aggregate = find_aggregate(&logical, &mut post_steps).map_err(unsupported_at)?;
    let Some(aggregate) = aggregate else {
        if !calls.is_empty() {
            return Err((
                find_keyword(query, "FROM").unwrap_or(at_start),
                "a window (TUMBLE, HOP, SESSION) needs GROUP BY window_start, window_end"
                    .to_owned(),
            ));
        }
        let mut steps = Vec::new();
        let mut input = None;
        lower(&logical, &mut steps, &mut input).map_err(unsupported_at)?;
        let input =
            input.ok_or_else(|| (at_start, "the query reads no source or query".to_owned()))?;
        let input_schema = planned
            .schemas
            .get(&input)
            .cloned()
            .ok_or_else(|| (at_start, format!("`{input}` is no source or query")))?;
        return Ok(Box::new(StatelessOperator {
            name: query.name.clone(),
            input,
            steps,
            input_schema,
            schema,
        }));
    };
    let mut pre_steps = Vec::new();
    let mut table = None;
    lower(&aggregate.input, &mut pre_steps, &mut table).map_err(unsupported_at)?;
    let Some(call) = table.and_then(|t| calls.iter().find(|c| c.table == t)) else {
        return Err((
            find_keyword(query, "GROUP BY").unwrap_or(at_start),
            "aggregation needs a window: FROM TUMBLE(source, time_column, size), HOP(...) or SESSION(...) and GROUP BY window_start, window_end".to_owned(),
        ));
    };
    let plan = window_plan(
        config, query, planned, call, aggregate, pre_steps, post_steps, schema, emit,
    )?;
    WindowAggregateOperator::new(plan)
        .map(|o| Box::new(o) as Box<dyn Operator>)
        .map_err(|e| (at_start, e.strip_backtrace()))
}

/// Walks down from the top of a plan through projections and filters (collected as
/// steps, innermost first) to an Aggregate, if there is one.
fn find_aggregate<'a>(
    plan: &'a LogicalPlan,
    steps: &mut Vec<Step>,
) -> Result<Option<&'a Aggregate>, Unsupported> {
    let found = match plan {
        LogicalPlan::Aggregate(a) => return Ok(Some(a)),
        LogicalPlan::Projection(p) => find_aggregate(&p.input, steps)?,
        LogicalPlan::Filter(f) => find_aggregate(&f.input, steps)?,
        LogicalPlan::SubqueryAlias(a) => find_aggregate(&a.input, steps)?,
        _ => return Ok(None),
    };
    if found.is_some() {
        match plan {
            LogicalPlan::Projection(p) => {
                let exprs = p
                    .expr
                    .iter()
                    .map(|e| physical(e, p.input.schema()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| Unsupported {
                        name: "this SELECT list".into(),
                        keyword: "SELECT",
                        note: "",
                    })?;
                steps.push(Step::Project {
                    exprs,
                    schema: Arc::new(p.schema.as_arrow().clone()),
                });
            }
            LogicalPlan::Filter(f) => {
                let predicate =
                    physical(&f.predicate, f.input.schema()).map_err(|_| Unsupported {
                        name: "this HAVING clause".into(),
                        keyword: "HAVING",
                        note: "",
                    })?;
                steps.push(Step::Filter(predicate));
            }
            _ => {}
        }
    }
    Ok(found)
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call site; the pieces of one plan"
)]
fn window_plan(
    config: &PipelineConfig,
    query: &QueryConfig,
    planned: &PlannedPipeline,
    call: &window::WindowCall,
    aggregate: &Aggregate,
    pre_steps: Vec<Step>,
    post_steps: Vec<Step>,
    schema: SchemaRef,
    emit: EmitPolicy,
) -> Result<WindowAggregatePlan, PlanError> {
    let at_start = query.sql_origin.map(1, 1);
    let at_window = ["TUMBLE", "HOP", "SESSION"]
        .iter()
        .find_map(|k| find_keyword(query, k))
        .unwrap_or(at_start);
    let at_group = find_keyword(query, "GROUP BY").unwrap_or(at_start);
    let input_schema = planned
        .schemas
        .get(&call.input)
        .cloned()
        .ok_or_else(|| (at_window, format!("`{}` is no source", call.input)))?;
    let Some(source) = config.sources.iter().find(|s| s.name == call.input) else {
        return Err((
            at_window,
            format!(
                "windows read a source directly for now; `{}` is a query",
                call.input
            ),
        ));
    };
    let Some(event_time) = &source.event_time else {
        return Err((
            at_window,
            format!(
                "source `{}` has no `event_time`: a window needs its watermark (add event_time: {{ column: {} }})",
                source.name, call.time_column
            ),
        ));
    };
    if event_time.column != call.time_column {
        return Err((
            at_window,
            format!(
                "the window is on `{}` but the watermark of `{}` is on `{}`",
                call.time_column, source.name, event_time.column
            ),
        ));
    }
    let time_column = input_schema.index_of(&call.time_column).map_err(|_| {
        let h = hint(
            &call.time_column,
            input_schema.fields().iter().map(|f| f.name().as_str()),
        );
        (
            at_window,
            format!("no column `{}` in `{}`{h}", call.time_column, call.input),
        )
    })?;
    if !matches!(
        input_schema.field(time_column).data_type(),
        DataType::Timestamp(..) | DataType::Int64
    ) {
        return Err((
            at_window,
            format!(
                "the time column `{}` must be TIMESTAMP or BIGINT",
                call.time_column
            ),
        ));
    }
    let agg_input = aggregate.input.schema();
    let agg_input_arrow = agg_input.as_arrow();
    let mut keys = Vec::new();
    let mut key_types = Vec::new();
    let mut group_layout = Vec::new();
    for expr in &aggregate.group_expr {
        match expr {
            Expr::Column(c) if c.name == "window_start" => {
                group_layout.push(GroupColumn::WindowStart);
            }
            Expr::Column(c) if c.name == "window_end" => group_layout.push(GroupColumn::WindowEnd),
            Expr::GroupingSet(_) => {
                return Err((
                    at_group,
                    "GROUPING SETS, CUBE and ROLLUP are not supported".to_owned(),
                ));
            }
            other => {
                let physical =
                    physical(other, agg_input).map_err(|e| (at_group, e.strip_backtrace()))?;
                let t = physical
                    .data_type(agg_input_arrow)
                    .map_err(|e| (at_group, e.strip_backtrace()))?;
                group_layout.push(GroupColumn::Key(keys.len()));
                keys.push(physical);
                key_types.push(t);
            }
        }
    }
    if !group_layout
        .iter()
        .any(|g| matches!(g, GroupColumn::WindowStart | GroupColumn::WindowEnd))
    {
        return Err((
            at_group,
            "a windowed aggregation must GROUP BY window_start (and window_end)".to_owned(),
        ));
    }
    let window_start_column = agg_input_arrow.index_of("window_start").ok();
    let window_end_column = agg_input_arrow.index_of("window_end").ok();
    let aggregate_schema = Arc::new(aggregate.schema.as_arrow().clone());
    let mut args = Vec::new();
    let mut aggregates = Vec::new();
    let mut aggregate_names = Vec::new();
    for (i, expr) in aggregate.aggr_expr.iter().enumerate() {
        let (spec, arg) = aggregate_spec(
            expr,
            agg_input,
            aggregate_schema
                .field(aggregate.group_expr.len() + i)
                .data_type(),
        )
        .map_err(|m| {
            (
                find_keyword(query, &expr.schema_name().to_string()).unwrap_or(at_start),
                m,
            )
        })?;
        aggregate_names.push(expr.schema_name().to_string());
        aggregates.push(spec);
        args.push(arg);
    }
    let window_schema = {
        let mut fields: Vec<_> = input_schema.fields().iter().cloned().collect();
        fields.push(Arc::new(
            ColumnType::Timestamp(EpochUnit::Millis).field("window_start", false),
        ));
        fields.push(Arc::new(
            ColumnType::Timestamp(EpochUnit::Millis).field("window_end", false),
        ));
        Arc::new(Schema::new(fields))
    };
    Ok(WindowAggregatePlan {
        name: query.name.clone(),
        input: call.input.clone(),
        input_schema,
        kind: call.kind,
        time_column,
        time_column_name: call.time_column.clone(),
        window_schema,
        pre_steps,
        window_start_column,
        window_end_column,
        keys,
        key_types,
        group_layout,
        args,
        aggregates,
        aggregate_names,
        aggregate_schema,
        post_steps,
        schema,
        emit,
        allowed_lateness_ms: i64::try_from(query.allowed_lateness_ms).unwrap_or(i64::MAX),
        watermark_source: source.name.clone(),
        watermark_delay_ms: event_time.watermark_delay_ms,
        watermark_idle_timeout_ms: event_time.idle_timeout_ms,
        watermark_max_drift_ms: event_time.max_drift_ms,
        state_bytes_max: config.state.memory_bytes_max,
    })
}

/// Maps one `DataFusion` aggregate call to an incremental aggregate and its argument.
fn aggregate_spec(
    expr: &Expr,
    input: &DFSchema,
    output_type: &DataType,
) -> Result<(AggregateSpec, Option<Arc<dyn PhysicalExpr>>), String> {
    let expr = match expr {
        Expr::Alias(a) => a.expr.as_ref(),
        e => e,
    };
    let Expr::AggregateFunction(call) = expr else {
        return Err(format!("`{expr}` is not an aggregate function"));
    };
    let params = &call.params;
    if params.filter.is_some() || !params.order_by.is_empty() {
        return Err("FILTER and ORDER BY inside aggregates are not supported".to_owned());
    }
    let name = call.func.name().to_ascii_lowercase();
    let arg = params.args.first();
    let star = matches!(arg, None | Some(Expr::Literal(..)));
    let function = match (name.as_str(), params.distinct) {
        ("count", false) if star => AggregateFunction::CountStar,
        ("count", false) => AggregateFunction::Count,
        ("count", true) => AggregateFunction::CountDistinct,
        ("sum", false) => AggregateFunction::Sum,
        ("min", _) => AggregateFunction::Min,
        ("max", _) => AggregateFunction::Max,
        ("avg" | "mean", false) => AggregateFunction::Avg,
        (other, distinct) => {
            return Err(format!(
                "aggregate `{other}{}` cannot be computed incrementally; supported: COUNT, COUNT(DISTINCT), SUM, MIN, MAX, AVG",
                if distinct { " DISTINCT" } else { "" }
            ));
        }
    };
    let (physical_arg, input_type) = match (function, arg) {
        (AggregateFunction::CountStar, _) | (_, None) => (None, DataType::Null),
        (_, Some(a)) => {
            let p = physical(a, input).map_err(|e| e.strip_backtrace())?;
            let t = p
                .data_type(input.as_arrow())
                .map_err(|e| e.strip_backtrace())?;
            (Some(p), t)
        }
    };
    let kind = match function {
        AggregateFunction::CountStar => ValueKind::Int,
        _ => ValueKind::of(&input_type)
            .ok_or_else(|| format!("`{name}` over {input_type} is not supported"))?,
    };
    if matches!(function, AggregateFunction::Sum | AggregateFunction::Avg)
        && kind == ValueKind::Text
    {
        return Err(format!("`{name}` needs numbers, not {input_type}"));
    }
    Ok((
        AggregateSpec {
            function,
            kind,
            input_type,
            output_type: output_type.clone(),
        },
        physical_arg,
    ))
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
            " below another aggregation or a join",
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
