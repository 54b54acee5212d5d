//! The one progress reporter: an indicatif bar with rate and ETA on a terminal, plain
//! periodic log lines on stderr otherwise (CI logs, pipes).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Progress of one unit of work (a stage, a shard set).
pub struct Progress {
    label: String,
    unit: &'static str,
    total: Option<u64>,
    bar: Option<ProgressBar>,
    done: AtomicU64,
    start: Instant,
    last_line: Mutex<Instant>,
    interval: Duration,
}

impl Progress {
    /// A bar for `label` counting `unit`s, out of `total` when known.
    pub fn new(label: &str, unit: &'static str, total: Option<u64>) -> Self {
        let quiet = std::env::var_os("PREFCAP_QUIET").is_some();
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = match total {
                Some(t) => ProgressBar::new(t),
                None => ProgressBar::new_spinner(),
            };
            bar.set_draw_target(ProgressDrawTarget::stderr());
            let template = if total.is_some() {
                "{prefix:>12} [{bar:30}] {pos}/{len} {msg} ({per_sec}, ETA {eta})"
            } else {
                "{prefix:>12} {spinner} {pos} {msg} ({per_sec})"
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(label.to_string());
            bar.set_message(unit);
            bar
        });
        let start = Instant::now();
        Self {
            label: label.to_string(),
            unit,
            total,
            bar,
            done: AtomicU64::new(0),
            start,
            last_line: Mutex::new(start),
            interval: if quiet {
                Duration::MAX
            } else {
                Duration::from_secs(5)
            },
        }
    }

    pub fn inc(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        match &self.bar {
            Some(bar) => bar.inc(n),
            None => {
                let Ok(mut last) = self.last_line.lock() else {
                    return;
                };
                if last.elapsed() >= self.interval {
                    *last = Instant::now();
                    drop(last);
                    eprintln!("{}", self.line(done));
                }
            }
        }
    }

    pub fn position(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    fn line(&self, done: u64) -> String {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let rate = done as f64 / secs;
        match self.total {
            Some(t) if rate > 0.0 => format!(
                "[{}] {done}/{t} {} ({rate:.1}/s, ETA {:.0}s)",
                self.label,
                self.unit,
                (t.saturating_sub(done)) as f64 / rate
            ),
            Some(t) => format!("[{}] {done}/{t} {}", self.label, self.unit),
            None => format!("[{}] {done} {} ({rate:.1}/s)", self.label, self.unit),
        }
    }

    /// Ends the bar and prints a final summary line.
    pub fn finish(&self, summary: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if self.interval != Duration::MAX {
            eprintln!(
                "[{}] done: {} {} in {:.1}s {summary}",
                self.label,
                self.position(),
                self.unit,
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}
