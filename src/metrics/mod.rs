//! Caption metrics as pure functions over token lists and embeddings: BLEU, METEOR, ROUGE-L
//! and CIDEr-D as pycocoevalcap computes them ([`text`], [`meteor`]), and CLIPScore and
//! RefCLIPScore ([`embedding`]), BERTScore ([`bertscore`]) and retrieval recall
//! ([`retrieval`]).

pub mod bertscore;
pub mod embedding;
pub mod meteor;
pub mod retrieval;
pub mod text;

use std::collections::BTreeMap;

use rayon::prelude::*;

use crate::metrics::meteor::meteor;
use crate::metrics::text::{bleu, cider_d, ptb_tokenize, rouge_l_corpus};

/// The n-gram metrics of one caption.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextScores {
    pub bleu: [f64; 4],
    pub meteor: f64,
    pub rouge_l: f64,
    pub cider_d: f64,
}

/// BLEU, METEOR, ROUGE-L and CIDEr-D of raw (untokenized) candidates against raw references,
/// per caption and corpus-level under pycocoevalcap's names.
pub fn text_metrics(
    candidates: &[String],
    references: &[Vec<String>],
) -> (Vec<TextScores>, BTreeMap<String, f64>) {
    let cands: Vec<String> = candidates.par_iter().map(|c| ptb_tokenize(c)).collect();
    let refs: Vec<Vec<String>> = references
        .par_iter()
        .map(|rs| rs.iter().map(|r| ptb_tokenize(r)).collect())
        .collect();
    let c: Vec<&str> = cands.iter().map(String::as_str).collect();
    let r: Vec<Vec<&str>> = refs
        .iter()
        .map(|rs| rs.iter().map(String::as_str).collect())
        .collect();
    let (((b_corpus, b_per), (m_corpus, m_per)), ((r_corpus, r_per), (c_corpus, c_per))) =
        rayon::join(
            || rayon::join(|| bleu(&c, &r), || meteor(&c, &r)),
            || rayon::join(|| rouge_l_corpus(&c, &r), || cider_d(&c, &r)),
        );
    let mut corpus = BTreeMap::new();
    for (k, v) in b_corpus.iter().enumerate() {
        corpus.insert(format!("Bleu_{}", k + 1), *v);
    }
    corpus.insert("METEOR".into(), m_corpus);
    corpus.insert("ROUGE_L".into(), r_corpus);
    corpus.insert("CIDEr".into(), c_corpus);
    let per = (0..c.len())
        .map(|i| TextScores {
            bleu: b_per[i],
            meteor: m_per[i],
            rouge_l: r_per[i],
            cider_d: c_per[i],
        })
        .collect();
    (per, corpus)
}

/// The mean of `v`; NaN when empty.
pub fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}
