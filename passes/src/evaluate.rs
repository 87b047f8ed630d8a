//! Quality measurements against the float model on recorded inputs: output SQNR per
//! time step, and the quantization noise of each activation under its scales.

use std::collections::BTreeMap;

use serde::Serialize;
use tfmqc_runtime::engine::Optimize;

use crate::error::Result;
use crate::exec::Runner;
use crate::ir::{Model, Tensor};
use crate::quant::{fake_quant_u8, sqnr_from_sums};
use crate::quantize::QuantPlan;

#[derive(Clone, Debug, Serialize)]
pub struct StepSqnr {
    pub t: i64,
    pub sqnr_db: f64,
}

/// Output SQNR of `quant` against `float`, per time step, over the records.
pub fn output_sqnr_per_step(
    float: &Model,
    quant: &Model,
    records: &[BTreeMap<String, Tensor>],
    steps: &[i64],
) -> Result<Vec<StepSqnr>> {
    let out = vec![float.graph.outputs[0].name.clone()];
    let a = Runner::new(float, Some(&out), Optimize::Full)?;
    let b = Runner::new(quant, Some(&out), Optimize::Full)?;
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
    let runner = Runner::new(float, Some(&names), Optimize::Full)?;
    let mut sums = vec![(0f64, 0f64); names.len()];
    for (inputs, &t) in records.iter().zip(steps) {
        let group = plan.group(t);
        let outs = runner.run(&inputs.clone().into_iter().collect())?;
        for ((act, out), sum) in plan.activations.iter().zip(&outs).zip(sums.iter_mut()) {
            let (scale, zp) = act.groups[group.min(act.groups.len() - 1)];
            for x in out.to_f32_vec()? {
                sum.0 += (x as f64).powi(2);
                sum.1 += ((x - fake_quant_u8(x, scale, zp)) as f64).powi(2);
            }
        }
    }
    Ok(names
        .into_iter()
        .zip(sums)
        .map(|(n, (s, e))| (n, sqnr_from_sums(s, e)))
        .collect())
}
