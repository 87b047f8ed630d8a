//! Quantized `Gemm` and `MatMul` with constant int8 weights on the project's int8 GEMM,
//! inside tract (the counterpart of [`crate::ops::conv`] for convolutions).
//!
//! ```text
//! Gemm(DequantizeLinear(QuantizeLinear(x, s, z), s, z), DequantizeLinear(Wq, sw, 0), C)
//! MatMul(DequantizeLinear(QuantizeLinear(x, s, z), s, z), DequantizeLinear(Wq, sw, 0))
//! ```
//!
//! with constant scales becomes one `TfmqcQGemm` node holding the int8 weights (packed
//! once at load): it quantizes `x` row by row inside the kernel's widening pass and
//! writes `acc · s · sw[n] + bias[n]` in f32. `x` may have leading batch dims (`MatMul`).

use std::sync::Arc;

use tract_onnx::pb;
use tract_onnx::tract_hir::internal::*;

use super::{attr, is_int8_or_int4, step_scale, step_scales, weight_i8};
use crate::kernels::int8::{gemm_quantize, Addend, Backend, Dequant, PackedWeights, WeightLayout};

/// The op name of rewritten `Gemm` / `MatMul` nodes (domain `ai.tfmqc`).
pub const QGEMM: &str = "TfmqcQGemm";

#[derive(Debug, Clone)]
pub struct QGemm {
    pub a_scale: f32,
    pub a_zero_point: u8,
    /// Per-step activation scales, picked by the group index (the op's second input).
    pub a_scales: Option<Arc<Vec<f32>>>,
    pub weights: Arc<PackedWeights>,
    pub w_scale: Arc<Vec<f32>>,
    pub bias: Option<Arc<Vec<f32>>>,
    /// An output Q/DQ pair (scale, zero point) fused into the kernel's store
    /// ([`super::requant`]).
    pub out_q: Option<(f32, u8)>,
    /// Factors on the input's last axis it is multiplied by before it is quantized
    /// ([`super::prescale`]).
    pub prescale: Option<Arc<Vec<f32>>>,
    /// The last input is added to the output as the kernel stores it ([`super::residual`]).
    pub residual: bool,
}

impl PartialEq for QGemm {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights)
            && self.a_scale == other.a_scale
            && self.a_zero_point == other.a_zero_point
            && self.a_scales == other.a_scales
    }
}
impl Eq for QGemm {}

impl QGemm {
    /// Bytes of this op's weights, scales and bias in memory, and of the same weights
    /// and bias in f32.
    pub fn weight_bytes(&self) -> (usize, usize) {
        let bias = self.bias.as_ref().map_or(0, |b| b.len()) * 4;
        (
            self.weights.resident_bytes() + self.w_scale.len() * 4 + bias,
            self.weights.n() * self.weights.k() * 4 + bias,
        )
    }

    fn output_shape<D: DimLike>(&self, input: &[D]) -> TractResult<TVec<D>> {
        ensure!(
            input.len() >= 2,
            "TfmqcQGemm takes a rank ≥ 2 input, got {input:?}"
        );
        let k = input[input.len() - 1].to_usize()?;
        ensure!(
            k == self.weights.k(),
            "TfmqcQGemm: input has K = {k}, the weights {}",
            self.weights.k()
        );
        let mut out: TVec<D> = input.into();
        *out.last_mut().unwrap() = D::from(self.weights.n());
        Ok(out)
    }
}

impl Op for QGemm {
    fn name(&self) -> StaticName {
        QGEMM.into()
    }
    op_as_typed_op!();
}

impl EvalOp for QGemm {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, mut inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let residual = match self.residual {
            true => Some(
                inputs
                    .pop()
                    .ok_or_else(|| format_err!("{QGEMM}: no residual input"))?,
            ),
            false => None,
        };
        // The step's scale: one table lookup per call.
        let (input, a_scale) = match &self.a_scales {
            None => (args_1!(inputs), self.a_scale),
            Some(scales) => {
                let (x, group) = args_2!(inputs);
                (x, step_scale(scales, &group, QGEMM)?)
            }
        };
        let plain = input.try_as_plain_ram()?;
        let x = plain.as_slice::<f32>()?;
        let out_shape = self.output_shape(input.shape())?;
        let k = self.weights.k();
        let mut out = Tensor::zero::<f32>(&out_shape)?;
        let mut plain_out = out.try_as_plain_ram_mut()?;
        let out_f32 = plain_out.as_slice_mut::<f32>()?;
        let dequant = Dequant {
            a_scale,
            w_scale: &self.w_scale,
            bias: self.bias.as_deref().map(|b| b.as_slice()),
        };
        // An operand of the output's shape is added by the store (a GEMM's stored runs
        // are along a row: no per-plane form); any other after the kernel.
        let r_plain = residual
            .as_ref()
            .map(|r| r.try_as_plain_ram())
            .transpose()?;
        let addend = match (&residual, &r_plain) {
            (Some(r), Some(plain)) if r.shape() == &out_shape[..] => {
                Some(Addend::Same(plain.as_slice::<f32>()?))
            }
            _ => None,
        };
        let late = residual.as_ref().filter(|_| addend.is_none());
        let output = super::residual::output(self.out_q, out_f32, dequant, addend);
        let m = x.len() / k.max(1);
        if let Some(r) = &self.prescale {
            super::prescale::gemm_prescaled(
                x,
                m,
                k,
                r,
                a_scale,
                self.a_zero_point,
                &self.weights,
                output,
            )?;
        } else {
            gemm_quantize(
                Backend::Auto,
                x,
                m,
                k,
                a_scale,
                self.a_zero_point,
                &self.weights,
                output,
            );
        }
        let out = match late {
            Some(r) => super::residual::add_broadcast(out, r)?,
            None => out,
        };
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for QGemm {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = self.output_shape(&inputs[0].shape)?;
        let shape = super::residual::output_fact_shape(shape, self.residual, inputs)?;
        Ok(tvec!(f32::fact(shape)))
    }
}

fn qgemm_rules<'p>(
    op: &dyn Op,
    s: &mut Solver,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
) -> InferenceResult {
    let op = op.downcast_ref::<QGemm>().expect("QGemm");
    check_input_arity(
        inputs,
        1 + op.a_scales.is_some() as usize + op.residual as usize,
    )?;
    check_output_arity(outputs, 1)?;
    s.equals(&inputs[0].datum_type, f32::datum_type())?;
    s.equals(&outputs[0].datum_type, f32::datum_type())?;
    if op.residual {
        s.equals(&inputs[inputs.len() - 1].datum_type, f32::datum_type())?;
    } else {
        s.equals(&inputs[0].rank, &outputs[0].rank)?;
    }
    // The shape follows from the typed op's output_facts when tract types the model.
    Ok(())
}

/// tract op builder for `TfmqcQGemm` nodes.
pub fn build_qgemm(
    ctx: &tract_onnx::model::ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let find = |name: &str| attr(node, name);
    let w = find("weight")?
        .t
        .as_ref()
        .ok_or_else(|| format_err!("{QGEMM} '{}': weight is not a tensor", node.name))?;
    ensure!(
        w.dims.len() == 2 && is_int8_or_int4(w) && w.dims.iter().all(|&d| d >= 1),
        "{QGEMM} '{}': weight must be a non-empty 2-D int8 or int4 tensor",
        node.name
    );
    let (d0, d1) = (w.dims[0] as usize, w.dims[1] as usize);
    // Packed straight from the proto or the mapped external-data file (no copy).
    let weight = weight_i8(ctx, node, w)?;
    let values = weight.values();
    ensure!(
        d0.checked_mul(d1) == Some(values.len()),
        "{QGEMM} '{}': {} weights for [{d0}, {d1}]",
        node.name,
        values.len()
    );
    // trans_b = 1: W[N, K] (Gemm transB=1); 0: W[K, N] (MatMul, Gemm transB=0).
    let weights = if find("trans_b")?.i == 1 {
        PackedWeights::pack_general(values, WeightLayout::NK, d0, d1, &[])
    } else {
        PackedWeights::pack_general(values, WeightLayout::KN, d1, d0, &[])
    };
    // An INT4 file's weights stay resident at 4 bits.
    let weights = match weight.int4() {
        true => weights.into_nibbles(),
        false => weights,
    };
    let w_scale = find("w_scale")?.floats.clone();
    let n = weights.n();
    ensure!(
        w_scale.len() == n,
        "{QGEMM} '{}': {} weight scales for {n} output channels",
        node.name,
        w_scale.len()
    );
    let bias = find("bias").ok().map(|a| Arc::new(a.floats.clone()));
    if let Some(b) = &bias {
        ensure!(b.len() == n, "{QGEMM} '{}': bias length", node.name);
    }
    let op = QGemm {
        a_scale: find("a_scale")?.f,
        a_zero_point: find("a_zero_point")?.i as u8,
        a_scales: step_scales(node)?,
        weights: Arc::new(weights),
        w_scale: Arc::new(w_scale),
        bias,
        out_q: super::requant::output_pair(node),
        prescale: find(super::prescale::A_PRESCALE)
            .ok()
            .map(|a| Arc::new(a.floats.clone())),
        residual: find(super::residual::RESIDUAL).is_ok_and(|a| a.i == 1),
    };
    Ok((
        tract_onnx::tract_hir::ops::expandable::inference_wrap(op, 1, qgemm_rules),
        vec![],
    ))
}
