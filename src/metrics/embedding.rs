//! Embedding metrics: CLIPScore and RefCLIPScore (Hessel et al., EMNLP 2021, eq. 1 and 2),
//! from CLIP embeddings of the image, the candidate caption and its references.

/// Cosine of two vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    f64::from(dot / (na * nb).max(1e-12))
}

/// CLIPScore of a caption for an image: `2.5 · max(cos(image, caption), 0)`.
pub fn clip_score(image: &[f32], caption: &[f32]) -> f64 {
    2.5 * cosine(image, caption).max(0.0)
}

/// RefCLIPScore: the harmonic mean of the caption's CLIPScore and its best cosine with a
/// reference, `max(max_r cos(caption, r), 0)` (0 when both are 0).
pub fn ref_clip_score(clip_score: f64, caption: &[f32], references: &[Vec<f32>]) -> f64 {
    let best_ref = references
        .iter()
        .map(|r| cosine(caption, r))
        .fold(0f64, f64::max);
    if clip_score + best_ref > 0.0 {
        2.0 * clip_score * best_ref / (clip_score + best_ref)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_follow_the_papers_formulas() {
        let image = [1.0f32, 0.0];
        let caption = [1.0f32, 1.0];
        let c = std::f64::consts::FRAC_1_SQRT_2;
        let s = clip_score(&image, &caption);
        assert!((s - 2.5 * c).abs() < 1e-6);
        assert_eq!(
            clip_score(&image, &[-1.0, 0.0]),
            0.0,
            "negative cosines clip to 0"
        );
        let refs = vec![vec![0.0f32, 1.0], vec![1.0, 1.0]];
        let r = ref_clip_score(s, &caption, &refs);
        assert!((r - 2.0 * s * 1.0 / (s + 1.0)).abs() < 1e-6, "{r}");
        assert_eq!(ref_clip_score(0.0, &caption, &[vec![-1.0, -1.0]]), 0.0);
    }
}
