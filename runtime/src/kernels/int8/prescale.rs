//! Per-channel scaling fused into an activation's quantizer.

use super::sink::quantize;
use super::Backend;
#[cfg(target_arch = "x86_64")]
use super::Isa;

/// `out = QuantizeLinear(x · r[c], scale, zero_point)` for an NCHW-like `x` of `channels`
/// channels of `plane` values each (`x.len()` a multiple of `channels · plane`; `plane = 1`
/// is a row-major `[.., channels]` input with its factors on the last axis): ONNX
/// `Mul` by a per-channel constant, then `QuantizeLinear` (round half to even, saturate),
/// bit for bit — the product is rounded to f32 before the division, as the two nodes do
/// — in one pass that writes u8 instead of the f32 product. Vectorized on AVX2.
#[allow(clippy::too_many_arguments)] // the shape, the factors and the quantizer, as quantize_u8's
pub fn quantize_channels_u8(
    backend: Backend,
    x: &[f32],
    channels: usize,
    plane: usize,
    r: &[f32],
    scale: f32,
    zero_point: u8,
    out: &mut [u8],
) {
    assert_eq!(
        x.len(),
        out.len(),
        "int8: quantize_channels_u8 lengths differ"
    );
    assert_eq!(r.len(), channels, "int8: one channel scale per channel");
    assert!(
        channels * plane == 0 || x.len().is_multiple_of(channels * plane),
        "int8: input is not whole images of {channels} × {plane}"
    );
    #[inline(always)]
    fn run(x: &[f32], plane: usize, r: &[f32], scale: f32, zp: i32, out: &mut [u8]) {
        if plane == 0 {
            return;
        }
        if plane == 1 {
            // Factors on the last axis (a Gemm/MatMul input `[.., K]`): row by row, so
            // the loop over a row vectorizes.
            let c = r.len();
            for (xs, os) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
                for ((o, &v), &rc) in os.iter_mut().zip(xs).zip(r) {
                    *o = quantize(v * rc, scale, zp, 0, 255) as u8;
                }
            }
            return;
        }
        for (i, (xs, os)) in x
            .chunks_exact(plane)
            .zip(out.chunks_exact_mut(plane))
            .enumerate()
        {
            let rc = r[i % r.len()];
            for (o, &v) in os.iter_mut().zip(xs) {
                *o = quantize(v * rc, scale, zp, 0, 255) as u8;
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(x: &[f32], plane: usize, r: &[f32], scale: f32, zp: i32, out: &mut [u8]) {
        run(x, plane, r, scale, zp, out)
    }
    let zp = zero_point as i32;
    match backend.isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 or better only when the CPU supports AVX2.
        Isa::Avx2 | Isa::Avx512Vnni | Isa::Amx => unsafe { run_avx2(x, plane, r, scale, zp, out) },
        _ => run(x, plane, r, scale, zp, out),
    }
}
