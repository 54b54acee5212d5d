//! A reward model with the captioner's architecture: the CLIP prefix (or cross-attention) +
//! GPT-2, and a scalar head read at the last real token, as transformers'
//! `GPT2ForSequenceClassification` with one label reads its `score` head (a bias-free
//! `Linear(n_embd, 1)`, initialised N(0, 0.02)) at the last non-padding token. Text-only
//! pairs are scored without an image, the prompt and the reply as one sequence.

use candle_core::{Result, Tensor};
use candle_nn::{Init, Module, VarBuilder, VarMap};

use crate::models::captioner::{Captioner, CaptionerManifest};

/// The head's variable name.
const HEAD: &str = "reward_head.weight";

/// The captioner and the scalar head on its final hidden state.
pub struct RewardModel {
    pub captioner: Captioner,
    head: candle_nn::Linear,
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
        })
    }

    /// The reward model a `train-reward` step wrote into `dir` (its `captioner.json` and
    /// best checkpoint, head included), for scoring: nothing of it is differentiated.
    pub fn load(
        dir: &std::path::Path,
        device: &candle_core::Device,
    ) -> crate::error::Result<(Self, CaptionerManifest)> {
        let manifest = CaptionerManifest::load(&dir.join("captioner.json"))?;
        let (captioner, mut vars) = manifest.captioner(None, device)?;
        let model = Self::new(captioner, &vars, 0)?;
        let best = dir.join("best/model.safetensors");
        vars.load(&best).map_err(|e| crate::error::Error::BadFile {
            path: best.clone(),
            message: format!("not a train-reward checkpoint (its head is `{HEAD}`): {e}"),
        })?;
        Ok((model, manifest))
    }

    /// Rewards `(b,)` of the rows of `ids` `(b, t)` under `attention` (host copy `mask`,
    /// `b × t`, 1 = real token), after the image's prefix when `clip` is given. A row
    /// without a real token is an error.
    pub fn rewards(
        &self,
        clip: Option<&Tensor>,
        ids: &Tensor,
        attention: &Tensor,
        mask: &[f32],
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
        self.head.forward(&last)?.squeeze(1)
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
            )
            .unwrap_err();
        assert!(err.to_string().contains("no token"), "{err}");
    }
}
