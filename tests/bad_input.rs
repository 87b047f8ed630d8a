//! Bad input gives a one-line error naming the problem, exit code 1, no output file.

mod common;
use common::*;
use std::path::Path;

use tfmqc_passes::ir::{DType, Graph, Model, Node, Tensor, ValueInfo};

fn assert_user_error(model: &Path, expect: &str) {
    let dir = tmpdir();
    let out = dir.path().join("out.onnx");
    let res = tfmqc(&[model.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "exit code; stderr:\n{stderr}");
    assert!(stderr.contains(expect), "expected '{expect}' in:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("tfmqc: error: "),
        "one-line error, got:\n{stderr}"
    );
    assert!(!out.exists(), "no output file on error");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no temporary file left"
    );
}

/// A tiny valid model: y = Relu(x).
fn tiny() -> Model {
    let mut g = Graph::new("tiny");
    g.inputs.push(ValueInfo::new(
        "x",
        DType::F32,
        vec![tfmqc_passes::ir::Dim::Known(2)],
    ));
    g.outputs.push(ValueInfo::new(
        "y",
        DType::F32,
        vec![tfmqc_passes::ir::Dim::Known(2)],
    ));
    g.add_node(Node::new(
        "relu",
        "Relu",
        vec!["x".into()],
        vec!["y".into()],
    ))
    .unwrap();
    Model {
        ir_version: 8,
        opsets: vec![(String::new(), 17)],
        graph: g,
        ..Default::default()
    }
}

#[test]
fn missing_file_is_named() {
    assert_user_error(
        Path::new("/nonexistent/model.onnx"),
        "/nonexistent/model.onnx",
    );
}

#[test]
fn truncated_file_is_not_onnx() {
    let dir = tmpdir();
    let bytes = std::fs::read(model_path("ddpm_digits")).unwrap();
    let p = dir.path().join("truncated.onnx");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert_user_error(&p, "not a valid ONNX model");
}

#[test]
fn text_file_is_not_onnx() {
    let dir = tmpdir();
    let p = dir.path().join("readme.onnx");
    std::fs::write(&p, "this is not a model\n").unwrap();
    assert_user_error(&p, "not a valid ONNX model");
}

#[test]
fn empty_file_is_not_onnx() {
    let dir = tmpdir();
    let p = dir.path().join("empty.onnx");
    std::fs::write(&p, "").unwrap();
    assert_user_error(&p, "empty");
}

#[test]
fn unknown_data_type_names_the_tensor() {
    let dir = tmpdir();
    let mut proto = tfmqc_passes::onnx::to_proto(&tiny()).unwrap();
    let g = proto.graph.as_mut().unwrap();
    let mut t =
        tfmqc_passes::onnx::tensor_to_onnx("weird_weight", &Tensor::from_vec(vec![1], &[1f32]));
    t.data_type = 99;
    g.initializer.push(t);
    let p = dir.path().join("dtype.onnx");
    std::fs::write(&p, prost_encode(&proto)).unwrap();
    assert_user_error(&p, "tensor 'weird_weight': unsupported ONNX data type 99");
}

#[test]
fn cycle_names_a_node_on_it() {
    let dir = tmpdir();
    let mut proto = tfmqc_passes::onnx::to_proto(&tiny()).unwrap();
    let g = proto.graph.as_mut().unwrap();
    // a = Add(x, b); b = Relu(a); y = Identity(b): a ↔ b is a cycle.
    g.node.clear();
    let node = |name: &str, op: &str, i: &[&str], o: &str| tract_onnx::pb::NodeProto {
        name: name.into(),
        op_type: op.into(),
        input: i.iter().map(|s| s.to_string()).collect(),
        output: vec![o.into()],
        ..Default::default()
    };
    g.node.push(node("add", "Add", &["x", "b"], "a"));
    g.node.push(node("relu", "Relu", &["a"], "b"));
    g.node.push(node("id", "Identity", &["b"], "y"));
    let p = dir.path().join("cycle.onnx");
    std::fs::write(&p, prost_encode(&proto)).unwrap();
    assert_user_error(&p, "cycle through node");
}

#[test]
fn opset_newer_than_supported_is_refused() {
    let dir = tmpdir();
    let mut proto = tfmqc_passes::onnx::to_proto(&tiny()).unwrap();
    proto.opset_import[0].version = 99;
    let p = dir.path().join("opset.onnx");
    std::fs::write(&p, prost_encode(&proto)).unwrap();
    assert_user_error(&p, "opset ai.onnx 99 is newer than tfmqc supports");
}

#[test]
fn undefined_input_names_the_node() {
    let dir = tmpdir();
    let mut proto = tfmqc_passes::onnx::to_proto(&tiny()).unwrap();
    proto.graph.as_mut().unwrap().node[0].input[0] = "ghost".into();
    let p = dir.path().join("ghost.onnx");
    std::fs::write(&p, prost_encode(&proto)).unwrap();
    assert_user_error(&p, "node 'relu' (Relu): input 'ghost'");
}

#[test]
fn unknown_pass_is_a_user_error() {
    let dir = tmpdir();
    let out = dir.path().join("o.onnx");
    let res = tfmqc(&[
        model_path("ddpm_digits").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--passes",
        "canonicalize,nonsense",
    ]);
    assert_eq!(res.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&res.stderr).contains("unknown pass 'nonsense'"));
    assert!(!out.exists());
}

#[test]
fn pass_without_its_requirement_fails_clearly() {
    let dir = tmpdir();
    let out = dir.path().join("o.onnx");
    let res = tfmqc(&[
        model_path("ddpm_digits").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--passes",
        "fold-tib",
    ]);
    assert_eq!(res.status.code(), Some(1));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("pass 'fold-tib': needs 'detect-tib' to run before it"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn missing_output_folder_is_named() {
    let res = tfmqc(&[
        model_path("ddpm_digits").to_str().unwrap(),
        "-o",
        "/nonexistent/dir/o.onnx",
        "--passes",
        "none",
    ]);
    assert_eq!(res.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&res.stderr).contains("/nonexistent/dir/o.onnx"));
}

fn prost_encode(p: &tract_onnx::pb::ModelProto) -> Vec<u8> {
    tfmqc_passes::onnx::encode_proto(p)
}

/// The tiny model in `dir` with initializer `w` as external data at `location`.
fn with_external_weight(dir: &Path, location: &str) -> std::path::PathBuf {
    let mut proto = tfmqc_passes::onnx::to_proto(&tiny()).unwrap();
    let mut t = tfmqc_passes::onnx::tensor_to_onnx("w", &Tensor::from_vec(vec![2], &[1f32, 2.]));
    t.raw_data.clear();
    t.data_location = Some(tract_onnx::pb::tensor_proto::DataLocation::External as i32);
    let entry = |k: &str, v: &str| tract_onnx::pb::StringStringEntryProto {
        key: k.into(),
        value: v.into(),
    };
    t.external_data = vec![entry("location", location), entry("length", "8")];
    proto.graph.as_mut().unwrap().initializer.push(t);
    let p = dir.join("ext.onnx");
    std::fs::write(&p, prost_encode(&proto)).unwrap();
    p
}

#[test]
fn external_data_at_an_absolute_path_is_refused() {
    let dir = tmpdir();
    let outside = tmpdir();
    let data = outside.path().join("w.data");
    std::fs::write(&data, [0u8; 8]).unwrap();
    let p = with_external_weight(dir.path(), data.to_str().unwrap());
    assert_user_error(&p, "tensor 'w': external data location");
}

#[test]
fn external_data_climbing_out_with_dotdot_is_refused() {
    let root = tmpdir();
    std::fs::create_dir(root.path().join("m")).unwrap();
    std::fs::write(root.path().join("w.data"), [0u8; 8]).unwrap();
    let p = with_external_weight(&root.path().join("m"), "../w.data");
    assert_user_error(&p, "tensor 'w': external data location '../w.data'");
}

#[test]
fn external_data_through_a_symlink_leaving_the_folder_is_refused() {
    let root = tmpdir();
    let dir = root.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(root.path().join("secret.bin"), [0u8; 8]).unwrap();
    std::os::unix::fs::symlink(root.path().join("secret.bin"), dir.join("w.data")).unwrap();
    let p = with_external_weight(&dir, "w.data");
    assert_user_error(&p, "resolves outside the model's folder");
}

#[test]
fn external_data_through_a_symlink_inside_the_folder_is_read() {
    let dir = tmpdir();
    std::fs::write(dir.path().join("real.data"), [0u8; 8]).unwrap();
    std::os::unix::fs::symlink(dir.path().join("real.data"), dir.path().join("w.data")).unwrap();
    let p = with_external_weight(dir.path(), "w.data");
    let res = tfmqc(&["inspect", p.to_str().unwrap()]);
    assert_eq!(
        res.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
}

#[test]
fn a_shape_whose_size_overflows_is_refused_before_allocating() {
    let dir = tmpdir();
    let mut proto = tfmqc_passes::onnx::to_proto(&tiny()).unwrap();
    proto
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .push(tract_onnx::pb::TensorProto {
            name: "huge".into(),
            data_type: 1,
            dims: vec![1 << 40, 1 << 40, 1 << 40],
            ..Default::default()
        });
    let p = dir.path().join("huge.onnx");
    std::fs::write(&p, prost_encode(&proto)).unwrap();
    assert_user_error(&p, "tensor 'huge' (f32[1099511627776, 1099511627776, 1099511627776]): its element count overflows");
}

/// Subgraphs nest without bound in the format; the readers recurse through them, so the
/// depth the decoder accepts (prost's limit of 100 messages) is the bound.
#[test]
fn subgraphs_nested_beyond_the_decoders_depth_are_refused() {
    use tract_onnx::pb;
    let dir = tmpdir();
    let mut proto = tfmqc_passes::onnx::to_proto(&tiny()).unwrap();
    let mut g = pb::GraphProto {
        name: "leaf".into(),
        ..Default::default()
    };
    for i in 0..200 {
        g = pb::GraphProto {
            name: format!("level{i}"),
            node: vec![pb::NodeProto {
                op_type: "If".into(),
                input: vec!["c".into()],
                output: vec![format!("o{i}")],
                attribute: vec![pb::AttributeProto {
                    name: "then_branch".into(),
                    r#type: pb::attribute_proto::AttributeType::Graph as i32,
                    g: Some(g),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
    }
    let graph = proto.graph.as_mut().unwrap();
    graph.node[0].attribute.push(pb::AttributeProto {
        name: "body".into(),
        r#type: pb::attribute_proto::AttributeType::Graph as i32,
        g: Some(g),
        ..Default::default()
    });
    let p = dir.path().join("deep.onnx");
    std::fs::write(&p, prost_encode(&proto)).unwrap();
    assert_user_error(&p, "recursion limit reached");
}
