//! The inputs each weight layer sees, for weight-rounding reconstruction (GPTQ,
//! AdaRound), which minimises ||Ŵ X − W X||² against them. For a Conv, X's columns are
//! the im2col patches.
//!
//! Columns are sampled while calibration runs the float model ([`LayerColumns::observe`],
//! called by calibrate's observer as each layer input is computed) and spilled to a
//! temporary file, so that memory holds neither every activation of a run nor every
//! layer's statistics; reconstruction then reads one layer's columns at a time into its
//! [`Hessian`] ([`LayerColumns::gram`]: exact, or block-diagonal for large K). For an
//! SD-class UNet (K up to 23,040 per layer, hundreds of layers) the K×K Gram matrices of
//! all layers at once would need tens of GB.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;

use crate::analysis::targets::Target;
use crate::error::{Error, Result};
use crate::ir::Model;
use crate::numerics::reconstruct::{Hessian, HessianLayout};

/// At most this many records (spread over the steps) and columns per record: H is an
/// average, and K² work per column adds up.
pub const MAX_RECORDS: usize = 16;
pub const MAX_COLUMNS: usize = 256;
/// Bytes the spilled columns of all layers may take on disk; past it, fewer columns are
/// kept per record (stated in the calibrate pass's notes).
pub const SPILL_BUDGET: u64 = 6 << 30;

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

/// One layer reconstruction can handle.
#[derive(Clone, Debug)]
pub struct LayerInput {
    /// The layer's node.
    pub node: String,
    /// Its activation input.
    pub value: String,
    pub k: usize,
    pub unfold: Unfold,
}

/// The layers reconstruction handles among `targets` (Conv with one group, Gemm without
/// transA, 2-D MatMul weights) and how their inputs unfold.
pub fn reconstructable_layers(model: &Model, targets: &[Target]) -> Vec<LayerInput> {
    let g = &model.graph;
    let by_name: HashMap<&str, _> = g
        .node_indices()
        .map(|ix| (g.node(ix).name.as_str(), ix))
        .collect();
    let mut layers = vec![];
    for t in targets {
        let (Some(w), Some(a)) = (&t.weight, t.activations.first()) else {
            continue;
        };
        let Some(&ix) = by_name.get(t.node.as_str()) else {
            continue;
        };
        let n = g.node(ix);
        let Some(weight) = g.initializers.get(&w.name) else {
            continue;
        };
        let shape = &weight.shape;
        let ints = |name: &str, d: Vec<usize>| -> Vec<usize> {
            n.attr_ints(name)
                .map(|v| v.iter().map(|&x| x as usize).collect())
                .unwrap_or(d)
        };
        let unfold = match t.op.as_str() {
            "Conv"
                if shape.len() == 4
                    && n.attr_int("group").unwrap_or(1) == 1
                    && n.attr("auto_pad").is_none_or(|a| a.s == b"NOTSET") =>
            {
                let p = ints("pads", vec![0; 4]);
                let (s, d) = (ints("strides", vec![1, 1]), ints("dilations", vec![1, 1]));
                Unfold::Conv {
                    kernel: [shape[2], shape[3]],
                    strides: [s[0], s[1]],
                    pads: [p[0], p[1], p[2], p[3]],
                    dilations: [d[0], d[1]],
                }
            }
            "Gemm" if n.attr_int("transA").unwrap_or(0) == 0 => Unfold::Rows,
            "MatMul" if shape.len() == 2 => Unfold::Rows,
            _ => continue,
        };
        let k = shape.iter().product::<usize>() / shape[w.axis].max(1);
        layers.push(LayerInput {
            node: t.node.clone(),
            value: a.clone(),
            k,
            unfold,
        });
    }
    layers
}

/// Which of `n` records (in order) reconstruction samples: at most `MAX_RECORDS`, evenly
/// spread; `Some(salt)` for a picked record (its index among the picks).
pub fn record_picks(n: usize) -> Vec<Option<u64>> {
    let mut picks = vec![None; n];
    if n <= MAX_RECORDS {
        for (i, p) in picks.iter_mut().enumerate() {
            *p = Some(i as u64);
        }
    } else {
        for i in 0..MAX_RECORDS {
            picks[i * (n - 1) / (MAX_RECORDS - 1)] = Some(i as u64);
        }
    }
    picks
}

/// Sampled input columns of every reconstructable layer, spilled to an unnamed temporary
/// file (removed when dropped) as calibration observes them.
pub struct LayerColumns {
    layers: Vec<LayerInput>,
    /// Layers reading each value.
    by_value: HashMap<String, Vec<usize>>,
    /// Columns kept per record and layer (MAX_COLUMNS unless the spill budget says less).
    columns_per_record: usize,
    spill: Mutex<Spill>,
}

struct Spill {
    out: std::io::BufWriter<std::fs::File>,
    written: u64,
    /// Per layer: where each record's chunk (a `[K, S]` row-major block) was spilled.
    chunks: Vec<Vec<ChunkAt>>,
}

/// (offset, columns S, time step) of one spilled chunk.
type ChunkAt = (u64, usize, i64);

/// One record's columns of a layer in two stores ([`LayerColumns::paired_chunks`]):
/// the float model's X and the quantized model's X̃, each `[K, columns]` row-major.
pub struct PairedChunk {
    pub x: Vec<f32>,
    pub xq: Vec<f32>,
    pub columns: usize,
    /// The record's time step.
    pub t: i64,
}

impl std::fmt::Debug for LayerColumns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LayerColumns({} layers, {} columns per record, {} bytes spilled)",
            self.layers.len(),
            self.columns_per_record,
            self.spilled_bytes()
        )
    }
}

impl LayerColumns {
    /// An empty store for `layers`, sized for `records` picked records.
    pub fn new(layers: Vec<LayerInput>, records: usize) -> Result<LayerColumns> {
        let k_total: u64 = layers.iter().map(|l| l.k as u64).sum();
        let per_column = (records.max(1) as u64) * k_total * 4;
        let columns_per_record =
            (SPILL_BUDGET / per_column.max(1)).clamp(16, MAX_COLUMNS as u64) as usize;
        let file = tempfile::tempfile().map_err(|e| {
            Error::pass(
                "calibrate",
                format!("cannot create a temporary file for the layer inputs (TMPDIR): {e}"),
            )
        })?;
        let mut by_value: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, l) in layers.iter().enumerate() {
            by_value.entry(l.value.clone()).or_default().push(i);
        }
        Ok(LayerColumns {
            spill: Mutex::new(Spill {
                out: std::io::BufWriter::with_capacity(1 << 20, file),
                written: 0,
                chunks: vec![vec![]; layers.len()],
            }),
            layers,
            by_value,
            columns_per_record,
        })
    }

    pub fn layers(&self) -> &[LayerInput] {
        &self.layers
    }

    /// Columns kept per record and layer.
    pub fn columns_per_record(&self) -> usize {
        self.columns_per_record
    }

    /// The values whose columns are wanted.
    pub fn values(&self) -> impl Iterator<Item = &str> {
        self.by_value.keys().map(String::as_str)
    }

    pub fn spilled_bytes(&self) -> u64 {
        self.spill.lock().map(|s| s.written).unwrap_or(0)
    }

    /// Samples columns of `value` (shape `shape`, f32 `data`) for every layer reading it
    /// and spills them. `salt`: the record's index among the picks (varies the sampled
    /// positions from record to record); `t`: the record's time step (which step group's
    /// activation scale quantizes these columns, for PAR's scale reconstruction).
    pub fn observe(
        &self,
        value: &str,
        shape: &[usize],
        data: &[f32],
        salt: u64,
        t: i64,
    ) -> Result<()> {
        let Some(layers) = self.by_value.get(value) else {
            return Ok(());
        };
        for &li in layers {
            let layer = &self.layers[li];
            let (x, s) = columns(shape, data, layer, salt, self.columns_per_record);
            if s == 0 {
                continue;
            }
            let mut spill = self.spill.lock().expect("no panics while holding it");
            let offset = spill.written;
            let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
            spill.out.write_all(&bytes).map_err(|e| {
                Error::pass(
                    "calibrate",
                    format!("writing layer inputs to the temporary file: {e}"),
                )
            })?;
            spill.written += bytes.len() as u64;
            spill.chunks[li].push((offset, s, t));
        }
        Ok(())
    }

    /// The Gram matrix H = Σ X Xᵀ of layer `li` over its spilled chunks, in the order they
    /// were observed, held as `layout` says (with its column count). Reads one layer's
    /// columns only.
    pub fn gram(&self, li: usize, layout: &HessianLayout) -> Result<Hessian> {
        let k = self.layers[li].k;
        let mut spill = self.spill.lock().expect("no panics while holding it");
        spill.out.flush().map_err(spill_io)?;
        let mut acc = Hessian::new(k, layout);
        for &(offset, s, _) in &spill.chunks[li] {
            let x = read_chunk(&spill, offset, k * s)?;
            acc.accumulate(&x, s);
        }
        Ok(acc)
    }

    /// PAR's aligned reconstruction of layer `li`: `quant` holds the quantized model's
    /// inputs of the same layers (same order) sampled at the same positions of the same
    /// runs, before their activation quantizer; `fq` quantizes one chunk of them in place
    /// (given its time step) as this round's quantizer will. Returns the exact
    /// `H̃ = X̃ X̃ᵀ` and `C = X X̃ᵀ` (K×K) with this store's X and the quantized X̃.
    /// `None` when `quant` did not sample that layer at every chunk this store did.
    pub fn aligned(
        &self,
        li: usize,
        quant: &LayerColumns,
        fq: &dyn Fn(i64, &mut [f32]),
    ) -> Result<Option<(Hessian, Vec<f64>)>> {
        let k = self.layers[li].k;
        let Some(pairs) = self.paired_chunks(li, quant)? else {
            return Ok(None);
        };
        let mut h = Hessian::new(k, &HessianLayout::exact());
        let mut c = vec![0f64; k * k];
        for mut p in pairs {
            fq(p.t, &mut p.xq);
            h.accumulate(&p.xq, p.columns);
            crate::numerics::reconstruct::add_cross_gram(&p.x, &p.xq, k, p.columns, &mut c);
        }
        Ok(Some((h, c)))
    }

    /// Layer `li`'s chunks from this store and `quant` (the quantized model's inputs of
    /// the same layers at the same positions), one per record; `None` when `quant` did
    /// not sample that layer at every chunk this store did.
    pub fn paired_chunks(
        &self,
        li: usize,
        quant: &LayerColumns,
    ) -> Result<Option<Vec<PairedChunk>>> {
        let k = self.layers[li].k;
        let (mut a, mut b) = (
            self.spill.lock().expect("no panics while holding it"),
            quant.spill.lock().expect("no panics while holding it"),
        );
        let pairs: Vec<(ChunkAt, ChunkAt)> = match b.chunks.get(li) {
            Some(xb)
                if quant.layers.get(li).is_some_and(|l| l.k == k)
                    && !a.chunks[li].is_empty()
                    && a.chunks[li].len() == xb.len()
                    && a.chunks[li]
                        .iter()
                        .zip(xb)
                        .all(|(p, q)| p.1 == q.1 && p.2 == q.2) =>
            {
                a.chunks[li]
                    .iter()
                    .copied()
                    .zip(xb.iter().copied())
                    .collect()
            }
            _ => return Ok(None),
        };
        a.out.flush().map_err(spill_io)?;
        b.out.flush().map_err(spill_io)?;
        pairs
            .into_iter()
            .map(|((oa, s, t), (ob, _, _))| {
                Ok(PairedChunk {
                    x: read_chunk(&a, oa, k * s)?,
                    xq: read_chunk(&b, ob, k * s)?,
                    columns: s,
                    t,
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

fn spill_io(e: std::io::Error) -> Error {
    Error::pass(
        "quantize",
        format!("reading layer inputs from the temporary file: {e}"),
    )
}

/// `len` f32 values spilled at `offset` (the writer flushed).
fn read_chunk(spill: &Spill, offset: u64, len: usize) -> Result<Vec<f32>> {
    use std::os::unix::fs::FileExt;
    let mut bytes = vec![0u8; len * 4];
    spill
        .out
        .get_ref()
        .read_exact_at(&mut bytes, offset)
        .map_err(spill_io)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// X [K, S] for one record, at most `max_columns` columns (evenly strided).
fn columns(
    shape: &[usize],
    v: &[f32],
    layer: &LayerInput,
    salt: u64,
    max_columns: usize,
) -> (Vec<f32>, usize) {
    let k = layer.k;
    let cols: Vec<Vec<f32>> = match &layer.unfold {
        Unfold::Rows => {
            let rows = v.len() / k.max(1);
            pick(rows, salt, max_columns)
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
            let [b, c, h, w] = match shape {
                [b, c, h, w] => [*b, *c, *h, *w],
                _ => return (vec![], 0),
            };
            let oh = (h + pads[0] + pads[2]).saturating_sub(dilations[0] * (kernel[0] - 1) + 1)
                / strides[0]
                + 1;
            let ow = (w + pads[1] + pads[3]).saturating_sub(dilations[1] * (kernel[1] - 1) + 1)
                / strides[1]
                + 1;
            pick(b * oh * ow, salt, max_columns)
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
    (x, s)
}

/// Up to `max` of `n` positions, evenly strided with a per-record offset.
fn pick(n: usize, salt: u64, max: usize) -> Vec<usize> {
    if n <= max {
        return (0..n).collect();
    }
    let stride = n / max;
    let offset = (salt as usize) % stride.max(1);
    (0..max).map(|i| i * stride + offset).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics::reconstruct::gram;

    fn rows_layer(k: usize) -> LayerInput {
        LayerInput {
            node: "n".into(),
            value: "x".into(),
            k,
            unfold: Unfold::Rows,
        }
    }

    #[test]
    fn spilled_columns_give_the_gram_of_all_records() {
        let store = LayerColumns::new(vec![rows_layer(3)], 2).unwrap();
        let a: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
        let b: Vec<f32> = (0..6).map(|i| (i as f32).sin()).collect();
        store.observe("x", &[4, 3], &a, 0, 0).unwrap();
        store.observe("x", &[2, 3], &b, 1, 0).unwrap();
        store
            .observe("not-a-layer-input", &[2, 3], &b, 1, 0)
            .unwrap();
        let h = store.gram(0, &HessianLayout::exact()).unwrap();
        assert_eq!(h.columns(), 6);
        let (xa, sa) = columns(&[4, 3], &a, &rows_layer(3), 0, MAX_COLUMNS);
        let (xb, sb) = columns(&[2, 3], &b, &rows_layer(3), 1, MAX_COLUMNS);
        let want: Vec<f64> = gram(&xa, 3, sa)
            .iter()
            .zip(gram(&xb, 3, sb))
            .map(|(p, q)| p + q)
            .collect();
        assert_eq!(
            h.dense().unwrap(),
            want,
            "bit for bit: same chunks, same order"
        );
        assert_eq!(store.spilled_bytes(), 6 * 3 * 4);
    }

    #[test]
    fn picks_spread_over_the_records() {
        assert_eq!(record_picks(3), vec![Some(0), Some(1), Some(2)]);
        let p = record_picks(100);
        assert_eq!(p.iter().flatten().count(), MAX_RECORDS);
        assert_eq!(p[0], Some(0));
        assert_eq!(p[99], Some(MAX_RECORDS as u64 - 1));
    }
}
