//! Online user/item latent factors. [`model`] holds the pure maths (implicit
//! BPR-style factors, explicit biased MF, time-decayed trending); [`eval`] the
//! prequential evaluation behind `pulse reco-eval`; [`index`] holds item
//! factors and scans them for top-k (pure); [`mips`] answers the same top-k
//! exactly without scoring every item (pure, what `/recommend` uses);
//! [`slots`] maps user and item ids to table rows (pure); [`packed`] is the
//! compact snapshot encoding of the model's vectors (pure);
//! [`store`] writes and reads the layout in Redis;
//! [`trainer`] is the pipeline stage that feeds the model from event batches.

pub mod eval;
pub mod index;
pub mod mips;
pub mod model;
pub mod packed;
pub mod slots;
pub mod store;
pub mod trainer;

pub use model::{Interaction, Kind, RecoConfig, RecoModel};
