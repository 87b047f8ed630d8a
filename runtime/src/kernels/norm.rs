//! Group normalization (+ SiLU) in one pass over each (image, group), split over tract's
//! executor: what diffusers' exports spell `Reshape → InstanceNormalization → Reshape →
//! Mul(γ) → Add(β) [→ x·Sigmoid(x)]` and tract runs as a dozen element-wise and reduce
//! nodes on one thread.

use super::int8::par::{self, Shared};

/// Parameters of [`group_norm`].
#[derive(Clone, Copy, Debug)]
pub struct GroupNorm<'a> {
    pub groups: usize,
    pub epsilon: f32,
    /// The InstanceNormalization's own scale and bias, one per group.
    pub group_scale: &'a [f32],
    pub group_bias: &'a [f32],
    /// The per-channel affine after it (γ, β).
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
    /// Apply SiLU (`y · sigmoid(y)`) to the result.
    pub silu: bool,
}

/// `out = silu?(((x − μ) / √(σ² + ε) · s_g + b_g) · γ_c + β_c)` over `x[N, C, S]`
/// (`S` = spatial positions), `μ`, `σ²` per (image, group of `C / G` channels); the
/// statistics are accumulated in f64. Units of (image, group) do not depend on the thread
/// that runs them: bit-identical for any thread count.
pub fn group_norm(x: &[f32], n: usize, c: usize, s: usize, p: &GroupNorm, out: &mut [f32]) {
    let g = p.groups;
    assert!(
        g > 0 && c.is_multiple_of(g),
        "group norm: {c} channels in {g} groups"
    );
    assert_eq!(x.len(), n * c * s, "group norm: input length");
    assert_eq!(out.len(), x.len(), "group norm: output length");
    assert!(p.group_scale.len() == g && p.group_bias.len() == g);
    assert!(p.gamma.len() == c && p.beta.len() == c);
    let cg = c / g;
    let len = cg * s;
    let dst = Shared::new(out);
    let split = par::worth_splitting(par::Kind::Norm, x.len());
    par::for_each(n * g, split, |u| {
        let (b, gi) = (u / g, u % g);
        let start = (b * c + gi * cg) * s;
        let src = &x[start..start + len];
        // SAFETY: units write disjoint (image, group) ranges.
        let o = unsafe { dst.range(start, len) };
        unit(src, o, s, gi, cg, p);
    });
}

#[inline]
fn unit(src: &[f32], o: &mut [f32], s: usize, gi: usize, cg: usize, p: &GroupNorm) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA detected.
        return unsafe { unit_avx2(src, o, s, gi, cg, p) };
    }
    unit_plain(src, o, s, gi, cg, p)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn unit_avx2(src: &[f32], o: &mut [f32], s: usize, gi: usize, cg: usize, p: &GroupNorm) {
    unit_plain(src, o, s, gi, cg, p)
}

#[inline(always)]
fn unit_plain(src: &[f32], o: &mut [f32], s: usize, gi: usize, cg: usize, p: &GroupNorm) {
    let count = src.len().max(1) as f64;
    let mean = sum_f64(src, |v| v) / count;
    let m32 = mean as f32;
    let var = sum_f64(src, |v| {
        let d = v - m32;
        d * d
    }) / count;
    let rstd = 1.0 / (var + p.epsilon as f64).sqrt();
    let (sg, bg) = (p.group_scale[gi] as f64, p.group_bias[gi] as f64);
    for (ci, (xs, os)) in src.chunks_exact(s).zip(o.chunks_exact_mut(s)).enumerate() {
        let ch = gi * cg + ci;
        let (gamma, beta) = (p.gamma[ch] as f64, p.beta[ch] as f64);
        // y = x · a + b with the whole affine folded per channel.
        let a = (rstd * sg * gamma) as f32;
        let bb = ((bg - mean * rstd * sg) * gamma + beta) as f32;
        if p.silu {
            for (d, &v) in os.iter_mut().zip(xs) {
                let y = v * a + bb;
                *d = y / (1.0 + exp(-y));
            }
        } else {
            for (d, &v) in os.iter_mut().zip(xs) {
                *d = v * a + bb;
            }
        }
    }
}

/// Σ f(x) in f64, in 8 lanes of f32 partial sums per block of 1024 values (vectorizes;
/// the f32 partial sums hold at most 128 terms each).
#[inline(always)]
fn sum_f64(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0f64;
    for block in x.chunks(1024) {
        let mut acc = [0f32; 8];
        let mut it = block.chunks_exact(8);
        for c in &mut it {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += f(v);
            }
        }
        total += acc.iter().map(|&a| a as f64).sum::<f64>();
        total += it.remainder().iter().map(|&v| f(v) as f64).sum::<f64>();
    }
    total
}

/// `exp(x)` for any f32 (clamped to `[−87, 88]`: ~1.6e-38 .. ~1.7e38), within 2 ulp, by
/// [`crate::kernels::expf`]: its fused polynomial is most of the SiLU's time.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    use crate::kernels::expf::{pow2, reduced};
    let (poly, n) = reduced(x.clamp(-87.0, 88.0));
    // 2ⁿ as two factors, so that n = 128 (x near 88.7) does not overflow the exponent.
    let half = n >> 1;
    poly * pow2(half) * pow2(n - half)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_range() {
        let mut worst = 0f64;
        for i in 0..=174_900 {
            let x = -87.0 + i as f32 * 1e-3;
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "relative error {worst:e}");
    }

    /// Against an f64 reference; and bit-identical on 1 and 3 threads.
    #[test]
    fn group_norm_matches_a_reference() {
        use tract_linalg::multithread::{multithread_tract_scope, Executor};
        for &(n, c, s, g, silu) in &[
            (1usize, 8usize, 5usize, 2usize, false),
            (2, 12, 33, 3, true),
            (2, 64, 1024, 32, true),
        ] {
            let x: Vec<f32> = (0..n * c * s)
                .map(|i| ((i as f32) * 0.37).sin() * 3.0 + (i % 7) as f32)
                .collect();
            let gs: Vec<f32> = (0..g).map(|i| 1.0 + i as f32 * 0.1).collect();
            let gb: Vec<f32> = (0..g).map(|i| i as f32 * 0.05).collect();
            let gamma: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 * 0.01).collect();
            let beta: Vec<f32> = (0..c).map(|i| i as f32 * -0.02).collect();
            let p = GroupNorm {
                groups: g,
                epsilon: 1e-5,
                group_scale: &gs,
                group_bias: &gb,
                gamma: &gamma,
                beta: &beta,
                silu,
            };
            let cg = c / g;
            let mut want = vec![0f64; x.len()];
            for b in 0..n {
                for gi in 0..g {
                    let r = (b * c + gi * cg) * s..(b * c + gi * cg + cg) * s;
                    let v = &x[r.clone()];
                    let mean = v.iter().map(|&a| a as f64).sum::<f64>() / v.len() as f64;
                    let var =
                        v.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
                    for (i, &a) in v.iter().enumerate() {
                        let ch = gi * cg + i / s;
                        let y = ((a as f64 - mean) / (var + 1e-5).sqrt() * gs[gi] as f64
                            + gb[gi] as f64)
                            * gamma[ch] as f64
                            + beta[ch] as f64;
                        want[r.start + i] = if silu { y / (1.0 + (-y).exp()) } else { y };
                    }
                }
            }
            let run = || {
                let mut out = vec![0f32; x.len()];
                group_norm(&x, n, c, s, &p, &mut out);
                out
            };
            let one = multithread_tract_scope(Executor::SingleThread, run);
            let three = multithread_tract_scope(Executor::multithread(3), || {
                crate::kernels::int8::par::split_everything(run)
            });
            assert!(
                one.iter()
                    .zip(&three)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "1 vs 3 threads"
            );
            for (i, (&got, &w)) in one.iter().zip(&want).enumerate() {
                assert!(
                    (got as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{n}x{c}x{s} g{g} [{i}]: {got} vs {w}"
                );
            }
        }
    }
}
