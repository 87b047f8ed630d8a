//! A per-channel constant `Mul` before a quantized convolution's input quantizer, folded
//! into the lowered convolution.
//!
//! TCR (timestep-channel reparameterization) balances an activation's channels before it
//! is quantized:
//!
//! ```text
//! x' = Mul(x, r[C, 1, 1])          r: constant, one factor per input channel
//! Conv(DequantizeLinear(QuantizeLinear(x', s, z), s, z), W, b)
//! ```
//!
//! tract runs the `Mul` as a broadcasting f32 pass over the whole activation (on
//! guided_unet its ~40 of them took about a third of the int8 step). The lowered
//! `TfmqcQConv` takes `x` and `r` instead (`a_prescale`) and quantizes `x · r[c]` in one
//! pass to u8 ([`crate::kernels::int8::quantize_channels_u8`]): the product rounded to
//! f32 before the division, as the two nodes compute it, so the codes are the graph's.

use tract_onnx::tract_hir::internal::*;

use crate::int8_ops::{floats_attr, ActQ, QCONV};
use crate::kernels::int8::{conv2d, quantize_channels_u8, Backend, Output, PackedConvWeights};
use crate::lower::Index;

/// The attribute holding the folded per-channel factors.
pub const A_PRESCALE: &str = "a_prescale";

/// Whether the fold is on: `TFMQC_FUSE_PRESCALE=0` turns it off (read once per
/// process), as does [`crate::requant::unfused`] on its thread.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !crate::requant::forced_off()
        && *ON.get_or_init(|| std::env::var("TFMQC_FUSE_PRESCALE").as_deref() != Ok("0"))
}

/// If `act.x` is `Mul(y, r)` (read only by the quantizer) with `r` a constant f32 of one
/// factor per channel of a rank-`rank` input of `channels` channels (`[C, 1, ..]`, or with
/// a leading 1), moves `act.x` to `y` and returns the `a_prescale` attribute holding `r`.
pub(crate) fn fold_channel_scale(
    ix: &Index,
    act: &mut ActQ,
    channels: usize,
    rank: usize,
) -> Option<tract_onnx::pb::AttributeProto> {
    if !enabled() || !ix.read_once(&act.x) {
        return None;
    }
    let mul = ix
        .producer(&act.x)
        .filter(|m| m.op_type == "Mul" && m.domain.is_empty() && m.input.len() == 2)?;
    let per_channel = |name: &str| -> Option<Vec<f32>> {
        let t = ix.initializer(name).filter(|t| t.data_type == 1)?;
        let d: Vec<i64> = t.dims.clone();
        // Broadcast onto axis 1 of the rank-`rank` input: [C, 1, ..] of rank − 1, or
        // [1, C, 1, ..] of rank `rank`.
        let c = channels as i64;
        let ok = match d.len() {
            n if n + 1 == rank => d[0] == c && d[1..].iter().all(|&v| v == 1),
            n if n == rank => d[0] == 1 && d[1] == c && d[2..].iter().all(|&v| v == 1),
            _ => false,
        };
        let v = ok.then(|| ix.f32s(name))??;
        (v.len() == channels).then_some(v)
    };
    let (y, r) = match (per_channel(&mul.input[1]), per_channel(&mul.input[0])) {
        (Some(r), _) if ix.initializer(&mul.input[0]).is_none() => (&mul.input[0], r),
        (_, Some(r)) if ix.initializer(&mul.input[1]).is_none() => (&mul.input[1], r),
        _ => return None,
    };
    act.x = y.clone();
    Some(floats_attr(A_PRESCALE, r))
}

/// The lowered convolution of an NCHW input `x` with folded channel factors `r`: `x · r[c]`
/// quantized to u8 in one pass (the f32 product never stored), then the kernel on the
/// codes.
pub(crate) fn conv2d_prescaled(
    x: &[f32],
    nchw: [usize; 4],
    r: &[f32],
    a_scale: f32,
    a_zero_point: u8,
    weights: &PackedConvWeights,
    output: Output,
) -> TractResult<()> {
    ensure!(
        r.len() == nchw[1],
        "{QCONV}: {} channel factors for {} input channels",
        r.len(),
        nchw[1]
    );
    let mut codes = vec![0u8; x.len()];
    quantize_channels_u8(
        Backend::Auto,
        x,
        nchw[1],
        nchw[2] * nchw[3],
        r,
        a_scale,
        a_zero_point,
        &mut codes,
    );
    conv2d(Backend::Auto, &codes, nchw, a_zero_point, weights, output);
    Ok(())
}
