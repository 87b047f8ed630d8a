//! `tfmqc eval FLOAT QUANT [QUANT...]`: what quantization did to a denoiser, side by side
//! (DESIGN.md §7): temporal-feature error per time step, per-step output SQNR along float
//! trajectories, end-to-end sample PSNR through the runtime's sampler, a Fréchet distance
//! in a shipped feature space, plots, and one JSON object (docs/eval-json.md).

mod check;
mod figures;
mod font;
mod metrics;
pub mod plot;
mod report;

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use serde_json::Value;
use tfmqc_passes::calibrate::{stand_in, timestep_tensor};
use tfmqc_passes::evaluate::output_sqnr_against;
use tfmqc_passes::exec::{to_tract, Runner};
use tfmqc_passes::ir::{Dim, Model, Tensor};
use tfmqc_passes::options::{meta, timestep_set};
use tfmqc_passes::{onnx, Options};
use tfmqc_runtime::engine::{read_proto, Optimize};
use tfmqc_runtime::{pb, Denoiser, Guidance, NoiseRng, Sampler, SchedulerConfig};

use crate::{user_error, Failure};
use figures::write_plots;
use metrics::DB_CAP;
use report::{
    EvalReport, FeatureError, FloatResult, QuantResult, SamplePsnr, Stats, StepDb, StepSqnr,
    TemporalFeatures, Timesteps,
};

/// The choices `--help` states (docs/eval-json.md has the details).
const NOTES: &str = "\
How: S comes from --timesteps, else the set a tfmqc QUANT records, else the pipeline's
default; the scheduler from --scheduler, else the one a tfmqc QUANT records, else FLOAT's
metadata; every model samples the same trajectories with the same sampler (--sampler,
else the one a tfmqc QUANT was calibrated for, else ddim). Temporal features: the TIB
frontier detected on FLOAT, read by name from each QUANT (extra outputs); a QUANT without
a value of that name is skipped for it, with a note. Conditioning inputs come from --calib
(rows cycled), else seeded stand-ins (WARNING). The Fréchet distance needs
--fd-features and --fd-ref and is skipped (with a note) without them or when the samples
do not fit the feature model. A QUANT must have FLOAT's inputs and outputs, and every
weight it feeds to Conv/Gemm/MatMul (dequantized) within relative error 0.5 of a
same-shaped FLOAT weight (a tfmqc file made with TCR: after fitting one factor per input
channel, its reparameterization); otherwise eval stops with exit code 1.

Example:
  tfmqc eval models/ddpm_digits.onnx q8.onnx q4.onnx --steps 50 --samples 64 \\
      --fd-features models/digits_features.onnx --fd-ref models/digits_features_ref.json \\
      --plots results/ --json > eval.json";

#[derive(Args, Debug)]
#[command(after_help = NOTES)]
pub struct EvalArgs {
    /// The float model (the reference).
    #[arg(value_name = "FLOAT")]
    float: PathBuf,
    /// Quantized versions of FLOAT: tfmqc files or any QDQ ONNX (onnxruntime
    /// quantize_static, ...). Each must have FLOAT's inputs and outputs, and weights that
    /// dequantize close to FLOAT's.
    #[arg(value_name = "QUANT", required = true, num_args = 1..)]
    quant: Vec<PathBuf>,
    /// Names for the QUANT files in tables and plots, in order (default: file stems).
    #[arg(long, value_name = "NAME")]
    label: Vec<String>,
    /// Denoising steps of the trajectories and samples (the time steps diffusers'
    /// scheduler visits at N; they must lie in S).
    #[arg(long, default_value_t = 50, value_name = "N")]
    steps: usize,
    /// The sampler: ddim, ddpm, euler or dpm++ (default: the one a tfmqc QUANT was
    /// calibrated for, else ddim).
    #[arg(long, value_parser = ["ddim", "ddpm", "euler", "dpm++"])]
    sampler: Option<String>,
    /// A diffusers scheduler_config.json (default: the one a tfmqc QUANT records, else
    /// FLOAT's metadata, else DDIMScheduler defaults).
    #[arg(long, value_name = "FILE")]
    scheduler: Option<PathBuf>,
    /// Conditioning (.safetensors or .npz keyed by input name, rows cycled;
    /// `uncond/<input>` for --guidance-scale, else zeros). Default: seeded stand-ins.
    #[arg(long, value_name = "FILE")]
    calib: Option<PathBuf>,
    /// Classifier-free guidance scale of the trajectories and samples.
    #[arg(long, value_name = "G")]
    guidance_scale: Option<f32>,
    /// Samples M for the end-to-end PSNR and the Fréchet distance (same seeds for every
    /// model).
    #[arg(long, default_value_t = 16, value_name = "M")]
    samples: usize,
    /// Seed of the sampling noise, the trajectories and the conditioning stand-ins.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object on stdout (schema: docs/eval-json.md) instead of the table.
    #[arg(long)]
    json: bool,
    /// Write the plots here: temporal_features.{svg,png}, step_sqnr.{svg,png},
    /// samples.png (float | each QUANT).
    #[arg(long, value_name = "DIR")]
    plots: Option<PathBuf>,
    /// Feature model for the Fréchet distance (e.g. models/digits_features.onnx); needs
    /// --fd-ref. Without them the distance is skipped (with a note).
    #[arg(long, value_name = "ONNX", requires = "fd_ref")]
    fd_features: Option<PathBuf>,
    /// Reference statistics of the training data in that feature space: JSON with `mean`
    /// [F] and `cov` [F][F] (e.g. models/digits_features_ref.json).
    #[arg(long, value_name = "JSON", requires = "fd_features")]
    fd_ref: Option<PathBuf>,
    /// The feature model's output holding the features.
    #[arg(long, default_value = "features", value_name = "NAME")]
    fd_output: String,
    /// The time-step set S. Default: the set a tfmqc QUANT records, else FLOAT's
    /// metadata, else all T training steps.
    #[arg(long, value_name = "SPEC")]
    timesteps: Option<String>,
    /// The time-step input (default: detected on FLOAT).
    #[arg(long, value_name = "NAME")]
    timestep_input: Option<String>,
    /// Beta schedule, over the scheduler configuration, as in the pipeline.
    #[arg(long, value_name = "linear|scaled-linear|cosine")]
    schedule: Option<String>,
    /// Training time steps T, over the scheduler configuration.
    #[arg(long, value_name = "T")]
    train_timesteps: Option<usize>,
    /// First β, over the scheduler configuration.
    #[arg(long, value_name = "B0")]
    beta_start: Option<f64>,
    /// Last β, over the scheduler configuration.
    #[arg(long, value_name = "B1")]
    beta_end: Option<f64>,
}

fn fail(e: tfmqc_passes::Error) -> Failure {
    Failure::from(e)
}

fn runtime_fail(path: &Path, e: tfmqc_runtime::Error) -> Failure {
    user_error(format!("{}: {e}", path.display()))
}

fn stem(p: &Path) -> String {
    let name = p
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    name.strip_suffix(".onnx").unwrap_or(&name).to_string()
}

struct Quant {
    path: PathBuf,
    label: String,
    model: Model,
    tfmqc: bool,
    weights: check::WeightCheck,
}

/// S, the sampler, the scheduler and the options every later step runs with.
struct Setup {
    /// FLOAT, with a tfmqc QUANT's scheduler in its metadata where no file is given.
    float: Model,
    opts: Options,
    sampler: Sampler,
    scheduler: SchedulerConfig,
    set: Vec<i64>,
    /// Where S came from.
    s_source: String,
    trajectory: Vec<i64>,
}

/// What the samplers produced: FLOAT's samples, each QUANT's, and their `[N, C, H, W]`.
struct Samples {
    float: Vec<f32>,
    quant: Vec<Vec<f32>>,
    dims: [usize; 4],
}

pub fn run(args: &EvalArgs) -> Result<(), Failure> {
    let start = Instant::now();
    check_args(args)?;
    let (float, quants) = load(args)?;
    let mut notes: Vec<String> = vec![];
    let setup = resolve_setup(args, float, &quants)?;
    let tib = tfmqc_passes::detect_tib::detect(&setup.float, args.timestep_input.as_deref());
    let t_name = timestep_input(args, &setup.float, &tib)?;
    let progress = |msg: &str| {
        eprintln!(
            "tfmqc eval: [{:6.1} s] {msg}",
            start.elapsed().as_secs_f64()
        )
    };
    progress(&format!(
        "{} vs {} model(s); |S| = {} ({}); {} steps, {} samples, seed {}",
        args.float.display(),
        quants.len(),
        setup.set.len(),
        setup.s_source,
        args.steps,
        args.samples,
        args.seed
    ));

    // 1. Temporal features: every TIB frontier value, per t in S.
    let frontier: Vec<String> = match &tib {
        Ok(t) => t.frontier.iter().map(|f| f.name.clone()).collect(),
        Err(e) => {
            notes.push(format!(
                "no time-step block found on FLOAT ({e}): temporal-feature error skipped"
            ));
            vec![]
        }
    };
    let features = temporal_features(
        args, &setup, &quants, &frontier, &t_name, &progress, &mut notes,
    )?;
    // 2. Per-step output SQNR along float trajectories of the sampler.
    progress(&format!(
        "per-step output SQNR: float {} trajectories of {} steps",
        setup.sampler, args.steps
    ));
    let given = tfmqc_passes::trajectory::Given::read(&setup.float, &setup.opts).map_err(fail)?;
    let (step_sqnr, stand_ins) = step_sqnr(&setup, &quants, &given, &t_name, &mut notes)?;
    // 3. End to end: the runtime's sampler, same seed, same trajectory.
    progress(&format!(
        "sampling: {} samples × {} {} steps per model",
        args.samples, args.steps, setup.sampler
    ));
    let samples = sample_all(args, &setup, &quants, &given, &t_name)?;
    let psnr = sample_psnr(&samples);
    // 4. Fréchet distance in the feature space.
    let fd = frechet_distance(args, &samples, &mut notes)?;

    let quant_results: Vec<QuantResult> = quants
        .into_iter()
        .zip(features)
        .zip(step_sqnr)
        .zip(psnr)
        .enumerate()
        .map(|(k, (((q, temporal_features), sqnr), psnr))| QuantResult {
            file: q.path.display().to_string(),
            tfmqc_options: q
                .model
                .metadata_value(meta::OPTIONS)
                .and_then(|o| serde_json::from_str::<Value>(o).ok()),
            label: q.label,
            tfmqc: q.tfmqc,
            weight_check: q.weights,
            temporal_features,
            step_sqnr_db: StepSqnr::new(sqnr),
            sample_psnr_db: SamplePsnr {
                summary: Stats::of(&psnr),
                per_sample: psnr,
            },
            fd: fd.as_ref().map(|f| f.1[k]),
        })
        .collect();
    let plots = match &args.plots {
        Some(dir) => Some(write_plots(dir, &quant_results, &setup.set, &samples)?),
        None => None,
    };
    let result = EvalReport {
        tool_version: env!("CARGO_PKG_VERSION"),
        float: FloatResult {
            file: args.float.display().to_string(),
            fd: fd.as_ref().map(|f| f.0),
        },
        timestep_input: t_name,
        timesteps: Timesteps {
            source: setup.s_source,
            values: setup.set,
        },
        schedule: setup.scheduler.to_json(),
        sampler: setup.sampler.name(),
        guidance_scale: args.guidance_scale,
        steps: args.steps,
        trajectory: setup.trajectory,
        samples: args.samples,
        seed: args.seed,
        stand_in_inputs: stand_ins,
        frontier,
        fd_features: args.fd_features.as_ref().map(|p| p.display().to_string()),
        quant: quant_results,
        plots,
        notes,
        seconds: start.elapsed().as_secs_f64(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result).expect("json"));
    } else {
        print!("{}", report::table(&result));
    }
    for n in &result.notes {
        eprintln!("note: {n}");
    }
    progress(&format!("done in {:.1} s", start.elapsed().as_secs_f64()));
    Ok(())
}

fn check_args(args: &EvalArgs) -> Result<(), Failure> {
    if args.samples == 0 {
        return Err(user_error(
            "--samples M must be at least 1 (M samples per model for the end-to-end comparison)",
        ));
    }
    if args.steps == 0 {
        return Err(user_error("--steps N must be at least 1"));
    }
    if !args.label.is_empty() && args.label.len() != args.quant.len() {
        return Err(user_error(format!(
            "{} --label given for {} QUANT files: give one per QUANT, or none",
            args.label.len(),
            args.quant.len()
        )));
    }
    Ok(())
}

/// Whether `model` is a tfmqc file whose recorded options ran TCR (`tcr` on or auto):
/// its weights may be rescaled per input channel against FLOAT's.
fn tcr_rescaled(model: &Model) -> bool {
    model
        .metadata_value(meta::OPTIONS)
        .and_then(|o| serde_json::from_str::<Value>(o).ok())
        .and_then(|o| o.get("tcr").and_then(|t| t.as_str()).map(|t| t != "off"))
        .unwrap_or(false)
}

/// FLOAT and each QUANT, checked to be the same model and a quantization of FLOAT (TCR files: up to per-input-channel factors).
fn load(args: &EvalArgs) -> Result<(Model, Vec<Quant>), Failure> {
    let float = onnx::load(&args.float).map_err(fail)?;
    let mut quants = vec![];
    for (k, path) in args.quant.iter().enumerate() {
        let model = onnx::load(path).map_err(fail)?;
        check::same_interface(&float, &model).map_err(|why| {
            user_error(format!(
                "{} and {} are not the same model: {why}",
                args.float.display(),
                path.display()
            ))
        })?;
        let weights =
            check::weights_match(&float, &model, tcr_rescaled(&model)).map_err(|why| {
                user_error(format!(
                    "{} is not a quantization of {}: {why}",
                    path.display(),
                    args.float.display()
                ))
            })?;
        quants.push(Quant {
            path: path.clone(),
            label: args.label.get(k).cloned().unwrap_or_else(|| stem(path)),
            tfmqc: model.metadata_value(meta::VERSION).is_some(),
            model,
            weights,
        });
    }
    Ok((float, quants))
}

/// S and the scheduler: the options, else what a tfmqc QUANT recorded, else FLOAT; the
/// trajectory of `--steps` must stay in S, and S in each tfmqc QUANT's own set.
fn resolve_setup(args: &EvalArgs, float: Model, quants: &[Quant]) -> Result<Setup, Failure> {
    let recorded = |key: &str| {
        quants
            .iter()
            .find_map(|q| q.model.metadata_value(key).map(String::from))
    };
    let sampler: Sampler = match (&args.sampler, recorded(meta::SAMPLER)) {
        (Some(s), _) => s.parse().map_err(user_error)?,
        (None, Some(s)) => s.parse().unwrap_or(Sampler::Ddim),
        (None, None) => Sampler::Ddim,
    };
    let mut opts = Options {
        timesteps: args.timesteps.clone(),
        timestep_input: args.timestep_input.clone(),
        scheduler: args.scheduler.clone(),
        sampler,
        calib: args.calib.clone(),
        guidance_scale: args.guidance_scale,
        calib_steps: Some(args.steps),
        schedule: args.schedule.clone(),
        train_timesteps: args.train_timesteps,
        beta_start: args.beta_start,
        beta_end: args.beta_end,
        seed: args.seed,
        ..Default::default()
    };
    // A tfmqc QUANT's scheduler, where no file is given: FLOAT's metadata with it.
    let mut float = float;
    if args.scheduler.is_none() {
        if let Some(json) = recorded(meta::SCHEDULE) {
            float.set_metadata(meta::SCHEDULE, json);
        }
    }
    let mut s_source = "--timesteps".to_string();
    if opts.timesteps.is_none() {
        if let Some(q) = quants
            .iter()
            .find(|q| q.model.metadata_value(meta::TIMESTEPS).is_some())
        {
            opts.timesteps = q.model.metadata_value(meta::TIMESTEPS).map(String::from);
            s_source = format!("recorded in {}", q.path.display());
        } else if float.metadata_value(meta::TIMESTEPS).is_some() {
            s_source = format!("recorded in {}", args.float.display());
        } else {
            s_source = "all training steps (no --timesteps, nothing recorded)".into();
        }
    }
    let set = timestep_set(&float, &opts).map_err(fail)?;
    let scheduler = opts.scheduler(&float).map_err(fail)?;
    let trajectory = tfmqc_runtime::sampler::timesteps(sampler, &scheduler, args.steps)
        .map_err(|e| user_error(e.to_string()))?;
    if let Some(t) = trajectory.iter().find(|t| set.binary_search(t).is_err()) {
        return Err(user_error(format!(
            "{sampler} at --steps {} visits t = {t}, outside the evaluated time-step set S ({} steps, {}..{}): give --steps or --timesteps that fit",
            args.steps,
            set.len(),
            set[0],
            set[set.len() - 1]
        )));
    }
    for q in quants {
        if let Some(rec) = q.model.metadata_value(meta::TIMESTEPS) {
            let theirs = tfmqc_passes::options::parse_timesteps(rec, scheduler.num_train_timesteps)
                .map_err(fail)?;
            if let Some(t) = set.iter().find(|t| theirs.binary_search(t).is_err()) {
                return Err(user_error(format!(
                    "{} was compiled for {} time steps ({}..{}) that do not include t = {t} of the evaluated set S: give --timesteps inside its set",
                    q.path.display(),
                    theirs.len(),
                    theirs[0],
                    theirs[theirs.len() - 1]
                )));
            }
        }
    }
    // Every later step reads S as an explicit list (a one-element list needs the comma).
    let spec: Vec<String> = set.iter().map(|t| t.to_string()).collect();
    opts.timesteps = Some(format!("{},", spec.join(",")));
    Ok(Setup {
        float,
        opts,
        sampler,
        scheduler,
        set,
        s_source,
        trajectory,
    })
}

/// The graph input carrying t: `--timestep-input`, else the detected TIB's, else
/// FLOAT's metadata.
fn timestep_input(
    args: &EvalArgs,
    float: &Model,
    tib: &tfmqc_passes::Result<tfmqc_passes::tib::TibAnalysis>,
) -> Result<String, Failure> {
    Ok(match (&args.timestep_input, tib) {
        (Some(n), _) => n.clone(),
        (None, Ok(t)) => t.timestep_input.clone(),
        (None, Err(e)) => match float.metadata_value(meta::TIMESTEP_INPUT) {
            Some(n) => n.to_string(),
            None => {
                return Err(user_error(format!(
                    "{}: cannot tell the time-step input ({e}); give --timestep-input",
                    args.float.display()
                )))
            }
        },
    })
}

/// Per QUANT: cosine and relative MSE against FLOAT of each frontier value it has, per t
/// in S (a value it lacks is noted and listed as missing).
fn temporal_features(
    args: &EvalArgs,
    setup: &Setup,
    quants: &[Quant],
    frontier: &[String],
    t_name: &str,
    progress: &dyn Fn(&str),
    notes: &mut Vec<String>,
) -> Result<Vec<TemporalFeatures>, Failure> {
    let set = &setup.set;
    let float_features = if frontier.is_empty() {
        None
    } else {
        progress(&format!(
            "temporal features: {} frontier values × {} time steps",
            frontier.len(),
            set.len()
        ));
        Some(features_per_step(
            &setup.float,
            frontier,
            t_name,
            set,
            args.seed,
        )?)
    };
    let mut out = vec![];
    for q in quants {
        let (present, missing): (Vec<String>, Vec<String>) = frontier
            .iter()
            .cloned()
            .partition(|n| q.model.graph.producer(n).is_some());
        if !missing.is_empty() {
            notes.push(format!(
                "{}: no value named {} (the frontier of FLOAT's time-step block): skipped for it",
                q.label,
                missing.join(", ")
            ));
        }
        let mut errs = vec![];
        if let (Some(ff), false) = (&float_features, present.is_empty()) {
            let qf = features_per_step(&q.model, &present, t_name, set, args.seed)?;
            for (k, name) in present.iter().enumerate() {
                let fk = frontier.iter().position(|n| n == name).expect("present");
                let (mut cos, mut mse) = (vec![], vec![]);
                for (a, b) in ff.iter().zip(&qf) {
                    cos.push(metrics::cosine(&a[fk], &b[k]));
                    mse.push(metrics::relative_mse(&a[fk], &b[k]));
                }
                errs.push(FeatureError {
                    name: name.clone(),
                    cosine: cos,
                    rel_mse: mse,
                });
            }
        }
        out.push(TemporalFeatures::new(errs, missing));
    }
    Ok(out)
}

/// Per QUANT, the output SQNR at each step of float trajectories of the sampler (the
/// pipeline's own trajectory generator, guidance and stand-ins included); and the inputs
/// that took seeded stand-ins.
fn step_sqnr(
    setup: &Setup,
    quants: &[Quant],
    given: &tfmqc_passes::trajectory::Given,
    t_name: &str,
    notes: &mut Vec<String>,
) -> Result<(Vec<Vec<StepDb>>, Vec<String>), Failure> {
    let (float, opts) = (&setup.float, &setup.opts);
    let plan = tfmqc_passes::trajectory::Plan::new(float, opts, t_name, given, &setup.set, 2)
        .map_err(fail)?;
    notes.extend(plan.notes.iter().cloned());
    let stand_ins = plan.stand_ins.clone();
    if !stand_ins.is_empty() {
        notes.push(format!(
            "WARNING: {} took seeded random stand-ins (give conditioning with --calib): the numbers show the quantization error under random conditioning",
            stand_ins.join(", ")
        ));
    }
    let ev = tfmqc_passes::trajectory::evaluation_records(
        float,
        opts,
        t_name,
        None,
        usize::MAX,
        &|_| {},
    )
    .map_err(fail)?
    .expect("no call limit");
    let mut out = vec![];
    for q in quants {
        let s = output_sqnr_against(&q.model, &ev.records, &ev.steps, &ev.outputs).map_err(fail)?;
        out.push(
            s.into_iter()
                .map(|x| StepDb {
                    t: x.t,
                    db: x.sqnr_db.min(DB_CAP),
                })
                .collect(),
        );
    }
    Ok((out, stand_ins))
}

/// `--samples` samples of FLOAT and of each QUANT from the runtime's sampler, the same
/// seed and trajectory for all.
fn sample_all(
    args: &EvalArgs,
    setup: &Setup,
    quants: &[Quant],
    given: &tfmqc_passes::trajectory::Given,
    t_name: &str,
) -> Result<Samples, Failure> {
    let (set, scheduler) = (&setup.set, &setup.scheduler);
    let float_den = denoiser(&args.float, set, scheduler, t_name)?;
    let (cond, uncond) = conditioning(&setup.float, &float_den, given, &setup.opts, args.samples)?;
    let cond_ref: Vec<(&str, tfmqc_runtime::Tensor)> =
        cond.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let uncond_ref: Vec<(&str, tfmqc_runtime::Tensor)> = uncond
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    let sample = |d: &Denoiser, path: &Path| -> Result<(Vec<f32>, [usize; 4]), Failure> {
        let x = d
            .sample_with(
                args.seed,
                args.steps,
                &cond_ref,
                args.samples,
                setup.sampler,
                args.guidance_scale.map(|scale| Guidance {
                    scale,
                    uncond: &uncond_ref,
                }),
                &mut |_, _| {},
            )
            .map_err(|e| runtime_fail(path, e))?;
        let shape = x.shape();
        let dims = [shape[0], shape[1], shape[2], shape[3]];
        let v = x
            .to_plain_array_view::<f32>()
            .map_err(|e| user_error(format!("{}: samples: {e:#}", path.display())))?
            .iter()
            .copied()
            .collect();
        Ok((v, dims))
    };
    let (float, dims) = sample(&float_den, &args.float)?;
    drop(float_den);
    let mut quant = vec![];
    for q in quants {
        let d = denoiser(&q.path, set, scheduler, t_name)?;
        quant.push(sample(&d, &q.path)?.0);
    }
    Ok(Samples { float, quant, dims })
}

/// Per QUANT, the PSNR of each sample against FLOAT's sample of the same noise.
fn sample_psnr(s: &Samples) -> Vec<Vec<f64>> {
    let per_sample: usize = s.dims[1..].iter().product();
    s.quant
        .iter()
        .map(|v| {
            (0..s.dims[0])
                .map(|k| {
                    let r = k * per_sample..(k + 1) * per_sample;
                    metrics::psnr(&s.float[r.clone()], &v[r])
                })
                .collect()
        })
        .collect()
}

/// FLOAT's and each QUANT's Fréchet distance, or `None` with a note saying why not.
fn frechet_distance(
    args: &EvalArgs,
    samples: &Samples,
    notes: &mut Vec<String>,
) -> Result<Option<(f64, Vec<f64>)>, Failure> {
    let (Some(model), Some(reference)) = (&args.fd_features, &args.fd_ref) else {
        notes.push(
            "Fréchet distance skipped: give --fd-features ONNX --fd-ref JSON (e.g. models/digits_features.onnx, models/digits_features_ref.json)".into(),
        );
        return Ok(None);
    };
    if args.samples < 2 {
        notes.push("Fréchet distance skipped: it needs --samples ≥ 2".into());
        return Ok(None);
    }
    let mut all = vec![&samples.float];
    all.extend(samples.quant.iter());
    match frechet(model, reference, &args.fd_output, samples.dims, &all)? {
        Ok(v) => {
            if args.samples < 256 {
                notes.push(format!(
                    "Fréchet distance from {} samples: biased upwards at small M (models/README.md: 3.48 for the float digits model at M = 1024); compare the columns, not the absolute value",
                    args.samples
                ));
            }
            Ok(Some((v[0], v[1..].to_vec())))
        }
        Err(why) => {
            notes.push(format!("Fréchet distance skipped: {why}"));
            Ok(None)
        }
    }
}

/// A denoiser for the runtime's sampler with S, the schedule and the time-step input
/// of this evaluation written into its metadata, so float and quantized models follow
/// the same trajectory even when a QUANT from another tool records nothing.
fn denoiser(
    path: &Path,
    set: &[i64],
    scheduler: &SchedulerConfig,
    t_name: &str,
) -> Result<Denoiser, Failure> {
    let mut proto = read_proto(path).map_err(|e| runtime_fail(path, e))?;
    let joined: Vec<String> = set.iter().map(|t| t.to_string()).collect();
    let entries = [
        (meta::TIMESTEPS, joined.join(",")),
        (meta::SCHEDULE, scheduler.to_json().to_string()),
        (meta::TIMESTEP_INPUT, t_name.to_string()),
    ];
    for (key, value) in entries {
        proto.metadata_props.retain(|p| p.key != key);
        proto.metadata_props.push(pb::StringStringEntryProto {
            key: key.to_string(),
            value,
        });
    }
    let dir = path.parent().map(|d| d.to_string_lossy().to_string());
    Denoiser::from_proto(&proto, dir.as_deref(), &path.display().to_string())
        .map_err(|e| user_error(e.to_string()))
}

type Named = Vec<(String, tfmqc_runtime::Tensor)>;

/// The conditioning of the samples: --calib's tensors (rows cycled), else seeded stand-ins
/// (as calibration makes them); and the unconditional one of --guidance-scale
/// (`uncond/<input>`, else zeros).
fn conditioning(
    float: &Model,
    d: &Denoiser,
    given: &tfmqc_passes::trajectory::Given,
    opts: &Options,
    batch: usize,
) -> Result<(Named, Named), Failure> {
    let mut rng = NoiseRng::new(opts.seed ^ 0x5eed_c0de);
    let (mut cond, mut uncond) = (vec![], vec![]);
    for name in d.conditioning_inputs() {
        let info = float
            .graph
            .inputs
            .iter()
            .find(|i| i.name == name)
            .ok_or_else(|| user_error(format!("no graph input '{name}'")))?;
        let t = match given.plain.get(name) {
            Some(t) => t.clone(),
            None => stand_in(float, info, batch, &mut rng).map_err(fail)?,
        };
        let t = to_tract(&t).map_err(fail)?;
        if opts.guidance_scale.is_some() {
            let u = match given.uncond.get(name) {
                Some(u) => to_tract(u).map_err(fail)?,
                None => {
                    let mut shape = t.shape().to_vec();
                    if let Some(r) = shape.first_mut() {
                        *r = 1;
                    }
                    tfmqc_runtime::Tensor::zero_dt(t.datum_type(), &shape)
                        .map_err(|e| user_error(format!("zeros for '{name}': {e:#}")))?
                }
            };
            uncond.push((name.to_string(), u));
        }
        cond.push((name.to_string(), t));
    }
    Ok((cond, uncond))
}

/// The values `names` for every t in `set` (batch of the model's fixed size, else 1; the
/// sample and conditioning inputs get seeded values: the TIB does not read them).
fn features_per_step(
    model: &Model,
    names: &[String],
    t_name: &str,
    set: &[i64],
    seed: u64,
) -> Result<Vec<Vec<Vec<f32>>>, Failure> {
    let g = &model.graph;
    let batch = g
        .inputs
        .iter()
        .find(|i| i.name != t_name)
        .and_then(|i| match i.shape.as_deref() {
            Some([Dim::Known(b), ..]) => Some(*b as usize),
            _ => None,
        })
        .unwrap_or(1);
    let runner = Runner::new(model, Some(names), Optimize::Full).map_err(fail)?;
    let mut rng = NoiseRng::new(seed);
    let mut fixed = std::collections::HashMap::new();
    let t_info = g
        .inputs
        .iter()
        .find(|i| i.name == t_name)
        .ok_or_else(|| user_error(format!("the model has no input '{t_name}'")))?
        .clone();
    for info in g.inputs.iter().filter(|i| i.name != t_name) {
        fixed.insert(
            info.name.clone(),
            stand_in(model, info, batch, &mut rng).map_err(fail)?,
        );
    }
    let mut out = vec![];
    for &t in set {
        let mut inputs = fixed.clone();
        inputs.insert(
            t_name.to_string(),
            timestep_tensor(&t_info, batch, t).map_err(fail)?,
        );
        let values = runner.run(&inputs).map_err(fail)?;
        out.push(
            values
                .iter()
                .map(|v| v.to_f32_vec())
                .collect::<tfmqc_passes::Result<Vec<_>>>()
                .map_err(fail)?,
        );
    }
    Ok(out)
}

fn read_matrix(v: &Value, what: &str) -> Option<Vec<f64>> {
    let arr = v.get(what)?.as_array()?;
    let mut out = vec![];
    for x in arr {
        match x {
            Value::Array(row) => {
                for y in row {
                    out.push(y.as_f64()?);
                }
            }
            other => out.push(other.as_f64()?),
        }
    }
    Some(out)
}

/// FD of each sample set against the reference. Outer error: bad files (exit 1); inner
/// error: the samples do not fit the feature model (a note, the rest goes on).
fn frechet(
    model_path: &Path,
    ref_path: &Path,
    output: &str,
    dims: [usize; 4],
    sets: &[&Vec<f32>],
) -> Result<Result<Vec<f64>, String>, Failure> {
    let text = std::fs::read_to_string(ref_path)
        .map_err(|e| user_error(format!("{}: {e}", ref_path.display())))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| user_error(format!("{}: not JSON: {e}", ref_path.display())))?;
    let (Some(mean), Some(cov)) = (read_matrix(&v, "mean"), read_matrix(&v, "cov")) else {
        return Err(user_error(format!(
            "{}: needs `mean` (F numbers) and `cov` (F×F numbers)",
            ref_path.display()
        )));
    };
    let d = mean.len();
    if d == 0 || cov.len() != d * d {
        return Err(user_error(format!(
            "{}: `mean` has {d} values but `cov` has {} (want {d}×{d})",
            ref_path.display(),
            cov.len()
        )));
    }
    let model = onnx::load(model_path).map_err(fail)?;
    if !model.graph.outputs.iter().any(|o| o.name == output) {
        return Err(user_error(format!(
            "{}: no output '{output}' (outputs: {}); see --fd-output",
            model_path.display(),
            model
                .graph
                .outputs
                .iter()
                .map(|o| o.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let Some(input) = model.graph.inputs.first() else {
        return Err(user_error(format!("{}: no input", model_path.display())));
    };
    let fits = match input.shape.as_deref() {
        Some([b, c, h, w]) => {
            !matches!(b, Dim::Known(n) if *n as usize != dims[0])
                && [c, h, w]
                    .iter()
                    .zip(&dims[1..])
                    .all(|(d, &n)| matches!(d, Dim::Known(k) if *k as usize == n))
        }
        _ => false,
    };
    if !fits {
        return Ok(Err(format!(
            "the feature model's input '{}' is {}, the samples are {:?}",
            input.name,
            input.type_string(),
            dims
        )));
    }
    let reference = metrics::Reference::new(mean, cov);
    let runner = Runner::new(&model, Some(&[output.to_string()]), Optimize::Full).map_err(fail)?;
    let mut out = vec![];
    for set in sets {
        // The feature model takes images: samples clipped to [-1, 1] as when saved.
        let clipped: Vec<f32> = set.iter().map(|x| x.clamp(-1.0, 1.0)).collect();
        let inputs = [(
            input.name.clone(),
            Tensor::from_vec(dims.to_vec(), &clipped),
        )]
        .into_iter()
        .collect();
        let feats = runner.run(&inputs).map_err(fail)?[0]
            .to_f32_vec()
            .map_err(fail)?;
        if feats.len() != dims[0] * d {
            return Ok(Err(format!(
                "the feature model gives {} values for {} samples, the reference has {d} features",
                feats.len(),
                dims[0]
            )));
        }
        let (m, c) = metrics::mean_cov(&feats, d);
        out.push(reference.frechet(&m, &c));
    }
    Ok(Ok(out))
}
