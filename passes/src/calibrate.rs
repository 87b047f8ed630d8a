//! calibrate: Finite Set Calibration. Runs the float model along DDIM trajectories of its
//! own noise schedule (or over recorded inputs) and keeps, for every activation that
//! `quantize` will quantize, an EMA of per-batch min/max (momentum 0.95) *per time step*,
//! plus the plain global min/max for the baseline. Statistics stream: memory grows with
//! the number of steps, not with the number of samples. One batch per step is kept as
//! evaluation records (reports, `--dump-calib`).

use std::collections::{BTreeMap, HashMap};

use tfmqc_runtime::engine::Optimize;
use tfmqc_runtime::NoiseRng;

use crate::budget::{fit_calibration, CalibrationPlan, MemoryNeed, Part};
use crate::error::{Error, Result};
use crate::exec::Runner;
use crate::ir::{DType, Dim, Model, Tensor, ValueInfo};
use crate::layer_inputs::{reconstructable_layers, record_picks, LayerColumns, LayerInput};
use crate::options::Reconstruct;
use crate::options::{timestep_set, Options};
use crate::pipeline::{Pass, PassContext};
use crate::targets::find_targets;

pub struct Calibrate;

/// EMA momentum of the reference (TFMQ-DM / Q-Diffusion).
pub const EMA_MOMENTUM: f32 = 0.95;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Range {
    pub min: f32,
    pub max: f32,
}

impl Range {
    fn ema(self, batch: Range) -> Range {
        let m = EMA_MOMENTUM;
        Range {
            min: m * self.min + (1.0 - m) * batch.min,
            max: m * self.max + (1.0 - m) * batch.max,
        }
    }
    fn union(self, o: Range) -> Range {
        Range {
            min: self.min.min(o.min),
            max: self.max.max(o.max),
        }
    }
}

/// What calibration learned.
#[derive(Clone, Debug, Default)]
pub struct Calibration {
    /// value → time step → EMA range.
    pub per_step: BTreeMap<String, BTreeMap<i64, Range>>,
    /// value → min/max over all calibration data.
    pub global: BTreeMap<String, Range>,
    /// Model inputs of the evaluation records (one batch per visited step).
    pub records: Vec<BTreeMap<String, Tensor>>,
    /// The time step of each record.
    pub record_steps: Vec<i64>,
    /// The float model's first output on each record, from the calibration runs (the
    /// reference of the quality report, which then need not run the float model again).
    pub record_outputs: Vec<Tensor>,
    /// Mean seconds of one calibration call.
    pub call_seconds: f64,
    /// Inputs fed with seeded stand-ins (no --calib file gave them).
    pub stand_ins: Vec<String>,
    /// The graph input carrying the sample and the time step.
    pub sample_input: String,
    pub timestep_input: String,
    pub batches: usize,
    /// Sampled inputs of the layers weight reconstruction will round (spilled to a
    /// temporary file), from the runs of the evaluation records; `None` when no
    /// reconstruction was asked for.
    pub layer_columns: Option<std::sync::Arc<LayerColumns>>,
    /// How the calibration budget cut the trajectories, when it did.
    pub budget_note: Option<String>,
}

impl Pass for Calibrate {
    fn name(&self) -> &'static str {
        "calibrate"
    }
    fn summary(&self) -> &'static str {
        "Finite Set Calibration: per-step activation ranges along DDIM trajectories"
    }
    fn requires(&self) -> &'static [&'static str] {
        &["detect-tib"]
    }
    fn run(&self, cx: &mut PassContext) -> Result<()> {
        let tib = cx.tib.as_ref().expect("checked by requires");
        let targets = find_targets(&cx.model.graph, &cx.options.keep_float);
        let values = targets.activation_values();
        // Reconstruction reads the layers' inputs from these same runs.
        let reconstructs = cx.options.reconstruct != Reconstruct::None
            && !cx.options.baseline_minmax
            && cx.options.weight_bits < 32;
        let layers = if reconstructs {
            reconstructable_layers(&cx.model, &targets.quantized)
        } else {
            vec![]
        };
        let cal = calibrate(
            &cx.model,
            cx.options,
            &tib.timestep_input,
            &values,
            layers,
            cx.progress,
        )?;
        cx.note(format!(
            "{} activations observed over {} batches, {} steps; {} evaluation records",
            values.len(),
            cal.batches,
            cal.per_step.values().next().map(|m| m.len()).unwrap_or(0),
            cal.records.len()
        ));
        if let Some(n) = &cal.budget_note {
            cx.note(n.clone());
        }
        if let Some(c) = &cal.layer_columns {
            cx.note(format!(
                "inputs of {} layers sampled for reconstruction ({} columns per record, {:.1} MB spilled)",
                c.layers().len(),
                c.columns_per_record(),
                c.spilled_bytes() as f64 / 1e6
            ));
        }
        if !cal.stand_ins.is_empty() {
            cx.note(format!(
                "WARNING: no calibration data for {} — seeded random stand-ins were used; give real conditioning with --calib FILE",
                cal.stand_ins.join(", ")
            ));
        }
        cx.calibration = Some(cal);
        Ok(())
    }
}

/// The float input holding the noisy sample: same spatial size as the first output.
fn find_sample_input(model: &Model, t: &str) -> Result<ValueInfo> {
    let g = &model.graph;
    let out = g.outputs.first().and_then(|o| o.shape.clone());
    let candidates: Vec<&ValueInfo> = g
        .inputs
        .iter()
        .filter(|i| {
            i.name != t
                && i.dtype.is_some_and(|d| d.is_float())
                && i.shape.as_ref().is_some_and(|s| s.len() >= 3)
        })
        .collect();
    let fits = |i: &&&ValueInfo| match (&i.shape, &out) {
        (Some(s), Some(o)) => s.len() == o.len() && s[2..] == o[2..],
        _ => false,
    };
    candidates
        .iter()
        .find(fits)
        .or(candidates.first())
        .map(|i| (*i).clone())
        .ok_or_else(|| {
            Error::pass(
                "calibrate",
                "no float input of rank ≥ 3 to hold the noisy sample",
            )
        })
}

fn batch_of(info: &ValueInfo, wanted: usize) -> usize {
    match info.shape.as_deref() {
        Some([Dim::Known(b), ..]) => *b as usize,
        _ => wanted,
    }
}

fn concrete(info: &ValueInfo, batch: usize) -> Result<Vec<usize>> {
    info.shape
        .as_ref()
        .ok_or_else(|| {
            Error::pass(
                "calibrate",
                format!("input '{}' has no known shape", info.name),
            )
        })?
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Dim::Known(v) => Ok(*v as usize),
            _ if i == 0 => Ok(batch),
            _ => Err(Error::pass(
                "calibrate",
                format!(
                    "input '{}' has a free dimension {i}: give --calib data",
                    info.name
                ),
            )),
        })
        .collect()
}

/// The time step as the model takes it: its dtype, scalar or one per sample.
pub fn timestep_tensor(info: &ValueInfo, batch: usize, t: i64) -> Result<Tensor> {
    let shape = match info.shape.as_deref() {
        Some([]) => vec![],
        Some([Dim::Known(k)]) => vec![*k as usize],
        _ => vec![batch],
    };
    let n = shape.iter().product();
    Ok(match info.dtype {
        Some(DType::I64) => Tensor::from_vec(shape, &vec![t; n]),
        Some(DType::I32) => Tensor::from_vec(shape, &vec![t as i32; n]),
        Some(DType::F32) => Tensor::from_vec(shape, &vec![t as f32; n]),
        other => {
            return Err(Error::pass(
                "calibrate",
                format!("time step of type {other:?} is not supported"),
            ))
        }
    })
}

/// A seeded stand-in for a conditioning input: N(0,1) floats, or integers in the range
/// of the table they index (class labels), else zeros. Public for `tfmqc eval`, which
/// needs the same stand-ins to sample conditional models.
pub fn stand_in(
    model: &Model,
    info: &ValueInfo,
    batch: usize,
    rng: &mut NoiseRng,
) -> Result<Tensor> {
    let shape = concrete(info, batch)?;
    let n: usize = shape.iter().product();
    Ok(match info.dtype {
        Some(DType::F32) => Tensor::from_vec(shape, &rng.normal_vec(n)),
        Some(DType::I64) | Some(DType::I32) => {
            let g = &model.graph;
            let rows = g
                .consumers(&info.name)
                .into_iter()
                .find(|&(ix, slot)| g.node(ix).is_onnx_op("Gather") && slot == 1)
                .and_then(|(ix, _)| g.initializers.get(&g.node(ix).inputs[0]))
                .map(|t| t.shape[0] as u64)
                .unwrap_or(1);
            let v: Vec<i64> = (0..n).map(|_| rng.below(rows) as i64).collect();
            if info.dtype == Some(DType::I32) {
                Tensor::from_vec(shape, &v.iter().map(|&x| x as i32).collect::<Vec<_>>())
            } else {
                Tensor::from_vec(shape, &v)
            }
        }
        other => {
            return Err(Error::pass(
                "calibrate",
                format!("no stand-in for input '{}' of type {other:?}", info.name),
            ))
        }
    })
}

/// Checks a user-given tensor against the model input it feeds.
fn check_given(name: &str, t: &Tensor, info: &ValueInfo, file: &str) -> Result<()> {
    let bad = |why: String| Error::invalid(format!("{file}: tensor '{name}': {why}"));
    if let Some(d) = info.dtype {
        if d != t.dtype {
            return Err(bad(format!("is {} but the model input is {d}", t.dtype)));
        }
    }
    if let Some(shape) = &info.shape {
        let ok = shape.len() == t.shape.len()
            && shape
                .iter()
                .zip(&t.shape)
                .all(|(d, &v)| !matches!(d, Dim::Known(k) if *k as usize != v));
        if !ok {
            return Err(bad(format!(
                "has shape {:?}, the model input is {}",
                t.shape,
                info.type_string()
            )));
        }
    }
    if t.dtype.is_float() && t.to_f64_lossy()?.iter().any(|v| !v.is_finite()) {
        return Err(bad("holds NaN or Inf".into()));
    }
    Ok(())
}

/// Samples kept per evaluation record when the batch is free: evaluation cost stays small
/// whatever the calibration batch.
const RECORD_SAMPLES: usize = 2;

/// The inputs of one call, cut to `RECORD_SAMPLES` samples when the batch is free.
fn evaluation_record(
    inputs: HashMap<String, Tensor>,
    batch: usize,
    free_batch: bool,
) -> BTreeMap<String, Tensor> {
    let keep = RECORD_SAMPLES.min(batch);
    inputs
        .into_iter()
        .map(|(k, t)| {
            if !free_batch || t.shape.first() != Some(&batch) || keep == batch {
                return (k, t);
            }
            let row = t.data.len() / batch;
            let mut shape = t.shape.clone();
            shape[0] = keep;
            let cut = Tensor::from_raw(t.dtype, shape, t.data[..keep * row].to_vec())
                .expect("rows of a valid tensor");
            (k, cut)
        })
        .collect()
}

/// One run's graph outputs and the range of every observed value.
struct ObservedRun {
    outputs: Vec<Tensor>,
    outputs_ranges: Vec<Range>,
}

/// Layer inputs to sample from one run: the store, the record's salt, and the samples of
/// the batch its evaluation record keeps (`(keep, batch)`: the first `keep` of `batch`).
struct ColumnTap<'a> {
    store: &'a LayerColumns,
    salt: u64,
    keep: (usize, usize),
}

/// Runs `inputs` and takes the min/max of each of `values` while tract computes it (and
/// samples layer inputs into `tap`).
fn observe_ranges(
    runner: &Runner,
    values: &[String],
    inputs: &HashMap<String, Tensor>,
    t: i64,
    tap: Option<ColumnTap>,
) -> Result<ObservedRun> {
    let mut ranges: Vec<Option<Range>> = vec![None; values.len()];
    let outputs = runner.run_observed(inputs, &mut |k, tensor| {
        let name = &values[k];
        let v = crate::exec::f32_values(tensor, name)?;
        if let Some(tap) = &tap {
            // The rows of the kept samples (batch-major values), as if the model had run
            // on the evaluation record alone.
            let (keep, batch) = tap.keep;
            let mut shape = tensor.shape().to_vec();
            let mut part = v;
            if keep < batch && shape.first().is_some_and(|&r| r % batch == 0) {
                let rows = shape[0] / batch * keep;
                part = &v[..v.len() / shape[0] * rows];
                shape[0] = rows;
            }
            tap.store.observe(name, &shape, part, tap.salt)?;
        }
        let batch = Range {
            min: v.iter().copied().fold(f32::INFINITY, f32::min),
            max: v.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        };
        if !batch.min.is_finite() || !batch.max.is_finite() {
            return Err(Error::pass(
                "calibrate",
                format!("activation '{name}' is not finite at t = {t}"),
            ));
        }
        ranges[k] = Some(batch);
        Ok(())
    })?;
    let outputs_ranges = ranges
        .into_iter()
        .zip(values)
        .map(|(r, name)| {
            r.ok_or_else(|| {
                Error::pass(
                    "calibrate",
                    format!("activation '{name}' was not computed by the engine"),
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ObservedRun {
        outputs,
        outputs_ranges,
    })
}

/// Observes `values` (activation names) along calibration trajectories.
pub fn calibrate(
    model: &Model,
    options: &Options,
    t_name: &str,
    values: &[String],
    layers: Vec<LayerInput>,
    progress: &dyn Fn(&str),
) -> Result<Calibration> {
    let g = &model.graph;
    let set = timestep_set(model, options)?;
    let schedule = options.schedule(model)?;
    let t_info = g
        .inputs
        .iter()
        .find(|i| i.name == t_name)
        .cloned()
        .expect("detected input");
    let sample = find_sample_input(model, t_name)?;
    let out_info = g.outputs[0].clone();

    // The prediction is the graph output; the activations are observed while tract
    // runs, each folded into its range as soon as it is computed (an SD-class UNet's
    // attention scores alone would not fit in memory all at once).
    let batch_guess = batch_of(&sample, options.calib_batch.min(options.calib_samples));
    crate::budget::check_memory(
        &MemoryNeed {
            phase: "calibrate",
            parts: vec![
                Part {
                    what: "float model in tract",
                    bytes: crate::budget::initializer_bytes(model),
                },
                Part {
                    what: "activations of one call",
                    bytes: crate::budget::activation_peak_bytes(model, batch_guess),
                },
            ],
            lower_with: "--calib-batch 1 (models with a free batch size) or an export at a smaller sample size",
        },
        options.max_memory,
    )?;
    progress("calibrate: planning the float model in tract");
    let runner = Runner::observing(model, values, Optimize::Full)?;
    let mut cal = Calibration {
        sample_input: sample.name.clone(),
        timestep_input: t_name.to_string(),
        ..Default::default()
    };
    let observe = |cal: &mut Calibration,
                   t: i64,
                   inputs: &HashMap<String, Tensor>,
                   tap: Option<ColumnTap>| {
        let batch = observe_ranges(&runner, values, inputs, t, tap)?;
        for (name, batch) in values.iter().zip(batch.outputs_ranges) {
            let steps = cal.per_step.entry(name.clone()).or_default();
            let r = steps.get(&t).map(|r| r.ema(batch)).unwrap_or(batch);
            steps.insert(t, r);
            let gl = cal
                .global
                .get(name)
                .map(|r| r.union(batch))
                .unwrap_or(batch);
            cal.global.insert(name.clone(), gl);
        }
        Ok::<Vec<Tensor>, Error>(batch.outputs)
    };

    let given: BTreeMap<String, Tensor> = match &options.calib {
        Some(p) => crate::tensor_file::read_safetensors(p)?,
        None => BTreeMap::new(),
    };
    let file = options
        .calib
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();

    // Recorded model calls (`NNNNN/input` keys, as --dump-calib writes): no generation.
    if given.keys().any(|k| k.contains('/')) {
        let mut records: BTreeMap<String, BTreeMap<String, Tensor>> = BTreeMap::new();
        for (k, t) in given {
            let (rec, name) = k.split_once('/').expect("has /");
            records
                .entry(rec.to_string())
                .or_default()
                .insert(name.to_string(), t);
        }
        let picks = record_picks(records.len());
        let store = match layers.is_empty() {
            true => None,
            false => Some(LayerColumns::new(layers, picks.iter().flatten().count())?),
        };
        let clock = std::time::Instant::now();
        for ((rec, inputs), pick) in records.into_iter().zip(picks) {
            for info in &g.inputs {
                let t = inputs.get(&info.name).ok_or_else(|| {
                    Error::invalid(format!("{file}: record {rec} lacks input '{}'", info.name))
                })?;
                check_given(&format!("{rec}/{}", info.name), t, info, &file)?;
            }
            let step = inputs[t_name].to_i64_vec()?.first().copied().unwrap_or(0);
            if !set.contains(&step) {
                return Err(Error::invalid(format!(
                    "{file}: record {rec} has t = {step}, outside the time-step set"
                )));
            }
            progress(&format!("calibrate: record {rec}"));
            let tap = store.as_ref().zip(pick).map(|(store, salt)| ColumnTap {
                store,
                salt,
                keep: (1, 1),
            });
            let outs = observe(&mut cal, step, &inputs.clone().into_iter().collect(), tap)?;
            cal.record_outputs.extend(outs.into_iter().next());
            cal.records.push(inputs);
            cal.record_steps.push(step);
            cal.batches += 1;
        }
        cal.call_seconds = clock.elapsed().as_secs_f64() / cal.batches.max(1) as f64;
        cal.layer_columns = store.map(std::sync::Arc::new);
        return Ok(cal);
    }
    for (k, t) in &given {
        let info = g.inputs.iter().find(|i| &i.name == k).ok_or_else(|| {
            Error::invalid(format!(
                "{file}: tensor '{k}' is not an input of the model (inputs: {})",
                g.inputs
                    .iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        if k == t_name || *k == sample.name {
            return Err(Error::invalid(format!(
                "{file}: '{k}' alone cannot drive calibration; give recorded calls as NNNNN/{k} keys (the --dump-calib format) or only conditioning inputs"
            )));
        }
        check_given(k, t, info, &file)?;
    }

    // Generated trajectories: DDIM over `calib_steps` steps taken evenly from S.
    let mut traj = tfmqc_runtime::schedule::trajectory(&set, options.calib_steps);
    let batch = batch_guess;
    let free_batch = !matches!(sample.shape.as_deref(), Some([Dim::Known(_), ..]));
    let mut batches = options.calib_samples.div_ceil(batch);
    let sample_shape = concrete(&sample, batch)?;
    let per_sample: usize = sample_shape[1..].iter().product();
    // Layer inputs come from the first batch's runs, cut to its evaluation records.
    let mut picks = record_picks(traj.len());
    let store = match layers.is_empty() {
        true => None,
        false => Some(LayerColumns::new(layers, picks.iter().flatten().count())?),
    };
    let keep = if free_batch {
        (RECORD_SAMPLES.min(batch), batch)
    } else {
        (batch, batch)
    };
    let clock = std::time::Instant::now();
    let mut calls = 0usize;
    let mut b = 0;
    while b < batches {
        let mut rng = NoiseRng::new(options.seed.wrapping_mul(1_000_003).wrapping_add(b as u64));
        let mut x = rng.normal_vec(batch * per_sample);
        let mut fixed: HashMap<String, Tensor> = HashMap::new();
        for info in g
            .inputs
            .iter()
            .filter(|i| i.name != t_name && i.name != sample.name)
        {
            let t = match given.get(&info.name) {
                Some(t) if t.shape.first() == Some(&batch) => t.clone(),
                Some(t) => {
                    // Rows b·batch.. of a larger file, cycling.
                    let rows = t.shape.first().copied().unwrap_or(1).max(1);
                    let row_bytes = t.data.len() / rows;
                    let mut data = Vec::with_capacity(batch * row_bytes);
                    for r in 0..batch {
                        let i = (b * batch + r) % rows;
                        data.extend_from_slice(&t.data[i * row_bytes..(i + 1) * row_bytes]);
                    }
                    let mut shape = t.shape.clone();
                    shape[0] = batch;
                    Tensor::from_raw(t.dtype, shape, data)?
                }
                None => {
                    if b == 0 {
                        cal.stand_ins.push(info.name.clone());
                    }
                    stand_in(model, info, batch, &mut rng)?
                }
            };
            fixed.insert(info.name.clone(), t);
        }
        let mut k = 0;
        while k < traj.len() {
            let t = traj[k];
            let left = (batches - b) * traj.len() - k;
            let eta = match calls {
                0 => String::new(),
                n => format!(
                    ", about {} left",
                    crate::budget::human_duration(
                        clock.elapsed().as_secs_f64() / n as f64 * left as f64
                    )
                ),
            };
            progress(&format!(
                "calibrate: trajectory batch {}/{batches}, step {}/{} (t = {t}){eta}",
                b + 1,
                k + 1,
                traj.len()
            ));
            let mut inputs = fixed.clone();
            inputs.insert(
                sample.name.clone(),
                Tensor::from_vec(sample_shape.clone(), &x),
            );
            inputs.insert(t_name.to_string(), timestep_tensor(&t_info, batch, t)?);
            let tap = match (b, &store, picks[k]) {
                (0, Some(store), Some(salt)) => Some(ColumnTap { store, salt, keep }),
                _ => None,
            };
            let outs = observe(&mut cal, t, &inputs, tap)?;
            calls += 1;
            if calls == 1 && options.calib_adaptive {
                // The first call tells what a call costs: fit the rest to the budget.
                let call_s = clock.elapsed().as_secs_f64();
                let wanted = CalibrationPlan {
                    batches,
                    steps: traj.len(),
                };
                let fit = fit_calibration(wanted, call_s, options.calib_budget_s);
                if fit != wanted {
                    // The first step (the largest t of S) is shared by every trajectory.
                    traj = tfmqc_runtime::schedule::trajectory(&set, fit.steps);
                    picks = record_picks(traj.len());
                    batches = fit.batches;
                    cal.budget_note = Some(format!(
                        "one call takes {}: {} trajectory batch(es) × {} steps fit --calib-budget {} (asked: {} × {}); give --calib-samples/--calib-steps to choose yourself",
                        crate::budget::human_duration(call_s),
                        fit.batches,
                        fit.steps,
                        crate::budget::human_duration(options.calib_budget_s),
                        wanted.batches,
                        wanted.steps
                    ));
                }
            }
            if b == 0 {
                cal.records
                    .push(evaluation_record(inputs, batch, free_batch));
                cal.record_steps.push(t);
                let prediction = std::iter::once((out_info.name.clone(), outs[0].clone()));
                let cut = evaluation_record(prediction.collect(), batch, free_batch);
                cal.record_outputs.extend(cut.into_values());
            }
            // The prediction may carry more channels (learned variance): ε comes first.
            let pred = outs[0].to_f32_vec()?;
            let out_per_sample = pred.len() / batch;
            if out_per_sample < per_sample || !out_per_sample.is_multiple_of(per_sample) {
                return Err(Error::pass(
                    "calibrate",
                    format!(
                        "output '{}' ({:?}) does not hold a noise prediction for the sample",
                        out_info.name, outs[0].shape
                    ),
                ));
            }
            let eps: Vec<f32> = (0..batch)
                .flat_map(|s| {
                    pred[s * out_per_sample..s * out_per_sample + per_sample]
                        .iter()
                        .copied()
                })
                .collect();
            schedule.ddim_step(
                &mut x,
                &eps,
                t as usize,
                traj.get(k + 1).map(|&p| p as usize),
            );
            k += 1;
        }
        cal.batches += 1;
        b += 1;
    }
    cal.call_seconds = clock.elapsed().as_secs_f64() / calls.max(1) as f64;
    cal.layer_columns = store.map(std::sync::Arc::new);
    Ok(cal)
}
