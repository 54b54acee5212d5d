//! `pipeline bench train-dico`: images per second of a DiCO step on a GPT-2-small-size
//! CLIP-prefix captioner (random weights) with a CLIP ViT-B/32-size reward (random weights),
//! prefcap's objective and trainer step beside the same step in PyTorch: transformers' beam
//! search (`generate` with `num_beams` = `num_return_sequences` = the candidates, from the
//! prefix embeddings), the CLIP text tower's reward, the policy's and the frozen reference's
//! teacher-forced log-probabilities of the candidates, DiCO's loss, backward, clipping at
//! 1.0 and AdamW; same checkpoints, batch, beams, lengths, machine and threads. Each side runs
//! in its own process, whose peak RSS is sampled. The captioner's embedding rows outside its
//! small tokenizer are scaled down ([`decodable_copy`]) so that candidates decode to text.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use candle_core::DType;
use candle_nn::VarMap;
use clap::Args;

use crate::bench::Measured;
use crate::datasets::captions::ImageBatch;
use crate::device::device_for;
use crate::models::captioner::{seed_mapper, Captioner, CaptionerConfig, DecoderFiles};
use crate::models::clip::{ClipEmbedder, ClipModelFiles};
use crate::models::tiny::{ensure_random_gpt2, ensure_tiny_clip, Gpt2Spec, TinyClipSpec};
use crate::rng::SplitMix64;
use crate::stages::online::dico::{DicoConfig, DicoObjective};
use crate::stages::online::{Online, Reward, RewardKind, RewardSettings, Validation};
use crate::train::{Objective, OptimizerConfig, Schedule, Trainer};

#[derive(Debug, Clone, Args)]
pub struct BenchTrainDicoArgs {
    /// Images per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Beam width = candidates per image.
    #[arg(long, default_value_t = 5)]
    pub beams: usize,
    /// Caption tokens generated per candidate.
    #[arg(long, default_value_t = 20)]
    pub tokens: usize,
    /// Prefix length (CLIP → GPT-2 embeddings).
    #[arg(long, default_value_t = 10)]
    pub prefix: usize,
    /// Timed steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// CPU threads for both tools; 0 = all cores.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Skip PyTorch (measure prefcap alone).
    #[arg(long)]
    pub no_peer: bool,
    /// Scratch directory (the random checkpoints).
    #[arg(long, default_value = ".bench/train")]
    pub dir: PathBuf,
    /// Virtual environment for the Python peer (torch, transformers).
    #[arg(long, default_value = ".bench/venv")]
    pub venv: PathBuf,
    /// Internal: run prefcap's side in this process and write its figures here.
    #[arg(long, hide = true)]
    pub worker_out: Option<PathBuf>,
}

/// One side's figures in an online bench (train-dico, train-rlhf).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Side {
    pub images_per_s: f64,
    /// The first step's check value: DiCO's loss (ln 2: the policy starts as its
    /// reference), RLHF's KL (0, for the same reason).
    #[serde(alias = "first_loss", alias = "first_kl")]
    pub first: f64,
    /// Mean tokens of the candidates or samples of the timed steps.
    pub mean_tokens: f64,
    /// prefcap's seconds per timed step: the objective's step (search or sampling, rewards,
    /// teacher-forced passes, loss) and of it the search or sampling alone, backward,
    /// gradient norm and AdamW.
    #[serde(default)]
    pub phases: [f64; 5],
}

/// Prints an online bench's table: `title`, `setup`, then each side's figures (`first`
/// labelled `first`, the search phase `search`) and the ratios.
pub(crate) fn print_online(
    title: &str,
    setup: &str,
    (first, search): (&str, &str),
    (ours, ours_mem): &SideMeasured<Side>,
    peer: Option<&SideMeasured<Side>>,
) {
    println!("\n{title}\n{setup}");
    println!(
        "{:<10} {:>10} {:>12} {:>12} {:>14}",
        "tool", "images/s", first, "mean tokens", "peak RSS MiB"
    );
    let row = |tool: &str, s: &Side, m: &Measured| {
        println!(
            "{:<10} {:>10.3} {:>12.4} {:>12.1} {:>14.0}",
            tool, s.images_per_s, s.first, s.mean_tokens, m.peak_rss_mib
        )
    };
    row("prefcap", ours, ours_mem);
    let p = ours.phases.map(|x| 1e3 * x);
    println!(
        "prefcap per step: objective {:.0} ms (of it {search} {:.0} ms), backward {:.0} ms, gradient norm {:.0} ms, AdamW {:.0} ms",
        p[0], p[1], p[2], p[3], p[4]
    );
    if let Some((theirs, mem)) = peer {
        row("PyTorch", theirs, mem);
        println!(
            "\nratio prefcap / PyTorch: images/s {:.2}x, peak RSS {:.2}x",
            ours.images_per_s / theirs.images_per_s,
            ours_mem.peak_rss_mib / mem.peak_rss_mib
        );
    }
}

pub(crate) const CLIP_DIM: usize = 512;

/// The peer: the same step in PyTorch.
const PEER_SCRIPT: &str = r#"
import json, sys, time
import torch
import torch.nn.functional as F
from transformers import CLIPModel, GPT2LMHeadModel, PreTrainedTokenizerFast
gpt2, clipdir, out = sys.argv[1], sys.argv[2], sys.argv[3]
threads, batch, beams, tokens, prefix, steps = map(int, sys.argv[4:10])
torch.set_num_threads(threads)
torch.manual_seed(0)
def load():
    return GPT2LMHeadModel.from_pretrained(
        gpt2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
model, ref = load(), load().eval()
d = model.config.n_embd
def mapper():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(512, d * prefix // 2), torch.nn.Tanh(),
                               torch.nn.Linear(d * prefix // 2, d * prefix))
policy_map, ref_map = mapper(), mapper()
clip = CLIPModel.from_pretrained(clipdir).eval()
tok = PreTrainedTokenizerFast(tokenizer_file=f"{gpt2}/tokenizer.json")
ctok = PreTrainedTokenizerFast(tokenizer_file=f"{clipdir}/tokenizer.json")
ctok.pad_token = ctok.convert_ids_to_tokens(clip.config.text_config.eos_token_id)
eos = model.config.eos_token_id
params = list(model.parameters()) + list(policy_map.parameters())
opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
image = torch.randn(batch, 512)
beta, tau, weight = 0.2, 300.0, 2.0
def seq_logps(lm, mp, seqs, mask):
    c = F.normalize(image, dim=-1).repeat_interleave(beams, 0)
    pre = mp(c).view(-1, prefix, d)
    x = torch.cat([pre, lm.transformer.wte(seqs)], 1)
    keep = torch.cat([torch.ones(x.shape[0], prefix), mask], 1)
    logits = lm(inputs_embeds=x, attention_mask=keep).logits[:, prefix - 1 : prefix - 1 + seqs.shape[1]]
    lp = torch.log_softmax(logits, -1).gather(-1, seqs.unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)
lengths = []
def step():
    with torch.no_grad():
        pre = policy_map(F.normalize(image, dim=-1)).view(batch, prefix, d)
        seqs = model.generate(inputs_embeds=pre, attention_mask=torch.ones(batch, prefix, dtype=torch.long),
                              num_beams=beams, num_return_sequences=beams, max_new_tokens=tokens,
                              do_sample=False, length_penalty=1.0, pad_token_id=eos, eos_token_id=eos)
        # tokens up to and including the first end-of-text
        is_eos = (seqs == eos).int()
        mask = ((is_eos.cumsum(1) - is_eos) == 0).float()
        lengths.append(float(mask.sum(1).mean()))
        texts = tok.batch_decode(seqs, skip_special_tokens=True)
        t = ctok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        f = clip.get_text_features(**t)
        emb = F.normalize(getattr(f, "pooler_output", f), dim=-1)  # transformers 5: an output object
        img = F.normalize(image, dim=-1).repeat_interleave(beams, 0)
        r = (weight * (emb * img).sum(-1)).view(batch, beams)
        ref_lp = seq_logps(ref, ref_map, seqs, mask).view(batch, beams)
    lp = seq_logps(model, policy_map, seqs, mask).view(batch, beams)
    win = r.argmax(1, keepdim=True)
    chosen = torch.zeros_like(r, dtype=torch.bool).scatter(1, win, True)
    gap = (r.gather(1, win) - r) * tau
    gamma = torch.softmax(gap.masked_fill(chosen, float("-inf")), -1)
    ratio = lp - ref_lp
    logits = beta * ((ratio * chosen).sum(1) - (gamma * ratio).sum(1))
    loss = -F.logsigmoid(logits).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()
first = step()
lengths.clear()
t0 = time.perf_counter()
for _ in range(steps):
    step()
json.dump({"images_per_s": steps * batch / (time.perf_counter() - t0), "first_loss": first,
           "mean_tokens": sum(lengths) / len(lengths)}, open(out, "w"))
"#;

/// What prefcap's side of an online bench starts from: the policy's online state with a
/// CLIP reward of `reward_weight` over `batch` random images, its reference (same weights),
/// the batch, and a builder of more captioners like the policy (a reward model's).
pub(crate) struct OnlineFixture {
    pub online: Online,
    pub reference: Captioner,
    pub batch: ImageBatch,
    cfg: CaptionerConfig,
    files: DecoderFiles,
    device: candle_core::Device,
}

impl OnlineFixture {
    pub fn new(
        gpt2: &Path,
        clip_dir: &Path,
        batch: usize,
        prefix: usize,
        tokens: usize,
        reward_weight: f64,
    ) -> anyhow::Result<Self> {
        let device = device_for(None, false)?;
        let cfg = CaptionerConfig {
            prefix_length: prefix,
            max_caption_tokens: tokens,
            ..CaptionerConfig::default()
        };
        let files = DecoderFiles::from_dir(gpt2)?;
        let clip = ClipEmbedder::load(&ClipModelFiles::from_dir(clip_dir)?, &device, DType::F32)?;
        let mut rng = SplitMix64::new(0);
        let keys: Vec<String> = (0..batch).map(|i| format!("img{i}")).collect();
        let features: Vec<f32> = rng.normal_samples(batch * CLIP_DIM, 1.0);
        let images: HashMap<String, Vec<f32>> = keys
            .iter()
            .zip(features.chunks(CLIP_DIM))
            .map(|(k, f)| (k.clone(), f.to_vec()))
            .collect();
        let build = |vars: &VarMap| -> anyhow::Result<Captioner> {
            let m = Captioner::build(&cfg, CLIP_DIM, 0, &files, None, vars, &device)?;
            seed_mapper(vars, 0)?;
            Ok(m)
        };
        let vars = VarMap::new();
        let mut policy = build(&vars)?;
        policy.decoder.set_differentiable(true);
        let reference = build(&VarMap::new())?;
        Ok(Self {
            online: Online {
                policy,
                vars,
                clip,
                reward: Reward::new(
                    RewardSettings {
                        kind: RewardKind::Clip,
                        weight: reward_weight,
                        model: String::new(),
                        revision: String::new(),
                    },
                    None,
                    images,
                    None,
                    HashMap::new(),
                ),
                validation: Validation::new(HashMap::new(), HashMap::new(), false),
                max_tokens: tokens,
                seed: 0,
                select_by: "val/RefCLIPScore".into(),
                skipped_rewards: 0,
                search_seconds: 0.0,
            },
            reference,
            batch: ImageBatch {
                rows: batch,
                keys,
                features,
            },
            cfg,
            files,
            device,
        })
    }

    /// A captioner like the policy at its start (same checkpoint, same seeded mapper), its
    /// variables in `vars`.
    pub fn captioner(&self, vars: &VarMap) -> anyhow::Result<Captioner> {
        let m = Captioner::build(
            &self.cfg,
            CLIP_DIM,
            0,
            &self.files,
            None,
            vars,
            &self.device,
        )?;
        seed_mapper(vars, 0)?;
        Ok(m)
    }
}

/// prefcap's side: train-dico's objective and the engine's step at a constant rate.
fn run_prefcap(args: &BenchTrainDicoArgs, gpt2: &Path, clip_dir: &Path) -> anyhow::Result<Side> {
    let OnlineFixture {
        online,
        reference,
        batch,
        ..
    } = OnlineFixture::new(gpt2, clip_dir, args.batch, args.prefix, args.tokens, 2.0)?;
    let mut objective = DicoObjective {
        online,
        reference,
        cfg: DicoConfig {
            candidates: args.beams,
            ..DicoConfig::default()
        },
        optimizer: OptimizerConfig {
            lr: 1e-5,
            schedule: Schedule::Constant,
            ..OptimizerConfig::default()
        },
        last_mean_length: f64::NAN,
    };
    let mut trainer = Trainer::new(objective.groups())?;
    let first_loss = trainer.step(&mut objective, &batch, 0, 1)?.losses[0];
    let before = trainer.timings();
    let search_before = objective.online.search_seconds;
    let start = Instant::now();
    let mut tokens = 0.0;
    for step in 0..args.steps {
        trainer.step(&mut objective, &batch, step, args.steps)?;
        tokens += objective.last_mean_length;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let t = trainer.timings();
    let n = args.steps.max(1) as f64;
    Ok(Side {
        images_per_s: (args.steps * args.batch) as f64 / elapsed,
        first: first_loss,
        mean_tokens: tokens / n,
        phases: [
            (t.forward - before.forward) / n,
            (objective.online.search_seconds - search_before) / n,
            (t.backward - before.backward) / n,
            (t.grad_norm - before.grad_norm) / n,
            (t.update - before.update) / n,
        ],
    })
}

/// A copy of the random GPT-2-small-size checkpoint in `from` whose token embeddings outside
/// its tokenizer's vocabulary (the BPE is trained on the synthetic corpus: a few hundred of
/// the 50,257 rows) are scaled by 1e-3 and those inside by `known_scale`: the tied head then
/// rarely picks the former, so candidates decode to text and get a reward, as a trained
/// model's do (beam search needs `known_scale` 1; sampling, which would otherwise spread over
/// the 50,000 near-zero logits, 10). Shapes and compute are GPT-2 small's.
pub(crate) fn decodable_copy(from: &Path, to: &Path, known_scale: f32) -> anyhow::Result<()> {
    let stamp = to.join("prefcap-decodable.txt");
    let source = format!(
        "{}\nknown rows x {known_scale}",
        std::fs::read_to_string(from.join("prefcap-spec.txt"))?
    );
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == source) {
        return Ok(());
    }
    std::fs::create_dir_all(to)?;
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(from.join(f), to.join(f))?;
    }
    let known = tokenizers::Tokenizer::from_file(from.join("tokenizer.json"))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .get_vocab_size(true);
    let mut tensors =
        candle_core::safetensors::load(from.join("model.safetensors"), &candle_core::Device::Cpu)?;
    let wte = tensors
        .get("transformer.wte.weight")
        .context("no transformer.wte.weight")?;
    let rows = wte.dim(0)?;
    let scale: Vec<f32> = (0..rows)
        .map(|i| if i < known { known_scale } else { 1e-3 })
        .collect();
    let scaled = wte.broadcast_mul(&candle_core::Tensor::from_vec(
        scale,
        (rows, 1),
        wte.device(),
    )?)?;
    tensors.insert("transformer.wte.weight".into(), scaled);
    candle_core::safetensors::save(&tensors, to.join("model.safetensors"))?;
    std::fs::write(&stamp, source)?;
    Ok(())
}

pub(crate) fn read_side<T: serde::de::DeserializeOwned>(
    path: &Path,
    who: &str,
) -> anyhow::Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("{who} wrote no result"))?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// The random checkpoints of the online benches in `dir`: a GPT-2-small-size decoder copy
/// (`copy`, known rows scaled by `known_scale`, see [`decodable_copy`]) and a ViT-B/32-size
/// CLIP; returns their directories.
pub(crate) fn online_checkpoints(
    dir: &Path,
    copy: &str,
    known_scale: f32,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let random = dir.join("gpt2-small-random");
    let gpt2 = dir.join(copy);
    let clip = dir.join("vit-b32-random");
    eprintln!("writing random GPT-2-small-size and ViT-B/32 checkpoints (HF format) ...");
    ensure_random_gpt2(&random, &Gpt2Spec::SMALL, 0, &crate::synthetic::corpus())?;
    decodable_copy(&random, &gpt2, known_scale)?;
    ensure_tiny_clip(
        &clip,
        &TinyClipSpec::vit_base_patch32(0),
        &crate::synthetic::corpus(),
    )?;
    Ok((gpt2, clip))
}

/// A side's figures and its process's peak memory.
pub(crate) type SideMeasured<T> = (T, Measured);

/// Both sides of an online bench, each in its own measured process: prefcap's worker
/// (`pipeline bench <stage> <flags> --worker-out ...`) and, unless `no_peer`, the PyTorch
/// `script` (in `venv`) with arguments `gpt2 clip out threads <flag values in order>`. Returns
/// each side's figures and peak memory.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_online_sides<T: serde::de::DeserializeOwned>(
    stage: &str,
    flags: &[(&str, usize)],
    dir: &Path,
    threads: usize,
    gpt2: &Path,
    clip: &Path,
    peer: Option<(&Path, &str)>,
) -> anyhow::Result<(SideMeasured<T>, Option<SideMeasured<T>>)> {
    let ours_out = dir.join(format!("prefcap-{stage}.json"));
    let cmd = crate::bench::worker_command(stage, flags, dir, &ours_out, threads, None)?;
    let ours_mem = crate::bench::measure(cmd, &format!("prefcap {stage}"), None)?;
    let ours = (read_side(&ours_out, "prefcap")?, ours_mem);
    let Some((venv, script_text)) = peer else {
        return Ok((ours, None));
    };
    let python = crate::bench::ensure_venv(
        venv,
        &["torch", "transformers", "safetensors"],
        "import torch, transformers",
    )?;
    let script = dir.join(format!("peer_{}.py", stage.replace('-', "_")));
    std::fs::write(&script, script_text)?;
    let theirs_out = dir.join(format!("torch-{stage}.json"));
    let _ = std::fs::remove_file(&theirs_out);
    eprintln!("PyTorch ...");
    let mut cmd = Command::new(&python);
    cmd.arg(&script)
        .arg(gpt2)
        .arg(clip)
        .arg(&theirs_out)
        .arg(threads.to_string())
        .args(flags.iter().map(|(_, n)| n.to_string()))
        .env("OMP_NUM_THREADS", threads.to_string());
    let mem = crate::bench::measure(cmd, "PyTorch", None)?;
    Ok((ours, Some((read_side(&theirs_out, "PyTorch")?, mem))))
}

pub fn bench_train_dico(args: &BenchTrainDicoArgs) -> anyhow::Result<()> {
    let (dir, threads) = crate::bench::scratch_and_threads(&args.dir, args.threads)?;
    let gpt2 = dir.join("gpt2-small-decodable");
    let clip = dir.join("vit-b32-random");
    if let Some(out) = &args.worker_out {
        let ours = run_prefcap(args, &gpt2, &clip)?;
        std::fs::write(out, serde_json::to_vec(&ours)?)?;
        return Ok(());
    }
    let (gpt2, clip) = online_checkpoints(&dir, "gpt2-small-decodable", 1.0)?;
    eprintln!(
        "prefcap: {} images x {} beams, {} tokens ...",
        args.batch, args.beams, args.tokens
    );
    let (ours, peer) = run_online_sides::<Side>(
        "train-dico",
        &[
            ("--batch", args.batch),
            ("--beams", args.beams),
            ("--tokens", args.tokens),
            ("--prefix", args.prefix),
            ("--steps", args.steps),
        ],
        &dir,
        threads,
        &gpt2,
        &clip,
        (!args.no_peer).then_some((args.venv.as_path(), PEER_SCRIPT)),
    )?;
    print_online(
        &format!("train-dico step: GPT-2-small-size prefix captioner (policy + frozen reference), CLIP ViT-B/32-size reward, CPU, {threads} thread(s), f32"),
        &format!(
            "{} images x {} beams, up to {} tokens, prefix {}, AdamW, clipping at 1.0",
            args.batch, args.beams, args.tokens, args.prefix
        ),
        ("first loss", "the beam search"),
        &ours,
        peer.as_ref(),
    );
    Ok(())
}
