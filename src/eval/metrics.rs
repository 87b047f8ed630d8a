//! The numbers of `tfmqc eval`, on plain arrays: cosine similarity, relative MSE, PSNR,
//! and the Fréchet distance between Gaussians fitted to feature vectors.

/// Values above this (dB) mean "identical up to float noise"; JSON has no infinity.
pub const DB_CAP: f64 = 200.0;

/// cos∠(a, b) over all elements: the compiler's (TIAR's) one, so both report the same.
pub use tfmqc_passes::tib_net::cosine;

/// Σ(a − b)² / Σa²: the error energy relative to the float value's energy.
pub fn relative_mse(a: &[f32], b: &[f32]) -> f64 {
    let (mut e, mut s) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        e += (x as f64 - y as f64).powi(2);
        s += (x as f64).powi(2);
    }
    if e == 0.0 {
        0.0
    } else {
        e / s.max(f64::MIN_POSITIVE)
    }
}

/// PSNR of `b` against `a`, both images in [-1, 1] (clipped first): the peak-to-peak
/// range is 2, so PSNR = 10·log10(4 / MSE). Capped at [`DB_CAP`].
pub fn psnr(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len().max(1) as f64;
    let mse = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x.clamp(-1.0, 1.0) as f64 - y.clamp(-1.0, 1.0) as f64).powi(2))
        .sum::<f64>()
        / n;
    if mse == 0.0 {
        DB_CAP
    } else {
        (10.0 * (4.0 / mse).log10()).min(DB_CAP)
    }
}

/// Mean and unbiased covariance (divides by n − 1, as `np.cov`) of `n` rows of `d`.
pub fn mean_cov(rows: &[f32], d: usize) -> (Vec<f64>, Vec<f64>) {
    let n = rows.len() / d;
    let mut mu = vec![0f64; d];
    for r in rows.chunks(d) {
        for (m, &v) in mu.iter_mut().zip(r) {
            *m += v as f64;
        }
    }
    mu.iter_mut().for_each(|m| *m /= n.max(1) as f64);
    let mut cov = vec![0f64; d * d];
    for r in rows.chunks(d) {
        for i in 0..d {
            let a = r[i] as f64 - mu[i];
            for j in i..d {
                cov[i * d + j] += a * (r[j] as f64 - mu[j]);
            }
        }
    }
    let div = (n.max(2) - 1) as f64;
    for i in 0..d {
        for j in i..d {
            let v = cov[i * d + j] / div;
            cov[i * d + j] = v;
            cov[j * d + i] = v;
        }
    }
    (mu, cov)
}

/// Eigen-decomposition of a symmetric d×d matrix by cyclic Jacobi rotations:
/// (eigenvalues, eigenvectors as the columns of a row-major d×d matrix).
pub fn symmetric_eigen(m: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = m.to_vec();
    let mut v = vec![0f64; d * d];
    for i in 0..d {
        v[i * d + i] = 1.0;
    }
    let scale: f64 = a
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    for _sweep in 0..100 {
        let off: f64 = (0..d)
            .flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * d + j].powi(2))
            .sum::<f64>()
            .sqrt();
        if off <= 1e-15 * scale {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[p * d + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * d + q] - a[p * d + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let akp = a[k * d + p];
                    let akq = a[k * d + q];
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let apk = a[p * d + k];
                    let aqk = a[q * d + k];
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
                for k in 0..d {
                    let vkp = v[k * d + p];
                    let vkq = v[k * d + q];
                    v[k * d + p] = c * vkp - s * vkq;
                    v[k * d + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..d).map(|i| a[i * d + i]).collect(), v)
}

/// The symmetric square root of a positive semi-definite matrix (negative eigenvalues
/// from rounding are taken as 0).
pub fn sqrt_psd(m: &[f64], d: usize) -> Vec<f64> {
    let (w, v) = symmetric_eigen(m, d);
    let mut out = vec![0f64; d * d];
    for k in 0..d {
        let s = w[k].max(0.0).sqrt();
        for i in 0..d {
            let vik = v[i * d + k] * s;
            for j in 0..d {
                out[i * d + j] += vik * v[j * d + k];
            }
        }
    }
    out
}

fn matmul(a: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    let mut out = vec![0f64; d * d];
    for i in 0..d {
        for k in 0..d {
            let aik = a[i * d + k];
            for j in 0..d {
                out[i * d + j] += aik * b[k * d + j];
            }
        }
    }
    out
}

/// A reference Gaussian (μ, Σ) with √Σ precomputed, for several Fréchet distances.
pub struct Reference {
    pub d: usize,
    pub mean: Vec<f64>,
    pub cov: Vec<f64>,
    sqrt_cov: Vec<f64>,
}

impl Reference {
    pub fn new(mean: Vec<f64>, cov: Vec<f64>) -> Reference {
        let d = mean.len();
        let sqrt_cov = sqrt_psd(&cov, d);
        Reference {
            d,
            mean,
            cov,
            sqrt_cov,
        }
    }

    /// ‖μ₁−μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½), with Tr (Σ₁Σ₂)^½ = Tr (√Σ₁ Σ₂ √Σ₁)^½ (the same
    /// eigenvalues, and a symmetric PSD matrix to take them from).
    pub fn frechet(&self, mean: &[f64], cov: &[f64]) -> f64 {
        let d = self.d;
        let dm: f64 = self
            .mean
            .iter()
            .zip(mean)
            .map(|(a, b)| (a - b).powi(2))
            .sum();
        let inner = matmul(&matmul(&self.sqrt_cov, cov, d), &self.sqrt_cov, d);
        // Symmetrize the rounding noise away before the eigen-solver.
        let sym: Vec<f64> = (0..d * d)
            .map(|k| 0.5 * (inner[k] + inner[(k % d) * d + k / d]))
            .collect();
        let (w, _) = symmetric_eigen(&sym, d);
        let tr_sqrt: f64 = w.iter().map(|x| x.max(0.0).sqrt()).sum();
        let tr: f64 = (0..d).map(|i| self.cov[i * d + i] + cov[i * d + i]).sum();
        (dm + tr - 2.0 * tr_sqrt).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_and_relative_mse_of_simple_vectors() {
        assert!((cosine(&[1.0, 0.0], &[0.0, 2.0])).abs() < 1e-12);
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert_eq!(relative_mse(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((relative_mse(&[3.0, 4.0], &[3.0, 5.0]) - 1.0 / 25.0).abs() < 1e-12);
    }

    #[test]
    fn psnr_uses_the_peak_to_peak_range_of_two() {
        // MSE 0.04 → 10·log10(4 / 0.04) = 20 dB.
        let a = vec![0.0f32; 100];
        let b = vec![0.2f32; 100];
        assert!((psnr(&a, &b) - 20.0).abs() < 1e-6);
        assert_eq!(psnr(&a, &a), DB_CAP);
        // Values outside [-1, 1] are clipped as in the image.
        assert_eq!(psnr(&[1.0], &[3.0]), DB_CAP);
    }

    #[test]
    fn eigen_reconstructs_a_symmetric_matrix() {
        let m = [4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 2.0];
        let (w, v) = symmetric_eigen(&m, 3);
        for i in 0..3 {
            for j in 0..3 {
                let r: f64 = (0..3).map(|k| v[i * 3 + k] * w[k] * v[j * 3 + k]).sum();
                assert!((r - m[i * 3 + j]).abs() < 1e-10, "{i},{j}");
            }
        }
        let s = sqrt_psd(&m, 3);
        let back = matmul(&s, &s, 3);
        assert!(back.iter().zip(&m).all(|(a, b)| (a - b).abs() < 1e-10));
    }

    #[test]
    fn frechet_of_diagonal_gaussians_has_the_closed_form() {
        // Diagonal Σ: FD = ‖Δμ‖² + Σ_i (√a_i − √b_i)².
        let r = Reference::new(vec![0.0, 1.0], vec![4.0, 0.0, 0.0, 1.0]);
        let fd = r.frechet(&[1.0, 1.0], &[1.0, 0.0, 0.0, 9.0]);
        let want = 1.0 + (2.0f64 - 1.0).powi(2) + (1.0f64 - 3.0).powi(2);
        assert!((fd - want).abs() < 1e-9, "{fd} vs {want}");
        assert!(r.frechet(&[0.0, 1.0], &[4.0, 0.0, 0.0, 1.0]) < 1e-9);
    }

    #[test]
    fn mean_cov_matches_numpy_conventions() {
        // Rows (1, 2), (3, 6): mean (2, 4), unbiased cov [[2, 4], [4, 8]].
        let (m, c) = mean_cov(&[1.0, 2.0, 3.0, 6.0], 2);
        assert_eq!(m, vec![2.0, 4.0]);
        assert_eq!(c, vec![2.0, 4.0, 4.0, 8.0]);
    }
}
