//! The quantization report: what was quantized, how well, what it cost (`--report` JSON
//! and the terminal summary), and the calibration dump.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use tfmqc_passes::budget::{check_memory, return_free_memory, MemoryNeed, Part};
use tfmqc_passes::calibrate::Calibration;
use tfmqc_passes::evaluate::{
    activation_sqnr, output_sqnr_against, output_sqnr_by_part, output_sqnr_per_step, StepSqnr,
};
use tfmqc_passes::ir::{Model, Tensor};
use tfmqc_passes::pipeline::PassContext;
use tfmqc_passes::quantize::{LayerReport, QuantPlan};
use tfmqc_passes::{Options, Result};

/// Every option that shapes the output, as the `tfmqc.options` metadata and the report's
/// `options` record them ([`Options`]' serialization; keys in name order).
pub fn options_json(o: &Options) -> serde_json::Value {
    serde_json::to_value(o).expect("options serialize")
}

/// Writes the calibration's evaluation records as `NNNNN/<input>` tensors (what
/// `--calib` reads back).
pub fn dump_calibration(path: &Path, cal: &Calibration) -> Result<()> {
    dump_records(path, &cal.records)
}

/// Writes model calls as `NNNNN/<input>` tensors.
pub fn dump_records(path: &Path, records: &[BTreeMap<String, Tensor>]) -> Result<()> {
    let mut all: BTreeMap<String, Tensor> = BTreeMap::new();
    for (i, rec) in records.iter().enumerate() {
        for (k, v) in rec {
            all.insert(format!("{i:05}/{k}"), v.clone());
        }
    }
    tfmqc_passes::tensor_file::write_safetensors(path, &all)
}

/// Measured quality of the quantized model.
pub struct Quality {
    pub steps: Vec<StepSqnr>,
    pub activations: Vec<(String, f64)>,
    /// Calibration records the activation SQNR was measured on, of those kept.
    pub records: (usize, usize),
    /// What the per-step output SQNR was measured on.
    pub evaluated_on: String,
    /// The model calls it was measured on (`--dump-eval`).
    pub eval_records: Vec<BTreeMap<String, Tensor>>,
    /// Held-out images per step count (0: measured on calibration records).
    pub eval_images: usize,
    /// The per-step output SQNR on each half of the held-out images (empty on
    /// calibration records or with one image).
    pub halves: Vec<Vec<StepSqnr>>,
}

/// The records the report evaluates: all of them, unless their calls would take more than
/// a quarter of the calibration budget (an SD-class model at full size); then as many as
/// fit, spread over the steps, at least two.
fn evaluation_picks(cal: &Calibration, options: &Options) -> Vec<usize> {
    let n = cal.records.len();
    // A quantized call in tract (QDQ graph) plus a float call observing activations.
    let per_record = 2.5 * cal.call_work_seconds;
    let fit = if per_record > 0.0 {
        (options.calib_budget_s / 4.0 / per_record).floor() as usize
    } else {
        n
    };
    let k = fit.clamp(2.min(n), n);
    if k >= n {
        return (0..n).collect();
    }
    (0..k).map(|i| i * (n - 1) / (k - 1).max(1)).collect()
}

/// The per-step output SQNR along fresh trajectories of the deployment sampler (its
/// scheduler, step counts and guidance, other seeds than calibration's) as far as they fit
/// a quarter of the calibration budget, else on calibration records; the activation SQNR
/// on the calibration records (of `act_float`).
// The two float models are separate on purpose (the original as the reference of the
// outputs, the balanced one for activations): one more argument than clippy's limit.
#[allow(clippy::too_many_arguments)]
pub fn measure(
    float: &Model,
    act_float: &Model,
    quant: &Model,
    plan: &QuantPlan,
    cal: &Calibration,
    options: &Options,
    t_name: &str,
    progress: &dyn Fn(&str),
) -> Result<Quality> {
    tfmqc_passes::budget::trace_memory("evaluate: start");
    let picks = evaluation_picks(cal, options);
    let records: Vec<_> = picks.iter().map(|&i| cal.records[i].clone()).collect();
    let steps: Vec<i64> = picks.iter().map(|&i| cal.record_steps[i]).collect();
    // The runtime packs the int8 weights (a copy beside the proto it lowers from) and
    // keeps the float initializers (tables, float layers) as they are.
    let engine_weights: u64 = quant
        .graph
        .initializers
        .values()
        .map(|t| t.byte_len() as u64 * if t.dtype.bits() == 8 { 2 } else { 1 })
        .sum();
    let batch = records
        .first()
        .and_then(|r| r.get(&cal.sample_input))
        .and_then(|t| t.shape.first().copied())
        .unwrap_or(1);
    check_memory(
        &MemoryNeed {
            phase: "evaluate",
            parts: vec![
                Part {
                    what: "quantized model on the int8 runtime",
                    bytes: engine_weights,
                },
                Part {
                    what: "activations of one call",
                    bytes: tfmqc_passes::budget::activation_peak_bytes(quant, batch),
                },
            ],
            lower_with:
                "--calib-budget (fewer records evaluated) or an export at a smaller sample size",
        },
        options.max_memory,
    )?;
    // Held-out trajectories: a float call to make each record, a quantized one to judge it.
    let per_call = 2.5 * cal.call_work_seconds;
    let affordable = if per_call > 0.0 {
        (options.calib_budget_s / 4.0 / per_call).floor() as usize
    } else {
        usize::MAX
    };
    // Recorded calls need no sampler to calibrate; when the sampler cannot run on S (its
    // step counts visit steps outside it), the report falls back to the records.
    let mut why_not =
        "one held-out trajectory would take more than a quarter of --calib-budget".to_string();
    let held_out = match tfmqc_passes::trajectory::evaluation_records(
        float,
        options,
        t_name,
        options.eval_samples,
        affordable,
        progress,
    ) {
        Ok(h) => h,
        Err(e) if cal.trajectories.is_empty() && e.is_user_error() => {
            why_not = format!("no held-out trajectories: {e}");
            None
        }
        Err(e) => return Err(e),
    };
    // Each engine below is built after the last one is gone: what it freed goes back to
    // the OS first, so the peaks do not stack.
    tfmqc_passes::budget::trace_memory("evaluate: held-out trajectories");
    return_free_memory();
    // The float model's run first, the int8 engine after: what the int8 engine leaves in
    // the allocator would otherwise sit under the float run's peak (SD-1.5 at latent 64:
    // 8.07 GB the other way round, against 7.45 GB for calibration's same float runs).
    // `act_float`: the float model whose activations quantize quantized (TCR's balanced
    // one when it ran).
    let activations = activation_sqnr(act_float, plan, &records, &steps)?;
    tfmqc_passes::budget::trace_memory("evaluate: activation SQNR on the float model");
    return_free_memory();
    let (steps_sqnr, evaluated_on, eval_records, eval_images, halves) = match held_out {
        Some(ev) => {
            // Images below half the held-out set against the rest.
            let half = ev.images / 2;
            let part = |r: usize, row: usize| {
                usize::from(ev.first_image[r] + row % ev.per_record.max(1) >= half)
            };
            let parts = if half > 0 { 2 } else { 0 };
            let (steps, halves) =
                output_sqnr_by_part(quant, &ev.records, &ev.steps, &ev.outputs, &part, parts)?;
            (steps, ev.what, ev.records, ev.images, halves)
        }
        None => {
            let sqnr = if cal.record_outputs.len() == cal.records.len() {
                let reference: Vec<_> = picks
                    .iter()
                    .map(|&i| cal.record_outputs[i].clone())
                    .collect();
                output_sqnr_against(quant, &records, &steps, &reference)?
            } else {
                output_sqnr_per_step(float, quant, &records, &steps)?
            };
            let what = format!("{} calibration records ({why_not})", records.len());
            (sqnr, what, records.clone(), 0, vec![])
        }
    };
    tfmqc_passes::budget::trace_memory("evaluate: output SQNR on the int8 runtime");
    Ok(Quality {
        steps: steps_sqnr,
        activations,
        records: (records.len(), cal.records.len()),
        evaluated_on,
        eval_records,
        eval_images,
        halves,
    })
}

#[derive(Serialize)]
pub struct ActivationReport {
    pub value: String,
    /// (scale, zero point) per step group (one: constant scales).
    pub groups: Vec<(f32, u8)>,
    /// Measured gain of the step groups' scales over one set (quantization SNR, mean
    /// over the visited steps, dB; 0 with one group).
    pub fsc_gain_db: f64,
    pub sqnr_db: f64,
}

/// The output SQNR on a part of the held-out images.
#[derive(Serialize)]
pub struct HalfSqnr {
    pub output_sqnr_mean_db: f64,
    pub output_sqnr_min_db: f64,
    pub output_sqnr_per_step: Vec<StepSqnr>,
}

/// Mean and worst over the steps (an exact step, infinite SQNR, counts as 200 dB).
fn mean_min(steps: &[StepSqnr]) -> (f64, f64) {
    let finite: Vec<f64> = steps.iter().map(|s| s.sqnr_db.min(200.0)).collect();
    let mean = finite.iter().sum::<f64>() / finite.len().max(1) as f64;
    let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
    (mean, min)
}

#[derive(Serialize)]
pub struct Report {
    pub tool_version: &'static str,
    pub options: serde_json::Value,
    pub timestep_input: Option<String>,
    pub timesteps: usize,
    pub weight_bits: u32,
    pub act_bits: u32,
    /// The most step groups any activation has (1: constant scales everywhere).
    pub step_groups: usize,
    /// Activations with per-step (per-group) scales.
    pub per_step_activations: usize,
    pub stand_in_inputs: Vec<String>,
    /// The calibration trajectories (empty for recorded calls).
    pub calibrated_on: String,
    /// What the per-step output SQNR was measured on.
    pub evaluated_on: String,
    /// Mean over the evaluated steps of the per-step output SQNR.
    pub output_sqnr_mean_db: f64,
    pub output_sqnr_min_db: f64,
    pub output_sqnr_per_step: Vec<StepSqnr>,
    /// Held-out images per sampling step count the output SQNR was measured on
    /// (`--eval-samples`; 0: on calibration records).
    pub eval_samples: usize,
    /// The output SQNR on each half of the held-out images (first half, second half; empty
    /// on calibration records or one image): how far the figures above move with the
    /// held-out set itself.
    pub output_sqnr_halves: Vec<HalfSqnr>,
    /// Calibration records the quality figures were measured on, of those kept (all but
    /// for models whose calls are expensive: see `--calib-budget`).
    pub records_evaluated: usize,
    pub records_total: usize,
    pub layers: Vec<LayerReport>,
    pub activations: Vec<ActivationReport>,
    /// ONNX node names left in float (what a fair comparison excludes too).
    pub kept_float: Vec<String>,
    pub kept_float_reasons: Vec<(String, String)>,
    /// `--output-qdq`: each quantized Conv considered for a Q/DQ pair on its output, with
    /// the mean output SQNR (dB, calibration records) the pair alone costs (`auto`) and
    /// whether it got one.
    pub output_qdq: Vec<tfmqc_passes::quantize::OutputQdqChoice>,
    /// Conv and Gemm biases written as int32 with the product scale.
    pub int32_biases: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Initializer bytes of the output by kind of tensor.
    pub bytes_by_kind: BytesByKind,
    pub seconds_per_phase: Vec<(String, f64)>,
    /// Peak resident memory of the process during each phase, bytes (0: not known).
    pub peak_rss_per_phase: Vec<(String, u64)>,
    /// `--tib quant|auto`: TIAR, the temporal-feature error per t (RTN and TIAR), and
    /// each frontier value's choice with its bytes.
    pub tib: Option<tfmqc_passes::tiar::TiarReport>,
    /// `--tcr on`: the activations TCR balanced, where each factor went, the channel
    /// spread before and after.
    pub tcr: Option<tfmqc_passes::reparameterize::TcrReport>,
    /// `--daq`, `--par`: DAQ's choice per post-softmax activation with its measured fit,
    /// and PAR's held-out output SQNR per round (round 0: before PAR) and the round kept.
    pub tcaq: Option<tfmqc_passes::pipeline::tcaq::TcaqReport>,
}

impl Report {
    pub fn new(
        o: &Options,
        cx: &PassContext,
        q: &Quality,
        bytes_in: u64,
        bytes_out: u64,
        phases: &[(String, f64)],
        peaks: &[(String, u64)],
    ) -> Report {
        let plan = cx.quant.as_ref().expect("quantized");
        let (mean, min) = mean_min(&q.steps);
        let acts = plan
            .activations
            .iter()
            .zip(&q.activations)
            .map(|(a, (_, s))| ActivationReport {
                value: a.value.clone(),
                groups: a.groups.clone(),
                fsc_gain_db: a.gain_db,
                sqnr_db: *s,
            })
            .collect();
        Report {
            tool_version: env!("CARGO_PKG_VERSION"),
            options: options_json(o),
            timestep_input: cx.tib.as_ref().map(|t| t.timestep_input.clone()),
            timesteps: tfmqc_passes::options::timestep_set(&cx.model, o)
                .map(|s| s.len())
                .unwrap_or(0),
            weight_bits: plan.weight_bits,
            act_bits: plan.act_bits,
            step_groups: plan.step_groups,
            per_step_activations: plan.per_step_activations,
            stand_in_inputs: cx
                .calibration
                .as_ref()
                .map(|c| c.stand_ins.clone())
                .unwrap_or_default(),
            calibrated_on: cx
                .calibration
                .as_ref()
                .map(|c| c.trajectories.clone())
                .unwrap_or_default(),
            evaluated_on: q.evaluated_on.clone(),
            output_sqnr_mean_db: mean,
            output_sqnr_min_db: min,
            output_sqnr_per_step: q.steps.clone(),
            eval_samples: q.eval_images,
            output_sqnr_halves: q
                .halves
                .iter()
                .map(|h| {
                    let (mean, min) = mean_min(h);
                    HalfSqnr {
                        output_sqnr_mean_db: mean,
                        output_sqnr_min_db: min,
                        output_sqnr_per_step: h.clone(),
                    }
                })
                .collect(),
            records_evaluated: q.records.0,
            records_total: q.records.1,
            layers: plan.layers.clone(),
            activations: acts,
            kept_float: plan.kept_float.iter().map(|(n, _)| n.clone()).collect(),
            kept_float_reasons: plan.kept_float.clone(),
            output_qdq: plan.output_qdq.clone(),
            int32_biases: plan.int32_biases,
            bytes_in,
            bytes_by_kind: BytesByKind::of(&cx.model),
            bytes_out,
            seconds_per_phase: phases.to_vec(),
            peak_rss_per_phase: peaks.to_vec(),
            tib: cx.tiar.clone(),
            tcr: cx.tcr.clone(),
            tcaq: cx.tcaq.clone(),
        }
    }

    /// A few lines for the terminal.
    pub fn summary(&self) -> String {
        let w: Vec<f64> = self
            .layers
            .iter()
            .filter_map(|l| l.weight_sqnr_db)
            .collect();
        let a: Vec<f64> = self
            .activations
            .iter()
            .map(|a| a.sqnr_db.min(200.0))
            .collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let worst_act = self
            .activations
            .iter()
            .min_by(|x, y| x.sqnr_db.total_cmp(&y.sqnr_db));
        let of = if self.records_evaluated < self.records_total {
            format!(
                "; activations on {} of {} calibration records: calls are expensive",
                self.records_evaluated, self.records_total
            )
        } else {
            String::new()
        };
        let mut s = format!(
            "quality (vs float, {} time steps along {}{of}):\n  denoiser output SQNR: mean {:.1} dB, worst step {:.1} dB\n  weights: {} layers, mean SQNR {:.1} dB at {} bits\n  activations: {} values, mean SQNR {:.1} dB at {} bits, {} with per-step scales (up to {} step groups)\n",
            self.output_sqnr_per_step.len(),
            self.evaluated_on,
            self.output_sqnr_mean_db,
            self.output_sqnr_min_db,
            w.len(),
            mean(&w),
            self.weight_bits,
            a.len(),
            mean(&a),
            self.act_bits,
            self.per_step_activations,
            self.step_groups
        );
        if let Some(x) = worst_act {
            s.push_str(&format!(
                "  worst activation: {} ({:.1} dB)\n",
                x.value, x.sqnr_db
            ));
        }
        if let Some(t) = &self.tcr {
            s.push_str(&format!("  {}\n", t.summary()));
        }
        if let Some(t) = &self.tcaq {
            for line in t.lines() {
                s.push_str(&format!("  {line}\n"));
            }
        }
        let phases: Vec<String> = self
            .seconds_per_phase
            .iter()
            .map(|(n, t)| format!("{n} {t:.2}s"))
            .collect();
        let k = &self.bytes_by_kind;
        s.push_str(&format!(
            "  size: {} → {} bytes (integer weights {}, float tensors {}, time-step tables {}, per-step scale tables {}, other {}); time: {}\n",
            self.bytes_in,
            self.bytes_out,
            k.weights_int,
            k.float,
            k.tables,
            k.scale_tables,
            k.other,
            phases.join(", ")
        ));
        let peaks: Vec<String> = self
            .peak_rss_per_phase
            .iter()
            .filter(|(_, b)| *b > 0)
            .map(|(n, b)| format!("{n} {:.2} GB", *b as f64 / 1e9))
            .collect();
        if !peaks.is_empty() {
            s.push_str(&format!("  peak memory: {}\n", peaks.join(", ")));
        }
        s
    }
}

/// Initializer bytes of a model by kind of tensor (what the file spends its bytes on).
#[derive(Serialize, serde::Deserialize, Default, Debug, Clone, Copy, PartialEq)]
pub struct BytesByKind {
    /// Integer weights behind DequantizeLinear (int8, INT4, or 4-bit values stored as
    /// int8).
    pub weights_int: u64,
    /// Weights, biases and other tensors left in float.
    pub float: u64,
    /// Temporal-feature tables, gathered at the time-step index (f32, f16, or int8 with
    /// row scales).
    pub tables: u64,
    /// Per-step activation scale tables (FSC: gathered at the time-step index, dividing
    /// an activation) and the step-group index.
    pub scale_tables: u64,
    /// Scales, zero points, int32 biases and the rest.
    pub other: u64,
}

impl BytesByKind {
    /// Told apart by the graph's structure ([`tfmqc_runtime::classify`], the classifier
    /// the runtime's `resident_by_kind` uses), not by names.
    pub fn of(m: &tfmqc_passes::ir::Model) -> BytesByKind {
        use tfmqc_runtime::classify::ConstKind;
        let kinds = tfmqc_passes::ir::names::const_kinds(m);
        let mut k = BytesByKind::default();
        for (name, t) in &m.graph.initializers {
            let slot = match kinds.get(name) {
                Some(ConstKind::Table) => &mut k.tables,
                Some(ConstKind::ScaleTable) => &mut k.scale_tables,
                Some(ConstKind::WeightInt) => &mut k.weights_int,
                Some(ConstKind::Float) => &mut k.float,
                Some(ConstKind::Other) | None => &mut k.other,
            };
            *slot += t.byte_len() as u64;
        }
        k
    }
}
