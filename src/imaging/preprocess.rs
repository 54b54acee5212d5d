//! Exact Hugging Face CLIPImageProcessor preprocessing, for both of transformers' backends.
//!
//! The Pillow backend converts to RGB, resizes the shortest side with `PIL.Image.resize`
//! (8-bit fixed-point separable convolution, horizontal pass first, rounded to u8 in between),
//! crops the centre, rescales by `rescale_factor` (in f64, then f32) and normalises in f32.
//! The torchvision backend (transformers 5's default once torchvision is installed) resizes
//! the same uint8 image with torch's antialiased kernel, which has Pillow's taps but weights
//! rounded to 16 bits at a precision chosen per axis, and normalises with mean and std
//! pre-multiplied by `1 / rescale_factor` in f32; its results differ from Pillow's by one
//! level in a few pixels in a hundred (a quarter of them in a strongly upscaled image). Each
//! step here follows Pillow's `Resample.c`,
//! ATen's `UpSampleKernel.cpp` and transformers' image processors to the bit, so the pixels
//! equal HF's `pixel_values` for the chosen backend.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, IoContext, Result};

/// Which of transformers' image-processor backends the pixels reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ImageBackend {
    /// `CLIPImageProcessorPil` (transformers 4's `CLIPImageProcessor`, and transformers 5's
    /// without torchvision).
    Pil,
    /// The torchvision backend (`CLIPImageProcessor` in transformers 5 with torchvision
    /// installed, `CLIPImageProcessorFast` in transformers 4), on the CPU.
    Torchvision,
}

/// `preprocessor_config.json`, resolved to what the computation needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipPreprocessConfig {
    pub backend: ImageBackend,
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
    image_processor_type: Option<String>,
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

// transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD as written there (f32 rounds them).
#[allow(clippy::excessive_precision)]
const OPENAI_CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
const OPENAI_CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

impl ClipPreprocessConfig {
    /// openai/clip-vit-base-patch32's preprocessing at `size` pixels.
    pub fn openai_clip(size: u32) -> Self {
        Self {
            backend: ImageBackend::Pil,
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

    /// Parses `preprocessor_config.json` with transformers' defaults for CLIP. The backend
    /// is torchvision's for a `...Fast` `image_processor_type`, else Pillow's (see
    /// [`Self::with_backend`]).
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
        let fast = raw
            .image_processor_type
            .as_deref()
            .is_some_and(|t| t.ends_with("Fast"));
        Ok(Self {
            backend: ImageBackend::Pil,
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
        }
        .with_backend(if fast {
            ImageBackend::Torchvision
        } else {
            ImageBackend::Pil
        }))
    }

    /// The same preprocessing as `backend` computes it; [`Self::check`] says whether prefcap
    /// reproduces that.
    pub fn with_backend(self, backend: ImageBackend) -> Self {
        Self { backend, ..self }
    }

    /// Refuses what prefcap does not reproduce: of torchvision's filters, only bilinear and
    /// bicubic (its Lanczos is its own code; box and Hamming it refuses itself).
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.backend == ImageBackend::Torchvision
            && self.do_resize
            && ![2, 3].contains(&self.resample)
        {
            return Err(format!(
                "resample {} with transformers' torchvision image backend is not reproduced \
                 (2 bilinear and 3 bicubic are); set clip.image_backend = \"pil\" for \
                 Pillow's",
                self.resample
            ));
        }
        Ok(())
    }

    /// A string that changes whenever the preprocessed pixels could change: part of every
    /// image feature-cache key.
    pub fn fingerprint(&self) -> String {
        format!("image-v4:{self:?}")
    }

    /// Side of the square output; the model's `image_size` must equal it.
    pub fn output_size(&self) -> Option<u32> {
        (self.do_center_crop && self.crop_height == self.crop_width).then_some(self.crop_height)
    }
}

/// Decodes an encoded image (JPEG, PNG, ...) and preprocesses it into CHW f32 pixels.
pub fn preprocess_bytes(bytes: &[u8], cfg: &ClipPreprocessConfig) -> Result<Vec<f32>> {
    let crop = decode_crop(bytes, cfg)?;
    Ok(PixelTable::new(cfg).normalise(&crop))
}

/// Decodes an encoded image and resizes and crops it into CHW bytes: the preprocessing up to
/// the per-pixel rescale and normalisation, which [`PixelTable`] applies. A quarter of the
/// f32 pixels' size, so the embed stage moves and uploads these.
pub fn decode_crop(bytes: &[u8], cfg: &ClipPreprocessConfig) -> Result<Vec<u8>> {
    let rgb = decode_rgb(bytes)?;
    let (w, h) = rgb.dimensions();
    crop_rgb8(rgb.as_raw(), w as usize, h as usize, cfg)
}

/// Decodes an encoded image into the RGB pixels transformers' users get from Pillow: JPEGs
/// with libjpeg-turbo's decoder (see [`super::jpeg`]), other formats with the image crate,
/// then [`rgb_over_white`].
pub fn decode_rgb(bytes: &[u8]) -> Result<image::RgbImage> {
    let error = |message: String| Error::Image(format!("cannot decode image: {message}"));
    let img = if super::jpeg::is_jpeg(bytes) {
        super::jpeg::decode(bytes).map_err(error)?
    } else {
        image::load_from_memory(bytes).map_err(|e| error(e.to_string()))?
    };
    Ok(rgb_over_white(img, bytes, SixteenBit::Pillow))
}

/// How 16-bit samples become bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SixteenBit {
    /// As Pillow opens the image, which is what transformers preprocesses: RGB, RGBA and
    /// grey + alpha keep each sample's high byte (Pillow truncates where the image crate
    /// rounds); plain 16-bit grey (Pillow's mode `I;16`) is clipped at 255 when converted, so
    /// all but its darkest values turn white, and its colour key (`tRNS`) is applied; a 16-bit
    /// RGB PNG's colour key is ignored.
    Pillow,
    /// Each sample's high byte, transparency kept: for stored images, where grey should keep
    /// its content.
    HighByte,
}

/// The RGB pixels of a decoded image as transformers' `convert_to_rgb` makes them: an image
/// with transparency (RGBA, grey + alpha, a palette with a transparent index) is composited
/// onto opaque white, so transparent pixels become white whatever colour they hold; any
/// other converts directly. 16-bit images first become 8-bit as `sixteen` says; `encoded`
/// is the file the image was decoded from.
pub fn rgb_over_white(
    img: image::DynamicImage,
    encoded: &[u8],
    sixteen: SixteenBit,
) -> image::RgbImage {
    let img = to_8bit(img, encoded, sixteen);
    if !img.color().has_alpha() {
        return img.into_rgb8();
    }
    let rgba = img.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = Vec::with_capacity(w as usize * h as usize * 3);
    for p in rgba.pixels() {
        out.extend(p.0[..3].iter().map(|&v| over_white(v, p.0[3])));
    }
    image::RgbImage::from_raw(w, h, out).expect("3 bytes for each pixel")
}

/// A 16-bit image as 8 bits (see [`SixteenBit`]); other images pass through.
fn to_8bit(img: image::DynamicImage, encoded: &[u8], sixteen: SixteenBit) -> image::DynamicImage {
    use image::{DynamicImage as D, ImageBuffer};
    fn map<P: image::Pixel<Subpixel = u16>, Q: image::Pixel<Subpixel = u8>>(
        buf: ImageBuffer<P, Vec<u16>>,
        f: fn(u16) -> u8,
    ) -> ImageBuffer<Q, Vec<u8>> {
        let (w, h) = buf.dimensions();
        let raw = buf.into_raw().into_iter().map(f).collect();
        ImageBuffer::from_raw(w, h, raw).expect("one byte for each 16-bit sample")
    }
    let high = |v: u16| (v >> 8) as u8;
    let clip = |v: u16| v.min(255) as u8;
    let pillow = sixteen == SixteenBit::Pillow;
    // The image crate turns a 16-bit colour key into an alpha channel (0 or 65535). Pillow
    // applies a grey key to its `I;16` values and ignores an RGB one.
    let keyed = pillow
        && matches!(img, D::ImageLumaA16(_) | D::ImageRgba16(_))
        && png16_colour_key(encoded);
    match img {
        D::ImageLumaA16(buf) if keyed => D::ImageLumaA8(map(buf, clip)),
        D::ImageRgba16(_) if keyed => D::ImageRgb8(map(img.into_rgb16(), high)),
        D::ImageLuma16(buf) if pillow => D::ImageLuma8(map(buf, clip)),
        D::ImageLuma16(buf) => D::ImageLuma8(map(buf, high)),
        D::ImageLumaA16(buf) => D::ImageLumaA8(map(buf, high)),
        D::ImageRgb16(buf) => D::ImageRgb8(map(buf, high)),
        D::ImageRgba16(buf) => D::ImageRgba8(map(buf, high)),
        other => other,
    }
}

/// Whether `encoded` is a 16-bit grey or RGB PNG with a colour key (a `tRNS` chunk).
fn png16_colour_key(encoded: &[u8]) -> bool {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    // IHDR is the first chunk: bit depth at byte 24, colour type at 25.
    if !encoded.starts_with(SIGNATURE) || encoded.len() < 33 || &encoded[12..16] != b"IHDR" {
        return false;
    }
    if encoded[24] != 16 || ![0, 2].contains(&encoded[25]) {
        return false;
    }
    let mut at = 33;
    while let Some(header) = encoded.get(at..at + 8) {
        let len = u32::from_be_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        match &header[4..] {
            b"tRNS" => return true,
            b"IDAT" | b"IEND" => return false,
            _ => at = at.saturating_add(12).saturating_add(len),
        }
    }
    false
}

/// One channel value `v` with alpha `a` composited onto white: `rint(a/255·v + 255 − a)`,
/// which for every `(v, a)` equals Pillow's fixed-point `alpha_composite`.
fn over_white(v: u8, a: u8) -> u8 {
    let (v, a) = (f64::from(v), f64::from(a));
    (a / 255.0 * v + 255.0 - a)
        .round_ties_even()
        .clamp(0.0, 255.0) as u8
}

/// Preprocesses packed RGB8 pixels (`w × h × 3`) into CHW f32.
pub fn preprocess_rgb(
    rgb: &[u8],
    w: usize,
    h: usize,
    cfg: &ClipPreprocessConfig,
) -> Result<Vec<f32>> {
    Ok(PixelTable::new(cfg).normalise(&crop_rgb8(rgb, w, h, cfg)?))
}

/// The most pixels an image may have after its shortest-side resize (and before the crop).
const MAX_RESIZED_PIXELS: usize = 1 << 26;

/// Resizes (shortest side) and centre-crops packed RGB8 pixels (`w × h × 3`) into CHW bytes.
pub fn crop_rgb8(rgb: &[u8], w: usize, h: usize, cfg: &ClipPreprocessConfig) -> Result<Vec<u8>> {
    if w == 0 || h == 0 || rgb.len() != w * h * 3 {
        return Err(Error::Image(format!(
            "bad image buffer: {w}×{h} with {} bytes",
            rgb.len()
        )));
    }
    let (mut img, mut w, mut h) = (std::borrow::Cow::Borrowed(rgb), w, h);
    if cfg.do_resize {
        let (nw, nh) = shortest_edge_size(w, h, cfg.shortest_edge as usize);
        if nw.saturating_mul(nh) > MAX_RESIZED_PIXELS {
            // A sliver (1×100000 becomes 224×22,400,000: 15 GB) is refused like an
            // undecodable image rather than taking the whole run down.
            return Err(Error::Image(format!(
                "a {w}×{h} image resizes to {nw}×{nh}, more than {MAX_RESIZED_PIXELS} pixels"
            )));
        }
        let f = filter(cfg.resample, cfg.backend);
        img = std::borrow::Cow::Owned(resize_rgb8(&img, w, h, nw, nh, f));
        (w, h) = (nw, nh);
    }
    let (ch, cw) = if cfg.do_center_crop {
        (cfg.crop_height as usize, cfg.crop_width as usize)
    } else {
        (h, w)
    };
    // transformers' centre crop: offsets by floor division, zero padding where the image is
    // smaller than the crop: `(crop - size) // 2` rows before it in the torchvision backend,
    // the rest (one more when odd) in the Pillow one.
    let offset = |size: usize, crop: usize| {
        let spare = size as i64 - crop as i64;
        if spare < 0 && cfg.backend == ImageBackend::Torchvision {
            -(-spare).div_euclid(2)
        } else {
            spare.div_euclid(2)
        }
    };
    let (top, left) = (offset(h, ch), offset(w, cw));
    let mut out = vec![0u8; 3 * ch * cw];
    let plane = ch * cw;
    let (x0, x1) = (left.max(0), (left + cw as i64).min(w as i64));
    for y in 0..ch {
        let sy = y as i64 + top;
        if sy < 0 || sy >= h as i64 || x0 >= x1 {
            continue;
        }
        let src = &img[(sy as usize * w + x0 as usize) * 3..(sy as usize * w + x1 as usize) * 3];
        let at = y * cw + (x0 - left) as usize;
        for (c, dst) in out.chunks_exact_mut(plane).enumerate() {
            for (d, px) in dst[at..].iter_mut().zip(src.chunks_exact(3)) {
                *d = px[c];
            }
        }
    }
    Ok(out)
}

/// The rescaled, normalised value of every byte in every channel, as transformers computes
/// it: a table lookup gives the same bits as the arithmetic, on the CPU or on the device.
/// Pillow backend: rescale by `rescale_factor` in f64, then f32, then `(p - mean) / std` in
/// f32. torchvision backend: `(p - mean·s) / (std·s)` in f32 with `s = 1 / rescale_factor`
/// (rescale fused into the normalisation), or `p · rescale_factor` in f32 alone.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelTable {
    /// `values[c * 256 + v]`: channel `c`, byte `v`.
    pub values: Vec<f32>,
}

impl PixelTable {
    pub fn new(cfg: &ClipPreprocessConfig) -> Self {
        let mut values = Vec::with_capacity(3 * 256);
        let torchvision = cfg.backend == ImageBackend::Torchvision;
        for c in 0..3 {
            for v in 0..=255u8 {
                if torchvision {
                    let p = f32::from(v);
                    values.push(match (cfg.do_rescale, cfg.do_normalize) {
                        (true, true) => {
                            let s = (1.0 / cfg.rescale_factor) as f32;
                            (p - cfg.image_mean[c] * s) / (cfg.image_std[c] * s)
                        }
                        (false, true) => (p - cfg.image_mean[c]) / cfg.image_std[c],
                        (true, false) => p * cfg.rescale_factor as f32,
                        (false, false) => p,
                    });
                    continue;
                }
                let mut p = if cfg.do_rescale {
                    (f64::from(v) * cfg.rescale_factor) as f32
                } else {
                    f32::from(v)
                };
                if cfg.do_normalize {
                    p = (p - cfg.image_mean[c]) / cfg.image_std[c];
                }
                values.push(p);
            }
        }
        Self { values }
    }

    /// CHW bytes of one image into f32 pixels.
    pub fn normalise(&self, chw: &[u8]) -> Vec<f32> {
        let mut out = vec![0f32; chw.len()];
        self.normalise_planes(chw, &mut out, chw.len() / 3);
        out
    }

    /// CHW bytes of one or more images of `plane` pixels per channel into `out`, of the
    /// same length.
    pub fn normalise_planes(&self, chw: &[u8], out: &mut [f32], plane: usize) {
        for (i, (src, dst)) in chw
            .chunks(plane.max(1))
            .zip(out.chunks_mut(plane.max(1)))
            .enumerate()
        {
            let table = &self.values[(i % 3) * 256..(i % 3 + 1) * 256];
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = table[usize::from(v)];
            }
        }
    }
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

/// A resampling filter: its kernel, support and how its weights become integers.
#[derive(Clone, Copy)]
pub struct Filter {
    kernel: fn(f64) -> f64,
    support: f64,
    /// torch's int16 weights at a per-axis precision, instead of Pillow's 22-bit ones.
    int16_weights: bool,
}

/// The filter of PIL resample id `resample` as `backend` computes it: torch's cubic
/// evaluates Keys' polynomial in another order than Pillow's (which could move a weight's
/// last bit), so it is written as ATen writes it.
fn filter(resample: u32, backend: ImageBackend) -> Filter {
    if backend == ImageBackend::Torchvision {
        let bilinear = Filter {
            int16_weights: true,
            ..pillow_filter(2)
        };
        let bicubic = Filter {
            kernel: |x| keys_cubic(x, true),
            int16_weights: true,
            ..pillow_filter(3)
        };
        // `check` admits only these two.
        return if resample == 2 { bilinear } else { bicubic };
    }
    pillow_filter(resample)
}

fn pillow_filter(resample: u32) -> Filter {
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
            int16_weights: false,
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
            int16_weights: false,
        },
        4 => Filter {
            kernel: |x| if x > -0.5 && x <= 0.5 { 1.0 } else { 0.0 },
            support: 0.5,
            int16_weights: false,
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
                    // Pillow writes the window's constants as C floats (0.54f, 0.46f).
                    x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
                }
            },
            support: 1.0,
            int16_weights: false,
        },
        _ => Filter {
            kernel: |x| keys_cubic(x, false),
            support: 2.0,
            int16_weights: false,
        },
    }
}

/// Keys' cubic convolution kernel with `a = -0.5`, its outer piece evaluated in ATen's
/// order (`aten`) or Pillow's.
fn keys_cubic(x: f64, aten: bool) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x >= 2.0 {
        0.0
    } else if aten {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    }
}

/// Pillow's fixed-point precision for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: first input index and its fixed-point weights (Pillow's
/// `precompute_coeffs` followed by `normalize_coeffs_8bpc`, or ATen's
/// `_compute_index_ranges_int16_weights`).
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
    /// Fractional bits of the weights.
    precision: u32,
}

fn precompute_coeffs(in_size: usize, out_size: usize, f: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = f.support * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut normalised = vec![0f64; out_size * ksize];
    // The largest normalised weight: torch picks its precision from it.
    let mut largest = 0f64;
    for (xx, k) in normalised.chunks_exact_mut(ksize).enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero; negatives clamp to 0 just after.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((((center + support + 0.5) as i64) as usize).min(in_size) - xmin).min(ksize);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = (f.kernel)((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        if ww != 0.0 {
            for kx in &mut k[..xmax] {
                *kx /= ww;
                largest = largest.max(*kx);
            }
        }
        bounds.push((xmin, xmax));
    }
    let precision = if f.int16_weights {
        // The most fractional bits under which twice the largest weight still fits in i16.
        (0..22)
            .find(|p| (0.5 + largest * f64::from(1u32 << (p + 1))) as i32 >= 1 << 15)
            .unwrap_or(22)
    } else {
        PRECISION_BITS
    };
    let weights = normalised
        .iter()
        .map(|&w| {
            let fixed = w * f64::from(1u32 << precision);
            if w < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            }
        })
        .collect();
    Coeffs {
        bounds,
        ksize,
        weights,
        precision,
    }
}

/// Pillow's `clip8` (and ATen's uint8 store): a fixed-point sum with `precision` fractional
/// bits back to a byte, saturating (branch-free, so the row loops vectorise).
#[inline]
fn clip8(v: i32, precision: u32) -> u8 {
    (v >> precision).clamp(0, 255) as u8
}

/// `PIL.Image.resize((nw, nh), filter)` of packed RGB8 pixels, bit for bit.
///
/// Pillow resamples horizontally (only the rows the vertical pass reads), rounds to bytes,
/// then vertically. Both passes here run as [`resample_rows`], whole rows of vectorised
/// integer multiply-adds: the horizontal one on the transposed image, then transposed back.
/// The taps and their order are Pillow's, so the integer sums are the same.
pub fn resize_rgb8(src: &[u8], w: usize, h: usize, nw: usize, nh: usize, f: Filter) -> Vec<u8> {
    let need_h = nw != w;
    let need_v = nh != h;
    let vert = precompute_coeffs(h, nh, f);
    let (tmp, row0) = if need_h {
        let (first, last) = if need_v {
            let (lb, ln) = vert.bounds[nh - 1];
            (vert.bounds[0].0, lb + ln)
        } else {
            (0, h)
        };
        let rows = last - first;
        let columns = transpose_rgb8(&src[first * w * 3..last * w * 3], w, rows);
        let horiz = precompute_coeffs(w, nw, f);
        let resized = resample_rows(&columns, rows * 3, 0, &horiz);
        (
            std::borrow::Cow::Owned(transpose_rgb8(&resized, rows, nw)),
            first,
        )
    } else {
        (std::borrow::Cow::Borrowed(src), 0)
    };
    if !need_v {
        return tmp.into_owned();
    }
    resample_rows(&tmp, nw * 3, row0, &vert)
}

/// One resampling pass along the row direction: output row `i` is the sum over Pillow's taps
/// of `weight · input row (start_i + t)`, rounded and saturated to bytes. Rows are `len`
/// bytes; `src` begins at input row `row0`.
fn resample_rows(src: &[u8], len: usize, row0: usize, c: &Coeffs) -> Vec<u8> {
    let mut out = vec![0u8; c.bounds.len() * len];
    let mut acc = vec![0i32; len];
    for (i, (&(start, taps), o)) in c.bounds.iter().zip(out.chunks_mut(len)).enumerate() {
        let rows = &src[(start - row0) * len..(start - row0 + taps) * len];
        let k = &c.weights[i * c.ksize..i * c.ksize + taps];
        weighted_row_sum(rows, k, c.precision, &mut acc, o);
    }
    out
}

crate::kernels::multiversioned! {
    /// `out = clip8(round + Σ_t k[t] · rows[t])` for consecutive rows of `out.len()` bytes,
    /// built for the CPU's widest vectors.
    fn weighted_row_sum(rows: &[u8], k: &[i32], precision: u32, acc: &mut [i32], out: &mut [u8]) {
        acc.fill(1i32 << (precision - 1));
        for (row, &kw) in rows.chunks_exact(out.len()).zip(k) {
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += i32::from(p) * kw;
            }
        }
        for (o, &a) in out.iter_mut().zip(acc.iter()) {
            *o = clip8(a, precision);
        }
    }
}

/// `h` rows of `w` RGB pixels → `w` rows of `h` RGB pixels, in tiles of rows that stay in
/// cache.
fn transpose_rgb8(src: &[u8], w: usize, h: usize) -> Vec<u8> {
    const TILE: usize = 32;
    let mut out = vec![0u8; w * h * 3];
    for x0 in (0..w).step_by(TILE) {
        let x1 = (x0 + TILE).min(w);
        for (y, row) in src.chunks_exact(w * 3).enumerate() {
            for (x, px) in (x0..x1).zip(row[x0 * 3..x1 * 3].chunks_exact(3)) {
                let d = (x * h + y) * 3;
                out[d..d + 3].copy_from_slice(px);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_white_equals_pillows_fixed_point_alpha_composite() {
        // Pillow's ImagingAlphaComposite for an opaque white destination, transcribed.
        const BITS: u32 = 7;
        let shift_div_255 = |x: u32| ((x >> 8) + x) >> 8;
        for a in 0..=255u32 {
            for v in 0..=255u32 {
                let pillow = if a == 0 {
                    255
                } else {
                    let out_a_255 = a * 255 + 255 * (255 - a);
                    let coef1 = a * 255 * 255 * (1 << BITS) / out_a_255;
                    let coef2 = 255 * (1 << BITS) - coef1;
                    shift_div_255(v * coef1 + 255 * coef2 + (0x80 << BITS)) >> BITS
                };
                assert_eq!(
                    u32::from(over_white(v as u8, a as u8)),
                    pillow,
                    "v {v} a {a}"
                );
            }
        }
    }

    #[test]
    fn transparent_and_grey_images_preprocess_as_transformers_does() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/convert-rgb");
        let cfg = ClipPreprocessConfig::from_file(&crate::hf_tiny_fixture(
            "clip-tiny/preprocessor_config.json",
        ))
        .unwrap();
        let expected = crate::testkit::npy::read_npy(&dir.join("pixel_values.npy")).unwrap();
        let names = [
            "rgba.png",
            "la.png",
            "palette.png",
            "grey.png",
            "grey16.png",
            "rgb16.png",
            "la16.png",
            "rgba16.png",
            "grey16-key.png",
            "rgb16-key.png",
        ];
        let per = expected.data.len() / names.len();
        for (i, name) in names.iter().enumerate() {
            let png = std::fs::read(dir.join(name)).unwrap();
            let ours = preprocess_bytes(&png, &cfg).unwrap();
            let diff = ours
                .iter()
                .zip(&expected.data[i * per..(i + 1) * per])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff <= 1e-6, "{name}: max abs diff {diff}");
        }
        // Transparency matters here: dropping alpha instead gives other pixels.
        let png = std::fs::read(dir.join("rgba.png")).unwrap();
        let rgb = image::load_from_memory(&png).unwrap().into_rgb8();
        let dropped = preprocess_rgb(rgb.as_raw(), 53, 41, &cfg).unwrap();
        assert_ne!(dropped, expected.data[..per]);
        // So does the 8-bit reduction: the image crate's own (rounding) gives other pixels.
        let png = std::fs::read(dir.join("rgb16.png")).unwrap();
        let rgb = image::load_from_memory(&png).unwrap().into_rgb8();
        let rounded = preprocess_rgb(rgb.as_raw(), 51, 43, &cfg).unwrap();
        assert_ne!(rounded, expected.data[5 * per..6 * per]);
    }

    #[test]
    fn torchvision_backend_equals_transformers_torchvision_processor() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torchvision");
        let versions: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("versions.json")).unwrap()).unwrap();
        let files: Vec<&str> = versions["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        let pil = ClipPreprocessConfig::from_file(&crate::hf_tiny_fixture(
            "clip-tiny/preprocessor_config.json",
        ))
        .unwrap();
        let bicubic = pil.clone().with_backend(ImageBackend::Torchvision);
        let bilinear = ClipPreprocessConfig {
            resample: 2,
            ..bicubic.clone()
        };
        let mut differs_from_pil = 0;
        for (npy, cfg, count) in [
            ("pixel_values.npy", &bicubic, files.len()),
            ("pixel_values_bilinear.npy", &bilinear, 12),
        ] {
            let expected = crate::testkit::npy::read_npy(&dir.join(npy)).unwrap();
            assert_eq!(expected.shape[0], count, "{npy}");
            let per = expected.data.len() / count;
            for (i, name) in files[..count].iter().enumerate() {
                let bytes = std::fs::read(dir.join(name)).unwrap();
                let ours = preprocess_bytes(&bytes, cfg).unwrap();
                let want = &expected.data[i * per..(i + 1) * per];
                let diff = ours
                    .iter()
                    .zip(want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(diff == 0.0, "{npy} {name}: max abs diff {diff}");
                if cfg.resample == 3 && preprocess_bytes(&bytes, &pil).unwrap() != want {
                    differs_from_pil += 1;
                }
            }
        }
        // The two backends do disagree, so this compares what it claims to.
        assert!(differs_from_pil >= files.len() / 2, "{differs_from_pil}");
        // Without a resize, the crop pads: the backends place the padding differently.
        for (npy, backend) in [
            ("pixel_values_padded.npy", ImageBackend::Torchvision),
            ("pixel_values_padded_pil.npy", ImageBackend::Pil),
        ] {
            let expected = crate::testkit::npy::read_npy(&dir.join(npy)).unwrap();
            let cfg = ClipPreprocessConfig {
                do_resize: false,
                ..pil.clone().with_backend(backend)
            };
            let per = expected.data.len() / 3;
            for (i, name) in [files[0], files[1], files[8]].iter().enumerate() {
                let ours = preprocess_bytes(&std::fs::read(dir.join(name)).unwrap(), &cfg).unwrap();
                assert!(
                    ours == expected.data[i * per..(i + 1) * per],
                    "{npy} {name}"
                );
            }
        }
        assert!(bicubic.check().is_ok() && bilinear.check().is_ok());
        let lanczos = ClipPreprocessConfig { resample: 1, ..pil };
        assert!(lanczos.check().is_ok());
        let err = lanczos.with_backend(ImageBackend::Torchvision).check();
        assert!(err.unwrap_err().contains("resample 1"));
        let fast = br#"{"image_processor_type": "CLIPImageProcessorFast", "resample": 1}"#;
        let fast = ClipPreprocessConfig::from_json(fast).unwrap();
        assert_eq!(fast.backend, ImageBackend::Torchvision);
        assert!(fast.with_backend(ImageBackend::Pil).check().is_ok());
    }

    #[test]
    fn sixteen_bit_samples_become_bytes_as_pillow_reads_them() {
        use image::{DynamicImage, ImageBuffer};
        let samples = vec![0u16, 0x00ff, 0x0100, 0x017f, 0x7f80, 0x80ff, 0xff7f, 0xffff];
        let rgb = DynamicImage::ImageRgb16(
            ImageBuffer::from_raw(8, 1, samples.iter().flat_map(|&v| [v; 3]).collect()).unwrap(),
        );
        let bytes = |img: DynamicImage, sixteen, channel: usize| -> Vec<u8> {
            let rgb = rgb_over_white(img, &[], sixteen);
            rgb.pixels().map(|p| p.0[channel]).collect()
        };
        let high = [0, 0, 1, 1, 127, 128, 255, 255];
        for sixteen in [SixteenBit::Pillow, SixteenBit::HighByte] {
            assert_eq!(bytes(rgb.clone(), sixteen, 0), high);
        }
        let grey = DynamicImage::ImageLuma16(ImageBuffer::from_raw(8, 1, samples).unwrap());
        let clipped = [0, 255, 255, 255, 255, 255, 255, 255];
        assert_eq!(bytes(grey.clone(), SixteenBit::Pillow, 1), clipped);
        assert_eq!(bytes(grey, SixteenBit::HighByte, 1), high);
        // Alpha is truncated as well before compositing: 0x80ff is alpha 128, as in 8 bits.
        let la = DynamicImage::ImageLumaA16(
            ImageBuffer::from_raw(2, 1, vec![0x0000, 0x80ff, 0xffff, 0x00ff]).unwrap(),
        );
        assert_eq!(bytes(la, SixteenBit::Pillow, 2), [over_white(0, 128), 255]);
    }

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
            let out = resize_rgb8(&src, 37, 23, 16, 11, filter(r, ImageBackend::Pil));
            assert!(out.iter().all(|&v| v == 77), "filter {r}");
            let up = resize_rgb8(&src, 37, 23, 50, 40, filter(r, ImageBackend::Pil));
            assert!(up.iter().all(|&v| v == 77), "filter {r} upscaling");
        }
    }

    #[test]
    fn same_size_is_identity_and_crop_is_centred() {
        let src: Vec<u8> = (0..5 * 4 * 3).map(|i| i as u8).collect();
        assert_eq!(
            resize_rgb8(&src, 5, 4, 5, 4, filter(3, ImageBackend::Pil)),
            src
        );
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

    #[test]
    fn clip8_saturates_like_pillow() {
        let pillow = |v: i32| {
            if v >= (1 << PRECISION_BITS << 8) {
                255
            } else if v <= 0 {
                0
            } else {
                (v >> PRECISION_BITS) as u8
            }
        };
        let edges = [
            i32::MIN,
            -1,
            0,
            1,
            (1 << 22) - 1,
            1 << 22,
            255 << 22,
            (1 << 30) - 1,
        ];
        let more = [1 << 30, i32::MAX];
        for v in edges
            .into_iter()
            .chain(more)
            .chain((-5000..5000).map(|k| k * 300_007))
        {
            assert_eq!(clip8(v, PRECISION_BITS), pillow(v), "{v}");
        }
    }

    #[test]
    fn a_crop_larger_than_the_image_is_zero_padded() {
        let src: Vec<u8> = (1..=3 * 2 * 3).map(|i| i as u8).collect();
        let cfg = ClipPreprocessConfig {
            do_resize: false,
            crop_height: 4,
            crop_width: 4,
            ..ClipPreprocessConfig::openai_clip(4)
        };
        let got = crop_rgb8(&src, 3, 2, &cfg).unwrap();
        // top = (2-4)//2 = -1, left = (3-4)//2 = -1.
        let mut want = vec![0u8; 3 * 16];
        for c in 0..3 {
            for y in 1..3 {
                for x in 1..4 {
                    want[c * 16 + y * 4 + x] = src[((y - 1) * 3 + x - 1) * 3 + c];
                }
            }
        }
        assert_eq!(got, want);
        let table = PixelTable::new(&cfg);
        let px = preprocess_rgb(&src, 3, 2, &cfg).unwrap();
        assert_eq!(px[0], table.values[0], "padding is byte 0 normalised");
        assert_eq!(px[16 + 5], table.values[256 + usize::from(src[1])]);
        assert!(crop_rgb8(&src[1..], 3, 2, &cfg).is_err());
    }

    /// Pillow's `ImagingResample` for 8-bit RGB as written there (and ATen's uint8 loops, at
    /// their precision): pixel by pixel, horizontal pass over the rows the vertical pass
    /// needs, then vertical.
    fn pillow_resize(src: &[u8], w: usize, h: usize, nw: usize, nh: usize, f: Filter) -> Vec<u8> {
        let (horiz, vert) = (precompute_coeffs(w, nw, f), precompute_coeffs(h, nh, f));
        let (first, last) = (
            vert.bounds[0].0,
            vert.bounds[nh - 1].0 + vert.bounds[nh - 1].1,
        );
        let mut tmp = vec![0u8; (last - first) * nw * 3];
        for y in first..last {
            for (xx, &(xmin, xmax)) in horiz.bounds.iter().enumerate() {
                for c in 0..3 {
                    let mut acc = 1i32 << (horiz.precision - 1);
                    for x in 0..xmax {
                        let kw = horiz.weights[xx * horiz.ksize + x];
                        acc += i32::from(src[(y * w + xmin + x) * 3 + c]) * kw;
                    }
                    tmp[((y - first) * nw + xx) * 3 + c] = clip8(acc, horiz.precision);
                }
            }
        }
        let mut out = vec![0u8; nw * nh * 3];
        for (yy, &(ymin, ymax)) in vert.bounds.iter().enumerate() {
            for x in 0..nw * 3 {
                let mut acc = 1i32 << (vert.precision - 1);
                for y in 0..ymax {
                    let kw = vert.weights[yy * vert.ksize + y];
                    acc += i32::from(tmp[(ymin - first + y) * nw * 3 + x]) * kw;
                }
                out[yy * nw * 3 + x] = clip8(acc, vert.precision);
            }
        }
        out
    }

    #[test]
    fn row_passes_on_the_transposed_image_equal_pillows_pixel_loop() {
        let mut rng = crate::rng::SplitMix64::new(3);
        // Down- and upscaling, odd sizes, one side unchanged, every filter.
        let cases = [
            (256, 256, 224, 224),
            (640, 480, 298, 224),
            (67, 45, 47, 32),
            (31, 77, 50, 80),
            (40, 30, 40, 17),
            (40, 30, 23, 30),
        ];
        for (i, &(w, h, nw, nh)) in cases.iter().enumerate() {
            // Smooth gradients plus noise: sums that land near the byte boundaries and the
            // saturation at 0 and 255.
            let src: Vec<u8> = (0..w * h * 3)
                .map(|k| ((k % (w * 3)) * 255 / (w * 3)) as u8 ^ (rng.next_u64() as u8 & 0x1f))
                .collect();
            let r = 1 + (i as u32 % 5);
            for f in [
                filter(r, ImageBackend::Pil),
                filter(2 + i as u32 % 2, ImageBackend::Torchvision),
            ] {
                let got = resize_rgb8(&src, w, h, nw, nh, f);
                assert_eq!(got, pillow_resize(&src, w, h, nw, nh, f), "case {i}");
            }
        }
    }
}
