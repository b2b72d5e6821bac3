//! The error of a pipeline run: any stage's failure, as the wiring in
//! [`crate::app`] reports it. Which failures are retried is decided where
//! they happen (Redis writes queue and retry in [`crate::sink::redis_sink`]).

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Sql(#[from] crate::window::sql::SqlError),
    #[error(transparent)]
    Store(#[from] crate::sink::store::StoreError),
    #[error(transparent)]
    Parquet(#[from] crate::sink::parquet::ParquetError),
    #[error(transparent)]
    File(#[from] crate::source::file::FileSourceError),
    #[error(transparent)]
    Kafka(#[from] crate::source::kafka::KafkaError),
    #[error("arrow: {0}")]
    Arrow(#[from] datafusion::arrow::error::ArrowError),
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error("a pipeline stage stopped unexpectedly: {0}")]
    Stage(String),
}
