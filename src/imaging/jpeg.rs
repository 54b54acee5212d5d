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

/// The most memory libjpeg may give its whole-image buffers (a progressive JPEG keeps every
/// DCT coefficient, two bytes a sample): twice the decoded limit, so a file that declares a
/// small image but carries a huge scan cannot allocate without bound.
const MAX_LIBJPEG_BYTES: u64 = 2 * MAX_DECODED_BYTES;

/// libjpeg's recommended size of a formatted message (JMSG_LENGTH_MAX).
const MESSAGE_LENGTH: usize = 200;

/// Whether `bytes` begin like a JPEG file (start-of-image, then a marker).
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// Decodes a JPEG as Pillow does: greyscale to `Luma8`; YCbCr and RGB to `Rgb8`; CMYK and
/// YCCK to CMYK, then to `Rgb8` with Pillow's arithmetic (see [`cmyk_to_rgb`]). Data that
/// ends early is an error, and so is a JPEG with 2 or more than 4 components, as in Pillow.
pub fn decode(bytes: &[u8]) -> Result<DynamicImage, String> {
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
    fn decode(&mut self, bytes: &[u8]) -> Result<DynamicImage, String> {
        let size = std::mem::size_of::<ffi::jpeg_decompress_struct>();
        let cinfo = &mut *self.0;
        // SAFETY: libjpeg's documented call sequence on a decompressor whose error manager is
        // set; `bytes` outlives it, and every row pointer below points into `pixels`.
        unsafe {
            ffi::jpeg_CreateDecompress(cinfo, ffi::JPEG_LIB_VERSION, size);
            // Overrides the JPEGMEM environment variable too.
            (*cinfo.common.mem).max_memory_to_use = MAX_LIBJPEG_BYTES as _;
            ffi::jpeg_mem_src(cinfo, bytes.as_ptr(), bytes.len() as _);
            ffi::jpeg_read_header(cinfo, 1);
        }
        let (w, h) = (cinfo.image_width, cinfo.image_height);
        let (channels, out_color_space) = match cinfo.jpeg_color_space {
            ffi::J_COLOR_SPACE::JCS_GRAYSCALE => (1, ffi::J_COLOR_SPACE::JCS_GRAYSCALE),
            ffi::J_COLOR_SPACE::JCS_YCbCr | ffi::J_COLOR_SPACE::JCS_RGB => {
                (3, ffi::J_COLOR_SPACE::JCS_RGB)
            }
            // libjpeg turns YCCK into CMYK.
            ffi::J_COLOR_SPACE::JCS_CMYK | ffi::J_COLOR_SPACE::JCS_YCCK => {
                (4, ffi::J_COLOR_SPACE::JCS_CMYK)
            }
            _ => {
                return Err(format!(
                    "a JPEG with {} components (Pillow reads only 1, 3 or 4)",
                    cinfo.num_components
                ))
            }
        };
        if u64::from(w) * u64::from(h) * channels as u64 > MAX_DECODED_BYTES {
            return Err(format!(
                "a {w}×{h} JPEG is larger than {MAX_DECODED_BYTES} bytes decoded"
            ));
        }
        cinfo.out_color_space = out_color_space;
        let row = w as usize * channels;
        let mut pixels = vec![0u8; row * h as usize];
        unsafe { ffi::jpeg_start_decompress(cinfo) };
        // The rows below are sized for these; libjpeg must not write wider ones.
        let output = (
            cinfo.output_width,
            cinfo.output_height,
            cinfo.output_components,
        );
        if output != (w, h, channels as _) {
            return Err(format!(
                "libjpeg would write {}×{}×{} pixels for a {w}×{h}×{channels} image",
                output.0, output.1, output.2
            ));
        }
        while cinfo.output_scanline < cinfo.output_height {
            let at = cinfo.output_scanline as usize * row;
            let mut rows = [pixels[at..].as_mut_ptr()];
            unsafe { ffi::jpeg_read_scanlines(cinfo, rows.as_mut_ptr(), 1) };
        }
        unsafe { ffi::jpeg_finish_decompress(cinfo) };
        let image = match channels {
            1 => GrayImage::from_raw(w, h, pixels).map(DynamicImage::ImageLuma8),
            3 => RgbImage::from_raw(w, h, pixels).map(DynamicImage::ImageRgb8),
            _ => RgbImage::from_raw(w, h, cmyk_to_rgb(&pixels)).map(DynamicImage::ImageRgb8),
        };
        Ok(image.expect("the buffer is sized for the image"))
    }
}

/// libjpeg's CMYK samples as Pillow turns them into RGB: it reads them inverted (mode
/// `CMYK;I`, Adobe's convention, assumed for every CMYK JPEG), then converts with
/// `R = (255 - K) - (255 - K)·C / 255` and so on, dividing by 255 with rounding in integers.
/// With the inversion, 255 - K is libjpeg's own K sample.
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let times_over_255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for pixel in cmyk.chunks_exact(4) {
        let nk = u32::from(pixel[3]);
        for &sample in &pixel[..3] {
            let ink = 255 - u32::from(sample);
            rgb.push((nk - times_over_255(ink, nk)) as u8);
        }
    }
    rgb
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
    // SAFETY: `err` is the manager installed above, alive as long as the decompressor.
    let code = unsafe { (*cinfo.err).msg_code };
    let why = if code == ffi::JERR_NO_BACKING_STORE as std::os::raw::c_int {
        format!("the JPEG needs more than {MAX_LIBJPEG_BYTES} bytes of libjpeg buffers")
    } else {
        text(cinfo)
    };
    std::panic::resume_unwind(Box::new(format!("libjpeg: {why}")));
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
    // The binding declares an 80-byte shared buffer, but format_message writes up to
    // JMSG_LENGTH_MAX bytes into it.
    type Writes =
        unsafe extern "C-unwind" fn(&mut ffi::jpeg_common_struct, &mut [u8; MESSAGE_LENGTH]);
    // SAFETY: same ABI, and a pointer to the buffer either way; only the buffer's declared
    // length and mutability differ, and this one is as long as libjpeg writes.
    let format: Writes = unsafe { std::mem::transmute(format) };
    let mut buffer = [0u8; MESSAGE_LENGTH];
    unsafe { format(cinfo, &mut buffer) };
    let end = buffer.iter().position(|&c| c == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::imaging::preprocess::{decode_rgb, preprocess_bytes, ClipPreprocessConfig};

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
        let decoded = crate::testkit::npy::read_npy(&dir.join("decoded.npy"))
            .unwrap()
            .data;
        let pixel_values = crate::testkit::npy::read_npy(&dir.join("pixel_values.npy")).unwrap();
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
