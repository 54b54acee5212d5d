//! Caption metrics defined exactly as pycocoevalcap (the COCO caption evaluation code) defines
//! them, with no Java: PTB-style tokenization with punctuation removed, BLEU-1..4 with the
//! closest reference length, ROUGE-L with β = 1.2, and CIDEr-D (σ = 6, clipped counts, ×10).
//!
//! Every scorer takes already tokenized text (tokens joined by single spaces, as
//! [`ptb_tokenize`] returns) and gives the corpus score and one score per image, like
//! pycocoevalcap's `compute_score`. The tests compare all of them with values pycocoevalcap
//! computed on a committed fixture.

use std::collections::HashMap;

use rayon::prelude::*;

/// Tokens pycocoevalcap drops after PTB tokenization. Its list names the bracket tokens in
/// upper case while the tokenizer runs with `-lowerCase`, so brackets survive as `-lrb-`,
/// `-rrb-`, ...; kept as is to give the same numbers.
const PUNCTUATION: [&str; 17] = [
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
    "...", ";",
];

/// The PTB token of a punctuation character split off a word.
fn ptb_symbol(c: char) -> String {
    match c {
        '(' => "-lrb-".into(),
        ')' => "-rrb-".into(),
        '[' => "-lsb-".into(),
        ']' => "-rsb-".into(),
        '{' => "-lcb-".into(),
        '}' => "-rcb-".into(),
        '"' => "''".into(),
        other => other.to_string(),
    }
}

/// Characters split off the edges of a word as tokens of their own.
fn is_edge_punct(c: char) -> bool {
    matches!(
        c,
        '.' | ',' | '!' | '?' | ';' | ':' | '(' | ')' | '[' | ']' | '{' | '}' | '"' | '\'' | '`'
    )
}

/// Stanford PTBTokenizer (`-lowerCase`) followed by pycocoevalcap's punctuation filter, for
/// the constructs captions contain: punctuation split off words, clitics (`'s`, `n't`, `'re`,
/// `'ve`, `'ll`, `'d`, `'m`) split, hyphenated words and `&` kept, brackets and quotes
/// dropped. Returns the tokens joined by single spaces.
pub fn ptb_tokenize(text: &str) -> String {
    let lower = text.to_lowercase();
    let mut tokens: Vec<String> = Vec::new();
    for chunk in lower.split_whitespace() {
        // Punctuation inside a chunk (`rice,broccoli`, `yes!no`) separates words, except
        // between digits (`1,000`, `3.5`) and the periods of abbreviations (`u.s.`).
        let chars: Vec<char> = chunk.chars().collect();
        let mut pieces: Vec<String> = vec![String::new()];
        for (i, &c) in chars.iter().enumerate() {
            let digit_around = i > 0
                && i + 1 < chars.len()
                && chars[i - 1].is_ascii_digit()
                && chars[i + 1].is_ascii_digit();
            if matches!(c, ',' | ';' | '!' | '?' | '(' | ')' | '"') && !digit_around {
                pieces.push(c.to_string());
                pieces.push(String::new());
            } else if let Some(last) = pieces.last_mut() {
                last.push(c);
            }
        }
        for piece in pieces.into_iter().filter(|p| !p.is_empty()) {
            split_word(&piece, &mut tokens);
        }
    }
    tokens
        .into_iter()
        .filter(|t| !PUNCTUATION.contains(&t.as_str()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Splits edge punctuation and clitics off one whitespace-free piece.
fn split_word(piece: &str, out: &mut Vec<String>) {
    if piece == "--" || piece == "..." || piece.chars().all(|c| c == '-') {
        out.push(piece.to_string());
        return;
    }
    let mut start = 0;
    let chars: Vec<(usize, char)> = piece.char_indices().collect();
    let mut lead = Vec::new();
    while start < chars.len() && is_edge_punct(chars[start].1) {
        lead.push(ptb_symbol(chars[start].1));
        start += 1;
    }
    let mut end = chars.len();
    let mut trail = Vec::new();
    while end > start && is_edge_punct(chars[end - 1].1) {
        // An abbreviation keeps its final period (`u.s.`, `st.` stays split like PTB does for
        // single-period words).
        let c = chars[end - 1].1;
        let core = &piece[chars[start].0..chars[end - 1].0];
        if c == '.' && core.contains('.') && trail.is_empty() {
            break;
        }
        if piece[..chars[end - 1].0].ends_with("...") && c == '.' {
            trail.push("...".to_string());
            end -= 3;
            continue;
        }
        trail.push(ptb_symbol(c));
        end -= 1;
    }
    out.extend(lead);
    if start < end {
        let byte_start = chars[start].0;
        let byte_end = if end < chars.len() {
            chars[end].0
        } else {
            piece.len()
        };
        split_clitics(&piece[byte_start..byte_end], out);
    }
    out.extend(trail.into_iter().rev());
}

fn split_clitics(word: &str, out: &mut Vec<String>) {
    let w = word.replace('’', "'");
    for (stem, clitic) in [("can't", ("ca", "n't")), ("won't", ("wo", "n't"))] {
        if w == stem {
            out.push(clitic.0.into());
            out.push(clitic.1.into());
            return;
        }
    }
    if let Some(head) = w.strip_suffix("n't").filter(|h| !h.is_empty()) {
        out.push(head.to_string());
        out.push("n't".into());
        return;
    }
    for clitic in ["'s", "'re", "'ve", "'ll", "'d", "'m"] {
        if let Some(head) = w.strip_suffix(clitic).filter(|h| !h.is_empty()) {
            out.push(head.to_string());
            out.push(clitic.into());
            return;
        }
    }
    out.push(w);
}

/// A fast non-cryptographic hasher (FxHash's multiply-rotate) for n-gram and token maps:
/// SipHash dominated the scorers' time.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_u128(&mut self, x: u128) {
        self.write_u64(x as u64);
        self.write_u64((x >> 64) as u64);
    }
    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A HashMap with a multiply-rotate hash, for small integer keys on hot paths.
pub(crate) type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FxHasher>>;

/// An n-gram of up to four interned tokens packed into 128 bits; token ids start at 1, so
/// the zero high slots encode the order.
type Gram = u128;

fn order(g: Gram) -> usize {
    4 - (g.leading_zeros() / 32) as usize
}

/// Interns the whitespace-separated tokens of sentences as ids from 1.
#[derive(Default)]
struct Interner<'a> {
    ids: FastMap<&'a str, u32>,
}

impl<'a> Interner<'a> {
    fn ids(&mut self, sentence: &'a str) -> Vec<u32> {
        sentence
            .split_whitespace()
            .map(|w| {
                let next = self.ids.len() as u32 + 1;
                *self.ids.entry(w).or_insert(next)
            })
            .collect()
    }
}

/// Counts of all n-grams of orders 1..=n (pycocoevalcap's `precook`).
fn ngram_counts(ids: &[u32], n: usize) -> FastMap<Gram, u32> {
    let mut counts = FastMap::with_capacity_and_hasher(n * ids.len(), Default::default());
    for k in 1..=n {
        for w in ids.windows(k) {
            let g = w.iter().fold(0u128, |acc, &t| (acc << 32) | Gram::from(t));
            *counts.entry(g).or_insert(0) += 1;
        }
    }
    counts
}

/// Corpus BLEU-1..4 and per-image BLEU-1..4 (`per_image[k][i]`), with the closest
/// reference length (ties to the shorter) as pycocoevalcap's `Bleu(4)` computes them.
pub fn bleu(candidates: &[&str], references: &[Vec<&str>]) -> ([f64; 4], Vec<[f64; 4]>) {
    const N: usize = 4;
    let (tiny, small) = (1e-15, 1e-9);
    let mut total_guess = [0f64; N];
    let mut total_correct = [0f64; N];
    let (mut total_test, mut total_ref) = (0f64, 0f64);
    let mut per_image = Vec::with_capacity(candidates.len());
    let mut interner = Interner::default();
    for (cand, refs) in candidates.iter().zip(references) {
        let words = interner.ids(cand);
        let test_len = words.len();
        let mut max_ref: FastMap<Gram, u32> = FastMap::default();
        let mut ref_lens = Vec::new();
        for r in refs {
            let rw = interner.ids(r);
            ref_lens.push(rw.len());
            for (g, c) in ngram_counts(&rw, N) {
                let e = max_ref.entry(g).or_insert(0);
                *e = (*e).max(c);
            }
        }
        let ref_len = ref_lens
            .iter()
            .map(|&l| (l.abs_diff(test_len), l))
            .min()
            .map_or(0, |(_, l)| l);
        let mut correct = [0f64; N];
        for (g, c) in ngram_counts(&words, N) {
            correct[order(g) - 1] += f64::from(c.min(max_ref.get(&g).copied().unwrap_or(0)));
        }
        let guess: [f64; N] = std::array::from_fn(|k| (test_len.saturating_sub(k)) as f64);
        let mut scores = [0f64; N];
        let mut b = 1.0;
        for k in 0..N {
            b *= (correct[k] + tiny) / (guess[k] + small);
            scores[k] = b.powf(1.0 / (k + 1) as f64);
        }
        let ratio = (test_len as f64 + tiny) / (ref_len as f64 + small);
        if ratio < 1.0 {
            for s in &mut scores {
                *s *= (1.0 - 1.0 / ratio).exp();
            }
        }
        per_image.push(scores);
        for k in 0..N {
            total_guess[k] += guess[k];
            total_correct[k] += correct[k];
        }
        total_test += test_len as f64;
        total_ref += ref_len as f64;
    }
    let mut corpus = [0f64; N];
    let mut b = 1.0;
    for k in 0..N {
        b *= (total_correct[k] + tiny) / (total_guess[k] + small);
        corpus[k] = b.powf(1.0 / (k + 1) as f64);
    }
    let ratio = (total_test + tiny) / (total_ref + small);
    if ratio < 1.0 {
        for s in &mut corpus {
            *s *= (1.0 - 1.0 / ratio).exp();
        }
    }
    (corpus, per_image)
}

/// Length of the longest common subsequence of two token lists.
fn lcs(a: &[&str], b: &[&str]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ROUGE-L (β = 1.2) of one candidate against its references: precision and recall are
/// each maximised over the references before they are combined, as pycocoevalcap does.
pub fn rouge_l(candidate: &str, references: &[&str]) -> f64 {
    const BETA: f64 = 1.2;
    let c: Vec<&str> = candidate.split(' ').collect();
    let (mut p_max, mut r_max) = (0f64, 0f64);
    for r in references {
        let rw: Vec<&str> = r.split(' ').collect();
        let l = lcs(&rw, &c) as f64;
        p_max = p_max.max(l / c.len() as f64);
        r_max = r_max.max(l / rw.len() as f64);
    }
    if p_max != 0.0 && r_max != 0.0 {
        (1.0 + BETA * BETA) * p_max * r_max / (r_max + BETA * BETA * p_max)
    } else {
        0.0
    }
}

/// Corpus ROUGE-L (the mean) and per-image scores.
pub fn rouge_l_corpus(candidates: &[&str], references: &[Vec<&str>]) -> (f64, Vec<f64>) {
    let per: Vec<f64> = candidates
        .iter()
        .zip(references)
        .map(|(c, r)| rouge_l(c, r))
        .collect();
    (mean(&per), per)
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// TF-IDF n-gram vectors of one sentence (pycocoevalcap's `counts2vec`): per order, the
/// weighted counts and the norm, and the "length", which pycocoevalcap takes as the number of
/// bigrams.
struct CiderVec {
    vec: [FastMap<Gram, f64>; 4],
    norm: [f64; 4],
    length: f64,
}

fn cider_vec(counts: &FastMap<Gram, u32>, df: &FastMap<Gram, f64>, ref_len: f64) -> CiderVec {
    let mut vec: [FastMap<Gram, f64>; 4] = std::array::from_fn(|_| {
        FastMap::with_capacity_and_hasher(counts.len() / 3 + 1, Default::default())
    });
    let mut norm = [0f64; 4];
    let mut length = 0f64;
    for (&g, &tf) in counts {
        let n = order(g) - 1;
        let d = df.get(&g).copied().unwrap_or(0.0).max(1.0).ln();
        let v = f64::from(tf) * (ref_len - d);
        norm[n] += v * v;
        vec[n].insert(g, v);
        if n == 1 {
            length += f64::from(tf);
        }
    }
    CiderVec {
        vec,
        norm: norm.map(f64::sqrt),
        length,
    }
}

/// CIDEr-D's Gaussian length penalty width and n-gram order.
const CIDER_SIGMA: f64 = 6.0;
const CIDER_N: usize = 4;

/// CIDEr-D of one candidate against its references' vectors: per order the clipped cosine
/// times the length penalty, averaged over orders and references, ×10.
fn cider_similarity(hyp: &CiderVec, refs: &[CiderVec]) -> f64 {
    let mut score = [0f64; CIDER_N];
    for rv in refs {
        let delta = hyp.length - rv.length;
        for (n, s) in score.iter_mut().enumerate() {
            let mut val = 0.0;
            for (g, &h) in &hyp.vec[n] {
                let rr = rv.vec[n].get(g).copied().unwrap_or(0.0);
                val += h.min(rr) * rr;
            }
            if hyp.norm[n] != 0.0 && rv.norm[n] != 0.0 {
                val /= hyp.norm[n] * rv.norm[n];
            }
            *s += val * (-(delta * delta) / (2.0 * CIDER_SIGMA * CIDER_SIGMA)).exp();
        }
    }
    mean(&score) / refs.len().max(1) as f64 * 10.0
}

/// Document frequencies of n-grams over reference sets (an n-gram counts once per image).
fn document_frequencies(refs: &[Vec<FastMap<Gram, u32>>]) -> FastMap<Gram, f64> {
    let mut df: FastMap<Gram, f64> = FastMap::default();
    for rs in refs {
        let mut seen: FastMap<Gram, ()> = FastMap::default();
        for r in rs {
            seen.extend(r.keys().map(|&g| (g, ())));
        }
        for (g, ()) in seen {
            *df.entry(g).or_insert(0.0) += 1.0;
        }
    }
    df
}

/// CIDEr-D (σ = 6, clipped, ×10): corpus score (the mean) and per-image scores. Document
/// frequencies come from the references of all images given, so scores depend on the
/// whole set, as in pycocoevalcap.
pub fn cider_d(candidates: &[&str], references: &[Vec<&str>]) -> (f64, Vec<f64>) {
    let mut interner = Interner::default();
    let refs: Vec<Vec<FastMap<Gram, u32>>> = references
        .iter()
        .map(|rs| {
            rs.iter()
                .map(|r| ngram_counts(&interner.ids(r), CIDER_N))
                .collect()
        })
        .collect();
    let df = document_frequencies(&refs);
    let ref_len = (refs.len() as f64).ln();
    let ref_vecs: Vec<Vec<CiderVec>> = refs
        .par_iter()
        .map(|rs| rs.iter().map(|r| cider_vec(r, &df, ref_len)).collect())
        .collect();
    let cand_ids: Vec<Vec<u32>> = candidates.iter().map(|c| interner.ids(c)).collect();
    let per: Vec<f64> = cand_ids
        .par_iter()
        .zip(&ref_vecs)
        .map(|(c, rs)| {
            let hyp = cider_vec(&ngram_counts(c, CIDER_N), &df, ref_len);
            cider_similarity(&hyp, rs)
        })
        .collect();
    (mean(&per), per)
}

/// CIDEr-D with document frequencies fixed by a reference corpus (the training captions, as
/// self-critical training computes its CIDEr-D reward: Rennie et al.'s `coco-train-idxs`), so
/// a caption's score does not depend on the other captions scored with it.
pub struct CiderD {
    /// Word ids of the corpus vocabulary (from 1).
    vocab: HashMap<String, u32>,
    df: FastMap<Gram, f64>,
    /// ln(number of images in the corpus).
    ref_len: f64,
}

impl CiderD {
    /// Document frequencies over `corpus`: each image's tokenized references
    /// ([`ptb_tokenize`]).
    pub fn new(corpus: &[Vec<String>]) -> Self {
        let mut vocab = HashMap::new();
        let refs: Vec<Vec<FastMap<Gram, u32>>> = corpus
            .iter()
            .map(|rs| {
                rs.iter()
                    .map(|r| ngram_counts(&Self::intern(&mut vocab, r), CIDER_N))
                    .collect()
            })
            .collect();
        Self {
            df: document_frequencies(&refs),
            ref_len: (corpus.len().max(1) as f64).ln(),
            vocab,
        }
    }

    fn intern(vocab: &mut HashMap<String, u32>, sentence: &str) -> Vec<u32> {
        sentence
            .split_whitespace()
            .map(|w| {
                let next = vocab.len() as u32 + 1;
                *vocab.entry(w.to_string()).or_insert(next)
            })
            .collect()
    }

    /// CIDEr-D of tokenized `candidate` against its tokenized `references`. Words outside
    /// the corpus vocabulary get ids of their own for this call (document frequency 0).
    pub fn score(&self, candidate: &str, references: &[String]) -> f64 {
        let mut extra: HashMap<String, u32> = HashMap::new();
        let base = self.vocab.len() as u32;
        let mut ids = |s: &str| -> Vec<u32> {
            s.split_whitespace()
                .map(|w| match self.vocab.get(w) {
                    Some(&id) => id,
                    None => {
                        let next = base + extra.len() as u32 + 1;
                        *extra.entry(w.to_string()).or_insert(next)
                    }
                })
                .collect()
        };
        let refs: Vec<CiderVec> = references
            .iter()
            .map(|r| cider_vec(&ngram_counts(&ids(r), CIDER_N), &self.df, self.ref_len))
            .collect();
        let hyp = cider_vec(
            &ngram_counts(&ids(candidate), CIDER_N),
            &self.df,
            self.ref_len,
        );
        cider_similarity(&hyp, &refs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fixture() -> serde_json::Value {
        let p =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/coco-eval/reference.json");
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    }

    struct Set {
        ids: Vec<String>,
        cands: Vec<String>,
        refs: Vec<Vec<String>>,
    }

    fn tokenized(f: &serde_json::Value) -> Set {
        let ids: Vec<String> = f["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let cands = ids
            .iter()
            .map(|i| f["tokenized_candidates"][i].as_str().unwrap().to_string())
            .collect();
        let refs = ids
            .iter()
            .map(|i| {
                f["tokenized_references"][i]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect()
            })
            .collect();
        Set { ids, cands, refs }
    }

    fn views(s: &Set) -> (Vec<&str>, Vec<Vec<&str>>) {
        (
            s.cands.iter().map(String::as_str).collect(),
            s.refs
                .iter()
                .map(|r| r.iter().map(String::as_str).collect())
                .collect(),
        )
    }

    fn score(f: &serde_json::Value, name: &str) -> (f64, Vec<f64>) {
        let s = &f["scores"][name];
        let ids = f["images"].as_array().unwrap();
        (
            s["corpus"].as_f64().unwrap(),
            ids.iter()
                .map(|i| s["per_image"][i.as_str().unwrap()].as_f64().unwrap())
                .collect(),
        )
    }

    #[test]
    fn ptb_tokenization_matches_stanford_and_pycocoevalcap_on_the_fixture() {
        let f = fixture();
        for id in f["images"].as_array().unwrap() {
            let id = id.as_str().unwrap();
            let raw = f["references"][id].as_array().unwrap();
            let want = f["tokenized_references"][id].as_array().unwrap();
            for (r, w) in raw.iter().zip(want) {
                assert_eq!(
                    ptb_tokenize(r.as_str().unwrap()),
                    w.as_str().unwrap(),
                    "{id}: {r}"
                );
            }
            assert_eq!(
                ptb_tokenize(f["candidates"][id].as_str().unwrap()),
                f["tokenized_candidates"][id].as_str().unwrap()
            );
        }
    }

    #[test]
    fn bleu_matches_pycocoevalcap() {
        let f = fixture();
        let set = tokenized(&f);
        let (c, r) = views(&set);
        let (corpus, per) = bleu(&c, &r);
        for k in 0..4 {
            let (want, want_per) = score(&f, &format!("Bleu_{}", k + 1));
            assert!(
                (corpus[k] - want).abs() < 1e-9,
                "Bleu_{}: {} vs {want}",
                k + 1,
                corpus[k]
            );
            for (i, w) in want_per.iter().enumerate() {
                assert!(
                    (per[i][k] - w).abs() < 1e-9,
                    "Bleu_{} {}: {} vs {w}",
                    k + 1,
                    set.ids[i],
                    per[i][k]
                );
            }
        }
    }

    #[test]
    fn rouge_l_matches_pycocoevalcap() {
        let f = fixture();
        let set = tokenized(&f);
        let (c, r) = views(&set);
        let (corpus, per) = rouge_l_corpus(&c, &r);
        let (want, want_per) = score(&f, "ROUGE_L");
        assert!((corpus - want).abs() < 1e-9, "{corpus} vs {want}");
        for (i, w) in want_per.iter().enumerate() {
            assert!(
                (per[i] - w).abs() < 1e-9,
                "{}: {} vs {w}",
                set.ids[i],
                per[i]
            );
        }
    }

    #[test]
    fn cider_d_matches_pycocoevalcap() {
        let f = fixture();
        let set = tokenized(&f);
        let (c, r) = views(&set);
        let (corpus, per) = cider_d(&c, &r);
        let (want, want_per) = score(&f, "CIDEr");
        assert!((corpus - want).abs() < 1e-9, "{corpus} vs {want}");
        for (i, w) in want_per.iter().enumerate() {
            assert!(
                (per[i] - w).abs() < 1e-9,
                "{}: {} vs {w}",
                set.ids[i],
                per[i]
            );
        }
    }

    #[test]
    fn cider_d_with_fixed_frequencies_equals_pycocoevalcap_over_the_same_references() {
        // Document frequencies from the fixture's own references: the same numbers as the
        // corpus scorer (and so as pycocoevalcap), one caption at a time.
        let f = fixture();
        let set = tokenized(&f);
        let scorer = CiderD::new(&set.refs);
        let (_, want_per) = score(&f, "CIDEr");
        for (i, w) in want_per.iter().enumerate() {
            let got = scorer.score(&set.cands[i], &set.refs[i]);
            assert!((got - w).abs() < 1e-9, "{}: {got} vs {w}", set.ids[i]);
        }
        // A word the corpus never saw matches nothing but itself in the references.
        let s = scorer.score("zzz", &["zzz".to_string()]);
        assert!(s > 0.0 && s.is_finite(), "{s}");
        assert_eq!(scorer.score("", &set.refs[0]), 0.0);
    }

    #[test]
    fn hand_computed_edge_cases() {
        // Identical candidate and single reference of four words: every precision is 1.
        let (b, _) = bleu(&["a b c d"], &[vec!["a b c d"]]);
        for s in b {
            assert!((s - 1.0).abs() < 1e-9);
        }
        // Brevity penalty: 2 of 4 reference words, both unigrams right: exp(1 - 4/2) = e^-1.
        let (b, _) = bleu(&["a b"], &[vec!["a b c d"]]);
        assert!((b[0] - (-1f64).exp()).abs() < 1e-9, "{}", b[0]);
        // ROUGE-L: LCS 2 of 3 candidate words and 2 of 4 reference words.
        let (p, r) = (2.0 / 3.0, 0.5);
        let want = (1.0 + 1.44) * p * r / (r + 1.44 * p);
        assert!((rouge_l("a x b", &["a b c d"]) - want).abs() < 1e-12);
        assert_eq!(rouge_l("x y", &["a b"]), 0.0);
        // CIDEr-D with a single image: log(1) = 0 idf weight for everything, score 0.
        assert_eq!(cider_d(&["a b"], &[vec!["a b"]]).0, 0.0);
    }
}
