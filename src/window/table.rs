//! The open windows of one partition, keyed by start: partials and item
//! counts added by the SQL stage, emitted as updates and finals as the
//! watermark passes their end and their end + allowed lateness. Pure.

use std::collections::{BTreeMap, HashMap};

use super::partial::Partial;
use super::watermark::WindowParams;

#[derive(Debug, Default)]
pub(super) struct WindowState {
    pub(super) services: BTreeMap<String, Partial>,
    /// Requests per item. foldhash, randomly seeded per process: SipHash
    /// on every (window, item) count of every batch was ~1% of the
    /// pipeline's instructions.
    pub(super) items: HashMap<u64, i64, foldhash::fast::RandomState>,
    /// Emitted at least once.
    pub(super) emitted: bool,
    /// Changed since the last emission.
    pub(super) dirty: bool,
}

impl WindowState {
    pub(super) fn emit(
        &self,
        window_start: i64,
        top: usize,
        is_final: bool,
        first: bool,
    ) -> WindowEmit {
        WindowEmit {
            window_start,
            services: self
                .services
                .iter()
                .map(|(s, p)| (s.clone(), p.clone()))
                .collect(),
            top_items: top_n(&self.items, top),
            is_final,
            first,
        }
    }
}

/// One window's current aggregate, as emitted.
#[derive(Debug, Clone)]
pub struct WindowEmit {
    pub window_start: i64,
    pub services: Vec<(String, Partial)>,
    /// Top items by requests, ties by item id.
    pub top_items: Vec<(u64, i64)>,
    /// No later change is possible: the window was purged.
    pub is_final: bool,
    /// The window's first emission.
    pub first: bool,
}

/// Open windows, keyed by start; bins below the watermark are popped.
#[derive(Debug)]
pub struct WindowTable {
    pub(super) params: WindowParams,
    pub(super) top_n: usize,
    /// Also emit changed windows that are still open (live values).
    pub live: bool,
    pub(super) open: BTreeMap<i64, WindowState>,
    pub(super) finalised_upto: i64,
}

impl WindowTable {
    pub fn new(params: WindowParams, top_n: usize) -> Self {
        WindowTable {
            params,
            top_n,
            live: false,
            open: BTreeMap::new(),
            finalised_upto: i64::MIN,
        }
    }

    pub fn open_windows(&self) -> usize {
        self.open.len()
    }

    /// Adds a partial for (window, service). Partials of finalised windows are a
    /// logic error upstream (too-late events are filtered) and are refused.
    pub fn add_partial(&mut self, window_start: i64, service: &str, p: &Partial) -> bool {
        if window_start < self.finalised_upto {
            return false;
        }
        let w = self.open.entry(window_start).or_default();
        w.dirty = true;
        match w.services.get_mut(service) {
            Some(cur) => cur.merge(p),
            None => {
                w.services.insert(service.to_string(), p.clone());
            }
        }
        true
    }

    pub fn add_item_counts(&mut self, window_start: i64, item: u64, n: i64) {
        if window_start < self.finalised_upto {
            return;
        }
        let w = self.open.entry(window_start).or_default();
        w.dirty = true;
        *w.items.entry(item).or_default() += n;
    }

    /// The current value of every open window (nothing changes state): what
    /// a store that lost its data needs again.
    pub fn emit_open(&self) -> Vec<WindowEmit> {
        self.open
            .iter()
            .map(|(&ws, w)| w.emit(ws, self.top_n, false, false))
            .collect()
    }

    /// Emissions due at `watermark`: updates for windows that closed or changed
    /// after closing, finals (and purge) for windows past allowed lateness;
    /// with `live`, also updates of changed windows still open.
    /// `end_of_input` closes and finalises everything.
    pub fn advance(&mut self, watermark: i64, end_of_input: bool) -> Vec<WindowEmit> {
        let size = self.params.size_ms;
        let lateness = self.params.allowed_lateness_ms;
        let mut out = Vec::new();
        let mut purge = Vec::new();
        for (&ws, w) in self.open.iter_mut() {
            let end = ws + size;
            if !end_of_input && end > watermark {
                if self.live && w.dirty {
                    // A live (provisional) value of a window still open.
                    out.push(w.emit(ws, self.top_n, false, false));
                    w.dirty = false;
                }
                continue;
            }
            let is_final = end_of_input || end + lateness <= watermark;
            if w.dirty || !w.emitted || is_final {
                out.push(w.emit(ws, self.top_n, is_final, !w.emitted));
                w.emitted = true;
                w.dirty = false;
            }
            if is_final {
                purge.push(ws);
            }
        }
        for ws in purge {
            self.open.remove(&ws);
            self.finalised_upto = self.finalised_upto.max(ws + size);
        }
        out
    }
}

pub(super) fn top_n<S>(items: &HashMap<u64, i64, S>, n: usize) -> Vec<(u64, i64)> {
    let mut v: Vec<(u64, i64)> = items.iter().map(|(&k, &c)| (k, c)).collect();
    let order = |a: &(u64, i64), b: &(u64, i64)| b.1.cmp(&a.1).then(a.0.cmp(&b.0));
    // Select the top n first (linear), then sort only those: a window is
    // emitted after every batch that touched it, with thousands of items.
    if n == 0 {
        return Vec::new();
    }
    if v.len() > n {
        v.select_nth_unstable_by(n - 1, order);
        v.truncate(n);
    }
    v.sort_unstable_by(order);
    v
}
