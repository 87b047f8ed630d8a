//! tfmqc runtime: runs (quantized) diffusion denoisers on a CPU with tract.
//!
//! This crate depends on no compiler crate: an edge application links only it.

pub mod attr;
pub mod capi;
pub mod classify;
pub mod denoiser;
pub mod engine;
pub mod error;
pub mod int4;
pub mod kernels;
pub mod limits;
pub mod lower;
pub mod meta;
#[cfg(test)]
mod model_check_tests;
pub mod observe;
pub mod ops;
mod ranks;
pub mod rng;
pub mod sampler;
pub mod schedule;
pub mod scheduler;
mod scoped;
mod shape_plans;
mod tensor_data;
pub mod threads;

pub use denoiser::{Denoiser, Guidance};
pub use engine::{Engine, NodeTime, Optimize, ValueFact};
pub use error::{Error, Result};
pub use sampler::{Sampler, SamplerState};
pub use schedule::{BetaSchedule, NoiseRng, Schedule};
pub use scheduler::{PredictionType, SchedulerConfig, TimestepSpacing};
pub use shape_plans::ShapePlan;
pub use threads::with_threads;
pub use tract_onnx::pb;
/// The element type of a [`Tensor`].
pub use tract_onnx::prelude::DatumType;
/// tract's tensor type, the currency of the runtime API.
pub use tract_onnx::prelude::Tensor;
