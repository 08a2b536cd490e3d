//! Measuring this device for the planner (`lime-stage --profile`, and at start
//! when the broker plans): one layer's compute for decode at several micro-batch
//! sizes and for prefill, the starter's ends, the storage read rate through the
//! stage's own read path, and the memory lime may use.
//!
//! The compute runs on the stage's thread pool, so a profile measured with
//! `compute_threads = 1` describes one thread's worth of the machine. Under
//! device emulation (`emulate.compute_slowdown`) every compute figure is the
//! emulated device's: the measured time times the slowdown, which is what the
//! stage's paced layers then take.

use crate::config::StageConfig;
use lime_kernels::{
    Checkpoint, Config, DecoderLayer, Device, DeviceSpec, Embedding, Head, KvCache, MicroBatch,
    ReadOptions, Rope, SeqSpan, Tensor,
};
use lime_schemas::{DeviceProfile, MeasuredCompute, ModelShape, TimePoint};
use std::time::Instant;

/// Cached tokens in front of each measured decode step.
const CONTEXT: usize = 32;

/// How a piece of work is timed: how many runs, and which of them counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Runs timed after the warm-up.
    pub reps: usize,
    /// The best run rather than the median: what an emulated device's pace
    /// multiplies ([`crate::worker::pace`]), so that its profile tells the
    /// planner the speed the stage will really run at, whatever else the
    /// machine was doing while it was measured.
    pub best: bool,
}

impl Timing {
    /// The median of `reps` runs, or under emulation the best of more runs.
    pub fn for_slowdown(reps: usize, slowdown: f64) -> Self {
        if slowdown > 1.0 {
            Self {
                reps: reps * 3,
                best: true,
            }
        } else {
            Self { reps, best: false }
        }
    }

    /// Times `f` (seconds per run) after one warm-up run.
    fn of(self, mut f: impl FnMut() -> anyhow::Result<f64>) -> anyhow::Result<f64> {
        f()?;
        let mut times = (0..self.reps.max(1))
            .map(|_| f())
            .collect::<anyhow::Result<Vec<f64>>>()?;
        times.sort_by(f64::total_cmp);
        Ok(if self.best {
            times[0]
        } else {
            times[times.len() / 2]
        })
    }
}

/// One decode step of `layer` for `tokens` sequences with `CONTEXT` tokens cached.
pub fn time_decode(
    cfg: &Config,
    layer: &DecoderLayer,
    tokens: usize,
    timing: Timing,
) -> anyhow::Result<f64> {
    let (dev, dtype) = (layer.device().clone(), layer.dtype());
    let rope = Rope::new(cfg, CONTEXT + 1, &dev)?;
    let step = MicroBatch::new(
        cfg,
        &rope,
        &vec![
            SeqSpan {
                pos: CONTEXT,
                len: 1
            };
            tokens
        ],
        &dev,
    )?;
    let fill = MicroBatch::new(
        cfg,
        &rope,
        &vec![
            SeqSpan {
                pos: 0,
                len: CONTEXT
            };
            tokens
        ],
        &dev,
    )?;
    let mut caches: Vec<KvCache> = (0..tokens)
        .map(|_| KvCache::new(cfg, [layer.index().unwrap_or(0)], CONTEXT + 1, dtype, &dev))
        .collect::<Result<_, _>>()?;
    let x = Tensor::ones((tokens, cfg.hidden_size), dtype, &dev)?;
    let xp = Tensor::ones((CONTEXT * tokens, cfg.hidden_size), dtype, &dev)?;
    timing.of(|| {
        // Rewind so every run appends at the same position.
        caches.iter_mut().for_each(KvCache::clear);
        layer.forward(&xp, &fill, &mut caches.iter_mut().collect::<Vec<_>>())?;
        dev.synchronize()?;
        let started = Instant::now();
        layer.forward(&x, &step, &mut caches.iter_mut().collect::<Vec<_>>())?;
        // A GPU returns once the kernels are queued: time them to the end.
        dev.synchronize()?;
        Ok(started.elapsed().as_secs_f64())
    })
}

/// A prefill of one sequence of `tokens` tokens through `layer`.
pub fn time_prefill(
    cfg: &Config,
    layer: &DecoderLayer,
    tokens: usize,
    timing: Timing,
) -> anyhow::Result<f64> {
    let (dev, dtype) = (layer.device().clone(), layer.dtype());
    let rope = Rope::new(cfg, tokens, &dev)?;
    let batch = MicroBatch::new(
        cfg,
        &rope,
        &[SeqSpan {
            pos: 0,
            len: tokens,
        }],
        &dev,
    )?;
    let mut cache = KvCache::new(cfg, [layer.index().unwrap_or(0)], tokens, dtype, &dev)?;
    let x = Tensor::ones((tokens, cfg.hidden_size), dtype, &dev)?;
    timing.of(|| {
        cache.clear();
        dev.synchronize()?;
        let started = Instant::now();
        layer.forward(&x, &batch, &mut [&mut cache])?;
        dev.synchronize()?;
        Ok(started.elapsed().as_secs_f64())
    })
}

/// The starter's ends for `tokens` sequences: embedding, final norm and head.
fn time_ends(
    emb: &Embedding,
    head: &Head,
    cfg: &Config,
    tokens: usize,
    timing: Timing,
) -> anyhow::Result<f64> {
    let ids: Vec<u32> = (0..tokens as u32)
        .map(|i| i % cfg.vocab_size as u32)
        .collect();
    let rows: Vec<u32> = (0..tokens as u32).collect();
    timing.of(|| {
        let started = Instant::now();
        let x = emb.forward(&ids)?;
        // The logits come back to the host, which waits for a GPU to finish.
        head.forward(&x, &rows)?.to_device(&Device::Cpu)?;
        Ok(started.elapsed().as_secs_f64())
    })
}

/// Bytes per second reading layers into a slot on `dev` through `ckpt`'s read
/// path (its direct I/O and emulated bandwidth included).
fn read_rate(ckpt: &Checkpoint, layers: usize, dev: &Device) -> anyhow::Result<f64> {
    let cfg = ckpt.config();
    let mut slot = DecoderLayer::empty(cfg, ckpt.layer_dtype(dev), dev)?;
    let mut staging = ckpt.layer_staging(dev)?;
    let (mut bytes, started) = (0u64, Instant::now());
    for i in 0..layers.min(cfg.num_hidden_layers) {
        let index = cfg.num_hidden_layers - 1 - i;
        slot.reload(ckpt, index, &mut staging)?;
        bytes += ckpt.layer_bytes_stored(index);
    }
    dev.synchronize()?;
    Ok(bytes as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

/// `MemAvailable` from `/proc/meminfo` (Linux).
fn memory_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Measures this device running `cfg`'s model; `progress` hears each step.
pub fn measure(
    cfg: &StageConfig,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<(DeviceProfile, ModelShape)> {
    let options = ReadOptions {
        direct: cfg.memory.direct_io,
        bytes_per_s: cfg.memory.read_bytes_per_s(),
    };
    let ckpt = Checkpoint::open_with(&cfg.model, &options)?;
    let model = ckpt.config().clone();
    let shape = ckpt.shape();
    let dev = cfg.device.open()?;
    let most = cfg.memory.activation_tokens;
    let slowdown = cfg.emulate.compute_slowdown.max(1.0);
    let timing = Timing::for_slowdown(7, slowdown);
    progress("reading layers");
    let read = read_rate(&ckpt, 3, &dev)?;
    progress("timing decode");
    let layer = DecoderLayer::load(&ckpt, 0, &dev)?;
    let decode = [1usize, 2, 4, 8, 16]
        .into_iter()
        .filter(|&b| b <= most)
        .map(|b| {
            Ok(TimePoint {
                tokens: b,
                seconds: time_decode(&model, &layer, b, timing)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    progress("timing prefill");
    let prefill = [16usize, 64, 256]
        .into_iter()
        .filter(|&t| t <= most.min(model.max_context()))
        .map(|t| {
            Ok(TimePoint {
                tokens: t,
                seconds: time_prefill(&model, &layer, t, Timing::for_slowdown(3, slowdown))?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    progress("timing the embedding and head");
    let emb = Embedding::load(&ckpt, &dev)?;
    let head = Head::load(&ckpt, &dev, Some(&emb))?;
    let ends = [1usize, 4, 16]
        .into_iter()
        .filter(|&b| b <= most)
        .map(|b| {
            Ok(TimePoint {
                tokens: b,
                seconds: time_ends(&emb, &head, &model, b, timing)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (decode, prefill, ends) = (
        slower(decode, slowdown),
        slower(prefill, slowdown),
        slower(ends, slowdown),
    );
    let layer_bytes = layer.bytes() as f64;
    let bandwidth = layer_bytes / decode[0].seconds.max(1e-9);
    let flops = prefill
        .last()
        .map(|p| 2.0 * shape.layer_params as f64 * p.tokens as f64 / p.seconds.max(1e-9))
        .unwrap_or(bandwidth / 2.0);
    let memory = cfg
        .memory
        .accountable_bytes()
        .or_else(|| memory_available().map(|m| m.saturating_sub(cfg.memory.overhead_bytes)))
        .ok_or_else(|| anyhow::anyhow!("no memory budget set and /proc/meminfo unreadable"))?;
    let threads = rayon::current_num_threads();
    let mut kind = match cfg.device {
        DeviceSpec::Cpu => format!("{} CPU thread(s), {}", threads, std::env::consts::ARCH),
        gpu => format!(
            "{gpu} beside {} CPU thread(s), {}",
            threads,
            std::env::consts::ARCH
        ),
    };
    if slowdown > 1.0 {
        kind = format!("emulated: {kind} computing {slowdown}x slower");
    }
    let profile = DeviceProfile {
        name: cfg.name.clone(),
        kind,
        estimate: false,
        source: format!(
            "measured by lime-stage --profile on {} ({} layers of {})",
            host_name(),
            shape.layers,
            shape.name
        ),
        memory_bytes: memory,
        read_bytes_per_s: read,
        // The CPU backend computes in f32 whatever the checkpoint stores; a GPU
        // in the checkpoint's dtype.
        weight_bytes: Some(ckpt.layer_dtype(&dev).size_in_bytes() as u32),
        direct_io: ckpt.direct_io(),
        memory_bandwidth_bytes_per_s: bandwidth,
        flops,
        layer_overhead_s: 0.0,
        measured: Some(MeasuredCompute {
            model: shape.key(),
            decode,
            prefill,
            ends,
        }),
        data_addr: cfg
            .data
            .advertise
            .clone()
            .or_else(|| cfg.data.listen.clone()),
    };
    profile.validate()?;
    Ok((profile, shape))
}

/// The figures of a device `slowdown` times slower than the one measured.
fn slower(points: Vec<TimePoint>, slowdown: f64) -> Vec<TimePoint> {
    points
        .into_iter()
        .map(|p| TimePoint {
            seconds: p.seconds * slowdown,
            ..p
        })
        .collect()
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "this host".into())
}
