//! Per-step time of one denoiser call, measured in one run on the same machine:
//! tract float on the float model, tract on the quantized QDQ file (tract runs QDQ in
//! float), and the tfmqc runtime (quantized Conv / Gemm / MatMul on the int8 kernels),
//! on 1 and 2 threads, plus the int8 weights resident in memory vs the same weights in
//! f32.
//!
//!     cargo bench --bench step            # every model
//!     cargo bench --bench step -- conv3x3_64 guided_unet   # some of them
//!
//! Quantizes each denoiser with tfmqc first (W8A8, S = ddim:50, quick calibration);
//! `conv3x3_64` (one 3×3 conv 64→64 at 32×32) comes quantized in models/.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tfmqc_passes::pipeline::{default_pipeline, parse_pipeline, run_pipeline, PassContext};
use tfmqc_passes::tensor_file::read_safetensors;
use tfmqc_passes::{onnx, Options};
use tfmqc_runtime::{with_threads, Engine, Optimize, Tensor};

mod common;
use common::median_step;

fn main() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    println!(
        "{:<14} {:>3} {:>9} {:>9} {:>9} {:>6} {:>10} {:>13}",
        "model", "thr", "float ms", "qdq ms", "int8 ms", "nodes", "float/int8", "weights i8/f32"
    );
    let models = [
        "conv3x3_64",
        "ddpm_digits",
        "unet2d_attn",
        "ddim_unet",
        "guided_unet",
    ];
    for name in models
        .into_iter()
        .filter(|m| only.is_empty() || only.iter().any(|o| o == m))
    {
        let src = repo.join("models").join(format!("{name}.onnx"));
        let mut inputs: HashMap<String, Tensor> = read_safetensors(
            &repo
                .join("models")
                .join(format!("{name}.inputs.safetensors")),
        )
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, tfmqc_passes::exec::to_tract(&v).unwrap()))
        .collect();
        let q = if name == "conv3x3_64" {
            repo.join("models").join(format!("{name}.q.onnx"))
        } else {
            let q = dir.path().join(format!("{name}.q.onnx"));
            let t_name = quantize(&src, &q);
            // A time step of S = ddim:50, in the input's own dtype and shape.
            let t = inputs[&t_name].clone();
            let t500 = t
                .cast_to::<f64>()
                .unwrap()
                .into_owned()
                .into_plain_array::<f64>()
                .unwrap()
                .mapv(|_| 500.0);
            inputs.insert(
                t_name,
                Tensor::from(t500)
                    .cast_to_dt(t.datum_type())
                    .unwrap()
                    .into_owned(),
            );
            q
        };
        let load = |p: &Path| Engine::load(p, None, Optimize::Full).unwrap();
        let (float, qdq) = (load(&src), load(&q));
        let (int8, nodes) = Engine::load_int8(&q, Optimize::Full).unwrap();
        let (resident, as_f32) = int8.int8_weight_bytes();
        for threads in [1, 2] {
            let time = |e: &Engine| with_threads(threads, || median_step(e, &inputs, 3, 21));
            let (tf, tq, ti) = (time(&float), time(&qdq), time(&int8));
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "{name:<14} {threads:>3} {:>9.2} {:>9.2} {:>9.2} {nodes:>6} {:>10.2} {:>13}",
                ms(tf),
                ms(tq),
                ms(ti),
                ms(tf) / ms(ti),
                format!("{:.0}/{:.0} KB", resident as f64 / 1e3, as_f32 as f64 / 1e3),
            );
        }
    }
}

/// Quantizes `src` into `q` with the default pipeline (quick calibration); returns the
/// name of the time-step input.
fn quantize(src: &Path, q: &Path) -> String {
    let options = Options {
        timesteps: Some("ddim:50".into()),
        calib_samples: 2,
        calib_steps: Some(10),
        ..Default::default()
    };
    let mut cx = PassContext::new(onnx::load(src).unwrap(), &options);
    let passes = parse_pipeline(&default_pipeline().join(",")).unwrap();
    run_pipeline(&mut cx, &passes, &mut |_, _, _| Ok(())).unwrap();
    onnx::save(&cx.model, q).unwrap();
    cx.tib.as_ref().unwrap().timestep_input.clone()
}
