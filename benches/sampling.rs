//! Per-step and whole-sampling-loop time and peak memory of every denoiser in models/,
//! 1 and 2 threads, as ratios against tract float measured in the same run:
//!
//!     cargo bench --bench sampling
//!
//! It runs `tfmqc bench --json` (which quantizes each model with the default pipeline,
//! S = ddim:50, and runs every engine in a process of its own, so peak RSS is each
//! engine's alone) and prints its ratios. The table with the absolute numbers is
//! `tfmqc bench`'s own, on stderr. Set TFMQC_BENCH_THREADS (e.g. `1`) to change the
//! thread counts; onnxruntime runs when target/pyenv or TFMQC_PYTHON has it.

use std::path::PathBuf;
use std::process::{Command, Stdio};

fn main() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let models = repo.join("models");
    // The denoisers: every X.onnx with example inputs, except the feature classifier and
    // the single-conv layer (no time step; `cargo bench --bench step` measures it).
    let mut files: Vec<PathBuf> = std::fs::read_dir(&models)
        .unwrap()
        .filter_map(|e| {
            let p = e.ok()?.path();
            let stem = p.file_name()?.to_str()?.strip_suffix(".onnx")?.to_string();
            (stem != "digits_features"
                && stem != "conv3x3_64"
                && models.join(format!("{stem}.inputs.safetensors")).exists())
            .then_some(p)
        })
        .collect();
    files.sort();
    let threads = std::env::var("TFMQC_BENCH_THREADS").unwrap_or_else(|_| "1,2".into());
    let out = Command::new(env!("CARGO_BIN_EXE_tfmqc"))
        .arg("bench")
        .args(&files)
        .args(["--threads", &threads, "--json"])
        .stderr(Stdio::inherit())
        .output()
        .expect("tfmqc runs");
    assert!(out.status.success(), "tfmqc bench failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    println!(
        "\n{:<24} {:<12} {:>3} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "model", "engine", "thr", "step ×", "loop ×", "peak RSS", "load RSS", "weights"
    );
    let f = |x: &serde_json::Value| match x.as_f64() {
        Some(x) => format!("{x:.2}"),
        None => "-".into(),
    };
    for r in v["ratios"].as_array().unwrap() {
        println!(
            "{:<24} {:<12} {:>3} {:>10} {:>10} {:>10} {:>10} {:>10}",
            r["model"].as_str().unwrap(),
            r["engine"].as_str().unwrap(),
            r["threads"],
            f(&r["step_speedup"]),
            f(&r["loop_speedup"]),
            f(&r["peak_rss_ratio"]),
            f(&r["load_rss_ratio"]),
            f(&r["weight_bytes_ratio"]),
        );
    }
    println!("× = tract-float time / engine time; memory columns = engine / tract-float");
}
