//! The activation quantizers the lowering folds into its int8 nodes: a constant
//! QuantizeLinear/DequantizeLinear pair, or the per-step form `tfmqc_passes::quantize`
//! writes.

use tract_onnx::pb;

use super::Index;
use crate::attr;

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
            attr::float("a_scale", self.scale),
            attr::int("a_zero_point", self.zp as i64),
        ];
        a.extend(
            self.steps
                .as_ref()
                .map(|(s, _)| attr::floats("a_scales", s.clone())),
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
        .filter(|p| p.op_type == "Gather" && attr::int_or(p, "axis", 0) == 0)?;
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
