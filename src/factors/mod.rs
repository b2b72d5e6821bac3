//! Online user/item latent factors, from the maths to the pipeline stage.
//!
//! Pure (no I/O): [`config`] (hyper-parameters, event kinds), [`kernels`]
//! (dot products, the logistic table, the AVX2 SGD steps: every `unsafe`
//! block of the SIMD code), [`ids`] (user and item ids to table rows),
//! [`ring`] (recent items per user), [`reservoir`] (past positives for
//! negative sampling), [`bpr`] (the implicit model), [`mf`] (the rating
//! model), [`trending`] (time-decayed popularity), [`model`] (the three
//! behind one `observe`), [`packed`] (snapshot and record encodings),
//! [`index`] and [`mips`] (exact top-k over item vectors, what
//! `/recommend` uses), [`quality`] (the live model's recall and NDCG
//! against popularity on a sample of the stream).
//!
//! Stage and I/O: [`trainer`] feeds the model from event batches and
//! collects what changed; [`stage`] runs it on its own thread with
//! snapshots (file and generator runs, fed by the pipeline); [`fleet`] is
//! the Kafka runs' trainer, one writer of one model for every instance of a
//! group, under the [`lease`]; [`store`] publishes the changes to Redis
//! (fenced by the lease's token) and reads them back; [`versions`] keeps
//! the model's versions and the rollback pin.

pub mod bpr;
pub mod config;
pub mod fleet;
pub mod ids;
pub mod index;
pub mod kernels;
pub mod lease;
pub mod mf;
pub mod mips;
pub mod model;
pub mod packed;
pub mod quality;
pub mod reservoir;
pub mod ring;
pub mod stage;
pub mod store;
pub mod trainer;
pub mod trending;
pub mod versions;

pub use config::{Interaction, Kind, RecoConfig};
pub use model::RecoModel;
