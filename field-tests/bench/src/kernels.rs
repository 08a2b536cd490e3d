//! `lime bench kernels`: how fast one process runs the model, against the memory
//! roofline measured in the same run.
//!
//! Decoding one token reads every weight once, so decode at batch 1 cannot beat
//! `memory bandwidth / weight bytes per token`. The bandwidth is measured here, by
//! streaming a buffer larger than any cache with all cores, just before the model
//! runs, so the ratio compares like with like on whatever machine runs it.

use anyhow::Context;
use lime_client::progress::Progress;
use lime_kernels::{Checkpoint, Device, KvCache, Model};
use std::path::Path;
use std::time::Instant;

/// One measured row of the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub what: String,
    pub tokens_per_s: f64,
}

/// Everything the kernel benchmark measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelReport {
    pub model: String,
    pub weight_bytes_per_token: u64,
    pub memory_bandwidth_gb_s: f64,
    pub roofline_tokens_per_s: f64,
    pub rows: Vec<Row>,
    /// Batch-1 decode as a fraction of the roofline.
    pub decode_roofline_ratio: f64,
}

/// Runs the kernel benchmark on the checkpoint in `dir`.
pub fn kernels(dir: &Path, steps: usize) -> anyhow::Result<KernelReport> {
    let ckpt = Checkpoint::open(dir)?;
    let mut progress = Progress::new(format!("loading {}", dir.display()));
    let model = Model::load(&ckpt, &Device::Cpu, |d, t| {
        progress.update(d as u64, t as u64, "layers")
    })?;
    let per_token = model.bytes_read_per_token() as u64;

    eprintln!("measuring memory bandwidth…");
    let bandwidth = memory_bandwidth();
    let roofline = bandwidth / per_token as f64;

    let mut rows = Vec::new();
    for batch in [1usize, 4, 16, 32] {
        eprintln!("decode at batch {batch}…");
        let tps = decode_tokens_per_s(&model, batch, steps.max(2))
            .with_context(|| format!("decode at batch {batch}"))?;
        rows.push(Row {
            what: format!("decode batch {batch}"),
            tokens_per_s: tps,
        });
    }
    eprintln!("prefill…");
    rows.push(Row {
        what: "prefill 256 tokens".into(),
        tokens_per_s: prefill_tokens_per_s(&model, 256)?,
    });
    let decode1 = rows[0].tokens_per_s;
    Ok(KernelReport {
        model: dir.display().to_string(),
        weight_bytes_per_token: per_token,
        memory_bandwidth_gb_s: bandwidth / 1e9,
        roofline_tokens_per_s: roofline,
        rows,
        decode_roofline_ratio: decode1 / roofline,
    })
}

impl std::fmt::Display for KernelReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "model: {}", self.model)?;
        writeln!(
            f,
            "weights read per decoded token: {:.1} MB; memory bandwidth: {:.2} GB/s; roofline: {:.2} tokens/s",
            self.weight_bytes_per_token as f64 / 1e6,
            self.memory_bandwidth_gb_s,
            self.roofline_tokens_per_s
        )?;
        writeln!(f, "{:<22} {:>12}", "measurement", "tokens/s")?;
        for r in &self.rows {
            writeln!(f, "{:<22} {:>12.2}", r.what, r.tokens_per_s)?;
        }
        write!(
            f,
            "batch-1 decode / roofline: {:.1}%",
            100.0 * self.decode_roofline_ratio
        )
    }
}

/// Prompt lengths differ per sequence so the batch holds sequences at different positions.
fn prompt(len: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((i * 7919 + salt * 104_729) % vocab) as u32)
        .collect()
}

fn decode_tokens_per_s(model: &Model, batch: usize, steps: usize) -> anyhow::Result<f64> {
    let vocab = model.config().vocab_size;
    let mut caches: Vec<KvCache> = Vec::new();
    let mut positions = Vec::new();
    let mut next = Vec::new();
    for s in 0..batch {
        let p = prompt(8 + 3 * s, vocab, s);
        let mut cache = model.new_cache(p.len() + steps + 1)?;
        let logits = model.forward(&[&p], &[0], &mut [&mut cache])?;
        next.push(lime_kernels::sampling::argmax(
            &logits.squeeze(0)?.to_vec1::<f32>()?,
        ));
        positions.push(p.len());
        caches.push(cache);
    }
    let mut step = |next: &mut Vec<u32>, positions: &mut Vec<usize>| -> anyhow::Result<()> {
        let inputs: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let tokens: Vec<&[u32]> = inputs.iter().map(|t| t.as_slice()).collect();
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        let logits = model
            .forward(&tokens, positions, &mut refs)?
            .to_vec2::<f32>()?;
        for (i, l) in logits.iter().enumerate() {
            next[i] = lime_kernels::sampling::argmax(l);
            positions[i] += 1;
        }
        Ok(())
    };
    step(&mut next, &mut positions)?; // warm-up
    let started = Instant::now();
    for _ in 1..steps {
        step(&mut next, &mut positions)?;
    }
    Ok(((steps - 1) * batch) as f64 / started.elapsed().as_secs_f64())
}

fn prefill_tokens_per_s(model: &Model, len: usize) -> anyhow::Result<f64> {
    let p = prompt(len, model.config().vocab_size, 99);
    let mut best = f64::INFINITY;
    for _ in 0..2 {
        let mut cache = model.new_cache(len)?;
        let started = Instant::now();
        model.forward(&[&p], &[0], &mut [&mut cache])?;
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(len as f64 / best)
}

/// Bytes per second that all cores together can stream from DRAM (best of three).
pub fn memory_bandwidth() -> f64 {
    const BYTES: usize = 1 << 30;
    let words = vec![1u64; BYTES / 8];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = words.len().div_ceil(threads);
    let mut best = 0.0f64;
    for _ in 0..3 {
        let started = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = words
                .chunks(chunk)
                .map(|part| s.spawn(move || part.iter().fold(0u64, |a, &w| a.wrapping_add(w))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        let secs = started.elapsed().as_secs_f64();
        std::hint::black_box(total);
        best = best.max(BYTES as f64 / secs);
    }
    best
}
