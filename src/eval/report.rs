//! The result of `tfmqc eval` as types: the `--json` object (docs/eval-json.md) and the
//! table printed without `--json`.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::check::WeightCheck;

/// Mean, min, median and max of some values.
#[derive(Serialize, Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    pub mean: f64,
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Stats {
    /// `None` for no values (null in the JSON).
    pub fn of(v: &[f64]) -> Option<Stats> {
        if v.is_empty() {
            return None;
        }
        let mut sorted = v.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Stats {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            min: sorted[0],
            median: sorted[sorted.len() / 2],
            max: sorted[sorted.len() - 1],
        })
    }
}

#[derive(Serialize, Debug)]
pub struct FloatResult {
    pub file: String,
    /// FLOAT's Fréchet distance (null: skipped, see `notes`).
    pub fd: Option<f64>,
}

#[derive(Serialize, Debug)]
pub struct Timesteps {
    pub source: String,
    pub values: Vec<i64>,
}

/// Cosine and relative MSE per t in S of one frontier value.
#[derive(Serialize, Debug)]
pub struct FeatureError {
    pub name: String,
    pub cosine: Vec<f64>,
    pub rel_mse: Vec<f64>,
}

#[derive(Serialize, Debug)]
pub struct FeatureSummary {
    pub cosine: Option<Stats>,
    pub rel_mse: Option<Stats>,
}

#[derive(Serialize, Debug)]
pub struct TemporalFeatures {
    /// Over every value and t; null when none was compared.
    pub summary: Option<FeatureSummary>,
    /// Frontier values QUANT has no value of that name for.
    pub missing: Vec<String>,
    pub values: Vec<FeatureError>,
}

impl TemporalFeatures {
    pub fn new(values: Vec<FeatureError>, missing: Vec<String>) -> TemporalFeatures {
        let summary = (!values.is_empty()).then(|| {
            let all = |f: fn(&FeatureError) -> &Vec<f64>| -> Vec<f64> {
                values.iter().flat_map(|e| f(e).iter().copied()).collect()
            };
            FeatureSummary {
                cosine: Stats::of(&all(|e| &e.cosine)),
                rel_mse: Stats::of(&all(|e| &e.rel_mse)),
            }
        });
        TemporalFeatures {
            summary,
            missing,
            values,
        }
    }
}

#[derive(Serialize, Clone, Copy, Debug)]
pub struct StepDb {
    pub t: i64,
    pub db: f64,
}

#[derive(Serialize, Debug)]
pub struct StepSqnr {
    pub summary: Option<Stats>,
    pub per_step: Vec<StepDb>,
}

impl StepSqnr {
    pub fn new(per_step: Vec<StepDb>) -> StepSqnr {
        let db: Vec<f64> = per_step.iter().map(|s| s.db).collect();
        StepSqnr {
            summary: Stats::of(&db),
            per_step,
        }
    }
}

#[derive(Serialize, Debug)]
pub struct SamplePsnr {
    pub summary: Option<Stats>,
    pub per_sample: Vec<f64>,
}

/// One QUANT's numbers.
#[derive(Serialize, Debug)]
pub struct QuantResult {
    pub file: String,
    pub label: String,
    /// Whether tfmqc wrote it (its metadata says so).
    pub tfmqc: bool,
    /// How a tfmqc file was made (its `tfmqc.options` metadata), else null.
    pub tfmqc_options: Option<Value>,
    pub weight_check: WeightCheck,
    pub temporal_features: TemporalFeatures,
    pub step_sqnr_db: StepSqnr,
    pub sample_psnr_db: SamplePsnr,
    pub fd: Option<f64>,
}

/// The `--json` object.
#[derive(Serialize, Debug)]
pub struct EvalReport {
    pub tool_version: &'static str,
    pub float: FloatResult,
    pub timestep_input: String,
    pub timesteps: Timesteps,
    /// The scheduler configuration, diffusers' keys.
    pub schedule: Value,
    pub sampler: &'static str,
    pub guidance_scale: Option<f32>,
    pub steps: usize,
    pub trajectory: Vec<i64>,
    pub samples: usize,
    pub seed: u64,
    pub stand_in_inputs: Vec<String>,
    pub frontier: Vec<String>,
    pub fd_features: Option<String>,
    pub quant: Vec<QuantResult>,
    /// The files `--plots` wrote, by kind; null without `--plots`.
    pub plots: Option<BTreeMap<&'static str, String>>,
    pub notes: Vec<String>,
    pub seconds: f64,
}

fn fmt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.decimals$}"),
        _ => "-".into(),
    }
}

/// `mean/min` of some stats.
fn mean_min(s: Option<&Stats>, decimals: usize) -> String {
    format!(
        "{}/{}",
        fmt(s.map(|s| s.mean), decimals),
        fmt(s.map(|s| s.min), decimals)
    )
}

/// The table printed without `--json`: one row per model.
pub fn table(r: &EvalReport) -> String {
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
        fmt(r.float.fd, 2)
    ));
    for q in &r.quant {
        let tf = match q
            .temporal_features
            .summary
            .as_ref()
            .and_then(|s| s.cosine.as_ref())
        {
            None => "n/a".to_string(),
            Some(c) => mean_min(Some(c), 4),
        };
        s.push_str(&format!(
            "{:<34} {:>18} {:>15} {:>17} {:>8}\n",
            q.label,
            tf,
            mean_min(q.step_sqnr_db.summary.as_ref(), 1),
            mean_min(q.sample_psnr_db.summary.as_ref(), 1),
            fmt(q.fd, 2)
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_summaries_are_null_without_values() {
        assert_eq!(Stats::of(&[]), None);
        let s = Stats::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.mean, s.min, s.median, s.max), (2.0, 1.0, 2.0, 3.0));
        let none = TemporalFeatures::new(vec![], vec!["emb".into()]);
        let v = serde_json::to_value(&none).unwrap();
        assert!(v["summary"].is_null());
        assert_eq!(v["missing"][0], "emb");
        let some = TemporalFeatures::new(
            vec![FeatureError {
                name: "emb".into(),
                cosine: vec![1.0, 0.5],
                rel_mse: vec![0.0, 0.25],
            }],
            vec![],
        );
        let v = serde_json::to_value(&some).unwrap();
        assert_eq!(v["summary"]["cosine"]["min"], 0.5);
        assert_eq!(v["summary"]["rel_mse"]["max"], 0.25);
    }
}
