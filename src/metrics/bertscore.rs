//! BERTScore (Zhang et al., ICLR 2020) as the `bert-score` package computes it, from the
//! token embeddings of a candidate and its references: greedy matching of L2-normalised
//! token embeddings, each token weighted by its idf (or 1), the special tokens (`[CLS]`,
//! `[SEP]`) weighted 0 but still matched against; with several references, precision, recall
//! and F1 are each the best over them.

use std::collections::{HashMap, HashSet};

/// One sentence: its token ids (special tokens included) and each token's embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEmbeddings {
    pub ids: Vec<u32>,
    pub vectors: Vec<Vec<f32>>,
}

/// Precision, recall and F1 of one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BertScore {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// Token weights: idf over a reference corpus or uniform, special tokens 0.
#[derive(Debug, Clone, PartialEq)]
pub struct IdfWeights {
    weights: HashMap<u32, f64>,
    /// The weight of a token the corpus does not have.
    default: f64,
    special: HashSet<u32>,
}

impl IdfWeights {
    /// Every token 1, `special` 0 (`idf = false`).
    pub fn uniform(special: &[u32]) -> Self {
        Self {
            weights: HashMap::new(),
            default: 1.0,
            special: special.iter().copied().collect(),
        }
    }

    /// `idf(w) = ln((M + 1) / (df(w) + 1))` over the `M` reference sentences `corpus` (token
    /// ids with special tokens, each sentence counted once per token it holds); unseen tokens
    /// `ln(M + 1)`; `special` 0: bert-score's `get_idf_dict`.
    pub fn idf(corpus: &[Vec<u32>], special: &[u32]) -> Self {
        let m = corpus.len() as f64;
        let mut df: HashMap<u32, usize> = HashMap::new();
        for sentence in corpus {
            let unique: HashSet<u32> = sentence.iter().copied().collect();
            for t in unique {
                *df.entry(t).or_default() += 1;
            }
        }
        Self {
            weights: df
                .into_iter()
                .map(|(t, c)| (t, ((m + 1.0) / (c as f64 + 1.0)).ln()))
                .collect(),
            default: (m + 1.0).ln(),
            special: special.iter().copied().collect(),
        }
    }

    pub fn weight(&self, token: u32) -> f64 {
        if self.special.contains(&token) {
            0.0
        } else {
            self.weights.get(&token).copied().unwrap_or(self.default)
        }
    }
}

fn normalized(v: &[f32]) -> Vec<f64> {
    let n = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    v.iter().map(|x| f64::from(*x) / n.max(1e-12)).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// BERTScore of `candidate` against one `reference`: each candidate token's best cosine
/// with a reference token, weighted, is precision; the converse is recall; F1 their harmonic
/// mean (0 when undefined). A sentence holding nothing but special tokens (two: an empty
/// one) scores 0 in precision and recall, as bert-score does.
pub fn bert_score_pair(
    candidate: &TokenEmbeddings,
    reference: &TokenEmbeddings,
    weights: &IdfWeights,
) -> BertScore {
    let c: Vec<Vec<f64>> = candidate.vectors.iter().map(|v| normalized(v)).collect();
    let r: Vec<Vec<f64>> = reference.vectors.iter().map(|v| normalized(v)).collect();
    let side = |xs: &[Vec<f64>], ids: &[u32], ys: &[Vec<f64>]| -> f64 {
        let w: Vec<f64> = ids.iter().map(|t| weights.weight(*t)).collect();
        let total: f64 = w.iter().sum();
        xs.iter()
            .zip(&w)
            .map(|(x, wi)| {
                let best = ys.iter().map(|y| dot(x, y)).fold(f64::MIN, f64::max);
                wi * best
            })
            .sum::<f64>()
            / total
    };
    if candidate.ids.len() <= 2 || reference.ids.len() <= 2 {
        return BertScore::default();
    }
    let precision = side(&c, &candidate.ids, &r);
    let recall = side(&r, &reference.ids, &c);
    let f1 = 2.0 * precision * recall / (precision + recall);
    BertScore {
        precision,
        recall,
        f1: if f1.is_nan() { 0.0 } else { f1 },
    }
}

/// BERTScore of `candidate` against several references: precision, recall and F1 each the
/// best over them (bert-score's multi-reference rule).
pub fn bert_score(
    candidate: &TokenEmbeddings,
    references: &[TokenEmbeddings],
    weights: &IdfWeights,
) -> BertScore {
    references
        .iter()
        .map(|r| bert_score_pair(candidate, r, weights))
        .fold(None, |best: Option<BertScore>, s| {
            Some(match best {
                None => s,
                Some(b) => BertScore {
                    precision: b.precision.max(s.precision),
                    recall: b.recall.max(s.recall),
                    f1: b.f1.max(s.f1),
                },
            })
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sentence(ids: &[u32], vectors: &[[f32; 2]]) -> TokenEmbeddings {
        TokenEmbeddings {
            ids: ids.to_vec(),
            vectors: vectors.iter().map(|v| v.to_vec()).collect(),
        }
    }

    /// The formula on vectors whose cosines are known; special tokens (ids 0 and 9) carry no
    /// weight but are matched against.
    #[test]
    fn greedy_matching_by_hand() {
        let w = IdfWeights::uniform(&[0, 9]);
        // Candidate tokens: [CLS]=(1,0), a=(1,0), b=(0,1), [SEP]=(1,1).
        let c = sentence(&[0, 1, 2, 9], &[[1., 0.], [1., 0.], [0., 1.], [1., 1.]]);
        // Reference tokens: [CLS]=(1,0), a=(1,1), [SEP]=(0,1).
        let r = sentence(&[0, 1, 9], &[[1., 0.], [1., 1.], [0., 1.]]);
        let s = bert_score_pair(&c, &r, &w);
        let h = std::f64::consts::FRAC_1_SQRT_2;
        // Precision over a, b: a best 1 ([CLS]), b best 1 ([SEP]).
        assert!((s.precision - 1.0).abs() < 1e-12);
        // Recall over the reference's `a` = (1,1)/√2: best is the candidate's [SEP], 1.
        assert!((s.recall - 1.0).abs() < 1e-12);
        let r2 = sentence(&[0, 1, 9], &[[1., 0.], [1., 1.], [1., 0.]]);
        let c2 = sentence(&[0, 3, 9], &[[1., 0.], [0., 1.], [1., 0.]]);
        let s = bert_score_pair(&c2, &r2, &w);
        assert!((s.precision - h).abs() < 1e-12 && (s.recall - h).abs() < 1e-12);
        assert!((s.f1 - h).abs() < 1e-12);
        // An empty candidate ([CLS][SEP] only) scores 0.
        let empty = sentence(&[0, 9], &[[1., 0.], [0., 1.]]);
        assert_eq!(bert_score_pair(&empty, &r, &w), BertScore::default());
    }

    #[test]
    fn idf_follows_get_idf_dict() {
        let corpus = vec![vec![0, 5, 5, 6, 9], vec![0, 5, 7, 9]];
        let w = IdfWeights::idf(&corpus, &[0, 9]);
        let m = 2.0f64;
        assert!(
            (w.weight(5) - ((m + 1.0) / 3.0).ln()).abs() < 1e-12,
            "counted once per sentence"
        );
        assert!((w.weight(6) - ((m + 1.0) / 2.0).ln()).abs() < 1e-12);
        assert!((w.weight(42) - (m + 1.0).ln()).abs() < 1e-12, "unseen");
        assert_eq!(w.weight(0), 0.0);
        assert_eq!(w.weight(9), 0.0);
    }

    #[test]
    fn several_references_take_each_score_at_its_best() {
        let w = IdfWeights::uniform(&[0, 9]);
        let c = sentence(&[0, 1, 2, 9], &[[1., 0.], [1., 0.], [0., 1.], [1., 0.]]);
        let r1 = sentence(&[0, 1, 9], &[[1., 0.], [1., 0.], [1., 0.]]);
        let r2 = sentence(&[0, 2, 3, 9], &[[1., 0.], [0., 1.], [0., 1.], [1., 0.]]);
        let (a, b) = (bert_score_pair(&c, &r1, &w), bert_score_pair(&c, &r2, &w));
        let best = bert_score(&c, &[r1, r2], &w);
        assert_eq!(best.precision, a.precision.max(b.precision));
        assert_eq!(best.recall, a.recall.max(b.recall));
        assert_eq!(best.f1, a.f1.max(b.f1));
    }
}
