//! AdamW's fused update as custom ops: the two moment updates and the parameter update, in
//! place, in parallel chunks on the CPU and as NVRTC-compiled kernels on a CUDA device (three
//! passes per variable instead of sixteen allocating tensor ops). [`crate::train`]'s AdamW
//! decides when they apply.

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout};
use rayon::prelude::*;

/// Whether AdamW's fused kernels run on `device`: always on the CPU; on a CUDA device when
/// NVRTC compiled them and the driver loaded them (otherwise the tensor ops run, and the
/// reason is printed once).
pub fn fused_kernels_on(device: &candle_core::Device) -> bool {
    if device.is_cpu() {
        return true;
    }
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return device.as_cuda_device().is_ok_and(adamw_cuda::available);
    }
    false
}

/// The contiguous f32 elements of a CPU storage under `layout`.
pub fn f32_slice<'a>(s: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("adamw: expected a contiguous f32 tensor"),
    }
}

fn f32_slice_mut<'a>(s: &'a mut CpuStorage, layout: &Layout) -> candle_core::Result<&'a mut [f32]> {
    match (s, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("adamw: expected a contiguous f32 tensor"),
    }
}

/// Elements per parallel chunk of the fused AdamW kernels.
pub const ADAMW_CHUNK: usize = 1 << 16;

/// `m ← β·m + (1−β)·(s·g)`, or with `square`, `v ← β·v + (1−β)·(s·g)²`, in place.
pub struct MomentUpdate {
    pub beta: f32,
    pub scale: f32,
    pub square: bool,
}

impl InplaceOp2 for MomentUpdate {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        g_l: &Layout,
    ) -> candle_core::Result<()> {
        let (m, g) = (f32_slice_mut(dst, dst_l)?, f32_slice(g, g_l)?);
        let (beta, rest, s) = (self.beta, 1.0 - self.beta, self.scale);
        m.par_chunks_mut(ADAMW_CHUNK)
            .zip(g.par_chunks(ADAMW_CHUNK))
            .for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    let g = g * s;
                    let x = if self.square { g * g } else { g };
                    *m = beta * *m + rest * x;
                }
            });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        g: &candle_core::CudaStorage,
        g_l: &Layout,
    ) -> candle_core::Result<()> {
        adamw_cuda::moment(dst, dst_l, g, g_l, self)
    }
}

/// `p ← p·(1 − lr·wd) − lr·m̂ / (√v̂ + ε)` with bias-corrected moments, in place.
pub struct ParamUpdate {
    pub lr: f32,
    pub decay: f32,
    pub bias1: f32,
    pub bias2_sqrt: f32,
    pub eps: f32,
}

impl InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        m_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        let p = f32_slice_mut(dst, dst_l)?;
        let (m, v) = (f32_slice(m, m_l)?, f32_slice(v, v_l)?);
        // PyTorch: step = lr / bias1, denom = √v / √bias2 + ε.
        let step = self.lr / self.bias1;
        p.par_chunks_mut(ADAMW_CHUNK)
            .zip(m.par_chunks(ADAMW_CHUNK).zip(v.par_chunks(ADAMW_CHUNK)))
            .for_each(|(p, (m, v))| {
                for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                    let denom = v.sqrt() / self.bias2_sqrt + self.eps;
                    *p = *p * self.decay - step * m / denom;
                }
            });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        m: &candle_core::CudaStorage,
        m_l: &Layout,
        v: &candle_core::CudaStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        adamw_cuda::param(dst, dst_l, (m, m_l), (v, v_l), self)
    }
}

/// The fused AdamW kernels on a CUDA device: the CPU kernels' arithmetic, one thread per
/// element, compiled once per process by NVRTC without contracting multiply-adds, so each
/// element gets the CPU's operations in the CPU's order (IEEE square root and division).
#[cfg(feature = "cuda")]
mod adamw_cuda {
    use std::sync::OnceLock;

    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
    use candle_core::{CudaStorage, Layout};

    use super::{MomentUpdate, ParamUpdate};

    const SOURCE: &str = r#"
extern "C" __global__ void adamw_moment(float *m, const float *g, unsigned int n, float beta,
                                        float rest, float scale, int square) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = g[i] * scale;
    if (square) x = x * x;
    m[i] = beta * m[i] + rest * x;
}

extern "C" __global__ void adamw_param(float *p, const float *m, const float *v, unsigned int n,
                                       float step, float decay, float bias2_sqrt, float eps) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float denom = sqrtf(v[i]) / bias2_sqrt + eps;
    p[i] = p[i] * decay - step * m[i] / denom;
}
"#;

    /// Whether the kernels compiled and `device` loaded them, decided once per process (for
    /// the first CUDA device it trains on); when not, says why.
    pub(super) fn available(device: &candle_core::CudaDevice) -> bool {
        static LOADED: OnceLock<bool> = OnceLock::new();
        *LOADED.get_or_init(|| {
            let loaded = ptx().and_then(|ptx| {
                for f in ["adamw_moment", "adamw_param"] {
                    device.get_or_load_custom_func(f, "prefcap_adamw", ptx)?;
                }
                Ok(())
            });
            match loaded {
                Ok(()) => true,
                Err(e) => {
                    eprintln!(
                        "adamw: fused CUDA kernels unavailable ({e}); AdamW runs as tensor ops"
                    );
                    false
                }
            }
        })
    }

    /// The kernels' PTX, compiled on first use (NVRTC only: no device needed).
    fn ptx() -> candle_core::Result<&'static str> {
        static PTX: OnceLock<Result<String, String>> = OnceLock::new();
        PTX.get_or_init(|| {
            let opts = CompileOptions {
                fmad: Some(false),
                prec_div: Some(true),
                prec_sqrt: Some(true),
                ..CompileOptions::default()
            };
            compile_ptx_with_opts(SOURCE, opts)
                .map(|p| p.to_src())
                .map_err(|e| e.to_string())
        })
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(format!("adamw: compiling the CUDA kernels: {e}")))
    }

    /// Element range of a contiguous tensor.
    fn span(l: &Layout) -> candle_core::Result<(usize, usize)> {
        l.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("adamw: expected a contiguous tensor".into()))
    }

    /// The common length of two ranges as the kernels' `n`: they index every operand with
    /// one element index.
    fn same_len(a: (usize, usize), b: (usize, usize)) -> candle_core::Result<u32> {
        if b.1 - b.0 != a.1 - a.0 {
            candle_core::bail!(
                "adamw: operands of {} and {} elements",
                a.1 - a.0,
                b.1 - b.0
            );
        }
        // The kernels' element index is 32-bit, block offsets included.
        u32::try_from(a.1 - a.0)
            .ok()
            .filter(|&n| n <= i32::MAX as u32)
            .ok_or_else(|| candle_core::Error::Msg("adamw: tensor too large for one launch".into()))
    }

    fn wrap(e: impl std::error::Error + Send + Sync + 'static) -> candle_core::Error {
        candle_core::Error::Cuda(Box::new(e))
    }

    pub(super) fn moment(
        m: &mut CudaStorage,
        m_l: &Layout,
        g: &CudaStorage,
        g_l: &Layout,
        op: &MomentUpdate,
    ) -> candle_core::Result<()> {
        let (ms, gs) = (span(m_l)?, span(g_l)?);
        let n = same_len(ms, gs)?;
        if n == 0 {
            return Ok(());
        }
        let func = m
            .device
            .get_or_load_custom_func("adamw_moment", "prefcap_adamw", ptx()?)?;
        let g = g.as_cuda_slice::<f32>()?.slice(gs.0..gs.1);
        let mut m = m.as_cuda_slice_mut::<f32>()?.slice_mut(ms.0..ms.1);
        let (rest, square) = (1.0 - op.beta, i32::from(op.square));
        let mut b = func.builder();
        b.arg(&mut m);
        b.arg(&g);
        b.arg(&n);
        b.arg(&op.beta);
        b.arg(&rest);
        b.arg(&op.scale);
        b.arg(&square);
        // SAFETY: the arguments match the kernel's signature, and every index it touches
        // is below `n`, the length of both views.
        unsafe { b.launch(LaunchConfig::for_num_elems(n)) }.map_err(wrap)?;
        Ok(())
    }

    pub(super) fn param(
        p: &mut CudaStorage,
        p_l: &Layout,
        (m, m_l): (&CudaStorage, &Layout),
        (v, v_l): (&CudaStorage, &Layout),
        op: &ParamUpdate,
    ) -> candle_core::Result<()> {
        let (ps, ms, vs) = (span(p_l)?, span(m_l)?, span(v_l)?);
        let n = same_len(ps, ms)?;
        same_len(ps, vs)?;
        if n == 0 {
            return Ok(());
        }
        let func = p
            .device
            .get_or_load_custom_func("adamw_param", "prefcap_adamw", ptx()?)?;
        let m = m.as_cuda_slice::<f32>()?.slice(ms.0..ms.1);
        let v = v.as_cuda_slice::<f32>()?.slice(vs.0..vs.1);
        let mut p = p.as_cuda_slice_mut::<f32>()?.slice_mut(ps.0..ps.1);
        // As the CPU kernel: PyTorch's step = lr / bias1, in f32.
        let step = op.lr / op.bias1;
        let mut b = func.builder();
        b.arg(&mut p);
        b.arg(&m);
        b.arg(&v);
        b.arg(&n);
        b.arg(&step);
        b.arg(&op.decay);
        b.arg(&op.bias2_sqrt);
        b.arg(&op.eps);
        // SAFETY: as in `moment`: matching arguments, indices below `n`.
        unsafe { b.launch(LaunchConfig::for_num_elems(n)) }.map_err(wrap)?;
        Ok(())
    }
}
