//! The short names of the file tfmqc writes.
//!
//! Passes name what they add after what it is for (`x_quantized`, `tib/table/…/int8`,
//! `fsc/group_of_4`): the dumps between passes read well, and a pass finds what an earlier
//! one added. In the written file those names cost bytes, and so do the exporter's names
//! of the model's own graph (`/down_blocks.0/resnets.0/norm1/GroupNorm_output_0`: on
//! unet2d_cond 132 kB of a 1.1 MB file). When the pipeline is done, [`shorten`] gives
//! every value, initializer and node not in its `keep` set a short name from one
//! per-graph counter, prefixed with its kind: `w12` an integer weight, `s12` / `z12` a Q/DQ
//! scale and zero point, `t3` a temporal-feature table (and the constants decoding it),
//! `st5` a per-step scale table, `f7` another float tensor, `c9` another constant; `q12` a
//! QuantizeLinear's output, `d13` a DequantizeLinear's, `g4` a Gather's, `v8` any other
//! node's; a node takes its first output's name (`n2` when all it writes keeps its name).
//! The kinds come from the graph's structure ([`const_kinds`]), as the report and the
//! runtime read them. What `keep` names (the pipeline's: graph inputs and outputs and the
//! TIB frontier, or every name of the input model under `--keep-names`) stays, and no
//! short name equals a name the model holds.

use std::collections::{HashMap, HashSet};

use tfmqc_runtime::classify::{self, ConstKind, ConstRef, NodeRef};

use super::graph::{Graph, Node};
use super::model::Model;
use super::tensor::DType;
use crate::error::Result;

/// Every name a model holds: graph inputs and outputs, initializers, node outputs, node
/// names and typed values (what `--keep-names` keeps).
pub fn all_names(m: &Model) -> HashSet<String> {
    let g = &m.graph;
    let mut names: HashSet<String> = HashSet::new();
    names.extend(g.inputs.iter().map(|v| v.name.clone()));
    names.extend(g.outputs.iter().map(|v| v.name.clone()));
    names.extend(g.initializers.keys().cloned());
    names.extend(g.value_info.keys().cloned());
    for ix in g.node_indices() {
        let n = g.node(ix);
        names.insert(n.name.clone());
        names.extend(n.outputs.iter().cloned());
    }
    names
}

/// The kind of every initializer of `m` by structure ([`classify::classify`]); t is the
/// graph input the `tfmqc.timestep_input` metadata names.
pub fn const_kinds(m: &Model) -> HashMap<String, ConstKind> {
    let g = &m.graph;
    let order: Vec<&Node> = g.node_indices().map(|ix| g.node(ix)).collect();
    let nodes: Vec<NodeRef> = order
        .iter()
        .map(|n| NodeRef::new(&n.op_type, &n.domain, &n.inputs, &n.outputs))
        .collect();
    let consts: HashMap<&str, ConstRef> = g
        .initializers
        .iter()
        .map(|(k, t)| {
            let c = ConstRef {
                low_bit_int: matches!(t.dtype, DType::I8 | DType::U8 | DType::I4 | DType::U4),
                f32: t.dtype == DType::F32,
                numel: t.numel(),
            };
            (k.as_str(), c)
        })
        .collect();
    let t = m.metadata_value(tfmqc_runtime::meta::TIMESTEP_INPUT);
    classify::classify(&nodes, &consts, t)
}

/// Renames every value, initializer and node name not in `keep` to a short kind-prefixed
/// name, as the module documentation says; returns the maps old name → new name. Graph
/// inputs and outputs and values read by subgraphs keep their names whatever made them.
/// Value types (`value_info`), quantization annotations and the `tfmqc.tib.frontier`
/// metadata follow the renaming.
pub fn shorten(m: &mut Model, keep: &HashSet<String>) -> Result<Renamed> {
    let kinds = const_kinds(m);
    let g = &m.graph;
    let order = g.topo_order()?;
    let mut fixed: HashSet<String> = keep.clone();
    fixed.extend(g.inputs.iter().map(|v| v.name.clone()));
    fixed.extend(g.outputs.iter().map(|v| v.name.clone()));
    for &ix in &order {
        fixed.extend(g.node(ix).implicit_inputs());
    }
    // Short names must not meet any name that stays: none equals a name the model holds
    // now (also those about to be renamed, which costs nothing).
    let mut taken: HashSet<String> = all_names(m);
    taken.extend(fixed.iter().cloned());
    let mut map: HashMap<String, String> = HashMap::new();
    let mut node_names: Vec<Option<String>> = Vec::with_capacity(order.len());
    let mut nodes: HashMap<String, String> = HashMap::new();
    let mut counter = 0usize;
    let fresh = |prefix: &str, k: usize, taken: &mut HashSet<String>| {
        let base = format!("{prefix}{k}");
        let name = std::iter::once(base.clone())
            .chain((1..).map(|j| format!("{base}_{j}")))
            .find(|n| !taken.contains(n))
            .expect("infinite names");
        taken.insert(name.clone());
        name
    };
    for &ix in &order {
        let n = g.node(ix);
        let k = counter;
        let mut named = false;
        for (slot, i) in n.inputs.iter().enumerate() {
            let Some(t) = g.initializers.get(i) else {
                continue;
            };
            if fixed.contains(i) || map.contains_key(i) {
                continue;
            }
            let qdq = n.is_onnx_op("QuantizeLinear") || n.is_onnx_op("DequantizeLinear");
            let prefix = match kinds.get(i) {
                Some(ConstKind::Table) => "t",
                Some(ConstKind::ScaleTable) => "st",
                Some(ConstKind::WeightInt) => "w",
                _ if qdq && slot == 1 => "s",
                _ if qdq && slot == 2 => "z",
                _ if t.dtype == DType::F32 && t.numel() > 1 => "f",
                _ => "c",
            };
            map.insert(i.clone(), fresh(prefix, k, &mut taken));
            named = true;
        }
        let prefix = match n.op_type.as_str() {
            _ if !(n.domain.is_empty() || n.domain == "ai.onnx") => "v",
            "QuantizeLinear" => "q",
            "DequantizeLinear" => "d",
            "Gather" => "g",
            _ => "v",
        };
        for o in n.outputs.iter().filter(|o| !o.is_empty()) {
            if !fixed.contains(o) {
                map.insert(o.clone(), fresh(prefix, k, &mut taken));
                named = true;
            }
        }
        let node_name = if keep.contains(&n.name) {
            None
        } else {
            let first = n.outputs.iter().find_map(|o| map.get(o)).cloned();
            named = true;
            let short = first.unwrap_or_else(|| fresh("n", k, &mut taken));
            if !n.name.is_empty() {
                nodes.insert(n.name.clone(), short.clone());
            }
            Some(short)
        };
        node_names.push(node_name);
        if named {
            counter += 1;
        }
    }
    let rename = |v: &String| map.get(v).cloned().unwrap_or_else(|| v.clone());
    let old = std::mem::take(&mut m.graph);
    let mut g = Graph::new(old.name.clone());
    g.doc_string = old.doc_string.clone();
    g.inputs = old.inputs.clone();
    g.outputs = old.outputs.clone();
    g.sparse_initializers = old.sparse_initializers.clone();
    g.initializers = old
        .initializers
        .iter()
        .map(|(k, t)| (rename(k), t.clone()))
        .collect();
    g.value_info = old
        .value_info
        .values()
        .map(|v| {
            let mut v = v.clone();
            v.name = rename(&v.name);
            (v.name.clone(), v)
        })
        .collect();
    g.quantization_annotation = old.quantization_annotation.clone();
    for a in &mut g.quantization_annotation {
        a.tensor_name = a.tensor_name.as_ref().map(rename);
        for e in &mut a.quant_parameter_tensor_names {
            e.value = rename(&e.value);
        }
    }
    for (&ix, name) in order.iter().zip(node_names) {
        let mut n = old.node(ix).clone();
        if let Some(name) = name {
            n.name = name;
        }
        n.inputs = n.inputs.iter().map(&rename).collect();
        n.outputs = n.outputs.iter().map(&rename).collect();
        g.add_node(n)?;
    }
    m.graph = g;
    if let Some(f) = m.metadata_value(tfmqc_runtime::meta::TIB_FRONTIER) {
        let f: Vec<String> = f.split(',').map(|v| rename(&v.to_string())).collect();
        m.set_metadata(tfmqc_runtime::meta::TIB_FRONTIER, f.join(","));
    }
    Ok(Renamed { values: map, nodes })
}

/// What [`shorten`] renamed, old name → new name. Node names are apart from value names:
/// ONNX keeps them in two namespaces, and a node takes its output's short name.
#[derive(Clone, Debug, Default)]
pub struct Renamed {
    /// Values and initializers.
    pub values: HashMap<String, String>,
    /// Nodes.
    pub nodes: HashMap<String, String>,
}

impl Renamed {
    pub fn is_empty(&self) -> bool {
        self.values.is_empty() && self.nodes.is_empty()
    }
}

/// The renaming as text (the dumps' `NN-names.txt`): one `short ← long` line per value,
/// then one `node short ← long` line per node, each in the order of the short names'
/// numbers.
pub fn map_text(map: &Renamed) -> String {
    let mut text = lines(&map.values, "");
    text.push_str(&lines(&map.nodes, "node "));
    text
}

fn lines(map: &HashMap<String, String>, tag: &str) -> String {
    let mut pairs: Vec<(&String, &String)> = map.iter().map(|(a, b)| (b, a)).collect();
    let number = |s: &str| -> (usize, String) {
        let digits: String = s
            .chars()
            .skip_while(|c| !c.is_ascii_digit())
            .take_while(|c| c.is_ascii_digit())
            .collect();
        (digits.parse().unwrap_or(usize::MAX), s.to_string())
    };
    pairs.sort_by_key(|(short, _)| number(short));
    pairs
        .into_iter()
        .map(|(short, long)| format!("{tag}{short} ← {long}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{attr, Tensor, ValueInfo};

    /// x → Relu → y, with a Q/DQ pair a pass adds on x.
    fn model_with_qdq() -> (Model, HashSet<String>) {
        let mut m = Model::default();
        let g = &mut m.graph;
        g.inputs.push(ValueInfo::new("x", DType::F32, vec![]));
        g.outputs.push(ValueInfo::new("y", DType::F32, vec![]));
        g.add_node(Node::new(
            "relu",
            "Relu",
            vec!["x".into()],
            vec!["y".into()],
        ))
        .unwrap();
        let keep = all_names(&m);
        let g = &mut m.graph;
        let s = g.add_initializer("x_scale", Tensor::scalar(0.5f32));
        let z = g.add_initializer("x_zero_point", Tensor::from_vec(vec![], &[0u8]));
        let q = g
            .add_op(
                "QuantizeLinear",
                vec!["x".into(), s.clone(), z.clone()],
                "x_quantized",
                vec![],
            )
            .unwrap();
        let d = g
            .add_op("DequantizeLinear", vec![q, s, z], "x_dequantized", vec![])
            .unwrap();
        let (relu, _) = g.producer("y").unwrap();
        g.set_input(relu, 0, &d);
        (m, keep)
    }

    #[test]
    fn generated_names_become_short_and_kind_prefixed() {
        let (mut m, keep) = model_with_qdq();
        let map = shorten(&mut m, &keep).unwrap().values;
        assert_eq!(map["x_scale"], "s0");
        assert_eq!(map["x_zero_point"], "z0");
        assert_eq!(map["x_quantized"], "q0");
        assert_eq!(map["x_dequantized"], "d1");
        let g = &m.graph;
        let (q, _) = g.producer("q0").unwrap();
        assert_eq!(g.node(q).name, "q0");
        assert_eq!(g.node(q).inputs, ["x", "s0", "z0"]);
        let (relu, _) = g.producer("y").unwrap();
        assert_eq!(g.node(relu).name, "relu", "the model's own names stay");
        assert_eq!(g.node(relu).inputs, ["d1"]);
        g.validate().unwrap();
    }

    #[test]
    fn short_names_never_meet_the_models_own() {
        let (mut m, _) = model_with_qdq();
        // The model itself has a value called `s0`.
        m.graph
            .add_node(
                Node::new("id", "Identity", vec!["x".into()], vec!["s0".into()])
                    .with_attr(attr::int("unused", 0)),
            )
            .unwrap();
        let keep: HashSet<String> = ["x", "y", "relu", "id", "s0"]
            .into_iter()
            .map(String::from)
            .collect();
        let map = shorten(&mut m, &keep).unwrap().values;
        assert_eq!(map["x_scale"], "s0_1");
        assert!(m.graph.producer("s0").is_some());
        m.graph.validate().unwrap();
    }

    #[test]
    fn the_models_own_names_shorten_unless_kept() {
        let (mut m, _) = model_with_qdq();
        m.graph
            .add_initializer("relu/unused_bias", Tensor::scalar(1.0f32));
        let keep: HashSet<String> = ["x", "y"].into_iter().map(String::from).collect();
        let map = shorten(&mut m, &keep).unwrap();
        let g = &m.graph;
        let (relu, _) = g.producer("y").unwrap();
        assert_eq!(
            map.nodes["relu"],
            g.node(relu).name,
            "the node's name is in the map"
        );
        assert!(map_text(&map).contains(&format!("node {} ← relu\n", g.node(relu).name)));
        assert!(g.node(relu).name.len() <= 3, "{}", g.node(relu).name);
        assert_eq!(g.inputs[0].name, "x");
        assert_eq!(g.outputs[0].name, "y");
        // An initializer no node reads keeps its name; no short name meets it.
        assert!(g.initializers.contains_key("relu/unused_bias"));
        g.validate().unwrap();
    }
}
