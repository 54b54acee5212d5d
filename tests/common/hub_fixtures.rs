//! Hugging Face hub datasets as the mock hub serves them: Parquet in the hub's schemas
//! (UltraFeedback binarized's conversations, large string/list variants).

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Float64Array, LargeListArray, LargeStringArray, ListArray, RecordBatch, StringArray,
    StructArray,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{Field, Fields};
use parquet::arrow::ArrowWriter;

/// HuggingFaceH4/ultrafeedback_binarized, at the revision the default config pins.
pub const H4: &str = "HuggingFaceH4/ultrafeedback_binarized";
/// The revision the default config pins; fixtures are served there, so the pin is exercised.
pub const H4_REV: &str = "3949bf5f8c17c394422ccfab0c31ea9c20bdeb85";

pub fn parquet_bytes(columns: Vec<(&str, ArrayRef)>) -> Vec<u8> {
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    out
}

pub fn strings(values: &[&str], large: bool) -> ArrayRef {
    if large {
        Arc::new(
            values
                .iter()
                .map(|v| Some(*v))
                .collect::<LargeStringArray>(),
        )
    } else {
        Arc::new(values.iter().map(|v| Some(*v)).collect::<StringArray>())
    }
}

/// `list<item>` (or `large_list`) with one list per row over the flattened `values`.
pub fn list_of(values: ArrayRef, lengths: &[usize], large: bool) -> ArrayRef {
    let item = Arc::new(Field::new("item", values.data_type().clone(), true));
    if large {
        let offsets = OffsetBuffer::<i64>::from_lengths(lengths.iter().copied());
        Arc::new(LargeListArray::new(item, offsets, values, None))
    } else {
        let offsets = OffsetBuffer::<i32>::from_lengths(lengths.iter().copied());
        Arc::new(ListArray::new(item, offsets, values, None))
    }
}

/// H4 conversation column: `list<struct<content: string, role: string>>`.
pub fn conversations(rows: &[Vec<(&str, &str)>], large: bool) -> ArrayRef {
    let flat: Vec<(&str, &str)> = rows.iter().flatten().copied().collect();
    let contents: Vec<&str> = flat.iter().map(|(_, c)| *c).collect();
    let roles: Vec<&str> = flat.iter().map(|(r, _)| *r).collect();
    let content = strings(&contents, large);
    let role = strings(&roles, large);
    let fields = Fields::from(vec![
        Field::new("content", content.data_type().clone(), true),
        Field::new("role", role.data_type().clone(), true),
    ]);
    let structs = StructArray::new(fields, vec![content, role], None);
    let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
    list_of(Arc::new(structs), &lengths, large)
}

/// One H4 `*_prefs` row: prompt, chosen response, rejected response and the two scores.
pub struct H4Row {
    pub prompt: String,
    pub chosen: Vec<(&'static str, String)>,
    pub rejected: String,
    pub scores: (f64, f64),
}

pub fn h4_row(prompt: &str, chosen: &str, rejected: &str, scores: (f64, f64)) -> H4Row {
    H4Row {
        prompt: prompt.into(),
        chosen: vec![("user", prompt.into()), ("assistant", chosen.into())],
        rejected: rejected.into(),
        scores,
    }
}

pub fn h4_parquet(rows: &[H4Row], large: bool) -> Vec<u8> {
    let prompts: Vec<&str> = rows.iter().map(|r| r.prompt.as_str()).collect();
    let ids: Vec<String> = rows
        .iter()
        .map(|r| format!("id-{}", r.prompt.len()))
        .collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let chosen: Vec<Vec<(&str, &str)>> = rows
        .iter()
        .map(|r| {
            r.chosen
                .iter()
                .map(|(role, c)| (*role, c.as_str()))
                .collect()
        })
        .collect();
    let rejected: Vec<Vec<(&str, &str)>> = rows
        .iter()
        .map(|r| {
            vec![
                ("user", r.prompt.as_str()),
                ("assistant", r.rejected.as_str()),
            ]
        })
        .collect();
    parquet_bytes(vec![
        ("prompt", strings(&prompts, large)),
        ("prompt_id", strings(&id_refs, large)),
        ("chosen", conversations(&chosen, large)),
        ("rejected", conversations(&rejected, large)),
        ("messages", conversations(&chosen, large)),
        (
            "score_chosen",
            Arc::new(
                rows.iter()
                    .map(|r| Some(r.scores.0))
                    .collect::<Float64Array>(),
            ),
        ),
        (
            "score_rejected",
            Arc::new(
                rows.iter()
                    .map(|r| Some(r.scores.1))
                    .collect::<Float64Array>(),
            ),
        ),
    ])
}
