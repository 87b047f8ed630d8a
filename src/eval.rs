//! `tfmqc eval FLOAT QUANT [QUANT...]`: what quantization did to a denoiser, side by side
//! (DESIGN.md §7): temporal-feature error per time step, per-step output SQNR along float
//! trajectories, end-to-end sample PSNR through the runtime's sampler, a Fréchet distance
//! in a shipped feature space, plots, and one JSON object (docs/eval-json.md).

mod check;
mod font;
mod metrics;
pub mod plot;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use serde_json::{json, Value};
use tfmqc_passes::calibrate::{calibrate, stand_in, timestep_tensor};
use tfmqc_passes::evaluate::output_sqnr_per_step;
use tfmqc_passes::exec::{to_tract, Runner};
use tfmqc_passes::ir::{Dim, Model, Tensor};
use tfmqc_passes::options::{meta, timestep_set};
use tfmqc_passes::{onnx, Options};
use tfmqc_runtime::engine::{read_proto, Optimize};
use tfmqc_runtime::{pb, Denoiser, NoiseRng, Sampler};

use crate::{user_error, Failure};
use metrics::DB_CAP;
use plot::{Figure, Panel, Series, PALETTE};

/// The choices `--help` states (docs/eval-json.md has the details).
const NOTES: &str = "\
How: S and the schedule come from --timesteps/--schedule/..., else the set a tfmqc QUANT
records, else FLOAT's metadata, as in the pipeline; every model samples the same
trajectory. Temporal features: the TIB frontier detected on FLOAT, read by name from each
QUANT (extra outputs); a QUANT without a value of that name is skipped for it, with a
note. Conditioning inputs get seeded stand-ins (WARNING). The Fréchet distance needs
--fd-features and --fd-ref and is skipped (with a note) without them or when the samples
do not fit the feature model. A QUANT must have FLOAT's inputs and outputs, and every
weight it feeds to Conv/Gemm/MatMul (dequantized) within relative error 0.5 of a
same-shaped FLOAT weight; otherwise eval stops with exit code 1.

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
    /// Denoising steps of the trajectories and samples, taken evenly from S.
    #[arg(long, default_value_t = 50, value_name = "N")]
    steps: usize,
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
    /// Beta schedule (default: FLOAT's metadata, else linear), as in the pipeline.
    #[arg(long, value_name = "linear|scaled-linear|cosine")]
    schedule: Option<String>,
    /// Training time steps T (default: FLOAT's metadata, else 1000).
    #[arg(long, value_name = "T")]
    train_timesteps: Option<usize>,
    #[arg(long, value_name = "B0")]
    beta_start: Option<f64>,
    #[arg(long, value_name = "B1")]
    beta_end: Option<f64>,
}

/// Samples shown per model in samples.png.
const GRID_ROWS: usize = 8;
/// Trajectories for the per-step SQNR when the batch is free (a fixed batch: that many).
const SQNR_TRAJECTORIES: usize = 2;

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

fn stats(v: &[f64]) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    json!({
        "mean": mean,
        "min": sorted[0],
        "median": sorted[sorted.len() / 2],
        "max": sorted[sorted.len() - 1],
    })
}

struct Quant {
    path: PathBuf,
    label: String,
    model: Model,
    tfmqc: bool,
    weights: check::WeightCheck,
}

/// Per QUANT and frontier value: cosine and relative MSE per t in S.
struct FeatureError {
    name: String,
    cosine: Vec<f64>,
    rel_mse: Vec<f64>,
}

pub fn run(args: &EvalArgs) -> Result<(), Failure> {
    let start = Instant::now();
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
        let weights = check::weights_match(&float, &model).map_err(|why| {
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
    let mut notes: Vec<String> = vec![];

    // S and the schedule: the options, else what a tfmqc QUANT recorded, else FLOAT.
    let mut opts = Options {
        timesteps: args.timesteps.clone(),
        timestep_input: args.timestep_input.clone(),
        schedule: args.schedule.clone(),
        train_timesteps: args.train_timesteps,
        beta_start: args.beta_start,
        beta_end: args.beta_end,
        seed: args.seed,
        ..Default::default()
    };
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
    let schedule = opts.schedule(&float).map_err(fail)?;
    for q in &quants {
        if let Some(rec) = q.model.metadata_value(meta::TIMESTEPS) {
            let theirs = tfmqc_passes::options::parse_timesteps(rec, schedule.train_timesteps())
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

    let tib = tfmqc_passes::detect_tib::detect(&float, args.timestep_input.as_deref());
    let t_name = match (&args.timestep_input, &tib) {
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
    };
    let progress = |msg: &str| {
        eprintln!(
            "tfmqc eval: [{:6.1} s] {msg}",
            start.elapsed().as_secs_f64()
        )
    };
    progress(&format!(
        "{} vs {} model(s); |S| = {} ({s_source}); {} steps, {} samples, seed {}",
        args.float.display(),
        quants.len(),
        set.len(),
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
    let mut feature_errors: Vec<Vec<FeatureError>> = vec![];
    let mut feature_missing: Vec<Vec<String>> = vec![];
    let float_features = if frontier.is_empty() {
        None
    } else {
        progress(&format!(
            "temporal features: {} frontier values × {} time steps",
            frontier.len(),
            set.len()
        ));
        Some(features_per_step(
            &float, &frontier, &t_name, &set, args.seed,
        )?)
    };
    for q in &quants {
        let present: Vec<String> = frontier
            .iter()
            .filter(|n| q.model.graph.producer(n).is_some())
            .cloned()
            .collect();
        let missing: Vec<String> = frontier
            .iter()
            .filter(|n| !present.contains(n))
            .cloned()
            .collect();
        if !missing.is_empty() {
            notes.push(format!(
                "{}: no value named {} (the frontier of FLOAT's time-step block): skipped for it",
                q.label,
                missing.join(", ")
            ));
        }
        let mut errs = vec![];
        if let (Some(ff), false) = (&float_features, present.is_empty()) {
            let qf = features_per_step(&q.model, &present, &t_name, &set, args.seed)?;
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
        feature_errors.push(errs);
        feature_missing.push(missing);
    }

    // 2. Per-step output SQNR along float trajectories (the calibration pass's own
    //    trajectory generator, stand-ins included).

    // One batch: calibration keeps the records of its first batch only, so a model with
    // a fixed batch runs just that batch.
    let fixed_batch = float
        .graph
        .inputs
        .iter()
        .filter(|i| i.shape.as_ref().is_some_and(|s| s.len() >= 3))
        .find_map(|i| match i.shape.as_deref() {
            Some([Dim::Known(b), ..]) => Some(*b as usize),
            _ => None,
        });
    let cal_opts = Options {
        calib_samples: fixed_batch.unwrap_or(SQNR_TRAJECTORIES),
        calib_batch: SQNR_TRAJECTORIES,
        calib_steps: args.steps,
        ..opts.clone()
    };
    progress(&format!(
        "per-step output SQNR: {} float trajectories of {} steps",
        fixed_batch.unwrap_or(SQNR_TRAJECTORIES),
        args.steps
    ));
    let cal = calibrate(&float, &cal_opts, &t_name, &[], vec![], &|_| {}).map_err(fail)?;
    if !cal.stand_ins.is_empty() {
        notes.push(format!(
            "WARNING: {} took seeded random stand-ins (no conditioning data is given to eval): the numbers show the quantization error under random conditioning",
            cal.stand_ins.join(", ")
        ));
    }
    let mut step_sqnr = vec![];
    for q in &quants {
        let s = output_sqnr_per_step(&float, &q.model, &cal.records, &cal.record_steps)
            .map_err(fail)?;
        step_sqnr.push(
            s.into_iter()
                .map(|x| (x.t, x.sqnr_db.min(DB_CAP)))
                .collect::<Vec<_>>(),
        );
    }

    // 3. End to end: the runtime's DDIM sampler, same seed, same trajectory from S.
    progress(&format!(
        "sampling: {} samples × {} steps per model",
        args.samples, args.steps
    ));
    let float_den = denoiser(&args.float, &set, &schedule, &t_name)?;
    let cond = conditioning(&float, &float_den, args.samples, args.seed)?;
    let cond_ref: Vec<(&str, tfmqc_runtime::Tensor)> =
        cond.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let sample = |d: &Denoiser, path: &Path| -> Result<(Vec<f32>, [usize; 4]), Failure> {
        let x = d
            .sample(
                args.seed,
                args.steps,
                &cond_ref,
                args.samples,
                Sampler::Ddim,
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
    let (float_samples, dims) = sample(&float_den, &args.float)?;
    let trajectory = float_den.trajectory(args.steps);
    drop(float_den);
    let per_sample: usize = dims[1..].iter().product();
    let mut quant_samples = vec![];
    let mut psnr = vec![];
    for q in &quants {
        let d = denoiser(&q.path, &set, &schedule, &t_name)?;
        let (v, _) = sample(&d, &q.path)?;
        psnr.push(
            (0..dims[0])
                .map(|s| {
                    let r = s * per_sample..(s + 1) * per_sample;
                    metrics::psnr(&float_samples[r.clone()], &v[r])
                })
                .collect::<Vec<_>>(),
        );
        quant_samples.push(v);
    }

    // 4. Fréchet distance in the feature space.
    let mut fd: Option<(f64, Vec<f64>)> = None;
    match (&args.fd_features, &args.fd_ref) {
        (Some(model), Some(reference)) => {
            if args.samples < 2 {
                notes.push("Fréchet distance skipped: it needs --samples ≥ 2".into());
            } else {
                let mut all = vec![&float_samples];
                all.extend(quant_samples.iter());
                match frechet(model, reference, &args.fd_output, dims, &all)? {
                    Ok(v) => {
                        if args.samples < 256 {
                            notes.push(format!(
                                "Fréchet distance from {} samples: biased upwards at small M (models/README.md: 3.48 for the float digits model at M = 1024); compare the columns, not the absolute value",
                                args.samples
                            ));
                        }
                        fd = Some((v[0], v[1..].to_vec()));
                    }
                    Err(why) => notes.push(format!("Fréchet distance skipped: {why}")),
                }
            }
        }
        _ => notes.push(
            "Fréchet distance skipped: give --fd-features ONNX --fd-ref JSON (e.g. models/digits_features.onnx, models/digits_features_ref.json)".into(),
        ),
    }

    // The result.
    let sqnr_stats = |v: &[(i64, f64)]| {
        let db: Vec<f64> = v.iter().map(|x| x.1).collect();
        stats(&db)
    };
    let feature_summary = |errs: &[FeatureError]| {
        if errs.is_empty() {
            return Value::Null;
        }
        let cos: Vec<f64> = errs.iter().flat_map(|e| e.cosine.iter().copied()).collect();
        let mse: Vec<f64> = errs
            .iter()
            .flat_map(|e| e.rel_mse.iter().copied())
            .collect();
        json!({"cosine": stats(&cos), "rel_mse": stats(&mse)})
    };
    let quant_json: Vec<Value> = quants
        .iter()
        .enumerate()
        .map(|(k, q)| {
            json!({
                "file": q.path.display().to_string(),
                "label": q.label,
                "tfmqc": q.tfmqc,
                // How a tfmqc file was made (its `tfmqc.options` metadata), else null.
                "tfmqc_options": q.model.metadata_value(meta::OPTIONS)
                    .and_then(|o| serde_json::from_str::<Value>(o).ok()),
                "weight_check": q.weights,
                "temporal_features": {
                    "summary": feature_summary(&feature_errors[k]),
                    "missing": feature_missing[k],
                    "values": feature_errors[k].iter().map(|e| json!({
                        "name": e.name,
                        "cosine": e.cosine,
                        "rel_mse": e.rel_mse,
                    })).collect::<Vec<_>>(),
                },
                "step_sqnr_db": {
                    "summary": sqnr_stats(&step_sqnr[k]),
                    "per_step": step_sqnr[k].iter().map(|(t, db)| json!({"t": t, "db": db})).collect::<Vec<_>>(),
                },
                "sample_psnr_db": {
                    "summary": stats(&psnr[k]),
                    "per_sample": psnr[k],
                },
                "fd": fd.as_ref().map(|f| f.1[k]),
            })
        })
        .collect();
    let mut plots_json = Value::Null;
    if let Some(dir) = &args.plots {
        plots_json = write_plots(
            dir,
            &quants,
            &set,
            &feature_errors,
            &step_sqnr,
            &float_samples,
            &quant_samples,
            dims,
        )?;
    }
    let result = json!({
        "tool_version": env!("CARGO_PKG_VERSION"),
        "float": {
            "file": args.float.display().to_string(),
            "fd": fd.as_ref().map(|f| f.0),
        },
        "timestep_input": t_name,
        "timesteps": {"source": s_source, "values": set},
        "schedule": crate::report::schedule_json(&schedule),
        "steps": args.steps,
        "trajectory": trajectory,
        "samples": args.samples,
        "seed": args.seed,
        "stand_in_inputs": cal.stand_ins,
        "frontier": frontier,
        "fd_features": args.fd_features.as_ref().map(|p| p.display().to_string()),
        "quant": quant_json,
        "plots": plots_json,
        "notes": notes,
        "seconds": start.elapsed().as_secs_f64(),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result).expect("json"));
    } else {
        print!("{}", table(&result));
    }
    for n in &notes {
        eprintln!("note: {n}");
    }
    progress(&format!("done in {:.1} s", start.elapsed().as_secs_f64()));
    Ok(())
}

/// A denoiser for the runtime's sampler with S, the schedule and the time-step input
/// of this evaluation written into its metadata, so float and quantized models follow
/// the same trajectory even when a QUANT from another tool records nothing.
fn denoiser(
    path: &Path,
    set: &[i64],
    schedule: &tfmqc_runtime::Schedule,
    t_name: &str,
) -> Result<Denoiser, Failure> {
    let mut proto = read_proto(path).map_err(|e| runtime_fail(path, e))?;
    let joined: Vec<String> = set.iter().map(|t| t.to_string()).collect();
    let entries = [
        (meta::TIMESTEPS, joined.join(",")),
        (
            meta::SCHEDULE,
            crate::report::schedule_json(schedule).to_string(),
        ),
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

/// Seeded stand-ins for the conditioning inputs (as calibration makes them).
fn conditioning(
    float: &Model,
    d: &Denoiser,
    batch: usize,
    seed: u64,
) -> Result<Vec<(String, tfmqc_runtime::Tensor)>, Failure> {
    let mut rng = NoiseRng::new(seed ^ 0x5eed_c0de);
    let mut out = vec![];
    for name in d.conditioning_inputs() {
        let info = float
            .graph
            .inputs
            .iter()
            .find(|i| i.name == name)
            .ok_or_else(|| user_error(format!("no graph input '{name}'")))?;
        let t = stand_in(float, info, batch, &mut rng).map_err(fail)?;
        out.push((name.to_string(), to_tract(&t).map_err(fail)?));
    }
    Ok(out)
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

#[allow(clippy::too_many_arguments)]
fn write_plots(
    dir: &Path,
    quants: &[Quant],
    set: &[i64],
    feature_errors: &[Vec<FeatureError>],
    step_sqnr: &[Vec<(i64, f64)>],
    float_samples: &[f32],
    quant_samples: &[Vec<f32>],
    dims: [usize; 4],
) -> Result<Value, Failure> {
    std::fs::create_dir_all(dir).map_err(|e| user_error(format!("{}: {e}", dir.display())))?;
    let write = |name: &str, bytes: &[u8]| -> Result<String, Failure> {
        let p = dir.join(name);
        onnx::write_atomic(&p, bytes).map_err(fail)?;
        Ok(p.display().to_string())
    };
    let mut files = BTreeMap::new();
    let color = |k: usize| PALETTE[k % PALETTE.len()];
    if feature_errors.iter().any(|e| !e.is_empty()) {
        // Mean over the frontier values at each t (the JSON has each value).
        let mean_at = |errs: &[FeatureError], f: &dyn Fn(&FeatureError) -> &Vec<f64>| {
            set.iter()
                .enumerate()
                .map(|(i, &t)| {
                    let v: f64 = errs.iter().map(|e| f(e)[i]).sum::<f64>() / errs.len() as f64;
                    (t as f64, v)
                })
                .collect::<Vec<_>>()
        };
        let mut cos = vec![];
        let mut mse = vec![];
        for (k, (q, errs)) in quants.iter().zip(feature_errors).enumerate() {
            if errs.is_empty() {
                continue;
            }
            cos.push(Series {
                label: q.label.clone(),
                color: color(k),
                points: mean_at(errs, &|e| &e.cosine),
            });
            mse.push(Series {
                label: q.label.clone(),
                color: color(k),
                points: mean_at(errs, &|e| &e.rel_mse),
            });
        }
        let n_values = feature_errors.iter().map(|e| e.len()).max().unwrap_or(0);
        let fig = Figure {
            title: "Temporal features: quantized vs float".into(),
            note: Some(format!(
                "Mean over the {n_values} TIB frontier values (the temporal features) at each time step t in S. An exact table (tfmqc --tib lut) has cosine 1 and relative MSE 0, drawn on the bottom edge."
            )),
            panels: vec![
                Panel {
                    y_label: "cosine similarity".into(),
                    x_label: "time step t".into(),
                    log_y: false,
                    y_range: None,
                    series: cos,
                },
                Panel {
                    y_label: "relative MSE (log)".into(),
                    x_label: "time step t".into(),
                    log_y: true,
                    y_range: None,
                    series: mse,
                },
            ],
        };
        files.insert(
            "temporal_features_svg",
            write("temporal_features.svg", fig.svg().as_bytes())?,
        );
        files.insert(
            "temporal_features_png",
            write("temporal_features.png", &fig.png())?,
        );
    }
    let series: Vec<Series> = quants
        .iter()
        .zip(step_sqnr)
        .enumerate()
        .map(|(k, (q, s))| Series {
            label: q.label.clone(),
            color: color(k),
            points: s.iter().map(|&(t, db)| (t as f64, db)).collect(),
        })
        .collect();
    let fig = Figure {
        title: "Denoiser output SQNR per step".into(),
        note: Some("SQNR = 10 log10(sum y^2 / sum (y - yq)^2) of the noise prediction, on the inputs of float DDIM trajectories.".into()),
        panels: vec![Panel {
            y_label: "output SQNR (dB)".into(),
            x_label: "time step t".into(),
            log_y: false,
            y_range: None,
            series,
        }],
    };
    files.insert(
        "step_sqnr_svg",
        write("step_sqnr.svg", fig.svg().as_bytes())?,
    );
    files.insert("step_sqnr_png", write("step_sqnr.png", &fig.png())?);
    let labels: Vec<&str> = std::iter::once("float")
        .chain(quants.iter().map(|q| q.label.as_str()))
        .collect();
    let mut columns = vec![float_samples];
    columns.extend(quant_samples.iter().map(|v| v.as_slice()));
    files.insert(
        "samples_png",
        write("samples.png", &samples_grid(&columns, &labels, dims))?,
    );
    Ok(json!(files))
}

/// Columns float | QUANT... of the first GRID_ROWS samples, ×4, with a label on top of
/// each column; 3 channels as RGB, else the first channel in grey (as `tfmqc sample`).
fn samples_grid(columns: &[&[f32]], labels: &[&str], [n, c, h, w]: [usize; 4]) -> Vec<u8> {
    const SCALE: usize = 4;
    const GAP: usize = 6;
    const HEAD: usize = 20;
    let rows = n.min(GRID_ROWS);
    let cell_w = (w * SCALE).max(
        labels
            .iter()
            .map(|l| font::text_width(l, 1))
            .max()
            .unwrap_or(0)
            + 4,
    );
    let width = columns.len() * (cell_w + GAP) + GAP;
    let height = HEAD + rows * (h * SCALE + GAP) + GAP;
    let mut canvas = plot::Canvas {
        px: vec![255; width * height * 3],
        w: width,
        h: height,
    };
    let level = |v: f32| (((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round()) as u8;
    for (k, col) in columns.iter().enumerate() {
        let x0 = GAP + k * (cell_w + GAP);
        canvas.text(
            (x0 + cell_w / 2) as f64,
            (HEAD / 2) as f64,
            labels[k],
            1,
            1,
            false,
            [30, 30, 30],
        );
        let ox = x0 + (cell_w - w * SCALE) / 2;
        for s in 0..rows {
            let oy = HEAD + s * (h * SCALE + GAP);
            for y in 0..h * SCALE {
                for x in 0..w * SCALE {
                    let at = |ch: usize| col[((s * c + ch) * h + y / SCALE) * w + x / SCALE];
                    let rgb = if c == 3 {
                        [level(at(0)), level(at(1)), level(at(2))]
                    } else {
                        let g = level(at(0));
                        [g, g, g]
                    };
                    canvas.put((ox + x) as i64, (oy + y) as i64, rgb);
                }
            }
        }
    }
    plot::encode_png(&canvas.px, width, height)
}

fn fmt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(x) => format!("{x:.decimals$}"),
        None => "-".into(),
    }
}

/// The human table: one row per model.
fn table(r: &Value) -> String {
    let get = |v: &Value, path: &[&str]| -> Option<f64> {
        let mut cur = v;
        for p in path {
            cur = cur.get(p)?;
        }
        cur.as_f64()
    };
    let mut s = format!(
        "{:<34} {:>18} {:>15} {:>17} {:>8}\n",
        "model", "TF cosine mean/min", "step SQNR dB", "sample PSNR dB", "FD"
    );
    s.push_str(&format!(
        "{:<34} {:>18} {:>15} {:>17} {:>8}\n",
        "float",
        "-",
        "-",
        "-",
        fmt(get(r, &["float", "fd"]), 2)
    ));
    for q in r["quant"].as_array().into_iter().flatten() {
        let tf = &q["temporal_features"]["summary"]["cosine"];
        let tf = if tf.is_null() {
            "n/a".to_string()
        } else {
            format!(
                "{}/{}",
                fmt(get(tf, &["mean"]), 4),
                fmt(get(tf, &["min"]), 4)
            )
        };
        let sq = &q["step_sqnr_db"]["summary"];
        let ps = &q["sample_psnr_db"]["summary"];
        s.push_str(&format!(
            "{:<34} {:>18} {:>15} {:>17} {:>8}\n",
            q["label"].as_str().unwrap_or(""),
            tf,
            format!(
                "{}/{}",
                fmt(get(sq, &["mean"]), 1),
                fmt(get(sq, &["min"]), 1)
            ),
            format!(
                "{}/{}",
                fmt(get(ps, &["mean"]), 1),
                fmt(get(ps, &["min"]), 1)
            ),
            fmt(get(q, &["fd"]), 2)
        ));
    }
    s
}
