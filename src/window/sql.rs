//! The per-window computation, in DataFusion SQL kept in `sql/`. Consumes
//! decoded event batches (with their window bins) and merged partial
//! aggregates; produces partial aggregates per (window_start, service), item
//! counts per window, and final `minute_stats` rows. Registers the sketch
//! functions the SQL uses: `hdr_sketch`, `hdr_merge`, `hdr_quantile`,
//! `hll_sketch`, `hll_merge`, `hll_count`. Deterministic; no I/O.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BinaryBuilder, Float64Array, Float64Builder, Int32Array,
    Int64Array, StringArray, TimestampMillisecondArray, UInt64Array,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, ScalarValue, project_schema};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{
    Accumulator, ColumnarValue, Expr, TableType, Volatility, create_udaf, create_udf,
};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType, reset_plan_states};
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties, collect,
};
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::model::ts_type;
use crate::sketch::{Hll, SparseHist};
use crate::window::{Partial, StoredPartial};

pub const MINUTE_PARTIALS_SQL: &str = include_str!("../../sql/minute_partials.sql");
pub const TOP_ITEMS_PARTIAL_SQL: &str = include_str!("../../sql/top_items_partial.sql");
pub const MINUTE_STATS_SQL: &str = include_str!("../../sql/minute_stats.sql");

#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error("query failed: {0}")]
    DataFusion(#[from] DataFusionError),
    #[error("unexpected result shape: {0}")]
    Shape(String),
}

/// Schema of the `batch` table the per-batch SQL reads: counted events'
/// grouping columns plus their window bin.
pub fn batch_input_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("window_start", ts_type(), false),
        Field::new("service", DataType::Utf8, false),
        Field::new("status", DataType::UInt16, true),
        Field::new("latency_ms", DataType::Float64, true),
        Field::new("user_id", DataType::UInt64, true),
        Field::new("item_id", DataType::UInt64, true),
        Field::new("src_partition", DataType::Int32, false),
        Field::new("event_type", DataType::Utf8, true),
    ]))
}

/// Schema of `minute_partials.sql`'s output and `minute_stats.sql`'s input.
pub fn partials_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("window_start", ts_type(), false),
        Field::new("service", DataType::Utf8, false),
        Field::new("requests", DataType::Int64, false),
        Field::new("errors", DataType::Int64, false),
        Field::new("client_errors", DataType::Int64, false),
        Field::new("latency_sum_ms", DataType::Float64, false),
        Field::new("latency_count", DataType::Int64, false),
        Field::new("latency_max_ms", DataType::Float64, true),
        Field::new("latency_hist", DataType::Binary, true),
        Field::new("users_hll", DataType::Binary, true),
        Field::new("src_partition", DataType::Int32, false),
        Field::new("views", DataType::Int64, false),
        Field::new("carts", DataType::Int64, false),
        Field::new("purchases", DataType::Int64, false),
        Field::new("ratings", DataType::Int64, false),
    ]))
}

/// A DataFusion session with pulse's functions registered.
///
/// Each query text is planned once per input schema, down to its physical
/// plan, against a table whose scan reads a slot; a run puts its batch in the
/// slot and executes a fresh copy of the plan (`reset_plan_states`: new
/// metrics and state, the same operators and expressions). Planning from SQL
/// every time was ~5% of the pipeline's instructions, and creating the
/// physical plan every time (four queries per decoded batch) another ~3%.
pub struct SqlEngine {
    ctx: SessionContext,
    plans: std::sync::Mutex<std::collections::HashMap<&'static str, Prepared>>,
}

/// A query planned for one input schema.
#[derive(Clone)]
struct Prepared {
    schema: SchemaRef,
    plan: Arc<dyn ExecutionPlan>,
    slot: Slot,
    /// One run of this plan at a time: the slot holds that run's input.
    gate: Arc<tokio::sync::Mutex<()>>,
}

/// The input of the current run of a prepared plan.
type Slot = Arc<std::sync::Mutex<Option<RecordBatch>>>;

impl Default for SqlEngine {
    fn default() -> Self {
        Self::new()
    }
}

/// A session with pulse's SQL functions registered.
pub fn session_context() -> SessionContext {
    context_with(base_config())
}

/// Batches are small and already in memory: one partition avoids
/// repartitioning overhead that would dominate such queries.
fn base_config() -> SessionConfig {
    SessionConfig::new().with_target_partitions(1)
}

fn context_with(cfg: SessionConfig) -> SessionContext {
    let ctx = SessionContext::new_with_config(cfg);
    register_functions(&ctx);
    ctx
}

impl SqlEngine {
    pub fn new() -> Self {
        // A plan is executed again and again: no dynamic filters, whose
        // state a re-executed plan could not reset (none of pulse's queries
        // has a TopK, join or ungrouped min/max that would make one).
        let mut cfg = base_config();
        cfg.options_mut().optimizer.enable_dynamic_filter_pushdown = false;
        cfg.options_mut()
            .optimizer
            .enable_topk_dynamic_filter_pushdown = false;
        cfg.options_mut()
            .optimizer
            .enable_join_dynamic_filter_pushdown = false;
        cfg.options_mut()
            .optimizer
            .enable_aggregate_dynamic_filter_pushdown = false;
        SqlEngine {
            ctx: context_with(cfg),
            plans: Default::default(),
        }
    }

    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Plans `sql` with `table` scanning a fresh slot of `schema`.
    async fn prepare(
        &self,
        table: &str,
        sql: &'static str,
        schema: SchemaRef,
    ) -> Result<Prepared, SqlError> {
        let slot = Slot::default();
        let provider = Arc::new(SlotTable {
            schema: schema.clone(),
            slot: slot.clone(),
        });
        let _ = self.ctx.deregister_table(table)?;
        self.ctx.register_table(table, provider)?;
        let state = self.ctx.state();
        let planned = match state.create_logical_plan(sql).await {
            Ok(p) => state.create_physical_plan(&p).await,
            Err(e) => Err(e),
        };
        let _ = self.ctx.deregister_table(table)?;
        Ok(Prepared {
            schema,
            plan: planned?,
            slot,
            gate: Default::default(),
        })
    }

    async fn run(
        &self,
        table: &str,
        input: RecordBatch,
        sql: &'static str,
    ) -> Result<Vec<RecordBatch>, SqlError> {
        let schema = input.schema();
        let cached = self
            .plans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(sql)
            .filter(|p| p.schema == schema)
            .cloned();
        let prepared = match cached {
            Some(p) => p,
            None => {
                let p = self.prepare(table, sql, schema).await?;
                self.plans
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(sql, p.clone());
                p
            }
        };
        let _one_run = prepared.gate.lock().await;
        *prepared.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(input);
        let out = match reset_plan_states(prepared.plan.clone()) {
            Ok(exec) => collect(exec, self.ctx.task_ctx()).await,
            Err(e) => Err(e),
        };
        prepared
            .slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        Ok(out?)
    }

    /// Runs `minute_partials.sql` on `batch` (events + `window_start`).
    pub async fn partials(&self, batch: RecordBatch) -> Result<Vec<PartialRow>, SqlError> {
        let out = self.run("batch", batch, MINUTE_PARTIALS_SQL).await?;
        let mut res = Vec::new();
        for b in out {
            res.extend(batch_to_partials(&b)?);
        }
        Ok(res)
    }

    /// Runs `top_items_partial.sql`: (src_partition, window_start, item_id, requests).
    pub async fn item_counts(&self, batch: RecordBatch) -> Result<Vec<ItemCount>, SqlError> {
        let out = self.run("batch", batch, TOP_ITEMS_PARTIAL_SQL).await?;
        let mut res = Vec::new();
        for b in out {
            let ws = col_i64(&b, "window_start", &DataType::Int64)?;
            let item = b
                .column_by_name("item_id")
                .ok_or_else(|| SqlError::Shape("item_id".into()))?;
            let item = cast(item, &DataType::UInt64).map_err(DataFusionError::from)?;
            let item = item.as_primitive::<datafusion::arrow::datatypes::UInt64Type>();
            let n = col_i64(&b, "requests", &DataType::Int64)?;
            let part = col_i32(&b)?;
            for i in 0..b.num_rows() {
                res.push(ItemCount {
                    partition: part.value(i),
                    window_start_ms: ws.value(i),
                    item: item.value(i),
                    requests: n.value(i),
                });
            }
        }
        Ok(res)
    }

    /// Runs `minute_stats.sql` over partial rows; output has [`crate::model::minute_stats_schema`].
    pub async fn minute_stats(&self, partials: RecordBatch) -> Result<RecordBatch, SqlError> {
        let schema = crate::model::minute_stats_schema();
        if partials.num_rows() == 0 {
            return Ok(RecordBatch::new_empty(schema));
        }
        let out = self.run("partials", partials, MINUTE_STATS_SQL).await?;
        let merged = datafusion::arrow::compute::concat_batches(
            &out.first()
                .map(|b| b.schema())
                .unwrap_or_else(|| schema.clone()),
            &out,
        )
        .map_err(DataFusionError::from)?;
        conform(&merged, &schema)
    }
}

/// A table whose scan reads the batch in its slot when executed.
#[derive(Debug)]
struct SlotTable {
    schema: SchemaRef,
    slot: Slot,
}

#[async_trait::async_trait]
impl TableProvider for SlotTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        let projected = project_schema(&self.schema, projection)?;
        Ok(Arc::new(SlotExec {
            projection: projection.cloned(),
            slot: self.slot.clone(),
            props: Arc::new(PlanProperties::new(
                EquivalenceProperties::new(projected),
                Partitioning::UnknownPartitioning(1),
                EmissionType::Incremental,
                Boundedness::Bounded,
            )),
        }))
    }
}

/// Scan of a [`SlotTable`]: one partition, the slot's batch, statistics
/// unknown (so no plan is specialised to the batch it was planned with).
#[derive(Debug)]
struct SlotExec {
    projection: Option<Vec<usize>>,
    slot: Slot,
    props: Arc<PlanProperties>,
}

impl DisplayAs for SlotExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "SlotExec")
    }
}

impl ExecutionPlan for SlotExec {
    fn name(&self) -> &str {
        "SlotExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.props
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> datafusion::common::Result<TreeNodeRecursion>,
    ) -> datafusion::common::Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        _partition: usize,
        _context: Arc<TaskContext>,
    ) -> datafusion::common::Result<SendableRecordBatchStream> {
        let batch = self
            .slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| DataFusionError::Internal("SlotExec executed without input".into()))?;
        let schema = batch.schema();
        Ok(Box::pin(MemoryStream::try_new(
            vec![batch],
            schema,
            self.projection.clone(),
        )?))
    }
}

/// Casts a result batch to `schema` by column name (SQL output types can vary
/// with DataFusion's coercions; the table schemas must not).
pub fn conform(b: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, SqlError> {
    let mut cols = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        let c = b
            .column_by_name(f.name())
            .ok_or_else(|| SqlError::Shape(format!("missing column {}", f.name())))?;
        cols.push(cast(c, f.data_type()).map_err(DataFusionError::from)?);
    }
    RecordBatch::try_new(schema.clone(), cols)
        .map_err(|e| SqlError::Shape(format!("result does not fit its schema: {e}")))
}

fn col_i64(b: &RecordBatch, name: &str, _t: &DataType) -> Result<Int64Array, SqlError> {
    let c = b
        .column_by_name(name)
        .ok_or_else(|| SqlError::Shape(format!("missing column {name}")))?;
    let c = cast(c, &DataType::Int64).map_err(DataFusionError::from)?;
    Ok(c.as_primitive::<datafusion::arrow::datatypes::Int64Type>()
        .clone())
}

fn col_f64(b: &RecordBatch, name: &str) -> Result<Float64Array, SqlError> {
    let c = b
        .column_by_name(name)
        .ok_or_else(|| SqlError::Shape(format!("missing column {name}")))?;
    let c = cast(c, &DataType::Float64).map_err(DataFusionError::from)?;
    Ok(
        c.as_primitive::<datafusion::arrow::datatypes::Float64Type>()
            .clone(),
    )
}

fn col_binary(b: &RecordBatch, name: &str) -> Result<BinaryArray, SqlError> {
    let c = b
        .column_by_name(name)
        .ok_or_else(|| SqlError::Shape(format!("missing column {name}")))?;
    let c = cast(c, &DataType::Binary).map_err(DataFusionError::from)?;
    Ok(c.as_binary::<i32>().clone())
}

/// Parses partial rows (the output of `minute_partials.sql`).
pub fn batch_to_partials(b: &RecordBatch) -> Result<Vec<PartialRow>, SqlError> {
    let ws = col_i64(b, "window_start", &DataType::Int64)?;
    let part = col_i32(b)?;
    let svc = b
        .column_by_name("service")
        .ok_or_else(|| SqlError::Shape("service".into()))?;
    let svc = cast(svc, &DataType::Utf8).map_err(DataFusionError::from)?;
    let svc = svc.as_string::<i32>();
    let req = col_i64(b, "requests", &DataType::Int64)?;
    let err = col_i64(b, "errors", &DataType::Int64)?;
    let cerr = col_i64(b, "client_errors", &DataType::Int64)?;
    let lsum = col_f64(b, "latency_sum_ms")?;
    let lcnt = col_i64(b, "latency_count", &DataType::Int64)?;
    let lmax = col_f64(b, "latency_max_ms")?;
    let hist = col_binary(b, "latency_hist")?;
    let hll = col_binary(b, "users_hll")?;
    let types = [
        col_i64(b, "views", &DataType::Int64)?,
        col_i64(b, "carts", &DataType::Int64)?,
        col_i64(b, "purchases", &DataType::Int64)?,
        col_i64(b, "ratings", &DataType::Int64)?,
    ];
    let mut out = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        let p = Partial {
            requests: req.value(i),
            errors: err.value(i),
            client_errors: cerr.value(i),
            latency_sum_ms: if lsum.is_null(i) { 0.0 } else { lsum.value(i) },
            latency_count: lcnt.value(i),
            latency_max_ms: (!lmax.is_null(i)).then(|| lmax.value(i)),
            hist: if hist.is_null(i) {
                SparseHist::default()
            } else {
                SparseHist::from_bytes(hist.value(i))
                    .ok_or_else(|| SqlError::Shape("bad latency_hist".into()))?
            },
            users: if hll.is_null(i) {
                Hll::default()
            } else {
                Hll::from_bytes(hll.value(i))
                    .ok_or_else(|| SqlError::Shape("bad users_hll".into()))?
            },
            types: types.each_ref().map(|c| c.value(i)),
        };
        out.push(PartialRow {
            partition: part.value(i),
            window_start_ms: ws.value(i),
            service: svc.value(i).to_string(),
            partial: p,
        });
    }
    Ok(out)
}

/// One row of `minute_partials.sql`: a source partition's partial
/// aggregate of a (window, service).
#[derive(Debug, Clone)]
pub struct PartialRow {
    pub partition: i32,
    pub window_start_ms: i64,
    pub service: String,
    pub partial: Partial,
}

/// One row of `top_items_partial.sql`: an item's requests in a partition's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemCount {
    pub partition: i32,
    pub window_start_ms: i64,
    pub item: u64,
    pub requests: i64,
}

/// A stored partial to merge: one input row of `minute_stats.sql`
/// (`partition` -1 for rows merged over partitions).
#[derive(Debug, Clone, Copy)]
pub struct PartialRef<'a> {
    pub partition: i32,
    pub window_start_ms: i64,
    pub service: &'a str,
    pub partial: &'a StoredPartial,
}

/// Reads `src_partition` (Int32) of a result batch.
fn col_i32(b: &RecordBatch) -> Result<Int32Array, SqlError> {
    let c = b
        .column_by_name("src_partition")
        .ok_or_else(|| SqlError::Shape("src_partition".into()))?;
    let c = cast(c, &DataType::Int32).map_err(DataFusionError::from)?;
    Ok(c.as_primitive::<datafusion::arrow::datatypes::Int32Type>()
        .clone())
}

/// Builds a `partials` batch from stored partials.
pub fn partials_to_batch(rows: &[PartialRef<'_>]) -> RecordBatch {
    let ws =
        TimestampMillisecondArray::from(rows.iter().map(|r| r.window_start_ms).collect::<Vec<_>>())
            .with_timezone("UTC");
    let svc = StringArray::from(rows.iter().map(|r| r.service).collect::<Vec<_>>());
    let i64s = |f: fn(&StoredPartial) -> i64| {
        Int64Array::from(rows.iter().map(|r| f(r.partial)).collect::<Vec<_>>())
    };
    let mut hist = BinaryBuilder::new();
    let mut hll = BinaryBuilder::new();
    let mut lmax = Float64Builder::new();
    for r in rows {
        hist.append_value(&r.partial.hist);
        hll.append_value(r.partial.users.to_bytes());
        lmax.append_option(r.partial.latency_max_ms);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(ws),
        Arc::new(svc),
        Arc::new(i64s(|p| p.requests)),
        Arc::new(i64s(|p| p.errors)),
        Arc::new(i64s(|p| p.client_errors)),
        Arc::new(Float64Array::from(
            rows.iter()
                .map(|r| r.partial.latency_sum_ms)
                .collect::<Vec<_>>(),
        )),
        Arc::new(i64s(|p| p.latency_count)),
        Arc::new(lmax.finish()),
        Arc::new(hist.finish()),
        Arc::new(hll.finish()),
        Arc::new(Int32Array::from(
            rows.iter().map(|r| r.partition).collect::<Vec<_>>(),
        )),
        Arc::new(i64s(|p| p.types[0])),
        Arc::new(i64s(|p| p.types[1])),
        Arc::new(i64s(|p| p.types[2])),
        Arc::new(i64s(|p| p.types[3])),
    ];
    RecordBatch::try_new(partials_schema(), cols).expect("partial columns match partials_schema")
}

// ---- sketch functions -------------------------------------------------------

#[derive(Debug)]
enum SketchAcc {
    Hist(SparseHist),
    Hll(Hll),
}

/// Accumulator for `hdr_sketch`/`hll_sketch` (raw input) and `hdr_merge`/`hll_merge`
/// (serialised input). The state is always the serialised sketch.
#[derive(Debug)]
struct SketchAccumulator {
    acc: SketchAcc,
    raw_input: bool,
}

impl SketchAccumulator {
    fn bytes(&self) -> Vec<u8> {
        match &self.acc {
            SketchAcc::Hist(h) => h.to_bytes(),
            SketchAcc::Hll(h) => h.to_bytes(),
        }
    }

    fn merge_serialised(&mut self, arr: &ArrayRef) -> datafusion::common::Result<()> {
        let arr = cast(arr, &DataType::Binary)?;
        let arr = arr.as_binary::<i32>();
        for v in arr.iter().flatten() {
            match &mut self.acc {
                SketchAcc::Hist(h) => {
                    if !h.merge_bytes(v) {
                        return Err(DataFusionError::Execution("corrupt HDR histogram".into()));
                    }
                }
                SketchAcc::Hll(h) => {
                    let o = Hll::from_bytes(v)
                        .ok_or_else(|| DataFusionError::Execution("corrupt HLL sketch".into()))?;
                    h.merge(&o);
                }
            }
        }
        Ok(())
    }
}

impl Accumulator for SketchAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> datafusion::common::Result<()> {
        let v = &values[0];
        if !self.raw_input {
            return self.merge_serialised(v);
        }
        match &mut self.acc {
            SketchAcc::Hist(h) => {
                let v = cast(v, &DataType::Float64)?;
                let v = v.as_primitive::<datafusion::arrow::datatypes::Float64Type>();
                h.merge(&SparseHist::of_ms(v.iter().flatten()));
            }
            SketchAcc::Hll(h) => {
                let v = cast(v, &DataType::UInt64)?;
                let v: &UInt64Array = v.as_primitive();
                for x in v.iter().flatten() {
                    h.add(x);
                }
            }
        }
        Ok(())
    }

    fn evaluate(&mut self) -> datafusion::common::Result<ScalarValue> {
        Ok(ScalarValue::Binary(Some(self.bytes())))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self)
            + match &self.acc {
                SketchAcc::Hist(h) => h.heap_bytes(),
                SketchAcc::Hll(_) => 4096,
            }
    }

    fn state(&mut self) -> datafusion::common::Result<Vec<ScalarValue>> {
        Ok(vec![ScalarValue::Binary(Some(self.bytes()))])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> datafusion::common::Result<()> {
        self.merge_serialised(&states[0])
    }
}

fn sketch_udaf(
    name: &str,
    input: DataType,
    hist: bool,
    raw_input: bool,
) -> datafusion::logical_expr::AggregateUDF {
    create_udaf(
        name,
        vec![input],
        Arc::new(DataType::Binary),
        Volatility::Immutable,
        Arc::new(move |_| {
            Ok(Box::new(SketchAccumulator {
                acc: if hist {
                    SketchAcc::Hist(SparseHist::default())
                } else {
                    SketchAcc::Hll(Hll::default())
                },
                raw_input,
            }))
        }),
        Arc::new(vec![DataType::Binary]),
    )
}

fn register_functions(ctx: &SessionContext) {
    ctx.register_udaf(sketch_udaf("hdr_sketch", DataType::Float64, true, true));
    ctx.register_udaf(sketch_udaf("hdr_merge", DataType::Binary, true, false));
    ctx.register_udaf(sketch_udaf("hll_sketch", DataType::UInt64, false, true));
    ctx.register_udaf(sketch_udaf("hll_merge", DataType::Binary, false, false));

    let quantile = create_udf(
        "hdr_quantile",
        vec![DataType::Binary, DataType::Float64],
        DataType::Float64,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let n = args
                .iter()
                .find_map(|a| match a {
                    ColumnarValue::Array(a) => Some(a.len()),
                    _ => None,
                })
                .unwrap_or(1);
            let hists = args[0].clone().into_array(n)?;
            let hists = hists.as_binary::<i32>();
            let qs = args[1].clone().into_array(n)?;
            let qs = qs.as_primitive::<datafusion::arrow::datatypes::Float64Type>();
            let mut out = Float64Builder::with_capacity(n);
            for i in 0..n {
                if hists.is_null(i) || qs.is_null(i) {
                    out.append_null();
                    continue;
                }
                let h = SparseHist::from_bytes(hists.value(i))
                    .ok_or_else(|| DataFusionError::Execution("corrupt HDR histogram".into()))?;
                out.append_option(h.quantile_ms(qs.value(i)));
            }
            Ok(ColumnarValue::Array(Arc::new(out.finish())))
        }),
    );
    ctx.register_udf(quantile);

    let count = create_udf(
        "hll_count",
        vec![DataType::Binary],
        DataType::Int64,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let n = match &args[0] {
                ColumnarValue::Array(a) => a.len(),
                _ => 1,
            };
            let a = args[0].clone().into_array(n)?;
            let a = a.as_binary::<i32>();
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                if a.is_null(i) {
                    out.push(Some(0));
                    continue;
                }
                let h = Hll::from_bytes(a.value(i))
                    .ok_or_else(|| DataFusionError::Execution("corrupt HLL sketch".into()))?;
                out.push(Some(h.count() as i64));
            }
            Ok(ColumnarValue::Array(Arc::new(Int64Array::from(out))))
        }),
    );
    ctx.register_udf(count);
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{StringArray, UInt16Array};
    use datafusion::arrow::util::pretty::pretty_format_batches;

    fn batch(rows: &[(i64, &str, u16, f64, u64)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("window_start", ts_type(), false),
            Field::new("service", DataType::Utf8, false),
            Field::new("status", DataType::UInt16, true),
            Field::new("latency_ms", DataType::Float64, true),
            Field::new("user_id", DataType::UInt64, true),
            Field::new("item_id", DataType::UInt64, true),
            Field::new("src_partition", DataType::Int32, false),
            Field::new("event_type", DataType::Utf8, true),
        ]));
        // Event types cycle with the user: view, view, cart, purchase, rating, null.
        let types = ["view", "view", "cart", "purchase", "rating"];
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(
                    TimestampMillisecondArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())
                        .with_timezone("UTC"),
                ),
                Arc::new(StringArray::from(
                    rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                )),
                Arc::new(UInt16Array::from(
                    rows.iter().map(|r| r.2).collect::<Vec<_>>(),
                )),
                Arc::new(Float64Array::from(
                    rows.iter().map(|r| r.3).collect::<Vec<_>>(),
                )),
                Arc::new(UInt64Array::from(
                    rows.iter().map(|r| r.4).collect::<Vec<_>>(),
                )),
                Arc::new(UInt64Array::from(
                    rows.iter().map(|r| r.4 % 3).collect::<Vec<_>>(),
                )),
                Arc::new(Int32Array::from(vec![0; rows.len()])),
                Arc::new(StringArray::from(
                    rows.iter()
                        .map(|r| types.get(r.4 as usize % 6).copied())
                        .collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap()
    }

    #[tokio::test]
    async fn partials_then_stats_golden() {
        let e = SqlEngine::new();
        let rows: Vec<(i64, &str, u16, f64, u64)> = (0..100u64)
            .map(|i| {
                let status = if i % 10 == 0 {
                    503
                } else if i % 25 == 1 {
                    404
                } else {
                    200
                };
                (0, "a", status, (i + 1) as f64, i % 7)
            })
            .chain([(60_000, "b", 200, 5.0, 1)])
            .collect();
        // split into two batches to exercise merging of partials
        let b1 = batch(&rows[..50]);
        let b2 = batch(&rows[50..]);
        let mut parts = e.partials(b1).await.unwrap();
        parts.extend(e.partials(b2).await.unwrap());
        // Users 0..7 cycle through the event types (user % 6; 6 has none).
        let mut types = [0i64; 4];
        for p in parts.iter().filter(|p| p.service == "a") {
            for (t, n) in types.iter_mut().zip(p.partial.types) {
                *t += n;
            }
        }
        let want = |u: &[u64]| (0..100u64).filter(|i| u.contains(&(i % 7 % 6))).count() as i64;
        assert_eq!(types, [want(&[0, 1]), want(&[2]), want(&[3]), want(&[4])]);
        let stored: Vec<StoredPartial> = parts
            .iter()
            .map(|r| StoredPartial::of(&r.partial))
            .collect();
        let refs: Vec<PartialRef> = parts
            .iter()
            .zip(&stored)
            .map(|(r, p)| PartialRef {
                partition: r.partition,
                window_start_ms: r.window_start_ms,
                service: &r.service,
                partial: p,
            })
            .collect();
        let stats = e.minute_stats(partials_to_batch(&refs)).await.unwrap();
        let printed = pretty_format_batches(&[stats]).unwrap().to_string();
        // HDR reports the highest value equivalent to the quantile's bucket (3 significant digits).
        let expected = "\
+----------------------+---------+----------+--------+---------------+------------+-----------------+----------------+----------------+----------------+----------------+--------------+---------------+
| window_start         | service | requests | errors | client_errors | error_rate | latency_mean_ms | latency_p50_ms | latency_p95_ms | latency_p99_ms | latency_max_ms | unique_users | src_partition |
+----------------------+---------+----------+--------+---------------+------------+-----------------+----------------+----------------+----------------+----------------+--------------+---------------+
| 1970-01-01T00:00:00Z | a       | 100      | 10     | 4             | 0.1        | 50.5            | 50.015         | 95.039         | 99.007         | 100.0          | 7            | 0             |
| 1970-01-01T00:01:00Z | b       | 1        | 0      | 0             | 0.0        | 5.0             | 5.003          | 5.003          | 5.003          | 5.0            | 1            | 0             |
+----------------------+---------+----------+--------+---------------+------------+-----------------+----------------+----------------+----------------+----------------+--------------+---------------+";
        assert_eq!(printed, expected, "\n{printed}");
        let items = e.item_counts(batch(&rows)).await.unwrap();
        let total: i64 = items.iter().map(|r| r.requests).sum();
        assert_eq!(total, 101);
    }

    #[tokio::test]
    async fn a_cached_plan_reads_each_runs_own_batch_and_replans_for_a_new_schema() {
        let e = SqlEngine::new();
        let x = batch(&[(0, "a", 200, 1.0, 1), (0, "a", 500, 2.0, 2)]);
        let y = batch(&[(60_000, "b", 404, 3.0, 3)]);
        let first = e.item_counts(x.clone()).await.unwrap();
        assert_eq!(first.len(), 2);
        // Same plan, other data: exactly what a fresh engine answers.
        let again = e.item_counts(y.clone()).await.unwrap();
        assert_eq!(
            again,
            SqlEngine::new().item_counts(y.clone()).await.unwrap()
        );
        let count = |item| ItemCount {
            partition: 0,
            window_start_ms: 60_000,
            item,
            requests: 1,
        };
        assert_eq!(again, vec![count(0)]);
        let p = e.partials(y.clone()).await.unwrap();
        assert_eq!(
            (p.len(), p[0].partial.requests, p[0].partial.client_errors),
            (1, 1, 1)
        );
        // item_id as Int64: another schema, planned anew (the SQL casts it).
        let mut cols = y.columns().to_vec();
        cols[5] = Arc::new(datafusion::arrow::array::Int64Array::from(vec![9]));
        let mut fields: Vec<Field> = y
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields[5] = Field::new("item_id", DataType::Int64, true);
        let z = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
        assert_eq!(e.item_counts(z).await.unwrap(), vec![count(9)]);
        assert_eq!(e.item_counts(x).await.unwrap(), first);
    }
}
