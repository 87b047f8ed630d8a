//! The rank of every value of an ONNX graph that can be known from the protobuf alone
//! (declared input shapes, constants, and the rank rules of the common ops), for the
//! load-time checks in [`crate::limits`]. tract's analysis evaluates shape arithmetic
//! (`Shape` → `Gather` → `Concat` → `Reshape`) while it loads a model and indexes those
//! small tensors without a bounds check, so an index that is out of range panics inside
//! tract (found by the denoiser_load fuzz target: `Gather(Shape(x), 57)` on a rank-4 x).
//! Knowing the ranks lets the checks refuse such a model before tract sees it.
//!
//! Ranks are found in one pass over the nodes in file order (ONNX requires topological
//! order; a model that breaks it only leaves more ranks unknown). An op without a rule
//! here, or an input of unknown rank, leaves its outputs unknown: the checks skip what
//! they cannot see, they never refuse on a guess.

use std::collections::HashMap;

use tract_onnx::pb;

/// Rank of each value whose rank is known, by name.
pub(crate) type Ranks<'a> = HashMap<&'a str, usize>;

/// Ops whose (first) output has the rank of their first input.
const SAME_RANK: &[&str] = &[
    "Abs",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "CastLike",
    "Ceil",
    "Celu",
    "Clip",
    "Conv",
    "ConvInteger",
    "ConvTranspose",
    "Cos",
    "CumSum",
    "DequantizeLinear",
    "Dropout",
    "Elu",
    "Erf",
    "Exp",
    "Floor",
    "Gelu",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "GroupNormalization",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "InstanceNormalization",
    "IsInf",
    "IsNaN",
    "LayerNormalization",
    "LeakyRelu",
    "Log",
    "LogSoftmax",
    "LpNormalization",
    "MaxPool",
    "Mish",
    "Neg",
    "Not",
    "Pad",
    "QLinearConv",
    "QuantizeLinear",
    "Reciprocal",
    "Relu",
    "Resize",
    "Round",
    "Selu",
    "Sigmoid",
    "Sign",
    "Sin",
    "Slice",
    "Softmax",
    "Softplus",
    "Softsign",
    "Sqrt",
    "Tanh",
    "ThresholdedRelu",
    "Transpose",
    "Trilu",
    "Upsample",
];

/// Ops whose output has the largest rank of their inputs (numpy broadcasting).
const BROADCAST: &[&str] = &[
    "Add",
    "And",
    "BitShift",
    "Div",
    "Equal",
    "Greater",
    "GreaterOrEqual",
    "Less",
    "LessOrEqual",
    "Max",
    "Mean",
    "Min",
    "Mod",
    "Mul",
    "Or",
    "PRelu",
    "Pow",
    "Sub",
    "Sum",
    "Where",
    "Xor",
];

/// The known ranks of `g`'s values; `konst` holds its constants (initializers and
/// Constant nodes' tensors), `ints` reads a small integer constant.
pub(crate) fn ranks<'a>(
    g: &'a pb::GraphProto,
    konst: &HashMap<&'a str, &'a pb::TensorProto>,
    ints: impl Fn(&pb::TensorProto) -> Option<Vec<i64>>,
) -> Ranks<'a> {
    let mut rank: Ranks<'a> = HashMap::new();
    for i in &g.input {
        let shape = i
            .r#type
            .as_ref()
            .and_then(|t| t.value.as_ref())
            .and_then(|v| {
                let pb::type_proto::Value::TensorType(t) = v;
                t.shape.as_ref()
            });
        if let Some(s) = shape {
            rank.insert(i.name.as_str(), s.dim.len());
        }
    }
    for (name, t) in konst {
        rank.insert(name, t.dims.len());
    }
    for n in &g.node {
        let input = |k: usize| n.input.get(k).map(String::as_str).filter(|s| !s.is_empty());
        let rank_of = |k: usize| input(k).and_then(|i| rank.get(i)).copied();
        let konst_ints = |k: usize| input(k).and_then(|i| konst.get(i)).and_then(|t| ints(t));
        let attr_ints = |name: &str| {
            n.attribute
                .iter()
                .find(|a| a.name == name)
                .map(|a| a.ints.len())
        };
        let attr_int = |name: &str| n.attribute.iter().find(|a| a.name == name).map(|a| a.i);
        let op = n.op_type.as_str();
        let out: Option<usize> = if SAME_RANK.contains(&op) {
            rank_of(0)
        } else if BROADCAST.contains(&op) {
            (0..n.input.len())
                .filter(|&k| input(k).is_some())
                .map(rank_of)
                .try_fold(0usize, |m, r| r.map(|r| m.max(r)))
        } else {
            match op {
                "Constant" => None, // already in `konst`
                "Shape" | "Range" => Some(1),
                "NonZero" => Some(2),
                "Size" => Some(0),
                "Gemm" | "Flatten" => Some(2),
                "Concat" | "Split" => rank_of(0),
                "MatMul" | "MatMulInteger" | "QLinearMatMul" => {
                    let (a, b) = if op == "QLinearMatMul" {
                        (rank_of(0), rank_of(3))
                    } else {
                        (rank_of(0), rank_of(1))
                    };
                    match (a, b) {
                        (Some(1), Some(1)) => Some(0),
                        (Some(1), Some(r)) | (Some(r), Some(1)) => r.checked_sub(1),
                        (Some(a), Some(b)) => Some(a.max(b)),
                        _ => None,
                    }
                }
                "Reshape" => konst_ints(1).map(|s| s.len()),
                "Expand" => match (rank_of(0), konst_ints(1)) {
                    (Some(r), Some(s)) => Some(r.max(s.len())),
                    _ => None,
                },
                "ConstantOfShape" => input(0).and_then(|i| konst.get(i)).and_then(|t| {
                    // A 1-D shape tensor: its length is the output's rank.
                    (t.dims.len() == 1).then(|| t.dims[0].max(0) as usize)
                }),
                "Unsqueeze" => {
                    let added = attr_ints("axes").or_else(|| konst_ints(1).map(|a| a.len()));
                    match (rank_of(0), added) {
                        (Some(r), Some(k)) => Some(r + k),
                        _ => None,
                    }
                }
                "Squeeze" => {
                    let removed = attr_ints("axes").or_else(|| konst_ints(1).map(|a| a.len()));
                    match (rank_of(0), removed) {
                        (Some(r), Some(k)) => r.checked_sub(k),
                        _ => None,
                    }
                }
                "Gather" => match (rank_of(0), rank_of(1)) {
                    (Some(d), Some(i)) if d >= 1 => Some(d - 1 + i),
                    _ => None,
                },
                _ if op.starts_with("Reduce") || op == "ArgMax" || op == "ArgMin" => {
                    let keep = attr_int("keepdims").unwrap_or(1) != 0;
                    let r = rank_of(0);
                    if keep {
                        r
                    } else {
                        let axes = attr_ints("axes")
                            .or_else(|| konst_ints(1).map(|a| a.len()))
                            .or(if op.starts_with("Arg") { Some(1) } else { None });
                        match (r, axes) {
                            (Some(r), Some(k)) => r.checked_sub(k),
                            _ => None,
                        }
                    }
                }
                _ => None,
            }
        };
        if let Some(r) = out {
            let outputs = if op == "Split" { n.output.len() } else { 1 };
            for o in n.output.iter().take(outputs).filter(|o| !o.is_empty()) {
                rank.insert(o.as_str(), r);
            }
        }
    }
    rank
}
