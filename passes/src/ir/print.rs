//! The IR as text: one line per node in topological order. This is what `inspect`
//! prints, what `--print-after-all` dumps and what the insta snapshots hold, so it must
//! stay stable and readable: values by name, initializers marked `@`, shapes and dtypes
//! of every output, attributes sorted by name, large constants summarised.

use std::fmt::Write;

use tract_onnx::pb;

use super::graph::Graph;
use super::model::Model;
use super::tensor::{DType, Tensor};

/// Up to this many elements a tensor (initializer input or attribute) is printed in full.
const INLINE_ELEMENTS: usize = 8;

pub fn model_summary(m: &Model) -> String {
    let g = &m.graph;
    let mut s = String::new();
    let opsets: Vec<String> = m
        .opsets
        .iter()
        .map(|(d, v)| format!("{}={v}", if d.is_empty() { "ai.onnx" } else { d }))
        .collect();
    let producer = format!("{} {}", m.producer_name, m.producer_version);
    let producer = if producer.trim().is_empty() {
        "unknown"
    } else {
        producer.trim()
    };
    let _ = writeln!(
        s,
        "model {:?}: ir {}, opsets {}, producer {producer}",
        g.name,
        m.ir_version,
        opsets.join(" ")
    );
    let _ = writeln!(s, "inputs:");
    for i in &g.inputs {
        let _ = writeln!(s, "  {}: {}", i.name, i.type_string());
    }
    let _ = writeln!(s, "outputs:");
    for o in &g.outputs {
        let _ = writeln!(s, "  {}: {}", o.name, o.type_string());
    }
    let (params, bytes) = g.parameter_stats();
    let _ = writeln!(
        s,
        "initializers: {} tensors, {} parameters, {} bytes",
        g.initializers.len(),
        params,
        bytes
    );
    let ops: Vec<String> = g
        .op_counts()
        .iter()
        .map(|(k, v)| format!("{k}×{v}"))
        .collect();
    let _ = writeln!(s, "nodes: {} ({})", g.node_count(), ops.join(" "));
    if !m.metadata.is_empty() {
        let _ = writeln!(s, "metadata:");
        for (k, v) in &m.metadata {
            let _ = writeln!(s, "  {k} = {}", truncate(v, 100));
        }
    }
    s
}

/// The graph body: one line per node.
pub fn graph_text(g: &Graph) -> String {
    match node_lines(g) {
        Ok(lines) => lines.into_iter().map(|(_, l)| l + "\n").collect(),
        Err(e) => format!("<unprintable graph: {e}>\n"),
    }
}

/// Each node's name and its line, in topological order.
fn node_lines(g: &Graph) -> crate::error::Result<Vec<(String, String)>> {
    let order = g.topo_order()?;
    // `Graph::info` scans the graph's inputs and outputs per lookup: a file may have as
    // many of them as nodes, so they are indexed once here.
    let io: std::collections::HashMap<&str, &crate::ir::ValueInfo> = g
        .outputs
        .iter()
        .rev()
        .chain(g.inputs.iter().rev())
        .map(|v| (v.name.as_str(), v))
        .collect();
    let mut lines = Vec::with_capacity(order.len());
    for ix in order {
        let n = g.node(ix);
        let outs: Vec<String> = n
            .outputs
            .iter()
            .map(|o| {
                let info = if g.initializers.contains_key(o) {
                    g.info(o)
                } else {
                    io.get(o.as_str())
                        .copied()
                        .or_else(|| g.value_info.get(o))
                        .cloned()
                };
                match info {
                    Some(i) => format!("{o}: {}", i.type_string()),
                    None => format!("{o}: ?"),
                }
            })
            .collect();
        let ins: Vec<String> = n.inputs.iter().map(|i| input_text(g, i)).collect();
        let op = if n.domain.is_empty() || n.domain == "ai.onnx" {
            n.op_type.clone()
        } else {
            format!("{}.{}", n.domain, n.op_type)
        };
        let mut attrs: Vec<&pb::AttributeProto> = n.attributes.iter().collect();
        attrs.sort_by(|a, b| a.name.cmp(&b.name));
        let attrs: Vec<String> = attrs
            .iter()
            .map(|a| format!("{}={}", a.name, attr_text(a)))
            .collect();
        let attrs = if attrs.is_empty() {
            String::new()
        } else {
            format!(" {{{}}}", attrs.join(", "))
        };
        lines.push((
            n.name.clone(),
            format!("{} = {op}({}){attrs}", outs.join(", "), ins.join(", ")),
        ));
    }
    Ok(lines)
}

/// What a rewrite changed, for snapshots that should show a pass's work and not the
/// whole model: a summary line (nodes and initializers before and after, how many nodes
/// were removed, added, changed), the metadata it set, the graph inputs and outputs when
/// they changed, then the region: the removed nodes (`-`) as they were, and in the new
/// topological order the added (`+`) and changed (`~`, after the old line `-`) nodes with
/// their direct neighbours (` `: the producers of their inputs and the readers of their
/// outputs), so each change is seen where it joins the unchanged graph. Nodes are matched
/// by name.
pub fn rewrite_text(before: &Model, after: &Model) -> String {
    let (Ok(old), Ok(new)) = (node_lines(&before.graph), node_lines(&after.graph)) else {
        return "<unprintable graph>\n".into();
    };
    let old_by: std::collections::HashMap<&str, &str> =
        old.iter().map(|(n, l)| (n.as_str(), l.as_str())).collect();
    let new_by: std::collections::HashMap<&str, &str> =
        new.iter().map(|(n, l)| (n.as_str(), l.as_str())).collect();
    let removed: Vec<&(String, String)> = old
        .iter()
        .filter(|(n, _)| !new_by.contains_key(n.as_str()))
        .collect();
    let added = new
        .iter()
        .filter(|(n, _)| !old_by.contains_key(n.as_str()))
        .count();
    let changed = new
        .iter()
        .filter(|(n, l)| old_by.get(n.as_str()).is_some_and(|o| o != l))
        .count();
    let (gb, ga) = (&before.graph, &after.graph);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "rewrite: {} → {} nodes ({} removed, {added} added, {changed} changed), {} → {} initializers",
        old.len(),
        new.len(),
        removed.len(),
        gb.initializers.len(),
        ga.initializers.len()
    );
    for (k, v) in &after.metadata {
        if !before.metadata.iter().any(|(bk, bv)| bk == k && bv == v) {
            let _ = writeln!(s, "metadata: {k} = {}", truncate(v, 100));
        }
    }
    let io = |g: &Graph| -> Vec<String> {
        g.inputs
            .iter()
            .map(|v| format!("input {}: {}", v.name, v.type_string()))
            .chain(
                g.outputs
                    .iter()
                    .map(|v| format!("output {}: {}", v.name, v.type_string())),
            )
            .collect()
    };
    let (io_old, io_new) = (io(gb), io(ga));
    if io_old != io_new {
        for l in io_old.iter().filter(|l| !io_new.contains(l)) {
            let _ = writeln!(s, "- {l}");
        }
        for l in io_new.iter().filter(|l| !io_old.contains(l)) {
            let _ = writeln!(s, "+ {l}");
        }
    }
    for (_, l) in &removed {
        let _ = writeln!(s, "- {l}");
    }
    // The touched nodes of the new graph, and the names of the values they read and
    // write: a node reading or writing one of those is a neighbour.
    let touched: std::collections::HashSet<&str> = new
        .iter()
        .filter(|(n, l)| old_by.get(n.as_str()) != Some(&l.as_str()))
        .map(|(n, _)| n.as_str())
        .collect();
    let mut reads = std::collections::HashSet::new();
    let mut writes = std::collections::HashSet::new();
    for ix in ga.node_indices() {
        let n = ga.node(ix);
        if touched.contains(n.name.as_str()) {
            reads.extend(n.inputs.iter().filter(|i| !i.is_empty()).cloned());
            writes.extend(n.outputs.iter().filter(|o| !o.is_empty()).cloned());
        }
    }
    let neighbours: std::collections::HashSet<String> = ga
        .node_indices()
        .map(|ix| ga.node(ix))
        .filter(|n| {
            n.outputs.iter().any(|o| reads.contains(o))
                || n.inputs.iter().any(|i| writes.contains(i))
        })
        .map(|n| n.name.clone())
        .collect();
    for (n, l) in &new {
        match old_by.get(n.as_str()) {
            None => {
                let _ = writeln!(s, "+ {l}");
            }
            Some(o) if *o != l.as_str() => {
                let _ = writeln!(s, "- {o}\n~ {l}");
            }
            Some(_) if neighbours.contains(n) => {
                let _ = writeln!(s, "  {l}");
            }
            Some(_) => {}
        }
    }
    s
}

/// Summary followed by the graph body.
pub fn model_text(m: &Model) -> String {
    format!(
        "{}graph:\n{}",
        model_summary(m),
        indent(&graph_text(&m.graph))
    )
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

fn input_text(g: &Graph, name: &str) -> String {
    if name.is_empty() {
        return "_".into();
    }
    match g.initializers.get(name) {
        Some(t) => format!("@{name}{}", tensor_text(t)),
        None => name.to_string(),
    }
}

/// `:f32[32,1,3,3]` for large tensors, `=[1, 2]` / `=f32 0.5` for small ones.
pub fn tensor_text(t: &Tensor) -> String {
    if t.numel() <= INLINE_ELEMENTS && t.dtype != DType::String {
        if let Ok(v) = t.to_f64_lossy() {
            let vals: Vec<String> = v.iter().map(|x| fmt_num(*x, t.dtype)).collect();
            let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
            return if t.shape.is_empty() {
                format!("={} {}", t.dtype, vals[0])
            } else {
                format!("={}[{}]{{{}}}", t.dtype, shape.join(","), vals.join(","))
            };
        }
    }
    let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
    format!(":{}[{}]", t.dtype, shape.join(","))
}

fn fmt_num(x: f64, dt: DType) -> String {
    if dt.is_float() {
        // Shortest round-trip form of the f32 value keeps snapshots exact and short.
        format!("{}", x as f32)
    } else {
        format!("{}", x as i64)
    }
}

fn attr_text(a: &pb::AttributeProto) -> String {
    use pb::attribute_proto::AttributeType as T;
    let ty = T::try_from(a.r#type).unwrap_or(T::Undefined);
    match ty {
        T::Float => format!("{}", a.f),
        T::Int => a.i.to_string(),
        T::String => format!("{:?}", String::from_utf8_lossy(&a.s)),
        T::Floats => format!("{:?}", a.floats),
        T::Ints => format!("{:?}", a.ints),
        T::Strings => {
            let v: Vec<String> = a
                .strings
                .iter()
                .map(|s| String::from_utf8_lossy(s).into())
                .collect();
            format!("{v:?}")
        }
        T::Tensor => match a
            .t
            .as_ref()
            .map(|t| crate::ir::onnx::tensor_from_proto(t, None))
        {
            Some(Ok(t)) => format!("tensor{}", tensor_text(&t)),
            _ => "tensor<?>".into(),
        },
        T::Graph => format!(
            "graph<{} nodes>",
            a.g.as_ref().map(|g| g.node.len()).unwrap_or(0)
        ),
        T::Graphs => format!("graphs<{}>", a.graphs.len()),
        T::Tensors => format!("tensors<{}>", a.tensors.len()),
        T::SparseTensor | T::SparseTensors => "sparse<…>".into(),
        T::TypeProto | T::TypeProtos => "type<…>".into(),
        T::Undefined => {
            if !a.ref_attr_name.is_empty() {
                format!("ref({})", a.ref_attr_name)
            } else {
                "?".into()
            }
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}
