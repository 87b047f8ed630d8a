//! Quality measurements against the float model on recorded inputs: output SQNR per
//! time step, and the quantization noise of each activation under its scales.

use std::collections::BTreeMap;

use serde::Serialize;
use tfmqc_runtime::engine::Optimize;

use crate::analysis::quant_plan::QuantPlan;
use crate::error::Result;
use crate::ir::exec::Runner;
use crate::ir::{Model, Tensor};
use crate::numerics::quant::{act_clip, fake_quant_u8, sqnr_from_sums};

#[derive(Clone, Debug, Serialize)]
pub struct StepSqnr {
    pub t: i64,
    pub sqnr_db: f64,
}

/// Output SQNR of `quant` against `float`, per time step, over the records. `quant` runs
/// on the runtime's int8 kernels, as it ships.
pub fn output_sqnr_per_step(
    float: &Model,
    quant: &Model,
    records: &[BTreeMap<String, Tensor>],
    steps: &[i64],
) -> Result<Vec<StepSqnr>> {
    let out = vec![float.graph.outputs[0].name.clone()];
    let a = Runner::new(float, Some(&out), Optimize::Full)?;
    let b = Runner::int8(quant, Some(&out), Optimize::Full)?;
    let mut sums: BTreeMap<i64, (f64, f64)> = BTreeMap::new();
    for (inputs, &t) in records.iter().zip(steps) {
        let inputs = inputs.clone().into_iter().collect();
        let y = a.run(&inputs)?[0].to_f32_vec()?;
        let q = b.run(&inputs)?[0].to_f32_vec()?;
        let e = sums.entry(t).or_default();
        for (u, v) in y.iter().zip(&q) {
            e.0 += (*u as f64).powi(2);
            e.1 += ((u - v) as f64).powi(2);
        }
    }
    Ok(sums
        .into_iter()
        .map(|(t, (s, n))| StepSqnr {
            t,
            sqnr_db: sqnr_from_sums(s, n),
        })
        .collect())
}

/// Output SQNR of `quant` per time step against `reference`, the float model's outputs on
/// the same records (kept by calibration: the float model need not run again). `quant`
/// runs on the runtime's int8 kernels, as it ships.
pub fn output_sqnr_against(
    quant: &Model,
    records: &[BTreeMap<String, Tensor>],
    steps: &[i64],
    reference: &[Tensor],
) -> Result<Vec<StepSqnr>> {
    Ok(output_sqnr_by_part(quant, records, steps, reference, &|_, _| 0, 0)?.0)
}

/// [`output_sqnr_against`], and the same per part of the rows: `part(record, row)` says
/// which of `parts` a row of a record's output (dim 0 of the reference) belongs to (e.g.
/// two halves of the held-out images, whose disagreement measures the held-out set's own
/// noise). A step no row of a part visits is absent from that part's list.
pub fn output_sqnr_by_part(
    quant: &Model,
    records: &[BTreeMap<String, Tensor>],
    steps: &[i64],
    reference: &[Tensor],
    part: &dyn Fn(usize, usize) -> usize,
    parts: usize,
) -> Result<(Vec<StepSqnr>, Vec<Vec<StepSqnr>>)> {
    let out = vec![quant.graph.outputs[0].name.clone()];
    let b = Runner::int8(quant, Some(&out), Optimize::Full)?;
    crate::analysis::budget::trace_memory("evaluate: quantized model on the int8 runtime");
    let mut sums: BTreeMap<i64, (f64, f64)> = BTreeMap::new();
    let mut part_sums: Vec<BTreeMap<i64, (f64, f64)>> = vec![BTreeMap::new(); parts];
    for (r, ((inputs, &t), reference)) in records.iter().zip(steps).zip(reference).enumerate() {
        let inputs = inputs.clone().into_iter().collect();
        let y = reference.to_f32_vec()?;
        let q = b.run(&inputs)?[0].to_f32_vec()?;
        let rows = reference.shape.first().copied().unwrap_or(1).max(1);
        let per_row = y.len() / rows;
        let e = sums.entry(t).or_default();
        for (i, (u, v)) in y.iter().zip(&q).enumerate() {
            let (s, n) = ((*u as f64).powi(2), ((u - v) as f64).powi(2));
            e.0 += s;
            e.1 += n;
            if let Some(p) = part_sums.get_mut(part(r, i / per_row.max(1))) {
                let pe = p.entry(t).or_default();
                pe.0 += s;
                pe.1 += n;
            }
        }
    }
    let to_steps = |sums: BTreeMap<i64, (f64, f64)>| -> Vec<StepSqnr> {
        sums.into_iter()
            .map(|(t, (s, n))| StepSqnr {
                t,
                sqnr_db: sqnr_from_sums(s, n),
            })
            .collect()
    };
    Ok((
        to_steps(sums),
        part_sums.into_iter().map(to_steps).collect(),
    ))
}

/// SQNR of each quantized activation (its uint8 fake-quantization against itself) on
/// the float model's values, over the records; the group of each record's step applies.
pub fn activation_sqnr(
    float: &Model,
    plan: &QuantPlan,
    records: &[BTreeMap<String, Tensor>],
    steps: &[i64],
) -> Result<Vec<(String, f64)>> {
    if plan.activations.is_empty() {
        return Ok(vec![]);
    }
    let names: Vec<String> = plan.activations.iter().map(|a| a.value.clone()).collect();
    // Observed while tract runs: no activation outlives its consumers.
    let runner = Runner::observing(float, &names, Optimize::Full)?;
    crate::analysis::budget::trace_memory("evaluate: float model compiled for observation");
    let mut sums = vec![(0f64, 0f64); names.len()];
    for (inputs, &t) in records.iter().zip(steps) {
        runner.run_observed(&inputs.clone().into_iter().collect(), &mut |k, value| {
            let act = &plan.activations[k];
            let (scale, zp) = plan.params_at(act, t);
            let sum = &mut sums[k];
            // Below 8 bits the graph clips to the narrower grid before quantizing.
            let (lo, hi) = act_clip(scale, zp, plan.act_bits);
            for &x in crate::ir::exec::f32_values(value, &act.value)? {
                sum.0 += (x as f64).powi(2);
                sum.1 += ((x - fake_quant_u8(x.clamp(lo, hi), scale, zp)) as f64).powi(2);
            }
            Ok(())
        })?;
    }
    Ok(names
        .into_iter()
        .zip(sums)
        .map(|(n, (s, e))| (n, sqnr_from_sums(s, e)))
        .collect())
}
