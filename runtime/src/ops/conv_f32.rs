//! Small float convolutions ([`crate::kernels::conv_f32`]) as a tract op: the float
//! `Conv`s the compiler leaves around the int8 ones (a UNet's `conv_in` / `conv_out`, kept
//! float for quality) with few input or output channels. The lowering
//! ([`crate::lower`]) writes them as `TfmqcConvF32` nodes holding their f32 weights; what
//! they compute is what tract's Im2col + matrix product computes, bit for bit.

use tract_onnx::pb;
use tract_onnx::tract_hir::internal::*;

use super::attr;
use crate::kernels::conv_f32::{conv2d_f32, ConvF32};

/// The op name (domain `ai.tfmqc`).
pub const CONV_F32: &str = "TfmqcConvF32";
/// The attribute holding the f32 weights (not `weight`: that names the int8 nodes' moved
/// weight tensors).
pub const WEIGHT_F32: &str = "weight_f32";

/// Whether the lowering writes these nodes: yes unless `TFMQC_CONV_F32=0` (read once per
/// process). The direct loop gives tract's bits (one FMA a term in tract's order, the
/// bias after: [`crate::kernels::conv_f32`]), so the compiler's decisions that the int8
/// runtime's evaluation makes (`--output-qdq auto`, DAQ, TCR's trial) are the same with
/// it or without. (Before, it summed with separate multiply and add, rounded otherwise,
/// and stayed opt-in: it moved a DAQ code at a tie in tests/tcaq.rs.)
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TFMQC_CONV_F32").as_deref() != Ok("0"))
}

#[derive(Debug, Clone, PartialEq)]
pub struct QConvF32(pub ConvF32);

impl Eq for QConvF32 {}

impl QConvF32 {
    fn output_shape<D: DimLike>(&self, input: &[D]) -> TractResult<TVec<D>> {
        ensure!(
            input.len() == 4 && input[1].to_usize().ok() == Some(self.0.in_channels),
            "{CONV_F32}: input {input:?} is not [N, {}, H, W]",
            self.0.in_channels
        );
        let (h, w) = (input[2].to_usize()?, input[3].to_usize()?);
        let (ho, wo) = self
            .0
            .output_hw(h, w)
            .ok_or_else(|| format_err!("{CONV_F32}: kernel larger than the padded input"))?;
        Ok(tvec!(
            input[0].clone(),
            D::from(self.0.out_channels),
            D::from(ho),
            D::from(wo)
        ))
    }
}

impl Op for QConvF32 {
    fn name(&self) -> StaticName {
        CONV_F32.into()
    }
    op_as_typed_op!();
}

impl EvalOp for QConvF32 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let shape = input.shape();
        let out_shape = self.output_shape(shape)?;
        let plain = input.try_as_plain_ram()?;
        let mut out = Tensor::zero::<f32>(&out_shape)?;
        conv2d_f32(
            &self.0,
            plain.as_slice::<f32>()?,
            [shape[0], shape[1], shape[2], shape[3]],
            out.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?,
        );
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for QConvF32 {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(self.output_shape(&inputs[0].shape)?)))
    }
}

fn conv_f32_rules<'p>(
    op: &dyn Op,
    s: &mut Solver,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
) -> InferenceResult {
    let op = op.downcast_ref::<QConvF32>().expect("QConvF32");
    check_input_arity(inputs, 1)?;
    check_output_arity(outputs, 1)?;
    s.equals(&inputs[0].datum_type, f32::datum_type())?;
    s.equals(&outputs[0].datum_type, f32::datum_type())?;
    s.equals(&inputs[0].rank, 4)?;
    s.equals(&outputs[0].rank, 4)?;
    s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
    s.equals(&outputs[0].shape[1], op.0.out_channels.to_dim())?;
    Ok(())
}

/// tract op builder for `TfmqcConvF32` nodes: attributes `weight_f32`, `dims` (`[O,
/// C, kh, kw]`), `pads` (top, left, bottom, right) and optionally `bias`.
pub fn build_conv_f32(
    _ctx: &tract_onnx::model::ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let usizes = |name: &str| -> TractResult<Vec<usize>> {
        attr(node, name)?
            .ints
            .iter()
            .map(|&v| {
                usize::try_from(v).map_err(|_| format_err!("{CONV_F32} '{}': {name}", node.name))
            })
            .collect()
    };
    let (dims, pads) = (usizes("dims")?, usizes("pads")?);
    let weight = attr(node, WEIGHT_F32)?.floats.clone();
    let bias = attr(node, "bias").ok().map(|a| a.floats.clone());
    ensure!(
        dims.len() == 4
            && pads.len() == 4
            && dims.iter().all(|&d| d >= 1)
            && dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) == Some(weight.len())
            && bias.as_ref().is_none_or(|b| b.len() == dims[0])
            && pads.iter().all(|&p| p < 1 << 16),
        "{CONV_F32} '{}': inconsistent weight, bias, dims or pads",
        node.name
    );
    let op = QConvF32(ConvF32 {
        weight: weight.into(),
        bias,
        out_channels: dims[0],
        in_channels: dims[1],
        kernel: [dims[2], dims[3]],
        pads: [pads[0], pads[1], pads[2], pads[3]],
    });
    Ok((
        tract_onnx::tract_hir::ops::expandable::inference_wrap(op, 1, conv_f32_rules),
        vec![],
    ))
}
