//! What `quantize` hands on: the quantization plan (bits, the time-step set S, each
//! layer's and each activation's parameters), which the report and evaluation read.

use serde::Serialize;

/// Activation quantization parameters of one value: one (scale, zero point) per group of
/// consecutive steps of S (group of the step at position i: `i · groups.len() / |S|`).
#[derive(Clone, Debug, Serialize)]
pub struct ActParams {
    pub value: String,
    pub groups: Vec<(f32, u8)>,
    /// Mean gain in quantization SNR over the visited steps of these groups against one
    /// set of scales (dB, from the calibrated ranges); 0 with one group.
    pub gain_db: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    pub node: String,
    pub op: String,
    pub weight: Option<String>,
    pub weight_sqnr_db: Option<f64>,
    /// Output error ||ŴX − WX||² on the calibration inputs, round-to-nearest and after
    /// reconstruction (when it ran), and the seconds it took.
    pub output_error_rtn: Option<f64>,
    pub output_error_reconstructed: Option<f64>,
    pub reconstruct_seconds: Option<f64>,
    pub activations: Vec<String>,
}

/// What quantize did, for reports and evaluation.
#[derive(Clone, Debug, Default, Serialize)]
pub struct QuantPlan {
    pub weight_bits: u32,
    pub act_bits: u32,
    /// The most groups any activation has (1: every scale is constant).
    pub step_groups: usize,
    /// The time-step set S, in the order of fold-tib's index.
    pub timesteps: Vec<i64>,
    /// Activations with per-step scales.
    pub per_step_activations: usize,
    pub layers: Vec<LayerReport>,
    pub activations: Vec<ActParams>,
    pub kept_float: Vec<(String, String)>,
    /// Conv and Gemm biases written as int32 with the product scale (what onnxruntime's
    /// int8 fusion needs).
    pub int32_biases: usize,
    /// `--output-qdq`: the quantized Convs considered for a Q/DQ pair on their output.
    pub output_qdq: Vec<OutputQdqChoice>,
    /// How the output pairs were chosen (for the summary).
    pub output_qdq_note: Option<String>,
    /// Weights packed as ONNX INT4 (`--weight-bits 4 --int4-storage packed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub int4: Option<crate::passes::quantize::int4::Int4Packing>,
    /// PAR: layers whose rounding was reconstructed reading the quantized model's inputs
    /// (the round's report says it).
    #[serde(skip)]
    pub par_aligned_layers: usize,
    /// PAR: activation scales reconstructed against their readers' output error, and
    /// that output SQNR (dB, summed over the readers' sampled columns) with the
    /// calibrated scales and with the chosen ones.
    #[serde(skip)]
    pub par_act_scales: Option<(usize, f64, f64)>,
}

/// One Conv considered by `--output-qdq`.
#[derive(Clone, Debug, Serialize)]
pub struct OutputQdqChoice {
    pub node: String,
    pub value: String,
    /// Mean output SQNR (dB, calibration records) this pair alone costs (`auto` only).
    pub cost_db: Option<f64>,
    pub chosen: bool,
}

impl QuantPlan {
    /// The (scale, zero point) `act` uses at step `t` (its first group for a `t` outside
    /// S, which the quantized model refuses).
    pub fn params_at(&self, act: &ActParams, t: i64) -> (f32, u8) {
        let i = self.timesteps.iter().position(|&s| s == t).unwrap_or(0);
        act.groups[group_of(i, act.groups.len(), self.timesteps.len().max(1))]
    }
}

/// The group of the step at position `i` of S (|S| = `len`) among `groups` groups of
/// consecutive steps — the integer arithmetic the graph does.
pub fn group_of(i: usize, groups: usize, len: usize) -> usize {
    i * groups / len
}
