//! Next-frame story captioning from the outside, through the `story` pipeline on a small
//! synthetic world: train-story trains the recipe and the adversarial variants by the engine
//! (the generator and discriminator as two groups), writes `story.json`; generate captions the
//! target frames of the held-out stories with every story model, the copy-last baseline and
//! the image captioner on the target frame; score scores them against their own frame.

mod common;
use common::{newest_run, pipeline};

use std::collections::HashMap;

use prefcap::data::records::{GenerationRow, MetricRow, StoryFrame, SummaryRow};
use prefcap::data::shard::{read_parquet, ShardSet};

const SMALL: [&str; 30] = [
    "--set",
    "ingest.synthetic.train_images=32",
    "--set",
    "ingest.synthetic.val_images=8",
    "--set",
    "ingest.synthetic.train_stories=12",
    "--set",
    "ingest.synthetic.val_stories=3",
    "--set",
    "ingest.synthetic.frames_per_story=6",
    "--set",
    "pretrain_clip.steps=0",
    "--set",
    "train_sft.epochs=1",
    "--set",
    "story.epochs=2",
    "--set",
    "story.batch_size=8",
    "--set",
    "story.fusion_dim=32",
    "--set",
    "story.ffn_dim=64",
    "--set",
    "story.layers=1",
    "--set",
    "story.sample_tokens=8",
    "--set",
    "story.max_caption_tokens=20",
    "--set",
    "generate.max_tokens=12",
];

#[test]
fn the_story_pipeline_trains_every_variant_and_scores_next_frame_captions() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let mut args = vec!["run", "story"];
    args.extend(SMALL);
    let (out, log) = pipeline(&args, work);
    assert!(out.status.success(), "{log}");
    let run = newest_run(work);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("train-story/story.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["spec"]["context_frames"], 4);
    assert_eq!(manifest["spec"]["frame_positions"], true);
    assert_eq!(manifest["targets"], "all");
    let no_pos: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("story-no-positions/story.json")).unwrap())
            .unwrap();
    assert_eq!(no_pos["spec"]["frame_positions"], false);

    // Windows: 6 frames and K = 4 give targets 4 and 5 of every story.
    let run_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("run.json")).unwrap()).unwrap();
    let summary = run_json["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s[0] == "train-story")
        .unwrap()[1]["details"]
        .clone();
    assert_eq!(summary["train"]["examples"], 24, "{summary}");
    assert_eq!(summary["val"]["examples"], 6, "{summary}");
    assert_eq!(summary["train"]["missing_features"], 0);

    let metrics: Vec<MetricRow> = read_parquet(&run.join("metrics.parquet")).unwrap();
    let of = |stage: &str, split: &str, name: &str| -> Vec<f64> {
        metrics
            .iter()
            .filter(|m| m.stage == stage && m.split == split && m.name == name)
            .map(|m| m.value)
            .collect()
    };
    for name in ["loss", "nll", "image_mse", "image_align", "image_cosine"] {
        let v = of("train-story", "val", name);
        assert_eq!(v.len(), 2, "{name}: one validation per epoch");
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
    }
    // The GAN variants: two groups, the generator's reward and the discriminator's loss.
    for stage in [
        "story-gan-naive",
        "story-gan-cached",
        "story-gan-hard-negative",
    ] {
        for (split, name) in [
            ("train", "generator/loss"),
            ("train", "adv/reward"),
            ("train", "discriminator/loss"),
            ("train", "d/accuracy"),
            ("val", "d/accuracy"),
        ] {
            let v = of(stage, split, name);
            assert!(
                !v.is_empty() && v.iter().all(|x| x.is_finite()),
                "{stage} {split} {name}"
            );
        }
        assert!(
            run.join(stage)
                .join("best/discriminator.safetensors")
                .is_file(),
            "{stage}"
        );
    }

    // Every model captioned the same held-out targets; copy-last repeats frame 3.
    let gens: Vec<GenerationRow> = read_parquet(&run.join("generations.parquet")).unwrap();
    let frames: Vec<StoryFrame> = ShardSet::new(work, "synthetic_stories", "val")
        .read_all()
        .unwrap();
    let caption: HashMap<String, String> = frames
        .iter()
        .map(|f| (f.key(), f.caption.clone()))
        .collect();
    let models = [
        "copy-last",
        "train-sft",
        "train-story",
        "story-no-positions",
        "story-gan-naive",
        "story-gan-cached",
        "story-gan-hard-negative",
    ];
    for model in models {
        let mut keys: Vec<&str> = gens
            .iter()
            .filter(|g| g.model == model)
            .map(|g| g.image_key.as_str())
            .collect();
        keys.sort();
        assert_eq!(keys.len(), 6, "{model}");
        assert!(
            keys.iter().all(|k| k.ends_with(":4") || k.ends_with(":5")),
            "{model}: {keys:?}"
        );
        assert!(gens
            .iter()
            .filter(|g| g.model == model)
            .all(|g| g.dataset == "synthetic_stories" && g.split == "val"));
    }
    for g in gens.iter().filter(|g| g.model == "copy-last") {
        let (story, frame) = g.image_key.rsplit_once(':').unwrap();
        let prev = format!("{story}:{}", frame.parse::<i32>().unwrap() - 1);
        assert_eq!(g.caption, caption[&prev]);
    }

    // Scored against the target frame: CLIPScore, its raw cosine, next-frame attributes.
    let summary: Vec<SummaryRow> = read_parquet(&run.join("scores_summary.parquet")).unwrap();
    let metric = |model: &str, name: &str| -> f64 {
        summary
            .iter()
            .find(|r| r.model == model && r.metric == name)
            .unwrap_or_else(|| panic!("{model} {name}"))
            .value
    };
    for model in models {
        for name in ["CIDEr", "CLIPScore", "CLIP_cosine", "attribute_accuracy"] {
            assert!(metric(model, name).is_finite(), "{model} {name}");
        }
    }
    // Copy-last states the previous frame: its scene is nearly right, its change often not.
    let copy = metric("copy-last", "attribute_accuracy");
    assert!((0.5..1.0).contains(&copy), "{copy}");
    assert_eq!(metric("copy-last", "grammatical"), 1.0);

    // The report's story table: one row per story step, the discriminator's held-out
    // accuracy for the GAN variants only.
    let table = std::fs::read_to_string(run.join("report/story.csv")).unwrap();
    let header: Vec<&str> = table.lines().next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<&str>> = table
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 5, "{table}");
    for row in &rows {
        let gan = row[col("stage")].starts_with("story-gan");
        let d: f64 = row[col("d_accuracy")].parse().unwrap_or(f64::NAN);
        assert_eq!(d.is_finite(), gan, "{table}");
        assert!(row[col("image_cosine")].parse::<f64>().unwrap().is_finite());
    }
    for family in ["story", "adversarial"] {
        assert!(
            run.join(format!(
                "report/{family}-{}-story-gan-naive.png",
                run.file_name().unwrap().to_string_lossy()
            ))
            .is_file(),
            "{family} chart"
        );
    }
}
