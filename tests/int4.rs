//! Packed INT4 weights (`--weight-bits 4`, `--int4-storage packed`, the default): the file
//! holds ONNX INT4 behind opset-21 DequantizeLinear, onnxruntime loads it and computes
//! what it computes on the int8-storage file of the same model, and the runtime keeps
//! the weights at 4 bits with bit-exact results.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use tfmqc_passes::ir::DType;

/// Quick calibration, no TCR / output-pair trials: the two storages of one compile.
const QUICK: &[&str] = &[
    "--calib-samples",
    "2",
    "--calib-steps",
    "10",
    "--tcr",
    "off",
    "--weight-bits",
    "4",
    // S = every training step: the example inputs' t are in it.
    "--sampling-steps",
    "all",
    // At S = 1000 the TIB is computed at 4 bits (its tables pass the budget); 20 TIAR
    // steps give the same form as the default 2000, which took 23 s of CPU per compile.
    "--tiar-iters",
    "20",
    // Under `auto` only the int8-storage file gets output pairs (onnxruntime fuses no
    // Conv with INT4 weights): `all` gives both files the same graph.
    "--output-qdq",
    "all",
];

fn compile(name: &str, dir: &Path, storage: &str) -> PathBuf {
    let out = dir.join(format!("{name}.w4{storage}.onnx"));
    let src = model_path(name);
    let mut args = vec![
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--int4-storage",
        storage,
    ];
    args.extend(QUICK);
    tfmqc_ok(&args);
    out
}

#[test]
fn packed_int4_file_is_smaller_loads_everywhere_and_computes_the_int8_storage_values() {
    let dir = tmpdir();
    let name = "ddpm_digits";
    let packed = compile(name, dir.path(), "packed");
    let int8 = compile(name, dir.path(), "int8");

    // The file: INT4 weights at opset 21, each the int8-storage file's values.
    let mp = tfmqc_passes::onnx::load(&packed).unwrap();
    let m8 = tfmqc_passes::onnx::load(&int8).unwrap();
    assert_eq!(mp.onnx_opset(), 21);
    assert_eq!(m8.onnx_opset(), 17, "int8 storage keeps the model's opset");
    let mut weights = 0;
    for (wname, t) in &mp.graph.initializers {
        // Every INT4 initializer is a weight (the two files name them alike).
        if t.dtype != DType::I4 {
            continue;
        }
        let same = &m8.graph.initializers[wname];
        assert_eq!(same.dtype, DType::I8, "{wname}");
        assert_eq!(
            t.to_f64_lossy().unwrap(),
            same.to_f64_lossy().unwrap(),
            "{wname}"
        );
        assert!(t
            .to_f64_lossy()
            .unwrap()
            .iter()
            .all(|v| (-7.0..=7.0).contains(v)));
        weights += 1;
    }
    assert!(weights > 10, "{weights} INT4 weights");
    let (sp, s8) = (
        std::fs::metadata(&packed).unwrap().len(),
        std::fs::metadata(&int8).unwrap().len(),
    );
    assert!(sp < s8 * 3 / 4, "packed {sp} bytes, int8 storage {s8}");

    let x = example_inputs(name);
    // The runtime on tract's ops (4-bit initializers widened before tract loads them).
    assert_bit_exact("tract", &tract_run(&packed, &x), &tract_run(&int8, &x));
    // The int8 kernels: weights resident at 4 bits, the same results bit for bit.
    let full = tfmqc_runtime::Optimize::Full;
    let (ep, np) = tfmqc_runtime::Engine::load_int8(&packed, full).unwrap();
    let (e8, n8) = tfmqc_runtime::Engine::load_int8(&int8, full).unwrap();
    assert_eq!(np, n8, "the same nodes lowered");
    assert_bit_exact(
        "int8 kernels",
        &tract_run_engine(&ep, &x),
        &tract_run_engine(&e8, &x),
    );
    let ((rp, f32p), (r8, f328)) = (ep.int8_weight_bytes(), e8.int8_weight_bytes());
    assert_eq!(f32p, f328);
    assert!(
        rp * 10 < r8 * 7,
        "resident: {rp} bytes at 4 bits, {r8} at 8"
    );

    if let Some(py) = python() {
        ort(&py, &["check", packed.to_str().unwrap()]);
        let (op, o8) = (
            ort_run(&py, &packed, &x, dir.path()),
            ort_run(&py, &int8, &x, dir.path()),
        );
        let err = relative_error(&o8, &op);
        assert!(err < 1e-6, "onnxruntime: packed vs int8 storage {err:e}");
    }
}

#[test]
fn opset_13_models_are_upgraded_and_still_run() {
    // ddim_unet is opset 13: the upgrade to 21 rewrites what changed meaning (none of its
    // ops here) and onnxruntime runs the result.
    let dir = tmpdir();
    let packed = compile("ddim_unet", dir.path(), "packed");
    let m = tfmqc_passes::onnx::load(&packed).unwrap();
    assert_eq!(m.onnx_opset(), 21);
    assert!(m.ir_version >= 10);
    let x = example_inputs("ddim_unet");
    let ours = tract_run(&packed, &x);
    if let Some(py) = python() {
        // Both evaluate the same QDQ graph, but not to the bit: onnxruntime fuses parts of
        // it into its int8 kernels, and tract's `Div` by a gathered per-step scale can be
        // one ulp off, which flips a code at an exact tie. At 4-bit weights ddim_unet (not
        // a trained model) amplifies a flipped code more than the 8-bit files of
        // tests/quantize.rs (bar 30 dB there): above 30 dB before step groups took the
        // union of the batches' ranges, 29.4 dB after (other scales, other ties). A broken
        // upgrade (an op read under the wrong opset) gives far less than 25 dB.
        let db = sqnr_db(&ours, &ort_run(&py, &packed, &x, dir.path()));
        assert!(db > 25.0, "tract and onnxruntime disagree: {db:.1} dB");
    }
}
