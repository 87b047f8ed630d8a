//! The file form of 4-bit weights: ONNX INT4 (two values a byte, low nibble first,
//! −8..=7) behind opset-21 `DequantizeLinear`, with the model's opset raised to 21
//! ([`crate::ir::opset::upgrade`]). Run last in `quantize`: the passes before it (int32
//! biases, output Q/DQ, their evaluations) see the int8 form, whose values are the same.

use crate::error::{Error, Result};
use crate::ir::opset::{self, INT4_OPSET};
use crate::ir::{DType, Model, Tensor};

/// Ops whose weight input a packed weight may feed.
const WEIGHT_READERS: &[&str] = &["Conv", "Gemm", "MatMul", "Einsum"];

/// What [`pack_int4_weights`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Int4Packing {
    /// Weight initializers now INT4.
    pub weights: usize,
    /// Their bytes before and after.
    pub bytes_int8: usize,
    pub bytes_int4: usize,
    /// The nodes the opset upgrade rewrote (one line each).
    pub opset_rewrites: Vec<String>,
}

/// Every int8 weight behind a per-tensor or per-axis `DequantizeLinear` with zero point 0
/// whose values fit −8..=7 and which only Conv / Gemm / MatMul / Einsum read becomes
/// INT4 (its zero point too, as opset 21 wants it of the weight's type), and the model's
/// opset goes to 21. Nothing is packed, and the opset stays, when the model has no such
/// weight; a model the upgrade refuses is an error naming `--int4-storage int8`.
pub fn pack_int4_weights(model: &mut Model) -> Result<Int4Packing> {
    let g = &model.graph;
    let mut chosen = vec![];
    for ix in g.node_indices() {
        let n = g.node(ix);
        if !n.is_onnx_op("DequantizeLinear") || n.attr("block_size").is_some() {
            continue;
        }
        let Some(w) = g.initializers.get(&n.inputs[0]) else {
            continue;
        };
        if w.dtype != DType::I8 {
            continue;
        }
        let zp = n.inputs.get(2).filter(|z| !z.is_empty());
        let zp_ok = match zp {
            None => true,
            Some(z) => g
                .initializers
                .get(z)
                .is_some_and(|t| t.dtype == DType::I8 && t.data.iter().all(|&b| b == 0)),
        };
        let readers = g.consumers(&n.outputs[0]);
        let weight_use = !readers.is_empty()
            && !g.is_graph_output(&n.outputs[0])
            && readers
                .iter()
                .all(|&(r, _)| WEIGHT_READERS.iter().any(|op| g.node(r).is_onnx_op(op)));
        let in_range = w.data.iter().all(|&b| (-8..=7).contains(&(b as i8)));
        if zp_ok && weight_use && in_range {
            chosen.push(ix);
        }
    }
    if chosen.is_empty() {
        return Ok(Int4Packing::default());
    }
    let opset_rewrites = opset::upgrade(model, INT4_OPSET).map_err(|e| {
        Error::pass(
            "quantize",
            format!("packed INT4 weights need opset {INT4_OPSET}: {e}; --int4-storage int8 keeps the model's opset (4-bit levels in int8)"),
        )
    })?;
    let g = &mut model.graph;
    let mut out = Int4Packing {
        opset_rewrites,
        ..Default::default()
    };
    for ix in chosen {
        let n = g.node(ix).clone();
        let w = &g.initializers[&n.inputs[0]];
        let values: Vec<i8> = w.data.iter().map(|&b| b as i8).collect();
        let packed = tfmqc_runtime::int4::pack_i4(&values).expect("checked: values fit int4");
        out.bytes_int8 += values.len();
        out.bytes_int4 += packed.len();
        let shape = w.shape.clone();
        let shared = g.consumers(&n.inputs[0]).len() > 1;
        let t = Tensor::from_raw(DType::I4, shape, packed)?;
        if shared {
            // Another reader keeps the int8 tensor; this one reads a packed copy.
            let name = g.add_initializer(&n.inputs[0], t);
            g.set_input(ix, 0, &name);
        } else {
            g.initializers.insert(n.inputs[0].clone(), t);
        }
        if let Some(z) = n.inputs.get(2).filter(|z| !z.is_empty()) {
            let t = &g.initializers[z];
            let zeros = vec![0u8; DType::I4.storage_bytes(t.numel())];
            let packed = Tensor::from_raw(DType::I4, t.shape.clone(), zeros)?;
            if g.consumers(z).len() > 1 {
                let name = g.add_initializer(z, packed);
                g.set_input(ix, 2, &name);
            } else {
                g.initializers.insert(z.clone(), packed);
            }
        }
        out.weights += 1;
    }
    g.remove_dead();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{attr, Dim, Graph, Node, ValueInfo};

    /// `y_i = MatMul(x, DequantizeLinear(w_i, s, zp_i))` for each weight given.
    fn model(weights: &[(&str, Vec<i8>)]) -> Model {
        let mut g = Graph::new("m");
        g.inputs.push(ValueInfo::new(
            "x",
            DType::F32,
            vec![Dim::Known(1), Dim::Known(3)],
        ));
        g.initializers
            .insert("s".into(), Tensor::from_vec(vec![2], &[0.5f32, 0.25]));
        for (name, w) in weights {
            g.initializers
                .insert((*name).into(), Tensor::from_vec(vec![3, 2], w));
            let zp = format!("{name}_zp");
            g.initializers
                .insert(zp.clone(), Tensor::from_vec(vec![2], &[0i8, 0]));
            let dq = format!("{name}_dq");
            let y = format!("{name}_y");
            g.add_node(
                Node::new(
                    format!("{name}/dq"),
                    "DequantizeLinear",
                    vec![(*name).into(), "s".into(), zp],
                    vec![dq.clone()],
                )
                .with_attr(attr::int("axis", 1)),
            )
            .unwrap();
            g.add_node(Node::new(
                format!("{name}/mm"),
                "MatMul",
                vec!["x".into(), dq],
                vec![y.clone()],
            ))
            .unwrap();
            g.outputs.push(ValueInfo {
                name: y,
                ..Default::default()
            });
        }
        Model {
            ir_version: 8,
            opsets: vec![(String::new(), 17)],
            graph: g,
            ..Default::default()
        }
    }

    #[test]
    fn weights_in_int4_range_are_packed_and_the_opset_raised() {
        let mut m = model(&[
            ("a", vec![-8, 7, 0, 1, -1, 3]),
            ("b", vec![8, 0, 0, 0, 0, 0]),
        ]);
        let p = pack_int4_weights(&mut m).unwrap();
        assert_eq!(p.weights, 1);
        assert_eq!((p.bytes_int8, p.bytes_int4), (6, 3));
        let g = &m.graph;
        let a = &g.initializers["a"];
        assert_eq!(a.dtype, DType::I4);
        assert_eq!(a.to_f64_lossy().unwrap(), vec![-8., 7., 0., 1., -1., 3.]);
        assert_eq!(g.initializers["a_zp"].dtype, DType::I4);
        // 8 leaves int4: that weight keeps its int8 form (valid at opset 21 too).
        assert_eq!(g.initializers["b"].dtype, DType::I8);
        assert_eq!(g.initializers["b_zp"].dtype, DType::I8);
        assert_eq!(m.onnx_opset(), INT4_OPSET);
        assert!(m.ir_version >= opset::INT4_IR_VERSION);
    }

    #[test]
    fn nothing_to_pack_leaves_the_model_alone() {
        let mut m = model(&[("b", vec![8, 0, 0, 0, 0, 0])]);
        assert_eq!(pack_int4_weights(&mut m).unwrap(), Int4Packing::default());
        assert_eq!(m.onnx_opset(), 17);
    }
}
