//! Snapshot tests of the IR text: `inspect` of every model, canonicalize's output, the
//! graph after fold-tib for each model family. Snapshots live in snapshots/ and are read
//! like code: a change in them is a change in what the compiler does.

mod common;
use common::*;

use tfmqc_passes::ir::print;
use tfmqc_passes::ir::{attr, DType, Dim, Graph, Model, Tensor, ValueInfo};

fn snapshot(name: &str, text: &str) {
    insta::with_settings!({snapshot_path => "../snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!(name, text);
    });
}

#[test]
fn inspect_every_model() {
    for name in all_models() {
        let out = tfmqc_ok(&["inspect", model_path(&name).to_str().unwrap()]);
        snapshot(
            &format!("inspect_{name}"),
            &String::from_utf8_lossy(&out.stdout),
        );
    }
}

/// A small graph with everything canonicalize handles: a Constant node, a shape
/// computation on a fixed-size input, a constant-only subgraph, a dead branch and an
/// unused initializer.
pub fn synthetic() -> Model {
    let mut g = Graph::new("synthetic");
    g.inputs.push(ValueInfo::new(
        "x",
        DType::F32,
        vec![Dim::Known(1), Dim::Known(4)],
    ));
    g.outputs.push(ValueInfo {
        name: "y".into(),
        ..Default::default()
    });
    g.initializers
        .insert("w".into(), Tensor::from_vec(vec![4], &[1f32, 2., 3., 4.]));
    g.initializers
        .insert("unused".into(), Tensor::from_vec(vec![2], &[0f32, 0.]));
    let c = Tensor::from_vec(vec![], &[0.5f32]);
    let value = tract_onnx::pb::AttributeProto {
        name: "value".into(),
        r#type: tract_onnx::pb::attribute_proto::AttributeType::Tensor as i32,
        t: Some(tfmqc_passes::onnx::tensor_to_onnx("", &c)),
        ..Default::default()
    };
    let n = node;
    g.add_node(n("half", "Constant", &[], "half").with_attr(value))
        .unwrap();
    g.add_node(n("scale", "Mul", &["w", "half"], "w_half"))
        .unwrap(); // constant-only
    g.add_node(n("shape", "Shape", &["x"], "x_shape")).unwrap(); // fixed shape: folds
    g.add_node(n("reshape", "Reshape", &["w_half", "x_shape"], "w_row"))
        .unwrap();
    g.add_node(n("mul", "Mul", &["x", "w_row"], "xw")).unwrap();
    g.add_node(n("dead", "Neg", &["xw"], "never_read")).unwrap();
    g.add_node(n("sum", "ReduceSum", &["xw"], "y").with_attr(attr::int("keepdims", 0)))
        .unwrap();
    Model {
        ir_version: 8,
        opsets: vec![(String::new(), 17)],
        graph: g,
        ..Default::default()
    }
}

#[test]
fn canonicalize_synthetic_graph() {
    let mut m = synthetic();
    let before = print::model_text(&m);
    let stats = tfmqc_passes::canonicalize::canonicalize(&mut m).unwrap();
    snapshot(
        "canonicalize_synthetic",
        &format!(
            "{before}\n--- after canonicalize: {stats:?}\n{}",
            print::model_text(&m)
        ),
    );
}

#[test]
fn canonicalize_trained_ddpm() {
    let mut m = tfmqc_passes::onnx::load(&model_path("ddpm_digits")).unwrap();
    tfmqc_passes::canonicalize::canonicalize(&mut m).unwrap();
    snapshot("canonicalize_ddpm_digits", &print::model_text(&m));
}

/// The graph after detect-tib + fold-tib (S = ddim:50), one model per family.
#[test]
fn fold_tib_each_family() {
    let dir = tmpdir();
    for name in [
        "ddpm_digits",
        "unet2d_attn_dynbatch",
        "unet2d_cond",
        "guided_unet",
        "ddim_unet",
    ] {
        let out = dir.path().join(format!("{name}.folded.onnx"));
        tfmqc_ok(&[
            model_path(name).to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--passes",
            "detect-tib,fold-tib",
            "--timesteps",
            "ddim:50",
        ]);
        let mut m = tfmqc_passes::onnx::load(&out).unwrap();
        tfmqc_passes::canonicalize::infer_types(&mut m).unwrap(); // types for the reader
        snapshot(&format!("fold_tib_{name}"), &print::model_text(&m));
    }
}

/// A quantized graph (W8A8, 4 step groups) of the trained model: weights behind
/// DequantizeLinear, activations behind QuantizeLinear/DequantizeLinear, FSC tables.
#[test]
fn quantize_trained_ddpm() {
    let dir = tmpdir();
    let out = dir.path().join("q.onnx");
    quantize_small("ddpm_digits", &out, "10", &["--step-groups", "2"]);
    let mut m = tfmqc_passes::onnx::load(&out).unwrap();
    tfmqc_passes::canonicalize::infer_types(&mut m).unwrap();
    snapshot("quantize_ddpm_digits", &print::model_text(&m));
}
