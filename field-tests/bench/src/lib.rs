//! lime-testbench: lime on one machine as if on several devices. [`cluster`]
//! starts a broker and stages as real processes with emulated budgets, paced
//! compute and reads, optionally in network namespaces ([`netns`]); the
//! benchmarks run against it side by side with their baselines ([`serving`],
//! [`fill`], [`offloading`], [`validation`], [`device_bench`], [`kernels`]), as do the
//! bounded soak ([`soak`]) and the bandwidth swing ([`swing`]). `lime up` and
//! `lime bench` call into it; the integration tests in `tests/` drive it.

pub mod cluster;
pub mod device_bench;
pub mod fill;
pub mod kernels;
pub mod netns;
pub mod offloading;
pub mod serving;
pub mod soak;
pub mod swing;
pub mod validation;

/// A directory for one benchmark run's configs and logs, unique to this process.
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{name}-{}", std::process::id()))
}
