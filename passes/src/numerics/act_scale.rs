//! PAR's activation step sizes reconstructed against the layers' outputs.
//!
//! Calibration sets an activation's scale from its own range (`ema`, or the `mse` clip
//! of the activation itself), never from what the layers reading it compute. In a PAR
//! round the quantized model's own layer inputs X̃ are known next to the float model's
//! X at the same positions, so each activation's step size (per step group, as the file
//! stores them) can be chosen to minimise its readers' output error
//! `Σ_readers ‖W X − Ŵ q_s(X̃)‖²` (TFMQ-DM's reference code learns the step sizes in its
//! block reconstruction, `leaf_param`; one layer's error is cheap enough to search
//! instead). The search is 1-D per step group: the calibrated scale times a clip ratio
//! from [`RATIOS`], the zero point kept (it is shared by the groups in the graph). The
//! ratio 1 (the calibrated scale) is a candidate and is kept on ties, so the chosen
//! scales are never worse than the start on the data they are fitted to.

use crate::numerics::quant::{act_clip, fake_quant_u8};

/// Clip ratios tried: 0.5 … 1.5 of the calibrated scale in steps of 0.05.
pub const RATIOS: [f32; 21] = [
    0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 1.3,
    1.35, 1.4, 1.45, 1.5,
];

/// At most this many columns of a record's chunk enter the search (evenly strided):
/// the search costs N·K·columns per ratio and layer.
pub const MAX_COLUMNS_PER_CHUNK: usize = 64;

/// One record's columns of a layer: the float model's X and the quantized model's X̃
/// (before its activation quantizer), `[K, S]` row-major, and the step group of the
/// record's time step.
pub struct Chunk {
    pub x: Vec<f32>,
    pub xq: Vec<f32>,
    pub columns: usize,
    pub group: usize,
}

/// A layer reading the activation: its float weight rows W and quantized rows Ŵ
/// (`[N, K]`), and its chunks.
pub struct Reader {
    pub w: Vec<f32>,
    pub w_hat: Vec<f32>,
    pub n: usize,
    pub k: usize,
    pub chunks: Vec<Chunk>,
}

/// The output error of every (step group, ratio), summed over the readers' chunks, and
/// the output energy ‖W X‖² per group.
#[derive(Clone, Debug, PartialEq)]
pub struct Search {
    pub errors: Vec<Vec<f64>>,
    pub signal: Vec<f64>,
}

/// The `bits`-bit activation quantizer with `scale`, `zp` (the clip to the narrower
/// grid, then uint8 quantize-dequantize), as the graph computes it.
pub fn fake_quant_bits(x: f32, scale: f32, zp: u8, bits: u32) -> f32 {
    let (lo, hi) = act_clip(scale, zp, bits);
    fake_quant_u8(x.clamp(lo, hi), scale, zp)
}

/// `[K, m]`: the evenly strided columns `cols` of `x` (`[K, s]`).
fn pick_columns(x: &[f32], k: usize, s: usize, cols: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(k * cols.len());
    for r in 0..k {
        let row = &x[r * s..(r + 1) * s];
        out.extend(cols.iter().map(|&c| row[c]));
    }
    out
}

/// `W [N, K] · X [K, m]`, row-major.
fn matmul(w: &[f32], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    let mut y = vec![0f32; n * m];
    for (i, yr) in y.chunks_exact_mut(m).enumerate() {
        let wr = &w[i * k..(i + 1) * k];
        for (j, &wv) in wr.iter().enumerate() {
            if wv == 0.0 {
                continue;
            }
            let xr = &x[j * m..(j + 1) * m];
            for (a, &b) in yr.iter_mut().zip(xr) {
                *a += wv * b;
            }
        }
    }
    y
}

/// The error table of one activation read by `readers`, with the calibrated `scales`
/// (one per step group) and zero point `zp` at `bits`, for every ratio of `ratios`.
/// Deterministic: the threads each take whole ratios and sum in the same order.
pub fn output_errors(
    readers: &[Reader],
    scales: &[f32],
    zp: u8,
    bits: u32,
    ratios: &[f32],
) -> Search {
    let groups = scales.len();
    // Per reader chunk: the sampled X̃ columns and the float output W X on them.
    struct Prepared<'a> {
        w_hat: &'a [f32],
        n: usize,
        k: usize,
        xq: Vec<f32>,
        y: Vec<f32>,
        m: usize,
        group: usize,
    }
    let mut signal = vec![0f64; groups];
    let mut prepared = vec![];
    for r in readers {
        for c in &r.chunks {
            if c.columns == 0 || c.group >= groups {
                continue;
            }
            let m = c.columns.min(MAX_COLUMNS_PER_CHUNK);
            let cols: Vec<usize> = (0..m).map(|i| i * c.columns / m).collect();
            let x = pick_columns(&c.x, r.k, c.columns, &cols);
            let y = matmul(&r.w, r.n, r.k, &x, m);
            signal[c.group] += y.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
            prepared.push(Prepared {
                w_hat: &r.w_hat,
                n: r.n,
                k: r.k,
                xq: pick_columns(&c.xq, r.k, c.columns, &cols),
                y,
                m,
                group: c.group,
            });
        }
    }
    let error_of = |ratio: f32| -> Vec<f64> {
        let mut e = vec![0f64; groups];
        for p in &prepared {
            let s = scales[p.group] * ratio;
            let xq: Vec<f32> =
                p.xq.iter()
                    .map(|&v| fake_quant_bits(v, s, zp, bits))
                    .collect();
            let z = matmul(p.w_hat, p.n, p.k, &xq, p.m);
            e[p.group] +=
                p.y.iter()
                    .zip(&z)
                    .map(|(&a, &b)| ((a - b) as f64).powi(2))
                    .sum::<f64>();
        }
        e
    };
    let threads = crate::numerics::threads::available()
        .min(ratios.len())
        .max(1);
    let mut by_ratio: Vec<Vec<f64>> = vec![vec![]; ratios.len()];
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let error_of = &error_of;
                sc.spawn(move || {
                    (t..ratios.len())
                        .step_by(threads)
                        .map(|i| (i, error_of(ratios[i])))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            for (i, e) in h.join().expect("the error sums do not panic") {
                by_ratio[i] = e;
            }
        }
    });
    Search {
        errors: (0..groups)
            .map(|g| by_ratio.iter().map(|e| e[g]).collect())
            .collect(),
        signal,
    }
}

/// The ratio index chosen per group: each group's least error (`per_group`), or the
/// least error summed over the groups for all of them; `start` (the index of ratio 1)
/// unless another is strictly better. A group without data (no sampled record at its
/// steps) takes the summed choice: its calibrated range is its neighbours' (smoothed
/// groups), and so is the clip that suits them.
pub fn choose(search: &Search, per_group: bool, start: usize) -> Vec<usize> {
    let best = |e: &[f64]| -> usize {
        let mut b = start;
        for (i, &v) in e.iter().enumerate() {
            if v < e[b] {
                b = i;
            }
        }
        b
    };
    if per_group {
        return search.errors.iter().map(|e| best(e)).collect();
    }
    let ratios = search.errors.first().map_or(0, Vec::len);
    let summed: Vec<f64> = (0..ratios)
        .map(|i| search.errors.iter().map(|e| e[i]).sum())
        .collect();
    let b = if summed.is_empty() {
        start
    } else {
        best(&summed)
    };
    vec![b; search.errors.len()]
}

/// The index of ratio 1 in [`RATIOS`].
pub fn start_index() -> usize {
    RATIOS.iter().position(|&r| r == 1.0).expect("1 is a ratio")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An activation with a long tail read by one layer: clipping the tail lowers the
    /// rounding of the bulk, so the search moves off the calibrated (max) scale, never
    /// to a worse error, and gives the same table run twice.
    #[test]
    fn chosen_scales_are_never_worse_and_reproducible() {
        let (k, n, s) = (8usize, 4usize, 96usize);
        let mut state = 12345u64;
        let mut rand = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let x: Vec<f32> = (0..k * s)
            .map(|i| {
                let v = rand();
                if i % 97 == 0 {
                    v * 40.0
                } else {
                    v
                }
            })
            .collect();
        let xq: Vec<f32> = x.iter().map(|&v| v + 0.01 * rand()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rand()).collect();
        let reader = Reader {
            w_hat: w.iter().map(|&v| (v * 8.0).round() / 8.0).collect(),
            w,
            n,
            k,
            chunks: vec![
                Chunk {
                    x: x.clone(),
                    xq: xq.clone(),
                    columns: s,
                    group: 0,
                },
                Chunk {
                    x,
                    xq,
                    columns: s,
                    group: 1,
                },
            ],
        };
        let max = 20.0f32;
        let (scale, zp) = crate::numerics::quant::act_params(-max, max, 4);
        let scales = [scale, scale * 0.6];
        let a = output_errors(std::slice::from_ref(&reader), &scales, zp, 4, &RATIOS);
        let b = output_errors(std::slice::from_ref(&reader), &scales, zp, 4, &RATIOS);
        assert_eq!(a, b, "same data, same table");
        let start = start_index();
        for per_group in [true, false] {
            let picked = choose(&a, per_group, start);
            for (g, &i) in picked.iter().enumerate() {
                assert!(a.errors[g][i] <= a.errors[g][start] || !per_group);
            }
            let total = |idx: &[usize]| -> f64 {
                idx.iter().enumerate().map(|(g, &i)| a.errors[g][i]).sum()
            };
            assert!(total(&picked) <= total(&[start; 2]));
        }
        let picked = choose(&a, true, start);
        assert!(
            RATIOS[picked[0]] < 1.0,
            "the tail is clipped: ratio {}",
            RATIOS[picked[0]]
        );
        assert!(a.signal[0] > 0.0 && a.signal[0] == a.signal[1]);
    }

    #[test]
    fn fake_quant_bits_clips_to_the_narrow_grid() {
        let (s, z) = (0.5f32, 8u8);
        // 4 bits: levels 0..15, values (q − 8) · 0.5 in [−4, 3.5].
        assert_eq!(fake_quant_bits(10.0, s, z, 4), 3.5);
        assert_eq!(fake_quant_bits(-10.0, s, z, 4), -4.0);
        assert_eq!(fake_quant_bits(1.2, s, z, 4), 1.0);
    }
}
