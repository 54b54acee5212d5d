//! The captioning path from the outside: the embedded pipeline trains the captioner on the
//! synthetic world and it visibly learns (validation loss falls; CIDEr and attribute accuracy
//! far above the untrained baseline); generate captions an image folder with the trained
//! model; `pipeline score` scores external files.

mod common;
use common::{newest_run, pipeline};

use std::path::Path;

use prefcap::data::records::{GenerationRow, MetricRow};
use prefcap::data::records::{ScoreRow, SummaryRow};
use prefcap::data::shard::read_parquet;

fn summary(rows: &[SummaryRow], model: &str, method: &str, metric: &str) -> f64 {
    rows.iter()
        .find(|r| r.model == model && r.method == method && r.metric == metric)
        .unwrap_or_else(|| panic!("no {model}/{method}/{metric} in {rows:?}"))
        .value
}

#[test]
fn the_embedded_pipeline_trains_a_captioner_that_beats_the_untrained_one() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let (out, log) = pipeline(
        &[
            "run",
            "--set",
            "train_sft.epochs=25",
            "--set",
            "train_diffusion.epochs=4",
        ],
        work,
    );
    assert!(out.status.success(), "{log}");
    for step in [
        "ingest",
        "embed",
        "train-contrastive",
        "train-sft",
        "train-dpo",
        "train-orpo",
        "train-reward",
        "train-dico",
        "train-scst",
        "train-rlhf",
        "train-diffusion",
        "refine-diffusion",
        "train-story",
        "generate",
        "score",
    ] {
        assert!(
            log.contains(&format!("step {step}: done")),
            "{step}:\n{log}"
        );
    }
    let run = newest_run(work);

    let metrics: Vec<MetricRow> = read_parquet(&run.join("metrics.parquet")).unwrap();
    let val: Vec<&MetricRow> = metrics
        .iter()
        .filter(|m| m.split == "val" && m.name == "loss" && m.stage == "train-sft")
        .collect();
    assert_eq!(val.len(), 25, "one validation per epoch");
    assert!(
        val.last().unwrap().value < 0.5 * val[0].value,
        "val loss {} -> {}",
        val[0].value,
        val.last().unwrap().value
    );
    assert!(metrics.iter().all(|m| m.value.is_finite()));
    assert!(
        metrics.iter().any(|m| m.name == "lr") && metrics.iter().any(|m| m.name == "grad_norm")
    );
    assert!(run.join("train-sft/best/model.safetensors").is_file());
    assert!(run.join("train-sft/last/state.json").is_file());

    let gens: Vec<GenerationRow> = read_parquet(&run.join("generations.parquet")).unwrap();
    let (stories, images): (Vec<&GenerationRow>, Vec<&GenerationRow>) =
        gens.iter().partition(|g| g.dataset == "synthetic_stories");
    assert_eq!(
        images.len(),
        (7 * 2 + 2) * 64,
        "untrained, train-sft, train-dpo, train-orpo, train-dico, train-scst and train-rlhf greedy and beam, train-diffusion and refine-diffusion by diffusion; 64 val images"
    );
    assert!(images
        .iter()
        .all(|g| g.split == "val" && g.dataset == "synthetic"));
    // The story model, greedy and beam, and the copy-last baseline on the 8 held-out
    // stories' frames 4 and 5.
    assert_eq!(stories.len(), 3 * 16, "{:?}", stories.first());
    assert!(stories
        .iter()
        .all(|g| g.split == "val" && ["train-story", "copy-last"].contains(&g.model.as_str())));

    let s: Vec<SummaryRow> = read_parquet(&run.join("scores_summary.parquet")).unwrap();
    for method in ["greedy", "beam3"] {
        let trained = summary(&s, "train-sft", method, "attribute_accuracy");
        let untrained = summary(&s, "untrained", method, "attribute_accuracy");
        assert!(
            trained > untrained + 0.3 && trained > 0.4,
            "{method}: attribute accuracy {untrained} -> {trained}"
        );
        let (tc, uc) = (
            summary(&s, "train-sft", method, "CIDEr"),
            summary(&s, "untrained", method, "CIDEr"),
        );
        assert!(tc > uc + 1.0, "{method}: CIDEr {uc} -> {tc}");
    }
    let per: Vec<ScoreRow> = read_parquet(&run.join("scores.parquet")).unwrap();
    assert_eq!(per.len(), gens.len());
    assert!(per
        .iter()
        .all(|r| r.clip_score.is_some_and(|c| (0.0..=2.5).contains(&c))));

    // The report stage: tables (Parquet + CSV) and loss curves of the run.
    assert!(log.contains("step report: done"), "{log}");
    let report = run.join("report");
    let training = std::fs::read_to_string(report.join("training.csv")).unwrap();
    let header = training.lines().next().unwrap();
    for col in [
        "run_id",
        "stage",
        "steps",
        "final_val_loss",
        "best_val_loss",
        "final_train_loss",
    ] {
        assert!(header.contains(col), "{header}");
    }
    assert!(
        training.lines().any(|l| l.contains("train-sft")),
        "{training}"
    );
    // Stage 1 against the pretrained tiny CLIP: its held-out retrieval beside the CLIP text
    // tower's on the same pairs (both near the ceiling of those image features).
    let retrieval = std::fs::read_to_string(report.join("retrieval.csv")).unwrap();
    let header: Vec<&str> = retrieval.lines().next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let row = |encoder: &str| -> Vec<f64> {
        let line = retrieval
            .lines()
            .find(|l| {
                l.split(',')
                    .nth(col("encoder"))
                    .is_some_and(|e| e.starts_with(encoder))
            })
            .unwrap_or_else(|| panic!("{encoder}:\n{retrieval}"));
        let cells: Vec<&str> = line.split(',').collect();
        ["i2t_r1", "t2i_r1", "chance_r1"]
            .iter()
            .map(|c| cells[col(c)].parse().unwrap())
            .collect()
    };
    let (trained, clip) = (row("train-contrastive (step"), row("clip"));
    assert!(
        trained[0] > 5.0 * trained[2] && trained[1] > 5.0 * trained[2],
        "{retrieval}"
    );
    assert!(trained[0] >= 0.8 * clip[0], "{retrieval}");
    let scores = std::fs::read_to_string(report.join("scores.csv")).unwrap();
    assert!(
        scores
            .lines()
            .next()
            .unwrap()
            .contains("attribute_accuracy"),
        "{scores}"
    );
    // SFT, DPO, ORPO, DiCO and SCST side by side: one row per model and method, every metric filled.
    let header: Vec<&str> = scores.lines().next().unwrap().split(',').collect();
    let rows: Vec<Vec<&str>> = scores
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    let model_col = header.iter().position(|c| *c == "model").unwrap();
    for model in [
        "untrained",
        "train-sft",
        "train-dpo",
        "train-orpo",
        "train-dico",
        "train-scst",
        "train-rlhf",
    ] {
        let of_model: Vec<&Vec<&str>> = rows.iter().filter(|r| r[model_col] == model).collect();
        assert_eq!(of_model.len(), 2, "{model}: greedy and beam rows\n{scores}");
        for metric in ["attribute_accuracy", "CIDEr", "CLIPScore", "METEOR"] {
            let c = header.iter().position(|h| *h == metric).unwrap();
            assert!(
                of_model
                    .iter()
                    .all(|r| r[c].parse::<f64>().is_ok_and(f64::is_finite)),
                "{model} {metric}\n{scores}"
            );
        }
    }
    assert!(
        training.lines().any(|l| l.contains("train-dpo"))
            && training.lines().any(|l| l.contains("train-orpo")),
        "{training}"
    );
    // Held-out preference accuracy per corruption kind, for DPO and ORPO.
    let preference = std::fs::read_to_string(report.join("preference.csv")).unwrap();
    for stage in ["train-dpo", "train-orpo"] {
        for kind in ["colour", "shape", "relation", "vague"] {
            assert!(
                preference
                    .lines()
                    .any(|l| l.contains(stage) && l.contains(&format!("synthetic:{kind},"))),
                "{stage} {kind}\n{preference}"
            );
        }
    }
    assert!(report.join("training.parquet").is_file() && report.join("scores.parquet").is_file());
    let run_id = run.file_name().unwrap().to_string_lossy().into_owned();
    for family in ["loss", "preference"] {
        let png = report.join(format!("{family}-{run_id}-train-dpo.png"));
        let img = image::open(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
        assert_eq!((img.width(), img.height()), (720, 440));
        assert!(report
            .join(format!("{family}-{run_id}-train-dpo.svg"))
            .is_file());
    }
    assert!(report
        .join(format!("retrieval-{run_id}-train-contrastive.png"))
        .is_file());
    // The page: every held-out image once, with every model's captions under it, and the
    // 16 story target frames with the story model's and copy-last's.
    let html = std::fs::read_to_string(report.join("index.html")).unwrap();
    assert_eq!(html.matches("<div class=\"entry\"").count(), 64 + 16);
    assert_eq!(
        html.matches("<tr class=\"caption\">").count(),
        (7 * 2 + 2) * 64 + 3 * 16
    );
    assert_eq!(html.matches("data:image/jpeg;base64,").count(), 64 + 16);

    // Caption a folder of images with the model trained above (found in the earlier run).
    let imgs = work.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-tiny/images");
    for i in 0..2 {
        std::fs::copy(
            fixtures.join(format!("img{i}.png")),
            imgs.join(format!("img{i}.png")),
        )
        .unwrap();
    }
    let (out, log) = pipeline(
        &[
            "run",
            "generate",
            "--set",
            "generate.images=\"imgs\"",
            "--set",
            "generate.models=[\"train-sft\"]",
            "--set",
            "generate.methods=[\"sample\"]",
            "--set",
            "generate.json=true",
        ],
        work,
    );
    assert!(out.status.success(), "{log}");
    let run2 = newest_run(work);
    assert_ne!(run, run2);
    let gens: Vec<GenerationRow> = read_parquet(&run2.join("generations.parquet")).unwrap();
    let keys: Vec<&str> = gens.iter().map(|g| g.image_key.as_str()).collect();
    assert_eq!(keys, ["img0.png", "img1.png"]);
    assert!(gens
        .iter()
        .all(|g| g.model == "train-sft" && g.method == "top_p0.9_t1"));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run2.join("generations.json")).unwrap()).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
}

#[test]
fn generate_without_a_trained_model_says_what_to_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, log) = pipeline(
        &["run", "ingest", "--set", "ingest.synthetic.train_images=16"],
        tmp.path(),
    );
    assert!(out.status.success(), "{log}");
    let (out, log) = pipeline(
        &[
            "run",
            "embed",
            "--set",
            "clip.model=tiny",
            "--set",
            "embed.datasets=[\"synthetic\"]",
        ],
        tmp.path(),
    );
    assert!(out.status.success(), "{log}");
    let (out, log) = pipeline(
        &[
            "run",
            "generate",
            "--set",
            "clip.model=tiny",
            "--set",
            "captioner.dataset=synthetic",
            "--set",
            "captioner.decoder=tiny",
            "--set",
            "generate.models=[\"train-sft\"]",
        ],
        tmp.path(),
    );
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("pipeline run train-sft"), "{log}");
    // The run's record names the failed step and why.
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(newest_run(tmp.path()).join("run.json")).unwrap())
            .unwrap();
    let step = &record["steps"][0];
    assert_eq!(step[0], "generate", "{record}");
    assert_eq!(step[1]["outcome"], "failed", "{record}");
    assert!(
        step[1]["error"]
            .as_str()
            .unwrap()
            .contains("pipeline run train-sft"),
        "{record}"
    );
}

#[test]
fn pipeline_score_scores_external_coco_files() {
    let tmp = tempfile::tempdir().unwrap();
    let refs = tmp.path().join("refs.json");
    let cands = tmp.path().join("cands.json");
    std::fs::write(
        &refs,
        r#"{"annotations": [{"image_id": 1, "caption": "A red circle above a blue square."},
                            {"image_id": 1, "caption": "a blue square below a red circle"},
                            {"image_id": 2, "caption": "Two dogs play in the snow."}]}"#,
    )
    .unwrap();
    std::fs::write(&cands, r#"[{"image_id": 1, "caption": "a red circle above a blue square"}, {"image_id": 2, "caption": "a cat"}]"#).unwrap();
    let (out, log) = pipeline(
        &[
            "score",
            "--refs",
            "refs.json",
            "--cands",
            "cands.json",
            "--out",
            "per.csv",
        ],
        tmp.path(),
    );
    assert!(out.status.success(), "{log}");
    for m in ["Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"] {
        assert!(log.contains(m), "{log}");
    }
    let csv = std::fs::read_to_string(tmp.path().join("per.csv")).unwrap();
    let row1: Vec<f64> = csv
        .lines()
        .nth(1)
        .unwrap()
        .split(',')
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    assert!(
        [0, 4, 5].iter().all(|&i| (row1[i] - 1.0).abs() < 1e-6),
        "exact match: BLEU-1, METEOR and ROUGE-L are 1: {csv}"
    );
    std::fs::write(&cands, r#"[{"image_id": 1, "caption": "x"}]"#).unwrap();
    let (out, log) = pipeline(
        &["score", "--refs", "refs.json", "--cands", "cands.json"],
        tmp.path(),
    );
    assert!(
        !out.status.success() && log.contains("no candidate for image_id 2"),
        "{log}"
    );
}
