//! The graph: ONNX nodes in a petgraph `StableDiGraph`, values named as in ONNX.
//!
//! Nodes are operators; an edge `a → b` says that `b` reads a value `a` produces. Graph
//! inputs and initializers are values without a producing node. The graph keeps the
//! edges in step with the nodes' input/output names: passes change the wiring only
//! through the methods here, never by editing a node's `inputs` directly.

use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use tract_onnx::pb;

use super::tensor::{DType, Tensor};
use crate::error::{Error, Result};

/// One dimension of a value's shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Known(i64),
    /// A named or computed symbolic size, e.g. `N` or `2*N`.
    Symbol(String),
    Unknown,
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Known(v) => write!(f, "{v}"),
            Dim::Symbol(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// Type and shape of a value, as far as known.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ValueInfo {
    pub name: String,
    pub dtype: Option<DType>,
    /// `None`: rank unknown.
    pub shape: Option<Vec<Dim>>,
    pub doc_string: String,
}

impl ValueInfo {
    pub fn new(name: impl Into<String>, dtype: DType, shape: Vec<Dim>) -> ValueInfo {
        ValueInfo {
            name: name.into(),
            dtype: Some(dtype),
            shape: Some(shape),
            ..Default::default()
        }
    }

    /// `f32[N,4,16,16]`, `i64[]`, `?` when nothing is known.
    pub fn type_string(&self) -> String {
        let dt = self.dtype.map(|d| d.short()).unwrap_or("?");
        match &self.shape {
            Some(s) => {
                let dims: Vec<String> = s.iter().map(|d| d.to_string()).collect();
                format!("{dt}[{}]", dims.join(","))
            }
            None => dt.to_string(),
        }
    }

    /// Concrete dims when every dim is known.
    pub fn concrete_shape(&self) -> Option<Vec<usize>> {
        self.shape
            .as_ref()?
            .iter()
            .map(|d| match d {
                Dim::Known(v) if *v >= 0 => Some(*v as usize),
                _ => None,
            })
            .collect()
    }
}

/// An ONNX operator. Absent optional inputs are empty strings, as in ONNX.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    pub domain: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    /// Attributes are kept as the protobuf messages: lossless, subgraphs included.
    pub attributes: Vec<pb::AttributeProto>,
    pub doc_string: String,
}

impl Node {
    pub fn new(
        name: impl Into<String>,
        op_type: impl Into<String>,
        inputs: Vec<String>,
        outputs: Vec<String>,
    ) -> Node {
        Node {
            name: name.into(),
            op_type: op_type.into(),
            domain: String::new(),
            inputs,
            outputs,
            attributes: vec![],
            doc_string: String::new(),
        }
    }

    pub fn with_attr(mut self, attr: pb::AttributeProto) -> Node {
        self.attributes.push(attr);
        self
    }

    pub fn attr(&self, name: &str) -> Option<&pb::AttributeProto> {
        self.attributes.iter().find(|a| a.name == name)
    }

    pub fn attr_int(&self, name: &str) -> Option<i64> {
        self.attr(name).map(|a| a.i)
    }

    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        self.attr(name).map(|a| a.ints.as_slice())
    }

    pub fn attr_float(&self, name: &str) -> Option<f32> {
        self.attr(name).map(|a| a.f)
    }

    /// Names of outer-scope values read by subgraph attributes (If/Loop/Scan bodies).
    pub fn implicit_inputs(&self) -> Vec<String> {
        let mut out = vec![];
        for a in &self.attributes {
            for g in a.g.iter().chain(a.graphs.iter()) {
                collect_outer_refs(g, &mut out);
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Whether this is a standard ONNX operator (`ai.onnx` domain).
    pub fn is_onnx_op(&self, op: &str) -> bool {
        (self.domain.is_empty() || self.domain == "ai.onnx") && self.op_type == op
    }
}

fn collect_outer_refs(g: &pb::GraphProto, out: &mut Vec<String>) {
    let mut defined: HashSet<&str> = HashSet::new();
    defined.extend(g.input.iter().map(|i| i.name.as_str()));
    defined.extend(g.initializer.iter().map(|i| i.name.as_str()));
    for n in &g.node {
        defined.extend(n.output.iter().map(|s| s.as_str()));
    }
    for n in &g.node {
        for i in &n.input {
            if !i.is_empty() && !defined.contains(i.as_str()) {
                out.push(i.clone());
            }
        }
        for a in &n.attribute {
            for sub in a.g.iter().chain(a.graphs.iter()) {
                let mut inner = vec![];
                collect_outer_refs(sub, &mut inner);
                out.extend(inner.into_iter().filter(|i| !defined.contains(i.as_str())));
            }
        }
    }
}

/// Wiring of one value from its producer to one consumer slot.
#[derive(Clone, Debug, PartialEq)]
pub struct Edge {
    pub value: String,
    /// Input slot in the consumer; `None` for a subgraph's implicit read.
    pub slot: Option<usize>,
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    pub doc_string: String,
    nodes: StableDiGraph<Node, Edge>,
    /// Value name → (producing node, output slot).
    producers: HashMap<String, (NodeIndex, usize)>,
    /// Graph inputs that are not initializers, in file order.
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    /// Constant tensors, sorted by name (deterministic output order).
    pub initializers: BTreeMap<String, Tensor>,
    /// Known type/shape of intermediate values.
    pub value_info: HashMap<String, ValueInfo>,
    /// Sparse initializers are carried through untouched.
    pub sparse_initializers: Vec<pb::SparseTensorProto>,
    pub quantization_annotation: Vec<pb::TensorAnnotation>,
    /// Insertion sequence of each node: the tie-break of the topological order, so nodes
    /// added later print later (petgraph reuses the indices of removed nodes).
    seq: HashMap<NodeIndex, u64>,
    next_seq: u64,
    /// Reads of values no node produced yet (a file not sorted topologically, a rewrite
    /// wiring ahead): value → (consumer, slot), wired when the producer is added.
    /// Scanning every node for consumers of every node added instead is quadratic:
    /// hours on a file of a million nodes in reverse order. Entries of nodes removed or
    /// rewired since are stale and skipped.
    pending_reads: HashMap<String, Vec<(NodeIndex, Option<usize>)>>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph {
            name: name.into(),
            ..Default::default()
        }
    }

    // ----- nodes -------------------------------------------------------------------

    /// Adds a node and wires it to the producers of its inputs and to the consumers of
    /// its outputs already in the graph. Fails if an output name is already produced.
    pub fn add_node(&mut self, node: Node) -> Result<NodeIndex> {
        for o in node.outputs.iter().filter(|o| !o.is_empty()) {
            if self.producers.contains_key(o) || self.initializers.contains_key(o) {
                return Err(Error::Node {
                    node: node.name.clone(),
                    op: node.op_type.clone(),
                    reason: format!("output '{o}' is already defined elsewhere in the graph"),
                });
            }
        }
        let implicit = node.implicit_inputs();
        let outputs = node.outputs.clone();
        let inputs = node.inputs.clone();
        let ix = self.nodes.add_node(node);
        self.seq.insert(ix, self.next_seq);
        self.next_seq += 1;
        for (slot, o) in outputs.iter().enumerate().filter(|(_, o)| !o.is_empty()) {
            self.producers.insert(o.clone(), (ix, slot));
        }
        for (slot, i) in inputs.iter().enumerate() {
            self.connect(i, ix, Some(slot));
        }
        for i in &implicit {
            self.connect(i, ix, None);
        }
        // Consumers that were added before this producer.
        for o in outputs.iter().filter(|o| !o.is_empty()) {
            for (dst, slot) in self.pending_reads.remove(o).unwrap_or_default() {
                if dst == ix || !self.nodes.contains_node(dst) {
                    continue;
                }
                let reads = match slot {
                    Some(k) => self.nodes[dst].inputs.get(k) == Some(o),
                    None => self.nodes[dst].implicit_inputs().contains(o),
                };
                let wired = self
                    .nodes
                    .edges_connecting(ix, dst)
                    .any(|e| e.weight().value == *o && e.weight().slot == slot);
                if reads && !wired {
                    self.nodes.add_edge(
                        ix,
                        dst,
                        Edge {
                            value: o.clone(),
                            slot,
                        },
                    );
                }
            }
        }
        Ok(ix)
    }

    fn connect(&mut self, value: &str, dst: NodeIndex, slot: Option<usize>) {
        if !value.is_empty() && !self.producers.contains_key(value) {
            self.pending_reads
                .entry(value.to_string())
                .or_default()
                .push((dst, slot));
        }
        if let Some(&(src, _)) = self.producers.get(value) {
            self.nodes.add_edge(
                src,
                dst,
                Edge {
                    value: value.to_string(),
                    slot,
                },
            );
        }
    }

    /// Removes a node; its consumers keep reading the (now undefined) names, so callers
    /// rewire uses first (see [`Graph::replace_uses`]).
    pub fn remove_node(&mut self, ix: NodeIndex) -> Option<Node> {
        // Its consumers read values nobody produces now: a node added later that
        // produces them is wired to them.
        let orphans: Vec<(String, NodeIndex, Option<usize>)> = self
            .nodes
            .edges_directed(ix, Direction::Outgoing)
            .filter(|e| e.target() != ix)
            .map(|e| (e.weight().value.clone(), e.target(), e.weight().slot))
            .collect();
        let node = self.nodes.remove_node(ix)?;
        for (value, dst, slot) in orphans {
            self.pending_reads
                .entry(value)
                .or_default()
                .push((dst, slot));
        }
        self.seq.remove(&ix);
        for o in &node.outputs {
            if self.producers.get(o).map(|p| p.0) == Some(ix) {
                self.producers.remove(o);
            }
        }
        Some(node)
    }

    pub fn node(&self, ix: NodeIndex) -> &Node {
        &self.nodes[ix]
    }

    /// Changes to a node that leave its inputs and outputs alone (attributes, name).
    pub fn node_attrs_mut(&mut self, ix: NodeIndex) -> (&mut String, &mut Vec<pb::AttributeProto>) {
        let n = &mut self.nodes[ix];
        (&mut n.name, &mut n.attributes)
    }

    pub fn node_count(&self) -> usize {
        self.nodes.node_count()
    }

    pub fn node_indices(&self) -> impl Iterator<Item = NodeIndex> + '_ {
        self.nodes.node_indices()
    }

    /// Points input `slot` of node `ix` at `value`.
    pub fn set_input(&mut self, ix: NodeIndex, slot: usize, value: &str) {
        let old: Vec<_> = self
            .nodes
            .edges_directed(ix, Direction::Incoming)
            .filter(|e| e.weight().slot == Some(slot))
            .map(|e| e.id())
            .collect();
        for e in old {
            self.nodes.remove_edge(e);
        }
        self.nodes[ix].inputs[slot] = value.to_string();
        self.connect(value, ix, Some(slot));
    }

    /// Every node reading `old` reads `new` instead. Graph outputs keep their public
    /// names: a pass that replaces a graph output's producer keeps that name itself.
    pub fn replace_uses(&mut self, old: &str, new: &str) {
        for (ix, slot) in self.consumers(old) {
            self.set_input(ix, slot, new);
        }
    }

    /// (node, input slot) pairs reading `value`, in node order.
    pub fn consumers(&self, value: &str) -> Vec<(NodeIndex, usize)> {
        let mut out = vec![];
        for ix in self.nodes.node_indices() {
            for (slot, i) in self.nodes[ix].inputs.iter().enumerate() {
                if i == value {
                    out.push((ix, slot));
                }
            }
        }
        out
    }

    /// Nodes reading any output of `ix` (including implicit subgraph reads).
    pub fn successors(&self, ix: NodeIndex) -> Vec<NodeIndex> {
        let mut v: Vec<NodeIndex> = self
            .nodes
            .neighbors_directed(ix, Direction::Outgoing)
            .collect();
        v.sort();
        v.dedup();
        v
    }

    pub fn producer(&self, value: &str) -> Option<(NodeIndex, usize)> {
        self.producers.get(value).copied()
    }

    pub fn is_graph_input(&self, value: &str) -> bool {
        self.inputs.iter().any(|i| i.name == value)
    }

    pub fn is_graph_output(&self, value: &str) -> bool {
        self.outputs.iter().any(|o| o.name == value)
    }

    /// Whether a value name is defined (graph input, initializer or node output).
    pub fn is_defined(&self, value: &str) -> bool {
        self.producers.contains_key(value)
            || self.initializers.contains_key(value)
            || self.is_graph_input(value)
    }

    /// Type and shape known for a value, wherever it is recorded.
    pub fn info(&self, value: &str) -> Option<ValueInfo> {
        if let Some(t) = self.initializers.get(value) {
            let shape = t.shape.iter().map(|&d| Dim::Known(d as i64)).collect();
            return Some(ValueInfo::new(value, t.dtype, shape));
        }
        self.inputs
            .iter()
            .chain(self.outputs.iter())
            .find(|v| v.name == value)
            .or_else(|| self.value_info.get(value))
            .cloned()
    }

    /// A value name not used yet, derived from `base`.
    pub fn fresh_name(&self, base: &str) -> String {
        if !self.is_defined(base) && !self.value_info.contains_key(base) {
            return base.to_string();
        }
        (1..)
            .map(|i| format!("{base}_{i}"))
            .find(|n| !self.is_defined(n) && !self.value_info.contains_key(n))
            .expect("infinite names")
    }

    /// Adds a one-output node named after `base` (fresh node and value names); returns
    /// the output value's name.
    pub fn add_op(
        &mut self,
        op: &str,
        inputs: Vec<String>,
        base: &str,
        attributes: Vec<pb::AttributeProto>,
    ) -> Result<String> {
        let out = self.fresh_name(base);
        let mut node = Node::new(self.fresh_node_name(base), op, inputs, vec![out.clone()]);
        node.attributes = attributes;
        self.add_node(node)?;
        Ok(out)
    }

    /// Adds an initializer under a fresh name derived from `base`; returns the name.
    pub fn add_initializer(&mut self, base: &str, t: Tensor) -> String {
        let name = self.fresh_name(base);
        self.initializers.insert(name.clone(), t);
        name
    }

    /// A node name not used yet, derived from `base`.
    pub fn fresh_node_name(&self, base: &str) -> String {
        let used: HashSet<&str> = self.nodes.node_weights().map(|n| n.name.as_str()).collect();
        if !used.contains(base) {
            return base.to_string();
        }
        (1..)
            .map(|i| format!("{base}_{i}"))
            .find(|n| !used.contains(n.as_str()))
            .unwrap()
    }

    /// Topological order, stable: among ready nodes the one added first comes first, so
    /// a graph that was already sorted keeps its file order.
    pub fn topo_order(&self) -> Result<Vec<NodeIndex>> {
        let mut indeg: HashMap<NodeIndex, usize> = HashMap::new();
        for ix in self.nodes.node_indices() {
            let preds: HashSet<NodeIndex> = self
                .nodes
                .neighbors_directed(ix, Direction::Incoming)
                .collect();
            indeg.insert(ix, preds.len());
        }
        let key = |ix: NodeIndex| std::cmp::Reverse((self.seq[&ix], ix));
        let mut ready: BinaryHeap<_> = indeg
            .iter()
            .filter(|(_, &d)| d == 0)
            .map(|(&ix, _)| key(ix))
            .collect();
        let mut order = Vec::with_capacity(indeg.len());
        while let Some(std::cmp::Reverse((_, ix))) = ready.pop() {
            order.push(ix);
            for succ in self.successors(ix) {
                let d = indeg.get_mut(&succ).expect("node");
                *d -= 1;
                if *d == 0 {
                    ready.push(key(succ));
                }
            }
        }
        if order.len() != indeg.len() {
            let placed: HashSet<NodeIndex> = order.iter().copied().collect();
            let stuck = self
                .nodes
                .node_indices()
                .find(|ix| !placed.contains(ix))
                .expect("a node outside the order");
            let n = &self.nodes[stuck];
            return Err(Error::Cycle {
                node: n.name.clone(),
                op: n.op_type.clone(),
            });
        }
        Ok(order)
    }

    /// Checks that every input names a defined value and every output is produced.
    pub fn validate(&self) -> Result<()> {
        // A set, not `is_defined`'s scan of the inputs per read: a file may hold as many
        // inputs as nodes.
        let inputs: HashSet<&str> = self.inputs.iter().map(|i| i.name.as_str()).collect();
        let defined = |v: &str| {
            self.producers.contains_key(v)
                || self.initializers.contains_key(v)
                || inputs.contains(v)
        };
        for ix in self.nodes.node_indices() {
            let n = &self.nodes[ix];
            for i in n.inputs.iter().filter(|i| !i.is_empty()) {
                if !defined(i) {
                    return Err(Error::Node {
                        node: n.name.clone(),
                        op: n.op_type.clone(),
                        reason: format!(
                            "input '{i}' is not a graph input, an initializer or any node's output"
                        ),
                    });
                }
            }
        }
        for o in &self.outputs {
            if !defined(&o.name) {
                return Err(Error::invalid(format!(
                    "graph output '{}' is never produced",
                    o.name
                )));
            }
        }
        self.topo_order().map(|_| ())
    }

    /// [`Graph::remove_dead`], with the values `keep` (and what computes them) live too:
    /// the step index fold-tib leaves for the per-step scale tables quantize adds later,
    /// which nothing reads until then.
    pub fn remove_dead_keeping(&mut self, keep: &[String]) -> (usize, usize) {
        let n = self.outputs.len();
        self.outputs.extend(keep.iter().map(|name| ValueInfo {
            name: name.clone(),
            ..Default::default()
        }));
        let removed = self.remove_dead();
        self.outputs.truncate(n);
        removed
    }

    /// Removes nodes whose outputs nobody reads and initializers nobody uses.
    /// Returns (nodes removed, initializers removed).
    pub fn remove_dead(&mut self) -> (usize, usize) {
        let mut live_values: HashSet<String> =
            self.outputs.iter().map(|o| o.name.clone()).collect();
        let mut live_nodes: HashSet<NodeIndex> = HashSet::new();
        let mut stack: Vec<String> = live_values.iter().cloned().collect();
        while let Some(v) = stack.pop() {
            if let Some(&(ix, _)) = self.producers.get(&v) {
                if live_nodes.insert(ix) {
                    let n = &self.nodes[ix];
                    for i in n.inputs.iter().cloned().chain(n.implicit_inputs()) {
                        if !i.is_empty() && live_values.insert(i.clone()) {
                            stack.push(i);
                        }
                    }
                }
            }
        }
        let dead: Vec<NodeIndex> = self
            .nodes
            .node_indices()
            .filter(|ix| !live_nodes.contains(ix))
            .collect();
        for &ix in &dead {
            self.remove_node(ix);
        }
        let before = self.initializers.len();
        self.initializers.retain(|k, _| live_values.contains(k));
        self.value_info.retain(|k, _| live_values.contains(k));
        (dead.len(), before - self.initializers.len())
    }

    /// Total parameters and bytes held by initializers.
    pub fn parameter_stats(&self) -> (usize, usize) {
        self.initializers
            .values()
            .fold((0, 0), |(p, b), t| (p + t.numel(), b + t.byte_len()))
    }

    /// Op type → count, sorted by op type.
    pub fn op_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for n in self.nodes.node_weights() {
            let key = if n.domain.is_empty() || n.domain == "ai.onnx" {
                n.op_type.clone()
            } else {
                format!("{}.{}", n.domain, n.op_type)
            };
            *m.entry(key).or_insert(0) += 1;
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain_reversed(n: usize) -> Graph {
        // v0 → n0 → v1 → n1 → ... added last node first: every read precedes its producer.
        let mut g = Graph::new("chain");
        for i in (0..n).rev() {
            g.add_node(Node::new(
                format!("n{i}"),
                "Relu",
                vec![format!("v{i}")],
                vec![format!("v{}", i + 1)],
            ))
            .unwrap();
        }
        g
    }

    #[test]
    fn consumers_added_before_their_producer_are_wired() {
        let g = chain_reversed(4);
        let names: Vec<&str> = g
            .topo_order()
            .unwrap()
            .into_iter()
            .map(|ix| g.node(ix).name.as_str())
            .collect();
        assert_eq!(names, ["n0", "n1", "n2", "n3"]);
    }

    #[test]
    fn a_replaced_producer_is_wired_to_the_consumers_of_the_old_one() {
        let mut g = chain_reversed(3);
        let (ix, _) = g.producer("v2").unwrap();
        let old = g.remove_node(ix).unwrap();
        let new = g
            .add_node(Node::new("n1b", "Neg", old.inputs, old.outputs))
            .unwrap();
        assert_eq!(g.successors(new).len(), 1, "n2 reads v2 from the new node");
        let (n2, _) = g.producer("v3").unwrap();
        let order = g.topo_order().unwrap();
        let at = |ix| order.iter().position(|&o| o == ix).unwrap();
        assert!(at(new) < at(n2));
    }

    /// A file can hold a million nodes in reverse order: adding them must not scan the
    /// graph per node (that was hours).
    #[test]
    fn many_nodes_in_reverse_order_are_added_in_linear_time() {
        let start = std::time::Instant::now();
        let g = chain_reversed(200_000);
        assert_eq!(g.topo_order().unwrap().len(), 200_000);
        assert!(start.elapsed().as_secs() < 30, "took {:?}", start.elapsed());
    }
}
