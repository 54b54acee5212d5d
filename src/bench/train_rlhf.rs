//! `pipeline bench train-rlhf`: images per second of an RLHF step (train-rlhf, hierarchical
//! shaping) with a GPT-2-small-size CLIP-prefix policy, its frozen reference, a GPT-2-small-
//! size reward model and a CLIP ViT-B/32-size dense reward (random weights), prefcap's
//! objective and trainer step beside the same step in PyTorch: `samples` multinomial captions
//! per image (transformers' `generate` with `do_sample`, from the prefix embeddings), the CLIP
//! text tower on every distinct caption prefix (the dense increments), the reward model at
//! each caption's end-of-text, the policy's and the reference's per-token log-probabilities,
//! confidence-weighted per-token rewards with the KL penalty, the leave-one-out advantages
//! (causal rewards-to-go by position, the sparse share per caption), backward, clipping at 1.0 and AdamW; same checkpoints, batch,
//! samples, lengths, machine and threads. Each side runs in its own process, whose peak RSS
//! is sampled.

use std::path::Path;
use std::time::Instant;

use candle_nn::VarMap;
use clap::Args;

use crate::bench::train_dico::{
    online_checkpoints, print_online, run_online_sides, OnlineFixture, Side,
};
use crate::models::reward::RewardModel;
use crate::stages::online::rlhf::{RlhfConfig, RlhfObjective};
use crate::train::{Objective, OptimizerConfig, Schedule, Trainer};

#[derive(Debug, Clone, Args)]
pub struct BenchTrainRlhfArgs {
    /// Images per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Sampled captions per image.
    #[arg(long, default_value_t = 4)]
    pub samples: usize,
    /// Caption tokens generated per sample (at most).
    #[arg(long, default_value_t = 16)]
    pub tokens: usize,
    /// Prefix length (CLIP → GPT-2 embeddings).
    #[arg(long, default_value_t = 10)]
    pub prefix: usize,
    /// Timed steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    /// CPU threads for both tools; 0 = all cores.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Skip PyTorch (measure prefcap alone).
    #[arg(long)]
    pub no_peer: bool,
    /// Scratch directory (the random checkpoints).
    #[arg(long, default_value = ".bench/train")]
    pub dir: std::path::PathBuf,
    /// Virtual environment for the Python peer (torch, transformers).
    #[arg(long, default_value = ".bench/venv")]
    pub venv: std::path::PathBuf,
    /// Internal: run prefcap's side in this process and write its figures here.
    #[arg(long, hide = true)]
    pub worker_out: Option<std::path::PathBuf>,
}

/// The sampling copy of the random GPT-2-small-size checkpoint (known rows x 10).
const COPY: &str = "gpt2-small-sampleable";

/// The peer: the same step in PyTorch.
const PEER_SCRIPT: &str = r#"
import json, sys, time
import torch
import torch.nn.functional as F
from transformers import CLIPModel, GPT2LMHeadModel, GPT2Model, PreTrainedTokenizerFast
gpt2, clipdir, out = sys.argv[1], sys.argv[2], sys.argv[3]
threads, batch, samples, tokens, prefix, steps = map(int, sys.argv[4:10])
torch.set_num_threads(threads)
torch.manual_seed(0)
def load(cls=GPT2LMHeadModel):
    return cls.from_pretrained(
        gpt2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
model, ref = load(), load().eval()
rm = load(GPT2Model).eval()
d = model.config.n_embd
def mapper():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(512, d * prefix // 2), torch.nn.Tanh(),
                               torch.nn.Linear(d * prefix // 2, d * prefix))
policy_map, ref_map, rm_map = mapper(), mapper(), mapper()
head = torch.nn.Linear(d, 1, bias=False)
torch.nn.init.normal_(head.weight, std=0.02)
clip = CLIPModel.from_pretrained(clipdir).eval()
tok = PreTrainedTokenizerFast(tokenizer_file=f"{gpt2}/tokenizer.json")
ctok = PreTrainedTokenizerFast(tokenizer_file=f"{clipdir}/tokenizer.json")
ctok.pad_token = ctok.convert_ids_to_tokens(clip.config.text_config.eos_token_id)
eos = model.config.eos_token_id
params = list(model.parameters()) + list(policy_map.parameters())
opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
image = torch.randn(batch, 512)
a_max, a_min, c0, s, beta_kl, w = 0.9, 0.3, 0.5, 0.1, 0.05, 2.5
def token_logps(lm, mp, seqs, mask):
    c = F.normalize(image, dim=-1).repeat_interleave(samples, 0)
    pre = mp(c).view(-1, prefix, d)
    x = torch.cat([pre, lm.transformer.wte(seqs)], 1)
    keep = torch.cat([torch.ones(x.shape[0], prefix), mask], 1)
    logits = lm(inputs_embeds=x, attention_mask=keep).logits[:, prefix - 1 : prefix - 1 + seqs.shape[1]]
    return torch.log_softmax(logits, -1).gather(-1, seqs.unsqueeze(-1)).squeeze(-1)
def clip_text(texts):
    out = []
    for i in range(0, len(texts), 256):
        t = ctok(texts[i:i + 256], padding=True, truncation=True, max_length=77, return_tensors="pt")
        f = clip.get_text_features(**t)
        out.append(F.normalize(getattr(f, "pooler_output", f), dim=-1))
    return torch.cat(out)
lengths, kls = [], []
def step():
    R = batch * samples
    img = F.normalize(image, dim=-1).repeat_interleave(samples, 0)
    with torch.no_grad():
        pre = policy_map(F.normalize(image, dim=-1)).view(batch, prefix, d).repeat_interleave(samples, 0)
        seqs = model.generate(inputs_embeds=pre, attention_mask=torch.ones(R, prefix, dtype=torch.long),
                              do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=tokens,
                              pad_token_id=eos, eos_token_id=eos)
        is_eos = (seqs == eos).int()
        mask = ((is_eos.cumsum(1) - is_eos) == 0).float()
        L = mask.sum(1).long().tolist()
        lengths.append(sum(L) / R)
        # dense: the CLIP cosine of every prefix, each distinct text once
        texts, spans = [], []
        for i in range(R):
            ids = [t for t in seqs[i, :L[i]].tolist()]
            spans.append(len(texts))
            texts += [tok.decode([t for t in ids[:k] if t != eos], skip_special_tokens=True).strip()
                      for k in range(L[i] + 1)]
        uniq = sorted(set(texts))
        emb = clip_text(uniq)
        at = {t: j for j, t in enumerate(uniq)}
        cos = [float(emb[at[t]] @ img[i]) for i in range(R) for t in texts[spans[i]:spans[i] + L[i] + 1]]
        T = seqs.shape[1]
        dense = torch.zeros(R, T)
        k = 0
        for i in range(R):
            c = torch.tensor(cos[k:k + L[i] + 1]); k += L[i] + 1
            dense[i, :L[i]] = w * (c[1:] - c[:-1])
        # sparse: the reward model at each caption's end-of-text (one appended when cut)
        rm_ids = torch.cat([seqs, torch.full((R, 1), eos)], 1)
        rm_mask = torch.cat([mask, torch.zeros(R, 1)], 1)
        last = torch.tensor(L) - 1
        cut = (seqs.gather(1, last.unsqueeze(1)).squeeze(1) != eos)
        rm_mask[cut, torch.tensor(L)[cut]] = 1.0
        last = rm_mask.sum(1).long() - 1
        x = torch.cat([rm_map(img).view(-1, prefix, d), rm.wte(rm_ids)], 1)
        keep = torch.cat([torch.ones(R, prefix), rm_mask], 1)
        h = rm(inputs_embeds=x, attention_mask=keep).last_hidden_state
        sparse = head(h[torch.arange(R), prefix + last]).squeeze(-1)
        ref_lp = token_logps(ref, ref_map, seqs, mask)
    lp = token_logps(model, policy_map, seqs, mask)
    old = lp.detach()
    conf = old.exp()
    alpha = a_max - (a_max - a_min) * torch.sigmoid((conf - c0) / s)
    Tn = mask.sum(1, keepdim=True)
    # causal part (dense increment, KL) to go, and the sparse share credited to every token
    causal = (alpha * dense - beta_kl * (old - ref_lp)) * mask
    share = ((1 - alpha) * sparse.unsqueeze(1) / Tn * mask).sum(1)
    kls.append(float(((old - ref_lp) * mask).sum(1).mean()))
    C = causal.flip(1).cumsum(1).flip(1).view(batch, samples, T)
    S = share.view(batch, samples)
    loo = lambda x: (x.sum(1, keepdim=True) - x) / (samples - 1)
    adv = ((C - loo(C)) + (S - loo(S)).unsqueeze(-1)).view(R, T) * mask
    ratio = (lp - old).exp()
    loss = -(torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv) * mask).sum() / mask.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
step()
first_kl = kls[0]
lengths.clear()
t0 = time.perf_counter()
for _ in range(steps):
    step()
json.dump({"images_per_s": steps * batch / (time.perf_counter() - t0), "first_kl": first_kl,
           "mean_tokens": sum(lengths) / len(lengths)}, open(out, "w"))
"#;

/// prefcap's side: train-rlhf's objective and the engine's step at a constant rate.
fn run_prefcap(args: &BenchTrainRlhfArgs, gpt2: &Path, clip_dir: &Path) -> anyhow::Result<Side> {
    let fixture = OnlineFixture::new(gpt2, clip_dir, args.batch, args.prefix, args.tokens, 2.5)?;
    let reward_vars = VarMap::new();
    let reward_model = RewardModel::new(fixture.captioner(&reward_vars)?, &reward_vars, 0)?;
    let OnlineFixture {
        online,
        reference,
        mut batch,
        ..
    } = fixture;
    let mut objective = RlhfObjective::new(
        online,
        reference,
        reward_model,
        RlhfConfig {
            samples: args.samples,
            ..RlhfConfig::default()
        },
        OptimizerConfig {
            lr: 1e-5,
            schedule: Schedule::Constant,
            ..OptimizerConfig::default()
        },
    );
    let mut trainer = Trainer::new(objective.groups())?;
    trainer.step(&mut objective, &batch, 0, 1)?;
    let first_kl = objective.rollout_scalar("kl").unwrap_or(f64::NAN);
    let before = trainer.timings();
    let search_before = objective.online.search_seconds;
    let start = Instant::now();
    let mut tokens = 0.0;
    for step in 0..args.steps {
        // A new first image: a new rollout (and new samples) each step, as in training.
        batch.keys.rotate_left(1);
        let rows = batch.features.len() / args.batch;
        batch.features.rotate_left(rows);
        trainer.step(&mut objective, &batch, step, args.steps)?;
        tokens += objective
            .rollout_scalar("completions/mean_length")
            .unwrap_or(f64::NAN);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let t = trainer.timings();
    let n = args.steps.max(1) as f64;
    Ok(Side {
        images_per_s: (args.steps * args.batch) as f64 / elapsed,
        first: first_kl,
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

pub fn bench_train_rlhf(args: &BenchTrainRlhfArgs) -> anyhow::Result<()> {
    let (dir, threads) = crate::bench::scratch_and_threads(&args.dir, args.threads)?;
    let gpt2 = dir.join(COPY);
    let clip = dir.join("vit-b32-random");
    if let Some(out) = &args.worker_out {
        let ours = run_prefcap(args, &gpt2, &clip)?;
        std::fs::write(out, serde_json::to_vec(&ours)?)?;
        return Ok(());
    }
    let (gpt2, clip) = online_checkpoints(&dir, COPY, 10.0)?;
    eprintln!(
        "prefcap: {} images x {} samples, {} tokens ...",
        args.batch, args.samples, args.tokens
    );
    let (ours, peer) = run_online_sides::<Side>(
        "train-rlhf",
        &[
            ("--batch", args.batch),
            ("--samples", args.samples),
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
        &format!("train-rlhf step: GPT-2-small-size prefix policy + frozen reference + reward model, CLIP ViT-B/32-size dense reward, CPU, {threads} thread(s), f32"),
        &format!(
            "{} images x {} samples, up to {} tokens, prefix {}, hierarchical shaping, RLOO, AdamW, clipping at 1.0",
            args.batch, args.samples, args.tokens, args.prefix
        ),
        ("first KL", "sampling"),
        &ours,
        peer.as_ref(),
    );
    Ok(())
}
