//! Per-core reactors: a keyed query split over `runtime.cores` threads, each pinned to a
//! core and owning the groups whose key hashes to it.
//!
//! ```text
//!                  ┌─ input ring ─► reactor 0 (core 0) ─ output ring ─┐
//! pipeline thread ─┤                 ▲ │ peer rings (rows by key)     ├─► pipeline thread
//! (sources, decode └─ input ring ─► reactor 1 (core 1) ─ output ring ─┘    (downstream
//!  sinks, WAL,                                                              queries, sinks)
//!  epochs)
//! ```
//!
//! Input batches go to the reactors in turn (batch `seq` to reactor `seq % n`). A reactor
//! prepares the batches it is given (windows, late rows, filters, group keys) and routes
//! each batch's rows to the reactors that own their keys over peer rings (a shuffle by
//! key hash), telling every peer of every batch, empty or not. Each reactor then folds
//! in its rows in input order: batch by batch, its own rows or those a peer routed, with
//! the watermarks, ticks and flushes in their places among the batches. So each key's
//! state lives on one core, rows are judged late against the watermark as of their
//! batch, windows close after every row before the watermark is in, and the output is
//! the same as on one thread for any number of cores (`on_update` changes of different
//! keys may interleave differently across reactors).
//!
//! Every ring is a bounded single-producer single-consumer queue ([`rtrb`], lock-free),
//! and what a reactor holds prepared is bounded too ([`APPLY_QUEUE_ITEMS`]). The pipeline
//! thread hands out at most [`IN_FLIGHT_BATCHES_PER_REACTOR`] batches per reactor ahead
//! of the slowest one's folding in, so input that arrives meanwhile gathers into bigger
//! batches at the source rather than many small ones queueing in the rings. When a
//! reactor falls behind, its peers' messages to it wait, the peers stop taking input,
//! their input rings fill and the pipeline thread stops polling its sources until there
//! is room (backpressure reaches the sources: a Kafka consumer stops fetching when its
//! bounded prefetch queue is full; partitions are assigned by laminar, not by a group
//! rebalance, so a stall costs no rebalance). A reactor never blocks on a ring: it holds
//! at most one message per destination and goes on folding in meanwhile, and the batch
//! a reactor waits for has always been routed or can be, so the rings cannot deadlock.
//!
//! Epochs: before an epoch's commit entry is written the pipeline thread sends `Flush`
//! down every ring and waits for each reactor's `Flushed`, which a reactor sends once it
//! has folded in every batch before it, so every result of the epoch's input is out;
//! then it borrows the operators (`Lend` / `Lent` / `Return`) to restore their state, or
//! has each write its changes to its own WAL (`Checkpoint`). Ownership moves with the
//! messages: no locks, no shared state but counters.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::error::DataFusionError;
use rtrb::{Consumer, PushError, RingBuffer};

use super::latency::LatencyHistogram;
use crate::durability::entry::{KIND_STATE, encode_state};
use crate::durability::{ReactorLog, ReactorWal};
use crate::operator::{KeyedRows, LateRows, LoggedChanges, Operator, ReactorSample};
use crate::state::{Recorder, StateError, StateView};

/// The next core a reactor of this process is pinned to (an index into the allowed ones).
static NEXT_CORE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Messages (each a batch, a watermark or a control message) an input ring holds.
pub const RING_SLOTS: usize = 32;
/// Messages a peer ring (from one reactor to another) holds: each a batch's rows of one
/// shard.
pub const PEER_RING_SLOTS: usize = 16;
/// Batches the pipeline thread hands out ahead of the reactor that is furthest behind in
/// folding them in, per reactor. Beyond that it waits (taking output meanwhile), so that
/// input arriving while the reactors are busy gathers into bigger batches at the source,
/// each with its per-batch costs once, instead of queueing in the rings as many small
/// ones: the queue, and the latency it adds, stays a few batches deep at any rate.
pub const IN_FLIGHT_BATCHES_PER_REACTOR: u64 = 8;
/// Items a reactor holds prepared but not yet folded in (its own rows of a batch waiting
/// for the rows of earlier batches from its peers, or control messages among them).
pub const APPLY_QUEUE_ITEMS: usize = 32;
/// How long an idle reactor sleeps before it looks at its ring again (a push wakes it).
const REACTOR_PARK: Duration = Duration::from_millis(1);
/// How long the pipeline thread sleeps between looks while it waits for a reactor.
const WAIT_PARK: Duration = Duration::from_micros(20);
/// Wall-clock ticks are forwarded at most this often (they drive `emit: every_ms`).
const TICK_INTERVAL: Duration = Duration::from_millis(10);

/// What the pipeline sends a reactor. `seq` numbers the batches of the query's input in
/// the order the pipeline took them; `after` places a control message among them (after
/// the first `after` batches).
enum Input {
    Batch {
        batch: RecordBatch,
        seq: u64,
        sent: Instant,
    },
    /// A control message in its place among the batches.
    Control {
        control: Control,
        after: u64,
    },
    /// Write the operator's changes of `epoch` (to the reactor's WAL, when it has one);
    /// its records below `retain_from` may go.
    Checkpoint {
        epoch: u64,
        retain_from: u64,
    },
    Lend,
    Return(Box<dyn Operator>),
}

/// What a reactor takes in its place among the batches.
#[derive(Clone, Copy)]
enum Control {
    Watermark(i64),
    Tick(Instant),
    /// Answered with `Flushed` once every batch before it is folded in.
    Flush,
}

/// From one reactor to another: its rows of batch `seq` (`None`: it had none), for every
/// batch the sender routed, in order.
struct Part {
    seq: u64,
    rows: Option<KeyedRows>,
    sent: Instant,
}

/// What a reactor folds in, in input order: its own rows of a batch, or a control message
/// placed among the batches.
enum Item {
    Own {
        seq: u64,
        rows: Option<KeyedRows>,
        sent: Instant,
        count: u64,
    },
    Control {
        control: Control,
        after: u64,
    },
}

impl Item {
    /// Batches to fold in before this item.
    fn position(&self) -> u64 {
        match self {
            Item::Own { seq, .. } => *seq,
            Item::Control { after, .. } => *after,
        }
    }
}

enum Output {
    Rows {
        out: Vec<RecordBatch>,
        late: Vec<LateRows>,
    },
    Flushed,
    Checkpointed(Result<LoggedChanges, StateError>),
    Lent(Box<dyn Operator>),
    Failed(String),
}

/// What a reactor publishes for metrics and benchmarks.
#[derive(Default)]
pub struct ReactorStats {
    pub groups: AtomicU64,
    pub state_bytes: AtomicU64,
    pub windows_open: AtomicU64,
    pub windows_closed: AtomicU64,
    /// Nanoseconds spent processing messages.
    pub busy_ns: AtomicU64,
    /// Batches of the input folded in (own or routed rows, every batch counts): the
    /// reactor's place in the input order, and what bounds the batches in flight.
    pub folded: AtomicU64,
    /// Per input row: from the batch entering the ring to the reactor having processed it.
    pub latency: LatencyHistogram,
}

struct Shard {
    tx: rtrb::Producer<Input>,
    rx: Consumer<Output>,
    thread: Thread,
    join: Option<JoinHandle<()>>,
    stats: Arc<ReactorStats>,
    flushed: u64,
    /// The `flushed` count the flush under way waits for.
    flush_target: u64,
    lent: Option<Box<dyn Operator>>,
    /// The reactor's WAL, if it has one.
    wal_index: Option<u32>,
    checkpointed: Option<Result<LoggedChanges, StateError>>,
}

/// One query over `n` reactors; to the pipeline it is one [`Operator`].
pub struct ShardedOperator {
    name: String,
    input: String,
    schema: SchemaRef,
    stateful: bool,
    explain: String,
    shards: Vec<Shard>,
    /// Output drained from the rings, handed out at the next call.
    out: Vec<RecordBatch>,
    late: Vec<LateRows>,
    last_tick: Option<Instant>,
    /// Time spent waiting on full rings since [`Operator::take_blocked`].
    blocked: Duration,
    /// Batches sent so far: the next one's `seq`.
    batches: u64,
}

impl ShardedOperator {
    /// Starts one reactor thread per operator (each already told its shard). With `pin`,
    /// and a core left over for the pipeline thread, the `i`-th is pinned to the `i`-th
    /// core this process may run on; with no core to spare the scheduler places them (a
    /// pinned reactor sharing its core with the pipeline thread cannot move to a core
    /// that goes idle: measured 25% slower on two cores).
    pub fn start(operators: Vec<Box<dyn Operator>>, pin: bool) -> std::io::Result<Self> {
        Self::start_with_wals(operators, pin, Vec::new())
    }

    /// [`ShardedOperator::start`], the `i`-th reactor writing its state changes to
    /// `wals[i]` at each checkpoint (none when `wals` is empty).
    pub fn start_with_wals(
        operators: Vec<Box<dyn Operator>>,
        pin: bool,
        wals: Vec<ReactorWal>,
    ) -> std::io::Result<Self> {
        assert!(!operators.is_empty(), "a sharded query needs an operator");
        assert!(
            wals.is_empty() || wals.len() == operators.len(),
            "a WAL for every reactor, or none"
        );
        let mut wals = wals.into_iter();
        let first = &operators[0];
        let (name, input, schema, stateful) = (
            first.name().to_owned(),
            first.input().to_owned(),
            first.schema(),
            first.is_stateful(),
        );
        let explain = format!(
            "{}  (split by group key over {} reactor threads)\n",
            first.explain().trim_end(),
            operators.len()
        );
        let mut cores = if pin { allowed_cores() } else { Vec::new() };
        // No core to spare, or a CPU quota (fewer cores usable than the mask allows: the
        // mask is the host's, shared with every other container): no pinning.
        let usable = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
        if cores.len() <= operators.len() || usable != cores.len() {
            cores.clear();
        }
        let n = operators.len();
        // peer_tx[from][to] and peer_rx[to][from]: a ring between every ordered pair.
        let mut peer_tx: Vec<Vec<Option<rtrb::Producer<Part>>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        let mut peer_rx: Vec<Vec<Option<Consumer<Part>>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        for from in 0..n {
            for to in (0..n).filter(|&to| to != from) {
                let (tx, rx) = RingBuffer::new(PEER_RING_SLOTS);
                peer_tx[from][to] = Some(tx);
                peer_rx[to][from] = Some(rx);
            }
        }
        let threads: Arc<[OnceLock<Thread>]> = (0..n).map(|_| OnceLock::new()).collect();
        let mut shards = Vec::new();
        for (((i, op), peers_out), peers_in) in
            operators.into_iter().enumerate().zip(peer_tx).zip(peer_rx)
        {
            let (tx, reactor_rx) = RingBuffer::new(RING_SLOTS);
            // A reactor sends at most one message before it takes the next: the output
            // ring only bounds how far it may run ahead of the pipeline thread.
            let (reactor_tx, rx) = RingBuffer::new(RING_SLOTS + 4);
            let stats = Arc::new(ReactorStats::default());
            // Reactors of all queries take the cores in turn, not each from the first.
            let core = (!cores.is_empty())
                .then(|| cores[NEXT_CORE.fetch_add(1, Ordering::Relaxed) % cores.len()]);
            let wal = wals.next();
            let wal_index = wal.as_ref().map(|w| w.index);
            let reactor = Reactor {
                index: i,
                op: Some(op),
                rx: reactor_rx,
                tx: reactor_tx,
                stats: Arc::clone(&stats),
                wal,
                pending: None,
                peers_out: peers_out
                    .into_iter()
                    .map(|tx| tx.map(|tx| PeerOut { tx, pending: None }))
                    .collect(),
                peers_in,
                threads: Arc::clone(&threads),
                stream_watermark: i64::MIN,
                queue: VecDeque::with_capacity(APPLY_QUEUE_ITEMS),
                out: Vec::new(),
                late: Vec::new(),
                routed: Vec::new(),
            };
            let join = std::thread::Builder::new()
                .name(format!("laminar-reactor-{i}"))
                .spawn(move || {
                    if let Some(core) = core {
                        pin_to(core);
                    }
                    reactor.run();
                })?;
            let _ = threads[i].set(join.thread().clone());
            shards.push(Shard {
                tx,
                rx,
                thread: join.thread().clone(),
                join: Some(join),
                stats,
                flushed: 0,
                flush_target: 0,
                lent: None,
                wal_index,
                checkpointed: None,
            });
        }
        Ok(Self {
            name,
            input,
            schema,
            stateful,
            explain,
            shards,
            out: Vec::new(),
            late: Vec::new(),
            last_tick: None,
            blocked: Duration::ZERO,
            batches: 0,
        })
    }

    /// Each reactor's counters, in core order.
    #[must_use]
    pub fn reactor_stats(&self) -> Vec<Arc<ReactorStats>> {
        self.shards.iter().map(|s| Arc::clone(&s.stats)).collect()
    }

    fn error(&self, shard: usize, message: &str) -> DataFusionError {
        DataFusionError::Execution(format!("query `{}`, reactor {shard}: {message}", self.name))
    }

    /// Takes whatever reactor `i` has sent.
    fn drain(&mut self, i: usize) -> Result<(), DataFusionError> {
        loop {
            let shard = &mut self.shards[i];
            let Ok(message) = shard.rx.pop() else {
                if shard.rx.is_abandoned() {
                    return Err(self.error(i, "the reactor thread stopped"));
                }
                return Ok(());
            };
            match message {
                Output::Rows { out, late } => {
                    self.out.extend(out);
                    self.late.extend(late);
                }
                Output::Flushed => shard.flushed += 1,
                Output::Checkpointed(result) => shard.checkpointed = Some(result),
                Output::Lent(op) => shard.lent = Some(op),
                Output::Failed(message) => return Err(self.error(i, &message)),
            }
        }
    }

    fn drain_all(&mut self) -> Result<(), DataFusionError> {
        (0..self.shards.len()).try_for_each(|i| self.drain(i))
    }

    /// Puts `message` on reactor `i`'s ring, waiting (and taking every reactor's output
    /// meanwhile: reactor `i` may wait on a peer that waits on its output ring) while the
    /// ring is full.
    fn send(&mut self, i: usize, mut message: Input) -> Result<(), DataFusionError> {
        let mut backoff = Backoff::default();
        let mut waiting_since = None;
        loop {
            match self.shards[i].tx.push(message) {
                Ok(()) => {
                    self.shards[i].thread.unpark();
                    if let Some(since) = waiting_since {
                        self.blocked += Instant::elapsed(&since);
                    }
                    return Ok(());
                }
                Err(PushError::Full(m)) => message = m,
            }
            waiting_since.get_or_insert_with(Instant::now);
            self.drain_all()?;
            backoff.wait(WAIT_PARK);
        }
    }

    /// Waits (taking every reactor's output) while [`IN_FLIGHT_BATCHES_PER_REACTOR`] per
    /// reactor are handed out and not yet folded in by all of them.
    fn wait_for_room(&mut self) -> Result<(), DataFusionError> {
        let max = IN_FLIGHT_BATCHES_PER_REACTOR * self.shards.len() as u64;
        let folded = |shards: &[Shard]| {
            shards
                .iter()
                .map(|s| s.stats.folded.load(Ordering::Acquire))
                .min()
                .unwrap_or(0)
        };
        let mut backoff = Backoff::default();
        let mut waiting_since = None;
        while self.batches - folded(&self.shards) >= max {
            waiting_since.get_or_insert_with(Instant::now);
            self.drain_all()?;
            backoff.wait(WAIT_PARK);
        }
        if let Some(since) = waiting_since {
            self.blocked += since.elapsed();
        }
        Ok(())
    }

    fn broadcast(&mut self, make: impl Fn() -> Input) -> Result<(), DataFusionError> {
        (0..self.shards.len()).try_for_each(|i| self.send(i, make()))
    }

    /// Sends `control` to every reactor, placed after the batches sent so far.
    fn broadcast_control(&mut self, control: Control) -> Result<(), DataFusionError> {
        let after = self.batches;
        self.broadcast(|| Input::Control { control, after })
    }

    fn hand_out(&mut self, out: &mut Vec<RecordBatch>, late: &mut Vec<LateRows>) {
        out.append(&mut self.out);
        late.append(&mut self.late);
    }

    /// Waits until `done` holds for every reactor, taking their output meanwhile.
    fn wait_all(&mut self, done: impl Fn(&Shard) -> bool) -> Result<(), DataFusionError> {
        let mut backoff = Backoff::default();
        loop {
            self.drain_all()?;
            if self.shards.iter().all(&done) {
                return Ok(());
            }
            backoff.wait(WAIT_PARK);
        }
    }

    /// Borrows every reactor's operator for `f`, then gives them back. Only between a
    /// flush and the next input: the reactors are idle.
    fn with_operators<T>(
        &mut self,
        f: impl FnOnce(&mut [Box<dyn Operator>]) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let lend = self
            .broadcast(|| Input::Lend)
            .and_then(|()| self.wait_all(|s| s.lent.is_some()));
        lend.map_err(|e| StateError::Reactor(e.strip_backtrace()))?;
        assert!(
            self.out.is_empty() && self.late.is_empty(),
            "a reactor emitted rows between a flush and a checkpoint"
        );
        let mut operators: Vec<Box<dyn Operator>> = self
            .shards
            .iter_mut()
            .filter_map(|s| s.lent.take())
            .collect();
        let result = f(&mut operators);
        for (op, shard) in operators.iter().zip(&self.shards) {
            publish(op.as_ref(), &shard.stats);
        }
        for (i, op) in operators.into_iter().enumerate() {
            self.send(i, Input::Return(op))
                .map_err(|e| StateError::Reactor(e.strip_backtrace()))?;
        }
        result
    }

    fn sum(&self, field: impl Fn(&ReactorStats) -> &AtomicU64) -> u64 {
        self.shards
            .iter()
            .map(|s| field(&s.stats).load(Ordering::Relaxed))
            .sum()
    }
}

impl Drop for ShardedOperator {
    fn drop(&mut self) {
        let joins: Vec<_> = self
            .shards
            .iter_mut()
            .filter_map(|s| s.join.take())
            .collect();
        // Dropping the rings tells the reactors to stop.
        self.shards.clear();
        for join in joins {
            let _ = join.join();
        }
    }
}

impl Operator for ShardedOperator {
    fn name(&self) -> &str {
        &self.name
    }

    fn input(&self) -> &str {
        &self.input
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn process_batch(
        &mut self,
        batch: &RecordBatch,
        out: &mut Vec<RecordBatch>,
        late: &mut Vec<LateRows>,
    ) -> Result<(), DataFusionError> {
        self.process_batch_since(batch, Instant::now(), out, late)
    }

    fn process_batch_since(
        &mut self,
        batch: &RecordBatch,
        since: Instant,
        out: &mut Vec<RecordBatch>,
        late: &mut Vec<LateRows>,
    ) -> Result<(), DataFusionError> {
        self.wait_for_room()?;
        // Batches go to the reactors in turn, so each knows which peer has the next.
        let seq = self.batches;
        self.batches += 1;
        let i = (seq % self.shards.len() as u64) as usize;
        self.send(
            i,
            Input::Batch {
                batch: batch.clone(),
                seq,
                sent: since,
            },
        )?;
        self.drain_all()?;
        self.hand_out(out, late);
        Ok(())
    }

    fn handle_watermark(
        &mut self,
        watermark: i64,
        out: &mut Vec<RecordBatch>,
    ) -> Result<(), DataFusionError> {
        self.broadcast_control(Control::Watermark(watermark))?;
        self.drain_all()?;
        out.append(&mut self.out);
        Ok(())
    }

    fn handle_tick(
        &mut self,
        now: Instant,
        out: &mut Vec<RecordBatch>,
    ) -> Result<(), DataFusionError> {
        if self
            .last_tick
            .is_none_or(|t| now.duration_since(t) >= TICK_INTERVAL)
        {
            self.last_tick = Some(now);
            self.broadcast_control(Control::Tick(now))?;
        }
        self.drain_all()?;
        out.append(&mut self.out);
        Ok(())
    }

    fn flush(
        &mut self,
        out: &mut Vec<RecordBatch>,
        late: &mut Vec<LateRows>,
    ) -> Result<(), DataFusionError> {
        for shard in &mut self.shards {
            shard.flush_target = shard.flushed + 1;
        }
        self.broadcast_control(Control::Flush)?;
        self.wait_all(|s| s.flushed >= s.flush_target)?;
        self.hand_out(out, late);
        Ok(())
    }

    fn is_stateful(&self) -> bool {
        self.stateful
    }

    fn state_groups(&self) -> usize {
        self.sum(|s| &s.groups) as usize
    }

    fn state_bytes(&self) -> u64 {
        self.sum(|s| &s.state_bytes)
    }

    fn windows_open(&self) -> usize {
        // Every reactor sees every window: the busiest one's count, not the sum.
        self.shards
            .iter()
            .map(|s| s.stats.windows_open.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0) as usize
    }

    fn windows_closed(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.stats.windows_closed.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    fn take_blocked(&mut self) -> Duration {
        std::mem::take(&mut self.blocked)
    }

    fn reactors(&self) -> Vec<ReactorSample> {
        self.shards
            .iter()
            .map(|s| ReactorSample {
                busy_ns: s.stats.busy_ns.load(Ordering::Relaxed),
                ring_messages: RING_SLOTS - s.tx.slots(),
            })
            .collect()
    }

    fn checkpoint(&mut self, state: &mut StateView<'_>) -> Result<(), StateError> {
        assert!(
            self.shards.iter().all(|s| s.wal_index.is_none()),
            "reactors with WALs checkpoint through start_checkpoint, which knows the epoch"
        );
        self.start_checkpoint(0, &|_| 0)?;
        for changes in self.finish_checkpoint()? {
            changes.ops.iter().try_for_each(|op| state.apply(op))?;
        }
        Ok(())
    }

    fn start_checkpoint(
        &mut self,
        epoch: u64,
        retain_from: &dyn Fn(u32) -> u64,
    ) -> Result<bool, StateError> {
        let reactor_failed = |e: DataFusionError| StateError::Reactor(e.strip_backtrace());
        for i in 0..self.shards.len() {
            let retain_from = self.shards[i].wal_index.map_or(0, retain_from);
            self.send(i, Input::Checkpoint { epoch, retain_from })
                .map_err(reactor_failed)?;
        }
        Ok(true)
    }

    fn finish_checkpoint(&mut self) -> Result<Vec<LoggedChanges>, StateError> {
        self.wait_all(|s| s.checkpointed.is_some())
            .map_err(|e| StateError::Reactor(e.strip_backtrace()))?;
        assert!(
            self.out.is_empty() && self.late.is_empty(),
            "a reactor emitted rows between a flush and a checkpoint"
        );
        self.shards
            .iter_mut()
            .filter_map(|s| s.checkpointed.take())
            .collect()
    }

    fn restore(&mut self, state: &StateView<'_>) -> Result<(), StateError> {
        self.with_operators(|ops| ops.iter_mut().try_for_each(|op| op.restore(state)))
    }

    fn explain(&self) -> String {
        self.explain.clone()
    }
}

/// A reactor's part of a checkpoint: `op`'s changes since the last one, appended to the
/// reactor's WAL and made durable with one `fdatasync` (when it has a WAL), then trimmed
/// below `retain_from`.
fn checkpoint(
    op: &mut dyn Operator,
    wal: &mut Option<ReactorWal>,
    epoch: u64,
    retain_from: u64,
) -> Result<LoggedChanges, StateError> {
    let mut recorder = Recorder::default();
    let name = op.name().to_owned();
    op.checkpoint(&mut StateView::open(&mut recorder, &name)?)?;
    let ops = recorder.take();
    let Some(ReactorWal { index, wal }) = wal else {
        return Ok(LoggedChanges { ops, log: None });
    };
    let mut log = None;
    if !ops.is_empty() {
        let before = wal.stats();
        for payload in encode_state(epoch, &ops) {
            wal.append(KIND_STATE, &payload)?;
        }
        wal.sync()?;
        let after = wal.stats();
        log = Some(ReactorLog {
            index: *index,
            lsn: wal.next_lsn() - 1,
            appends: after.appends - before.appends,
            bytes: after.bytes - before.bytes,
            sync: after.last_sync,
        });
    }
    if retain_from > 0 {
        wal.remove_before(retain_from)?;
    }
    Ok(LoggedChanges { ops, log })
}

/// A ring to a peer reactor, and the one message waiting for room on it.
struct PeerOut {
    tx: rtrb::Producer<Part>,
    pending: Option<Part>,
}

/// One reactor thread: prepares the batches the pipeline sends it and routes their rows
/// by key, folds in its own rows and its peers' in input order, sends back what it emits.
struct Reactor {
    index: usize,
    op: Option<Box<dyn Operator>>,
    rx: Consumer<Input>,
    tx: rtrb::Producer<Output>,
    stats: Arc<ReactorStats>,
    wal: Option<ReactorWal>,
    /// An output message waiting for room on the output ring.
    pending: Option<Output>,
    /// By reactor index; `None` at this reactor's own.
    peers_out: Vec<Option<PeerOut>>,
    peers_in: Vec<Option<Consumer<Part>>>,
    /// Every reactor's thread, to wake a peer that has a message.
    threads: Arc<[OnceLock<Thread>]>,
    /// The pipeline's watermark as of the last message taken: rows of the batches it
    /// sends from now on are judged late against it.
    stream_watermark: i64,
    /// Prepared, not yet folded in, in input order.
    queue: VecDeque<Item>,
    out: Vec<RecordBatch>,
    late: Vec<LateRows>,
    routed: Vec<(usize, KeyedRows)>,
}

/// What a reactor's step did.
enum Step {
    Worked,
    Idle,
    /// Waiting for room on a ring.
    Blocked,
    Stop,
}

impl Reactor {
    fn run(mut self) {
        let mut backoff = Backoff::default();
        loop {
            match self.step() {
                Step::Worked => backoff = Backoff::default(),
                Step::Idle => backoff.wait(REACTOR_PARK),
                Step::Blocked => backoff.wait(WAIT_PARK),
                Step::Stop => return,
            }
        }
    }

    /// Pushes what waits for room; folds in the next item when it can, else (with
    /// nothing waiting for a peer and room in the queue) takes the pipeline's next
    /// message. One operator call per step, so what waits is at most one message per
    /// destination.
    fn step(&mut self) -> Step {
        if self.tx.is_abandoned() {
            return Step::Stop;
        }
        let pushed = self.push_pending();
        if self.pending.is_some() {
            return if pushed { Step::Worked } else { Step::Blocked };
        }
        let started = Instant::now();
        let result = if let Some(result) = self.fold_in() {
            result
        } else if self.queue.len() >= APPLY_QUEUE_ITEMS
            || self.peers_out.iter().flatten().any(|p| p.pending.is_some())
        {
            return if pushed { Step::Worked } else { Step::Blocked };
        } else {
            match self.rx.pop() {
                Ok(message) => self.take_input(message),
                Err(_) if self.rx.is_abandoned() => return Step::Stop,
                Err(_) => return if pushed { Step::Worked } else { Step::Idle },
            }
        };
        self.publish();
        self.stats
            .busy_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if let Err(e) = result {
            self.pending = Some(Output::Failed(e.strip_backtrace()));
            self.push_pending_blocking();
            return Step::Stop;
        }
        if self.pending.is_none() && (!self.out.is_empty() || !self.late.is_empty()) {
            self.pending = Some(Output::Rows {
                out: std::mem::take(&mut self.out),
                late: std::mem::take(&mut self.late),
            });
        }
        Step::Worked
    }

    /// Pushes the waiting messages that have room; whether any went.
    fn push_pending(&mut self) -> bool {
        let mut pushed = false;
        if let Some(message) = self.pending.take() {
            match self.tx.push(message) {
                Ok(()) => pushed = true,
                Err(PushError::Full(m)) => self.pending = Some(m),
            }
        }
        for (i, peer) in self.peers_out.iter_mut().enumerate() {
            let Some(peer) = peer else { continue };
            if peer.tx.is_abandoned() {
                // That reactor stopped; the pipeline reports it.
                peer.pending = None;
            }
            if let Some(message) = peer.pending.take() {
                match peer.tx.push(message) {
                    Ok(()) => {
                        pushed = true;
                        if let Some(thread) = self.threads[i].get() {
                            thread.unpark();
                        }
                    }
                    Err(PushError::Full(m)) => peer.pending = Some(m),
                }
            }
        }
        pushed
    }

    /// Sends the waiting output message, waiting while the output ring is full.
    fn push_pending_blocking(&mut self) {
        let mut backoff = Backoff::default();
        while let Some(message) = self.pending.take() {
            if let Err(PushError::Full(m)) = self.tx.push(message) {
                if self.tx.is_abandoned() {
                    return;
                }
                self.pending = Some(m);
                backoff.wait(WAIT_PARK);
            }
        }
    }

    /// Folds in the next item of the input order, if it is here: the front of the
    /// queue when its turn has come, else the rows of the next batch from the peer that
    /// routed it. `None`: nothing to fold in yet.
    fn fold_in(&mut self) -> Option<Result<(), DataFusionError>> {
        let op = self.op.as_mut()?;
        let front = self.queue.front()?;
        // Only this thread writes the count; the pipeline thread reads it.
        let folded = self.stats.folded.load(Ordering::Relaxed);
        if front.position() > folded {
            // Batch `folded` went to a peer: its rows of it come from there.
            let from = (folded % self.peers_in.len() as u64) as usize;
            let Some(rx) = self.peers_in[from].as_mut() else {
                panic!(
                    "batch {folded} is reactor {}'s own but not queued",
                    self.index
                );
            };
            let part = rx.pop().ok()?;
            assert_eq!(part.seq, folded, "rows of batches in order from a peer");
            self.stats.folded.store(folded + 1, Ordering::Release);
            let Some(rows) = part.rows else {
                return Some(Ok(()));
            };
            let count = rows.rows.num_rows() as u64;
            let result = op.process_keyed(rows, &mut self.out, &mut self.late);
            self.stats
                .latency
                .record(part.sent.elapsed().as_nanos() as u64, count);
            return Some(result);
        }
        let item = self.queue.pop_front()?;
        Some(match item {
            Item::Own {
                rows, sent, count, ..
            } => {
                self.stats.folded.store(folded + 1, Ordering::Release);
                let result = rows.map_or(Ok(()), |rows| {
                    op.process_keyed(rows, &mut self.out, &mut self.late)
                });
                self.stats
                    .latency
                    .record(sent.elapsed().as_nanos() as u64, count);
                result
            }
            Item::Control { control, .. } => match control {
                Control::Watermark(w) => op.handle_watermark(w, &mut self.out),
                Control::Tick(now) => op.handle_tick(now, &mut self.out),
                Control::Flush => {
                    self.pending = Some(Output::Flushed);
                    Ok(())
                }
            },
        })
    }

    /// Handles one message from the pipeline.
    fn take_input(&mut self, message: Input) -> Result<(), DataFusionError> {
        match (message, self.op.as_mut()) {
            (Input::Return(op), None) => {
                self.op = Some(op);
            }
            (Input::Lend, Some(_)) => {
                debug_assert!(
                    self.queue.is_empty(),
                    "lent between a flush and the next input"
                );
                self.pending = self.op.take().map(Output::Lent);
            }
            (Input::Checkpoint { epoch, retain_from }, Some(op)) => {
                debug_assert!(
                    self.queue.is_empty(),
                    "checkpointed between a flush and the next input"
                );
                let result = checkpoint(op.as_mut(), &mut self.wal, epoch, retain_from);
                self.pending = Some(Output::Checkpointed(result));
            }
            (Input::Batch { batch, seq, sent }, Some(op)) => {
                let result = op.route_batch(
                    &batch,
                    self.stream_watermark,
                    &mut self.late,
                    &mut self.routed,
                );
                let mut own = None;
                let mut routed = 0;
                for (to, rows) in self.routed.drain(..) {
                    if to == self.index {
                        own = Some(rows);
                        continue;
                    }
                    routed += rows.rows.num_rows() as u64;
                    let Some(peer) = self.peers_out[to].as_mut() else {
                        panic!("rows routed to reactor {to}: not a peer");
                    };
                    assert!(peer.pending.is_none(), "one part per peer and batch");
                    peer.pending = Some(Part {
                        seq,
                        rows: Some(rows),
                        sent,
                    });
                }
                // Every peer hears of every batch, so it knows when it has all rows of it.
                for peer in self.peers_out.iter_mut().flatten() {
                    peer.pending.get_or_insert(Part {
                        seq,
                        rows: None,
                        sent,
                    });
                }
                self.push_pending();
                result?;
                // The own part is the whole prepared batch: its rows less those routed.
                let count = own
                    .as_ref()
                    .map_or(0, |r| r.rows.num_rows() as u64)
                    .saturating_sub(routed);
                self.queue.push_back(Item::Own {
                    seq,
                    rows: own,
                    sent,
                    count,
                });
            }
            (Input::Control { control, after }, Some(_)) => {
                if let Control::Watermark(w) = control {
                    self.stream_watermark = self.stream_watermark.max(w);
                }
                self.queue.push_back(Item::Control { control, after });
            }
            (_, _) => {
                return Err(DataFusionError::Internal(
                    "a reactor got a message out of order (operator lent or not)".into(),
                ));
            }
        }
        Ok(())
    }

    fn publish(&self) {
        if let Some(op) = &self.op {
            publish(op.as_ref(), &self.stats);
        }
    }
}

/// Publishes an operator's counters.
fn publish(op: &dyn Operator, stats: &ReactorStats) {
    stats
        .groups
        .store(op.state_groups() as u64, Ordering::Relaxed);
    stats.state_bytes.store(op.state_bytes(), Ordering::Relaxed);
    stats
        .windows_open
        .store(op.windows_open() as u64, Ordering::Relaxed);
    stats
        .windows_closed
        .store(op.windows_closed(), Ordering::Relaxed);
}

/// Spin briefly, then yield, then sleep: a waiting thread costs little CPU after the
/// first microseconds and answers within `park` after that.
#[derive(Default)]
struct Backoff {
    rounds: u32,
}

impl Backoff {
    fn wait(&mut self, park: Duration) {
        self.rounds = self.rounds.saturating_add(1);
        if self.rounds <= 64 {
            std::hint::spin_loop();
        } else if self.rounds <= 96 {
            std::thread::yield_now();
        } else {
            std::thread::park_timeout(park);
        }
    }
}

/// The CPUs this process may run on, in order.
fn allowed_cores() -> Vec<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid, writable cpu_set_t of the size passed.
        let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set) };
        if rc == 0 {
            // SAFETY: CPU_ISSET reads within `set` for indices below CPU_SETSIZE.
            return (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
                .collect();
        }
    }
    Vec::new()
}

/// Pins this thread to `core`; a failure (a sandbox that forbids it) is logged and the
/// reactor runs unpinned.
fn pin_to(core: usize) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `core` comes from `allowed_cores`, below CPU_SETSIZE.
        unsafe { libc::CPU_SET(core, &mut set) };
        // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is this thread.
        let rc =
            unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) };
        if rc != 0 {
            tracing::warn!(core, error = %std::io::Error::last_os_error(), "could not pin a reactor thread to its core; it runs unpinned");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = core;
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
    use datafusion::error::DataFusionError;

    use std::sync::Mutex;

    use super::{IN_FLIGHT_BATCHES_PER_REACTOR, PEER_RING_SLOTS, RING_SLOTS, ShardedOperator};
    use crate::operator::{KeyedRows, LateRows, Operator};

    /// Counts the rows of its shard (value % count == index), routing the others to
    /// theirs; each watermark emits one row with the count so far and notes, in `seen`,
    /// (shard, watermark, rows below the watermark taken). Can be slowed down, made to
    /// fail or to panic.
    struct Counter {
        shard: (usize, usize),
        rows: i64,
        values: Vec<i64>,
        batches: u64,
        delay: Duration,
        fail_at_batch: Option<u64>,
        panic_at_batch: Option<u64>,
        seen: Arc<Mutex<Vec<(usize, i64, usize)>>>,
    }

    fn values(batch: &RecordBatch) -> &[i64] {
        arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(batch.column(0)).values()
    }

    impl Counter {
        fn owns(&self, v: i64) -> bool {
            v as usize % self.shard.1 == self.shard.0
        }

        fn take(&mut self, batch: &RecordBatch) {
            for &v in values(batch) {
                assert!(self.owns(v), "shard {:?} got {v}", self.shard);
                self.rows += 1;
                self.values.push(v);
            }
        }
    }

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]))
    }

    fn batch(values: std::ops::Range<i64>) -> RecordBatch {
        RecordBatch::try_new(
            schema(),
            vec![Arc::new(Int64Array::from_iter_values(values))],
        )
        .unwrap()
    }

    impl Operator for Counter {
        fn name(&self) -> &'static str {
            "counter"
        }
        fn input(&self) -> &'static str {
            "numbers"
        }
        fn schema(&self) -> SchemaRef {
            schema()
        }
        fn is_stateful(&self) -> bool {
            true
        }
        fn shard(&mut self, index: usize, count: usize) -> bool {
            self.shard = (index, count);
            true
        }
        fn process_batch(
            &mut self,
            _batch: &RecordBatch,
            _out: &mut Vec<RecordBatch>,
            _late: &mut Vec<LateRows>,
        ) -> Result<(), DataFusionError> {
            unreachable!("a shard takes its rows through route_batch")
        }
        fn route_batch(
            &mut self,
            batch: &RecordBatch,
            watermark: i64,
            _late: &mut Vec<LateRows>,
            routed: &mut Vec<(usize, KeyedRows)>,
        ) -> Result<(), DataFusionError> {
            self.batches += 1;
            std::thread::sleep(self.delay);
            if self.fail_at_batch == Some(self.batches) {
                return Err(DataFusionError::Execution("counter broke".into()));
            }
            assert!(
                self.panic_at_batch != Some(self.batches),
                "counter panicked"
            );
            let count = self.shard.1;
            for shard in 0..count {
                let rows: Vec<u32> = (0..batch.num_rows() as u32)
                    .filter(|&r| values(batch)[r as usize] as usize % count == shard)
                    .collect();
                let rows = arrow::compute::take_record_batch(
                    batch,
                    &arrow::array::UInt32Array::from(rows),
                )
                .unwrap();
                if rows.num_rows() > 0 {
                    routed.push((
                        shard,
                        KeyedRows {
                            rows,
                            keys: None,
                            watermark,
                        },
                    ));
                }
            }
            Ok(())
        }
        fn process_keyed(
            &mut self,
            rows: KeyedRows,
            _out: &mut Vec<RecordBatch>,
            _late: &mut Vec<LateRows>,
        ) -> Result<(), DataFusionError> {
            std::thread::sleep(self.delay);
            self.take(&rows.rows);
            Ok(())
        }
        fn handle_watermark(
            &mut self,
            watermark: i64,
            out: &mut Vec<RecordBatch>,
        ) -> Result<(), DataFusionError> {
            let below = self.values.iter().filter(|&&v| v < watermark).count();
            self.seen
                .lock()
                .unwrap()
                .push((self.shard.0, watermark, below));
            out.push(
                RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from(vec![self.rows]))])
                    .unwrap(),
            );
            Ok(())
        }
        fn state_groups(&self) -> usize {
            self.rows as usize
        }
        fn explain(&self) -> String {
            "Counter\n".into()
        }
    }

    fn counters(n: usize, make: impl Fn(usize) -> Counter) -> ShardedOperator {
        let ops: Vec<Box<dyn Operator>> = (0..n)
            .map(|i| {
                let mut c = make(i);
                assert!(c.shard(i, n));
                Box::new(c) as Box<dyn Operator>
            })
            .collect();
        ShardedOperator::start(ops, false).unwrap()
    }

    fn plain(_: usize) -> Counter {
        Counter {
            shard: (0, 1),
            rows: 0,
            values: Vec::new(),
            seen: Arc::default(),
            batches: 0,
            delay: Duration::ZERO,
            fail_at_batch: None,
            panic_at_batch: None,
        }
    }

    fn total(out: &[RecordBatch]) -> i64 {
        out.iter()
            .map(|b| {
                arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(b.column(0))
                    .value(0)
            })
            .sum()
    }

    #[test]
    fn every_row_is_counted_once_across_reactors_and_flush_hands_out_everything() {
        let mut op = counters(3, plain);
        let (mut out, mut late) = (Vec::new(), Vec::new());
        for i in 0..200 {
            op.process_batch(&batch(i * 100..(i + 1) * 100), &mut out, &mut late)
                .unwrap();
        }
        out.clear();
        op.handle_watermark(1, &mut out).unwrap();
        op.flush(&mut out, &mut late).unwrap();
        // One row per reactor, summing to every input row.
        assert_eq!(out.len(), 3);
        assert_eq!(total(&out), 20_000);
        assert_eq!(op.state_groups(), 20_000);
    }

    #[test]
    fn a_watermark_takes_effect_on_a_reactor_only_once_the_rows_routed_to_it_before_it_arrived() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        // Reactor 0 is slow: the rows it routes to the others reach them late.
        let mut op = counters(3, |i| Counter {
            delay: if i == 0 {
                Duration::from_micros(300)
            } else {
                Duration::ZERO
            },
            seen: Arc::clone(&seen),
            ..plain(i)
        });
        let (mut out, mut late) = (Vec::new(), Vec::new());
        for i in 0..300 {
            op.process_batch(&batch(i * 10..(i + 1) * 10), &mut out, &mut late)
                .unwrap();
            op.handle_watermark((i + 1) * 10, &mut out).unwrap();
        }
        op.flush(&mut out, &mut late).unwrap();
        let seen = seen.lock().unwrap();
        assert!(seen.len() >= 3, "{seen:?}");
        for &(shard, watermark, below) in seen.iter() {
            // Values below the watermark of this shard: value % 3 == shard.
            let expected = (0..watermark).filter(|v| v % 3 == shard as i64).count();
            assert_eq!(below, expected, "shard {shard} at watermark {watermark}");
        }
        // Every reactor took every watermark, in its place among the batches.
        assert_eq!(seen.len(), 3 * 300);
        assert_eq!(op.state_groups(), 3000);
    }

    #[test]
    fn a_slow_reactor_holds_the_caller_back_instead_of_queueing_without_bound() {
        let delay = Duration::from_millis(5);
        let mut op = counters(2, |i| Counter {
            delay: if i == 1 { delay } else { Duration::ZERO },
            ..plain(i)
        });
        let (mut out, mut late) = (Vec::new(), Vec::new());
        let batches = 4 * RING_SLOTS;
        let started = Instant::now();
        for i in 0..batches as i64 {
            op.process_batch(&batch(i * 10..(i + 1) * 10), &mut out, &mut late)
                .unwrap();
        }
        // Every batch has rows of reactor 1's, taken one at a time whether sent to it or
        // routed to it by reactor 0: the caller returns only once all but the batches
        // it may hand out ahead were folded in, far fewer than the rings hold.
        let held = started.elapsed();
        let buffered = 2 * IN_FLIGHT_BATCHES_PER_REACTOR as usize;
        assert!(buffered < 2 * RING_SLOTS + PEER_RING_SLOTS);
        assert!(
            held >= delay * (batches - buffered) as u32,
            "returned after {held:?}: the rings are not bounded"
        );
        // The wait is reported as backpressure (the idle-partition clock leaves it out).
        let blocked = op.take_blocked();
        assert!(blocked >= held / 2, "blocked {blocked:?} of {held:?}");
        assert_eq!(op.take_blocked(), Duration::ZERO);
        op.handle_watermark(1, &mut out).unwrap();
        op.flush(&mut out, &mut late).unwrap();
        assert_eq!(total(&out), 10 * batches as i64, "nothing dropped");
    }

    #[test]
    fn a_reactor_error_or_panic_is_an_error_of_the_query_not_a_hang() {
        for (fail, panic) in [(Some(3), None), (None, Some(3))] {
            let mut op = counters(2, |i| Counter {
                fail_at_batch: if i == 1 { fail } else { None },
                panic_at_batch: if i == 1 { panic } else { None },
                ..plain(i)
            });
            let (mut out, mut late) = (Vec::new(), Vec::new());
            let mut error = None;
            for i in 0..10 {
                if let Err(e) = op.process_batch(&batch(i..i + 1), &mut out, &mut late) {
                    error = Some(e);
                    break;
                }
            }
            let error = error
                .or_else(|| op.flush(&mut out, &mut late).err())
                .expect("the failure reaches the caller");
            let text = error.to_string();
            assert!(text.contains("query `counter`, reactor 1"), "{text}");
            if fail.is_some() {
                assert!(text.contains("counter broke"), "{text}");
            } else {
                assert!(text.contains("stopped"), "{text}");
            }
        }
    }
}
