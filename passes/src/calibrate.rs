//! calibrate: Finite Set Calibration. Runs the float model along seeded trajectories of
//! the deployment sampler (`trajectory`: the runtime's sampler under the scheduler
//! configuration, classifier-free guidance included), or over recorded calls, and keeps,
//! for every activation that
//! `quantize` will quantize, an EMA of per-batch min/max (momentum 0.95) *per time step*,
//! plus the plain global min/max for the baseline. Statistics stream: memory grows with
//! the number of steps, not with the number of samples. One batch per step is kept as
//! evaluation records (reports, `--dump-calib`).

use std::collections::BTreeMap;

use tfmqc_runtime::engine::Optimize;

use crate::error::{Error, Result};
use crate::exec::Runner;
use crate::ir::{Model, Tensor};
use crate::options::{timestep_set, Options};
use crate::pipeline::{Pass, PassContext};
use crate::targets::find_targets;
use crate::trajectory::{find_sample_input, recorded_calls, Given, Plan};
pub use crate::trajectory::{stand_in, timestep_tensor};

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
    /// Inputs fed with seeded stand-ins (no --calib file gave them).
    pub stand_ins: Vec<String>,
    /// The graph input carrying the sample and the time step.
    pub sample_input: String,
    pub timestep_input: String,
    pub batches: usize,
    /// What the trajectories were: `ddim at 50, 30, 25, 20 steps` (empty for recorded
    /// calls).
    pub trajectories: String,
    /// Lines for the user (guidance's unconditional input, unused file entries, ...).
    pub notes: Vec<String>,
}

impl Pass for Calibrate {
    fn name(&self) -> &'static str {
        "calibrate"
    }
    fn summary(&self) -> &'static str {
        "Finite Set Calibration: per-step activation ranges along the deployment sampler's trajectories"
    }
    fn requires(&self) -> &'static [&'static str] {
        &["detect-tib"]
    }
    fn run(&self, cx: &mut PassContext) -> Result<()> {
        let tib = cx.tib.as_ref().expect("checked by requires");
        let targets = find_targets(&cx.model.graph, &cx.options.keep_float);
        let values = targets.activation_values();
        let cal = calibrate(
            &cx.model,
            cx.options,
            &tib.timestep_input,
            &values,
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
        for n in &cal.notes {
            cx.note(n.clone());
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

/// Observes `values` (activation names) along calibration trajectories.
pub fn calibrate(
    model: &Model,
    options: &Options,
    t_name: &str,
    values: &[String],
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
    let out_info = g.outputs[0].clone();

    // Outputs: the denoiser's prediction first, then the activations.
    let mut outputs = vec![out_info.name.clone()];
    outputs.extend(values.iter().cloned());
    let runner = Runner::new(model, Some(&outputs), Optimize::Full)?;
    let mut cal = Calibration {
        sample_input: sample.name.clone(),
        timestep_input: t_name.to_string(),
        ..Default::default()
    };
    let observe = |cal: &mut Calibration, t: i64, outs: &[Tensor]| -> Result<()> {
        for (name, tensor) in values.iter().zip(&outs[1..]) {
            let v = tensor.to_f32_vec()?;
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
        Ok(())
    };

    let given = Given::read(model, options)?;

    // Recorded calls (`NNNNN/<input>` keys, or inputs stacked by name): no generation.
    if let Some(calls) = recorded_calls(model, &given, t_name, &set)? {
        let total = calls.len();
        for call in calls {
            progress(&format!(
                "calibrate: recorded call {}/{total}",
                call.batch + 1
            ));
            let outs = runner.run(&call.inputs)?;
            observe(&mut cal, call.t, &outs)?;
            cal.records.push(call.record()?);
            cal.record_steps.push(call.t);
            cal.batches += 1;
        }
        return Ok(cal);
    }

    // Generated trajectories of the deployment sampler; batch b runs the b-th step count
    // (cycling, largest first), so the evaluation records of batch 0 hold every step of
    // the longest trajectory.
    let plan = Plan::new(
        model,
        options,
        t_name,
        &given,
        &set,
        options.calib_batch.min(options.calib_samples),
    )?;
    cal.stand_ins = plan.stand_ins.clone();
    cal.notes = plan.notes.clone();
    cal.trajectories = format!(
        "{} at {} steps{}",
        plan.sampler,
        plan.step_counts
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        plan.guidance
            .map(|g| format!(", guidance {g}"))
            .unwrap_or_default()
    );
    let batches = options
        .calib_samples
        .div_ceil(plan.images)
        .max(plan.step_counts.len().min(options.calib_samples));
    plan.run(model, batches, options.seed, progress, &mut |call| {
        let mut outs = runner.run(&call.inputs)?;
        observe(&mut cal, call.t, &outs)?;
        if call.batch == 0 {
            cal.records.push(call.record()?);
            cal.record_steps.push(call.t);
        }
        if call.step == 0 {
            cal.batches += 1;
        }
        Ok(outs.swap_remove(0))
    })?;
    Ok(cal)
}
