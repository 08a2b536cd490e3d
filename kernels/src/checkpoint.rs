//! A Hugging Face safetensors checkpoint on disk, read one tensor at a time.
//!
//! Opening a checkpoint reads `config.json` and only the JSON headers of its shards
//! (single `model.safetensors`, or several shards listed by
//! `model.safetensors.index.json`). Each tensor is then read on demand with a
//! positioned read of exactly its bytes. We read rather than mmap: candle's CPU
//! tensors own their storage, so a mapping would save no copy, and explicit reads
//! let the stage account every byte it pulls from storage, bypass the page cache or
//! pace reads to emulate a Jetson's NVMe ([`crate::storage`]). A tensor can also be
//! read again into memory it already has ([`Checkpoint::fill`]): that is how a
//! stage streams offloaded layers through preallocated slots.

use crate::layout::{self, EndWeights, LayerWeights};
use crate::storage::{self, ReadOptions, StagingBuffer, Throttle};
use crate::{Config, Error, Placement, Result};
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor};
use safetensors::Dtype;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// File names of the Hugging Face layout.
pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// safetensors' own limit on header size; a larger one is a corrupt file.
const MAX_HEADER: u64 = 100 * 1024 * 1024;

/// Where one tensor's bytes are and how to read them.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub shard: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the shard file.
    pub start: u64,
    pub end: u64,
}

impl TensorEntry {
    pub fn byte_len(&self) -> u64 {
        self.end - self.start
    }
}

struct Shard {
    path: PathBuf,
    file: File,
    /// The same file opened with `O_DIRECT`, when direct reads were asked for and
    /// the filesystem allows them.
    direct: Option<File>,
}

/// One positioned read, recorded when read logging is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRecord {
    pub path: PathBuf,
    pub start: u64,
    pub end: u64,
}

#[derive(Default)]
struct ReadLog {
    bytes: AtomicU64,
    records: Mutex<Option<Vec<ReadRecord>>>,
}

/// An opened checkpoint: its config and the location of every tensor.
pub struct Checkpoint {
    dir: PathBuf,
    config: Config,
    shards: Vec<Shard>,
    tensors: HashMap<String, TensorEntry>,
    log: Arc<ReadLog>,
    throttle: Option<Throttle>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens the checkpoint in `dir`, reading its config and shard headers only.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(dir, &ReadOptions::default())
    }

    /// Opens the checkpoint in `dir`; every later read follows `options`.
    pub fn open_with(dir: impl AsRef<Path>, options: &ReadOptions) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config = Config::from_file(&dir.join(CONFIG_FILE))?;
        let index_path = dir.join(INDEX_FILE);
        let shard_names: BTreeMap<String, Vec<String>> = if index_path.exists() {
            read_index(&index_path)?
        } else if dir.join(SINGLE_FILE).exists() {
            BTreeMap::from([(SINGLE_FILE.to_string(), Vec::new())])
        } else {
            return Err(Error::io(
                &dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("neither {SINGLE_FILE} nor {INDEX_FILE} is here"),
                ),
            ));
        };
        let mut shards = Vec::new();
        let mut tensors = HashMap::new();
        for (name, expected) in shard_names {
            let path = dir.join(&name);
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            let found = read_header(&path, &file, shards.len())?;
            for tensor in expected {
                if !found.contains_key(&tensor) {
                    return Err(Error::MissingTensor {
                        dir: path.clone(),
                        tensor,
                    });
                }
            }
            for (tensor, entry) in found {
                if let Some(prev) = tensors.insert(tensor.clone(), entry) {
                    return Err(Error::CorruptHeader {
                        path,
                        message: format!(
                            "tensor `{tensor}` also appears in {}",
                            shards_path(&shards, prev.shard).display()
                        ),
                    });
                }
            }
            let direct = if options.direct {
                let direct = storage::open_direct(&path);
                if direct.is_none() {
                    tracing::warn!(path = %path.display(), "the filesystem refuses direct I/O; reading through the page cache");
                }
                direct
            } else {
                None
            };
            shards.push(Shard { path, file, direct });
        }
        tracing::debug!(dir = %dir.display(), shards = shards.len(), tensors = tensors.len(), "checkpoint opened");
        Ok(Self {
            dir,
            config,
            shards,
            tensors,
            log: Arc::default(),
            throttle: options.bytes_per_s.map(Throttle::new),
        })
    }

    /// Whether reads bypass the page cache: direct I/O was asked for and every
    /// shard's filesystem accepted it.
    pub fn direct_io(&self) -> bool {
        self.shards.iter().all(|s| s.direct.is_some())
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The model in the planner's units, with the stored dtype of its layers' own
    /// tensors and the directory's name.
    pub fn shape(&self) -> lime_schemas::ModelShape {
        let stored = self
            .tensors
            .iter()
            .filter(|(n, _)| layout::is_layer_weight(n))
            .map(|(_, e)| (e.dtype.bitsize() / 8) as u32)
            .max()
            .unwrap_or(4);
        let name = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let mut shape = self.config.shape(&name, stored);
        if self.config.tie_word_embeddings && !self.head_is_tied() {
            shape.end_params += shape.head_params;
        }
        shape
    }

    /// Whether the LM head is the embedding's matrix: tied in the config and not
    /// stored apart (some tied checkpoints store a copy anyway, which is loaded).
    pub fn head_is_tied(&self) -> bool {
        self.config.tie_word_embeddings
            && self
                .entry(&EndWeights::of(&self.config).lm_head.name)
                .is_none()
    }

    /// Tokens that end a generation: `config.json`'s EOS ids and those of
    /// `generation_config.json`, which instruction-tuned checkpoints extend (Llama 3
    /// Instruct adds `<|eot_id|>` there).
    pub fn eos_token_ids(&self) -> Result<Vec<u32>> {
        let mut ids = self.config.eos_token_ids.clone();
        let path = self.dir.join(GENERATION_CONFIG_FILE);
        if path.exists() {
            #[derive(serde::Deserialize)]
            struct GenerationConfig {
                eos_token_id: Option<crate::config::TokenIds>,
            }
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let gen: GenerationConfig = serde_json::from_str(&text).map_err(|e| Error::Config {
                path: path.clone(),
                message: e.to_string(),
            })?;
            ids.extend(gen.eos_token_id.map(|t| t.to_vec()).unwrap_or_default());
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a tensor is, if the checkpoint has it.
    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    /// The host read buffer [`Checkpoint::fill`] needs to refill a decoder layer
    /// at `placement`: none when each tensor reads straight into its own, else
    /// room for the largest. On the CPU that is f32 read buffered; a GPU reads
    /// every dtype straight into its page-locked buffers or mapped slots, and
    /// needs the buffer only for direct I/O's alignment. The GPU loader's own
    /// buffers are [`Placement::loader_bytes`].
    pub fn layer_staging_needed(&self, placement: Placement) -> usize {
        let direct = self.direct_io();
        let cpu = placement == Placement::Cpu;
        let largest = self
            .tensors
            .iter()
            .filter(|(n, e)| {
                layout::is_layer_weight(n) && (direct || (cpu && e.dtype != Dtype::F32))
            })
            .map(|(_, e)| e.byte_len())
            .max();
        largest.map_or(0, |b| StagingBuffer::footprint(b as usize))
    }

    /// Staging to refill decoder layers on `device`: the host buffer
    /// [`Checkpoint::layer_staging_needed`] says and, on a GPU, its loader.
    pub fn layer_staging(&self, device: &Device) -> Result<StagingBuffer> {
        StagingBuffer::for_device(
            device,
            self.layer_staging_needed(Placement::of(device)?),
            self.largest_layer_tensor() as usize,
        )
    }

    /// Bytes `name` takes once loaded at `placement`; `None` if absent or of a
    /// dtype lime does not compute in.
    pub fn loaded_bytes(&self, name: &str, placement: Placement) -> Option<u64> {
        let e = self.tensors.get(name)?;
        let dtype = placement.compute_dtype(e.dtype)?;
        Some(e.shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64)
    }

    /// Bytes on disk of layer `index`'s tensors.
    pub fn layer_bytes_stored(&self, index: usize) -> u64 {
        let prefix = layout::layer_prefix(index);
        self.tensors
            .iter()
            .filter(|(n, _)| n.starts_with(&prefix))
            .map(|(_, e)| e.byte_len())
            .sum()
    }

    /// Total bytes read from the shards since the checkpoint was opened.
    pub fn bytes_read(&self) -> u64 {
        self.log.bytes.load(Ordering::Relaxed)
    }

    /// Starts recording every read's byte range (for tests and diagnostics).
    pub fn record_reads(&self) {
        *self.log.records.lock().unwrap_or_else(|p| p.into_inner()) = Some(Vec::new());
    }

    /// The reads recorded since `record_reads`, and stops recording.
    pub fn take_reads(&self) -> Vec<ReadRecord> {
        self.log
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default()
    }

    /// Reads tensor `name`, checks that its shape is `shape`, and places it on
    /// `device` in the dtype the forward pass computes in there.
    pub fn tensor(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let (entry, compute) = self.checked_entry(name, shape, device)?;
        if device.is_cpu() {
            // Zeroed pages cost nothing until the read writes them.
            let tensor = Tensor::zeros(shape, compute, device)?;
            self.fill(name, &tensor, &mut StagingBuffer::default())?;
            return Ok(tensor);
        }
        let mut staging = StagingBuffer::default();
        let bytes = self.read(entry, &mut staging)?;
        Ok(Tensor::from_raw_buffer(
            bytes,
            candle_dtype(entry.dtype),
            shape,
            device,
        )?)
    }

    /// Reads tensor `name` again into `dst`, a tensor of its shape that
    /// [`Checkpoint::tensor`] made (or a zeroed one), overwriting it in place.
    /// On the CPU `staging` is needed only for direct reads and narrower stored
    /// dtypes; a GPU tensor needs staging made for its device
    /// ([`StagingBuffer::for_device`]).
    pub fn fill(&self, name: &str, dst: &Tensor, staging: &mut StagingBuffer) -> Result<()> {
        let (entry, compute) = self.checked_entry(name, dst.dims(), dst.device())?;
        let shard = &self.shards[entry.shard];
        if dst.dtype() != compute {
            return Err(Error::Input(format!(
                "tensor `{name}` is computed as {compute:?} on {:?}, so it cannot refill a {:?} tensor",
                dst.device(),
                dst.dtype(),
            )));
        }
        if !dst.device().is_cpu() {
            return self.fill_device(name, dst, staging);
        }
        // f32 on a little-endian host is stored as it is computed: read straight
        // into the tensor. Anything else lands in the staging buffer first.
        let in_place =
            entry.dtype == Dtype::F32 && shard.direct.is_none() && cfg!(target_endian = "little");
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        let mut fill = |out: &mut [f32]| {
            let result = if in_place {
                self.read_into(entry, bytemuck::cast_slice_mut(out))
            } else {
                self.read(entry, staging)
                    .map(|bytes| widen_into(bytes, entry.dtype, out))
            };
            if let Err(e) = result {
                *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            }
        };
        let op = FillOp {
            fill: RefCell::new(&mut fill),
        };
        let done = dst.inplace_op1(&op);
        if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        done?;
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn fill_device(&self, name: &str, dst: &Tensor, staging: &mut StagingBuffer) -> Result<()> {
        let mut loader = staging.take_device_loader().ok_or_else(|| {
            Error::Input(format!(
                "refilling `{name}` on {:?} needs staging made for that device",
                dst.device()
            ))
        })?;
        let done = loader.fill(self, name, dst, staging);
        staging.put_device_loader(loader);
        done
    }

    #[cfg(not(feature = "cuda"))]
    fn fill_device(&self, name: &str, dst: &Tensor, _: &mut StagingBuffer) -> Result<()> {
        Err(Error::Input(format!(
            "cannot refill `{name}` on {:?} in a build without the `cuda` feature",
            dst.device()
        )))
    }

    /// Reads tensor `name`'s stored bytes, unconverted, into the front of `out`
    /// (a GPU loader's page-locked buffer), checking its shape against `shape` and
    /// that `device` computes it in its stored dtype. Returns the byte count.
    pub fn read_stored(
        &self,
        name: &str,
        shape: &[usize],
        device: &Device,
        out: &mut [u8],
        staging: &mut StagingBuffer,
    ) -> Result<usize> {
        let (entry, compute) = self.checked_entry(name, shape, device)?;
        if compute != candle_dtype(entry.dtype) {
            return Err(Error::Input(format!(
                "tensor `{name}` is stored as {:?} but computed as {compute:?} on {device:?}",
                entry.dtype
            )));
        }
        let len = usize::try_from(entry.byte_len()).unwrap_or(usize::MAX);
        let room = out.len();
        let out = out.get_mut(..len).ok_or_else(|| {
            Error::Input(format!(
                "tensor `{name}` of {len} bytes does not fit a buffer of {room}"
            ))
        })?;
        if self.shards[entry.shard].direct.is_some() {
            out.copy_from_slice(self.read(entry, staging)?);
        } else {
            self.read_into(entry, out)?;
        }
        Ok(len)
    }

    /// The dtype decoder layers compute in on `device` (that of their first
    /// projection; lime's checkpoints store every layer alike).
    pub fn layer_dtype(&self, device: &Device) -> DType {
        self.layer_dtype_on(device.is_cpu())
    }

    /// The dtype hidden states flow in on `device`: the embedding's, which every
    /// layer keeps (f32 when the checkpoint has none lime computes in).
    pub fn hidden_dtype(&self, device: &Device) -> DType {
        self.tensors
            .get(&EndWeights::of(&self.config).embed_tokens.name)
            .and_then(|e| compute_dtype_on(e.dtype, device.is_cpu()))
            .unwrap_or(DType::F32)
    }

    /// [`Checkpoint::layer_dtype`] at `placement`, without a device at hand.
    pub fn layer_dtype_at(&self, placement: Placement) -> DType {
        self.layer_dtype_on(placement == Placement::Cpu)
    }

    fn layer_dtype_on(&self, cpu: bool) -> DType {
        let first = LayerWeights::of(&self.config, 0).self_attn.q_proj.weight;
        self.tensors
            .get(&first.name)
            .and_then(|e| compute_dtype_on(e.dtype, cpu))
            .unwrap_or(DType::F32)
    }

    /// The largest stored tensor of any decoder layer, in bytes.
    pub fn largest_layer_tensor(&self) -> u64 {
        self.tensors
            .iter()
            .filter(|(n, _)| layout::is_layer_weight(n))
            .map(|(_, e)| e.byte_len())
            .max()
            .unwrap_or(0)
    }

    /// The entry of tensor `name`, checked against the shape the caller expects, and
    /// the dtype it computes in on `device`.
    fn checked_entry(
        &self,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> Result<(&TensorEntry, DType)> {
        let entry = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            dir: self.dir.clone(),
            tensor: name.to_string(),
        })?;
        let shard = &self.shards[entry.shard];
        if entry.shape != shape {
            return Err(Error::ShapeMismatch {
                path: shard.path.clone(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        let compute =
            compute_dtype(entry.dtype, device).ok_or_else(|| Error::UnsupportedDtype {
                path: shard.path.clone(),
                tensor: name.to_string(),
                found: format!("{:?}", entry.dtype),
                reason: "lime computes in F32, F16 or BF16",
            })?;
        Ok((entry, compute))
    }

    /// The stored bytes of `entry`, through `staging`.
    fn read<'b>(&self, entry: &TensorEntry, staging: &'b mut StagingBuffer) -> Result<&'b [u8]> {
        let shard = &self.shards[entry.shard];
        let len = usize::try_from(entry.byte_len())
            .map_err(|_| Error::Input(format!("tensor of {} bytes", entry.byte_len())))?;
        let bytes = match &shard.direct {
            Some(file) => storage::read_direct(
                file,
                entry.start,
                entry.end,
                staging,
                self.throttle.as_ref(),
            )
            .map_err(|e| Error::io(&shard.path, e))?,
            None => {
                let out = staging.window(len);
                storage::read_exact_at(&shard.file, out, entry.start, self.throttle.as_ref())
                    .map_err(|e| Error::io(&shard.path, e))?;
                &*out
            }
        };
        self.logged(entry);
        Ok(bytes)
    }

    /// Reads the stored bytes of `entry` into `out`, which has exactly their length.
    fn read_into(&self, entry: &TensorEntry, out: &mut [u8]) -> Result<()> {
        let shard = &self.shards[entry.shard];
        if out.len() as u64 != entry.byte_len() {
            return Err(Error::Input(format!(
                "{} bytes of room for a tensor of {}",
                out.len(),
                entry.byte_len()
            )));
        }
        storage::read_exact_at(&shard.file, out, entry.start, self.throttle.as_ref())
            .map_err(|e| Error::io(&shard.path, e))?;
        self.logged(entry);
        Ok(())
    }

    fn logged(&self, entry: &TensorEntry) {
        self.log
            .bytes
            .fetch_add(entry.byte_len(), Ordering::Relaxed);
        if let Some(records) = self
            .log
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            records.push(ReadRecord {
                path: self.shards[entry.shard].path.clone(),
                start: entry.start,
                end: entry.end,
            });
        }
    }
}

/// Writes a CPU f32 tensor's storage in place through a callback; candle's in-place
/// custom op is the one safe door to a tensor's memory.
struct FillOp<'f> {
    fill: RefCell<&'f mut Filler<'f>>,
}

type Filler<'f> = dyn FnMut(&mut [f32]) + 'f;

impl InplaceOp1 for FillOp<'_> {
    fn name(&self) -> &'static str {
        "fill-from-checkpoint"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(values) = storage else {
            candle_core::bail!("only f32 tensors are refilled on the CPU");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("only contiguous tensors are refilled");
        };
        (self.fill.borrow_mut())(&mut values[start..end]);
        Ok(())
    }
}

fn shards_path(shards: &[Shard], i: usize) -> &Path {
    shards
        .get(i)
        .map(|s| s.path.as_path())
        .unwrap_or(Path::new("?"))
}

/// The dtype a stored tensor is computed in on `device`: never narrower than stored.
/// The CPU backend multiplies only f32 well (its bf16 matmul rounds results back to
/// bf16), so on CPU every float dtype is widened, exactly, to f32.
pub fn compute_dtype(stored: Dtype, device: &Device) -> Option<DType> {
    compute_dtype_on(stored, device.is_cpu())
}

pub(crate) fn compute_dtype_on(stored: Dtype, cpu: bool) -> Option<DType> {
    match (stored, cpu) {
        (Dtype::F32 | Dtype::F16 | Dtype::BF16, true) => Some(DType::F32),
        (Dtype::F32, false) => Some(DType::F32),
        (Dtype::F16, false) => Some(DType::F16),
        (Dtype::BF16, false) => Some(DType::BF16),
        _ => None,
    }
}

fn candle_dtype(d: Dtype) -> DType {
    match d {
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        _ => DType::F32,
    }
}

/// Converts little-endian f32, f16 or bf16 bytes into `out`; every value is exact.
fn widen_into(bytes: &[u8], dtype: Dtype, out: &mut [f32]) {
    match dtype {
        Dtype::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        Dtype::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        _ => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
}

/// Shard file name → the tensors the index says it holds.
fn read_index(path: &Path) -> Result<BTreeMap<String, Vec<String>>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let index: Index = serde_json::from_str(&text).map_err(|e| Error::CorruptHeader {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut shards: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (tensor, file) in index.weight_map {
        if file.contains('/') || file.contains("..") {
            return Err(Error::CorruptHeader {
                path: path.to_path_buf(),
                message: format!(
                    "shard name `{file}` for `{tensor}` leaves the checkpoint directory"
                ),
            });
        }
        shards.entry(file).or_default().push(tensor);
    }
    Ok(shards)
}

/// Reads and validates one shard's header: every tensor's bytes must lie inside the
/// file and match its dtype and shape, so later reads cannot go astray.
fn read_header(path: &Path, file: &File, shard: usize) -> Result<HashMap<String, TensorEntry>> {
    let corrupt = |message: String| Error::CorruptHeader {
        path: path.to_path_buf(),
        message,
    };
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact_at(&mut len_bytes, 0)
        .map_err(|_| corrupt(format!("file of {file_len} bytes has no header length")))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER || 8 + header_len > file_len {
        return Err(corrupt(format!(
            "header length {header_len} does not fit a file of {file_len} bytes"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8)
        .map_err(|e| Error::io(path, e))?;
    let text = std::str::from_utf8(&header).map_err(|e| corrupt(format!("not UTF-8: {e}")))?;
    let metadata: safetensors::tensor::Metadata =
        serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
    let data_start = 8 + header_len;
    let mut out = HashMap::new();
    for (name, info) in metadata.tensors() {
        let elems = info
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| corrupt(format!("tensor `{name}`: shape {:?} overflows", info.shape)))?;
        let (s, e) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
        let expected = elems.saturating_mul(info.dtype.bitsize() as u64) / 8;
        if e < s || e - s != expected {
            return Err(corrupt(format!(
                "tensor `{name}`: offsets {s}..{e} do not match {:?} {:?} ({expected} bytes)",
                info.dtype, info.shape
            )));
        }
        let (start, end) = (data_start + s, data_start + e);
        if end > file_len {
            return Err(Error::Truncated {
                path: path.to_path_buf(),
                tensor: name,
                needed: end,
                actual: file_len,
            });
        }
        out.insert(
            name,
            TensorEntry {
                shard,
                dtype: info.dtype,
                shape: info.shape.clone(),
                start,
                end,
            },
        );
    }
    Ok(out)
}
