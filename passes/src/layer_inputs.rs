//! The inputs each weight layer sees, as Gram matrices H = X Xᵀ over the calibration
//! records (a [`Hessian`] per layer, exact or block-diagonal as its layout says): what
//! weight-rounding reconstruction (GPTQ, AdaRound) minimises ||Ŵ X − W X||² against. For a
//! Conv, X's columns are the im2col patches.

use std::collections::HashMap;

use tfmqc_runtime::engine::Optimize;

use crate::calibrate::Calibration;
use crate::error::Result;
use crate::exec::Runner;
use crate::ir::{Model, Tensor};
use crate::reconstruct::{Hessian, HessianLayout};

/// At most this many records (spread over the steps) and columns per record: H is an
/// average, and K² work per column adds up.
const MAX_RECORDS: usize = 16;
const MAX_COLUMNS: usize = 256;

/// How to turn a layer's input tensor into columns of length K.
#[derive(Clone, Debug)]
pub enum Unfold {
    /// Rows of the last axis (Gemm, MatMul): K = last dim.
    Rows,
    /// im2col of NCHW input for a (group = 1) 2-D conv.
    Conv {
        kernel: [usize; 2],
        strides: [usize; 2],
        pads: [usize; 4],
        dilations: [usize; 2],
    },
}

pub struct LayerInput {
    pub value: String,
    pub k: usize,
    pub unfold: Unfold,
    /// How its [`Hessian`] is held (exact, or block-diagonal for large K).
    pub layout: HessianLayout,
}

/// The Gram matrix H of each layer (with its column count), in the order of `layers`.
pub fn collect_grams(
    model: &Model,
    cal: &Calibration,
    layers: &[LayerInput],
) -> Result<Vec<Hessian>> {
    let mut names: Vec<String> = layers.iter().map(|l| l.value.clone()).collect();
    names.sort();
    names.dedup();
    let runner = Runner::new(model, Some(&names), Optimize::Full)?;
    let index: HashMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let mut grams: Vec<Hessian> = layers
        .iter()
        .map(|l| Hessian::new(l.k, &l.layout))
        .collect();
    let n = cal.records.len();
    let picks: Vec<usize> = if n <= MAX_RECORDS {
        (0..n).collect()
    } else {
        (0..MAX_RECORDS)
            .map(|i| i * (n - 1) / (MAX_RECORDS - 1))
            .collect()
    };
    for (pick, &r) in picks.iter().enumerate() {
        let outs = runner.run(&cal.records[r].clone().into_iter().collect())?;
        for (layer, acc) in layers.iter().zip(grams.iter_mut()) {
            let t = &outs[index[layer.value.as_str()]];
            let (x, s) = columns(t, layer, pick as u64)?;
            if s == 0 {
                continue;
            }
            acc.accumulate(&x, s);
        }
    }
    Ok(grams)
}

/// X [K, S] for one record, at most MAX_COLUMNS columns (evenly strided).
fn columns(t: &Tensor, layer: &LayerInput, salt: u64) -> Result<(Vec<f32>, usize)> {
    let v = t.to_f32_vec()?;
    let k = layer.k;
    let cols: Vec<Vec<f32>> = match &layer.unfold {
        Unfold::Rows => {
            let rows = v.len() / k.max(1);
            pick(rows, salt)
                .into_iter()
                .map(|r| v[r * k..(r + 1) * k].to_vec())
                .collect()
        }
        Unfold::Conv {
            kernel,
            strides,
            pads,
            dilations,
        } => {
            let [b, c, h, w] = match t.shape.as_slice() {
                [b, c, h, w] => [*b, *c, *h, *w],
                _ => return Ok((vec![], 0)),
            };
            let oh = (h + pads[0] + pads[2]).saturating_sub(dilations[0] * (kernel[0] - 1) + 1)
                / strides[0]
                + 1;
            let ow = (w + pads[1] + pads[3]).saturating_sub(dilations[1] * (kernel[1] - 1) + 1)
                / strides[1]
                + 1;
            pick(b * oh * ow, salt)
                .into_iter()
                .map(|p| {
                    let (bi, y, x) = (p / (oh * ow), (p / ow) % oh, p % ow);
                    let mut col = Vec::with_capacity(k);
                    for ci in 0..c {
                        for ky in 0..kernel[0] {
                            for kx in 0..kernel[1] {
                                let iy = (y * strides[0] + ky * dilations[0]) as isize
                                    - pads[0] as isize;
                                let ix = (x * strides[1] + kx * dilations[1]) as isize
                                    - pads[1] as isize;
                                let inside =
                                    iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w;
                                col.push(if inside {
                                    v[((bi * c + ci) * h + iy as usize) * w + ix as usize]
                                } else {
                                    0.0
                                });
                            }
                        }
                    }
                    col
                })
                .collect()
        }
    };
    let s = cols.len();
    // Row-major [K, S].
    let mut x = vec![0f32; k * s];
    for (j, col) in cols.iter().enumerate() {
        for (i, &val) in col.iter().enumerate().take(k) {
            x[i * s + j] = val;
        }
    }
    Ok((x, s))
}

/// Up to MAX_COLUMNS of `n` positions, evenly strided with a per-record offset.
fn pick(n: usize, salt: u64) -> Vec<usize> {
    if n <= MAX_COLUMNS {
        return (0..n).collect();
    }
    let stride = n / MAX_COLUMNS;
    let offset = (salt as usize) % stride.max(1);
    (0..MAX_COLUMNS).map(|i| i * stride + offset).collect()
}
