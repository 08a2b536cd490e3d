//! How checkpoint bytes come off storage: positioned reads in bounded pieces,
//! optionally around the page cache (direct I/O) and optionally paced to the
//! bandwidth of a slower device (emulation for benchmarks).
//!
//! A stage that streams layers reads the same bytes again and again. On a Jetson
//! those reads hit eMMC or NVMe; on a development machine the page cache serves them
//! at memory speed, which would make every offloading benchmark flatter than the
//! field. Direct I/O removes the cache; the [`Throttle`] brings the rate down to a
//! device's.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Direct I/O needs buffer address, file offset and length aligned to the device's
/// logical block; 4 KiB covers every block size in use.
pub const DIRECT_ALIGN: usize = lime_plan::memory::DIRECT_ALIGN as usize;

/// One read system call moves at most this much, so pacing stays smooth and a
/// throttled read of a large tensor does not sleep in one long block.
const READ_PIECE: usize = 1 << 20;

/// How a checkpoint reads its shards.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadOptions {
    /// Read with `O_DIRECT`, bypassing the page cache, where the filesystem allows.
    pub direct: bool,
    /// Emulated storage bandwidth in bytes per second; `None` reads at full speed.
    pub bytes_per_s: Option<u64>,
}

/// A token bucket in bytes: reads take tokens, which refill at the emulated
/// bandwidth, and a read that finds the bucket empty sleeps until it would have
/// finished on the emulated device. The bucket holds at most one read piece, so an
/// idle stage does not bank a burst that real storage could not deliver.
#[derive(Debug)]
pub struct Throttle {
    bytes_per_s: f64,
    capacity: f64,
    state: Mutex<(f64, Instant)>,
}

impl Throttle {
    pub fn new(bytes_per_s: u64) -> Self {
        let rate = bytes_per_s.max(1) as f64;
        Self {
            bytes_per_s: rate,
            capacity: READ_PIECE as f64,
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    /// Accounts `bytes` just read, sleeping for as long as the emulated device
    /// would still be busy with them.
    pub fn take(&self, bytes: usize) {
        let wait = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let (tokens, last) = &mut *state;
            let now = Instant::now();
            *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.bytes_per_s)
                .min(self.capacity)
                - bytes as f64;
            *last = now;
            if *tokens < 0.0 {
                Duration::from_secs_f64(-*tokens / self.bytes_per_s)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// A reusable read buffer whose usable part starts on a [`DIRECT_ALIGN`] boundary,
/// so direct reads and dtype conversion need no allocation once it has grown to the
/// largest tensor read through it.
///
/// For refilling GPU tensors it also carries the GPU's page-locked buffers and copy
/// stream ([`StagingBuffer::for_device`]).
#[derive(Debug, Default)]
pub struct StagingBuffer {
    buf: Vec<u8>,
    #[cfg(feature = "cuda")]
    device: Option<Box<crate::cuda::loader::DeviceLoader>>,
}

impl StagingBuffer {
    /// A buffer that can stage `bytes` (plus the alignment slack of a direct read)
    /// without growing.
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            buf: vec![0; Self::footprint(bytes)],
            #[cfg(feature = "cuda")]
            device: None,
        }
    }

    /// Staging for refilling tensors on `device`: `bytes` of host staging, and on a
    /// GPU a loader whose page-locked buffers hold tensors of up to `largest` bytes.
    pub fn for_device(
        device: &candle_core::Device,
        bytes: usize,
        largest: usize,
    ) -> crate::Result<Self> {
        let staging = Self::with_capacity(bytes);
        if device.is_cpu() {
            return Ok(staging);
        }
        #[cfg(feature = "cuda")]
        {
            // Mapped slots (integrated GPUs) are read into in place: no copies to
            // stage, so no page-locked buffers to hold.
            if crate::GpuTraits::query(device)?.load_path() == crate::LoadPath::Mapped {
                return Ok(staging);
            }
            let loader = crate::cuda::loader::DeviceLoader::new(device, largest)?;
            Ok(Self {
                device: Some(Box::new(loader)),
                ..staging
            })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = largest;
            Err(crate::Error::Input(format!(
                "cannot stage tensors for {device:?} in a build without the `cuda` feature"
            )))
        }
    }

    /// The GPU loader, taken out for one refill (it needs the host staging too).
    #[cfg(feature = "cuda")]
    pub(crate) fn take_device_loader(&mut self) -> Option<Box<crate::cuda::loader::DeviceLoader>> {
        self.device.take()
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn put_device_loader(&mut self, loader: Box<crate::cuda::loader::DeviceLoader>) {
        self.device = Some(loader);
    }

    /// Memory a buffer able to stage `bytes` holds.
    pub fn footprint(bytes: usize) -> usize {
        lime_plan::memory::read_buffer_bytes(bytes as u64) as usize
    }

    /// Bytes allocated (page-locked GPU buffers included).
    pub fn capacity(&self) -> usize {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.device {
            return self.buf.len() + d.bytes();
        }
        self.buf.len()
    }

    /// An aligned window of `len` bytes, growing the buffer if it is too small.
    pub(crate) fn window(&mut self, len: usize) -> &mut [u8] {
        let needed = len + DIRECT_ALIGN;
        if self.buf.len() < needed {
            self.buf = vec![0; Self::footprint(len)];
        }
        let skip = self.buf.as_ptr().align_offset(DIRECT_ALIGN);
        &mut self.buf[skip..skip + len]
    }
}

/// Fills `out` from `file` at `offset`, in pieces paced by `throttle`.
pub(crate) fn read_exact_at(
    file: &File,
    out: &mut [u8],
    offset: u64,
    throttle: Option<&Throttle>,
) -> std::io::Result<()> {
    let mut done = 0;
    while done < out.len() {
        let end = (done + READ_PIECE).min(out.len());
        file.read_exact_at(&mut out[done..end], offset + done as u64)?;
        if let Some(t) = throttle {
            t.take(end - done);
        }
        done = end;
    }
    Ok(())
}

/// Reads `start..end` of a file opened with `O_DIRECT` through `staging`, returning
/// the requested bytes. The aligned read may run past the end of the file; only the
/// requested range has to exist.
pub(crate) fn read_direct<'b>(
    file: &File,
    start: u64,
    end: u64,
    staging: &'b mut StagingBuffer,
    throttle: Option<&Throttle>,
) -> std::io::Result<&'b [u8]> {
    let align = DIRECT_ALIGN as u64;
    let first = start / align * align;
    let last = end.div_ceil(align) * align;
    let window = staging.window((last - first) as usize);
    let wanted = (end - first) as usize;
    let mut done = 0;
    while done < wanted {
        let piece = (window.len() - done).min(READ_PIECE);
        let n = file.read_at(&mut window[done..done + piece], first + done as u64)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the file ends {} bytes into a read of {wanted}", done),
            ));
        }
        if let Some(t) = throttle {
            t.take(n);
        }
        done += n;
    }
    Ok(&window[(start - first) as usize..wanted])
}

/// Opens `path` for direct reads, or `None` where the filesystem refuses `O_DIRECT`
/// (tmpfs, some overlays): the caller then reads through the page cache.
pub(crate) fn open_direct(path: &std::path::Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&data).unwrap();
        f.flush().unwrap();
        (f, data)
    }

    #[test]
    fn direct_reads_return_exactly_the_requested_bytes() {
        let (f, data) = file_of(3 * DIRECT_ALIGN + 1234);
        let file = open_direct(f.path()).unwrap_or_else(|| File::open(f.path()).unwrap());
        let mut staging = StagingBuffer::default();
        for (s, e) in [
            (0, 10),
            (5, 4096),
            (4095, 4097),
            (100, data.len()),
            (8192, 12288),
        ] {
            let got = read_direct(&file, s as u64, e as u64, &mut staging, None).unwrap();
            assert_eq!(got, &data[s..e], "range {s}..{e}");
        }
        let err = read_direct(&file, 0, data.len() as u64 + 1, &mut staging, None).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn throttle_paces_reads_to_the_emulated_bandwidth() {
        let (f, data) = file_of(4 << 20);
        let file = File::open(f.path()).unwrap();
        let throttle = Throttle::new(40 << 20);
        let mut out = vec![0; data.len()];
        let started = Instant::now();
        read_exact_at(&file, &mut out, 0, Some(&throttle)).unwrap();
        let took = started.elapsed().as_secs_f64();
        assert_eq!(out, data);
        // 4 MiB at 40 MiB/s is 100 ms; the bucket may start with nothing banked.
        assert!(took >= 0.09, "4 MiB at 40 MiB/s took only {took:.3} s");
    }
}
