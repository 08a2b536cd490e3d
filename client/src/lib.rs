//! lime's command line, as a library so that tests drive the same code the binary
//! runs: synthesise checkpoints, generate in one process, start and query a
//! cluster, and benchmark.

pub mod ask;
pub mod bench;
pub mod cluster;
pub mod device_bench;
pub mod generate;
pub mod mqtt;
pub mod netns;
pub mod offloading;
pub mod plan;
pub mod progress;
pub mod serving;
pub mod soak;
pub mod status;
pub mod swing;
pub mod synth;
pub mod up;
pub mod validation;
