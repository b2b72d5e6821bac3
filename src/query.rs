//! `pulse query`: DataFusion SQL over the Parquet tables. Consumes a data
//! directory; registers every table found there (`events`, `dead_letters`,
//! `minute_stats`, `top_items`, and later ones) as a Hive-partitioned listing
//! table with `dt` and `hour` partition columns, so filters on them prune
//! directories; produces result batches and renders them as a table, CSV or
//! JSON lines. Read-only: sees only committed files (in-progress files are
//! hidden by name and extension).

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
    let root = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    for (name, schema) in known_tables() {
        let dir = root.join(name);
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
