//! `lime bench device`: decoding on one compute device (the CPU, or a GPU with the
//! `cuda` feature) against its memory roofline, then again with part of the layers
//! offloaded and streamed back through the stage's own residency manager, to show
//! how much of the loading the prefetch hides.
//!
//! Everything is measured in the same run: the roofline from the device's
//! bandwidth (the driver's figures on a GPU, and a device-to-device copy), the
//! all-resident decode, and the offloaded decode with its loading bubbles (time the
//! compute waited for a streamed layer).

use anyhow::Context;
use lime_client::progress::Progress;
use lime_kernels::{
    accelerator::decode_roofline, sampling::argmax, Checkpoint, Device, DeviceSpec, Embedding,
    Head, KvCache, MicroBatch, Model, Rope, SeqSpan, Tensor,
};
use lime_stage::memory::residency::Residency;
use lime_stage::memory::Split;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to run (`lime bench device`'s arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceBench {
    /// Checkpoint directory; the `bench` preset is synthesised there (in
    /// --dtype) if empty.
    #[arg(long, default_value = "models/bench-bf16")]
    pub model: PathBuf,
    /// `cpu`, or `cuda:N` in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Decode steps timed per run.
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Share of the layers offloaded in the second run (the last ones).
    #[arg(long, default_value_t = 0.5)]
    pub offload_share: f64,
    /// Streaming slots for the offloaded layers.
    #[arg(long, default_value_t = 2)]
    pub slots: usize,
}

/// Everything the device benchmark measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceReport {
    pub model: String,
    pub device: String,
    pub gpu: Option<String>,
    pub integrated: Option<bool>,
    pub load_path: Option<String>,
    pub dtype: String,
    pub weight_bytes_per_token: u64,
    /// The driver's peak figure (GPU only).
    pub peak_bandwidth_gb_s: Option<f64>,
    /// Measured: a device-to-device copy on a GPU, all-core streaming on the CPU.
    pub measured_bandwidth_gb_s: f64,
    pub roofline_tokens_per_s: f64,
    pub resident_tokens_per_s: f64,
    /// Batch-1 decode against the roofline of the measured bandwidth.
    pub resident_roofline_ratio: f64,
    pub offloaded_layers: usize,
    pub slots: usize,
    pub offloaded_tokens_per_s: f64,
    pub offloaded_read_gb_s: f64,
    /// Share of the offloaded run's decode time spent waiting for layers.
    pub bubble_share: f64,
    /// Mean wait per streamed layer visit, milliseconds.
    pub bubble_ms_per_layer: f64,
}

pub fn run(bench: &DeviceBench) -> anyhow::Result<DeviceReport> {
    let device = bench.device.open()?;
    let ckpt = Arc::new(Checkpoint::open(&bench.model)?);
    let cfg = ckpt.config().clone();
    let n = cfg.num_hidden_layers;
    let steps = bench.steps.max(4);

    let mut progress = Progress::new(format!(
        "loading {} onto {}",
        bench.model.display(),
        bench.device
    ));
    let model = Model::load(&ckpt, &device, |d, t| {
        progress.update(d as u64, t as u64, "layers")
    })?;
    let per_token = model.bytes_read_per_token() as u64;
    let dtype = model.activation_dtype();

    let (gpu, peak, measured) = bandwidths(&device)?;
    let roofline = decode_roofline(per_token, measured);

    eprintln!("decoding {steps} tokens with every layer resident…");
    let resident_tps = decode(&device, &ckpt, Pieces::Whole(&model), steps)?.tokens_per_s;
    drop(model);

    let offloaded: Vec<usize> = {
        let count = ((n as f64 * bench.offload_share).round() as usize).clamp(1, n);
        (n - count..n).collect()
    };
    let resident: Vec<usize> = (0..n).filter(|l| !offloaded.contains(l)).collect();
    eprintln!(
        "decoding {steps} tokens with layers {offloaded:?} streamed through {} slots…",
        bench.slots
    );
    let residency = Residency::start_with(
        ckpt.clone(),
        &device,
        HashMap::new(),
        &Split {
            resident,
            offloaded: offloaded.clone(),
            slots: bench.slots,
        },
        true,
        |_, _| {},
    )?;
    let before = residency.stats();
    let run = decode(&device, &ckpt, Pieces::Streamed(&residency), steps)?;
    let after = residency.stats();
    let decode_secs = run.elapsed.as_secs_f64();
    let visits = (offloaded.len() * run.timed_steps).max(1);

    Ok(DeviceReport {
        model: bench.model.display().to_string(),
        device: bench.device.to_string(),
        gpu: gpu.as_ref().map(|g| g.name.clone()),
        integrated: gpu.as_ref().map(|g| g.integrated),
        load_path: gpu.as_ref().map(|g| format!("{:?}", g.load_path())),
        dtype: format!("{dtype:?}"),
        weight_bytes_per_token: per_token,
        peak_bandwidth_gb_s: peak.map(|b| b / 1e9),
        measured_bandwidth_gb_s: measured / 1e9,
        roofline_tokens_per_s: roofline,
        resident_tokens_per_s: resident_tps,
        resident_roofline_ratio: resident_tps / roofline,
        offloaded_layers: offloaded.len(),
        slots: bench.slots,
        offloaded_tokens_per_s: run.tokens_per_s,
        offloaded_read_gb_s: (after.bytes - before.bytes) as f64
            / after
                .busy
                .saturating_sub(before.busy)
                .as_secs_f64()
                .max(1e-9)
            / 1e9,
        bubble_share: run.waited.as_secs_f64() / decode_secs.max(1e-9),
        bubble_ms_per_layer: run.waited.as_secs_f64() * 1e3 / visits as f64,
    })
}

/// The GPU's traits, its peak bandwidth, and the bandwidth measured now.
#[allow(clippy::type_complexity)]
fn bandwidths(
    device: &Device,
) -> anyhow::Result<(Option<lime_kernels::GpuTraits>, Option<f64>, f64)> {
    if device.is_cpu() {
        eprintln!("measuring memory bandwidth…");
        return Ok((None, None, crate::kernels::memory_bandwidth()));
    }
    #[cfg(feature = "cuda")]
    {
        let traits = lime_kernels::GpuTraits::query(device)?;
        let peak = traits.peak_memory_bandwidth();
        eprintln!("measuring {}'s memory bandwidth…", traits.name);
        Ok((Some(traits), peak, device_copy_bandwidth(device)?))
    }
    #[cfg(not(feature = "cuda"))]
    anyhow::bail!("{device:?} needs a build with the `cuda` feature")
}

/// A device-to-device copy of 1 GiB reads and writes every byte: best of three.
#[cfg(feature = "cuda")]
fn device_copy_bandwidth(device: &Device) -> anyhow::Result<f64> {
    let src = Tensor::zeros(1usize << 28, lime_kernels::DType::F32, device)?;
    let mut best = 0f64;
    for _ in 0..3 {
        device.synchronize()?;
        let started = Instant::now();
        let copy = src.copy()?;
        device.synchronize()?;
        best = best.max(2.0 * (1u64 << 30) as f64 / started.elapsed().as_secs_f64());
        drop(copy);
    }
    Ok(best)
}

/// The layers to decode with: the whole model, or the stage's residency manager.
enum Pieces<'a> {
    Whole(&'a Model),
    Streamed(&'a Residency),
}

struct Decoded {
    tokens_per_s: f64,
    elapsed: Duration,
    waited: Duration,
    timed_steps: usize,
}

/// Batch-1 greedy decode: a prompt, one warm-up step, then `steps` timed steps.
/// Every step ends with the logits on the host, so GPU work is finished in time.
fn decode(
    device: &Device,
    ckpt: &Checkpoint,
    pieces: Pieces<'_>,
    steps: usize,
) -> anyhow::Result<Decoded> {
    let cfg = ckpt.config();
    let n = cfg.num_hidden_layers;
    let prompt: Vec<u32> = (0..16)
        .map(|i| ((i * 7919 + 11) % cfg.vocab_size) as u32)
        .collect();
    let capacity = prompt.len() + steps + 2;
    let owned;
    let (embedding, head, rope) = match &pieces {
        Pieces::Whole(m) => (m.embedding(), m.head(), m.rope()),
        Pieces::Streamed(_) => {
            let embedding = Embedding::load(ckpt, device)?;
            let head = Head::load(ckpt, device, Some(&embedding))?;
            let rope = Rope::new(cfg, capacity, device)?;
            owned = (embedding, head, rope);
            (&owned.0, &owned.1, &owned.2)
        }
    };
    let mut cache = KvCache::new(cfg, 0..n, capacity, embedding.dtype(), device)?;
    let mut waited = Duration::ZERO;
    let mut step = |ids: &[u32], pos: usize, waited: &mut Duration| -> anyhow::Result<u32> {
        let logits = match &pieces {
            Pieces::Whole(m) => m.forward(&[ids], &[pos], &mut [&mut cache])?,
            Pieces::Streamed(r) => {
                let spans = [SeqSpan {
                    pos,
                    len: ids.len(),
                }];
                let batch = MicroBatch::new(cfg, rope, &spans, device)?;
                let mut x: Tensor = embedding.forward(ids)?;
                for l in 0..n {
                    let (layer, wait) = r.layer(l).with_context(|| format!("layer {l}"))?;
                    *waited += wait;
                    x = layer.forward(&x, &batch, &mut [&mut cache])?;
                }
                head.forward(&x, &batch.last_rows())?
            }
        };
        Ok(argmax(&logits.squeeze(0)?.to_vec1::<f32>()?))
    };
    let mut next = step(&prompt, 0, &mut waited)?;
    let mut pos = prompt.len();
    next = step(&[next], pos, &mut waited)?;
    pos += 1;
    waited = Duration::ZERO;
    let mut progress = Progress::new("decoding".to_string());
    let started = Instant::now();
    for i in 0..steps {
        next = step(&[next], pos, &mut waited)?;
        pos += 1;
        progress.update(i as u64 + 1, steps as u64, "tokens");
    }
    let elapsed = started.elapsed();
    Ok(Decoded {
        tokens_per_s: steps as f64 / elapsed.as_secs_f64(),
        elapsed,
        waited,
        timed_steps: steps,
    })
}

impl std::fmt::Display for DeviceReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "model: {} ({}) on {}",
            self.model, self.dtype, self.device
        )?;
        if let Some(gpu) = &self.gpu {
            writeln!(
                f,
                "GPU: {gpu}; integrated: {}; load path: {}",
                self.integrated.unwrap_or(false),
                self.load_path.as_deref().unwrap_or("-")
            )?;
        }
        if let Some(peak) = self.peak_bandwidth_gb_s {
            writeln!(f, "peak memory bandwidth (driver): {peak:.0} GB/s")?;
        }
        writeln!(
            f,
            "measured memory bandwidth: {:.1} GB/s; weights per token: {:.1} MB; roofline: {:.1} tokens/s",
            self.measured_bandwidth_gb_s,
            self.weight_bytes_per_token as f64 / 1e6,
            self.roofline_tokens_per_s
        )?;
        writeln!(
            f,
            "all resident:  {:>9.1} tokens/s  ({:.1}% of the roofline)",
            self.resident_tokens_per_s,
            100.0 * self.resident_roofline_ratio
        )?;
        writeln!(
            f,
            "{} layers streamed through {} slots: {:>9.1} tokens/s  ({:.1}% of all resident); reads {:.2} GB/s",
            self.offloaded_layers,
            self.slots,
            self.offloaded_tokens_per_s,
            100.0 * self.offloaded_tokens_per_s / self.resident_tokens_per_s,
            self.offloaded_read_gb_s
        )?;
        write!(
            f,
            "loading bubbles: {:.1}% of decode time, {:.3} ms per streamed layer",
            100.0 * self.bubble_share,
            self.bubble_ms_per_layer
        )
    }
}
