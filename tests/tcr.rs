//! TCR, the `reparameterize` pass (TCAQ-DM's timestep-channel joint
//! reparameterization): it keeps the float function of every model, the IR it writes
//! (a snapshot of a small graph with both kinds of rewrite), and the command line runs
//! it and reports it.

mod common;
use common::*;

use tfmqc_passes::exec::Runner;
use tfmqc_passes::ir::{attr, print, DType, Dim, Graph, Model, Tensor, ValueInfo};
use tfmqc_passes::reparameterize::reparameterize;
use tfmqc_runtime::Optimize;

fn run(model: &Model, inputs: &Tensors) -> Tensors {
    let names: Vec<String> = model.graph.outputs.iter().map(|o| o.name.clone()).collect();
    let out = Runner::new(model, None, Optimize::Full)
        .unwrap()
        .run(&inputs.clone().into_iter().collect())
        .unwrap();
    names.into_iter().zip(out).collect()
}

/// Balancing moves range between activations and weights, nothing else: on every
/// denoiser in models/, at the default α and at the two ends, the outputs stay within
/// 1e-5 of the float model's (max |Δ| relative to max |y|), with the channel ranges
/// taken on the model's example inputs.
#[test]
fn tcr_keeps_the_float_function_of_every_denoiser() {
    for name in denoisers() {
        let model = tfmqc_passes::onnx::load(&model_path(&name)).unwrap();
        let x = example_inputs(&name);
        let reference = run(&model, &x);
        let alphas: &[f32] = if name == "ddpm_digits" {
            &[0.0, 0.5, 1.0]
        } else {
            &[0.5]
        };
        for &alpha in alphas {
            let mut balanced = model.clone();
            let report = reparameterize(
                &mut balanced,
                &[],
                &[],
                alpha,
                std::slice::from_ref(&x),
                &[0],
            )
            .unwrap();
            assert!(!report.balanced.is_empty(), "{name}: nothing balanced");
            // The factors really move range (not all 1).
            assert!(
                report.balanced.iter().any(|b| b.r_max / b.r_min > 1.5),
                "{name}: every factor is ~1"
            );
            let err = relative_error(&reference, &run(&balanced, &x));
            eprintln!(
                "{name} α = {alpha}: {} activations balanced ({} into an affine), relative error {err:.2e}",
                report.balanced.len(),
                report
                    .balanced
                    .iter()
                    .filter(|b| b.folded_into.starts_with("affine"))
                    .count()
            );
            assert!(err <= 1e-5, "{name} α = {alpha}: relative error {err:.2e}");
        }
    }
}

/// The trained DDPM's attention input (GroupNorm's γ/β feeding the qkv Conv) takes the
/// factors into its affine; the convolutions behind SiLU take a Mul.
#[test]
fn tcr_folds_into_the_group_norm_affine_where_it_can() {
    let mut model = tfmqc_passes::onnx::load(&model_path("ddpm_digits")).unwrap();
    let x = example_inputs("ddpm_digits");
    let report = reparameterize(&mut model, &[], &[], 0.5, &[x], &[0]).unwrap();
    let qkv = report
        .balanced
        .iter()
        .find(|b| b.layers.iter().any(|l| l == "/mid_attn/qkv/Conv"))
        .expect("the qkv conv is balanced");
    assert!(
        qkv.folded_into
            .starts_with("affine /mid_attn/norm/Mul + /mid_attn/norm/Add"),
        "{}",
        qkv.folded_into
    );
    let conv1 = report
        .balanced
        .iter()
        .find(|b| b.layers.iter().any(|l| l == "/down1/conv1/Conv"))
        .expect("conv1 is balanced");
    assert_eq!(conv1.folded_into, "mul");
    assert!(conv1.spread_after < conv1.spread_before);
}

/// A layer norm's output read by a MatMul and a Gemm (one set of factors for both,
/// folded into its scale and bias), and a SiLU read by a MatMul and a residual Add (a Mul
/// in front of the MatMul only). Channel ranges 1, 4, 16, 64 and unit weights at α = ½
/// give r = 1, 2, 4, 8.
fn two_rewrites() -> (Model, Tensors) {
    let mut g = Graph::new("tcr");
    g.inputs.push(ValueInfo::new(
        "x",
        DType::F32,
        vec![Dim::Known(2), Dim::Known(4)],
    ));
    for y in ["y1", "y2", "y3", "z"] {
        g.outputs.push(ValueInfo {
            name: y.into(),
            ..Default::default()
        });
    }
    let init = |g: &mut Graph, name: &str, shape: Vec<usize>, v: &[f32]| {
        g.initializers
            .insert(name.into(), Tensor::from_vec(shape, v));
    };
    // γ·x + β with x = ±1: channel ranges γ + β = 1, 4, 16, 64.
    init(&mut g, "gamma", vec![4], &[1.0, 2.0, 8.0, 32.0]);
    init(&mut g, "beta", vec![4], &[0.0, 2.0, 8.0, 32.0]);
    init(&mut g, "w1", vec![4, 3], &[1.0; 12]);
    init(&mut g, "w2", vec![3, 4], &[-1.0; 12]);
    init(
        &mut g,
        "w3",
        vec![4, 2],
        &[1.0, 0.5, 4.0, -4.0, 16.0, 8.0, 0.25, 0.25],
    );
    let n = node;
    g.add_node(n("scale", "Mul", &["x", "gamma"], "xg"))
        .unwrap();
    g.add_node(n("shift", "Add", &["xg", "beta"], "h")).unwrap();
    g.add_node(n("mm", "MatMul", &["h", "w1"], "y1")).unwrap();
    g.add_node(n("gemm", "Gemm", &["h", "w2"], "y2").with_attr(attr::int("transB", 1)))
        .unwrap();
    g.add_node(n("sig", "Sigmoid", &["x"], "s")).unwrap();
    g.add_node(n("silu", "Mul", &["x", "s"], "m")).unwrap();
    g.add_node(n("mm3", "MatMul", &["m", "w3"], "y3")).unwrap();
    g.add_node(n("residual", "Add", &["m", "x"], "z")).unwrap();
    let model = Model {
        ir_version: 8,
        opsets: vec![(String::new(), 17)],
        graph: g,
        ..Default::default()
    };
    let x: Tensors = [(
        "x".to_string(),
        Tensor::from_vec(vec![2, 4], &[1f32, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0]),
    )]
    .into_iter()
    .collect();
    (model, x)
}

#[test]
fn tcr_rewrite_of_an_affine_and_of_a_silu() {
    let (model, x) = two_rewrites();
    let mut balanced = model.clone();
    let report =
        reparameterize(&mut balanced, &[], &[], 0.5, std::slice::from_ref(&x), &[0]).unwrap();
    let err = relative_error(&run(&model, &x), &run(&balanced, &x));
    assert!(err <= 1e-6, "relative error {err:.2e}");
    insta::with_settings!({snapshot_path => "../snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!(
            "reparameterize_synthetic",
            format!(
                "{}\n--- after reparameterize (α = 0.5):\n{}\n--- report:\n{}\n",
                print::model_text(&model),
                print::model_text(&balanced),
                serde_json::to_string_pretty(&report).unwrap()
            )
        );
    });
}

/// `--tcr on` through the command line: the pass runs, calibration runs again on the
/// balanced model, and the report lists what was balanced.
#[test]
fn tcr_on_the_command_line() {
    let dir = tmpdir();
    let out = dir.path().join("q.onnx");
    let report = dir.path().join("r.json");
    let run = quantize_small(
        "ddpm_digits",
        &out,
        "10",
        &["--tcr", "on", "--report", report.to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("reparameterize"), "{stderr}");
    assert!(stderr.contains("recalibrating"), "{stderr}");
    let rep: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(rep["options"]["tcr"], "on");
    let balanced = rep["tcr"]["balanced"].as_array().expect("tcr report");
    assert!(balanced.len() >= 20, "{} balanced", balanced.len());
    // Every quantized activation was measured (the balanced values exist in the float
    // model the report observes).
    assert!(rep["activations"]
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["sqnr_db"].as_f64().unwrap() > 20.0));
}

/// `--tcr-alpha auto` tries every α of the grid (a rewrite, calibration and trial
/// quantization each) and keeps the one with the best trial SQNR, as the report and the
/// summary say; a bad value is a user error.
#[test]
fn tcr_alpha_auto_keeps_the_best_trial() {
    let dir = tmpdir();
    let out = dir.path().join("q.onnx");
    let report = dir.path().join("r.json");
    let run = quantize_small(
        "ddpm_digits",
        &out,
        "5",
        &[
            "--tcr",
            "on",
            "--tcr-alpha",
            "auto",
            "--weight-bits",
            "4",
            "--act-bits",
            "4",
            "--reconstruct",
            "none",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    let rep: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(rep["options"]["tcr_alpha"], "auto");
    let trials = rep["tcr"]["alpha_trials"].as_array().expect("alpha trials");
    let grid = tfmqc_passes::options::TCR_ALPHA_GRID;
    assert_eq!(trials.len(), grid.len());
    let best = trials
        .iter()
        .max_by(|a, b| a[1].as_f64().unwrap().total_cmp(&b[1].as_f64().unwrap()))
        .unwrap();
    let alpha = rep["tcr"]["alpha"].as_f64().unwrap();
    assert_eq!(alpha, best[0].as_f64().unwrap(), "{trials:?}");
    assert!(stderr.contains("by --tcr-alpha auto"), "{stderr}");
    // One rewrite line: the kept α's (the trials' notes are dropped).
    assert_eq!(stderr.matches("recalibrating").count(), 1, "{stderr}");

    let err = tfmqc(&[
        model_path("ddpm_digits").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--tcr-alpha",
        "1.5",
    ]);
    assert_eq!(err.status.code(), Some(1), "{err:?}");
    assert!(String::from_utf8_lossy(&err.stderr).contains("auto, or a number between 0 and 1"));
}

/// `--tcr auto` (the default) measures both ways on the calibration records and keeps
/// the better by at least 0.1 dB, as the report and the summary say; `--tcaq off` turns
/// it off without measuring.
#[test]
fn tcr_auto_decides_by_the_measured_gain() {
    let dir = tmpdir();
    let out = dir.path().join("q.onnx");
    let report = dir.path().join("r.json");
    let run = quantize_small(
        "ddpm_digits",
        &out,
        "10",
        &["--tcr", "auto", "--report", report.to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    let rep: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let tcr = &rep["tcr"];
    let (off, on) = (
        tcr["auto_db"][0].as_f64().unwrap(),
        tcr["auto_db"][1].as_f64().unwrap(),
    );
    let applied = tcr["applied"].as_bool().unwrap();
    assert_eq!(
        applied,
        on - off >= 0.1,
        "{off} → {on} dB, applied {applied}"
    );
    let line = format!("TCR: {}", if applied { "on" } else { "off" });
    assert!(stderr.contains(&line), "{stderr}");
    // Undone, the quantized graph has no balancing Mul; kept, it has.
    // (A balancing factor: a float constant the compiler added, read by a Mul; the
    // file names it shortly, so it is found by what it is.)
    let m = tfmqc_passes::onnx::load(&out).unwrap();
    let own = tfmqc_passes::ir::names::all_names(
        &tfmqc_passes::onnx::load(&model_path("ddpm_digits")).unwrap(),
    );
    let kinds = tfmqc_passes::ir::names::const_kinds(&m);
    let g = &m.graph;
    let muls = g
        .node_indices()
        .filter(|&ix| {
            let n = g.node(ix);
            n.op_type == "Mul"
                && n.inputs.iter().any(|i| {
                    !own.contains(i)
                        && kinds.get(i) == Some(&tfmqc_runtime::classify::ConstKind::Float)
                })
        })
        .count();
    assert_eq!(muls > 0, applied, "{muls} balancing factors in the output");

    let run = quantize_small("ddpm_digits", &out, "10", &["--tcaq", "off"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("TCR off"), "{stderr}");
}
