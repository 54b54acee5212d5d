//! `pipeline bench train-diffusion`: training captions per second and peak RSS of the caption
//! diffusion model at DiffuSeq-base size — 128-d token embeddings over GPT-2's vocabulary (the
//! rounding head tied to them), 12 bidirectional GPT-2-shaped blocks of width 768, a
//! sinusoidal time embedding through a SiLU MLP, a 10-position CLIP prefix, the `sqrt`
//! schedule with T = 2000 — prefcap's train-diffusion step (x_start noised from x_0, a random
//! t per caption, x̂_0, MSE + rounding NLL + prior, backward, clipping at 1.0, AdamW) beside
//! the same model in PyTorch (`nn.TransformerEncoderLayer` pre-LN blocks, `torch.optim.AdamW`),
//! same shapes, batch, lengths, machine and threads, each side in its own process whose peak
//! RSS is sampled. Both start from random weights (no checkpoint is involved), the token
//! embeddings N(0, 1) on both sides (DiffuSeq's), so the first losses agree in scale.

use crate::bench::StepFigures;

use candle_nn::VarMap;
use clap::Args;

use crate::device::device_for;
use crate::models::diffusion::{build, DiffusionSpec, NoiseSchedule};
use crate::stages::train_diffusion::{seed_model, DiffusionObjective};
use crate::train::{OptimizerConfig, Schedule};

#[derive(Debug, Clone, Args)]
pub struct BenchTrainDiffusionArgs {
    /// Captions per step.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Caption length L (padding included).
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// Denoiser blocks.
    #[arg(long, default_value_t = 12)]
    pub layers: usize,
    /// Denoiser width.
    #[arg(long, default_value_t = 768)]
    pub width: usize,
    /// Token-embedding width.
    #[arg(long, default_value_t = 128)]
    pub embedding: usize,
    /// Timed steps (after two untimed warm-up steps).
    #[arg(long, default_value_t = 6)]
    pub steps: usize,
    #[command(flatten)]
    pub common: crate::bench::TrainBenchArgs,
}

const CLIP_DIM: usize = 512;
const PREFIX: usize = 10;
const VOCAB: usize = 50257;
const STEPS_T: usize = 2000;
const HEAD_WIDTH: usize = 64;

/// The peer: the same step in PyTorch. Writes steps/s, the first loss and the parameter count.
const PEER_SCRIPT: &str = r#"
import json, math, os, sys, time
import torch
out = sys.argv[2]
threads, batch, L, layers, n, e, steps, P, V, T, clip_dim, head = map(int, sys.argv[3:15])
device = torch.device(os.environ.get("PEER_DEVICE", "cpu"))
torch.set_num_threads(threads)
torch.manual_seed(0)
F = torch.nn.functional
nn = torch.nn
word = nn.Parameter(torch.randn(V, e, device=device))
in_proj, out_proj = nn.Linear(e, n).to(device), nn.Linear(n, e).to(device)
time_1, time_2 = nn.Linear(n, 4 * n).to(device), nn.Linear(4 * n, n).to(device)
prefix = nn.Linear(clip_dim, P * n).to(device)
wte = nn.Parameter(torch.zeros(1, n, device=device))  # GPT-2's one-row token table, unused
wpe = nn.Parameter(0.01 * torch.randn(P + L, n, device=device))
blocks = nn.ModuleList([
    nn.TransformerEncoderLayer(n, n // head, 4 * n, dropout=0.0, activation="gelu",
                               batch_first=True, norm_first=True)
    for _ in range(layers)
]).to(device)
ln_f = nn.LayerNorm(n).to(device)
params = ([word, wte, wpe] + list(in_proj.parameters()) + list(out_proj.parameters())
          + list(time_1.parameters()) + list(time_2.parameters()) + list(prefix.parameters())
          + list(blocks.parameters()) + list(ln_f.parameters()))
opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
# Diffusion-LM's sqrt schedule: alpha_bar(s) = 1 - sqrt(s + 1e-4), betas clipped at 0.999.
ab = lambda s: 1 - math.sqrt(s + 1e-4)
betas = [min(1 - ab((i + 1) / T) / ab(i / T), 0.999) for i in range(T)]
alphas_bar = torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0).float().to(device)
def timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)
clip = torch.randn(batch, clip_dim, device=device)
tokens = torch.randint(0, V, (batch, L), device=device)
def step():
    t = torch.randint(0, T, (batch,), device=device)
    x0 = word[tokens]
    x_start = x0 + (1 - alphas_bar[0]).sqrt() * torch.randn_like(x0)
    a = alphas_bar[t][:, None, None]
    x_t = a.sqrt() * x_start + (1 - a).sqrt() * torch.randn_like(x0)
    temb = time_2(F.silu(time_1(timestep_embedding(t, n))))
    h = in_proj(x_t) + temb[:, None]
    seq = torch.cat([prefix(clip).view(batch, P, n), h], 1) + wpe
    for blk in blocks:
        seq = blk(seq)
    x0_hat = out_proj(ln_f(seq)[:, P:])
    mse = ((x0_hat - x0) ** 2).mean(-1).mean(-1)
    logits = x_start @ word.T
    nll = F.cross_entropy(logits.reshape(-1, V), tokens.reshape(-1), reduction="none").view(batch, L).mean(-1)
    prior = ((x0 * alphas_bar[-1].sqrt()) ** 2).mean(-1).mean(-1)
    loss = (mse + nll + prior).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()
"#;

fn spec(args: &BenchTrainDiffusionArgs) -> DiffusionSpec {
    DiffusionSpec {
        vocab_size: VOCAB,
        embedding_dim: args.embedding,
        max_tokens: args.tokens,
        n_layer: args.layers,
        n_head: args.width / HEAD_WIDTH,
        n_embd: args.width,
        prefix_length: PREFIX,
        clip_dim: CLIP_DIM,
        schedule: NoiseSchedule::Sqrt,
        diffusion_steps: STEPS_T,
    }
}

/// prefcap's side: train-diffusion's objective and the engine's step, constant rate.
fn run_prefcap(args: &BenchTrainDiffusionArgs) -> anyhow::Result<StepFigures> {
    let device = device_for(args.common.gpu, false)?;
    let vars = VarMap::new();
    let model = build(&spec(args), &vars, &device)?;
    seed_model(&vars, 0)?;
    let params: usize = vars.all_vars().iter().map(|v| v.elem_count()).sum();
    let batch = crate::bench::random_caption_batch(args.batch, args.tokens, VOCAB as u64, CLIP_DIM);
    let optimizer = OptimizerConfig {
        lr: 1e-4,
        schedule: Schedule::Constant,
        ..OptimizerConfig::default()
    };
    let mut objective = DiffusionObjective::new(model, vars, optimizer, 0, 0);
    StepFigures::measure(&mut objective, &batch, args.steps, params)
}

pub fn bench_train_diffusion(args: &BenchTrainDiffusionArgs) -> anyhow::Result<()> {
    let (dir, threads) = crate::bench::scratch_and_threads(&args.common.dir, args.common.threads)?;
    if !args.width.is_multiple_of(HEAD_WIDTH) {
        anyhow::bail!("--width must be a multiple of {HEAD_WIDTH}");
    }
    if let Some(out) = &args.common.worker_out {
        let ours = run_prefcap(args)?;
        std::fs::write(out, serde_json::to_vec(&ours)?)?;
        return Ok(());
    }
    eprintln!(
        "prefcap: batch {}, L {}, {} blocks of width {}, {}-d embeddings ...",
        args.batch, args.tokens, args.layers, args.width, args.embedding
    );
    let (ours, ours_mem, peer) = crate::bench::step_bench(
        "train-diffusion",
        &[
            ("--batch", args.batch),
            ("--tokens", args.tokens),
            ("--layers", args.layers),
            ("--width", args.width),
            ("--embedding", args.embedding),
            ("--steps", args.steps),
        ],
        &args.common,
        (&dir, threads),
        ("peer_train_diffusion", PEER_SCRIPT, &dir),
        &[
            args.batch,
            args.tokens,
            args.layers,
            args.width,
            args.embedding,
            args.steps,
            PREFIX,
            VOCAB,
            STEPS_T,
            CLIP_DIM,
            HEAD_WIDTH,
        ],
    )?;
    let on = args.common.on(threads);
    println!(
        "\ntrain-diffusion step: {} bidirectional blocks of width {}, {}-d embeddings over {VOCAB} tokens ({:.1}M parameters), {on}",
        args.layers,
        args.width,
        args.embedding,
        ours.params as f64 / 1e6
    );
    println!(
        "batch {}, prefix {PREFIX} + L {}, sqrt schedule T = {STEPS_T}, MSE + rounding NLL + prior, AdamW, clipping at 1.0",
        args.batch, args.tokens
    );
    crate::bench::print_step_table(
        "captions",
        args.batch as f64,
        &ours,
        &ours_mem,
        peer.as_ref(),
    );
    Ok(())
}
