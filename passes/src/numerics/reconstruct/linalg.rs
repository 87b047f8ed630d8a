//! Dense Cholesky factorisation, triangular solves and inverses on small (≲ 2000²)
//! row-major f64 matrices.

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
    let lp = cholesky(&rev, n).map_err(|NotPositiveDefinite(i)| NotPositiveDefinite(n - 1 - i))?;
    let linv = invert_lower(&lp, n);
    let mut u = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            u[i * n + j] = linv[(n - 1 - i) * n + (n - 1 - j)];
        }
    }
    Ok(u)
}
