//! Whole-model checks of a compiled model on the int8 kernels of the CPU the tests run on:
//! what the repository's `int8_lowering_matches_the_qdq_graph` and
//! `int8_samples_are_within_30_db_of_float_samples_at_w8a8` check on x86, for a runtime
//! built on its own (the compiler crates are not built for aarch64). `scripts/test-arm64.sh`
//! compiles `models/ddpm_digits.onnx` with the host's `tfmqc` (its output does not depend
//! on the machine) and runs these under qemu on every CPU model, so each arm64 kernel path
//! runs a whole UNet.

use crate::{Denoiser, Engine, Optimize, Sampler, Tensor};
use std::path::{Path, PathBuf};

/// A model compiled by `scripts/test-arm64.sh`, its path in the environment variable `var`:
/// `TFMQC_QUANTIZED_DIGITS` (default options, as tests/sample.rs compiles it) or
/// `TFMQC_QUANTIZED_DIGITS_ALL` (`--calib-samples 4 --calib-steps 10 --sampling-steps all`,
/// as tests/int8.rs does).
fn compiled(var: &str) -> PathBuf {
    let p = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{var} is not set: scripts/test-arm64.sh compiles the model"));
    assert!(p.is_file(), "{var}={}: not a file", p.display());
    p
}

fn float_digits() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/ddpm_digits.onnx")
}

fn values(t: &Tensor) -> Vec<f64> {
    t.cast_to::<f64>()
        .unwrap()
        .to_plain_array_view::<f64>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

/// 10·log10(Σ a² / Σ (a − b)²).
fn sqnr_db(a: &[f64], b: &[f64]) -> f64 {
    let signal: f64 = a.iter().map(|x| x * x).sum();
    let noise: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    10.0 * (signal / noise.max(1e-300)).log10()
}

/// PSNR of samples clipped to their [-1, 1] range (as tests/sample.rs measures it).
fn psnr_db(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let clip = |v: f64| v.clamp(-1.0, 1.0);
    let mse = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (clip(x) - clip(y)).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (4.0 / mse.max(1e-20)).log10()
}

/// `models/ddpm_digits.inputs.safetensors` (f32 `sample`, i64 `timestep`) as tensors by
/// name.
fn example_inputs() -> Vec<(String, Tensor)> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/ddpm_digits.inputs.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| name.as_str() != "__metadata__")
        .map(|(name, v)| {
            let shape: Vec<usize> = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let (a, b) = (
                v["data_offsets"][0].as_u64().unwrap() as usize,
                v["data_offsets"][1].as_u64().unwrap() as usize,
            );
            let raw = &data[a..b];
            let t = match v["dtype"].as_str().unwrap() {
                "F32" => {
                    let x: Vec<f32> = raw
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    Tensor::from_shape(&shape, &x).unwrap()
                }
                "I64" => {
                    let x: Vec<i64> = raw
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    Tensor::from_shape(&shape, &x).unwrap()
                }
                other => panic!("{name}: dtype {other}"),
            };
            (name.clone(), t)
        })
        .collect()
}

/// The quantized model's convolutions on this CPU's int8 kernels compute what its QDQ
/// graph computes in float, on the model's example inputs (t = 10 and 500): the bar of the
/// repository's `int8_lowering_matches_the_qdq_graph` on x86, for a file compiled as that
/// test compiles it (exact integer products against float products of the same
/// dequantized values; only float summation order differs).
#[test]
#[ignore = "needs a compiled model: TFMQC_QUANTIZED_DIGITS_ALL (scripts/test-arm64.sh)"]
fn compiled_digits_on_int8_kernels_match_the_qdq_graph() {
    let q = compiled("TFMQC_QUANTIZED_DIGITS_ALL");
    let qdq = Engine::load(&q, None, Optimize::Full).unwrap();
    let (int8, lowered) = Engine::load_int8(&q, Optimize::Full).unwrap();
    assert!(lowered >= 20, "only {lowered} convolutions lowered");
    let x = example_inputs();
    let inputs = |e: &Engine| -> Vec<Tensor> {
        e.input_names()
            .iter()
            .map(|n| x.iter().find(|(k, _)| k == n).unwrap().1.clone())
            .collect()
    };
    let a = qdq.run(inputs(&qdq)).unwrap();
    let b = int8.run(inputs(&int8)).unwrap();
    let db = sqnr_db(&values(&a[0]), &values(&b[0]));
    eprintln!("{lowered} convs on int8 kernels; int8 vs QDQ-in-float: {db:.1} dB");
    assert!(db > 60.0, "{db:.1} dB");
}

/// Samples of the quantized model (its layers on this CPU's int8 kernels) from the same
/// seed as the float model stay within 30 dB PSNR of the float samples: the bar of the
/// repository's x86 test, on a smaller run (2 samples × 20 DDIM steps, one seed instead of
/// 2 × 8 × 50) that emulation affords.
#[test]
#[ignore = "needs a compiled model: TFMQC_QUANTIZED_DIGITS (scripts/test-arm64.sh)"]
fn compiled_digits_samples_are_within_30_db_of_float() {
    const COUNT: usize = 2;
    const STEPS: usize = 20;
    let float = Denoiser::load(&float_digits()).unwrap();
    let int8 = Denoiser::load(&compiled("TFMQC_QUANTIZED_DIGITS")).unwrap();
    assert_eq!(float.int8_ops(), 0);
    assert!(int8.int8_ops() > 0, "no convolution runs in int8");
    let a = float.sample(0, STEPS, &[], COUNT, Sampler::Ddim).unwrap();
    let b = int8.sample(0, STEPS, &[], COUNT, Sampler::Ddim).unwrap();
    let psnr = psnr_db(&values(&a), &values(&b));
    eprintln!("{COUNT} samples × {STEPS} DDIM steps, int8 vs float PSNR {psnr:.2} dB");
    assert!(psnr >= 30.0, "PSNR {psnr:.2} dB < 30 dB");
}
