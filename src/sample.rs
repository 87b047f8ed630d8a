//! `tfmqc sample MODEL -o grid.png`: runs the runtime's sampler and saves a PNG grid.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use tfmqc_runtime::{Denoiser, Sampler};

use crate::{user_error, Failure};

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// The denoiser: an original model or a file tfmqc wrote.
    #[arg(value_name = "MODEL")]
    model: PathBuf,
    /// The PNG grid to write (written only on success).
    #[arg(short, long, value_name = "IMAGE.png")]
    output: PathBuf,
    /// Denoising steps, taken evenly from the model's time-step set S.
    #[arg(long, default_value_t = 50, value_name = "N")]
    steps: usize,
    /// Seed of the initial noise (and of DDPM's noise): same seed, same image.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Samples in the grid.
    #[arg(long, default_value_t = 16, value_name = "N")]
    count: usize,
    /// DDIM (η = 0) or DDPM (ancestral).
    #[arg(long, default_value = "ddim", value_parser = ["ddim", "ddpm"])]
    sampler: String,
}

/// Nearest-neighbour upscaling of each sample in the grid.
const SCALE: usize = 4;
/// Pixels between the samples.
const GAP: usize = 2;
/// The gap colour (mid grey, apart from both black and white samples).
const GAP_VALUE: u8 = 128;

fn runtime_error(e: tfmqc_runtime::Error) -> Failure {
    user_error(e.to_string())
}

pub fn run(args: &SampleArgs) -> Result<(), Failure> {
    if args.steps == 0 || args.count == 0 {
        return Err(user_error("--steps and --count must be at least 1"));
    }
    let sampler: Sampler = args.sampler.parse().map_err(user_error)?;
    let start = Instant::now();
    let model = Denoiser::load(&args.model).map_err(runtime_error)?;
    let cond = model.conditioning_inputs();
    if !cond.is_empty() {
        return Err(user_error(format!(
            "{}: the model takes conditioning inputs {cond:?}; `tfmqc sample` runs unconditional models only (use the runtime API, Denoiser::sample, to give them)",
            args.model.display()
        )));
    }
    let traj = model.trajectory(args.steps);
    eprintln!(
        "tfmqc: loaded {} in {:.2} s; {} {:?} steps from |S| = {} (t = {}..{})",
        args.model.display(),
        start.elapsed().as_secs_f64(),
        traj.len(),
        sampler,
        model.timestep_count(),
        traj[0],
        traj[traj.len() - 1]
    );
    let t0 = Instant::now();
    let x = model
        .sample(args.seed, args.steps, &[], args.count, sampler)
        .map_err(runtime_error)?;
    let took = t0.elapsed().as_secs_f64();
    let view = x
        .to_plain_array_view::<f32>()
        .map_err(|e| user_error(format!("the samples: {e:#}")))?;
    let values: Vec<f32> = view.iter().copied().collect();
    let shape = x.shape();
    let (png, width, height) = grid_png(&values, [shape[0], shape[1], shape[2], shape[3]])?;
    tfmqc_passes::onnx::write_atomic(&args.output, &png)?;
    eprintln!(
        "tfmqc: sampled {} in {took:.2} s ({:.1} ms per step); wrote {} ({width}×{height})",
        args.count,
        took * 1e3 / traj.len() as f64,
        args.output.display()
    );
    Ok(())
}

/// Encodes samples [N, C, H, W] in [-1, 1] as a PNG grid: ⌈√N⌉ columns, each sample
/// upscaled ×SCALE, GAP pixels apart; 3 channels → RGB, otherwise the first one in grey.
pub fn grid_png(x: &[f32], [n, c, h, w]: [usize; 4]) -> Result<(Vec<u8>, u32, u32), Failure> {
    let cols = (1..=n).find(|k| k * k >= n).unwrap_or(1);
    let rows = n.div_ceil(cols);
    let rgb = c == 3;
    let px = if rgb { 3 } else { 1 };
    let (cw, ch) = (w * SCALE, h * SCALE);
    let width = cols * cw + (cols - 1) * GAP;
    let height = rows * ch + (rows - 1) * GAP;
    let mut img = vec![GAP_VALUE; width * height * px];
    let level = |v: f32| (((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round()) as u8;
    for s in 0..n {
        let (ox, oy) = ((s % cols) * (cw + GAP), (s / cols) * (ch + GAP));
        for y in 0..ch {
            for xx in 0..cw {
                let at = ((oy + y) * width + ox + xx) * px;
                for k in 0..px {
                    img[at + k] = level(x[((s * c + k) * h + y / SCALE) * w + xx / SCALE]);
                }
            }
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width as u32, height as u32);
        enc.set_color(if rgb {
            png::ColorType::Rgb
        } else {
            png::ColorType::Grayscale
        });
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc
            .write_header()
            .map_err(|e| user_error(format!("encoding the PNG: {e}")))?;
        writer
            .write_image_data(&img)
            .map_err(|e| user_error(format!("encoding the PNG: {e}")))?;
    }
    Ok((out, width as u32, height as u32))
}
