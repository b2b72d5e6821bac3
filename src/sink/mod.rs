//! Sinks: exactly-named Parquet files ([`parquet`]) and the aggregate store the
//! dashboard reads ([`store`]: Redis, or memory in the embedded mode).

pub mod notify;
pub mod parquet;
pub mod store;
