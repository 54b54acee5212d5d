//! GPU checks, compiled only with `--features cuda` and run on a CUDA machine (device 0): the
//! device paths give Hugging Face's reference numbers and the CPU paths' numbers, and
//! training holds its device memory flat. CI has no GPU and builds none of this.
//!
//! The lent GPU machines have no Rust: `scripts/cuda-build.sh` builds this test binary here
//! and `scripts/gpu-check.sh tests` runs it there from the repository root.
#![cfg(feature = "cuda")]

#[allow(dead_code)] // the pipeline helpers: these tests call the library only
mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use prefcap::imaging::preprocess::{decode_crop, preprocess_bytes};
use prefcap::models::captioner::{
    caption_ids, seed_mapper, Captioner, CaptionerConfig, DecoderFiles,
};
use prefcap::models::clip::{l2_normalize, ClipEmbedder, ClipModelFiles};
use prefcap::models::gpt2::{next_token_logprobs, Gpt2};
use prefcap::testkit::npy::read_npy;
use prefcap::train::{clip_and_step, grad_norm, gradients, AdamW, OptimizerConfig};

/// A fixture of the checkout the tests run from (the current directory: gpu-check.sh runs
/// them from the root of the tree copied to the GPU machine), else of the one they were
/// built in.
fn fixture(p: &str) -> PathBuf {
    let here = std::env::current_dir().unwrap();
    let root = if here.join("tests/fixtures/hf-tiny").is_dir() {
        here
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
    };
    root.join("tests/fixtures/hf-tiny").join(p)
}

fn gpu() -> Device {
    Device::new_cuda(0).expect("CUDA device 0")
}

fn json(p: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture(p)).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    let mut out = Vec::new();
    let mut walk = vec![v];
    while let Some(v) = walk.pop() {
        match v {
            serde_json::Value::Array(a) => walk.extend(a.iter().rev()),
            x => out.push(x.as_f64().unwrap() as f32),
        }
    }
    out
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Device memory in use, MiB (the whole device: nothing else should run on it).
fn used_mib(device: &Device) -> f64 {
    let (free, total) = device
        .as_cuda_device()
        .unwrap()
        .cuda_stream()
        .context()
        .mem_get_info()
        .unwrap();
    (total - free) as f64 / (1024.0 * 1024.0)
}

#[test]
fn clip_on_the_gpu_matches_transformers_in_f32_and_closely_in_half_precision() {
    let r = json("reference/clip-embed.json");
    let want_images = floats(&r["image_embeds"]);
    let want_texts = floats(&r["text_embeds"]);
    let texts = common::strings(&r["texts"]);
    let files = ClipModelFiles::from_dir(&fixture("clip-tiny")).unwrap();
    let pv = read_npy(&fixture("reference/clip/pixel_values.npy")).unwrap();
    let device = gpu();
    for (dtype, tolerance) in [(DType::F32, 1e-4), (DType::F16, 5e-3), (DType::BF16, 2e-2)] {
        let model = ClipEmbedder::load(&files, &device, dtype).unwrap();
        // The network alone, from transformers' pixel values.
        let from_pv = flat(&l2_normalize(&model.embed_pixels(&pv.data, 4).unwrap()).unwrap());
        let d = max_diff(&from_pv, &want_images);
        eprintln!("{dtype:?}: image embeddings from pixel_values.npy, max abs diff {d:.2e}");
        assert!(d <= tolerance, "{dtype:?}: {d}");
        // From the PNG files through the byte path: bytes uploaded, looked up on the device.
        let (mut bytes, mut host) = (Vec::new(), Vec::new());
        for i in 0..4 {
            let png = std::fs::read(fixture(&format!("images/img{i}.png"))).unwrap();
            bytes.extend(decode_crop(&png, &model.preprocess).unwrap());
            host.extend(preprocess_bytes(&png, &model.preprocess).unwrap());
        }
        let x = model.pixel_input(bytes, 4).unwrap();
        assert!(x.device().is_cuda());
        assert_eq!(x.dtype(), dtype);
        if dtype == DType::F32 {
            assert_eq!(
                flat(&x),
                host,
                "the device lookup gives the host pixels bit for bit"
            );
        }
        let from_png = flat(&l2_normalize(&model.embed_pixel_tensor(&x).unwrap()).unwrap());
        let d = max_diff(&from_png, &want_images);
        eprintln!("{dtype:?}: image embeddings from the PNG bytes, max abs diff {d:.2e}");
        assert!(d <= tolerance, "{dtype:?}: {d}");
        let text = flat(&l2_normalize(&model.embed_texts(&texts).unwrap()).unwrap());
        let d = max_diff(&text, &want_texts);
        eprintln!("{dtype:?}: text embeddings, max abs diff {d:.2e}");
        assert!(d <= tolerance, "{dtype:?}: {d}");
    }
}

#[test]
fn gpt2_on_the_gpu_matches_transformers() {
    let device = gpu();
    let model = Gpt2::load(&fixture("gpt2-tiny"), &device, DType::F32).unwrap();
    for (reference, logits) in [
        ("reference/gpt2-logprobs.json", "reference/gpt2/logits.npy"),
        (
            "reference/gpt2-logprobs-noprompt.json",
            "reference/gpt2b/logits.npy",
        ),
    ] {
        let r = json(reference);
        let ids: Vec<u32> = r["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let t = ids.len();
        let input = Tensor::from_vec(ids, (1, t), &device).unwrap();
        let got = model.forward(&input, None).unwrap();
        let d = max_diff(&flat(&got), &read_npy(&fixture(logits)).unwrap().data);
        eprintln!("{reference}: logits max abs diff {d:.2e}");
        assert!(d < 1e-4, "{reference}: {d}");
        let lp = flat(&next_token_logprobs(&got, &input).unwrap());
        let d = max_diff(&lp, &floats(&r["token_logprobs"]));
        assert!(d < 1e-4, "{reference}: token log-probs {d}");
    }
}

/// The captioner on `device` with the tiny GPT-2 fixture as its trainable decoder and a
/// seeded mapper: the same weights on every device.
fn captioner(device: &Device) -> (Captioner, VarMap) {
    let cfg = CaptionerConfig {
        prefix_length: 4,
        max_caption_tokens: 16,
        ..CaptionerConfig::default()
    };
    let files = DecoderFiles::from_dir(&fixture("gpt2-tiny")).unwrap();
    let vars = VarMap::new();
    let model = Captioner::build(&cfg, 16, 0, &files, None, &vars, device).unwrap();
    seed_mapper(&vars, 7).unwrap();
    (model, vars)
}

/// A batch of `b` captions, right-padded: CLIP embeddings `(b, 16)`, ids `(b, t)`, mask.
fn caption_batch(model: &Captioner, b: usize, device: &Device) -> (Tensor, Tensor, Tensor) {
    let words = [
        "red", "blue", "circle", "square", "above", "below", "small", "large",
    ];
    let rows: Vec<Vec<u32>> = (0..b)
        .map(|i| {
            let caption: Vec<&str> = (0..3 + i % 9).map(|j| words[(i * 3 + j) % 8]).collect();
            caption_ids(&model.tokenizer, model.eos, &caption.join(" "), 16).unwrap()
        })
        .collect();
    let t = rows.iter().map(Vec::len).max().unwrap();
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for r in &rows {
        ids.extend(
            r.iter()
                .copied()
                .chain(std::iter::repeat(model.eos))
                .take(t),
        );
        mask.extend((0..t).map(|i| if i < r.len() { 1f32 } else { 0.0 }));
    }
    let clip: Vec<f32> = (0..b * 16)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    (
        Tensor::from_vec(clip, (b, 16), device).unwrap(),
        Tensor::from_vec(ids, (b, t), device).unwrap(),
        Tensor::from_vec(mask, (b, t), device).unwrap(),
    )
}

/// Loss and gradients (by variable name order) of one batch, and the weights after an AdamW
/// step with `step_with` as the gradients when given (to compare the optimizer on the same
/// input: AdamW's first step is about ±lr wherever a gradient is not tiny, so a sign flip
/// of a near-zero gradient between devices would show as lr).
fn one_step(
    device: &Device,
    step_with: Option<&[Vec<f32>]>,
) -> (f32, Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let (model, vars) = captioner(device);
    let (clip, ids, mask) = caption_batch(&model, 6, device);
    // Image-prefixed NLL (SFT) plus a text-only sum over two masks (the preference path).
    let sft = model.nll(&clip, &ids, &mask).unwrap();
    let sums = model
        .masked_logprobs(None, &ids, &mask, &[&mask, &mask])
        .unwrap();
    let half = (&sums[1].0 * 0.5).unwrap();
    let text = ((&sums[0].0 - &half).unwrap().sum_all().unwrap() * -0.01).unwrap();
    let loss = (sft + text).unwrap();
    let mut opt = AdamW::new(&vars).unwrap();
    let sorted = opt.var_list();
    let mut grads = gradients(&loss.backward().unwrap(), &sorted);
    assert!(grads.iter().all(Option::is_some));
    let computed: Vec<Vec<f32>> = grads.iter().flatten().map(flat).collect();
    if let Some(given) = step_with {
        grads = sorted
            .iter()
            .zip(given)
            .map(|(v, g)| Some(Tensor::from_vec(g.clone(), v.shape(), device).unwrap()))
            .collect();
    }
    let cfg = OptimizerConfig::default();
    let norm = grad_norm(&grads).unwrap();
    clip_and_step(&mut opt, &grads, norm, 1e-3, &cfg).unwrap();
    (
        loss.to_scalar::<f32>().unwrap(),
        computed,
        sorted.iter().map(|v| flat(v.as_tensor())).collect(),
    )
}

#[test]
fn a_training_step_on_the_gpu_equals_the_cpu_step() {
    // The CPU runs prefcap's fused kernels (LM head + log-prob, attention, layer norm);
    // the GPU runs candle's tensor ops. Same weights, same batch. AdamW is fused in-place
    // kernels on both (NVRTC-compiled on the GPU), here given the same gradients.
    let (gpu_loss, gpu_grads, gpu_after) = one_step(&gpu(), None);
    let (cpu_loss, cpu_grads, cpu_after) = one_step(&Device::Cpu, Some(&gpu_grads));
    eprintln!("loss: CPU {cpu_loss}, GPU {gpu_loss}");
    assert!(
        (cpu_loss - gpu_loss).abs() <= 1e-4 * cpu_loss.abs().max(1.0),
        "{cpu_loss} vs {gpu_loss}"
    );
    let mut worst = 0f32;
    for (c, g) in cpu_grads.iter().zip(&gpu_grads) {
        let scale = c.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        worst = worst.max(max_diff(c, g) / scale);
    }
    eprintln!("gradients: worst max abs diff relative to the tensor's max |g|: {worst:.2e}");
    assert!(worst < 1e-3, "{worst}");
    let d = cpu_after
        .iter()
        .zip(&gpu_after)
        .map(|(c, g)| max_diff(c, g))
        .fold(0f32, f32::max);
    eprintln!("weights after one AdamW step on the same gradients: max abs diff {d:.2e}");
    assert!(d < 1e-6, "{d}");
}

#[test]
fn training_steps_hold_device_memory_flat() {
    let device = gpu();
    // AdamW's fused kernels and its tensor ops (the path whose moments held every step's
    // graph), each with two accumulated batches per step as `train.grad_accum = 2` does.
    for fused in [true, false] {
        let (model, vars) = captioner(&device);
        let (clip, ids, mask) = caption_batch(&model, 32, &device);
        let mut opt = AdamW::new(&vars).unwrap();
        opt.use_fused_kernels(fused);
        let sorted = opt.var_list();
        let cfg = OptimizerConfig::default();
        let mut used = Vec::new();
        let mut losses = Vec::new();
        for _ in 0..12 {
            let mut pending: Vec<Option<Tensor>> = Vec::new();
            for _ in 0..2 {
                let loss = model.nll(&clip, &ids, &mask).unwrap();
                let grads = gradients(&loss.backward().unwrap(), &sorted);
                losses.push(loss.to_scalar::<f32>().unwrap());
                pending = if pending.is_empty() {
                    grads
                } else {
                    pending
                        .iter()
                        .zip(&grads)
                        .map(|(a, b)| Some((a.as_ref().unwrap() + b.as_ref().unwrap()).unwrap()))
                        .collect()
                };
            }
            let grads: Vec<Option<Tensor>> = pending
                .iter()
                .map(|g| Some((g.as_ref().unwrap() / 2.0).unwrap()))
                .collect();
            let norm = grad_norm(&grads).unwrap();
            clip_and_step(&mut opt, &grads, norm, 1e-3, &cfg).unwrap();
            drop((grads, pending));
            device.synchronize().unwrap();
            used.push(used_mib(&device));
        }
        eprintln!("fused {fused}: losses {losses:?}");
        eprintln!("fused {fused}: device memory in use after each step, MiB: {used:.0?}");
        assert!(losses[23] < losses[0], "the steps train");
        // One batch's graph here is hundreds of MiB (the logits alone are 32 × 16 × 50257
        // f32): a step that kept it would grow the total by that much every time.
        let growth = used[11] - used[3];
        assert!(
            growth < 64.0,
            "fused {fused}: memory grew {growth:.0} MiB over 8 steps"
        );
    }
}
