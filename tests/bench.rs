//! `tfmqc bench`: the shape of its JSON (a snapshot of keys and types, never timings),
//! its ratios, and the user errors that stop it before anything runs.

mod common;
use common::*;

use serde_json::Value;

/// The JSON with every number replaced by "number", every boolean by "bool" and every
/// string by "string" (except the engine names, which are part of the contract); arrays
/// kept in full (their lengths are fixed by the arguments).
fn shape(v: &Value, key: &str) -> Value {
    match v {
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), shape(v, k))).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(|v| shape(v, key)).collect()),
        Value::Number(_) => Value::String("number".into()),
        Value::Bool(_) => Value::String("bool".into()),
        Value::String(s) if key == "engine" => Value::String(s.clone()),
        Value::String(_) => Value::String("string".into()),
        other => other.clone(),
    }
}

fn quantized_digits(dir: &std::path::Path) -> std::path::PathBuf {
    let q = dir.join("q.onnx");
    tfmqc_ok(&[
        model_path("ddpm_digits").to_str().unwrap(),
        "-o",
        q.to_str().unwrap(),
        "--timesteps",
        "ddim:50",
        "--calib-samples",
        "2",
        "--calib-steps",
        "5",
    ]);
    q
}

/// `tfmqc bench` of the tract engines on ddpm_digits and its quantized file `q`, one
/// thread, two runs of two steps, JSON out, plus `extra`.
fn bench_tract_engines(q: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let model = model_path("ddpm_digits");
    let mut args = vec![
        "bench",
        model.to_str().unwrap(),
        "--quantized",
        q.to_str().unwrap(),
        "--engines",
        "tract-float,tfmqc-int8",
        "--threads",
        "1",
        "--runs",
        "2",
        "--steps",
        "2",
        "--json",
    ];
    args.extend_from_slice(extra);
    tfmqc_ok(&args)
}

#[test]
fn bench_json_has_one_run_per_engine_with_ratios_against_tract_float() {
    let dir = tmpdir();
    let q = quantized_digits(dir.path());
    let out = bench_tract_engines(&q, &["--loop-runs", "1"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    insta::with_settings!({snapshot_path => "../snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!("bench_json_shape", serde_json::to_string_pretty(&shape(&v, "")).unwrap());
    });
    let runs = v["runs"].as_array().unwrap();
    let (float, int8) = (&runs[0], &runs[1]);
    assert_eq!(float["model"], "ddpm_digits");
    assert_eq!(int8["file"], q.to_str().unwrap());
    assert_eq!(
        (float["threads"].as_u64(), float["steps"].as_u64()),
        (Some(1), Some(2))
    );
    // Both engines ran the same time step, one from S (ddim:50: a multiple of 20).
    assert_eq!(float["t"], int8["t"]);
    assert_eq!(int8["t"].as_i64().unwrap() % 20, 0);
    assert_eq!(float["int8_ops"], 0);
    assert!(int8["int8_ops"].as_u64().unwrap() > 0);
    for r in runs {
        assert!(r["step_ms"].as_f64().unwrap() > 0.0);
        // Present and positive; how it compares with a step is a clock's business, not
        // a test's (a loaded machine reorders them).
        assert!(r["loop_ms"].as_f64().unwrap() > 0.0);
        assert!(r["step_ms_min"].as_f64().unwrap() > 0.0);
        assert!(r["peak_rss_mb"].as_f64().unwrap() >= r["base_rss_mb"].as_f64().unwrap());
    }
    // Weights: the float file holds f32 weights, the quantized one int8 weights.
    assert_eq!(float["weight_bytes"]["int8"], 0);
    assert!(int8["weight_bytes"]["int8"].as_u64().unwrap() > 0);
    // The same bytes by kind (as --report's bytes_by_kind): the quantized file's integer
    // weights, its time-step tables (ddpm_digits folds its time embedding), nothing of
    // either in the float file; the kinds add up to the file's initializers.
    let u = |v: &Value| v.as_u64().unwrap();
    for r in [float, int8] {
        let (w, k) = (&r["weight_bytes"], &r["weight_bytes"]["by_kind"]);
        let kinds = ["weights_int", "float", "tables", "scale_tables", "other"];
        assert_eq!(
            kinds.iter().map(|n| u(&k[n])).sum::<u64>(),
            u(&w["float"]) + u(&w["int8"]) + u(&w["other"]),
            "{w}"
        );
    }
    let by_kind = &int8["weight_bytes"]["by_kind"];
    assert!(
        u(&by_kind["weights_int"]) > 0 && u(&by_kind["tables"]) > 0,
        "{by_kind}"
    );
    let float_kind = &float["weight_bytes"]["by_kind"];
    assert_eq!(
        (u(&float_kind["weights_int"]), u(&float_kind["tables"])),
        (0, 0)
    );
    // Resident after loading: the int8 nodes' packed weights are int8_weights.resident;
    // the tables stay constants the plan holds; the float model holds no int8 weights.
    let res = &int8["resident_by_kind"];
    assert_eq!(
        res["int8_weights"], int8["int8_weights"]["resident"],
        "{res}"
    );
    assert!(u(&res["tables"]) > 0, "{res}");
    assert_eq!(float["resident_by_kind"]["int8_weights"], 0);
    assert!(u(&float["resident_by_kind"]["other"]) > 0);
    let r = &v["ratios"][0];
    assert_eq!(r["engine"], "tfmqc-int8");
    let speedup = r["step_speedup"].as_f64().unwrap();
    let expect = float["step_ms"].as_f64().unwrap() / int8["step_ms"].as_f64().unwrap();
    assert!(
        (speedup - expect).abs() < 1e-9 * expect,
        "{speedup} vs {expect}"
    );
    assert!(r["weight_bytes_ratio"].as_f64().unwrap() < 0.5);
    // The table goes to stderr.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tfmqc-int8") && err.contains("step ms"),
        "{err}"
    );
}

/// onnxruntime's runs (when installed) carry the same fields as tract's.
#[test]
fn bench_onnxruntime_runs_have_the_fields_of_tract_runs() {
    let Some(py) = python() else { return };
    let dir = tmpdir();
    let q = quantized_digits(dir.path());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tfmqc"))
        .args([
            "bench",
            model_path("ddpm_digits").to_str().unwrap(),
            "--quantized",
            q.to_str().unwrap(),
            "--threads",
            "1",
            "--runs",
            "2",
            "--steps",
            "2",
            "--loop-runs",
            "1",
            "--json",
        ])
        .env("TFMQC_PYTHON", &py)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = v["runs"].as_array().unwrap();
    let engines: Vec<&str> = runs.iter().map(|r| r["engine"].as_str().unwrap()).collect();
    assert_eq!(
        engines,
        ["tract-float", "tfmqc-int8", "ort-float", "ort-int8"]
    );
    let keys = |r: &Value| r.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    for r in &runs[2..] {
        assert_eq!(keys(r), keys(&runs[0]), "{}", r["engine"]);
        assert!(r["step_ms"].as_f64().unwrap() > 0.0);
        assert_eq!(r["t"], runs[1]["t"]);
    }
    assert_eq!(v["ratios"].as_array().unwrap().len(), 3);
}

/// ort-int8-own: onnxruntime's own quantize_static on the calibration records of a
/// calibration run (the quantized file is given), timed like the other onnxruntime runs;
/// its file holds int8 weights.
#[test]
fn bench_ort_int8_own_runs_onnxruntimes_own_quantization() {
    let Some(py) = python() else { return };
    let dir = tmpdir();
    let q = quantized_digits(dir.path());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tfmqc"))
        .args([
            "bench",
            model_path("ddpm_digits").to_str().unwrap(),
            "--quantized",
            q.to_str().unwrap(),
            "--engines",
            "tract-float,ort-int8-own",
            "--threads",
            "1",
            "--runs",
            "2",
            "--steps",
            "2",
            "--loop-runs",
            "0",
            "--calib-samples",
            "2",
            "--json",
        ])
        .env("TFMQC_PYTHON", &py)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("quantize_static"), "{err}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = v["runs"].as_array().unwrap();
    let own = &runs[1];
    assert_eq!(own["engine"], "ort-int8-own");
    assert!(own["step_ms"].as_f64().unwrap() > 0.0);
    assert!(own["weight_bytes"]["int8"].as_u64().unwrap() > 0, "{own}");
    assert_eq!(own["t"], runs[0]["t"]);
}

/// Without --runs / --loop-runs the counts fit --budget: a budget shorter than one call
/// still gives 3 timed calls (after the 3 warm-up calls of a fast model), and a sampling
/// loop that does not fit is skipped, which stderr says.
#[test]
fn bench_fits_its_counts_to_the_budget() {
    let dir = tmpdir();
    let q = quantized_digits(dir.path());
    let model = model_path("ddpm_digits");
    let out = tfmqc_ok(&[
        "bench",
        model.to_str().unwrap(),
        "--quantized",
        q.to_str().unwrap(),
        "--engines",
        "tract-float,tfmqc-int8",
        "--threads",
        "1",
        "--steps",
        "2",
        "--budget",
        "0.000001",
        "--json",
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["runs_per_step"].is_null());
    for r in v["runs"].as_array().unwrap() {
        assert_eq!(
            (&r["warmup"], &r["runs"], &r["loop_runs"]),
            (&Value::from(3), &Value::from(3), &Value::from(0)),
            "{}",
            r["engine"]
        );
        assert!(r["loop_ms"].is_null());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sampling loop skipped"), "{err}");
}

fn assert_user_error(args: &[&str], needle: &str) {
    let r = tfmqc(args);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{args:?}: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: expected '{needle}' in {err}"
    );
    assert!(r.stdout.is_empty(), "{args:?}");
}

#[test]
fn bench_refuses_a_missing_model() {
    assert_user_error(
        &["bench", "no/such/model.onnx", "--json"],
        "no/such/model.onnx: no such file",
    );
}

#[test]
fn bench_refuses_a_float_file_given_as_quantized() {
    let m = model_path("ddpm_digits");
    let m = m.to_str().unwrap();
    assert_user_error(
        &["bench", m, "--quantized", m, "--threads", "1"],
        "not a quantized model",
    );
}

#[test]
fn bench_refuses_a_quantized_file_given_as_the_float_model() {
    let dir = tmpdir();
    let q = quantized_digits(dir.path());
    assert_user_error(&["bench", q.to_str().unwrap()], "already quantized");
}

#[test]
fn bench_refuses_bad_thread_counts_and_engines() {
    let m = model_path("ddpm_digits");
    let m = m.to_str().unwrap();
    for spec in ["0", "two", "1,,2", "-1"] {
        assert_user_error(
            &["bench", m, &format!("--threads={spec}")],
            "is not a thread count",
        );
    }
    assert_user_error(
        &["bench", m, "--engines", "tract-float,onnx"],
        "unknown engine 'onnx'",
    );
}

/// `--profile N`: every tract run gains its time per op kind (the runtime's int8 ops by
/// name, as many nodes as it lowered), and stderr lists the N longest per run.
#[test]
fn bench_profile_lists_time_per_op_kind() {
    let dir = tmpdir();
    let q = quantized_digits(dir.path());
    let out = bench_tract_engines(&q, &["--loop-runs", "0", "--profile", "3"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for r in v["runs"].as_array().unwrap() {
        let ops = r["profile"].as_array().expect("a profile per tract run");
        assert!(ops.iter().all(|o| o["ms"].as_f64().unwrap() >= 0.0
            && o["nodes"].as_u64().unwrap() > 0
            && o["op"].is_string()));
        let ms: Vec<f64> = ops.iter().map(|o| o["ms"].as_f64().unwrap()).collect();
        assert!(ms.windows(2).all(|w| w[0] >= w[1]), "longest first: {ms:?}");
        // The runtime's int8 ops (TfmqcQConv, TfmqcQMatMul, TfmqcQAttention, ...): every
        // lowered node (its fused float ops, such as TfmqcGroupNorm, are not int8 ops).
        let int8_nodes: u64 = ops
            .iter()
            .filter(|o| o["op"].as_str().unwrap().starts_with("TfmqcQ"))
            .map(|o| o["nodes"].as_u64().unwrap())
            .sum();
        assert_eq!(Some(int8_nodes), r["int8_ops"].as_u64(), "{}", r["engine"]);
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("profile: tfmqc-int8 on ddpm_digits"), "{err}");
    assert!(err.contains("× TfmqcQConv"), "{err}");
}
