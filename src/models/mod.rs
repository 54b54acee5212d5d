//! Models that mirror Hugging Face checkpoints: CLIP, GPT-2, the CLIP-prefix captioner, and the tiny checkpoints of the embedded default.

pub mod bert;
pub mod captioner;
pub mod clip;
pub mod contrastive;
pub mod gpt2;
pub mod tiny;

use candle_core::Tensor;
use candle_nn::VarMap;

use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// Re-initialises the variables of `vars` whose names start with `prefix` from `seed` and
/// `label` (candle's CPU generator cannot be seeded), in name order: weights N(0, 1/fan_in),
/// biases 0, LayerNorm gains (`.ln` in the name) 1, `constants` N(0, 1).
pub fn seed_vars(vars: &VarMap, prefix: &str, label: &str, seed: u64) -> Result<()> {
    let data = vars
        .data()
        .lock()
        .map_err(|_| Error::Config("var map lock poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().filter(|k| k.starts_with(prefix)).collect();
    names.sort();
    let mut rng = SplitMix64::derived(seed, label);
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let values = if name.ends_with(".bias") {
            vec![0.0; n]
        } else if name.contains(".ln") {
            vec![1.0; n]
        } else if name.ends_with("constants") {
            rng.normal_samples(n, 1.0)
        } else {
            let fan_in = *dims.last().unwrap_or(&1) as f32;
            rng.normal_samples(n, 1.0 / fan_in.sqrt())
        };
        let t = Tensor::from_vec(values, dims, var.device())
            .map_err(|e| Error::Config(e.to_string()))?;
        var.set(&t)
            .map_err(|e| Error::Config(format!("{name}: {e}")))?;
    }
    Ok(())
}
