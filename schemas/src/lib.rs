//! The types that cross a lime process boundary.
//!
//! Everything here is plain data with serde derives and no I/O, so that the broker,
//! the stages and the command line agree on one definition of each payload: MQTT
//! topics and JSON documents, the plan, and the data plane's postcard frames.

#![warn(missing_docs)]

pub mod frame;
pub mod plan;
pub mod profile;
pub mod reply;
pub mod request;
mod sampling;
pub mod signing;
pub mod status;
pub mod telemetry;
pub mod topics;

pub use frame::{Activations, Frame, FrameError, Hello, KvRoom, Round, SeqSlot};
pub use plan::{LayerRange, Plan, PlanChunk, PlanError, PlanPrediction, PlanReview, PlanStage};
pub use profile::{
    DeviceProfile, Link, LinkSpeed, Links, MeasuredCompute, ModelShape, ProfileError, ShapeKey,
    StageProfile, TimePoint,
};
pub use reply::{
    ErrorCode, ErrorReply, Final, FinishReason, Queued, Reply, TextPiece, Timing, Usage,
};
pub use request::{Cancel, ChatMessage, Invalid, Priority, Request};
pub use sampling::{SamplingError, SamplingParams};
pub use status::{MemoryUse, Role, StageState, StageStatus};
pub use telemetry::{
    LinkMeasurement, LoadReport, MemoryReport, ResidencyReport, StageTime, Telemetry,
};
