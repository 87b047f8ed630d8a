//! detect-tib: find the time-step input and the Temporal Information Block by structure.
//!
//! 1. Data dependence: a value depends on a graph input if it is computed from it by any
//!    op but Shape/Size (a shape is not the data: `Expand(t, Shape(x))` depends on `t`
//!    alone).
//! 2. The time-step input is the graph input whose data reaches a Sin or Cos computed
//!    from it alone (the sinusoidal embedding); `--timestep-input` overrides this.
//! 3. The TIB is every value that depends on the time step and on no other input.
//! 4. The index value is the time step after the casts, reshapes and broadcasts that keep
//!    it a list of time steps (rank ≤ 1); everything computable from it and constants
//!    folds into tables, and the values of that region read from outside are the
//!    frontier: the temporal features emb_i(t).

use std::collections::{HashMap, HashSet};

use crate::analysis::tib::{FrontierValue, TibAnalysis};
use crate::error::{Error, Result};
use petgraph::stable_graph::NodeIndex;

use crate::ir::{Graph, Model};
use crate::passes::{Pass, PassContext};

pub struct DetectTib;

impl Pass for DetectTib {
    fn name(&self) -> &'static str {
        "detect-tib"
    }
    fn summary(&self) -> &'static str {
        "Find the time-step input and the Temporal Information Block (analysis only)"
    }
    fn run(&self, cx: &mut PassContext) -> Result<()> {
        let tib = detect(&cx.model, cx.options.timestep_input.as_deref())?;
        for line in tib.text().lines() {
            cx.note(line.to_string());
        }
        cx.tib = Some(tib);
        Ok(())
    }
}

/// Ops whose output carries no data dependence on their input (only its shape).
const SHAPE_ONLY: &[&str] = &["Shape", "Size"];
/// Ops that keep a time-step list a time-step list (the chain to the index value).
const CHAIN_OPS: &[&str] = &[
    "Cast",
    "CastLike",
    "Expand",
    "Reshape",
    "Unsqueeze",
    "Squeeze",
    "Identity",
    "Flatten",
];
/// Zero-input ops that are not constants.
const NONDETERMINISTIC: &[&str] = &[
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
];

/// `x * ones` or `x + zeros` where the constant comes from ConstantOfShape: how
/// diffusers broadcasts the time step to the batch (`t * torch.ones(batch)`).
fn is_broadcast_identity(g: &Graph, n: &crate::ir::Node) -> bool {
    let neutral = match n.op_type.as_str() {
        "Mul" => 1.0,
        "Add" => 0.0,
        _ => return false,
    };
    n.inputs.len() == 2
        && n.inputs.iter().any(|i| {
            let Some((p, _)) = g.producer(i) else {
                return false;
            };
            let p = g.node(p);
            if !p.is_onnx_op("ConstantOfShape") {
                return false;
            }
            // No value attribute means a float 0.
            let value = match p.attr("value").and_then(|a| a.t.as_ref()) {
                Some(t) => crate::ir::onnx::tensor_from_proto(t, None)
                    .ok()
                    .and_then(|t| t.to_f64_lossy().ok()),
                None => Some(vec![0.0]),
            };
            value.is_some_and(|v| v.iter().all(|&x| x == neutral))
        })
}

/// Values data-dependent on `start` (which are included).
fn data_dependents(
    g: &Graph,
    order: &[petgraph::stable_graph::NodeIndex],
    start: &str,
) -> HashSet<String> {
    let mut set: HashSet<String> = HashSet::from([start.to_string()]);
    for &ix in order {
        let n = g.node(ix);
        if SHAPE_ONLY.contains(&n.op_type.as_str()) {
            continue;
        }
        let reads = n
            .inputs
            .iter()
            .chain(n.implicit_inputs().iter())
            .any(|i| set.contains(i));
        if reads {
            set.extend(n.outputs.iter().filter(|o| !o.is_empty()).cloned());
        }
    }
    set
}

/// Values computable from initializers and constant-producing nodes alone.
fn static_values(g: &Graph, order: &[NodeIndex]) -> HashSet<String> {
    let mut set: HashSet<String> = g.initializers.keys().cloned().collect();
    for &ix in order {
        let n = g.node(ix);
        if NONDETERMINISTIC.contains(&n.op_type.as_str()) || !n.implicit_inputs().is_empty() {
            continue;
        }
        if n.inputs.iter().all(|i| i.is_empty() || set.contains(i)) {
            set.extend(n.outputs.iter().cloned());
        }
    }
    set
}

/// Rank of a value from the IR's type info, else from tract's inference.
struct Ranks<'a> {
    g: &'a Graph,
    facts: Option<HashMap<String, tfmqc_runtime::ValueFact>>,
    model: &'a Model,
}

impl Ranks<'_> {
    fn rank(&mut self, v: &str) -> Option<usize> {
        if let Some(shape) = self.g.info(v).and_then(|i| i.shape) {
            return Some(shape.len());
        }
        if self.facts.is_none() {
            self.facts = Some(crate::ir::exec::value_facts(self.model).unwrap_or_default());
        }
        self.facts.as_ref()?.get(v)?.shape.as_ref().map(|s| s.len())
    }

    fn type_string(&mut self, v: &str) -> String {
        if let Some(i) = self.g.info(v) {
            if i.shape.is_some() {
                return i.type_string();
            }
        }
        let _ = self.rank(v);
        match self.facts.as_ref().and_then(|f| f.get(v)) {
            Some(f) => {
                let dt = f
                    .datum_type
                    .and_then(crate::ir::exec::dtype_from_tract)
                    .map(|d| d.short())
                    .unwrap_or("?");
                match &f.shape {
                    Some(s) => format!(
                        "{dt}[{}]",
                        s.iter()
                            .map(|d| d.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                    None => dt.to_string(),
                }
            }
            None => "?".into(),
        }
    }
}

/// For each graph input, the values computed from it (whatever else they read).
struct Dependents<'a> {
    g: &'a Graph,
    order: &'a [NodeIndex],
    inputs: Vec<String>,
    deps: Vec<HashSet<String>>,
}

impl Dependents<'_> {
    /// The values that depend on input `k` and on no other input (its TIB candidate).
    fn only_from(&self, k: usize) -> HashSet<String> {
        self.deps[k]
            .iter()
            .filter(|v| {
                self.deps
                    .iter()
                    .enumerate()
                    .all(|(j, d)| j == k || !d.contains(*v))
            })
            .cloned()
            .collect()
    }

    /// Whether some Sin/Cos reads only `tib` and constants (a sinusoidal embedding of
    /// that input alone).
    fn reaches_sinusoid(&self, tib: &HashSet<String>) -> bool {
        self.order.iter().any(|&ix| {
            let n = self.g.node(ix);
            (n.is_onnx_op("Sin") || n.is_onnx_op("Cos"))
                && n.inputs
                    .iter()
                    .all(|i| tib.contains(i) || !self.deps.iter().any(|d| d.contains(i)))
                && n.inputs.iter().any(|i| tib.contains(i))
        })
    }

    /// The time-step input (its position among the inputs) and how it was found: named
    /// by `--timestep-input`, else the (first) input whose values alone reach Sin/Cos.
    fn timestep_input(&self, override_input: Option<&str>) -> Result<(usize, String)> {
        let (g, inputs) = (self.g, &self.inputs);
        if let Some(name) = override_input {
            let k = inputs.iter().position(|i| i == name).ok_or_else(|| {
                Error::invalid(format!(
                    "--timestep-input '{name}' is not a graph input (inputs: {})",
                    inputs.join(", ")
                ))
            })?;
            return Ok((k, "given by --timestep-input".to_string()));
        }
        let candidates: Vec<usize> = (0..inputs.len())
            .filter(|&k| self.reaches_sinusoid(&self.only_from(k)))
            .collect();
        match candidates.as_slice() {
            [] => {
                let any_sin = self
                    .order
                    .iter()
                    .any(|&ix| g.node(ix).is_onnx_op("Sin") || g.node(ix).is_onnx_op("Cos"));
                let why = if any_sin {
                    "no graph input reaches Sin/Cos on its own (the sinusoidal embedding mixes several inputs or is constant)"
                } else {
                    "the graph has no Sin/Cos: no sinusoidal time-step embedding"
                };
                Err(Error::pass(
                    "detect-tib",
                    format!("no time-step input found: {why} (inputs: {}); name it with --timestep-input NAME", inputs.join(", ")),
                ))
            }
            [k] => Ok((
                *k,
                format!(
                    "detected: its values alone reach Sin/Cos, dtype {}",
                    g.inputs[*k].type_string()
                ),
            )),
            [k, ..] => {
                let names: Vec<&str> = candidates.iter().map(|&c| inputs[c].as_str()).collect();
                Ok((
                    *k,
                    format!(
                        "detected: first of {} inputs reaching Sin/Cos alone ({})",
                        names.len(),
                        names.join(", ")
                    ),
                ))
            }
        }
    }
}

/// The index value: from `t`, the chain of list-preserving ops while it stays in the TIB
/// at rank ≤ 1 (what the tables are indexed by; later values are per-step tables).
fn index_value(g: &Graph, tib: &HashSet<String>, ranks: &mut Ranks, t: &str) -> String {
    let mut index = t.to_string();
    loop {
        let readers: Vec<_> = g
            .consumers(&index)
            .into_iter()
            .filter(|(ix, _)| !SHAPE_ONLY.contains(&g.node(*ix).op_type.as_str()))
            .collect();
        let [(ix, slot)] = readers.as_slice() else {
            break;
        };
        if *slot != 0 && !is_broadcast_identity(g, g.node(*ix)) {
            break;
        }
        let n = g.node(*ix);
        if !(CHAIN_OPS.contains(&n.op_type.as_str()) || is_broadcast_identity(g, n))
            || n.outputs.len() != 1
        {
            break;
        }
        let out = n.outputs[0].clone();
        if !tib.contains(&out) || ranks.rank(&out).is_none_or(|r| r > 1) {
            break;
        }
        index = out;
    }
    index
}

/// The fold region: the nodes (in order) computable from the index value and constants,
/// deterministic and without subgraphs; by name and as a set.
fn fold_region(
    g: &Graph,
    order: &[NodeIndex],
    index: &str,
    statics: &HashSet<String>,
) -> (Vec<String>, HashSet<NodeIndex>) {
    let mut region: HashSet<String> = HashSet::from([index.to_string()]);
    let mut fold_nodes = vec![];
    let mut fold_set = HashSet::new();
    for &ix in order {
        let n = g.node(ix);
        // The chain up to the index value is upstream of it, so never in the region.
        if !n.implicit_inputs().is_empty() || NONDETERMINISTIC.contains(&n.op_type.as_str()) {
            continue;
        }
        let all_known = n
            .inputs
            .iter()
            .all(|i| i.is_empty() || region.contains(i) || statics.contains(i));
        let reads_region = n.inputs.iter().any(|i| region.contains(i));
        if all_known && reads_region {
            region.extend(n.outputs.iter().filter(|o| !o.is_empty()).cloned());
            fold_nodes.push(n.name.clone());
            fold_set.insert(ix);
        }
    }
    (fold_nodes, fold_set)
}

/// The frontier: the region's values read outside it (or graph outputs), with who reads
/// them: what the tables replace.
fn frontier(
    g: &Graph,
    order: &[NodeIndex],
    fold_set: &HashSet<NodeIndex>,
    ranks: &mut Ranks,
) -> Vec<FrontierValue> {
    let mut frontier = vec![];
    for &ix in order {
        if !fold_set.contains(&ix) {
            continue;
        }
        for o in &g.node(ix).outputs {
            let mut joins: Vec<String> = g
                .consumers(o)
                .into_iter()
                .filter(|(c, _)| !fold_set.contains(c))
                .map(|(c, _)| format!("{} ({})", g.node(c).name, g.node(c).op_type))
                .collect();
            if g.is_graph_output(o) {
                joins.push("graph output".into());
            }
            joins.dedup();
            if !joins.is_empty() {
                frontier.push(FrontierValue {
                    name: o.clone(),
                    ty: ranks.type_string(o),
                    joins,
                });
            }
        }
    }
    frontier
}

/// Finds the time-step input and the TIB: the input ([`Dependents::timestep_input`]),
/// the index value ([`index_value`]), the foldable region ([`fold_region`], which must
/// hold the sinusoid) and its frontier ([`frontier`]).
pub fn detect(model: &Model, override_input: Option<&str>) -> Result<TibAnalysis> {
    let g = &model.graph;
    let order = g.topo_order()?;
    let inputs: Vec<String> = g.inputs.iter().map(|i| i.name.clone()).collect();
    let deps: Vec<HashSet<String>> = inputs
        .iter()
        .map(|i| data_dependents(g, &order, i))
        .collect();
    let dependents = Dependents {
        g,
        order: &order,
        inputs,
        deps,
    };
    let (k, found_by) = dependents.timestep_input(override_input)?;
    let t = dependents.inputs[k].clone();
    let tib = dependents.only_from(k);
    let statics = static_values(g, &order);
    let mut ranks = Ranks {
        g,
        facts: None,
        model,
    };
    let index = index_value(g, &tib, &mut ranks, &t);
    let (fold_nodes, fold_set) = fold_region(g, &order, &index, &statics);
    let has_sinusoid = fold_set
        .iter()
        .any(|&ix| g.node(ix).is_onnx_op("Sin") || g.node(ix).is_onnx_op("Cos"));
    if !has_sinusoid {
        return Err(Error::pass(
            "detect-tib",
            format!("input '{t}' does not reach a Sin/Cos through constant-only ops from '{index}': no foldable time embedding"),
        ));
    }
    let frontier = frontier(g, &order, &fold_set, &mut ranks);
    let tib_nodes = order
        .iter()
        .filter(|&&ix| {
            let n = g.node(ix);
            !n.outputs.is_empty() && n.outputs.iter().all(|o| tib.contains(o))
        })
        .count();
    Ok(TibAnalysis {
        timestep_input: t,
        found_by,
        index_value: index,
        tib_nodes,
        fold_nodes,
        frontier,
    })
}
