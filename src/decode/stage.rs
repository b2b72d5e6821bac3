//! The decode stage: one thread turning raw chunks into Arrow batches.
//! Consumes [`SourceMsg`]s in source order; produces [`DecodeMsg`]s in the
//! same order: each chunk's [`Decoded`] batches (valid events, dead letters),
//! and the source's assignment changes passed on untouched. Every record of a
//! chunk comes out as an event or a dead letter; decoded chunks go back to
//! the source's pool to be refilled.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::admit::AdmittedServices;
use super::{Decoded, Decoder};
use crate::config::ValidationConfig;
use crate::model::{ChunkPool, SourceMsg};

/// What the decode stage hands on, in source order. `C` as in [`SourceMsg`].
pub enum DecodeMsg<C> {
    Batch(Decoded),
    Assigned(Vec<(i32, Option<C>)>),
    Revoked(Vec<i32>, std::sync::mpsc::SyncSender<()>),
}

/// What the stage reads from a partition's checkpoint: the services its
/// records admitted so far ([`super::admit`]).
pub trait AdmittedIn {
    fn admitted_services(&self) -> &[String];
}

/// The stage's loop, until the source's channel closes or the next stage
/// stops; returns its busy time. `admitted` receives the services each
/// partition admits.
pub fn run<C: AdmittedIn>(
    mut rx: mpsc::Receiver<SourceMsg<C>>,
    tx: mpsc::Sender<DecodeMsg<C>>,
    rules: ValidationConfig,
    pool: ChunkPool,
    admitted: AdmittedServices,
) -> Duration {
    let mut d = Decoder::with_admitted(rules, admitted);
    let mut busy = Duration::ZERO;
    while let Some(m) = rx.blocking_recv() {
        let out = match m {
            SourceMsg::Chunk(c) => {
                let t0 = Instant::now();
                let now = chrono::Utc::now().timestamp_millis();
                let out = d.decode(&c, now);
                pool.put(c);
                busy += t0.elapsed();
                DecodeMsg::Batch(out)
            }
            SourceMsg::Assigned(a) => {
                for (p, cp) in &a {
                    d.seed_services(*p, cp.as_ref().map_or(&[], |c| c.admitted_services()));
                }
                DecodeMsg::Assigned(a)
            }
            SourceMsg::Revoked(p, ack) => DecodeMsg::Revoked(p, ack),
        };
        if tx.blocking_send(out).is_err() {
            break;
        }
    }
    busy
}
