//! `pipeline bench train-contrastive`: optimizer steps per second and peak RSS of contrastive
//! stage 1 — a GPT-2-small-size text encoder (random weights, trained) pooled by the masked
//! mean, two projection heads and symmetric InfoNCE against frozen CLIP image features —
//! prefcap's trainer step beside the same model in PyTorch (transformers' `GPT2Model`, the
//! same heads, `torch.optim.AdamW`), on the same checkpoint, batch, lengths, machine and
//! threads. Dropout is off in both (its masks are drawn differently); each side runs in its
//! own process, whose peak RSS is sampled.

use std::path::Path;

use crate::bench::StepFigures;

use candle_nn::VarMap;
use clap::Args;

use crate::device::device_for;
use crate::models::captioner::DecoderFiles;
use crate::models::contrastive::{ContrastiveModel, ContrastiveSpec};
use crate::models::tiny::{ensure_random_gpt2, Gpt2Spec};
use crate::rng::SplitMix64;
use crate::stages::train_contrastive::{ContrastiveObjective, PairBatch};
use crate::train::{OptimizerConfig, Schedule};

#[derive(Debug, Clone, Args)]
pub struct BenchTrainContrastiveArgs {
    /// Image–caption pairs per step.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Caption tokens per row.
    #[arg(long, default_value_t = 24)]
    pub tokens: usize,
    /// Width of the shared space.
    #[arg(long, default_value_t = 512)]
    pub projection: usize,
    /// Timed steps (after two untimed warm-up steps).
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    #[command(flatten)]
    pub common: crate::bench::TrainBenchArgs,
}

const CLIP_DIM: usize = 512;

/// The peer: the same step in PyTorch. Writes steps/s, the first loss and the parameter count.
const PEER_SCRIPT: &str = r#"
import json, os, sys, time
import torch
from transformers import GPT2Model
ckpt, out, threads, batch, tokens, proj, steps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:8])
device = torch.device(os.environ.get("PEER_DEVICE", "cpu"))
torch.set_num_threads(threads)
torch.manual_seed(0)
enc = GPT2Model.from_pretrained(
    ckpt, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa"
).to(device).train()
d = enc.config.n_embd
def head(i):
    return torch.nn.Sequential(
        torch.nn.Linear(i, proj), torch.nn.ReLU(), torch.nn.Dropout(0.0),
        torch.nn.Linear(proj, proj), torch.nn.LayerNorm(proj),
    ).to(device)
text_head, image_head = head(d), head(512)
params = list(enc.parameters()) + list(text_head.parameters()) + list(image_head.parameters())
opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
clip = torch.randn(batch, 512, device=device)
ids = torch.randint(0, enc.config.vocab_size, (batch, tokens), device=device)
mask = torch.ones(batch, tokens, device=device)
targets = torch.arange(batch, device=device)
F = torch.nn.functional
def step():
    h = enc(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    t = F.normalize(text_head(pooled), dim=-1)
    i = F.normalize(image_head(F.normalize(clip, dim=-1)), dim=-1)
    logits = i @ t.T / 0.5
    loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()
"#;

/// prefcap's side: train-contrastive's objective and the engine's step, constant rate.
fn run_prefcap(args: &BenchTrainContrastiveArgs, ckpt: &Path) -> anyhow::Result<StepFigures> {
    let device = device_for(args.common.gpu, false)?;
    let vars = VarMap::new();
    let spec = ContrastiveSpec {
        projection_dim: args.projection,
        dropout: 0.0,
        temperature: 0.5,
        learnable_temperature: false,
        train_text_encoder: true,
        clip_dim: CLIP_DIM,
    };
    let model = ContrastiveModel::build(&spec, &DecoderFiles::from_dir(ckpt)?, &vars, 0, &device)?;
    let params: usize = vars.all_vars().iter().map(|v| v.elem_count()).sum();
    let mut rng = SplitMix64::new(0);
    let vocab = Gpt2Spec::SMALL.vocab.unwrap_or(1) as u64;
    let batch = PairBatch {
        rows: args.batch,
        len: args.tokens,
        clip: (0..args.batch * CLIP_DIM)
            .map(|_| (rng.unit_f64() * 2.0 - 1.0) as f32)
            .collect(),
        ids: (0..args.batch * args.tokens)
            .map(|_| rng.below(vocab) as u32)
            .collect(),
        keep: vec![1.0; args.batch * args.tokens],
        captions: vec![String::new(); args.batch],
    };
    let optimizer = OptimizerConfig {
        lr: 1e-4,
        schedule: Schedule::Constant,
        ..OptimizerConfig::default()
    };
    let mut objective = ContrastiveObjective::new(model, vars, optimizer, 0);
    StepFigures::measure(&mut objective, &batch, args.steps, params)
}

pub fn bench_train_contrastive(args: &BenchTrainContrastiveArgs) -> anyhow::Result<()> {
    let (dir, threads) = crate::bench::scratch_and_threads(&args.common.dir, args.common.threads)?;
    let ckpt = dir.join("gpt2-small-random");
    if let Some(out) = &args.common.worker_out {
        let ours = run_prefcap(args, &ckpt)?;
        std::fs::write(out, serde_json::to_vec(&ours)?)?;
        return Ok(());
    }
    eprintln!("writing a random GPT-2-small-size checkpoint (HF format) ...");
    ensure_random_gpt2(&ckpt, &Gpt2Spec::SMALL, 0, &crate::synthetic::corpus())?;
    eprintln!(
        "prefcap: batch {}, {} tokens, projection {} ...",
        args.batch, args.tokens, args.projection
    );
    let (ours, ours_mem, peer) = crate::bench::step_bench(
        "train-contrastive",
        &[
            ("--batch", args.batch),
            ("--tokens", args.tokens),
            ("--projection", args.projection),
            ("--steps", args.steps),
        ],
        &args.common,
        (&dir, threads),
        ("peer_train_contrastive", PEER_SCRIPT, &ckpt),
        &[args.batch, args.tokens, args.projection, args.steps],
    )?;
    let on = args.common.on(threads);
    println!(
        "\ntrain-contrastive step: GPT-2-small-size text encoder (trained) + two projection heads ({:.1}M parameters), {on}",
        ours.params as f64 / 1e6
    );
    println!(
        "batch {}, {} tokens, projection {}, symmetric InfoNCE at temperature 0.5, AdamW, clipping at 1.0",
        args.batch, args.tokens, args.projection
    );
    crate::bench::print_step_table("steps", 1.0, &ours, &ours_mem, peer.as_ref());
    Ok(())
}
