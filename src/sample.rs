//! `tfmqc sample MODEL -o grid.png`: runs the runtime's sampler and saves a PNG grid.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use tfmqc_runtime::{Denoiser, Guidance, Sampler, SchedulerConfig, Tensor};

use crate::{user_error, Failure};

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// The denoiser: an original model or a file tfmqc wrote.
    #[arg(value_name = "MODEL")]
    model: PathBuf,
    /// The PNG grid to write (written only on success).
    #[arg(short, long, value_name = "IMAGE.png")]
    output: PathBuf,
    /// Denoising steps: the sampler visits the time steps diffusers computes for N under
    /// the scheduler; every one must be in the model's time-step set S.
    #[arg(long, default_value_t = 50, value_name = "N")]
    steps: usize,
    /// Seed of the initial noise (and of DDPM's noise): same seed, same image.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Samples in the grid.
    #[arg(long, default_value_t = 16, value_name = "N")]
    count: usize,
    /// ddim (η = 0), ddpm (ancestral), euler (Euler discrete) or dpm++
    /// (DPM-Solver++ 2M), as diffusers' schedulers. Default: the sampler the model was
    /// calibrated for (metadata tfmqc.sampler), else ddim.
    #[arg(long, value_parser = ["ddim", "ddpm", "euler", "dpm++"])]
    sampler: Option<String>,
    /// A diffusers scheduler_config.json to sample with instead of the model's own
    /// (metadata tfmqc.schedule, else diffusion.*, else DDIMScheduler defaults).
    #[arg(long, value_name = "FILE")]
    scheduler: Option<PathBuf>,
    /// Conditioning of a conditional model (.safetensors or .npz keyed by input name,
    /// rows cycled over the samples; `uncond/<input>`: the unconditional input of
    /// --guidance-scale, else zeros).
    #[arg(long, value_name = "FILE")]
    cond: Option<PathBuf>,
    /// Classifier-free guidance scale (needs a conditional model and --cond).
    #[arg(long, value_name = "G")]
    guidance_scale: Option<f32>,
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
    let start = Instant::now();
    let mut model = Denoiser::load(&args.model).map_err(runtime_error)?;
    let sampler: Sampler = match &args.sampler {
        Some(s) => s.parse().map_err(user_error)?,
        None => recorded_sampler(&args.model).unwrap_or(Sampler::Ddim),
    };
    if let Some(path) = &args.scheduler {
        let config = SchedulerConfig::from_file(path).map_err(runtime_error)?;
        model.set_scheduler(config).map_err(runtime_error)?;
    }
    let (cond, uncond) = conditioning(&model, args)?;
    let cond_ref: Vec<(&str, Tensor)> = cond.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let uncond_ref: Vec<(&str, Tensor)> = uncond
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    let traj = model
        .trajectory(sampler, args.steps)
        .map_err(|e| user_error(format!("{}: {e}", args.model.display())))?;
    eprintln!(
        "tfmqc: loaded {} in {:.2} s; {sampler}, {} steps (t = {}..{}) of |S| = {}{}",
        args.model.display(),
        start.elapsed().as_secs_f64(),
        traj.len(),
        traj[0],
        traj[traj.len() - 1],
        model.timestep_count(),
        args.guidance_scale
            .map(|g| format!(", guidance {g}"))
            .unwrap_or_default()
    );
    let t0 = Instant::now();
    let guidance = args.guidance_scale.map(|scale| Guidance {
        scale,
        uncond: &uncond_ref,
    });
    let x = model
        .sample_with(
            args.seed,
            args.steps,
            &cond_ref,
            args.count,
            sampler,
            guidance,
            &mut |_, _| {},
        )
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

/// The sampler a tfmqc-compiled model was calibrated for (metadata tfmqc.sampler).
fn recorded_sampler(path: &std::path::Path) -> Option<Sampler> {
    let proto = tfmqc_runtime::engine::read_proto(path).ok()?;
    proto
        .metadata_props
        .iter()
        .find(|p| p.key == tfmqc_passes::options::meta::SAMPLER)
        .and_then(|p| p.value.parse().ok())
}

type Named = Vec<(String, Tensor)>;

/// The conditioning (and unconditional conditioning) from --cond, checked against the
/// model's inputs.
fn conditioning(model: &Denoiser, args: &SampleArgs) -> Result<(Named, Named), Failure> {
    let names = model.conditioning_inputs();
    let file = match (&args.cond, names.is_empty()) {
        (None, true) => {
            if args.guidance_scale.is_some() {
                return Err(user_error(format!(
                    "{}: --guidance-scale needs a conditional model; this one takes no conditioning",
                    args.model.display()
                )));
            }
            return Ok((vec![], vec![]));
        }
        (None, false) => {
            return Err(user_error(format!(
                "{}: the model takes the conditioning inputs {names:?}: give them with --cond FILE (.safetensors or .npz keyed by input name)",
                args.model.display()
            )))
        }
        (Some(p), _) => p,
    };
    let tensors = tfmqc_passes::tensor_file::read_tensors(file)?;
    let (mut cond, mut uncond) = (vec![], vec![]);
    for (key, t) in &tensors {
        let (name, is_uncond) = match key.strip_prefix("uncond/") {
            Some(n) => (n, true),
            None => (key.as_str(), false),
        };
        if !names.contains(&name) {
            return Err(user_error(format!(
                "{}: key '{key}' is not a conditioning input of {} ({names:?}) nor uncond/<input>",
                file.display(),
                args.model.display()
            )));
        }
        let t = tfmqc_passes::exec::to_tract(t)?;
        if is_uncond {
            uncond.push((name.to_string(), t));
        } else {
            cond.push((name.to_string(), t));
        }
    }
    for name in &names {
        if !cond.iter().any(|(n, _)| n == name) {
            return Err(user_error(format!(
                "{}: lacks the conditioning input '{name}'",
                file.display()
            )));
        }
        if args.guidance_scale.is_some() && !uncond.iter().any(|(n, _)| n == name) {
            let like = &cond.iter().find(|(n, _)| n == name).expect("checked").1;
            let mut shape = like.shape().to_vec();
            if let Some(rows) = shape.first_mut() {
                *rows = 1;
            }
            let zeros = Tensor::zero_dt(like.datum_type(), &shape)
                .map_err(|e| user_error(format!("zeros for '{name}': {e:#}")))?;
            eprintln!(
                "tfmqc: guidance: the unconditional '{name}' is zeros (no uncond/{name} in {})",
                file.display()
            );
            uncond.push((name.to_string(), zeros));
        }
    }
    Ok((cond, uncond))
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
