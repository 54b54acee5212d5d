//! The embedded tiny CLIP: a deterministic random checkpoint in Hugging Face format.
//!
//! `pipeline run` must work offline, so prefcap writes its own small `CLIPModel` directory —
//! `config.json`, `model.safetensors` with HF tensor names, `preprocessor_config.json` and a
//! `tokenizer.json` holding a BPE trained with the tokenizers crate on the synthetic world's
//! captions — and loads it through exactly the code path of a real checkpoint. Same spec,
//! same bytes: the directory is regenerated only when its spec stamp changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::utils::Lowercase;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer, TokenizerImpl};

use crate::error::{Error, IoContext, Result};
use crate::io::write_atomic;
use crate::models::clip::pretrain::{pretrain, PretrainConfig};
use crate::models::clip::ClipModelFiles;
use crate::rng::SplitMix64;
use crate::synthetic::{self, Change, Colour, Direction, Relation, Scene, Shape, ShapeKind};

/// Sizes of a generated CLIP: the embedded tiny one by default, or a real size
/// ([`TinyClipSpec::vit_base_patch32`]) with random weights for benchmarks.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyClipSpec {
    pub seed: u64,
    pub image_size: usize,
    pub patch_size: usize,
    pub vision_hidden: usize,
    pub vision_layers: usize,
    pub vision_heads: usize,
    pub text_hidden: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    pub projection_dim: usize,
    pub max_positions: usize,
    /// Upper bound of the BPE vocabulary (specials included).
    pub vocab_size: usize,
    /// Rows of the token embedding when larger than the trained vocabulary (real-size shapes).
    pub text_vocab_rows: Option<usize>,
    /// Contrastive pretraining on rendered scenes after the random initialisation.
    pub pretrain: PretrainConfig,
}

impl TinyClipSpec {
    /// openai/clip-vit-base-patch32's shapes (151M parameters), random weights.
    pub fn vit_base_patch32(seed: u64) -> Self {
        Self {
            seed,
            image_size: 224,
            patch_size: 32,
            vision_hidden: 768,
            vision_layers: 12,
            vision_heads: 12,
            text_hidden: 512,
            text_layers: 12,
            text_heads: 8,
            projection_dim: 512,
            max_positions: 77,
            vocab_size: 400,
            text_vocab_rows: Some(49408),
            pretrain: PretrainConfig::default(),
        }
    }
}

impl Default for TinyClipSpec {
    fn default() -> Self {
        Self {
            seed: 42,
            image_size: 64,
            patch_size: 8,
            vision_hidden: 64,
            vision_layers: 2,
            vision_heads: 4,
            text_hidden: 64,
            text_layers: 2,
            text_heads: 4,
            projection_dim: 64,
            max_positions: 32,
            vocab_size: 400,
            text_vocab_rows: None,
            pretrain: PretrainConfig::default(),
        }
    }
}

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// Makes sure `dir` holds the tiny CLIP of `spec` and returns it.
pub fn ensure_tiny_clip(dir: &Path, spec: &TinyClipSpec) -> Result<PathBuf> {
    let stamp_path = dir.join("prefcap-spec.txt");
    let stamp = format!("{spec:?}");
    if std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return Ok(dir.to_path_buf());
    }
    std::fs::create_dir_all(dir).at(dir)?;
    let tokenizer = train_tokenizer(spec)?;
    let tok_path = dir.join("tokenizer.json");
    let tok_json = tokenizer
        .to_string(false)
        .map_err(|e| Error::Config(format!("serialising the tiny tokenizer: {e}")))?;
    write_atomic(&tok_path, tok_json.as_bytes())?;
    let vocab = tokenizer
        .get_vocab_size(true)
        .max(spec.text_vocab_rows.unwrap_or(0));
    let id = |t: &str| tokenizer.token_to_id(t).unwrap_or(0);
    let config = json!({
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": spec.projection_dim,
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": vocab,
            "hidden_size": spec.text_hidden,
            "intermediate_size": 4 * spec.text_hidden,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads,
            "max_position_embeddings": spec.max_positions,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "bos_token_id": id(BOS),
            "eos_token_id": id(EOS),
            "pad_token_id": id(EOS),
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": spec.vision_hidden,
            "intermediate_size": 4 * spec.vision_hidden,
            "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": spec.vision_heads,
            "num_channels": 3,
            "image_size": spec.image_size,
            "patch_size": spec.patch_size,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
    });
    write_json(&dir.join("config.json"), &config)?;
    let preprocessor = json!({
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": true,
        "do_resize": true,
        "size": {"shortest_edge": spec.image_size},
        "resample": 3,
        "do_center_crop": true,
        "crop_size": {"height": spec.image_size, "width": spec.image_size},
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    });
    write_json(&dir.join("preprocessor_config.json"), &preprocessor)?;
    write_weights(&dir.join("model.safetensors"), spec, vocab)?;
    let summary_path = dir.join("pretrain.json");
    if spec.pretrain.steps > 0 {
        let summary = pretrain(&ClipModelFiles::from_dir(dir)?, &spec.pretrain, spec.seed)?;
        let value = serde_json::to_value(&summary)
            .map_err(|e| Error::Config(format!("pretraining summary: {e}")))?;
        write_json(&summary_path, &value)?;
    } else if summary_path.exists() {
        std::fs::remove_file(&summary_path).at(&summary_path)?;
    }
    write_atomic(&stamp_path, stamp.as_bytes())?;
    Ok(dir.to_path_buf())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Config(e.to_string()))?;
    write_atomic(path, text.as_bytes())
}

/// Every sentence the synthetic world can say (image captions and story captions), in a
/// fixed order: the tokenizer's training corpus.
pub fn synthetic_corpus() -> Vec<String> {
    let shapes: Vec<Shape> = Colour::ALL
        .iter()
        .flat_map(|&colour| {
            ShapeKind::ALL
                .iter()
                .map(move |&kind| Shape { colour, kind })
        })
        .collect();
    let mut out = Vec::new();
    for &subject in &shapes {
        for &object in &shapes {
            for &relation in &Relation::ALL {
                let scene = Scene {
                    subject,
                    relation,
                    object,
                };
                out.push(synthetic::caption(&scene));
                for &d in &Direction::ALL {
                    out.push(synthetic::story_caption(&scene, Some(Change::Moves(d))));
                }
                let from = subject.colour.next_in_cycle(object.colour);
                out.push(synthetic::story_caption(
                    &scene,
                    Some(Change::Turns {
                        from,
                        to: subject.colour,
                    }),
                ));
            }
        }
    }
    out.push("two shapes".into());
    out.push("a shape and another shape".into());
    out
}

/// A byte-level BPE (lowercased; BOS … EOS like CLIP's) trained on [`synthetic_corpus`].
/// Byte-level, not CLIP's `</w>` character BPE: every byte is in the base alphabet, so any
/// user text encodes, and the base alphabet has a fixed order, which makes training
/// deterministic (the trainer numbers `</w>` symbols in hash-map order).
pub fn train_tokenizer(spec: &TinyClipSpec) -> Result<Tokenizer> {
    train_bpe(spec.vocab_size, &[BOS, EOS], Some((BOS, EOS)))
}

/// A lowercasing byte-level BPE of at most `vocab_size` tokens trained on
/// [`synthetic_corpus`], with `specials` first in the vocabulary and, when `wrap` is given,
/// every encoding framed as `wrap.0 … wrap.1`.
pub fn train_bpe(
    vocab_size: usize,
    specials: &[&str],
    wrap: Option<(&str, &str)>,
) -> Result<Tokenizer> {
    let err =
        |what: &str, e: tokenizers::Error| Error::Config(format!("tiny tokenizer: {what}: {e}"));
    let bpe = BPE::builder().build().map_err(|e| err("model", e))?;
    let mut tok: TokenizerImpl<
        BPE,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    > = TokenizerImpl::new(bpe);
    tok.with_normalizer(Some(Lowercase))
        .map_err(|e| err("normalizer", e))?
        .with_pre_tokenizer(Some(ByteLevel::new(true, true, true)))
        .with_decoder(Some(ByteLevel::new(true, true, true)));
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(0)
        .show_progress(false)
        .special_tokens(
            specials
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    tok.train(&mut trainer, synthetic_corpus().into_iter())
        .map_err(|e| err("training", e))?;
    if let Some((bos, eos)) = wrap {
        let ids = |t: &str| {
            tok.token_to_id(t)
                .ok_or_else(|| Error::Config(format!("tiny tokenizer lacks {t}")))
        };
        let post = TemplateProcessing::builder()
            .try_single(format!("{bos} $A {eos}"))
            .map_err(|e| Error::Config(format!("tiny tokenizer template: {e}")))?
            .special_tokens(vec![(bos, ids(bos)?), (eos, ids(eos)?)])
            .build()
            .map_err(|e| Error::Config(format!("tiny tokenizer template: {e}")))?;
        tok.with_post_processor(Some(post));
    }
    Ok(Tokenizer::from(tok))
}

/// Seeded random weights under Hugging Face's `CLIPModel` tensor names. Linear layers are
/// drawn with standard deviation 1/√fan_in, so every layer passes image content on to the
/// pooled token even without training.
fn write_weights(path: &Path, spec: &TinyClipSpec, vocab: usize) -> Result<()> {
    let mut rng = SplitMix64::derived(spec.seed, "tiny-clip-weights");
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let mut normal = |shape: Vec<usize>, std: f32| -> (Vec<usize>, Vec<f32>) {
        let n = shape.iter().product();
        (shape, normal_samples(&mut rng, n, std))
    };
    let fill = |shape: Vec<usize>, v: f32| -> (Vec<usize>, Vec<f32>) {
        let n = shape.iter().product();
        (shape, vec![v; n])
    };
    let tower =
        |prefix: &str,
         hidden: usize,
         layers: usize,
         tensors: &mut BTreeMap<String, (Vec<usize>, Vec<f32>)>,
         normal: &mut dyn FnMut(Vec<usize>, f32) -> (Vec<usize>, Vec<f32>)| {
            let std = 1.0 / (hidden as f32).sqrt();
            let inter = 4 * hidden;
            for l in 0..layers {
                let p = format!("{prefix}.encoder.layers.{l}");
                for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                    tensors.insert(
                        format!("{p}.self_attn.{proj}.weight"),
                        normal(vec![hidden, hidden], std),
                    );
                    tensors.insert(
                        format!("{p}.self_attn.{proj}.bias"),
                        fill(vec![hidden], 0.0),
                    );
                }
                tensors.insert(
                    format!("{p}.mlp.fc1.weight"),
                    normal(vec![inter, hidden], std),
                );
                tensors.insert(format!("{p}.mlp.fc1.bias"), fill(vec![inter], 0.0));
                tensors.insert(
                    format!("{p}.mlp.fc2.weight"),
                    normal(vec![hidden, inter], 1.0 / (inter as f32).sqrt()),
                );
                tensors.insert(format!("{p}.mlp.fc2.bias"), fill(vec![hidden], 0.0));
                for ln in ["layer_norm1", "layer_norm2"] {
                    tensors.insert(format!("{p}.{ln}.weight"), fill(vec![hidden], 1.0));
                    tensors.insert(format!("{p}.{ln}.bias"), fill(vec![hidden], 0.0));
                }
            }
        };
    let (vh, th) = (spec.vision_hidden, spec.text_hidden);
    let patches = (spec.image_size / spec.patch_size).pow(2);
    let patch_std = 1.0 / ((3 * spec.patch_size * spec.patch_size) as f32).sqrt();
    tensors.insert(
        "vision_model.embeddings.patch_embedding.weight".into(),
        normal(vec![vh, 3, spec.patch_size, spec.patch_size], patch_std),
    );
    tensors.insert(
        "vision_model.embeddings.class_embedding".into(),
        normal(vec![vh], 0.1),
    );
    tensors.insert(
        "vision_model.embeddings.position_embedding.weight".into(),
        normal(vec![patches + 1, vh], 0.1),
    );
    for ln in ["pre_layrnorm", "post_layernorm"] {
        tensors.insert(format!("vision_model.{ln}.weight"), fill(vec![vh], 1.0));
        tensors.insert(format!("vision_model.{ln}.bias"), fill(vec![vh], 0.0));
    }
    tower(
        "vision_model",
        vh,
        spec.vision_layers,
        &mut tensors,
        &mut normal,
    );
    tensors.insert(
        "text_model.embeddings.token_embedding.weight".into(),
        normal(vec![vocab, th], 0.1),
    );
    tensors.insert(
        "text_model.embeddings.position_embedding.weight".into(),
        normal(vec![spec.max_positions, th], 0.1),
    );
    tensors.insert(
        "text_model.final_layer_norm.weight".into(),
        fill(vec![th], 1.0),
    );
    tensors.insert(
        "text_model.final_layer_norm.bias".into(),
        fill(vec![th], 0.0),
    );
    tower(
        "text_model",
        th,
        spec.text_layers,
        &mut tensors,
        &mut normal,
    );
    tensors.insert(
        "visual_projection.weight".into(),
        normal(vec![spec.projection_dim, vh], 1.0 / (vh as f32).sqrt()),
    );
    tensors.insert(
        "text_projection.weight".into(),
        normal(vec![spec.projection_dim, th], 1.0 / (th as f32).sqrt()),
    );
    tensors.insert("logit_scale".into(), (vec![], vec![2.6592]));
    save_safetensors(path, &tensors)
}

/// `n` draws from N(0, std²) (Box–Muller over the seeded generator).
pub fn normal_samples(rng: &mut SplitMix64, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1 = 1.0 - rng.unit_f64();
            let u2 = rng.unit_f64();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32 * std
        })
        .collect()
}

/// Writes f32 tensors as a safetensors file, atomically.
pub fn save_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, (shape, data))| {
            (
                name.clone(),
                shape.clone(),
                data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Config(format!("tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let serialized = safetensors::serialize(views, None)
        .map_err(|e| Error::Config(format!("serialising {}: {e}", path.display())))?;
    write_atomic(path, &serialized)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::clip::ClipEmbedder;
    use candle_core::{DType, Device};

    fn small() -> TinyClipSpec {
        TinyClipSpec {
            image_size: 32,
            vision_hidden: 32,
            text_hidden: 32,
            projection_dim: 16,
            ..TinyClipSpec::default()
        }
    }

    #[test]
    fn generation_is_deterministic_byte_for_byte() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        ensure_tiny_clip(a.path(), &small()).unwrap();
        ensure_tiny_clip(b.path(), &small()).unwrap();
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "preprocessor_config.json",
        ] {
            assert_eq!(
                std::fs::read(a.path().join(f)).unwrap(),
                std::fs::read(b.path().join(f)).unwrap(),
                "{f} differs"
            );
        }
        let other = tempfile::tempdir().unwrap();
        ensure_tiny_clip(other.path(), &TinyClipSpec { seed: 7, ..small() }).unwrap();
        assert_ne!(
            std::fs::read(a.path().join("model.safetensors")).unwrap(),
            std::fs::read(other.path().join("model.safetensors")).unwrap()
        );
    }

    #[test]
    fn tiny_model_loads_through_the_real_checkpoint_path_and_tokenizes_captions_whole() {
        let dir = tempfile::tempdir().unwrap();
        ensure_tiny_clip(dir.path(), &small()).unwrap();
        let files = ClipModelFiles::from_dir(dir.path()).unwrap();
        let model = ClipEmbedder::load(&files, &Device::Cpu, DType::F32).unwrap();
        let caption = "a red circle above an orange square";
        let (ids, pool) = model.tokenize(&[caption]).unwrap();
        let tok = Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
        assert_eq!(ids[0][0], tok.token_to_id(BOS).unwrap());
        assert_eq!(pool[0], ids[0].len() - 1);
        assert!(!ids[0].contains(&tok.token_to_id("[UNK]").unwrap_or(u32::MAX)));
        // Every word of the grammar is a single token after training.
        assert_eq!(ids[0].len(), 2 + caption.split(' ').count());
        assert_eq!(tok.decode(&ids[0], true).unwrap().trim(), caption);
        let emb = model
            .embed_texts(&[caption, "a blue square below a red circle"])
            .unwrap();
        assert_eq!(emb.dims(), &[2, 16]);
        let pixels = vec![0.5f32; 2 * 3 * 32 * 32];
        assert_eq!(model.embed_pixels(&pixels, 2).unwrap().dims(), &[2, 16]);
    }
}
