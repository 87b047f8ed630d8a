//! Quantizer numerics on plain arrays, apart from graph surgery: per-channel weight
//! quantization with an Lp range search, affine activation parameters, SQNR.

/// How a weight channel's range is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeSearch {
    /// max |w| of the channel (plain min-max).
    MinMax,
    /// Shrink max |w| in 1% steps (down to 50%) to minimise Σ|w − ŵ|^p, p = 2.4, as
    /// the reference does.
    Lp,
}

pub const LP_NORM: f64 = 2.4;

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

fn quantize_value(w: f32, scale: f32, qmax: f32) -> f32 {
    (w / scale).round().clamp(-qmax, qmax)
}

/// Quantizes `w` (row-major, `shape`) per channel along `axis`.
pub fn quantize_weight(
    w: &[f32],
    shape: &[usize],
    axis: usize,
    bits: u32,
    search: RangeSearch,
) -> QuantizedWeight {
    let channels = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let outer: usize = shape[..axis].iter().product();
    let qmax = weight_qmax(bits);
    // Gather each channel's elements (strided when axis > 0).
    let channel_values = |c: usize| -> Vec<f32> {
        let mut v = Vec::with_capacity(outer * inner);
        for o in 0..outer {
            let base = (o * channels + c) * inner;
            v.extend_from_slice(&w[base..base + inner]);
        }
        v
    };
    let mut scales = vec![0f32; channels];
    for (c, scale) in scales.iter_mut().enumerate() {
        let v = channel_values(c);
        let maxabs = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        if maxabs == 0.0 {
            *scale = 1.0;
            continue;
        }
        *scale = match search {
            RangeSearch::MinMax => maxabs / qmax,
            RangeSearch::Lp => {
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
                best.1
            }
        };
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
    let (min, max) = (min.min(0.0), max.max(0.0));
    let range = (max - min).max(1e-8);
    let scale = range / 255.0;
    let zp = (-min / scale).round().clamp(0.0, 255.0) as u8;
    (scale, zp)
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

#[cfg(test)]
mod tests {
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
