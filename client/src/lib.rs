//! lime's command line, as a library so that tests drive the same code the binary
//! runs: synthesise checkpoints, generate in one process, and benchmark.

pub mod bench;
pub mod generate;
pub mod progress;
pub mod synth;
