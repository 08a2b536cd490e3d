//! The whole model against the same layers split into ranges, each with its own
//! cache as separate stages would hold them.

use lime_kernels::{
    sampling::argmax, Checkpoint, Device, Embedding, Head, KvCache, LayerStack, MicroBatch, Model,
    Rope, SeqSpan,
};
use std::ops::Range;

pub const DECODE_STEPS: usize = 64;

/// Logits of every step (prefill, then greedy decode) from the whole model.
pub fn whole(model: &Model, prompt: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache(prompt.len() + DECODE_STEPS + 1).unwrap();
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    let mut pos = 0;
    for _ in 0..=DECODE_STEPS {
        let logits = model
            .forward(&[&input], &[pos], &mut [&mut cache])
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        pos += input.len();
        input = vec![argmax(&logits)];
        out.push(logits);
    }
    out
}

/// The same computation with the layers split into `ranges`, each range loaded on
/// its own and keeping its own cache.
pub fn split(
    ckpt: &Checkpoint,
    ranges: &[Range<usize>],
    prompt: &[u32],
    dev: &Device,
) -> Vec<Vec<f32>> {
    let cfg = ckpt.config();
    let capacity = prompt.len() + DECODE_STEPS + 1;
    let embedding = Embedding::load(ckpt, dev).unwrap();
    let head = Head::load(ckpt, dev, None).unwrap();
    let rope = Rope::new(cfg, cfg.max_context(), dev).unwrap();
    let stages: Vec<(LayerStack, KvCache)> = ranges
        .iter()
        .map(|r| {
            let stack = LayerStack::load(ckpt, r.clone(), dev, |_| {}).unwrap();
            let cache = KvCache::new(cfg, r.clone(), capacity, embedding.dtype(), dev).unwrap();
            (stack, cache)
        })
        .collect();
    let mut stages = stages;
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    let mut pos = 0;
    for _ in 0..=DECODE_STEPS {
        let spans = [SeqSpan {
            pos,
            len: input.len(),
        }];
        let batch = MicroBatch::new(cfg, &rope, &spans, dev).unwrap();
        let mut hidden = embedding.forward(&input).unwrap();
        for (stack, cache) in stages.iter_mut() {
            hidden = stack.forward(&hidden, &batch, &mut [cache]).unwrap();
        }
        let logits = head
            .forward(&hidden, &batch.last_rows())
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        pos += input.len();
        input = vec![argmax(&logits)];
        out.push(logits);
    }
    out
}

/// Cuts `0..n` at the given points.
pub fn cuts(n: usize, at: &[usize]) -> Vec<Range<usize>> {
    let mut bounds = vec![0];
    bounds.extend_from_slice(at);
    bounds.push(n);
    bounds.windows(2).map(|w| w[0]..w[1]).collect()
}

pub fn partitions(n: usize) -> Vec<Vec<Range<usize>>> {
    let mut parts = vec![
        cuts(n, &(1..n).collect::<Vec<_>>()), // every layer alone
        cuts(n, &[n / 2]),
        cuts(n, &[1]),
        cuts(n, &[n - 1]),
        cuts(n, &[1, 5]),
        cuts(n, &[2, 3, 9]),
    ];
    // A few pseudo-random uneven partitions, fixed by an LCG so failures reproduce.
    let mut state = 12345u64;
    for _ in 0..4 {
        let mut at: Vec<usize> = (1..n)
            .filter(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 33).is_multiple_of(3)
            })
            .collect();
        at.dedup();
        parts.push(cuts(n, &at));
    }
    parts
}
