//! lime-broker: the control plane (embedded MQTT broker, stage membership, planner).
//!
//! Not built yet: the end-to-end issue adds the embedded broker and the planner
//! issue adds planning. Until then this crate exposes nothing.
