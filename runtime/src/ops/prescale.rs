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

use crate::kernels::int8::{conv2d, quantize_channels_u8, Backend, Output, PackedConvWeights};

/// The attribute holding the folded per-channel factors.
pub const A_PRESCALE: &str = "a_prescale";

/// Whether the fold is on: `TFMQC_FUSE_PRESCALE=0` turns it off (read once per
/// process), as does [`super::requant::unfused`] on its thread.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !super::requant::forced_off()
        && *ON.get_or_init(|| std::env::var("TFMQC_FUSE_PRESCALE").as_deref() != Ok("0"))
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
        "a_prescale: {} channel factors for {} input channels",
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
