//! The trained class-conditional model (models/digits_cond.onnx: v-prediction, the class
//! as cross-attention tokens, classifier-free guidance) through the whole path: calibrated
//! on guided trajectories of its own scheduler, sampled with guidance by the runtime on
//! the int8 kernels, and still drawing the digit it is asked for.

mod common;
use common::*;

use tfmqc_runtime::{Denoiser, Guidance, PredictionType, Sampler, Tensor};

const GUIDANCE: &str = "3";

fn cond_file() -> std::path::PathBuf {
    repo().join("models/digits_cond.calib.safetensors")
}

fn scheduler_file() -> std::path::PathBuf {
    repo().join("models/digits_cond.scheduler_config.json")
}

/// The class tokens of the shipped table: row k is class k.
fn class_tokens() -> Tensor {
    let t = read_tensors(&cond_file())["encoder_hidden_states"].clone();
    tfmqc_passes::exec::to_tract(&t).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

/// The digits classifier's verdict on samples [N, 1, 16, 16].
fn classify(samples: &[f32], n: usize) -> Vec<usize> {
    let clipped: Vec<f32> = samples.iter().map(|v| v.clamp(-1.0, 1.0)).collect();
    let x = tfmqc_passes::ir::Tensor::from_vec(vec![n, 1, 16, 16], &clipped);
    let out = tract_run(
        &model_path("digits_features"),
        &[("sample".to_string(), x)].into(),
    );
    let logits = out["logits"].to_f32_vec().unwrap();
    logits
        .chunks(10)
        .map(|row| (0..10).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap())
        .collect()
}

#[test]
fn the_conditional_digits_model_calibrates_with_guidance_and_keeps_its_classes() {
    const COUNT: usize = 20;
    const STEPS: usize = 25;
    let dir = tmpdir();
    let q = dir.path().join("q.onnx");
    let report = dir.path().join("r.json");
    let out = tfmqc_ok(&[
        model_path("digits_cond").to_str().unwrap(),
        "-o",
        q.to_str().unwrap(),
        "--scheduler",
        scheduler_file().to_str().unwrap(),
        "--calib",
        cond_file().to_str().unwrap(),
        "--guidance-scale",
        GUIDANCE,
        "--sampling-steps",
        "25",
        "--calib-samples",
        "8",
        "--report",
        report.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the unconditional 'encoder_hidden_states' comes from"),
        "{err}"
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let sqnr = r["output_sqnr_mean_db"].as_f64().unwrap();
    eprintln!(
        "digits_cond W8A8, guided calibration: mean step SQNR {sqnr:.1} dB along {}",
        r["evaluated_on"]
    );
    assert!(sqnr >= 30.0, "{sqnr}");
    assert!(r["stand_in_inputs"].as_array().unwrap().is_empty());

    let float = Denoiser::load(&model_path("digits_cond")).unwrap();
    let int8 = Denoiser::load(&q).unwrap();
    assert!(int8.int8_ops() > 0);
    // The compiled model carries its scheduler: v-prediction, no clipping.
    assert_eq!(
        int8.scheduler().prediction_type,
        PredictionType::VPrediction
    );
    assert!(!int8.scheduler().clip_sample);
    let tokens = class_tokens();
    let zeros = Tensor::zero::<f32>(&[1, 4, 32]).unwrap();
    let cond = [("encoder_hidden_states", tokens)];
    let uncond = [("encoder_hidden_states", zeros)];
    let run = |d: &Denoiser| {
        values(
            &d.sample_with(
                7,
                STEPS,
                &cond,
                COUNT,
                Sampler::Ddim,
                Some(Guidance {
                    scale: GUIDANCE.parse().unwrap(),
                    uncond: &uncond,
                }),
                &mut |_, _| {},
            )
            .unwrap(),
        )
    };
    // The float file records only the diffusion.* keys: it samples with the shipped config.
    let mut float = float;
    float
        .set_scheduler(tfmqc_runtime::SchedulerConfig::from_file(&scheduler_file()).unwrap())
        .unwrap();
    let (a, b) = (run(&float), run(&int8));
    let mse = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x.clamp(-1.0, 1.0) - y.clamp(-1.0, 1.0)) as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    let psnr = 10.0 * (4.0 / mse.max(1e-20)).log10();
    let want: Vec<usize> = (0..COUNT).map(|k| k % 10).collect();
    let right = |s: &[f32]| {
        classify(s, COUNT)
            .iter()
            .zip(&want)
            .filter(|(p, w)| p == w)
            .count()
    };
    let (rf, rq) = (right(&a), right(&b));
    eprintln!("guided samples: int8 vs float PSNR {psnr:.1} dB; classes right: float {rf}/{COUNT}, int8 {rq}/{COUNT}");
    assert!(psnr >= 25.0, "{psnr}");
    assert!(rf >= 17 && rq >= 17, "float {rf}, int8 {rq} of {COUNT}");
}
