//! prefcap: a dataflow pipeline for preference-aligned image captioning.
//!
//! Stages are library functions (`ingest::run`, ...) that the thin `pipeline` binary calls;
//! pipelines (`pipelines/*.toml`) are validated as a whole before any stage runs.

pub mod bench;
pub mod cli;
pub mod data;
pub mod device;
pub mod error;
pub mod imaging;
pub mod io;
pub mod kernels;
pub mod losses;
pub mod metrics;
pub mod models;
pub mod pipeline;
pub mod progress;
pub mod rng;
pub mod stages;
pub mod synthetic;
pub mod testkit;
pub mod train;

pub use error::{Error, Result};

/// Paths of the committed Hugging Face fixtures, for unit tests.
#[cfg(test)]
pub(crate) fn hf_tiny_fixture(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf-tiny")
        .join(path)
}
