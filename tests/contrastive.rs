//! Contrastive stage 1 end to end: `pipeline run contrastive` on the synthetic world.

mod common;

use common::{newest_run, pipeline};
use prefcap::data::records::MetricRow;
use prefcap::data::shard::read_parquet;

/// The value of validation metric `name` of train-contrastive at `step` (`None`: the last).
fn val(rows: &[MetricRow], name: &str, step: Option<i64>) -> f64 {
    rows.iter()
        .filter(|r| r.stage == "train-contrastive" && r.split == "val" && r.name == name)
        .filter(|r| step.is_none_or(|s| r.step == s))
        .map(|r| r.value)
        .next_back()
        .unwrap_or_else(|| panic!("no val {name} at {step:?}"))
}

/// Against a frozen CLIP that never trained (its text tower is at chance), the GPT-2 text
/// encoder and the projections learn the alignment: held-out recall both ways far above
/// chance and above the CLIP text tower on the same pairs; the best checkpoint and the
/// manifest that rebuilds it are written; the report has the retrieval table. The pipeline's
/// cross-attention captioner starts from stage 1's image head and goes through SFT, DPO and
/// generation (a few epochs here: the learning is measured by the pipeline itself). Without
/// the image features, the stage says to run embed.
#[test]
fn stage_one_learns_an_alignment_the_frozen_clip_text_tower_does_not_have() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();

    let sizes = [
        "--set",
        "ingest.synthetic.train_images=512",
        "--set",
        "ingest.synthetic.val_images=128",
    ];
    let (out, log) = pipeline(&[&["run", "ingest"][..], &sizes].concat(), work);
    assert!(out.status.success(), "{log}");
    let (out, log) = pipeline(
        &[
            "run",
            "train-contrastive",
            "--set",
            "clip.model=tiny",
            "--set",
            "captioner.dataset=synthetic",
            "--set",
            "train_contrastive.text_encoder=tiny",
        ],
        work,
    );
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("pipeline run embed"), "{log}");

    let bert = format!(
        "score.bertscore_model={}",
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/bertscore/bert-tiny")
            .display()
    );
    let (out, log) = pipeline(
        &[
            &[
                "run",
                "contrastive",
                "--set",
                &bert,
                "--set",
                "score.bertscore_layer=1",
                "--set",
                "train_contrastive.epochs=10",
                "--set",
                "captioner.max_train_samples=0",
                "--set",
                "train_sft.epochs=3",
                "--set",
                "train_dpo.epochs=1",
                "--set",
                "generate.methods=[\"greedy\"]",
            ][..],
            &sizes,
        ]
        .concat(),
        work,
    );
    assert!(out.status.success(), "{log}");
    let run = newest_run(work);
    let rows: Vec<MetricRow> = read_parquet(&run.join("metrics.parquet")).unwrap();
    let best = rows
        .iter()
        .filter(|r| r.stage == "train-contrastive" && r.split == "val" && r.name == "loss")
        .min_by(|a, b| a.value.total_cmp(&b.value))
        .unwrap()
        .step;
    let chance = val(&rows, "retrieval/chance_r1", Some(best));
    let (i2t, t2i) = (
        val(&rows, "retrieval/i2t_r1", Some(best)),
        val(&rows, "retrieval/t2i_r1", Some(best)),
    );
    let clip_i2t = val(&rows, "retrieval/clip/i2t_r1", None);
    assert!(chance < 0.02, "{chance}");
    assert!(
        i2t > 5.0 * chance && t2i > 5.0 * chance,
        "{i2t} {t2i} vs chance {chance}"
    );
    assert!(
        i2t > clip_i2t + 0.05,
        "{i2t} vs the CLIP text tower's {clip_i2t}"
    );
    for k in ["i2t_r5", "i2t_r10", "t2i_r5", "t2i_r10"] {
        let v = val(&rows, &format!("retrieval/{k}"), Some(best));
        assert!((i2t.min(t2i)..=1.0).contains(&v), "{k} {v}");
    }
    // Validation loss fell.
    let losses: Vec<f64> = rows
        .iter()
        .filter(|r| r.stage == "train-contrastive" && r.split == "val" && r.name == "loss")
        .map(|r| r.value)
        .collect();
    assert!(losses.last().unwrap() < &(0.9 * losses[0]), "{losses:?}");

    let dir = run.join("train-contrastive");
    assert!(dir.join("best/model.safetensors").is_file());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("contrastive.json")).unwrap()).unwrap();
    assert_eq!(manifest["spec"]["projection_dim"], 64);
    assert_eq!(manifest["clip_model"], "tiny");

    // Stage 2: the cross-attention captioner started from stage 1's image head, trained,
    // aligned and decoded like any captioner.
    let sft = run.join("train-sft");
    let captioner: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sft.join("captioner.json")).unwrap()).unwrap();
    assert_eq!(captioner["captioner"]["conditioning"], "cross_attention");
    assert_eq!(captioner["captioner"]["image_encoder"], "contrastive");
    assert_eq!(captioner["image_head"]["spec"]["projection_dim"], 64);
    let gens: Vec<prefcap::data::records::GenerationRow> =
        read_parquet(&run.join("generations.parquet")).unwrap();
    assert_eq!(
        gens.len(),
        3 * 128,
        "untrained, train-sft, train-dpo on 128 images"
    );
    assert!(gens
        .iter()
        .filter(|g| g.model != "untrained")
        .all(|g| !g.caption.is_empty()));
    // score's BERTScore, with a BERT checkpoint from a local directory.
    let scores: Vec<prefcap::data::records::ScoreRow> =
        read_parquet(&run.join("scores.parquet")).unwrap();
    assert_eq!(scores.len(), gens.len());
    assert!(scores.iter().all(
        |r| r.bertscore_f1.is_some_and(|f| (-1.0..=1.0).contains(&f))
            && r.bertscore_p.is_some()
            && r.bertscore_r.is_some()
    ));
    // The report says which captioner each row is.
    let scores_csv = std::fs::read_to_string(run.join("report/scores.csv")).unwrap();
    assert!(
        scores_csv
            .lines()
            .any(|l| l.contains(",train-sft,cross_attention (contrastive),")),
        "{scores_csv}"
    );
    let table = std::fs::read_to_string(run.join("report/retrieval.csv")).unwrap();
    assert!(table.lines().any(|l| l.contains(",clip,")), "{table}");
    assert!(
        table.lines().any(|l| l.contains("train-contrastive (step")),
        "{table}"
    );
}
