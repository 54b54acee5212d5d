//! Exact Hugging Face CLIPImageProcessor (PIL backend) preprocessing.
//!
//! transformers converts to RGB, resizes the shortest side with `PIL.Image.resize` (8-bit
//! fixed-point separable convolution, horizontal pass first, rounded to u8 in between), crops
//! the centre, rescales by `rescale_factor` (in f64, then f32) and normalises in f32. Each step
//! here follows Pillow's `Resample.c` and transformers' `image_transforms.py` to the bit, so
//! the pixels equal HF's `pixel_values`.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, IoContext, Result};

/// `preprocessor_config.json`, resolved to what the computation needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipPreprocessConfig {
    pub do_convert_rgb: bool,
    pub do_resize: bool,
    /// Target of the shortest side.
    pub shortest_edge: u32,
    /// PIL resample filter id (1 Lanczos, 2 bilinear, 3 bicubic, 4 box, 5 Hamming).
    pub resample: u32,
    pub do_center_crop: bool,
    pub crop_height: u32,
    pub crop_width: u32,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

/// `size` / `crop_size` appear as an int (old configs) or as a dict.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Int(u32),
    Dict {
        shortest_edge: Option<u32>,
        height: Option<u32>,
        width: Option<u32>,
    },
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default = "yes")]
    do_convert_rgb: bool,
    #[serde(default = "yes")]
    do_resize: bool,
    size: Option<SizeSpec>,
    #[serde(default = "bicubic")]
    resample: u32,
    #[serde(default = "yes")]
    do_center_crop: bool,
    crop_size: Option<SizeSpec>,
    #[serde(default = "yes")]
    do_rescale: bool,
    #[serde(default = "rescale")]
    rescale_factor: f64,
    #[serde(default = "yes")]
    do_normalize: bool,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
}

fn yes() -> bool {
    true
}
fn bicubic() -> u32 {
    3
}
fn rescale() -> f64 {
    1.0 / 255.0
}

const OPENAI_CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const OPENAI_CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

impl ClipPreprocessConfig {
    /// openai/clip-vit-base-patch32's preprocessing at `size` pixels.
    pub fn openai_clip(size: u32) -> Self {
        Self {
            do_convert_rgb: true,
            do_resize: true,
            shortest_edge: size,
            resample: 3,
            do_center_crop: true,
            crop_height: size,
            crop_width: size,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).at(path)?;
        Self::from_json(&bytes).map_err(|message| Error::BadFile {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses `preprocessor_config.json` with transformers' defaults for CLIP.
    pub fn from_json(bytes: &[u8]) -> std::result::Result<Self, String> {
        let raw: RawConfig = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let shortest_edge = match raw.size {
            None => 224,
            Some(SizeSpec::Int(n)) => n,
            Some(SizeSpec::Dict {
                shortest_edge: Some(n),
                ..
            }) => n,
            Some(SizeSpec::Dict { .. }) => {
                return Err("only `size: {shortest_edge: N}` is supported for CLIP".into())
            }
        };
        let (crop_height, crop_width) = match raw.crop_size {
            None => (224, 224),
            Some(SizeSpec::Int(n)) => (n, n),
            Some(SizeSpec::Dict {
                height: Some(h),
                width: Some(w),
                ..
            }) => (h, w),
            Some(SizeSpec::Dict { .. }) => return Err("crop_size needs height and width".into()),
        };
        if !(1..=5).contains(&raw.resample) {
            return Err(format!(
                "resample {} is not supported (1 Lanczos, 2 bilinear, 3 bicubic, 4 box, 5 Hamming)",
                raw.resample
            ));
        }
        Ok(Self {
            do_convert_rgb: raw.do_convert_rgb,
            do_resize: raw.do_resize,
            shortest_edge,
            resample: raw.resample,
            do_center_crop: raw.do_center_crop,
            crop_height,
            crop_width,
            do_rescale: raw.do_rescale,
            rescale_factor: raw.rescale_factor,
            do_normalize: raw.do_normalize,
            image_mean: raw.image_mean.unwrap_or(OPENAI_CLIP_MEAN),
            image_std: raw.image_std.unwrap_or(OPENAI_CLIP_STD),
        })
    }

    /// A string that changes whenever the preprocessed pixels could change: part of every
    /// image feature-cache key.
    pub fn fingerprint(&self) -> String {
        format!("pil-v1:{self:?}")
    }

    /// Side of the square output; the model's `image_size` must equal it.
    pub fn output_size(&self) -> Option<u32> {
        (self.do_center_crop && self.crop_height == self.crop_width).then_some(self.crop_height)
    }
}

/// Decodes an encoded image (JPEG, PNG, ...) and preprocesses it into CHW f32 pixels.
pub fn preprocess_bytes(bytes: &[u8], cfg: &ClipPreprocessConfig) -> Result<Vec<f32>> {
    let img = image::load_from_memory(bytes).map_err(|e| Error::Stage {
        stage: "embed".into(),
        message: format!("cannot decode image: {e}"),
    })?;
    let rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    preprocess_rgb(rgb.as_raw(), w as usize, h as usize, cfg)
}

/// Preprocesses packed RGB8 pixels (`w × h × 3`) into CHW f32.
pub fn preprocess_rgb(
    rgb: &[u8],
    w: usize,
    h: usize,
    cfg: &ClipPreprocessConfig,
) -> Result<Vec<f32>> {
    if w == 0 || h == 0 || rgb.len() != w * h * 3 {
        return Err(Error::Stage {
            stage: "embed".into(),
            message: format!("bad image buffer: {w}×{h} with {} bytes", rgb.len()),
        });
    }
    let (mut img, mut w, mut h) = (std::borrow::Cow::Borrowed(rgb), w, h);
    if cfg.do_resize {
        let (nw, nh) = shortest_edge_size(w, h, cfg.shortest_edge as usize);
        img = std::borrow::Cow::Owned(resize_rgb8(&img, w, h, nw, nh, filter(cfg.resample)));
        (w, h) = (nw, nh);
    }
    let (ch, cw) = if cfg.do_center_crop {
        (cfg.crop_height as usize, cfg.crop_width as usize)
    } else {
        (h, w)
    };
    // transformers' center_crop: offsets by floor division; pads with zeros where the image
    // is smaller than the crop.
    let top = (h as i64 - ch as i64).div_euclid(2);
    let left = (w as i64 - cw as i64).div_euclid(2);
    let mut out = vec![0f32; 3 * ch * cw];
    let plane = ch * cw;
    for y in 0..ch {
        let sy = y as i64 + top;
        for x in 0..cw {
            let sx = x as i64 + left;
            let inside = sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w;
            for c in 0..3 {
                let v = if inside {
                    img[(sy as usize * w + sx as usize) * 3 + c]
                } else {
                    0
                };
                let mut p = if cfg.do_rescale {
                    (f64::from(v) * cfg.rescale_factor) as f32
                } else {
                    f32::from(v)
                };
                if cfg.do_normalize {
                    p = (p - cfg.image_mean[c]) / cfg.image_std[c];
                }
                out[c * plane + y * cw + x] = p;
            }
        }
    }
    Ok(out)
}

/// transformers' `get_resize_output_image_size(default_to_square=False)`: the short side
/// becomes `size`, the long side `int(size * long / short)`.
pub fn shortest_edge_size(w: usize, h: usize, size: usize) -> (usize, usize) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// A Pillow resampling filter: its kernel and support.
#[derive(Clone, Copy)]
pub struct Filter {
    kernel: fn(f64) -> f64,
    support: f64,
}

fn filter(resample: u32) -> Filter {
    fn sinc(x: f64) -> f64 {
        if x == 0.0 {
            1.0
        } else {
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
    }
    match resample {
        1 => Filter {
            kernel: |x| {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            },
            support: 3.0,
        },
        2 => Filter {
            kernel: |x| {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            },
            support: 1.0,
        },
        4 => Filter {
            kernel: |x| if x > -0.5 && x <= 0.5 { 1.0 } else { 0.0 },
            support: 0.5,
        },
        5 => Filter {
            kernel: |x| {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    x.sin() / x * (0.54 + 0.46 * x.cos())
                }
            },
            support: 1.0,
        },
        _ => Filter {
            kernel: |x| {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            },
            support: 2.0,
        },
    }
}

/// Pillow's fixed-point precision for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: first input index and its fixed-point weights (Pillow's
/// `precompute_coeffs` followed by `normalize_coeffs_8bpc`).
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

fn precompute_coeffs(in_size: usize, out_size: usize, f: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = f.support * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero; negatives clamp to 0 just after.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = (((center + support + 0.5) as i64) as usize).min(in_size) - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = (f.kernel)((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for x in 0..ksize {
            let w = if x < xmax && ww != 0.0 {
                k[x] / ww
            } else if x < xmax {
                k[x]
            } else {
                0.0
            };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            weights[xx * ksize + x] = if w < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs {
        bounds,
        ksize,
        weights,
    }
}

#[inline]
fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// `PIL.Image.resize((nw, nh), filter)` of packed RGB8 pixels, bit for bit.
pub fn resize_rgb8(src: &[u8], w: usize, h: usize, nw: usize, nh: usize, f: Filter) -> Vec<u8> {
    let need_h = nw != w;
    let need_v = nh != h;
    let horiz = precompute_coeffs(w, nw, f);
    let vert = precompute_coeffs(h, nh, f);
    let round = 1i32 << (PRECISION_BITS - 1);
    // Horizontal pass over the rows the vertical pass reads.
    let (tmp, tw, row0) = if need_h {
        let first = vert.bounds[0].0;
        let (lb, ln) = vert.bounds[nh - 1];
        let last = if need_v { lb + ln } else { h };
        let first = if need_v { first } else { 0 };
        let mut out = vec![0u8; (last - first) * nw * 3];
        for (oy, y) in (first..last).enumerate() {
            let row = &src[y * w * 3..(y + 1) * w * 3];
            let orow = &mut out[oy * nw * 3..(oy + 1) * nw * 3];
            for (xx, &(xmin, xmax)) in horiz.bounds.iter().enumerate() {
                let k = &horiz.weights[xx * horiz.ksize..xx * horiz.ksize + xmax];
                let (mut r, mut g, mut b) = (round, round, round);
                for (x, &kw) in k.iter().enumerate() {
                    let p = (xmin + x) * 3;
                    r += i32::from(row[p]) * kw;
                    g += i32::from(row[p + 1]) * kw;
                    b += i32::from(row[p + 2]) * kw;
                }
                orow[xx * 3] = clip8(r);
                orow[xx * 3 + 1] = clip8(g);
                orow[xx * 3 + 2] = clip8(b);
            }
        }
        (std::borrow::Cow::Owned(out), nw, first)
    } else {
        (std::borrow::Cow::Borrowed(src), w, 0)
    };
    if !need_v {
        return tmp.into_owned();
    }
    let mut out = vec![0u8; nw * nh * 3];
    for (yy, &(ymin, ymax)) in vert.bounds.iter().enumerate() {
        let k = &vert.weights[yy * vert.ksize..yy * vert.ksize + ymax];
        let orow = &mut out[yy * tw * 3..(yy + 1) * tw * 3];
        for (x, o) in orow.iter_mut().enumerate() {
            let mut acc = round;
            for (y, &kw) in k.iter().enumerate() {
                acc += i32::from(tmp[(ymin - row0 + y) * tw * 3 + x]) * kw;
            }
            *o = clip8(acc);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_truncates_the_long_side_like_transformers() {
        assert_eq!(shortest_edge_size(67, 45, 32), (47, 32)); // 32*67/45 = 47.6
        assert_eq!(shortest_edge_size(50, 80, 32), (32, 51)); // 51.2
        assert_eq!(shortest_edge_size(300, 200, 32), (48, 32));
        assert_eq!(shortest_edge_size(640, 480, 224), (298, 224)); // 298.67
    }

    #[test]
    fn old_and_new_config_formats_parse_alike() {
        let old = br#"{"crop_size": 224, "do_center_crop": true, "do_normalize": true, "do_resize": true,
            "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}"#;
        let new = br#"{"crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 224},
            "image_processor_type": "CLIPImageProcessor", "resample": 3, "rescale_factor": 0.00392156862745098}"#;
        let a = ClipPreprocessConfig::from_json(old).unwrap();
        let b = ClipPreprocessConfig::from_json(new).unwrap();
        assert_eq!(a, ClipPreprocessConfig::openai_clip(224));
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert!(ClipPreprocessConfig::from_json(br#"{"resample": 0}"#).is_err());
    }

    #[test]
    fn resizing_a_constant_image_keeps_it_constant() {
        let src = vec![77u8; 37 * 23 * 3];
        for r in 1..=5 {
            let out = resize_rgb8(&src, 37, 23, 16, 11, filter(r));
            assert!(out.iter().all(|&v| v == 77), "filter {r}");
            let up = resize_rgb8(&src, 37, 23, 50, 40, filter(r));
            assert!(up.iter().all(|&v| v == 77), "filter {r} upscaling");
        }
    }

    #[test]
    fn same_size_is_identity_and_crop_is_centred() {
        let src: Vec<u8> = (0..5 * 4 * 3).map(|i| i as u8).collect();
        assert_eq!(resize_rgb8(&src, 5, 4, 5, 4, filter(3)), src);
        let cfg = ClipPreprocessConfig {
            do_resize: false,
            do_rescale: false,
            do_normalize: false,
            crop_height: 2,
            crop_width: 3,
            ..ClipPreprocessConfig::openai_clip(2)
        };
        let px = preprocess_rgb(&src, 5, 4, &cfg).unwrap();
        // top = (4-2)//2 = 1, left = (5-3)//2 = 1; red plane first.
        assert_eq!(&px[..3], &[18.0, 21.0, 24.0]);
        assert_eq!(px.len(), 18);
    }
}
