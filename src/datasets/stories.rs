//! Next-frame story examples: a story split's frames (ingest's story shards) joined with the
//! cached CLIP image and text embeddings of every frame, cut into windows — a target frame
//! and the `K` frames right before it — and tokenised into batches with the context captions
//! as a text prompt.
//!
//! Frames keep their source position (`frame_index`), so a story with a dropped frame has a
//! gap, and no window spans it: every context frame really precedes its target by the
//! distance its position says. A frame without cached features is counted and its windows
//! are skipped, naming the first such frames; nothing is filled with zeros.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use crossbeam_channel::Receiver;
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::data::features::FeatureEntry;
use crate::data::record::read_column;
use crate::data::records::{story_frame_key, StoryFrame};
use crate::data::shard::{read_columns, ShardKind, ShardSet};
use crate::datasets::features::embeddings_by_key;
use crate::error::{Error, Result};
use crate::models::captioner::caption_ids;
pub use crate::models::story::{PromptFormat, Targets};
use crate::train::Batches;

use super::loader::shard_batches;

/// The `(context, target)` windows of a story whose frames at positions `present`
/// (increasing) survived ingest: targets `t` whose `K` predecessors `t − K .. t − 1` are all
/// present.
pub fn windows(present: &[i32], k: usize, targets: Targets) -> Vec<(Vec<i32>, i32)> {
    let mut out = Vec::new();
    // Length of the run of consecutive positions ending at each frame.
    let mut run = 0usize;
    for (i, &t) in present.iter().enumerate() {
        if run >= k {
            out.push((((t - k as i32)..t).collect(), t));
            if targets == Targets::Last {
                break;
            }
        }
        run = if i + 1 < present.len() && present[i + 1] == t + 1 {
            run + 1
        } else {
            0
        };
    }
    out
}

/// One example: the target frame of a story and its context frames, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoryExample {
    pub story_id: String,
    pub context: Vec<i32>,
    pub target: i32,
}

impl StoryExample {
    /// The target frame's key (its feature-cache key, and the `image_key` of its captions).
    pub fn target_key(&self) -> String {
        story_frame_key(&self.story_id, self.target)
    }
}

/// A frame as the trainers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameData {
    pub caption: String,
    pub image: Vec<f32>,
    pub text: Vec<f32>,
}

/// What building a split's examples found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StoryCounts {
    pub stories: usize,
    pub examples: usize,
    /// Stories with a gap (a frame dropped at ingest).
    pub gapped_stories: usize,
    /// Stories without one whole window.
    pub too_short: usize,
    /// Frames without cached image or text features, and the windows skipped for them.
    pub missing_features: usize,
    pub skipped_examples: usize,
    /// The first frames without features, as `story <id> frame <index>`.
    pub missing: Vec<String>,
}

impl std::fmt::Display for StoryCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} examples from {} stories ({} with a gap, {} too short for a window)",
            self.examples, self.stories, self.gapped_stories, self.too_short
        )?;
        if self.missing_features > 0 {
            write!(
                f,
                "; {} frames have no cached features ({}), {} windows skipped",
                self.missing_features,
                self.missing.join(", "),
                self.skipped_examples
            )?;
        }
        Ok(())
    }
}

/// Frames without features named in [`StoryCounts::missing`].
const NAMED_MISSING: usize = 5;

/// The examples of one split and the frames they use.
#[derive(Debug, Clone, Default)]
pub struct StorySplit {
    pub examples: Vec<StoryExample>,
    /// Frame key → its caption and features (every frame an example uses).
    pub frames: HashMap<String, FrameData>,
    pub counts: StoryCounts,
}

impl StorySplit {
    /// The examples of `frames` (any order) under `k` context frames and `targets`, with the
    /// features of `images` and `texts` (frame key → embedding).
    pub fn build(
        frames: &[StoryFrame],
        images: &HashMap<String, Vec<f32>>,
        texts: &HashMap<String, Vec<f32>>,
        k: usize,
        targets: Targets,
    ) -> Self {
        let mut stories: BTreeMap<&str, Vec<&StoryFrame>> = BTreeMap::new();
        for f in frames {
            stories.entry(f.story_id.as_str()).or_default().push(f);
        }
        let mut out = StorySplit::default();
        for (id, mut story) in stories {
            story.sort_by_key(|f| f.frame_index);
            story.dedup_by_key(|f| f.frame_index);
            out.counts.stories += 1;
            let present: Vec<i32> = story.iter().map(|f| f.frame_index).collect();
            let count = story.first().map_or(0, |f| f.frame_count);
            if (present.len() as i32) < count
                || present.windows(2).any(|w| w[1] != w[0] + 1)
                || present.first().is_some_and(|&p| p != 0)
            {
                out.counts.gapped_stories += 1;
            }
            let mut usable: HashMap<i32, Option<FrameData>> = HashMap::new();
            for f in &story {
                let key = f.key();
                let data = match (images.get(&key), texts.get(&key)) {
                    (Some(image), Some(text)) => Some(FrameData {
                        caption: f.caption.clone(),
                        image: image.clone(),
                        text: text.clone(),
                    }),
                    _ => {
                        out.counts.missing_features += 1;
                        if out.counts.missing.len() < NAMED_MISSING {
                            out.counts
                                .missing
                                .push(format!("story {id} frame {}", f.frame_index));
                        }
                        None
                    }
                };
                usable.insert(f.frame_index, data);
            }
            let found = windows(&present, k, targets);
            if found.is_empty() {
                out.counts.too_short += 1;
            }
            for (context, target) in found {
                let whole = context
                    .iter()
                    .chain([&target])
                    .all(|i| usable.get(i).is_some_and(Option::is_some));
                if !whole {
                    out.counts.skipped_examples += 1;
                    continue;
                }
                for i in context.iter().chain([&target]) {
                    let key = story_frame_key(id, *i);
                    out.frames.entry(key).or_insert_with(|| {
                        usable.get(i).cloned().flatten().expect("checked above")
                    });
                }
                out.examples.push(StoryExample {
                    story_id: id.to_string(),
                    context,
                    target,
                });
            }
        }
        out.counts.examples = out.examples.len();
        out
    }

    /// The frame `index` of the story of `e`.
    pub fn frame(&self, e: &StoryExample, index: i32) -> &FrameData {
        &self.frames[&story_frame_key(&e.story_id, index)]
    }
}

/// The frames of the finished story shards of `dataset/split` under `workdir`, without their
/// image bytes (the trainers read the cached features).
pub fn load_frames(workdir: &Path, dataset: &str, split: &str) -> Result<Vec<StoryFrame>> {
    let mut out = Vec::new();
    for path in ShardSet::new(workdir, dataset, split).finished_paths()? {
        for batch in read_columns(
            &path,
            &["story_id", "frame_index", "frame_count", "caption"],
        )? {
            let ids = read_column::<String>(&batch, "story_id", &path)?;
            let index = read_column::<i32>(&batch, "frame_index", &path)?;
            let count = read_column::<i32>(&batch, "frame_count", &path)?;
            let caption = read_column::<String>(&batch, "caption", &path)?;
            for (((story_id, frame_index), frame_count), caption) in
                ids.into_iter().zip(index).zip(count).zip(caption)
            {
                out.push(StoryFrame {
                    story_id,
                    frame_index,
                    frame_count,
                    image: Vec::new(),
                    caption,
                });
            }
        }
    }
    Ok(out)
}

/// Whether the shards of `dataset/split` hold story frames.
pub fn is_story_split(workdir: &Path, dataset: &str, split: &str) -> Result<bool> {
    match ShardSet::new(workdir, dataset, split)
        .finished_paths()?
        .first()
    {
        Some(path) => Ok(ShardKind::of(path)? == ShardKind::Story),
        None => Ok(false),
    }
}

/// The examples of `dataset/split` under `workdir` with the cached image and text features
/// of its frames (`images`, `texts`: the split's verified entries); an error when there is
/// none, saying why.
pub fn load_split(
    workdir: &Path,
    dataset: &str,
    split: &str,
    images: &[FeatureEntry],
    texts: &[FeatureEntry],
    k: usize,
    targets: Targets,
) -> Result<StorySplit> {
    let frames = load_frames(workdir, dataset, split)?;
    let out = StorySplit::build(
        &frames,
        &embeddings_by_key(images)?,
        &embeddings_by_key(texts)?,
        k,
        targets,
    );
    if out.examples.is_empty() {
        return Err(Error::Config(format!(
            "{dataset}/{split}: no next-frame example with {k} context frames: {}",
            out.counts
        )));
    }
    Ok(out)
}

/// A batch of examples, built off the training thread. Sequences are `[prompt ; target]`,
/// right-padded with end-of-text.
#[derive(Debug, Clone)]
pub struct StoryBatch {
    pub rows: usize,
    /// Context frames per row and the CLIP width.
    pub k: usize,
    pub dim: usize,
    /// `rows × k × dim`, oldest frame first.
    pub context_image: Vec<f32>,
    pub context_text: Vec<f32>,
    /// `rows × dim`.
    pub target_image: Vec<f32>,
    pub target_text: Vec<f32>,
    pub len: usize,
    /// `rows × len` token ids.
    pub ids: Vec<u32>,
    /// `rows × len`, 1 for the target's tokens (the loss), 0 for the prompt and padding.
    pub supervised: Vec<f32>,
    /// `rows × len`, 1 for real tokens.
    pub attention: Vec<f32>,
    /// Prompt tokens per row.
    pub prompt_lens: Vec<usize>,
    /// The target frames' keys and captions.
    pub keys: Vec<String>,
    pub captions: Vec<String>,
}

/// How examples become token sequences.
#[derive(Clone)]
pub struct Tokenising {
    pub tokenizer: Tokenizer,
    pub eos: u32,
    pub prompt: PromptFormat,
    /// Target tokens kept, end-of-text included.
    pub max_caption_tokens: usize,
}

impl Tokenising {
    /// The batch of `examples` of `split`.
    pub fn batch(&self, split: &StorySplit, examples: &[StoryExample]) -> Result<StoryBatch> {
        let k = examples.first().map_or(0, |e| e.context.len());
        let dim = examples
            .first()
            .map_or(0, |e| split.frame(e, e.target).image.len());
        let mut b = StoryBatch {
            rows: examples.len(),
            k,
            dim,
            context_image: Vec::with_capacity(examples.len() * k * dim),
            context_text: Vec::with_capacity(examples.len() * k * dim),
            target_image: Vec::with_capacity(examples.len() * dim),
            target_text: Vec::with_capacity(examples.len() * dim),
            len: 0,
            ids: Vec::new(),
            supervised: Vec::new(),
            attention: Vec::new(),
            prompt_lens: Vec::new(),
            keys: Vec::new(),
            captions: Vec::new(),
        };
        let mut seqs = Vec::with_capacity(examples.len());
        for e in examples {
            if e.context.len() != k {
                return Err(Error::Invalid(format!(
                    "story {}: {} context frames in a batch of {k}",
                    e.story_id,
                    e.context.len()
                )));
            }
            let context: Vec<&FrameData> = e.context.iter().map(|&i| split.frame(e, i)).collect();
            for f in &context {
                b.context_image.extend_from_slice(&f.image);
                b.context_text.extend_from_slice(&f.text);
            }
            let target = split.frame(e, e.target);
            b.target_image.extend_from_slice(&target.image);
            b.target_text.extend_from_slice(&target.text);
            let captions: Vec<&str> = context.iter().map(|f| f.caption.as_str()).collect();
            let prompt = self.prompt.ids(&self.tokenizer, &captions)?;
            let caption = caption_ids(
                &self.tokenizer,
                self.eos,
                &target.caption,
                self.max_caption_tokens,
            )?;
            b.prompt_lens.push(prompt.len());
            b.keys.push(e.target_key());
            b.captions.push(target.caption.clone());
            seqs.push((prompt, caption));
        }
        b.len = seqs
            .iter()
            .map(|(p, c)| p.len() + c.len())
            .max()
            .unwrap_or(1)
            .max(1);
        for (prompt, caption) in seqs {
            let (p, c) = (prompt.len(), caption.len());
            b.ids.extend(prompt);
            b.ids.extend(caption);
            b.ids.extend(std::iter::repeat_n(self.eos, b.len - p - c));
            b.supervised
                .extend((0..b.len).map(|i| f32::from(u8::from(i >= p && i < p + c))));
            b.attention
                .extend((0..b.len).map(|i| f32::from(u8::from(i < p + c))));
        }
        Ok(b)
    }
}

/// A split's examples in batches of `batch_size`, shuffled with `shuffle` (seed, label) or in
/// order, over a bounded channel from a loader thread.
pub fn story_batches(
    split: &Arc<StorySplit>,
    tokenising: &Tokenising,
    batch_size: usize,
    shuffle: Option<(u64, String)>,
    capacity: usize,
) -> Receiver<Result<StoryBatch>> {
    let (source, data, tok) = (Arc::clone(split), Arc::clone(split), tokenising.clone());
    shard_batches(
        1,
        move |_| Ok(source.examples.clone()),
        move |chunk: &[StoryExample]| tok.batch(&data, chunk),
        batch_size,
        shuffle,
        capacity,
    )
}

/// The train and validation batches of the story model: [`Batches`] for the engine.
pub struct StoryBatches {
    pub train: Arc<StorySplit>,
    pub val: Arc<StorySplit>,
    pub tokenising: Tokenising,
    pub batch_size: usize,
    /// Seed of the per-epoch example order.
    pub seed: u64,
    pub capacity: usize,
}

impl Batches<StoryBatch> for StoryBatches {
    fn train(&self, epoch: usize) -> Result<Receiver<Result<StoryBatch>>> {
        Ok(story_batches(
            &self.train,
            &self.tokenising,
            self.batch_size,
            Some((self.seed, format!("story-epoch-{epoch}"))),
            self.capacity,
        ))
    }

    fn val(&self) -> Result<Receiver<Result<StoryBatch>>> {
        Ok(story_batches(
            &self.val,
            &self.tokenising,
            self.batch_size,
            None,
            self.capacity,
        ))
    }

    fn per_epoch(&self) -> usize {
        self.train.examples.len().div_ceil(self.batch_size.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(story: &str, index: i32, count: i32) -> StoryFrame {
        StoryFrame {
            story_id: story.into(),
            frame_index: index,
            frame_count: count,
            image: Vec::new(),
            caption: format!("{story} frame {index}"),
        }
    }

    fn features(frames: &[StoryFrame], skip: &str) -> HashMap<String, Vec<f32>> {
        frames
            .iter()
            .filter(|f| f.key() != skip)
            .map(|f| (f.key(), vec![f.frame_index as f32, 1.0]))
            .collect()
    }

    #[test]
    fn windows_at_story_edges_and_gaps() {
        // Exactly K + 1 frames: one window; K frames: none.
        assert_eq!(
            windows(&[0, 1, 2, 3, 4], 4, Targets::All),
            vec![(vec![0, 1, 2, 3], 4)]
        );
        assert!(windows(&[0, 1, 2, 3], 4, Targets::All).is_empty());
        // A gap at 2: no window spans it; 3..=7 is the only run long enough.
        assert_eq!(
            windows(&[0, 1, 3, 4, 5, 6, 7, 8], 4, Targets::All),
            vec![(vec![3, 4, 5, 6], 7), (vec![4, 5, 6, 7], 8)]
        );
        assert_eq!(
            windows(&[0, 1, 3, 4, 5, 6, 7, 8], 4, Targets::Last),
            vec![(vec![3, 4, 5, 6], 7)]
        );
        assert_eq!(
            windows(&[0, 1, 2, 3, 4, 5], 2, Targets::Last),
            vec![(vec![0, 1], 2)],
            "the reference's frame right after the first K"
        );
        assert_eq!(windows(&[0, 1, 2, 3, 4, 5], 2, Targets::All).len(), 4);
    }

    #[test]
    fn short_gapped_and_featureless_stories_are_counted_and_named() {
        let mut frames: Vec<StoryFrame> = (0..6).map(|i| frame("a", i, 6)).collect();
        frames.extend((0..4).map(|i| frame("short", i, 4)));
        frames.extend([0, 1, 2, 4, 5, 6, 7, 8].map(|i| frame("gap", i, 9)));
        let images = features(&frames, "a:5");
        let texts = features(&frames, "");
        let split = StorySplit::build(&frames, &images, &texts, 4, Targets::All);
        let c = &split.counts;
        assert_eq!((c.stories, c.too_short, c.gapped_stories), (3, 1, 1));
        assert_eq!((c.missing_features, c.skipped_examples), (1, 1));
        assert_eq!(c.missing, vec!["story a frame 5"]);
        let got: Vec<(String, i32)> = split
            .examples
            .iter()
            .map(|e| (e.story_id.clone(), e.target))
            .collect();
        assert_eq!(got, vec![("a".into(), 4), ("gap".into(), 8)]);
        assert_eq!(c.examples, 2);
        assert!(c.to_string().contains("story a frame 5"), "{c}");
        // The window's frames are all there; nothing is zero-filled.
        assert_eq!(split.frame(&split.examples[1], 4).image, vec![4.0, 1.0]);
    }

    fn tokenizer() -> Tokenizer {
        Tokenizer::from_file(crate::hf_tiny_fixture("gpt2-tiny/tokenizer.json")).unwrap()
    }

    #[test]
    fn prompts_are_templated_truncated_and_masked_from_the_loss() {
        let tok = tokenizer();
        let prompt = PromptFormat {
            template: "CTX\n{context}\nNEXT:".into(),
            line: "{n}: {caption}".into(),
            caption_tokens: 2,
            max_tokens: 100,
        };
        let ids = prompt.ids(&tok, &["one two three", "four"]).unwrap();
        let text = tok.decode(&ids, false).unwrap();
        assert_eq!(text, "CTX\n1: one two\n2: four\nNEXT:");
        let short = PromptFormat {
            max_tokens: 3,
            ..prompt.clone()
        };
        let cut = short.ids(&tok, &["one two three", "four"]).unwrap();
        assert_eq!(cut, ids[ids.len() - 3..].to_vec(), "the end survives");
        let none = PromptFormat {
            template: String::new(),
            ..prompt.clone()
        };
        assert!(none.ids(&tok, &["x"]).unwrap().is_empty());

        let frames: Vec<StoryFrame> = (0..3).map(|i| frame("s", i, 3)).collect();
        let feats = features(&frames, "");
        let split = StorySplit::build(&frames, &feats, &feats, 2, Targets::Last);
        let eos = tok.token_to_id("<|endoftext|>").unwrap();
        let t = Tokenising {
            tokenizer: tok.clone(),
            eos,
            prompt,
            max_caption_tokens: 10,
        };
        let b = t.batch(&split, &split.examples).unwrap();
        let p = b.prompt_lens[0];
        let target = caption_ids(&tok, eos, "s frame 2", 10).unwrap();
        assert_eq!(b.len, p + target.len());
        assert_eq!(&b.ids[p..], &target[..]);
        assert!(b.supervised[..p].iter().all(|m| *m == 0.0), "prompt masked");
        assert!(b.supervised[p..].iter().all(|m| *m == 1.0));
        assert_eq!(b.context_image, vec![0.0, 1.0, 1.0, 1.0]);
        assert_eq!(b.target_image, vec![2.0, 1.0]);
        assert_eq!(b.keys, vec!["s:2"]);
    }
}
