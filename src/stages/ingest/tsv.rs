//! Conceptual Captions TSV reading: `caption TAB url`, no header, UTF-8, plain or gzip.
//! Lines are split on the first TAB only and `"` is plain text (no CSV quoting).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use crate::error::{Error, IoContext, Result};

/// One TSV row. `index` is the 0-based line number, which also names the sample (`key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptionRow {
    pub index: u64,
    pub caption: String,
    pub url: String,
}

impl CaptionRow {
    /// The sample key: the zero-padded 0-based row index (ClipCap names images the same way).
    pub fn key(&self) -> String {
        format_key(self.index)
    }
}

pub fn format_key(index: u64) -> String {
    format!("{index:09}")
}

/// Streams rows of a CC TSV. Gzip is recognised by its magic bytes, whatever the extension.
pub struct TsvReader {
    path: PathBuf,
    lines: Box<dyn BufRead + Send>,
    next_index: u64,
    buf: Vec<u8>,
}

impl TsvReader {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).at(path)?;
        let mut magic = [0u8; 2];
        let n = file.read(&mut magic).at(path)?;
        let file = File::open(path).at(path)?;
        let lines: Box<dyn BufRead + Send> = if n == 2 && magic == [0x1f, 0x8b] {
            Box::new(BufReader::with_capacity(1 << 16, MultiGzDecoder::new(file)))
        } else {
            Box::new(BufReader::with_capacity(1 << 16, file))
        };
        Ok(Self {
            path: path.to_path_buf(),
            lines,
            next_index: 0,
            buf: Vec::new(),
        })
    }

    /// The next row, `None` at end of file, or an error naming the file and 1-based line.
    pub fn next_row(&mut self) -> Result<Option<CaptionRow>> {
        self.buf.clear();
        let n = self.lines.read_until(b'\n', &mut self.buf).at(&self.path)?;
        if n == 0 {
            return Ok(None);
        }
        let index = self.next_index;
        self.next_index += 1;
        parse_line(&self.buf, index)
            .map(Some)
            .map_err(|message| Error::BadRow {
                path: self.path.clone(),
                row: index + 1,
                message,
            })
    }
}

/// Parses one line (with or without its `\n` / `\r\n`).
pub fn parse_line(raw: &[u8], index: u64) -> std::result::Result<CaptionRow, String> {
    let line = std::str::from_utf8(raw).map_err(|e| format!("not valid UTF-8 ({e})"))?;
    let line = line.strip_suffix('\n').unwrap_or(line);
    let line = line.strip_suffix('\r').unwrap_or(line);
    let (caption, url) = line
        .split_once('\t')
        .ok_or_else(|| "expected `caption<TAB>url`, found no TAB".to_string())?;
    let caption = caption.trim();
    let url = url.trim();
    if caption.is_empty() {
        return Err("empty caption".into());
    }
    if url.is_empty() {
        return Err("empty URL".into());
    }
    if url.contains(['\t', ' ']) {
        return Err(format!("URL contains whitespace: `{url}`"));
    }
    Ok(CaptionRow {
        index,
        caption: caption.to_string(),
        url: url.to_string(),
    })
}

/// Reads the whole file once, checking every row, so that a bad file is rejected before any
/// download starts. Returns the number of rows (capped at `max_rows` when non-zero).
/// All malformed rows are reported together (the first 20 in full).
pub fn validate(path: &Path, max_rows: u64) -> Result<u64> {
    let mut reader = TsvReader::open(path)?;
    let mut count = 0u64;
    let mut problems = Vec::new();
    let mut bad = 0u64;
    loop {
        if max_rows > 0 && count >= max_rows {
            break;
        }
        match reader.next_row() {
            Ok(Some(_)) => count += 1,
            Ok(None) => break,
            Err(Error::BadRow { row, message, .. }) => {
                count += 1;
                bad += 1;
                if problems.len() < 20 {
                    problems.push(format!("row {row}: {message}"));
                }
            }
            Err(e) => return Err(e),
        }
    }
    if bad > 0 {
        let more = if bad > 20 {
            format!("\n  ... and {} more", bad - 20)
        } else {
            String::new()
        };
        return Err(Error::BadFile {
            path: path.to_path_buf(),
            message: format!(
                "{bad} malformed row(s); nothing was downloaded. Fix or remove them:\n  {}{more}",
                problems.join("\n  ")
            ),
        });
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn splits_on_the_first_tab_and_keeps_quotes() {
        let row = parse_line(b"a \"quoted\" caption\thttp://x/a.jpg?imgmax=800\r\n", 3).unwrap();
        assert_eq!(row.caption, "a \"quoted\" caption");
        assert_eq!(row.url, "http://x/a.jpg?imgmax=800");
        assert_eq!(row.key(), "000000003");
    }

    #[test]
    fn malformed_lines_say_why() {
        assert!(parse_line(b"no tab here\n", 0)
            .unwrap_err()
            .contains("no TAB"));
        assert!(parse_line(b"\thttp://x\n", 0)
            .unwrap_err()
            .contains("empty caption"));
        assert!(parse_line(b"cap\t\n", 0).unwrap_err().contains("empty URL"));
        assert!(parse_line(b"cap\thttp://x\ty\n", 0)
            .unwrap_err()
            .contains("whitespace"));
        assert!(parse_line(b"cap\xff\thttp://x\n", 0)
            .unwrap_err()
            .contains("UTF-8"));
    }

    #[test]
    fn validate_reports_every_bad_row_with_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cc.tsv");
        std::fs::write(
            &path,
            "ok\thttp://a\nbroken line\nok\thttp://b\nalso broken\n",
        )
        .unwrap();
        let err = validate(&path, 0).unwrap_err().to_string();
        assert!(
            err.contains("cc.tsv") && err.contains("row 2") && err.contains("row 4"),
            "{err}"
        );
    }

    #[test]
    fn gzip_input_is_read_transparently_and_max_rows_caps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cc.tsv.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for i in 0..5 {
            writeln!(gz, "caption {i}\thttp://h/{i}.jpg").unwrap();
        }
        std::fs::write(&path, gz.finish().unwrap()).unwrap();
        assert_eq!(validate(&path, 0).unwrap(), 5);
        assert_eq!(validate(&path, 3).unwrap(), 3);
        let mut r = TsvReader::open(&path).unwrap();
        let first = r.next_row().unwrap().unwrap();
        assert_eq!((first.index, first.caption.as_str()), (0, "caption 0"));
    }
}
