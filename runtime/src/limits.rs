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
/// Tile, Range) would produce more than [`MAX_CONSTANT_ELEMENTS`] elements. Subgraphs
/// (If / Loop / Scan bodies) are checked too, without recursion.
pub fn check_constant_sizes(proto: &pb::ModelProto, name: &str) -> Result<()> {
    let Some(graph) = &proto.graph else {
        return Ok(());
    };
    let mut pending: Vec<&pb::GraphProto> = vec![graph];
    while let Some(g) = pending.pop() {
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
                let prefix = if name.is_empty() {
                    String::new()
                } else {
                    format!("{name}: ")
                };
                return Err(Error::InvalidModel(format!(
                    "{prefix}node '{}' ({}): its output would hold {e} elements, more than the {MAX_CONSTANT_ELEMENTS} a value computed at load time may have",
                    n.name, n.op_type
                )));
            }
        }
    }
    Ok(())
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
}
