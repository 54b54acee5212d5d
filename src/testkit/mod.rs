//! Loopback servers and a NumPy reader for tests and benchmarks, and small test helpers.

pub mod loopback;
pub mod npy;
pub mod s3;

use candle_core::Tensor;

/// The largest absolute elementwise difference of two tensors of one shape (panics on a
/// tensor error: for tests).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("two tensors of one shape")
}
