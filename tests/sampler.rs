//! One sampler (issue #13): calibration runs the runtime's sampler and feeds the model
//! exactly what `Denoiser::sample` feeds it; the scheduler comes from a diffusers
//! scheduler_config.json and travels in the compiled model's metadata; bad scheduler files
//! and step counts outside S are clear errors that write nothing.

mod common;
use common::*;

use std::path::Path;

use tfmqc_passes::calibrate::calibrate;
use tfmqc_passes::options::{Options, SamplingSteps};
use tfmqc_runtime::sampler::batch_seed;
use tfmqc_runtime::{Denoiser, PredictionType, Sampler, Tensor};

const SD15: &str = r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "num_train_timesteps":1000,"beta_start":0.00085,"beta_end":0.012,"beta_schedule":"scaled_linear","clip_sample":false,"set_alpha_to_one":false,"skip_prk_steps": true,"steps_offset":1,"prediction_type":"epsilon","timestep_spacing":"leading","trained_betas": null}"#;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn bytes(t: &Tensor) -> Vec<u8> {
    t.as_bytes().to_vec()
}

/// The calibration records of `sampler` at `steps` steps (batch 0, 2 samples) against the
/// inputs `Denoiser::sample` gives the model from the same seed: equal bit for bit.
fn calibration_equals_runtime(sampler: Sampler, steps: usize, scheduler: Option<&Path>) {
    let path = model_path("ddpm_digits");
    let model = tfmqc_passes::onnx::load(&path).unwrap();
    let options = Options {
        sampler,
        calib_steps: Some(steps),
        calib_samples: 2,
        calib_batch: 2,
        seed: 3,
        scheduler: scheduler.map(Path::to_path_buf),
        sampling_steps: Some(SamplingSteps::All),
        ..Default::default()
    };
    let cal = calibrate(&model, &options, "timestep", &[], vec![], &|_| {}).unwrap();
    assert_eq!(cal.records.len(), steps, "{sampler}: one record per step");

    let mut d = Denoiser::load(&path).unwrap();
    if let Some(p) = scheduler {
        d.set_scheduler(tfmqc_runtime::SchedulerConfig::from_file(p).unwrap())
            .unwrap();
    }
    let mut seen: Vec<(i64, Tensor)> = vec![];
    d.sample_with(
        batch_seed(3, 0),
        steps,
        &[],
        2,
        sampler,
        None,
        &mut |t, x| seen.push((t, x.clone())),
    )
    .unwrap();
    assert_eq!(seen.len(), steps);
    for (k, ((t, x), (rec, &rt))) in seen
        .iter()
        .zip(cal.records.iter().zip(&cal.record_steps))
        .enumerate()
    {
        assert_eq!(*t, rt, "{sampler} step {k}: time step");
        let recorded = tfmqc_passes::exec::to_tract(&rec["sample"]).unwrap();
        assert_eq!(recorded.shape(), x.shape(), "{sampler} step {k}");
        assert!(
            bytes(&recorded) == bytes(x),
            "{sampler} step {k} (t = {t}): calibration fed the model another x_t than the runtime's sampler"
        );
    }
}

#[test]
fn ddim_with_clipping_in_calibration_equals_the_runtime_sampler_bit_for_bit() {
    // diffusers' DDIM defaults: clip_sample true (the model's metadata has no scheduler).
    let d = Denoiser::load(&model_path("ddpm_digits")).unwrap();
    assert!(d.scheduler().clip_sample);
    calibration_equals_runtime(Sampler::Ddim, 10, None);
}

#[test]
fn every_sampler_in_calibration_equals_the_runtime_sampler_bit_for_bit() {
    let dir = tmpdir();
    let sd = write(dir.path(), "sd.json", SD15);
    // DDPM draws noise at every step, Euler scales the input, DPM-Solver++ keeps state.
    calibration_equals_runtime(Sampler::Ddpm, 10, None);
    calibration_equals_runtime(Sampler::Euler, 10, Some(&sd));
    calibration_equals_runtime(Sampler::DpmSolverPP, 12, Some(&sd));
}

#[test]
fn the_scheduler_file_is_recorded_and_read_back_by_the_runtime() {
    let dir = tmpdir();
    let sd = write(dir.path(), "scheduler_config.json", SD15);
    let q = dir.path().join("q.onnx");
    let report = dir.path().join("r.json");
    tfmqc_ok(&[
        model_path("ddpm_digits").to_str().unwrap(),
        "-o",
        q.to_str().unwrap(),
        "--scheduler",
        sd.to_str().unwrap(),
        "--sampler",
        "dpm++",
        "--sampling-steps",
        "20,25",
        "--calib-samples",
        "2",
        "--reconstruct",
        "none",
        "--report",
        report.to_str().unwrap(),
    ]);
    let d = Denoiser::load(&q).unwrap();
    let c = d.scheduler();
    assert_eq!(
        (c.beta_start, c.beta_end, c.steps_offset),
        (0.00085, 0.012, 1)
    );
    assert!(!c.clip_sample && !c.set_alpha_to_one);
    assert_eq!(c.prediction_type, PredictionType::Epsilon);
    // S is every step DDIM, DDPM, Euler and DPM-Solver++ visit at 20 and 25 steps.
    let s = d.timesteps().unwrap();
    for sampler in Sampler::ALL {
        for steps in [20, 25] {
            let ts = d.trajectory(sampler, steps).unwrap();
            assert!(ts.iter().all(|t| s.binary_search(t).is_ok()));
        }
    }
    assert_eq!(
        &d.trajectory(Sampler::DpmSolverPP, 20).unwrap()[..2],
        &[941, 894]
    );
    assert!(
        d.trajectory(Sampler::Ddim, 50).is_err(),
        "50 steps visit 981: not in S"
    );
    let m = tfmqc_passes::onnx::load(&q).unwrap();
    assert_eq!(m.metadata_value("tfmqc.sampler"), Some("dpm++"));
    assert_eq!(m.metadata_value("tfmqc.sampling_steps"), Some("25,20"));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let on = r["evaluated_on"].as_str().unwrap();
    assert!(
        on.contains("held-out dpm++") && on.contains("25, 20"),
        "{on}"
    );
    assert!(r["calibrated_on"]
        .as_str()
        .unwrap()
        .contains("dpm++ at 25, 20 steps"));
    // `tfmqc sample` takes the recorded sampler.
    let png = dir.path().join("s.png");
    let out = tfmqc_ok(&[
        "sample",
        q.to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
        "--steps",
        "20",
        "--count",
        "2",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("dpm++"));
}

/// Runs tfmqc, expecting exit 1 with `words` in the message and no OUT.
fn refused(args: &[&str], out: &Path, words: &[&str]) {
    let r = tfmqc(args);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{args:?}: {err}");
    for w in words {
        assert!(err.contains(w), "{args:?}: '{w}' not in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "{args:?} wrote {}", out.display());
}

#[test]
fn bad_scheduler_files_and_step_counts_outside_s_write_nothing() {
    let dir = tmpdir();
    let out = dir.path().join("q.onnx");
    let o = out.to_str().unwrap();
    let m = model_path("ddpm_digits");
    let m = m.to_str().unwrap();
    let beta = write(dir.path(), "beta.json", r#"{"beta_schedule": "sigmoid"}"#);
    let pred = write(
        dir.path(),
        "pred.json",
        r#"{"prediction_type": "flow_prediction"}"#,
    );
    let broken = write(dir.path(), "broken.json", "{ not json");
    for (file, key) in [(&beta, "'beta_schedule'"), (&pred, "'prediction_type'")] {
        refused(
            &[m, "-o", o, "--scheduler", file.to_str().unwrap()],
            &out,
            &[file.to_str().unwrap(), key, "unknown value"],
        );
    }
    refused(
        &[m, "-o", o, "--scheduler", broken.to_str().unwrap()],
        &out,
        &["broken.json", "not a JSON"],
    );
    refused(
        &[m, "-o", o, "--scheduler", "no/such.json"],
        &out,
        &["no/such.json"],
    );
    // DDIM at 7 steps visits 852; S = ddim:50 holds multiples of 20.
    refused(
        &[
            m,
            "-o",
            o,
            "--timesteps",
            "ddim:50",
            "--sampling-steps",
            "7",
        ],
        &out,
        &[
            "--sampling-steps 7",
            "t = 852",
            "outside the time-step set S",
        ],
    );
    refused(
        &[m, "-o", o, "--timesteps", "ddim:50", "--calib-steps", "30"],
        &out,
        &["--calib-steps 30", "outside the time-step set S"],
    );
    refused(
        &[m, "-o", o, "--sampling-steps", "20,x"],
        &out,
        &["--sampling-steps", "'x'"],
    );
    refused(
        &[m, "-o", o, "--sampling-steps", "2000"],
        &out,
        &["2000 sampling steps"],
    );
    refused(&[m, "-o", o, "--sampler", "heun"], &out, &["heun"]);
    // Euler with linspace spacing (diffusers' default for it) visits fractional steps.
    refused(
        &[m, "-o", o, "--sampler", "euler", "--calib-steps", "20"],
        &out,
        &["fractional"],
    );
    // Default step counts outside an explicit S are left out, not an error; none left is.
    refused(
        &[m, "-o", o, "--timesteps", "0,7,13"],
        &out,
        &["none of the default sampling step counts"],
    );
}

#[test]
fn guidance_on_an_unconditional_model_is_refused() {
    let dir = tmpdir();
    let out = dir.path().join("q.onnx");
    refused(
        &[
            model_path("ddpm_digits").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--guidance-scale",
            "3",
        ],
        &out,
        &["--guidance-scale", "no conditioning input"],
    );
}

/// diffusers' own time steps (tests/data/scheduler_reference.json) of `samplers` at
/// `steps` under the reference configuration `config`.
fn diffusers_timesteps(config: &str, samplers: &[&str], steps: &[u64]) -> Vec<i64> {
    let text = std::fs::read_to_string(repo().join("tests/data/scheduler_reference.json")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut all = std::collections::BTreeSet::new();
    for e in r["timesteps"].as_array().unwrap() {
        if e["config"] == config
            && samplers.contains(&e["sampler"].as_str().unwrap())
            && steps.contains(&e["steps"].as_u64().unwrap())
        {
            for t in e["timesteps"].as_array().unwrap() {
                all.insert(t.as_i64().unwrap());
            }
        }
    }
    all.into_iter().collect()
}

/// Issue #13's first bar: with Stable Diffusion 1.5's scheduler config, a compiled SD-like
/// UNet (diffusers UNet2DConditionModel; scalar float time step, CFG batch of 2) runs in
/// onnxruntime at every time step diffusers' DDIM, DPM-Solver++ and Euler visit at 20, 25
/// and 50 steps, leading and trailing spacing, and matches float there: on the inputs those
/// samplers feed the float model along their own trajectories.
#[test]
fn an_sd15_scheduled_unet_runs_in_onnxruntime_at_every_step_diffusers_visits() {
    let Some(py) = python() else { return };
    let dir = tmpdir();
    let text = std::fs::read_to_string(repo().join("tests/data/scheduler_reference.json")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let model = model_path("unet2d_cond");
    let cond = example_inputs("unet2d_cond")["encoder_hidden_states"].clone();
    let cond = [(
        "encoder_hidden_states",
        tfmqc_passes::exec::to_tract(&cond).unwrap(),
    )];
    for spacing in ["leading", "trailing"] {
        let config = format!("sd15_{spacing}");
        let sched = dir.path().join(format!("{config}.json"));
        std::fs::write(&sched, r["configs"][&config].to_string()).unwrap();
        let steps = diffusers_timesteps(&config, &["ddim", "dpm++", "euler"], &[20, 25, 50]);
        assert!(steps.len() >= 60, "{config}: {} steps", steps.len());
        let q = dir.path().join(format!("{config}.q.onnx"));
        tfmqc_ok(&[
            model.to_str().unwrap(),
            "-o",
            q.to_str().unwrap(),
            "--scheduler",
            sched.to_str().unwrap(),
            "--sampling-steps",
            "20,25,50",
            "--calib-samples",
            "4",
            "--reconstruct",
            "none",
        ]);
        let s = Denoiser::load(&q).unwrap().timesteps().unwrap().to_vec();
        for t in &steps {
            assert!(s.binary_search(t).is_ok(), "{config}: t = {t} not in S");
        }
        ort(&py, &["check", q.to_str().unwrap()]);
        // What each sampler feeds the float model, step by step (the runtime's sampler).
        let mut float = Denoiser::load(&model).unwrap();
        float
            .set_scheduler(tfmqc_runtime::SchedulerConfig::from_file(&sched).unwrap())
            .unwrap();
        let mut calls: Vec<(i64, Tensor)> = vec![];
        for sampler in [Sampler::Ddim, Sampler::DpmSolverPP, Sampler::Euler] {
            for n in [20, 25, 50] {
                float
                    .sample_with(0, n, &cond, 2, sampler, None, &mut |t, x| {
                        calls.push((t, x.clone()))
                    })
                    .unwrap();
            }
        }
        let mut seen: Vec<i64> = calls.iter().map(|c| c.0).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(
            seen, steps,
            "{config}: the runtime's samplers visit diffusers' steps"
        );
        let mut records = Tensors::new();
        for (i, (t, x)) in calls.iter().enumerate() {
            records.insert(
                format!("{i:05}/sample"),
                tfmqc_passes::exec::from_tract(x).unwrap(),
            );
            records.insert(
                format!("{i:05}/timestep"),
                tfmqc_passes::ir::Tensor::scalar(*t as f32),
            );
            records.insert(
                format!("{i:05}/encoder_hidden_states"),
                example_inputs("unet2d_cond")["encoder_hidden_states"].clone(),
            );
        }
        let inp = dir.path().join(format!("{config}.records.safetensors"));
        write_inputs(&inp, &records);
        let run = |m: &Path, tag: &str| {
            let out = dir.path().join(format!("{config}.{tag}.safetensors"));
            ort(
                &py,
                &[
                    "runmany",
                    m.to_str().unwrap(),
                    inp.to_str().unwrap(),
                    out.to_str().unwrap(),
                ],
            );
            read_tensors(&out)
        };
        let (f, qv) = (run(&model, "float"), run(&q, "quant"));
        let mut sums: std::collections::BTreeMap<i64, (f64, f64)> = Default::default();
        for (i, (t, _)) in calls.iter().enumerate() {
            let key = format!("{i:05}/out_sample");
            let (a, b) = (
                f[&key].to_f32_vec().unwrap(),
                qv[&key].to_f32_vec().unwrap(),
            );
            let e = sums.entry(*t).or_default();
            e.0 += a.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
            e.1 += a
                .iter()
                .zip(&b)
                .map(|(u, v)| ((u - v) as f64).powi(2))
                .sum::<f64>();
        }
        let db: Vec<(i64, f64)> = sums
            .iter()
            .map(|(t, (sig, err))| (*t, 10.0 * (sig / err.max(1e-30)).log10()))
            .collect();
        let mean = db.iter().map(|d| d.1).sum::<f64>() / db.len() as f64;
        let worst = db
            .iter()
            .copied()
            .fold((0, f64::INFINITY), |m, d| if d.1 < m.1 { d } else { m });
        eprintln!(
            "{config}: {} time steps, {} calls in onnxruntime; SQNR against float: mean {mean:.1} dB, worst {:.1} dB at t = {}",
            db.len(),
            calls.len(),
            worst.1,
            worst.0
        );
        assert!(mean > 25.0, "{config}: mean {mean:.1} dB");
        assert!(
            worst.1 > 12.0,
            "{config}: {:.1} dB at t = {}",
            worst.1,
            worst.0
        );
    }
}

/// Calibration checks its budget again between trajectory batches: with the budget spent,
/// the batches after the first are not started (the first always runs: its records are
/// the evaluation's), and the run says how many batches ran. The model is not run: the
/// prediction is a zero tensor of the sample's shape, so nothing here depends on a clock.
#[test]
fn trajectory_batches_stop_when_the_budget_is_spent() {
    use tfmqc_passes::ir::{DType, Tensor as IrTensor};
    use tfmqc_passes::trajectory::{Given, Plan};
    let model = tfmqc_passes::onnx::load(&model_path("ddpm_digits")).unwrap();
    let options = Options {
        calib_steps: Some(3),
        calib_samples: 3,
        calib_batch: 1,
        ..Default::default()
    };
    let set = tfmqc_passes::options::timestep_set(&model, &options).unwrap();
    let given = Given::read(&model, &options).unwrap();
    let plan = Plan::new(&model, &options, "timestep", &given, &set, 1).unwrap();
    let run = |budget: Option<f64>| {
        let mut batches_called = vec![];
        let ran = plan
            .run(&model, 3, 1, budget, &|_| {}, &mut |call| {
                batches_called.push(call.batch);
                let x = &call.inputs["sample"];
                IrTensor::from_raw(DType::F32, x.shape.clone(), vec![0u8; x.byte_len()])
            })
            .unwrap();
        (ran, batches_called)
    };
    let (ran, calls) = run(Some(0.0));
    assert_eq!(ran, 1, "a spent budget runs the first batch only");
    assert!(!calls.is_empty() && calls.iter().all(|&b| b == 0));
    let (ran, calls) = run(None);
    assert_eq!(ran, 3, "no budget: every batch");
    assert!(calls.contains(&2), "the third batch ran");
}
