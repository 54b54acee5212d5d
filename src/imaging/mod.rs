//! Pixels exactly as Pillow and torchvision make them: JPEG decoding, CLIP preprocessing, and the resize and re-encode of stored images.

pub mod jpeg;
pub mod preprocess;
pub mod resize;
