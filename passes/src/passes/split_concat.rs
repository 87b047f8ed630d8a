//! split-concat: Q-Diffusion's shortcut-splitting quantization (arXiv 2302.04304), which
//! TFMQ-DM's reference implementation keeps (`QuantLayer`'s `split`: two activation and
//! two weight quantizers for a layer reading a concatenation). A UNet's up blocks
//! concatenate the upsampled deep features with the skip connection's shallow ones,
//! whose ranges differ by an order of magnitude: one activation scale for the
//! concatenation leaves the narrow part a few levels at 4 bits. Each group-1 Conv
//! reading a channel `Concat` becomes one Conv per concatenated input (its slice of the
//! weight's input channels; the bias on the first) summed by `Add`s — the same float
//! function in standard ONNX, whose parts `calibrate` and `quantize` then treat as
//! ordinary layers (an activation scale each, per step where FSC gives them, per-channel
//! weight scales each; the runtime runs them as int8 convs).
//!
//! Runs below 8-bit activations only (`--split-concat`): at 8 bits one scale for the
//! concatenation measured within noise.

use crate::error::{Error, Result};
use crate::ir::{Dim, Graph, Node, Tensor};
use crate::options::Options;
use crate::passes::{Pass, PassContext};

pub struct SplitConcat;

impl Pass for SplitConcat {
    fn name(&self) -> &'static str {
        "split-concat"
    }
    fn summary(&self) -> &'static str {
        "Q-Diffusion's shortcut splitting: a Conv reading a channel Concat becomes one Conv per part (below 8-bit activations)"
    }
    fn run(&self, cx: &mut PassContext) -> Result<()> {
        if !wanted(cx.options) {
            return Ok(());
        }
        let split = split_concat_convs(&mut cx.model.graph, &cx.options.keep_float)?;
        if !split.is_empty() {
            cx.note(format!(
                "{} Convs reading a Concat split into one Conv per part: {}",
                split.len(),
                split.join(", ")
            ));
        }
        Ok(())
    }
}

/// Whether the pass rewrites anything under these options.
pub fn wanted(o: &Options) -> bool {
    o.split_concat && o.act_bits < 8 && !o.baseline_minmax && o.weight_bits < 32
}

/// The channel count of `value` (NCHW), when its shape says it.
fn channels(g: &Graph, value: &str) -> Option<usize> {
    match g.info(value)?.shape?.get(1)? {
        Dim::Known(c) if *c > 0 => Some(*c as usize),
        _ => None,
    }
}

/// Splits every group-1 Conv whose input is a Concat along channels (inputs of known
/// channel counts, a float initializer weight [O, C, kh, kw]); returns the Convs' names.
/// Convs whose name contains a `keep_float` pattern stay whole.
pub fn split_concat_convs(g: &mut Graph, keep_float: &[String]) -> Result<Vec<String>> {
    let mut done = vec![];
    let convs: Vec<_> = g
        .node_indices()
        .filter(|&ix| g.node(ix).is_onnx_op("Conv"))
        .collect();
    for ix in convs {
        let conv = g.node(ix).clone();
        if keep_float.iter().any(|p| conv.name.contains(p.as_str()))
            || conv.attr_int("group").unwrap_or(1) != 1
            || conv.inputs.len() < 2
        {
            continue;
        }
        let Some((cix, _)) = g.producer(&conv.inputs[0]) else {
            continue;
        };
        let concat = g.node(cix).clone();
        if !concat.is_onnx_op("Concat") || concat.inputs.len() < 2 {
            continue;
        }
        let axis = concat.attr_int("axis").unwrap_or(0);
        if axis != 1 && axis != -3 {
            continue;
        }
        let Some(w) = g.initializers.get(&conv.inputs[1]) else {
            continue;
        };
        if w.shape.len() != 4 {
            continue;
        }
        let shape = w.shape.clone();
        let Ok(wv) = w.to_vec::<f32>() else {
            continue;
        };
        let (o, c, kk) = (shape[0], shape[1], shape[2] * shape[3]);
        let Some(parts) = concat
            .inputs
            .iter()
            .map(|v| channels(g, v))
            .collect::<Option<Vec<usize>>>()
        else {
            continue;
        };
        if parts.iter().sum::<usize>() != c || parts.contains(&0) {
            continue;
        }
        let mut outs = vec![];
        let mut c0 = 0;
        for (i, (&ci, part)) in parts.iter().zip(&concat.inputs).enumerate() {
            let mut slice = Vec::with_capacity(o * ci * kk);
            for r in 0..o {
                slice.extend_from_slice(&wv[(r * c + c0) * kk..(r * c + c0 + ci) * kk]);
            }
            c0 += ci;
            let wi = g.add_initializer(
                &format!("{}_split{i}", conv.inputs[1]),
                Tensor::from_vec(vec![o, ci, shape[2], shape[3]], &slice),
            );
            let mut inputs = vec![part.clone(), wi];
            if i == 0 && conv.inputs.len() > 2 && !conv.inputs[2].is_empty() {
                inputs.push(conv.inputs[2].clone());
            }
            outs.push(g.add_op(
                "Conv",
                inputs,
                &format!("{}_split{i}", conv.name),
                conv.attributes.clone(),
            )?);
        }
        g.remove_node(ix);
        // The sum keeps the Conv's output name (its readers and the graph outputs).
        let mut acc = outs[0].clone();
        for (i, y) in outs.iter().enumerate().skip(1) {
            let out = if i + 1 == outs.len() {
                conv.outputs[0].clone()
            } else {
                g.fresh_name(&format!("{}_split_sum{i}", conv.name))
            };
            let name = g.fresh_node_name(&format!("{}_split_sum{i}", conv.name));
            g.add_node(Node::new(
                name,
                "Add",
                vec![acc, y.clone()],
                vec![out.clone()],
            ))
            .map_err(|e| Error::pass("split-concat", e.to_string()))?;
            acc = out;
        }
        done.push(conv.name.clone());
    }
    g.remove_dead();
    Ok(done)
}
