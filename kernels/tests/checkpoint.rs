//! Reading checkpoints: only the requested layers' bytes, and clear errors (never
//! panics) for every way a checkpoint can be broken.

mod common;

use common::{bits, Fixture};
use lime_kernels::synth::StoredDtype;
use lime_kernels::{Checkpoint, Device, Error, LayerStack};
use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

fn is_layer(name: &str, layers: &[usize]) -> bool {
    layers
        .iter()
        .any(|l| name.starts_with(&format!("model.layers.{l}.")))
}

/// Every tensor's (shard file, byte range) from the index and the shard headers.
fn locations(dir: &Path) -> BTreeMap<String, (PathBuf, u64, u64)> {
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let ckpt = Checkpoint::open(dir).unwrap();
    index["weight_map"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, file)| {
            let e = ckpt.entry(name).unwrap();
            (
                name.clone(),
                (dir.join(file.as_str().unwrap()), e.start, e.end),
            )
        })
        .collect()
}

#[test]
fn loading_layers_10_and_11_reads_only_their_bytes() {
    let fx = Fixture::tiny(StoredDtype::F32);
    let dir = fx.path();
    let locs = locations(dir);
    let wanted: Vec<_> = locs
        .iter()
        .filter(|(n, _)| is_layer(n, &[10, 11]))
        .collect();
    assert_eq!(wanted.len(), 18, "two layers of nine tensors");

    let ckpt = Checkpoint::open(dir).unwrap();
    assert_eq!(ckpt.bytes_read(), 0, "opening reads headers only");
    ckpt.record_reads();
    let before = LayerStack::load(&ckpt, 10..12, &Device::Cpu, |_| {}).unwrap();
    let reads = ckpt.take_reads();
    let mut expected: Vec<_> = wanted
        .iter()
        .map(|(_, (p, s, e))| (p.clone(), *s, *e))
        .collect();
    let mut got: Vec<_> = reads
        .iter()
        .map(|r| (r.path.clone(), r.start, r.end))
        .collect();
    expected.sort();
    got.sort();
    assert_eq!(
        got, expected,
        "exactly the tensors of layers 10 and 11 were read, once each"
    );
    let layer_bytes: u64 = wanted.iter().map(|(_, (_, s, e))| e - s).sum();
    assert_eq!(ckpt.bytes_read(), layer_bytes);
    drop(ckpt);

    // Destroy every other tensor's bytes on disk: layers 10-11 load the same.
    for (name, (path, start, end)) in &locs {
        if is_layer(name, &[10, 11]) {
            continue;
        }
        let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.seek(SeekFrom::Start(*start)).unwrap();
        f.write_all(&vec![0xff; (end - start) as usize]).unwrap();
    }
    let ckpt = Checkpoint::open(dir).unwrap();
    let after = LayerStack::load(&ckpt, 10..12, &Device::Cpu, |_| {}).unwrap();
    assert_eq!(before.bytes(), after.bytes());
    let x = lime_kernels::Tensor::ones((1, 64), lime_kernels::DType::F32, &Device::Cpu).unwrap();
    let run = |stack: &LayerStack| {
        let cfg = ckpt.config();
        let rope = lime_kernels::Rope::new(cfg, 8, &Device::Cpu).unwrap();
        let spans = [lime_kernels::SeqSpan { pos: 0, len: 1 }];
        let batch = lime_kernels::MicroBatch::new(cfg, &rope, &spans, &Device::Cpu).unwrap();
        let mut c =
            lime_kernels::KvCache::new(cfg, 10..12, 8, lime_kernels::DType::F32, &Device::Cpu)
                .unwrap();
        stack
            .forward(&x, &batch, &mut [&mut c])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(bits(&run(&before)), bits(&run(&after)));
    // And a destroyed layer really is destroyed, so the check above can fail.
    let cfg = ckpt.config();
    let broken = ckpt
        .tensor(
            "model.layers.3.mlp.up_proj.weight",
            &[cfg.intermediate_size, cfg.hidden_size],
            &Device::Cpu,
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(broken.iter().all(|x| x.is_nan()));
}

fn rewrite_shard(
    path: &Path,
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn shard_of(dir: &Path, tensor: &str) -> PathBuf {
    locations(dir)[tensor].0.clone()
}

fn load_all(dir: &Path) -> Result<(), Error> {
    let ckpt = Checkpoint::open(dir)?;
    lime_kernels::Model::load(&ckpt, &Device::Cpu, |_, _| {}).map(|_| ())
}

fn assert_error_names(err: Error, parts: &[&str]) {
    let msg = err.to_string();
    for p in parts {
        assert!(msg.contains(p), "error `{msg}` does not mention `{p}`");
    }
}

#[test]
fn a_tensor_missing_from_its_shard_is_named() {
    let fx = Fixture::tiny(StoredDtype::F32);
    let name = "model.layers.4.mlp.up_proj.weight";
    let shard = shard_of(fx.path(), name);
    rewrite_shard(&shard, |t| t.retain(|(n, ..)| n != name));
    let err = Checkpoint::open(fx.path()).unwrap_err();
    assert!(matches!(err, Error::MissingTensor { .. }), "{err:?}");
    assert_error_names(err, &[name, &shard.file_name().unwrap().to_string_lossy()]);
}

#[test]
fn a_tensor_missing_everywhere_is_named_when_needed() {
    let fx = Fixture::tiny(StoredDtype::F32);
    let name = "model.norm.weight";
    let shard = shard_of(fx.path(), name);
    rewrite_shard(&shard, |t| t.retain(|(n, ..)| n != name));
    let index_path = fx.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    index["weight_map"].as_object_mut().unwrap().remove(name);
    std::fs::write(&index_path, index.to_string()).unwrap();
    let err = load_all(fx.path()).unwrap_err();
    assert!(matches!(err, Error::MissingTensor { .. }), "{err:?}");
    assert_error_names(err, &[name, &fx.path().display().to_string()]);
}

#[test]
fn a_wrong_shape_is_named() {
    let fx = Fixture::tiny(StoredDtype::F32);
    let name = "model.layers.2.self_attn.k_proj.weight";
    let shard = shard_of(fx.path(), name);
    rewrite_shard(&shard, |t| {
        let e = t.iter_mut().find(|(n, ..)| n == name).unwrap();
        e.2 = vec![e.2[1], e.2[0]];
    });
    let err = load_all(fx.path()).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err:?}");
    assert_error_names(err, &[name, &shard.display().to_string(), "[32, 64]"]);
}

#[test]
fn a_truncated_shard_is_named_with_the_tensor_it_cuts() {
    let fx = Fixture::tiny(StoredDtype::F32);
    let locs = locations(fx.path());
    let (path, _, _) = locs.values().next().unwrap().clone();
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 100).unwrap();
    let last = locs
        .iter()
        .filter(|(_, l)| l.0 == path)
        .max_by_key(|(_, l)| l.2)
        .unwrap()
        .0;
    let err = Checkpoint::open(fx.path()).unwrap_err();
    assert!(matches!(err, Error::Truncated { .. }), "{err:?}");
    assert_error_names(err, &[last, &path.display().to_string(), "truncated"]);
}

#[test]
fn a_corrupt_header_is_named() {
    let fx = Fixture::tiny(StoredDtype::F32);
    let path = locations(fx.path()).values().next().unwrap().0.clone();
    for garbage in [&b"{\"not\": json"[..], &[0xff; 12][..]] {
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start(8)).unwrap();
        f.write_all(garbage).unwrap();
        let err = Checkpoint::open(fx.path()).unwrap_err();
        assert!(matches!(err, Error::CorruptHeader { .. }), "{err:?}");
        assert_error_names(err, &[&path.display().to_string(), "header"]);
    }
    // An absurd header length is refused before anything is allocated.
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all(&u64::MAX.to_le_bytes()).unwrap();
    let err = Checkpoint::open(fx.path()).unwrap_err();
    assert_error_names(err, &[&path.display().to_string(), "header length"]);
}

#[test]
fn an_empty_or_missing_shard_is_an_error() {
    let fx = Fixture::tiny(StoredDtype::F32);
    let path = locations(fx.path()).values().next().unwrap().0.clone();
    std::fs::write(&path, b"").unwrap();
    assert_error_names(
        Checkpoint::open(fx.path()).unwrap_err(),
        &[&path.display().to_string()],
    );
    std::fs::remove_file(&path).unwrap();
    assert_error_names(
        Checkpoint::open(fx.path()).unwrap_err(),
        &[&path.display().to_string()],
    );
}

#[test]
fn an_unknown_architecture_is_refused_clearly() {
    let fx = Fixture::tiny(StoredDtype::F32);
    let path = fx.path().join("config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("LlamaForCausalLM", "GPT2LMHeadModel");
    std::fs::write(&path, text).unwrap();
    let err = Checkpoint::open(fx.path()).unwrap_err();
    assert!(
        matches!(err, Error::UnsupportedArchitecture { .. }),
        "{err:?}"
    );
    assert_error_names(err, &["GPT2LMHeadModel", "config.json", "LlamaForCausalLM"]);
}

#[test]
fn a_single_file_checkpoint_loads_like_a_sharded_one() {
    let fx = Fixture::tiny(StoredDtype::BF16);
    let (_, sharded) = fx.model();
    // Merge the shards into one model.safetensors, as small HF models ship.
    let single = tempfile::tempdir().unwrap();
    let mut all = Vec::new();
    for (name, (path, ..)) in locations(fx.path()) {
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let v = st.tensor(&name).unwrap();
        all.push((name, v.dtype(), v.shape().to_vec(), v.data().to_vec()));
    }
    let views: Vec<_> = all
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &single.path().join("model.safetensors")).unwrap();
    std::fs::copy(
        fx.path().join("config.json"),
        single.path().join("config.json"),
    )
    .unwrap();
    let ckpt = Checkpoint::open(single.path()).unwrap();
    let model = lime_kernels::Model::load(&ckpt, &Device::Cpu, |_, _| {}).unwrap();
    let ids = [1u32, 2, 3];
    let a = sharded
        .forward(&[&ids], &[0], &mut [&mut sharded.new_cache(3).unwrap()])
        .unwrap();
    let b = model
        .forward(&[&ids], &[0], &mut [&mut model.new_cache(3).unwrap()])
        .unwrap();
    assert_eq!(
        bits(&a.flatten_all().unwrap().to_vec1().unwrap()),
        bits(&b.flatten_all().unwrap().to_vec1().unwrap())
    );
}

#[test]
fn end_of_sequence_ids_merge_config_and_generation_config() {
    let fx = Fixture::tiny(StoredDtype::F32);
    let path = fx.path().join("generation_config.json");
    let ckpt = Checkpoint::open(fx.path()).unwrap();
    let base = ckpt.eos_token_ids().unwrap();
    assert_eq!(base, ckpt.config().eos_token_ids);
    std::fs::write(&path, r#"{"eos_token_id": [7, 3]}"#).unwrap();
    let mut expected = [base.clone(), vec![3, 7]].concat();
    expected.sort();
    assert_eq!(ckpt.eos_token_ids().unwrap(), expected);
    std::fs::write(&path, "{broken").unwrap();
    let err = ckpt.eos_token_ids().unwrap_err().to_string();
    assert!(err.contains("generation_config.json"), "{err}");
    std::fs::remove_file(&path).unwrap();
    assert_eq!(ckpt.eos_token_ids().unwrap(), base);
}
