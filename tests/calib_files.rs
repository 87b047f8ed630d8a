//! `--calib` files in the forms users write them (issue #13, item 7): numpy .npz
//! (np.savez, np.savez_compressed) and safetensors with records stacked along axis 0 by
//! input name, the `NNNNN/<input>` form, conditioning with more rows than the batch
//! (cycled), `uncond/<input>`; every refusal names the file and the key, never a panic.

mod common;
use common::*;

use std::path::Path;

use tfmqc_passes::ir::Tensor;

fn data(name: &str) -> std::path::PathBuf {
    repo().join("tests/data").join(name)
}

/// Quantizes `model` with `--calib file` plus `extra`; returns stderr and the report.
fn with_calib(model: &str, file: &Path, extra: &[&str]) -> (String, serde_json::Value) {
    let dir = tmpdir();
    let out = dir.path().join("q.onnx");
    let report = dir.path().join("r.json");
    let mut args = vec![
        model_path(model).to_str().unwrap().to_string(),
        "-o".into(),
        out.to_str().unwrap().into(),
        "--calib".into(),
        file.to_str().unwrap().into(),
        "--reconstruct".into(),
        "none".into(),
        "--report".into(),
        report.to_str().unwrap().into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let o = tfmqc_ok(&args);
    assert!(out.exists());
    let r = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    (String::from_utf8_lossy(&o.stderr).to_string(), r)
}

fn refused(model: &str, file: &Path, extra: &[&str], words: &[&str]) {
    let dir = tmpdir();
    let out = dir.path().join("q.onnx");
    let mut args = vec![
        model_path(model).to_str().unwrap().to_string(),
        "-o".into(),
        out.to_str().unwrap().into(),
        "--calib".into(),
        file.to_str().unwrap().into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let r = tfmqc(&args);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    for w in words {
        assert!(err.contains(w), "'{w}' not in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists());
}

#[test]
fn npz_records_stacked_by_input_name_calibrate() {
    // np.savez(sample=x, timestep=t): x float64 [8,1,16,16], t int64 [8] (3 time steps).
    for file in ["stacked.npz", "stacked_compressed.npz"] {
        let (err, r) = with_calib("ddpm_digits", &data(file), &[]);
        assert!(
            err.contains("over 4 batches of recorded calls, 4 steps"),
            "{file}: {err}"
        );
        assert!(r["output_sqnr_mean_db"].as_f64().unwrap() > 20.0, "{file}");
    }
}

#[test]
fn safetensors_records_stacked_by_input_name_calibrate() {
    let dir = tmpdir();
    let p = dir.path().join("stacked.safetensors");
    let x = tfmqc_runtime::NoiseRng::new(5).normal_vec(8 * 256);
    let t: Vec<i64> = vec![500; 8];
    write_inputs(
        &p,
        &[
            (
                "sample".to_string(),
                Tensor::from_vec(vec![8, 1, 16, 16], &x),
            ),
            ("timestep".to_string(), Tensor::from_vec(vec![8], &t)),
        ]
        .into(),
    );
    let (err, _) = with_calib("ddpm_digits", &p, &[]);
    assert!(
        err.contains("over 1 batches of recorded calls, 1 steps"),
        "{err}"
    );
    // A set the sampler's step counts do not fit: recorded calls still calibrate, and the
    // report is measured on them.
    let (_, r) = with_calib("ddpm_digits", &p, &["--timesteps", "0,500,950"]);
    let on = r["evaluated_on"].as_str().unwrap();
    assert!(
        on.contains("calibration records (no held-out trajectories"),
        "{on}"
    );
}

#[test]
fn a_fixed_batch_cfg_model_takes_stacked_calls_and_cycled_conditioning() {
    // unet2d_cond: batch fixed to 2, a scalar f32 time step, encoder_hidden_states [2,8,32].
    let dir = tmpdir();
    let mut rng = tfmqc_runtime::NoiseRng::new(9);
    // Conditioning alone, 20 rows (more than the batch): cycled over the trajectories.
    let cond = dir.path().join("cond.safetensors");
    write_inputs(
        &cond,
        &[(
            "encoder_hidden_states".to_string(),
            Tensor::from_vec(vec![20, 8, 32], &rng.normal_vec(20 * 256)),
        )]
        .into(),
    );
    let (err, r) = with_calib(
        "unet2d_cond",
        &cond,
        &["--calib-samples", "2", "--calib-steps", "5"],
    );
    assert!(r["stand_in_inputs"].as_array().unwrap().is_empty(), "{err}");
    // Recorded CFG pairs stacked: 3 calls of 2 rows, one t per call.
    let stacked = dir.path().join("stacked.safetensors");
    write_inputs(
        &stacked,
        &[
            (
                "sample".to_string(),
                Tensor::from_vec(vec![6, 4, 16, 16], &rng.normal_vec(6 * 1024)),
            ),
            (
                "timestep".to_string(),
                Tensor::from_vec(vec![3], &[900f32, 500.0, 100.0]),
            ),
            (
                "encoder_hidden_states".to_string(),
                Tensor::from_vec(vec![6, 8, 32], &rng.normal_vec(6 * 256)),
            ),
        ]
        .into(),
    );
    let (err, _) = with_calib("unet2d_cond", &stacked, &["--calib-steps", "5"]);
    assert!(
        err.contains("over 3 batches of recorded calls, 3 steps"),
        "{err}"
    );
}

#[test]
fn uncond_conditioning_is_read_and_guidance_uses_it() {
    let dir = tmpdir();
    let mut rng = tfmqc_runtime::NoiseRng::new(4);
    let p = dir.path().join("cond.safetensors");
    write_inputs(
        &p,
        &[
            (
                "encoder_hidden_states".to_string(),
                Tensor::from_vec(vec![4, 8, 32], &rng.normal_vec(4 * 256)),
            ),
            (
                "uncond/encoder_hidden_states".to_string(),
                Tensor::from_vec(vec![1, 8, 32], &vec![0.5f32; 256]),
            ),
        ]
        .into(),
    );
    let quick = ["--calib-samples", "2", "--calib-steps", "5"];
    // Without guidance: said unused, no panic (calibrate once stopped at the '/').
    let (err, _) = with_calib("unet2d_cond", &p, &quick);
    assert!(
        err.contains("uncond/ tensors are not used without --guidance-scale"),
        "{err}"
    );
    let (err, r) = with_calib(
        "unet2d_cond",
        &p,
        &[&quick[..], &["--guidance-scale", "3"]].concat(),
    );
    assert!(
        err.contains("the unconditional 'encoder_hidden_states' comes from"),
        "{err}"
    );
    assert_eq!(r["options"]["guidance_scale"], 3.0);
    assert!(r["calibrated_on"].as_str().unwrap().contains("guidance 3"));
}

#[test]
fn refused_calib_files_name_the_file_and_the_key() {
    let dir = tmpdir();
    let x = Tensor::from_vec(vec![2, 1, 16, 16], &vec![0.1f32; 512]);
    let t = Tensor::from_vec(vec![2], &[500i64, 500]);
    let cases: Vec<(&str, Tensors, &str)> = vec![
        (
            "slash",
            [("prompt/sample".to_string(), x.clone())].into(),
            "key 'prompt/sample'",
        ),
        (
            "x-alone",
            [("sample".to_string(), x.clone())].into(),
            "'sample' without 'timestep'",
        ),
        (
            "t-alone",
            [("timestep".to_string(), t.clone())].into(),
            "'timestep' without 'sample'",
        ),
        (
            "t-count",
            [
                ("sample".to_string(), x.clone()),
                (
                    "timestep".to_string(),
                    Tensor::from_vec(vec![3], &[500i64, 500, 500]),
                ),
            ]
            .into(),
            "has 3 values for 2 rows",
        ),
        (
            "t-outside",
            [
                ("sample".to_string(), x.clone()),
                (
                    "timestep".to_string(),
                    Tensor::from_vec(vec![2], &[7i64, 7]),
                ),
            ]
            .into(),
            "t = 7, outside the time-step set S",
        ),
        (
            "t-fraction",
            [
                ("sample".to_string(), x.clone()),
                (
                    "timestep".to_string(),
                    Tensor::from_vec(vec![2], &[500.5f32, 500.0]),
                ),
            ]
            .into(),
            "not whole numbers",
        ),
        (
            "mixed",
            [
                ("00000/sample".to_string(), x.clone()),
                ("00000/timestep".to_string(), t.clone()),
                ("sample".to_string(), x.clone()),
            ]
            .into(),
            "give one form",
        ),
    ];
    for (name, tensors, expect) in cases {
        let p = dir.path().join(format!("{name}.safetensors"));
        write_inputs(&p, &tensors);
        refused("ddpm_digits", &p, &[], &[p.to_str().unwrap(), expect]);
    }
    // A .npz that is not one; an npz array of a type numpy users rarely mean.
    let p = dir.path().join("bad.npz");
    std::fs::write(&p, b"PK\x03\x04 and then nothing").unwrap();
    refused("ddpm_digits", &p, &[], &["bad.npz", "not a readable .npz"]);
}

#[test]
fn conditioning_of_the_wrong_width_is_refused_with_its_shape() {
    let dir = tmpdir();
    let p = dir.path().join("cond.safetensors");
    write_inputs(
        &p,
        &[(
            "encoder_hidden_states".to_string(),
            Tensor::from_vec(vec![20, 8, 16], &vec![0.0f32; 20 * 128]),
        )]
        .into(),
    );
    refused(
        "unet2d_cond",
        &p,
        &[],
        &[
            "tensor 'encoder_hidden_states'",
            "[20, 8, 16]",
            "any number of rows",
        ],
    );
}
