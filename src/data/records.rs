//! Record types that stages exchange, and their Arrow schemas: the one place the on-disk
//! contract of every shard is defined (README's "Schemas" section documents the same).

use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryArray, BinaryBuilder, Float64Array, Int32Array, Int64Array, RecordBatch,
    StringArray, UInt32Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::error::{Error, Result};

/// A type stored one row per record in Parquet shards.
pub trait Record: Sized + Send + 'static {
    /// Arrow schema of a shard of these records.
    fn schema() -> SchemaRef;
    /// Columnar form of `rows`, in order.
    fn to_batch(rows: &[Self]) -> Result<RecordBatch>;
    /// Rows of `batch`; `path` names the file in errors.
    fn from_batch(batch: &RecordBatch, path: &Path) -> Result<Vec<Self>>;
}

/// Outcome of fetching and preparing one image. Stored as a string in the `status` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SampleStatus {
    Success,
    /// The server answered with a non-2xx status.
    HttpError,
    /// No complete answer within the per-request timeout.
    Timeout,
    /// Connection refused/reset, DNS failure.
    ConnectionError,
    /// Too many redirects, or a redirect loop.
    RedirectError,
    /// Body larger than `max_image_bytes`.
    TooLarge,
    /// The body ended before its declared length.
    Truncated,
    /// The bytes are not a decodable image, or the image is too small/large in pixels.
    DecodeError,
    /// `X-Robots-Tag` forbids use for AI (noai, noimageai, ...).
    RobotsDisallowed,
    /// The URL cannot be requested (bad scheme, unparsable).
    InvalidUrl,
}

impl SampleStatus {
    pub const ALL: [SampleStatus; 10] = [
        SampleStatus::Success,
        SampleStatus::HttpError,
        SampleStatus::Timeout,
        SampleStatus::ConnectionError,
        SampleStatus::RedirectError,
        SampleStatus::TooLarge,
        SampleStatus::Truncated,
        SampleStatus::DecodeError,
        SampleStatus::RobotsDisallowed,
        SampleStatus::InvalidUrl,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SampleStatus::Success => "success",
            SampleStatus::HttpError => "http_error",
            SampleStatus::Timeout => "timeout",
            SampleStatus::ConnectionError => "connection_error",
            SampleStatus::RedirectError => "redirect_error",
            SampleStatus::TooLarge => "too_large",
            SampleStatus::Truncated => "truncated",
            SampleStatus::DecodeError => "decode_error",
            SampleStatus::RobotsDisallowed => "robots_disallowed",
            SampleStatus::InvalidUrl => "invalid_url",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    pub fn is_success(self) -> bool {
        self == SampleStatus::Success
    }
}

/// One image–caption sample (Conceptual Captions, or the synthetic set).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageTextSample {
    /// Stable id: the zero-padded 0-based row index in the source file (`000000042`).
    pub key: String,
    pub url: String,
    pub caption: String,
    pub status: SampleStatus,
    /// Human-readable cause when `status` is not success.
    pub error: Option<String>,
    /// Size of the stored (resized) image.
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Size of the image as downloaded.
    pub original_width: Option<u32>,
    pub original_height: Option<u32>,
    /// sha256 (hex) of the stored image bytes.
    pub sha256: Option<String>,
    /// JPEG bytes of the stored image.
    pub image: Option<Vec<u8>>,
}

impl ImageTextSample {
    /// A sample that failed with `status` before any image was obtained.
    pub fn failed(
        key: String,
        url: String,
        caption: String,
        status: SampleStatus,
        error: String,
    ) -> Self {
        Self {
            key,
            url,
            caption,
            status,
            error: Some(error),
            width: None,
            height: None,
            original_width: None,
            original_height: None,
            sha256: None,
            image: None,
        }
    }
}

/// One preference pair (UltraFeedback, or image-grounded pairs).
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub pair_id: String,
    /// Where the pair came from (`ultrafeedback_binarized`, `ultrafeedback_raw:sharegpt`, `synthetic`).
    pub source: String,
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    pub score_chosen: f64,
    pub score_rejected: f64,
    /// Key of the image the pair is about; `None` for text-only pairs.
    pub image_key: Option<String>,
}

/// One frame of a story (StoryReasoning, or the synthetic stories).
#[derive(Debug, Clone, PartialEq)]
pub struct StoryFrame {
    pub story_id: String,
    /// 0-based position in the story.
    pub frame_index: i32,
    pub frame_count: i32,
    /// Encoded image bytes as found in the source (JPEG or PNG).
    pub image: Vec<u8>,
    pub caption: String,
}

/// One logged value of a training run (`runs/<id>/metrics.parquet`, long format).
#[derive(Debug, Clone, PartialEq)]
pub struct MetricRow {
    pub run_id: String,
    /// `train-sft`, `train-dpo`, ...
    pub stage: String,
    /// Optimizer steps done when the value was logged.
    pub step: i64,
    pub epoch: i64,
    /// `train` or `val`.
    pub split: String,
    /// `loss`, `lr`, `grad_norm`, `rewards/accuracies`, ...
    pub name: String,
    pub value: f64,
}

/// One generated caption (`runs/<id>/generations.parquet`).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRow {
    pub run_id: String,
    /// Which checkpoint: `untrained`, `train-sft`, `train-dpo`, ...
    pub model: String,
    /// Decoding: `greedy`, `beam3`, `top_p0.9_t1`.
    pub method: String,
    pub dataset: String,
    pub split: String,
    pub image_key: String,
    pub caption: String,
    /// Sum of the generated tokens' log-probabilities.
    pub logprob: f64,
    pub tokens: i32,
}

fn field(name: &str, dt: DataType, nullable: bool) -> Field {
    Field::new(name, dt, nullable)
}

/// `(key, caption)` of the samples of an ingest shard that have an image (CC/synthetic
/// samples whose download succeeded, every story frame), reading no image bytes; and the
/// number of samples left out.
pub fn shard_captions(path: &Path) -> Result<(Vec<(String, String)>, u64)> {
    let batches = crate::data::shard::read_columns(
        path,
        &["key", "caption", "status", "story_id", "frame_index"],
    )?;
    let mut rows = Vec::new();
    let mut skipped = 0u64;
    for batch in &batches {
        let caption = column::<StringArray>(batch, "caption", path)?;
        if batch.column_by_name("story_id").is_some() {
            let story = column::<StringArray>(batch, "story_id", path)?;
            let frame = column::<Int32Array>(batch, "frame_index", path)?;
            for i in 0..batch.num_rows() {
                let key = crate::stages::embed::story_frame_key(story.value(i), frame.value(i));
                rows.push((key, caption.value(i).to_string()));
            }
            continue;
        }
        let key = column::<StringArray>(batch, "key", path)?;
        let status = column::<StringArray>(batch, "status", path)?;
        for i in 0..batch.num_rows() {
            if SampleStatus::parse(status.value(i)).is_some_and(SampleStatus::is_success) {
                rows.push((key.value(i).to_string(), caption.value(i).to_string()));
            } else {
                skipped += 1;
            }
        }
    }
    Ok((rows, skipped))
}

/// Typed access to a named column; the error names file, column and expected type.
fn column<'a, A: Array + 'static>(
    batch: &'a RecordBatch,
    name: &str,
    path: &Path,
) -> Result<&'a A> {
    let col = batch.column_by_name(name).ok_or_else(|| Error::BadFile {
        path: path.to_path_buf(),
        message: format!("missing column `{name}`"),
    })?;
    col.as_any()
        .downcast_ref::<A>()
        .ok_or_else(|| Error::BadFile {
            path: path.to_path_buf(),
            message: format!(
                "column `{name}` has type {}, expected {}",
                col.data_type(),
                std::any::type_name::<A>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("?")
            ),
        })
}

fn opt_string(a: &StringArray, i: usize) -> Option<String> {
    a.is_valid(i).then(|| a.value(i).to_string())
}

fn opt_u32(a: &UInt32Array, i: usize) -> Option<u32> {
    a.is_valid(i).then(|| a.value(i))
}

fn batch(schema: SchemaRef, columns: Vec<ArrayRef>) -> Result<RecordBatch> {
    RecordBatch::try_new(schema, columns).map_err(|source| Error::Arrow {
        context: "building a record batch".into(),
        source,
    })
}

impl Record for ImageTextSample {
    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            field("key", DataType::Utf8, false),
            field("url", DataType::Utf8, false),
            field("caption", DataType::Utf8, false),
            field("status", DataType::Utf8, false),
            field("error", DataType::Utf8, true),
            field("width", DataType::UInt32, true),
            field("height", DataType::UInt32, true),
            field("original_width", DataType::UInt32, true),
            field("original_height", DataType::UInt32, true),
            field("sha256", DataType::Utf8, true),
            field("image", DataType::Binary, true),
        ]))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let strings = |f: &dyn Fn(&Self) -> Option<&str>| -> ArrayRef {
            Arc::new(rows.iter().map(f).collect::<StringArray>())
        };
        let u32s = |f: &dyn Fn(&Self) -> Option<u32>| -> ArrayRef {
            Arc::new(rows.iter().map(f).collect::<UInt32Array>())
        };
        let mut images = BinaryBuilder::with_capacity(
            rows.len(),
            rows.iter()
                .map(|r| r.image.as_ref().map_or(0, Vec::len))
                .sum(),
        );
        for r in rows {
            images.append_option(r.image.as_deref());
        }
        batch(
            Self::schema(),
            vec![
                strings(&|r| Some(&r.key)),
                strings(&|r| Some(&r.url)),
                strings(&|r| Some(&r.caption)),
                strings(&|r| Some(r.status.as_str())),
                strings(&|r| r.error.as_deref()),
                u32s(&|r| r.width),
                u32s(&|r| r.height),
                u32s(&|r| r.original_width),
                u32s(&|r| r.original_height),
                strings(&|r| r.sha256.as_deref()),
                Arc::new(images.finish()),
            ],
        )
    }

    fn from_batch(b: &RecordBatch, path: &Path) -> Result<Vec<Self>> {
        let key = column::<StringArray>(b, "key", path)?;
        let url = column::<StringArray>(b, "url", path)?;
        let caption = column::<StringArray>(b, "caption", path)?;
        let status = column::<StringArray>(b, "status", path)?;
        let error = column::<StringArray>(b, "error", path)?;
        let width = column::<UInt32Array>(b, "width", path)?;
        let height = column::<UInt32Array>(b, "height", path)?;
        let owidth = column::<UInt32Array>(b, "original_width", path)?;
        let oheight = column::<UInt32Array>(b, "original_height", path)?;
        let sha = column::<StringArray>(b, "sha256", path)?;
        let image = column::<BinaryArray>(b, "image", path)?;
        (0..b.num_rows())
            .map(|i| {
                let status =
                    SampleStatus::parse(status.value(i)).ok_or_else(|| Error::BadFile {
                        path: path.to_path_buf(),
                        message: format!(
                            "sample `{}`: unknown status `{}`",
                            key.value(i),
                            status.value(i)
                        ),
                    })?;
                Ok(ImageTextSample {
                    key: key.value(i).to_string(),
                    url: url.value(i).to_string(),
                    caption: caption.value(i).to_string(),
                    status,
                    error: opt_string(error, i),
                    width: opt_u32(width, i),
                    height: opt_u32(height, i),
                    original_width: opt_u32(owidth, i),
                    original_height: opt_u32(oheight, i),
                    sha256: opt_string(sha, i),
                    image: image.is_valid(i).then(|| image.value(i).to_vec()),
                })
            })
            .collect()
    }
}

impl Record for PreferencePair {
    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            field("pair_id", DataType::Utf8, false),
            field("source", DataType::Utf8, false),
            field("prompt", DataType::Utf8, false),
            field("chosen", DataType::Utf8, false),
            field("rejected", DataType::Utf8, false),
            field("score_chosen", DataType::Float64, false),
            field("score_rejected", DataType::Float64, false),
            field("image_key", DataType::Utf8, true),
        ]))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let s = |f: &dyn Fn(&Self) -> Option<&str>| -> ArrayRef {
            Arc::new(rows.iter().map(f).collect::<StringArray>())
        };
        batch(
            Self::schema(),
            vec![
                s(&|r| Some(&r.pair_id)),
                s(&|r| Some(&r.source)),
                s(&|r| Some(&r.prompt)),
                s(&|r| Some(&r.chosen)),
                s(&|r| Some(&r.rejected)),
                Arc::new(
                    rows.iter()
                        .map(|r| Some(r.score_chosen))
                        .collect::<Float64Array>(),
                ),
                Arc::new(
                    rows.iter()
                        .map(|r| Some(r.score_rejected))
                        .collect::<Float64Array>(),
                ),
                s(&|r| r.image_key.as_deref()),
            ],
        )
    }

    fn from_batch(b: &RecordBatch, path: &Path) -> Result<Vec<Self>> {
        let pair_id = column::<StringArray>(b, "pair_id", path)?;
        let source = column::<StringArray>(b, "source", path)?;
        let prompt = column::<StringArray>(b, "prompt", path)?;
        let chosen = column::<StringArray>(b, "chosen", path)?;
        let rejected = column::<StringArray>(b, "rejected", path)?;
        let sc = column::<Float64Array>(b, "score_chosen", path)?;
        let sr = column::<Float64Array>(b, "score_rejected", path)?;
        let image_key = column::<StringArray>(b, "image_key", path)?;
        Ok((0..b.num_rows())
            .map(|i| PreferencePair {
                pair_id: pair_id.value(i).to_string(),
                source: source.value(i).to_string(),
                prompt: prompt.value(i).to_string(),
                chosen: chosen.value(i).to_string(),
                rejected: rejected.value(i).to_string(),
                score_chosen: sc.value(i),
                score_rejected: sr.value(i),
                image_key: opt_string(image_key, i),
            })
            .collect())
    }
}

impl Record for StoryFrame {
    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            field("story_id", DataType::Utf8, false),
            field("frame_index", DataType::Int32, false),
            field("frame_count", DataType::Int32, false),
            field("image", DataType::Binary, false),
            field("caption", DataType::Utf8, false),
        ]))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        batch(
            Self::schema(),
            vec![
                Arc::new(
                    rows.iter()
                        .map(|r| Some(r.story_id.as_str()))
                        .collect::<StringArray>(),
                ),
                Arc::new(rows.iter().map(|r| r.frame_index).collect::<Int32Array>()),
                Arc::new(rows.iter().map(|r| r.frame_count).collect::<Int32Array>()),
                Arc::new(
                    rows.iter()
                        .map(|r| Some(r.image.as_slice()))
                        .collect::<BinaryArray>(),
                ),
                Arc::new(
                    rows.iter()
                        .map(|r| Some(r.caption.as_str()))
                        .collect::<StringArray>(),
                ),
            ],
        )
    }

    fn from_batch(b: &RecordBatch, path: &Path) -> Result<Vec<Self>> {
        let story_id = column::<StringArray>(b, "story_id", path)?;
        let frame_index = column::<Int32Array>(b, "frame_index", path)?;
        let frame_count = column::<Int32Array>(b, "frame_count", path)?;
        let image = column::<BinaryArray>(b, "image", path)?;
        let caption = column::<StringArray>(b, "caption", path)?;
        Ok((0..b.num_rows())
            .map(|i| StoryFrame {
                story_id: story_id.value(i).to_string(),
                frame_index: frame_index.value(i),
                frame_count: frame_count.value(i),
                image: image.value(i).to_vec(),
                caption: caption.value(i).to_string(),
            })
            .collect())
    }
}

impl Record for GenerationRow {
    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            field("run_id", DataType::Utf8, false),
            field("model", DataType::Utf8, false),
            field("method", DataType::Utf8, false),
            field("dataset", DataType::Utf8, false),
            field("split", DataType::Utf8, false),
            field("image_key", DataType::Utf8, false),
            field("caption", DataType::Utf8, false),
            field("logprob", DataType::Float64, false),
            field("tokens", DataType::Int32, false),
        ]))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let s = |f: &dyn Fn(&Self) -> &str| -> ArrayRef {
            Arc::new(rows.iter().map(|r| Some(f(r))).collect::<StringArray>())
        };
        batch(
            Self::schema(),
            vec![
                s(&|r| &r.run_id),
                s(&|r| &r.model),
                s(&|r| &r.method),
                s(&|r| &r.dataset),
                s(&|r| &r.split),
                s(&|r| &r.image_key),
                s(&|r| &r.caption),
                Arc::new(
                    rows.iter()
                        .map(|r| Some(r.logprob))
                        .collect::<Float64Array>(),
                ),
                Arc::new(rows.iter().map(|r| r.tokens).collect::<Int32Array>()),
            ],
        )
    }

    fn from_batch(b: &RecordBatch, path: &Path) -> Result<Vec<Self>> {
        let get = |n: &str| column::<StringArray>(b, n, path);
        let (run_id, model, method, dataset, split, key, caption) = (
            get("run_id")?,
            get("model")?,
            get("method")?,
            get("dataset")?,
            get("split")?,
            get("image_key")?,
            get("caption")?,
        );
        let logprob = column::<Float64Array>(b, "logprob", path)?;
        let tokens = column::<Int32Array>(b, "tokens", path)?;
        Ok((0..b.num_rows())
            .map(|i| GenerationRow {
                run_id: run_id.value(i).to_string(),
                model: model.value(i).to_string(),
                method: method.value(i).to_string(),
                dataset: dataset.value(i).to_string(),
                split: split.value(i).to_string(),
                image_key: key.value(i).to_string(),
                caption: caption.value(i).to_string(),
                logprob: logprob.value(i),
                tokens: tokens.value(i),
            })
            .collect())
    }
}

impl Record for MetricRow {
    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            field("run_id", DataType::Utf8, false),
            field("stage", DataType::Utf8, false),
            field("step", DataType::Int64, false),
            field("epoch", DataType::Int64, false),
            field("split", DataType::Utf8, false),
            field("name", DataType::Utf8, false),
            field("value", DataType::Float64, false),
        ]))
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let s = |f: &dyn Fn(&Self) -> &str| -> ArrayRef {
            Arc::new(rows.iter().map(|r| Some(f(r))).collect::<StringArray>())
        };
        batch(
            Self::schema(),
            vec![
                s(&|r| &r.run_id),
                s(&|r| &r.stage),
                Arc::new(rows.iter().map(|r| r.step).collect::<Int64Array>()),
                Arc::new(rows.iter().map(|r| r.epoch).collect::<Int64Array>()),
                s(&|r| &r.split),
                s(&|r| &r.name),
                Arc::new(rows.iter().map(|r| Some(r.value)).collect::<Float64Array>()),
            ],
        )
    }

    fn from_batch(b: &RecordBatch, path: &Path) -> Result<Vec<Self>> {
        let run_id = column::<StringArray>(b, "run_id", path)?;
        let stage = column::<StringArray>(b, "stage", path)?;
        let step = column::<Int64Array>(b, "step", path)?;
        let epoch = column::<Int64Array>(b, "epoch", path)?;
        let split = column::<StringArray>(b, "split", path)?;
        let name = column::<StringArray>(b, "name", path)?;
        let value = column::<Float64Array>(b, "value", path)?;
        Ok((0..b.num_rows())
            .map(|i| MetricRow {
                run_id: run_id.value(i).to_string(),
                stage: stage.value(i).to_string(),
                step: step.value(i),
                epoch: epoch.value(i),
                split: split.value(i).to_string(),
                name: name.value(i).to_string(),
                value: value.value(i),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(i: u32, ok: bool) -> ImageTextSample {
        if ok {
            ImageTextSample {
                key: format!("{i:09}"),
                url: format!("http://x/{i}.jpg"),
                caption: "a red circle".into(),
                status: SampleStatus::Success,
                error: None,
                width: Some(224),
                height: Some(224),
                original_width: Some(640),
                original_height: Some(480),
                sha256: Some("ab".into()),
                image: Some(vec![1, 2, 3]),
            }
        } else {
            ImageTextSample::failed(
                format!("{i:09}"),
                "u".into(),
                "c".into(),
                SampleStatus::Timeout,
                "slow".into(),
            )
        }
    }

    #[test]
    fn image_samples_round_trip_through_arrow() {
        let rows = vec![sample(0, true), sample(1, false)];
        let b = ImageTextSample::to_batch(&rows).unwrap();
        assert_eq!(b.schema(), ImageTextSample::schema());
        assert_eq!(
            ImageTextSample::from_batch(&b, Path::new("t")).unwrap(),
            rows
        );
    }

    #[test]
    fn pairs_and_frames_round_trip_through_arrow() {
        let pairs = vec![PreferencePair {
            pair_id: "p".into(),
            source: "s".into(),
            prompt: "q".into(),
            chosen: "a".into(),
            rejected: "b".into(),
            score_chosen: 9.0,
            score_rejected: 2.5,
            image_key: None,
        }];
        let b = PreferencePair::to_batch(&pairs).unwrap();
        assert_eq!(
            PreferencePair::from_batch(&b, Path::new("t")).unwrap(),
            pairs
        );
        let frames = vec![StoryFrame {
            story_id: "12".into(),
            frame_index: 0,
            frame_count: 5,
            image: vec![9; 4],
            caption: "x".into(),
        }];
        let b = StoryFrame::to_batch(&frames).unwrap();
        assert_eq!(StoryFrame::from_batch(&b, Path::new("t")).unwrap(), frames);
    }

    #[test]
    fn wrong_column_type_names_file_and_column() {
        let b = StoryFrame::to_batch(&[]).unwrap();
        let err = PreferencePair::from_batch(&b, Path::new("data/x.parquet"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("data/x.parquet") && err.contains("pair_id"),
            "{err}"
        );
    }

    #[test]
    fn every_status_parses_back() {
        for s in SampleStatus::ALL {
            assert_eq!(SampleStatus::parse(s.as_str()), Some(s));
        }
    }
}
