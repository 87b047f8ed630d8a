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

mod adaround;
pub(crate) mod dense;
mod gptq;
mod hessian;
pub mod linalg;
#[cfg(test)]
mod tests;

pub use adaround::*;
pub use gptq::*;
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
// Aligned reconstruction (PAR with the quantized model's inputs)
// ---------------------------------------------------------------------------------------

/// Adds `X X̃ᵀ` (K×K, f64, row-major: `c[i, j] += Σ_s x[i, s] · x̃[j, s]`) of two
/// [K, S] row-major inputs at the same positions to `c`: f32 products over chunks of
/// [`GRAM_CHUNK`] columns, summed in f64, as [`gram`] does.
pub fn add_cross_gram(x: &[f32], xq: &[f32], k: usize, s: usize, c: &mut [f64]) {
    assert_eq!(x.len(), k * s);
    assert_eq!(xq.len(), k * s);
    assert_eq!(c.len(), k * k);
    let mut c0 = 0;
    while c0 < s {
        let c1 = (c0 + GRAM_CHUNK).min(s);
        let w = c1 - c0;
        let mut a = vec![0f32; k * w];
        let mut bt = vec![0f32; w * k];
        for i in 0..k {
            a[i * w..(i + 1) * w].copy_from_slice(&x[i * s + c0..i * s + c1]);
            for (j, &v) in xq[i * s + c0..i * s + c1].iter().enumerate() {
                bt[j * k + i] = v;
            }
        }
        let mut part = vec![0f32; k * k];
        matmul_nn(&a, &bt, &mut part, k, w, k, threads_for(k * k * w));
        for (cv, &pv) in c.iter_mut().zip(&part) {
            *cv += pv as f64;
        }
        c0 = c1;
    }
}

/// The float-equivalent weights of a layer whose inputs are the quantized model's:
/// `W' = argmin ‖W X − W' X̃‖² + λ‖W' − W‖²` = `W (C + λI)(H̃ + λI)⁻¹` with
/// `H̃ = X̃ X̃ᵀ`, `C = X X̃ᵀ` (`h` and `c`, K×K) and `λ = damp · mean(diag H̃)`. Since
/// `‖W X − Ŵ X̃‖² = ‖(W' − Ŵ) X̃‖² + const` (λ = 0), rounding `W'` against `H̃` (GPTQ)
/// minimises the error against the float layer's output while the layer reads the
/// quantized model's inputs. The ridge term pulls toward W, not toward 0: where X̃
/// carries little energy (a direction the samples do not span), W' stays W. `w` is
/// [N, K] row-major; `None` when `H̃ + λI` is not positive definite.
pub fn aligned_target(
    w: &[f32],
    n: usize,
    k: usize,
    h: &[f64],
    c: &[f64],
    damp: f64,
) -> Option<Vec<f32>> {
    assert_eq!(w.len(), n * k);
    assert_eq!(h.len(), k * k);
    assert_eq!(c.len(), k * k);
    if k == 0 {
        return Some(vec![]);
    }
    let mean_diag = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
    let lambda = (damp * mean_diag).max(f64::MIN_POSITIVE);
    let mut a = h.to_vec();
    let mut cl = c.to_vec();
    for i in 0..k {
        a[i * k + i] += lambda;
        cl[i * k + i] += lambda;
    }
    let l = linalg::cholesky(&a, k).ok()?;
    let mut out = vec![0f32; n * k];
    par_rows(&mut out, k, threads_for(n * k * k), |r0, rows| {
        for (ri, dst) in rows.chunks_mut(k).enumerate() {
            let wr = &w[(r0 + ri) * k..(r0 + ri + 1) * k];
            // b = w (C + λI); w' solves w' (H̃ + λI) = b, i.e. (H̃ + λI) w'ᵀ = bᵀ.
            let mut b = vec![0f64; k];
            for (i, &wv) in wr.iter().enumerate() {
                if wv != 0.0 {
                    let wv = wv as f64;
                    for (bv, &cv) in b.iter_mut().zip(&cl[i * k..(i + 1) * k]) {
                        *bv += wv * cv;
                    }
                }
            }
            for (d, v) in dst.iter_mut().zip(linalg::cholesky_solve(&l, k, &b)) {
                *d = v as f32;
            }
        }
    });
    out.iter().all(|v| v.is_finite()).then_some(out)
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
