//! canonicalize: Constant nodes become initializers, constant-only subgraphs are folded
//! into initializers, every value gets its type and shape, dead nodes and unused
//! initializers go.
//!
//! Types, shapes and constant values come from tract's inference analysis (the engine the
//! runtime uses), so what we fold is what the runtime would compute.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::ir::exec::{dim_from_tract, dtype_from_tract, from_tract};
use crate::ir::{Dim, Graph, Model, Node, Tensor, ValueInfo};
use crate::passes::{Analysis, Pass, PassContext};

pub struct Canonicalize;

/// A folded value may be at most this many times larger than the constants it came from
/// (and over `GROWTH_FLOOR` bytes) — beyond that, e.g. an `Expand` of a scalar to a big
/// tensor, computing at run time beats storing the result.
const MAX_GROWTH: usize = 4;
const GROWTH_FLOOR: usize = 64 * 1024;

/// Ops never folded: they must stay visible to later passes.
/// DequantizeLinear of an int8 weight would otherwise become an f32 weight.
const NEVER_FOLD: &[&str] = &["DequantizeLinear", "QuantizeLinear"];

impl Pass for Canonicalize {
    fn name(&self) -> &'static str {
        "canonicalize"
    }
    fn summary(&self) -> &'static str {
        "Constant nodes to initializers, constant folding, shape inference, dead code removal"
    }
    /// Folding and dead-code removal may remove the nodes and values they name.
    fn invalidates(&self) -> &'static [Analysis] {
        &[Analysis::Tib, Analysis::Calibration]
    }
    fn run(&self, cx: &mut PassContext) -> Result<()> {
        let stats = canonicalize(&mut cx.model)?;
        cx.note(format!(
            "{} Constant nodes to initializers, {} nodes folded, {} dead nodes and {} unused initializers removed, {} values typed",
            stats.constants, stats.folded, stats.dead_nodes, stats.dead_initializers, stats.typed
        ));
        Ok(())
    }
}

#[derive(Debug, Default, PartialEq)]
pub struct CanonicalizeStats {
    pub constants: usize,
    pub folded: usize,
    pub dead_nodes: usize,
    pub dead_initializers: usize,
    pub typed: usize,
}

pub fn canonicalize(model: &mut Model) -> Result<CanonicalizeStats> {
    let mut stats = CanonicalizeStats {
        constants: constants_to_initializers(&mut model.graph)?,
        ..Default::default()
    };
    let (dn, di) = model.graph.remove_dead();
    stats.dead_nodes += dn;
    stats.dead_initializers += di;
    stats.folded = fold_constants(model)?;
    let (dn, di) = model.graph.remove_dead();
    stats.dead_nodes += dn;
    stats.dead_initializers += di;
    stats.typed = infer_types(model)?;
    Ok(stats)
}

/// The tensor a `Constant` node holds, whatever attribute form it uses.
fn constant_value(n: &Node) -> Result<Tensor> {
    let err = |r: &str| Error::Node {
        node: n.name.clone(),
        op: n.op_type.clone(),
        reason: r.into(),
    };
    let a = n
        .attributes
        .first()
        .ok_or_else(|| err("Constant without a value attribute"))?;
    Ok(match a.name.as_str() {
        "value" => {
            let t =
                a.t.as_ref()
                    .ok_or_else(|| err("value attribute holds no tensor"))?;
            crate::ir::onnx::tensor_from_proto(t, None)?
        }
        "value_float" => Tensor::scalar(a.f),
        "value_int" => Tensor::scalar(a.i),
        "value_floats" => Tensor::from_vec(vec![a.floats.len()], &a.floats),
        "value_ints" => Tensor::from_vec(vec![a.ints.len()], &a.ints),
        other => {
            return Err(err(&format!(
                "Constant attribute '{other}' is not supported"
            )))
        }
    })
}

fn constants_to_initializers(g: &mut Graph) -> Result<usize> {
    let consts: Vec<_> = g
        .node_indices()
        .filter(|&ix| g.node(ix).is_onnx_op("Constant"))
        .collect();
    for &ix in &consts {
        let value = constant_value(g.node(ix))?;
        let node = g.remove_node(ix).expect("node exists");
        g.initializers.insert(node.outputs[0].clone(), value);
    }
    Ok(consts.len())
}

/// Replaces every node whose outputs are constant by initializers: those tract's analysis
/// computed, and those whose inputs are all initializers (large weights are not values in
/// the analysis — see [`crate::ir::exec::value_facts`] — so e.g. a `Transpose` of a weight is
/// evaluated here, one node at a time, in the memory of that node).
fn fold_constants(model: &mut Model) -> Result<usize> {
    let facts = crate::ir::exec::value_facts(model)?;
    let mut folded = 0;
    for ix in model.graph.topo_order()? {
        let g = &model.graph;
        let n = g.node(ix);
        if NEVER_FOLD.contains(&n.op_type.as_str())
            || n.outputs.iter().any(|o| g.is_graph_output(o))
            || !n.implicit_inputs().is_empty()
        {
            continue;
        }
        let input_bytes: usize = n
            .inputs
            .iter()
            .filter_map(|i| g.initializers.get(i))
            .map(Tensor::byte_len)
            .sum();
        let konsts: Option<Vec<_>> = n
            .outputs
            .iter()
            .map(|o| facts.get(o).and_then(|f| f.konst.clone()))
            .collect();
        let values: Vec<Tensor> = match konsts {
            Some(konsts) => match konsts.iter().map(|k| from_tract(k)).collect() {
                Ok(v) => v,
                Err(_) => continue,
            },
            None => {
                let all_constant = !n.inputs.is_empty()
                    && n.inputs
                        .iter()
                        .all(|i| i.is_empty() || g.initializers.contains_key(i));
                if !all_constant || input_bytes <= crate::ir::exec::ANALYSIS_CONST_BYTES {
                    continue;
                }
                match evaluate_node(model, ix) {
                    Some(v) => v,
                    None => continue,
                }
            }
        };
        let out_bytes: usize = values.iter().map(Tensor::byte_len).sum();
        if out_bytes > GROWTH_FLOOR && out_bytes > MAX_GROWTH * input_bytes.max(1) {
            continue;
        }
        let g = &mut model.graph;
        let node = g.remove_node(ix).expect("node exists");
        for (name, value) in node.outputs.into_iter().zip(values) {
            g.initializers.insert(name, value);
        }
        folded += 1;
    }
    Ok(folded)
}

/// The outputs of node `ix`, all of whose inputs are initializers, computed by tract on a
/// model of that node alone; `None` when tract cannot (the node then stays).
fn evaluate_node(model: &Model, ix: petgraph::stable_graph::NodeIndex) -> Option<Vec<Tensor>> {
    let g = &model.graph;
    let n = g.node(ix).clone();
    let mut one = Graph::new("fold");
    for i in n.inputs.iter().filter(|i| !i.is_empty()) {
        one.initializers
            .insert(i.clone(), g.initializers[i].clone());
    }
    for o in &n.outputs {
        one.outputs.push(g.info(o).unwrap_or_else(|| ValueInfo {
            name: o.clone(),
            ..Default::default()
        }));
    }
    one.add_node(n).ok()?;
    let single = Model {
        graph: one,
        ir_version: model.ir_version,
        opsets: model.opsets.clone(),
        functions: model.functions.clone(),
        ..Default::default()
    };
    let runner =
        crate::ir::exec::Runner::new(&single, None, tfmqc_runtime::engine::Optimize::Declutter)
            .ok()?;
    runner.run(&HashMap::new()).ok()
}

/// Records tract's type and shape of every intermediate value (and fills in graph
/// inputs/outputs the file left untyped). Returns how many values are typed.
pub fn infer_types(model: &mut Model) -> Result<usize> {
    let facts = crate::ir::exec::value_facts(model)?;
    let g = &mut model.graph;
    // tract invents its own symbol names (`<Sym0>`); map them back to the file's names
    // through the graph inputs, whose dims are named in the file.
    let mut rename: HashMap<String, String> = HashMap::new();
    for input in &g.inputs {
        let (Some(file), Some(f)) = (
            &input.shape,
            facts.get(&input.name).and_then(|f| f.shape.as_ref()),
        ) else {
            continue;
        };
        for (a, b) in file.iter().zip(f) {
            if let (Dim::Symbol(name), Dim::Symbol(sym)) = (a, dim_from_tract(b)) {
                rename.insert(sym, name.clone());
            }
        }
    }
    let dim = |d: &tract_onnx::prelude::TDim| match dim_from_tract(d) {
        Dim::Symbol(s) => {
            let mut s = s;
            for (from, to) in &rename {
                s = s.replace(from.as_str(), to);
            }
            Dim::Symbol(s)
        }
        other => other,
    };
    let mut infos: HashMap<String, ValueInfo> = HashMap::new();
    for ix in g.node_indices() {
        for o in &g.node(ix).outputs {
            let Some(f) = facts.get(o) else { continue };
            let info = ValueInfo {
                name: o.clone(),
                dtype: f.datum_type.and_then(dtype_from_tract),
                shape: f.shape.as_ref().map(|s| s.iter().map(dim).collect()),
                doc_string: String::new(),
            };
            if info.dtype.is_some() || info.shape.is_some() {
                infos.insert(o.clone(), info);
            }
        }
    }
    for out in g.outputs.iter_mut() {
        if let Some(i) = infos.get(&out.name) {
            if out.dtype.is_none() {
                out.dtype = i.dtype;
            }
            if out.shape.is_none() {
                out.shape = i.shape.clone();
            }
        }
    }
    let typed = infos.len();
    for (k, v) in infos {
        g.value_info.insert(k, v);
    }
    Ok(typed)
}
