//! `pulse serve` (and the side port of `pulse run`): an axum router over the
//! Redis aggregates. Consumes the Redis layout of [`crate::sink::store`];
//! produces the dashboard page (assets embedded, no CDN), a bounded JSON API
//! under `/api/`, Prometheus metrics at `/metrics`, `/healthz` and `/readyz`,
//! and `/recommend/{user_id}` from the factor layout of
//! [`crate::factors::store`] (items, trending and meta cached in process per
//! model version; the user's record and history read per request).
//! Read-only: it never writes Redis, so any number of `pulse run` instances
//! can feed it.

pub mod api;
pub mod health;
pub mod recommend;
pub mod router;
pub mod state;

pub use api::{MAX_LIMIT, MAX_MINUTES};
pub use health::metrics_handle;
pub use router::{bind_shards, router, serve, serve_sharded};
pub use state::{
    ApiError, Catalogue, ITEM_REFRESH, ItemCache, RefreshError, ServeState, TRENDING_KEPT,
};
