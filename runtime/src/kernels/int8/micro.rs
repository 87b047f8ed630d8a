//! The `MR × NR` micro-kernels (portable and AVX2).

use super::{MR, NR};

/// Operands of one micro-kernel call: i32 lanes holding i16 pairs (see [`super::pair`])
/// or 8-bit quads (see [`super::pack::Packing`]), as the kernel expects.
///
/// Step `s` enumerates `(tap, cs)` with taps outer: broadcast value of tile row `r` is
/// `a[r * a_row + s * a_step]`, the vector side is
/// `b[taps[t] + cs * b_cp .. + NR]`.
pub(crate) struct KernelArgs<'a> {
    pub a: &'a [i32],
    pub a_row: usize,
    pub a_step: usize,
    pub b: &'a [i32],
    pub b_cp: usize,
    pub taps: &'a [usize],
    pub csteps: usize,
}

impl KernelArgs<'_> {
    /// Panics unless every index the kernel touches is in bounds (keeps the SIMD kernel
    /// sound; costs a few integer operations per tile).
    #[inline]
    pub fn check(&self) {
        let steps = self.taps.len() * self.csteps;
        if steps == 0 {
            return;
        }
        let a_max = (MR - 1) * self.a_row + (steps - 1) * self.a_step;
        assert!(
            a_max < self.a.len(),
            "int8 kernel: broadcast operand out of bounds"
        );
        let tap_max = self.taps.iter().copied().max().unwrap_or(0);
        let b_max = tap_max + (self.csteps - 1) * self.b_cp + NR - 1;
        assert!(
            b_max < self.b.len(),
            "int8 kernel: vector operand out of bounds"
        );
    }
}

/// A micro-kernel: writes the `MR × NR` tile (row-major) of accumulators.
pub(crate) type KernelFn = fn(&KernelArgs, &mut [i32; MR * NR]);

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

/// The micro-kernel of an instruction set, for i16 pairs.
pub(crate) fn kernel_for(isa: super::Isa) -> KernelFn {
    match isa {
        #[cfg(target_arch = "x86_64")]
        super::Isa::Avx512Vnni => avx512vnni_kernel(),
        #[cfg(target_arch = "x86_64")]
        super::Isa::Avx2 => avx2_kernel(),
        _ => kernel_portable,
    }
}

/// The micro-kernel for 8-bit quads (u8 × s8 products, four a lane, summed into i32).
/// `unsigned_broadcast`: the broadcast side holds the u8 activations and the vector side
/// the s8 weights (GEMM); else the other way round (conv). `vpdpbusd` needs AVX-512
/// VNNI; without it the portable kernel runs (quads are only packed for that ISA).
pub(crate) fn quad_kernel_for(isa: super::Isa, unsigned_broadcast: bool) -> KernelFn {
    match (isa, unsigned_broadcast) {
        #[cfg(target_arch = "x86_64")]
        (super::Isa::Avx512Vnni, true) => avx512vnni_quad_kernel::<true>(),
        #[cfg(target_arch = "x86_64")]
        (super::Isa::Avx512Vnni, false) => avx512vnni_quad_kernel::<false>(),
        (_, true) => kernel_quads_portable::<true>,
        (_, false) => kernel_quads_portable::<false>,
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
}
