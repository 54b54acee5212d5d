//! `pipeline bench train-dpo`: preference pairs per second and peak memory of DPO training on
//! a GPT-2-small-size policy (124M parameters, random weights), prefcap's train-dpo path side
//! by side with TRL's `DPOTrainer` on the same checkpoint, pairs, batch, `max_length`,
//! machine and threads.
//!
//! Both sides train one epoch on the same text-only pairs (prompt → chosen / rejected) with
//! the sigmoid loss, β 0.1, AdamW and clipping at 1.0, dropout off. prefcap computes the
//! reference log-probabilities once with the policy before its first update (train-dpo's
//! on-disk cache, emptied first so the pass is timed) and holds no reference model; TRL keeps
//! its reference model resident and runs it every step. Each tool runs as its own process so
//! its peak RSS is its own; pairs/s counts the whole epoch (reference pass included).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_nn::VarMap;
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::data::records::PreferencePair;
use crate::data::shard::{ShardSet, ShardStats};
use crate::datasets::pairs::{PairSource, PairSplit, Tokenizing, Truncation, TruncationMode};
use crate::device::device_for;
use crate::models::captioner::{Captioner, CaptionerConfig, DecoderFiles};
use crate::models::tiny::{ensure_random_gpt2, Gpt2Spec};
use crate::rng::SplitMix64;
use crate::stages::context::PreferenceConfig;
use crate::stages::preference::{reference_logps, Method, PreferenceObjective};
use crate::train::{Objective, OptimizerConfig, Schedule, Trainer};

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct BenchTrainDpoArgs {
    /// Pairs in the epoch.
    #[arg(long, default_value_t = 64)]
    pub pairs: usize,
    /// Pairs per optimizer step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Words per prompt (about one token each).
    #[arg(long, default_value_t = 48)]
    pub prompt_words: usize,
    /// Words per chosen completion; rejected ones have three quarters as many.
    #[arg(long, default_value_t = 64)]
    pub completion_words: usize,
    /// TRL's `max_length` (prompt + completion tokens), applied by both.
    #[arg(long, default_value_t = 512)]
    pub max_length: usize,
    /// CPU threads for both tools; 0 = all cores.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Run both tools on this CUDA device (prefcap needs `--features cuda`).
    #[arg(long)]
    pub gpu: Option<usize>,
    /// Skip TRL (measure prefcap alone).
    #[arg(long)]
    pub no_peer: bool,
    /// Scratch directory (checkpoint, pairs, reference cache).
    #[arg(long, default_value = ".bench/train-dpo")]
    pub dir: PathBuf,
    /// Virtual environment for the Python peer (torch, transformers, trl).
    #[arg(long, default_value = ".bench/venv")]
    pub venv: PathBuf,
    /// Internal: run prefcap's side in this process and write its figures here.
    #[arg(long, hide = true)]
    pub worker_out: Option<PathBuf>,
}

/// What each side reports.
#[derive(Debug, Serialize, Deserialize)]
struct SideResult {
    /// Seconds of the epoch (reference pass included for prefcap; `trainer.train()` for TRL).
    seconds: f64,
    /// Seconds of prefcap's reference pass (0 for TRL, which runs it inside each step).
    reference_seconds: f64,
    steps: usize,
    first_loss: f64,
    /// Mean prompt + completion tokens per sequence as trained.
    mean_tokens: f64,
}

const DATASET: &str = "bench_pairs";
const SPLIT: &str = "train";
const WORDS: &[&str] = &[
    "a", "red", "blue", "green", "yellow", "circle", "square", "triangle", "above", "below",
    "left", "right", "of", "the", "shape", "and", "two", "shapes", "is", "on",
];

/// The peer: TRL's DPOTrainer, one epoch, timed around `trainer.train()`.
const PEER_SCRIPT: &str = r#"
import json, os, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer
ckpt, data, out = sys.argv[1:4]
threads, batch, max_length = map(int, sys.argv[4:7])
device = os.environ.get("PEER_DEVICE", "cpu")
torch.set_num_threads(threads)
tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(ckpt, "tokenizer.json"),
                              eos_token="<|endoftext|>", pad_token="<|endoftext|>")
model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa")
rows = [json.loads(l) for l in open(data)]
ds = Dataset.from_list(rows)
args = DPOConfig(
    output_dir=os.path.join(os.path.dirname(out), "trl-out"), per_device_train_batch_size=batch,
    num_train_epochs=1, learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0,
    weight_decay=0.01, max_grad_norm=1.0, beta=0.1, loss_type=["sigmoid"], max_length=max_length,
    save_strategy="no", report_to=[], logging_steps=1, seed=0, use_cpu=(device == "cpu"),
    dataloader_num_workers=0, disable_tqdm=True, bf16=False, fp16=False,
)
trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
lengths = [len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in trainer.train_dataset]
lengths += [len(r["prompt_ids"]) + len(r["rejected_ids"]) for r in trainer.train_dataset]
if device != "cpu":
    torch.cuda.synchronize()
t0 = time.perf_counter()
result = trainer.train()
if device != "cpu":
    torch.cuda.synchronize()
seconds = time.perf_counter() - t0
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
json.dump({"seconds": seconds, "reference_seconds": 0.0, "steps": trainer.state.global_step,
           "first_loss": losses[0] if losses else float("nan"),
           "mean_tokens": sum(min(l, max_length) for l in lengths) / len(lengths)}, open(out, "w"))
"#;

fn words(rng: &mut SplitMix64, n: usize) -> String {
    (0..n)
        .map(|_| format!(" {}", WORDS[rng.below(WORDS.len() as u64) as usize]))
        .collect()
}

/// The pairs both tools train on: a pair shard for prefcap, JSON lines for TRL.
fn write_pairs(dir: &Path, args: &BenchTrainDpoArgs) -> anyhow::Result<PathBuf> {
    let mut rng = SplitMix64::new(7);
    let pairs: Vec<PreferencePair> = (0..args.pairs)
        .map(|i| PreferencePair {
            pair_id: format!("bench:{i}"),
            source: "bench".into(),
            prompt: format!("Describe:{}", words(&mut rng, args.prompt_words)),
            chosen: words(&mut rng, args.completion_words),
            rejected: words(&mut rng, args.completion_words * 3 / 4),
            score_chosen: 1.0,
            score_rejected: 0.0,
            image_key: None,
        })
        .collect();
    let set = ShardSet::new(&dir.join("work"), DATASET, SPLIT);
    if set.dir().exists() {
        std::fs::remove_dir_all(set.dir())?;
    }
    set.prepare()?;
    let stats = ShardStats {
        shard: 0,
        count: pairs.len() as u64,
        successes: pairs.len() as u64,
        source: "bench".into(),
        ..ShardStats::default()
    };
    set.write(0, &pairs, &stats)?;
    let jsonl = dir.join("pairs.jsonl");
    let mut text = String::new();
    for p in &pairs {
        text +=
            &serde_json::json!({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected})
                .to_string();
        text.push('\n');
    }
    std::fs::write(&jsonl, text)?;
    Ok(jsonl)
}

/// prefcap's side, in the worker process: train-dpo's pair loader, reference pass, loss and
/// optimizer step over one epoch.
fn run_prefcap(args: &BenchTrainDpoArgs, ckpt: &Path, out: &Path) -> anyhow::Result<()> {
    let work = args.dir.join("work");
    let device = device_for(args.gpu, false)?;
    let vars = VarMap::new();
    // Text-only pairs never use the prefix mapper; one prefix position keeps it small.
    let cap_cfg = CaptionerConfig {
        prefix_length: 1,
        ..CaptionerConfig::default()
    };
    let files = DecoderFiles::from_dir(ckpt)?;
    let mut model = Captioner::build(&cap_cfg, 8, 0, &files, None, &vars, &device)?;
    let pref = PreferenceConfig {
        pairs_dataset: String::new(),
        text_pairs_dataset: DATASET.into(),
        text_train_split: SPLIT.into(),
        ..PreferenceConfig::default()
    };
    let tokenizing = Arc::new(Tokenizing {
        tokenizer: model.tokenizer.clone(),
        eos: model.eos,
        truncation: Truncation {
            max_length: args.max_length,
            max_prompt_length: 0,
            mode: TruncationMode::KeepStart,
        },
    });
    let source = PairSource {
        dataset: DATASET.into(),
        split: SPLIT.into(),
        grounded: false,
    };
    let split = PairSplit::new(&work, &[source], &[], tokenizing)?;
    let cache = work.join("cache");
    if cache.exists() {
        std::fs::remove_dir_all(&cache)?;
    }

    let rss = |what: &str| {
        if std::env::var_os("PREFCAP_DEBUG_RSS").is_some() {
            let st = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            let f = |k: &str| {
                st.lines()
                    .find(|l| l.starts_with(k))
                    .unwrap_or("")
                    .to_string()
            };
            eprintln!("{what}: {} {}", f("VmRSS"), f("VmHWM"));
        }
    };
    rss("built");
    let start = Instant::now();
    model.decoder.set_differentiable(false);
    let refs = reference_logps(&split, &model, &[&files.weights], false, &work)?;
    let reference_seconds = start.elapsed().as_secs_f64();
    model.decoder.set_differentiable(true);
    // train-dpo's objective and the engine's step, at a constant learning rate.
    let mut objective = PreferenceObjective {
        method: Method::Dpo,
        model,
        vars,
        cfg: pref,
        optimizer: OptimizerConfig {
            lr: 1e-5,
            schedule: Schedule::Constant,
            ..OptimizerConfig::default()
        },
    };
    let mut trainer = Trainer::new(objective.groups())?;
    let (mut steps, mut first_loss, mut tokens, mut sequences) = (0, f64::NAN, 0usize, 0usize);
    let shuffle = Some((0, "bench".to_string()));
    for batch in split.batches(args.batch, Some(Arc::new(refs)), shuffle) {
        let batch = batch?;
        for g in &batch.groups {
            for s in [&g.chosen, &g.rejected] {
                tokens += s.attention.iter().filter(|&&a| a > 0.0).count();
                sequences += s.rows;
            }
        }
        rss("before step");
        let report = trainer.step(&mut objective, &batch, steps, 1)?;
        rss("after step");
        if steps == 0 {
            first_loss = report.losses[0];
        }
        steps += 1;
    }
    device.synchronize()?;
    let result = SideResult {
        seconds: start.elapsed().as_secs_f64(),
        reference_seconds,
        steps,
        first_loss,
        mean_tokens: tokens as f64 / sequences.max(1) as f64,
    };
    std::fs::write(out, serde_json::to_vec(&result)?)?;
    Ok(())
}

fn read_result(path: &Path, who: &str) -> anyhow::Result<SideResult> {
    let bytes = std::fs::read(path).with_context(|| format!("{who} wrote no result"))?;
    Ok(serde_json::from_slice(&bytes)?)
}

pub fn bench_train_dpo(args: &BenchTrainDpoArgs) -> anyhow::Result<()> {
    let (dir, threads) = crate::bench::scratch_and_threads(&args.dir, args.threads)?;
    let ckpt = dir.join("gpt2-small-random");
    if let Some(out) = &args.worker_out {
        let args = BenchTrainDpoArgs {
            dir,
            ..args.clone()
        };
        return run_prefcap(&args, &ckpt, out);
    }
    eprintln!("writing a random GPT-2-small-size checkpoint (HF format) ...");
    ensure_random_gpt2(&ckpt, &Gpt2Spec::SMALL, 0, &crate::synthetic::corpus())?;
    let jsonl = write_pairs(&dir, args)?;

    eprintln!(
        "prefcap: {} pairs, batch {}, max_length {} ...",
        args.pairs, args.batch, args.max_length
    );
    let ours_out = dir.join("prefcap.json");
    let cmd = crate::bench::worker_command(
        "train-dpo",
        &[
            ("--pairs", args.pairs),
            ("--batch", args.batch),
            ("--max-length", args.max_length),
        ],
        &dir,
        &ours_out,
        threads,
        args.gpu,
    )?;
    let ours_mem = crate::bench::measure(cmd, "prefcap train-dpo", args.gpu)?;
    let ours = read_result(&ours_out, "prefcap")?;

    let peer = if args.no_peer {
        None
    } else {
        let python = crate::bench::ensure_venv(
            &args.venv,
            &["torch", "transformers", "trl", "datasets"],
            "import torch, transformers, trl, datasets",
        )?;
        let script = dir.join("peer_train_dpo.py");
        std::fs::write(&script, PEER_SCRIPT)?;
        let theirs_out = dir.join("trl.json");
        let _ = std::fs::remove_file(&theirs_out);
        eprintln!("TRL ...");
        let mut cmd = Command::new(&python);
        cmd.arg(&script)
            .arg(&ckpt)
            .arg(&jsonl)
            .arg(&theirs_out)
            .args([threads, args.batch, args.max_length].map(|n| n.to_string()))
            .env("OMP_NUM_THREADS", threads.to_string())
            .env(
                "PEER_DEVICE",
                args.gpu.map_or("cpu".into(), |g| format!("cuda:{g}")),
            );
        let mem = crate::bench::measure(cmd, "TRL", args.gpu)?;
        Some((read_result(&theirs_out, "TRL")?, mem))
    };

    let on = match args.gpu {
        Some(g) => format!("CUDA device {g}, f32"),
        None => format!("CPU, {threads} thread(s), f32"),
    };
    println!(
        "\ntrain-dpo, GPT-2-small-size policy (random weights), {on}: one epoch of {} text-only pairs",
        args.pairs
    );
    println!(
        "batch {}, sigmoid loss β 0.1, AdamW, clipping at 1.0, max_length {}, mean {:.0} tokens per sequence",
        args.batch, args.max_length, ours.mean_tokens
    );
    println!(
        "{:<8} {:>9} {:>7} {:>11} {:>15} {:>14}",
        "tool", "pairs/s", "steps", "first loss", "reference pass", "peak RSS MiB"
    );
    let rate = |r: &SideResult| args.pairs as f64 / r.seconds;
    println!(
        "{:<8} {:>9.3} {:>7} {:>11.4} {:>14.1}s {:>14.0}",
        "prefcap",
        rate(&ours),
        ours.steps,
        ours.first_loss,
        ours.reference_seconds,
        ours_mem.peak_rss_mib
    );
    if let Some((theirs, mem)) = peer {
        println!(
            "{:<8} {:>9.3} {:>7} {:>11.4} {:>15} {:>14.0}",
            "TRL",
            rate(&theirs),
            theirs.steps,
            theirs.first_loss,
            "in each step",
            mem.peak_rss_mib
        );
        println!(
            "TRL trained on mean {:.0} tokens per sequence",
            theirs.mean_tokens
        );
        if ours.steps != theirs.steps {
            bail!(
                "the two tools took different step counts ({} vs {})",
                ours.steps,
                theirs.steps
            );
        }
        println!(
            "\nratio prefcap / TRL: {:.2}x pairs/s, peak RSS {:.0}% of TRL's",
            rate(&ours) / rate(&theirs),
            100.0 * ours_mem.peak_rss_mib / mem.peak_rss_mib
        );
        if let (Some(a), Some(b)) = (ours_mem.peak_gpu_mib, mem.peak_gpu_mib) {
            println!(
                "peak GPU memory above idle: prefcap {a:.0} MiB, TRL {b:.0} MiB ({:.0}% of TRL's)",
                100.0 * a / b
            );
        }
    } else if args.gpu.is_some() {
        println!(
            "peak GPU memory above idle: prefcap {} MiB",
            crate::bench::gpu_mib(ours_mem.peak_gpu_mib)
        );
    }
    Ok(())
}
