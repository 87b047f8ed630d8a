//! Sampling with a tfmqc-compiled denoiser: the code an edge application copies.
//!
//! Run it (from the repository root) on the trained digits model, or on any file tfmqc
//! wrote (`tfmqc models/ddpm_digits.onnx -o target/ddpm_digits.q.onnx`):
//!
//!     cargo run --release -p tfmqc-runtime --example denoise -- models/ddpm_digits.onnx
//!
//! It links only the runtime crate (`tfmqc-runtime`), never the compiler.

use tfmqc_runtime::{Denoiser, Sampler, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: denoise MODEL.onnx")?;

    // Load once: reads the time-step set S and the scheduler configuration (diffusers'
    // scheduler_config.json as tfmqc recorded it) from the metadata, and plans the graph
    // for speed. An application with its own scheduler_config.json can give it instead:
    // `model.set_scheduler(SchedulerConfig::from_file(path)?)`.
    let model = Denoiser::load(path.as_ref())?;
    eprintln!("{model:?}");

    // Conditioning inputs (text embeddings, class labels, ...) go here by input name;
    // the digits model has none.
    let cond: Vec<(&str, Tensor)> = vec![];

    // A batch of 4 from seed 0, 20 DPM-Solver++ steps: [4, C, H, W] in about [-1, 1].
    // (Sampler::Ddim, Ddpm, Euler as diffusers' schedulers of those names; the time steps
    // are diffusers' for 20 steps, and must be in S.) `sample_with` adds classifier-free
    // guidance.
    let images = model.sample(0, 20, &cond, 4, Sampler::DpmSolverPP)?;

    // One denoiser call, the building block of any other loop. A time step outside S
    // is an error, raised before anything runs.
    let t = model.trajectory(Sampler::DpmSolverPP, 20)?[0];
    let _prediction = model.denoise(&images, t, &cond)?;

    let view = images.to_plain_array_view::<f32>()?;
    let n = view.len() as f32;
    let (min, max, sum) = view
        .iter()
        .fold((f32::MAX, f32::MIN, 0.0), |(lo, hi, s), &v| {
            (lo.min(v), hi.max(v), s + v)
        });
    println!(
        "{:?}: min {min:.3} max {max:.3} mean {:.3}",
        images.shape(),
        sum / n
    );
    Ok(())
}
