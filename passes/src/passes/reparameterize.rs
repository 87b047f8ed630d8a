//! reparameterize: TCAQ-DM's timestep-channel joint reparameterization (TCR).
//!
//! A diffusion UNet's activations differ in range from channel to channel, and the
//! channels that are wide change with the time step. Per-tensor activation quantization
//! pays for the widest channel at the widest step. TCR divides each input channel `c` of
//! a quantized Conv, Gemm or MatMul by a factor `r_c` and multiplies the matching input
//! channel of the weight by it (SmoothQuant's balance), with the activation's channel
//! range taken over *all* calibrated time steps, so that no step's outlier channel is
//! left out:
//!
//! ```text
//! a_c = max_t max|X_{t,c}|        (the channel's range, over the steps of S visited)
//! w_c = max|W[:, c]|              (over every layer reading X)
//! r_c = a_c^α / w_c^(1−α)
//! X' = X / r        W' = W · r    (W'X' = WX: the float function is unchanged)
//! ```
//!
//! The division goes into the op producing `X` when it is a per-channel affine whose
//! output only these layers read (a GroupNorm/InstanceNorm export's trailing `Mul(γ)` +
//! `Add(β)`, LayerNormalization's scale and bias): then it costs nothing at run time.
//! Otherwise (a SiLU, a residual sum, a Concat: not homogeneous per channel, or read by
//! others) a constant `Mul(X, 1/r)` is inserted in front of the layers — one element-wise
//! product per value, still standard ONNX.
//!
//! The channel ranges come from running the float model on calibration's evaluation
//! records (one batch per visited step). The ranges and layer inputs calibration found
//! describe the model before the rewrite, so calibration runs again on the rewritten
//! model (same seed, same trajectories): quantize and reconstruction then see exactly
//! the activations that will be quantized.

use std::collections::{BTreeMap, HashMap};

use tfmqc_runtime::engine::Optimize;

use crate::analysis::targets::find_targets;
use crate::error::{Error, Result};
use crate::ir::exec::Runner;
use crate::ir::{DType, Graph, Model, Tensor};
use crate::options::{Options, Tcr, TcrAlpha, TCR_ALPHA_GRID};
use crate::passes::{Analysis, Pass, PassContext};

pub struct Reparameterize;

/// The default exponent α of `r_c = a_c^α / w_c^(1−α)` (kept with the options' defaults).
pub use crate::options::DEFAULT_TCR_ALPHA as DEFAULT_ALPHA;

/// Factors are kept within [1/R_LIMIT, R_LIMIT]: a channel that is (nearly) never
/// active would otherwise get a factor that blows its weights up.
const R_LIMIT: f32 = 1e4;

pub use crate::analysis::reports::{Balanced, TcrReport};

/// `--tcr auto` keeps TCR when it gains at least this much mean output SQNR (dB): less
/// is within the noise of a few records.
pub const AUTO_MIN_GAIN_DB: f64 = 0.1;

/// `--tcr auto` does not measure (and leaves TCR off) when calibrating again and
/// quantizing twice would take longer than this, estimated from calibration's calls in
/// work seconds (`Calibration::call_work_seconds`), so that the load does not decide.
pub const AUTO_MAX_SECONDS: f64 = 300.0;

impl Pass for Reparameterize {
    fn name(&self) -> &'static str {
        "reparameterize"
    }
    fn summary(&self) -> &'static str {
        "TCAQ-DM's TCR (--tcr on|auto): per-channel balance of activations against weights over all time steps; recalibrates"
    }
    fn requires(&self, _options: &Options) -> Vec<Analysis> {
        vec![Analysis::Calibration]
    }
    fn run(&self, cx: &mut PassContext) -> Result<()> {
        let mode = cx.options.tcr;
        if mode == Tcr::Off || cx.options.act_bits > 8 || cx.options.baseline_minmax {
            cx.note("TCR off (--tcr on|auto turns it on; it needs quantized activations)");
            return Ok(());
        }
        // The field, not `cx.calibration()`: the rewrite below borrows the model meanwhile.
        let Some(cal) = cx.calibration.as_ref() else {
            return Err(cx.needs(Analysis::Calibration));
        };
        if mode == Tcr::Auto {
            // Calibrating again costs what calibrating did; each trial quantization
            // and its evaluation about one call per record.
            // Recorded calls count one batch each; a trajectory batch one call a step.
            let calls = if cal.trajectories.is_empty() {
                cal.batches
            } else {
                cal.batches.max(1) * cal.records.len()
            } as f64;
            let estimate = cal.call_work_seconds * (calls + 4.0 * cal.records.len() as f64);
            if estimate > AUTO_MAX_SECONDS {
                cx.note(format!(
                    "TCR off: --tcr auto would take about {} to measure (over {AUTO_MAX_SECONDS} s); --tcr on turns it on unmeasured",
                    crate::analysis::budget::human_duration(estimate)
                ));
                return Ok(());
            }
        }
        let alphas: Vec<f32> = match cx.options.tcr_alpha {
            TcrAlpha::Fixed(a) => vec![a],
            TcrAlpha::Auto => {
                // Each α: the rewrite, calibrating again and a trial quantization.
                let calls = if cal.trajectories.is_empty() {
                    cal.batches
                } else {
                    cal.batches.max(1) * cal.records.len()
                } as f64;
                let estimate = TCR_ALPHA_GRID.len() as f64
                    * cal.call_work_seconds
                    * (calls + 4.0 * cal.records.len() as f64);
                if estimate > AUTO_MAX_SECONDS {
                    cx.note(format!(
                        "TCR: --tcr-alpha auto would take about {} to measure (over {AUTO_MAX_SECONDS} s); α = {DEFAULT_ALPHA}",
                        crate::analysis::budget::human_duration(estimate)
                    ));
                    vec![DEFAULT_ALPHA]
                } else {
                    TCR_ALPHA_GRID.to_vec()
                }
            }
        };
        let before = (cx.model.clone(), cx.calibration.clone());
        let notes = cx.notes.clone();
        let keep_alive: Vec<String> = cx.step_index.iter().cloned().collect();
        // Per α: the balanced model, its calibration, report, notes and trial SQNR.
        type Trial = (
            Model,
            Option<crate::analysis::calibration::Calibration>,
            TcrReport,
            Vec<String>,
            Option<f64>,
        );
        let mut best: Option<Trial> = None;
        let mut trials = vec![];
        for &alpha in &alphas {
            (cx.model, cx.calibration) = before.clone();
            cx.notes = notes.clone();
            let cal = cx.calibration.as_ref().expect("calibrated");
            let report = reparameterize(
                &mut cx.model,
                &keep_alive,
                &cx.options.keep_float,
                alpha,
                &cal.records,
                &cal.record_steps,
            )?;
            // The ranges and the layer inputs of the first calibration describe the
            // model before the rewrite.
            crate::passes::recalibrate(cx)?;
            cx.notes.insert(0, tcr_line(&report));
            let sqnr = match alphas.len() {
                1 => None,
                _ => {
                    let cal = cx.calibration.as_ref().expect("calibrated");
                    let db = trial_sqnr(&cx.model, cal, cx)?;
                    trials.push((alpha, db));
                    Some(db)
                }
            };
            if best.as_ref().is_none_or(|b| {
                sqnr.unwrap_or(f64::NEG_INFINITY) > b.4.unwrap_or(f64::NEG_INFINITY)
            }) {
                best = Some((
                    cx.model.clone(),
                    cx.calibration.clone(),
                    report,
                    cx.notes.clone(),
                    sqnr,
                ));
            }
        }
        let (model, calibration, mut report, kept_notes, best_db) = best.expect("at least one α");
        (cx.model, cx.calibration, cx.notes) = (model, calibration, kept_notes);
        report.alpha_trials = trials;
        if mode == Tcr::Auto && !report.balanced.is_empty() {
            let off = trial_sqnr(&before.0, before.1.as_ref().expect("calibrated"), cx)?;
            let on = match best_db {
                Some(db) => db,
                None => trial_sqnr(&cx.model, cx.calibration.as_ref().expect("calibrated"), cx)?,
            };
            report.auto_db = Some((off, on));
            if on - off < AUTO_MIN_GAIN_DB {
                (cx.model, cx.calibration) = before;
                report.applied = false;
            }
        }
        cx.note(report.summary());
        if report.applied {
            cx.balanced_float = Some(cx.model.clone());
        }
        cx.tcr = Some(report);
        Ok(())
    }
}

/// The note saying what one rewrite did.
fn tcr_line(report: &TcrReport) -> String {
    let folded = report
        .balanced
        .iter()
        .filter(|b| b.folded_into != "mul")
        .count();
    let (sb, sa) = report.balanced.iter().fold((0f32, 0f32), |(a, b), x| {
        (a + x.spread_before, b + x.spread_after)
    });
    let n = report.balanced.len().max(1) as f32;
    format!(
        "TCR (α = {}): {} activations balanced ({} folded into their affine producer, {} through a new Mul) from {} records over {} steps; channel spread max/mean {:.1} → {:.1} (mean over activations); recalibrating",
        report.alpha,
        report.balanced.len(),
        folded,
        report.balanced.len() - folded,
        report.records,
        report.steps,
        sb / n,
        sa / n,
    )
}

/// Mean output SQNR (dB, over the steps) of `model` quantized with `cal` as the options
/// say (no output Q/DQ pairs: their own search measures them), on the int8 runtime,
/// against the float outputs calibration kept for its records.
fn trial_sqnr(
    model: &Model,
    cal: &crate::analysis::calibration::Calibration,
    cx: &PassContext,
) -> Result<f64> {
    if cal.record_outputs.len() != cal.records.len() {
        return Err(Error::pass(
            "reparameterize",
            "--tcr auto needs the float outputs of the calibration records",
        ));
    }
    let options = crate::options::Options {
        output_qdq: crate::options::OutputQdq::None,
        ..cx.options.clone()
    };
    let m =
        crate::passes::quantized_copy(model, &options, cal, cx.step_index.as_deref(), cx.progress)?;
    let per_step = crate::analysis::evaluate::output_sqnr_against(
        &m,
        &cal.records,
        &cal.record_steps,
        &cal.record_outputs,
    )?;
    Ok(per_step.iter().map(|s| s.sqnr_db.min(200.0)).sum::<f64>() / per_step.len().max(1) as f64)
}

/// A quantized layer whose weight can take per-input-channel factors.
struct Reader {
    node: String,
    weight: String,
    /// The weight's input-channel axis.
    w_axis: usize,
}

/// Where the channels of an activation lie: axis 1 (Conv, NCHW) or the last axis.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ChannelAxis {
    One,
    Last,
}

/// The activations TCR can balance and their readers: every quantized Conv (group 1),
/// Gemm (transA 0) and MatMul (rank-2 weight) with a constant f32 weight, grouped by the
/// activation they read at slot 0; activations read along different channel axes or
/// with different channel counts are left out.
fn candidates(g: &Graph, keep_float: &[String]) -> BTreeMap<String, (ChannelAxis, Vec<Reader>)> {
    let by_name: HashMap<&str, _> = g
        .node_indices()
        .map(|ix| (g.node(ix).name.as_str(), ix))
        .collect();
    let mut out: BTreeMap<String, (ChannelAxis, Vec<Reader>, usize)> = BTreeMap::new();
    let mut rejected: Vec<String> = vec![];
    for t in find_targets(g, keep_float).quantized {
        let (Some(w), Some(x)) = (&t.weight, t.activations.first()) else {
            continue;
        };
        let n = g.node(by_name[t.node.as_str()]);
        if w.slot != 1 || n.inputs[0] != *x {
            continue;
        }
        let Some(wt) = g
            .initializers
            .get(&w.name)
            .filter(|t| t.dtype == DType::F32)
        else {
            continue;
        };
        let (axis, w_axis) = match t.op.as_str() {
            "Conv" if n.attr_int("group").unwrap_or(1) == 1 && wt.shape.len() >= 3 => {
                (ChannelAxis::One, 1)
            }
            "Gemm" if n.attr_int("transA").unwrap_or(0) == 0 && wt.shape.len() == 2 => {
                let trans_b = n.attr_int("transB").unwrap_or(0) == 1;
                (ChannelAxis::Last, if trans_b { 1 } else { 0 })
            }
            "MatMul" if wt.shape.len() == 2 => (ChannelAxis::Last, 0),
            _ => {
                rejected.push(x.clone());
                continue;
            }
        };
        let channels = wt.shape[w_axis];
        let reader = Reader {
            node: t.node.clone(),
            weight: w.name.clone(),
            w_axis,
        };
        match out.get_mut(x) {
            Some((a, readers, c)) if *a == axis && *c == channels => readers.push(reader),
            Some(_) => rejected.push(x.clone()),
            None => {
                out.insert(x.clone(), (axis, vec![reader], channels));
            }
        }
    }
    // A value some quantized layer reads in a way TCR cannot follow keeps its scale
    // (its Q/DQ pair is shared by every reader).
    out.into_iter()
        .filter(|(x, _)| !rejected.contains(x))
        .map(|(x, (a, r, _))| (x, (a, r)))
        .collect()
}

/// Per-channel max|x| of `v` (shape `shape`) along `axis`, folded into `acc`.
fn channel_absmax(v: &[f32], shape: &[usize], axis: ChannelAxis, acc: &mut [f32]) -> Result<()> {
    let c = acc.len();
    let (outer, inner) = match axis {
        ChannelAxis::One if shape.len() >= 2 && shape[1] == c => {
            (shape[0], shape[2..].iter().product::<usize>())
        }
        ChannelAxis::Last if shape.last() == Some(&c) => (v.len() / c.max(1), 1),
        _ => {
            return Err(Error::pass(
                "reparameterize",
                format!("activation of shape {shape:?} does not have {c} channels on the axis its layers read"),
            ))
        }
    };
    for o in 0..outer {
        for (ch, a) in acc.iter_mut().enumerate() {
            let start = (o * c + ch) * inner;
            for &x in &v[start..start + inner] {
                *a = a.max(x.abs());
            }
        }
    }
    Ok(())
}

/// Per-input-channel max|w| of a weight along `w_axis`, folded into `acc`.
fn weight_absmax(w: &Tensor, w_axis: usize, acc: &mut [f32]) -> Result<()> {
    let v = w.to_vec::<f32>()?;
    let c = w.shape[w_axis];
    let inner: usize = w.shape[w_axis + 1..].iter().product();
    for (i, x) in v.iter().enumerate() {
        let ch = (i / inner) % c;
        acc[ch] = acc[ch].max(x.abs());
    }
    Ok(())
}

/// `w` with input channel `c` (along `w_axis`) multiplied by `r[c]`.
fn scale_weight(w: &Tensor, w_axis: usize, r: &[f32]) -> Result<Tensor> {
    let mut v = w.to_vec::<f32>()?;
    let c = w.shape[w_axis];
    let inner: usize = w.shape[w_axis + 1..].iter().product();
    for (i, x) in v.iter_mut().enumerate() {
        *x *= r[(i / inner) % c];
    }
    Ok(Tensor::from_vec(w.shape.clone(), &v))
}

/// The balance factors `r_c = a_c^α / w_c^(1−α)`; 1 where a channel has no activation
/// or no weight (nothing to balance), kept within [1/R_LIMIT, R_LIMIT].
pub fn balance_factors(act: &[f32], weight: &[f32], alpha: f32) -> Vec<f32> {
    act.iter()
        .zip(weight)
        .map(|(&a, &w)| {
            if a <= 0.0 || w <= 0.0 || !a.is_finite() || !w.is_finite() {
                return 1.0;
            }
            (a.powf(alpha) / w.powf(1.0 - alpha)).clamp(1.0 / R_LIMIT, R_LIMIT)
        })
        .collect()
}

fn spread(a: &[f32]) -> f32 {
    let mean = a.iter().sum::<f32>() / a.len().max(1) as f32;
    let max = a.iter().copied().fold(0f32, f32::max);
    if mean > 0.0 {
        max / mean
    } else {
        1.0
    }
}

/// A constant f32 initializer that broadcasts per channel of an activation of rank
/// `rank` read along `axis`: `[C, 1, .., 1]` (axis 1) or `[C]` / `[1, .., C]` (last).
fn per_channel_const(
    g: &Graph,
    name: &str,
    axis: ChannelAxis,
    c: usize,
    rank: usize,
) -> Option<Vec<f32>> {
    let t = g.initializers.get(name).filter(|t| t.dtype == DType::F32)?;
    let dims: Vec<usize> = t.shape.iter().copied().skip_while(|&d| d == 1).collect();
    // Right-aligned broadcasting: the channel count must land on the channel axis.
    let ok = match axis {
        ChannelAxis::One => {
            dims.len() + 1 == rank && dims.first() == Some(&c) && dims[1..].iter().all(|&d| d == 1)
        }
        ChannelAxis::Last => dims == [c],
    };
    if !ok {
        return None;
    }
    t.to_vec::<f32>().ok()
}

/// The per-channel affine `Add(Mul(n, γ), β)` (either operand order) or
/// LayerNormalization producing `x`, when only `readers` read `x` and (for Mul + Add)
/// only the Add reads the Mul: the initializer names of (γ, β) and the node to name.
fn affine_producer(
    g: &Graph,
    x: &str,
    readers: &[Reader],
    axis: ChannelAxis,
    c: usize,
    rank: usize,
) -> Option<(String, String, String)> {
    if g.is_graph_output(x) {
        return None;
    }
    let consumers = g.consumers(x);
    if consumers
        .iter()
        .any(|&(ix, _)| !readers.iter().any(|r| r.node == g.node(ix).name))
    {
        return None;
    }
    let (p, _) = g.producer(x)?;
    let add = g.node(p);
    let is_const = |v: &str| per_channel_const(g, v, axis, c, rank).is_some();
    if add.is_onnx_op("LayerNormalization") && axis == ChannelAxis::Last {
        let axis_attr = add.attr_int("axis").unwrap_or(-1);
        let (scale, bias) = (add.inputs.get(1)?, add.inputs.get(2)?);
        if (axis_attr == -1 || axis_attr as usize == rank - 1)
            && add.outputs.len() == 1
            && is_const(scale)
            && is_const(bias)
        {
            return Some((scale.clone(), bias.clone(), add.name.clone()));
        }
        return None;
    }
    if !add.is_onnx_op("Add") {
        return None;
    }
    let (m, beta) = match (&add.inputs[0], &add.inputs[1]) {
        (a, b) if is_const(b) => (a, b),
        (a, b) if is_const(a) => (b, a),
        _ => return None,
    };
    let (mp, _) = g.producer(m)?;
    let mul = g.node(mp);
    if !mul.is_onnx_op("Mul") || g.consumers(m).len() != 1 || g.is_graph_output(m) {
        return None;
    }
    let gamma = match (&mul.inputs[0], &mul.inputs[1]) {
        (_, b) if is_const(b) => b,
        (a, _) if is_const(a) => a,
        _ => return None,
    };
    Some((
        gamma.clone(),
        beta.clone(),
        format!("{} + {}", mul.name, add.name),
    ))
}

/// Balances every activation TCR can reach (see the module text); `records` and
/// `steps` are calibration's evaluation records and their time steps. The float
/// function is unchanged up to rounding.
pub fn reparameterize(
    model: &mut Model,
    keep_alive: &[String],
    keep_float: &[String],
    alpha: f32,
    records: &[BTreeMap<String, Tensor>],
    steps: &[i64],
) -> Result<TcrReport> {
    if !(0.0..=1.0).contains(&alpha) {
        return Err(Error::invalid(format!(
            "--tcr-alpha {alpha}: between 0 and 1"
        )));
    }
    let cands = candidates(&model.graph, keep_float);
    let mut report = TcrReport {
        alpha,
        applied: true,
        records: records.len(),
        steps: steps
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        ..Default::default()
    };
    if cands.is_empty() || records.is_empty() {
        return Ok(report);
    }
    let values: Vec<String> = cands.keys().cloned().collect();
    let channels: Vec<usize> = cands
        .values()
        .map(|(_, r)| model.graph.initializers[&r[0].weight].shape[r[0].w_axis])
        .collect();
    // a_c = max over the steps of each step's channel maximum: the max over all records.
    let mut act: Vec<Vec<f32>> = channels.iter().map(|&c| vec![0f32; c]).collect();
    let mut ranks = vec![0usize; values.len()];
    {
        let runner = Runner::observing(model, &values, Optimize::Full)?;
        for rec in records {
            let inputs = rec.clone().into_iter().collect();
            runner.run_observed(&inputs, &mut |k, t| {
                let v = crate::ir::exec::f32_values(t, &values[k])?;
                ranks[k] = t.shape().len();
                channel_absmax(v, t.shape(), cands[&values[k]].0, &mut act[k])
            })?;
        }
    }
    let g = &mut model.graph;
    let by_name: HashMap<String, _> = g
        .node_indices()
        .map(|ix| (g.node(ix).name.clone(), ix))
        .collect();
    for (k, (x, (axis, readers))) in cands.iter().enumerate() {
        let c = channels[k];
        let mut wmax = vec![0f32; c];
        for r in readers {
            weight_absmax(&g.initializers[&r.weight], r.w_axis, &mut wmax)?;
        }
        let r = balance_factors(&act[k], &wmax, alpha);
        let inv: Vec<f32> = r.iter().map(|v| 1.0 / v).collect();
        let after: Vec<f32> = act[k].iter().zip(&inv).map(|(a, i)| a * i).collect();
        let base = x.trim_start_matches('/');
        // Weights: a new initializer per reader (a weight another node shares keeps its
        // values there).
        for rd in readers {
            let w = scale_weight(&g.initializers[&rd.weight], rd.w_axis, &r)?;
            let name = g.add_initializer(&format!("{}_tcr", rd.weight), w);
            g.set_input(by_name[&rd.node], 1, &name);
        }
        let rank = ranks[k];
        let folded_into = match affine_producer(g, x, readers, *axis, c, rank) {
            Some((gamma, beta, node)) => {
                for v in [&gamma, &beta] {
                    let t = &g.initializers[v];
                    let vals: Vec<f32> = t
                        .to_vec::<f32>()?
                        .iter()
                        .zip(&inv)
                        .map(|(a, i)| a * i)
                        .collect();
                    let name = g.add_initializer(
                        &format!("{v}_tcr"),
                        Tensor::from_vec(t.shape.clone(), &vals),
                    );
                    let (p, _) = g.producer(x).expect("the affine producer was found from x");
                    // γ sits on the Mul before the Add for Mul + Add, on the
                    // LayerNormalization itself otherwise.
                    let holder = g
                        .node(p)
                        .inputs
                        .iter()
                        .any(|i| i == v)
                        .then_some(p)
                        .or_else(|| {
                            g.node(p)
                                .inputs
                                .iter()
                                .filter_map(|i| g.producer(i))
                                .map(|(q, _)| q)
                                .find(|&q| g.node(q).inputs.iter().any(|i| i == v))
                        })
                        .expect("γ and β are inputs of the affine");
                    let slots: Vec<usize> = g
                        .node(holder)
                        .inputs
                        .iter()
                        .enumerate()
                        .filter(|(_, i)| *i == v)
                        .map(|(s, _)| s)
                        .collect();
                    for s in slots {
                        g.set_input(holder, s, &name);
                    }
                }
                format!("affine {node}")
            }
            None => {
                let shape = match axis {
                    ChannelAxis::One => {
                        let mut s = vec![c];
                        s.extend(std::iter::repeat_n(1, rank.saturating_sub(2)));
                        s
                    }
                    ChannelAxis::Last => vec![c],
                };
                let f =
                    g.add_initializer(&format!("{base}_tcr_inv"), Tensor::from_vec(shape, &inv));
                let y = g.add_op("Mul", vec![x.clone(), f], &format!("{base}_tcr"), vec![])?;
                for rd in readers {
                    g.set_input(by_name[&rd.node], 0, &y);
                }
                "mul".to_string()
            }
        };
        report.balanced.push(Balanced {
            value: x.clone(),
            layers: readers.iter().map(|r| r.node.clone()).collect(),
            channels: c,
            folded_into,
            spread_before: spread(&act[k]),
            spread_after: spread(&after),
            r_min: r.iter().copied().fold(f32::INFINITY, f32::min),
            r_max: r.iter().copied().fold(0f32, f32::max),
        });
    }
    // The replaced affine nodes go; values a later pass reads (the step index of
    // fold-tib, for per-step scales) stay even when nothing reads them yet.
    g.remove_dead_keeping(keep_alive);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_balance_activation_against_weight() {
        // α = 0.5: r = sqrt(a / w); both ranges become sqrt(a·w).
        let r = balance_factors(&[16.0, 1.0, 0.0], &[1.0, 4.0, 2.0], 0.5);
        assert_eq!(r, vec![4.0, 0.5, 1.0]);
        // α = 1: the activation range moves into the weight entirely.
        let r = balance_factors(&[8.0], &[3.0], 1.0);
        assert_eq!(r, vec![8.0]);
    }

    #[test]
    fn channel_ranges_follow_the_axis() {
        // [1, 2, 2] NCHW-like with C = 2 on axis 1.
        let mut acc = vec![0f32; 2];
        channel_absmax(
            &[1.0, -3.0, 0.5, 2.0],
            &[1, 2, 2],
            ChannelAxis::One,
            &mut acc,
        )
        .unwrap();
        assert_eq!(acc, vec![3.0, 2.0]);
        let mut acc = vec![0f32; 2];
        channel_absmax(&[1.0, -3.0, 0.5, 2.0], &[2, 2], ChannelAxis::Last, &mut acc).unwrap();
        assert_eq!(acc, vec![1.0, 3.0]);
    }

    #[test]
    fn scaled_weight_multiplies_input_channels() {
        // Conv weight [O=1, I=2, 1, 1] and Gemm weight [K=2, N=2] (axis 0).
        let w = Tensor::from_vec(vec![1, 2, 1, 1], &[1f32, 1.0]);
        let s = scale_weight(&w, 1, &[2.0, 3.0]).unwrap();
        assert_eq!(s.to_vec::<f32>().unwrap(), vec![2.0, 3.0]);
        let w = Tensor::from_vec(vec![2, 2], &[1f32, 1.0, 1.0, 1.0]);
        let s = scale_weight(&w, 0, &[2.0, 3.0]).unwrap();
        assert_eq!(s.to_vec::<f32>().unwrap(), vec![2.0, 2.0, 3.0, 3.0]);
    }
}
