//! quantize: per-output-channel int8 (or 4-bit values stored as int8) weights feeding
//! DequantizeLinear, and QuantizeLinear/DequantizeLinear pairs on the activation inputs
//! of Conv, Gemm, MatMul and Einsum (the attention products included), with the ranges
//! `calibrate` found.
//!
//! Finite Set Calibration: an activation quantized with one set of scales gets plain
//! constant Q/DQ (the form onnxruntime fuses into its int8 kernels). One whose ranges
//! differ over the steps gets a scale table over `G` groups of consecutive steps of S
//! (chosen per activation by the measured gain, [`StepGroups::Auto`]) and one zero point
//! shared by the groups. tract only accepts constant Q/DQ scales, so the step's scale is
//! applied around a unit-scale pair with that constant zero point:
//!
//! ```text
//! g  = index(t) · G / |S|                          (integer; index from fold-tib)
//! q  = QuantizeLinear(x / s[g], 1, z)              = QuantizeLinear(x, s[g], z), exactly
//! x̂  = DequantizeLinear(q, 1, z) · s[g]            = DequantizeLinear(q, s[g], z)
//! ```
//!
//! Every op is standard (onnxruntime and tract load it); the runtime's int8 kernels read
//! the group index as an input and quantize with `s[g]` ([`tfmqc_runtime::ops::conv`]).
//! A `t` outside S gives an index ≥ |S|, so `g ≥ G`, which the Gather and the runtime
//! refuse. Only activations every reader of which is a weight product (Conv, Gemm,
//! MatMul with a constant weight) get per-step scales: the runtime's fused attention
//! and activation×activation products take constant ones.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::calibrate::{Calibration, Range};
use crate::error::{Error, Result};
use crate::ir::{attr, DType, Graph, Model, Tensor};
use crate::layer_inputs::{LayerInput, Unfold};
use crate::options::Reconstruct;
use crate::options::{timestep_set, Options, OutputQdq, StepGroups};
use crate::pipeline::{Pass, PassContext};
use crate::quant::{act_clip, act_params, act_params_u8, quantize_weight, sqnr_db, RangeSearch};
use crate::reconstruct::{Hessian, HessianLayout, DEFAULT_BLOCK};
use crate::targets::{find_targets, Targets};

pub struct Quantize;

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

/// `--step-groups auto`: an activation gets per-step scales only when they lower its
/// quantization noise, averaged over the visited steps, by at least this (dB).
pub const AUTO_GROUPS_MIN_GAIN_DB: f64 = 0.5;
/// `--step-groups auto`: the coarsest grouping whose gain is within this of the finest's.
pub const AUTO_GROUPS_SLACK_DB: f64 = 0.25;

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

/// The steps of S (|S| = `set.len()`) in each of `groups` groups of consecutive steps.
fn members(set: &[i64], groups: usize) -> Vec<Vec<i64>> {
    let mut m = vec![vec![]; groups];
    for (i, &t) in set.iter().enumerate() {
        m[group_of(i, groups, set.len())].push(t);
    }
    m
}

/// The steps whose ranges calibrate each group under `--step-groups auto`: the group's
/// own and its two neighbours'. Fine groups hold a step or two that one or two
/// calibration trajectories visited; their ranges alone clip other trajectories at those
/// steps (measured on ddim_unet: 64 unsmoothed groups lost up to 4.8 dB at single
/// steps against one set of scales), while neighbouring steps' ranges are close.
fn smoothed_members(set: &[i64], groups: usize) -> Vec<Vec<i64>> {
    let m = members(set, groups);
    if groups == 1 {
        return m;
    }
    (0..groups)
        .map(|k| {
            (k.saturating_sub(1)..(k + 2).min(groups))
                .flat_map(|j| m[j].iter().copied())
                .collect()
        })
        .collect()
}

/// Scales per group with one zero point shared by all (what lets the graph keep a
/// constant zero point): the zero point minimising the summed squared scales, i.e. the
/// quantization noise over the groups; with one group, [`act_params_u8`].
pub fn shared_zero_point_params(ranges: &[Range]) -> (Vec<f32>, u8) {
    if ranges.len() == 1 {
        let (s, z) = act_params_u8(ranges[0].min, ranges[0].max);
        return (vec![s], z);
    }
    let scales_for = |z: u8| -> Vec<f32> {
        ranges
            .iter()
            .map(|r| {
                let (min, max) = (r.min.min(0.0), r.max.max(0.0));
                let up = if max > 0.0 {
                    max / (255 - z as i32) as f32
                } else {
                    0.0
                };
                let down = if min < 0.0 { -min / z as f32 } else { 0.0 };
                up.max(down).max(1e-8 / 255.0)
            })
            .collect()
    };
    let cost = |s: &[f32]| s.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
    // z = 0 cannot hold a negative minimum, z = 255 not a positive maximum (infinite
    // scales, never the best unless the ranges are all one-sided).
    let best = (0..=255u8)
        .map(|z| (z, scales_for(z)))
        .filter(|(_, s)| s.iter().all(|v| v.is_finite()))
        .min_by(|a, b| cost(&a.1).total_cmp(&cost(&b.1)))
        .expect("z = 0 or 255 is finite for one-sided ranges, any other z otherwise");
    (best.1, best.0)
}

/// Gain in quantization SNR (dB, mean over the `visited` positions of S) of `scales` (per
/// group) against the one scale `one`: the noise of a uniform quantizer goes as s².
fn gain_db(scales: &[f32], one: f32, visited: &[usize], len: usize) -> f64 {
    if visited.is_empty() {
        return 0.0;
    }
    visited
        .iter()
        .map(|&i| 20.0 * (one as f64 / scales[group_of(i, scales.len(), len)] as f64).log10())
        .sum::<f64>()
        / visited.len() as f64
}

impl Pass for Quantize {
    fn name(&self) -> &'static str {
        "quantize"
    }
    fn summary(&self) -> &'static str {
        "Per-channel weights with Lp range search; QDQ activations with FSC scales"
    }
    fn requires(&self) -> &'static [&'static str] {
        &["calibrate"]
    }
    fn run(&self, cx: &mut PassContext) -> Result<()> {
        let cal = cx.calibration.clone().expect("checked by requires");
        let plan = quantize(
            &mut cx.model,
            cx.options,
            &cal,
            cx.step_index.as_deref(),
            cx.progress,
        )?;
        let n_w = plan.layers.iter().filter(|l| l.weight.is_some()).count();
        let mean_sqnr = plan
            .layers
            .iter()
            .filter_map(|l| l.weight_sqnr_db)
            .sum::<f64>()
            / n_w.max(1) as f64;
        cx.note(format!(
            "{} layers quantized ({} weights at {} bits, mean weight SQNR {:.1} dB), {} activations at {} bits, {} of them with per-step scales (up to {} step groups); kept in float: {}",
            plan.layers.len(),
            n_w,
            plan.weight_bits,
            mean_sqnr,
            plan.activations.len(),
            plan.act_bits,
            plan.per_step_activations,
            plan.step_groups,
            plan.kept_float.iter().map(|(n, r)| format!("{n} ({r})")).collect::<Vec<_>>().join(", ")
        ));
        if let Some(n) = &plan.output_qdq_note {
            cx.note(n.clone());
        }
        cx.quant = Some(plan);
        Ok(())
    }
}

/// The activation range of one value for one group of steps.
fn group_range(cal: &Calibration, value: &str, steps: &[i64], baseline: bool) -> Result<Range> {
    if baseline {
        return cal
            .global
            .get(value)
            .copied()
            .ok_or_else(|| Error::pass("quantize", format!("no calibration data for '{value}'")));
    }
    let per_step = cal
        .per_step
        .get(value)
        .ok_or_else(|| Error::pass("quantize", format!("no calibration data for '{value}'")))?;
    let in_group: Vec<Range> = steps
        .iter()
        .filter_map(|t| per_step.get(t).copied())
        .collect();
    // A group no trajectory visited takes the range over all visited steps.
    let ranges: Vec<Range> = if in_group.is_empty() {
        per_step.values().copied().collect()
    } else {
        in_group
    };
    Ok(ranges
        .into_iter()
        .reduce(|a, b| Range {
            min: a.min.min(b.min),
            max: a.max.max(b.max),
        })
        .expect("at least one step"))
}

pub fn quantize(
    model: &mut Model,
    options: &Options,
    cal: &Calibration,
    step_index: Option<&str>,
    progress: &dyn Fn(&str),
) -> Result<QuantPlan> {
    if model.onnx_opset() < 13 {
        return Err(Error::pass(
            "quantize",
            format!(
                "per-channel DequantizeLinear needs opset ≥ 13; the model has {}",
                model.onnx_opset()
            ),
        ));
    }
    let set = timestep_set(model, options)?;
    let explicit = match options.step_groups {
        StepGroups::Fixed(n) if n > 1 => Some(n.min(set.len())),
        _ => None,
    };
    if explicit.is_some() && step_index.is_none() && !options.baseline_minmax {
        return Err(Error::pass(
            "quantize",
            "--step-groups > 1 needs the step index of fold-tib (run fold-tib before quantize)",
        ));
    }
    // Per-step scales need the step index (no TIB folded: one set of scales).
    let per_step = !options.baseline_minmax
        && options.act_bits == 8
        && options.step_groups.per_step()
        && step_index.is_some();
    let search = if options.baseline_minmax {
        RangeSearch::MinMax
    } else {
        RangeSearch::Lp
    };
    let Targets {
        quantized,
        kept_float,
    } = find_targets(&model.graph, &options.keep_float);
    let mut acts: Vec<String> = vec![];
    for a in quantized.iter().flat_map(|t| t.activations.iter()) {
        if !acts.contains(a) {
            acts.push(a.clone());
        }
    }
    // Activations of activation×activation products (attention) keep one set of scales:
    // the runtime's fused attention takes constant ones.
    let constant_only: std::collections::HashSet<&String> = quantized
        .iter()
        .filter(|t| t.weight.is_none())
        .flat_map(|t| t.activations.iter())
        .collect();
    let groups_of: HashMap<String, usize> = acts
        .iter()
        .map(|a| {
            let g = match (per_step && !constant_only.contains(a), explicit) {
                (false, _) => 1,
                (true, Some(n)) => n,
                (true, None) => auto_groups(cal, a, &set)?,
            };
            Ok((a.clone(), g))
        })
        .collect::<Result<_>>()?;
    let mut ranges: HashMap<String, Vec<Range>> = HashMap::new();
    let mut distinct: Vec<usize> = groups_of.values().copied().collect();
    distinct.sort_unstable();
    distinct.dedup();
    for &n in &distinct {
        let these: Vec<String> = acts
            .iter()
            .filter(|a| groups_of[*a] == n)
            .cloned()
            .collect();
        let steps = match explicit {
            Some(_) => members(&set, n),
            None => smoothed_members(&set, n),
        };
        ranges.extend(activation_ranges(model, cal, &these, &steps, options)?);
    }
    let reconstructed: HashMap<String, usize> = match &cal.layer_columns {
        Some(c) if !options.baseline_minmax && options.reconstruct != Reconstruct::None => c
            .layers()
            .iter()
            .enumerate()
            .map(|(i, l)| (l.node.clone(), i))
            .collect(),
        _ => HashMap::new(),
    };
    check_memory(model, options, &quantized, cal, &reconstructed)?;
    crate::threads::set_cap(options.threads);
    let g = &mut model.graph;
    let by_name: HashMap<String, _> = g
        .node_indices()
        .map(|ix| (g.node(ix).name.clone(), ix))
        .collect();
    let mut plan = QuantPlan {
        weight_bits: options.weight_bits,
        act_bits: options.act_bits,
        step_groups: distinct.last().copied().unwrap_or(1),
        timesteps: set.clone(),
        kept_float,
        ..Default::default()
    };
    // The group index of each grouping, built once when first needed.
    let mut group_index: HashMap<usize, String> = HashMap::new();
    let mut step_scalar: Option<String> = None;
    let all_steps = group_range_all(cal, &acts, &set, options.baseline_minmax)?;
    let mut dequantized_weights: HashMap<String, String> = HashMap::new();
    let mut dequantized_acts: BTreeMap<String, String> = BTreeMap::new();
    let clock = std::time::Instant::now();
    for (done, target) in quantized.iter().enumerate() {
        let eta = match done {
            0 => String::new(),
            n => format!(
                ", about {} left",
                crate::budget::human_duration(
                    clock.elapsed().as_secs_f64() / n as f64 * (quantized.len() - n) as f64
                )
            ),
        };
        progress(&format!(
            "quantize: layer {}/{} ({}){eta}",
            done + 1,
            quantized.len(),
            target.node
        ));
        let ix = by_name[&target.node];
        let mut layer = LayerReport {
            node: target.node.clone(),
            op: target.op.clone(),
            weight: None,
            weight_sqnr_db: None,
            output_error_rtn: None,
            output_error_reconstructed: None,
            reconstruct_seconds: None,
            activations: vec![],
        };
        if let Some(w) = &target.weight {
            let t = &g.initializers[&w.name];
            if t.dtype == DType::F32 {
                let dq = match dequantized_weights.get(&w.name) {
                    Some(dq) => dq.clone(),
                    None => {
                        let values = t.to_vec::<f32>()?;
                        let shape = t.shape.clone();
                        let mut q =
                            quantize_weight(&values, &shape, w.axis, options.weight_bits, search);
                        if let (Some(&li), Some(columns)) =
                            (reconstructed.get(&target.node), &cal.layer_columns)
                        {
                            let start = std::time::Instant::now();
                            let layer_input = &columns.layers()[li];
                            let h =
                                columns.gram(li, &hessian_layout(layer_input, hessian_block()))?;
                            let r =
                                reconstruct_weight(&values, &shape, w.axis, &q.scales, options, &h);
                            layer.output_error_rtn = Some(r.rtn_error);
                            layer.output_error_reconstructed = Some(r.error);
                            layer.reconstruct_seconds = Some(start.elapsed().as_secs_f64());
                            q.values = from_rows(&r.q, &shape, w.axis);
                        }
                        layer.weight_sqnr_db = Some(sqnr_db(&values, &q.dequantize(&shape)));
                        // Read once: a view of the model's data file need not stay resident.
                        t.data.release_pages();
                        let channels = q.scales.len();
                        let qi = g.add_initializer(
                            &format!("{}_quantized", w.name),
                            Tensor::from_vec(shape, &q.values),
                        );
                        let sc = g.add_initializer(
                            &format!("{}_scale", w.name),
                            Tensor::from_vec(vec![channels], &q.scales),
                        );
                        let zp = g.add_initializer(
                            &format!("{}_zero_point", w.name),
                            Tensor::from_vec(vec![channels], &vec![0i8; channels]),
                        );
                        let dq = g.add_op(
                            "DequantizeLinear",
                            vec![qi, sc, zp],
                            &format!("{}_dequantized", w.name),
                            vec![attr::int("axis", w.axis as i64)],
                        )?;
                        dequantized_weights.insert(w.name.clone(), dq.clone());
                        dq
                    }
                };
                g.set_input(ix, w.slot, &dq);
                layer.weight = Some(w.name.clone());
            }
        }
        if options.act_bits <= 8 {
            for a in &target.activations {
                let dq = match dequantized_acts.get(a) {
                    Some(dq) => dq.clone(),
                    None => {
                        // Below 8 bits one set of scales (per-step ones are 8-bit only),
                        // on the narrower grid, behind a Clip that keeps values on it.
                        let (scales, zp) = match options.act_bits {
                            8 => shared_zero_point_params(&ranges[a]),
                            bits => {
                                let r = &ranges[a][0];
                                let (s, z) = act_params(r.min, r.max, bits);
                                (vec![s], z)
                            }
                        };
                        let input = narrow_to_bits(g, a, &scales, zp, options.act_bits)?;
                        let group = match scales.len() {
                            1 => None,
                            n => Some(match group_index.get(&n) {
                                Some(v) => v.clone(),
                                None => {
                                    if step_scalar.is_none() {
                                        let index = step_index.expect("checked: per-step");
                                        step_scalar = Some(add_step_scalar(g, index)?);
                                    }
                                    let first = step_scalar.as_deref().expect("just set");
                                    let v = add_group_index(g, first, n, set.len())?;
                                    group_index.insert(n, v.clone());
                                    v
                                }
                            }),
                        };
                        let dq = insert_qdq(g, &input, &scales, zp, group.as_deref())?;
                        let one = act_params_u8(all_steps[a].min, all_steps[a].max).0;
                        let visited = visited_positions(cal, a, &set);
                        plan.activations.push(ActParams {
                            value: a.clone(),
                            groups: scales.iter().map(|&s| (s, zp)).collect(),
                            gain_db: match scales.len() {
                                1 => 0.0,
                                _ => gain_db(&scales, one, &visited, set.len()),
                            },
                        });
                        if scales.len() > 1 {
                            plan.per_step_activations += 1;
                        }
                        dequantized_acts.insert(a.clone(), dq.clone());
                        dq
                    }
                };
                let slots: Vec<usize> = g
                    .node(ix)
                    .inputs
                    .iter()
                    .enumerate()
                    .filter(|(_, i)| *i == a)
                    .map(|(s, _)| s)
                    .collect();
                for s in slots {
                    g.set_input(ix, s, &dq);
                }
                layer.activations.push(a.clone());
            }
        }
        plan.layers.push(layer);
    }
    g.remove_dead();
    // onnxruntime's int8 fusion, where the input's scale is constant (int32_biases skips
    // the layers whose input has per-step scales: their bias stays float).
    if options.act_bits == 8 && !options.baseline_minmax {
        plan.int32_biases = int32_biases(&mut model.graph, &quantized)?;
        output_qdq(model, options, cal, &quantized, &set, &mut plan, progress)?;
        model.graph.remove_dead();
    }
    Ok(plan)
}

/// Positions in S of the steps calibration visited for `value`.
fn visited_positions(cal: &Calibration, value: &str, set: &[i64]) -> Vec<usize> {
    let Some(per_step) = cal.per_step.get(value) else {
        return vec![];
    };
    set.iter()
        .enumerate()
        .filter(|(_, t)| per_step.contains_key(t))
        .map(|(i, _)| i)
        .collect()
}

/// The range of every activation over all steps (what one set of scales covers).
fn group_range_all(
    cal: &Calibration,
    acts: &[String],
    set: &[i64],
    baseline: bool,
) -> Result<HashMap<String, Range>> {
    acts.iter()
        .map(|a| Ok((a.clone(), group_range(cal, a, set, baseline)?)))
        .collect()
}

/// `--step-groups auto` for one activation: of 1, 2, 4, … groups (up to one per visited
/// step), the fewest whose measured gain ([`gain_db`] of the calibrated ranges) is within
/// [`AUTO_GROUPS_SLACK_DB`] of the finest grouping's; 1 when the finest gains less than
/// [`AUTO_GROUPS_MIN_GAIN_DB`].
fn auto_groups(cal: &Calibration, value: &str, set: &[i64]) -> Result<usize> {
    let visited = visited_positions(cal, value, set);
    let finest = visited.len().min(set.len());
    if finest < 2 {
        return Ok(1);
    }
    let all = group_range(cal, value, set, false)?;
    let one = act_params_u8(all.min, all.max).0;
    let gain = |n: usize| -> Result<f64> {
        let ranges: Vec<Range> = smoothed_members(set, n)
            .iter()
            .map(|m| group_range(cal, value, m, false))
            .collect::<Result<_>>()?;
        Ok(gain_db(
            &shared_zero_point_params(&ranges).0,
            one,
            &visited,
            set.len(),
        ))
    };
    let best = gain(finest)?;
    if best < AUTO_GROUPS_MIN_GAIN_DB {
        return Ok(1);
    }
    let mut n = 2;
    while n < finest {
        if gain(n)? >= best - AUTO_GROUPS_SLACK_DB {
            return Ok(n);
        }
        n *= 2;
    }
    Ok(finest)
}

/// The first sample's position of t in S from fold-tib's `index`, as a scalar (a
/// sampling batch shares its step).
fn add_step_scalar(g: &mut Graph, index: &str) -> Result<String> {
    let flat_shape = g.add_initializer("fsc/flat", Tensor::from_vec(vec![1], &[-1i64]));
    let flat = g.add_op(
        "Reshape",
        vec![index.to_string(), flat_shape],
        "fsc/step_index_flat",
        vec![],
    )?;
    let zero = g.add_initializer("fsc/first", Tensor::scalar(0i64));
    g.add_op(
        "Gather",
        vec![flat, zero],
        "fsc/step_index",
        vec![attr::int("axis", 0)],
    )
}

/// The group among `groups` of the step at position `first` of S (|S| = `len`), as a
/// scalar: `first · groups / len`. A position ≥ `len` (a `t` outside S) gives a group ≥
/// `groups`, which the scale tables' Gather and the runtime refuse.
fn add_group_index(g: &mut Graph, first: &str, groups: usize, len: usize) -> Result<String> {
    let first = first.to_string();
    if groups == len {
        return Ok(first);
    }
    let n = g.add_initializer(
        &format!("fsc/groups_{groups}"),
        Tensor::scalar(groups as i64),
    );
    let l = g.add_initializer("fsc/set_size", Tensor::scalar(len as i64));
    let scaled = g.add_op(
        "Mul",
        vec![first, n],
        &format!("fsc/step_times_{groups}"),
        vec![],
    )?;
    g.add_op(
        "Div",
        vec![scaled, l],
        &format!("fsc/group_of_{groups}"),
        vec![],
    )
}

/// The outputs of the quantized Convs `--output-qdq` may quantize (calibration observes
/// them): Convs with a quantized weight and input whose output is not a graph output.
pub fn output_qdq_values(g: &Graph, options: &Options, targets: &Targets) -> Vec<String> {
    if options.output_qdq == OutputQdq::None || options.act_bits != 8 || options.baseline_minmax {
        return vec![];
    }
    conv_outputs(g, &targets.quantized)
        .into_iter()
        .map(|(_, y)| y)
        .collect()
}

/// (node, output) of every quantized Conv with a weight and a quantized input whose
/// output is not a graph output (onnxruntime does not fuse one that is).
fn conv_outputs(g: &Graph, quantized: &[crate::targets::Target]) -> Vec<(String, String)> {
    let by_name: HashMap<&str, _> = g
        .node_indices()
        .map(|ix| (g.node(ix).name.as_str(), ix))
        .collect();
    quantized
        .iter()
        .filter(|t| t.op == "Conv" && t.weight.is_some() && !t.activations.is_empty())
        .filter_map(|t| {
            let y = by_name
                .get(t.node.as_str())
                .map(|&ix| g.node(ix).outputs[0].clone())?;
            (!g.is_graph_output(&y)).then(|| (t.node.clone(), y))
        })
        .collect()
}

/// A constant f32 initializer read by slot `slot` of the DequantizeLinear producing
/// `value` (its scale).
fn dq_scale(g: &Graph, value: &str) -> Option<Vec<f32>> {
    let (p, _) = g.producer(value)?;
    let dq = g.node(p);
    if !dq.is_onnx_op("DequantizeLinear") {
        return None;
    }
    let t = g.initializers.get(dq.inputs.get(1)?)?;
    if t.dtype != DType::F32 {
        return None;
    }
    t.to_vec::<f32>().ok()
}

/// Rewrites the float bias of every quantized Conv and Gemm whose input and weight are
/// quantized with constant scales as `DequantizeLinear(int32, s_x · s_w[c], 0, axis 0)`:
/// onnxruntime fuses a Conv (QLinearConv) or Gemm (QGemm) only when every input comes from
/// DequantizeLinear, the bias as int32. The bias moves by at most half a step of the
/// accumulator (s_x · s_w[c] / 2). Returns how many were rewritten.
fn int32_biases(g: &mut Graph, quantized: &[crate::targets::Target]) -> Result<usize> {
    let mut done = 0;
    for t in quantized {
        if !(t.op == "Conv" || t.op == "Gemm") || t.weight.is_none() {
            continue;
        }
        let Some(ix) = g.node_indices().find(|&ix| g.node(ix).name == t.node) else {
            continue;
        };
        let n = g.node(ix);
        let Some(b) = n.inputs.get(2).filter(|b| !b.is_empty()).cloned() else {
            continue;
        };
        if t.op == "Gemm" && n.attr_float("beta").unwrap_or(1.0) != 1.0 {
            continue;
        }
        let (Some(sx), Some(sw)) = (dq_scale(g, &n.inputs[0]), dq_scale(g, &n.inputs[1])) else {
            continue;
        };
        let Some(bias) = g.initializers.get(&b).filter(|t| t.dtype == DType::F32) else {
            continue;
        };
        let channels = if sw.len() > 1 { sw.len() } else { bias.numel() };
        if sx.len() != 1 || bias.shape != [channels] {
            continue;
        }
        let values = bias.to_vec::<f32>()?;
        let scales: Vec<f32> = (0..channels)
            .map(|c| sx[0] * sw[if sw.len() > 1 { c } else { 0 }])
            .collect();
        let q: Option<Vec<i32>> = values
            .iter()
            .zip(&scales)
            .map(|(&v, &s)| {
                let r = (v as f64 / s as f64).round();
                (s > 0.0 && r.abs() < i32::MAX as f64).then_some(r as i32)
            })
            .collect();
        let Some(q) = q else { continue };
        let base = format!("{}_bias", t.node.trim_start_matches('/'));
        let qi = g.add_initializer(
            &format!("{base}_quantized"),
            Tensor::from_vec(vec![channels], &q),
        );
        let sc = g.add_initializer(
            &format!("{base}_scale"),
            Tensor::from_vec(vec![channels], &scales),
        );
        let zp = g.add_initializer(
            &format!("{base}_zero_point"),
            Tensor::from_vec(vec![channels], &vec![0i32; channels]),
        );
        let dq = g.add_op(
            "DequantizeLinear",
            vec![qi, sc, zp],
            &format!("{base}_dequantized"),
            vec![attr::int("axis", 0)],
        )?;
        g.set_input(ix, 2, &dq);
        done += 1;
    }
    Ok(done)
}

/// Puts a QuantizeLinear/DequantizeLinear pair on the output `y` of a quantized Conv and
/// makes every reader of `y` read the dequantized value, so that the Conv's only reader
/// is the QuantizeLinear (what onnxruntime's QDQ Conv fusion asks). When `y` is already
/// quantized as the input of another quantized layer, that pair is shared (same scale).
fn add_output_qdq(g: &mut Graph, y: &str, params: (f32, u8)) -> Result<()> {
    let users = g.consumers(y);
    let existing = users.iter().find_map(|&(ix, slot)| {
        let n = g.node(ix);
        if slot != 0 || !n.is_onnx_op("QuantizeLinear") {
            return None;
        }
        let q = n.outputs[0].clone();
        g.consumers(&q).into_iter().find_map(|(c, _)| {
            let d = g.node(c);
            d.is_onnx_op("DequantizeLinear")
                .then(|| (ix, d.outputs[0].clone()))
        })
    });
    let (skip, dq) = match existing {
        Some((q, dq)) => (Some(q), dq),
        None => (None, insert_qdq(g, y, &[params.0], params.1, None)?),
    };
    for (ix, slot) in users {
        if Some(ix) != skip {
            g.set_input(ix, slot, &dq);
        }
    }
    Ok(())
}

/// Longest the per-layer measurements of `--output-qdq auto` may take (seconds,
/// estimated from the first measurement); beyond, no output pairs are added.
const OUTPUT_QDQ_MAX_SECONDS: f64 = 300.0;
/// Calibration records `--output-qdq auto` measures on (evenly spread over the steps).
const OUTPUT_QDQ_RECORDS: usize = 16;

/// `--output-qdq`: Q/DQ pairs on the outputs of quantized Convs (see [`OutputQdq`]).
#[allow(clippy::too_many_arguments)]
fn output_qdq(
    model: &mut Model,
    options: &Options,
    cal: &Calibration,
    quantized: &[crate::targets::Target],
    steps: &[i64],
    plan: &mut QuantPlan,
    progress: &dyn Fn(&str),
) -> Result<()> {
    if options.output_qdq == OutputQdq::None {
        return Ok(());
    }
    let mut candidates = vec![];
    for (node, y) in conv_outputs(&model.graph, quantized) {
        // The range: the pair already on y when y is a quantized input, else calibration's.
        let params = match plan.activations.iter().find(|a| a.value == y) {
            // Its readers quantize it per step: a constant pair would quantize it twice.
            Some(a) if a.groups.len() > 1 => continue,
            Some(a) => a.groups[0],
            None => match cal.per_step.contains_key(&y) {
                true => {
                    let r = group_range(cal, &y, steps, false)?;
                    act_params_u8(r.min, r.max)
                }
                false => continue,
            },
        };
        candidates.push((node, y, params));
    }
    if candidates.is_empty() {
        return Ok(());
    }
    let apply = |m: &mut Model, chosen: &[usize]| -> Result<()> {
        for &k in chosen {
            let (_, y, p) = &candidates[k];
            add_output_qdq(&mut m.graph, y, *p)?;
        }
        Ok(())
    };
    let all: Vec<usize> = (0..candidates.len()).collect();
    let (chosen, costs) = match options.output_qdq {
        OutputQdq::All => (all, vec![None; candidates.len()]),
        _ => match choose_output_qdq(model, cal, candidates.len(), &apply, options, progress)? {
            Ok((chosen, costs)) => (chosen, costs.into_iter().map(Some).collect()),
            Err(note) => {
                plan.output_qdq_note = Some(note);
                return Ok(());
            }
        },
    };
    apply(model, &chosen)?;
    plan.output_qdq = candidates
        .iter()
        .enumerate()
        .map(|(k, (node, y, _))| OutputQdqChoice {
            node: node.clone(),
            value: y.clone(),
            cost_db: costs[k],
            chosen: chosen.contains(&k),
        })
        .collect();
    if plan.output_qdq_note.is_none() {
        plan.output_qdq_note = Some(format!(
            "output Q/DQ on {} of {} quantized Convs ({}; onnxruntime runs those on its int8 kernel); {} int32 biases",
            chosen.len(),
            candidates.len(),
            match options.output_qdq {
                OutputQdq::All => "--output-qdq all".to_string(),
                _ => format!("within {} dB", options.output_qdq_budget_db),
            },
            plan.int32_biases
        ));
    }
    Ok(())
}

/// The Convs `--output-qdq auto` chose and each one's measured cost, or why it chose none.
type Chosen = std::result::Result<(Vec<usize>, Vec<f64>), String>;

/// `--output-qdq auto`: measures what each output pair alone costs in mean output SQNR on
/// (up to [`OUTPUT_QDQ_RECORDS`]) calibration records, takes them cheapest first while
/// the costs add up to the budget, then measures the chosen set together on every
/// calibration record and drops the most costly until it fits. `Err(note)` when measuring would take too long.
fn choose_output_qdq(
    model: &Model,
    cal: &Calibration,
    n: usize,
    apply: &dyn Fn(&mut Model, &[usize]) -> Result<()>,
    options: &Options,
    progress: &dyn Fn(&str),
) -> Result<Chosen> {
    let total = cal.records.len().min(cal.record_outputs.len());
    if total == 0 {
        return Ok(Err(
            "no output Q/DQ: calibration kept no records to measure their cost on".into(),
        ));
    }
    let k = total.min(OUTPUT_QDQ_RECORDS);
    let pick: Vec<usize> = (0..k).map(|i| i * total / k).collect();
    let all: Vec<usize> = (0..total).collect();
    // Mean output SQNR over the steps of the records `on`, with the pairs `chosen`.
    let measure_on = |on: &[usize], chosen: &[usize]| -> Result<f64> {
        let mut m = model.clone();
        apply(&mut m, chosen)?;
        let records: Vec<_> = on.iter().map(|&i| cal.records[i].clone()).collect();
        let steps: Vec<i64> = on.iter().map(|&i| cal.record_steps[i]).collect();
        let reference: Vec<Tensor> = on.iter().map(|&i| cal.record_outputs[i].clone()).collect();
        let per_step = crate::evaluate::output_sqnr_against(&m, &records, &steps, &reference)?;
        Ok(per_step.iter().map(|s| s.sqnr_db).sum::<f64>() / per_step.len().max(1) as f64)
    };
    let measure = |chosen: &[usize]| measure_on(&pick, chosen);
    // From calibration's call time first: at SD scale even one measurement (a plan of the
    // whole model and 16 calls) is minutes, and the per-Conv loop hours.
    let calls = (k * (n + 2) + 2 * total) as f64;
    if cal.call_seconds * calls > OUTPUT_QDQ_MAX_SECONDS {
        return Ok(Err(format!(
            "no output Q/DQ: measuring the cost of each of {n} Convs would take over {} ({} calls of {:.1} s); --output-qdq all adds them all, at a cost in output SQNR",
            crate::budget::human_duration(cal.call_seconds * calls),
            calls as u64,
            cal.call_seconds
        )));
    }
    let clock = std::time::Instant::now();
    let base = measure(&[])?;
    let estimate = clock.elapsed().as_secs_f64() * (n + 2 + 2 * total / k) as f64;
    if estimate > OUTPUT_QDQ_MAX_SECONDS {
        return Ok(Err(format!(
            "no output Q/DQ: measuring the cost of each of {n} Convs would take about {} (over {OUTPUT_QDQ_MAX_SECONDS} s); --output-qdq all adds them all, at a cost in output SQNR",
            crate::budget::human_duration(estimate)
        )));
    }
    let mut costs = vec![0f64; n];
    for (i, c) in costs.iter_mut().enumerate() {
        progress(&format!("quantize: output Q/DQ cost, Conv {}/{n}", i + 1));
        *c = (base - measure(&[i])?).max(0.0);
    }
    let budget = options.output_qdq_budget_db;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| costs[a].total_cmp(&costs[b]));
    let mut chosen = vec![];
    let mut sum = 0.0;
    for &i in &order {
        if sum + costs[i] > budget {
            break;
        }
        sum += costs[i];
        chosen.push(i);
    }
    // Costs do not add exactly and a few records are a rough sample: measure the set on
    // every record, drop the most costly quarter until it fits.
    let base_all = if chosen.is_empty() {
        base
    } else {
        measure_on(&all, &[])?
    };
    while !chosen.is_empty() {
        progress(&format!(
            "quantize: output Q/DQ on {} Convs, checking the cost",
            chosen.len()
        ));
        let cost = base_all - measure_on(&all, &chosen)?;
        if cost <= budget {
            break;
        }
        let keep = chosen.len() - chosen.len().div_ceil(4);
        chosen.truncate(keep);
    }
    chosen.sort_unstable();
    Ok(Ok((chosen, costs)))
}

/// The range of every activation in every group: EMA min/max (or global min/max for the
/// baseline), shrunk to the MSE-optimal clip with `--act-range mse`.
fn activation_ranges(
    model: &Model,
    cal: &Calibration,
    acts: &[String],
    members: &[Vec<i64>],
    options: &Options,
) -> Result<HashMap<String, Vec<Range>>> {
    let mut out: HashMap<String, Vec<Range>> = HashMap::new();
    for a in acts {
        let r = members
            .iter()
            .map(|steps| group_range(cal, a, steps, options.baseline_minmax))
            .collect::<Result<_>>()?;
        out.insert(a.clone(), r);
    }
    if options.act_range_mse && !options.baseline_minmax {
        crate::clip_search::shrink_to_mse(model, cal, &mut out, members)?;
    }
    Ok(out)
}

/// The weight as rows [N out, K in] (the layout reconstruction works on).
pub(crate) fn to_rows(w: &[f32], shape: &[usize], axis: usize) -> (Vec<f32>, usize, usize) {
    let n = shape[axis];
    let k = w.len() / n.max(1);
    if axis == 0 {
        return (w.to_vec(), n, k);
    }
    // [K, N] (Gemm without transB, MatMul): transpose.
    let mut out = vec![0f32; w.len()];
    for i in 0..k {
        for j in 0..n {
            out[j * k + i] = w[i * n + j];
        }
    }
    (out, n, k)
}

/// Back from rows [N, K] to the weight's own layout.
pub(crate) fn from_rows(q: &[i8], shape: &[usize], axis: usize) -> Vec<i8> {
    if axis == 0 {
        return q.to_vec();
    }
    let n = shape[axis];
    let k = q.len() / n.max(1);
    let mut out = vec![0i8; q.len()];
    for j in 0..n {
        for i in 0..k {
            out[i * n + j] = q[j * k + i];
        }
    }
    out
}

/// Stops before the weight loop when its peak does not fit: the largest layer's float
/// copies and (when reconstructed) its Hessian and GPTQ buffers, plus the int8 weights the
/// quantized model accumulates.
fn check_memory(
    model: &Model,
    options: &Options,
    targets: &[crate::targets::Target],
    cal: &Calibration,
    reconstructed: &HashMap<String, usize>,
) -> Result<()> {
    let g = &model.graph;
    let mut layer_peak = 0u64;
    let mut int8 = 0u64;
    for t in targets {
        let Some(w) = &t.weight else { continue };
        let Some(tensor) = g.initializers.get(&w.name) else {
            continue;
        };
        let numel = tensor.numel() as u64;
        int8 += numel;
        // The weight, its rows, its dequantized copy (f32), the integers.
        let mut need = 13 * numel;
        if let (Some(&li), Some(columns)) = (reconstructed.get(&t.node), &cal.layer_columns) {
            let layer = &columns.layers()[li];
            let n = tensor.shape[w.axis];
            let layout = hessian_layout(layer, hessian_block());
            need += (layout.bytes(layer.k) + layout.work_bytes(n, layer.k)) as u64;
            // GPTQ's working copy of W in f64 and the candidate integers.
            need += 9 * numel;
        }
        layer_peak = layer_peak.max(need);
    }
    crate::budget::check_memory(
        &crate::budget::MemoryNeed {
            phase: "quantize",
            parts: vec![
                crate::budget::Part {
                    what: "largest layer's rounding",
                    bytes: layer_peak,
                },
                crate::budget::Part {
                    what: "int8 weights",
                    bytes: int8,
                },
            ],
            lower_with: "--reconstruct none (no Hessians)",
        },
        options.max_memory,
    )
}

/// The rounding of one weight against its layer's inputs `h` (never worse than RTN in
/// [`crate::reconstruct::output_error`] with `h`: the block-diagonal error when `h` is
/// blocked).
fn reconstruct_weight(
    w: &[f32],
    shape: &[usize],
    axis: usize,
    scales: &[f32],
    options: &Options,
    h: &Hessian,
) -> crate::reconstruct::Reconstructed {
    use crate::reconstruct::{adaround_hessian, gptq, never_worse_than_rtn, AdaRoundOpts};
    let (rows, n, k) = to_rows(w, shape, axis);
    let qmax = crate::quant::weight_qmax(options.weight_bits) as i32;
    let candidate = match options.reconstruct {
        Reconstruct::None => None,
        Reconstruct::Gptq => Some(gptq(&rows, n, k, h, scales, qmax, 0.01, 128)),
        Reconstruct::AdaRound => {
            // lr 1e-2 reaches in ~2k steps what the reference's 1e-3 needs 20k for.
            let opts = AdaRoundOpts {
                iters: options.adaround_iters,
                lr: 1e-2,
                ..Default::default()
            };
            Some(adaround_hessian(&rows, n, k, h, 1024, scales, qmax, &opts))
        }
    };
    never_worse_than_rtn(candidate, &rows, n, k, h, scales, qmax)
}

/// The largest diagonal block of a layer's [`Hessian`]: [`DEFAULT_BLOCK`], or
/// `TFMQC_GPTQ_BLOCK` from the environment — an internal knob for measuring the cost of
/// the block-diagonal approximation on small models (results/gptq_blocked.md), not an
/// option.
fn hessian_block() -> usize {
    std::env::var("TFMQC_GPTQ_BLOCK")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&b| b > 0)
        .unwrap_or(DEFAULT_BLOCK)
}

/// How a layer's [`Hessian`] is held: exact up to K = `block`, block-diagonal beyond, a
/// conv's blocks holding whole kh·kw patches.
pub(crate) fn hessian_layout(layer: &LayerInput, block: usize) -> HessianLayout {
    let align = match &layer.unfold {
        Unfold::Conv { kernel, .. } => kernel[0] * kernel[1],
        Unfold::Rows => 1,
    };
    HessianLayout::blocked(block, align)
}

/// Below 8 bits, a Clip to the interval the narrower quantizer represents, so that the
/// uint8 QuantizeLinear behind it (which saturates only at 0 and 255) stays on the
/// `bits`-bit grid for values beyond the calibrated range; returns the value to
/// quantize. (One set of scales only: `Options::validate` refuses narrower activations
/// with step groups.)
fn narrow_to_bits(g: &mut Graph, value: &str, scales: &[f32], zp: u8, bits: u32) -> Result<String> {
    if bits >= 8 || scales.len() != 1 {
        return Ok(value.to_string());
    }
    let (lo, hi) = act_clip(scales[0], zp, bits);
    let base = value.trim_start_matches('/');
    let lo = g.add_initializer(&format!("{base}_clip_min"), Tensor::scalar(lo));
    let hi = g.add_initializer(&format!("{base}_clip_max"), Tensor::scalar(hi));
    g.add_op(
        "Clip",
        vec![value.to_string(), lo, hi],
        &format!("{base}_clipped"),
        vec![],
    )
}

/// Inserts the quantize/dequantize of `value` with zero point `zp` and one scale, or a
/// scale per group picked by the scalar `group` (the form of the module documentation);
/// returns the dequantized value's name.
pub(crate) fn insert_qdq(
    g: &mut Graph,
    value: &str,
    scales: &[f32],
    zp: u8,
    group: Option<&str>,
) -> Result<String> {
    let base = value.trim_start_matches('/');
    let z = g.add_initializer(
        &format!("{base}_zero_point"),
        Tensor::from_raw(DType::U8, vec![], vec![zp])?,
    );
    let (Some(group), true) = (group, scales.len() > 1) else {
        let s = g.add_initializer(&format!("{base}_scale"), Tensor::scalar(scales[0]));
        let q = g.add_op(
            "QuantizeLinear",
            vec![value.to_string(), s.clone(), z.clone()],
            &format!("{base}_quantized"),
            vec![],
        )?;
        return g.add_op(
            "DequantizeLinear",
            vec![q, s, z],
            &format!("{base}_dequantized"),
            vec![],
        );
    };
    let st = g.add_initializer(
        &format!("{base}_scales"),
        Tensor::from_vec(vec![scales.len()], scales),
    );
    let s = g.add_op(
        "Gather",
        vec![st, group.to_string()],
        &format!("{base}_scale"),
        vec![attr::int("axis", 0)],
    )?;
    let unit = "fsc/unit_scale".to_string();
    g.initializers
        .entry(unit.clone())
        .or_insert_with(|| Tensor::scalar(1f32));
    let scaled = g.add_op(
        "Div",
        vec![value.to_string(), s.clone()],
        &format!("{base}_scaled"),
        vec![],
    )?;
    let q = g.add_op(
        "QuantizeLinear",
        vec![scaled, unit.clone(), z.clone()],
        &format!("{base}_quantized"),
        vec![],
    )?;
    let dq = g.add_op(
        "DequantizeLinear",
        vec![q, unit, z],
        &format!("{base}_levels"),
        vec![],
    )?;
    g.add_op("Mul", vec![dq, s], &format!("{base}_dequantized"), vec![])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconstruct::{dequantize, gptq, output_error, rtn};

    /// The cost of GPTQ on a block-diagonal H, layer by layer on real inputs: each weight
    /// layer of the model (W4, Lp scales) rounded by GPTQ with its exact H and with the
    /// block-diagonal approximation for several block sizes, every result scored by the
    /// exact output error ||ŴX − WX||² (summed over layers, relative to RTN's). Runs the
    /// model's calibration (minutes):
    /// `TFMQC_MODELS=ddpm_digits cargo test --release -p tfmqc-passes --lib
    /// gptq_block_diagonal_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn gptq_block_diagonal_cost_on_real_layer_inputs() {
        let models = std::env::var("TFMQC_MODELS").unwrap_or_else(|_| "ddpm_digits".into());
        let blocks = [1024usize, 512, 256, 128, 64];
        for name in models.split(',') {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../models")
                .join(format!("{name}.onnx"));
            let model = crate::onnx::load(&path).unwrap();
            let options = Options {
                timesteps: Some("ddim:50".into()),
                weight_bits: 4,
                ..Options::default()
            };
            let mut cx = crate::pipeline::PassContext::new(model, &options);
            let passes =
                crate::pipeline::parse_pipeline("canonicalize,detect-tib,fold-tib,calibrate")
                    .unwrap();
            crate::pipeline::run_pipeline(&mut cx, &passes, &mut |_, _, _| Ok(())).unwrap();
            let cal = cx.calibration.clone().unwrap();
            let columns = cal.layer_columns.clone().expect("layer inputs sampled");
            let quantized = find_targets(&cx.model.graph, &options.keep_float).quantized;
            let index: HashMap<&str, usize> = columns
                .layers()
                .iter()
                .enumerate()
                .map(|(i, l)| (l.node.as_str(), i))
                .collect();
            let qmax = crate::quant::weight_qmax(4) as i32;
            let (mut e_rtn, mut e_exact) = (0f64, 0f64);
            let mut e_blocked = vec![0f64; blocks.len()];
            let (mut layers, mut kmax) = (0, 0);
            for t in &quantized {
                let (Some(w), Some(&li)) = (&t.weight, index.get(t.node.as_str())) else {
                    continue;
                };
                let layer_input = &columns.layers()[li];
                let h = &columns.gram(li, &HessianLayout::exact()).unwrap();
                let tensor = &cx.model.graph.initializers[&w.name];
                let values = tensor.to_vec::<f32>().unwrap();
                let q = quantize_weight(&values, &tensor.shape, w.axis, 4, RangeSearch::Lp);
                let (rows, n, k) = to_rows(&values, &tensor.shape, w.axis);
                let score = |qi: &[i8]| output_error(&rows, &dequantize(qi, n, k, &q.scales), h);
                e_rtn += score(&rtn(&rows, n, k, &q.scales, qmax));
                e_exact += score(&gptq(&rows, n, k, h, &q.scales, qmax, 0.01, 128));
                for (e, &b) in e_blocked.iter_mut().zip(&blocks) {
                    let hb = Hessian::block_diagonal(h, &hessian_layout(layer_input, b));
                    *e += score(&gptq(&rows, n, k, &hb, &q.scales, qmax, 0.01, 128));
                }
                layers += 1;
                kmax = kmax.max(k);
            }
            let cols: Vec<String> = blocks
                .iter()
                .zip(&e_blocked)
                .map(|(b, e)| format!("B = {b}: {:.4}", e / e_rtn))
                .collect();
            eprintln!(
                "{name}: {layers} layers (K ≤ {kmax}), W4 exact output error relative to RTN: exact H {:.4}, {}",
                e_exact / e_rtn,
                cols.join(", ")
            );
        }
    }
}
