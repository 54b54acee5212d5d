//! A reward model with the captioner's architecture: the CLIP prefix (or cross-attention) +
//! GPT-2, and a scalar head read at the last real token, as transformers'
//! `GPT2ForSequenceClassification` with one label reads its `score` head (a bias-free
//! `Linear(n_embd, 1)`, initialised N(0, 0.02)) at the last non-padding token. Text-only
//! pairs are scored without an image, the prompt and the reply as one sequence.
//!
//! Optionally (`train_reward.clip_feature`) the reward adds CLIP's judgement of an
//! image-grounded caption, s · cos(CLIP image, CLIP text), with a learned scale s
//! (`reward_clip_scale`): a small decoder reads its last token too shallowly to check word
//! order against the image ("a above b" vs "b above a"), which a CLIP that grounds layout
//! does. The CLIP towers stay frozen; text-only rows have no cosine (0).

use candle_core::{Result, Tensor};
use candle_nn::{Init, Module, VarBuilder, VarMap};

use crate::models::captioner::{Captioner, CaptionerManifest};

/// The head's variable name.
const HEAD: &str = "reward_head.weight";
/// The CLIP feature's scale, `(1,)`.
const CLIP_SCALE: &str = "reward_clip_scale";
/// Written beside a reward model's checkpoints: what its forward pass needs beyond the
/// captioner's manifest.
const MANIFEST: &str = "reward.json";

/// How a reward model scores, beside its captioner (`reward.json`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RewardManifest {
    /// Adds s · cos(CLIP image, CLIP text) (the variable `reward_clip_scale`).
    #[serde(default)]
    pub clip_feature: bool,
}

impl RewardManifest {
    pub fn save(&self, dir: &std::path::Path) -> crate::error::Result<()> {
        crate::io::write_json(&dir.join(MANIFEST), self)
    }
}

/// The captioner and the scalar head on its final hidden state.
pub struct RewardModel {
    pub captioner: Captioner,
    head: candle_nn::Linear,
    /// s of the CLIP feature, when the model has it.
    clip_scale: Option<Tensor>,
}

/// Index of the last real token of each row of an attention mask (`rows × len`, 1 = real),
/// for right and for left padding alike; `None` for a row without one.
pub fn last_real_tokens(attention: &[f32], len: usize) -> Vec<Option<usize>> {
    attention
        .chunks(len.max(1))
        .map(|row| row.iter().rposition(|&a| a > 0.5))
        .collect()
}

impl RewardModel {
    /// Adds the head (`reward_head.weight`, `(1, n_embd)`, N(0, 0.02) drawn from `seed`) to
    /// `vars`, beside the captioner's variables.
    pub fn new(captioner: Captioner, vars: &VarMap, seed: u64) -> crate::error::Result<Self> {
        let d = captioner.decoder.hidden_size();
        let vb = VarBuilder::from_varmap(vars, candle_core::DType::F32, captioner.device());
        let weight = vb
            .get_with_hints((1, d), HEAD, Init::Const(0.0))
            .map_err(|e| crate::error::Error::Invalid(format!("the reward head: {e}")))?;
        crate::models::init_vars(
            vars,
            &[HEAD.to_string()],
            crate::rng::SplitMix64::derived(seed, "reward-head-init"),
            |_, dims, rng| rng.normal_samples(dims.iter().product(), 0.02),
        )?;
        Ok(Self {
            captioner,
            head: candle_nn::Linear::new(weight, None),
            clip_scale: None,
        })
    }

    /// Adds the CLIP feature, its scale `reward_clip_scale` in `vars` starting at `init`.
    pub fn with_clip_feature(mut self, vars: &VarMap, init: f64) -> crate::error::Result<Self> {
        let vb = VarBuilder::from_varmap(vars, candle_core::DType::F32, self.captioner.device());
        let scale = vb
            .get_with_hints(1, CLIP_SCALE, Init::Const(init))
            .map_err(|e| crate::error::Error::Invalid(format!("the CLIP feature's scale: {e}")))?;
        self.clip_scale = Some(scale);
        Ok(self)
    }

    /// Whether the reward adds s · cos(CLIP image, CLIP text).
    pub fn has_clip_feature(&self) -> bool {
        self.clip_scale.is_some()
    }

    /// The reward model a `train-reward` step wrote into `dir` (its `captioner.json` and
    /// best checkpoint, head included), for scoring: nothing of it is differentiated.
    pub fn load(
        dir: &std::path::Path,
        device: &candle_core::Device,
    ) -> crate::error::Result<(Self, CaptionerManifest)> {
        let manifest = CaptionerManifest::load(&dir.join("captioner.json"))?;
        let reward: RewardManifest = if dir.join(MANIFEST).is_file() {
            crate::io::read_json(&dir.join(MANIFEST))?
        } else {
            RewardManifest::default()
        };
        let (captioner, mut vars) = manifest.captioner(None, device)?;
        let mut model = Self::new(captioner, &vars, 0)?;
        if reward.clip_feature {
            model = model.with_clip_feature(&vars, 1.0)?;
        }
        let best = dir.join("best/model.safetensors");
        vars.load(&best).map_err(|e| crate::error::Error::BadFile {
            path: best.clone(),
            message: format!("not a train-reward checkpoint (its head is `{HEAD}`): {e}"),
        })?;
        Ok((model, manifest))
    }

    /// Rewards `(b,)` of the rows of `ids` `(b, t)` under `attention` (host copy `mask`,
    /// `b × t`, 1 = real token), after the image's prefix when `clip` is given; with the
    /// CLIP feature, plus s × `cosines` `(b,)` (cos(CLIP image, CLIP text) of each row, 0 for
    /// text-only rows; required then, ignored otherwise). A row without a real token is an
    /// error.
    pub fn rewards(
        &self,
        clip: Option<&Tensor>,
        ids: &Tensor,
        attention: &Tensor,
        mask: &[f32],
        cosines: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let (hidden, p) = self.captioner.hidden_states(clip, ids, attention)?;
        let d = hidden.dim(2)?;
        let at: Vec<u32> = last_real_tokens(mask, t)
            .into_iter()
            .enumerate()
            .map(|(row, last)| match last {
                Some(j) => Ok((row * (p + t) + p + j) as u32),
                None => Err(candle_core::Error::Msg(format!(
                    "row {row} of the reward batch has no token"
                ))),
            })
            .collect::<Result<_>>()?;
        let rows = Tensor::from_vec(at, b, hidden.device())?;
        let last = hidden.reshape((b * (p + t), d))?.index_select(&rows, 0)?;
        let r = self.head.forward(&last)?.squeeze(1)?;
        match (&self.clip_scale, cosines) {
            (None, _) => Ok(r),
            (Some(s), Some(cos)) => r + cos.broadcast_mul(s)?,
            (Some(_), None) => Err(candle_core::Error::Msg(
                "this reward model adds CLIP's image-text cosine: pass the rows' cosines".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::captioner::{caption_ids, CaptionerConfig, DecoderFiles};
    use candle_core::Device;

    #[test]
    fn the_last_real_token_is_found_with_either_padding() {
        let mask = [
            1., 1., 1., 0., 0., /**/ 0., 0., 1., 1., 1., /**/ 0., 0., 0., 0., 0.,
        ];
        assert_eq!(
            last_real_tokens(&mask, 5),
            vec![Some(2), Some(4), None],
            "right-padded, left-padded, empty"
        );
    }

    /// A right-padded batch scores each row as that row alone, and the reward is the head
    /// at the row's last real token (not at padding).
    #[test]
    fn a_padded_batch_scores_each_row_as_alone() {
        let dev = Device::Cpu;
        let files = DecoderFiles::from_dir(&crate::hf_tiny_fixture("gpt2-tiny")).unwrap();
        let vars = VarMap::new();
        let cfg = CaptionerConfig {
            prefix_length: 2,
            ..CaptionerConfig::default()
        };
        let captioner = Captioner::build(&cfg, 16, 0, &files, None, &vars, &dev).unwrap();
        let model = RewardModel::new(captioner, &vars, 1).unwrap();
        let tok = &model.captioner.tokenizer;
        let eos = model.captioner.eos;
        let a = caption_ids(tok, eos, "a red circle above a blue square", 16).unwrap();
        let b = caption_ids(tok, eos, "two shapes", 16).unwrap();
        let clip = Tensor::randn(0f32, 1.0, (2, 16), &dev).unwrap();
        let alone = |i: usize, ids: &Vec<u32>| -> f32 {
            let n = ids.len();
            let mask = vec![1f32; n];
            model
                .rewards(
                    Some(&clip.narrow(0, i, 1).unwrap()),
                    &Tensor::from_vec(ids.clone(), (1, n), &dev).unwrap(),
                    &Tensor::from_vec(mask.clone(), (1, n), &dev).unwrap(),
                    &mask,
                    None,
                )
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[0]
        };
        let t = a.len().max(b.len());
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        for row in [&a, &b] {
            ids.extend(row.iter().copied());
            ids.extend(std::iter::repeat_n(eos, t - row.len()));
            mask.extend((0..t).map(|j| if j < row.len() { 1f32 } else { 0.0 }));
        }
        let batch = model
            .rewards(
                Some(&clip),
                &Tensor::from_vec(ids, (2, t), &dev).unwrap(),
                &Tensor::from_vec(mask.clone(), (2, t), &dev).unwrap(),
                &mask,
                None,
            )
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((batch[0] - alone(0, &a)).abs() < 1e-5, "{batch:?}");
        assert!((batch[1] - alone(1, &b)).abs() < 1e-5, "{batch:?}");
        let empty = vec![0f32; t];
        let err = model
            .rewards(
                None,
                &Tensor::from_vec(vec![eos; t], (1, t), &dev).unwrap(),
                &Tensor::from_vec(empty.clone(), (1, t), &dev).unwrap(),
                &empty,
                None,
            )
            .unwrap_err();
        assert!(err.to_string().contains("no token"), "{err}");

        // The CLIP feature adds s · cos to the head's reward, and is required once added.
        let n = a.len();
        let mask = vec![1f32; n];
        let ids = Tensor::from_vec(a.clone(), (1, n), &dev).unwrap();
        let att = Tensor::from_vec(mask.clone(), (1, n), &dev).unwrap();
        let image = clip.narrow(0, 0, 1).unwrap();
        let plain = alone(0, &a);
        let model = model.with_clip_feature(&vars, 10.0).unwrap();
        let cos = Tensor::new(&[0.25f32], &dev).unwrap();
        let with = model
            .rewards(Some(&image), &ids, &att, &mask, Some(&cos))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        assert!((with - plain - 2.5).abs() < 1e-5, "{with} vs {plain}");
        let err = model
            .rewards(Some(&image), &ids, &att, &mask, None)
            .unwrap_err();
        assert!(err.to_string().contains("cosine"), "{err}");
    }
}
