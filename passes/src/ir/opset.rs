//! Raising a model's default-domain (`ai.onnx`) opset, rewriting the nodes whose meaning
//! changed on the way. Packed INT4 weights need opset 21 (`DequantizeLinear`-21 is the
//! first to take INT4), and an ONNX model has one version per domain, so every node of
//! the file is read under the new version.
//!
//! What changed between opset 13 (the oldest `quantize` takes) and 21, for the operators
//! a rewrite can keep equivalent:
//! - opset 18: `ReduceL1/L2/LogSum/LogSumExp/Max/Mean/Min/Prod/SumSquare` take `axes` as
//!   an input instead of an attribute (ReduceSum did at 13): moved to an int64
//!   initializer. `Split` without a `split` input needs `num_outputs`: set to the outputs'
//!   count (the equal split opset 13 made).
//! - opset 16: `RoiAlign` gained `coordinate_transformation_mode`, default `half_pixel`
//!   where opset 10 computed `output_half_pixel`: the old mode is written out.
//! - opset 20: `GridSample`'s modes `bilinear` / `bicubic` are spelled `linear` / `cubic`.
//!
//! Refused, with the reason (the caller's fallback is the int8 form of the file):
//! `GroupNormalization` before 21 (its scale and bias were per group, at 21 per channel;
//! without the channel count at hand no rewrite is exact), `DFT` before 20 (its axis
//! moved to an input), and subgraphs (If / Loop / Scan bodies are read under the same
//! opset and are not rewritten here).
//!
//! Every other operator's newer versions only add types, optional inputs or attributes
//! whose defaults keep the old meaning.

use crate::error::{Error, Result};
use crate::ir::{attr, Model, Tensor};

/// The opset that first reads INT4 in `DequantizeLinear`.
pub const INT4_OPSET: i64 = 21;

/// The ONNX IR version that introduced INT4 (files at opset 21 declare at least this).
pub const INT4_IR_VERSION: i64 = 10;

/// Reductions whose `axes` became an input at opset 18.
const AXES_TO_INPUT_AT_18: &[&str] = &[
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSumSquare",
];

/// Raises the default-domain opset of `model` to `target` (≥ its own, ≤ 21, from ≥ 13),
/// rewriting the nodes listed in the module doc; returns one line per rewritten node.
/// Nothing changes when the model is at `target` already or past it.
pub fn upgrade(model: &mut Model, target: i64) -> Result<Vec<String>> {
    let from = model.onnx_opset();
    if from >= target {
        return Ok(vec![]);
    }
    let refuse = |why: String| Err(Error::pass("opset", why));
    if from < 13 || target > INT4_OPSET {
        return refuse(format!(
            "opset {from} → {target}: only 13 … {INT4_OPSET} are converted"
        ));
    }
    let crosses = |v: i64| from < v && target >= v;
    let g = &mut model.graph;
    // Refusals first, so a refused model is left as it was.
    for ix in g.node_indices() {
        let n = g.node(ix);
        if n.attributes
            .iter()
            .any(|a| a.g.is_some() || !a.graphs.is_empty())
        {
            return refuse(format!(
                "node '{}' ({}) has a subgraph: subgraphs are not upgraded to opset {target}",
                n.name, n.op_type
            ));
        }
        if !(n.domain.is_empty() || n.domain == "ai.onnx") {
            continue;
        }
        match n.op_type.as_str() {
            "GroupNormalization" if crosses(21) => {
                return refuse(format!(
                    "node '{}': GroupNormalization's scale and bias change from per group to per channel at opset 21",
                    n.name
                ));
            }
            "DFT" if crosses(20) => {
                return refuse(format!(
                    "node '{}': DFT's axis moves from attribute to input at opset 20",
                    n.name
                ));
            }
            _ => {}
        }
    }
    let mut notes = vec![];
    let ixs: Vec<_> = g.node_indices().collect();
    for ix in ixs {
        let n = g.node(ix);
        if !(n.domain.is_empty() || n.domain == "ai.onnx") {
            continue;
        }
        let op = n.op_type.clone();
        match op.as_str() {
            o if crosses(18) && AXES_TO_INPUT_AT_18.contains(&o) => {
                let Some(axes) = n.attr_ints("axes").map(<[i64]>::to_vec) else {
                    continue; // all axes, the default under both versions
                };
                let mut node = g.remove_node(ix).expect("a node of the graph");
                let name = g.add_initializer(
                    &format!("{}_axes", node.name.trim_start_matches('/')),
                    Tensor::from_vec(vec![axes.len()], &axes),
                );
                node.attributes.retain(|a| a.name != "axes");
                // The data input is the only one before opset 18.
                node.inputs.truncate(1);
                node.inputs.push(name);
                notes.push(format!("{}: {op} axes {axes:?} → input", node.name));
                g.add_node(node)?;
            }
            "Split" if crosses(18) => {
                let has_split = n.inputs.get(1).is_some_and(|s| !s.is_empty());
                if has_split || n.attr("num_outputs").is_some() {
                    continue;
                }
                let count = n.outputs.len() as i64;
                let label = n.name.clone();
                let (_, attrs) = g.node_attrs_mut(ix);
                attrs.push(attr::int("num_outputs", count));
                notes.push(format!("{label}: Split num_outputs = {count}"));
            }
            "RoiAlign" if crosses(16) => {
                if n.attr("coordinate_transformation_mode").is_some() {
                    continue;
                }
                let label = n.name.clone();
                let (_, attrs) = g.node_attrs_mut(ix);
                attrs.push(attr::string(
                    "coordinate_transformation_mode",
                    "output_half_pixel",
                ));
                notes.push(format!(
                    "{label}: RoiAlign coordinate_transformation_mode = output_half_pixel"
                ));
            }
            "GridSample" if crosses(20) => {
                let mode = n.attr("mode").map(|a| a.s.clone());
                let renamed: &[u8] = match mode.as_deref() {
                    None | Some(b"bilinear") => b"linear",
                    Some(b"bicubic") => b"cubic",
                    Some(_) => continue,
                };
                let label = n.name.clone();
                let (_, attrs) = g.node_attrs_mut(ix);
                attrs.retain(|a| a.name != "mode");
                attrs.push(attr::string(
                    "mode",
                    std::str::from_utf8(renamed).expect("ascii"),
                ));
                notes.push(format!(
                    "{label}: GridSample mode {}",
                    String::from_utf8_lossy(renamed)
                ));
            }
            _ => {}
        }
    }
    for o in model.opsets.iter_mut() {
        if o.0.is_empty() || o.0 == "ai.onnx" {
            o.1 = target;
        }
    }
    if !model
        .opsets
        .iter()
        .any(|(d, _)| d.is_empty() || d == "ai.onnx")
    {
        model.opsets.insert(0, (String::new(), target));
    }
    model.ir_version = model.ir_version.max(INT4_IR_VERSION);
    Ok(notes)
}
