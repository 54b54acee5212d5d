//! Caption metrics as pure functions over token lists and embeddings.

pub mod meteor;
pub mod text;
