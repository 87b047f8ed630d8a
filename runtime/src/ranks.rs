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

/// What is known of a graph's values, by name: the rank of each value whose rank is
/// known, and the length of each 1-D value whose length is known (shape vectors, whose
/// length is the rank of what `Reshape`, `Expand` or `ConstantOfShape` make of them).
#[derive(Default)]
pub(crate) struct Ranks<'a> {
    pub rank: HashMap<&'a str, usize>,
    pub len: HashMap<&'a str, usize>,
}

/// Entries of `Shape(x)` for an x of rank `rank`: all of them, or those between the
/// optional `start` and `end` attributes (opset 15), clamped as the spec says.
pub(crate) fn shape_len(shape: &pb::NodeProto, rank: usize) -> usize {
    let r = rank as i64;
    let clamp = |v: i64| if v < 0 { (v + r).max(0) } else { v.min(r) };
    let attr = |name: &str| shape.attribute.iter().find(|a| a.name == name);
    let start = attr("start").map_or(0, |a| clamp(a.i));
    let end = attr("end").map_or(r, |a| clamp(a.i));
    (end - start).max(0) as usize
}

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

/// The known ranks (and shape-vector lengths) of `g`'s values; `konst` holds its
/// constants (initializers and Constant nodes' tensors), `ints` reads a small integer
/// constant.
pub(crate) fn ranks<'a>(
    g: &'a pb::GraphProto,
    konst: &HashMap<&'a str, &'a pb::TensorProto>,
    ints: impl Fn(&pb::TensorProto) -> Option<Vec<i64>>,
) -> Ranks<'a> {
    let mut rank: HashMap<&'a str, usize> = HashMap::new();
    let mut len: HashMap<&'a str, usize> = HashMap::new();
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
        if let [n] = t.dims[..] {
            len.insert(name, n.max(0) as usize);
        }
    }
    for n in &g.node {
        let input = |k: usize| n.input.get(k).map(String::as_str).filter(|s| !s.is_empty());
        let rank_of = |k: usize| input(k).and_then(|i| rank.get(i)).copied();
        let konst_ints = |k: usize| input(k).and_then(|i| konst.get(i)).and_then(|t| ints(t));
        let len_of = |k: usize| input(k).and_then(|i| len.get(i)).copied();
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
                // A shape vector's length is the rank of what is made with it.
                "Reshape" => len_of(1),
                "Expand" => match (rank_of(0), len_of(1)) {
                    (Some(r), Some(s)) => Some(r.max(s)),
                    _ => None,
                },
                "ConstantOfShape" => len_of(0),
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
        // Lengths of shape vectors, through the ops exports build them with.
        let length = match op {
            "Shape" => rank_of(0).map(|r| shape_len(n, r)),
            "Cast" | "Identity" | "Abs" | "Neg" => len_of(0),
            // Unsqueeze(scalar, [0]): a one-entry vector.
            "Unsqueeze" => (out == Some(1) && rank_of(0) == Some(0)).then_some(1),
            "Concat" if out == Some(1) => (0..n.input.len())
                .filter(|&k| input(k).is_some())
                .map(len_of)
                .try_fold(0usize, |sum, l| l.map(|l| sum + l)),
            // Entries picked from a vector by a 1-D list of indices (from a matrix, the
            // length would be the other axis's: unknown here).
            "Gather" if rank_of(0) == Some(1) && rank_of(1) == Some(1) => {
                konst_ints(1).map(|i| i.len())
            }
            _ => None,
        };
        if let Some(r) = out {
            let outputs = if op == "Split" { n.output.len() } else { 1 };
            for o in n.output.iter().take(outputs).filter(|o| !o.is_empty()) {
                rank.insert(o.as_str(), r);
            }
        }
        if let (Some(l), Some(o)) = (length, n.output.first().filter(|o| !o.is_empty())) {
            len.insert(o.as_str(), l);
        }
    }
    Ranks { rank, len }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> pb::NodeProto {
        pb::NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn konst(name: &str, dims: &[i64]) -> pb::TensorProto {
        pb::TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: pb::tensor_proto::DataType::Float as i32,
            ..Default::default()
        }
    }

    #[test]
    fn ranks_follow_the_op_rules_and_stay_unknown_without_one() {
        let g = pb::GraphProto {
            initializer: vec![
                konst("v", &[5]),
                konst("s0", &[]),
                konst("m", &[2, 3, 4]),
                konst("m2", &[3, 5]),
                konst("s0i", &[]),
            ],
            node: vec![
                node("MatMul", &["v", "s0"], &["vs"]), // 1 × 0: invalid, not an underflow
                node("MatMul", &["v", "m"], &["vm"]),
                node("Split", &["m"], &["p", "q"]),
                node("Shape", &["m"], &["sm"]),
                node("Unsqueeze", &["s0", "s0"], &["u"]),
                node("Concat", &["sm", "v"], &["cat"]),
                node("Reshape", &["m", "cat"], &["r"]),
                node("Gather", &["m2", "s0i"], &["row"]), // [3, 5] by a scalar: [5]
                node("TopK", &["m"], &["t"]),
                node("Relu", &["t"], &["rt"]),
            ],
            ..Default::default()
        };
        let k: HashMap<&str, &pb::TensorProto> =
            g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
        // Only the scalar index reads as integers here.
        let r = ranks(&g, &k, |t| (t.name == "s0i").then(|| vec![0]));
        assert_eq!(r.rank.get("vs"), None);
        assert_eq!(r.rank["vm"], 2);
        assert_eq!((r.rank["p"], r.rank["q"]), (3, 3));
        assert_eq!((r.rank["sm"], r.len["sm"]), (1, 3));
        assert_eq!(r.len["cat"], 8);
        assert_eq!(r.rank["r"], 8);
        assert_eq!((r.rank.get("t"), r.rank.get("rt")), (None, None));
        // A row of a matrix is a vector whose length is not the indices' count.
        assert_eq!((r.rank["row"], r.len.get("row")), (1, None));
    }
}
