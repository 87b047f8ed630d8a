//! The TIB as a small differentiable network on plain arrays (no graph code): what TIAR
//! optimises. Every value is a matrix with one row per time step (`rows` × `width`, the
//! value's per-sample data flattened); constants have one row and broadcast.
//!
//! The ops are the ones that appear after the first linear layer of the TIBs in models/:
//! linear (Gemm / MatMul, with its input fake-quantized to uint8 when an activation scale
//! is set), Sigmoid, Mul/Add/Sub (SiLU is `x · σ(x)`), per-row Concat, and the ops that
//! only reshape (Reshape, Unsqueeze, Squeeze, Flatten, Identity, Cast f32→f32). Their
//! gradients are written out by hand in [`TibNet::backward`]; the fake quantization of
//! activations passes the gradient straight through inside its range (STE) and stops it
//! where the value is clipped.

use crate::numerics::quant::fake_quant_u8;

/// A row-major matrix; `rows == 1` broadcasts over rows and `width == 1` over columns.
#[derive(Clone, Debug, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl Mat {
    pub fn new(rows: usize, width: usize, data: Vec<f32>) -> Mat {
        assert_eq!(data.len(), rows * width, "matrix {rows}×{width}");
        Mat { rows, width, data }
    }

    pub fn zeros(rows: usize, width: usize) -> Mat {
        Mat::new(rows, width, vec![0.0; rows * width])
    }

    /// The rows `rows` of `self` (a constant row is returned as it is).
    pub fn select(&self, rows: &[usize]) -> Mat {
        if self.rows == 1 {
            return self.clone();
        }
        let mut data = Vec::with_capacity(rows.len() * self.width);
        for &r in rows {
            data.extend_from_slice(&self.data[r * self.width..(r + 1) * self.width]);
        }
        Mat::new(rows.len(), self.width, data)
    }

    pub fn row(&self, r: usize) -> &[f32] {
        let r = if self.rows == 1 { 0 } else { r };
        &self.data[r * self.width..(r + 1) * self.width]
    }

    #[inline]
    fn at(&self, r: usize, c: usize) -> f32 {
        let r = if self.rows == 1 { 0 } else { r };
        let c = if self.width == 1 { 0 } else { c };
        self.data[r * self.width + c]
    }
}

/// One quantized linear layer `y = α · x̂ Ŵᵀ + b`, `x̂` the input after its activation
/// fake-quantization (if any).
#[derive(Clone, Debug)]
pub struct Layer {
    /// The graph node.
    pub node: String,
    /// Output and input features.
    pub n: usize,
    pub k: usize,
    /// Float weight as rows [N, K].
    pub w: Vec<f32>,
    /// Per-row weight scales (symmetric, zero point 0).
    pub scales: Vec<f32>,
    /// Bias (already times Gemm's β), width N.
    pub bias: Option<Vec<f32>>,
    pub alpha: f32,
    /// uint8 (scale, zero point) of the input, or `None` to leave it in float.
    pub act: Option<(f32, u8)>,
}

/// One op over value slots.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Linear {
        x: usize,
        y: usize,
        layer: usize,
    },
    Sigmoid {
        x: usize,
        y: usize,
    },
    Mul {
        a: usize,
        b: usize,
        y: usize,
    },
    Add {
        a: usize,
        b: usize,
        y: usize,
    },
    Sub {
        a: usize,
        b: usize,
        y: usize,
    },
    /// Per-row concatenation in this order.
    Concat {
        xs: Vec<usize>,
        y: usize,
    },
    /// The data unchanged (reshapes; a cast to the same type).
    Copy {
        x: usize,
        y: usize,
    },
}

/// The network: `given` values (constants and the float values computed before the first
/// linear layer, one row per time step of S), then `ops` in order.
#[derive(Clone, Debug)]
pub struct TibNet {
    pub slots: usize,
    pub given: Vec<(usize, Mat)>,
    pub ops: Vec<Op>,
    pub layers: Vec<Layer>,
    /// The frontier values, in frontier order.
    pub outputs: Vec<usize>,
    /// Row count of the given tables (|S|).
    pub steps: usize,
}

/// Values of one forward pass (slot → matrix; `None` for slots not computed).
pub type Values = Vec<Option<Mat>>;

fn fake_quant(x: &Mat, act: Option<(f32, u8)>) -> Mat {
    match act {
        None => x.clone(),
        Some((s, z)) => Mat::new(
            x.rows,
            x.width,
            x.data.iter().map(|&v| fake_quant_u8(v, s, z)).collect(),
        ),
    }
}

/// Whether the STE passes the gradient at `v` (inside the quantizer's range).
#[inline]
fn ste_pass(v: f32, act: Option<(f32, u8)>) -> bool {
    match act {
        None => true,
        Some((s, z)) => {
            let lo = -(z as f32) * s;
            let hi = (255.0 - z as f32) * s;
            v >= lo && v <= hi
        }
    }
}

fn broadcast_shape(a: &Mat, b: &Mat) -> (usize, usize) {
    (a.rows.max(b.rows), a.width.max(b.width))
}

/// Adds `g` (rows × width of the op's output) into `acc`, summing over broadcast axes.
fn accumulate(acc: &mut Mat, g: &Mat, scale: impl Fn(usize, usize) -> f32) {
    for r in 0..g.rows {
        for c in 0..g.width {
            let ar = if acc.rows == 1 { 0 } else { r };
            let ac = if acc.width == 1 { 0 } else { c };
            acc.data[ar * acc.width + ac] += g.data[r * g.width + c] * scale(r, c);
        }
    }
}

impl TibNet {
    /// Checks that every op's operands fit (widths, rows, layer sizes); the builder calls
    /// it so that a mismatch is an error naming the op rather than a panic later.
    pub fn check(&self) -> Result<(), String> {
        let mut shape: Vec<Option<(usize, usize)>> = vec![None; self.slots];
        for (s, m) in &self.given {
            shape[*s] = Some((m.rows, m.width));
        }
        let get = |shape: &[Option<(usize, usize)>], s: usize| {
            shape[s].ok_or_else(|| format!("value slot {s} is read before it is computed"))
        };
        let fits = |a: usize, b: usize| a == b || a == 1 || b == 1;
        for op in &self.ops {
            match op {
                Op::Linear { x, y, layer } => {
                    let (r, w) = get(&shape, *x)?;
                    let l = &self.layers[*layer];
                    if w != l.k {
                        return Err(format!(
                            "{}: input has {w} features per step, the weight {}",
                            l.node, l.k
                        ));
                    }
                    shape[*y] = Some((r, l.n));
                }
                Op::Sigmoid { x, y } | Op::Copy { x, y } => shape[*y] = Some(get(&shape, *x)?),
                Op::Mul { a, b, y } | Op::Add { a, b, y } | Op::Sub { a, b, y } => {
                    let (ra, wa) = get(&shape, *a)?;
                    let (rb, wb) = get(&shape, *b)?;
                    if !fits(ra, rb) || !fits(wa, wb) {
                        return Err(format!(
                            "elementwise operands {ra}×{wa} and {rb}×{wb} do not broadcast"
                        ));
                    }
                    shape[*y] = Some((ra.max(rb), wa.max(wb)));
                }
                Op::Concat { xs, y } => {
                    let mut rows = 1;
                    let mut width = 0;
                    for x in xs {
                        let (r, w) = get(&shape, *x)?;
                        rows = rows.max(r);
                        width += w;
                    }
                    shape[*y] = Some((rows, width));
                }
            }
        }
        for &o in &self.outputs {
            get(&shape, o)?;
        }
        Ok(())
    }

    /// Forward pass over the time steps `rows` (indices into S) with layer weights
    /// `weights` ([N, K] rows each).
    pub fn forward(&self, weights: &[Vec<f32>], rows: &[usize]) -> Values {
        let mut v: Values = vec![None; self.slots];
        for (s, m) in &self.given {
            v[*s] = Some(m.select(rows));
        }
        for op in &self.ops {
            let (y, out) = match op {
                Op::Linear { x, y, layer } => {
                    let l = &self.layers[*layer];
                    let xq = fake_quant(v[*x].as_ref().expect("checked"), l.act);
                    let w = &weights[*layer];
                    let mut out = Mat::zeros(xq.rows, l.n);
                    for r in 0..xq.rows {
                        let xr = xq.row(r);
                        let orow = &mut out.data[r * l.n..(r + 1) * l.n];
                        for (j, o) in orow.iter_mut().enumerate() {
                            let wj = &w[j * l.k..(j + 1) * l.k];
                            *o = l.alpha * dot(xr, wj) + l.bias.as_ref().map_or(0.0, |b| b[j]);
                        }
                    }
                    (*y, out)
                }
                Op::Sigmoid { x, y } => {
                    let x = v[*x].as_ref().expect("checked");
                    let data = x.data.iter().map(|&a| 1.0 / (1.0 + (-a).exp())).collect();
                    (*y, Mat::new(x.rows, x.width, data))
                }
                Op::Mul { a, b, y } | Op::Add { a, b, y } | Op::Sub { a, b, y } => {
                    let (a, b) = (
                        v[*a].as_ref().expect("checked"),
                        v[*b].as_ref().expect("checked"),
                    );
                    let (rows, width) = broadcast_shape(a, b);
                    let f: fn(f32, f32) -> f32 = match op {
                        Op::Mul { .. } => |p, q| p * q,
                        Op::Add { .. } => |p, q| p + q,
                        _ => |p, q| p - q,
                    };
                    let mut data = Vec::with_capacity(rows * width);
                    for r in 0..rows {
                        for c in 0..width {
                            data.push(f(a.at(r, c), b.at(r, c)));
                        }
                    }
                    (*y, Mat::new(rows, width, data))
                }
                Op::Concat { xs, y } => {
                    let parts: Vec<&Mat> = xs
                        .iter()
                        .map(|x| v[*x].as_ref().expect("checked"))
                        .collect();
                    let rows = parts.iter().map(|p| p.rows).max().unwrap_or(1);
                    let width = parts.iter().map(|p| p.width).sum();
                    let mut data = Vec::with_capacity(rows * width);
                    for r in 0..rows {
                        for p in &parts {
                            data.extend_from_slice(p.row(r));
                        }
                    }
                    (*y, Mat::new(rows, width, data))
                }
                Op::Copy { x, y } => (*y, v[*x].clone().expect("checked")),
            };
            v[y] = Some(out);
        }
        v
    }

    /// The loss `(1/R) Σ_frontier Σ_rows ||ŷ − y||²` against `targets` (one per output, rows
    /// already selected) and its gradient with respect to each output.
    pub fn loss(&self, v: &Values, targets: &[Mat]) -> (f64, Vec<Mat>) {
        let mut loss = 0f64;
        let mut grads = vec![];
        for (&o, t) in self.outputs.iter().zip(targets) {
            let y = v[o].as_ref().expect("forward computed the outputs");
            let rows = y.rows.max(1) as f32;
            let mut g = Mat::zeros(y.rows, y.width);
            for ((gv, &a), &b) in g.data.iter_mut().zip(&y.data).zip(&t.data) {
                let d = a - b;
                loss += (d * d) as f64;
                *gv = 2.0 * d / rows;
            }
            grads.push(g);
        }
        let rows = v[self.outputs[0]].as_ref().map_or(1, |m| m.rows.max(1));
        (loss / rows as f64, grads)
    }

    /// Back-propagates `out_grads` (∂L/∂output, one per frontier value) through the ops
    /// and returns ∂L/∂Ŵ of every layer ([N, K] rows each). Given values get no gradient.
    pub fn backward(&self, weights: &[Vec<f32>], v: &Values, out_grads: &[Mat]) -> Vec<Vec<f32>> {
        let mut g: Vec<Option<Mat>> = vec![None; self.slots];
        let given: std::collections::HashSet<usize> = self.given.iter().map(|(s, _)| *s).collect();
        for (&o, og) in self.outputs.iter().zip(out_grads) {
            add_grad(&mut g, o, v, og, |_, _| 1.0);
        }
        let mut gw: Vec<Vec<f32>> = self.layers.iter().map(|l| vec![0.0; l.n * l.k]).collect();
        for op in self.ops.iter().rev() {
            match op {
                Op::Linear { x, y, layer } => {
                    let Some(gy) = g[*y].take() else { continue };
                    let l = &self.layers[*layer];
                    let xv = v[*x].as_ref().expect("forward");
                    let xq = fake_quant(xv, l.act);
                    let w = &weights[*layer];
                    // ∂L/∂Ŵ[j,:] = α Σ_r gy[r,j] x̂[r,:]
                    let gwl = &mut gw[*layer];
                    for r in 0..gy.rows {
                        let xr = xq.row(r);
                        for j in 0..l.n {
                            let c = l.alpha * gy.data[r * l.n + j];
                            if c == 0.0 {
                                continue;
                            }
                            for (d, &xv) in gwl[j * l.k..(j + 1) * l.k].iter_mut().zip(xr) {
                                *d += c * xv;
                            }
                        }
                    }
                    if given.contains(x) {
                        continue;
                    }
                    // ∂L/∂x[r,:] = α Σ_j gy[r,j] Ŵ[j,:], where the STE passes.
                    let mut gx = Mat::zeros(gy.rows, l.k);
                    for r in 0..gy.rows {
                        let row = &mut gx.data[r * l.k..(r + 1) * l.k];
                        for j in 0..l.n {
                            let c = l.alpha * gy.data[r * l.n + j];
                            for (d, &wv) in row.iter_mut().zip(&w[j * l.k..(j + 1) * l.k]) {
                                *d += c * wv;
                            }
                        }
                        for (d, &xv) in row.iter_mut().zip(xv.row(r)) {
                            if !ste_pass(xv, l.act) {
                                *d = 0.0;
                            }
                        }
                    }
                    add_grad(&mut g, *x, v, &gx, |_, _| 1.0);
                }
                Op::Sigmoid { x, y } => {
                    let Some(gy) = g[*y].take() else { continue };
                    if given.contains(x) {
                        continue;
                    }
                    let s = v[*y].as_ref().expect("forward");
                    add_grad(&mut g, *x, v, &gy, |r, c| {
                        let sv = s.at(r, c);
                        sv * (1.0 - sv)
                    });
                }
                Op::Mul { a, b, y } => {
                    let Some(gy) = g[*y].take() else { continue };
                    let (av, bv) = (
                        v[*a].clone().expect("forward"),
                        v[*b].clone().expect("forward"),
                    );
                    if !given.contains(a) {
                        add_grad(&mut g, *a, v, &gy, |r, c| bv.at(r, c));
                    }
                    if !given.contains(b) {
                        add_grad(&mut g, *b, v, &gy, |r, c| av.at(r, c));
                    }
                }
                Op::Add { a, b, y } | Op::Sub { a, b, y } => {
                    let Some(gy) = g[*y].take() else { continue };
                    let sign = if matches!(op, Op::Sub { .. }) {
                        -1.0
                    } else {
                        1.0
                    };
                    if !given.contains(a) {
                        add_grad(&mut g, *a, v, &gy, |_, _| 1.0);
                    }
                    if !given.contains(b) {
                        add_grad(&mut g, *b, v, &gy, |_, _| sign);
                    }
                }
                Op::Concat { xs, y } => {
                    let Some(gy) = g[*y].take() else { continue };
                    let mut off = 0;
                    for x in xs {
                        let w = v[*x].as_ref().expect("forward").width;
                        if !given.contains(x) {
                            let mut part = Mat::zeros(gy.rows, w);
                            for r in 0..gy.rows {
                                part.data[r * w..(r + 1) * w].copy_from_slice(
                                    &gy.data[r * gy.width + off..r * gy.width + off + w],
                                );
                            }
                            add_grad(&mut g, *x, v, &part, |_, _| 1.0);
                        }
                        off += w;
                    }
                }
                Op::Copy { x, y } => {
                    let Some(gy) = g[*y].take() else { continue };
                    if !given.contains(x) {
                        add_grad(&mut g, *x, v, &gy, |_, _| 1.0);
                    }
                }
            }
        }
        gw
    }
}

/// `g[slot] += grad · scale(r, c)`, summed down to the slot's own (broadcast) shape.
fn add_grad(
    g: &mut [Option<Mat>],
    slot: usize,
    v: &Values,
    grad: &Mat,
    scale: impl Fn(usize, usize) -> f32,
) {
    let m = v[slot].as_ref().expect("forward");
    let acc = g[slot].get_or_insert_with(|| Mat::zeros(m.rows, m.width));
    accumulate(acc, grad, scale);
}

/// Dot product in 8 independent partial sums, so that it vectorises (a single f32 sum
/// has to be added in order).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Cosine similarity of two equally long vectors, accumulated in f64: 1 when both are
/// zero, 0 when one is. The one `cosine` of tfmqc (`tfmqc eval` reports it too).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        ab += x as f64 * y as f64;
        aa += x as f64 * x as f64;
        bb += y as f64 * y as f64;
    }
    if aa == 0.0 && bb == 0.0 {
        return 1.0;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(f64::MIN_POSITIVE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tfmqc_runtime::rng::SplitMix64;

    fn rand_vec(rng: &mut SplitMix64, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32 * scale).collect()
    }

    /// A TIB shaped like the models': sinusoid (given) → linear → SiLU → linear → SiLU →
    /// two projections, one reshaped, one behind a Concat with a given value and an Add.
    fn small_net(rng: &mut SplitMix64, act: Option<(f32, u8)>) -> TibNet {
        let steps = 5;
        let layer = |rng: &mut SplitMix64, node: &str, n: usize, k: usize| Layer {
            node: node.into(),
            n,
            k,
            w: rand_vec(rng, n * k, 0.4),
            scales: vec![0.1; n],
            bias: Some(rand_vec(rng, n, 0.1)),
            alpha: 1.0,
            act,
        };
        let emb: Vec<f32> = (0..steps * 6).map(|i| ((i as f32) * 0.7).sin()).collect();
        let extra = rand_vec(rng, steps * 2, 1.0);
        TibNet {
            slots: 16,
            given: vec![
                (0, Mat::new(steps, 6, emb)),
                (11, Mat::new(steps, 2, extra)),
                (13, Mat::new(1, 5, rand_vec(rng, 5, 1.0))),
            ],
            ops: vec![
                Op::Linear {
                    x: 0,
                    y: 1,
                    layer: 0,
                },
                Op::Sigmoid { x: 1, y: 2 },
                Op::Mul { a: 1, b: 2, y: 3 },
                Op::Linear {
                    x: 3,
                    y: 4,
                    layer: 1,
                },
                Op::Sigmoid { x: 4, y: 5 },
                Op::Mul { a: 4, b: 5, y: 6 },
                Op::Linear {
                    x: 6,
                    y: 7,
                    layer: 2,
                },
                Op::Copy { x: 7, y: 8 },
                Op::Linear {
                    x: 6,
                    y: 9,
                    layer: 3,
                },
                Op::Concat {
                    xs: vec![9, 11],
                    y: 12,
                },
                Op::Add {
                    a: 12,
                    b: 13,
                    y: 14,
                },
                Op::Mul {
                    a: 14,
                    b: 14,
                    y: 15,
                },
            ],
            layers: vec![
                layer(rng, "l0", 4, 6),
                layer(rng, "l1", 4, 4),
                layer(rng, "p0", 3, 4),
                layer(rng, "p1", 3, 4),
            ],
            outputs: vec![8, 15],
            steps,
        }
    }

    fn loss_at(net: &TibNet, w: &[Vec<f32>], rows: &[usize], targets: &[Mat]) -> f64 {
        net.loss(&net.forward(w, rows), targets).0
    }

    #[test]
    fn hand_written_gradients_match_finite_differences() {
        let mut rng = SplitMix64::new(7);
        let net = small_net(&mut rng, None);
        net.check().unwrap();
        let rows: Vec<usize> = (0..net.steps).collect();
        let w: Vec<Vec<f32>> = net.layers.iter().map(|l| l.w.clone()).collect();
        let targets: Vec<Mat> = net
            .outputs
            .iter()
            .map(|&o| {
                let m = net.forward(&w, &rows)[o].clone().unwrap();
                Mat::new(m.rows, m.width, m.data.iter().map(|x| x + 0.3).collect())
            })
            .collect();
        // Evaluate away from the targets' own weights so every gradient is non-trivial.
        let w0: Vec<Vec<f32>> = w
            .iter()
            .map(|l| l.iter().map(|x| x * 0.9 + 0.01).collect())
            .collect();
        let v = net.forward(&w0, &rows);
        let (_, og) = net.loss(&v, &targets);
        let gw = net.backward(&w0, &v, &og);
        let eps = 1e-2f32;
        for (li, l) in net.layers.iter().enumerate() {
            for idx in 0..l.n * l.k {
                let mut wp = w0.clone();
                wp[li][idx] += eps;
                let mut wm = w0.clone();
                wm[li][idx] -= eps;
                let fd = (loss_at(&net, &wp, &rows, &targets)
                    - loss_at(&net, &wm, &rows, &targets))
                    / (2.0 * eps as f64);
                let an = gw[li][idx] as f64;
                assert!(
                    (fd - an).abs() <= 2e-3 + 2e-2 * fd.abs().max(an.abs()),
                    "layer {} weight {idx}: finite difference {fd}, hand-written {an}",
                    l.node
                );
            }
        }
    }

    #[test]
    fn broadcast_sub_and_add_gradients_match_finite_differences() {
        // y = (x W₀ᵀ + b) − c, with c a per-column constant and x given; plus Add of two
        // dynamic values of different widths (width 1 broadcasts).
        let mut rng = SplitMix64::new(3);
        let mk = |rng: &mut SplitMix64, node: &str, n: usize, k: usize| Layer {
            node: node.into(),
            n,
            k,
            w: rand_vec(rng, n * k, 0.5),
            scales: vec![0.1; n],
            bias: None,
            alpha: 0.5,
            act: None,
        };
        let net = TibNet {
            slots: 6,
            given: vec![
                (0, Mat::new(4, 3, rand_vec(&mut rng, 12, 1.0))),
                (1, Mat::new(1, 4, rand_vec(&mut rng, 4, 1.0))),
            ],
            ops: vec![
                Op::Linear {
                    x: 0,
                    y: 2,
                    layer: 0,
                },
                Op::Sub { a: 2, b: 1, y: 3 },
                Op::Linear {
                    x: 0,
                    y: 4,
                    layer: 1,
                },
                Op::Add { a: 3, b: 4, y: 5 },
            ],
            layers: vec![mk(&mut rng, "a", 4, 3), mk(&mut rng, "b", 1, 3)],
            outputs: vec![5],
            steps: 4,
        };
        net.check().unwrap();
        let rows = [0, 1, 2, 3];
        let w: Vec<Vec<f32>> = net.layers.iter().map(|l| l.w.clone()).collect();
        let targets = vec![Mat::new(4, 4, rand_vec(&mut rng, 16, 1.0))];
        let v = net.forward(&w, &rows);
        let (_, og) = net.loss(&v, &targets);
        let gw = net.backward(&w, &v, &og);
        for li in 0..2 {
            for idx in 0..w[li].len() {
                let eps = 1e-2f32;
                let mut wp = w.clone();
                wp[li][idx] += eps;
                let mut wm = w.clone();
                wm[li][idx] -= eps;
                let fd = (loss_at(&net, &wp, &rows, &targets)
                    - loss_at(&net, &wm, &rows, &targets))
                    / (2.0 * eps as f64);
                assert!(
                    (fd - gw[li][idx] as f64).abs() <= 1e-3 + 1e-2 * fd.abs(),
                    "layer {li} weight {idx}: {fd} vs {}",
                    gw[li][idx]
                );
            }
        }
    }

    #[test]
    fn rounding_variable_gradient_matches_finite_differences_through_the_network() {
        // ∂L/∂V = (∂L/∂Ŵ · s · clamp mask + ∂reg/∂h) · dh/dV, checked end to end on the
        // soft-rounded weights of every layer, regulariser on (after the warm-up).
        use crate::numerics::reconstruct::{AdaRoundOpts, SoftRounding};
        let mut rng = SplitMix64::new(11);
        let net = small_net(&mut rng, None);
        let rows: Vec<usize> = (0..net.steps).collect();
        let w: Vec<Vec<f32>> = net.layers.iter().map(|l| l.w.clone()).collect();
        let targets: Vec<Mat> = net
            .outputs
            .iter()
            .map(|&o| net.forward(&w, &rows)[o].clone().unwrap())
            .collect();
        let scales: Vec<Vec<f32>> = net.layers.iter().map(|l| l.scales.clone()).collect();
        let opts = AdaRoundOpts {
            iters: 10,
            warmup: 0.0,
            beta: (4.0, 4.0),
            ..Default::default()
        };
        let mut soft: Vec<SoftRounding> = net
            .layers
            .iter()
            .zip(&w)
            .zip(&scales)
            .map(|((l, w), s)| SoftRounding::new(w, l.n, l.k, s, 7))
            .collect();
        // Move V off its start so h is inside (0, 1) with a non-zero slope everywhere.
        for (li, s) in soft.iter_mut().enumerate() {
            let v: Vec<f32> = s
                .v()
                .iter()
                .enumerate()
                .map(|(i, &x)| x * 0.5 + 0.05 * ((i + li) % 3) as f32)
                .collect();
            s.set_v(&v);
        }
        // λ = 0: the reconstruction part of ∂L/∂V through the network (the regulariser's
        // own gradient is tested in reconstruct.rs).
        let opts = AdaRoundOpts {
            lambda: 0.0,
            ..opts
        };
        let total = |soft: &mut [SoftRounding]| -> f64 {
            let ws: Vec<Vec<f32>> = soft
                .iter_mut()
                .zip(&net.layers)
                .map(|(s, l)| {
                    let mut o = vec![0.0; l.n * l.k];
                    s.weight(&mut o);
                    o
                })
                .collect();
            loss_at(&net, &ws, &rows, &targets)
        };
        let ws: Vec<Vec<f32>> = soft
            .iter_mut()
            .zip(&net.layers)
            .map(|(s, l)| {
                let mut o = vec![0.0; l.n * l.k];
                s.weight(&mut o);
                o
            })
            .collect();
        let v = net.forward(&ws, &rows);
        let (_, og) = net.loss(&v, &targets);
        let gw = net.backward(&ws, &v, &og);
        for li in 0..soft.len() {
            let gv = soft[li].grad_v(&gw[li], &opts);
            let v0 = soft[li].v();
            for idx in (0..v0.len()).step_by(3) {
                let eps = 1e-2f32;
                let mut vp = v0.clone();
                vp[idx] += eps;
                soft[li].set_v(&vp);
                let lp = total(&mut soft);
                let mut vm = v0.clone();
                vm[idx] -= eps;
                soft[li].set_v(&vm);
                let lm = total(&mut soft);
                soft[li].set_v(&v0);
                let fd = (lp - lm) / (2.0 * eps as f64);
                assert!(
                    (fd - gv[idx] as f64).abs() <= 1e-3 + 3e-2 * fd.abs(),
                    "layer {li} V {idx}: finite difference {fd}, hand-written {}",
                    gv[idx]
                );
            }
        }
    }

    #[test]
    fn clipped_activations_stop_the_gradient() {
        let net = TibNet {
            slots: 3,
            given: vec![(0, Mat::new(2, 1, vec![0.5, 3.0]))],
            ops: vec![
                Op::Copy { x: 0, y: 1 },
                Op::Linear {
                    x: 1,
                    y: 2,
                    layer: 0,
                },
            ],
            layers: vec![Layer {
                node: "l".into(),
                n: 1,
                k: 1,
                w: vec![1.0],
                scales: vec![0.01],
                bias: None,
                alpha: 1.0,
                // Range [0, 1]: 3.0 is clipped to 1.
                act: Some((1.0 / 255.0, 0)),
            }],
            outputs: vec![2],
            steps: 2,
        };
        let w = vec![vec![1.0]];
        let v = net.forward(&w, &[0, 1]);
        assert!((v[2].as_ref().unwrap().data[1] - 1.0).abs() < 1e-6);
        let gw = net.backward(&w, &v, &[Mat::new(2, 1, vec![1.0, 1.0])]);
        // ∂/∂W = x̂₀ + x̂₁ = 0.5 (quantized) + 1.0 (clipped value).
        assert!((gw[0][0] - (fake_quant_u8(0.5, 1.0 / 255.0, 0) + 1.0)).abs() < 1e-6);
    }
}
