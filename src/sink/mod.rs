//! Sinks: exactly-named Parquet files ([`parquet`]) and the aggregate store the
//! dashboard reads ([`store`]: Redis, or [`memory`] in the embedded mode), whose
//! Redis writes queue in [`pending`] while [`redis_sink`] cannot apply them.

pub mod memory;
pub mod notify;
pub mod parquet;
pub mod pending;
pub mod redis_sink;
pub mod store;
