//! Fused attention: `softmax(Q·Kᵀ)·V` with the activation quantizers of a QDQ graph, one
//! block of query rows at a time, so the `[M, N]` score matrix never exists whole.
//!
//! Per (head, block of rows of Q), on one thread:
//!
//! 1. `S = (q(Q) − zq)·(q(Kᵀ) − zk)` exactly in i32 on the int8 GEMM (Q quantized in its
//!    widening pass, Kᵀ quantized and packed once per head), dequantized as
//!    `acc · (sq · sk)`: the very f32 values the unfused product writes;
//! 2. optionally `S · c` or `S / c` (a constant the graph applies to the scores);
//! 3. softmax along the row in f32 (max, `exp(s − max)` by a vectorized polynomial, sum,
//!    `· (1 / sum)`), quantized straight to the u8 codes of P with the scale the file
//!    gives (ONNX `QuantizeLinear`: round half to even, saturate);
//! 4. `O = (P − zp)·(q(V) − zv)` exactly in i32 (V quantized and packed once per head),
//!    written as `acc · (sp · sv)`.
//!
//! Steps 1, 2 and 4 compute what the unfused graph on the int8 kernels computes, bit for
//! bit, given the same codes of P. Step 3 is float: its `exp` and summation order differ
//! from tract's Softmax by a few ulps, which moves a code of P by one step where a value
//! sits within that distance of a rounding boundary. Units are (head, row block) and a
//! unit's arithmetic does not depend on which thread runs it: results are bit-identical
//! for any thread count.

use std::cell::RefCell;

use super::gemm::gemm_run;
use super::par::{self, Shared};
use super::sink::quantize;
use super::{Backend, Dequant, Isa, Output, PackedWeights, MR};

/// One f32 operand of [`attention_quantize`] (all heads), quantized on the fly to u8 with
/// `scale` and `zero_point`. Stored as the matrix product reads it (`Q[M, D]`, `Kᵀ[D, N]`,
/// `V[N, Dv]`), or `transposed` (`[D, M]`, `[N, D]`, `[Dv, N]`).
#[derive(Clone, Copy, Debug)]
pub struct AttentionOperand<'a> {
    pub values: &'a [f32],
    pub transposed: bool,
    pub scale: f32,
    pub zero_point: u8,
}

/// Sizes of one attention call: `heads` independent problems `Q[M, D]`, `Kᵀ[D, N]`,
/// `V[N, Dv]`, output `[M, Dv]` each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub heads: usize,
    pub m: usize,
    pub n: usize,
    pub d: usize,
    pub dv: usize,
}

/// What the graph does to the scores between the product and the softmax.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum ScoreScale {
    #[default]
    None,
    /// `S · c`
    Mul(f32),
    /// `S / c`
    Div(f32),
}

/// The quantizer of the softmax output P.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProbQuant {
    pub scale: f32,
    pub zero_point: u8,
}

/// What the softmax and P's quantizer cost per score, in the kernel's multiply-adds
/// (~0.7 ns a score, the time of ~50 multiply-adds on the AVX-512 VNNI kernel): with short
/// heads (4–8 channels) the softmax is most of the work.
const SOFTMAX_MACS: usize = 48;

/// Bytes of f32 scores one unit holds (its row block × N): L2-sized.
const SCORE_BYTES: usize = 512 * 1024;

/// Rows of Q per unit for `n` keys (a multiple of the micro-kernel's rows).
pub(crate) fn block_rows(n: usize) -> usize {
    (SCORE_BYTES / 4 / n.max(1)).clamp(MR, 16 * MR) / MR * MR
}

thread_local! {
    /// A unit's scores and codes of P (on the short-head path: one padded row of scores
    /// and of centered codes), kept per thread between calls.
    static SCRATCH: RefCell<(Vec<f32>, Vec<u8>, Vec<i32>)> =
        const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
    /// Set by [`with_short_heads`] (tests): the short-head path forced on or off.
    static SHORT_HEADS: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// Set by [`with_short_heads`] (tests): its narrow-row form forced on or off.
    static NARROW_ROWS: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Head sizes (`D` and `Dv`) up to which the products run as f32 / i32 loops over the exact
/// centered codes instead of the int8 GEMM. With 4–8 channels a head, the GEMM's 6×16
/// tiles are mostly padding and its per-tile driver work (widening, correction, store)
/// costs more than the few multiply-adds a score: the loops compute one row of scores
/// as `D` f32 multiply-adds a key (integers below 2²⁴: exact), and a row of `P·V` as `Dv`
/// i32 multiply-adds a key, vectorized over the keys. Measured (`examples/int8_threads`,
/// 16 heads × 256 tokens, 1 thread, AVX-512 VNNI, min of 60): D = 4 1.23 ms vs the
/// GEMM's 1.73, D = 8 1.65 vs 1.82, D = 16 2.45 vs 1.96 — so up to 8.
pub const SHORT_HEAD: usize = 8;

/// Keys up to which `P·V`'s i32 sums cannot overflow (each product is at most 255²).
const SHORT_HEAD_MAX_N: usize = (i32::MAX as usize) / (255 * 255);

/// Whether the short-head path is on: `TFMQC_SHORT_HEADS=0` turns it off (read once per
/// process), [`with_short_heads`] overrides it on the calling thread.
fn short_heads_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    SHORT_HEADS.get().unwrap_or_else(|| {
        *ON.get_or_init(|| std::env::var("TFMQC_SHORT_HEADS").as_deref() != Ok("0"))
    })
}

/// Runs `f` with the short-head path of [`attention_quantize`] (and its narrow-row form)
/// forced on or off for the calls made on this thread (the exactness tests compare them).
#[cfg(test)]
pub(crate) fn with_short_heads<R>(on: bool, narrow: bool, f: impl FnOnce() -> R) -> R {
    use crate::scoped::with_local;
    with_local(&SHORT_HEADS, Some(on), || {
        with_local(&NARROW_ROWS, Some(narrow), f)
    })
}

/// One head's prepared `Kᵀ` and `V`: packed for the int8 GEMM, or (short heads) as
/// centered codes, `Kᵀ[D, N]` in f32 and `Vᵀ[Dv, N]` in i32, rows over the keys.
#[derive(Clone)]
enum HeadOperands {
    Gemm(PackedWeights, PackedWeights),
    /// `Kᵀ` in f32, `Vᵀ` in i32 and, for the AVX-512 VNNI loops, `Vᵀ` again in i16 (empty
    /// on other instruction sets).
    Short(Vec<f32>, Vec<i32>, Vec<i16>),
}

/// `out = DQ(Q(softmax(score(DQ(Q(q)) · DQ(Q(kᵀ)))))) · DQ(Q(v))` per head (see the module
/// documentation). `offsets[h]` gives head `h`'s start in `q`, `k` and `v` (empty: heads
/// are contiguous). `out` holds `[heads, M, Dv]`, or `[heads, Dv, M]` when
/// `out_transposed`. Splits (head, row block) units over tract's current executor.
#[allow(clippy::too_many_arguments)]
pub fn attention_quantize(
    backend: Backend,
    q: AttentionOperand,
    k: AttentionOperand,
    v: AttentionOperand,
    score: ScoreScale,
    p: ProbQuant,
    shape: AttentionShape,
    offsets: &[[usize; 3]],
    out: &mut [f32],
    out_transposed: bool,
) {
    let AttentionShape { heads, m, n, d, dv } = shape;
    assert!(
        offsets.is_empty() || offsets.len() == heads,
        "int8 attention: one offset triple per head"
    );
    let offset = |h: usize| -> [usize; 3] {
        if offsets.is_empty() {
            [h * m * d, h * n * d, h * n * dv]
        } else {
            offsets[h]
        }
    };
    for h in 0..heads {
        let [qo, ko, vo] = offset(h);
        assert!(
            qo + m * d <= q.values.len()
                && ko + n * d <= k.values.len()
                && vo + n * dv <= v.values.len(),
            "int8 attention: operand too short for its shape"
        );
    }
    assert_eq!(out.len(), heads * m * dv, "int8 attention: output length");
    if heads == 0 || m == 0 || dv == 0 {
        return;
    }
    if n == 0 {
        // No keys: P·V sums nothing.
        out.fill(0.0);
        return;
    }
    // Work in multiply-adds, the softmax of a score counted as SOFTMAX_MACS of them.
    let split = par::worth_splitting(
        par::Kind::Attention,
        heads * m * n * (d + dv + SOFTMAX_MACS),
    );
    let short = short_heads_enabled()
        && (1..=SHORT_HEAD).contains(&d)
        && dv <= SHORT_HEAD
        && n <= SHORT_HEAD_MAX_N;
    // Per head: Kᵀ and V quantized and packed (the vector sides of the two products), or
    // their centered codes for the short-head loops, and Q row-major.
    let isa = backend.isa().vector();
    let mut packed: Vec<Option<(HeadOperands, Vec<f32>)>> = vec![None; heads];
    {
        let slots = Shared::new(&mut packed);
        par::for_each(heads, split, |h| {
            let [qo, ko, vo] = offset(h);
            // Kᵀ[c, j] and V[j, c] as stored.
            let (ks, ns) = if k.transposed { (1, d) } else { (n, 1) };
            let (vks, vns) = if v.transposed { (1, n) } else { (dv, 1) };
            let ops = if short {
                let kv = &k.values[ko..ko + n * d];
                let (kz, vz) = (k.zero_point as i32, v.zero_point as i32);
                // Rows padded to whole LANES with zeros: the loops over the keys then have
                // no scalar tail (a padded key scores 0 and weighs 0 in P·V).
                let stride = short_stride(n);
                let mut kc = vec![0f32; d * stride];
                for (c, row) in kc.chunks_exact_mut(stride).enumerate() {
                    for (j, x) in row[..n].iter_mut().enumerate() {
                        *x = (quantize(kv[c * ks + j * ns], k.scale, kz, 0, 255) - kz) as f32;
                    }
                }
                let vv = &v.values[vo..vo + n * dv];
                let mut vc = vec![0i32; dv * stride];
                for (c, row) in vc.chunks_exact_mut(stride).enumerate() {
                    for (j, x) in row[..n].iter_mut().enumerate() {
                        *x = quantize(vv[j * vks + c * vns], v.scale, vz, 0, 255) - vz;
                    }
                }
                // The codes fit i16 (|ṽ| ≤ 255): the AVX-512 loops multiply pairs of keys
                // with `vpdpwssd`.
                let vc16 = if isa == Isa::Avx512Vnni {
                    vc.iter().map(|&x| x as i16).collect()
                } else {
                    Vec::new()
                };
                HeadOperands::Short(kc, vc, vc16)
            } else {
                let kp = PackedWeights::quantize_f32(
                    &k.values[ko..ko + n * d],
                    d,
                    n,
                    ks,
                    ns,
                    k.scale,
                    k.zero_point,
                );
                let vp = PackedWeights::quantize_f32(
                    &v.values[vo..vo + n * dv],
                    n,
                    dv,
                    vks,
                    vns,
                    v.scale,
                    v.zero_point,
                );
                HeadOperands::Gemm(kp, vp)
            };
            let qt = if q.transposed {
                let src = &q.values[qo..qo + m * d];
                let mut t = vec![0f32; m * d];
                for (kk, col) in src.chunks_exact(m).enumerate() {
                    for (i, &x) in col.iter().enumerate() {
                        t[i * d + kk] = x;
                    }
                }
                t
            } else {
                Vec::new()
            };
            // SAFETY: each h writes its own slot.
            unsafe { slots.range(h, 1)[0] = Some((ops, qt)) };
        });
    }
    let mb = block_rows(n);
    let blocks = m.div_ceil(mb);
    let dest = Shared::new(out);
    par::for_each(heads * blocks, split, |u| {
        let (h, rb) = (u / blocks, u % blocks);
        let (ops, qt) = packed[h].as_ref().expect("packed above");
        let q_rows = if q.transposed {
            &qt[..]
        } else {
            let qo = offset(h)[0];
            &q.values[qo..qo + m * d]
        };
        let m0 = rb * mb;
        let rows = (m - m0).min(mb);
        let unit = Unit {
            backend,
            isa,
            q: &q_rows[m0 * d..(m0 + rows) * d],
            q_quant: (q.scale, q.zero_point),
            ops,
            k_scale: k.scale,
            v_scale: v.scale,
            score,
            p,
            rows,
            n,
            d,
        };
        SCRATCH.with(|s| {
            let (scores, codes, centered) = &mut *s.borrow_mut();
            // The short-head loops go a row (AVX-512: `SHORT_GROUP` rows) at a time, of
            // padded length.
            let held = if short {
                SHORT_GROUP * short_stride(n)
            } else {
                rows * n
            };
            scores.resize(held, 0.0);
            codes.resize(if short { 0 } else { held }, 0);
            centered.resize(if short { held } else { 0 }, 0);
            let base = h * m * dv;
            if out_transposed {
                let mut o = vec![0f32; rows * dv];
                unit.run(scores, codes, centered, &mut o);
                for c in 0..dv {
                    // SAFETY: units write disjoint (head, column, row block) ranges.
                    let col = unsafe { dest.range(base + c * m + m0, rows) };
                    for (i, x) in col.iter_mut().enumerate() {
                        *x = o[i * dv + c];
                    }
                }
            } else {
                // SAFETY: units write disjoint (head, row block) ranges.
                let o = unsafe { dest.range(base + m0 * dv, rows * dv) };
                unit.run(scores, codes, centered, o);
            }
        });
    });
}

/// One (head, row block) of an attention call.
struct Unit<'a> {
    backend: Backend,
    isa: Isa,
    q: &'a [f32],
    q_quant: (f32, u8),
    ops: &'a HeadOperands,
    k_scale: f32,
    v_scale: f32,
    score: ScoreScale,
    p: ProbQuant,
    rows: usize,
    n: usize,
    d: usize,
}

impl Unit<'_> {
    /// `scores` and `codes` hold `rows × n` (short heads: `scores` one padded row,
    /// [`short_stride`]); `out` gets `rows × dv`.
    fn run(&self, scores: &mut [f32], codes: &mut [u8], centered: &mut [i32], out: &mut [f32]) {
        let (kp, vp) = match self.ops {
            HeadOperands::Gemm(kp, vp) => (kp, vp),
            HeadOperands::Short(kc, vc, vc16) => {
                let rows = ShortRows {
                    unit: self,
                    kc,
                    vc,
                    vc16,
                    stride: short_stride(self.n),
                };
                match self.isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: AVX-512 F only when detected.
                    Isa::Avx512Vnni => unsafe { rows.run_avx512(scores, centered, out) },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: AVX2 only when detected.
                    Isa::Avx2 => unsafe { rows.run_avx2(scores, centered, out) },
                    _ => rows.run(scores, centered, out, false),
                }
                return;
            }
        };
        let (qs, qz) = self.q_quant;
        let zq = qz as i32;
        // 1. Q·Kᵀ, exactly as `matmul_quantize` computes it.
        gemm_run(
            self.backend,
            self.q,
            self.rows,
            self.d,
            move |x: f32| quantize(x, qs, zq, 0, 255) - zq,
            zq,
            kp,
            Output::F32 {
                out: scores,
                dequant: Dequant {
                    a_scale: qs,
                    w_scale: &[self.k_scale],
                    bias: None,
                },
            },
            false,
        );
        // 2–3. Scale, softmax, quantize P.
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512 F only when detected.
            Isa::Avx512Vnni => unsafe {
                softmax_rows_avx512(scores, codes, self.n, self.score, self.p)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 only when detected.
            Isa::Avx2 => unsafe { softmax_rows_avx2(scores, codes, self.n, self.score, self.p) },
            _ => softmax_rows(scores, codes, self.n, self.score, self.p),
        }
        // 4. P·V, exactly as `matmul_quantize` computes it from the same codes.
        let zp = self.p.zero_point as i32;
        gemm_run(
            self.backend,
            codes,
            self.rows,
            self.n,
            move |c: u8| c as i32 - zp,
            zp,
            vp,
            Output::F32 {
                out,
                dequant: Dequant {
                    a_scale: self.p.scale,
                    w_scale: &[self.v_scale],
                    bias: None,
                },
            },
            false,
        );
    }
}

/// Row stride of the short-head path's centered codes and scores: `n` keys padded to
/// whole [`LANES`].
fn short_stride(n: usize) -> usize {
    n.max(1).next_multiple_of(LANES)
}

/// Rows the AVX-512 short-head loops take through each phase together
/// ([`ShortRows::rows_avx512`]).
const SHORT_GROUP: usize = 4;

/// One unit of a short-head call: the products as loops over the keys.
struct ShortRows<'a> {
    unit: &'a Unit<'a>,
    /// Centered codes of `Kᵀ[D, N]`, rows of `stride` (zeros past `N`).
    kc: &'a [f32],
    /// Centered codes of `Vᵀ[Dv, N]`, rows of `stride` (zeros past `N`).
    vc: &'a [i32],
    /// `vc` in i16 (AVX-512 VNNI only; empty otherwise).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    vc16: &'a [i16],
    stride: usize,
}

impl ShortRows<'_> {
    /// [`ShortRows::run`] compiled for AVX-512.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F (and AVX2, FMA).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,avx512f,avx512vnni")]
    unsafe fn run_avx512(&self, s: &mut [f32], p: &mut [i32], out: &mut [f32]) {
        self.run(s, p, out, true)
    }

    /// [`ShortRows::run`] compiled for AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, s: &mut [f32], p: &mut [i32], out: &mut [f32]) {
        self.run(s, p, out, false)
    }

    /// Row by row, in three passes over the (padded) keys: the scores `Σ_c q̃[c]·k̃[c, j]`
    /// in f32 (integers below 2²⁴ at every partial sum, so exactly the GEMM's i32
    /// accumulator), dequantized as the GEMM's store does (`acc · (sq · sk)`), then the
    /// graph's score scale, with the row's maximum taken on the way; [`exp_sum`], as
    /// [`softmax_rows`] calls it; P's codes by [`softmax_rows`]' quantizer, each
    /// centered code multiplied straight into `Dv` i32 sums `Σ_j p̃[j]·ṽ[c, j]`
    /// (exact: the order of integer sums does not matter), dequantized as
    /// `acc · (sp · sv)`. Bit-identical to the GEMM path.
    ///
    /// `vnni` (only from [`ShortRows::run_avx512`], where `vc16` is filled): P's codes and
    /// `P·V` in one pass by [`pv_avx512`], the same integers.
    #[inline(always)]
    fn run(&self, s: &mut [f32], p: &mut [i32], out: &mut [f32], vnni: bool) {
        let u = self.unit;
        let (n, d) = (u.n, u.d);
        let dv = out.len() / u.rows.max(1);
        // As `combined_scales`: one f32 product.
        let score_scale = u.q_quant.0 * u.k_scale;
        let out_scale = u.p.scale * u.v_scale;
        if n < LANES && narrow_enabled() {
            self.run_narrow(out, dv, score_scale, out_scale);
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if vnni {
            // SAFETY: `vnni` only from `run_avx512` (AVX-512 F and VNNI detected), which
            // fills `vc16`.
            unsafe { self.rows_avx512(s, out, dv, score_scale, out_scale) };
            return;
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = vnni;
        // The score scale applied as `softmax_rows` applies it (chosen once, not per key).
        match u.score {
            ScoreScale::None => self.rows(s, p, out, d, dv, score_scale, out_scale, |x| x),
            ScoreScale::Mul(c) => self.rows(s, p, out, d, dv, score_scale, out_scale, |x| x * c),
            ScoreScale::Div(c) => self.rows(s, p, out, d, dv, score_scale, out_scale, |x| x / c),
        }
    }

    /// [`ShortRows::run`]'s rows, with the graph's score scale `scale`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn rows(
        &self,
        s: &mut [f32],
        p: &mut [i32],
        out: &mut [f32],
        d: usize,
        dv: usize,
        score_scale: f32,
        out_scale: f32,
        scale: impl Fn(f32) -> f32,
    ) {
        let u = self.unit;
        let (n, stride) = (u.n, self.stride);
        let (qs, zq) = (u.q_quant.0, u.q_quant.1 as i32);
        let zp = u.p.zero_point as i32;
        let (s, p) = (&mut s[..stride], &mut p[..stride]);
        let mut qc = [0f32; SHORT_HEAD];
        for (qrow, orow) in
            u.q.chunks_exact(d.max(1))
                .zip(out.chunks_exact_mut(dv.max(1)))
        {
            for (c, &x) in qc.iter_mut().zip(qrow) {
                *c = (quantize(x, qs, zq, 0, 255) - zq) as f32;
            }
            // `LANES` keys at a time, summed over the head's channels in registers (fixed
            // widths, so the loops vectorize), the maximum taken on the way (padded keys
            // left out).
            let mut mx = [f32::NEG_INFINITY; LANES];
            for (jc, sv) in s.chunks_exact_mut(LANES).enumerate() {
                let k = &self.kc[jc * LANES..];
                // The channel count as a constant: with a run-time count the compiler
                // kept `acc` on the stack, written in pieces and read whole (a
                // store-forwarding stall every chunk).
                let acc = match d {
                    1 => score_chunk::<1>(&qc, k, stride),
                    2 => score_chunk::<2>(&qc, k, stride),
                    3 => score_chunk::<3>(&qc, k, stride),
                    4 => score_chunk::<4>(&qc, k, stride),
                    5 => score_chunk::<5>(&qc, k, stride),
                    6 => score_chunk::<6>(&qc, k, stride),
                    7 => score_chunk::<7>(&qc, k, stride),
                    _ => score_chunk::<8>(&qc, k, stride),
                };
                let valid = n - jc * LANES;
                for l in 0..LANES {
                    let x = scale(acc[l] * score_scale);
                    sv[l] = x;
                    mx[l] = mx[l].max(if l < valid { x } else { f32::NEG_INFINITY });
                }
            }
            let sum = exp_sum_padded(s, n, lane_max(mx));
            let to_code = 1.0 / sum / u.p.scale;
            // P's centered codes (a padded key's meets a zero of V).
            for (x, c) in s.iter().zip(p.iter_mut()) {
                *c = quantize(x * to_code, 1.0, zp, 0, 255) - zp;
            }
            for (o, vrow) in orow.iter_mut().zip(self.vc.chunks_exact(stride)) {
                *o = dot_i32(p, vrow) as f32 * out_scale;
            }
        }
    }
}

/// `LANES` scores before scaling: `Σ_c qc[c]·k[c·stride + l]` for `c` in `0..D`, from
/// +0 in channel order (the GEMM path's exact i32 sums, see [`ShortRows::run`]).
#[inline(always)]
fn score_chunk<const D: usize>(qc: &[f32; SHORT_HEAD], k: &[f32], stride: usize) -> [f32; LANES] {
    let mut acc = [0f32; LANES];
    for (c, &qv) in qc[..D].iter().enumerate() {
        let krow: &[f32; LANES] = k[c * stride..][..LANES].try_into().expect("LANES keys");
        for l in 0..LANES {
            acc[l] += qv * krow[l];
        }
    }
    acc
}

/// `Σ a[j]·b[j]` in i32 (wrapping: the callers' sums fit; integer sums are exact in any
/// order, so this is left as a plain reduction for the compiler to vectorize: explicit
/// `LANES`-wide partial sums made it vectorize across chunks with gathers instead).
#[inline(always)]
fn dot_i32(a: &[i32], b: &[i32]) -> i32 {
    a.iter()
        .zip(b)
        .fold(0i32, |s, (&x, &y)| s.wrapping_add(x.wrapping_mul(y)))
}

/// The AVX-512 form of [`ShortRows::rows`] (`Isa::Avx512Vnni`): the same three passes
/// over a row, written with intrinsics because the compiler's vectorization of the
/// portable loops left scalar lanes in the score pass (short heads), a NaN-preserving
/// select around every `max`, and P's codes going through memory.
#[cfg(target_arch = "x86_64")]
impl ShortRows<'_> {
    /// Every row of the unit, bit for bit what [`ShortRows::rows`] computes:
    ///
    /// 1. scores `Σ_c q̃[c]·k̃[c, j]` by FMAs (integers below 2²⁴ throughout, so exact as
    ///    the portable products and sums are), `· score_scale`, then the graph's scale;
    ///    the maximum over the keys (`vmaxps` returns its second operand on a NaN, so
    ///    with the running maximum second a NaN score is skipped, as `f32::max` does);
    /// 2. [`exp_nonpositive`]'s steps on 16 lanes (the clamp as Rust's `clamp` on a
    ///    NaN, the same fused multiply-adds and constants), key `j` summed into
    ///    partial sum `j % LANES`, the partial sums added as [`lane_sum`] adds them;
    /// 3. [`pv_avx512`].
    ///
    /// # Safety
    /// The CPU must support AVX-512 F and VNNI; `self.vc16` is filled.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vnni")]
    unsafe fn rows_avx512(
        &self,
        s: &mut [f32],
        out: &mut [f32],
        dv: usize,
        score_scale: f32,
        out_scale: f32,
    ) {
        macro_rules! by_d {
            ($mode:literal) => {
                match self.unit.d {
                    1 => self.rows_avx512_d::<1, $mode>(s, out, dv, score_scale, out_scale),
                    2 => self.rows_avx512_d::<2, $mode>(s, out, dv, score_scale, out_scale),
                    3 => self.rows_avx512_d::<3, $mode>(s, out, dv, score_scale, out_scale),
                    4 => self.rows_avx512_d::<4, $mode>(s, out, dv, score_scale, out_scale),
                    5 => self.rows_avx512_d::<5, $mode>(s, out, dv, score_scale, out_scale),
                    6 => self.rows_avx512_d::<6, $mode>(s, out, dv, score_scale, out_scale),
                    7 => self.rows_avx512_d::<7, $mode>(s, out, dv, score_scale, out_scale),
                    _ => self.rows_avx512_d::<8, $mode>(s, out, dv, score_scale, out_scale),
                }
            };
        }
        match self.unit.score {
            ScoreScale::None => by_d!(0),
            ScoreScale::Mul(_) => by_d!(1),
            ScoreScale::Div(_) => by_d!(2),
        }
    }

    /// [`ShortRows::rows_avx512`] for `D` channels a head and the score scale `MODE`
    /// (0: none, 1: `· c`, 2: `/ c`).
    ///
    /// # Safety
    /// As [`ShortRows::rows_avx512`], with `self.unit.d == D`.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vnni")]
    #[inline]
    unsafe fn rows_avx512_d<const D: usize, const MODE: u8>(
        &self,
        s: &mut [f32],
        out: &mut [f32],
        dv: usize,
        score_scale: f32,
        out_scale: f32,
    ) {
        use crate::kernels::expf::{LN2_HI, LN2_LO, LOG2E, POLY, ROUND, ROUND_BITS};
        use std::arch::x86_64::*;
        let u = self.unit;
        let (n, stride) = (u.n, self.stride);
        assert!(
            u.d == D
                && n >= 1
                && stride.is_multiple_of(LANES)
                && n <= stride
                && s.len() >= SHORT_GROUP * stride
                && self.kc.len() >= D * stride
                && self.vc16.len() >= dv * stride,
            "rows_avx512: operand sizes"
        );
        let (qs, zq) = (u.q_quant.0, u.q_quant.1 as i32);
        let zp = u.p.zero_point as i32;
        let chunks = stride / LANES;
        // Chunks whose keys are all valid, and the valid lanes of the last one.
        let full = n / LANES;
        let rem = n - full * LANES;
        let m_lo = ((1u32 << rem.min(16)) - 1) as __mmask16;
        let m_hi = ((1u32 << rem.saturating_sub(16)) - 1) as __mmask16;
        let c = match u.score {
            ScoreScale::None => 1.0,
            ScoreScale::Mul(c) | ScoreScale::Div(c) => c,
        };
        let (sc, cv) = (_mm512_set1_ps(score_scale), _mm512_set1_ps(c));
        let scale = |x: __m512| match MODE {
            0 => x,
            1 => _mm512_mul_ps(x, cv),
            _ => _mm512_div_ps(x, cv),
        };
        let (lo, zero) = (_mm512_set1_ps(-87.0), _mm512_setzero_ps());
        let (log2e, round) = (_mm512_set1_ps(LOG2E), _mm512_set1_ps(ROUND));
        let round_bits = _mm512_set1_epi32(ROUND_BITS);
        let (ln2_hi, ln2_lo) = (_mm512_set1_ps(-LN2_HI), _mm512_set1_ps(-LN2_LO));
        let bias = _mm512_set1_epi32(127);
        let poly: [__m512; 8] = std::array::from_fn(|i| _mm512_set1_ps(POLY[i]));
        // `exp_nonpositive` on 16 lanes.
        let exp = |x: __m512| {
            let x = _mm512_min_ps(zero, _mm512_max_ps(lo, x));
            let t = _mm512_fmadd_ps(x, log2e, round);
            let nf = _mm512_sub_ps(t, round);
            let ni = _mm512_sub_epi32(_mm512_castps_si512(t), round_bits);
            let r = _mm512_fmadd_ps(nf, ln2_lo, _mm512_fmadd_ps(nf, ln2_hi, x));
            let mut p = poly[0];
            for c in &poly[1..] {
                p = _mm512_fmadd_ps(p, r, *c);
            }
            let pow2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(ni, bias)));
            _mm512_mul_ps(p, pow2)
        };
        let kp = self.kc.as_ptr();
        // 1. One row's scores at `row` and their maximum.
        let scores = |row: *mut f32, qrow: &[f32]| {
            let qc: [__m512; D] = std::array::from_fn(|c| {
                _mm512_set1_ps((quantize(qrow[c], qs, zq, 0, 255) - zq) as f32)
            });
            let (mut mx0, mut mx1) = (
                _mm512_set1_ps(f32::NEG_INFINITY),
                _mm512_set1_ps(f32::NEG_INFINITY),
            );
            for jc in 0..chunks {
                let j = jc * LANES;
                let (mut a0, mut a1) = (zero, zero);
                for (c, q) in qc.iter().enumerate() {
                    // SAFETY: row `c < D` of `kc`, keys `j .. j + LANES` within `stride`.
                    let (k0, k1) = unsafe {
                        let k = kp.add(c * stride + j);
                        (_mm512_loadu_ps(k), _mm512_loadu_ps(k.add(16)))
                    };
                    a0 = _mm512_fmadd_ps(*q, k0, a0);
                    a1 = _mm512_fmadd_ps(*q, k1, a1);
                }
                let x0 = scale(_mm512_mul_ps(a0, sc));
                let x1 = scale(_mm512_mul_ps(a1, sc));
                // SAFETY: `row` has `stride` values (below).
                unsafe {
                    _mm512_storeu_ps(row.add(j), x0);
                    _mm512_storeu_ps(row.add(j + 16), x1);
                }
                if jc < full {
                    mx0 = _mm512_max_ps(x0, mx0);
                    mx1 = _mm512_max_ps(x1, mx1);
                } else {
                    mx0 = _mm512_mask_max_ps(mx0, m_lo, x0, mx0);
                    mx1 = _mm512_mask_max_ps(mx1, m_hi, x1, mx1);
                }
            }
            _mm512_reduce_max_ps(_mm512_max_ps(mx0, mx1))
        };
        // 2. The exps of one row, in place, and `to_code` from their sum.
        let exps = |row: *mut f32, max: f32| {
            let max = _mm512_set1_ps(max);
            let (mut s0, mut s1) = (zero, zero);
            for jc in 0..chunks {
                let j = jc * LANES;
                // SAFETY: as above.
                let (e0, e1) = unsafe {
                    let e0 = exp(_mm512_sub_ps(_mm512_loadu_ps(row.add(j)), max));
                    let e1 = exp(_mm512_sub_ps(_mm512_loadu_ps(row.add(j + 16)), max));
                    _mm512_storeu_ps(row.add(j), e0);
                    _mm512_storeu_ps(row.add(j + 16), e1);
                    (e0, e1)
                };
                if jc < full {
                    s0 = _mm512_add_ps(s0, e0);
                    s1 = _mm512_add_ps(s1, e1);
                } else {
                    s0 = _mm512_mask_add_ps(s0, m_lo, s0, e0);
                    s1 = _mm512_mask_add_ps(s1, m_hi, s1, e1);
                }
            }
            // `lane_sum`: lane l + 16, + 8, + 4, + 2, + 1 into lane l.
            let h = _mm512_add_ps(s0, s1);
            // (The upper half through a double-lane extract: AVX-512 F, where `extractf32x8`
            // needs DQ.)
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(h)));
            let h = _mm256_add_ps(_mm512_castps512_ps256(h), hi);
            let h = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let sum = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
            1.0 / sum / u.p.scale
        };
        // Each phase over a group of rows before the next: a row's phases depend on each
        // other through the reductions between them (max, sum, 1 / sum), the rows of a
        // phase do not, so the core overlaps them (`examples/int8_threads`, 1 thread:
        // 16 × [256 × 77 × 2] 0.34 → 0.24 ms, 16 × [256 × 256 × 2] 0.58 → 0.51 ms; groups
        // of 8 rows measured the same as 4).
        for (qb, ob) in
            u.q.chunks(SHORT_GROUP * D)
                .zip(out.chunks_mut(SHORT_GROUP * dv))
        {
            let g = qb.len() / D;
            let mut maxes = [0f32; SHORT_GROUP];
            for (r, qrow) in qb.chunks_exact(D).enumerate() {
                maxes[r] = scores(s[r * stride..].as_mut_ptr(), qrow);
            }
            let mut to_code = [0f32; SHORT_GROUP];
            for r in 0..g {
                to_code[r] = exps(s[r * stride..].as_mut_ptr(), maxes[r]);
            }
            // 3. P's codes and P·V.
            for (r, orow) in ob.chunks_exact_mut(dv).enumerate() {
                // SAFETY: AVX-512 F and VNNI (this function's contract); `vc16` holds `dv`
                // rows of `stride`.
                unsafe {
                    pv_avx512(
                        &s[r * stride..(r + 1) * stride],
                        self.vc16,
                        stride,
                        to_code[r],
                        zp,
                        out_scale,
                        orow,
                    )
                };
            }
        }
    }
}

/// P's centered codes from one row of exps `e` (padded to `stride`, whole [`LANES`]) and
/// `orow[c] = (Σ_j p̃[j]·ṽ[c, j]) · out_scale` for each `c` of `orow`, in one pass: the codes
/// by [`quantize`]'s recipe (`e · to_code`, clamped to ±1024, rounded half to even through
/// the mantissa, `+ zp` clamped to `[0, 255]`, `− zp`), narrowed to i16 (|p̃| ≤ 255) and
/// multiplied into the i16 codes of V a pair of keys a lane (`vpdpwssd`: exact i32 sums, so
/// the same integers as [`dot_i32`] on the i32 codes). The codes never go to memory.
///
/// # Safety
/// The CPU must support AVX-512 F and VNNI; `vc16` holds `orow.len()` rows of `stride`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vnni")]
unsafe fn pv_avx512(
    e: &[f32],
    vc16: &[i16],
    stride: usize,
    to_code: f32,
    zp: i32,
    out_scale: f32,
    orow: &mut [f32],
) {
    match orow.len() {
        1 => pv_avx512_dv::<1>(e, vc16, stride, to_code, zp, out_scale, orow),
        2 => pv_avx512_dv::<2>(e, vc16, stride, to_code, zp, out_scale, orow),
        3 => pv_avx512_dv::<3>(e, vc16, stride, to_code, zp, out_scale, orow),
        4 => pv_avx512_dv::<4>(e, vc16, stride, to_code, zp, out_scale, orow),
        5 => pv_avx512_dv::<5>(e, vc16, stride, to_code, zp, out_scale, orow),
        6 => pv_avx512_dv::<6>(e, vc16, stride, to_code, zp, out_scale, orow),
        7 => pv_avx512_dv::<7>(e, vc16, stride, to_code, zp, out_scale, orow),
        _ => pv_avx512_dv::<8>(e, vc16, stride, to_code, zp, out_scale, orow),
    }
}

/// [`pv_avx512`] for `DV` output channels (the accumulators stay in registers).
///
/// # Safety
/// As [`pv_avx512`], with `orow.len() == DV`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vnni")]
#[inline]
unsafe fn pv_avx512_dv<const DV: usize>(
    e: &[f32],
    vc16: &[i16],
    stride: usize,
    to_code: f32,
    zp: i32,
    out_scale: f32,
    orow: &mut [f32],
) {
    use std::arch::x86_64::*;
    assert!(
        orow.len() == DV
            && e.len() >= stride
            && vc16.len() >= DV * stride
            && stride.is_multiple_of(LANES),
        "pv_avx512: operand sizes"
    );
    let to = _mm512_set1_ps(to_code);
    let (lo, hi) = (_mm512_set1_ps(-1024.0), _mm512_set1_ps(1024.0));
    let magic = _mm512_set1_ps(12_582_912.0);
    let magic_bits = _mm512_set1_epi32(0x4B40_0000);
    let zpv = _mm512_set1_epi32(zp);
    let (c0, c255) = (_mm512_setzero_si512(), _mm512_set1_epi32(255));
    let code = |x: __m512| {
        // `max` first, as `quantize`: a NaN (either operand of `vmaxps` returns the second)
        // becomes −1024.
        let x = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x, to), lo), hi);
        let r = _mm512_sub_epi32(_mm512_castps_si512(_mm512_add_ps(x, magic)), magic_bits);
        let c = _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(r, zpv), c0), c255);
        _mm512_cvtepi32_epi16(_mm512_sub_epi32(c, zpv))
    };
    let mut acc = [_mm512_setzero_si512(); DV];
    let ep = e.as_ptr();
    let vp = vc16.as_ptr();
    for j in (0..stride).step_by(LANES) {
        // SAFETY: `j + LANES <= stride <= e.len()`.
        let (a, b) = unsafe {
            (
                code(_mm512_loadu_ps(ep.add(j))),
                code(_mm512_loadu_ps(ep.add(j + 16))),
            )
        };
        let p = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b);
        for (c, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row `c < DV` of `vc16`, keys `j .. j + LANES` within `stride`.
            let v = unsafe { _mm512_loadu_si512(vp.add(c * stride + j).cast()) };
            *acc = _mm512_dpwssd_epi32(*acc, p, v);
        }
    }
    for (o, a) in orow.iter_mut().zip(acc) {
        *o = _mm512_reduce_add_epi32(a) as f32 * out_scale;
    }
}

/// Query rows per group of [`ShortRows::run_narrow`] (one row a lane).
const GROUP: usize = 16;

/// Whether rows of fewer than `LANES` keys go [`GROUP`] at a time:
/// `TFMQC_NARROW_ROWS=0` turns it off (read once per process); the tests set it with
/// `with_short_heads`.
fn narrow_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    NARROW_ROWS.get().unwrap_or_else(|| {
        *ON.get_or_init(|| std::env::var("TFMQC_NARROW_ROWS").as_deref() != Ok("0"))
    })
}

impl ShortRows<'_> {
    /// [`ShortRows::run`] for rows of fewer than `LANES` keys (cross-attention on a short
    /// conditioning: 8 tokens in the diffusers test UNets), where a row's softmax alone
    /// would run scalar: [`GROUP`] query rows at a time, one a lane, every step of each
    /// row in the order [`ShortRows::run`] and [`softmax_rows`] take (scores summed over
    /// the channels from +0, max and sum of the exps in key order, the same quantizer of
    /// P, integer `P·V`), so the bits are the same.
    #[inline(always)]
    fn run_narrow(&self, out: &mut [f32], dv: usize, score_scale: f32, out_scale: f32) {
        let u = self.unit;
        let (n, d) = (u.n, u.d);
        let (qs, zq) = (u.q_quant.0, u.q_quant.1 as i32);
        let zp = u.p.zero_point as i32;
        // s[j][lane]: the scores, then the exps, of key j; pc[j][lane]: P's centered code.
        let mut s = [[0f32; GROUP]; LANES];
        let mut pc = [[0i32; GROUP]; LANES];
        for (qb, ob) in u.q.chunks(GROUP * d).zip(out.chunks_mut(GROUP * dv)) {
            let g = qb.len() / d;
            // Lanes past the last row compute on zeros and are not stored.
            let mut qc = [[0f32; GROUP]; SHORT_HEAD];
            for (l, qrow) in qb.chunks_exact(d).enumerate() {
                for (c, &x) in qrow.iter().enumerate() {
                    qc[c][l] = (quantize(x, qs, zq, 0, 255) - zq) as f32;
                }
            }
            for (j, sj) in s[..n].iter_mut().enumerate() {
                let mut a = [0f32; GROUP];
                for (c, qcc) in qc[..d].iter().enumerate() {
                    let kv = self.kc[c * self.stride + j];
                    for l in 0..GROUP {
                        a[l] += qcc[l] * kv;
                    }
                }
                for l in 0..GROUP {
                    sj[l] = a[l] * score_scale;
                }
            }
            match u.score {
                ScoreScale::None => {}
                ScoreScale::Mul(c) => s[..n].iter_mut().flatten().for_each(|x| *x *= c),
                ScoreScale::Div(c) => s[..n].iter_mut().flatten().for_each(|x| *x /= c),
            }
            let mut max = [f32::NEG_INFINITY; GROUP];
            for sj in &s[..n] {
                for l in 0..GROUP {
                    max[l] = max[l].max(sj[l]);
                }
            }
            for sj in s[..n].iter_mut() {
                for l in 0..GROUP {
                    sj[l] = exp_nonpositive(sj[l] - max[l]);
                }
            }
            // The sum of each row's exps in `lane_sum`'s order: key j in partial sum j,
            // zeros past the last key, then halves added pairwise.
            let mut t = [[0f32; GROUP]; LANES];
            t[..n].copy_from_slice(&s[..n]);
            let mut w = LANES / 2;
            while w > 0 {
                let (lo, hi) = t.split_at_mut(w);
                for (a, b) in lo.iter_mut().zip(&hi[..w]) {
                    for l in 0..GROUP {
                        a[l] += b[l];
                    }
                }
                w /= 2;
            }
            let mut to_code = [0f32; GROUP];
            for l in 0..GROUP {
                to_code[l] = 1.0 / t[0][l] / u.p.scale;
            }
            for (sj, pj) in s[..n].iter().zip(pc[..n].iter_mut()) {
                for l in 0..GROUP {
                    pj[l] = quantize(sj[l] * to_code[l], 1.0, zp, 0, 255) - zp;
                }
            }
            for c in 0..dv {
                let mut acc = [0i32; GROUP];
                for (j, pj) in pc[..n].iter().enumerate() {
                    let v = self.vc[c * self.stride + j];
                    for l in 0..GROUP {
                        acc[l] = acc[l].wrapping_add(pj[l].wrapping_mul(v));
                    }
                }
                for (l, &a) in acc[..g].iter().enumerate() {
                    ob[l * dv + c] = a as f32 * out_scale;
                }
            }
        }
    }
}

/// [`softmax_rows`] compiled for AVX-512 (its loops vectorize 16 wide).
///
/// # Safety
/// The CPU must support AVX-512 F (and AVX2, FMA).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn softmax_rows_avx512(s: &mut [f32], c: &mut [u8], n: usize, sc: ScoreScale, p: ProbQuant) {
    softmax_rows(s, c, n, sc, p)
}

/// [`softmax_rows`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows_avx2(s: &mut [f32], c: &mut [u8], n: usize, sc: ScoreScale, p: ProbQuant) {
    softmax_rows(s, c, n, sc, p)
}

/// Lanes of the softmax's partial maxima and sums (fixed: the result does not depend on
/// the instruction set's width).
const LANES: usize = 32;

/// Softmax of each row of `s` (`n` values a row, scaled by `sc` first), quantized to the
/// codes of P in `codes`. `s` is overwritten.
#[inline(always)]
pub(crate) fn softmax_rows(
    s: &mut [f32],
    codes: &mut [u8],
    n: usize,
    sc: ScoreScale,
    p: ProbQuant,
) {
    let zp = p.zero_point as i32;
    for (row, out) in s.chunks_exact_mut(n).zip(codes.chunks_exact_mut(n)) {
        match sc {
            ScoreScale::None => {}
            ScoreScale::Mul(c) => row.iter_mut().for_each(|x| *x *= c),
            ScoreScale::Div(c) => row.iter_mut().for_each(|x| *x /= c),
        }
        let max = row_max(row);
        let sum = exp_sum(row, max);
        // `e / sum / scale` as one multiply (a division per value would cost as much as
        // the exp): rounding differs from the unfused graph's by an ulp or two.
        let to_code = 1.0 / sum / p.scale;
        for (o, &e) in out.iter_mut().zip(row.iter()) {
            *o = quantize(e * to_code, 1.0, zp, 0, 255) as u8;
        }
    }
}

/// The maximum of `row` (exact in any order); the last partial `LANES` go through a
/// padded chunk so that no scalar loop is left.
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut it = row.chunks_exact(LANES);
    for c in &mut it {
        for (a, &x) in m.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    let tail = it.remainder();
    let mut buf = [f32::NEG_INFINITY; LANES];
    buf[..tail.len()].copy_from_slice(tail);
    for (a, &x) in m.iter_mut().zip(&buf) {
        *a = a.max(x);
    }
    lane_max(m)
}

/// The maximum of `LANES` values (exact in any order: halves pairwise, as vectors).
#[inline(always)]
fn lane_max(mut m: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            m[l] = m[l].max(m[l + w]);
        }
        w /= 2;
    }
    m[0]
}

/// The sum of `LANES` partial sums: halves added pairwise (`l + w` into `l`, `w` = 16,
/// 8, 4, 2, 1), a few vector adds where a sum in order is 32 dependent scalar adds.
/// [`ShortRows::run_narrow`] sums its rows' exps in this order.
#[inline(always)]
fn lane_sum(mut a: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            a[l] += a[l + w];
        }
        w /= 2;
    }
    a[0]
}

/// Replaces each `x` of `row` by `exp(x − max)` and returns their sum: key `j` is added
/// into partial sum `j % LANES` (the last partial chunk too, through a padded chunk, so
/// its exps vectorize), then [`lane_sum`]. For fewer than `LANES` keys this is
/// [`lane_sum`] of the exps, as [`ShortRows::run_narrow`] adds them.
#[inline(always)]
fn exp_sum(row: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut it = row.chunks_exact_mut(LANES);
    for c in &mut it {
        for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
            *x = exp_nonpositive(*x - max);
            *a += *x;
        }
    }
    let tail = it.into_remainder();
    if !tail.is_empty() {
        let t = tail.len();
        let mut buf = [0f32; LANES];
        buf[..t].copy_from_slice(tail);
        for (l, (a, x)) in acc.iter_mut().zip(buf.iter_mut()).enumerate() {
            let e = exp_nonpositive(*x - max);
            *x = e;
            // `+ 0.0` leaves a (non-negative) partial sum as it is.
            *a += if l < t { e } else { 0.0 };
        }
        tail.copy_from_slice(&buf[..t]);
    }
    lane_sum(acc)
}

/// [`exp_sum`] of `row[..n]` where `row` is padded to whole `LANES` (what is past `n` is
/// overwritten and left out of the sum): the same partial sums and result, without the
/// copies through a padded chunk.
#[inline(always)]
fn exp_sum_padded(row: &mut [f32], n: usize, max: f32) -> f32 {
    let mut acc = [0f32; LANES];
    for (jc, c) in row.chunks_exact_mut(LANES).enumerate() {
        let valid = n.saturating_sub(jc * LANES);
        for (l, (a, x)) in acc.iter_mut().zip(c.iter_mut()).enumerate() {
            let e = exp_nonpositive(*x - max);
            *x = e;
            // `+ 0.0` leaves a (non-negative) partial sum as it is.
            *a += if l < valid { e } else { 0.0 };
        }
    }
    lane_sum(acc)
}

/// `exp(x)` for `x ≤ 0` (within ~2 ulp; `x < −87` gives `exp(−87)`, ~1.6e-38, which no
/// 8-bit quantizer of a probability tells from 0), by [`crate::kernels::expf`]: its
/// fused polynomial is most of the short-head attention's time. 2ⁿ in one factor (n ≥
/// −126 here).
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    let (poly, n) = crate::kernels::expf::reduced(x.clamp(-87.0, 0.0));
    poly * crate::kernels::expf::pow2(n)
}
