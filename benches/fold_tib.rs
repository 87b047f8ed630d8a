//! Per-step time of the original model vs the same model with its TIB folded, in tract,
//! one run on the same machine: `cargo bench --bench fold_tib` (S = all 1000 steps, so
//! the example inputs' time steps are in the set).
//!
//! Prints, per model, the median step time of each and the ratio folded/original.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tfmqc_passes::pipeline::{parse_pipeline, run_pipeline, PassContext};
use tfmqc_passes::tensor_file::read_safetensors;
use tfmqc_passes::{onnx, Options};
use tfmqc_runtime::{Engine, Optimize};

mod common;
use common::median_step;

fn main() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    println!(
        "{:<22} {:>12} {:>12} {:>8}",
        "model", "original ms", "folded ms", "ratio"
    );
    let mut names: Vec<String> = std::fs::read_dir(repo.join("models"))
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .path()
                .file_name()?
                .to_str()?
                .strip_suffix(".inputs.safetensors")
                .map(String::from)
        })
        .filter(|n| n != "digits_features")
        .collect();
    names.sort();
    for name in names {
        let src = repo.join("models").join(format!("{name}.onnx"));
        let model = onnx::load(&src).unwrap();
        let options = Options {
            timesteps: Some("1000".into()),
            ..Default::default()
        };
        let mut cx = PassContext::new(model, &options);
        run_pipeline(
            &mut cx,
            &parse_pipeline("detect-tib,fold-tib").unwrap(),
            &mut |_, _, _| Ok(()),
        )
        .unwrap();
        let folded = dir.path().join(format!("{name}.onnx"));
        onnx::save(&cx.model, &folded).unwrap();
        let inputs: HashMap<String, tfmqc_runtime::Tensor> = read_safetensors(
            &repo
                .join("models")
                .join(format!("{name}.inputs.safetensors")),
        )
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, tfmqc_passes::exec::to_tract(&v).unwrap()))
        .collect();
        let time = |p: &Path| {
            median_step(
                &Engine::load(p, None, Optimize::Full).unwrap(),
                &inputs,
                5,
                41,
            )
        };
        let (a, b) = (time(&src), time(&folded));
        println!(
            "{name:<22} {:>12.3} {:>12.3} {:>8.3}",
            a.as_secs_f64() * 1e3,
            b.as_secs_f64() * 1e3,
            b.as_secs_f64() / a.as_secs_f64()
        );
    }
}
