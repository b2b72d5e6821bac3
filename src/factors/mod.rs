//! Online user/item latent factors. [`index`] serves top-k from item factors
//! (pure); [`store`] writes and reads the factor layout in Redis.

pub mod index;
pub mod store;
