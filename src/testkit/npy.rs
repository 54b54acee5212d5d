//! Minimal NumPy .npy reader (little-endian f32/f64/i64, C order) for fixtures and interop.
//!
//! Reference outputs from Python (`np.save`) are the contract between prefcap and Hugging Face, so
//! this reads exactly what `np.save` writes: format versions 1.0, 2.0 and 3.0, a C-order array of a
//! little-endian (or single-byte) numeric dtype. Anything else is refused with the reason, because
//! silently reinterpreting a Fortran-order or big-endian array would corrupt a parity test.

use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// A dense C-order array: `data[i0 * stride0 + ...]` with the last axis fastest.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray<T = f32> {
    pub shape: Vec<usize>,
    pub data: Vec<T>,
}

/// Reads a numeric `.npy` file as f32 (f16/f32/f64, signed and unsigned integers and bool are
/// converted; integers above 2^24 lose precision, use [`read_npy_i64`] for ids).
pub fn read_npy(path: &Path) -> Result<NpyArray<f32>> {
    let bytes = std::fs::read(path).at(path)?;
    parse_npy(&bytes, path, |dtype, raw| dtype.to_f32(raw))
}

/// Reads an integer or bool `.npy` file exactly as i64 (token ids, masks); float arrays are refused.
pub fn read_npy_i64(path: &Path) -> Result<NpyArray<i64>> {
    let bytes = std::fs::read(path).at(path)?;
    parse_npy(&bytes, path, |dtype, raw| dtype.to_i64(raw))
}

/// Element types `np.save` writes for numeric arrays, all decoded little-endian.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Dtype {
    Bool,
    I8,
    U8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F16,
    F32,
    F64,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::I8 | Dtype::U8 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::U64 | Dtype::F64 => 8,
        }
    }

    /// `raw` is exactly `self.size()` bytes.
    fn to_f32(self, raw: &[u8]) -> Option<f32> {
        Some(match self {
            Dtype::F16 => half::f16::from_le_bytes(raw.try_into().ok()?).to_f32(),
            Dtype::F32 => f32::from_le_bytes(raw.try_into().ok()?),
            Dtype::F64 => f64::from_le_bytes(raw.try_into().ok()?) as f32,
            Dtype::U64 => u64::from_le_bytes(raw.try_into().ok()?) as f32,
            _ => self.to_i64(raw)? as f32,
        })
    }

    /// `None` for float dtypes (and for u64 values that do not fit), so callers can refuse them.
    fn to_i64(self, raw: &[u8]) -> Option<i64> {
        Some(match self {
            Dtype::Bool | Dtype::U8 => i64::from(raw[0]),
            Dtype::I8 => i64::from(raw[0] as i8),
            Dtype::I16 => i64::from(i16::from_le_bytes(raw.try_into().ok()?)),
            Dtype::U16 => i64::from(u16::from_le_bytes(raw.try_into().ok()?)),
            Dtype::I32 => i64::from(i32::from_le_bytes(raw.try_into().ok()?)),
            Dtype::U32 => i64::from(u32::from_le_bytes(raw.try_into().ok()?)),
            Dtype::I64 => i64::from_le_bytes(raw.try_into().ok()?),
            Dtype::U64 => i64::try_from(u64::from_le_bytes(raw.try_into().ok()?)).ok()?,
            Dtype::F16 | Dtype::F32 | Dtype::F64 => return None,
        })
    }
}

/// The three keys of the header dictionary that matter.
#[derive(Debug)]
struct Header {
    dtype: Dtype,
    fortran_order: bool,
    shape: Vec<usize>,
}

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::BadFile {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Parses a whole `.npy` file held in memory; `path` only names it in errors.
fn parse_npy<T>(
    bytes: &[u8],
    path: &Path,
    convert: impl Fn(Dtype, &[u8]) -> Option<T>,
) -> Result<NpyArray<T>> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad(path, "not a .npy file (missing the \\x93NUMPY magic)"));
    }
    let (major, minor) = (bytes[6], bytes[7]);
    // Version 1 stores the header length in 2 bytes; 2 and 3 widened it to 4 for huge headers.
    let (header_len, header_start) = match major {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(bad(path, ".npy header is truncated"));
            }
            let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            (len as usize, 12)
        }
        _ => {
            return Err(bad(
                path,
                format!(
                    ".npy format version {major}.{minor} is not supported (only 1.0, 2.0, 3.0)"
                ),
            ))
        }
    };
    let data_start = header_start + header_len;
    if bytes.len() < data_start {
        return Err(bad(path, ".npy header is truncated"));
    }
    let header_text = std::str::from_utf8(&bytes[header_start..data_start])
        .map_err(|_| bad(path, ".npy header is not text"))?;
    let header = parse_header(header_text).map_err(|m| bad(path, m))?;
    if header.fortran_order && header.shape.iter().filter(|&&d| d > 1).count() > 1 {
        return Err(bad(
            path,
            "Fortran-order arrays are not supported; save with np.ascontiguousarray(a) first",
        ));
    }

    let count = header
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| bad(path, format!("shape {:?} is too large", header.shape)))?;
    let size = header.dtype.size();
    let data = &bytes[data_start..];
    if Some(data.len()) != count.checked_mul(size) {
        return Err(bad(
            path,
            format!(
                "shape {:?} of {:?} needs {} data bytes but the file has {}",
                header.shape,
                header.dtype,
                count.saturating_mul(size),
                data.len()
            ),
        ));
    }
    let values = data
        .chunks_exact(size)
        .map(|raw| convert(header.dtype, raw))
        .collect::<Option<Vec<T>>>()
        .ok_or_else(|| {
            bad(
                path,
                format!(
                    "{:?} values cannot be read as the requested type",
                    header.dtype
                ),
            )
        })?;
    Ok(NpyArray {
        shape: header.shape,
        data: values,
    })
}

/// Parses the Python dict literal `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`.
fn parse_header(text: &str) -> std::result::Result<Header, String> {
    let descr = dict_value(text, "descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or_else(|| {
            format!(
                "descr {descr:?} is not a plain dtype string (structured arrays are not supported)"
            )
        })?;
    let dtype = parse_descr(descr)?;

    let fortran = dict_value(text, "fortran_order")?;
    let fortran_order = if fortran.starts_with("True") {
        true
    } else if fortran.starts_with("False") {
        false
    } else {
        return Err(format!("fortran_order value {fortran:?} is not True/False"));
    };

    let shape_text = dict_value(text, "shape")?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| format!("shape {shape_text:?} is not a tuple"))?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            // Python 2 era files wrote `3L`.
            s.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| format!("shape entry {s:?} is not a non-negative integer"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Header {
        dtype,
        fortran_order,
        shape,
    })
}

/// The text right after `'key':` (leading blanks skipped).
fn dict_value<'a>(text: &'a str, key: &str) -> std::result::Result<&'a str, String> {
    let quoted = [format!("'{key}'"), format!("\"{key}\"")];
    let after_key = quoted
        .iter()
        .find_map(|q| text.find(q.as_str()).map(|i| &text[i + q.len()..]))
        .ok_or_else(|| format!(".npy header has no '{key}' entry"))?;
    after_key
        .trim_start()
        .strip_prefix(':')
        .map(str::trim_start)
        .ok_or_else(|| format!(".npy header entry '{key}' is malformed"))
}

fn parse_descr(descr: &str) -> std::result::Result<Dtype, String> {
    let (order, kind) = descr.split_at(descr.len().min(1));
    let dtype = match kind {
        "b1" => Dtype::Bool,
        "i1" => Dtype::I8,
        "u1" => Dtype::U8,
        "i2" => Dtype::I16,
        "u2" => Dtype::U16,
        "i4" => Dtype::I32,
        "u4" => Dtype::U32,
        "i8" => Dtype::I64,
        "u8" => Dtype::U64,
        "f2" => Dtype::F16,
        "f4" => Dtype::F32,
        "f8" => Dtype::F64,
        _ => {
            return Err(format!(
                "dtype {descr:?} is not supported (numeric and bool only)"
            ))
        }
    };
    // '|' marks single-byte types; '=' (native) only appears for arrays built on this very machine
    // family, which is little-endian wherever prefcap runs.
    let little = match order {
        "<" | "|" => true,
        "=" => cfg!(target_endian = "little"),
        ">" => dtype.size() == 1,
        _ => return Err(format!("dtype {descr:?} has no byte-order mark")),
    };
    if !little {
        return Err(format!(
            "dtype {descr:?} is big-endian; save with a.astype(a.dtype.newbyteorder('<')) first"
        ));
    }
    Ok(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a .npy file the way `np.save` does: header padded with spaces to a multiple of 64
    /// bytes and terminated by a newline.
    fn npy(version: u8, header_dict: &str, data: &[u8]) -> Vec<u8> {
        let prefix_len = if version == 1 { 10 } else { 12 };
        let mut header = header_dict.to_string();
        while !(prefix_len + header.len() + 1).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY".to_vec();
        out.extend([version, 0]);
        if version == 1 {
            out.extend((header.len() as u16).to_le_bytes());
        } else {
            out.extend((header.len() as u32).to_le_bytes());
        }
        out.extend(header.as_bytes());
        out.extend(data);
        out
    }

    fn parse_f32(bytes: &[u8]) -> Result<NpyArray<f32>> {
        parse_npy(bytes, Path::new("test.npy"), |d, raw| d.to_f32(raw))
    }

    fn le<T: Copy, const N: usize>(values: &[T], to: fn(T) -> [u8; N]) -> Vec<u8> {
        values.iter().flat_map(|&v| to(v)).collect()
    }

    #[test]
    fn reads_f32_version_1_in_c_order() {
        let data = le(&[1.0f32, 2.0, 3.5, -4.0, 5.0, 6.25], f32::to_le_bytes);
        let file = npy(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
            &data,
        );
        let a = parse_f32(&file).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, vec![1.0, 2.0, 3.5, -4.0, 5.0, 6.25]);
    }

    #[test]
    fn reads_f64_version_2_and_converts() {
        let data = le(&[0.1f64, -2.5e10], f64::to_le_bytes);
        let file = npy(
            2,
            "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }",
            &data,
        );
        let a = parse_f32(&file).unwrap();
        assert_eq!(a.shape, vec![2]);
        assert_eq!(a.data, vec![0.1f64 as f32, -2.5e10f64 as f32]);
    }

    #[test]
    fn reads_integers_as_f32_and_exactly_as_i64() {
        let data = le(&[49407i64, -3, 0], i64::to_le_bytes);
        let file = npy(
            1,
            "{'descr': '<i8', 'fortran_order': False, 'shape': (1, 3), }",
            &data,
        );
        assert_eq!(parse_f32(&file).unwrap().data, vec![49407.0, -3.0, 0.0]);
        let exact = parse_npy(&file, Path::new("ids.npy"), |d, raw| d.to_i64(raw)).unwrap();
        assert_eq!(exact.data, vec![49407, -3, 0]);

        let data = le(&[7i32, -8], i32::to_le_bytes);
        let file = npy(
            1,
            "{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }",
            &data,
        );
        assert_eq!(parse_f32(&file).unwrap().data, vec![7.0, -8.0]);
    }

    #[test]
    fn scalar_and_empty_shapes() {
        let file = npy(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (), }",
            &2.5f32.to_le_bytes(),
        );
        let a = parse_f32(&file).unwrap();
        assert_eq!((a.shape, a.data), (vec![], vec![2.5]));
        let file = npy(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 4), }",
            &[],
        );
        assert_eq!(parse_f32(&file).unwrap().data, Vec::<f32>::new());
    }

    #[test]
    fn i64_reader_refuses_floats() {
        let file = npy(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
            &1f32.to_le_bytes(),
        );
        let err = parse_npy(&file, Path::new("x.npy"), |d, raw| d.to_i64(raw)).unwrap_err();
        assert!(err.to_string().contains("x.npy"), "{err}");
    }

    #[test]
    fn refuses_fortran_order_naming_the_file() {
        let data = le(&[1.0f32; 6], f32::to_le_bytes);
        let file = npy(
            1,
            "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }",
            &data,
        );
        let err =
            parse_npy(&file, Path::new("dir/fortran.npy"), |d, raw| d.to_f32(raw)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("dir/fortran.npy") && msg.contains("Fortran"),
            "{msg}"
        );
        // A 1-D array is the same bytes in either order, as numpy itself treats it.
        let file = npy(
            1,
            "{'descr': '<f4', 'fortran_order': True, 'shape': (6,), }",
            &data,
        );
        assert!(parse_f32(&file).is_ok());
    }

    #[test]
    fn refuses_big_endian_naming_the_file() {
        let file = npy(
            1,
            "{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }",
            &1f32.to_be_bytes(),
        );
        let err = parse_npy(&file, Path::new("be.npy"), |d, raw| d.to_f32(raw)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("be.npy") && msg.contains("big-endian"),
            "{msg}"
        );
    }

    #[test]
    fn refuses_truncated_data_and_bad_magic() {
        let file = npy(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }",
            &[0u8; 8],
        );
        let msg = parse_f32(&file).unwrap_err().to_string();
        assert!(
            msg.contains("needs 12 data bytes but the file has 8"),
            "{msg}"
        );
        assert!(parse_f32(b"PK\x03\x04 not numpy").is_err());
    }

    #[test]
    fn reads_the_committed_reference_pixels() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hf-tiny/reference/clip/pixel_values.npy");
        let a = read_npy(&path).unwrap();
        assert_eq!(a.shape, vec![4, 3, 32, 32]);
        assert_eq!(a.data.len(), 4 * 3 * 32 * 32);
        let ids = read_npy_i64(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/hf-tiny/reference/clip/input_ids.npy"),
        )
        .unwrap();
        assert_eq!(ids.shape.iter().product::<usize>(), ids.data.len());
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = read_npy(Path::new("/nonexistent/arr.npy")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/arr.npy"), "{err}");
    }
}
