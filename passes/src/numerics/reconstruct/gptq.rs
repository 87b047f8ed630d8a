//! GPTQ: column-by-column rounding with the inverse Hessian's error feedback, in blocks.

use super::*;

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
pub(super) fn gptq_with(
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
pub(super) fn gptq_factor(
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
pub(super) fn gptq_sweep(
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
