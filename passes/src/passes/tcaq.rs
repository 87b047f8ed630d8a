//! TCAQ-DM's DAQ and PAR (arXiv 2412.16700), which the pass manager runs right after
//! `quantize` ([`finish`]): they need the quantized model, and PAR runs the passes from
//! `calibrate` to `quantize` again.
//!
//! - **DAQ** (`--daq`): per post-softmax activation, the uniform quantizer quantize gave
//!   it or a logarithmic one, whichever fits the values of the calibration records better
//!   (mean SQNR over the calibrated steps). The logarithmic quantizers have k = 1 (log2)
//!   or k = 2 (log√2) levels per octave: `q = Clip(Round(−k·log2(p / s)), 0, 2^b − 1)`,
//!   `p̂ = s · 2^(−q/k)`, in standard ONNX `Clip(Round(Mul(Log(Div(p, s)), −k/ln 2)), 0,
//!   L)` and `Mul(Pow(2, Mul(Neg(q), 1/k)), s)`. (Base 2 alone rounds every value to
//!   within a factor √2: about 14 dB SQNR whatever the bits, below 8-bit uniform; √2
//!   halves the steps in the log domain at the cost of half the range.)
//!   The runtime runs these ops as tract does (the fused int8 attention matches only a
//!   uniform Q/DQ on P, so a log2 P leaves that attention unfused).
//! - **PAR** (`--par ROUNDS`): each round re-runs calibration along the trajectories the
//!   *quantized* model walks itself (same sampler, same seeds; the quantized model
//!   drives the sampler on the int8 runtime, the float model is observed at the inputs
//!   it visits and its outputs are the references), then quantization with weight
//!   reconstruction against the float layers' outputs *reading the quantized model's
//!   layer inputs*: at the sampled positions calibration also runs the previous round's
//!   quantized model (its QDQ graph) and keeps each layer's input X̃ *before its
//!   activation quantizer* next to the float one X. Each activation's step sizes (per
//!   step group) are then reconstructed against its readers' output error
//!   `Σ ‖W X − Ŵ q_s(X̃)‖²` (a clip-ratio search around the calibrated scales,
//!   [`crate::numerics::act_scale`]; TFMQ-DM learns them, `leaf_param`), and GPTQ rounds
//!   each weight against `q_s(X̃) q_s(X̃)ᵀ` with the chosen scales (optionally the aligned
//!   target `W' = W X X̃ᵀ (X̃X̃ᵀ)⁻¹`, ridge toward W, behind `TFMQC_PAR_CROSS_DAMP`). The
//!   paper reconstructs from the quantized model's own inputs. The rounds start from the
//!   float model quantize read (TCR's balanced one when TCR ran) and do not run TCR
//!   again: X and X̃ must be in the same coordinates, and TCR is the initialization stage
//!   in the paper, PAR the reconstruction stage. Every round is measured by the per-step output SQNR
//!   on held-out float trajectories; the best round is kept (round 0 is the model
//!   without PAR), since a round can lose.

use std::collections::BTreeMap;

use serde::Serialize;
use tfmqc_runtime::engine::Optimize;

use crate::analysis::evaluate::{output_sqnr_against, StepSqnr};
use crate::error::{Error, Result};
use crate::ir::exec::Runner;
use crate::ir::{Graph, Model, Tensor};
use crate::numerics::quant::{act_clip, act_levels, fake_quant_u8, sqnr_from_sums};
use crate::options::{Daq, Options};
use crate::passes::{Pass, PassContext};

/// `--daq auto` keeps the log2 quantizers when they raise the mean held-out output SQNR
/// by at least this much (dB), as `--tcr auto` does.
pub const AUTO_MIN_GAIN_DB: f64 = 0.1;

/// What DAQ and PAR did (the report's `tcaq`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct TcaqReport {
    /// DAQ's measured fit per post-softmax activation (the last round's).
    pub daq: Vec<DaqChoice>,
    /// `--daq auto`: mean held-out output SQNR (dB) with uniform quantizers only and
    /// with DAQ's choices.
    pub daq_auto_db: Option<(f64, f64)>,
    /// Whether DAQ's log2 quantizers are in the output.
    pub daq_applied: bool,
    /// PAR: round 0 (before PAR) and each round, measured on `evaluated_on`.
    pub par: Vec<ParRound>,
    /// The round whose model was kept.
    pub par_kept: Option<usize>,
    pub evaluated_on: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct DaqChoice {
    pub value: String,
    /// Mean over the calibrated steps of the activation's quantization SQNR (dB).
    pub uniform_db: f64,
    /// Log2 (k = 1) and log√2 (k = 2).
    pub log2_db: f64,
    pub log_sqrt2_db: f64,
    /// Whether a logarithmic quantizer was chosen, and its levels per octave k.
    pub log2: bool,
    pub steps_per_octave: u32,
    /// s of the logarithmic quantizer (the calibrated maximum).
    pub scale: f32,
}

#[derive(Clone, Debug, Serialize)]
pub struct ParRound {
    pub round: usize,
    pub sqnr_mean_db: f64,
    pub sqnr_min_db: f64,
    /// Gain of the mean over round 0 (dB).
    pub gain_db: f64,
    /// Layers reconstructed reading the previous round's quantized inputs.
    pub aligned_layers: usize,
    /// Activation scales reconstructed against their readers' output error, and that
    /// output SQNR (dB, on the sampled layer inputs) with the calibrated and the chosen
    /// scales.
    pub act_scales: usize,
    pub act_output_sqnr_db: Option<(f64, f64)>,
    pub per_step: Vec<StepSqnr>,
}

impl TcaqReport {
    /// Lines for the pass notes and the summary.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![];
        if !self.daq.is_empty() {
            let log2 = self.daq.iter().filter(|c| c.log2).count();
            out.push(format!(
                "DAQ: {log2} of {} post-softmax activations fit a logarithmic quantizer better{}",
                self.daq.len(),
                match (self.daq_auto_db, self.daq_applied) {
                    (Some((off, on)), applied) => format!(
                        "; held-out output SQNR {off:.2} dB uniform, {on:.2} dB with DAQ: {}",
                        if applied {
                            "kept (--daq auto)"
                        } else {
                            "not kept (--daq auto)"
                        }
                    ),
                    (None, _) => String::new(),
                }
            ));
            for c in &self.daq {
                out.push(format!(
                    "  {}: uniform {:.1} dB, log2 {:.1} dB, log√2 {:.1} dB → {}",
                    c.value,
                    c.uniform_db,
                    c.log2_db,
                    c.log_sqrt2_db,
                    match (c.log2, c.steps_per_octave) {
                        (false, _) => "uniform",
                        (true, 1) => "log2",
                        _ => "log√2",
                    }
                ));
            }
        }
        if let Some(kept) = self.par_kept {
            let rounds: Vec<String> = self
                .par
                .iter()
                .map(|r| {
                    format!(
                        "round {}: {:.2} dB ({:+.2}{}{})",
                        r.round,
                        r.sqnr_mean_db,
                        r.gain_db,
                        match r.aligned_layers {
                            0 => String::new(),
                            n => format!(", {n} layers on quantized inputs"),
                        },
                        match r.act_output_sqnr_db {
                            Some((before, after)) => format!(
                                ", {} activation scales reconstructed: readers' output SQNR {before:.2} → {after:.2} dB",
                                r.act_scales
                            ),
                            None => String::new(),
                        }
                    )
                })
                .collect();
            out.push(format!(
                "PAR: mean output SQNR per round on {}: {}; kept round {kept}",
                self.evaluated_on,
                rounds.join(", ")
            ));
        }
        out
    }
}

/// Whether [`finish`] has anything to do under these options.
pub fn wanted(cx: &PassContext) -> bool {
    let o = cx.options;
    !o.baseline_minmax && (o.daq != Daq::Off || o.par_rounds > 0)
}

/// Held-out records with the float model's outputs (see the module notes).
struct Eval {
    records: Vec<BTreeMap<String, Tensor>>,
    steps: Vec<i64>,
    outputs: Vec<Tensor>,
    what: String,
}

impl Eval {
    /// Mean and worst per-step output SQNR of `quant` (dB; steps capped at 200 dB).
    fn measure(&self, quant: &Model) -> Result<(f64, f64, Vec<StepSqnr>)> {
        let per_step = output_sqnr_against(quant, &self.records, &self.steps, &self.outputs)?;
        let v: Vec<f64> = per_step.iter().map(|s| s.sqnr_db.min(200.0)).collect();
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        Ok((mean, min, per_step))
    }
}

/// Held-out trajectory sets DAQ and PAR choose on: each as many trajectories as the
/// report's evaluation (one of 2 images with one `--calib-steps`), with seeds of their
/// own. One set alone measured PAR's rounds within its noise (a few tenths of a dB), and
/// the report's own set would both choose the round and measure it.
pub const CHOICE_SETS: u64 = 4;

/// Held-out trajectories (seeds other than calibration's and the report's, as many as a
/// quarter of `--calib-budget` allows, up to [`CHOICE_SETS`] sets), else the calibration
/// records.
fn held_out(cx: &PassContext, float: &Model) -> Result<Eval> {
    let cal = cx.calibration()?;
    let t_name = cx.tib()?.timestep_input.clone();
    let per_call = 2.5 * cal.call_work_seconds;
    let mut affordable = if per_call > 0.0 {
        (cx.options.calib_budget_s / 4.0 / per_call).floor() as usize
    } else {
        usize::MAX
    };
    let mut sets: Vec<crate::analysis::trajectory::EvaluationRecords> = vec![];
    for k in 1..=CHOICE_SETS {
        let options = Options {
            seed: cx
                .options
                .seed
                .wrapping_add(k.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            ..cx.options.clone()
        };
        match crate::analysis::trajectory::evaluation_records(
            float,
            &options,
            &t_name,
            None,
            affordable,
            cx.progress,
        ) {
            Ok(Some(h)) => {
                affordable = affordable.saturating_sub(h.records.len());
                sets.push(h);
            }
            Ok(None) => break,
            Err(e) if sets.is_empty() => return held_from(cx, Err(e)),
            Err(_) => break,
        }
    }
    let n = sets.len();
    let merged = sets.into_iter().reduce(|mut a, b| {
        a.records.extend(b.records);
        a.steps.extend(b.steps);
        a.outputs.extend(b.outputs);
        a.first_image.extend(b.first_image);
        a
    });
    held_from(
        cx,
        Ok(merged.map(|mut h| {
            if n > 1 {
                h.what = format!("{n} sets of {}", h.what);
            }
            h
        })),
    )
}

/// The held-out records of [`held_out`], or the calibration records when there are none.
fn held_from(
    cx: &PassContext,
    held: Result<Option<crate::analysis::trajectory::EvaluationRecords>>,
) -> Result<Eval> {
    let cal = cx.calibration()?;
    match held {
        Ok(Some(h)) => Ok(Eval {
            records: h.records,
            steps: h.steps,
            outputs: h.outputs,
            what: h.what,
        }),
        Ok(None) | Err(_) if cal.record_outputs.len() == cal.records.len() => Ok(Eval {
            records: cal.records.clone(),
            steps: cal.record_steps.clone(),
            outputs: cal.record_outputs.clone(),
            what: format!("{} calibration records", cal.records.len()),
        }),
        Ok(None) => Err(Error::pass(
            "quantize",
            "--daq auto / --par need held-out trajectories or the float outputs of the calibration records",
        )),
        Err(e) => Err(e),
    }
}

/// DAQ and PAR after `quantize` (see the module notes). `float`: the model `calibrate`
/// read (PAR starts every round from it); `pre_quant`: the float model quantize read
/// (TCR's balanced one when it ran); `redo`: the pipeline's passes from `calibrate` to
/// `quantize`, which each PAR round runs again.
pub fn finish(
    cx: &mut PassContext,
    float: &Model,
    pre_quant: &Model,
    redo: &[Box<dyn Pass>],
) -> Result<()> {
    let notes = std::mem::take(&mut cx.notes);
    let eval = held_out(cx, float)?;
    let mut report = TcaqReport {
        evaluated_on: eval.what.clone(),
        ..Default::default()
    };
    daq(cx, pre_quant, &eval, &mut report)?;
    if cx.options.par_rounds > 0 {
        if cx.calibration()?.trajectories.is_empty() {
            cx.notes = notes;
            cx.note("PAR off: calibration ran on recorded calls, which no trajectory of the quantized model can replace");
            cx.tcaq = Some(report);
            return Ok(());
        }
        let (mean, min, per_step) = eval.measure(&cx.model)?;
        report.par.push(ParRound {
            round: 0,
            sqnr_mean_db: mean,
            sqnr_min_db: min,
            gain_db: 0.0,
            aligned_layers: 0,
            act_scales: 0,
            act_output_sqnr_db: None,
            per_step,
        });
        let mut best = (mean, 0, snapshot(cx), report.clone());
        for round in 1..=cx.options.par_rounds {
            (cx.progress)(&format!("PAR: round {round}/{}", cx.options.par_rounds));
            // The previous round's model walks the trajectories (progressive); the
            // float model quantize read is observed (TCR, when it ran, stays round 0's).
            cx.par_driver = Some(std::mem::replace(&mut cx.model, pre_quant.clone()));
            cx.calibration = None;
            cx.quant = None;
            let mut pre = None;
            for pass in redo {
                if pass.name() == "reparameterize" {
                    continue;
                }
                if pass.name() == "quantize" {
                    pre = Some(cx.model.clone());
                }
                pass.run(cx)?;
                cx.model.graph.validate().map_err(|e| {
                    Error::pass(
                        pass.name(),
                        format!("left an invalid graph in PAR round {round}: {e}"),
                    )
                })?;
            }
            cx.par_driver = None;
            cx.notes.clear();
            let pre = pre.unwrap_or_else(|| cx.model.clone());
            let mut round_report = TcaqReport {
                evaluated_on: eval.what.clone(),
                par: report.par.clone(),
                ..Default::default()
            };
            daq(cx, &pre, &eval, &mut round_report)?;
            let (m, lo, per_step) = eval.measure(&cx.model)?;
            report.par.push(ParRound {
                round,
                sqnr_mean_db: m,
                sqnr_min_db: lo,
                gain_db: m - report.par[0].sqnr_mean_db,
                aligned_layers: cx.quant.as_ref().map_or(0, |q| q.par_aligned_layers),
                act_scales: cx
                    .quant
                    .as_ref()
                    .and_then(|q| q.par_act_scales)
                    .map_or(0, |a| a.0),
                act_output_sqnr_db: cx
                    .quant
                    .as_ref()
                    .and_then(|q| q.par_act_scales)
                    .map(|a| (a.1, a.2)),
                per_step,
            });
            if m > best.0 {
                round_report.par = report.par.clone();
                best = (m, round, snapshot(cx), round_report);
            }
        }
        let (_, kept, state, kept_report) = best;
        restore(cx, state);
        let par = std::mem::take(&mut report.par);
        report = kept_report;
        report.par = par;
        report.par_kept = Some(kept);
    }
    cx.notes = notes;
    for line in report.lines() {
        cx.note(line);
    }
    cx.tcaq = Some(report);
    Ok(())
}

/// What a PAR round replaces.
type State = (
    Model,
    Option<crate::analysis::calibration::Calibration>,
    Option<crate::analysis::quant_plan::QuantPlan>,
    Option<crate::analysis::reports::TcrReport>,
    Option<Model>,
);

fn snapshot(cx: &PassContext) -> State {
    (
        cx.model.clone(),
        cx.calibration.clone(),
        cx.quant.clone(),
        cx.tcr.clone(),
        cx.balanced_float.clone(),
    )
}

fn restore(cx: &mut PassContext, s: State) {
    (
        cx.model,
        cx.calibration,
        cx.quant,
        cx.tcr,
        cx.balanced_float,
    ) = s;
}

/// The logarithmic quantizer of one value with k levels per octave,
/// `s · 2^(−clip(round(−k·log2(x / s)), 0, L)/k)` with L = 2^bits − 1 (x ≤ 0 → the
/// smallest level), as the graph computes it up to the rounding of `log2` (the graph
/// multiplies ln by −k/ln 2).
pub fn fake_quant_log2(x: f32, s: f32, bits: u32, k: u32) -> f32 {
    let levels = act_levels(bits);
    let q = if x > 0.0 {
        ((x / s).ln() * (-(k as f32) / std::f32::consts::LN_2))
            .round_ties_even()
            .clamp(0.0, levels)
    } else {
        levels
    };
    s * (-q / k as f32).exp2()
}

/// DAQ on the quantized model in `cx` (see the module notes); fills `report.daq`.
fn daq(
    cx: &mut PassContext,
    pre_quant: &Model,
    eval: &Eval,
    report: &mut TcaqReport,
) -> Result<()> {
    let o = cx.options;
    if o.daq == Daq::Off || o.act_bits > 8 {
        return Ok(());
    }
    let Some(plan) = cx.quant.as_ref() else {
        return Ok(());
    };
    let cal = cx.calibration()?;
    let g = &pre_quant.graph;
    let acts: Vec<&crate::analysis::quant_plan::ActParams> = plan
        .activations
        .iter()
        .filter(|a| {
            g.producer(&a.value)
                .is_some_and(|(ix, _)| g.node(ix).is_onnx_op("Softmax"))
        })
        .collect();
    if acts.is_empty() {
        cx.note("DAQ: no quantized post-softmax activation");
        return Ok(());
    }
    let names: Vec<String> = acts.iter().map(|a| a.value.clone()).collect();
    let scales: Vec<f32> = names
        .iter()
        .map(|n| {
            cal.global
                .get(n)
                .map(|r| r.max)
                .filter(|m| *m > 0.0)
                .unwrap_or(1.0)
        })
        .collect();
    // Per value and step: signal, then the noise of uniform, log2 and log√2.
    let mut sums: Vec<BTreeMap<i64, [f64; 4]>> = vec![BTreeMap::new(); names.len()];
    let runner = Runner::observing(pre_quant, &names, Optimize::Full)?;
    for (inputs, &t) in cal.records.iter().zip(&cal.record_steps) {
        runner.run_observed(&inputs.clone().into_iter().collect(), &mut |k, value| {
            let (scale, zp) = plan.params_at(acts[k], t);
            let (lo, hi) = act_clip(scale, zp, plan.act_bits);
            let e = sums[k].entry(t).or_default();
            for &x in crate::ir::exec::f32_values(value, &names[k])? {
                e[0] += (x as f64).powi(2);
                e[1] += ((x - fake_quant_u8(x.clamp(lo, hi), scale, zp)) as f64).powi(2);
                e[2] += ((x - fake_quant_log2(x, scales[k], plan.act_bits, 1)) as f64).powi(2);
                e[3] += ((x - fake_quant_log2(x, scales[k], plan.act_bits, 2)) as f64).powi(2);
            }
            Ok(())
        })?;
    }
    let mean = |s: &BTreeMap<i64, [f64; 4]>, which: usize| {
        let v: Vec<f64> = s
            .values()
            .map(|e| sqnr_from_sums(e[0], e[which]).min(200.0))
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    report.daq = names
        .iter()
        .zip(&sums)
        .zip(&scales)
        .map(|((n, s), &scale)| {
            let (u, l1, l2) = (mean(s, 1), mean(s, 2), mean(s, 3));
            DaqChoice {
                value: n.clone(),
                uniform_db: u,
                log2_db: l1,
                log_sqrt2_db: l2,
                log2: l1.max(l2) > u,
                steps_per_octave: if l2 > l1 { 2 } else { 1 },
                scale,
            }
        })
        .collect();
    let chosen: Vec<&DaqChoice> = report.daq.iter().filter(|c| c.log2).collect();
    if chosen.is_empty() {
        return Ok(());
    }
    let mut m = cx.model.clone();
    let keep: Vec<String> = cx.step_index.iter().cloned().collect();
    for c in &chosen {
        replace_quantizer(
            &mut m.graph,
            &c.value,
            c.scale,
            plan.act_bits,
            c.steps_per_octave,
        )?;
    }
    m.graph.remove_dead_keeping(&keep);
    if o.daq == Daq::Auto {
        let off = eval.measure(&cx.model)?.0;
        let on = eval.measure(&m)?.0;
        report.daq_auto_db = Some((off, on));
        if on - off < AUTO_MIN_GAIN_DB {
            return Ok(());
        }
    }
    cx.model = m;
    report.daq_applied = true;
    // The report's activation SQNR measures uniform quantizers: the log2 ones are
    // measured above.
    if let Some(plan) = cx.quant.as_mut() {
        plan.activations
            .retain(|a| !chosen.iter().any(|c| c.value == a.value));
    }
    Ok(())
}

/// Replaces quantize's Q/DQ of `value` (its `<value>[_clipped]_dequantized` output,
/// see `quantize::insert_qdq`) by the logarithmic quantizer with `k` levels per octave;
/// returns the new value.
pub fn replace_quantizer(
    g: &mut Graph,
    value: &str,
    scale: f32,
    bits: u32,
    k: u32,
) -> Result<String> {
    let base = value.trim_start_matches('/');
    // Below 8 bits quantize clips first (`<value>_clipped`) and quantizes the clipped
    // value.
    let names = [
        format!("{base}_dequantized"),
        format!("{base}_clipped_dequantized"),
    ];
    let Some(dq) = names.iter().find(|n| g.producer(n).is_some()).cloned() else {
        return Err(Error::pass(
            "quantize",
            format!("DAQ: '{value}' has no quantizer '{}' to replace", names[0]),
        ));
    };
    let new = log2_quantizer(g, value, scale, bits, k)?;
    g.replace_uses(&dq, &new);
    Ok(new)
}

/// Adds `s · 2^(−clip(round(−k·log2(value / s)), 0, 2^bits − 1)/k)` in standard ONNX
/// ops; returns the quantized value's name (its codes are `<base>_log2_codes`).
pub fn log2_quantizer(g: &mut Graph, value: &str, scale: f32, bits: u32, k: u32) -> Result<String> {
    let base = value.trim_start_matches('/');
    let s = g.add_initializer(&format!("{base}_log2_scale"), Tensor::scalar(scale));
    let factor = g.add_initializer(
        &format!("{base}_log2_neg_k_inv_ln2"),
        Tensor::scalar(-(k as f32) / std::f32::consts::LN_2),
    );
    let lo = g.add_initializer(&format!("{base}_log2_min"), Tensor::scalar(0f32));
    let hi = g.add_initializer(
        &format!("{base}_log2_max"),
        Tensor::scalar(act_levels(bits)),
    );
    let two = g.add_initializer(&format!("{base}_log2_two"), Tensor::scalar(2f32));
    let r = g.add_op(
        "Div",
        vec![value.to_string(), s.clone()],
        &format!("{base}_log2_ratio"),
        vec![],
    )?;
    let l = g.add_op("Log", vec![r], &format!("{base}_log2_ln"), vec![])?;
    let e = g.add_op(
        "Mul",
        vec![l, factor],
        &format!("{base}_log2_exponent"),
        vec![],
    )?;
    let q = g.add_op("Round", vec![e], &format!("{base}_log2_rounded"), vec![])?;
    let c = g.add_op(
        "Clip",
        vec![q, lo, hi],
        &format!("{base}_log2_codes"),
        vec![],
    )?;
    let mut n = g.add_op("Neg", vec![c], &format!("{base}_log2_neg"), vec![])?;
    if k > 1 {
        let inv = g.add_initializer(
            &format!("{base}_log2_inv_k"),
            Tensor::scalar(1.0 / k as f32),
        );
        n = g.add_op("Mul", vec![n, inv], &format!("{base}_log2_exp2"), vec![])?;
    }
    let p = g.add_op("Pow", vec![two, n], &format!("{base}_log2_power"), vec![])?;
    g.add_op(
        "Mul",
        vec![p, s],
        &format!("{base}_log2_dequantized"),
        vec![],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_levels_are_powers_of_two_of_the_scale() {
        assert_eq!(fake_quant_log2(1.0, 1.0, 4, 1), 1.0);
        assert_eq!(fake_quant_log2(0.26, 1.0, 4, 1), 0.25);
        assert_eq!(fake_quant_log2(0.0, 1.0, 4, 1), 2f32.powi(-15));
        assert_eq!(fake_quant_log2(1e-9, 1.0, 4, 1), 2f32.powi(-15));
        assert_eq!(fake_quant_log2(0.3, 0.6, 8, 1), 0.3);
        // log√2: half-octave levels, half the range.
        assert_eq!(fake_quant_log2(0.5, 1.0, 4, 2), 0.5);
        assert!((fake_quant_log2(0.7, 1.0, 4, 2) - 0.5f32.sqrt()).abs() < 1e-7);
        assert!((fake_quant_log2(0.0, 1.0, 4, 2) - 2f32.powf(-7.5)).abs() < 1e-9);
    }
}
