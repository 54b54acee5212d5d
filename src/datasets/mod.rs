//! What trainers read: the verified CLIP feature entries of a split (and the passes that
//! compute missing ones), image–caption batches, preference pairs with TRL's tokenisation and
//! truncation, and the one bounded, seeded loader.

pub mod captions;
pub mod embedding;
pub mod features;
pub mod loader;
pub mod pairs;
pub mod stories;
