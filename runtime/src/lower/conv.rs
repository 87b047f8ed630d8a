//! `Conv` behind activation and weight quantizers as a `TfmqcQConv` node ([`crate::ops::conv`] has the pattern and the op).

use tract_onnx::pb;

use super::qdq::activation_qdq_steps;
use super::{Index, Rewrite};
use crate::attr;
use crate::ops::conv::QCONV;

/// A `Conv` fed by activation Q/DQ and an int8 weight behind DequantizeLinear (constant
/// scales, zero point 0, per tensor or per output channel) as a `TfmqcQConv` node; the
/// weight initializer is named, to be moved into the node ([`crate::lower`]).
pub(crate) fn match_conv(ix: &Index, n: &pb::NodeProto) -> Option<Rewrite> {
    if n.op_type != "Conv" || n.input.len() < 2 {
        return None;
    }
    let mut act = activation_qdq_steps(ix, &n.input[0])?;
    let (w, w_scale) = {
        let dq = ix
            .producer(&n.input[1])
            .filter(|p| p.op_type == "DequantizeLinear")?;
        // [O, C/g, kh, kw] or, for a 1-D convolution, [O, C/g, k].
        let w = ix.initializer(&dq.input[0]).filter(|t| {
            crate::ops::is_int8_or_int4(t) && (t.dims.len() == 3 || t.dims.len() == 4)
        })?;
        let scale = ix.f32s(dq.input.get(1)?)?;
        let zero = match dq.input.get(2).filter(|z| !z.is_empty()) {
            Some(z) => ix.bytes(z)?,
            None => vec![],
        };
        let axis = attr::int_or(dq, "axis", 1);
        (zero.iter().all(|&z| z == 0)
            && (axis == 0 || scale.len() == 1)
            && (scale.len() == 1 || scale.len() == w.dims[0] as usize))
            .then_some((w, scale))?
    };
    let bias = match n.input.get(2).filter(|b| !b.is_empty()) {
        Some(b) => Some(ix.f32s(b)?),
        None => None,
    };
    let get = |name: &str| n.attribute.iter().find(|a| a.name == name);
    if get("auto_pad").is_some_and(|a| a.s != b"NOTSET") {
        return None;
    }
    // 1-D convolutions (e.g. attention's QKV projections) run as 2-D ones of height 1:
    // their attributes are written in 2-D form.
    let conv1d = w.dims.len() == 3;
    let ints = |name: &str, d: Vec<i64>| {
        let v = get(name).map(|a| a.ints.clone()).unwrap_or(d);
        match (conv1d, name) {
            (true, "pads") if v.len() == 2 => vec![0, v[0], 0, v[1]],
            (true, _) if v.len() == 1 => vec![1, v[0]],
            _ => v,
        }
    };
    let spatial = if conv1d { 1 } else { 2 };
    let out_ch = w.dims[0] as usize;
    let w_scale = if w_scale.len() == 1 {
        vec![w_scale[0]; out_ch]
    } else {
        w_scale
    };
    let group = get("group").map(|a| a.i).unwrap_or(1);
    // A per-channel constant Mul before the quantizer (TCR) is folded in.
    let channels = w.dims[1] as usize * group.max(1) as usize;
    let prescale = super::prescale::fold_channel_scale(ix, &mut act, channels, w.dims.len());
    let mut node = pb::NodeProto {
        name: format!("{}/int8", n.name),
        op_type: QCONV.into(),
        domain: "ai.tfmqc".into(),
        input: act.inputs(),
        output: vec![n.output[0].clone()],
        ..Default::default()
    };
    let mut a = act.attributes();
    a.push(attr::floats("w_scale", w_scale));
    a.extend(bias.map(|b| attr::floats("bias", b)));
    for (name, default) in [
        ("pads", vec![0i64; 2 * spatial]),
        ("strides", vec![1; spatial]),
        ("dilations", vec![1; spatial]),
    ] {
        a.push(attr::ints(name, ints(name, default)));
    }
    a.push(attr::int("group", group));
    a.extend(prescale);
    node.attribute = a;
    Some(Rewrite {
        node,
        weight: Some(w.name.clone()),
    })
}
