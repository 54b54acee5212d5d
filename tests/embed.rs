//! The embed stage and the feature cache from the outside: cache hits without loading the
//! model, recomputing only changed shards, repairing corrupt entries, resuming after a kill,
//! loading a checkpoint through hf-hub from a mock hub, and `pipeline embed` on a user's
//! own files with parity against Hugging Face's reference embeddings.

mod common;
use common::pipeline;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use prefcap::data::features::{FeatureCache, FeatureEntry};
use prefcap::data::hub::HubClient;
use prefcap::data::hub::HubConfig;
use prefcap::data::records::ImageTextSample;
use prefcap::data::shard::{read_parquet, write_parquet, ShardSet};
use prefcap::datasets::embedding::EmbedSummary;
use prefcap::imaging::preprocess::preprocess_bytes;
use prefcap::models::clip::{l2_normalize, ClipEmbedder, ClipModelFiles};
use prefcap::pipeline::config::Config;
use prefcap::pipeline::run_stage;
use prefcap::stages::embed::Embed;
use prefcap::stages::ingest::Ingest;
use prefcap::testkit::loopback::MockHub;

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf-tiny")
        .join(p)
}

/// A small synthetic world (3 image shards, 2 story shards) embedded with the tiny CLIP.
fn small_config() -> Config {
    Config::load(
        None,
        None,
        &[
            "ingest.synthetic.train_images=32".into(),
            "ingest.synthetic.val_images=8".into(),
            "ingest.synthetic.shard_size=16".into(),
            "ingest.synthetic.image_size=64".into(),
            "ingest.synthetic.train_stories=2".into(),
            "ingest.synthetic.val_stories=1".into(),
            "ingest.synthetic.frames_per_story=5".into(),
            "clip.model=\"tiny\"".into(),
            "embed.datasets=[\"synthetic\", \"synthetic_stories\"]".into(),
            "embed.batch_size=8".into(),
            "run.workers=2".into(),
        ],
    )
    .unwrap()
}

/// The verified feature entries of `dataset/split` under `cfg`'s `[clip]`.
fn features(
    cfg: &Config,
    work: &Path,
    dataset: &str,
    split: &str,
    modality: &str,
) -> prefcap::Result<Vec<FeatureEntry>> {
    let ctx = cfg.context(work, "test");
    ctx.split_features(&ctx.clip, dataset, split, modality)
}

fn shards(workdir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for (ds, split) in [
        ("synthetic", "train"),
        ("synthetic", "val"),
        ("synthetic_stories", "train"),
        ("synthetic_stories", "val"),
    ] {
        let set = ShardSet::new(workdir, ds, split);
        out.extend(
            set.finished()
                .unwrap()
                .into_iter()
                .map(|s| set.parquet_path(s)),
        );
    }
    out
}

fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(all_files(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out.sort();
    out
}

fn manifests(workdir: &Path) -> Vec<PathBuf> {
    all_files(FeatureCache::new(workdir).root())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect()
}

#[test]
fn embed_caches_reuses_recomputes_changes_and_repairs_corruption() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let cfg = small_config();
    run_stage::<Ingest>(&cfg, work).unwrap();
    let n_shards = shards(work).len();
    assert!(n_shards >= 4, "{n_shards} shards");

    let first = run_stage::<Embed>(&cfg, work).unwrap();
    assert_eq!(first.computed, 2 * n_shards, "{first:?}");
    assert!(first.model_loaded);
    assert_eq!(first.cached, 0);
    assert!(first.images > 0 && first.texts == first.images, "{first:?}");

    // Unchanged inputs: a no-op that says so and never builds the model.
    let again = run_stage::<Embed>(&cfg, work).unwrap();
    assert_eq!(
        again,
        EmbedSummary {
            cached: 2 * n_shards,
            ..Default::default()
        }
    );
    assert!(again.to_string().starts_with("cached"), "{again}");

    // One shard changes (a caption edited): only its two entries are recomputed.
    let changed = ShardSet::new(work, "synthetic", "train").parquet_path(1);
    let mut rows: Vec<ImageTextSample> = read_parquet(&changed).unwrap();
    rows[0].caption = "a purple triangle below a green circle".into();
    write_parquet(&changed, &rows).unwrap();
    let partial = run_stage::<Embed>(&cfg, work).unwrap();
    assert_eq!(
        (partial.computed, partial.cached),
        (2, 2 * n_shards - 2),
        "{partial:?}"
    );
    assert_eq!(partial.images, rows.len() as u64);

    // A bit flip in a cached file is detected and the entry recomputed.
    let entries = features(&cfg, work, "synthetic", "val", "image").unwrap();
    let victim = &entries[0].path;
    let mut bytes = std::fs::read(victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(victim, &bytes).unwrap();
    let repaired = run_stage::<Embed>(&cfg, work).unwrap();
    assert_eq!(
        (repaired.repaired, repaired.computed),
        (1, 1),
        "{repaired:?}"
    );

    // A run killed before an entry's manifest was written: that entry alone is redone, and
    // its leftover temporary file is swept.
    let manifest = entries[0].path.with_extension("json");
    std::fs::remove_file(&manifest).unwrap();
    let stray = entries[0]
        .path
        .with_file_name(format!(".{}.tmp-99999", entries[0].manifest.digest));
    std::fs::write(&stray, b"partial").unwrap();
    let resumed = run_stage::<Embed>(&cfg, work).unwrap();
    assert_eq!((resumed.computed, resumed.cached), (1, 2 * n_shards - 1));
    assert!(!stray.exists());
    assert!(manifest.exists());
}

/// The cache holds, under each sample's key, exactly the embedding the model gives that
/// sample's image and caption.
#[test]
fn cached_rows_are_the_model_outputs_of_their_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let cfg = small_config();
    run_stage::<Ingest>(&cfg, work).unwrap();
    run_stage::<Embed>(&cfg, work).unwrap();
    let images = features(&cfg, work, "synthetic", "train", "image").unwrap();
    let texts = features(&cfg, work, "synthetic", "train", "text").unwrap();
    assert_eq!(images.len(), 2);

    let ctx = cfg.context(work, "test");
    let files = ctx.clip_files(&ctx.clip).unwrap();
    let model = ClipEmbedder::load(&files, &Device::Cpu, DType::F32).unwrap();
    let shard = ShardSet::new(work, "synthetic", "train").parquet_path(1);
    let rows: Vec<ImageTextSample> = read_parquet(&shard).unwrap();
    let (img, txt) = (images[1].open().unwrap(), texts[1].open().unwrap());
    let keys: Vec<String> = rows.iter().map(|r| r.key.clone()).collect();
    assert_eq!(img.keys(), keys);
    assert_eq!(txt.keys(), keys);
    let dim = img.dim;
    assert_eq!(dim, 64);
    for i in [0, 7, rows.len() - 1] {
        let px = preprocess_bytes(rows[i].image.as_ref().unwrap(), &model.preprocess).unwrap();
        let want: Vec<f32> = model
            .embed_pixels(&px, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got = &img.embeddings()[i * dim..(i + 1) * dim];
        let diff = want
            .iter()
            .zip(got)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "image row {i}: max diff {diff}");
        let want: Vec<f32> = model
            .embed_texts(&[rows[i].caption.as_str()])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got = &txt.embeddings()[i * dim..(i + 1) * dim];
        let diff = want
            .iter()
            .zip(got)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "text row {i}: max diff {diff}");
    }

    // Story frames are keyed `<story_id>:<frame_index>`.
    let stories = features(&cfg, work, "synthetic_stories", "train", "image").unwrap();
    let keys = stories[0].open().unwrap().keys();
    assert_eq!(keys[0], "syn-story-train-0000:0");

    // The files are plain Arrow IPC files, readable by any Arrow reader.
    let file = std::fs::File::open(&images[0].path).unwrap();
    let reader = arrow::ipc::reader::FileReader::try_new(file, None).unwrap();
    let schema = reader.schema();
    assert_eq!(schema.field(0).name(), "key");
    assert_eq!(
        schema.field(0).data_type(),
        &arrow::datatypes::DataType::Utf8
    );
    assert_eq!(
        schema.field(1).data_type(),
        &arrow::datatypes::DataType::FixedSizeList(
            std::sync::Arc::new(arrow::datatypes::Field::new(
                "item",
                arrow::datatypes::DataType::Float32,
                false
            )),
            64
        )
    );
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows as u64, images[0].manifest.rows);
}

/// Image batches are fixed by stream position, not by which decode worker finishes first, so
/// the cached numbers are bit-identical whatever the worker count and timing (a GEMM's
/// rounding can depend on its row count).
#[test]
fn image_embeddings_are_bit_identical_across_worker_counts() {
    let embed_with = |workers: usize| {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = small_config();
        for set in [
            format!("run.workers={workers}"),
            "embed.batch_size=64".into(),
            "ingest.synthetic.train_images=192".into(),
            "ingest.synthetic.shard_size=64".into(),
        ] {
            cfg.set(&set).unwrap();
        }
        run_stage::<Ingest>(&cfg, tmp.path()).unwrap();
        run_stage::<Embed>(&cfg, tmp.path()).unwrap();
        let mut all = Vec::new();
        for (ds, split) in [
            ("synthetic", "train"),
            ("synthetic", "val"),
            ("synthetic_stories", "train"),
        ] {
            for entry in features(&cfg, tmp.path(), ds, split, "image").unwrap() {
                let table = entry.open().unwrap();
                all.push((table.keys(), table.embeddings()));
            }
        }
        all
    };
    let one = embed_with(1);
    assert!(one.iter().map(|(k, _)| k.len()).sum::<usize>() >= 40);
    for workers in [2, 3] {
        let other = embed_with(workers);
        assert_eq!(one.len(), other.len());
        for ((ka, ea), (kb, eb)) in one.iter().zip(&other) {
            assert_eq!(ka, kb);
            let same = ea.iter().zip(eb).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{workers} workers changed the embeddings of {:?}",
                ka[0]
            );
        }
    }
}

/// `embed.image_tokens`: each image shard gains a token entry (f16 by default) holding, under
/// each sample's key, the model's tokens of that image; it is reused, recomputed when its
/// shard changes and when `clip.tokens_dtype` changes, and a missing one is an error that says
/// how to make it.
#[test]
fn image_tokens_are_cached_per_shard_and_invalidated_like_the_pooled_features() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let cfg = small_config();
    run_stage::<Ingest>(&cfg, work).unwrap();
    let err = features(&cfg, work, "synthetic", "val", "image_tokens")
        .unwrap_err()
        .to_string();
    assert!(err.contains("embed.image_tokens = true"), "{err}");
    let mut with_tokens = cfg.clone();
    with_tokens.set("embed.image_tokens=true").unwrap();
    let first = run_stage::<Embed>(&with_tokens, work).unwrap();
    let image_shards = ShardSet::new(work, "synthetic", "train")
        .finished()
        .unwrap()
        .len()
        + ShardSet::new(work, "synthetic", "val")
            .finished()
            .unwrap()
            .len()
        + ShardSet::new(work, "synthetic_stories", "train")
            .finished()
            .unwrap()
            .len()
        + ShardSet::new(work, "synthetic_stories", "val")
            .finished()
            .unwrap()
            .len();
    assert_eq!(first.computed, 3 * image_shards, "{first:?}");
    assert_eq!(first.image_tokens, first.images, "{first:?}");

    let ctx = with_tokens.context(work, "test");
    let identity = ctx.feature_identity(&ctx.clip).unwrap();
    let (t, h) = identity.token_shape();
    let entries = features(&with_tokens, work, "synthetic", "val", "image_tokens").unwrap();
    let pooled = features(&with_tokens, work, "synthetic", "val", "image").unwrap();
    assert_eq!(entries[0].manifest.key.dim, t * h);
    assert_eq!(
        entries[0].manifest.key.dtype,
        prefcap::data::features::CacheDtype::F16
    );
    let table = entries[0].open().unwrap();
    assert_eq!(table.keys(), pooled[0].open().unwrap().keys());
    // Row i holds the model's tokens of sample i's image (to f16 rounding).
    let model = ctx.load_clip(&identity).unwrap();
    let samples: Vec<ImageTextSample> =
        read_parquet(&work.join(&entries[0].manifest.key.source)).unwrap();
    let keys = table.keys();
    let values = table.embeddings();
    for (row, key) in keys.iter().enumerate().take(3) {
        let sample = samples.iter().find(|s| &s.key == key).unwrap();
        let px = preprocess_bytes(sample.image.as_ref().unwrap(), &model.preprocess).unwrap();
        let size = model.config.vision_config.image_size;
        let x = candle_core::Tensor::from_vec(px, (1, 3, size, size), &Device::Cpu).unwrap();
        let want: Vec<f32> = model
            .image_tokens_tensor(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got = &values[row * t * h..(row + 1) * t * h];
        let diff = max_diff(got, &want);
        assert!(diff < 2e-2, "{key}: {diff}");
    }

    // What generate and sample-pairs read for a token captioner: the tokens of the images
    // they name, in that order; an image without tokens is named.
    let mut cap = ctx.captioner.clone();
    cap.conditioning = prefcap::models::captioner::Conditioning::CrossAttention;
    let two = vec![keys[1].clone(), keys[0].clone()];
    let got = ctx
        .image_tokens_for(&cap, &ctx.clip, "synthetic", "val", &two)
        .unwrap();
    assert_eq!(&got[..t * h], &values[t * h..2 * t * h]);
    let err = ctx
        .image_tokens_for(
            &cap,
            &ctx.clip,
            "synthetic",
            "val",
            &[keys[0].clone(), "syn-val-999999".into()],
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("syn-val-999999") && err.contains("image_tokens"),
        "{err}"
    );

    // Unchanged: cached; a changed shard redoes its three entries; another dtype redoes
    // every token entry and nothing else.
    let again = run_stage::<Embed>(&with_tokens, work).unwrap();
    assert_eq!((again.computed, again.cached), (0, 3 * image_shards));
    let changed = ShardSet::new(work, "synthetic", "train").parquet_path(1);
    let mut rows: Vec<ImageTextSample> = read_parquet(&changed).unwrap();
    rows[0].caption = "a purple triangle below a green circle".into();
    write_parquet(&changed, &rows).unwrap();
    let partial = run_stage::<Embed>(&with_tokens, work).unwrap();
    assert_eq!(partial.computed, 3, "{partial:?}");
    with_tokens.set("clip.tokens_dtype=\"f32\"").unwrap();
    let redo = run_stage::<Embed>(&with_tokens, work).unwrap();
    assert_eq!(
        (redo.computed, redo.cached),
        (image_shards, 2 * image_shards),
        "{redo:?}"
    );
}

#[test]
fn trainers_get_a_clear_error_when_features_are_missing_or_stale() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let cfg = small_config();
    run_stage::<Ingest>(&cfg, work).unwrap();
    let err = features(&cfg, work, "synthetic", "train", "image")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pipeline run embed") && err.contains("part-00000"),
        "{err}"
    );
    let err = run_stage::<Embed>(
        &Config::load(None, None, &["embed.datasets=[\"nothing\"]".into()]).unwrap(),
        work,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("run `pipeline run ingest` first"), "{err}");
}

fn reference() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture("reference/clip-embed.json")).unwrap()).unwrap()
}

fn rows(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn normalized(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn checkpoint_loads_through_hf_hub_from_a_mock_hub_and_matches_transformers() {
    let hub = MockHub::start().unwrap();
    let repo = "prefcap-test/clip-tiny";
    let revision = "0123456789abcdef0123456789abcdef01234567";
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
    ] {
        hub.add_model_file(
            repo,
            revision,
            f,
            std::fs::read(fixture(&format!("clip-tiny/{f}"))).unwrap(),
        );
    }
    let cache = tempfile::tempdir().unwrap();
    let hub_cfg = HubConfig {
        endpoint: hub.endpoint(),
        cache_dir: cache.path().display().to_string(),
    };
    let files = ClipModelFiles::resolve(repo, revision, || HubClient::new(&hub_cfg)).unwrap();
    assert_eq!(files.revision, revision);
    assert!(
        files.weights.starts_with(cache.path()),
        "{}",
        files.weights.display()
    );
    let log = hub.request_log();
    assert!(
        log.iter()
            .any(|l| l.starts_with(&format!("GET /{repo}/resolve/{revision}/model.safetensors"))),
        "{}",
        log.join("\n")
    );
    let model = ClipEmbedder::load(&files, &Device::Cpu, DType::F32).unwrap();
    let r = reference();
    let texts = common::strings(&r["texts"]);
    let emb = l2_normalize(&model.embed_texts(&texts).unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (got, want) in emb.iter().zip(rows(&r["text_embeds"])) {
        assert!(max_diff(got, &want) < 1e-4);
    }

    // A missing file names the repo, revision and file.
    let err = ClipModelFiles::resolve("prefcap-test/absent", revision, || HubClient::new(&hub_cfg))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("prefcap-test/absent") && err.contains("config.json"),
        "{err}"
    );
}

/// The `modality, key, embedding` rows of a `pipeline embed --out` Parquet export.
fn read_export(path: &Path) -> Vec<(String, String, Vec<f32>)> {
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut got: Vec<(String, String, Vec<f32>)> = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let modality = batch
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap();
        let keys = batch
            .column(1)
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap();
        let emb = batch
            .column(2)
            .as_any()
            .downcast_ref::<arrow::array::FixedSizeListArray>()
            .expect("embedding is a fixed-size list");
        for i in 0..batch.num_rows() {
            let v = emb.value(i);
            let v = v
                .as_any()
                .downcast_ref::<arrow::array::Float32Array>()
                .unwrap();
            got.push((
                modality.value(i).into(),
                keys.value(i).into(),
                v.values().to_vec(),
            ));
        }
    }
    got
}

/// `pipeline embed` on the fixture PNGs and texts, exported to Parquet: the embeddings equal
/// Hugging Face's (preprocessing included), and a second call is served from the cache.
#[test]
fn pipeline_embed_on_user_files_matches_transformers_and_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let images = work.join("imgs");
    std::fs::create_dir_all(images.join("sub")).unwrap();
    for i in 0..4 {
        let dest = if i == 3 {
            images.join("sub/img3.png")
        } else {
            images.join(format!("img{i}.png"))
        };
        std::fs::copy(fixture(&format!("images/img{i}.png")), dest).unwrap();
    }
    std::fs::write(images.join("notes.txt"), "not an image").unwrap();
    let r = reference();
    let texts = common::strings(&r["texts"]);
    std::fs::write(work.join("texts.txt"), texts.join("\n")).unwrap();
    let model = fixture("clip-tiny");
    let args = [
        "embed",
        "--images",
        "imgs",
        "--texts",
        "texts.txt",
        "--model",
        model.to_str().unwrap(),
        "--out",
        "emb.parquet",
    ];
    let (out, log) = pipeline(&args, work);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("2 entries computed"), "{log}");

    let got = read_export(&work.join("emb.parquet"));
    let keys: Vec<&str> = got.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "img0.png",
            "img1.png",
            "img2.png",
            "sub/img3.png",
            "line-1",
            "line-2",
            "line-3"
        ]
    );
    let want_images = rows(&r["image_embeds"]);
    for (i, want) in want_images.iter().enumerate() {
        assert_eq!(got[i].0, "image");
        let d = max_diff(&normalized(&got[i].2), want);
        assert!(d < 1e-4, "image {i}: max abs diff {d} vs transformers");
    }
    for (i, want) in rows(&r["text_embeds"]).iter().enumerate() {
        assert_eq!(got[4 + i].0, "text");
        let d = max_diff(&normalized(&got[4 + i].2), want);
        assert!(d < 1e-4, "text {i}: max abs diff {d} vs transformers");
    }

    let (out, log) = pipeline(&args, work);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("cached: all 2 feature entries are up to date"),
        "{log}"
    );

    // Arrow IPC export.
    let out_at = args.iter().position(|a| *a == "emb.parquet").unwrap();
    let mut ipc_args = args.to_vec();
    ipc_args[out_at] = "emb.arrow";
    let (out, log) = pipeline(&ipc_args, work);
    assert!(out.status.success(), "{log}");
    let reader = arrow::ipc::reader::FileReader::try_new(
        std::fs::File::open(work.join("emb.arrow")).unwrap(),
        None,
    )
    .unwrap();
    assert_eq!(reader.map(|b| b.unwrap().num_rows()).sum::<usize>(), 7);

    // transformers' torchvision backend: its preprocessing is part of the image entry's key,
    // so that entry is recomputed and the texts' is reused; the embeddings are the model's
    // output for the pixels transformers' torchvision processor makes of the same files.
    let mut tv_args = args.to_vec();
    tv_args[out_at] = "emb-tv.parquet";
    tv_args.extend(["--image-backend", "torchvision"]);
    let (out, log) = pipeline(&tv_args, work);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("1 entries computed"), "{log}");
    let tv = read_export(&work.join("emb-tv.parquet"));
    let tv_fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torchvision");
    let pixels = prefcap::testkit::npy::read_npy(&tv_fixture.join("pixel_values.npy")).unwrap();
    let versions: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tv_fixture.join("versions.json")).unwrap()).unwrap();
    let first = common::strings(&versions["files"])
        .iter()
        .position(|f| f.ends_with("hf-tiny/images/img0.png"))
        .unwrap();
    let per = pixels.data.len() / pixels.shape[0];
    let clip = ClipEmbedder::load(
        &ClipModelFiles::from_dir(&model).unwrap(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let want = l2_normalize(
        &clip
            .embed_pixels(&pixels.data[first * per..(first + 4) * per], 4)
            .unwrap(),
    )
    .unwrap()
    .to_vec2::<f32>()
    .unwrap();
    let mut backend_gap = 0f32;
    for i in 0..4 {
        assert_eq!(
            (tv[i].0.as_str(), tv[i].1.as_str()),
            (got[i].0.as_str(), got[i].1.as_str())
        );
        let d = max_diff(&normalized(&tv[i].2), &want[i]);
        assert!(
            d < 1e-5,
            "image {i}: max abs diff {d} vs the torchvision pixels"
        );
        backend_gap = backend_gap.max(max_diff(&normalized(&tv[i].2), &normalized(&got[i].2)));
    }
    assert!(backend_gap > 1e-6, "the backends gave the same embeddings");
    assert_eq!(
        tv[4..],
        got[4..],
        "texts do not depend on the image backend"
    );

    let (out, log) = pipeline(
        &[
            "embed",
            "--images",
            "missing-dir",
            "--model",
            model.to_str().unwrap(),
        ],
        work,
    );
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("missing-dir"), "{log}");
}

/// Kills `pipeline run embed` mid-way and runs it again: the cache ends complete and
/// bit-identical to an uninterrupted run's.
#[test]
fn killed_embed_run_resumes_to_the_same_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let sets = [
        "ingest.synthetic.train_images=256",
        "ingest.synthetic.val_images=32",
        "ingest.synthetic.shard_size=16",
        "ingest.synthetic.train_stories=2",
        "ingest.synthetic.val_stories=1",
        "clip.model=tiny",
        // Shards of 16 in batches of 5: a batch that crossed shards would make an entry's
        // bits depend on which shards the resumed run still had to do.
        "embed.batch_size=5",
        "embed.datasets=[\"synthetic\"]",
    ];
    let mut args = vec!["run", "ingest"];
    for s in &sets {
        args.extend(["--set", s]);
    }
    let (out, log) = pipeline(&args, work);
    assert!(out.status.success(), "{log}");
    args[1] = "embed";
    let mut child = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(&args)
        .current_dir(work)
        .env("PREFCAP_QUIET", "1")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while manifests(work).len() < 3 && started.elapsed().as_secs() < 120 {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = child.kill();
    child.wait().unwrap();
    let before = manifests(work).len();
    let (out, log) = pipeline(&args, work);
    assert!(out.status.success(), "{log}");
    let total = 2 * 18;
    assert_eq!(manifests(work).len(), total, "{log}");
    if before < total {
        assert!(
            log.contains(&format!("{} entries computed", total - before)),
            "killed with {before} done:\n{log}"
        );
    }

    // Same cache as a clean run elsewhere.
    let clean = tempfile::tempdir().unwrap();
    args[1] = "ingest";
    assert!(pipeline(&args, clean.path()).0.status.success());
    args[1] = "embed";
    assert!(pipeline(&args, clean.path()).0.status.success());
    let cfg_sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let cfg = Config::load(None, None, &cfg_sets).unwrap();
    for split in ["train", "val"] {
        let a: Vec<FeatureEntry> = features(&cfg, work, "synthetic", split, "image").unwrap();
        let b: Vec<FeatureEntry> =
            features(&cfg, clean.path(), "synthetic", split, "image").unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.manifest.digest, y.manifest.digest);
            let source = &x.manifest.key.source;
            let (x, y) = (x.open().unwrap(), y.open().unwrap());
            assert_eq!(x.keys(), y.keys());
            assert_eq!(x.embeddings(), y.embeddings(), "{source}");
        }
    }
}
