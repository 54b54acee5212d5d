//! Losses as pure functions over tensors, each citing the formula it implements.

pub mod contrastive;
pub mod preference;
