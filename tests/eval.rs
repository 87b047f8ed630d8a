//! `tfmqc eval`: the JSON it prints (schema in docs/eval-json.md, snapshot with the
//! measured numbers redacted), the plots it writes, and its errors on bad input.

mod common;
use common::*;

use serde_json::Value;
use std::path::Path;

/// A small tfmqc W8A8 file of the trained model (TIB as exact tables), made once.
fn quantized_digits(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("digits.q.onnx");
    quantize_small("ddpm_digits", &out, "5", &["--reconstruct", "none"]);
    out
}

/// Replaces every measured (non-integer) number by "<f64>", every time-dependent or
/// temporary path by a placeholder: what stays is the schema and the counts.
fn redact(v: &mut Value, tmp: &str) {
    match v {
        Value::Number(n) if n.is_f64() => *v = Value::String("<f64>".into()),
        Value::String(s) if s.contains(tmp) => *s = s.replace(tmp, "<tmp>"),
        Value::Array(a) => {
            // Long per-step / per-t lists: their length is in the snapshot, not each entry.
            if a.len() > 3 && a.iter().all(|x| x.is_number()) {
                let n = a.len();
                *v = Value::String(format!("<{n} numbers>"));
                return;
            }
            a.iter_mut().for_each(|x| redact(x, tmp));
        }
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                // How the file was made: its own schema, owned by the pipeline.
                if k == "tfmqc_options" && x.is_object() {
                    *x = Value::String("<object>".into());
                } else if k == "seconds" {
                    *x = Value::String("<seconds>".into());
                } else {
                    redact(x, tmp);
                }
            }
        }
        _ => {}
    }
}

#[test]
fn json_schema_numbers_and_plots_on_the_trained_model() {
    let dir = tmpdir();
    let q = quantized_digits(dir.path());
    let plots = dir.path().join("plots");
    let out = tfmqc_ok(&[
        "eval",
        model_path("ddpm_digits").to_str().unwrap(),
        q.to_str().unwrap(),
        "--label",
        "tfmqc W8A8",
        "--steps",
        "2",
        "--samples",
        "3",
        "--json",
        "--plots",
        plots.to_str().unwrap(),
        "--fd-features",
        repo().join("models/digits_features.onnx").to_str().unwrap(),
        "--fd-ref",
        repo()
            .join("models/digits_features_ref.json")
            .to_str()
            .unwrap(),
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");

    // S is the set the tfmqc file records; every frontier value is compared at every t.
    let s = v["timesteps"]["values"].as_array().unwrap();
    assert_eq!(s.len(), 10);
    // DDIM at 2 steps (leading spacing): 500, 0.
    assert_eq!(v["trajectory"], serde_json::json!([500, 0]));
    assert_eq!(v["sampler"], "ddim");
    let q0 = &v["quant"][0];
    assert_eq!(q0["tfmqc"], true);
    assert_eq!(q0["tfmqc_options"]["weight_bits"], 8);
    let values = q0["temporal_features"]["values"].as_array().unwrap();
    assert_eq!(values.len(), v["frontier"].as_array().unwrap().len());
    assert!(!values.is_empty());
    for f in values {
        // Tables at the default precision: every row (t) within the cosine bar fold-tib
        // chose them by; a row that close in direction and stored to an int8 step of its
        // largest value is within 1e-3 relative MSE.
        for (c, m) in f["cosine"]
            .as_array()
            .unwrap()
            .iter()
            .zip(f["rel_mse"].as_array().unwrap())
        {
            let min_cos = tfmqc_passes::table_quant::TABLE_MIN_COSINE;
            assert!(c.as_f64().unwrap() >= min_cos - 1e-9, "{f}");
            assert!(m.as_f64().unwrap() < 1e-3, "{f}");
        }
        assert_eq!(f["cosine"].as_array().unwrap().len(), 10);
    }
    // W8A8 of the trained model: well above noise, below identity.
    let sq = &q0["step_sqnr_db"];
    assert_eq!(sq["per_step"].as_array().unwrap().len(), 2);
    let mean = sq["summary"]["mean"].as_f64().unwrap();
    assert!((15.0..100.0).contains(&mean), "step SQNR {mean}");
    let psnr = q0["sample_psnr_db"]["per_sample"].as_array().unwrap();
    assert_eq!(psnr.len(), 3);
    assert!(psnr.iter().all(|p| p.as_f64().unwrap() > 15.0), "{psnr:?}");
    let (fd_f, fd_q) = (
        v["float"]["fd"].as_f64().unwrap(),
        q0["fd"].as_f64().unwrap(),
    );
    assert!(fd_f > 0.0 && fd_q > 0.0);
    // The weight check saw the quantized weights, within a W8 error.
    let wc = &q0["weight_check"];
    assert!(wc["quantized"].as_u64().unwrap() > 5, "{wc}");
    assert!(wc["max_rel_error"].as_f64().unwrap() < 0.05, "{wc}");

    // Plots: both formats, real images.
    for name in ["temporal_features", "step_sqnr"] {
        let svg = std::fs::read_to_string(plots.join(format!("{name}.svg"))).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("tfmqc W8A8"),
            "{name}"
        );
        let png = std::fs::read(plots.join(format!("{name}.png"))).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
    let grid = png::Decoder::new(std::fs::File::open(plots.join("samples.png")).unwrap())
        .read_info()
        .unwrap();
    // Two columns (float | quantized) of three 16×16 samples ×4.
    assert!(grid.info().width >= 2 * 64 && grid.info().height >= 3 * 64);

    let mut red = v.clone();
    let tmp = dir.path().display().to_string();
    redact(&mut red, &tmp);
    let repo_dir = repo().display().to_string();
    let text = serde_json::to_string_pretty(&red)
        .unwrap()
        .replace(&repo_dir, "<repo>");
    insta::with_settings!({snapshot_path => "../snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!("eval_json_ddpm_digits", text);
    });
}

fn eval_fails(args: &[&str]) -> String {
    let out = tfmqc(args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "tfmqc {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn models_with_different_inputs_are_refused() {
    let err = eval_fails(&[
        "eval",
        model_path("ddpm_digits").to_str().unwrap(),
        model_path("unet2d_cond").to_str().unwrap(),
        "--steps",
        "2",
        "--samples",
        "1",
    ]);
    assert!(
        err.contains("are not the same model") && err.contains("graph input"),
        "{err}"
    );
    assert!(
        err.contains("sample") && err.contains("encoder_hidden_states"),
        "{err}"
    );
}

#[test]
fn a_model_with_other_weights_is_not_a_quantization() {
    // Same graph and interface, one conv weight reversed: not FLOAT quantized.
    let dir = tmpdir();
    let mut m = tfmqc_passes::onnx::load(&model_path("ddpm_digits")).unwrap();
    let (name, t) = m
        .graph
        .initializers
        .iter()
        .filter(|(_, t)| t.shape.len() == 4 && t.numel() > 1000)
        .map(|(n, t)| (n.clone(), t.clone()))
        .next()
        .expect("a conv weight");
    let mut v = t.to_f32_vec().unwrap();
    v.reverse();
    m.graph.initializers.insert(
        name.clone(),
        tfmqc_passes::ir::Tensor::from_vec(t.shape.clone(), &v),
    );
    let other = dir.path().join("other.onnx");
    tfmqc_passes::onnx::save(&m, &other).unwrap();
    let err = eval_fails(&[
        "eval",
        model_path("ddpm_digits").to_str().unwrap(),
        other.to_str().unwrap(),
        "--steps",
        "2",
        "--samples",
        "1",
    ]);
    assert!(
        err.contains("is not a quantization of") && err.contains(&format!("'{name}'")),
        "{err}"
    );
    assert!(err.contains("relative error"), "{err}");
}

#[test]
fn a_tcr_file_is_a_quantization_up_to_its_channel_factors() {
    // TCR multiplies each input channel of a weight by a factor: matched one to one, W4
    // weights rescaled that way are far from FLOAT's (the check refused them); eval
    // fits the factors for files whose recorded options ran TCR.
    let dir = tmpdir();
    let q = dir.path().join("tcr.onnx");
    quantize_small(
        "ddpm_digits",
        &q,
        "5",
        &[
            "--tcr",
            "on",
            "--weight-bits",
            "4",
            "--act-bits",
            "4",
            "--reconstruct",
            "none",
        ],
    );
    let out = tfmqc_ok(&[
        "eval",
        model_path("ddpm_digits").to_str().unwrap(),
        q.to_str().unwrap(),
        "--steps",
        "5",
        "--samples",
        "1",
        "--json",
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let check = &v["quant"][0]["weight_check"];
    assert!(check["quantized"].as_u64().unwrap() > 0, "{check}");
    assert!(check["max_rel_error"].as_f64().unwrap() < 0.5, "{check}");
    assert!(v["quant"][0]["sample_psnr_db"]["summary"]["mean"].is_number());
    // The same file without its tfmqc metadata is checked one to one: refused.
    let mut m = tfmqc_passes::onnx::load(&q).unwrap();
    m.metadata.retain(|(k, _)| !k.starts_with("tfmqc."));
    let plain = dir.path().join("plain.onnx");
    tfmqc_passes::onnx::save(&m, &plain).unwrap();
    let err = eval_fails(&[
        "eval",
        model_path("ddpm_digits").to_str().unwrap(),
        plain.to_str().unwrap(),
        "--timesteps",
        "ddim:10",
        "--steps",
        "5",
        "--samples",
        "1",
    ]);
    assert!(err.contains("is not a quantization of"), "{err}");
}

#[test]
fn zero_samples_and_missing_files_are_user_errors() {
    let f = model_path("ddpm_digits");
    let f = f.to_str().unwrap();
    let err = eval_fails(&["eval", f, f, "--samples", "0"]);
    assert!(err.contains("--samples M must be at least 1"), "{err}");
    let err = eval_fails(&["eval", f, f, "--steps", "0"]);
    assert!(err.contains("--steps N must be at least 1"), "{err}");
    let err = eval_fails(&["eval", f, "/nonexistent/q.onnx"]);
    assert!(err.contains("/nonexistent/q.onnx"), "{err}");
    let err = eval_fails(&["eval", f, f, "--label", "a", "--label", "b"]);
    assert!(err.contains("2 --label given for 1 QUANT"), "{err}");
    // A QUANT is required.
    let err = eval_fails(&["eval", f]);
    assert!(err.contains("QUANT"), "{err}");
}

#[test]
fn a_qdq_file_without_tfmqc_metadata_is_compared_on_the_given_set() {
    // A plain QDQ file as another tool writes it: the min-max baseline (TIB quantized,
    // not folded) with tfmqc's metadata removed.
    let dir = tmpdir();
    let q = dir.path().join("minmax.onnx");
    quantize_small("ddpm_digits", &q, "5", &["--baseline", "minmax"]);
    let mut m = tfmqc_passes::onnx::load(&q).unwrap();
    m.metadata.retain(|(k, _)| !k.starts_with("tfmqc."));
    let plain = dir.path().join("plain_qdq.onnx");
    tfmqc_passes::onnx::save(&m, &plain).unwrap();
    let out = tfmqc_ok(&[
        "eval",
        model_path("ddpm_digits").to_str().unwrap(),
        plain.to_str().unwrap(),
        "--timesteps",
        "ddim:5",
        "--steps",
        "5",
        "--samples",
        "1",
        "--json",
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["timesteps"]["source"], "--timesteps");
    assert_eq!(
        v["timesteps"]["values"],
        serde_json::json!([0, 200, 400, 600, 800])
    );
    let q0 = &v["quant"][0];
    assert_eq!(q0["tfmqc"], false);
    assert!(q0["tfmqc_options"].is_null());
    // The quantized time-step block: temporal features close to float, not exact.
    let cos = &q0["temporal_features"]["summary"]["cosine"];
    let (min, max) = (cos["min"].as_f64().unwrap(), cos["max"].as_f64().unwrap());
    assert!(min > 0.99 && min < 1.0 - 1e-9, "{cos}");
    assert!(max <= 1.0 + 1e-12, "{cos}");
    let mse = q0["temporal_features"]["summary"]["rel_mse"]["max"]
        .as_f64()
        .unwrap();
    assert!(mse > 0.0 && mse < 0.01, "{mse}");
    // FD not asked for: skipped with a note.
    assert!(v["float"]["fd"].is_null() && q0["fd"].is_null());
    assert!(v["notes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n.as_str().unwrap().contains("Fréchet distance skipped")));
}

#[test]
fn help_lists_eval_and_states_its_choices() {
    let top = String::from_utf8_lossy(&tfmqc_ok(&["--help"]).stdout).to_string();
    assert!(top.contains("eval"), "{top}");
    let out = tfmqc_ok(&["eval", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--samples",
        "--steps",
        "--plots",
        "--json",
        "--fd-features",
        "--fd-ref",
        "--timesteps",
        "--schedule",
        "stand-ins",
        "relative error 0.5",
        "docs/eval-json.md",
    ] {
        assert!(text.contains(word), "{word} in eval --help:\n{text}");
    }
}
