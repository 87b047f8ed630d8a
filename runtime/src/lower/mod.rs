//! The int8 lowering as one graph rewrite: find every node the runtime runs on its own
//! ops ([`crate::ops`]; the submodules here each match one op's pattern and write its
//! node), replace it, and drop what the replaced nodes leave dead, so tract never loads
//! it.
//!
//! Memory is the point at SD scale (860M weights): the int8 weights must not pass
//! through tract as constants (tract loads every initializer of the graph it is given,
//! then folds a small weight's DequantizeLinear into an f32 copy, or keeps a large one's
//! in the plan and runs it on every call), and the proto handed to tract must not be a
//! copy of the model. So the weight initializer is
//! moved (not copied) into the lowered node's `weight` attribute; an external-data
//! weight stays a reference to its file there, and the op builder packs it straight from
//! a memory map of that file. The Q/DQ nodes and scale / weight initializers only the
//! replaced nodes read are removed.

mod attention;
pub mod bias;
mod conv;
mod conv_f32;
mod gemm;
mod group_norm;
mod matmul;
mod prescale;
mod qdq;
mod requant;
mod residual;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::Path;

use tract_onnx::pb;

use crate::error::{Error, Result};
use crate::tensor_data::{tensor_bytes, tensor_f32, DataFiles};

/// One node to replace: the new node, and the initializer to move into its `weight`
/// attribute (a tensor attribute, so the builder sees dims, type and data together).
pub(crate) struct Rewrite {
    pub node: pb::NodeProto,
    pub weight: Option<String>,
}

/// Lookups into a graph for the matchers: producers and initializers by name, and the
/// values of small initializers (scales, zero points, biases), which may be external
/// data too.
pub(crate) struct Index<'g> {
    pub graph: &'g pb::GraphProto,
    producers: HashMap<&'g str, usize>,
    /// How many node inputs and graph outputs read each value.
    readers: HashMap<String, usize>,
    initializers: HashMap<&'g str, usize>,
    model_dir: Option<&'g Path>,
    data: RefCell<DataFiles>,
    /// The first unreadable initializer met (the matchers read values as `Option`s).
    error: RefCell<Option<String>>,
}

impl<'g> Index<'g> {
    fn new(graph: &'g pb::GraphProto, model_dir: Option<&'g Path>) -> Index<'g> {
        let mut producers = HashMap::new();
        for (i, n) in graph.node.iter().enumerate() {
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                producers.insert(o.as_str(), i);
            }
        }
        let mut reads_of = vec![];
        for n in &graph.node {
            reads(n, &mut reads_of);
        }
        reads_of.extend(graph.output.iter().map(|o| o.name.clone()));
        let mut readers = HashMap::new();
        for v in reads_of {
            *readers.entry(v).or_default() += 1;
        }
        let initializers = graph
            .initializer
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        Index {
            graph,
            producers,
            readers,
            initializers,
            model_dir,
            data: RefCell::default(),
            error: RefCell::default(),
        }
    }

    pub fn producer(&self, value: &str) -> Option<&'g pb::NodeProto> {
        self.producers.get(value).map(|&i| &self.graph.node[i])
    }

    /// Whether `value` is read exactly once (by one node input; not a graph output).
    pub fn read_once(&self, value: &str) -> bool {
        self.readers(value) == 1
    }

    /// How many node inputs and graph outputs read `value`.
    pub fn readers(&self, value: &str) -> usize {
        self.readers.get(value).copied().unwrap_or(0)
    }

    /// The initializer `name`; for the output of a constant int32 DequantizeLinear (an
    /// int32 bias, [`Index::dequantized_i32`]), the int32 initializer behind it: its dims
    /// are the bias's (what a matcher's shape checks read; its values come from
    /// [`Index::f32s`]).
    pub fn initializer(&self, name: &str) -> Option<&'g pb::TensorProto> {
        match self.initializers.get(name) {
            Some(&i) => Some(&self.graph.initializer[i]),
            None => self.dequantized_i32_source(name),
        }
    }

    /// The int32 initializer a `DequantizeLinear` producing `value` reads.
    fn dequantized_i32_source(&self, value: &str) -> Option<&'g pb::TensorProto> {
        let dq = self
            .producer(value)
            .filter(|p| p.op_type == "DequantizeLinear" && p.domain.is_empty())?;
        let &i = self.initializers.get(dq.input.first()?.as_str())?;
        let t = &self.graph.initializer[i];
        (t.data_type == pb::tensor_proto::DataType::Int32 as i32 && t.dims.len() <= 1).then_some(t)
    }

    fn note(&self, e: String) {
        self.error.borrow_mut().get_or_insert(e);
    }

    /// The initializer `name` as f32 values, or the value of a constant int32
    /// DequantizeLinear ([`Index::dequantized_i32`]); `None`: neither, not f32, or
    /// unreadable, which is remembered as the lowering's error.
    pub fn f32s(&self, name: &str) -> Option<Vec<f32>> {
        let Some(&i) = self.initializers.get(name) else {
            return self.dequantized_i32(name);
        };
        let t = &self.graph.initializer[i];
        tensor_f32(t, self.model_dir, &mut self.data.borrow_mut())
            .map_err(|e| self.note(e))
            .ok()
            .flatten()
    }

    /// The int32 initializer `name` (scalar or 1-D).
    fn i32s(&self, name: &str) -> Option<Vec<i32>> {
        let t = self
            .initializer(name)
            .filter(|t| t.data_type == pb::tensor_proto::DataType::Int32 as i32)?;
        if !t.int32_data.is_empty() {
            return Some(t.int32_data.clone());
        }
        let b = tensor_bytes(t, self.model_dir, Some(&mut self.data.borrow_mut()))
            .map_err(|e| self.note(e))
            .ok()?;
        Some(
            b.chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }

    /// `value` when it is `DequantizeLinear(q, scale, 0)` of a 1-D int32 initializer with
    /// a per-tensor or per-element (axis 0) f32 scale — a bias written for onnxruntime's
    /// int8 fusion — as the f32 values it computes: `q · scale`.
    fn dequantized_i32(&self, value: &str) -> Option<Vec<f32>> {
        let dq = self
            .producer(value)
            .filter(|p| p.op_type == "DequantizeLinear" && p.domain.is_empty())?;
        self.dequantized_i32_source(value)?;
        let q = self.i32s(dq.input.first()?)?;
        let scale = self.initializer(dq.input.get(1)?).and_then(|t| {
            tensor_f32(t, self.model_dir, &mut self.data.borrow_mut())
                .map_err(|e| self.note(e))
                .ok()
                .flatten()
        })?;
        if let Some(z) = dq.input.get(2).filter(|z| !z.is_empty()) {
            if !self.i32s(z)?.iter().all(|&z| z == 0) {
                return None;
            }
        }
        let axis = dq
            .attribute
            .iter()
            .find(|a| a.name == "axis")
            .map_or(1, |a| a.i);
        let per_element = scale.len() == q.len() && matches!(axis, 0 | -1);
        if !(scale.len() == 1 || per_element) {
            return None;
        }
        Some(
            q.iter()
                .enumerate()
                .map(|(i, &v)| v as f32 * scale[if per_element { i } else { 0 }])
                .collect(),
        )
    }

    /// The bytes of the initializer `name` (zero points: 8-bit values).
    pub fn bytes(&self, name: &str) -> Option<Vec<u8>> {
        let t = self.initializer(name)?;
        tensor_bytes(t, self.model_dir, Some(&mut self.data.borrow_mut()))
            .map(|b| b.to_vec())
            .map_err(|e| self.note(e))
            .ok()
    }
}

/// Values a node reads, including those the bodies of its subgraph attributes (If,
/// Loop, Scan) read from the enclosing scope.
fn reads(n: &pb::NodeProto, out: &mut Vec<String>) {
    out.extend(n.input.iter().filter(|i| !i.is_empty()).cloned());
    for a in &n.attribute {
        if let Some(g) = &a.g {
            for inner in &g.node {
                reads(inner, out);
            }
        }
    }
}

/// What the lowering decided, before it is applied to the proto.
struct Plan {
    /// Per node of the graph: its replacement (index into `rewrites`), and whether it
    /// stays (is still read by something after the rewrites).
    replaced: HashMap<usize, usize>,
    rewrites: Vec<Rewrite>,
    live_nodes: Vec<bool>,
    live_initializers: Vec<bool>,
}

impl Plan {
    /// Rewritten nodes on the int8 kernels that stay in the graph (a product fused into
    /// an attention node is rewritten, then left dead; fused group norms and small float
    /// convolutions are float).
    fn lowered(&self) -> usize {
        let float = [
            crate::ops::group_norm::GROUP_NORM,
            crate::ops::conv_f32::CONV_F32,
        ];
        self.replaced
            .iter()
            .filter(|&(&i, &r)| {
                self.live_nodes[i] && !float.contains(&self.rewrites[r].node.op_type.as_str())
            })
            .count()
    }
}

fn plan(g: &pb::GraphProto, model_dir: Option<&Path>, keep: &[String]) -> Result<Plan> {
    let ix = Index::new(g, model_dir);
    let mut replaced = HashMap::new();
    let mut rewrites = vec![];
    // A float model (no DequantizeLinear) keeps tract's own ops everywhere: it is the
    // reference calibration and evaluation run through tract, and the runtime's sampler
    // must feed it the same bits (tests/sampler.rs); the direct float conv differs from
    // tract's by rounding, so it serves quantized models only.
    let quantized = g.node.iter().any(|n| n.op_type == "DequantizeLinear");
    for (i, n) in g.node.iter().enumerate() {
        if !(n.domain.is_empty() || n.domain == "ai.onnx") {
            continue;
        }
        // Weight products first: a MatMul with a constant int8 weight is a QGemm; one of
        // two quantized activations is a QMatMul (a weight's DequantizeLinear reads an
        // initializer, never a QuantizeLinear, so the two never both match).
        // Attention (`P·V` of a quantized softmax of a quantized product) before the
        // plain products: its score product is then left dead, unless read elsewhere.
        let rewrite = conv::match_conv(&ix, n)
            .or_else(|| gemm::match_gemm(&ix, n))
            .or_else(|| attention::match_attention(&ix, n))
            .or_else(|| matmul::match_matmul(&ix, n))
            .or_else(|| group_norm::match_group_norm(&ix, n))
            // The float convolutions the compiler leaves (stem and head), after the
            // int8 matchers: a Conv behind weight quantizers never has an f32 weight.
            .or_else(|| {
                quantized
                    .then(|| conv_f32::match_conv_f32(&ix, n))
                    .flatten()
            });
        if let Some(mut r) = rewrite {
            // A linear layer's bias Add (`bias`), then an output Q/DQ pair on a Conv /
            // Gemm (`crate::ops::requant`): the rewrite replaces the last node it took in
            // (the Add, the pair's DequantizeLinear), and the ones before are left dead.
            let at = bias::fuse_bias_add(&ix, &mut r, keep).unwrap_or(i);
            let at = requant::fuse_output_pair(&ix, &mut r).unwrap_or(at);
            replaced.insert(at, rewrites.len());
            rewrites.push(r);
        }
    }
    // A conv's residual Add into its epilogue (`crate::ops::residual`), once every
    // rewrite is known (the Add comes after the conv in the graph).
    residual::fuse_residual_adds(&ix, &mut replaced, &mut rewrites, keep);
    if let Some(e) = ix.error.into_inner() {
        return Err(Error::InvalidModel(e));
    }
    // Liveness from the graph outputs (and the values the caller asks for) backwards,
    // through the rewritten nodes.
    let mut live_nodes = vec![false; g.node.len()];
    let mut needed: HashSet<String> = HashSet::new();
    let mut stack: Vec<String> = g
        .output
        .iter()
        .map(|o| o.name.clone())
        .chain(keep.iter().cloned())
        .collect();
    while let Some(v) = stack.pop() {
        if !needed.insert(v.clone()) {
            continue;
        }
        let Some(&i) = ix.producers.get(v.as_str()) else {
            continue;
        };
        if live_nodes[i] {
            continue;
        }
        live_nodes[i] = true;
        let node = match replaced.get(&i) {
            Some(&r) => &rewrites[r].node,
            None => &g.node[i],
        };
        reads(node, &mut stack);
    }
    let live_initializers = g
        .initializer
        .iter()
        .map(|t| needed.contains(&t.name))
        .collect();
    Ok(Plan {
        replaced,
        rewrites,
        live_nodes,
        live_initializers,
    })
}

fn weight_attr(t: pb::TensorProto) -> pb::AttributeProto {
    pb::AttributeProto {
        name: "weight".into(),
        r#type: pb::attribute_proto::AttributeType::Tensor as i32,
        t: Some(t),
        ..Default::default()
    }
}

/// Lowers `proto` in place (see the module documentation): every quantized Conv, Gemm
/// and MatMul with a constant int8 weight, and every MatMul / Einsum of two quantized
/// activations, becomes one of the runtime's int8 nodes (domain `ai.tfmqc`); the nodes
/// and initializers left unread are removed, and weight initializers move into the new
/// nodes (no copy). `model_dir` is where external data is found (scales and biases are
/// read here; weights stay references until the op builder packs them); `keep` names
/// values that must stay computable besides the graph outputs. Returns how many nodes
/// run on the int8 kernels (fused group norms not counted).
pub fn lower_int8(
    proto: &mut pb::ModelProto,
    model_dir: Option<&Path>,
    keep: &[String],
) -> Result<usize> {
    let Some(g) = proto.graph.as_mut() else {
        return Ok(0);
    };
    let plan = plan(g, model_dir, keep)?;
    let count = plan.lowered();
    let mut users: HashMap<String, usize> = HashMap::new();
    for r in &plan.rewrites {
        if let Some(w) = &r.weight {
            *users.entry(w.clone()).or_default() += 1;
        }
    }
    // Initializers: the unread ones leave the graph; those a lowered node takes as its
    // weight are moved into it.
    let mut removed: HashMap<String, pb::TensorProto> = HashMap::new();
    let mut dropped: HashSet<String> = HashSet::new();
    let mut kept = Vec::with_capacity(g.initializer.len());
    for (t, live) in std::mem::take(&mut g.initializer)
        .into_iter()
        .zip(&plan.live_initializers)
    {
        if *live {
            kept.push(t);
            continue;
        }
        dropped.insert(t.name.clone());
        if users.contains_key(&t.name) {
            removed.insert(t.name.clone(), t);
        }
    }
    g.initializer = kept;
    let survivors: HashMap<String, usize> = g
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    // Models of IR < 4 list initializers among the graph inputs too: a dropped one must
    // leave that list, or tract would make it an input of the model.
    g.input.retain(|i| !dropped.contains(&i.name));
    let mut rewrites: Vec<Option<Rewrite>> = plan.rewrites.into_iter().map(Some).collect();
    let old = std::mem::take(&mut g.node);
    for (i, n) in old.into_iter().enumerate() {
        if !plan.live_nodes[i] {
            continue;
        }
        let Some(&r) = plan.replaced.get(&i) else {
            g.node.push(n);
            continue;
        };
        let Rewrite { mut node, weight } = rewrites[r].take().expect("one rewrite per node");
        if let Some(w) = weight {
            let left = users.get_mut(&w).expect("counted");
            *left -= 1;
            // A weight read elsewhere too stays an initializer; the last of several
            // lowered nodes sharing one takes it.
            let t = match survivors.get(&w) {
                Some(&k) => g.initializer[k].clone(),
                None if *left == 0 => removed.remove(&w).expect("an initializer"),
                None => removed[&w].clone(),
            };
            node.attribute.insert(0, weight_attr(t));
        }
        g.node.push(node);
    }
    Ok(count)
}

/// [`lower_int8`] of a borrowed model: the lowered model is built anew, copying only the
/// initializers that survive and the weights of lowered nodes (an external-data tensor is
/// a reference: copying it copies no weights).
pub fn lowered_int8(
    proto: &pb::ModelProto,
    model_dir: Option<&Path>,
    keep: &[String],
) -> Result<(pb::ModelProto, usize)> {
    let Some(g) = proto.graph.as_ref() else {
        return Ok((proto.clone(), 0));
    };
    let plan = plan(g, model_dir, keep)?;
    let count = plan.lowered();
    let initializers: HashMap<&str, &pb::TensorProto> =
        g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut rewrites: Vec<Option<Rewrite>> = plan.rewrites.into_iter().map(Some).collect();
    let mut node = vec![];
    for (i, n) in g.node.iter().enumerate() {
        if !plan.live_nodes[i] {
            continue;
        }
        match plan.replaced.get(&i) {
            None => node.push(n.clone()),
            Some(&r) => {
                let Rewrite {
                    node: mut new,
                    weight,
                } = rewrites[r].take().expect("one rewrite per node");
                if let Some(w) = weight {
                    let t = (*initializers.get(w.as_str()).expect("an initializer")).clone();
                    new.attribute.insert(0, weight_attr(t));
                }
                node.push(new);
            }
        }
    }
    let initializer: Vec<pb::TensorProto> = g
        .initializer
        .iter()
        .zip(&plan.live_initializers)
        .filter(|(_, live)| **live)
        .map(|(t, _)| t.clone())
        .collect();
    let survivors: HashSet<&str> = initializer.iter().map(|t| t.name.as_str()).collect();
    let input = g
        .input
        .iter()
        .filter(|i| {
            survivors.contains(i.name.as_str()) || !initializers.contains_key(i.name.as_str())
        })
        .cloned()
        .collect();
    let graph = pb::GraphProto {
        node,
        name: g.name.clone(),
        initializer,
        sparse_initializer: g.sparse_initializer.clone(),
        doc_string: g.doc_string.clone(),
        input,
        output: g.output.clone(),
        value_info: g.value_info.clone(),
        quantization_annotation: g.quantization_annotation.clone(),
    };
    let model = pb::ModelProto {
        ir_version: proto.ir_version,
        opset_import: proto.opset_import.clone(),
        producer_name: proto.producer_name.clone(),
        producer_version: proto.producer_version.clone(),
        domain: proto.domain.clone(),
        model_version: proto.model_version,
        doc_string: proto.doc_string.clone(),
        graph: Some(graph),
        metadata_props: proto.metadata_props.clone(),
        // Training information and functions are not run by the runtime (and training
        // information may hold tensors of its own).
        ..Default::default()
    };
    Ok((model, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, inputs: &[&str], output: &str) -> pb::NodeProto {
        pb::NodeProto {
            name: output.into(),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    fn tensor(name: &str, data_type: i32, dims: &[i64], raw: Vec<u8>) -> pb::TensorProto {
        pb::TensorProto {
            name: name.into(),
            data_type,
            dims: dims.to_vec(),
            raw_data: raw,
            ..Default::default()
        }
    }

    fn value(name: &str) -> pb::ValueInfoProto {
        pb::ValueInfoProto {
            name: name.into(),
            ..Default::default()
        }
    }

    /// `y = Conv(DQ(Q(x)), DQ(w))` with every initializer also listed as a graph input
    /// (as models of IR < 4 do), plus `extra` nodes and outputs.
    fn conv_model(extra: Vec<pb::NodeProto>, outputs: &[&str]) -> pb::ModelProto {
        let (f32_, u8_, i8_) = (1, 2, 3);
        let initializer = vec![
            tensor("s", f32_, &[], 0.5f32.to_le_bytes().to_vec()),
            tensor("z", u8_, &[], vec![128]),
            tensor("w", i8_, &[2, 2, 1, 1], vec![1, 255, 3, 4]),
            tensor("sw", f32_, &[], 0.25f32.to_le_bytes().to_vec()),
        ];
        let mut nodes = vec![
            node("QuantizeLinear", &["x", "s", "z"], "xq"),
            node("DequantizeLinear", &["xq", "s", "z"], "xd"),
            node("DequantizeLinear", &["w", "sw"], "wd"),
            node("Conv", &["xd", "wd"], "y"),
        ];
        nodes.extend(extra);
        let mut input = vec![value("x")];
        input.extend(initializer.iter().map(|t| value(&t.name)));
        pb::ModelProto {
            graph: Some(pb::GraphProto {
                node: nodes,
                initializer,
                input,
                output: outputs.iter().map(|o| value(o)).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn names<T>(v: &[T], name: impl Fn(&T) -> &str) -> Vec<String> {
        v.iter().map(|t| name(t).to_string()).collect()
    }

    #[test]
    fn what_only_the_lowered_node_read_leaves_the_graph_and_its_input_list() {
        let mut m = conv_model(vec![], &["y"]);
        assert_eq!(lower_int8(&mut m, None, &[]).unwrap(), 1);
        let g = m.graph.as_ref().unwrap();
        assert_eq!(names(&g.node, |n| &n.op_type), ["TfmqcQConv"]);
        assert!(g.initializer.is_empty());
        assert_eq!(names(&g.input, |i| &i.name), ["x"]);
        // The weight moved into the node, bytes and all.
        let w = g.node[0].attribute[0].t.as_ref().unwrap();
        assert_eq!(
            (w.name.as_str(), &w.raw_data[..]),
            ("w", &[1u8, 255, 3, 4][..])
        );
    }

    #[test]
    fn a_weight_read_elsewhere_too_stays_and_is_copied_into_the_node() {
        // wd is also a graph output: its DequantizeLinear and w must stay.
        let mut m = conv_model(vec![], &["y", "wd"]);
        lower_int8(&mut m, None, &[]).unwrap();
        let g = m.graph.as_ref().unwrap();
        assert_eq!(
            names(&g.node, |n| &n.op_type),
            ["DequantizeLinear", "TfmqcQConv"]
        );
        assert_eq!(names(&g.initializer, |t| &t.name), ["w", "sw"]);
        assert_eq!(names(&g.input, |i| &i.name), ["x", "w", "sw"]);
        assert_eq!(g.node[1].attribute[0].t.as_ref(), Some(&g.initializer[0]));
    }

    #[test]
    fn lowered_nodes_sharing_a_weight_each_hold_it() {
        let m = conv_model(vec![node("Conv", &["xd", "wd"], "y2")], &["y", "y2"]);
        let mut moved = m.clone();
        assert_eq!(lower_int8(&mut moved, None, &[]).unwrap(), 2);
        let g = moved.graph.as_ref().unwrap();
        assert!(g.initializer.is_empty());
        let w = |k: usize| g.node[k].attribute[0].t.clone().unwrap();
        assert_eq!(
            (w(0).name, w(1).raw_data),
            ("w".to_string(), vec![1, 255, 3, 4])
        );
    }

    #[test]
    fn values_the_caller_keeps_stay_computable() {
        let mut m = conv_model(vec![], &["y"]);
        lower_int8(&mut m, None, &["xq".to_string()]).unwrap();
        let g = m.graph.as_ref().unwrap();
        assert_eq!(
            names(&g.node, |n| &n.op_type),
            ["QuantizeLinear", "TfmqcQConv"]
        );
        assert_eq!(names(&g.initializer, |t| &t.name), ["s", "z"]);
    }

    #[test]
    fn an_int32_bias_behind_dequantize_linear_becomes_the_float_bias_it_computes() {
        // The bias onnxruntime's QLinearConv fusion asks for: int32 with the product
        // scale, per output channel.
        let mut m = conv_model(vec![], &["y"]);
        let g = m.graph.as_mut().unwrap();
        let le = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let f = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        g.initializer.push(tensor("bq", 6, &[2], le(&[3, -5])));
        g.initializer.push(tensor("bs", 1, &[2], f(&[0.125, 0.5])));
        g.initializer.push(tensor("bz", 6, &[2], le(&[0, 0])));
        let mut dq = node("DequantizeLinear", &["bq", "bs", "bz"], "bd");
        dq.attribute.push(pb::AttributeProto {
            name: "axis".into(),
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            i: 0,
            ..Default::default()
        });
        g.node.insert(0, dq);
        g.node.last_mut().unwrap().input.push("bd".into());
        assert_eq!(lower_int8(&mut m, None, &[]).unwrap(), 1);
        let g = m.graph.as_ref().unwrap();
        assert_eq!(names(&g.node, |n| &n.op_type), ["TfmqcQConv"]);
        // The DequantizeLinear and its initializers are gone with the Conv that read them.
        assert!(g.initializer.is_empty());
        let bias = g.node[0]
            .attribute
            .iter()
            .find(|a| a.name == "bias")
            .unwrap();
        assert_eq!(bias.floats, [3.0 * 0.125, -5.0 * 0.5]);
    }

    #[test]
    fn the_borrowed_form_builds_the_same_model() {
        let m = conv_model(vec![node("Relu", &["y"], "r")], &["r"]);
        let (copy, n) = lowered_int8(&m, None, &[]).unwrap();
        let mut moved = m.clone();
        assert_eq!(lower_int8(&mut moved, None, &[]).unwrap(), n);
        assert_eq!(copy.graph, moved.graph);
    }
}
