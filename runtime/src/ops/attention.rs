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

use super::attr;
use super::matmul::{batch_offset, broadcast, split};
use crate::kernels::int8::{
    attention_quantize, AttentionOperand, AttentionShape, Backend, ProbQuant, ScoreScale,
};

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
