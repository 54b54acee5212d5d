//! prefcap: a dataflow pipeline for preference-aligned image captioning.
//!
//! Stages are library functions (`ingest::run`, ...) that the thin `pipeline` binary calls;
//! pipelines (`pipelines/*.toml`) are validated as a whole before any stage runs.

pub mod bench;
pub mod bench_dpo;
pub mod bench_embed;
pub mod bench_score;
pub mod bench_train;
pub mod captioner;
pub mod chart;
pub mod cli;
pub mod clip;
pub mod config;
pub mod dpo;
pub mod embed;
pub mod error;
pub mod features;
pub mod generate;
pub mod gpt2;
pub mod hub;
pub mod ingest;
pub mod kernels;
pub mod loopback;
pub mod meteor;
pub mod metrics;
pub mod npy;
pub mod plan;
pub mod preference;
pub mod progress;
pub mod records;
pub mod report;
pub mod rng;
pub mod runner;
pub mod sample_pairs;
pub mod score;
pub mod sft;
pub mod shard;
pub mod train;

pub use error::{Error, Result};

/// Paths of the committed Hugging Face fixtures, for unit tests.
#[cfg(test)]
pub(crate) fn hf_tiny_fixture(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf-tiny")
        .join(path)
}
