//! The `MR × NR` micro-kernels (portable, x86_64 AVX2 / AVX-512 VNNI, aarch64 NEON /
//! dot product / i8mm).

use super::pack::Packing;
use super::{MR, NR};

/// Operands of one micro-kernel call: i32 words holding i16 pairs (see [`super::pair`])
/// or 8-bit quads or octets (see [`super::pack::Packing`]), as the kernel expects; a
/// lane of one step is `words` words (2 for octets, else 1).
///
/// Step `s` enumerates `(tap, cs)` with taps outer: the broadcast lane of tile row `r`
/// starts at `a[r * a_row + s * a_step]`, the vector side is
/// `b[taps[t] + cs * b_cp .. + NR * words]` (all offsets in words).
pub(crate) struct KernelArgs<'a> {
    pub a: &'a [i32],
    pub a_row: usize,
    pub a_step: usize,
    pub b: &'a [i32],
    pub b_cp: usize,
    pub taps: &'a [usize],
    pub csteps: usize,
    pub words: usize,
}

impl KernelArgs<'_> {
    /// Panics unless every index the kernel touches is in bounds (keeps the SIMD kernel
    /// sound; costs a few integer operations per tile).
    #[inline]
    pub fn check(&self) {
        self.check_cols(NR)
    }

    /// [`KernelArgs::check`] for a kernel reading `cols` columns of the vector side.
    #[inline]
    pub fn check_cols(&self, cols: usize) {
        let steps = self.taps.len() * self.csteps;
        if steps == 0 {
            return;
        }
        let a_max = (MR - 1) * self.a_row + (steps - 1) * self.a_step + self.words - 1;
        assert!(
            a_max < self.a.len(),
            "int8 kernel: broadcast operand out of bounds"
        );
        let tap_max = self.taps.iter().copied().max().unwrap_or(0);
        let b_max = tap_max + (self.csteps - 1) * self.b_cp + cols * self.words - 1;
        assert!(
            b_max < self.b.len(),
            "int8 kernel: vector operand out of bounds"
        );
    }
}

/// A micro-kernel: writes the `MR × NR` tile (row-major) of accumulators.
pub(crate) type KernelFn = fn(&KernelArgs, &mut [i32; MR * NR]);

/// Columns of a wide micro-kernel's tile ([`WideKernelFn`]).
pub(crate) const WIDE_NR: usize = 2 * NR;

/// A wide micro-kernel: writes an `MR × WIDE_NR` tile (row-major) of accumulators, the
/// same sums as two `MR × NR` calls side by side.
pub(crate) type WideKernelFn = fn(&KernelArgs, &mut [i32; MR * WIDE_NR]);

/// The wide kernel of `isa` for conv operands packed as `packing` (weights broadcast,
/// u8 input planes the vector side), where one is worth having: AVX-512 VNNI quads, whose
/// `MR × NR` tile holds six zmm accumulators, too few to cover `vpdpbusd`'s latency; two
/// zmm a row make twelve chains and halve the broadcasts per multiply-add. Exact like
/// the narrow kernel (`u8_offset` 0).
pub(crate) fn wide_conv_kernel_for(isa: super::Isa, packing: Packing) -> Option<WideKernelFn> {
    match (packing, isa.vector()) {
        #[cfg(target_arch = "x86_64")]
        (Packing::Quads, super::Isa::Avx512Vnni) => {
            fn run(args: &KernelArgs, tile: &mut [i32; MR * WIDE_NR]) {
                args.check_cols(WIDE_NR);
                // SAFETY: only handed out for `Isa::Avx512Vnni`, which `isa()` returns
                // after AVX-512 F and VNNI were detected; indices were bounds-checked.
                unsafe { avx512vnni::quad_kernel_wide(args, tile) }
            }
            Some(run)
        }
        _ => None,
    }
}

#[inline(always)]
fn lo(x: i32) -> i32 {
    x as i16 as i32
}

#[inline(always)]
fn hi(x: i32) -> i32 {
    x >> 16
}

/// The portable kernels' loop: `lane(a, b)` is what one step adds to an accumulator for a
/// broadcast lane `a` and a vector lane `b` (wrapping i32 accumulation like the SIMD ones).
#[inline(always)]
fn portable(args: &KernelArgs, tile: &mut [i32; MR * NR], lane: impl Fn(i32, i32) -> i32) {
    args.check();
    assert_eq!(args.words, 1, "int8 kernel: one word a lane");
    let mut acc = [[0i32; NR]; MR];
    let mut s = 0;
    for &t in args.taps {
        for cs in 0..args.csteps {
            let bb: &[i32; NR] = args.b[t + cs * args.b_cp..][..NR].try_into().unwrap();
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av = args.a[r * args.a_row + s * args.a_step];
                for (o, &bv) in acc_r.iter_mut().zip(bb) {
                    *o = o.wrapping_add(lane(av, bv));
                }
            }
            s += 1;
        }
    }
    for (dst, src) in tile.chunks_exact_mut(NR).zip(&acc) {
        dst.copy_from_slice(src);
    }
}

/// Portable micro-kernel for i16 pairs (what `vpmaddwd` adds to a lane).
pub(crate) fn kernel_portable(args: &KernelArgs, tile: &mut [i32; MR * NR]) {
    portable(args, tile, |a, b| lo(a) * lo(b) + hi(a) * hi(b))
}

/// A micro-kernel and the offset it subtracts from every unsigned (activation) byte
/// before multiplying (quads and octets only): its tile holds `Σ (u − offset) · s`, so a
/// driver corrects with `(zero point − offset) · Σ weights` instead of `zero point · Σ
/// weights`.
pub(crate) struct Kernel {
    pub run: KernelFn,
    pub u8_offset: i32,
}

/// The one dispatch point of the micro-kernels: the kernel of instruction set `isa` for
/// operands packed as `packing`. `unsigned_broadcast` (quads and octets): the broadcast
/// side holds the u8 activations and the vector side the s8 weights (GEMM); else the
/// other way round (conv). A packing without a kernel on `isa` runs the portable one
/// (valid, slower).
pub(crate) fn kernel_for(isa: super::Isa, packing: Packing, unsigned_broadcast: bool) -> Kernel {
    use super::Isa;
    let exact = |run: KernelFn| Kernel { run, u8_offset: 0 };
    // AMX has only its tile kernels (see `super::amx`): pairs and quads run on the vector
    // set's kernels. Tile-packed weights never reach a micro-kernel (their drivers run
    // `super::amx::Tiles`, emulated below AMX); the quads' kernel stands for them here.
    let isa = isa.vector();
    let packing = match packing {
        Packing::Tiles => Packing::Quads,
        other => other,
    };
    match (packing, isa, unsigned_broadcast) {
        #[cfg(target_arch = "x86_64")]
        (Packing::Pairs, Isa::Avx512Vnni, _) => exact(avx512vnni_kernel()),
        #[cfg(target_arch = "x86_64")]
        (Packing::Pairs, Isa::Avx2, _) => exact(avx2_kernel()),
        // The dot-product sets have no pair instruction of their own; pairs (weights whose
        // centered values leave i8) run on the NEON kernel there.
        #[cfg(target_arch = "aarch64")]
        (Packing::Pairs, Isa::Neon | Isa::Dotprod | Isa::I8mm, _) => exact(neon_kernel()),
        (Packing::Pairs, _, _) => exact(kernel_portable),
        // `vpdpbusd` takes the unsigned operand first, so the broadcast goes there when it
        // holds the activations.
        #[cfg(target_arch = "x86_64")]
        (Packing::Quads, Isa::Avx512Vnni, true) => exact(avx512vnni_quad_kernel::<true>()),
        #[cfg(target_arch = "x86_64")]
        (Packing::Quads, Isa::Avx512Vnni, false) => exact(avx512vnni_quad_kernel::<false>()),
        #[cfg(target_arch = "aarch64")]
        (Packing::Quads, Isa::I8mm, true) => exact(i8mm_quad_kernel::<true>()),
        #[cfg(target_arch = "aarch64")]
        (Packing::Quads, Isa::I8mm, false) => exact(i8mm_quad_kernel::<false>()),
        // `sdot` multiplies signed bytes only: the kernel flips the top bit of each
        // activation byte (u − 128 as s8), which the driver's correction undoes.
        #[cfg(target_arch = "aarch64")]
        (Packing::Quads, Isa::Dotprod, true) => Kernel {
            run: dotprod_quad_kernel::<true>(),
            u8_offset: 128,
        },
        #[cfg(target_arch = "aarch64")]
        (Packing::Quads, Isa::Dotprod, false) => Kernel {
            run: dotprod_quad_kernel::<false>(),
            u8_offset: 128,
        },
        (Packing::Quads, _, true) => exact(kernel_quads_portable::<true>),
        (Packing::Quads, _, false) => exact(kernel_quads_portable::<false>),
        #[cfg(target_arch = "aarch64")]
        (Packing::Octets, Isa::I8mm, true) => exact(i8mm_octet_kernel::<true>()),
        #[cfg(target_arch = "aarch64")]
        (Packing::Octets, Isa::I8mm, false) => exact(i8mm_octet_kernel::<false>()),
        (Packing::Octets, _, true) => exact(kernel_octets_portable::<true>),
        (Packing::Octets, _, false) => exact(kernel_octets_portable::<false>),
        (Packing::Tiles, ..) => unreachable!("tiles run on the quad kernels here"),
    }
}

/// Σ of the four products of a u8 quad and an s8 quad (what `vpdpbusd` adds to a lane).
#[inline(always)]
fn dot_quad(unsigned: i32, signed: i32) -> i32 {
    let (u, s) = (unsigned.to_le_bytes(), signed.to_le_bytes());
    (0..4).map(|i| u[i] as i32 * s[i] as i8 as i32).sum()
}

/// Portable micro-kernel for 8-bit quads (what `vpdpbusd` adds to a lane).
pub(crate) fn kernel_quads_portable<const UNSIGNED_BROADCAST: bool>(
    args: &KernelArgs,
    tile: &mut [i32; MR * NR],
) {
    if UNSIGNED_BROADCAST {
        portable(args, tile, dot_quad)
    } else {
        portable(args, tile, |a, b| dot_quad(b, a))
    }
}

/// Portable micro-kernel for 8-bit octets (what `usmmla` adds, lane by lane: two quads'
/// products).
pub(crate) fn kernel_octets_portable<const UNSIGNED_BROADCAST: bool>(
    args: &KernelArgs,
    tile: &mut [i32; MR * NR],
) {
    args.check();
    assert_eq!(args.words, 2, "int8 kernel: octets are two words a lane");
    let mut acc = [[0i32; NR]; MR];
    let mut s = 0;
    for &t in args.taps {
        for cs in 0..args.csteps {
            let bb = &args.b[t + cs * args.b_cp..][..2 * NR];
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let a = &args.a[r * args.a_row + s * args.a_step..][..2];
                for (o, b) in acc_r.iter_mut().zip(bb.chunks_exact(2)) {
                    let d = if UNSIGNED_BROADCAST {
                        dot_quad(a[0], b[0]).wrapping_add(dot_quad(a[1], b[1]))
                    } else {
                        dot_quad(b[0], a[0]).wrapping_add(dot_quad(b[1], a[1]))
                    };
                    *o = o.wrapping_add(d);
                }
            }
            s += 1;
        }
    }
    for (dst, src) in tile.chunks_exact_mut(NR).zip(&acc) {
        dst.copy_from_slice(src);
    }
}

#[cfg(target_arch = "x86_64")]
fn avx512vnni_quad_kernel<const UNSIGNED_BROADCAST: bool>() -> KernelFn {
    fn run<const U: bool>(args: &KernelArgs, tile: &mut [i32; MR * NR]) {
        args.check();
        // SAFETY: only handed out by `quad_kernel_for` for `Isa::Avx512Vnni`, which
        // `isa()` returns after AVX-512 F and VNNI were detected; indices were
        // bounds-checked by `check`.
        unsafe { avx512vnni::quad_kernel::<U>(args, tile) }
    }
    run::<UNSIGNED_BROADCAST>
}

#[cfg(target_arch = "x86_64")]
fn avx512vnni_kernel() -> KernelFn {
    fn run(args: &KernelArgs, tile: &mut [i32; MR * NR]) {
        args.check();
        // SAFETY: only handed out by `kernel_for` for `Isa::Avx512Vnni`, which `isa()`
        // returns after AVX-512 F and VNNI were detected; indices were bounds-checked by
        // `check`.
        unsafe { avx512vnni::kernel(args, tile) }
    }
    run
}

#[cfg(target_arch = "x86_64")]
fn avx2_kernel() -> KernelFn {
    fn run(args: &KernelArgs, tile: &mut [i32; MR * NR]) {
        args.check();
        // SAFETY: only handed out by `kernel_for` after AVX2 was detected; indices
        // were bounds-checked by `check`.
        unsafe { avx2::kernel(args, tile) }
    }
    run
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::{MR, NR, NV};
    use super::KernelArgs;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX2 and `args.check()` must hold.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn kernel(args: &KernelArgs, tile: &mut [i32; MR * NR]) {
        let mut acc = [[_mm256_setzero_si256(); NV]; MR];
        let a = args.a.as_ptr();
        let b = args.b.as_ptr();
        let a_row = args.a_row;
        let mut pa = a;
        for &t in args.taps {
            let mut pb = b.add(t);
            for _ in 0..args.csteps {
                let bv: [__m256i; NV] =
                    std::array::from_fn(|v| _mm256_loadu_si256(pb.add(8 * v) as *const __m256i));
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let av = _mm256_set1_epi32(*pa.add(r * a_row));
                    for (o, &bvv) in acc_r.iter_mut().zip(&bv) {
                        *o = _mm256_add_epi32(*o, _mm256_madd_epi16(av, bvv));
                    }
                }
                pa = pa.wrapping_add(args.a_step);
                pb = pb.wrapping_add(args.b_cp);
            }
        }
        let out = tile.as_mut_ptr();
        for (r, acc_r) in acc.iter().enumerate() {
            for (v, &x) in acc_r.iter().enumerate() {
                _mm256_storeu_si256(out.add(r * NR + 8 * v) as *mut __m256i, x);
            }
        }
    }
}

/// One 16-lane vector per tile row: `NR` columns in a single zmm, and `vpdpwssd` does
/// `vpmaddwd` + `vpaddd` in one instruction (same i16 pairs, same exact i32 sums).
#[cfg(target_arch = "x86_64")]
mod avx512vnni {
    use super::super::{MR, NR};
    use super::KernelArgs;
    use std::arch::x86_64::*;

    const _: () = assert!(NR == 16, "one zmm of i32 lanes per tile row");

    /// An `MR × NR` kernel with one zmm accumulator per tile row: `$step(acc, a, b)`
    /// adds the products of a broadcast lane `a` and a vector `b` to `acc`.
    macro_rules! zmm_kernel {
        ($(#[$doc:meta])* $name:ident$(<const $c:ident: bool>)?, |$acc:ident, $av:ident, $bv:ident| $step:expr) => {
            $(#[$doc])*
            ///
            /// # Safety
            /// The CPU must support AVX-512 F and VNNI and `args.check()` must hold.
            #[target_feature(enable = "avx512f,avx512vnni")]
            pub(super) unsafe fn $name$(<const $c: bool>)?(
                args: &KernelArgs,
                tile: &mut [i32; MR * NR],
            ) {
                let mut acc = [_mm512_setzero_si512(); MR];
                let a = args.a.as_ptr();
                let b = args.b.as_ptr();
                let a_row = args.a_row;
                let mut pa = a;
                for &t in args.taps {
                    let mut pb = b.add(t);
                    for _ in 0..args.csteps {
                        let $bv = _mm512_loadu_si512(pb as *const _);
                        for (r, acc_r) in acc.iter_mut().enumerate() {
                            let $av = _mm512_set1_epi32(*pa.add(r * a_row));
                            let $acc = *acc_r;
                            *acc_r = $step;
                        }
                        pa = pa.wrapping_add(args.a_step);
                        pb = pb.wrapping_add(args.b_cp);
                    }
                }
                let out = tile.as_mut_ptr();
                for (r, &x) in acc.iter().enumerate() {
                    _mm512_storeu_si512(out.add(r * NR) as *mut _, x);
                }
            }
        };
    }

    zmm_kernel!(
        /// i16 pairs: `vpdpwssd` (`vpmaddwd` + `vpaddd` in one instruction).
        kernel,
        |acc, av, bv| _mm512_dpwssd_epi32(acc, av, bv)
    );

    zmm_kernel!(
        /// u8 × s8 quads: `vpdpbusd` (four products a lane); the unsigned operand must be
        /// the first source, so the broadcast goes there when it holds the activations.
        quad_kernel<const UNSIGNED_BROADCAST: bool>,
        |acc, av, bv| if UNSIGNED_BROADCAST {
            _mm512_dpbusd_epi32(acc, av, bv)
        } else {
            _mm512_dpbusd_epi32(acc, bv, av)
        }
    );

    /// u8 input planes (vector side, two zmm: 32 positions) × s8 weight quads (broadcast):
    /// [`quad_kernel`]`::<false>` on a tile twice as wide, twelve accumulators.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F and VNNI and `args.check_cols(WIDE_NR)` must hold.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(super) unsafe fn quad_kernel_wide(
        args: &KernelArgs,
        tile: &mut [i32; MR * super::WIDE_NR],
    ) {
        let mut acc = [[_mm512_setzero_si512(); 2]; MR];
        let a = args.a.as_ptr();
        let b = args.b.as_ptr();
        let a_row = args.a_row;
        let mut pa = a;
        for &t in args.taps {
            let mut pb = b.add(t);
            for _ in 0..args.csteps {
                let b0 = _mm512_loadu_si512(pb as *const _);
                let b1 = _mm512_loadu_si512(pb.add(NR) as *const _);
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_epi32(*pa.add(r * a_row));
                    acc_r[0] = _mm512_dpbusd_epi32(acc_r[0], b0, av);
                    acc_r[1] = _mm512_dpbusd_epi32(acc_r[1], b1, av);
                }
                pa = pa.wrapping_add(args.a_step);
                pb = pb.wrapping_add(args.b_cp);
            }
        }
        let out = tile.as_mut_ptr();
        for (r, acc_r) in acc.iter().enumerate() {
            _mm512_storeu_si512(out.add(r * super::WIDE_NR) as *mut _, acc_r[0]);
            _mm512_storeu_si512(out.add(r * super::WIDE_NR + NR) as *mut _, acc_r[1]);
        }
    }
}

#[cfg(target_arch = "aarch64")]
fn neon_kernel() -> KernelFn {
    fn run(args: &KernelArgs, tile: &mut [i32; MR * NR]) {
        args.check();
        // SAFETY: NEON is part of every aarch64 target Rust supports here (and `isa()`
        // checked it); indices were bounds-checked by `check`.
        unsafe { aarch64::pairs(args, tile) }
    }
    run
}

#[cfg(target_arch = "aarch64")]
fn dotprod_quad_kernel<const UNSIGNED_BROADCAST: bool>() -> KernelFn {
    fn run<const U: bool>(args: &KernelArgs, tile: &mut [i32; MR * NR]) {
        args.check();
        // SAFETY: only handed out by `quad_kernel_for` for `Isa::Dotprod`, which `isa()`
        // returns after the dot product extension was detected; indices were
        // bounds-checked by `check`.
        unsafe { aarch64::sdot_quads::<U>(args, tile) }
    }
    run::<UNSIGNED_BROADCAST>
}

#[cfg(target_arch = "aarch64")]
fn i8mm_octet_kernel<const UNSIGNED_BROADCAST: bool>() -> KernelFn {
    fn run<const U: bool>(args: &KernelArgs, tile: &mut [i32; MR * NR]) {
        args.check();
        assert_eq!(args.words, 2, "int8 kernel: octets are two words a lane");
        // SAFETY: only handed out by `kernel_for` for `Isa::I8mm`, which `isa()` returns
        // after i8mm was detected; indices were bounds-checked by `check`.
        unsafe { aarch64::usmmla_octets::<U>(args, tile) }
    }
    run::<UNSIGNED_BROADCAST>
}

#[cfg(target_arch = "aarch64")]
fn i8mm_quad_kernel<const UNSIGNED_BROADCAST: bool>() -> KernelFn {
    fn run<const U: bool>(args: &KernelArgs, tile: &mut [i32; MR * NR]) {
        args.check();
        // SAFETY: only handed out by `quad_kernel_for` for `Isa::I8mm`, which `isa()`
        // returns after i8mm was detected; indices were bounds-checked by `check`.
        unsafe { aarch64::usdot_quads::<U>(args, tile) }
    }
    run::<UNSIGNED_BROADCAST>
}

/// aarch64 kernels: one tile row is four 128-bit accumulators (16 i32 lanes), six rows
/// take 24 of the 32 vector registers, the vector side four more and the broadcast side
/// two (rows 0–3 and rows 4–5, one i32 lane a row, read by lane index).
#[cfg(target_arch = "aarch64")]
mod aarch64 {
    use super::super::{MR, NR};
    use super::KernelArgs;
    use std::arch::aarch64::*;
    use std::arch::asm;

    const _: () = assert!(MR == 6 && NR == 16, "six rows of four q registers");

    /// The broadcast values of the six rows of one step: rows 0–3 in the lanes of the
    /// first register, rows 4–5 in the low lanes of the second. Conv panels hold them
    /// contiguously (`a_row == 1`: two plain loads), GEMM rows are `a_row` apart.
    ///
    /// # Safety
    /// `a[r * a_row]` must be readable for the six rows `r` (with `a_row == 1`, `a[0..6]`).
    #[inline(always)]
    unsafe fn rows<const CONTIG: bool>(a: *const i32, a_row: usize) -> (int32x4_t, int32x4_t) {
        if CONTIG {
            (
                vld1q_s32(a),
                vcombine_s32(vld1_s32(a.add(4)), vdup_n_s32(0)),
            )
        } else {
            let z = vdupq_n_s32(0);
            let r0 = vld1q_lane_s32::<0>(a, z);
            let r0 = vld1q_lane_s32::<1>(a.add(a_row), r0);
            let r0 = vld1q_lane_s32::<2>(a.add(2 * a_row), r0);
            let r0 = vld1q_lane_s32::<3>(a.add(3 * a_row), r0);
            let r1 = vld1q_lane_s32::<0>(a.add(4 * a_row), z);
            let r1 = vld1q_lane_s32::<1>(a.add(5 * a_row), r1);
            (r0, r1)
        }
    }

    /// Runs `body::<CONTIG>` with `CONTIG = (a_row == 1)`, so the broadcast loads are
    /// chosen once per tile, not per step.
    macro_rules! by_layout {
        ($body:ident $(::<$c:ident>)?, $args:expr, $tile:expr) => {
            if $args.a_row == 1 {
                $body::<true $(, $c)?>($args, $tile)
            } else {
                $body::<false $(, $c)?>($args, $tile)
            }
        };
    }

    /// Writes the 6 × 4 accumulators as the row-major tile.
    #[inline(always)]
    unsafe fn store(acc: &[[int32x4_t; 4]; MR], tile: &mut [i32; MR * NR]) {
        let out = tile.as_mut_ptr();
        for (r, acc_r) in acc.iter().enumerate() {
            for (q, &x) in acc_r.iter().enumerate() {
                vst1q_s32(out.add(r * NR + 4 * q), x);
            }
        }
    }

    /// i16 pairs: `ld2` splits the 16 pairs of a step into the low (even reduction index)
    /// and high halves of lanes 0–7 and 8–15, and `smlal` / `smlal2` by element multiply
    /// each half by one half of the row's broadcast pair (i16 × i16 → i32, exact, wrapping
    /// accumulation like `vpmaddwd` + `vpaddd`). 4 MACs an instruction.
    ///
    /// # Safety
    /// `args.check()` must hold.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn pairs(args: &KernelArgs, tile: &mut [i32; MR * NR]) {
        by_layout!(pairs_body, args, tile)
    }

    #[inline(always)]
    unsafe fn pairs_body<const CONTIG: bool>(args: &KernelArgs, tile: &mut [i32; MR * NR]) {
        let mut acc = [[vdupq_n_s32(0); 4]; MR];
        let a_row = args.a_row;
        let mut pa = args.a.as_ptr();
        for &t in args.taps {
            let mut pb = args.b.as_ptr().add(t);
            for _ in 0..args.csteps {
                let lo = vld2q_s16(pb as *const i16);
                let hi = vld2q_s16(pb.add(8) as *const i16);
                let (r03, r45) = rows::<CONTIG>(pa, a_row);
                let (r03, r45) = (vreinterpretq_s16_s32(r03), vreinterpretq_s16_s32(r45));
                // Row r's pair is halves 2·(r mod 4) (low) and 2·(r mod 4) + 1 (high).
                macro_rules! row {
                    ($r:literal, $v:ident, $e:literal, $o:literal) => {{
                        let x = &mut acc[$r];
                        x[0] = vmlal_laneq_s16::<$e>(x[0], vget_low_s16(lo.0), $v);
                        x[0] = vmlal_laneq_s16::<$o>(x[0], vget_low_s16(lo.1), $v);
                        x[1] = vmlal_high_laneq_s16::<$e>(x[1], lo.0, $v);
                        x[1] = vmlal_high_laneq_s16::<$o>(x[1], lo.1, $v);
                        x[2] = vmlal_laneq_s16::<$e>(x[2], vget_low_s16(hi.0), $v);
                        x[2] = vmlal_laneq_s16::<$o>(x[2], vget_low_s16(hi.1), $v);
                        x[3] = vmlal_high_laneq_s16::<$e>(x[3], hi.0, $v);
                        x[3] = vmlal_high_laneq_s16::<$o>(x[3], hi.1, $v);
                    }};
                }
                row!(0, r03, 0, 1);
                row!(1, r03, 2, 3);
                row!(2, r03, 4, 5);
                row!(3, r03, 6, 7);
                row!(4, r45, 0, 1);
                row!(5, r45, 2, 3);
                pa = pa.wrapping_add(args.a_step);
                pb = pb.wrapping_add(args.b_cp);
            }
        }
        store(&acc, tile)
    }

    /// `$ins acc.4s, vec.16b, bcast.4b[lane]` (the indexed dot products; the intrinsics of
    /// the dot product and i8mm extensions are unstable in Rust 1.95, inline asm is not).
    /// `.arch_extension` lets the assembler take the instruction whatever the features of
    /// the function it lands in; the kernels that use it check the CPU first.
    macro_rules! dot_lane {
        ($name:ident, $ext:literal, $ins:literal) => {
            #[inline(always)]
            unsafe fn $name<const LANE: i32>(
                acc: int32x4_t,
                vec: int8x16_t,
                bcast: int8x16_t,
            ) -> int32x4_t {
                let mut acc = acc;
                asm!(
                    concat!(".arch_extension ", $ext, "\n", $ins,
                        " {acc:v}.4s, {vec:v}.16b, {bcast:v}.4b[{lane}]"),
                    acc = inout(vreg) acc,
                    vec = in(vreg) vec,
                    bcast = in(vreg) bcast,
                    lane = const LANE,
                    options(pure, nomem, nostack, preserves_flags)
                );
                acc
            }
        };
    }

    dot_lane!(sdot_lane, "dotprod", "sdot");
    // Unsigned vector × signed broadcast (conv: input planes × weights).
    dot_lane!(usdot_lane, "i8mm", "usdot");
    // Signed vector × unsigned broadcast (GEMM: weights × activations).
    dot_lane!(sudot_lane, "i8mm", "sudot");

    /// The quad kernels' loop: `$dot_u::<lane>(acc, vec, bcast)` adds four products a lane
    /// when the broadcast side is unsigned, `$dot_s` when the vector side is; `$flip`:
    /// the unsigned operand's bytes are flipped to `u − 128` first.
    macro_rules! quad_body {
        ($name:ident, $dot_u:ident, $dot_s:ident, $flip:expr) => {
            #[inline(always)]
            unsafe fn $name<const CONTIG: bool, const UNSIGNED_BROADCAST: bool>(
                args: &KernelArgs,
                tile: &mut [i32; MR * NR],
            ) {
                let flip = |x: int8x16_t| -> int8x16_t {
                    if $flip {
                        veorq_s8(x, vdupq_n_s8(i8::MIN))
                    } else {
                        x
                    }
                };
                let mut acc = [[vdupq_n_s32(0); 4]; MR];
                let a_row = args.a_row;
                let mut pa = args.a.as_ptr();
                for &t in args.taps {
                    let mut pb = args.b.as_ptr().add(t) as *const i8;
                    for _ in 0..args.csteps {
                        let mut v: [int8x16_t; 4] =
                            std::array::from_fn(|q| vld1q_s8(pb.add(16 * q)));
                        let (r03, r45) = rows::<CONTIG>(pa, a_row);
                        let (mut r03, mut r45) =
                            (vreinterpretq_s8_s32(r03), vreinterpretq_s8_s32(r45));
                        // The unsigned operand (activations) is the one flipped.
                        if UNSIGNED_BROADCAST {
                            r03 = flip(r03);
                            r45 = flip(r45);
                        } else {
                            v = v.map(flip);
                        }
                        macro_rules! row {
                            ($r:literal, $b:ident, $l:literal) => {{
                                for (x, &vq) in acc[$r].iter_mut().zip(&v) {
                                    *x = if UNSIGNED_BROADCAST {
                                        $dot_u::<$l>(*x, vq, $b)
                                    } else {
                                        $dot_s::<$l>(*x, vq, $b)
                                    };
                                }
                            }};
                        }
                        row!(0, r03, 0);
                        row!(1, r03, 1);
                        row!(2, r03, 2);
                        row!(3, r03, 3);
                        row!(4, r45, 0);
                        row!(5, r45, 1);
                        pa = pa.wrapping_add(args.a_step);
                        pb = pb.wrapping_add(4 * args.b_cp);
                    }
                }
                store(&acc, tile)
            }
        };
    }

    quad_body!(sdot_body, sdot_lane, sdot_lane, true);
    quad_body!(usdot_body, sudot_lane, usdot_lane, false);

    /// u8 × s8 quads with `sdot` (s8 × s8): the activation bytes are flipped to
    /// `u − 128` (one `eor` a register), which the driver's correction undoes. 16 MACs an
    /// instruction.
    ///
    /// # Safety
    /// The CPU must have the dot product extension and `args.check()` must hold.
    #[target_feature(enable = "dotprod")]
    pub(super) unsafe fn sdot_quads<const UNSIGNED_BROADCAST: bool>(
        args: &KernelArgs,
        tile: &mut [i32; MR * NR],
    ) {
        by_layout!(sdot_body::<UNSIGNED_BROADCAST>, args, tile)
    }

    /// u8 × s8 quads with the mixed-sign dot products of i8mm (`sudot` when the broadcast
    /// side holds the u8 activations, `usdot` when the vector side does): the same sums as
    /// `vpdpbusd`, no correction. 16 MACs an instruction.
    ///
    /// # Safety
    /// The CPU must have i8mm and `args.check()` must hold.
    #[target_feature(enable = "i8mm")]
    pub(super) unsafe fn usdot_quads<const UNSIGNED_BROADCAST: bool>(
        args: &KernelArgs,
        tile: &mut [i32; MR * NR],
    ) {
        by_layout!(usdot_body::<UNSIGNED_BROADCAST>, args, tile)
    }

    /// `usmmla acc.4s, u.16b, s.16b`: the 2×2 i32 tile of two rows of 8 u8 (`u`) times
    /// two rows of 8 s8 (`s`), `[u0·s0, u0·s1, u1·s0, u1·s1]`.
    #[inline(always)]
    unsafe fn usmmla(acc: int32x4_t, u: int8x16_t, s: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        asm!(
            ".arch_extension i8mm\nusmmla {acc:v}.4s, {u:v}.16b, {s:v}.16b",
            acc = inout(vreg) acc,
            u = in(vreg) u,
            s = in(vreg) s,
            options(pure, nomem, nostack, preserves_flags)
        );
        acc
    }

    /// u8 × s8 octets with i8mm's `usmmla` (2×8×2 tiles, 32 MACs an instruction): the
    /// 6 × 16 tile is 3 × 8 blocks of 2 × 2, each block's operands one 16-byte register
    /// per side (two rows of 8 reduction bytes). The activations are `usmmla`'s unsigned
    /// operand whichever side they are on; the blocks are reordered into rows at the
    /// store.
    ///
    /// # Safety
    /// The CPU must have i8mm, `args.check()` must hold with two words a lane.
    #[target_feature(enable = "i8mm")]
    pub(super) unsafe fn usmmla_octets<const UNSIGNED_BROADCAST: bool>(
        args: &KernelArgs,
        tile: &mut [i32; MR * NR],
    ) {
        let mut acc = [[vdupq_n_s32(0); NR / 2]; MR / 2];
        let a_row = args.a_row;
        let mut pa = args.a.as_ptr();
        for &t in args.taps {
            let mut pb = args.b.as_ptr().add(t) as *const i8;
            for _ in 0..args.csteps {
                // Rows 2p and 2p + 1 of the broadcast side, eight bytes each.
                let rows: [int8x16_t; MR / 2] = std::array::from_fn(|p| {
                    vcombine_s8(
                        vld1_s8(pa.add(2 * p * a_row) as *const i8),
                        vld1_s8(pa.add((2 * p + 1) * a_row) as *const i8),
                    )
                });
                for q in 0..NR / 2 {
                    // Lanes 2q and 2q + 1 of the vector side.
                    let v = vld1q_s8(pb.add(16 * q));
                    for (acc_p, &r) in acc.iter_mut().zip(&rows) {
                        let x = &mut acc_p[q];
                        *x = if UNSIGNED_BROADCAST {
                            usmmla(*x, r, v)
                        } else {
                            usmmla(*x, v, r)
                        };
                    }
                }
                pa = pa.wrapping_add(args.a_step);
                pb = pb.wrapping_add(4 * args.b_cp);
            }
        }
        let out = tile.as_mut_ptr();
        for (p, acc_p) in acc.iter().enumerate() {
            for h in 0..NR / 4 {
                let (x, y) = (acc_p[2 * h], acc_p[2 * h + 1]);
                let (r0, r1) = if UNSIGNED_BROADCAST {
                    // Blocks are [row][column]: a row is a 64-bit half of each block.
                    let (x, y) = (vreinterpretq_s64_s32(x), vreinterpretq_s64_s32(y));
                    (
                        vreinterpretq_s32_s64(vzip1q_s64(x, y)),
                        vreinterpretq_s32_s64(vzip2q_s64(x, y)),
                    )
                } else {
                    // Blocks are [column][row]: a row is the even or odd lanes.
                    (vuzp1q_s32(x, y), vuzp2q_s32(x, y))
                };
                vst1q_s32(out.add(2 * p * NR + 4 * h), r0);
                vst1q_s32(out.add((2 * p + 1) * NR + 4 * h), r1);
            }
        }
    }
}
