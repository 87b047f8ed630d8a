//! Per-step time of one denoiser call, measured in one run on the same machine:
//! tract float on the float model, tract on the quantized QDQ file (tract runs QDQ in
//! float), and the tfmqc runtime (quantized convolutions on the int8 kernels).
//!
//!     cargo bench --bench step
//!
//! Quantizes each model with tfmqc first (W8A8, S = ddim:50, quick calibration).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tfmqc_passes::pipeline::{default_pipeline, parse_pipeline, run_pipeline, PassContext};
use tfmqc_passes::tensor_file::read_safetensors;
use tfmqc_passes::{onnx, Options};
use tfmqc_runtime::{Engine, Optimize, Tensor};

mod common;
use common::median_step;

fn main() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>7} {:>10}",
        "model", "float ms", "qdq ms", "int8 ms", "convs", "float/int8"
    );
    for name in ["ddpm_digits", "unet2d_attn", "ddim_unet", "guided_unet"] {
        let src = repo.join("models").join(format!("{name}.onnx"));
        let options = Options {
            timesteps: Some("ddim:50".into()),
            calib_samples: 2,
            calib_steps: 10,
            ..Default::default()
        };
        let mut cx = PassContext::new(onnx::load(&src).unwrap(), &options);
        let passes = parse_pipeline(&default_pipeline().join(",")).unwrap();
        run_pipeline(&mut cx, &passes, &mut |_, _, _| Ok(())).unwrap();
        let q = dir.path().join(format!("{name}.q.onnx"));
        onnx::save(&cx.model, &q).unwrap();
        let mut inputs: HashMap<String, Tensor> = read_safetensors(
            &repo
                .join("models")
                .join(format!("{name}.inputs.safetensors")),
        )
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, tfmqc_passes::exec::to_tract(&v).unwrap()))
        .collect();
        // A time step of S = ddim:50, in the input's own dtype and shape.
        let t_name = cx.tib.as_ref().unwrap().timestep_input.clone();
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
        let load = |p: &Path| Engine::load(p, None, Optimize::Full).unwrap();
        let float = median_step(&load(&src), &inputs, 3, 21);
        let qdq = median_step(&load(&q), &inputs, 3, 21);
        let (int8, convs) = Engine::load_int8(&q, Optimize::Full).unwrap();
        let int8 = median_step(&int8, &inputs, 3, 21);
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{name:<22} {:>10.2} {:>10.2} {:>10.2} {convs:>7} {:>10.2}",
            ms(float),
            ms(qdq),
            ms(int8),
            ms(float) / ms(int8)
        );
    }
}
