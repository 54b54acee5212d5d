//! A [`Trainer`]'s checkpoint: each group's weights and optimizer state, and the loop's
//! [`TrainState`], in one directory that is replaced whole ([`AtomicDir`]), so weights,
//! moments and step always agree. The first group's files are `model.safetensors` and
//! `optimizer.safetensors` (what loaders of a trained model read); a further group `g`'s are
//! `<g>.safetensors` and `optimizer-<g>.safetensors`.

use std::path::Path;

use crate::error::{CandleContext, Result};
use crate::io::AtomicDir;
use crate::train::{TrainState, Trainer};

/// The weights and optimizer-state file names of group `g`, named `name`.
fn files(g: usize, name: &str) -> (String, String) {
    if g == 0 {
        ("model.safetensors".into(), "optimizer.safetensors".into())
    } else {
        (
            format!("{name}.safetensors"),
            format!("optimizer-{name}.safetensors"),
        )
    }
}

/// Whether `dir` holds a complete checkpoint (its state file is written last).
pub(super) fn exists(dir: &Path) -> bool {
    dir.join("state.json").is_file()
}

pub(super) fn save(dir: &Path, trainer: &Trainer, state: &TrainState) -> Result<()> {
    let tmp = AtomicDir::create(dir)?;
    for (g, s) in trainer.groups.iter().enumerate() {
        let (weights, optimizer) = files(g, &s.group.name);
        let path = tmp.dir().join(&weights);
        s.group
            .vars
            .save(&path)
            .during(format!("saving {}", path.display()))?;
        let path = tmp.dir().join(&optimizer);
        candle_core::safetensors::save(&s.opt.state_tensors(), &path)
            .during(format!("saving {}", path.display()))?;
    }
    crate::io::write_json(&tmp.dir().join("state.json"), state)?;
    tmp.commit()
}

/// Restores every group's weights and optimizer state from `dir`; returns the loop's state.
pub(super) fn load(dir: &Path, trainer: &mut Trainer) -> Result<TrainState> {
    let state_path = dir.join("state.json");
    let state: TrainState = crate::io::read_json(&state_path)?;
    for (g, s) in trainer.groups.iter_mut().enumerate() {
        let (weights, optimizer) = files(g, &s.group.name);
        let path = dir.join(&weights);
        let mut vars = s.group.vars.clone();
        vars.load(&path)
            .during(format!("loading {}", path.display()))?;
        let path = dir.join(&optimizer);
        let device = s
            .vars
            .first()
            .map(|v| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let tensors = candle_core::safetensors::load(&path, &device)
            .during(format!("loading {}", path.display()))?;
        s.opt
            .load_state(&tensors, state.step as u64)
            .during(format!("restoring the optimizer from {}", path.display()))?;
    }
    Ok(state)
}
