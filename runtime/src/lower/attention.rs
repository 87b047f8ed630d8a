//! Attention (two quantized products around a softmax) as one `TfmqcQAttention` node ([`crate::ops::attention`] has the pattern and the op).

use tract_onnx::pb;

use super::matmul::{einsum_rank, product_form};
use super::qdq::activation_qdq;
use super::{Index, Rewrite};
use crate::attr;
use crate::kernels::int8::ScoreScale;
use crate::ops::attention::QATTENTION;

/// Whether fused attention is on: `TFMQC_FUSE_ATTENTION=0` turns it off (read once per
/// process), e.g. to measure the unfused graph.
fn fusion_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TFMQC_FUSE_ATTENTION").as_deref() != Ok("0"))
}

/// A constant scalar f32 `c` of `Mul(s, c)`, `Mul(c, s)` or `Div(s, c)`: the other input
/// and the scale.
fn score_scale<'g>(ix: &Index<'g>, n: &'g pb::NodeProto) -> Option<(&'g str, ScoreScale)> {
    if n.input.len() != 2 {
        return None;
    }
    let scalar = |name: &str| ix.f32s(name).filter(|v| v.len() == 1).map(|v| v[0]);
    match n.op_type.as_str() {
        "Mul" => match (scalar(&n.input[0]), scalar(&n.input[1])) {
            (None, Some(c)) => Some((&n.input[0], ScoreScale::Mul(c))),
            (Some(c), None) => Some((&n.input[1], ScoreScale::Mul(c))),
            _ => None,
        },
        "Div" => Some((&n.input[0], ScoreScale::Div(scalar(&n.input[1])?))),
        _ => None,
    }
}

/// The `P·V` product of an attention (see the module documentation) as a
/// `TfmqcQAttention` node reading the sources of Q, Kᵀ and V.
pub(crate) fn match_attention(ix: &Index, n: &pb::NodeProto) -> Option<Rewrite> {
    if !fusion_enabled() {
        return None;
    }
    let form = product_form(n)?;
    let x = activation_qdq(ix, &n.input[0])?;
    let y = activation_qdq(ix, &n.input[1])?;
    let softmax = |src: &str| ix.producer(src).filter(|p| p.op_type == "Softmax");
    // P must be read along its last axis (the one the softmax normalizes): as the left
    // operand stored [M, K], or as the right one stored [N, K] (then Oᵀ = P·Xᵀ).
    let (p_in, p, v, v_t, out_t, sm) =
        if let Some(sm) = softmax(&x.0).filter(|_| !form.x_transposed) {
            (
                &n.input[0],
                x,
                y,
                form.y_transposed,
                form.out_transposed,
                sm,
            )
        } else if let Some(sm) = softmax(&y.0).filter(|_| form.y_transposed) {
            (
                &n.input[1],
                y,
                x,
                !form.x_transposed,
                !form.out_transposed,
                sm,
            )
        } else {
            return None;
        };
    // Every intermediate feeds only the next node of the pattern.
    let p_q = ix.producer(ix.producer(p_in)?.input.first()?)?;
    if !(ix.read_once(p_in) && ix.read_once(&p_q.output[0]) && ix.read_once(&sm.output[0])) {
        return None;
    }
    let (product, score) = {
        let s = ix.producer(sm.input.first()?)?;
        if !ix.read_once(&s.output[0]) {
            return None;
        }
        match score_scale(ix, s) {
            Some((inner, scale)) => {
                let prod = ix.producer(inner)?;
                (ix.read_once(&prod.output[0]) && prod.output[0] == inner)
                    .then_some((prod, scale))?
            }
            None => (s, ScoreScale::None),
        }
    };
    let sf = product_form(product)?;
    // The softmax axis is the scores' last one.
    let axis = sm.attribute.iter().find(|a| a.name == "axis")?.i;
    if axis != -1 && Some(axis) != einsum_rank(product).map(|r| r as i64 - 1) {
        return None;
    }
    let a = activation_qdq(ix, &product.input[0])?;
    let b = activation_qdq(ix, &product.input[1])?;
    // Scores stored transposed are the product of the swapped operands (as in
    // `match_matmul`).
    let (q, k, q_t, k_t) = if sf.out_transposed {
        (b, a, !sf.y_transposed, !sf.x_transposed)
    } else {
        (a, b, sf.x_transposed, sf.y_transposed)
    };
    let mut node = pb::NodeProto {
        name: format!("{}/int8_attention", n.name),
        op_type: QATTENTION.into(),
        domain: "ai.tfmqc".into(),
        input: vec![q.0.clone(), k.0.clone(), v.0.clone()],
        output: vec![n.output[0].clone()],
        ..Default::default()
    };
    let mut attrs = vec![];
    for (name, (_, scale, zp), t) in [("q", &q, q_t), ("k", &k, k_t), ("v", &v, v_t)] {
        attrs.push(attr::float(&format!("{name}_scale"), *scale));
        attrs.push(attr::int(&format!("{name}_zero_point"), *zp as i64));
        attrs.push(attr::int(&format!("{name}_transposed"), t as i64));
    }
    match score {
        ScoreScale::None => {}
        ScoreScale::Mul(c) => attrs.push(attr::float("score_mul", c)),
        ScoreScale::Div(c) => attrs.push(attr::float("score_div", c)),
    }
    attrs.push(attr::float("p_scale", p.1));
    attrs.push(attr::int("p_zero_point", p.2 as i64));
    attrs.push(attr::int("out_transposed", out_t as i64));
    node.attribute = attrs;
    Some(Rewrite { node, weight: None })
}
