//! Attention as one op on the int8 kernels ([`crate::kernels::int8::attention_quantize`]):
//!
//! ```text
//! S = MatMul(DQ(Q(q, sq, zq)), DQ(Q(kᵀ, sk, zk)))        (or a matrix-product Einsum)
//! S' = S, or Mul(S, c) / Div(S, c) with a constant scalar c
//! P = Softmax(S', axis = last)
//! O = MatMul(DQ(Q(P, sp, zp)), DQ(Q(v, sv, zv)))          (or Einsum; P on either side)
//! ```
//!
//! with constant per-tensor scales, every intermediate read only by the next node, becomes
//! one `TfmqcQAttention` node reading `q`, `kᵀ` and `v`. It runs row blocks of the score
//! matrix through the exact int8 products and a vectorized softmax, so the `[M, N]` scores
//! (1 GB at SD-1.5's latent 64) are never written whole, and the softmax, the quantizer of
//! P and both products split over the threads together.
//!
//! The integer parts are exact and dequantized as the unfused `TfmqcQMatMul` nodes do; the
//! softmax is f32 with its own `exp` (within 2 ulp) and summation order, so a code of P
//! can differ by one step from the unfused graph's where the softmax value lies within a
//! few ulps of a rounding boundary of P's quantizer.

use tract_onnx::pb;
use tract_onnx::tract_hir::internal::*;

use crate::kernels::int8::{
    attention_quantize, AttentionOperand, AttentionShape, Backend, ProbQuant, ScoreScale,
};
use crate::lower::{Index, Rewrite};
use crate::ops::conv::{activation_qdq, attr, float_attr, int_attr};
use crate::ops::matmul::{batch_offset, broadcast, einsum_rank, product_form, split};

/// The op name of fused attention nodes (domain `ai.tfmqc`).
pub const QATTENTION: &str = "TfmqcQAttention";

/// The quantizer of one activation operand and how it is stored (see
/// [`AttentionOperand`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OperandQuant {
    pub scale: f32,
    pub zero_point: u8,
    pub transposed: bool,
}

/// `softmax(score(q·kᵀ))·v` of quantized operands, batch dims broadcast as in ONNX
/// `MatMul`.
#[derive(Debug, Clone, PartialEq)]
pub struct QAttention {
    /// `Q[.., M, D]` (transposed: `[.., D, M]`).
    pub q: OperandQuant,
    /// `Kᵀ[.., D, N]` (transposed: `[.., N, D]`).
    pub k: OperandQuant,
    /// `V[.., N, Dv]` (transposed: `[.., Dv, N]`).
    pub v: OperandQuant,
    pub score: ScoreScale,
    pub p: ProbQuant,
    /// The output is `[.., Dv, M]` instead of `[.., M, Dv]`.
    pub out_transposed: bool,
}

impl Eq for QAttention {}

/// `(rows, cols)` of an operand read as its matrix (undoing a transposed storage).
fn matrix<D: DimLike>(shape: &[D], transposed: bool) -> TractResult<(&[D], &D, &D)> {
    let (batch, a, b) = split(shape)?;
    Ok(if transposed {
        (batch, b, a)
    } else {
        (batch, a, b)
    })
}

impl QAttention {
    /// `(batch, m, n, d, dv)`; checks that the operands agree.
    fn dims<D: DimLike>(&self, q: &[D], k: &[D], v: &[D]) -> TractResult<(TVec<D>, [D; 4])> {
        let (qb, m, d) = matrix(q, self.q.transposed)?;
        let (kb, d2, n) = matrix(k, self.k.transposed)?;
        let (vb, n2, dv) = matrix(v, self.v.transposed)?;
        ensure!(
            d == d2 && n == n2,
            "{QATTENTION}: operands do not agree (q {q:?}, kᵀ {k:?}, v {v:?})"
        );
        let batch = broadcast(&broadcast(qb, kb)?, vb)?;
        Ok((batch, [m.clone(), n.clone(), d.clone(), dv.clone()]))
    }

    fn output_shape<D: DimLike>(&self, q: &[D], k: &[D], v: &[D]) -> TractResult<TVec<D>> {
        let (mut shape, [m, _, _, dv]) = self.dims(q, k, v)?;
        if self.out_transposed {
            shape.push(dv);
            shape.push(m);
        } else {
            shape.push(m);
            shape.push(dv);
        }
        Ok(shape)
    }
}

impl Op for QAttention {
    fn name(&self) -> StaticName {
        QATTENTION.into()
    }
    op_as_typed_op!();
}

impl EvalOp for QAttention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (q, k, v) = args_3!(inputs);
        let (qp, kp, vp) = (
            q.try_as_plain_ram()?,
            k.try_as_plain_ram()?,
            v.try_as_plain_ram()?,
        );
        let (batch, [m, n, d, dv]) = self.dims(q.shape(), k.shape(), v.shape())?;
        let out_shape = self.output_shape(q.shape(), k.shape(), v.shape())?;
        let mut out = Tensor::zero::<f32>(&out_shape)?;
        let heads: usize = batch.iter().product();
        let (qb, kb, vb) = (
            split(q.shape())?.0,
            split(k.shape())?.0,
            split(v.shape())?.0,
        );
        let offsets: Vec<[usize; 3]> = (0..heads)
            .map(|h| {
                [
                    batch_offset(h, &batch, qb, m * d),
                    batch_offset(h, &batch, kb, d * n),
                    batch_offset(h, &batch, vb, n * dv),
                ]
            })
            .collect();
        let operand = |values, o: OperandQuant| AttentionOperand {
            values,
            transposed: o.transposed,
            scale: o.scale,
            zero_point: o.zero_point,
        };
        attention_quantize(
            Backend::Auto,
            operand(qp.as_slice::<f32>()?, self.q),
            operand(kp.as_slice::<f32>()?, self.k),
            operand(vp.as_slice::<f32>()?, self.v),
            self.score,
            self.p,
            AttentionShape { heads, m, n, d, dv },
            &offsets,
            out.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?,
            self.out_transposed,
        );
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for QAttention {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(self.output_shape(
            &inputs[0].shape,
            &inputs[1].shape,
            &inputs[2].shape
        )?)))
    }
}

fn qattention_rules<'p>(
    _op: &dyn Op,
    s: &mut Solver,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
) -> InferenceResult {
    check_input_arity(inputs, 3)?;
    check_output_arity(outputs, 1)?;
    for i in inputs {
        s.equals(&i.datum_type, f32::datum_type())?;
    }
    s.equals(&outputs[0].datum_type, f32::datum_type())?;
    // The shape follows from the typed op's output_facts when tract types the model.
    Ok(())
}

/// tract op builder for `TfmqcQAttention` nodes.
pub fn build_qattention(
    _ctx: &tract_onnx::model::ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let find = |name: &str| attr(node, name);
    let operand = |p: &str| -> TractResult<OperandQuant> {
        Ok(OperandQuant {
            scale: find(&format!("{p}_scale"))?.f,
            zero_point: find(&format!("{p}_zero_point"))?.i as u8,
            transposed: find(&format!("{p}_transposed"))?.i != 0,
        })
    };
    let score = match (find("score_mul").ok(), find("score_div").ok()) {
        (Some(a), None) => ScoreScale::Mul(a.f),
        (None, Some(a)) => ScoreScale::Div(a.f),
        (None, None) => ScoreScale::None,
        _ => bail!("{QATTENTION} '{}': both score_mul and score_div", node.name),
    };
    let op = QAttention {
        q: operand("q")?,
        k: operand("k")?,
        v: operand("v")?,
        score,
        p: ProbQuant {
            scale: find("p_scale")?.f,
            zero_point: find("p_zero_point")?.i as u8,
        },
        out_transposed: find("out_transposed")?.i != 0,
    };
    Ok((
        tract_onnx::tract_hir::ops::expandable::inference_wrap(op, 1, qattention_rules),
        vec![],
    ))
}

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
        attrs.push(float_attr(&format!("{name}_scale"), *scale));
        attrs.push(int_attr(&format!("{name}_zero_point"), *zp as i64));
        attrs.push(int_attr(&format!("{name}_transposed"), t as i64));
    }
    match score {
        ScoreScale::None => {}
        ScoreScale::Mul(c) => attrs.push(float_attr("score_mul", c)),
        ScoreScale::Div(c) => attrs.push(float_attr("score_div", c)),
    }
    attrs.push(float_attr("p_scale", p.1));
    attrs.push(int_attr("p_zero_point", p.2 as i64));
    attrs.push(int_attr("out_transposed", out_t as i64));
    node.attribute = attrs;
    Some(Rewrite { node, weight: None })
}
