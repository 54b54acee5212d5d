//! The records that stages exchange: the one place the on-disk contract of every table prefcap
//! writes is declared (README's "Schemas" section documents the same). Each is declared
//! with [`record!`]: one column per field, named as the field, nullable when it is an
//! `Option`.

use arrow::array::{Array, ArrayRef, StringArray};
use arrow::datatypes::DataType;

use crate::data::record::{record, Column};

pub use crate::data::record::Record;

/// Outcome of fetching and preparing one image. Stored as a string in the `status` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleStatus {
    Success,
    /// The server answered with a non-2xx status.
    HttpError,
    /// No complete answer within the per-request timeout.
    Timeout,
    /// Connection refused/reset, DNS failure.
    ConnectionError,
    /// Too many redirects, a loop, or a redirect that is not followed: to a URL that is not
    /// http(s) (`file:`, `data:`, `ftp:`), or without a `Location`; `error` names the target.
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

/// Stored as its name (`success`, `http_error`, ...).
impl Column for SampleStatus {
    const NULLABLE: bool = false;
    fn data_type() -> DataType {
        DataType::Utf8
    }
    fn to_array<'a>(values: impl ExactSizeIterator<Item = &'a Self>) -> ArrayRef {
        std::sync::Arc::new(StringArray::from_iter_values(values.map(|s| s.as_str())))
    }
    fn from_array(array: &dyn Array) -> std::result::Result<Vec<Self>, String> {
        String::from_array(array)?
            .iter()
            .enumerate()
            .map(|(row, s)| {
                SampleStatus::parse(s)
                    .ok_or_else(|| format!("row {}: unknown status `{s}`", row + 1))
            })
            .collect()
    }
}

record! {
    /// One image–caption sample (Conceptual Captions, or the synthetic set).
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

record! {
    /// One preference pair (UltraFeedback, or image-grounded pairs).
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
}

record! {
    /// One frame of a story (StoryReasoning, or the synthetic stories).
    pub struct StoryFrame {
        pub story_id: String,
        /// 0-based position in the story.
        pub frame_index: i32,
        pub frame_count: i32,
        /// Encoded image bytes as found in the source (JPEG or PNG).
        pub image: Vec<u8>,
        pub caption: String,
    }
}

impl StoryFrame {
    /// The frame's key in the feature cache and in pairs: `<story_id>:<frame_index>`.
    pub fn key(&self) -> String {
        story_frame_key(&self.story_id, self.frame_index)
    }
}

/// The key of frame `frame_index` of story `story_id`: `<story_id>:<frame_index>`.
pub fn story_frame_key(story_id: &str, frame_index: i32) -> String {
    format!("{story_id}:{frame_index}")
}

record! {
    /// One logged value of a training run (`runs/<id>/metrics.parquet`, long format).
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
}

record! {
    /// One generated caption (`runs/<id>/generations.parquet`).
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
}

record! {
    /// One scored caption (`runs/<id>/scores.parquet`).
    pub struct ScoreRow {
        pub run_id: String,
        pub model: String,
        pub method: String,
        pub image_key: String,
        pub caption: String,
        pub bleu_1: f64,
        pub bleu_2: f64,
        pub bleu_3: f64,
        pub bleu_4: f64,
        pub meteor: f64,
        pub rouge_l: f64,
        pub cider_d: f64,
        pub clip_score: Option<f64>,
        pub ref_clip_score: Option<f64>,
        /// Synthetic world only: share of the 5 attributes right.
        pub attribute_accuracy: Option<f64>,
        /// BERTScore precision, recall and F1, best over the references (`score.bertscore_model`).
        pub bertscore_p: Option<f64>,
        pub bertscore_r: Option<f64>,
        pub bertscore_f1: Option<f64>,
    }
}

record! {
    /// One corpus-level number (`runs/<id>/scores_summary.parquet`, long format).
    pub struct SummaryRow {
        pub run_id: String,
        pub model: String,
        pub method: String,
        pub metric: String,
        pub value: f64,
    }
}

record! {
    /// The frozen reference's log-probabilities of one pair's two completions, as DPO needs
    /// them (a reference-log-prob cache entry holds one per pair).
    pub struct ReferenceLogps {
        pub pair_id: String,
        pub ref_chosen: f64,
        pub ref_rejected: f64,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

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

    #[test]
    fn option_fields_are_nullable_columns_named_as_the_fields() {
        let schema = ScoreRow::schema();
        let columns: Vec<(&str, bool)> = schema
            .fields()
            .iter()
            .map(|f| (f.name().as_str(), f.is_nullable()))
            .collect();
        assert_eq!(
            columns[5..9],
            [
                ("bleu_1", false),
                ("bleu_2", false),
                ("bleu_3", false),
                ("bleu_4", false)
            ]
        );
        assert_eq!(
            columns[12..],
            [
                ("clip_score", true),
                ("ref_clip_score", true),
                ("attribute_accuracy", true),
                ("bertscore_p", true),
                ("bertscore_r", true),
                ("bertscore_f1", true)
            ]
        );
    }

    #[test]
    fn an_unknown_status_or_a_null_in_a_required_column_names_file_column_and_row() {
        let mut b = ImageTextSample::to_batch(&[sample(0, true), sample(1, true)]).unwrap();
        let status = b.schema().index_of("status").unwrap();
        let mut columns = b.columns().to_vec();
        columns[status] = std::sync::Arc::new(StringArray::from(vec!["success", "lost"]));
        b = arrow::array::RecordBatch::try_new(b.schema(), columns.clone()).unwrap();
        let err = ImageTextSample::from_batch(&b, Path::new("data/s.parquet"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("data/s.parquet")
                && err.contains("`status`")
                && err.contains("row 2")
                && err.contains("lost"),
            "{err}"
        );
        let key = b.schema().index_of("key").unwrap();
        columns[status] = std::sync::Arc::new(StringArray::from(vec!["success", "success"]));
        columns[key] = std::sync::Arc::new(StringArray::from(vec![Some("a"), None]));
        let relaxed = arrow::datatypes::Schema::new(
            b.schema()
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true))
                .collect::<Vec<_>>(),
        );
        let b = arrow::array::RecordBatch::try_new(std::sync::Arc::new(relaxed), columns).unwrap();
        let err = ImageTextSample::from_batch(&b, Path::new("data/s.parquet"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`key`") && err.contains("null"), "{err}");
    }
}
