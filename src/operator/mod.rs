//! Operators: what a compiled query runs, one per file.
//!
//! Every operator has the whole lifecycle in one trait: [`Operator::process_batch`] for
//! input rows, [`Operator::handle_watermark`] when event time advances, and
//! [`Operator::handle_tick`] for wall-clock work (periodic emission). Each call appends
//! the batches it emits to `out`; rows too late for their window go to `late`.

pub mod accumulator;
pub mod stateless;
pub mod watermark;
pub mod window;
pub mod window_aggregate;

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{AsArray, RecordBatch, RecordBatchOptions};
use arrow::compute::filter_record_batch;
use arrow::datatypes::SchemaRef;
use datafusion::error::DataFusionError;
use datafusion::physical_expr::PhysicalExpr;

use crate::state::{StateError, StateView};

/// One reactor thread of a query split by key, as metrics see it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReactorSample {
    /// Nanoseconds spent processing since the reactor started.
    pub busy_ns: u64,
    /// Messages waiting in its input ring.
    pub ring_messages: usize,
}

/// Rows of a query split by key, on their way to the reactor that owns their keys: the
/// query's input rows as the reactor that received them prepared them (windows assigned,
/// filtered), their encoded group keys, and the pipeline's watermark as of their batch,
/// against which they were judged on time.
#[derive(Debug)]
pub struct KeyedRows {
    pub rows: RecordBatch,
    pub keys: Option<arrow::row::Rows>,
    pub watermark: i64,
}

/// Rows that arrived after their window closed, with the reason.
#[derive(Debug, Clone)]
pub struct LateRows {
    pub rows: RecordBatch,
    pub reason: String,
}

pub trait Operator: Send {
    /// The query's name.
    fn name(&self) -> &str;
    /// The source or query it reads.
    fn input(&self) -> &str;
    /// The schema of the batches it emits.
    fn schema(&self) -> SchemaRef;
    /// Takes one input batch.
    fn process_batch(
        &mut self,
        batch: &RecordBatch,
        out: &mut Vec<RecordBatch>,
        late: &mut Vec<LateRows>,
    ) -> Result<(), DataFusionError>;
    /// [`Operator::process_batch`] for a batch whose rows have waited since `since`: the
    /// latency an operator on reactor threads records counts from there.
    fn process_batch_since(
        &mut self,
        batch: &RecordBatch,
        since: Instant,
        out: &mut Vec<RecordBatch>,
        late: &mut Vec<LateRows>,
    ) -> Result<(), DataFusionError> {
        let _ = since;
        self.process_batch(batch, out, late)
    }
    /// Event time reached `watermark` (milliseconds; `i64::MAX` at the end of input).
    fn handle_watermark(
        &mut self,
        _watermark: i64,
        _out: &mut Vec<RecordBatch>,
    ) -> Result<(), DataFusionError> {
        Ok(())
    }
    /// Hands out every row emitted for the input taken so far (an operator that works
    /// on other threads waits for them); called before an epoch is committed.
    fn flush(
        &mut self,
        _out: &mut Vec<RecordBatch>,
        _late: &mut Vec<LateRows>,
    ) -> Result<(), DataFusionError> {
        Ok(())
    }
    /// Makes this copy of the query responsible for the groups whose key hashes to shard
    /// `index` of `count` (rows of other keys are routed to their shard by
    /// [`Operator::route_batch`], state of other keys is not restored); false when the
    /// operator cannot be split by key.
    fn shard(&mut self, _index: usize, _count: usize) -> bool {
        false
    }
    /// For a copy made a shard ([`Operator::shard`]): prepares the rows of `batch` for
    /// the update (windows, filters, group keys), moving those late by `watermark` (the
    /// pipeline's, as of this batch) to `late`, and appends what each shard is to fold
    /// in to `routed`, at most one [`KeyedRows`] per shard. Changes no state: the rows
    /// are folded in by [`Operator::process_keyed`], on the owning shard, in input order.
    fn route_batch(
        &mut self,
        _batch: &RecordBatch,
        _watermark: i64,
        _late: &mut Vec<LateRows>,
        _routed: &mut Vec<(usize, KeyedRows)>,
    ) -> Result<(), DataFusionError> {
        Err(DataFusionError::Internal(format!(
            "query `{}` cannot route rows by key",
            self.name()
        )))
    }
    /// Folds in rows [`Operator::route_batch`] routed to this shard (rows of other keys
    /// among them are skipped).
    fn process_keyed(
        &mut self,
        _rows: KeyedRows,
        _out: &mut Vec<RecordBatch>,
        _late: &mut Vec<LateRows>,
    ) -> Result<(), DataFusionError> {
        Err(DataFusionError::Internal(format!(
            "query `{}` cannot take routed rows",
            self.name()
        )))
    }
    /// Time spent waiting for room on another thread (a full reactor ring) since the last
    /// call: backpressure, during which no source could be read.
    fn take_blocked(&mut self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
    /// Per reactor thread, when the operator runs on them: busy time and ring occupancy.
    fn reactors(&self) -> Vec<ReactorSample> {
        Vec::new()
    }
    /// Wall-clock time passed.
    fn handle_tick(
        &mut self,
        _now: Instant,
        _out: &mut Vec<RecordBatch>,
    ) -> Result<(), DataFusionError> {
        Ok(())
    }
    /// Whether it keeps state across batches (and so needs watermarks).
    fn is_stateful(&self) -> bool {
        false
    }
    /// Groups (window x key) held in state now; 0 for stateless operators.
    fn state_groups(&self) -> usize {
        0
    }
    /// Estimated bytes of state held in memory.
    fn state_bytes(&self) -> u64 {
        0
    }
    /// Windows open now: distinct fixed windows, or sessions.
    fn windows_open(&self) -> usize {
        0
    }
    /// Windows closed by the watermark since the operator was built.
    fn windows_closed(&self) -> u64 {
        0
    }
    /// Writes what changed since the last checkpoint into `state` (the operator's own
    /// namespace), so that `state` then holds everything the operator holds.
    fn checkpoint(&mut self, _state: &mut StateView<'_>) -> Result<(), StateError> {
        Ok(())
    }
    /// Starts writing the changes of `epoch` on the threads that hold the state (the
    /// reactors of a query split over them), each into its own WAL when it has one; the
    /// oldest retained checkpoint no longer needs records of reactor WAL `i` below
    /// `retain_from(i)`. `false` when the operator has no such threads: then
    /// [`Operator::checkpoint`] writes into the pipeline's store and WAL.
    fn start_checkpoint(
        &mut self,
        _epoch: u64,
        _retain_from: &dyn Fn(u32) -> u64,
    ) -> Result<bool, StateError> {
        Ok(false)
    }
    /// After [`Operator::start_checkpoint`] returned `true`: each thread's changes, to
    /// apply to the store, with where its WAL ends when it wrote them to one (then they
    /// are durable already).
    fn finish_checkpoint(&mut self) -> Result<Vec<LoggedChanges>, StateError> {
        Ok(Vec::new())
    }
    /// Replaces what the operator holds with what `state` holds.
    fn restore(&mut self, _state: &StateView<'_>) -> Result<(), StateError> {
        Ok(())
    }
    /// The streaming plan, one operator a line.
    fn explain(&self) -> String;
}

/// One thread's state changes for an epoch (see [`Operator::finish_checkpoint`]).
#[derive(Debug)]
pub struct LoggedChanges {
    pub ops: Vec<crate::state::StateOp>,
    /// Where the thread's WAL ends after them; `None`: they are in no WAL yet.
    pub log: Option<crate::durability::ReactorLog>,
}

/// One stateless step, applied in order to each batch.
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

/// The shard (of `count`) that owns a group key, from the Fx hash of its bytes: bits 24
/// to 55, apart from the low bits a hash table indexes by and the top 7 it keeps as tags,
/// so that the keys of one shard still spread over its table. A key's shard depends on
/// nothing but its bytes and the number of shards.
#[must_use]
pub fn shard_of_hash(hash: u64, count: usize) -> usize {
    ((((hash >> 24) & 0xFFFF_FFFF) * count as u64) >> 32) as usize
}

/// Whether any expression of `steps` calls the scalar function `name`.
#[must_use]
pub fn steps_call(steps: &[Step], name: &str) -> bool {
    steps.iter().any(|step| match step {
        Step::Select(_) => false,
        Step::Filter(e) => calls(e, name),
        Step::Project { exprs, .. } => exprs.iter().any(|e| calls(e, name)),
    })
}

/// Whether `expr` calls the scalar function `name` anywhere in it.
#[must_use]
pub fn calls(expr: &Arc<dyn PhysicalExpr>, name: &str) -> bool {
    expr.downcast_ref::<datafusion::physical_expr::ScalarFunctionExpr>()
        .is_some_and(|f| f.name() == name)
        || expr.children().into_iter().any(|c| calls(c, name))
}

/// Which of the `inputs` columns of their input `steps` read at all: those whose values
/// can reach the steps' output (every column of which counts as read).
#[must_use]
pub fn columns_read(steps: &[Step], inputs: usize) -> Vec<bool> {
    // Walks back from the output: what each step needs of its input.
    let mut needed: Option<Vec<bool>> = None;
    for (i, step) in steps.iter().enumerate().rev() {
        let width = if i == 0 {
            inputs
        } else {
            step_input_width(&steps[..i], inputs)
        };
        let mut before = vec![false; width];
        let after = |column: usize| needed.as_ref().is_none_or(|n| n[column]);
        let mut read = |expr: &Arc<dyn PhysicalExpr>| {
            for column in datafusion::physical_expr::utils::collect_columns(expr) {
                before[column.index()] = true;
            }
        };
        match step {
            Step::Select(columns) => {
                for (out, &column) in columns.iter().enumerate() {
                    if after(out) {
                        before[column] = true;
                    }
                }
            }
            Step::Filter(predicate) => {
                read(predicate);
                for (column, b) in before.iter_mut().enumerate() {
                    *b |= after(column);
                }
            }
            Step::Project { exprs, .. } => {
                for (out, expr) in exprs.iter().enumerate() {
                    if after(out) {
                        read(expr);
                    }
                }
            }
        }
        needed = Some(before);
    }
    needed.unwrap_or_else(|| vec![true; inputs])
}

/// The number of columns `steps` output from `inputs` input columns.
fn step_input_width(steps: &[Step], inputs: usize) -> usize {
    steps.iter().fold(inputs, |width, step| match step {
        Step::Select(columns) => columns.len(),
        Step::Filter(_) => width,
        Step::Project { exprs, .. } => exprs.len(),
    })
}

/// Runs `steps` over `batch`.
pub fn run_steps(steps: &[Step], batch: &RecordBatch) -> Result<RecordBatch, DataFusionError> {
    let mut batch = batch.clone();
    for step in steps {
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
                    &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
                )?
            }
        };
    }
    Ok(batch)
}

/// Describes `steps` for `explain`, innermost last, each line indented by `indent`.
#[must_use]
pub fn explain_steps(
    steps: &[Step],
    input_schema: &SchemaRef,
    input: &str,
    indent: &str,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for step in steps.iter().rev() {
        let _ = match step {
            Step::Project { exprs, schema } => {
                let cols: Vec<String> = exprs
                    .iter()
                    .zip(schema.fields())
                    .map(|(e, f)| format!("{e} AS {}", f.name()))
                    .collect();
                writeln!(out, "{indent}Project: {}", cols.join(", "))
            }
            Step::Filter(p) => writeln!(out, "{indent}Filter: {p}"),
            Step::Select(c) => {
                let names: Vec<&str> = c
                    .iter()
                    .filter_map(|&i| input_schema.fields().get(i).map(|f| f.name().as_str()))
                    .collect();
                writeln!(out, "{indent}Scan: {input} columns [{}]", names.join(", "))
            }
        };
    }
    if !steps.iter().any(|s| matches!(s, Step::Select(_))) {
        let _ = writeln!(out, "{indent}Scan: {input}");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::logical_expr::Operator as BinaryOp;
    use datafusion::physical_expr::PhysicalExpr;
    use datafusion::physical_expr::expressions::{BinaryExpr, Column, lit};

    use super::{Step, columns_read};

    fn column(name: &str, index: usize) -> Arc<dyn PhysicalExpr> {
        Arc::new(Column::new(name, index))
    }

    #[test]
    fn columns_read_follows_filters_projections_and_selections_back_to_the_input() {
        assert_eq!(columns_read(&[], 3), vec![true; 3], "no steps: all of it");
        let schema = Arc::new(Schema::new(vec![
            Field::new("b", DataType::Int64, false),
            Field::new("d", DataType::Int64, false),
        ]));
        // WHERE c > 0, then SELECT b, d + 1 of the columns a b c d e.
        let filter = Step::Filter(Arc::new(BinaryExpr::new(
            column("c", 2),
            BinaryOp::Gt,
            lit(0i64),
        )));
        let add = Arc::new(BinaryExpr::new(column("d", 3), BinaryOp::Plus, lit(1i64)));
        let project = Step::Project {
            exprs: vec![column("b", 1), add],
            schema,
        };
        assert_eq!(
            columns_read(&[filter, project], 5),
            vec![false, true, true, true, false]
        );
        // A selection then keeps what the projection after it reads: of a b c, it selects
        // c a, and the projection reads its second column only (a).
        let select = Step::Select(vec![2, 0]);
        let project = Step::Project {
            exprs: vec![column("a", 1)],
            schema: Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, false)])),
        };
        assert_eq!(
            columns_read(&[select, project], 3),
            vec![true, false, false]
        );
    }
}
