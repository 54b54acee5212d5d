//! JPEG decoding with libjpeg-turbo's decoder (the copy vendored by mozjpeg, whose decoder is
//! libjpeg-turbo's), which is what Pillow decodes with: the same integer IDCT, "fancy"
//! chroma upsampling and YCbCr conversion, so the pixels equal Pillow's bit for bit. The image
//! crate's decoder differs from it by up to a few levels in about a quarter of the pixels of
//! a 4:2:0 JPEG.

use std::panic::{catch_unwind, AssertUnwindSafe};

use image::{DynamicImage, GrayImage, RgbImage};
use mozjpeg_sys as ffi;

/// The most bytes a decoded image may take (the image crate's default allocation limit).
const MAX_DECODED_BYTES: u64 = 512 << 20;

/// Whether `bytes` begin like a JPEG file (start-of-image, then a marker).
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// Decodes a JPEG as Pillow does: greyscale to `Luma8`, YCbCr and RGB to `Rgb8`. `Ok(None)`
/// for CMYK and YCCK JPEGs, which Pillow converts with its own arithmetic. Data that ends
/// early is an error, as it is in Pillow.
pub fn decode(bytes: &[u8]) -> Result<Option<DynamicImage>, String> {
    let mut err = error_mgr();
    // SAFETY: the struct is zeroed, then initialised by jpeg_CreateDecompress; `Decoder`
    // destroys it on every path, unwinding included.
    let mut decoder = Decoder(Box::new(unsafe { std::mem::zeroed() }));
    decoder.0.common.err = &mut err;
    catch_unwind(AssertUnwindSafe(|| decoder.decode(bytes))).unwrap_or_else(|payload| {
        Err(payload
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_else(|| "libjpeg failed".into()))
    })
}

/// A libjpeg decompressor, destroyed on drop.
struct Decoder(Box<ffi::jpeg_decompress_struct>);

impl Drop for Decoder {
    fn drop(&mut self) {
        // SAFETY: destroying a created (or still zeroed, hence memory-less) decompressor.
        unsafe { ffi::jpeg_destroy_decompress(&mut self.0) };
    }
}

impl Decoder {
    /// [`decode`]'s work; libjpeg's errors unwind out of it.
    fn decode(&mut self, bytes: &[u8]) -> Result<Option<DynamicImage>, String> {
        let size = std::mem::size_of::<ffi::jpeg_decompress_struct>();
        let cinfo = &mut *self.0;
        // SAFETY: libjpeg's documented call sequence on a decompressor whose error manager is
        // set; `bytes` outlives it, and every row pointer below points into `pixels`.
        unsafe {
            ffi::jpeg_CreateDecompress(cinfo, ffi::JPEG_LIB_VERSION, size);
            ffi::jpeg_mem_src(cinfo, bytes.as_ptr(), bytes.len() as _);
            ffi::jpeg_read_header(cinfo, 1);
        }
        let (w, h) = (cinfo.image_width, cinfo.image_height);
        let channels = match cinfo.jpeg_color_space {
            ffi::J_COLOR_SPACE::JCS_GRAYSCALE => 1,
            ffi::J_COLOR_SPACE::JCS_YCbCr | ffi::J_COLOR_SPACE::JCS_RGB => 3,
            _ => return Ok(None),
        };
        if u64::from(w) * u64::from(h) * channels as u64 > MAX_DECODED_BYTES {
            return Err(format!(
                "a {w}×{h} JPEG is larger than {MAX_DECODED_BYTES} bytes decoded"
            ));
        }
        cinfo.out_color_space = if channels == 1 {
            ffi::J_COLOR_SPACE::JCS_GRAYSCALE
        } else {
            ffi::J_COLOR_SPACE::JCS_RGB
        };
        let row = w as usize * channels;
        let mut pixels = vec![0u8; row * h as usize];
        unsafe { ffi::jpeg_start_decompress(cinfo) };
        while cinfo.output_scanline < cinfo.output_height {
            let at = cinfo.output_scanline as usize * row;
            let mut rows = [pixels[at..].as_mut_ptr()];
            unsafe { ffi::jpeg_read_scanlines(cinfo, rows.as_mut_ptr(), 1) };
        }
        unsafe { ffi::jpeg_finish_decompress(cinfo) };
        let image = if channels == 1 {
            GrayImage::from_raw(w, h, pixels).map(DynamicImage::ImageLuma8)
        } else {
            RgbImage::from_raw(w, h, pixels).map(DynamicImage::ImageRgb8)
        };
        Ok(image)
    }
}

/// libjpeg's standard error manager, with fatal errors unwinding (caught in [`decode`]) and
/// warnings ignored, as Pillow ignores them, except running out of data: Pillow calls that
/// a truncated image, even when only the end-of-image marker is missing.
fn error_mgr() -> ffi::jpeg_error_mgr {
    // SAFETY: jpeg_std_error fills in every field of the zeroed struct.
    let mut err: ffi::jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { ffi::jpeg_std_error(&mut err) };
    err.error_exit = Some(fatal);
    err.emit_message = Some(message);
    err
}

extern "C-unwind" fn fatal(cinfo: &mut ffi::jpeg_common_struct) {
    std::panic::resume_unwind(Box::new(format!("libjpeg: {}", text(cinfo))));
}

extern "C-unwind" fn message(cinfo: &mut ffi::jpeg_common_struct, level: std::os::raw::c_int) {
    // SAFETY: `err` is the manager installed above, alive as long as the decompressor.
    let code = unsafe { (*cinfo.err).msg_code };
    if level < 0 && code == ffi::JWRN_JPEG_EOF as std::os::raw::c_int {
        std::panic::resume_unwind(Box::new(
            "image file is truncated (libjpeg ran out of data)".to_string(),
        ));
    }
}

/// The text of the manager's current message.
fn text(cinfo: &mut ffi::jpeg_common_struct) -> String {
    // SAFETY: `err` is alive (see `message`).
    let Some(format) = (unsafe { (*cinfo.err).format_message }) else {
        return format!("error code {}", unsafe { (*cinfo.err).msg_code });
    };
    // The binding declares the buffer shared, but format_message writes its 80 bytes.
    type Writes = unsafe extern "C-unwind" fn(&mut ffi::jpeg_common_struct, &mut [u8; 80]);
    // SAFETY: same ABI and arguments; only the buffer's mutability differs.
    let format: Writes = unsafe { std::mem::transmute(format) };
    let mut buffer = [0u8; 80];
    unsafe { format(cinfo, &mut buffer) };
    let end = buffer.iter().position(|&c| c == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::clip::preprocess::{decode_rgb, preprocess_bytes, ClipPreprocessConfig};

    #[test]
    fn jpegs_decode_to_pillows_pixels_and_truncated_ones_are_refused() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jpeg");
        let versions: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("versions.json")).unwrap()).unwrap();
        let strings = |key: &str| -> Vec<String> {
            let list = versions[key].as_array().unwrap();
            list.iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        let decoded = crate::npy::read_npy(&dir.join("decoded.npy")).unwrap().data;
        let pixel_values = crate::npy::read_npy(&dir.join("pixel_values.npy")).unwrap();
        let per = pixel_values.data.len() / pixel_values.shape[0];
        let cfg = ClipPreprocessConfig::from_file(&crate::hf_tiny_fixture(
            "clip-tiny/preprocessor_config.json",
        ))
        .unwrap();
        let mut at = 0;
        let mut image_crate_differs = 0;
        for (i, name) in strings("decoded").iter().enumerate() {
            let bytes = std::fs::read(dir.join(name)).unwrap();
            let rgb = decode_rgb(&bytes).unwrap();
            let want = &decoded[at..at + rgb.as_raw().len()];
            at += want.len();
            let got: Vec<f32> = rgb.as_raw().iter().map(|&v| f32::from(v)).collect();
            let pixels = preprocess_bytes(&bytes, &cfg).unwrap();
            let want_pixels = &pixel_values.data[i * per..(i + 1) * per];
            if name == "cmyk.jpg" {
                // Left to the image crate, whose CMYK conversion is within a level of Pillow's.
                let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs());
                assert!(diff.fold(0f32, f32::max) <= 1.0, "{name}");
                continue;
            }
            assert!(got == want, "{name}: decoded pixels differ from Pillow's");
            assert!(pixels == want_pixels, "{name}: pixel_values differ");
            let theirs = image::load_from_memory(&bytes).unwrap().into_rgb8();
            image_crate_differs += usize::from(theirs.as_raw() != rgb.as_raw());
        }
        assert_eq!(at, decoded.len());
        // The image crate's decoder gives other pixels for the colour JPEGs (why this exists).
        assert!(image_crate_differs >= 4, "{image_crate_differs}");
        for name in strings("refused") {
            let bytes = std::fs::read(dir.join(&name)).unwrap();
            let err = decode_rgb(&bytes).unwrap_err().to_string();
            assert!(err.contains("truncated"), "{name}: {err}");
        }
        // A fatal libjpeg error (a bad header) unwinds into an error, not an abort.
        let mut bad = std::fs::read(dir.join("s420.jpg")).unwrap();
        bad.truncate(20);
        bad[4..6].copy_from_slice(&[0, 1]);
        let err = decode_rgb(&bad).unwrap_err().to_string();
        assert!(err.contains("libjpeg"), "{err}");
    }
}
