//! Dense kernels for GPTQ at scale, on row-major slices: the "NT" product update
//! `C ±= A · Bᵀ` (rows of A and B are contiguous, so every entry is a dot product) in f32
//! and f64, and a blocked, threaded Cholesky factorisation built on it.
//!
//! Every entry of `C` is computed the same way whatever the tiling or the number of
//! threads (lane accumulators over the same chunks of the inner dimension, summed in the
//! same order), so results do not depend on how rows are split between threads.

use std::ops::{Add, Mul};

/// f32 or f64.
pub trait Real:
    Copy + Default + Send + Sync + PartialEq + Add<Output = Self> + Mul<Output = Self> + 'static
{
    fn mul_add_(self, b: Self, c: Self) -> Self;
    fn neg_(self) -> Self;
    fn of_f32(x: f32) -> Self;
    fn to_f64(self) -> f64;
    /// [`nt_update`] with the best kernel this CPU has.
    #[allow(clippy::too_many_arguments)]
    fn nt(
        c: &mut [Self],
        ldc: usize,
        a: &[Self],
        lda: usize,
        b: &[Self],
        ldb: usize,
        dims: (usize, usize, usize),
        acc: Acc,
        lower: Option<usize>,
    );
}

/// Fused multiply-add where the portable build has it for free (aarch64).
const PORTABLE_FMA: bool = cfg!(target_arch = "aarch64");

macro_rules! real_impl {
    ($t:ty, $lanes:expr, $avx2:ident) => {
        impl Real for $t {
            #[inline(always)]
            fn mul_add_(self, b: $t, c: $t) -> $t {
                self.mul_add(b, c)
            }
            #[inline(always)]
            fn neg_(self) -> $t {
                -self
            }
            #[inline(always)]
            fn of_f32(x: f32) -> $t {
                x as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn nt(
                c: &mut [$t],
                ldc: usize,
                a: &[$t],
                lda: usize,
                b: &[$t],
                ldb: usize,
                dims: (usize, usize, usize),
                acc: Acc,
                lower: Option<usize>,
            ) {
                #[cfg(target_arch = "x86_64")]
                {
                    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
                    {
                        // SAFETY: the CPU has AVX2 and FMA (checked just above).
                        unsafe { simd::$avx2(c, ldc, a, lda, b, ldb, dims, acc, lower) };
                        return;
                    }
                }
                nt_body::<$t, PORTABLE_FMA, $lanes>(
                    c,
                    ldc,
                    a,
                    lda,
                    b,
                    ldb,
                    dims,
                    acc,
                    lower,
                    dot_4x2::<$t, PORTABLE_FMA, $lanes>,
                )
            }
        }
    };
}

real_impl!(f32, 4, nt_avx2_f32);
real_impl!(f64, 2, nt_avx2_f64);

#[inline(always)]
fn fma<T: Real, const F: bool>(a: T, b: T, c: T) -> T {
    if F {
        a.mul_add_(b, c)
    } else {
        a * b + c
    }
}

/// Inner-dimension chunk: each chunk's dot products are summed in registers, then added to
/// `C` (so `C` is read and written once per chunk).
const PC: usize = 512;
/// Rows of B per pass over the rows of A (B's chunk stays in L2).
const JB: usize = 64;

/// How an [`nt_update`] writes into `C`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acc {
    Add,
    Sub,
}

/// `C[i, j] ±= Σ_{t < p} A[i, t] · B[j, t]` for `i < m`, `j < n`, with leading dimensions
/// `ldc`, `lda`, `ldb`. With `lower = Some(off)` only the 4×2 tiles that hold an entry with
/// `j ≤ i + off` are computed (the lower triangle, plus a few entries above it in the
/// diagonal tiles, which get their true values too).
#[allow(clippy::too_many_arguments)]
pub fn nt_update<T: Real>(
    c: &mut [T],
    ldc: usize,
    a: &[T],
    lda: usize,
    b: &[T],
    ldb: usize,
    (m, n, p): (usize, usize, usize),
    acc: Acc,
    lower: Option<usize>,
) {
    if m == 0 || n == 0 || p == 0 {
        return;
    }
    assert!(c.len() >= (m - 1) * ldc + n);
    assert!(a.len() >= (m - 1) * lda + p);
    assert!(b.len() >= (n - 1) * ldb + p);
    T::nt(c, ldc, a, lda, b, ldb, (m, n, p), acc, lower)
}

/// The dot product of `x` and `y` (same length) as every kernel here computes it: `L`
/// lane accumulators over whole chunks, the lanes summed in order, then the tail.
#[inline(always)]
fn dot_lanes<T: Real, const F: bool, const L: usize>(x: &[T], y: &[T]) -> T {
    let mut acc = [T::default(); L];
    let full = x.len() / L * L;
    for (xc, yc) in x[..full].chunks_exact(L).zip(y[..full].chunks_exact(L)) {
        let xc: &[T; L] = xc.try_into().unwrap();
        let yc: &[T; L] = yc.try_into().unwrap();
        for l in 0..L {
            acc[l] = fma::<T, F>(xc[l], yc[l], acc[l]);
        }
    }
    let mut s = acc[0];
    for &v in &acc[1..] {
        s = s + v;
    }
    for (&xv, &yv) in x[full..].iter().zip(&y[full..]) {
        s = fma::<T, F>(xv, yv, s);
    }
    s
}

/// The same dot products as [`dot_lanes`] for 4 rows of A against 2 rows of B at once.
/// (One loop per accumulator: the shape LLVM turns into one vector FMA each.)
#[inline(always)]
fn dot_4x2<T: Real, const F: bool, const L: usize>(a: [&[T]; 4], b: [&[T]; 2]) -> [[T; 2]; 4] {
    let len = b[0].len();
    let full = len / L * L;
    let z = [T::default(); L];
    let (mut c00, mut c01, mut c10, mut c11) = (z, z, z, z);
    let (mut c20, mut c21, mut c30, mut c31) = (z, z, z, z);
    let (a0, a1, a2, a3) = (&a[0][..full], &a[1][..full], &a[2][..full], &a[3][..full]);
    let (b0, b1) = (&b[0][..full], &b[1][..full]);
    for (((((x0, x1), x2), x3), y0), y1) in a0
        .chunks_exact(L)
        .zip(a1.chunks_exact(L))
        .zip(a2.chunks_exact(L))
        .zip(a3.chunks_exact(L))
        .zip(b0.chunks_exact(L))
        .zip(b1.chunks_exact(L))
    {
        macro_rules! acc {
            ($c:ident, $x:ident, $y:ident) => {
                for l in 0..L {
                    $c[l] = fma::<T, F>($x[l], $y[l], $c[l]);
                }
            };
        }
        acc!(c00, x0, y0);
        acc!(c01, x0, y1);
        acc!(c10, x1, y0);
        acc!(c11, x1, y1);
        acc!(c20, x2, y0);
        acc!(c21, x2, y1);
        acc!(c30, x3, y0);
        acc!(c31, x3, y1);
    }
    let accs = [[c00, c01], [c10, c11], [c20, c21], [c30, c31]];
    let mut out = [[T::default(); 2]; 4];
    for r in 0..4 {
        for j in 0..2 {
            let acc = &accs[r][j];
            let mut s = acc[0];
            for &v in &acc[1..] {
                s = s + v;
            }
            for t in full..len {
                s = fma::<T, F>(a[r][t], b[j][t], s);
            }
            out[r][j] = s;
        }
    }
    out
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn nt_body<T: Real, const F: bool, const L: usize>(
    c: &mut [T],
    ldc: usize,
    a: &[T],
    lda: usize,
    b: &[T],
    ldb: usize,
    (m, n, p): (usize, usize, usize),
    acc: Acc,
    lower: Option<usize>,
    tile: impl Fn([&[T]; 4], [&[T]; 2]) -> [[T; 2]; 4],
) {
    let put = |c: &mut T, v: T| {
        *c = match acc {
            Acc::Add => *c + v,
            Acc::Sub => *c + v.neg_(),
        }
    };
    let mut p0 = 0;
    while p0 < p {
        let p1 = (p0 + PC).min(p);
        let mut j0 = 0;
        while j0 < n {
            let j1 = (j0 + JB).min(n);
            let mut i = 0;
            while i < m {
                let mr = 4.min(m - i);
                let jmax = match lower {
                    Some(off) => j1.min(i + mr + off),
                    None => j1,
                };
                let mut j = j0;
                while j < jmax {
                    let nr = 2.min(jmax - j);
                    if mr == 4 && nr == 2 {
                        let ar = |r: usize| &a[(i + r) * lda + p0..(i + r) * lda + p1];
                        let br = |q: usize| &b[(j + q) * ldb + p0..(j + q) * ldb + p1];
                        let d = tile([ar(0), ar(1), ar(2), ar(3)], [br(0), br(1)]);
                        for (r, dr) in d.iter().enumerate() {
                            for (q, &v) in dr.iter().enumerate() {
                                put(&mut c[(i + r) * ldc + j + q], v);
                            }
                        }
                    } else {
                        for r in 0..mr {
                            for q in 0..nr {
                                let v = dot_lanes::<T, F, L>(
                                    &a[(i + r) * lda + p0..(i + r) * lda + p1],
                                    &b[(j + q) * ldb + p0..(j + q) * ldb + p1],
                                );
                                put(&mut c[(i + r) * ldc + j + q], v);
                            }
                        }
                    }
                    j += 2;
                }
                i += 4;
            }
            j0 = j1;
        }
        p0 = p1;
    }
}

/// Row ranges `[r0, r1)` of `0..m` for `threads` threads: equal rows, or with `lower`
/// (work ∝ row index + `lower_from`) equal work.
pub fn row_splits(m: usize, threads: usize, lower_from: Option<usize>) -> Vec<(usize, usize)> {
    let threads = threads.clamp(1, m.max(1));
    let mut cuts = vec![0];
    for t in 1..threads {
        let cut = match lower_from {
            None => m * t / threads,
            Some(off) => {
                // Work of rows [0, r): (r + off)² − off² ∝ t / threads of the total.
                let (o, mm) = (off as f64, m as f64);
                let total = (mm + o) * (mm + o) - o * o;
                ((o * o + total * t as f64 / threads as f64).sqrt() - o).round() as usize
            }
        };
        // Multiples of 4 (the kernel's row tile), increasing.
        let cut = (cut / 4 * 4).clamp(*cuts.last().unwrap(), m);
        cuts.push(cut);
    }
    cuts.push(m);
    cuts.windows(2)
        .map(|w| (w[0], w[1]))
        .filter(|(a, b)| b > a)
        .collect()
}

/// [`nt_update`] with the rows of `C` (and `A`) split over `threads` threads.
#[allow(clippy::too_many_arguments)]
pub fn par_nt_update<T: Real>(
    c: &mut [T],
    ldc: usize,
    a: &[T],
    lda: usize,
    b: &[T],
    ldb: usize,
    (m, n, p): (usize, usize, usize),
    acc: Acc,
    lower: Option<usize>,
    threads: usize,
) {
    let splits = row_splits(m, threads, lower);
    if splits.len() <= 1 {
        nt_update(c, ldc, a, lda, b, ldb, (m, n, p), acc, lower);
        return;
    }
    std::thread::scope(|sc| {
        let mut rest = c;
        let mut done = 0;
        for &(r0, r1) in &splits {
            let (_, tail) = rest.split_at_mut((r0 - done) * ldc);
            let take = ((r1 - r0) * ldc).min(tail.len());
            let (mine, tail) = tail.split_at_mut(take);
            rest = tail;
            done = r1;
            let a = &a[r0 * lda..];
            sc.spawn(move || {
                nt_update(
                    mine,
                    ldc,
                    a,
                    lda,
                    b,
                    ldb,
                    (r1 - r0, n, p),
                    acc,
                    lower.map(|o| o + r0),
                )
            });
        }
    });
}

/// Panel width of [`cholesky_in_place`].
const NB: usize = 64;

/// The factorisation met a non-positive (or non-finite) pivot at this row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotPositiveDefinite(pub usize);

/// Lower Cholesky factor of the symmetric positive definite `a` (n×n, row-major; only the
/// lower triangle is read), in place: right-looking, panels of 64 columns, the trailing
/// update by [`par_nt_update`] on `threads` threads. Entries above the diagonal are left
/// with unspecified values.
pub fn cholesky_in_place(
    a: &mut [f64],
    n: usize,
    threads: usize,
) -> Result<(), NotPositiveDefinite> {
    assert_eq!(a.len(), n * n);
    let mut k0 = 0;
    while k0 < n {
        let k1 = (k0 + NB).min(n);
        // The diagonal block.
        for i in k0..k1 {
            for j in k0..=i {
                let (top, bottom) = a.split_at_mut(i * n);
                let li = &bottom[k0..j];
                let s = if i == j {
                    bottom[j] - dot_lanes::<f64, false, 4>(li, li)
                } else {
                    bottom[j] - dot_lanes::<f64, false, 4>(li, &top[j * n + k0..j * n + j])
                };
                if i == j {
                    if !(s > 0.0 && s.is_finite()) {
                        return Err(NotPositiveDefinite(i));
                    }
                    bottom[j] = s.sqrt();
                } else {
                    bottom[j] = s / top[j * n + j];
                }
            }
        }
        if k1 == n {
            break;
        }
        // The panel below it: L[i, k0..k1] for i ≥ k1, row by row (rows split over threads).
        {
            let (head, panel) = a.split_at_mut(k1 * n);
            let head = &*head;
            let rows = n - k1;
            let splits = row_splits(
                rows,
                if rows * NB * NB > 1 << 20 { threads } else { 1 },
                None,
            );
            let solve = |chunk: &mut [f64]| {
                for row in chunk.chunks_mut(n) {
                    for j in k0..k1 {
                        let s = row[j]
                            - dot_lanes::<f64, false, 4>(&row[k0..j], &head[j * n + k0..j * n + j]);
                        row[j] = s / head[j * n + j];
                    }
                }
            };
            if splits.len() <= 1 {
                solve(panel);
            } else {
                std::thread::scope(|sc| {
                    let mut rest = panel;
                    for &(r0, r1) in &splits {
                        let (mine, tail) = rest.split_at_mut((r1 - r0) * n);
                        rest = tail;
                        let solve = &solve;
                        sc.spawn(move || solve(mine));
                    }
                });
            }
        }
        // Trailing update: A[i, j] −= L[i, k0..k1] · L[j, k0..k1] for k1 ≤ j ≤ i.
        {
            let rows = n - k1;
            let (head, tail) = a.split_at_mut(k1 * n);
            let _ = head;
            // `tail` row r is matrix row k1 + r; its columns k1.. hold the trailing block, its
            // columns k0..k1 the panel. The update reads the panel of every row and writes
            // the trailing block: copy the panel out so that the borrows do not overlap.
            let mut panel = vec![0f64; rows * (k1 - k0)];
            for (r, dst) in panel.chunks_mut(k1 - k0).enumerate() {
                dst.copy_from_slice(&tail[r * n + k0..r * n + k1]);
            }
            let work = rows * rows * (k1 - k0) / 2;
            par_nt_update(
                &mut tail[k1..],
                n,
                &panel,
                k1 - k0,
                &panel,
                k1 - k0,
                (rows, rows, k1 - k0),
                Acc::Sub,
                Some(0),
                if work > 1 << 20 { threads } else { 1 },
            );
        }
        k0 = k1;
    }
    Ok(())
}

/// The 4×2 tile with explicit AVX2 vectors (LLVM does not vectorise it reliably), and the
/// kernels that use it. Same arithmetic as [`dot_lanes`] with `L` lanes and FMA. (An
/// AVX-512 build of the same tile measured no faster on Zen 4, whose 512-bit units are
/// 256 bits wide.)
#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{nt_body, Acc};
    use std::arch::x86_64::*;

    macro_rules! kernel {
        ($feat:literal, $t:ty, $v:ty, $lanes:expr, $zero:ident, $load:ident, $fma:ident,
         $store:ident, $tile:ident, $nt:ident) => {
            #[target_feature(enable = $feat)]
            #[inline]
            unsafe fn $tile(a: [&[$t]; 4], b: [&[$t]; 2]) -> [[$t; 2]; 4] {
                const L: usize = $lanes;
                let len = b[0].len();
                assert!(b[1].len() == len && a.iter().all(|r| r.len() == len));
                let full = len / L * L;
                let mut c: [$v; 8] = [$zero(); 8];
                let mut q = 0;
                while q < full {
                    // SAFETY: q + L ≤ full ≤ the length of every row (asserted above).
                    let y0 = $load(b[0].as_ptr().add(q));
                    let y1 = $load(b[1].as_ptr().add(q));
                    for r in 0..4 {
                        let x = $load(a[r].as_ptr().add(q));
                        c[2 * r] = $fma(x, y0, c[2 * r]);
                        c[2 * r + 1] = $fma(x, y1, c[2 * r + 1]);
                    }
                    q += L;
                }
                let mut out = [[0.0 as $t; 2]; 4];
                for r in 0..4 {
                    for j in 0..2 {
                        let mut lanes = [0.0 as $t; L];
                        $store(lanes.as_mut_ptr(), c[2 * r + j]);
                        let mut s = lanes[0];
                        for &v in &lanes[1..] {
                            s += v;
                        }
                        for t in full..len {
                            s = a[r][t].mul_add(b[j][t], s);
                        }
                        out[r][j] = s;
                    }
                }
                out
            }

            /// `nt_update` with this tile; its edge tiles use `dot_lanes` with the same
            /// lanes and FMA, hence the same arithmetic.
            #[target_feature(enable = $feat)]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn $nt(
                c: &mut [$t],
                ldc: usize,
                a: &[$t],
                lda: usize,
                b: &[$t],
                ldb: usize,
                dims: (usize, usize, usize),
                acc: Acc,
                lower: Option<usize>,
            ) {
                nt_body::<$t, true, $lanes>(c, ldc, a, lda, b, ldb, dims, acc, lower, |a, b| {
                    // SAFETY: this closure runs only inside this function, where its
                    // target features are present.
                    unsafe { $tile(a, b) }
                })
            }
        };
    }

    kernel!(
        "avx2,fma",
        f64,
        __m256d,
        4,
        _mm256_setzero_pd,
        _mm256_loadu_pd,
        _mm256_fmadd_pd,
        _mm256_storeu_pd,
        tile_avx2_f64,
        nt_avx2_f64
    );
    kernel!(
        "avx2,fma",
        f32,
        __m256,
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        _mm256_storeu_ps,
        tile_avx2_f32,
        nt_avx2_f32
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use tfmqc_runtime::rng::SplitMix64;

    fn naive_nt(a: &[f64], b: &[f64], m: usize, n: usize, p: usize) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..p).map(|t| a[i * p + t] * b[j * p + t]).sum();
            }
        }
        c
    }

    #[test]
    fn nt_update_matches_naive_in_f32_and_f64() {
        let mut rng = SplitMix64::new(4);
        for (m, n, p) in [
            (1, 1, 1),
            (5, 3, 7),
            (9, 17, 600),
            (4, 2, 1100),
            (13, 40, 47),
        ] {
            let a: Vec<f64> = (0..m * p).map(|_| rng.normal()).collect();
            let b: Vec<f64> = (0..n * p).map(|_| rng.normal()).collect();
            let r = naive_nt(&a, &b, m, n, p);
            let c0: Vec<f64> = (0..m * n).map(|_| rng.normal()).collect();
            for acc in [Acc::Add, Acc::Sub] {
                let sign = if acc == Acc::Add { 1.0 } else { -1.0 };
                let mut c = c0.clone();
                nt_update(&mut c, n, &a, p, &b, p, (m, n, p), acc, None);
                for i in 0..m * n {
                    assert!((c[i] - (c0[i] + sign * r[i])).abs() < 1e-9 * (1.0 + r[i].abs()));
                }
                let (a32, b32): (Vec<f32>, Vec<f32>) = (
                    a.iter().map(|&v| v as f32).collect(),
                    b.iter().map(|&v| v as f32).collect(),
                );
                let mut c = vec![0f32; m * n];
                nt_update(&mut c, n, &a32, p, &b32, p, (m, n, p), acc, None);
                for i in 0..m * n {
                    let scale = (p as f64).sqrt();
                    assert!((c[i] as f64 - sign * r[i]).abs() < 1e-5 * scale * (1.0 + r[i].abs()));
                }
            }
        }
    }

    #[test]
    fn threads_and_lower_tiles_give_the_same_entries() {
        let mut rng = SplitMix64::new(9);
        let (m, p) = (203, 300);
        let a: Vec<f64> = (0..m * p).map(|_| rng.normal()).collect();
        let mut full = vec![0f64; m * m];
        nt_update(&mut full, m, &a, p, &a, p, (m, m, p), Acc::Add, None);
        for threads in [1, 2, 3] {
            let mut low = vec![0f64; m * m];
            par_nt_update(
                &mut low,
                m,
                &a,
                p,
                &a,
                p,
                (m, m, p),
                Acc::Add,
                Some(0),
                threads,
            );
            for i in 0..m {
                for j in 0..=i {
                    assert_eq!(low[i * m + j], full[i * m + j], "{i} {j}");
                }
            }
            let mut par = vec![0f64; m * m];
            par_nt_update(
                &mut par,
                m,
                &a,
                p,
                &a,
                p,
                (m, m, p),
                Acc::Add,
                None,
                threads,
            );
            assert_eq!(par, full);
        }
    }

    #[test]
    fn row_splits_cover_the_rows() {
        for (m, t, lower) in [
            (10, 2, None),
            (1000, 3, Some(0)),
            (7, 8, Some(5)),
            (0, 2, None),
        ] {
            let s = row_splits(m, t, lower);
            let mut next = 0;
            for (a, b) in s {
                assert_eq!(a, next);
                assert!(b > a);
                next = b;
            }
            assert_eq!(next, m);
        }
    }

    #[test]
    fn blocked_cholesky_matches_the_reference() {
        let mut rng = SplitMix64::new(2);
        for n in [1, 3, 64, 65, 200] {
            let g: Vec<f64> = (0..n * (n + 5)).map(|_| rng.normal()).collect();
            let mut spd = vec![0f64; n * n];
            for i in 0..n {
                for j in 0..n {
                    spd[i * n + j] = (0..n + 5)
                        .map(|t| g[i * (n + 5) + t] * g[j * (n + 5) + t])
                        .sum::<f64>();
                }
            }
            let l_ref = crate::numerics::reconstruct::linalg::cholesky(&spd, n).unwrap();
            for threads in [1, 2] {
                let mut l = spd.clone();
                cholesky_in_place(&mut l, n, threads).unwrap();
                for i in 0..n {
                    for j in 0..=i {
                        let (x, y) = (l[i * n + j], l_ref[i * n + j]);
                        assert!(
                            (x - y).abs() < 1e-9 * (1.0 + y.abs()),
                            "{n}: {i} {j} {x} {y}"
                        );
                    }
                }
            }
        }
        let mut bad = vec![1.0, 2.0, 2.0, 1.0];
        assert_eq!(
            cholesky_in_place(&mut bad, 2, 1),
            Err(NotPositiveDefinite(1))
        );
    }

    /// `cargo test --release -p tfmqc-passes --lib bench_dense -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_dense() {
        let cpu = crate::numerics::quant::tests::thread_cpu;
        let mut rng = SplitMix64::new(1);
        let (m, n, p) = (256, 256, 2048);
        let a: Vec<f64> = (0..m * p).map(|_| rng.normal()).collect();
        let b: Vec<f64> = (0..n * p).map(|_| rng.normal()).collect();
        let mut c = vec![0f64; m * n];
        let reps = 8;
        let t = cpu();
        for _ in 0..reps {
            nt_update(&mut c, n, &a, p, &b, p, (m, n, p), Acc::Add, None);
        }
        let dt = cpu() - t;
        eprintln!(
            "nt_update f64 {m}x{n}x{p}: {:.2} GFMA/s",
            (m * n * p * reps) as f64 / dt / 1e9
        );
        let (a32, b32): (Vec<f32>, Vec<f32>) = (
            a.iter().map(|&v| v as f32).collect(),
            b.iter().map(|&v| v as f32).collect(),
        );
        let mut c32 = vec![0f32; m * n];
        let t = cpu();
        for _ in 0..reps {
            nt_update(&mut c32, n, &a32, p, &b32, p, (m, n, p), Acc::Add, None);
        }
        let dt = cpu() - t;
        eprintln!(
            "nt_update f32 {m}x{n}x{p}: {:.2} GFMA/s",
            (m * n * p * reps) as f64 / dt / 1e9
        );
        let nn = 2048;
        let g: Vec<f64> = (0..nn * 64).map(|_| rng.normal()).collect();
        let mut spd = vec![0f64; nn * nn];
        nt_update(&mut spd, nn, &g, 64, &g, 64, (nn, nn, 64), Acc::Add, None);
        for i in 0..nn {
            spd[i * nn + i] += 1.0;
        }
        let t = cpu();
        cholesky_in_place(&mut spd, nn, 1).unwrap();
        let dt = cpu() - t;
        eprintln!(
            "cholesky_in_place {nn}: {dt:.2} s ({:.2} GFMA/s), 1 thread",
            (nn * nn * nn) as f64 / 3.0 / dt / 1e9
        );
    }
}
