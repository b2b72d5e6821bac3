//! Online user/item latent factors. [`model`] holds the pure maths (implicit
//! BPR-style factors, explicit biased MF, time-decayed trending); [`eval`] the
//! prequential evaluation behind `pulse reco-eval`; [`index`] serves top-k
//! from item factors (pure); [`store`] writes and reads the layout in Redis;
//! [`trainer`] is the pipeline stage that feeds the model from event batches.

pub mod eval;
pub mod index;
pub mod model;
pub mod store;
pub mod trainer;

pub use model::{Interaction, Kind, RecoConfig, RecoModel};
