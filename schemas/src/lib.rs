//! The types that cross a lime process boundary.
//!
//! Everything here is plain data with serde derives and no I/O, so that the broker,
//! the stages and the command line agree on one definition of each payload. This
//! crate grows with the MQTT surface and the data plane; today it holds the
//! sampling parameters, which a request carries and the kernels obey.

mod sampling;

pub use sampling::{SamplingError, SamplingParams};
