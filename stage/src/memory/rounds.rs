//! Streamed layers kept for a round: with several micro-batches in flight, each
//! visits every streamed layer in turn, one after another. A slot that goes
//! back to the pool after the first micro-batch would be read again for the
//! next; kept until the round's last micro-batch has run it, it is read once
//! per round (the starter tags each micro-batch with its [`Round`]).
//!
//! A kept slot cannot be refilled, so with several slots all but one are kept
//! at most: the last streams the layers that are not kept, and prefetches the
//! next chunk's. A stage with one slot keeps it too: the round's other
//! micro-batches follow within a few layers' compute, far sooner than the layer
//! could be read again, and the loader refills the slot once they have passed.
//! Should a read find every slot kept (the round's micro-batches came apart, or
//! a chunk streams more layers than there are slots), the slot kept longest
//! goes back: slots too few for a round cost reads, never a deadlock.

use crate::memory::residency::Slot;
use lime_schemas::Round;
use std::collections::HashMap;

/// The slots kept for rounds, by layer.
#[derive(Default)]
pub struct RoundKeep {
    kept: HashMap<usize, Kept>,
    /// Stamps kept slots in the order they were kept.
    clock: u64,
    /// Visits served from a kept slot since start.
    shared: u64,
}

struct Kept {
    slot: Slot,
    round: Round,
    since: u64,
}

impl RoundKeep {
    /// The slot kept for layer `index`, and the round it was kept for.
    pub fn take(&mut self, index: usize) -> Option<(Slot, Round)> {
        let k = self.kept.remove(&index)?;
        self.shared += 1;
        Some((k.slot, k.round))
    }

    /// A micro-batch of round `visit` has run the layer in `slot` (kept until
    /// now for round `kept`, if it was): keep it for the rest of the round, or
    /// let it go back to the pool. At most `limit` slots are kept.
    pub fn visited(
        &mut self,
        index: usize,
        slot: Slot,
        kept: Option<Round>,
        visit: Round,
        limit: usize,
    ) {
        let round = match kept {
            // A straggler of an older round: the newer one still needs it.
            Some(k) if visit.id < k.id => k,
            Some(k) => k.merged(visit),
            None => visit,
        };
        if round.passed_by(visit) || self.kept.len() >= limit {
            return;
        }
        self.clock += 1;
        self.kept.insert(
            index,
            Kept {
                slot,
                round,
                since: self.clock,
            },
        );
    }

    /// Gives the slot kept longest back to the pool; false if none is kept.
    pub fn release_oldest(&mut self) -> bool {
        let Some(&index) = self
            .kept
            .iter()
            .min_by_key(|(_, k)| k.since)
            .map(|(i, _)| i)
        else {
            return false;
        };
        tracing::debug!(layer = index, "every slot kept for a round: one goes back");
        self.kept.remove(&index);
        true
    }

    /// Slots kept now.
    pub fn len(&self) -> usize {
        self.kept.len()
    }

    /// Whether no slot is kept.
    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// Visits served from a kept slot since start.
    pub fn shared_visits(&self) -> u64 {
        self.shared
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::residency::{LayerRef, Residency};
    use lime_kernels::synth::{self, Preset, StoredDtype, SynthSpec};
    use std::sync::Arc;

    fn residency(offloaded: &[usize], slots: usize) -> (tempfile::TempDir, Residency) {
        let dir = tempfile::tempdir().unwrap();
        let spec = SynthSpec::preset(Preset::Tiny, StoredDtype::BF16, 3);
        synth::synthesize(&spec, dir.path(), &mut |_, _| {}).unwrap();
        let ckpt = Arc::new(lime_kernels::Checkpoint::open(dir.path()).unwrap());
        let r = Residency::start(ckpt, &[], offloaded, slots, true, |_, _| {}).unwrap();
        (dir, r)
    }

    fn slot(r: &Residency, index: usize) -> Slot {
        match r.layer(index).unwrap().0 {
            LayerRef::Streamed(s) => s,
            LayerRef::Resident(_) => panic!("layer {index} is resident"),
        }
    }

    const R: fn(u64, u32) -> Round = |id, after| Round { id, after };

    #[test]
    fn a_layer_is_kept_until_its_rounds_last_micro_batch_has_run_it() {
        let (_dir, r) = residency(&[0, 1, 2], 3);
        let mut keep = RoundKeep::default();
        keep.visited(0, slot(&r, 0), None, R(1, 2), 2);
        // The second micro-batch finds it kept and keeps it for the third.
        let (s, kept) = keep.take(0).unwrap();
        assert_eq!(kept, R(1, 2));
        keep.visited(0, s, Some(kept), R(1, 1), 2);
        let (s, kept) = keep.take(0).unwrap();
        keep.visited(0, s, Some(kept), R(1, 0), 2);
        assert!(keep.is_empty(), "the round's last visit lets it go");
        assert_eq!(keep.shared_visits(), 2);
        // A round of one micro-batch keeps nothing.
        keep.visited(1, slot(&r, 1), None, R(2, 0), 2);
        assert!(keep.is_empty());
    }

    #[test]
    fn a_later_round_frees_what_an_unfinished_one_kept() {
        let (_dir, r) = residency(&[0, 1, 2], 3);
        let mut keep = RoundKeep::default();
        keep.visited(0, slot(&r, 0), None, R(4, 3), 2);
        let (s, kept) = keep.take(0).unwrap();
        // The rest of round 4 never came (its sequences ended): round 5 passes.
        keep.visited(0, s, Some(kept), R(5, 1), 2);
        let (s, kept) = keep.take(0).unwrap();
        assert_eq!(kept, R(5, 1), "kept on for the new round's rest");
        // A straggler of an older round does not free it for the newer.
        keep.visited(0, s, Some(kept), R(4, 0), 2);
        assert_eq!(keep.take(0).unwrap().1, R(5, 1));
    }

    #[test]
    fn one_slot_always_stays_free_to_stream_through() {
        let (_dir, r) = residency(&[0, 1, 2, 3], 3);
        let mut keep = RoundKeep::default();
        for l in 0..3 {
            keep.visited(l, slot(&r, l), None, R(1, 1), 2);
        }
        assert_eq!(keep.len(), 2, "the third went back to the pool");
        // Reading the fourth layer takes the free slot without a stall.
        let mut released = false;
        let (layer, _) = r
            .layer_or_free(3, &mut || {
                released = true;
                keep.release_oldest()
            })
            .unwrap();
        assert_eq!(layer.index(), Some(3));
        drop(layer);
        assert!(!released);
    }

    #[test]
    fn a_read_with_every_slot_kept_takes_back_the_oldest() {
        let (_dir, r) = residency(&[0, 1, 2], 2);
        let mut keep = RoundKeep::default();
        // Kept beyond the limit, as when the pool shrank under a round.
        keep.visited(0, slot(&r, 0), None, R(1, 1), 2);
        keep.visited(1, slot(&r, 1), None, R(1, 1), 2);
        let (layer, _) = r.layer_or_free(2, &mut || keep.release_oldest()).unwrap();
        assert_eq!(layer.index(), Some(2));
        assert_eq!(keep.len(), 1);
        assert!(keep.take(1).is_some(), "the newer one stays kept");
    }
}
