//! Cross-modal retrieval recall (R@K), as the contrastive recipes and CLIP's evaluations
//! report it: for each query, the rank of the best-ranked relevant item among all candidates
//! by similarity; `R@K` is the share of queries with that rank below `K`.
//!
//! Relevance is by group: a candidate is relevant to a query when their groups are equal
//! (the same image; for texts, the same caption, since identical texts are indistinguishable
//! to any encoder). With one caption per image and distinct captions this is the usual
//! "the paired item is in the top K".

/// The 0-based rank of the best relevant candidate for one query: how many candidates score
/// strictly higher than it (ties count in the query's favour). `None` when no candidate is
/// relevant.
pub fn best_relevant_rank(
    scores: &[f32],
    query_group: u64,
    candidate_groups: &[u64],
) -> Option<usize> {
    let best = scores
        .iter()
        .zip(candidate_groups)
        .filter(|(_, g)| **g == query_group)
        .map(|(s, _)| *s)
        .fold(None, |m: Option<f32>, s| Some(m.map_or(s, |m| m.max(s))))?;
    Some(scores.iter().filter(|s| **s > best).count())
}

/// `R@K` for each of `ks` from the queries' best relevant ranks (queries without a relevant
/// candidate count as misses).
pub fn recall_at(ranks: &[Option<usize>], ks: &[usize]) -> Vec<f64> {
    ks.iter()
        .map(|&k| {
            let hits = ranks.iter().filter(|r| r.is_some_and(|r| r < k)).count();
            hits as f64 / ranks.len().max(1) as f64
        })
        .collect()
}

/// `R@1` of a retriever that ranks candidates at random, for these groups: the expected share
/// of queries whose first candidate is relevant, `mean_q |relevant(q)| / n`.
pub fn chance_recall_at_1(query_groups: &[u64], candidate_groups: &[u64]) -> f64 {
    let n = candidate_groups.len().max(1) as f64;
    let mut counts = std::collections::HashMap::<u64, usize>::new();
    for g in candidate_groups {
        *counts.entry(*g).or_default() += 1;
    }
    let sum: f64 = query_groups
        .iter()
        .map(|g| counts.get(g).copied().unwrap_or(0) as f64 / n)
        .sum();
    sum / query_groups.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rank_counts_candidates_strictly_above_the_best_relevant_one() {
        let scores = [0.1, 0.9, 0.5, 0.7, 0.5];
        // Relevant: candidates 2 and 4 (both 0.5): two candidates score higher.
        assert_eq!(best_relevant_rank(&scores, 7, &[1, 2, 7, 3, 7]), Some(2));
        assert_eq!(best_relevant_rank(&scores, 2, &[1, 2, 7, 3, 7]), Some(0));
        assert_eq!(best_relevant_rank(&scores, 9, &[1, 2, 7, 3, 7]), None);
        // A tie with the best relevant one does not push it down.
        assert_eq!(best_relevant_rank(&[0.5, 0.5], 1, &[0, 1]), Some(0));
    }

    #[test]
    fn recall_is_the_share_of_queries_ranked_below_k() {
        let ranks = [Some(0), Some(3), Some(9), None];
        assert_eq!(recall_at(&ranks, &[1, 5, 10]), vec![0.25, 0.5, 0.75]);
    }

    #[test]
    fn chance_counts_the_relevant_candidates() {
        // Four distinct groups: 1/4. A group held twice doubles its queries' chance.
        assert_eq!(chance_recall_at_1(&[1, 2, 3, 4], &[1, 2, 3, 4]), 0.25);
        assert_eq!(
            chance_recall_at_1(&[1, 1, 3, 4], &[1, 1, 3, 4]),
            (0.5 + 0.5 + 0.25 + 0.25) / 4.0
        );
    }
}
