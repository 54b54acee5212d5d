//! `pipeline bench score`: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D (tokenization included) on
//! N candidate/reference sets, prefcap side by side with pycocoevalcap on the same files in the
//! same run, with the values compared. pycocoevalcap's METEOR is METEOR 1.5 with all four
//! matching modules and prefcap's has exact and stem matching, so that row differs a little;
//! the peer's time is reported with and without its METEOR.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;

use crate::rng::SplitMix64;
use crate::stages::score::score_files;
use crate::synthetic::{self, Colour, Relation, Scene, Shape, ShapeKind};

#[derive(Debug, Args)]
pub struct BenchScoreArgs {
    /// Images (candidate sets).
    #[arg(long, default_value_t = 5000)]
    pub images: usize,
    /// References per image.
    #[arg(long, default_value_t = 5)]
    pub refs: usize,
    /// Skip pycocoevalcap.
    #[arg(long)]
    pub no_peer: bool,
    #[arg(long, default_value = ".bench/score")]
    pub dir: PathBuf,
    /// Virtual environment for pycocoevalcap (installed from PyPI on first use; needs Java).
    #[arg(long, default_value = ".bench/venv")]
    pub venv: PathBuf,
}

const PEER: &str = r#"
import contextlib, json, sys, time
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
refs = json.load(open(sys.argv[1]))["annotations"]
cands = json.load(open(sys.argv[2]))
t0 = time.perf_counter()
gts, res = {}, {}
for a in refs:
    gts.setdefault(a["image_id"], []).append({"caption": a["caption"]})
for c in cands:
    res[c["image_id"]] = [{"caption": c["caption"]}]
with contextlib.redirect_stdout(sys.stderr), contextlib.redirect_stderr(sys.stderr):
    tok = PTBTokenizer()
    gts, res = tok.tokenize(gts), tok.tokenize(res)
    out = {}
    b, _ = Bleu(4).compute_score(gts, res)
    for i, v in enumerate(b):
        out[f"Bleu_{i + 1}"] = v
    out["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    out["CIDEr"], _ = Cider().compute_score(gts, res)
    t1 = time.perf_counter()
    out["METEOR"], _ = Meteor().compute_score(gts, res)
out = {k: float(v) for k, v in out.items()}
out["seconds_without_meteor"] = t1 - t0
out["seconds"] = time.perf_counter() - t0
print(json.dumps(out))
"#;

fn shape(rng: &mut SplitMix64) -> Shape {
    Shape {
        colour: *rng.choose(&Colour::ALL),
        kind: *rng.choose(&ShapeKind::ALL),
    }
}

/// Writes `images` reference sets and candidates (synthetic captions with errors, some
/// capitalised and punctuated) as COCO-format JSON.
fn write_inputs(dir: &Path, images: usize, refs: usize) -> anyhow::Result<(PathBuf, PathBuf)> {
    let mut rng = SplitMix64::new(11);
    let mut anns = Vec::new();
    let mut cands = Vec::new();
    for i in 0..images {
        let scene = Scene {
            subject: shape(&mut rng),
            relation: *rng.choose(&Relation::ALL),
            object: shape(&mut rng),
        };
        let truth = synthetic::caption(&scene);
        let variants = [
            truth.clone(),
            synthetic::caption(&scene.converse()),
            format!("There is {truth}."),
            format!("{}, clearly.", truth.to_uppercase()),
            format!("{truth} on a white background"),
        ];
        for r in variants.iter().cycle().take(refs) {
            anns.push(serde_json::json!({"image_id": i, "caption": r}));
        }
        let cand = if rng.unit_f64() < 0.5 {
            truth
        } else {
            synthetic::caption(&Scene {
                subject: shape(&mut rng),
                ..scene
            })
        };
        cands.push(serde_json::json!({"image_id": i, "caption": cand}));
    }
    let (r, c) = (dir.join("refs.json"), dir.join("cands.json"));
    std::fs::write(
        &r,
        serde_json::to_vec(&serde_json::json!({"annotations": anns}))?,
    )?;
    std::fs::write(&c, serde_json::to_vec(&cands)?)?;
    Ok((r, c))
}

pub fn bench_score(args: &BenchScoreArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)?;
    let (refs, cands) = write_inputs(&args.dir, args.images, args.refs)?;
    let start = Instant::now();
    let (ours, _) = score_files(&refs, &cands)?;
    let ours_secs = start.elapsed().as_secs_f64();
    println!(
        "\n{} images x {} references: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D with tokenization",
        args.images, args.refs
    );
    println!("prefcap        {ours_secs:>8.3} s");
    if args.no_peer {
        return Ok(());
    }
    let python = crate::bench::ensure_venv(&args.venv, &["pycocoevalcap"], "import pycocoevalcap")?;
    let script = args.dir.join("peer_score.py");
    std::fs::write(&script, PEER)?;
    let out = Command::new(&python)
        .arg(&script)
        .arg(&refs)
        .arg(&cands)
        .output()?;
    if !out.status.success() {
        bail!(
            "pycocoevalcap failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let theirs: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("pycocoevalcap output")?;
    let peer_secs = theirs["seconds"].as_f64().context("seconds")?;
    let peer_core = theirs["seconds_without_meteor"]
        .as_f64()
        .context("seconds")?;
    println!(
        "pycocoevalcap  {peer_secs:>8.3} s   (speed-up {:.1}x)",
        peer_secs / ours_secs
    );
    println!(
        "pycocoevalcap without METEOR {peer_core:.3} s (speed-up {:.1}x over prefcap with it)",
        peer_core / ours_secs
    );
    println!(
        "\n{:<8} {:>12} {:>14} {:>10}",
        "metric", "prefcap", "pycocoevalcap", "abs diff"
    );
    for (metric, v) in &ours {
        let t = theirs[metric.as_str()].as_f64().unwrap_or(f64::NAN);
        let note = if metric == "METEOR" {
            "  (exact+stem vs all four modules)"
        } else {
            ""
        };
        println!(
            "{metric:<8} {v:>12.6} {t:>14.6} {:>10.2e}{note}",
            (v - t).abs()
        );
    }
    Ok(())
}
