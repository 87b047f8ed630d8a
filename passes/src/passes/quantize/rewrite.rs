//! quantize's graph rewrites: the step scalar and group index the per-step scales are
//! gathered at, int32 biases, the narrowing Clip and the Q/DQ pairs themselves.

use super::*;

/// The first sample's position of t in S from fold-tib's `index`, as a scalar (a
/// sampling batch shares its step).
pub(super) fn add_step_scalar(g: &mut Graph, index: &str) -> Result<String> {
    let flat_shape = g.add_initializer("fsc/flat", Tensor::from_vec(vec![1], &[-1i64]));
    let flat = g.add_op(
        "Reshape",
        vec![index.to_string(), flat_shape],
        "fsc/step_index_flat",
        vec![],
    )?;
    let zero = g.add_initializer("fsc/first", Tensor::scalar(0i64));
    g.add_op(
        "Gather",
        vec![flat, zero],
        "fsc/step_index",
        vec![attr::int("axis", 0)],
    )
}

/// The group among `groups` of the step at position `first` of S (|S| = `len`), as a
/// scalar: `first · groups / len`. A position ≥ `len` (a `t` outside S) gives a group ≥
/// `groups`, which the scale tables' Gather and the runtime refuse.
pub(super) fn add_group_index(
    g: &mut Graph,
    first: &str,
    groups: usize,
    len: usize,
) -> Result<String> {
    let first = first.to_string();
    if groups == len {
        return Ok(first);
    }
    let n = g.add_initializer(
        &format!("fsc/groups_{groups}"),
        Tensor::scalar(groups as i64),
    );
    let l = g.add_initializer("fsc/set_size", Tensor::scalar(len as i64));
    let scaled = g.add_op(
        "Mul",
        vec![first, n],
        &format!("fsc/step_times_{groups}"),
        vec![],
    )?;
    g.add_op(
        "Div",
        vec![scaled, l],
        &format!("fsc/group_of_{groups}"),
        vec![],
    )
}

/// A constant f32 initializer read by slot `slot` of the DequantizeLinear producing
/// `value` (its scale).
pub(super) fn dq_scale(g: &Graph, value: &str) -> Option<Vec<f32>> {
    let (p, _) = g.producer(value)?;
    let dq = g.node(p);
    if !dq.is_onnx_op("DequantizeLinear") {
        return None;
    }
    let t = g.initializers.get(dq.inputs.get(1)?)?;
    if t.dtype != DType::F32 {
        return None;
    }
    t.to_vec::<f32>().ok()
}

/// Rewrites the float bias of every quantized Conv and Gemm whose input and weight are
/// quantized with constant scales as `DequantizeLinear(int32, s_x · s_w[c], 0, axis 0)`:
/// onnxruntime fuses a Conv (QLinearConv) or Gemm (QGemm) only when every input comes from
/// DequantizeLinear, the bias as int32. The bias moves by at most half a step of the
/// accumulator (s_x · s_w[c] / 2). Returns how many were rewritten.
pub(super) fn int32_biases(
    g: &mut Graph,
    quantized: &[crate::analysis::targets::Target],
) -> Result<usize> {
    let mut done = 0;
    for t in quantized {
        if !(t.op == "Conv" || t.op == "Gemm") || t.weight.is_none() {
            continue;
        }
        let Some(ix) = g.node_indices().find(|&ix| g.node(ix).name == t.node) else {
            continue;
        };
        let n = g.node(ix);
        let Some(b) = n.inputs.get(2).filter(|b| !b.is_empty()).cloned() else {
            continue;
        };
        if t.op == "Gemm" && n.attr_float("beta").unwrap_or(1.0) != 1.0 {
            continue;
        }
        let (Some(sx), Some(sw)) = (dq_scale(g, &n.inputs[0]), dq_scale(g, &n.inputs[1])) else {
            continue;
        };
        let Some(bias) = g.initializers.get(&b).filter(|t| t.dtype == DType::F32) else {
            continue;
        };
        let channels = if sw.len() > 1 { sw.len() } else { bias.numel() };
        if sx.len() != 1 || bias.shape != [channels] {
            continue;
        }
        let values = bias.to_vec::<f32>()?;
        let scales: Vec<f32> = (0..channels)
            .map(|c| sx[0] * sw[if sw.len() > 1 { c } else { 0 }])
            .collect();
        let q: Option<Vec<i32>> = values
            .iter()
            .zip(&scales)
            .map(|(&v, &s)| {
                let r = (v as f64 / s as f64).round();
                (s > 0.0 && r.abs() < i32::MAX as f64).then_some(r as i32)
            })
            .collect();
        let Some(q) = q else { continue };
        let base = format!("{}_bias", t.node.trim_start_matches('/'));
        let qi = g.add_initializer(
            &format!("{base}_quantized"),
            Tensor::from_vec(vec![channels], &q),
        );
        let sc = g.add_initializer(
            &format!("{base}_scale"),
            Tensor::from_vec(vec![channels], &scales),
        );
        let zp = g.add_initializer(
            &format!("{base}_zero_point"),
            Tensor::from_vec(vec![channels], &vec![0i32; channels]),
        );
        let dq = g.add_op(
            "DequantizeLinear",
            vec![qi, sc, zp],
            &format!("{base}_dequantized"),
            vec![attr::int("axis", 0)],
        )?;
        g.set_input(ix, 2, &dq);
        done += 1;
    }
    Ok(done)
}

/// Below 8 bits, a clip to the interval the narrower quantizer represents, so that the
/// uint8 QuantizeLinear behind it (which saturates only at 0 and 255) stays on the
/// `bits`-bit grid for values beyond the calibrated range; returns the value to
/// quantize. One scale: a constant Clip. Scales per step group: the group's bounds
/// gathered at `group` (the index the scales are gathered at), as `Max(Min(x, hi[g]),
/// lo[g])` (Min/Max take tensor bounds in every runtime; the quantizer after it keeps
/// the per-step form the runtime lowers).
pub(super) fn narrow_to_bits(
    g: &mut Graph,
    value: &str,
    scales: &[f32],
    zp: u8,
    bits: u32,
    group: Option<&str>,
) -> Result<String> {
    if bits >= 8 {
        return Ok(value.to_string());
    }
    let base = value.trim_start_matches('/');
    let (Some(group), true) = (group, scales.len() > 1) else {
        let (lo, hi) = act_clip(scales[0], zp, bits);
        let lo = g.add_initializer(&format!("{base}_clip_min"), Tensor::scalar(lo));
        let hi = g.add_initializer(&format!("{base}_clip_max"), Tensor::scalar(hi));
        return g.add_op(
            "Clip",
            vec![value.to_string(), lo, hi],
            &format!("{base}_clipped"),
            vec![],
        );
    };
    let (lo, hi): (Vec<f32>, Vec<f32>) = scales.iter().map(|&s| act_clip(s, zp, bits)).unzip();
    let mut bound = |name: &str, v: Vec<f32>| -> Result<String> {
        let n = v.len();
        let t = g.add_initializer(&format!("{base}_{name}s"), Tensor::from_vec(vec![n], &v));
        g.add_op(
            "Gather",
            vec![t, group.to_string()],
            &format!("{base}_{name}"),
            vec![attr::int("axis", 0)],
        )
    };
    let lo = bound("clip_min", lo)?;
    let hi = bound("clip_max", hi)?;
    let below = g.add_op(
        "Min",
        vec![value.to_string(), hi],
        &format!("{base}_below_max"),
        vec![],
    )?;
    g.add_op("Max", vec![below, lo], &format!("{base}_clipped"), vec![])
}
