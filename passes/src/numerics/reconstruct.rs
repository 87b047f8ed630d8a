//! Weight-rounding reconstruction for one layer, on plain slices (no graph code).
//!
//! A layer has float weights `W` [N out, K in] (row-major) and calibration inputs `X`
//! [K, S] (row-major, one column per input vector; for a conv the im2col patches). The
//! per-row scales are chosen beforehand (see `quant.rs`); only the rounding of `W / s` is
//! optimised here, to minimise the layer's squared output error
//! `||Ŵ X − W X||²_F = tr((W − Ŵ) H (W − Ŵ)ᵀ)` with `H = X Xᵀ`, held by a [`Hessian`]:
//! exact, or for large K (Stable Diffusion's convs reach K = 23,040) its block-diagonal
//! approximation, under which every error below is the block-diagonal one.
//!
//! - [`rtn`]: round to nearest, the baseline (same arithmetic as `quant.rs`).
//! - [`gptq`]: GPTQ (Frantar et al. 2023): column-by-column rounding with the error fed
//!   forward through the upper Cholesky factor of `H⁻¹`, lazy block updates, dampening.
//! - [`adaround`]: layer-wise AdaRound (Nagel et al. 2020) with a hand-written gradient
//!   of the reconstruction loss (no autograd) and Adam.
//! - [`reconstruct`]: runs one of them and falls back to RTN when that is not worse, so
//!   the result is never worse than RTN in [`output_error`].
//!
//! Integers are symmetric, in `[−qmax, qmax]`, stored as `i8` whatever the bit width.
//! Ties round half away from zero (`f32::round`), as `quant.rs` does.
//!
//! Linear algebra: the blocked, threaded Cholesky and the f32/f64 product kernels GPTQ and
//! the output error run on are in `dense`; the small [`linalg`] module below (plain f64
//! Cholesky, solves, inverses) is the reference they are tested against.

use std::thread;
use tfmqc_runtime::rng::SplitMix64;

pub(crate) mod dense;
mod hessian;

pub use hessian::{Hessian, HessianLayout, DEFAULT_BLOCK};

/// Hard cap on worker threads (the machine is shared).
const MAX_THREADS: usize = 8;

// ---------------------------------------------------------------------------------------
// Rounding primitives
// ---------------------------------------------------------------------------------------

/// Round-to-nearest integer of `w / scale` in `[−qmax, qmax]`; 0 for a degenerate scale.
#[inline]
fn round_value(w: f32, scale: f32, qmax: i32) -> i8 {
    if !(scale > 0.0 && scale.is_finite()) {
        return 0;
    }
    let q = (w / scale).round().clamp(-(qmax as f32), qmax as f32);
    if q.is_nan() {
        0
    } else {
        q as i8
    }
}

fn check_qmax(qmax: i32) {
    assert!((1..=127).contains(&qmax), "qmax {qmax} out of 1..=127");
}

/// Round to nearest (the baseline): symmetric, per-row `scales`, values in `[−qmax, qmax]`.
pub fn rtn(w: &[f32], n: usize, k: usize, scales: &[f32], qmax: i32) -> Vec<i8> {
    check_qmax(qmax);
    assert_eq!(w.len(), n * k);
    assert_eq!(scales.len(), n);
    let mut q = vec![0i8; n * k];
    for ((qr, wr), &s) in q.chunks_mut(k.max(1)).zip(w.chunks(k.max(1))).zip(scales) {
        for (qv, &wv) in qr.iter_mut().zip(wr) {
            *qv = round_value(wv, s, qmax);
        }
    }
    q
}

/// `Ŵ = s · q` per row.
pub fn dequantize(q: &[i8], n: usize, k: usize, scales: &[f32]) -> Vec<f32> {
    assert_eq!(q.len(), n * k);
    assert_eq!(scales.len(), n);
    let mut w = vec![0f32; n * k];
    for ((wr, qr), &s) in w.chunks_mut(k.max(1)).zip(q.chunks(k.max(1))).zip(scales) {
        for (wv, &qv) in wr.iter_mut().zip(qr) {
            *wv = qv as f32 * s;
        }
    }
    w
}

// ---------------------------------------------------------------------------------------
// Gram matrix and output error
// ---------------------------------------------------------------------------------------

/// `H = X Xᵀ` (K×K, f64) of inputs `x` [K, S] row-major. f32 products accumulated in
/// f32 over chunks of 256 samples, then in f64. The lower triangle is computed (rows split
/// over threads by work) and mirrored.
pub fn gram(x: &[f32], k: usize, s: usize) -> Vec<f64> {
    assert_eq!(x.len(), k * s);
    let mut h = vec![0f64; k * k];
    if k == 0 || s == 0 {
        return h;
    }
    let mut c0 = 0;
    while c0 < s {
        let c1 = (c0 + GRAM_CHUNK).min(s);
        add_gram_chunk(x, k, s, (c0, c1), &mut h);
        c0 = c1;
    }
    mirror_lower(&mut h, k);
    h
}

/// Columns per f32 partial sum of [`gram`].
const GRAM_CHUNK: usize = 256;

/// Adds the f32 products of the columns `c0..c1` (at most [`GRAM_CHUNK`]) of `x` [K, S]
/// to the lower triangle of `h` (K×K f64), as [`gram`] does for each chunk: rows split
/// over threads by work, each thread through panels of 64 rows (no K×K buffer).
pub(crate) fn add_gram_chunk(
    x: &[f32],
    k: usize,
    s: usize,
    (c0, c1): (usize, usize),
    h: &mut [f64],
) {
    const PANEL: usize = 64;
    let w = c1 - c0;
    debug_assert!(w <= GRAM_CHUNK);
    let (mut xc, mut xct) = (vec![0f32; k * w], vec![0f32; k * w]);
    for (i, (dst, src)) in xc.chunks_mut(w).zip(x.chunks(s)).enumerate() {
        dst.copy_from_slice(&src[c0..c1]);
        for (j, &v) in dst.iter().enumerate() {
            xct[j * k + i] = v;
        }
    }
    let (xc, xct) = (&xc, &xct);
    let splits = dense::row_splits(k, threads_for(k * k * w / 2), Some(0));
    thread::scope(|sc| {
        let mut rest = &mut h[..];
        for &(r0, r1) in &splits {
            let (mine, tail) = rest.split_at_mut((r1 - r0) * k);
            rest = tail;
            let mut job = move || {
                let mut part = vec![0f32; PANEL.min(r1 - r0) * k];
                let mut p0 = r0;
                while p0 < r1 {
                    let p1 = (p0 + PANEL).min(r1);
                    let rows = p1 - p0;
                    let part = &mut part[..rows * k];
                    kernels::nn_lower(&xc[p0 * w..p1 * w], xct, part, rows, w, k, Some(p0));
                    for i in p0..p1 {
                        let hr = &mut mine[(i - r0) * k..(i - r0) * k + i + 1];
                        for (hv, &pv) in hr.iter_mut().zip(&part[(i - p0) * k..]) {
                            *hv += pv as f64;
                        }
                    }
                    p0 = p1;
                }
            };
            if splits.len() == 1 {
                job();
            } else {
                sc.spawn(job);
            }
        }
    });
}

/// Copies the lower triangle of the K×K `h` onto its upper triangle.
pub(crate) fn mirror_lower(h: &mut [f64], k: usize) {
    for i in 0..k {
        for j in 0..i {
            h[j * k + i] = h[i * k + j];
        }
    }
}

/// The layer's squared output error `tr((W − Ŵ) H (W − Ŵ)ᵀ)` (= `||Ŵ X − W X||²_F` when
/// H is exact). `w` and `w_q_dequant` are [N, K]. With a block-diagonal `h` this is the
/// block-diagonal approximation `Σ_b tr(ΔW_b H_b ΔW_bᵀ)`: the errors that inputs of
/// different blocks cause together are not counted.
pub fn output_error(w: &[f32], w_q_dequant: &[f32], h: &Hessian) -> f64 {
    output_errors(w, &[w_q_dequant], h, None)[0]
}

/// [`output_error`] of several candidates, reading each block of `h` once, on `threads`
/// threads (default: by the work; the result does not depend on it). An exact `h` is used
/// in f64; the f32 blocks of a block-diagonal one in f32 (sums over panels of 128 inputs in
/// f32, then f64: relative error ~1e-6, twice the speed).
fn output_errors(
    w: &[f32],
    candidates: &[&[f32]],
    h: &Hessian,
    threads: Option<usize>,
) -> Vec<f64> {
    let k = h.k();
    let mut total = vec![0f64; candidates.len()];
    if k == 0 {
        return total;
    }
    assert_eq!(w.len() % k, 0);
    let n = w.len() / k;
    for (bi, (a, b)) in h.blocks().enumerate() {
        let m = b - a;
        let threads = threads.unwrap_or_else(|| threads_for(n * m * m / 2));
        match h.block_f32(bi) {
            Some(hb) => {
                for (t, c) in total.iter_mut().zip(candidates) {
                    *t += quadratic_rows::<f32>(w, c, n, k, (a, m), &hb, threads);
                }
            }
            None => {
                let hb = h.block(bi);
                for (t, c) in total.iter_mut().zip(candidates) {
                    *t += quadratic_rows::<f64>(w, c, n, k, (a, m), &hb, threads);
                }
            }
        }
    }
    total
}

/// `Σ_r d_rᵀ H d_r` with `d_r = (w − ŵ)[r, a..a+m]` and `hb` the m×m block: the lower
/// triangle of H by panels of 128 rows (off-diagonal part counted twice), rows split over
/// threads; each row's sum is independent of the split, and rows are summed in order.
fn quadratic_rows<T: dense::Real>(
    w: &[f32],
    wq: &[f32],
    n: usize,
    k: usize,
    (a, m): (usize, usize),
    hb: &[T],
    threads: usize,
) -> f64 {
    use dense::{nt_update, Acc};
    assert_eq!(wq.len(), w.len());
    const IB: usize = 128;
    let mut per_row = vec![0f64; n];
    par_rows(&mut per_row, 1, threads, |r0, out| {
        let rows = out.len();
        let mut d = vec![T::default(); rows * m];
        for (ri, dr) in d.chunks_mut(m).enumerate() {
            let r = r0 + ri;
            for ((dv, &x), &y) in dr
                .iter_mut()
                .zip(&w[r * k + a..r * k + a + m])
                .zip(&wq[r * k + a..r * k + a + m])
            {
                // Exact in f64; in f32 rounded once.
                *dv = if std::mem::size_of::<T>() == 8 {
                    T::of_f32(x) + T::of_f32(y).neg_()
                } else {
                    T::of_f32(x - y)
                };
            }
        }
        let (mut off, mut diag) = (vec![T::default(); rows * IB], vec![T::default(); rows * IB]);
        let mut i0 = 0;
        while i0 < m {
            let i1 = (i0 + IB).min(m);
            let ib = i1 - i0;
            off.fill(T::default());
            diag.fill(T::default());
            // off[r, i] = Σ_{j < i0} H[i, j] d_r[j]; diag[r, i] = Σ_{i0 ≤ j < i1} H[i, j] d_r[j].
            nt_update(
                &mut off,
                IB,
                &d,
                m,
                &hb[i0 * m..],
                m,
                (rows, ib, i0),
                Acc::Add,
                None,
            );
            nt_update(
                &mut diag,
                IB,
                &d[i0..],
                m,
                &hb[i0 * m + i0..],
                m,
                (rows, ib, ib),
                Acc::Add,
                None,
            );
            for (ri, o) in out.iter_mut().enumerate() {
                let dr = &d[ri * m + i0..ri * m + i1];
                for (j, &dv) in dr.iter().enumerate() {
                    let (of, dg) = (off[ri * IB + j].to_f64(), diag[ri * IB + j].to_f64());
                    *o += dv.to_f64() * (2.0 * of + dg);
                }
            }
            i0 = i1;
        }
    });
    per_row.iter().sum()
}

// ---------------------------------------------------------------------------------------
// GPTQ
// ---------------------------------------------------------------------------------------

/// GPTQ rounding (Frantar et al. 2023) of `w` [N, K] with given per-row `scales`.
///
/// `h` holds `H = X Xᵀ`. Dead inputs (`H_ii = 0`) get `H_ii = 1` and a zero weight
/// column; `H += λI` with `λ = damp · mean(diag H)` over all K (0.01 in the paper);
/// columns are processed in order, in batches of `block` (128) with lazy updates of the
/// rest. If the Cholesky factorisation fails, the dampening is raised tenfold (up to 4
/// times); if it still fails the RTN result is returned (for that diagonal block of `h`;
/// if `h` has a non-finite entry, for the whole layer).
///
/// With a block-diagonal `h`, rounding errors are fed forward within each diagonal block
/// only (the exact GPTQ step for that approximation of H); blocks are independent.
///
/// The sweep is GPTQ's in the equivalent "nearest plane" form: with `H = R Rᵀ` (`R`
/// upper triangular, from the Cholesky factor of the reversed H), column `i` is rounded
/// from `w_i + Σ_{t<i} (w_t − ŵ_t)·R_ti / R_ii` — what GPTQ's updates through the upper
/// Cholesky factor of `H⁻¹` add up to, without forming `H⁻¹`. The sums over earlier
/// batches are matrix products (`dense`), rows are split over threads.
#[allow(clippy::too_many_arguments)]
pub fn gptq(
    w: &[f32],
    n: usize,
    k: usize,
    h: &Hessian,
    scales: &[f32],
    qmax: i32,
    damp: f64,
    block: usize,
) -> Vec<i8> {
    gptq_with(w, n, k, h, scales, qmax, damp, block, None)
}

/// [`gptq`] on `threads` threads (default: by the work); the result does not depend on it.
#[allow(clippy::too_many_arguments)]
fn gptq_with(
    w: &[f32],
    n: usize,
    k: usize,
    h: &Hessian,
    scales: &[f32],
    qmax: i32,
    damp: f64,
    block: usize,
    threads: Option<usize>,
) -> Vec<i8> {
    check_qmax(qmax);
    assert_eq!(w.len(), n * k);
    assert_eq!(h.k(), k);
    assert_eq!(scales.len(), n);
    if n == 0 || k == 0 {
        return vec![0; n * k];
    }
    let block = block.max(1);
    if !h.is_finite() {
        return rtn(w, n, k, scales, qmax);
    }
    let diag = h.diag();
    let dead: Vec<bool> = diag.iter().map(|&d| d == 0.0).collect();
    let mean_diag = diag
        .iter()
        .map(|&d| if d == 0.0 { 1.0 } else { d })
        .sum::<f64>()
        / k as f64;

    let mut q = vec![0i8; n * k];
    for (bi, (a, b)) in h.blocks().enumerate() {
        let m = b - a;
        let threads = threads.unwrap_or_else(|| threads_for(n * m * m / 2 + m * m * m / 3));
        let entry = |r: usize, c: usize| h.lower_entry(bi, r, c);
        let Some(rt) = gptq_factor(&entry, m, &dead[a..b], damp, mean_diag, threads) else {
            for (qr, (wr, &s)) in q.chunks_mut(k).zip(w.chunks(k).zip(scales)) {
                for (qv, &wv) in qr[a..b].iter_mut().zip(&wr[a..b]) {
                    *qv = round_value(wv, s, qmax);
                }
            }
            continue;
        };
        par_rows(&mut q, k, threads, |r0, qrows| {
            gptq_sweep(
                w,
                k,
                (a, m),
                &dead[a..b],
                &rt,
                scales,
                qmax,
                block,
                r0,
                qrows,
            );
        });
    }
    q
}

/// `Rᵀ` (lower, m×m, row-major) with `H_b + λI = R Rᵀ`, `R` upper, for the diagonal block
/// whose lower-triangle entries `entry(r, c)` (`r ≥ c`) gives (dead inputs set to 1 on the
/// diagonal); the dampening rules of [`gptq`]. `None` when the factorisation fails at
/// every dampening. One m×m f64 buffer.
fn gptq_factor(
    entry: &dyn Fn(usize, usize) -> f64,
    m: usize,
    dead: &[bool],
    damp: f64,
    mean_diag: f64,
    threads: usize,
) -> Option<Vec<f64>> {
    let mut lambda = damp.max(0.0) * mean_diag;
    let mut a = vec![0f64; m * m];
    for _ in 0..5 {
        // J (H + λI) J (J reverses the order), lower triangle.
        for i in 0..m {
            let src = m - 1 - i;
            for j in 0..=i {
                // H[src, m−1−j] with src ≤ m−1−j: read the symmetric lower entry.
                a[i * m + j] = entry(m - 1 - j, src);
            }
            a[i * m + i] = if dead[src] { 1.0 } else { a[i * m + i] } + lambda;
        }
        if dense::cholesky_in_place(&mut a, m, threads).is_ok() {
            // J L J = R (upper) with H = R Rᵀ; Rᵀ[i, t] = L[m−1−t, m−1−i]: L's entry (p, c)
            // moves to (m−1−c, m−1−p), a reflection across the anti-diagonal.
            for p in 0..m {
                for c in 0..=p {
                    let (i, t) = (m - 1 - c, m - 1 - p);
                    if (i, t) > (p, c) {
                        a.swap(p * m + c, i * m + t);
                    }
                }
            }
            return Some(a);
        }
        lambda = if lambda > 0.0 {
            lambda * 10.0
        } else {
            1e-6 * mean_diag.max(f64::MIN_POSITIVE)
        };
    }
    None
}

/// GPTQ's sweep over the columns `a..a+m` for the rows of `qrows` (row `r0` first).
#[allow(clippy::too_many_arguments)]
fn gptq_sweep(
    w: &[f32],
    k: usize,
    (a, m): (usize, usize),
    dead: &[bool],
    rt: &[f64],
    scales: &[f32],
    qmax: i32,
    block: usize,
    r0: usize,
    qrows: &mut [i8],
) {
    let rows = qrows.len() / k;
    // The (dead-zeroed) weights of the block and their rounding residuals w − ŵ.
    let mut wb = vec![0f64; rows * m];
    for (ri, row) in wb.chunks_mut(m).enumerate() {
        let src = &w[(r0 + ri) * k + a..(r0 + ri) * k + a + m];
        for ((v, &x), &d) in row.iter_mut().zip(src).zip(dead) {
            *v = if d { 0.0 } else { x as f64 };
        }
    }
    let mut res = vec![0f64; rows * m];
    let mut acc = vec![0f64; rows * block];
    let mut i1 = 0;
    while i1 < m {
        let i2 = (i1 + block).min(m);
        let bw = i2 - i1;
        // acc[r, i − i1] = Σ_{t < i1} res[r, t] · Rᵀ[i, t]
        acc.fill(0.0);
        dense::nt_update(
            &mut acc,
            block,
            &res,
            m,
            &rt[i1 * m..],
            m,
            (rows, bw, i1),
            dense::Acc::Add,
            None,
        );
        for ri in 0..rows {
            let s = scales[r0 + ri];
            for i in i1..i2 {
                let within = dot_f64(&res[ri * m + i1..ri * m + i], &rt[i * m + i1..i * m + i]);
                let wf = wb[ri * m + i] + (acc[ri * block + i - i1] + within) / rt[i * m + i];
                let qi = round_value(wf as f32, s, qmax);
                qrows[ri * k + a + i] = qi;
                res[ri * m + i] = wb[ri * m + i] - qi as f64 * s as f64;
            }
        }
        i1 = i2;
    }
}

// ---------------------------------------------------------------------------------------
// AdaRound
// ---------------------------------------------------------------------------------------

/// How AdaRound evaluates the reconstruction gradient `∂L/∂Ŵ`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdaRoundGrad {
    /// The exact gradient, by the cheaper route: `Gram` when `2·S > K`, else all S
    /// columns of X each step (`2/S · (ΔW X) Xᵀ`).
    Auto,
    /// Exact full-data gradient from the Gram matrix: `2/S · ΔW H`, cost N·K² a step.
    Gram,
    /// Mini-batch of `batch` columns of X sampled each step (without replacement within a
    /// step): `2/B · (ΔW X_b) X_bᵀ`, cost 2·N·K·B a step.
    MiniBatch,
}

/// AdaRound settings; [`Default`] is the reference's (20k steps, lr 1e-3, λ 0.01, β 20 → 2,
/// 20% warm-up) with the exact gradient.
#[derive(Clone, Debug)]
pub struct AdaRoundOpts {
    /// Adam steps (reference: 20 000).
    pub iters: usize,
    /// Adam learning rate (reference: 1e-3).
    pub lr: f32,
    /// Regulariser weight λ (reference: 0.01), relative to the reconstruction loss
    /// `(1/S)·||ΔW X||²_F` (squared error summed over outputs, averaged over columns).
    /// The reference (BRECQ) sums over all outputs of one image (C·H·W) and averages over
    /// images, i.e. its loss is P times ours for P im2col columns per image; keeping
    /// λ = 0.01 on our scale (a relatively stronger regulariser) measured better than
    /// λ/P on a conv-like layer (4 bits, 2000 steps: 0.18× vs 0.61× RTN's error).
    pub lambda: f32,
    /// β annealed linearly from `.0` to `.1` (reference: 20 → 2) after the warm-up.
    pub beta: (f32, f32),
    /// Fraction of the iterations without regulariser (reference: 0.2).
    pub warmup: f32,
    pub grad: AdaRoundGrad,
    /// Columns per mini-batch (`MiniBatch` only).
    pub batch: usize,
    /// Seed of the mini-batch sampler.
    pub seed: u64,
}

impl Default for AdaRoundOpts {
    fn default() -> Self {
        AdaRoundOpts {
            iters: 20_000,
            lr: 1e-3,
            lambda: 0.01,
            beta: (20.0, 2.0),
            warmup: 0.2,
            grad: AdaRoundGrad::Auto,
            batch: 256,
            seed: 0x5eed,
        }
    }
}

/// Layer-wise AdaRound of `w` [N, K] with inputs `x` [K, S] (row-major) and per-row
/// `scales`: `Ŵ = s·clamp(⌊W/s⌋ + h(V), −qmax, qmax)`, `h(V) = clamp(1.2σ(V) − 0.1, 0, 1)`,
/// loss `(1/S)||ΔW X||²_F + λ Σ (1 − |2h − 1|^β)`, the regulariser off during the
/// `warmup` fraction and β annealed linearly `beta.0 → beta.1` after it; Adam with
/// learning rate `lr`; `V` starts where `h(V)` is the fractional part of `W/s`. The
/// result rounds up where `h ≥ ½`. Gradient choice and batch as in
/// [`AdaRoundOpts::default`].
#[allow(clippy::too_many_arguments)]
pub fn adaround(
    w: &[f32],
    n: usize,
    k: usize,
    x: &[f32],
    s: usize,
    scales: &[f32],
    qmax: i32,
    iters: usize,
    lr: f32,
    lambda: f32,
    beta: (f32, f32),
    warmup: f32,
) -> Vec<i8> {
    let opts = AdaRoundOpts {
        iters,
        lr,
        lambda,
        beta,
        warmup,
        ..AdaRoundOpts::default()
    };
    adaround_with(w, n, k, x, s, None, scales, qmax, &opts)
}

/// [`adaround`] with all settings; `gram` (`X Xᵀ`, K×K) may be passed to save
/// recomputing it when the Gram gradient is chosen.
#[allow(clippy::too_many_arguments)]
pub fn adaround_with(
    w: &[f32],
    n: usize,
    k: usize,
    x: &[f32],
    s: usize,
    gram: Option<&[f64]>,
    scales: &[f32],
    qmax: i32,
    opts: &AdaRoundOpts,
) -> Vec<i8> {
    check_qmax(qmax);
    assert_eq!(w.len(), n * k);
    assert_eq!(x.len(), k * s);
    assert_eq!(scales.len(), n);
    if n == 0 || k == 0 || s == 0 {
        return rtn(w, n, k, scales, qmax);
    }
    let objective = Objective::new(x, k, s, gram, opts);
    let mut ada = AdaState::new(w, n, k, scales, qmax);
    ada.run(&objective, opts);
    ada.hard_round()
}

/// AdaRound from the Gram matrix alone (exact full-data gradient): for when only
/// `H = X Xᵀ` over `s` columns is at hand (e.g. TIAR's time-embedding inputs).
#[allow(clippy::too_many_arguments)]
pub fn adaround_gram(
    w: &[f32],
    n: usize,
    k: usize,
    gram: &[f64],
    s: usize,
    scales: &[f32],
    qmax: i32,
    opts: &AdaRoundOpts,
) -> Vec<i8> {
    check_qmax(qmax);
    assert_eq!(w.len(), n * k);
    assert_eq!(gram.len(), k * k);
    if n == 0 || k == 0 || s == 0 {
        return rtn(w, n, k, scales, qmax);
    }
    let objective = Objective::from_gram(gram, s);
    let mut ada = AdaState::new(w, n, k, scales, qmax);
    ada.run(&objective, opts);
    ada.hard_round()
}

/// Source of `∂L_rec/∂Ŵ`.
enum Objective {
    /// `hs = H / S` in f32.
    Gram { hs: Vec<f32> },
    /// `x` [K, S] and `xt` = Xᵀ [S, K]; `batch` columns drawn per step (all of them when
    /// `batch ≥ S`).
    Batch {
        x: Vec<f32>,
        xt: Vec<f32>,
        s: usize,
        batch: usize,
    },
}

impl Objective {
    fn new(x: &[f32], k: usize, s: usize, gram_in: Option<&[f64]>, opts: &AdaRoundOpts) -> Self {
        let batch = opts.batch.max(1);
        let use_gram = match opts.grad {
            AdaRoundGrad::Gram => true,
            AdaRoundGrad::MiniBatch => false,
            // Always exact: the Gram gradient costs N·K² a step, all S columns 2·N·K·S;
            // mini-batches (2·N·K·B) are cheaper but noisier (measured: clearly worse
            // results for the same number of steps), so only on request.
            AdaRoundGrad::Auto => 2 * s > k,
        };
        if use_gram {
            match gram_in {
                Some(g) => Objective::from_gram(g, s),
                None => Objective::from_gram(&gram(x, k, s), s),
            }
        } else {
            let mut xt = vec![0f32; s * k];
            for (i, row) in x.chunks(s).enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    xt[j * k + i] = v;
                }
            }
            Objective::Batch {
                x: x.to_vec(),
                xt,
                s,
                batch: if opts.grad == AdaRoundGrad::Auto {
                    s
                } else {
                    batch.min(s)
                },
            }
        }
    }

    fn from_gram(g: &[f64], s: usize) -> Self {
        let inv = 1.0 / s.max(1) as f64;
        Objective::Gram {
            hs: g.iter().map(|&v| (v * inv) as f32).collect(),
        }
    }
}

/// Per-weight AdaRound state.
#[derive(Clone, Copy, Default)]
struct Elem {
    /// The rounding variable V.
    v: f32,
    /// Adam moments.
    m1: f32,
    m2: f32,
    /// ⌊W/s⌋.
    base: f32,
    /// h(V) and dh/dV of the last forward pass.
    h: f32,
    dh: f32,
    /// s where the clamp to ±qmax passes the gradient, else 0.
    ds: f32,
}

struct AdaState<'a> {
    w: &'a [f32],
    n: usize,
    k: usize,
    scales: &'a [f32],
    qmax: i32,
    el: Vec<Elem>,
    /// ΔW = Ŵ(V) − W of the last forward pass.
    d: Vec<f32>,
    /// ∂L_rec/∂Ŵ.
    g: Vec<f32>,
    /// Scratch for mini-batches: X_b as [B, K] and [K, B], E = ΔW X_b.
    xb: Vec<f32>,
    xbt: Vec<f32>,
    e: Vec<f32>,
    idx: Vec<usize>,
    threads: usize,
}

const ZETA: f32 = 1.1;
const GAMMA: f32 = -0.1;

#[inline]
fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// Regulariser settings of one step (`on == false` during the warm-up).
#[derive(Clone, Copy)]
struct Reg {
    on: bool,
    lambda: f32,
    beta: f32,
}

impl Reg {
    /// `λ (1 − |2h − 1|^β)` and its derivative w.r.t. h.
    #[inline]
    fn value_grad(self, h: f32) -> (f32, f32) {
        if !self.on {
            return (0.0, 0.0);
        }
        let u = 2.0 * h - 1.0;
        let a = u.abs();
        if a == 0.0 {
            return (self.lambda, 0.0);
        }
        let p1 = a.powf(self.beta - 1.0);
        let val = self.lambda * (1.0 - p1 * a);
        let grad = -self.lambda * self.beta * p1 * u.signum() * 2.0;
        (val, grad)
    }
}

/// ∂L/∂V of one weight from `g` = ∂L_rec/∂Ŵ (chain rule: Ŵ = s·clamp(base + h), h = h(V)):
/// `(g · s · [inside the clamp] + ∂reg/∂h) · dh/dV`.
#[inline]
fn dl_dv(e: &Elem, g: f32, reg: Reg) -> f32 {
    (g * e.ds + reg.value_grad(e.h).1) * e.dh
}

impl<'a> AdaState<'a> {
    fn new(w: &'a [f32], n: usize, k: usize, scales: &'a [f32], qmax: i32) -> Self {
        let mut el = vec![Elem::default(); n * k];
        for (r, (erow, wrow)) in el.chunks_mut(k).zip(w.chunks(k)).enumerate() {
            let s = scales[r];
            let ok = s > 0.0 && s.is_finite();
            for (e, &wv) in erow.iter_mut().zip(wrow) {
                let (base, frac) = if ok {
                    let t = wv / s;
                    let b = t.floor();
                    (b, (t - b).clamp(0.0, 1.0))
                } else {
                    (0.0, 0.0)
                };
                e.base = base;
                // h(V) = frac  ⇔  σ(V) = (frac − γ)/(ζ − γ).
                let p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1.0 - 1e-6);
                e.v = (p / (1.0 - p)).ln();
            }
        }
        let work = n * k * k.min(512);
        AdaState {
            w,
            n,
            k,
            scales,
            qmax,
            el,
            d: vec![0.0; n * k],
            g: vec![0.0; n * k],
            xb: Vec::new(),
            xbt: Vec::new(),
            e: Vec::new(),
            idx: Vec::new(),
            threads: threads_for(work),
        }
    }

    /// Computes h, dh/dV, the clamp mask and ΔW from V.
    fn forward(&mut self) {
        let (k, w, scales, qmax) = (self.k, self.w, self.scales, self.qmax as f32);
        par_rows2(
            &mut self.el,
            k,
            &mut self.d,
            k,
            self.threads,
            |r0, erows, drows| {
                for (ri, (erow, drow)) in erows.chunks_mut(k).zip(drows.chunks_mut(k)).enumerate() {
                    let r = r0 + ri;
                    let s = scales[r];
                    let s = if s > 0.0 && s.is_finite() { s } else { 0.0 };
                    let wrow = &w[r * k..(r + 1) * k];
                    for ((e, dv), &wv) in erow.iter_mut().zip(drow.iter_mut()).zip(wrow) {
                        let sig = sigmoid(e.v);
                        let raw = sig * (ZETA - GAMMA) + GAMMA;
                        let (h, dh) = if raw <= 0.0 {
                            (0.0, 0.0)
                        } else if raw >= 1.0 {
                            (1.0, 0.0)
                        } else {
                            (raw, (ZETA - GAMMA) * sig * (1.0 - sig))
                        };
                        let xq = e.base + h;
                        let (xc, ds) = if xq < -qmax {
                            (-qmax, 0.0)
                        } else if xq > qmax {
                            (qmax, 0.0)
                        } else {
                            (xq, s)
                        };
                        e.h = h;
                        e.dh = dh;
                        e.ds = ds;
                        *dv = s * xc - wv;
                    }
                }
            },
        );
    }

    /// `self.g = ∂L_rec/∂Ŵ` from `self.d`; returns L_rec.
    fn rec_grad(&mut self, obj: &Objective, rng: &mut SplitMix64) -> f64 {
        let (n, k) = (self.n, self.k);
        match obj {
            Objective::Gram { hs } => {
                matmul_nn(&self.d, hs, &mut self.g, n, k, k, self.threads);
                // L = tr(D Hs Dᵀ); ∂L/∂Ŵ = 2 D Hs.
                let mut loss = 0f64;
                for (gv, &dv) in self.g.iter_mut().zip(&self.d) {
                    loss += (*gv * dv) as f64;
                    *gv *= 2.0;
                }
                loss
            }
            Objective::Batch { x, xt, s, batch } => {
                let (s, b) = (*s, *batch);
                if self.idx.len() != s {
                    self.idx = (0..s).collect();
                }
                if b < s {
                    // Partial Fisher–Yates: the first b entries are a uniform sample.
                    for i in 0..b {
                        let j = i + rng.below(s - i);
                        self.idx.swap(i, j);
                    }
                }
                let cols = &self.idx[..b];
                // X_b as [B, K] (rows of Xᵀ) and as [K, B].
                self.xb.resize(b * k, 0.0);
                for (dst, &c) in self.xb.chunks_mut(k).zip(cols) {
                    dst.copy_from_slice(&xt[c * k..(c + 1) * k]);
                }
                self.xbt.resize(k * b, 0.0);
                for (dst, src) in self.xbt.chunks_mut(b).zip(x.chunks(s)) {
                    for (d, &c) in dst.iter_mut().zip(cols) {
                        *d = src[c];
                    }
                }
                self.e.resize(n * b, 0.0);
                // E = ΔW X_b (N×B), L = |E|²/B, ∂L/∂Ŵ = 2/B · E X_bᵀ.
                matmul_nn(&self.d, &self.xbt, &mut self.e, n, k, b, self.threads);
                let inv = 1.0 / b as f32;
                let mut loss = 0f64;
                for ev in self.e.iter_mut() {
                    loss += (*ev * *ev) as f64;
                    *ev *= 2.0 * inv;
                }
                matmul_nn(&self.e, &self.xb, &mut self.g, n, b, k, self.threads);
                loss * inv as f64
            }
        }
    }

    /// ∂L/∂V per weight into `out` (also returns the regulariser value).
    #[cfg(test)]
    fn grad_v(&self, reg: Reg, out: &mut [f32]) -> f64 {
        let mut rl = 0f64;
        for ((o, e), &g) in out.iter_mut().zip(&self.el).zip(&self.g) {
            rl += reg.value_grad(e.h).0 as f64;
            *o = dl_dv(e, g, reg);
        }
        rl
    }

    /// Adam step on V using `self.g` (bias-corrected, as torch.optim.Adam).
    fn adam_step(&mut self, reg: Reg, lr: f32, t: i32) {
        const B1: f32 = 0.9;
        const B2: f32 = 0.999;
        const EPS: f32 = 1e-8;
        let c1 = 1.0 - B1.powi(t);
        let c2 = 1.0 - B2.powi(t);
        let step = lr / c1;
        let c2s = c2.sqrt();
        let g = &self.g;
        let k = self.k;
        par_rows(&mut self.el, k, self.threads, |r0, erows| {
            let grows = &g[r0 * k..r0 * k + erows.len()];
            for (e, &gv) in erows.iter_mut().zip(grows) {
                let gvv = dl_dv(e, gv, reg);
                e.m1 = B1 * e.m1 + (1.0 - B1) * gvv;
                e.m2 = B2 * e.m2 + (1.0 - B2) * gvv * gvv;
                e.v -= step * e.m1 / (e.m2.sqrt() / c2s + EPS);
            }
        });
    }

    fn run(&mut self, obj: &Objective, opts: &AdaRoundOpts) {
        let mut rng = SplitMix64::new(opts.seed);
        let iters = opts.iters;
        let warm = (opts.warmup.clamp(0.0, 1.0) as f64 * iters as f64) as usize;
        for it in 0..iters {
            let reg = Reg {
                on: it >= warm,
                lambda: opts.lambda,
                beta: anneal_beta(it, warm, iters, opts.beta),
            };
            self.forward();
            self.rec_grad(obj, &mut rng);
            self.adam_step(reg, opts.lr, (it + 1).min(i32::MAX as usize) as i32);
        }
    }

    fn hard_round(&self) -> Vec<i8> {
        let qmax = self.qmax as f32;
        self.el
            .chunks(self.k)
            .zip(self.scales)
            .flat_map(|(erow, &s)| {
                let ok = s > 0.0 && s.is_finite();
                erow.iter().map(move |e| {
                    if !ok {
                        return 0;
                    }
                    // h ≥ ½ ⇔ σ(V) ≥ ½ ⇔ V ≥ 0.
                    let up = if e.v >= 0.0 { 1.0 } else { 0.0 };
                    (e.base + up).clamp(-qmax, qmax) as i8
                })
            })
            .collect()
    }
}

/// AdaRound's rounding variables of one layer, driven by a gradient computed outside
/// (TIAR back-propagates the temporal-feature loss through several layers to each `Ŵ`).
/// Same parameterisation, regulariser, β schedule and Adam as [`adaround_with`].
pub struct SoftRounding<'a> {
    st: AdaState<'a>,
    step: usize,
}

impl<'a> SoftRounding<'a> {
    /// `w` [N, K] row-major, one scale per row; `V` starts at the fractional part of `W/s`.
    pub fn new(w: &'a [f32], n: usize, k: usize, scales: &'a [f32], qmax: i32) -> Self {
        check_qmax(qmax);
        assert_eq!(w.len(), n * k);
        assert_eq!(scales.len(), n);
        let mut st = AdaState::new(w, n, k, scales, qmax);
        // Tiny layers: threads would cost more than they save.
        st.threads = 1;
        SoftRounding { st, step: 0 }
    }

    /// The soft-rounded weight `Ŵ(V)` [N, K] (recomputes h(V)).
    pub fn weight(&mut self, out: &mut [f32]) {
        self.st.forward();
        for ((o, &d), &w) in out.iter_mut().zip(&self.st.d).zip(self.st.w) {
            *o = w + d;
        }
    }

    /// One Adam step on V from `grad` = ∂L_rec/∂Ŵ at the last [`SoftRounding::weight`],
    /// with the regulariser of step `self.step` of `opts.iters`. Returns the regulariser's
    /// value.
    pub fn step(&mut self, grad: &[f32], opts: &AdaRoundOpts) -> f64 {
        assert_eq!(grad.len(), self.st.g.len());
        let iters = opts.iters.max(1);
        let warm = (opts.warmup.clamp(0.0, 1.0) as f64 * iters as f64) as usize;
        let it = self.step;
        let reg = Reg {
            on: it >= warm,
            lambda: opts.lambda,
            beta: anneal_beta(it, warm, iters, opts.beta),
        };
        self.st.g.copy_from_slice(grad);
        let value: f64 = self
            .st
            .el
            .iter()
            .map(|e| reg.value_grad(e.h).0 as f64)
            .sum();
        self.step += 1;
        self.st
            .adam_step(reg, opts.lr, self.step.min(i32::MAX as usize) as i32);
        value
    }

    /// ∂L/∂V of every weight for `grad` = ∂L_rec/∂Ŵ with the regulariser of the current
    /// step (what [`SoftRounding::step`] feeds Adam); for gradient checks.
    pub fn grad_v(&self, grad: &[f32], opts: &AdaRoundOpts) -> Vec<f32> {
        let iters = opts.iters.max(1);
        let warm = (opts.warmup.clamp(0.0, 1.0) as f64 * iters as f64) as usize;
        let reg = Reg {
            on: self.step >= warm,
            lambda: opts.lambda,
            beta: anneal_beta(self.step, warm, iters, opts.beta),
        };
        self.st
            .el
            .iter()
            .zip(grad)
            .map(|(e, &g)| dl_dv(e, g, reg))
            .collect()
    }

    /// The rounding variables V (for gradient checks).
    pub fn v(&self) -> Vec<f32> {
        self.st.el.iter().map(|e| e.v).collect()
    }

    /// Sets the rounding variables V (for gradient checks).
    pub fn set_v(&mut self, v: &[f32]) {
        for (e, &x) in self.st.el.iter_mut().zip(v) {
            e.v = x;
        }
    }

    /// The hard rounding: up where h(V) ≥ ½.
    pub fn hard_round(&self) -> Vec<i8> {
        self.st.hard_round()
    }
}

/// BRECQ's linear temperature decay: `b0` at the end of the warm-up down to `b1` at the end.
fn anneal_beta(it: usize, warm: usize, iters: usize, (b0, b1): (f32, f32)) -> f32 {
    if it < warm || iters <= warm {
        return b0;
    }
    let rel = (it - warm) as f32 / (iters - warm) as f32;
    b1 + (b0 - b1) * (1.0 - rel).max(0.0)
}

// ---------------------------------------------------------------------------------------
// Never worse than RTN
// ---------------------------------------------------------------------------------------

/// Which rounding to run.
#[derive(Clone, Debug)]
pub enum Method {
    Rtn,
    Gptq { damp: f64, block: usize },
    AdaRound(AdaRoundOpts),
}

impl Method {
    /// GPTQ with the paper's settings (damp 0.01, block 128).
    pub fn gptq_default() -> Self {
        Method::Gptq {
            damp: 0.01,
            block: 128,
        }
    }
}

/// Result of [`reconstruct`].
#[derive(Clone, Debug)]
pub struct Reconstructed {
    /// The integers, [N, K].
    pub q: Vec<i8>,
    /// [`output_error`] of `q` and of RTN.
    pub error: f64,
    pub rtn_error: f64,
    /// True when the method was worse than RTN and RTN was returned.
    pub fell_back: bool,
}

/// Runs `method` and returns its rounding unless RTN's [`output_error`] is lower, in which
/// case RTN is returned (`fell_back`). `x` is [K, S] and `h` holds `X Xᵀ` (exact, or
/// block-diagonal: then AdaRound runs on each diagonal block and every error is the
/// block-diagonal one).
#[allow(clippy::too_many_arguments)]
pub fn reconstruct(
    method: &Method,
    w: &[f32],
    n: usize,
    k: usize,
    x: &[f32],
    s: usize,
    h: &Hessian,
    scales: &[f32],
    qmax: i32,
) -> Reconstructed {
    let q = match method {
        Method::Rtn => None,
        Method::Gptq { damp, block } => Some(gptq(w, n, k, h, scales, qmax, *damp, *block)),
        Method::AdaRound(opts) => Some(match h.dense() {
            Some(g) => adaround_with(w, n, k, x, s, Some(g), scales, qmax, opts),
            None => adaround_hessian(w, n, k, h, s, scales, qmax, opts),
        }),
    };
    never_worse_than_rtn(q, w, n, k, h, scales, qmax)
}

/// [`adaround_gram`] with `h`: on each diagonal block of `h` separately (for a
/// block-diagonal H the loss and the regulariser split over the blocks, and Adam is per
/// weight, so this is AdaRound on that approximation of H); with an exact `h`, exactly
/// [`adaround_gram`]. `s` is the column count the loss is averaged over.
#[allow(clippy::too_many_arguments)]
pub fn adaround_hessian(
    w: &[f32],
    n: usize,
    k: usize,
    h: &Hessian,
    s: usize,
    scales: &[f32],
    qmax: i32,
    opts: &AdaRoundOpts,
) -> Vec<i8> {
    assert_eq!(h.k(), k);
    if let Some(g) = h.dense() {
        return adaround_gram(w, n, k, g, s, scales, qmax, opts);
    }
    let mut q = vec![0i8; n * k];
    for (bi, (a, b)) in h.blocks().enumerate() {
        let m = b - a;
        let wb: Vec<f32> = w.chunks(k).flat_map(|r| r[a..b].iter().copied()).collect();
        let qb = adaround_gram(&wb, n, m, &h.block(bi), s, scales, qmax, opts);
        for (qr, qbr) in q.chunks_mut(k).zip(qb.chunks(m)) {
            qr[a..b].copy_from_slice(qbr);
        }
    }
    q
}

/// Returns `candidate` unless RTN's [`output_error`] is lower (or the candidate's is not
/// finite), in which case RTN is returned with `fell_back` set. `None` means RTN. With a
/// block-diagonal `h` both errors are the block-diagonal approximation, so the guarantee
/// holds for that measure.
pub fn never_worse_than_rtn(
    candidate: Option<Vec<i8>>,
    w: &[f32],
    n: usize,
    k: usize,
    h: &Hessian,
    scales: &[f32],
    qmax: i32,
) -> Reconstructed {
    let q_rtn = rtn(w, n, k, scales, qmax);
    let dq_rtn = dequantize(&q_rtn, n, k, scales);
    match candidate {
        Some(q) => {
            assert_eq!(q.len(), n * k);
            let dq = dequantize(&q, n, k, scales);
            let e = output_errors(w, &[&dq_rtn, &dq], h, None);
            let (rtn_error, error) = (e[0], e[1]);
            if error.is_finite() && error <= rtn_error {
                Reconstructed {
                    q,
                    error,
                    rtn_error,
                    fell_back: false,
                }
            } else {
                Reconstructed {
                    q: q_rtn,
                    error: rtn_error,
                    rtn_error,
                    fell_back: true,
                }
            }
        }
        None => {
            let rtn_error = output_error(w, &dq_rtn, h);
            Reconstructed {
                q: q_rtn,
                error: rtn_error,
                rtn_error,
                fell_back: false,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Threads and f32 kernels
// ---------------------------------------------------------------------------------------

fn threads_for(work: usize) -> usize {
    if work < (1 << 21) {
        return 1;
    }
    crate::numerics::threads::available().min(MAX_THREADS)
}

/// Calls `f(first_row, rows)` on contiguous row chunks of `out` (rows of `len`), on
/// up to `threads` threads.
fn par_rows<T, F>(out: &mut [T], len: usize, threads: usize, f: F)
where
    T: Send,
    F: Fn(usize, &mut [T]) + Sync,
{
    let len = len.max(1);
    let rows = out.len() / len;
    if threads <= 1 || rows < 2 {
        f(0, out);
        return;
    }
    let per = rows.div_ceil(threads.min(rows));
    thread::scope(|sc| {
        let f = &f;
        for (ci, chunk) in out.chunks_mut(per * len).enumerate() {
            sc.spawn(move || f(ci * per, chunk));
        }
    });
}

/// [`par_rows`] over two arrays with the same number of rows.
fn par_rows2<A, B, F>(a: &mut [A], la: usize, b: &mut [B], lb: usize, threads: usize, f: F)
where
    A: Send,
    B: Send,
    F: Fn(usize, &mut [A], &mut [B]) + Sync,
{
    let (la, lb) = (la.max(1), lb.max(1));
    let rows = a.len() / la;
    debug_assert_eq!(rows, b.len() / lb);
    if threads <= 1 || rows < 2 {
        f(0, a, b);
        return;
    }
    let per = rows.div_ceil(threads.min(rows));
    thread::scope(|sc| {
        let f = &f;
        for (ci, (ca, cb)) in a
            .chunks_mut(per * la)
            .zip(b.chunks_mut(per * lb))
            .enumerate()
        {
            sc.spawn(move || f(ci * per, ca, cb));
        }
    });
}

fn dot_f64(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 4];
    let ca = a.chunks_exact(4);
    let cb = b.chunks_exact(4);
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..4 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// `c[m×q] = a[m×p] · b[p×q]`, all row-major.
fn matmul_nn(a: &[f32], b: &[f32], c: &mut [f32], m: usize, p: usize, q: usize, threads: usize) {
    debug_assert_eq!(a.len(), m * p);
    debug_assert_eq!(b.len(), p * q);
    debug_assert_eq!(c.len(), m * q);
    par_rows(c, q, threads, |r0, cc| {
        let rows = cc.len() / q.max(1);
        kernels::nn(&a[r0 * p..(r0 + rows) * p], b, cc, rows, p, q);
    });
}

/// Matmul kernels, written so that LLVM vectorises them; compiled twice (baseline and
/// AVX2, chosen at run time).
mod kernels {
    pub fn nn(a: &[f32], b: &[f32], c: &mut [f32], m: usize, p: usize, q: usize) {
        nn_lower(a, b, c, m, p, q, None)
    }

    /// [`nn`]; with `lower = Some(off)` only the entries `c[i, j]` with `j ≤ i + off` are
    /// guaranteed (whole tiles are computed, so some above are too), each with the same
    /// arithmetic as [`nn`].
    pub fn nn_lower(
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        m: usize,
        p: usize,
        q: usize,
        lower: Option<usize>,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2 (checked just above).
                unsafe { nn_avx2(a, b, c, m, p, q, lower) };
                return;
            }
        }
        nn_generic(a, b, c, m, p, q, lower);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn nn_avx2(
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        m: usize,
        p: usize,
        q: usize,
        lower: Option<usize>,
    ) {
        nn_generic(a, b, c, m, p, q, lower)
    }

    /// Register tile of `nn`: 4 rows × `NR` columns of `c`.
    const NR: usize = 16;

    #[inline(always)]
    fn nn_generic(
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        m: usize,
        p: usize,
        q: usize,
        lower: Option<usize>,
    ) {
        let m4 = m / 4 * 4;
        // Columns of row i that are needed.
        let limit = |i: usize| lower.map_or(q, |off| (i + off + 1).min(q));
        let mut j0 = 0;
        // Full NR-wide column panels: 4×NR accumulators stay in registers over p.
        while j0 + NR <= q {
            // The first row group with a needed column in this panel.
            let mut i = lower.map_or(0, |off| j0.saturating_sub(off + 3) / 4 * 4);
            while i < m4 {
                let (a0, a1, a2, a3) = (
                    &a[i * p..(i + 1) * p],
                    &a[(i + 1) * p..(i + 2) * p],
                    &a[(i + 2) * p..(i + 3) * p],
                    &a[(i + 3) * p..(i + 4) * p],
                );
                let mut acc = [[0f32; NR]; 4];
                for (pp, (((&v0, &v1), &v2), &v3)) in a0.iter().zip(a1).zip(a2).zip(a3).enumerate()
                {
                    let br: &[f32; NR] = b[pp * q + j0..pp * q + j0 + NR].try_into().unwrap();
                    for l in 0..NR {
                        acc[0][l] += v0 * br[l];
                        acc[1][l] += v1 * br[l];
                        acc[2][l] += v2 * br[l];
                        acc[3][l] += v3 * br[l];
                    }
                }
                for (r, row) in acc.iter().enumerate() {
                    c[(i + r) * q + j0..(i + r) * q + j0 + NR].copy_from_slice(row);
                }
                i += 4;
            }
            j0 += NR;
        }
        // Leftovers: the last < NR columns of every row, and the last < 4 rows.
        let tail_rows = |c: &mut [f32], i: usize, jlo: usize, jhi: usize| {
            let cr = &mut c[i * q + jlo..i * q + jhi];
            cr.fill(0.0);
            for pp in 0..p {
                let av = a[i * p + pp];
                let br = &b[pp * q + jlo..pp * q + jhi];
                for (x, &bv) in cr.iter_mut().zip(br) {
                    *x += av * bv;
                }
            }
        };
        if j0 < q {
            for i in 0..m4 {
                if limit(i) > j0 {
                    tail_rows(c, i, j0, limit(i));
                }
            }
        }
        for i in m4..m {
            tail_rows(c, i, 0, limit(i));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Dense linear algebra (f64, row-major n×n)
// ---------------------------------------------------------------------------------------

/// Dense Cholesky factorisation, triangular solves and inverses on small (≲ 2000²)
/// row-major f64 matrices.
pub mod linalg {
    /// The factorisation met a non-positive pivot at this row.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct NotPositiveDefinite(pub usize);

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        super::dot_f64(a, b)
    }

    /// Lower Cholesky factor `L` (`A = L Lᵀ`) of the symmetric positive definite `a`;
    /// only the lower triangle of `a` is read. The result's upper triangle is zero.
    pub fn cholesky(a: &[f64], n: usize) -> Result<Vec<f64>, NotPositiveDefinite> {
        assert_eq!(a.len(), n * n);
        let mut l = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..=i {
                let (li, lj) = if i == j {
                    let r = &l[i * n..i * n + j];
                    (r, r)
                } else {
                    let (top, bottom) = l.split_at(i * n);
                    (&bottom[..j], &top[j * n..j * n + j])
                };
                let s = a[i * n + j] - dot(li, lj);
                if i == j {
                    if !(s > 0.0 && s.is_finite()) {
                        return Err(NotPositiveDefinite(i));
                    }
                    l[i * n + i] = s.sqrt();
                } else {
                    l[i * n + j] = s / l[j * n + j];
                }
            }
        }
        Ok(l)
    }

    /// Solves `L y = b` (forward substitution), `l` lower triangular.
    pub fn solve_lower(l: &[f64], n: usize, b: &[f64]) -> Vec<f64> {
        assert_eq!(l.len(), n * n);
        assert_eq!(b.len(), n);
        let mut y = vec![0f64; n];
        for i in 0..n {
            y[i] = (b[i] - dot(&l[i * n..i * n + i], &y[..i])) / l[i * n + i];
        }
        y
    }

    /// Solves `Lᵀ x = y` (back substitution), `l` lower triangular.
    pub fn solve_lower_transposed(l: &[f64], n: usize, y: &[f64]) -> Vec<f64> {
        assert_eq!(l.len(), n * n);
        assert_eq!(y.len(), n);
        let mut x = y.to_vec();
        for i in (0..n).rev() {
            x[i] /= l[i * n + i];
            let xi = x[i];
            for j in 0..i {
                x[j] -= l[i * n + j] * xi;
            }
        }
        x
    }

    /// Solves `A x = b` given `A`'s lower Cholesky factor.
    pub fn cholesky_solve(l: &[f64], n: usize, b: &[f64]) -> Vec<f64> {
        solve_lower_transposed(l, n, &solve_lower(l, n, b))
    }

    /// Inverse of a lower triangular matrix (lower triangular).
    pub fn invert_lower(l: &[f64], n: usize) -> Vec<f64> {
        assert_eq!(l.len(), n * n);
        // Row j of `xt` holds column j of X = L⁻¹ (non-zero from j on), so the sums are
        // contiguous dot products.
        let mut xt = vec![0f64; n * n];
        for j in 0..n {
            xt[j * n + j] = 1.0 / l[j * n + j];
            for i in j + 1..n {
                let s = dot(&l[i * n + j..i * n + i], &xt[j * n + j..j * n + i]);
                xt[j * n + i] = -s / l[i * n + i];
            }
        }
        let mut x = vec![0f64; n * n];
        for j in 0..n {
            for i in j..n {
                x[i * n + j] = xt[j * n + i];
            }
        }
        x
    }

    /// `A⁻¹ = L⁻ᵀ L⁻¹` from `A`'s lower Cholesky factor (full symmetric matrix).
    pub fn cholesky_inverse(l: &[f64], n: usize) -> Vec<f64> {
        let m = invert_lower(l, n);
        // mt = Mᵀ (upper): row i of mt = column i of M, non-zero from i on.
        let mut mt = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..=i {
                mt[j * n + i] = m[i * n + j];
            }
        }
        let mut inv = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..=i {
                // (Mᵀ M)_ij = Σ_{t ≥ i} M_ti M_tj (i ≥ j).
                let v = dot(&mt[i * n + i..(i + 1) * n], &mt[j * n + i..(j + 1) * n]);
                inv[i * n + j] = v;
                inv[j * n + i] = v;
            }
        }
        inv
    }

    /// Upper triangular `U` with `A⁻¹ = Uᵀ U` (the upper Cholesky factor of `A⁻¹`, as
    /// GPTQ uses), without forming `A⁻¹`: with `J` the reversal permutation and
    /// `J A J = L' L'ᵀ`, `A = R Rᵀ` with `R = J L' J` upper, so `U = R⁻¹ = J L'⁻¹ J`.
    pub fn upper_cholesky_of_inverse(a: &[f64], n: usize) -> Result<Vec<f64>, NotPositiveDefinite> {
        assert_eq!(a.len(), n * n);
        let mut rev = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                rev[i * n + j] = a[(n - 1 - i) * n + (n - 1 - j)];
            }
        }
        let lp =
            cholesky(&rev, n).map_err(|NotPositiveDefinite(i)| NotPositiveDefinite(n - 1 - i))?;
        let linv = invert_lower(&lp, n);
        let mut u = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                u[i * n + j] = linv[(n - 1 - i) * n + (n - 1 - j)];
            }
        }
        Ok(u)
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// A random layer: W [n, k] with a few large weights, inputs X [k, s] correlated
    /// through a low-rank mix plus noise and per-feature offsets.
    fn layer(n: usize, k: usize, s: usize, rank: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut rng = SplitMix64::new(seed);
        let w: Vec<f32> = (0..n * k)
            .map(|_| (rng.normal() * 0.1 / (k as f64).sqrt()) as f32)
            .collect();
        let mix: Vec<f64> = (0..k * rank).map(|_| rng.normal()).collect();
        let off: Vec<f64> = (0..k).map(|_| rng.normal() * 0.5).collect();
        let mut x = vec![0f32; k * s];
        for c in 0..s {
            let z: Vec<f64> = (0..rank).map(|_| rng.normal()).collect();
            for i in 0..k {
                let v: f64 =
                    (0..rank).map(|r| mix[i * rank + r] * z[r]).sum::<f64>() / (rank as f64).sqrt();
                x[i * s + c] = (v + 0.3 * rng.normal() + off[i]) as f32;
            }
        }
        (w, x)
    }

    fn minmax_scales(w: &[f32], n: usize, k: usize, qmax: i32) -> Vec<f32> {
        (0..n)
            .map(|r| {
                let m = w[r * k..(r + 1) * k]
                    .iter()
                    .fold(0f32, |a, v| a.max(v.abs()));
                if m > 0.0 {
                    m / qmax as f32
                } else {
                    1.0
                }
            })
            .collect()
    }

    fn err_of(q: &[i8], w: &[f32], n: usize, k: usize, scales: &[f32], h: &Hessian) -> f64 {
        output_error(w, &dequantize(q, n, k, scales), h)
    }

    /// f64 reference of the AdaRound loss (reconstruction over all S columns + regulariser).
    #[allow(clippy::too_many_arguments)]
    fn loss_f64(
        v: &[f64],
        base: &[f32],
        w: &[f32],
        x: &[f32],
        n: usize,
        k: usize,
        s: usize,
        scales: &[f32],
        qmax: i32,
        reg: Reg,
    ) -> f64 {
        let mut rec = 0.0;
        let mut regl = 0.0;
        let mut dw = vec![0f64; n * k];
        for r in 0..n {
            for i in 0..k {
                let sig = 1.0 / (1.0 + (-v[r * k + i]).exp());
                let h = (sig * 1.2 - 0.1).clamp(0.0, 1.0);
                let xq = (base[r * k + i] as f64 + h).clamp(-qmax as f64, qmax as f64);
                dw[r * k + i] = scales[r] as f64 * xq - w[r * k + i] as f64;
                let u = (2.0 * h - 1.0).abs();
                regl += reg.lambda as f64 * (1.0 - u.powf(reg.beta as f64));
            }
        }
        for r in 0..n {
            for c in 0..s {
                let y: f64 = (0..k).map(|i| dw[r * k + i] * x[i * s + c] as f64).sum();
                rec += y * y;
            }
        }
        rec / s as f64 + regl
    }

    #[test]
    fn adaround_gradient_matches_finite_differences() {
        let (n, k, s, qmax) = (6, 20, 40, 7);
        let (mut w, x) = layer(n, k, s, 4, 11);
        let scales = minmax_scales(&w, n, k, qmax);
        // One weight far beyond the range: its clamp blocks the reconstruction gradient.
        w[3] = scales[0] * 9.4;
        let mut ada = AdaState::new(&w, n, k, &scales, qmax);
        // Put every h strictly inside (0, 1), away from the kinks.
        let mut rng = SplitMix64::new(3);
        for e in ada.el.iter_mut() {
            let h = 0.1 + 0.8 * rng.uniform() as f32;
            let p = (h + 0.1) / 1.2;
            e.v = (p / (1.0 - p)).ln();
        }
        let reg = Reg {
            on: true,
            lambda: 0.01,
            beta: 3.0,
        };
        let base: Vec<f32> = ada.el.iter().map(|e| e.base).collect();
        for grad in [AdaRoundGrad::Gram, AdaRoundGrad::MiniBatch] {
            let opts = AdaRoundOpts {
                grad,
                batch: s, // the whole data: exact
                ..AdaRoundOpts::default()
            };
            let obj = Objective::new(&x, k, s, None, &opts);
            ada.forward();
            let mut rng = SplitMix64::new(0);
            ada.rec_grad(&obj, &mut rng);
            let mut g = vec![0f32; n * k];
            ada.grad_v(reg, &mut g);
            let v0: Vec<f64> = ada.el.iter().map(|e| e.v as f64).collect();
            let mut fd = vec![0f64; n * k];
            let eps = 1e-4;
            for idx in 0..n * k {
                let mut vp = v0.clone();
                vp[idx] += eps;
                let lp = loss_f64(&vp, &base, &w, &x, n, k, s, &scales, qmax, reg);
                vp[idx] -= 2.0 * eps;
                let lm = loss_f64(&vp, &base, &w, &x, n, k, s, &scales, qmax, reg);
                fd[idx] = (lp - lm) / (2.0 * eps);
            }
            let num: f64 = g
                .iter()
                .zip(&fd)
                .map(|(&a, &b)| (a as f64 - b).powi(2))
                .sum();
            let den: f64 = fd.iter().map(|b| b * b).sum();
            let rel = (num / den).sqrt();
            let maxabs = fd.iter().fold(0f64, |m, v| m.max(v.abs()));
            let worst = g
                .iter()
                .zip(&fd)
                .filter(|(_, b)| b.abs() > 1e-2 * maxabs)
                .map(|(&a, &b)| ((a as f64 - b) / b).abs())
                .fold(0f64, f64::max);
            eprintln!("{grad:?}: gradient rel. error {rel:.2e} (norm), worst element {worst:.2e}");
            assert!(rel < 1e-3, "{grad:?}: relative error {rel}");
            assert!(worst < 1e-2, "{grad:?}: worst element {worst}");
            assert_eq!(
                g[3],
                (ada.el[3].dh * reg.value_grad(ada.el[3].h).1),
                "clamped weight"
            );
        }
    }

    #[test]
    fn gptq_and_adaround_beat_rtn_at_4_bits() {
        let (n, k, s, qmax) = (16, 64, 512, 7);
        let (w, x) = layer(n, k, s, 6, 5);
        let scales = minmax_scales(&w, n, k, qmax);
        let h = Hessian::from_gram(gram(&x, k, s), k, s);
        let e_rtn = err_of(&rtn(&w, n, k, &scales, qmax), &w, n, k, &scales, &h);
        let e_gptq = err_of(
            &gptq(&w, n, k, &h, &scales, qmax, 0.01, 16),
            &w,
            n,
            k,
            &scales,
            &h,
        );
        let opts = AdaRoundOpts {
            iters: 3000,
            lr: 1e-2,
            ..AdaRoundOpts::default()
        };
        let e_ada = err_of(
            &adaround_with(&w, n, k, &x, s, None, &scales, qmax, &opts),
            &w,
            n,
            k,
            &scales,
            &h,
        );
        eprintln!(
            "4-bit output error: RTN {e_rtn:.4e}, GPTQ {e_gptq:.4e} ({:.3}× RTN), AdaRound {e_ada:.4e} ({:.3}× RTN)",
            e_gptq / e_rtn,
            e_ada / e_rtn
        );
        assert!(e_gptq < 0.7 * e_rtn, "GPTQ {e_gptq} vs RTN {e_rtn}");
        assert!(e_ada < 0.7 * e_rtn, "AdaRound {e_ada} vs RTN {e_rtn}");
    }

    #[test]
    fn reconstruct_is_never_worse_than_rtn() {
        let (n, k, s, qmax) = (8, 32, 128, 7);
        let (w, x) = layer(n, k, s, 3, 9);
        let scales = minmax_scales(&w, n, k, qmax);
        let h = Hessian::from_gram(gram(&x, k, s), k, s);
        let rtn_err = err_of(&rtn(&w, n, k, &scales, qmax), &w, n, k, &scales, &h);
        let methods = [
            Method::Rtn,
            Method::gptq_default(),
            Method::Gptq {
                damp: 0.0,
                block: 1,
            },
            Method::AdaRound(AdaRoundOpts {
                iters: 200,
                lr: 1e-2,
                ..AdaRoundOpts::default()
            }),
        ];
        for m in &methods {
            let r = reconstruct(m, &w, n, k, &x, s, &h, &scales, qmax);
            assert!(r.error <= rtn_err, "{m:?}: {} > {rtn_err}", r.error);
            assert_eq!(r.error, err_of(&r.q, &w, n, k, &scales, &h));
        }
        // A deliberately bad candidate (RTN pushed one step up everywhere) falls back.
        let q_rtn = rtn(&w, n, k, &scales, qmax);
        let bad: Vec<i8> = q_rtn.iter().map(|&v| (v + 1).min(qmax as i8)).collect();
        let r = never_worse_than_rtn(Some(bad), &w, n, k, &h, &scales, qmax);
        assert!(r.fell_back);
        assert_eq!(r.q, q_rtn);
        assert_eq!(r.error, rtn_err);
        // 2 bits, where rounding choices matter most, across seeds.
        for seed in 0..4 {
            let (w, x) = layer(n, k, s, 3, 100 + seed);
            let scales = minmax_scales(&w, n, k, 1);
            let h = Hessian::from_gram(gram(&x, k, s), k, s);
            let rtn_err = err_of(&rtn(&w, n, k, &scales, 1), &w, n, k, &scales, &h);
            for m in &methods {
                let r = reconstruct(m, &w, n, k, &x, s, &h, &scales, 1);
                assert!(r.error <= rtn_err);
            }
        }
    }

    #[test]
    fn gptq_with_identity_hessian_is_rtn() {
        for (n, k, qmax, block) in [(7, 33, 7, 8), (16, 130, 127, 128), (3, 5, 1, 2)] {
            let mut rng = SplitMix64::new(n as u64 * 31 + k as u64);
            let w: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
            let scales = minmax_scales(&w, n, k, qmax);
            let mut h = vec![0f64; k * k];
            for i in 0..k {
                h[i * k + i] = 1.0;
            }
            let h = Hessian::from_gram(h, k, 1);
            assert_eq!(
                gptq(&w, n, k, &h, &scales, qmax, 0.01, block),
                rtn(&w, n, k, &scales, qmax)
            );
        }
    }

    /// GPTQ as it was before blocks: the push form through the upper Cholesky factor of
    /// H⁻¹ (`linalg`, f64), one K×K H, one thread. The reference of the tests below.
    #[allow(clippy::too_many_arguments)]
    fn gptq_reference(
        w: &[f32],
        n: usize,
        k: usize,
        x_gram: &[f64],
        scales: &[f32],
        qmax: i32,
        damp: f64,
        block: usize,
    ) -> Vec<i8> {
        let mut wk: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        let mut h = x_gram.to_vec();
        let mut diag_sum = 0.0;
        for i in 0..k {
            if h[i * k + i] == 0.0 {
                h[i * k + i] = 1.0;
                for r in 0..n {
                    wk[r * k + i] = 0.0;
                }
            }
            diag_sum += h[i * k + i];
        }
        let mean_diag = diag_sum / k as f64;
        let mut u = None;
        let mut lambda = damp.max(0.0) * mean_diag;
        for _ in 0..5 {
            let mut hd = h.clone();
            for i in 0..k {
                hd[i * k + i] += lambda;
            }
            if let Ok(f) = linalg::upper_cholesky_of_inverse(&hd, k) {
                u = Some(f);
                break;
            }
            lambda = if lambda > 0.0 {
                lambda * 10.0
            } else {
                1e-6 * mean_diag.max(f64::MIN_POSITIVE)
            };
        }
        let Some(u) = u else {
            return rtn(w, n, k, scales, qmax);
        };
        let mut q = vec![0i8; n * k];
        for r in 0..n {
            let s = scales[r];
            let wrow = &mut wk[r * k..(r + 1) * k];
            let mut i1 = 0;
            while i1 < k {
                let i2 = (i1 + block).min(k);
                let mut err = vec![0f64; i2 - i1];
                for i in i1..i2 {
                    let qi = round_value(wrow[i] as f32, s, qmax);
                    q[r * k + i] = qi;
                    let e = (wrow[i] - qi as f64 * s as f64) / u[i * k + i];
                    err[i - i1] = e;
                    for j in i + 1..i2 {
                        wrow[j] -= e * u[i * k + j];
                    }
                }
                for (b, &e) in err.iter().enumerate() {
                    for j in i2..k {
                        wrow[j] -= e * u[(i1 + b) * k + j];
                    }
                }
                i1 = i2;
            }
        }
        q
    }

    /// The layers of the GPTQ tests above and a few larger ones: (n, k, s, rank, seed,
    /// qmax, lazy block).
    const GPTQ_CASES: [(usize, usize, usize, usize, u64, i32, usize); 9] = [
        (16, 64, 512, 6, 5, 7, 16),
        (8, 32, 128, 3, 9, 7, 128),
        (8, 32, 128, 3, 9, 7, 1),
        (8, 32, 128, 3, 100, 1, 128),
        (8, 32, 128, 3, 103, 1, 128),
        (4, 10, 50, 3, 2, 7, 4),
        (64, 300, 1000, 8, 21, 7, 128),
        (32, 576, 2000, 12, 22, 127, 128),
        (24, 1152, 1500, 16, 23, 7, 128),
    ];

    #[test]
    fn gptq_with_one_block_equals_the_reference_gptq() {
        let (mut same, mut total) = (0usize, 0usize);
        for (n, k, s, rank, seed, qmax, block) in GPTQ_CASES {
            let (w, x) = layer(n, k, s, rank, seed);
            let scales = minmax_scales(&w, n, k, qmax);
            let g = gram(&x, k, s);
            let reference = gptq_reference(&w, n, k, &g, &scales, qmax, 0.01, block);
            let h = Hessian::from_gram(g, k, s);
            let q = gptq(&w, n, k, &h, &scales, qmax, 0.01, block);
            same += q.iter().zip(&reference).filter(|(a, b)| a == b).count();
            total += q.len();
            let (e, e_ref) = (
                err_of(&q, &w, n, k, &scales, &h),
                err_of(&reference, &w, n, k, &scales, &h),
            );
            assert!(
                (e - e_ref).abs() <= 1e-9 * e_ref,
                "{n}×{k}: error {e} vs reference {e_ref}"
            );
        }
        eprintln!("one-block GPTQ vs the reference: {same} of {total} integers equal");
        assert_eq!(same, total);
    }

    #[test]
    fn blocked_gptq_beats_rtn_in_its_own_error() {
        for (n, k, s, rank, seed, qmax, block) in GPTQ_CASES {
            let (w, x) = layer(n, k, s, rank, seed);
            let scales = minmax_scales(&w, n, k, qmax);
            for b in [8, 33, 64, 256] {
                let mut h = Hessian::new(k, &HessianLayout::blocked(b, 1));
                h.accumulate(&x, s);
                let q = gptq(&w, n, k, &h, &scales, qmax, 0.01, block);
                let (e, e_rtn) = (
                    err_of(&q, &w, n, k, &scales, &h),
                    err_of(&rtn(&w, n, k, &scales, qmax), &w, n, k, &scales, &h),
                );
                assert!(e <= e_rtn, "{n}×{k}, blocks of {b}: {e} > RTN {e_rtn}");
                let r = never_worse_than_rtn(Some(q), &w, n, k, &h, &scales, qmax);
                assert!(!r.fell_back && r.error == e && r.rtn_error == e_rtn);
            }
        }
    }

    #[test]
    fn blocked_f32_hessian_gives_the_gptq_of_the_block_diagonal_matrix() {
        let (n, k, s, qmax) = (48, 576, 2000, 7);
        let (w, x) = layer(n, k, s, 10, 31);
        let scales = minmax_scales(&w, n, k, qmax);
        let layout = HessianLayout::blocked(128, 9);
        let mut h = Hessian::new(k, &layout);
        h.accumulate(&x, s);
        // The same approximation from the f64 Gram, off-block entries zeroed.
        let mut g = gram(&x, k, s);
        let bounds = layout.bounds(k);
        let block_of = |i: usize| bounds.iter().rposition(|&b| b <= i).unwrap();
        for i in 0..k {
            for j in 0..k {
                if block_of(i) != block_of(j) {
                    g[i * k + j] = 0.0;
                }
            }
        }
        let h64 = Hessian::from_gram(g, k, s);
        let q = gptq(&w, n, k, &h, &scales, qmax, 0.01, 128);
        let q64 = gptq(&w, n, k, &h64, &scales, qmax, 0.01, 128);
        let same = q.iter().zip(&q64).filter(|(a, b)| a == b).count();
        let (e, e64) = (
            err_of(&q, &w, n, k, &scales, &h64),
            err_of(&q64, &w, n, k, &scales, &h64),
        );
        eprintln!(
            "f32 blocks vs f64 block-diagonal H: {same} of {} integers equal, error {e:.6e} vs {e64:.6e}",
            q.len()
        );
        assert!(same as f64 >= 0.999 * q.len() as f64);
        assert!((e - e64).abs() <= 1e-3 * e64);
        // Both errors of the f32 H agree with the f64 one.
        let e32 = err_of(&q, &w, n, k, &scales, &h);
        assert!((e32 - e).abs() <= 1e-5 * e, "{e32} vs {e}");
    }

    #[test]
    fn gptq_and_output_error_do_not_depend_on_threads() {
        let (n, k, s, qmax) = (37, 400, 900, 7);
        let (w, x) = layer(n, k, s, 8, 41);
        let scales = minmax_scales(&w, n, k, qmax);
        for layout in [HessianLayout::exact(), HessianLayout::blocked(150, 1)] {
            let mut h = Hessian::new(k, &layout);
            h.accumulate(&x, s);
            let one = gptq_with(&w, n, k, &h, &scales, qmax, 0.01, 128, Some(1));
            let dq = dequantize(&one, n, k, &scales);
            let e1 = output_errors(&w, &[&dq], &h, Some(1));
            for t in [2, 3] {
                assert_eq!(
                    gptq_with(&w, n, k, &h, &scales, qmax, 0.01, 128, Some(t)),
                    one
                );
                assert_eq!(output_errors(&w, &[&dq], &h, Some(t)), e1);
            }
        }
    }

    #[test]
    fn output_error_equals_the_naive_quadratic_form() {
        let (n, k, s) = (5, 300, 400);
        let (w, x) = layer(n, k, s, 4, 43);
        let scales = minmax_scales(&w, n, k, 7);
        let dq = dequantize(&rtn(&w, n, k, &scales, 7), n, k, &scales);
        let g = gram(&x, k, s);
        let naive: f64 = (0..n)
            .map(|r| {
                let d: Vec<f64> = (0..k)
                    .map(|i| (w[r * k + i] - dq[r * k + i]) as f64)
                    .collect();
                (0..k)
                    .map(|i| d[i] * (0..k).map(|j| g[i * k + j] * d[j]).sum::<f64>())
                    .sum::<f64>()
            })
            .sum();
        let e = output_error(&w, &dq, &Hessian::from_gram(g, k, s));
        assert!((e - naive).abs() <= 1e-10 * naive, "{e} vs {naive}");
    }

    /// Peak resident memory of this process (VmHWM, bytes).
    fn peak_rss() -> usize {
        let st = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        st.lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0)
            * 1024
    }

    /// GPTQ at Stable Diffusion's largest K: N×K = 1280×11,520 and 1280×23,040, inputs
    /// streamed as 8 batches of 256 columns (as `layer_inputs` gives them) into a
    /// block-diagonal [`Hessian`] with blocks of ≤ 2048 and ≤ 4096. Wall time (both cores
    /// when free) and CPU time; each result is also scored by the exact output error
    /// `||ΔW X||²` on the columns themselves. `cargo test --release -p tfmqc-passes --lib
    /// bench_gptq_sd_scale -- --ignored --nocapture` (peak memory ~1.3 GB).
    #[test]
    #[ignore]
    fn bench_gptq_sd_scale() {
        let cpu = crate::numerics::quant::tests::process_cpu;
        for (n, k) in [(1280usize, 11_520usize), (1280, 23_040)] {
            let mut rng = SplitMix64::new(k as u64);
            let w: Vec<f32> = (0..n * k)
                .map(|_| (rng.normal() / (k as f64).sqrt()) as f32)
                .collect();
            // Conv-like inputs: channels mixed from 16 latent signals, noise, offsets;
            // kept as Xᵀ [S, K] per batch for the exact error.
            let (rank, s, batches) = (16, 256, 8);
            let mix: Vec<f32> = (0..k * rank).map(|_| rng.normal() as f32).collect();
            let off: Vec<f32> = (0..k).map(|_| (rng.normal() * 0.5) as f32).collect();
            let xs: Vec<Vec<f32>> = (0..batches)
                .map(|_| {
                    let z: Vec<f32> = (0..rank * s).map(|_| rng.normal() as f32).collect();
                    let mut x = vec![0f32; k * s];
                    for (i, row) in x.chunks_mut(s).enumerate() {
                        for (c, v) in row.iter_mut().enumerate() {
                            let mut a = 0f32;
                            for r in 0..rank {
                                a += mix[i * rank + r] * z[r * s + c];
                            }
                            *v = (a * 0.25 + off[i]).max(0.0) + 0.3 * rng.normal() as f32;
                        }
                    }
                    x
                })
                .collect();
            let exact_error = |q: &[i8], scales: &[f32]| -> f64 {
                let dw: Vec<f32> = w
                    .iter()
                    .zip(dequantize(q, n, k, scales))
                    .map(|(a, b)| a - b)
                    .collect();
                let mut total = 0f64;
                for x in &xs {
                    let mut xt = vec![0f32; s * k];
                    for (i, row) in x.chunks(s).enumerate() {
                        for (c, &v) in row.iter().enumerate() {
                            xt[c * k + i] = v;
                        }
                    }
                    let mut y = vec![0f32; n * s];
                    dense::par_nt_update(
                        &mut y,
                        s,
                        &dw,
                        k,
                        &xt,
                        k,
                        (n, s, k),
                        dense::Acc::Add,
                        None,
                        2,
                    );
                    total += y.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
                }
                total
            };
            let scales = minmax_scales(&w, n, k, 7);
            let e_rtn = exact_error(&rtn(&w, n, k, &scales, 7), &scales);
            for block in [2048, 4096] {
                let layout = HessianLayout::blocked(block, 9);
                let mut h = Hessian::new(k, &layout);
                let (t, c) = (std::time::Instant::now(), cpu());
                for x in &xs {
                    h.accumulate(x, s);
                }
                let (t_acc, c_acc) = (t.elapsed().as_secs_f64(), cpu() - c);
                let (t, c) = (std::time::Instant::now(), cpu());
                let q = gptq(&w, n, k, &h, &scales, 7, 0.01, 128);
                let (t_gptq, c_gptq) = (t.elapsed().as_secs_f64(), cpu() - c);
                let (t, c) = (std::time::Instant::now(), cpu());
                let r = never_worse_than_rtn(Some(q), &w, n, k, &h, &scales, 7);
                let (t_err, c_err) = (t.elapsed().as_secs_f64(), cpu() - c);
                let bounds = layout.bounds(k);
                eprintln!(
                    "N×K = {n}×{k}, B = {block}: {} blocks of ≤ {}, Hessian {:.0} MB (f32), GPTQ work buffers {:.0} MB",
                    bounds.len() - 1,
                    bounds.windows(2).map(|b| b[1] - b[0]).max().unwrap(),
                    h.bytes() as f64 / 1e6,
                    layout.work_bytes(n, k) as f64 / 1e6
                );
                eprintln!(
                    "  accumulate {} columns: {t_acc:.1} s wall, {c_acc:.1} s CPU; gptq: {t_gptq:.1} s wall, {c_gptq:.1} s CPU; output errors (RTN + GPTQ): {t_err:.1} s wall, {c_err:.1} s CPU",
                    batches * s
                );
                eprintln!(
                    "  4-bit output error relative to RTN: {:.3} block-diagonal, {:.3} exact; peak RSS so far {:.2} GB",
                    r.error / r.rtn_error,
                    exact_error(&r.q, &scales) / e_rtn,
                    peak_rss() as f64 / 1e9
                );
            }
        }
    }

    #[test]
    fn gptq_dead_inputs_get_zero() {
        let (n, k, s, qmax) = (4, 10, 50, 7);
        let (w, mut x) = layer(n, k, s, 3, 2);
        for c in 0..s {
            x[2 * s + c] = 0.0;
        }
        let scales = minmax_scales(&w, n, k, qmax);
        let h = Hessian::from_gram(gram(&x, k, s), k, s);
        let q = gptq(&w, n, k, &h, &scales, qmax, 0.01, 4);
        for r in 0..n {
            assert_eq!(q[r * k + 2], 0);
        }
    }

    /// `gram` as it was: the full square by `matmul_nn`, added, then mirrored.
    fn gram_reference(x: &[f32], k: usize, s: usize) -> Vec<f64> {
        const CHUNK: usize = 256;
        let mut h = vec![0f64; k * k];
        let mut part = vec![0f32; k * k];
        let mut c0 = 0;
        while c0 < s {
            let c1 = (c0 + CHUNK).min(s);
            let w = c1 - c0;
            let (mut xc, mut xct) = (vec![0f32; k * w], vec![0f32; k * w]);
            for (i, (dst, src)) in xc.chunks_mut(w).zip(x.chunks(s)).enumerate() {
                dst.copy_from_slice(&src[c0..c1]);
                for (j, &v) in dst.iter().enumerate() {
                    xct[j * k + i] = v;
                }
            }
            matmul_nn(&xc, &xct, &mut part, k, w, k, 1);
            for (hv, &pv) in h.iter_mut().zip(part.iter()) {
                *hv += pv as f64;
            }
            c0 = c1;
        }
        for i in 0..k {
            for j in 0..i {
                h[j * k + i] = h[i * k + j];
            }
        }
        h
    }

    #[test]
    fn gram_is_the_reference_gram_bit_for_bit() {
        for (k, s) in [
            (1, 1),
            (13, 300),
            (37, 17),
            (200, 300),
            (301, 600),
            (64, 513),
        ] {
            let (_, x) = layer(1, k, s, 3, k as u64);
            assert_eq!(gram(&x, k, s), gram_reference(&x, k, s), "{k}×{s}");
        }
    }

    #[test]
    fn gram_matches_naive() {
        let (k, s) = (13, 300);
        let (_, x) = layer(1, k, s, 2, 4);
        let h = gram(&x, k, s);
        for i in 0..k {
            for j in 0..k {
                let r: f64 = (0..s)
                    .map(|c| x[i * s + c] as f64 * x[j * s + c] as f64)
                    .sum();
                assert!(
                    (h[i * k + j] - r).abs() <= 1e-5 * r.abs().max(1.0),
                    "{i} {j}"
                );
            }
        }
    }

    #[test]
    fn matmul_kernels_match_naive() {
        let mut rng = SplitMix64::new(8);
        for (m, p, q) in [
            (1, 1, 1),
            (5, 7, 9),
            (9, 17, 600),
            (4, 8, 8),
            (8, 3, 32),
            (13, 40, 47),
        ] {
            let a: Vec<f32> = (0..m * p).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..p * q).map(|_| rng.normal() as f32).collect();
            let mut c1 = vec![0f32; m * q];
            matmul_nn(&a, &b, &mut c1, m, p, q, 2);
            for i in 0..m {
                for j in 0..q {
                    let r: f32 = (0..p).map(|t| a[i * p + t] * b[t * q + j]).sum();
                    assert!((c1[i * q + j] - r).abs() < 1e-4 * (1.0 + r.abs()));
                }
            }
        }
    }

    #[test]
    fn cholesky_and_solves_on_known_matrix() {
        use linalg::*;
        // A = L Lᵀ with L = [[2,0,0],[6,1,0],[-8,5,3]] (the classic example).
        let a = [4.0, 12.0, -16.0, 12.0, 37.0, -43.0, -16.0, -43.0, 98.0];
        let l = cholesky(&a, 3).unwrap();
        let l_ref = [2.0, 0.0, 0.0, 6.0, 1.0, 0.0, -8.0, 5.0, 3.0];
        for (x, y) in l.iter().zip(l_ref) {
            assert!((x - y).abs() < 1e-12);
        }
        // A x = b with x = (1, −2, 3).
        let xs = [1.0, -2.0, 3.0];
        let b: Vec<f64> = (0..3)
            .map(|i| (0..3).map(|j| a[i * 3 + j] * xs[j]).sum())
            .collect();
        let x = cholesky_solve(&l, 3, &b);
        for (u, v) in x.iter().zip(xs) {
            assert!((u - v).abs() < 1e-10);
        }
        // L y = b and Lᵀ x = y separately.
        let y = solve_lower(&l, 3, &b);
        let ly: Vec<f64> = (0..3)
            .map(|i| (0..3).map(|j| l[i * 3 + j] * y[j]).sum())
            .collect();
        for (u, v) in ly.iter().zip(&b) {
            assert!((u - v).abs() < 1e-10);
        }
        // A⁻¹ (known exactly: inverse of this matrix).
        let inv = cholesky_inverse(&l, 3);
        let inv_ref = [
            1777.0 / 36.0,
            -122.0 / 9.0,
            19.0 / 9.0,
            -122.0 / 9.0,
            34.0 / 9.0,
            -5.0 / 9.0,
            19.0 / 9.0,
            -5.0 / 9.0,
            1.0 / 9.0,
        ];
        for (u, v) in inv.iter().zip(inv_ref) {
            assert!((u - v).abs() < 1e-9, "{u} vs {v}");
        }
        // Upper Cholesky of A⁻¹: Uᵀ U = A⁻¹, U upper with positive diagonal, and it
        // equals cholesky(A⁻¹)ᵀ.
        let u = upper_cholesky_of_inverse(&a, 3).unwrap();
        let l2 = cholesky(&inv_ref, 3).unwrap();
        for i in 0..3 {
            for j in 0..3 {
                assert!((u[i * 3 + j] - l2[j * 3 + i]).abs() < 1e-9);
                let utu: f64 = (0..3).map(|t| u[t * 3 + i] * u[t * 3 + j]).sum();
                assert!((utu - inv_ref[i * 3 + j]).abs() < 1e-9);
            }
        }
        // Not positive definite.
        assert!(cholesky(&[1.0, 2.0, 2.0, 1.0], 2).is_err());
        // Larger random SPD: inverse times A is the identity; invert_lower is exact.
        let n = 40;
        let mut rng = SplitMix64::new(1);
        let g: Vec<f64> = (0..n * n).map(|_| rng.normal()).collect();
        let mut spd = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                spd[i * n + j] = (0..n).map(|t| g[i * n + t] * g[j * n + t]).sum::<f64>()
                    + if i == j { 1.0 } else { 0.0 };
            }
        }
        let l = cholesky(&spd, n).unwrap();
        let inv = cholesky_inverse(&l, n);
        let u = upper_cholesky_of_inverse(&spd, n).unwrap();
        for i in 0..n {
            for j in 0..n {
                let p: f64 = (0..n).map(|t| inv[i * n + t] * spd[t * n + j]).sum();
                assert!((p - if i == j { 1.0 } else { 0.0 }).abs() < 1e-8);
                let utu: f64 = (0..n).map(|t| u[t * n + i] * u[t * n + j]).sum();
                assert!((utu - inv[i * n + j]).abs() < 1e-8 * (1.0 + inv[i * n + j].abs()));
                if j < i {
                    assert_eq!(u[i * n + j], 0.0);
                }
            }
        }
    }

    /// CPU time of this thread (s), from /proc (10 ms resolution).
    fn thread_cpu() -> f64 {
        let st = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
        let f: Vec<&str> = st
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (t(11) + t(12)) / 100.0
    }

    #[test]
    #[ignore]
    fn bench_kernels() {
        let mut rng = SplitMix64::new(1);
        for (m, p, q) in [(64, 576, 576), (256, 1152, 1152), (256, 256, 1152)] {
            let a: Vec<f32> = (0..m * p).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..p * q).map(|_| rng.normal() as f32).collect();
            let mut c = vec![0f32; m * q];
            let reps = (4e9 / (m * p * q) as f64).ceil() as usize;
            let t = thread_cpu();
            for _ in 0..reps {
                kernels::nn(&a, &b, &mut c, m, p, q);
            }
            let dt = thread_cpu() - t;
            eprintln!(
                "nn {m}x{p}x{q}: {:.2} GFMA/s (cpu)",
                (m * p * q * reps) as f64 / dt / 1e9
            );
        }
    }

    #[test]
    #[ignore]
    fn bench_adaround_step() {
        let (n, k, s) = (256, 1152, 2048);
        let (w, x) = layer(n, k, s, 8, 1);
        let scales = minmax_scales(&w, n, k, 7);
        for grad in [AdaRoundGrad::Gram, AdaRoundGrad::MiniBatch] {
            let opts = AdaRoundOpts {
                grad,
                ..AdaRoundOpts::default()
            };
            let obj = Objective::new(&x, k, s, None, &opts);
            let mut ada = AdaState::new(&w, n, k, &scales, 7);
            ada.threads = 1;
            let mut rng = SplitMix64::new(0);
            let reg = Reg {
                on: true,
                lambda: 0.01,
                beta: 7.3,
            };
            let reps = 20;
            let (mut tf, mut tg, mut ta) = (0.0, 0.0, 0.0);
            for it in 0..reps {
                let t0 = thread_cpu();
                ada.forward();
                let t1 = thread_cpu();
                ada.rec_grad(&obj, &mut rng);
                let t2 = thread_cpu();
                ada.adam_step(reg, 1e-3, it + 1);
                let t3 = thread_cpu();
                tf += t1 - t0;
                tg += t2 - t1;
                ta += t3 - t2;
            }
            let r = 1e3 / reps as f64;
            eprintln!(
                "{grad:?} 1 thread: forward {:.1} ms, rec grad {:.1} ms, adam {:.1} ms",
                tf * r,
                tg * r,
                ta * r
            );
        }
    }
}
