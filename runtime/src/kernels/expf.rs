//! The one `exp` core of the float kernels (the softmax of fused attention, the SiLU of
//! the group norm): `exp(x) = 2ⁿ · e^r` with `n = round(x / ln 2)`, `|r| ≤ ln 2 / 2`,
//! `e^r` by its degree-7 Taylor polynomial. Callers clamp `x` to their range and scale
//! by 2ⁿ in the way their range allows.
//!
//! Branch-free, so the loops around it vectorize. Its multiply-adds are fused
//! (`mul_add`: one rounding, the same bits on every CPU, hardware FMA where the callers
//! enable it — the AVX2 / AVX-512 paths and arm64 — and libm's `fmaf` elsewhere): half
//! the operations and latency of the polynomial.

/// log₂ e.
pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 = LN2_HI + LN2_LO, LN2_HI with few mantissa bits, so that n · LN2_HI is exact.
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 · 2²³: adding it rounds to an integer held in the low mantissa bits.
pub(crate) const ROUND: f32 = 12_582_912.0;
/// The bits of [`ROUND`].
pub(crate) const ROUND_BITS: i32 = 0x4B40_0000;
/// The Taylor coefficients of `e^r`, highest degree first (Horner order).
pub(crate) const POLY: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// `(e^r, n)` for `x` in `[−87, 88]` (the caller clamps): `exp(x) = e^r · 2ⁿ`. (The
/// AVX-512 attention rows, `int8::attention`, compute the same steps with intrinsics.)
#[inline(always)]
pub(crate) fn reduced(x: f32) -> (f32, i32) {
    // Round to nearest through the mantissa of `t` (|x · log2 e| < 2²²), and read the
    // integer back from its bits: no float-to-int conversion (which does not vectorize).
    let t = x.mul_add(LOG2E, ROUND);
    let n = t - ROUND;
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND_BITS);
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut poly = POLY[0];
    for c in &POLY[1..] {
        poly = poly.mul_add(r, *c);
    }
    (poly, n_int)
}

/// 2ⁿ for `n` in the normal exponents (−126 ..= 127).
#[inline(always)]
pub(crate) fn pow2(n: i32) -> f32 {
    f32::from_bits(((n + 127) as u32) << 23)
}
