//! Loopback servers and a NumPy reader for tests and benchmarks.

pub mod loopback;
pub mod npy;
