//! AdamW with PyTorch's semantics (decoupled weight decay, per-parameter step counts), the
//! detached gradients of a backward pass, their global norm, and clipping.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use rayon::prelude::*;

use crate::kernels::adamw::{f32_slice, fused_kernels_on, MomentUpdate, ParamUpdate, ADAMW_CHUNK};
use crate::train::OptimizerConfig;

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
        cfg: &OptimizerConfig,
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

    pub(crate) fn state_tensors(&self) -> HashMap<String, Tensor> {
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
    pub(crate) fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        t: u64,
    ) -> candle_core::Result<()> {
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

/// Scales `grads` down to `cfg.max_grad_norm` when their global `norm` exceeds it, then takes
/// one AdamW step at learning rate `lr`.
pub fn clip_and_step(
    opt: &mut AdamW,
    grads: &[Option<Tensor>],
    norm: f64,
    lr: f64,
    cfg: &OptimizerConfig,
) -> candle_core::Result<()> {
    let scale = if cfg.max_grad_norm > 0.0 && norm > cfg.max_grad_norm {
        cfg.max_grad_norm / (norm + 1e-6)
    } else {
        1.0
    };
    opt.step(grads, scale, lr, cfg)
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::{Init, VarBuilder};

    #[test]
    fn adamw_matches_pytorch_first_steps() {
        // torch.optim.AdamW(lr=0.1, weight_decay=0.01) on p=1.0 with grad 0.5, two steps:
        // step 1: p = 1*(1-0.001) - 0.1*1 = 0.899; step 2 likewise with m̂/√v̂ = 1 again.
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let p = vb.get_with_hints(1, "p", Init::Const(1.0)).unwrap();
        let mut opt = AdamW::new(&vars).unwrap();
        let cfg = OptimizerConfig {
            weight_decay: 0.01,
            ..OptimizerConfig::default()
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
        let cfg = OptimizerConfig {
            weight_decay: 0.01,
            ..OptimizerConfig::default()
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
            opt.step(&tracked, 1.0, 0.01, &OptimizerConfig::default())
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
        let cfg = OptimizerConfig {
            weight_decay: 0.1,
            ..OptimizerConfig::default()
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
}
