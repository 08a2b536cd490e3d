//! Shared pieces of the cluster tests: synthetic models, the single-process
//! reference answers, and clusters of real lime processes on loopback.
#![allow(dead_code)]

pub mod mosquitto;

use lime_kernels::synth::{self, Preset, StoredDtype, SynthSpec};
use lime_kernels::{Checkpoint, Device, GenerateRequest, Model, TextTokenizer};
use lime_schemas::{Final, Request};
use lime_testbench::cluster::{Cluster, ClusterSpec};
use std::ops::ControlFlow;
use std::path::Path;
use std::time::Duration;
use tempfile::TempDir;

/// The tiny preset in a temporary directory, with its single-process model.
pub struct Reference {
    pub dir: TempDir,
    pub model: Model,
    pub tokenizer: TextTokenizer,
    pub eos: Vec<u32>,
}

impl Reference {
    pub fn tiny() -> Self {
        Self::synthesized(&SynthSpec::preset(Preset::Tiny, StoredDtype::F32, 11))
    }

    /// Any synthetic model, loaded whole in this process.
    pub fn synthesized(spec: &SynthSpec) -> Self {
        Self::synthesized_on(spec, &Device::Cpu)
    }

    /// Any synthetic model, loaded whole in this process on `device`.
    pub fn synthesized_on(spec: &SynthSpec, device: &Device) -> Self {
        let dir = tempfile::tempdir().unwrap();
        synth::synthesize(spec, dir.path(), &mut |_, _| {}).unwrap();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let model = Model::load(&ckpt, device, |_, _| {}).unwrap();
        let tokenizer = TextTokenizer::from_path(dir.path()).unwrap();
        let eos = ckpt.eos_token_ids().unwrap();
        Self {
            dir,
            model,
            tokenizer,
            eos,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// What `lime generate` produces for a prompt request: tokens and the logits of
    /// the last step.
    pub fn answer(&self, r: &Request) -> (Vec<u32>, Vec<f32>) {
        let prompt = self
            .tokenizer
            .encode(r.prompt.as_deref().unwrap(), true)
            .unwrap();
        let req = GenerateRequest {
            prompt: &prompt,
            max_tokens: r.max_tokens.unwrap() as usize,
            sampling: r.sampling().unwrap(),
            stop_tokens: if r.ignore_eos {
                Vec::new()
            } else {
                self.eos.clone()
            },
        };
        let mut last = Vec::new();
        let g = lime_kernels::generate(&self.model, &req, |_, logits| {
            last = logits.to_vec();
            ControlFlow::Continue(())
        })
        .unwrap();
        (g.tokens, last)
    }
}

/// Sixteen requests of different prompt lengths, `max_tokens`, sampling and EOS
/// handling, all asking for token ids and final logits.
pub fn varied_requests(n: usize) -> Vec<Request> {
    let words = [
        "Robot", "arm", "stop", "obstacle", "ahead", "turn", "left", "battery", "low", "Où", "est",
        "la", "sortie", "?", "Hafen", "Straße", "速度", "減速", "grip",
    ];
    (0..n)
        .map(|i| {
            let len = 1 + (i * 7) % 23;
            let prompt: Vec<&str> = (0..len)
                .map(|j| words[(i * 5 + j * 3) % words.len()])
                .collect();
            Request {
                id: Some(format!("req-{i}")),
                prompt: Some(prompt.join(" ")),
                max_tokens: Some(1 + ((i * 11) % 37) as u32),
                temperature: (i % 4 == 3).then_some(0.8),
                top_p: (i % 8 == 7).then_some(0.9),
                seed: Some(i as u64),
                ignore_eos: i % 2 == 0,
                return_token_ids: true,
                return_logits: true,
                ..Default::default()
            }
        })
        .collect()
}

/// Checks an answer's tokens and last logits bit for bit against the reference.
pub fn assert_identical(reference: &Reference, r: &Request, f: &Final, what: &str) {
    let (tokens, logits) = reference.answer(r);
    assert_eq!(
        f.token_ids.as_deref(),
        Some(tokens.as_slice()),
        "{what}: tokens of {:?} differ",
        r.id
    );
    let got = f.logits.as_deref().expect("logits were asked for");
    assert_eq!(got.len(), logits.len(), "{what}: vocabulary");
    let differ = got
        .iter()
        .zip(&logits)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(
        differ, 0,
        "{what}: {differ} final logits of {:?} differ",
        r.id
    );
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Starts a cluster and waits until it serves.
pub async fn up(spec: &ClusterSpec) -> Cluster {
    let mut cluster = Cluster::start(spec).await.unwrap();
    if let Err(e) = cluster.wait_online(Duration::from_secs(60)).await {
        panic!("cluster did not come up: {e:#}");
    }
    cluster
}

/// Whether a program is on PATH (the MQTT clients, mosquitto).
pub fn have(program: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Panics with an installation hint when a required program is missing.
pub fn require(program: &str) {
    assert!(
        have(program),
        "{program} is needed: apt-get install mosquitto mosquitto-clients (field-tests/test.sh does this when run as root)"
    );
}

/// Checks every answer against the reference, in order, with no missing pieces.
pub fn assert_answers(
    reference: &Reference,
    requests: &[Request],
    answers: &[lime_client::ask::Answer],
    what: &str,
) {
    assert_eq!(answers.len(), requests.len(), "{what}: answers");
    for (r, a) in requests.iter().zip(answers) {
        let f = a
            .outcome
            .as_ref()
            .unwrap_or_else(|e| panic!("{what}: {:?} failed: {e:?}", r.id));
        assert_eq!(a.gaps, 0, "{what}: pieces arrived out of order");
        assert_identical(reference, r, f, what);
    }
}

/// Sends `requests` at once to a cluster and waits (up to 2 minutes) for every answer.
pub async fn ask(
    broker: &lime_client::mqtt::BrokerAddr,
    requests: &[Request],
) -> Vec<lime_client::ask::Answer> {
    lime_client::ask::ask_all(broker, requests, Duration::from_secs(120), |_, _| {})
        .await
        .unwrap()
}

/// Asks for `max_tokens` no stage's memory can ever hold a cache for: the
/// request is refused at once with `exceeds_memory`, saying the most that fits.
pub async fn assert_never_fits(broker: &lime_client::mqtt::BrokerAddr, max_tokens: u32) {
    let huge = Request {
        id: Some("huge".into()),
        prompt: Some("Robot arm".into()),
        max_tokens: Some(max_tokens),
        ..Default::default()
    };
    let answers = ask(broker, std::slice::from_ref(&huge)).await;
    let err = answers[0].outcome.as_ref().unwrap_err();
    assert_eq!(
        err.error.code,
        lime_schemas::ErrorCode::ExceedsMemory,
        "{err:?}"
    );
    assert!(
        err.error.message.contains("at most"),
        "{}",
        err.error.message
    );
}
