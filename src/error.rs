//! The library's error type: every variant names the file, row, key or URL it is about.

use std::path::PathBuf;

/// Errors raised by prefcap's library code. The CLI wraps them in `anyhow` at the edge.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Parquet error in {path}: {source}")]
    Parquet {
        path: PathBuf,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("Arrow error in {context}: {source}")]
    Arrow {
        context: String,
        #[source]
        source: arrow::error::ArrowError,
    },
    /// A row of an input file that cannot be used; `row` is 1-based as editors show it.
    #[error("{path}, row {row}: {message}")]
    BadRow {
        path: PathBuf,
        row: u64,
        message: String,
    },
    /// A file whose contents do not have the expected shape (schema, JSON, header).
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("configuration error: {0}")]
    Config(String),
    /// Several plan problems found at once, reported together.
    #[error("the pipeline plan is invalid:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Plan(Vec<String>),
    #[error("Hugging Face hub: {repo}@{revision}: {message}")]
    Hub {
        repo: String,
        revision: String,
        message: String,
    },
    #[error("HTTP client setup failed: {0}")]
    Http(String),
    /// A tensor operation failed; `context` says which computation.
    #[error("{context}: {source}")]
    Candle {
        context: String,
        source: candle_core::Error,
    },
    /// An image that cannot be decoded, encoded or resized as asked.
    #[error("{0}")]
    Image(String),
    /// A value that breaks what the computation needs (mismatched lengths, a non-finite
    /// loss, an empty split): the message says what and where.
    #[error("{0}")]
    Invalid(String),
    #[error("the {0} thread panicked")]
    Panicked(String),
    /// A pipeline step failed; `source` is why.
    #[error("stage `{stage}` failed")]
    Stage {
        stage: String,
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    /// The message and every cause below it that it does not already say, one per line:
    /// what the CLI prints.
    pub fn report(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            let text = c.to_string();
            if !out.contains(&text) {
                out.push_str(&format!("\n  caused by: {text}"));
            }
            cause = c.source();
        }
        out
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches the path to an `std::io::Error`.
pub trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.into(),
            source,
        })
    }
}

/// Attaches what was being computed to a candle error.
pub trait CandleContext<T> {
    fn during(self, what: impl Into<String>) -> Result<T>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn during(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::Candle {
            context: what.into(),
            source,
        })
    }
}
