//! Synthetic checkpoints: deterministic, real Hugging Face layout, and a tokenizer
//! whose streaming decode never splits a character.

mod common;

use common::Fixture;
use lime_kernels::synth::{self, tokenizer, Preset, StoredDtype, SynthSpec};
use lime_kernels::TextTokenizer;
use std::collections::BTreeMap;
use std::path::Path;

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn the_same_seed_writes_the_same_bytes() {
    let spec = SynthSpec::preset(Preset::Tiny, StoredDtype::BF16, 42);
    let (a, b) = (Fixture::new(&spec), Fixture::new(&spec));
    let (fa, fb) = (files(a.path()), files(b.path()));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (name, bytes) in &fa {
        assert!(
            bytes == &fb[name],
            "{name} differs between two syntheses with one seed"
        );
    }
    let other = Fixture::new(&SynthSpec { seed: 43, ..spec });
    let fo = files(other.path());
    assert_eq!(fa["tokenizer.json"], fo["tokenizer.json"]);
    assert_ne!(
        fa["model-00001-of-00002.safetensors"],
        fo["model-00001-of-00002.safetensors"]
    );
}

#[test]
fn the_layout_is_hugging_faces() {
    let fx = Fixture::tiny(StoredDtype::F16);
    let names: Vec<String> = files(fx.path()).into_keys().collect();
    for expected in [
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    let shards = names.iter().filter(|n| n.ends_with(".safetensors")).count();
    assert!(shards >= 2, "the tiny preset is sharded ({shards} shards)");
    let cfg = fx.open().config().clone();
    assert_eq!(cfg.torch_dtype.as_deref(), Some("float16"));
    let tok = TextTokenizer::from_path(fx.path()).unwrap();
    assert_eq!(tok.vocab_size(), cfg.vocab_size);
    assert_eq!(cfg.bos_token_id, tok.token_id(tokenizer::BOS));
    assert_eq!(
        cfg.eos_token_ids,
        vec![
            tok.token_id(tokenizer::EOS).unwrap(),
            tok.token_id(tokenizer::EOT).unwrap()
        ]
    );
}

#[test]
fn presets_have_their_advertised_sizes() {
    // Sizes follow from the shapes alone; nothing is written.
    let f32_bytes = |p| {
        let s = SynthSpec::preset(p, StoredDtype::F32, 0);
        let (h, i, l, v) = (
            s.hidden_size,
            s.intermediate_size,
            s.num_hidden_layers,
            s.vocab_size,
        );
        let kv = h / s.num_attention_heads * s.num_key_value_heads;
        let layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h;
        let emb = if s.tie_word_embeddings {
            v * h
        } else {
            2 * v * h
        };
        (l * layer + emb + h) * 4
    };
    let mb = |b: usize| b as f64 / 1e6;
    assert!(
        (1.0..8.0).contains(&mb(f32_bytes(Preset::Tiny))),
        "tiny {}",
        mb(f32_bytes(Preset::Tiny))
    );
    assert!(
        (80.0..130.0).contains(&mb(f32_bytes(Preset::Small))),
        "small {}",
        mb(f32_bytes(Preset::Small))
    );
    assert!(
        (500.0..1000.0).contains(&mb(f32_bytes(Preset::Bench))),
        "bench {}",
        mb(f32_bytes(Preset::Bench))
    );
}

const TEXTS: &[&str] = &[
    "The robot rolled across the warehouse floor.",
    "ロボットは倉庫を走り、パレットを数えて次の指示を待っています。",
    "Emoji: 🤖 ready, 🔋 low, ⚠️ obstacle; maths: α ≤ β ≠ ∞",
    "crème brûlée, naïve jalapeño — Робот ждёт команды 机器人",
];

#[test]
fn text_round_trips_and_specials_are_single_tokens() {
    let tok = synth::tokenizer::train(512).unwrap();
    let dir = tempfile::tempdir().unwrap();
    synth::tokenizer::save(&tok, &dir.path().join("tokenizer.json")).unwrap();
    let tok = TextTokenizer::from_path(dir.path()).unwrap();
    for text in TEXTS {
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(
            ids[0],
            tok.token_id(tokenizer::BOS).unwrap(),
            "BOS is added"
        );
        assert_eq!(tok.decode(&ids).unwrap(), *text);
    }
    let ids = tok
        .encode("<|start_header_id|>user<|end_header_id|>", false)
        .unwrap();
    assert_eq!(
        ids[0],
        tok.token_id("<|start_header_id|>").unwrap(),
        "{ids:?}"
    );
    assert_eq!(
        ids[ids.len() - 1],
        tok.token_id("<|end_header_id|>").unwrap(),
        "{ids:?}"
    );
    // Merges were learned: common English costs fewer tokens than bytes.
    let english = TEXTS[0];
    let n = tok.encode(english, false).unwrap().len();
    assert!(
        n * 3 < english.len() * 2,
        "{n} tokens for {} bytes",
        english.len()
    );
}

#[test]
fn streaming_never_splits_a_character() {
    let fx = Fixture::tiny(StoredDtype::F32);
    let tok = TextTokenizer::from_path(fx.path()).unwrap();
    let mut split_somewhere = false;
    for text in TEXTS {
        let ids = tok.encode(text, false).unwrap();
        let mut stream = tok.stream();
        let mut out = String::new();
        for &id in &ids {
            match stream.step(id).unwrap() {
                Some(piece) => {
                    assert!(
                        !piece.contains('\u{fffd}'),
                        "a partial character was emitted: {piece:?}"
                    );
                    out.push_str(&piece);
                }
                None => split_somewhere = true,
            }
        }
        assert_eq!(stream.finish().unwrap(), None);
        assert_eq!(out, *text);
    }
    assert!(
        split_somewhere,
        "some token ends inside a character, so holding back was exercised"
    );
}

#[test]
fn a_stream_of_arbitrary_tokens_adds_up_to_the_whole_decode() {
    let fx = Fixture::tiny(StoredDtype::F32);
    let tok = TextTokenizer::from_path(fx.path()).unwrap();
    let vocab = tok.vocab_size() as u32;
    // Byte tokens in any order can leave a character incomplete at the end.
    let ids: Vec<u32> = (0..300u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let mut stream = tok.stream();
    let mut out = String::new();
    for &id in &ids {
        if let Some(piece) = stream.step(id).unwrap() {
            out.push_str(&piece);
        }
    }
    if let Some(rest) = stream.finish().unwrap() {
        out.push_str(&rest);
    }
    assert_eq!(out, tok.decode(&ids).unwrap());
}
