//! Image preparation for ingest: decode (any supported format), resize by one of
//! img2dataset's modes, re-encode as JPEG, and hash the stored bytes.

use std::io::Cursor;

use image::ImageDecoder;

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How images are brought to `image_size` (img2dataset's `resize_mode`s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Keep the downloaded size.
    No,
    /// Shortest side to `image_size`, then crop the centre square.
    CenterCrop,
    /// Shortest side to `image_size`, aspect ratio kept.
    KeepRatio,
    /// Longest side to `image_size`, then pad to a square with black borders.
    Border,
}

/// Everything that decides the stored image.
#[derive(Debug, Clone, Copy)]
pub struct ImageSpec {
    pub size: u32,
    pub mode: ResizeMode,
    /// Only shrink: images smaller than `size` are not enlarged.
    pub only_if_bigger: bool,
    pub jpeg_quality: u8,
    /// 4:2:0 chroma subsampling (smaller, faster; what img2dataset writes) instead of 4:4:4.
    pub subsample_chroma: bool,
    /// Decoded images with more pixels than this are rejected (decompression bombs).
    pub max_pixels: u64,
}

/// A decoded, resized and re-encoded image.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    pub jpeg: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub original_width: u32,
    pub original_height: u32,
    pub sha256: String,
}

/// Decodes `bytes`, resizes per `spec` and encodes JPEG. The error string says why the
/// bytes are unusable (it becomes the sample's `error`).
pub fn prepare(bytes: &[u8], spec: &ImageSpec) -> Result<PreparedImage, String> {
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read image header: {e}"))?;
    if reader.format().is_none() {
        return Err("not a recognised image format".into());
    }
    let decoder = reader
        .into_decoder()
        .map_err(|e| format!("cannot decode image: {e}"))?;
    // The header alone gives the size, so bombs are refused before any pixel is decoded.
    let (ow, oh) = decoder.dimensions();
    if u64::from(ow) * u64::from(oh) > spec.max_pixels {
        return Err(format!(
            "image is {ow}x{oh}, more than max_pixels={}",
            spec.max_pixels
        ));
    }
    if ow == 0 || oh == 0 {
        return Err("image has zero size".into());
    }
    // Transparency onto white, as img2dataset (and transformers' convert_to_rgb) do; 16-bit
    // samples keep their high byte.
    let decoded = crate::imaging::preprocess::rgb_over_white(
        image::DynamicImage::from_decoder(decoder)
            .map_err(|e| format!("cannot decode image: {e}"))?,
        bytes,
        crate::imaging::preprocess::SixteenBit::HighByte,
    );
    let (w, h, rgb) = resize_rgb(decoded.into_raw(), ow, oh, spec)?;
    let jpeg = encode_jpeg(&rgb, w, h, spec.jpeg_quality, spec.subsample_chroma)?;
    let sha256 = hex::encode(Sha256::digest(&jpeg));
    Ok(PreparedImage {
        jpeg,
        width: w,
        height: h,
        original_width: ow,
        original_height: oh,
        sha256,
    })
}

/// Resizes packed RGB8 `pixels` (`w`×`h`) per `spec`; returns the new size and pixels.
pub fn resize_rgb(
    pixels: Vec<u8>,
    w: u32,
    h: u32,
    spec: &ImageSpec,
) -> Result<(u32, u32, Vec<u8>), String> {
    let s = spec.size;
    let short = w.min(h);
    let long = w.max(h);
    let scale_to = |side: u32| -> f64 {
        if spec.only_if_bigger && side <= s {
            1.0
        } else {
            f64::from(s) / f64::from(side)
        }
    };
    let scaled = |v: u32, f: f64| ((f64::from(v) * f).round() as u32).max(1);
    match spec.mode {
        ResizeMode::No => Ok((w, h, pixels)),
        ResizeMode::CenterCrop => {
            let f = scale_to(short);
            let side = scaled(short, f);
            let left = f64::from(w - short) / 2.0;
            let top = f64::from(h - short) / 2.0;
            let crop = (left, top, f64::from(short), f64::from(short));
            let out = resize(pixels, w, h, side, side, Some(crop), f)?;
            Ok((side, side, out))
        }
        ResizeMode::KeepRatio => {
            let f = scale_to(short);
            let (nw, nh) = (scaled(w, f), scaled(h, f));
            // A sliver's long side grows with the short one: refuse what cannot be stored
            // (a JPEG side is at most 65535) before allocating it.
            if nw.max(nh) > 65_535 || u64::from(nw) * u64::from(nh) > spec.max_pixels {
                return Err(format!(
                    "a {w}x{h} image resizes to {nw}x{nh}: a side over 65535 or more than max_pixels={}",
                    spec.max_pixels
                ));
            }
            Ok((nw, nh, resize(pixels, w, h, nw, nh, None, f)?))
        }
        ResizeMode::Border => {
            let f = scale_to(long);
            let (nw, nh) = (scaled(w, f), scaled(h, f));
            let inner = resize(pixels, w, h, nw, nh, None, f)?;
            let side = nw.max(nh).max(if spec.only_if_bigger && long <= s {
                long
            } else {
                s
            });
            let mut out = vec![0u8; (side * side * 3) as usize];
            let (x0, y0) = ((side - nw) / 2, (side - nh) / 2);
            for row in 0..nh {
                let src = (row * nw * 3) as usize;
                let dst = (((y0 + row) * side + x0) * 3) as usize;
                out[dst..dst + (nw * 3) as usize]
                    .copy_from_slice(&inner[src..src + (nw * 3) as usize]);
            }
            Ok((side, side, out))
        }
    }
}

/// Resamples with an area-averaging (box) filter when shrinking and Lanczos3 when enlarging,
/// as img2dataset does with OpenCV's INTER_AREA / INTER_LANCZOS4.
fn resize(
    pixels: Vec<u8>,
    w: u32,
    h: u32,
    nw: u32,
    nh: u32,
    crop: Option<(f64, f64, f64, f64)>,
    factor: f64,
) -> Result<Vec<u8>, String> {
    if crop.is_none() && nw == w && nh == h {
        return Ok(pixels);
    }
    let src =
        Image::from_vec_u8(w, h, pixels, PixelType::U8x3).map_err(|e| format!("resize: {e}"))?;
    let mut dst = Image::new(nw, nh, PixelType::U8x3);
    let filter = if factor < 1.0 {
        FilterType::Box
    } else {
        FilterType::Lanczos3
    };
    let mut options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(filter));
    if let Some((l, t, cw, ch)) = crop {
        options = options.crop(l, t, cw, ch);
    }
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .map_err(|e| format!("resize: {e}"))?;
    Ok(dst.into_vec())
}

/// Encodes packed RGB8 pixels as a baseline JPEG; `subsample_chroma` selects 4:2:0 (what
/// libjpeg/OpenCV, and so img2dataset, write at every quality) instead of full 4:4:4 chroma.
pub fn encode_jpeg(
    rgb: &[u8],
    w: u32,
    h: u32,
    quality: u8,
    subsample_chroma: bool,
) -> Result<Vec<u8>, String> {
    let (w16, h16) = (
        u16::try_from(w).map_err(|_| format!("image width {w} too large for JPEG"))?,
        u16::try_from(h).map_err(|_| format!("image height {h} too large for JPEG"))?,
    );
    let mut out = Vec::with_capacity(rgb.len() / 8);
    let mut encoder = jpeg_encoder::Encoder::new(&mut out, quality);
    encoder.set_sampling_factor(if subsample_chroma {
        jpeg_encoder::SamplingFactor::F_2_2
    } else {
        jpeg_encoder::SamplingFactor::F_1_1
    });
    encoder
        .encode(rgb, w16, h16, jpeg_encoder::ColorType::Rgb)
        .map_err(|e| format!("JPEG encoding failed: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mode: ResizeMode) -> ImageSpec {
        ImageSpec {
            size: 32,
            mode,
            only_if_bigger: false,
            jpeg_quality: 90,
            subsample_chroma: true,
            max_pixels: 1 << 26,
        }
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img =
            image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 3) as u8, (y * 5) as u8, 128]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn modes_give_img2dataset_geometry() {
        let src = png(80, 40);
        let p = prepare(&src, &spec(ResizeMode::CenterCrop)).unwrap();
        assert_eq!(
            (p.width, p.height, p.original_width, p.original_height),
            (32, 32, 80, 40)
        );
        let p = prepare(&src, &spec(ResizeMode::KeepRatio)).unwrap();
        assert_eq!((p.width, p.height), (64, 32));
        let p = prepare(&src, &spec(ResizeMode::Border)).unwrap();
        assert_eq!((p.width, p.height), (32, 32));
        let p = prepare(&src, &spec(ResizeMode::No)).unwrap();
        assert_eq!((p.width, p.height), (80, 40));
    }

    #[test]
    fn only_if_bigger_leaves_small_images_unscaled() {
        let src = png(20, 10);
        let mut s = spec(ResizeMode::KeepRatio);
        s.only_if_bigger = true;
        let p = prepare(&src, &s).unwrap();
        assert_eq!((p.width, p.height), (20, 10));
    }

    #[test]
    fn border_pads_with_black_and_keeps_content_centred() {
        let img = image::RgbImage::from_pixel(64, 32, image::Rgb([255, 255, 255]));
        let (w, h, px) = resize_rgb(img.into_raw(), 64, 32, &spec(ResizeMode::Border)).unwrap();
        assert_eq!((w, h), (32, 32));
        let at = |x: u32, y: u32| px[((y * w + x) * 3) as usize];
        assert_eq!(at(16, 0), 0, "top border is black");
        assert_eq!(at(16, 16), 255, "centre keeps the image");
    }

    #[test]
    fn output_is_a_decodable_jpeg_with_matching_hash() {
        let p = prepare(&png(50, 70), &spec(ResizeMode::CenterCrop)).unwrap();
        let back = image::load_from_memory(&p.jpeg).unwrap();
        assert_eq!((back.width(), back.height()), (32, 32));
        assert_eq!(p.sha256, hex::encode(Sha256::digest(&p.jpeg)));
    }

    #[test]
    fn garbage_and_truncated_bytes_are_decode_errors() {
        assert!(prepare(b"definitely not an image", &spec(ResizeMode::CenterCrop)).is_err());
        let src = png(50, 50);
        assert!(prepare(&src[..src.len() / 3], &spec(ResizeMode::CenterCrop)).is_err());
    }

    #[test]
    fn oversized_images_are_rejected_before_decoding() {
        let mut s = spec(ResizeMode::CenterCrop);
        s.max_pixels = 100;
        let err = prepare(&png(50, 50), &s).unwrap_err();
        assert!(err.contains("max_pixels"), "{err}");
    }

    /// The luma sampling byte of the first component in the SOF0 frame header.
    fn luma_sampling(jpeg: &[u8]) -> u8 {
        let sof = jpeg
            .windows(2)
            .position(|w| w == [0xFF, 0xC0])
            .expect("baseline SOF0 marker");
        // marker(2) length(2) precision(1) height(2) width(2) ncomp(1) id(1) sampling(1)
        jpeg[sof + 11]
    }

    #[test]
    fn chroma_subsampling_is_420_when_asked_and_444_otherwise() {
        let px = vec![128u8; 16 * 16 * 3];
        assert_eq!(
            luma_sampling(&encode_jpeg(&px, 16, 16, 95, true).unwrap()),
            0x22
        );
        assert_eq!(
            luma_sampling(&encode_jpeg(&px, 16, 16, 95, false).unwrap()),
            0x11
        );
    }
}
