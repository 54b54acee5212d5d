//! Contrastive image–text losses over batches of embeddings.

use candle_core::Tensor;

pub use crate::kernels::l2_normalized;

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

/// The symmetric InfoNCE loss of a two-tower contrastive stage ("NT-Xent" in the recipes that
/// train a text encoder against frozen CLIP image features): [`clip_loss`] with logits
/// `cos(image, text) / temperature`. `temperature` is a scalar tensor, a variable when it is
/// learned (gradients reach it through the division).
pub fn info_nce(
    images: &Tensor,
    texts: &Tensor,
    temperature: &Tensor,
) -> candle_core::Result<Tensor> {
    clip_loss(images, texts, &temperature.recip()?)
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

    fn lse(xs: &[f64]) -> f64 {
        xs.iter().map(|x| x.exp()).sum::<f64>().ln()
    }

    /// The loss written out by hand for three pairs, every cosine known: rows of the logit
    /// matrix for images, columns for texts, both cross-entropies averaged.
    #[test]
    fn info_nce_of_three_pairs_matches_the_hand_computed_value() {
        let dev = Device::Cpu;
        // Unit vectors: images e1, e2, e3; texts e1, (e1+e2)/sqrt2 scaled by 5, -e3.
        let images = Tensor::new(&[[1f32, 0., 0.], [0., 1., 0.], [0., 0., 1.]], &dev).unwrap();
        let texts = Tensor::new(&[[2f32, 0., 0.], [5., 5., 0.], [0., 0., -3.]], &dev).unwrap();
        let t = 0.5;
        let temperature = Tensor::new(t as f32, &dev).unwrap();
        let got = info_nce(&images, &texts, &temperature)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let c = std::f64::consts::FRAC_1_SQRT_2;
        // cos[i][j] = image i vs text j.
        let cos = [[1.0, c, 0.0], [0.0, c, 0.0], [0.0, 0.0, -1.0]];
        let logit = |i: usize, j: usize| cos[i][j] / t;
        let mut per_image = 0.0;
        let mut per_text = 0.0;
        for k in 0..3 {
            let row: Vec<f64> = (0..3).map(|j| logit(k, j)).collect();
            let col: Vec<f64> = (0..3).map(|i| logit(i, k)).collect();
            per_image += lse(&row) - logit(k, k);
            per_text += lse(&col) - logit(k, k);
        }
        let want = (per_image / 3.0 + per_text / 3.0) / 2.0;
        assert!((f64::from(got) - want).abs() < 1e-6, "{got} vs {want}");
    }

    /// A learned temperature (its log a variable, as the recipes keep it positive): the loss
    /// equals the formula at that temperature, and its gradient through the variable equals
    /// the formula's derivative (a central difference).
    #[test]
    fn a_learnable_temperature_gets_the_formulas_gradient() {
        let dev = Device::Cpu;
        let images = Tensor::new(&[[1f32, 0.2], [0.3, 1.0], [-0.5, 0.4]], &dev).unwrap();
        let texts = Tensor::new(&[[0.9f32, 0.1], [0.2, 0.8], [0.1, -0.7]], &dev).unwrap();
        let formula = |log_t: f64| -> f64 {
            let norm = |v: [f64; 2]| {
                let n = (v[0] * v[0] + v[1] * v[1]).sqrt();
                [v[0] / n, v[1] / n]
            };
            let im = [norm([1.0, 0.2]), norm([0.3, 1.0]), norm([-0.5, 0.4])];
            let tx = [norm([0.9, 0.1]), norm([0.2, 0.8]), norm([0.1, -0.7])];
            let t = log_t.exp();
            let l = |i: usize, j: usize| (im[i][0] * tx[j][0] + im[i][1] * tx[j][1]) / t;
            let (mut a, mut b) = (0.0, 0.0);
            for k in 0..3 {
                a += lse(&[l(k, 0), l(k, 1), l(k, 2)]) - l(k, k);
                b += lse(&[l(0, k), l(1, k), l(2, k)]) - l(k, k);
            }
            (a + b) / 6.0
        };
        let log_t = candle_core::Var::new(0.3f32.ln(), &dev).unwrap();
        let loss = info_nce(&images, &texts, &log_t.as_tensor().exp().unwrap()).unwrap();
        let got = f64::from(loss.to_scalar::<f32>().unwrap());
        let want = formula(0.3f64.ln());
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        let grads = loss.backward().unwrap();
        let g = f64::from(grads.get(&log_t).unwrap().to_scalar::<f32>().unwrap());
        let h = 1e-4;
        let want_g = (formula(0.3f64.ln() + h) - formula(0.3f64.ln() - h)) / (2.0 * h);
        assert!((g - want_g).abs() < 1e-4, "{g} vs {want_g}");
        assert!(
            want_g.abs() > 1e-2,
            "the gradient is not trivially 0: {want_g}"
        );
    }
}
