//! Models that mirror Hugging Face checkpoints: CLIP, GPT-2, the CLIP-prefix captioner, and the tiny checkpoints of the embedded default.

pub mod captioner;
pub mod clip;
pub mod gpt2;
pub mod tiny;
