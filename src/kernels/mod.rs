//! CPU kernels for what candle runs serially or through many full-size temporaries: parallel
//! elementwise activations and attention computed straight from a fused QKV projection
//! (GPT-2 training and inference, CLIP's vision tower), as candle custom ops.

pub mod adamw;

use std::marker::PhantomData;

use candle_core::{CpuStorage, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Elements per parallel task of an elementwise op: large enough to amortise scheduling.
pub(crate) const ELEMENTWISE_GRAIN: usize = 1 << 14;

/// Whether the CPU runs the AVX-512 (F, VL, DQ) builds of [`vectorised`] and
/// [`multiversioned!`] functions.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn has_avx512() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx512dq")
}

/// Whether the CPU runs the AVX2 + FMA builds.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn has_avx2() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// Runs `f` compiled for the widest vector unit the CPU has: AVX-512, else AVX2 with FMA,
/// else the build's baseline (SSE2 on x86-64, whose 4-lane loops run elementwise kernels
/// such as [`exp_fast`] at a quarter of AVX-512's speed). This works when the compiler
/// inlines `f` into the function with those target features, which it does for a small
/// loop; the code that rayon runs on other threads is not, so parallel kernels call this
/// inside each task. Loop nests are defined with [`multiversioned!`] instead, where the
/// inlining is certain.
#[inline(always)]
pub(crate) fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
        fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if has_avx512() {
            // SAFETY: the CPU has every feature the function is compiled for.
            return unsafe { avx512(f) };
        }
        if has_avx2() {
            // SAFETY: as above.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// Defines a function whose body is built three times, for AVX-512, for AVX2 + FMA and for
/// the build's baseline, one of which is picked at run time as [`vectorised`] does. The body
/// is an `#[inline(always)]` function called from each build, so it is compiled for that
/// build's features whatever its size (a large closure handed to [`vectorised`] may stay a
/// baseline function of its own: perf showed the attention softmax doing so).
macro_rules! multiversioned {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?)
        $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if $crate::kernels::has_avx512() {
                    // SAFETY: the CPU has every feature the function is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if $crate::kernels::has_avx2() {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub(crate) use multiversioned;

/// `f(a[i], b[i])` for equally long `a` and `b`, in parallel chunks of plain loops (which
/// vectorise, unlike an element-wise parallel iterator, and for the CPU's widest vectors).
pub(crate) fn par_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let n = a.len().min(b.len());
    // Written once, in parallel, without a serial zero fill first.
    let mut out: Vec<f32> = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(ELEMENTWISE_GRAIN)
        .zip(a[..n].par_chunks(ELEMENTWISE_GRAIN))
        .zip(b[..n].par_chunks(ELEMENTWISE_GRAIN))
        .for_each(|((o, a), b)| {
            vectorised(|| {
                for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                    o.write(f(a, b));
                }
            })
        });
    // SAFETY: the chunks above cover all n elements.
    unsafe { out.set_len(n) };
    out
}

/// The contiguous f32 elements of a CPU storage.
pub(crate) fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, z))) => Ok(&v[a..z]),
        _ => candle_core::bail!("fused op: expected a contiguous f32 input"),
    }
}

/// The contiguous u32 elements of a CPU storage.
pub(crate) fn cpu_u32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::U32(v), Some((a, z))) => Ok(&v[a..z]),
        _ => candle_core::bail!("fused op: expected a contiguous u32 input"),
    }
}

/// `e^x` without a libm call, so loops over it vectorise: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`,
/// `e^r` by its degree-7 Taylor polynomial, `2^n` through the exponent bits. Relative error
/// below 3e-7 for `x` in `[-87, 88]`; 0 below (masked scores must give exact zeros: a
/// 1e-38 weight would turn the products after it into denormals, which run ~100× slower),
/// `e^88` above; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_fast(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer with plain arithmetic.
    const ROUND: f32 = 12_582_912.0;
    const ROUND_BITS: i32 = 0x4B40_0000;
    let clamped = x.clamp(-87.0, 88.0);
    let shifted = clamped * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (clamped - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    // n as an integer, read from the mantissa of `shifted` (1.5·2²³ + n): unlike `n as i32`,
    // whose saturating conversion is done lane by lane, this stays in vector registers.
    let n_int = shifted.to_bits() as i32 - ROUND_BITS;
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// Lanes of the partial sums in [`lane_sum`] and [`lane_max`]: one AVX-512 register.
const LANES: usize = 16;

/// `Σ f(x)` over `xs` in [`LANES`] partial sums, so the loop vectorises (a single running
/// sum is a serial chain of dependent adds, which the compiler may not reorder).
#[inline(always)]
pub(crate) fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let blocks = xs.chunks_exact(LANES);
    let tail: f32 = blocks.remainder().iter().map(|&v| f(v)).sum();
    for block in blocks {
        for (a, &v) in acc.iter_mut().zip(block) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + tail
}

multiversioned! {
    /// `Σ x²` over `xs`, in [`LANES`] partial sums.
    pub(crate) fn sum_squares(xs: &[f32]) -> f32 {
        lane_sum(xs, |v| v * v)
    }
}

/// The largest element of `xs` (−∞ when empty), in [`LANES`] partial maxima.
#[inline(always)]
pub(crate) fn lane_max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let blocks = xs.chunks_exact(LANES);
    let tail = blocks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for block in blocks {
        for (a, &v) in acc.iter_mut().zip(block) {
            *a = a.max(v);
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

/// Rows per parallel task of [`layer_norm`].
const NORM_ROWS_PER_TASK: usize = 32;

/// Layer normalisation of the last dimension of `x`, `(x − mean) / √(var + eps) · weight +
/// bias` (population variance, as `nn.LayerNorm`). On the CPU (f32) one op, differentiable,
/// whose backward keeps only its input (the primitive composition keeps five tensors of the
/// input's size); its forward normalises rows in parallel blocks with vectorised two-pass
/// statistics into an output that is not zero-filled first. Elsewhere candle's fused kernel,
/// which has no backward (trainers use `gpt2::layer_norm_diff` there).
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
) -> candle_core::Result<Tensor> {
    if !(x.device().is_cpu() && x.dtype() == candle_core::DType::F32) {
        return candle_nn::ops::layer_norm(&x.contiguous()?, weight, bias, eps);
    }
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNormOp { eps },
    )
}

/// Mean and 1/σ of one row (two passes, in lane-wise partial sums).
#[inline(always)]
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = lane_sum(row, |v| v) / n;
    let var = lane_sum(row, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

multiversioned! {
    /// Rows of `x` (each `w.len()` long) normalised into `out`, with [`row_stats`].
    fn normalise_rows(
        out: &mut [std::mem::MaybeUninit<f32>],
        x: &[f32],
        w: &[f32],
        b: &[f32],
        eps: f32,
    ) {
        for (out, x) in out.chunks_mut(w.len()).zip(x.chunks(w.len())) {
            let (mean, rstd) = row_stats(x, eps);
            for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
                o.write((v - mean) * rstd * w + b);
            }
        }
    }
}

struct LayerNormOp {
    eps: f32,
}

impl candle_core::CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, b) = (cpu_f32(s1, l1)?, cpu_f32(s2, l2)?, cpu_f32(s3, l3)?);
        let d = l1.shape().dims().last().copied().unwrap_or(0);
        if d == 0 || w.len() != d || b.len() != d {
            candle_core::bail!(
                "layer norm: input {:?}, weight {:?}, bias {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let mut out: Vec<f32> = Vec::with_capacity(x.len());
        out.spare_capacity_mut()[..x.len()]
            .par_chunks_mut(d * NORM_ROWS_PER_TASK)
            .zip(x.par_chunks(d * NORM_ROWS_PER_TASK))
            .for_each(|(out, x)| normalise_rows(out, x, w, b, self.eps));
        // SAFETY: the chunks above cover every row, and every row is written whole.
        unsafe { out.set_len(x.len()) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(candle_core::D::Minus1)?;
        let n = x.elem_count() / d;
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let ws = w.to_vec1::<f32>()?;
        let gs = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; n * d];
        // Per-chunk partial sums of dy·x̂ (weight) and dy (bias), added up after.
        let rows_per_chunk = n.div_ceil(rayon::current_num_threads().max(1) * 4).max(1);
        let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(rows_per_chunk * d)
            .zip(
                xs.par_chunks(rows_per_chunk * d)
                    .zip(gs.par_chunks(rows_per_chunk * d)),
            )
            .map(|(dxc, (xc, gc))| {
                let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
                let mut xhat = vec![0f32; d];
                for ((dxr, xr), gr) in dxc.chunks_mut(d).zip(xc.chunks(d)).zip(gc.chunks(d)) {
                    let (mean, rstd) = row_stats(xr, self.eps);
                    let (mut sum_g, mut sum_gx) = (0f32, 0f32);
                    for i in 0..d {
                        xhat[i] = (xr[i] - mean) * rstd;
                        let g = gr[i] * ws[i];
                        sum_g += g;
                        sum_gx += g * xhat[i];
                        dw[i] += gr[i] * xhat[i];
                        db[i] += gr[i];
                    }
                    let (mg, mgx) = (sum_g / d as f32, sum_gx / d as f32);
                    for i in 0..d {
                        dxr[i] = rstd * (gr[i] * ws[i] - mg - xhat[i] * mgx);
                    }
                }
                (dw, db)
            })
            .collect();
        let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
        for (pw, pb) in partial {
            for i in 0..d {
                dw[i] += pw[i];
                db[i] += pb[i];
            }
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, d, dev)?),
            Some(Tensor::from_vec(db, d, dev)?),
        ))
    }
}

/// How a linear layer stores its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `(out, in)`, as `nn.Linear` (CLIP).
    OutIn,
    /// `(in, out)`, as GPT-2's `Conv1D`.
    InOut,
}

/// `x · W + b` for `x` `(n, k)`, the weight `w` stored as `layout` says and `b` `(m,)`,
/// differentiably. On the CPU one GEMM accumulates onto the broadcast bias, and the backward
/// is three GEMMs (`dx`, `dw`, and `db = 1ᵀ·g`); the composition keeps the product before the
/// bias too, and its bias gradient is a strided, serial column sum over all `n` rows.
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    layout: WeightLayout,
) -> candle_core::Result<Tensor> {
    if !(x.device().is_cpu() && x.dtype() == candle_core::DType::F32) {
        let w = match layout {
            WeightLayout::OutIn => w.t()?,
            WeightLayout::InOut => w.clone(),
        };
        return x.matmul(&w)?.broadcast_add(b);
    }
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LinearT(layout))
}

struct LinearT(WeightLayout);

impl candle_core::CustomOp3 for LinearT {
    fn name(&self) -> &'static str {
        "linear-t"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, b) = (cpu_f32(s1, l1)?, cpu_f32(s2, l2)?, cpu_f32(s3, l3)?);
        let (n, k) = l1.shape().dims2()?;
        let (m, kw) = match (self.0, l2.shape().dims2()?) {
            (WeightLayout::OutIn, (m, kw)) | (WeightLayout::InOut, (kw, m)) => (m, kw),
        };
        if k != kw || b.len() != m {
            candle_core::bail!(
                "linear: x {n}x{k}, w {:?} {:?}, b {}",
                self.0,
                l2.dims(),
                b.len()
            );
        }
        let out = gemm_onto_bias(x, (n, k), w, self.0, b, None);
        Ok((CpuStorage::F32(out), (n, m).into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, w, g) = (x.detach(), w.detach(), grad.detach().contiguous()?);
        let n = g.dim(0)?;
        let (dx, dw) = match self.0 {
            WeightLayout::OutIn => (g.matmul(&w)?, g.t()?.matmul(&x)?),
            WeightLayout::InOut => (g.matmul(&w.t()?)?, x.t()?.matmul(&g)?),
        };
        let db = Tensor::ones((1, n), g.dtype(), g.device())?
            .matmul(&g)?
            .squeeze(0)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Rows of output handed to one task by [`bias_rows`].
const BIAS_ROWS_PER_TASK: usize = 64;

/// `n` rows of `b` (plus the matching row of `residual` `(n, len b)` when given), row-major:
/// the start of a GEMM that accumulates onto its bias. Written once, in parallel, without the
/// serial zero fill of `vec![0; …]`.
fn bias_rows(n: usize, b: &[f32], residual: Option<&[f32]>) -> Vec<f32> {
    let m = b.len();
    let mut out: Vec<f32> = Vec::with_capacity(n * m);
    out.spare_capacity_mut()[..n * m]
        .par_chunks_mut(m.max(1) * BIAS_ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (r, row) in chunk.chunks_mut(m.max(1)).enumerate() {
                let i = task * BIAS_ROWS_PER_TASK + r;
                match residual {
                    Some(res) => {
                        for ((o, &bv), &rv) in row.iter_mut().zip(b).zip(&res[i * m..(i + 1) * m]) {
                            o.write(bv + rv);
                        }
                    }
                    None => {
                        for (o, &bv) in row.iter_mut().zip(b) {
                            o.write(bv);
                        }
                    }
                }
            }
        });
    // SAFETY: the pass above wrote all n·m elements (every row of every chunk).
    unsafe { out.set_len(n * m) };
    out
}

/// `x · W + b (+ residual)` on the CPU for `x` `(n, k)` row-major, the weight `w` stored as
/// `layout` says, `b` `(m,)` and `residual` `(n, m)`, shapes already checked by the caller:
/// the output starts as [`bias_rows`] and one GEMM accumulates onto it. The one forward of
/// [`linear`] and [`dense`].
fn gemm_onto_bias(
    x: &[f32],
    (n, k): (usize, usize),
    w: &[f32],
    layout: WeightLayout,
    b: &[f32],
    residual: Option<&[f32]>,
) -> Vec<f32> {
    let m = b.len();
    // The weight as the k × m right-hand side.
    let rhs = match layout {
        WeightLayout::OutIn => View::rows(w, 0, k).t(),
        WeightLayout::InOut => View::rows(w, 0, m),
    };
    let mut out = bias_rows(n, b, residual);
    // SAFETY: x is n × k row-major, rhs addresses k × m elements of w, out is n × m and
    // owned here.
    unsafe { par_gemm(n, m, k, out.as_mut_ptr(), m, true, View::rows(x, 0, k), rhs) };
    out
}

/// Inference: `x · wᵀ + b`, plus `residual` when given, for `x` `(n, k)`, `w` `(m, k)` as
/// nn.Linear stores it, `b` `(m,)` and `residual` `(n, m)`. On the CPU (f32) the output is
/// allocated without zeroing, filled with the bias (and the residual) in one parallel pass,
/// and one GEMM accumulates onto it: no zero fill, no bias or residual pass afterwards.
pub fn dense(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    if !(x.device().is_cpu() && x.dtype() == candle_core::DType::F32) {
        let y = x.matmul(&w.t()?)?.broadcast_add(b)?;
        return match residual {
            Some(r) => y + r,
            None => Ok(y),
        };
    }
    let (x, w, b) = (x.contiguous()?, w.contiguous()?, b.contiguous()?);
    let residual = residual.map(Tensor::contiguous).transpose()?;
    let ((n, k), (m, kw)) = (x.dims2()?, w.dims2()?);
    if k != kw || b.dims1()? != m || residual.as_ref().is_some_and(|r| r.dims() != [n, m]) {
        candle_core::bail!(
            "dense: x {n}x{k}, w {:?}, b {:?}, residual {:?}",
            w.dims(),
            b.dims(),
            residual.as_ref().map(|r| r.dims().to_vec())
        );
    }
    let guards = [Some(&x), Some(&w), Some(&b), residual.as_ref()]
        .map(|t| t.map(Tensor::storage_and_layout));
    let slice = |i: usize| -> candle_core::Result<Option<&[f32]>> {
        match &guards[i] {
            Some((storage, layout)) => match &**storage {
                candle_core::Storage::Cpu(cpu) => cpu_f32(cpu, layout).map(Some),
                _ => candle_core::bail!("dense: expected CPU tensors"),
            },
            None => Ok(None),
        }
    };
    let (xs, ws, bs, rs) = (slice(0)?, slice(1)?, slice(2)?, slice(3)?);
    let (xs, ws, bs) = (
        xs.unwrap_or_default(),
        ws.unwrap_or_default(),
        bs.unwrap_or_default(),
    );
    let out = gemm_onto_bias(xs, (n, k), ws, WeightLayout::OutIn, bs, rs);
    drop(guards);
    Tensor::from_vec(out, (n, m), x.device())
}

/// An elementwise activation with its derivative, for [`activate`].
pub(crate) trait Activation: Send + Sync + 'static {
    const NAME: &'static str;
    fn value(x: f32) -> f32;
    /// `d value / dx` at `x`.
    fn slope(x: f32) -> f32;
}

/// `A` applied to a contiguous f32 CPU tensor in one parallel, vectorised pass, with a
/// one-pass backward that needs only the input.
pub(crate) fn activate<A: Activation>(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Pointwise::<A>(PhantomData))
}

struct Pointwise<A>(PhantomData<A>);

impl<A: Activation> candle_core::CustomOp1 for Pointwise<A> {
    fn name(&self) -> &'static str {
        A::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l)?;
        let out = par_map(x, x, |v, _| A::value(v));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = PointwiseGrad::<A>(PhantomData);
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &grad)?))
    }
}

/// `g · A'(x)` in one pass.
struct PointwiseGrad<A>(PhantomData<A>);

impl<A: Activation> candle_core::CustomOp2 for PointwiseGrad<A> {
    fn name(&self) -> &'static str {
        "activation-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, g) = (cpu_f32(s1, l1)?, cpu_f32(s2, l2)?);
        if x.len() != g.len() {
            candle_core::bail!(
                "{} backward: {} inputs, {} gradients",
                A::NAME,
                x.len(),
                g.len()
            );
        }
        let out = par_map(x, g, |v, g| g * A::slope(v));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// CLIP's `quick_gelu`, `x·σ(1.702·x)`.
pub(crate) struct QuickGelu;

/// quick_gelu's sigmoid slope.
pub(crate) const QUICK_GELU_SLOPE: f32 = 1.702;

impl Activation for QuickGelu {
    const NAME: &'static str = "quick-gelu";

    fn value(x: f32) -> f32 {
        x / (1.0 + exp_fast(-QUICK_GELU_SLOPE * x))
    }

    /// `σ + 1.702·x·σ·(1 − σ)` with `σ = σ(1.702·x)`.
    fn slope(x: f32) -> f32 {
        let s = 1.0 / (1.0 + exp_fast(-QUICK_GELU_SLOPE * x));
        s + QUICK_GELU_SLOPE * x * s * (1.0 - s)
    }
}

/// `x·σ(x)` (SiLU) of a contiguous f32 CPU tensor in one parallel, vectorised pass
/// (candle's is serial, with a libm `exp` per element); inference only.
/// Rows of `x` scaled to unit L2 norm (along the last dimension); differentiable.
pub fn l2_normalized(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(candle_core::D::Minus1)?.sqrt()?)
}

pub fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Silu)
}

struct Silu;

impl candle_core::CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "silu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l)?;
        let out = par_map(x, x, |v, _| v / (1.0 + exp_fast(-v)));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// Causal self-attention straight from the fused projection: `qkv` `(b, t, 3·d)` (queries,
/// keys, values side by side, heads `hd` wide within each) → `(b, t, d)` with the heads merged,
/// on the CPU. Each (sequence, head) is a few small GEMMs on strided views of `qkv`, so the
/// per-head copies (split, scale, merge) of the tensor-op composition are never made, and the
/// backward recomputes the attention weights: a training graph keeps `qkv` and the output per
/// layer instead of three more `(b, t, d)`-sized copies and the `(b, h, t, t)` weights.
pub struct QkvAttention {
    pub heads: usize,
    /// Applied to the scores `q·kᵀ`.
    pub scale: f32,
    /// Additive mask `(b, 1, t, t)`, row-major; `None` lets every position see every other.
    pub mask: Option<Vec<f32>>,
}

/// A strided f32 matrix for `gemm`: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct View {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

impl View {
    /// Row-major rows of `stride` elements starting at `at`.
    pub(crate) fn rows(data: &[f32], at: usize, stride: usize) -> Self {
        Self {
            ptr: data[at..].as_ptr(),
            rs: stride as isize,
            cs: 1,
        }
    }

    pub(crate) fn t(self) -> Self {
        Self {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `dst (m × n, rows dst_rs apart) = beta · a (m × k) · b (k × n)`, single-threaded (callers
/// run many of these in parallel).
///
/// # Safety
/// The views must address `m × k` and `k × n` valid elements, and `dst` `m × n` writable ones
/// that no other thread touches.
#[allow(clippy::too_many_arguments)] // a BLAS call's shape, strides and scale
pub(crate) unsafe fn small_gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    a: View,
    b: View,
    beta: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        0.0,
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// `dst (m × n, rows dst_rs apart) = [dst +] a (m × k) · b (k × n)` on candle's thread count.
///
/// # Safety
/// As [`small_gemm`], with `dst` touched by no other thread during the call.
#[allow(clippy::too_many_arguments)] // a BLAS call's shape and strides
pub(crate) unsafe fn par_gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: View,
    b: View,
) {
    let threads = candle_core::utils::get_num_threads();
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        },
    )
}

multiversioned! {
    /// Softmax of each `t`-long row of `p`, in place.
    fn softmax_rows(p: &mut [f32], t: usize) {
        for row in p.chunks_mut(t) {
            let max = lane_max(row);
            row.iter_mut().for_each(|x| *x = exp_fast(*x - max));
            let sum = lane_sum(row, |v| v);
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

impl QkvAttention {
    /// The attention weights of sequence `bi`, head `h` into `p` (`t × t`).
    fn weights(&self, qkv: &[f32], bi: usize, h: usize, t: usize, d: usize, p: &mut [f32]) {
        let hd = d / self.heads;
        let base = bi * t * 3 * d;
        let q = View::rows(qkv, base + h * hd, 3 * d);
        let k = View::rows(qkv, base + d + h * hd, 3 * d);
        // SAFETY: q and k address t rows of hd elements inside qkv; p holds t × t.
        unsafe { small_gemm(t, t, hd, p.as_mut_ptr(), t, q, k.t(), self.scale) };
        if let Some(mask) = &self.mask {
            let mask = &mask[bi * t * t..(bi + 1) * t * t];
            p.iter_mut().zip(mask).for_each(|(x, &m)| *x += m);
        }
        softmax_rows(p, t);
    }

    /// `(b, t, d)` from the `(b, t, 3·d)` layout of `shape`.
    fn dims(&self, shape: &Shape) -> candle_core::Result<(usize, usize, usize)> {
        let (b, t, d3) = shape.dims3()?;
        let d = d3 / 3;
        let masked = self.mask.as_ref().map_or(b * t * t, Vec::len);
        if d3 % 3 != 0 || d % self.heads != 0 || masked != b * t * t {
            candle_core::bail!(
                "qkv attention: bad shape {shape:?} for {} heads",
                self.heads
            );
        }
        Ok((b, t, d))
    }
}

impl candle_core::CustomOp1 for QkvAttention {
    fn name(&self) -> &'static str {
        "qkv-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let qkv = cpu_f32(s, l)?;
        let (b, t, d) = self.dims(l.shape())?;
        let hd = d / self.heads;
        let mut out = vec![0f32; b * t * d];
        out.par_chunks_mut(t * d).enumerate().for_each(|(bi, out)| {
            let mut p = vec![0f32; t * t];
            for h in 0..self.heads {
                self.weights(qkv, bi, h, t, d, &mut p);
                let v = View::rows(qkv, bi * t * 3 * d + 2 * d + h * hd, 3 * d);
                let pv = View::rows(&p, 0, t);
                // SAFETY: this task owns `out` (sequence bi); head h writes its hd columns.
                unsafe { small_gemm(t, hd, t, out[h * hd..].as_mut_ptr(), d, pv, v, 1.0) };
            }
        });
        Ok((CpuStorage::F32(out), (b, t, d).into()))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let g = qkv.apply_op3_no_bwd(out, &grad, &QkvAttentionGrad(self))?;
        Ok(Some(g))
    }
}

/// The gradient of [`QkvAttention`] with respect to `qkv`, from `qkv`, the output and its
/// gradient.
struct QkvAttentionGrad<'a>(&'a QkvAttention);

impl candle_core::CustomOp3 for QkvAttentionGrad<'_> {
    fn name(&self) -> &'static str {
        "qkv-attention-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let att = self.0;
        let (qkv, out, grad) = (cpu_f32(s1, l1)?, cpu_f32(s2, l2)?, cpu_f32(s3, l3)?);
        let (b, t, d) = att.dims(l1.shape())?;
        if out.len() != b * t * d || grad.len() != out.len() {
            candle_core::bail!("qkv attention backward: output or gradient of the wrong size");
        }
        let hd = d / att.heads;
        let mut dqkv = vec![0f32; b * t * 3 * d];
        dqkv.par_chunks_mut(t * 3 * d)
            .enumerate()
            .for_each(|(bi, dqkv)| {
                let (mut p, mut ds) = (vec![0f32; t * t], vec![0f32; t * t]);
                let base = bi * t * 3 * d;
                for h in 0..att.heads {
                    att.weights(qkv, bi, h, t, d, &mut p);
                    let at = bi * t * d + h * hd;
                    let g = View::rows(grad, at, d);
                    let q = View::rows(qkv, base + h * hd, 3 * d);
                    let k = View::rows(qkv, base + d + h * hd, 3 * d);
                    let v = View::rows(qkv, base + 2 * d + h * hd, 3 * d);
                    let (pv, dsv) = (View::rows(&p, 0, t), View::rows(&ds, 0, t));
                    // SAFETY: all views lie inside their buffers; this task owns `dqkv` (sequence
                    // bi) and head h writes only its hd columns of each third.
                    unsafe {
                        small_gemm(
                            t,
                            hd,
                            t,
                            dqkv[2 * d + h * hd..].as_mut_ptr(),
                            3 * d,
                            pv.t(),
                            g,
                            1.0,
                        );
                        small_gemm(t, t, hd, ds.as_mut_ptr(), t, g, v.t(), 1.0);
                    }
                    // Softmax backward: ds = p ⊙ (dp − Σ_j dp_j·p_j), where Σ_j dp_j·p_j = g·out.
                    for i in 0..t {
                        let row = at + i * d;
                        let dot: f32 = grad[row..row + hd]
                            .iter()
                            .zip(&out[row..row + hd])
                            .map(|(g, o)| g * o)
                            .sum();
                        for (x, &pp) in ds[i * t..(i + 1) * t]
                            .iter_mut()
                            .zip(&p[i * t..(i + 1) * t])
                        {
                            *x = pp * (*x - dot);
                        }
                    }
                    // SAFETY: as above.
                    unsafe {
                        small_gemm(
                            t,
                            hd,
                            t,
                            dqkv[h * hd..].as_mut_ptr(),
                            3 * d,
                            dsv,
                            k,
                            att.scale,
                        );
                        small_gemm(
                            t,
                            hd,
                            t,
                            dqkv[d + h * hd..].as_mut_ptr(),
                            3 * d,
                            dsv.t(),
                            q,
                            att.scale,
                        );
                    }
                }
            });
        Ok((CpuStorage::F32(dqkv), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::max_abs_diff as max_abs;
    use candle_core::{Device, D};

    #[test]
    fn layer_norm_is_its_definition() {
        // 70 rows of 40: a partial task block, rows that are not a whole number of lanes,
        // and an offset far from zero (the two-pass variance must not cancel).
        let x = (Tensor::randn(0f32, 2.0, (2, 35, 40), &Device::Cpu).unwrap() + 300.0).unwrap();
        let w = Tensor::randn(1f32, 0.5, 40, &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 0.5, 40, &Device::Cpu).unwrap();
        let ours = layer_norm(&x, &w, &b, 1e-5).unwrap();
        // The definition in f64: (x − mean) / √(var + eps) · w + b.
        let x64 = x.to_dtype(candle_core::DType::F64).unwrap();
        let mean = x64.mean_keepdim(D::Minus1).unwrap();
        let centred = x64.broadcast_sub(&mean).unwrap();
        let var = centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let want = centred
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&w.to_dtype(candle_core::DType::F64).unwrap())
            .unwrap()
            .broadcast_add(&b.to_dtype(candle_core::DType::F64).unwrap())
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        assert_eq!(ours.dims(), x.dims());
        assert!(max_abs(&ours, &want) < 1e-4, "{}", max_abs(&ours, &want));
        let bad = Tensor::zeros(39, candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = layer_norm(&x, &bad, &b, 1e-5).unwrap_err().to_string();
        assert!(err.contains("layer norm"), "{err}");
    }

    #[test]
    fn lane_reductions_equal_the_plain_ones() {
        for n in [0, 1, 15, 16, 17, 50, 768] {
            let xs: Vec<f32> = (0..n).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
            let plain: f32 = xs.iter().map(|v| v * v).sum();
            assert!(
                (lane_sum(&xs, |v| v * v) - plain).abs() <= plain.abs() * 1e-6,
                "{n}"
            );
            let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(lane_max(&xs), max, "{n}");
        }
    }

    #[test]
    fn parallel_silu_equals_candles() {
        let x = (Tensor::randn(0f32, 1.0, (3, 40_000), &Device::Cpu).unwrap() * 6.0).unwrap();
        let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (ours, theirs) = (flat(silu(&x).unwrap()), flat(x.silu().unwrap()));
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .fold(0f32, f32::max);
        assert!(worst < 1e-6, "silu differs by {worst}");
    }

    #[test]
    fn fast_exp_is_libms_within_a_few_ulp() {
        let mut worst = 0f64;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let want = f64::from(x).exp();
            worst = worst.max((f64::from(exp_fast(x)) - want).abs() / want);
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert_eq!(exp_fast(0.0), 1.0);
        assert_eq!(exp_fast(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_fast(f32::MIN / 2.0), 0.0);
        assert_eq!(exp_fast(-87.5), 0.0);
        assert!(exp_fast(f32::NAN).is_nan());
    }

    #[test]
    fn unmasked_qkv_attention_equals_softmax_attention() {
        // Head widths and sequence lengths of the tiny test models and of ViT-B/32 (50 tokens
        // of 64-wide heads).
        for (b, heads, t, hd) in [(3, 2, 7, 4), (2, 3, 50, 64), (2, 2, 19, 32), (1, 1, 3, 16)] {
            qkv_attention_equals_softmax_attention(b, heads, t, hd);
        }
    }

    fn qkv_attention_equals_softmax_attention(b: usize, heads: usize, t: usize, hd: usize) {
        let d = heads * hd;
        let qkv = Tensor::randn(0f32, 1.0, (b, t, 3 * d), &Device::Cpu).unwrap();
        let op = QkvAttention {
            heads,
            scale: 0.3,
            mask: None,
        };
        let ours = qkv.apply_op1_no_bwd(&op).unwrap();
        let split = |i: usize| {
            qkv.narrow(2, i * d, d)
                .unwrap()
                .reshape((b, t, heads, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let att = (q.matmul(&k.t().unwrap()).unwrap() * 0.3).unwrap();
        let att = candle_nn::ops::softmax(&att, D::Minus1).unwrap();
        let theirs = att.matmul(&v).unwrap().transpose(1, 2).unwrap();
        let theirs = theirs.reshape((b, t, d)).unwrap();
        let worst = max_abs(&ours, &theirs);
        assert!(
            worst < 1e-5,
            "{b}×{heads}×{t}×{hd}: max abs difference {worst}"
        );
    }

    /// The fused linear op and its three gradients equal candle's `x·wᵀ + b` composition.
    #[test]
    fn fused_linear_and_its_gradients_equal_the_composition() {
        let dev = Device::Cpu;
        let x = candle_core::Var::randn(0f32, 1.0, (37, 12), &dev).unwrap();
        let w = candle_core::Var::randn(0f32, 1.0, (9, 12), &dev).unwrap();
        let b = candle_core::Var::randn(0f32, 1.0, 9, &dev).unwrap();
        let up = Tensor::randn(0f32, 1.0, (37, 9), &dev).unwrap();
        let ours = linear(x.as_tensor(), w.as_tensor(), &b, WeightLayout::OutIn).unwrap();
        let theirs = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert!(max_abs(&ours, &theirs) < 1e-5);
        let g1 = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w, &b] {
            let (a, c) = (g1.get(v).unwrap(), g2.get(v).unwrap());
            assert_eq!(a.dims(), c.dims());
            assert!(
                max_abs(a, c) < 1e-4,
                "gradient differs by {}",
                max_abs(a, c)
            );
        }
    }

    /// quick_gelu's value and slope against `x·σ(1.702·x)` and a central difference.
    #[test]
    fn dense_equals_matmul_plus_bias_plus_residual() {
        // 150 rows: more than one fill task of BIAS_ROWS_PER_TASK, the last one short.
        let (n, k, m) = (150, 33, 70);
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.3, (m, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, m, &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (n, m), &dev).unwrap();
        let plain = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let worst = |a: &Tensor, e: &Tensor| {
            assert_eq!(a.dims(), e.dims());
            flat(a)
                .iter()
                .zip(flat(e))
                .map(|(a, e)| (a - e).abs())
                .fold(0f32, f32::max)
        };
        let ours = dense(&x, &w, &b, None).unwrap();
        assert!(worst(&ours, &plain) < 1e-5);
        let ours = dense(&x, &w, &b, Some(&r)).unwrap();
        assert!(worst(&ours, &(&plain + &r).unwrap()) < 1e-5);
        // A transposed (non-contiguous) input is made contiguous, not misread.
        let xt = x.t().unwrap().contiguous().unwrap().t().unwrap();
        assert!(worst(&dense(&xt, &w, &b, None).unwrap(), &plain) < 1e-5);
        let err = dense(&x, &w, &b.narrow(0, 0, m - 1).unwrap(), None).unwrap_err();
        assert!(err.to_string().contains("dense: x 150x33"), "{err}");
    }

    #[test]
    fn quick_gelu_value_and_slope() {
        for i in -400..=400 {
            let x = i as f32 * 0.025;
            let want = f64::from(x) / (1.0 + (-1.702 * f64::from(x)).exp());
            assert!(
                (f64::from(QuickGelu::value(x)) - want).abs() < 1e-6,
                "value at {x}"
            );
            let h = 1e-3f64;
            let f = |x: f64| x / (1.0 + (-1.702 * x).exp());
            let slope = (f(f64::from(x) + h) - f(f64::from(x) - h)) / (2.0 * h);
            assert!(
                (f64::from(QuickGelu::slope(x)) - slope).abs() < 1e-5,
                "slope at {x}"
            );
        }
    }
}
