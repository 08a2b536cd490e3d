//! A cluster of real processes (lime-broker, lime-stage ×N) on loopback answers
//! exactly as the single-process reference does, for every partition.

mod common;

use common::{ask, assert_answers, assert_identical, runtime, up, varied_requests, Reference};
use lime_testbench::cluster::ClusterSpec;
use std::time::Duration;

/// Partitions of the tiny model's 12 layers: (stages, interleave, cuts).
const PARTITIONS: &[(usize, usize, Option<&[usize]>)] = &[
    (1, 1, None),
    (1, 3, None),
    (2, 1, Some(&[5])),
    (2, 1, Some(&[11])),
    (2, 2, None),
    (3, 1, Some(&[1, 7])),
    (3, 2, None),
    (4, 1, Some(&[2, 3, 11])),
    (4, 1, None),
    (4, 2, Some(&[1, 2, 3, 5, 6, 8, 9])),
];

#[test]
fn every_partition_answers_bit_identically() {
    let reference = Reference::tiny();
    let requests = varied_requests(16);
    let rt = runtime();
    for (i, &(stages, interleave, cuts)) in PARTITIONS.iter().enumerate() {
        let what = format!("{stages} stages, v={interleave}, cuts {cuts:?}");
        let work = tempfile::tempdir().unwrap();
        let mut spec = ClusterSpec::new(reference.path(), stages, work.path());
        spec.interleave = interleave;
        spec.cuts = cuts.map(<[usize]>::to_vec);
        // Alternate how the plan reaches the stages.
        spec.plan_over_mqtt = i % 2 == 1;
        rt.block_on(async {
            let cluster = up(&spec).await;
            // One alone, then sixteen at once.
            let one = ask(&cluster.broker, &requests[3..4]).await;
            let f = one[0].outcome.as_ref().expect("answer");
            assert_identical(&reference, &requests[3], f, &what);
            let answers = ask(&cluster.broker, &requests).await;
            assert_answers(&reference, &requests, &answers, &what);
        });
    }
}

#[test]
fn chunked_prefill_and_small_micro_batches_change_no_bits() {
    let reference = Reference::tiny();
    let mut requests = varied_requests(12);
    // A prompt far longer than the token budget of a micro-batch.
    requests[0].prompt = Some("Robot arm stop obstacle ahead. ".repeat(12));
    let work = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(reference.path(), 3, work.path());
    spec.max_inflight = 2;
    spec.stage_env = vec![
        ("LIME_STAGE_STARTER__MAX_BATCH_TOKENS".into(), "5".into()),
        ("LIME_STAGE_STARTER__MAX_SEQUENCES".into(), "5".into()),
    ];
    runtime().block_on(async {
        let cluster = up(&spec).await;
        let answers = ask(&cluster.broker, &requests).await;
        assert_answers(
            &reference,
            &requests,
            &answers,
            "budget 5 tokens, 5 sequences",
        );
        // Finished sequences free their caches on every stage (status refreshes
        // memory at most every 2 s).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let statuses =
                lime_client::status::collect(&cluster.broker, Duration::from_millis(200))
                    .await
                    .unwrap();
            let held: Vec<(String, u64, u32)> = statuses
                .iter()
                .filter_map(|s| {
                    s.memory
                        .as_ref()
                        .map(|m| (s.stage.clone(), m.kv_bytes, m.sequences))
                })
                .filter(|(_, kv, n)| *kv > 0 || *n > 0)
                .collect();
            if held.is_empty() && statuses.len() == 3 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "caches still held: {held:?}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
}

#[test]
fn answers_match_the_lime_generate_command() {
    let reference = Reference::tiny();
    let work = tempfile::tempdir().unwrap();
    let logits_path = work.path().join("logits.bin");
    let prompt = "Robot, describe the obstacle ahead.";
    let out = std::process::Command::new(lime_client::binaries::sibling("lime").unwrap())
        .args(["generate", "--model"])
        .arg(reference.path())
        .args([
            "--prompt",
            prompt,
            "--max-tokens",
            "20",
            "--print-ids",
            "--logits-out",
        ])
        .arg(&logits_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<u32> = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect();
    let bytes = std::fs::read(&logits_path).unwrap();
    let vocab = reference.model.config().vocab_size;
    let last: Vec<u32> = bytes[bytes.len() - 4 * vocab..]
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let mut spec = ClusterSpec::new(reference.path(), 3, work.path().join("cluster"));
    spec.interleave = 2;
    let request = lime_schemas::Request {
        prompt: Some(prompt.into()),
        max_tokens: Some(20),
        return_token_ids: true,
        return_logits: true,
        ..Default::default()
    };
    runtime().block_on(async {
        let cluster = up(&spec).await;
        let a = ask(&cluster.broker, &[request]).await;
        let f = a[0].outcome.as_ref().unwrap();
        assert_eq!(f.token_ids.as_ref().unwrap(), &ids);
        let got: Vec<u32> = f
            .logits
            .as_ref()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(got, last);
        // The streamed text is the reference's text.
        assert_eq!(a[0].text, reference.tokenizer.decode(&ids).unwrap());
    });
}
