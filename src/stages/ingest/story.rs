//! StoryReasoning: story parquet from the hub, split into one row per frame with the
//! frame's caption (grounding tags stripped), with a story-level train/val split
//! stratified by frame count.
//!
//! Frame policy: frame N (1-based) is usable when the story has a `<gdi imageN>` block with a
//! non-empty caption and image N's bytes are JPEG or PNG. Unusable frames are dropped; the
//! others keep their source position as `frame_index` (N − 1) and `frame_count` is the
//! story's number of images, so a gap stays visible and no next-frame window of the trainers
//! spans it (`datasets::stories`). A story keeps its usable frames only if there are at least
//! `context_frames + 1` of them. Counts in the shard stats' `failures` map:
//! `caption_mismatch` (stories whose blocks do not match their images one to one),
//! `empty_caption` and `bad_image` (frames), `gapped_story` (stories kept with a gap),
//! `too_few_frames` (stories dropped).

use std::collections::BTreeMap;
use std::time::Instant;

use arrow::array::Array;
use serde::{Deserialize, Serialize};

use crate::data::hub::HubClient;
use crate::data::records::StoryFrame;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::rng::SplitMix64;
use crate::stages::ingest::hub_table::{
    for_each_batch, list_column, provenance, text_column, write_split, Unit,
};
use crate::stages::ingest::{Destination, SourceSummary, SplitSummary};

/// Output dataset: `data/storyreasoning/<split>/`.
pub const DATASET: &str = "storyreasoning";

/// `[ingest.storyreasoning]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoryConfig {
    pub repo: String,
    pub revision: String,
    /// Hub splits to read, each from `data/<split>-*.parquet`. `train` is re-split into
    /// `train`/`val` by story; other splits are written under their own name.
    pub splits: Vec<String>,
    /// Fraction of the hub's train stories held out as `val`.
    pub val_fraction: f64,
    /// Context frames of the next-frame task; stories need at least `context_frames + 1` frames.
    pub context_frames: usize,
    pub shard_size: usize,
}

impl Default for StoryConfig {
    fn default() -> Self {
        Self {
            repo: "daniel3303/StoryReasoning".into(),
            revision: "main".into(),
            splits: vec!["train".into(), "test".into()],
            val_fraction: 0.1,
            context_frames: 4,
            shard_size: 2000,
        }
    }
}

const GDI_OPEN: &str = "<gdi image";
const GDI_CLOSE: &str = "</gdi>";

/// The `<gdi imageN>…</gdi>` blocks of a story in document order, as `(N, raw inner text)`.
/// Equivalent to the reference regex `<gdi image(\d+)>(.*?)</gdi>` with DOTALL: an opening
/// tag without a closing one, or with no number, is not a block.
pub fn gdi_blocks(story: &str) -> Vec<(u32, &str)> {
    let mut blocks = Vec::new();
    let mut pos = 0;
    while let Some(rel) = story[pos..].find(GDI_OPEN) {
        let start = pos + rel;
        let digits_at = start + GDI_OPEN.len();
        let digits = story[digits_at..]
            .bytes()
            .take_while(u8::is_ascii_digit)
            .count();
        let number = story[digits_at..digits_at + digits].parse::<u32>().ok();
        let closed = story.as_bytes().get(digits_at + digits) == Some(&b'>');
        let (Some(number), true) = (number, closed) else {
            // `<` is ASCII, so the next byte starts a character.
            pos = start + 1;
            continue;
        };
        let body = digits_at + digits + 1;
        let Some(len) = story[body..].find(GDI_CLOSE) else {
            break;
        };
        blocks.push((number, &story[body..body + len]));
        pos = body + len + GDI_CLOSE.len();
    }
    blocks
}

/// Removes the grounding tags `<gdo …>`, `<gda …>`, `<gdl …>` and their closing tags
/// (the reference's `<gd[oal][^>]*>` and `</gd[oal]>`), keeping the tagged text.
pub fn strip_grounding_tags(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(lt) = rest.find('<') {
        out.push_str(&rest[..lt]);
        let tail = &rest[lt..];
        let b = tail.as_bytes();
        let kind = |i: usize| matches!(b.get(i), Some(b'o' | b'a' | b'l'));
        let skip = if tail.starts_with("<gd") && kind(3) {
            tail.find('>').map(|gt| gt + 1)
        } else if tail.starts_with("</gd") && kind(4) && b.get(5) == Some(&b'>') {
            Some(6)
        } else {
            None
        };
        match skip {
            Some(n) => rest = &tail[n..],
            None => {
                out.push('<');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Whitespace as captions should have it: runs of spaces and tabs become one space, lines are
/// trimmed, runs of blank lines (3+ newlines) become one blank line, and the ends are trimmed.
pub fn normalise_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank_lines = 0;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.is_empty() {
            blank_lines += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank_lines > 0 { "\n\n" } else { "\n" });
        }
        out.push_str(&words.join(" "));
        blank_lines = 0;
    }
    out
}

/// Per-frame captions of a story: `(N, cleaned caption)` sorted by N (document order among
/// equal N), as the reference parser returns them.
pub fn frame_captions(story: &str) -> Vec<(u32, String)> {
    let mut captions: Vec<(u32, String)> = gdi_blocks(story)
        .into_iter()
        .map(|(n, raw)| (n, normalise_whitespace(&strip_grounding_tags(raw))))
        .collect();
    captions.sort_by_key(|(n, _)| *n);
    captions
}

/// Whether `bytes` start like a JPEG or a PNG file (the encodings StoryReasoning stores).
pub fn is_jpeg_or_png(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF]) || bytes.starts_with(b"\x89PNG\r\n\x1a\n")
}

/// One row of the hub parquet, with the fields this source uses.
#[derive(Debug, Clone, Default)]
pub struct HubStory {
    pub story_id: String,
    /// Encoded bytes per image, in order; `None` where the bytes are null.
    pub images: Vec<Option<Vec<u8>>>,
    pub story: String,
}

/// What a story became: its frames (empty when dropped) and the counts to record.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoryOutcome {
    pub frames: Vec<StoryFrame>,
    pub counts: BTreeMap<&'static str, u64>,
}

/// Pairs image N with block N under the frame policy in the module docs. The first block of
/// each N is used; a duplicate, missing or surplus block marks the story `caption_mismatch`.
pub fn story_frames(story: HubStory, context_frames: usize) -> StoryOutcome {
    let mut out = StoryOutcome::default();
    let mut count = |key: &'static str, n: u64| {
        if n > 0 {
            *out.counts.entry(key).or_default() += n;
        }
    };
    let captions = frame_captions(&story.story);
    let mut by_frame: BTreeMap<u32, String> = BTreeMap::new();
    for (n, text) in &captions {
        by_frame.entry(*n).or_insert_with(|| text.clone());
    }
    let n_images = story.images.len();
    let one_to_one = captions.len() == n_images && by_frame.keys().copied().eq(1..=n_images as u32);
    count("caption_mismatch", u64::from(!one_to_one));
    let (mut empty, mut bad) = (0, 0);
    let mut usable = Vec::new();
    for (k, image) in story.images.into_iter().enumerate() {
        let Some(caption) = by_frame.remove(&(k as u32 + 1)) else {
            continue;
        };
        if caption.is_empty() {
            empty += 1;
            continue;
        }
        match image {
            Some(bytes) if is_jpeg_or_png(&bytes) => usable.push((k, bytes, caption)),
            _ => bad += 1,
        }
    }
    count("empty_caption", empty);
    count("bad_image", bad);
    if usable.len() < context_frames + 1 {
        count("too_few_frames", 1);
        return out;
    }
    count("gapped_story", u64::from(usable.len() < n_images));
    let frame_count = n_images as i32;
    out.frames = usable
        .into_iter()
        .map(|(k, image, caption)| StoryFrame {
            story_id: story.story_id.clone(),
            frame_index: k as i32,
            frame_count,
            image,
            caption,
        })
        .collect();
    out
}

/// Which stories go to `val`: stories are grouped by frame count; within a group, ordered by
/// (story id, position) and shuffled with a generator derived from `seed` and the frame count,
/// the first `round(val_fraction × group size)` go to `val`, rounding half away from zero
/// (0.1 × 4 = 0.4 gives none, 0.1 × 5 = 0.5 gives one, 0.1 × 15 = 1.5 gives two). The result does not depend on the
/// order of `stories` beyond ties of equal ids. `stories` are `(story_id, frame_count)`.
pub fn val_assignment(stories: &[(String, usize)], val_fraction: f64, seed: u64) -> Vec<bool> {
    let mut groups: BTreeMap<usize, Vec<(&str, usize)>> = BTreeMap::new();
    for (i, (id, frames)) in stories.iter().enumerate() {
        groups.entry(*frames).or_default().push((id.as_str(), i));
    }
    let mut is_val = vec![false; stories.len()];
    for (frames, mut members) in groups {
        members.sort_unstable();
        SplitMix64::derived(seed, &format!("storyreasoning/val/{frames}")).shuffle(&mut members);
        let take = ((val_fraction * members.len() as f64).round() as usize).min(members.len());
        for &(_, i) in &members[..take] {
            is_val[i] = true;
        }
    }
    is_val
}

/// Reads every story of one hub split's files, in file order, as outcomes.
fn read_split(
    files: &[crate::data::hub::HubFile],
    context_frames: usize,
    progress: &Progress,
) -> Result<Vec<StoryOutcome>> {
    let mut outcomes = Vec::new();
    for file in files {
        let path = file.local.as_path();
        for_each_batch(path, |batch, row_offset| {
            let ids = text_column(batch, "story_id", path)?;
            let stories = text_column(batch, "story", path)?;
            let images = list_column(batch, "images", path)?;
            let bytes = images.struct_binary("bytes", path)?;
            for i in 0..batch.num_rows() {
                if ids.is_null(i) {
                    return Err(Error::BadRow {
                        path: path.to_path_buf(),
                        row: (row_offset + i) as u64 + 1,
                        message: "`story_id` is null".into(),
                    });
                }
                let story = HubStory {
                    story_id: ids.value(i).to_string(),
                    images: images
                        .range(i)
                        .unwrap_or_default()
                        .map(|j| {
                            (!images.is_entry_null(j) && bytes.is_valid(j))
                                .then(|| bytes.value(j).to_vec())
                        })
                        .collect(),
                    story: if stories.is_null(i) {
                        String::new()
                    } else {
                        stories.value(i).to_string()
                    },
                };
                outcomes.push(story_frames(story, context_frames));
                progress.inc(1);
            }
            Ok(())
        })?;
    }
    Ok(outcomes)
}

/// The outcomes as shard units in order: each story's counts, then its frames.
fn units(outcomes: Vec<StoryOutcome>) -> Vec<Unit<StoryFrame>> {
    let mut units = Vec::new();
    for o in outcomes {
        units.extend(o.counts.into_iter().map(|(k, n)| Unit::Count(k, n)));
        if !o.frames.is_empty() {
            units.push(Unit::Rows(o.frames));
        }
    }
    units
}

/// Ingests the configured hub splits into `data/storyreasoning/<split>/`, one row per frame,
/// shards of about `shard_size` frames that never split a story.
///
/// Resumable per shard, as UltraFeedback: the rows are recomputed from the cached hub files,
/// and a shard is rewritten unless it is finished with the same provenance (`repo@commit` plus
/// a digest of val_fraction, context_frames, shard_size and the seed). The hub's train split is
/// held in memory while it is re-split (about 0.7 GB for the real dataset).
pub fn run(
    cfg: &StoryConfig,
    seed: u64,
    hub: &HubClient,
    dest: Destination,
) -> Result<SourceSummary> {
    if cfg.shard_size == 0 {
        return Err(Error::Config(
            "ingest.storyreasoning.shard_size must be at least 1".into(),
        ));
    }
    if !(0.0..=1.0).contains(&cfg.val_fraction) {
        return Err(Error::Config(format!(
            "ingest.storyreasoning.val_fraction must be within [0, 1], got {}",
            cfg.val_fraction
        )));
    }
    let settings = serde_json::json!({
        "val_fraction": cfg.val_fraction,
        "context_frames": cfg.context_frames,
        "shard_size": cfg.shard_size,
        "seed": seed,
    });
    let mut splits: Vec<SplitSummary> = Vec::new();
    for split in &cfg.splits {
        let started = Instant::now();
        let files = hub.dataset_files(
            &cfg.repo,
            &cfg.revision,
            &[format!("data/{split}-*.parquet")],
        )?;
        let progress = Progress::new(&format!("{DATASET}/{split}"), "stories", None);
        let outcomes = read_split(&files, cfg.context_frames, &progress)?;
        let source = provenance(&cfg.repo, &files, &settings);
        let write = |name: &str, outcomes: Vec<StoryOutcome>| {
            write_split(
                dest,
                DATASET,
                name,
                &source,
                cfg.shard_size,
                units(outcomes),
                started,
            )
        };
        if split == "train" {
            let kept: Vec<(String, usize)> = outcomes
                .iter()
                .filter_map(|o| {
                    o.frames
                        .first()
                        .map(|f| (f.story_id.clone(), o.frames.len()))
                })
                .collect();
            let mut is_val = val_assignment(&kept, cfg.val_fraction, seed).into_iter();
            let (mut train, mut val) = (Vec::new(), Vec::new());
            for o in outcomes {
                // Dropped stories have no assignment; their counts stay with `train`.
                if !o.frames.is_empty() && is_val.next() == Some(true) {
                    val.push(o);
                } else {
                    train.push(o);
                }
            }
            splits.push(write("train", train)?);
            splits.push(write("val", val)?);
        } else {
            splits.push(write(split, outcomes)?);
        }
        let rows: Vec<String> = splits
            .iter()
            .map(|s| format!("{} {}", s.split, s.rows))
            .collect();
        progress.finish(&format!("frames written: {}", rows.join(", ")));
    }
    Ok(SourceSummary {
        source: DATASET.into(),
        splits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
    const JPEG: &[u8] = &[0xFF, 0xD8, 0xFF, 0xE0, 0, 16, b'J', b'F', b'I', b'F'];

    const EXCERPT: &str =
        "<gdi image1> In the sterile environment of an indoor office, <gdo char2>John</gdo> \
        stood by <gdo obj1>the door</gdo>, his <gdo obj2>tie</gdo> neatly knotted.</gdi>";

    fn story(text: &str, images: usize) -> HubStory {
        HubStory {
            story_id: "3920".into(),
            images: vec![Some(PNG.to_vec()); images],
            story: text.into(),
        }
    }

    fn one_line_story(frames: usize) -> String {
        (1..=frames)
            .map(|n| format!("<gdi image{n}> Frame {n} <gda char1>walks</gda>. </gdi>"))
            .collect()
    }

    #[test]
    fn the_hub_viewer_excerpt_becomes_plain_text() {
        assert_eq!(
            frame_captions(EXCERPT),
            vec![(1, "In the sterile environment of an indoor office, John stood by the door, his tie neatly knotted.".into())]
        );
    }

    #[test]
    fn multi_line_blocks_as_story_to_string_writes_them() {
        let text = "<gdi image2>\nLater, <gdl bg2 bg3>the street</gdl> was empty.\n</gdi>\n\
                    <gdi image1>\n<gdo char1>Mia</gdo>  <gda char1 char2>waved</gda>\tat <gdo char2>Tom</gdo>.\n\n\n\nHe smiled.\n</gdi>\n";
        assert_eq!(
            frame_captions(text),
            vec![
                (1, "Mia waved at Tom.\n\nHe smiled.".into()),
                (2, "Later, the street was empty.".into())
            ]
        );
    }

    #[test]
    fn blocks_follow_the_reference_regex() {
        let text = "<gdi image> not a block </gdi><gdi imageX>no</gdi> <gdi image3>a <gdi image4> b</gdi> <gdi image5> open";
        assert_eq!(gdi_blocks(text), vec![(3, "a <gdi image4> b")]);
        assert_eq!(
            gdi_blocks("<gdi image1>é</gdi><gdi image2>ü</gdi>"),
            vec![(1, "é"), (2, "ü")]
        );
        assert!(gdi_blocks("").is_empty());
    }

    #[test]
    fn only_grounding_tags_are_removed() {
        assert_eq!(
            strip_grounding_tags("a <b>c</b> 3 < 4 <gdx> <gdo x>y</gdo></gda></gdl>"),
            "a <b>c</b> 3 < 4 <gdx> y"
        );
        assert_eq!(
            strip_grounding_tags("unterminated <gdo char1"),
            "unterminated <gdo char1"
        );
    }

    #[test]
    fn a_clean_story_gives_one_frame_per_image() {
        let out = story_frames(story(&one_line_story(5), 5), 4);
        assert!(out.counts.is_empty(), "{:?}", out.counts);
        let idx: Vec<i32> = out.frames.iter().map(|f| f.frame_index).collect();
        assert_eq!(idx, vec![0, 1, 2, 3, 4]);
        assert!(out
            .frames
            .iter()
            .all(|f| f.frame_count == 5 && f.story_id == "3920" && f.image == PNG));
        assert_eq!(out.frames[2].caption, "Frame 3 walks.");
    }

    #[test]
    fn a_missing_block_drops_that_frame_keeps_the_others_positions_and_is_counted() {
        let text =
            one_line_story(6).replace("<gdi image3> Frame 3 <gda char1>walks</gda>. </gdi>", "");
        let out = story_frames(story(&text, 6), 4);
        assert_eq!(
            out.counts,
            BTreeMap::from([("caption_mismatch", 1), ("gapped_story", 1)])
        );
        let captions: Vec<&str> = out.frames.iter().map(|f| f.caption.as_str()).collect();
        assert_eq!(
            captions,
            vec![
                "Frame 1 walks.",
                "Frame 2 walks.",
                "Frame 4 walks.",
                "Frame 5 walks.",
                "Frame 6 walks."
            ]
        );
        let idx: Vec<i32> = out.frames.iter().map(|f| f.frame_index).collect();
        assert_eq!(idx, vec![0, 1, 3, 4, 5], "source positions, the gap kept");
        assert!(out.frames.iter().all(|f| f.frame_count == 6));
    }

    #[test]
    fn surplus_blocks_are_ignored_and_counted() {
        let out = story_frames(story(&one_line_story(7), 5), 4);
        assert_eq!(out.frames.len(), 5);
        assert_eq!(out.counts, BTreeMap::from([("caption_mismatch", 1)]));
    }

    #[test]
    fn bad_images_drop_frames_and_short_stories_are_dropped() {
        let mut s = story(&one_line_story(5), 5);
        s.images[1] = Some(b"GIF89a".to_vec());
        s.images[3] = None;
        s.images[4] = Some(JPEG.to_vec());
        let out = story_frames(s.clone(), 2);
        assert_eq!(out.frames.len(), 3);
        assert_eq!(out.frames[2].image, JPEG);
        assert_eq!(
            out.counts,
            BTreeMap::from([("bad_image", 2), ("gapped_story", 1)])
        );

        let out = story_frames(s, 4);
        assert!(out.frames.is_empty());
        assert_eq!(
            out.counts,
            BTreeMap::from([("bad_image", 2), ("too_few_frames", 1)])
        );
        let none = story_frames(story("no blocks at all", 5), 0);
        assert_eq!(
            none.counts,
            BTreeMap::from([("caption_mismatch", 1), ("too_few_frames", 1)])
        );
    }

    #[test]
    fn jpeg_and_png_are_recognised_by_magic_bytes() {
        assert!(is_jpeg_or_png(PNG));
        assert!(is_jpeg_or_png(JPEG));
        assert!(!is_jpeg_or_png(b"GIF89a"));
        assert!(!is_jpeg_or_png(&[]));
    }

    fn stories() -> Vec<(String, usize)> {
        // 40 stories of 5 frames, 20 of 8, 3 of 22.
        (0..63)
            .map(|i| {
                (
                    format!("{}", 1000 + i),
                    if i < 40 {
                        5
                    } else if i < 60 {
                        8
                    } else {
                        22
                    },
                )
            })
            .collect()
    }

    #[test]
    fn val_split_is_stratified_by_frame_count() {
        let s = stories();
        let is_val = val_assignment(&s, 0.1, 42);
        let val_with = |frames: usize| {
            s.iter()
                .zip(&is_val)
                .filter(|((_, f), v)| *f == frames && **v)
                .count()
        };
        assert_eq!(
            (val_with(5), val_with(8), val_with(22)),
            (4, 2, 0),
            "round(0.1 × 40, 20, 3)"
        );
        let half = val_assignment(&s, 0.5, 42);
        let val_22 = s
            .iter()
            .zip(&half)
            .filter(|((_, f), v)| *f == 22 && **v)
            .count();
        assert_eq!(val_22, 2, "round(1.5) rounds half away from zero");
        assert!(val_assignment(&s, 1.0, 42).iter().all(|v| *v));
        assert!(val_assignment(&s, 0.0, 42).iter().all(|v| !*v));
    }

    #[test]
    fn val_split_is_deterministic_and_order_independent() {
        let s = stories();
        let ids = |s: &[(String, usize)], v: &[bool]| {
            let mut ids: Vec<String> = s
                .iter()
                .zip(v)
                .filter(|(_, v)| **v)
                .map(|((id, _), _)| id.clone())
                .collect();
            ids.sort();
            ids
        };
        let a = ids(&s, &val_assignment(&s, 0.2, 42));
        assert_eq!(a, ids(&s, &val_assignment(&s, 0.2, 42)));
        let mut reversed = s.clone();
        reversed.reverse();
        assert_eq!(a, ids(&reversed, &val_assignment(&reversed, 0.2, 42)));
        assert_ne!(
            a,
            ids(&s, &val_assignment(&s, 0.2, 7)),
            "another seed picks other stories"
        );
    }
}
