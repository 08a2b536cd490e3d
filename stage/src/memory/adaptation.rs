//! Local memory adaptation: which resident layer to stream when KV caches need its
//! room, and which streamed layer to keep when memory frees.
//!
//! A streamed layer's read overlaps whatever the ring computes between the stage's
//! previous streamed layer and it, so its read window is that many model layers
//! (on any stage; the wrap-around includes the other stages, the head and
//! sampling). A stage visits its layers in increasing index order, chunk after
//! chunk, so windows are distances in layer index, modulo the model's depth.

/// Model layers from just after `from` up to `to`, going round the ring; a layer
/// alone on its stage waits a whole pass.
fn window(from: usize, to: usize, depth: usize) -> usize {
    match (to + depth - from) % depth {
        0 => depth,
        d => d,
    }
}

/// The shortest read window among `streamed` (sorted): how well the worst hidden
/// of them is hidden. `None` when nothing is streamed.
fn shortest_window(streamed: &[usize], depth: usize) -> Option<usize> {
    let last = *streamed.last()?;
    let mut prev = last;
    let mut shortest = usize::MAX;
    for &s in streamed {
        shortest = shortest.min(window(prev, s, depth));
        prev = s;
    }
    Some(shortest)
}

fn with(streamed: &[usize], layer: usize) -> Vec<usize> {
    let mut v = streamed.to_vec();
    v.push(layer);
    v.sort_unstable();
    v
}

/// The resident layer to stream next: the one after which the worst hidden read
/// is hidden best (it splits the longest window most evenly). Ties go to the
/// earliest layer.
pub fn to_evict(resident: &[usize], streamed: &[usize], depth: usize) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for &r in resident {
        let score = shortest_window(&with(streamed, r), depth).unwrap_or(depth);
        if best.is_none_or(|(s, l)| score > s || (score == s && r < l)) {
            best = Some((score, r));
        }
    }
    best.map(|(_, l)| l)
}

/// The streamed layer to keep resident when memory frees: the one whose return
/// leaves the worst hidden of the others hidden best. Ties go to the earliest.
pub fn to_restore(streamed: &[usize], depth: usize) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for &o in streamed {
        let rest: Vec<usize> = streamed.iter().copied().filter(|&s| s != o).collect();
        let score = shortest_window(&rest, depth).unwrap_or(usize::MAX);
        if best.is_none_or(|(s, l)| score > s || (score == s && o < l)) {
            best = Some((score, o));
        }
    }
    best.map(|(_, l)| l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_layer_streamed_is_the_stages_first() {
        // Chunks 4..8 and 12..16 of a 16-layer model: every layer alone would
        // wait a whole pass; the earliest wins the tie.
        let resident = [4, 5, 6, 7, 12, 13, 14, 15];
        assert_eq!(to_evict(&resident, &[], 16), Some(4));
    }

    #[test]
    fn evictions_split_the_longest_window() {
        let resident = [5, 6, 7, 12, 13, 14, 15];
        // With 4 streamed, 12 splits the pass into 8 and 8.
        assert_eq!(to_evict(&resident, &[4], 16), Some(12));
        // Then windows are 4→12 and 12→4 (8 each): 7 and 15 leave a shortest
        // window of 3, the others less; the earliest of the best is 7.
        assert_eq!(to_evict(&[5, 6, 7, 13, 14, 15], &[4, 12], 16), Some(7));
        assert_eq!(to_evict(&[], &[4, 12], 16), None);
    }

    #[test]
    fn the_worst_hidden_layer_comes_back_first() {
        // 4→5 is a window of 1 layer: keeping 5 leaves windows of 8 and 8,
        // keeping 4 leaves 9 and 7.
        assert_eq!(to_restore(&[4, 5, 12], 16), Some(5));
        assert_eq!(to_restore(&[7], 16), Some(7));
        assert_eq!(to_restore(&[], 16), None);
    }

    #[test]
    fn evicting_then_restoring_returns_to_the_start() {
        let all: Vec<usize> = (0..8).collect();
        let mut streamed = Vec::new();
        let mut resident = all.clone();
        let mut order = Vec::new();
        while let Some(l) = to_evict(&resident, &streamed, 8) {
            resident.retain(|&r| r != l);
            streamed.push(l);
            streamed.sort_unstable();
            order.push(l);
        }
        assert_eq!(order.len(), 8);
        assert_eq!(&order[..2], &[0, 4]);
        while let Some(l) = to_restore(&streamed, 8) {
            streamed.retain(|&s| s != l);
        }
        assert!(streamed.is_empty());
    }
}
