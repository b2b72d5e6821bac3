//! Stage micro-benchmarks: window SQL on a decoded batch, factor updates,
//! and Parquet writing. Run with `cargo bench --bench stages`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pulse::config::ValidationConfig;
use pulse::decode::Decoder;
use pulse::factors::trainer::Trainer;
use pulse::model::{Position, RawChunk};
use pulse::sink::parquet::{TableWriter, events_spec};
use pulse::source::generator::{GenParams, Generator};

fn decoded(n: u64) -> datafusion::arrow::record_batch::RecordBatch {
    let mut g = Generator::new(GenParams {
        events: n,
        ..GenParams::default()
    });
    let mut c = RawChunk::new("bench".into());
    let mut line = Vec::new();
    let mut i = 0;
    while {
        line.clear();
        g.next_into(&mut line).is_some()
    } {
        i += 1;
        c.push(
            &line,
            Position {
                partition: 0,
                offset: i,
            },
        );
    }
    Decoder::new(ValidationConfig::default())
        .decode(&c, 0)
        .events
}

/// The decoded batch with the `lateness` column, as the Parquet and factor stages see it.
fn full(
    b: &datafusion::arrow::record_batch::RecordBatch,
) -> datafusion::arrow::record_batch::RecordBatch {
    let mut cols = b.columns().to_vec();
    cols.push(std::sync::Arc::new(
        datafusion::arrow::array::StringArray::from(vec!["on_time"; b.num_rows()]),
    ));
    datafusion::arrow::record_batch::RecordBatch::try_new(pulse::model::events_schema(), cols)
        .unwrap()
}

fn stages(c: &mut Criterion) {
    let batch = full(&decoded(32_768));
    let n = batch.num_rows() as u64;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();

    let mut g = c.benchmark_group("stages");
    g.throughput(Throughput::Elements(n));
    g.sample_size(10);

    // window SQL: the partial aggregates of one batch
    let engine = pulse::window::sql::SqlEngine::new();
    let ws: Vec<i64> = {
        use datafusion::arrow::array::AsArray;
        let ts = batch
            .column(1)
            .as_primitive::<datafusion::arrow::datatypes::TimestampMillisecondType>();
        ts.values()
            .iter()
            .map(|t| t.div_euclid(60_000) * 60_000)
            .collect()
    };
    let sql_in = {
        let schema = pulse::window::sql::batch_input_schema();
        let col = |n: &str| batch.column_by_name(n).unwrap().clone();
        datafusion::arrow::record_batch::RecordBatch::try_new(
            schema,
            vec![
                std::sync::Arc::new(
                    datafusion::arrow::array::TimestampMillisecondArray::from(ws)
                        .with_timezone("UTC"),
                ),
                col("service"),
                col("status"),
                col("latency_ms"),
                col("user_id"),
                col("item_id"),
                col("src_partition"),
            ],
        )
        .unwrap()
    };
    g.bench_function("window_sql_32k", |b| {
        b.iter(|| rt.block_on(engine.partials(sql_in.clone())).unwrap())
    });

    // factor updates
    g.bench_function("factor_updates_32k", |b| {
        b.iter(|| {
            let mut t = Trainer::new(pulse::factors::RecoConfig::default(), 7);
            t.train(&batch)
        })
    });

    // factor updates in steady state: the model has already learnt 500k
    // events, so its user and item tables have the generator's full size
    // (cache misses as in a long run) and no step creates a row.
    let mut steady = Trainer::new(pulse::factors::RecoConfig::default(), 7);
    steady.train(&full(&decoded(500_000)));
    g.bench_function("factor_updates_32k_steady", |b| {
        b.iter(|| steady.train(&batch))
    });

    // a flush (what is published to Redis every `reco.flush_ms`) with
    // nothing learned since the last: the comparison of every item's record
    // with the one last published, the flush's fixed cost
    steady.flush(0);
    g.bench_function("factor_flush_unchanged", |b| b.iter(|| steady.flush(0)));

    // the model snapshot a Kafka run writes every `reco.snapshot_ms`, and
    // the restore at start-up, of that steady model
    let snap = steady.snapshot().unwrap();
    println!("model snapshot of the steady model: {} bytes", snap.len());
    g.throughput(Throughput::Bytes(snap.len() as u64));
    g.bench_function("model_snapshot", |b| b.iter(|| steady.snapshot().unwrap()));
    g.bench_function("model_restore", |b| {
        b.iter(|| Trainer::restore(pulse::factors::RecoConfig::default(), 7, &snap).unwrap())
    });
    g.throughput(Throughput::Elements(n));

    // parquet writing
    let dir = tempfile::tempdir().unwrap();
    g.bench_function("parquet_write_32k", |b| {
        b.iter(|| {
            let mut w = TableWriter::new(dir.path(), events_spec(), 131_072, 4_000_000, 3).unwrap();
            w.write(&batch).unwrap();
            w.close_all().unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
