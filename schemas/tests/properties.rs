//! Properties of the payloads strangers can send, over thousands of generated
//! inputs (seeded, so a failure repeats): every frame round-trips through its
//! encoding, and no mutation of an encoding or of a request makes decoding or
//! checking panic. (`field-tests/fuzz.sh` explores the same code with
//! libFuzzer.)

use lime_schemas::frame::{ActivationDtype, Activations, Frame, Hello, KvRoom, SeqSlot};
use lime_schemas::request::Stop;
use lime_schemas::Request;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn text(rng: &mut ChaCha8Rng, max: usize) -> String {
    let alphabet = [
        'a', 'Z', '0', ' ', '"', '\\', '\n', 'é', '速', '🤖', '{', '/',
    ];
    let n = rng.random_range(0..=max);
    (0..n)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())])
        .collect()
}

fn bytes(rng: &mut ChaCha8Rng, max: usize) -> Vec<u8> {
    let mut v = vec![0u8; rng.random_range(0..=max)];
    rng.fill_bytes(&mut v);
    v
}

fn frame(rng: &mut ChaCha8Rng) -> Frame {
    let ids = |rng: &mut ChaCha8Rng| -> Vec<u64> {
        (0..rng.random_range(0..6)).map(|_| rng.random()).collect()
    };
    match rng.random_range(0..9) {
        0 => Frame::Hello(Hello {
            proof: rng.random_bool(0.5).then(|| rng.random()),
            ..Hello::new(rng.random(), &text(rng, 12), rng.random())
        }),
        1 => Frame::Proof { mac: rng.random() },
        2 => Frame::Activations(Activations {
            batches: ids(rng),
            chunk: rng.random(),
            seqs: (0..rng.random_range(0..5))
                .map(|_| SeqSlot {
                    id: rng.random(),
                    pos: rng.random(),
                    len: rng.random(),
                    capacity: rng.random(),
                })
                .collect(),
            dtype: [
                ActivationDtype::F32,
                ActivationDtype::F16,
                ActivationDtype::Bf16,
            ][rng.random_range(0..3)],
            data: bytes(rng, 256),
            round: lime_schemas::frame::Round {
                id: rng.random(),
                after: rng.random(),
            },
        }),
        3 => Frame::Release { seqs: ids(rng) },
        4 => Frame::Failed {
            seqs: ids(rng),
            batches: ids(rng),
            message: text(rng, 40),
        },
        5 => Frame::Ping {
            nonce: rng.random(),
            rooms: (0..rng.random_range(0..4))
                .map(|_| KvRoom {
                    stage: text(rng, 8),
                    bytes: rng.random_bool(0.5).then(|| rng.random()),
                    bytes_per_token: rng.random(),
                })
                .collect(),
        },
        6 => Frame::Probe {
            nonce: rng.random(),
            padding: bytes(rng, 512),
        },
        7 => Frame::Ack {
            nonce: rng.random(),
            bytes: rng.random(),
            receive_us: rng.random(),
        },
        _ => Frame::Switch {
            plan: text(rng, 64),
        },
    }
}

/// Flips, truncates, extends or splices `v`.
fn mutate(rng: &mut ChaCha8Rng, mut v: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.random_range(1..4) {
        match rng.random_range(0..4) {
            0 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 => v.truncate(rng.random_range(0..=v.len())),
            2 => v.extend(bytes(rng, 16)),
            _ if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] = [0x00, 0xff, 0x7f, 0x80, b'"', b'{', b'}', b'9'][rng.random_range(0..8)];
            }
            _ => {}
        }
    }
    v
}

#[test]
fn every_frame_round_trips_and_no_mutation_of_one_panics() {
    let mut rng = ChaCha8Rng::seed_from_u64(20261121);
    for _ in 0..20_000 {
        let f = frame(&mut rng);
        let encoded = f.encode().unwrap();
        let len = Frame::body_len(encoded[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, encoded.len() - 4);
        assert_eq!(Frame::decode(&encoded[4..]).unwrap(), f);
        let mutated = mutate(&mut rng, encoded[4..].to_vec());
        if let Ok(Frame::Activations(a)) = Frame::decode(&mutated) {
            for (hidden, context) in [(64, 2048), (8192, 131_072), (usize::MAX, usize::MAX)] {
                let _ = a.check(hidden, context);
            }
        }
    }
}

#[test]
fn valid_requests_round_trip_and_no_mutation_of_one_panics() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut valid = 0;
    for _ in 0..20_000 {
        let r = Request {
            id: rng.random_bool(0.7).then(|| text(&mut rng, 10)),
            prompt: Some(text(&mut rng, 40)),
            max_tokens: rng.random_bool(0.8).then(|| rng.random_range(0..5000)),
            temperature: rng.random_bool(0.5).then(|| rng.random_range(-1.0..3.0)),
            top_p: rng.random_bool(0.5).then(|| rng.random_range(-0.5..1.5)),
            top_k: rng.random_bool(0.3).then(|| rng.random_range(0..100)),
            seed: rng.random_bool(0.5).then(|| rng.random()),
            stop: match rng.random_range(0..3) {
                0 => None,
                1 => Some(Stop::One(text(&mut rng, 5))),
                _ => Some(Stop::Many(
                    (0..rng.random_range(0..3))
                        .map(|_| text(&mut rng, 5))
                        .collect(),
                )),
            },
            ignore_eos: rng.random(),
            return_token_ids: rng.random(),
            return_logits: rng.random(),
            ..Default::default()
        };
        let json = serde_json::to_vec(&r).unwrap();
        let parsed = Request::parse(&json).unwrap();
        if parsed.validate().is_ok() {
            valid += 1;
            assert_eq!(parsed, r);
            let _ = parsed.sampling();
        }
        // Whatever a mutation leaves, the parser answers with a reason.
        if let Err(e) = Request::parse(&mutate(&mut rng, json)) {
            assert!(!e.to_string().is_empty());
        }
    }
    assert!(valid > 1_000, "only {valid} valid requests generated");
}
