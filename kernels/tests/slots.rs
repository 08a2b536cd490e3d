//! Layer slots: a preallocated layer refilled in place with one layer after another
//! computes exactly what a freshly loaded layer does, whatever the stored dtype and
//! however the bytes come off storage.

mod common;

use common::{bits, Fixture};
use lime_kernels::synth::StoredDtype;
use lime_kernels::{
    Checkpoint, DType, DecoderLayer, Device, KvCache, MicroBatch, ReadOptions, Rope, SeqSpan,
    StagingBuffer, Tensor,
};

/// Runs `layer` over a two-sequence prefill with fresh caches; the output's bits.
fn run(ckpt: &Checkpoint, layer: &DecoderLayer, index: usize) -> Vec<u32> {
    let cfg = ckpt.config();
    let rope = Rope::new(cfg, 64, &Device::Cpu).unwrap();
    let spans = [SeqSpan { pos: 0, len: 5 }, SeqSpan { pos: 0, len: 3 }];
    let batch = MicroBatch::new(cfg, &rope, &spans, &Device::Cpu).unwrap();
    let x: Vec<f32> = (0..8 * cfg.hidden_size)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect();
    let x = Tensor::from_vec(x, (8, cfg.hidden_size), &Device::Cpu).unwrap();
    let mut caches: Vec<KvCache> = (0..2)
        .map(|_| KvCache::new(cfg, [index], 16, DType::F32, &Device::Cpu).unwrap())
        .collect();
    let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
    let y = layer.forward(&x, &batch, &mut refs).unwrap();
    bits(&y.flatten_all().unwrap().to_vec1::<f32>().unwrap())
}

fn slot_matches_fresh_loads(dtype: StoredDtype, options: ReadOptions) {
    let fx = Fixture::tiny(dtype);
    let ckpt = Checkpoint::open_with(fx.path(), &options).unwrap();
    let mut slot = DecoderLayer::empty(ckpt.config(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(slot.index(), None);
    let mut staging = StagingBuffer::default();
    for index in [3, 7, 3, 11, 0] {
        slot.reload(&ckpt, index, &mut staging).unwrap();
        assert_eq!(slot.index(), Some(index));
        let fresh = DecoderLayer::load(&ckpt, index, &Device::Cpu).unwrap();
        assert_eq!(slot.bytes(), fresh.bytes());
        assert_eq!(
            run(&ckpt, &slot, index),
            run(&ckpt, &fresh, index),
            "{dtype:?} layer {index} with {options:?}"
        );
    }
}

#[test]
fn refilled_slots_compute_what_fresh_layers_do() {
    for dtype in [StoredDtype::F32, StoredDtype::F16, StoredDtype::BF16] {
        slot_matches_fresh_loads(dtype, ReadOptions::default());
    }
}

#[test]
fn direct_and_throttled_reads_give_the_same_layers() {
    slot_matches_fresh_loads(
        StoredDtype::F32,
        ReadOptions {
            direct: true,
            bytes_per_s: None,
        },
    );
    slot_matches_fresh_loads(
        StoredDtype::BF16,
        ReadOptions {
            direct: true,
            bytes_per_s: Some(400 << 20),
        },
    );
}

#[test]
fn a_failed_reload_leaves_an_empty_slot_that_refuses_to_run() {
    let fx = Fixture::tiny(StoredDtype::F32);
    let ckpt = fx.open();
    let mut slot = DecoderLayer::empty(ckpt.config(), DType::F32, &Device::Cpu).unwrap();
    let mut staging = StagingBuffer::default();
    slot.reload(&ckpt, 2, &mut staging).unwrap();
    let err = slot.reload(&ckpt, 99, &mut staging).unwrap_err();
    assert!(err.to_string().contains("layer 99"), "{err}");
    // Truncate the shard holding layer 5 after opening: the read fails midway.
    let name = "model.layers.5.mlp.down_proj.weight";
    let entry = ckpt.entry(name).unwrap().clone();
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fx.path().join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shard = fx.path().join(index["weight_map"][name].as_str().unwrap());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap();
    file.set_len(entry.start + 1).unwrap();
    let err = slot.reload(&ckpt, 5, &mut staging).unwrap_err();
    assert!(
        err.to_string().contains(&shard.display().to_string()),
        "the error names the file: {err}"
    );
    assert_eq!(slot.index(), None);
    let cfg = ckpt.config();
    let rope = Rope::new(cfg, 8, &Device::Cpu).unwrap();
    let batch = MicroBatch::new(cfg, &rope, &[SeqSpan { pos: 0, len: 1 }], &Device::Cpu).unwrap();
    let x = Tensor::zeros((1, cfg.hidden_size), DType::F32, &Device::Cpu).unwrap();
    let mut cache = KvCache::new(cfg, [5], 4, DType::F32, &Device::Cpu).unwrap();
    let err = slot.forward(&x, &batch, &mut [&mut cache]).unwrap_err();
    assert!(err.to_string().contains("no layer"), "{err}");
}
