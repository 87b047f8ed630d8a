//! calibrate: Finite Set Calibration. Runs the float model along seeded trajectories of
//! the deployment sampler (`trajectory`: the runtime's sampler under the scheduler
//! configuration, classifier-free guidance included), or over recorded calls, and keeps,
//! for every activation that
//! `quantize` will quantize, an EMA of per-batch min/max (momentum 0.95) *per time step*,
//! plus the plain global min/max for the baseline. Statistics stream: memory grows with
//! the number of steps, not with the number of samples. One batch per step is kept as
//! evaluation records (reports, `--dump-calib`).

use std::collections::HashMap;

use tfmqc_runtime::engine::Optimize;

use crate::analysis::budget::{fit_calibration, CalibrationPlan, MemoryNeed, Part};
use crate::analysis::layer_inputs::{
    reconstructable_layers, record_picks, LayerColumns, LayerInput,
};
use crate::analysis::targets::find_targets;
use crate::analysis::trajectory::{find_sample_input, recorded_calls, Call, Given, Plan};
pub use crate::analysis::trajectory::{stand_in, timestep_tensor};
use crate::error::{Error, Result};
use crate::ir::exec::Runner;
use crate::ir::{Dim, Model, Tensor, ValueInfo};
use crate::options::Reconstruct;
use crate::options::{timestep_set, Options};
use crate::passes::{Analysis, Pass, PassContext};

pub use crate::analysis::calibration::{Calibration, Range, EMA_MOMENTUM};

pub struct Calibrate;

impl Pass for Calibrate {
    fn name(&self) -> &'static str {
        "calibrate"
    }
    fn summary(&self) -> &'static str {
        "Finite Set Calibration: per-step activation ranges along the deployment sampler's trajectories"
    }
    fn requires(&self, _options: &Options) -> Vec<Analysis> {
        vec![Analysis::Tib]
    }
    fn run(&self, cx: &mut PassContext) -> Result<()> {
        let tib = cx.tib()?;
        let targets = find_targets(&cx.model.graph, &cx.options.keep_float);
        let mut values = targets.activation_values();
        // The outputs of quantized Convs too: `--output-qdq` may quantize them.
        for v in crate::analysis::targets::output_qdq_values(&cx.model.graph, cx.options, &targets)
        {
            if !values.contains(&v) {
                values.push(v);
            }
        }
        // Reconstruction reads the layers' inputs from these same runs.
        let reconstructs = cx.options.reconstruct != Reconstruct::None
            && !cx.options.baseline_minmax
            && cx.options.weight_bits < 32;
        let layers = if reconstructs {
            reconstructable_layers(&cx.model, &targets.quantized)
        } else {
            vec![]
        };
        let cal = calibrate_driven(
            &cx.model,
            cx.par_driver.as_ref(),
            cx.options,
            &tib.timestep_input,
            &values,
            layers,
            cx.progress,
        )?;
        cx.note(format!(
            "{} activations observed over {} batches{}, {} steps; {} evaluation records",
            values.len(),
            cal.batches,
            if cal.trajectories.is_empty() {
                " of recorded calls".to_string()
            } else {
                format!(" ({})", cal.trajectories)
            },
            cal.per_step.values().next().map(|m| m.len()).unwrap_or(0),
            cal.records.len()
        ));
        if let Some(n) = &cal.budget_note {
            cx.note(n.clone());
        }
        for n in &cal.notes {
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
    /// The call's time step.
    t: i64,
    keep: (usize, usize),
}

impl ColumnTap<'_> {
    /// Samples `value`'s columns: the rows of the kept samples (batch-major values), as
    /// if the model had run on the evaluation record alone.
    fn observe(&self, name: &str, shape: &[usize], v: &[f32]) -> Result<()> {
        let (keep, batch) = self.keep;
        let mut shape = shape.to_vec();
        let mut part = v;
        if keep < batch && shape.first().is_some_and(|&r| r % batch == 0) {
            let rows = shape[0] / batch * keep;
            part = &v[..v.len() / shape[0] * rows];
            shape[0] = rows;
        }
        self.store.observe(name, &shape, part, self.salt, self.t)
    }
}

/// PAR: the driver (the quantized model) run as a QDQ graph in tract at the calls whose
/// layer inputs are sampled, its inputs of the same layers sampled at the same positions
/// into a store of their own. What is sampled is each layer's activation *before* its
/// quantizer (the float model's value of the same name, which the QDQ graph keeps as the
/// input of its Clip / QuantizeLinear): PAR chooses this round's activation scales on
/// them and quantizes them itself ([`LayerColumns::aligned`]). A layer whose activation
/// the driver lacks under that name is not sampled (it keeps the float inputs'
/// reconstruction).
struct DriverColumns {
    runner: Runner,
    values: Vec<String>,
    store: LayerColumns,
}

impl DriverColumns {
    /// `None` when the driver has none of the layers.
    fn new(driver: &Model, layers: &[LayerInput], records: usize) -> Result<Option<Self>> {
        let g = &driver.graph;
        let produced: std::collections::HashSet<&str> = g
            .node_indices()
            .flat_map(|ix| g.node(ix).outputs.iter().map(String::as_str))
            .chain(g.inputs.iter().map(|i| i.name.as_str()))
            .collect();
        let mut values: Vec<String> = vec![];
        let quant_layers: Vec<LayerInput> = layers
            .iter()
            .map(|l| {
                let mut q = l.clone();
                match produced.contains(l.value.as_str()) {
                    true => {
                        if !values.contains(&l.value) {
                            values.push(l.value.clone());
                        }
                    }
                    // Never observed: that layer keeps the float inputs' reconstruction.
                    false => q.value = format!("{}\u{0}not in the driver", l.node),
                }
                q
            })
            .collect();
        if values.is_empty() {
            return Ok(None);
        }
        Ok(Some(DriverColumns {
            runner: Runner::observing(driver, &values, Optimize::Full)?,
            store: LayerColumns::new(quant_layers, records)?,
            values,
        }))
    }

    /// Runs the driver's QDQ graph on one call and samples its layer inputs as `tap`
    /// samples the observed model's.
    fn observe(
        &self,
        inputs: &HashMap<String, Tensor>,
        salt: u64,
        t: i64,
        keep: (usize, usize),
    ) -> Result<()> {
        let tap = ColumnTap {
            store: &self.store,
            salt,
            t,
            keep,
        };
        self.runner.run_observed(inputs, &mut |k, tensor| {
            let name = &self.values[k];
            tap.observe(
                name,
                tensor.shape(),
                crate::ir::exec::f32_values(tensor, name)?,
            )
        })?;
        Ok(())
    }
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
        let v = crate::ir::exec::f32_values(tensor, name)?;
        if let Some(tap) = &tap {
            tap.observe(name, tensor.shape(), v)?;
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

/// The float model planned in tract with `values` observed: each run folds the values'
/// ranges into the calibration.
struct Observer<'a> {
    runner: Runner,
    values: &'a [String],
}

impl Observer<'_> {
    /// Runs one call at step `t`, folds each value's range into `cal` (an EMA and a union
    /// per step, the union over all steps), and returns the graph outputs.
    fn observe(
        &self,
        cal: &mut Calibration,
        t: i64,
        inputs: &HashMap<String, Tensor>,
        tap: Option<ColumnTap>,
    ) -> Result<Vec<Tensor>> {
        let batch = observe_ranges(&self.runner, self.values, inputs, t, tap)?;
        for (name, batch) in self.values.iter().zip(batch.outputs_ranges) {
            let steps = cal.per_step.entry(name.clone()).or_default();
            let r = steps.get(&t).map(|r| r.ema(batch)).unwrap_or(batch);
            steps.insert(t, r);
            let union = cal.per_step_union.entry(name.clone()).or_default();
            let u = union.get(&t).map(|r| r.union(batch)).unwrap_or(batch);
            union.insert(t, u);
            let gl = cal
                .global
                .get(name)
                .map(|r| r.union(batch))
                .unwrap_or(batch);
            cal.global.insert(name.clone(), gl);
        }
        Ok(batch.outputs)
    }
}

/// Stops before tract plans the model when the float weights and one call's activations
/// do not fit `--max-memory` (the batch from the sample input, else the options').
fn check_calibration_memory(model: &Model, options: &Options, sample: &ValueInfo) -> Result<()> {
    let batch_guess = match sample.shape.as_deref() {
        Some([Dim::Known(b), ..]) => *b as usize,
        _ => {
            options.calib_batch.min(options.calib_samples)
                * if options.guidance_scale.is_some() {
                    2
                } else {
                    1
                }
        }
    };
    crate::analysis::budget::check_memory(
        &MemoryNeed {
            phase: "calibrate",
            parts: vec![
                Part {
                    what: "float model in tract",
                    bytes: crate::analysis::budget::initializer_bytes(model),
                },
                Part {
                    what: "activations of one call",
                    bytes: crate::analysis::budget::activation_peak_bytes(model, batch_guess),
                },
            ],
            lower_with: "--calib-batch 1 (models with a free batch size) or an export at a smaller sample size",
        },
        options.max_memory,
    )
}

/// Calibration over recorded calls (`NNNNN/<input>` keys, or inputs stacked by name):
/// every call is observed and kept as an evaluation record; nothing is generated.
fn calibrate_recorded(
    observer: &Observer,
    mut cal: Calibration,
    calls: Vec<Call>,
    layers: Vec<LayerInput>,
    progress: &dyn Fn(&str),
) -> Result<Calibration> {
    let picks = record_picks(calls.len());
    let store = match layers.is_empty() {
        true => None,
        false => Some(LayerColumns::new(layers, picks.iter().flatten().count())?),
    };
    let clock = std::time::Instant::now();
    let work = crate::analysis::budget::WorkClock::start();
    let total = calls.len();
    for (call, pick) in calls.into_iter().zip(picks) {
        progress(&format!(
            "calibrate: recorded call {}/{total}",
            call.batch + 1
        ));
        let tap = store.as_ref().zip(pick).map(|(store, salt)| ColumnTap {
            store,
            salt,
            t: call.t,
            keep: call.kept_prefix(),
        });
        let outs = observer.observe(&mut cal, call.t, &call.inputs, tap)?;
        cal.record_outputs.extend(outs.into_iter().next());
        cal.records.push(call.record()?);
        cal.record_steps.push(call.t);
        cal.batches += 1;
    }
    cal.call_seconds = clock.elapsed().as_secs_f64() / cal.batches.max(1) as f64;
    cal.call_work_seconds = work.seconds() / cal.batches.max(1) as f64;
    cal.layer_columns = store.map(std::sync::Arc::new);
    Ok(cal)
}

/// `--calib-adaptive`: one probe call tells what a call costs; the trajectory batches
/// and the longest step count are cut to fit `--calib-budget` before they run (said in
/// the calibration's budget note). Returns the batches to run.
fn fit_to_budget(
    observer: &Observer,
    cal: &mut Calibration,
    plan: &mut Plan,
    model: &Model,
    options: &Options,
    set: &[i64],
    batches: usize,
) -> Result<usize> {
    let probe = plan.first_call(model, options.seed)?;
    let clock = std::time::Instant::now();
    observe_ranges(
        &observer.runner,
        observer.values,
        &probe.inputs,
        probe.t,
        None,
    )?;
    let call_s = clock.elapsed().as_secs_f64();
    let longest = plan.step_counts[0];
    let wanted = CalibrationPlan {
        batches,
        steps: longest,
    };
    let fit = fit_calibration(wanted, call_s, options.calib_budget_s);
    if fit == wanted {
        return Ok(batches);
    }
    if fit.steps < longest {
        plan.step_counts = options.step_counts_within(model, set, fit.steps)?;
    }
    cal.budget_note = Some(format!(
        "one call takes {}: {} trajectory batch(es) × {} steps fit --calib-budget {} (asked: {} × {}); give --calib-samples/--calib-steps to choose yourself",
        crate::analysis::budget::human_duration(call_s),
        fit.batches,
        step_counts_text(plan),
        crate::analysis::budget::human_duration(options.calib_budget_s),
        wanted.batches,
        wanted.steps
    ));
    Ok(fit.batches)
}

/// "50, 20": the step counts of the planned trajectories.
fn step_counts_text(plan: &Plan) -> String {
    plan.step_counts
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// "ddim at 50, 20 steps, guidance 7.5": the trajectories calibration ran (the report's
/// line).
fn trajectories_text(plan: &Plan) -> String {
    format!(
        "{} at {} steps{}",
        plan.sampler,
        step_counts_text(plan),
        plan.guidance
            .map(|g| format!(", guidance {g}"))
            .unwrap_or_default()
    )
}

/// Calibration along generated trajectories of the deployment sampler; batch b runs the
/// b-th step count (cycling, largest first), so the evaluation records of batch 0 hold
/// every step of the longest trajectory, and the layer inputs come from its runs. With
/// a `driver` (PAR), its predictions move the sampler instead of the observed model's.
// The model, its options and S, as `calibrate` was given them; a struct for them would
// only carry them one call further.
#[allow(clippy::too_many_arguments)]
fn calibrate_generated(
    observer: &Observer,
    driver: Option<&Model>,
    mut cal: Calibration,
    mut plan: Plan,
    model: &Model,
    options: &Options,
    set: &[i64],
    layers: Vec<LayerInput>,
    progress: &dyn Fn(&str),
) -> Result<Calibration> {
    cal.stand_ins = plan.stand_ins.clone();
    cal.notes = plan.notes.clone();
    let mut batches = options
        .calib_samples
        .div_ceil(plan.images)
        .max(plan.step_counts.len().min(options.calib_samples));
    if options.calib_adaptive {
        batches = fit_to_budget(observer, &mut cal, &mut plan, model, options, set, batches)?;
    }
    cal.trajectories = trajectories_text(&plan);
    // Layer inputs come from the first batch's runs, cut to its evaluation records.
    let picks = record_picks(plan.step_counts[0]);
    let store = match layers.is_empty() {
        true => None,
        false => Some(LayerColumns::new(layers, picks.iter().flatten().count())?),
    };
    let driver_columns = match (driver, &store) {
        (Some(d), Some(store)) => {
            DriverColumns::new(d, store.layers(), picks.iter().flatten().count())?
        }
        _ => None,
    };
    let driver = driver
        .map(|d| Runner::int8(d, Some(&[d.graph.outputs[0].name.clone()]), Optimize::Full))
        .transpose()?;
    let clock = std::time::Instant::now();
    let work = crate::analysis::budget::WorkClock::start();
    let mut calls = 0usize;
    // The budget is checked again between batches: one call's time (the probe) is a
    // noisy estimate on a busy machine (SD-1.5 at latent 64 once took 1836 s against a
    // 1200 s budget).
    let budget = options.calib_adaptive.then_some(options.calib_budget_s);
    let ran = plan.run(
        model,
        batches,
        options.seed,
        budget,
        progress,
        &mut |call| {
            let tap = match (call.batch, &store, picks.get(call.step).copied().flatten()) {
                (0, Some(store), Some(salt)) => Some(ColumnTap {
                    store,
                    salt,
                    t: call.t,
                    keep: call.kept_prefix(),
                }),
                _ => None,
            };
            if let (Some(dc), Some(tap)) = (&driver_columns, &tap) {
                dc.observe(&call.inputs, tap.salt, tap.t, tap.keep)?;
            }
            let mut outs = observer.observe(&mut cal, call.t, &call.inputs, tap)?;
            calls += 1;
            if call.batch == 0 {
                cal.records.push(call.record()?);
                cal.record_steps.push(call.t);
                cal.record_outputs.push(call.cut(&outs[0])?);
            }
            if call.step == 0 {
                cal.batches += 1;
            }
            if let Some(d) = &driver {
                return Ok(d.run(&call.inputs)?.swap_remove(0));
            }
            Ok(outs.swap_remove(0))
        },
    )?;
    cal.call_seconds = clock.elapsed().as_secs_f64() / calls.max(1) as f64;
    cal.call_work_seconds = work.seconds() / calls.max(1) as f64;
    if ran < batches {
        let note = format!(
            "calibration stopped after {ran} of {batches} trajectory batches: calls took {} on average, more than planned, and the next batch would have passed --calib-budget {}",
            crate::analysis::budget::human_duration(cal.call_seconds),
            crate::analysis::budget::human_duration(options.calib_budget_s),
        );
        cal.budget_note = Some(match cal.budget_note.take() {
            Some(first) => format!("{first}; {note}"),
            None => note,
        });
    }
    cal.layer_columns = store.map(std::sync::Arc::new);
    cal.quant_layer_columns = driver_columns.map(|d| std::sync::Arc::new(d.store));
    Ok(cal)
}

/// Observes `values` (activation names) along calibration trajectories: over recorded
/// calls when the calibration data holds them ([`calibrate_recorded`]), else along
/// generated ones ([`calibrate_generated`]).
pub fn calibrate(
    model: &Model,
    options: &Options,
    t_name: &str,
    values: &[String],
    layers: Vec<LayerInput>,
    progress: &dyn Fn(&str),
) -> Result<Calibration> {
    calibrate_driven(model, None, options, t_name, values, layers, progress)
}

/// [`calibrate`], with the generated trajectories driven by `driver`'s predictions when
/// given (PAR: the quantized model, run on the int8 runtime, walks its own trajectories;
/// `model`, the float one, is observed at the inputs it visits and its outputs are the
/// records' references). Recorded calls are the same either way.
pub fn calibrate_driven(
    model: &Model,
    driver: Option<&Model>,
    options: &Options,
    t_name: &str,
    values: &[String],
    layers: Vec<LayerInput>,
    progress: &dyn Fn(&str),
) -> Result<Calibration> {
    let g = &model.graph;
    let set = timestep_set(model, options)?;
    if !g.inputs.iter().any(|i| i.name == t_name) {
        return Err(Error::pass(
            "calibrate",
            format!("the model has no time-step input '{t_name}'"),
        ));
    }
    let sample = find_sample_input(model, t_name)?;
    // The prediction is the graph output; the activations are observed while tract
    // runs, each folded into its range as soon as it is computed (an SD-class UNet's
    // attention scores alone would not fit in memory all at once).
    check_calibration_memory(model, options, &sample)?;
    progress("calibrate: planning the float model in tract");
    let observer = Observer {
        runner: Runner::observing(model, values, Optimize::Full)?,
        values,
    };
    let cal = Calibration {
        sample_input: sample.name.clone(),
        timestep_input: t_name.to_string(),
        ..Default::default()
    };
    let given = Given::read(model, options)?;
    if let Some(calls) = recorded_calls(model, &given, t_name, &set)? {
        return calibrate_recorded(&observer, cal, calls, layers, progress);
    }
    let plan = Plan::new(
        model,
        options,
        t_name,
        &given,
        &set,
        options.calib_batch.min(options.calib_samples),
    )?;
    calibrate_generated(
        &observer, driver, cal, plan, model, options, &set, layers, progress,
    )
}
