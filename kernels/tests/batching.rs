//! Batched decoding, chunked prefill and the KV cache against their unbatched,
//! one-pass and recomputed equivalents, all bit for bit.
//!
//! A sequence gets the same bits alone or in any micro-batch, and a prompt the same
//! bits whether prefilled at once, in chunks or token by token: every projection is
//! computed per row with a fixed summation order (kernels/src/rowwise.rs), and
//! attention per query with a fixed order over keys (kernels/src/causal_attention.rs).
//! So a KV cache rebuilt by recomputation equals the one built while decoding.

mod common;

use common::{bits, cache, max_abs_diff, prompt, Fixture};

use lime_kernels::sampling::argmax;
use lime_kernels::synth::{Preset, StoredDtype, SynthSpec};
use lime_kernels::{KvCache, Model};

fn logits_of(
    model: &Model,
    tokens: &[&[u32]],
    pos: &[usize],
    caches: &mut [&mut KvCache],
) -> Vec<Vec<f32>> {
    model
        .forward(tokens, pos, caches)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

/// Decodes `steps` tokens for one sequence alone; returns each step's logits.
fn alone(model: &Model, p: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let mut c = cache(model, p.len() + steps + 1);
    let mut out = Vec::new();
    let mut input = p.to_vec();
    let mut pos = 0;
    for _ in 0..steps {
        let l = logits_of(model, &[&input], &[pos], &mut [&mut c]).remove(0);
        pos += input.len();
        input = vec![argmax(&l)];
        out.push(l);
    }
    out
}

#[test]
#[allow(clippy::needless_range_loop)] // `step` indexes every sequence's expectations
fn batched_decode_matches_each_sequence_alone() {
    let fx = Fixture::tiny(StoredDtype::F32);
    let (_, model) = fx.model();
    let vocab = model.config().vocab_size;
    let steps = 32;
    let prompts: Vec<Vec<u32>> = [3, 7, 12, 20]
        .iter()
        .enumerate()
        .map(|(i, &n)| prompt(n, vocab, i))
        .collect();
    let expected: Vec<Vec<Vec<f32>>> = prompts.iter().map(|p| alone(&model, p, steps)).collect();

    // Prefill the sequences in one mixed micro-batch, then decode them together,
    // each at its own position.
    let mut caches: Vec<KvCache> = prompts
        .iter()
        .map(|p| cache(&model, p.len() + steps + 1))
        .collect();
    let mut inputs: Vec<Vec<u32>> = prompts.clone();
    let mut pos = vec![0; prompts.len()];
    for step in 0..steps {
        let tokens: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        let got = logits_of(&model, &tokens, &pos, &mut refs);
        for (s, l) in got.iter().enumerate() {
            assert!(
                bits(l) == bits(&expected[s][step]),
                "sequence {s} step {step}: batched logits differ from the sequence alone by {}",
                max_abs_diff(l, &expected[s][step])
            );
            pos[s] += inputs[s].len();
            inputs[s] = vec![argmax(l)];
        }
    }
}

#[test]
fn a_prefill_can_join_a_decoding_batch() {
    let fx = Fixture::tiny(StoredDtype::F32);
    let (_, model) = fx.model();
    let vocab = model.config().vocab_size;
    let (a, b) = (prompt(9, vocab, 1), prompt(14, vocab, 2));
    let expected_a = alone(&model, &a, 6);
    let expected_b = alone(&model, &b, 2);
    let mut ca = cache(&model, 32);
    let mut cb = cache(&model, 32);
    // Sequence a decodes for a few steps on its own...
    let mut input = a.clone();
    let mut pos = 0;
    for expected in &expected_a[..4] {
        let l = logits_of(&model, &[&input], &[pos], &mut [&mut ca]).remove(0);
        assert!(bits(&l) == bits(expected));
        pos += input.len();
        input = vec![argmax(&l)];
    }
    // ...then b's whole prompt arrives in the same micro-batch as a's next token.
    let got = logits_of(&model, &[&input, &b], &[pos, 0], &mut [&mut ca, &mut cb]);
    assert!(bits(&got[0]) == bits(&expected_a[4]));
    assert!(bits(&got[1]) == bits(&expected_b[0]));
}

#[test]
fn cached_decode_matches_recomputation_without_cache() {
    let fx = Fixture::tiny(StoredDtype::F32);
    let (_, model) = fx.model();
    let p = prompt(5, model.config().vocab_size, 3);
    let steps = 40;
    let cached = alone(&model, &p, steps);
    let mut seq = p.clone();
    for (step, expected) in cached.iter().enumerate() {
        // A fresh cache every time: the whole sequence so far, recomputed.
        let mut c = cache(&model, seq.len());
        let l = logits_of(&model, &[&seq], &[0], &mut [&mut c]).remove(0);
        assert!(
            bits(&l) == bits(expected),
            "step {step}: cached logits differ from recomputation by {}",
            max_abs_diff(&l, expected)
        );
        seq.push(argmax(expected));
    }
}

#[test]
fn a_prompt_prefilled_in_chunks_equals_one_pass() {
    let fx = Fixture::tiny(StoredDtype::BF16);
    let (_, model) = fx.model();
    let p = prompt(23, model.config().vocab_size, 4);
    let mut whole = cache(&model, p.len());
    let expected = logits_of(&model, &[&p], &[0], &mut [&mut whole]).remove(0);
    for chunk in [1, 2, 5, 8, 22] {
        let mut c = cache(&model, p.len());
        let mut last = Vec::new();
        for (i, piece) in p.chunks(chunk).enumerate() {
            last = logits_of(&model, &[piece], &[i * chunk], &mut [&mut c]).remove(0);
        }
        assert!(bits(&last) == bits(&expected), "chunks of {chunk}");
    }
}

#[test]
fn cache_misuse_is_an_error_not_a_panic() {
    let fx = Fixture::tiny(StoredDtype::F32);
    let (_, model) = fx.model();
    let mut c = cache(&model, 4);
    // Continuing at the wrong position.
    let e = model
        .forward(&[&[1, 2]], &[3], &mut [&mut c])
        .unwrap_err()
        .to_string();
    assert!(e.contains("position 3"), "{e}");
    // Overflowing the capacity.
    let e = model
        .forward(&[&[1, 2, 3, 4, 5]], &[0], &mut [&mut c])
        .unwrap_err()
        .to_string();
    assert!(e.contains("capacity"), "{e}");
    // Out-of-vocabulary ids.
    let e = model
        .forward(&[&[u32::MAX]], &[0], &mut [&mut c])
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
}

#[test]
fn random_weights_give_finite_varied_output_over_512_tokens() {
    for (preset, dtype) in [
        (Preset::Tiny, StoredDtype::F32),
        (Preset::Tiny, StoredDtype::BF16),
        (Preset::Small, StoredDtype::F32),
    ] {
        let fx = Fixture::new(&SynthSpec::preset(preset, dtype, 7));
        let (_, model) = fx.model();
        let p = prompt(4, model.config().vocab_size, 9);
        let logits = alone(&model, &p, 512);
        assert!(
            logits.iter().flatten().all(|x| x.is_finite()),
            "{preset:?} {dtype:?}: non-finite logits"
        );
        let tokens: Vec<u32> = logits.iter().map(|l| argmax(l)).collect();
        let distinct: std::collections::BTreeSet<_> = tokens.iter().collect();
        let longest_run = tokens
            .chunk_by(|a, b| a == b)
            .map(<[u32]>::len)
            .max()
            .unwrap_or(0);
        assert!(
            distinct.len() >= 64,
            "{preset:?} {dtype:?}: only {} distinct tokens",
            distinct.len()
        );
        assert!(
            longest_run <= 32,
            "{preset:?} {dtype:?}: one token repeated {longest_run} times"
        );
        let spread = |l: &Vec<f32>| {
            let m = l.iter().sum::<f32>() / l.len() as f32;
            (l.iter().map(|x| (x - m).powi(2)).sum::<f32>() / l.len() as f32).sqrt()
        };
        assert!(
            logits.iter().all(|l| spread(l) > 0.5),
            "{preset:?} {dtype:?}: flat logits"
        );
    }
}
