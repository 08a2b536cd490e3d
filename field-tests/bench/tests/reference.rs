//! Losslessness, part two: lime's greedy output equals that of an independent
//! NumPy implementation of Llama (`field-tests/reference/llama_reference.py`),
//! and lime's tokenizer files read the same in Hugging Face's `tokenizers` and
//! transformers.
//!
//! Needs Python with numpy, tokenizers and transformers (`field-tests/test.sh`
//! sets up a virtualenv and points `LIME_PYTHON` at it). Logits agree to 5e-3
//! absolute on logits of standard deviation ~3: both sides compute in f32, but
//! NumPy's BLAS and lime's kernels sum in different orders, and a difference in
//! one position's keys carries into every later position, so differences grow
//! with context. Seen here: at most ~1e-3 after 64 steps (both sides also differ
//! from an f64 evaluation by as much); the tolerance leaves room for other CPUs'
//! BLAS kernels.
//! Greedy tokens must be equal.

use lime_kernels::synth::{self, Preset, StoredDtype, SynthSpec};
use lime_kernels::{RopeScaling, TextTokenizer};
use std::path::{Path, PathBuf};
use std::process::Command;

const TOL: f32 = 5e-3;

fn python() -> PathBuf {
    std::env::var_os("LIME_PYTHON").map_or_else(|| "python3".into(), PathBuf::from)
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../reference/llama_reference.py")
}

fn run_python(args: &[&str]) -> serde_json::Value {
    let out = Command::new(python())
        .arg(script())
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; run the tests through field-tests/test.sh",
                python().display()
            )
        });
    assert!(
        out.status.success(),
        "reference failed (run the tests through field-tests/test.sh for its Python packages): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reference output is JSON")
}

fn lime() -> Command {
    Command::new(lime_client::binaries::sibling("lime").unwrap())
}

fn compare_with_reference(name: &str, spec: &SynthSpec, steps: usize) {
    let dir = tempfile::tempdir().unwrap();
    synth::synthesize(spec, dir.path(), &mut |_, _| {}).unwrap();
    let prompt = "507,12,99,250,31,7";
    let logits_path = dir.path().join("logits.bin");
    let out = lime()
        .args(["generate", "--model"])
        .arg(dir.path())
        .args([
            "--prompt-ids",
            prompt,
            "--max-tokens",
            &steps.to_string(),
            "--print-ids",
            "--ignore-eos",
        ])
        .arg("--logits-out")
        .arg(&logits_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tokens: Vec<u32> = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect();
    let raw = std::fs::read(&logits_path).unwrap();
    let ours: Vec<f32> = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();

    let model = dir.path().to_str().unwrap();
    let reference = run_python(&[
        "--model",
        model,
        "--prompt-ids",
        prompt,
        "--max-tokens",
        &steps.to_string(),
    ]);
    let ref_tokens: Vec<u32> = serde_json::from_value(reference["tokens"].clone()).unwrap();
    let ref_logits: Vec<Vec<f32>> = serde_json::from_value(reference["logits"].clone()).unwrap();
    assert_eq!(
        tokens, ref_tokens,
        "{name}: greedy tokens differ from the reference"
    );
    let vocab = ref_logits[0].len();
    assert_eq!(ours.len(), steps * vocab);
    let worst = ours
        .chunks(vocab)
        .zip(&ref_logits)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
        .fold(0.0f32, f32::max);
    println!("{name}: {steps} greedy tokens equal, largest logit difference {worst:e}");
    assert!(
        worst <= TOL,
        "{name}: logits differ from the reference by {worst}"
    );
}

#[test]
fn tiny_f32_matches_the_reference() {
    compare_with_reference(
        "tiny f32",
        &SynthSpec::preset(Preset::Tiny, StoredDtype::F32, 1),
        64,
    );
}

#[test]
fn tiny_bf16_matches_the_reference() {
    compare_with_reference(
        "tiny bf16",
        &SynthSpec::preset(Preset::Tiny, StoredDtype::BF16, 2),
        64,
    );
}

#[test]
fn small_bf16_matches_the_reference() {
    compare_with_reference(
        "small bf16",
        &SynthSpec::preset(Preset::Small, StoredDtype::BF16, 4),
        32,
    );
}

#[test]
fn untied_biased_linear_rope_f16_matches_the_reference() {
    let spec = SynthSpec {
        tie_word_embeddings: false,
        attention_bias: true,
        rope_scaling: Some(RopeScaling::Linear { factor: 2.0 }),
        rope_theta: 10_000.0,
        num_key_value_heads: 4,
        num_hidden_layers: 5,
        ..SynthSpec::preset(Preset::Tiny, StoredDtype::F16, 3)
    };
    compare_with_reference("untied+bias+linear rope f16", &spec, 32);
}

#[test]
fn hugging_face_tokenizers_read_our_tokenizer_the_same() {
    let dir = tempfile::tempdir().unwrap();
    synth::synthesize(
        &SynthSpec::preset(Preset::Tiny, StoredDtype::F32, 0),
        dir.path(),
        &mut |_, _| {},
    )
    .unwrap();
    let texts = [
        "Hello robot, the battery is at 42%.",
        "ロボットは倉庫を走り 🤖 crème brûlée",
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    ];
    let tok = TextTokenizer::from_path(dir.path()).unwrap();
    let ours: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t, true).unwrap()).collect();
    let mut args = vec!["--model", dir.path().to_str().unwrap(), "--tokenize"];
    args.extend(texts);
    let theirs = run_python(&args);
    let via_tokenizers: Vec<Vec<u32>> =
        serde_json::from_value(theirs["tokenizers"].clone()).unwrap();
    assert_eq!(ours, via_tokenizers, "the tokenizers package");
    let via_transformers: Vec<Vec<u32>> = serde_json::from_value(theirs["transformers"].clone())
        .expect("transformers is installed (field-tests/requirements.txt)");
    assert_eq!(ours, via_transformers, "transformers' AutoTokenizer");
}
