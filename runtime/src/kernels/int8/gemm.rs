//! GEMM driver: `out[M, N] = (A[M, K] − a_zp) · W[N, K]ᵀ`.

use super::amx::{self, Tiles};
use super::micro::{self, KernelArgs, KernelFn};
use super::pack::{quad_u8, Packing};
use super::par;
use super::sink::{quantize, Channel, Sink};
#[cfg(target_arch = "x86_64")]
use super::Isa;
use super::{pair, Backend, Dequant, Output, PackedWeights, QuantInt, MR, NR};

/// Bytes of widened activation rows kept hot per chunk (L2-sized).
const CHUNK_BYTES: usize = 128 * 1024;
/// Reduction values per block when K is long (blocking starts at twice this).
const KC: usize = 1024;

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
/// [`Output`] (`[m, w.n()]`, row-major; channel = column), on the chosen backend. Splits
/// its rows over tract's current executor.
pub fn gemm<A: QuantInt>(
    backend: Backend,
    a: &[A],
    m: usize,
    k: usize,
    a_zero_point: A,
    w: &PackedWeights,
    out: Output,
) {
    let zp = a_zero_point.to_i32();
    let center = move |v: A| v.to_i32() - zp;
    gemm_run(backend, a, m, k, center, zp + A::TO_U8, w, out, true)
}

/// GEMM of f32 activations `a[m, k]` quantized on the fly to u8 with `scale` and
/// `zero_point` (ONNX `QuantizeLinear`): bit-identical to [`super::quantize_u8`]
/// followed by [`gemm`], without the u8 copy.
#[allow(clippy::too_many_arguments)]
pub fn gemm_quantize(
    backend: Backend,
    a: &[f32],
    m: usize,
    k: usize,
    scale: f32,
    zero_point: u8,
    w: &PackedWeights,
    out: Output,
) {
    let zp = zero_point as i32;
    gemm_run(
        backend,
        a,
        m,
        k,
        move |v: f32| quantize(v, scale, zp, 0, 255) - zp,
        zp,
        w,
        out,
        true,
    )
}

/// Row blocking of one GEMM call.
struct Blocking {
    /// Reduction steps (pairs or quads).
    ksteps: usize,
    /// Reduction steps per block.
    kcs: usize,
    /// Reduction blocks.
    nkb: usize,
    /// Rows per chunk (a multiple of MR).
    mc: usize,
}

/// `center(v)` is the activation minus its zero point (what pairs hold); `center(v) +
/// zero_u8` is the activation as u8, `0..=255` (what quads hold). `parallel`: the call
/// may split over the pool (false inside a unit of work that already runs on it; the
/// result is the same either way).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_run<A: Copy + Sync, C: Fn(A) -> i32 + Copy + Sync>(
    backend: Backend,
    a: &[A],
    m: usize,
    k: usize,
    center: C,
    zero_u8: i32,
    w: &PackedWeights,
    out: Output,
    parallel: bool,
) {
    let n = w.n();
    assert_eq!(
        w.k(),
        k,
        "int8 gemm: activation K differs from the weights' K"
    );
    assert_eq!(a.len(), m * k, "int8 gemm: activation length is not m * k");
    assert_eq!(out.len(), m * n, "int8 gemm: output length is not m * n");
    let sink = Sink::new(out, n);
    if m == 0 || n == 0 {
        return;
    }
    let isa = backend.isa();
    // Activations (u8) are the broadcast side, the weights (s8) the vector side.
    let micro::Kernel {
        run: kernel,
        u8_offset,
    } = micro::kernel_for(isa, w.packing(), true);
    let ksteps = w.steps();
    // Reduction blocking: K > 2·KC runs in blocks of KC values, partial sums kept in an
    // i32 scratch of one row chunk (so weight panels stay in L1, activations in L2). It
    // depends on K and the packing only, so every row is computed the same way whatever
    // the chunks.
    let kc_steps = KC / w.packing().width();
    let kcs = if ksteps <= 2 * kc_steps {
        ksteps.max(1)
    } else {
        kc_steps
    };
    let nkb = ksteps.div_ceil(kcs).max(1);
    let words = w.packing().words();
    // Rows a tile computes: MR, or two row tiles of 16 for tile-packed weights.
    let tiles = w.packing() == Packing::Tiles;
    let mr = if tiles { 2 * amx::TILE } else { MR };
    let mc_cache = (CHUNK_BYTES / 4 / (kcs * words)).clamp(mr, 64 * MR) / mr * mr;
    // Enough chunks to keep every thread busy.
    let kind = if tiles {
        par::Kind::GemmTiles
    } else {
        par::Kind::Gemm
    };
    let split = parallel && par::worth_splitting(kind, m * n * k);
    let threads = if split { par::threads() } else { 1 };
    let mc = mc_cache.min(m.div_ceil(threads).div_ceil(mr) * mr);
    let bl = Blocking {
        ksteps,
        kcs,
        nkb,
        mc,
    };
    let rows = Rows {
        a,
        m,
        k,
        center,
        zero_u8,
        correction: zero_u8 - u8_offset,
    };
    let unit = isa == super::Isa::Amx;
    par::for_each(m.div_ceil(mc), split, |ci| match (tiles, isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Avx2 (or better) only when detected; chunks store disjoint rows.
        (true, Isa::Avx2 | Isa::Avx512Vnni | Isa::Amx) => unsafe {
            chunk_tiles_avx2(&bl, &rows, w, ci, &sink, unit)
        },
        // SAFETY: chunks store disjoint rows.
        (true, _) => unsafe { chunk_tiles(&bl, &rows, w, ci, &sink, unit) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Avx2 (or better) only when detected; chunks store disjoint rows.
        (false, Isa::Avx2 | Isa::Avx512Vnni | Isa::Amx) => unsafe {
            chunk_avx2(kernel, &bl, &rows, w, ci, &sink)
        },
        // SAFETY: chunks store disjoint rows.
        (false, _) => unsafe { chunk(kernel, &bl, &rows, w, ci, &sink) },
    });
}

/// The activation rows of one GEMM call and how to read them.
struct Rows<'a, A, C> {
    a: &'a [A],
    m: usize,
    k: usize,
    /// Value minus zero point (pairs).
    center: C,
    /// The zero point as u8 (quads hold `center + zero_u8`).
    zero_u8: i32,
    /// What multiplies each channel's weight sum in the quads' correction: the zero
    /// point, less the offset the kernel subtracted from every activation byte.
    correction: i32,
}

/// [`chunk`] compiled for AVX2 (the epilogue and widening loops vectorize with it).
///
/// # Safety
/// The CPU must support AVX2; as [`chunk`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn chunk_avx2<A: Copy, C: Fn(A) -> i32 + Copy>(
    kernel: KernelFn,
    bl: &Blocking,
    rows: &Rows<A, C>,
    w: &PackedWeights,
    ci: usize,
    sink: &Sink,
) {
    chunk(kernel, bl, rows, w, ci, sink)
}

/// Rows `ci * mc ..` of the output.
///
/// # Safety
/// No other thread may store the same rows at the same time.
#[inline(always)]
unsafe fn chunk<A: Copy, C: Fn(A) -> i32 + Copy>(
    kernel: KernelFn,
    bl: &Blocking,
    rows: &Rows<A, C>,
    w: &PackedWeights,
    ci: usize,
    sink: &Sink,
) {
    let n = w.n();
    let Blocking {
        ksteps,
        kcs,
        nkb,
        mc,
    } = *bl;
    let Rows {
        m, k, correction, ..
    } = *rows;
    // Quads and octets hold raw u8 activations, four a word.
    let bytes = w.packing() != Packing::Pairs;
    let width = w.packing().width();
    let words = w.packing().words();
    let m0 = ci * mc;
    let mut abuf = vec![0i32; mc * kcs * words];
    let mut scratch = if nkb > 1 {
        vec![0i32; mc * n]
    } else {
        Vec::new()
    };
    let mut tile = [0i32; MR * NR];
    let mut wide = Vec::new();
    let nrows = (m - m0).min(mc);
    let panels = nrows.div_ceil(MR);
    for kb in 0..nkb {
        let ks0 = kb * kcs;
        let kl = (ksteps - ks0).min(kcs);
        // Words of one widened row of this block.
        let row = kl * words;
        let used = panels * MR * row;
        let ks = (width * ks0, (width * (ks0 + kl)).min(k));
        widen_rows(rows, (m0, nrows), ks, bytes, &mut abuf[..used], row);
        for np in 0..n.div_ceil(NR) {
            let cols = (n - np * NR).min(NR);
            // Widened once per (chunk, block, panel), reused by the chunk's row tiles.
            let b = w.panel_block(np, ks0, kl, &mut wide);
            // Quads: Σ (a − z)·w = Σ (a − o)·w − (z − o)·Σ w, o the kernel's offset.
            let end = RunEnd {
                nkb,
                kb,
                n,
                col: np * NR,
                correction: bytes.then_some(correction),
                w,
            };
            for mp in 0..panels {
                let args = KernelArgs {
                    a: &abuf[mp * MR * row..used],
                    a_row: row,
                    a_step: words,
                    b,
                    b_cp: NR * words,
                    taps: &[0],
                    csteps: kl,
                    words,
                };
                kernel(&args, &mut tile);
                for r in 0..(nrows - mp * MR).min(MR) {
                    let acc = &mut tile[r * NR..r * NR + cols];
                    end.finish(acc, &mut scratch, (m0, mp * MR + r), sink);
                }
            }
        }
    }
}

/// [`chunk_tiles`] compiled for AVX2 (the epilogue and widening loops vectorize with it).
///
/// # Safety
/// The CPU must support AVX2; as [`chunk`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn chunk_tiles_avx2<A: Copy, C: Fn(A) -> i32 + Copy>(
    bl: &Blocking,
    rows: &Rows<A, C>,
    w: &PackedWeights,
    ci: usize,
    sink: &Sink,
    unit: bool,
) {
    chunk_tiles(bl, rows, w, ci, sink, unit)
}

/// [`chunk`] for tile-packed weights: blocks of 32 rows × 32 output channels (two panels),
/// one K step per `kq` quads, on [`Tiles`] (the tile unit when `unit`).
///
/// # Safety
/// No other thread may store the same rows at the same time.
#[inline(always)]
unsafe fn chunk_tiles<A: Copy, C: Fn(A) -> i32 + Copy>(
    bl: &Blocking,
    rows: &Rows<A, C>,
    w: &PackedWeights,
    ci: usize,
    sink: &Sink,
    unit: bool,
) {
    const T: usize = amx::TILE;
    let n = w.n();
    let Blocking {
        ksteps,
        kcs,
        nkb,
        mc,
    } = *bl;
    let Rows { m, k, zero_u8, .. } = *rows;
    // The tiles take raw u8 (no offset): Σ (a − z)·w = Σ a·w − z·Σ w.
    let correction = zero_u8;
    // Every block is a multiple of 16 quads, or all of them when there are fewer (see
    // `tile_steps`).
    let kq = ksteps.clamp(1, amx::MAX_KQ);
    let m0 = ci * mc;
    let nrows = (m - m0).min(mc);
    let padded_rows = nrows.next_multiple_of(T);
    let mut abuf = vec![0i32; padded_rows * kcs];
    let mut scratch = if nkb > 1 {
        vec![0i32; mc * n]
    } else {
        Vec::new()
    };
    let mut tiles = Tiles::begin(unit, false, kq);
    let mut acc = [0i32; 4 * T * T];
    let mut wide = Vec::new();
    let npanels = n.div_ceil(NR);
    for kb in 0..nkb {
        let ks0 = kb * kcs;
        let kl = (ksteps - ks0).min(kcs);
        let row = kl;
        let ks = (4 * ks0, (4 * (ks0 + kl)).min(k));
        widen_rows(
            rows,
            (m0, nrows),
            ks,
            true,
            &mut abuf[..padded_rows * row],
            row,
        );
        for np in (0..npanels).step_by(2) {
            let nt = (npanels - np).min(2);
            // Both panels' blocks in one span: the second starts a panel (`steps` quad
            // rows) after the first.
            let b = w.panel_span(np, ks0, kl, nt, &mut wide);
            let ncols = (n - np * NR).min(nt * NR);
            let end = RunEnd {
                nkb,
                kb,
                n,
                col: np * NR,
                correction: Some(correction),
                w,
            };
            for mp in (0..nrows).step_by(2 * T) {
                let mt = (nrows - mp).div_ceil(T).min(2);
                let blk = amx::Block {
                    a: &abuf[..padded_rows * row],
                    a_stride: row,
                    a_tile: T * row,
                    b,
                    b_stride: NR,
                    b_tile: ksteps * NR,
                    kq,
                    mt,
                    nt,
                };
                tiles.zero();
                for s in 0..kl / kq {
                    tiles.step(&blk, mp * row + s * kq, s * kq * NR);
                }
                tiles.store(&mut acc);
                for r in 0..(nrows - mp).min(mt * T) {
                    let acc = &mut acc[r * amx::ACC_ROW..][..ncols];
                    end.finish(acc, &mut scratch, (m0, mp + r), sink);
                }
            }
        }
    }
}

/// Widens rows `m0 .. m0 + nrows` of the activations (values `k0 .. k1` of each) into
/// `dst`, `row` words a row, as u8 quads (`bytes`) or i16 pairs; the rows of `dst` past
/// them are zeros.
#[inline(always)]
fn widen_rows<A: Copy, C: Fn(A) -> i32 + Copy>(
    rows: &Rows<A, C>,
    (m0, nrows): (usize, usize),
    (k0, k1): (usize, usize),
    bytes: bool,
    dst: &mut [i32],
    row: usize,
) {
    let Rows {
        a,
        k,
        center,
        zero_u8,
        ..
    } = *rows;
    for (r, d) in dst.chunks_exact_mut(row.max(1)).enumerate() {
        if r >= nrows {
            d.fill(0);
        } else if bytes {
            widen_row_quads(&a[(m0 + r) * k..][k0..k1], |v| center(v) + zero_u8, d);
        } else {
            widen_row(&a[(m0 + r) * k..][k0..k1], center, d);
        }
    }
}

/// How a run of output columns `col ..` ends after reduction block `kb` (of `nkb`):
/// summed with the blocks before it (partial sums of a chunk's rows in a scratch of `n`
/// columns a row), and after the last, corrected for the zero point (quads: `correction ·
/// Σ w` per column) and stored.
struct RunEnd<'w> {
    nkb: usize,
    kb: usize,
    n: usize,
    col: usize,
    correction: Option<i32>,
    w: &'w PackedWeights,
}

impl RunEnd<'_> {
    /// Ends the run `acc` of row `r` of the chunk starting at output row `m0`.
    ///
    /// # Safety
    /// No other thread may store the same row at the same time.
    #[inline(always)]
    unsafe fn finish(
        &self,
        acc: &mut [i32],
        scratch: &mut [i32],
        (m0, r): (usize, usize),
        sink: &Sink,
    ) {
        let cols = acc.len();
        if self.nkb > 1 {
            let part = &mut scratch[r * self.n + self.col..][..cols];
            if self.kb > 0 {
                for (x, &p) in acc.iter_mut().zip(part.iter()) {
                    *x = x.wrapping_add(p);
                }
            }
            if self.kb + 1 < self.nkb {
                part.copy_from_slice(acc);
                return;
            }
        }
        if let Some(c) = self.correction {
            let sums = &self.w.sums()[self.col..][..cols];
            for (x, &s) in acc.iter_mut().zip(sums) {
                *x = x.wrapping_sub(c.wrapping_mul(s));
            }
        }
        sink.store((m0 + r) * self.n + self.col, acc, Channel::Run(self.col));
    }
}

/// Widens one activation row to u8 quads (a last partial quad, and the words of `dst`
/// past it, e.g. the rest of a last octet, padded with 0: their weights are 0).
#[inline(always)]
fn widen_row_quads<A: Copy>(src: &[A], to_u8: impl Fn(A) -> i32, dst: &mut [i32]) {
    assert!(
        src.len() <= 4 * dst.len(),
        "int8 gemm: row longer than its quads"
    );
    if cfg!(target_endian = "little") {
        // A quad word is its four u8 bytes in memory, in order: one byte a value, a
        // loop LLVM vectorizes (building each word from four lanes did not).
        // SAFETY: `dst.len()` i32 words are `4 * dst.len()` bytes, same memory.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut u8, 4 * dst.len()) };
        let (row, rest) = bytes.split_at_mut(src.len());
        for (d, &v) in row.iter_mut().zip(src) {
            *d = to_u8(v) as u8;
        }
        rest.fill(0);
        return;
    }
    let mut it = src.chunks_exact(4);
    for (d, q) in dst.iter_mut().zip(&mut it) {
        *d = quad_u8([to_u8(q[0]), to_u8(q[1]), to_u8(q[2]), to_u8(q[3])]);
    }
    let rest = it.remainder();
    if !rest.is_empty() {
        let v = |i: usize| rest.get(i).map_or(0, |&x| to_u8(x));
        dst[src.len() / 4] = quad_u8([v(0), v(1), v(2), v(3)]);
    }
    dst[src.len().div_ceil(4)..].fill(0);
}

/// Widens one activation row to i16 pairs of centered values (odd K: last pair padded
/// with 0).
#[inline(always)]
pub(crate) fn widen_row<A: Copy>(src: &[A], center: impl Fn(A) -> i32, dst: &mut [i32]) {
    let mut it = src.chunks_exact(2);
    for (d, p) in dst.iter_mut().zip(&mut it) {
        *d = pair(center(p[0]), center(p[1]));
    }
    if let [last] = it.remainder() {
        dst[src.len() / 2] = pair(center(*last), 0);
    }
}

/// One f32 activation operand of [`matmul_quantize`], quantized on the fly to u8 with
/// `scale` and `zero_point` (ONNX `QuantizeLinear`).
#[derive(Clone, Copy, Debug)]
pub struct QuantOperand<'a> {
    pub values: &'a [f32],
    /// The matrix is stored transposed: `[K, M]` for the left operand, `[N, K]` for the
    /// right one.
    pub transposed: bool,
    pub scale: f32,
    pub zero_point: u8,
}

/// The product of two activations (attention's `Q·Kᵀ` and `P·V`), both quantized on the
/// fly: `out[i, j] = (x_scale · y_scale) · Σ_k (q(x[i, k]) − x_zp) · (q(y[k, j]) − y_zp)`,
/// `out` row-major `[m, n]`. The integer sum is exact; it equals `MatMul` of the two
/// `DequantizeLinear(QuantizeLinear(·))` values up to f32 rounding. The right operand is
/// quantized and packed on every call (it changes every call), the left one is quantized
/// inside the GEMM's widening pass.
#[allow(clippy::too_many_arguments)]
pub fn matmul_quantize(
    backend: Backend,
    x: QuantOperand,
    y: QuantOperand,
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
) {
    assert_eq!(
        x.values.len(),
        m * k,
        "int8 matmul: left operand is not m * k"
    );
    assert_eq!(
        y.values.len(),
        k * n,
        "int8 matmul: right operand is not k * n"
    );
    let (k_stride, n_stride) = if y.transposed { (1, k) } else { (n, 1) };
    let packed =
        PackedWeights::quantize_f32(y.values, k, n, k_stride, n_stride, y.scale, y.zero_point);
    // The GEMM widens rows of x; a transposed x is made row-major first (one pass over a
    // small operand).
    let rows;
    let x_rows = if x.transposed {
        let mut t = vec![0f32; m * k];
        for (kk, col) in x.values.chunks_exact(m.max(1)).enumerate() {
            for (i, &v) in col.iter().enumerate() {
                t[i * k + kk] = v;
            }
        }
        rows = t;
        &rows[..]
    } else {
        x.values
    };
    gemm_quantize(
        backend,
        x_rows,
        m,
        k,
        x.scale,
        x.zero_point,
        &packed,
        Output::F32 {
            out,
            dequant: Dequant {
                a_scale: x.scale,
                w_scale: &[y.scale],
                bias: None,
            },
        },
    );
}
