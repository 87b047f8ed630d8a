//! Which nodes are quantized, which stay float and why: shared by `calibrate` (which
//! activations to observe) and `quantize` (what to rewrite).

use std::collections::HashSet;

use serde::Serialize;

use crate::ir::Graph;
use crate::options::{Options, OutputQdq};

/// A weight input quantized per output channel.
#[derive(Clone, Debug, Serialize)]
pub struct WeightInput {
    pub slot: usize,
    pub name: String,
    /// The output-channel axis of the weight tensor.
    pub axis: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub node: String,
    pub op: String,
    pub weight: Option<WeightInput>,
    /// Activation (non-constant) inputs that get a QuantizeLinear/DequantizeLinear pair.
    pub activations: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Targets {
    pub quantized: Vec<Target>,
    /// (node, reason) of compute nodes left in float.
    pub kept_float: Vec<(String, String)>,
}

impl Targets {
    /// Every activation value to observe, in target order, without duplicates.
    pub fn activation_values(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        self.quantized
            .iter()
            .flat_map(|t| t.activations.iter())
            .filter(|a| seen.insert(a.as_str()))
            .cloned()
            .collect()
    }
}

/// Ops that only move data: a Conv reaching a graph output through them is the output
/// conv.
const DATA_MOVEMENT: &[&str] = &[
    "Identity",
    "Reshape",
    "Slice",
    "Split",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Concat",
];

fn reaches_output(g: &Graph, value: &str, depth: usize) -> bool {
    if g.is_graph_output(value) {
        return true;
    }
    depth > 0
        && g.consumers(value).iter().any(|&(ix, _)| {
            let n = g.node(ix);
            DATA_MOVEMENT.contains(&n.op_type.as_str())
                && n.outputs.iter().any(|o| reaches_output(g, o, depth - 1))
        })
}

/// Finds the quantization targets. `keep_float`: node-name substrings to leave in float
/// (on top of the defaults: the input conv and the output conv, as in the reference).
pub fn find_targets(g: &Graph, keep_float: &[String]) -> Targets {
    let mut out = Targets::default();
    let order = g.topo_order().unwrap_or_default();
    let is_const = |v: &str| g.initializers.contains_key(v);
    for ix in order {
        let n = g.node(ix);
        let op = n.op_type.as_str();
        if !matches!(op, "Conv" | "Gemm" | "MatMul" | "Einsum")
            || !(n.domain.is_empty() || n.domain == "ai.onnx")
        {
            continue;
        }
        // Already in QDQ form (an earlier pass quantized it: TIAR's TIB layers): left
        // as it is.
        let from_dq = |v: &String| {
            g.producer(v)
                .is_some_and(|(p, _)| g.node(p).is_onnx_op("DequantizeLinear"))
        };
        if n.inputs.iter().any(from_dq) {
            continue;
        }
        if let Some(p) = keep_float.iter().find(|p| n.name.contains(p.as_str())) {
            out.kept_float
                .push((n.name.clone(), format!("--keep-float {p}")));
            continue;
        }
        if op == "Conv" && g.is_graph_input(&n.inputs[0]) {
            out.kept_float.push((n.name.clone(), "input conv".into()));
            continue;
        }
        if op == "Conv" && reaches_output(g, &n.outputs[0], 4) {
            out.kept_float.push((n.name.clone(), "output conv".into()));
            continue;
        }
        let weight = match op {
            "Conv" if is_const(&n.inputs[1]) => Some(WeightInput {
                slot: 1,
                name: n.inputs[1].clone(),
                axis: 0,
            }),
            "Gemm" if is_const(&n.inputs[1]) => {
                let trans_b = n.attr_int("transB").unwrap_or(0) == 1;
                Some(WeightInput {
                    slot: 1,
                    name: n.inputs[1].clone(),
                    axis: if trans_b { 0 } else { 1 },
                })
            }
            "MatMul" if is_const(&n.inputs[1]) => {
                let rank = g.initializers[&n.inputs[1]].shape.len();
                (rank >= 2).then(|| WeightInput {
                    slot: 1,
                    name: n.inputs[1].clone(),
                    axis: rank - 1,
                })
            }
            _ => None,
        };
        // Weights of other shapes (a constant A in Gemm, Conv weights computed at run
        // time) are left alone: only activations are quantized then.
        let data_slots: &[usize] = match op {
            "Conv" | "Gemm" => &[0],
            _ => &[0, 1],
        };
        let activations: Vec<String> = data_slots
            .iter()
            .filter_map(|&s| n.inputs.get(s))
            .filter(|v| !v.is_empty() && !is_const(v))
            .cloned()
            .collect();
        if weight.is_none() && activations.is_empty() {
            continue;
        }
        out.quantized.push(Target {
            node: n.name.clone(),
            op: op.to_string(),
            weight,
            activations,
        });
    }
    out
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
pub fn conv_outputs(g: &Graph, quantized: &[Target]) -> Vec<(String, String)> {
    let by_name: std::collections::HashMap<&str, _> = g
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
