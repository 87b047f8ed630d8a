//! "Is QUANT a quantization of FLOAT?": the same interface (graph inputs and outputs:
//! names, types, known dims), and every weight of QUANT — dequantized when it sits behind
//! a DequantizeLinear — close to a same-shaped weight of FLOAT.

use std::collections::HashMap;

use tfmqc_passes::ir::{DType, Dim, Model, Tensor, ValueInfo};

/// Relative RMS error (‖w_q − w‖ / ‖w‖) above which a weight of QUANT is not a
/// quantization of any weight of FLOAT. On models/, 8-bit weights come out at 0.004–0.02,
/// 4-bit ones at 0.1–0.25; an unrelated weight of the same distribution near √2.
pub const WEIGHT_TOLERANCE: f64 = 0.5;

/// Ops whose weight operand (slot 1) is what quantizers change.
const WEIGHT_OPS: &[&str] = &["Conv", "ConvTranspose", "Gemm", "MatMul"];

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct WeightCheck {
    /// Weights compared (dequantized or float).
    pub weights: usize,
    /// Of those, stored quantized behind a DequantizeLinear.
    pub quantized: usize,
    /// Largest relative RMS error against the matched FLOAT weight.
    pub max_rel_error: f64,
    /// Mean of the relative errors of the quantized weights.
    pub mean_rel_error_quantized: f64,
}

fn dims_agree(a: &Option<Vec<Dim>>, b: &Option<Vec<Dim>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            a.len() == b.len()
                && a.iter().zip(b).all(|(x, y)| match (x, y) {
                    (Dim::Known(u), Dim::Known(v)) => u == v,
                    // A named batch may be called N in one file and batch in another.
                    (Dim::Known(_), _) | (_, Dim::Known(_)) => false,
                    _ => true,
                })
        }
        _ => true,
    }
}

fn values_agree(
    what: &str,
    f: &[ValueInfo],
    q: &[ValueInfo],
    exact_dims: bool,
) -> Result<(), String> {
    let names = |v: &[ValueInfo]| {
        v.iter()
            .map(|i| i.type_string_named())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let fnames: Vec<&str> = f.iter().map(|i| i.name.as_str()).collect();
    let qnames: Vec<&str> = q.iter().map(|i| i.name.as_str()).collect();
    if fnames != qnames {
        return Err(format!(
            "different graph {what}s: FLOAT has {} but QUANT has {}",
            names(f),
            names(q)
        ));
    }
    for (a, b) in f.iter().zip(q) {
        let dtype_ok = a.dtype.is_none() || b.dtype.is_none() || a.dtype == b.dtype;
        // Outputs: a tool may drop or add symbolic shape facts; inputs must agree.
        let shape_ok = if exact_dims {
            dims_agree(&a.shape, &b.shape)
        } else {
            a.shape.is_none() || b.shape.is_none() || dims_agree(&a.shape, &b.shape)
        };
        if !dtype_ok || !shape_ok {
            return Err(format!(
                "graph {what} '{}' is {} in FLOAT but {} in QUANT",
                a.name,
                a.type_string(),
                b.type_string()
            ));
        }
    }
    Ok(())
}

trait Named {
    fn type_string_named(&self) -> String;
}

impl Named for ValueInfo {
    fn type_string_named(&self) -> String {
        format!("{}: {}", self.name, self.type_string())
    }
}

/// Checks the graph interfaces.
pub fn same_interface(float: &Model, quant: &Model) -> Result<(), String> {
    values_agree("input", &float.graph.inputs, &quant.graph.inputs, true)?;
    values_agree("output", &float.graph.outputs, &quant.graph.outputs, false)
}

/// DequantizeLinear(x, scale, zero_point, axis) of constant tensors.
fn dequantize(x: &Tensor, scale: &Tensor, zp: Option<&Tensor>, axis: i64) -> Option<Vec<f32>> {
    let xv = x.to_f64_lossy().ok()?;
    let s = scale.to_f64_lossy().ok()?;
    let z = match zp {
        Some(z) => z.to_f64_lossy().ok()?,
        None => vec![0.0; s.len()],
    };
    if s.len() != z.len() || s.is_empty() {
        return None;
    }
    if s.len() == 1 {
        return Some(xv.iter().map(|v| ((v - z[0]) * s[0]) as f32).collect());
    }
    let rank = x.shape.len() as i64;
    let axis = if axis < 0 { axis + rank } else { axis } as usize;
    if axis >= x.shape.len() || x.shape[axis] != s.len() {
        return None;
    }
    let inner: usize = x.shape[axis + 1..].iter().product();
    let c = s.len();
    Some(
        xv.iter()
            .enumerate()
            .map(|(i, v)| {
                let k = (i / inner) % c;
                ((v - z[k]) * s[k]) as f32
            })
            .collect(),
    )
}

fn rel_error(reference: &[f32], got: &[f32]) -> f64 {
    let (mut e, mut s) = (0f64, 0f64);
    for (&a, &b) in reference.iter().zip(got) {
        e += (a as f64 - b as f64).powi(2);
        s += (a as f64).powi(2);
    }
    if e == 0.0 {
        0.0
    } else {
        (e / s.max(f64::MIN_POSITIVE)).sqrt()
    }
}

/// [`rel_error`] after scaling each slice of `reference` along `axis` (an input channel) by
/// the factor that fits `got` best (least squares): how TCR's `W' = W · r` compares with
/// its float weight, whose factors r the file does not record.
fn rel_error_rescaled(reference: &[f32], got: &[f32], shape: &[usize], axis: usize) -> f64 {
    let c = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let (mut rg, mut rr) = (vec![0f64; c], vec![0f64; c]);
    for (i, (&a, &b)) in reference.iter().zip(got).enumerate() {
        let k = (i / inner) % c;
        rg[k] += a as f64 * b as f64;
        rr[k] += (a as f64).powi(2);
    }
    let factor: Vec<f64> = rg
        .iter()
        .zip(&rr)
        .map(|(g, r)| if *r > 0.0 { g / r } else { 0.0 })
        .collect();
    let (mut e, mut s) = (0f64, 0f64);
    for (i, (&a, &b)) in reference.iter().zip(got).enumerate() {
        let a = a as f64 * factor[(i / inner) % c];
        e += (a - b as f64).powi(2);
        s += (b as f64).powi(2);
    }
    if e == 0.0 {
        0.0
    } else {
        (e / s.max(f64::MIN_POSITIVE)).sqrt()
    }
}

/// The input-channel axes a weight of `shape` may have been rescaled along by TCR: 1 for
/// a Conv's `[O, I, ...]`, either axis of a 2-D Gemm/MatMul weight.
fn input_axes(shape: &[usize]) -> &'static [usize] {
    if shape.len() == 2 {
        &[0, 1]
    } else {
        &[1]
    }
}

/// A weight as a Conv/Gemm/MatMul reads it: (value name, shape, values, the
/// DequantizeLinear node it came through).
type Weight = (String, Vec<usize>, Vec<f32>, Option<String>);

/// The weights of `m` that feed a Conv/Gemm/MatMul weight slot.
fn weights(m: &Model) -> Vec<Weight> {
    let g = &m.graph;
    let mut out = vec![];
    let mut seen = std::collections::HashSet::new();
    for ix in g.node_indices() {
        let n = g.node(ix);
        if !WEIGHT_OPS.iter().any(|op| n.is_onnx_op(op)) || n.inputs.len() < 2 {
            continue;
        }
        let w = &n.inputs[1];
        if !seen.insert(w.clone()) {
            continue;
        }
        if let Some(t) = g.initializers.get(w) {
            if t.dtype == DType::F32 && t.shape.len() >= 2 {
                if let Ok(v) = t.to_f32_vec() {
                    out.push((w.clone(), t.shape.clone(), v, None));
                }
            }
            continue;
        }
        let Some((p, _)) = g.producer(w) else {
            continue;
        };
        let dq = g.node(p);
        if !dq.is_onnx_op("DequantizeLinear") {
            continue;
        }
        let get = |k: usize| {
            dq.inputs
                .get(k)
                .filter(|s| !s.is_empty())
                .and_then(|s| g.initializers.get(s))
        };
        let (Some(x), Some(scale)) = (get(0), get(1)) else {
            continue;
        };
        if x.shape.len() < 2 {
            continue;
        }
        if let Some(v) = dequantize(x, scale, get(2), dq.attr_int("axis").unwrap_or(1)) {
            out.push((w.clone(), x.shape.clone(), v, Some(dq.name.clone())));
        }
    }
    out
}

/// Matches every weight of QUANT with the closest same-shaped weight of FLOAT. With
/// `rescaled` (a tfmqc file made with TCR, which multiplies each input channel of a
/// weight by a factor and divides its activation by it), each FLOAT weight is first
/// fitted per input channel to the QUANT weight: the factors are the reparameterization,
/// what is left is quantization error.
pub fn weights_match(float: &Model, quant: &Model, rescaled: bool) -> Result<WeightCheck, String> {
    let mut by_shape: HashMap<Vec<usize>, Vec<(String, Vec<f32>)>> = HashMap::new();
    for (name, shape, v, _) in weights(float) {
        by_shape.entry(shape).or_default().push((name, v));
    }
    // FLOAT weights that no Conv/Gemm/MatMul reads directly (e.g. behind a Transpose)
    // are candidates too.
    for (name, t) in &float.graph.initializers {
        if t.dtype == DType::F32 && t.shape.len() >= 2 {
            let list = by_shape.entry(t.shape.clone()).or_default();
            if !list.iter().any(|(n, _)| n == name) {
                if let Ok(v) = t.to_f32_vec() {
                    list.push((name.clone(), v));
                }
            }
        }
    }
    let mut check = WeightCheck::default();
    let mut sum_q = 0.0;
    for (name, shape, v, dq) in weights(quant) {
        // A Conv weight split along its input channels (`split-concat`): every run of
        // as many input channels of a FLOAT Conv weight with the same output channels
        // and kernel.
        let mut slices: Vec<(String, Vec<f32>)> = vec![];
        if shape.len() == 4 {
            for (fs, list) in &by_shape {
                if fs.len() != 4 || fs[0] != shape[0] || fs[2..] != shape[2..] || fs[1] <= shape[1]
                {
                    continue;
                }
                let (o, c, ci, kk) = (fs[0], fs[1], shape[1], fs[2] * fs[3]);
                for (fname, fv) in list {
                    for c0 in 0..=c - ci {
                        let mut slice = Vec::with_capacity(o * ci * kk);
                        for r in 0..o {
                            slice.extend_from_slice(&fv[(r * c + c0) * kk..(r * c + c0 + ci) * kk]);
                        }
                        slices.push((format!("{fname}[:, {c0}..{}]", c0 + ci), slice));
                    }
                }
            }
        }
        let mut candidates: Vec<&(String, Vec<f32>)> = by_shape
            .get(&shape)
            .map(|l| l.iter().collect())
            .unwrap_or_default();
        // A 2-D weight may be stored transposed (Gemm transB).
        let transposed = (shape.len() == 2).then(|| vec![shape[1], shape[0]]);
        let t_candidates: Vec<&(String, Vec<f32>)> = transposed
            .as_ref()
            .and_then(|s| by_shape.get(s))
            .map(|l| l.iter().collect())
            .unwrap_or_default();
        let what = match &dq {
            Some(node) => {
                format!("weight '{name}' {shape:?} (dequantized by DequantizeLinear '{node}')")
            }
            None => format!("float weight '{name}' {shape:?}"),
        };
        if candidates.is_empty() && t_candidates.is_empty() && slices.is_empty() {
            return Err(format!("{what} has no weight of the same shape in FLOAT"));
        }
        candidates.extend(slices.iter());
        let mut best: Option<(f64, &str)> = None;
        let error = |reference: &[f32]| {
            let plain = rel_error(reference, &v);
            if !rescaled {
                return plain;
            }
            input_axes(&shape)
                .iter()
                .map(|&axis| rel_error_rescaled(reference, &v, &shape, axis))
                .fold(plain, f64::min)
        };
        for c in candidates.drain(..) {
            let e = error(&c.1);
            if best.is_none_or(|b| e < b.0) {
                best = Some((e, &c.0));
            }
        }
        for c in t_candidates {
            let (r, k) = (shape[0], shape[1]);
            // c is [k, r]; compare c^T with v.
            let ct: Vec<f32> = (0..r * k).map(|i| c.1[(i % k) * r + i / k]).collect();
            let e = error(&ct);
            if best.is_none_or(|b| e < b.0) {
                best = Some((e, &c.0));
            }
        }
        let (e, closest) = best.expect("a candidate");
        if e > WEIGHT_TOLERANCE {
            return Err(format!(
                "{what} differs from every same-shaped weight of FLOAT (closest: '{closest}', relative error {e:.2} > {WEIGHT_TOLERANCE})"
            ));
        }
        check.weights += 1;
        check.max_rel_error = check.max_rel_error.max(e);
        if dq.is_some() {
            check.quantized += 1;
            sum_q += e;
        }
    }
    check.mean_rel_error_quantized = sum_q / check.quantized.max(1) as f64;
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dequantize_per_channel_along_the_axis() {
        let x = Tensor::from_vec(vec![2, 2], &[1i8, -1, 2, 4]);
        let s = Tensor::from_vec(vec![2], &[0.5f32, 2.0]);
        assert_eq!(
            dequantize(&x, &s, None, 0).unwrap(),
            vec![0.5, -0.5, 4.0, 8.0]
        );
        assert_eq!(
            dequantize(&x, &s, None, 1).unwrap(),
            vec![0.5, -2.0, 1.0, 8.0]
        );
        // A scale that does not fit the axis is not a weight we can read.
        let s3 = Tensor::from_vec(vec![3], &[1f32, 1.0, 1.0]);
        assert!(dequantize(&x, &s3, None, 0).is_none());
    }

    /// split-concat's Conv weights are runs of a FLOAT weight's input channels.
    #[test]
    fn split_conv_weights_match_slices_of_the_float_weight() {
        use tfmqc_passes::ir::{Graph, Node};
        let model = |weights: &[(&str, Vec<usize>, Vec<f32>)]| {
            let mut g = Graph::new("g");
            for (i, (name, shape, v)) in weights.iter().enumerate() {
                g.initializers
                    .insert(name.to_string(), Tensor::from_vec(shape.clone(), v));
                g.add_node(Node::new(
                    format!("conv{i}"),
                    "Conv",
                    vec![format!("x{i}"), name.to_string()],
                    vec![format!("y{i}")],
                ))
                .unwrap();
            }
            Model {
                graph: g,
                ..Default::default()
            }
        };
        let w: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
        let float = model(&[("w", vec![2, 4, 1, 1], w.clone())]);
        let slice = |c0: usize, c1: usize| -> Vec<f32> {
            (0..2)
                .flat_map(|r| w[r * 4 + c0..r * 4 + c1].to_vec())
                .collect()
        };
        let split = model(&[
            ("w_split0", vec![2, 1, 1, 1], slice(0, 1)),
            ("w_split1", vec![2, 3, 1, 1], slice(1, 4)),
        ]);
        let check = weights_match(&float, &split, false).unwrap();
        assert_eq!(check.weights, 2);
        assert!(check.max_rel_error < 1e-12);
        // A weight that is no run of input channels still fails.
        let other = model(&[(
            "w_split1",
            vec![2, 3, 1, 1],
            vec![9.0, -9.0, 1.0, 0.0, 5.0, 2.0],
        )]);
        assert!(weights_match(&float, &other, false).is_err());
    }

    #[test]
    fn rescaled_input_channels_fit_their_factors() {
        // [O=2, I=2, 1, 1]; QUANT multiplies input channel 0 by 4 and channel 1 by 0.5.
        let w = [1f32, 2.0, -3.0, 4.0];
        let q = [4f32, 1.0, -12.0, 2.0];
        assert!(rel_error(&w, &q) > 1.0);
        assert!(rel_error_rescaled(&w, &q, &[2, 2, 1, 1], 1) < 1e-12);
        // Along the other axis the factors do not fit.
        assert!(rel_error_rescaled(&w, &q, &[2, 2, 1, 1], 0) > 0.1);
    }
}
