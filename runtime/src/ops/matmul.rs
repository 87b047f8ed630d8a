//! Products of two quantized activations (attention's `Q·Kᵀ` and `softmax·V`) on the
//! project's int8 GEMM, inside tract: the counterpart of [`crate::ops::gemm`] when neither
//! operand is a constant weight.
//!
//! ```text
//! MatMul(DequantizeLinear(QuantizeLinear(x, sx, zx)), DequantizeLinear(QuantizeLinear(y, sy, zy)))
//! Einsum("bct,bcs->bts", same)     (guided-diffusion's QKV attention)
//! ```
//!
//! with constant per-tensor scales becomes one `TfmqcQMatMul` node: both operands are
//! quantized inside the kernel (the right one while it is packed, the left one in the
//! GEMM's widening pass), multiplied exactly in integers and written as
//! `acc · sx · sy` in f32. tract would otherwise run the four Q/DQ nodes as separate
//! element-wise passes (its QuantizeLinear is scalar code: on a `2×8×256×256` softmax it
//! costs more than the matmul) and the matmul in float.

use tract_onnx::pb;
use tract_onnx::tract_hir::internal::*;

use super::attr;
use crate::kernels::int8::{matmul_quantize, Backend, QuantOperand};

/// The op name of rewritten activation × activation products (domain `ai.tfmqc`).
pub const QMATMUL: &str = "TfmqcQMatMul";

/// `out[.., i, j] = Σ_k x[.., i, k] · y[.., k, j]` of two quantized activations, batch
/// dims broadcast as in ONNX `MatMul`.
#[derive(Debug, Clone, PartialEq)]
pub struct QMatMul {
    pub x_scale: f32,
    pub x_zero_point: u8,
    pub y_scale: f32,
    pub y_zero_point: u8,
    /// The left operand is stored `[.., K, M]`.
    pub x_transposed: bool,
    /// The right operand is stored `[.., N, K]`.
    pub y_transposed: bool,
}

impl Eq for QMatMul {}

/// Matrix dims `(rows, cols)` of an operand as stored, and its batch dims.
pub(crate) fn split<D: DimLike>(shape: &[D]) -> TractResult<(&[D], &D, &D)> {
    ensure!(
        shape.len() >= 2,
        "{QMATMUL} takes operands of rank ≥ 2, got {shape:?}"
    );
    let r = shape.len();
    Ok((&shape[..r - 2], &shape[r - 2], &shape[r - 1]))
}

/// ONNX (numpy) broadcasting of two batch shapes.
pub(crate) fn broadcast<D: DimLike>(a: &[D], b: &[D]) -> TractResult<TVec<D>> {
    let r = a.len().max(b.len());
    let at = |s: &[D], i: usize| -> D {
        let pad = r - s.len();
        if i < pad {
            D::one()
        } else {
            s[i - pad].clone()
        }
    };
    (0..r)
        .map(|i| {
            let (x, y) = (at(a, i), at(b, i));
            if x == y || y.is_one() {
                Ok(x)
            } else if x.is_one() {
                Ok(y)
            } else {
                bail!("{QMATMUL}: batch dims {a:?} and {b:?} do not broadcast")
            }
        })
        .collect()
}

impl QMatMul {
    /// `(batch, m, k, n)` of the product; checks that the reduction lengths agree.
    fn dims<D: DimLike>(&self, x: &[D], y: &[D]) -> TractResult<(TVec<D>, D, D, D)> {
        let (xb, x0, x1) = split(x)?;
        let (yb, y0, y1) = split(y)?;
        let (m, k) = if self.x_transposed {
            (x1, x0)
        } else {
            (x0, x1)
        };
        let (k2, n) = if self.y_transposed {
            (y1, y0)
        } else {
            (y0, y1)
        };
        ensure!(
            k == k2,
            "{QMATMUL}: reduction lengths differ ({k:?} and {k2:?})"
        );
        Ok((broadcast(xb, yb)?, m.clone(), k.clone(), n.clone()))
    }
}

impl Op for QMatMul {
    fn name(&self) -> StaticName {
        QMATMUL.into()
    }
    op_as_typed_op!();
}

/// Offset of batch index `flat` (in the broadcast batch shape `out`) into an operand with
/// batch dims `dims` (broadcast dims of size 1 stay at 0) and matrix size `mat`.
pub(crate) fn batch_offset(flat: usize, out: &[usize], dims: &[usize], mat: usize) -> usize {
    let pad = out.len() - dims.len();
    let (mut rest, mut offset, mut stride) = (flat, 0, mat);
    for i in (0..out.len()).rev() {
        let idx = rest % out[i];
        rest /= out[i];
        if i >= pad {
            let d = dims[i - pad];
            if d != 1 {
                offset += idx * stride;
            }
            stride *= d;
        }
    }
    offset
}

impl EvalOp for QMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, y) = args_2!(inputs);
        let (xp, yp) = (x.try_as_plain_ram()?, y.try_as_plain_ram()?);
        let (xv, yv) = (xp.as_slice::<f32>()?, yp.as_slice::<f32>()?);
        let (batch, m, k, n) = self.dims(x.shape(), y.shape())?;
        let mut out_shape = batch.clone();
        out_shape.push(m);
        out_shape.push(n);
        let mut out = Tensor::zero::<f32>(&out_shape)?;
        let mut plain_out = out.try_as_plain_ram_mut()?;
        let o = plain_out.as_slice_mut::<f32>()?;
        let (xb, yb) = (split(x.shape())?.0, split(y.shape())?.0);
        for b in 0..batch.iter().product::<usize>() {
            let xo = batch_offset(b, &batch, xb, m * k);
            let yo = batch_offset(b, &batch, yb, k * n);
            matmul_quantize(
                Backend::Auto,
                QuantOperand {
                    values: &xv[xo..xo + m * k],
                    transposed: self.x_transposed,
                    scale: self.x_scale,
                    zero_point: self.x_zero_point,
                },
                QuantOperand {
                    values: &yv[yo..yo + k * n],
                    transposed: self.y_transposed,
                    scale: self.y_scale,
                    zero_point: self.y_zero_point,
                },
                m,
                k,
                n,
                &mut o[b * m * n..(b + 1) * m * n],
            );
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for QMatMul {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let (mut shape, m, _, n) = self.dims(&inputs[0].shape, &inputs[1].shape)?;
        shape.push(m);
        shape.push(n);
        Ok(tvec!(f32::fact(shape)))
    }
}

fn qmatmul_rules<'p>(
    _op: &dyn Op,
    s: &mut Solver,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
) -> InferenceResult {
    check_input_arity(inputs, 2)?;
    check_output_arity(outputs, 1)?;
    s.equals(&inputs[0].datum_type, f32::datum_type())?;
    s.equals(&inputs[1].datum_type, f32::datum_type())?;
    s.equals(&outputs[0].datum_type, f32::datum_type())?;
    // The shape follows from the typed op's output_facts when tract types the model.
    Ok(())
}

/// tract op builder for `TfmqcQMatMul` nodes.
pub fn build_qmatmul(
    _ctx: &tract_onnx::model::ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let find = |name: &str| attr(node, name);
    let op = QMatMul {
        x_scale: find("x_scale")?.f,
        x_zero_point: find("x_zero_point")?.i as u8,
        y_scale: find("y_scale")?.f,
        y_zero_point: find("y_zero_point")?.i as u8,
        x_transposed: find("x_transposed")?.i != 0,
        y_transposed: find("y_transposed")?.i != 0,
    };
    Ok((
        tract_onnx::tract_hir::ops::expandable::inference_wrap(op, 1, qmatmul_rules),
        vec![],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_offsets_follow_broadcasting() {
        // out batch [2, 3]; an operand with batch [3] repeats over the first dim.
        let out = [2, 3];
        let offs: Vec<usize> = (0..6).map(|b| batch_offset(b, &out, &[3], 10)).collect();
        assert_eq!(offs, vec![0, 10, 20, 0, 10, 20]);
        let offs: Vec<usize> = (0..6).map(|b| batch_offset(b, &out, &[2, 1], 10)).collect();
        assert_eq!(offs, vec![0, 0, 0, 10, 10, 10]);
        let offs: Vec<usize> = (0..6).map(|b| batch_offset(b, &out, &[2, 3], 10)).collect();
        assert_eq!(offs, vec![0, 10, 20, 30, 40, 50]);
    }
}
