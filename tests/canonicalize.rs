//! canonicalize computes what the original computed, on every model, in tract and in
//! onnxruntime, and leaves no Constant node or dead node behind.

mod common;
use common::*;

/// Folded constants are computed by tract; onnxruntime's float math may differ by ulps.
const TOLERANCE: f64 = 1e-5;

#[test]
fn canonicalized_models_compute_the_same_outputs() {
    let dir = tmpdir();
    let py = python();
    for name in all_models() {
        let src = model_path(&name);
        let dst = dir.path().join(format!("{name}.canon.onnx"));
        tfmqc_ok(&[
            src.to_str().unwrap(),
            "-o",
            dst.to_str().unwrap(),
            "--passes",
            "canonicalize",
        ]);
        let x = example_inputs(&name);
        let err = relative_error(&tract_run(&src, &x), &tract_run(&dst, &x));
        assert!(err <= TOLERANCE, "{name}: tract relative error {err:e}");
        if let Some(py) = &py {
            let err = relative_error(
                &ort_run(py, &src, &x, dir.path()),
                &ort_run(py, &dst, &x, dir.path()),
            );
            assert!(
                err <= TOLERANCE,
                "{name}: onnxruntime relative error {err:e}"
            );
            ort(py, &["check", dst.to_str().unwrap()]);
        }
        let m = tfmqc_passes::onnx::load(&dst).unwrap();
        let ops = m.graph.op_counts();
        assert!(
            !ops.contains_key("Constant"),
            "{name}: Constant nodes left: {ops:?}"
        );
        let before = m.graph.node_count();
        let mut again = m.clone();
        let (dead, _) = again.graph.remove_dead();
        assert_eq!(dead, 0, "{name}: dead nodes left ({before} nodes)");
    }
}

#[test]
fn canonicalize_types_every_intermediate_value() {
    let mut m = tfmqc_passes::onnx::load(&model_path("unet2d_cond_dynbatch")).unwrap();
    tfmqc_passes::canonicalize::canonicalize(&mut m).unwrap();
    let g = &m.graph;
    for ix in g.node_indices() {
        for o in &g.node(ix).outputs {
            let info = g.info(o).unwrap_or_else(|| panic!("{o} untyped"));
            assert!(
                info.dtype.is_some() && info.shape.is_some(),
                "{o}: {}",
                info.type_string()
            );
        }
    }
    // Symbolic batch keeps the file's name for it.
    assert_eq!(
        g.info(&g.outputs[0].name).unwrap().type_string(),
        "f32[N,4,16,16]"
    );
}
