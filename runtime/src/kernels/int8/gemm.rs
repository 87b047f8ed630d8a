//! GEMM driver: `out[M, N] = (A[M, K] − a_zp) · W[N, K]ᵀ`.

use super::micro::{self, KernelArgs, KernelFn};
use super::sink::{Channel, Sink};
use super::{pair, Backend, Dequant, Isa, Output, PackedWeights, QuantInt, MR, NR};

/// Bytes of widened activation rows kept hot per chunk (L2-sized).
const CHUNK_BYTES: usize = 128 * 1024;
/// Reduction pairs per block when K is long.
const KC_PAIRS: usize = 512;

/// `out[i, j] = Σ_k (a[i, k] − a_zero_point) · w[j, k]` in i32, `a` row-major `[m, k]`,
/// `out` row-major `[m, w.n()]`, on the fastest backend of this CPU.
pub fn gemm_u8i8(
    a: &[u8],
    m: usize,
    k: usize,
    a_zero_point: u8,
    w: &PackedWeights,
    out: &mut [i32],
) {
    gemm(Backend::Auto, a, m, k, a_zero_point, w, Output::I32(out));
}

/// Like [`gemm_u8i8`], dequantized: `out[i, j] = acc · (a_scale · w_scale[j]) + bias[j]`.
pub fn gemm_u8i8_f32(
    a: &[u8],
    m: usize,
    k: usize,
    a_zero_point: u8,
    w: &PackedWeights,
    dequant: Dequant,
    out: &mut [f32],
) {
    gemm(
        Backend::Auto,
        a,
        m,
        k,
        a_zero_point,
        w,
        Output::F32 { out, dequant },
    );
}

/// General GEMM: u8 or i8 activations `a[m, k]` (row-major) with a zero point, any
/// [`Output`] (`[m, w.n()]`, row-major; channel = column), on the chosen backend.
pub fn gemm<A: QuantInt>(
    backend: Backend,
    a: &[A],
    m: usize,
    k: usize,
    a_zero_point: A,
    w: &PackedWeights,
    out: Output,
) {
    let n = w.n();
    assert_eq!(
        w.k(),
        k,
        "int8 gemm: activation K differs from the weights' K"
    );
    assert_eq!(a.len(), m * k, "int8 gemm: activation length is not m * k");
    assert_eq!(out.len(), m * n, "int8 gemm: output length is not m * n");
    let mut sink = Sink::new(out, n);
    if m == 0 || n == 0 {
        return;
    }
    match backend.isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 only when the CPU supports AVX2.
        Isa::Avx2 => unsafe { gemm_avx2(a, m, k, a_zero_point, w, &mut sink) },
        _ => gemm_impl(micro::kernel_portable, a, m, k, a_zero_point, w, &mut sink),
    }
}

/// The driver compiled for AVX2 (the epilogue and widening loops vectorize with it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gemm_avx2<A: QuantInt>(
    a: &[A],
    m: usize,
    k: usize,
    a_zero_point: A,
    w: &PackedWeights,
    sink: &mut Sink,
) {
    gemm_impl(micro::avx2_kernel(), a, m, k, a_zero_point, w, sink)
}

#[inline(always)]
fn gemm_impl<A: QuantInt>(
    kernel: KernelFn,
    a: &[A],
    m: usize,
    k: usize,
    a_zero_point: A,
    w: &PackedWeights,
    sink: &mut Sink,
) {
    let n = w.n();
    let kpairs = w.kpairs();
    let zp = a_zero_point.to_i32();
    // Reduction blocking: long K runs in blocks of KC_PAIRS pairs, partial sums kept in
    // an i32 scratch of one row chunk (so weight panels stay in L1, activations in L2).
    let kcp = if kpairs <= 2 * KC_PAIRS {
        kpairs.max(1)
    } else {
        KC_PAIRS
    };
    let nkb = kpairs.div_ceil(kcp).max(1);
    let mc = (CHUNK_BYTES / 4 / kcp).clamp(MR, 64 * MR) / MR * MR;
    let mut abuf = vec![0i32; mc * kcp];
    let mut scratch = if nkb > 1 {
        vec![0i32; mc * n]
    } else {
        Vec::new()
    };
    let mut tile = [0i32; MR * NR];
    for m0 in (0..m).step_by(mc) {
        let rows = (m - m0).min(mc);
        let panels = rows.div_ceil(MR);
        for kb in 0..nkb {
            let kp0 = kb * kcp;
            let kl = (kpairs - kp0).min(kcp);
            let used = panels * MR * kl;
            let (k0, k1) = (2 * kp0, (2 * (kp0 + kl)).min(k));
            for (r, dst) in abuf[..used].chunks_exact_mut(kl.max(1)).enumerate() {
                if r < rows {
                    widen_row(&a[(m0 + r) * k..][k0..k1], zp, dst);
                } else {
                    dst.fill(0);
                }
            }
            let last = kb + 1 == nkb;
            for np in 0..n.div_ceil(NR) {
                let cols = (n - np * NR).min(NR);
                let b = &w.panel(np)[kp0 * NR..];
                for mp in 0..panels {
                    let args = KernelArgs {
                        a: &abuf[mp * MR * kl..used],
                        a_row: kl,
                        a_step: 1,
                        b,
                        b_cp: NR,
                        taps: &[0],
                        cpairs: kl,
                    };
                    kernel(&args, &mut tile);
                    for r in 0..(rows - mp * MR).min(MR) {
                        let acc = &mut tile[r * NR..r * NR + cols];
                        if nkb > 1 {
                            let part = &mut scratch[(mp * MR + r) * n + np * NR..][..cols];
                            if kb > 0 {
                                for (x, &p) in acc.iter_mut().zip(part.iter()) {
                                    *x = x.wrapping_add(p);
                                }
                            }
                            if !last {
                                part.copy_from_slice(acc);
                                continue;
                            }
                        }
                        let row = m0 + mp * MR + r;
                        sink.store(row * n + np * NR, acc, Channel::Run(np * NR));
                    }
                }
            }
        }
    }
}

/// Widens one activation row to i16 pairs with the zero point removed (odd K: last pair
/// padded with 0).
#[inline(always)]
pub(crate) fn widen_row<A: QuantInt>(src: &[A], zp: i32, dst: &mut [i32]) {
    let mut it = src.chunks_exact(2);
    for (d, p) in dst.iter_mut().zip(&mut it) {
        *d = pair(p[0].to_i32() - zp, p[1].to_i32() - zp);
    }
    if let [last] = it.remainder() {
        dst[src.len() / 2] = pair(last.to_i32() - zp, 0);
    }
}
