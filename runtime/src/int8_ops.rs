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

use crate::kernels::int8::{conv2d_quantize, Backend, ConvGeometry, Dequant, PackedConvWeights};
use crate::lower::{Index, Rewrite};
use crate::tensor_data::{as_i8, tensor_bytes, TensorBytes};

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
    /// ([`crate::requant`]).
    pub out_q: Option<(f32, u8)>,
    /// Per-input-channel factors the input is multiplied by before it is quantized
    /// ([`crate::prescale`]).
    pub prescale: Option<Arc<Vec<f32>>>,
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

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
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
        let output = crate::requant::output(self.out_q, out_f32, dequant);
        if let Some(r) = &self.prescale {
            crate::prescale::conv2d_prescaled(
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
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for QConv {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(self.output_shape(&inputs[0].shape)?)))
    }
}

fn qconv_rules<'p>(
    op: &dyn Op,
    s: &mut Solver,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
) -> InferenceResult {
    let op = op.downcast_ref::<QConv>().expect("QConv");
    check_input_arity(inputs, 1 + op.a_scales.is_some() as usize)?;
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

/// Attribute `name` of one of our int8 nodes (an error naming the node if it lacks it).
pub(crate) fn attr<'a>(node: &'a pb::NodeProto, name: &str) -> TractResult<&'a pb::AttributeProto> {
    node.attribute
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| format_err!("{} '{}' lacks '{name}'", node.op_type, node.name))
}

/// tract op builder for `TfmqcQConv` nodes.
pub fn build_qconv(
    ctx: &tract_onnx::model::ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let ints = |n: &str| -> TractResult<Vec<usize>> {
        Ok(attr(node, n)?.ints.iter().map(|&v| v as usize).collect())
    };
    let w = attr(node, "weight")?
        .t
        .as_ref()
        .ok_or_else(|| format_err!("weight is not a tensor"))?;
    let dims: Vec<usize> = w.dims.iter().map(|&d| d as usize).collect();
    ensure!(
        (dims.len() == 3 || dims.len() == 4) && w.data_type == 3,
        "{QCONV} '{}': weight must be int8 [O, C/g, kh, kw] or [O, C/g, k]",
        node.name
    );
    let conv1d = dims.len() == 3;
    // Straight from the proto or a memory map of the external-data file into the packed
    // form: no copy of the weight, and the map is dropped once it is packed.
    let bytes = weight_bytes(ctx, node, w)?;
    let values = as_i8(&bytes);
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
        groups: attr(node, "group")?.i as usize,
    };
    let bias = attr(node, "bias").ok().map(|a| Arc::new(a.floats.clone()));
    let op = QConv {
        a_scale: attr(node, "a_scale")?.f,
        a_zero_point: attr(node, "a_zero_point")?.i as u8,
        a_scales: step_scales(node)?,
        weights: Arc::new(PackedConvWeights::pack(values, dims[0], dims[1], geometry)),
        w_scale: Arc::new(attr(node, "w_scale")?.floats.clone()),
        bias,
        out_channels: dims[0],
        geometry,
        conv1d,
        out_q: crate::requant::output_pair(node),
        prescale: attr(node, crate::prescale::A_PRESCALE)
            .ok()
            .map(|a| Arc::new(a.floats.clone())),
    };
    Ok((
        tract_onnx::tract_hir::ops::expandable::inference_wrap(op, 1, qconv_rules),
        vec![],
    ))
}

/// The `a_scales` attribute of a lowered node with per-step activation scales (it then
/// reads the group index as its last input).
pub(crate) fn step_scales(node: &pb::NodeProto) -> TractResult<Option<Arc<Vec<f32>>>> {
    let Ok(a) = attr(node, "a_scales") else {
        return Ok(None);
    };
    ensure!(
        !a.floats.is_empty() && a.floats.iter().all(|&s| s > 0.0),
        "{} '{}': per-step scales must be positive",
        node.op_type,
        node.name
    );
    ensure!(
        node.input.len() == 2,
        "{} '{}': per-step scales need the group index as the second input",
        node.op_type,
        node.name
    );
    Ok(Some(Arc::new(a.floats.clone())))
}

/// The bytes of the `weight` tensor attribute `w` of one of our int8 nodes: its
/// `raw_data`, or its external data (mapped from the file beside the model, relative to
/// the folder tract was given).
pub(crate) fn weight_bytes<'a>(
    ctx: &tract_onnx::model::ParsingContext,
    node: &pb::NodeProto,
    w: &'a pb::TensorProto,
) -> TractResult<TensorBytes<'a>> {
    tensor_bytes(w, ctx.model_dir.map(std::path::Path::new), None)
        .map_err(|e| format_err!("{} '{}': {e}", node.op_type, node.name))
}

// ----- the rewrite -------------------------------------------------------------------

pub(crate) fn mk_attr(name: &str) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        ..Default::default()
    }
}

/// A float attribute of a lowered node (the op builders read it back by name).
pub(crate) fn float_attr(name: &str, v: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        r#type: pb::attribute_proto::AttributeType::Float as i32,
        f: v,
        ..mk_attr(name)
    }
}

/// An int attribute of a lowered node.
pub(crate) fn int_attr(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: v,
        ..mk_attr(name)
    }
}

/// A floats attribute of a lowered node.
pub(crate) fn floats_attr(name: &str, v: Vec<f32>) -> pb::AttributeProto {
    pb::AttributeProto {
        r#type: pb::attribute_proto::AttributeType::Floats as i32,
        floats: v,
        ..mk_attr(name)
    }
}

/// An ints attribute of a lowered node.
pub(crate) fn ints_attr(name: &str, v: Vec<i64>) -> pb::AttributeProto {
    pb::AttributeProto {
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: v,
        ..mk_attr(name)
    }
}

/// `value = DequantizeLinear(QuantizeLinear(x, s, z), s, z)` with the same constant,
/// per-tensor scale and u8 zero point on both: returns `(x, s, z)`.
pub(crate) fn activation_qdq(ix: &Index, value: &str) -> Option<(String, f32, u8)> {
    let dq = ix
        .producer(value)
        .filter(|p| p.op_type == "DequantizeLinear")?;
    let q = ix
        .producer(&dq.input[0])
        .filter(|p| p.op_type == "QuantizeLinear")?;
    let u8_zp = ix.initializer(dq.input.get(2)?)?.data_type == 2;
    if !u8_zp {
        return None;
    }
    let scale = ix.f32s(dq.input.get(1)?)?;
    let zp = ix.bytes(dq.input.get(2)?)?;
    let (qs, qz) = (ix.f32s(q.input.get(1)?)?, ix.bytes(q.input.get(2)?)?);
    (scale.len() == 1 && zp.len() == 1 && qs == scale && qz == zp && scale[0] > 0.0)
        .then(|| (q.input[0].clone(), scale[0], zp[0]))
}

/// An activation input of a lowered weight product: the value before its quantizer, the
/// zero point, and its scale — constant, or one per group of time steps.
pub(crate) struct ActQ {
    pub x: String,
    pub scale: f32,
    pub zp: u8,
    /// Per-step scales and the scalar group index that picks one (Finite Set
    /// Calibration, the form `tfmqc_passes::quantize` writes).
    pub steps: Option<(Vec<f32>, String)>,
}

impl ActQ {
    /// The node inputs: the activation, then the group index when scales are per step.
    pub fn inputs(&self) -> Vec<String> {
        let mut v = vec![self.x.clone()];
        v.extend(self.steps.as_ref().map(|(_, g)| g.clone()));
        v
    }

    /// `a_scale`, `a_zero_point` and, per step, `a_scales`.
    pub fn attributes(&self) -> Vec<pb::AttributeProto> {
        let mut a = vec![
            float_attr("a_scale", self.scale),
            int_attr("a_zero_point", self.zp as i64),
        ];
        a.extend(
            self.steps
                .as_ref()
                .map(|(s, _)| floats_attr("a_scales", s.clone())),
        );
        a
    }
}

/// [`activation_qdq`], or the per-step form around a unit-scale pair with a constant zero
/// point:
///
/// ```text
/// s = Gather(scales, group)            scales: f32 [G], group: a scalar index
/// value = Mul(DequantizeLinear(QuantizeLinear(Div(x, s), 1, z), 1, z), s)
/// ```
///
/// which computes `DequantizeLinear(QuantizeLinear(x, s[group], z), s[group], z)`.
pub(crate) fn activation_qdq_steps(ix: &Index, value: &str) -> Option<ActQ> {
    if let Some((x, scale, zp)) = activation_qdq(ix, value) {
        return Some(ActQ {
            x,
            scale,
            zp,
            steps: None,
        });
    }
    let mul = ix
        .producer(value)
        .filter(|p| p.op_type == "Mul" && p.input.len() == 2)?;
    let is_dq = |v: &str| {
        ix.producer(v)
            .is_some_and(|p| p.op_type == "DequantizeLinear")
    };
    let (levels, s) = if is_dq(&mul.input[0]) {
        (&mul.input[0], &mul.input[1])
    } else {
        (&mul.input[1], &mul.input[0])
    };
    let dq = ix
        .producer(levels)
        .filter(|p| p.op_type == "DequantizeLinear")?;
    let q = ix
        .producer(&dq.input[0])
        .filter(|p| p.op_type == "QuantizeLinear")?;
    let div = ix
        .producer(&q.input[0])
        .filter(|p| p.op_type == "Div" && p.input.len() == 2 && &p.input[1] == s)?;
    let gather = ix
        .producer(s)
        .filter(|p| p.op_type == "Gather" && attr_int(p, "axis", 0) == 0)?;
    let table = ix
        .initializer(&gather.input[0])
        .filter(|t| t.dims.len() == 1)?;
    let scales = ix.f32s(&table.name)?;
    let group = gather.input.get(1)?;
    // The group index is computed from t (never a constant), a scalar.
    if ix.initializer(group).is_some() || scales.is_empty() || !scales.iter().all(|&v| v > 0.0) {
        return None;
    }
    let unit = |n: &pb::NodeProto| -> Option<u8> {
        let one = ix.f32s(n.input.get(1)?)?;
        let z = n.input.get(2)?;
        (ix.initializer(z)?.data_type == 2).then_some(())?;
        let z = ix.bytes(z)?;
        (one == [1.0] && z.len() == 1).then_some(z[0])
    };
    let (zq, zd) = (unit(q)?, unit(dq)?);
    (zq == zd).then(|| ActQ {
        x: div.input[0].clone(),
        scale: scales[0],
        zp: zq,
        steps: Some((scales, group.clone())),
    })
}

/// The scale of group `group` (a scalar integer tensor, the node's last input) among
/// `scales`: a group outside the table means a time step outside S, which is an error.
pub(crate) fn step_scale(scales: &[f32], group: &TValue, op: &str) -> TractResult<f32> {
    // tract may carry this integer arithmetic as TDim (its symbolic integers).
    let d = group.datum_type();
    ensure!(
        d.is_integer() || d == DatumType::TDim,
        "{op}: the step-group index is {d:?}, not an integer"
    );
    let g = group.cast_to_scalar::<i64>()?;
    select_step_scale(scales, g).map_err(|e| format_err!("{op}: {e}"))
}

/// The per-step scale a lowered node quantizes its input with at step group `group`
/// (what the QDQ graph's `Gather(scales, group)` gives); a group outside the table means
/// a time step outside S: an error, never a silent clamp.
pub fn select_step_scale(scales: &[f32], group: i64) -> TractResult<f32> {
    ensure!(
        (0..scales.len() as i64).contains(&group),
        "step group {group} outside the {} groups of the per-step scales: the time step is not in the model's set S",
        scales.len()
    );
    Ok(scales[group as usize])
}

pub(crate) fn attr_int(n: &pb::NodeProto, name: &str, default: i64) -> i64 {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .map_or(default, |a| a.i)
}

pub(crate) fn attr_float(n: &pb::NodeProto, name: &str, default: f32) -> f32 {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .map_or(default, |a| a.f)
}

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
        let w = ix
            .initializer(&dq.input[0])
            .filter(|t| t.data_type == 3 && (t.dims.len() == 3 || t.dims.len() == 4))?;
        let scale = ix.f32s(dq.input.get(1)?)?;
        let zero = match dq.input.get(2).filter(|z| !z.is_empty()) {
            Some(z) => ix.bytes(z)?,
            None => vec![],
        };
        let axis = attr_int(dq, "axis", 1);
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
    let prescale = crate::prescale::fold_channel_scale(ix, &mut act, channels, w.dims.len());
    let mut node = pb::NodeProto {
        name: format!("{}/int8", n.name),
        op_type: QCONV.into(),
        domain: "ai.tfmqc".into(),
        input: act.inputs(),
        output: vec![n.output[0].clone()],
        ..Default::default()
    };
    let mut a = act.attributes();
    a.push(floats_attr("w_scale", w_scale));
    a.extend(bias.map(|b| floats_attr("bias", b)));
    for (name, default) in [
        ("pads", vec![0i64; 2 * spatial]),
        ("strides", vec![1; spatial]),
        ("dilations", vec![1; spatial]),
    ] {
        a.push(ints_attr(name, ints(name, default)));
    }
    a.push(int_attr("group", group));
    a.extend(prescale);
    node.attribute = a;
    Some(Rewrite {
        node,
        weight: Some(w.name.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_group_outside_the_table_is_an_error_not_a_clamp() {
        let scales = [0.5f32, 0.25, 0.125];
        assert_eq!(select_step_scale(&scales, 0).unwrap(), 0.5);
        assert_eq!(select_step_scale(&scales, 2).unwrap(), 0.125);
        for g in [3, 7, -1] {
            let e = select_step_scale(&scales, g).unwrap_err().to_string();
            assert!(e.contains("not in the model's set S"), "{e}");
        }
    }
}
