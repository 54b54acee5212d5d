//! A BERT encoder for BERTScore: a Hugging Face BERT, DistilBERT or RoBERTa checkpoint
//! (`config.json`, `model.safetensors`, `tokenizer.json`) cut after `layer` transformer layers
//! (bert-score keeps the first `num_layers`), giving each token's hidden state there.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use candle_transformers::models::distilbert::{Config as DistilConfig, DistilBertModel};
use candle_transformers::models::xlm_roberta::{Config as RobertaConfig, XLMRobertaModel};
use tokenizers::Tokenizer;

use crate::error::{CandleContext, Error, IoContext, Result};

/// The architectures read.
enum Encoder {
    Bert(BertModel),
    DistilBert(DistilBertModel),
    /// RoBERTa's architecture (positions counted from the padding id on).
    Roberta(XLMRobertaModel),
}

/// A sentence's token ids (special tokens included) and each token's hidden state.
pub type SentenceStates = (Vec<u32>, Vec<Vec<f32>>);

/// A BERT checkpoint cut at one layer, with its tokenizer.
pub struct BertEncoder {
    model: Encoder,
    tokenizer: Tokenizer,
    /// `[CLS]`, `[SEP]` and `[PAD]` ids.
    pub cls: u32,
    pub sep: u32,
    pad: u32,
    device: Device,
}

impl BertEncoder {
    /// Loads the checkpoint in `dir` keeping its first `layer` layers (1 ≤ layer ≤ the
    /// checkpoint's). BERT (`model_type = "bert"`), DistilBERT (`"distilbert"`) and RoBERTa
    /// (`"roberta"`, `"xlm-roberta"`) checkpoints are read.
    pub fn load(dir: &Path, layer: usize, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).at(&config_path)?;
        let bad = |m: String| Error::BadFile {
            path: config_path.clone(),
            message: m,
        };
        let mut raw: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let model_type = raw["model_type"].as_str().unwrap_or("").to_string();
        let layers_key = match model_type.as_str() {
            "bert" => "num_hidden_layers",
            "distilbert" => "n_layers",
            "roberta" | "xlm-roberta" => "num_hidden_layers",
            other => {
                return Err(bad(format!(
                    "model_type `{other}`: BERTScore reads BERT, DistilBERT and RoBERTa checkpoints"
                )))
            }
        };
        let layers = raw[layers_key].as_u64().unwrap_or(0) as usize;
        if layer == 0 || layer > layers {
            return Err(Error::Config(format!(
                "score.bertscore_layer = {layer}: {} has {layers} layers (1..={layers})",
                dir.display()
            )));
        }
        raw[layers_key] = serde_json::json!(layer);
        let weights = dir.join("model.safetensors");
        let err = format!("loading {}", weights.display());
        // SAFETY: the checkpoint is mapped read-only and never written while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .during(err.as_str())?;
        let model = match model_type.as_str() {
            "bert" => {
                let cfg: BertConfig =
                    serde_json::from_value(raw).map_err(|e| bad(e.to_string()))?;
                Encoder::Bert(BertModel::load(vb, &cfg).during(err.as_str())?)
            }
            "distilbert" => {
                let cfg: DistilConfig =
                    serde_json::from_value(raw).map_err(|e| bad(e.to_string()))?;
                Encoder::DistilBert(DistilBertModel::load(vb, &cfg).during(err.as_str())?)
            }
            _ => {
                // transformers 5 no longer writes `position_embedding_type` (always absolute).
                if raw.get("position_embedding_type").is_none() {
                    raw["position_embedding_type"] = serde_json::json!("absolute");
                }
                let cfg: RobertaConfig =
                    serde_json::from_value(raw).map_err(|e| bad(e.to_string()))?;
                // A base model's tensors, or a task model's under `roberta.`.
                let vb = if vb.contains_tensor("roberta.embeddings.word_embeddings.weight") {
                    vb.pp("roberta")
                } else {
                    vb
                };
                Encoder::Roberta(XLMRobertaModel::new(&cfg, vb).during(err.as_str())?)
            }
        };
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| Error::BadFile {
            path: tok_path.clone(),
            message: format!("not a tokenizers file: {e}"),
        })?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Config(e.to_string()))?;
        let id = |t: &str| {
            tokenizer.token_to_id(t).ok_or_else(|| Error::BadFile {
                path: tok_path.clone(),
                message: format!("no `{t}` token"),
            })
        };
        let roberta = matches!(model, Encoder::Roberta(_));
        let (cls, sep, pad) = if roberta {
            ("<s>", "</s>", "<pad>")
        } else {
            ("[CLS]", "[SEP]", "[PAD]")
        };
        Ok(Self {
            cls: id(cls)?,
            sep: id(sep)?,
            pad: id(pad)?,
            model,
            tokenizer,
            device: device.clone(),
        })
    }

    /// Token ids of `sentence` (trimmed) with `[CLS]` … `[SEP]` (`<s>` … `</s>`), as
    /// bert-score's `sent_encode`. For RoBERTa it asks for `add_prefix_space=True`, which the
    /// slow tokenizer of transformers 5 ignores: the first word is encoded without a leading
    /// space, and so it is here (the versions checked are in the fixture's reference.json).
    pub fn encode(&self, sentence: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(sentence.trim(), true)
            .map_err(|e| Error::Config(format!("tokenizing `{sentence}`: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Each sentence's token ids and each token's hidden state at the cut layer, `batch`
    /// sentences per model call (padded on the right and masked).
    pub fn embed(&self, sentences: &[String], batch: usize) -> Result<Vec<SentenceStates>> {
        let mut out = Vec::with_capacity(sentences.len());
        for chunk in sentences.chunks(batch.max(1)) {
            let ids: Vec<Vec<u32>> = chunk
                .iter()
                .map(|s| self.encode(s))
                .collect::<Result<_>>()?;
            let len = ids.iter().map(Vec::len).max().unwrap_or(1);
            let n = ids.len();
            let mut flat = Vec::with_capacity(n * len);
            let mut mask = Vec::with_capacity(n * len);
            for s in &ids {
                flat.extend(s.iter().copied());
                flat.extend(std::iter::repeat_n(self.pad, len - s.len()));
                mask.extend((0..len).map(|i| u32::from(i < s.len())));
            }
            let input = Tensor::from_vec(flat, (n, len), &self.device).during("BERT input")?;
            let mask = Tensor::from_vec(mask, (n, len), &self.device).during("BERT input")?;
            let hidden = match &self.model {
                Encoder::Bert(m) => {
                    let types = input.zeros_like().during("BERT input")?;
                    m.forward(&input, &types, Some(&mask))
                }
                // DistilBERT's mask marks the positions to hide, `(b, 1, 1, t)`.
                Encoder::DistilBert(m) => mask
                    .eq(0u32)
                    .and_then(|pad| pad.reshape((n, 1, 1, len)))
                    .and_then(|pad| m.forward(&input, &pad)),
                Encoder::Roberta(m) => input
                    .zeros_like()
                    .and_then(|types| m.forward(&input, &mask, &types, None, None, None)),
            }
            .during("BERT forward")?
            .to_dtype(DType::F32)
            .during("BERT forward")?
            .to_vec3::<f32>()
            .during("BERT forward")?;
            for (s, h) in ids.into_iter().zip(hidden) {
                let vectors = h.into_iter().take(s.len()).collect();
                out.push((s, vectors));
            }
        }
        Ok(out)
    }
}
