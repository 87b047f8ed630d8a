//! What makes Stable-Diffusion-class models compile on a small machine, checked on small
//! models: calibration statistics folded while tract runs equal those of materialised
//! outputs, a memory estimate over the limit is a clear error before anything large is
//! allocated, calibration fits its time budget, and weights read from external data
//! stay views of the file.

mod common;

use std::collections::HashMap;

use common::*;
use tfmqc_passes::calibrate::{calibrate, Range};
use tfmqc_passes::exec::Runner;
use tfmqc_passes::ir::Tensor;
use tfmqc_passes::options::Options;
use tfmqc_passes::targets::find_targets;
use tfmqc_runtime::engine::Optimize;

/// The model as the calibrate pass sees it (canonicalized, TIB folded over S = ddim:10).
fn folded(name: &str) -> (tfmqc_passes::Model, Options, String) {
    let mut model = tfmqc_passes::onnx::load(&model_path(name)).unwrap();
    let options = Options {
        timesteps: Some("ddim:10".into()),
        calib_samples: 3,
        calib_steps: 4,
        ..Default::default()
    };
    tfmqc_passes::canonicalize::canonicalize(&mut model).unwrap();
    let tib = tfmqc_passes::detect_tib::detect(&model, None).unwrap();
    let t_name = tib.timestep_input.clone();
    let set = tfmqc_passes::options::timestep_set(&model, &options).unwrap();
    tfmqc_passes::fold_tib::fold(&mut model, &tib, &set).unwrap();
    (model, options, t_name)
}

#[test]
fn streamed_ranges_equal_those_of_materialised_outputs() {
    for name in ["unet2d_cond", "unet2d_attn_dynbatch"] {
        let (model, options, t_name) = folded(name);
        let values = find_targets(&model.graph, &[]).activation_values();
        let cal = calibrate(&model, &options, &t_name, &values, vec![], &|_| {}).unwrap();
        // The old way: every activation an output of the plan, min/max after the run.
        let runner = Runner::new(&model, Some(&values), Optimize::Full).unwrap();
        let mut global: HashMap<String, Range> = HashMap::new();
        for rec in &cal.records {
            let inputs: HashMap<String, Tensor> = rec.clone().into_iter().collect();
            for (v, out) in values.iter().zip(runner.run(&inputs).unwrap()) {
                let x = out.to_f32_vec().unwrap();
                let r = Range {
                    min: x.iter().copied().fold(f32::INFINITY, f32::min),
                    max: x.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                };
                let g = global.entry(v.clone()).or_insert(r);
                g.min = g.min.min(r.min);
                g.max = g.max.max(r.max);
            }
        }
        // The records are the first batch's calls cut to their kept samples: their ranges
        // lie inside the streamed global ones, and for a fixed-batch model (no cut) the
        // per-step ranges of the first batch are exactly theirs.
        for v in &values {
            let (s, o) = (cal.global[v], global[v]);
            assert!(
                s.min <= o.min && s.max >= o.max,
                "{name}: {v}: streamed {s:?} does not cover {o:?}"
            );
        }
        if name == "unet2d_cond" {
            // Fixed batch of 2, one calibration batch per trajectory pair.
            let single = Options {
                calib_samples: 2,
                ..options.clone()
            };
            let cal = calibrate(&model, &single, &t_name, &values, vec![], &|_| {}).unwrap();
            let mut global: HashMap<String, Range> = HashMap::new();
            for rec in &cal.records {
                let inputs: HashMap<String, Tensor> = rec.clone().into_iter().collect();
                for (v, out) in values.iter().zip(runner.run(&inputs).unwrap()) {
                    let x = out.to_f32_vec().unwrap();
                    let (lo, hi) = (
                        x.iter().copied().fold(f32::INFINITY, f32::min),
                        x.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                    );
                    let g = global
                        .entry(v.clone())
                        .or_insert(Range { min: lo, max: hi });
                    g.min = g.min.min(lo);
                    g.max = g.max.max(hi);
                }
            }
            for v in &values {
                assert_eq!(cal.global[v], global[v], "{name}: {v}: bit for bit");
            }
        }
    }
}

#[test]
fn a_memory_limit_below_the_estimate_stops_before_calibration() {
    let dir = tmpdir();
    let out = dir.path().join("q.onnx");
    let res = tfmqc(&[
        model_path("unet2d_cond").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--timesteps",
        "ddim:10",
        "--max-memory",
        "1M",
    ]);
    assert_eq!(res.status.code(), Some(1));
    let err = String::from_utf8_lossy(&res.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("tfmqc: error:"))
        .unwrap_or_default();
    assert!(
        line.contains("calibrate needs about")
            && line.contains("float model in tract")
            && line.contains("0.00 GB allowed by --max-memory")
            && line.contains("lower it with"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "no output on error");
    // A limit the model fits in is no obstacle.
    quantize_small("unet2d_cond", &out, "3", &["--max-memory", "64G"]);
    assert!(out.exists());
    // And a size that is not one is refused as such.
    let res = tfmqc(&[
        model_path("unet2d_cond").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--max-memory",
        "lots",
    ]);
    assert_eq!(res.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&res.stderr).contains("--max-memory"));
}

#[test]
fn calibration_shrinks_to_its_time_budget_and_says_so() {
    let dir = tmpdir();
    let out = dir.path().join("q.onnx");
    let report = dir.path().join("r.json");
    let res = tfmqc_ok(&[
        model_path("ddpm_digits").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--timesteps",
        "ddim:50",
        "--calib-budget",
        "0.000001",
        "--report",
        report.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("1 trajectory batch(es) × 2 steps fit --calib-budget"),
        "{err}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["output_sqnr_per_step"].as_array().unwrap().len(), 2);
    // Explicit sizes are the user's choice: no budget applies.
    let res = tfmqc_ok(&[
        model_path("ddpm_digits").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--timesteps",
        "ddim:50",
        "--calib-budget",
        "0.000001",
        "--calib-samples",
        "2",
        "--calib-steps",
        "5",
    ]);
    assert!(!String::from_utf8_lossy(&res.stderr).contains("fit --calib-budget"));
}

#[test]
fn the_output_is_the_same_for_any_thread_count() {
    let dir = tmpdir();
    let (a, b) = (dir.path().join("a.onnx"), dir.path().join("b.onnx"));
    quantize_small("unet2d_cond", &a, "3", &["--threads", "1"]);
    quantize_small("unet2d_cond", &b, "3", &["--threads", "2"]);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}
