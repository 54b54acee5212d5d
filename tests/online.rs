//! train-dico and train-scst from the outside, through the `dico` pipeline on a small
//! synthetic world: one stage runs as two named steps with their own overrides, every online
//! step validates its starting model at step 0 and logs its rewards, the generated captions
//! of every model are scored side by side, and the report has the online table and reward
//! curves.

mod common;
use common::{newest_run, pipeline};

use prefcap::data::records::{GenerationRow, MetricRow};
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
    "train_dpo.epochs=1",
    "--set",
    "train_dico.epochs=1",
    "--set",
    "train_scst.epochs=1",
    "--set",
    "generate.methods=[\"greedy\"]",
];

#[test]
fn the_dico_pipeline_runs_dico_and_both_scst_variants_side_by_side() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let mut args = vec!["run", "dico"];
    args.extend(SMALL);
    let (out, log) = pipeline(&args, work);
    assert!(out.status.success(), "{log}");
    let run = newest_run(work);
    let online = ["train-dico", "scst-cider", "scst-clip"];
    for step in online {
        assert!(log.contains(&format!("step {step}: done")), "{step}\n{log}");
        assert!(
            run.join(step).join("best/model.safetensors").is_file()
                && run.join(step).join("captioner.json").is_file(),
            "{step}"
        );
    }
    // Each named step ran with its own reward.
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("run.json")).unwrap()).unwrap();
    let summary = |step: &str| -> String {
        record["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s[0] == step)
            .unwrap_or_else(|| panic!("{step}: {record}"))[1]["summary"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(
        summary("scst-cider").contains("CIDEr-D"),
        "{}",
        summary("scst-cider")
    );
    assert!(
        summary("scst-clip").contains("CLIP (weight 2)"),
        "{}",
        summary("scst-clip")
    );
    assert!(summary("train-dico").contains("frozen reference resident"));

    let metrics: Vec<MetricRow> = read_parquet(&run.join("metrics.parquet")).unwrap();
    let of = |stage: &str, split: &str, name: &str| -> Vec<&MetricRow> {
        metrics
            .iter()
            .filter(|m| m.stage == stage && m.split == split && m.name == name)
            .collect()
    };
    for step in online {
        let val = of(step, "val", "val/RefCLIPScore");
        assert!(
            val.len() >= 2 && val[0].step == 0,
            "{step}: the starting model at step 0, then each validation: {val:?}"
        );
        for name in ["val/CLIPScore", "val/CIDEr", "val/attribute_accuracy"] {
            assert!(
                of(step, "val", name).iter().all(|m| m.value.is_finite()),
                "{step} {name}"
            );
        }
        let reward = of(step, "train", "reward/mean");
        assert!(!reward.is_empty() && reward.iter().all(|m| m.value.is_finite()));
    }
    let distinct = of("train-dico", "train", "candidates/distinct");
    assert!(
        !distinct.is_empty() && distinct.iter().all(|m| m.value > 0.0 && m.value <= 1.0),
        "{distinct:?}"
    );
    for name in ["rewards/chosen", "rewards/rejected", "reward/winner"] {
        assert!(!of("train-dico", "train", name).is_empty(), "{name}");
    }
    assert!(!of("scst-cider", "train", "advantage/mean").is_empty());

    // Every model captioned the held-out images and was scored.
    let gens: Vec<GenerationRow> = read_parquet(&run.join("generations.parquet")).unwrap();
    for model in [
        "untrained",
        "train-sft",
        "train-dpo",
        "train-dico",
        "scst-cider",
        "scst-clip",
    ] {
        assert_eq!(
            gens.iter().filter(|g| g.model == model).count(),
            16,
            "{model}"
        );
    }
    let report = run.join("report");
    let table = std::fs::read_to_string(report.join("online.csv")).unwrap();
    let header = table.lines().next().unwrap();
    for col in [
        "stage",
        "best_step",
        "CLIPScore_init",
        "RefCLIPScore",
        "CIDEr",
        "distinct",
    ] {
        assert!(header.split(',').any(|h| h == col), "{col}: {header}");
    }
    assert_eq!(table.lines().count(), 1 + online.len(), "{table}");
    let run_id = run.file_name().unwrap().to_string_lossy().into_owned();
    for step in online {
        assert!(
            report
                .join(format!("rewards-{run_id}-{step}.png"))
                .is_file(),
            "{step}"
        );
    }
    let scores = std::fs::read_to_string(report.join("scores.csv")).unwrap();
    assert!(
        scores.lines().any(|l| l.contains(",scst-clip,")),
        "{scores}"
    );
}

#[test]
fn a_step_override_naming_an_unknown_key_is_refused_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = tmp.path().join("p.toml");
    std::fs::write(
        &plan,
        "[[steps]]\nstage = \"train-scst\"\nname = \"scst-x\"\nconfig = { rewrd = \"clip\" }\n",
    )
    .unwrap();
    let (out, log) = pipeline(&["validate", plan.to_str().unwrap()], tmp.path());
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("scst-x") && log.contains("rewrd"), "{log}");
    assert!(!tmp.path().join("runs").exists());
}
