//! Shared helpers of the integration tests: the models in models/, the tfmqc binary,
//! tract through the runtime crate, and onnxruntime through tests/interop/ort.py.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tfmqc_passes::ir::Tensor;
use tfmqc_passes::tensor_file::{read_safetensors, write_safetensors};

pub type Tensors = BTreeMap<String, Tensor>;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The denoisers in models/: every `X.onnx` that has an `X.inputs.safetensors`, except
/// the feature classifier and the single-conv benchmark layer (no time step: not
/// denoisers).
pub fn denoisers() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(repo().join("models"))
        .expect("models/ exists")
        .filter_map(|e| {
            let p = e.ok()?.path();
            let stem = p.file_name()?.to_str()?.strip_suffix(".onnx")?.to_string();
            p.with_file_name(format!("{stem}.inputs.safetensors"))
                .exists()
                .then_some(stem)
        })
        .filter(|n| n != "digits_features" && n != "conv3x3_64")
        .collect();
    names.sort();
    assert!(
        names.len() >= 5,
        "expected the models of models/README.md, found {names:?}"
    );
    names
}

/// Every ONNX file in models/ (the feature classifier included).
pub fn all_models() -> Vec<String> {
    let mut v = denoisers();
    v.push("digits_features".into());
    v.sort();
    v
}

pub fn model_path(name: &str) -> PathBuf {
    repo().join("models").join(format!("{name}.onnx"))
}

pub fn example_inputs(name: &str) -> Tensors {
    read_safetensors(
        &repo()
            .join("models")
            .join(format!("{name}.inputs.safetensors")),
    )
    .expect("inputs")
}

/// The example inputs of `name` with their time steps moved into the set S of a
/// `ddim:10` compile (t = 100 and 500), in the example's own dtype and shape (a batch of
/// two, or a scalar: unet2d_cond): what the fused-node tests run compiled models on.
pub fn example_inputs_at_ddim10(name: &str) -> Tensors {
    let mut x = example_inputs(name);
    for key in ["timesteps", "timestep"] {
        if let Some(t) = x.get_mut(key) {
            set_time_steps(t, |i| [100, 500][i.min(1)]);
        }
    }
    x
}

/// The time-step set S a compiled file records (`tfmqc.timesteps`).
pub fn compiled_timesteps(compiled: &Path) -> Vec<i64> {
    tfmqc_passes::onnx::load(compiled)
        .unwrap()
        .metadata_value("tfmqc.timesteps")
        .expect("the compiled file records its time-step set")
        .split(',')
        .map(|s| s.trim().parse().expect("a time step"))
        .collect()
}

/// The example inputs of `name` with their time steps moved into the set S that the
/// compiled file `compiled` records (`tfmqc.timesteps`, read at `tfmqc.timestep_input`):
/// S's middle step, and its first for a second batch item, in the example's own dtype and
/// shape. A folded model rejects a step outside S, so off-set examples need this.
pub fn example_inputs_in_set(name: &str, compiled: &Path) -> Tensors {
    let input = tfmqc_passes::onnx::load(compiled)
        .unwrap()
        .metadata_value("tfmqc.timestep_input")
        .expect("the compiled file records its time-step input")
        .to_string();
    let set = compiled_timesteps(compiled);
    let mut x = example_inputs(name);
    let t = x
        .get_mut(&input)
        .expect("the example has the time-step input");
    set_time_steps(t, |i| {
        if i % 2 == 0 {
            set[set.len() / 2]
        } else {
            set[0]
        }
    });
    x
}

/// Rewrites a time-step tensor in place, element `i` to `step(i)`, keeping its dtype (i64
/// or float) and shape.
fn set_time_steps(t: &mut Tensor, step: impl Fn(usize) -> i64) {
    use tfmqc_passes::ir::DType;
    let steps: Vec<i64> = (0..t.shape.iter().product::<usize>()).map(step).collect();
    let shape = t.shape.clone();
    *t = match t.dtype {
        DType::I64 => Tensor::from_vec(shape, &steps),
        _ => Tensor::from_vec(shape, &steps.iter().map(|&v| v as f32).collect::<Vec<_>>()),
    };
}

pub fn tfmqc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tfmqc"))
        .args(args)
        .output()
        .expect("tfmqc runs")
}

/// Runs tfmqc and panics with its stderr unless it succeeds.
pub fn tfmqc_ok(args: &[&str]) -> Output {
    let out = tfmqc(args);
    assert!(
        out.status.success(),
        "tfmqc {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs the pipeline on `model` into `out`, kept small for tests: S = ddim:10 and two
/// calibration trajectories of `calib_steps` steps, plus the `extra` options; TCR off
/// unless `extra` says otherwise (`--tcr auto`, the default, quantizes twice to decide:
/// the tests of other features need neither the time nor the balanced graph).
pub fn quantize_small(model: &str, out: &Path, calib_steps: &str, extra: &[&str]) -> Output {
    let model = model_path(model);
    let mut args = vec![
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--timesteps",
        "ddim:10",
        "--calib-samples",
        "2",
        "--calib-steps",
        calib_steps,
    ];
    if !extra.iter().any(|a| *a == "--tcr" || *a == "--tcaq") {
        args.extend_from_slice(&["--tcr", "off"]);
    }
    args.extend_from_slice(extra);
    tfmqc_ok(&args)
}

/// A node of a hand-built test graph: one output.
pub fn node(name: &str, op: &str, inputs: &[&str], output: &str) -> tfmqc_passes::ir::Node {
    tfmqc_passes::ir::Node::new(
        name,
        op,
        inputs.iter().map(|s| s.to_string()).collect(),
        vec![output.to_string()],
    )
}

/// Saves a hand-built graph as an ONNX file (IR 8, opset 17).
pub fn save_graph(graph: tfmqc_passes::ir::Graph, path: &Path) {
    let model = tfmqc_passes::ir::Model {
        ir_version: 8,
        opsets: vec![(String::new(), 17)],
        graph,
        ..Default::default()
    };
    tfmqc_passes::onnx::save(&model, path).unwrap();
}

pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tfmqc-test-")
        .tempdir()
        .expect("temp dir")
}

/// Runs a model in tract (the runtime crate's engine), inputs by name.
pub fn tract_run(model: &Path, inputs: &Tensors) -> Tensors {
    let engine = tfmqc_runtime::Engine::load(model, None, tfmqc_runtime::Optimize::Full)
        .unwrap_or_else(|e| panic!("tract cannot load {}: {e}", model.display()));
    tract_run_engine(&engine, inputs)
}

pub fn tract_run_engine(engine: &tfmqc_runtime::Engine, inputs: &Tensors) -> Tensors {
    let ordered = engine
        .input_names()
        .iter()
        .map(|n| tfmqc_passes::exec::to_tract(&inputs[n]).unwrap())
        .collect();
    let out = engine
        .run(ordered)
        .unwrap_or_else(|e| panic!("tract run failed: {e}"));
    engine
        .output_names()
        .iter()
        .zip(out.iter())
        .map(|(n, t)| (n.clone(), tfmqc_passes::exec::from_tract(t).unwrap()))
        .collect()
}

/// The Python interpreter with onnx and onnxruntime (scripts/test.sh makes it). `None`
/// skips interop checks, unless TFMQC_REQUIRE_INTEROP is set (as scripts/test.sh does).
pub fn python() -> Option<PathBuf> {
    let p = std::env::var_os("TFMQC_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/pyenv/bin/python"));
    if p.exists() {
        return Some(p);
    }
    if std::env::var_os("TFMQC_REQUIRE_INTEROP").is_some() {
        panic!(
            "onnxruntime is required but {} does not exist: run scripts/test.sh",
            p.display()
        );
    }
    eprintln!("SKIPPING onnxruntime checks: run the tests through scripts/test.sh to include them");
    None
}

/// Runs tests/interop/ort.py; panics with its output unless it succeeds.
pub fn ort(py: &Path, args: &[&str]) -> String {
    let out = Command::new(py)
        .arg(repo().join("tests/interop/ort.py"))
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "ort.py {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Whether ort.py exits non-zero (for runs that must fail).
pub fn ort_fails(py: &Path, args: &[&str]) -> bool {
    !Command::new(py)
        .arg(repo().join("tests/interop/ort.py"))
        .args(args)
        .output()
        .expect("python runs")
        .status
        .success()
}

/// onnxruntime outputs of `model` on `inputs`.
pub fn ort_run(py: &Path, model: &Path, inputs: &Tensors, dir: &Path) -> Tensors {
    let tag = model.file_stem().unwrap().to_string_lossy().to_string();
    let inp = dir.join(format!("{tag}.in.safetensors"));
    let out = dir.join(format!("{tag}.out.safetensors"));
    write_safetensors(&inp, inputs).unwrap();
    ort(
        py,
        &[
            "run",
            model.to_str().unwrap(),
            inp.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    read_safetensors(&out).unwrap()
}

pub fn write_inputs(path: &Path, inputs: &Tensors) {
    write_safetensors(path, inputs).unwrap()
}

pub fn read_tensors(path: &Path) -> Tensors {
    read_safetensors(path).unwrap()
}

/// Largest |a − b| relative to max |a| over all outputs.
pub fn relative_error(reference: &Tensors, other: &Tensors) -> f64 {
    let mut worst: f64 = 0.0;
    for (k, a) in reference {
        let b = other.get(k).unwrap_or_else(|| panic!("output {k} missing"));
        assert_eq!(a.shape, b.shape, "shape of {k}");
        let a = a.to_f64_lossy().unwrap();
        let b = b.to_f64_lossy().unwrap();
        let scale = a.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
        worst = worst.max(diff / scale);
    }
    worst
}

/// Asserts two output sets are identical bit for bit.
pub fn assert_bit_exact(what: &str, a: &Tensors, b: &Tensors) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: output names"
    );
    for (k, x) in a {
        let y = &b[k];
        assert_eq!(
            (x.dtype, &x.shape),
            (y.dtype, &y.shape),
            "{what}: {k} type/shape"
        );
        assert!(
            x.data == y.data,
            "{what}: output {k} differs (not bit-exact)"
        );
    }
}

/// SQNR in dB of `other` against `reference`, over all outputs.
pub fn sqnr_db(reference: &Tensors, other: &Tensors) -> f64 {
    let (mut signal, mut noise) = (0f64, 0f64);
    for (k, a) in reference {
        let a = a.to_f64_lossy().unwrap();
        let b = other[k].to_f64_lossy().unwrap();
        for (x, y) in a.iter().zip(&b) {
            signal += x * x;
            noise += (x - y) * (x - y);
        }
    }
    10.0 * (signal / noise.max(1e-300)).log10()
}

/// Every node the runtime lowers to its int8 ops, checked on its own: the node with its
/// Q/DQ inputs is cut out of `q` into a one-node model, fed the values it reads when the
/// whole model runs on `inputs` (captured from the QDQ graph in tract), and run both as
/// the QDQ graph (tract, in float) and lowered (the int8 kernels). Returns
/// `(node output, its op type, SQNR of int8 vs QDQ in dB)` per lowered node.
///
/// Node by node, because whole-model outputs of a coarsely calibrated model amplify
/// float-rounding differences: one activation one ulp from a rounding tie flips by one
/// quantization step, and the quantizers after it grow that (a known property of the
/// QDQ graph itself, see int8.rs).
pub fn lowered_nodes_vs_qdq(q: &Path, inputs: &Tensors) -> Vec<(String, String, f64)> {
    let (cuts, dir) = lowered_node_cuts(q, inputs);
    let full = tfmqc_runtime::Optimize::Full;
    let mut results = vec![];
    for NodeCut {
        out,
        op,
        lowered,
        model: cut,
        feed,
    } in cuts
    {
        // A node with a fused output pair is compared before the pair (the Conv's or
        // Gemm's own output, the pair left to tract): an exact integer product and
        // float sums of the QDQ reference round an output code apart where a value sits
        // at its rounding boundary. The pair itself is checked exact against the unfused
        // lowering in tests/requant.rs.
        let before_pair: Option<Vec<String>> = tfmqc_runtime::ops::requant::output_pair(&lowered)
            .map(|_| {
                let g = cut.graph.as_ref().unwrap();
                let conv = g
                    .node
                    .iter()
                    .find(|n| n.op_type == "Conv" || n.op_type == "Gemm");
                vec![conv.expect("a Conv or Gemm before the pair").output[0].clone()]
            });
        let outputs = before_pair.as_deref();
        // External-data weights stay references to the model's data file.
        let qdq = tfmqc_runtime::Engine::from_proto(&cut, dir.as_deref(), outputs, full).unwrap();
        let lower = || tfmqc_runtime::Engine::from_proto_int8(&cut, dir.as_deref(), outputs, full);
        let (int8, n) = match outputs {
            Some(_) => tfmqc_runtime::ops::requant::unfused(lower),
            None => lower(),
        }
        .unwrap();
        // (Fused group norms and small float convolutions are float: not counted among
        // int8 nodes.)
        let float = [
            tfmqc_runtime::ops::group_norm::GROUP_NORM,
            tfmqc_runtime::ops::conv_f32::CONV_F32,
        ];
        let int8_nodes = !float.contains(&op.as_str()) as usize;
        assert_eq!(n, int8_nodes, "{out}: the cut-out node is lowered");
        let db = sqnr_db(
            &tract_run_engine(&qdq, &feed),
            &tract_run_engine(&int8, &feed),
        );
        results.push((out, op, db));
    }
    results
}

/// One node the runtime lowers, cut out of the QDQ graph ([`lowered_node_cuts`]).
pub struct NodeCut {
    /// The value it writes, and its op type once lowered.
    pub out: String,
    pub op: String,
    /// The lowered node as it is in the lowered model (its attributes say what it fuses).
    pub lowered: tfmqc_runtime::pb::NodeProto,
    /// The QDQ nodes it replaces, as a model from the values it reads to `out`.
    pub model: tfmqc_runtime::pb::ModelProto,
    /// The values it reads when the whole model runs (in tract, as the QDQ graph).
    pub feed: Tensors,
}

/// Every node the runtime lowers to its int8 ops, cut out of `q` with its Q/DQ inputs
/// (see [`lowered_nodes_vs_qdq`]), with what it reads when the model runs on `inputs`;
/// and the folder external data is read from.
pub fn lowered_node_cuts(q: &Path, inputs: &Tensors) -> (Vec<NodeCut>, Option<String>) {
    use tfmqc_runtime::pb;
    let proto = tfmqc_runtime::engine::read_proto(q).unwrap();
    let g = proto.graph.as_ref().unwrap();
    let dir = q.parent().map(|d| d.to_string_lossy().to_string());
    let model_dir = q.parent();
    let (lowered, _) = tfmqc_runtime::lower::lowered_int8(&proto, model_dir, &[]).unwrap();
    // Per lowered node: its output, and the activations it reads (the values before
    // their QuantizeLinear).
    let lowered_nodes: Vec<(String, String, Vec<String>)> = lowered
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .filter(|n| n.domain == "ai.tfmqc")
        .map(|n| (n.output[0].clone(), n.op_type.clone(), n.input.clone()))
        .collect();
    let lowered_node = |out: &str| {
        lowered
            .graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .find(|n| n.output[0] == out)
            .unwrap()
            .clone()
    };
    let producer = |v: &str| g.node.iter().find(|p| p.output.iter().any(|o| o == v));
    let is_init = |v: &str| g.initializer.iter().any(|t| t.name == v);
    // Per lowered node: the nodes of the QDQ graph it replaces (from its output back to
    // what it reads: its Q/DQ pairs and, for a fused node, the chain inside), as a model.
    let mut cuts = vec![];
    for (out, op, reads) in &lowered_nodes {
        let mut nodes: Vec<pb::NodeProto> = vec![];
        let mut stack = vec![out.clone()];
        while let Some(v) = stack.pop() {
            if reads.contains(&v) || is_init(&v) {
                continue;
            }
            let node = producer(&v).unwrap_or_else(|| panic!("{out}: {v} has no producer"));
            if nodes
                .iter()
                .any(|n| n.name == node.name && n.output == node.output)
            {
                continue;
            }
            // (A Conv / Gemm with a fused output pair writes the pair's output, one with
            // a fused residual the Add's: the cut reaches it through them.)
            let l = lowered_node(out);
            let pair = tfmqc_runtime::ops::requant::output_pair(&l).is_some()
                || l.attribute
                    .iter()
                    .any(|a| a.name == tfmqc_runtime::ops::residual::RESIDUAL);
            assert!(
                !["Relu", "Conv", "Gemm"].contains(&node.op_type.as_str()) || v == *out || pair,
                "{out}: the cut reaches {} {}",
                node.op_type,
                node.name
            );
            nodes.push(node.clone());
            stack.extend(node.input.iter().filter(|i| !i.is_empty()).cloned());
        }
        // In graph order (the file's nodes are topologically sorted).
        let position = |n: &pb::NodeProto| g.node.iter().position(|m| m.output == n.output);
        nodes.sort_by_key(|n| position(n));
        cuts.push((out.clone(), op.clone(), nodes, reads.clone()));
    }
    let mut wanted: Vec<String> = cuts.iter().flat_map(|c| c.3.clone()).collect();
    wanted.sort();
    wanted.dedup();
    let full = tfmqc_runtime::Optimize::Full;
    let capture =
        tfmqc_runtime::Engine::from_proto(&proto, dir.as_deref(), Some(&wanted), full).unwrap();
    let values = tract_run_engine(&capture, inputs);
    let mut results = vec![];
    for (out, op, nodes, reads) in cuts {
        let used: std::collections::HashSet<String> =
            nodes.iter().flat_map(|n| n.input.iter().cloned()).collect();
        // f32, or the captured value's type (a per-step node's group index is an integer).
        let value_info = |name: &str, shape: Option<&[usize]>| pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: values.get(name).map_or(1, |v| v.dtype.onnx_code()),
                    shape: shape.map(|s| pb::TensorShapeProto {
                        dim: s
                            .iter()
                            .map(|&d| pb::tensor_shape_proto::Dimension {
                                value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(
                                    d as i64,
                                )),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        let graph = pb::GraphProto {
            name: "cut".into(),
            node: nodes,
            initializer: g
                .initializer
                .iter()
                .filter(|t| used.contains(&t.name))
                .cloned()
                .collect(),
            input: reads
                .iter()
                .map(|r| value_info(r, Some(&values[r].shape)))
                .collect(),
            output: vec![value_info(&out, None)],
            ..Default::default()
        };
        let cut = pb::ModelProto {
            graph: Some(graph),
            ..proto.clone()
        };
        let feed: Tensors = reads
            .iter()
            .map(|r| (r.clone(), values[r].clone()))
            .collect();
        results.push(NodeCut {
            lowered: lowered_node(&out),
            out,
            op,
            model: cut,
            feed,
        });
    }
    (results, dir)
}
