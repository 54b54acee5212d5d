//! On-disk contracts: record schemas, Parquet shards, the content-addressed feature cache and the Hugging Face hub client.

pub mod features;
pub mod hub;
pub mod records;
pub mod shard;
