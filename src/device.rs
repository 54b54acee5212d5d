//! The device a model runs on: `--gpu N` (a CUDA ordinal, with the `cuda` feature) or the CPU,
//! and the precision it computes in.

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Compute precision of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComputeDtype {
    F32,
    /// Half precision; GPU only.
    F16,
    /// bfloat16; GPU only.
    Bf16,
}

/// Picks the device for `gpu` (a CUDA ordinal).
pub fn device_for(gpu: Option<usize>, cpu_fallback: bool) -> Result<Device> {
    match gpu {
        None => Ok(Device::Cpu),
        Some(n) => {
            #[cfg(feature = "cuda")]
            {
                let _ = cpu_fallback;
                Device::new_cuda(n)
                    .map_err(|e| Error::Config(format!("cannot open CUDA device {n}: {e}")))
            }
            #[cfg(not(feature = "cuda"))]
            {
                if cpu_fallback {
                    eprintln!("--gpu {n}: this binary has no CUDA support; running on the CPU (run.cpu_fallback)");
                    Ok(Device::Cpu)
                } else {
                    Err(Error::Config(format!(
                        "--gpu {n} needs a binary built with `--features cuda`; set run.cpu_fallback=true to run on the CPU"
                    )))
                }
            }
        }
    }
}

pub fn candle_dtype(dtype: ComputeDtype, device: &Device) -> Result<DType> {
    match (dtype, device.is_cpu()) {
        (ComputeDtype::F32, _) => Ok(DType::F32),
        (_, true) => Err(Error::Config(
            "clip.dtype f16/bf16 needs a GPU (--gpu N); use f32 on the CPU".into(),
        )),
        (ComputeDtype::F16, false) => Ok(DType::F16),
        (ComputeDtype::Bf16, false) => Ok(DType::BF16),
    }
}
