//! `pipeline bench train-sft`: optimizer steps per second of the CLIP-prefix captioner with a
//! GPT-2-small-size decoder (124M parameters, random weights), prefcap's trainer step side by
//! side with the same model in PyTorch (transformers' GPT2LMHeadModel + the same MLP mapper +
//! torch.optim.AdamW), on the same checkpoint, batch, lengths, machine and threads.
//!
//! One step is what train-sft does per batch: prefix from the CLIP embedding, teacher-forced
//! GPT-2, masked mean NLL, backward, global-norm clipping at 1.0, AdamW. Dropout is off in
//! both (prefcap's GPT-2 has none). prefcap's side runs in a child process, so that on a GPU
//! all its device memory (CUDA's pool keeps freed memory for the process) is released before
//! PyTorch starts.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};

use candle_nn::VarMap;
use clap::Args;

use crate::bench::{gpu_mib, GpuPeak};
use crate::device::device_for;
use crate::models::captioner::{seed_mapper, Captioner, CaptionerConfig, DecoderFiles};
use crate::models::tiny::{ensure_random_gpt2, Gpt2Spec};
use crate::stages::train_sft::SftObjective;
use crate::train::{Objective, OptimizerConfig, Schedule, Trainer};

#[derive(Debug, Clone, Args)]
pub struct BenchTrainSftArgs {
    /// Captions per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Caption tokens per row (after the prefix).
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// Prefix length (CLIP → GPT-2 embeddings).
    #[arg(long, default_value_t = 10)]
    pub prefix: usize,
    /// Timed steps (after two untimed warm-up steps).
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    #[command(flatten)]
    pub common: crate::bench::TrainBenchArgs,
}

/// prefcap's figures, from the worker process.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Ours {
    params: usize,
    steps_per_s: f64,
    first_loss: f64,
    /// Seconds per timed step: forward, backward, gradient norm, optimizer.
    phases: [f64; 4],
}

const CLIP_DIM: usize = 512;

/// The peer: the same step in PyTorch. Prints steps/s and the first step's loss.
const PEER_SCRIPT: &str = r#"
import json, os, sys, time
import torch
from transformers import GPT2LMHeadModel
ckpt, threads, batch, tokens, prefix, steps = sys.argv[1], *map(int, sys.argv[2:7])
device = torch.device(os.environ.get("PEER_DEVICE", "cpu"))
torch.set_num_threads(threads)
torch.manual_seed(0)
model = GPT2LMHeadModel.from_pretrained(
    ckpt, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa"
).to(device).train()
d, vocab = model.config.n_embd, model.config.vocab_size
mapper = torch.nn.Sequential(
    torch.nn.Linear(512, d * prefix // 2), torch.nn.Tanh(), torch.nn.Linear(d * prefix // 2, d * prefix)
).to(device)
params = list(model.parameters()) + list(mapper.parameters())
opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
clip = torch.randn(batch, 512, device=device)
ids = torch.randint(0, vocab, (batch, tokens), device=device)
mask = torch.ones(batch, tokens, device=device)
keep = torch.cat([torch.ones(batch, prefix, device=device), mask], 1)
def step():
    c = torch.nn.functional.normalize(clip, dim=-1)
    embeds = torch.cat([mapper(c).view(batch, prefix, d), model.transformer.wte(ids)], 1)
    logits = model(inputs_embeds=embeds, attention_mask=keep).logits[:, prefix - 1 : prefix - 1 + tokens]
    lp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    loss = -(lp * mask).sum() / mask.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()
first = step()
step()
if device.type == "cuda":
    torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(steps):
    step()
if device.type == "cuda":
    torch.cuda.synchronize()
print(json.dumps({"steps_per_s": steps / (time.perf_counter() - t0), "first_loss": first}))
"#;

/// prefcap's side: `steps` timed optimizer steps after two untimed ones.
fn run_prefcap(args: &BenchTrainSftArgs, ckpt: &std::path::Path) -> anyhow::Result<Ours> {
    let device = device_for(args.common.gpu, false)?;
    let vars = VarMap::new();
    let cfg = CaptionerConfig {
        prefix_length: args.prefix,
        ..CaptionerConfig::default()
    };
    let model = Captioner::build(
        &cfg,
        CLIP_DIM,
        0,
        &DecoderFiles::from_dir(ckpt)?,
        None,
        &vars,
        &device,
    )?;
    // As train-sft does: candle's own initialisation cannot be seeded, so the first loss
    // would change from run to run.
    seed_mapper(&vars, 0)?;
    let params: usize = vars.all_vars().iter().map(|v| v.elem_count()).sum();
    let vocab = Gpt2Spec::SMALL.vocab.unwrap_or(1) as u64;
    let batch = crate::bench::random_caption_batch(args.batch, args.tokens, vocab, CLIP_DIM);
    // train-sft's objective and the engine's step, at a constant learning rate.
    let mut objective = SftObjective {
        model,
        vars,
        optimizer: OptimizerConfig {
            lr: 1e-4,
            schedule: Schedule::Constant,
            ..OptimizerConfig::default()
        },
    };
    let mut trainer = Trainer::new(objective.groups())?;
    trainer.time_phases_on(&device);
    eprintln!(
        "prefcap: {params} parameters, batch {}, {} + {} tokens ...",
        args.batch, args.prefix, args.tokens
    );
    let first_loss = trainer.step(&mut objective, &batch, 0, 1)?.losses[0];
    trainer.step(&mut objective, &batch, 1, 1)?;
    let before = trainer.timings();
    let start = Instant::now();
    for step in 0..args.steps {
        trainer.step(&mut objective, &batch, step, args.steps)?;
    }
    let steps_per_s = args.steps as f64 / start.elapsed().as_secs_f64();
    let t = trainer.timings();
    let phases = [
        t.forward - before.forward,
        t.backward - before.backward,
        t.grad_norm - before.grad_norm,
        t.update - before.update,
    ];
    Ok(Ours {
        params,
        steps_per_s,
        first_loss,
        phases: phases.map(|p| p / args.steps as f64),
    })
}

pub fn bench_train_sft(args: &BenchTrainSftArgs) -> anyhow::Result<()> {
    let (dir, threads) = crate::bench::scratch_and_threads(&args.common.dir, args.common.threads)?;
    let ckpt = dir.join("gpt2-small-random");
    if let Some(out) = &args.common.worker_out {
        let ours = run_prefcap(args, &ckpt)?;
        std::fs::write(out, serde_json::to_vec(&ours)?)?;
        return Ok(());
    }
    eprintln!("writing a random GPT-2-small-size checkpoint (HF format) ...");
    ensure_random_gpt2(&ckpt, &Gpt2Spec::SMALL, 0, &crate::synthetic::corpus())?;
    let out = dir.join("prefcap-sft.json");
    let mut cmd = crate::bench::worker_command(
        "train-sft",
        &[
            ("--batch", args.batch),
            ("--tokens", args.tokens),
            ("--prefix", args.prefix),
            ("--steps", args.steps),
        ],
        &dir,
        &out,
        threads,
        args.common.gpu,
    )?;
    let gpu_peak = GpuPeak::start(args.common.gpu);
    if !cmd.status().context("running prefcap's side")?.success() {
        bail!("prefcap's side failed");
    }
    let ours_gpu = gpu_peak.and_then(GpuPeak::finish);
    let Ours {
        params,
        steps_per_s: ours,
        first_loss,
        phases,
    } = serde_json::from_slice(&std::fs::read(&out).context("prefcap wrote no result")?)?;

    let peer = if args.common.no_peer {
        None
    } else {
        let python = crate::bench::ensure_venv(
            &args.common.venv,
            &["torch", "transformers", "safetensors"],
            "import torch, transformers",
        )?;
        let script = dir.join("peer_train_sft.py");
        std::fs::write(&script, PEER_SCRIPT)?;
        eprintln!("PyTorch ...");
        let mut cmd = Command::new(&python);
        cmd.arg(&script)
            .arg(&ckpt)
            .args(
                [threads, args.batch, args.tokens, args.prefix, args.steps].map(|n| n.to_string()),
            )
            .env("OMP_NUM_THREADS", threads.to_string())
            .env(
                "PEER_DEVICE",
                args.common
                    .gpu
                    .map_or("cpu".into(), |g| format!("cuda:{g}")),
            );
        let gpu_peak = GpuPeak::start(args.common.gpu);
        let out = cmd.output().context("running the PyTorch peer")?;
        let their_gpu = gpu_peak.and_then(GpuPeak::finish);
        if !out.status.success() {
            bail!("PyTorch failed:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Some((
            v["steps_per_s"].as_f64().context("peer output")?,
            v["first_loss"].as_f64().context("peer output")?,
            their_gpu,
        ))
    };

    let on = args.common.on(threads);
    println!(
        "\ntrain-sft step, GPT-2-small-size decoder + MLP prefix mapper ({:.1}M parameters), {on}",
        params as f64 / 1e6
    );
    println!(
        "batch {}, prefix {} + {} caption tokens, AdamW, clipping at 1.0",
        args.batch, args.prefix, args.tokens
    );
    println!(
        "{:<12} {:>10} {:>14} {:>12}",
        "tool", "steps/s", "tokens/s", "first loss"
    );
    let tokens = (args.batch * (args.prefix + args.tokens)) as f64;
    println!(
        "{:<12} {ours:>10.3} {:>14.0} {first_loss:>12.3}",
        "prefcap",
        ours * tokens
    );
    println!(
        "prefcap per step: forward {:.0} ms, backward {:.0} ms, gradient norm {:.0} ms, AdamW {:.0} ms",
        1e3 * phases[0],
        1e3 * phases[1],
        1e3 * phases[2],
        1e3 * phases[3]
    );
    let their_gpu = peer.and_then(|p| p.2);
    if let Some((theirs, their_loss, _)) = peer {
        println!(
            "{:<12} {theirs:>10.3} {:>14.0} {their_loss:>12.3}",
            "PyTorch",
            theirs * tokens
        );
        println!("\nratio prefcap / PyTorch: {:.2}x", ours / theirs);
    }
    if args.common.gpu.is_some() {
        println!(
            "peak GPU memory above idle: prefcap {} MiB, PyTorch {} MiB",
            gpu_mib(ours_gpu),
            gpu_mib(their_gpu)
        );
    }
    Ok(())
}
