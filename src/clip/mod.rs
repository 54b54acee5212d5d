//! CLIP in candle, loading Hugging Face checkpoints unchanged: config mirror, tokenizer,
//! image preprocessing and the image/text embedding model.

pub mod jpeg;
pub mod model;
pub mod preprocess;
pub mod pretrain;
pub mod tiny;
pub mod vision;
