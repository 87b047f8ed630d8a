//! Quantizer numerics on plain arrays, apart from graph surgery: per-channel weight
//! quantization (its range search in [`super::lp_search`]), affine activation
//! parameters, SQNR, the rows/channels layout of a weight.

/// How a weight channel's range is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeSearch {
    /// max |w| of the channel (plain min-max).
    MinMax,
    /// Shrink max |w| in 1% steps (down to 50%) to minimise Σ|w − ŵ|^p, p = 2.4, as
    /// the reference does.
    Lp,
}

/// Symmetric signed integer range for `bits` (8 → −127..127, 4 → −7..7): symmetric so
/// that zero point 0 and −x ↦ −q hold, as runtimes' int8 weight paths expect.
pub fn weight_qmax(bits: u32) -> f32 {
    ((1i32 << (bits - 1)) - 1) as f32
}

/// A per-channel quantized weight: integers (stored as i8 whatever the bit width) and
/// one scale per channel along `axis`.
#[derive(Clone, Debug)]
pub struct QuantizedWeight {
    pub values: Vec<i8>,
    pub scales: Vec<f32>,
    pub axis: usize,
}

pub(super) fn quantize_value(w: f32, scale: f32, qmax: f32) -> f32 {
    (w / scale).round().clamp(-qmax, qmax)
}

pub use super::lp_search::{
    lp_channel_scale, lp_error, LP_APPROX_REL, LP_NORM, LP_SAMPLE, LP_STEPS,
};

/// Quantizes `w` (row-major, `shape`) per channel along `axis`, on every core (see
/// [`quantize_weight_with`]).
pub fn quantize_weight(
    w: &[f32],
    shape: &[usize],
    axis: usize,
    bits: u32,
    search: RangeSearch,
) -> QuantizedWeight {
    let threads = if w.len() >= 1 << 16 {
        crate::numerics::threads::available().min(8)
    } else {
        1
    };
    quantize_weight_with(w, shape, axis, bits, search, threads)
}

/// [`quantize_weight`] on at most `threads` threads (channels are split between them;
/// the result does not depend on the count).
///
/// With [`RangeSearch::Lp`], each channel's scale minimises `Σ|w − ŵ|^p` over the clips
/// `max|w|·(1 − 0.01·i)`, `i = 0..50` ([`lp_channel_scale`]).
pub fn quantize_weight_with(
    w: &[f32],
    shape: &[usize],
    axis: usize,
    bits: u32,
    search: RangeSearch,
    threads: usize,
) -> QuantizedWeight {
    let channels = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let outer: usize = shape[..axis].iter().product();
    assert_eq!(w.len(), outer * channels * inner);
    let qmax = weight_qmax(bits);
    let mut scales = vec![0f32; channels];
    let len = outer * inner;
    par_chunks(&mut scales, threads, |c0, out| {
        // Channels in groups of G, gathered together: with axis > 0 a channel is strided,
        // and G neighbours share each contiguous run of the weight.
        const G: usize = 32;
        let mut buf = vec![0f32; G.min(out.len()) * len];
        for (gi, group) in out.chunks_mut(G).enumerate() {
            let g0 = c0 + gi * G;
            let g = group.len();
            for o in 0..outer {
                let src = &w[(o * channels + g0) * inner..(o * channels + g0 + g) * inner];
                for (ci, run) in src.chunks(inner.max(1)).enumerate() {
                    buf[ci * len + o * inner..ci * len + (o + 1) * inner].copy_from_slice(run);
                }
            }
            for (ci, scale) in group.iter_mut().enumerate() {
                let v = &buf[ci * len..(ci + 1) * len];
                *scale = match search {
                    RangeSearch::MinMax => {
                        let maxabs = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                        if maxabs == 0.0 {
                            1.0
                        } else {
                            maxabs / qmax
                        }
                    }
                    RangeSearch::Lp => lp_channel_scale(v, qmax),
                };
            }
        }
    });
    let mut values = vec![0i8; w.len()];
    // Blocks of `inner` elements share a scale: block b has channel b % channels.
    let inner1 = inner.max(1);
    let blocks = w.len() / inner1;
    let threads = threads.min(w.len() / (1 << 14)).max(1);
    let per = blocks.div_ceil(threads).max(1);
    std::thread::scope(|sc| {
        for (ti, chunk) in values.chunks_mut(per * inner1).enumerate() {
            let scales = &scales;
            let mut work = move || {
                for (bi, qb) in chunk.chunks_mut(inner1).enumerate() {
                    let b = ti * per + bi;
                    let s = scales[b % channels];
                    for (q, &x) in qb.iter_mut().zip(&w[b * inner1..(b + 1) * inner1]) {
                        *q = quantize_value(x, s, qmax) as i8;
                    }
                }
            };
            if threads == 1 {
                work();
            } else {
                sc.spawn(work);
            }
        }
    });
    QuantizedWeight {
        values,
        scales,
        axis,
    }
}

/// Calls `f(first_index, chunk)` on contiguous chunks of `out`, on up to `threads`
/// threads.
fn par_chunks<T: Send, F: Fn(usize, &mut [T]) + Sync>(out: &mut [T], threads: usize, f: F) {
    let n = out.len();
    if threads <= 1 || n < 2 {
        f(0, out);
        return;
    }
    let per = n.div_ceil(threads.min(n));
    std::thread::scope(|sc| {
        let f = &f;
        for (ci, chunk) in out.chunks_mut(per).enumerate() {
            sc.spawn(move || f(ci * per, chunk));
        }
    });
}

impl QuantizedWeight {
    /// The float weight the quantized one stands for.
    pub fn dequantize(&self, shape: &[usize]) -> Vec<f32> {
        let channels = shape[self.axis];
        let inner: usize = shape[self.axis + 1..].iter().product();
        self.values
            .iter()
            .enumerate()
            .map(|(i, &q)| q as f32 * self.scales[(i / inner) % channels])
            .collect()
    }
}

/// Affine uint8 parameters covering [min, max] (widened to include 0, so that zero is
/// exact — padding and ReLU-like zeros stay zeros).
pub fn act_params_u8(min: f32, max: f32) -> (f32, u8) {
    act_params(min, max, 8)
}

/// Affine parameters of a `bits`-bit unsigned quantizer (levels 0..2^bits − 1, held in
/// a uint8 container) covering [min, max], widened to include 0.
pub fn act_params(min: f32, max: f32, bits: u32) -> (f32, u8) {
    let levels = act_levels(bits);
    let (min, max) = (min.min(0.0), max.max(0.0));
    let range = (max - min).max(1e-8);
    let scale = range / levels;
    let zp = (-min / scale).round().clamp(0.0, levels) as u8;
    (scale, zp)
}

/// The largest level of a `bits`-bit unsigned activation quantizer (8 → 255, 4 → 15).
pub fn act_levels(bits: u32) -> f32 {
    ((1u32 << bits.min(8)) - 1) as f32
}

/// The float interval a `bits`-bit quantizer with `(scale, zp)` represents: what a
/// narrower-than-8-bit activation is clipped to before its uint8 QuantizeLinear (which
/// saturates only at 0 and 255).
pub fn act_clip(scale: f32, zp: u8, bits: u32) -> (f32, f32) {
    (-(zp as f32) * scale, (act_levels(bits) - zp as f32) * scale)
}

/// Simulated uint8 quantization of one value (round half to even, as QuantizeLinear).
pub fn fake_quant_u8(x: f32, scale: f32, zp: u8) -> f32 {
    let q = ((x / scale).round_ties_even() + zp as f32).clamp(0.0, 255.0);
    (q - zp as f32) * scale
}

/// Signal-to-quantization-noise ratio in dB: 10·log10(Σ a² / Σ (a − b)²).
pub fn sqnr_db(reference: &[f32], approx: &[f32]) -> f64 {
    let (mut s, mut n) = (0f64, 0f64);
    for (&a, &b) in reference.iter().zip(approx) {
        s += (a as f64).powi(2);
        n += ((a - b) as f64).powi(2);
    }
    sqnr_from_sums(s, n)
}

pub fn sqnr_from_sums(signal: f64, noise: f64) -> f64 {
    if noise == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (signal / noise).log10()
}

/// The weight layers of a Stable-Diffusion-1.5 UNet (diffusers `UNet2DConditionModel`:
/// block_out_channels 320/640/1280/1280, layers_per_block 2, cross_attention_dim 768),
/// for benchmarks at SD scale on synthetic weights.
/// The weight as rows [N out, K in] (the layout reconstruction works on).
pub fn to_rows(w: &[f32], shape: &[usize], axis: usize) -> (Vec<f32>, usize, usize) {
    let n = shape[axis];
    let k = w.len() / n.max(1);
    if axis == 0 {
        return (w.to_vec(), n, k);
    }
    // [K, N] (Gemm without transB, MatMul): transpose.
    let mut out = vec![0f32; w.len()];
    for i in 0..k {
        for j in 0..n {
            out[j * k + i] = w[i * n + j];
        }
    }
    (out, n, k)
}

/// Back from rows [N, K] to the weight's own layout.
pub fn from_rows(q: &[i8], shape: &[usize], axis: usize) -> Vec<i8> {
    if axis == 0 {
        return q.to_vec();
    }
    let n = shape[axis];
    let k = q.len() / n.max(1);
    let mut out = vec![0i8; q.len()];
    for j in 0..n {
        for i in 0..k {
            out[i * n + j] = q[j * k + i];
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn per_channel_scales_follow_each_channel() {
        // Two output channels (axis 0) of very different magnitude.
        let w = [1.0, -0.5, 0.25, 100.0, -50.0, 25.0];
        let q = quantize_weight(&w, &[2, 3], 0, 8, RangeSearch::MinMax);
        assert_eq!(q.scales, vec![1.0 / 127.0, 100.0 / 127.0]);
        assert_eq!(&q.values[..3], &[127, -64, 32]);
        assert_eq!(&q.values[3..], &[127, -64, 32]);
    }

    #[test]
    fn axis_one_channels_are_columns() {
        let w = [1.0, 10.0, -1.0, -10.0];
        let q = quantize_weight(&w, &[2, 2], 1, 8, RangeSearch::MinMax);
        assert_eq!(q.scales, vec![1.0 / 127.0, 10.0 / 127.0]);
        assert_eq!(q.dequantize(&[2, 2]), vec![1.0, 10.0, -1.0, -10.0]);
    }

    /// CPU time of this thread (s), from /proc (10 ms resolution).
    pub(crate) fn thread_cpu() -> f64 {
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

    /// CPU time of this process (s), from /proc.
    pub(crate) fn process_cpu() -> f64 {
        let st = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
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
    fn four_bit_values_stay_in_range() {
        let w: Vec<f32> = (0..64).map(|i| i as f32 - 32.0).collect();
        let q = quantize_weight(&w, &[4, 16], 0, 4, RangeSearch::Lp);
        assert!(q.values.iter().all(|&v| (-7..=7).contains(&v)));
    }

    #[test]
    fn activation_range_includes_zero_exactly() {
        let (s, zp) = act_params_u8(0.5, 2.0);
        assert_eq!(zp, 0);
        assert_eq!(fake_quant_u8(0.0, s, zp), 0.0);
        let (s, zp) = act_params_u8(-1.0, 3.0);
        assert_eq!(fake_quant_u8(0.0, s, zp), 0.0);
        assert!((fake_quant_u8(3.0, s, zp) - 3.0).abs() <= s / 2.0 + 1e-6);
    }

    #[test]
    fn sqnr_of_known_noise() {
        let a = [1.0f32, -1.0, 1.0, -1.0];
        let b = [1.1f32, -0.9, 1.1, -0.9];
        assert!((sqnr_db(&a, &b) - 20.0).abs() < 1e-4);
        assert_eq!(sqnr_db(&a, &a), f64::INFINITY);
    }
}
