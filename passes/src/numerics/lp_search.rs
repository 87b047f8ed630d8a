//! The Lp range search of a weight channel's scale (`RangeSearch::Lp`, as the
//! reference): the clip of `max|w|` minimising `Σ|w − ŵ|^2.4`, exhaustive up to
//! [`LP_SAMPLE`] elements and certified by a vectorised approximation of `|d|^2.4`,
//! subsampled beyond. The quantizers that call it are in [`super::quant`].

use super::quant::quantize_value;

pub const LP_NORM: f64 = 2.4;

/// Candidate clips of the Lp search: `max|w| · (1 − 0.01·step)`, step `0..LP_STEPS`.
pub const LP_STEPS: usize = 50;

/// Channels longer than this are searched on an evenly strided subsample of this many
/// elements; up to this length the search is exhaustive (all [`LP_STEPS`] clips on every
/// element), with the result of the reference's exhaustive search.
pub const LP_SAMPLE: usize = 2048;

/// On subsampled channels: every `LP_COARSE`-th clip first, then every clip within
/// `LP_COARSE − 1` steps of the best.
const LP_COARSE: usize = 5;

/// The scale of one channel `v` by the Lp search (`1.0` for an all-zero channel).
///
/// Up to [`LP_SAMPLE`] elements: the reference's exhaustive search — the first of the 50
/// clips with the least `Σ|w − ŵ|^2.4` (f64 sums of `powf`) — but each sum is first taken
/// with a vectorised approximation of `|d|^2.4` (relative error below [`LP_APPROX_REL`]),
/// and only the clips that the approximation cannot separate from the best are summed
/// exactly: the result is the exhaustive search's, bit for bit.
///
/// Longer channels: the clips are compared on a subsample of [`LP_SAMPLE`] elements
/// ([`Sample`]), every fifth clip then the neighbours of the best; the winner is
/// kept only if its exact error on the whole channel is not above min-max's (clip 0), so
/// the result is never worse than min-max in Lp error.
pub fn lp_channel_scale(v: &[f32], qmax: f32) -> f32 {
    let maxabs = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    if maxabs == 0.0 {
        return 1.0;
    }
    let scale = |step: usize| maxabs * (1.0 - 0.01 * step as f32) / qmax;
    if !maxabs.is_finite() {
        return lp_exhaustive(v, qmax, maxabs);
    }
    let step = if v.len() <= LP_SAMPLE {
        let steps: Vec<usize> = (0..LP_STEPS).collect();
        certified_argmin(v, &steps, &scale, qmax)
    } else {
        let sample = Sample::new(v, maxabs);
        let mut approx = [f64::NAN; LP_STEPS];
        let eval = |st: usize, approx: &mut [f64; LP_STEPS]| {
            if approx[st].is_nan() {
                approx[st] = sample.lp_error_approx(scale(st), qmax);
            }
        };
        for st in (0..LP_STEPS).step_by(LP_COARSE) {
            eval(st, &mut approx);
        }
        let best = |approx: &[f64; LP_STEPS]| {
            (0..LP_STEPS)
                .filter(|&st| !approx[st].is_nan())
                .fold(0, |b, st| if approx[st] < approx[b] { st } else { b })
        };
        let coarse = best(&approx);
        let lo = coarse.saturating_sub(LP_COARSE - 1);
        let hi = (coarse + LP_COARSE).min(LP_STEPS);
        for st in lo..hi {
            eval(st, &mut approx);
        }
        match best(&approx) {
            0 => 0,
            st => certified_argmin(v, &[0, st], &scale, qmax),
        }
    };
    scale(step)
}

/// A weighted subsample of a long channel, [`LP_SAMPLE`] elements in all: the elements
/// some clip can cut (`|w| ≥ ½ max|w|`, where the Lp error of heavy tails lives) all of
/// them when they are at most half the sample, else evenly strided; the rest evenly
/// strided; each part weighted by the count it stands for.
struct Sample {
    parts: [(Vec<f32>, f64); 2],
}

impl Sample {
    fn new(v: &[f32], maxabs: f32) -> Sample {
        let half = 0.5 * maxabs;
        let (large, small): (Vec<f32>, Vec<f32>) = v.iter().partition(|x| x.abs() >= half);
        let large_n = large.len().min(LP_SAMPLE / 2);
        let small_n = (LP_SAMPLE - large_n).min(small.len());
        let pick = |all: Vec<f32>, n: usize| -> (Vec<f32>, f64) {
            if n >= all.len() {
                return (all, 1.0);
            }
            let len = all.len() as u64;
            let weight = all.len() as f64 / n as f64;
            let picked = (0..n as u64)
                .map(|j| all[(j * len / n as u64) as usize])
                .collect();
            (picked, weight)
        };
        Sample {
            parts: [pick(large, large_n), pick(small, small_n)],
        }
    }

    /// Estimate of the whole channel's Lp error.
    fn lp_error_approx(&self, scale: f32, qmax: f32) -> f64 {
        self.parts
            .iter()
            .map(|(v, weight)| weight * lp_error_approx(v, scale, qmax))
            .sum()
    }
}

/// The reference's search, verbatim: every clip, exact sums, the first least.
fn lp_exhaustive(v: &[f32], qmax: f32, maxabs: f32) -> f32 {
    let mut best = (f64::INFINITY, maxabs / qmax);
    for step in 0..LP_STEPS {
        let s = maxabs * (1.0 - 0.01 * step as f32) / qmax;
        let err = lp_error(v, s, qmax);
        if err < best.0 {
            best = (err, s);
        }
    }
    best.1
}

/// `Σ |w − ŵ|^2.4` of `v` quantized with `scale` (f64 sum of f64 `powf`, in order): the
/// reference's Lp error.
pub fn lp_error(v: &[f32], scale: f32, qmax: f32) -> f64 {
    v.iter()
        .map(|&x| ((x - quantize_value(x, scale, qmax) * scale).abs() as f64).powf(LP_NORM))
        .sum()
}

/// Of `steps` (in increasing order), the one the exhaustive search over them picks: the
/// first with the least [`lp_error`]. The approximate sums bound the exact ones
/// (`|approx − exact| ≤ LP_APPROX_REL·approx + n·LP_APPROX_ABS`), so only the steps whose
/// lower bound does not exceed the best upper bound are summed exactly.
fn certified_argmin(v: &[f32], steps: &[usize], scale: &dyn Fn(usize) -> f32, qmax: f32) -> usize {
    let approx: Vec<f64> = steps
        .iter()
        .map(|&st| lp_error_approx(v, scale(st), qmax))
        .collect();
    let abs = v.len() as f64 * LP_APPROX_ABS;
    let bounds = |a: f64| {
        (
            a * (1.0 - LP_APPROX_REL) - abs,
            a * (1.0 + LP_APPROX_REL) + abs,
        )
    };
    let exhaustive = |cands: &mut dyn Iterator<Item = usize>| {
        let mut best = (f64::INFINITY, steps[0]);
        for st in cands {
            let err = lp_error(v, scale(st), qmax);
            if err < best.0 {
                best = (err, st);
            }
        }
        best.1
    };
    if !approx.iter().all(|a| a.is_finite()) {
        return exhaustive(&mut steps.iter().copied());
    }
    let best_upper = approx
        .iter()
        .map(|&a| bounds(a).1)
        .fold(f64::INFINITY, f64::min);
    let mut open = steps
        .iter()
        .zip(&approx)
        .filter(|(_, &a)| bounds(a).0 <= best_upper)
        .map(|(&st, _)| st)
        .peekable();
    let first = *open.peek().expect("the best is open");
    let open: Vec<usize> = open.collect();
    if open.len() == 1 {
        return first;
    }
    exhaustive(&mut open.into_iter())
}

/// Bound on the relative error of [`lp_error_approx`] against [`lp_error`] (per term,
/// hence per sum of non-negative terms); the measured worst term is below 1e-6
/// (`pow24_approx_is_within_its_bound`).
pub const LP_APPROX_REL: f64 = 1e-5;
/// Bound on the absolute error per term: residuals below 2^-40 count as 0 (their true
/// term is below 2^-96).
const LP_APPROX_ABS: f64 = 1.3e-29; // 2^-96
const LP_TINY: f32 = 9.094947e-13; // 2^-40

/// `Σ |w − ŵ|^2.4` with the same residuals as [`lp_error`] and a vectorised `|d|^2.4`.
fn lp_error_approx(v: &[f32], scale: f32, qmax: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { lp_error_approx_avx512(v, scale, qmax) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { lp_error_approx_avx2(v, scale, qmax) };
        }
    }
    lp_error_approx_body::<{ cfg!(target_arch = "aarch64") }, 8>(v, scale, qmax)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn lp_error_approx_avx2(v: &[f32], scale: f32, qmax: f32) -> f64 {
    lp_error_approx_body::<true, 8>(v, scale, qmax)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn lp_error_approx_avx512(v: &[f32], scale: f32, qmax: f32) -> f64 {
    lp_error_approx_body::<true, 16>(v, scale, qmax)
}

/// The sum in `L` lanes (f32 terms, f64 accumulators), then the lanes in order.
#[inline(always)]
fn lp_error_approx_body<const FMA: bool, const L: usize>(v: &[f32], scale: f32, qmax: f32) -> f64 {
    let mut acc = [0f64; L];
    let chunks = v.chunks_exact(L);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&x| pow24_approx::<FMA>((x - quantize_value(x, scale, qmax) * scale).abs()) as f64)
        .sum();
    for c in chunks {
        let mut t = [0f32; L];
        for l in 0..L {
            let x = c[l];
            t[l] = pow24_approx::<FMA>((x - quantize_value(x, scale, qmax) * scale).abs());
        }
        for l in 0..L {
            acc[l] += t[l] as f64;
        }
    }
    acc.iter().sum::<f64>() + tail
}

#[inline(always)]
fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `d^2.4` for `d ≥ 0`, branch-free, relative error < 1e-6 for `2^-40 ≤ d < 2^40`
/// (0 below): `d² · 2^(2a) · 2^(0.4 r) · m^0.4` with `d = 2^e · m`, `e = 5a + r`, and a
/// degree-7 Chebyshev fit of `m^0.4` on [1, 2).
#[inline(always)]
fn pow24_approx<const FMA: bool>(d: f32) -> f32 {
    const C: [f32; 8] = [
        1.176_079,
        0.313_621_04,
        -0.062_727_42,
        0.022_303_756,
        -0.009_600_963,
        0.004_603_037,
        -0.002_761_592,
        0.001_485_293_7,
    ];
    let bits = d.to_bits();
    let e = ((bits >> 23) & 0xff) as i32 - 127;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    let x = m - 1.5;
    let mut p = C[7];
    for &c in C[..7].iter().rev() {
        p = fmadd::<FMA>(p, x, c);
    }
    let ef = e as f32;
    let a = ((ef + 0.5) * 0.2).floor();
    let r = ef - 5.0 * a;
    let t = if r < 0.5 {
        1.0
    } else if r < 1.5 {
        1.319_508
    } else if r < 2.5 {
        1.741_101_1
    } else if r < 3.5 {
        2.297_396_7
    } else {
        3.031_433
    };
    // 2^(2a) from the bits of 2^23 + (2a + 127) (exact: a small integer), not by a
    // float-to-int cast, which does not vectorise.
    let biased = (2.0 * a + 127.0 + 8_388_608.0).to_bits() - 0x4b00_0000;
    let two_a = f32::from_bits(biased << 23);
    let y = d * d * (two_a * (t * p));
    if d < LP_TINY {
        0.0
    } else {
        y
    }
}

#[cfg(test)]
pub(crate) mod sd15 {
    /// One weight: `n` output channels, `k` inputs per channel, `area` = kernel h·w (1 for
    /// linears, stored [K, N] as MatMul weights: channel axis 1).
    #[derive(Clone, Copy, Debug)]
    pub struct Layer {
        pub n: usize,
        pub k: usize,
        pub area: usize,
        pub conv: bool,
    }

    impl Layer {
        /// The ONNX weight's shape and channel axis: [N, C, kh, kw] (axis 0) for a conv,
        /// [K, N] (axis 1) for a linear.
        pub fn shape_axis(&self) -> (Vec<usize>, usize) {
            if self.conv {
                let side = if self.area == 9 { 3 } else { 1 };
                (vec![self.n, self.k / self.area, side, side], 0)
            } else {
                (vec![self.k, self.n], 1)
            }
        }
    }

    fn conv(n: usize, c: usize, kernel: usize) -> Layer {
        Layer {
            n,
            k: c * kernel * kernel,
            area: kernel * kernel,
            conv: true,
        }
    }
    fn linear(n: usize, k: usize) -> Layer {
        Layer {
            n,
            k,
            area: 1,
            conv: false,
        }
    }
    fn resnet(out: &mut Vec<Layer>, c_in: usize, c: usize) {
        out.push(conv(c, c_in, 3));
        out.push(linear(c, 1280));
        out.push(conv(c, c, 3));
        if c_in != c {
            out.push(conv(c, c_in, 1));
        }
    }
    fn transformer(out: &mut Vec<Layer>, d: usize) {
        out.push(conv(d, d, 1)); // proj_in
        for _ in 0..4 {
            out.push(linear(d, d)); // attn1 q, k, v, out
        }
        out.push(linear(d, d)); // attn2 q
        out.push(linear(d, 768)); // attn2 k
        out.push(linear(d, 768)); // attn2 v
        out.push(linear(d, d)); // attn2 out
        out.push(linear(8 * d, d)); // GEGLU proj
        out.push(linear(d, 4 * d)); // ff out
        out.push(conv(d, d, 1)); // proj_out
    }

    pub fn layers() -> Vec<Layer> {
        let ch = [320, 640, 1280, 1280];
        let mut l = vec![conv(320, 4, 3), linear(1280, 320), linear(1280, 1280)];
        let mut skips = vec![320];
        let mut c_prev = 320;
        for (b, &c) in ch.iter().enumerate() {
            for _ in 0..2 {
                resnet(&mut l, c_prev, c);
                c_prev = c;
                if b < 3 {
                    transformer(&mut l, c);
                }
                skips.push(c);
            }
            if b < 3 {
                l.push(conv(c, c, 3));
                skips.push(c);
            }
        }
        resnet(&mut l, 1280, 1280);
        transformer(&mut l, 1280);
        resnet(&mut l, 1280, 1280);
        for (b, &c) in ch.iter().rev().enumerate() {
            for _ in 0..3 {
                let skip = skips.pop().expect("skip");
                resnet(&mut l, c_prev + skip, c);
                c_prev = c;
                if b > 0 {
                    transformer(&mut l, c);
                }
            }
            if b < 3 {
                l.push(conv(c, c, 3));
            }
        }
        l.push(conv(4, 320, 3));
        l
    }

    #[test]
    fn sd15_has_860m_weights() {
        let l = layers();
        let total: usize = l.iter().map(|x| x.n * x.k).sum();
        let kmax = l.iter().map(|x| x.k).max().unwrap();
        eprintln!("{} layers, {total} weights, max K {kmax}", l.len());
        assert!((850_000_000..870_000_000).contains(&total), "{total}");
        assert_eq!(kmax, 23_040);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics::quant::tests::{process_cpu, thread_cpu};
    use crate::numerics::quant::*;

    #[test]
    fn lp_search_is_never_worse_than_min_max_in_lp_error() {
        // A heavy-tailed channel: clipping the outlier pays off at 4 bits.
        let mut w: Vec<f32> = (0..256).map(|i| ((i as f32) * 0.37).sin() * 0.1).collect();
        w[7] = 1.0;
        let err = |q: &QuantizedWeight| -> f64 {
            w.iter()
                .zip(q.dequantize(&[1, 256]))
                .map(|(a, b)| ((a - b).abs() as f64).powf(LP_NORM))
                .sum()
        };
        let mm = quantize_weight(&w, &[1, 256], 0, 4, RangeSearch::MinMax);
        let lp = quantize_weight(&w, &[1, 256], 0, 4, RangeSearch::Lp);
        assert!(err(&lp) <= err(&mm));
        assert!(lp.scales[0] < mm.scales[0], "the outlier is clipped");
    }

    /// Deterministic test data: normal values with a few outliers (SplitMix64 + Box–Muller).
    fn channel(n: usize, seed: u64, outliers: usize) -> Vec<f32> {
        let mut rng = tfmqc_runtime::rng::SplitMix64::new(seed);
        let mut v: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.02) as f32).collect();
        for _ in 0..outliers {
            let i = rng.below(n);
            v[i] = (rng.normal() * 0.2) as f32;
        }
        v
    }

    #[test]
    fn pow24_approx_is_within_its_bound() {
        let mut worst = 0f64;
        let mut rng = tfmqc_runtime::rng::SplitMix64::new(5);
        let mut check = |d: f32| {
            let exact = (d as f64).powf(LP_NORM);
            let approx = pow24_approx::<false>(d) as f64;
            let fused = {
                #[cfg(target_arch = "x86_64")]
                {
                    if std::is_x86_feature_detected!("fma") {
                        pow24_approx::<true>(d) as f64
                    } else {
                        approx
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    pow24_approx::<true>(d) as f64
                }
            };
            for a in [approx, fused] {
                worst = worst.max((a - exact).abs() / exact);
            }
        };
        // Every exponent of the range, many mantissas each (and the ends of [1, 2)).
        for e in -40..40 {
            let base = 2f32.powi(e);
            for i in 0..4096 {
                check(base * (1.0 + i as f32 / 4096.0));
                check(base * (1.0 + rng.uniform() as f32));
            }
            check(f32::from_bits(base.to_bits() + 0x007f_ffff));
        }
        eprintln!("pow24_approx: worst relative error {worst:.3e}");
        assert!(worst < 1e-6, "{worst}");
        assert!(worst * 10.0 <= LP_APPROX_REL);
        assert_eq!(pow24_approx::<false>(0.0), 0.0);
        assert_eq!(pow24_approx::<false>(1e-20), 0.0);
        assert!(!pow24_approx::<false>(f32::INFINITY).is_finite());
    }

    #[test]
    fn lp_search_matches_the_exhaustive_search_up_to_the_sample_length() {
        let mut lengths = vec![1, 2, 7, 9, 64, 576, 1152, LP_SAMPLE];
        lengths.extend((0..20).map(|i| 3 + i * 97));
        for (i, &n) in lengths.iter().enumerate() {
            for bits in [4, 8] {
                for outliers in [0, 1, 5] {
                    let v = channel(n, 1000 + i as u64 * 7 + outliers as u64, outliers);
                    let qmax = weight_qmax(bits);
                    let maxabs = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                    assert_eq!(
                        lp_channel_scale(&v, qmax).to_bits(),
                        lp_exhaustive(&v, qmax, maxabs).to_bits(),
                        "n {n}, {bits} bits, {outliers} outliers"
                    );
                }
            }
        }
        // Channels with exact ties and values on the grid.
        for v in [
            vec![1.0f32; 33],
            vec![0.5, -0.25, 0.125, 1.0],
            (0..100).map(|i| (i % 15) as f32 - 7.0).collect(),
            vec![0.0, 0.0, 3.0],
            vec![1e-30, -2e-30, 1e-31],
        ] {
            for bits in [4, 8] {
                let qmax = weight_qmax(bits);
                let maxabs = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert_eq!(
                    lp_channel_scale(&v, qmax).to_bits(),
                    lp_exhaustive(&v, qmax, maxabs).to_bits(),
                    "{v:?}"
                );
            }
        }
    }

    #[test]
    fn lp_search_on_long_channels_is_never_worse_than_min_max() {
        for (i, n) in [LP_SAMPLE + 1, 2880, 11_520, 23_040]
            .into_iter()
            .enumerate()
        {
            for bits in [4, 8] {
                for outliers in [0, 3, 40] {
                    let v = channel(n, 77 + i as u64 * 13 + outliers as u64, outliers);
                    let qmax = weight_qmax(bits);
                    let maxabs = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                    let fast = lp_error(&v, lp_channel_scale(&v, qmax), qmax);
                    let minmax = lp_error(&v, maxabs / qmax, qmax);
                    let exhaustive = lp_error(&v, lp_exhaustive(&v, qmax, maxabs), qmax);
                    assert!(fast <= minmax, "n {n}: {fast} > min-max {minmax}");
                    // The subsample finds (nearly) the exhaustive search's clip.
                    assert!(
                        fast <= exhaustive * 1.02,
                        "n {n}, {bits} bits, {outliers} outliers: {fast} vs exhaustive {exhaustive}"
                    );
                }
            }
        }
    }

    /// `quantize_weight` as it was before the fast search (the reference's loop).
    fn reference_quantize_weight(
        w: &[f32],
        shape: &[usize],
        axis: usize,
        bits: u32,
    ) -> QuantizedWeight {
        let channels = shape[axis];
        let inner: usize = shape[axis + 1..].iter().product();
        let outer: usize = shape[..axis].iter().product();
        let qmax = weight_qmax(bits);
        let mut scales = vec![0f32; channels];
        for (c, scale) in scales.iter_mut().enumerate() {
            let mut v = Vec::with_capacity(outer * inner);
            for o in 0..outer {
                let base = (o * channels + c) * inner;
                v.extend_from_slice(&w[base..base + inner]);
            }
            let maxabs = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            if maxabs == 0.0 {
                *scale = 1.0;
                continue;
            }
            let mut best = (f64::INFINITY, maxabs / qmax);
            for step in 0..50 {
                let s = maxabs * (1.0 - 0.01 * step as f32) / qmax;
                let err: f64 = v
                    .iter()
                    .map(|&x| ((x - quantize_value(x, s, qmax) * s).abs() as f64).powf(LP_NORM))
                    .sum();
                if err < best.0 {
                    best = (err, s);
                }
            }
            *scale = best.1;
        }
        let mut values = vec![0i8; w.len()];
        for o in 0..outer {
            for (c, &s) in scales.iter().enumerate() {
                let base = (o * channels + c) * inner;
                for i in base..base + inner {
                    values[i] = quantize_value(w[i], s, qmax) as i8;
                }
            }
        }
        QuantizedWeight {
            values,
            scales,
            axis,
        }
    }

    #[test]
    fn weights_equal_the_reference_search_when_channels_are_short() {
        let mut rng = tfmqc_runtime::rng::SplitMix64::new(11);
        for (shape, axis) in [
            (vec![32usize, 16, 3, 3], 0),
            (vec![128usize, 64], 1),
            (vec![64usize, 128], 0),
            (vec![2usize, 10, 3], 1),
            (vec![16usize, 128, 3, 3], 0),
        ] {
            let n: usize = shape.iter().product();
            let w: Vec<f32> = (0..n)
                .map(|i| (rng.normal() * if i % 97 == 0 { 0.5 } else { 0.05 }) as f32)
                .collect();
            for bits in [4, 6, 8] {
                let r = reference_quantize_weight(&w, &shape, axis, bits);
                for threads in [1, 2] {
                    let q = quantize_weight_with(&w, &shape, axis, bits, RangeSearch::Lp, threads);
                    assert_eq!(q.scales, r.scales, "{shape:?} {bits} bits");
                    assert_eq!(q.values, r.values, "{shape:?} {bits} bits");
                }
            }
        }
    }

    /// Every weight of every model in models/ (both channel axes, 4, 6 and 8 bits) gets
    /// the scales and integers of the reference search. Slow in debug builds: run with
    /// `cargo test --release -p tfmqc-passes --lib every_model_weight -- --ignored`.
    #[test]
    #[ignore]
    fn every_model_weight_equals_the_reference_search() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let mut paths: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "onnx"))
            .collect();
        paths.sort();
        let (mut tensors, mut weights, mut kmax) = (0, 0, 0);
        for path in paths {
            let m = crate::ir::onnx::load(&path).unwrap();
            for (name, t) in &m.graph.initializers {
                if t.dtype != crate::ir::DType::F32 || t.shape.len() < 2 {
                    continue;
                }
                let w = t.to_vec::<f32>().unwrap();
                for axis in [0, 1] {
                    kmax = kmax.max(w.len() / t.shape[axis].max(1));
                    for bits in [4, 6, 8] {
                        let r = reference_quantize_weight(&w, &t.shape, axis, bits);
                        let q = quantize_weight(&w, &t.shape, axis, bits, RangeSearch::Lp);
                        assert_eq!(q.scales, r.scales, "{path:?} {name} axis {axis}");
                        assert_eq!(q.values, r.values, "{path:?} {name} axis {axis}");
                    }
                }
                tensors += 1;
                weights += w.len();
            }
        }
        eprintln!("{tensors} weight tensors, {weights} weights, longest channel {kmax}: identical");
    }

    #[test]
    fn threads_give_the_same_weights_as_one_thread() {
        let mut rng = tfmqc_runtime::rng::SplitMix64::new(3);
        for (shape, axis) in [
            (vec![64usize, 40, 3, 3], 0),
            (vec![300usize, 70], 1),
            (vec![8usize, 3000], 0),
        ] {
            let n: usize = shape.iter().product();
            let w: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            for bits in [4, 8] {
                let one = quantize_weight_with(&w, &shape, axis, bits, RangeSearch::Lp, 1);
                for threads in [2, 3, 8] {
                    let many =
                        quantize_weight_with(&w, &shape, axis, bits, RangeSearch::Lp, threads);
                    assert_eq!(one.values, many.values);
                    assert_eq!(one.scales, many.scales);
                }
            }
        }
    }

    /// Time of the range search over a synthetic SD-1.5 UNet (every weight layer, random
    /// normal weights with outliers), 1 and 2 threads, and the reference's exhaustive
    /// search on a slice of it. `cargo test --release -p tfmqc-passes --lib
    /// bench_lp_search_sd15 -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_lp_search_sd15() {
        let layers = super::sd15::layers();
        let total: usize = layers.iter().map(|l| l.n * l.k).sum();
        let mut rng = tfmqc_runtime::rng::SplitMix64::new(1);
        let (mut t1, mut t2, mut c2) = (0f64, 0f64, 0f64);
        let (mut short_w, mut long_w) = (0usize, 0usize);
        let (mut err_fast, mut err_ref, mut err_mm) = (0f64, 0f64, 0f64);
        let (mut t_ref, mut ref_w) = (0f64, 0usize);
        for (li, l) in layers.iter().enumerate() {
            let (shape, axis) = l.shape_axis();
            let w: Vec<f32> = (0..l.n * l.k)
                .map(|_| {
                    let v = rng.normal() * 0.02;
                    (if rng.below(1000) == 0 { v * 8.0 } else { v }) as f32
                })
                .collect();
            if l.k <= LP_SAMPLE {
                short_w += w.len();
            } else {
                long_w += w.len();
            }
            let t = thread_cpu();
            let a = quantize_weight_with(&w, &shape, axis, 8, RangeSearch::Lp, 1);
            t1 += thread_cpu() - t;
            let (t, c) = (std::time::Instant::now(), process_cpu());
            let b = quantize_weight_with(&w, &shape, axis, 8, RangeSearch::Lp, 2);
            t2 += t.elapsed().as_secs_f64();
            c2 += process_cpu() - c;
            assert_eq!(a.scales, b.scales);
            // The reference on the first 4 channels of every 8th layer (rows of axis 0).
            if li % 8 == 0 {
                let (rows, n, k) = to_rows(&w, &shape, axis);
                let qmax = weight_qmax(8);
                for c in 0..n.min(4) {
                    let v = &rows[c * k..(c + 1) * k];
                    let maxabs = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                    let t = std::time::Instant::now();
                    let s_ref = lp_exhaustive(v, qmax, maxabs);
                    t_ref += t.elapsed().as_secs_f64();
                    ref_w += k;
                    err_ref += lp_error(v, s_ref, qmax);
                    err_fast += lp_error(v, a.scales[c], qmax);
                    err_mm += lp_error(v, maxabs / qmax, qmax);
                }
            }
        }
        let per100m = |t: f64| t * 1e8 / total as f64;
        eprintln!(
            "SD-1.5 synthetic: {} layers, {total} weights ({short_w} in channels ≤ {LP_SAMPLE}, {long_w} longer)",
            layers.len()
        );
        eprintln!(
            "Lp range search, 8 bits: 1 thread {t1:.1} s CPU ({:.2} s per 100M weights); 2 threads {t2:.1} s wall ({:.2} s per 100M), {c2:.1} s CPU",
            per100m(t1),
            per100m(t2)
        );
        eprintln!(
            "reference exhaustive search: {:.1} s per 100M weights (1 thread, {ref_w} weights timed)",
            t_ref * 1e8 / ref_w as f64
        );
        eprintln!(
            "Lp error on the sampled channels: fast / exhaustive = {:.5}, min-max / exhaustive = {:.4}",
            err_fast / err_ref,
            err_mm / err_ref
        );
    }

    #[test]
    #[ignore]
    fn bench_lp_kernels() {
        let v = channel(2048, 1, 3);
        let qmax = weight_qmax(8);
        let t = thread_cpu();
        let mut acc = 0.0;
        let reps = 50_000;
        for r in 0..reps {
            acc += lp_error_approx(&v, 0.001 + r as f32 * 1e-7, qmax);
        }
        let dt = thread_cpu() - t;
        eprintln!(
            "lp_error_approx: {:.3} ns per element ({acc:.3e})",
            dt * 1e9 / (reps * v.len()) as f64
        );
        let t = thread_cpu();
        for _ in 0..200 {
            acc += lp_channel_scale(&v, qmax) as f64;
        }
        let dt = thread_cpu() - t;
        eprintln!(
            "lp_channel_scale (2048): {:.1} ns per element",
            dt * 1e9 / (200 * v.len()) as f64
        );
        let v = channel(11520, 1, 3);
        let t = thread_cpu();
        for _ in 0..200 {
            acc += lp_channel_scale(&v, qmax) as f64;
        }
        let dt = thread_cpu() - t;
        eprintln!(
            "lp_channel_scale (11520): {:.1} ns per element {acc}",
            dt * 1e9 / (200 * v.len()) as f64
        );
    }
}
