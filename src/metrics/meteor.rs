//! METEOR 1.5 caption metric, as pycocoevalcap computes it, in pure Rust: the `exact` and
//! `stem` matching modules (no WordNet synonyms, no paraphrase table), English parameters.
//!
//! pycocoevalcap runs `java -jar meteor-1.5.jar - - -stdio -l en -norm` and sends one
//! `SCORE ||| refs ||| hyp` line per image, then a single `EVAL` line. This module follows
//! the same path: [`meteor`] normalises each caption as `-norm` does, aligns the candidate
//! with every reference, keeps the statistics of the best-scoring reference per image, and
//! computes the corpus score from the statistics summed over images (not the mean of the
//! per-image scores), as METEOR's `EVAL` does.
//!
//! Scoring (Denkowski & Lavie, "Meteor Universal", 2014; METEOR 1.5 default English
//! parameters α = 0.85, β = 0.2, γ = 0.6, δ = 0.75, module weights exact 1.0, stem 0.6):
//! precision and recall weight each matched word by its module and by δ for content words,
//! 1 − δ for function words; `Fmean = P·R / (α·P + (1 − α)·R)`; the fragmentation penalty is
//! `γ·(chunks / matches)^β`, where a hypothesis identical to its reference counts zero chunks.

use std::collections::HashMap;

// SipHash dominated the alignment search; its keys are small integers.
use crate::metrics::text::FastMap;

/// METEOR 1.5 English parameters (the jar's defaults for `-l en`).
const ALPHA: f64 = 0.85;
const BETA: f64 = 0.2;
const GAMMA: f64 = 0.6;
const DELTA: f64 = 0.75;
/// Weights of the `exact` and `stem` modules, in module order.
const MODULE_WEIGHTS: [f64; 2] = [1.0, 0.6];

/// At most this many partial alignments are carried from one candidate word to the next;
/// like METEOR's own beam (40), it only bites on pathological inputs (dozens of repeats of
/// one word), where the search would otherwise grow exponentially.
const MAX_PARTIAL_ALIGNMENTS: usize = 4096;

/// METEOR's English function words: `function/english.words` from the resources of
/// meteor-1.5.jar (as shipped in pycocoevalcap), in file order.
const FUNCTION_WORDS: [&str; 93] = [
    "the", ",", ".", "to", "of", "and", "a", "in", "that", "for", "\"", "is", "on", "'s", "it",
    "with", "was", "as", "said", "at", "he", "by", "be", "from", "have", "has", "are", "his",
    "but", "an", "this", "not", "i", "will", "\u{2019}", "they", ")", "-rrb-", "(", "-lrb-", "who",
    "their", "had", "we", "which", "were", "been", "more", "or", "s", "its", "would", "about",
    "new", "one", "after", "you", ":", "also", "up", "when", "there", "than", "$", "all", "out",
    "her", "people", "she", "year", "two", "-", "can", "if", "last", "first", "\u{201c}", "over",
    "other", "\u{201d}", "into", "some", "what", "so", "--", "no", "time", "years", "could", "?",
    "'t", "\u{2014}", "'",
];

/// Corpus METEOR (aggregated the way METEOR's EVAL does) and one score per image, like
/// pycocoevalcap's `Meteor().compute_score`.
///
/// `candidates[i]` is scored against every caption in `references[i]`; all captions are the
/// PTB-tokenized, lowercased text pycocoevalcap feeds the jar (tokens joined by spaces).
/// An image without references scores 0 and adds nothing to the corpus statistics; entries
/// beyond the shorter of the two slices are ignored.
pub fn meteor(candidates: &[&str], references: &[Vec<&str>]) -> (f64, Vec<f64>) {
    let mut corpus = SegmentStats::default();
    let mut stems = HashMap::new();
    let per_image = candidates
        .iter()
        .zip(references)
        .map(|(candidate, refs)| {
            let hypothesis = Sentence::new(candidate, &mut stems);
            let mut best: Option<(f64, SegmentStats)> = None;
            for reference in refs {
                let stats = SegmentStats::new(&hypothesis, &Sentence::new(reference, &mut stems));
                let score = stats.score();
                // METEOR keeps the first reference among equally good ones.
                if best.as_ref().is_none_or(|(b, _)| score > *b) {
                    best = Some((score, stats));
                }
            }
            best.map_or(0.0, |(score, stats)| {
                corpus.add(&stats);
                score
            })
        })
        .collect();
    (corpus.score(), per_image)
}

/// A caption as METEOR sees it: normalised tokens with their stems and function-word flags.
struct Sentence {
    words: Vec<String>,
    stems: Vec<String>,
    is_function: Vec<bool>,
}

impl Sentence {
    /// `stems` caches the stem of every word seen so far (captions repeat their words a lot).
    fn new(text: &str, stems: &mut HashMap<String, String>) -> Self {
        let words = normalize(text);
        let stems = words
            .iter()
            .map(|w| stems.entry(w.clone()).or_insert_with(|| stem(w)).clone())
            .collect();
        let is_function = words
            .iter()
            .map(|w| FUNCTION_WORDS.contains(&w.as_str()))
            .collect();
        Sentence {
            words,
            stems,
            is_function,
        }
    }

    fn function_words(&self) -> usize {
        self.is_function.iter().filter(|&&f| f).count()
    }
}

/// METEOR's sufficient statistics for one hypothesis/reference pair (or, summed, for a
/// corpus): what its `-ssOut` line reports.
#[derive(Debug, Default, Clone, PartialEq)]
struct SegmentStats {
    test_len: usize,
    ref_len: usize,
    test_function: usize,
    ref_function: usize,
    /// Per module: matched hypothesis content and function words, then reference ones.
    module_matches: [[usize; 4]; 2],
    /// Runs of matches contiguous in both sentences (zero for an identical pair).
    chunks: usize,
    /// Aligned word pairs (each covers one hypothesis and one reference word).
    matches: usize,
}

impl SegmentStats {
    fn new(hypothesis: &Sentence, reference: &Sentence) -> Self {
        let alignment = align(hypothesis, reference);
        let mut stats = SegmentStats {
            test_len: hypothesis.words.len(),
            ref_len: reference.words.len(),
            test_function: hypothesis.function_words(),
            ref_function: reference.function_words(),
            matches: alignment.len(),
            ..Default::default()
        };
        for (k, m) in alignment.iter().enumerate() {
            let counts = &mut stats.module_matches[m.module];
            counts[usize::from(hypothesis.is_function[m.hyp])] += 1;
            counts[2 + usize::from(reference.is_function[m.reference])] += 1;
            let continues = k > 0 && {
                let prev = &alignment[k - 1];
                prev.hyp + 1 == m.hyp && prev.reference + 1 == m.reference
            };
            if !continues {
                stats.chunks += 1;
            }
        }
        // A hypothesis identical to the reference (every word of both matched, in one chunk)
        // carries no fragmentation: METEOR counts it as zero chunks, also in corpus sums.
        if stats.matches == stats.test_len && stats.matches == stats.ref_len && stats.chunks == 1 {
            stats.chunks = 0;
        }
        stats
    }

    fn add(&mut self, other: &SegmentStats) {
        self.test_len += other.test_len;
        self.ref_len += other.ref_len;
        self.test_function += other.test_function;
        self.ref_function += other.ref_function;
        for (mine, theirs) in self.module_matches.iter_mut().zip(&other.module_matches) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a += b;
            }
        }
        self.chunks += other.chunks;
        self.matches += other.matches;
    }

    fn score(&self) -> f64 {
        let weighted = |content: usize, function: usize| {
            DELTA * content as f64 + (1.0 - DELTA) * function as f64
        };
        let (mut test_matched, mut ref_matched) = (0.0, 0.0);
        for (weight, m) in MODULE_WEIGHTS.iter().zip(&self.module_matches) {
            test_matched += weight * weighted(m[0], m[1]);
            ref_matched += weight * weighted(m[2], m[3]);
        }
        let test_total = weighted(self.test_len - self.test_function, self.test_function);
        let ref_total = weighted(self.ref_len - self.ref_function, self.ref_function);
        if test_total == 0.0 || ref_total == 0.0 || test_matched == 0.0 || ref_matched == 0.0 {
            return 0.0;
        }
        let precision = test_matched / test_total;
        let recall = ref_matched / ref_total;
        let fmean = precision * recall / (ALPHA * precision + (1.0 - ALPHA) * recall);
        let fragmentation = self.chunks as f64 / self.matches as f64;
        fmean * (1.0 - GAMMA * fragmentation.powf(BETA))
    }
}

// ---------------------------------------------------------------------------
// Alignment
// ---------------------------------------------------------------------------

const EXACT: usize = 0;
const STEM: usize = 1;

/// One aligned word pair.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Match {
    hyp: usize,
    reference: usize,
    /// `EXACT` or `STEM`.
    module: usize,
}

/// A word pair one module could align, with whether it may stand on its own.
#[derive(Clone, Copy)]
struct Candidate {
    reference: usize,
    module: usize,
    /// Exact matches always anchor. A stem match anchors only when neither word has another
    /// stem candidate; an ambiguous one is kept only inside a chunk that holds an anchor.
    anchors: bool,
}

/// Lexicographic objective of a (partial) alignment; larger is better.
///
/// Exact matches come first (most of them, then fewest chunks among them), then the whole
/// alignment: most matches, fewest chunks, smallest total distance between the positions
/// of matched words. This is METEOR 1.3's stated resolution order (coverage, chunks,
/// distance) applied stage by stage. It agrees with the jar on every fixture caption and on
/// about 98% of exhaustive small cases built from repeats of same-stem words (`dog dogs x`);
/// the jar's beam search resolves the rest differently.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Objective {
    exact_matches: i32,
    neg_exact_chunks: i32,
    matches: i32,
    neg_chunks: i32,
    neg_distance: i32,
}

/// Search state after deciding the first words of the hypothesis. Two partial alignments
/// with the same key have the same futures, so only the better one is kept.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct StateKey {
    /// Reference words already used, as bits of `reference_bit`.
    used: u128,
    /// The previous hypothesis word's match: reference position, whether exact, and whether
    /// the chunk it ends holds an anchor.
    previous: Option<(usize, bool, bool)>,
}

impl StateKey {
    /// A chunk that ends without an anchor would keep an ambiguous stem match on its own.
    fn chunk_unanchored(&self) -> bool {
        matches!(self.previous, Some((_, _, false)))
    }
}

/// Aligns hypothesis and reference words with the `exact` and `stem` modules; the result
/// is ordered by hypothesis position.
///
/// METEOR resolves the candidate matches with a beam search; here a dynamic programme over
/// hypothesis positions finds the best alignment under [`Objective`] exactly (up to
/// `MAX_PARTIAL_ALIGNMENTS`). How ambiguous stem matches are treated ([`Candidate::anchors`])
/// was read off the jar's output, not from a published description.
fn align(hypothesis: &Sentence, reference: &Sentence) -> Vec<Match> {
    let candidates = candidates(hypothesis, reference);
    let mut candidates_of_reference = vec![0usize; reference.words.len()];
    for c in candidates.iter().flatten() {
        candidates_of_reference[c.reference] += 1;
    }
    let reference_bit = reference_bits(reference.words.len(), &candidates);

    struct Partial {
        key: StateKey,
        objective: Objective,
        /// Index of this partial alignment's last decision in `trail`.
        trail_at: usize,
    }
    // Decisions as a tree: (parent, match made at this step if any).
    let mut trail: Vec<(usize, Option<Match>)> = vec![(usize::MAX, None)];
    let mut frontier = vec![Partial {
        key: StateKey {
            used: 0,
            previous: None,
        },
        objective: Objective::default(),
        trail_at: 0,
    }];

    for (i, options) in candidates.iter().enumerate() {
        let mut next: Vec<Partial> = Vec::new();
        {
            let mut index: FastMap<StateKey, usize> = HashMap::default();
            let mut offer =
                |key: StateKey, objective: Objective, parent: usize, made: Option<Match>| {
                    match index.get(&key) {
                        Some(&k) if next[k].objective >= objective => {}
                        found => {
                            trail.push((parent, made));
                            let partial = Partial {
                                key,
                                objective,
                                trail_at: trail.len() - 1,
                            };
                            match found {
                                Some(&k) => next[k] = partial,
                                None => {
                                    index.insert(key, next.len());
                                    next.push(partial);
                                }
                            }
                        }
                    }
                };
            // A one-to-one exact match is in every best alignment (adding it to one without it
            // only gains), so leaving its word unaligned need not be explored.
            let forced = matches!(options.as_slice(), [c] if c.module == EXACT && candidates_of_reference[c.reference] == 1);
            for p in &frontier {
                if !forced && !p.key.chunk_unanchored() {
                    offer(
                        StateKey {
                            used: p.key.used,
                            previous: None,
                        },
                        p.objective,
                        p.trail_at,
                        None,
                    );
                }
                for c in options {
                    let Some(bit) = reference_bit[c.reference] else {
                        continue;
                    };
                    if p.key.used & bit != 0 {
                        continue;
                    }
                    let exact = c.module == EXACT;
                    let continues = p.key.previous.filter(|prev| prev.0 + 1 == c.reference);
                    if continues.is_none() && p.key.chunk_unanchored() {
                        continue;
                    }
                    let anchored = c.anchors || continues.is_some_and(|prev| prev.2);
                    let mut objective = p.objective;
                    objective.matches += 1;
                    objective.neg_distance -= (i as i32 - c.reference as i32).abs();
                    if continues.is_none() {
                        objective.neg_chunks -= 1;
                    }
                    if exact {
                        objective.exact_matches += 1;
                        if !continues.is_some_and(|prev| prev.1) {
                            objective.neg_exact_chunks -= 1;
                        }
                    }
                    let key = StateKey {
                        used: p.key.used | bit,
                        previous: Some((c.reference, exact, anchored)),
                    };
                    let made = Match {
                        hyp: i,
                        reference: c.reference,
                        module: c.module,
                    };
                    offer(key, objective, p.trail_at, Some(made));
                }
            }
        }
        if next.len() > MAX_PARTIAL_ALIGNMENTS {
            next.sort_by_key(|p| std::cmp::Reverse(p.objective));
            next.truncate(MAX_PARTIAL_ALIGNMENTS);
        }
        frontier = next;
    }

    let best =
        frontier
            .iter()
            .filter(|p| !p.key.chunk_unanchored())
            .fold(None::<&Partial>, |best, p| match best {
                Some(b) if b.objective >= p.objective => Some(b),
                _ => Some(p),
            });
    let mut alignment = Vec::new();
    let mut at = best.map_or(0, |p| p.trail_at);
    while at != 0 {
        let (parent, made) = trail[at];
        alignment.extend(made);
        at = parent;
    }
    alignment.reverse();
    alignment
}

/// Every word pair each module could align, listed per hypothesis word in reference order.
/// A pair of identical words is an exact candidate only; `stem` pairs words that differ but
/// share a stem.
fn candidates(hypothesis: &Sentence, reference: &Sentence) -> Vec<Vec<Candidate>> {
    let mut per_hyp: Vec<Vec<Candidate>> = vec![Vec::new(); hypothesis.words.len()];
    let mut stem_pairs_of_hyp = vec![0usize; hypothesis.words.len()];
    let mut stem_pairs_of_ref = vec![0usize; reference.words.len()];
    for (i, options) in per_hyp.iter_mut().enumerate() {
        for (j, stem_pairs) in stem_pairs_of_ref.iter_mut().enumerate() {
            let module = if hypothesis.words[i] == reference.words[j] {
                EXACT
            } else if hypothesis.stems[i] == reference.stems[j] {
                stem_pairs_of_hyp[i] += 1;
                *stem_pairs += 1;
                STEM
            } else {
                continue;
            };
            options.push(Candidate {
                reference: j,
                module,
                anchors: true,
            });
        }
    }
    for (i, options) in per_hyp.iter_mut().enumerate() {
        for c in options.iter_mut().filter(|c| c.module == STEM) {
            c.anchors = stem_pairs_of_hyp[i] == 1 && stem_pairs_of_ref[c.reference] == 1;
        }
    }
    per_hyp
}

/// A bit for each reference position some candidate can use; positions beyond the 128th
/// such one get none and stay unaligned (no caption comes near that).
fn reference_bits(reference_len: usize, candidates: &[Vec<Candidate>]) -> Vec<Option<u128>> {
    let mut usable = vec![false; reference_len];
    for c in candidates.iter().flatten() {
        usable[c.reference] = true;
    }
    let mut next_bit = 0u32;
    usable
        .into_iter()
        .map(|u| {
            if !u || next_bit >= 128 {
                return None;
            }
            next_bit += 1;
            Some(1u128 << (next_bit - 1))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// `-norm` text normalisation
// ---------------------------------------------------------------------------

/// Splits a caption into the tokens METEOR 1.5 scores under `-norm`: lowercased, with
/// punctuation split off the way the jar does it for PTB-tokenized captions.
///
/// The rules were read off the jar's behaviour (its `-writeAlignments` output shows the
/// normalised sentences): symbols stand alone; a comma does unless it sits between digits;
/// a word-final period does, while dotted abbreviations lose their dots (`a.m.` -> `am`); a
/// hyphen inside a word becomes a space, one joint at a time (`a-b-c` -> `a b-c`); an
/// apostrophe inside a word starts a new token (`n't` -> `n 't`) and any other apostrophe
/// stands alone (`'s` -> `' s`).
fn normalize(text: &str) -> Vec<String> {
    let lower = text.to_lowercase().replace('`', "'").replace("''", "\"");
    lower.split_whitespace().flat_map(normalize_token).collect()
}

/// Characters that always form a token of their own.
fn is_symbol(c: char) -> bool {
    "/#@$%+*=<>_~^|\\&;:?!()[]{}\"".contains(c)
}

/// Normalises one whitespace-free token into one or more tokens.
fn normalize_token(token: &str) -> Vec<String> {
    if token
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return vec![token.to_string()];
    }
    let mut spaced = String::new();
    for piece in split_symbols_and_commas(token)
        .split(' ')
        .filter(|p| !p.is_empty())
    {
        spaced.push(' ');
        spaced.push_str(&split_periods(piece));
    }
    let spaced = split_apostrophes(&spaced);
    let spaced = split_hyphens(&spaced);
    spaced.split_whitespace().map(str::to_string).collect()
}

fn split_symbols_and_commas(token: &str) -> String {
    let chars: Vec<char> = token.chars().collect();
    let mut out = String::new();
    for (i, &c) in chars.iter().enumerate() {
        let digit_at = |k: Option<usize>| {
            k.and_then(|k| chars.get(k))
                .is_some_and(|d| d.is_ascii_digit())
        };
        let numeric_comma = c == ',' && digit_at(i.checked_sub(1)) && digit_at(Some(i + 1));
        if is_symbol(c) || (c == ',' && !numeric_comma) {
            out.push(' ');
            out.push(c);
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    out
}

/// Dotted abbreviations (`u.s.`, `p.m.`, `e.g.`) lose their dots; any other token ending in a
/// single period has it split off.
fn split_periods(piece: &str) -> String {
    let groups: Vec<&str> = piece
        .strip_suffix('.')
        .map_or(Vec::new(), |p| p.split('.').collect());
    let is_abbreviation = groups.len() >= 2
        && groups
            .iter()
            .all(|g| !g.is_empty() && g.chars().all(char::is_alphanumeric))
        && piece.chars().any(char::is_alphabetic);
    if is_abbreviation {
        groups.concat()
    } else if let Some(head) = piece
        .strip_suffix('.')
        .filter(|h| !h.is_empty() && !h.ends_with('.'))
    {
        format!("{head} .")
    } else {
        piece.to_string()
    }
}

/// An apostrophe that is not between two alphanumerics stands alone; one between two
/// alphanumerics opens a new token, except where its left neighbour already ended the
/// previous split (`a'b'c'd` -> `a 'b'c 'd`, as the jar's left-to-right rewrite does).
fn split_apostrophes(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let word = |k: Option<usize>| {
        k.and_then(|k| chars.get(k))
            .is_some_and(|c| c.is_alphanumeric())
    };
    let inside_word = |i: usize| word(i.checked_sub(1)) && word(Some(i + 1));
    let mut out = String::new();
    let mut consumed_until = 0;
    for (i, &c) in chars.iter().enumerate() {
        if c != '\'' {
            out.push(c);
        } else if !inside_word(i) {
            out.push_str(" ' ");
        } else if i > consumed_until {
            out.push_str(" '");
            consumed_until = i + 2;
        } else {
            out.push(c);
        }
    }
    out
}

/// Runs of two hyphens shrink to one; a hyphen between two non-space characters becomes a
/// space, one joint at a time from the left (`a-b-c` -> `a b-c`, as the jar does).
fn split_hyphens(text: &str) -> String {
    let collapsed = text.replace("--", "-");
    let chars: Vec<char> = collapsed.chars().collect();
    let joint = |k: usize| {
        chars
            .get(k)
            .is_some_and(|c| !c.is_whitespace() && *c != '-')
    };
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if joint(i) && chars.get(i + 1) == Some(&'-') && joint(i + 2) {
            out.push(chars[i]);
            out.push(' ');
            out.push(chars[i + 2]);
            i += 3;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Snowball English (Porter2) stemmer
// ---------------------------------------------------------------------------

/// Snowball English ("Porter2") stem of one lowercase word: the stemmer METEOR's `stem`
/// module compares words with.
///
/// Written from the published algorithm description (snowballstem.org, "The English
/// (Porter2) stemming algorithm"), in the revision METEOR 1.5 ships: only `gener`, `commun`
/// and `arsen` get a fixed R1.
pub fn stem(word: &str) -> String {
    if let Some(fixed) = stem_exception(word) {
        return fixed.to_string();
    }
    let mut w: Vec<char> = word.chars().collect();
    if w.len() < 3 {
        return word.to_string();
    }
    if w[0] == '\'' {
        w.remove(0);
    }
    mark_consonant_ys(&mut w);
    let (r1, r2) = regions(&w);
    let mut s = Porter2 { w, r1, r2 };
    s.step0();
    s.step1a();
    let word_now: String = s.w.iter().collect();
    if !matches!(
        word_now.as_str(),
        "inning" | "outing" | "canning" | "herring" | "earring" | "proceed" | "exceed" | "succeed"
    ) {
        s.step1b();
        s.step1c();
        s.step2();
        s.step3();
        s.step4();
        s.step5();
    }
    s.w.iter()
        .map(|&c| if c == 'Y' { 'y' } else { c })
        .collect()
}

/// Whole words the algorithm stems by table rather than by rule.
fn stem_exception(word: &str) -> Option<&'static str> {
    Some(match word {
        "skis" => "ski",
        "skies" => "sky",
        "dying" => "die",
        "lying" => "lie",
        "tying" => "tie",
        "idly" => "idl",
        "gently" => "gentl",
        "ugly" => "ugli",
        "early" => "earli",
        "only" => "onli",
        "singly" => "singl",
        "sky" => "sky",
        "news" => "news",
        "howe" => "howe",
        "atlas" => "atlas",
        "cosmos" => "cosmos",
        "bias" => "bias",
        "andes" => "andes",
        _ => return None,
    })
}

fn is_vowel(c: char) -> bool {
    matches!(c, 'a' | 'e' | 'i' | 'o' | 'u' | 'y')
}

/// A `y` that starts the word or follows a vowel acts as a consonant; it is written `Y`
/// until the end so that no rule takes it for a vowel.
fn mark_consonant_ys(w: &mut [char]) {
    for i in 0..w.len() {
        if w[i] == 'y' && (i == 0 || is_vowel(w[i - 1])) {
            w[i] = 'Y';
        }
    }
}

/// Start of R1 and R2: each is the region after the first non-vowel that follows a vowel
/// (R2 searched inside R1).
fn regions(w: &[char]) -> (usize, usize) {
    let after_vowel_consonant = |from: usize| {
        (from + 1..w.len())
            .find(|&i| !is_vowel(w[i]) && is_vowel(w[i - 1]))
            .map_or(w.len(), |i| i + 1)
    };
    let prefix = ["gener", "commun", "arsen"].iter().find(|p| {
        let p: Vec<char> = p.chars().collect();
        w.starts_with(&p)
    });
    let r1 = match prefix {
        Some(p) => p.len(),
        None => after_vowel_consonant(0),
    };
    let r2 = if r1 >= w.len() {
        w.len()
    } else {
        after_vowel_consonant(r1)
    };
    (r1, r2)
}

struct Porter2 {
    w: Vec<char>,
    r1: usize,
    r2: usize,
}

impl Porter2 {
    fn ends_with(&self, suffix: &str) -> bool {
        let n = suffix.chars().count();
        n <= self.w.len()
            && self.w[self.w.len() - n..]
                .iter()
                .copied()
                .eq(suffix.chars())
    }

    /// The longest of `suffixes` the word ends with (the algorithm never falls back to a
    /// shorter one when the longest fails its condition).
    fn longest<'a>(&self, suffixes: &[&'a str]) -> Option<&'a str> {
        suffixes
            .iter()
            .filter(|s| self.ends_with(s))
            .max_by_key(|s| s.len())
            .copied()
    }

    /// The rule `(suffix, replacement)` of `rules` with the longest suffix the word ends with.
    fn longest_rule(
        &self,
        rules: &[(&'static str, &'static str)],
    ) -> Option<(&'static str, &'static str)> {
        rules
            .iter()
            .filter(|(suffix, _)| self.ends_with(suffix))
            .max_by_key(|(suffix, _)| suffix.len())
            .copied()
    }

    /// Where `suffix` starts in the current word.
    fn start(&self, suffix: &str) -> usize {
        self.w.len() - suffix.chars().count()
    }

    fn replace(&mut self, suffix: &str, with: &str) {
        let at = self.start(suffix);
        self.w.truncate(at);
        self.w.extend(with.chars());
    }

    fn has_vowel_before(&self, end: usize) -> bool {
        self.w[..end].iter().any(|&c| is_vowel(c))
    }

    /// Does the word, cut at `end`, end in a short syllable: non-vowel, vowel, non-vowel
    /// other than w, x and Y; or a vowel and a non-vowel that open the word?
    fn short_syllable_at(&self, end: usize) -> bool {
        let w = &self.w[..end];
        match w.len() {
            0 | 1 => false,
            2 => is_vowel(w[0]) && !is_vowel(w[1]),
            n => {
                let (a, b, c) = (w[n - 3], w[n - 2], w[n - 1]);
                !is_vowel(a) && is_vowel(b) && !is_vowel(c) && !matches!(c, 'w' | 'x' | 'Y')
            }
        }
    }

    fn step0(&mut self) {
        if let Some(s) = self.longest(&["'", "'s", "'s'"]) {
            self.replace(s, "");
        }
    }

    fn step1a(&mut self) {
        match self.longest(&["sses", "ied", "ies", "s", "us", "ss"]) {
            Some("sses") => self.replace("sses", "ss"),
            Some(s @ ("ied" | "ies")) => {
                let with = if self.start(s) > 1 { "i" } else { "ie" };
                self.replace(s, with);
            }
            Some("s") => {
                let before = self.start("s");
                if before >= 1 && self.has_vowel_before(before - 1) {
                    self.replace("s", "");
                }
            }
            _ => {}
        }
    }

    fn step1b(&mut self) {
        match self.longest(&["eed", "eedly", "ed", "edly", "ing", "ingly"]) {
            Some(s @ ("eed" | "eedly")) if self.start(s) >= self.r1 => self.replace(s, "ee"),
            Some("eed" | "eedly") => {}
            Some(s) => {
                if !self.has_vowel_before(self.start(s)) {
                    return;
                }
                self.replace(s, "");
                if self.ends_with("at") || self.ends_with("bl") || self.ends_with("iz") {
                    self.w.push('e');
                } else if ["bb", "dd", "ff", "gg", "mm", "nn", "pp", "rr", "tt"]
                    .iter()
                    .any(|d| self.ends_with(d))
                {
                    self.w.pop();
                } else if self.r1 >= self.w.len() && self.short_syllable_at(self.w.len()) {
                    self.w.push('e');
                }
            }
            None => {}
        }
    }

    fn step1c(&mut self) {
        let n = self.w.len();
        if n >= 3 && matches!(self.w[n - 1], 'y' | 'Y') && !is_vowel(self.w[n - 2]) {
            self.w[n - 1] = 'i';
        }
    }

    fn step2(&mut self) {
        const RULES: [(&str, &str); 24] = [
            ("tional", "tion"),
            ("enci", "ence"),
            ("anci", "ance"),
            ("abli", "able"),
            ("entli", "ent"),
            ("izer", "ize"),
            ("ization", "ize"),
            ("ational", "ate"),
            ("ation", "ate"),
            ("ator", "ate"),
            ("alism", "al"),
            ("aliti", "al"),
            ("alli", "al"),
            ("fulness", "ful"),
            ("ousli", "ous"),
            ("ousness", "ous"),
            ("iveness", "ive"),
            ("iviti", "ive"),
            ("biliti", "ble"),
            ("bli", "ble"),
            ("fulli", "ful"),
            ("lessli", "less"),
            ("ogi", "og"),
            ("li", ""),
        ];
        let Some((s, with)) = self.longest_rule(&RULES) else {
            return;
        };
        let at = self.start(s);
        if at < self.r1 {
            return;
        }
        let before = if at > 0 { Some(self.w[at - 1]) } else { None };
        let allowed = match s {
            "ogi" => before == Some('l'),
            "li" => matches!(
                before,
                Some('c' | 'd' | 'e' | 'g' | 'h' | 'k' | 'm' | 'n' | 'r' | 't')
            ),
            _ => true,
        };
        if allowed {
            self.replace(s, with);
        }
    }

    fn step3(&mut self) {
        const RULES: [(&str, &str); 9] = [
            ("tional", "tion"),
            ("ational", "ate"),
            ("alize", "al"),
            ("icate", "ic"),
            ("iciti", "ic"),
            ("ical", "ic"),
            ("ful", ""),
            ("ness", ""),
            ("ative", ""),
        ];
        let Some((s, with)) = self.longest_rule(&RULES) else {
            return;
        };
        let at = self.start(s);
        if at < self.r1 || (s == "ative" && at < self.r2) {
            return;
        }
        self.replace(s, with);
    }

    fn step4(&mut self) {
        const SUFFIXES: [&str; 18] = [
            "al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ism",
            "ate", "iti", "ous", "ive", "ize", "ion",
        ];
        let Some(s) = self.longest(&SUFFIXES) else {
            return;
        };
        let at = self.start(s);
        if at < self.r2 {
            return;
        }
        if s == "ion" && !(at > 0 && matches!(self.w[at - 1], 's' | 't')) {
            return;
        }
        self.replace(s, "");
    }

    fn step5(&mut self) {
        let n = self.w.len();
        if self.ends_with("e") {
            let at = n - 1;
            if at >= self.r2 || (at >= self.r1 && !self.short_syllable_at(at)) {
                self.w.pop();
            }
        } else if self.ends_with("ll") && n > self.r2 {
            self.w.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fixture(name: &str) -> serde_json::Value {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/coco-eval")
            .join(name);
        serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
    }

    /// Tokenized candidates and references of a fixture, in its image order.
    fn inputs(f: &serde_json::Value) -> (Vec<String>, Vec<Vec<String>>) {
        let ids = f["images"].as_array().unwrap();
        let cands = ids.iter().map(|i| {
            f["tokenized_candidates"][i.as_str().unwrap()]
                .as_str()
                .unwrap()
                .to_string()
        });
        let refs = ids.iter().map(|i| {
            let r = f["tokenized_references"][i.as_str().unwrap()]
                .as_array()
                .unwrap();
            r.iter().map(|v| v.as_str().unwrap().to_string()).collect()
        });
        (cands.collect(), refs.collect())
    }

    fn expected(f: &serde_json::Value, scores: &serde_json::Value) -> (f64, Vec<f64>) {
        let ids = f["images"].as_array().unwrap();
        let per_image = ids
            .iter()
            .map(|i| scores["per_image"][i.as_str().unwrap()].as_f64().unwrap());
        (scores["corpus"].as_f64().unwrap(), per_image.collect())
    }

    fn ours(f: &serde_json::Value) -> (f64, Vec<f64>) {
        let (cands, refs) = inputs(f);
        let cands: Vec<&str> = cands.iter().map(String::as_str).collect();
        let refs: Vec<Vec<&str>> = refs
            .iter()
            .map(|r| r.iter().map(String::as_str).collect())
            .collect();
        meteor(&cands, &refs)
    }

    fn mean_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>() / a.len() as f64
    }

    #[test]
    fn exact_and_stem_modules_match_the_jar_per_image_and_corpus() {
        let f = fixture("meteor_reference.json");
        let (corpus, per_image) = ours(&f);
        let (want_corpus, want) = expected(&f, &f["exact_stem"]);
        let ids = f["images"].as_array().unwrap();
        for ((id, got), want) in ids.iter().zip(&per_image).zip(&want) {
            assert!(
                (got - want).abs() < 1e-6,
                "{id}: ours {got}, jar -m 'exact stem' {want}"
            );
        }
        assert!(
            (corpus - want_corpus).abs() < 1e-6,
            "corpus: ours {corpus}, jar {want_corpus}"
        );
    }

    /// Synonym and paraphrase matches are not implemented; on captions the
    /// gap is small. Informational bound, measured: mean |Δ| 0.014 (meteor_reference.json)
    /// and 0.003 (reference.json); corpus |Δ| 0.005 and 0.001.
    #[test]
    fn full_meteor_with_synonyms_and_paraphrases_stays_close() {
        for (name, scores) in [
            ("meteor_reference.json", "all_modules"),
            ("reference.json", "METEOR"),
        ] {
            let f = fixture(name);
            let (corpus, per_image) = ours(&f);
            let s = if name == "reference.json" {
                &f["scores"][scores]
            } else {
                &f[scores]
            };
            let (want_corpus, want) = expected(&f, s);
            let mad = mean_abs_diff(&per_image, &want);
            assert!(mad < 0.03, "{name}: mean |ours - full METEOR| = {mad}");
            assert!(
                (corpus - want_corpus).abs() < 0.03,
                "{name}: corpus {corpus} vs {want_corpus}"
            );
        }
    }

    #[test]
    fn identical_captions_score_one_and_disjoint_ones_zero() {
        let (corpus, per_image) = meteor(
            &["a man riding a horse", "two zebras"],
            &[vec!["a man riding a horse"], vec!["a red bus"]],
        );
        assert_eq!(per_image, vec![1.0, 0.0]);
        // The unmatched words of the second image count against the corpus precision and recall.
        assert!(corpus > 0.0 && corpus < 1.0);
    }

    #[test]
    fn function_word_match_weighs_one_minus_delta() {
        // "the" matches: P = R = 0.25 / (0.75 + 0.25); one chunk of one match gives the
        // full penalty γ, so the score is 0.25 · (1 − 0.6).
        let (_, per_image) = meteor(&["the dog"], &[vec!["the cat"]]);
        assert!((per_image[0] - 0.1).abs() < 1e-12);
    }

    #[test]
    fn stem_matches_weigh_point_six() {
        // Both words stem-match in one chunk covering both sentences: no penalty, score 0.6.
        let (_, per_image) = meteor(&["dogs run"], &[vec!["dog runs"]]);
        assert!((per_image[0] - 0.6).abs() < 1e-12);
    }

    #[test]
    fn best_reference_wins_and_ties_keep_the_first() {
        let (_, one) = meteor(&["a cat"], &[vec!["a dog", "a cat"]]);
        assert_eq!(one, vec![1.0]);
        // Both references score 0 for "q"; the first one's length enters the corpus recall.
        let corpus = |refs: Vec<&str>| meteor(&["q", "a b"], &[refs, vec!["a b"]]).0;
        assert_eq!(corpus(vec!["x y", "x y z"]), corpus(vec!["x y"]));
        assert_eq!(corpus(vec!["x y z", "x y"]), corpus(vec!["x y z"]));
        assert_ne!(corpus(vec!["x y"]), corpus(vec!["x y z"]));
    }

    #[test]
    fn porter2_stems() {
        for (word, want) in [
            ("running", "run"),
            ("runs", "run"),
            ("dogs", "dog"),
            ("generously", "generous"),
            ("skies", "sky"),
            ("dying", "die"),
            ("hopping", "hop"),
            ("hoping", "hope"),
            ("ties", "tie"),
            ("cries", "cri"),
            ("happily", "happili"),
            ("communication", "communic"),
            ("a", "a"),
        ] {
            assert_eq!(stem(word), want, "{word}");
        }
    }

    #[test]
    fn normalization_follows_the_jar() {
        for (text, want) in [
            ("a well-dressed man", "a well dressed man"),
            ("20-year-old x-y-z-w", "20 year old x y-z w"),
            ("the dog 's ball is n't red", "the dog ' s ball is n 't red"),
            ("3 p.m. in the u.s.", "3 pm in the us"),
            ("1/2 & 1,000 $5 end.", "1 / 2 & 1,000 $ 5 end ."),
            ("-lrb- a -rrb- --", "-lrb- a -rrb- -"),
            ("A Dog", "a dog"),
        ] {
            assert_eq!(normalize(text).join(" "), want, "{text}");
        }
    }
}
