//! lime-client: what lime's tools share. The user's CLI (`lime`) and the test
//! bench (`lime-testbench`) both reach a cluster's broker ([`mqtt`]), ask it
//! ([`ask`]), read its retained status ([`status`]), write synthetic checkpoints
//! ([`synth`]) with progress on a terminal ([`progress`]), and start lime's other
//! binaries ([`binaries`]).

pub mod ask;
pub mod binaries;
pub mod mqtt;
pub mod progress;
pub mod status;
pub mod synth;
