//! One source partition's state in the core stage: its windows, its
//! position, the replay of a restored checkpoint, and final rows waiting for
//! their hour to close. Pure: no I/O.

use std::collections::VecDeque;

use crate::checkpoint::PartitionCheckpoint;
use crate::model::{MinuteRow, TopItemRow};
use crate::window::{PartitionWindows, WindowParams, Windower};

/// One source partition's state in the core stage.
pub(super) struct Task {
    pub(super) pw: PartitionWindows,
    /// First offset not yet applied to the windows: records below it are a
    /// replay for the Parquet files that were open at the last checkpoint.
    pub(super) next_offset: i64,
    /// Classifies the replayed records as they were classified the first time.
    pub(super) replay: Option<Windower>,
    /// While `replay` is set: the restored checkpoint's replay point. Until
    /// the replay has been written again, what the last run left uncommitted
    /// exists only in the log from there on.
    pub(super) replay_floor: i64,
    /// (first offset of a batch, the partition's max event time before it):
    /// the points a checkpoint can ask to replay from.
    pub(super) history: VecDeque<(i64, Option<i64>)>,
    pub(super) pending_stats: Vec<MinuteRow>,
    pub(super) pending_top: Vec<TopItemRow>,
}

impl Task {
    pub(super) fn fresh(params: WindowParams, top_n: usize, key: i32) -> Self {
        let pw = PartitionWindows::new(params, top_n, key);
        Task {
            pw,
            next_offset: i64::MIN,
            replay: None,
            replay_floor: i64::MAX,
            history: VecDeque::new(),
            pending_stats: Vec::new(),
            pending_top: Vec::new(),
        }
    }

    pub(super) fn restore(
        params: WindowParams,
        top_n: usize,
        key: i32,
        cp: &PartitionCheckpoint,
    ) -> Option<Self> {
        let pw = PartitionWindows::restore(params, top_n, key, &cp.windows)?;
        let replay = (cp.replay_from < cp.next_offset)
            .then(|| Windower::restored(params, key, cp.replay_max_ts));
        Some(Task {
            pw,
            next_offset: cp.next_offset,
            replay,
            replay_floor: cp.replay_from,
            history: VecDeque::from([(cp.replay_from, cp.replay_max_ts)]),
            pending_stats: cp.pending_stats.clone(),
            pending_top: cp.pending_top.clone(),
        })
    }

    /// Where a checkpoint written now resumes reading, and the partition's
    /// max event time before that point. Replay must cover the oldest open
    /// file (`open_first`) and, while a restored replay is under way, all of it: a checkpoint can
    /// come before the partition's first replayed batch (another partition's
    /// batch triggers it), when no file of this run holds the previous run's
    /// uncommitted rows yet. Forgets the history before the point.
    pub(super) fn replay_point(&mut self, open_first: Option<i64>) -> (i64, Option<i64>) {
        let replay_floor = if self.replay.is_some() {
            self.replay_floor
        } else {
            i64::MAX
        };
        let wanted = open_first
            .map_or(self.next_offset, |f| f.min(self.next_offset))
            .min(replay_floor);
        if wanted >= self.next_offset {
            self.history.clear();
        } else {
            // The latest batch start at or before it; if none, the oldest known
            // point (where this partition was restored or started).
            let i = self
                .history
                .iter()
                .rposition(|(o, _)| *o <= wanted)
                .unwrap_or(0);
            self.history.drain(..i);
        }
        match self.history.front() {
            Some(&(o, ts)) if o < self.next_offset => (o, ts),
            _ => (self.next_offset, self.pw.windower.max_event_time()),
        }
    }
}

/// A partition's final rows to write: minute_stats rows, top items, and the partition.
pub(super) type FinalRows = (Vec<MinuteRow>, Vec<TopItemRow>, i32);

/// Takes a task's pending final rows of windows before `upto`.
pub(super) fn flush_pending(t: &mut Task, upto: i64) -> FinalRows {
    let (stats, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut t.pending_stats)
        .into_iter()
        .partition(|r| r.window_start_ms < upto);
    t.pending_stats = keep;
    let (top, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut t.pending_top)
        .into_iter()
        .partition(|r| r.window_start_ms < upto);
    t.pending_top = keep;
    (stats, top, t.pw.key)
}
