//! detect-tib + fold-tib on every model: the folded model computes what the original did
//! for every t in S (in onnxruntime and in tract), and a t outside S is an error.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use tfmqc_passes::ir::{DType, Tensor};
use tfmqc_passes::options::parse_timesteps;

/// Folded outputs may differ from the original by this much relative to max |original|
/// (the tables are computed by tract, the original's time MLP by each runtime).
const TOLERANCE: f64 = 1e-5;

/// `t` with every element set to `s`, same dtype and shape.
fn fill_like(t: &Tensor, s: i64) -> Tensor {
    let n = t.numel();
    match t.dtype {
        DType::I64 => Tensor::from_vec(t.shape.clone(), &vec![s; n]),
        DType::I32 => Tensor::from_vec(t.shape.clone(), &vec![s as i32; n]),
        DType::F32 => Tensor::from_vec(t.shape.clone(), &vec![s as f32; n]),
        other => panic!("time step of type {other}"),
    }
}

fn fold(name: &str, spec: &str, dir: &Path) -> (PathBuf, String) {
    let out = dir.join(format!("{name}.{}.onnx", spec.replace(':', "_")));
    tfmqc_ok(&[
        model_path(name).to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--passes",
        "detect-tib,fold-tib",
        "--timesteps",
        spec,
        // Every frontier value a table (`--tib auto`, the default, computes them by the
        // quantized TIB where the tables pass its budget: tests/tiar.rs).
        "--tib",
        "lut",
        // The fold itself is exact; low-precision tables are checked against their
        // stated error in `low_precision_tables_stay_within_their_stated_error`.
        "--table-precision",
        "f32",
    ]);
    let m = tfmqc_passes::onnx::load(&out).unwrap();
    let tinput = m
        .metadata_value("tfmqc.timestep_input")
        .expect("time-step input recorded")
        .to_string();
    (out, tinput)
}

fn rows(t: &Tensor) -> Vec<Tensor> {
    let n = t.shape[0];
    let size = t.data.len() / n;
    (0..n)
        .map(|i| {
            Tensor::from_raw(
                t.dtype,
                t.shape[1..].to_vec(),
                t.data[i * size..(i + 1) * size].to_vec(),
            )
            .unwrap()
        })
        .collect()
}

fn check_every_step(name: &str, spec: &str) {
    let dir = tmpdir();
    let (folded, tinput) = fold(name, spec, dir.path());
    let set = parse_timesteps(spec, 1000).unwrap();
    let base = example_inputs(name);

    // tract
    let original =
        tfmqc_runtime::Engine::load(&model_path(name), None, tfmqc_runtime::Optimize::Full)
            .unwrap();
    let rewritten =
        tfmqc_runtime::Engine::load(&folded, None, tfmqc_runtime::Optimize::Full).unwrap();
    // tract computed the tables itself, so its check is exact and a stride suffices for
    // the 1000-step set; onnxruntime below checks every step of three models.
    let stride = if set.len() > 100 { 7 } else { 1 };
    let mut worst: f64 = 0.0;
    for &s in set.iter().step_by(stride).chain(set.last()) {
        let mut x = base.clone();
        x.insert(tinput.clone(), fill_like(&base[&tinput], s));
        let err = relative_error(
            &tract_run_engine(&original, &x),
            &tract_run_engine(&rewritten, &x),
        );
        assert!(
            err <= TOLERANCE,
            "{name} S={spec} t={s}: tract relative error {err:e}"
        );
        worst = worst.max(err);
    }
    eprintln!(
        "{name} S={spec}: tract worst relative error {worst:e} over every {stride}th of {} steps",
        set.len()
    );

    // onnxruntime
    let Some(py) = python() else { return };
    // Every step of a 1000-step set in onnxruntime for one export (ddpm_digits), every 7th
    // (143 steps, the last included) for the others, whose time steps take the other
    // forms (f32 scalar, a guided-diffusion embedding): every row of a table is written
    // by the same code whatever the model, and 1000 onnxruntime calls per model and
    // graph were most of this binary's time (three such models: 310 s of CPU on an AVX2
    // machine, the slowest binary after tests/quantize.rs).
    let every = name == "ddpm_digits";
    let ort_set: Vec<i64> = if every {
        set.clone()
    } else {
        set.iter()
            .step_by(stride)
            .chain(set.last().filter(|_| stride > 1))
            .copied()
            .collect()
    };
    let set = ort_set;
    let steps: Vec<String> = set.iter().map(|s| s.to_string()).collect();
    let steps = steps.join(",");
    let inp = dir.path().join("in.safetensors");
    write_inputs(&inp, &base);
    let sweep = |model: &Path, out: &str| {
        let out = dir.path().join(out);
        ort(
            &py,
            &[
                "sweep",
                model.to_str().unwrap(),
                inp.to_str().unwrap(),
                &tinput,
                &steps,
                out.to_str().unwrap(),
            ],
        );
        read_tensors(&out)
    };
    let a = sweep(&model_path(name), "a.safetensors");
    let b = sweep(&folded, "b.safetensors");
    let mut worst: f64 = 0.0;
    for (k, ta) in &a {
        for (i, (ra, rb)) in rows(ta).into_iter().zip(rows(&b[k])).enumerate() {
            let err = relative_error(&[(k.clone(), ra)].into(), &[(k.clone(), rb)].into());
            assert!(
                err <= TOLERANCE,
                "{name} S={spec} t={}: onnxruntime relative error {err:e}",
                set[i]
            );
            worst = worst.max(err);
        }
    }
    eprintln!("{name} S={spec}: onnxruntime worst relative error {worst:e}");
}

#[test]
fn folded_matches_original_for_every_step_of_ddim50() {
    for name in denoisers() {
        check_every_step(&name, "ddim:50");
    }
}

// Two tests over halves of the models, so that the test threads share the work.
#[test]
fn folded_matches_original_for_every_step_of_1000_first_half() {
    for name in denoisers().iter().step_by(2) {
        check_every_step(name, "1000");
    }
}

#[test]
fn folded_matches_original_for_every_step_of_1000_second_half() {
    for name in denoisers().iter().skip(1).step_by(2) {
        check_every_step(name, "1000");
    }
}

#[test]
fn folded_matches_original_on_mixed_batches() {
    // The example inputs of the dynamic-batch models hold two samples with different t;
    // unet2d_cond holds a classifier-free-guidance pair sharing one t.
    let dir = tmpdir();
    for name in [
        "ddpm_digits",
        "unet2d_attn_dynbatch",
        "unet2d_cond",
        "unet2d_cond_dynbatch",
        "guided_unet",
    ] {
        let (folded, _) = fold(name, "1000", dir.path());
        let x = example_inputs(name);
        let err = relative_error(&tract_run(&model_path(name), &x), &tract_run(&folded, &x));
        assert!(err <= TOLERANCE, "{name}: tract relative error {err:e}");
        if let Some(py) = python() {
            let err = relative_error(
                &ort_run(&py, &model_path(name), &x, dir.path()),
                &ort_run(&py, &folded, &x, dir.path()),
            );
            assert!(
                err <= TOLERANCE,
                "{name}: onnxruntime relative error {err:e}"
            );
        }
    }
}

#[test]
fn a_step_outside_the_set_is_an_error_in_both_runtimes() {
    let dir = tmpdir();
    for name in ["ddpm_digits", "unet2d_cond", "guided_unet", "ddim_unet"] {
        let (folded, tinput) = fold(name, "ddim:50", dir.path());
        let mut x = example_inputs(name);
        x.insert(tinput.clone(), fill_like(&x[&tinput], 5)); // 5 ∉ {0, 20, ..., 980}
        let engine =
            tfmqc_runtime::Engine::load(&folded, None, tfmqc_runtime::Optimize::Full).unwrap();
        let ordered = engine
            .input_names()
            .iter()
            .map(|n| tfmqc_passes::exec::to_tract(&x[n]).unwrap())
            .collect();
        assert!(
            engine.run(ordered).is_err(),
            "{name}: tract ran with t = 5 ∉ S"
        );
        if let Some(py) = python() {
            let inp = dir.path().join(format!("{name}.bad.safetensors"));
            write_inputs(&inp, &x);
            ort(
                &py,
                &[
                    "expect-error",
                    folded.to_str().unwrap(),
                    inp.to_str().unwrap(),
                ],
            );
        }
    }
}

#[test]
fn detection_finds_the_time_step_input_of_every_export() {
    let expected = [
        ("ddim_unet", "t"),
        ("ddpm_digits", "timestep"),
        ("guided_unet", "timesteps"),
        ("unet2d_attn", "timestep"),
        ("unet2d_attn_dynbatch", "timestep"),
        ("unet2d_cond", "timestep"),
        ("unet2d_cond_dynbatch", "timestep"),
    ];
    for (name, input) in expected {
        let m = tfmqc_passes::onnx::load(&model_path(name)).unwrap();
        let tib = tfmqc_passes::detect_tib::detect(&m, None).unwrap();
        assert_eq!(tib.timestep_input, input, "{name}");
        assert!(!tib.frontier.is_empty(), "{name}: no frontier");
        let out = String::from_utf8_lossy(
            &tfmqc_ok(&["inspect", model_path(name).to_str().unwrap()]).stdout,
        )
        .to_string();
        assert!(
            out.contains(&format!("time-step input: {input} (detected")),
            "{name}: {out}"
        );
    }
}

#[test]
fn class_conditioning_added_to_the_embedding_ends_the_block() {
    let m = tfmqc_passes::onnx::load(&model_path("guided_unet")).unwrap();
    let tib = tfmqc_passes::detect_tib::detect(&m, None).unwrap();
    assert_eq!(tib.frontier.len(), 1, "{:?}", tib.frontier);
    assert!(
        tib.frontier[0].joins[0].ends_with("(Add)"),
        "{:?}",
        tib.frontier
    );
}

#[test]
fn timestep_input_can_be_named() {
    let m = tfmqc_passes::onnx::load(&model_path("ddpm_digits")).unwrap();
    let tib = tfmqc_passes::detect_tib::detect(&m, Some("timestep")).unwrap();
    assert_eq!(tib.found_by, "given by --timestep-input");
    let e = tfmqc_passes::detect_tib::detect(&m, Some("nope"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("'nope' is not a graph input (inputs: sample, timestep)"),
        "{e}"
    );
}

#[test]
fn metadata_records_the_set_and_the_input() {
    let dir = tmpdir();
    let (folded, tinput) = fold("ddpm_digits", "ddim:50", dir.path());
    let m = tfmqc_passes::onnx::load(&folded).unwrap();
    assert_eq!(tinput, "timestep");
    let set = m.metadata_value("tfmqc.timesteps").unwrap();
    assert!(
        set.starts_with("0,20,40,") && set.ends_with(",980"),
        "{set}"
    );
    assert_eq!(
        m.metadata_value("diffusion.train_timesteps"),
        Some("1000"),
        "source metadata kept"
    );
}

fn expect_user_error(args: &[&str], expect: &str) {
    let dir = tmpdir();
    let out = dir.path().join("o.onnx");
    let mut all = args.to_vec();
    all.extend(["-o", out.to_str().unwrap()]);
    let res = tfmqc(&all);
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(err.contains(expect), "expected '{expect}' in {err}");
    assert!(!out.exists());
}

#[test]
fn model_without_a_time_step_is_a_clear_error() {
    let m = model_path("digits_features");
    expect_user_error(
        &[m.to_str().unwrap(), "--passes", "detect-tib,fold-tib"],
        "no time-step input found: the graph has no Sin/Cos",
    );
}

#[test]
fn set_outside_the_schedule_is_a_clear_error() {
    let m = model_path("ddpm_digits");
    expect_user_error(
        &[
            m.to_str().unwrap(),
            "--passes",
            "detect-tib,fold-tib",
            "--timesteps",
            "0,500,5000",
        ],
        "time step 5000 is outside the model's range 0..999",
    );
}

#[test]
fn empty_set_is_a_clear_error() {
    let m = model_path("ddpm_digits");
    expect_user_error(
        &[
            m.to_str().unwrap(),
            "--passes",
            "detect-tib,fold-tib",
            "--timesteps",
            ",",
        ],
        "the time-step set is empty",
    );
}

/// Temporal-feature tables at low precision (`--table-precision auto`, the default): on
/// every denoiser at S = 1000, each table the graph reads — int8 rows dequantized by
/// DequantizeLinear and the gathered row scale, or f16 cast back — gives the frontier
/// values within the error fold-tib states for it (relative MSE over the table, lowest
/// row cosine), which are within the `auto` bars; the tables take at most half the bytes
/// of f32 ones; and onnxruntime loads and runs the folded model.
#[test]
fn low_precision_tables_stay_within_their_stated_error() {
    use tfmqc_passes::table_quant::{
        table_error, TablePrecision, TABLE_MAX_REL_MSE, TABLE_MIN_COSINE,
    };
    let dir = tmpdir();
    for name in denoisers() {
        let mut model = tfmqc_passes::onnx::load(&model_path(&name)).unwrap();
        tfmqc_passes::canonicalize::canonicalize(&mut model).unwrap();
        let tib = tfmqc_passes::detect_tib::detect(&model, None).unwrap();
        let set = parse_timesteps("1000", 1000).unwrap();
        let exact = tfmqc_passes::fold_tib::evaluate_tables(&model, &tib, &set).unwrap();
        let report =
            tfmqc_passes::fold_tib::fold_with(&mut model, &tib, &set, TablePrecision::Auto)
                .unwrap();
        // The frontier values as the folded graph computes them from t, for all of S.
        let names: Vec<String> = report.table_forms.iter().map(|(n, _)| n.clone()).collect();
        let mut sub = model.clone();
        sub.graph.outputs = names
            .iter()
            .map(|n| tfmqc_passes::ir::ValueInfo {
                name: n.clone(),
                ..Default::default()
            })
            .collect();
        sub.graph.remove_dead();
        let runner =
            tfmqc_passes::exec::Runner::new(&sub, None, tfmqc_runtime::Optimize::Full).unwrap();
        // The example's inputs (some exports shape t's broadcast from the sample) with t
        // set for the whole batch; the first sample's row of each value.
        let example = example_inputs(&name);
        let template = example[&tib.timestep_input].clone();
        // A row's length, from the exact table of each value.
        let width: Vec<usize> = names
            .iter()
            .map(|n| {
                let i = tib.frontier.iter().position(|f| &f.name == n).unwrap();
                exact[i].numel() / set.len()
            })
            .collect();
        let mut got: Vec<Vec<f32>> = vec![vec![]; names.len()];
        for &s in &set {
            let mut x: std::collections::HashMap<String, Tensor> =
                example.clone().into_iter().collect();
            x.insert(tib.timestep_input.clone(), fill_like(&template, s));
            let out = runner.run(&x).unwrap();
            for (k, o) in out.iter().enumerate() {
                let v = o.to_f32_vec().unwrap();
                got[k].extend_from_slice(&v[..width[k]]);
            }
        }
        let mut f32_bytes = 0u64;
        for (k, (value, choice)) in report.table_forms.iter().enumerate() {
            let i = tib.frontier.iter().position(|f| &f.name == value).unwrap();
            let want = exact[i].to_f32_vec().unwrap();
            f32_bytes += 4 * want.len() as u64;
            let (rel, cos) = table_error(&want, &got[k], set.len());
            assert!(
                rel <= choice.rel_mse * 1.0001 + 1e-12 && cos >= choice.min_cosine - 1e-9,
                "{name} {value} ({:?}): graph gives relative MSE {rel:e}, cosine {cos}; stated {:e}, {}",
                choice.form,
                choice.rel_mse,
                choice.min_cosine
            );
            assert!(
                choice.rel_mse <= TABLE_MAX_REL_MSE && choice.min_cosine >= TABLE_MIN_COSINE,
                "{name} {value}: {choice:?} outside the auto bars"
            );
        }
        assert!(
            2 * report.table_bytes as u64 <= f32_bytes,
            "{name}: {} table bytes of {f32_bytes} in f32",
            report.table_bytes
        );
        eprintln!(
            "{name} S=1000: tables {} bytes ({:.2}× f32): {}",
            report.table_bytes,
            report.table_bytes as f64 / f32_bytes as f64,
            report.forms_summary()
        );
        if let Some(py) = python() {
            let folded = dir.path().join(format!("{name}.lowp.onnx"));
            tfmqc_passes::onnx::save(&model, &folded).unwrap();
            let base = example_inputs(&name);
            let inp = dir.path().join(format!("{name}.in.safetensors"));
            write_inputs(&inp, &base);
            let tin = &tib.timestep_input;
            let out = dir.path().join(format!("{name}.ort.safetensors"));
            ort(
                &py,
                &[
                    "sweep",
                    folded.to_str().unwrap(),
                    inp.to_str().unwrap(),
                    tin,
                    "0,500,999",
                    out.to_str().unwrap(),
                ],
            );
            assert!(read_tensors(&out).values().all(|t| t
                .to_f32_vec()
                .unwrap()
                .iter()
                .all(|v| v.is_finite())));
        }
    }
}
