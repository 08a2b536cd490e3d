//! The residency manager: which of a stage's layers stay in memory and how the
//! others come back when a micro-batch needs them.
//!
//! Resident layers are loaded once. Offloaded layers live in storage and pass
//! through a fixed pool of preallocated slots: a loader thread refills a free slot
//! in place with the next offloaded layer in visit order (prefetch), so that the
//! read overlaps this stage's other layers, the network and the other stages. The
//! pipeline takes a filled slot when a micro-batch reaches its layer, runs every
//! micro-batch waiting there through it, and gives the slot back. Without prefetch
//! (the `naive` and `mdi` baselines) the loader reads a layer only when asked.
//!
//! Prediction is the pattern of the recent asks ([`Demand`]), and until there is
//! one, "the next offloaded layer in visit order". When a micro-batch asks for a
//! layer not coming next, loaded slots that were not wanted are given back and
//! the loader reads the wanted layer first.
//!
//! The split moves at run time ([`crate::memory::adaptation`] chooses the layers): a
//! resident layer is evicted by dropping it and adding it to the loader's order
//! (starting the loader with one slot if there was none), and a streamed layer
//! becomes resident by keeping the copy a slot was just filled with, so bringing
//! it back costs no extra read.

use crate::memory::demand::Demand;
use crate::memory::Split;
use lime_kernels::{Checkpoint, DecoderLayer, Device, StagingBuffer};
use std::collections::{HashMap, VecDeque};
use std::ops::Deref;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Counters of the loader, cumulative since start.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadStats {
    /// Layers read into slots; failed reads do not count.
    pub layers: u64,
    /// Bytes the loader read from storage.
    pub bytes: u64,
    /// Time the loader spent reading: with `bytes`, the storage bandwidth seen.
    pub busy: Duration,
    /// CPU the loader thread used while reading (page-cache copies, conversion):
    /// what streaming takes from compute on a shared CPU. Zero where the kernel
    /// does not say.
    pub cpu: Duration,
}

struct State {
    /// Offloaded layers in visit order: what the loader cycles through.
    order: Vec<usize>,
    free: Vec<DecoderLayer>,
    /// Filled slots, in the order they were read.
    ready: VecDeque<DecoderLayer>,
    /// The layer being read now.
    loading: Option<usize>,
    /// With prefetch and no pattern yet: the position in the visit order of the
    /// next layer to read.
    cursor: usize,
    /// The asks so far, whose pattern says what to read ahead.
    demand: Demand,
    /// A layer asked for and not coming: read it first.
    wanted: Option<usize>,
    /// The last read that failed, until the pipeline collects it.
    failed: Option<(usize, String)>,
    stats: LoadStats,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(guard).unwrap_or_else(|p| p.into_inner())
    }
}

/// A filled slot lent to the pipeline; it goes back to the pool when dropped, or
/// becomes resident through [`Residency::keep`].
pub struct Slot {
    layer: Option<DecoderLayer>,
    shared: Arc<Shared>,
}

impl Deref for Slot {
    type Target = DecoderLayer;
    fn deref(&self) -> &DecoderLayer {
        self.layer
            .as_ref()
            .expect("a lent slot holds its layer until dropped")
    }
}

impl Slot {
    /// The layer, taken out of the pool for good.
    fn into_layer(mut self) -> Option<DecoderLayer> {
        self.layer.take()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(layer) = self.layer.take() {
            self.shared.lock().free.push(layer);
            self.shared.changed.notify_all();
        }
    }
}

/// A layer ready to run: resident, or streamed into a slot.
pub enum LayerRef<'a> {
    /// Held for good; borrowed from the residency.
    Resident(&'a DecoderLayer),
    /// Lent from the pool; the slot goes back when this is dropped.
    Streamed(Slot),
}

impl Deref for LayerRef<'_> {
    type Target = DecoderLayer;
    fn deref(&self) -> &DecoderLayer {
        match self {
            LayerRef::Resident(l) => l,
            LayerRef::Streamed(s) => s,
        }
    }
}

/// The loader thread and the slot pool it fills.
struct Streamer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Streamer {
    /// Allocates `slots` empty slots and starts the loader on `order`.
    fn start(
        ckpt: &Arc<Checkpoint>,
        device: &Device,
        order: &[usize],
        slots: usize,
        prefetch: bool,
    ) -> lime_kernels::Result<Self> {
        let free = (0..slots)
            .map(|_| empty_slot(ckpt, device))
            .collect::<lime_kernels::Result<Vec<_>>>()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                order: order.to_vec(),
                free,
                ready: VecDeque::new(),
                loading: None,
                cursor: 0,
                demand: Demand::default(),
                wanted: None,
                failed: None,
                stats: LoadStats::default(),
                stop: false,
            }),
            changed: Condvar::new(),
        });
        // On a GPU this also holds the loader's page-locked buffers and copy stream.
        let staging = ckpt.layer_staging(device)?;
        let (ckpt, loader_shared) = (ckpt.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name("lime-loader".into())
            .spawn(move || load_loop(&loader_shared, &ckpt, prefetch, staging))
            .map_err(|e| lime_kernels::Error::Input(format!("starting the loader: {e}")))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }
}

/// A slot for one streamed layer, in the dtype the layers compute in on `device`.
fn empty_slot(ckpt: &Checkpoint, device: &Device) -> lime_kernels::Result<DecoderLayer> {
    DecoderLayer::empty(ckpt.config(), ckpt.layer_dtype(device), device)
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The stage's layers: resident ones, and the streamer for the offloaded rest.
pub struct Residency {
    resident: HashMap<usize, DecoderLayer>,
    /// Offloaded layers in visit order.
    offloaded: Vec<usize>,
    slots: usize,
    streamer: Option<Streamer>,
    prefetch: bool,
    resident_bytes: u64,
    ckpt: Arc<Checkpoint>,
    /// Where layers and slots live.
    device: Device,
    /// The counters of loaders stopped because nothing was left to stream.
    earlier: LoadStats,
}

impl Residency {
    /// Loads the resident layers, allocates `slots` slots and starts the loader
    /// (which, with `prefetch`, begins reading the first offloaded layers at once).
    /// `progress(done, total)` counts resident layers loaded.
    pub fn start(
        ckpt: Arc<Checkpoint>,
        resident: &[usize],
        offloaded: &[usize],
        slots: usize,
        prefetch: bool,
        progress: impl FnMut(usize, usize),
    ) -> lime_kernels::Result<Self> {
        let split = Split {
            resident: resident.to_vec(),
            offloaded: offloaded.to_vec(),
            slots,
        };
        Self::start_with(
            ckpt,
            &Device::Cpu,
            HashMap::new(),
            &split,
            prefetch,
            progress,
        )
    }

    /// [`Residency::start`] on `device`, taking resident layers from `loaded` (what
    /// the stage held before a new plan) instead of reading them again.
    pub fn start_with(
        ckpt: Arc<Checkpoint>,
        device: &Device,
        mut loaded: HashMap<usize, DecoderLayer>,
        split: &Split,
        prefetch: bool,
        mut progress: impl FnMut(usize, usize),
    ) -> lime_kernels::Result<Self> {
        let (resident, offloaded, slots) = (&split.resident, &split.offloaded, split.slots);
        // Free what the new split does not keep before reading anything.
        loaded.retain(|l, _| resident.contains(l));
        let mut layers = HashMap::new();
        let mut resident_bytes = 0;
        for (i, &l) in resident.iter().enumerate() {
            let layer = match loaded.remove(&l) {
                Some(layer) => layer,
                None => DecoderLayer::load(&ckpt, l, device)?,
            };
            resident_bytes += layer.bytes() as u64;
            layers.insert(l, layer);
            progress(i + 1, resident.len());
        }
        drop(loaded);
        let slots = if offloaded.is_empty() {
            0
        } else {
            slots.clamp(1, offloaded.len())
        };
        let streamer = if offloaded.is_empty() {
            None
        } else {
            Some(Streamer::start(&ckpt, device, offloaded, slots, prefetch)?)
        };
        Ok(Self {
            resident: layers,
            offloaded: offloaded.to_vec(),
            slots,
            streamer,
            prefetch,
            resident_bytes,
            ckpt,
            device: device.clone(),
            earlier: LoadStats::default(),
        })
    }

    /// Holds nothing: what a stage has while it moves to a new plan.
    pub fn none(ckpt: Arc<Checkpoint>) -> Self {
        Self {
            resident: HashMap::new(),
            offloaded: Vec::new(),
            slots: 0,
            streamer: None,
            prefetch: false,
            resident_bytes: 0,
            ckpt,
            device: Device::Cpu,
            earlier: LoadStats::default(),
        }
    }

    /// Gives up the resident layers (stopping the loader), for a stage moving to
    /// a new plan that may keep some of them.
    pub fn into_resident(mut self) -> HashMap<usize, DecoderLayer> {
        self.streamer = None;
        std::mem::take(&mut self.resident)
    }

    /// Streams resident layer `index` from now on, freeing its memory. False if
    /// it is not resident. A stage that streamed nothing before starts its loader
    /// with [`Residency::stream`], once it has freed the room for a slot.
    pub fn evict(&mut self, index: usize) -> bool {
        let Some(layer) = self.resident.remove(&index) else {
            return false;
        };
        self.resident_bytes -= layer.bytes() as u64;
        drop(layer);
        self.offloaded.push(index);
        self.offloaded.sort_unstable();
        if let Some(streamer) = &self.streamer {
            let mut st = streamer.shared.lock();
            st.order = self.offloaded.clone();
            st.demand.clear();
            drop(st);
            streamer.shared.changed.notify_all();
        }
        true
    }

    /// Starts the loader with one slot if layers are offloaded and none was
    /// running.
    pub fn stream(&mut self) -> lime_kernels::Result<()> {
        if self.streamer.is_none() && !self.offloaded.is_empty() {
            self.streamer = Some(Streamer::start(
                &self.ckpt,
                &self.device,
                &self.offloaded,
                1,
                self.prefetch,
            )?);
            self.slots = 1;
        }
        Ok(())
    }

    /// Keeps the layer `slot` was filled with as resident. The pool gets a fresh
    /// slot in its place, unless nothing is left to stream, when the loader and
    /// its slots go.
    pub fn keep(&mut self, slot: Slot) -> lime_kernels::Result<()> {
        let Some(layer) = slot.into_layer() else {
            return Ok(());
        };
        let Some(index) = layer.index() else {
            return Ok(());
        };
        self.resident_bytes += layer.bytes() as u64;
        self.resident.insert(index, layer);
        self.offloaded.retain(|&l| l != index);
        if self.offloaded.is_empty() {
            if let Some(streamer) = self.streamer.take() {
                self.earlier = add(self.earlier, streamer.shared.lock().stats);
            }
            self.slots = 0;
            return Ok(());
        }
        if let Some(streamer) = &self.streamer {
            let fresh = empty_slot(&self.ckpt, &self.device)?;
            let mut st = streamer.shared.lock();
            st.order = self.offloaded.clone();
            st.demand.clear();
            st.free.push(fresh);
            drop(st);
            streamer.shared.changed.notify_all();
        }
        Ok(())
    }

    /// Layer `index`, waiting for its read if it is streamed; also returns how long
    /// it waited (the loading bubble).
    pub fn layer(&self, index: usize) -> lime_kernels::Result<(LayerRef<'_>, Duration)> {
        self.layer_or_free(index, &mut || false)
    }

    /// [`Residency::layer`], calling `free_slot` when every slot is lent out (kept
    /// for a round, [`crate::memory::rounds`]) so that the read can have one back;
    /// `free_slot` says whether it gave one.
    pub fn layer_or_free(
        &self,
        index: usize,
        free_slot: &mut dyn FnMut() -> bool,
    ) -> lime_kernels::Result<(LayerRef<'_>, Duration)> {
        if let Some(l) = self.resident.get(&index) {
            return Ok((LayerRef::Resident(l), Duration::ZERO));
        }
        let (Some(streamer), Some(position)) = (
            &self.streamer,
            self.offloaded.iter().position(|&l| l == index),
        ) else {
            return Err(lime_kernels::Error::Input(format!(
                "layer {index} is not held by this stage"
            )));
        };
        let started = Instant::now();
        let shared = &streamer.shared;
        let mut st = shared.lock();
        st.demand.record(index);
        loop {
            if let Some(p) = st.ready.iter().position(|l| l.index() == Some(index)) {
                let skipped: Vec<DecoderLayer> = st.ready.drain(..p).collect();
                st.free.extend(skipped);
                let layer = st.ready.pop_front();
                drop(st);
                shared.changed.notify_all();
                let slot = Slot {
                    layer,
                    shared: shared.clone(),
                };
                return Ok((LayerRef::Streamed(slot), started.elapsed()));
            }
            if st.failed.as_ref().is_some_and(|(l, _)| *l == index) {
                let (_, message) = st.failed.take().unwrap_or_default();
                return Err(lime_kernels::Error::Input(format!(
                    "reading offloaded layer {index}: {message}"
                )));
            }
            if st.loading != Some(index) {
                // Not coming next: free what was read ahead and point the loader here.
                let unwanted: Vec<DecoderLayer> = st.ready.drain(..).collect();
                st.free.extend(unwanted);
                st.cursor = position;
                st.wanted = Some(index);
                shared.changed.notify_all();
            }
            if st.free.is_empty() && st.loading.is_none() && st.ready.is_empty() {
                drop(st);
                if !free_slot() {
                    return Err(lime_kernels::Error::Input(format!(
                        "layer {index} has no slot to be read into: every slot is lent out"
                    )));
                }
                st = shared.lock();
                continue;
            }
            st = shared.wait(st);
        }
    }

    /// Indexes of the layers held for good, in model order.
    pub fn resident(&self) -> Vec<usize> {
        let mut r: Vec<usize> = self.resident.keys().copied().collect();
        r.sort_unstable();
        r
    }

    /// Indexes of the streamed layers, in visit order.
    pub fn offloaded(&self) -> &[usize] {
        &self.offloaded
    }

    /// Slots in the pool; 0 when nothing is streamed.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Whether offloaded layers are (or would be) read ahead of need.
    pub fn prefetch(&self) -> bool {
        self.prefetch
    }

    /// Bytes the resident layers take, slots not included.
    pub fn resident_bytes(&self) -> u64 {
        self.resident_bytes
    }

    /// The loader's counters since start, loaders stopped on the way included.
    pub fn stats(&self) -> LoadStats {
        let now = self
            .streamer
            .as_ref()
            .map(|s| s.shared.lock().stats)
            .unwrap_or_default();
        add(self.earlier, now)
    }
}

fn add(a: LoadStats, b: LoadStats) -> LoadStats {
    LoadStats {
        layers: a.layers + b.layers,
        bytes: a.bytes + b.bytes,
        busy: a.busy + b.busy,
        cpu: a.cpu + b.cpu,
    }
}

/// CPU time the calling thread has run, from `/proc/thread-self/schedstat`
/// (its first field, in nanoseconds); `None` where there is no such file.
fn thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// The loader thread: refill a free slot with the next layer to read, hand it over,
/// repeat until stopped.
fn load_loop(shared: &Shared, ckpt: &Checkpoint, prefetch: bool, mut staging: StagingBuffer) {
    loop {
        let (index, mut slot) = {
            let mut st = shared.lock();
            loop {
                if st.stop {
                    return;
                }
                if !st.free.is_empty() && !st.order.is_empty() {
                    let next = match st.wanted.take() {
                        Some(w) => Some(w),
                        None if prefetch => {
                            let held: Vec<usize> =
                                st.ready.iter().filter_map(DecoderLayer::index).collect();
                            st.demand
                                .next_to_read(&st.order, &held)
                                .or(Some(st.order[st.cursor % st.order.len()]))
                        }
                        None => None,
                    };
                    if let Some(index) = next {
                        let Some(slot) = st.free.pop() else { continue };
                        st.loading = Some(index);
                        if let Some(p) = st.order.iter().position(|&l| l == index) {
                            st.cursor = (p + 1) % st.order.len();
                        }
                        break (index, slot);
                    }
                }
                st = shared.wait(st);
            }
        };
        let started = Instant::now();
        let cpu_before = thread_cpu();
        let bytes_before = ckpt.bytes_read();
        let result = slot.reload(ckpt, index, &mut staging);
        let took = started.elapsed();
        let cpu = thread_cpu()
            .zip(cpu_before)
            .map_or(Duration::ZERO, |(after, before)| {
                after.saturating_sub(before)
            });
        let mut st = shared.lock();
        st.loading = None;
        st.stats.busy += took;
        st.stats.cpu += cpu;
        st.stats.bytes += ckpt.bytes_read() - bytes_before;
        match result {
            Ok(()) => {
                st.stats.layers += 1;
                tracing::trace!(
                    layer = index,
                    ms = took.as_secs_f64() * 1e3,
                    "layer streamed"
                );
                st.ready.push_back(slot);
            }
            Err(e) => {
                tracing::error!(layer = index, error = %e, "reading an offloaded layer failed");
                st.failed = Some((index, e.to_string()));
                st.free.push(slot);
            }
        }
        drop(st);
        shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lime_kernels::synth::{self, Preset, StoredDtype, SynthSpec};

    fn checkpoint() -> (tempfile::TempDir, Arc<Checkpoint>) {
        let dir = tempfile::tempdir().unwrap();
        let spec = SynthSpec::preset(Preset::Tiny, StoredDtype::BF16, 3);
        synth::synthesize(&spec, dir.path(), &mut |_, _| {}).unwrap();
        let ckpt = Arc::new(Checkpoint::open(dir.path()).unwrap());
        (dir, ckpt)
    }

    fn settle(r: &Residency, layers: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while r.stats().layers < layers && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    #[test]
    fn prefetch_reads_ahead_in_visit_order_and_serves_any_order() {
        let (_dir, ckpt) = checkpoint();
        let offloaded = [1, 4, 7, 10];
        let r = Residency::start(ckpt, &[0, 2], &offloaded, 2, true, |_, _| {}).unwrap();
        assert_eq!(r.resident(), vec![0, 2]);
        // Both slots fill before anything is asked.
        settle(&r, 2);
        assert_eq!(r.stats().layers, 2);
        for round in 0..3 {
            for &l in &offloaded {
                let (layer, _) = r.layer(l).unwrap();
                assert_eq!(layer.index(), Some(l), "round {round}");
            }
        }
        // In visit order every layer is read once per round (plus read-ahead).
        assert!(r.stats().layers <= 3 * 4 + 2, "{:?}", r.stats());
        // Out of order: what was read ahead is given back, the wanted layer comes.
        for l in [10, 1, 1, 7, 4, 10] {
            assert_eq!(r.layer(l).unwrap().0.index(), Some(l));
        }
        assert_eq!(r.layer(0).unwrap().0.index(), Some(0));
        let err = r.layer(3).err().unwrap();
        assert!(err.to_string().contains("not held"), "{err}");
    }

    #[test]
    fn without_prefetch_layers_are_read_only_when_asked() {
        let (_dir, ckpt) = checkpoint();
        let r = Residency::start(ckpt, &[], &[3, 5], 1, false, |_, _| {}).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(r.stats().layers, 0);
        for l in [5, 3, 3, 5] {
            let (layer, _) = r.layer(l).unwrap();
            assert_eq!(layer.index(), Some(l));
        }
        assert_eq!(r.stats().layers, 4, "each visit reads its layer");
        assert!(r.stats().bytes > 0);
    }

    #[test]
    fn a_failed_read_reaches_the_pipeline_as_an_error() {
        let (dir, ckpt) = checkpoint();
        let r = Residency::start(ckpt, &[], &[6], 1, false, |_, _| {}).unwrap();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "safetensors") {
                let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                f.set_len(64).unwrap();
            }
        }
        let err = r.layer(6).err().unwrap();
        assert!(err.to_string().contains("offloaded layer 6"), "{err}");
    }
}
