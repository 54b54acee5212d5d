//! `pipeline bench train-story`: training examples per second and peak RSS of the next-frame
//! story model — the fusion encoder over K = 4 context frames (`[CLIP image ; CLIP text]` →
//! Linear → ReLU → 256, frame positions, a 2-layer post-LN Transformer encoder with GELU,
//! mean-pooled), the MLP prefix mapper, a GPT-2-small-size decoder (random weights, trained)
//! continuing a prompt with the target caption, and the image head's MSE and alignment losses
//! — prefcap's trainer step beside the same model in PyTorch (`nn.TransformerEncoder`,
//! transformers' `GPT2LMHeadModel`, `torch.optim.AdamW`), on the same checkpoint, batch,
//! lengths, machine and threads. Dropout is off in both (its masks are drawn differently);
//! each side runs in its own process, whose peak RSS is sampled.

use std::path::Path;

use crate::bench::StepFigures;

use candle_nn::VarMap;
use clap::Args;

use crate::datasets::stories::StoryBatch;
use crate::device::device_for;
use crate::models::captioner::DecoderFiles;
use crate::models::story::{seed_story_model, story_captioner, StoryModel};
use crate::models::tiny::{ensure_random_gpt2, Gpt2Spec};
use crate::rng::SplitMix64;
use crate::stages::train_story::{StoryConfig, StoryObjective};
use crate::train::{OptimizerConfig, Schedule};

#[derive(Debug, Clone, Args)]
pub struct BenchTrainStoryArgs {
    /// Examples per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Context frames.
    #[arg(long, default_value_t = 4)]
    pub context: usize,
    /// Prompt tokens per row (the context captions).
    #[arg(long, default_value_t = 96)]
    pub prompt: usize,
    /// Target caption tokens per row.
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// Timed steps (after two untimed warm-up steps).
    #[arg(long, default_value_t = 6)]
    pub steps: usize,
    #[command(flatten)]
    pub common: crate::bench::TrainBenchArgs,
}

const CLIP_DIM: usize = 512;
const PREFIX: usize = 8;

/// The peer: the same step in PyTorch. Writes steps/s, the first loss and the parameter count.
const PEER_SCRIPT: &str = r#"
import json, os, sys, time
import torch
from transformers import GPT2LMHeadModel
ckpt, out = sys.argv[1], sys.argv[2]
threads, batch, k, prompt, tokens, steps = map(int, sys.argv[3:9])
prefix, clip_dim, fusion = 8, 512, 256
device = torch.device(os.environ.get("PEER_DEVICE", "cpu"))
torch.set_num_threads(threads)
torch.manual_seed(0)
F = torch.nn.functional
gpt = GPT2LMHeadModel.from_pretrained(
    ckpt, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa"
).to(device).train()
d = gpt.config.n_embd
frame_in = torch.nn.Linear(2 * clip_dim, fusion).to(device)
positions = torch.nn.Parameter(torch.zeros(k, fusion, device=device))
encoder = torch.nn.TransformerEncoder(
    torch.nn.TransformerEncoderLayer(fusion, 4, 1024, dropout=0.0, activation="gelu", batch_first=True),
    num_layers=2, enable_nested_tensor=False,
).to(device)
mapper = torch.nn.Sequential(
    torch.nn.Linear(fusion, d * prefix // 2), torch.nn.Tanh(), torch.nn.Linear(d * prefix // 2, d * prefix)
).to(device)
image_head = torch.nn.Sequential(
    torch.nn.Linear(fusion, 256), torch.nn.ReLU(), torch.nn.Linear(256, clip_dim)
).to(device)
params = (list(gpt.parameters()) + list(frame_in.parameters()) + [positions]
          + list(encoder.parameters()) + list(mapper.parameters()) + list(image_head.parameters()))
opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
ctx_img = torch.randn(batch, k, clip_dim, device=device)
ctx_txt = torch.randn(batch, k, clip_dim, device=device)
tgt_img = torch.randn(batch, clip_dim, device=device)
tgt_txt = torch.randn(batch, clip_dim, device=device)
ids = torch.randint(0, gpt.config.vocab_size, (batch, prompt + tokens), device=device)
sup = torch.cat([torch.zeros(batch, prompt, device=device), torch.ones(batch, tokens, device=device)], 1)
keep = torch.ones(batch, prefix + prompt + tokens, device=device)
def step():
    x = torch.cat([F.normalize(ctx_img, dim=-1), F.normalize(ctx_txt, dim=-1)], -1)
    h = encoder(torch.relu(frame_in(x)) + positions)
    z = h.mean(1)
    pre = mapper(F.normalize(z, dim=-1)).view(batch, prefix, d)
    embeds = torch.cat([pre, gpt.transformer.wte(ids)], 1)
    logits = gpt(inputs_embeds=embeds, attention_mask=keep).logits[:, prefix - 1 : -1]
    lp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    l_txt = -(lp * sup).sum() / sup.sum()
    pred = F.normalize(image_head(z), dim=-1)
    l_img = F.mse_loss(pred, F.normalize(tgt_img, dim=-1))
    l_align = (1 - F.cosine_similarity(pred, tgt_txt, dim=-1)).mean()
    loss = l_txt + 0.5 * l_img + 0.5 * l_align
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()
"#;

/// prefcap's side: train-story's objective and the engine's step, constant rate.
fn run_prefcap(args: &BenchTrainStoryArgs, ckpt: &Path) -> anyhow::Result<StepFigures> {
    let device = device_for(args.common.gpu, false)?;
    let cfg = StoryConfig {
        context_frames: args.context,
        dropout: 0.0,
        prefix_length: PREFIX,
        ..StoryConfig::default()
    };
    let vars = VarMap::new();
    let captioner = story_captioner("gpt2", "main", PREFIX, cfg.mapper, false);
    let model = StoryModel::build(
        &cfg.spec(CLIP_DIM),
        &captioner,
        &DecoderFiles::from_dir(ckpt)?,
        &vars,
        &device,
    )?;
    seed_story_model(&vars, 0)?;
    let params: usize = vars.all_vars().iter().map(|v| v.elem_count()).sum();
    let mut rng = SplitMix64::new(0);
    let mut uniform = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.unit_f64() * 2.0 - 1.0) as f32)
            .collect()
    };
    let (b, k, len) = (args.batch, args.context, args.prompt + args.tokens);
    let (ci, ct, ti, tt) = (
        uniform(b * k * CLIP_DIM),
        uniform(b * k * CLIP_DIM),
        uniform(b * CLIP_DIM),
        uniform(b * CLIP_DIM),
    );
    let vocab = Gpt2Spec::SMALL.vocab.unwrap_or(1) as u64;
    let mut ids_rng = SplitMix64::new(1);
    let batch = StoryBatch {
        rows: b,
        k,
        dim: CLIP_DIM,
        context_image: ci,
        context_text: ct,
        target_image: ti,
        target_text: tt,
        len,
        ids: (0..b * len).map(|_| ids_rng.below(vocab) as u32).collect(),
        supervised: (0..b * len)
            .map(|i| f32::from(u8::from(i % len >= args.prompt)))
            .collect(),
        attention: vec![1.0; b * len],
        prompt_lens: vec![args.prompt; b],
        keys: (0..b).map(|i| format!("s{i}:{k}")).collect(),
        captions: vec![String::new(); b],
    };
    let optimizer = OptimizerConfig {
        lr: 1e-4,
        schedule: Schedule::Constant,
        ..OptimizerConfig::default()
    };
    let mut objective = StoryObjective::new(model, vars, optimizer, cfg, 0);
    StepFigures::measure(&mut objective, &batch, args.steps, params)
}

pub fn bench_train_story(args: &BenchTrainStoryArgs) -> anyhow::Result<()> {
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
        "prefcap: batch {}, K = {}, {} prompt + {} caption tokens ...",
        args.batch, args.context, args.prompt, args.tokens
    );
    let (ours, ours_mem, peer) = crate::bench::step_bench(
        "train-story",
        &[
            ("--batch", args.batch),
            ("--context", args.context),
            ("--prompt", args.prompt),
            ("--tokens", args.tokens),
            ("--steps", args.steps),
        ],
        &args.common,
        (&dir, threads),
        ("peer_train_story", PEER_SCRIPT, &ckpt),
        &[
            args.batch,
            args.context,
            args.prompt,
            args.tokens,
            args.steps,
        ],
    )?;
    let on = args.common.on(threads);
    println!(
        "\ntrain-story step: fusion encoder + MLP prefix + GPT-2-small-size decoder (trained) + image head ({:.1}M parameters), {on}",
        ours.params as f64 / 1e6
    );
    println!(
        "batch {}, K = {}, prefix {PREFIX} + {} prompt + {} caption tokens, L_txt + 0.5 L_img + 0.5 L_align, AdamW, clipping at 1.0",
        args.batch, args.context, args.prompt, args.tokens
    );
    crate::bench::print_step_table(
        "examples",
        args.batch as f64,
        &ours,
        &ours_mem,
        peer.as_ref(),
    );
    Ok(())
}
