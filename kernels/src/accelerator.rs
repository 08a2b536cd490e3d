//! Which processor a stage computes on, and what its loader must know about it.
//!
//! A Jetson's GPU shares one DRAM with the CPU. Copying a streamed layer from
//! page-locked host memory into "device" memory there moves bytes from one part of
//! the same DRAM to another and costs a second layer's worth of memory, so on an
//! integrated GPU the loader maps its host buffers into the GPU and skips the copy
//! ([`LoadPath::Mapped`]). On a discrete GPU the copy crosses PCIe and runs on a
//! stream of its own, overlapping the current layer's compute
//! ([`LoadPath::PinnedCopy`]).

use crate::{Error, Result};
use candle_core::Device;
use std::fmt;
use std::str::FromStr;

/// A compute device as written in settings and on the command line: `cpu`,
/// `cuda` (the first GPU) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::Input(format!(
                "device `{s}` is not one of `cpu`, `cuda` or `cuda:N` (N a GPU ordinal)"
            ))
        };
        match s.trim() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => {
                let ordinal = other.strip_prefix("cuda:").ok_or_else(bad)?;
                ordinal.parse().map(Self::Cuda).map_err(|_| bad())
            }
        }
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device. A GPU in a build without the `cuda` feature, or one the
    /// driver cannot open, is an error that says which.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => open_cuda(ordinal),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal)
        .map_err(|e| Error::Input(format!("cannot open GPU cuda:{ordinal}: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device> {
    Err(Error::Input(format!(
        "device cuda:{ordinal} asked for, but this lime was built without the `cuda` \
         feature; rebuild with `cargo build --release --features cuda` on a machine with \
         the CUDA toolkit"
    )))
}

/// How streamed layers reach the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadPath {
    /// Storage → page-locked host buffer → device copy on the loader's own stream.
    PinnedCopy,
    /// Storage → page-locked host memory mapped into the GPU, which reads it in
    /// place: no device copy and no second copy of the layer in DRAM.
    Mapped,
}

/// Where a stage's tensors live and how its streamed layers reach them: what its
/// memory account must know, in a form that needs no GPU to reason about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Cpu,
    Gpu(LoadPath),
}

impl Placement {
    /// The placement of `device`; a GPU's load path is read from its driver.
    pub fn of(device: &Device) -> Result<Self> {
        if device.is_cpu() {
            return Ok(Self::Cpu);
        }
        #[cfg(feature = "cuda")]
        {
            Ok(Self::Gpu(GpuTraits::query(device)?.load_path()))
        }
        #[cfg(not(feature = "cuda"))]
        {
            Err(Error::Input(format!(
                "{device:?} needs a build with the `cuda` feature"
            )))
        }
    }

    /// The dtype a tensor stored as `stored` is computed in here; `None` for
    /// stored dtypes lime does not compute in.
    pub fn compute_dtype(self, stored: safetensors::Dtype) -> Option<candle_core::DType> {
        crate::checkpoint::compute_dtype_on(stored, self == Self::Cpu)
    }

    /// Page-locked host bytes the GPU loader holds to stream tensors of up to
    /// `largest` bytes: two buffers, one filling while the other is copied.
    pub fn loader_bytes(self, largest: usize) -> usize {
        match self {
            Self::Gpu(LoadPath::PinnedCopy) => {
                lime_plan::memory::pinned_pair_bytes(largest as u64) as usize
            }
            Self::Cpu | Self::Gpu(LoadPath::Mapped) => 0,
        }
    }
}

/// What lime needs to know of a GPU, read from the driver at run time.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuTraits {
    pub name: String,
    pub compute_capability: (u32, u32),
    /// The GPU shares the host's DRAM (every Jetson).
    pub integrated: bool,
    /// Page-locked host memory can be mapped into the GPU's address space.
    pub can_map_host_memory: bool,
    pub total_memory: u64,
    /// Peak memory clock in kHz and bus width in bits, as the driver reports them;
    /// zero where it reports none.
    pub memory_clock_khz: u64,
    pub memory_bus_bits: u64,
    /// Copy engines that can run beside kernels (0: copies and kernels serialise).
    pub async_engines: u32,
}

impl GpuTraits {
    /// The load path for this GPU: mapped where the memory is shared and mapping is
    /// possible, else copies overlapped on their own stream.
    pub fn load_path(&self) -> LoadPath {
        if self.integrated && self.can_map_host_memory {
            LoadPath::Mapped
        } else {
            LoadPath::PinnedCopy
        }
    }

    /// Peak DRAM bandwidth in bytes per second (double data rate over the bus), the
    /// ceiling of the decode roofline; `None` where the driver reports no figures.
    pub fn peak_memory_bandwidth(&self) -> Option<f64> {
        (self.memory_clock_khz > 0 && self.memory_bus_bits > 0)
            .then(|| 2.0 * self.memory_clock_khz as f64 * 1e3 * self.memory_bus_bits as f64 / 8.0)
    }

    /// Whether copies to the GPU can overlap its kernels at all.
    pub fn overlaps_copies(&self) -> bool {
        self.integrated || self.async_engines > 0
    }

    /// Reads the traits of the GPU behind `device`.
    #[cfg(feature = "cuda")]
    pub fn query(device: &Device) -> Result<Self> {
        use candle_core::cuda::cudarc::driver::sys::CUdevice_attribute as A;
        let Device::Cuda(dev) = device else {
            return Err(Error::Input(format!("{device:?} is not a GPU")));
        };
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        let gpu = |e: candle_core::cuda::cudarc::driver::DriverError| {
            Error::Input(format!("reading the GPU's properties: {e}"))
        };
        let attr = |a: A| ctx.attribute(a).map_err(gpu);
        let (major, minor) = ctx.compute_capability().map_err(gpu)?;
        Ok(Self {
            name: ctx.name().map_err(gpu)?,
            compute_capability: (major as u32, minor as u32),
            integrated: attr(A::CU_DEVICE_ATTRIBUTE_INTEGRATED)? != 0,
            can_map_host_memory: attr(A::CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY)? != 0,
            total_memory: ctx.total_mem().map_err(gpu)? as u64,
            memory_clock_khz: attr(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)?.max(0) as u64,
            memory_bus_bits: attr(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)?.max(0) as u64,
            async_engines: attr(A::CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT)?.max(0) as u32,
        })
    }
}

/// The decode roofline: tokens per second when every weight byte a token needs is
/// read once from memory at `bandwidth` bytes per second and nothing else costs.
pub fn decode_roofline(bytes_per_token: u64, bandwidth: f64) -> f64 {
    if bytes_per_token == 0 {
        return f64::INFINITY;
    }
    bandwidth / bytes_per_token as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traits(integrated: bool, can_map: bool) -> GpuTraits {
        GpuTraits {
            name: "test".into(),
            compute_capability: (8, 7),
            integrated,
            can_map_host_memory: can_map,
            total_memory: 64 << 30,
            memory_clock_khz: 3_200_000,
            memory_bus_bits: 256,
            async_engines: 1,
        }
    }

    #[test]
    fn device_specs_parse_and_print() {
        for (text, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("gpu", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), spec);
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        let from_json: DeviceSpec = serde_json::from_str("\"cuda:1\"").unwrap();
        assert_eq!(from_json, DeviceSpec::Cuda(1));
        assert!(serde_json::from_str::<DeviceSpec>("\"npu\"").is_err());
        for bad in ["", "tpu", "cuda:", "cuda:-1", "cuda:x", "CUDA"] {
            let err = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(err.contains("cuda:N"), "{bad}: {err}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_gpu_without_the_feature_is_a_clear_error() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
    }

    #[test]
    fn integrated_gpus_map_and_discrete_ones_copy() {
        assert_eq!(traits(true, true).load_path(), LoadPath::Mapped);
        assert_eq!(traits(false, true).load_path(), LoadPath::PinnedCopy);
        // An integrated GPU that cannot map host memory still gets its copies.
        assert_eq!(traits(true, false).load_path(), LoadPath::PinnedCopy);
    }

    #[test]
    fn peak_bandwidth_matches_the_datasheets() {
        // AGX Orin: 256-bit LPDDR5 at 3200 MHz is the datasheet's 204.8 GB/s.
        let orin = traits(true, true);
        assert_eq!(orin.peak_memory_bandwidth(), Some(204.8e9));
        // Orin NX: 128-bit, 102.4 GB/s.
        let nx = GpuTraits {
            memory_bus_bits: 128,
            ..orin.clone()
        };
        assert_eq!(nx.peak_memory_bandwidth(), Some(102.4e9));
        let unknown = GpuTraits {
            memory_clock_khz: 0,
            ..orin
        };
        assert_eq!(unknown.peak_memory_bandwidth(), None);
    }

    #[test]
    fn the_roofline_is_bandwidth_over_bytes() {
        // Llama-3.3-70B in bf16 (~141 GB) on one AGX Orin: under 1.5 tokens/s.
        let tps = decode_roofline(141_000_000_000, 204.8e9);
        assert!((tps - 1.4525).abs() < 1e-3, "{tps}");
        assert!(decode_roofline(0, 1.0).is_infinite());
    }
}
