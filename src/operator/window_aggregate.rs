//! The windowed aggregation: `GROUP BY window_start, window_end, keys...` over TUMBLE,
//! HOP or SESSION windows, with incremental aggregates and an EMIT policy.
//!
//! Per input batch: each row is assigned its windows (one for TUMBLE, `size / slide` for
//! HOP, its own `[t, t + gap)` for SESSION, merged per key with every session it touches),
//! the query's WHERE runs on the assigned rows, and each (window, key) group's
//! accumulators are updated in place. Rows whose window has already closed (its end plus
//! `allowed_lateness_ms` is at or below the watermark) are late: counted and handed back.
//!
//! Emission: `on_window_close` emits each group once, when the watermark passes its end
//! plus the allowed lateness; `on_update` emits the current row of every group a batch
//! changed (an upsert stream keyed by the group); `every_ms` emits changed groups
//! periodically and once more at close. A closed window's state is dropped at once, so
//! state holds only open windows.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, TimestampMillisecondArray, UInt32Array,
};
use arrow::compute::{cast, filter_record_batch, take};
use arrow::datatypes::{DataType, Int64Type, SchemaRef, TimestampMillisecondType};
use arrow::row::{RowConverter, Rows};
use datafusion::error::DataFusionError;
use datafusion::physical_expr::PhysicalExpr;
use rustc_hash::FxHashMap;

use super::accumulator::{Acc, AggregateSpec, ArgValues};
use super::window::WindowKind;
use super::{KeyedRows, LateRows, Operator, Step, explain_steps, run_steps};
use crate::config::EmitPolicy;
use crate::state::codec::{CodecError, Reader, Writer, from_ordered_i64, ordered_i64};
use crate::state::{StateError, StateView};
use laminar_connectors::format::types::TIMESTAMP_TZ;

/// Where each column of the aggregate's output comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupColumn {
    WindowStart,
    WindowEnd,
    Key(usize),
}

/// Everything the planner decided for one windowed aggregation.
pub struct WindowAggregatePlan {
    pub name: String,
    pub input: String,
    pub input_schema: SchemaRef,
    pub kind: WindowKind,
    /// Index of the event-time column in the input batches.
    pub time_column: usize,
    pub time_column_name: String,
    /// The input plus `window_start`, `window_end`.
    pub window_schema: SchemaRef,
    /// Steps from the windowed rows to the aggregate's input (WHERE, projections).
    pub pre_steps: Vec<Step>,
    /// Where `window_start` / `window_end` are in the aggregate's input.
    pub window_start_column: Option<usize>,
    pub window_end_column: Option<usize>,
    pub keys: Vec<Arc<dyn PhysicalExpr>>,
    pub key_types: Vec<DataType>,
    pub group_layout: Vec<GroupColumn>,
    pub args: Vec<Option<Arc<dyn PhysicalExpr>>>,
    pub aggregates: Vec<AggregateSpec>,
    pub aggregate_names: Vec<String>,
    /// The schema of the grouped rows (group columns, then aggregates).
    pub aggregate_schema: SchemaRef,
    /// Steps from grouped rows to the output (HAVING, SELECT list).
    pub post_steps: Vec<Step>,
    pub schema: SchemaRef,
    pub emit: EmitPolicy,
    pub allowed_lateness_ms: i64,
    /// The source whose watermark drives it, and that watermark's delay.
    pub watermark_source: String,
    pub watermark_delay_ms: u64,
    /// The source's `idle_timeout_ms` and `max_drift_ms`, for `explain`.
    pub watermark_idle_timeout_ms: Option<u64>,
    pub watermark_max_drift_ms: Option<u64>,
    /// `state.memory_bytes_max`: the estimated state beyond which the query fails with a
    /// clear error instead of growing until the process is killed.
    pub state_bytes_max: u64,
}

/// Estimated bytes of one group besides its key and accumulators: index entry, key,
/// hash and flags.
const GROUP_OVERHEAD_BYTES: usize = 48;
/// Group keys up to this many bytes are held inline, without an allocation of their own.
const KEY_INLINE_BYTES: usize = 22;

/// A group key (the row format of its GROUP BY values).
#[derive(Clone)]
enum GroupKey {
    Inline {
        len: u8,
        bytes: [u8; KEY_INLINE_BYTES],
    },
    Heap(Box<[u8]>),
}

impl GroupKey {
    fn new(key: &[u8]) -> Self {
        if key.len() <= KEY_INLINE_BYTES {
            let mut bytes = [0u8; KEY_INLINE_BYTES];
            bytes[..key.len()].copy_from_slice(key);
            Self::Inline {
                len: key.len() as u8,
                bytes,
            }
        } else {
            Self::Heap(key.into())
        }
    }
}

impl std::ops::Deref for GroupKey {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Self::Heap(b) => b,
        }
    }
}

/// The hash a group key is found and sharded by.
fn key_hash(key: &[u8]) -> u64 {
    use std::hash::Hasher as _;
    let mut h = rustc_hash::FxHasher::default();
    h.write(key);
    h.finish()
}

/// Key equality without a call to `memcmp` for the common 8 to 16 byte keys (one
/// BIGINT or two INTs in the row format): two overlapping word compares.
fn key_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    if (8..=16).contains(&n) {
        let word =
            |s: &[u8], at: usize| <[u8; 8]>::try_from(&s[at..at + 8]).map_or(0, u64::from_ne_bytes);
        return word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8);
    }
    a == b
}

/// The groups of one fixed window, in arrival order.
#[derive(Default)]
struct Groups {
    /// Slot of each key, found by [`key_hash`].
    index: hashbrown::HashTable<u32>,
    keys: Vec<GroupKey>,
    hashes: Vec<u64>,
    accs: Vec<Acc>,
    dirty: Vec<bool>,
    /// Changed since the last checkpoint.
    unsaved: Vec<bool>,
}

impl Groups {
    /// Room for `groups` with `accs` accumulators without growing: a new window expects
    /// as many keys as the last (growing by doubling faults in fresh pages each time).
    fn with_capacity(groups: usize, accs: usize) -> Self {
        Self {
            index: hashbrown::HashTable::with_capacity(groups),
            keys: Vec::with_capacity(groups),
            hashes: Vec::with_capacity(groups),
            accs: Vec::with_capacity(accs),
            dirty: Vec::with_capacity(groups),
            unsaved: Vec::with_capacity(groups),
        }
    }

    fn find(&self, hash: u64, key: &[u8]) -> Option<usize> {
        self.index
            .find(hash, |&slot| key_eq(&self.keys[slot as usize], key))
            .map(|&slot| slot as usize)
    }

    /// Adds a key (not present yet) with its flags; the caller adds its accumulators.
    fn insert(&mut self, hash: u64, key: &[u8], dirty: bool) -> usize {
        let slot = self.keys.len();
        let hashes = &self.hashes;
        self.index
            .insert_unique(hash, slot as u32, |&s| hashes[s as usize]);
        self.keys.push(GroupKey::new(key));
        self.hashes.push(hash);
        self.dirty.push(dirty);
        self.unsaved.push(false);
        slot
    }

    /// Makes room for a window's groups: presized from the fullest open window's (with
    /// hopping windows the newest has seen only one slide of its keys).
    fn open(fixed: &mut BTreeMap<i64, Self>, start: i64) -> &mut Self {
        if !fixed.contains_key(&start) {
            let (groups, accs) = fixed
                .values()
                .max_by_key(|g| g.keys.len())
                .map_or((0, 0), |g| (g.keys.len(), g.accs.len()));
            fixed.insert(start, Self::with_capacity(groups, accs));
        }
        fixed.entry(start).or_default()
    }
}

struct Session {
    start: i64,
    last: i64,
    accs: Vec<Acc>,
    dirty: bool,
    /// Changed since the last checkpoint.
    unsaved: bool,
}

pub struct WindowAggregateOperator {
    plan: WindowAggregatePlan,
    key_converter: RowConverter,
    distinct_converters: Vec<Option<RowConverter>>,
    fixed: BTreeMap<i64, Groups>,
    sessions: FxHashMap<Box<[u8]>, Vec<Session>>,
    /// Session ends to check at each watermark (entries may be stale after merges).
    session_ends: BTreeMap<i64, Vec<Box<[u8]>>>,
    watermark: i64,
    last_periodic_emit: Instant,
    /// Groups held now, and the bytes of their keys (kept as they change).
    groups: usize,
    key_bytes: usize,
    /// Keys that lost a session (closed) since the last checkpoint.
    closed_session_keys: Vec<Box<[u8]>>,
    /// Windows (fixed, or sessions) closed by the watermark, for metrics.
    windows_closed: u64,
    /// `(index, count)`: this copy holds only the groups whose key is in shard `index`.
    shard: Option<(usize, usize)>,
    /// The watermark the last checkpoint stored, and the end of its range delete of
    /// closed windows: a checkpoint that would write them again does not, so an idle
    /// query writes nothing (and an idle pipeline commits nothing).
    saved_watermark: Option<i64>,
    deleted_below: Option<Vec<u8>>,
    /// The input columns the query's filters and projections read, and the windowed
    /// schema with every other column nullable; `None` when every column is read.
    pruned: Option<(Vec<bool>, SchemaRef)>,
}

/// A group ready to emit.
struct Emitted<'a> {
    start: i64,
    end: i64,
    key: &'a [u8],
    accs: &'a [Acc],
}

impl WindowAggregateOperator {
    pub fn new(plan: WindowAggregatePlan) -> Result<Self, DataFusionError> {
        let key_converter = RowConverter::new(
            plan.key_types
                .iter()
                .map(|t| arrow::row::SortField::new(t.clone()))
                .collect(),
        )?;
        let distinct_converters = plan
            .aggregates
            .iter()
            .map(|a| {
                (a.function == super::accumulator::AggregateFunction::CountDistinct)
                    .then(|| super::accumulator::distinct_converter(&a.input_type))
                    .transpose()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let inputs = plan.window_schema.fields().len() - 2;
        let read = super::columns_read(&plan.pre_steps, inputs + 2);
        let pruned = read[..inputs].contains(&false).then(|| {
            let fields: Vec<_> = plan
                .window_schema
                .fields()
                .iter()
                .zip(&read)
                .map(|(f, &r)| {
                    if r {
                        Arc::clone(f)
                    } else {
                        Arc::new(f.as_ref().clone().with_nullable(true))
                    }
                })
                .collect();
            let schema = Arc::new(arrow::datatypes::Schema::new_with_metadata(
                fields,
                plan.window_schema.metadata().clone(),
            ));
            (read, schema)
        });
        Ok(Self {
            plan,
            key_converter,
            distinct_converters,
            fixed: BTreeMap::new(),
            sessions: FxHashMap::default(),
            session_ends: BTreeMap::new(),
            watermark: i64::MIN,
            last_periodic_emit: Instant::now(),
            groups: 0,
            key_bytes: 0,
            windows_closed: 0,
            closed_session_keys: Vec::new(),
            shard: None,
            saved_watermark: None,
            deleted_below: None,
            pruned,
        })
    }

    /// Groups held now (open windows x keys), for metrics and tests.
    #[must_use]
    pub fn live_groups(&self) -> usize {
        self.fixed.values().map(|g| g.keys.len()).sum::<usize>()
            + self.sessions.values().map(Vec::len).sum::<usize>()
    }

    /// Whether this copy holds the group `key` (always, unless split over reactors).
    fn owns(&self, key: &[u8]) -> bool {
        self.owns_hash(key_hash(key))
    }

    fn owns_hash(&self, hash: u64) -> bool {
        self.shard
            .is_none_or(|(index, count)| super::shard_of_hash(hash, count) == index)
    }

    /// A fixed window `[start, end)` can take no more records once the watermark (the
    /// smallest event time still to come) reaches its end plus the allowed lateness.
    fn closes(&self, end: i64, watermark: i64) -> bool {
        end.saturating_add(self.plan.allowed_lateness_ms) <= watermark
    }

    /// A session ending at `end` (last record + gap) still takes a record at `end` itself
    /// ("at most gap after"), so it closes only once the watermark is past it.
    fn session_closes(&self, end: i64, watermark: i64) -> bool {
        end.saturating_add(self.plan.allowed_lateness_ms) < watermark
    }

    /// The input rows, once per window they fall in, with `window_start`/`window_end`.
    fn assign(&self, batch: &RecordBatch, watermark: i64) -> Result<RecordBatch, DataFusionError> {
        let times = cast(batch.column(self.plan.time_column), &DataType::Int64)?;
        let times = times.as_primitive::<Int64Type>();
        let kind = self.plan.kind;
        let mut indices: Vec<u32> = Vec::with_capacity(batch.num_rows());
        let mut starts: Vec<i64> = Vec::with_capacity(batch.num_rows());
        for (row, t) in times.iter().enumerate() {
            // A record without event time cannot be placed in a window; the schema makes
            // event-time columns NOT NULL, so this is only reachable through SQL nulls.
            let Some(t) = t else { continue };
            match kind {
                WindowKind::Session { .. } => {
                    indices.push(row as u32);
                    starts.push(t);
                }
                _ => kind.assign(t, |s| {
                    indices.push(row as u32);
                    starts.push(s);
                }),
            }
        }
        let identity = indices.len() == batch.num_rows()
            && indices.iter().enumerate().all(|(i, &r)| i as u32 == r);
        let ends: Vec<i64> = starts.iter().map(|&s| kind.end(s)).collect();
        let mut schema = &self.plan.window_schema;
        let mut columns: Vec<ArrayRef> = if identity {
            batch.columns().to_vec()
        } else {
            // Rows are copied once per window (hopping windows): only the columns the
            // query reads, unless some are late (late rows go out whole).
            let pruned = self.pruned.as_ref().filter(|_| {
                !matches!(kind, WindowKind::Session { .. })
                    && !ends.iter().any(|&end| self.closes(end, watermark))
            });
            if let Some((_, pruned_schema)) = pruned {
                schema = pruned_schema;
            }
            let idx = UInt32Array::from(indices);
            batch
                .columns()
                .iter()
                .enumerate()
                .map(|(i, c)| match pruned {
                    Some((read, _)) if !read[i] => {
                        Ok(arrow::array::new_null_array(c.data_type(), idx.len()))
                    }
                    _ => take(c, &idx, None),
                })
                .collect::<Result<_, _>>()?
        };
        columns.push(Arc::new(
            TimestampMillisecondArray::from(starts).with_timezone(TIMESTAMP_TZ),
        ));
        columns.push(Arc::new(
            TimestampMillisecondArray::from(ends).with_timezone(TIMESTAMP_TZ),
        ));
        Ok(RecordBatch::try_new(schema.clone(), columns)?)
    }

    /// Moves rows whose fixed window has closed by `watermark` to `late`, whole (every
    /// input column and its window), and returns the rest.
    fn split_late(
        &self,
        windowed: RecordBatch,
        watermark: i64,
        late: &mut Vec<LateRows>,
    ) -> Result<RecordBatch, DataFusionError> {
        let ends = windowed
            .column(windowed.num_columns() - 1)
            .as_primitive::<TimestampMillisecondType>();
        if !ends.values().iter().any(|&end| self.closes(end, watermark)) {
            return Ok(windowed);
        }
        let is_late: BooleanArray = ends
            .values()
            .iter()
            .map(|&end| Some(self.closes(end, watermark)))
            .collect();
        late.push(LateRows {
            rows: filter_record_batch(&windowed, &is_late)?,
            reason: self.late_reason(watermark),
        });
        Ok(filter_record_batch(
            &windowed,
            &arrow::compute::not(&is_late)?,
        )?)
    }

    fn late_reason(&self, watermark: i64) -> String {
        format!(
            "late: its window closed at watermark {watermark} (allowed_lateness_ms {})",
            self.plan.allowed_lateness_ms
        )
    }

    /// The rows of `batch` as the update takes them: once per window they fall in, those
    /// late by `watermark` moved to `late`, the query's filters and projections applied.
    fn prepare(
        &self,
        batch: &RecordBatch,
        watermark: i64,
        late: &mut Vec<LateRows>,
    ) -> Result<RecordBatch, DataFusionError> {
        let mut windowed = self.assign(batch, watermark)?;
        if !matches!(self.plan.kind, WindowKind::Session { .. }) {
            windowed = self.split_late(windowed, watermark, late)?;
        }
        run_steps(&self.plan.pre_steps, &windowed)
    }

    /// Each row's group key, row-encoded; `None` without GROUP BY keys.
    fn encode_keys(&self, input: &RecordBatch) -> Result<Option<Rows>, DataFusionError> {
        if self.plan.keys.is_empty() {
            return Ok(None);
        }
        let arrays = self
            .plan
            .keys
            .iter()
            .map(|k| k.evaluate(input)?.into_array(input.num_rows()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(self.key_converter.convert_columns(&arrays)?))
    }

    /// Folds the prepared rows of `input` whose keys this copy owns into their groups,
    /// judging lateness by `watermark`, and emits what the EMIT policy says to.
    fn update(
        &mut self,
        input: &RecordBatch,
        keys: Option<&Rows>,
        watermark: i64,
        out: &mut Vec<RecordBatch>,
        late: &mut Vec<LateRows>,
    ) -> Result<(), DataFusionError> {
        let starts = self.row_starts(input)?;
        let mut args = Vec::with_capacity(self.plan.args.len());
        for ((arg, spec), converter) in self
            .plan
            .args
            .iter()
            .zip(&self.plan.aggregates)
            .zip(&self.distinct_converters)
        {
            let values = arg
                .as_ref()
                .map(|e| e.evaluate(input)?.into_array(input.num_rows()))
                .transpose()?;
            args.push(spec.prepare(values.as_ref(), converter.as_ref())?);
        }
        let mut late_rows = Vec::new();
        if matches!(self.plan.kind, WindowKind::Session { .. }) {
            self.update_sessions(&starts, keys, &args, watermark, &mut late_rows);
        } else {
            self.update_fixed(&starts, keys, &args, watermark, &mut late_rows);
        }
        if !late_rows.is_empty() {
            let rows = arrow::compute::take_record_batch(input, &UInt32Array::from(late_rows))?;
            late.push(LateRows {
                rows,
                reason: self.late_reason(watermark),
            });
        }
        self.check_state_size()?;
        if self.plan.emit == EmitPolicy::OnUpdate {
            self.emit_dirty(out)?;
        }
        Ok(())
    }

    /// Drops a closed fixed window from state.
    fn remove_window(&mut self, start: i64) -> Option<Groups> {
        let groups = self.fixed.remove(&start)?;
        self.groups -= groups.keys.len();
        self.key_bytes -= groups.keys.iter().map(|k| k.len()).sum::<usize>();
        Some(groups)
    }

    /// Estimated bytes of state: every group's accumulators, key and overhead. COUNT(DISTINCT) sets are bounded apart.
    #[must_use]
    pub fn state_bytes(&self) -> usize {
        let per_group =
            GROUP_OVERHEAD_BYTES + self.plan.aggregates.len() * std::mem::size_of::<Acc>();
        self.groups * per_group + self.key_bytes
    }

    fn check_state_size(&self) -> Result<(), DataFusionError> {
        let bytes = self.state_bytes() as u64;
        let total = self.plan.state_bytes_max;
        // Split over reactors, each copy holds its share of the cap.
        let (limit, cap) = match self.shard {
            Some((_, count)) => {
                let share = total / count as u64;
                (
                    share,
                    format!(
                        "its reactor's share ({share}) of state.memory_bytes_max ({total}, split over {count} reactors)"
                    ),
                )
            }
            None => (total, format!("state.memory_bytes_max ({total})")),
        };
        if bytes > limit {
            return Err(DataFusionError::ResourcesExhausted(format!(
                "window state of query `{}` is about {bytes} bytes ({} open windows x keys), over {cap}; \
                 raise it, shorten the windows or lower the key cardinality",
                self.plan.name, self.groups
            )));
        }
        Ok(())
    }

    /// Each row's window start in the aggregate's input.
    fn row_starts(&self, input: &RecordBatch) -> Result<Vec<i64>, DataFusionError> {
        let (column, shift) = match (self.plan.window_start_column, self.plan.window_end_column) {
            (Some(c), _) => (c, 0),
            (None, Some(c)) => (c, self.plan.kind.end(0)),
            (None, None) => {
                return Err(DataFusionError::Internal(
                    "no window column in the aggregate input".into(),
                ));
            }
        };
        let values = cast(input.column(column), &DataType::Int64)?;
        Ok(values
            .as_primitive::<Int64Type>()
            .values()
            .iter()
            .map(|v| v - shift)
            .collect())
    }

    fn emit_rows(
        &self,
        rows: &[Emitted<'_>],
        out: &mut Vec<RecordBatch>,
    ) -> Result<(), DataFusionError> {
        if rows.is_empty() {
            return Ok(());
        }
        let keys: Vec<ArrayRef> = if self.plan.keys.is_empty() {
            Vec::new()
        } else {
            let parser = self.key_converter.parser();
            let parsed = rows.iter().map(|r| parser.parse(r.key));
            self.key_converter.convert_rows(parsed)?
        };
        let mut columns: Vec<ArrayRef> =
            Vec::with_capacity(self.plan.aggregate_schema.fields().len());
        for g in &self.plan.group_layout {
            columns.push(match g {
                GroupColumn::WindowStart => Arc::new(
                    TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.start))
                        .with_timezone(TIMESTAMP_TZ),
                ),
                GroupColumn::WindowEnd => Arc::new(
                    TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.end))
                        .with_timezone(TIMESTAMP_TZ),
                ),
                GroupColumn::Key(i) => keys[*i].clone(),
            });
        }
        for (a, spec) in self.plan.aggregates.iter().enumerate() {
            columns.push(spec.finish(rows.iter().map(|r| &r.accs[a]))?);
        }
        let schema = &self.plan.aggregate_schema;
        let columns = columns
            .into_iter()
            .zip(schema.fields())
            .map(|(c, f)| {
                if c.data_type() == f.data_type() {
                    Ok(c)
                } else {
                    cast(&c, f.data_type())
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let grouped = RecordBatch::try_new(schema.clone(), columns)?;
        let result = run_steps(&self.plan.post_steps, &grouped)?;
        if result.num_rows() > 0 {
            out.push(result);
        }
        Ok(())
    }

    /// Emits every changed group (`on_update`, `every_ms`) and marks them clean.
    fn emit_dirty(&mut self, out: &mut Vec<RecordBatch>) -> Result<(), DataFusionError> {
        let n = self.plan.aggregates.len();
        let mut rows = Vec::new();
        for (&start, g) in &self.fixed {
            for (slot, dirty) in g.dirty.iter().enumerate() {
                if *dirty {
                    rows.push(Emitted {
                        start,
                        end: self.plan.kind.end(start),
                        key: &g.keys[slot],
                        accs: &g.accs[slot * n..(slot + 1) * n],
                    });
                }
            }
        }
        for (key, sessions) in &self.sessions {
            for s in sessions.iter().filter(|s| s.dirty) {
                rows.push(Emitted {
                    start: s.start,
                    end: self.plan.kind.end(s.last),
                    key,
                    accs: &s.accs,
                });
            }
        }
        rows.sort_by_key(|r| (r.start, r.end));
        self.emit_rows(&rows, out)?;
        // A group that was dirty at the last checkpoint is stored dirty: it changes.
        for g in self.fixed.values_mut() {
            for (dirty, unsaved) in g.dirty.iter_mut().zip(&mut g.unsaved) {
                *unsaved |= std::mem::take(dirty);
            }
        }
        for s in self.sessions.values_mut().flatten() {
            s.unsaved |= std::mem::take(&mut s.dirty);
        }
        Ok(())
    }

    fn update_fixed(
        &mut self,
        starts: &[i64],
        keys: Option<&Rows>,
        args: &[ArgValues],
        watermark: i64,
        late: &mut Vec<u32>,
    ) {
        let n = self.plan.aggregates.len();
        for (row, &start) in starts.iter().enumerate() {
            let key: &[u8] = keys.map_or(&[], |k| k.row(row).data());
            let hash = key_hash(key);
            if !self.owns_hash(hash) {
                continue;
            }
            let end = self.plan.kind.end(start);
            if self.closes(end, watermark) {
                late.push(row as u32);
                continue;
            }
            let groups = Groups::open(&mut self.fixed, start);
            let slot = if let Some(slot) = groups.find(hash, key) {
                slot
            } else {
                let slot = groups.insert(hash, key, false);
                self.groups += 1;
                self.key_bytes += key.len();
                groups
                    .accs
                    .extend(self.plan.aggregates.iter().map(AggregateSpec::new_acc));
                slot
            };
            groups.dirty[slot] = true;
            groups.unsaved[slot] = true;
            for (a, spec) in self.plan.aggregates.iter().enumerate() {
                spec.update(&mut groups.accs[slot * n + a], &args[a], row);
            }
        }
    }

    fn update_sessions(
        &mut self,
        times: &[i64],
        keys: Option<&Rows>,
        args: &[ArgValues],
        watermark: i64,
        late: &mut Vec<u32>,
    ) {
        let WindowKind::Session { gap_ms } = self.plan.kind else {
            return;
        };
        for (row, &t) in times.iter().enumerate() {
            let key: &[u8] = keys.map_or(&[], |k| k.row(row).data());
            if !self.owns(key) {
                continue;
            }
            let sessions = self.sessions.entry(key.into()).or_default();
            // Every open session this record touches: it is at most `gap` from them.
            let touching: Vec<usize> = sessions
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    t <= s.last.saturating_add(gap_ms) && s.start <= t.saturating_add(gap_ms)
                })
                .map(|(i, _)| i)
                .collect();
            if touching.is_empty()
                && t.saturating_add(gap_ms)
                    .saturating_add(self.plan.allowed_lateness_ms)
                    < watermark
            {
                late.push(row as u32);
                if sessions.is_empty() {
                    self.sessions.remove(key);
                }
                continue;
            }
            let target = if let Some((&first, rest)) = touching.split_first() {
                for &i in rest.iter().rev() {
                    let other = sessions.remove(i);
                    self.groups -= 1;
                    self.key_bytes -= key.len();
                    let s = &mut sessions[first];
                    s.start = s.start.min(other.start);
                    s.last = s.last.max(other.last);
                    for ((spec, acc), o) in self
                        .plan
                        .aggregates
                        .iter()
                        .zip(s.accs.iter_mut())
                        .zip(other.accs)
                    {
                        spec.merge(acc, o);
                    }
                }
                first
            } else {
                self.groups += 1;
                self.key_bytes += key.len();
                sessions.push(Session {
                    start: t,
                    last: t,
                    accs: self
                        .plan
                        .aggregates
                        .iter()
                        .map(AggregateSpec::new_acc)
                        .collect(),
                    dirty: false,
                    unsaved: false,
                });
                sessions.len() - 1
            };
            let s = &mut sessions[target];
            s.start = s.start.min(t);
            s.last = s.last.max(t);
            s.dirty = true;
            s.unsaved = true;
            for (a, spec) in self.plan.aggregates.iter().enumerate() {
                spec.update(&mut s.accs[a], &args[a], row);
            }
            let end = s.last.saturating_add(gap_ms);
            self.session_ends.entry(end).or_default().push(key.into());
        }
    }
}

/// State layout, in the operator's namespace (integers in keys sort numerically):
///
/// | key | value |
/// |---|---|
/// | `m` | [`WindowMeta`], an rkyv archive |
/// | `w` start (8 bytes) group key | dirty (u8), one accumulator per aggregate |
/// | `s` group key | session count (u32), then per session start, last (i64), dirty (u8), accumulators |
const STATE_META: &[u8] = b"m";
const STATE_FIXED: u8 = b'w';
const STATE_SESSIONS: u8 = b's';
const STATE_VERSION: u8 = 2;

/// The operator's own record in its namespace.
#[derive(Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct WindowMeta {
    /// Layout of the other entries ([`STATE_VERSION`]).
    version: u8,
    watermark: i64,
}

fn fixed_state_key(buf: &mut Vec<u8>, start: i64, key: &[u8]) {
    buf.clear();
    buf.push(STATE_FIXED);
    buf.extend_from_slice(&ordered_i64(start));
    buf.extend_from_slice(key);
}

fn session_state_key(buf: &mut Vec<u8>, key: &[u8]) {
    buf.clear();
    buf.push(STATE_SESSIONS);
    buf.extend_from_slice(key);
}

fn encode_sessions(w: &mut Writer, sessions: &[Session]) {
    w.clear();
    // Sessions per key are bounded by the state size limit, far below 2^32.
    w.u32(sessions.len() as u32);
    for s in sessions {
        w.i64(s.start);
        w.i64(s.last);
        w.u8(u8::from(s.dirty));
        for acc in &s.accs {
            acc.encode(w);
        }
    }
}

impl WindowAggregateOperator {
    fn decode_accs(&self, r: &mut Reader<'_>, into: &mut Vec<Acc>) -> Result<(), CodecError> {
        for _ in 0..self.plan.aggregates.len() {
            into.push(Acc::decode(r)?);
        }
        Ok(())
    }

    /// The first window start the watermark leaves open: every fixed window that starts
    /// before it has closed.
    fn first_open_start(&self) -> i64 {
        let size = self.plan.kind.end(0);
        self.watermark
            .saturating_sub(size)
            .saturating_sub(self.plan.allowed_lateness_ms)
            .saturating_add(1)
    }

    fn restore_fixed(&mut self, key: &[u8], value: &[u8]) -> Result<(), CodecError> {
        let Some(start) = key.get(1..9).and_then(|s| <[u8; 8]>::try_from(s).ok()) else {
            return Err(CodecError(format!("window key of {} bytes", key.len())));
        };
        if !self.owns(&key[9..]) {
            return Ok(());
        }
        let start = from_ordered_i64(start);
        let group_key = &key[9..];
        let hash = key_hash(group_key);
        let mut r = Reader::new(value);
        let dirty = r.u8()? != 0;
        if self
            .fixed
            .get(&start)
            .is_some_and(|g| g.find(hash, group_key).is_some())
        {
            return Err(CodecError("a group is stored twice".into()));
        }
        let mut accs = Vec::with_capacity(self.plan.aggregates.len());
        self.decode_accs(&mut r, &mut accs)?;
        r.finish()?;
        let groups = self.fixed.entry(start).or_default();
        groups.insert(hash, group_key, dirty);
        groups.accs.extend(accs);
        self.key_bytes += group_key.len();
        self.groups += 1;
        Ok(())
    }

    fn restore_sessions(&mut self, key: &[u8], value: &[u8]) -> Result<(), CodecError> {
        let WindowKind::Session { gap_ms } = self.plan.kind else {
            return Err(CodecError("session state in a fixed-window query".into()));
        };
        if !self.owns(&key[1..]) {
            return Ok(());
        }
        let group_key: Box<[u8]> = key[1..].into();
        let mut r = Reader::new(value);
        let n = r.u32()?;
        let mut sessions = Vec::new();
        for _ in 0..n {
            let (start, last, dirty) = (r.i64()?, r.i64()?, r.u8()? != 0);
            let mut accs = Vec::with_capacity(self.plan.aggregates.len());
            self.decode_accs(&mut r, &mut accs)?;
            self.session_ends
                .entry(last.saturating_add(gap_ms))
                .or_default()
                .push(group_key.clone());
            sessions.push(Session {
                start,
                last,
                accs,
                dirty,
                unsaved: false,
            });
        }
        r.finish()?;
        self.groups += sessions.len();
        self.key_bytes += sessions.len() * group_key.len();
        if !sessions.is_empty() {
            self.sessions.insert(group_key, sessions);
        }
        Ok(())
    }
}

impl Operator for WindowAggregateOperator {
    fn name(&self) -> &str {
        &self.plan.name
    }
    fn input(&self) -> &str {
        &self.plan.input
    }
    fn schema(&self) -> SchemaRef {
        self.plan.schema.clone()
    }
    fn is_stateful(&self) -> bool {
        true
    }
    fn state_groups(&self) -> usize {
        debug_assert_eq!(self.groups, self.live_groups(), "group count drifted");
        self.groups
    }

    fn state_bytes(&self) -> u64 {
        WindowAggregateOperator::state_bytes(self) as u64
    }

    fn windows_open(&self) -> usize {
        // Every session is a window of its own; fixed windows are shared by their keys.
        self.fixed.len() + self.sessions.values().map(Vec::len).sum::<usize>()
    }

    fn windows_closed(&self) -> u64 {
        self.windows_closed
    }

    fn shard(&mut self, index: usize, count: usize) -> bool {
        assert!(index < count, "shard {index} of {count}");
        // Without a key every row is one group: one copy would hold it all. And
        // CURRENT_WATERMARK() read on a reactor would see the pipeline's watermark of a
        // later moment than on one thread.
        let p = &self.plan;
        let name = crate::sql::current_watermark::NAME;
        if p.keys.is_empty()
            || super::steps_call(&p.pre_steps, name)
            || super::steps_call(&p.post_steps, name)
            || p.keys
                .iter()
                .chain(p.args.iter().flatten())
                .any(|e| super::calls(e, name))
        {
            return false;
        }
        self.shard = Some((index, count));
        true
    }

    fn process_batch(
        &mut self,
        batch: &RecordBatch,
        out: &mut Vec<RecordBatch>,
        late: &mut Vec<LateRows>,
    ) -> Result<(), DataFusionError> {
        assert!(
            self.shard.is_none_or(|(_, count)| count == 1),
            "a copy split by key takes its rows through route_batch"
        );
        let input = self.prepare(batch, self.watermark, late)?;
        if input.num_rows() == 0 {
            return Ok(());
        }
        let keys = self.encode_keys(&input)?;
        self.update(&input, keys.as_ref(), self.watermark, out, late)
    }

    fn route_batch(
        &mut self,
        batch: &RecordBatch,
        watermark: i64,
        late: &mut Vec<LateRows>,
        routed: &mut Vec<(usize, KeyedRows)>,
    ) -> Result<(), DataFusionError> {
        // Restored state may be ahead of the watermarks this copy has been sent.
        let watermark = watermark.max(self.watermark);
        let input = self.prepare(batch, watermark, late)?;
        if input.num_rows() == 0 {
            return Ok(());
        }
        let keys = self.encode_keys(&input)?;
        let Some((index, count)) = self.shard else {
            routed.push((
                0,
                KeyedRows {
                    rows: input,
                    keys,
                    watermark,
                },
            ));
            return Ok(());
        };
        if let Some(keys) = &keys {
            let mut shards: Vec<Vec<u32>> = vec![Vec::new(); count];
            for (row, key) in keys.iter().enumerate() {
                let shard = super::shard_of_hash(key_hash(key.data()), count);
                if shard != index {
                    shards[shard].push(row as u32);
                }
            }
            for (shard, rows) in shards.into_iter().enumerate() {
                if rows.is_empty() {
                    continue;
                }
                let bytes = rows
                    .iter()
                    .map(|&r| keys.row(r as usize).data().len())
                    .sum();
                let mut shard_keys = self.key_converter.empty_rows(rows.len(), bytes);
                for &r in &rows {
                    shard_keys.push(keys.row(r as usize));
                }
                let rows = arrow::compute::take_record_batch(&input, &UInt32Array::from(rows))?;
                routed.push((
                    shard,
                    KeyedRows {
                        rows,
                        keys: Some(shard_keys),
                        watermark,
                    },
                ));
            }
        }
        // This copy's own rows stay in the whole batch: the update skips the others.
        routed.push((
            index,
            KeyedRows {
                rows: input,
                keys,
                watermark,
            },
        ));
        Ok(())
    }

    fn process_keyed(
        &mut self,
        rows: KeyedRows,
        out: &mut Vec<RecordBatch>,
        late: &mut Vec<LateRows>,
    ) -> Result<(), DataFusionError> {
        let watermark = rows.watermark.max(self.watermark);
        self.update(&rows.rows, rows.keys.as_ref(), watermark, out, late)
    }

    fn handle_watermark(
        &mut self,
        watermark: i64,
        out: &mut Vec<RecordBatch>,
    ) -> Result<(), DataFusionError> {
        if watermark <= self.watermark {
            return Ok(());
        }
        self.watermark = watermark;
        let n = self.plan.aggregates.len();
        let emit_all = self.plan.emit == EmitPolicy::OnWindowClose;
        let emit_dirty = matches!(self.plan.emit, EmitPolicy::EveryMs(_));
        // Fixed windows close in start order (equal sizes: end order too).
        let closing: Vec<i64> = self
            .fixed
            .keys()
            .copied()
            .take_while(|&s| self.closes(self.plan.kind.end(s), watermark))
            .collect();
        for start in closing {
            let Some(groups) = self.remove_window(start) else {
                continue;
            };
            self.windows_closed += 1;
            if emit_all || emit_dirty {
                let end = self.plan.kind.end(start);
                // Sized up front: a window of 10^5 groups otherwise grows (and copies)
                // its list of rows a dozen times while the reactor holds every batch.
                let count = if emit_all {
                    groups.keys.len()
                } else {
                    groups.dirty.iter().filter(|&&d| d).count()
                };
                let mut rows: Vec<Emitted<'_>> = Vec::with_capacity(count);
                rows.extend(
                    (0..groups.keys.len())
                        .filter(|&slot| emit_all || groups.dirty[slot])
                        .map(|slot| Emitted {
                            start,
                            end,
                            key: &groups.keys[slot],
                            accs: &groups.accs[slot * n..(slot + 1) * n],
                        }),
                );
                self.emit_rows(&rows, out)?;
            }
        }
        // Sessions whose end passed; entries are checked against the live sessions.
        let WindowKind::Session { gap_ms } = self.plan.kind else {
            return Ok(());
        };
        let due: Vec<i64> = self
            .session_ends
            .keys()
            .copied()
            .take_while(|&e| self.session_closes(e, watermark))
            .collect();
        let mut closed: Vec<(Box<[u8]>, Session)> = Vec::new();
        for end in due {
            for key in self.session_ends.remove(&end).unwrap_or_default() {
                let Some(sessions) = self.sessions.get_mut(&key) else {
                    continue;
                };
                let mut i = 0;
                while i < sessions.len() {
                    if self
                        .plan
                        .allowed_lateness_ms
                        .saturating_add(sessions[i].last.saturating_add(gap_ms))
                        < watermark
                    {
                        closed.push((key.clone(), sessions.remove(i)));
                        self.windows_closed += 1;
                        self.closed_session_keys.push(key.clone());
                        self.groups -= 1;
                        self.key_bytes -= key.len();
                    } else {
                        i += 1;
                    }
                }
                if sessions.is_empty() {
                    self.sessions.remove(&key);
                }
            }
        }
        if emit_all || emit_dirty {
            let rows: Vec<Emitted<'_>> = closed
                .iter()
                .filter(|(_, s)| emit_all || s.dirty)
                .map(|(k, s)| Emitted {
                    start: s.start,
                    end: s.last.saturating_add(gap_ms),
                    key: k,
                    accs: &s.accs,
                })
                .collect();
            self.emit_rows(&rows, out)?;
        }
        Ok(())
    }

    fn handle_tick(
        &mut self,
        now: Instant,
        out: &mut Vec<RecordBatch>,
    ) -> Result<(), DataFusionError> {
        if let EmitPolicy::EveryMs(ms) = self.plan.emit
            && now.duration_since(self.last_periodic_emit) >= Duration::from_millis(ms)
        {
            self.last_periodic_emit = now;
            self.emit_dirty(out)?;
        }
        Ok(())
    }

    fn checkpoint(&mut self, state: &mut StateView<'_>) -> Result<(), StateError> {
        if self.saved_watermark != Some(self.watermark) {
            state.put_typed(
                STATE_META,
                &WindowMeta {
                    version: STATE_VERSION,
                    watermark: self.watermark,
                },
            )?;
            self.saved_watermark = Some(self.watermark);
        }
        let mut w = Writer::default();
        // Closed windows are every window below the first open one: one range delete.
        // Split over reactors, other copies hold windows this one has no group in: the
        // bound is then the first window the watermark leaves open, the same for all.
        let mut key = Vec::new();
        let first_open = self.fixed.keys().next().copied();
        let bound = match (first_open, self.shard) {
            (first, Some(_)) => {
                let open_from = self.first_open_start();
                Some(first.map_or(open_from, |f| f.min(open_from)))
            }
            (first, None) => first,
        };
        match bound {
            Some(first) => fixed_state_key(&mut key, first, &[]),
            None => key.push(STATE_FIXED + 1),
        }
        // Nothing is written below the bound once it is there: the same bound deletes
        // nothing new.
        if self.deleted_below.as_ref() != Some(&key) {
            state.delete_range(&[STATE_FIXED], Some(&key))?;
            self.deleted_below = Some(key.clone());
        }
        let n = self.plan.aggregates.len();
        for (&start, groups) in &mut self.fixed {
            for slot in 0..groups.keys.len() {
                if !std::mem::take(&mut groups.unsaved[slot]) {
                    continue;
                }
                fixed_state_key(&mut key, start, &groups.keys[slot]);
                w.clear();
                w.u8(u8::from(groups.dirty[slot]));
                for acc in &groups.accs[slot * n..(slot + 1) * n] {
                    acc.encode(&mut w);
                }
                state.put(&key, &w.buf)?;
            }
        }
        for (group_key, sessions) in &mut self.sessions {
            if sessions.iter().any(|s| s.unsaved) {
                for s in sessions.iter_mut() {
                    s.unsaved = false;
                }
                session_state_key(&mut key, group_key);
                encode_sessions(&mut w, sessions);
                state.put(&key, &w.buf)?;
            }
        }
        for group_key in std::mem::take(&mut self.closed_session_keys) {
            session_state_key(&mut key, &group_key);
            match self.sessions.get(&group_key) {
                Some(sessions) => {
                    encode_sessions(&mut w, sessions);
                    state.put(&key, &w.buf)?;
                }
                None => state.delete(&key)?,
            }
        }
        Ok(())
    }

    fn restore(&mut self, state: &StateView<'_>) -> Result<(), StateError> {
        self.fixed.clear();
        self.sessions.clear();
        self.session_ends.clear();
        self.closed_session_keys.clear();
        (self.groups, self.key_bytes) = (0, 0);
        self.watermark = i64::MIN;
        (self.saved_watermark, self.deleted_below) = (None, None);
        let Some(meta) = state.get_typed::<WindowMeta>(STATE_META)? else {
            return Ok(());
        };
        if meta.version != STATE_VERSION {
            return Err(state.corrupt(format!(
                "window state format {}, this build reads {STATE_VERSION}",
                meta.version
            )));
        }
        self.watermark = meta.watermark;
        for (key, value) in state.scan_prefix(&[STATE_FIXED]) {
            self.restore_fixed(key, value)
                .map_err(|e| state.corrupt(format!("window entry: {}", e.0)))?;
        }
        for (key, value) in state.scan_prefix(&[STATE_SESSIONS]) {
            self.restore_sessions(key, value)
                .map_err(|e| state.corrupt(format!("session entry: {}", e.0)))?;
        }
        Ok(())
    }

    fn explain(&self) -> String {
        let p = &self.plan;
        let mut out = String::new();
        let emit = match p.emit {
            EmitPolicy::OnWindowClose => "on_window_close (each window and key once, when the watermark passes window_end + allowed lateness)".to_owned(),
            EmitPolicy::OnUpdate => "on_update (upsert stream: the current row of each changed window and key, per batch)".to_owned(),
            EmitPolicy::EveryMs(ms) => format!("every {ms} ms (changed windows and keys), and at window close"),
        };
        let _ = writeln!(out, "query {} (windowed aggregation)", p.name);
        let _ = writeln!(out, "  Emit: {emit}");
        if !p.post_steps.is_empty() {
            out.push_str(&explain_steps(
                &p.post_steps,
                &p.aggregate_schema,
                "grouped rows",
                "  ",
            ));
        }
        let keys: Vec<String> = p.keys.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "  WindowAggregate: {} on {}, keys [{}], aggregates [{}], allowed lateness {} ms",
            p.kind,
            p.time_column_name,
            keys.join(", "),
            p.aggregate_names.join(", "),
            p.allowed_lateness_ms
        );
        let _ = writeln!(
            out,
            "    state: per open window and key, one accumulator per aggregate (freed when the window closes); changes written to state namespace `{}` at each epoch",
            p.name
        );
        let idle = p.watermark_idle_timeout_ms.map_or_else(
            || "never idle".to_owned(),
            |ms| format!("idle after {ms} ms"),
        );
        let align = p.watermark_max_drift_ms.map_or_else(
            || "no alignment".to_owned(),
            |ms| format!("partitions more than {ms} ms ahead of the slowest are paused"),
        );
        let _ = writeln!(
            out,
            "    watermark: source {} column {}, max event time - {} ms per partition, min over partitions ({idle}; {align})",
            p.watermark_source, p.time_column_name, p.watermark_delay_ms
        );
        out.push_str(&explain_steps(
            &p.pre_steps,
            &p.window_schema,
            &p.input,
            "  ",
        ));
        let fields: Vec<String> = p
            .schema
            .fields()
            .iter()
            .map(|f| format!("{} {}", f.name(), f.data_type()))
            .collect();
        let _ = writeln!(out, "  Output: {}", fields.join(", "));
        out
    }
}
