//! The embedded default's own checkpoints: a tiny CLIP and a tiny GPT-2 (or real-size shapes
//! with random weights, for benchmarks), deterministic, in Hugging Face format.
//!
//! `pipeline run` must work offline, so prefcap writes its own small `CLIPModel` and
//! `GPT2LMHeadModel` directories — `config.json`, `model.safetensors` with HF tensor names,
//! `preprocessor_config.json` (CLIP) and a `tokenizer.json` holding a byte-level BPE trained
//! with the tokenizers crate on a corpus the caller gives (the synthetic world's sentences) —
//! and loads them through exactly the code path of a real checkpoint. Same spec and corpus,
//! same bytes: a directory is regenerated only when its stamp changes. Training the tiny CLIP
//! is a stage of its own (`pretrain-clip`).

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
use crate::models::captioner::END_OF_TEXT;
use crate::rng::SplitMix64;
use sha2::{Digest, Sha256};

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
        }
    }
}

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// sha256 of a tokenizer corpus, for the stamps of the checkpoints trained on it.
fn corpus_digest(corpus: &[String]) -> String {
    let mut h = Sha256::new();
    for line in corpus {
        h.update(line.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// Makes sure `dir` holds the tiny CLIP of `spec`, its tokenizer trained on `corpus`, and
/// returns it.
pub fn ensure_tiny_clip(dir: &Path, spec: &TinyClipSpec, corpus: &[String]) -> Result<PathBuf> {
    let stamp_path = dir.join("prefcap-spec.txt");
    let stamp = format!("{spec:?} corpus {}", corpus_digest(corpus));
    if std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return Ok(dir.to_path_buf());
    }
    std::fs::create_dir_all(dir).at(dir)?;
    let tokenizer = train_tokenizer(spec, corpus)?;
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
    write_atomic(&stamp_path, stamp.as_bytes())?;
    Ok(dir.to_path_buf())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Config(e.to_string()))?;
    write_atomic(path, text.as_bytes())
}

/// A byte-level BPE (lowercased; BOS … EOS like CLIP's) trained on `corpus`.
/// Byte-level, not CLIP's `</w>` character BPE: every byte is in the base alphabet, so any
/// user text encodes, and the base alphabet has a fixed order, which makes training
/// deterministic (the trainer numbers `</w>` symbols in hash-map order).
pub fn train_tokenizer(spec: &TinyClipSpec, corpus: &[String]) -> Result<Tokenizer> {
    train_bpe(corpus, spec.vocab_size, &[BOS, EOS], Some((BOS, EOS)))
}

/// A lowercasing byte-level BPE of at most `vocab_size` tokens trained on `corpus`, with `specials` first in the vocabulary and, when `wrap` is given,
/// every encoding framed as `wrap.0 … wrap.1`.
pub fn train_bpe(
    corpus: &[String],
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
    tok.train(&mut trainer, corpus.iter())
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
        (shape, rng.normal_samples(n, std))
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

/// Named f32 tensors (shape, row-major values), sorted by name: a checkpoint being written.
pub type F32Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Writes f32 tensors as a safetensors file, atomically.
pub fn save_safetensors(path: &Path, tensors: &F32Tensors) -> Result<()> {
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

/// Shape of a randomly initialised GPT-2 checkpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gpt2Spec {
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_positions: usize,
    /// Embedding rows; `None` = the size of the trained BPE.
    pub vocab: Option<usize>,
}

impl Gpt2Spec {
    /// The embedded default's decoder.
    pub const TINY: Gpt2Spec = Gpt2Spec {
        n_embd: 64,
        n_layer: 2,
        n_head: 4,
        n_positions: 64,
        vocab: None,
    };
    /// The size of Hugging Face `gpt2` (124M parameters), for benchmarks.
    pub const SMALL: Gpt2Spec = Gpt2Spec {
        n_embd: 768,
        n_layer: 12,
        n_head: 12,
        n_positions: 1024,
        vocab: Some(50257),
    };
}

/// Writes the embedded tiny GPT-2, its tokenizer trained on `corpus`, unless present.
pub fn ensure_tiny_gpt2(dir: &Path, seed: u64, corpus: &[String]) -> Result<PathBuf> {
    ensure_random_gpt2(dir, &Gpt2Spec::TINY, seed, corpus)
}

/// Writes a GPT-2 checkpoint of shape `spec` with GPT-2's random initialisation (HF layout:
/// `transformer.` keys, Conv1D `[in, out]`, tied head) and a byte-level BPE trained on
/// `corpus`, unless the same one is present.
pub fn ensure_random_gpt2(
    dir: &Path,
    spec: &Gpt2Spec,
    seed: u64,
    corpus: &[String],
) -> Result<PathBuf> {
    let stamp = if *spec == Gpt2Spec::TINY {
        format!("tiny-gpt2-v1 seed {seed} corpus {}", corpus_digest(corpus))
    } else {
        format!(
            "random-gpt2-v1 {spec:?} seed {seed} corpus {}",
            corpus_digest(corpus)
        )
    };
    let stamp_path = dir.join("prefcap-spec.txt");
    if std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return Ok(dir.to_path_buf());
    }
    std::fs::create_dir_all(dir).at(dir)?;
    let tok = train_bpe(corpus, 400, &[END_OF_TEXT], None)?;
    let json_text = tok
        .to_string(false)
        .map_err(|e| Error::Config(format!("serialising the tiny GPT-2 tokenizer: {e}")))?;
    write_atomic(&dir.join("tokenizer.json"), json_text.as_bytes())?;
    let vocab = spec.vocab.unwrap_or_else(|| tok.get_vocab_size(true));
    let eos = tok.token_to_id(END_OF_TEXT).unwrap_or(0);
    let (d, layers, heads, positions) = (spec.n_embd, spec.n_layer, spec.n_head, spec.n_positions);
    let config = json!({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": vocab, "n_positions": positions, "n_embd": d, "n_layer": layers, "n_head": heads,
        "n_inner": null, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "bos_token_id": eos, "eos_token_id": eos, "tie_word_embeddings": true,
    });
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Config(e.to_string()))?;
    write_atomic(&dir.join("config.json"), text.as_bytes())?;
    let mut rng = SplitMix64::derived(seed, "tiny-gpt2-weights");
    let mut tensors = std::collections::BTreeMap::new();
    let mut put = |name: String, shape: Vec<usize>, std: f32, rng: &mut SplitMix64| {
        let n = shape.iter().product();
        tensors.insert(name, (shape, rng.normal_samples(n, std)));
    };
    // GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/√(2·layers).
    let proj_std = 0.02 / (2.0 * layers as f32).sqrt();
    put(
        "transformer.wte.weight".into(),
        vec![vocab, d],
        0.02,
        &mut rng,
    );
    put(
        "transformer.wpe.weight".into(),
        vec![positions, d],
        0.01,
        &mut rng,
    );
    for l in 0..layers {
        let p = format!("transformer.h.{l}");
        put(
            format!("{p}.attn.c_attn.weight"),
            vec![d, 3 * d],
            0.02,
            &mut rng,
        );
        put(
            format!("{p}.attn.c_proj.weight"),
            vec![d, d],
            proj_std,
            &mut rng,
        );
        put(
            format!("{p}.mlp.c_fc.weight"),
            vec![d, 4 * d],
            0.02,
            &mut rng,
        );
        put(
            format!("{p}.mlp.c_proj.weight"),
            vec![4 * d, d],
            proj_std,
            &mut rng,
        );
    }
    for l in 0..layers {
        let p = format!("transformer.h.{l}");
        for (name, n) in [
            ("attn.c_attn.bias", 3 * d),
            ("attn.c_proj.bias", d),
            ("mlp.c_fc.bias", 4 * d),
            ("mlp.c_proj.bias", d),
        ] {
            tensors.insert(format!("{p}.{name}"), (vec![n], vec![0.0; n]));
        }
        for ln in ["ln_1", "ln_2"] {
            tensors.insert(format!("{p}.{ln}.weight"), (vec![d], vec![1.0; d]));
            tensors.insert(format!("{p}.{ln}.bias"), (vec![d], vec![0.0; d]));
        }
    }
    tensors.insert("transformer.ln_f.weight".into(), (vec![d], vec![1.0; d]));
    tensors.insert("transformer.ln_f.bias".into(), (vec![d], vec![0.0; d]));
    save_safetensors(&dir.join("model.safetensors"), &tensors)?;
    write_atomic(&stamp_path, stamp.as_bytes())?;
    Ok(dir.to_path_buf())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::models::clip::{ClipEmbedder, ClipModelFiles};
    use candle_core::{DType, Device};

    /// A small world's sentences: every word of the captions the tests tokenize, often.
    fn corpus() -> Vec<String> {
        let colours = ["red", "orange", "blue", "green"];
        let shapes = ["circle", "square", "triangle"];
        let mut out = Vec::new();
        for (i, c) in colours.iter().enumerate() {
            for (j, s) in shapes.iter().enumerate() {
                let (c2, s2) = (colours[(i + 1) % 4], shapes[(j + 1) % 3]);
                for relation in ["above", "below", "left of", "right of"] {
                    out.push(format!("a {c} {s} {relation} a {c2} {s2}"));
                    out.push(format!("an {c} {s} {relation} an {c2} {s2}"));
                }
            }
        }
        out
    }

    /// A tiny CLIP smaller still, for tests.
    pub(crate) fn small() -> TinyClipSpec {
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
        ensure_tiny_clip(a.path(), &small(), &corpus()).unwrap();
        ensure_tiny_clip(b.path(), &small(), &corpus()).unwrap();
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
        ensure_tiny_clip(
            other.path(),
            &TinyClipSpec { seed: 7, ..small() },
            &corpus(),
        )
        .unwrap();
        assert_ne!(
            std::fs::read(a.path().join("model.safetensors")).unwrap(),
            std::fs::read(other.path().join("model.safetensors")).unwrap()
        );
    }

    #[test]
    fn tiny_model_loads_through_the_real_checkpoint_path_and_tokenizes_captions_whole() {
        let dir = tempfile::tempdir().unwrap();
        ensure_tiny_clip(dir.path(), &small(), &corpus()).unwrap();
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

    #[test]
    fn tiny_gpt2_is_deterministic_and_loads_as_a_real_checkpoint() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        ensure_tiny_gpt2(a.path(), 3, &corpus()).unwrap();
        ensure_tiny_gpt2(b.path(), 3, &corpus()).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            assert_eq!(
                std::fs::read(a.path().join(f)).unwrap(),
                std::fs::read(b.path().join(f)).unwrap(),
                "{f}"
            );
        }
        let model = crate::models::gpt2::Gpt2::load(a.path(), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(model.hidden_size(), 64);
    }
}
