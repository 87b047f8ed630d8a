//! `--tib quant|auto`: the TIB stays computed, its linear layers quantized, their rounding
//! reconstructed by TIAR; with `auto`, each frontier value is a table or computed by the
//! quantized TIB, whichever the error and the `--lut-budget` favour. Run by `fold-tib`.
//!
//! TIAR (TFMQ-DM): AdaRound of every TIB linear at once, the loss being the error of all
//! TIB frontier values over every t in S, `(1/|S|) Σ_t Σ_i ||emb_i(t) − êmb_i(t)||²`, the
//! gradient back-propagated by hand through the TIB's later layers ([`crate::numerics::tib_net`]).
//!
//! 1. The TIB is cut out and run once by tract for all of S (fold-tib's
//!    [`evaluate_tables`]): the float values before the first linear layer (the
//!    sinusoidal embedding) are inputs of the small network, every later value is a
//!    reference the network's own float pass must match (else: tables, with a warning).
//! 2. Weights per output channel with the Lp range search (as `quantize`); the input of
//!    each linear layer fake-quantized at `--act-bits` with one static scale: the TIB
//!    is t-only, so its exact range over all of S is known. A scale per step would be a
//!    table per activation (what `--tib lut` avoids paying) and tract accepts only
//!    constant Q/DQ scales.
//! 3. TIAR's rounding replaces round-to-nearest unless it is worse on the loss.
//! 4. Tables for the frontier values chosen (all with `lut`, none with `quant`, by budget
//!    with `auto`); the layers the computed ones still need get DequantizeLinear weights
//!    and a QuantizeLinear/DequantizeLinear pair on their input. `quantize` leaves nodes
//!    already in that form alone.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use super::tables::{evaluate_tables, fold_tables, fold_with, table_choice};
use crate::analysis::tib::TibAnalysis;
use crate::error::Result;
use crate::ir::qdq::insert_qdq;
use crate::ir::{attr, DType, Model, Tensor};
use crate::numerics::quant::{act_params_u8, quantize_weight, weight_qmax, RangeSearch};
use crate::numerics::reconstruct::{AdaRoundOpts, SoftRounding};
use crate::numerics::tib_net::{cosine, Layer, Mat, Op, TibNet};
use crate::options::{Int4Storage, Options, TibMode};
use crate::passes::PassContext;
use tfmqc_runtime::rng::SplitMix64;

/// Time steps per TIAR step when S is larger (sampled without replacement each step).
const TIAR_BATCH: usize = 256;

pub use crate::analysis::reports::{FrontierChoice, TiarLayer, TiarReport};

/// A TIB op TIAR cannot differentiate (or a structure it cannot follow).
#[derive(Debug)]
pub struct Unsupported(pub String);

/// The TIB as a [`TibNet`], with the float references.
pub struct Built {
    pub net: TibNet,
    /// Float value of each frontier value over S, as [`evaluate_tables`] gives it.
    pub tables: Vec<Tensor>,
    /// Float frontier values as matrices (the TIAR targets).
    pub targets: Vec<Mat>,
    /// Per layer: weight initializer, its shape and output-channel axis.
    pub weights: Vec<LayerWeight>,
}

/// A TIB layer's weight initializer, its shape and output-channel axis.
pub type LayerWeight = (String, Vec<usize>, usize);

fn unsupported(msg: String) -> std::result::Result<Built, Unsupported> {
    Err(Unsupported(msg))
}

/// Whether a TIB node is a linear layer TIAR quantizes: Gemm (no transA) or MatMul with a
/// constant f32 rank-2 weight, not named by `--keep-float`.
fn linear_weight(
    model: &Model,
    n: &crate::ir::Node,
    keep_float: &[String],
) -> Option<(String, usize)> {
    let g = &model.graph;
    if !(n.is_onnx_op("Gemm") || n.is_onnx_op("MatMul")) || n.inputs.len() < 2 {
        return None;
    }
    if keep_float.iter().any(|p| n.name.contains(p.as_str())) {
        return None;
    }
    let w = g.initializers.get(&n.inputs[1])?;
    if w.dtype != DType::F32 || w.shape.len() != 2 || g.initializers.contains_key(&n.inputs[0]) {
        return None;
    }
    if n.is_onnx_op("Gemm") {
        if n.attr_int("transA").unwrap_or(0) != 0 {
            return None;
        }
        let axis = if n.attr_int("transB").unwrap_or(0) == 1 {
            0
        } else {
            1
        };
        Some((n.inputs[1].clone(), axis))
    } else {
        Some((n.inputs[1].clone(), 1))
    }
}

/// A linear layer found while tracing: node, weight initializer, its shape and
/// output-channel axis, the folded bias (`beta · C`) and Gemm's `alpha`.
type LayerMeta = (String, String, Vec<usize>, usize, Option<Vec<f32>>, f32);

/// The TIB from its first linear layer on, traced into [`TibNet`] ops: what the network
/// computes (`dynamic`), what it reads without computing (`read_static`: values tract
/// gives it; `constants`), and the linear layers. Slots are numbered in the order values
/// are first met, so the network is the same on every run.
#[derive(Default)]
struct Trace {
    slots: HashMap<String, usize>,
    dynamic: HashSet<String>,
    ops: Vec<Op>,
    layers: Vec<LayerMeta>,
    read_static: Vec<String>,
    constants: Vec<(String, Mat)>,
}

impl Trace {
    fn slot(&mut self, v: &str) -> usize {
        let n = self.slots.len();
        *self.slots.entry(v.to_string()).or_insert(n)
    }

    /// The slot of `v`, an input of node `n`: a value the network computes, a constant
    /// (which must broadcast per time step), or a value tract computes for it.
    fn operand(
        &mut self,
        g: &crate::ir::Graph,
        n: &crate::ir::Node,
        v: &str,
    ) -> std::result::Result<usize, Unsupported> {
        if !self.dynamic.contains(v) {
            if g.initializers.contains_key(v) {
                let m = constant_mat(g, v).ok_or_else(|| {
                    Unsupported(format!(
                        "node '{}' ({}) reads constant '{v}' whose shape does not broadcast per time step",
                        n.name, n.op_type
                    ))
                })?;
                if !self.constants.iter().any(|(c, _)| c == v) {
                    self.constants.push((v.to_string(), m));
                }
            } else if !self.read_static.iter().any(|s| s == v) {
                self.read_static.push(v.to_string());
            }
        }
        Ok(self.slot(v))
    }

    /// Node `n`, a linear layer with weight `w` (output channels on `axis`), as one
    /// `Linear` op, or `Linear` then `Add` when its bias is a computed value.
    fn linear(
        &mut self,
        g: &crate::ir::Graph,
        n: &crate::ir::Node,
        (w, axis): (String, usize),
        y: usize,
    ) -> std::result::Result<(), Unsupported> {
        let out = &n.outputs[0];
        let x = self.operand(g, n, &n.inputs[0])?;
        let shape = g.initializers[&w].shape.clone();
        let nout = shape[axis];
        let mut bias = None;
        let alpha = n.attr_float("alpha").unwrap_or(1.0);
        let mut extra_add = None;
        if let Some(c) = n.inputs.get(2).filter(|c| !c.is_empty()) {
            let beta = n.attr_float("beta").unwrap_or(1.0);
            match g.initializers.get(c).and_then(|t| t.to_f32_vec().ok()) {
                Some(b) if b.len() == nout || b.len() == 1 => {
                    let b: Vec<f32> = (0..nout)
                        .map(|j| beta * b[if b.len() == 1 { 0 } else { j }])
                        .collect();
                    bias = Some(b);
                }
                _ if beta == 1.0 && !g.initializers.contains_key(c) => {
                    extra_add = Some(self.operand(g, n, c)?);
                }
                _ => {
                    return Err(Unsupported(format!(
                        "Gemm '{}': bias '{c}' is neither a per-output constant nor a value",
                        n.name
                    )))
                }
            }
        }
        let layer = self.layers.len();
        self.layers
            .push((n.name.clone(), w, shape, axis, bias, alpha));
        match extra_add {
            None => self.ops.push(Op::Linear { x, y, layer }),
            Some(c) => {
                let tmp = self.slot(&format!("{out}#matmul"));
                self.ops.push(Op::Linear { x, y: tmp, layer });
                self.ops.push(Op::Add { a: tmp, b: c, y });
            }
        }
        Ok(())
    }

    /// Node `n`, after a linear layer and not one itself, as the [`Op`] TIAR has a
    /// gradient for; anything else is [`Unsupported`] (the TIB is then tabled).
    fn elementwise(
        &mut self,
        g: &crate::ir::Graph,
        n: &crate::ir::Node,
        y: usize,
    ) -> std::result::Result<(), Unsupported> {
        let data: Vec<&String> = n.inputs.iter().filter(|i| !i.is_empty()).collect();
        let op = match n.op_type.as_str() {
            "Sigmoid" => Op::Sigmoid {
                x: self.operand(g, n, data[0])?,
                y,
            },
            op @ ("Mul" | "Add" | "Sub") if data.len() == 2 => {
                let a = self.operand(g, n, data[0])?;
                let b = self.operand(g, n, data[1])?;
                match op {
                    "Mul" => Op::Mul { a, b, y },
                    "Add" => Op::Add { a, b, y },
                    _ => Op::Sub { a, b, y },
                }
            }
            "Reshape" | "Unsqueeze" | "Squeeze" | "Flatten" | "Identity" => Op::Copy {
                x: self.operand(g, n, data[0])?,
                y,
            },
            "Cast" if n.attr_int("to") == Some(DType::F32.onnx_code() as i64) => Op::Copy {
                x: self.operand(g, n, data[0])?,
                y,
            },
            "Concat" => {
                // Per-row concatenation is the op only when the axis is the last
                // non-unit one; the float check against tract catches the rest, but
                // refuse the batch axis outright.
                if n.attr_int("axis").unwrap_or(0) == 0 {
                    return Err(Unsupported(format!(
                        "Concat '{}' along the batch axis",
                        n.name
                    )));
                }
                let mut xs = vec![];
                for d in &data {
                    xs.push(self.operand(g, n, d)?);
                }
                Op::Concat { xs, y }
            }
            _ => {
                return Err(Unsupported(format!(
                    "node '{}' ({}) after a TIB linear layer: TIAR has no gradient for {}",
                    n.name, n.op_type, n.op_type
                )))
            }
        };
        self.ops.push(op);
        Ok(())
    }
}

/// A constant as a `[1, width]` matrix when it broadcasts per time step (every axis but
/// the last of size 1); `None` otherwise.
fn constant_mat(g: &crate::ir::Graph, name: &str) -> Option<Mat> {
    let t = g.initializers.get(name)?;
    if t.dtype != DType::F32 {
        return None;
    }
    let v = t.to_f32_vec().ok()?;
    let lead_ones = t.shape.len() <= 1 || t.shape[..t.shape.len() - 1].iter().all(|&d| d == 1);
    lead_ones.then(|| Mat::new(1, v.len(), v))
}

/// Step 1 of [`build`]: walks the TIB's nodes in order from the first linear layer on
/// (earlier nodes only feed it: tract computes them) and traces them into ops.
fn trace(
    model: &Model,
    tib: &TibAnalysis,
    options: &Options,
) -> std::result::Result<Trace, Unsupported> {
    let g = &model.graph;
    let by_name: HashMap<&str, _> = g
        .node_indices()
        .map(|ix| (g.node(ix).name.as_str(), ix))
        .collect();
    let mut t = Trace::default();
    for name in &tib.fold_nodes {
        let Some(&ix) = by_name.get(name.as_str()) else {
            continue;
        };
        let n = g.node(ix);
        let linear = linear_weight(model, n, &options.keep_float);
        if linear.is_none() && !n.inputs.iter().any(|i| t.dynamic.contains(i)) {
            continue;
        }
        let y = t.slot(&n.outputs[0]);
        match linear {
            Some(w) => t.linear(g, n, w, y)?,
            None => t.elementwise(g, n, y)?,
        }
        if n.outputs.iter().filter(|o| !o.is_empty()).count() != 1 {
            return Err(Unsupported(format!(
                "node '{}' ({}) has several outputs",
                n.name, n.op_type
            )));
        }
        t.dynamic.insert(n.outputs[0].clone());
    }
    if t.layers.is_empty() {
        return Err(Unsupported(
            "the TIB has no Gemm/MatMul with a constant weight to quantize".into(),
        ));
    }
    // Frontier values not downstream of any layer are given (exact either way).
    for f in &tib.frontier {
        if !t.dynamic.contains(&f.name) && !t.read_static.contains(&f.name) {
            t.read_static.push(f.name.clone());
        }
    }
    Ok(t)
}

/// What one tract run over S gives [`build`]: each value the network reads or computes as
/// a `[|S|, width]` matrix, and the frontier values' tables.
struct Evaluated {
    float: HashMap<String, Mat>,
    tables: Vec<Tensor>,
}

/// Step 2 of [`build`]: one tract run over S for everything: the given values, every
/// computed value (the reference for the float check), the frontier (targets, tables).
fn evaluate(
    model: &Model,
    tib: &TibAnalysis,
    set: &[i64],
    trace: &Trace,
    computed: &[String],
) -> Result<std::result::Result<Evaluated, Unsupported>> {
    let steps = set.len();
    let mut wanted: Vec<String> = trace.read_static.clone();
    wanted.extend(computed.iter().cloned());
    for f in &tib.frontier {
        if !wanted.contains(&f.name) {
            wanted.push(f.name.clone());
        }
    }
    let mut probe = tib.clone();
    probe.frontier = wanted
        .iter()
        .map(|w| crate::analysis::tib::FrontierValue {
            name: w.clone(),
            ty: String::new(),
            joins: vec![],
        })
        .collect();
    let evaluated = evaluate_tables(model, &probe, set)?;
    let mut float: HashMap<String, Mat> = HashMap::new();
    for (name, t) in wanted.iter().zip(&evaluated) {
        let Ok(v) = t.to_f32_vec() else {
            return Ok(Err(Unsupported(format!(
                "TIB value '{name}' is not f32 ({})",
                t.dtype
            ))));
        };
        if t.shape.first() != Some(&steps) || v.len() % steps != 0 {
            return Ok(Err(Unsupported(format!(
                "TIB value '{name}' has no per-step leading axis ({:?})",
                t.shape
            ))));
        }
        let width = v.len() / steps;
        float.insert(name.clone(), Mat::new(steps, width, v));
    }
    let tables: Vec<Tensor> = tib
        .frontier
        .iter()
        .map(|f| evaluated[wanted.iter().position(|w| *w == f.name).expect("wanted")].clone())
        .collect();
    Ok(Ok(Evaluated { float, tables }))
}

/// Step 3 of [`build`]: the network, its layers' weights as rows with their Lp-searched
/// per-channel scales (as `quantize` chooses them), and per layer the weight
/// initializer, its shape and axis (for the rewrite).
fn network(
    model: &Model,
    tib: &TibAnalysis,
    steps: usize,
    trace: Trace,
    float: &HashMap<String, Mat>,
    weight_bits: u32,
) -> Result<(TibNet, Vec<LayerWeight>)> {
    let g = &model.graph;
    let mut given: Vec<(usize, Mat)> = vec![];
    for v in &trace.read_static {
        given.push((trace.slots[v], float[v].clone()));
    }
    for (c, m) in trace.constants {
        given.push((trace.slots[&c], m));
    }
    let mut layers = vec![];
    let mut weights = vec![];
    for (node, w, shape, axis, bias, alpha) in trace.layers {
        let values = g.initializers[&w].to_f32_vec()?;
        let q = quantize_weight(&values, &shape, axis, weight_bits, RangeSearch::Lp);
        let (rows, n, k) = crate::numerics::quant::to_rows(&values, &shape, axis);
        layers.push(Layer {
            node,
            n,
            k,
            w: rows,
            scales: q.scales,
            bias,
            alpha,
            act: None,
        });
        weights.push((w, shape, axis));
    }
    let outputs = tib.frontier.iter().map(|f| trace.slots[&f.name]).collect();
    let net = TibNet {
        slots: trace.slots.len(),
        given,
        ops: trace.ops,
        layers,
        outputs,
        steps,
    };
    Ok((net, weights))
}

/// Step 4 of [`build`]: the network's float pass must reproduce tract's values (within
/// 1e-4 of each value's largest magnitude), else some op moved data across time steps.
fn check_float_pass(
    values: &[Option<Mat>],
    slots: &HashMap<String, usize>,
    float: &HashMap<String, Mat>,
    computed: &[String],
) -> std::result::Result<(), Unsupported> {
    for name in computed {
        let (Some(ours), Some(theirs)) = (values[slots[name]].as_ref(), float.get(name)) else {
            continue;
        };
        let scale = theirs.data.iter().fold(1f32, |m, v| m.max(v.abs()));
        let bad = ours.data.len() != theirs.data.len()
            || ours
                .data
                .iter()
                .zip(&theirs.data)
                .any(|(a, b)| (a - b).abs() > 1e-4 * scale);
        if bad {
            return Err(Unsupported(format!(
                "TIAR's float pass does not reproduce TIB value '{name}' (a reshape or concat that moves data across time steps?)"
            )));
        }
    }
    Ok(())
}

/// Step 5 of [`build`]: under `--act-bits 8`, each layer's input range over all of S
/// (exact: the TIB is t-only), for its static activation scale.
fn set_act_ranges(net: &mut TibNet, values: &[Option<Mat>]) {
    for op in &net.ops {
        if let Op::Linear { x, layer, .. } = op {
            let m = values[*x].as_ref().expect("forward");
            let (lo, hi) = m
                .data
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                });
            net.layers[*layer].act = Some(act_params_u8(lo, hi));
        }
    }
}

/// Builds the network of the TIB from the linear layers on: ops, given values, layers
/// (float weights, scales, activation ranges), and checks its float pass against tract.
/// `Ok(Err(_))` when TIAR cannot follow the TIB (the caller tables it instead).
pub fn build(
    model: &Model,
    tib: &TibAnalysis,
    set: &[i64],
    options: &Options,
) -> Result<std::result::Result<Built, Unsupported>> {
    let trace = match trace(model, tib, options) {
        Ok(t) => t,
        Err(e) => return Ok(Err(e)),
    };
    let computed: Vec<String> = {
        let mut v: Vec<String> = trace.dynamic.iter().cloned().collect();
        v.sort();
        v
    };
    let Evaluated { float, tables } = match evaluate(model, tib, set, &trace, &computed)? {
        Ok(e) => e,
        Err(e) => return Ok(Err(e)),
    };
    let slots = trace.slots.clone();
    let (mut net, weights) = network(model, tib, set.len(), trace, &float, options.weight_bits)?;
    if let Err(e) = net.check() {
        return Ok(unsupported(format!(
            "the TIB's shapes do not follow per time step: {e}"
        )));
    }
    let all: Vec<usize> = (0..set.len()).collect();
    let wf: Vec<Vec<f32>> = net.layers.iter().map(|l| l.w.clone()).collect();
    let values = net.forward(&wf, &all);
    if let Err(e) = check_float_pass(&values, &slots, &float, &computed) {
        return Ok(Err(e));
    }
    if options.act_bits == 8 {
        set_act_ranges(&mut net, &values);
    }
    let targets = tib
        .frontier
        .iter()
        .map(|f| float[&f.name].clone())
        .collect();
    Ok(Ok(Built {
        net,
        tables,
        targets,
        weights,
    }))
}

/// Round-to-nearest integers of every layer ([N, K] rows).
fn rtn_ints(net: &TibNet, qmax: i32) -> Vec<Vec<i8>> {
    net.layers
        .iter()
        .map(|l| crate::numerics::reconstruct::rtn(&l.w, l.n, l.k, &l.scales, qmax))
        .collect()
}

fn dequant(net: &TibNet, q: &[Vec<i8>]) -> Vec<Vec<f32>> {
    net.layers
        .iter()
        .zip(q)
        .map(|(l, q)| crate::numerics::reconstruct::dequantize(q, l.n, l.k, &l.scales))
        .collect()
}

/// TIAR: AdaRound of all layers at once against the frontier error over S. Returns the
/// integers ([N, K] rows per layer).
pub fn tiar(net: &TibNet, targets: &[Mat], qmax: i32, opts: &AdaRoundOpts) -> Vec<Vec<i8>> {
    let mut soft: Vec<SoftRounding> = net
        .layers
        .iter()
        .map(|l| SoftRounding::new(&l.w, l.n, l.k, &l.scales, qmax))
        .collect();
    let mut ws: Vec<Vec<f32>> = net.layers.iter().map(|l| vec![0.0; l.n * l.k]).collect();
    let mut rng = SplitMix64::new(opts.seed);
    let mut idx: Vec<usize> = (0..net.steps).collect();
    let batch = net.steps.min(TIAR_BATCH);
    let all_targets = batch == net.steps;
    for _ in 0..opts.iters {
        if !all_targets {
            for i in 0..batch {
                let j = i + rng.below(net.steps - i);
                idx.swap(i, j);
            }
        }
        let rows = &idx[..batch];
        for (s, w) in soft.iter_mut().zip(ws.iter_mut()) {
            s.weight(w);
        }
        let values = net.forward(&ws, rows);
        let sel: Vec<Mat>;
        let tg = if all_targets {
            targets
        } else {
            sel = targets.iter().map(|t| t.select(rows)).collect();
            &sel
        };
        let (_, og) = net.loss(&values, tg);
        let gw = net.backward(&ws, &values, &og);
        for (s, g) in soft.iter_mut().zip(&gw) {
            s.step(g, opts);
        }
    }
    soft.iter().map(|s| s.hard_round()).collect()
}

/// Per frontier value: cosine per t, relative MSE, and the total loss, for weights `w`.
fn errors(net: &TibNet, targets: &[Mat], w: &[Vec<f32>]) -> (Vec<(Vec<f64>, f64)>, f64) {
    let all: Vec<usize> = (0..net.steps).collect();
    let values = net.forward(w, &all);
    let (loss, _) = net.loss(&values, targets);
    let per = net
        .outputs
        .iter()
        .zip(targets)
        .map(|(&o, t)| {
            let y = values[o].as_ref().expect("forward");
            let cos = (0..net.steps).map(|r| cosine(t.row(r), y.row(r))).collect();
            let (mut e, mut s) = (0f64, 0f64);
            for (&a, &b) in t.data.iter().zip(&y.data) {
                e += ((a - b) as f64).powi(2);
                s += (a as f64).powi(2);
            }
            (cos, if s > 0.0 { e / s } else { e })
        })
        .collect();
    (per, loss)
}

/// The smallest default `--lut-budget`: tables this small cost nothing a deployment
/// counts, and TIAR is not worth its time for them (a toy model's 10 % can be a few
/// hundred bytes; the models in models/ all have budgets over 35 kB).
pub const MIN_LUT_BUDGET: u64 = 16 * 1024;

/// The `--lut-budget` in effect: the option, else 10 % of the quantized model's bytes
/// ([`quantized_model_bytes`]), at least [`MIN_LUT_BUDGET`].
pub fn lut_budget(model_bytes: u64, options: &Options) -> u64 {
    options
        .lut_budget
        .unwrap_or((model_bytes / 10).max(MIN_LUT_BUDGET))
}

/// What the default budget is a share of: [`quantized_model_bytes`] with the weights at a
/// byte a value whatever `--weight-bits`, so that the TIB's form (tables or computed) does
/// not change with the weights' width. Counted at half a byte, the W4 budget halved, the
/// default-S tables of most models no longer fitted and W4A8 computed its temporal
/// features at 4 bits: ddpm_digits 0.175× → 0.163× of the float file for −0.4 / −0.9 dB
/// step SQNR (mean / min) against the tables.
pub fn budget_base_bytes(model: &Model, options: &Options) -> u64 {
    let mut at_8_bits = options.clone();
    at_8_bits.weight_bits = at_8_bits.weight_bits.max(8);
    quantized_model_bytes(model, &at_8_bits)
}

/// Estimated bytes of the quantized model without the TIB tables (see [`TiarReport`]):
/// quantized weights as stored (a byte a value; half a byte when `--weight-bits 4`
/// packs them as INT4), every other initializer as it is.
pub fn quantized_model_bytes(model: &Model, options: &Options) -> u64 {
    let g = &model.graph;
    let targets = crate::analysis::targets::find_targets(g, &options.keep_float);
    let quantized: HashSet<&str> = targets
        .quantized
        .iter()
        .filter_map(|t| t.weight.as_ref().map(|w| w.name.as_str()))
        .collect();
    let packed = options.weight_bits <= 4 && options.int4_storage == Int4Storage::Packed;
    g.initializers
        .iter()
        .map(|(name, t)| {
            if quantized.contains(name.as_str()) {
                match packed {
                    true => (t.numel() as u64).div_ceil(2),
                    false => t.numel() as u64,
                }
            } else {
                t.byte_len() as u64
            }
        })
        .sum()
}

/// Bytes of the quantized TIB's layers in the file: integer weights (half a byte each
/// when packed INT4), an f32 scale and an integer zero point per output channel.
pub fn tib_layer_bytes(net: &TibNet, options: &Options) -> u64 {
    let packed = options.weight_bits <= 4 && options.int4_storage == Int4Storage::Packed;
    net.layers
        .iter()
        .map(|l| {
            let (w, zp) = ((l.n * l.k) as u64, l.n as u64);
            match packed {
                true => w.div_ceil(2) + zp.div_ceil(2) + 4 * zp,
                false => w + zp + 4 * zp,
            }
        })
        .sum()
}

/// Which frontier values become tables: all (`lut`), none (`quant`), or (`auto`) all
/// when they fit the budget, else the largest relative error per byte first while they
/// fit.
pub fn choose_tables(mode: TibMode, bytes: &[u64], rel_err: &[f64], budget: u64) -> Vec<bool> {
    match mode {
        TibMode::Lut => vec![true; bytes.len()],
        TibMode::Quant => vec![false; bytes.len()],
        TibMode::Auto => {
            if bytes.iter().sum::<u64>() <= budget {
                return vec![true; bytes.len()];
            }
            let mut order: Vec<usize> = (0..bytes.len()).filter(|&i| rel_err[i] > 0.0).collect();
            order.sort_by(|&a, &b| {
                let ka = rel_err[a] / bytes[a].max(1) as f64;
                let kb = rel_err[b] / bytes[b].max(1) as f64;
                kb.total_cmp(&ka).then(a.cmp(&b))
            });
            let mut used = 0u64;
            let mut out = vec![false; bytes.len()];
            for i in order {
                if used + bytes[i] <= budget {
                    used += bytes[i];
                    out[i] = true;
                }
            }
            out
        }
    }
}

/// What [`run`] knows before TIAR: its mode's name, when it started, the tables' byte
/// budget and the quantized model's size it derives from.
struct RunSetup {
    mode_name: &'static str,
    start: Instant,
    budget: u64,
    model_bytes: u64,
}

/// `--tib quant|auto` on a TIB TIAR cannot follow: warn, naming why, and fold every
/// frontier value into a table (`--tib lut`); the report records the fallback.
fn fold_instead(
    cx: &mut PassContext,
    tib: &TibAnalysis,
    set: &[i64],
    setup: &RunSetup,
    why: String,
) -> Result<()> {
    let options = cx.options;
    let warning = format!(
        "WARNING: --tib {}: {why}; the TIB is folded into tables instead (--tib lut)",
        setup.mode_name
    );
    eprintln!("tfmqc: {warning}");
    cx.note(warning.clone());
    let report = fold_with(&mut cx.model, tib, set, options.table_precision)?;
    cx.step_index = report.index_value.clone();
    cx.tiar = Some(TiarReport {
        mode: setup.mode_name.into(),
        timesteps: set.to_vec(),
        weight_bits: options.weight_bits,
        act_bits: options.act_bits,
        iters: 0,
        loss_rtn: 0.0,
        loss_tiar: 0.0,
        kept_rtn: false,
        seconds: setup.start.elapsed().as_secs_f64(),
        lut_budget_bytes: setup.budget,
        quantized_model_bytes: setup.model_bytes,
        table_bytes: report.table_bytes as u64,
        tib_weight_bytes: 0,
        layers: vec![],
        frontier: vec![],
        fallback: Some(why),
    });
    Ok(())
}

/// The rounding TIAR chose and how it compares with round-to-nearest: per layer the
/// integers of both, per frontier value `(cosine per step, relative MSE)` of both.
struct Rounding {
    iters: usize,
    q_rtn: Vec<Vec<i8>>,
    q_final: Vec<Vec<i8>>,
    err_rtn: Vec<(Vec<f64>, f64)>,
    err_final: Vec<(Vec<f64>, f64)>,
    loss_rtn: f64,
    loss_tiar: f64,
    kept_rtn: bool,
}

/// Rounds every TIB layer by TIAR and keeps it unless round-to-nearest is better on
/// TIAR's own loss.
fn round_layers(
    net: &TibNet,
    targets: &[Mat],
    options: &Options,
    progress: &dyn Fn(&str),
) -> Rounding {
    let qmax = weight_qmax(options.weight_bits) as i32;
    let q_rtn = rtn_ints(net, qmax);
    let ada = AdaRoundOpts {
        iters: options.tiar_steps(),
        // The reference's lr 1e-3 is meant for 20k steps; in 2000 (ddpm_digits, W4A8,
        // ddim:50) it left the worst temporal-feature cosine at 0.9971 (loss 0.38),
        // lr 1e-2 reached 0.9994 (loss 0.07), 3e-2 no better (0.9994, 0.05).
        lr: 1e-2,
        seed: options.seed ^ 0x71a2,
        ..Default::default()
    };
    progress(&format!(
        "fold-tib: TIAR over {} layers, {} time steps, {} steps",
        net.layers.len(),
        net.steps,
        ada.iters
    ));
    let q_tiar = tiar(net, targets, qmax, &ada);
    let (err_rtn, loss_rtn) = errors(net, targets, &dequant(net, &q_rtn));
    let (err_tiar, loss_tiar) = errors(net, targets, &dequant(net, &q_tiar));
    // Never worse than round-to-nearest on TIAR's own loss.
    let kept_rtn = !loss_tiar.is_finite() || loss_tiar > loss_rtn;
    let (q_final, err_final) = if kept_rtn {
        (q_rtn.clone(), err_rtn.clone())
    } else {
        (q_tiar, err_tiar)
    };
    Rounding {
        iters: ada.iters,
        q_rtn,
        q_final,
        err_rtn,
        err_final,
        loss_rtn,
        loss_tiar,
        kept_rtn,
    }
}

/// The layers the computed frontier values still read get DequantizeLinear weights (the
/// chosen integers, the Lp scales) and, at `--act-bits 8`, a Q/DQ pair on their input
/// (one per input value); the report's line per layer, present or folded away.
fn quantize_layers(
    g: &mut crate::ir::Graph,
    net: &TibNet,
    weights: &[LayerWeight],
    rounding: &Rounding,
) -> Result<Vec<TiarLayer>> {
    let by_name: HashMap<String, _> = g
        .node_indices()
        .map(|ix| (g.node(ix).name.clone(), ix))
        .collect();
    let mut act_dq: HashMap<String, String> = HashMap::new();
    let mut layer_reports = vec![];
    for (li, (l, (wname, shape, axis))) in net.layers.iter().zip(weights).enumerate() {
        let flipped = rounding.q_final[li]
            .iter()
            .zip(&rounding.q_rtn[li])
            .filter(|(a, b)| a != b)
            .count();
        let present = by_name.get(&l.node).copied();
        layer_reports.push(TiarLayer {
            node: l.node.clone(),
            weight: wname.clone(),
            out_features: l.n,
            in_features: l.k,
            act: l.act,
            flipped,
            in_output: present.is_some(),
        });
        let Some(ix) = present else { continue };
        let ints = crate::numerics::quant::from_rows(&rounding.q_final[li], shape, *axis);
        let qi = g.add_initializer(
            &format!("{wname}_quantized"),
            Tensor::from_vec(shape.clone(), &ints),
        );
        let sc = g.add_initializer(
            &format!("{wname}_scale"),
            Tensor::from_vec(vec![l.n], &l.scales),
        );
        let zp = g.add_initializer(
            &format!("{wname}_zero_point"),
            Tensor::from_vec(vec![l.n], &vec![0i8; l.n]),
        );
        let dq = g.add_op(
            "DequantizeLinear",
            vec![qi, sc, zp],
            &format!("{wname}_dequantized"),
            vec![attr::int("axis", *axis as i64)],
        )?;
        g.set_input(ix, 1, &dq);
        if let Some(params) = l.act {
            let x = g.node(ix).inputs[0].clone();
            let xdq = match act_dq.get(&x) {
                Some(d) => d.clone(),
                None => {
                    let d = insert_qdq(g, &x, &[params.0], params.1, None)?;
                    act_dq.insert(x.clone(), d.clone());
                    d
                }
            };
            g.set_input(ix, 0, &xdq);
        }
    }
    Ok(layer_reports)
}

/// The report's line per frontier value: table or quantized, its table's bytes, and its
/// error under both roundings.
fn frontier_choices(
    tib: &TibAnalysis,
    tabled: &[bool],
    bytes: &[u64],
    rounding: &Rounding,
) -> Vec<FrontierChoice> {
    let (err_rtn, err_final) = (&rounding.err_rtn, &rounding.err_final);
    tib.frontier
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
            FrontierChoice {
                value: f.name.clone(),
                choice: if tabled[i] { "table" } else { "quantized" }.into(),
                table_bytes: bytes[i],
                cosine_min_rtn: min(&err_rtn[i].0),
                cosine_min_tiar: min(&err_final[i].0),
                rel_mse_rtn: err_rtn[i].1,
                rel_mse_tiar: err_final[i].1,
                cosine_rtn: err_rtn[i].0.clone(),
                cosine_tiar: err_final[i].0.clone(),
            }
        })
        .collect()
}

/// The `fold-tib` pass under `--tib quant|auto`: the TIB as a network ([`build`]; tables
/// instead where TIAR cannot follow it, [`fold_instead`]), its rounding
/// ([`round_layers`]), tables for the frontier values chosen ([`choose_tables`]), the
/// layers the others still read quantized ([`quantize_layers`]), and the report.
pub fn run(cx: &mut PassContext, tib: &TibAnalysis, set: &[i64]) -> Result<()> {
    let options = cx.options;
    let mode = options.tib;
    let model_bytes = quantized_model_bytes(&cx.model, options);
    let setup = RunSetup {
        mode_name: if mode == TibMode::Auto {
            "auto"
        } else {
            "quant"
        },
        start: Instant::now(),
        budget: lut_budget(budget_base_bytes(&cx.model, options), options),
        model_bytes,
    };
    let keep_index = options.step_groups.per_step();
    if mode == TibMode::Auto {
        // The tables first (one tract run over S): when they fit the budget, every
        // frontier value is a table and TIAR is not run — the graph is `--tib lut`'s.
        let tables = evaluate_tables(&cx.model, tib, set)?;
        let bytes = tables
            .iter()
            .map(|t| table_choice(t, options.table_precision).map(|c| c.bytes))
            .sum::<Result<u64>>()?;
        if bytes <= setup.budget {
            let all = vec![true; tib.frontier.len()];
            let report = fold_tables(
                &mut cx.model,
                tib,
                set,
                tables,
                &all,
                false,
                options.table_precision,
            )?;
            cx.step_index = report.index_value.clone();
            cx.note(format!(
                "--tib auto: the tables ({} bytes) fit the {} byte budget: every temporal feature is a table, no TIAR; |S| = {} time steps; {} nodes replaced by {} tables ({})",
                report.table_bytes,
                setup.budget,
                set.len(),
                report.removed_nodes,
                report.tables,
                report.forms_summary()
            ));
            return Ok(());
        }
    }
    let Built {
        net,
        tables,
        targets,
        weights,
    } = match build(&cx.model, tib, set, options)? {
        Ok(b) => b,
        Err(Unsupported(why)) => return fold_instead(cx, tib, set, &setup, why),
    };
    let rounding = round_layers(&net, &targets, options, cx.progress);

    // A table costs what its stored form does (`--table-precision`).
    let bytes: Vec<u64> = tables
        .iter()
        .map(|t| table_choice(t, options.table_precision).map(|c| c.bytes))
        .collect::<Result<_>>()?;
    let rel: Vec<f64> = rounding.err_final.iter().map(|e| e.1).collect();
    // The budget is the time-step block's: the computed TIB's weights come first (a
    // computed feature needs them), tables take what is left. At S = 1000 a table costs
    // ~|S| bytes per feature against the TIB's ~K per feature (K its width), so the
    // budget rarely buys one there.
    let tib_weight_bytes = tib_layer_bytes(&net, options);
    // Charged as packed INT4 whatever `--int4-storage`: the int8-storage fallback must
    // compute what the packed file computes, so it gets the same tables (charged as
    // stored, it took one table fewer on ddpm_digits at S = 1000 and the two files
    // differed).
    let charged = tib_layer_bytes(
        &net,
        &Options {
            int4_storage: Int4Storage::Packed,
            ..options.clone()
        },
    );
    let table_budget = setup.budget.saturating_sub(charged);
    let tabled = choose_tables(mode, &bytes, &rel, table_budget);
    let fold = fold_tables(
        &mut cx.model,
        tib,
        set,
        tables,
        &tabled,
        keep_index,
        options.table_precision,
    )?;
    cx.step_index = fold.index_value.clone();
    let tabled = fold.tabled;

    let g = &mut cx.model.graph;
    let layers = quantize_layers(g, &net, &weights, &rounding)?;
    // The replaced float weights go; the step index stays for step-group tables even
    // when nothing reads it yet.
    let protect: Vec<String> = cx
        .step_index
        .clone()
        .filter(|_| keep_index)
        .into_iter()
        .collect();
    g.remove_dead_keeping(&protect);
    g.validate()?;

    let frontier = frontier_choices(tib, &tabled, &bytes, &rounding);
    let table_bytes: u64 = frontier
        .iter()
        .filter(|f| f.choice == "table")
        .map(|f| f.table_bytes)
        .sum();
    let report = TiarReport {
        mode: setup.mode_name.into(),
        timesteps: set.to_vec(),
        weight_bits: options.weight_bits,
        act_bits: options.act_bits,
        iters: rounding.iters,
        loss_rtn: rounding.loss_rtn,
        loss_tiar: rounding.loss_tiar,
        kept_rtn: rounding.kept_rtn,
        seconds: setup.start.elapsed().as_secs_f64(),
        lut_budget_bytes: setup.budget,
        quantized_model_bytes: setup.model_bytes,
        table_bytes,
        tib_weight_bytes,
        layers,
        frontier,
        fallback: None,
    };
    for line in report.lines() {
        cx.note(line);
    }
    cx.tiar = Some(report);
    Ok(())
}

impl TiarReport {
    /// The terminal summary: TIAR against round-to-nearest, and each frontier value's
    /// choice with its bytes and error.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![];
        if let Some(f) = &self.fallback {
            out.push(format!("--tib {}: fell back to tables ({f})", self.mode));
            return out;
        }
        let min_of = |f: fn(&FrontierChoice) -> f64| {
            self.frontier.iter().map(f).fold(f64::INFINITY, f64::min)
        };
        out.push(format!(
            "--tib {}: TIAR over {} TIB layers, |S| = {}, {} steps, {:.1} s: loss {:.3e} (round-to-nearest {:.3e}){}; temporal-feature cosine, worst over frontier and S: {:.5} (round-to-nearest {:.5})",
            self.mode,
            self.layers.len(),
            self.timesteps.len(),
            self.iters,
            self.seconds,
            self.loss_tiar.min(self.loss_rtn),
            self.loss_rtn,
            if self.kept_rtn { " — TIAR did not beat round-to-nearest, kept it" } else { "" },
            min_of(|f| f.cosine_min_tiar),
            min_of(|f| f.cosine_min_rtn),
        ));
        out.push(format!(
            "tables {} bytes of a {} byte budget, {} of it for the quantized TIB's layers (quantized model ≈ {} bytes); per frontier value:",
            self.table_bytes, self.lut_budget_bytes, self.tib_weight_bytes, self.quantized_model_bytes
        ));
        for f in &self.frontier {
            out.push(format!(
                "  {}: {} — table {} bytes; quantized: min cosine {:.5} (RTN {:.5}), rel. MSE {:.2e} (RTN {:.2e})",
                f.value, f.choice, f.table_bytes, f.cosine_min_tiar, f.cosine_min_rtn, f.rel_mse_tiar, f.rel_mse_rtn
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_keeps_all_tables_within_budget() {
        assert_eq!(
            choose_tables(TibMode::Auto, &[10, 20], &[0.1, 0.2], 30),
            vec![true, true]
        );
    }

    #[test]
    fn auto_spends_the_budget_on_the_largest_error_per_byte() {
        let bytes = [100, 100, 50, 400];
        let err = [0.01, 0.05, 0.04, 0.5];
        let t = choose_tables(TibMode::Auto, &bytes, &err, 160);
        // Per byte: 2 (8e-4), 1 (5e-4), 3 (1.25e-3 but 400 bytes: over budget), 0 (1e-4).
        assert_eq!(t, vec![false, true, true, false]);
        let used: u64 = bytes
            .iter()
            .zip(&t)
            .filter(|(_, &k)| k)
            .map(|(b, _)| b)
            .sum();
        assert!(used <= 160);
    }

    #[test]
    fn auto_with_zero_budget_tables_nothing_and_quant_never_tables() {
        assert_eq!(
            choose_tables(TibMode::Auto, &[8, 8], &[0.1, 0.1], 0),
            vec![false, false]
        );
        assert_eq!(
            choose_tables(TibMode::Quant, &[8], &[0.1], 1000),
            vec![false]
        );
        assert_eq!(choose_tables(TibMode::Lut, &[8], &[0.1], 0), vec![true]);
    }

    #[test]
    fn exact_values_are_never_tabled_by_auto() {
        assert_eq!(
            choose_tables(TibMode::Auto, &[8, 8], &[0.0, 0.1], 10),
            vec![false, true]
        );
    }
}
