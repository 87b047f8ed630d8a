//! What `calibrate` hands on: per-step and global activation ranges, the evaluation
//! records and their float outputs, the sampled layer inputs for reconstruction.

use std::collections::BTreeMap;

use crate::analysis::layer_inputs::LayerColumns;
use crate::ir::Tensor;

/// EMA momentum of the reference (TFMQ-DM / Q-Diffusion).
pub const EMA_MOMENTUM: f32 = 0.95;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Range {
    pub min: f32,
    pub max: f32,
}

impl Range {
    pub(crate) fn ema(self, batch: Range) -> Range {
        let m = EMA_MOMENTUM;
        Range {
            min: m * self.min + (1.0 - m) * batch.min,
            max: m * self.max + (1.0 - m) * batch.max,
        }
    }
    pub(crate) fn union(self, o: Range) -> Range {
        Range {
            min: self.min.min(o.min),
            max: self.max.max(o.max),
        }
    }
}

/// What calibration learned.
#[derive(Clone, Debug, Default)]
pub struct Calibration {
    /// value → time step → EMA range.
    pub per_step: BTreeMap<String, BTreeMap<i64, Range>>,
    /// value → time step → min/max over every batch at that step. What step groups of
    /// FSC calibrate on: a step is visited by a few small batches (one image a batch on a
    /// fixed-batch export), and momentum 0.95 leaves the EMA at the first batch's
    /// extremes, which other trajectories pass at that step (clipped: the worst held-out
    /// step lost up to 3.6 dB against one set of scales, issue #15).
    pub per_step_union: BTreeMap<String, BTreeMap<i64, Range>>,
    /// value → min/max over all calibration data.
    pub global: BTreeMap<String, Range>,
    /// Model inputs of the evaluation records (one batch per visited step).
    pub records: Vec<BTreeMap<String, Tensor>>,
    /// The time step of each record.
    pub record_steps: Vec<i64>,
    /// The float model's first output on each record, from the calibration runs (the
    /// reference of the quality report, which then need not run the float model again).
    pub record_outputs: Vec<Tensor>,
    /// Mean seconds of one calibration call (wall clock: what the user waits).
    pub call_seconds: f64,
    /// Mean work seconds of one calibration call ([`crate::analysis::budget::WorkClock`]):
    /// what the `auto` trials decide on, so that the machine's load does not change the
    /// output.
    pub call_work_seconds: f64,
    /// Inputs fed with seeded stand-ins (no --calib file gave them).
    pub stand_ins: Vec<String>,
    /// The graph input carrying the sample and the time step.
    pub sample_input: String,
    pub timestep_input: String,
    pub batches: usize,
    /// Sampled inputs of the layers weight reconstruction will round (spilled to a
    /// temporary file), from the runs of the evaluation records; `None` when no
    /// reconstruction was asked for.
    pub layer_columns: Option<std::sync::Arc<LayerColumns>>,
    /// PAR: the quantized model's (the driver's) inputs of the same layers, in the same
    /// order, sampled at the same positions of the same runs as `layer_columns`; GPTQ then
    /// reconstructs each layer reading them against the float layer's output.
    pub quant_layer_columns: Option<std::sync::Arc<LayerColumns>>,
    /// How the calibration budget cut the trajectories, when it did.
    pub budget_note: Option<String>,
    /// What the trajectories were: `ddim at 50, 30, 25, 20 steps` (empty for recorded
    /// calls).
    pub trajectories: String,
    /// Lines for the user (guidance's unconditional input, unused file entries, ...).
    pub notes: Vec<String>,
}
