//! The pipeline's stages.

pub mod embed;
pub mod generate;
pub mod ingest;
pub mod preference;
pub mod report;
pub mod sample_pairs;
pub mod score;
pub mod train_sft;
