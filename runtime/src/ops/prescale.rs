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
//!
//! The same holds before a quantized `Gemm` / `MatMul` with a constant weight (TCR on a
//! linear layer's input: `Mul(x, r[K])`, the factors on the last axis): the lowered
//! `TfmqcQGemm` takes `x` and `r` and quantizes `x · r[k]` row by row.

use tract_onnx::tract_hir::internal::*;

use crate::kernels::int8::{
    conv2d, gemm, quantize_channels_u8, Backend, Output, PackedConvWeights, PackedWeights,
};

/// The attribute holding the folded per-channel factors.
pub const A_PRESCALE: &str = "a_prescale";

/// Whether the fold is on: `TFMQC_FUSE_PRESCALE=0` turns it off (read once per
/// process), as does [`super::requant::unfused`] on its thread.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !super::requant::forced_off()
        && *ON.get_or_init(|| std::env::var("TFMQC_FUSE_PRESCALE").as_deref() != Ok("0"))
}

thread_local! {
    /// The u8 codes of the last prescaled input on this thread, kept for the next call:
    /// a fresh `vec![0; n]` per call costs page faults on every large activation.
    static CODES: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch of `n` u8 codes (contents unspecified: `f` writes
/// them all). Taken out of the thread-local for the call, so a nested call allocates
/// its own rather than aliasing.
fn with_codes<R>(n: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    let mut codes = CODES.take();
    codes.resize(n, 0);
    let r = f(&mut codes[..n]);
    CODES.set(codes);
    r
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
    with_codes(x.len(), |codes| {
        quantize_channels_u8(
            Backend::Auto,
            x,
            nchw[1],
            nchw[2] * nchw[3],
            r,
            a_scale,
            a_zero_point,
            codes,
        );
        conv2d(Backend::Auto, codes, nchw, a_zero_point, weights, output);
    });
    Ok(())
}

/// The lowered Gemm / MatMul of a row-major `x[m, k]` with folded factors `r[k]` on its
/// last axis (TCR before a linear layer: `Mul(x, r[K])`): `x · r[k]` quantized to u8 in
/// one pass, then the GEMM on the codes.
#[allow(clippy::too_many_arguments)] // the conv's arguments with the GEMM's shape
pub(crate) fn gemm_prescaled(
    x: &[f32],
    m: usize,
    k: usize,
    r: &[f32],
    a_scale: f32,
    a_zero_point: u8,
    weights: &PackedWeights,
    output: Output,
) -> TractResult<()> {
    ensure!(
        r.len() == k && x.len() == m * k,
        "a_prescale: {} factors for an input of {} rows of {k}",
        r.len(),
        m
    );
    with_codes(x.len(), |codes| {
        quantize_channels_u8(Backend::Auto, x, k, 1, r, a_scale, a_zero_point, codes);
        gemm(Backend::Auto, codes, m, k, a_zero_point, weights, output);
    });
    Ok(())
}
