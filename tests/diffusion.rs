//! The caption diffusion model from the outside, through the `diffusion` pipeline on a small
//! synthetic world: train-diffusion trains by the engine (validation loss, its terms, best
//! checkpoint, `diffusion.json`); refine-diffusion validates its start, draws and scores
//! samples with the shaped reward and trains on them; generate decodes both by the reverse
//! process next to the autoregressive captioner, score and report take their captions like
//! any model's; a `sampling_steps` beyond the model's T is refused naming the key.

mod common;
use common::{newest_run, pipeline};

use prefcap::data::records::{GenerationRow, MetricRow, SummaryRow};
use prefcap::data::shard::read_parquet;

const SMALL: [&str; 34] = [
    "--set",
    "ingest.synthetic.train_images=64",
    "--set",
    "ingest.synthetic.val_images=16",
    "--set",
    "pretrain_clip.steps=0",
    "--set",
    "captioner.max_train_samples=32",
    "--set",
    "train_sft.epochs=2",
    "--set",
    "train_diffusion.epochs=3",
    "--set",
    "train_diffusion.n_layer=1",
    "--set",
    "train_diffusion.n_embd=32",
    "--set",
    "train_diffusion.diffusion_steps=200",
    "--set",
    "train_reward.epochs=1",
    "--set",
    "refine_diffusion.sampling_steps=5",
    "--set",
    "refine_diffusion.val_sampling_steps=5",
    "--set",
    "refine_diffusion.max_train_images=16",
    "--set",
    "refine_diffusion.val_images=8",
    "--set",
    "refine_diffusion.batch_size=8",
    "--set",
    "generate.sampling_steps=10",
    "--set",
    "generate.methods=[\"greedy\",\"diffusion\"]",
];

#[test]
fn the_diffusion_pipeline_trains_and_decodes_a_diffusion_captioner() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let mut args = vec!["run", "diffusion"];
    args.extend(SMALL);
    let (out, log) = pipeline(&args, work);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("step train-diffusion: done"), "{log}");
    let run = newest_run(work);
    let dir = run.join("train-diffusion");
    assert!(dir.join("best/model.safetensors").is_file());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("diffusion.json")).unwrap()).unwrap();
    assert_eq!(manifest["spec"]["diffusion_steps"], 200);
    assert_eq!(manifest["spec"]["schedule"], "sqrt");

    // The engine logged the loss and its three terms, train and validation.
    let metrics: Vec<MetricRow> = read_parquet(&run.join("metrics.parquet")).unwrap();
    for split in ["train", "val"] {
        for name in ["loss", "mse", "rounding_nll", "prior"] {
            assert!(
                metrics.iter().any(|m| m.stage == "train-diffusion"
                    && m.split == split
                    && m.name == name
                    && m.value.is_finite()),
                "{split} {name}"
            );
        }
    }
    let train_loss: Vec<f64> = metrics
        .iter()
        .filter(|m| m.stage == "train-diffusion" && m.split == "train" && m.name == "loss")
        .map(|m| m.value)
        .collect();
    assert!(
        train_loss.last().unwrap() < &train_loss[0],
        "loss falls: {train_loss:?}"
    );

    // The refinement: held-out metrics at its start, the shaped reward of its samples.
    let refine = |split: &str, name: &str| -> Vec<&MetricRow> {
        metrics
            .iter()
            .filter(|m| m.stage == "refine-diffusion" && m.split == split && m.name == name)
            .collect()
    };
    assert_eq!(
        refine("val", "val/CLIPScore")[0].step,
        0,
        "validated at its start"
    );
    for name in [
        "reward",
        "reward/dense",
        "reward/sparse",
        "rwr/max_weight",
        "loss/anchor",
    ] {
        let rows = refine("train", name);
        assert_eq!(rows.len(), 2, "{name}: two batches of 8 images");
        assert!(rows.iter().all(|m| m.value.is_finite()), "{name}");
    }
    assert!(refine("train", "rwr/max_weight")
        .iter()
        .all(|m| (0.25..=1.0).contains(&m.value)));
    assert!(run.join("refine-diffusion/diffusion.json").is_file());

    // Decoded by the reverse process; captions end before the padding.
    let gens: Vec<GenerationRow> = read_parquet(&run.join("generations.parquet")).unwrap();
    let diffusion: Vec<&GenerationRow> = gens
        .iter()
        .filter(|g| g.model == "train-diffusion" || g.model == "refine-diffusion")
        .collect();
    assert_eq!(
        diffusion.len(),
        2 * 16,
        "one caption per held-out image and model"
    );
    assert!(diffusion.iter().all(|g| g.method == "diffusion"
        && !g.caption.contains("<|endoftext|>")
        && g.tokens <= 16
        && g.logprob <= 0.0));
    assert!(gens
        .iter()
        .any(|g| g.model == "train-sft" && g.method == "greedy"));
    assert!(!gens
        .iter()
        .any(|g| g.model == "train-sft" && g.method == "diffusion"));
    let s: Vec<SummaryRow> = read_parquet(&run.join("scores_summary.parquet")).unwrap();
    for model in ["train-diffusion", "refine-diffusion"] {
        for metric in ["CIDEr", "grammatical"] {
            assert!(
                s.iter()
                    .any(|r| r.model == model && r.method == "diffusion" && r.metric == metric),
                "{model} {metric}"
            );
        }
    }
    let html = std::fs::read_to_string(run.join("report/index.html")).unwrap();
    assert!(html.contains("train-diffusion · diffusion"));

    // DDPO instead of reward-weighted regression: a policy gradient through the recorded
    // reverse chains, from the same checkpoints (found in the run above).
    let (out, log) = pipeline(
        &[
            "run",
            "refine-diffusion",
            "--set",
            "refine_diffusion.method=\"ddpo\"",
            "--set",
            "refine_diffusion.sampling_steps=5",
            "--set",
            "refine_diffusion.val_sampling_steps=5",
            "--set",
            "refine_diffusion.max_train_images=8",
            "--set",
            "refine_diffusion.val_images=8",
            "--set",
            "refine_diffusion.batch_size=8",
            "--set",
            "clip.model=tiny",
            "--set",
            "captioner.dataset=synthetic",
        ],
        work,
    );
    assert!(out.status.success(), "{log}");
    let ddpo_run = newest_run(work);
    let m: Vec<MetricRow> = read_parquet(&ddpo_run.join("metrics.parquet")).unwrap();
    let losses: Vec<f64> = m
        .iter()
        .filter(|r| r.split == "train" && r.name == "loss")
        .map(|r| r.value)
        .collect();
    assert_eq!(losses.len(), 2, "two epochs of one batch of 8 images");
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");

    // More reverse steps than the model has timesteps: refused, naming the key.
    let (out, log) = pipeline(
        &[
            "run",
            "generate",
            "--set",
            "generate.models=[\"train-diffusion\"]",
            "--set",
            "generate.sampling_steps=500",
            "--set",
            "clip.model=tiny",
            "--set",
            "captioner.dataset=synthetic",
        ],
        work,
    );
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("generate.sampling_steps") && log.contains("(200)"),
        "{log}"
    );
}
