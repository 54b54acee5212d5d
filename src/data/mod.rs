//! On-disk contracts: record schemas and their one declaration mechanism, Parquet shards, the
//! one content-addressed cache (and the CLIP feature entries kept in it), and the Hugging Face
//! hub client. Nothing here knows the configuration, a model or a stage.

pub mod cache;
pub mod features;
pub mod hub;
pub mod partition;
pub mod record;
pub mod records;
pub mod shard;
pub mod store;
