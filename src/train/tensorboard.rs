//! TensorBoard event files, written by the training engine beside `metrics.parquet`:
//! `runs/<id>/tensorboard/<step name>/events.out.tfevents.<secs>.prefcap.<pid>.<n>`, so
//! `tensorboard --logdir runs` (or W&B's TensorBoard sync) shows every logged scalar while a
//! stage trains.
//!
//! The format is TensorFlow's: a file of TFRecords (`u64` little-endian length, its masked
//! CRC-32C, the payload, the payload's masked CRC-32C), each payload an `Event` protobuf
//! (`tensorflow/core/util/event.proto`): the first holds `file_version = "brain.Event:2"`,
//! each scalar a `Summary` with one `Value { tag, simple_value }`, and a resumed run starts
//! with `SessionLog { status: START }` at the step it resumed from, which tells TensorBoard to
//! drop the interrupted run's events after that step. The few protobuf fields are encoded
//! here directly.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

/// CRC-32C masked as TFRecord stores it.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// A protobuf varint.
fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Field `field` of wire type 2 (length-delimited) holding `bytes`.
fn delimited(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    out.push(field << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// What an `Event` carries besides its time and step.
enum What<'a> {
    FileVersion(&'a str),
    Scalar(&'a str, f32),
    SessionStart,
}

/// An `Event` protobuf.
fn event(wall_time: f64, step: i64, what: What) -> Vec<u8> {
    let mut out = vec![1 << 3 | 1];
    out.extend_from_slice(&wall_time.to_le_bytes());
    out.push(2 << 3);
    varint(&mut out, step as u64);
    match what {
        What::FileVersion(v) => delimited(&mut out, 3, v.as_bytes()),
        What::Scalar(tag, value) => {
            let mut v = Vec::new();
            delimited(&mut v, 1, tag.as_bytes());
            v.push(2 << 3 | 5);
            v.extend_from_slice(&value.to_le_bytes());
            let mut summary = Vec::new();
            delimited(&mut summary, 1, &v);
            delimited(&mut out, 5, &summary);
        }
        // SessionLog { status = START (1) }.
        What::SessionStart => delimited(&mut out, 7, &[1 << 3, 1]),
    }
    out
}

/// One TFRecord around `payload`.
fn record(out: &mut Vec<u8>, payload: &[u8]) {
    let len = (payload.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&masked_crc(payload).to_le_bytes());
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The event file of one training process of one step: scalars are gathered by
/// [`Self::scalar`] and appended to the file by [`Self::flush`].
pub struct EventWriter {
    path: PathBuf,
    pending: Vec<u8>,
}

impl EventWriter {
    /// A new event file in `dir` (created), starting with the file version, and with
    /// `SessionLog START` at `resumed_from` when the run resumed from a checkpoint.
    pub fn create(dir: &Path, resumed_from: Option<usize>) -> Result<Self> {
        std::fs::create_dir_all(dir).at(dir)?;
        let secs = now();
        // One file per writer, as TensorBoard's own writers name them.
        static WRITERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!(
            "events.out.tfevents.{}.prefcap.{}.{n}",
            secs as u64,
            std::process::id()
        ));
        let mut w = Self {
            path,
            pending: Vec::new(),
        };
        record(
            &mut w.pending,
            &event(secs, 0, What::FileVersion("brain.Event:2")),
        );
        if let Some(step) = resumed_from {
            record(
                &mut w.pending,
                &event(secs, step as i64, What::SessionStart),
            );
        }
        w.flush()?;
        Ok(w)
    }

    /// Where the events go.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gathers scalar `tag` = `value` at `step`.
    pub fn scalar(&mut self, tag: &str, step: i64, value: f64) {
        record(
            &mut self.pending,
            &event(now(), step, What::Scalar(tag, value as f32)),
        );
    }

    /// Appends the gathered events to the file (whole records only, so a reader never sees
    /// half of one written by this call unless the process dies inside it).
    pub fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .at(&self.path)?;
        f.write_all(&self.pending).at(&self.path)?;
        f.flush().at(&self.path)?;
        self.pending.clear();
        Ok(())
    }
}

/// The TensorBoard tag of a metric row: `train/<name>`, `val/<name>` (a name that already
/// starts with its split keeps it once).
pub fn tag(split: &str, name: &str) -> String {
    if name.starts_with(&format!("{split}/")) {
        name.to_string()
    } else {
        format!("{split}/{name}")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A decoded event: step, and the scalar (tag, value), the file version or a session
    /// start.
    #[derive(Debug, PartialEq)]
    pub enum Read {
        Version(String),
        Scalar(i64, String, f32),
        Start(i64),
    }

    fn read_varint(b: &[u8], at: &mut usize) -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let byte = b[*at];
            *at += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return v;
            }
            shift += 7;
        }
    }

    /// Fields (number, wire type, payload) of a protobuf message (wire types 0, 1, 2, 5).
    fn fields(b: &[u8]) -> Vec<(u64, u8, Vec<u8>)> {
        let mut at = 0;
        let mut out = Vec::new();
        while at < b.len() {
            let key = read_varint(b, &mut at);
            let (field, wire) = (key >> 3, (key & 7) as u8);
            let payload = match wire {
                0 => read_varint(b, &mut at).to_le_bytes().to_vec(),
                1 => {
                    at += 8;
                    b[at - 8..at].to_vec()
                }
                2 => {
                    let n = read_varint(b, &mut at) as usize;
                    at += n;
                    b[at - n..at].to_vec()
                }
                5 => {
                    at += 4;
                    b[at - 4..at].to_vec()
                }
                w => panic!("wire type {w}"),
            };
            out.push((field, wire, payload));
        }
        out
    }

    /// Every event of an event file, its record CRCs checked.
    pub fn read_events(path: &Path) -> Vec<Read> {
        let b = std::fs::read(path).unwrap();
        let mut at = 0;
        let mut out = Vec::new();
        while at < b.len() {
            let len = &b[at..at + 8];
            assert_eq!(
                u32::from_le_bytes(b[at + 8..at + 12].try_into().unwrap()),
                masked_crc(len)
            );
            let n = u64::from_le_bytes(len.try_into().unwrap()) as usize;
            let payload = &b[at + 12..at + 12 + n];
            let crc = u32::from_le_bytes(b[at + 12 + n..at + 16 + n].try_into().unwrap());
            assert_eq!(crc, masked_crc(payload));
            at += 16 + n;
            let f = fields(payload);
            let step = f.iter().find(|x| x.0 == 2).map_or(0, |x| {
                u64::from_le_bytes(x.2.clone().try_into().unwrap()) as i64
            });
            for (field, _, p) in &f {
                match field {
                    3 => out.push(Read::Version(String::from_utf8(p.clone()).unwrap())),
                    7 => out.push(Read::Start(step)),
                    5 => {
                        let value = &fields(p)[0].2;
                        let v = fields(value);
                        let tag = String::from_utf8(v[0].2.clone()).unwrap();
                        let x = f32::from_le_bytes(v[1].2.clone().try_into().unwrap());
                        out.push(Read::Scalar(step, tag, x));
                    }
                    _ => {}
                }
            }
        }
        out
    }

    #[test]
    #[allow(clippy::manual_rotate)] // TFRecord's formula as its reference writes it
    fn crc32c_is_castagnolis_and_masked_as_tfrecord_does() {
        // CRC-32C of "123456789" (the standard check value), and TFRecord's mask of it.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let crc: u32 = 0xe306_9283;
        assert_eq!(
            masked_crc(b"123456789"),
            ((crc >> 15) | (crc << 17)).wrapping_add(0xa282_ead8)
        );
    }

    #[test]
    fn events_read_back_with_their_steps_tags_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), Some(7)).unwrap();
        w.scalar(&tag("train", "loss"), 8, 0.25);
        w.scalar(&tag("val", "val/CLIPScore"), 300, 2.5);
        w.flush().unwrap();
        w.scalar(&tag("train", "rewards/accuracies"), 9, 0.75);
        w.flush().unwrap();
        assert_eq!(
            read_events(w.path()),
            vec![
                Read::Version("brain.Event:2".into()),
                Read::Start(7),
                Read::Scalar(8, "train/loss".into(), 0.25),
                Read::Scalar(300, "val/CLIPScore".into(), 2.5),
                Read::Scalar(9, "train/rewards/accuracies".into(), 0.75),
            ]
        );
    }
}
