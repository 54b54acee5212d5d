//! Configuration loading, plan validation and the runner.

pub mod config;
pub mod plan;
pub mod runner;
