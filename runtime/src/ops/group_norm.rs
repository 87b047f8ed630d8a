//! Group normalization (+ SiLU) as one op ([`crate::kernels::norm::group_norm`]):
//!
//! ```text
//! r = Reshape(x, [N|0, G, -1])
//! i = InstanceNormalization(r, s[G], b[G], epsilon)
//! y = Add(Mul(Reshape(i, Shape(x) | constant), γ[C, 1, ..]), β[C, 1, ..])
//! [ y = Mul(y, Sigmoid(y)) ]
//! ```
//!
//! (diffusers' and guided-diffusion's `GroupNorm` exports, with the SiLU that follows in
//! every ResNet block), every intermediate read only by the next node, becomes one
//! `TfmqcGroupNorm` node: one pass for the statistics of each (image, group), one for the
//! output, split over the threads. tract runs the same as a dozen single-threaded
//! element-wise and reduce nodes. Float only: the result differs from tract's by float
//! rounding (statistics accumulated in f64; the SiLU's `exp` within 2 ulp).

use tract_onnx::pb;
use tract_onnx::tract_hir::internal::*;

use super::attr;
use crate::kernels::norm::{group_norm, GroupNorm};

/// The op name of fused group normalizations (domain `ai.tfmqc`).
pub const GROUP_NORM: &str = "TfmqcGroupNorm";

#[derive(Debug, Clone, PartialEq)]
pub struct QGroupNorm {
    pub groups: usize,
    pub epsilon: f32,
    pub group_scale: Vec<f32>,
    pub group_bias: Vec<f32>,
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub silu: bool,
    /// Rank of γ / β as stored (`[C, 1, ..]`): they broadcast onto axis 1 only for an
    /// input of rank `affine_rank + 1`.
    pub affine_rank: usize,
    /// The constant shape of the Reshape back (ONNX rules: 0 copies, −1 infers), if
    /// not `Shape(x)`: it must give the input's shape.
    pub out_shape: Option<Vec<i64>>,
}

impl Eq for QGroupNorm {}

impl QGroupNorm {
    fn check<D: DimLike>(&self, shape: &[D]) -> TractResult<()> {
        let c = self.gamma.len();
        ensure!(
            shape.len() == self.affine_rank + 1 && shape[1].to_usize().ok() == Some(c),
            "{GROUP_NORM}: input {shape:?} does not take γ [{c}, 1, ..] of rank {}",
            self.affine_rank
        );
        if let Some(o) = &self.out_shape {
            let same = o.len() == shape.len()
                && o.iter()
                    .zip(shape)
                    .all(|(&v, d)| v == 0 || v == -1 || d.to_usize().ok() == Some(v as usize))
                && o.iter().filter(|&&v| v == -1).count() <= 1;
            ensure!(
                same,
                "{GROUP_NORM}: the Reshape back to {o:?} does not restore {shape:?}"
            );
        }
        Ok(())
    }
}

impl Op for QGroupNorm {
    fn name(&self) -> StaticName {
        GROUP_NORM.into()
    }
    op_as_typed_op!();
}

impl EvalOp for QGroupNorm {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let shape = input.shape();
        self.check(shape)?;
        let plain = input.try_as_plain_ram()?;
        let x = plain.as_slice::<f32>()?;
        let (n, c) = (shape[0], shape[1]);
        let s: usize = shape[2..].iter().product();
        let mut out = Tensor::zero::<f32>(shape)?;
        group_norm(
            x,
            n,
            c,
            s,
            &GroupNorm {
                groups: self.groups,
                epsilon: self.epsilon,
                group_scale: &self.group_scale,
                group_bias: &self.group_bias,
                gamma: &self.gamma,
                beta: &self.beta,
                silu: self.silu,
            },
            out.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?,
        );
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for QGroupNorm {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.check(&inputs[0].shape)?;
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }
}

fn group_norm_rules<'p>(
    _op: &dyn Op,
    s: &mut Solver,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
) -> InferenceResult {
    check_input_arity(inputs, 1)?;
    check_output_arity(outputs, 1)?;
    s.equals(&inputs[0].datum_type, f32::datum_type())?;
    s.equals(&outputs[0].datum_type, f32::datum_type())?;
    s.equals(&inputs[0].shape, &outputs[0].shape)?;
    Ok(())
}

/// tract op builder for `TfmqcGroupNorm` nodes.
pub fn build_group_norm(
    _ctx: &tract_onnx::model::ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let find = |name: &str| attr(node, name);
    let op = QGroupNorm {
        groups: find("groups")?.i as usize,
        epsilon: find("epsilon")?.f,
        group_scale: find("group_scale")?.floats.clone(),
        group_bias: find("group_bias")?.floats.clone(),
        gamma: find("gamma")?.floats.clone(),
        beta: find("beta")?.floats.clone(),
        silu: find("silu")?.i != 0,
        affine_rank: find("affine_rank")?.i as usize,
        out_shape: find("out_shape").ok().map(|a| a.ints.clone()),
    };
    ensure!(
        op.groups > 0
            && op.gamma.len().is_multiple_of(op.groups)
            && op.beta.len() == op.gamma.len()
            && op.group_scale.len() == op.groups
            && op.group_bias.len() == op.groups,
        "{GROUP_NORM} '{}': inconsistent parameters",
        node.name
    );
    Ok((
        tract_onnx::tract_hir::ops::expandable::inference_wrap(op, 1, group_norm_rules),
        vec![],
    ))
}
