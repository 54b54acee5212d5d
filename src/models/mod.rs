//! Models that mirror Hugging Face checkpoints: CLIP, GPT-2, the CLIP-prefix captioner, and the tiny checkpoints of the embedded default.

pub mod bert;
pub mod captioner;
pub mod clip;
pub mod contrastive;
pub mod diffusion;
pub mod gpt2;
pub mod reward;
pub mod story;
pub mod tiny;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// Re-initialises the variables of `vars` whose names start with `prefix` from `seed` and
/// `label` (candle's CPU generator cannot be seeded), in name order: weights N(0, 1/fan_in),
/// biases 0, LayerNorm gains (`.ln` in the name) 1, `constants` N(0, 1).
pub fn seed_vars(vars: &VarMap, prefix: &str, label: &str, seed: u64) -> Result<()> {
    let names: Vec<String> = vars
        .data()
        .lock()
        .map_err(|_| Error::Config("var map lock poisoned".into()))?
        .keys()
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect();
    init_vars(
        vars,
        &names,
        SplitMix64::derived(seed, label),
        |name, dims, rng| {
            let n: usize = dims.iter().product();
            if name.ends_with(".bias") {
                vec![0.0; n]
            } else if name.contains(".ln") {
                vec![1.0; n]
            } else if name.ends_with("constants") {
                rng.normal_samples(n, 1.0)
            } else {
                let fan_in = *dims.last().unwrap_or(&1) as f32;
                rng.normal_samples(n, 1.0 / fan_in.sqrt())
            }
        },
    )
}

/// Sets the variables `names` of `vars`, in name order, to what `init` draws for each
/// (name, shape) from `rng`.
pub fn init_vars(
    vars: &VarMap,
    names: &[String],
    mut rng: SplitMix64,
    init: impl Fn(&str, &[usize], &mut SplitMix64) -> Vec<f32>,
) -> Result<()> {
    let data = vars
        .data()
        .lock()
        .map_err(|_| Error::Config("var map lock poisoned".into()))?;
    let mut names: Vec<&String> = names.iter().collect();
    names.sort();
    for name in names {
        let var = data
            .get(name)
            .ok_or_else(|| Error::Config(format!("no variable `{name}`")))?;
        let dims = var.dims().to_vec();
        let t = Tensor::from_vec(init(name, &dims, &mut rng), dims, var.device())
            .map_err(|e| Error::Config(e.to_string()))?;
        var.set(&t)
            .map_err(|e| Error::Config(format!("{name}: {e}")))?;
    }
    Ok(())
}

/// Sets every variable of `vars` under `prefix.` from the checkpoint `weights`: the first of
/// `names(rest)` (checkpoint names for the variable `prefix.rest`) that it holds. A variable
/// with none is an error naming the file and the tensor, unless `may_be_new(rest)`: those are
/// left as they are and returned. A tensor of another shape is an error naming both shapes.
pub fn load_vars(
    vars: &VarMap,
    prefix: &str,
    weights: &Path,
    device: &Device,
    names: impl Fn(&str) -> Vec<String>,
    may_be_new: impl Fn(&str) -> bool,
) -> Result<Vec<String>> {
    let err = |m: String| Error::BadFile {
        path: weights.to_path_buf(),
        message: m,
    };
    let tensors =
        candle_core::safetensors::load(weights, device).map_err(|e| err(e.to_string()))?;
    let data = vars
        .data()
        .lock()
        .map_err(|_| err("var map lock poisoned".into()))?;
    let prefix = format!("{prefix}.");
    let mut absent = Vec::new();
    for (name, var) in data.iter() {
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let candidates = names(rest);
        let Some((key, t)) = candidates
            .iter()
            .find_map(|k| tensors.get(k).map(|t| (k, t)))
        else {
            if may_be_new(rest) {
                absent.push(name.clone());
                continue;
            }
            let want = candidates.first().cloned().unwrap_or_default();
            return Err(err(format!("no tensor `{want}` in the checkpoint")));
        };
        if t.dims() != var.dims() {
            return Err(err(format!(
                "tensor `{key}` is {:?}, the model needs {:?}",
                t.dims(),
                var.dims()
            )));
        }
        var.set(&t.to_dtype(DType::F32).map_err(|e| err(e.to_string()))?)
            .map_err(|e| err(format!("`{key}`: {e}")))?;
    }
    absent.sort();
    Ok(absent)
}
