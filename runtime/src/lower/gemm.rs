//! `Gemm` / `MatMul` with a constant int8 weight as a `TfmqcQGemm` node ([`crate::ops::gemm`] has the pattern and the op).

use tract_onnx::pb;

use super::qdq::activation_qdq_steps;
use super::{Index, Rewrite};
use crate::attr;
use crate::ops::gemm::QGEMM;

/// A `Gemm` / `MatMul` whose first input comes through activation Q/DQ and whose second
/// is a constant int8 weight behind DequantizeLinear (zero point 0, scales per tensor or
/// per output column) as a `TfmqcQGemm` node. `Gemm` needs `transA = 0`, `alpha = 1` and
/// a constant `C` (a scalar or one value per column).
pub(crate) fn match_gemm(ix: &Index, n: &pb::NodeProto) -> Option<Rewrite> {
    let gemm = n.op_type == "Gemm";
    if !(gemm || n.op_type == "MatMul") || n.input.len() < 2 {
        return None;
    }
    if gemm && (attr::int_or(n, "transA", 0) != 0 || attr::float_or(n, "alpha", 1.0) != 1.0) {
        return None;
    }
    let trans_b = gemm && attr::int_or(n, "transB", 0) == 1;
    let mut act = activation_qdq_steps(ix, &n.input[0])?;
    let (w, w_scale) = {
        let dq = ix
            .producer(&n.input[1])
            .filter(|p| p.op_type == "DequantizeLinear")?;
        let w = ix
            .initializer(&dq.input[0])
            .filter(|t| crate::ops::is_int8_or_int4(t) && t.dims.len() == 2)?;
        let scale = ix.f32s(dq.input.get(1)?)?;
        let zero = match dq.input.get(2).filter(|z| !z.is_empty()) {
            Some(z) => ix.bytes(z)?,
            None => vec![],
        };
        // The output-channel axis of W: 0 for W[N, K], 1 for W[K, N].
        let n_axis = if trans_b { 0 } else { 1 };
        let n_out = w.dims[n_axis] as usize;
        let axis = attr::int_or(dq, "axis", 1);
        let axis = if axis < 0 { axis + 2 } else { axis };
        if !(zero.iter().all(|&z| z == 0)
            && (scale.len() == 1 || (scale.len() == n_out && axis == n_axis as i64)))
        {
            return None;
        }
        let s = if scale.len() == 1 {
            vec![scale[0]; n_out]
        } else {
            scale
        };
        (w, s)
    };
    let n_out = w_scale.len();
    let bias = match n.input.get(2).filter(|c| gemm && !c.is_empty()) {
        None => None,
        Some(c) => {
            let t = ix.initializer(c)?;
            let c = ix.f32s(c)?;
            let beta = attr::float_or(n, "beta", 1.0);
            // C broadcasts over the rows only as a scalar, [N] or [1, N]: a per-row
            // C ([M, 1], [M, N]) is not a bias of the output channels.
            let row = t.dims.last().map_or(1, |&d| d as usize) == c.len()
                && t.dims.iter().rev().skip(1).all(|&d| d == 1);
            match c.len() {
                1 => Some(vec![beta * c[0]; n_out]),
                l if l == n_out && row => Some(c.iter().map(|v| beta * v).collect()),
                _ => return None,
            }
        }
    };
    // A constant Mul by one factor per input column before the quantizer (TCR) is folded
    // in.
    let k = w.dims[if trans_b { 1 } else { 0 }] as usize;
    let prescale = super::prescale::fold_last_axis_scale(ix, &mut act, k);
    let mut node = pb::NodeProto {
        name: format!("{}/int8", n.name),
        op_type: QGEMM.into(),
        domain: "ai.tfmqc".into(),
        input: act.inputs(),
        output: vec![n.output[0].clone()],
        ..Default::default()
    };
    node.attribute = vec![attr::int("trans_b", trans_b as i64)];
    node.attribute.extend(act.attributes());
    node.attribute.push(attr::floats("w_scale", w_scale));
    node.attribute.extend(bias.map(|b| attr::floats("bias", b)));
    node.attribute.extend(prescale);
    Some(Rewrite {
        node,
        weight: Some(w.name.clone()),
    })
}
