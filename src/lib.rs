//! prefcap: a dataflow pipeline for preference-aligned image captioning.
//!
//! The layers, lowest first (each imports only those below it; `docs/architecture.md` has
//! the rules, `tests/architecture.rs` enforces them): the foundation (`error`, `io`,
//! `device`, `rng`, `progress`), `kernels`, `imaging`, `data`, `synthetic`, `models`,
//! `losses`, `metrics`, `train`, `datasets`, `stages` (one file per stage and the registry),
//! `pipeline` (configuration, plans, the runner) and `cli`; `bench` and `testkit` are
//! features. The thin `pipeline` binary calls `cli::main`.

#[cfg(feature = "bench")]
pub mod bench;
pub mod cli;
pub mod data;
pub mod datasets;
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
#[cfg(any(test, feature = "testkit"))]
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
