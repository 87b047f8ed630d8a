//! quantize: per-output-channel int8 (or 4-bit values stored as int8) weights feeding
//! DequantizeLinear, and QuantizeLinear/DequantizeLinear pairs on the activation inputs
//! of Conv, Gemm, MatMul and Einsum (the attention products included), with the ranges
//! `calibrate` found.
//!
//! With one step group the activation scales are plain constants (the QDQ form
//! onnxruntime fuses into its int8 kernels). With several, each activation's scale and
//! zero point are tables over the groups, picked by the folded TIB's step index; since
//! tract only accepts constant Q/DQ scales, the per-step affine map is written around a
//! unit-scale pair:
//!
//! ```text
//! q  = QuantizeLinear(x / s[g] + z[g], 1, 0)      uint8, saturating, round half to even
//! x̂  = (DequantizeLinear(q, 1, 0) − z[g]) · s[g]
//! ```

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::calibrate::{Calibration, Range};
use crate::error::{Error, Result};
use crate::ir::{attr, DType, Graph, Model, Tensor};
use crate::options::Reconstruct;
use crate::options::{timestep_set, Options};
use crate::pipeline::{Pass, PassContext};
use crate::quant::{act_params_u8, quantize_weight, sqnr_db, RangeSearch};
use crate::targets::{find_targets, Targets};

pub struct Quantize;

/// Activation quantization parameters of one value: one (scale, zero point) per group.
#[derive(Clone, Debug, Serialize)]
pub struct ActParams {
    pub value: String,
    pub groups: Vec<(f32, u8)>,
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
    pub step_groups: usize,
    /// Group of each time step of S (same order as S).
    pub group_of_step: Vec<(i64, usize)>,
    pub layers: Vec<LayerReport>,
    pub activations: Vec<ActParams>,
    pub kept_float: Vec<(String, String)>,
}

impl QuantPlan {
    pub fn group(&self, t: i64) -> usize {
        self.group_of_step
            .iter()
            .find(|(s, _)| *s == t)
            .map(|(_, g)| *g)
            .unwrap_or(0)
    }
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
            "{} layers quantized ({} weights at {} bits, mean weight SQNR {:.1} dB), {} activations at {} bits in {} step group(s); kept in float: {}",
            plan.layers.len(),
            n_w,
            plan.weight_bits,
            mean_sqnr,
            plan.activations.len(),
            plan.act_bits,
            plan.step_groups,
            plan.kept_float.iter().map(|(n, r)| format!("{n} ({r})")).collect::<Vec<_>>().join(", ")
        ));
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
    let groups = if options.baseline_minmax {
        1
    } else {
        options.step_groups.min(set.len())
    };
    if groups > 1 && step_index.is_none() {
        return Err(Error::pass(
            "quantize",
            "--step-groups > 1 needs the step index of fold-tib (run fold-tib before quantize)",
        ));
    }
    // Consecutive steps of S in `groups` groups of (nearly) equal size.
    let group_of_step: Vec<(i64, usize)> = set
        .iter()
        .enumerate()
        .map(|(i, &t)| (t, i * groups / set.len()))
        .collect();
    let members: Vec<Vec<i64>> = (0..groups)
        .map(|k| {
            group_of_step
                .iter()
                .filter(|(_, g)| *g == k)
                .map(|(t, _)| *t)
                .collect()
        })
        .collect();
    let search = if options.baseline_minmax {
        RangeSearch::MinMax
    } else {
        RangeSearch::Lp
    };
    let Targets {
        quantized,
        kept_float,
    } = find_targets(&model.graph, &options.keep_float);
    let acts: Vec<String> = quantized
        .iter()
        .flat_map(|t| t.activations.iter().cloned())
        .collect();
    let ranges = activation_ranges(model, cal, &acts, &members, options)?;
    // Layers whose inputs calibration sampled: reconstructed one at a time below.
    let reconstructed: HashMap<String, usize> = match &cal.layer_columns {
        Some(c) if !options.baseline_minmax && options.reconstruct != Reconstruct::None => c
            .layers()
            .iter()
            .enumerate()
            .map(|(i, l)| (l.node.clone(), i))
            .collect(),
        _ => HashMap::new(),
    };
    let g = &mut model.graph;
    let by_name: HashMap<String, _> = g
        .node_indices()
        .map(|ix| (g.node(ix).name.clone(), ix))
        .collect();
    let mut plan = QuantPlan {
        weight_bits: options.weight_bits,
        act_bits: options.act_bits,
        step_groups: groups,
        group_of_step: group_of_step.clone(),
        kept_float,
        ..Default::default()
    };

    // The group index, once: the first sample's time step decides (a sampling batch
    // shares its step).
    let group_index = match (groups > 1, step_index) {
        (true, Some(index)) => {
            let table: Vec<i64> = group_of_step.iter().map(|(_, g)| *g as i64).collect();
            let table = g.add_initializer(
                "fsc/group_of_step",
                Tensor::from_vec(vec![table.len()], &table),
            );
            let flat_shape = g.add_initializer("fsc/flat", Tensor::from_vec(vec![1], &[-1i64]));
            let flat = g.add_op(
                "Reshape",
                vec![index.to_string(), flat_shape],
                "fsc/step_index_flat",
                vec![],
            )?;
            let zero = g.add_initializer("fsc/first", Tensor::scalar(0i64));
            let first = g.add_op(
                "Gather",
                vec![flat, zero],
                "fsc/step_index",
                vec![attr::int("axis", 0)],
            )?;
            Some(g.add_op(
                "Gather",
                vec![table, first],
                "fsc/group",
                vec![attr::int("axis", 0)],
            )?)
        }
        _ => None,
    };

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
                            let (h, _) = columns.gram(li)?;
                            let r =
                                reconstruct_weight(&values, &shape, w.axis, &q.scales, options, &h);
                            layer.output_error_rtn = Some(r.rtn_error);
                            layer.output_error_reconstructed = Some(r.error);
                            layer.reconstruct_seconds = Some(start.elapsed().as_secs_f64());
                            q.values = from_rows(&r.q, &shape, w.axis);
                        }
                        layer.weight_sqnr_db = Some(sqnr_db(&values, &q.dequantize(&shape)));
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
        if options.act_bits == 8 {
            for a in &target.activations {
                let dq = match dequantized_acts.get(a) {
                    Some(dq) => dq.clone(),
                    None => {
                        let params: Vec<(f32, u8)> = ranges[a]
                            .iter()
                            .map(|r| act_params_u8(r.min, r.max))
                            .collect();
                        let dq = insert_qdq(g, a, &params, group_index.as_deref())?;
                        plan.activations.push(ActParams {
                            value: a.clone(),
                            groups: params,
                        });
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
    Ok(plan)
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

fn reconstruct_weight(
    w: &[f32],
    shape: &[usize],
    axis: usize,
    scales: &[f32],
    options: &Options,
    h: &[f64],
) -> crate::reconstruct::Reconstructed {
    use crate::reconstruct::{adaround_gram, gptq, never_worse_than_rtn, AdaRoundOpts};
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
            Some(adaround_gram(&rows, n, k, h, 1024, scales, qmax, &opts))
        }
    };
    never_worse_than_rtn(candidate, &rows, n, k, h, scales, qmax)
}

/// Inserts the quantize/dequantize of `value`; returns the dequantized value's name.
pub(crate) fn insert_qdq(
    g: &mut Graph,
    value: &str,
    params: &[(f32, u8)],
    group: Option<&str>,
) -> Result<String> {
    let base = value.trim_start_matches('/');
    if params.len() == 1 || group.is_none() {
        let (scale, zp) = params[0];
        let s = g.add_initializer(&format!("{base}_scale"), Tensor::scalar(scale));
        let z = g.add_initializer(
            &format!("{base}_zero_point"),
            Tensor::from_raw(DType::U8, vec![], vec![zp])?,
        );
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
    }
    let group = group.expect("checked");
    let scales: Vec<f32> = params.iter().map(|p| p.0).collect();
    let zps: Vec<f32> = params.iter().map(|p| p.1 as f32).collect();
    let st = g.add_initializer(
        &format!("{base}_scales"),
        Tensor::from_vec(vec![scales.len()], &scales),
    );
    let zt = g.add_initializer(
        &format!("{base}_zero_points"),
        Tensor::from_vec(vec![zps.len()], &zps),
    );
    let s = g.add_op(
        "Gather",
        vec![st, group.to_string()],
        &format!("{base}_scale"),
        vec![attr::int("axis", 0)],
    )?;
    let z = g.add_op(
        "Gather",
        vec![zt, group.to_string()],
        &format!("{base}_zero_point"),
        vec![attr::int("axis", 0)],
    )?;
    let unit = "fsc/unit_scale".to_string();
    g.initializers
        .entry(unit.clone())
        .or_insert_with(|| Tensor::scalar(1f32));
    let zero = "fsc/zero_u8".to_string();
    g.initializers
        .entry(zero.clone())
        .or_insert_with(|| Tensor::from_vec(vec![], &[0u8]));
    let scaled = g.add_op(
        "Div",
        vec![value.to_string(), s.clone()],
        &format!("{base}_scaled"),
        vec![],
    )?;
    let shifted = g.add_op(
        "Add",
        vec![scaled, z.clone()],
        &format!("{base}_shifted"),
        vec![],
    )?;
    let q = g.add_op(
        "QuantizeLinear",
        vec![shifted, unit.clone(), zero.clone()],
        &format!("{base}_quantized"),
        vec![],
    )?;
    let dq = g.add_op(
        "DequantizeLinear",
        vec![q, unit, zero],
        &format!("{base}_levels"),
        vec![],
    )?;
    let centered = g.add_op("Sub", vec![dq, z], &format!("{base}_centered"), vec![])?;
    g.add_op(
        "Mul",
        vec![centered, s],
        &format!("{base}_dequantized"),
        vec![],
    )
}
