//! Choosing the next token from logits: greedy, or seeded sampling with temperature,
//! top-k, top-p and a repetition penalty, in transformers' order.

use lime_schemas::SamplingParams;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One sequence's token chooser. The random stream is ChaCha8 seeded from the
/// request, whose output the rand_chacha crate guarantees never to change, so a
/// seed reproduces the same tokens on every machine and release.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            params,
            scratch: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token; `history` is the sequence so far (prompt included), for
    /// the repetition penalty. `logits` must not be empty.
    pub fn next(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let mut logits = std::borrow::Cow::Borrowed(logits);
        if p.repetition_penalty != 1.0 {
            let l = logits.to_mut();
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(x) = l.get_mut(id as usize) {
                    *x = if *x < 0.0 {
                        *x * p.repetition_penalty
                    } else {
                        *x / p.repetition_penalty
                    };
                }
            }
        }
        if p.is_greedy() {
            return argmax(&logits);
        }
        let inv_t = 1.0 / p.temperature;
        let cand = &mut self.scratch;
        cand.clear();
        cand.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &x)| (i as u32, x * inv_t)),
        );
        // Descending by logit, ascending id on ties, so the order is total and fixed.
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && p.top_k < cand.len() {
            let kth = cand[p.top_k - 1].1;
            let keep = cand.iter().take_while(|c| c.1 >= kth).count();
            cand.truncate(keep);
        }
        let max = cand[0].1;
        let weights: Vec<f64> = cand.iter().map(|c| f64::from(c.1 - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut keep = weights.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, w) in weights.iter().enumerate() {
                cum += w / total;
                if cum >= f64::from(p.top_p) {
                    keep = i + 1;
                    break;
                }
            }
        }
        let kept_total: f64 = weights[..keep].iter().sum();
        let mut u = self.rng.random::<f64>() * kept_total;
        for (c, w) in cand[..keep].iter().zip(&weights) {
            if u < *w {
                return c.0;
            }
            u -= w;
        }
        cand[keep - 1].0
    }
}

/// Index of the largest logit, the lowest index among equals; NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..64)
            .map(|i| ((i * 37 % 64) as f32 / 8.0).sin() * 3.0)
            .collect()
    }

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, f32::NAN]), 1);
        let l = logits();
        assert_eq!(
            Sampler::new(SamplingParams::greedy()).next(&l, &[]),
            argmax(&l)
        );
    }

    #[test]
    fn a_seed_reproduces_and_different_seeds_differ() {
        let l = logits();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed));
            (0..200).map(|_| s.next(&l, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let l = logits();
        let best = argmax(&l);
        let mut k1 = Sampler::new(params(2.0, 1, 1.0, 1));
        let mut p0 = Sampler::new(params(2.0, 0, 1e-6, 2));
        for _ in 0..100 {
            assert_eq!(k1.next(&l, &[]), best);
            assert_eq!(p0.next(&l, &[]), best);
        }
    }

    #[test]
    fn top_k_restricts_to_the_k_best() {
        let l = logits();
        let mut order: Vec<u32> = (0..l.len() as u32).collect();
        order.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]));
        let allowed = &order[..5];
        let mut s = Sampler::new(params(5.0, 5, 1.0, 3));
        let drawn: std::collections::BTreeSet<u32> = (0..500).map(|_| s.next(&l, &[])).collect();
        assert!(drawn.iter().all(|t| allowed.contains(t)), "{drawn:?}");
        assert!(
            drawn.len() > 2,
            "high temperature should spread over the top 5"
        );
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Two tokens with probabilities 0.2 and 0.8.
        let l = [0.0f32, 4.0f32.ln()];
        let mut s = Sampler::new(params(1.0, 0, 1.0, 11));
        let ones = (0..10_000).filter(|_| s.next(&l, &[]) == 1).count();
        assert!((7_700..8_300).contains(&ones), "{ones}");
    }

    #[test]
    fn repetition_penalty_discourages_seen_tokens() {
        let l = [2.0f32, 1.9, -1.0];
        let p = SamplingParams {
            repetition_penalty: 1.5,
            ..SamplingParams::greedy()
        };
        assert_eq!(Sampler::new(p.clone()).next(&l, &[]), 0);
        assert_eq!(Sampler::new(p).next(&l, &[0]), 1);
    }
}
