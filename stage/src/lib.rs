//! lime-stage: the runtime on one device (residency manager, KV cache pool,
//! pipeline loop, data plane, the starter role).
//!
//! It is built on `lime-kernels`' layer ranges and per-sequence caches. The
//! distributed runtime arrives with the end-to-end issue; until then this crate
//! exposes nothing, and its binary says so instead of pretending to serve.
