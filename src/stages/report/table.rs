//! A report table as cells, from a polars frame: what the terminal printout and the HTML page
//! both show (numbers with 4 significant digits), and the terminal layout that fits 100
//! columns.

use polars::prelude::{AnyValue, DataFrame};

/// Widest line the terminal printout makes.
pub const TERMINAL_WIDTH: usize = 100;

/// One cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Text(String),
    Int(i64),
    Num(f64),
    Empty,
}

impl Cell {
    fn of(v: AnyValue) -> Self {
        match v {
            AnyValue::Null => Cell::Empty,
            AnyValue::String(s) => Cell::Text(s.to_string()),
            AnyValue::StringOwned(s) => Cell::Text(s.to_string()),
            AnyValue::Float64(x) => Cell::Num(x),
            AnyValue::Float32(x) => Cell::Num(x as f64),
            AnyValue::Int64(x) => Cell::Int(x),
            AnyValue::Int32(x) => Cell::Int(x as i64),
            AnyValue::UInt32(x) => Cell::Int(x as i64),
            AnyValue::UInt64(x) => Cell::Int(x as i64),
            AnyValue::Boolean(b) => Cell::Text(b.to_string()),
            other => Cell::Text(other.to_string()),
        }
    }

    pub fn is_numeric(&self) -> bool {
        matches!(self, Cell::Int(_) | Cell::Num(_))
    }
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cell::Text(s) => write!(f, "{s}"),
            Cell::Int(x) => write!(f, "{x}"),
            Cell::Num(x) => write!(f, "{}", significant(*x, 4)),
            Cell::Empty => Ok(()),
        }
    }
}

/// `v` with `digits` significant digits and no exponent in the usual range; `NaN` stays.
pub fn significant(v: f64, digits: usize) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-4..1e7).contains(&a) {
        return format!("{v:.prec$e}", prec = digits.saturating_sub(1));
    }
    let decimals = (digits as i32 - 1 - a.log10().floor() as i32).max(0) as usize;
    format!("{v:.decimals$}")
}

/// A titled table.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
}

impl Table {
    pub fn from_frame(title: &str, df: &DataFrame) -> Self {
        let columns: Vec<String> = df
            .get_column_names()
            .iter()
            .map(|c| c.to_string())
            .collect();
        let mut rows: Vec<Vec<Cell>> = (0..df.height())
            .map(|i| {
                df.columns()
                    .iter()
                    .map(|c| c.get(i).map(Cell::of).unwrap_or(Cell::Empty))
                    .collect()
            })
            .collect();
        // A float column of whole numbers (counts, such as held-out pairs) reads as integers.
        for j in 0..columns.len() {
            let whole = |c: &Cell| match c {
                Cell::Num(x) => x.fract() == 0.0 && x.abs() < 1e15,
                _ => true,
            };
            // ... when some value is beyond 0 and 1 (a column of ones is a metric at its top).
            let count = rows
                .iter()
                .any(|r| matches!(r[j], Cell::Num(x) if x.abs() >= 2.0));
            if count && rows.iter().all(|r| whole(&r[j])) {
                for r in &mut rows {
                    if let Cell::Num(x) = r[j] {
                        r[j] = Cell::Int(x as i64);
                    }
                }
            }
        }
        Self {
            title: title.into(),
            columns,
            rows,
        }
    }

    fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }

    /// The table without column `name`.
    pub fn without(&self, name: &str) -> Self {
        let mut t = self.clone();
        if let Some(j) = self.column(name) {
            t.columns.remove(j);
            for r in &mut t.rows {
                r.remove(j);
            }
        }
        t
    }

    /// Renames column `from`.
    pub fn rename(&mut self, from: &str, to: &str) {
        if let Some(j) = self.column(from) {
            self.columns[j] = to.to_string();
        }
    }

    /// The table without the columns no row has a value in.
    pub fn without_empty_columns(&self) -> Self {
        let keep: Vec<usize> = (0..self.columns.len())
            .filter(|&j| self.rows.iter().any(|r| r[j] != Cell::Empty))
            .collect();
        Self {
            title: self.title.clone(),
            columns: keep.iter().map(|&j| self.columns[j].clone()).collect(),
            rows: self
                .rows
                .iter()
                .map(|r| keep.iter().map(|&j| r[j].clone()).collect())
                .collect(),
        }
    }

    /// Replaces every text of column `name` by `f` of it.
    pub fn map_texts(&mut self, name: &str, f: impl Fn(&str) -> String) {
        if let Some(j) = self.column(name) {
            for r in &mut self.rows {
                if let Cell::Text(s) = &r[j] {
                    r[j] = Cell::Text(f(s));
                }
            }
        }
    }

    /// The table as text no wider than `width`: the leading text columns (the row's key) on
    /// every line; the numeric columns in as many blocks as they need, each block repeating
    /// the key. Numbers right-aligned, text left-aligned.
    pub fn render(&self, width: usize) -> String {
        let cells: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| r.iter().map(|c| c.to_string()).collect())
            .collect();
        let numeric: Vec<bool> = (0..self.columns.len())
            .map(|j| self.rows.iter().any(|r| r[j].is_numeric()))
            .collect();
        let key = numeric
            .iter()
            .position(|n| *n)
            .unwrap_or(self.columns.len());
        // A header wider than its values breaks in two at a `_` or `/`.
        let headers: Vec<(String, String)> = (0..self.columns.len())
            .map(|j| {
                let values = cells
                    .iter()
                    .map(|r| r[j].chars().count())
                    .max()
                    .unwrap_or(0);
                split_header(&self.columns[j], values)
            })
            .collect();
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|j| {
                cells
                    .iter()
                    .map(|r| r[j].chars().count())
                    .chain([headers[j].0.chars().count(), headers[j].1.chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let key_width: usize = widths[..key].iter().map(|w| w + 2).sum();
        // Blocks of value columns that fit beside the key.
        let mut blocks: Vec<Vec<usize>> = Vec::new();
        let mut used = key_width;
        for (j, w) in widths.iter().enumerate().skip(key) {
            let w = w + 2;
            match blocks.last_mut() {
                Some(b) if used + w <= width => b.push(j),
                _ => {
                    blocks.push(vec![j]);
                    used = key_width;
                }
            }
            used += w;
        }
        if blocks.is_empty() {
            blocks.push(Vec::new());
        }
        let cell = |j: usize, s: &str| -> String {
            let pad = widths[j].saturating_sub(s.chars().count());
            if numeric[j] {
                format!("{}{s}", " ".repeat(pad))
            } else {
                format!("{s}{}", " ".repeat(pad))
            }
        };
        let mut out = format!("{}:\n", self.title);
        for block in &blocks {
            let shown: Vec<usize> = (0..key).chain(block.iter().copied()).collect();
            let two_lines = shown.iter().any(|&j| !headers[j].1.is_empty());
            let line = |texts: &dyn Fn(usize) -> String| -> String {
                let parts: Vec<String> = shown.iter().map(|&j| cell(j, &texts(j))).collect();
                format!("  {}", parts.join("  ")).trim_end().to_string()
            };
            out.push_str(&line(&|j| headers[j].0.clone()));
            out.push('\n');
            if two_lines {
                out.push_str(&line(&|j| headers[j].1.clone()));
                out.push('\n');
            }
            for r in &cells {
                out.push_str(&line(&|j| r[j].clone()));
                out.push('\n');
            }
        }
        out
    }
}

/// `header` as two lines when it is wider than `values` and has a `_` or `/` to break at
/// (the break that makes the wider line shortest, the separator kept at the first line's
/// end); else itself and an empty second line.
fn split_header(header: &str, values: usize) -> (String, String) {
    let n = header.chars().count();
    if n <= values.max(10) {
        return (header.to_string(), String::new());
    }
    let best = header
        .char_indices()
        .filter(|(_, c)| *c == '_' || *c == '/')
        .map(|(i, _)| i + 1)
        .filter(|&i| i < header.len())
        .min_by_key(|&i| header[..i].chars().count().max(header[i..].chars().count()));
    match best {
        Some(i) => (header[..i].to_string(), header[i..].to_string()),
        None => (header.to_string(), String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use polars::prelude::*;

    #[test]
    fn numbers_keep_four_significant_digits() {
        assert_eq!(significant(6.2601, 4), "6.260");
        assert_eq!(significant(0.891_666, 4), "0.8917");
        assert_eq!(significant(1234.56, 4), "1235");
        assert_eq!(significant(0.0, 4), "0");
        assert_eq!(significant(f64::NAN, 4), "NaN");
        assert_eq!(significant(2.5e-6, 4), "2.500e-6");
        assert_eq!(Cell::Num(0.5).to_string(), "0.5000");
        assert_eq!(
            split_header("skipped_nonfinite_batches", 1),
            ("skipped_".into(), "nonfinite_batches".into())
        );
        assert_eq!(
            split_header("i2t_r10", 1),
            ("i2t_r10".into(), String::new())
        );
    }

    #[test]
    fn a_wide_table_splits_into_blocks_that_fit_and_repeat_the_key() {
        let mut cols = vec![
            Column::new("model".into(), ["train-sft", "untrained"]),
            Column::new("method".into(), ["greedy", "beam3"]),
        ];
        for i in 0..14 {
            cols.push(Column::new(
                format!("metric_number_{i}").into(),
                [0.123456 * i as f64, 12.0],
            ));
        }
        let df = DataFrame::new(2, cols).unwrap();
        let text = Table::from_frame("scores", &df).render(TERMINAL_WIDTH);
        assert!(
            text.lines().all(|l| l.chars().count() <= TERMINAL_WIDTH),
            "{text}"
        );
        for i in 0..14 {
            // Headers wider than their values break in two.
            assert!(
                text.contains(&format!("number_{i} ")) || text.contains(&format!("number_{i}\n")),
                "{text}"
            );
        }
        let headers = text.lines().filter(|l| l.contains("method")).count();
        assert!(headers >= 2, "{text}");
        assert_eq!(text.matches("train-sft").count(), headers);
        assert!(text.contains("1.605") && !text.contains('…'), "{text}");
        // A column of whole numbers reads as integers; one with fractions keeps 4 digits.
        let df = df!(
            "stage" => ["a", "b"],
            "pairs" => [64.0, 8.0],
            "acc" => [1.0, 0.5],
            "r10" => [1.0, 1.0]
        )
        .unwrap();
        let t = Table::from_frame("t", &df);
        assert_eq!(t.rows[0][1], Cell::Int(64));
        assert_eq!(t.rows[0][2].to_string(), "1.000");
        assert_eq!(t.rows[0][3].to_string(), "1.000");
    }
}
