//! `--eval-samples N`: the held-out set the report's per-step output SQNR is measured on
//! has N images per sampling step count (a fixed batch repeats its trajectories), the
//! report says so and gives each half of them, the output file does not change, and the
//! default stays what it was (2 images, one call's batch when the batch is fixed).

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// Compiles `model` small (S = ddim:10, 10-step trajectories) with `extra`; returns the
/// report, the output file's bytes, and the evaluation records (`--dump-eval`).
fn compile(model: &str, dir: &Path, tag: &str, extra: &[&str]) -> (Value, Vec<u8>, Tensors) {
    let out = dir.join(format!("{tag}.onnx"));
    let report = dir.join(format!("{tag}.json"));
    let eval = dir.join(format!("{tag}.eval.safetensors"));
    let mut args = vec![
        "--reconstruct",
        "none",
        "--report",
        report.to_str().unwrap(),
        "--dump-eval",
        eval.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    quantize_small(model, &out, "10", &args);
    let r = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    (r, std::fs::read(&out).unwrap(), read_tensors(&eval))
}

/// (records, rows of each record's sample input).
fn records_and_rows(eval: &Tensors, sample: &str) -> (usize, Vec<usize>) {
    let rows: Vec<usize> = eval
        .iter()
        .filter(|(k, _)| k.ends_with(&format!("/{sample}")))
        .map(|(_, t)| t.shape[0])
        .collect();
    (rows.len(), rows)
}

fn halves(r: &Value) -> Vec<(f64, f64, usize)> {
    r["output_sqnr_halves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["output_sqnr_mean_db"].as_f64().unwrap(),
                h["output_sqnr_min_db"].as_f64().unwrap(),
                h["output_sqnr_per_step"].as_array().unwrap().len(),
            )
        })
        .collect()
}

#[test]
fn a_free_batch_evaluates_n_images_per_step_count_and_the_file_does_not_change() {
    let dir = tmpdir();
    let (r2, bytes2, eval2) = compile("ddpm_digits", dir.path(), "default", &[]);
    let (r5, bytes5, eval5) = compile("ddpm_digits", dir.path(), "e5", &["--eval-samples", "5"]);
    // Default: 2 images in each of the 10 calls of the one 10-step trajectory batch.
    assert_eq!(r2["eval_samples"], 2);
    let on = r2["evaluated_on"].as_str().unwrap();
    assert!(
        on.contains("1 held-out ddim trajectory of 2 image(s) at 10 steps"),
        "{on}"
    );
    assert_eq!(records_and_rows(&eval2, "sample"), (10, vec![2; 10]));
    // --eval-samples 5: the same calls, 5 images each.
    assert_eq!(r5["eval_samples"], 5);
    let on = r5["evaluated_on"].as_str().unwrap();
    assert!(on.contains("of 5 image(s)"), "{on}");
    assert_eq!(records_and_rows(&eval5, "sample"), (10, vec![5; 10]));
    // The first two images are the default's (same seed, same sampler, rows apart).
    let first = eval2.get("00000/sample").unwrap().to_f32_vec().unwrap();
    let five = eval5.get("00000/sample").unwrap().to_f32_vec().unwrap();
    assert_eq!(
        &five[..first.len()],
        &first[..],
        "the default's images lead the larger set"
    );
    // The output file is the same: --eval-samples only changes what the report measures.
    assert!(bytes2 == bytes5, "--eval-samples changed the output file");
    // Each half of the held-out images has every step; the whole set's figures lie
    // between the halves' (within rounding: a step's SQNR pools its images' errors).
    for r in [&r2, &r5] {
        let steps = r["output_sqnr_per_step"].as_array().unwrap().len();
        let h = halves(r);
        assert_eq!(h.len(), 2);
        assert!(h.iter().all(|&(_, _, n)| n == steps), "{h:?}");
        let mean = r["output_sqnr_mean_db"].as_f64().unwrap();
        let lo = h[0].0.min(h[1].0) - 0.5;
        let hi = h[0].0.max(h[1].0) + 0.5;
        assert!((lo..=hi).contains(&mean), "mean {mean} dB, halves {h:?}");
    }
}

#[test]
fn a_fixed_batch_repeats_its_trajectories_for_n_images() {
    // ddim_unet's batch is fixed to 1: the default evaluates one image per step count.
    let dir = tmpdir();
    let (r1, _, eval1) = compile("ddim_unet", dir.path(), "default", &[]);
    assert_eq!(r1["eval_samples"], 1);
    assert_eq!(records_and_rows(&eval1, "x").0, 10);
    assert!(halves(&r1).is_empty(), "one image has no halves");
    let (r3, _, eval3) = compile("ddim_unet", dir.path(), "e3", &["--eval-samples", "3"]);
    assert_eq!(r3["eval_samples"], 3);
    let on = r3["evaluated_on"].as_str().unwrap();
    assert!(on.contains("of 3 image(s)"), "{on}");
    let (records, rows) = records_and_rows(&eval3, "x");
    assert_eq!((records, rows.iter().all(|&r| r == 1)), (30, true));
    // Three trajectories of other noise: their first calls differ.
    let x = |i: usize| {
        eval3
            .get(&format!("{:05}/x", i * 10))
            .unwrap()
            .to_f32_vec()
            .unwrap()
    };
    assert!(x(0) != x(1) && x(1) != x(2));
    assert_eq!(x(0), eval1.get("00000/x").unwrap().to_f32_vec().unwrap());
    // Halves: image 0 against images 1 and 2, every step in each.
    let h = halves(&r3);
    assert_eq!(h.len(), 2);
    assert!(h.iter().all(|&(_, _, n)| n == 10), "{h:?}");
}

#[test]
fn zero_eval_samples_is_a_user_error() {
    let dir = tmpdir();
    let out = tfmqc(&[
        model_path("ddpm_digits").to_str().unwrap(),
        "-o",
        dir.path().join("q.onnx").to_str().unwrap(),
        "--eval-samples",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--eval-samples must be at least 1"));
    assert!(!dir.path().join("q.onnx").exists());
}
