//! train-rlhf from the outside, through the `rlhf` pipeline on a small synthetic world: a
//! reward model, then RLHF three times as named steps that differ only in their shaping,
//! each validating its starting model at step 0 and logging the shaped reward, its dense and
//! sparse parts, the mixing weight and the KL to the reference; the report's online table
//! has the KL and every step's reward curve.

mod common;
use common::{newest_run, pipeline};

use prefcap::data::records::MetricRow;
use prefcap::data::shard::read_parquet;

const SMALL: [&str; 18] = [
    "--set",
    "ingest.synthetic.train_images=64",
    "--set",
    "ingest.synthetic.val_images=16",
    "--set",
    "pretrain_clip.steps=0",
    "--set",
    "captioner.max_train_samples=32",
    "--set",
    "train_sft.epochs=8",
    "--set",
    "train_reward.epochs=1",
    "--set",
    "train_rlhf.epochs=1",
    "--set",
    "train_rlhf.samples=3",
    "--set",
    "generate.methods=[\"greedy\"]",
];

#[test]
fn the_rlhf_pipeline_runs_the_shaping_ablation_side_by_side() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let mut args = vec!["run", "rlhf"];
    args.extend(SMALL);
    let (out, log) = pipeline(&args, work);
    assert!(out.status.success(), "{log}");
    let run = newest_run(work);
    let steps = ["rlhf-hierarchical", "rlhf-sparse", "rlhf-dense"];
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("run.json")).unwrap()).unwrap();
    for step in steps {
        assert!(log.contains(&format!("step {step}: done")), "{step}\n{log}");
        assert!(run.join(step).join("best/model.safetensors").is_file());
        let summary = record["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s[0] == step)
            .unwrap()[1]["summary"]
            .as_str()
            .unwrap()
            .to_string();
        let shaping = step.trim_start_matches("rlhf-");
        assert!(
            summary.contains(&format!("{shaping}-shaped")) && summary.contains("train-reward"),
            "{summary}"
        );
    }

    // The pipeline's reward model adds CLIP's cosine, and says so beside its checkpoint.
    let reward: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("train-reward/reward.json")).unwrap())
            .unwrap();
    assert_eq!(reward["clip_feature"], true, "{reward}");

    let metrics: Vec<MetricRow> = read_parquet(&run.join("metrics.parquet")).unwrap();
    let of = |stage: &str, split: &str, name: &str| -> Vec<f64> {
        metrics
            .iter()
            .filter(|m| m.stage == stage && m.split == split && m.name == name)
            .map(|m| m.value)
            .collect()
    };
    for step in steps {
        let at_zero = metrics
            .iter()
            .any(|m| m.stage == step && m.step == 0 && m.name == "val/RefCLIPScore");
        assert!(at_zero, "{step}: the starting model validated at step 0");
        for name in [
            "reward",
            "reward_std",
            "reward/dense",
            "reward/sparse",
            "kl",
            "entropy",
            "completions/mean_length",
        ] {
            let v = of(step, "train", name);
            assert!(
                !v.is_empty() && v.iter().all(|x| x.is_finite()),
                "{step} {name}: {v:?}"
            );
        }
        let alpha = of(step, "train", "alpha/mean");
        let ok = match step {
            "rlhf-sparse" => alpha.iter().all(|&a| a == 0.0),
            "rlhf-dense" => alpha.iter().all(|&a| a == 1.0),
            _ => alpha.iter().all(|&a| a > 0.3 && a < 0.9),
        };
        assert!(!alpha.is_empty() && ok, "{step}: {alpha:?}");
        assert!(of(step, "val", "val/attribute_accuracy")
            .iter()
            .all(|x| x.is_finite()));
    }

    let report = run.join("report");
    let table = std::fs::read_to_string(report.join("online.csv")).unwrap();
    let header: Vec<&str> = table.lines().next().unwrap().split(',').collect();
    assert!(
        header.contains(&"kl_last") && header.contains(&"reward_last"),
        "{table}"
    );
    assert_eq!(table.lines().count(), 1 + steps.len(), "{table}");
    let run_id = run.file_name().unwrap().to_string_lossy().into_owned();
    for step in steps {
        assert!(report
            .join(format!("rewards-{run_id}-{step}.png"))
            .is_file());
    }
}
