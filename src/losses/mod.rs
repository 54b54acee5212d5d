//! Losses as pure functions over tensors, each citing the formula it implements.

pub mod contrastive;
pub mod dico;
pub mod diffusion;
pub mod preference;
pub mod reward;
pub mod scst;
pub mod story;
