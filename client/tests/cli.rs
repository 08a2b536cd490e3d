//! The `lime` binary as a user runs it: synth, generate, and its errors.

use std::path::Path;
use std::process::{Command, Output};

fn lime(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lime"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "lime failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn synth(dir: &Path, extra: &[&str]) {
    let mut args = vec!["synth", "--out", dir.to_str().unwrap()];
    args.extend(extra);
    ok(&lime(&args));
}

#[test]
fn separate_processes_synthesise_identical_checkpoints() {
    // Hash maps are seeded per process, so determinism must hold across processes.
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    synth(
        a.path(),
        &["--preset", "tiny", "--dtype", "f16", "--seed", "5"],
    );
    synth(
        b.path(),
        &["--preset", "tiny", "--dtype", "f16", "--seed", "5"],
    );
    let mut names: Vec<_> = std::fs::read_dir(a.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert!(names.len() >= 7);
    for name in names {
        let (x, y) = (
            std::fs::read(a.path().join(&name)).unwrap(),
            std::fs::read(b.path().join(&name)).unwrap(),
        );
        assert!(x == y, "{name:?} differs");
    }
}

#[test]
fn generate_streams_text_and_sampling_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), &[]);
    let model = dir.path().to_str().unwrap();
    let text = ok(&lime(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "Hello robot",
        "--max-tokens",
        "20",
        "--ignore-eos",
    ]));
    assert!(!text.trim().is_empty());
    let out = lime(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "Hello robot",
        "--max-tokens",
        "3",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("loading"),
        "progress is shown while loading"
    );

    let sample = |seed: &str| {
        ok(&lime(&[
            "generate",
            "--model",
            model,
            "--prompt",
            "Hello robot",
            "--max-tokens",
            "40",
            "--ignore-eos",
            "--print-ids",
            "--temperature",
            "0.9",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--seed",
            seed,
        ]))
    };
    assert_eq!(sample("1"), sample("1"));
    assert_ne!(sample("1"), sample("2"));
    let greedy = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--model",
            model,
            "--prompt-ids",
            "5,6,7",
            "--max-tokens",
            "12",
            "--print-ids",
            "--ignore-eos",
        ];
        a.extend(extra);
        ok(&lime(&a))
    };
    assert_eq!(greedy(&[]).split_whitespace().count(), 12);
    // Ids in and out work without a tokenizer.
    let ids = greedy(&[]);
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    assert_eq!(greedy(&[]), ids);
    assert_ne!(ids, greedy(&["--repetition-penalty", "3.0"]));
}

#[test]
fn bad_input_gets_a_clear_error_and_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), &[]);
    let model = dir.path().to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["generate", "--model", "/nonexistent/model", "--prompt", "x"],
            "/nonexistent/model/config.json",
        ),
        (
            &["generate", "--model", model, "--prompt-ids", "999999"],
            "outside the vocabulary",
        ),
        (
            &[
                "generate",
                "--model",
                model,
                "--prompt",
                "x",
                "--max-tokens",
                "100000",
            ],
            "exceeds the model's context",
        ),
        (
            &[
                "generate",
                "--model",
                model,
                "--prompt",
                "x",
                "--temperature=-1",
            ],
            "temperature",
        ),
        (
            &[
                "generate", "--model", model, "--prompt", "x", "--top-p", "0",
            ],
            "top_p",
        ),
        (&["generate", "--model", model], "--prompt"),
        (
            &["synth", "--preset", "huge", "--out", model],
            "unknown preset",
        ),
    ];
    for (args, expected) in cases {
        let out = lime(args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(expected),
            "{args:?}: `{err}` should mention `{expected}`"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

#[test]
fn device_bench_runs_on_the_cpu_and_reports_its_measurements() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), &["--dtype", "bf16"]);
    let model = dir.path().to_str().unwrap();
    let out = ok(&lime(&[
        "bench", "device", "--model", model, "--device", "cpu", "--steps", "4", "--json",
    ]));
    let json = &out[out.find("\n{").expect("a JSON report") + 1..];
    let report: serde_json::Value = serde_json::from_str(json).unwrap();
    // The tiny preset has 12 layers; half are streamed.
    assert_eq!(report["offloaded_layers"], 6);
    assert_eq!(report["dtype"], "F32", "the CPU widens bf16 exactly to f32");
    for key in [
        "resident_tokens_per_s",
        "offloaded_tokens_per_s",
        "roofline_tokens_per_s",
        "offloaded_read_gb_s",
    ] {
        let v = report[key].as_f64().unwrap();
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    }
    let bubbles = report["bubble_share"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&bubbles), "bubble share {bubbles}");
    assert!(report["gpu"].is_null());
    #[cfg(not(feature = "cuda"))]
    {
        let gpu = lime(&["bench", "device", "--model", model, "--device", "cuda:0"]);
        assert!(!gpu.status.success());
        let err = String::from_utf8_lossy(&gpu.stderr);
        assert!(err.contains("--features cuda"), "{err}");
    }
    let bad = lime(&["bench", "device", "--model", model, "--device", "tpu"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cuda:N"));
}
