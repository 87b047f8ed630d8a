//! `--tib quant|auto`: TIAR on the trained model (the paper's Fig. 4 bar), the quantized
//! TIB running in tract and onnxruntime, and `--tib auto` keeping to its table budget.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use tfmqc_passes::options::TibMode;
use tfmqc_passes::pipeline::{parse_pipeline, run_pipeline, PassContext};
use tfmqc_passes::tiar::TiarReport;
use tfmqc_passes::Options;
use tfmqc_runtime::classify::ConstKind;

const TIB_ONLY: &str = "canonicalize,detect-tib,fold-tib";

/// The TIB passes in-process; returns TIAR's report.
fn tiar_report(name: &str, options: &Options) -> TiarReport {
    let model = tfmqc_passes::onnx::load(&model_path(name)).unwrap();
    let mut cx = PassContext::new(model, options);
    let passes = parse_pipeline(TIB_ONLY).unwrap();
    run_pipeline(&mut cx, &passes, &mut |_, _, _| Ok(())).unwrap();
    cx.tiar.expect("--tib quant reports")
}

/// `tfmqc NAME --passes canonicalize,detect-tib,fold-tib --timesteps ddim:50 ...`.
fn compile_tib(name: &str, dir: &Path, tag: &str, extra: &[&str]) -> (PathBuf, String) {
    let out = dir.join(format!("{name}.{tag}.onnx"));
    let model = model_path(name);
    let mut args = vec![
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--passes",
        TIB_ONLY,
        "--timesteps",
        "ddim:50",
    ];
    args.extend_from_slice(extra);
    let o = tfmqc_ok(&args);
    (out, String::from_utf8_lossy(&o.stderr).to_string())
}

/// Bytes of the TIB tables in a compiled model.
fn table_bytes(path: &Path) -> usize {
    let m = tfmqc_passes::onnx::load(path).unwrap();
    let kinds = tfmqc_passes::ir::names::const_kinds(&m);
    m.graph
        .initializers
        .iter()
        .filter(|(k, _)| kinds.get(*k) == Some(&ConstKind::Table))
        .map(|(_, t)| t.byte_len())
        .sum()
}

#[test]
fn tiar_keeps_every_temporal_feature_above_0_999_cosine_on_the_trained_model_at_w4a8() {
    let options = Options {
        tib: TibMode::Quant,
        weight_bits: 4,
        act_bits: 8,
        timesteps: Some("ddim:50".into()),
        ..Default::default()
    };
    let r = tiar_report("ddpm_digits", &options);
    assert!(r.fallback.is_none(), "{:?}", r.fallback);
    assert_eq!(r.timesteps.len(), 50);
    assert_eq!(r.layers.len(), 10, "time MLP (2) and 8 block projections");
    assert!(
        !r.kept_rtn && r.loss_tiar < r.loss_rtn / 5.0,
        "TIAR {} vs RTN {}",
        r.loss_tiar,
        r.loss_rtn
    );
    let worst = |f: fn(&tfmqc_passes::tiar::FrontierChoice) -> &Vec<f64>| {
        r.frontier
            .iter()
            .flat_map(|c| f(c).iter().copied())
            .fold(f64::INFINITY, f64::min)
    };
    let (tiar, rtn) = (worst(|c| &c.cosine_tiar), worst(|c| &c.cosine_rtn));
    eprintln!("worst temporal-feature cosine over the frontier and S: TIAR {tiar:.5}, round-to-nearest {rtn:.5}");
    for c in &r.frontier {
        assert_eq!(c.cosine_tiar.len(), 50);
        assert_eq!(c.choice, "quantized");
    }
    assert!(tiar >= 0.999, "TIAR worst cosine {tiar}");
    assert!(rtn < tiar, "round-to-nearest {rtn} vs TIAR {tiar}");
}

#[test]
fn quantized_tib_runs_in_tract_and_onnxruntime_near_float() {
    // Only the TIB is quantized here (W4A8 on its linears): the denoiser's output on the
    // example inputs must stay within 30 dB SQNR of float, the same in both runtimes.
    let dir = tmpdir();
    let py = python();
    for name in ["ddpm_digits", "guided_unet", "unet2d_cond"] {
        let (q, _) = compile_tib(
            name,
            dir.path(),
            "tibq",
            &[
                "--tib",
                "quant",
                "--weight-bits",
                "4",
                "--tiar-iters",
                "300",
            ],
        );
        let m = tfmqc_passes::onnx::load(&q).unwrap();
        let ops = m.graph.op_counts();
        assert!(
            ops.get("DequantizeLinear").copied().unwrap_or(0) >= 2,
            "{name}: {ops:?}"
        );
        assert_eq!(table_bytes(&q), 0, "{name}: --tib quant writes no tables");
        // At a t in S (ddim:50): a t outside it is an error now that the computed TIB
        // reads t through S.
        let mut x = example_inputs(name);
        let tinput = m
            .metadata_value("tfmqc.timestep_input")
            .unwrap()
            .to_string();
        x.insert(tinput.clone(), fill_like(&x[&tinput], 380));
        let float = tract_run(&model_path(name), &x);
        let ours = tract_run(&q, &x);
        let db = sqnr_db(&float, &ours);
        eprintln!("{name}: quantized TIB, tract output {db:.1} dB from float");
        assert!(db >= 30.0, "{name}: tract output {db:.1} dB from float");
        if let Some(py) = &py {
            ort(py, &["check", q.to_str().unwrap()]);
            let theirs = ort_run(py, &q, &x, dir.path());
            let db_ort = sqnr_db(&ort_run(py, &model_path(name), &x, dir.path()), &theirs);
            assert!(
                db_ort >= 30.0,
                "{name}: onnxruntime output {db_ort:.1} dB from float"
            );
            let agree = sqnr_db(&ours, &theirs);
            assert!(
                agree >= 40.0,
                "{name}: tract and onnxruntime {agree:.1} dB apart"
            );
        }
    }
}

/// `t` with every element set to `s`, same dtype and shape.
fn fill_like(t: &tfmqc_passes::Tensor, s: i64) -> tfmqc_passes::Tensor {
    use tfmqc_passes::ir::DType;
    let n = t.numel();
    match t.dtype {
        DType::I64 => tfmqc_passes::Tensor::from_vec(t.shape.clone(), &vec![s; n]),
        DType::I32 => tfmqc_passes::Tensor::from_vec(t.shape.clone(), &vec![s as i32; n]),
        DType::F32 => tfmqc_passes::Tensor::from_vec(t.shape.clone(), &vec![s as f32; n]),
        other => panic!("time step of type {other}"),
    }
}

/// Every temporal feature computed (`--tib quant`) and one set of scales: no table and
/// no step-group table reads the index of t, yet a t outside S (5 ∉ ddim:50) is still an
/// error in tract and onnxruntime (the computed TIB reads t as S[index(t)]) and in the
/// runtime's `Denoiser` (S from the metadata, named in the message), while a t in S runs.
#[test]
fn a_step_outside_the_set_fails_with_every_temporal_feature_computed() {
    let dir = tmpdir();
    let py = python();
    for name in ["ddpm_digits", "unet2d_cond", "guided_unet", "ddim_unet"] {
        let (q, _) = compile_tib(
            name,
            dir.path(),
            "computed",
            &["--tib", "quant", "--tiar-iters", "20", "--step-groups", "1"],
        );
        assert_eq!(table_bytes(&q), 0, "{name}: every feature computed");
        let m = tfmqc_passes::onnx::load(&q).unwrap();
        let tinput = m
            .metadata_value("tfmqc.timestep_input")
            .unwrap()
            .to_string();
        let example = example_inputs(name);
        let with_t = |s: i64| {
            let mut x = example.clone();
            x.insert(tinput.clone(), fill_like(&example[&tinput], s));
            x
        };
        let (good, bad) = (with_t(380), with_t(5));
        let engine = tfmqc_runtime::Engine::load(&q, None, tfmqc_runtime::Optimize::Full).unwrap();
        let ordered = |x: &Tensors| {
            engine
                .input_names()
                .iter()
                .map(|n| tfmqc_passes::exec::to_tract(&x[n]).unwrap())
                .collect()
        };
        assert!(
            engine.run(ordered(&good)).is_ok(),
            "{name}: tract, t = 380 ∈ S"
        );
        assert!(
            engine.run(ordered(&bad)).is_err(),
            "{name}: tract ran with t = 5 ∉ S"
        );
        if let Some(py) = &py {
            ort_run(py, &q, &good, dir.path());
            let inp = dir.path().join(format!("{name}.bad.safetensors"));
            write_inputs(&inp, &bad);
            ort(
                py,
                &["expect-error", q.to_str().unwrap(), inp.to_str().unwrap()],
            );
        }
        let d = tfmqc_runtime::Denoiser::load(&q).unwrap();
        let x = tfmqc_passes::exec::to_tract(&example[&d.sample_input().name]).unwrap();
        let err = d.denoise(&x, 5, &[]).unwrap_err().to_string();
        assert!(
            err.contains("time step 5 is not in the model's time-step set S (50 steps, 0..980"),
            "{name}: {err}"
        );
    }
}

#[test]
fn tib_auto_keeps_to_its_budget() {
    let dir = tmpdir();
    // ddpm_digits at ddim:50: tables of 6400 (2 of them) and 12800 bytes (6).
    let (all, _) = compile_tib(
        "ddpm_digits",
        dir.path(),
        "all",
        &[
            "--tib",
            "auto",
            "--lut-budget",
            "1000000",
            "--tiar-iters",
            "50",
            // Exact tables: the sizes above (low-precision ones are budgeted by their
            // own bytes: tests/tib.rs).
            "--table-precision",
            "f32",
        ],
    );
    assert_eq!(
        table_bytes(&all),
        2 * 6400 + 6 * 12800,
        "within budget: every table"
    );
    // The budget pays for the quantized TIB's layers first (W8 here), tables take the
    // rest: budgets of those layers' bytes plus 0 and 6400 for tables (under the 89600
    // of all tables, else every feature is a table and TIAR does not run).
    let layers = tiar_report(
        "ddpm_digits",
        &Options {
            tib: TibMode::Quant,
            timesteps: Some("ddim:50".into()),
            tiar_iters: Some(1),
            ..Default::default()
        },
    )
    .tib_weight_bytes as usize;
    assert!(layers > 0);
    for for_tables in [0usize, 6400] {
        let budget = layers + for_tables;
        let b = budget.to_string();
        let (q, stderr) = compile_tib(
            "ddpm_digits",
            dir.path(),
            &format!("b{budget}"),
            &[
                "--tib",
                "auto",
                "--lut-budget",
                &b,
                "--tiar-iters",
                "50",
                "--table-precision",
                "f32",
            ],
        );
        let used = table_bytes(&q);
        assert!(
            used <= for_tables,
            "budget {budget} ({layers} for the TIB's layers): {used} bytes of tables"
        );
        // The budget is spent while something fits.
        assert!(
            for_tables < 6400 || used > 0,
            "budget {budget}: no table chosen"
        );
        assert!(stderr.contains("per frontier value"), "{stderr}");
        assert!(
            stderr.contains(&format!("{layers} of it for the quantized TIB's layers")),
            "{stderr}"
        );
        assert!(stderr.contains(": table") || for_tables < 6400, "{stderr}");
        assert!(stderr.contains(": quantized"), "{stderr}");
        // Computed and tabled features together still run (t in S: a table refuses others).
        let mut x = example_inputs("ddpm_digits");
        let t = x.get_mut("timestep").expect("time-step input");
        let n = t.numel();
        *t = tfmqc_passes::Tensor::from_vec(t.shape.clone(), &vec![380i64; n]);
        let db = sqnr_db(
            &tract_run(&model_path("ddpm_digits"), &x),
            &tract_run(&q, &x),
        );
        assert!(db >= 30.0, "budget {budget}: {db:.1} dB from float");
    }
}

/// The default (`--tib auto`) at the default S: the tables fit the budget, so TIAR does
/// not run and the graph is `--tib lut`'s, the same bytes but for the recorded options.
#[test]
fn default_tib_within_budget_writes_the_tables_without_tiar() {
    let dir = tmpdir();
    let model = model_path("ddpm_digits");
    let write = |tag: &str, extra: &[&str]| {
        let out = dir.path().join(format!("{tag}.onnx"));
        let mut args = vec![
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--passes",
            TIB_ONLY,
        ];
        args.extend_from_slice(extra);
        let o = tfmqc_ok(&args);
        let mut m = tfmqc_passes::onnx::load(&out).unwrap();
        m.metadata.retain(|(k, _)| k != "tfmqc.options");
        let bare = dir.path().join(format!("{tag}.bare.onnx"));
        tfmqc_passes::onnx::save(&m, &bare).unwrap();
        (
            std::fs::read(&bare).unwrap(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (auto, stderr) = write("auto", &[]);
    let (lut, _) = write("lut", &["--tib", "lut"]);
    // 4-bit weights: the same budget, so the same tables and no TIAR.
    let (_, stderr_w4) = write("auto_w4", &["--weight-bits", "4"]);
    assert!(stderr_w4.contains("no TIAR"), "{stderr_w4}");
    assert!(stderr.contains("no TIAR"), "{stderr}");
    assert!(!stderr.contains("TIAR over"), "{stderr}");
    assert!(
        auto == lut,
        "--tib auto within budget differs from --tib lut"
    );
}

#[test]
fn default_auto_budget_is_a_tenth_of_the_model_at_8_bit_weights() {
    // S = 1000: the int8 tables (68 kB) pass the budget, so TIAR runs and reports.
    let options = Options {
        tib: TibMode::Auto,
        weight_bits: 4,
        timesteps: Some("1000".into()),
        tiar_iters: Some(20),
        ..Default::default()
    };
    let r = tiar_report("ddpm_digits", &options);
    // The budget is a tenth of the model at 8-bit weights, whatever --weight-bits (so W4
    // keeps W8's tables), while the model's reported bytes count packed 4-bit weights at
    // half a byte.
    let w8 = tfmqc_passes::tiar::quantized_model_bytes(
        &tfmqc_passes::onnx::load(&model_path("ddpm_digits")).unwrap(),
        &Options {
            weight_bits: 8,
            ..Default::default()
        },
    );
    // (fold-tib sees the canonicalized model, whose initializers differ by a few
    // constants from the file's.)
    let tenth = (w8 / 10) as f64;
    assert!(
        (r.lut_budget_bytes as f64 - tenth).abs() <= 0.01 * tenth,
        "budget {} against a tenth of the W8 model {tenth}",
        r.lut_budget_bytes
    );
    assert!(
        r.quantized_model_bytes < w8 * 7 / 10,
        "{} vs {w8}",
        r.quantized_model_bytes
    );
    assert!(r.tib_weight_bytes > 0);
    // Tables take what the TIB's layers leave (here nothing: they pass it alone).
    assert!(r.table_bytes <= r.lut_budget_bytes.saturating_sub(r.tib_weight_bytes));
    let chosen: u64 = r
        .frontier
        .iter()
        .filter(|f| f.choice == "table")
        .map(|f| f.table_bytes)
        .sum();
    assert_eq!(chosen, r.table_bytes);
}

#[test]
fn quantized_tib_with_step_groups_keeps_the_step_index() {
    // --step-groups > 1 reads the index of t in S even when no table does.
    let dir = tmpdir();
    let out = dir.path().join("q.onnx");
    quantize_small(
        "ddpm_digits",
        &out,
        "10",
        &[
            "--step-groups",
            "2",
            "--tib",
            "quant",
            "--tiar-iters",
            "20",
            "--reconstruct",
            "none",
        ],
    );
    let m = tfmqc_passes::onnx::load(&out).unwrap();
    // The step-group index (step index · groups / |S|, its constants scale-table kind)
    // reads the step index; the scale tables read it.
    let g = &m.graph;
    let kinds = tfmqc_passes::ir::names::const_kinds(&m);
    assert!(g.node_indices().any(|ix| {
        let n = g.node(ix);
        n.op_type == "Div" && kinds.get(&n.inputs[1]) == Some(&ConstKind::ScaleTable)
    }));
    assert_eq!(table_bytes(&out), 0);
    // t in S (ddim:10): the step-group index refuses others.
    let mut x = example_inputs("ddpm_digits");
    let t = x.get_mut("timestep").expect("time-step input");
    let n = t.numel();
    *t = tfmqc_passes::Tensor::from_vec(t.shape.clone(), &vec![300i64; n]);
    let y = tract_run(&out, &x);
    assert!(y
        .values()
        .all(|t| t.to_f32_vec().unwrap().iter().all(|v| v.is_finite())));
}

/// What `--tib quant` changes in the small guided UNet (ddim:10): the TIB stays
/// computed, its two linears read DequantizeLinear weights and a
/// QuantizeLinear/DequantizeLinear input, and no table is added (the step index is,
/// for quantize's per-step scales under `--step-groups auto`).
#[test]
fn tib_quant_graph_snapshot() {
    let dir = tmpdir();
    let out = dir.path().join("guided_unet.tibq.onnx");
    tfmqc_ok(&[
        model_path("guided_unet").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--passes",
        "detect-tib,fold-tib",
        "--timesteps",
        "ddim:10",
        "--tib",
        "quant",
        "--weight-bits",
        "4",
        "--tiar-iters",
        "20",
    ]);
    let typed = |p: &std::path::Path| {
        let mut m = tfmqc_passes::onnx::load(p).unwrap();
        tfmqc_passes::canonicalize::infer_types(&mut m).unwrap();
        m
    };
    let text =
        tfmqc_passes::ir::print::rewrite_text(&typed(&model_path("guided_unet")), &typed(&out));
    insta::with_settings!({snapshot_path => "../snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!("tib_quant_guided_unet", text);
    });
}

/// A TIB with an op TIAR has no gradient for (Tanh after the linear): `--tib quant`
/// warns, naming the node and op, and folds the TIB into tables instead.
#[test]
fn unsupported_tib_op_falls_back_to_tables_with_a_warning() {
    use tfmqc_passes::ir::{attr, DType, Dim, Graph, Tensor, ValueInfo};
    let mut g = Graph::new("tanh_tib");
    g.inputs
        .push(ValueInfo::new("t", DType::F32, vec![Dim::Known(1)]));
    g.inputs.push(ValueInfo::new(
        "x",
        DType::F32,
        vec![Dim::Known(1), Dim::Known(4)],
    ));
    g.outputs.push(ValueInfo {
        name: "y".into(),
        ..Default::default()
    });
    let axes = Tensor::from_vec(vec![1], &[1i64]);
    g.initializers.insert("axes".into(), axes);
    g.initializers.insert(
        "freq".into(),
        Tensor::from_vec(vec![1, 4], &[1f32, 0.1, 0.01, 0.001]),
    );
    let w: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).sin()).collect();
    g.initializers
        .insert("w".into(), Tensor::from_vec(vec![4, 4], &w));
    let n = node;
    for node in [
        n("col", "Unsqueeze", &["t", "axes"], "t_col"),
        n("phase", "Mul", &["t_col", "freq"], "phase"),
        n("sin", "Sin", &["phase"], "emb"),
        n("linear", "Gemm", &["emb", "w"], "h").with_attr(attr::int("transB", 1)),
        n("squash", "Tanh", &["h"], "temb"),
        n("join", "Add", &["x", "temb"], "y"),
    ] {
        g.add_node(node).unwrap();
    }
    let dir = tmpdir();
    let path = dir.path().join("tanh_tib.onnx");
    save_graph(g, &path);
    let out = dir.path().join("q.onnx");
    let o = tfmqc_ok(&[
        path.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--passes",
        "detect-tib,fold-tib",
        "--timesteps",
        "0,1,2",
        "--tib",
        "quant",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("WARNING") && stderr.contains("'squash' (Tanh)"),
        "{stderr}"
    );
    assert!(table_bytes(&out) > 0, "folded into tables instead");
    let m = tfmqc_passes::onnx::load(&out).unwrap();
    assert_eq!(m.graph.op_counts().get("DequantizeLinear"), None);
}

/// A frontier value that another, computed frontier value is made from (here the time
/// embedding, read by the network and by a projection) stays computed even when asked to
/// be a table: the graph computes it anyway, and one value has one producer.
#[test]
fn a_frontier_value_feeding_a_computed_one_is_not_tabled() {
    use tfmqc_passes::ir::{attr, DType, Dim, Graph, Model, Tensor, ValueInfo};
    let mut g = Graph::new("shared_temb");
    g.inputs
        .push(ValueInfo::new("t", DType::F32, vec![Dim::Known(1)]));
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
        .insert("axes".into(), Tensor::from_vec(vec![1], &[1i64]));
    g.initializers.insert(
        "freq".into(),
        Tensor::from_vec(vec![1, 4], &[1f32, 0.1, 0.01, 0.001]),
    );
    let w: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).sin()).collect();
    g.initializers
        .insert("w".into(), Tensor::from_vec(vec![4, 4], &w));
    g.initializers
        .insert("w2".into(), Tensor::from_vec(vec![4, 4], &w));
    let n = node;
    for node in [
        n("col", "Unsqueeze", &["t", "axes"], "t_col"),
        n("phase", "Mul", &["t_col", "freq"], "phase"),
        n("sin", "Sin", &["phase"], "emb"),
        n("linear", "Gemm", &["emb", "w"], "temb").with_attr(attr::int("transB", 1)),
        n("proj", "Gemm", &["temb", "w2"], "p").with_attr(attr::int("transB", 1)),
        n("join", "Add", &["x", "temb"], "xa"),
        n("join2", "Add", &["xa", "p"], "y"),
    ] {
        g.add_node(node).unwrap();
    }
    let mut model = Model {
        ir_version: 8,
        opsets: vec![(String::new(), 17)],
        graph: g,
        ..Default::default()
    };
    let reference = model.clone();
    let tib = tfmqc_passes::detect_tib::detect(&model, None).unwrap();
    let names: Vec<&str> = tib.frontier.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["temb", "p"]);
    let set = [0i64, 1, 2];
    let tables = tfmqc_passes::fold_tib::evaluate_tables(&model, &tib, &set).unwrap();
    let r = tfmqc_passes::fold_tib::fold_tables(
        &mut model,
        &tib,
        &set,
        tables,
        &[true, false],
        false,
        tfmqc_passes::table_quant::TablePrecision::Fixed(tfmqc_passes::table_quant::TableForm::F32),
    )
    .unwrap();
    assert_eq!(r.tabled, vec![false, false]);
    assert_eq!(r.tables, 0);
    model.graph.validate().unwrap();
    let dir = tmpdir();
    let (a, b) = (dir.path().join("a.onnx"), dir.path().join("b.onnx"));
    tfmqc_passes::onnx::save(&reference, &a).unwrap();
    tfmqc_passes::onnx::save(&model, &b).unwrap();
    let x: Tensors = [
        ("t".to_string(), Tensor::from_vec(vec![1], &[2f32])),
        (
            "x".to_string(),
            Tensor::from_vec(vec![1, 4], &[0.5f32, -1.0, 2.0, 0.0]),
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(tract_run(&a, &x), tract_run(&b, &x));
}
