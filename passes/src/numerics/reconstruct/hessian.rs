//! The input statistics of one layer, `H = X Xᵀ` (K×K) over its calibration columns, as
//! weight-rounding reconstruction needs them: accumulated from batches of columns (so a
//! caller can stream them while the model runs), held exactly when K is at most the
//! block size, else as the block-diagonal approximation of H (diagonal blocks of at most
//! `block` along K, K·block floats instead of K²).
//!
//! - Exact (one block, K ≤ `block`): f64, accumulated as [`gram`] computes it, so it is
//!   bit for bit the sum of the `gram` of every batch (K = 4,096: 134 MB).
//! - Block-diagonal: each diagonal block `X_b X_bᵀ` in f32 (lower triangle by the f32
//!   kernel of `dense`, with f32 sums over each batch): at K = 23,040 and the default
//!   block of 4,096, 6 blocks of ≤ 3,843 — 354 MB instead of 4.2 GB (f64) or 2.1 GB (f32).
//!   Cross-block correlations are dropped: GPTQ propagates rounding errors only within a
//!   block, and [`output_error`] with such an H is the block-diagonal approximation of the
//!   layer's output error.
//!
//! The default block, 4,096, is the largest whose cost stays small at SD scale (GPTQ of
//! 1280×23,040 in ~10 s CPU, the whole SD-1.5 UNet's GPTQ in a few minutes on 2 cores);
//! smaller blocks cost quality in measurements (results/gptq_blocked.md).
//!
//! [`gram`]: super::gram
//! [`output_error`]: super::output_error

use std::borrow::Cow;

use super::dense::{par_nt_update, Acc};
use super::{add_gram_chunk, gram, mirror_lower, threads_for, GRAM_CHUNK};

/// Default largest diagonal block: H is exact up to K = 4,096 (see the module doc and
/// results/gptq_blocked.md for the choice).
pub const DEFAULT_BLOCK: usize = 4096;

/// How a [`Hessian`] of K inputs is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HessianLayout {
    /// Largest diagonal block: K ≤ `block` keeps H exact.
    pub block: usize,
    /// Block boundaries fall on multiples of `align` (a conv's kh·kw, so that the patch of
    /// one input channel stays in one block); ignored when larger than `block`.
    pub align: usize,
}

impl Default for HessianLayout {
    fn default() -> Self {
        HessianLayout {
            block: DEFAULT_BLOCK,
            align: 1,
        }
    }
}

impl HessianLayout {
    /// Always exact (one K×K block).
    pub fn exact() -> Self {
        HessianLayout {
            block: usize::MAX,
            align: 1,
        }
    }

    /// Blocks of at most `block` (≥ 1), boundaries on multiples of `align`.
    pub fn blocked(block: usize, align: usize) -> Self {
        HessianLayout {
            block: block.max(1),
            align: align.max(1),
        }
    }

    /// The block boundaries along K: `[0, b1, …, k]`, blocks as equal as the alignment
    /// allows, each at most `block`.
    pub fn bounds(&self, k: usize) -> Vec<usize> {
        if k <= self.block {
            return vec![0, k];
        }
        let align = if self.align <= self.block {
            self.align.max(1)
        } else {
            1
        };
        let units = k.div_ceil(align);
        let per_block = self.block / align;
        let blocks = units.div_ceil(per_block);
        let per = units.div_ceil(blocks) * align;
        let mut b: Vec<usize> = (0..blocks).map(|i| (i * per).min(k)).collect();
        b.push(k);
        b.dedup();
        b
    }

    /// Bytes a [`Hessian`] of `k` inputs holds with this layout.
    pub fn bytes(&self, k: usize) -> usize {
        let b = self.bounds(k);
        if b.len() == 2 {
            k * k * 8
        } else {
            b.windows(2).map(|w| (w[1] - w[0]).pow(2) * 4).sum()
        }
    }

    /// Multiply-adds of [`Hessian::accumulate`] per column (the lower triangle of every
    /// block; the exact path computes it in f32 without FMA, the blocked one with).
    pub fn accumulate_fma_per_column(&self, k: usize) -> f64 {
        self.sizes(k).map(|m| (m * (m + 1) / 2) as f64).sum()
    }

    /// Multiply-adds of [`super::gptq`] on an `n`×`k` weight (factorisations and sweep)
    /// and of [`super::never_worse_than_rtn`] after it (two output errors): for time
    /// estimates. Measured (Zen 4, AVX2 kernels): ~15–20 G/s per core.
    pub fn gptq_fma(&self, n: usize, k: usize) -> f64 {
        self.sizes(k)
            .map(|m| {
                let m = m as f64;
                m * m * m / 3.0 + n as f64 * m * m / 2.0 + n as f64 * m * m
            })
            .sum()
    }

    fn sizes(&self, k: usize) -> impl Iterator<Item = usize> {
        let b = self.bounds(k);
        (0..b.len() - 1).map(move |i| b[i + 1] - b[i])
    }

    /// Bytes of the largest transient buffers of [`super::gptq`] and
    /// [`super::output_error`] for a weight of `n` rows over `k` inputs: one block as f64
    /// (the factor), and `n` rows of one block as f64 (twice).
    pub fn work_bytes(&self, n: usize, k: usize) -> usize {
        let m = self
            .bounds(k)
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0);
        8 * (m * m + 2 * n * m)
    }
}

#[derive(Clone, Debug)]
enum Data {
    Exact(Vec<f64>),
    /// Each block row-major m×m; the lower triangle is meaningful.
    Blocked(Vec<Vec<f32>>),
}

/// `H = X Xᵀ` of one layer's inputs (see the module doc).
#[derive(Clone, Debug)]
pub struct Hessian {
    k: usize,
    bounds: Vec<usize>,
    data: Data,
    columns: usize,
}

impl Hessian {
    /// An empty accumulator for `k` inputs.
    pub fn new(k: usize, layout: &HessianLayout) -> Hessian {
        let bounds = layout.bounds(k);
        let data = if bounds.len() <= 2 {
            Data::Exact(vec![0f64; k * k])
        } else {
            Data::Blocked(
                bounds
                    .windows(2)
                    .map(|w| vec![0f32; (w[1] - w[0]).pow(2)])
                    .collect(),
            )
        };
        Hessian {
            k,
            bounds,
            data,
            columns: 0,
        }
    }

    /// The exact H from a Gram matrix (`k`×`k`, e.g. [`gram`]) over `columns` columns.
    pub fn from_gram(h: Vec<f64>, k: usize, columns: usize) -> Hessian {
        assert_eq!(h.len(), k * k);
        Hessian {
            k,
            bounds: vec![0, k],
            data: Data::Exact(h),
            columns,
        }
    }

    /// Adds `X Xᵀ` of the columns `x` ([K, S] row-major, one column per input vector, as
    /// `layer_inputs` makes them).
    pub fn accumulate(&mut self, x: &[f32], s: usize) {
        let k = self.k;
        assert_eq!(x.len(), k * s, "x is not [K, S]");
        if s == 0 || k == 0 {
            return;
        }
        match &mut self.data {
            // One chunk (what layer_inputs gives: ≤ 256 columns a record) is added in
            // place; more are summed first, as `gram` does. Either way the result is, bit
            // for bit, the sum of the `gram` of every batch.
            Data::Exact(h) if s <= GRAM_CHUNK => {
                add_gram_chunk(x, k, s, (0, s), h);
                mirror_lower(h, k);
            }
            Data::Exact(h) => {
                for (a, b) in h.iter_mut().zip(gram(x, k, s)) {
                    *a += b;
                }
            }
            Data::Blocked(blocks) => {
                for (blk, w) in blocks.iter_mut().zip(self.bounds.windows(2)) {
                    let (a, m) = (w[0], w[1] - w[0]);
                    let xb = &x[a * s..(a + m) * s];
                    par_nt_update(
                        blk,
                        m,
                        xb,
                        s,
                        xb,
                        s,
                        (m, m, s),
                        Acc::Add,
                        Some(0),
                        threads_for(m * m * s / 2),
                    );
                }
            }
        }
        self.columns += s;
    }

    /// The block-diagonal approximation of an exact `h` with `layout` (f32 blocks; exact
    /// again if `layout` keeps K in one block): for measuring what the approximation costs.
    pub fn block_diagonal(h: &Hessian, layout: &HessianLayout) -> Hessian {
        let dense = h.dense().expect("an exact Hessian");
        let k = h.k;
        let mut out = Hessian::new(k, layout);
        match &mut out.data {
            Data::Exact(d) => d.copy_from_slice(dense),
            Data::Blocked(blocks) => {
                for (b, w) in blocks.iter_mut().zip(out.bounds.windows(2)) {
                    let (a, m) = (w[0], w[1] - w[0]);
                    for i in 0..m {
                        for j in 0..m {
                            b[i * m + j] = dense[(a + i) * k + a + j] as f32;
                        }
                    }
                }
            }
        }
        out.columns = h.columns;
        out
    }

    /// Adds another accumulator of the same layout (e.g. one filled on another thread).
    pub fn merge(&mut self, other: &Hessian) {
        assert_eq!(self.bounds, other.bounds, "different layouts");
        match (&mut self.data, &other.data) {
            (Data::Exact(a), Data::Exact(b)) => a.iter_mut().zip(b).for_each(|(x, y)| *x += y),
            (Data::Blocked(a), Data::Blocked(b)) => {
                for (x, y) in a.iter_mut().zip(b) {
                    x.iter_mut().zip(y).for_each(|(u, v)| *u += v);
                }
            }
            _ => unreachable!("same bounds, same storage"),
        }
        self.columns += other.columns;
    }

    /// K.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns accumulated so far.
    pub fn columns(&self) -> usize {
        self.columns
    }

    /// True when H is held exactly (one block).
    pub fn is_exact(&self) -> bool {
        matches!(self.data, Data::Exact(_))
    }

    /// The diagonal blocks `[start, end)` along K.
    pub fn blocks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.bounds.windows(2).map(|w| (w[0], w[1]))
    }

    /// The exact H (K×K) when it is held exactly.
    pub fn dense(&self) -> Option<&[f64]> {
        match &self.data {
            Data::Exact(h) => Some(h),
            Data::Blocked(_) => None,
        }
    }

    /// Diagonal block `i` as a full symmetric m×m f64 matrix.
    pub fn block(&self, i: usize) -> Cow<'_, [f64]> {
        match &self.data {
            Data::Exact(h) => Cow::Borrowed(h),
            Data::Blocked(blocks) => {
                let b = &blocks[i];
                let m = self.bounds[i + 1] - self.bounds[i];
                let mut out = vec![0f64; m * m];
                for r in 0..m {
                    for c in 0..=r {
                        let v = b[r * m + c] as f64;
                        out[r * m + c] = v;
                        out[c * m + r] = v;
                    }
                }
                Cow::Owned(out)
            }
        }
    }

    /// Diagonal block `i` of a block-diagonal H as a full symmetric m×m f32 matrix (the
    /// stored values); `None` when H is exact.
    pub fn block_f32(&self, i: usize) -> Option<Vec<f32>> {
        let Data::Blocked(blocks) = &self.data else {
            return None;
        };
        let b = &blocks[i];
        let m = self.bounds[i + 1] - self.bounds[i];
        let mut out = vec![0f32; m * m];
        for r in 0..m {
            for c in 0..=r {
                out[r * m + c] = b[r * m + c];
                out[c * m + r] = b[r * m + c];
            }
        }
        Some(out)
    }

    /// Entry `(r, c)` with `r ≥ c` of diagonal block `i` (lower triangle), as f64.
    #[inline]
    pub(crate) fn lower_entry(&self, i: usize, r: usize, c: usize) -> f64 {
        debug_assert!(r >= c);
        match &self.data {
            Data::Exact(h) => h[r * self.k + c],
            Data::Blocked(blocks) => {
                let m = self.bounds[i + 1] - self.bounds[i];
                blocks[i][r * m + c] as f64
            }
        }
    }

    /// `H_ii` for every input.
    pub fn diag(&self) -> Vec<f64> {
        let mut d = Vec::with_capacity(self.k);
        match &self.data {
            Data::Exact(h) => d.extend((0..self.k).map(|i| h[i * self.k + i])),
            Data::Blocked(blocks) => {
                for (b, w) in blocks.iter().zip(self.bounds.windows(2)) {
                    let m = w[1] - w[0];
                    d.extend((0..m).map(|i| b[i * m + i] as f64));
                }
            }
        }
        d
    }

    /// Every stored entry is finite.
    pub fn is_finite(&self) -> bool {
        match &self.data {
            Data::Exact(h) => h.iter().all(|v| v.is_finite()),
            Data::Blocked(blocks) => blocks.iter().all(|b| b.iter().all(|v| v.is_finite())),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.data {
            Data::Exact(h) => h.len() * 8,
            Data::Blocked(blocks) => blocks.iter().map(|b| b.len() * 4).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tfmqc_runtime::rng::SplitMix64;

    fn columns(k: usize, s: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        let common: Vec<f64> = (0..s).map(|_| rng.normal()).collect();
        (0..k * s)
            .map(|i| (0.5 * common[i % s] + rng.normal() + 0.3) as f32)
            .collect()
    }

    #[test]
    fn bounds_are_aligned_equal_and_within_the_block() {
        let l = HessianLayout::blocked(2048, 9);
        for k in [9, 2048, 2880, 11_520, 23_040, 17_280] {
            let b = l.bounds(k);
            assert_eq!((b[0], *b.last().unwrap()), (0, k));
            for w in b.windows(2) {
                assert!(w[1] > w[0] && w[1] - w[0] <= 2048);
                assert!(w[0] % 9 == 0);
            }
        }
        assert_eq!(l.bounds(23_040).len() - 1, 12);
        assert_eq!(
            HessianLayout::blocked(64, 9).bounds(288),
            vec![0, 63, 126, 189, 252, 288]
        );
        assert_eq!(
            HessianLayout::blocked(100, 1).bounds(250),
            vec![0, 84, 168, 250]
        );
        assert_eq!(HessianLayout::default().bounds(1152), vec![0, 1152]);
        // Memory at SD scale: K = 23,040 in blocks of ≤ 2,048 and ≤ 4,096 (f32).
        let bytes = HessianLayout::blocked(2048, 9).bytes(23_040);
        assert!(bytes < 180_000_000, "{bytes}");
        let bytes = HessianLayout::blocked(DEFAULT_BLOCK, 9).bytes(23_040);
        assert!(bytes < 360_000_000, "{bytes}");
    }

    #[test]
    fn exact_accumulation_is_the_sum_of_grams_bit_for_bit() {
        // Batches of more and of fewer than one f32 chunk (256 columns); K large enough
        // for two threads too.
        for k in [37, 300] {
            let batches = [
                (columns(k, 300, 1), 300),
                (columns(k, 100, 2), 100),
                (columns(k, 256, 3), 256),
            ];
            let mut h = Hessian::new(k, &HessianLayout::default());
            let mut want = vec![0f64; k * k];
            for (x, s) in &batches {
                h.accumulate(x, *s);
                for (a, b) in want.iter_mut().zip(gram(x, k, *s)) {
                    *a += b;
                }
            }
            assert!(h.is_exact());
            assert_eq!(h.dense().unwrap(), &want[..]);
            assert_eq!(h.columns(), 656);
        }
    }

    #[test]
    fn blocks_equal_the_exact_gram_on_the_diagonal() {
        let (k, s) = (300, 700);
        let x = columns(k, s, 3);
        let exact = gram(&x, k, s);
        let mut h = Hessian::new(k, &HessianLayout::blocked(128, 3));
        // In two batches, as a stream would give them.
        let (xa, xb): (Vec<f32>, Vec<f32>) = {
            let (mut a, mut b) = (vec![], vec![]);
            for row in x.chunks(s) {
                a.extend_from_slice(&row[..400]);
                b.extend_from_slice(&row[400..]);
            }
            (a, b)
        };
        h.accumulate(&xa, 400);
        h.accumulate(&xb, 300);
        assert!(!h.is_exact());
        let bounds: Vec<_> = h.blocks().collect();
        assert_eq!(bounds, vec![(0, 102), (102, 204), (204, 300)]);
        let mut worst = 0f64;
        for (bi, &(a, b)) in bounds.iter().enumerate() {
            let m = b - a;
            let blk = h.block(bi);
            for i in 0..m {
                for j in 0..m {
                    let e = exact[(a + i) * k + a + j];
                    worst = worst.max((blk[i * m + j] - e).abs() / e.abs().max(1.0));
                }
            }
        }
        eprintln!("blocked f32 vs exact f64 Gram on the diagonal blocks: worst relative error {worst:.2e}");
        assert!(worst < 1e-5, "{worst}");
        let d = h.diag();
        for i in 0..k {
            assert!((d[i] - exact[i * k + i]).abs() <= 1e-5 * exact[i * k + i]);
        }
        assert_eq!(h.bytes(), (102 * 102 * 2 + 96 * 96) * 4);
        assert_eq!(h.bytes(), HessianLayout::blocked(128, 3).bytes(k));
    }
}
