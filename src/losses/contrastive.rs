//! Contrastive image–text losses over batches of embeddings.

use candle_core::{Tensor, D};

/// Rows of `x` scaled to unit L2 norm.
pub fn l2_normalized(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

/// CLIP's symmetric InfoNCE loss (Radford et al. 2021, the pseudo-code of Figure 3) over `n`
/// image embeddings and `texts` (the `n` matching captions first, then any extra negative
/// texts, as NegCLIP's hard negatives): logits are `scale · cos(image, text)`; each image picks
/// its caption among all texts, each caption its image among the images, and the two
/// cross-entropies are averaged. `scale` is a scalar tensor (CLIP's `exp(logit_scale)`).
pub fn clip_loss(images: &Tensor, texts: &Tensor, scale: &Tensor) -> candle_core::Result<Tensor> {
    let n = images.dim(0)?;
    let logits = l2_normalized(images)?
        .matmul(&l2_normalized(texts)?.t()?)?
        .broadcast_mul(scale)?;
    let targets = Tensor::arange(0u32, n as u32, images.device())?;
    let per_image = candle_nn::loss::cross_entropy(&logits, &targets)?;
    let per_text = candle_nn::loss::cross_entropy(&logits.narrow(1, 0, n)?.t()?, &targets)?;
    (per_image + per_text)? * 0.5
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against the formula written out: with identity-like embeddings the logits are known.
    #[test]
    fn clip_loss_is_the_mean_of_both_cross_entropies() {
        let dev = Device::Cpu;
        let images = Tensor::new(&[[1f32, 0.0], [0.0, 2.0]], &dev).unwrap();
        // Two captions and one hard negative.
        let texts = Tensor::new(&[[3f32, 0.0], [0.0, 1.0], [1.0, 1.0]], &dev).unwrap();
        let scale = Tensor::new(2f32, &dev).unwrap();
        let got = clip_loss(&images, &texts, &scale)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let c = std::f64::consts::FRAC_1_SQRT_2;
        // cosines: image 0 -> (1, 0, c), image 1 -> (0, 1, c); logits = 2 * cos.
        let lse = |xs: &[f64]| xs.iter().map(|x| x.exp()).sum::<f64>().ln();
        let per_image = (lse(&[2.0, 0.0, 2.0 * c]) - 2.0 + lse(&[0.0, 2.0, 2.0 * c]) - 2.0) / 2.0;
        let per_text = (lse(&[2.0, 0.0]) - 2.0 + lse(&[0.0, 2.0]) - 2.0) / 2.0;
        let want = (per_image + per_text) / 2.0;
        assert!((f64::from(got) - want).abs() < 1e-6, "{got} vs {want}");
    }
}
