//! `GET /recommend/{user_id}`: top-k items for a user from the published
//! factor model ([`crate::factors::store`] layout): the user's record and
//! history read per request, the items and trending list from the cached
//! catalogue.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use serde::Deserialize;

use super::api::parse_i64;
use super::state::{ApiError, ServeState, bad, conn};
use crate::factors::model::FactorRecord;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RecoQuery {
    k: Option<String>,
}

#[derive(serde::Serialize)]
pub(super) struct RecoItem {
    item_id: u64,
    score: f32,
}

#[derive(serde::Serialize)]
pub(super) struct RecoAnswer {
    user_id: u64,
    items: Vec<RecoItem>,
    fallback: bool,
    model_version: Option<u64>,
    updated_ms: Option<i64>,
}

/// `GET /recommend/{user_id}?k=`: one Redis round trip (the user's record and
/// recent history), then the cached catalogue: exact top-k by branch and
/// bound, or the cached trending list for unknown users. Both skip the history.
pub(super) async fn recommend(
    State(s): State<Arc<ServeState>>,
    axum::extract::Path(user): axum::extract::Path<String>,
    q: Result<Query<RecoQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<RecoAnswer>, ApiError> {
    let Query(q) = q.map_err(|e| bad(e.body_text()))?;
    let user: u64 = user.parse().map_err(|_| {
        bad(format!(
            "user_id must be a non-negative integer, got {user:?}"
        ))
    })?;
    let k = parse_i64("k", &q.k)?.unwrap_or(10);
    if !(1..=100).contains(&k) {
        return Err(bad("k must be within 1..=100"));
    }
    let k = k as usize;
    let p = &s.prefix;
    let mut c = conn(&s)?;
    let (rec, hist): (Option<Vec<u8>>, Option<Vec<u8>>) = redis::pipe()
        .hget(format!("{p}:reco:user"), user)
        .hget(format!("{p}:reco:hist"), user)
        .query_async(&mut c)
        .await?;
    let mut hist = crate::factors::packed::decode_items(hist.as_deref().unwrap_or_default());
    hist.sort_unstable();
    let excluded = |i: u64| hist.binary_search(&i).is_ok();
    let cat = s.catalogue();
    let personal = rec
        .as_deref()
        .and_then(FactorRecord::from_bytes)
        .map(|r| cat.index.top_k(&r.vector, k, excluded))
        .filter(|v| !v.is_empty());
    let fallback = personal.is_none();
    let items = match personal {
        Some(v) => v,
        None => cat
            .trending
            .iter()
            .copied()
            .filter(|&(i, _)| !excluded(i))
            .take(k)
            .collect(),
    };
    Ok(Json(RecoAnswer {
        user_id: user,
        items: items
            .into_iter()
            .map(|(item_id, score)| RecoItem { item_id, score })
            .collect(),
        fallback,
        model_version: cat.version,
        updated_ms: cat.updated_ms,
    }))
}
