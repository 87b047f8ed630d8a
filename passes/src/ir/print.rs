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
    let mut s = String::new();
    let order = match g.topo_order() {
        Ok(o) => o,
        Err(e) => return format!("<unprintable graph: {e}>\n"),
    };
    // `Graph::info` scans the graph's inputs and outputs per lookup: a file may have as
    // many of them as nodes, so they are indexed once here.
    let io: std::collections::HashMap<&str, &crate::ir::ValueInfo> = g
        .outputs
        .iter()
        .rev()
        .chain(g.inputs.iter().rev())
        .map(|v| (v.name.as_str(), v))
        .collect();
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
        let _ = writeln!(s, "{} = {op}({}){attrs}", outs.join(", "), ins.join(", "));
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
