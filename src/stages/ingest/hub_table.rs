//! Hub parquet access (typed columns that tolerate the large/view variants of strings, binary
//! and lists) and the resumable split writer shared by the hub sources.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::time::Instant;

use arrow::array::{Array, ArrayRef, AsArray, BinaryArray, Float64Array, RecordBatch, StringArray};
use arrow::compute::{can_cast_types, cast};
use arrow::datatypes::DataType;
use sha2::{Digest, Sha256};

use crate::data::hub::HubFile;
use crate::data::records::Record;
use crate::data::shard::{read_batches, ShardStats};
use crate::error::{Error, Result};
use crate::stages::ingest::{Destination, SplitSummary};

/// Calls `f(batch, index of the batch's first row in the file)` for each record batch of
/// the parquet file at `path` (through [`read_batches`], so errors name the file).
pub fn for_each_batch(
    path: &Path,
    mut f: impl FnMut(&RecordBatch, usize) -> Result<()>,
) -> Result<()> {
    let mut offset = 0;
    for batch in read_batches(path)? {
        let batch = batch?;
        f(&batch, offset)?;
        offset += batch.num_rows();
    }
    Ok(())
}

fn named<'a>(batch: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a ArrayRef> {
    batch.column_by_name(name).ok_or_else(|| Error::BadFile {
        path: path.to_path_buf(),
        message: format!("missing column `{name}`"),
    })
}

/// `array` cast to `to` (Utf8 from LargeUtf8/Utf8View, Float64 from Float32, ...).
fn cast_to(array: &dyn Array, to: &DataType, what: &str, path: &Path) -> Result<ArrayRef> {
    let wrong = || Error::BadFile {
        path: path.to_path_buf(),
        message: format!("{what} has type {}, expected {to}", array.data_type()),
    };
    if array.data_type().is_nested() || !can_cast_types(array.data_type(), to) {
        return Err(wrong());
    }
    cast(array, to).map_err(|_| wrong())
}

pub fn text_column(batch: &RecordBatch, name: &str, path: &Path) -> Result<StringArray> {
    let a = cast_to(
        named(batch, name, path)?,
        &DataType::Utf8,
        &format!("column `{name}`"),
        path,
    )?;
    Ok(a.as_string::<i32>().clone())
}

pub fn f64_column(batch: &RecordBatch, name: &str, path: &Path) -> Result<Float64Array> {
    let a = cast_to(
        named(batch, name, path)?,
        &DataType::Float64,
        &format!("column `{name}`"),
        path,
    )?;
    Ok(a.as_primitive::<arrow::datatypes::Float64Type>().clone())
}

/// A list column of either offset width, seen as per-row ranges into its child values.
pub struct ListColumn {
    name: String,
    list: ArrayRef,
    offsets: Vec<usize>,
    values: ArrayRef,
}

pub fn list_column(batch: &RecordBatch, name: &str, path: &Path) -> Result<ListColumn> {
    let list = named(batch, name, path)?.clone();
    let (offsets, values) = if let Some(l) = list.as_list_opt::<i32>() {
        (
            l.value_offsets().iter().map(|&o| o as usize).collect(),
            l.values().clone(),
        )
    } else if let Some(l) = list.as_list_opt::<i64>() {
        (
            l.value_offsets().iter().map(|&o| o as usize).collect(),
            l.values().clone(),
        )
    } else {
        return Err(Error::BadFile {
            path: path.to_path_buf(),
            message: format!(
                "column `{name}` has type {}, expected a list",
                list.data_type()
            ),
        });
    };
    Ok(ListColumn {
        name: name.to_string(),
        list,
        offsets,
        values,
    })
}

impl ListColumn {
    /// Indices into the child values of row `row`'s items; `None` when the row is null.
    pub fn range(&self, row: usize) -> Option<Range<usize>> {
        (!self.list.is_null(row)).then(|| self.offsets[row]..self.offsets[row + 1])
    }

    /// Whether child item `j` is itself null.
    pub fn is_entry_null(&self, j: usize) -> bool {
        self.values.is_null(j)
    }

    fn struct_field(&self, field: &str, path: &Path) -> Result<&ArrayRef> {
        let s = self.values.as_struct_opt().ok_or_else(|| Error::BadFile {
            path: path.to_path_buf(),
            message: format!(
                "column `{}` holds {}, expected a list of structs",
                self.name,
                self.values.data_type()
            ),
        })?;
        s.column_by_name(field).ok_or_else(|| Error::BadFile {
            path: path.to_path_buf(),
            message: format!(
                "column `{}`: its structs have no field `{field}`",
                self.name
            ),
        })
    }

    /// The named string fields of the child structs, indexable like the child values.
    pub fn struct_texts(&self, fields: &[&str], path: &Path) -> Result<Vec<StringArray>> {
        fields
            .iter()
            .map(|f| {
                let what = format!("column `{}` field `{f}`", self.name);
                let a = cast_to(self.struct_field(f, path)?, &DataType::Utf8, &what, path)?;
                Ok(a.as_string::<i32>().clone())
            })
            .collect()
    }

    /// The named binary field of the child structs (Binary from LargeBinary/BinaryView).
    pub fn struct_binary(&self, field: &str, path: &Path) -> Result<BinaryArray> {
        let what = format!("column `{}` field `{field}`", self.name);
        let a = cast_to(
            self.struct_field(field, path)?,
            &DataType::Binary,
            &what,
            path,
        )?;
        Ok(a.as_binary::<i32>().clone())
    }
}

/// Provenance written into every shard's stats: `repo@commit settings=<digest>`. A shard
/// whose stats carry the same string holds exactly the rows this run would write.
pub fn provenance(repo: &str, files: &[HubFile], settings: &serde_json::Value) -> String {
    let commit = files.first().map_or("?", |f| f.commit.as_str());
    let digest = hex::encode(Sha256::digest(settings.to_string().as_bytes()));
    format!("{repo}@{commit} settings={}", &digest[..12])
}

/// A unit of a split's output, in order: rows that share a shard, or a count to record.
pub enum Unit<R> {
    /// Rows written together: one pair, or all the frames of one story.
    Rows(Vec<R>),
    /// An event counted in the stats `failures` map (a dropped pair, a repaired story).
    Count(&'static str, u64),
}

/// Rows and counts of one planned shard.
#[derive(Debug)]
pub struct PlannedShard<R> {
    pub rows: Vec<R>,
    pub counts: BTreeMap<String, u64>,
}

/// Packs units into shards of at most `shard_size` rows without splitting a unit (a unit
/// larger than `shard_size` gets a shard of its own). Counts go to the shard being filled
/// when they are seen; counts after the last row go to the last shard. A split with no rows
/// still gets one (empty) shard, so that it is marked finished and its counts are kept.
pub fn plan_shards<R>(units: Vec<Unit<R>>, shard_size: usize) -> Vec<PlannedShard<R>> {
    let mut shards = Vec::new();
    let mut cur = PlannedShard {
        rows: Vec::new(),
        counts: BTreeMap::new(),
    };
    for unit in units {
        match unit {
            Unit::Count(key, n) => *cur.counts.entry(key.to_string()).or_default() += n,
            Unit::Rows(rows) => {
                if !cur.rows.is_empty() && cur.rows.len() + rows.len() > shard_size {
                    shards.push(std::mem::replace(
                        &mut cur,
                        PlannedShard {
                            rows: Vec::new(),
                            counts: BTreeMap::new(),
                        },
                    ));
                }
                cur.rows.extend(rows);
            }
        }
    }
    match shards.last_mut() {
        Some(last) if cur.rows.is_empty() => {
            for (k, n) in cur.counts {
                *last.counts.entry(k).or_default() += n;
            }
        }
        _ => shards.push(cur),
    }
    shards
}

/// Writes the planned shards of `data/<dataset>/<split>/`, skipping each shard that is
/// already finished with the same `source`, and removes finished shards past the end of the
/// plan. A shard's `duration_secs` is the wall time since the previous shard was written
/// (for the first: since `started`, so it includes fetching and parsing).
pub fn write_split<R: Record>(
    dest: Destination,
    dataset: &str,
    split: &str,
    source: &str,
    shard_size: usize,
    units: Vec<Unit<R>>,
    started: Instant,
) -> Result<SplitSummary> {
    let set = dest.set(dataset, split);
    set.prepare()?;
    let planned = plan_shards(units, shard_size);
    let shards = u32::try_from(planned.len()).map_err(|_| {
        Error::Config(format!(
            "{dataset}/{split}: too many shards; raise shard_size"
        ))
    })?;
    dest.sharding.plan_shards(set.rel(), source, shards)?;
    let mut summary = SplitSummary {
        dataset: dataset.to_string(),
        split: split.to_string(),
        ..SplitSummary::default()
    };
    let mut last = started;
    for (i, shard) in planned.iter().enumerate() {
        let idx = i as u32;
        if !dest.sharding.owns(idx) {
            continue;
        }
        summary.rows += shard.rows.len() as u64;
        let same = set.is_finished(idx)
            && set
                .read_stats(idx)
                .map(|s| s.source == source)
                .unwrap_or(false);
        if same {
            summary.shards_skipped += 1;
            continue;
        }
        let stats = ShardStats {
            shard: idx,
            count: shard.rows.len() as u64,
            successes: shard.rows.len() as u64,
            failures: shard.counts.clone(),
            duration_secs: last.elapsed().as_secs_f64(),
            source: source.to_string(),
            bytes: 0,
        };
        set.write(idx, &shard.rows, &stats)?;
        last = Instant::now();
        summary.shards_written += 1;
    }
    for stale in set
        .finished()?
        .into_iter()
        .filter(|&s| s >= shards && dest.sharding.owns(s))
    {
        set.remove(stale)?;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(shard: &PlannedShard<u32>) -> Vec<(&str, u64)> {
        shard.counts.iter().map(|(k, v)| (k.as_str(), *v)).collect()
    }

    #[test]
    fn units_are_packed_without_splitting_and_counts_follow_the_rows() {
        let units = vec![
            Unit::Count("dropped_tie", 1),
            Unit::Rows(vec![1, 2]),
            Unit::Rows(vec![3, 4]),
            Unit::Count("dropped_margin", 2),
            Unit::Rows(vec![5, 6, 7, 8, 9]),
            Unit::Rows(vec![10]),
            Unit::Count("dropped_tie", 3),
        ];
        let shards = plan_shards(units, 4);
        let rows: Vec<Vec<u32>> = shards.iter().map(|s| s.rows.clone()).collect();
        assert_eq!(rows, vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8, 9], vec![10]]);
        assert_eq!(
            counts(&shards[0]),
            vec![("dropped_margin", 2), ("dropped_tie", 1)]
        );
        assert_eq!(counts(&shards[2]), vec![("dropped_tie", 3)]);
    }

    #[test]
    fn a_split_without_rows_still_gets_one_shard_with_its_counts() {
        let shards = plan_shards::<u32>(vec![Unit::Count("dropped_tie", 2)], 10);
        assert_eq!(shards.len(), 1);
        assert!(shards[0].rows.is_empty());
        assert_eq!(counts(&shards[0]), vec![("dropped_tie", 2)]);
    }
}
