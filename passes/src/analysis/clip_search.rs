//! `--act-range mse`: per activation and step group, the clip of the calibrated range
//! that minimises the uint8 quantization MSE on the calibration records. Values are
//! streamed into fixed histograms over the calibrated range (plus what falls outside),
//! so memory does not grow with the records.

use std::collections::HashMap;

use tfmqc_runtime::engine::Optimize;

use crate::analysis::calibration::{Calibration, Range};
use crate::error::Result;
use crate::ir::exec::Runner;
use crate::ir::Model;
use crate::numerics::quant::act_params_u8;

const BINS: usize = 1024;
/// Candidate clips: the range scaled by 1.00, 0.95, …, 0.50.
const SHRINKS: usize = 11;

struct Histogram {
    range: Range,
    counts: Vec<f64>,
    /// Values outside the range: kept exactly (they dominate the clipping error).
    outside: Vec<f32>,
}

impl Histogram {
    fn new(range: Range) -> Histogram {
        Histogram {
            range,
            counts: vec![0.0; BINS],
            outside: vec![],
        }
    }

    fn add(&mut self, x: f32) {
        let Range { min, max } = self.range;
        if x < min || x > max {
            if self.outside.len() < 100_000 {
                self.outside.push(x);
            }
            return;
        }
        let i = (((x - min) / (max - min).max(1e-12)) * BINS as f32) as usize;
        self.counts[i.min(BINS - 1)] += 1.0;
    }

    /// Expected squared error of quantizing with the range clipped to `clip`.
    fn mse(&self, clip: Range) -> f64 {
        let (scale, _) = act_params_u8(clip.min, clip.max);
        let width = (self.range.max - self.range.min) / BINS as f32;
        let rounding = (scale as f64).powi(2) / 12.0;
        let err = |x: f32| -> f64 {
            if x < clip.min {
                ((clip.min - x) as f64).powi(2)
            } else if x > clip.max {
                ((x - clip.max) as f64).powi(2)
            } else {
                rounding
            }
        };
        let inside: f64 = self
            .counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0.0)
            .map(|(i, &c)| c * err(self.range.min + (i as f32 + 0.5) * width))
            .sum();
        inside + self.outside.iter().map(|&x| err(x)).sum::<f64>()
    }
}

/// Replaces each range by its MSE-optimal shrink.
pub fn shrink_to_mse(
    model: &Model,
    cal: &Calibration,
    ranges: &mut HashMap<String, Vec<Range>>,
    members: &[Vec<i64>],
) -> Result<()> {
    let names: Vec<String> = ranges.keys().cloned().collect();
    let runner = Runner::new(model, Some(&names), Optimize::Full)?;
    let group_of = |t: i64| members.iter().position(|m| m.contains(&t)).unwrap_or(0);
    let mut hists: HashMap<(String, usize), Histogram> = HashMap::new();
    for (inputs, &t) in cal.records.iter().zip(&cal.record_steps) {
        let g = group_of(t);
        let outs = runner.run(&inputs.clone().into_iter().collect())?;
        for (name, out) in names.iter().zip(&outs) {
            let h = hists
                .entry((name.clone(), g))
                .or_insert_with(|| Histogram::new(ranges[name][g]));
            for x in out.to_f32_vec()? {
                h.add(x);
            }
        }
    }
    for ((name, g), h) in hists {
        let base = ranges[&name][g];
        let best = (0..SHRINKS)
            .map(|i| {
                let f = 1.0 - 0.05 * i as f32;
                Range {
                    min: base.min * f,
                    max: base.max * f,
                }
            })
            .min_by(|a, b| h.mse(*a).total_cmp(&h.mse(*b)))
            .expect("candidates");
        ranges.get_mut(&name).expect("known")[g] = best;
    }
    Ok(())
}
