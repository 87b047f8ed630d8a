//! A float `Conv` with few input or output channels as a `TfmqcConvF32` node
//! ([`crate::ops::conv_f32`] has the op).

use tract_onnx::pb;

use super::{Index, Rewrite};
use crate::attr;
use crate::ops::conv_f32::{enabled, CONV_F32, WEIGHT_F32};

/// At most this many input or output channels: the direct loop's work per output is the
/// same as the matrix product's, and its fixed cost far lower, only while one side is
/// small (a UNet's stem and head); wider float convolutions stay with tract.
const MAX_NARROW: i64 = 8;

/// A 2-D `Conv` of an f32 initializer weight `[O, C, kh, kw]` (and f32 bias), stride 1,
/// dilation 1, one group, explicit pads, with `C` or `O` at most [`MAX_NARROW`].
pub(crate) fn match_conv_f32(ix: &Index, n: &pb::NodeProto) -> Option<Rewrite> {
    if !enabled() || n.op_type != "Conv" || n.input.len() < 2 || n.output.len() != 1 {
        return None;
    }
    let w = ix.initializer(&n.input[1]).filter(|t| t.data_type == 1)?;
    let dims = w.dims.clone();
    if dims.len() != 4 || dims.iter().any(|&d| d < 1) || dims[0].min(dims[1]) > MAX_NARROW {
        return None;
    }
    let get = |name: &str| n.attribute.iter().find(|a| a.name == name);
    let ones = |name: &str| get(name).is_none_or(|a| a.ints.iter().all(|&v| v == 1));
    if !(ones("strides") && ones("dilations"))
        || get("group").is_some_and(|a| a.i != 1)
        || get("auto_pad").is_some_and(|a| a.s != b"NOTSET")
        || get("kernel_shape").is_some_and(|a| a.ints[..] != dims[2..])
    {
        return None;
    }
    // ONNX pads: [top, left, bottom, right].
    let pads = get("pads").map_or(vec![0; 4], |a| a.ints.clone());
    if pads.len() != 4 || pads.iter().any(|&p| p < 0) {
        return None;
    }
    let weight = ix.f32s(&n.input[1])?;
    let bias = match n.input.get(2).filter(|b| !b.is_empty()) {
        Some(b) => Some(ix.f32s(b).filter(|b| b.len() == dims[0] as usize)?),
        None => None,
    };
    let mut a = vec![
        attr::floats(WEIGHT_F32, weight),
        attr::ints("dims", dims),
        attr::ints("pads", pads),
    ];
    a.extend(bias.map(|b| attr::floats("bias", b)));
    Some(Rewrite {
        node: pb::NodeProto {
            name: format!("{}/f32", n.name),
            op_type: CONV_F32.into(),
            domain: "ai.tfmqc".into(),
            input: vec![n.input[0].clone()],
            output: n.output.clone(),
            attribute: a,
            ..Default::default()
        },
        weight: None,
    })
}
