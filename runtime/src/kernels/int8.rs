//! Exact int8 GEMM and Conv2d kernels (u8/i8 activations × i8/u8 weights → i32),
//! with fused dequantization to f32 and requantization to u8/i8.
//!
//! # Design
//!
//! Everything runs through one micro-kernel that computes an `MR × NR` tile of i32
//! accumulators from two operands holding **pairs of i16 values** (packed into one i32,
//! low half = even reduction index): a *broadcast* side (one pair per tile row and step)
//! and a *vector* side (`NR` pairs per step). On x86_64 with AVX2 the step is
//! `vpbroadcastd` + `vpmaddwd` + `vpaddd`; `vpmaddwd` multiplies i16×i16 into exact i32
//! and adds adjacent pairs, so there is no saturation anywhere (unlike `vpmaddubsw`,
//! whose u8×s8 pair sums saturate at 16 bits for full-range weights).
//!
//! Where a CPU has a byte dot product, weights are packed as s8 *quads* (four reduction
//! neighbours a lane: `vpdpbusd`, aarch64 `sdot` / `usdot`) or *octets* (eight, two lanes
//! per 16-byte operand of aarch64 i8mm's `usmmla` 2×8×2 tile), activations stay raw u8 and
//! `zero point · Σ weights` is subtracted per channel (see [`Packing`]). On aarch64 the
//! pairs run on NEON (`ld2` + `smlal`), quads on `sdot` (activation bytes flipped to
//! `u − 128`, undone by the correction) or `usdot`/`sudot`, octets on `usmmla`; all paths
//! are bit-identical to the portable kernels (`micro::kernel_for` is the one dispatch
//! point).
//!
//! Where a CPU has AMX-INT8 (x86_64 Sapphire Rapids and later), weights are packed as
//! [`Packing::Tiles`] and convolutions and GEMMs run in blocks of 32 × 32 i32 accumulators
//! on the tile unit (`amx`: `tdpbsud` / `tdpbusd`, 16 × 16 × 64 products an instruction),
//! reading the same phase planes and activation rows as quads; a plain-Rust emulation of
//! the tiles runs the same blocks anywhere (tests, and tile-packed weights below AMX).
//!
//! Zero points are subtracted while widening to i16 (`a − a_zp ∈ [−255, 255]`), so no
//! zero-point correction with row sums is needed and padded positions are plain zeros.
//! Results are exact (bit-identical to an i64 reference reduced to i32) as long as the
//! sum of `|a − a_zp| · |w − w_zp|` over the reduction fits in i32, i.e. for any
//! reduction length `K ≤ 65_793` with i8 weights (`K ≤ 33_025` with u8 weights).
//! Beyond that the i32 accumulators wrap (both backends identically).
//!
//! * GEMM: the activation rows are the broadcast side (widened per chunk of rows), the
//!   pre-packed weights ([`PackedWeights`]) the vector side, so a tile row is a run of
//!   output channels and stores are contiguous. K > 2048 runs in blocks of 1024 with i32
//!   partial sums in a scratch buffer.
//! * Conv2d (NCHW): pre-packed weights ([`PackedConvWeights`]) are the broadcast side; the
//!   input is widened once per (image, group) into zero-padded, channel-pair-interleaved
//!   planes split into `stride_h × stride_w` phases (space-to-depth). In that layout every
//!   kernel tap reads `NR` *consecutive* positions at a fixed offset, so the convolution is
//!   an implicit GEMM with no im2col buffer at all (1×1 stride-1 convolutions are just the
//!   widening pass + GEMM). Output positions are computed on the padded row pitch; the
//!   few columns that fall into the padding are computed and dropped.
//!
//! Dequantized output is `(acc as f32) * (a_scale * w_scale[ch]) + bias[ch]` (scale
//! product first, then one multiply, then the add; no FMA, identical on all backends).
//! Requantized output is `clamp(round_half_even(dequant / out_scale) + out_zp)`, the ONNX
//! `QuantizeLinear` rule.

mod amx;
mod attention;
mod conv;
mod gemm;
mod micro;
mod pack;
pub(crate) mod par;
mod prescale;
mod sink;

#[cfg(test)]
mod tests;

pub use attention::{attention_quantize, AttentionOperand, AttentionShape, ProbQuant, ScoreScale};
pub use conv::{conv2d, conv2d_quantize, conv2d_u8i8};
pub use gemm::{gemm, gemm_quantize, gemm_u8i8, gemm_u8i8_f32, matmul_quantize, QuantOperand};
pub use pack::{ConvGeometry, PackedConvWeights, PackedWeights, Packing, WeightLayout};
pub use prescale::quantize_channels_u8;

/// Rows of the micro-kernel tile (broadcast side).
pub(crate) const MR: usize = 6;
/// 8-lane vectors per tile row.
pub(crate) const NV: usize = 2;
/// Columns of the micro-kernel tile (vector side).
pub(crate) const NR: usize = 8 * NV;

/// Which implementation of the micro-kernel to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Backend {
    /// The fastest backend this CPU supports (detected at run time), unless the
    /// environment variable `TFMQC_INT8_BACKEND` (see [`Backend::name`]) names a slower
    /// one, e.g. to measure the AVX2 path on a CPU that has more.
    #[default]
    Auto,
    /// x86_64 AMX-INT8 (Sapphire Rapids and later): `tdpbsud` / `tdpbusd` multiply a 16 ×
    /// 64 byte tile by a 16 × 16 quad tile into 16 × 16 i32 accumulators, 16,384 products
    /// an instruction, for the convolutions and GEMMs whose weights are packed as
    /// [`Packing::Tiles`]; everything else runs as on [`Backend::Avx512Vnni`], its
    /// fallback (also when the kernel refuses the process the tile state).
    Amx,
    /// x86_64 AVX-512 VNNI (`vpdpwssd`: the i16 pair product and the accumulation in one
    /// instruction, 16 lanes). Falls back like [`Backend::Avx2`] when the CPU lacks it.
    Avx512Vnni,
    /// x86_64 AVX2 (`vpmaddwd` + `vpaddd`). Falls back to [`Backend::Portable`] when the
    /// CPU lacks AVX2; check [`Backend::is_available`] to know.
    Avx2,
    /// aarch64 with FEAT_I8MM: `usdot` / `sudot` (u8 × s8 quads, no sign trick). Falls
    /// back like [`Backend::Dotprod`] when the CPU lacks it.
    I8mm,
    /// aarch64 with FEAT_DotProd: `sdot` on s8 quads (u8 activations shifted by 128,
    /// corrected with the weight sums). Falls back to [`Backend::Neon`].
    Dotprod,
    /// aarch64 Advanced SIMD (every aarch64 CPU): `ld2` + `smlal` / `smlal2` on the i16
    /// pairs the x86 kernels use. Falls back to [`Backend::Portable`] elsewhere.
    Neon,
    /// Plain Rust, any CPU.
    Portable,
}

impl Backend {
    /// Every concrete backend (all but `Auto`), fastest first within an architecture.
    pub const ALL: [Backend; 7] = [
        Backend::Amx,
        Backend::Avx512Vnni,
        Backend::Avx2,
        Backend::I8mm,
        Backend::Dotprod,
        Backend::Neon,
        Backend::Portable,
    ];

    /// Whether this backend really runs on this CPU (`Auto` and `Portable` always do).
    pub fn is_available(self) -> bool {
        match self {
            Backend::Auto | Backend::Portable => true,
            concrete => Isa::of(concrete).is_some_and(Isa::available),
        }
    }

    /// The concrete backend `Auto` resolves to on this CPU (and environment).
    pub fn detect() -> Backend {
        Backend::Auto.isa().backend()
    }

    /// The backend's name as `TFMQC_INT8_BACKEND` takes it: `amx`, `avx512vnni`, `avx2`,
    /// `i8mm`, `dotprod`, `neon`, `portable` (and `auto`).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Amx => "amx",
            Backend::Avx512Vnni => "avx512vnni",
            Backend::Avx2 => "avx2",
            Backend::I8mm => "i8mm",
            Backend::Dotprod => "dotprod",
            Backend::Neon => "neon",
            Backend::Portable => "portable",
        }
    }

    /// The instruction set to run: never one the CPU lacks.
    pub(crate) fn isa(self) -> Isa {
        match Isa::of(self) {
            None => auto_isa(),
            Some(wanted) => wanted.or_fallback(),
        }
    }
}

/// A resolved [`Backend`]. Each architecture's sets form a chain, fastest first, that
/// [`Isa::fallback`] walks down to `Portable`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Portable,
    Avx2,
    Avx512Vnni,
    Amx,
    Neon,
    Dotprod,
    I8mm,
}

impl Isa {
    fn of(backend: Backend) -> Option<Isa> {
        Some(match backend {
            Backend::Auto => return None,
            Backend::Amx => Isa::Amx,
            Backend::Avx512Vnni => Isa::Avx512Vnni,
            Backend::Avx2 => Isa::Avx2,
            Backend::I8mm => Isa::I8mm,
            Backend::Dotprod => Isa::Dotprod,
            Backend::Neon => Isa::Neon,
            Backend::Portable => Isa::Portable,
        })
    }

    fn backend(self) -> Backend {
        match self {
            Isa::Portable => Backend::Portable,
            Isa::Avx2 => Backend::Avx2,
            Isa::Avx512Vnni => Backend::Avx512Vnni,
            Isa::Amx => Backend::Amx,
            Isa::Neon => Backend::Neon,
            Isa::Dotprod => Backend::Dotprod,
            Isa::I8mm => Backend::I8mm,
        }
    }

    /// The next slower set of the same architecture.
    fn fallback(self) -> Isa {
        match self {
            Isa::Amx => Isa::Avx512Vnni,
            Isa::Avx512Vnni => Isa::Avx2,
            Isa::I8mm => Isa::Dotprod,
            Isa::Dotprod => Isa::Neon,
            Isa::Avx2 | Isa::Neon | Isa::Portable => Isa::Portable,
        }
    }

    /// The set for everything but the tile kernels: AMX has only those, and runs the
    /// rest (attention's vector code, widening passes) as AVX-512 VNNI does.
    pub(crate) fn vector(self) -> Isa {
        match self {
            Isa::Amx => Isa::Avx512Vnni,
            other => other,
        }
    }

    /// This set if the CPU has it, else the first of its fallbacks that it has.
    fn or_fallback(self) -> Isa {
        let mut isa = self;
        while !isa.available() {
            isa = isa.fallback();
        }
        isa
    }

    fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            Isa::Avx2 => avx2_available(),
            Isa::Avx512Vnni => avx512vnni_available(),
            Isa::Amx => avx512vnni_available() && amx::available(),
            Isa::Neon => aarch64_feature(AArch64Feature::Neon),
            Isa::Dotprod => aarch64_feature(AArch64Feature::Dotprod),
            Isa::I8mm => aarch64_feature(AArch64Feature::I8mm),
        }
    }
}

/// What `Backend::Auto` runs: the best of this CPU, capped by `TFMQC_INT8_BACKEND` (read
/// once per process; a name of another architecture's backend caps to `portable`).
fn auto_isa() -> Isa {
    static AUTO: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *AUTO.get_or_init(|| {
        let best = if cfg!(target_arch = "aarch64") {
            Isa::I8mm
        } else {
            Isa::Amx
        };
        let cap = std::env::var("TFMQC_INT8_BACKEND")
            .ok()
            .and_then(|name| Backend::ALL.into_iter().find(|b| b.name() == name))
            .and_then(Isa::of)
            .unwrap_or(best);
        cap.or_fallback()
    })
}

fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // FMA too: the attention's softmax runs fused multiply-adds on this path.
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn avx512vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // The drivers around the kernel are compiled for AVX2.
        avx2_available()
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[derive(Clone, Copy)]
enum AArch64Feature {
    Neon,
    Dotprod,
    I8mm,
}

fn aarch64_feature(f: AArch64Feature) -> bool {
    #[cfg(target_arch = "aarch64")]
    {
        match f {
            AArch64Feature::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            AArch64Feature::Dotprod => std::arch::is_aarch64_feature_detected!("dotprod"),
            AArch64Feature::I8mm => std::arch::is_aarch64_feature_detected!("i8mm"),
        }
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        let _ = f;
        false
    }
}

/// An 8-bit quantized integer element (activation or weight).
pub trait QuantInt: Copy + Send + Sync + 'static + private::Sealed {
    /// What maps the type's range onto u8's `0..=255` (0 for u8, 128 for i8): quads
    /// take activations as u8.
    const TO_U8: i32;
    /// The value as i32 (no zero point applied).
    fn to_i32(self) -> i32;
}

impl QuantInt for u8 {
    const TO_U8: i32 = 0;
    #[inline(always)]
    fn to_i32(self) -> i32 {
        self as i32
    }
}

impl QuantInt for i8 {
    const TO_U8: i32 = 128;
    #[inline(always)]
    fn to_i32(self) -> i32 {
        self as i32
    }
}

mod private {
    pub trait Sealed {}
    impl Sealed for u8 {}
    impl Sealed for i8 {}
}

/// Scales turning i32 accumulators into real values:
/// `(acc as f32) * (a_scale * w_scale[ch]) + bias[ch]`.
#[derive(Clone, Copy, Debug)]
pub struct Dequant<'a> {
    /// Scale of the activation (per tensor).
    pub a_scale: f32,
    /// Scale of the weights: one value (per tensor) or one per output channel.
    pub w_scale: &'a [f32],
    /// Optional float bias, one per output channel.
    pub bias: Option<&'a [f32]>,
}

/// Where and how a kernel writes its result.
#[derive(Debug)]
pub enum Output<'a> {
    /// Raw i32 accumulators.
    I32(&'a mut [i32]),
    /// Dequantized f32 values.
    F32 {
        out: &'a mut [f32],
        dequant: Dequant<'a>,
    },
    /// Dequantized, then requantized to u8 with `scale` / `zero_point`.
    U8 {
        out: &'a mut [u8],
        dequant: Dequant<'a>,
        scale: f32,
        zero_point: u8,
    },
    /// Dequantized, then requantized to i8 with `scale` / `zero_point`.
    I8 {
        out: &'a mut [i8],
        dequant: Dequant<'a>,
        scale: f32,
        zero_point: i8,
    },
    /// Dequantized, requantized to u8 codes with `scale` / `zero_point` and dequantized
    /// back: `(q - zero_point) · scale` in f32, what an ONNX QuantizeLinear →
    /// DequantizeLinear pair on the output computes, without its two passes.
    Requant {
        out: &'a mut [f32],
        dequant: Dequant<'a>,
        scale: f32,
        zero_point: u8,
    },
    /// f32 values (dequantized as [`Output::F32`], or, with `requant`'s scale and zero
    /// point, as [`Output::Requant`]) plus `addend`, added as each run is stored: what an
    /// ONNX `Add` of the output and another tensor computes (the same f32 addition), in
    /// the store's pass over the output instead of a pass of its own.
    Sum {
        out: &'a mut [f32],
        dequant: Dequant<'a>,
        requant: Option<(f32, u8)>,
        addend: Addend<'a>,
    },
}

/// What [`Output::Sum`] adds to the output value at index `i`.
#[derive(Clone, Copy, Debug)]
pub enum Addend<'a> {
    /// `values[i]`: a tensor of the output's shape (a residual connection).
    Same(&'a [f32]),
    /// `values[(i / plane) % values.len()]`: one value per plane of `plane` outputs,
    /// repeating over images (`[N or 1, C, 1, 1]` added to a convolution's `[N, C, H, W]`:
    /// a time embedding). Convolutions only: their stored runs never cross a plane.
    Planes { values: &'a [f32], plane: usize },
}

impl Output<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Output::I32(o) => o.len(),
            Output::F32 { out, .. } => out.len(),
            Output::U8 { out, .. } => out.len(),
            Output::I8 { out, .. } => out.len(),
            Output::Requant { out, .. } => out.len(),
            Output::Sum { out, .. } => out.len(),
        }
    }
}

/// ONNX `QuantizeLinear` to u8: `out[i] = clamp(round_half_even(x[i] / scale) + zp)`
/// (the rule of every requantizing store), vectorized on AVX2.
pub fn quantize_u8(backend: Backend, x: &[f32], scale: f32, zero_point: u8, out: &mut [u8]) {
    assert_eq!(x.len(), out.len(), "int8: quantize_u8 lengths differ");
    #[inline(always)]
    fn run(x: &[f32], scale: f32, zp: i32, out: &mut [u8]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = sink::quantize(v, scale, zp, 0, 255) as u8;
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(x: &[f32], scale: f32, zp: i32, out: &mut [u8]) {
        run(x, scale, zp, out)
    }
    match backend.isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 or better only when the CPU supports AVX2.
        Isa::Avx2 | Isa::Avx512Vnni | Isa::Amx => unsafe {
            run_avx2(x, scale, zero_point as i32, out)
        },
        _ => run(x, scale, zero_point as i32, out),
    }
}

/// Encodes two i16 values as the i32 lane `vpmaddwd` expects (low half first).
#[inline(always)]
pub(crate) fn pair(lo: i32, hi: i32) -> i32 {
    debug_assert!((-32768..=32767).contains(&lo) && (-32768..=32767).contains(&hi));
    ((lo as u16 as u32) | ((hi as u16 as u32) << 16)) as i32
}
