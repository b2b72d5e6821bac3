//! `pulse query`: DataFusion SQL over the Parquet tables. Consumes a data
//! directory; registers every table found there (`events`, `dead_letters`,
//! `minute_stats`, `top_items`, and later ones): a Delta table as its latest
//! snapshot, a plain directory as a Hive-partitioned listing table; both have
//! `dt` and `hour` partition columns, so filters on them prune files; produces
//! result batches and renders them as a table, CSV or JSON lines. Read-only:
//! sees only committed files (Delta: those the log holds; Hive: in-progress
//! files are hidden by name and extension).

use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::ListingOptions;
use datafusion::error::DataFusionError;
use datafusion::prelude::SessionContext;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("query: {0}")]
    DataFusion(#[from] DataFusionError),
    #[error("format: {0}")]
    Format(#[from] datafusion::arrow::error::ArrowError),
    #[error("table {0}")]
    Table(String),
    #[error("unknown output format {0:?} (table, csv or json)")]
    UnknownFormat(String),
}

/// Known tables and their file schemas.
pub fn known_tables() -> Vec<(&'static str, SchemaRef)> {
    vec![
        ("events", crate::model::events_schema()),
        ("dead_letters", crate::model::dead_letters_schema()),
        ("minute_stats", crate::model::minute_stats_schema()),
        ("top_items", crate::model::top_items_schema()),
        ("anomalies", crate::model::anomalies_schema()),
        ("drift", crate::model::drift_schema()),
    ]
}

/// A session with the data directory's tables and pulse's SQL functions registered.
pub async fn session(data_dir: &Path) -> Result<SessionContext, QueryError> {
    let ctx = crate::window::sql::session_context();
    let location =
        crate::storage::Location::parse(data_dir).map_err(|e| QueryError::Table(e.to_string()))?;
    if let crate::storage::Location::Remote(r) = location {
        for (name, schema) in known_tables() {
            let at = crate::storage::TableLocation::Remote(r.child(name));
            register_delta(&ctx, name, &at, &schema).await?;
        }
        return Ok(ctx);
    }
    let root = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    for (name, schema) in known_tables() {
        let dir = root.join(name);
        if dir.join("_delta_log").is_dir() {
            let at = crate::storage::TableLocation::Local(dir);
            register_delta(&ctx, name, &at, &schema).await?;
            continue;
        }
        // An absent table is registered empty, so queries on it return no rows.
        std::fs::create_dir_all(&dir).ok();
        let opts = ListingOptions::new(Arc::new(ParquetFormat::default()))
            .with_file_extension(".parquet")
            .with_table_partition_cols(vec![
                ("dt".to_string(), DataType::Utf8),
                ("hour".to_string(), DataType::Utf8),
            ]);
        let url = format!("{}/", dir.display());
        ctx.register_listing_table(name, url, opts, Some(schema), None)
            .await?;
    }
    Ok(ctx)
}

/// Registers the latest snapshot of a Delta table under `name`, with the
/// columns typed as in the files (Delta stores timestamps as microseconds).
async fn register_delta(
    ctx: &SessionContext,
    name: &str,
    at: &crate::storage::TableLocation,
    schema: &SchemaRef,
) -> Result<(), QueryError> {
    let delta = |e: deltalake::DeltaTableError| QueryError::Table(format!("{name}: {e}"));
    let table = crate::sink::parquet::delta::load(at).await.map_err(delta)?;
    if table.version().is_none() {
        // Not created yet: empty, with the table's columns.
        let mut fields: Vec<_> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        for c in ["dt", "hour"] {
            fields.push(datafusion::arrow::datatypes::Field::new(
                c,
                DataType::Utf8,
                true,
            ));
        }
        let schema = Arc::new(datafusion::arrow::datatypes::Schema::new(fields));
        let empty = datafusion::datasource::MemTable::try_new(schema, vec![vec![]])?;
        ctx.register_table(name, Arc::new(empty))?;
        return Ok(());
    }
    table
        .update_datafusion_session(&ctx.state())
        .map_err(delta)?;
    let provider = table.table_provider().await?;
    let df = ctx.read_table(provider)?;
    let mut cols: Vec<datafusion::prelude::Expr> = schema
        .fields()
        .iter()
        .map(|f| {
            datafusion::prelude::cast(datafusion::prelude::col(f.name()), f.data_type().clone())
                .alias(f.name())
        })
        .collect();
    for c in ["dt", "hour"] {
        cols.push(datafusion::prelude::col(c));
    }
    ctx.register_table(name, df.select(cols)?.into_view())?;
    Ok(())
}

pub async fn run_sql(data_dir: &Path, sql: &str) -> Result<Vec<RecordBatch>, QueryError> {
    let ctx = session(data_dir).await?;
    Ok(ctx.sql(sql).await?.collect().await?)
}

/// Renders batches as `table`, `csv` or `json` (one object per line).
pub fn render(batches: &[RecordBatch], format: &str) -> Result<String, QueryError> {
    match format {
        "table" => Ok(datafusion::arrow::util::pretty::pretty_format_batches(batches)?.to_string()),
        "csv" => {
            let mut buf = Vec::new();
            {
                let mut w = datafusion::arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut buf);
                for b in batches {
                    w.write(b)?;
                }
            }
            Ok(String::from_utf8_lossy(&buf).into_owned())
        }
        "json" => {
            let mut buf = Vec::new();
            {
                let mut w = datafusion::arrow::json::LineDelimitedWriter::new(&mut buf);
                for b in batches {
                    w.write(b)?;
                }
                w.finish()?;
            }
            Ok(String::from_utf8_lossy(&buf).into_owned())
        }
        other => Err(QueryError::UnknownFormat(other.to_string())),
    }
}
