//! Quantized convolutions on the project's int8 kernels, inside tract.
//!
//! tract runs a QDQ graph in float (it folds the weight DequantizeLinear into f32 weights
//! and keeps the activation Q/DQ as element-wise work, DESIGN.md §8), and its own int8
//! path is far slower than float on AVX2. So, before tract sees the model, each
//!
//! ```text
//! Conv(DequantizeLinear(QuantizeLinear(x, s, z), s, z), DequantizeLinear(Wq, sw, 0), b)
//! ```
//!
//! with constant scales becomes one `TfmqcQConv` node holding the int8 weights: it
//! quantizes `x` (as QuantizeLinear: round half to even, saturate), runs the exact int8
//! kernel and writes `acc · s · sw[o] + b[o]` in f32. The weights stay resident as int8.

use std::sync::Arc;

use tract_onnx::pb;
use tract_onnx::tract_hir::internal::*;

use super::{attr, is_int8_or_int4, step_scale, step_scales, weight_i8};
use crate::kernels::int8::{conv2d_quantize, Backend, ConvGeometry, Dequant, PackedConvWeights};

/// The op name our rewritten nodes carry (domain `ai.tfmqc`).
pub const QCONV: &str = "TfmqcQConv";

#[derive(Debug, Clone)]
pub struct QConv {
    pub a_scale: f32,
    pub a_zero_point: u8,
    /// Per-step activation scales, picked by the group index (the op's second input).
    pub a_scales: Option<Arc<Vec<f32>>>,
    pub weights: Arc<PackedConvWeights>,
    pub w_scale: Arc<Vec<f32>>,
    pub bias: Option<Arc<Vec<f32>>>,
    pub out_channels: usize,
    pub geometry: ConvGeometry,
    /// A 1-D convolution (`[N, C, L]` input), run as a 2-D one of height 1.
    pub conv1d: bool,
    /// An output Q/DQ pair (scale, zero point) fused into the kernel's store
    /// ([`super::requant`]).
    pub out_q: Option<(f32, u8)>,
    /// Per-input-channel factors the input is multiplied by before it is quantized
    /// ([`super::prescale`]).
    pub prescale: Option<Arc<Vec<f32>>>,
    /// The last input is added to the output as the kernel stores it ([`super::residual`]).
    pub residual: bool,
}

impl PartialEq for QConv {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights)
            && self.a_scale == other.a_scale
            && self.a_zero_point == other.a_zero_point
            && self.a_scales == other.a_scales
    }
}
impl Eq for QConv {}

impl QConv {
    /// Bytes of this op's weights, scales and bias in memory, and of the same weights
    /// and bias in f32.
    pub fn weight_bytes(&self) -> (usize, usize) {
        let g = self.geometry;
        let elems =
            self.out_channels * self.weights.in_channels_per_group() * g.kernel[0] * g.kernel[1];
        let bias = self.bias.as_ref().map_or(0, |b| b.len()) * 4;
        (
            self.weights.resident_bytes() + self.w_scale.len() * 4 + bias,
            elems * 4 + bias,
        )
    }

    fn rank(&self) -> usize {
        if self.conv1d {
            3
        } else {
            4
        }
    }

    /// The input shape as `[N, C, H, W]` (a 1-D input has `H = 1`).
    fn nchw<D: DimLike>(&self, input: &[D]) -> TractResult<[usize; 4]> {
        ensure!(
            input.len() == self.rank(),
            "TfmqcQConv takes a rank-{} input, got {:?}",
            self.rank(),
            input
        );
        let d = |i: usize| input[i].to_usize();
        Ok(if self.conv1d {
            [d(0)?, d(1)?, 1, d(2)?]
        } else {
            [d(0)?, d(1)?, d(2)?, d(3)?]
        })
    }

    fn output_shape<D: DimLike>(&self, input: &[D]) -> TractResult<TVec<D>> {
        ensure!(
            input.len() == self.rank(),
            "TfmqcQConv takes a rank-{} input, got {:?}",
            self.rank(),
            input
        );
        // The batch may be symbolic; the spatial dims are known.
        let w = input[input.len() - 1].to_usize()?;
        let h = if self.conv1d { 1 } else { input[2].to_usize()? };
        let (oh, ow) = self
            .geometry
            .output_hw(h, w)
            .ok_or_else(|| format_err!("kernel larger than the padded input"))?;
        let mut out = tvec!(input[0].clone(), D::from(self.out_channels));
        if !self.conv1d {
            out.push(D::from(oh));
        }
        out.push(D::from(ow));
        Ok(out)
    }
}

impl Op for QConv {
    fn name(&self) -> StaticName {
        "TfmqcQConv".into()
    }
    op_as_typed_op!();
}

impl EvalOp for QConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, mut inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let residual = match self.residual {
            true => Some(
                inputs
                    .pop()
                    .ok_or_else(|| format_err!("{QCONV}: no residual input"))?,
            ),
            false => None,
        };
        // The step's scale: one table lookup per call.
        let (input, a_scale) = match &self.a_scales {
            None => (args_1!(inputs), self.a_scale),
            Some(scales) => {
                let (x, group) = args_2!(inputs);
                (x, step_scale(scales, &group, QCONV)?)
            }
        };
        let plain = input.try_as_plain_ram()?;
        let x = plain.as_slice::<f32>()?;
        let shape = input.shape();
        let nchw = self.nchw(shape)?;
        let out_shape = self.output_shape(shape)?;
        let mut out = Tensor::zero::<f32>(&out_shape)?;
        let mut plain_out = out.try_as_plain_ram_mut()?;
        let out_f32 = plain_out.as_slice_mut::<f32>()?;
        let dequant = Dequant {
            a_scale,
            w_scale: &self.w_scale,
            bias: self.bias.as_deref().map(|b| b.as_slice()),
        };
        let r_plain = residual
            .as_ref()
            .map(|r| r.try_as_plain_ram())
            .transpose()?;
        let addend = match (&residual, &r_plain) {
            (Some(r), Some(plain)) => {
                super::residual::addend(&out_shape, r.shape(), plain.as_slice::<f32>()?)
            }
            _ => None,
        };
        // A residual the store cannot add (another broadcast) is added after the kernel.
        let late = residual.as_ref().filter(|_| addend.is_none());
        let output = super::residual::output(self.out_q, out_f32, dequant, addend);
        if let Some(r) = &self.prescale {
            super::prescale::conv2d_prescaled(
                x,
                nchw,
                r,
                a_scale,
                self.a_zero_point,
                &self.weights,
                output,
            )?;
        } else {
            // QuantizeLinear (round half to even, saturate) fused into the kernel's
            // widening pass: no u8 copy of the input.
            conv2d_quantize(
                Backend::Auto,
                x,
                nchw,
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

impl TypedOp for QConv {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = self.output_shape(&inputs[0].shape)?;
        let shape = super::residual::output_fact_shape(shape, self.residual, inputs)?;
        Ok(tvec!(f32::fact(shape)))
    }
}

fn qconv_rules<'p>(
    op: &dyn Op,
    s: &mut Solver,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
) -> InferenceResult {
    let op = op.downcast_ref::<QConv>().expect("QConv");
    check_input_arity(
        inputs,
        1 + op.a_scales.is_some() as usize + op.residual as usize,
    )?;
    if op.residual {
        s.equals(&inputs[inputs.len() - 1].datum_type, f32::datum_type())?;
    }
    check_output_arity(outputs, 1)?;
    s.equals(&inputs[0].datum_type, f32::datum_type())?;
    s.equals(&outputs[0].datum_type, f32::datum_type())?;
    s.equals(&inputs[0].rank, op.rank() as i64)?;
    s.equals(&outputs[0].rank, op.rank() as i64)?;
    s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
    s.equals(&outputs[0].shape[1], op.out_channels.to_dim())?;
    // Height and width follow from the typed op's output_facts when tract types the model.
    Ok(())
}

/// tract op builder for `TfmqcQConv` nodes.
pub fn build_qconv(
    ctx: &tract_onnx::model::ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let ints = |n: &str| -> TractResult<Vec<usize>> {
        attr(node, n)?
            .ints
            .iter()
            .map(|&v| {
                usize::try_from(v)
                    .map_err(|_| format_err!("{QCONV} '{}': {n} holds {v}", node.name))
            })
            .collect()
    };
    let w = attr(node, "weight")?
        .t
        .as_ref()
        .ok_or_else(|| format_err!("weight is not a tensor"))?;
    let dims: Vec<usize> = w.dims.iter().map(|&d| d.max(0) as usize).collect();
    ensure!(
        (dims.len() == 3 || dims.len() == 4)
            && is_int8_or_int4(w)
            && w.dims.iter().all(|&d| d >= 1),
        "{QCONV} '{}': weight must be int8 or int4 [O, C/g, kh, kw] or [O, C/g, k]",
        node.name
    );
    let conv1d = dims.len() == 3;
    // Straight from the proto or a memory map of the external-data file into the packed
    // form: no copy of the weight, and the map is dropped once it is packed.
    let weight = weight_i8(ctx, node, w)?;
    let values = weight.values();
    let (p, s, d) = (ints("pads")?, ints("strides")?, ints("dilations")?);
    ensure!(
        p.len() == 4 && s.len() == 2 && d.len() == 2,
        "{QCONV} '{}': pads/strides/dilations must be 2-D",
        node.name
    );
    let geometry = ConvGeometry {
        kernel: if conv1d {
            [1, dims[2]]
        } else {
            [dims[2], dims[3]]
        },
        strides: [s[0], s[1]],
        pads: [p[0], p[1], p[2], p[3]],
        dilations: [d[0], d[1]],
        groups: usize::try_from(attr(node, "group")?.i).unwrap_or(0),
    };
    // A file can say anything here (the node may be written by hand, not by our
    // lowering): refuse what the packing would assert on.
    if let Err(e) = geometry.check(dims[0], dims[1], values.len()) {
        bail!("{QCONV} '{}': {e}", node.name);
    }
    let bias = attr(node, "bias").ok().map(|a| Arc::new(a.floats.clone()));
    let op = QConv {
        a_scale: attr(node, "a_scale")?.f,
        a_zero_point: attr(node, "a_zero_point")?.i as u8,
        a_scales: step_scales(node)?,
        weights: Arc::new({
            let packed = PackedConvWeights::pack(values, dims[0], dims[1], geometry);
            // An INT4 file's weights stay resident at 4 bits.
            match weight.int4() {
                true => packed.into_nibbles(),
                false => packed,
            }
        }),
        w_scale: Arc::new(attr(node, "w_scale")?.floats.clone()),
        bias,
        out_channels: dims[0],
        geometry,
        conv1d,
        out_q: super::requant::output_pair(node),
        prescale: attr(node, super::prescale::A_PRESCALE)
            .ok()
            .map(|a| Arc::new(a.floats.clone())),
        residual: attr(node, super::residual::RESIDUAL).is_ok_and(|a| a.i == 1),
    };
    Ok((
        tract_onnx::tract_hir::ops::expandable::inference_wrap(op, 1, qconv_rules),
        vec![],
    ))
}
