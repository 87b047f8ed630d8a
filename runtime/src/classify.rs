//! What a compiled model's constants are, read from the graph's structure: the integer
//! weights behind a DequantizeLinear, the temporal-feature tables and the per-step scale
//! tables gathered at the time-step index, float tensors and the rest. Names say nothing
//! here: the compiler writes short generated names (`w12`, `t3`), and files from other
//! tools (onnxruntime's `quantize_static`) name their tensors their own way.
//!
//! One classifier for the runtime (what it holds resident, `Engine::resident_bytes`) and
//! the compiler's report (`bytes_by_kind` of the file): both pass their graph as
//! [`NodeRef`]s and [`ConstRef`]s.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb;

/// The kind of one constant (initializer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConstKind {
    /// A temporal-feature table: gathered at the time-step index (and the constants that
    /// decode its gathered rows: row and column scales, unit scale and zero point of an
    /// int8 table).
    Table,
    /// A per-step activation scale table (gathered at the time-step index, the gathered
    /// scale divides an activation or is a Q/DQ scale), the unit scale of the Q/DQ pairs
    /// such a scale feeds, and the constants of the step-group index.
    ScaleTable,
    /// Integer weights (8- or 4-bit, more than one value) read by a DequantizeLinear.
    WeightInt,
    /// An f32 tensor of more than one value that is no Q/DQ scale (float weights,
    /// biases, float tensors of the model).
    Float,
    /// Scales, zero points, int32 biases, shapes and the rest.
    Other,
}

/// One node as the classifier reads it.
#[derive(Clone, Copy, Debug)]
pub struct NodeRef<'a> {
    /// The op type for an `ai.onnx` op; ops of other domains never match.
    pub op: &'a str,
    pub inputs: &'a [String],
    pub outputs: &'a [String],
}

impl<'a> NodeRef<'a> {
    /// A node as either graph form has it; `op` is kept only for the default (`ai.onnx`)
    /// domain, so that the rule lives here rather than in each reader.
    pub fn new(
        op_type: &'a str,
        domain: &str,
        inputs: &'a [String],
        outputs: &'a [String],
    ) -> Self {
        let default_domain = domain.is_empty() || domain == "ai.onnx";
        NodeRef {
            op: if default_domain { op_type } else { "" },
            inputs,
            outputs,
        }
    }
}

/// What the classifier needs of one initializer.
#[derive(Clone, Copy, Debug)]
pub struct ConstRef {
    /// An 8- or 4-bit integer element type.
    pub low_bit_int: bool,
    pub f32: bool,
    pub numel: usize,
}

const QDQ: [&str; 2] = ["QuantizeLinear", "DequantizeLinear"];

/// The kind of every initializer in `consts` read by a node of `nodes`. `timestep_input`:
/// the graph input holding t (the `tfmqc.timestep_input` metadata); without it nothing
/// is a table or scale table. A table is a constant gathered at an index that depends on
/// t (a lookup by another input, such as a class label's embedding, is a float tensor). A constant read in several ways takes the first of Table,
/// ScaleTable, WeightInt, Float, Other that one of its uses gives.
pub fn classify(
    nodes: &[NodeRef],
    consts: &HashMap<&str, ConstRef>,
    timestep_input: Option<&str>,
) -> HashMap<String, ConstKind> {
    let is_const = |v: &str| consts.contains_key(v);
    let mut consumers: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for (slot, v) in n.inputs.iter().enumerate() {
            consumers.entry(v.as_str()).or_default().push((i, slot));
        }
        for o in n.outputs {
            producer.insert(o.as_str(), i);
        }
    }
    // Values that depend on t (nodes in any order: to a fixed point). Not only on t: a
    // batch of time steps is often t expanded to the shape of the sample.
    let mut t_derived: HashSet<&str> = timestep_input.into_iter().collect();
    if !t_derived.is_empty() {
        loop {
            let before = t_derived.len();
            for n in nodes {
                if n.inputs.iter().any(|v| t_derived.contains(v.as_str())) {
                    t_derived.extend(n.outputs.iter().map(|o| o.as_str()));
                }
            }
            if t_derived.len() == before {
                break;
            }
        }
    }
    let reads = |v: &str, op: &str, slot: usize| {
        consumers
            .get(v)
            .is_some_and(|c| c.iter().any(|&(i, s)| nodes[i].op == op && s == slot))
    };
    let is_scale_use = |v: &str| reads(v, "Div", 1) || QDQ.iter().any(|op| reads(v, op, 1));
    let mut kinds: HashMap<String, ConstKind> = HashMap::new();
    let mut set = |name: &str, kind: ConstKind| {
        let k = kinds.entry(name.to_string()).or_insert(kind);
        if (kind as u8) < (*k as u8) {
            *k = kind;
        }
    };
    // The nodes computing the values `roots` (their producers, transitively).
    let cone = |roots: &mut dyn Iterator<Item = usize>| {
        let mut seen: HashSet<usize> = HashSet::new();
        let mut stack: Vec<usize> = roots.collect();
        while let Some(i) = stack.pop() {
            if !seen.insert(i) {
                continue;
            }
            for v in nodes[i].inputs {
                if let Some(&p) = producer.get(v.as_str()) {
                    stack.push(p);
                }
            }
        }
        seen
    };
    // Lookups at the time-step index: Gather(constant, t-derived index) of a constant
    // only gathered, except those that compute an index themselves (the time-step set,
    // compared with t and gathered at t's position to check that t is in it).
    let is_lookup = |i: usize, slot: usize| {
        let n = &nodes[i];
        slot == 0
            && n.op == "Gather"
            && n.inputs
                .get(1)
                .is_some_and(|x| t_derived.contains(x.as_str()))
    };
    let lookups: Vec<(usize, &str, &str)> = nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| match (n.inputs, n.outputs.first()) {
            ([data, ..], Some(out))
                if is_const(data)
                    && is_lookup(i, 0)
                    && consumers[data.as_str()]
                        .iter()
                        .all(|&(j, slot)| is_lookup(j, slot)) =>
            {
                Some((i, data.as_str(), out.as_str()))
            }
            _ => None,
        })
        .collect();
    let index_of = |i: usize| producer.get(nodes[i].inputs[1].as_str()).copied();
    let computing_indices = cone(&mut lookups.iter().filter_map(|l| index_of(l.0)));
    let mut table_rows: Vec<&str> = vec![];
    let mut step_scales: HashSet<&str> = HashSet::new();
    let mut index_nodes: Vec<(usize, bool)> = vec![];
    for &(i, data, out) in lookups.iter().filter(|l| !computing_indices.contains(&l.0)) {
        let scale = is_scale_use(out);
        set(
            data,
            if scale {
                ConstKind::ScaleTable
            } else {
                ConstKind::Table
            },
        );
        if scale {
            step_scales.insert(out);
        } else {
            table_rows.push(out);
        }
        if let Some(p) = index_of(i) {
            index_nodes.push((p, scale));
        }
    }
    // An int8 or f16 table's rows are decoded by DequantizeLinear, Mul and Cast with
    // constant operands (scales, unit scale, zero point): those belong to the table.
    let mut decoded: HashSet<&str> = table_rows.iter().copied().collect();
    let mut stack = table_rows.clone();
    while let Some(v) = stack.pop() {
        for &(i, _) in consumers.get(v).into_iter().flatten() {
            let n = &nodes[i];
            if !matches!(n.op, "DequantizeLinear" | "Mul" | "Cast") {
                continue;
            }
            let operands_known = n
                .inputs
                .iter()
                .filter(|x| !x.is_empty())
                .all(|x| is_const(x) || decoded.contains(x.as_str()));
            if !operands_known {
                continue;
            }
            for x in n.inputs.iter().filter(|x| is_const(x)) {
                set(x, ConstKind::Table);
            }
            for o in n.outputs {
                if decoded.insert(o.as_str()) {
                    stack.push(o.as_str());
                }
            }
        }
    }
    // The step-group index: the constants computing the scale tables' index that no
    // table's index needs (the time-step index itself is shared with the tables).
    let table_cone = cone(&mut index_nodes.iter().filter(|p| !p.1).map(|p| p.0));
    let scale_cone = cone(&mut index_nodes.iter().filter(|p| p.1).map(|p| p.0));
    for &i in scale_cone.difference(&table_cone) {
        for x in nodes[i].inputs.iter().filter(|x| is_const(x)) {
            set(x, ConstKind::ScaleTable);
        }
    }
    // Q/DQ pairs on an activation divided by its step's scale: their unit scale.
    for n in nodes {
        if !QDQ.contains(&n.op) {
            continue;
        }
        let Some(&p) = n.inputs.first().and_then(|x| producer.get(x.as_str())) else {
            continue;
        };
        let src = &nodes[p];
        let divided = |d: &NodeRef| {
            d.op == "Div"
                && d.inputs
                    .get(1)
                    .is_some_and(|s| step_scales.contains(s.as_str()))
        };
        let by_step = divided(src)
            || (src.op == "QuantizeLinear"
                && src
                    .inputs
                    .first()
                    .and_then(|x| producer.get(x.as_str()))
                    .is_some_and(|&q| divided(&nodes[q])));
        if let (true, Some(s)) = (by_step, n.inputs.get(1).filter(|s| is_const(s))) {
            set(s, ConstKind::ScaleTable);
        }
    }
    // The rest by their uses.
    for n in nodes {
        for (slot, x) in n.inputs.iter().enumerate() {
            let Some(c) = consts.get(x.as_str()) else {
                continue;
            };
            let kind = if n.op == "DequantizeLinear" && slot == 0 && c.low_bit_int && c.numel > 1 {
                ConstKind::WeightInt
            } else if c.f32 && c.numel > 1 && !is_scale_use(x) {
                ConstKind::Float
            } else {
                ConstKind::Other
            };
            set(x, kind);
        }
    }
    kinds
}

/// [`classify`] over an ONNX graph; `timestep_input` as there (for a compiled file, its
/// `tfmqc.timestep_input` metadata: [`timestep_input`]).
pub fn classify_graph(
    g: &pb::GraphProto,
    timestep_input: Option<&str>,
) -> HashMap<String, ConstKind> {
    let nodes: Vec<NodeRef> = g
        .node
        .iter()
        .map(|n| NodeRef::new(&n.op_type, &n.domain, &n.input, &n.output))
        .collect();
    use pb::tensor_proto::DataType as D;
    let consts: HashMap<&str, ConstRef> = g
        .initializer
        .iter()
        .map(|t| {
            let dt = t.data_type;
            let low_bit_int = [D::Int8, D::Uint8, D::Int4, D::Uint4]
                .iter()
                .any(|d| *d as i32 == dt);
            let numel = t.dims.iter().map(|&d| d.max(0) as usize).product();
            let c = ConstRef {
                low_bit_int,
                f32: dt == D::Float as i32,
                numel,
            };
            (t.name.as_str(), c)
        })
        .collect();
    classify(&nodes, &consts, timestep_input)
}

/// The graph input holding t, as the compiler records it in the file's metadata.
pub fn timestep_input(m: &pb::ModelProto) -> Option<&str> {
    m.metadata_props
        .iter()
        .find(|p| p.key == crate::meta::TIMESTEP_INPUT)
        .map(|p| p.value.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node<'a>(op: &'a str, inputs: &'a [String], outputs: &'a [String]) -> NodeRef<'a> {
        NodeRef {
            op,
            inputs,
            outputs,
        }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    /// An onnxruntime-style QDQ weight and activation, an int8 table gathered at t and a
    /// per-step scale table: each constant gets its kind whatever it is called.
    #[test]
    fn kinds_follow_from_the_uses_not_the_names() {
        let io = [
            // t → its position in the set S (checked by gathering S there) → int8 table
            // rows, decoded.
            (s(&["t", "S"]), s(&["m"]), "Equal"),
            (s(&["m"]), s(&["pos"]), "ArgMax"),
            (s(&["S", "pos"]), s(&["found"]), "Gather"),
            (s(&["found", "t"]), s(&["hit"]), "Equal"),
            (s(&["pos", "hit"]), s(&["i"]), "Add"),
            // A batch of time steps: the index expanded to the sample's batch.
            (s(&["x"]), s(&["xshape"]), "Shape"),
            (s(&["i", "xshape"]), s(&["idx"]), "Expand"),
            (s(&["A", "idx"]), s(&["rows"]), "Gather"),
            (s(&["rows", "U", "Z8"]), s(&["lev"]), "DequantizeLinear"),
            (s(&["R", "idx"]), s(&["rs"]), "Gather"),
            (s(&["lev", "rs"]), s(&["scaled"]), "Mul"),
            (s(&["scaled", "C"]), s(&["temb"]), "Mul"),
            // The step-group index and a per-step scale.
            (s(&["idx", "G"]), s(&["grp"]), "Div"),
            (s(&["B", "grp"]), s(&["st"]), "Gather"),
            (s(&["x", "st"]), s(&["xs"]), "Div"),
            (s(&["xs", "ONE", "ZP"]), s(&["xq"]), "QuantizeLinear"),
            (s(&["xq", "ONE", "ZP"]), s(&["xd"]), "DequantizeLinear"),
            // A weight behind DequantizeLinear, a float bias, an embedding by label.
            (s(&["Wq", "Ws", "Wz"]), s(&["w"]), "DequantizeLinear"),
            (s(&["xd", "w", "bias"]), s(&["y"]), "Conv"),
            (s(&["E", "label"]), s(&["emb"]), "Gather"),
        ];
        let nodes: Vec<NodeRef> = io.iter().map(|(i, o, op)| node(op, i, o)).collect();
        let c = |low_bit_int, f32, numel| ConstRef {
            low_bit_int,
            f32,
            numel,
        };
        let consts: HashMap<&str, ConstRef> = [
            ("S", c(false, true, 10)),
            ("A", c(true, false, 640)),
            ("U", c(false, true, 1)),
            ("Z8", c(true, false, 1)),
            ("R", c(false, true, 10)),
            ("C", c(false, true, 64)),
            ("G", c(false, false, 1)),
            ("B", c(false, true, 4)),
            ("ONE", c(false, true, 1)),
            ("ZP", c(true, false, 1)),
            ("Wq", c(true, false, 288)),
            ("Ws", c(false, true, 32)),
            ("Wz", c(true, false, 32)),
            ("bias", c(false, true, 32)),
            ("E", c(false, true, 640)),
        ]
        .into_iter()
        .collect();
        let k = classify(&nodes, &consts, Some("t"));
        use ConstKind::*;
        let want = [
            ("S", Float),
            ("A", Table),
            ("U", Table),
            ("Z8", Table),
            ("R", Table),
            ("C", Table),
            ("G", ScaleTable),
            ("B", ScaleTable),
            ("ONE", ScaleTable),
            ("ZP", Other),
            ("Wq", WeightInt),
            ("Ws", Other),
            ("Wz", Other),
            ("bias", Float),
            ("E", Float),
        ];
        for (name, kind) in want {
            assert_eq!(k[name], kind, "{name}");
        }
        // The time-step set alone (no table reads the index) is no table either.
        let k = classify(&nodes[..5], &consts, Some("t"));
        assert_eq!(k["S"], Float);
        // Without t known nothing is a table.
        let k = classify(&nodes, &consts, None);
        assert_eq!(k["A"], Other);
        assert_eq!(k["E"], Float);
    }

    /// A QDQ file another tool wrote (models/conv3x3_64.q.onnx, onnx.helper in
    /// onnxruntime's layout: `w_q`, `w_scale`, `x_zp`): its weight is an integer weight,
    /// its bias float, the rest scales and zero points; no tables without a t.
    #[test]
    fn a_qdq_file_from_another_tool_classifies() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/conv3x3_64.q.onnx");
        let proto = crate::engine::read_proto(&path).unwrap();
        let k = classify_graph(proto.graph.as_ref().unwrap(), timestep_input(&proto));
        use ConstKind::*;
        for (name, kind) in [
            ("w_q", WeightInt),
            ("b", Float),
            ("w_scale", Other),
            ("w_zp", Other),
            ("x_scale", Other),
            ("x_zp", Other),
        ] {
            assert_eq!(k[name], kind, "{name}");
        }
    }
}
