//! Pipeline options and the finite time-step set S.

use crate::error::{Error, Result};
use crate::ir::Model;

/// Metadata keys tfmqc reads (written by model exporters or by tfmqc itself).
pub mod meta {
    pub const TRAIN_TIMESTEPS: &str = "diffusion.train_timesteps";
    pub const BETA_SCHEDULE: &str = "diffusion.beta_schedule";
    pub const BETA_START: &str = "diffusion.beta_start";
    pub const BETA_END: &str = "diffusion.beta_end";
    /// Written by tfmqc: the time-step set, comma-separated.
    pub const TIMESTEPS: &str = "tfmqc.timesteps";
    pub const TIMESTEP_INPUT: &str = "tfmqc.timestep_input";
    pub const TIB_FRONTIER: &str = "tfmqc.tib.frontier";
    pub const VERSION: &str = "tfmqc.version";
    pub const PASSES: &str = "tfmqc.passes";
    pub const OPTIONS: &str = "tfmqc.options";
    pub const SCHEDULE: &str = "tfmqc.schedule";
    pub const SEED: &str = "tfmqc.calibration_seed";
}

/// Weight-rounding reconstruction of the quantized layers (`--reconstruct`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reconstruct {
    /// Round to nearest.
    None,
    /// GPTQ: Hessian-based rounding, one Cholesky per layer.
    Gptq,
    /// Layer-wise AdaRound with closed-form gradients.
    AdaRound,
}

/// What becomes of the Temporal Information Block (`--tib`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TibMode {
    /// Exact tables `[|S|, ...]` for every frontier value (fold-tib).
    Lut,
    /// The TIB stays computed; its linear layers are quantized and their rounding
    /// reconstructed by TIAR.
    Quant,
    /// Per frontier value: the table, or the quantized TIB after TIAR, by error and bytes
    /// under `--lut-budget`.
    Auto,
}

/// Options every pass may read. The CLI fills them; `Default` gives the documented
/// defaults.
#[derive(Clone, Debug)]
pub struct Options {
    /// `--timesteps`: `1000`, `ddim:50` or an explicit list. `None`: metadata, else 1000.
    pub timesteps: Option<String>,
    /// `--timestep-input`: skip detection and use this graph input.
    pub timestep_input: Option<String>,
    /// `--weight-bits`: 8 or 4.
    pub weight_bits: u32,
    /// `--act-bits`: 8, or 32 for weight-only quantization.
    pub act_bits: u32,
    /// `--step-groups`: FSC granularity; 1 = one set of activation scales.
    pub step_groups: usize,
    /// `--calib`: recorded inputs (safetensors) instead of generated ones.
    pub calib: Option<std::path::PathBuf>,
    /// `--calib-samples`: trajectories to generate.
    pub calib_samples: usize,
    /// Trajectories run together (dynamic-batch models only).
    pub calib_batch: usize,
    /// `--calib-steps`: DDIM steps of each generated trajectory (taken from S).
    pub calib_steps: usize,
    pub seed: u64,
    /// `--keep-float`: node-name substrings left in float.
    pub keep_float: Vec<String>,
    /// `--baseline minmax`: plain min-max PTQ of the same layers, for comparisons.
    pub baseline_minmax: bool,
    /// `--act-range mse`: shrink each activation range to minimise the quantization MSE
    /// on the calibration records (default: the EMA min/max as the reference does).
    pub act_range_mse: bool,
    /// `--reconstruct`: weight rounding against each layer's calibration inputs.
    pub reconstruct: Reconstruct,
    /// AdaRound steps per layer.
    pub adaround_iters: usize,
    /// `--tib`: tables, quantized TIB (TIAR), or a choice per frontier value.
    pub tib: TibMode,
    /// `--lut-budget`: bytes the TIB tables may take with `--tib auto`; `None`: 10 % of
    /// the quantized model's bytes.
    pub lut_budget: Option<u64>,
    /// `--tiar-iters`: Adam steps of TIAR.
    pub tiar_iters: usize,
    /// Noise schedule overrides (else the model's metadata, else DDPM linear, T = 1000).
    pub schedule: Option<String>,
    pub train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    /// `--max-memory`: bytes a phase may plan to hold; `None`: the memory available.
    pub max_memory: Option<u64>,
    /// `--calib-budget`: seconds of model calls calibration may spend when the user did
    /// not fix `--calib-samples` / `--calib-steps` (then `calib_adaptive`).
    pub calib_budget_s: f64,
    /// Whether calibration may shrink its trajectories to fit `calib_budget_s`.
    pub calib_adaptive: bool,
    /// `--threads`: threads of the weight numerics (range search, GPTQ); 0 = every core.
    /// (Model calls take theirs from the caller's `tfmqc_runtime::with_threads`.)
    pub threads: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            timesteps: None,
            timestep_input: None,
            weight_bits: 8,
            act_bits: 8,
            step_groups: 1,
            calib: None,
            calib_samples: 32,
            calib_batch: 8,
            calib_steps: 50,
            seed: 0,
            keep_float: vec![],
            baseline_minmax: false,
            act_range_mse: false,
            reconstruct: Reconstruct::Gptq,
            adaround_iters: 2000,
            tib: TibMode::Lut,
            lut_budget: None,
            tiar_iters: 2000,
            schedule: None,
            train_timesteps: None,
            beta_start: None,
            beta_end: None,
            max_memory: None,
            calib_budget_s: 1200.0,
            calib_adaptive: false,
            threads: 0,
        }
    }
}

impl Options {
    /// Checks combinations no pass can run with.
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.weight_bits, 4 | 8) {
            return Err(Error::invalid(format!(
                "--weight-bits {}: 4 or 8",
                self.weight_bits
            )));
        }
        if !matches!(self.act_bits, 8 | 32) {
            return Err(Error::invalid(format!(
                "--act-bits {}: 8, or 32 for weight-only (16-bit activations are not supported yet)",
                self.act_bits
            )));
        }
        if self.step_groups == 0 {
            return Err(Error::invalid("--step-groups must be at least 1"));
        }
        if self.calib_budget_s.is_nan() || self.calib_budget_s <= 0.0 {
            return Err(Error::invalid(
                "--calib-budget must be a positive number of seconds",
            ));
        }
        if self.calib_batch == 0 {
            return Err(Error::invalid("--calib-batch must be at least 1"));
        }
        if self.calib_samples == 0 || self.calib_steps == 0 {
            return Err(Error::invalid(
                "--calib-samples and --calib-steps must be at least 1",
            ));
        }
        Ok(())
    }

    /// The noise schedule: options, else the model's metadata, else DDPM linear.
    pub fn schedule(&self, model: &Model) -> Result<tfmqc_runtime::Schedule> {
        let meta_f = |k: &str| -> Result<Option<f64>> {
            model
                .metadata_value(k)
                .map(|v| {
                    v.trim().parse::<f64>().map_err(|_| {
                        Error::invalid(format!("metadata {k} = '{v}' is not a number"))
                    })
                })
                .transpose()
        };
        let kind = match (&self.schedule, model.metadata_value(meta::BETA_SCHEDULE)) {
            (Some(k), _) => k.clone(),
            (None, Some(k)) => k.to_string(),
            (None, None) => "linear".into(),
        };
        let kind: tfmqc_runtime::BetaSchedule = kind.parse().map_err(Error::invalid)?;
        let t = match self.train_timesteps {
            Some(t) => t,
            None => train_timesteps(model)?,
        };
        let b0 = self
            .beta_start
            .or(meta_f(meta::BETA_START)?)
            .unwrap_or(1e-4);
        let b1 = self.beta_end.or(meta_f(meta::BETA_END)?).unwrap_or(2e-2);
        if !(b0 > 0.0 && b1 > b0 && b1 < 1.0) {
            return Err(Error::invalid(format!(
                "beta schedule {b0}..{b1} is not increasing inside (0, 1)"
            )));
        }
        Ok(tfmqc_runtime::Schedule::new(kind, t, b0, b1))
    }
}

/// The number of training time steps T: the model's metadata, else 1000.
pub fn train_timesteps(model: &Model) -> Result<usize> {
    match model.metadata_value(meta::TRAIN_TIMESTEPS) {
        Some(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&t| t > 0)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "metadata {} = '{v}' is not a positive integer",
                    meta::TRAIN_TIMESTEPS
                ))
            }),
        None => Ok(1000),
    }
}

/// Parses a time-step set: `N` (0..N-1), `ddim:N` (k·T/N for k < N) or `a,b,c`.
/// The result is sorted, without duplicates, and inside 0..T.
pub fn parse_timesteps(spec: &str, train_timesteps: usize) -> Result<Vec<i64>> {
    let t = train_timesteps as i64;
    let spec = spec.trim();
    let bad = |why: String| Error::invalid(format!("--timesteps '{spec}': {why}"));
    let mut set: Vec<i64> = if let Some(n) = spec.strip_prefix("ddim:") {
        let n: i64 = n
            .trim()
            .parse()
            .map_err(|_| bad("ddim:N needs a whole number N".into()))?;
        if n <= 0 || n > t {
            return Err(bad(format!("ddim:N needs 1 ≤ N ≤ T = {t}")));
        }
        (0..n).map(|k| k * t / n).collect()
    } else if spec.contains(',') {
        spec.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim()
                    .parse::<i64>()
                    .map_err(|_| bad(format!("'{}' is not a whole number", s.trim())))
            })
            .collect::<Result<_>>()?
    } else {
        let n: i64 = spec
            .parse()
            .map_err(|_| bad("expected N (0..N-1), ddim:N, or a comma-separated list".into()))?;
        if n > t {
            return Err(bad(format!(
                "0..{} goes past the model's T = {t} training steps",
                n - 1
            )));
        }
        (0..n).collect()
    };
    if set.is_empty() {
        return Err(bad("the time-step set is empty".into()));
    }
    if let Some(&v) = set.iter().find(|&&v| v < 0 || v >= t) {
        return Err(bad(format!(
            "time step {v} is outside the model's range 0..{}",
            t - 1
        )));
    }
    set.sort_unstable();
    set.dedup();
    Ok(set)
}

/// S for a model: `--timesteps`, else the set recorded by an earlier tfmqc run, else
/// all T training steps.
pub fn timestep_set(model: &Model, options: &Options) -> Result<Vec<i64>> {
    let t = match options.train_timesteps {
        Some(t) => t,
        None => train_timesteps(model)?,
    };
    if let Some(spec) = &options.timesteps {
        return parse_timesteps(spec, t);
    }
    if let Some(recorded) = model.metadata_value(meta::TIMESTEPS) {
        return parse_timesteps(recorded, t);
    }
    parse_timesteps(&t.to_string(), t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddim_subset_is_k_times_t_over_n() {
        let s = parse_timesteps("ddim:50", 1000).unwrap();
        assert_eq!(s.len(), 50);
        assert_eq!(&s[..3], &[0, 20, 40]);
        assert_eq!(*s.last().unwrap(), 980);
    }

    #[test]
    fn count_means_all_steps_below_it() {
        assert_eq!(parse_timesteps("4", 1000).unwrap(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn explicit_list_is_sorted_and_deduplicated() {
        assert_eq!(
            parse_timesteps("40, 0,20,20", 1000).unwrap(),
            vec![0, 20, 40]
        );
    }

    #[test]
    fn values_outside_the_schedule_are_rejected() {
        let e = parse_timesteps("0,1000", 1000).unwrap_err().to_string();
        assert!(e.contains("outside the model's range 0..999"), "{e}");
        assert!(parse_timesteps("2000", 1000).is_err());
        assert!(parse_timesteps("-1,3", 1000).is_err());
    }

    #[test]
    fn empty_and_malformed_sets_are_rejected() {
        assert!(parse_timesteps(",", 1000)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(parse_timesteps("0", 1000)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(parse_timesteps("ddim:x", 1000).is_err());
        assert!(parse_timesteps("abc", 1000).is_err());
    }
}
