//! The one training loop every training stage uses.
//!
//! An [`Objective`] turns a batch into a loss and named scalars; [`fit`] does the rest:
//! AdamW (decoupled weight decay, as PyTorch), linear warmup then cosine decay, gradient
//! accumulation, global gradient-norm clipping, a NaN/Inf guard (the batch is skipped and
//! counted, no update is applied), periodic validation, best-checkpoint keeping, early stopping
//! with patience, and resume from the last checkpoint with identical results. Batches arrive
//! over a bounded channel from the objective's loader threads; the time the loop waits on that
//! channel is measured and reported as `data_wait_fraction`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use candle_nn::VarMap;
use crossbeam_channel::Receiver;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::records::MetricRow;
use crate::data::shard::write_parquet;
use crate::error::{Error, IoContext, Result};
use crate::io::write_atomic;
use crate::progress::Progress;

/// Optimisation settings shared by every training stage (each stage has its own section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Linear warmup steps (optimizer steps), then cosine decay to 0 at the last step.
    pub warmup_steps: usize,
    /// Batches whose gradients are summed (and averaged) per optimizer step.
    pub grad_accum: usize,
    /// Clip the global gradient norm to this; 0 = no clipping.
    pub max_grad_norm: f64,
    /// Validate every this many optimizer steps; 0 = at the end of each epoch.
    pub eval_every: usize,
    /// Stop after this many validations without improvement; 0 = never.
    pub patience: usize,
    /// Seed of the data order (and of any sampling an objective does).
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 10,
            batch_size: 32,
            lr: 1e-3,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup_steps: 20,
            grad_accum: 1,
            max_grad_norm: 1.0,
            eval_every: 0,
            patience: 0,
            seed: 42,
        }
    }
}

/// What one batch gave: the loss to minimise and scalars to log (summed over the batch's
/// `rows` when `mean_over_rows` metrics are aggregated).
pub struct StepOutput {
    /// Scalar loss tensor.
    pub loss: Tensor,
    /// Named scalars (`nll_loss`, `rewards/accuracies`, ...), already means over the batch.
    pub scalars: Vec<(String, f64)>,
    /// Rows that counted (rows with no supervised token are dropped by the objective).
    pub rows: usize,
}

/// A training objective: its trainable variables and what one batch costs.
pub trait Objective {
    type Batch: Send + 'static;
    /// The trainable variables (saved in checkpoints).
    fn vars(&self) -> &VarMap;
    /// Loss and scalars of one batch; `train` is false during validation.
    fn step(&mut self, batch: &Self::Batch, train: bool) -> candle_core::Result<StepOutput>;
    /// The batches of `epoch` of the training split, in a deterministic order.
    fn train_batches(&self, epoch: usize) -> Result<Receiver<Result<Self::Batch>>>;
    /// The validation batches.
    fn val_batches(&self) -> Result<Receiver<Result<Self::Batch>>>;
    /// Which validation scalar decides the best checkpoint, and whether higher is better.
    fn selection(&self) -> (&str, bool) {
        ("loss", false)
    }
}

/// AdamW with PyTorch's semantics, with its state exposed so checkpoints can restore it.
pub struct AdamW {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken per variable: as PyTorch's per-parameter `step`, a variable without a
    /// gradient (the mapper, in a batch of text-only pairs) is skipped and does not count.
    t: Vec<u64>,
    /// Use the fused in-place kernels where they apply (always, outside tests).
    fused: bool,
}

impl AdamW {
    /// Over all variables of `map`, ordered by name.
    pub fn new(map: &VarMap) -> candle_core::Result<Self> {
        let mut vars: Vec<(String, Var)> = map
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("var map lock poisoned".into()))?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let m = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<_>>()?;
        let v = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            t: vec![0; vars.len()],
            vars,
            m,
            v,
            fused: true,
        })
    }

    /// Whether to use the fused in-place kernels where they apply (the default), or the
    /// tensor ops every other device runs: for comparing the two paths on one device.
    pub fn use_fused_kernels(&mut self, on: bool) {
        self.fused = on;
    }

    /// The variables, in the order `step` expects their gradients.
    pub fn var_list(&self) -> Vec<Var> {
        self.vars.iter().map(|(_, v)| v.clone()).collect()
    }

    /// One update with gradients `grads` (by variable index) multiplied by `grad_scale`,
    /// learning rate `lr`. f32 variables on the CPU or a CUDA device are updated in place by
    /// fused kernels (three passes instead of sixteen allocating ones; on CUDA three kernel
    /// launches per variable instead of sixteen); elsewhere by tensor ops.
    pub fn step(
        &mut self,
        grads: &[Option<Tensor>],
        grad_scale: f64,
        lr: f64,
        cfg: &TrainConfig,
    ) -> candle_core::Result<()> {
        let (b1, b2) = (cfg.beta1, cfg.beta2);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            self.t[i] += 1;
            let t = self.t[i] as i32;
            let update = ParamUpdate {
                lr: lr as f32,
                decay: (1.0 - lr * cfg.weight_decay) as f32,
                bias1: (1.0 - b1.powi(t)) as f32,
                bias2_sqrt: (1.0 - b2.powi(t)).sqrt() as f32,
                eps: cfg.eps as f32,
            };
            let p = var.as_tensor();
            let fused = self.fused
                && fused_kernels_on(p.device())
                && [p, g, &self.m[i], &self.v[i]]
                    .iter()
                    .all(|t| t.dtype() == DType::F32 && t.is_contiguous());
            if fused {
                let scale = grad_scale as f32;
                self.m[i].inplace_op2(
                    g,
                    &MomentUpdate {
                        beta: b1 as f32,
                        scale,
                        square: false,
                    },
                )?;
                self.v[i].inplace_op2(
                    g,
                    &MomentUpdate {
                        beta: b2 as f32,
                        scale,
                        square: true,
                    },
                )?;
                p.inplace_op3(&self.m[i], &self.v[i], &update)?;
                continue;
            }
            let g = (g * grad_scale)?;
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&m / f64::from(update.bias1))?;
            let v_hat = (&v / f64::from(update.bias2_sqrt).powi(2))?;
            let decayed = (p * f64::from(update.decay))?;
            let step = (m_hat / (v_hat.sqrt()? + cfg.eps)?)?;
            var.set(&(decayed - (step * lr)?)?)?;
            // Detached: `m` and `v` are ops on the gradient, which candle records when it was
            // computed from the model's variables or activations. Kept as they are, each
            // step's moments would hold the previous step's and that step's graph (its
            // activations and upstream gradients), so device memory grew with every step.
            self.m[i] = m.detach();
            self.v[i] = v.detach();
        }
        Ok(())
    }

    fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
            let t = Tensor::new(&[self.t[i] as i64], &candle_core::Device::Cpu);
            out.insert(format!("t.{name}"), t.expect("a one-element CPU tensor"));
        }
        out
    }

    /// Restores the moments and step counts; `t` is the count for checkpoints written before
    /// they were kept per variable (every variable stepped every time).
    fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: u64) -> candle_core::Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let get = |k: String| {
                tensors
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state lacks {k}")))
                    .and_then(|t| t.to_device(var.device()))
            };
            self.m[i] = get(format!("m.{name}"))?;
            self.v[i] = get(format!("v.{name}"))?;
            self.t[i] = match tensors.get(&format!("t.{name}")) {
                Some(steps) => steps.flatten_all()?.to_vec1::<i64>()?[0] as u64,
                None => t,
            };
        }
        Ok(())
    }
}

/// Whether AdamW's fused kernels run on `device`: always on the CPU; on a CUDA device when
/// NVRTC compiled them and the driver loaded them (otherwise the tensor ops run, and the
/// reason is printed once).
fn fused_kernels_on(device: &candle_core::Device) -> bool {
    if device.is_cpu() {
        return true;
    }
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return device.as_cuda_device().is_ok_and(adamw_cuda::available);
    }
    false
}

/// Learning rate at optimizer step `step` (0-based) of `total`: linear warmup from 0 over
/// `warmup` steps, then cosine decay to 0 (transformers' `get_cosine_schedule_with_warmup`).
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}

/// Scales `grads` down to `cfg.max_grad_norm` when their global `norm` exceeds it, then takes
/// one AdamW step at learning rate `lr`.
pub fn clip_and_step(
    opt: &mut AdamW,
    grads: &[Option<Tensor>],
    norm: f64,
    lr: f64,
    cfg: &TrainConfig,
) -> candle_core::Result<()> {
    let scale = if cfg.max_grad_norm > 0.0 && norm > cfg.max_grad_norm {
        cfg.max_grad_norm / (norm + 1e-6)
    } else {
        1.0
    };
    opt.step(grads, scale, lr, cfg)
}

/// The contiguous f32 elements of a CPU storage under `layout`.
fn f32_slice<'a>(s: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
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
const ADAMW_CHUNK: usize = 1 << 16;

/// `m ← β·m + (1−β)·(s·g)`, or with `square`, `v ← β·v + (1−β)·(s·g)²`, in place.
struct MomentUpdate {
    beta: f32,
    scale: f32,
    square: bool,
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
struct ParamUpdate {
    lr: f32,
    decay: f32,
    bias1: f32,
    bias2_sqrt: f32,
    eps: f32,
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

/// The gradients of `vars` (in that order) from a backward pass, detached. candle records
/// the ops that summed a variable's gradient when they involved tracked tensors (a linear
/// layer's weight gradient is a product with its input activation), so an undetached gradient
/// keeps that step's activations and upstream gradients alive for as long as it lives:
/// through the optimizer step, and across every batch of an accumulation.
pub fn gradients(store: &candle_core::backprop::GradStore, vars: &[Var]) -> Vec<Option<Tensor>> {
    vars.iter()
        .map(|v| store.get(v.as_tensor()).map(Tensor::detach))
        .collect()
}

/// Global L2 norm of `grads`. Contiguous f32 gradients on the CPU are summed where they
/// lie, in parallel chunks added in f64; elsewhere (a GPU) each gradient's sum of squares is
/// reduced on its device and all of them are read back at once: one wait for the device
/// instead of one per variable.
pub fn grad_norm(grads: &[Option<Tensor>]) -> candle_core::Result<f64> {
    let mut sum = 0f64;
    let mut on_device = Vec::new();
    for g in grads.iter().flatten() {
        match cpu_sum_squares(g) {
            Some(s) => sum += s,
            None => on_device.push(g.sqr()?.sum_all()?.to_dtype(DType::F32)?),
        }
    }
    if !on_device.is_empty() {
        let sums = Tensor::stack(&on_device, 0)?.to_vec1::<f32>()?;
        sum += sums.into_iter().map(f64::from).sum::<f64>();
    }
    Ok(sum.sqrt())
}

/// `Σ g²` of a contiguous f32 CPU tensor; `None` for any other.
fn cpu_sum_squares(g: &Tensor) -> Option<f64> {
    let (storage, layout) = g.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let xs = f32_slice(cpu, layout).ok()?;
    Some(
        xs.par_chunks(ADAMW_CHUNK)
            .map(|c| f64::from(crate::kernels::sum_squares(c)))
            .sum(),
    )
}

/// The state saved beside a checkpoint's weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Epoch in progress and how many of its batches were consumed.
    pub epoch: usize,
    pub batches_done_in_epoch: usize,
    pub best_value: Option<f64>,
    pub best_step: Option<usize>,
    pub evals_without_improvement: usize,
    pub skipped_nonfinite: u64,
    pub stopped_early: bool,
    pub finished: bool,
}

/// What `fit` leaves behind.
#[derive(Debug, Clone)]
pub struct FitSummary {
    pub state: TrainState,
    /// Directory of the best checkpoint (`best/`), or of the last when nothing was validated.
    pub best_dir: PathBuf,
    /// Fraction of training wall time spent waiting for the next batch.
    pub data_wait_fraction: f64,
    pub resumed_from_step: Option<usize>,
}

/// Where `fit` writes: `<dir>/last/`, `<dir>/best/` and the metrics table.
pub struct FitOutput<'a> {
    pub checkpoint_dir: &'a Path,
    pub metrics_path: &'a Path,
    pub run_id: &'a str,
    pub stage: &'a str,
}

fn io_err(e: candle_core::Error, what: &Path) -> Error {
    Error::BadFile {
        path: what.to_path_buf(),
        message: e.to_string(),
    }
}

/// Saves weights, optimizer state and `state` into `dir` atomically (a temp dir renamed).
fn save_checkpoint(dir: &Path, vars: &VarMap, opt: &AdamW, state: &TrainState) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).at(parent)?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).at(&tmp)?;
    vars.save(tmp.join("model.safetensors"))
        .map_err(|e| io_err(e, &tmp))?;
    candle_core::safetensors::save(&opt.state_tensors(), tmp.join("optimizer.safetensors"))
        .map_err(|e| io_err(e, &tmp))?;
    let json = serde_json::to_vec_pretty(state).map_err(|e| Error::Config(e.to_string()))?;
    write_atomic(&tmp.join("state.json"), &json)?;
    let old = parent.join(format!(
        ".{}.old-{}",
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    if dir.exists() {
        std::fs::rename(dir, &old).at(dir)?;
    }
    std::fs::rename(&tmp, dir).at(dir)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn load_checkpoint(dir: &Path, vars: &mut VarMap, opt: &mut AdamW) -> Result<TrainState> {
    let state_path = dir.join("state.json");
    let bytes = std::fs::read(&state_path).at(&state_path)?;
    let state: TrainState = serde_json::from_slice(&bytes).map_err(|e| Error::BadFile {
        path: state_path.clone(),
        message: e.to_string(),
    })?;
    let weights = dir.join("model.safetensors");
    vars.load(&weights).map_err(|e| io_err(e, &weights))?;
    let opt_path = dir.join("optimizer.safetensors");
    let device = opt
        .vars
        .first()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let tensors =
        candle_core::safetensors::load(&opt_path, &device).map_err(|e| io_err(e, &opt_path))?;
    opt.load_state(&tensors, state.step as u64)
        .map_err(|e| io_err(e, &opt_path))?;
    Ok(state)
}

/// Accumulates scalars of several batches into means.
#[derive(Default)]
struct Means {
    sums: Vec<(String, f64, f64)>,
}

impl Means {
    fn add(&mut self, name: &str, value: f64, weight: f64) {
        match self.sums.iter_mut().find(|(n, _, _)| n == name) {
            Some(e) => {
                e.1 += value * weight;
                e.2 += weight;
            }
            None => self.sums.push((name.to_string(), value * weight, weight)),
        }
    }
    fn means(&self) -> Vec<(String, f64)> {
        self.sums
            .iter()
            .map(|(n, s, w)| (n.clone(), if *w > 0.0 { s / w } else { f64::NAN }))
            .collect()
    }
}

fn scalar(t: &Tensor) -> candle_core::Result<f64> {
    Ok(f64::from(t.to_dtype(DType::F32)?.to_scalar::<f32>()?))
}

/// Runs the validation batches; returns mean loss and scalars, and how many batches with a
/// non-finite loss were left out of them (`skipped_nonfinite_batches`), as in training: one
/// would make every mean NaN, and no later validation could then count as an improvement.
fn validate<O: Objective>(obj: &mut O) -> Result<Vec<(String, f64)>> {
    let mut means = Means::default();
    let mut skipped = 0u64;
    for batch in obj.val_batches()? {
        let batch = batch?;
        let out = obj.step(&batch, false).map_err(stage_err)?;
        let w = out.rows as f64;
        if w == 0.0 {
            continue;
        }
        let loss = scalar(&out.loss).map_err(stage_err)?;
        if !loss.is_finite() {
            skipped += 1;
            continue;
        }
        means.add("loss", loss, w);
        for (n, v) in &out.scalars {
            means.add(n, *v, w);
        }
    }
    let mut out = means.means();
    out.push(("skipped_nonfinite_batches".into(), skipped as f64));
    Ok(out)
}

fn stage_err(e: candle_core::Error) -> Error {
    Error::Candle {
        context: "training".into(),
        source: e,
    }
}

/// Trains `obj` for `total_steps` optimizer steps' worth of epochs under `cfg`, resuming from
/// `<checkpoint_dir>/last` when it exists. `steps_per_epoch` is the number of batches in an
/// epoch (for the schedule). Metrics go to `out.metrics_path` in long format.
pub fn fit<O: Objective>(
    obj: &mut O,
    cfg: &TrainConfig,
    steps_per_epoch: usize,
    out: &FitOutput,
) -> Result<FitSummary> {
    let accum = cfg.grad_accum.max(1);
    if steps_per_epoch == 0 {
        return Err(Error::Invalid(format!(
            "{}: the training split has no batches",
            out.stage
        )));
    }
    // As transformers' Trainer, an epoch's last batches step even when fewer than `accum`:
    // accumulation never spans two epochs (so an epoch-end checkpoint holds all of it).
    let total_steps = (cfg.epochs * steps_per_epoch.div_ceil(accum)).max(1);
    let mut opt = AdamW::new(obj.vars()).map_err(stage_err)?;
    let last_dir = out.checkpoint_dir.join("last");
    let best_dir = out.checkpoint_dir.join("best");
    let mut metrics: Vec<MetricRow> = if out.metrics_path.is_file() {
        crate::data::shard::read_parquet(out.metrics_path)?
    } else {
        Vec::new()
    };
    let mut state = TrainState {
        step: 0,
        epoch: 0,
        batches_done_in_epoch: 0,
        best_value: None,
        best_step: None,
        evals_without_improvement: 0,
        skipped_nonfinite: 0,
        stopped_early: false,
        finished: false,
    };
    let mut resumed_from_step = None;
    if last_dir.join("state.json").is_file() {
        let mut vars = obj.vars().clone();
        state = load_checkpoint(&last_dir, &mut vars, &mut opt)?;
        resumed_from_step = Some(state.step);
        // Metrics logged after the checkpoint belong to the lost part of the run.
        metrics.retain(|m| m.stage != out.stage || m.step <= state.step as i64);
        eprintln!(
            "[{}] resuming from step {} (epoch {})",
            out.stage, state.step, state.epoch
        );
    }
    let (select_name, higher_better) = {
        let (n, h) = obj.selection();
        (n.to_string(), h)
    };
    let mut push = |metrics: &mut Vec<MetricRow>,
                    step: usize,
                    epoch: usize,
                    split: &str,
                    name: &str,
                    value: f64| {
        metrics.push(MetricRow {
            run_id: out.run_id.to_string(),
            stage: out.stage.to_string(),
            step: step as i64,
            epoch: epoch as i64,
            split: split.to_string(),
            name: name.to_string(),
            value,
        });
    };
    let progress = Progress::new(out.stage, "steps", Some(total_steps as u64));
    progress.inc(state.step as u64);
    let started = Instant::now();
    let mut waited = 0f64;
    let mut pending: Vec<Option<Tensor>> = Vec::new();
    let mut pending_batches = 0usize;
    let mut last_norm = 0f64;
    let mut train_means = Means::default();
    let vars_sorted = opt.var_list();
    // The step last validated (a resumed run's checkpoint was written after a validation).
    let mut validated_at = resumed_from_step;
    'epochs: while state.epoch < cfg.epochs && !state.finished {
        let rx = obj.train_batches(state.epoch)?;
        let mut index = 0usize;
        loop {
            let t0 = Instant::now();
            let Ok(batch) = rx.recv() else { break };
            waited += t0.elapsed().as_secs_f64();
            let batch = batch?;
            index += 1;
            if index <= state.batches_done_in_epoch {
                continue; // consumed before the checkpoint we resumed from
            }
            state.batches_done_in_epoch = index;
            let end_of_epoch = index == steps_per_epoch;
            let out_step = obj.step(&batch, true).map_err(stage_err)?;
            // Whether this batch completed an optimizer step. A batch that does not (skipped,
            // empty, or still accumulating) still counts toward the end of the epoch.
            let stepped = 'update: {
                let grads = if out_step.rows == 0 {
                    None
                } else {
                    let loss_value = scalar(&out_step.loss).map_err(stage_err)?;
                    let grads = if loss_value.is_finite() {
                        let store = out_step.loss.backward().map_err(stage_err)?;
                        let grads = gradients(&store, &vars_sorted);
                        last_norm = grad_norm(&grads).map_err(stage_err)?;
                        last_norm.is_finite().then_some(grads)
                    } else {
                        None
                    };
                    match grads {
                        Some(grads) => {
                            train_means.add("loss", loss_value, out_step.rows as f64);
                            for (n, v) in &out_step.scalars {
                                train_means.add(n, *v, out_step.rows as f64);
                            }
                            Some(grads)
                        }
                        None => {
                            state.skipped_nonfinite += 1;
                            eprintln!(
                                "[{}] non-finite loss or gradient at step {}: batch skipped",
                                out.stage, state.step
                            );
                            None
                        }
                    }
                };
                if let Some(grads) = grads {
                    if pending.is_empty() {
                        pending = grads;
                    } else {
                        for (p, g) in pending.iter_mut().zip(grads) {
                            *p = match (p.take(), g) {
                                (Some(a), Some(b)) => Some((a + b).map_err(stage_err)?),
                                (a, b) => a.or(b),
                            };
                        }
                    }
                    pending_batches += 1;
                }
                // Step after `accum` batches, and at the end of the epoch with what there is.
                if pending_batches == 0 || (pending_batches < accum && !end_of_epoch) {
                    break 'update false;
                }
                let mut grads = std::mem::take(&mut pending);
                if pending_batches > 1 {
                    for g in grads.iter_mut().flatten() {
                        *g = (&*g / pending_batches as f64).map_err(stage_err)?;
                    }
                }
                // One batch: its gradient norm was computed by the guard above.
                let norm = match pending_batches {
                    1 => last_norm,
                    _ => grad_norm(&grads).map_err(stage_err)?,
                };
                pending_batches = 0;
                let lr = lr_at(state.step, total_steps, cfg.warmup_steps, cfg.lr);
                clip_and_step(&mut opt, &grads, norm, lr, cfg).map_err(stage_err)?;
                state.step += 1;
                progress.inc(1);
                let (step, epoch) = (state.step, state.epoch);
                for (n, v) in train_means.means() {
                    push(&mut metrics, step, epoch, "train", &n, v);
                }
                push(&mut metrics, step, epoch, "train", "lr", lr);
                push(&mut metrics, step, epoch, "train", "grad_norm", norm);
                train_means = Means::default();
                true
            };
            let step = state.step;
            let eval_now = if cfg.eval_every > 0 {
                stepped && step.is_multiple_of(cfg.eval_every)
            } else {
                end_of_epoch
            };
            if eval_now || (stepped && step == total_steps) {
                if end_of_epoch {
                    state.epoch += 1;
                    state.batches_done_in_epoch = 0;
                }
                if evaluate(
                    obj,
                    &mut state,
                    &mut metrics,
                    &mut push,
                    &select_name,
                    higher_better,
                    cfg,
                    &opt,
                    &best_dir,
                )? {
                    state.stopped_early = true;
                }
                validated_at = Some(step);
                state.finished = state.stopped_early || step >= total_steps;
                save_checkpoint(&last_dir, obj.vars(), &opt, &state)?;
                write_parquet(out.metrics_path, &metrics)?;
                if state.finished {
                    break 'epochs;
                }
                if end_of_epoch {
                    continue 'epochs;
                }
            }
        }
        if state.batches_done_in_epoch != 0 {
            state.epoch += 1;
            state.batches_done_in_epoch = 0;
        }
    }
    // Steps after the last validation (skipped batches left the run short of the step
    // count that would have validated, or eval_every does not divide it) are validated and
    // can become `best/` too.
    if state.step > 0 && validated_at != Some(state.step) {
        evaluate(
            obj,
            &mut state,
            &mut metrics,
            &mut push,
            &select_name,
            higher_better,
            cfg,
            &opt,
            &best_dir,
        )?;
    }
    state.finished = true;
    save_checkpoint(&last_dir, obj.vars(), &opt, &state)?;
    write_parquet(out.metrics_path, &metrics)?;
    let wall = started.elapsed().as_secs_f64().max(1e-9);
    progress.finish("");
    Ok(FitSummary {
        best_dir: if best_dir.is_dir() {
            best_dir
        } else {
            last_dir
        },
        state,
        data_wait_fraction: waited / wall,
        resumed_from_step,
    })
}

/// Validates, logs (with training's count of skipped batches so far), keeps the best
/// checkpoint; returns whether patience ran out.
#[allow(clippy::too_many_arguments)]
fn evaluate<O: Objective>(
    obj: &mut O,
    state: &mut TrainState,
    metrics: &mut Vec<MetricRow>,
    push: &mut impl FnMut(&mut Vec<MetricRow>, usize, usize, &str, &str, f64),
    select_name: &str,
    higher_better: bool,
    cfg: &TrainConfig,
    opt: &AdamW,
    best_dir: &Path,
) -> Result<bool> {
    let val = validate(obj)?;
    for (n, v) in &val {
        push(metrics, state.step, state.epoch, "val", n, *v);
    }
    push(
        metrics,
        state.step,
        state.epoch,
        "train",
        "skipped_nonfinite_batches",
        state.skipped_nonfinite as f64,
    );
    let Some(value) = val.iter().find(|(n, _)| n == select_name).map(|(_, v)| *v) else {
        return Ok(false);
    };
    let better = match state.best_value {
        None => value.is_finite(),
        Some(b) => value.is_finite() && if higher_better { value > b } else { value < b },
    };
    if better {
        state.best_value = Some(value);
        state.best_step = Some(state.step);
        state.evals_without_improvement = 0;
        save_checkpoint(best_dir, obj.vars(), opt, state)?;
    } else {
        state.evals_without_improvement += 1;
    }
    Ok(cfg.patience > 0 && state.evals_without_improvement >= cfg.patience)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::{Init, VarBuilder};

    /// Linear regression y = 3x - 1 on fixed data; one batch can carry a NaN.
    struct Regression {
        vars: VarMap,
        w: Tensor,
        b: Tensor,
        nan_batch: Option<usize>,
        /// (epoch, batch) at which the loader fails, as if the process died.
        fail_at: Option<(usize, usize)>,
        batches: usize,
    }

    impl Regression {
        fn new(nan_batch: Option<usize>) -> Self {
            let vars = VarMap::new();
            let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
            let w = vb.get_with_hints(1, "w", Init::Const(0.0)).unwrap();
            let b = vb.get_with_hints(1, "b", Init::Const(0.0)).unwrap();
            Self {
                vars,
                w,
                b,
                nan_batch,
                fail_at: None,
                batches: 8,
            }
        }
    }

    impl Objective for Regression {
        type Batch = (usize, Vec<f32>, Vec<f32>);
        fn vars(&self) -> &VarMap {
            &self.vars
        }
        fn step(&mut self, batch: &Self::Batch, _train: bool) -> candle_core::Result<StepOutput> {
            let (i, xs, ys) = batch;
            let n = xs.len();
            let x = Tensor::from_slice(xs, n, &Device::Cpu)?;
            let mut y = Tensor::from_slice(ys, n, &Device::Cpu)?;
            if self.nan_batch == Some(*i) {
                y = (y * f64::NAN)?;
            }
            let pred = x.broadcast_mul(&self.w)?.broadcast_add(&self.b)?;
            let loss = (pred - y)?.sqr()?.mean_all()?;
            Ok(StepOutput {
                loss,
                scalars: vec![("w".into(), f64::from(self.w.to_vec1::<f32>()?[0]))],
                rows: n,
            })
        }
        fn train_batches(&self, epoch: usize) -> Result<Receiver<Result<Self::Batch>>> {
            let (tx, rx) = crossbeam_channel::bounded(2);
            let (n, fail_at) = (self.batches, self.fail_at);
            std::thread::spawn(move || {
                for i in 0..n {
                    if fail_at == Some((epoch, i)) {
                        let _ = tx.send(Err(Error::Config("loader died".into())));
                        return;
                    }
                    let xs: Vec<f32> = (0..4)
                        .map(|k| ((i * 4 + k + epoch) % 9) as f32 / 4.0 - 1.0)
                        .collect();
                    let ys = xs.iter().map(|x| 3.0 * x - 1.0).collect();
                    if tx.send(Ok((i, xs, ys))).is_err() {
                        return;
                    }
                }
            });
            Ok(rx)
        }
        fn val_batches(&self) -> Result<Receiver<Result<Self::Batch>>> {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let xs = vec![-1.0, 0.0, 0.5, 1.0];
            let ys = xs.iter().map(|x| 3.0 * x - 1.0).collect();
            tx.send(Ok((usize::MAX, xs, ys))).ok();
            Ok(rx)
        }
    }

    fn cfg() -> TrainConfig {
        TrainConfig {
            epochs: 30,
            lr: 0.1,
            weight_decay: 0.0,
            warmup_steps: 5,
            max_grad_norm: 10.0,
            ..TrainConfig::default()
        }
    }

    fn out<'a>(dir: &'a Path, metrics: &'a Path) -> FitOutput<'a> {
        FitOutput {
            checkpoint_dir: dir,
            metrics_path: metrics,
            run_id: "r",
            stage: "test",
        }
    }

    #[test]
    fn schedule_warms_up_linearly_then_decays_to_zero() {
        assert_eq!(lr_at(0, 100, 10, 1.0), 0.0);
        assert!((lr_at(5, 100, 10, 1.0) - 0.5).abs() < 1e-12);
        assert!((lr_at(10, 100, 10, 1.0) - 1.0).abs() < 1e-12);
        assert!((lr_at(55, 100, 10, 1.0) - 0.5).abs() < 1e-12);
        assert!(lr_at(100, 100, 10, 1.0).abs() < 1e-12);
    }

    #[test]
    fn adamw_matches_pytorch_first_steps() {
        // torch.optim.AdamW(lr=0.1, weight_decay=0.01) on p=1.0 with grad 0.5, two steps:
        // step 1: p = 1*(1-0.001) - 0.1*1 = 0.899; step 2 likewise with m̂/√v̂ = 1 again.
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let p = vb.get_with_hints(1, "p", Init::Const(1.0)).unwrap();
        let mut opt = AdamW::new(&vars).unwrap();
        let cfg = TrainConfig {
            weight_decay: 0.01,
            ..TrainConfig::default()
        };
        let g = Some(Tensor::new(&[0.5f32], &Device::Cpu).unwrap());
        opt.step(std::slice::from_ref(&g), 1.0, 0.1, &cfg).unwrap();
        let v1 = p.to_vec1::<f32>().unwrap()[0];
        assert!((v1 - 0.899).abs() < 1e-6, "{v1}");
        opt.step(&[g], 1.0, 0.1, &cfg).unwrap();
        let v2 = p.to_vec1::<f32>().unwrap()[0];
        assert!((v2 - (0.899 * 0.999 - 0.1)).abs() < 1e-5, "{v2}");
    }

    #[test]
    fn a_variable_without_gradients_is_skipped_and_its_steps_counted_apart() {
        // PyTorch keeps `step` per parameter: `q`, first updated at the third step, gets a
        // first step's full update (m̂/√v̂ = 1), not one bias-corrected as a third.
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let a = vb.get_with_hints(1, "a", Init::Const(1.0)).unwrap();
        let q = vb.get_with_hints(1, "q", Init::Const(1.0)).unwrap();
        let mut opt = AdamW::new(&vars).unwrap();
        let cfg = TrainConfig {
            weight_decay: 0.01,
            ..TrainConfig::default()
        };
        let g = || Some(Tensor::new(&[0.5f32], &Device::Cpu).unwrap());
        opt.step(&[g(), None], 1.0, 0.1, &cfg).unwrap();
        opt.step(&[g(), None], 1.0, 0.1, &cfg).unwrap();
        assert_eq!(q.to_vec1::<f32>().unwrap(), [1.0]);
        opt.step(&[g(), g()], 1.0, 0.1, &cfg).unwrap();
        let q1 = q.to_vec1::<f32>().unwrap()[0];
        assert!((q1 - 0.899).abs() < 1e-6, "{q1}");
        assert!(a.to_vec1::<f32>().unwrap()[0] < 0.8);
        // The counts travel with the optimizer state.
        let mut restored = AdamW::new(&vars).unwrap();
        restored.load_state(&opt.state_tensors(), 99).unwrap();
        assert_eq!(restored.t, [3, 1]);
    }

    #[test]
    fn grad_norm_sums_every_gradient_in_place_or_not() {
        let mut rng = crate::rng::SplitMix64::new(7);
        let mut values = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.unit_f64() * 4.0 - 2.0) as f32)
                .collect()
        };
        // Several chunks and a tail; a transposed (non-contiguous) view; a gradient missing.
        let big = values(2 * ADAMW_CHUNK + 37);
        let small = values(6);
        let expected = big
            .iter()
            .chain(&small)
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt();
        let grads = [
            Some(Tensor::new(big.as_slice(), &Device::Cpu).unwrap()),
            None,
            Some(
                Tensor::from_vec(small, (2, 3), &Device::Cpu)
                    .unwrap()
                    .t()
                    .unwrap(),
            ),
        ];
        assert!(!grads[2].as_ref().unwrap().is_contiguous());
        let norm = grad_norm(&grads).unwrap();
        assert!(
            (norm - expected).abs() < 1e-6 * expected,
            "{norm} vs {expected}"
        );
    }

    #[test]
    fn gradients_and_tensor_op_moments_hold_no_graph() {
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let w = vb.get_with_hints((3, 2), "w", Init::Const(0.5)).unwrap();
        let input = vb
            .get_with_hints((4, 3), "input", Init::Const(0.1))
            .unwrap();
        let mut opt = AdamW::new(&vars).unwrap();
        opt.fused = false; // the path every non-CPU device takes
        let sorted = opt.var_list();
        for _ in 0..3 {
            // An activation between the two variables: the weight's gradient is a product
            // with it, which candle records.
            let act = (&input * 2.0).unwrap().tanh().unwrap();
            let loss = act.matmul(&w).unwrap().sqr().unwrap().sum_all().unwrap();
            let store = loss.backward().unwrap();
            let raw = store.get(&w).unwrap();
            assert!(raw.track_op(), "candle's weight gradient records its graph");
            let grads = gradients(&store, &sorted);
            assert_eq!(
                grads[1].as_ref().unwrap().to_vec2::<f32>().unwrap(),
                raw.to_vec2::<f32>().unwrap()
            );
            assert!(grads.iter().flatten().all(|g| !g.track_op()));
            // Moments made from undetached gradients hold no graph either.
            let tracked: Vec<Option<Tensor>> = sorted
                .iter()
                .map(|v| store.get(v.as_tensor()).cloned())
                .collect();
            opt.step(&tracked, 1.0, 0.01, &TrainConfig::default())
                .unwrap();
            assert!(opt.m.iter().chain(&opt.v).all(|t| !t.track_op()));
        }
        assert_ne!(w.to_vec2::<f32>().unwrap(), vec![vec![0.5f32; 2]; 3]);
    }

    #[test]
    fn fused_cpu_adamw_equals_the_tensor_op_path() {
        let mut rng = crate::rng::SplitMix64::new(3);
        let mut draw = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.unit_f64() * 2.0 - 1.0) as f32)
                .collect()
        };
        let init = draw(200_000);
        let grads: Vec<Vec<f32>> = (0..3).map(|_| draw(200_000)).collect();
        let cfg = TrainConfig {
            weight_decay: 0.1,
            ..TrainConfig::default()
        };
        let run = |fused: bool| -> Vec<f32> {
            let mut vars = VarMap::new();
            let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
            let p = vb.get_with_hints(200_000, "p", Init::Const(0.0)).unwrap();
            vars.set_one("p", Tensor::new(init.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
            let mut opt = AdamW::new(&vars).unwrap();
            opt.fused = fused;
            for (i, g) in grads.iter().enumerate() {
                let g = Tensor::new(g.as_slice(), &Device::Cpu).unwrap();
                opt.step(&[Some(g)], 0.5, 0.01 * (i + 1) as f64, &cfg)
                    .unwrap();
            }
            p.to_vec1().unwrap()
        };
        let (fused, ops) = (run(true), run(false));
        assert_ne!(fused, init);
        let diff = fused
            .iter()
            .zip(&ops)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-6, "max abs diff {diff}");
    }

    #[test]
    fn fit_learns_and_a_nan_batch_is_skipped_and_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let metrics = tmp.path().join("metrics.parquet");
        let mut obj = Regression::new(Some(3));
        let summary = fit(
            &mut obj,
            &cfg(),
            8,
            &out(&tmp.path().join("ckpt"), &metrics),
        )
        .unwrap();
        assert_eq!(
            summary.state.skipped_nonfinite, 30,
            "one NaN batch per epoch"
        );
        let w = obj.w.to_vec1::<f32>().unwrap()[0];
        let b = obj.b.to_vec1::<f32>().unwrap()[0];
        assert!(w.is_finite() && b.is_finite());
        assert!(
            (w - 3.0).abs() < 0.1 && (b + 1.0).abs() < 0.1,
            "w {w} b {b}"
        );
        let rows: Vec<MetricRow> = crate::data::shard::read_parquet(&metrics).unwrap();
        assert!(rows.iter().any(|r| r.split == "val" && r.name == "loss"));
        let skipped = rows
            .iter()
            .filter(|r| r.name == "skipped_nonfinite_batches")
            .map(|r| r.value)
            .fold(0.0, f64::max);
        assert_eq!(skipped, 30.0);
        assert!(rows.iter().all(|r| r.value.is_finite()));
    }

    #[test]
    fn resuming_from_the_last_checkpoint_gives_identical_results() {
        let c = TrainConfig {
            epochs: 6,
            eval_every: 5,
            grad_accum: 2,
            ..cfg()
        };
        // The run dies in epoch 3 (its loader fails); the rerun resumes from the last
        // checkpoint and ends exactly where the uninterrupted run did.
        let (_, resumed) = killed_and_resumed(&c, 8, (3, 5));
        let from = resumed.resumed_from_step.expect("resumed");
        assert!(from > 0 && from < resumed.state.step, "{from}");
    }

    /// Trains `batches` batches per epoch under `c` uninterrupted, and again with the loader
    /// failing at `fail_at` (epoch, batch) and then rerun in the same checkpoint directory;
    /// asserts both ended with the same weights and logged the same metrics. Returns the
    /// summaries of the uninterrupted run and of the rerun.
    fn killed_and_resumed(
        c: &TrainConfig,
        batches: usize,
        fail_at: (usize, usize),
    ) -> (FitSummary, FitSummary) {
        let tmp = tempfile::tempdir().unwrap();
        let run = |dir: &Path, fail_at: Option<(usize, usize)>| {
            let mut obj = Regression::new(None);
            obj.batches = batches;
            obj.fail_at = fail_at;
            let res = fit(&mut obj, c, batches, &out(dir, &dir.join("m.parquet")));
            (res, obj)
        };
        let (full, part) = (tmp.path().join("full"), tmp.path().join("part"));
        let (summary, a) = run(&full, None);
        assert!(run(&part, Some(fail_at)).0.is_err());
        let (resumed, b) = run(&part, None);
        for (x, y) in [(&a.w, &b.w), (&a.b, &b.b)] {
            assert_eq!(x.to_vec1::<f32>().unwrap(), y.to_vec1::<f32>().unwrap());
        }
        let ma: Vec<MetricRow> = crate::data::shard::read_parquet(&full.join("m.parquet")).unwrap();
        let mb: Vec<MetricRow> = crate::data::shard::read_parquet(&part.join("m.parquet")).unwrap();
        assert_eq!(ma, mb);
        (summary.unwrap(), resumed.unwrap())
    }

    #[test]
    fn an_epochs_last_batches_step_and_resuming_there_is_exact() {
        // 7 batches, accumulation 2: each epoch steps 4 times, the last with one batch, and
        // nothing accumulated crosses into the next epoch.
        let c = TrainConfig {
            epochs: 3,
            eval_every: 0,
            grad_accum: 2,
            ..cfg()
        };
        let (full, resumed) = killed_and_resumed(&c, 7, (1, 3));
        assert_eq!(full.state.step, 12);
        assert_eq!(resumed.resumed_from_step, Some(4));
    }

    #[test]
    fn the_last_step_is_validated_when_skipped_batches_leave_the_run_short() {
        // 2 epochs of 7 batches, one NaN each: 12 steps, not the 14 whose multiple-of-5
        // validations (5, 10) would otherwise leave steps 11 and 12 unvalidated.
        let tmp = tempfile::tempdir().unwrap();
        let metrics = tmp.path().join("m.parquet");
        let mut obj = Regression::new(Some(2));
        obj.batches = 7;
        let c = TrainConfig {
            epochs: 2,
            eval_every: 5,
            ..cfg()
        };
        let summary = fit(&mut obj, &c, 7, &out(&tmp.path().join("ckpt"), &metrics)).unwrap();
        assert_eq!(summary.state.step, 12);
        let rows: Vec<MetricRow> = crate::data::shard::read_parquet(&metrics).unwrap();
        let validated: Vec<i64> = rows
            .iter()
            .filter(|r| r.split == "val" && r.name == "loss")
            .map(|r| r.step)
            .collect();
        assert_eq!(validated, [5, 10, 12]);
        let skipped = rows
            .iter()
            .filter(|r| r.split == "train" && r.name == "skipped_nonfinite_batches")
            .map(|r| r.value)
            .fold(0.0, f64::max);
        assert_eq!(skipped, 2.0);
    }

    #[test]
    fn a_validation_batch_with_a_nan_loss_is_left_out_and_counted() {
        let mut obj = Regression::new(Some(usize::MAX));
        let val = validate(&mut obj).unwrap();
        let get = |name: &str| val.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
        assert_eq!(get("skipped_nonfinite_batches"), Some(1.0));
        assert_eq!(get("loss"), None);
        let mut clean = Regression::new(None);
        let val = validate(&mut clean).unwrap();
        assert!(val.iter().all(|(_, v)| v.is_finite()), "{val:?}");
    }
}
