//! The synthetic source of `pipeline run ingest`: the embedded world ([`crate::synthetic`])
//! planned from the seed and written as image–caption, preference-pair and story shards
//! through the one shard writer, resumably.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::records::{ImageTextSample, PreferencePair, Record, SampleStatus, StoryFrame};
use crate::data::shard::ShardStats;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::rng::SplitMix64;
use crate::stages::ingest::{Destination, SourceSummary, SplitSummary};
use crate::synthetic::{
    caption, draw_avoiding, pairs_for_image, random_layout, random_story, render_jpeg,
    story_caption, DrawnStory, Layout, IMAGES_DATASET, MIN_IMAGE_SIZE, PAIRS_DATASET,
    STORIES_DATASET,
};

/// `[ingest.synthetic]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticConfig {
    pub train_images: usize,
    pub val_images: usize,
    pub image_size: u32,
    pub shard_size: usize,
    pub pairs_per_image: usize,
    pub train_stories: usize,
    pub val_stories: usize,
    pub frames_per_story: usize,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            train_images: 256,
            val_images: 64,
            image_size: 64,
            shard_size: 128,
            pairs_per_image: 2,
            train_stories: 24,
            val_stories: 8,
            frames_per_story: 6,
        }
    }
}

/// An image to write: its key and layout.
struct PlannedImage {
    key: String,
    layout: Layout,
}

/// A story frame to write.
struct PlannedFrame {
    story_id: String,
    frame_index: i32,
    frame_count: i32,
    layout: Layout,
    caption: String,
}

fn validate(cfg: &SyntheticConfig) -> Result<()> {
    let bad = |m: String| Err(Error::Config(format!("ingest.synthetic.{m}")));
    if cfg.shard_size == 0 {
        return bad("shard_size must be at least 1".into());
    }
    if cfg.image_size < MIN_IMAGE_SIZE {
        return bad(format!(
            "image_size is {}, but shapes are not recognisable below {MIN_IMAGE_SIZE} pixels",
            cfg.image_size
        ));
    }
    let stories = cfg.train_stories + cfg.val_stories;
    if stories > 0 && cfg.frames_per_story == 0 {
        return bad("frames_per_story must be at least 1 when stories are requested".into());
    }
    if i32::try_from(cfg.frames_per_story).is_err() {
        return bad(format!(
            "frames_per_story is {}, more than a frame index can hold",
            cfg.frames_per_story
        ));
    }
    Ok(())
}

fn plan_images(seed: u64, split: &str, count: usize, avoid: &HashSet<Layout>) -> Vec<PlannedImage> {
    let mut rng = SplitMix64::derived(seed, &format!("images/{split}"));
    (0..count)
        .map(|i| PlannedImage {
            key: format!("syn-{split}-{i:06}"),
            layout: draw_avoiding(&mut rng, avoid, |l: &Layout| *l, random_layout),
        })
        .collect()
}

fn plan_pairs(
    seed: u64,
    split: &str,
    images: &[PlannedImage],
    per_image: usize,
) -> Vec<PreferencePair> {
    let mut rng = SplitMix64::derived(seed, &format!("pairs/{split}"));
    images
        .iter()
        .flat_map(|img| pairs_for_image(&img.key, &img.layout.scene, per_image, &mut rng))
        .collect()
}

/// Stories of `split`, flattened to frames, with their first layouts (so val can avoid
/// train's: two stories that start alike are too alike to sit on both sides of the split).
fn plan_stories(
    seed: u64,
    split: &str,
    count: usize,
    frames: usize,
    avoid: &HashSet<Layout>,
) -> (Vec<PlannedFrame>, HashSet<Layout>) {
    let mut rng = SplitMix64::derived(seed, &format!("stories/{split}"));
    // `validate` has checked that frame indices fit in i32.
    let frame_count = i32::try_from(frames).unwrap_or(i32::MAX);
    let mut starts = HashSet::new();
    let mut out = Vec::with_capacity(count * frames);
    for s in 0..count {
        let story = draw_avoiding(
            &mut rng,
            avoid,
            |d: &DrawnStory| d.start,
            |r| random_story(r, frames),
        );
        starts.insert(story.start);
        let story_id = format!("syn-story-{split}-{s:04}");
        for (i, (layout, change)) in story.frames.into_iter().enumerate() {
            out.push(PlannedFrame {
                story_id: story_id.clone(),
                frame_index: i32::try_from(i).unwrap_or(i32::MAX),
                frame_count,
                caption: story_caption(&layout.scene, change),
                layout,
            });
        }
    }
    (out, starts)
}

/// Writes the shards of one split, reusing finished ones. A finished shard is reused
/// only if its stats show the same row count and seed as planned: a run with another seed
/// or size in the same workdir regenerates instead of mixing worlds. Finished shards past
/// the planned ones (left by a larger earlier config) are removed so `read_all` sees
/// exactly this config's rows.
struct SplitWriter<'a> {
    out: Destination<'a>,
    shard_size: usize,
    source: String,
    progress: &'a Progress,
}

impl SplitWriter<'_> {
    fn write<T, R: Record>(
        &self,
        dataset: &str,
        split: &str,
        items: &[T],
        counts_as_images: bool,
        build: impl Fn(&T) -> Result<R>,
    ) -> Result<SplitSummary> {
        let set = self.out.set(dataset, split);
        set.prepare()?;
        let finished: BTreeSet<u32> = set.finished()?.into_iter().collect();
        let mut summary = SplitSummary {
            dataset: dataset.to_string(),
            split: split.to_string(),
            ..SplitSummary::default()
        };
        let planned = u32::try_from(items.len().div_ceil(self.shard_size)).map_err(|_| {
            Error::Config(format!(
                "ingest.synthetic: {dataset}/{split} needs more than {} shards; raise shard_size",
                u32::MAX
            ))
        })?;
        let sharding = self.out.sharding;
        sharding.plan_shards(set.rel(), &self.source, planned)?;
        for (i, chunk) in items.chunks(self.shard_size).enumerate() {
            let shard = u32::try_from(i).map_err(|_| {
                Error::Config(format!(
                    "ingest.synthetic: {dataset}/{split} needs more than {} shards; raise shard_size",
                    u32::MAX
                ))
            })?;
            if !sharding.owns(shard) {
                continue;
            }
            let count = chunk.len() as u64;
            let reusable = finished.contains(&shard)
                && set
                    .read_stats(shard)
                    .is_ok_and(|s| s.count == count && s.source == self.source);
            if reusable {
                summary.shards_skipped += 1;
                if counts_as_images {
                    self.progress.inc(count);
                }
            } else {
                let start = Instant::now();
                let mut rows = Vec::with_capacity(chunk.len());
                for item in chunk {
                    rows.push(build(item)?);
                    if counts_as_images {
                        self.progress.inc(1);
                    }
                }
                let stats = ShardStats {
                    shard,
                    count,
                    successes: count,
                    failures: BTreeMap::new(),
                    duration_secs: start.elapsed().as_secs_f64(),
                    source: self.source.clone(),
                    bytes: 0,
                };
                set.write(shard, &rows, &stats)?;
                summary.shards_written += 1;
            }
            summary.rows += count;
        }
        for &stale in finished.range(planned..).filter(|&&s| sharding.owns(s)) {
            set.remove(stale)?;
        }
        Ok(summary)
    }
}

/// Generates the synthetic world for `seed` into `workdir` (see the module docs for the
/// files and the caption grammar) and returns what each split holds.
///
/// Same `(cfg, seed)` gives byte-identical Parquet files: every choice comes from
/// [`SplitMix64`] streams derived from `seed` and a label (`images/train`, `images/val`,
/// `pairs/<split>`, `stories/<split>`), and rendering uses integer arithmetic only. Val is
/// drawn from its own streams and rejects any layout (and story start) that train has, so
/// it is held out. Preference pairs have an empty prompt (the image, `image_key`, is the
/// prompt) and scores 1.0 (chosen, the true caption) / 0.0 (rejected, a corrupted or vaguer
/// one); their `source` is `synthetic:<corruption>`.
/// The shards' provenance: the seed and a digest of every setting, so that a finished shard
/// is reused only when the same `(cfg, seed)` would write it again (image size, pairs per
/// image, or the train set that val avoids, all change shards of the same count).
fn source_of(cfg: &SyntheticConfig, seed: u64) -> String {
    let settings = serde_json::to_vec(cfg).expect("the synthetic config serialises");
    let digest = hex::encode(Sha256::digest(settings));
    format!("synthetic seed={seed} config-sha256={}", &digest[..16])
}

pub fn run(cfg: &SyntheticConfig, seed: u64, out: Destination) -> Result<SourceSummary> {
    let sharding = out.sharding;
    validate(cfg)?;
    let size = cfg.image_size;

    // Plan everything first (cheap); only shards that need writing are rendered.
    let train_images = plan_images(seed, "train", cfg.train_images, &HashSet::new());
    let train_layouts: HashSet<Layout> = train_images.iter().map(|i| i.layout).collect();
    let val_images = plan_images(seed, "val", cfg.val_images, &train_layouts);
    let (train_frames, train_starts) = plan_stories(
        seed,
        "train",
        cfg.train_stories,
        cfg.frames_per_story,
        &HashSet::new(),
    );
    let (val_frames, _) = plan_stories(
        seed,
        "val",
        cfg.val_stories,
        cfg.frames_per_story,
        &train_starts,
    );

    // The images of the shards this worker owns (all of them for a single process).
    let owned = |len: usize| -> u64 {
        (0..len.div_ceil(cfg.shard_size))
            .filter(|&s| sharding.owns(s as u32))
            .map(|s| (len - s * cfg.shard_size).min(cfg.shard_size) as u64)
            .sum()
    };
    let total = owned(cfg.train_images)
        + owned(cfg.val_images)
        + owned(train_frames.len())
        + owned(val_frames.len());
    let progress = Progress::new("synthetic", "images", Some(total));
    let writer = SplitWriter {
        out,
        shard_size: cfg.shard_size,
        source: source_of(cfg, seed),
        progress: &progress,
    };

    let mut splits = Vec::new();
    for (split, images) in [("train", &train_images), ("val", &val_images)] {
        splits.push(writer.write(IMAGES_DATASET, split, images, true, |img| {
            image_row(img, split, size)
        })?);
    }
    for (split, images) in [("train", &train_images), ("val", &val_images)] {
        let pairs = plan_pairs(seed, split, images, cfg.pairs_per_image);
        splits.push(writer.write(PAIRS_DATASET, split, &pairs, false, |p| Ok(p.clone()))?);
    }
    for (split, frames) in [("train", &train_frames), ("val", &val_frames)] {
        splits.push(writer.write(STORIES_DATASET, split, frames, true, |f| {
            Ok(StoryFrame {
                story_id: f.story_id.clone(),
                frame_index: f.frame_index,
                frame_count: f.frame_count,
                image: render_jpeg(
                    &f.layout,
                    size,
                    &format!("{} frame {}", f.story_id, f.frame_index),
                )?,
                caption: f.caption.clone(),
            })
        })?);
    }

    let written: usize = splits.iter().map(|s| s.shards_written).sum();
    let skipped: usize = splits.iter().map(|s| s.shards_skipped).sum();
    progress.finish(&format!(
        "({written} shards written, {skipped} already finished)"
    ));
    Ok(SourceSummary {
        source: "synthetic".to_string(),
        splits,
    })
}

fn image_row(img: &PlannedImage, split: &str, size: u32) -> Result<ImageTextSample> {
    let jpeg = render_jpeg(&img.layout, size, &img.key)?;
    Ok(ImageTextSample {
        key: img.key.clone(),
        url: format!("synthetic://{split}/{}", img.key),
        caption: caption(&img.layout.scene),
        status: SampleStatus::Success,
        error: None,
        width: Some(size),
        height: Some(size),
        original_width: Some(size),
        original_height: Some(size),
        sha256: Some(hex::encode(Sha256::digest(&jpeg))),
        image: Some(jpeg),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::fs;
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::data::partition::Sharding;
    use crate::data::shard::ShardSet;
    use crate::data::store::Root;
    use crate::synthetic::tests::{assert_grounded, decode};
    use crate::synthetic::{
        parse_caption, parse_story_caption, Change, Corruption, Direction, STORY_STEP,
    };

    /// The source run by one process into the local workdir `workdir`.
    fn run_local(cfg: &SyntheticConfig, seed: u64, workdir: &Path) -> Result<SourceSummary> {
        let root = Root::Local(workdir.to_path_buf());
        let sharding = Sharding::default();
        let out = Destination {
            workdir,
            root: &root,
            sharding: &sharding,
        };
        run(cfg, seed, out)
    }

    fn small_cfg() -> SyntheticConfig {
        SyntheticConfig {
            train_images: 10,
            val_images: 6,
            image_size: 64,
            shard_size: 4,
            pairs_per_image: 2,
            train_stories: 3,
            val_stories: 2,
            frames_per_story: 5,
        }
    }

    /// Every Parquet file under `root`, by path relative to it.
    fn parquet_files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, root, out);
                } else if path.extension().is_some_and(|e| e == "parquet") {
                    let rel = path.strip_prefix(root).unwrap().to_path_buf();
                    out.insert(rel, fs::read(&path).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(root, root, &mut out);
        out
    }

    #[test]
    fn run_writes_the_documented_files_with_the_configured_counts() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = small_cfg();
        let summary = run_local(&cfg, 42, tmp.path()).unwrap();
        assert_eq!(summary.source, "synthetic");
        let rows: Vec<(&str, &str, u64)> = summary
            .splits
            .iter()
            .map(|s| (s.dataset.as_str(), s.split.as_str(), s.rows))
            .collect();
        assert_eq!(
            rows,
            vec![
                ("synthetic", "train", 10),
                ("synthetic", "val", 6),
                ("synthetic_prefs", "train", 20),
                ("synthetic_prefs", "val", 12),
                ("synthetic_stories", "train", 15),
                ("synthetic_stories", "val", 10),
            ]
        );
        for s in &summary.splits {
            assert_eq!(
                s.shards_written,
                (s.rows as usize).div_ceil(cfg.shard_size),
                "{s:?}"
            );
            assert_eq!((s.shards_skipped, s.failed), (0, 0), "{s:?}");
            let set = ShardSet::new(tmp.path(), &s.dataset, &s.split);
            for shard in 0..s.shards_written as u32 {
                assert!(set.parquet_path(shard).is_file() && set.stats_path(shard).is_file());
                let stats = set.read_stats(shard).unwrap();
                assert_eq!(stats.source, source_of(&cfg, 42));
                assert!(stats.source.starts_with("synthetic seed=42 config-sha256="));
                assert_eq!(stats.successes, stats.count);
                assert!(stats.failures.is_empty());
            }
        }

        let mut all_keys = HashSet::new();
        for (split, n) in [("train", 10), ("val", 6)] {
            let images: Vec<ImageTextSample> = ShardSet::new(tmp.path(), IMAGES_DATASET, split)
                .read_all()
                .unwrap();
            assert_eq!(images.len(), n);
            let mut captions = BTreeMap::new();
            for (i, img) in images.iter().enumerate() {
                assert_eq!(img.key, format!("syn-{split}-{i:06}"));
                assert!(
                    all_keys.insert(img.key.clone()),
                    "duplicate key {}",
                    img.key
                );
                assert_eq!(img.url, format!("synthetic://{split}/{}", img.key));
                assert_eq!(img.status, SampleStatus::Success);
                assert_eq!(img.error, None);
                assert_eq!((img.width, img.height), (Some(64), Some(64)));
                assert_eq!(
                    (img.original_width, img.original_height),
                    (Some(64), Some(64))
                );
                let jpeg = img.image.as_ref().unwrap();
                assert_eq!(
                    img.sha256.as_deref(),
                    Some(hex::encode(Sha256::digest(jpeg)).as_str())
                );
                let s = parse_caption(&img.caption).unwrap_or_else(|| panic!("{}", img.caption));
                assert_grounded(&decode(jpeg), &s, &img.key);
                captions.insert(img.key.clone(), img.caption.clone());
            }

            let pairs: Vec<PreferencePair> = ShardSet::new(tmp.path(), PAIRS_DATASET, split)
                .read_all()
                .unwrap();
            assert_eq!(pairs.len(), n * cfg.pairs_per_image);
            let ids: HashSet<_> = pairs.iter().map(|p| p.pair_id.clone()).collect();
            assert_eq!(ids.len(), pairs.len(), "pair ids are unique");
            for p in &pairs {
                let key = p.image_key.as_ref().unwrap();
                let chosen = captions
                    .get(key)
                    .unwrap_or_else(|| panic!("{key} not in {split}"));
                assert_eq!(&p.chosen, chosen);
                assert_ne!(p.chosen, p.rejected);
                assert_eq!(p.prompt, "");
                assert_eq!((p.score_chosen, p.score_rejected), (1.0, 0.0));
                let kind = p.source.strip_prefix("synthetic:").unwrap();
                assert!(
                    Corruption::ALL.iter().any(|c| c.as_str() == kind),
                    "{}",
                    p.source
                );
            }

            let frames: Vec<StoryFrame> = ShardSet::new(tmp.path(), STORIES_DATASET, split)
                .read_all()
                .unwrap();
            let stories = if split == "train" { 3 } else { 2 };
            assert_eq!(frames.len(), stories * cfg.frames_per_story);
            for (i, f) in frames.iter().enumerate() {
                let story = i / cfg.frames_per_story;
                assert_eq!(f.story_id, format!("syn-story-{split}-{story:04}"));
                assert_eq!(f.frame_index as usize, i % cfg.frames_per_story);
                assert_eq!(f.frame_count as usize, cfg.frames_per_story);
                let (_, s) = parse_story_caption(&f.caption).unwrap();
                assert_grounded(&decode(&f.image), &s, &f.caption);
            }
        }
    }

    #[test]
    fn story_frames_change_the_way_their_captions_say() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = SyntheticConfig {
            train_images: 0,
            val_images: 0,
            train_stories: 12,
            val_stories: 0,
            frames_per_story: 8,
            ..small_cfg()
        };
        run_local(&cfg, 9, tmp.path()).unwrap();
        let frames: Vec<StoryFrame> = ShardSet::new(tmp.path(), STORIES_DATASET, "train")
            .read_all()
            .unwrap();
        assert_eq!(frames.len(), 12 * 8);
        let (mut moves, mut turns) = (0, 0);
        for pair in frames.windows(2) {
            let (prev, next) = (&pair[0], &pair[1]);
            if prev.story_id != next.story_id {
                continue;
            }
            let (_, before) = parse_story_caption(&prev.caption).unwrap();
            let (change, after) = parse_story_caption(&next.caption).unwrap();
            let what = &next.caption;
            let b0 = assert_grounded(&decode(&prev.image), &before, &prev.caption);
            let b1 = assert_grounded(&decode(&next.image), &after, what);
            assert_eq!(
                after.object, before.object,
                "{what}: the object keeps its identity"
            );
            assert_eq!(after.relation, before.relation, "{what}");
            let (ox0, oy0) = b0[&before.object.colour].centroid();
            let (ox1, oy1) = b1[&after.object.colour].centroid();
            assert!(
                (ox0 - ox1).abs() < 0.5 && (oy0 - oy1).abs() < 0.5,
                "{what}: object moved"
            );
            match change {
                Some(Change::Moves(d)) => {
                    moves += 1;
                    assert_eq!(after.subject, before.subject, "{what}");
                    let (x0, y0) = b0[&before.subject.colour].centroid();
                    let (x1, y1) = b1[&after.subject.colour].centroid();
                    let (dx, dy) = (x1 - x0, y1 - y0);
                    let step = f64::from(STORY_STEP);
                    let (along, across) = match d {
                        Direction::Up => (-dy, dx),
                        Direction::Down => (dy, dx),
                        Direction::Left => (-dx, dy),
                        Direction::Right => (dx, dy),
                    };
                    assert!(
                        (along - step).abs() < 1.0 && across.abs() < 0.5,
                        "{what}: {dx} {dy}"
                    );
                }
                Some(Change::Turns { from, to }) => {
                    turns += 1;
                    assert_eq!(from, before.subject.colour, "{what}");
                    assert_eq!(to, before.subject.colour.next_in_cycle(after.object.colour));
                    assert_eq!(after.subject.kind, before.subject.kind, "{what}");
                    assert!(!b1.contains_key(&from) || b1[&from].count <= 4, "{what}");
                }
                None => panic!(
                    "frame {} of {} has a first-frame caption",
                    next.frame_index, next.story_id
                ),
            }
        }
        assert!(
            moves > 0 && turns > 0,
            "{moves} moves, {turns} colour turns"
        );
    }

    #[test]
    fn same_seed_gives_byte_identical_parquet_and_another_seed_does_not() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let cfg = small_cfg();
        run_local(&cfg, 7, a.path()).unwrap();
        run_local(&cfg, 7, b.path()).unwrap();
        run_local(&cfg, 8, c.path()).unwrap();
        let (fa, fb, fc) = (
            parquet_files(a.path()),
            parquet_files(b.path()),
            parquet_files(c.path()),
        );
        // Shards of 4 rows: images 3 + 2, pairs 5 + 3, story frames 4 + 3.
        assert_eq!(fa.len(), 20);
        assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
        for (path, bytes) in &fa {
            assert!(
                bytes == &fb[path],
                "{} differs between runs",
                path.display()
            );
        }
        assert!(
            fa.iter().any(|(path, bytes)| bytes != &fc[path]),
            "seed is ignored"
        );
    }

    #[test]
    fn rerun_skips_finished_shards() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = small_cfg();
        let first = run_local(&cfg, 1, tmp.path()).unwrap();
        let before = parquet_files(tmp.path());
        let second = run_local(&cfg, 1, tmp.path()).unwrap();
        for (a, b) in first.splits.iter().zip(&second.splits) {
            assert_eq!(b.shards_written, 0, "{b:?}");
            assert_eq!(b.shards_skipped, a.shards_written, "{b:?}");
            assert_eq!(b.rows, a.rows, "{b:?}");
        }
        assert_eq!(parquet_files(tmp.path()), before);

        // A shard killed before its stats were written is redone, alone.
        let set = ShardSet::new(tmp.path(), IMAGES_DATASET, "val");
        fs::remove_file(set.stats_path(1)).unwrap();
        let third = run_local(&cfg, 1, tmp.path()).unwrap();
        let written: usize = third.splits.iter().map(|s| s.shards_written).sum();
        assert_eq!(written, 1);
        assert_eq!(parquet_files(tmp.path()), before);
    }

    #[test]
    fn another_seed_or_smaller_config_replaces_stale_shards() {
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tempfile::tempdir().unwrap();
        let cfg = small_cfg();
        run_local(&cfg, 1, tmp.path()).unwrap();
        let summary = run_local(&cfg, 2, tmp.path()).unwrap();
        assert!(
            summary.splits.iter().all(|s| s.shards_skipped == 0),
            "{summary:?}"
        );
        run_local(&cfg, 2, fresh.path()).unwrap();
        assert_eq!(parquet_files(tmp.path()), parquet_files(fresh.path()));

        let smaller = SyntheticConfig {
            train_images: 3,
            ..cfg
        };
        let summary = run_local(&smaller, 2, tmp.path()).unwrap();
        assert_eq!(summary.splits[0].rows, 3);
        let set = ShardSet::new(tmp.path(), IMAGES_DATASET, "train");
        assert_eq!(set.finished().unwrap(), vec![0]);
        assert_eq!(set.read_all::<ImageTextSample>().unwrap().len(), 3);

        // A setting that keeps every shard's row count (the image size) still redoes them.
        let larger_images = SyntheticConfig {
            image_size: smaller.image_size * 2,
            ..smaller.clone()
        };
        let summary = run_local(&larger_images, 2, tmp.path()).unwrap();
        assert!(
            summary.splits.iter().all(|s| s.shards_skipped == 0),
            "{summary:?}"
        );
        run_local(&larger_images, 2, fresh.path()).unwrap();
        assert_eq!(parquet_files(tmp.path()), parquet_files(fresh.path()));
    }

    #[test]
    fn val_is_drawn_apart_from_train() {
        let train = plan_images(4, "train", 3000, &HashSet::new());
        let train_layouts: HashSet<Layout> = train.iter().map(|i| i.layout).collect();
        let val = plan_images(4, "val", 800, &train_layouts);
        assert!(val.iter().all(|v| !train_layouts.contains(&v.layout)));
        // The rejection really redraws: a set holding the first draw forces a second.
        let first = random_layout(&mut SplitMix64::new(1));
        let avoid = HashSet::from([first]);
        let drawn = draw_avoiding(
            &mut SplitMix64::new(1),
            &avoid,
            |l: &Layout| *l,
            random_layout,
        );
        assert_ne!(drawn, first);

        let (_, starts) = plan_stories(4, "train", 200, 3, &HashSet::new());
        let (val_frames, val_starts) = plan_stories(4, "val", 100, 3, &starts);
        assert!(val_starts.is_disjoint(&starts));
        assert_eq!(val_frames.len(), 300);
    }

    #[test]
    fn invalid_configs_are_refused_naming_the_key() {
        let tmp = tempfile::tempdir().unwrap();
        for (cfg, key) in [
            (
                SyntheticConfig {
                    shard_size: 0,
                    ..small_cfg()
                },
                "shard_size",
            ),
            (
                SyntheticConfig {
                    image_size: 8,
                    ..small_cfg()
                },
                "image_size",
            ),
            (
                SyntheticConfig {
                    frames_per_story: 0,
                    ..small_cfg()
                },
                "frames_per_story",
            ),
        ] {
            let err = run_local(&cfg, 1, tmp.path()).unwrap_err().to_string();
            assert!(err.contains(&format!("ingest.synthetic.{key}")), "{err}");
        }
    }

    #[test]
    fn defaults_mirror_configs_default_toml() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/default.toml");
        let text = fs::read_to_string(&path).unwrap();
        let doc: toml::Table = toml::from_str(&text).unwrap();
        let table = doc["ingest"]["synthetic"].clone();
        let from_file: SyntheticConfig = table.try_into().unwrap();
        assert_eq!(
            serde_json::to_value(from_file).unwrap(),
            serde_json::to_value(SyntheticConfig::default()).unwrap()
        );
    }
}
