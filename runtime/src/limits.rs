//! Limits on what a model may ask tract to compute while it is loaded. tract's type
//! analysis and optimizer evaluate every node whose inputs are constants (constant
//! folding), so a 100-byte file with `ConstantOfShape([1e6, 1e6, 1e6])` would make the
//! loader allocate petabytes: the process aborts (a failed allocation cannot be caught).
//! Every model is checked here before tract sees it (the runtime's engines and the
//! compiler's shape inference both go through this crate).

use std::collections::HashMap;

use tract_onnx::pb;

use crate::error::{Error, Result};

/// Elements a value computed from constants may have (4 GiB of f32), and a sample (or a
/// batch of them) the sampler allocates. The largest tensors of SD-class UNets (weights,
/// time-step tables) are under 2^25 elements, their latents under 2^17.
pub const MAX_CONSTANT_ELEMENTS: u64 = 1 << 30;

/// Refuses a model in which an op sized by constant inputs (ConstantOfShape, Expand,
/// Tile, Range) would produce more than [`MAX_CONSTANT_ELEMENTS`] elements, or a graph
/// names an output it does not define (tract's parser looks each output up in a map of
/// the graph's inputs, initializers and node outputs and panics on a missing one: found
/// by the denoiser_load fuzz target, fuzz/regressions/denoiser_load/). Subgraphs (If /
/// Loop / Scan bodies) are checked too, without recursion.
pub fn check_constant_sizes(proto: &pb::ModelProto, name: &str) -> Result<()> {
    let Some(graph) = &proto.graph else {
        return Ok(());
    };
    let prefix = if name.is_empty() {
        String::new()
    } else {
        format!("{name}: ")
    };
    let mut pending: Vec<&pb::GraphProto> = vec![graph];
    while let Some(g) = pending.pop() {
        let defined: std::collections::HashSet<&str> = g
            .input
            .iter()
            .map(|i| i.name.as_str())
            .chain(g.initializer.iter().map(|t| t.name.as_str()))
            .chain(
                g.node
                    .iter()
                    .flat_map(|n| n.output.iter().map(String::as_str)),
            )
            .filter(|n| !n.is_empty())
            .collect();
        if let Some(o) = g.output.iter().find(|o| !defined.contains(o.name.as_str())) {
            return Err(Error::InvalidModel(format!(
                "{prefix}graph '{}': output '{}' is not an input, an initializer or a node's output",
                g.name, o.name
            )));
        }
        // Constants visible in this graph: initializers and Constant nodes' tensors (an
        // outer graph's constants are not looked up: a conservative miss, not a wrong
        // refusal).
        let mut konst: HashMap<&str, &pb::TensorProto> =
            g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
        for n in &g.node {
            if n.op_type == "Constant" {
                if let (Some(out), Some(t)) = (
                    n.output.first(),
                    n.attribute
                        .iter()
                        .find(|a| a.name == "value")
                        .and_then(|a| a.t.as_ref()),
                ) {
                    konst.insert(out.as_str(), t);
                }
            }
        }
        check_gather_indices(g, &konst, &prefix)?;
        check_pow_of_shape_values(g, &konst, &prefix)?;
        for n in &g.node {
            for a in &n.attribute {
                pending.extend(a.g.iter());
                pending.extend(a.graphs.iter());
            }
            let input = |k: usize| n.input.get(k).and_then(|i| konst.get(i.as_str())).copied();
            let elements = match n.op_type.as_str() {
                "ConstantOfShape" => input(0).and_then(ints).map(|s| product(&s)),
                "Expand" => input(1).and_then(ints).map(|s| product(&s)),
                "Tile" => input(1).and_then(ints).map(|r| {
                    let data = input(0).map(|t| product(&t.dims)).unwrap_or(1);
                    data.saturating_mul(product(&r))
                }),
                "Range" => match (input(0), input(1), input(2)) {
                    (Some(s), Some(l), Some(d)) => range_len(s, l, d),
                    _ => None,
                },
                _ => None,
            };
            if let Some(e) = elements.filter(|&e| e > MAX_CONSTANT_ELEMENTS as u128) {
                return Err(Error::InvalidModel(format!(
                    "{prefix}node '{}' ({}): its output would hold {e} elements, more than the {MAX_CONSTANT_ELEMENTS} a value computed at load time may have",
                    n.name, n.op_type
                )));
            }
        }
    }
    Ok(())
}

/// Refuses a `Gather` whose constant indices (or axis) fall outside its data where the
/// data's extent is known: the data is a constant, or the output of `Shape` on a value
/// of known rank (see [`crate::ranks`]). tract evaluates such a Gather while loading and
/// indexes without a bounds check (a panic inside tract: found by the denoiser_load
/// fuzz target, fuzz/regressions/denoiser_load/gather_index_beyond_shape.onnx).
fn check_gather_indices<'a>(
    g: &'a pb::GraphProto,
    konst: &HashMap<&'a str, &'a pb::TensorProto>,
    prefix: &str,
) -> Result<()> {
    let ranks = crate::ranks::ranks(g, konst, ints);
    for n in g.node.iter().filter(|n| n.op_type == "Gather") {
        let (Some(data), Some(indices)) = (n.input.first(), n.input.get(1)) else {
            continue;
        };
        let refuse = |what: String| {
            Err(Error::InvalidModel(format!(
                "{prefix}node '{}' (Gather): {what}",
                n.name
            )))
        };
        let axis = n
            .attribute
            .iter()
            .find(|a| a.name == "axis")
            .map_or(0, |a| a.i);
        let Some(&rank) = ranks.rank.get(data.as_str()) else {
            continue;
        };
        let rank = rank as i64;
        if axis < -rank || axis >= rank {
            return refuse(format!(
                "axis {axis} is outside the {rank} axes of its input '{data}'"
            ));
        }
        let axis = axis.rem_euclid(rank.max(1)) as usize;
        // Extent of the gathered axis, where known: a constant's dimension, or the
        // length of a shape vector.
        let extent: Option<i64> = match konst.get(data.as_str()) {
            Some(t) => t.dims.get(axis).copied(),
            None if rank == 1 => ranks.len.get(data.as_str()).map(|&l| l as i64),
            None => None,
        };
        let (Some(extent), Some(values)) =
            (extent, konst.get(indices.as_str()).and_then(|t| ints(t)))
        else {
            continue;
        };
        if let Some(i) = values.iter().find(|&&i| i < -extent || i >= extent) {
            return refuse(format!(
                "index {i} is outside the {extent} entries of axis {axis} of its input '{data}'"
            ));
        }
    }
    Ok(())
}

/// Refuses a `Pow` whose base is an integer shape value — the output of `Shape`, `Size`,
/// or a `Cast` to an integer type — and whose exponent is a float constant. The ONNX
/// spec allows it, but tract 0.23.9 holds such a base as a symbolic dimension, finds no
/// type common to it and the float exponent, and panics while it loads the model (found
/// by the denoiser_load fuzz target: an export's `Pow(Cast(…, to=FLOAT), -0.5)` with the
/// Cast turned to INT64, fuzz/regressions/denoiser_load/pow_of_an_integer_shape_value.onnx).
fn check_pow_of_shape_values<'a>(
    g: &'a pb::GraphProto,
    konst: &HashMap<&'a str, &'a pb::TensorProto>,
    prefix: &str,
) -> Result<()> {
    // FLOAT, FLOAT16, DOUBLE, BFLOAT16.
    const FLOATS: [i32; 4] = [1, 10, 11, 16];
    // UINT8 … INT64, UINT32, UINT64.
    const INTEGERS: [i64; 8] = [2, 3, 4, 5, 6, 7, 12, 13];
    let producer = |v: &str| g.node.iter().find(|n| n.output.iter().any(|o| o == v));
    for n in g.node.iter().filter(|n| n.op_type == "Pow") {
        let (Some(base), Some(exponent)) = (n.input.first(), n.input.get(1)) else {
            continue;
        };
        let float_exponent = konst
            .get(exponent.as_str())
            .is_some_and(|t| FLOATS.contains(&t.data_type));
        let integer_base = producer(base).filter(|p| match p.op_type.as_str() {
            "Shape" | "Size" => true,
            "Cast" => p
                .attribute
                .iter()
                .any(|a| a.name == "to" && INTEGERS.contains(&a.i)),
            _ => false,
        });
        if let (true, Some(p)) = (float_exponent, integer_base) {
            return Err(Error::InvalidModel(format!(
                "{prefix}node '{}' (Pow): its base '{base}' is an integer (from {} '{}') and its exponent a float; tract cannot load that when the integer is a shape value (cast the base to float first)",
                n.name, p.op_type, p.name
            )));
        }
    }
    Ok(())
}

/// How many times its own size decoding an ONNX file may take in memory (plus
/// [`DECODE_SLACK_BYTES`]). Protobuf lets a small file declare many elements: an empty
/// NodeProto is 2 bytes on the wire and about 200 in memory (twice that with a growing
/// Vec), an empty AttributeProto ~2 KB, so a 10 MB file of them asks for gigabytes
/// before any check on the decoded model can run. Real models decode to about their
/// size (weights are raw bytes, copied once), plus names and attributes.
pub const MAX_DECODE_AMPLIFICATION: u64 = 16;
/// The memory any model may take decoding, whatever its size (its names, nodes, shapes).
pub const DECODE_SLACK_BYTES: u64 = 256 << 20;

/// Refuses ONNX bytes that protobuf decoding could turn into more than
/// [`MAX_DECODE_AMPLIFICATION`] × their size + [`DECODE_SLACK_BYTES`] of memory, before
/// decoding them (the compiler's importer and the runtime both call it). The bound is
/// [`decoded_size_bound`]'s; the error says why, for "not a valid ONNX model: ...".
pub fn check_protobuf_size(bytes: &[u8]) -> std::result::Result<(), String> {
    let bound = decoded_size_bound(bytes)?;
    let limit = (bytes.len() as u64)
        .saturating_mul(MAX_DECODE_AMPLIFICATION)
        .saturating_add(DECODE_SLACK_BYTES);
    if bound > limit {
        return Err(format!(
            "decoding its {} bytes could take up to {bound} bytes of memory (more than {MAX_DECODE_AMPLIFICATION}× its size + {} MiB): it declares more empty messages or repeated values than a model holds",
            bytes.len(),
            DECODE_SLACK_BYTES >> 20
        ));
    }
    Ok(())
}

/// The messages of ONNX's schema as tract's prost types declare them.
#[derive(Clone, Copy, Debug)]
enum Msg {
    Model,
    Graph,
    Node,
    Attribute,
    ValueInfo,
    Tensor,
    Segment,
    SparseTensor,
    TensorShape,
    Dimension,
    Type,
    TypeTensor,
    OpsetId,
    Function,
    StringString,
    TensorAnnotation,
    TrainingInfo,
}

/// What a field decodes to: a message, a string or bytes, numbers (one per varint or
/// fixed-width value, or packed in one length-delimited field), or nothing (a field
/// number prost does not know: skipped).
#[derive(Clone, Copy)]
enum Field {
    Msg(Msg),
    Bytes,
    Varint,
    Fixed,
    Unknown,
}

/// Field `tag` of message `m` (tract-onnx's src/prost/onnx.rs, the ONNX schema).
fn field(m: Msg, tag: u64) -> Field {
    use Field::{Bytes as B, Fixed as F, Msg as M, Unknown, Varint as V};
    use Msg::*;
    match (m, tag) {
        (Model, 1 | 5) => V,
        (Model, 2 | 3 | 4 | 6) => B,
        (Model, 7) => M(Graph),
        (Model, 8) => M(OpsetId),
        (Model, 14) => M(StringString),
        (Model, 20) => M(TrainingInfo),
        (Model, 25) => M(Function),
        (Graph, 1) => M(Node),
        (Graph, 2 | 10) => B,
        (Graph, 5) => M(Tensor),
        (Graph, 15) => M(SparseTensor),
        (Graph, 11..=13) => M(ValueInfo),
        (Graph, 14) => M(TensorAnnotation),
        (Node, 1..=4 | 6 | 7) => B,
        (Node, 5) => M(Attribute),
        (Attribute, 1 | 4 | 9 | 13 | 21) => B,
        (Attribute, 3 | 8 | 20) => V,
        (Attribute, 2 | 7) => F,
        (Attribute, 5 | 10) => M(Tensor),
        (Attribute, 6 | 11) => M(Graph),
        (Attribute, 22 | 23) => M(SparseTensor),
        (Attribute, 15) => M(Type),
        (ValueInfo, 1 | 3) => B,
        (ValueInfo, 2) => M(Type),
        (Tensor, 1 | 2 | 5 | 7 | 11 | 14) => V,
        (Tensor, 3) => M(Segment),
        (Tensor, 4 | 10) => F,
        (Tensor, 6 | 8 | 9 | 12) => B,
        (Tensor, 13) => M(StringString),
        (Segment, 1 | 2) => V,
        (SparseTensor, 1 | 2) => M(Tensor),
        (SparseTensor, 3) => V,
        (TensorShape, 1) => M(Dimension),
        (Dimension, 1) => V,
        (Dimension, 2 | 3) => B,
        (Type, 1) => M(TypeTensor),
        (Type, 6) => B,
        (TypeTensor, 1) => V,
        (TypeTensor, 2) => M(TensorShape),
        (OpsetId, 1) => B,
        (OpsetId, 2) => V,
        (Function, 1 | 4 | 5 | 6 | 8 | 10) => B,
        (Function, 7) => M(Node),
        (Function, 9) => M(OpsetId),
        (StringString, 1 | 2) => B,
        (TensorAnnotation, 1) => B,
        (TensorAnnotation, 2) => M(StringString),
        (TrainingInfo, 1 | 2) => M(Graph),
        (TrainingInfo, 3 | 4) => M(StringString),
        _ => Unknown,
    }
}

/// Bytes of the decoded struct of `m`.
fn struct_bytes(m: Msg) -> u64 {
    use std::mem::size_of;
    use Msg::*;
    (match m {
        Model => size_of::<pb::ModelProto>(),
        Graph => size_of::<pb::GraphProto>(),
        Node => size_of::<pb::NodeProto>(),
        Attribute => size_of::<pb::AttributeProto>(),
        ValueInfo => size_of::<pb::ValueInfoProto>(),
        Tensor => size_of::<pb::TensorProto>(),
        Segment => size_of::<pb::tensor_proto::Segment>(),
        SparseTensor => size_of::<pb::SparseTensorProto>(),
        TensorShape => size_of::<pb::TensorShapeProto>(),
        Dimension => size_of::<pb::tensor_shape_proto::Dimension>(),
        Type => size_of::<pb::TypeProto>(),
        TypeTensor => size_of::<pb::type_proto::Tensor>(),
        OpsetId => size_of::<pb::OperatorSetIdProto>(),
        Function => size_of::<pb::FunctionProto>(),
        StringString => size_of::<pb::StringStringEntryProto>(),
        TensorAnnotation => size_of::<pb::TensorAnnotation>(),
        TrainingInfo => size_of::<pb::TrainingInfoProto>(),
    }) as u64
}

/// prost's nesting limit: deeper messages fail to decode.
const NESTING_LIMIT: usize = 100;

/// An upper bound on the heap and struct bytes prost allocates decoding `bytes` as a
/// `pb::ModelProto`, from one pass over the wire format, without allocating (but a stack
/// of at most [`NESTING_LIMIT`] open messages) and without recursion. Every field
/// counts as if it were an element of a repeated field, in a Vec that doubled its
/// capacity: twice its struct (messages), 24 bytes twice plus its length (strings and
/// bytes), 8 bytes twice per number (16 per byte of a packed varint field, a value per
/// byte at worst; twice its length for packed floats). An error for bytes prost would
/// refuse too: a truncated field, a bad wire type, nesting too deep.
pub fn decoded_size_bound(bytes: &[u8]) -> std::result::Result<u64, String> {
    fn varint(b: &[u8], pos: &mut usize, end: usize) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            if *pos >= end {
                return Err("a number runs past the end of its message".into());
            }
            let byte = b[*pos];
            *pos += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(v);
            }
        }
        Err("a number longer than 10 bytes".into())
    }
    fn skip(pos: &mut usize, n: u64, end: usize) -> std::result::Result<(), String> {
        match usize::try_from(n).ok().and_then(|n| pos.checked_add(n)) {
            Some(p) if p <= end => {
                *pos = p;
                Ok(())
            }
            _ => Err(format!(
                "a field of {n} bytes runs past the end of its message"
            )),
        }
    }
    let mut total = struct_bytes(Msg::Model);
    // Open messages: which, and where each ends.
    let mut open: Vec<(Msg, usize)> = vec![(Msg::Model, bytes.len())];
    // Open groups (wire types 3 and 4: unknown fields prost skips, and so do we).
    let mut groups = 0usize;
    let mut pos = 0;
    while let Some(&(msg, end)) = open.last() {
        if pos == end {
            if groups > 0 {
                return Err("a group is not closed".into());
            }
            open.pop();
            continue;
        }
        let key = varint(bytes, &mut pos, end)?;
        let (tag, wire) = (key >> 3, key & 7);
        if tag == 0 || tag > u64::from(u32::MAX >> 3) {
            return Err(format!("invalid field number {tag}"));
        }
        let f = if groups > 0 {
            Field::Unknown
        } else {
            field(msg, tag)
        };
        let cost = match (wire, f) {
            (0, _) => {
                varint(bytes, &mut pos, end)?;
                if matches!(f, Field::Varint) {
                    16
                } else {
                    0
                }
            }
            (1 | 5, _) => {
                skip(&mut pos, if wire == 1 { 8 } else { 4 }, end)?;
                if matches!(f, Field::Fixed) {
                    16
                } else {
                    0
                }
            }
            (2, _) => {
                let len = varint(bytes, &mut pos, end)?;
                let start = pos;
                skip(&mut pos, len, end)?;
                match f {
                    Field::Msg(child) => {
                        if open.len() >= NESTING_LIMIT {
                            // prost's own words first (what the error said before this check).
                            return Err(format!(
                                "recursion limit reached: messages nested more than {NESTING_LIMIT} deep"
                            ));
                        }
                        // Its fields are read next, up to its end.
                        pos = start;
                        open.push((child, start + len as usize));
                        2 * struct_bytes(child)
                    }
                    Field::Bytes => 48 + len,
                    Field::Varint => 16 * len,
                    Field::Fixed => 2 * len,
                    Field::Unknown => 0,
                }
            }
            (3, _) => {
                groups += 1;
                0
            }
            (4, _) if groups > 0 => {
                groups -= 1;
                0
            }
            _ => return Err(format!("invalid wire type {wire} (field {tag})")),
        };
        total = total.saturating_add(cost);
    }
    Ok(total)
}

/// Product of dimensions as u128 (no overflow for any i64 list under 2^64 entries
/// that matters: it saturates); negative dimensions count as 0 (tract refuses them).
fn product(dims: &[i64]) -> u128 {
    dims.iter()
        .map(|&d| d.max(0) as u128)
        .fold(1u128, |p, d| p.saturating_mul(d))
}

/// The values of a small integer tensor (a shape, repeats), from raw_data or the typed
/// field; `None` for anything else (external data, other types, over 64 values).
fn ints(t: &pb::TensorProto) -> Option<Vec<i64>> {
    use pb::tensor_proto::DataType as D;
    let len = product(&t.dims);
    if len > 64 {
        return None;
    }
    let v: Vec<i64> = match D::try_from(t.data_type).ok()? {
        D::Int64 if !t.raw_data.is_empty() => t
            .raw_data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        D::Int64 => t.int64_data.clone(),
        D::Int32 if !t.raw_data.is_empty() => t
            .raw_data
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
            .collect(),
        D::Int32 => t.int32_data.iter().map(|&v| v as i64).collect(),
        _ => return None,
    };
    (v.len() as u128 == len).then_some(v)
}

/// One number of a scalar tensor, as f64.
fn scalar(t: &pb::TensorProto) -> Option<f64> {
    use pb::tensor_proto::DataType as D;
    if product(&t.dims) != 1 {
        return None;
    }
    let raw = |n: usize| t.raw_data.get(..n);
    Some(match D::try_from(t.data_type).ok()? {
        D::Float => match raw(4) {
            Some(b) => f32::from_le_bytes(b.try_into().ok()?) as f64,
            None => *t.float_data.first()? as f64,
        },
        D::Double => match raw(8) {
            Some(b) => f64::from_le_bytes(b.try_into().ok()?),
            None => *t.double_data.first()?,
        },
        D::Int64 => match raw(8) {
            Some(b) => i64::from_le_bytes(b.try_into().ok()?) as f64,
            None => *t.int64_data.first()? as f64,
        },
        D::Int32 => match raw(4) {
            Some(b) => i32::from_le_bytes(b.try_into().ok()?) as f64,
            None => *t.int32_data.first()? as f64,
        },
        _ => return None,
    })
}

/// Elements of `Range(start, limit, delta)`: max(ceil((limit - start) / delta), 0).
fn range_len(
    start: &pb::TensorProto,
    limit: &pb::TensorProto,
    delta: &pb::TensorProto,
) -> Option<u128> {
    let (s, l, d) = (scalar(start)?, scalar(limit)?, scalar(delta)?);
    let n = ((l - s) / d).ceil();
    if n.is_nan() {
        // delta 0 (or infinities): tract refuses it; it is no size to check.
        return None;
    }
    Some(if n <= 0.0 {
        0
    } else if n >= 1e30 {
        u128::MAX
    } else {
        n as u128
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int64s(name: &str, v: &[i64]) -> pb::TensorProto {
        pb::TensorProto {
            name: name.into(),
            data_type: pb::tensor_proto::DataType::Int64 as i32,
            dims: vec![v.len() as i64],
            int64_data: v.to_vec(),
            ..Default::default()
        }
    }

    fn model(op: &str, inputs: &[&str], inits: Vec<pb::TensorProto>) -> pb::ModelProto {
        pb::ModelProto {
            ir_version: 8,
            graph: Some(pb::GraphProto {
                node: vec![pb::NodeProto {
                    name: "n".into(),
                    op_type: op.into(),
                    input: inputs.iter().map(|s| s.to_string()).collect(),
                    output: vec!["y".into()],
                    ..Default::default()
                }],
                initializer: inits,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn constant_of_shape_beyond_the_limit_is_refused_naming_the_node() {
        let m = model(
            "ConstantOfShape",
            &["s"],
            vec![int64s("s", &[1 << 20, 1 << 20])],
        );
        let e = check_constant_sizes(&m, "m.onnx").unwrap_err().to_string();
        assert!(
            e.contains("m.onnx: node 'n' (ConstantOfShape)")
                && e.contains("1099511627776 elements"),
            "{e}"
        );
        let ok = model("ConstantOfShape", &["s"], vec![int64s("s", &[64, 64])]);
        assert!(check_constant_sizes(&ok, "m.onnx").is_ok());
    }

    #[test]
    fn a_graph_output_nothing_defines_is_refused() {
        // What the denoiser_load fuzz target found: tract's parser panicked on it.
        let mut m = model("Mul", &["x", "x"], vec![]);
        let g = m.graph.as_mut().unwrap();
        g.output = vec![pb::ValueInfoProto {
            name: "{".into(),
            ..Default::default()
        }];
        let e = check_constant_sizes(&m, "m.onnx").unwrap_err().to_string();
        assert!(e.contains("m.onnx: graph '': output '{' is not"), "{e}");
        // Defined by a node, an input or an initializer: fine.
        for defined in ["y", "x0", "s"] {
            let mut ok = model("Mul", &["x", "x"], vec![int64s("s", &[1])]);
            let g = ok.graph.as_mut().unwrap();
            g.input = vec![pb::ValueInfoProto {
                name: "x0".into(),
                ..Default::default()
            }];
            g.output = vec![pb::ValueInfoProto {
                name: defined.into(),
                ..Default::default()
            }];
            assert!(check_constant_sizes(&ok, "").is_ok(), "{defined}");
        }
    }

    #[test]
    fn expand_tile_and_range_beyond_the_limit_are_refused() {
        let big = int64s("s", &[1 << 16, 1 << 16, 1 << 16]);
        assert!(
            check_constant_sizes(&model("Expand", &["x", "s"], vec![big.clone()]), "").is_err()
        );
        assert!(check_constant_sizes(&model("Tile", &["x", "s"], vec![big]), "").is_err());
        let scalar = |n: &str, v: i64| pb::TensorProto {
            dims: vec![],
            ..int64s(n, &[v])
        };
        let range = model(
            "Range",
            &["a", "b", "c"],
            vec![scalar("a", 0), scalar("b", i64::MAX), scalar("c", 1)],
        );
        assert!(check_constant_sizes(&range, "").is_err());
        let small = model(
            "Range",
            &["a", "b", "c"],
            vec![scalar("a", 0), scalar("b", 1000), scalar("c", 1)],
        );
        assert!(check_constant_sizes(&small, "").is_ok());
    }

    /// `Gather(Shape(a), index)` where `a` comes from an input declared with `rank`
    /// dimensions through a GroupNorm as exports write it (Reshape to a constant shape,
    /// InstanceNormalization, Reshape back to `Shape(c)`), as the fuzz finding had it.
    fn gather_of_shape(rank: usize, index: i64) -> pb::ModelProto {
        let node = |op: &str, inputs: &[&str], output: &str| pb::NodeProto {
            name: format!("{op}_node"),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        };
        let dims = (0..rank)
            .map(|_| pb::tensor_shape_proto::Dimension::default())
            .collect();
        let tensor = pb::type_proto::Tensor {
            elem_type: 1,
            shape: Some(pb::TensorShapeProto { dim: dims }),
        };
        let scalar = pb::TensorProto {
            dims: vec![],
            ..int64s("i", &[index])
        };
        pb::ModelProto {
            ir_version: 8,
            graph: Some(pb::GraphProto {
                input: vec![pb::ValueInfoProto {
                    name: "x".into(),
                    r#type: Some(pb::TypeProto {
                        value: Some(pb::type_proto::Value::TensorType(tensor)),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                node: vec![
                    node("Conv", &["x", "w"], "c"),
                    node("Reshape", &["c", "k3"], "r3"),
                    node("InstanceNormalization", &["r3", "g", "b"], "n3"),
                    node("Shape", &["c"], "sc"),
                    node("Reshape", &["n3", "sc"], "r4"),
                    node("Add", &["r4", "r4"], "a"),
                    node("Shape", &["a"], "s"),
                    node("Gather", &["s", "i"], "y"),
                ],
                initializer: vec![scalar, int64s("k3", &[0, 8, -1])],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn pow_of_an_integer_shape_value_with_a_float_exponent_is_refused() {
        // What the denoiser_load fuzz target found: Pow(Cast(x, to=INT64), -0.5) panicked
        // in tract's loading.
        let pow = |to: i64, exponent_type: i32| {
            let mut m = model("Pow", &["c", "e"], vec![]);
            let g = m.graph.as_mut().unwrap();
            g.node.insert(
                0,
                pb::NodeProto {
                    name: "cast".into(),
                    op_type: "Cast".into(),
                    input: vec!["x".into()],
                    output: vec!["c".into()],
                    attribute: vec![pb::AttributeProto {
                        name: "to".into(),
                        i: to,
                        r#type: pb::attribute_proto::AttributeType::Int as i32,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            );
            g.initializer.push(pb::TensorProto {
                name: "e".into(),
                data_type: exponent_type,
                raw_data: vec![0, 0, 0, 0xbf],
                ..Default::default()
            });
            m
        };
        let e = check_constant_sizes(&pow(7, 1), "m.onnx")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m.onnx: node 'n' (Pow): its base 'c' is an integer (from Cast 'cast')"),
            "{e}"
        );
        // A float Cast, or an integer exponent, loads.
        assert!(check_constant_sizes(&pow(1, 1), "").is_ok());
        assert!(check_constant_sizes(&pow(7, 6), "").is_ok());
    }

    #[test]
    fn a_gather_beyond_a_known_shape_is_refused() {
        // What the denoiser_load fuzz target found: tract's analysis evaluated
        // Gather(Shape(x), 57) on a rank-4 x and indexed out of bounds.
        let e = check_constant_sizes(&gather_of_shape(4, 57), "m.onnx")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m.onnx: node 'Gather_node' (Gather): index 57 is outside the 4 entries"),
            "{e}"
        );
        assert!(check_constant_sizes(&gather_of_shape(4, -5), "").is_err());
        for ok in [0, 3, -1, -4] {
            assert!(
                check_constant_sizes(&gather_of_shape(4, ok), "").is_ok(),
                "{ok}"
            );
        }
        // Rank unknown (no declared shape): nothing is refused on a guess.
        let mut unknown = gather_of_shape(4, 57);
        unknown.graph.as_mut().unwrap().input[0].r#type = None;
        assert!(check_constant_sizes(&unknown, "").is_ok());
        // A constant's own extent counts too.
        let mut konst = model("Gather", &["d", "i"], vec![int64s("d", &[1, 2, 3])]);
        konst
            .graph
            .as_mut()
            .unwrap()
            .initializer
            .push(int64s("i", &[3]));
        let e = check_constant_sizes(&konst, "").unwrap_err().to_string();
        assert!(
            e.contains("index 3 is outside the 3 entries of axis 0"),
            "{e}"
        );
    }
}
