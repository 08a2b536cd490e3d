//! The order a stage's streamed layers are asked for, learnt from the asking, so
//! that the loader reads ahead what the next micro-batch needs.
//!
//! One micro-batch visits the offloaded layers in model order, but several in
//! flight interleave: with two micro-batches travelling close together the
//! starter is asked for `0, 0, 4, 4, …`, not `0, 4, 0, 4`, and a loader that
//! follows model order reads the wrong layer into its slot half the time. The
//! asks repeat once per round, so the last round predicts the next one.

use std::collections::VecDeque;

/// Asks remembered: enough for three rounds of 8 micro-batches over 8 streamed
/// layers.
const KEPT: usize = 192;

/// The recent asks for streamed layers, oldest first.
#[derive(Debug, Default)]
pub struct Demand {
    asked: VecDeque<usize>,
}

impl Demand {
    /// Notes that a micro-batch asked for streamed layer `layer`; the oldest asks
    /// beyond three rounds' worth are forgotten.
    pub fn record(&mut self, layer: usize) {
        if self.asked.len() == KEPT {
            self.asked.pop_front();
        }
        self.asked.push_back(layer);
    }

    /// Forgets the pattern (the stage's streamed layers changed).
    pub fn clear(&mut self) {
        self.asked.clear();
    }

    /// The asks expected next, one round's worth, when the recent asks repeat:
    /// the shortest period that held for the last three rounds and covers every
    /// streamed layer. `None` while there is no such pattern.
    pub fn upcoming(&self, streamed: &[usize]) -> Option<Vec<usize>> {
        let n = self.asked.len();
        let period = (1..=n / 3).find(|&p| {
            (n - 3 * p..n - p).all(|i| self.asked[i] == self.asked[i + p])
                && streamed
                    .iter()
                    .all(|l| self.asked.range(n - p..).any(|a| a == l))
        })?;
        Some(self.asked.range(n - period..).copied().collect())
    }

    /// The next layer to read when `held` (filled or being filled) already
    /// serve the first asks of the pattern, one ask each.
    pub fn next_to_read(&self, streamed: &[usize], held: &[usize]) -> Option<usize> {
        let upcoming = self.upcoming(streamed)?;
        let mut held = held.to_vec();
        // Two rounds: more slots than one round's asks still have work.
        upcoming
            .iter()
            .chain(upcoming.iter())
            .find(|l| match held.iter().position(|h| h == *l) {
                Some(i) => {
                    held.swap_remove(i);
                    false
                }
                None => true,
            })
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(seq: &[usize]) -> Demand {
        let mut d = Demand::default();
        seq.iter().for_each(|&l| d.record(l));
        d
    }

    #[test]
    fn one_micro_batch_asks_in_model_order() {
        let d = asked(&[0, 4, 0, 4, 0, 4]);
        assert_eq!(d.upcoming(&[0, 4]), Some(vec![0, 4]));
        assert_eq!(d.next_to_read(&[0, 4], &[]), Some(0));
        assert_eq!(d.next_to_read(&[0, 4], &[0]), Some(4));
    }

    #[test]
    fn micro_batches_travelling_together_ask_twice_in_a_row() {
        let d = asked(&[0, 4, 4, 0, 0, 4, 4, 0, 0, 4, 4, 0, 0]);
        assert_eq!(d.upcoming(&[0, 4]), Some(vec![4, 4, 0, 0]));
        assert_eq!(d.next_to_read(&[0, 4], &[]), Some(4));
        assert_eq!(d.next_to_read(&[0, 4], &[4]), Some(4));
        assert_eq!(d.next_to_read(&[0, 4], &[4, 4]), Some(0));
    }

    #[test]
    fn no_pattern_until_three_rounds_agree_and_cover_every_layer() {
        assert_eq!(asked(&[0, 4, 0, 4]).upcoming(&[0, 4]), None);
        assert_eq!(asked(&[0, 4, 0, 4, 0, 4]).upcoming(&[0, 4, 5]), None);
        assert_eq!(asked(&[0, 4, 4, 0, 4, 0]).upcoming(&[0, 4]), None);
        let mut d = asked(&[0, 4, 0, 4, 0, 4]);
        d.clear();
        assert_eq!(d.upcoming(&[0, 4]), None);
    }
}
